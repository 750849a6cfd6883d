//! The memory store: `moka`, bounded in bytes, each entry expiring on its own, with a
//! small per-thread front of the entries each thread hit last.
//!
//! A moka lookup costs more than the rest of a cache hit together (hashing, the
//! concurrent map, the clock, and recording the read for its eviction policy), so a
//! thread keeps the last small entries it found in a direct-mapped table of its own,
//! checked first:
//!
//! - every change to the store (a `put` or a `remove`, purges included) moves the store's
//!   generation on, which makes every thread's front entries of this store stale at once:
//!   the front never answers with anything moka no longer would, except an entry moka
//!   evicted for room, which the front may keep answering (it is still fresh, the layer
//!   checks) until its slot is reused;
//! - only entries of at most [`FRONT_MAX_BODY`] bytes go to the front, so what it keeps
//!   past eviction is bounded ([`FRONT_SLOTS`] such entries per thread);
//! - one front hit in [`RECORD_EVERY`] goes to moka anyway, so that moka still sees which
//!   entries are read and does not evict the busiest as idle.

use std::cell::RefCell;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::sync::Cache;

use super::{BoxFuture, Entry, Store, StoreError, Stored};
use crate::cache::key::Key;

/// Slots in each thread's front (a power of two).
const FRONT_SLOTS: usize = 64;
/// The largest body an entry may have to go to the front.
const FRONT_MAX_BODY: usize = 16 * 1024;
/// One front hit in this many is looked up in moka too.
const RECORD_EVERY: u32 = 16;
/// A lookup that finds another entry in its front slot takes the slot over only one time
/// in this many, so two busy keys that share a slot do not copy their keys on every hit.
const TAKE_OVER_EVERY: u32 = 8;

/// Numbers the stores, so that a thread's front tells their entries apart.
static NEXT_STORE: AtomicU64 = AtomicU64::new(1);

struct FrontSlot {
    store: u64,
    generation: u64,
    hash: u64,
    key: Key,
    entry: Arc<Entry>,
}

struct Front {
    slots: [Option<FrontSlot>; FRONT_SLOTS],
    tick: u32,
}

thread_local! {
    static FRONT: RefCell<Front> = const {
        RefCell::new(Front {
            slots: [const { None }; FRONT_SLOTS],
            tick: 0,
        })
    };
}

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
    /// This store's number in the threads' fronts.
    id: u64,
    /// Moves on after every change; front entries of an older generation are stale.
    generation: AtomicU64,
    /// Picks front slots.
    front_hasher: hashbrown::DefaultHashBuilder,
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
            id: NEXT_STORE.fetch_add(1, Ordering::Relaxed),
            generation: AtomicU64::new(0),
            front_hasher: hashbrown::DefaultHashBuilder::default(),
        }
    }

    /// Forgets every entry (and makes every thread's front copies stale).
    #[cfg(feature = "redis")]
    pub(crate) fn clear(&self) {
        self.cache.invalidate_all();
        self.changed();
    }

    /// Makes every front entry of this store stale. Called after the change, so that a
    /// lookup that read moka before it is tagged with the old generation.
    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether this thread's front holds `key` (for tests).
    #[cfg(test)]
    fn front_holds(&self, key: &[u8]) -> bool {
        let hash = self.front_hasher.hash_one(key);
        let generation = self.generation.load(Ordering::Acquire);
        FRONT.with(|front| {
            front.borrow().slots[hash as usize & (FRONT_SLOTS - 1)]
                .as_ref()
                .is_some_and(|s| s.store == self.id && s.generation == generation && *s.key == *key)
        })
    }

    /// The lookup: this thread's front first, then moka (which the result may be
    /// promoted from).
    fn lookup(&self, key: &[u8]) -> Option<Stored> {
        let hash = self.front_hasher.hash_one(key);
        // Read before moka, so that a change made meanwhile leaves what we promote stale.
        let generation = self.generation.load(Ordering::Acquire);
        let index = hash as usize & (FRONT_SLOTS - 1);
        // `try_with`: a thread being torn down has no front; moka answers alone then.
        let (found, tick) = FRONT
            .try_with(|front| {
                let mut front = front.borrow_mut();
                front.tick = front.tick.wrapping_add(1);
                let tick = front.tick;
                let found = front.slots[index]
                    .as_ref()
                    .filter(|s| {
                        s.store == self.id
                            && s.generation == generation
                            && s.hash == hash
                            && *s.key == *key
                    })
                    .map(|s| s.entry.clone());
                (found, tick)
            })
            .unwrap_or((None, 1));
        if let Some(entry) = found {
            if tick % RECORD_EVERY != 0 {
                return Some(Stored::Response(entry));
            }
            // Let moka see the read; the front entry is still the answer.
            let _ = self.cache.get(key);
            return Some(Stored::Response(entry));
        }
        let value = self.cache.get(key).map(|slot| slot.value);
        if let Some(Stored::Response(entry)) = &value
            && entry.body.len() <= FRONT_MAX_BODY
        {
            let _ = FRONT.try_with(|front| {
                let mut front = front.borrow_mut();
                let slot = &mut front.slots[index];
                let free = slot
                    .as_ref()
                    .is_none_or(|s| s.store != self.id || s.generation != generation);
                if free || tick % TAKE_OVER_EVERY == 0 {
                    *slot = Some(FrontSlot {
                        store: self.id,
                        generation,
                        hash,
                        key: key.into(),
                        entry: entry.clone(),
                    });
                }
            });
        }
        value
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
        Some(self.lookup(key))
    }

    fn get<'a>(&'a self, key: &'a [u8]) -> BoxFuture<'a, Result<Option<Stored>, StoreError>> {
        let found = self.cache.get(key).map(|slot| slot.value);
        Box::pin(std::future::ready(Ok(found)))
    }

    fn put(&self, key: Key, value: Stored, ttl: Duration) -> BoxFuture<'_, Result<(), StoreError>> {
        if !ttl.is_zero() {
            self.cache.insert(key, Slot { value, ttl });
            self.changed();
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn remove<'a>(&'a self, key: &'a [u8]) -> BoxFuture<'a, Result<(), StoreError>> {
        self.cache.invalidate(key);
        self.changed();
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
    async fn the_front_answers_repeated_lookups_and_never_outlives_a_change() {
        let store = MemoryStore::new(1 << 20);
        let first = entry(10);
        store
            .put(key("a"), first.clone(), Duration::from_secs(60))
            .await
            .unwrap();
        assert!(!store.front_holds(b"a"), "nothing looked up yet");
        let Some(Some(Stored::Response(found))) = store.get_now(b"a") else {
            panic!("a stored entry")
        };
        assert!(store.front_holds(b"a"), "a hit goes to the front");
        let Stored::Response(first) = first else {
            unreachable!()
        };
        assert!(Arc::ptr_eq(&found, &first));
        // Front hits (and the one in RECORD_EVERY that asks moka) all give the entry.
        for _ in 0..2 * RECORD_EVERY {
            let Some(Some(Stored::Response(again))) = store.get_now(b"a") else {
                panic!("still stored")
            };
            assert!(Arc::ptr_eq(&again, &first));
        }

        // A new entry under the key: never the old one again, on this thread...
        let second = entry(20);
        store
            .put(key("a"), second, Duration::from_secs(60))
            .await
            .unwrap();
        assert!(!store.front_holds(b"a"), "a put makes the front stale");
        let Some(Some(Stored::Response(now))) = store.get_now(b"a") else {
            panic!("the new entry")
        };
        assert_eq!(now.body.len(), 20);

        // ...nor on another thread whose front held the old one.
        let store = Arc::new(store);
        let (to_thread, from_main) = std::sync::mpsc::channel::<()>();
        let (to_main, from_thread) = std::sync::mpsc::channel::<bool>();
        let other = {
            let store = store.clone();
            std::thread::spawn(move || {
                store.get_now(b"a");
                to_main.send(store.front_holds(b"a")).unwrap();
                from_main.recv().unwrap();
                to_main
                    .send(matches!(store.get_now(b"a"), Some(None)))
                    .unwrap();
            })
        };
        assert!(
            from_thread.recv().unwrap(),
            "the other thread's front holds it"
        );
        store.remove(b"a").await.unwrap();
        to_thread.send(()).unwrap();
        assert!(
            from_thread.recv().unwrap(),
            "a removed key is a miss on every thread"
        );
        other.join().unwrap();

        // Large entries are not copied to the front; another store's entries never mix.
        store
            .put(
                key("big"),
                entry(FRONT_MAX_BODY + 1),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        assert!(matches!(store.get_now(b"big"), Some(Some(_))));
        assert!(!store.front_holds(b"big"));
        let other_store = MemoryStore::new(1 << 20);
        store
            .put(key("k"), entry(1), Duration::from_secs(60))
            .await
            .unwrap();
        assert!(matches!(store.get_now(b"k"), Some(Some(_))));
        assert!(matches!(other_store.get_now(b"k"), Some(None)));
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
