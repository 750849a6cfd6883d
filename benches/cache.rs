//! What a cache hit costs: battlement's `CacheLayer` answering from memory, against the bare
//! service and against `axum-response-cache` (0.5, its default `axum08` feature), in the
//! same run.
//!
//! Every variant is the same axum router: `GET /products/{id}`, whose handler answers a
//! 1 KiB body with `Cache-Control: public, max-age=300` and does nothing else. Each
//! iteration sends a fresh request (with a host, a user agent and an `Accept` header, as a
//! real one would) through `oneshot` on a current-thread runtime and reads the body to its
//! end.
//!
//! - `bare`: no cache; the handler runs every time. The floor.
//! - `battlement_hit`: `.layer(CacheLayer::builder().build())` (the defaults: 64 MiB memory
//!   store, RFC 9111 freshness from the response). Warmed before measuring; the sanity check
//!   asserts `Cache-Status` says `hit`.
//! - `peer_hit`: `.layer(axum_response_cache::CacheLayer::with_lifespan(300 s))`, as its
//!   documentation configures it (a `cached::TtlCache` behind a mutex, keyed on method and
//!   URI, which does not read `Cache-Control`). Warmed the same way.
//!
//! Both caches wrap the route's handler (`Router::layer` wraps every route, as
//! `get(..).layer(..)` in the peer's README does). The cached variants' handler counts its
//! calls: it must have run once (the warming miss) and never again, which is checked after
//! measuring, so every measured request was a hit. The bare handler does not count.
//!
//! The target: a hit costs under 1 µs over the bare service.
//!
//! Run with `cargo bench --all-features --bench cache` (pin it to one core with
//! `taskset -c 1` on a shared machine).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::response::IntoResponse;
use axum::routing::get;
use battlement::cache::CacheLayer;
use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::header::{ACCEPT, CACHE_CONTROL, CONTENT_TYPE, HOST, USER_AGENT};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tokio::runtime::Runtime;
use tower::ServiceExt;

/// The product: 1 KiB.
static BODY: [u8; 1024] = [b'x'; 1024];

async fn product() -> impl IntoResponse {
    (
        [
            (CONTENT_TYPE, "application/json"),
            (CACHE_CONTROL, "public, max-age=300"),
        ],
        Bytes::from_static(&BODY),
    )
}

/// The route, with the plain handler (`calls: None`) or one that counts its calls.
fn router(calls: Option<Arc<AtomicUsize>>) -> Router {
    match calls {
        None => Router::new().route("/products/{id}", get(product)),
        Some(calls) => Router::new().route(
            "/products/{id}",
            get(move || {
                calls.fetch_add(1, Ordering::Relaxed);
                product()
            }),
        ),
    }
}

fn request() -> Request<Body> {
    Request::get("/products/42")
        .header(HOST, "shop.example")
        .header(USER_AGENT, "bench/1.0")
        .header(ACCEPT, "application/json")
        .body(Body::empty())
        .unwrap()
}

async fn roundtrip(app: &Router) -> usize {
    let res = app.clone().oneshot(request()).await.unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), BODY.len());
    body.len()
}

/// Sends requests until the handler has run once and a request did not reach it (the cache
/// answered); returns the last response's `Cache-Status`, if any.
fn warm(rt: &Runtime, app: &Router, calls: &AtomicUsize) -> Option<String> {
    rt.block_on(async {
        for _ in 0..100 {
            let before = calls.load(Ordering::Relaxed);
            let res = app.clone().oneshot(request()).await.unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            let status = res
                .headers()
                .get("cache-status")
                .map(|v| v.to_str().unwrap().to_owned());
            let body = res.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body.len(), BODY.len());
            if before == 1 && calls.load(Ordering::Relaxed) == 1 {
                return status;
            }
            // Let a fill that runs in a task of its own store the entry.
            tokio::task::yield_now().await;
        }
        panic!("the cache never answered");
    })
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let bare = router(None);
    let battlement_calls = Arc::new(AtomicUsize::new(0));
    let battlement = router(Some(battlement_calls.clone())).layer(CacheLayer::builder().build());
    let peer_calls = Arc::new(AtomicUsize::new(0));
    let peer = router(Some(peer_calls.clone())).layer(
        axum_response_cache::CacheLayer::with_lifespan(Duration::from_secs(300)),
    );

    rt.block_on(roundtrip(&bare));
    let status = warm(&rt, &battlement, &battlement_calls).expect("a Cache-Status header");
    assert!(status.contains("hit"), "Cache-Status: {status}");
    warm(&rt, &peer, &peer_calls);

    let mut group = c.benchmark_group("cache/products");
    group.bench_function("bare", |b| b.to_async(&rt).iter(|| roundtrip(&bare)));
    group.bench_function("battlement_hit", |b| {
        b.to_async(&rt).iter(|| roundtrip(&battlement))
    });
    group.bench_function("peer_hit", |b| b.to_async(&rt).iter(|| roundtrip(&peer)));
    group.finish();

    // Every measured request of the cached variants was a hit.
    assert_eq!(battlement_calls.load(Ordering::Relaxed), 1);
    assert_eq!(peer_calls.load(Ordering::Relaxed), 1);
}

criterion_group!(benches, bench);
criterion_main!(benches);
