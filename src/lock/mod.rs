//! Distributed locks with fencing tokens, usable with or without HTTP, and a layer that
//! holds one for the whole of a request.
//!
//! A [`LockManager`] takes named locks on one backend:
//!
//! - [`LockManager::memory`]: one process (one replica, and tests);
//! - [`LockManager::redis`] (feature `redis`): one Redis node or a Redis Cluster, `SET NX PX`
//!   with a random 128-bit owner token made before anything is sent; extend and release
//!   compare the owner first, in Lua;
//! - [`LockManager::redlock`] (feature `redis`): Redlock over independent masters, granted
//!   when a majority grants it within the validity window (TTL less the time taken, on the
//!   monotonic clock, less a drift allowance).
//!
//! ```
//! use battlement::lock::{LockError, LockManager};
//! use std::time::Duration;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), LockError> {
//! let locks = LockManager::builder().ttl(Duration::from_secs(5)).memory();
//! let guard = locks.acquire("order:42", Duration::from_secs(2)).await?;
//! println!("fencing token {}", guard.fencing_token());
//! tokio::select! {
//!     _ = guard.lost() => { /* the lease is gone: stop writing */ }
//!     _ = tokio::time::sleep(Duration::from_millis(10)) => { /* the work */ }
//! }
//! guard.release().await?;
//! # Ok(()) }
//! ```
//!
//! ## The guard
//!
//! [`LockGuard`] carries the [`FencingToken`], the lease [`deadline`](HeldLock::deadline)
//! and a [`lost`](HeldLock::lost) signal. A watchdog extends the lease every third of the
//! TTL while the guard lives, up to a cap on total hold time; when an extension is refused,
//! or cannot be made before the lease runs out, `lost()` fires. Dropping the guard releases
//! the lock in the background with a bounded timeout, and so does dropping an
//! [`acquire`](LockManager::acquire) future half-way: nothing stays held because a task was
//! cancelled, and no lock outlives its TTL because a process died.
//!
//! Waiting is woken by the holder's release (Redis pub/sub, one subscription per lock name
//! per process, waiters woken one at a time in order), with jittered polling as the safety
//! net. On a Redis Cluster the release goes out on a shard channel in the lock key's slot
//! (`SPUBLISH`, Redis 7.0+), so it stays on that key's master instead of crossing the
//! cluster bus to every node; before Redis 7.0 cluster waiters poll. Errors are distinct: [`LockError::TimedOut`], [`LockError::Lost`],
//! [`LockError::Unavailable`], [`LockError::NoQuorum`].
//!
//! ## Fencing tokens: what they guarantee
//!
//! A lock with a lease cannot by itself stop a holder that was paused past its lease (a GC
//! pause, a stalled network) from writing after someone else took the lock. Only the
//! resource can, by refusing writes that carry a token older than one it has seen:
//!
//! ```sql
//! UPDATE orders SET status = 'paid', fence = $1
//!  WHERE id = $2 AND fence < $1;   -- 0 rows: a newer holder got there first
//! ```
//!
//! Every backend mints the token in the same atomic step that grants the lock. On one
//! Redis node the name's counter goes up by one; a new counter (first use, or lost with the
//! node's data) starts from the node's clock in microseconds, so tokens of one name
//! strictly increase, also after the counter was lost (the token's
//! [`epoch`](FencingToken::epoch) changes, which tells it happened). Under Redlock each node
//! keeps such a counter; the token is the largest the quorum minted, and the acquirer
//! raises the other granting nodes to it before handing the guard out. Two
//! quorums share a node, so a later token is larger as long as that node kept its data,
//! or its clock is ahead of the others' counters; a node that restarts without data should
//! stay down for a TTL (as the Redlock description asks) so the locks it held expire first.
//!
//! Minting costs a Lua script per acquisition on Redis (three commands in it, per node).
//! Where mutual exclusion by lease is enough, [`LockManagerBuilder::fencing`]`(false)`
//! takes locks with a plain `SET NX PX` and hands out [`FencingToken::NONE`], which a
//! resource checking tokens refuses.
//!
//! ## The layer
//!
//! [`LockLayer`] locks a name derived from the request, waits up to a budget, and refuses
//! with `503` and `Retry-After` (or `409`, see [`BusyResponse`]); gRPC callers get
//! `UNAVAILABLE` / `ABORTED`. The handler reads the [`HeldLock`] from the request
//! extensions; the lock is held until the response body has ended and released if the
//! client goes away. The wait and the outcome go into the request's
//! [`annotate::Record`](crate::annotate::Record).

use std::borrow::Cow;
use std::time::Duration;

mod backend;
mod body;
mod client;
mod fence;
mod future;
mod guard;
mod layer;
mod memory;
#[cfg(feature = "redis")]
mod redis;
mod service;
mod watchdog;

pub use backend::{Attempt, BoxFuture, LockBackend, OwnerToken, Subscription, WaitList};
pub use body::LockBody;
pub use client::{DEFAULT_MAX_HOLD, DEFAULT_TTL, LockManager, LockManagerBuilder, MAX_NAME_LEN};
pub use fence::FencingToken;
pub use future::ResponseFuture;
pub use guard::{HeldLock, LockGuard};
pub use layer::{BusyResponse, LockLayer};
pub use memory::MemoryLockBackend;
#[cfg(feature = "redis")]
pub use redis::RedisLockBackend;
pub use service::Lock;

/// Why a lock operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// The lock was held by someone else for the whole wait.
    #[error("the lock was not obtained within {waited:?}")]
    TimedOut {
        /// How long the acquisition waited.
        waited: Duration,
    },
    /// The lock was no longer ours: its lease ran out (and it may have been taken).
    #[error("the lock was lost: its lease ran out")]
    Lost,
    /// The backend could not be reached (timeout, connection refused, circuit open).
    #[error("the lock backend is unavailable: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Redlock: too few nodes granted the lock, because too many were unreachable.
    #[error(
        "no quorum: {granted} nodes granted the lock, {needed} needed ({unreachable} unreachable)"
    )]
    NoQuorum {
        /// Nodes that granted it.
        granted: usize,
        /// Nodes needed.
        needed: usize,
        /// Nodes that did not answer in time.
        unreachable: usize,
    },
    /// The lock name is empty, longer than [`MAX_NAME_LEN`], or has control characters or
    /// braces.
    #[error("invalid lock name: 1 to 256 bytes, no control characters or braces")]
    InvalidName,
    /// The manager was built wrong.
    #[error("invalid lock configuration: {0}")]
    Config(Cow<'static, str>),
}

impl LockError {
    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            LockError::TimedOut { .. } | LockError::Unavailable(_) | LockError::NoQuorum { .. }
        )
    }
}
