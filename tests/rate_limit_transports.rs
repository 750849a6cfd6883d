//! The rate-limit layer through real servers and real clients on loopback: an axum router,
//! a plain hyper 1 server, and a tonic gRPC server.
//!
//! Every quota is 3 requests per 60 s, so no test depends on timing: the bucket cannot
//! refill while a test runs. Some tests connect from a second loopback address
//! (127.0.0.2, part of Linux's 127.0.0.0/8 loopback network) to show that the peer address
//! the server records is what the layer keys on.

#![cfg(all(feature = "axum", feature = "tonic"))]

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use battlement::body::BodyMode;
use battlement::key::{ClientIp, Header, KeyExtractor, PeerAddr};
use battlement::rate_limit::{MemoryBackend, Quota, RateLimitLayer};
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use serde_json::Value;
use tokio::net::TcpListener;
use tonic::Code;
use tonic::transport::Endpoint;
use tonic::transport::server::TcpIncoming;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tower::ServiceBuilder;
use tower_http::add_extension::AddExtensionLayer;

const QUOTA_EXCEEDED: &str = "https://iana.org/assignments/http-problem-types#quota-exceeded";
/// What `RateLimit-Policy` says for [`quota`]: burst 3, window 60 s.
const POLICY_HEADER: &str = r#""burst";q=3;w=60"#;
/// The second loopback address clients connect from to be a different client.
const OTHER_CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// 3 requests per minute: one request's capacity comes back every 20 s.
fn quota() -> Quota {
    Quota::requests_per(3, Duration::from_secs(60))
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A client whose connections come from `local`.
fn client_from(local: IpAddr) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_local_address(Some(local));
    Client::builder(TokioExecutor::new()).build(connector)
}

/// A response, read in full.
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
            .to_str()
            .unwrap()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

async fn send(client: &HttpClient, req: Request<Full<Bytes>>) -> Reply {
    let res = client.request(req).await.expect("request failed");
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body,
    }
}

fn request(method: Method, addr: SocketAddr, path: &str) -> http::request::Builder {
    Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
}

async fn get_path(client: &HttpClient, addr: SocketAddr, path: &str) -> Reply {
    let req = request(Method::GET, addr, path)
        .body(Full::default())
        .unwrap();
    send(client, req).await
}

/// Parses a one-policy `RateLimit` field, `"burst";r=R;t=T`, into `(R, T)`.
fn parse_ratelimit(value: &str) -> (u64, u64) {
    let parts: Vec<&str> = value.split(';').collect();
    assert_eq!(parts.len(), 3, "unexpected RateLimit field {value:?}");
    assert_eq!(parts[0], r#""burst""#, "RateLimit field {value:?}");
    let r = parts[1]
        .strip_prefix("r=")
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no r= in RateLimit field {value:?}"));
    let t = parts[2]
        .strip_prefix("t=")
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no t= in RateLimit field {value:?}"));
    (r, t)
}

/// Checks everything a refusal of the `burst` policy ([`quota`]) must carry over HTTP.
fn assert_refused(reply: &Reply) {
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.header("content-type"), "application/problem+json");

    // Whole seconds, at least 1, and never more than one request's interval (20 s).
    let retry_after: u64 = reply.header("retry-after").parse().unwrap_or_else(|_| {
        panic!(
            "Retry-After {:?} is not whole seconds",
            reply.header("retry-after")
        )
    });
    assert!((1..=20).contains(&retry_after), "Retry-After {retry_after}");

    assert_eq!(reply.header("ratelimit-policy"), POLICY_HEADER);
    let (remaining, reset) = parse_ratelimit(reply.header("ratelimit"));
    assert_eq!(remaining, 0, "a refused key has nothing left");
    assert!((1..=60).contains(&reset), "reset t={reset}");

    let doc = reply.json();
    assert_eq!(doc["status"], 429);
    assert_eq!(doc["type"], QUOTA_EXCEEDED);
    assert_eq!(doc["title"], "Too Many Requests");
    assert_eq!(doc["violated-policies"], serde_json::json!(["burst"]));
}

// ---------------------------------------------------------------------------------------
// axum 0.8
// ---------------------------------------------------------------------------------------

/// Serves `app` with `ConnectInfo<SocketAddr>` on a fresh loopback port.
async fn serve_axum(app: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    addr
}

fn axum_app(layer: RateLimitLayer) -> Router {
    Router::new()
        .route(
            "/hello",
            get(|| async { "hello" }).options(|| async { StatusCode::NO_CONTENT }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .layer(layer)
}

#[tokio::test]
async fn axum_refuses_after_quota_with_problem_json_and_ratelimit_headers() {
    let layer = RateLimitLayer::builder()
        .policy("burst", quota())
        .key(ClientIp::new())
        .build()
        .unwrap();
    let addr = serve_axum(axum_app(layer.clone())).await;
    let client = client();

    for i in 0..3 {
        let reply = get_path(&client, addr, "/hello").await;
        assert_eq!(reply.status, StatusCode::OK, "request {i}");
        assert_eq!(reply.body, "hello", "the handler ran for request {i}");
        // headers_on_success is off by default.
        assert!(!reply.headers.contains_key("ratelimit"), "request {i}");
        assert!(
            !reply.headers.contains_key("ratelimit-policy"),
            "request {i}"
        );
    }

    let refused = get_path(&client, addr, "/hello").await;
    assert_refused(&refused);
    // A refusal uses no quota, and the next request is refused the same way.
    assert_refused(&get_path(&client, addr, "/hello").await);

    // The key is the peer address axum recorded in ConnectInfo: another client address
    // has its whole quota, and the layer now tracks two keys.
    let other = client_from(OTHER_CLIENT);
    for i in 0..3 {
        let reply = get_path(&other, addr, "/hello").await;
        assert_eq!(reply.status, StatusCode::OK, "other client, request {i}");
    }
    assert_refused(&get_path(&other, addr, "/hello").await);
    assert_eq!(layer.backend().tracked_keys(), 2);
}

/// The native body mode on an axum router: the layer's service answers axum's own
/// `Response<Body>` (checked at compile time), and refusals are the same problem+json.
#[tokio::test]
async fn axum_native_body_passes_axum_responses_and_refuses_the_same_way() {
    use axum::body::Body;
    use tower::{Layer, Service};

    let layer = RateLimitLayer::builder()
        .policy("burst", quota())
        .key(ClientIp::new())
        .native_body()
        .build()
        .unwrap();
    fn answers_axum_body<S: Service<Request<Body>, Response = Response<Body>>>(_: &S) {}
    answers_axum_body(&layer.layer(Router::new().route("/", get(|| async { "hi" }))));

    let app = Router::new()
        .route("/hello", get(|| async { "hello" }))
        .layer(layer.clone());
    let addr = serve_axum(app).await;
    let client = client();
    for i in 0..3 {
        let reply = get_path(&client, addr, "/hello").await;
        assert_eq!(reply.status, StatusCode::OK, "request {i}");
        assert_eq!(reply.body, "hello", "the handler's body, request {i}");
    }
    assert_refused(&get_path(&client, addr, "/hello").await);
    assert_eq!(layer.backend().tracked_keys(), 1);
}

#[tokio::test]
async fn axum_headers_on_success_count_down() {
    let layer = RateLimitLayer::builder()
        .policy("burst", quota())
        .key(ClientIp::new())
        .headers_on_success(true)
        .build()
        .unwrap();
    let addr = serve_axum(axum_app(layer)).await;
    let client = client();

    let mut remaining = Vec::new();
    for i in 0..3 {
        let reply = get_path(&client, addr, "/hello").await;
        assert_eq!(reply.status, StatusCode::OK, "request {i}");
        assert_eq!(reply.header("ratelimit-policy"), POLICY_HEADER);
        let (r, t) = parse_ratelimit(reply.header("ratelimit"));
        assert!((1..=60).contains(&t), "reset t={t} on request {i}");
        remaining.push(r);
    }
    assert_eq!(remaining, [2, 1, 0], "r= counts down as quota is used");

    assert_refused(&get_path(&client, addr, "/hello").await);
}

#[tokio::test]
async fn axum_exempt_routes_and_cors_preflights_are_not_counted() {
    let layer = RateLimitLayer::builder()
        .policy("burst", quota())
        .key(ClientIp::new())
        .exempt(|head| head.uri.path() == "/healthz")
        .build()
        .unwrap();
    let addr = serve_axum(axum_app(layer.clone())).await;
    let client = client();

    let preflight = || {
        request(Method::OPTIONS, addr, "/hello")
            .header("origin", "https://app.example")
            .header("access-control-request-method", "GET")
            .body(Full::default())
            .unwrap()
    };

    // Far more than the quota of exempt requests and preflights.
    for i in 0..10 {
        let reply = get_path(&client, addr, "/healthz").await;
        assert_eq!(reply.status, StatusCode::OK, "healthz {i}");
        assert_eq!(reply.body, "ok");
        let reply = send(&client, preflight()).await;
        assert_eq!(reply.status, StatusCode::NO_CONTENT, "preflight {i}");
    }
    // Nothing was charged: no key was even looked at.
    assert_eq!(layer.backend().tracked_keys(), 0);

    // The whole quota is still there for the limited route.
    for i in 0..3 {
        let reply = get_path(&client, addr, "/hello").await;
        assert_eq!(reply.status, StatusCode::OK, "request {i}");
    }
    assert_refused(&get_path(&client, addr, "/hello").await);

    // Once the key is limited, exempt routes and preflights still get through...
    assert_eq!(
        get_path(&client, addr, "/healthz").await.status,
        StatusCode::OK
    );
    assert_eq!(
        send(&client, preflight()).await.status,
        StatusCode::NO_CONTENT
    );
    // ...but an OPTIONS request that is not a preflight is counted like any other.
    let plain_options = request(Method::OPTIONS, addr, "/hello")
        .body(Full::default())
        .unwrap();
    assert_refused(&send(&client, plain_options).await);
}

// ---------------------------------------------------------------------------------------
// plain hyper 1
// ---------------------------------------------------------------------------------------

async fn hello(_req: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(b"hello"))))
}

/// Serves `layer` around [`hello`] with a hand-written hyper accept loop that records each
/// connection's peer address as a [`PeerAddr`] extension.
async fn serve_hyper<X: KeyExtractor, M>(
    layer: RateLimitLayer<X, MemoryBackend<X::Key>, M>,
) -> SocketAddr
where
    M: BodyMode<Full<Bytes>> + Send + 'static,
    M::Body: http_body::Body<Data = Bytes> + Send + 'static,
    <M::Body as http_body::Body>::Error: std::error::Error + Send + Sync,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, remote) = listener.accept().await.unwrap();
            let service = ServiceBuilder::new()
                .layer(AddExtensionLayer::new(PeerAddr(remote)))
                .layer(layer.clone())
                .service_fn(hello);
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

#[tokio::test]
async fn hyper_limits_each_api_key_independently() {
    let api_key = HeaderName::from_static("x-api-key");
    let layer = RateLimitLayer::builder()
        .policy("burst", quota())
        .key(Header::new(api_key.clone()))
        .build()
        .unwrap();
    let addr = serve_hyper(layer.clone()).await;
    let client = client();

    let with_key = |key: &'static str| {
        request(Method::GET, addr, "/")
            .header(&api_key, key)
            .body(Full::default())
            .unwrap()
    };

    for i in 0..3 {
        let reply = send(&client, with_key("alice")).await;
        assert_eq!(reply.status, StatusCode::OK, "alice {i}");
        assert_eq!(reply.body, "hello");
    }
    let refused = send(&client, with_key("alice")).await;
    assert_refused(&refused);

    // Bob, on the same connection pool and the same address, has his own quota.
    for i in 0..3 {
        let reply = send(&client, with_key("bob")).await;
        assert_eq!(reply.status, StatusCode::OK, "bob {i}");
    }
    assert_refused(&send(&client, with_key("bob")).await);
    // Alice is still refused: Bob's requests did not touch her bucket.
    assert_refused(&send(&client, with_key("alice")).await);
    assert_eq!(layer.backend().tracked_keys(), 2);

    // A request the extractor has no key for passes unlimited.
    for i in 0..5 {
        let reply = get_path(&client, addr, "/").await;
        assert_eq!(reply.status, StatusCode::OK, "keyless request {i}");
    }
    assert_eq!(layer.backend().tracked_keys(), 2);
}

/// The native body mode on hyper: [`hello`]'s `Full<Bytes>` is the response body type,
/// refusals included.
#[tokio::test]
async fn hyper_native_body_refuses_with_the_handlers_body_type() {
    let layer = RateLimitLayer::builder()
        .policy("burst", quota())
        .key(ClientIp::new())
        .headers_on_success(true)
        .native_body()
        .build()
        .unwrap();
    let addr = serve_hyper(layer.clone()).await;
    let client = client();
    for i in 0..3u64 {
        let reply = get_path(&client, addr, "/").await;
        assert_eq!(reply.status, StatusCode::OK, "request {i}");
        assert_eq!(reply.body, "hello");
        assert_eq!(parse_ratelimit(reply.header("ratelimit")).0, 2 - i);
    }
    assert_refused(&get_path(&client, addr, "/").await);
}

#[tokio::test]
async fn hyper_client_ip_reads_the_peer_addr_extension() {
    let layer = RateLimitLayer::builder()
        .policy("burst", quota())
        .key(ClientIp::new())
        .headers_on_success(true)
        .build()
        .unwrap();
    let addr = serve_hyper(layer.clone()).await;
    let client = client();

    for i in 0..3u64 {
        let reply = get_path(&client, addr, "/").await;
        assert_eq!(reply.status, StatusCode::OK, "request {i}");
        assert_eq!(reply.header("ratelimit-policy"), POLICY_HEADER);
        assert_eq!(parse_ratelimit(reply.header("ratelimit")).0, 2 - i);
    }
    assert_refused(&get_path(&client, addr, "/").await);

    // X-Forwarded-For is not believed from an untrusted peer: it cannot buy a new quota.
    let spoofed = request(Method::GET, addr, "/")
        .header("x-forwarded-for", "203.0.113.9")
        .body(Full::default())
        .unwrap();
    assert_refused(&send(&client, spoofed).await);

    // Another peer address is another client.
    let other = client_from(OTHER_CLIENT);
    let reply = get_path(&other, addr, "/").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(parse_ratelimit(reply.header("ratelimit")).0, 2);
    assert_eq!(layer.backend().tracked_keys(), 2);
}

// ---------------------------------------------------------------------------------------
// tonic 0.14
// ---------------------------------------------------------------------------------------

/// Serves the gRPC health service behind `layer` on a fresh loopback port.
async fn serve_tonic(layer: RateLimitLayer) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .layer(layer)
            .add_service(health)
            .serve_with_incoming(TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    addr
}

async fn health_client(
    addr: SocketAddr,
    local: Option<IpAddr>,
) -> HealthClient<tonic::transport::Channel> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .local_address(local)
        .connect()
        .await
        .expect("connect to the tonic server");
    HealthClient::new(channel)
}

fn check_request() -> tonic::Request<HealthCheckRequest> {
    tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    })
}

#[tokio::test]
async fn tonic_refuses_with_resource_exhausted_and_pushback() {
    let layer = RateLimitLayer::builder()
        .policy("burst", quota())
        .key(ClientIp::new())
        .build()
        .unwrap();
    let addr = serve_tonic(layer.clone()).await;
    let mut client = health_client(addr, None).await;

    for i in 0..3 {
        let res = client
            .check(check_request())
            .await
            .unwrap_or_else(|status| panic!("check {i} failed: {status:?}"));
        assert_eq!(res.into_inner().status, ServingStatus::Serving as i32);
    }

    let status = client
        .check(check_request())
        .await
        .expect_err("the fourth check is over the quota");
    // A gRPC status from the server, not a transport failure mapped to a code.
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("Rate limit exceeded"),
        "message {:?}",
        status.message()
    );
    let pushback: u64 = status
        .metadata()
        .get("grpc-retry-pushback-ms")
        .expect("grpc-retry-pushback-ms in the status metadata")
        .to_str()
        .unwrap()
        .parse()
        .expect("pushback is whole milliseconds");
    assert!((1..=20_000).contains(&pushback), "pushback {pushback} ms");
    let policy = status
        .metadata()
        .get("ratelimit-policy")
        .expect("ratelimit-policy in the status metadata");
    assert_eq!(policy.to_str().unwrap(), POLICY_HEADER);

    // On the wire the refusal is a trailers-only gRPC response: HTTP 200 with grpc-status 8,
    // not an HTTP 429 with a problem+json body.
    let h2 = {
        let mut builder = Client::builder(TokioExecutor::new());
        builder.http2_only(true);
        builder.build_http::<Full<Bytes>>()
    };
    let raw = request(Method::POST, addr, "/grpc.health.v1.Health/Check")
        .header(CONTENT_TYPE, "application/grpc")
        .header("te", "trailers")
        // An empty HealthCheckRequest: uncompressed flag and a zero length prefix.
        .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
        .unwrap();
    let reply = send(&h2, raw).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("content-type"), "application/grpc");
    assert_eq!(reply.header("grpc-status"), "8");
    assert!(reply.headers.contains_key("grpc-retry-pushback-ms"));
    assert!(
        reply.body.is_empty(),
        "trailers-only: no body, got {:?}",
        reply.body
    );

    // The key is the peer address from tonic's TcpConnectInfo: a client connecting from
    // another address still has its quota.
    let mut other = health_client(addr, Some(OTHER_CLIENT)).await;
    let res = other
        .check(check_request())
        .await
        .expect("another client address has its own quota");
    assert_eq!(res.into_inner().status, ServingStatus::Serving as i32);
    assert_eq!(layer.backend().tracked_keys(), 2);

    // And the first client is still refused.
    let status = client.check(check_request()).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
}
