//! Where cached responses live: one trait, a memory store (and Redis and tiered stores to
//! come), obeying the same contract.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, StatusCode};

use super::key::Key;
use super::policy::Freshness;

pub(crate) mod memory;
#[cfg(feature = "redis")]
pub(crate) mod redis;
#[cfg(feature = "redis")]
pub(crate) mod tiered;

/// A boxed future, as the store returns (the memory store answers at once, Redis later).
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A stored response.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    /// The status.
    pub(crate) status: StatusCode,
    /// The headers as stored (no `Set-Cookie`, no hop-by-hop headers, no tag headers).
    pub(crate) headers: HeaderMap,
    /// The whole body.
    pub(crate) body: Bytes,
    /// The trailers, if the response had any.
    pub(crate) trailers: Option<HeaderMap>,
    /// When it was stored.
    pub(crate) stored_at: SystemTime,
    /// How long it is fresh, and its stale windows.
    pub(crate) freshness: Freshness,
    /// The purge tags of the response, each with its version when the entry was stored: a
    /// tag purged since then (its version moved on) makes the entry a miss.
    pub(crate) tags: Vec<(String, u64)>,
    /// The `Age` and `Cache-Status` of its last plain hit.
    pub(crate) last_hit: HitMemo,
}

/// The `Age` and `Cache-Status` values of an entry's last plain hit, reused by the hits
/// that would get the same ones (they change once a second): most hits then format and
/// allocate nothing for them. Never waited for: a hit that finds it busy builds its own.
#[derive(Default)]
pub(crate) struct HitMemo(parking_lot::Mutex<Option<Hit>>);

/// One memoized hit: its seconds since storing, its `ttl`, and the values they gave.
#[derive(Clone)]
pub(crate) struct Hit {
    pub(crate) since: u64,
    pub(crate) ttl: i64,
    pub(crate) age: u64,
    pub(crate) age_value: http::HeaderValue,
    pub(crate) status_value: http::HeaderValue,
}

impl HitMemo {
    /// The memoized hit, if it was made `since` seconds after storing with this `ttl`.
    pub(crate) fn get(&self, since: u64, ttl: i64) -> Option<Hit> {
        let memo = self.0.try_lock()?;
        memo.as_ref()
            .filter(|hit| hit.since == since && hit.ttl == ttl)
            .cloned()
    }

    /// Remembers `hit` for the next ones.
    pub(crate) fn set(&self, hit: Hit) {
        if let Some(mut memo) = self.0.try_lock() {
            *memo = Some(hit);
        }
    }
}

impl Clone for HitMemo {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl std::fmt::Debug for HitMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HitMemo").finish_non_exhaustive()
    }
}

/// What a key holds.
#[derive(Clone, Debug)]
pub(crate) enum Stored {
    /// A response.
    Response(Arc<Entry>),
    /// The primary key of a response that varies: the headers its variants are keyed on,
    /// and the generation of this variant list (see [`variant`](crate::cache::key::variant)).
    Vary(Arc<[HeaderName]>, u64),
    /// A recent response for this key was not cacheable: requests go straight to the
    /// origin for a short while instead of queueing behind one another.
    Pass,
}

impl Stored {
    /// Roughly how many bytes it takes, for stores bounded in bytes.
    pub(crate) fn weight(&self, key: &[u8]) -> u32 {
        let own = match self {
            Stored::Response(entry) => {
                let headers: usize = entry
                    .headers
                    .iter()
                    .map(|(k, v)| k.as_str().len() + v.len() + 32)
                    .sum();
                entry.body.len() + headers + 128
            }
            Stored::Vary(names, _) => {
                8 + names.iter().map(|n| n.as_str().len() + 16).sum::<usize>()
            }
            Stored::Pass => 8,
        };
        u32::try_from(own + key.len() + 64).unwrap_or(u32::MAX)
    }
}

/// Purge tag versions, shared by a layer and the store's purge listener.
pub(crate) type TagVersions = Arc<Mutex<HashMap<String, u64>>>;

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
#[allow(dead_code)] // The Redis store will fail; the memory store never does.
pub(crate) enum StoreError {
    /// The store did not answer within its time budget.
    #[error("the cache store timed out")]
    Timeout,
    /// The store failed.
    #[error("the cache store failed: {0}")]
    Failed(String),
}

/// A place to keep responses. The contract every store obeys: `get` after `put` returns the
/// value until `ttl` passes or the key is removed; values are whole (never half written).
pub(crate) trait Store: Send + Sync + 'static {
    /// The value under `key`.
    fn get<'a>(&'a self, key: &'a [u8]) -> BoxFuture<'a, Result<Option<Stored>, StoreError>>;

    /// The value under `key` without waiting, for stores that can answer at once (memory);
    /// `None` means "ask [`Store::get`]".
    fn get_now(&self, _key: &[u8]) -> Option<Option<Stored>> {
        None
    }
    /// Keeps `value` under `key` for `ttl`.
    fn put(&self, key: Key, value: Stored, ttl: Duration) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Forgets `key`.
    fn remove<'a>(&'a self, key: &'a [u8]) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Claims the right to fill `key` for `ttl` across every process sharing this store;
    /// `false` when another process holds it. Stores private to one process need no claim
    /// (the layer's own single flight covers it).
    fn claim_fill<'a>(
        &'a self,
        _key: &'a [u8],
        _ttl: Duration,
        _token: u64,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(std::future::ready(Ok(true)))
    }

    /// Gives up the claim made with [`Store::claim_fill`] and `token`, if it still holds.
    fn release_fill<'a>(
        &'a self,
        _key: &'a [u8],
        _token: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    /// Whether fills must be coordinated through the store (other processes share it).
    fn shared(&self) -> bool {
        false
    }

    /// Moves `tag` to a new version in every process sharing this store, and returns it;
    /// `None` for a store private to one process (the layer counts locally).
    fn purge_tag<'a>(&'a self, _tag: &'a str) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        Box::pin(std::future::ready(Ok(None)))
    }

    /// The current versions of `tags` in every process sharing this store (0 for a tag
    /// never purged), in order; `None` for a store private to one process, whose layer's
    /// own versions are the whole truth.
    fn tag_versions<'a>(
        &'a self,
        _tags: &'a [String],
    ) -> Option<BoxFuture<'a, Result<Vec<u64>, StoreError>>> {
        None
    }
}
