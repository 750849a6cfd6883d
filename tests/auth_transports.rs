//! The auth layer through real transports: a real JWKS endpoint (a hyper 1 server on
//! loopback) behind an axum router served on loopback, a tonic gRPC server called by a real
//! tonic client, and a real `redis-server` as the revocation store.
//!
//! Keys are the test-only fixtures in `tests/fixtures/`; the JWKS documents are built from
//! `rsa_public.n` and `ec_public.xy`.

#![cfg(all(
    feature = "auth",
    feature = "axum",
    feature = "tonic",
    feature = "redis"
))]

mod support;

use std::collections::hash_map::RandomState;
use std::convert::Infallible;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use battlement::auth::{
    AuthLayer, ConfigError, Issuer, Jwks, JwksError, JwtValidator, RedisRevocation, RequireScopes,
};
use battlement::principal::Principal;
use battlement::redis::{RedisConfig, RedisStore};
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use support::RedisServer;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tonic::Code;
use tonic::transport::Endpoint;
use tonic::transport::server::TcpIncoming;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const ISS: &str = "https://issuer.test";
const AUD: &str = "orders-api";
const REALM: &str = "orders-api";
const SECRET: &[u8] = b"test secret of at least thirty-two bytes!";
const RSA_PRIVATE: &str = include_str!("fixtures/rsa_private.pem");
const EC_PRIVATE: &str = include_str!("fixtures/ec_private.pem");
/// The RSA fixture's modulus, base64url (its exponent is 65537, `AQAB`).
const RSA_N: &str = include_str!("fixtures/rsa_public.n");
/// The EC fixture's P-256 point: base64url `x` and `y` on two lines.
const EC_XY: &str = include_str!("fixtures/ec_public.xy");

// ---------------------------------------------------------------------------------------
// tokens
// ---------------------------------------------------------------------------------------

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Valid claims for [`ISS`] and [`AUD`], expiring in ten minutes.
fn claims() -> Value {
    let now = now();
    json!({
        "iss": ISS,
        "aud": AUD,
        "sub": "user-1",
        "iat": now,
        "exp": now + 600,
    })
}

fn rsa_key() -> &'static EncodingKey {
    static KEY: OnceLock<EncodingKey> = OnceLock::new();
    KEY.get_or_init(|| EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap())
}

fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    encode(&header, claims, key).unwrap()
}

/// An RS256 token signed with the RSA fixture.
fn rs256(kid: &str) -> String {
    sign(Algorithm::RS256, Some(kid), &claims(), rsa_key())
}

/// An ES256 token signed with the EC fixture.
fn es256(kid: &str) -> String {
    let key = EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap();
    sign(Algorithm::ES256, Some(kid), &claims(), &key)
}

/// An HS256 token signed with `secret`.
fn hs256(secret: &[u8], kid: Option<&str>, claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        kid,
        claims,
        &EncodingKey::from_secret(secret),
    )
}

/// A `kid` nobody has seen: 64 random bits (std's per-instance random hash keys) and `i`.
fn random_kid(i: usize) -> String {
    format!("{:016x}-{i}", RandomState::new().hash_one(i))
}

// ---------------------------------------------------------------------------------------
// JWKs and a real JWKS endpoint
// ---------------------------------------------------------------------------------------

fn rsa_jwk(kid: &str) -> Value {
    json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid, "n": RSA_N.trim(), "e": "AQAB"})
}

fn ec_jwk(kid: &str) -> Value {
    let mut lines = EC_XY.lines().map(str::trim).filter(|l| !l.is_empty());
    let (x, y) = (lines.next().unwrap(), lines.next().unwrap());
    json!({"kty": "EC", "crv": "P-256", "alg": "ES256", "kid": kid, "x": x, "y": y})
}

fn oct_jwk(kid: &str, secret: &[u8]) -> Value {
    json!({"kty": "oct", "alg": "HS256", "kid": kid, "k": URL_SAFE_NO_PAD.encode(secret)})
}

fn jwks_document(keys: &[Value]) -> String {
    json!({ "keys": keys }).to_string()
}

/// A JWKS endpoint: a hyper 1 HTTP/1.1 server on 127.0.0.1 answering every request with the
/// shared document (or with an empty body and another status), counting the requests.
struct JwksServer {
    url: String,
    document: Arc<Mutex<String>>,
    status: Arc<AtomicU16>,
    delay_ms: Arc<AtomicU64>,
    hits: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl JwksServer {
    async fn start(keys: &[Value]) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let document = Arc::new(Mutex::new(jwks_document(keys)));
        let status = Arc::new(AtomicU16::new(200));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let hits = Arc::new(AtomicUsize::new(0));
        let (doc, st, delay, count) = (
            document.clone(),
            status.clone(),
            delay_ms.clone(),
            hits.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (doc, st, delay, count) =
                    (doc.clone(), st.clone(), delay.clone(), count.clone());
                let service = service_fn(move |req: Request<Incoming>| {
                    let (doc, st, delay, count) =
                        (doc.clone(), st.clone(), delay.clone(), count.clone());
                    async move {
                        assert_eq!(req.uri().path(), "/jwks");
                        count.fetch_add(1, Ordering::SeqCst);
                        let wait = delay.load(Ordering::SeqCst);
                        if wait > 0 {
                            tokio::time::sleep(Duration::from_millis(wait)).await;
                        }
                        let status = st.load(Ordering::SeqCst);
                        let body = if status == 200 {
                            doc.lock().unwrap().clone()
                        } else {
                            String::new()
                        };
                        let res = Response::builder()
                            .status(status)
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(body)))
                            .unwrap();
                        Ok::<_, Infallible>(res)
                    }
                });
                tokio::spawn(async move {
                    // A client that drops its connection is not a failure.
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        JwksServer {
            url: format!("http://{addr}/jwks"),
            document,
            status,
            delay_ms,
            hits,
            task,
        }
    }

    fn serve_keys(&self, keys: &[Value]) {
        *self.document.lock().unwrap() = jwks_document(keys);
    }

    fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------
// an axum app on loopback, and an HTTP client
// ---------------------------------------------------------------------------------------

fn jwks_validator(jwks: Jwks) -> JwtValidator {
    JwtValidator::builder()
        .issuer(Issuer::new(ISS, [AUD]).jwks(jwks))
        .algorithms([Algorithm::RS256, Algorithm::ES256])
        .build()
        .unwrap()
}

fn auth(validator: JwtValidator) -> AuthLayer {
    AuthLayer::builder()
        .jwt(validator)
        .realm(REALM)
        .build()
        .unwrap()
}

/// `/me` answers the principal's subject.
async fn serve_app(layer: AuthLayer) -> SocketAddr {
    let app = Router::new()
        .route(
            "/me",
            get(|req: Request<Body>| async move {
                Principal::of(req.extensions())
                    .map(|p| p.subject().to_owned())
                    .unwrap_or_default()
            }),
        )
        .layer(layer);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    addr
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A response, read in full.
#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header in {self:?}"))
            .to_str()
            .unwrap()
    }
}

/// `GET /me` with the token (if any) as a bearer token; as a gRPC call when `grpc`.
async fn call(client: &HttpClient, addr: SocketAddr, token: Option<&str>, grpc: bool) -> Reply {
    let mut req = Request::get(format!("http://{addr}/me"));
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    if grpc {
        req = req.header("content-type", "application/grpc");
    }
    let res = client
        .request(req.body(Full::default()).unwrap())
        .await
        .expect("request failed");
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    Reply {
        status,
        headers,
        body: String::from_utf8(body.to_vec()).unwrap(),
    }
}

async fn me(client: &HttpClient, addr: SocketAddr, token: &str) -> Reply {
    call(client, addr, Some(token), false).await
}

/// Asserts an accepted request whose handler saw the principal `user-1`.
fn assert_ok(reply: &Reply, what: &str) {
    assert_eq!(reply.status, StatusCode::OK, "{what}: {reply:?}");
    assert_eq!(
        reply.body, "user-1",
        "{what}: the handler sees the principal"
    );
}

/// Asserts a 401 `invalid_token` whose description contains `why`, and that `token` is
/// echoed nowhere.
fn assert_invalid_token(reply: &Reply, token: &str, why: &str) {
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{why}: {reply:?}");
    let challenge = reply.header("www-authenticate");
    assert!(
        challenge.starts_with(&format!(
            "Bearer realm=\"{REALM}\", error=\"invalid_token\", error_description=\""
        )),
        "{challenge}"
    );
    assert!(challenge.contains(why), "{challenge} should say {why}");
    assert_eq!(reply.header("content-type"), "application/problem+json");
    assert_no_token(reply, token);
}

fn assert_no_token(reply: &Reply, token: &str) {
    let signature = token.rsplit('.').next().unwrap();
    assert!(
        !reply.body.contains(signature),
        "token in the body: {reply:?}"
    );
    for (name, value) in &reply.headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        assert!(!value.contains(signature), "token in {name}: {value}");
    }
}

/// Polls `f` every 25 ms for up to `limit`: whether it became true.
async fn within<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    while started.elapsed() < limit {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

// ---------------------------------------------------------------------------------------
// 1. JWKS through the layer
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn jwks_keys_verify_tokens_and_a_rotated_key_costs_exactly_one_fetch() {
    let server = JwksServer::start(&[rsa_jwk("k1")]).await;
    let jwks = Jwks::from_url(&server.url)
        .algorithms([Algorithm::RS256, Algorithm::ES256])
        .unknown_kid_cooldown(Duration::from_secs(30))
        .build()
        .await
        .unwrap();
    assert_eq!(server.hits(), 1, "build fetches the key set once");
    let addr = serve_app(auth(jwks_validator(jwks.clone()))).await;
    let client = client();

    // a. A token signed with the RSA key, kid k1: the key set has it, no fetch.
    let k1 = rs256("k1");
    for i in 0..3 {
        assert_ok(&me(&client, addr, &k1).await, &format!("k1 #{i}"));
    }
    assert_eq!(server.hits(), 1, "known keys are served without fetching");
    // The EC token is not verifiable yet: the set has no k2, and the fetch it causes
    // still finds none.
    let k2 = es256("k2");
    let before = server.hits();
    assert_invalid_token(&me(&client, addr, &k2).await, &k2, "no key matches");
    assert_eq!(server.hits(), before + 1, "an unknown kid refreshes once");

    // b. Rotation on a fresh validator (its cooldown unused): the issuer adds the EC key
    // as k2; the first token with kid k2 costs exactly one fetch.
    let jwks = Jwks::from_url(&server.url)
        .algorithms([Algorithm::RS256, Algorithm::ES256])
        .unknown_kid_cooldown(Duration::from_secs(30))
        .build()
        .await
        .unwrap();
    let addr = serve_app(auth(jwks_validator(jwks.clone()))).await;
    let base = server.hits();
    assert_ok(&me(&client, addr, &k1).await, "k1 before the rotation");
    server.serve_keys(&[rsa_jwk("k1"), ec_jwk("k2")]);
    assert_eq!(
        server.hits(),
        base,
        "nothing fetched before a k2 token arrives"
    );
    assert_ok(&me(&client, addr, &k2).await, "k2 after the rotation");
    assert_eq!(
        server.hits(),
        base + 1,
        "the rotation cost exactly one fetch"
    );
    let kids: Vec<String> = jwks
        .current()
        .unwrap()
        .keys()
        .map(|k| k.kid().unwrap().to_owned())
        .collect();
    assert_eq!(kids, ["k1", "k2"]);
    // Both keys now verify from the swapped-in set, without fetching again.
    for _ in 0..3 {
        assert_ok(&me(&client, addr, &k2).await, "k2 again");
        assert_ok(&me(&client, addr, &k1).await, "k1 again");
    }
    assert_eq!(server.hits(), base + 1);
    // Another unknown kid within the cooldown is refused without a fetch.
    let k3 = rs256("k3");
    assert_invalid_token(&me(&client, addr, &k3).await, &k3, "no key matches");
    assert_eq!(server.hits(), base + 1, "the cooldown holds the next fetch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_unknown_kids_costs_at_most_one_fetch() {
    const STORM: usize = 100;
    const VALID: usize = 20;
    const FETCH_DELAY: Duration = Duration::from_secs(1);
    let server = JwksServer::start(&[rsa_jwk("k1")]).await;
    let jwks = Jwks::from_url(&server.url)
        .algorithms([Algorithm::RS256, Algorithm::ES256])
        .unknown_kid_cooldown(Duration::from_secs(30))
        .build()
        .await
        .unwrap();
    assert_eq!(server.hits(), 1);
    let addr = serve_app(auth(jwks_validator(jwks))).await;
    let client = client();
    let valid = rs256("k1");
    assert_ok(&me(&client, addr, &valid).await, "before the storm");

    // The endpoint is slow, so every storm request arrives while the one fetch is in
    // flight: they must all join it, not start their own.
    server.set_delay(FETCH_DELAY);
    let forged: Vec<String> = (0..STORM).map(|i| rs256(&random_kid(i))).collect();
    let mut storm = JoinSet::new();
    for token in forged {
        let client = client.clone();
        storm.spawn(async move {
            let reply = me(&client, addr, &token).await;
            (token, reply)
        });
    }
    // Valid tokens during the storm are answered from the key set in memory, not held
    // behind the storm's fetch.
    let mut valid_calls = JoinSet::new();
    for _ in 0..VALID {
        let (client, token) = (client.clone(), valid.clone());
        valid_calls.spawn(async move {
            let started = Instant::now();
            let reply = me(&client, addr, &token).await;
            (reply, started.elapsed())
        });
    }
    let storm_started = Instant::now();
    let mut refused = 0;
    while let Some(joined) = storm.join_next().await {
        let (token, reply) = joined.unwrap();
        assert_invalid_token(&reply, &token, "no key matches");
        refused += 1;
    }
    assert_eq!(refused, STORM);
    let mut accepted = 0;
    while let Some(joined) = valid_calls.join_next().await {
        let (reply, took) = joined.unwrap();
        assert_ok(&reply, "a valid token during the storm");
        assert!(
            took < FETCH_DELAY,
            "a valid token waited {took:?} for the storm's fetch"
        );
        accepted += 1;
    }
    assert_eq!(accepted, VALID);
    assert!(
        storm_started.elapsed() < Duration::from_secs(10),
        "the storm took {:?}",
        storm_started.elapsed()
    );
    assert_eq!(
        server.hits(),
        2,
        "{STORM} unknown kids at once must cost at most one fetch (and the first one \
         causes it)"
    );

    // A second wave inside the cooldown, with new kids and repeated ones: no fetch at all.
    server.set_delay(Duration::ZERO);
    let mut wave = JoinSet::new();
    for i in 0..40 {
        let client = client.clone();
        let token = rs256(&random_kid(i % 20));
        wave.spawn(async move { (me(&client, addr, &token).await, token) });
    }
    while let Some(joined) = wave.join_next().await {
        let (reply, token) = joined.unwrap();
        assert_invalid_token(&reply, &token, "no key matches");
    }
    assert_eq!(server.hits(), 2, "the cooldown covers later storms");
    assert_ok(&me(&client, addr, &valid).await, "after the storm");
}

#[tokio::test]
async fn an_oct_key_in_a_jwks_is_never_used() {
    let server = JwksServer::start(&[rsa_jwk("k1"), oct_jwk("h1", SECRET)]).await;
    let jwks = Jwks::from_url(&server.url)
        .algorithms([Algorithm::RS256, Algorithm::ES256])
        .build()
        .await
        .unwrap();
    // The shared secret was not loaded at all.
    let keys = jwks.current().unwrap();
    let kids: Vec<(Option<&str>, Algorithm)> =
        keys.keys().map(|k| (k.kid(), k.algorithm())).collect();
    assert_eq!(kids, [(Some("k1"), Algorithm::RS256)]);

    let addr = serve_app(auth(jwks_validator(jwks.clone()))).await;
    let client = client();
    assert_ok(&me(&client, addr, &rs256("k1")).await, "the RSA key works");

    // An HS256 token signed with the JWKS's own secret and naming its kid.
    let hs = hs256(SECRET, Some("h1"), &claims());
    let hits = server.hits();
    assert_invalid_token(&me(&client, addr, &hs).await, &hs, "algorithm");
    assert_eq!(server.hits(), hits, "refused before any key lookup");
    // The same without a kid.
    let hs = hs256(SECRET, None, &claims());
    assert_invalid_token(&me(&client, addr, &hs).await, &hs, "algorithm");
    // The kid h1 names no key for any algorithm either.
    let rs = rs256("h1");
    assert_invalid_token(&me(&client, addr, &rs).await, &rs, "no key matches");
    assert_eq!(server.hits(), hits + 1);
    assert_eq!(jwks.current().unwrap().len(), 1);

    // HMAC cannot even be configured next to a JWKS.
    assert!(matches!(
        Jwks::from_url(&server.url)
            .algorithms([Algorithm::RS256, Algorithm::HS256])
            .build_lazy(),
        Err(JwksError::Config(_))
    ));
    assert!(matches!(
        JwtValidator::builder()
            .issuer(Issuer::new(ISS, [AUD]).jwks(jwks))
            .algorithms([Algorithm::HS256])
            .build(),
        Err(ConfigError::MixedAlgorithms)
    ));
    // A key set of nothing but a shared secret is no key set.
    server.serve_keys(&[oct_jwk("h1", SECRET)]);
    let built = Jwks::from_url(&server.url)
        .algorithms([Algorithm::RS256, Algorithm::ES256])
        .build()
        .await;
    assert_eq!(built.unwrap_err(), JwksError::NoUsableKeys);
}

#[tokio::test]
async fn a_failing_jwks_endpoint_serves_stale_keys_then_503_then_recovers() {
    const MAX_STALE: Duration = Duration::from_millis(300);
    const REFRESH: Duration = Duration::from_millis(200);
    let server = JwksServer::start(&[rsa_jwk("k1")]).await;
    let jwks = Jwks::from_url(&server.url)
        .algorithms([Algorithm::RS256, Algorithm::ES256])
        .refresh_interval(REFRESH, REFRESH)
        .max_stale(MAX_STALE)
        .timeout(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    let addr = serve_app(auth(jwks_validator(jwks.clone()))).await;
    let client = client();
    let token = rs256("k1");
    assert_ok(&me(&client, addr, &token).await, "endpoint up");

    // Fresh keys, then the endpoint fails.
    jwks.refresh().await.unwrap();
    let fetched_at = Instant::now();
    server.set_status(500);
    assert_eq!(jwks.refresh().await, Err(JwksError::Status(500)));
    let hits_down = server.hits();
    // The last good keys are still served.
    assert_ok(&me(&client, addr, &token).await, "stale keys are served");

    // Once they are due (~200 ms) plus max_stale (300 ms), they are not trusted any more.
    let polling = Instant::now();
    let reply = loop {
        let reply = me(&client, addr, &token).await;
        if reply.status == StatusCode::SERVICE_UNAVAILABLE {
            break reply;
        }
        assert_ok(&reply, "before max_stale");
        assert!(
            polling.elapsed() < Duration::from_secs(5),
            "the keys never went stale"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let since_fetch = fetched_at.elapsed();
    // Due after at least 180 ms (the interval less its 10% jitter), plus max_stale.
    assert!(
        since_fetch >= Duration::from_millis(450),
        "refused {since_fetch:?} after the last good fetch, before max_stale"
    );
    assert_eq!(reply.header("retry-after"), "5");
    assert_eq!(reply.header("content-type"), "application/problem+json");
    let problem: Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(problem["status"], 503, "{problem}");
    assert_no_token(&reply, &token);

    // A gRPC caller gets UNAVAILABLE, trailers-only.
    let grpc = call(&client, addr, Some(&token), true).await;
    assert_eq!(grpc.status, StatusCode::OK, "{grpc:?}");
    assert_eq!(grpc.header("content-type"), "application/grpc");
    assert_eq!(grpc.header("grpc-status"), "14", "UNAVAILABLE");
    assert_eq!(grpc.header("retry-after"), "5");
    assert!(
        grpc.header("grpc-message").contains("signing keys"),
        "{grpc:?}"
    );
    assert!(grpc.body.is_empty(), "{grpc:?}");
    assert_no_token(&grpc, &token);

    // The background task kept retrying (backoff capped at the 200 ms minimum).
    assert!(
        server.hits() >= hits_down + 2,
        "only {} fetches while the endpoint was down",
        server.hits() - hits_down
    );

    // The endpoint is back: the next background retry restores the keys.
    server.set_status(200);
    let recovered = within(Duration::from_secs(5), || {
        let (client, token) = (client.clone(), token.clone());
        async move { me(&client, addr, &token).await.status == StatusCode::OK }
    })
    .await;
    assert!(recovered, "the keys did not come back within 5 s");
    assert_ok(&me(&client, addr, &token).await, "after recovery");
    assert!(jwks.current().is_ok());
}

// ---------------------------------------------------------------------------------------
// 2. tonic
// ---------------------------------------------------------------------------------------

/// Serves the gRPC health service behind `auth` (outer) and `RequireScopes` (inner).
async fn serve_tonic(auth: AuthLayer) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_reporter, health) = tonic_health::server::health_reporter();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .layer(auth)
            .layer(RequireScopes::all(["health:read"]))
            .add_service(health)
            .serve_with_incoming(TcpIncoming::from(listener))
            .await
            .unwrap();
    });
    addr
}

fn check(token: Option<&str>) -> tonic::Request<HealthCheckRequest> {
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    if let Some(token) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    req
}

/// Asserts a refusal with `code` whose message says `why`, and that the token appears
/// nowhere in the status (message, metadata, details).
fn assert_status(status: &tonic::Status, code: Code, why: &str, token: Option<&str>) {
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(why),
        "message {:?} should say {why}",
        status.message()
    );
    if let Some(token) = token {
        let everything = format!("{status:?} {}", status.message());
        let signature = token.rsplit('.').next().unwrap();
        assert!(!status.message().contains(token), "{status:?}");
        assert!(!everything.contains(signature), "token in {everything}");
    }
}

#[tokio::test]
async fn tonic_health_behind_auth_and_required_scopes() {
    let validator = JwtValidator::builder()
        .issuer(Issuer::new(ISS, [AUD]).hmac_key(Algorithm::HS256, SECRET))
        .algorithms([Algorithm::HS256])
        .build()
        .unwrap();
    let addr = serve_tonic(auth(validator)).await;
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to the tonic server");
    let mut client = HealthClient::new(channel);

    // No token.
    let status = client.check(check(None)).await.unwrap_err();
    assert_status(&status, Code::Unauthenticated, "no credentials", None);
    let challenge = status.metadata().get("www-authenticate").unwrap();
    assert_eq!(
        challenge.to_str().unwrap(),
        format!("Bearer realm=\"{REALM}\"")
    );

    // A token signed with another secret.
    let mut c = claims();
    c["scope"] = json!("health:read");
    let forged = hs256(b"another secret, also thirty-two bytes", None, &c);
    let status = client.check(check(Some(&forged))).await.unwrap_err();
    assert_status(&status, Code::Unauthenticated, "signature", Some(&forged));

    // An expired token with the right scope.
    let mut expired = c.clone();
    expired["exp"] = json!(now() - 3600);
    let expired = hs256(SECRET, None, &expired);
    let status = client.check(check(Some(&expired))).await.unwrap_err();
    assert_status(&status, Code::Unauthenticated, "expired", Some(&expired));

    // A valid token without the scope: authenticated, not authorized.
    let mut other = claims();
    other["scope"] = json!("health:write metrics:read");
    let unscoped = hs256(SECRET, None, &other);
    let status = client.check(check(Some(&unscoped))).await.unwrap_err();
    assert_status(
        &status,
        Code::PermissionDenied,
        "insufficient scope",
        Some(&unscoped),
    );
    let challenge = status.metadata().get("www-authenticate").unwrap();
    let challenge = challenge.to_str().unwrap();
    assert!(
        challenge.contains("error=\"insufficient_scope\"")
            && challenge.contains("scope=\"health:read\""),
        "{challenge}"
    );
    // No scope claim at all.
    let bare = hs256(SECRET, None, &claims());
    let status = client.check(check(Some(&bare))).await.unwrap_err();
    assert_status(
        &status,
        Code::PermissionDenied,
        "insufficient scope",
        Some(&bare),
    );

    // With the scope: the health service answers.
    let scoped = hs256(SECRET, None, &c);
    for i in 0..3 {
        let res = client
            .check(check(Some(&scoped)))
            .await
            .unwrap_or_else(|status| panic!("check {i} failed: {status:?}"));
        assert_eq!(res.into_inner().status, ServingStatus::Serving as i32);
    }
    // The connection survived the refusals: still refused without a token.
    let status = client.check(check(None)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

// ---------------------------------------------------------------------------------------
// 3. Redis revocation
// ---------------------------------------------------------------------------------------

fn revoking_validator(revocation: RedisRevocation, fail_closed: bool) -> JwtValidator {
    JwtValidator::builder()
        .issuer(Issuer::new(ISS, [AUD]).hmac_key(Algorithm::HS256, SECRET))
        .algorithms([Algorithm::HS256])
        .revocation(revocation)
        .revocation_fail_closed(fail_closed)
        .build()
        .unwrap()
}

fn with_jti(jti: &str) -> String {
    let mut c = claims();
    c["jti"] = json!(jti);
    hs256(SECRET, None, &c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_revocation_refuses_revoked_tokens_and_follows_the_failure_policy() {
    const STORE_TIMEOUT: Duration = Duration::from_millis(50);
    let mut redis = RedisServer::start();
    let store = RedisStore::connect(
        RedisConfig::single(redis.url())
            .timeout(STORE_TIMEOUT)
            .circuit_breaker(3, Duration::from_millis(200)),
    )
    .await
    .expect("connect to the test Redis");
    let revocation = RedisRevocation::new(store.clone());
    let open = serve_app(auth(revoking_validator(revocation.clone(), false))).await;
    let closed = serve_app(auth(revoking_validator(revocation.clone(), true))).await;
    let client = client();
    let (t1, t2) = (with_jti("t-1"), with_jti("t-2"));

    for addr in [open, closed] {
        assert_ok(&me(&client, addr, &t1).await, "t-1 before revocation");
    }
    revocation
        .revoke("t-1", Duration::from_secs(60))
        .await
        .unwrap();
    // Stored in Redis itself, expiring with the given TTL.
    let ttl: i64 = redis
        .command(&["PTTL", "battlement:revoked:{t-1}"])
        .parse()
        .unwrap();
    assert!((1..=60_000).contains(&ttl), "PTTL {ttl}");
    for addr in [open, closed] {
        assert_invalid_token(&me(&client, addr, &t1).await, &t1, "revoked");
        assert_ok(&me(&client, addr, &t2).await, "t-2 is not revoked");
    }
    // Revocation is per jti, not per subject: another token of user-1 still passes.
    assert_ok(&me(&client, open, &with_jti("t-3")).await, "t-3");

    redis.stop();

    // Fail open (the default): accepted, within the store timeout rather than hanging.
    for i in 0..5 {
        let started = Instant::now();
        let reply = me(&client, open, &t2).await;
        let took = started.elapsed();
        assert_ok(&reply, &format!("fail open #{i}"));
        assert!(
            took < STORE_TIMEOUT + Duration::from_millis(950),
            "fail open #{i} took {took:?}"
        );
    }
    // The documented price of failing open: the denylist cannot be read, so a revoked
    // token passes too while Redis is down.
    assert_ok(
        &me(&client, open, &t1).await,
        "fail open cannot see revocations",
    );

    // Fail closed: 503 (gRPC UNAVAILABLE), through timeouts and an open breaker alike.
    for i in 0..5 {
        let reply = me(&client, closed, &t2).await;
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "fail closed #{i}: {reply:?}"
        );
        assert_eq!(reply.header("retry-after"), "5");
        assert_no_token(&reply, &t2);
    }
    let grpc = call(&client, closed, Some(&t2), true).await;
    assert_eq!(grpc.header("grpc-status"), "14", "{grpc:?}");

    // Redis comes back (empty: no persistence); fail closed accepts again by itself.
    redis.restart();
    let back = within(Duration::from_secs(5), || {
        let client = client.clone();
        let t2 = t2.clone();
        async move { me(&client, closed, &t2).await.status == StatusCode::OK }
    })
    .await;
    assert!(back, "fail closed never recovered after Redis came back");
}

/// A verified token is served from the cache only while the very key that verified it is
/// in the key set: an issuer that puts another key under the same `kid` ends the cached
/// tokens of the old one (verified again, refused), and the new key's tokens pass.
#[tokio::test]
async fn a_cached_token_is_verified_again_once_its_kid_names_another_key() {
    let server = JwksServer::start(&[rsa_jwk("k1")]).await;
    let jwks = Jwks::from_url(&server.url)
        .algorithms([Algorithm::RS256, Algorithm::ES256])
        .build()
        .await
        .unwrap();
    let validator = JwtValidator::builder()
        .issuer(Issuer::new(ISS, [AUD]).jwks(jwks.clone()))
        .algorithms([Algorithm::RS256, Algorithm::ES256])
        .cache_verified(100)
        .build()
        .unwrap();
    let addr = serve_app(auth(validator)).await;
    let client = client();
    let old = rs256("k1");
    for i in 0..2 {
        assert_ok(&me(&client, addr, &old).await, &format!("old key #{i}"));
    }
    server.serve_keys(&[ec_jwk("k1")]);
    jwks.refresh().await.unwrap();
    assert_invalid_token(&me(&client, addr, &old).await, &old, "no key matches");
    assert_ok(
        &me(&client, addr, &es256("k1")).await,
        "the new key under k1",
    );
}

/// An issuer that comes back is used within about a second, not at the end of a backoff
/// that grew while it was down: a request that finds no usable keys starts a fetch (at most
/// one a second).
#[tokio::test]
async fn keys_come_back_soon_after_the_issuer_does() {
    let server = JwksServer::start(&[rsa_jwk("k1")]).await;
    server.set_status(500);
    let jwks = Jwks::from_url(&server.url)
        .algorithms([Algorithm::RS256, Algorithm::ES256])
        .refresh_interval(Duration::from_secs(60), Duration::from_secs(3600))
        .timeout(Duration::from_secs(1))
        .build_lazy()
        .unwrap();
    let addr = serve_app(auth(jwks_validator(jwks.clone()))).await;
    let client = client();
    let token = rs256("k1");
    // Failing fetches back off: 1 s, then 2 s, then 4 s.
    let three_failures = within(Duration::from_secs(6), || {
        let hits = server.hits();
        async move { hits >= 3 }
    })
    .await;
    assert!(three_failures, "{} fetches", server.hits());
    server.set_status(200);
    let started = Instant::now();
    let recovered = within(Duration::from_secs(3), || {
        let (client, token) = (client.clone(), token.clone());
        async move { me(&client, addr, &token).await.status == StatusCode::OK }
    })
    .await;
    assert!(recovered, "the keys did not come back within 3 s");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "came back after {:?} (the backoff's next fetch was up to 4 s away)",
        started.elapsed()
    );
}
