//! Request logging in one page: one JSON line per request, with the route template, the
//! request id and the decisions of the layers inside, and no secrets. Runs in-process.
//!
//! ```text
//! cargo run --example trace
//! ```

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use battlement::key::Global;
use battlement::rate_limit::{Quota, RateLimitLayer};
use battlement::trace::TraceLayer;
use http::Request;
use http_body_util::BodyExt;
use tower::ServiceExt;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_span_list(false)
        .init();
    let app = Router::new()
        .route("/items/{id}", get(|| async { "an item" }))
        .layer(
            RateLimitLayer::builder()
                .policy(
                    "per-minute",
                    Quota::requests_per(2, Duration::from_secs(60)),
                )
                .key(Global)
                .build()
                .expect("valid limit"),
        )
        // Outermost: it logs every request, refusals included, with the others' decisions.
        .layer(TraceLayer::builder().build().expect("valid trace layer"));

    for id in ["1", "2", "3"] {
        let req = Request::get(format!("/items/{id}?token=never-logged"))
            .header("x-request-id", format!("demo-{id}"))
            .header("authorization", "Bearer never-logged")
            .body(Body::empty())
            .unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        let echoed = res.headers()["x-request-id"].clone();
        // The line is written when the body has been read to its end.
        let _ = res.into_body().collect().await;
        eprintln!("(response echoed x-request-id: {echoed:?})");
    }
}
