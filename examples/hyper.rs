//! The layers on a plain hyper 1 server (hyper-util), stacked with `ServiceBuilderExt`.
//!
//! ```text
//! cargo run --example hyper                   # listens on 127.0.0.1:3001 (BIND to change)
//! curl -i http://127.0.0.1:3001/hello         # 200, logged as one JSON line
//! curl -i -X POST http://127.0.0.1:3001/jobs/7 -d '{}'    # 201, run under the lock job:7
//! curl -i -X POST http://127.0.0.1:3001/jobs/7 -d '{'     # 400: not JSON
//! curl -i -X POST http://127.0.0.1:3001/jobs/8 -H 'Idempotency-Key: k1' -d '{}'   # twice: replayed
//! for i in $(seq 12); do curl -s -o /dev/null -w '%{http_code} ' http://127.0.0.1:3001/hello; done
//! ```
//!
//! There is no router here: the request logging, the per-IP limit (10 per second),
//! `Idempotency-Key` handling, JSON validation of bodies and a lock per `/jobs/{id}` wrap
//! one `service_fn`. Each connection's peer address goes into the request as `PeerAddr`,
//! which `ClientIp` reads.
//!
//! The layers that may read the request body first (`validate`, `idempotency`) hand the
//! handler a [`RequestBody`](battlement::body::RequestBody) around hyper's `Incoming`: the
//! body untouched, or the bytes they read.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use battlement::ServiceBuilderExt;
use battlement::idempotency::IdempotencyLayer;
use battlement::key::{ClientIp, PeerAddr};
use battlement::lock::{HeldLock, LockLayer, LockManager};
use battlement::rate_limit::{Quota, RateLimitLayer};
use battlement::trace::TraceLayer;
use battlement::validate::ValidateLayer;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tower::ServiceBuilder;
use tower_http::add_extension::AddExtensionLayer;

/// The handler. The body-reading layers hand it `RequestBody<RequestBody<Incoming>>` (one
/// wrapper per layer): generic over the body, it need not spell that out.
async fn handle<B>(req: Request<B>) -> Result<Response<Full<Bytes>>, Infallible>
where
    B: Body<Data = Bytes>,
{
    let path = req.uri().path().to_owned();
    let lock = req.extensions().get::<HeldLock>().cloned();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let text = match lock {
        Some(lock) => format!(
            "{path}: ran under {} with fencing token {} ({} body bytes)\n",
            lock.name(),
            lock.fencing_token(),
            body.len()
        ),
        None => format!("{path}: hello\n"),
    };
    let status = if path.starts_with("/jobs/") {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut res = Response::new(Full::new(Bytes::from(text)));
    *res.status_mut() = status;
    Ok(res)
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_span_list(false)
        .init();
    let bind: SocketAddr = std::env::var("BIND")
        .ok()
        .and_then(|b| b.parse().ok())
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 3001)));

    let client_ip = ClientIp::new();
    let trace = TraceLayer::builder()
        .client_ip(client_ip.clone())
        .build()
        .expect("valid trace configuration");
    let per_ip = RateLimitLayer::builder()
        .policy(
            "per-second",
            Quota::requests_per(10, Duration::from_secs(1)),
        )
        .key(client_ip)
        .build()
        .expect("valid rate limit");
    // A retried job with the same `Idempotency-Key` is answered from the first run.
    let idempotency = IdempotencyLayer::builder()
        .build()
        .expect("valid idempotency configuration");
    // Bodies are JSON objects of at most 4 KiB.
    let validate = ValidateLayer::builder()
        .max_body(4 * 1024)
        .schema(serde_json::json!({"type": "object"}))
        .build()
        .expect("valid schema");
    let jobs = LockLayer::new(LockManager::memory(), |req| {
        let id = req.uri.path().strip_prefix("/jobs/")?;
        Some(format!("job:{id}"))
    });

    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .unwrap_or_else(|e| panic!("cannot listen on {bind}: {e}"));
    println!("battlement on plain hyper: http://{bind}/hello");
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                eprintln!("accept failed: {error}");
                continue;
            }
        };
        // Clones of the layers share their state (limits, locks, records).
        let service = ServiceBuilder::new()
            .layer(AddExtensionLayer::new(PeerAddr(peer)))
            .trace(trace.clone())
            .limit_requests(per_ip.clone())
            .idempotency(idempotency.clone())
            .validate(validate.clone())
            .lock(jobs.clone())
            .service_fn(handle);
        tokio::spawn(async move {
            let served = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
                .await;
            if let Err(error) = served {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
}
