//! The JWKS key source: an issuer's signing keys, fetched from its `jwks_uri` (directly or
//! through OpenID Connect discovery), refreshed in the background, and read lock-free on every
//! request.
//!
//! What it guards against:
//!
//! - **Algorithm confusion.** Every key is bound to exactly one algorithm from an allowlist
//!   that must be configured and may not contain HMAC algorithms. `kty: "oct"` keys (shared
//!   secrets) and encryption keys (`use: "enc"`) are never loaded; a key without `alg` is
//!   loaded only when its algorithm is unambiguous.
//! - **Fetch storms.** A token with an unknown `kid` triggers at most one refresh per cooldown
//!   across all concurrent callers, who all wait for that one fetch; recently missed `kid`s
//!   are remembered (a bounded negative cache) and answered at once.
//! - **A slow or failing identity provider.** Requests never hold a lock: they read the
//!   current keys through an [`arc_swap`] pointer. A failed refresh keeps serving the last
//!   good keys for a configured time (`max_stale`), then answers
//!   [`AuthFailure::KeysUnavailable`] rather than trusting keys that may have been revoked.
//! - **A hostile endpoint.** Responses are capped in size (counted while reading), bounded in
//!   time, redirects are refused, and `x5u`, `x5c` and `jku` are never followed.
//!
//! ```no_run
//! use battlement::auth::Jwks;
//! use jsonwebtoken::Algorithm;
//! use std::time::Duration;
//!
//! # async fn run() -> Result<(), battlement::auth::JwksError> {
//! let jwks = Jwks::discover("https://login.example.com")
//!     .algorithms([Algorithm::RS256, Algorithm::ES256])
//!     .max_stale(Duration::from_secs(3600))
//!     .build()
//!     .await?;
//! // On every request, with the token header's `kid` and `alg`:
//! let key = jwks.key_for(Some("2024-05-key"), Algorithm::RS256).await;
//! # let _ = key;
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P384_SHA384_FIXED, ED25519, ParsedPublicKey,
    VerificationAlgorithm,
};
use bytes::Bytes;
use http::header::{
    ACCEPT, AGE, CACHE_CONTROL, CONTENT_LENGTH, HeaderMap, HeaderValue, USER_AGENT,
};
use http::{Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use parking_lot::Mutex;
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::AuthFailure;
use super::keys::{KeySet, VerifyKey};

const DEFAULT_MIN_REFRESH: Duration = Duration::from_secs(5 * 60);
const DEFAULT_MAX_REFRESH: Duration = Duration::from_secs(60 * 60);
const DEFAULT_COOLDOWN: Duration = Duration::from_secs(30);
const DEFAULT_MAX_STALE: Duration = Duration::from_secs(60 * 60);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_MAX_BODY: usize = 1024 * 1024;
/// The first retry after a failed fetch; it doubles up to the minimum refresh interval.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// How many recently missed `kid`s are remembered.
const MISS_CACHE_CAPACITY: usize = 1024;
/// A `kid` longer than this never triggers a fetch nor enters the negative cache.
const MAX_KID_LEN: usize = 256;
/// Keys beyond this many in one document are ignored (real key sets hold a handful).
const MAX_KEYS: usize = 100;
/// Text taken from a response into an error is cut to this many bytes.
const MAX_ERROR_TEXT: usize = 256;
const USER_AGENT_VALUE: &str = concat!("battlement/", env!("CARGO_PKG_VERSION"));
const JSON: &str = "application/json";

type HttpClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// Why fetching or loading a key set failed, or why a [`JwksBuilder`] was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwksError {
    /// The configuration is invalid (no algorithm allowlist, an HMAC algorithm in it, an
    /// empty interval, ...). Returned by [`JwksBuilder::build`] and
    /// [`JwksBuilder::build_lazy`] before anything is fetched.
    #[error("invalid JWKS configuration: {0}")]
    Config(String),
    /// A URL (the JWKS URL, the issuer, or a discovered `jwks_uri`) is not an absolute
    /// `https` or `http` URL without credentials.
    #[error("invalid URL: {0}")]
    InvalidUrl(String),
    /// The request failed below HTTP: DNS, connect, TLS, or a broken connection.
    #[error("HTTP request failed: {0}")]
    Http(String),
    /// The endpoint answered with a status other than 2xx or 3xx.
    #[error("the endpoint answered with status {0}")]
    Status(u16),
    /// The endpoint answered with a redirect; redirects are not followed.
    #[error("the endpoint answered with a redirect, which is not followed")]
    Redirect,
    /// The response body is larger than [`JwksBuilder::max_body`].
    #[error("the response body is larger than the limit")]
    TooLarge,
    /// The request did not complete within [`JwksBuilder::timeout`].
    #[error("the request timed out")]
    Timeout,
    /// The response is not the expected JSON document.
    #[error("the response is not a valid document: {0}")]
    Json(String),
    /// The discovery document names another issuer than the configured one.
    #[error("the discovered issuer {found:?} is not the configured issuer {expected:?}")]
    IssuerMismatch {
        /// The configured issuer.
        expected: String,
        /// The issuer the discovery document names (cut to 256 bytes).
        found: String,
    },
    /// The key set holds no key that may be used (all were rejected or failed to parse).
    /// The keys in use are kept.
    #[error("the key set has no usable keys")]
    NoUsableKeys,
}

/// An issuer's signing keys: fetched from a JWKS endpoint and refreshed in the background,
/// or a fixed set ([`Jwks::from_keys`]).
///
/// Cloning is cheap and shares the keys, the HTTP client and the refresh task. The
/// background task holds no strong reference: it stops when the last clone is dropped.
///
/// ```no_run
/// use battlement::auth::Jwks;
/// use jsonwebtoken::Algorithm;
/// use std::time::Duration;
///
/// # async fn run() -> Result<(), battlement::auth::JwksError> {
/// let jwks = Jwks::from_url("https://idp.example.com/.well-known/jwks.json")
///     .algorithms([Algorithm::ES256])
///     .refresh_interval(Duration::from_secs(300), Duration::from_secs(3600))
///     .unknown_kid_cooldown(Duration::from_secs(30))
///     .build()
///     .await?;
/// assert!(jwks.current().is_ok());
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Jwks {
    inner: Arc<Shared>,
}

/// Configures a [`Jwks`]; made by [`Jwks::from_url`] or [`Jwks::discover`].
///
/// [`algorithms`](Self::algorithms) is required; everything else has a default.
#[must_use]
#[derive(Clone, Debug)]
pub struct JwksBuilder {
    endpoint: EndpointSpec,
    algorithms: Option<Vec<Algorithm>>,
    settings: Settings,
}

#[derive(Clone, Debug)]
enum EndpointSpec {
    Url(String),
    Discover(String),
}

#[derive(Clone, Copy, Debug)]
struct Settings {
    min_refresh: Duration,
    max_refresh: Duration,
    cooldown: Duration,
    max_stale: Duration,
    timeout: Duration,
    max_body: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            min_refresh: DEFAULT_MIN_REFRESH,
            max_refresh: DEFAULT_MAX_REFRESH,
            cooldown: DEFAULT_COOLDOWN,
            max_stale: DEFAULT_MAX_STALE,
            timeout: DEFAULT_TIMEOUT,
            max_body: DEFAULT_MAX_BODY,
        }
    }
}

/// State shared by every clone of a [`Jwks`] (and, through a weak reference, its task).
struct Shared {
    /// Every key is bound to one of these; a token with another algorithm has no key.
    algorithms: Vec<Algorithm>,
    /// The keys in use, swapped whole; `None` until the first fetch succeeds.
    state: ArcSwapOption<Loaded>,
    source: Source,
    /// Counts fetches started and completed, with the last result, so that callers can
    /// wait for a fetch that started after they asked for one.
    progress: watch::Sender<Progress>,
    /// The unknown-`kid` refresh: when the last one was asked for, and which one is pending.
    gate: Mutex<Gate>,
    misses: Mutex<Misses>,
    /// When a request last woke the refresh task because it had no usable keys.
    nudged: Mutex<Option<Instant>>,
}

struct Loaded {
    keys: Arc<KeySet>,
    /// When these keys stop being served; `None` for keys that never go stale.
    stale_at: Option<Instant>,
    fetched_at: Option<SystemTime>,
}

enum Source {
    Static,
    Remote(Box<Remote>),
}

struct Remote {
    client: HttpClient,
    endpoint: Endpoint,
    settings: Settings,
    /// Wakes the refresh task for a fetch now. Dropping it (with the last `Jwks`) stops the
    /// task.
    wake: mpsc::Sender<()>,
}

enum Endpoint {
    Url(Uri),
    Discover {
        issuer: String,
        discovery: Uri,
        /// The discovered `jwks_uri`, forgotten when fetching from it fails.
        jwks_uri: Mutex<Option<Uri>>,
    },
}

#[derive(Clone, Debug, Default)]
struct Progress {
    started: u64,
    completed: u64,
    last: Option<Result<(), JwksError>>,
}

#[derive(Debug, Default)]
struct Gate {
    last_forced: Option<Instant>,
    /// The fetch number that the pending unknown-`kid` refresh waits for.
    pending: Option<u64>,
}

/// Recently missed `kid`s, so that repeating one does not wait on or cause a fetch.
#[derive(Debug, Default)]
struct Misses {
    map: HashMap<Box<str>, Instant>,
}

impl Misses {
    fn contains(&self, kid: &str, now: Instant, ttl: Duration) -> bool {
        self.map
            .get(kid)
            .is_some_and(|at| now.saturating_duration_since(*at) < ttl)
    }

    fn insert(&mut self, kid: &str, now: Instant, ttl: Duration) {
        if self.map.len() >= MISS_CACHE_CAPACITY && !self.map.contains_key(kid) {
            self.map
                .retain(|_, at| now.saturating_duration_since(*at) < ttl);
            if self.map.len() >= MISS_CACHE_CAPACITY {
                let oldest = self
                    .map
                    .iter()
                    .min_by_key(|(_, at)| **at)
                    .map(|(kid, _)| kid.clone());
                if let Some(oldest) = oldest {
                    self.map.remove(&oldest);
                }
            }
        }
        self.map.insert(kid.into(), now);
    }
}

impl Jwks {
    /// Keys fetched from `url`, a JWKS document (an OpenID provider's `jwks_uri`). `https`
    /// is expected; `http` is accepted for loopback and internal identity providers.
    pub fn from_url(url: &str) -> JwksBuilder {
        JwksBuilder::new(EndpointSpec::Url(url.to_owned()))
    }

    /// Keys found through OpenID Connect discovery: `GET
    /// {issuer}/.well-known/openid-configuration`, whose `issuer` must equal `issuer` exactly
    /// (else [`JwksError::IssuerMismatch`]), then its `jwks_uri`. When `issuer` is `https`,
    /// so must the `jwks_uri` be.
    pub fn discover(issuer: &str) -> JwksBuilder {
        JwksBuilder::new(EndpointSpec::Discover(issuer.to_owned()))
    }

    /// A fixed key set, never refreshed and never stale: for configured keys and tests. The
    /// algorithms are those the keys are bound to.
    pub fn from_keys(keys: KeySet) -> Jwks {
        let mut algorithms: Vec<Algorithm> = Vec::new();
        for key in keys.keys() {
            if !algorithms.contains(&key.algorithm()) {
                algorithms.push(key.algorithm());
            }
        }
        let shared = Shared::new(algorithms, Source::Static);
        shared.state.store(Some(Arc::new(Loaded {
            keys: Arc::new(keys),
            stale_at: None,
            fetched_at: None,
        })));
        Jwks {
            inner: Arc::new(shared),
        }
    }

    /// The keys in use, without waiting or locking.
    ///
    /// # Errors
    ///
    /// [`AuthFailure::KeysUnavailable`] before the first fetch has succeeded, and when the
    /// keys were due for a refresh more than `max_stale` ago (refreshing keeps failing).
    /// Either way a fetch is started at once (at most one a second), whatever the backoff
    /// of the failing fetches had grown to: keys come back soon after the issuer does.
    pub fn current(&self) -> Result<Arc<KeySet>, AuthFailure> {
        let guard = self.inner.state.load();
        let Some(loaded) = guard.as_ref() else {
            self.nudge();
            return Err(AuthFailure::KeysUnavailable);
        };
        if let Some(stale_at) = loaded.stale_at
            && Instant::now() >= stale_at
        {
            self.nudge();
            return Err(AuthFailure::KeysUnavailable);
        }
        Ok(Arc::clone(&loaded.keys))
    }

    /// The key for a token header's `kid` and `alg`.
    ///
    /// A `kid` that is not in the set may be a key the issuer just rotated in: it triggers a
    /// refresh, at most one per cooldown across all callers, and concurrent callers wait for
    /// that same fetch (a few request timeouts at most). A `kid` that is still missing is
    /// remembered for the cooldown and refused at once when seen again. A token without a
    /// `kid`, or whose `kid` names a key of another algorithm, never triggers a refresh.
    ///
    /// # Errors
    ///
    /// [`AuthFailure::Algorithm`] when `alg` is not in the allowlist,
    /// [`AuthFailure::KeysUnavailable`] as for [`current`](Self::current), and
    /// [`AuthFailure::UnknownKey`] when no key matches.
    pub async fn key_for(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Arc<VerifyKey>, AuthFailure> {
        if !self.inner.algorithms.contains(&alg) {
            return Err(AuthFailure::Algorithm);
        }
        let keys = self.current()?;
        if let Some(key) = keys.find(kid, alg) {
            return Ok(Arc::clone(key));
        }
        let (Some(kid), Source::Remote(remote)) = (kid, &self.inner.source) else {
            return Err(AuthFailure::UnknownKey);
        };
        if kid.is_empty() || kid.len() > MAX_KID_LEN || keys.contains_kid(kid) {
            return Err(AuthFailure::UnknownKey);
        }
        drop(keys);

        let cooldown = remote.settings.cooldown;
        let now = Instant::now();
        if self.inner.misses.lock().contains(kid, now, cooldown) {
            return Err(AuthFailure::UnknownKey);
        }
        // Subscribe before looking at the gate, so that no completion can be missed.
        let progress = self.inner.progress.subscribe();
        if let Some(target) = self.inner.claim_or_join(remote, now) {
            // The outcome shows in the keys; a failure was logged by the refresh task.
            let _ = self.inner.wait_for(progress, target, remote).await;
        }
        let keys = self.current()?;
        if let Some(key) = keys.find(Some(kid), alg) {
            return Ok(Arc::clone(key));
        }
        self.inner
            .misses
            .lock()
            .insert(kid, Instant::now(), cooldown);
        Err(AuthFailure::UnknownKey)
    }

    /// No usable keys (stale past `max_stale`, or none yet): wakes the refresh task, at most
    /// once per [`FIRST_RETRY`], so keys come back within about a second of the issuer
    /// recovering instead of at the end of a backoff that may have grown to `min_refresh`.
    fn nudge(&self) {
        let Source::Remote(remote) = &self.inner.source else {
            return;
        };
        {
            let mut nudged = self.inner.nudged.lock();
            let now = Instant::now();
            if nudged.is_some_and(|at| now.duration_since(at) < FIRST_RETRY) {
                return;
            }
            *nudged = Some(now);
        }
        let _ = remote.wake.try_send(());
    }

    /// Fetches the keys now and waits for the result. Concurrent calls share one fetch (a
    /// fetch already under way finishes first). A fixed key set has nothing to fetch and
    /// returns `Ok`.
    ///
    /// # Errors
    ///
    /// Why the fetch failed; the keys in use are kept.
    pub async fn refresh(&self) -> Result<(), JwksError> {
        let Source::Remote(remote) = &self.inner.source else {
            return Ok(());
        };
        let progress = self.inner.progress.subscribe();
        let target = progress.borrow().started + 1;
        if let Err(mpsc::error::TrySendError::Closed(())) = remote.wake.try_send(()) {
            return Err(task_stopped());
        }
        self.inner.wait_for(progress, target, remote).await
    }

    /// When the keys in use were fetched; `None` before the first fetch, and for a fixed key
    /// set.
    pub fn last_refresh(&self) -> Option<SystemTime> {
        self.inner
            .state
            .load()
            .as_ref()
            .and_then(|loaded| loaded.fetched_at)
    }

    /// The algorithms keys may be bound to (for a fixed key set, those its keys are bound
    /// to).
    pub fn algorithms(&self) -> &[Algorithm] {
        &self.inner.algorithms
    }

    /// The issuer given to [`Jwks::discover`], if the keys come from discovery.
    pub fn issuer(&self) -> Option<&str> {
        match &self.inner.source {
            Source::Remote(remote) => match &remote.endpoint {
                Endpoint::Discover { issuer, .. } => Some(issuer),
                Endpoint::Url(_) => None,
            },
            Source::Static => None,
        }
    }
}

impl fmt::Debug for Jwks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = match &self.inner.source {
            Source::Static => "static".to_owned(),
            Source::Remote(remote) => match &remote.endpoint {
                Endpoint::Url(uri) => without_query(uri),
                Endpoint::Discover { issuer, .. } => format!("discover {issuer}"),
            },
        };
        let state = self.inner.state.load();
        f.debug_struct("Jwks")
            .field("source", &source)
            .field("algorithms", &self.inner.algorithms)
            .field("keys", &state.as_ref().map(|loaded| loaded.keys.len()))
            .field("last_refresh", &state.as_ref().and_then(|l| l.fetched_at))
            .finish()
    }
}

impl JwksBuilder {
    fn new(endpoint: EndpointSpec) -> Self {
        Self {
            endpoint,
            algorithms: None,
            settings: Settings::default(),
        }
    }

    /// The algorithms keys may be bound to (required). HMAC algorithms are refused: a key set
    /// fetched over the network never carries shared secrets for us.
    ///
    /// ```
    /// use battlement::auth::{Jwks, JwksError};
    /// use jsonwebtoken::Algorithm;
    ///
    /// let refused = Jwks::from_url("https://idp.example.com/jwks.json")
    ///     .algorithms([Algorithm::RS256, Algorithm::HS256])
    ///     .build_lazy();
    /// assert!(matches!(refused, Err(JwksError::Config(_))));
    /// ```
    pub fn algorithms(mut self, algs: impl IntoIterator<Item = Algorithm>) -> Self {
        let mut list: Vec<Algorithm> = Vec::new();
        for alg in algs {
            if !list.contains(&alg) {
                list.push(alg);
            }
        }
        self.algorithms = Some(list);
        self
    }

    /// How often the keys are refreshed in the background: the JWKS response's
    /// `Cache-Control: max-age` (less its `Age`), clamped to `[min, max]`, `min` without
    /// one, with ±10% jitter. Defaults to 5 minutes and 1 hour.
    pub fn refresh_interval(mut self, min: Duration, max: Duration) -> Self {
        self.settings.min_refresh = min;
        self.settings.max_refresh = max;
        self
    }

    /// The least time between two refreshes caused by unknown `kid`s, and how long a missed
    /// `kid` is remembered. Defaults to 30 seconds. Zero lets every unknown `kid` cause a
    /// fetch (still one at a time): keep it above zero where tokens come from the Internet.
    pub fn unknown_kid_cooldown(mut self, d: Duration) -> Self {
        self.settings.cooldown = d;
        self
    }

    /// How long the keys are served past their refresh time while refreshing fails (like
    /// `stale-if-error`); after that [`Jwks::current`] answers
    /// [`AuthFailure::KeysUnavailable`] until a fetch succeeds. Defaults to 1 hour.
    pub fn max_stale(mut self, d: Duration) -> Self {
        self.settings.max_stale = d;
        self
    }

    /// The time limit of one HTTP request: connect, response and body. Defaults to 5
    /// seconds.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.settings.timeout = d;
        self
    }

    /// The largest response body accepted, counted while reading. Defaults to 1 MiB.
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.settings.max_body = bytes;
        self
    }

    /// Checks the configuration, fetches the keys (after discovery, if configured) and
    /// starts the background refresh task.
    ///
    /// # Errors
    ///
    /// [`JwksError::Config`] or [`JwksError::InvalidUrl`] for a bad configuration (also when
    /// not called within a tokio runtime), or why the first fetch failed.
    pub async fn build(self) -> Result<Jwks, JwksError> {
        let (shared, wake) = self.prepare()?;
        let runtime = runtime()?;
        let ttl = shared.fetch_now().await?;
        Ok(start(shared, wake, ttl, &runtime))
    }

    /// Like [`build`](Self::build) without waiting for the first fetch: the keys are
    /// unavailable until the background task (which starts fetching at once, then retries
    /// with backoff) has fetched them.
    ///
    /// # Errors
    ///
    /// [`JwksError::Config`] or [`JwksError::InvalidUrl`] for a bad configuration, and
    /// [`JwksError::Config`] when not called within a tokio runtime.
    pub fn build_lazy(self) -> Result<Jwks, JwksError> {
        let (shared, wake) = self.prepare()?;
        let runtime = runtime()?;
        Ok(start(shared, wake, Duration::ZERO, &runtime))
    }

    fn prepare(self) -> Result<(Shared, mpsc::Receiver<()>), JwksError> {
        let algorithms = self.algorithms.ok_or_else(|| {
            config("an algorithm allowlist is required (JwksBuilder::algorithms)")
        })?;
        if algorithms.is_empty() {
            return Err(config("the algorithm allowlist is empty"));
        }
        if let Some(hmac) = algorithms
            .iter()
            .find(|alg| alg.family() == AlgorithmFamily::Hmac)
        {
            return Err(config(&format!(
                "{hmac:?} is an HMAC algorithm; a key set never carries shared secrets"
            )));
        }
        let s = self.settings;
        if s.min_refresh.is_zero() || s.min_refresh > s.max_refresh {
            return Err(config("the refresh interval must satisfy 0 < min <= max"));
        }
        if s.timeout.is_zero() {
            return Err(config("the timeout must not be zero"));
        }
        if s.max_body == 0 {
            return Err(config("the body limit must not be zero"));
        }
        let endpoint = match self.endpoint {
            EndpointSpec::Url(url) => Endpoint::Url(parse_url(&url)?),
            EndpointSpec::Discover(issuer) => {
                if issuer.contains(['?', '#']) {
                    return Err(JwksError::InvalidUrl(
                        "an issuer has no query or fragment".to_owned(),
                    ));
                }
                parse_url(&issuer)?;
                let discovery = parse_url(&format!(
                    "{}/.well-known/openid-configuration",
                    issuer.trim_end_matches('/')
                ))?;
                Endpoint::Discover {
                    issuer,
                    discovery,
                    jwks_uri: Mutex::new(None),
                }
            }
        };
        let (wake, wakes) = mpsc::channel(1);
        let remote = Remote {
            client: http_client(s.timeout)?,
            endpoint,
            settings: s,
            wake,
        };
        Ok((
            Shared::new(algorithms, Source::Remote(Box::new(remote))),
            wakes,
        ))
    }
}

fn runtime() -> Result<tokio::runtime::Handle, JwksError> {
    tokio::runtime::Handle::try_current()
        .map_err(|_| config("a Jwks must be built within a tokio runtime"))
}

fn start(
    shared: Shared,
    wakes: mpsc::Receiver<()>,
    first_delay: Duration,
    runtime: &tokio::runtime::Handle,
) -> Jwks {
    let inner = Arc::new(shared);
    runtime.spawn(refresh_task(Arc::downgrade(&inner), wakes, first_delay));
    Jwks { inner }
}

/// Fetches whenever woken or when the keys are due, until the last `Jwks` is dropped. All
/// fetches run here, one at a time: that is the single flight.
async fn refresh_task(shared: Weak<Shared>, mut wakes: mpsc::Receiver<()>, first: Duration) {
    let mut delay = first;
    let mut failures: u32 = 0;
    loop {
        // `None`: the sender lived in `Shared`, so every `Jwks` is gone.
        if let Ok(None) = tokio::time::timeout(delay, wakes.recv()).await {
            return;
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let Source::Remote(remote) = &shared.source else {
            return;
        };
        let min = remote.settings.min_refresh;
        delay = match shared.fetch_now().await {
            Ok(ttl) => {
                failures = 0;
                ttl
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                let retry = jitter(backoff(failures, min));
                tracing::warn!(
                    %error,
                    failures,
                    retry_in = ?retry,
                    "battlement::auth: refreshing the JWKS failed; serving the last keys"
                );
                retry
            }
        };
    }
}

fn backoff(failures: u32, cap: Duration) -> Duration {
    let exponent = failures.saturating_sub(1).min(20);
    FIRST_RETRY.saturating_mul(1 << exponent).min(cap)
}

/// ±10%, so that replicas started together do not refresh together.
fn jitter(d: Duration) -> Duration {
    let mut random = [0u8; 4];
    if aws_lc_rs::rand::fill(&mut random).is_err() {
        return d;
    }
    let unit = f64::from(u32::from_le_bytes(random)) / f64::from(u32::MAX);
    Duration::try_from_secs_f64(d.as_secs_f64() * (0.9 + 0.2 * unit)).unwrap_or(d)
}

impl Shared {
    fn new(algorithms: Vec<Algorithm>, source: Source) -> Self {
        Self {
            algorithms,
            state: ArcSwapOption::empty(),
            source,
            progress: watch::Sender::new(Progress::default()),
            gate: Mutex::new(Gate::default()),
            misses: Mutex::new(Misses::default()),
            nudged: Mutex::new(None),
        }
    }

    /// For an unknown `kid`: asks for a refresh if the cooldown allows one, or joins the
    /// refresh already asked for. Returns the fetch number to wait for, or `None` for no
    /// refresh.
    fn claim_or_join(&self, remote: &Remote, now: Instant) -> Option<u64> {
        let (started, completed) = {
            let progress = self.progress.borrow();
            (progress.started, progress.completed)
        };
        let mut gate = self.gate.lock();
        if let Some(target) = gate.pending
            && completed < target
        {
            return Some(target);
        }
        gate.pending = None;
        let cooled = gate
            .last_forced
            .is_none_or(|at| now.saturating_duration_since(at) >= remote.settings.cooldown);
        if !cooled {
            return None;
        }
        // The next fetch to start begins after this point: the one to wait for.
        let target = started + 1;
        gate.last_forced = Some(now);
        if let Err(mpsc::error::TrySendError::Closed(())) = remote.wake.try_send(()) {
            return None;
        }
        gate.pending = Some(target);
        Some(target)
    }

    /// Waits until fetch number `target` has completed, and returns the last result.
    async fn wait_for(
        &self,
        mut progress: watch::Receiver<Progress>,
        target: u64,
        remote: &Remote,
    ) -> Result<(), JwksError> {
        // A fetch may already be under way, and each one may be discovery then JWKS.
        let bound = remote
            .settings
            .timeout
            .saturating_mul(4)
            .saturating_add(Duration::from_secs(1));
        let done = progress.wait_for(|p| p.completed >= target);
        match tokio::time::timeout(bound, done).await {
            Ok(Ok(progress)) => progress.last.clone().unwrap_or(Ok(())),
            Ok(Err(_)) => Err(task_stopped()),
            Err(_) => Err(JwksError::Timeout),
        }
    }

    /// One fetch (discovery if needed, then the key set), installing the keys on success.
    /// Returns when the next refresh is due.
    async fn fetch_now(&self) -> Result<Duration, JwksError> {
        self.progress.send_modify(|p| p.started += 1);
        let outcome = self.fetch_and_install().await;
        let summary = outcome.as_ref().map(|_| ()).map_err(Clone::clone);
        self.progress.send_modify(|p| {
            p.completed += 1;
            p.last = Some(summary);
        });
        outcome
    }

    async fn fetch_and_install(&self) -> Result<Duration, JwksError> {
        let Source::Remote(remote) = &self.source else {
            return Ok(Duration::MAX);
        };
        let s = &remote.settings;
        let uri = remote.jwks_uri().await?;
        let fetched = async {
            let (headers, body) = get(&remote.client, &uri, s).await?;
            let keys = parse_key_set(&body, &self.algorithms)?;
            Ok::<_, JwksError>((keys, max_age(&headers)))
        }
        .await;
        let (keys, max_age) = match fetched {
            Ok(fetched) => fetched,
            Err(error) => {
                remote.forget_discovery();
                return Err(error);
            }
        };
        let ttl = jitter(
            max_age
                .unwrap_or(s.min_refresh)
                .clamp(s.min_refresh, s.max_refresh),
        );
        tracing::debug!(
            keys = keys.len(),
            next_refresh = ?ttl,
            "battlement::auth: JWKS refreshed"
        );
        self.install(keys, ttl, s.max_stale);
        Ok(ttl)
    }

    fn install(&self, keys: KeySet, ttl: Duration, max_stale: Duration) {
        let stale_at = Instant::now()
            .checked_add(ttl)
            .and_then(|due| due.checked_add(max_stale));
        self.state.store(Some(Arc::new(Loaded {
            keys: Arc::new(keys),
            stale_at,
            fetched_at: Some(SystemTime::now()),
        })));
    }
}

impl Remote {
    async fn jwks_uri(&self) -> Result<Uri, JwksError> {
        let (issuer, discovery, cached) = match &self.endpoint {
            Endpoint::Url(uri) => return Ok(uri.clone()),
            Endpoint::Discover {
                issuer,
                discovery,
                jwks_uri,
            } => (issuer, discovery, jwks_uri),
        };
        if let Some(uri) = cached.lock().clone() {
            return Ok(uri);
        }
        #[derive(Deserialize)]
        struct Discovery {
            issuer: String,
            jwks_uri: String,
        }
        let (_, body) = get(&self.client, discovery, &self.settings).await?;
        let document: Discovery =
            serde_json::from_slice(&body).map_err(|e| JwksError::Json(e.to_string()))?;
        if document.issuer != *issuer {
            return Err(JwksError::IssuerMismatch {
                expected: issuer.clone(),
                found: truncate(&document.issuer),
            });
        }
        let uri = discovered_jwks_uri(discovery, &document.jwks_uri)?;
        *cached.lock() = Some(uri.clone());
        Ok(uri)
    }

    /// After a failed fetch the provider may have moved its `jwks_uri`: discover it again.
    fn forget_discovery(&self) {
        if let Endpoint::Discover { jwks_uri, .. } = &self.endpoint {
            *jwks_uri.lock() = None;
        }
    }
}

/// A discovered `jwks_uri`: a URL, and `https` when discovery was.
fn discovered_jwks_uri(discovery: &Uri, jwks_uri: &str) -> Result<Uri, JwksError> {
    let uri = parse_url(jwks_uri)?;
    if discovery.scheme_str() == Some("https") && uri.scheme_str() != Some("https") {
        return Err(JwksError::InvalidUrl(
            "the discovered jwks_uri is not https while the issuer is".to_owned(),
        ));
    }
    Ok(uri)
}

/// The HTTP client of one `Jwks`, on rustls with the aws-lc-rs provider chosen explicitly
/// (so an application with both rustls providers enabled, and no process default, works).
fn http_client(timeout: Duration) -> Result<HttpClient, JwksError> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(timeout));
    let https = HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::aws_lc_rs::default_provider())
        .map_err(|e| config(&format!("TLS configuration: {e}")))?
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(1)
        .pool_timer(TokioTimer::new())
        .build(https))
}

/// `GET uri`: a 2xx response's headers and body, within the timeout and the body limit.
async fn get(
    client: &HttpClient,
    uri: &Uri,
    s: &Settings,
) -> Result<(HeaderMap, Vec<u8>), JwksError> {
    let request = Request::get(uri.clone())
        .header(ACCEPT, HeaderValue::from_static(JSON))
        .header(USER_AGENT, HeaderValue::from_static(USER_AGENT_VALUE))
        .body(Empty::new())
        .map_err(|e| JwksError::InvalidUrl(e.to_string()))?;
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| JwksError::Http(error_chain(&e)))?;
        let status = response.status();
        if status.is_redirection() {
            return Err(JwksError::Redirect);
        }
        if !status.is_success() {
            return Err(JwksError::Status(status.as_u16()));
        }
        let announced = response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if announced.is_some_and(|len| len > s.max_body as u64) {
            return Err(JwksError::TooLarge);
        }
        let (parts, mut body) = response.into_parts();
        // Counted while reading: a Content-Length may be absent or wrong.
        let mut bytes = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| JwksError::Http(error_chain(&e)))?;
            if let Ok(data) = frame.into_data() {
                if data.len() > s.max_body.saturating_sub(bytes.len()) {
                    return Err(JwksError::TooLarge);
                }
                bytes.extend_from_slice(&data);
            }
        }
        Ok((parts.headers, bytes))
    };
    tokio::time::timeout(s.timeout, exchange)
        .await
        .map_err(|_| JwksError::Timeout)?
}

/// The response's freshness: `max-age` less `Age`; zero for `no-cache` or `no-store`.
fn max_age(headers: &HeaderMap) -> Option<Duration> {
    let mut max_age: Option<u64> = None;
    let mut no_cache = false;
    for value in headers.get_all(CACHE_CONTROL) {
        let Ok(value) = value.to_str() else { continue };
        for directive in value.split(',') {
            let (name, argument) = match directive.split_once('=') {
                Some((name, argument)) => (name.trim(), Some(argument.trim().trim_matches('"'))),
                None => (directive.trim(), None),
            };
            if name.eq_ignore_ascii_case("max-age") {
                if let Some(secs) = argument.and_then(|a| a.parse::<u64>().ok()) {
                    // Repeated: the most conservative one.
                    max_age = Some(max_age.map_or(secs, |m| m.min(secs)));
                }
            } else if name.eq_ignore_ascii_case("no-cache") || name.eq_ignore_ascii_case("no-store")
            {
                no_cache = true;
            }
        }
    }
    if no_cache {
        return Some(Duration::ZERO);
    }
    let age = headers
        .get(AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    max_age.map(|secs| Duration::from_secs(secs.saturating_sub(age)))
}

fn parse_url(url: &str) -> Result<Uri, JwksError> {
    let uri: Uri = url
        .parse()
        .map_err(|e| JwksError::InvalidUrl(format!("{}: {e}", truncate(url))))?;
    if !matches!(uri.scheme_str(), Some("https" | "http")) {
        return Err(JwksError::InvalidUrl(format!(
            "{}: the scheme must be https or http",
            truncate(url)
        )));
    }
    let Some(authority) = uri.authority() else {
        return Err(JwksError::InvalidUrl(format!("{}: no host", truncate(url))));
    };
    if authority.as_str().contains('@') {
        return Err(JwksError::InvalidUrl(
            "credentials in the URL are not supported".to_owned(),
        ));
    }
    if authority.host().is_empty() {
        return Err(JwksError::InvalidUrl(format!("{}: no host", truncate(url))));
    }
    Ok(uri)
}

fn without_query(uri: &Uri) -> String {
    format!(
        "{}://{}{}",
        uri.scheme_str().unwrap_or_default(),
        uri.authority().map(|a| a.as_str()).unwrap_or_default(),
        uri.path()
    )
}

fn truncate(text: &str) -> String {
    if text.len() <= MAX_ERROR_TEXT {
        return text.to_owned();
    }
    let mut end = MAX_ERROR_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

fn error_chain(error: &(dyn StdError + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn config(message: &str) -> JwksError {
    JwksError::Config(message.to_owned())
}

fn task_stopped() -> JwksError {
    JwksError::Http("the JWKS refresh task has stopped".to_owned())
}

// ---------------------------------------------------------------------------------------------
// Key parsing.

/// Why a key in a document was not loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Skip {
    /// `kty: "oct"`: a shared secret.
    Symmetric,
    /// `use` other than `sig`, or `key_ops` without `verify`.
    NotForSignatures,
    /// `alg` unknown or outside the allowlist, or no allowed algorithm fits the key.
    AlgorithmNotAllowed,
    /// `alg` does not fit the key type or curve.
    AlgorithmMismatch,
    /// No `alg`, and more than one allowed algorithm fits the key.
    Ambiguous,
    /// A key type or curve that signs no supported algorithm.
    Unsupported,
    /// Not a well-formed key.
    Malformed,
    /// More keys than [`MAX_KEYS`].
    TooMany,
}

impl Skip {
    fn is_suspicious(self) -> bool {
        matches!(
            self,
            Skip::Symmetric
                | Skip::AlgorithmMismatch
                | Skip::Ambiguous
                | Skip::Malformed
                | Skip::TooMany
        )
    }

    fn as_str(self) -> &'static str {
        match self {
            Skip::Symmetric => "symmetric (kty oct)",
            Skip::NotForSignatures => "not a signature key (use/key_ops)",
            Skip::AlgorithmNotAllowed => "algorithm not allowed",
            Skip::AlgorithmMismatch => "alg does not fit the key",
            Skip::Ambiguous => "no alg and several allowed algorithms fit",
            Skip::Unsupported => "unsupported key type or curve",
            Skip::Malformed => "malformed",
            Skip::TooMany => "too many keys",
        }
    }
}

#[derive(Deserialize)]
struct RawKeySet {
    keys: Vec<serde_json::Value>,
}

/// The usable keys of a JWKS document, each bound to one algorithm of `allowed`.
fn parse_key_set(body: &[u8], allowed: &[Algorithm]) -> Result<KeySet, JwksError> {
    let raw: RawKeySet =
        serde_json::from_slice(body).map_err(|e| JwksError::Json(e.to_string()))?;
    let mut keys = Vec::new();
    let mut skipped: Vec<(Option<String>, Skip)> = Vec::new();
    for (index, value) in raw.keys.into_iter().enumerate() {
        let kid = value
            .get("kid")
            .and_then(serde_json::Value::as_str)
            .map(truncate);
        let parsed = if index >= MAX_KEYS {
            Err(Skip::TooMany)
        } else {
            parse_key(value, allowed)
        };
        match parsed {
            Ok(key) => keys.push(key),
            Err(reason) => skipped.push((kid, reason)),
        }
    }
    if !skipped.is_empty() {
        let reasons: Vec<String> = skipped
            .iter()
            .take(16)
            .map(|(kid, reason)| {
                let kid = kid.as_deref().unwrap_or("-");
                format!("{kid}: {}", reason.as_str())
            })
            .collect();
        // An encryption key or another algorithm next to ours is normal; a shared secret, a
        // broken key or an ambiguous one is worth a warning.
        if skipped.iter().any(|(_, reason)| reason.is_suspicious()) {
            tracing::warn!(
                skipped = skipped.len(),
                loaded = keys.len(),
                ?reasons,
                "battlement::auth: JWKS keys were skipped"
            );
        } else {
            tracing::debug!(
                skipped = skipped.len(),
                loaded = keys.len(),
                ?reasons,
                "battlement::auth: JWKS keys were skipped"
            );
        }
    }
    let set = KeySet::new(keys);
    if set.is_empty() {
        return Err(JwksError::NoUsableKeys);
    }
    Ok(set)
}

fn parse_key(value: serde_json::Value, allowed: &[Algorithm]) -> Result<VerifyKey, Skip> {
    // Looked at before anything else: an `oct` key is refused however it is spelled.
    match value.get("kty").and_then(serde_json::Value::as_str) {
        Some("oct") => return Err(Skip::Symmetric),
        Some("RSA" | "EC" | "OKP") => {}
        Some(_) => return Err(Skip::Unsupported),
        None => return Err(Skip::Malformed),
    }
    let jwk: Jwk = serde_json::from_value(value).map_err(|_| Skip::Malformed)?;
    match &jwk.common.public_key_use {
        None | Some(PublicKeyUse::Signature) => {}
        Some(_) => return Err(Skip::NotForSignatures),
    }
    if let Some(operations) = &jwk.common.key_operations
        && !operations.contains(&KeyOperations::Verify)
    {
        return Err(Skip::NotForSignatures);
    }
    let alg = bind_algorithm(&jwk, allowed)?;
    let key = decoding_key(&jwk.algorithm, alg)?;
    Ok(VerifyKey::new(jwk.common.key_id.as_deref(), alg, key))
}

/// The one algorithm a key verifies: its `alg` if allowed and fitting, else the only allowed
/// algorithm that fits.
fn bind_algorithm(jwk: &Jwk, allowed: &[Algorithm]) -> Result<Algorithm, Skip> {
    if let Some(declared) = jwk.common.key_algorithm {
        let alg = Algorithm::try_from(declared).map_err(|_| Skip::AlgorithmNotAllowed)?;
        if !allowed.contains(&alg) {
            return Err(Skip::AlgorithmNotAllowed);
        }
        if !fits(&jwk.algorithm, alg) {
            return Err(Skip::AlgorithmMismatch);
        }
        return Ok(alg);
    }
    let inferred = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => {
            let mut rsa = allowed
                .iter()
                .filter(|alg| alg.family() == AlgorithmFamily::Rsa);
            return match (rsa.next(), rsa.next()) {
                (Some(alg), None) => Ok(*alg),
                (None, _) => Err(Skip::AlgorithmNotAllowed),
                (Some(_), Some(_)) => Err(Skip::Ambiguous),
            };
        }
        AlgorithmParameters::EllipticCurve(params) => match params.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            _ => return Err(Skip::Unsupported),
        },
        AlgorithmParameters::OctetKeyPair(params) if params.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        _ => return Err(Skip::Unsupported),
    };
    if allowed.contains(&inferred) {
        Ok(inferred)
    } else {
        Err(Skip::AlgorithmNotAllowed)
    }
}

fn fits(params: &AlgorithmParameters, alg: Algorithm) -> bool {
    match params {
        AlgorithmParameters::RSA(_) => alg.family() == AlgorithmFamily::Rsa,
        AlgorithmParameters::EllipticCurve(params) => matches!(
            (&params.curve, alg),
            (EllipticCurve::P256, Algorithm::ES256) | (EllipticCurve::P384, Algorithm::ES384)
        ),
        AlgorithmParameters::OctetKeyPair(params) => {
            params.curve == EllipticCurve::Ed25519 && alg == Algorithm::EdDSA
        }
        _ => false,
    }
}

/// The key, checked now so that a bad key is skipped at load time rather than failing every
/// token later.
fn decoding_key(params: &AlgorithmParameters, alg: Algorithm) -> Result<DecodingKey, Skip> {
    match params {
        AlgorithmParameters::RSA(params) => {
            let n = b64url_decode(&params.n).ok_or(Skip::Malformed)?;
            let e = b64url_decode(&params.e).ok_or(Skip::Malformed)?;
            // Some providers pad `n` with a zero byte; the verifier wants none.
            let (n, e) = (strip_leading_zeros(&n), strip_leading_zeros(&e));
            let modulus_bits = bit_len(n);
            // The verifier's limits: a 2048..=8192-bit odd modulus, an odd exponent of at
            // most 33 bits.
            let valid = (2048..=8192).contains(&modulus_bits)
                && n.last().is_some_and(|b| b & 1 == 1)
                && (2..=33).contains(&bit_len(e))
                && e.last().is_some_and(|b| b & 1 == 1);
            if !valid {
                return Err(Skip::Malformed);
            }
            Ok(DecodingKey::from_rsa_raw_components(n, e))
        }
        AlgorithmParameters::EllipticCurve(params) => {
            let (len, verification): (usize, &'static dyn VerificationAlgorithm) = match alg {
                Algorithm::ES256 => (32, &ECDSA_P256_SHA256_FIXED),
                Algorithm::ES384 => (48, &ECDSA_P384_SHA384_FIXED),
                _ => return Err(Skip::AlgorithmMismatch),
            };
            let x = b64url_decode(&params.x).ok_or(Skip::Malformed)?;
            let y = b64url_decode(&params.y).ok_or(Skip::Malformed)?;
            if x.len() != len || y.len() != len {
                return Err(Skip::Malformed);
            }
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            // Checks that the point is on the curve.
            ParsedPublicKey::new(verification, &point).map_err(|_| Skip::Malformed)?;
            DecodingKey::from_ec_components(&params.x, &params.y).map_err(|_| Skip::Malformed)
        }
        AlgorithmParameters::OctetKeyPair(params) => {
            let x = b64url_decode(&params.x).ok_or(Skip::Malformed)?;
            if x.len() != 32 {
                return Err(Skip::Malformed);
            }
            ParsedPublicKey::new(&ED25519, &x).map_err(|_| Skip::Malformed)?;
            DecodingKey::from_ed_components(&params.x).map_err(|_| Skip::Malformed)
        }
        _ => Err(Skip::Unsupported),
    }
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

/// The bit length of a big-endian unsigned integer without leading zero bytes.
fn bit_len(bytes: &[u8]) -> usize {
    match bytes.first() {
        Some(first) => (bytes.len() - 1) * 8 + (8 - first.leading_zeros() as usize),
        None => 0,
    }
}

/// Strict unpadded base64url (RFC 7515 §2): the alphabet, no padding, no stray bits.
fn b64url_decode(text: &str) -> Option<Vec<u8>> {
    let input = text.as_bytes();
    if input.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(input.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits: u32 = 0;
    for &c in input {
        let value = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(value);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    (acc == 0).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::VecDeque;
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::pin::Pin;
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll};

    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{
        ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair,
        EcdsaSigningAlgorithm, Ed25519KeyPair, KeyPair, RsaKeyPair, RsaPublicKeyComponents,
    };
    use http_body::{Body, Frame};
    use http_body_util::Full;
    use http_body_util::combinators::BoxBody;
    use hyper::body::Incoming;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use serde_json::{Value, json};
    use tokio::net::TcpListener;
    use tokio::task::{JoinHandle, JoinSet};

    // --- keys --------------------------------------------------------------------------------

    fn b64(data: &[u8]) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..=chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }

    struct EcKey {
        pkcs8: Vec<u8>,
        x: String,
        y: String,
    }

    fn ec_key(alg: &'static EcdsaSigningAlgorithm) -> EcKey {
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &SystemRandom::new()).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref()).unwrap();
        let public = pair.public_key().as_ref();
        assert_eq!(public[0], 0x04);
        let (x, y) = public[1..].split_at((public.len() - 1) / 2);
        EcKey {
            pkcs8: pkcs8.as_ref().to_vec(),
            x: b64(x),
            y: b64(y),
        }
    }

    fn ec_jwk(key: &EcKey, crv: &str, kid: &str, alg: Option<&str>) -> Value {
        let mut jwk = json!({"kty": "EC", "crv": crv, "x": key.x, "y": key.y, "kid": kid});
        if let Some(alg) = alg {
            jwk["alg"] = json!(alg);
        }
        jwk
    }

    fn p256(kid: &str) -> Value {
        ec_jwk(
            &ec_key(&ECDSA_P256_SHA256_FIXED_SIGNING),
            "P-256",
            kid,
            Some("ES256"),
        )
    }

    /// One RSA key for the whole run (generating one takes a while).
    fn rsa_components() -> &'static (String, String) {
        static KEY: OnceLock<(String, String)> = OnceLock::new();
        KEY.get_or_init(|| {
            let pair = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
            let public = RsaPublicKeyComponents::<Vec<u8>>::from(pair.public_key());
            (b64(&public.n), b64(&public.e))
        })
    }

    fn rsa_jwk(kid: &str, alg: Option<&str>) -> Value {
        let (n, e) = rsa_components();
        let mut jwk = json!({"kty": "RSA", "n": n, "e": e, "kid": kid});
        if let Some(alg) = alg {
            jwk["alg"] = json!(alg);
        }
        jwk
    }

    fn ed25519_jwk(kid: &str) -> Value {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        json!({"kty": "OKP", "crv": "Ed25519", "x": b64(pair.public_key().as_ref()), "kid": kid})
    }

    fn doc(keys: &[Value]) -> Vec<u8> {
        serde_json::to_vec(&json!({ "keys": keys })).unwrap()
    }

    fn parse(keys: &[Value], allowed: &[Algorithm]) -> Result<KeySet, JwksError> {
        parse_key_set(&doc(keys), allowed)
    }

    fn kids(set: &KeySet) -> Vec<(String, Algorithm)> {
        set.keys()
            .map(|k| (k.kid().unwrap_or("-").to_owned(), k.algorithm()))
            .collect()
    }

    // --- a real HTTP server ----------------------------------------------------------------

    #[derive(Clone)]
    struct Reply {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
        /// Sent in several chunks without a Content-Length.
        chunked: bool,
        delay: Duration,
    }

    impl Reply {
        fn json(body: Vec<u8>) -> Self {
            Reply {
                status: 200,
                headers: vec![("content-type", JSON.to_owned())],
                body,
                chunked: false,
                delay: Duration::ZERO,
            }
        }

        fn status(status: u16) -> Self {
            Reply {
                status,
                headers: Vec::new(),
                body: Vec::new(),
                chunked: false,
                delay: Duration::ZERO,
            }
        }
    }

    /// A body of several chunks and no known length, so hyper sends it chunked.
    struct Chunks(VecDeque<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.0.pop_front().map(|chunk| Ok(Frame::data(chunk))))
        }
    }

    struct Server {
        addr: SocketAddr,
        routes: Arc<Mutex<HashMap<String, Reply>>>,
        hits: Arc<Mutex<HashMap<String, usize>>>,
        jwks_hits: Arc<AtomicUsize>,
        task: JoinHandle<()>,
    }

    impl Server {
        async fn start() -> Server {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let routes: Arc<Mutex<HashMap<String, Reply>>> = Arc::default();
            let hits: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
            let jwks_hits = Arc::new(AtomicUsize::new(0));
            let (r, h, j) = (routes.clone(), hits.clone(), jwks_hits.clone());
            let task = tokio::spawn(async move {
                // Dropped with this task: aborting it closes every connection too.
                let mut connections = JoinSet::new();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let (r, h, j) = (r.clone(), h.clone(), j.clone());
                    let service = service_fn(move |request: Request<Incoming>| {
                        let (r, h, j) = (r.clone(), h.clone(), j.clone());
                        async move { Ok::<_, Infallible>(respond(&request, &r, &h, &j).await) }
                    });
                    connections.spawn(async move {
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
            Server {
                addr,
                routes,
                hits,
                jwks_hits,
                task,
            }
        }

        fn url(&self, path: &str) -> String {
            format!("http://{}{path}", self.addr)
        }

        fn set(&self, path: &str, reply: Reply) {
            self.routes.lock().insert(path.to_owned(), reply);
        }

        fn serve_keys(&self, keys: &[Value]) {
            self.set("/jwks", Reply::json(doc(keys)));
        }

        fn hits(&self, path: &str) -> usize {
            self.hits.lock().get(path).copied().unwrap_or(0)
        }

        fn jwks_hits(&self) -> usize {
            self.jwks_hits.load(Ordering::SeqCst)
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    async fn respond(
        request: &Request<Incoming>,
        routes: &Mutex<HashMap<String, Reply>>,
        hits: &Mutex<HashMap<String, usize>>,
        jwks_hits: &AtomicUsize,
    ) -> http::Response<BoxBody<Bytes, Infallible>> {
        let path = request.uri().path().to_owned();
        if path == "/jwks" {
            jwks_hits.fetch_add(1, Ordering::SeqCst);
        }
        *hits.lock().entry(path.clone()).or_default() += 1;
        let reply = routes
            .lock()
            .get(&path)
            .cloned()
            .unwrap_or_else(|| Reply::status(404));
        if !reply.delay.is_zero() {
            tokio::time::sleep(reply.delay).await;
        }
        let body = if reply.chunked {
            let chunks = reply.body.chunks(512).map(Bytes::copy_from_slice).collect();
            Chunks(chunks).boxed()
        } else {
            Full::new(Bytes::from(reply.body)).boxed()
        };
        let mut response = http::Response::builder().status(reply.status);
        for (name, value) in reply.headers {
            response = response.header(name, value);
        }
        response.body(body).unwrap()
    }

    fn es256() -> [Algorithm; 1] {
        [Algorithm::ES256]
    }

    async fn eventually(mut check: impl FnMut() -> bool) -> bool {
        for _ in 0..100 {
            if check() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        check()
    }

    // --- parsing -----------------------------------------------------------------------------

    #[test]
    fn loads_keys_bound_to_their_algorithms() {
        let set = parse(
            &[p256("ec"), rsa_jwk("rsa", Some("RS256")), ed25519_jwk("ed")],
            &[Algorithm::ES256, Algorithm::RS256, Algorithm::EdDSA],
        )
        .unwrap();
        assert_eq!(
            kids(&set),
            [
                ("ec".to_owned(), Algorithm::ES256),
                ("rsa".to_owned(), Algorithm::RS256),
                ("ed".to_owned(), Algorithm::EdDSA),
            ]
        );
    }

    #[test]
    fn oct_keys_are_rejected() {
        let secret = b64(b"0123456789abcdef0123456789abcdef");
        let keys = [
            json!({"kty": "oct", "k": secret, "kid": "hmac", "alg": "HS256"}),
            json!({"kty": "oct", "k": secret, "kid": "hmac-no-alg"}),
            // Even with an asymmetric `alg` and a malformed body.
            json!({"kty": "oct", "kid": "odd", "alg": "ES256"}),
            p256("ec"),
        ];
        let set = parse(&keys, &[Algorithm::ES256, Algorithm::RS256]).unwrap();
        assert_eq!(kids(&set), [("ec".to_owned(), Algorithm::ES256)]);
        assert_eq!(
            parse(&keys[..2], &[Algorithm::ES256]).unwrap_err(),
            JwksError::NoUsableKeys
        );
        assert_eq!(
            parse_key(keys[0].clone(), &[Algorithm::ES256]).unwrap_err(),
            Skip::Symmetric
        );
    }

    #[test]
    fn encryption_keys_are_rejected() {
        let mut enc = p256("enc");
        enc["use"] = json!("enc");
        let mut other = p256("other-use");
        other["use"] = json!("tls");
        let mut sig = p256("sig");
        sig["use"] = json!("sig");
        let mut encrypt_ops = p256("encrypt-ops");
        encrypt_ops["key_ops"] = json!(["encrypt"]);
        let mut verify_ops = p256("verify-ops");
        verify_ops["key_ops"] = json!(["verify"]);
        let set = parse(&[enc, other, sig, encrypt_ops, verify_ops], &es256()).unwrap();
        assert_eq!(
            kids(&set),
            [
                ("sig".to_owned(), Algorithm::ES256),
                ("verify-ops".to_owned(), Algorithm::ES256),
            ]
        );
    }

    #[test]
    fn algorithms_outside_the_allowlist_are_skipped() {
        let allowed = [Algorithm::RS256, Algorithm::ES256];
        let keys = [
            rsa_jwk("rs512", Some("RS512")),
            rsa_jwk("none", Some("none")),
            rsa_jwk("oaep", Some("RSA-OAEP")),
            // A declared `alg` of the wrong family: not used as any algorithm.
            rsa_jwk("mismatch", Some("ES256")),
            ec_jwk(
                &ec_key(&ECDSA_P256_SHA256_FIXED_SIGNING),
                "P-256",
                "es384-on-p256",
                Some("ES384"),
            ),
            rsa_jwk("rs256", Some("RS256")),
        ];
        let set = parse(&keys, &allowed).unwrap();
        assert_eq!(kids(&set), [("rs256".to_owned(), Algorithm::RS256)]);
        assert_eq!(
            parse_key(keys[0].clone(), &allowed).unwrap_err(),
            Skip::AlgorithmNotAllowed
        );
        assert_eq!(
            parse_key(keys[3].clone(), &allowed).unwrap_err(),
            Skip::AlgorithmMismatch
        );
    }

    #[test]
    fn rsa_key_without_alg_needs_exactly_one_allowed_rsa_algorithm() {
        let key = rsa_jwk("rsa", None);
        assert_eq!(
            parse_key(key.clone(), &[Algorithm::RS256, Algorithm::PS256]).unwrap_err(),
            Skip::Ambiguous
        );
        assert_eq!(
            parse_key(key.clone(), &[Algorithm::ES256]).unwrap_err(),
            Skip::AlgorithmNotAllowed
        );
        let bound = parse_key(key, &[Algorithm::PS384, Algorithm::ES256]).unwrap();
        assert_eq!(bound.algorithm(), Algorithm::PS384);
        assert_eq!(
            parse(
                &[rsa_jwk("rsa", None)],
                &[Algorithm::RS256, Algorithm::RS512]
            )
            .unwrap_err(),
            JwksError::NoUsableKeys
        );
    }

    #[test]
    fn curve_keys_without_alg_are_inferred_from_the_curve() {
        let p256_key = ec_jwk(
            &ec_key(&ECDSA_P256_SHA256_FIXED_SIGNING),
            "P-256",
            "p256",
            None,
        );
        let p384_key = ec_jwk(
            &ec_key(&ECDSA_P384_SHA384_FIXED_SIGNING),
            "P-384",
            "p384",
            None,
        );
        let all = [Algorithm::ES256, Algorithm::ES384, Algorithm::EdDSA];
        assert_eq!(
            parse_key(p256_key.clone(), &all).unwrap().algorithm(),
            Algorithm::ES256
        );
        assert_eq!(
            parse_key(p384_key.clone(), &all).unwrap().algorithm(),
            Algorithm::ES384
        );
        assert_eq!(
            parse_key(ed25519_jwk("ed"), &all).unwrap().algorithm(),
            Algorithm::EdDSA
        );
        // Inferred, but not allowed.
        assert_eq!(
            parse_key(p384_key, &es256()).unwrap_err(),
            Skip::AlgorithmNotAllowed
        );
        assert_eq!(
            parse_key(ed25519_jwk("ed"), &es256()).unwrap_err(),
            Skip::AlgorithmNotAllowed
        );
        // P-521 signs nothing supported.
        let mut p521 = p256_key;
        p521["crv"] = json!("P-521");
        assert_eq!(parse_key(p521, &all).unwrap_err(), Skip::Unsupported);
    }

    #[test]
    fn malformed_keys_are_skipped_and_the_others_kept() {
        let good = ec_key(&ECDSA_P256_SHA256_FIXED_SIGNING);
        let mut off_curve = ec_jwk(&good, "P-256", "off-curve", Some("ES256"));
        off_curve["y"] = json!(good.x);
        let mut short_x = ec_jwk(&good, "P-256", "short", Some("ES256"));
        short_x["x"] = json!(b64(&[1u8; 31]));
        let mut bad_b64 = ec_jwk(&good, "P-256", "bad-b64", Some("ES256"));
        bad_b64["x"] = json!(format!("{}=", good.x));
        let small_rsa = json!({"kty": "RSA", "kid": "rsa-1024", "alg": "RS256",
            "n": b64(&[0xff; 128]), "e": "AQAB"});
        let even_e = json!({"kty": "RSA", "kid": "even-e", "alg": "RS256",
            "n": rsa_components().0, "e": b64(&[2])});
        let keys = [
            json!({"kid": "no-kty"}),
            json!({"kty": "EC", "kid": "no-coordinates", "crv": "P-256"}),
            json!({"kty": "RSA", "kid": 7, "n": "AQAB", "e": "AQAB"}),
            json!({"kty": "RSA", "kid": "x5c-only", "x5c": ["MIIB"], "alg": "RS256"}),
            json!({"kty": "OKP", "kid": "ed-short", "crv": "Ed25519", "x": b64(&[9; 31])}),
            json!({"kty": "PQ", "kid": "future"}),
            json!("not an object"),
            off_curve,
            short_x,
            bad_b64,
            small_rsa,
            even_e,
            ec_jwk(&good, "P-256", "good", Some("ES256")),
        ];
        let set = parse(
            &keys,
            &[Algorithm::ES256, Algorithm::RS256, Algorithm::EdDSA],
        )
        .unwrap();
        assert_eq!(kids(&set), [("good".to_owned(), Algorithm::ES256)]);
        assert_eq!(
            parse(&keys[..12], &es256()).unwrap_err(),
            JwksError::NoUsableKeys
        );
    }

    #[test]
    fn malformed_documents_are_errors() {
        for body in [
            &b"not json"[..],
            b"{}",
            b"{\"keys\": {}}",
            b"[]",
            b"{\"keys\": [",
            b"",
        ] {
            assert!(
                matches!(parse_key_set(body, &es256()), Err(JwksError::Json(_))),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
        assert_eq!(parse(&[], &es256()).unwrap_err(), JwksError::NoUsableKeys);
        // A deeply nested document is refused by serde_json's depth limit, not a stack overflow.
        let deep = format!(
            "{{\"keys\": [{}{}]}}",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        assert!(matches!(
            parse_key_set(deep.as_bytes(), &es256()),
            Err(JwksError::Json(_))
        ));
    }

    #[test]
    fn duplicate_kids_are_dropped() {
        let set = parse(&[p256("a"), p256("a"), p256("b")], &es256()).unwrap();
        assert_eq!(kids(&set), [("b".to_owned(), Algorithm::ES256)]);
    }

    #[test]
    fn padded_rsa_modulus_is_accepted() {
        let (n, e) = rsa_components();
        let mut padded = vec![0u8];
        padded.extend(b64url_decode(n).unwrap());
        let key = json!({"kty": "RSA", "n": b64(&padded), "e": e, "alg": "RS256"});
        assert_eq!(
            parse_key(key, &[Algorithm::RS256]).unwrap().algorithm(),
            Algorithm::RS256
        );
    }

    #[test]
    fn too_many_keys_are_cut() {
        let key = ec_key(&ECDSA_P256_SHA256_FIXED_SIGNING);
        let keys: Vec<Value> = (0..MAX_KEYS + 5)
            .map(|i| ec_jwk(&key, "P-256", &format!("k{i}"), Some("ES256")))
            .collect();
        assert_eq!(parse(&keys, &es256()).unwrap().len(), MAX_KEYS);
    }

    #[test]
    fn base64url_is_strict() {
        for data in [
            &b""[..],
            b"f",
            b"fo",
            b"foo",
            b"foob",
            b"fooba",
            b"foobar",
            &[0xfb, 0xff],
        ] {
            assert_eq!(b64url_decode(&b64(data)).as_deref(), Some(data));
        }
        assert_eq!(b64url_decode("-_8"), Some(vec![0xfb, 0xff]));
        for bad in ["Zg==", "Zg=", "Z", "Zh", "a+b/", "ab cd", "Zm9v\n"] {
            assert_eq!(b64url_decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn cache_control_sets_the_refresh_time() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.append(*name, HeaderValue::from_static(value));
            }
            map
        };
        assert_eq!(max_age(&headers(&[])), None);
        assert_eq!(
            max_age(&headers(&[("cache-control", "public, max-age=600")])),
            Some(Duration::from_secs(600))
        );
        assert_eq!(
            max_age(&headers(&[(
                "cache-control",
                "Max-Age=\"60\", must-revalidate"
            )])),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            max_age(&headers(&[
                ("cache-control", "max-age=600"),
                ("age", "100")
            ])),
            Some(Duration::from_secs(500))
        );
        assert_eq!(
            max_age(&headers(&[
                ("cache-control", "max-age=600"),
                ("cache-control", "max-age=60")
            ])),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            max_age(&headers(&[("cache-control", "max-age=600, no-cache")])),
            Some(Duration::ZERO)
        );
        assert_eq!(
            max_age(&headers(&[("cache-control", "max-age=soon")])),
            None
        );
    }

    #[test]
    fn jitter_and_backoff_stay_in_bounds() {
        let base = Duration::from_secs(100);
        for _ in 0..100 {
            let d = jitter(base);
            assert!(
                d >= Duration::from_secs(90) && d <= Duration::from_secs(110),
                "{d:?}"
            );
        }
        // Huge intervals neither panic nor overflow.
        assert!(jitter(Duration::MAX) > Duration::from_secs(u64::MAX / 2));
        let cap = Duration::from_secs(300);
        assert_eq!(backoff(1, cap), Duration::from_secs(1));
        assert_eq!(backoff(4, cap), Duration::from_secs(8));
        assert_eq!(backoff(30, cap), cap);
        assert_eq!(backoff(u32::MAX, cap), cap);
    }

    #[test]
    fn the_negative_cache_is_bounded_and_expires() {
        let mut misses = Misses::default();
        let ttl = Duration::from_secs(30);
        let start = Instant::now();
        for i in 0..3 * MISS_CACHE_CAPACITY {
            misses.insert(&format!("kid-{i}"), start, ttl);
        }
        assert!(misses.map.len() <= MISS_CACHE_CAPACITY);
        let last = format!("kid-{}", 3 * MISS_CACHE_CAPACITY - 1);
        assert!(misses.contains(&last, start, ttl));
        assert!(!misses.contains(&last, start + ttl, ttl));
        assert!(!misses.contains("never", start, ttl));
    }

    // --- configuration ----------------------------------------------------------------------

    #[tokio::test]
    async fn bad_configuration_is_refused_before_any_fetch() {
        let url = "http://127.0.0.1:9/jwks";
        let hmac = Jwks::from_url(url)
            .algorithms([Algorithm::ES256, Algorithm::HS256])
            .build()
            .await;
        assert!(matches!(hmac, Err(JwksError::Config(m)) if m.contains("HMAC")));
        assert!(matches!(
            Jwks::from_url(url).build_lazy(),
            Err(JwksError::Config(_))
        ));
        assert!(matches!(
            Jwks::from_url(url).algorithms([]).build_lazy(),
            Err(JwksError::Config(_))
        ));
        assert!(matches!(
            Jwks::from_url(url)
                .algorithms(es256())
                .refresh_interval(Duration::from_secs(10), Duration::from_secs(5))
                .build_lazy(),
            Err(JwksError::Config(_))
        ));
        assert!(matches!(
            Jwks::from_url(url)
                .algorithms(es256())
                .timeout(Duration::ZERO)
                .build_lazy(),
            Err(JwksError::Config(_))
        ));
        assert!(matches!(
            Jwks::from_url(url)
                .algorithms(es256())
                .max_body(0)
                .build_lazy(),
            Err(JwksError::Config(_))
        ));
        for bad in [
            "ftp://idp.example/jwks",
            "/jwks",
            "not a url",
            "https://user:pass@idp.example/jwks",
        ] {
            assert!(
                matches!(
                    Jwks::from_url(bad).algorithms(es256()).build_lazy(),
                    Err(JwksError::InvalidUrl(_))
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            Jwks::discover("https://idp.example/?tenant=1")
                .algorithms(es256())
                .build_lazy(),
            Err(JwksError::InvalidUrl(_))
        ));
    }

    #[test]
    fn building_outside_a_runtime_is_an_error_not_a_panic() {
        let built = Jwks::from_url("https://idp.example/jwks")
            .algorithms(es256())
            .build_lazy();
        assert!(matches!(built, Err(JwksError::Config(m)) if m.contains("runtime")));
    }

    #[tokio::test]
    async fn static_keys_are_served_and_never_refreshed() {
        let secret = "correct horse battery staple";
        let jwks = Jwks::from_keys(KeySet::new(vec![VerifyKey::new(
            Some("hmac"),
            Algorithm::HS256,
            DecodingKey::from_secret(secret.as_bytes()),
        )]));
        assert_eq!(jwks.current().unwrap().len(), 1);
        assert_eq!(jwks.algorithms(), [Algorithm::HS256]);
        let key = jwks.key_for(Some("hmac"), Algorithm::HS256).await.unwrap();
        assert_eq!(key.kid(), Some("hmac"));
        assert_eq!(
            jwks.key_for(Some("other"), Algorithm::HS256)
                .await
                .unwrap_err(),
            AuthFailure::UnknownKey
        );
        assert_eq!(
            jwks.key_for(Some("hmac"), Algorithm::RS256)
                .await
                .unwrap_err(),
            AuthFailure::Algorithm
        );
        assert_eq!(jwks.refresh().await, Ok(()));
        assert_eq!(jwks.last_refresh(), None);
        assert_eq!(jwks.issuer(), None);
        let debug = format!("{jwks:?}");
        assert!(
            debug.contains("static") && !debug.contains("horse"),
            "{debug}"
        );
    }

    // --- fetching ---------------------------------------------------------------------------

    #[tokio::test]
    async fn first_fetch_loads_keys_that_verify_tokens() {
        let server = Server::start().await;
        let signer = ec_key(&ECDSA_P256_SHA256_FIXED_SIGNING);
        let mut with_x5u = rsa_jwk("rsa", Some("RS256"));
        with_x5u["x5u"] = json!(server.url("/x5u"));
        with_x5u["jku"] = json!(server.url("/jku"));
        server.serve_keys(&[ec_jwk(&signer, "P-256", "ec", Some("ES256")), with_x5u]);

        let before = SystemTime::now();
        let jwks = Jwks::from_url(&server.url("/jwks"))
            .algorithms([Algorithm::ES256, Algorithm::RS256])
            .build()
            .await
            .unwrap();
        assert_eq!(jwks.current().unwrap().len(), 2);
        assert!(jwks.last_refresh().unwrap() >= before);
        assert_eq!(server.jwks_hits(), 1);
        assert_eq!(server.hits("/x5u") + server.hits("/jku"), 0);
        let debug = format!("{jwks:?}");
        assert!(
            debug.contains("/jwks") && debug.contains("Some(2)"),
            "{debug}"
        );

        // The loaded key verifies a token signed with its private half.
        let key = jwks.key_for(Some("ec"), Algorithm::ES256).await.unwrap();
        let claims = json!({"sub": "alice", "exp": 4_102_444_800u64});
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header {
                kid: Some("ec".to_owned()),
                ..jsonwebtoken::Header::new(Algorithm::ES256)
            },
            &claims,
            &jsonwebtoken::EncodingKey::from_ec_der(&signer.pkcs8),
        )
        .unwrap();
        let verified = jsonwebtoken::decode::<Value>(
            &token,
            &key.key,
            &jsonwebtoken::Validation::new(Algorithm::ES256),
        )
        .unwrap();
        assert_eq!(verified.claims["sub"], "alice");

        // The RSA key, asked for with another algorithm, is no match and causes no fetch.
        assert_eq!(
            jwks.key_for(Some("rsa"), Algorithm::ES256)
                .await
                .unwrap_err(),
            AuthFailure::UnknownKey
        );
        assert_eq!(
            jwks.key_for(Some("rsa"), Algorithm::PS256)
                .await
                .unwrap_err(),
            AuthFailure::Algorithm
        );
        assert_eq!(server.jwks_hits(), 1);
    }

    #[tokio::test]
    async fn unknown_kid_refreshes_once_and_finds_a_rotated_key() {
        let server = Server::start().await;
        let old = p256("old");
        server.serve_keys(std::slice::from_ref(&old));
        let jwks = Jwks::from_url(&server.url("/jwks"))
            .algorithms(es256())
            .build()
            .await
            .unwrap();
        assert_eq!(server.jwks_hits(), 1);

        server.serve_keys(&[old, p256("new")]);
        let key = jwks.key_for(Some("new"), Algorithm::ES256).await.unwrap();
        assert_eq!(key.kid(), Some("new"));
        assert_eq!(server.jwks_hits(), 2);
        // Found from now on without fetching.
        jwks.key_for(Some("new"), Algorithm::ES256).await.unwrap();
        jwks.key_for(Some("old"), Algorithm::ES256).await.unwrap();
        assert_eq!(server.jwks_hits(), 2);
        // A token without kid, or with an oversized kid, never fetches.
        assert_eq!(
            jwks.key_for(None, Algorithm::ES256).await.unwrap_err(),
            AuthFailure::UnknownKey
        );
        let long = "k".repeat(MAX_KID_LEN + 1);
        assert_eq!(
            jwks.key_for(Some(&long), Algorithm::ES256)
                .await
                .unwrap_err(),
            AuthFailure::UnknownKey
        );
        assert_eq!(server.jwks_hits(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_storm_of_random_kids_causes_at_most_one_fetch_per_cooldown() {
        let server = Server::start().await;
        server.serve_keys(&[p256("real")]);
        let jwks = Jwks::from_url(&server.url("/jwks"))
            .algorithms(es256())
            .unknown_kid_cooldown(Duration::from_secs(60))
            .build()
            .await
            .unwrap();
        assert_eq!(server.jwks_hits(), 1);

        for round in 0..2 {
            let mut lookups = JoinSet::new();
            for i in 0..200 {
                let jwks = jwks.clone();
                lookups.spawn(async move {
                    jwks.key_for(Some(&format!("random-{round}-{i}")), Algorithm::ES256)
                        .await
                });
            }
            while let Some(result) = lookups.join_next().await {
                assert_eq!(result.unwrap().unwrap_err(), AuthFailure::UnknownKey);
            }
            assert_eq!(server.jwks_hits(), 2, "round {round}");
        }
        // The real key is still served, without fetching.
        jwks.key_for(Some("real"), Algorithm::ES256).await.unwrap();
        assert_eq!(server.jwks_hits(), 2);
    }

    #[tokio::test]
    async fn the_cooldown_allows_the_next_refresh_once_it_has_passed() {
        let server = Server::start().await;
        server.serve_keys(&[p256("a")]);
        let cooldown = Duration::from_millis(300);
        let jwks = Jwks::from_url(&server.url("/jwks"))
            .algorithms(es256())
            .unknown_kid_cooldown(cooldown)
            .build()
            .await
            .unwrap();
        let miss = |kid: &'static str| {
            let jwks = jwks.clone();
            async move { jwks.key_for(Some(kid), Algorithm::ES256).await.unwrap_err() }
        };
        assert_eq!(miss("x").await, AuthFailure::UnknownKey);
        assert_eq!(server.jwks_hits(), 2);
        assert_eq!(miss("y").await, AuthFailure::UnknownKey);
        assert_eq!(miss("x").await, AuthFailure::UnknownKey);
        assert_eq!(server.jwks_hits(), 2);
        tokio::time::sleep(cooldown + Duration::from_millis(50)).await;
        // A new kid after the cooldown refreshes again and picks up the rotation.
        server.serve_keys(&[p256("a"), p256("z")]);
        jwks.key_for(Some("z"), Algorithm::ES256).await.unwrap();
        assert_eq!(server.jwks_hits(), 3);
    }

    #[tokio::test]
    async fn failing_endpoint_serves_stale_keys_until_max_stale_then_recovers() {
        let server = Server::start().await;
        server.serve_keys(&[p256("a")]);
        let jwks = Jwks::from_url(&server.url("/jwks"))
            .algorithms(es256())
            .refresh_interval(Duration::from_millis(200), Duration::from_millis(200))
            .max_stale(Duration::from_millis(300))
            .build()
            .await
            .unwrap();

        server.set("/jwks", Reply::status(500));
        assert_eq!(jwks.refresh().await, Err(JwksError::Status(500)));
        // Still served (due at ~200 ms, stale from ~500 ms).
        jwks.key_for(Some("a"), Algorithm::ES256).await.unwrap();
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert_eq!(jwks.current().unwrap_err(), AuthFailure::KeysUnavailable);
        assert_eq!(
            jwks.key_for(Some("a"), Algorithm::ES256).await.unwrap_err(),
            AuthFailure::KeysUnavailable
        );
        // The background task kept retrying.
        assert!(server.jwks_hits() >= 4, "{}", server.jwks_hits());

        // Back: the background retry (backoff capped at the 200 ms minimum) restores the keys.
        server.serve_keys(&[p256("a")]);
        assert!(eventually(|| jwks.current().is_ok()).await);
        jwks.key_for(Some("a"), Algorithm::ES256).await.unwrap();
    }

    #[tokio::test]
    async fn a_stopped_server_is_an_http_error_and_stale_keys_are_kept() {
        let server = Server::start().await;
        server.serve_keys(&[p256("a")]);
        let jwks = Jwks::from_url(&server.url("/jwks"))
            .algorithms(es256())
            .build()
            .await
            .unwrap();
        drop(server);
        // Let the aborted server close its sockets.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(matches!(jwks.refresh().await, Err(JwksError::Http(_))));
        assert!(jwks.current().is_ok());
    }

    #[tokio::test]
    async fn a_key_set_without_usable_keys_does_not_replace_the_keys() {
        let server = Server::start().await;
        server.serve_keys(&[p256("a")]);
        let jwks = Jwks::from_url(&server.url("/jwks"))
            .algorithms(es256())
            .build()
            .await
            .unwrap();
        let secret = b64(b"0123456789abcdef0123456789abcdef");
        server.serve_keys(&[json!({"kty": "oct", "k": secret, "kid": "b", "alg": "HS256"})]);
        assert_eq!(jwks.refresh().await, Err(JwksError::NoUsableKeys));
        server.set("/jwks", Reply::json(b"<html>".to_vec()));
        assert!(matches!(jwks.refresh().await, Err(JwksError::Json(_))));
        let keys = jwks.current().unwrap();
        assert_eq!(kids(&keys), [("a".to_owned(), Algorithm::ES256)]);
    }

    #[tokio::test]
    async fn an_oversized_body_is_refused() {
        let server = Server::start().await;
        let mut body = doc(&[p256("a")]);
        body.resize(8 * 1024, b' ');
        server.set("/jwks", Reply::json(body.clone()));
        let build = || {
            Jwks::from_url(&server.url("/jwks"))
                .algorithms(es256())
                .max_body(4 * 1024)
                .build()
        };
        assert_eq!(build().await.unwrap_err(), JwksError::TooLarge);
        // Without a Content-Length the body is counted while reading.
        server.set(
            "/jwks",
            Reply {
                chunked: true,
                ..Reply::json(body.clone())
            },
        );
        assert_eq!(build().await.unwrap_err(), JwksError::TooLarge);
        // Under the limit, chunked is fine.
        body.truncate(3 * 1024);
        server.set(
            "/jwks",
            Reply {
                chunked: true,
                ..Reply::json(body)
            },
        );
        assert_eq!(build().await.unwrap().current().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_redirect_is_refused_and_not_followed() {
        let server = Server::start().await;
        server.serve_keys(&[p256("a")]);
        server.set(
            "/moved",
            Reply {
                headers: vec![("location", server.url("/jwks"))],
                ..Reply::status(302)
            },
        );
        let built = Jwks::from_url(&server.url("/moved"))
            .algorithms(es256())
            .build()
            .await;
        assert_eq!(built.unwrap_err(), JwksError::Redirect);
        assert_eq!(server.hits("/moved"), 1);
        assert_eq!(server.jwks_hits(), 0);
    }

    #[tokio::test]
    async fn a_slow_endpoint_times_out() {
        let server = Server::start().await;
        server.set(
            "/jwks",
            Reply {
                delay: Duration::from_secs(5),
                ..Reply::json(doc(&[p256("a")]))
            },
        );
        let built = Jwks::from_url(&server.url("/jwks"))
            .algorithms(es256())
            .timeout(Duration::from_millis(200))
            .build()
            .await;
        assert_eq!(built.unwrap_err(), JwksError::Timeout);
    }

    #[tokio::test]
    async fn build_fails_when_the_first_fetch_fails() {
        let server = Server::start().await;
        server.set("/jwks", Reply::status(503));
        let built = Jwks::from_url(&server.url("/jwks"))
            .algorithms(es256())
            .build()
            .await;
        assert_eq!(built.unwrap_err(), JwksError::Status(503));
    }

    #[tokio::test]
    async fn build_lazy_starts_without_keys_and_fetches_in_the_background() {
        let server = Server::start().await;
        server.set("/jwks", Reply::status(500));
        let jwks = Jwks::from_url(&server.url("/jwks"))
            .algorithms(es256())
            .refresh_interval(Duration::from_millis(100), Duration::from_secs(60))
            .build_lazy()
            .unwrap();
        assert_eq!(jwks.current().unwrap_err(), AuthFailure::KeysUnavailable);
        assert_eq!(
            jwks.key_for(Some("a"), Algorithm::ES256).await.unwrap_err(),
            AuthFailure::KeysUnavailable
        );
        assert!(eventually(|| server.jwks_hits() >= 2).await);
        assert!(jwks.current().is_err());
        server.serve_keys(&[p256("a")]);
        assert!(eventually(|| jwks.current().is_ok()).await);
        assert!(jwks.last_refresh().is_some());
    }

    #[tokio::test]
    async fn cache_control_schedules_the_background_refresh() {
        let server = Server::start().await;
        server.set(
            "/jwks",
            Reply {
                headers: vec![("cache-control", "max-age=0".to_owned())],
                ..Reply::json(doc(&[p256("a")]))
            },
        );
        let _jwks = Jwks::from_url(&server.url("/jwks"))
            .algorithms(es256())
            .refresh_interval(Duration::from_millis(100), Duration::from_secs(3600))
            .build()
            .await
            .unwrap();
        // max-age=0 is clamped up to the 100 ms minimum, not to the hour.
        assert!(eventually(|| server.jwks_hits() >= 3).await);
    }

    #[tokio::test]
    async fn dropping_the_last_handle_stops_the_refresh_task() {
        let server = Server::start().await;
        server.serve_keys(&[p256("a")]);
        let jwks = Jwks::from_url(&server.url("/jwks"))
            .algorithms(es256())
            .refresh_interval(Duration::from_millis(50), Duration::from_millis(50))
            .build()
            .await
            .unwrap();
        let clone = jwks.clone();
        drop(jwks);
        assert!(eventually(|| server.jwks_hits() >= 2).await);
        let weak = Arc::downgrade(&clone.inner);
        drop(clone);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(weak.upgrade().is_none());
        let hits = server.jwks_hits();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(server.jwks_hits(), hits);
    }

    #[tokio::test]
    async fn discovery_with_the_configured_issuer_finds_the_keys() {
        let server = Server::start().await;
        let issuer = server.url("");
        server.serve_keys(&[p256("a")]);
        server.set(
            "/.well-known/openid-configuration",
            Reply::json(
                serde_json::to_vec(&json!({"issuer": issuer, "jwks_uri": server.url("/jwks")}))
                    .unwrap(),
            ),
        );
        let jwks = Jwks::discover(&issuer)
            .algorithms(es256())
            .build()
            .await
            .unwrap();
        assert_eq!(jwks.issuer(), Some(issuer.as_str()));
        jwks.key_for(Some("a"), Algorithm::ES256).await.unwrap();
        // The jwks_uri is remembered: refreshing fetches the key set only.
        jwks.refresh().await.unwrap();
        assert_eq!(server.hits("/.well-known/openid-configuration"), 1);
        assert_eq!(server.jwks_hits(), 2);
        // After a failure the provider is discovered again.
        server.set("/jwks", Reply::status(500));
        assert_eq!(jwks.refresh().await, Err(JwksError::Status(500)));
        server.serve_keys(&[p256("a")]);
        jwks.refresh().await.unwrap();
        assert_eq!(server.hits("/.well-known/openid-configuration"), 2);
    }

    #[tokio::test]
    async fn discovery_with_another_issuer_is_refused() {
        let server = Server::start().await;
        server.serve_keys(&[p256("a")]);
        server.set(
            "/.well-known/openid-configuration",
            Reply::json(
                serde_json::to_vec(&json!({
                    "issuer": "https://evil.example",
                    "jwks_uri": server.url("/jwks"),
                }))
                .unwrap(),
            ),
        );
        let issuer = server.url("");
        let built = Jwks::discover(&issuer).algorithms(es256()).build().await;
        assert_eq!(
            built.unwrap_err(),
            JwksError::IssuerMismatch {
                expected: issuer,
                found: "https://evil.example".to_owned(),
            }
        );
        // A trailing slash is a different issuer, too (the comparison is exact).
        let with_slash = server.url("/");
        let built = Jwks::discover(&with_slash)
            .algorithms(es256())
            .build()
            .await;
        assert!(matches!(built, Err(JwksError::IssuerMismatch { .. })));
        assert_eq!(server.jwks_hits(), 0);
    }

    #[test]
    fn discovery_of_an_https_issuer_refuses_a_plain_http_jwks_uri() {
        let https = parse_url("https://idp.example/.well-known/openid-configuration").unwrap();
        let http = parse_url("http://127.0.0.1:8080/.well-known/openid-configuration").unwrap();
        assert!(matches!(
            discovered_jwks_uri(&https, "http://idp.example/jwks"),
            Err(JwksError::InvalidUrl(_))
        ));
        assert!(matches!(
            discovered_jwks_uri(&https, "jwks.json"),
            Err(JwksError::InvalidUrl(_))
        ));
        assert!(discovered_jwks_uri(&https, "https://keys.idp.example/jwks").is_ok());
        assert!(discovered_jwks_uri(&http, "http://127.0.0.1:8080/jwks").is_ok());
    }

    // --- time, deterministically ------------------------------------------------------------

    /// A remote `Jwks` whose task is not running, with keys installed by hand.
    fn unstarted(settings: Settings) -> Jwks {
        let (wake, _) = mpsc::channel(1);
        let remote = Remote {
            client: http_client(settings.timeout).unwrap(),
            endpoint: Endpoint::Url(parse_url("http://127.0.0.1:9/jwks").unwrap()),
            settings,
            wake,
        };
        Jwks {
            inner: Arc::new(Shared::new(
                es256().to_vec(),
                Source::Remote(Box::new(remote)),
            )),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn keys_are_served_for_their_refresh_period_plus_max_stale() {
        let settings = Settings {
            max_stale: Duration::from_secs(3600),
            ..Settings::default()
        };
        let jwks = unstarted(settings);
        assert_eq!(jwks.current().unwrap_err(), AuthFailure::KeysUnavailable);
        let keys = parse(&[p256("a")], &es256()).unwrap();
        jwks.inner
            .install(keys, Duration::from_secs(300), settings.max_stale);
        assert!(jwks.current().is_ok());
        tokio::time::advance(Duration::from_secs(300 + 3600) - Duration::from_millis(1)).await;
        assert!(jwks.current().is_ok());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(jwks.current().unwrap_err(), AuthFailure::KeysUnavailable);
        assert_eq!(
            jwks.key_for(Some("a"), Algorithm::ES256).await.unwrap_err(),
            AuthFailure::KeysUnavailable
        );
        // A successful fetch makes them current again.
        let keys = parse(&[p256("a")], &es256()).unwrap();
        jwks.inner
            .install(keys, Duration::from_secs(300), settings.max_stale);
        jwks.key_for(Some("a"), Algorithm::ES256).await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_closed_refresh_task_does_not_hang_lookups() {
        let jwks = unstarted(Settings::default());
        jwks.inner.install(
            parse(&[p256("a")], &es256()).unwrap(),
            Duration::from_secs(300),
            Duration::ZERO,
        );
        // The wake receiver is gone: no refresh can happen, so the lookup fails at once.
        assert_eq!(
            jwks.key_for(Some("b"), Algorithm::ES256).await.unwrap_err(),
            AuthFailure::UnknownKey
        );
        assert!(matches!(jwks.refresh().await, Err(JwksError::Http(_))));
    }

    #[test]
    fn futures_are_send_and_jwks_is_shareable() {
        fn send<T: Send>(_: &T) {}
        fn shareable<T: Send + Sync + Clone + 'static>() {}
        shareable::<Jwks>();
        let jwks = Jwks::from_keys(KeySet::default());
        send(&jwks.key_for(None, Algorithm::ES256));
        send(&jwks.refresh());
        send(&Jwks::from_url("https://idp.example/jwks").build());
    }
}
