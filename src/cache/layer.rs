//! [`CacheLayer`] and its builder.

use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::key::KeyRules;
use super::policy::Settings;
use super::service::{Cache, Shared};
use super::store::memory::MemoryStore;

/// A shared response cache in front of the inner service.
#[derive(Clone)]
pub struct CacheLayer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for CacheLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheLayer").finish_non_exhaustive()
    }
}

impl CacheLayer {
    /// Removes the shared entry of `uri` (a path with its query, for example
    /// `/products/7`), and of every variant of it, so that the next request goes to the
    /// origin. With a host allowlist, give the host too. Application code and admin routes
    /// call it when the resource changes; every clone of the layer sees it.
    ///
    /// ```
    /// use battlement::cache::CacheLayer;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let cache = CacheLayer::builder().build();
    /// cache.purge("/products/7?view=full", None).await;
    /// # }
    /// ```
    pub async fn purge(&self, uri: &str, host: Option<&str>) {
        let Ok(uri) = uri.parse::<http::Uri>() else {
            return;
        };
        let mut headers = http::HeaderMap::new();
        if let Some(host) = host.and_then(|h| http::HeaderValue::from_str(h).ok()) {
            headers.insert(http::header::HOST, host);
        }
        let shared = &self.shared;
        if let Some(key) =
            super::key::primary(&shared.rules, &http::Method::GET, &uri, &headers, None)
        {
            let _ = shared.store.remove(&key).await;
        }
    }
}

impl CacheLayer {
    /// Purges every entry whose response named `tag` in a `Surrogate-Key` or `Cache-Tag`
    /// header (those headers are removed before responses leave). O(1): the tag's version
    /// moves on, and entries stored under the old one become misses.
    ///
    /// ```
    /// use battlement::cache::CacheLayer;
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let cache = CacheLayer::builder().build();
    /// cache.purge_tag("product-7").await;
    /// # }
    /// ```
    pub async fn purge_tag(&self, tag: &str) {
        self.shared.purge_tag(tag).await;
    }
}

impl<S> Layer<S> for CacheLayer {
    type Service = Cache<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Cache::new(inner, self.shared.clone())
    }
}

/// Builds a [`CacheLayer`].
#[must_use]
pub struct CacheBuilder {
    memory_bytes: u64,
    default_ttl: Option<Duration>,
    max_ttl: Duration,
    max_body: usize,
    rules: KeyRules,
    per_principal: bool,
    name: String,
    clock: Option<Arc<dyn Fn() -> std::time::SystemTime + Send + Sync>>,
    origin_timeout: Option<Duration>,
    #[cfg(feature = "redis")]
    redis: Option<crate::redis::RedisStore>,
    #[cfg(feature = "redis")]
    tiered: bool,
}

impl std::fmt::Debug for CacheBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheBuilder")
            .field("memory_bytes", &self.memory_bytes)
            .field("max_body", &self.max_body)
            .finish_non_exhaustive()
    }
}

impl CacheLayer {
    /// A builder.
    pub fn builder() -> CacheBuilder {
        CacheBuilder {
            memory_bytes: 64 * 1024 * 1024,
            default_ttl: None,
            max_ttl: Duration::from_secs(24 * 3600),
            max_body: 1024 * 1024,
            rules: KeyRules::default(),
            per_principal: false,
            name: "battlement".into(),
            clock: None,
            origin_timeout: None,
            #[cfg(feature = "redis")]
            redis: None,
            #[cfg(feature = "redis")]
            tiered: false,
        }
    }
}

impl CacheBuilder {
    /// The memory store's bound in bytes (default 64 MiB).
    pub fn memory_bytes(mut self, bytes: u64) -> Self {
        self.memory_bytes = bytes;
        self
    }

    /// Freshness for responses that state none (default: such responses are not stored).
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = Some(ttl);
        self
    }

    /// The largest body stored (default 1 MiB); bigger ones pass through whole.
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// Caches only requests for these hosts, and keys on the host (default: any host, not
    /// part of the key).
    pub fn hosts<I, T>(mut self, hosts: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.rules.hosts = Some(
            hosts
                .into_iter()
                .map(|h| h.into().to_ascii_lowercase())
                .collect(),
        );
        self
    }

    /// Keys on these query parameters only (default: all of them).
    pub fn query_params<I, T>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.rules.query_allow = Some(names.into_iter().map(Into::into).collect());
        self
    }

    /// Caches per principal (the subject auth set): requests with credentials are looked up,
    /// `private` responses stored, each caller seeing only their own entries.
    pub fn per_principal(mut self, on: bool) -> Self {
        self.per_principal = on;
        self
    }

    /// The cache's name in `Cache-Status` (default `battlement`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Keeps entries in Redis, shared by every replica (instead of this process's memory).
    /// Each call waits at most the store's timeout (50 ms by default); when Redis is slow or
    /// down, requests go to the origin and are served: the cache never turns a working
    /// origin into an error.
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub fn redis(mut self, store: crate::redis::RedisStore) -> Self {
        self.redis = Some(store);
        self
    }

    /// Keeps a memory tier (bounded by [`CacheBuilder::memory_bytes`]) in front of Redis:
    /// hits are served from memory, misses read Redis, and a purge on one replica reaches
    /// every replica's memory tier through Redis pub/sub. Entries stay in memory at most
    /// 30 s, which bounds how long a purge missed while disconnected can go unseen.
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub fn tiered(mut self, store: crate::redis::RedisStore) -> Self {
        self.redis = Some(store);
        self.tiered = true;
        self
    }

    /// How long a request with a `stale-if-error` entry to fall back on waits for the origin
    /// before it is answered with the stale entry (default: no limit; only a `5xx` or an
    /// error falls back).
    pub fn stale_if_error_timeout(mut self, limit: Duration) -> Self {
        self.origin_timeout = Some(limit);
        self
    }

    /// The clock entries are dated and aged by (default: the system clock), for tests.
    pub fn clock(
        mut self,
        clock: impl Fn() -> std::time::SystemTime + Send + Sync + 'static,
    ) -> Self {
        self.clock = Some(Arc::new(clock));
        self
    }

    /// The layer.
    pub fn build(self) -> CacheLayer {
        let settings = Settings {
            default_ttl: self.default_ttl,
            per_principal: self.per_principal,
            max_ttl: self.max_ttl,
        };
        let store: Arc<dyn super::store::Store> = Arc::new(MemoryStore::new(self.memory_bytes));
        #[cfg(feature = "redis")]
        let store: Arc<dyn super::store::Store> = match self.redis {
            Some(redis) => {
                let timeout = redis.config().call_timeout();
                // Plain Redis is the tiered store without its memory tier: it still hears
                // purges of tags from the other replicas.
                let versions = super::store::TagVersions::default();
                let memory = if self.tiered { self.memory_bytes } else { 0 };
                let store: Arc<dyn super::store::Store> =
                    super::store::tiered::TieredStore::new(redis, memory, versions.clone());
                let mut shared = Shared::new(
                    store,
                    self.rules.clone(),
                    settings,
                    self.max_body,
                    self.name.clone(),
                );
                shared.store_timeout = timeout;
                shared.origin_timeout = self.origin_timeout;
                shared.tag_versions = versions;
                if let Some(clock) = self.clock.clone() {
                    shared.clock = clock;
                }
                return CacheLayer {
                    shared: Arc::new(shared),
                };
            }
            None => store,
        };
        let mut shared = Shared::new(store, self.rules, settings, self.max_body, self.name);
        if let Some(clock) = self.clock {
            shared.clock = clock;
        }
        shared.origin_timeout = self.origin_timeout;
        CacheLayer {
            shared: Arc::new(shared),
        }
    }
}
