//! The in-memory backend: GCRA state per key in a sharded, bounded table.
//!
//! Why not `governor`'s keyed limiter: it charges one quota at a time, so several policies
//! cannot be checked and charged all-or-nothing, and its keyed state grows without bound.
//! This table keeps one small entry per key (a theoretical arrival time per policy, in a
//! fixed array) and never holds more than `max_keys` entries:
//!
//! - an entry whose every bucket is full again carries no information, so it may go; such
//!   idle entries are swept lazily, by the traffic that needs room, never by a thread;
//! - when a shard is full of keys that are still being limited, no entry is dropped (that
//!   would hand a fresh quota to a key under limitation); the new key is charged to one
//!   shared *overflow* bucket instead, so it is still limited (annotated as
//!   [`LimitSource::Overflow`]).

use std::hash::{BuildHasher, Hash};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use hashbrown::{DefaultHashBuilder, HashTable};

use super::gcra::{Backend, Check, Decision, PoliciesRef, charge, check_all};
use super::policy::{Limit, MAX_POLICIES};
use crate::annotate::LimitSource;

/// Where an in-memory limiter reads the time.
///
/// [`Clock::fast`] (the default) reads the processor's time-stamp counter where it is
/// reliable (through `quanta`, as `governor` does), a few nanoseconds cheaper than the OS
/// clock on every request. [`Clock::tokio`] reads tokio's clock, which tests can stop and
/// move with `tokio::time::pause` and `tokio::time::advance`.
#[derive(Clone, Debug)]
pub struct Clock(ClockKind);

#[derive(Clone, Debug)]
enum ClockKind {
    Fast { clock: quanta::Clock, base: u64 },
    Tokio { base: tokio::time::Instant },
    Manual(Arc<AtomicU64>),
}

/// The hand that moves a [`Clock::manual`].
#[derive(Clone, Debug)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(by.as_nanos() as u64, Ordering::SeqCst);
    }
}

impl Clock {
    /// The fast monotonic clock (the default).
    pub fn fast() -> Self {
        let clock = quanta::Clock::new();
        let base = clock.raw();
        Clock(ClockKind::Fast { clock, base })
    }

    /// tokio's clock: follows `tokio::time::pause` and `advance` in tests.
    pub fn tokio() -> Self {
        Clock(ClockKind::Tokio {
            base: tokio::time::Instant::now(),
        })
    }

    /// A clock that only moves when told to, through the returned [`ManualClock`].
    pub fn manual() -> (Self, ManualClock) {
        let ticks = Arc::new(AtomicU64::new(0));
        (Clock(ClockKind::Manual(ticks.clone())), ManualClock(ticks))
    }

    /// Nanoseconds since the clock was made, plus one (0 means "a fresh bucket").
    #[inline]
    fn now(&self) -> u64 {
        match &self.0 {
            ClockKind::Fast { clock, base } => clock.delta_as_nanos(*base, clock.raw()) + 1,
            ClockKind::Tokio { base } => base.elapsed().as_nanos() as u64 + 1,
            ClockKind::Manual(ticks) => ticks.load(Ordering::SeqCst) + 1,
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::fast()
    }
}

/// Default cap on the keys one in-memory limiter tracks.
pub const DEFAULT_MAX_KEYS: usize = 100_000;

const MAX_SHARDS: usize = 64;

struct Entry<K, const N: usize> {
    key: K,
    tats: [u64; N],
}

struct Shard<K, const N: usize> {
    table: HashTable<Entry<K, N>>,
    cap: usize,
    /// No entry can be idle before this time (nanoseconds), so a sweep before it is useless.
    next_sweep: u64,
}

impl<K, const N: usize> Shard<K, N> {
    fn sweep(&mut self, now: u64) {
        if now < self.next_sweep {
            return;
        }
        let mut earliest = u64::MAX;
        self.table.retain(|e| {
            // Idle once every bucket is full again.
            let at = e.tats.iter().copied().max().unwrap_or(0);
            if at <= now {
                false
            } else {
                earliest = earliest.min(at);
                true
            }
        });
        self.next_sweep = earliest;
    }
}

/// The sharded table for layers of up to `N` policies: entries hold exactly `N` arrival
/// times, so a one-policy layer pays 8 bytes of state per key, not 32.
struct Table<K, const N: usize> {
    shards: Box<[Mutex<Shard<K, N>>]>,
    shard_mask: usize,
    overflow: Mutex<[u64; N]>,
}

impl<K, const N: usize> Table<K, N> {
    fn new(max_keys: usize) -> Self {
        // A power of two no larger than the cap, so every shard holds at least one key.
        let shards = MAX_SHARDS.min(1 << max_keys.ilog2());
        let per = max_keys / shards;
        let extra = max_keys % shards;
        let shards: Box<[_]> = (0..shards)
            .map(|i| {
                Mutex::new(Shard {
                    table: HashTable::new(),
                    cap: per + usize::from(i < extra),
                    next_sweep: 0,
                })
            })
            .collect();
        Self {
            shard_mask: shards.len() - 1,
            shards,
            overflow: Mutex::new([0; N]),
        }
    }

    fn tracked(&self) -> usize {
        self.shards.iter().map(|s| s.lock().table.len()).sum()
    }

    /// Runs `f` on the state of `key` (creating it when `f` allows the request, or
    /// charging the overflow bucket when the shard is full of keys still being limited).
    /// `f` returns its result and whether the request was allowed.
    #[inline]
    fn with_entry<R>(
        &self,
        key: &K,
        hash: u64,
        now: u64,
        hasher: &DefaultHashBuilder,
        f: impl FnOnce(&mut [u64], u64, LimitSource) -> (R, bool),
    ) -> R
    where
        K: Hash + Eq + Clone,
    {
        // hashbrown indexes buckets with the low bits and tags them with the top 7, so the
        // shard comes from bits in between.
        let shard = &self.shards[(hash >> 32) as usize & self.shard_mask];
        let mut shard = shard.lock();
        if let Some(entry) = shard.table.find_mut(hash, |e| e.key == *key) {
            return f(&mut entry.tats, now, LimitSource::Memory).0;
        }
        if shard.table.len() >= shard.cap {
            shard.sweep(now);
            if shard.table.len() >= shard.cap {
                drop(shard);
                let mut tats = self.overflow.lock();
                return f(&mut *tats, now, LimitSource::Overflow).0;
            }
        }
        let mut tats = [0; N];
        let (result, allowed) = f(&mut tats, now, LimitSource::Memory);
        if allowed {
            // The new key may go idle before any key the last sweep kept (or the table was
            // empty then): the next sweep may not wait past it.
            let idle_at = tats.iter().copied().max().unwrap_or(0);
            shard.next_sweep = shard.next_sweep.min(idle_at);
            // The hash is not stored (smaller entries, fewer cache misses); growing the
            // table, which is rare, hashes the keys again.
            shard.table.insert_unique(
                hash,
                Entry {
                    key: key.clone(),
                    tats,
                },
                |e| hasher.hash_one(&e.key),
            );
        }
        result
    }
}

enum Tables<K> {
    One(Table<K, 1>),
    Two(Table<K, 2>),
    Four(Table<K, MAX_POLICIES>),
}

/// GCRA state in memory, bounded to a number of keys. Cheap to share: clone the layer.
pub struct MemoryBackend<K> {
    tables: Tables<K>,
    hasher: DefaultHashBuilder,
    clock: Clock,
    max_keys: usize,
}

impl<K> std::fmt::Debug for MemoryBackend<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBackend")
            .field("max_keys", &self.max_keys)
            .field("tracked_keys", &self.tracked_keys())
            .finish()
    }
}

impl<K> MemoryBackend<K> {
    /// A table that tracks at most `max_keys` keys (at least 1), for layers of up to
    /// [`MAX_POLICIES`] policies.
    pub fn new(max_keys: usize) -> Self {
        Self::for_policies(max_keys, MAX_POLICIES)
    }

    /// A table sized for layers of at most `policies` policies (the layer builder knows
    /// how many and picks the smallest entries that fit).
    pub(crate) fn for_policies(max_keys: usize, policies: usize) -> Self {
        let max_keys = max_keys.max(1);
        let tables = match policies {
            0 | 1 => Tables::One(Table::new(max_keys)),
            2 => Tables::Two(Table::new(max_keys)),
            _ => Tables::Four(Table::new(max_keys)),
        };
        Self {
            tables,
            hasher: DefaultHashBuilder::default(),
            clock: Clock::fast(),
            max_keys,
        }
    }

    /// Reads the time from `clock` (for example [`Clock::tokio`] in tests).
    #[must_use]
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// How many keys are tracked now.
    pub fn tracked_keys(&self) -> usize {
        match &self.tables {
            Tables::One(t) => t.tracked(),
            Tables::Two(t) => t.tracked(),
            Tables::Four(t) => t.tracked(),
        }
    }

    /// The cap on tracked keys.
    pub fn max_keys(&self) -> usize {
        self.max_keys
    }
}

impl<K> Default for MemoryBackend<K> {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_KEYS)
    }
}

impl<K: Hash + Eq + Clone> MemoryBackend<K> {
    #[inline]
    fn with_entry<R>(
        &self,
        key: &K,
        limits: &[Limit],
        f: impl FnOnce(&mut [u64], u64, LimitSource) -> (R, bool),
    ) -> R {
        let now = self.clock.now();
        let hash = self.hasher.hash_one(key);
        let h = &self.hasher;
        match &self.tables {
            Tables::One(t) if limits.len() <= 1 => t.with_entry(key, hash, now, h, f),
            Tables::Two(t) if limits.len() <= 2 => t.with_entry(key, hash, now, h, f),
            Tables::Four(t) => t.with_entry(key, hash, now, h, f),
            // The layer builder sizes the table for its policies, and `new` sizes it for
            // the most a layer may hold, so a narrower table never meets more policies.
            _ => unreachable!("rate-limit table narrower than the layer's policies"),
        }
    }

    /// Checks and charges `key`, with every detail of the decision.
    pub(crate) fn decide(&self, key: &K, limits: &[Limit], cost: u32) -> Decision {
        self.with_entry(key, limits, |tats, now, source| {
            let decision = check_all(tats, limits, now, cost, source);
            (decision, decision.allowed)
        })
    }

    /// Checks and charges `key`; `None` means allowed (no details made: the hot path),
    /// `Some` a refusal with its details.
    pub(crate) fn decide_quietly(&self, key: &K, limits: &[Limit], cost: u32) -> Option<Decision> {
        self.with_entry(key, limits, |tats, now, source| {
            if charge(tats, limits, now, cost) {
                (None, true)
            } else {
                (Some(check_all(tats, limits, now, cost, source)), false)
            }
        })
    }
}

impl<K> Backend<K> for MemoryBackend<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    fn check(&self, _layer: &str, key: &K, policies: &PoliciesRef<'_>, cost: u32) -> Check {
        let limits = policies.inner.limits();
        if policies.details {
            return Check::Ready(Ok(self.decide(key, &limits, cost)));
        }
        match self.decide_quietly(key, &limits, cost) {
            None => Check::Allowed,
            Some(refusal) => Check::Ready(Ok(refusal)),
        }
    }
}

impl<K, B: Backend<K>> Backend<K> for std::sync::Arc<B> {
    fn check(&self, layer: &str, key: &K, policies: &PoliciesRef<'_>, cost: u32) -> Check {
        (**self).check(layer, key, policies, cost)
    }

    fn source(&self) -> crate::annotate::LimitSource {
        (**self).source()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate_limit::Quota;

    #[test]
    fn bounded_table_keeps_limited_keys_limited() {
        let limits = [Quota::requests_per(3, Duration::from_secs(60))
            .validate()
            .unwrap()];
        let (clock, hand) = Clock::manual();
        let backend = MemoryBackend::<u32>::new(1000).with_clock(clock);
        // Key 0 uses up its quota.
        for _ in 0..3 {
            assert!(backend.decide(&0, &limits, 1).allowed);
        }
        assert!(!backend.decide(&0, &limits, 1).allowed);
        // Ten times the cap in new keys.
        let mut overflowed = 0;
        for k in 1..=10_000u32 {
            let d = backend.decide(&k, &limits, 1);
            if d.source == LimitSource::Overflow {
                overflowed += 1;
            }
        }
        assert_eq!(backend.tracked_keys(), 1000);
        assert!(overflowed > 0);
        assert!(!backend.decide(&0, &limits, 1).allowed, "still limited");
        // Once the buckets are full again, the idle keys make room.
        hand.advance(Duration::from_secs(61));
        for k in 20_000..20_100u32 {
            assert_eq!(backend.decide(&k, &limits, 1).source, LimitSource::Memory);
        }
        assert!(backend.tracked_keys() <= 1000);
    }

    /// A sweep that empties a shard, or leaves only keys limited for long, must not put
    /// the next sweep off past keys inserted after it: those go idle sooner, and new
    /// clients need their room (else they share the overflow bucket).
    #[test]
    fn keys_inserted_after_a_sweep_are_swept_when_idle() {
        let limits = [Quota::requests_per(10, Duration::from_secs(86_400))
            .validate()
            .unwrap()];
        let (clock, hand) = Clock::manual();
        let backend = MemoryBackend::<u32>::new(1).with_clock(clock);
        let hour = Duration::from_secs(3600);
        // A light key, idle after 2.4 h; three hours on, the sweep for the next key
        // empties the table.
        assert_eq!(backend.decide(&1, &limits, 1).source, LimitSource::Memory);
        hand.advance(3 * hour);
        assert_eq!(backend.decide(&2, &limits, 1).source, LimitSource::Memory);
        // Key 2 is idle 2.4 h later: a new key three hours on gets its room.
        hand.advance(3 * hour);
        assert_eq!(backend.decide(&3, &limits, 1).source, LimitSource::Memory);
        // A heavy key in a table of one: light keys inserted after it are swept in turn.
        hand.advance(3 * hour);
        for _ in 0..10 {
            assert!(backend.decide(&4, &limits, 1).allowed);
        }
        hand.advance(25 * hour);
        assert_eq!(backend.decide(&5, &limits, 1).source, LimitSource::Memory);
        hand.advance(3 * hour);
        assert_eq!(backend.decide(&6, &limits, 1).source, LimitSource::Memory);
    }

    #[test]
    fn tiny_caps_work() {
        let t = Table::<u8, 1>::new(1);
        assert_eq!(t.shards.len(), 1);
        let t = Table::<u8, 1>::new(100);
        assert_eq!(t.shards.len(), 64);
        let total: usize = t.shards.iter().map(|s| s.lock().cap).sum();
        assert_eq!(total, 100);
    }
}
