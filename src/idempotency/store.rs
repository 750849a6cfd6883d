//! Where idempotency records live: the [`IdempotencyStore`] trait and the in-memory
//! [`MemoryStore`]. The Redis store ([`super::RedisIdempotencyStore`], feature `redis`)
//! obeys the same contract.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use super::record::{FrameError, StoredResponse};

/// The boxed future a store returns (a memory store answers at once, Redis later).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The scope of an idempotency key: SHA-256 of the principal, the method, the route and the
/// key itself, each length-prefixed. Stores key their records on it; it carries no client
/// bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope([u8; 32]);

impl Scope {
    /// A scope from its 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex, 64 characters (what the Redis store names its keys with).
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scope({})", self.to_hex())
    }
}

/// What makes two requests "the same request": SHA-256 of the method, the path and query,
/// the chosen headers and the body.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// A fingerprint from its 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", hex(&self.0))
    }
}

/// The random 128-bit token of one in-flight claim. Only the request holding it may
/// complete or release the record, so a worker whose lease ran out (and whose key another
/// request claimed since) cannot touch it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct OwnerToken([u8; 16]);

impl OwnerToken {
    /// A token from its 16 bytes.
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    /// The 16 bytes.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }

    /// A fresh token from the operating system's random generator.
    pub(crate) fn generate() -> Result<Self, StoreError> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).map_err(|e| {
            StoreError::Unreachable(format!("no randomness for an owner token: {e}"))
        })?;
        Ok(Self(bytes))
    }
}

impl fmt::Debug for OwnerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Unguessability is the whole point: it is never printed.
        f.write_str("OwnerToken(..)")
    }
}

/// What a claim found.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
// Made once per keyed request and matched at once: a box would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Claim {
    /// There was no record: an in-flight record with the caller's fingerprint and owner
    /// token now holds the key for the lease.
    Acquired,
    /// A request with the same fingerprint holds the key and has not finished.
    InFlight,
    /// The key is held or was completed by a request with another fingerprint.
    Mismatch,
    /// A request with the same fingerprint completed: its response.
    Completed(StoredResponse),
}

/// Why a store could not answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store is unreachable or failed (a store of your own reports it this way).
    #[error("the idempotency store is unreachable: {0}")]
    Unreachable(String),
    /// A bounded store is full of requests still in flight, and cannot take another.
    #[error("the idempotency store is full of requests in flight")]
    Full,
    /// A stored record could not be read.
    #[error("a stored idempotency record is unreadable: {0}")]
    Corrupt(#[from] FrameError),
    /// Redis failed, timed out or its circuit breaker is open.
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    #[error(transparent)]
    Redis(#[from] crate::redis::StoreError),
}

/// Where idempotency records live. Each method is one atomic step.
///
/// The contract every store obeys (the memory and Redis stores are tested against it):
///
/// - [`claim`](Self::claim): no live record under `scope` → write an in-flight record
///   `{fingerprint, owner}` that lives for `lease`, and return [`Claim::Acquired`]; a
///   record with another fingerprint → [`Claim::Mismatch`]; an in-flight one with the same
///   fingerprint → [`Claim::InFlight`]; a completed one → [`Claim::Completed`].
/// - [`complete`](Self::complete): only if the record under `scope` is in flight **and
///   carries `owner`**, replace it with the completed response, kept for `retention`, and
///   return `true`; otherwise change nothing and return `false` (fencing: a request whose
///   lease expired, and whose key was claimed again since, cannot overwrite it).
/// - [`release`](Self::release): only if the record is in flight and carries `owner`,
///   delete it (the key may be used again at once) and return `true`.
/// - [`extend`](Self::extend): only if the record is in flight and carries `owner`, make
///   it live for `lease` from now and return `true` (the layer renews the claim of a
///   request that is still running, every third of the lease).
///
/// An expired record does not exist.
pub trait IdempotencyStore: Send + Sync + 'static {
    /// Claims `scope` for a request with `fingerprint`, or reports what holds it.
    fn claim<'a>(
        &'a self,
        scope: &'a Scope,
        fingerprint: &'a Fingerprint,
        owner: &'a OwnerToken,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>>;

    /// Stores `response` as the outcome of the claim `owner` holds (fenced).
    fn complete<'a>(
        &'a self,
        scope: &'a Scope,
        owner: &'a OwnerToken,
        response: &'a StoredResponse,
        retention: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Gives up the claim `owner` holds (fenced).
    fn release<'a>(
        &'a self,
        scope: &'a Scope,
        owner: &'a OwnerToken,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;

    /// Renews the claim `owner` holds for another `lease` (fenced).
    fn extend<'a>(
        &'a self,
        scope: &'a Scope,
        owner: &'a OwnerToken,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>>;
}

impl<T: IdempotencyStore + ?Sized> IdempotencyStore for Arc<T> {
    fn claim<'a>(
        &'a self,
        scope: &'a Scope,
        fingerprint: &'a Fingerprint,
        owner: &'a OwnerToken,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        (**self).claim(scope, fingerprint, owner, lease)
    }

    fn complete<'a>(
        &'a self,
        scope: &'a Scope,
        owner: &'a OwnerToken,
        response: &'a StoredResponse,
        retention: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        (**self).complete(scope, owner, response, retention)
    }

    fn release<'a>(
        &'a self,
        scope: &'a Scope,
        owner: &'a OwnerToken,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        (**self).release(scope, owner)
    }

    fn extend<'a>(
        &'a self,
        scope: &'a Scope,
        owner: &'a OwnerToken,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        (**self).extend(scope, owner, lease)
    }
}

/// Default cap of [`MemoryStore`] records.
pub const DEFAULT_MAX_ENTRIES: usize = 100_000;
/// Default cap of [`MemoryStore`] bytes (bodies, headers and bookkeeping): 64 MiB.
pub const DEFAULT_MAX_BYTES: usize = 64 * 1024 * 1024;

/// What an in-flight record costs, roughly, besides nothing else.
const IN_FLIGHT_WEIGHT: usize = 160;

enum State {
    InFlight { owner: OwnerToken },
    // Boxed: most slots of a busy table are small in-flight records.
    Completed(Box<StoredResponse>),
}

struct Slot {
    fingerprint: Fingerprint,
    state: State,
    expires: Instant,
    /// Position in the expiry index (`expires`, `seq`): unique, so the index is exact.
    seq: u64,
    weight: usize,
}

#[derive(Default)]
struct Table {
    slots: HashMap<Scope, Slot>,
    /// Every record by when it expires, soonest first: expired records are dropped from the
    /// front on every call (a sweep costs what it removes), and eviction under pressure
    /// takes the completed records nearest their end.
    expiries: BTreeMap<(Instant, u64), Scope>,
    next_seq: u64,
    bytes: usize,
}

impl Table {
    fn sweep(&mut self, now: Instant) {
        while let Some(entry) = self.expiries.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let scope = entry.remove();
            if let Some(slot) = self.slots.remove(&scope) {
                self.bytes -= slot.weight;
            }
        }
    }

    fn remove(&mut self, scope: &Scope) -> Option<Slot> {
        let slot = self.slots.remove(scope)?;
        self.expiries.remove(&(slot.expires, slot.seq));
        self.bytes -= slot.weight;
        Some(slot)
    }

    fn insert(&mut self, scope: Scope, fingerprint: Fingerprint, state: State, expires: Instant) {
        let weight = match &state {
            State::InFlight { .. } => IN_FLIGHT_WEIGHT,
            State::Completed(response) => response.weight() + IN_FLIGHT_WEIGHT,
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        self.expiries.insert((expires, seq), scope);
        self.bytes += weight;
        self.slots.insert(
            scope,
            Slot {
                fingerprint,
                state,
                expires,
                seq,
                weight,
            },
        );
    }

    /// Evicts completed records, nearest their end first, until `entries` more records of
    /// `bytes` more bytes fit. In-flight records are never evicted: that would let a second
    /// copy of a running request start. `false` when they cannot be made to fit.
    fn make_room(&mut self, limits: &Limits, entries: usize, bytes: usize, keep: &Scope) -> bool {
        let fits = |t: &Table| {
            t.slots.len() + entries <= limits.max_entries && t.bytes + bytes <= limits.max_bytes
        };
        if fits(self) {
            return true;
        }
        let victims: Vec<Scope> = {
            let mut need_entries = (self.slots.len() + entries).saturating_sub(limits.max_entries);
            let mut need_bytes = (self.bytes + bytes).saturating_sub(limits.max_bytes);
            let mut out = Vec::new();
            for scope in self.expiries.values() {
                if need_entries == 0 && need_bytes == 0 {
                    break;
                }
                if scope == keep {
                    continue;
                }
                let Some(slot) = self.slots.get(scope) else {
                    continue;
                };
                if matches!(slot.state, State::Completed(_)) {
                    need_entries = need_entries.saturating_sub(1);
                    need_bytes = need_bytes.saturating_sub(slot.weight);
                    out.push(*scope);
                }
            }
            if need_entries > 0 || need_bytes > 0 {
                return false;
            }
            out
        };
        for scope in &victims {
            self.remove(scope);
        }
        true
    }
}

struct Limits {
    max_entries: usize,
    max_bytes: usize,
}

struct MemoryInner {
    table: Mutex<Table>,
    limits: Limits,
}

/// Idempotency records in this process's memory: for one instance of a service, or tests.
///
/// Bounded in records ([`max_entries`](Self::max_entries), 100,000 by default) and in bytes
/// ([`max_bytes`](Self::max_bytes), 64 MiB by default). Expired records are dropped on every
/// call, soonest first, so no background task is needed and none is spawned. When a new
/// record does not fit, completed records nearest their expiry are evicted (a retry of an
/// evicted key runs again); in-flight records are never evicted, and when only they fill
/// the store a claim fails with [`StoreError::Full`] (the layer's
/// [`FailurePolicy`](super::FailurePolicy) then decides). A completed response larger than
/// the whole byte bound is not kept: its key is released.
///
/// Time is `tokio::time::Instant`, so tests can control it with `tokio::time::pause`.
/// Clones share the records.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<MemoryInner>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("max_entries", &self.inner.limits.max_entries)
            .field("max_bytes", &self.inner.limits.max_bytes)
            .field("len", &self.len())
            .finish()
    }
}

impl MemoryStore {
    /// A store with the default bounds.
    pub fn new() -> Self {
        Self::with_limits(DEFAULT_MAX_ENTRIES, DEFAULT_MAX_BYTES)
    }

    fn with_limits(max_entries: usize, max_bytes: usize) -> Self {
        Self {
            inner: Arc::new(MemoryInner {
                table: Mutex::new(Table::default()),
                limits: Limits {
                    max_entries: max_entries.max(1),
                    max_bytes: max_bytes.max(1),
                },
            }),
        }
    }

    /// Holds at most `max` records (default 100,000; at least 1).
    #[must_use]
    pub fn max_entries(self, max: usize) -> Self {
        Self::with_limits(max, self.inner.limits.max_bytes)
    }

    /// Holds at most about `max` bytes of records (default 64 MiB; at least 1).
    #[must_use]
    pub fn max_bytes(self, max: usize) -> Self {
        Self::with_limits(self.inner.limits.max_entries, max)
    }

    /// How many live records it holds (expired ones are dropped first).
    pub fn len(&self) -> usize {
        let mut table = self.inner.table.lock();
        table.sweep(Instant::now());
        table.slots.len()
    }

    /// Whether it holds no live record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// About how many bytes its live records take.
    pub fn weighted_size(&self) -> usize {
        let mut table = self.inner.table.lock();
        table.sweep(Instant::now());
        table.bytes
    }

    fn claim_now(
        &self,
        scope: &Scope,
        fingerprint: &Fingerprint,
        owner: &OwnerToken,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let now = Instant::now();
        let mut table = self.inner.table.lock();
        table.sweep(now);
        if let Some(slot) = table.slots.get(scope) {
            return Ok(if slot.fingerprint != *fingerprint {
                Claim::Mismatch
            } else {
                match &slot.state {
                    State::InFlight { .. } => Claim::InFlight,
                    State::Completed(response) => Claim::Completed((**response).clone()),
                }
            });
        }
        if !table.make_room(&self.inner.limits, 1, IN_FLIGHT_WEIGHT, scope) {
            return Err(StoreError::Full);
        }
        table.insert(
            *scope,
            *fingerprint,
            State::InFlight { owner: *owner },
            now + lease,
        );
        Ok(Claim::Acquired)
    }

    fn complete_now(
        &self,
        scope: &Scope,
        owner: &OwnerToken,
        response: &StoredResponse,
        retention: Duration,
    ) -> bool {
        let now = Instant::now();
        let mut table = self.inner.table.lock();
        table.sweep(now);
        let Some(slot) = table.slots.get(scope) else {
            return false;
        };
        if !matches!(slot.state, State::InFlight { owner: o } if o == *owner) {
            return false;
        }
        let fingerprint = slot.fingerprint;
        let weight = response.weight() + IN_FLIGHT_WEIGHT;
        table.remove(scope);
        if weight > self.inner.limits.max_bytes
            || !table.make_room(&self.inner.limits, 1, weight, scope)
        {
            // It cannot be kept: the key is released (our claim is gone with it).
            return false;
        }
        table.insert(
            *scope,
            fingerprint,
            State::Completed(Box::new(response.clone())),
            now + retention,
        );
        true
    }

    fn extend_now(&self, scope: &Scope, owner: &OwnerToken, lease: Duration) -> bool {
        let now = Instant::now();
        let mut table = self.inner.table.lock();
        table.sweep(now);
        let owned = table
            .slots
            .get(scope)
            .is_some_and(|slot| matches!(slot.state, State::InFlight { owner: o } if o == *owner));
        if owned && let Some(slot) = table.remove(scope) {
            table.insert(*scope, slot.fingerprint, slot.state, now + lease);
        }
        owned
    }

    fn release_now(&self, scope: &Scope, owner: &OwnerToken) -> bool {
        let mut table = self.inner.table.lock();
        table.sweep(Instant::now());
        let owned = table
            .slots
            .get(scope)
            .is_some_and(|slot| matches!(slot.state, State::InFlight { owner: o } if o == *owner));
        if owned {
            table.remove(scope);
        }
        owned
    }
}

impl IdempotencyStore for MemoryStore {
    fn claim<'a>(
        &'a self,
        scope: &'a Scope,
        fingerprint: &'a Fingerprint,
        owner: &'a OwnerToken,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        Box::pin(std::future::ready(self.claim_now(
            scope,
            fingerprint,
            owner,
            lease,
        )))
    }

    fn complete<'a>(
        &'a self,
        scope: &'a Scope,
        owner: &'a OwnerToken,
        response: &'a StoredResponse,
        retention: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(std::future::ready(Ok(
            self.complete_now(scope, owner, response, retention)
        )))
    }

    fn release<'a>(
        &'a self,
        scope: &'a Scope,
        owner: &'a OwnerToken,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(std::future::ready(Ok(self.release_now(scope, owner))))
    }

    fn extend<'a>(
        &'a self,
        scope: &'a Scope,
        owner: &'a OwnerToken,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(std::future::ready(Ok(self.extend_now(scope, owner, lease))))
    }
}

/// The contract of [`IdempotencyStore`], run against any store (the memory store here, the
/// Redis store in its own tests).
#[cfg(test)]
pub(crate) mod contract {
    use std::time::Duration;

    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    use super::*;

    pub(crate) fn scope(n: u8) -> Scope {
        Scope::from_bytes([n; 32])
    }

    pub(crate) fn fp(n: u8) -> Fingerprint {
        Fingerprint::from_bytes([n; 32])
    }

    pub(crate) fn owner(n: u8) -> OwnerToken {
        OwnerToken::from_bytes([n; 16])
    }

    pub(crate) fn response(body: &'static str) -> StoredResponse {
        let mut headers = HeaderMap::new();
        headers.insert("location", "/orders/1".parse().unwrap());
        StoredResponse::new(
            StatusCode::CREATED,
            headers,
            Bytes::from_static(body.as_bytes()),
        )
    }

    const LEASE: Duration = Duration::from_secs(60);
    const KEEP: Duration = Duration::from_secs(3600);

    /// Claim, in flight, mismatch, complete, replay, release, fencing.
    pub(crate) async fn claim_complete_release(store: &dyn IdempotencyStore) {
        let (s, f) = (scope(1), fp(1));
        assert_eq!(
            store.claim(&s, &f, &owner(1), LEASE).await.unwrap(),
            Claim::Acquired
        );
        // The same request again while the first runs, and another request with the key.
        assert_eq!(
            store.claim(&s, &f, &owner(2), LEASE).await.unwrap(),
            Claim::InFlight
        );
        assert_eq!(
            store.claim(&s, &fp(2), &owner(3), LEASE).await.unwrap(),
            Claim::Mismatch
        );
        // Only the owner renews it.
        assert!(!store.extend(&s, &owner(2), LEASE).await.unwrap());
        assert!(store.extend(&s, &owner(1), LEASE).await.unwrap());
        // Only the owner completes it.
        assert!(
            !store
                .complete(&s, &owner(2), &response("x"), KEEP)
                .await
                .unwrap()
        );
        assert!(!store.release(&s, &owner(2)).await.unwrap());
        assert!(
            store
                .complete(&s, &owner(1), &response("first"), KEEP)
                .await
                .unwrap()
        );
        match store.claim(&s, &f, &owner(4), LEASE).await.unwrap() {
            Claim::Completed(r) => {
                assert_eq!(r.status(), StatusCode::CREATED);
                assert_eq!(r.body(), "first");
                assert_eq!(r.headers()["location"], "/orders/1");
            }
            other => panic!("expected the stored response, got {other:?}"),
        }
        assert_eq!(
            store.claim(&s, &fp(9), &owner(5), LEASE).await.unwrap(),
            Claim::Mismatch
        );
        // A completed record is neither completed again, renewed, nor released.
        assert!(!store.extend(&s, &owner(1), LEASE).await.unwrap());
        assert!(
            !store
                .complete(&s, &owner(1), &response("again"), KEEP)
                .await
                .unwrap()
        );
        assert!(!store.release(&s, &owner(1)).await.unwrap());

        // Release: the key is free at once, for any request.
        let s2 = scope(2);
        assert_eq!(
            store.claim(&s2, &f, &owner(1), LEASE).await.unwrap(),
            Claim::Acquired
        );
        assert!(store.release(&s2, &owner(1)).await.unwrap());
        assert!(!store.release(&s2, &owner(1)).await.unwrap());
        assert_eq!(
            store.claim(&s2, &fp(7), &owner(2), LEASE).await.unwrap(),
            Claim::Acquired
        );
        // Completing a released claim does nothing.
        assert!(
            !store
                .complete(&s2, &owner(1), &response("late"), KEEP)
                .await
                .unwrap()
        );
        assert!(
            store
                .complete(&s2, &owner(2), &response("second"), KEEP)
                .await
                .unwrap()
        );
    }

    /// A lease that ran out frees the key; the worker that held it can no longer complete.
    /// `expire` makes the time pass (or the record expire) for the store under test.
    pub(crate) async fn stale_owner_is_fenced<F, Fut>(
        store: &dyn IdempotencyStore,
        lease: Duration,
        expire: F,
    ) where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let (s, f) = (scope(3), fp(3));
        assert_eq!(
            store.claim(&s, &f, &owner(1), lease).await.unwrap(),
            Claim::Acquired
        );
        expire().await;
        assert_eq!(
            store.claim(&s, &f, &owner(2), LEASE).await.unwrap(),
            Claim::Acquired
        );
        assert!(
            !store
                .complete(&s, &owner(1), &response("stale"), KEEP)
                .await
                .unwrap()
        );
        assert!(!store.release(&s, &owner(1)).await.unwrap());
        assert!(
            store
                .complete(&s, &owner(2), &response("fresh"), KEEP)
                .await
                .unwrap()
        );
        match store.claim(&s, &f, &owner(3), LEASE).await.unwrap() {
            Claim::Completed(r) => assert_eq!(r.body(), "fresh"),
            other => panic!("expected the fresh response, got {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::contract::*;
    use super::*;

    #[tokio::test]
    async fn memory_store_obeys_the_contract() {
        contract::claim_complete_release(&MemoryStore::new()).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewed_claim_outlives_its_first_lease() {
        let store = MemoryStore::new();
        let (s, f) = (scope(4), fp(4));
        let lease = Duration::from_secs(5);
        assert_eq!(
            store.claim(&s, &f, &owner(1), lease).await.unwrap(),
            Claim::Acquired
        );
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(store.extend(&s, &owner(1), lease).await.unwrap());
        tokio::time::advance(Duration::from_secs(4)).await;
        // 8 s after the claim, still held: a retry is in flight, not a second run.
        assert_eq!(
            store.claim(&s, &f, &owner(2), lease).await.unwrap(),
            Claim::InFlight
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!store.extend(&s, &owner(1), lease).await.unwrap());
        assert_eq!(
            store.claim(&s, &f, &owner(2), lease).await.unwrap(),
            Claim::Acquired
        );
    }

    #[tokio::test(start_paused = true)]
    async fn memory_store_fences_a_stale_owner() {
        let store = MemoryStore::new();
        contract::stale_owner_is_fenced(&store, Duration::from_secs(5), || {
            tokio::time::advance(Duration::from_secs(6))
        })
        .await;
    }

    #[tokio::test(start_paused = true)]
    async fn records_expire_and_are_swept() {
        let store = MemoryStore::new();
        let lease = Duration::from_secs(60);
        store
            .claim_now(&scope(1), &fp(1), &owner(1), lease)
            .unwrap();
        store
            .claim_now(&scope(2), &fp(1), &owner(2), lease)
            .unwrap();
        assert!(store.complete_now(
            &scope(2),
            &owner(2),
            &response("kept"),
            Duration::from_secs(3600)
        ));
        assert_eq!(store.len(), 2);
        tokio::time::advance(Duration::from_secs(61)).await;
        // The lease ran out: the in-flight record is gone, the completed one stays.
        assert_eq!(store.len(), 1);
        assert!(matches!(
            store
                .claim_now(&scope(2), &fp(1), &owner(3), lease)
                .unwrap(),
            Claim::Completed(_)
        ));
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(store.is_empty());
        assert_eq!(store.weighted_size(), 0);
        assert_eq!(
            store
                .claim_now(&scope(2), &fp(2), &owner(4), lease)
                .unwrap(),
            Claim::Acquired
        );
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_in_entries_evicting_completed_records_first() {
        let store = MemoryStore::new().max_entries(3);
        let lease = Duration::from_secs(60);
        for n in 1..=3u8 {
            assert_eq!(
                store
                    .claim_now(&scope(n), &fp(1), &owner(n), lease)
                    .unwrap(),
                Claim::Acquired
            );
        }
        // Full of requests in flight: nothing may be evicted.
        assert!(matches!(
            store.claim_now(&scope(4), &fp(1), &owner(4), lease),
            Err(StoreError::Full)
        ));
        // Completed records make way, the one nearest its end first.
        assert!(store.complete_now(
            &scope(1),
            &owner(1),
            &response("a"),
            Duration::from_secs(100)
        ));
        assert!(store.complete_now(
            &scope(2),
            &owner(2),
            &response("b"),
            Duration::from_secs(50)
        ));
        assert_eq!(
            store
                .claim_now(&scope(4), &fp(1), &owner(4), lease)
                .unwrap(),
            Claim::Acquired
        );
        assert_eq!(store.len(), 3);
        // Scope 2 (nearer its end) went; scope 1 is still replayed.
        assert!(matches!(
            store
                .claim_now(&scope(1), &fp(1), &owner(6), lease)
                .unwrap(),
            Claim::Completed(_)
        ));
        // Claiming scope 2 again evicts the last completed record ...
        assert_eq!(
            store
                .claim_now(&scope(2), &fp(1), &owner(5), lease)
                .unwrap(),
            Claim::Acquired
        );
        // ... and then only requests in flight are left.
        assert!(matches!(
            store.claim_now(&scope(1), &fp(1), &owner(7), lease),
            Err(StoreError::Full)
        ));
    }

    #[tokio::test]
    async fn bounded_in_bytes() {
        let store = MemoryStore::new().max_bytes(64 * 1024);
        let big = StoredResponse::new(
            http::StatusCode::OK,
            http::HeaderMap::new(),
            bytes::Bytes::from(vec![b'x'; 4096]),
        );
        for n in 0..100u8 {
            let s = Scope::from_bytes([n; 32]);
            store
                .claim_now(&s, &fp(1), &owner(n), Duration::from_secs(60))
                .unwrap();
            assert!(store.complete_now(&s, &owner(n), &big, Duration::from_secs(60)));
        }
        assert!(
            store.weighted_size() <= 64 * 1024,
            "{}",
            store.weighted_size()
        );
        // A response larger than the whole store is not kept, and its key is released.
        let huge = StoredResponse::new(
            http::StatusCode::OK,
            http::HeaderMap::new(),
            bytes::Bytes::from(vec![b'x'; 128 * 1024]),
        );
        let s = scope(200);
        store
            .claim_now(&s, &fp(1), &owner(1), Duration::from_secs(60))
            .unwrap();
        assert!(!store.complete_now(&s, &owner(1), &huge, Duration::from_secs(60)));
        assert_eq!(
            store
                .claim_now(&s, &fp(1), &owner(2), Duration::from_secs(60))
                .unwrap(),
            Claim::Acquired
        );
    }
}
