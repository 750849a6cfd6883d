//! Authentication and authorization: JWT bearer tokens (with JWKS), API keys, scopes and
//! policy hooks, one [`Principal`](crate::principal::Principal) for all of them.
//!
//! - [`AuthLayer`] authenticates: a bearer token checked by a [`JwtValidator`], or an API
//!   key from [`ApiKeys`]. It puts the `Principal` (and, for tokens, the [`Claims`] and
//!   optionally your own typed claims) into the request extensions, where handlers and the
//!   other layers (`key::Principal` for per-user rate limits) find it.
//! - [`RequireScopes`] (per route) and [`Authorize`] (an async policy hook for object-level
//!   checks) authorize.
//!
//! Secure by construction:
//!
//! - [`JwtBuilder::build`] refuses a validator without an issuer, an audience and an
//!   algorithm allowlist, or one mixing HMAC and public-key algorithms. Every key is bound
//!   to exactly one algorithm ([`VerifyKey`]), so an RS256 key is never used to check an
//!   HS256 signature, and `alg: none` (in any casing) is never accepted.
//! - `exp`, `iss`, `aud` and `sub` are required (a token without them is refused, unlike
//!   `jsonwebtoken`'s defaults), `nbf` is checked, the leeway is 30 s by default, `typ` can be
//!   required (`at+jwt`, RFC 9068). The clock is injectable.
//! - Cheap checks come before any cryptography: size (8 KiB), three segments, the header's
//!   algorithm against the allowlist, the issuer. `jku`, `x5u` and embedded `jwk` headers
//!   are never used; `crit` is refused.
//! - [`Jwks`] keeps keys lock-free, refreshes them in the background honouring
//!   `Cache-Control`, fetches at most once per cooldown for unknown `kid`s (single flight,
//!   negative cache), serves the last keys for a bounded time when the endpoint fails and
//!   then refuses with `503` (gRPC `UNAVAILABLE`).
//! - Several issuers: the token's (unverified) `iss` only chooses which issuer's keys and
//!   audience check it.
//! - API keys are stored as SHA-256 hashes and compared in constant time.
//! - Refusals follow RFC 6750: `401` with `WWW-Authenticate: Bearer realm="...",
//!   error="invalid_token", error_description="..."`; `403` with
//!   `error="insufficient_scope"` and `scope="..."`; `400 invalid_request` for a token in
//!   two places. gRPC callers get `UNAUTHENTICATED`, `PERMISSION_DENIED`,
//!   `INVALID_ARGUMENT` (the `400`) or `UNAVAILABLE`. No token ever appears in a response or a log; the reason
//!   ([`AuthFailure`]) goes into the annotation record.
//!
//! ```
//! use battlement::auth::{AuthLayer, Issuer, JwtValidator, RequireScopes};
//! use battlement::principal::Principal;
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
//! use std::convert::Infallible;
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! const SECRET: &[u8] = b"a dev secret of at least 32 bytes!!";
//! let jwt = JwtValidator::builder()
//!     .issuer(Issuer::new("battlement-demo", ["orders-api"]).hmac_key(Algorithm::HS256, SECRET))
//!     .algorithms([Algorithm::HS256])
//!     .build()
//!     .unwrap();
//! let service = ServiceBuilder::new()
//!     .layer(AuthLayer::builder().jwt(jwt).realm("orders-api").build().unwrap())
//!     .layer(RequireScopes::all(["orders:write"]))
//!     .service_fn(|req: Request<()>| async move {
//!         let who = Principal::of(req.extensions()).unwrap().subject().to_owned();
//!         Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(who))))
//!     });
//!
//! let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600;
//! let claims = serde_json::json!({
//!     "iss": "battlement-demo", "aud": "orders-api", "sub": "alice", "exp": exp,
//!     "scope": "orders:read orders:write",
//! });
//! let token = encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET)).unwrap();
//! let req = Request::post("/orders").header("authorization", format!("Bearer {token}")).body(()).unwrap();
//! let res = service.clone().oneshot(req).await.unwrap();
//! assert_eq!(res.status(), StatusCode::OK);
//!
//! let res = service.oneshot(Request::post("/orders").body(()).unwrap()).await.unwrap();
//! assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
//! assert_eq!(res.headers()["www-authenticate"], "Bearer realm=\"orders-api\"");
//! # }
//! ```

mod api_key;
mod cache;
mod future;
mod jwks;
mod jwt;
mod keys;
mod layer;
mod revoke;
mod scope;
mod service;

pub use api_key::{ApiKey, ApiKeys};
pub use future::ResponseFuture;
pub use jwks::{Jwks, JwksBuilder, JwksError};
pub use jwt::{
    Clock, DEFAULT_LEEWAY, DEFAULT_MAX_TOKEN_SIZE, Issuer, JwtBuilder, JwtValidator, Verified,
};
pub use keys::{KeySet, VerifyKey};
pub use layer::{AuthBuilder, AuthLayer, Claims, TokenSource};
#[cfg(feature = "redis")]
pub use revoke::RedisRevocation;
pub use revoke::{BoxFuture, MemoryRevocation, Revocation, RevocationError};
pub use scope::{
    Authorize, AuthorizeService, Policy, RequireScopes, RequireScopesService, ScopeClaim,
    ScopeFuture,
};
pub use service::Auth;

use http::header::{RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderValue, StatusCode};

use crate::annotate::{Annotation, AuthNote};
use crate::reject::{GrpcCode, Rejection};

/// A configuration the auth layers refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// No issuer configured (or an empty one).
    #[error("a JWT validator needs at least one issuer")]
    NoIssuer,
    /// An issuer without an audience.
    #[error("issuer {0} needs at least one audience")]
    NoAudience(String),
    /// The same issuer twice.
    #[error("issuer {0} is configured twice")]
    DuplicateIssuer(String),
    /// An issuer without keys.
    #[error("issuer {0} has no keys")]
    NoKeys(String),
    /// No algorithm allowlist.
    #[error("a JWT validator needs an algorithm allowlist")]
    NoAlgorithms,
    /// HMAC and public-key algorithms or keys in one validator.
    #[error("HMAC and public-key algorithms cannot be mixed in one validator")]
    MixedAlgorithms,
    /// A key for an algorithm outside the allowlist.
    #[error("a key is bound to {0:?}, which is not in the allowlist")]
    AlgorithmNotAllowed(jsonwebtoken::Algorithm),
    /// An API key that is not `{id}.{secret}` with a long enough secret, or a bad hash.
    #[error("invalid API key: {0}")]
    ApiKey(&'static str),
    /// The same API key id twice with the same hash.
    #[error("API key id {0} is configured twice with the same key")]
    DuplicateApiKey(String),
    /// An auth layer with no way to authenticate.
    #[error("an auth layer needs a JWT validator or API keys")]
    NoScheme,
    /// A realm with characters that cannot be quoted in `WWW-Authenticate`.
    #[error("the realm must be printable ASCII without quotes or backslashes")]
    Realm,
}

/// Why a request was not authenticated or not authorized: a fixed, low-cardinality reason
/// that goes into the annotation record, the logs and the metrics (never a token).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthFailure {
    /// No credentials were presented (and they are required).
    #[error("no credentials")]
    Missing,
    /// Credentials were presented in more than one place at once.
    #[error("credentials were presented in more than one place")]
    Ambiguous,
    /// The token is larger than the configured cap.
    #[error("the token is too large")]
    TooLarge,
    /// The token is not three base64url segments of JSON.
    #[error("the token is malformed")]
    Malformed,
    /// The token's algorithm is not allowed.
    #[error("the token's algorithm is not allowed")]
    Algorithm,
    /// No key matches the token's `kid` and algorithm.
    #[error("no key matches the token")]
    UnknownKey,
    /// The signature does not verify.
    #[error("the signature is invalid")]
    Signature,
    /// `exp` is past.
    #[error("the token has expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("the token is not valid yet")]
    NotYetValid,
    /// A required claim (`exp`, `iss`, `aud`, ...) is missing or has the wrong type.
    #[error("a required claim is missing")]
    MissingClaim,
    /// `iss` is not an accepted issuer.
    #[error("the issuer is not accepted")]
    Issuer,
    /// `aud` does not name this service.
    #[error("the audience is not accepted")]
    Audience,
    /// The `typ` header is not the required one.
    #[error("the token type is not accepted")]
    Type,
    /// The token's `jti` is revoked.
    #[error("the token has been revoked")]
    Revoked,
    /// The API key is unknown or wrong.
    #[error("the API key is invalid")]
    ApiKey,
    /// The signing keys cannot be fetched and the last ones are too old to trust.
    #[error("the signing keys are unavailable")]
    KeysUnavailable,
    /// The revocation store cannot be asked (and the validator fails closed).
    #[error("the revocation store is unavailable")]
    RevocationUnavailable,
    /// The principal lacks a required scope.
    #[error("insufficient scope")]
    InsufficientScope,
    /// A policy refused the principal.
    #[error("forbidden")]
    Forbidden,
}

impl AuthFailure {
    /// A short lowercase name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing_credentials",
            AuthFailure::Ambiguous => "ambiguous_credentials",
            AuthFailure::TooLarge => "token_too_large",
            AuthFailure::Malformed => "malformed_token",
            AuthFailure::Algorithm => "algorithm_not_allowed",
            AuthFailure::UnknownKey => "unknown_key",
            AuthFailure::Signature => "bad_signature",
            AuthFailure::Expired => "expired",
            AuthFailure::NotYetValid => "not_yet_valid",
            AuthFailure::MissingClaim => "missing_claim",
            AuthFailure::Issuer => "wrong_issuer",
            AuthFailure::Audience => "wrong_audience",
            AuthFailure::Type => "wrong_type",
            AuthFailure::Revoked => "revoked",
            AuthFailure::ApiKey => "invalid_api_key",
            AuthFailure::KeysUnavailable => "keys_unavailable",
            AuthFailure::RevocationUnavailable => "revocation_unavailable",
            AuthFailure::InsufficientScope => "insufficient_scope",
            AuthFailure::Forbidden => "forbidden",
        }
    }
}

impl AuthFailure {
    /// The HTTP status of this refusal: 400 for ambiguous credentials, 403 for missing
    /// scopes and policy refusals, 503 when keys or the revocation store are unavailable,
    /// 401 otherwise.
    pub fn status(self) -> StatusCode {
        match self {
            AuthFailure::Ambiguous => StatusCode::BAD_REQUEST,
            AuthFailure::InsufficientScope | AuthFailure::Forbidden => StatusCode::FORBIDDEN,
            AuthFailure::KeysUnavailable | AuthFailure::RevocationUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::UNAUTHORIZED,
        }
    }

    /// The refusal, with an RFC 6750 `WWW-Authenticate` challenge for `realm` (a `scope`
    /// attribute for [`AuthFailure::InsufficientScope`]). No credential is ever echoed.
    pub fn rejection(self, realm: &str, scheme: Challenge, scope: Option<&str>) -> Rejection {
        let status = self.status();
        let title = match status {
            StatusCode::BAD_REQUEST => "Bad Request",
            StatusCode::FORBIDDEN => "Forbidden",
            StatusCode::SERVICE_UNAVAILABLE => "Service Unavailable",
            _ => "Unauthorized",
        };
        let grpc = match status {
            // A malformed request (credentials in two places), not bad credentials.
            StatusCode::BAD_REQUEST => GrpcCode::InvalidArgument,
            StatusCode::FORBIDDEN => GrpcCode::PermissionDenied,
            StatusCode::SERVICE_UNAVAILABLE => GrpcCode::Unavailable,
            _ => GrpcCode::Unauthenticated,
        };
        let mut rejection = Rejection::new(status, title)
            .with_detail(self.to_string())
            .with_grpc_code(grpc);
        let error = match self {
            AuthFailure::Missing => None,
            AuthFailure::Ambiguous => Some("invalid_request"),
            AuthFailure::InsufficientScope => Some("insufficient_scope"),
            AuthFailure::Forbidden
            | AuthFailure::KeysUnavailable
            | AuthFailure::RevocationUnavailable => {
                if self.status() == StatusCode::SERVICE_UNAVAILABLE {
                    rejection = rejection.with_header(RETRY_AFTER, HeaderValue::from_static("5"));
                }
                return rejection;
            }
            _ => Some("invalid_token"),
        };
        let mut challenge = format!("{} realm=\"{realm}\"", scheme.as_str());
        if let Some(error) = error {
            challenge.push_str(&format!(
                ", error=\"{error}\", error_description=\"{self}\""
            ));
        }
        if let Some(scope) = scope.filter(|_| self == AuthFailure::InsufficientScope) {
            challenge.push_str(&format!(", scope=\"{scope}\""));
        }
        if let Ok(value) = HeaderValue::from_str(&challenge) {
            rejection = rejection.with_header(WWW_AUTHENTICATE, value);
        }
        rejection
    }
}

/// The authentication scheme named in a `WWW-Authenticate` challenge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Challenge {
    /// `Bearer` (RFC 6750).
    Bearer,
    /// `ApiKey`.
    ApiKey,
}

impl Challenge {
    fn as_str(self) -> &'static str {
        match self {
            Challenge::Bearer => "Bearer",
            Challenge::ApiKey => "ApiKey",
        }
    }
}

/// Whether `realm` can be put between quotes in a header.
pub(crate) fn valid_realm(realm: &str) -> bool {
    !realm.is_empty()
        && realm
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

/// Writes an authentication outcome into the request's annotation, if there is one.
pub(crate) fn annotate(
    extensions: &http::Extensions,
    subject: Option<&str>,
    failure: Option<AuthFailure>,
) {
    if let Some(annotation) = Annotation::of(extensions) {
        annotation.update(|record| {
            let note = record.auth.get_or_insert_with(|| AuthNote::failure("none"));
            if let Some(subject) = subject {
                note.subject = Some(subject.into());
            }
            note.failure = failure.map(AuthFailure::as_str);
        });
    }
}
