//! [`RateLimitLayer`] and its builder.

use std::fmt;
use std::hash::Hash;
use std::marker::PhantomData;
use std::sync::Arc;

use tower_layer::Layer;

use super::gcra::Backend;
use super::memory::{Clock, DEFAULT_MAX_KEYS, MemoryBackend};
use super::policy::{Policies, Quota};
use super::service::RateLimit;
use super::{ConfigError, Settings};
use crate::body::{Native, Wrapped};
use crate::key::{ClientIp, ClientKey, KeyExtractor, RequestHead};

pub(crate) type CostFn = Box<dyn Fn(&RequestHead<'_>) -> u32 + Send + Sync>;
pub(crate) type ExemptFn = Box<dyn Fn(&RequestHead<'_>) -> bool + Send + Sync>;

pub(crate) struct Shared<X, Bk> {
    pub(crate) extractor: X,
    pub(crate) backend: Bk,
    pub(crate) settings: Arc<Settings>,
}

/// Applies rate-limit policies to every request. Build it with [`RateLimitLayer::builder`].
///
/// The state (the backend and its table) is built once, here; every service this layer
/// makes, and every clone of the layer, shares it. `M` is the
/// [`BodyMode`](crate::body::BodyMode) of its responses (see
/// [`RateLimitBuilder::native_body`]).
pub struct RateLimitLayer<X = ClientIp, Bk = MemoryBackend<ClientKey>, M = Wrapped> {
    shared: Arc<Shared<X, Bk>>,
    mode: PhantomData<fn() -> M>,
}

impl<X, Bk, M> Clone for RateLimitLayer<X, Bk, M> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            mode: PhantomData,
        }
    }
}

impl<X, Bk, M> fmt::Debug for RateLimitLayer<X, Bk, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("name", &self.shared.settings.name)
            .field("policies", &self.shared.settings.policies.names)
            .finish_non_exhaustive()
    }
}

impl RateLimitLayer {
    /// Starts a builder: keyed by [`ClientIp`] (trusting no proxy), in memory, no policy yet.
    pub fn builder() -> RateLimitBuilder<ClientIp, DefaultBackend> {
        RateLimitBuilder {
            mode: PhantomData,
            name: Arc::from("rate_limit"),
            policies: Vec::new(),
            extractor: ClientIp::new(),
            backend: DefaultBackend,
            max_keys: DEFAULT_MAX_KEYS,
            clock: Clock::default(),
            cost: None,
            exempt: None,
            count_preflight: false,
            shadow: false,
            headers_on_success: false,
        }
    }
}

impl<X, Bk, M> RateLimitLayer<X, Bk, M> {
    /// The backend (to inspect it, for example `MemoryBackend::tracked_keys`).
    pub fn backend(&self) -> &Bk {
        &self.shared.backend
    }

    /// The layer's name (used in annotations and Redis keys).
    pub fn name(&self) -> &str {
        &self.shared.settings.name
    }

    /// Replaces the quota of policy `policy` while the layer runs: every service the layer
    /// made, and every clone of it, applies it from the next request on (a request racing
    /// with the change sees the old quota or the new one). Each key keeps its state, which
    /// GCRA measures in time: a larger burst gives a limited key room at once, a faster
    /// rate brings its room back sooner, and a smaller quota limits it sooner. On Redis the
    /// quotas travel with each check, so every instance applies its own: change them on
    /// every instance (from the same configuration source).
    ///
    /// ```
    /// use std::time::Duration;
    /// use battlement::key::Global;
    /// use battlement::rate_limit::{Quota, RateLimitLayer};
    ///
    /// let layer = RateLimitLayer::builder()
    ///     .policy("burst", Quota::requests_per(10, Duration::from_secs(1)))
    ///     .key(Global)
    ///     .build()
    ///     .unwrap();
    /// layer.set_quota("burst", Quota::requests_per(50, Duration::from_secs(1))).unwrap();
    /// assert_eq!(layer.quotas(), [("burst".to_owned(), Quota::requests_per(50, Duration::from_secs(1)))]);
    /// assert!(layer.set_quota("daily", Quota::requests_per(1, Duration::from_secs(1))).is_err());
    /// ```
    pub fn set_quota(&self, policy: &str, quota: Quota) -> Result<(), ConfigError> {
        self.shared.settings.policies.set(policy, quota)
    }

    /// The current quota of each policy, by name, in order.
    pub fn quotas(&self) -> Vec<(String, Quota)> {
        let policies = &self.shared.settings.policies;
        policies
            .names
            .iter()
            .map(|n| n.to_string())
            .zip(policies.quotas())
            .collect()
    }
}

impl<S, X, Bk, M> Layer<S> for RateLimitLayer<X, Bk, M> {
    type Service = RateLimit<S, X, Bk, M>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit::new(inner, self.shared.clone())
    }
}

/// The default backend choice: an in-memory table with the builder's `max_keys`.
#[derive(Clone, Copy, Debug, Default)]
pub struct DefaultBackend;

/// A backend chosen with [`RateLimitBuilder::backend`].
#[derive(Clone, Debug)]
pub struct Chosen<B>(B);

/// How the builder turns its backend choice into a backend for keys `K`.
pub trait BackendChoice<K> {
    /// The backend.
    type Backend: Backend<K>;
    /// Makes it.
    fn into_backend(self, max_keys: usize, clock: Clock, policies: usize) -> Self::Backend;
}

impl<K> BackendChoice<K> for DefaultBackend
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    type Backend = MemoryBackend<K>;

    fn into_backend(self, max_keys: usize, clock: Clock, policies: usize) -> MemoryBackend<K> {
        MemoryBackend::for_policies(max_keys, policies).with_clock(clock)
    }
}

impl<K, B: Backend<K>> BackendChoice<K> for Chosen<B> {
    type Backend = B;

    fn into_backend(self, _max_keys: usize, _clock: Clock, _policies: usize) -> B {
        self.0
    }
}

/// Builds a [`RateLimitLayer`]. Every setting has a default except the policies: add at
/// least one with [`policy`](Self::policy).
#[must_use]
pub struct RateLimitBuilder<X, Bk, M = Wrapped> {
    mode: PhantomData<fn() -> M>,
    name: Arc<str>,
    policies: Vec<(Arc<str>, Quota)>,
    extractor: X,
    backend: Bk,
    max_keys: usize,
    clock: Clock,
    cost: Option<CostFn>,
    exempt: Option<ExemptFn>,
    count_preflight: bool,
    shadow: bool,
    headers_on_success: bool,
}

impl<X: fmt::Debug, Bk: fmt::Debug, M> fmt::Debug for RateLimitBuilder<X, Bk, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitBuilder")
            .field("name", &self.name)
            .field("policies", &self.policies)
            .field("extractor", &self.extractor)
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl<X, Bk, M> RateLimitBuilder<X, Bk, M> {
    /// Names the layer (default `rate_limit`): it appears in annotations, and namespaces
    /// the layer's Redis keys, so two layers on one Redis need different names.
    pub fn name(mut self, name: &str) -> Self {
        self.name = Arc::from(name);
        self
    }

    /// Adds a named policy (at most four). A request passes only if every policy allows
    /// it, and only then is it charged on all of them.
    pub fn policy(mut self, name: &str, quota: Quota) -> Self {
        self.policies.push((Arc::from(name), quota));
        self
    }

    /// Keys requests with `extractor` (default [`ClientIp`], trusting no proxy). Requests
    /// for which it has no key pass unlimited.
    pub fn key<X2: KeyExtractor>(self, extractor: X2) -> RateLimitBuilder<X2, Bk, M> {
        self.rebuild(|_| extractor, |backend| backend)
    }

    /// Keeps the state in `backend` (for example `RedisBackend`) instead of memory.
    pub fn backend<B2>(self, backend: B2) -> RateLimitBuilder<X, Chosen<B2>, M> {
        self.rebuild(|extractor| extractor, |_| Chosen(backend))
    }

    /// Answers with the inner service's own body type instead of
    /// [`ResponseBody`](crate::body::ResponseBody) (the [`Native`] body mode): the body must
    /// be `From<Bytes>`, as axum's `Body` and `http_body_util::Full<Bytes>` are (tonic's is
    /// not: keep the default there). An allowed response then passes through untouched,
    /// and axum's `Router::layer` has no wrapper to box again; refusals are made with
    /// `From<Bytes>`.
    ///
    /// ```
    /// # #[cfg(feature = "axum")] {
    /// use std::time::Duration;
    /// use axum::{Router, routing::get};
    /// use battlement::rate_limit::{Quota, RateLimitLayer};
    ///
    /// let limit = RateLimitLayer::builder()
    ///     .policy("per-second", Quota::requests_per(10, Duration::from_secs(1)))
    ///     .native_body()
    ///     .build()
    ///     .unwrap();
    /// let app: Router = Router::new().route("/", get(|| async { "ok" })).layer(limit);
    /// # }
    /// ```
    pub fn native_body(self) -> RateLimitBuilder<X, Bk, Native> {
        self.rebuild(|extractor| extractor, |backend| backend)
    }

    fn rebuild<X2, B2, M2>(
        self,
        extractor: impl FnOnce(X) -> X2,
        backend: impl FnOnce(Bk) -> B2,
    ) -> RateLimitBuilder<X2, B2, M2> {
        RateLimitBuilder {
            mode: PhantomData,
            name: self.name,
            policies: self.policies,
            extractor: extractor(self.extractor),
            backend: backend(self.backend),
            max_keys: self.max_keys,
            clock: self.clock,
            cost: self.cost,
            exempt: self.exempt,
            count_preflight: self.count_preflight,
            shadow: self.shadow,
            headers_on_success: self.headers_on_success,
        }
    }

    /// Caps the keys the default in-memory backend tracks (default 100,000).
    pub fn max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys;
        self
    }

    /// The clock of the default in-memory backend (default [`Clock::fast`]; use
    /// [`Clock::tokio`] to control time in tests).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// What a request costs (default 1). A cost of 0 is not counted at all.
    pub fn cost(mut self, cost: impl Fn(&RequestHead<'_>) -> u32 + Send + Sync + 'static) -> Self {
        self.cost = Some(Box::new(cost));
        self
    }

    /// Requests for which `exempt` returns true are not counted (for example `/healthz`).
    pub fn exempt(
        mut self,
        exempt: impl Fn(&RequestHead<'_>) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.exempt = Some(Box::new(exempt));
        self
    }

    /// Counts CORS preflight requests (`OPTIONS` with `Access-Control-Request-Method`).
    /// Default: they are not counted, so a refused preflight cannot hide the real error.
    pub fn count_preflight(mut self, count: bool) -> Self {
        self.count_preflight = count;
        self
    }

    /// Shadow mode: decide, charge and annotate as usual, but never refuse.
    pub fn shadow(mut self, shadow: bool) -> Self {
        self.shadow = shadow;
        self
    }

    /// Adds `RateLimit-Policy` and `RateLimit` headers to allowed responses too (refusals
    /// always carry them). Default: off.
    pub fn headers_on_success(mut self, on: bool) -> Self {
        self.headers_on_success = on;
        self
    }

    /// Checks the configuration and builds the layer and its state.
    pub fn build(self) -> Result<RateLimitLayer<X, Bk::Backend, M>, ConfigError>
    where
        X: KeyExtractor,
        Bk: BackendChoice<X::Key>,
    {
        if self.name.is_empty()
            || !self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(ConfigError::InvalidLayerName(self.name.to_string()));
        }
        if self.max_keys == 0 {
            return Err(ConfigError::ZeroMaxKeys);
        }
        let policies = Policies::new(&self.policies)?;
        let settings = Arc::new(Settings {
            name: self.name,
            policies,
            cost: self.cost,
            exempt: self.exempt,
            count_preflight: self.count_preflight,
            shadow: self.shadow,
            headers_on_success: self.headers_on_success,
        });
        Ok(RateLimitLayer {
            mode: PhantomData,
            shared: Arc::new(Shared {
                extractor: self.extractor,
                backend: self
                    .backend
                    .into_backend(self.max_keys, self.clock, self.policies.len()),
                settings,
            }),
        })
    }
}
