//! Per-request overhead of the trace layer, against the bare service and against
//! tower-http's `TraceLayer` with its default settings, in the same run.
//!
//! Every variant is the same axum router (`GET /orders/{id}`, an 11-byte body) driven with
//! `oneshot` on a current-thread runtime; the response body is read to its end, because that
//! is where battlement emits its event. The request carries a query string, a user agent and
//! a peer address, as a real one would.
//!
//! - `no_subscriber`: no subscriber installed (the target is under 1 µs of overhead: request
//!   id, trace context, annotation, span and event callsites that are all disabled).
//! - `json_sink`: `tracing-subscriber`'s JSON formatter writing to `io::sink()`.
//!   `battlement` at `INFO` writes its span and its one event; `tower_http` at `DEBUG`
//!   writes what its defaults produce (a span and two events: request and response) and at
//!   `INFO` writes nothing. `battlement_event_only` puts the span below the filter, to show
//!   what the span costs with this formatter.
//!
//! Run with `cargo bench --all-features --bench trace`.

use std::io;
use std::net::SocketAddr;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::routing::get;
use battlement::trace::TraceLayer;
use criterion::{Criterion, criterion_group, criterion_main};
use http::Request;
use http_body_util::BodyExt;
use tokio::runtime::Runtime;
use tower::ServiceExt;
use tracing::Level;

fn router() -> Router {
    Router::new().route("/orders/{id}", get(|| async { "hello world" }))
}

fn request() -> Request<Body> {
    let mut req = Request::get("/orders/42?page=2")
        .header("user-agent", "bench/1.0")
        .body(Body::empty())
        .unwrap();
    req.extensions_mut()
        .insert(ConnectInfo(SocketAddr::from(([192, 0, 2, 7], 40000))));
    req
}

async fn roundtrip(app: &Router) -> usize {
    let res = app.clone().oneshot(request()).await.unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), 11);
    body.len()
}

fn variants() -> [(&'static str, Router); 3] {
    [
        ("bare", router()),
        ("battlement", router().layer(TraceLayer::new())),
        (
            "tower_http",
            router().layer(tower_http::trace::TraceLayer::new_for_http()),
        ),
    ]
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let mut group = c.benchmark_group("trace/no_subscriber");
    for (name, app) in variants() {
        group.bench_function(name, |b| b.to_async(&rt).iter(|| roundtrip(&app)));
    }
    group.finish();

    let mut group = c.benchmark_group("trace/json_sink");
    for (name, level, app) in [
        ("bare", Level::INFO, router()),
        ("battlement", Level::INFO, router().layer(TraceLayer::new())),
        (
            // The span at TRACE, filtered out: the event alone.
            "battlement_event_only",
            Level::INFO,
            router().layer(
                TraceLayer::builder()
                    .span_level(Level::TRACE)
                    .build()
                    .unwrap(),
            ),
        ),
        (
            "tower_http_debug",
            Level::DEBUG,
            router().layer(tower_http::trace::TraceLayer::new_for_http()),
        ),
        (
            "tower_http_info",
            Level::INFO,
            router().layer(tower_http::trace::TraceLayer::new_for_http()),
        ),
    ] {
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_max_level(level)
            .with_writer(io::sink)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        sanity(&rt, &app);
        group.bench_function(name, |b| b.to_async(&rt).iter(|| roundtrip(&app)));
    }
    group.finish();
}

fn sanity(rt: &Runtime, app: &Router) {
    rt.block_on(async {
        let res = app.clone().oneshot(request()).await.unwrap();
        assert!(res.status().is_success());
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
