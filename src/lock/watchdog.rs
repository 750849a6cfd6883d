//! One watchdog task per manager that extends every held lease on time.
//!
//! A task per guard would cost a spawn and an abort (and, on a multi-threaded runtime, a
//! wake of another worker) for every acquisition; here taking and releasing a lock costs a
//! map insert and remove. The task sleeps until the earliest due lease, runs each
//! extension on a task of its own (a slow backend never delays the others), and exits
//! after a second with nothing to watch.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::backend::OwnerToken;
use super::client::Shared;
use super::guard::Lease;

/// How long the task lingers with nothing to watch before it exits.
const IDLE: Duration = Duration::from_secs(1);

type Key = (Instant, u64);

pub(crate) struct Watchdog {
    state: Mutex<State>,
    wake: Notify,
}

#[derive(Default)]
struct State {
    queue: BTreeMap<Key, Watched>,
    seq: u64,
    running: bool,
    /// When the task will look at the queue next on its own.
    sleeping_until: Option<Instant>,
}

#[derive(Clone)]
struct Watched {
    lease: Arc<Lease>,
    owner: OwnerToken,
}

/// A lease's place in the watchdog's queue; dropping the guard removes it.
pub(crate) struct Ticket {
    pub(crate) released: AtomicBool,
    key: Mutex<Option<Key>>,
}

impl Ticket {
    pub(crate) fn new() -> Self {
        Self {
            released: AtomicBool::new(false),
            key: Mutex::new(None),
        }
    }
}

impl Watchdog {
    pub(crate) fn new() -> Self {
        Self {
            state: Mutex::default(),
            wake: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Watches `lease` from `at` on.
    pub(crate) fn watch(shared: &Arc<Shared>, lease: Arc<Lease>, owner: OwnerToken, at: Instant) {
        let dog = &shared.watchdog;
        let mut state = dog.lock();
        if lease.ticket.released.load(Ordering::Acquire) {
            return;
        }
        state.seq += 1;
        let key = (at, state.seq);
        *lease
            .ticket
            .key
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(key);
        state.queue.insert(key, Watched { lease, owner });
        if !state.running {
            let Ok(handle) = tokio::runtime::Handle::try_current() else {
                // No runtime: the lease simply runs out at its TTL.
                return;
            };
            state.running = true;
            state.sleeping_until = None;
            handle.spawn(run(Arc::downgrade(shared)));
        } else if state.sleeping_until.is_some_and(|t| at < t) {
            drop(state);
            dog.wake.notify_one();
        }
    }

    /// Stops watching the lease of `ticket`.
    pub(crate) fn unwatch(&self, ticket: &Ticket) {
        ticket.released.store(true, Ordering::Release);
        let key = ticket
            .key
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(key) = key {
            self.lock().queue.remove(&key);
        }
    }
}

async fn run(shared: Weak<Shared>) {
    loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let now = Instant::now();
        let mut due = Vec::new();
        let next = {
            let mut state = strong.watchdog.lock();
            while let Some(entry) = state.queue.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                let watched = entry.remove();
                *watched
                    .lease
                    .ticket
                    .key
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = None;
                due.push(watched);
            }
            let next = match state.queue.first_key_value() {
                Some((key, _)) => key.0,
                None if state.sleeping_until.is_some_and(|t| t <= now) && due.is_empty() => {
                    // A whole idle period with nothing to watch: stop. `watch` starts a
                    // new task when there is something again.
                    state.running = false;
                    state.sleeping_until = None;
                    return;
                }
                None => now + IDLE,
            };
            // Set under the same lock that read the queue: a lease added from now on
            // that is due earlier wakes the task.
            state.sleeping_until = Some(next);
            next
        };
        for watched in due {
            tokio::spawn(check(strong.clone(), watched));
        }
        // Holding `strong` while asleep keeps the manager's state alive at most one idle
        // period after its last lease: then the task exits.
        let _ = tokio::time::timeout_at(next, strong.watchdog.wake.notified()).await;
    }
}

/// One due lease: mark it lost when it ran out, else extend it and put it back.
async fn check(shared: Arc<Shared>, watched: Watched) {
    let Watched { lease, owner } = watched;
    if lease.ticket.released.load(Ordering::Acquire) {
        return;
    }
    let config = &shared.config;
    let ttl = config.ttl;
    let now = Instant::now();
    let deadline = lease.deadline();
    if now >= deadline {
        if !lease.ticket.released.load(Ordering::Acquire) {
            tracing::warn!(lock = %lease.name, "battlement: lock lost (its lease ran out)");
            lease.mark_lost();
        }
        return;
    }
    let hold_until = lease.acquired_at + config.max_hold;
    if !config.watchdog || now >= hold_until {
        // No more extensions: look again when the lease ends.
        Watchdog::watch(&shared, lease, owner, deadline);
        return;
    }
    let result =
        tokio::time::timeout(ttl / 3, shared.backend.extend(&lease.name, owner, ttl)).await;
    let next = match result {
        Ok(Ok(Some(validity))) => {
            // The validity counts from the backend's answer, which is now.
            let answered = Instant::now();
            lease.set_deadline(answered + validity);
            (answered + ttl / 3).min(answered + validity)
        }
        Ok(Ok(None)) => {
            if !lease.ticket.released.load(Ordering::Acquire) {
                tracing::warn!(lock = %lease.name, "battlement: lock lost (the lease had run out or was taken)");
                lease.mark_lost();
            }
            return;
        }
        // The backend is slow or down: try again soon; past the deadline it is lost.
        Ok(Err(_)) | Err(_) => {
            (Instant::now() + (ttl / 10).max(Duration::from_millis(5))).min(deadline)
        }
    };
    Watchdog::watch(&shared, lease, owner, next.min(hold_until.max(now)));
}
