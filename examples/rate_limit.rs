//! Rate limiting in one page: two policies charged together, and what a refused request
//! carries. Runs in-process (no server) and prints each answer.
//!
//! ```text
//! cargo run --example rate_limit
//! ```

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use battlement::key::Header;
use battlement::rate_limit::{Quota, RateLimitLayer};
use http::Request;
use tower::ServiceExt;

#[tokio::main]
async fn main() {
    // 3 a second with no burst beyond that, and 5 a minute; keyed on an API key header.
    let limit = RateLimitLayer::builder()
        .policy("per-second", Quota::requests_per(3, Duration::from_secs(1)))
        .policy(
            "per-minute",
            Quota::requests_per(5, Duration::from_secs(60)),
        )
        .key(Header::new(http::HeaderName::from_static("x-api-key")))
        .headers_on_success(true)
        .build()
        .expect("valid policies");
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(limit);

    for (i, key) in ["alice", "alice", "alice", "bob", "alice"]
        .iter()
        .enumerate()
    {
        let req = Request::get("/")
            .header("x-api-key", *key)
            .body(Body::empty())
            .unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        let h = |name: &str| {
            res.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned()
        };
        println!(
            "request {} as {key:5}: {} RateLimit: {}  Retry-After: {}",
            i + 1,
            res.status(),
            h("ratelimit"),
            h("retry-after")
        );
    }
    let refused = app
        .oneshot(
            Request::get("/")
                .header("x-api-key", "alice")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(refused.status(), 429, "alice spent her per-second budget");
}
