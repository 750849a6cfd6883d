//! [`IdempotencyLayer`] and its builder.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::header::{
    CONTENT_ENCODING, CONTENT_LOCATION, CONTENT_TYPE, ETAG, LAST_MODIFIED, LOCATION, SET_COOKIE,
};
use http::{HeaderName, Method};
use tower_layer::Layer;

use super::service::Idempotency;
use super::store::{IdempotencyStore, MemoryStore};
use super::{ConfigError, FailurePolicy, IDEMPOTENT_REPLAYED};

/// Default cap of a request body read to fingerprint it: 1 MiB.
pub const DEFAULT_MAX_REQUEST_BODY: usize = 1024 * 1024;
/// Default cap of a response body stored for replay: 1 MiB.
pub const DEFAULT_MAX_RESPONSE_BODY: usize = 1024 * 1024;
/// Default lease of an in-flight claim: 60 s.
pub const DEFAULT_IN_FLIGHT_TTL: Duration = Duration::from_secs(60);
/// Default cap on how long a running request keeps renewing its claim: 5 minutes.
pub const DEFAULT_MAX_HOLD: Duration = Duration::from_secs(300);
/// Default retention of a completed response: 24 h.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// State shared by every service a layer makes.
pub(crate) struct Shared {
    pub(crate) store: Arc<dyn IdempotencyStore>,
    pub(crate) methods: Vec<Method>,
    pub(crate) require_key: bool,
    pub(crate) fingerprint_headers: Vec<HeaderName>,
    pub(crate) stored_headers: Vec<HeaderName>,
    pub(crate) max_request_body: usize,
    pub(crate) body_idle_timeout: Duration,
    pub(crate) max_response_body: usize,
    pub(crate) in_flight_ttl: Duration,
    pub(crate) max_hold: Duration,
    pub(crate) retention: Duration,
    pub(crate) store_server_errors: bool,
    pub(crate) failure: FailurePolicy,
}

/// Makes `POST` and `PATCH` requests with an `Idempotency-Key` safe to retry. Build it with
/// [`IdempotencyLayer::builder`]; see the [module docs](super) for what it does.
///
/// The store is made when the layer is built: every service the layer makes (axum calls
/// [`Layer::layer`] once per route) and every clone of it share it.
#[derive(Clone)]
pub struct IdempotencyLayer {
    shared: Arc<Shared>,
}

impl fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.shared;
        f.debug_struct("IdempotencyLayer")
            .field("methods", &s.methods)
            .field("require_key", &s.require_key)
            .field("fingerprint_headers", &s.fingerprint_headers)
            .field("stored_headers", &s.stored_headers)
            .field("max_request_body", &s.max_request_body)
            .field("max_response_body", &s.max_response_body)
            .field("in_flight_ttl", &s.in_flight_ttl)
            .field("max_hold", &s.max_hold)
            .field("retention", &s.retention)
            .field("store_server_errors", &s.store_server_errors)
            .field("failure", &s.failure)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = Idempotency<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Idempotency::new(inner, self.shared.clone())
    }
}

impl IdempotencyLayer {
    /// A builder with the defaults: `POST` and `PATCH`, key optional, records in memory
    /// ([`MemoryStore`]), fingerprint over `content-type`, stored headers `content-type`,
    /// `content-location`, `location`, `etag` and `last-modified`, 1 MiB caps, a 60 s
    /// lease renewed for at most 5 minutes, 24 h retention, 5xx not stored,
    /// [`FailurePolicy::Closed`].
    pub fn builder() -> IdempotencyBuilder {
        IdempotencyBuilder {
            store: None,
            methods: vec![Method::POST, Method::PATCH],
            require_key: false,
            fingerprint_headers: vec![CONTENT_TYPE],
            stored_headers: vec![
                CONTENT_TYPE,
                CONTENT_ENCODING,
                CONTENT_LOCATION,
                LOCATION,
                ETAG,
                LAST_MODIFIED,
            ],
            max_request_body: DEFAULT_MAX_REQUEST_BODY,
            body_idle_timeout: crate::body::DEFAULT_BODY_IDLE_TIMEOUT,
            max_response_body: DEFAULT_MAX_RESPONSE_BODY,
            in_flight_ttl: DEFAULT_IN_FLIGHT_TTL,
            max_hold: DEFAULT_MAX_HOLD,
            retention: DEFAULT_RETENTION,
            store_server_errors: false,
            failure: FailurePolicy::default(),
        }
    }
}

/// The largest `max_response_body` accepted: a stored record must stay well under Redis's
/// 512 MiB limit on one value (over it, Redis drops the shared connection).
const MAX_RESPONSE_CAP: usize = 256 * 1024 * 1024;

/// Builds an [`IdempotencyLayer`]; [`build`](Self::build) checks the configuration.
#[must_use]
pub struct IdempotencyBuilder {
    store: Option<Arc<dyn IdempotencyStore>>,
    methods: Vec<Method>,
    require_key: bool,
    fingerprint_headers: Vec<HeaderName>,
    stored_headers: Vec<HeaderName>,
    max_request_body: usize,
    body_idle_timeout: Duration,
    max_response_body: usize,
    in_flight_ttl: Duration,
    max_hold: Duration,
    retention: Duration,
    store_server_errors: bool,
    failure: FailurePolicy,
}

impl fmt::Debug for IdempotencyBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyBuilder")
            .field("methods", &self.methods)
            .field("require_key", &self.require_key)
            .field("failure", &self.failure)
            .finish_non_exhaustive()
    }
}

impl IdempotencyBuilder {
    /// Keeps records in `store` (default: a new [`MemoryStore`] with its default bounds).
    /// Pass a clone of one store to several layers to share their records.
    pub fn store(mut self, store: impl IdempotencyStore) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// Keeps records in Redis, shared by every instance of the service (a
    /// [`RedisIdempotencyStore`](super::RedisIdempotencyStore) on `redis`).
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub fn redis(self, redis: crate::redis::RedisStore) -> Self {
        self.store(super::RedisIdempotencyStore::new(redis))
    }

    /// The methods the layer applies to (default `POST` and `PATCH`); requests with any
    /// other method pass straight through, key or not.
    pub fn methods<I: IntoIterator<Item = Method>>(mut self, methods: I) -> Self {
        self.methods = methods.into_iter().collect();
        self
    }

    /// Requires an `Idempotency-Key` on every request the layer applies to: without one,
    /// `400` (default: requests without a key pass through). To require it on some routes
    /// only, put a layer built with this on those routes (axum `MethodRouter::layer`),
    /// sharing the other layer's store.
    pub fn require_key(mut self, require: bool) -> Self {
        self.require_key = require;
        self
    }

    /// The request headers that are part of the fingerprint, besides the method, the path
    /// and query, and the body (default: `content-type`). Replaces the list.
    pub fn fingerprint_headers<I: IntoIterator<Item = HeaderName>>(mut self, headers: I) -> Self {
        self.fingerprint_headers = headers.into_iter().collect();
        self
    }

    /// The response headers stored and replayed (default: `content-type`,
    /// `content-encoding`, `content-location`, `location`, `etag`, `last-modified`; gRPC's
    /// `grpc-status`, `grpc-message`, `grpc-status-details-bin` and `grpc-encoding` are
    /// always stored). Replaces the list.
    /// `set-cookie` is refused by [`build`](Self::build): a replay must never hand one
    /// caller's cookie to another request.
    pub fn stored_headers<I: IntoIterator<Item = HeaderName>>(mut self, headers: I) -> Self {
        self.stored_headers = headers.into_iter().collect();
        self
    }

    /// The largest request body read to fingerprint it (default 1 MiB); larger ones are
    /// refused with `413`. Only requests with a key are read.
    pub fn max_request_body(mut self, bytes: usize) -> Self {
        self.max_request_body = bytes;
        self
    }

    /// How long a request body being read (to fingerprint it) may send nothing before the
    /// request is refused with `408` (default 30 s,
    /// [`DEFAULT_BODY_IDLE_TIMEOUT`](crate::body::DEFAULT_BODY_IDLE_TIMEOUT)). A slow upload
    /// that keeps sending is not cut.
    pub fn body_idle_timeout(mut self, timeout: Duration) -> Self {
        self.body_idle_timeout = timeout;
        self
    }

    /// The largest response body stored (default 1 MiB, at most 256 MiB: Redis refuses a
    /// value over 512 MiB, and drops the connection every layer shares); a larger response
    /// passes through whole and its key is released.
    pub fn max_response_body(mut self, bytes: usize) -> Self {
        self.max_response_body = bytes;
        self
    }

    /// How long an in-flight claim holds its key without renewal (default 60 s). A running
    /// request renews its claim every third of it, so this bounds how long the key stays
    /// held after the process running the request died, not how long a request may take.
    pub fn in_flight_ttl(mut self, ttl: Duration) -> Self {
        self.in_flight_ttl = ttl.min(crate::FOREVER);
        self
    }

    /// How long a running request keeps renewing its claim (default 5 minutes). A request
    /// still running past it (a stuck handler) stops renewing, so its key frees itself one
    /// `in_flight_ttl` later and a retry runs; whatever the stuck request answers in the
    /// end is not stored over the retry's record (the write is fenced by the owner token).
    pub fn max_hold(mut self, max_hold: Duration) -> Self {
        self.max_hold = max_hold.min(crate::FOREVER);
        self
    }

    /// How long a completed response is kept for replay (default 24 h).
    pub fn retention(mut self, ttl: Duration) -> Self {
        self.retention = ttl.min(crate::FOREVER);
        self
    }

    /// Stores `5xx` responses too, as Stripe does (default: not stored; the key is released
    /// so that a retry runs the request again).
    pub fn store_server_errors(mut self, store: bool) -> Self {
        self.store_server_errors = store;
        self
    }

    /// What to do when the store cannot be reached (default [`FailurePolicy::Closed`]).
    pub fn on_failure(mut self, failure: FailurePolicy) -> Self {
        self.failure = failure;
        self
    }

    /// Checks the configuration and builds the layer and its store.
    pub fn build(self) -> Result<IdempotencyLayer, ConfigError> {
        if self.methods.is_empty() {
            return Err(ConfigError::NoMethods);
        }
        if self.in_flight_ttl < Duration::from_millis(1) {
            return Err(ConfigError::ZeroDuration("in_flight_ttl"));
        }
        if self.retention < Duration::from_millis(1) {
            return Err(ConfigError::ZeroDuration("retention"));
        }
        if self.max_response_body > MAX_RESPONSE_CAP {
            return Err(ConfigError::ResponseCapTooLarge(self.max_response_body));
        }
        for name in &self.stored_headers {
            if *name == SET_COOKIE {
                return Err(ConfigError::SetCookieStored);
            }
            if crate::body::HOP_BY_HOP.contains(&name.as_str()) || *name == IDEMPOTENT_REPLAYED {
                return Err(ConfigError::HeaderNotStorable(name.to_string()));
            }
        }
        let mut stored_headers = self.stored_headers;
        stored_headers.dedup();
        let store = self
            .store
            .unwrap_or_else(|| Arc::new(MemoryStore::new()) as Arc<dyn IdempotencyStore>);
        Ok(IdempotencyLayer {
            shared: Arc::new(Shared {
                store,
                methods: self.methods,
                require_key: self.require_key,
                fingerprint_headers: self.fingerprint_headers,
                stored_headers,
                max_request_body: self.max_request_body,
                body_idle_timeout: self.body_idle_timeout,
                max_response_body: self.max_response_body,
                in_flight_ttl: self.in_flight_ttl,
                max_hold: self.max_hold,
                retention: self.retention,
                store_server_errors: self.store_server_errors,
                failure: self.failure,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misconfigurations_are_refused_at_build() {
        let err = |b: IdempotencyBuilder| b.build().unwrap_err();
        assert_eq!(
            err(IdempotencyLayer::builder().stored_headers([SET_COOKIE])),
            ConfigError::SetCookieStored
        );
        assert_eq!(
            err(IdempotencyLayer::builder()
                .stored_headers([HeaderName::from_static("transfer-encoding")])),
            ConfigError::HeaderNotStorable("transfer-encoding".into())
        );
        assert_eq!(
            err(IdempotencyLayer::builder().methods([])),
            ConfigError::NoMethods
        );
        assert_eq!(
            err(IdempotencyLayer::builder().in_flight_ttl(Duration::ZERO)),
            ConfigError::ZeroDuration("in_flight_ttl")
        );
        assert_eq!(
            err(IdempotencyLayer::builder().retention(Duration::from_micros(10))),
            ConfigError::ZeroDuration("retention")
        );
        assert!(IdempotencyLayer::builder().build().is_ok());
    }
}
