use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;
use tower_layer::Layer;
use tracing::Level;
use tracing::level_filters::LevelFilter;

use super::redact::{self, QueryLog};
use super::service::Trace;
use crate::key::{ClientIp, RequestHead};

/// The default request id header.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Adds one structured event per request, a span, request ids and trace context.
///
/// Build it with [`TraceLayer::builder`], or [`TraceLayer::new`] for the defaults. Cloning
/// the layer shares its configuration.
#[derive(Clone)]
pub struct TraceLayer {
    config: Arc<Config>,
}

impl TraceLayer {
    /// A layer with the defaults: every request logged at `INFO` (5xx and panics at `ERROR`,
    /// requests slower than one second at `WARN`), request ids from a valid `X-Request-Id`,
    /// `traceparent` trusted, query values redacted, no headers logged, panics caught.
    pub fn new() -> Self {
        Self::builder()
            .build()
            .expect("the default configuration is valid")
    }

    /// A builder.
    pub fn builder() -> TraceBuilder {
        TraceBuilder::default()
    }
}

impl Default for TraceLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for TraceLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceLayer").finish_non_exhaustive()
    }
}

impl<S> Layer<S> for TraceLayer {
    type Service = Trace<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Trace::new(inner, self.config.clone())
    }
}

/// A configuration the trace layer refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A header that carries credentials was put on the logging allowlist.
    #[error("header {0} carries credentials and is never logged")]
    SecretHeader(HeaderName),
    /// A sampling ratio outside `0.0..=1.0`.
    #[error("sampling ratio {0} is not between 0 and 1")]
    SampleRatio(f64),
}

/// How requests on one route (by route template) are logged.
///
/// ```
/// use battlement::trace::{RoutePolicy, TraceLayer};
/// use std::time::Duration;
/// use tracing::Level;
///
/// let layer = TraceLayer::builder()
///     .route("/healthz", RoutePolicy::skip())
///     .route("/reports/{id}", RoutePolicy::new().slow_threshold(Duration::from_secs(5)))
///     .route("/metrics", RoutePolicy::new().level(Level::DEBUG))
///     .build()
///     .unwrap();
/// # let _ = layer;
/// ```
#[derive(Clone, Debug, Default, PartialEq)]
#[must_use]
pub struct RoutePolicy {
    pub(crate) skip: bool,
    pub(crate) level: Option<Level>,
    pub(crate) slow: Option<Duration>,
    pub(crate) sample: Option<f64>,
}

impl RoutePolicy {
    /// The layer's settings, to be changed by the methods below.
    pub fn new() -> Self {
        Self::default()
    }

    /// No span and no event for this route, except for server errors and panics, which are
    /// always logged.
    pub fn skip() -> Self {
        Self {
            skip: true,
            ..Self::default()
        }
    }

    /// The level of successful, fast requests on this route.
    pub fn level(mut self, level: Level) -> Self {
        self.level = Some(level);
        self
    }

    /// Requests slower than `threshold` are logged at the slow level.
    pub fn slow_threshold(mut self, threshold: Duration) -> Self {
        self.slow = Some(threshold);
        self
    }

    /// The share of successful, fast requests logged on this route (see
    /// [`TraceBuilder::sample_successes`]).
    pub fn sample(mut self, ratio: f64) -> Self {
        self.sample = Some(ratio);
        self
    }
}

type RouteFn = dyn Fn(&RequestHead<'_>) -> Option<String> + Send + Sync;

/// Builds a [`TraceLayer`].
#[must_use]
pub struct TraceBuilder {
    request_id_header: HeaderName,
    trust_request_id: bool,
    public_endpoint: bool,
    client_ip: ClientIp,
    route_from: Option<Arc<RouteFn>>,
    routes: HashMap<Box<str>, RoutePolicy>,
    server_error_level: Level,
    slow_level: Level,
    level: Level,
    span_level: Level,
    slow: Duration,
    sample: f64,
    headers: Vec<HeaderName>,
    query: QueryLog,
    catch_panics: bool,
    #[cfg(feature = "metrics")]
    metrics: bool,
}

impl Default for TraceBuilder {
    fn default() -> Self {
        Self {
            request_id_header: X_REQUEST_ID,
            trust_request_id: true,
            public_endpoint: false,
            client_ip: ClientIp::new(),
            route_from: None,
            routes: HashMap::new(),
            server_error_level: Level::ERROR,
            slow_level: Level::WARN,
            level: Level::INFO,
            span_level: Level::INFO,
            slow: Duration::from_secs(1),
            sample: 1.0,
            headers: Vec::new(),
            query: QueryLog::Redacted,
            catch_panics: true,
            #[cfg(feature = "metrics")]
            metrics: true,
        }
    }
}

impl fmt::Debug for TraceBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceBuilder").finish_non_exhaustive()
    }
}

impl TraceBuilder {
    /// The header request ids are read from and echoed in (default `x-request-id`).
    pub fn request_id_header(mut self, name: HeaderName) -> Self {
        self.request_id_header = name;
        self
    }

    /// Whether a valid incoming request id is kept (default `true`); when `false`, every
    /// request gets a new one.
    pub fn trust_request_id(mut self, trust: bool) -> Self {
        self.trust_request_id = trust;
        self
    }

    /// For endpoints open to the internet: an incoming `traceparent` is recorded as a link
    /// (`trace.link`) and a new trace is started, so that callers cannot choose trace ids
    /// (and with them sampling decisions). Default `false`: the caller's trace is continued.
    pub fn public_endpoint(mut self, public: bool) -> Self {
        self.public_endpoint = public;
        self
    }

    /// How `client.address` is found (default: the peer address; configure trusted proxies
    /// here exactly as for the rate limiter).
    pub fn client_ip(mut self, client_ip: ClientIp) -> Self {
        self.client_ip = client_ip;
        self
    }

    /// Where the route template comes from. By default it is axum's `MatchedPath` (feature
    /// `axum`, with the layer added by `Router::layer`); without one, `http.route` is left
    /// out, never replaced by the raw path. Return a template (`/orders/{id}`), never the
    /// path itself: it names spans and labels metrics.
    pub fn route_from(
        mut self,
        route: impl Fn(&RequestHead<'_>) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.route_from = Some(Arc::new(route));
        self
    }

    /// A policy for the route with template `template`.
    pub fn route(mut self, template: &str, policy: RoutePolicy) -> Self {
        self.routes.insert(template.into(), policy);
        self
    }

    /// The level of 5xx responses, errored bodies, gRPC server errors and panics (default
    /// `ERROR`).
    pub fn server_error_level(mut self, level: Level) -> Self {
        self.server_error_level = level;
        self
    }

    /// The level of requests slower than the slow threshold (default `WARN`).
    pub fn slow_level(mut self, level: Level) -> Self {
        self.slow_level = level;
        self
    }

    /// The level of every other request, 4xx included (default `INFO`).
    pub fn level(mut self, level: Level) -> Self {
        self.level = level;
        self
    }

    /// The level of the per-request span (default `INFO`).
    pub fn span_level(mut self, level: Level) -> Self {
        self.span_level = level;
        self
    }

    /// Requests slower than this (to the end of the body) are logged at the slow level
    /// (default one second).
    pub fn slow_threshold(mut self, threshold: Duration) -> Self {
        self.slow = threshold;
        self
    }

    /// Logs only this share of successful, fast requests (default `1.0`, all). The decision
    /// is made on the trace id, so every service sampling a trace with the same ratio keeps
    /// or drops it together. Errors, slow requests, aborted requests and requests a layer
    /// refused are always logged.
    pub fn sample_successes(mut self, ratio: f64) -> Self {
        self.sample = ratio;
        self
    }

    /// Request headers whose values are logged (field `http.request.header`). Empty by
    /// default. `Authorization`, `Proxy-Authorization`, `Cookie` and `Set-Cookie` are
    /// refused.
    pub fn log_headers<I>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = HeaderName>,
    {
        self.headers.extend(names);
        self
    }

    /// How the query string is logged (default: names kept, values redacted).
    pub fn query(mut self, query: QueryLog) -> Self {
        self.query = query;
        self
    }

    /// Whether a panic in the inner service becomes a `500` (default `true`).
    pub fn catch_panics(mut self, catch: bool) -> Self {
        self.catch_panics = catch;
        self
    }

    /// Whether requests are counted through the `metrics` facade (default `true`).
    #[cfg(feature = "metrics")]
    #[cfg_attr(docsrs, doc(cfg(feature = "metrics")))]
    pub fn metrics(mut self, on: bool) -> Self {
        self.metrics = on;
        self
    }

    /// The layer, or what is wrong with the configuration.
    pub fn build(self) -> Result<TraceLayer, ConfigError> {
        if let Some(secret) = self.headers.iter().find(|h| redact::is_secret(h)) {
            return Err(ConfigError::SecretHeader(secret.clone()));
        }
        let ratio = |r: f64| {
            if (0.0..=1.0).contains(&r) {
                Ok(sample_threshold(r))
            } else {
                Err(ConfigError::SampleRatio(r))
            }
        };
        let sample = ratio(self.sample)?;
        let mut routes = HashMap::with_capacity(self.routes.len());
        let mut least_verbose = [self.level, self.slow_level, self.server_error_level]
            .into_iter()
            .map(LevelFilter::from_level)
            .min()
            .unwrap_or(LevelFilter::ERROR);
        for (template, policy) in self.routes {
            let resolved = ResolvedPolicy {
                skip: policy.skip,
                level: policy.level.unwrap_or(self.level),
                slow: policy.slow.unwrap_or(self.slow),
                sample: policy.sample.map(ratio).transpose()?.unwrap_or(sample),
            };
            least_verbose = least_verbose.min(LevelFilter::from_level(resolved.level));
            routes.insert(template, resolved);
        }
        Ok(TraceLayer {
            config: Arc::new(Config {
                request_id_header: self.request_id_header,
                trust_request_id: self.trust_request_id,
                public_endpoint: self.public_endpoint,
                client_ip: self.client_ip,
                route_from: self.route_from,
                default_policy: ResolvedPolicy {
                    skip: false,
                    level: self.level,
                    slow: self.slow,
                    sample,
                },
                routes,
                least_verbose,
                server_error_level: self.server_error_level,
                slow_level: self.slow_level,
                span_level: self.span_level,
                headers: self.headers,
                query: self.query,
                catch_panics: self.catch_panics,
                #[cfg(feature = "metrics")]
                metrics: self.metrics,
            }),
        })
    }
}

/// `ratio` of the `u64` range: a trace is kept when its sampling value is below it.
fn sample_threshold(ratio: f64) -> u64 {
    if ratio >= 1.0 {
        u64::MAX
    } else {
        (ratio * u64::MAX as f64) as u64
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct ResolvedPolicy {
    pub(crate) skip: bool,
    pub(crate) level: Level,
    pub(crate) slow: Duration,
    pub(crate) sample: u64,
}

pub(crate) struct Config {
    pub(crate) request_id_header: HeaderName,
    pub(crate) trust_request_id: bool,
    pub(crate) public_endpoint: bool,
    pub(crate) client_ip: ClientIp,
    pub(crate) route_from: Option<Arc<RouteFn>>,
    pub(crate) default_policy: ResolvedPolicy,
    pub(crate) routes: HashMap<Box<str>, ResolvedPolicy>,
    /// The least verbose level any event of this layer can have: when the subscribers'
    /// filter is stricter than that, nothing is captured for logging at all.
    pub(crate) least_verbose: LevelFilter,
    pub(crate) server_error_level: Level,
    pub(crate) slow_level: Level,
    pub(crate) span_level: Level,
    pub(crate) headers: Vec<HeaderName>,
    pub(crate) query: QueryLog,
    pub(crate) catch_panics: bool,
    #[cfg(feature = "metrics")]
    pub(crate) metrics: bool,
}

impl Config {
    pub(crate) fn policy(&self, route: Option<&str>) -> ResolvedPolicy {
        route
            .and_then(|r| self.routes.get(r))
            .copied()
            .unwrap_or(self.default_policy)
    }

    /// Whether any event of this layer could be enabled by the installed subscribers.
    #[inline]
    pub(crate) fn logging_possible(&self) -> bool {
        LevelFilter::current() >= self.least_verbose
    }

    pub(crate) fn metrics_on(&self) -> bool {
        #[cfg(feature = "metrics")]
        {
            self.metrics
        }
        #[cfg(not(feature = "metrics"))]
        {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_cannot_be_logged() {
        let err = TraceLayer::builder()
            .log_headers([http::header::COOKIE])
            .build()
            .unwrap_err();
        assert_eq!(err, ConfigError::SecretHeader(http::header::COOKIE));
        assert!(TraceLayer::builder().sample_successes(1.5).build().is_err());
        assert!(
            TraceLayer::builder()
                .route("/x", RoutePolicy::new().sample(-0.1))
                .build()
                .is_err()
        );
    }

    #[test]
    fn thresholds() {
        assert_eq!(sample_threshold(1.0), u64::MAX);
        assert_eq!(sample_threshold(0.0), 0);
        let half = sample_threshold(0.5);
        assert!(half > u64::MAX / 2 - 1024 && half < u64::MAX / 2 + 1024);
    }
}
