//! The guard of a held lock: fencing token, lease deadline, lost signal, release on drop.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;
use tokio::time::Instant;

use super::backend::OwnerToken;
use super::client::Shared;
use super::watchdog::{Ticket, Watchdog};
use super::{FencingToken, LockError};

/// What a held lock's guard and its handles share.
pub(crate) struct Lease {
    pub(crate) name: String,
    pub(crate) token: FencingToken,
    pub(crate) deadline: Mutex<Instant>,
    /// Set once, when the lease is lost; `lost_notify` wakes whoever awaits `lost()`.
    pub(crate) lost: AtomicBool,
    pub(crate) lost_notify: Notify,
    pub(crate) acquired_at: Instant,
    pub(crate) waited: Duration,
    pub(crate) attempts: u32,
    pub(crate) ticket: Ticket,
}

impl Lease {
    pub(crate) fn deadline(&self) -> Instant {
        *self.deadline.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn set_deadline(&self, deadline: Instant) {
        *self.deadline.lock().unwrap_or_else(PoisonError::into_inner) = deadline;
    }

    pub(crate) fn mark_lost(&self) {
        self.lost.store(true, Ordering::Release);
        self.lost_notify.notify_waiters();
    }

    fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    async fn lost(&self) {
        loop {
            let notified = self.lost_notify.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the flag is read: a `mark_lost` in between still wakes us.
            notified.as_mut().enable();
            if self.is_lost() {
                return;
            }
            notified.await;
        }
    }
}

/// A held lock. Dropping it releases the lock (in the background, bounded by the backend's
/// timeout); [`release`](Self::release) does the same and says whether the lock was still
/// ours. It derefs to [`HeldLock`] for the token, the deadline and the lost signal.
///
/// While it is held, a watchdog extends the lease every third of the TTL (up to the
/// manager's cap on hold time). If an extension fails (the lease ran out during a network
/// partition, or someone else now holds the lock), [`lost`](HeldLock::lost) resolves: stop
/// writing, and let the [fencing token](HeldLock::fencing_token) protect what you already
/// sent.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct LockGuard {
    held: HeldLock,
    shared: Arc<Shared>,
    owner: OwnerToken,
    released: bool,
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("LockGuard").field(&self.held).finish()
    }
}

impl std::ops::Deref for LockGuard {
    type Target = HeldLock;

    fn deref(&self) -> &HeldLock {
        &self.held
    }
}

impl LockGuard {
    pub(crate) fn new(shared: Arc<Shared>, lease: Lease, owner: OwnerToken) -> Self {
        let lease = Arc::new(lease);
        let config = &shared.config;
        let first_check = if config.watchdog {
            // Never after the lease's own deadline (a slow acquisition leaves less than
            // the TTL): extended before it runs out, not declared lost.
            (lease.acquired_at + config.ttl / 3)
                .min(lease.acquired_at + config.max_hold)
                .min(lease.deadline())
        } else {
            lease.deadline()
        };
        Watchdog::watch(&shared, lease.clone(), owner, first_check);
        Self {
            held: HeldLock { lease },
            shared,
            owner,
            released: false,
        }
    }

    /// A cheap, cloneable view of this lock (token, deadline, lost signal) for code that
    /// must not release it, such as a request handler.
    pub fn handle(&self) -> HeldLock {
        self.held.clone()
    }

    /// Releases the lock now. `Err(LockError::Lost)` when it was no longer ours (the
    /// lease had run out and maybe been taken): whatever was done under it was not
    /// protected by the lock, only by the fencing token.
    pub async fn release(mut self) -> Result<(), LockError> {
        self.shared.watchdog.unwatch(&self.held.lease.ticket);
        // Bounded by the backend (the Redis backends by the store's per-call timeout). A
        // release cancelled half-way (its caller dropped) leaves `released` unset, so the
        // guard's drop releases in the background.
        let released = self
            .shared
            .backend
            .release(&self.held.lease.name, self.owner)
            .await;
        self.released = true;
        let released = released?;
        if released && !self.held.lease.is_lost() {
            Ok(())
        } else {
            self.held.lease.mark_lost();
            Err(LockError::Lost)
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if !self.released {
            self.shared.watchdog.unwatch(&self.held.lease.ticket);
            release_in_background(&self.shared, &self.held.lease.name, self.owner);
        }
    }
}

/// Releases `name` for `owner` on a spawned task (the backend bounds the call). Without
/// a runtime (dropped outside tokio) the lease simply runs out.
pub(crate) fn release_in_background(shared: &Arc<Shared>, name: &str, owner: OwnerToken) {
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let shared = shared.clone();
    let name = name.to_owned();
    handle.spawn(async move {
        if let Err(error) = shared.backend.release(&name, owner).await {
            tracing::debug!(lock = %name, %error, "battlement: lock release failed; the lease will run out");
        }
    });
}

/// A view of a held lock that does not release it: what the [lock layer](super::LockLayer)
/// puts into the request extensions for the handler.
#[derive(Clone)]
pub struct HeldLock {
    lease: Arc<Lease>,
}

impl fmt::Debug for HeldLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeldLock")
            .field("name", &self.lease.name)
            .field("fencing_token", &self.lease.token)
            .field("lost", &self.lease.is_lost())
            .finish()
    }
}

impl HeldLock {
    /// The lock's name.
    pub fn name(&self) -> &str {
        &self.lease.name
    }

    /// The fencing token minted with this acquisition: pass it to the resource you write
    /// to, which refuses any token lower than one it has seen.
    pub fn fencing_token(&self) -> FencingToken {
        self.lease.token
    }

    /// When the lease ends unless the watchdog extends it.
    pub fn deadline(&self) -> Instant {
        self.lease.deadline()
    }

    /// Whether the lease was lost (an extension failed, or the hold-time cap was reached
    /// and the lease ran out).
    pub fn is_lost(&self) -> bool {
        self.lease.is_lost()
    }

    /// Resolves when the lease is lost. Never resolves while the lock is held.
    pub async fn lost(&self) {
        self.lease.lost().await
    }

    /// How long the acquisition waited.
    pub fn waited(&self) -> Duration {
        self.lease.waited
    }

    /// How many attempts the acquisition made (1 when the lock was free).
    pub fn attempts(&self) -> u32 {
        self.lease.attempts
    }

    /// When the lock was obtained.
    pub fn acquired_at(&self) -> Instant {
        self.lease.acquired_at
    }
}
