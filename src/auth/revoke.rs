//! Token revocation: a `jti` denylist the validator asks for every token.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A boxed future, as the revocation hook returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a revocation check could not be answered.
pub type RevocationError = Box<dyn std::error::Error + Send + Sync>;

/// Answers whether a token id (`jti`) is revoked.
///
/// ```
/// use battlement::auth::{MemoryRevocation, Revocation};
/// use std::time::Duration;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let denylist = MemoryRevocation::new();
/// denylist.revoke("token-7", Duration::from_secs(3600));
/// assert!(denylist.is_revoked("token-7").await.unwrap());
/// assert!(!denylist.is_revoked("token-8").await.unwrap());
/// # }
/// ```
pub trait Revocation: Send + Sync + 'static {
    /// Whether `jti` is revoked.
    fn is_revoked<'a>(&'a self, jti: &'a str) -> BoxFuture<'a, Result<bool, RevocationError>>;
}

/// An in-memory denylist (one process). Entries are dropped once they expire, which
/// should be no earlier than the revoked token's `exp`.
#[derive(Debug, Default)]
pub struct MemoryRevocation {
    revoked: Mutex<HashMap<String, Instant>>,
}

impl MemoryRevocation {
    /// An empty denylist.
    pub fn new() -> Self {
        Self::default()
    }

    /// Revokes `jti` for `ttl` (at least until the token would have expired).
    pub fn revoke(&self, jti: &str, ttl: Duration) {
        let mut revoked = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        // Keep the map bounded by what is still relevant.
        if revoked.len() >= 1024 && revoked.len().is_power_of_two() {
            revoked.retain(|_, until| *until > now);
        }
        revoked.insert(jti.to_owned(), now + ttl);
    }
}

impl Revocation for MemoryRevocation {
    fn is_revoked<'a>(&'a self, jti: &'a str) -> BoxFuture<'a, Result<bool, RevocationError>> {
        let revoked = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
        let answer = revoked
            .get(jti)
            .is_some_and(|until| *until > Instant::now());
        Box::pin(std::future::ready(Ok(answer)))
    }
}

/// A denylist in Redis shared by every replica: `{prefix}:revoked:{jti}` keys that expire
/// with the token. Each check is one `EXISTS` under the store's timeout and breaker.
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
#[derive(Clone, Debug)]
pub struct RedisRevocation {
    store: crate::redis::RedisStore,
}

#[cfg(feature = "redis")]
impl RedisRevocation {
    /// A denylist on `store`.
    pub fn new(store: crate::redis::RedisStore) -> Self {
        Self { store }
    }

    /// Revokes `jti` for `ttl` (at least until the token would have expired).
    pub async fn revoke(&self, jti: &str, ttl: Duration) -> Result<(), crate::redis::StoreError> {
        let key = self.store.key("revoked", &jti);
        let ms = ttl.as_millis().max(1) as u64;
        self.store
            .call(|mut conn| async move {
                redis::cmd("SET")
                    .arg(&key)
                    .arg(1)
                    .arg("PX")
                    .arg(ms)
                    .query_async::<()>(&mut conn)
                    .await
            })
            .await
    }
}

#[cfg(feature = "redis")]
impl Revocation for RedisRevocation {
    fn is_revoked<'a>(&'a self, jti: &'a str) -> BoxFuture<'a, Result<bool, RevocationError>> {
        Box::pin(async move {
            let key = self.store.key("revoked", &jti);
            let exists: bool = self
                .store
                .call(|mut conn| async move {
                    redis::cmd("EXISTS").arg(&key).query_async(&mut conn).await
                })
                .await?;
            Ok(exists)
        })
    }
}
