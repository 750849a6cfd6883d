//! The trace layer through real servers and real clients on loopback: a tonic gRPC server
//! and plain hyper 1 servers, with the one event per request captured by a test
//! subscriber.
//!
//! The subscriber is installed with `set_default`, which is thread-local: every test runs
//! on tokio's current-thread runtime and spawns its server into that same runtime, so the
//! server's tasks are polled on the thread whose subscriber records the events.

#![cfg(all(feature = "trace", feature = "axum", feature = "tonic"))]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use battlement::key::PeerAddr;
use battlement::trace::{TraceContext, TraceLayer};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::Code;
use tonic::transport::Endpoint;
use tonic::transport::server::TcpIncoming;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tower::ServiceBuilder;
use tower_http::add_extension::AddExtensionLayer;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};
use tracing_subscriber::{Layer, Registry};

// ---------------------------------------------------------------------------------------
// The test subscriber.

#[derive(Clone, Debug)]
struct Captured {
    level: Level,
    target: String,
    fields: BTreeMap<String, String>,
}

impl Captured {
    fn get(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }

    fn field(&self, name: &str) -> &str {
        self.get(name)
            .unwrap_or_else(|| panic!("no field {name} in {:?}", self.fields))
    }
}

#[derive(Default)]
struct Fields(BTreeMap<String, String>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

/// Records every event's level, target and fields.
#[derive(Clone, Default)]
struct Collector(Arc<Mutex<Vec<Captured>>>);

impl<S: Subscriber> Layer<S> for Collector {
    fn on_event(&self, event: &Event<'_>, _ctx: LayerContext<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        self.0.lock().unwrap().push(Captured {
            level: *event.metadata().level(),
            target: event.metadata().target().to_owned(),
            fields: fields.0,
        });
    }
}

struct Logs {
    collector: Collector,
    _guard: tracing::subscriber::DefaultGuard,
}

impl Logs {
    /// Every event at every level, for this thread only: install it before the server is
    /// spawned, and keep it until the end of the test.
    fn capture() -> Self {
        let collector = Collector::default();
        let subscriber = Registry::default()
            .with(collector.clone())
            .with(tracing_subscriber::filter::LevelFilter::TRACE);
        let guard = tracing::subscriber::set_default(subscriber);
        Self {
            collector,
            _guard: guard,
        }
    }

    /// The per-request events of the trace layer.
    fn requests(&self) -> Vec<Captured> {
        self.collector
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.target == "battlement::trace")
            .cloned()
            .collect()
    }

    /// Waits (up to 2 s) until the trace layer has emitted `n` events, and returns them.
    /// The server emits an event when the response body ends, which may be a moment after
    /// the client has seen the response: the sleeps let the server's tasks run.
    async fn wait_for(&self, n: usize) -> Vec<Captured> {
        for _ in 0..200 {
            let events = self.requests();
            if events.len() >= n {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let events = self.requests();
        assert!(
            events.len() >= n,
            "expected {n} trace events within 2 s, got {events:#?}"
        );
        events
    }

    /// The one event of the one request served; fails if a second one shows up.
    async fn only_request(&self) -> Captured {
        let mut events = self.wait_for(1).await;
        // Anything emitted twice would arrive right after the first.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let later = self.requests();
        assert_eq!(later.len(), 1, "exactly one event per request: {later:#?}");
        events.remove(0)
    }
}

// ---------------------------------------------------------------------------------------
// tonic 0.14
// ---------------------------------------------------------------------------------------

const HEALTH_CHECK_PATH: &str = "/grpc.health.v1.Health/Check";

/// Serves the gRPC health service behind a default [`TraceLayer`] on a fresh loopback port.
async fn serve_tonic() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(async move {
        // Keep the reporter alive with the server.
        let _reporter = reporter;
        tonic::transport::Server::builder()
            .layer(TraceLayer::new())
            .add_service(health)
            .serve_with_incoming(TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    addr
}

async fn health_client(addr: SocketAddr) -> HealthClient<tonic::transport::Channel> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to the tonic server");
    HealthClient::new(channel)
}

fn check(service: &str) -> tonic::Request<HealthCheckRequest> {
    tonic::Request::new(HealthCheckRequest {
        service: service.to_owned(),
    })
}

#[tokio::test]
async fn tonic_grpc_status_from_trailers_only_and_from_trailers() {
    let logs = Logs::capture();
    let addr = serve_tonic().await;
    let mut client = health_client(addr).await;

    // An unknown service: tonic-health answers NOT_FOUND, as a trailers-only response
    // (HTTP 200, grpc-status 5 in the head).
    let mut unknown = check("no.such.Service");
    unknown
        .metadata_mut()
        .insert("x-request-id", "grpc-check-1".parse().unwrap());
    let status = client
        .check(unknown)
        .await
        .expect_err("an unregistered service is NOT_FOUND");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(
        status
            .metadata()
            .get("x-request-id")
            .expect("x-request-id in the status metadata")
            .to_str()
            .unwrap(),
        "grpc-check-1",
        "the caller's valid request id is echoed"
    );

    let event = logs.only_request().await;
    assert_eq!(event.field("rpc.grpc.status_code"), "5", "{event:#?}");
    assert_eq!(event.field("http.response.status_code"), "200");
    // NOT_FOUND is the caller's problem, not a server error.
    assert_eq!(event.level, Level::INFO, "{event:#?}");
    assert_eq!(event.field("outcome"), "completed");
    assert_eq!(event.field("request_id"), "grpc-check-1");
    assert_eq!(event.field("http.request.method"), "POST");
    assert_eq!(event.field("url.path"), HEALTH_CHECK_PATH);
    // The peer address from tonic's TcpConnectInfo.
    assert_eq!(event.field("client.address"), "127.0.0.1");
    assert_eq!(event.get("error.type"), None, "{event:#?}");

    // The server's own health ("" is registered as SERVING): grpc-status 0, sent in the
    // trailers after one message.
    let res = client
        .check(check(""))
        .await
        .expect("the server's health is registered");
    let generated = res
        .metadata()
        .get("x-request-id")
        .expect("x-request-id in the response metadata")
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(res.into_inner().status, ServingStatus::Serving as i32);
    // No id was sent: a UUIDv7 was made.
    assert_eq!(generated.len(), 36, "generated id {generated:?}");

    let events = logs.wait_for(2).await;
    assert_eq!(events.len(), 2, "{events:#?}");
    let event = &events[1];
    assert_eq!(event.field("rpc.grpc.status_code"), "0", "{event:#?}");
    assert_eq!(event.field("http.response.status_code"), "200");
    assert_eq!(event.level, Level::INFO, "{event:#?}");
    assert_eq!(event.field("outcome"), "completed", "{event:#?}");
    assert_eq!(event.field("request_id"), generated);
    // One length-prefixed HealthCheckResponse{status: SERVING}: 5 bytes of prefix and 2 of
    // message.
    assert_eq!(event.field("http.response.body.size"), "7", "{event:#?}");
}

// ---------------------------------------------------------------------------------------
// plain hyper 1
// ---------------------------------------------------------------------------------------

/// Serves `handler` behind a default [`TraceLayer`] with a hand-written hyper accept loop
/// that records each connection's peer address as a [`PeerAddr`] extension.
async fn serve_hyper<F, Fut, B>(handler: F) -> SocketAddr
where
    F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: Body<Data = Bytes, Error = Infallible> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let layer = TraceLayer::new();
    tokio::spawn(async move {
        loop {
            let (stream, remote) = listener.accept().await.unwrap();
            let service = ServiceBuilder::new()
                .layer(AddExtensionLayer::new(PeerAddr(remote)))
                .layer(layer.clone())
                .service_fn(handler.clone());
            tokio::spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                // A connection the client drops is not a test failure.
                let _ = builder
                    .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
                    .await;
            });
        }
    });
    addr
}

const FIRST_CHUNK: &[u8] = b"the first chunk of a stream that never ends";

/// A response body that sends [`FIRST_CHUNK`] and then waits forever.
struct Endless {
    first: Option<Bytes>,
}

impl Body for Endless {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.first.take() {
            Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
            None => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        false
    }
}

async fn endless(_req: Request<hyper::body::Incoming>) -> Result<Response<Endless>, Infallible> {
    Ok(Response::new(Endless {
        first: Some(Bytes::from_static(FIRST_CHUNK)),
    }))
}

/// Whether `haystack` contains `needle`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn hyper_client_abort_mid_stream_is_client_aborted_with_bytes_sent() {
    let logs = Logs::capture();
    let addr = serve_hyper(endless).await;

    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let read_first_chunk = async {
        while !contains(&received, FIRST_CHUNK) {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "the server closed the connection: {received:?}");
            received.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(2), read_first_chunk)
        .await
        .expect("the first chunk within 2 s");
    let head = String::from_utf8_lossy(&received).into_owned();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase().contains("x-request-id: "),
        "{head}"
    );

    // The response is still streaming: the request has not ended, so no event yet.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        logs.requests().is_empty(),
        "no event before the body ends: {:#?}",
        logs.requests()
    );

    // The client goes away mid-stream.
    drop(stream);

    let event = logs.only_request().await;
    assert_eq!(event.field("outcome"), "client_aborted", "{event:#?}");
    assert_eq!(
        event.field("http.response.body.size"),
        FIRST_CHUNK.len().to_string(),
        "the bytes of the frames sent before the abort: {event:#?}"
    );
    assert_eq!(event.field("http.response.status_code"), "200");
    assert_eq!(event.field("url.path"), "/stream");
    assert_eq!(event.field("client.address"), "127.0.0.1");
    // A departing client is not a server error.
    assert_eq!(event.level, Level::INFO, "{event:#?}");
    assert_eq!(event.get("error.type"), None, "{event:#?}");
    assert!(event.get("ttfb_ms").is_some(), "{event:#?}");
}

/// Echoes the trace id and parent span id the handler finds in its extensions.
async fn echo_trace(
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let trace = req
        .extensions()
        .get::<TraceContext>()
        .expect("TraceContext in the extensions");
    let parent = trace
        .parent_span_id()
        .map_or_else(|| "none".to_owned(), |s| s.to_string());
    Ok(Response::new(Full::new(Bytes::from(format!(
        "{} {parent}",
        trace.trace_id()
    )))))
}

#[tokio::test]
async fn hyper_full_response_keeps_request_id_and_continues_trace() {
    let logs = Logs::capture();
    let addr = serve_hyper(echo_trace).await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();

    let req = Request::get(format!("http://{addr}/orders/7?token=secret"))
        .header("x-request-id", "abc.123")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .body(Full::default())
        .unwrap();
    let res = client.request(req).await.expect("request failed");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.headers()
            .get("x-request-id")
            .expect("x-request-id on the response"),
        "abc.123"
    );
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let expected_body = "4bf92f3577b34da6a3ce929d0e0e4736 00f067aa0ba902b7";
    assert_eq!(body, expected_body, "the handler is in the caller's trace");

    let event = logs.only_request().await;
    assert_eq!(event.field("outcome"), "completed", "{event:#?}");
    assert_eq!(event.field("request_id"), "abc.123");
    assert_eq!(event.field("trace_id"), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(event.get("trace.link"), None, "{event:#?}");
    assert_eq!(event.field("client.address"), "127.0.0.1");
    assert_eq!(event.field("http.response.status_code"), "200");
    assert_eq!(event.field("http.request.method"), "GET");
    assert_eq!(event.field("url.path"), "/orders/7");
    assert_eq!(event.field("url.query"), "token=[redacted]", "{event:#?}");
    // No route template source: the raw path is not used as one.
    assert_eq!(event.get("http.route"), None, "{event:#?}");
    assert_eq!(
        event.field("http.response.body.size"),
        expected_body.len().to_string()
    );
    assert_eq!(event.get("rpc.grpc.status_code"), None, "{event:#?}");
    assert_eq!(event.level, Level::INFO, "{event:#?}");
}

/// A body of two chunks, with its length declared in `Content-Length`, that never says it
/// has ended (a stream whose producer is still around): hyper's HTTP/1 server writes the
/// declared bytes and drops it without waiting for an end.
struct DeclaredNeverEnds {
    chunks: Vec<Bytes>,
}

impl Body for DeclaredNeverEnds {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.chunks.pop() {
            Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
            None => Poll::Pending,
        }
    }
}

async fn declared(
    _req: Request<hyper::body::Incoming>,
) -> Result<Response<DeclaredNeverEnds>, Infallible> {
    let mut res = Response::new(DeclaredNeverEnds {
        chunks: vec![Bytes::from_static(b"second"), Bytes::from_static(b"first,")],
    });
    res.headers_mut()
        .insert(http::header::CONTENT_LENGTH, "12".parse().unwrap());
    Ok(res)
}

#[tokio::test]
async fn a_streamed_body_of_declared_length_sent_whole_is_completed() {
    let logs = Logs::capture();
    let addr = serve_hyper(declared).await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let res = client
        .get(format!("http://{addr}/download").parse().unwrap())
        .await
        .unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "first,second");
    let event = logs.only_request().await;
    assert_eq!(event.field("outcome"), "completed", "{event:#?}");
    assert_eq!(event.field("http.response.body.size"), "12");
}
