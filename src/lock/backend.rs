//! The trait every lock backend implements, and the local wait list they share.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

use super::{FencingToken, LockError};

/// A boxed future, as the backend trait returns.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A random 128-bit value that identifies one acquisition. It is made before anything is
/// sent to a backend, so an acquisition cancelled half-way can still be undone, and only
/// its owner can extend or release the lock (nobody can guess it).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct OwnerToken([u8; 16]);

impl OwnerToken {
    /// A new token from the operating system's random generator. Bytes are fetched 32
    /// tokens at a time into a per-thread pool (one system call instead of 32), and each
    /// byte is handed out once.
    pub fn random() -> Self {
        const POOL: usize = 32 * 16;
        struct Pool {
            bytes: [u8; POOL],
            used: usize,
        }
        thread_local! {
            static RANDOM: std::cell::RefCell<Pool> = const {
                std::cell::RefCell::new(Pool { bytes: [0; POOL], used: POOL })
            };
        }
        let pooled = RANDOM.try_with(|pool| {
            let mut pool = pool.borrow_mut();
            if pool.used == POOL {
                getrandom::fill(&mut pool.bytes).ok()?;
                pool.used = 0;
            }
            let mut bytes = [0u8; 16];
            let at = pool.used;
            bytes.copy_from_slice(&pool.bytes[at..at + 16]);
            // Spent bytes are wiped, so the pool never holds a token that was handed out.
            pool.bytes[at..at + 16].fill(0);
            pool.used += 16;
            Some(bytes)
        });
        if let Ok(Some(bytes)) = pooled {
            return Self(bytes);
        }
        let mut bytes = [0u8; 16];
        if getrandom::fill(&mut bytes).is_err() {
            // No OS randomness (never seen on supported platforms): fall back to the clock
            // and a counter, still unique within the process.
            use std::sync::atomic::{AtomicU64, Ordering};
            static COUNTER: AtomicU64 = AtomicU64::new(0);
            bytes[..8].copy_from_slice(&super::fence::now_micros().to_be_bytes());
            bytes[8..].copy_from_slice(&COUNTER.fetch_add(1, Ordering::Relaxed).to_be_bytes());
        }
        Self(bytes)
    }

    /// Eight of the token's bytes as a number (a seed for backoff jitter).
    pub(crate) fn seed(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[..8]);
        u64::from_le_bytes(b)
    }

    /// The token as 32 lowercase hex digits (what the Redis backends store).
    pub fn to_hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut hex = [0u8; 32];
        for (i, b) in self.0.iter().enumerate() {
            hex[2 * i] = DIGITS[usize::from(b >> 4)];
            hex[2 * i + 1] = DIGITS[usize::from(b & 15)];
        }
        // Only ASCII digits were written.
        std::str::from_utf8(&hex).unwrap_or_default().to_owned()
    }
}

impl fmt::Debug for OwnerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print an owner token whole: it is what releases the lock.
        write!(f, "OwnerToken({}..)", &self.to_hex()[..6])
    }
}

/// What one acquisition attempt found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Attempt {
    /// The lock is ours, with this fencing token, for `validity` from when the backend
    /// answers.
    Acquired {
        /// The fencing token minted with the lock.
        token: FencingToken,
        /// How long the lock is ours, counted from when the backend answers: the TTL less
        /// the time the attempt took and, for Redlock, the clock drift allowance.
        validity: Duration,
    },
    /// Someone else holds it; `expires_in` is how long their lease has left, when known.
    Held {
        /// Time left on the holder's lease.
        expires_in: Option<Duration>,
    },
}

/// A lock backend: memory, one Redis node, or Redlock over several. The
/// [`LockManager`](super::LockManager) drives it; applications rarely call it directly.
///
/// Every call is one atomic step on the backend, and must end in bounded time (the Redis
/// backends use their store's per-call timeout): the manager adds no timeouts of its own,
/// so that an uncontended lock costs no timer. Implementations must make `acquire` mint a
/// fencing token in the same step that grants the lock, and `release` / `extend` act only
/// when the lock is still held by `owner`.
pub trait LockBackend: Send + Sync + 'static {
    /// Tries once to take `name` for `owner` for `ttl`.
    fn acquire<'a>(
        &'a self,
        name: &'a str,
        owner: OwnerToken,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Attempt, LockError>>;

    /// Extends `owner`'s lease on `name` to `ttl` from now. `Ok(Some(validity))` when it is
    /// still ours; `Ok(None)` when it is not (it expired and may have been taken).
    fn extend<'a>(
        &'a self,
        name: &'a str,
        owner: OwnerToken,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<Duration>, LockError>>;

    /// Releases `name` if `owner` still holds it, and tells waiters. `Ok(false)` when it
    /// was no longer ours.
    fn release<'a>(
        &'a self,
        name: &'a str,
        owner: OwnerToken,
    ) -> BoxFuture<'a, Result<bool, LockError>>;

    /// Starts listening for releases of `name`, resolving once listening is in place (so a
    /// release after this returns is not missed). `None` when the backend cannot notify
    /// (waiters then poll).
    fn subscribe<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Option<Subscription>>;
}

/// A shared backend: several managers over one backend (for example one in-process
/// backend shared by managers configured differently).
impl<T: LockBackend + ?Sized> LockBackend for Arc<T> {
    fn acquire<'a>(
        &'a self,
        name: &'a str,
        owner: OwnerToken,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Attempt, LockError>> {
        (**self).acquire(name, owner, ttl)
    }

    fn extend<'a>(
        &'a self,
        name: &'a str,
        owner: OwnerToken,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<Duration>, LockError>> {
        (**self).extend(name, owner, ttl)
    }

    fn release<'a>(
        &'a self,
        name: &'a str,
        owner: OwnerToken,
    ) -> BoxFuture<'a, Result<bool, LockError>> {
        (**self).release(name, owner)
    }

    fn subscribe<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Option<Subscription>> {
        (**self).subscribe(name)
    }
}

/// Local waiters for release notifications, by lock name: every waiter in this process for
/// one name shares one entry (and, for Redis, one subscription), and a release wakes them
/// one at a time in the order they started waiting.
#[derive(Default)]
pub struct WaitList {
    /// Per name: the waiters' `Notify`, how many wait, and whether nothing listens for the
    /// name remotely (its subscription failed or was lost): the next waiter subscribes.
    names: Mutex<HashMap<String, Waiting>>,
    on_empty: Option<Box<OnEmpty>>,
}

/// One name's waiters: their `Notify`, how many, and whether the name is unlistened.
type Waiting = (Arc<Notify>, usize, bool);

type OnEmpty = dyn Fn(&str) + Send + Sync;

impl fmt::Debug for WaitList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.lock().len();
        f.debug_struct("WaitList").field("names", &n).finish()
    }
}

impl WaitList {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty list that calls `f` with a lock name when its last waiter goes away (a
    /// backend that subscribed remotely for the name unsubscribes then).
    pub fn with_on_empty(f: impl Fn(&str) + Send + Sync + 'static) -> Self {
        Self {
            names: Mutex::default(),
            on_empty: Some(Box::new(f)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Waiting>> {
        self.names.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a waiter for `name`. The second value is true when it is the first one,
    /// or the first since the name was marked [`unlistened`](Self::unlistened) (a backend
    /// that subscribes remotely does so then).
    pub fn register(self: &Arc<Self>, name: &str) -> (Subscription, bool) {
        let mut names = self.lock();
        let (notify, first) = match names.get_mut(name) {
            Some((notify, count, unlistened)) => {
                *count += 1;
                (notify.clone(), std::mem::take(unlistened))
            }
            None => {
                let notify = Arc::new(Notify::new());
                names.insert(name.to_owned(), (notify.clone(), 1, false));
                (notify, true)
            }
        };
        (
            Subscription {
                list: self.clone(),
                name: name.to_owned(),
                notify,
            },
            first,
        )
    }

    /// Wakes the longest-waiting waiter for `name`, if any.
    pub fn wake(&self, name: &str) {
        if let Some((notify, _, _)) = self.lock().get(name) {
            notify.notify_one();
        }
    }

    /// Nothing listens for `name` remotely any more (the subscription failed, or its
    /// connection was lost and not restored): the next waiter to register subscribes
    /// again, rather than count on a subscription that is not there.
    pub fn unlistened(&self, name: &str) {
        if let Some((_, _, unlistened)) = self.lock().get_mut(name) {
            *unlistened = true;
        }
    }

    /// Whether anyone in this process waits for `name`.
    pub fn is_waited(&self, name: &str) -> bool {
        self.lock().contains_key(name)
    }

    /// Names waited for now.
    pub fn names(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Drops one registration; true when it was the last for `name`.
    fn unregister(&self, name: &str) -> bool {
        let mut names = self.lock();
        if let Some((_, count, _)) = names.get_mut(name) {
            *count -= 1;
            if *count == 0 {
                names.remove(name);
                return true;
            }
        }
        false
    }
}

/// One waiter's registration for release notifications of one lock name. Dropping it
/// unregisters (and, for the last waiter of a name, ends the remote subscription).
pub struct Subscription {
    list: Arc<WaitList>,
    name: String,
    notify: Arc<Notify>,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("name", &self.name)
            .finish()
    }
}

impl Subscription {
    /// Resolves when a release of the lock wakes this waiter.
    pub async fn notified(&self) {
        self.notify.notified().await;
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.list.unregister(&self.name)
            && let Some(f) = &self.list.on_empty
        {
            f(&self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_left_unlistened_is_subscribed_again_by_its_next_waiter() {
        let list = Arc::new(WaitList::new());
        let (a, first) = list.register("n");
        assert!(first);
        let (_b, first) = list.register("n");
        assert!(!first, "a subscription is under way");
        // The first waiter's subscribe failed (or the connection was lost).
        list.unlistened("n");
        drop(a);
        let (_c, first) = list.register("n");
        assert!(first, "the next waiter subscribes again");
        let (_d, first) = list.register("n");
        assert!(!first);
        // Nothing is marked for a name nobody waits on.
        list.unlistened("other");
        let (_e, first) = list.register("other");
        assert!(first);
    }

    #[test]
    fn owner_tokens_differ_and_hide_in_debug() {
        let a = OwnerToken::random();
        let b = OwnerToken::random();
        assert_ne!(a, b);
        assert_eq!(a.to_hex().len(), 32);
        let debug = format!("{a:?}");
        assert!(!debug.contains(&a.to_hex()), "{debug}");
    }

    #[test]
    fn pooled_owner_tokens_are_unique_across_refills_and_threads() {
        // 3 000 tokens per thread: the per-thread pool (32 tokens) is refilled many times.
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| (0..3000).map(|_| OwnerToken::random()).collect::<Vec<_>>())
            })
            .collect();
        let mut all = std::collections::HashSet::new();
        for t in threads {
            for token in t.join().unwrap() {
                assert_ne!(token.0, [0u8; 16], "a wiped slot was handed out");
                assert!(all.insert(token), "a token was handed out twice");
            }
        }
        assert_eq!(all.len(), 12_000);
    }

    #[tokio::test]
    async fn wait_list_counts_registrations_and_wakes_one() {
        let last = Arc::new(Mutex::new(None));
        let seen = last.clone();
        let list = Arc::new(WaitList::with_on_empty(move |name| {
            *seen.lock().unwrap() = Some(name.to_owned())
        }));
        let (a, first) = list.register("n");
        assert!(first);
        let (b, first) = list.register("n");
        assert!(!first);
        list.wake("n");
        // One stored permit: exactly one of the two waiters gets it.
        tokio::time::timeout(Duration::from_secs(1), a.notified())
            .await
            .unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(20), b.notified())
                .await
                .is_err()
        );
        drop(a);
        assert!(list.is_waited("n"));
        assert!(last.lock().unwrap().is_none());
        drop(b);
        assert!(!list.is_waited("n"));
        assert_eq!(last.lock().unwrap().as_deref(), Some("n"));
    }
}
