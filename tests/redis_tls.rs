//! Redis over TLS (`rediss://`, feature `redis-tls`) on real `redis-server`s with a private
//! certificate authority: every connection the crate opens (calls, the lock's release
//! notifications, the cache's purge listener) goes through TLS; a server the configuration
//! does not trust, or one that wants a client certificate it was not given, is refused at
//! connect with an error.

#![cfg(all(
    feature = "redis-tls",
    feature = "lock",
    feature = "cache",
    feature = "axum"
))]

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
use battlement::lock::LockManager;
use battlement::redis::{RedisConfig, RedisStore};
use http::Request;
use support::{RedisCluster, RedisServer, TlsFiles};
use tower::ServiceExt;

/// A server with a TLS port (returned) beside its plain one (for the test's own commands).
fn tls_server(files: &TlsFiles, client_certificates: bool) -> (RedisServer, String) {
    let port = support::free_port();
    let args = files.server_args(port, client_certificates);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (
        RedisServer::start_with_args(&args),
        format!("rediss://127.0.0.1:{port}/"),
    )
}

fn trusted(files: &TlsFiles, url: &str) -> RedisConfig {
    RedisConfig::single(url)
        .timeout(Duration::from_millis(500))
        .tls_root_certificates(files.read("ca.crt"))
}

/// Waits (3 s at most, else fails with `what`) until `done`.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The subscriber count `PUBSUB NUMSUB` (or `SHARDNUMSUB`) gives for `channel`.
fn numsub(server: &RedisServer, command: &str, channel: &str) -> String {
    let reply = server.command(&["PUBSUB", command, channel]);
    reply.lines().nth(1).unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_serves_locks_with_notifications() {
    let files = TlsFiles::generate();
    let (server, url) = tls_server(&files, false);
    let a = LockManager::redis(
        RedisStore::connect(trusted(&files, &url))
            .await
            .expect("TLS with the private CA"),
    );
    let b = LockManager::redis(RedisStore::connect(trusted(&files, &url)).await.unwrap());
    let held = a.acquire("job", Duration::from_secs(1)).await.unwrap();
    let first = held.fencing_token();
    let waiter = tokio::spawn(async move {
        let guard = b.acquire("job", Duration::from_secs(5)).await;
        guard.map(|g| g.fencing_token())
    });
    // The waiter's subscription (its own TLS connection) is up before the release.
    until("the waiter never subscribed", || {
        numsub(&server, "NUMSUB", "battlement:lock:{job}:released") == "1"
    })
    .await;
    held.release().await.unwrap();
    let token = waiter.await.unwrap();
    assert!(token.expect("the waiter gets the lock") > first);
    // The waiter's guard was dropped: released in the background, over TLS.
    let deadline = Instant::now() + Duration::from_secs(3);
    while server.command(&["EXISTS", "battlement:lock:{job}"]) != "0" {
        assert!(
            Instant::now() < deadline,
            "the dropped guard never released"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[derive(Clone, Default)]
struct Origin(Arc<AtomicUsize>);

async fn product(State(o): State<Origin>) -> impl IntoResponse {
    o.0.fetch_add(1, Ordering::SeqCst);
    ([("cache-control", "public, max-age=300")], "a product")
}

async fn cache_status(app: &Router, uri: &str) -> String {
    let res = app
        .clone()
        .oneshot(Request::get(uri).body(Body::empty()).unwrap())
        .await
        .unwrap();
    res.headers()
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_serves_the_tiered_cache_and_its_purges() {
    let files = TlsFiles::generate();
    let (server, url) = tls_server(&files, false);
    let origin = Origin::default();
    let mut layers = Vec::new();
    let mut apps = Vec::new();
    for _ in 0..2 {
        let store = RedisStore::connect(trusted(&files, &url)).await.unwrap();
        let layer = CacheLayer::builder().tiered(store).build();
        apps.push(
            Router::new()
                .route("/products/{id}", get(product))
                .with_state(origin.clone())
                .layer(layer.clone()),
        );
        layers.push(layer);
    }
    // Both purge listeners subscribed, over TLS.
    let mut channel = String::new();
    until("no purge listener subscribed", || {
        let channels = server.command(&["PUBSUB", "CHANNELS", "*"]);
        channel = channels.lines().next().unwrap_or_default().to_owned();
        !channel.is_empty()
    })
    .await;
    until("both purge listeners never subscribed", || {
        numsub(&server, "NUMSUB", &channel) == "2"
    })
    .await;

    assert!(cache_status(&apps[0], "/products/1").await.contains("miss"));
    let deadline = Instant::now() + Duration::from_secs(3);
    while !cache_status(&apps[1], "/products/1").await.contains("hit") {
        assert!(Instant::now() < deadline, "replica 1 never read the entry");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(origin.0.load(Ordering::SeqCst), 1);
    // Replica 1 now serves it from memory; a purge on replica 0 reaches it over TLS.
    layers[0].purge("/products/1", None).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    while !cache_status(&apps[1], "/products/1")
        .await
        .contains("fwd=uri-miss")
    {
        assert!(
            Instant::now() < deadline,
            "the purge never reached replica 1"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_outside_the_trusted_roots_is_refused_at_connect() {
    let files = TlsFiles::generate();
    let (_server, url) = tls_server(&files, false);
    // The bundled public roots do not hold the private CA.
    let untrusted = RedisStore::connect(RedisConfig::single(&url)).await;
    let error = untrusted
        .expect_err("a certificate from an unknown CA")
        .to_string();
    assert!(
        error.to_lowercase().contains("certificate") || error.contains("UnknownIssuer"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_presents_the_client_certificate() {
    let files = TlsFiles::generate();
    let (server, url) = tls_server(&files, true);
    assert!(
        RedisStore::connect(trusted(&files, &url)).await.is_err(),
        "the server wants a client certificate"
    );
    let config = trusted(&files, &url)
        .tls_client_certificate(files.read("client.crt"), files.read("client.key"));
    let locks = LockManager::redis(RedisStore::connect(config).await.expect("mutual TLS"));
    let guard = locks.acquire("m", Duration::from_secs(1)).await.unwrap();
    assert_eq!(server.command(&["EXISTS", "battlement:lock:{m}"]), "1");
    guard.release().await.unwrap();
    // Its credentials stay out of logs.
    let secret = RedisConfig::single("rediss://app:s3cret@127.0.0.1:1/")
        .tls_client_certificate(files.read("client.crt"), files.read("client.key"));
    let shown = format!("{secret:?}");
    assert!(
        !shown.contains("s3cret") && !shown.contains("PRIVATE KEY"),
        "{shown}"
    );
}

/// A Redis Cluster whose nodes speak TLS to clients and to each other: the store finds
/// every node's TLS port, locks land in every node's slots, and a waiter's shard
/// subscription (its own cluster connection) is woken by the release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_serves_every_slot_and_shard_notifications() {
    let files = TlsFiles::generate();
    let ports = support::free_ports(RedisCluster::MASTERS);
    let cluster = RedisCluster::start_with(|i| {
        let mut args = files.server_args(ports[i], false);
        args.extend(["--tls-cluster".to_owned(), "yes".to_owned()]);
        args
    });
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("rediss://127.0.0.1:{p}/"))
        .collect();
    let config = || {
        RedisConfig::cluster(urls.clone())
            .timeout(Duration::from_millis(500))
            .tls_root_certificates(files.read("ca.crt"))
    };
    let a = LockManager::redis(
        RedisStore::connect(config())
            .await
            .expect("the cluster over TLS"),
    );
    let b = LockManager::redis(RedisStore::connect(config()).await.unwrap());
    // Names in every node's slots.
    let mut homes = std::collections::HashSet::new();
    for i in 0..30 {
        let name = format!("n{i}");
        let guard = a.acquire(&name, Duration::from_secs(1)).await.unwrap();
        let key = format!("battlement:lock:{{{name}}}");
        let home = (0..RedisCluster::MASTERS)
            .find(|&n| cluster.command_on(n, &["EXISTS", &key]) == "1")
            .expect("the lock is on one of the nodes");
        homes.insert(home);
        guard.release().await.unwrap();
    }
    assert_eq!(homes.len(), RedisCluster::MASTERS);

    let held = a.acquire("job", Duration::from_secs(1)).await.unwrap();
    let first = held.fencing_token();
    let waiter = tokio::spawn(async move {
        b.acquire("job", Duration::from_secs(5))
            .await
            .map(|g| g.fencing_token())
    });
    let channel = "battlement:lock:{job}:released";
    until("the waiter never subscribed", || {
        cluster
            .nodes()
            .iter()
            .any(|node| numsub(node, "SHARDNUMSUB", channel) == "1")
    })
    .await;
    held.release().await.unwrap();
    assert!(waiter.await.unwrap().expect("the waiter gets the lock") > first);
}
