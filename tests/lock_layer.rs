//! The lock layer on axum routes: one holder per name, refusals, the guard in the
//! handler, held until the body ends, released when the client goes away.

#![cfg(all(feature = "lock", feature = "redis", feature = "axum"))]

mod support;

use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::Path;
use axum::routing::post;
use battlement::annotate::{Annotation, LockOutcome};
use battlement::lock::{BusyResponse, HeldLock, LockLayer, LockManager};
use battlement::redis::{RedisConfig, RedisStore};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use support::RedisServer;
use tower::ServiceExt;

fn order_lock(manager: LockManager) -> LockLayer {
    LockLayer::new(manager, |req| {
        let id = req
            .uri
            .path()
            .strip_prefix("/orders/")?
            .strip_suffix("/pay")?;
        Some(format!("order:{id}"))
    })
    .wait(Duration::from_millis(100))
}

async fn pay(Path(id): Path<String>, lock: axum::Extension<HeldLock>) -> String {
    tokio::time::sleep(Duration::from_millis(400)).await;
    format!("{id} {}", lock.fencing_token())
}

fn app(layer: LockLayer) -> Router {
    Router::new()
        .route("/orders/{id}/pay", post(pay))
        .layer(layer)
}

fn pay_request(id: &str) -> Request<Body> {
    Request::post(format!("/orders/{id}/pay"))
        .body(Body::empty())
        .unwrap()
}

async fn body_text(res: axum::response::Response) -> String {
    String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

#[tokio::test]
async fn one_holder_the_other_gets_503_with_retry_after() {
    let app = app(order_lock(LockManager::memory()));
    let (a, b) = tokio::join!(app.clone().oneshot(pay_request("7")), async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        app.clone().oneshot(pay_request("7")).await
    });
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.status(), StatusCode::OK);
    assert_eq!(b.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(b.headers()["retry-after"], "1");
    assert_eq!(b.headers()["content-type"], "application/problem+json");
    let problem: serde_json::Value = serde_json::from_str(&body_text(b).await).unwrap();
    assert_eq!(problem["status"], 503);
    let text = body_text(a).await;
    let token: u64 = text.split(' ').nth(1).unwrap().parse().unwrap();
    assert!(token > 0, "{text}");
    // Another order is not blocked by this one.
    let c = app.clone().oneshot(pay_request("8")).await.unwrap();
    assert_eq!(c.status(), StatusCode::OK);
}

#[tokio::test]
async fn conflict_mode_and_grpc_status() {
    let app = app(order_lock(LockManager::memory()).on_busy(BusyResponse::Conflict));
    let holder = tokio::spawn(app.clone().oneshot(pay_request("1")));
    tokio::time::sleep(Duration::from_millis(30)).await;
    let busy = app.clone().oneshot(pay_request("1")).await.unwrap();
    assert_eq!(busy.status(), StatusCode::CONFLICT);
    let grpc = app
        .clone()
        .oneshot(
            Request::post("/orders/1/pay")
                .header("content-type", "application/grpc")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(grpc.headers()["grpc-status"], "10", "ABORTED");
    assert_eq!(holder.await.unwrap().unwrap().status(), StatusCode::OK);

    let unavailable = Router::new()
        .route("/orders/{id}/pay", post(pay))
        .layer(order_lock(LockManager::memory()));
    let first = tokio::spawn(unavailable.clone().oneshot(pay_request("2")));
    tokio::time::sleep(Duration::from_millis(30)).await;
    let grpc = unavailable
        .clone()
        .oneshot(
            Request::post("/orders/2/pay")
                .header("content-type", "application/grpc")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(grpc.headers()["grpc-status"], "14", "UNAVAILABLE");
    first.await.unwrap().unwrap();
}

/// A handler whose body streams until the test says so.
fn streaming_app(
    manager: LockManager,
) -> (
    Router,
    tokio::sync::mpsc::Sender<tokio::sync::mpsc::Receiver<Result<Bytes, Infallible>>>,
) {
    let (tx, rx) =
        tokio::sync::mpsc::channel::<tokio::sync::mpsc::Receiver<Result<Bytes, Infallible>>>(4);
    let rx = std::sync::Arc::new(tokio::sync::Mutex::new(rx));
    let router = Router::new()
        .route(
            "/orders/{id}/pay",
            post(move || {
                let rx = rx.clone();
                async move {
                    let body_rx = rx.lock().await.recv().await.unwrap();
                    let stream = futures_stream(body_rx);
                    Body::from_stream(stream)
                }
            }),
        )
        .layer(order_lock(manager).wait(Duration::from_millis(50)));
    (router, tx)
}

fn futures_stream(
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, Infallible>>,
) -> impl futures_core_stream::Stream<Item = Result<Bytes, Infallible>> {
    futures_core_stream::ReceiverStream(rx)
}

mod futures_core_stream {
    pub use futures_util::Stream;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    pub struct ReceiverStream<T>(pub tokio::sync::mpsc::Receiver<T>);

    impl<T> Stream for ReceiverStream<T> {
        type Item = T;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }
}

#[tokio::test]
async fn held_until_the_body_ends_and_released_when_the_client_goes_away() {
    let (app, bodies) = streaming_app(LockManager::memory());

    // 1. A response whose body is still streaming keeps the lock.
    let (chunks, body_rx) = tokio::sync::mpsc::channel(4);
    bodies.send(body_rx).await.unwrap();
    let res = app.clone().oneshot(pay_request("5")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let busy = app.clone().oneshot(pay_request("5")).await.unwrap();
    assert_eq!(
        busy.status(),
        StatusCode::SERVICE_UNAVAILABLE,
        "held while streaming"
    );
    chunks.send(Ok(Bytes::from_static(b"part"))).await.unwrap();
    drop(chunks);
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), "part");

    // 2. Once the body ended the lock is free again.
    let (chunks, body_rx) = tokio::sync::mpsc::channel(4);
    bodies.send(body_rx).await.unwrap();
    let res = app.clone().oneshot(pay_request("5")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK, "free after the body ended");

    // 3. A client that goes away mid-body releases it.
    chunks.send(Ok(Bytes::from_static(b"half"))).await.unwrap();
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "half");
    drop(body);
    tokio::task::yield_now().await;
    let (chunks, body_rx) = tokio::sync::mpsc::channel(4);
    bodies.send(body_rx).await.unwrap();
    drop(chunks);
    let res = app.clone().oneshot(pay_request("5")).await.unwrap();
    assert_eq!(
        res.status(),
        StatusCode::OK,
        "released when the body was dropped"
    );
}

#[tokio::test]
async fn annotation_records_wait_and_outcome() {
    let app = app(order_lock(LockManager::memory()));
    let annotated = |id: &str| {
        let annotation = Annotation::new();
        let mut req = pay_request(id);
        req.extensions_mut().insert(annotation.clone());
        (req, annotation)
    };
    let (r1, a1) = annotated("3");
    let (r2, a2) = annotated("3");
    let (x, y) = tokio::join!(app.clone().oneshot(r1), async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        app.clone().oneshot(r2).await
    });
    assert_eq!(x.unwrap().status(), StatusCode::OK);
    assert_eq!(y.unwrap().status(), StatusCode::SERVICE_UNAVAILABLE);
    let n1 = a1.snapshot().lock.expect("lock note");
    assert_eq!(n1.outcome, LockOutcome::Acquired);
    let n2 = a2.snapshot().lock.expect("lock note");
    assert_eq!(n2.outcome, LockOutcome::TimedOut);
    assert!(n2.wait >= Duration::from_millis(90), "{:?}", n2.wait);
    assert!(a2.snapshot().refused());
    // A name the lock refuses (braces would change a Redis Cluster hash tag) is a 400,
    // recorded as such (not as the lock service being unavailable).
    let (r3, a3) = annotated("{x}");
    assert_eq!(
        app.clone().oneshot(r3).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    let n3 = a3.snapshot().lock.expect("lock note");
    assert_eq!(n3.outcome, LockOutcome::InvalidName);
    assert_eq!(n3.outcome.as_str(), "invalid_name");
}

#[tokio::test]
async fn requests_without_a_name_are_not_locked() {
    let app = Router::new()
        .route(
            "/other",
            post(|lock: Option<axum::Extension<HeldLock>>| async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if lock.is_some() { "locked" } else { "free" }
            }),
        )
        .layer(order_lock(LockManager::memory()));
    let req = || Request::post("/other").body(Body::empty()).unwrap();
    let (a, b) = tokio::join!(app.clone().oneshot(req()), app.clone().oneshot(req()));
    assert_eq!(body_text(a.unwrap()).await, "free");
    assert_eq!(body_text(b.unwrap()).await, "free");
}

#[tokio::test]
async fn two_replicas_on_one_redis_share_the_lock() {
    let server = RedisServer::start();
    let connect = || async {
        RedisStore::connect(RedisConfig::single(server.url()))
            .await
            .unwrap()
    };
    let replica_a = app(order_lock(LockManager::redis(connect().await)));
    let replica_b = app(order_lock(LockManager::redis(connect().await)));
    let (a, b) = tokio::join!(replica_a.oneshot(pay_request("9")), async {
        tokio::time::sleep(Duration::from_millis(30)).await;
        replica_b.clone().oneshot(pay_request("9")).await
    });
    let statuses = [a.unwrap().status(), b.unwrap().status()];
    assert_eq!(
        statuses,
        [StatusCode::OK, StatusCode::SERVICE_UNAVAILABLE],
        "one holder across replicas"
    );
    // After the first finished, the other replica gets it, with a larger fencing token.
    let again = body_text(replica_b.oneshot(pay_request("9")).await.unwrap()).await;
    assert!(again.starts_with("9 "), "{again}");
}
