//! The validate layer through an axum router: limits, JSON strictness, schema errors.

#![cfg(all(feature = "validate", feature = "axum"))]

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::routing::{get, post};
use battlement::annotate::Annotation;
use battlement::validate::{ConfigError, ParsedJson, ValidateLayer};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

fn order_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "product_id": {"type": "string", "minLength": 1, "maxLength": 64, "pattern": "^[A-Za-z0-9_-]+$"},
            "quantity": {"type": "integer", "minimum": 1, "maximum": 100},
            "note": {"type": "string", "maxLength": 500}
        },
        "required": ["product_id", "quantity"],
        "additionalProperties": false
    })
}

fn app(layer: ValidateLayer) -> Router {
    Router::new()
        .route(
            "/orders",
            post(|req: Request<Body>| async move {
                let parsed = req.extensions().get::<ParsedJson>().map(|p| p.0.clone());
                let bytes = req.into_body().collect().await.unwrap().to_bytes();
                // The handler has both: the parsed value and the original bytes.
                json!({
                    "quantity": parsed.map(|p| p["quantity"].clone()),
                    "raw_len": bytes.len(),
                })
                .to_string()
            }),
        )
        .route("/items", get(|| async { "items" }))
        .layer(layer)
}

fn orders() -> Router {
    app(ValidateLayer::builder()
        .max_body(16 * 1024)
        .content_types(["application/json"])
        .schema(order_schema())
        .build()
        .unwrap())
}

struct Answer {
    status: StatusCode,
    body: Value,
    text: String,
    headers: http::HeaderMap,
}

async fn send(app: &Router, req: Request<Body>) -> Answer {
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let text =
        String::from_utf8_lossy(&res.into_body().collect().await.unwrap().to_bytes()).into_owned();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Answer {
        status,
        body,
        text,
        headers,
    }
}

fn post_json(body: impl Into<Body>) -> Request<Body> {
    Request::post("/orders")
        .header("content-type", "application/json")
        .body(body.into())
        .unwrap()
}

/// A body that arrives in chunks, with no `Content-Length`.
struct Chunks(VecDeque<Bytes>);

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }
}

#[tokio::test]
async fn a_valid_body_reaches_the_handler_parsed_and_raw() {
    let body = r#"{"product_id": "p-1", "quantity": 3, "note": "leave at the door"}"#;
    let a = send(&orders(), post_json(body)).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["quantity"], 3);
    assert_eq!(a.body["raw_len"], body.len());
    // Content-Type parameters are ignored.
    let req = Request::post("/orders")
        .header("content-type", "Application/JSON; charset=utf-8")
        .body(Body::from(body))
        .unwrap();
    assert_eq!(send(&orders(), req).await.status, StatusCode::OK);
}

#[tokio::test]
async fn every_violation_is_reported_with_pointers_and_no_values() {
    let body =
        r#"{"product_id": "bad id!!", "quantity": 100000, "note": 7, "coupon": "FREE-STUFF"}"#;
    let a = send(&orders(), post_json(body)).await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(a.headers["content-type"], "application/problem+json");
    let errors = a.body["errors"].as_array().unwrap();
    let mut pointers: Vec<&str> = errors
        .iter()
        .map(|e| e["pointer"].as_str().unwrap())
        .collect();
    pointers.sort();
    assert_eq!(pointers, ["/coupon", "/note", "/product_id", "/quantity"]);
    for e in errors {
        assert!(e["keyword"].is_string() && e["detail"].is_string(), "{e}");
    }
    for value in ["bad id!!", "100000", "FREE-STUFF"] {
        assert!(!a.text.contains(value), "{value} echoed: {}", a.text);
    }
    // Missing fields.
    let a = send(&orders(), post_json("{}")).await;
    let pointers: Vec<&str> = a.body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["pointer"].as_str().unwrap())
        .collect();
    assert!(pointers.contains(&"/product_id") && pointers.contains(&"/quantity"));
    // Every unexpected property is named, each with its own pointer.
    let a = send(
        &orders(),
        post_json(r#"{"product_id": "p", "quantity": 1, "coupon": 1, "tip": 2, "a/b": 3}"#),
    )
    .await;
    let mut pointers: Vec<&str> = a.body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["pointer"].as_str().unwrap())
        .collect();
    pointers.sort();
    assert_eq!(pointers, ["/a~1b", "/coupon", "/tip"], "{}", a.text);
}

#[tokio::test]
async fn errors_are_capped() {
    let layer = ValidateLayer::builder()
        .schema(json!({"type": "array", "items": {"type": "integer"}, "maxItems": 1000}))
        .max_errors(5)
        .build()
        .unwrap();
    let body = serde_json::to_string(&vec!["x"; 50]).unwrap();
    let a = send(&app(layer), post_json(body)).await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(a.body["errors"].as_array().unwrap().len(), 5);
    assert!(a.body["detail"].as_str().unwrap().contains("and 49 more"));
}

#[tokio::test]
async fn a_depth_bomb_is_refused_fast() {
    let bomb = "[".repeat(100_000);
    let layer = ValidateLayer::builder()
        .max_body(1024 * 1024)
        .json(Default::default())
        .build()
        .unwrap();
    let started = Instant::now();
    let a = send(&app(layer), post_json(bomb)).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.body["offset"], 64);
    assert!(a.text.contains("deeper than 64"));
    // Not a timing assertion on the fast path: only a guard against a hang.
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn json_strictness() {
    let cases: [(&[u8], &str); 6] = [
        (
            br#"{"product_id": "a", "quantity": 1, "quantity": 2}"#,
            "duplicate",
        ),
        (
            br#"{"product_id": "a", "quantity": 123456789012345678901234567890}"#,
            "64 bits",
        ),
        (br#"{"product_id": "a", "quantity": 1e400}"#, "too large"),
        (br#"{"product_id": "a", "quantity": 1e-400}"#, "too small"),
        (
            b"{\"product_id\": \"\xff\xfe\", \"quantity\": 1}",
            "unicode",
        ),
        (br#"{"product_id": "a", "quantity": 1,}"#, "at byte"),
    ];
    for (body, why) in cases {
        let a = send(&orders(), post_json(Bytes::from_static(body))).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{why}: {}", a.text);
        assert!(
            a.body["detail"].as_str().unwrap().contains(why),
            "{why}: {}",
            a.text
        );
        assert!(a.body["offset"].is_u64());
    }
}

#[tokio::test]
async fn oversized_bodies_are_refused_with_and_without_content_length() {
    let big = "x".repeat(10 * 1024 * 1024);
    let body = format!(r#"{{"product_id": "{big}", "quantity": 1}}"#);
    // With Content-Length: refused before reading.
    let req = Request::post("/orders")
        .header("content-type", "application/json")
        .header("content-length", body.len().to_string())
        .body(Body::from(body.clone()))
        .unwrap();
    let a = send(&orders(), req).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    // Chunked, no length: refused as soon as it goes over.
    let chunks: VecDeque<Bytes> = body
        .as_bytes()
        .chunks(4096)
        .map(Bytes::copy_from_slice)
        .collect();
    let req = Request::post("/orders")
        .header("content-type", "application/json")
        .body(Body::new(Chunks(chunks)))
        .unwrap();
    let a = send(&orders(), req).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(a.text.contains("16384"));
}

#[tokio::test]
async fn wrong_and_missing_content_types_are_415() {
    let body = r#"{"product_id": "p", "quantity": 1}"#;
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let mut b = Request::post("/orders");
        if let Some(ct) = content_type {
            b = b.header("content-type", ct);
        }
        let a = send(&orders(), b.body(Body::from(body)).unwrap()).await;
        assert_eq!(
            a.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{content_type:?}"
        );
    }
    // No body, no content type: nothing to refuse.
    let a = send(
        &orders(),
        Request::get("/items").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
}

#[test]
fn the_schema_lint_runs_at_build() {
    let backtracking = json!({"type": "string", "maxLength": 10, "pattern": "^(\\w+)\\1$"});
    assert!(matches!(
        ValidateLayer::builder()
            .schema(backtracking.clone())
            .build(),
        Err(ConfigError::Backtracking(_))
    ));
    assert!(
        ValidateLayer::builder()
            .schema(backtracking)
            .allow_backtracking(true)
            .build()
            .is_ok()
    );
    assert!(matches!(
        ValidateLayer::builder()
            .schema(json!({"type": "string", "pattern": "^a+$"}))
            .build(),
        Err(ConfigError::Lint(_))
    ));
    assert!(matches!(
        ValidateLayer::builder()
            .schema(json!({"type": "nonsense-type"}))
            .build(),
        Err(ConfigError::Schema(_))
    ));
}

#[tokio::test]
async fn query_and_headers_are_coerced_and_validated() {
    let layer = ValidateLayer::builder()
        .query_schema(json!({
            "type": "object",
            "properties": {
                "page": {"type": "integer", "minimum": 1},
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3}
            },
            "additionalProperties": false
        }))
        .header_schema(json!({
            "type": "object",
            "properties": {"x-tenant": {"type": "string", "maxLength": 8}},
            "required": ["x-tenant"]
        }))
        .build()
        .unwrap();
    let app = app(layer);
    let req = |uri: &str, tenant: Option<&str>| {
        let mut b = Request::get(uri);
        if let Some(t) = tenant {
            b = b.header("x-tenant", t);
        }
        b.body(Body::empty()).unwrap()
    };
    assert_eq!(
        send(&app, req("/items?page=2&tags=a,b", Some("acme")))
            .await
            .status,
        StatusCode::OK
    );
    let a = send(
        &app,
        req("/items?page=zero&tags=a&tags=b&tags=c&tags=d&debug=1", None),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", a.text);
    let mut pointers: Vec<&str> = a.body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["pointer"].as_str().unwrap())
        .collect();
    pointers.sort();
    assert_eq!(
        pointers,
        [
            "/header/x-tenant",
            "/query/debug",
            "/query/page",
            "/query/tags"
        ]
    );
    assert!(!a.text.contains("zero"));
    // A repeated scalar is refused, not validated on one value while the handler may
    // read the other.
    let a = send(&app, req("/items?page=1&page=-5", Some("acme"))).await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", a.text);
    assert_eq!(a.body["errors"][0]["pointer"], "/query/page");
}

#[tokio::test]
async fn report_only_lets_the_request_pass_and_records() {
    let layer = ValidateLayer::builder()
        .content_types(["application/json"])
        .schema(order_schema())
        .report_only(true)
        .build()
        .unwrap();
    let annotation = Annotation::new();
    let mut req = post_json(r#"{"product_id": "p", "quantity": 0, "extra": 1}"#);
    req.extensions_mut().insert(annotation.clone());
    let a = send(&app(layer), req).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let note = annotation.snapshot().validation.unwrap();
    assert_eq!(note.error_count, 2);
    assert!(note.report_only);
    assert!(note.first_pointer.is_some());
}

#[tokio::test]
async fn enforced_violations_are_annotated_too() {
    let annotation = Annotation::new();
    let mut req = post_json(r#"{"product_id": "p", "quantity": 0}"#);
    req.extensions_mut().insert(annotation.clone());
    assert_eq!(
        send(&orders(), req).await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    let note = annotation.snapshot().validation.unwrap();
    assert_eq!(
        (note.error_count, note.first_pointer.as_deref()),
        (1, Some("/quantity"))
    );
}

#[tokio::test]
async fn grpc_callers_get_invalid_argument() {
    let layer = ValidateLayer::builder()
        .query_schema(json!({"type": "object", "properties": {"page": {"type": "integer"}}}))
        .build()
        .unwrap();
    let req = Request::get("/items?page=x")
        .header("content-type", "application/grpc")
        .body(Body::empty())
        .unwrap();
    let a = send(&app(layer), req).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.headers["grpc-status"], "3");
    let message = a.headers["grpc-message"].to_str().unwrap();
    assert!(message.contains("/query/page"), "{message}");
}

/// An empty body where a JSON body is expected is a `400`, however it comes: with
/// `Content-Length: 0`, as an empty `Body`, or chunked with no chunk. It never reaches the
/// handler without its parsed JSON (axum answers `500` for a missing extension). A `GET`
/// without a body is not affected.
#[tokio::test]
async fn an_empty_body_is_refused_however_it_comes() {
    let app = orders();
    let with_length = Request::post("/orders")
        .header("content-type", "application/json")
        .header("content-length", "0")
        .body(Body::empty())
        .unwrap();
    let chunked = post_json(Body::new(Chunks(VecDeque::new())));
    for (how, req) in [
        ("content-length 0", with_length),
        ("empty", post_json(Body::empty())),
        ("chunked", chunked),
    ] {
        let a = send(&app, req).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{how}: {}", a.text);
        assert_eq!(a.body["status"], 400, "{how}");
    }
    assert_eq!(
        send(&app, Request::get("/items").body(Body::empty()).unwrap())
            .await
            .status,
        StatusCode::OK
    );
}

/// A body that sends its chunks `every` apart (on tokio's clock), then ends; with no
/// chunks left and `stall` set, it never sends anything again.
struct Paced {
    chunks: VecDeque<Bytes>,
    every: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    stall: bool,
}

impl http_body::Body for Paced {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.chunks.is_empty() {
            return if self.stall {
                Poll::Pending
            } else {
                Poll::Ready(None)
            };
        }
        let every = self.every;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(every)));
        std::task::ready!(sleep.as_mut().poll(cx));
        self.sleep = None;
        let chunk = self.chunks.pop_front().unwrap();
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }
}

/// A body that stops sending is refused with `408` once it has sent nothing for the idle
/// timeout (30 s by default); a slow one that keeps sending is read to its end.
#[tokio::test(start_paused = true)]
async fn a_stalled_body_is_408_and_a_slow_one_is_read() {
    let app = orders();
    let chunks = |parts: &[&'static str]| {
        parts
            .iter()
            .map(|p| Bytes::from_static(p.as_bytes()))
            .collect()
    };
    let stalled = Paced {
        chunks: chunks(&[r#"{"product_id": "#]),
        every: Duration::from_secs(1),
        sleep: None,
        stall: true,
    };
    let started = tokio::time::Instant::now();
    let a = send(&app, post_json(Body::new(stalled))).await;
    assert_eq!(a.status, StatusCode::REQUEST_TIMEOUT, "{}", a.text);
    assert_eq!(a.body["status"], 408);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(31) && waited < Duration::from_secs(33),
        "{waited:?}"
    );
    // Four chunks, 20 s apart: 80 s in all, never 30 s without a byte.
    let slow = Paced {
        chunks: chunks(&[r#"{"product_id": "#, r#""p-1", "#, r#""quantity": "#, "2}"]),
        every: Duration::from_secs(20),
        sleep: None,
        stall: false,
    };
    let a = send(&app, post_json(Body::new(slow))).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["quantity"], 2);
}
