//! The in-process lock backend.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::backend::{Attempt, BoxFuture, LockBackend, OwnerToken, Subscription, WaitList};
use super::fence::now_micros;
use super::{FencingToken, LockError};

/// Locks held in this process: for a service that runs as one replica, and for tests.
///
/// Leases expire on tokio's clock (so `tokio::time::pause` controls them in tests).
/// Fencing tokens come from one counter for the whole backend, minted as
/// `max(previous + 1, now in microseconds)`: strictly increasing for every name, and
/// still increasing after a restart of the process. Memory is bounded by the locks held
/// now: a released lock leaves nothing behind, and expired ones are swept as new ones come.
pub struct MemoryLockBackend {
    locks: Mutex<Locks>,
    counter: AtomicU64,
    epoch: u64,
    waiters: Arc<WaitList>,
}

#[derive(Default)]
struct Locks {
    held: HashMap<String, (OwnerToken, Instant)>,
    /// Size of `held` after the last sweep of expired leases.
    swept_at: usize,
}

impl fmt::Debug for MemoryLockBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryLockBackend")
            .field("held", &self.held())
            .finish_non_exhaustive()
    }
}

impl Default for MemoryLockBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryLockBackend {
    /// An empty backend.
    pub fn new() -> Self {
        let epoch = now_micros();
        Self {
            locks: Mutex::default(),
            counter: AtomicU64::new(0),
            epoch,
            waiters: Arc::new(WaitList::new()),
        }
    }

    /// How many leases are held (expired ones not yet swept included).
    pub fn held(&self) -> usize {
        self.locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .held
            .len()
    }

    fn mint(&self) -> FencingToken {
        let now = now_micros();
        let mut prev = self.counter.load(Ordering::Relaxed);
        loop {
            let next = (prev + 1).max(now);
            match self.counter.compare_exchange_weak(
                prev,
                next,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return FencingToken::new(next, self.epoch),
                Err(actual) => prev = actual,
            }
        }
    }

    fn try_acquire(&self, name: &str, owner: OwnerToken, ttl: Duration) -> Attempt {
        let now = Instant::now();
        let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, expires)) = locks.held.get(name)
            && *expires > now
        {
            return Attempt::Held {
                expires_in: Some(*expires - now),
            };
        }
        // Sweep expired leases whenever the table doubled since the last sweep: amortised
        // O(1) per acquisition, and the table never holds more than twice the live leases.
        if locks.held.len() >= 64 && locks.held.len() >= locks.swept_at * 2 {
            locks.held.retain(|_, (_, expires)| *expires > now);
            locks.swept_at = locks.held.len();
        }
        // Minted while the table is held: a holder whose lease ran out before it minted
        // could otherwise get a larger token than the next holder's.
        let token = self.mint();
        locks.held.insert(name.to_owned(), (owner, now + ttl));
        drop(locks);
        Attempt::Acquired {
            token,
            // From now, when the caller gets it: the lease was counted from `now`.
            validity: ttl.saturating_sub(now.elapsed()),
        }
    }

    fn try_extend(&self, name: &str, owner: OwnerToken, ttl: Duration) -> Option<Duration> {
        let now = Instant::now();
        let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        match locks.held.get_mut(name) {
            Some((held_by, expires)) if *held_by == owner && *expires > now => {
                *expires = now + ttl;
                Some(ttl)
            }
            _ => None,
        }
    }

    fn try_release(&self, name: &str, owner: OwnerToken) -> bool {
        let now = Instant::now();
        let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        let ours = match locks.held.get(name) {
            Some((held_by, expires)) if *held_by == owner => {
                let live = *expires > now;
                locks.held.remove(name);
                live
            }
            _ => false,
        };
        drop(locks);
        self.waiters.wake(name);
        ours
    }
}

impl LockBackend for MemoryLockBackend {
    fn acquire<'a>(
        &'a self,
        name: &'a str,
        owner: OwnerToken,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Attempt, LockError>> {
        let attempt = self.try_acquire(name, owner, ttl);
        Box::pin(std::future::ready(Ok(attempt)))
    }

    fn extend<'a>(
        &'a self,
        name: &'a str,
        owner: OwnerToken,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<Duration>, LockError>> {
        let extended = self.try_extend(name, owner, ttl);
        Box::pin(std::future::ready(Ok(extended)))
    }

    fn release<'a>(
        &'a self,
        name: &'a str,
        owner: OwnerToken,
    ) -> BoxFuture<'a, Result<bool, LockError>> {
        let released = self.try_release(name, owner);
        Box::pin(std::future::ready(Ok(released)))
    }

    fn subscribe<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Option<Subscription>> {
        let (subscription, _) = self.waiters.register(name);
        Box::pin(std::future::ready(Some(subscription)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn grants_once_expires_and_fences() {
        let b = MemoryLockBackend::new();
        let (a, c) = (OwnerToken::random(), OwnerToken::random());
        let ttl = Duration::from_secs(1);
        let Attempt::Acquired { token: t1, .. } = b.try_acquire("x", a, ttl) else {
            panic!("first acquire must win")
        };
        assert!(matches!(
            b.try_acquire("x", c, ttl),
            Attempt::Held { expires_in: Some(d) } if d <= ttl
        ));
        assert_eq!(b.try_extend("x", c, ttl), None, "not the owner");
        assert!(!b.try_release("x", c), "not the owner");
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert_eq!(b.try_extend("x", a, ttl), None, "expired");
        let Attempt::Acquired { token: t2, .. } = b.try_acquire("x", c, ttl) else {
            panic!("expired lease must be taken over")
        };
        assert!(t2 > t1 && t2.value() > t1.value());
        assert!(!b.try_release("x", a), "the old owner cannot release");
        assert!(b.try_release("x", c));
        assert_eq!(b.held(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn expired_leases_are_swept() {
        let b = MemoryLockBackend::new();
        for i in 0..200 {
            b.try_acquire(
                &format!("n{i}"),
                OwnerToken::random(),
                Duration::from_secs(1),
            );
        }
        tokio::time::advance(Duration::from_secs(2)).await;
        for i in 0..200 {
            b.try_acquire(
                &format!("m{i}"),
                OwnerToken::random(),
                Duration::from_secs(1),
            );
        }
        assert!(b.held() < 400, "{} leases kept", b.held());
    }
}
