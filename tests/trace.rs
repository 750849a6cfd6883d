//! The trace layer: what the one event per request says, captured with a test subscriber
//! (a field-collecting layer beside the JSON formatter writing into a buffer).

#![cfg(all(feature = "trace", feature = "axum", feature = "rate-limit"))]

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use battlement::annotate::{
    Annotation, AuthNote, CacheNote, CacheStatus, IdempotencyNote, IdempotencyOutcome, LockNote,
    LockOutcome, ValidationNote,
};
use battlement::key::PeerAddr;
use battlement::rate_limit::{Quota, RateLimitLayer};
use battlement::trace::{QueryLog, RequestId, RoutePolicy, TraceContext, TraceLayer};
use bytes::Bytes;
use http::{HeaderMap, HeaderName, Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceBuilder, ServiceExt};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{Layer, Registry};

// ---------------------------------------------------------------------------------------
// The test subscriber.

#[derive(Clone, Debug)]
struct Captured {
    level: Level,
    target: String,
    fields: BTreeMap<String, String>,
    /// `otel.name` of the span the event happened in.
    span: Option<String>,
}

impl Captured {
    fn get(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }

    fn field(&self, name: &str) -> &str {
        self.get(name)
            .unwrap_or_else(|| panic!("no field {name} in {:?}", self.fields))
    }
}

#[derive(Default)]
struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Captured>>>);

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Collector {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: LayerContext<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        ctx.span(id).unwrap().extensions_mut().insert(fields);
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: LayerContext<'_, S>) {
        let span = ctx.span(id).unwrap();
        let mut ext = span.extensions_mut();
        values.record(ext.get_mut::<Fields>().unwrap());
    }

    fn on_event(&self, event: &Event<'_>, ctx: LayerContext<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let span = ctx.event_span(event).and_then(|s| {
            s.extensions()
                .get::<Fields>()
                .and_then(|f| f.0.get("otel.name").cloned())
        });
        self.0.lock().unwrap().push(Captured {
            level: *event.metadata().level(),
            target: event.metadata().target().to_owned(),
            fields: fields.0,
            span,
        });
    }
}

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl io::Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Logs {
    collector: Collector,
    json: Buffer,
    text: Buffer,
    _guard: tracing::subscriber::DefaultGuard,
}

impl Logs {
    /// Every event and span at every level, for this thread only.
    fn capture() -> Self {
        let collector = Collector::default();
        let json = Buffer::default();
        let text = Buffer::default();
        let (j, t) = (json.clone(), text.clone());
        let subscriber = Registry::default()
            .with(collector.clone())
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(move || j.clone()),
            )
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(move || t.clone()),
            )
            .with(tracing_subscriber::filter::LevelFilter::TRACE);
        let guard = tracing::subscriber::set_default(subscriber);
        Self {
            collector,
            json,
            text,
            _guard: guard,
        }
    }

    /// The per-request events of the trace layer.
    fn requests(&self) -> Vec<Captured> {
        self.collector
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.target == "battlement::trace")
            .cloned()
            .collect()
    }

    fn only_request(&self) -> Captured {
        let mut events = self.requests();
        assert_eq!(events.len(), 1, "{events:#?}");
        events.remove(0)
    }

    fn all_events(&self) -> Vec<Captured> {
        self.collector.0.lock().unwrap().clone()
    }

    /// Everything the formatters wrote.
    fn output(&self) -> String {
        let json = String::from_utf8(self.json.0.lock().unwrap().clone()).unwrap();
        let text = String::from_utf8(self.text.0.lock().unwrap().clone()).unwrap();
        format!("{json}\n{text}")
    }
}

// ---------------------------------------------------------------------------------------
// Services.

fn app(layer: TraceLayer) -> Router {
    Router::new()
        .route("/orders/{id}", get(|| async { "an order" }))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/fail",
            get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "broken") }),
        )
        .route("/missing", get(|| async { StatusCode::NOT_FOUND }))
        .route(
            "/panic",
            get(|| async {
                if true {
                    panic!("boom\r\nlevel=ERROR forged line");
                }
                "unreachable"
            }),
        )
        .route(
            "/nested",
            get(|| async {
                tracing::info!(step = "inside the handler", "handler log");
                "nested"
            }),
        )
        .route(
            "/decisions",
            get(|req: Request<axum::body::Body>| async move {
                let annotation = Annotation::of(req.extensions()).unwrap();
                annotation.update(|r| {
                    r.cache = Some(CacheNote::new(CacheStatus::Hit, Some(12)));
                    r.auth = Some(AuthNote::subject("user-7"));
                    r.validation = Some(ValidationNote::new(2, Some("/quantity".into())));
                    r.lock = Some(LockNote::new(
                        Duration::from_millis(15),
                        LockOutcome::Acquired,
                    ));
                    r.idempotency = Some(IdempotencyNote::new(IdempotencyOutcome::Replayed));
                });
                "decided"
            }),
        )
        .layer(layer)
}

fn get_req(uri: &str) -> Request<axum::body::Body> {
    Request::get(uri)
        .extension(PeerAddr(([192, 0, 2, 7], 5000).into()))
        .body(axum::body::Body::empty())
        .unwrap()
}

async fn send(app: &Router, req: Request<axum::body::Body>) -> (Response<()>, Bytes) {
    let res = app.clone().oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (Response::from_parts(parts, ()), bytes)
}

/// A body of scripted frames; `Pending` forever once the script runs out, unless it ends.
struct Scripted {
    frames: VecDeque<Result<Frame<Bytes>, TestError>>,
    ends: bool,
}

#[derive(Debug)]
struct TestError(&'static str);

impl fmt::Display for TestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for TestError {}

impl Body for Scripted {
    type Data = Bytes;
    type Error = TestError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, TestError>>> {
        match self.frames.pop_front() {
            Some(frame) => Poll::Ready(Some(frame)),
            None if self.ends => Poll::Ready(None),
            None => Poll::Pending,
        }
    }
}

fn scripted_service(
    layer: TraceLayer,
    make: impl Fn() -> Response<Scripted> + Clone + Send + 'static,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<battlement::trace::TraceBody<Scripted>>,
    Error = Infallible,
> {
    ServiceBuilder::new()
        .layer(layer)
        .service_fn(move |_req: Request<Full<Bytes>>| {
            let make = make.clone();
            async move { Ok::<_, Infallible>(make()) }
        })
}

fn data(s: &'static str) -> Result<Frame<Bytes>, TestError> {
    Ok(Frame::data(Bytes::from_static(s.as_bytes())))
}

// ---------------------------------------------------------------------------------------
// The event.

#[tokio::test]
async fn a_completed_request_has_every_field() {
    let logs = Logs::capture();
    let app = app(TraceLayer::new());
    let req = Request::get("/orders/42?token=s3cret&page=2")
        .header("user-agent", "curl/8.0")
        .extension(PeerAddr(([192, 0, 2, 7], 5000).into()))
        .body(axum::body::Body::empty())
        .unwrap();
    let (res, body) = send(&app, req).await;
    assert_eq!(res.status(), StatusCode::OK);
    let e = logs.only_request();
    assert_eq!(e.level, Level::INFO);
    assert_eq!(e.field("http.request.method"), "GET");
    assert_eq!(e.field("http.route"), "/orders/{id}");
    assert_eq!(e.field("url.path"), "/orders/42");
    assert_eq!(e.field("url.query"), "token=[redacted]&page=[redacted]");
    assert_eq!(e.field("http.response.status_code"), "200");
    assert_eq!(e.field("client.address"), "192.0.2.7");
    assert_eq!(e.field("user_agent.original"), "curl/8.0");
    assert_eq!(e.field("outcome"), "completed");
    assert_eq!(e.field("http.response.body.size"), body.len().to_string());
    let request_id = res.headers()["x-request-id"].to_str().unwrap();
    assert_eq!(e.field("request_id"), request_id);
    assert_eq!(
        uuid::Uuid::parse_str(request_id).unwrap().get_version_num(),
        7
    );
    assert_eq!(e.field("trace_id").len(), 32);
    let duration: f64 = e.field("duration_ms").parse().unwrap();
    let ttfb: f64 = e.field("ttfb_ms").parse().unwrap();
    assert!(ttfb >= 0.0 && ttfb <= duration, "{ttfb} {duration}");
    assert!(e.get("error.type").is_none());
    assert!(e.get("rate_limit.verdict").is_none());
    assert!(!logs.output().contains("s3cret"));
}

#[tokio::test]
async fn unknown_methods_and_unmatched_routes() {
    let logs = Logs::capture();
    let app = app(TraceLayer::new());
    let req = Request::builder()
        .method("BREW")
        .uri("/no/such/route")
        .body(axum::body::Body::empty())
        .unwrap();
    let (res, _) = send(&app, req).await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    let e = logs.only_request();
    assert_eq!(e.field("http.request.method"), "_OTHER");
    // Never the raw path in place of a route template.
    assert!(e.get("http.route").is_none(), "{e:?}");
    assert_eq!(e.field("url.path"), "/no/such/route");
    // A 4xx is not a server error.
    assert_eq!(e.level, Level::INFO);
    // No peer address known: the field is left out rather than invented.
    assert!(e.get("client.address").is_none());
}

#[tokio::test]
async fn handler_logs_nest_in_the_request_span() {
    let logs = Logs::capture();
    let app = app(TraceLayer::new());
    send(&app, get_req("/nested")).await;
    let inside = logs
        .all_events()
        .into_iter()
        .find(|e| e.get("step") == Some("inside the handler"))
        .unwrap();
    assert_eq!(inside.span.as_deref(), Some("GET /nested"));
    // The span carries the request id the event has.
    let e = logs.only_request();
    let output = logs.output();
    assert!(output.contains(&format!("\"request_id\":\"{}\"", e.field("request_id"))));
}

#[tokio::test]
async fn levels_follow_the_outcome() {
    let logs = Logs::capture();
    let app = app(TraceLayer::new());
    send(&app, get_req("/fail")).await;
    send(&app, get_req("/missing")).await;
    let slow_app = app_with(
        TraceLayer::builder()
            .slow_threshold(Duration::ZERO)
            .build()
            .unwrap(),
    );
    send(&slow_app, get_req("/orders/1")).await;
    let events = logs.requests();
    assert_eq!(events.len(), 3);
    assert_eq!(events[0].level, Level::ERROR);
    assert_eq!(events[0].field("http.response.status_code"), "500");
    assert_eq!(events[1].level, Level::INFO);
    assert_eq!(events[2].level, Level::WARN);
}

fn app_with(layer: TraceLayer) -> Router {
    app(layer)
}

#[tokio::test]
async fn client_aborted_when_the_body_is_dropped_early() {
    let logs = Logs::capture();
    let mut service = scripted_service(TraceLayer::new(), || {
        Response::new(Scripted {
            frames: VecDeque::from([data("first chunk")]),
            ends: false,
        })
    });
    let res = service
        .ready()
        .await
        .unwrap()
        .call(Request::new(Full::default()))
        .await
        .unwrap();
    let mut body = res.into_body();
    let frame = body.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "first chunk");
    assert!(logs.requests().is_empty(), "no event before the end");
    drop(body);
    let e = logs.only_request();
    assert_eq!(e.field("outcome"), "client_aborted");
    assert_eq!(e.field("http.response.body.size"), "11");
    assert_eq!(e.level, Level::INFO);
}

#[tokio::test]
async fn client_aborted_before_the_response_head() {
    let logs = Logs::capture();
    let service = ServiceBuilder::new().layer(TraceLayer::new()).service_fn(
        |_req: Request<Full<Bytes>>| async {
            std::future::pending::<()>().await;
            Ok::<_, Infallible>(Response::new(Full::<Bytes>::default()))
        },
    );
    let future = service.oneshot(Request::new(Full::default()));
    let timed_out = tokio::time::timeout(Duration::from_millis(5), future).await;
    assert!(timed_out.is_err());
    let e = logs.only_request();
    assert_eq!(e.field("outcome"), "client_aborted");
    assert!(e.get("http.response.status_code").is_none());
}

#[tokio::test]
async fn an_errored_body_is_logged_at_error() {
    let logs = Logs::capture();
    let service = scripted_service(TraceLayer::new(), || {
        Response::new(Scripted {
            frames: VecDeque::from([data("partial"), Err(TestError("disk on fire"))]),
            ends: false,
        })
    });
    let res = service
        .oneshot(Request::new(Full::default()))
        .await
        .unwrap();
    let err = res.into_body().collect().await.unwrap_err();
    assert_eq!(err.to_string(), "disk on fire");
    let e = logs.only_request();
    assert_eq!(e.field("outcome"), "errored");
    assert_eq!(e.field("error.type"), "body_error");
    assert_eq!(e.field("error.message"), "disk on fire");
    assert_eq!(e.field("http.response.body.size"), "7");
    assert_eq!(e.level, Level::ERROR);
}

#[tokio::test]
async fn a_panic_becomes_a_500_and_the_service_keeps_serving() {
    let logs = Logs::capture();
    let app = app(TraceLayer::new());
    let (res, body) = send(&app, get_req("/panic")).await;
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(problem["status"], 500);
    // The client learns nothing of the panic.
    assert!(!String::from_utf8_lossy(&body).contains("boom"));
    assert!(res.headers().contains_key("x-request-id"));
    let (res, _) = send(&app, get_req("/orders/1")).await;
    assert_eq!(res.status(), StatusCode::OK);
    let events = logs.requests();
    let e = &events[0];
    assert_eq!(e.level, Level::ERROR);
    assert_eq!(e.field("error.type"), "panic");
    assert_eq!(e.field("outcome"), "errored");
    assert_eq!(e.field("http.response.status_code"), "500");
    // The message is escaped: the forged line cannot start a line of its own.
    assert_eq!(
        e.field("error.message"),
        "boom\\u{d}\\u{a}level=ERROR forged line"
    );
    let output = logs.output();
    assert!(!output.contains("\nlevel=ERROR forged"), "{output}");
    assert!(!output.contains("\r"), "{output}");
}

#[tokio::test]
async fn a_panic_in_call_itself_is_caught() {
    #[derive(Clone)]
    struct PanicsInCall;
    impl Service<Request<Full<Bytes>>> for PanicsInCall {
        type Response = Response<Full<Bytes>>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Response<Full<Bytes>>, Infallible>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _req: Request<Full<Bytes>>) -> Self::Future {
            panic!("in call")
        }
    }
    let logs = Logs::capture();
    let service = ServiceBuilder::new()
        .layer(TraceLayer::new())
        .service(PanicsInCall);
    let grpc = Request::builder()
        .header("content-type", "application/grpc")
        .body(Full::default())
        .unwrap();
    let res = service.oneshot(grpc).await.unwrap();
    // A gRPC caller gets INTERNAL, trailers-only.
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["grpc-status"], "13");
    drop(res);
    let e = logs.only_request();
    assert_eq!(e.field("error.type"), "panic");
    assert_eq!(e.field("error.message"), "in call");
    assert_eq!(e.field("rpc.grpc.status_code"), "13");
    assert_eq!(e.level, Level::ERROR);
}

#[tokio::test]
async fn skipped_routes_are_silent_unless_they_fail() {
    let logs = Logs::capture();
    let app = app(TraceLayer::builder()
        .route("/healthz", RoutePolicy::skip())
        .route("/fail", RoutePolicy::skip())
        .build()
        .unwrap());
    let (res, _) = send(&app, get_req("/healthz")).await;
    assert_eq!(res.status(), StatusCode::OK);
    // Skipped, but still identified.
    assert!(res.headers().contains_key("x-request-id"));
    assert!(logs.requests().is_empty());
    send(&app, get_req("/fail")).await;
    let e = logs.only_request();
    assert_eq!(e.field("http.route"), "/fail");
    assert_eq!(e.level, Level::ERROR);
}

#[tokio::test]
async fn per_route_level() {
    let logs = Logs::capture();
    let app = app(TraceLayer::builder()
        .route("/healthz", RoutePolicy::new().level(Level::DEBUG))
        .build()
        .unwrap());
    send(&app, get_req("/healthz")).await;
    assert_eq!(logs.only_request().level, Level::DEBUG);
}

#[tokio::test]
async fn sampling_keeps_errors_refusals_and_slow_requests() {
    let logs = Logs::capture();
    let app = app(TraceLayer::builder().sample_successes(0.0).build().unwrap());
    for _ in 0..20 {
        send(&app, get_req("/orders/1")).await;
    }
    assert!(logs.requests().is_empty(), "successes are sampled out");
    send(&app, get_req("/fail")).await;
    send(&app, get_req("/missing")).await;
    let events = logs.requests();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].field("http.response.status_code"), "500");
    assert_eq!(events[1].field("http.response.status_code"), "404");

    let slow = app_with(
        TraceLayer::builder()
            .sample_successes(0.0)
            .slow_threshold(Duration::ZERO)
            .build()
            .unwrap(),
    );
    send(&slow, get_req("/orders/1")).await;
    assert_eq!(logs.requests().len(), 3);
}

#[tokio::test]
async fn sampling_is_decided_on_the_trace_id() {
    let logs = Logs::capture();
    let app = app(TraceLayer::builder().sample_successes(0.5).build().unwrap());
    // Low half of the sampling range: kept. High half: dropped. Every time.
    let kept = "00-0af7651916cd43dd0448eb211c80319c-b7ad6b7169203331-01";
    let dropped = "00-0af7651916cd43ddf448eb211c80319c-b7ad6b7169203331-01";
    for _ in 0..3 {
        for tp in [kept, dropped] {
            let mut req = get_req("/orders/1");
            req.headers_mut().insert("traceparent", tp.parse().unwrap());
            send(&app, req).await;
        }
    }
    let events = logs.requests();
    assert_eq!(events.len(), 3);
    assert!(
        events
            .iter()
            .all(|e| e.field("trace_id") == "0af7651916cd43dd0448eb211c80319c")
    );
}

#[tokio::test]
async fn secrets_never_reach_the_log() {
    let logs = Logs::capture();
    let app = app(TraceLayer::builder()
        .log_headers([HeaderName::from_static("x-tenant")])
        .build()
        .unwrap());
    let req = Request::get("/orders/1?api_key=QUERYSECRET&page=2")
        .header("authorization", "Bearer TOKENSECRET")
        .header("cookie", "session=COOKIESECRET")
        .header("x-tenant", "acme")
        .header("x-other", "OTHERSECRET")
        .body(axum::body::Body::empty())
        .unwrap();
    send(&app, req).await;
    let e = logs.only_request();
    assert_eq!(e.field("http.request.header"), "x-tenant=acme");
    let output = logs.output();
    for secret in ["QUERYSECRET", "TOKENSECRET", "COOKIESECRET", "OTHERSECRET"] {
        assert!(!output.contains(secret), "{secret} leaked: {output}");
    }
    assert!(output.contains("api_key=[redacted]"));
}

#[tokio::test]
async fn query_can_be_omitted_or_partly_allowed() {
    let logs = Logs::capture();
    let omit = app(TraceLayer::builder().query(QueryLog::Omit).build().unwrap());
    send(&omit, get_req("/orders/1?a=1")).await;
    let allow = app(TraceLayer::builder()
        .query(QueryLog::AllowValues(vec!["page".into()]))
        .build()
        .unwrap());
    send(&allow, get_req("/orders/1?page=3&q=private")).await;
    let events = logs.requests();
    assert!(events[0].get("url.query").is_none());
    assert_eq!(events[1].field("url.query"), "page=3&q=[redacted]");
}

#[tokio::test]
async fn control_characters_in_client_values_are_escaped() {
    let logs = Logs::capture();
    let app = app(TraceLayer::new());
    let req = Request::get("/orders/1")
        .header(
            "user-agent",
            http::HeaderValue::from_str("evil\t\u{202e}agent").unwrap(),
        )
        .body(axum::body::Body::empty())
        .unwrap();
    send(&app, req).await;
    let e = logs.only_request();
    // A tab and a right-to-left override (which would make a log viewer show the line
    // reversed) are written out.
    assert_eq!(e.field("user_agent.original"), "evil\\u{9}\\u{202e}agent");
    assert!(!logs.output().contains('\u{202e}'));
}

// ---------------------------------------------------------------------------------------
// Request ids and trace context.

#[tokio::test]
async fn request_ids_are_validated_and_echoed() {
    let logs = Logs::capture();
    let app = Router::new()
        .route(
            "/",
            get(|req: Request<axum::body::Body>| async move {
                let id = req.extensions().get::<RequestId>().unwrap();
                // The header the handler sees is the id that is logged.
                assert_eq!(req.headers()["x-request-id"], id.as_str());
                id.to_string()
            }),
        )
        .layer(TraceLayer::new());
    let long = "x".repeat(129);
    let max = "y".repeat(128);
    let cases: [(&str, bool); 6] = [
        ("req-1.A_b", true),
        (&max, true),
        (&long, false),
        ("has space", false),
        ("semi;colon", false),
        ("quote\"d", false),
    ];
    for (incoming, kept) in cases {
        let req = Request::get("/")
            .header("x-request-id", incoming)
            .body(axum::body::Body::empty())
            .unwrap();
        let (res, body) = send(&app, req).await;
        let echoed = res.headers()["x-request-id"].to_str().unwrap().to_owned();
        assert_eq!(body, echoed.as_bytes(), "the handler saw the echoed id");
        if kept {
            assert_eq!(echoed, incoming);
        } else {
            assert_ne!(echoed, incoming);
            assert_eq!(uuid::Uuid::parse_str(&echoed).unwrap().get_version_num(), 7);
        }
        assert_eq!(logs.requests().last().unwrap().field("request_id"), echoed);
    }
}

#[tokio::test]
async fn untrusted_request_ids_are_replaced() {
    let app = app(TraceLayer::builder()
        .trust_request_id(false)
        .request_id_header(HeaderName::from_static("x-correlation-id"))
        .build()
        .unwrap());
    let req = Request::get("/orders/1")
        .header("x-correlation-id", "chosen-by-client")
        .body(axum::body::Body::empty())
        .unwrap();
    let (res, _) = send(&app, req).await;
    assert_ne!(res.headers()["x-correlation-id"], "chosen-by-client");
}

#[tokio::test]
async fn traceparent_is_parsed_strictly() {
    let logs = Logs::capture();
    let app = Router::new()
        .route(
            "/",
            get(|req: Request<axum::body::Body>| async move {
                let ctx = req.extensions().get::<TraceContext>().unwrap();
                format!(
                    "{} {:?}",
                    ctx.trace_id(),
                    ctx.parent_span_id().map(|s| s.to_string())
                )
            }),
        )
        .layer(TraceLayer::new());
    let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let malformed = [
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "garbage",
    ];
    let req = Request::get("/")
        .header("traceparent", valid)
        .body(axum::body::Body::empty())
        .unwrap();
    let (_, body) = send(&app, req).await;
    assert_eq!(
        body,
        "4bf92f3577b34da6a3ce929d0e0e4736 Some(\"00f067aa0ba902b7\")"
    );
    assert_eq!(
        logs.requests()[0].field("trace_id"),
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    for bad in malformed {
        let req = Request::get("/")
            .header("traceparent", bad)
            .body(axum::body::Body::empty())
            .unwrap();
        let (_, body) = send(&app, req).await;
        let body = String::from_utf8(body.to_vec()).unwrap();
        assert!(body.ends_with(" None"), "{bad}: {body}");
        assert!(
            !body.starts_with("4bf92f3577b34da6a3ce929d0e0e4736"),
            "{bad}"
        );
        assert!(
            !body.starts_with("00000000000000000000000000000000"),
            "{bad}"
        );
    }
}

#[tokio::test]
async fn public_endpoints_link_instead_of_continuing() {
    let logs = Logs::capture();
    let app = app(TraceLayer::builder().public_endpoint(true).build().unwrap());
    let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut req = get_req("/orders/1");
    req.headers_mut()
        .insert("traceparent", valid.parse().unwrap());
    send(&app, req).await;
    let e = logs.only_request();
    assert_ne!(e.field("trace_id"), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(e.field("trace.link"), valid);
}

// ---------------------------------------------------------------------------------------
// gRPC and the other layers' decisions.

fn grpc_response(
    headers: &[(&str, &str)],
    frames: Vec<Result<Frame<Bytes>, TestError>>,
) -> Response<Scripted> {
    let mut res = Response::new(Scripted {
        frames: frames.into(),
        ends: true,
    });
    res.headers_mut()
        .insert("content-type", "application/grpc".parse().unwrap());
    for (k, v) in headers {
        res.headers_mut().insert(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    res
}

fn trailers(code: &str) -> Result<Frame<Bytes>, TestError> {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", code.parse().unwrap());
    Ok(Frame::trailers(t))
}

#[tokio::test]
async fn grpc_status_comes_from_the_trailers() {
    let logs = Logs::capture();
    for (code, level) in [("0", Level::INFO), ("5", Level::INFO), ("13", Level::ERROR)] {
        let code_owned = code.to_owned();
        let service = scripted_service(TraceLayer::new(), move || {
            let code: &'static str = Box::leak(code_owned.clone().into_boxed_str());
            grpc_response(&[], vec![data("\0\0\0\0\0"), trailers(code)])
        });
        let res = service
            .oneshot(Request::new(Full::default()))
            .await
            .unwrap();
        let collected = res.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], code);
        let e = logs.requests().pop().unwrap();
        assert_eq!(e.field("rpc.grpc.status_code"), code);
        assert_eq!(e.field("http.response.status_code"), "200");
        // NOT_FOUND (5) is the client's problem, INTERNAL (13) the server's.
        assert_eq!(e.level, level, "code {code}");
    }
    // Trailers-only: the status is in the headers.
    let service = scripted_service(TraceLayer::new(), || {
        grpc_response(&[("grpc-status", "14")], vec![])
    });
    let res = service
        .oneshot(Request::new(Full::default()))
        .await
        .unwrap();
    res.into_body().collect().await.unwrap();
    let e = logs.requests().pop().unwrap();
    assert_eq!(e.field("rpc.grpc.status_code"), "14");
    assert_eq!(e.level, Level::ERROR);
}

#[tokio::test]
async fn rate_limit_decisions_reach_the_event() {
    let logs = Logs::capture();
    let limit = RateLimitLayer::builder()
        .name("per-ip")
        .policy("burst", Quota::requests_per(1, Duration::from_secs(60)))
        .build()
        .unwrap();
    let app = Router::new()
        .route("/orders/{id}", get(|| async { "ok" }))
        .layer(limit)
        .layer(TraceLayer::new());
    let (first, _) = send(&app, get_req("/orders/1")).await;
    let (second, _) = send(&app, get_req("/orders/1")).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    let events = logs.requests();
    assert_eq!(events[0].field("rate_limit.verdict"), "allowed");
    assert_eq!(events[0].field("rate_limit.remaining"), "0");
    assert_eq!(events[0].field("rate_limit.policy"), "burst");
    assert_eq!(events[0].field("rate_limit.source"), "memory");
    assert_eq!(events[1].field("rate_limit.verdict"), "limited");
    assert_eq!(events[1].field("http.response.status_code"), "429");
    assert_eq!(events[1].level, Level::INFO);
    // Refusals are kept even when successes are sampled out.
    let sampled = Router::new()
        .route("/orders/{id}", get(|| async { "ok" }))
        .layer(
            RateLimitLayer::builder()
                .policy("burst", Quota::requests_per(1, Duration::from_secs(60)))
                .shadow(true)
                .build()
                .unwrap(),
        )
        .layer(TraceLayer::builder().sample_successes(0.0).build().unwrap());
    send(&sampled, get_req("/orders/1")).await;
    let (shadowed, _) = send(&sampled, get_req("/orders/1")).await;
    assert_eq!(shadowed.status(), StatusCode::OK);
    let events = logs.requests();
    assert_eq!(events.len(), 3, "{events:#?}");
    assert_eq!(events[2].field("rate_limit.verdict"), "shadow_limited");
}

#[tokio::test]
async fn every_layer_decision_reaches_the_event() {
    let logs = Logs::capture();
    let app = app(TraceLayer::new());
    send(&app, get_req("/decisions")).await;
    let e = logs.only_request();
    assert_eq!(e.field("cache.status"), "hit");
    assert_eq!(e.field("cache.age"), "12");
    assert_eq!(e.field("enduser.id"), "user-7");
    assert_eq!(e.field("validation.error_count"), "2");
    assert_eq!(e.field("validation.first_pointer"), "/quantity");
    assert_eq!(e.field("lock.outcome"), "acquired");
    assert_eq!(e.field("lock.wait_ms"), "15.0");
    assert_eq!(e.field("idempotency.outcome"), "replayed");
}

#[tokio::test]
async fn head_and_not_modified_responses_complete() {
    let logs = Logs::capture();
    let app = app(TraceLayer::new());
    let res = app
        .clone()
        .oneshot(
            Request::head("/orders/1")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    // hyper never polls the body of a HEAD response; dropping it is its end.
    drop(res);
    let e = logs.only_request();
    assert_eq!(e.field("outcome"), "completed");
}

#[tokio::test]
async fn nothing_is_captured_without_a_subscriber_but_ids_still_flow() {
    // No subscriber on this thread: the layer still identifies requests.
    let app = app(TraceLayer::new());
    let (res, _) = send(&app, get_req("/orders/1")).await;
    assert!(res.headers().contains_key("x-request-id"));
    let (res, _) = send(&app, get_req("/panic")).await;
    assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
}

#[cfg(feature = "metrics")]
#[tokio::test]
async fn metrics_have_bounded_labels() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let limit = RateLimitLayer::builder()
        .name("per-ip")
        .policy("burst", Quota::requests_per(1, Duration::from_secs(60)))
        .build()
        .unwrap();
    let app = Router::new()
        .route("/orders/{id}", get(|| async { "ok" }))
        .layer(limit)
        .layer(TraceLayer::new());
    send(&app, get_req("/orders/1")).await;
    send(&app, get_req("/orders/2")).await;
    send(&app, get_req("/no/such/path?x=1")).await;
    let snapshot = snapshotter.snapshot().into_hashmap();
    let mut routes = Vec::new();
    let mut decisions = BTreeMap::new();
    for (key, (_, _, value)) in &snapshot {
        let labels: BTreeMap<_, _> = key
            .key()
            .labels()
            .map(|l| (l.key().to_owned(), l.value().to_owned()))
            .collect();
        // Never a raw path, a host or an id in a label.
        for v in labels.values() {
            assert!(
                !v.contains("/orders/1") && !v.contains("no/such"),
                "{labels:?}"
            );
        }
        match key.key().name() {
            "http.server.request.duration" => {
                let DebugValue::Histogram(samples) = value else {
                    panic!()
                };
                routes.push((
                    labels["http.route"].clone(),
                    labels["http.response.status_class"].clone(),
                    samples.len(),
                ));
            }
            "battlement.rate_limit.decisions" => {
                let DebugValue::Counter(n) = value else {
                    panic!()
                };
                decisions.insert(labels["outcome"].clone(), *n);
                assert_eq!(labels["layer"], "per-ip");
            }
            "http.server.active_requests" => {
                let DebugValue::Gauge(g) = value else {
                    panic!()
                };
                assert_eq!(g.into_inner(), 0.0, "every request finished");
            }
            _ => {}
        }
    }
    routes.sort();
    assert_eq!(
        routes,
        vec![
            ("/orders/{id}".to_owned(), "2xx".to_owned(), 1),
            ("/orders/{id}".to_owned(), "4xx".to_owned(), 1),
            ("_unmatched".to_owned(), "4xx".to_owned(), 1),
        ]
    );
    assert_eq!(decisions.get("allowed"), Some(&1));
    // The fallback is rate limited too: the third request was refused as well.
    assert_eq!(decisions.get("limited"), Some(&2));
}

#[tokio::test]
async fn trailers_end_the_request_even_if_the_body_does_not_say_so() {
    let logs = Logs::capture();
    // Not `ends`: after the trailers the body would be Pending, but a server never asks.
    let service = scripted_service(TraceLayer::new(), || {
        let mut res = grpc_response(&[], vec![data("abc"), trailers("0")]);
        res.body_mut().ends = false;
        res
    });
    let res = service
        .oneshot(Request::new(Full::default()))
        .await
        .unwrap();
    let mut body = res.into_body();
    while let Some(frame) = body.frame().await {
        if frame.unwrap().is_trailers() {
            break;
        }
    }
    drop(body);
    let e = logs.only_request();
    assert_eq!(e.field("outcome"), "completed");
    assert_eq!(e.field("rpc.grpc.status_code"), "0");
}
