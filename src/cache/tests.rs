//! The cache layer in front of an axum router that counts its calls.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::routing::get;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::ServiceExt;

use super::layer::CacheLayer;

#[derive(Clone, Default)]
struct Origin {
    calls: Arc<AtomicUsize>,
}

impl Origin {
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

async fn product(State(o): State<Origin>) -> impl IntoResponse {
    o.calls.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(20)).await;
    ([("cache-control", "public, max-age=30")], "a product")
}

async fn cookie(State(o): State<Origin>) -> impl IntoResponse {
    o.calls.fetch_add(1, Ordering::SeqCst);
    (
        [
            ("cache-control", "public, max-age=30"),
            ("set-cookie", "s=1"),
        ],
        "with a cookie",
    )
}

async fn no_store(State(o): State<Origin>) -> impl IntoResponse {
    o.calls.fetch_add(1, Ordering::SeqCst);
    ([("cache-control", "no-store")], "fresh every time")
}

async fn language(State(o): State<Origin>, headers: HeaderMap) -> impl IntoResponse {
    o.calls.fetch_add(1, Ordering::SeqCst);
    let lang = headers
        .get("accept-language")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("en")
        .to_owned();
    (
        [
            ("cache-control", "public, max-age=30"),
            ("vary", "accept-language"),
        ],
        lang,
    )
}

async fn big(State(o): State<Origin>) -> impl IntoResponse {
    o.calls.fetch_add(1, Ordering::SeqCst);
    ([("cache-control", "public, max-age=30")], "x".repeat(4096))
}

fn app(origin: &Origin) -> Router {
    Router::new()
        .route("/product", get(product))
        .route("/cookie", get(cookie))
        .route("/no-store", get(no_store))
        .route("/lang", get(language))
        .route("/big", get(big))
        .with_state(origin.clone())
        .layer(CacheLayer::builder().max_body(1024).build())
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

async fn send(app: &Router, req: Request<Body>) -> Answer {
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let body =
        String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    // Let the store write that followed the end of the body run.
    tokio::task::yield_now().await;
    Answer {
        status,
        headers,
        body,
    }
}

fn get_req(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

#[tokio::test]
async fn a_miss_is_stored_and_the_next_request_hits() {
    let origin = Origin::default();
    let app = app(&origin);
    let first = send(&app, get_req("/product")).await;
    assert_eq!(first.status, StatusCode::OK);
    assert!(
        first.headers["cache-status"]
            .to_str()
            .unwrap()
            .contains("fwd=uri-miss")
    );
    let second = send(&app, get_req("/product")).await;
    assert_eq!(second.body, "a product");
    let status = second.headers["cache-status"].to_str().unwrap();
    assert!(status.contains("hit"), "{status}");
    assert!(second.headers.contains_key("age"));
    assert!(
        second.headers.contains_key("etag"),
        "a strong ETag is generated"
    );
    assert_eq!(origin.calls(), 1);
}

#[tokio::test]
async fn conditional_and_head_requests_are_answered_from_the_entry() {
    let origin = Origin::default();
    let app = app(&origin);
    send(&app, get_req("/product")).await;
    let hit = send(&app, get_req("/product")).await;
    let etag = hit.headers["etag"].clone();
    let conditional = Request::get("/product")
        .header("if-none-match", etag)
        .body(Body::empty())
        .unwrap();
    let a = send(&app, conditional).await;
    assert_eq!(a.status, StatusCode::NOT_MODIFIED);
    assert!(a.body.is_empty());
    let head = send(&app, Request::head("/product").body(Body::empty()).unwrap()).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    // HEAD tells the length of what GET answers, as the hit does.
    assert_eq!(head.headers["content-length"], hit.body.len().to_string());
    assert_eq!(hit.headers["content-length"], hit.body.len().to_string());
    assert_eq!(origin.calls(), 1);
}

#[tokio::test]
async fn set_cookie_is_never_stored() {
    let origin = Origin::default();
    let app = app(&origin);
    for _ in 0..3 {
        let a = send(&app, get_req("/cookie")).await;
        assert_eq!(a.headers["set-cookie"], "s=1");
    }
    assert_eq!(origin.calls(), 3);
}

#[tokio::test]
async fn requests_with_credentials_are_not_answered_from_the_shared_cache() {
    let origin = Origin::default();
    let app = app(&origin);
    send(&app, get_req("/product")).await;
    let with_auth = Request::get("/product")
        .header("authorization", "Bearer x")
        .body(Body::empty())
        .unwrap();
    let a = send(&app, with_auth).await;
    assert!(!a.headers["cache-status"].to_str().unwrap().contains("hit"));
    assert_eq!(origin.calls(), 2);
}

#[tokio::test]
async fn uncacheable_responses_pass_without_queueing() {
    let origin = Origin::default();
    let app = app(&origin);
    for _ in 0..3 {
        assert_eq!(
            send(&app, get_req("/no-store")).await.body,
            "fresh every time"
        );
    }
    assert_eq!(origin.calls(), 3);
}

#[tokio::test]
async fn vary_keeps_variants_apart() {
    let origin = Origin::default();
    let app = app(&origin);
    let lang = |l: &str| {
        Request::get("/lang")
            .header("accept-language", l)
            .body(Body::empty())
            .unwrap()
    };
    assert_eq!(send(&app, lang("fr")).await.body, "fr");
    assert_eq!(send(&app, lang("de")).await.body, "de");
    assert_eq!(send(&app, lang("fr")).await.body, "fr");
    assert_eq!(send(&app, lang("de")).await.body, "de");
    assert_eq!(origin.calls(), 2);
}

#[tokio::test]
async fn a_body_over_the_cap_is_delivered_whole_and_not_stored() {
    let origin = Origin::default();
    let app = app(&origin);
    for _ in 0..2 {
        assert_eq!(send(&app, get_req("/big")).await.body.len(), 4096);
    }
    assert_eq!(origin.calls(), 2);
}

#[tokio::test]
async fn concurrent_misses_make_one_origin_call() {
    let origin = Origin::default();
    let app = app(&origin);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let app = app.clone();
        set.spawn(async move { send(&app, get_req("/product")).await });
    }
    let mut collapsed = 0;
    while let Some(a) = set.join_next().await {
        let a = a.unwrap();
        assert_eq!(a.body, "a product");
        if a.headers["cache-status"]
            .to_str()
            .unwrap()
            .contains("collapsed")
        {
            collapsed += 1;
        }
    }
    assert_eq!(origin.calls(), 1);
    assert_eq!(collapsed, 999);
}

#[tokio::test]
async fn a_purge_sends_the_next_request_to_the_origin() {
    let origin = Origin::default();
    let cache = CacheLayer::builder().build();
    let app = Router::new()
        .route("/product", get(product))
        .with_state(origin.clone())
        .layer(cache.clone());
    send(&app, get_req("/product")).await;
    send(&app, get_req("/product")).await;
    assert_eq!(origin.calls(), 1);
    cache.purge("/product", None).await;
    let a = send(&app, get_req("/product")).await;
    assert!(
        a.headers["cache-status"]
            .to_str()
            .unwrap()
            .contains("fwd=uri-miss")
    );
    assert_eq!(origin.calls(), 2);
}

/// A clock the test moves, in whole seconds from a fixed start.
#[derive(Clone, Default)]
struct TestClock(Arc<AtomicUsize>);

impl TestClock {
    fn advance(&self, secs: usize) {
        self.0.fetch_add(secs, Ordering::SeqCst);
    }
    fn now(&self) -> std::time::SystemTime {
        std::time::UNIX_EPOCH
            + Duration::from_secs(1_800_000_000 + self.0.load(Ordering::SeqCst) as u64)
    }
}

#[derive(Clone, Default)]
struct Versioned {
    calls: Arc<AtomicUsize>,
    failing: Arc<std::sync::atomic::AtomicBool>,
}

async fn versioned(State(o): State<Versioned>) -> axum::response::Response {
    let n = o.calls.fetch_add(1, Ordering::SeqCst) + 1;
    if o.failing.load(Ordering::SeqCst) {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    (
        [(
            "cache-control",
            "public, max-age=10, stale-while-revalidate=60, stale-if-error=600",
        )],
        format!("v{n}"),
    )
        .into_response()
}

fn versioned_app(origin: &Versioned, clock: &TestClock, path: &'static str) -> Router {
    let c = clock.clone();
    Router::new()
        .route(path, get(versioned))
        .with_state(origin.clone())
        .layer(CacheLayer::builder().clock(move || c.now()).build())
}

async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn stale_while_revalidate_serves_stale_and_refreshes_once() {
    let origin = Versioned::default();
    let clock = TestClock::default();
    let app = versioned_app(&origin, &clock, "/v");
    assert_eq!(send(&app, get_req("/v")).await.body, "v1");
    clock.advance(20);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let app = app.clone();
        set.spawn(async move { send(&app, get_req("/v")).await });
    }
    while let Some(a) = set.join_next().await {
        let a = a.unwrap();
        assert_eq!(a.body, "v1", "stale served at once");
        let status = a.headers["cache-status"].to_str().unwrap().to_owned();
        assert!(
            status.contains("hit") && status.contains("fwd=stale"),
            "{status}"
        );
    }
    settle().await;
    assert_eq!(
        origin.calls.load(Ordering::SeqCst),
        2,
        "one background refresh"
    );
    let a = send(&app, get_req("/v")).await;
    assert_eq!(a.body, "v2");
    assert!(
        !a.headers["cache-status"]
            .to_str()
            .unwrap()
            .contains("stale")
    );
}

#[tokio::test]
async fn stale_if_error_answers_an_origin_failure_with_the_stale_entry() {
    let origin = Versioned::default();
    let clock = TestClock::default();
    let app = versioned_app(&origin, &clock, "/v");
    assert_eq!(send(&app, get_req("/v")).await.body, "v1");
    origin.failing.store(true, Ordering::SeqCst);
    // Past stale-while-revalidate, within stale-if-error.
    clock.advance(100);
    let a = send(&app, get_req("/v")).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body, "v1");
    assert!(
        a.headers["cache-status"]
            .to_str()
            .unwrap()
            .contains("fwd=stale")
    );
    // Again: the failure did not replace the stale entry.
    assert_eq!(send(&app, get_req("/v")).await.body, "v1");
    // Past every window: the failure goes through.
    clock.advance(1000);
    let a = send(&app, get_req("/v")).await;
    assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR);
}

#[tokio::test]
async fn a_disconnecting_leader_does_not_restart_the_fill() {
    let origin = Origin::default();
    let app = app(&origin);
    // The leader starts the fill and goes away before the answer comes.
    let leader = {
        let app = app.clone();
        tokio::spawn(async move { app.oneshot(get_req("/product")).await })
    };
    tokio::task::yield_now().await;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let app = app.clone();
        set.spawn(async move { send(&app, get_req("/product")).await });
    }
    tokio::task::yield_now().await;
    leader.abort();
    while let Some(a) = set.join_next().await {
        assert_eq!(a.unwrap().body, "a product");
    }
    assert_eq!(origin.calls(), 1, "the fill went on without its client");
}

#[tokio::test]
async fn trailers_are_kept() {
    use http_body_util::Full;
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let service = tower::ServiceBuilder::new()
        .layer(CacheLayer::builder().build())
        .service_fn(move |_req: Request<Full<bytes::Bytes>>| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", "0".parse().unwrap());
                let body = crate::body::ResponseBody::<Full<bytes::Bytes>>::with_trailers(
                    "payload", trailers,
                );
                let mut res = http::Response::new(body);
                res.headers_mut()
                    .insert("cache-control", "public, max-age=60".parse().unwrap());
                Ok::<_, std::convert::Infallible>(res)
            }
        });
    for _ in 0..2 {
        let res = service
            .clone()
            .oneshot(Request::get("/t").body(Full::default()).unwrap())
            .await
            .unwrap();
        let collected = res.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(collected.to_bytes(), "payload");
        settle().await;
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

async fn tagged(State(o): State<Origin>) -> impl IntoResponse {
    o.calls.fetch_add(1, Ordering::SeqCst);
    (
        [
            ("cache-control", "public, max-age=300"),
            ("surrogate-key", "product-7 catalog"),
        ],
        "tagged",
    )
}

#[tokio::test]
async fn a_tag_purge_reaches_every_entry_with_the_tag_and_tags_never_leave() {
    let origin = Origin::default();
    let cache = CacheLayer::builder().build();
    let app = Router::new()
        .route("/a", get(tagged))
        .route("/b", get(tagged))
        .with_state(origin.clone())
        .layer(cache.clone());
    for path in ["/a", "/b", "/a", "/b"] {
        let a = send(&app, get_req(path)).await;
        assert!(
            !a.headers.contains_key("surrogate-key"),
            "tags are internal"
        );
    }
    assert_eq!(origin.calls(), 2);
    cache.purge_tag("unrelated").await;
    send(&app, get_req("/a")).await;
    assert_eq!(origin.calls(), 2);
    cache.purge_tag("catalog").await;
    send(&app, get_req("/a")).await;
    send(&app, get_req("/b")).await;
    assert_eq!(origin.calls(), 4, "both entries named the purged tag");
    send(&app, get_req("/a")).await;
    assert_eq!(origin.calls(), 4, "the refill is cached again");
}

#[tokio::test]
async fn a_header_outside_the_key_cannot_poison_the_entry() {
    let origin = Origin::default();
    let app = Router::new()
        .route("/lang", get(language))
        .route("/product", get(product))
        .with_state(origin.clone())
        .layer(CacheLayer::builder().build());
    // An attacker's request with odd headers fills the entry for a resource that does not
    // vary on them; the response cannot depend on them, so others get the same bytes.
    let poisoned = Request::get("/product")
        .header("x-forwarded-host", "evil.example")
        .header("host", "evil.example")
        .body(Body::empty())
        .unwrap();
    send(&app, poisoned).await;
    let a = send(&app, get_req("/product")).await;
    assert_eq!(a.body, "a product");
    // On a resource that varies, a variant is only served to requests that match it.
    let fr = Request::get("/lang")
        .header("accept-language", "fr")
        .body(Body::empty())
        .unwrap();
    send(&app, fr).await;
    let plain = send(&app, get_req("/lang")).await;
    assert_eq!(plain.body, "en");
}

#[tokio::test]
async fn per_principal_entries_are_each_callers_own() {
    use crate::principal::{AuthScheme, Principal};
    async fn me(State(o): State<Origin>, req: Request<Body>) -> impl IntoResponse {
        o.calls.fetch_add(1, Ordering::SeqCst);
        let who = Principal::of(req.extensions())
            .unwrap()
            .subject()
            .to_owned();
        ([("cache-control", "private, max-age=60")], who)
    }
    let origin = Origin::default();
    let app = Router::new()
        .route("/me", get(me))
        .with_state(origin.clone())
        .layer(CacheLayer::builder().per_principal(true).build());
    let as_user = |who: &str| {
        Request::get("/me")
            .header("authorization", "Bearer opaque")
            .extension(Principal::new(who, AuthScheme::Bearer))
            .body(Body::empty())
            .unwrap()
    };
    for _ in 0..2 {
        assert_eq!(send(&app, as_user("alice")).await.body, "alice");
        assert_eq!(send(&app, as_user("bob")).await.body, "bob");
    }
    assert_eq!(
        origin.calls(),
        2,
        "each caller's private entry is reused, never shared"
    );
    // Without a principal on a per-principal route: no cache at all.
    async fn anon(State(o): State<Origin>) -> impl IntoResponse {
        o.calls.fetch_add(1, Ordering::SeqCst);
        ([("cache-control", "public, max-age=60")], "anon")
    }
    let anon_app = Router::new()
        .route("/a", get(anon))
        .with_state(origin.clone())
        .layer(CacheLayer::builder().per_principal(true).build());
    send(&anon_app, get_req("/a")).await;
    send(&anon_app, get_req("/a")).await;
    assert_eq!(origin.calls(), 4);
}

#[tokio::test]
async fn event_streams_pass_through_untouched() {
    async fn events(State(o): State<Origin>) -> impl IntoResponse {
        o.calls.fetch_add(1, Ordering::SeqCst);
        (
            [
                ("cache-control", "public, max-age=60"),
                ("content-type", "text/event-stream"),
            ],
            "data: 1\n\n",
        )
    }
    let origin = Origin::default();
    let app = Router::new()
        .route("/events", get(events))
        .with_state(origin.clone())
        .layer(CacheLayer::builder().build());
    for _ in 0..2 {
        let a = send(&app, get_req("/events")).await;
        assert_eq!(a.body, "data: 1\n\n");
    }
    assert_eq!(origin.calls(), 2);
}

#[tokio::test]
async fn stale_if_error_also_covers_a_slow_origin() {
    #[derive(Clone, Default)]
    struct Slow {
        calls: Arc<AtomicUsize>,
    }
    async fn sometimes_slow(State(o): State<Slow>) -> impl IntoResponse {
        if o.calls.fetch_add(1, Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        (
            [("cache-control", "public, max-age=10, stale-if-error=600")],
            "v1",
        )
    }
    let clock = TestClock::default();
    let c = clock.clone();
    let app = Router::new()
        .route("/s", get(sometimes_slow))
        .with_state(Slow::default())
        .layer(
            CacheLayer::builder()
                .clock(move || c.now())
                .stale_if_error_timeout(Duration::from_millis(50))
                .build(),
        );
    assert_eq!(send(&app, get_req("/s")).await.body, "v1");
    clock.advance(100);
    let started = std::time::Instant::now();
    let a = send(&app, get_req("/s")).await;
    assert_eq!(a.body, "v1");
    assert!(
        a.headers["cache-status"]
            .to_str()
            .unwrap()
            .contains("fwd=stale")
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn an_upstream_age_is_added_to_the_cache_s_own() {
    async fn aged(State(o): State<Origin>) -> impl IntoResponse {
        o.calls.fetch_add(1, Ordering::SeqCst);
        (
            [("cache-control", "public, max-age=300"), ("age", "100")],
            "aged",
        )
    }
    let origin = Origin::default();
    let app = Router::new()
        .route("/aged", get(aged))
        .with_state(origin.clone())
        .layer(CacheLayer::builder().build());
    send(&app, get_req("/aged")).await;
    let hit = send(&app, get_req("/aged")).await;
    let age: u64 = hit.headers["age"].to_str().unwrap().parse().unwrap();
    assert!((100..110).contains(&age), "{age}");
    assert_eq!(hit.headers.get_all("age").iter().count(), 1);
    assert_eq!(hit.headers.get_all("cache-status").iter().count(), 1);
}

#[tokio::test]
async fn age_and_ttl_follow_the_clock_hit_after_hit() {
    let origin = Versioned::default();
    let clock = TestClock::default();
    let app = versioned_app(&origin, &clock, "/aging");
    send(&app, get_req("/aging")).await;
    let header = |a: &Answer, name: &str| a.headers[name].to_str().unwrap().to_owned();
    for (advance, age, ttl) in [
        (0, "0", 10),
        (0, "0", 10),
        (3, "3", 7),
        (0, "3", 7),
        (4, "7", 3),
    ] {
        clock.advance(advance);
        let hit = send(&app, get_req("/aging")).await;
        assert_eq!(header(&hit, "age"), age);
        assert_eq!(
            header(&hit, "cache-status"),
            format!("battlement; hit; ttl={ttl}")
        );
    }
    assert_eq!(origin.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_purge_reaches_every_variant_of_the_uri() {
    let origin = Origin::default();
    let cache = CacheLayer::builder().build();
    let app = Router::new()
        .route("/lang", get(language))
        .with_state(origin.clone())
        .layer(cache.clone());
    let lang = |l: &str| {
        Request::get("/lang")
            .header("accept-language", l)
            .body(Body::empty())
            .unwrap()
    };
    for l in ["fr", "de", "fr", "de"] {
        send(&app, lang(l)).await;
    }
    assert_eq!(origin.calls(), 2);
    cache.purge("/lang", None).await;
    // The first variant asked again stores the variant list anew; the other must not come
    // back from before the purge.
    for l in ["fr", "de"] {
        let a = send(&app, lang(l)).await;
        assert_eq!(a.body, l);
        let status = a.headers["cache-status"].to_str().unwrap().to_owned();
        assert!(
            status.contains("fwd=uri-miss"),
            "{l} after the purge: {status}"
        );
    }
    assert_eq!(origin.calls(), 4);
}

async fn shared_max_age(State(o): State<Origin>, headers: HeaderMap) -> axum::response::Response {
    o.calls.fetch_add(1, Ordering::SeqCst);
    if headers.contains_key("range") {
        return (
            StatusCode::PARTIAL_CONTENT,
            [
                ("cache-control", "max-age=60"),
                ("content-range", "bytes 0-1/9"),
            ],
            "a ",
        )
            .into_response();
    }
    ([("cache-control", "max-age=60")], "a product").into_response()
}

/// What a request with credentials, or a range, gets from the origin says nothing about the
/// resource: it must not replace the shared entry with a pass marker (every anonymous
/// request would then go to the origin).
#[tokio::test]
async fn credentialed_and_range_requests_leave_the_shared_entry_alone() {
    let origin = Origin::default();
    let app = Router::new()
        .route("/shared", get(shared_max_age))
        .with_state(origin.clone())
        .layer(CacheLayer::builder().build());
    send(&app, get_req("/shared")).await;
    let hit = send(&app, get_req("/shared")).await;
    assert!(
        hit.headers["cache-status"]
            .to_str()
            .unwrap()
            .contains("hit")
    );
    assert_eq!(origin.calls(), 1);
    for (name, value) in [
        ("cookie", "analytics=1"),
        ("authorization", "Bearer t"),
        ("range", "bytes=0-1"),
    ] {
        let req = Request::get("/shared")
            .header(name, value)
            .body(Body::empty())
            .unwrap();
        send(&app, req).await;
        let a = send(&app, get_req("/shared")).await;
        let status = a.headers["cache-status"].to_str().unwrap().to_owned();
        assert!(
            status.contains("hit"),
            "after a request with {name}: {status}"
        );
        assert_eq!(a.body, "a product");
    }
}

async fn gone(State(o): State<Origin>) -> impl IntoResponse {
    o.calls.fetch_add(1, Ordering::SeqCst);
    (
        StatusCode::NOT_FOUND,
        [("cache-control", "max-age=60"), ("etag", "\"g1\"")],
        "no such product",
    )
}

/// Preconditions apply to 2xx answers only (RFC 9110 §13.2.1): a cached 404 is served as
/// a 404 to `If-None-Match: *` or to its own ETag, never as `304`.
#[tokio::test]
async fn a_cached_error_is_never_304() {
    let origin = Origin::default();
    let app = Router::new()
        .route("/gone", get(gone))
        .with_state(origin.clone())
        .layer(CacheLayer::builder().build());
    send(&app, get_req("/gone")).await;
    for condition in ["*", "\"g1\""] {
        let req = Request::get("/gone")
            .header("if-none-match", condition)
            .body(Body::empty())
            .unwrap();
        let a = send(&app, req).await;
        assert_eq!(
            a.status,
            StatusCode::NOT_FOUND,
            "If-None-Match: {condition}"
        );
        assert!(a.headers["cache-status"].to_str().unwrap().contains("hit"));
    }
    assert_eq!(origin.calls(), 1);
}

/// A successful unsafe method invalidates what is stored for its URI (RFC 9111 §4.4); a
/// failed one does not.
#[tokio::test]
async fn a_successful_write_invalidates_its_uri() {
    let origin = Origin::default();
    let app = Router::new()
        .route(
            "/product",
            get(product)
                .put(|| async { StatusCode::NO_CONTENT })
                .delete(|| async { StatusCode::INTERNAL_SERVER_ERROR }),
        )
        .with_state(origin.clone())
        .layer(CacheLayer::builder().build());
    send(&app, get_req("/product")).await;
    send(&app, get_req("/product")).await;
    assert_eq!(origin.calls(), 1);
    let failed = Request::delete("/product").body(Body::empty()).unwrap();
    assert_eq!(
        send(&app, failed).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    send(&app, get_req("/product")).await;
    assert_eq!(origin.calls(), 1, "a failed write changes nothing");
    let put = Request::put("/product").body(Body::empty()).unwrap();
    assert_eq!(send(&app, put).await.status, StatusCode::NO_CONTENT);
    let a = send(&app, get_req("/product")).await;
    assert!(
        a.headers["cache-status"]
            .to_str()
            .unwrap()
            .contains("fwd=uri-miss")
    );
    assert_eq!(origin.calls(), 2);
}

#[derive(Clone)]
struct Caller(&'static str);

async fn revalidating(
    State(o): State<Versioned>,
    headers: HeaderMap,
    caller: Option<axum::Extension<Caller>>,
) -> axum::response::Response {
    // Like a real origin: a matching condition is answered 304.
    if headers.contains_key("if-none-match") {
        return StatusCode::NOT_MODIFIED.into_response();
    }
    let n = o.calls.fetch_add(1, Ordering::SeqCst) + 1;
    let who = caller.map_or("nobody", |c| c.0.0);
    (
        [(
            "cache-control",
            "public, max-age=10, stale-while-revalidate=60",
        )],
        format!("v{n} for {who}"),
    )
        .into_response()
}

/// The background refresh of a stale entry asks for the whole representation (not the
/// client's condition, which a real origin answers `304`, storing nothing), and the handler
/// sees the request's extensions in it.
#[tokio::test]
async fn a_background_refresh_is_unconditional_and_keeps_the_extensions() {
    let origin = Versioned::default();
    let clock = TestClock::default();
    let c = clock.clone();
    let app = Router::new()
        .route("/r", get(revalidating))
        .with_state(origin.clone())
        .layer(CacheLayer::builder().clock(move || c.now()).build());
    let req = |condition: bool| {
        let mut b = Request::get("/r");
        if condition {
            b = b.header("if-none-match", "\"old\"");
        }
        let mut req = b.body(Body::empty()).unwrap();
        req.extensions_mut().insert(Caller("alice"));
        req
    };
    assert_eq!(send(&app, req(false)).await.body, "v1 for alice");
    clock.advance(20);
    let stale = send(&app, req(true)).await;
    assert!(
        stale.headers["cache-status"]
            .to_str()
            .unwrap()
            .contains("fwd=stale")
    );
    settle().await;
    let a = send(&app, req(false)).await;
    assert_eq!(a.body, "v2 for alice", "refreshed, with the extension");
}

/// `Cache-Control: only-if-cached`: a stored answer, or `504` without asking the origin
/// (RFC 9111 §5.2.1.7).
#[tokio::test]
async fn only_if_cached_is_a_hit_or_504() {
    let origin = Origin::default();
    let app = app(&origin);
    let only = || {
        Request::get("/product")
            .header("cache-control", "only-if-cached")
            .body(Body::empty())
            .unwrap()
    };
    let a = send(&app, only()).await;
    assert_eq!(a.status, StatusCode::GATEWAY_TIMEOUT, "{}", a.body);
    assert_eq!(origin.calls(), 0);
    send(&app, get_req("/product")).await;
    let a = send(&app, only()).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(origin.calls(), 1);
}

/// A body that sends its declared bytes and then never says it has ended.
struct Lingering(Option<bytes::Bytes>);

impl http_body::Body for Lingering {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        match self.0.take() {
            Some(data) => std::task::Poll::Ready(Some(Ok(http_body::Frame::data(data)))),
            None => std::task::Poll::Pending,
        }
    }
}

async fn lingering(State(o): State<Origin>) -> axum::response::Response {
    o.calls.fetch_add(1, Ordering::SeqCst);
    let mut res = axum::response::Response::new(Body::new(Lingering(Some(
        bytes::Bytes::from_static(b"whole"),
    ))));
    res.headers_mut()
        .insert("cache-control", "max-age=60".parse().unwrap());
    res.headers_mut()
        .insert("content-length", "5".parse().unwrap());
    res
}

/// A response whose body sent every declared byte but never says it has ended is relayed
/// whole, stored, and its fill ends: the next request is a hit (before, the fill read on
/// for ever, and the client's body never ended).
#[tokio::test]
async fn a_body_of_declared_length_that_lingers_is_stored() {
    let origin = Origin::default();
    let app = Router::new()
        .route("/lingering", get(lingering))
        .with_state(origin.clone())
        .layer(CacheLayer::builder().build());
    let first = tokio::time::timeout(Duration::from_secs(2), send(&app, get_req("/lingering")))
        .await
        .expect("the client's body ends");
    assert_eq!(first.body, "whole");
    let hit = send(&app, get_req("/lingering")).await;
    assert!(
        hit.headers["cache-status"]
            .to_str()
            .unwrap()
            .contains("hit")
    );
    assert_eq!(hit.body, "whole");
    assert_eq!(origin.calls(), 1);
}
