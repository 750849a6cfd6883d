//! The lock API: [`LockManager`] and its builder.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::LockError;
use super::backend::{Attempt, LockBackend, OwnerToken, Subscription};
use super::guard::{Lease, LockGuard, release_in_background};
use super::memory::MemoryLockBackend;
use super::watchdog::{Ticket, Watchdog};

/// Default lease: how long a lock outlives a holder that died without releasing it.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
/// Default cap on how long the watchdog keeps extending one lease.
pub const DEFAULT_MAX_HOLD: Duration = Duration::from_secs(300);
/// Longest lock name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 256;

#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) ttl: Duration,
    pub(crate) max_hold: Duration,
    pub(crate) watchdog: bool,
    pub(crate) notifications: bool,
    pub(crate) backoff_min: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) fencing: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_TTL,
            max_hold: DEFAULT_MAX_HOLD,
            watchdog: true,
            notifications: true,
            backoff_min: Duration::from_millis(5),
            backoff_max: Duration::from_millis(250),
            fencing: true,
        }
    }
}

pub(crate) struct Shared {
    pub(crate) backend: Arc<dyn LockBackend>,
    pub(crate) config: Config,
    pub(crate) watchdog: Watchdog,
}

/// Takes and releases named locks on one backend. Cheap to clone; clones share the backend.
///
/// ```
/// use battlement::lock::LockManager;
/// use std::time::Duration;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), battlement::lock::LockError> {
/// let locks = LockManager::memory();
/// let guard = locks.acquire("order:42", Duration::from_secs(2)).await?;
/// let token = guard.fencing_token();
/// // ... write to the resource, passing `token.value()` along ...
/// assert!(locks.try_acquire("order:42").await?.is_none(), "held");
/// guard.release().await?;
/// let again = locks.try_acquire("order:42").await?.expect("free again");
/// assert!(again.fencing_token() > token);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct LockManager {
    shared: Arc<Shared>,
}

impl fmt::Debug for LockManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockManager")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

/// Configures a [`LockManager`]; the last call picks the backend.
#[derive(Clone, Debug, Default)]
#[must_use]
pub struct LockManagerBuilder {
    config: Config,
}

impl LockManagerBuilder {
    /// The lease (10 s by default): how long a lock survives a holder that died. The
    /// watchdog extends it while the guard lives.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config.ttl = ttl.clamp(Duration::from_millis(10), crate::FOREVER);
        self
    }

    /// The cap on how long the watchdog keeps extending one lease (5 minutes by default).
    /// Past it the lease runs out and the guard's `lost()` fires.
    pub fn max_hold(mut self, max_hold: Duration) -> Self {
        self.config.max_hold = max_hold.min(crate::FOREVER);
        self
    }

    /// Whether a watchdog extends leases while guards live (on by default). Off, a lease
    /// ends at its TTL and `lost()` fires then.
    pub fn watchdog(mut self, on: bool) -> Self {
        self.config.watchdog = on;
        self
    }

    /// Whether waiters are woken by release notifications (Redis pub/sub, or in-process
    /// for memory; on by default). Off, they only poll with jittered backoff.
    pub fn notifications(mut self, on: bool) -> Self {
        self.config.notifications = on;
        self
    }

    /// The poll interval of a waiter: jittered, doubling from `min` to `max` (5 ms to
    /// 250 ms by default). With notifications on, waiters poll at `max` only as a safety
    /// net (a lost message, a holder that died) and never later than the holder's lease
    /// ends.
    pub fn retry_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.config.backoff_min = min.clamp(Duration::from_millis(1), crate::FOREVER);
        self.config.backoff_max = max.clamp(self.config.backoff_min, crate::FOREVER);
        self
    }

    /// Whether Redis backends mint a fencing token with every lock (on by default).
    ///
    /// Off, [`redis`](Self::redis) and [`redlock`](Self::redlock) take a lock with a plain
    /// `SET key owner NX PX ttl` instead of their acquire script: about 40 % of the
    /// Redis CPU per lock-unlock cycle, and the cheapest a lock can be, for work where
    /// mutual exclusion by lease is enough (a job that must not run twice at once, a cache
    /// fill). Guards then carry [`FencingToken::NONE`](super::FencingToken::NONE), which a
    /// resource checking tokens refuses. A holder paused past its lease can then write
    /// after the next holder, unnoticed; keep tokens on wherever that matters. The memory
    /// backend mints tokens either way (they cost nothing there).
    ///
    /// ```no_run
    /// # async fn f(store: battlement::redis::RedisStore) -> Result<(), battlement::lock::LockError> {
    /// use battlement::lock::LockManager;
    /// use std::time::Duration;
    ///
    /// let locks = LockManager::builder().fencing(false).redis(store);
    /// let guard = locks.acquire("nightly-report", Duration::from_secs(1)).await?;
    /// assert!(guard.fencing_token().is_none());
    /// guard.release().await?;
    /// # Ok(()) }
    /// ```
    pub fn fencing(mut self, on: bool) -> Self {
        self.config.fencing = on;
        self
    }

    /// A manager over `backend`.
    pub fn backend(self, backend: impl LockBackend) -> LockManager {
        LockManager {
            shared: Arc::new(Shared {
                backend: Arc::new(backend),
                config: self.config,
                watchdog: Watchdog::new(),
            }),
        }
    }

    /// A manager over an in-process [`MemoryLockBackend`].
    pub fn memory(self) -> LockManager {
        self.backend(MemoryLockBackend::new())
    }

    /// A manager over one Redis node (or one Redis Cluster): `SET NX PX` with a fencing
    /// counter in the same script.
    #[cfg(feature = "redis")]
    pub fn redis(self, store: crate::redis::RedisStore) -> LockManager {
        let backend = super::redis::RedisLockBackend::single(store);
        let fencing = self.config.fencing;
        self.backend(backend.fencing(fencing))
    }

    /// A manager running Redlock over independent Redis masters (3 or 5 is usual): a lock
    /// is granted when a majority grants it in time. Fails on an empty list.
    #[cfg(feature = "redis")]
    pub fn redlock(
        self,
        stores: impl IntoIterator<Item = crate::redis::RedisStore>,
    ) -> Result<LockManager, LockError> {
        let backend = super::redis::RedisLockBackend::redlock(stores)?;
        let fencing = self.config.fencing;
        Ok(self.backend(backend.fencing(fencing)))
    }
}

impl LockManager {
    /// A builder with the defaults: TTL 10 s, watchdog on, hold cap 5 minutes,
    /// notifications on.
    pub fn builder() -> LockManagerBuilder {
        LockManagerBuilder::default()
    }

    /// A manager over an in-process backend, with the defaults.
    pub fn memory() -> Self {
        Self::builder().memory()
    }

    /// A manager over one Redis node or cluster, with the defaults.
    #[cfg(feature = "redis")]
    pub fn redis(store: crate::redis::RedisStore) -> Self {
        Self::builder().redis(store)
    }

    /// A Redlock manager over independent Redis masters, with the defaults.
    #[cfg(feature = "redis")]
    pub fn redlock(
        stores: impl IntoIterator<Item = crate::redis::RedisStore>,
    ) -> Result<Self, LockError> {
        Self::builder().redlock(stores)
    }

    /// The lease every lock of this manager gets.
    pub fn ttl(&self) -> Duration {
        self.shared.config.ttl
    }

    /// Takes `name`, waiting up to `wait` for it: woken by the release notification of
    /// the holder, or by polling when notifications are off or lost. Fails with
    /// [`LockError::TimedOut`] when the wait runs out, or with the backend's error when it
    /// was unreachable for the last attempt.
    ///
    /// Cancel-safe: dropping the future at any point leaves nothing held (an attempt that
    /// was in flight is undone in the background with its owner token).
    pub async fn acquire(&self, name: &str, wait: Duration) -> Result<LockGuard, LockError> {
        self.acquire_inner(name, wait).await
    }

    /// Takes `name` if it is free now: `Ok(None)` when someone holds it.
    pub async fn try_acquire(&self, name: &str) -> Result<Option<LockGuard>, LockError> {
        match self.acquire_inner(name, Duration::ZERO).await {
            Ok(guard) => Ok(Some(guard)),
            Err(LockError::TimedOut { .. }) => Ok(None),
            Err(error) => Err(error),
        }
    }

    async fn acquire_inner(&self, name: &str, wait: Duration) -> Result<LockGuard, LockError> {
        validate_name(name)?;
        let shared = &self.shared;
        let config = &shared.config;
        let started = Instant::now();
        // "Wait forever" (`Duration::MAX`) waits a very long time, without overflowing.
        let deadline = started + wait.min(crate::FOREVER);
        let mut subscription: Option<Subscription> = None;
        let mut subscribed = false;
        let mut backoff = config.backoff_min;
        let mut attempts = 0u32;
        // Seeded only when a wait starts: a free lock costs no extra randomness.
        let mut rng: Option<Jitter> = None;
        loop {
            attempts += 1;
            let owner = OwnerToken::random();
            let mut pending = PendingAttempt {
                shared,
                name,
                owner,
                armed: true,
            };
            let (last_error, expires_in) =
                match shared.backend.acquire(name, owner, config.ttl).await {
                    Ok(Attempt::Acquired { token, validity }) => {
                        pending.armed = false;
                        // `validity` already leaves out the time the attempt took: it
                        // counts from now (from the attempt's start, that time would be
                        // taken off twice, and a slow attempt's lease would end early).
                        let now = Instant::now();
                        let lease = Lease {
                            name: name.to_owned(),
                            token,
                            deadline: Mutex::new(now + validity),
                            lost: std::sync::atomic::AtomicBool::new(false),
                            lost_notify: tokio::sync::Notify::new(),
                            acquired_at: now,
                            waited: now - started,
                            attempts,
                            ticket: Ticket::new(),
                        };
                        return Ok(LockGuard::new(shared.clone(), lease, owner));
                    }
                    Ok(Attempt::Held { expires_in }) => {
                        pending.armed = false;
                        (None, expires_in)
                    }
                    Err(error) if !error.is_retryable() => return Err(error),
                    // An attempt that failed may still have been applied (a timeout after the
                    // write): `pending` undoes it when dropped at the end of this iteration.
                    Err(error) => (Some(error), None),
                };
            drop(pending);
            let now = Instant::now();
            if now >= deadline {
                return match last_error {
                    Some(error) => Err(error),
                    None => Err(LockError::TimedOut {
                        waited: now - started,
                    }),
                };
            }
            if config.notifications && !subscribed {
                subscribed = true;
                subscription = tokio::time::timeout(deadline - now, shared.backend.subscribe(name))
                    .await
                    .ok()
                    .flatten();
                if subscription.is_some() {
                    // Listening now: try again at once, in case the release came before.
                    continue;
                }
            }
            let mut pause = if subscription.is_some() {
                config.backoff_max
            } else {
                let b = backoff;
                backoff = (backoff * 2).min(config.backoff_max);
                b
            };
            // Jitter: between half and all of the pause, so waiters spread out.
            pause = pause / 2 + rng.get_or_insert_with(Jitter::new).below(pause / 2);
            if let Some(left) = expires_in {
                pause = pause.min(left + Duration::from_millis(1));
            }
            pause = pause.min(deadline - Instant::now().min(deadline));
            match &subscription {
                Some(subscription) => {
                    let _ = tokio::time::timeout(pause, subscription.notified()).await;
                }
                None => tokio::time::sleep(pause).await,
            }
        }
    }
}

/// Undoes an acquisition attempt whose outcome is unknown when it is dropped armed (the
/// future was cancelled mid-call, or the call failed after maybe reaching the backend).
struct PendingAttempt<'a> {
    shared: &'a Arc<Shared>,
    name: &'a str,
    owner: OwnerToken,
    armed: bool,
}

impl Drop for PendingAttempt<'_> {
    fn drop(&mut self) {
        if self.armed {
            release_in_background(self.shared, self.name, self.owner);
        }
    }
}

/// Lock names go into backend keys: 1 to 256 bytes, no control characters, no braces
/// (they would change the Redis Cluster hash tag).
pub(crate) fn validate_name(name: &str) -> Result<(), LockError> {
    let refused = |c: char| c.is_control() || c == '{' || c == '}';
    let bad = if name.is_ascii() {
        name.bytes().any(|b| refused(char::from(b)))
    } else {
        name.chars().any(refused)
    };
    if name.is_empty() || name.len() > MAX_NAME_LEN || bad {
        return Err(LockError::InvalidName);
    }
    Ok(())
}

/// A small xorshift generator for backoff jitter (no need for secure randomness here).
struct Jitter(u64);

impl Jitter {
    fn new() -> Self {
        Self(OwnerToken::random().seed() | 1)
    }

    fn below(&mut self, bound: Duration) -> Duration {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        let nanos = bound.as_nanos() as u64;
        if nanos == 0 {
            Duration::ZERO
        } else {
            Duration::from_nanos(x % nanos)
        }
    }
}
