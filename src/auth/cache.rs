//! The opt-in verified-token cache.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lc_rs::digest::{SHA256, digest};
use moka::Expiry;
use moka::sync::Cache;

use super::jwt::Verified;

#[derive(Clone)]
struct Entry {
    verified: Arc<Verified>,
    ttl: Duration,
}

struct UntilExp;

impl Expiry<[u8; 32], Entry> for UntilExp {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        entry: &Entry,
        _now: Instant,
    ) -> Option<Duration> {
        Some(entry.ttl)
    }
}

/// Verified tokens by the SHA-256 of the token (the token itself is never kept), each
/// expiring with the token.
pub(crate) struct TokenCache {
    cache: Cache<[u8; 32], Entry>,
}

fn key(token: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, token.as_bytes()).as_ref());
    out
}

impl TokenCache {
    pub(crate) fn new(capacity: u64) -> Self {
        Self {
            cache: Cache::builder()
                .max_capacity(capacity)
                .expire_after(UntilExp)
                .build(),
        }
    }

    pub(crate) fn get(&self, token: &str) -> Option<Arc<Verified>> {
        self.cache.get(&key(token)).map(|e| e.verified)
    }

    pub(crate) fn insert(&self, token: &str, verified: Verified, ttl_secs: u64) {
        if ttl_secs == 0 {
            return;
        }
        self.cache.insert(
            key(token),
            Entry {
                verified: Arc::new(verified),
                ttl: Duration::from_secs(ttl_secs),
            },
        );
    }

    pub(crate) fn remove(&self, token: &str) {
        self.cache.invalidate(&key(token));
    }
}
