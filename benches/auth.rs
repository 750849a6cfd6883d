//! Per-request cost of JWT bearer authentication with battlement's `AuthLayer`, against
//! the signature check alone, the bare router and the peer `axum-jwt-auth`, for HS256,
//! RS256 and ES256 (one criterion group per algorithm), in the same run.
//!
//! Every router variant is an axum router with `GET /me`, whose handler answers the
//! subject (`alice`, 5 bytes; the bare router answers the same string without asking
//! anyone), driven with `oneshot` on a current-thread runtime, the response body read to its
//! end. Each iteration builds a fresh request with its `Authorization: Bearer <token>`
//! header (a clone of one `HeaderValue`), the bare router's included, so every variant pays
//! for that. The token carries `iss`, `aud`, `sub`, `exp`, `iat` and `scope` claims (and, for
//! RS256 and ES256, a `kid` header).
//!
//! - `jsonwebtoken_decode`: `jsonwebtoken::decode::<serde_json::Value>` (version 11 on
//!   aws-lc-rs, the library and backend battlement verifies signatures with) with a
//!   `Validation` that checks `iss`, `aud` and `exp` and requires `sub`: the floor.
//! - `bare`: the router without authentication, to subtract.
//! - `battlement`: the router behind `AuthLayer` with a `JwtValidator` holding the one key,
//!   without a cache; the handler reads the `Principal` from the request extensions.
//! - `battlement_cached`: the same with `.cache_verified(10_000)`; the check before the
//!   benchmark has put the token into the cache, so every measured request is a hit.
//! - `axum_jwt_auth`: axum-jwt-auth 0.7 as its documentation shows it: a `LocalDecoder`
//!   with the same key and the same `Validation` as the floor as the router's state, and a
//!   `Claims<T>` extractor in the handler (`T` a struct holding `sub`, as in its
//!   examples). It is built on jsonwebtoken 10 with the pure-Rust RustCrypto backend
//!   (`rust_crypto`): that is its choice, not ours, and it weighs on RS256 and ES256.
//! - `jsonwebtoken10_decode`: `jsonwebtoken::decode` of that jsonwebtoken 10 (RustCrypto)
//!   into the same struct: the floor of `axum_jwt_auth`, to tell its backend from its own
//!   overhead.
//!
//! What the layer adds beyond the cryptography is `battlement - bare - jsonwebtoken_decode`
//! (and `axum_jwt_auth - bare - jsonwebtoken10_decode` for the peer). battlement does not
//! call `jsonwebtoken::decode` (it parses the token itself, once, and calls only
//! `jsonwebtoken::crypto::verify`), so that difference can come out near or below zero;
//! `battlement_cached - bare` is the layer's cost with no signature to check at all.
//!
//! axum-jwt-auth expresses all three algorithms (`LocalDecoder` takes any jsonwebtoken key
//! and `Validation`), so none is skipped.
//!
//! Before measuring, each router variant must answer `200` with the subject for the valid
//! token (so a misconfiguration cannot produce fast `401`s) and each authenticating variant
//! `401` for the same token with a broken signature.
//!
//! jwt-authorizer, the other axum JWT middleware, is not here: its 0.15 release depends on
//! axum 0.7 (and tonic 0.12), so it cannot wrap our axum 0.8 router.
//!
//! Run with `cargo bench --all-features --bench auth` (pin it to one core with
//! `taskset -c 1` for steadier figures).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::routing::get;
use axum_jwt_auth::{Claims, Decoder, LocalDecoder};
use battlement::auth::{AuthLayer, Issuer, JwtValidator};
use battlement::principal::Principal;
use criterion::{Criterion, criterion_group, criterion_main};
use http::header::AUTHORIZATION;
use http::{HeaderValue, StatusCode};
use http_body_util::BodyExt;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::runtime::Runtime;
use tower::ServiceExt;

const RSA_PRIVATE: &str = include_str!("../tests/fixtures/rsa_private.pem");
const RSA_PUBLIC: &str = include_str!("../tests/fixtures/rsa_public.pem");
const EC_PRIVATE: &str = include_str!("../tests/fixtures/ec_private.pem");
const EC_PUBLIC: &str = include_str!("../tests/fixtures/ec_public.pem");
const SECRET: &[u8] = b"a bench secret of at least 32 bytes!!";

const ISS: &str = "https://issuer.example";
const AUD: &str = "orders-api";
const SUB: &str = "alice";
/// Leeway for `exp` and `nbf`, the same everywhere (battlement's default).
const LEEWAY: u64 = 30;

/// The algorithms measured.
#[derive(Clone, Copy)]
enum Alg {
    Hs256,
    Rs256,
    Es256,
}

impl Alg {
    fn name(self) -> &'static str {
        match self {
            Alg::Hs256 => "HS256",
            Alg::Rs256 => "RS256",
            Alg::Es256 => "ES256",
        }
    }

    fn jwt(self) -> Algorithm {
        match self {
            Alg::Hs256 => Algorithm::HS256,
            Alg::Rs256 => Algorithm::RS256,
            Alg::Es256 => Algorithm::ES256,
        }
    }

    fn peer(self) -> jsonwebtoken10::Algorithm {
        match self {
            Alg::Hs256 => jsonwebtoken10::Algorithm::HS256,
            Alg::Rs256 => jsonwebtoken10::Algorithm::RS256,
            Alg::Es256 => jsonwebtoken10::Algorithm::ES256,
        }
    }

    fn kid(self) -> Option<&'static str> {
        match self {
            Alg::Hs256 => None,
            Alg::Rs256 => Some("rsa-1"),
            Alg::Es256 => Some("ec-1"),
        }
    }

    fn decoding_key(self) -> DecodingKey {
        match self {
            Alg::Hs256 => DecodingKey::from_secret(SECRET),
            Alg::Rs256 => DecodingKey::from_rsa_pem(RSA_PUBLIC.as_bytes()).unwrap(),
            Alg::Es256 => DecodingKey::from_ec_pem(EC_PUBLIC.as_bytes()).unwrap(),
        }
    }

    /// The same key for jsonwebtoken 10 (axum-jwt-auth's).
    fn peer_decoding_key(self) -> jsonwebtoken10::DecodingKey {
        use jsonwebtoken10::DecodingKey;
        match self {
            Alg::Hs256 => DecodingKey::from_secret(SECRET),
            Alg::Rs256 => DecodingKey::from_rsa_pem(RSA_PUBLIC.as_bytes()).unwrap(),
            Alg::Es256 => DecodingKey::from_ec_pem(EC_PUBLIC.as_bytes()).unwrap(),
        }
    }

    /// A valid token, for a day.
    fn token(self) -> String {
        let key = match self {
            Alg::Hs256 => EncodingKey::from_secret(SECRET),
            Alg::Rs256 => EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
            Alg::Es256 => EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap(),
        };
        let mut header = Header::new(self.jwt());
        header.kid = self.kid().map(str::to_owned);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = json!({
            "iss": ISS,
            "aud": AUD,
            "sub": SUB,
            "iat": now,
            "exp": now + 86_400,
            "scope": "orders:read orders:write",
        });
        jsonwebtoken::encode(&header, &claims, &key).unwrap()
    }

    /// The floor's validation: `iss`, `aud`, `exp` checked, `sub` required.
    fn validation(self) -> Validation {
        let mut validation = Validation::new(self.jwt());
        validation.set_issuer(&[ISS]);
        validation.set_audience(&[AUD]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = LEEWAY;
        validation.validate_nbf = true;
        validation
    }

    /// The same for jsonwebtoken 10.
    fn peer_validation(self) -> jsonwebtoken10::Validation {
        let mut validation = jsonwebtoken10::Validation::new(self.peer());
        validation.set_issuer(&[ISS]);
        validation.set_audience(&[AUD]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = LEEWAY;
        validation.validate_nbf = true;
        validation
    }
}

/// The claims axum-jwt-auth hands the handler (what it reads, as in its examples).
#[derive(Deserialize)]
struct PeerClaims {
    sub: String,
}

fn bare() -> Router {
    Router::new().route("/me", get(|| async { SUB.to_owned() }))
}

fn battlement(alg: Alg, cache: bool) -> Router {
    let issuer = Issuer::new(ISS, [AUD]);
    let issuer = match alg {
        Alg::Hs256 => issuer.hmac_key(alg.jwt(), SECRET),
        _ => issuer.key(alg.kid(), alg.jwt(), alg.decoding_key()),
    };
    let mut validator = JwtValidator::builder()
        .issuer(issuer)
        .algorithms([alg.jwt()]);
    if cache {
        validator = validator.cache_verified(10_000);
    }
    let layer = AuthLayer::builder()
        .jwt(validator.build().unwrap())
        .realm("orders-api")
        .build()
        .unwrap();
    Router::new()
        .route(
            "/me",
            get(|req: Request| async move {
                Principal::of(req.extensions()).map_or_else(String::new, |p| p.subject().to_owned())
            }),
        )
        .layer(layer)
}

fn axum_jwt_auth(alg: Alg) -> Router {
    let decoder = LocalDecoder::builder()
        .keys(vec![alg.peer_decoding_key()])
        .validation(alg.peer_validation())
        .build()
        .unwrap();
    let decoder: Decoder<PeerClaims> = Arc::new(decoder);
    Router::new()
        .route(
            "/me",
            get(|user: Claims<PeerClaims>| async move { user.claims.sub }),
        )
        .with_state(decoder)
}

fn request(auth: &HeaderValue) -> Request {
    Request::get("/me")
        .header(AUTHORIZATION, auth.clone())
        .body(Body::empty())
        .unwrap()
}

async fn roundtrip(app: &Router, auth: &HeaderValue) -> usize {
    let res = app.clone().oneshot(request(auth)).await.unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), SUB.len());
    body.len()
}

/// The status and body `app` answers with `auth`.
fn answer(rt: &Runtime, app: &Router, auth: &HeaderValue) -> (StatusCode, String) {
    rt.block_on(async {
        let res = app.clone().oneshot(request(auth)).await.unwrap();
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    })
}

/// `app` answers the subject for the valid token and, when it authenticates, 401 for a
/// broken signature.
fn check(rt: &Runtime, name: &str, app: &Router, valid: &HeaderValue, broken: &HeaderValue) {
    let (status, body) = answer(rt, app, valid);
    assert_eq!(status, StatusCode::OK, "{name}: valid token refused");
    assert_eq!(body, SUB, "{name}: wrong body");
    if name != "bare" {
        let (status, _) = answer(rt, app, broken);
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "{name}: broken signature accepted"
        );
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    for alg in [Alg::Hs256, Alg::Rs256, Alg::Es256] {
        let token = alg.token();
        let valid = HeaderValue::from_str(&format!("Bearer {token}")).unwrap();
        // One signature character changed (not the last, whose low bits may be padding):
        // same shape, wrong signature.
        let at = token.len() - 10;
        let swap = if &token[at..=at] == "A" { "B" } else { "A" };
        let tampered = format!("{}{swap}{}", &token[..at], &token[at + 1..]);
        let broken = HeaderValue::from_str(&format!("Bearer {tampered}")).unwrap();

        let key = alg.decoding_key();
        let validation = alg.validation();
        let decoded = jsonwebtoken::decode::<Value>(&token, &key, &validation).unwrap();
        assert_eq!(decoded.claims["sub"], SUB);
        let peer_key = alg.peer_decoding_key();
        let peer_validation = alg.peer_validation();
        let decoded =
            jsonwebtoken10::decode::<PeerClaims>(&token, &peer_key, &peer_validation).unwrap();
        assert_eq!(decoded.claims.sub, SUB);

        let routers = [
            ("bare", bare()),
            ("battlement", battlement(alg, false)),
            ("battlement_cached", battlement(alg, true)),
            ("axum_jwt_auth", axum_jwt_auth(alg)),
        ];
        // For `battlement_cached`, this also puts the token into the cache.
        for (name, app) in &routers {
            check(&rt, name, app, &valid, &broken);
        }

        let mut group = c.benchmark_group(format!("auth/{}", alg.name()));
        group.bench_function("jsonwebtoken_decode", |b| {
            b.iter(|| jsonwebtoken::decode::<Value>(black_box(&token), &key, &validation).unwrap())
        });
        for (name, app) in &routers {
            group.bench_function(*name, |b| b.to_async(&rt).iter(|| roundtrip(app, &valid)));
        }
        group.bench_function("jsonwebtoken10_decode", |b| {
            b.iter(|| {
                jsonwebtoken10::decode::<PeerClaims>(black_box(&token), &peer_key, &peer_validation)
                    .unwrap()
            })
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
