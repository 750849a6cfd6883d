//! JWT bearer token validation: cheap checks first, one key per algorithm, every validated
//! claim required.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use serde::Deserialize;
use serde_json::Value;

use super::jwks::Jwks;
use super::keys::{KeySet, VerifyKey};
use super::layer::Claims;
use super::revoke::Revocation;
use super::scope::ScopeClaim;
use super::{AuthFailure, ConfigError};
use crate::principal::{AuthScheme, Principal};

/// Default cap on a token's size: rejecting a 1 MiB token by decoding it costs milliseconds.
pub const DEFAULT_MAX_TOKEN_SIZE: usize = 8 * 1024;
/// Default clock leeway for `exp` and `nbf`.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);

/// Seconds since the Unix epoch, as the validator sees them.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// One accepted issuer: its exact `iss`, the audiences it may address this service with, and
/// where its keys come from.
///
/// ```
/// use battlement::auth::Issuer;
/// use jsonwebtoken::Algorithm;
///
/// let issuer = Issuer::new("battlement-demo", ["orders-api"])
///     .hmac_key(Algorithm::HS256, b"a dev secret of at least 32 bytes!!");
/// # let _ = issuer;
/// ```
#[must_use]
pub struct Issuer {
    iss: String,
    audiences: Vec<String>,
    keys: IssuerKeys,
}

enum IssuerKeys {
    None,
    Static(Vec<VerifyKey>),
    Jwks(Jwks),
}

impl fmt::Debug for Issuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issuer")
            .field("iss", &self.iss)
            .field("audiences", &self.audiences)
            .finish_non_exhaustive()
    }
}

impl Issuer {
    /// An issuer whose tokens carry `iss` exactly equal to `iss` and an `aud` naming one of
    /// `audiences`.
    pub fn new<I, T>(iss: impl Into<String>, audiences: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        Self {
            iss: iss.into(),
            audiences: audiences.into_iter().map(Into::into).collect(),
            keys: IssuerKeys::None,
        }
    }

    /// Keys from a JWKS (fetched and refreshed by [`Jwks`]).
    pub fn jwks(mut self, jwks: Jwks) -> Self {
        self.keys = IssuerKeys::Jwks(jwks);
        self
    }

    /// A shared secret for `alg` (an HMAC algorithm), with no `kid`.
    pub fn hmac_key(self, alg: Algorithm, secret: &[u8]) -> Self {
        self.key(None, alg, DecodingKey::from_secret(secret))
    }

    /// A key for exactly `alg`, optionally named `kid`.
    pub fn key(mut self, kid: Option<&str>, alg: Algorithm, key: DecodingKey) -> Self {
        let key = VerifyKey::new(kid, alg, key);
        match &mut self.keys {
            IssuerKeys::Static(keys) => keys.push(key),
            _ => self.keys = IssuerKeys::Static(vec![key]),
        }
        self
    }
}

struct IssuerConfig {
    iss: Box<str>,
    audiences: Vec<Box<str>>,
    keys: Jwks,
}

/// Validates JWT bearer tokens. Build it with [`JwtValidator::builder`]; share it in an
/// `Arc` (the auth layer does).
pub struct JwtValidator {
    issuers: Vec<IssuerConfig>,
    algorithms: Vec<Algorithm>,
    leeway: u64,
    typ: Option<Box<str>>,
    max_size: usize,
    scope_claim: ScopeClaim,
    clock: Clock,
    revocation: Option<Arc<dyn Revocation>>,
    revocation_fail_closed: bool,
    cache: Option<super::cache::TokenCache>,
}

impl fmt::Debug for JwtValidator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtValidator")
            .field(
                "issuers",
                &self.issuers.iter().map(|i| &*i.iss).collect::<Vec<_>>(),
            )
            .field("algorithms", &self.algorithms)
            .field("leeway", &self.leeway)
            .finish_non_exhaustive()
    }
}

/// Builds a [`JwtValidator`]. `build` refuses a configuration without an issuer, an
/// audience or an algorithm allowlist, with keys for algorithms outside the allowlist, or
/// mixing HMAC and public-key algorithms.
#[must_use]
pub struct JwtBuilder {
    issuers: Vec<Issuer>,
    algorithms: Vec<Algorithm>,
    leeway: Duration,
    typ: Option<String>,
    max_size: usize,
    scope_claim: ScopeClaim,
    clock: Option<Clock>,
    revocation: Option<Arc<dyn Revocation>>,
    revocation_fail_closed: bool,
    cache: Option<u64>,
}

impl fmt::Debug for JwtBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtBuilder")
            .field("issuers", &self.issuers)
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

impl JwtValidator {
    /// A builder.
    pub fn builder() -> JwtBuilder {
        JwtBuilder {
            issuers: Vec::new(),
            algorithms: Vec::new(),
            leeway: DEFAULT_LEEWAY,
            typ: None,
            max_size: DEFAULT_MAX_TOKEN_SIZE,
            scope_claim: ScopeClaim::default(),
            clock: None,
            revocation: None,
            revocation_fail_closed: false,
            cache: None,
        }
    }
}

impl JwtBuilder {
    /// Accepts tokens from `issuer`. Several issuers may be configured; a token's (not yet
    /// verified) `iss` only chooses which one checks it, never the keys of another.
    pub fn issuer(mut self, issuer: Issuer) -> Self {
        self.issuers.push(issuer);
        self
    }

    /// The algorithms accepted (required). HMAC and public-key algorithms cannot be mixed.
    pub fn algorithms(mut self, algorithms: impl IntoIterator<Item = Algorithm>) -> Self {
        self.algorithms.extend(algorithms);
        self
    }

    /// Clock leeway for `exp` and `nbf` (default 30 s).
    pub fn leeway(mut self, leeway: Duration) -> Self {
        self.leeway = leeway;
        self
    }

    /// Requires the header `typ` (for example `at+jwt`, RFC 9068; `application/at+jwt` is
    /// accepted for it too, and case does not matter).
    pub fn require_type(mut self, typ: impl Into<String>) -> Self {
        self.typ = Some(typ.into());
        self
    }

    /// Largest token accepted, in bytes (default 8 KiB), checked before anything else.
    pub fn max_token_size(mut self, bytes: usize) -> Self {
        self.max_size = bytes;
        self
    }

    /// Where the scopes are in the claims (default: the `scope` claim).
    pub fn scope_claim(mut self, claim: ScopeClaim) -> Self {
        self.scope_claim = claim;
        self
    }

    /// The clock (seconds since the Unix epoch), for tests.
    pub fn clock(mut self, clock: impl Fn() -> u64 + Send + Sync + 'static) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// Checks every token's `jti` against `revocation` (a token without `jti` passes). When
    /// the check fails (a store is down) the token is accepted and a warning logged, unless
    /// [`JwtBuilder::revocation_fail_closed`].
    pub fn revocation(mut self, revocation: impl Revocation) -> Self {
        self.revocation = Some(Arc::new(revocation));
        self
    }

    /// Refuses tokens (503) while the revocation store cannot be asked.
    pub fn revocation_fail_closed(mut self, closed: bool) -> Self {
        self.revocation_fail_closed = closed;
        self
    }

    /// Caches up to `capacity` verified tokens (keyed by a SHA-256 of the token): a hit
    /// skips the signature check. An entry never outlives the token's `exp`, and is used
    /// only while the very key that verified it is in the key set: a key rotated out, or
    /// another key put under its `kid`, sends the token through verification again (so does
    /// every fetch of a JWKS, once per cached token). Off by default.
    pub fn cache_verified(mut self, capacity: u64) -> Self {
        self.cache = Some(capacity);
        self
    }

    /// The validator, or what is wrong with the configuration.
    pub fn build(self) -> Result<JwtValidator, ConfigError> {
        if self.issuers.is_empty() {
            return Err(ConfigError::NoIssuer);
        }
        if self.algorithms.is_empty() {
            return Err(ConfigError::NoAlgorithms);
        }
        let hmac = self
            .algorithms
            .iter()
            .filter(|a| a.family() == AlgorithmFamily::Hmac)
            .count();
        if hmac != 0 && hmac != self.algorithms.len() {
            return Err(ConfigError::MixedAlgorithms);
        }
        let mut issuers = Vec::with_capacity(self.issuers.len());
        for issuer in self.issuers {
            if issuer.iss.is_empty() {
                return Err(ConfigError::NoIssuer);
            }
            if issuer.audiences.is_empty() || issuer.audiences.iter().any(String::is_empty) {
                return Err(ConfigError::NoAudience(issuer.iss));
            }
            if issuers.iter().any(|i: &IssuerConfig| *i.iss == *issuer.iss) {
                return Err(ConfigError::DuplicateIssuer(issuer.iss));
            }
            let keys = match issuer.keys {
                IssuerKeys::None => return Err(ConfigError::NoKeys(issuer.iss)),
                IssuerKeys::Static(keys) => {
                    for key in &keys {
                        if !self.algorithms.contains(&key.alg) {
                            return Err(ConfigError::AlgorithmNotAllowed(key.alg));
                        }
                    }
                    Jwks::from_keys(KeySet::new(keys))
                }
                IssuerKeys::Jwks(jwks) => {
                    if hmac != 0 {
                        return Err(ConfigError::MixedAlgorithms);
                    }
                    jwks
                }
            };
            issuers.push(IssuerConfig {
                iss: issuer.iss.into(),
                audiences: issuer.audiences.into_iter().map(Into::into).collect(),
                keys,
            });
        }
        Ok(JwtValidator {
            issuers,
            algorithms: self.algorithms,
            leeway: self.leeway.as_secs(),
            typ: self.typ.map(|t| t.to_ascii_lowercase().into()),
            max_size: self.max_size,
            scope_claim: self.scope_claim,
            clock: self.clock.unwrap_or_else(|| Arc::new(system_now)),
            revocation: self.revocation,
            revocation_fail_closed: self.revocation_fail_closed,
            cache: self.cache.map(super::cache::TokenCache::new),
        })
    }
}

fn system_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A verified token: who it is and its claims.
#[derive(Clone, Debug)]
pub struct Verified {
    /// The principal (subject, issuer, scopes).
    pub principal: Principal,
    /// Every claim of the token.
    pub claims: Claims,
    pub(crate) jti: Option<Arc<str>>,
    pub(crate) exp: u64,
    /// The [`VerifyKey::id`](super::keys::VerifyKey) of the key that verified it.
    pub(crate) key_id: u64,
    pub(crate) issuer: usize,
}

#[derive(Deserialize)]
struct Header<'a> {
    #[serde(borrow)]
    alg: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    kid: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    typ: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    crit: Option<Value>,
}

/// The registered claims (and the usual scope claims), decoded without building the whole
/// claims object: unknown members are skipped, a member given twice is refused.
#[derive(Deserialize)]
pub(crate) struct Registered {
    #[serde(default)]
    iss: Option<Value>,
    #[serde(default)]
    sub: Option<Value>,
    #[serde(default)]
    aud: Option<Value>,
    #[serde(default)]
    exp: Option<Value>,
    #[serde(default)]
    nbf: Option<Value>,
    #[serde(default)]
    jti: Option<Value>,
    #[serde(default)]
    pub(crate) scope: Option<Value>,
    #[serde(default)]
    pub(crate) scp: Option<Value>,
    #[serde(default)]
    pub(crate) permissions: Option<Value>,
    #[serde(default)]
    pub(crate) realm_access: Option<Value>,
}

/// The parts of a token after the cheap checks, before the signature.
pub(crate) struct Parsed<'t> {
    alg: Algorithm,
    kid: Option<String>,
    message: &'t str,
    signature: &'t str,
    registered: Registered,
    raw: bytes::Bytes,
    issuer: usize,
}

fn algorithm(name: &str) -> Option<Algorithm> {
    // Exact, case-sensitive names: `none`, `None`, `NONE`, `hs256` are all refused.
    Some(match name {
        "HS256" => Algorithm::HS256,
        "HS384" => Algorithm::HS384,
        "HS512" => Algorithm::HS512,
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        _ => return None,
    })
}

impl JwtValidator {
    /// Verifies `token` (without the `Bearer ` prefix).
    pub async fn verify(&self, token: &str) -> Result<Verified, AuthFailure> {
        if let Some(cached) = self.cached(token)? {
            self.check_revocation(&cached).await?;
            return Ok(cached);
        }
        let parsed = self.parse(token)?;
        let key = self.issuers[parsed.issuer]
            .keys
            .key_for(parsed.kid.as_deref(), parsed.alg)
            .await?;
        let verified = self.finish(parsed, &key)?;
        self.check_revocation(&verified).await?;
        self.store(token, &verified);
        Ok(verified)
    }

    /// Verifies `token` without waiting, when that is possible: `None` when the key must be
    /// fetched or a revocation store asked (call [`JwtValidator::verify`] then).
    pub(crate) fn verify_now(&self, token: &str) -> Option<Result<Verified, AuthFailure>> {
        if self.revocation.is_some() {
            return None;
        }
        match self.cached(token) {
            Ok(Some(cached)) => return Some(Ok(cached)),
            Ok(None) => {}
            Err(e) => return Some(Err(e)),
        }
        let parsed = match self.parse(token) {
            Ok(parsed) => parsed,
            Err(e) => return Some(Err(e)),
        };
        let keys = match self.issuers[parsed.issuer].keys.current() {
            Ok(keys) => keys,
            Err(e) => return Some(Err(e)),
        };
        let key = keys.find(parsed.kid.as_deref(), parsed.alg)?.clone();
        let verified = self.finish(parsed, &key);
        if let Ok(v) = &verified {
            self.store(token, v);
        }
        Some(verified)
    }

    fn cached(&self, token: &str) -> Result<Option<Verified>, AuthFailure> {
        let Some(cache) = &self.cache else {
            return Ok(None);
        };
        if token.len() > self.max_size {
            return Err(AuthFailure::TooLarge);
        }
        let Some(hit) = cache.get(token) else {
            return Ok(None);
        };
        let now = (self.clock)();
        if now > hit.exp.saturating_add(self.leeway) {
            cache.remove(token);
            return Err(AuthFailure::Expired);
        }
        // Not once the key that verified it has left the key set (rotated out or revoked
        // by the issuer, or replaced under the same `kid`, or with no `kid` at all): then
        // the token is verified again against the current keys.
        let still_there = match self.issuers[hit.issuer].keys.current() {
            Ok(keys) => keys.contains_id(hit.key_id),
            Err(e) => return Err(e),
        };
        if !still_there {
            cache.remove(token);
            return Ok(None);
        }
        Ok(Some((*hit).clone()))
    }

    fn store(&self, token: &str, verified: &Verified) {
        if let Some(cache) = &self.cache {
            let now = (self.clock)();
            cache.insert(token, verified.clone(), verified.exp.saturating_sub(now));
        }
    }

    /// The cheap checks, in order of cost: size, shape, header, algorithm, type, claims JSON,
    /// issuer. No cryptography yet.
    pub(crate) fn parse<'t>(&self, token: &'t str) -> Result<Parsed<'t>, AuthFailure> {
        if token.len() > self.max_size {
            return Err(AuthFailure::TooLarge);
        }
        let mut parts = token.splitn(4, '.');
        let (Some(header), Some(claims), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthFailure::Malformed);
        };
        if header.is_empty() || claims.is_empty() {
            return Err(AuthFailure::Malformed);
        }
        let message_len = header.len() + 1 + claims.len();
        let header_bytes = URL_SAFE_NO_PAD
            .decode(header)
            .map_err(|_| AuthFailure::Malformed)?;
        let head: Header<'_> =
            serde_json::from_slice(&header_bytes).map_err(|_| AuthFailure::Malformed)?;
        let alg = algorithm(&head.alg).ok_or(AuthFailure::Algorithm)?;
        if !self.algorithms.contains(&alg) {
            return Err(AuthFailure::Algorithm);
        }
        // An unsigned token has an empty signature; no allowed algorithm has one.
        if signature.is_empty() {
            return Err(AuthFailure::Signature);
        }
        // RFC 7515 §4.1.11: extensions we do not understand must not be ignored.
        if head.crit.is_some() {
            return Err(AuthFailure::Malformed);
        }
        if let Some(required) = &self.typ {
            let typ = head.typ.as_deref().map(str::to_ascii_lowercase);
            let ok = typ.as_deref().is_some_and(|t| {
                t == &**required || t.strip_prefix("application/") == Some(&**required)
            });
            if !ok {
                return Err(AuthFailure::Type);
            }
        }
        let claims_bytes = URL_SAFE_NO_PAD
            .decode(claims)
            .map_err(|_| AuthFailure::Malformed)?;
        // The claims must be one JSON object; only the registered members are decoded now.
        if claims_bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(AuthFailure::Malformed);
        }
        let registered: Registered =
            serde_json::from_slice(&claims_bytes).map_err(|_| AuthFailure::Malformed)?;
        let iss = match &registered.iss {
            Some(Value::String(iss)) => iss,
            _ => return Err(AuthFailure::MissingClaim),
        };
        let issuer = self
            .issuers
            .iter()
            .position(|i| *i.iss == **iss)
            .ok_or(AuthFailure::Issuer)?;
        let kid = head.kid.map(|k| k.into_owned());
        Ok(Parsed {
            alg,
            kid,
            message: &token[..message_len],
            signature,
            registered,
            raw: bytes::Bytes::from(claims_bytes),
            issuer,
        })
    }

    /// The signature, then the claims.
    fn finish(&self, parsed: Parsed<'_>, key: &VerifyKey) -> Result<Verified, AuthFailure> {
        debug_assert_eq!(key.alg, parsed.alg);
        let valid = jsonwebtoken::crypto::verify(
            parsed.signature,
            parsed.message.as_bytes(),
            &key.key,
            key.alg,
        )
        .unwrap_or(false);
        if !valid {
            return Err(AuthFailure::Signature);
        }
        let claims = &parsed.registered;
        let issuer = &self.issuers[parsed.issuer];
        let now = (self.clock)();
        let exp = numeric(claims.exp.as_ref())?.ok_or(AuthFailure::MissingClaim)?;
        if now > exp.saturating_add(self.leeway) {
            return Err(AuthFailure::Expired);
        }
        if let Some(nbf) = numeric(claims.nbf.as_ref())?
            && now.saturating_add(self.leeway) < nbf
        {
            return Err(AuthFailure::NotYetValid);
        }
        let audience_ok = match &claims.aud {
            Some(Value::String(aud)) => issuer.audiences.iter().any(|a| **a == **aud),
            Some(Value::Array(auds)) => auds.iter().any(|v| {
                v.as_str()
                    .is_some_and(|aud| issuer.audiences.iter().any(|a| &**a == aud))
            }),
            None => return Err(AuthFailure::MissingClaim),
            Some(_) => false,
        };
        if !audience_ok {
            return Err(AuthFailure::Audience);
        }
        let subject = match &claims.sub {
            Some(Value::String(sub)) if !sub.is_empty() => sub.as_str(),
            _ => return Err(AuthFailure::MissingClaim),
        };
        let jti = match &claims.jti {
            Some(Value::String(jti)) => Some(Arc::from(jti.as_str())),
            _ => None,
        };
        let scopes = self.scope_claim.scopes(claims, &parsed.raw);
        let principal = Principal::new(subject, AuthScheme::Bearer)
            .with_issuer(&*issuer.iss)
            .with_scopes(scopes);
        Ok(Verified {
            principal,
            exp,
            key_id: key.id,
            issuer: parsed.issuer,
            jti,
            claims: Claims::from_json(parsed.raw),
        })
    }

    async fn check_revocation(&self, verified: &Verified) -> Result<(), AuthFailure> {
        let Some(revocation) = &self.revocation else {
            return Ok(());
        };
        let Some(jti) = verified.jti.as_deref() else {
            return Ok(());
        };
        match revocation.is_revoked(jti).await {
            Ok(false) => Ok(()),
            Ok(true) => Err(AuthFailure::Revoked),
            Err(error) if self.revocation_fail_closed => {
                tracing::warn!(%error, "battlement::auth: revocation check failed; refusing");
                Err(AuthFailure::RevocationUnavailable)
            }
            Err(error) => {
                tracing::warn!(%error, "battlement::auth: revocation check failed; accepting");
                Ok(())
            }
        }
    }
}

/// A NumericDate claim: absent is `None`; present but not a non-negative number is an error.
fn numeric(claim: Option<&Value>) -> Result<Option<u64>, AuthFailure> {
    match claim {
        None => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(v) = n.as_u64() {
                Ok(Some(v))
            } else if let Some(f) = n.as_f64().filter(|f| f.is_finite() && *f >= 0.0) {
                Ok(Some(f as u64))
            } else {
                Err(AuthFailure::MissingClaim)
            }
        }
        Some(_) => Err(AuthFailure::MissingClaim),
    }
}
