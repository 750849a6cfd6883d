//! Hit latency of the cache on Redis (`CacheBuilder::redis`, no memory tier), on a
//! `redis-server` the bench starts itself (free loopback port, no persistence).
//!
//! One axum route answering a 1 KiB body with `Cache-Control: public, max-age=300`, warmed
//! so that every measured request is a hit read from Redis (the bench panics otherwise).
//! A criterion group measures one caller's hits, from Redis and from the memory tier of
//! `CacheBuilder::tiered` (same entry, read from Redis once); then one fixed pass of 20,000 hits from 64
//! concurrent callers on a 2-worker runtime prints hits/s, p50 and p99.
//!
//! Run with `cargo bench --all-features --bench cache_redis`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use battlement::cache::CacheLayer;
use battlement::redis::{RedisConfig, RedisStore};
use criterion::{Criterion, criterion_group, criterion_main};
use http::Request;
use http_body_util::BodyExt;
use support::RedisServer;
use tokio::task::JoinSet;
use tower::ServiceExt;

fn app(store: RedisStore) -> Router {
    Router::new()
        .route(
            "/products/{id}",
            get(|| async { ([("cache-control", "public, max-age=300")], "x".repeat(1024)) }),
        )
        .layer(CacheLayer::builder().redis(store).build())
}

/// The same route behind `CacheBuilder::tiered`: hits come from this process's memory.
fn tiered_app(store: RedisStore) -> Router {
    Router::new()
        .route(
            "/products/{id}",
            get(|| async { ([("cache-control", "public, max-age=300")], "x".repeat(1024)) }),
        )
        .layer(CacheLayer::builder().tiered(store).build())
}

async fn hit(app: &Router) -> Duration {
    let started = Instant::now();
    let res = app
        .clone()
        .oneshot(Request::get("/products/1").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let hit = res
        .headers()
        .get("cache-status")
        .is_some_and(|v| v.to_str().unwrap().contains("hit"));
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(hit, "every measured request must be a hit");
    assert_eq!(body.len(), 1024);
    started.elapsed()
}

fn bench(c: &mut Criterion) {
    let redis = RedisServer::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (app, tiered) = rt.block_on(async {
        let store =
            RedisStore::connect(RedisConfig::single(redis.url()).timeout(Duration::from_secs(1)))
                .await
                .expect("connect to the bench's redis-server");
        let tiered = tiered_app(store.clone());
        let app = app(store);
        // Warm: the miss, then wait until the entry is in Redis.
        let _ = app
            .clone()
            .oneshot(Request::get("/products/1").body(Body::empty()).unwrap())
            .await
            .unwrap()
            .into_body()
            .collect()
            .await;
        let deadline = Instant::now() + Duration::from_secs(2);
        // Fill claims exist while the origin answers; wait for the entry itself.
        while !redis
            .command(&["KEYS", "battlement:cache:*"])
            .lines()
            .any(|k| !k.is_empty() && !k.ends_with(":fill"))
        {
            assert!(Instant::now() < deadline, "the entry never reached Redis");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // The tiered app reads the entry from Redis once, then keeps it in memory.
        hit(&tiered).await;
        (app, tiered)
    });

    let mut group = c.benchmark_group("cache_redis");
    group.bench_function("hit_one_caller", |b| b.to_async(&rt).iter(|| hit(&app)));
    group.bench_function("tiered_memory_hit", |b| {
        b.to_async(&rt).iter(|| hit(&tiered))
    });
    group.finish();

    let (elapsed, mut latencies) = rt.block_on(async {
        let started = Instant::now();
        let mut set = JoinSet::new();
        for _ in 0..64 {
            let app = app.clone();
            set.spawn(async move {
                let mut own = Vec::with_capacity(320);
                for _ in 0..(20_000 / 64) {
                    own.push(hit(&app).await);
                }
                own
            });
        }
        let mut all = Vec::with_capacity(20_000);
        while let Some(own) = set.join_next().await {
            all.extend(own.unwrap());
        }
        (started.elapsed(), all)
    });
    latencies.sort();
    let p = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    println!(
        "cache on Redis, 64 callers: {:.0} hits/s, p50 {:?}, p99 {:?} ({} hits)",
        latencies.len() as f64 / elapsed.as_secs_f64(),
        p(0.50),
        p(0.99),
        latencies.len()
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
