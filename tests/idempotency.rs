//! The idempotency layer through an axum router, in memory and on a real Redis: replay,
//! `409` while in flight, `422` on another request, required and invalid keys, what is not
//! stored, scoping, fencing of a stale worker, two instances sharing one Redis, and Redis
//! going away.

#![cfg(all(feature = "idempotency", feature = "redis", feature = "axum"))]

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use battlement::annotate::{Annotation, IdempotencyOutcome, Record};
use battlement::idempotency::{
    Claim, FailurePolicy, Fingerprint, IdempotencyLayer, IdempotencyStore, MemoryStore, OwnerToken,
    RedisIdempotencyStore, Scope, StoredResponse,
};
use battlement::principal::{AuthScheme, Principal};
use battlement::redis::{RedisConfig, RedisStore};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use support::RedisServer;
use tokio::sync::Notify;
use tower::ServiceExt;

/// The handlers' side of a test: how often each ran, and gates that hold the first (and
/// the second) `create` inside the handler until the test lets it go.
#[derive(Default)]
struct Origin {
    runs: AtomicUsize,
    hold_first: AtomicBool,
    entered: Notify,
    release: Notify,
    hold_second: AtomicBool,
    entered_second: Notify,
    release_second: Notify,
}

impl Origin {
    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }
}

async fn create(State(o): State<Arc<Origin>>, body: String) -> Response {
    let n = o.runs.fetch_add(1, Ordering::SeqCst) + 1;
    if n == 1 && o.hold_first.load(Ordering::SeqCst) {
        o.entered.notify_one();
        o.release.notified().await;
    }
    if n == 2 && o.hold_second.load(Ordering::SeqCst) {
        o.entered_second.notify_one();
        o.release_second.notified().await;
    }
    (
        StatusCode::CREATED,
        [
            ("location", format!("/orders/{n}")),
            ("set-cookie", "session=secret".to_owned()),
            ("x-handler", "yes".to_owned()),
        ],
        format!("order {n}: {body}"),
    )
        .into_response()
}

async fn fail(State(o): State<Arc<Origin>>) -> Response {
    o.runs.fetch_add(1, Ordering::SeqCst);
    (StatusCode::SERVICE_UNAVAILABLE, "try again").into_response()
}

async fn big(State(o): State<Arc<Origin>>) -> Response {
    o.runs.fetch_add(1, Ordering::SeqCst);
    "x".repeat(4096).into_response()
}

async fn events(State(o): State<Arc<Origin>>) -> Response {
    o.runs.fetch_add(1, Ordering::SeqCst);
    ([("content-type", "text/event-stream")], "data: hello\n\n").into_response()
}

fn app(layer: IdempotencyLayer, origin: &Arc<Origin>) -> Router {
    Router::new()
        .route("/orders", post(create).get(create))
        .route("/orders/{id}/notes", post(create))
        .route("/other", post(create))
        .route("/fail", post(fail))
        .route("/big", post(big))
        .route("/events", post(events))
        .with_state(origin.clone())
        .layer(layer)
}

fn memory_app(origin: &Arc<Origin>) -> Router {
    app(IdempotencyLayer::builder().build().unwrap(), origin)
}

fn order(key: Option<&str>, body: &str) -> Request<Body> {
    request(Method::POST, "/orders", key, body)
}

fn request(method: Method, uri: &str, key: Option<&str>, body: &str) -> Request<Body> {
    let mut b = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json");
    if let Some(key) = key {
        b = b.header("idempotency-key", key);
    }
    b.body(Body::from(body.to_owned())).unwrap()
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    text: String,
    record: Record,
}

impl Answer {
    fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }

    fn problem(&self) -> Value {
        assert_eq!(
            self.headers["content-type"], "application/problem+json",
            "{}",
            self.text
        );
        serde_json::from_str(&self.text).unwrap()
    }

    fn outcome(&self) -> Option<IdempotencyOutcome> {
        self.record.idempotency.as_ref().map(|n| n.outcome)
    }
}

async fn read(res: Response, annotation: &Annotation) -> Answer {
    let (parts, body) = res.into_parts();
    let text = String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap();
    Answer {
        status: parts.status,
        headers: parts.headers,
        text,
        record: annotation.snapshot(),
    }
}

/// Sends `req` with an annotation (its own, if it has one) and reads the whole answer.
async fn send(app: &Router, mut req: Request<Body>) -> Answer {
    let annotation = match req.extensions().get::<Annotation>() {
        Some(annotation) => annotation.clone(),
        None => {
            let annotation = Annotation::new();
            req.extensions_mut().insert(annotation.clone());
            annotation
        }
    };
    // No request may hang, whatever the store does.
    let res = tokio::time::timeout(Duration::from_secs(30), app.clone().oneshot(req))
        .await
        .expect("the request completed in time")
        .unwrap();
    read(res, &annotation).await
}

/// Waits until `check` holds (a store write that happens in a task of its own).
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(Instant::now() < deadline, "{what} never happened");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---------------------------------------------------------------------------
// Memory store
// ---------------------------------------------------------------------------

/// Sends the first request, holds it inside the handler, and returns its pending answer.
async fn hold_first(
    app: &Router,
    origin: &Arc<Origin>,
    req: Request<Body>,
) -> tokio::task::JoinHandle<Answer> {
    origin.hold_first.store(true, Ordering::SeqCst);
    let app = app.clone();
    let first = tokio::spawn(async move { send(&app, req).await });
    origin.entered.notified().await;
    first
}

#[tokio::test]
async fn two_identical_concurrent_requests_give_one_201_and_one_409() {
    let origin = Arc::new(Origin::default());
    let app = memory_app(&origin);
    let body = r#"{"product_id":"p-1","quantity":1}"#;
    let first = hold_first(&app, &origin, order(Some("k-concurrent"), body)).await;
    // The first is inside the handler: the second overlaps it.
    let second = send(&app, order(Some("k-concurrent"), body)).await;
    assert_eq!(second.status, StatusCode::CONFLICT);
    assert_eq!(second.headers["retry-after"], "1");
    assert_eq!(second.problem()["status"], 409);
    assert_eq!(second.outcome(), Some(IdempotencyOutcome::InFlight));
    assert!(second.record.refused());
    origin.release.notify_one();
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.text, format!("order 1: {body}"));
    assert_eq!(first.outcome(), Some(IdempotencyOutcome::Stored));
    assert!(!first.replayed());
    assert_eq!(origin.runs(), 1);
}

#[tokio::test]
async fn a_retry_replays_the_stored_response() {
    let origin = Arc::new(Origin::default());
    let app = memory_app(&origin);
    let body = r#"{"quantity":2}"#;
    let first = send(&app, order(Some("\"k-replay\""), body)).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.headers["x-handler"], "yes");
    assert_eq!(first.headers["set-cookie"], "session=secret");
    // The key quoted (the draft) or bare (Stripe) is the same key.
    for key in ["\"k-replay\"", "k-replay"] {
        let again = send(&app, order(Some(key), body)).await;
        assert_eq!(again.status, StatusCode::CREATED);
        assert!(again.replayed());
        assert_eq!(again.text, first.text);
        assert_eq!(again.headers["location"], "/orders/1");
        assert_eq!(again.headers["content-type"], first.headers["content-type"]);
        // Only allowlisted headers are stored: never a cookie.
        assert!(again.headers.get("set-cookie").is_none());
        assert!(again.headers.get("x-handler").is_none());
        assert_eq!(again.outcome(), Some(IdempotencyOutcome::Replayed));
        assert!(!again.record.refused());
    }
    assert_eq!(origin.runs(), 1);
}

#[tokio::test]
async fn the_same_key_with_another_request_is_422() {
    let origin = Arc::new(Origin::default());
    let app = memory_app(&origin);
    let first = send(&app, order(Some("k-mismatch"), r#"{"quantity":1}"#)).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let other = send(&app, order(Some("k-mismatch"), r#"{"quantity":100}"#)).await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    let problem = other.problem();
    assert_eq!(problem["status"], 422);
    // Neither the key nor the body is echoed.
    assert!(!other.text.contains("k-mismatch"), "{}", other.text);
    assert!(!other.text.contains("quantity"), "{}", other.text);
    assert_eq!(other.outcome(), Some(IdempotencyOutcome::Conflict));
    assert!(other.record.refused());
    // Another content type (a fingerprinted header) is another request too.
    let mut req = order(Some("k-mismatch"), r#"{"quantity":1}"#);
    req.headers_mut()
        .insert("content-type", "text/plain".parse().unwrap());
    assert_eq!(
        send(&app, req).await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    // And the same key while the first runs, with another body, is 422 as well.
    let origin = Arc::new(Origin::default());
    let app = memory_app(&origin);
    let first = hold_first(&app, &origin, order(Some("k-2"), "a")).await;
    let other = send(&app, order(Some("k-2"), "b")).await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    origin.release.notify_one();
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    assert_eq!(origin.runs(), 1);
}

#[tokio::test]
async fn a_required_key_that_is_missing_is_400() {
    let origin = Arc::new(Origin::default());
    let app = app(
        IdempotencyLayer::builder()
            .require_key(true)
            .build()
            .unwrap(),
        &origin,
    );
    let missing = send(&app, order(None, "{}")).await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    let problem = missing.problem();
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("requires an Idempotency-Key header"),
        "{problem}"
    );
    assert_eq!(missing.outcome(), Some(IdempotencyOutcome::Missing));
    assert!(missing.record.refused());
    // Methods the layer does not apply to need no key.
    let get = send(&app, request(Method::GET, "/orders", None, "")).await;
    assert_eq!(get.status, StatusCode::CREATED);
    assert_eq!(origin.runs(), 1);
    // Without require_key, a request without a key passes, every time.
    let origin = Arc::new(Origin::default());
    let app = memory_app(&origin);
    for _ in 0..2 {
        let a = send(&app, order(None, "{}")).await;
        assert_eq!(a.status, StatusCode::CREATED);
        assert!(!a.replayed());
        assert_eq!(a.outcome(), None);
    }
    assert_eq!(origin.runs(), 2);
}

#[tokio::test]
async fn an_invalid_key_is_400() {
    let origin = Arc::new(Origin::default());
    let app = memory_app(&origin);
    let too_long = "k".repeat(256);
    for key in [
        too_long.as_str(),
        "\"\"",
        "\"unterminated",
        "two words",
        "\"a\";p=1",
    ] {
        let a = send(&app, order(Some(key), "{}")).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{key}");
        let problem = a.problem();
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("invalid idempotency key"),
            "{problem}"
        );
        assert!(!a.text.contains(key), "the key is echoed: {}", a.text);
        assert_eq!(a.outcome(), Some(IdempotencyOutcome::Invalid));
    }
    // Two keys on one request.
    let mut req = order(Some("one"), "{}");
    req.headers_mut()
        .append("idempotency-key", "two".parse().unwrap());
    assert_eq!(send(&app, req).await.status, StatusCode::BAD_REQUEST);
    // 255 characters is fine.
    let longest = "k".repeat(255);
    let a = send(&app, order(Some(&longest), "{}")).await;
    assert_eq!(a.status, StatusCode::CREATED);
    assert_eq!(origin.runs(), 1);
}

#[tokio::test]
async fn server_errors_are_not_stored() {
    let origin = Arc::new(Origin::default());
    let plain = memory_app(&origin);
    for _ in 0..2 {
        let a = send(&plain, request(Method::POST, "/fail", Some("k-5xx"), "{}")).await;
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(a.text, "try again");
        assert!(!a.replayed());
        assert_eq!(a.outcome(), Some(IdempotencyOutcome::NotStored));
    }
    // The key was released: the retry ran the handler again.
    assert_eq!(origin.runs(), 2);
    // Unless told to store them.
    let origin = Arc::new(Origin::default());
    let app = app(
        IdempotencyLayer::builder()
            .store_server_errors(true)
            .build()
            .unwrap(),
        &origin,
    );
    send(&app, request(Method::POST, "/fail", Some("k-5xx"), "{}")).await;
    let again = send(&app, request(Method::POST, "/fail", Some("k-5xx"), "{}")).await;
    assert_eq!(again.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(again.replayed());
    assert_eq!(origin.runs(), 1);
}

#[tokio::test]
async fn a_response_over_the_cap_passes_whole_and_releases_the_key() {
    let origin = Arc::new(Origin::default());
    let app = app(
        IdempotencyLayer::builder()
            .max_response_body(1024)
            .build()
            .unwrap(),
        &origin,
    );
    for _ in 0..2 {
        let a = send(&app, request(Method::POST, "/big", Some("k-big"), "{}")).await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.text.len(), 4096);
        assert!(!a.replayed());
        assert_eq!(a.outcome(), Some(IdempotencyOutcome::NotStored));
    }
    assert_eq!(origin.runs(), 2);
    // Event streams are never captured either.
    for _ in 0..2 {
        let a = send(&app, request(Method::POST, "/events", Some("k-sse"), "{}")).await;
        assert_eq!(a.text, "data: hello\n\n");
        assert!(!a.replayed());
    }
    assert_eq!(origin.runs(), 4);
}

#[tokio::test]
async fn a_request_body_over_the_cap_is_413() {
    let origin = Arc::new(Origin::default());
    let app = app(
        IdempotencyLayer::builder()
            .max_request_body(16)
            .build()
            .unwrap(),
        &origin,
    );
    let a = send(&app, order(Some("k-413"), &"x".repeat(17))).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(a.outcome(), Some(IdempotencyOutcome::TooLarge));
    // Without a key the body is not read at all.
    let a = send(&app, order(None, &"x".repeat(17))).await;
    assert_eq!(a.status, StatusCode::CREATED);
    assert_eq!(origin.runs(), 1);
}

#[tokio::test]
async fn keys_are_scoped_by_principal() {
    let origin = Arc::new(Origin::default());
    let app = memory_app(&origin);
    let as_user = |subject: &str| {
        let mut req = order(Some("shared-key"), "{}");
        req.extensions_mut().insert(
            Principal::new(subject.to_owned(), AuthScheme::Bearer).with_issuer("https://id"),
        );
        req
    };
    let alice = send(&app, as_user("alice")).await;
    let bob = send(&app, as_user("bob")).await;
    let anonymous = send(&app, order(Some("shared-key"), "{}")).await;
    for a in [&alice, &bob, &anonymous] {
        assert_eq!(a.status, StatusCode::CREATED);
        assert!(!a.replayed());
    }
    assert_eq!(origin.runs(), 3);
    // Each replays its own.
    let again = send(&app, as_user("bob")).await;
    assert!(again.replayed());
    assert_eq!(again.text, bob.text);
    assert_eq!(origin.runs(), 3);
}

#[tokio::test]
async fn keys_are_scoped_by_route_template() {
    let origin = Arc::new(Origin::default());
    let app = memory_app(&origin);
    let on = |uri: &str| request(Method::POST, uri, Some("k-route"), "{}");
    // Two routes: two scopes, both run.
    assert_eq!(send(&app, on("/orders")).await.status, StatusCode::CREATED);
    let other = send(&app, on("/other")).await;
    assert_eq!(other.status, StatusCode::CREATED);
    assert!(!other.replayed());
    assert_eq!(origin.runs(), 2);
    // One route template: one scope, whose fingerprint holds the path.
    assert_eq!(
        send(&app, on("/orders/1/notes")).await.status,
        StatusCode::CREATED
    );
    assert!(send(&app, on("/orders/1/notes")).await.replayed());
    let elsewhere = send(&app, on("/orders/2/notes")).await;
    assert_eq!(elsewhere.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(origin.runs(), 3);
}

#[tokio::test]
async fn other_methods_pass_through() {
    let origin = Arc::new(Origin::default());
    let app = memory_app(&origin);
    for _ in 0..2 {
        let a = send(&app, request(Method::GET, "/orders", Some("k-get"), "")).await;
        assert_eq!(a.status, StatusCode::CREATED);
        assert!(!a.replayed());
        assert_eq!(a.outcome(), None);
    }
    assert_eq!(origin.runs(), 2);
}

/// The first request outlives its lease; a retry claims the key; the first finishes while
/// the retry still runs, then the retry finishes. Only the retry's response is stored.
/// `stale` serves the first request, `app` the others.
async fn stale_worker_is_fenced(
    stale: &Router,
    app: &Router,
    origin: &Arc<Origin>,
    expire: impl AsyncFnOnce(),
) {
    let first_note = Annotation::new();
    let mut req = order(Some("k-stale"), "{}");
    req.extensions_mut().insert(first_note.clone());
    let first = hold_first(stale, origin, req).await;
    expire().await;
    origin.hold_second.store(true, Ordering::SeqCst);
    let second = {
        let app = app.clone();
        tokio::spawn(async move { send(&app, order(Some("k-stale"), "{}")).await })
    };
    origin.entered_second.notified().await;
    // The stale worker finishes first: its client gets its response, but it is not stored
    // over the claim the retry holds.
    origin.release.notify_one();
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.text, "order 1: {}");
    eventually("the stale completion refused", || {
        first_note
            .snapshot()
            .idempotency
            .is_some_and(|n| n.outcome == IdempotencyOutcome::NotStored)
    })
    .await;
    // The key is still the retry's.
    let during = send(app, order(Some("k-stale"), "{}")).await;
    assert_eq!(during.status, StatusCode::CONFLICT);
    origin.release_second.notify_one();
    let second = second.await.unwrap();
    assert_eq!(second.text, "order 2: {}");
    assert_eq!(second.outcome(), Some(IdempotencyOutcome::Stored));
}

#[tokio::test(start_paused = true)]
async fn a_stale_worker_cannot_overwrite_the_record() {
    let origin = Arc::new(Origin::default());
    let app = app(
        IdempotencyLayer::builder()
            .in_flight_ttl(Duration::from_secs(5))
            .build()
            .unwrap(),
        &origin,
    );
    stale_worker_is_fenced(&app, &app, &origin, async || {
        tokio::time::advance(Duration::from_secs(6)).await
    })
    .await;
    let third = send(&app, order(Some("k-stale"), "{}")).await;
    assert!(third.replayed());
    assert_eq!(third.text, "order 2: {}");
    assert_eq!(origin.runs(), 2);
}

/// A request still running at `max_hold` stops renewing its claim: renewed before the cap
/// (a retry is a `409`), then the key lapses one lease after it and a retry runs, and the
/// stuck request's answer is not stored over the retry's.
#[tokio::test(start_paused = true)]
async fn a_request_running_past_max_hold_gives_its_key_up() {
    let origin = Arc::new(Origin::default());
    let app = app(
        IdempotencyLayer::builder()
            .in_flight_ttl(Duration::from_secs(5))
            .max_hold(Duration::from_secs(12))
            .build()
            .unwrap(),
        &origin,
    );
    let (during, runs_during) = (Arc::new(Mutex::new(None)), origin.clone());
    let seen = during.clone();
    let retry_app = app.clone();
    // Bounded: were the claim renewed forever, the retry below would never run.
    let fenced = stale_worker_is_fenced(&app, &app, &origin, async move || {
        // Two leases in, still renewed: the key is held.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let retry = send(&retry_app, order(Some("k-stale"), "{}")).await;
        *seen.lock().unwrap() = Some((retry.status, runs_during.runs()));
        // Past the cap and one more lease: no longer held.
        tokio::time::sleep(Duration::from_secs(10)).await;
    });
    tokio::time::timeout(Duration::from_secs(600), fenced)
        .await
        .expect("the retry ran once the claim lapsed after max_hold");
    assert_eq!(
        *during.lock().unwrap(),
        Some((StatusCode::CONFLICT, 1)),
        "renewed while under max_hold"
    );
    let third = send(&app, order(Some("k-stale"), "{}")).await;
    assert!(third.replayed());
    assert_eq!(third.text, "order 2: {}");
    assert_eq!(origin.runs(), 2);
}

#[tokio::test]
async fn layers_sharing_a_store_share_records() {
    let store = MemoryStore::new();
    let origin = Arc::new(Origin::default());
    let layer = || {
        IdempotencyLayer::builder()
            .store(store.clone())
            .build()
            .unwrap()
    };
    let (a, b) = (app(layer(), &origin), app(layer(), &origin));
    send(&a, order(Some("k-shared"), "{}")).await;
    assert!(send(&b, order(Some("k-shared"), "{}")).await.replayed());
    assert_eq!(store.len(), 1);
}

// ---------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------

async fn redis_store(redis: &RedisServer) -> RedisStore {
    RedisStore::connect(RedisConfig::single(redis.url()))
        .await
        .unwrap()
}

/// The idempotency records in Redis that are completed.
fn completed_records(redis: &RedisServer) -> usize {
    let keys = redis.command(&["KEYS", "battlement:idem:*"]);
    keys.lines()
        .filter(|k| !k.is_empty() && redis.command(&["HGET", k, "st"]) == "c")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_store_obeys_the_contract() {
    let redis = RedisServer::start();
    let store = RedisIdempotencyStore::new(redis_store(&redis).await);
    let (s, f) = (Scope::from_bytes([1; 32]), Fingerprint::from_bytes([1; 32]));
    let owner = OwnerToken::from_bytes;
    let lease = Duration::from_secs(60);
    let keep = Duration::from_secs(3600);
    let response = |body: &'static str| {
        let mut headers = HeaderMap::new();
        headers.insert("location", "/orders/1".parse().unwrap());
        StoredResponse::new(
            StatusCode::CREATED,
            headers,
            Bytes::from_static(body.as_bytes()),
        )
    };
    assert_eq!(
        store.claim(&s, &f, &owner([1; 16]), lease).await.unwrap(),
        Claim::Acquired
    );
    assert_eq!(
        store.claim(&s, &f, &owner([2; 16]), lease).await.unwrap(),
        Claim::InFlight
    );
    let other = Fingerprint::from_bytes([2; 32]);
    assert_eq!(
        store
            .claim(&s, &other, &owner([3; 16]), lease)
            .await
            .unwrap(),
        Claim::Mismatch
    );
    assert!(
        !store
            .complete(&s, &owner([2; 16]), &response("x"), keep)
            .await
            .unwrap()
    );
    assert!(!store.release(&s, &owner([2; 16])).await.unwrap());
    assert!(
        store
            .complete(&s, &owner([1; 16]), &response("first"), keep)
            .await
            .unwrap()
    );
    match store.claim(&s, &f, &owner([4; 16]), lease).await.unwrap() {
        Claim::Completed(r) => {
            assert_eq!(r.body(), "first");
            assert_eq!(r.headers()["location"], "/orders/1");
        }
        other => panic!("{other:?}"),
    }
    assert!(!store.release(&s, &owner([1; 16])).await.unwrap());
    // A completed record is not renewed as a claim (its retention stays).
    assert!(!store.extend(&s, &owner([1; 16]), lease).await.unwrap());
    // The retention is Redis's expiry.
    let ttl: i64 = redis
        .command(&["PTTL", &format!("battlement:idem:{{{}}}", s.to_hex())])
        .parse()
        .unwrap();
    assert!(ttl > 3_500_000 && ttl <= 3_600_000, "{ttl}");

    // Release frees the key at once.
    let s2 = Scope::from_bytes([2; 32]);
    assert_eq!(
        store.claim(&s2, &f, &owner([1; 16]), lease).await.unwrap(),
        Claim::Acquired
    );
    assert!(store.release(&s2, &owner([1; 16])).await.unwrap());
    assert!(!store.extend(&s2, &owner([1; 16]), lease).await.unwrap());
    assert_eq!(
        store
            .claim(&s2, &other, &owner([2; 16]), lease)
            .await
            .unwrap(),
        Claim::Acquired
    );

    // Only the owner renews a claim, for the lease it asks.
    assert!(
        !store
            .extend(&s2, &owner([1; 16]), Duration::from_secs(5))
            .await
            .unwrap()
    );
    assert!(
        store
            .extend(&s2, &owner([2; 16]), Duration::from_secs(5))
            .await
            .unwrap()
    );
    let ttl: i64 = redis
        .command(&["PTTL", &format!("battlement:idem:{{{}}}", s2.to_hex())])
        .parse()
        .unwrap();
    assert!(ttl > 4_000 && ttl <= 5_000, "{ttl}");

    // A lease that ran out: the key is claimed again, the stale owner is fenced off.
    let s3 = Scope::from_bytes([3; 32]);
    let short = Duration::from_millis(50);
    assert_eq!(
        store.claim(&s3, &f, &owner([1; 16]), short).await.unwrap(),
        Claim::Acquired
    );
    let name = format!("battlement:idem:{{{}}}", s3.to_hex());
    eventually("the lease to expire", || {
        redis.command(&["EXISTS", &name]) == "0"
    })
    .await;
    assert_eq!(
        store.claim(&s3, &f, &owner([2; 16]), lease).await.unwrap(),
        Claim::Acquired
    );
    assert!(
        !store
            .complete(&s3, &owner([1; 16]), &response("stale"), keep)
            .await
            .unwrap()
    );
    assert!(
        store
            .complete(&s3, &owner([2; 16]), &response("fresh"), keep)
            .await
            .unwrap()
    );
    assert!(matches!(
        store.claim(&s3, &f, &owner([5; 16]), lease).await.unwrap(),
        Claim::Completed(r) if r.body() == "fresh"
    ));

    // A record that cannot be read is an error, never a replay.
    redis.command(&["HSET", &name, "res", "\u{1}garbage"]);
    assert!(store.claim(&s3, &f, &owner([6; 16]), lease).await.is_err());
}

async fn redis_app(redis: &RedisServer, origin: &Arc<Origin>) -> Router {
    let layer = IdempotencyLayer::builder()
        .redis(redis_store(redis).await)
        .build()
        .unwrap();
    app(layer, origin)
}

/// A request slower than `in_flight_ttl` keeps its key: the claim is renewed while the
/// handler runs, so a retry long past the first lease is a `409`, never a second run, and
/// the slow request's response is the one stored. On `app_a` and `app_b` (one instance
/// twice, or two instances on one Redis).
async fn slow_request_keeps_its_key(app_a: &Router, app_b: &Router, origin: &Arc<Origin>) {
    let body = r#"{"quantity":1}"#;
    let first = hold_first(app_a, origin, order(Some("k-slow"), body)).await;
    // Four leases of 150 ms go by while the first request is inside the handler.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let retry = send(app_b, order(Some("k-slow"), body)).await;
    assert_eq!(retry.status, StatusCode::CONFLICT, "{}", retry.text);
    origin.release.notify_one();
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    let mut replay = send(app_b, order(Some("k-slow"), body)).await;
    for _ in 0..100 {
        if replay.replayed() {
            break;
        }
        // The record is written in a task of its own: a retry right after the end can
        // still see the claim (a 409).
        assert_eq!(replay.status, StatusCode::CONFLICT);
        tokio::time::sleep(Duration::from_millis(20)).await;
        replay = send(app_b, order(Some("k-slow"), body)).await;
    }
    assert!(replay.replayed(), "{} {}", replay.status, replay.text);
    assert_eq!(replay.text, first.text);
    assert_eq!(origin.runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_slower_than_its_lease_keeps_its_key() {
    let origin = Arc::new(Origin::default());
    let layer = IdempotencyLayer::builder()
        .in_flight_ttl(Duration::from_millis(150))
        .build()
        .unwrap();
    let app = app(layer, &origin);
    slow_request_keeps_its_key(&app, &app, &origin).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_slower_than_its_lease_keeps_its_key_on_redis() {
    let redis = RedisServer::start();
    let origin = Arc::new(Origin::default());
    let layer = || async {
        IdempotencyLayer::builder()
            .redis(redis_store(&redis).await)
            .in_flight_ttl(Duration::from_millis(150))
            .build()
            .unwrap()
    };
    let a = app(layer().await, &origin);
    let b = app(layer().await, &origin);
    slow_request_keeps_its_key(&a, &b, &origin).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_redis_share_records() {
    let redis = RedisServer::start();
    let origin = Arc::new(Origin::default());
    let a = redis_app(&redis, &origin).await;
    let b = redis_app(&redis, &origin).await;
    let first = send(&a, order(Some("k-redis"), r#"{"quantity":1}"#)).await;
    assert_eq!(first.status, StatusCode::CREATED);
    eventually("the response stored in Redis", || {
        completed_records(&redis) == 1
    })
    .await;
    // The other instance replays it.
    let again = send(&b, order(Some("k-redis"), r#"{"quantity":1}"#)).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert!(again.replayed());
    assert_eq!(again.text, first.text);
    assert_eq!(again.headers["location"], "/orders/1");
    assert_eq!(again.outcome(), Some(IdempotencyOutcome::Replayed));
    assert_eq!(origin.runs(), 1);
    // And refuses another request under the key.
    let other = send(&b, order(Some("k-redis"), r#"{"quantity":2}"#)).await;
    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    // Key names are fixed-length hashes: no client bytes in Redis.
    let keys = redis.command(&["KEYS", "*"]);
    for key in keys.lines().filter(|k| !k.is_empty()) {
        assert!(key.starts_with("battlement:idem:{"), "{key}");
        assert_eq!(key.len(), "battlement:idem:{}".len() + 64, "{key}");
    }
    assert!(!keys.contains("k-redis"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_across_instances_give_one_201_and_one_409() {
    let redis = RedisServer::start();
    let origin = Arc::new(Origin::default());
    let a = redis_app(&redis, &origin).await;
    let b = redis_app(&redis, &origin).await;
    let first = hold_first(&a, &origin, order(Some("k-across"), "{}")).await;
    let second = send(&b, order(Some("k-across"), "{}")).await;
    assert_eq!(second.status, StatusCode::CONFLICT);
    assert_eq!(second.headers["retry-after"], "1");
    assert_eq!(second.outcome(), Some(IdempotencyOutcome::InFlight));
    origin.release.notify_one();
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(origin.runs(), 1);
    eventually("the response stored in Redis", || {
        completed_records(&redis) == 1
    })
    .await;
    assert!(send(&b, order(Some("k-across"), "{}")).await.replayed());
    assert_eq!(origin.runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_worker_on_redis_cannot_overwrite_the_record() {
    let redis = RedisServer::start();
    let origin = Arc::new(Origin::default());
    let stale = redis_app(&redis, &origin).await;
    let app = redis_app(&redis, &origin).await;
    // The first request's claim is lost while it runs, as when its lease ran out while
    // Redis was out of reach (no renewal got through): the record goes.
    stale_worker_is_fenced(&stale, &app, &origin, async || {
        let keys = redis.command(&["KEYS", "battlement:idem:*"]);
        let key = keys.trim();
        assert!(
            !key.is_empty() && !key.contains('\n'),
            "one claim: {keys:?}"
        );
        assert_eq!(redis.command(&["DEL", key]), "1");
    })
    .await;
    eventually("the retry's response stored", || {
        completed_records(&redis) == 1
    })
    .await;
    let third = send(&app, order(Some("k-stale"), "{}")).await;
    assert!(third.replayed());
    assert_eq!(third.text, "order 2: {}");
    assert_eq!(origin.runs(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_is_503_when_closed_and_runs_when_open() {
    let mut redis = RedisServer::start();
    let origin = Arc::new(Origin::default());
    let closed = redis_app(&redis, &origin).await;
    let open = app(
        IdempotencyLayer::builder()
            .redis(redis_store(&redis).await)
            .on_failure(FailurePolicy::Open)
            .build()
            .unwrap(),
        &origin,
    );
    assert_eq!(
        send(&closed, order(Some("k-up"), "{}")).await.status,
        StatusCode::CREATED
    );
    redis.stop();
    let refused = send(&closed, order(Some("k-down"), "{}")).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(refused.headers.contains_key("retry-after"));
    assert_eq!(refused.problem()["status"], 503);
    assert_eq!(refused.outcome(), Some(IdempotencyOutcome::Unavailable));
    assert!(refused.record.refused());
    assert_eq!(origin.runs(), 1);
    // Requests without a key are not affected.
    assert_eq!(
        send(&closed, order(None, "{}")).await.status,
        StatusCode::CREATED
    );
    assert_eq!(origin.runs(), 2);
    // Failing open: the handler runs, without idempotency.
    for _ in 0..2 {
        let ran = send(&open, order(Some("k-down"), "{}")).await;
        assert_eq!(ran.status, StatusCode::CREATED);
        assert!(!ran.replayed());
        assert_eq!(ran.outcome(), Some(IdempotencyOutcome::FailOpen));
    }
    assert_eq!(origin.runs(), 4);
}

#[tokio::test]
async fn trailers_are_stored_and_replayed_on_a_plain_tower_service() {
    use battlement::body::{RequestBody, ResponseBody};
    use http_body_util::Full;

    let runs = Arc::new(AtomicUsize::new(0));
    let counter = runs.clone();
    let service = tower::ServiceBuilder::new()
        .layer(IdempotencyLayer::builder().build().unwrap())
        .service_fn(move |_req: Request<RequestBody<Full<Bytes>>>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async {
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", "0".parse().unwrap());
                let body: ResponseBody<Full<Bytes>> =
                    ResponseBody::with_trailers("a reply", trailers);
                Ok::<_, std::convert::Infallible>(Response::new(body))
            }
        });
    let call = || {
        Request::post("/rpc")
            .header("idempotency-key", "k-trailers")
            .body(Full::new(Bytes::from_static(b"a call")))
            .unwrap()
    };
    for replayed in [false, true] {
        let res = service.clone().oneshot(call()).await.unwrap();
        assert_eq!(res.headers().contains_key("idempotent-replayed"), replayed);
        let collected = res.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(collected.to_bytes(), "a reply");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

/// A claim the store answered too late (Redis slow: here its writes are paused past the
/// store's 50 ms timeout) may still land once Redis goes on. The refused request gives it
/// back (trying again until Redis answers), so a retry runs within seconds instead of
/// meeting a key held by nobody (`409` until the lease lapsed, a minute by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_timed_out_is_given_back() {
    let redis = RedisServer::start();
    let origin = Arc::new(Origin::default());
    let app = redis_app(&redis, &origin).await;
    // Scripts loaded (a first EVALSHA would be answered NOSCRIPT, and land nothing).
    assert_eq!(
        send(&app, order(Some("k-warm"), "{}")).await.status,
        StatusCode::CREATED
    );
    redis.pause_writes(Duration::from_millis(400));
    let refused = send(&app, order(Some("k-slow-claim"), "{}")).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    tokio::time::sleep(Duration::from_millis(600)).await;
    // While the store's circuit breaker (opened by the timeouts) cools down, retries are
    // `503`, and the give-back itself waits for it; a retry may meet the claim (`409`)
    // until then. Within seconds the request runs, not after the minute-long lease.
    let deadline = Instant::now() + Duration::from_secs(5);
    let retried = loop {
        let retried = send(&app, order(Some("k-slow-claim"), "{}")).await;
        if retried.status == StatusCode::CREATED || Instant::now() > deadline {
            break retried;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        retried.status,
        StatusCode::CREATED,
        "the retry met the timed-out claim: {:?}",
        retried.outcome()
    );
    assert_eq!(origin.runs(), 2);
}

/// gRPC answers an error "trailers-only": HTTP 200 with `grpc-status` in the headers and
/// no body. A server-side code (here `UNAVAILABLE`) is not stored, like a `5xx`: the retry
/// runs. A client-side code (`INVALID_ARGUMENT`) is stored and replayed whole, with its
/// `grpc-status` and `grpc-message`, which the replay must carry to mean anything.
#[tokio::test]
async fn grpc_errors_are_kept_or_not_like_their_http_classes_and_replayed_whole() {
    use battlement::body::{RequestBody, ResponseBody};
    use http_body_util::Full;

    let runs = Arc::new(AtomicUsize::new(0));
    let counter = runs.clone();
    let service = tower::ServiceBuilder::new()
        .layer(IdempotencyLayer::builder().build().unwrap())
        .service_fn(move |req: Request<RequestBody<Full<Bytes>>>| {
            counter.fetch_add(1, Ordering::SeqCst);
            let code = if req.uri().path() == "/unavailable" {
                "14"
            } else {
                "3"
            };
            async move {
                let res = Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", code)
                    .header("grpc-message", "no%20luck")
                    .body(ResponseBody::<Full<Bytes>>::empty())
                    .unwrap();
                Ok::<_, std::convert::Infallible>(res)
            }
        });
    let call = |path: &str| {
        Request::post(path)
            .header("idempotency-key", "k-grpc")
            .header("content-type", "application/grpc")
            .body(Full::new(Bytes::from_static(b"a call")))
            .unwrap()
    };
    for _ in 0..2 {
        let res = service.clone().oneshot(call("/unavailable")).await.unwrap();
        assert!(!res.headers().contains_key("idempotent-replayed"));
        assert_eq!(res.headers()["grpc-status"], "14");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2, "UNAVAILABLE was stored");
    for replayed in [false, true] {
        let res = service.clone().oneshot(call("/invalid")).await.unwrap();
        assert_eq!(res.headers().contains_key("idempotent-replayed"), replayed);
        assert_eq!(res.headers()["grpc-status"], "3", "replayed {replayed}");
        assert_eq!(res.headers()["grpc-message"], "no%20luck");
        assert_eq!(res.headers()["content-type"], "application/grpc");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

/// A body that sends its first bytes and then nothing ever again.
struct Stalls(Option<Bytes>);

impl http_body::Body for Stalls {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        match self.0.take() {
            Some(data) => std::task::Poll::Ready(Some(Ok(http_body::Frame::data(data)))),
            None => std::task::Poll::Pending,
        }
    }
}

/// A keyed request whose body stalls is refused with `408` after the idle timeout
/// (configurable), before any claim: the key stays free and a retry runs.
#[tokio::test(start_paused = true)]
async fn a_stalled_body_is_408_and_leaves_the_key_free() {
    let origin = Arc::new(Origin::default());
    let app = app(
        IdempotencyLayer::builder()
            .body_idle_timeout(Duration::from_secs(5))
            .build()
            .unwrap(),
        &origin,
    );
    let stalled = Request::post("/orders")
        .header("content-type", "application/json")
        .header("idempotency-key", "k-stalled")
        .body(Body::new(Stalls(Some(Bytes::from_static(b"{\"a\":")))))
        .unwrap();
    let started = tokio::time::Instant::now();
    let a = send(&app, stalled).await;
    assert_eq!(a.status, StatusCode::REQUEST_TIMEOUT, "{}", a.text);
    assert!(started.elapsed() < Duration::from_secs(7));
    assert_eq!(origin.runs(), 0);
    let retried = send(&app, order(Some("k-stalled"), "{}")).await;
    assert_eq!(retried.status, StatusCode::CREATED);
}

/// "Forever" durations (`Duration::MAX`) are accepted and cut to a very long time: no
/// clock arithmetic overflows (which would panic inside a request).
#[tokio::test]
async fn durations_of_forever_do_not_overflow() {
    let origin = Arc::new(Origin::default());
    let app = app(
        IdempotencyLayer::builder()
            .retention(Duration::MAX)
            .in_flight_ttl(Duration::MAX)
            .max_hold(Duration::MAX)
            .build()
            .unwrap(),
        &origin,
    );
    for replayed in [false, true] {
        let a = send(&app, order(Some("k-forever"), "{}")).await;
        assert_eq!(a.status, StatusCode::CREATED);
        assert_eq!(a.replayed(), replayed);
    }
}

/// A response the store cannot encode (more trailer fields than a record holds) is not
/// stored, and its key is given back at once: a retry runs again instead of meeting `409`
/// while the write is tried in vain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_that_cannot_be_encoded_gives_its_key_back_at_once() {
    use battlement::body::{RequestBody, ResponseBody};
    use http_body_util::Full;

    let redis = RedisServer::start();
    let runs = Arc::new(AtomicUsize::new(0));
    let counter = runs.clone();
    let service = tower::ServiceBuilder::new()
        .layer(
            IdempotencyLayer::builder()
                .redis(redis_store(&redis).await)
                .build()
                .unwrap(),
        )
        .service_fn(move |_req: Request<RequestBody<Full<Bytes>>>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async {
                let mut trailers = HeaderMap::new();
                for i in 0..(battlement::idempotency::MAX_FRAME_FIELDS + 10) {
                    let name = http::HeaderName::from_bytes(format!("x-t{i}").as_bytes()).unwrap();
                    trailers.insert(name, "1".parse().unwrap());
                }
                let body: ResponseBody<Full<Bytes>> =
                    ResponseBody::with_trailers("a reply", trailers);
                Ok::<_, std::convert::Infallible>(Response::new(body))
            }
        });
    let call = || {
        Request::post("/rpc")
            .header("idempotency-key", "k-many-trailers")
            .body(Full::new(Bytes::from_static(b"a call")))
            .unwrap()
    };
    let res = service.clone().oneshot(call()).await.unwrap();
    res.into_body().collect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let res = service.clone().oneshot(call()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK, "the key was still held");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}
