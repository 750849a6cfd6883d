//! One behaviour suite, run against the in-memory backend, one Redis node and a
//! three-master Redis Cluster; then what only Redis has: replicas sharing one limit,
//! one round trip per check, and what each failure policy does when Redis dies or stalls.

#![cfg(all(feature = "rate-limit", feature = "redis"))]

mod support;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use battlement::annotate::{Annotation, LimitSource, Record};
use battlement::body::ResponseBody;
use battlement::key::Header;
use battlement::rate_limit::{
    Clock, DefaultBackend, FailurePolicy, Quota, RateLimitBuilder, RateLimitLayer, RedisBackend,
};
use battlement::redis::{RedisConfig, RedisStore};
use bytes::Bytes;
use http::header::HeaderName;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use support::{RedisCluster, RedisServer};
use tower::util::BoxCloneService;
use tower::{ServiceBuilder, ServiceExt};

type Svc = BoxCloneService<Request<()>, Response<ResponseBody<Full<Bytes>>>, Infallible>;

const KEY: HeaderName = HeaderName::from_static("x-key");

#[derive(Clone)]
enum Store {
    Memory,
    Redis(RedisStore, FailurePolicy),
}

impl Store {
    fn label(&self) -> &'static str {
        match self {
            Store::Memory => "memory",
            Store::Redis(s, _) if s.config().is_cluster() => "cluster",
            Store::Redis(..) => "redis",
        }
    }

    fn service(&self, builder: RateLimitBuilder<Header, DefaultBackend>) -> Svc {
        let handler = tower::service_fn(|_req: Request<()>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        });
        match self {
            Store::Memory => {
                let layer = builder.build().expect("valid layer");
                BoxCloneService::new(ServiceBuilder::new().layer(layer).service(handler))
            }
            Store::Redis(store, failure) => {
                let backend = RedisBackend::new(store.clone()).on_failure(*failure);
                let layer = builder.backend(backend).build().expect("valid layer");
                BoxCloneService::new(ServiceBuilder::new().layer(layer).service(handler))
            }
        }
    }
}

fn builder(name: &str) -> RateLimitBuilder<Header, DefaultBackend> {
    RateLimitLayer::builder().name(name).key(Header::new(KEY))
}

struct Answer {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Bytes,
    record: Record,
}

impl Answer {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("problem+json body")
    }
    fn note(&self) -> &battlement::annotate::RateLimitNote {
        self.record.rate_limits.last().expect("a rate-limit note")
    }
}

async fn send(svc: &Svc, key: &str, extra: &[(&str, &str)]) -> Answer {
    send_method(svc, Method::GET, key, extra).await
}

async fn send_method(svc: &Svc, method: Method, key: &str, extra: &[(&str, &str)]) -> Answer {
    let annotation = Annotation::new();
    let mut b = Request::builder()
        .method(method)
        .uri("/thing")
        .header(KEY, key);
    for (k, v) in extra {
        b = b.header(*k, *v);
    }
    let mut req = b.body(()).unwrap();
    req.extensions_mut().insert(annotation.clone());
    // No request may hang, whatever the store does.
    let res = tokio::time::timeout(Duration::from_secs(2), svc.clone().oneshot(req))
        .await
        .expect("the request completed in time")
        .unwrap();
    let (parts, body) = res.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
        record: annotation.snapshot(),
    }
}

fn header<'a>(a: &'a Answer, name: &str) -> &'a str {
    a.headers
        .get(name)
        .unwrap_or_else(|| panic!("missing header {name}"))
        .to_str()
        .unwrap()
}

/// A unique name per case and run, so cases never share state in one Redis.
fn unique(case: &str, store: &Store) -> String {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{case}-{}-{n}-{}", store.label(), std::process::id())
}

async fn burst_then_refuse(store: &Store) {
    let svc = store.service(
        builder(&unique("burst", store))
            .policy("burst", Quota::requests_per(3, Duration::from_secs(60))),
    );
    for i in 0..3 {
        let a = send(&svc, "alice", &[]).await;
        assert_eq!(a.status, StatusCode::OK, "request {i}");
        assert!(a.note().allowed);
        assert_eq!(a.note().remaining, Some(2 - i));
    }
    let a = send(&svc, "alice", &[]).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&a, "content-type"), "application/problem+json");
    let retry: u64 = header(&a, "retry-after").parse().unwrap();
    assert!(
        (19..=20).contains(&retry),
        "retry-after {retry}: one request per 20 s, rounded up"
    );
    assert_eq!(header(&a, "ratelimit-policy"), "\"burst\";q=3;w=60");
    assert!(header(&a, "ratelimit").starts_with("\"burst\";r=0;t="));
    let doc = a.json();
    assert_eq!(doc["status"], 429);
    assert_eq!(
        doc["type"],
        "https://iana.org/assignments/http-problem-types#quota-exceeded"
    );
    assert_eq!(doc["violated-policies"], serde_json::json!(["burst"]));
    assert!(!a.note().allowed);
    assert_eq!(a.note().policy.as_deref(), Some("burst"));
    // Other keys are untouched.
    assert_eq!(send(&svc, "bob", &[]).await.status, StatusCode::OK);
}

async fn all_or_nothing(store: &Store) {
    let svc = store.service(
        builder(&unique("multi", store))
            .policy("wide", Quota::requests_per(5, Duration::from_secs(60)))
            .policy("narrow", Quota::requests_per(3, Duration::from_secs(60))),
    );
    for _ in 0..3 {
        assert_eq!(send(&svc, "k", &[]).await.status, StatusCode::OK);
    }
    // Refused by "narrow" three times: "wide" must not be charged for them.
    for _ in 0..3 {
        let a = send(&svc, "k", &[]).await;
        assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(a.json()["violated-policies"], serde_json::json!(["narrow"]));
        let limit = header(&a, "ratelimit");
        assert!(
            limit.starts_with("\"wide\";r=2;") && limit.contains("\"narrow\";r=0;"),
            "{limit}"
        );
    }
}

async fn cost_per_request(store: &Store) {
    let svc = store.service(
        builder(&unique("cost", store))
            .policy("p", Quota::requests_per(5, Duration::from_secs(60)))
            .cost(|req| {
                req.headers
                    .get("x-cost")
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .unwrap_or(1)
            }),
    );
    let a = send(&svc, "k", &[("x-cost", "3")]).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.note().remaining, Some(2));
    assert_eq!(
        send(&svc, "k", &[("x-cost", "3")]).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        send(&svc, "k", &[("x-cost", "2")]).await.status,
        StatusCode::OK
    );
    // Cost 0 is not counted; a cost over the burst can never pass and gets no Retry-After.
    assert_eq!(
        send(&svc, "k", &[("x-cost", "0")]).await.status,
        StatusCode::OK
    );
    let a = send(&svc, "fresh", &[("x-cost", "6")]).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(a.headers.get("retry-after").is_none());
    assert!(!a.note().allowed, "the refusal is in the annotation");
    assert_eq!(a.json()["violated-policies"], serde_json::json!(["p"]));
}

async fn exemptions_and_preflight(store: &Store) {
    let svc = store.service(
        builder(&unique("exempt", store))
            .policy("p", Quota::requests_per(1, Duration::from_secs(60)))
            .exempt(|req| req.headers.contains_key("x-internal")),
    );
    for _ in 0..5 {
        let a = send(&svc, "k", &[("x-internal", "1")]).await;
        assert_eq!(a.status, StatusCode::OK);
        assert!(
            a.record.rate_limits.is_empty(),
            "exempt requests are not annotated"
        );
        let a = send_method(
            &svc,
            Method::OPTIONS,
            "k",
            &[("access-control-request-method", "POST")],
        )
        .await;
        assert_eq!(a.status, StatusCode::OK, "preflight not counted");
    }
    assert_eq!(send(&svc, "k", &[]).await.status, StatusCode::OK);
    assert_eq!(
        send(&svc, "k", &[]).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    // A plain OPTIONS (not a preflight) counts.
    assert_eq!(
        send_method(&svc, Method::OPTIONS, "k", &[]).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    // No key: not limited.
    let handler_only = store.service(
        builder(&unique("nokey", store))
            .policy("p", Quota::requests_per(1, Duration::from_secs(60))),
    );
    for _ in 0..3 {
        let req = Request::builder().uri("/").body(()).unwrap();
        let res = handler_only.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
}

async fn shadow_mode(store: &Store) {
    let svc = store.service(
        builder(&unique("shadow", store))
            .policy("p", Quota::requests_per(2, Duration::from_secs(60)))
            .cost(|req| {
                req.headers
                    .get("x-cost")
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .unwrap_or(1)
            })
            .shadow(true),
    );
    // A cost no burst covers is refused in shadow too: recorded, never enforced.
    let a = send(&svc, "big", &[("x-cost", "9")]).await;
    assert_eq!(a.status, StatusCode::OK, "shadow mode never refuses");
    assert!(a.note().shadow && !a.note().allowed);
    assert_eq!(a.note().policy.as_deref(), Some("p"));
    let mut refused_in_shadow = 0;
    for _ in 0..6 {
        let a = send(&svc, "k", &[]).await;
        assert_eq!(a.status, StatusCode::OK, "shadow mode never refuses");
        assert!(a.note().shadow);
        if !a.note().allowed {
            refused_in_shadow += 1;
        }
    }
    assert_eq!(refused_in_shadow, 4);
}

async fn headers_on_success(store: &Store) {
    let svc = store.service(
        builder(&unique("hdrs", store))
            .policy("p", Quota::requests_per(10, Duration::from_secs(60)))
            .headers_on_success(true),
    );
    let a = send(&svc, "k", &[]).await;
    assert_eq!(header(&a, "ratelimit-policy"), "\"p\";q=10;w=60");
    assert_eq!(header(&a, "ratelimit"), "\"p\";r=9;t=6");
    let a = send(&svc, "k", &[]).await;
    assert_eq!(header(&a, "ratelimit"), "\"p\";r=8;t=12");
}

async fn refills_over_time(store: &Store) {
    // 10 per 5 s: one request comes back every 500 ms. After the burst and 1,250 ms more,
    // two or three have come back (three only if the burst and the wait took 250 ms
    // longer than planned), however busy the machine.
    let svc = store.service(
        builder(&unique("refill", store))
            .policy("p", Quota::requests_per(10, Duration::from_secs(5))),
    );
    for _ in 0..10 {
        assert_eq!(send(&svc, "k", &[]).await.status, StatusCode::OK);
    }
    assert_eq!(
        send(&svc, "k", &[]).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    tokio::time::sleep(Duration::from_millis(1_250)).await;
    let mut allowed = 0;
    for _ in 0..10 {
        if send(&svc, "k", &[]).await.status == StatusCode::OK {
            allowed += 1;
        }
    }
    assert!(
        (2..=3).contains(&allowed),
        "allowed {allowed} after 1,250 ms"
    );
}

async fn many_keys(store: &Store) {
    // Keys spread over every cluster slot range; each has its own bucket.
    let svc = store.service(
        builder(&unique("keys", store))
            .policy("p", Quota::requests_per(1, Duration::from_secs(60))),
    );
    for k in 0..60 {
        let key = format!("user-{k}");
        assert_eq!(send(&svc, &key, &[]).await.status, StatusCode::OK);
        assert_eq!(
            send(&svc, &key, &[]).await.status,
            StatusCode::TOO_MANY_REQUESTS
        );
    }
}

async fn suite(store: Store) {
    burst_then_refuse(&store).await;
    all_or_nothing(&store).await;
    cost_per_request(&store).await;
    exemptions_and_preflight(&store).await;
    shadow_mode(&store).await;
    headers_on_success(&store).await;
    refills_over_time(&store).await;
    many_keys(&store).await;
}

async fn connect(config: RedisConfig) -> RedisStore {
    RedisStore::connect(config)
        .await
        .expect("connect to the test Redis")
}

#[tokio::test]
async fn suite_memory() {
    suite(Store::Memory).await;
}

#[tokio::test]
async fn suite_one_redis_node() {
    let server = RedisServer::start();
    let store = connect(RedisConfig::single(server.url())).await;
    suite(Store::Redis(store, FailurePolicy::Closed)).await;
}

#[tokio::test]
async fn suite_redis_cluster() {
    let cluster = RedisCluster::start();
    let store = connect(RedisConfig::cluster(cluster.urls())).await;
    assert!(store.config().is_cluster());
    suite(Store::Redis(store, FailurePolicy::Closed)).await;
}

#[tokio::test]
async fn two_replicas_share_one_limit() {
    let server = RedisServer::start();
    // Two connections, two layers: two instances of the service.
    let a = Store::Redis(
        connect(RedisConfig::single(server.url())).await,
        FailurePolicy::Closed,
    );
    let b = Store::Redis(
        connect(RedisConfig::single(server.url())).await,
        FailurePolicy::Closed,
    );
    let quota = Quota::requests_per(5, Duration::from_secs(60));
    let svc_a = a.service(builder("shared").policy("p", quota));
    let svc_b = b.service(builder("shared").policy("p", quota));
    let mut allowed = 0;
    for i in 0..12 {
        let svc = if i % 2 == 0 { &svc_a } else { &svc_b };
        let ans = send(svc, "client", &[]).await;
        assert_eq!(ans.note().source, LimitSource::Redis);
        if ans.status == StatusCode::OK {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 5, "one combined limit across both replicas");
}

#[tokio::test]
async fn one_round_trip_per_check_and_keys_expire() {
    let server = RedisServer::start();
    let store = connect(RedisConfig::single(server.url())).await;
    let svc = Store::Redis(store.clone(), FailurePolicy::Closed).service(
        builder("trips")
            .policy("a", Quota::requests_per(100, Duration::from_secs(60)))
            .policy("b", Quota::requests_per(1000, Duration::from_secs(3600))),
    );
    // The first check loads the script (NOSCRIPT, SCRIPT LOAD, EVALSHA).
    send(&svc, "k", &[]).await;
    let calls = |name: &str| -> u64 {
        let info = server.info("commandstats");
        support::info_value(&info, &format!("cmdstat_{name}"))
            .and_then(|v| v.split(',').next()?.strip_prefix("calls=")?.parse().ok())
            .unwrap_or(0)
    };
    let total = || -> u64 {
        server
            .info("commandstats")
            .lines()
            .filter_map(|l| {
                l.split("calls=")
                    .nth(1)?
                    .split(',')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    };
    // Commands the script runs inside Redis are counted too; they are not round trips.
    let inside = |calls: &dyn Fn(&str) -> u64| {
        ["time", "hgetall", "hset", "pexpire"]
            .iter()
            .map(|c| calls(c))
            .sum::<u64>()
    };
    let before_eval = calls("evalsha");
    let before_inside = inside(&calls);
    let before_total = total();
    for _ in 0..20 {
        send(&svc, "k", &[]).await;
    }
    assert_eq!(calls("evalsha") - before_eval, 20, "one EVALSHA per check");
    let sent = (total() - before_total) - (inside(&calls) - before_inside);
    // 20 EVALSHA, plus this test's own INFO calls counted by the second total (the one
    // that took the first total, and the one that counted EVALSHA).
    assert_eq!(sent, 22, "and nothing else was sent");

    // The key expires when every bucket is full again (b: 21 requests of 3.6 s each).
    let key = store.key("rl:trips", &"k");
    let pttl: i64 = server.command(&["PTTL", &key]).trim().parse().unwrap();
    assert!(pttl > 70_000 && pttl <= 75_601, "pttl {pttl}");

    // A flushed script cache (restart, failover) is reloaded transparently.
    server.command(&["SCRIPT", "FLUSH"]);
    let a = send(&svc, "k", &[]).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.note().source, LimitSource::Redis);
}

fn fault_config(server: &RedisServer) -> RedisConfig {
    RedisConfig::single(server.url())
        .timeout(Duration::from_millis(50))
        .circuit_breaker(3, Duration::from_millis(200))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_policies_when_redis_dies_and_comes_back() {
    let mut server = RedisServer::start();
    let store = connect(fault_config(&server)).await;
    let quota = Quota::requests_per(4, Duration::from_secs(60));
    let open = Store::Redis(store.clone(), FailurePolicy::Open)
        .service(builder("open").policy("p", quota));
    let closed = Store::Redis(store.clone(), FailurePolicy::Closed)
        .service(builder("closed").policy("p", quota));
    let local = Store::Redis(store.clone(), FailurePolicy::Local { replicas: 2 })
        .service(builder("local").policy("p", quota));
    for svc in [&open, &closed, &local] {
        let a = send(svc, "k", &[]).await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.note().source, LimitSource::Redis);
    }

    server.stop();

    for _ in 0..8 {
        let a = send(&open, "k", &[]).await;
        assert_eq!(
            a.status,
            StatusCode::OK,
            "fail open lets everything through"
        );
        assert_eq!(a.note().source, LimitSource::FailOpen);
    }
    for _ in 0..3 {
        let a = send(&closed, "k", &[]).await;
        assert_eq!(
            a.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "fail closed refuses"
        );
        assert_eq!(header(&a, "retry-after"), "1");
        assert_eq!(a.json()["status"], 503);
        assert_eq!(a.note().source, LimitSource::FailClosed);
    }
    // Local: the quota of 4 split between 2 replicas is 2 per instance.
    let mut allowed = 0;
    for _ in 0..6 {
        let a = send(&local, "k", &[]).await;
        assert_eq!(a.note().source, LimitSource::LocalFallback);
        if a.status == StatusCode::OK {
            allowed += 1;
        } else {
            assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
        }
    }
    assert_eq!(allowed, 2);

    server.restart();

    // Back to Redis by itself: within a few breaker cool-downs, decisions come from Redis.
    let mut back = false;
    for _ in 0..100 {
        let a = send(&closed, "k2", &[]).await;
        if a.note().source == LimitSource::Redis {
            assert_eq!(a.status, StatusCode::OK);
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(back, "limiting resumed on Redis after it came back");
    // The restarted Redis kept nothing, so the limit starts over there.
    let a = send(&local, "k", &[]).await;
    assert_eq!(a.note().source, LimitSource::Redis);
    assert_eq!(a.note().remaining, Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_redis_costs_at_most_the_timeout() {
    let server = RedisServer::start();
    let store = connect(fault_config(&server)).await;
    let svc = Store::Redis(store.clone(), FailurePolicy::Local { replicas: 1 })
        .service(builder("stall").policy("p", Quota::requests_per(100, Duration::from_secs(60))));
    assert_eq!(send(&svc, "k", &[]).await.note().source, LimitSource::Redis);

    server.pause(Duration::from_secs(3));
    let started = std::time::Instant::now();
    for _ in 0..5 {
        let a = send(&svc, "k", &[]).await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.note().source, LimitSource::LocalFallback);
    }
    // Five requests against a Redis that answers nothing for 3 s: each waited for the
    // 50 ms timeout at most (or not at all, once the breaker opened), far from 3 s.
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "took {:?}",
        started.elapsed()
    );
    let _ = Arc::new(store);
}

#[tokio::test(start_paused = true)]
async fn memory_layer_follows_gcra_with_paused_time() {
    // 6 per minute, burst 2: two at once, then one every 10 s.
    let svc = Store::Memory.service(builder("paused").clock(Clock::tokio()).policy(
        "p",
        Quota::requests_per(6, Duration::from_secs(60)).with_burst(2),
    ));
    assert_eq!(send(&svc, "k", &[]).await.status, StatusCode::OK);
    assert_eq!(send(&svc, "k", &[]).await.status, StatusCode::OK);
    let a = send(&svc, "k", &[]).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&a, "retry-after"), "10");
    assert_eq!(header(&a, "ratelimit-policy"), "\"p\";q=2;w=20");
    tokio::time::advance(Duration::from_millis(9_999)).await;
    let a = send(&svc, "k", &[]).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        header(&a, "retry-after"),
        "1",
        "1 ms left rounds up to a whole second"
    );
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(send(&svc, "k", &[]).await.status, StatusCode::OK);
    assert_eq!(
        send(&svc, "k", &[]).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    tokio::time::advance(Duration::from_secs(20)).await;
    let a = send(&svc, "k", &[]).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.note().remaining, Some(1), "full again after 20 s");
}

#[tokio::test]
async fn memory_layer_stays_bounded_under_key_floods() {
    let layer = RateLimitLayer::builder()
        .name("bounded")
        .key(Header::new(KEY))
        .policy("p", Quota::requests_per(2, Duration::from_secs(60)))
        .max_keys(500)
        // A clock that never moves: no key can become idle during the flood.
        .clock(Clock::manual().0)
        .build()
        .unwrap();
    let handler = tower::service_fn(|_req: Request<()>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
    });
    let svc: Svc =
        BoxCloneService::new(ServiceBuilder::new().layer(layer.clone()).service(handler));
    // A key being limited ...
    send(&svc, "victim", &[]).await;
    send(&svc, "victim", &[]).await;
    assert_eq!(
        send(&svc, "victim", &[]).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    // ... then ten times the cap in new keys.
    let mut overflow = 0;
    for k in 0..5_000 {
        let a = send(&svc, &format!("flood-{k}"), &[]).await;
        if a.note().source == LimitSource::Overflow {
            overflow += 1;
        }
    }
    assert_eq!(
        layer.backend().tracked_keys(),
        500,
        "tracked keys stay at the cap"
    );
    assert!(
        overflow > 4_000,
        "new keys beyond the cap share the overflow bucket"
    );
    let a = send(&svc, "victim", &[]).await;
    assert_eq!(
        a.status,
        StatusCode::TOO_MANY_REQUESTS,
        "the limited key stays limited"
    );
    assert_eq!(a.note().source, LimitSource::Memory);
}

/// The native body mode on Redis: the check waits on Redis (the layer's slower path), and
/// both the passed response and the refusal carry the handler's own body type.
#[tokio::test]
async fn native_body_on_redis_passes_and_refuses_with_the_inner_body_type() {
    let server = RedisServer::start();
    let store = connect(RedisConfig::single(server.url())).await;
    let layer = builder("native")
        .policy("burst", Quota::requests_per(2, Duration::from_secs(60)))
        .native_body()
        .backend(RedisBackend::new(store).on_failure(FailurePolicy::Closed))
        .build()
        .expect("valid layer");
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(tower::service_fn(|_req: Request<()>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        }));
    for i in 0..3 {
        let req = Request::builder()
            .uri("/thing")
            .header(KEY, "k")
            .body(())
            .unwrap();
        // The response body is the handler's `Full<Bytes>`: no wrapper.
        let res: Response<Full<Bytes>> = svc.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        if i < 2 {
            assert_eq!(
                (status, &body[..]),
                (StatusCode::OK, &b"ok"[..]),
                "request {i}"
            );
        } else {
            assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
            let doc: serde_json::Value = serde_json::from_slice(&body).expect("problem+json");
            assert_eq!(doc["status"], 429);
            assert_eq!(doc["violated-policies"], serde_json::json!(["burst"]));
        }
    }
}

/// Quotas changed while the layer runs (`set_quota`), in memory and on Redis: a larger
/// burst gives a limited key room at once, the `RateLimit-Policy` header follows, and a
/// smaller quota limits sooner; unknown policies and impossible quotas are refused.
#[tokio::test]
async fn quotas_change_while_the_layer_runs() {
    let server = RedisServer::start();
    let store = connect(RedisConfig::single(server.url())).await;
    let handler = || {
        tower::service_fn(|_req: Request<()>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
        })
    };
    let two = Quota::requests_per(2, Duration::from_secs(60));
    let memory = builder("swap-memory").policy("burst", two).build().unwrap();
    let redis = builder("swap-redis")
        .policy("burst", two)
        .backend(RedisBackend::new(store).on_failure(FailurePolicy::Closed))
        .build()
        .unwrap();
    type SetQuota = Box<dyn Fn(&str, Quota) -> Result<(), battlement::rate_limit::ConfigError>>;
    let services: [(&str, Svc, SetQuota); 2] = [
        (
            "memory",
            BoxCloneService::new(
                ServiceBuilder::new()
                    .layer(memory.clone())
                    .service(handler()),
            ),
            Box::new(move |p: &str, q: Quota| memory.set_quota(p, q)),
        ),
        (
            "redis",
            BoxCloneService::new(
                ServiceBuilder::new()
                    .layer(redis.clone())
                    .service(handler()),
            ),
            Box::new(move |p: &str, q: Quota| redis.set_quota(p, q)),
        ),
    ];
    for (label, svc, set_quota) in &services {
        for i in 0..2 {
            assert_eq!(
                send(svc, "k", &[]).await.status,
                StatusCode::OK,
                "{label} {i}"
            );
        }
        let refused = send(svc, "k", &[]).await;
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS, "{label}");
        assert_eq!(header(&refused, "ratelimit-policy"), r#""burst";q=2;w=60"#);

        // Twice the burst at the same rate: two more at once, then refused again.
        set_quota("burst", two.with_burst(4)).unwrap();
        for i in 0..2 {
            assert_eq!(
                send(svc, "k", &[]).await.status,
                StatusCode::OK,
                "{label} raised {i}"
            );
        }
        let refused = send(svc, "k", &[]).await;
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS, "{label}");
        assert_eq!(header(&refused, "ratelimit-policy"), r#""burst";q=4;w=120"#);

        // One an hour: a fresh key gets one request.
        set_quota("burst", Quota::requests_per(1, Duration::from_secs(3600))).unwrap();
        assert_eq!(
            send(svc, "fresh", &[]).await.status,
            StatusCode::OK,
            "{label}"
        );
        let refused = send(svc, "fresh", &[]).await;
        assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS, "{label}");
        assert_eq!(
            header(&refused, "ratelimit-policy"),
            r#""burst";q=1;w=3600"#
        );

        assert_eq!(
            set_quota("daily", two),
            Err(battlement::rate_limit::ConfigError::UnknownPolicy(
                "daily".into()
            ))
        );
        assert!(matches!(
            set_quota("burst", Quota::requests_per(0, Duration::from_secs(1))),
            Err(battlement::rate_limit::ConfigError::InvalidQuota(..))
        ));
        // A refused change leaves the quota as it was.
        assert_eq!(
            send(svc, "fresh", &[]).await.status,
            StatusCode::TOO_MANY_REQUESTS
        );

        // A faster rate gives a limited key its room back at the new pace: 2 a minute
        // spent, then 2 a second. The next request finds the bucket full and is told to
        // come back within a second; half a second on, one more passes (with the old
        // minute-long window kept, it would wait the minute out).
        set_quota("burst", two).unwrap();
        for _ in 0..2 {
            assert_eq!(send(svc, "sped", &[]).await.status, StatusCode::OK);
        }
        assert_eq!(
            send(svc, "sped", &[]).await.status,
            StatusCode::TOO_MANY_REQUESTS
        );
        set_quota("burst", Quota::requests_per(2, Duration::from_secs(1))).unwrap();
        let full = send(svc, "sped", &[]).await;
        assert_eq!(full.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(header(&full, "retry-after"), "1", "{label}");
        tokio::time::sleep(Duration::from_millis(700)).await;
        let sped = send(svc, "sped", &[]).await;
        assert_eq!(
            sped.status,
            StatusCode::OK,
            "{label}: faster rate, still locked out"
        );
    }
}

/// A Redis that answers but cannot serve (here a read-only replica of a primary that is
/// not there, as a demoted primary after a failover; `LOADING` and `CLUSTERDOWN` are
/// alike) is an outage: the breaker opens, and the failure policy answers without asking
/// it each time. It closes again once Redis serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_redis_opens_the_breaker() {
    let server = RedisServer::start();
    let store = connect(fault_config(&server)).await;
    let svc = Store::Redis(store.clone(), FailurePolicy::Closed).service(
        builder("readonly").policy("p", Quota::requests_per(100, Duration::from_secs(60))),
    );
    assert_eq!(send(&svc, "k", &[]).await.status, StatusCode::OK);
    let nowhere = support::free_port().to_string();
    assert_eq!(server.command(&["REPLICAOF", "127.0.0.1", &nowhere]), "OK");
    for _ in 0..3 {
        let a = send(&svc, "k", &[]).await;
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(
        store.breaker_state(),
        battlement::redis::BreakerState::Open,
        "READONLY answers are failures"
    );
    assert_eq!(server.command(&["REPLICAOF", "NO", "ONE"]), "OK");
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(send(&svc, "k", &[]).await.status, StatusCode::OK);
    assert_eq!(
        store.breaker_state(),
        battlement::redis::BreakerState::Closed
    );
}

/// A failover behind the name the store dials (a DNS name, a virtual IP, a managed
/// primary endpoint; here a TCP proxy): the old primary becomes a replica and answers
/// `READONLY` on the connection the store already has, which redis-rs keeps. The store
/// dials the name again and reaches the new primary, and limits are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_behind_the_dialled_name_is_followed() {
    let old = RedisServer::start();
    let new = RedisServer::start();
    let port = old.port().to_string();
    assert_eq!(new.command(&["REPLICAOF", "127.0.0.1", &port]), "OK");
    let proxy = support::TcpProxy::start(&old.addr());
    let store = connect(
        RedisConfig::single(proxy.url())
            .timeout(Duration::from_millis(100))
            .circuit_breaker(3, Duration::from_millis(200)),
    )
    .await;
    let svc = Store::Redis(store.clone(), FailurePolicy::Closed).service(
        builder("failover").policy("p", Quota::requests_per(1000, Duration::from_secs(60))),
    );
    assert_eq!(send(&svc, "k", &[]).await.status, StatusCode::OK);

    // The failover: the replica is promoted, the old primary follows it, and the name now
    // leads to the new primary.
    assert_eq!(new.command(&["REPLICAOF", "NO", "ONE"]), "OK");
    let port = new.port().to_string();
    assert_eq!(old.command(&["REPLICAOF", "127.0.0.1", &port]), "OK");
    proxy.set_target(&new.addr());

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut refused = 0;
    loop {
        let status = send(&svc, "after", &[]).await.status;
        if status == StatusCode::OK {
            break;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        refused += 1;
        assert!(
            std::time::Instant::now() < deadline,
            "still refused after {refused} requests: the store kept the demoted primary"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(refused > 0, "the old connection answered READONLY first");
    let key = store.key("rl:failover", &"after");
    assert_eq!(
        new.command(&["EXISTS", &key]),
        "1",
        "the check was written on the new primary"
    );
}

/// Sends until a check is answered `200` (the store has found the new master), failing
/// after `limit`; returns how many were refused first.
async fn until_served(svc: &Svc, key: &str, limit: Duration, sentinel: &support::Sentinel) -> u32 {
    let deadline = std::time::Instant::now() + limit;
    let mut refused = 0;
    loop {
        let status = send(svc, key, &[]).await.status;
        if status == StatusCode::OK {
            return refused;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        refused += 1;
        assert!(
            std::time::Instant::now() < deadline,
            "still refused after {refused} requests; sentinel log:\n{}",
            sentinel.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn sentinel_store_config(sentinel: &support::Sentinel) -> RedisConfig {
    // The URL form, as in `REDIS_URL`.
    RedisConfig::from_list(&format!("redis+sentinel://{}/orders", sentinel.addr()))
        .unwrap()
        .timeout(Duration::from_millis(200))
        .circuit_breaker(3, Duration::from_millis(200))
}

/// Through Redis Sentinel: the store asks for the master, and after a failover (the old
/// master demoted to a replica, answering `READONLY`) asks again and serves from the new
/// one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_is_followed() {
    let (master, replica, sentinel) = support::Sentinel::with_pair("orders");
    let store = connect(sentinel_store_config(&sentinel)).await;
    let svc = Store::Redis(store.clone(), FailurePolicy::Closed).service(
        builder("sentinel").policy("p", Quota::requests_per(1000, Duration::from_secs(60))),
    );
    assert_eq!(send(&svc, "before", &[]).await.status, StatusCode::OK);
    let key = |k: &str| store.key("rl:sentinel", &k);
    assert_eq!(master.command(&["EXISTS", &key("before")]), "1");

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let answer = sentinel.command(&["SENTINEL", "FAILOVER", "orders"]);
        if answer == "OK" {
            break;
        }
        // NOGOODSLAVE until the Sentinel has its replica's details.
        assert!(std::time::Instant::now() < deadline, "{answer}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The Sentinel promotes the replica, then turns the old master into its replica
    // (until then the old master still takes writes: Redis's failover window).
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while sentinel.master_port("orders") != replica.port()
        || master.info_field("replication", "role").as_deref() != Some("slave")
    {
        assert!(std::time::Instant::now() < deadline, "{}", sentinel.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    until_served(&svc, "after", Duration::from_secs(15), &sentinel).await;
    assert_eq!(replica.command(&["EXISTS", &key("after")]), "1");
    assert_eq!(
        replica.info_field("replication", "role").as_deref(),
        Some("master")
    );
}

/// Through Redis Sentinel, the master killed: calls fail to connect until the Sentinel
/// has promoted the replica; the store asks again and serves from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_promotion_after_the_master_dies_is_followed() {
    let (mut master, replica, sentinel) = support::Sentinel::with_pair("orders");
    let store = connect(sentinel_store_config(&sentinel)).await;
    let svc = Store::Redis(store.clone(), FailurePolicy::Closed).service(
        builder("sentinel").policy("p", Quota::requests_per(1000, Duration::from_secs(60))),
    );
    assert_eq!(send(&svc, "before", &[]).await.status, StatusCode::OK);
    master.stop();
    let refused = until_served(&svc, "after", Duration::from_secs(30), &sentinel).await;
    assert!(refused > 0, "the dead master refused first");
    assert_eq!(sentinel.master_port("orders"), replica.port());
    let key = store.key("rl:sentinel", &"after");
    assert_eq!(replica.command(&["EXISTS", &key]), "1");
}

/// Through Redis Sentinel, a master that is only slow (calls time out, the Sentinels still
/// name it): the store keeps its connection rather than open a new one every second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_slowness_opens_no_new_connections() {
    let (master, _replica, sentinel) = support::Sentinel::with_pair("orders");
    let store = connect(sentinel_store_config(&sentinel)).await;
    let svc = Store::Redis(store.clone(), FailurePolicy::Closed).service(
        builder("slow").policy("p", Quota::requests_per(100_000, Duration::from_secs(60))),
    );
    assert_eq!(send(&svc, "k", &[]).await.status, StatusCode::OK);
    let connections = || {
        master
            .info_field("stats", "total_connections_received")
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap()
    };
    let before = connections();
    // Writes wait 2.5 s (shorter than the Sentinel's down-after: no failover); every call
    // meanwhile times out.
    master.pause_writes(Duration::from_millis(2500));
    let until = std::time::Instant::now() + Duration::from_millis(2500);
    let mut timed_out = 0;
    while std::time::Instant::now() < until {
        if send(&svc, "k", &[]).await.status == StatusCode::SERVICE_UNAVAILABLE {
            timed_out += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(timed_out > 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(send(&svc, "k", &[]).await.status, StatusCode::OK);
    // New connections: this test's own (the pause, and the INFO below), none of the
    // store's.
    let after = connections();
    assert!(
        after <= before + 2,
        "{} new connections to the master: {}",
        after - before,
        master.command(&["CLIENT", "LIST"])
    );
}

/// A Sentinel with a wrong view (cut off from the others, or here set up to watch the
/// replica) names a node that is not a master: the store checks the node's `ROLE` and asks
/// the next Sentinel instead of sending every write to a replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_naming_a_replica_is_passed_over() {
    let (master, replica, good) = support::Sentinel::with_pair("orders");
    let stale = support::Sentinel::start("orders", &replica);
    assert_eq!(stale.master_port("orders"), replica.port());
    let store = connect(
        RedisConfig::sentinel("orders", [stale.url(), good.url()])
            .timeout(Duration::from_millis(200)),
    )
    .await;
    let svc = Store::Redis(store.clone(), FailurePolicy::Closed)
        .service(builder("stale").policy("p", Quota::requests_per(1000, Duration::from_secs(60))));
    assert_eq!(send(&svc, "k", &[]).await.status, StatusCode::OK);
    let key = store.key("rl:stale", &"k");
    assert_eq!(master.command(&["EXISTS", &key]), "1");
}

/// A Sentinel that knows no such master is a configuration error at connect, named.
#[tokio::test]
async fn an_unknown_sentinel_master_is_refused_at_connect() {
    let (_master, _replica, sentinel) = support::Sentinel::with_pair("orders");
    let error = RedisStore::connect(RedisConfig::sentinel("nope", [sentinel.url()]))
        .await
        .expect_err("no master named nope");
    assert!(error.to_string().contains("\"nope\""), "{error}");
}

/// Two layers (or replicas of two versions, one with a policy more) sharing a key name:
/// each keeps the key alive as long as its own buckets need, never cutting short another's
/// (a one-second burst policy must not expire a daily policy's state).
#[tokio::test]
async fn a_short_policy_never_expires_a_longer_one_sharing_its_key() {
    let server = RedisServer::start();
    let store = connect(RedisConfig::single(server.url())).await;
    let daily = Store::Redis(store.clone(), FailurePolicy::Closed).service(
        builder("shared").policy("daily", Quota::requests_per(3, Duration::from_secs(86_400))),
    );
    let burst = Store::Redis(store.clone(), FailurePolicy::Closed).service(
        builder("shared").policy("burst", Quota::requests_per(10, Duration::from_secs(1))),
    );
    assert_eq!(send(&daily, "k", &[]).await.status, StatusCode::OK);
    assert_eq!(send(&burst, "k", &[]).await.status, StatusCode::OK);
    let key = store.key("rl:shared", &"k");
    let pttl: i64 = server.command(&["PTTL", &key]).trim().parse().unwrap();
    assert!(
        pttl > 20_000_000,
        "the daily bucket's state expires in {pttl} ms"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..2 {
        assert_eq!(send(&daily, "k", &[]).await.status, StatusCode::OK);
    }
    assert_eq!(
        send(&daily, "k", &[]).await.status,
        StatusCode::TOO_MANY_REQUESTS,
        "the daily quota was forgotten"
    );
}

/// With Redis down and the local fallback on a share of the quota, a request costing more
/// than the local share (but within the whole burst) is charged the whole local share
/// rather than refused for ever with a `Retry-After` that can never come true.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_fallback_charges_a_costly_request_its_whole_share() {
    let mut server = RedisServer::start();
    let store = connect(fault_config(&server)).await;
    let svc = Store::Redis(store, FailurePolicy::Local { replicas: 2 }).service(
        builder("costly")
            .policy("p", Quota::requests_per(4, Duration::from_secs(60)))
            .cost(|req| {
                req.headers
                    .get("x-cost")
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .unwrap_or(1)
            }),
    );
    server.stop();
    let a = send(&svc, "k", &[("x-cost", "3")]).await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.note());
    assert_eq!(a.note().source, LimitSource::LocalFallback);
    let a = send(&svc, "k", &[]).await;
    assert_eq!(
        a.status,
        StatusCode::TOO_MANY_REQUESTS,
        "the share was spent"
    );
}

/// A store configuration is checked and bounded: a key prefix with braces (it would move
/// every key's hash tag, and break multi-key scripts on a cluster) is refused, and
/// "forever" timeouts and cool-downs are cut rather than overflow (which panicked on the
/// breaker's fifth failure).
#[tokio::test]
async fn store_configuration_is_checked_and_bounded() {
    let mut server = RedisServer::start();
    for prefix in ["svc{", "{svc}", ""] {
        let refused = RedisStore::connect(RedisConfig::single(server.url()).prefix(prefix)).await;
        assert!(
            matches!(refused, Err(battlement::redis::StoreError::Config(_))),
            "prefix {prefix:?}: {refused:?}"
        );
    }
    let store = connect(
        RedisConfig::single(server.url())
            .timeout(Duration::from_millis(100))
            .connect_timeout(Duration::MAX)
            .circuit_breaker(1, Duration::MAX),
    )
    .await;
    let svc = Store::Redis(store.clone(), FailurePolicy::Closed)
        .service(builder("bounded").policy("p", Quota::requests_per(10, Duration::from_secs(60))));
    assert_eq!(send(&svc, "k", &[]).await.status, StatusCode::OK);
    server.stop();
    for _ in 0..3 {
        assert_eq!(
            send(&svc, "k", &[]).await.status,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
    assert_eq!(store.breaker_state(), battlement::redis::BreakerState::Open);
}

/// One URL that names a node of a Redis Cluster connects to the whole cluster (as a single
/// node, keys in the other nodes' slots would be refused with MOVED).
#[tokio::test]
async fn a_single_url_of_a_cluster_node_is_the_cluster() {
    let cluster = support::RedisCluster::start();
    let store = connect(RedisConfig::single(cluster.urls()[0].clone())).await;
    assert!(store.config().is_cluster());
    let svc = Store::Redis(store, FailurePolicy::Closed)
        .service(builder("seeded").policy("p", Quota::requests_per(10, Duration::from_secs(60))));
    for i in 0..30 {
        let a = send(&svc, &format!("key-{i}"), &[]).await;
        assert_eq!(a.status, StatusCode::OK, "key-{i}");
        assert_eq!(a.note().source, LimitSource::Redis);
    }
}
