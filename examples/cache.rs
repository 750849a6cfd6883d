//! The response cache in one page: one origin call for many requests, `Age`,
//! `Cache-Status`, `304`, and what is never stored. Runs in-process and prints each answer.
//!
//! ```text
//! cargo run --example cache
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use battlement::cache::CacheLayer;
use http::Request;
use tower::ServiceExt;

#[tokio::main]
async fn main() {
    let calls = Arc::new(AtomicUsize::new(0));
    let origin = calls.clone();
    let app = Router::new()
        .route(
            "/products/{id}",
            get(move || {
                let origin = origin.clone();
                async move {
                    origin.fetch_add(1, Ordering::SeqCst);
                    (
                        [("cache-control", "public, max-age=60"), ("etag", "\"v1\"")],
                        "a product",
                    )
                }
            }),
        )
        .route(
            "/me",
            get(|| async {
                (
                    [
                        ("cache-control", "public, max-age=60"),
                        ("set-cookie", "s=1"),
                    ],
                    "you",
                )
            }),
        )
        .layer(CacheLayer::builder().build());

    // 100 concurrent requests for one product: one origin call.
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            app.oneshot(Request::get("/products/1").body(Body::empty()).unwrap())
                .await
                .unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().status(), 200);
    }
    println!(
        "100 concurrent requests, origin calls: {}",
        calls.load(Ordering::SeqCst)
    );

    let res = app
        .clone()
        .oneshot(Request::get("/products/1").body(Body::empty()).unwrap())
        .await
        .unwrap();
    println!(
        "next request: {} Cache-Status: {:?} Age: {:?}",
        res.status(),
        res.headers()["cache-status"],
        res.headers().get("age")
    );
    let not_modified = app
        .clone()
        .oneshot(
            Request::get("/products/1")
                .header("if-none-match", "\"v1\"")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    println!("If-None-Match: \"v1\" -> {}", not_modified.status());
    assert_eq!(not_modified.status(), 304);

    for _ in 0..2 {
        let res = app
            .clone()
            .oneshot(Request::get("/me").body(Body::empty()).unwrap())
            .await
            .unwrap();
        println!(
            "/me (sets a cookie) -> Cache-Status: {:?}",
            res.headers().get("cache-status")
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
