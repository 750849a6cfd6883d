//! Idempotency keys in one page: a retried POST runs once; the same key with another body
//! is refused. Runs in-process and prints each answer.
//!
//! ```text
//! cargo run --example idempotency
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::body::Body;
use axum::routing::post;
use battlement::idempotency::IdempotencyLayer;
use http::Request;
use http_body_util::BodyExt;
use tower::ServiceExt;

#[tokio::main]
async fn main() {
    let placed = Arc::new(AtomicUsize::new(0));
    let counter = placed.clone();
    let app = Router::new()
        .route(
            "/payments",
            post(move |body: String| {
                let counter = counter.clone();
                async move {
                    let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                    (http::StatusCode::CREATED, format!("payment {n} for {body}"))
                }
            }),
        )
        .layer(
            IdempotencyLayer::builder()
                .require_key(true)
                .build()
                .expect("valid layer"),
        );

    let pay = |key: Option<&str>, body: &'static str| {
        let mut req = Request::post("/payments").header("content-type", "application/json");
        if let Some(key) = key {
            req = req.header("idempotency-key", key);
        }
        req.body(Body::from(body)).unwrap()
    };
    for (label, req) in [
        ("first try", pay(Some("\"pay-42\""), r#"{"cents":500}"#)),
        (
            "retry, same key and body",
            pay(Some("\"pay-42\""), r#"{"cents":500}"#),
        ),
        (
            "same key, another body",
            pay(Some("\"pay-42\""), r#"{"cents":900}"#),
        ),
        ("no key", pay(None, r#"{"cents":500}"#)),
    ] {
        let res = app.clone().oneshot(req).await.unwrap();
        let replayed = res.headers().contains_key("idempotent-replayed");
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        println!(
            "{label:26} -> {status}{} {}",
            if replayed { " (replayed)" } else { "" },
            String::from_utf8_lossy(&body).lines().next().unwrap_or("")
        );
    }
    assert_eq!(placed.load(Ordering::SeqCst), 1, "the payment ran once");
}
