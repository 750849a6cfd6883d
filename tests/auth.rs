//! The auth layer's security suite: every case asserts the refusal (status, challenge,
//! reason), over HTTP and gRPC. Keys are test-only fixtures in `tests/fixtures/`.

#![cfg(all(feature = "auth", feature = "axum"))]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use battlement::annotate::Annotation;
use battlement::auth::{
    ApiKey, ApiKeys, AuthLayer, Authorize, Claims, ConfigError, Issuer, JwtValidator,
    MemoryRevocation, RequireScopes, ScopeClaim, TokenSource,
};
use battlement::key::RequestHead;
use battlement::principal::Principal;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, encode};
use serde::Deserialize;
use serde_json::{Value, json};
use tower::ServiceExt;

const SECRET: &[u8] = b"test secret of at least thirty-two bytes!";
const ISS: &str = "https://issuer.test";
const AUD: &str = "orders-api";
const NOW: u64 = 1_800_000_000;
const RSA_PRIVATE: &str = include_str!("fixtures/rsa_private.pem");
const RSA_PUBLIC: &str = include_str!("fixtures/rsa_public.pem");
const EC_PRIVATE: &str = include_str!("fixtures/ec_private.pem");
const EC_PUBLIC: &str = include_str!("fixtures/ec_public.pem");

/// A clock the tests move.
#[derive(Clone)]
struct TestClock(Arc<AtomicU64>);

impl TestClock {
    fn new() -> Self {
        Self(Arc::new(AtomicU64::new(NOW)))
    }
    fn set(&self, t: u64) {
        self.0.store(t, Ordering::SeqCst);
    }
    fn fun(&self) -> impl Fn() -> u64 + Send + Sync + 'static {
        let t = self.0.clone();
        move || t.load(Ordering::SeqCst)
    }
}

fn claims() -> Value {
    json!({
        "iss": ISS,
        "aud": AUD,
        "sub": "user-1",
        "exp": NOW + 600,
        "nbf": NOW - 10,
        "scope": "orders:read orders:write",
        "tenant": "acme",
    })
}

fn hs256(claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET),
    )
    .unwrap()
}

fn rs256(claims: &Value, kid: Option<&str>) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(str::to_owned);
    encode(
        &header,
        claims,
        &EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
    )
    .unwrap()
}

fn es256(claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::ES256),
        claims,
        &EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap(),
    )
    .unwrap()
}

fn b64(v: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(v)
}

/// A token with any header and claims, and any signature.
fn raw(header: &Value, claims: &Value, signature: &str) -> String {
    format!(
        "{}.{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes()),
        signature
    )
}

fn hmac_validator(clock: &TestClock) -> JwtValidator {
    JwtValidator::builder()
        .issuer(Issuer::new(ISS, [AUD]).hmac_key(Algorithm::HS256, SECRET))
        .algorithms([Algorithm::HS256])
        .leeway(Duration::from_secs(30))
        .clock(clock.fun())
        .build()
        .unwrap()
}

fn public_key_validator(clock: &TestClock) -> JwtValidator {
    JwtValidator::builder()
        .issuer(
            Issuer::new(ISS, [AUD])
                .key(
                    Some("rsa-1"),
                    Algorithm::RS256,
                    DecodingKey::from_rsa_pem(RSA_PUBLIC.as_bytes()).unwrap(),
                )
                .key(
                    Some("ec-1"),
                    Algorithm::ES256,
                    DecodingKey::from_ec_pem(EC_PUBLIC.as_bytes()).unwrap(),
                ),
        )
        .algorithms([Algorithm::RS256, Algorithm::ES256])
        .clock(clock.fun())
        .build()
        .unwrap()
}

#[derive(Clone, Debug, Deserialize)]
struct MyClaims {
    tenant: String,
}

fn app(layer: AuthLayer) -> Router {
    Router::new()
        .route(
            "/me",
            get(|req: Request<Body>| async move {
                let who = Principal::of(req.extensions()).map(|p| p.subject().to_owned());
                let tenant = req.extensions().get::<MyClaims>().map(|c| c.tenant.clone());
                let raw = req
                    .extensions()
                    .get::<Claims>()
                    .and_then(|c| c.get("tenant").cloned());
                json!({"who": who, "tenant": tenant, "raw": raw}).to_string()
            }),
        )
        .route(
            "/write",
            get(|| async { "written" })
                .layer(RequireScopes::all(["orders:write"]).realm("orders-api")),
        )
        .route(
            "/admin",
            get(|| async { "admin" })
                .layer(RequireScopes::any(["admin", "root"]).realm("orders-api")),
        )
        .layer(layer)
}

fn layer(validator: JwtValidator) -> AuthLayer {
    AuthLayer::builder()
        .jwt(validator)
        .realm("orders-api")
        .claims::<MyClaims>()
        .build()
        .unwrap()
}

struct Answer {
    status: StatusCode,
    challenge: Option<String>,
    body: String,
    response: Response<()>,
}

async fn call(app: &Router, req: Request<Body>) -> Answer {
    let res = app.clone().oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let body = String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap();
    Answer {
        status: parts.status,
        challenge: parts
            .headers
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_owned()),
        body,
        response: Response::from_parts(parts, ()),
    }
}

fn bearer(uri: &str, token: &str) -> Request<Body> {
    Request::get(uri)
        .header("authorization", format!("Bearer {token}"))
        .body(Body::empty())
        .unwrap()
}

/// Asserts a 401 `invalid_token` whose description says `why`, and that the token is not
/// echoed anywhere.
async fn refused(app: &Router, token: &str, why: &str) {
    let a = call(app, bearer("/me", token)).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{why}: {}", a.body);
    let challenge = a.challenge.expect("a WWW-Authenticate challenge");
    assert!(
        challenge.starts_with("Bearer realm=\"orders-api\", error=\"invalid_token\""),
        "{challenge}"
    );
    assert!(challenge.contains(why), "{challenge} should say {why}");
    assert_eq!(
        a.response.headers()["content-type"],
        "application/problem+json"
    );
    if token.len() > 8 {
        assert!(!a.body.contains(token) && !challenge.contains(token));
    }
}

// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn valid_tokens_of_each_algorithm_are_accepted() {
    let clock = TestClock::new();
    let hmac = app(layer(hmac_validator(&clock)));
    let a = call(&hmac, bearer("/me", &hs256(&claims()))).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let body: Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(body["who"], "user-1");
    assert_eq!(body["tenant"], "acme", "typed claims reach the handler");
    assert_eq!(body["raw"], "acme");

    let public = app(layer(public_key_validator(&clock)));
    for token in [rs256(&claims(), Some("rsa-1")), es256(&claims())] {
        let a = call(&public, bearer("/me", &token)).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    }
}

#[tokio::test]
async fn alg_none_is_refused_in_every_casing() {
    let clock = TestClock::new();
    let app = app(layer(hmac_validator(&clock)));
    for alg in ["none", "None", "NONE", "nOnE"] {
        let token = raw(&json!({"alg": alg, "typ": "JWT"}), &claims(), "");
        refused(&app, &token, "algorithm").await;
        // With a junk signature too.
        let token = raw(&json!({"alg": alg}), &claims(), "c2ln");
        refused(&app, &token, "algorithm").await;
    }
}

#[tokio::test]
async fn an_rs256_token_resigned_as_hs256_with_the_public_key_is_refused() {
    let clock = TestClock::new();
    let app = app(layer(public_key_validator(&clock)));
    // The classic confusion: HMAC keyed with the RSA public key's PEM.
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("rsa-1".into());
    let forged = encode(
        &header,
        &claims(),
        &EncodingKey::from_secret(RSA_PUBLIC.as_bytes()),
    )
    .unwrap();
    refused(&app, &forged, "algorithm").await;
    // An ES256 header with the RSA kid: the key is bound to RS256.
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("rsa-1".into());
    let token = encode(
        &header,
        &claims(),
        &EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap(),
    )
    .unwrap();
    refused(&app, &token, "no key matches").await;
}

#[tokio::test]
async fn hostile_kids_are_refused_without_harm() {
    let clock = TestClock::new();
    let app = app(layer(public_key_validator(&clock)));
    for kid in [
        "../../../../etc/passwd",
        "http://attacker.example/jwks.json",
        "rsa-1\r\nx-injected: 1",
        "' OR '1'='1",
        "%00",
        &"k".repeat(4000),
    ] {
        let token = rs256(&claims(), Some(kid));
        let a = call(&app, bearer("/me", &token)).await;
        assert!(
            a.status == StatusCode::UNAUTHORIZED,
            "{kid}: {} {}",
            a.status,
            a.body
        );
        assert!(!a.body.contains("attacker"));
    }
}

#[tokio::test]
async fn missing_exp_iss_aud_or_sub_are_refused() {
    let clock = TestClock::new();
    let app = app(layer(hmac_validator(&clock)));
    for claim in ["exp", "aud", "sub"] {
        let mut c = claims();
        c.as_object_mut().unwrap().remove(claim);
        refused(&app, &hs256(&c), "required claim").await;
    }
    let mut c = claims();
    c.as_object_mut().unwrap().remove("iss");
    refused(&app, &hs256(&c), "required claim").await;
    // A string exp is not a NumericDate.
    let mut c = claims();
    c["exp"] = json!("tomorrow");
    refused(&app, &hs256(&c), "required claim").await;
}

#[tokio::test]
async fn wrong_issuer_and_audience_are_refused() {
    let clock = TestClock::new();
    let app = app(layer(hmac_validator(&clock)));
    let mut c = claims();
    c["iss"] = json!("https://evil.test");
    refused(&app, &hs256(&c), "issuer").await;
    let mut c = claims();
    c["aud"] = json!("another-api");
    refused(&app, &hs256(&c), "audience").await;
    let mut c = claims();
    c["aud"] = json!(["another-api", "a-third"]);
    refused(&app, &hs256(&c), "audience").await;
    // An array naming us is fine.
    let mut c = claims();
    c["aud"] = json!(["another-api", AUD]);
    assert_eq!(
        call(&app, bearer("/me", &hs256(&c))).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn exp_and_nbf_at_the_leeway_edges() {
    let clock = TestClock::new();
    let app = app(layer(hmac_validator(&clock)));
    let mut c = claims();
    c["exp"] = json!(NOW);
    let token = hs256(&c);
    // Leeway is 30 s.
    clock.set(NOW + 30);
    assert_eq!(
        call(&app, bearer("/me", &token)).await.status,
        StatusCode::OK
    );
    clock.set(NOW + 31);
    refused(&app, &token, "expired").await;

    let mut c = claims();
    c["nbf"] = json!(NOW + 100);
    let token = hs256(&c);
    clock.set(NOW + 70);
    assert_eq!(
        call(&app, bearer("/me", &token)).await.status,
        StatusCode::OK
    );
    clock.set(NOW + 69);
    refused(&app, &token, "not valid yet").await;
}

#[tokio::test]
async fn oversized_malformed_and_mistyped_tokens_are_refused() {
    let clock = TestClock::new();
    let app = app(layer(hmac_validator(&clock)));
    let mut c = claims();
    c["padding"] = json!("x".repeat(9000));
    refused(&app, &hs256(&c), "too large").await;

    refused(&app, "not-a-jwt", "malformed").await;
    refused(&app, "a.b", "malformed").await;
    refused(&app, "a.b.c.d", "malformed").await;
    refused(&app, "!!!.???.sig", "malformed").await;
    let bad_json = format!("{}.{}.c2ln", b64(b"{\"alg\":\"HS256\""), b64(b"{}"));
    refused(&app, &bad_json, "malformed").await;
    let bad_claims = format!("{}.{}.c2ln", b64(br#"{"alg":"HS256"}"#), b64(b"[1,2,3]"));
    refused(&app, &bad_claims, "malformed").await;
    // A valid token with its signature changed by one character.
    let token = hs256(&claims());
    let mut tampered = token.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    refused(&app, &tampered, "signature").await;
    // Claims swapped under a valid signature.
    let parts: Vec<&str> = token.split('.').collect();
    let mut c = claims();
    c["sub"] = json!("admin");
    let swapped = format!(
        "{}.{}.{}",
        parts[0],
        b64(c.to_string().as_bytes()),
        parts[2]
    );
    refused(&app, &swapped, "signature").await;

    let typed = app_typ(&clock);
    refused(&typed, &hs256(&claims()), "type").await;
    let mut header = Header::new(Algorithm::HS256);
    header.typ = Some("application/at+jwt".into());
    let ok = encode(&header, &claims(), &EncodingKey::from_secret(SECRET)).unwrap();
    assert_eq!(
        call(&typed, bearer("/me", &ok)).await.status,
        StatusCode::OK
    );
    header.typ = Some("AT+JWT".into());
    let ok = encode(&header, &claims(), &EncodingKey::from_secret(SECRET)).unwrap();
    assert_eq!(
        call(&typed, bearer("/me", &ok)).await.status,
        StatusCode::OK
    );
}

fn app_typ(clock: &TestClock) -> Router {
    let validator = JwtValidator::builder()
        .issuer(Issuer::new(ISS, [AUD]).hmac_key(Algorithm::HS256, SECRET))
        .algorithms([Algorithm::HS256])
        .require_type("at+jwt")
        .clock(clock.fun())
        .build()
        .unwrap();
    app(layer(validator))
}

#[tokio::test]
async fn crit_headers_are_refused() {
    let clock = TestClock::new();
    let app = app(layer(hmac_validator(&clock)));
    // Crafted by hand: `crit` names an extension the validator does not understand.
    let h = json!({"alg": "HS256", "crit": ["b64"]});
    let signing_input = format!(
        "{}.{}",
        b64(h.to_string().as_bytes()),
        b64(claims().to_string().as_bytes())
    );
    let sig = jsonwebtoken::crypto::sign(
        signing_input.as_bytes(),
        &EncodingKey::from_secret(SECRET),
        Algorithm::HS256,
    )
    .unwrap();
    refused(&app, &format!("{signing_input}.{sig}"), "malformed").await;
}

#[tokio::test]
async fn no_credentials_and_optional_mode() {
    let clock = TestClock::new();
    let strict = app(layer(hmac_validator(&clock)));
    let a = call(&strict, Request::get("/me").body(Body::empty()).unwrap()).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    // RFC 6750 §3.1: no error code when the request had no credentials.
    assert_eq!(a.challenge.as_deref(), Some("Bearer realm=\"orders-api\""));
    // Another scheme is not a bearer token.
    let basic = Request::get("/me")
        .header("authorization", "Basic dXNlcjpwYXNz")
        .body(Body::empty())
        .unwrap();
    assert_eq!(call(&strict, basic).await.status, StatusCode::UNAUTHORIZED);

    let optional = app(AuthLayer::builder()
        .jwt(hmac_validator(&clock))
        .optional(true)
        .build()
        .unwrap());
    let a = call(&optional, Request::get("/me").body(Body::empty()).unwrap()).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        serde_json::from_str::<Value>(&a.body).unwrap()["who"],
        Value::Null
    );
    // Bad credentials are still refused.
    let a = call(&optional, bearer("/me", "garbage")).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_token_in_two_places_is_a_bad_request() {
    let clock = TestClock::new();
    let app = app(AuthLayer::builder()
        .jwt(hmac_validator(&clock))
        .token_source(TokenSource::Bearer)
        .token_source(TokenSource::Cookie("session".into()))
        .realm("orders-api")
        .build()
        .unwrap());
    let token = hs256(&claims());
    let both = Request::get("/me")
        .header("authorization", format!("Bearer {token}"))
        .header("cookie", format!("theme=dark; session={token}"))
        .body(Body::empty())
        .unwrap();
    let a = call(&app, both).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(a.challenge.unwrap().contains("error=\"invalid_request\""));
    let twice = Request::get("/me")
        .header("authorization", format!("Bearer {token}"))
        .header("authorization", format!("Bearer {token}"))
        .body(Body::empty())
        .unwrap();
    assert_eq!(call(&app, twice).await.status, StatusCode::BAD_REQUEST);
    let cookie_only = Request::get("/me")
        .header("cookie", format!("session={token}"))
        .body(Body::empty())
        .unwrap();
    assert_eq!(call(&app, cookie_only).await.status, StatusCode::OK);
}

#[tokio::test]
async fn scopes_are_required_per_route() {
    let clock = TestClock::new();
    let app = app(layer(hmac_validator(&clock)));
    let writer = hs256(&claims());
    assert_eq!(
        call(&app, bearer("/write", &writer)).await.status,
        StatusCode::OK
    );
    let mut c = claims();
    c["scope"] = json!("orders:read");
    let reader = hs256(&c);
    let a = call(&app, bearer("/write", &reader)).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    let challenge = a.challenge.unwrap();
    assert!(
        challenge.contains("error=\"insufficient_scope\""),
        "{challenge}"
    );
    assert!(challenge.contains("scope=\"orders:write\""), "{challenge}");
    let a = call(&app, bearer("/admin", &writer)).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    let mut c = claims();
    c["scope"] = json!(["root"]);
    assert_eq!(
        call(&app, bearer("/admin", &hs256(&c))).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn scope_claim_paths() {
    let clock = TestClock::new();
    let validator = JwtValidator::builder()
        .issuer(Issuer::new(ISS, [AUD]).hmac_key(Algorithm::HS256, SECRET))
        .algorithms([Algorithm::HS256])
        .scope_claim(ScopeClaim::RealmRoles)
        .clock(clock.fun())
        .build()
        .unwrap();
    let app = app(layer(validator));
    let mut c = claims();
    c["realm_access"] = json!({"roles": ["orders:write"]});
    c.as_object_mut().unwrap().remove("scope");
    assert_eq!(
        call(&app, bearer("/write", &hs256(&c))).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn api_keys_authenticate_and_one_wrong_byte_fails() {
    let key = "live_7.abcdefghijklmnopqrstuvwxyz012345";
    let keys = ApiKeys::new()
        .with(
            ApiKey::from_key(key, "billing")
                .unwrap()
                .scopes(["orders:write"]),
        )
        .unwrap();
    let app = app(AuthLayer::builder()
        .api_keys(keys)
        .realm("orders-api")
        .build()
        .unwrap());
    let with = |k: &str| {
        Request::get("/write")
            .header("x-api-key", k)
            .body(Body::empty())
            .unwrap()
    };
    assert_eq!(call(&app, with(key)).await.status, StatusCode::OK);
    let wrong = key.replace('z', "y");
    let a = call(&app, with(&wrong)).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert!(
        a.challenge
            .unwrap()
            .starts_with("ApiKey realm=\"orders-api\"")
    );
    assert!(!a.body.contains("abcdefghij"));
}

#[tokio::test]
async fn revoked_tokens_are_refused() {
    let clock = TestClock::new();
    let denylist = Arc::new(MemoryRevocation::new());
    struct Shared(Arc<MemoryRevocation>);
    impl battlement::auth::Revocation for Shared {
        fn is_revoked<'a>(
            &'a self,
            jti: &'a str,
        ) -> battlement::auth::BoxFuture<'a, Result<bool, battlement::auth::RevocationError>>
        {
            self.0.is_revoked(jti)
        }
    }
    let validator = JwtValidator::builder()
        .issuer(Issuer::new(ISS, [AUD]).hmac_key(Algorithm::HS256, SECRET))
        .algorithms([Algorithm::HS256])
        .revocation(Shared(denylist.clone()))
        .cache_verified(100)
        .clock(clock.fun())
        .build()
        .unwrap();
    let app = app(layer(validator));
    let mut c = claims();
    c["jti"] = json!("token-1");
    let token = hs256(&c);
    assert_eq!(
        call(&app, bearer("/me", &token)).await.status,
        StatusCode::OK
    );
    denylist.revoke("token-1", Duration::from_secs(600));
    // Even though the token is in the verified cache.
    refused(&app, &token, "revoked").await;
}

#[tokio::test]
async fn the_verified_cache_never_outlives_exp() {
    let clock = TestClock::new();
    let validator = JwtValidator::builder()
        .issuer(Issuer::new(ISS, [AUD]).hmac_key(Algorithm::HS256, SECRET))
        .algorithms([Algorithm::HS256])
        .cache_verified(100)
        .leeway(Duration::ZERO)
        .clock(clock.fun())
        .build()
        .unwrap();
    let app = app(layer(validator));
    let token = hs256(&claims());
    for _ in 0..3 {
        assert_eq!(
            call(&app, bearer("/me", &token)).await.status,
            StatusCode::OK
        );
    }
    clock.set(NOW + 601);
    refused(&app, &token, "expired").await;
}

#[tokio::test]
async fn one_issuers_token_cannot_use_another_issuers_keys() {
    let clock = TestClock::new();
    let validator = JwtValidator::builder()
        .issuer(
            Issuer::new("https://a.test", [AUD])
                .hmac_key(Algorithm::HS256, b"secret of issuer A, 32 bytes long!!"),
        )
        .issuer(Issuer::new("https://b.test", [AUD]).hmac_key(Algorithm::HS256, SECRET))
        .algorithms([Algorithm::HS256])
        .clock(clock.fun())
        .build()
        .unwrap();
    let app = app(layer(validator));
    // Signed with B's key, claiming to be from A.
    let mut c = claims();
    c["iss"] = json!("https://a.test");
    refused(&app, &hs256(&c), "signature").await;
    c["iss"] = json!("https://b.test");
    assert_eq!(
        call(&app, bearer("/me", &hs256(&c))).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn policies_see_the_principal() {
    let clock = TestClock::new();
    let app = Router::new()
        .route(
            "/accounts/{id}",
            get(|| async { "mine" }).layer(Authorize::new(
                |req: &RequestHead<'_>, who: &Principal| {
                    let allowed = req.uri.path() == format!("/accounts/{}", who.subject());
                    async move { allowed }
                },
            )),
        )
        .layer(layer(hmac_validator(&clock)));
    let token = hs256(&claims());
    assert_eq!(
        call(&app, bearer("/accounts/user-1", &token)).await.status,
        StatusCode::OK
    );
    assert_eq!(
        call(&app, bearer("/accounts/user-2", &token)).await.status,
        StatusCode::FORBIDDEN
    );
}

#[tokio::test]
async fn grpc_callers_get_grpc_codes() {
    let clock = TestClock::new();
    let app = app(layer(hmac_validator(&clock)));
    let grpc = |uri: &str, token: Option<&str>| {
        let mut b = Request::post(uri).header("content-type", "application/grpc");
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        b.body(Body::empty()).unwrap()
    };
    let a = call(&app, grpc("/me", None)).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.response.headers()["grpc-status"], "16", "UNAUTHENTICATED");
    let mut c = claims();
    c["scope"] = json!("orders:read");
    let a = call(&app, grpc("/write", Some(&hs256(&c)))).await;
    // The scope route is GET-only in `app`; gRPC is POST: use a POST route.
    let _ = a;
    let post_app = Router::new()
        .route(
            "/svc/Write",
            axum::routing::post(|| async { "ok" }).layer(RequireScopes::all(["orders:write"])),
        )
        .layer(layer(hmac_validator(&clock)));
    let a = call(&post_app, grpc("/svc/Write", Some(&hs256(&c)))).await;
    assert_eq!(
        a.response.headers()["grpc-status"],
        "7",
        "PERMISSION_DENIED"
    );
    let a = call(&post_app, grpc("/svc/Write", Some("garbage"))).await;
    assert_eq!(a.response.headers()["grpc-status"], "16");
}

#[tokio::test]
async fn the_reason_goes_into_the_annotation() {
    let clock = TestClock::new();
    let app = app(layer(hmac_validator(&clock)));
    let annotation = Annotation::new();
    let mut req = bearer("/me", "garbage");
    req.extensions_mut().insert(annotation.clone());
    call(&app, req).await;
    let note = annotation.snapshot().auth.unwrap();
    assert_eq!(note.failure, Some("malformed_token"));
    let annotation = Annotation::new();
    let mut req = bearer("/me", &hs256(&claims()));
    req.extensions_mut().insert(annotation.clone());
    call(&app, req).await;
    let note = annotation.snapshot().auth.unwrap();
    assert_eq!(note.subject.as_deref(), Some("user-1"));
    assert_eq!(note.failure, None);
}

#[test]
fn the_builder_refuses_unsafe_configurations() {
    let hmac = || Issuer::new(ISS, [AUD]).hmac_key(Algorithm::HS256, SECRET);
    assert!(matches!(
        JwtValidator::builder()
            .algorithms([Algorithm::HS256])
            .build(),
        Err(ConfigError::NoIssuer)
    ));
    assert!(matches!(
        JwtValidator::builder().issuer(hmac()).build(),
        Err(ConfigError::NoAlgorithms)
    ));
    assert!(matches!(
        JwtValidator::builder()
            .issuer(Issuer::new(ISS, Vec::<String>::new()).hmac_key(Algorithm::HS256, SECRET))
            .algorithms([Algorithm::HS256])
            .build(),
        Err(ConfigError::NoAudience(_))
    ));
    assert!(matches!(
        JwtValidator::builder()
            .issuer(hmac())
            .algorithms([Algorithm::HS256, Algorithm::RS256])
            .build(),
        Err(ConfigError::MixedAlgorithms)
    ));
    assert!(matches!(
        JwtValidator::builder()
            .issuer(hmac())
            .algorithms([Algorithm::HS384])
            .build(),
        Err(ConfigError::AlgorithmNotAllowed(Algorithm::HS256))
    ));
    assert!(matches!(
        AuthLayer::builder().build(),
        Err(ConfigError::NoScheme)
    ));
}
