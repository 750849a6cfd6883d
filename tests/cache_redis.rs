//! The cache on a real Redis: two layer instances (two replicas) share entries, and a Redis
//! that goes away turns hits into origin calls, never into errors.

#![cfg(all(feature = "cache", feature = "redis", feature = "axum"))]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use battlement::cache::CacheLayer;
use battlement::redis::{RedisConfig, RedisStore};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use support::RedisServer;
use tower::ServiceExt;

#[derive(Clone, Default)]
struct Origin(Arc<AtomicUsize>);

async fn product(State(o): State<Origin>) -> impl IntoResponse {
    o.0.fetch_add(1, Ordering::SeqCst);
    (
        [("cache-control", "public, max-age=300"), ("etag", "\"v1\"")],
        "a product from the origin",
    )
}

async fn replica(redis: &RedisServer, origin: &Origin) -> Router {
    let store = RedisStore::connect(RedisConfig::single(redis.url()))
        .await
        .unwrap();
    Router::new()
        .route("/products/{id}", get(product))
        .with_state(origin.clone())
        .layer(CacheLayer::builder().redis(store).build())
}

/// A store with a generous timeout: these tests are about coordination, and on a loaded
/// machine a call slower than the default 50 ms would (by design) let a replica go on
/// without the store.
async fn patient_store(redis: &RedisServer) -> RedisStore {
    RedisStore::connect(RedisConfig::single(redis.url()).timeout(Duration::from_secs(1)))
        .await
        .unwrap()
}

/// Asks `app` for `uri` every 20 ms until the answer is not a hit; fails with `what` after
/// 3 s.
async fn until_a_miss(app: &Router, uri: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (_, _, cache) = get_body(app, uri).await;
        if !cache.contains("hit") {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {cache}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn get_body(app: &Router, uri: &str) -> (StatusCode, String, String) {
    let res = app
        .clone()
        .oneshot(Request::get(uri).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = res.status();
    let cache_status = res
        .headers()
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body =
        String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    (status, body, cache_status)
}

/// Waits until an entry written after a response's body reaches Redis (fill claims, which
/// exist while the origin answers, do not count).
async fn stored(redis: &RedisServer) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let keys = redis.command(&["KEYS", "battlement:cache:*"]);
        if keys.lines().any(|k| !k.is_empty() && !k.ends_with(":fill")) {
            return;
        }
        assert!(Instant::now() < deadline, "nothing was stored in Redis");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_cache() {
    let redis = RedisServer::start();
    let origin = Origin::default();
    let a = replica(&redis, &origin).await;
    let b = replica(&redis, &origin).await;
    let (status, body, cache) = get_body(&a, "/products/7").await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "a product from the origin")
    );
    assert!(cache.contains("fwd=uri-miss"), "{cache}");
    stored(&redis).await;
    // The other replica answers from Redis.
    let (_, body, cache) = get_body(&b, "/products/7").await;
    assert_eq!(body, "a product from the origin");
    assert!(cache.contains("hit"), "{cache}");
    assert_eq!(origin.0.load(Ordering::SeqCst), 1);
    // Keys in Redis are fixed-length hashes under the prefix, no client bytes.
    let keys = redis.command(&["KEYS", "*"]);
    assert!(
        keys.lines().all(|k| k.starts_with("battlement:cache:")),
        "{keys}"
    );
    assert!(!keys.contains("products"), "{keys}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_sends_requests_to_the_origin() {
    let mut redis = RedisServer::start();
    let origin = Origin::default();
    let app = replica(&redis, &origin).await;
    get_body(&app, "/products/1").await;
    stored(&redis).await;
    let (_, _, cache) = get_body(&app, "/products/1").await;
    assert!(cache.contains("hit"));
    redis.stop();
    for _ in 0..5 {
        let started = Instant::now();
        let (status, body, _) = get_body(&app, "/products/1").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "a product from the origin");
        // Bounded by the store timeout and the breaker, not by TCP timeouts.
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    assert!(origin.0.load(Ordering::SeqCst) >= 6);
    redis.restart();
    // Back to caching by itself.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        get_body(&app, "/products/2").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (_, _, cache) = get_body(&app, "/products/2").await;
        if cache.contains("hit") {
            break;
        }
        assert!(Instant::now() < deadline, "caching did not resume");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn slow_product(State(o): State<Origin>) -> impl IntoResponse {
    o.0.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await;
    ([("cache-control", "public, max-age=300")], "slow product")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_misses_across_two_replicas_make_one_origin_call() {
    let redis = RedisServer::start();
    let origin = Origin::default();
    let mut replicas = Vec::new();
    for _ in 0..2 {
        // A generous store timeout: this test is about coordination, and on a loaded
        // machine a fill claim slower than the default 50 ms would (by design) let a
        // replica fill without it.
        let store = patient_store(&redis).await;
        replicas.push(
            Router::new()
                .route("/slow", get(slow_product))
                .with_state(origin.clone())
                .layer(CacheLayer::builder().redis(store).build()),
        );
    }
    let mut set = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let app = replicas[i % 2].clone();
        set.spawn(async move { get_body(&app, "/slow").await });
    }
    while let Some(answer) = set.join_next().await {
        let (status, body, _) = answer.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "slow product");
    }
    assert_eq!(origin.0.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_on_one_replica_reaches_the_memory_tier_of_another() {
    let redis = RedisServer::start();
    purge_reaches_the_memory_tier(&redis, || RedisConfig::single(redis.url())).await;
}

/// Through Redis Sentinel: entries and purge messages on the master it names (the purge
/// listener subscribes there, not on the Sentinel).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_reaches_the_memory_tier_of_another_through_sentinel() {
    let (master, _replica, sentinel) = support::Sentinel::with_pair("cache");
    purge_reaches_the_memory_tier(&master, || RedisConfig::sentinel("cache", [sentinel.url()]))
        .await;
}

async fn purge_reaches_the_memory_tier(redis: &RedisServer, config: impl Fn() -> RedisConfig) {
    let origin = Origin::default();
    let mut layers = Vec::new();
    let mut apps = Vec::new();
    for _ in 0..2 {
        let store = RedisStore::connect(config()).await.unwrap();
        let layer = CacheLayer::builder().tiered(store).build();
        apps.push(
            Router::new()
                .route("/products/{id}", get(product))
                .with_state(origin.clone())
                .layer(layer.clone()),
        );
        layers.push(layer);
    }
    // Give both subscribers time to subscribe.
    tokio::time::sleep(Duration::from_millis(200)).await;
    get_body(&apps[0], "/products/9").await;
    stored(redis).await;
    // Replica 1 reads it from Redis into its memory tier, then serves it from there.
    let (_, _, cache) = get_body(&apps[1], "/products/9").await;
    assert!(cache.contains("hit"), "{cache}");
    let (_, _, cache) = get_body(&apps[1], "/products/9").await;
    assert!(cache.contains("hit"), "{cache}");
    assert_eq!(origin.0.load(Ordering::SeqCst), 1);
    // Purged on replica 0: replica 1's memory tier hears of it.
    layers[0].purge("/products/9", None).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (_, _, cache) = get_body(&apps[1], "/products/9").await;
        if cache.contains("fwd=uri-miss") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the purge never reached replica 1: {cache}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(origin.0.load(Ordering::SeqCst), 2);
}

async fn tagged(State(o): State<Origin>) -> impl IntoResponse {
    o.0.fetch_add(1, Ordering::SeqCst);
    (
        [
            ("cache-control", "public, max-age=300"),
            ("cache-tag", "catalog, product-3"),
        ],
        "tagged product",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_purge_on_one_replica_reaches_the_others() {
    let redis = RedisServer::start();
    let origin = Origin::default();
    let mut layers = Vec::new();
    let mut apps = Vec::new();
    for tiered in [true, false] {
        let store = RedisStore::connect(RedisConfig::single(redis.url()))
            .await
            .unwrap();
        let builder = CacheLayer::builder();
        let layer = if tiered {
            builder.tiered(store).build()
        } else {
            builder.redis(store).build()
        };
        apps.push(
            Router::new()
                .route("/t", get(tagged))
                .with_state(origin.clone())
                .layer(layer.clone()),
        );
        layers.push(layer);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    get_body(&apps[0], "/t").await;
    stored(&redis).await;
    for app in &apps {
        let (_, body, cache) = get_body(app, "/t").await;
        assert_eq!(body, "tagged product");
        assert!(cache.contains("hit"), "{cache}");
    }
    assert_eq!(origin.0.load(Ordering::SeqCst), 1);
    // Purged on the plain-Redis replica; the tiered one hears it.
    layers[1].purge_tag("product-3").await;
    until_a_miss(&apps[0], "/t", "the tag purge never reached replica 0").await;
    assert!(origin.0.load(Ordering::SeqCst) >= 2);
}

/// A tag purge that cannot reach Redis did not happen: the replica that tried must not
/// run its own version of the tag ahead of Redis's, or the entries it stores meanwhile
/// would carry the version of the next real purge and survive it everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_purge_that_fails_never_lets_entries_outlive_the_next() {
    let redis = RedisServer::start();
    let origin = Origin::default();
    let app = |store: RedisStore| {
        let layer = CacheLayer::builder().redis(store).build();
        (
            Router::new()
                .route("/t", get(tagged))
                .with_state(origin.clone())
                .layer(layer.clone()),
            layer,
        )
    };
    // Replica A may not move a tag's version (its purges fail with NOPERM, and land
    // nowhere, unlike a purge that times out).
    assert_eq!(
        redis.command(&[
            "ACL",
            "SETUSER",
            "replica-a",
            "on",
            ">pw",
            "~*",
            "&*",
            "+@all",
            "-incr"
        ]),
        "OK"
    );
    let url = format!("redis://replica-a:pw@{}/", redis.addr());
    let limited = RedisStore::connect(RedisConfig::single(url).timeout(Duration::from_secs(1)))
        .await
        .unwrap();
    let (a, layer_a) = app(limited);
    let (b, layer_b) = app(patient_store(&redis).await);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Replica A stores the tagged entry, then fails to purge its tag.
    get_body(&a, "/t").await;
    stored(&redis).await;
    layer_a.purge_tag("product-3").await;
    assert_eq!(
        redis.command(&["EXISTS", "battlement:cache-tag:{product-3}"]),
        "0"
    );
    // A stores the entry again if it took its purge for done (a refill at its own
    // version), or hits the one it has.
    let (_, body, _) = get_body(&a, "/t").await;
    assert_eq!(body, "tagged product");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = origin.0.load(Ordering::SeqCst);

    // A real purge, on B: what A stored before it is gone (B's next request is a miss;
    // the entry it then stores is fresh).
    layer_b.purge_tag("product-3").await;
    until_a_miss(&b, "/t", "an entry stored before a real purge outlived it").await;
    assert!(origin.0.load(Ordering::SeqCst) > before);
}

async fn slow_uncacheable(State(o): State<Origin>) -> impl IntoResponse {
    o.0.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    ([("cache-control", "no-store")], "not for caches")
}

/// The first call fails slowly with a 500, the next ones answer cacheably.
async fn slow_then_fixed(State(o): State<Origin>) -> axum::response::Response {
    let n = o.0.fetch_add(1, Ordering::SeqCst);
    if n == 0 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        return (StatusCode::INTERNAL_SERVER_ERROR, "origin failed").into_response();
    }
    ([("cache-control", "public, max-age=300")], "fixed").into_response()
}

/// A replica that finds another replica filling an entry waits for it, but not past the
/// end of that fill: when the fill stored nothing usable (the response was uncacheable, or
/// a server error), the waiter goes to the origin itself right away instead of waiting out
/// its budget (5 s by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_fill_that_stores_nothing_releases_its_waiters_at_once() {
    let redis = RedisServer::start();
    for (uri, expected, origin_calls) in [
        ("/uncacheable", "not for caches", 2),
        ("/flaky", "fixed", 2),
    ] {
        let origin = Origin::default();
        let mut replicas = Vec::new();
        for _ in 0..2 {
            let store = patient_store(&redis).await;
            replicas.push(
                Router::new()
                    .route("/uncacheable", get(slow_uncacheable))
                    .route("/flaky", get(slow_then_fixed))
                    .with_state(origin.clone())
                    .layer(CacheLayer::builder().redis(store).build()),
            );
        }
        let first = {
            let app = replicas[0].clone();
            tokio::spawn(async move { get_body(&app, uri).await })
        };
        // The first replica's claim is in Redis before the second asks.
        let claim = format!("{uri}: fill claim");
        let deadline = Instant::now() + Duration::from_secs(2);
        while !redis
            .command(&["KEYS", "battlement:cache:*"])
            .lines()
            .any(|k| k.ends_with(":fill"))
        {
            assert!(Instant::now() < deadline, "{claim} never appeared");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let started = Instant::now();
        let (status, body, _) = get_body(&replicas[1], uri).await;
        let took = started.elapsed();
        assert_eq!((status, body.as_str()), (StatusCode::OK, expected), "{uri}");
        assert!(
            took < Duration::from_secs(2),
            "{uri}: the second replica waited {took:?} after the fill ended"
        );
        first.await.unwrap();
        assert_eq!(origin.0.load(Ordering::SeqCst), origin_calls, "{uri}");
        redis.flushall();
    }
}

/// Tag versions are one shared truth: a replica started after a tag was purged (or one
/// that missed the purge while its subscription was down) reads the tag's version from
/// Redis instead of assuming it was never purged. Otherwise it takes every entry stored
/// since the purge for purged, and stores entries the other replicas take for purged:
/// each request through the other replica goes to the origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_agree_on_tag_versions_whenever_they_started() {
    let redis = RedisServer::start();
    let origin = Origin::default();
    let replica = |tiered: bool| {
        let origin = origin.clone();
        let url = redis.url();
        async move {
            let store = RedisStore::connect(RedisConfig::single(url)).await.unwrap();
            let builder = CacheLayer::builder();
            let layer = if tiered {
                builder.tiered(store).build()
            } else {
                builder.redis(store).build()
            };
            let app = Router::new()
                .route("/t", get(tagged))
                .with_state(origin)
                .layer(layer.clone());
            (layer, app)
        }
    };
    let (layer_a, app_a) = replica(true).await;
    get_body(&app_a, "/t").await;
    stored(&redis).await;
    layer_a.purge_tag("product-3").await;
    // A refills after its own purge.
    let (_, _, cache) = get_body(&app_a, "/t").await;
    assert!(!cache.contains("hit"), "purged on A, still a hit: {cache}");
    assert_eq!(origin.0.load(Ordering::SeqCst), 2);
    tokio::time::sleep(Duration::from_millis(100)).await;

    for tiered in [true, false] {
        // Started after the purge: the entry A stored since is valid for it too, and what
        // it stores is valid for A.
        let (_, app_b) = replica(tiered).await;
        for (who, app) in [("B", &app_b), ("A", &app_a), ("B", &app_b), ("A", &app_a)] {
            let (_, body, cache) = get_body(app, "/t").await;
            assert_eq!(body, "tagged product");
            assert!(
                cache.contains("hit"),
                "tiered {tiered}: replica {who} missed: {cache}"
            );
        }
        assert_eq!(origin.0.load(Ordering::SeqCst), 2, "tiered {tiered}");
    }
}

/// A replica whose purge subscription was down while another replica purged a tag has
/// missed the message: once it listens again it forgets its memory tier and its tag
/// versions, so it does not go on serving the purged entry from memory. (Redis ACLs take
/// the subscription away from replica B alone: its user loses channel access, which drops
/// its subscription and refuses a new one until access comes back.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_missed_a_purge_forgets_its_memory_tier_when_it_listens_again() {
    let redis = RedisServer::start();
    assert_eq!(
        redis.command(&[
            "ACL", "SETUSER", "writer", "on", "nopass", "~*", "&*", "+@all"
        ]),
        "OK"
    );
    let origin = Origin::default();
    let mut layers = Vec::new();
    let mut apps = Vec::new();
    for url in [
        format!("redis://writer:any@127.0.0.1:{}/", redis.port()),
        redis.url(),
    ] {
        let store = RedisStore::connect(RedisConfig::single(url)).await.unwrap();
        let layer = CacheLayer::builder().tiered(store).build();
        apps.push(
            Router::new()
                .route("/t", get(tagged))
                .with_state(origin.clone())
                .layer(layer.clone()),
        );
        layers.push(layer);
    }
    let subscribers = || {
        let channel = "battlement:cache-purge:{all}";
        let reply = redis.command(&["PUBSUB", "NUMSUB", channel]);
        reply.lines().nth(1).unwrap_or("").to_owned()
    };
    let wait_for = |n: &'static str| {
        let subscribers = &subscribers;
        async move {
            let deadline = Instant::now() + Duration::from_secs(5);
            while subscribers() != n {
                assert!(Instant::now() < deadline, "never {n} subscribers");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    wait_for("2").await;
    get_body(&apps[0], "/t").await;
    stored(&redis).await;
    let (_, _, cache) = get_body(&apps[1], "/t").await;
    assert!(cache.contains("hit"), "B reads it from Redis: {cache}");
    let (_, _, cache) = get_body(&apps[1], "/t").await;
    assert!(cache.contains("hit"), "B serves it from memory: {cache}");

    assert_eq!(
        redis.command(&["ACL", "SETUSER", "default", "resetchannels"]),
        "OK"
    );
    wait_for("1").await;
    layers[0].purge_tag("product-3").await;
    assert_eq!(
        redis.command(&["ACL", "SETUSER", "default", "allchannels"]),
        "OK"
    );
    wait_for("2").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let calls = origin.0.load(Ordering::SeqCst);
    let (_, body, cache) = get_body(&apps[1], "/t").await;
    assert_eq!(body, "tagged product");
    assert!(
        !cache.contains("hit"),
        "B served the purged entry from its memory tier: {cache}"
    );
    assert_eq!(origin.0.load(Ordering::SeqCst), calls + 1);
}

/// On a cluster, the memory tier's purge subscription goes round the configured nodes: a
/// node listed first that cannot be reached does not keep purges from the others away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purges_reach_the_memory_tier_when_the_first_listed_cluster_node_is_down() {
    let cluster = support::RedisCluster::start();
    let dead = format!("redis://127.0.0.1:{}/", support::free_port());
    let origin = Origin::default();
    let mut layers = Vec::new();
    let mut apps = Vec::new();
    for first_dead in [false, true] {
        let mut nodes = cluster.urls();
        if first_dead {
            nodes.insert(0, dead.clone());
        }
        let store =
            RedisStore::connect(RedisConfig::cluster(nodes).timeout(Duration::from_secs(1)))
                .await
                .unwrap();
        let layer = CacheLayer::builder().tiered(store).build();
        apps.push(
            Router::new()
                .route("/products/{id}", get(product))
                .with_state(origin.clone())
                .layer(layer.clone()),
        );
        layers.push(layer);
    }
    get_body(&apps[0], "/products/5").await;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let (_, _, cache) = get_body(&apps[1], "/products/5").await;
        if cache.contains("hit") {
            break;
        }
        assert!(Instant::now() < deadline, "never stored: {cache}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (_, _, cache) = get_body(&apps[1], "/products/5").await;
    assert!(cache.contains("hit"), "{cache}");
    let calls = origin.0.load(Ordering::SeqCst);
    // The subscription of replica 1 reaches a live node after one failed try (a second).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    layers[0].purge("/products/5", None).await;
    until_a_miss(
        &apps[1],
        "/products/5",
        "the purge never reached the replica whose first node is down",
    )
    .await;
    assert_eq!(origin.0.load(Ordering::SeqCst), calls + 1);
}

async fn by_language(State(o): State<Origin>, headers: http::HeaderMap) -> impl IntoResponse {
    o.0.fetch_add(1, Ordering::SeqCst);
    let lang = headers
        .get("accept-language")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("en")
        .to_owned();
    (
        [
            ("cache-control", "public, max-age=300"),
            ("vary", "accept-language"),
        ],
        lang,
    )
}

/// Variants are shared by the replicas, and a purge of the URL on one replica reaches
/// every variant on all of them (the variant list starts a new generation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn variants_are_shared_and_a_purge_reaches_every_variant() {
    let redis = RedisServer::start();
    let origin = Origin::default();
    let mut layers = Vec::new();
    let mut apps = Vec::new();
    for _ in 0..2 {
        let store = patient_store(&redis).await;
        let layer = CacheLayer::builder().redis(store).build();
        apps.push(
            Router::new()
                .route("/lang", get(by_language))
                .with_state(origin.clone())
                .layer(layer.clone()),
        );
        layers.push(layer);
    }
    let ask = |app: &Router, lang: &'static str| {
        let app = app.clone();
        async move {
            let res = app
                .oneshot(
                    Request::get("/lang")
                        .header("accept-language", lang)
                        .body(Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            let cache = res.headers()["cache-status"].to_str().unwrap().to_owned();
            let body = res.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, lang.as_bytes());
            // Let the write that follows the body reach Redis.
            tokio::time::sleep(Duration::from_millis(30)).await;
            cache.contains("hit")
        }
    };
    assert!(!ask(&apps[0], "fr").await);
    assert!(!ask(&apps[1], "de").await);
    assert!(
        ask(&apps[1], "fr").await,
        "fr stored by replica 0, read by 1"
    );
    assert!(
        ask(&apps[0], "de").await,
        "de stored by replica 1, read by 0"
    );
    assert_eq!(origin.0.load(Ordering::SeqCst), 2);
    layers[0].purge("/lang", None).await;
    assert!(!ask(&apps[1], "fr").await, "fr after the purge");
    assert!(!ask(&apps[0], "de").await, "de after the purge");
    assert!(ask(&apps[0], "fr").await && ask(&apps[1], "de").await);
    assert_eq!(origin.0.load(Ordering::SeqCst), 4);
}

/// A replica that waits for another replica's fill right after a tag purge must not take
/// the purged entry, still in Redis, for the fill's: it waits on, and fills itself once the
/// other fill has ended without storing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_never_takes_a_purged_entry_for_the_fill() {
    let redis = RedisServer::start();
    let origin = Origin::default();
    let store = patient_store(&redis).await;
    let layer = CacheLayer::builder().redis(store).build();
    let app = Router::new()
        .route("/t", get(tagged))
        .with_state(origin.clone())
        .layer(layer.clone());
    get_body(&app, "/t").await;
    stored(&redis).await;
    let entry = redis
        .command(&["KEYS", "battlement:cache:*"])
        .lines()
        .find(|k| !k.is_empty() && !k.ends_with(":fill"))
        .expect("the entry")
        .to_owned();
    layer.purge_tag("product-3").await;
    // Another replica is filling (its claim), and ends without storing 300 ms later.
    let claim = format!("{entry}:fill");
    redis.command(&["SET", &claim, "1", "PX", "5000"]);
    let release = {
        let addr = redis.addr();
        let claim = claim.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            support::resp_command(&addr, &["DEL", &claim], Duration::from_secs(1)).unwrap();
        })
    };
    let (status, body, cache) = get_body(&app, "/t").await;
    release.await.unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "tagged product"));
    assert!(!cache.contains("hit"), "served the purged entry: {cache}");
    assert_eq!(origin.0.load(Ordering::SeqCst), 2);
}

/// A fill removes only its own claim: when its claim lapsed and another replica claimed
/// the key meanwhile (here the claim is overwritten while the origin answers), the first
/// fill ending leaves the other replica's claim alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_releases_only_its_own_claim() {
    let redis = RedisServer::start();
    let origin = Origin::default();
    let store = patient_store(&redis).await;
    let app = Router::new()
        .route("/slow", get(slow_product))
        .with_state(origin.clone())
        .layer(CacheLayer::builder().redis(store).build());
    let request = {
        let app = app.clone();
        tokio::spawn(async move { get_body(&app, "/slow").await })
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    let claim = loop {
        if let Some(k) = redis
            .command(&["KEYS", "battlement:cache:*"])
            .lines()
            .find(|k| k.ends_with(":fill"))
        {
            break k.to_owned();
        }
        assert!(Instant::now() < deadline, "no fill claim");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    redis.command(&["SET", &claim, "another-replica", "PX", "10000"]);
    let (status, _, _) = request.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    stored(&redis).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(redis.command(&["GET", &claim]), "another-replica");
}
