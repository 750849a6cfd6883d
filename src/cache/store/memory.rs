//! The memory store: `moka`, bounded in bytes, each entry expiring on its own.

use std::time::{Duration, Instant};

use moka::Expiry;
use moka::sync::Cache;

use super::{BoxFuture, Store, StoreError, Stored};
use crate::cache::key::Key;

#[derive(Clone)]
struct Slot {
    value: Stored,
    ttl: Duration,
}

struct PerEntry;

impl Expiry<Key, Slot> for PerEntry {
    fn expire_after_create(&self, _key: &Key, slot: &Slot, _now: Instant) -> Option<Duration> {
        Some(slot.ttl)
    }

    fn expire_after_update(
        &self,
        _key: &Key,
        slot: &Slot,
        _now: Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        Some(slot.ttl)
    }
}

/// Responses in this process, at most `max_bytes` of them (bodies, headers and keys
/// counted), least recently used first out.
pub(crate) struct MemoryStore {
    // foldhash (randomly seeded per store) instead of SipHash: a key is hashed on every
    // lookup, and this is the one a hit waits for.
    cache: Cache<Key, Slot, hashbrown::DefaultHashBuilder>,
}

impl MemoryStore {
    /// A store holding at most `max_bytes`.
    pub(crate) fn new(max_bytes: u64) -> Self {
        Self {
            cache: Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|key: &Key, slot: &Slot| slot.value.weight(key))
                .expire_after(PerEntry)
                .build_with_hasher(hashbrown::DefaultHashBuilder::default()),
        }
    }

    /// Settles pending evictions and reports the size (for tests).
    #[cfg(test)]
    pub(crate) fn weighted_size(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.weighted_size()
    }
}

impl Store for MemoryStore {
    fn get_now(&self, key: &[u8]) -> Option<Option<Stored>> {
        Some(self.cache.get(key).map(|slot| slot.value))
    }

    fn get<'a>(&'a self, key: &'a [u8]) -> BoxFuture<'a, Result<Option<Stored>, StoreError>> {
        let found = self.cache.get(key).map(|slot| slot.value);
        Box::pin(std::future::ready(Ok(found)))
    }

    fn put(&self, key: Key, value: Stored, ttl: Duration) -> BoxFuture<'_, Result<(), StoreError>> {
        if !ttl.is_zero() {
            self.cache.insert(key, Slot { value, ttl });
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn remove<'a>(&'a self, key: &'a [u8]) -> BoxFuture<'a, Result<(), StoreError>> {
        self.cache.invalidate(key);
        Box::pin(std::future::ready(Ok(())))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::SystemTime;

    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    use super::*;
    use crate::cache::policy::Freshness;
    use crate::cache::store::Entry;

    fn entry(body: usize) -> Stored {
        Stored::Response(Arc::new(Entry {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from(vec![b'x'; body]),
            trailers: None,
            stored_at: SystemTime::now(),
            freshness: Freshness {
                lifetime: Duration::from_secs(60),
                stale_while_revalidate: Duration::ZERO,
                stale_if_error: Duration::ZERO,
                must_revalidate: false,
            },
            tags: Vec::new(),
            last_hit: Default::default(),
        }))
    }

    fn key(s: &str) -> Key {
        s.as_bytes().to_vec().into_boxed_slice()
    }

    #[tokio::test]
    async fn put_get_remove() {
        let store = MemoryStore::new(1 << 20);
        store
            .put(key("a"), entry(10), Duration::from_secs(60))
            .await
            .unwrap();
        assert!(matches!(
            store.get(b"a").await.unwrap(),
            Some(Stored::Response(_))
        ));
        assert!(store.get(b"b").await.unwrap().is_none());
        store.remove(b"a").await.unwrap();
        assert!(store.get(b"a").await.unwrap().is_none());
        // A zero ttl stores nothing.
        store
            .put(key("z"), Stored::Pass, Duration::ZERO)
            .await
            .unwrap();
        assert!(store.get(b"z").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn bounded_in_bytes() {
        let store = MemoryStore::new(64 * 1024);
        for i in 0..100 {
            store
                .put(key(&format!("k{i}")), entry(4096), Duration::from_secs(60))
                .await
                .unwrap();
        }
        assert!(
            store.weighted_size() <= 64 * 1024,
            "{}",
            store.weighted_size()
        );
    }

    #[tokio::test]
    async fn entries_expire_on_their_own() {
        let store = MemoryStore::new(1 << 20);
        store
            .put(key("short"), entry(1), Duration::from_millis(30))
            .await
            .unwrap();
        store
            .put(key("long"), entry(1), Duration::from_secs(60))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert!(store.get(b"short").await.unwrap().is_none());
        assert!(store.get(b"long").await.unwrap().is_some());
    }
}
