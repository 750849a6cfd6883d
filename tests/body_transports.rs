//! The layers that read the request body (`validate`, `idempotency`) on real servers with
//! no body mapping: a plain hyper 1 server, whose body is `Incoming`, and a tonic server.

#![cfg(all(feature = "validate", feature = "idempotency", feature = "tonic"))]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use battlement::ServiceBuilderExt;
use battlement::idempotency::IdempotencyLayer;
use battlement::validate::{ParsedJson, ValidateLayer};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tonic::transport::Endpoint;
use tonic::transport::server::TcpIncoming;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tower::ServiceBuilder;

/// Echoes the body it got, with the number of runs and what `validate` parsed.
async fn echo<B>(
    runs: Arc<AtomicUsize>,
    req: Request<B>,
) -> Result<Response<Full<Bytes>>, Infallible>
where
    B: Body<Data = Bytes>,
{
    let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
    let parsed = req.extensions().get::<ParsedJson>().is_some();
    let body = req.into_body().collect().await.ok().map(|b| b.to_bytes());
    let text = format!(
        "run {run}, parsed {parsed}: {}",
        String::from_utf8_lossy(body.as_deref().unwrap_or(b"<unreadable>"))
    );
    let mut res = Response::new(Full::new(Bytes::from(text)));
    *res.status_mut() = StatusCode::CREATED;
    Ok(res)
}

#[tokio::test]
async fn validate_and_idempotency_on_plain_hyper_incoming_bodies() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let idempotency = IdempotencyLayer::builder().build().unwrap();
    let validate = ValidateLayer::builder()
        .max_body(64)
        .schema(serde_json::json!({"type": "object", "required": ["n"]}))
        .build()
        .unwrap();
    let counter = runs.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let counter = counter.clone();
            // The handler is hyper's: the body the layers hand on wraps `Incoming`.
            let service = ServiceBuilder::new()
                .idempotency(idempotency.clone())
                .validate(validate.clone())
                .service_fn(move |req| echo(counter.clone(), req));
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
                    .await;
            });
        }
    });

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let send = |key: Option<&str>, body: &'static str| {
        let mut req = Request::post(format!("http://{addr}/jobs"));
        if let Some(key) = key {
            req = req.header("idempotency-key", key);
        }
        let req = req
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        let client = client.clone();
        async move {
            let res = client.request(req).await.expect("a response");
            let (parts, body) = res.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            (parts, String::from_utf8_lossy(&body).into_owned())
        }
    };

    // validate read the body, parsed it, and handed the same bytes on.
    let (parts, body) = send(None, r#"{"n":1}"#).await;
    assert_eq!(parts.status, StatusCode::CREATED, "{body}");
    assert_eq!(body, r#"run 1, parsed true: {"n":1}"#);
    // Refusals, before the handler runs.
    let (parts, body) = send(None, r#"{"n":"#).await;
    assert_eq!(parts.status, StatusCode::BAD_REQUEST, "{body}");
    let (parts, _) = send(None, r#"{"m":1}"#).await;
    assert_eq!(parts.status, StatusCode::UNPROCESSABLE_ENTITY);
    let (parts, _) = send(
        None,
        r#"{"n":"0123456789012345678901234567890123456789012345678901234567890123"}"#,
    )
    .await;
    assert_eq!(parts.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // idempotency read it first (to fingerprint it), validate read it again.
    let (parts, first) = send(Some("k-1"), r#"{"n":2}"#).await;
    assert_eq!(parts.status, StatusCode::CREATED);
    assert_eq!(first, r#"run 2, parsed true: {"n":2}"#);
    let (parts, replay) = send(Some("k-1"), r#"{"n":2}"#).await;
    assert_eq!(parts.status, StatusCode::CREATED);
    assert_eq!(parts.headers["idempotent-replayed"], "true");
    assert_eq!(replay, first);
    let (parts, _) = send(Some("k-1"), r#"{"n":3}"#).await;
    assert_eq!(parts.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn idempotency_replays_a_tonic_call_with_its_grpc_status() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("jobs", tonic_health::ServingStatus::Serving)
        .await;
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .layer(
                ServiceBuilder::new()
                    .idempotency(IdempotencyLayer::builder().build().unwrap())
                    .into_inner(),
            )
            .add_service(health)
            .serve_with_incoming(TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    let call = |service: &str| {
        let mut req = tonic::Request::new(HealthCheckRequest {
            service: service.into(),
        });
        req.metadata_mut()
            .insert("idempotency-key", "\"check-1\"".parse().unwrap());
        req
    };

    let first = client.check(call("jobs")).await.expect("the first call");
    assert!(first.metadata().get("idempotent-replayed").is_none());
    // The service's status changes, but the retry gets the first answer.
    reporter
        .set_service_status("jobs", tonic_health::ServingStatus::NotServing)
        .await;
    let retry = client.check(call("jobs")).await.expect("the replay");
    assert_eq!(retry.metadata().get("idempotent-replayed").unwrap(), "true");
    assert_eq!(retry.get_ref().status, first.get_ref().status);
    // Another message under the key: the draft's 422, which gRPC reads as an error status.
    let other = client
        .check(call("other"))
        .await
        .expect_err("another request under the key");
    assert_ne!(other.code(), tonic::Code::Ok);
}

/// A response body of declared length that never says it has ended (a stream whose
/// producer is still around). hyper's HTTP/1 server writes the declared bytes and drops it:
/// the client got the whole response, so it is stored, and the retry is a replay rather
/// than a second run.
struct DeclaredNeverEnds(Vec<Bytes>);

impl Body for DeclaredNeverEnds {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        match self.0.pop() {
            Some(data) => std::task::Poll::Ready(Some(Ok(http_body::Frame::data(data)))),
            None => std::task::Poll::Pending,
        }
    }
}

#[tokio::test]
async fn idempotency_stores_a_streamed_response_sent_whole_over_http1() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let idempotency = IdempotencyLayer::builder().build().unwrap();
    let counter = runs.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let counter = counter.clone();
            let service = ServiceBuilder::new()
                .idempotency(idempotency.clone())
                .service_fn(move |_req: Request<_>| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    async {
                        let mut res = Response::new(DeclaredNeverEnds(vec![
                            Bytes::from_static(b"second"),
                            Bytes::from_static(b"first,"),
                        ]));
                        res.headers_mut()
                            .insert(http::header::CONTENT_LENGTH, "12".parse().unwrap());
                        *res.status_mut() = StatusCode::CREATED;
                        Ok::<_, Infallible>(res)
                    }
                });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .http1_only()
                    .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
                    .await;
            });
        }
    });
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    for replayed in [false, true] {
        let req = Request::post(format!("http://{addr}/exports"))
            .header("idempotency-key", "k-declared")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let res = client.request(req).await.expect("a response");
        assert_eq!(res.status(), StatusCode::CREATED);
        assert_eq!(res.headers().contains_key("idempotent-replayed"), replayed);
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "first,second");
        // The store write runs as the body is dropped.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}
