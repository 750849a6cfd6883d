//! Locks on one Redis node (or cluster), and Redlock over several independent masters.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use redis::aio::PubSubSink;
use redis::cluster_async::ClusterConnection;
use tokio::time::Instant;

use super::backend::{Attempt, BoxFuture, LockBackend, OwnerToken, Subscription, WaitList};
use super::{FencingToken, LockError};
use crate::redis::{RedisStore, Script, StoreError};

/// How long an idle lock name's fencing counter is kept. Losing it is harmless (the next
/// counter starts from the current time, past every token minted before); keeping it
/// bounds what lock names cost in Redis.
const FENCE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Takes the lock and mints the fencing token in one step, on one node (alone, or one of
/// Redlock's): the counter goes up by one. A counter that is new (first use of the name, or
/// lost with the node's data) starts from the node's `TIME` in microseconds and opens a new
/// epoch, so tokens keep increasing across a loss: a counter advances once per acquisition,
/// far slower than the clock, so it never runs ahead of it. Redlock nodes start their
/// counters from their own clocks, so a name's first lock on them takes a raise round (see
/// [`RAISE`]); after it the nodes advance in step. The counter's expiry (an idle name's
/// counter is forgotten after [`FENCE_TTL`]) is pushed back the first time the name is
/// locked in each quarter of it (the caller's clock, in quarters of [`FENCE_TTL`] since the
/// Unix epoch, compared as a string: no arithmetic in the script), so the common path is
/// three commands and a counter in use always has three quarters of its expiry ahead. That
/// pacing is the only use of the caller's clock (it spares a `TIME` per acquisition);
/// tokens come from the counters and the nodes' clocks alone.
/// KEYS: lock, fence. ARGV: owner, ttl ms, fence ttl ms, the caller's quarter.
/// Returns `"<counter> <epoch>"` when granted, the holder's PTTL (an integer) when held.
const ACQUIRE: &str = r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local c = redis.call('HINCRBY', KEYS[2], 'c', 1)
  local f = redis.call('HMGET', KEYS[2], 'e', 'r')
  if c > 1 and f[1] then
    if f[2] ~= ARGV[4] then
      redis.call('HSET', KEYS[2], 'r', ARGV[4])
      redis.call('PEXPIRE', KEYS[2], ARGV[3])
    end
    return string.format('%d', c) .. ' ' .. f[1]
  end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  if c > now then now = c end
  local v = string.format('%d', now)
  redis.call('HSET', KEYS[2], 'c', v, 'e', v, 'r', ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  return v .. ' ' .. v
end
return redis.call('PTTL', KEYS[1])
";

/// KEYS: lock. ARGV: owner, ttl ms. 1 when extended.
const EXTEND: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// KEYS: lock. ARGV: owner, channel. 1 when released (and waiters told).
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], '1')
  return 1
end
return 0
";

/// [`RELEASE`] on a Redis Cluster: the release is published on the lock key's shard
/// channel (same hash tag, same slot), so it reaches the subscribers of that shard only
/// instead of crossing the cluster bus to every node. A node without sharded pub/sub
/// (before Redis 7.0) still releases; its waiters poll.
const RELEASE_SHARDED: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.pcall('SPUBLISH', ARGV[2], '1')
  return 1
end
return 0
";

/// Raises a node's fencing counter to the token a Redlock acquisition handed out, so the
/// next quorum (which shares a node with this one) mints a larger token.
/// KEYS: lock, fence. ARGV: owner, value.
const RAISE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  local c = tonumber(redis.call('HGET', KEYS[2], 'c')) or 0
  if c < tonumber(ARGV[2]) then redis.call('HSET', KEYS[2], 'c', ARGV[2]) end
  return 1
end
return 0
";

struct Scripts {
    acquire: Script,
    extend: Script,
    release: Script,
    release_sharded: Script,
    raise: Script,
}

fn scripts() -> &'static Scripts {
    static SCRIPTS: std::sync::OnceLock<Scripts> = std::sync::OnceLock::new();
    SCRIPTS.get_or_init(|| Scripts {
        acquire: Script::new(ACQUIRE),
        extend: Script::new(EXTEND),
        release: Script::new(RELEASE),
        release_sharded: Script::new(RELEASE_SHARDED),
        raise: Script::new(RAISE),
    })
}

/// Locks on Redis: one node (or one Redis Cluster) with [`RedisLockBackend::single`], or
/// Redlock over independent masters with [`RedisLockBackend::redlock`].
///
/// - Acquire is `SET key owner NX PX ttl` and the fencing counter in one Lua script of
///   three commands, the same on one node and on each Redlock node, answered with one
///   string (the plain command alone with [`fencing(false)`](Self::fencing)); extend and
///   release compare the owner token first (compare-and-pexpire, compare-and-delete).
/// - Redlock sends each step to every node in parallel, each under its store's timeout,
///   returns as soon as a majority has granted, and undoes a failed attempt on every node.
///   Validity is the TTL less the time the attempt took (monotonic clock) less a drift
///   allowance of 1 % of the TTL plus 2 ms.
/// - Releases are published on a channel per lock name; waiters of this process for one
///   name share one subscription per node. On a Redis Cluster the channel is a shard
///   channel (`SPUBLISH`, Redis 7.0+) in the lock key's slot: a release reaches only its
///   shard, and the subscription follows the slot when it moves.
pub struct RedisLockBackend {
    nodes: Vec<Node>,
    quorum: usize,
    waiters: Arc<WaitList>,
    fencing: bool,
}

struct Node {
    store: RedisStore,
    notifier: Arc<Notifier>,
}

impl fmt::Debug for RedisLockBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLockBackend")
            .field("nodes", &self.nodes.len())
            .field("quorum", &self.quorum)
            .finish_non_exhaustive()
    }
}

impl RedisLockBackend {
    /// Locks on one Redis node or cluster.
    pub fn single(store: RedisStore) -> Self {
        Self::build(vec![store])
    }

    /// Redlock over independent masters. Fails on an empty list.
    pub fn redlock(stores: impl IntoIterator<Item = RedisStore>) -> Result<Self, LockError> {
        let stores: Vec<RedisStore> = stores.into_iter().collect();
        if stores.is_empty() {
            return Err(LockError::Config(
                "Redlock needs at least one Redis node".into(),
            ));
        }
        Ok(Self::build(stores))
    }

    fn build(stores: Vec<RedisStore>) -> Self {
        let notifiers: Vec<Arc<Notifier>> = stores
            .iter()
            .map(|store| {
                Arc::new_cyclic(|me| Notifier {
                    store: store.clone(),
                    sink: tokio::sync::Mutex::new(None),
                    sharded: tokio::sync::Mutex::new(None),
                    confirmed: Arc::default(),
                    failed_at: Mutex::new(None),
                    connections: std::sync::atomic::AtomicU64::new(0),
                    me: me.clone(),
                })
            })
            .collect();
        let waiters = Arc::new_cyclic(|weak: &Weak<WaitList>| {
            let weak = weak.clone();
            let notifiers = notifiers.clone();
            let channels: Vec<RedisStore> = stores.clone();
            WaitList::with_on_empty(move |name| {
                let Ok(handle) = tokio::runtime::Handle::try_current() else {
                    return;
                };
                let weak = weak.clone();
                let name = name.to_owned();
                let targets: Vec<(Arc<Notifier>, String)> = notifiers
                    .iter()
                    .zip(&channels)
                    .map(|(n, s)| (n.clone(), channel(s, &name)))
                    .collect();
                handle.spawn(async move {
                    for (notifier, channel) in targets {
                        // A waiter that came back meanwhile keeps the subscription (checked
                        // again once the notifier is ours: a subscribe may come first).
                        let waited = || weak.upgrade().is_none_or(|w| w.is_waited(&name));
                        if waited() {
                            return;
                        }
                        notifier.unsubscribe(&channel, waited).await;
                    }
                });
            })
        });
        let quorum = stores.len() / 2 + 1;
        Self {
            nodes: stores
                .into_iter()
                .zip(notifiers)
                .map(|(store, notifier)| Node { store, notifier })
                .collect(),
            quorum,
            waiters,
            fencing: true,
        }
    }

    /// Whether acquisitions mint a fencing token (the default). Off, a lock is a plain
    /// `SET key owner NX PX ttl` and guards carry [`FencingToken::NONE`]; see
    /// [`LockManagerBuilder::fencing`](super::LockManagerBuilder::fencing).
    pub fn fencing(mut self, on: bool) -> Self {
        self.fencing = on;
        self
    }

    /// How many nodes must agree.
    pub fn quorum(&self) -> usize {
        self.quorum
    }

    fn drift(&self, ttl: Duration) -> Duration {
        if self.nodes.len() > 1 {
            ttl / 100 + Duration::from_millis(2)
        } else {
            Duration::ZERO
        }
    }

    /// Releases what an attempt that is not handed out may hold, on every node. A node that
    /// does not answer (the attempt's own write may still be queued there) is asked again
    /// in the background, at growing intervals, until it answers or the lock's TTL has run
    /// out anyway: a release checks the owner, so a late or repeated one harms nothing.
    async fn undo(&self, name: &str, owner: OwnerToken, ttl: Duration) {
        let owner = owner.to_hex();
        let calls: FuturesUnordered<_> = self
            .nodes
            .iter()
            .map(|node| {
                let owner = &owner;
                async move {
                    let answered = release_on(&node.store, name, owner).await.is_ok();
                    (!answered).then(|| node.store.clone())
                }
            })
            .collect();
        let unanswered: Vec<RedisStore> = calls.filter_map(std::future::ready).collect().await;
        if unanswered.is_empty() {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let name = name.to_owned();
        handle.spawn(async move {
            let deadline = Instant::now() + ttl;
            let mut pause = Duration::from_millis(50);
            let mut left = unanswered;
            while !left.is_empty() && Instant::now() + pause < deadline {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
                let mut still = Vec::new();
                for store in left {
                    if release_on(&store, &name, &owner).await.is_err() {
                        still.push(store);
                    }
                }
                left = still;
            }
        });
    }
}

fn lock_key(store: &RedisStore, name: &str) -> String {
    store.key_str("lock", name)
}

fn fence_key(store: &RedisStore, name: &str) -> String {
    store.key_str("lockfence", name)
}

fn channel(store: &RedisStore, name: &str) -> String {
    channel_of(lock_key(store, name))
}

/// The release channel of a lock key: `{lock key}:released`.
fn channel_of(mut lock_key: String) -> String {
    lock_key.push_str(":released");
    lock_key
}

/// The lock name in a release channel (`{prefix}:lock:{name}:released`).
fn name_of_channel(channel: &[u8]) -> Option<&str> {
    let channel = std::str::from_utf8(channel).ok()?;
    // The last `{`: a key prefix may hold braces (a cluster hash tag), lock names never do.
    let start = channel.rfind('{')? + 1;
    let end = channel.rfind("}:released")?;
    channel.get(start..end)
}

async fn release_on(store: &RedisStore, name: &str, owner: &str) -> Result<bool, StoreError> {
    let key = lock_key(store, name);
    let channel = channel_of(key.clone());
    let script = if store.config().is_cluster() {
        &scripts().release_sharded
    } else {
        &scripts().release
    };
    // Past an open breaker: a release (or the undo of an attempt whose answer was lost)
    // must reach Redis as soon as it answers, or the lock stays held for its whole TTL.
    let released: i64 = store
        .eval_unguarded(script, &[&key], &[owner.as_bytes(), channel.as_bytes()])
        .await?;
    Ok(released == 1)
}

fn unavailable(error: StoreError) -> LockError {
    LockError::Unavailable(Box::new(error))
}

/// How an acquisition is asked of a node.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `SET NX PX` alone: no fencing token.
    Plain,
    /// [`ACQUIRE`]: the lock and a fencing token.
    Fenced,
}

/// One acquisition attempt on one node. `args`: owner, ttl ms, fence ttl ms, the caller's
/// quarter of the fence TTL (see [`ACQUIRE`]).
fn acquire_on(
    store: RedisStore,
    name: &str,
    args: [String; 4],
    mode: Mode,
) -> impl std::future::Future<Output = NodeAnswer> + Send + 'static {
    let lock = lock_key(&store, name);
    let fence = (mode != Mode::Plain).then(|| fence_key(&store, name));
    async move {
        let Some(fence) = fence else {
            // No token: the plain command, no script. A refusal does not say how long the
            // holder has left (the waiter relies on the release notification and polling).
            let [owner, ttl_ms, _, _] = args;
            let key = &lock;
            let answer: Result<redis::Value, StoreError> = store
                .call(|mut conn| async move {
                    redis::cmd("SET")
                        .arg(key)
                        .arg(owner)
                        .arg("NX")
                        .arg("PX")
                        .arg(ttl_ms)
                        .query_async(&mut conn)
                        .await
                })
                .await;
            return match answer {
                Ok(redis::Value::Nil) => NodeAnswer::Held(None),
                Ok(_) => NodeAnswer::Granted(0, 0),
                Err(e) => NodeAnswer::Failed(e),
            };
        };
        let answer: Result<redis::Value, StoreError> = store
            .eval(
                &scripts().acquire,
                &[&lock, &fence],
                &[
                    args[0].as_bytes(),
                    args[1].as_bytes(),
                    args[2].as_bytes(),
                    args[3].as_bytes(),
                ],
            )
            .await;
        match answer {
            Ok(redis::Value::Int(pttl)) => {
                NodeAnswer::Held(u64::try_from(pttl).ok().map(Duration::from_millis))
            }
            Ok(redis::Value::BulkString(granted)) => match parse_granted(&granted) {
                Some((value, epoch)) => NodeAnswer::Granted(value, epoch),
                None => NodeAnswer::Failed(unexpected_reply()),
            },
            Ok(_) => NodeAnswer::Failed(unexpected_reply()),
            Err(e) => NodeAnswer::Failed(e),
        }
    }
}

/// `"<counter> <epoch>"`, as the acquire script answers a grant.
fn parse_granted(reply: &[u8]) -> Option<(u64, u64)> {
    let reply = std::str::from_utf8(reply).ok()?;
    let (value, epoch) = reply.split_once(' ')?;
    Some((value.parse().ok()?, epoch.parse().ok()?))
}

fn unexpected_reply() -> StoreError {
    StoreError::Redis(redis::RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        "unexpected lock script reply",
    )))
}

enum NodeAnswer {
    Granted(u64, u64),
    Held(Option<Duration>),
    Failed(StoreError),
}

impl LockBackend for RedisLockBackend {
    fn acquire<'a>(
        &'a self,
        name: &'a str,
        owner: OwnerToken,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Attempt, LockError>> {
        Box::pin(async move {
            let started = Instant::now();
            let owner_hex = owner.to_hex();
            let ttl_ms = (ttl.as_millis() as u64).max(1).to_string();
            let (mode, fence_ttl_ms, now) = if self.fencing {
                (
                    Mode::Fenced,
                    (FENCE_TTL.as_millis() as u64).to_string(),
                    (super::fence::now_micros() / (FENCE_TTL.as_micros() as u64 / 4)).to_string(),
                )
            } else {
                (Mode::Plain, String::new(), String::new())
            };
            if let [node] = self.nodes.as_slice() {
                // One node: one call, nothing to gather.
                let answer = acquire_on(
                    node.store.clone(),
                    name,
                    [owner_hex, ttl_ms, fence_ttl_ms, now],
                    mode,
                )
                .await;
                return match answer {
                    NodeAnswer::Granted(value, epoch) => match ttl.checked_sub(started.elapsed()) {
                        Some(validity) if !validity.is_zero() => Ok(Attempt::Acquired {
                            token: FencingToken::new(value, epoch),
                            validity,
                        }),
                        _ => {
                            self.undo(name, owner, ttl).await;
                            Ok(Attempt::Held { expires_in: None })
                        }
                    },
                    NodeAnswer::Held(expires_in) => Ok(Attempt::Held { expires_in }),
                    NodeAnswer::Failed(error) => {
                        // The write may have landed before the error (a timeout).
                        self.undo(name, owner, ttl).await;
                        Err(unavailable(error))
                    }
                };
            }
            let mut calls: FuturesUnordered<_> = self
                .nodes
                .iter()
                .enumerate()
                .map(|(i, node)| {
                    // Owned, so the calls still in flight when a quorum has answered can
                    // finish in the background: the nodes they reach hold the lock too, and
                    // extend and release treat them like the others.
                    let args = [
                        owner_hex.clone(),
                        ttl_ms.clone(),
                        fence_ttl_ms.clone(),
                        now.clone(),
                    ];
                    let call = acquire_on(node.store.clone(), name, args, mode);
                    async move { (i, call.await) }
                })
                .collect();
            let n = self.nodes.len();
            let mut granted: Vec<(usize, u64, u64)> = Vec::with_capacity(n);
            let mut held_for: Option<Duration> = None;
            let mut held = 0usize;
            let mut failures: Vec<StoreError> = Vec::new();
            while let Some((i, answer)) = calls.next().await {
                match answer {
                    NodeAnswer::Granted(c, e) => granted.push((i, c, e)),
                    NodeAnswer::Held(left) => {
                        held += 1;
                        held_for = match (held_for, left) {
                            (Some(a), Some(b)) => Some(a.min(b)),
                            (a, b) => a.or(b),
                        };
                    }
                    NodeAnswer::Failed(e) => failures.push(e),
                }
                // Return as soon as a quorum granted. A failed attempt waits for every node
                // (each bounded by its timeout) so that the undo below comes after them.
                if granted.len() >= self.quorum {
                    break;
                }
            }
            if !calls.is_empty() {
                tokio::spawn(async move { while calls.next().await.is_some() {} });
            }
            let validity = ttl
                .checked_sub(started.elapsed() + self.drift(ttl))
                .filter(|v| !v.is_zero());
            if granted.len() >= self.quorum
                && let Some(validity) = validity
            {
                let &(_, value, epoch) = granted
                    .iter()
                    .max_by_key(|(_, c, e)| (*c, *e))
                    .expect("a quorum is at least one node");
                let mut validity = validity;
                if n > 1 {
                    // Raise the counters of the nodes that minted less, so every later
                    // quorum (it shares a node with this one) mints more than `value`.
                    let raises: FuturesUnordered<_> = granted
                        .iter()
                        .filter(|(_, c, _)| *c < value)
                        .map(|&(i, _, _)| {
                            let node = &self.nodes[i];
                            let owner_hex = &owner_hex;
                            async move {
                                let keys =
                                    [lock_key(&node.store, name), fence_key(&node.store, name)];
                                let value = value.to_string();
                                let raised: Result<i64, _> = node
                                    .store
                                    .eval(
                                        &scripts().raise,
                                        &[&keys[0], &keys[1]],
                                        &[owner_hex.as_bytes(), value.as_bytes()],
                                    )
                                    .await;
                                matches!(raised, Ok(1))
                            }
                        })
                        .collect();
                    let raised: Vec<bool> = raises.collect().await;
                    let at_value = granted.iter().filter(|(_, c, _)| *c >= value).count()
                        + raised.iter().filter(|r| **r).count();
                    // Only a quorum at `value` makes every later quorum mint more: with
                    // fewer, a later token could repeat this one or fall below it. Not
                    // handed out; the caller tries again.
                    let left = ttl
                        .checked_sub(started.elapsed() + self.drift(ttl))
                        .filter(|v| !v.is_zero());
                    match left {
                        Some(left) if at_value >= self.quorum => validity = left,
                        _ => {
                            self.undo(name, owner, ttl).await;
                            return Ok(Attempt::Held { expires_in: None });
                        }
                    }
                }
                return Ok(Attempt::Acquired {
                    token: FencingToken::new(value, epoch),
                    validity,
                });
            }
            // Not ours: undo whatever was granted (and whatever may still land).
            self.undo(name, owner, ttl).await;
            if held == 0 || failures.len() > n - self.quorum {
                return Err(LockError::NoQuorum {
                    granted: granted.len(),
                    needed: self.quorum,
                    unreachable: failures.len(),
                });
            }
            Ok(Attempt::Held {
                expires_in: held_for,
            })
        })
    }

    fn extend<'a>(
        &'a self,
        name: &'a str,
        owner: OwnerToken,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Option<Duration>, LockError>> {
        Box::pin(async move {
            let started = Instant::now();
            let owner_hex = owner.to_hex();
            let ttl_ms = (ttl.as_millis() as u64).max(1).to_string();
            let calls: FuturesUnordered<_> = self
                .nodes
                .iter()
                .map(|node| {
                    let key = lock_key(&node.store, name);
                    let (owner_hex, ttl_ms) = (&owner_hex, &ttl_ms);
                    async move {
                        node.store
                            .eval::<i64>(
                                &scripts().extend,
                                &[&key],
                                &[owner_hex.as_bytes(), ttl_ms.as_bytes()],
                            )
                            .await
                    }
                })
                .collect();
            let answers: Vec<Result<i64, StoreError>> = calls.collect().await;
            let extended = answers.iter().filter(|a| matches!(a, Ok(1))).count();
            let refused = answers.iter().filter(|a| matches!(a, Ok(0))).count();
            let validity = ttl.checked_sub(started.elapsed() + self.drift(ttl));
            if extended >= self.quorum {
                return Ok(validity);
            }
            if refused > self.nodes.len() - self.quorum {
                return Ok(None);
            }
            let error = answers.into_iter().find_map(Result::err);
            Err(match error {
                Some(error) if self.nodes.len() == 1 => unavailable(error),
                _ => LockError::NoQuorum {
                    granted: extended,
                    needed: self.quorum,
                    unreachable: self.nodes.len() - extended - refused,
                },
            })
        })
    }

    fn release<'a>(
        &'a self,
        name: &'a str,
        owner: OwnerToken,
    ) -> BoxFuture<'a, Result<bool, LockError>> {
        Box::pin(async move {
            let owner = owner.to_hex();
            if let [node] = self.nodes.as_slice() {
                return match release_on(&node.store, name, &owner).await {
                    Ok(released) => Ok(released),
                    Err(error) => Err(unavailable(error)),
                };
            }
            let calls: FuturesUnordered<_> = self
                .nodes
                .iter()
                .map(|node| release_on(&node.store, name, &owner))
                .collect();
            let answers: Vec<Result<bool, StoreError>> = calls.collect().await;
            let released = answers.iter().filter(|a| matches!(a, Ok(true))).count();
            if released >= self.quorum {
                return Ok(true);
            }
            // Lost only when enough nodes said the lock was not ours that no quorum can have
            // held it; nodes that did not answer say nothing of the kind.
            let not_ours = answers.iter().filter(|a| matches!(a, Ok(false))).count();
            if not_ours > self.nodes.len() - self.quorum {
                return Ok(false);
            }
            let error = answers.into_iter().find_map(Result::err);
            Err(error.map_or(LockError::Lost, unavailable))
        })
    }

    fn subscribe<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Option<Subscription>> {
        Box::pin(async move {
            let (subscription, first) = self.waiters.register(name);
            if !first {
                return Some(subscription);
            }
            let calls: FuturesUnordered<_> = self
                .nodes
                .iter()
                .map(|node| {
                    let channel = channel(&node.store, name);
                    let waiters = Arc::downgrade(&self.waiters);
                    async move { node.notifier.subscribe(&channel, waiters).await }
                })
                .collect();
            let listening: Vec<bool> = calls.collect().await;
            if !listening.contains(&true) {
                // The waiters that registered meanwhile count on a subscription that is not
                // there: the next one tries again.
                self.waiters.unlistened(name);
                return None;
            }
            Some(subscription)
        })
    }
}

/// A numbered pub/sub connection: the sink that subscribes, and the task that listens.
/// Dropped (replaced after a failure), it stops its listener, which closes the connection:
/// an abandoned connection would otherwise live on, subscribed, with its task.
struct Link {
    number: u64,
    sink: PubSubSink,
    listener: Option<tokio::task::AbortHandle>,
}

impl Drop for Link {
    fn drop(&mut self) {
        if let Some(listener) = self.listener.take() {
            listener.abort();
        }
    }
}

/// One pub/sub connection to one node, shared by every waiter of the process.
struct Notifier {
    /// For the channel names of the lock names waited on.
    store: RedisStore,
    /// The connection (numbered, so a listener whose connection has been replaced leaves
    /// the new one alone).
    sink: tokio::sync::Mutex<Option<Link>>,
    /// On a cluster: one RESP3 cluster connection for shard channels. redis-rs moves its
    /// subscriptions with their slots and restores them after a reconnect.
    sharded: tokio::sync::Mutex<Option<ClusterConnection>>,
    /// Shard channels whose subscription has been confirmed: a later confirmation is a
    /// resubscription (after a reconnect or a slot move), and wakes the channel's waiters
    /// in case its release came while nobody listened.
    confirmed: Arc<Mutex<HashSet<String>>>,
    failed_at: Mutex<Option<Instant>>,
    connections: std::sync::atomic::AtomicU64,
    me: Weak<Notifier>,
}

impl Notifier {
    /// Subscribes to `channel`, connecting first when needed. False when the node cannot
    /// be reached now (then waiters poll; a reconnect is tried at most once a second).
    ///
    /// The shared connection may have died since it was last used (a proxy's idle
    /// timeout, a network blip, a Redis restart): a subscribe that fails on it is tried
    /// once more on a new connection, so the next waiter is notified again.
    async fn subscribe(&self, channel: &str, waiters: Weak<WaitList>) -> bool {
        if self.store.config().is_cluster() {
            return self.subscribe_sharded(channel, waiters).await;
        }
        let mut sink = self.sink.lock().await;
        for _ in 0..2 {
            if sink.is_none() {
                if self.failed_recently() {
                    return false;
                }
                match tokio::time::timeout(
                    Duration::from_millis(500),
                    self.connect(waiters.clone()),
                )
                .await
                {
                    Ok(Some(connected)) => *sink = Some(connected),
                    _ => {
                        self.failed_now();
                        return false;
                    }
                }
            }
            let Some(link) = sink.as_mut() else {
                return false;
            };
            match tokio::time::timeout(Duration::from_millis(500), link.sink.subscribe(channel))
                .await
            {
                Ok(Ok(())) => return true,
                _ => *sink = None,
            }
        }
        false
    }

    /// Subscribes to the shard channel `channel` on a cluster, connecting first when
    /// needed. False when that fails (a cluster before Redis 7.0 has no sharded pub/sub;
    /// then waiters poll, and a new try comes at most once a second).
    async fn subscribe_sharded(&self, channel: &str, waiters: Weak<WaitList>) -> bool {
        let mut sharded = self.sharded.lock().await;
        if sharded.is_none() {
            if self.failed_recently() {
                return false;
            }
            let limit = self.store.config().connect_limit();
            match tokio::time::timeout(limit * 3, self.connect_sharded(waiters)).await {
                Ok(Some(connected)) => *sharded = Some(connected),
                _ => {
                    self.failed_now();
                    return false;
                }
            }
        }
        let Some(connected) = sharded.as_mut() else {
            return false;
        };
        // A failed subscribe fails this name's waiters only (they poll; the next waiter
        // tries again): the connection serves the other names on.
        matches!(
            tokio::time::timeout(Duration::from_millis(500), connected.ssubscribe(channel)).await,
            Ok(Ok(()))
        )
    }

    /// Opens the cluster connection for shard channels. Its pushes are handled as they
    /// arrive, on redis-rs's own task (see [`on_push`]).
    async fn connect_sharded(&self, waiters: Weak<WaitList>) -> Option<ClusterConnection> {
        let config = self.store.config();
        let confirmed = self.confirmed.clone();
        let client = config
            .cluster_client()
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(move |push: redis::PushInfo| {
                on_push(&waiters, &confirmed, push);
                Ok::<(), std::convert::Infallible>(())
            })
            .connection_timeout(config.connect_limit())
            .response_timeout(config.connect_limit())
            .build()
            .ok()?;
        client.get_async_connection().await.ok()
    }

    /// Ends the subscription to `channel`, unless `waited` says a waiter has come back.
    async fn unsubscribe(&self, channel: &str, waited: impl Fn() -> bool) {
        if self.store.config().is_cluster() {
            let mut sharded = self.sharded.lock().await;
            if waited() {
                return;
            }
            if let Some(connected) = sharded.as_mut() {
                let _ = tokio::time::timeout(
                    Duration::from_millis(500),
                    connected.sunsubscribe(channel),
                )
                .await;
            }
            self.confirmed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(channel);
            return;
        }
        let mut sink = self.sink.lock().await;
        if waited() {
            return;
        }
        if let Some(link) = sink.as_mut()
            && !matches!(
                tokio::time::timeout(Duration::from_millis(500), link.sink.unsubscribe(channel))
                    .await,
                Ok(Ok(()))
            )
        {
            *sink = None;
        }
    }

    fn failed_recently(&self) -> bool {
        self.failed_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
    }

    fn failed_now(&self) {
        *self
            .failed_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
    }

    /// Opens a pub/sub connection and starts the task that wakes waiters on its messages.
    async fn connect(&self, waiters: Weak<WaitList>) -> Option<Link> {
        let client = self.store.node_client()?;
        let pubsub = client.get_async_pubsub().await.ok()?;
        let (sink, stream) = pubsub.split();
        let number = self.connections.fetch_add(1, Ordering::Relaxed) + 1;
        let listener = tokio::spawn(listen(stream, waiters, self.me.clone(), number));
        Some(Link {
            number,
            sink,
            listener: Some(listener.abort_handle()),
        })
    }

    /// Connection `number` is gone: unless a newer one already serves, open another and
    /// subscribe it to every name still waited on, so those waiters keep being woken by
    /// releases rather than by their polls.
    async fn resubscribe(&self, number: u64, list: &WaitList, waiters: Weak<WaitList>) {
        let mut sink = self.sink.lock().await;
        if sink.as_ref().is_some_and(|link| link.number != number) {
            return;
        }
        if let Some(mut old) = sink.take() {
            // Its listener is the caller, on its way out: not to be aborted mid-way.
            old.listener = None;
        }
        let names = list.names();
        if names.is_empty() {
            return;
        }
        // Whatever fails below leaves these names unlistened: their next waiter subscribes
        // again (on a new connection).
        let lost = |list: &WaitList| {
            for name in &names {
                list.unlistened(name);
            }
        };
        if self.failed_recently() {
            lost(list);
            return;
        }
        let Ok(Some(mut connected)) =
            tokio::time::timeout(Duration::from_millis(500), self.connect(waiters)).await
        else {
            self.failed_now();
            lost(list);
            return;
        };
        for name in &names {
            let channel = channel(&self.store, name);
            let subscribed = tokio::time::timeout(
                Duration::from_millis(500),
                connected.sink.subscribe(&channel),
            )
            .await;
            if !matches!(subscribed, Ok(Ok(()))) {
                lost(list);
                return;
            }
        }
        *sink = Some(connected);
    }
}

/// Handles a push of the cluster connection for shard channels: a release wakes the lock
/// name's waiters; so does a confirmation of a subscription confirmed before (redis-rs
/// subscribed again after a reconnect or a slot move: a release may have come meanwhile);
/// a lost node connection wakes every waiter (redis-rs reconnects and resubscribes).
fn on_push(waiters: &Weak<WaitList>, confirmed: &Mutex<HashSet<String>>, push: redis::PushInfo) {
    let Some(list) = waiters.upgrade() else {
        return;
    };
    let channel = match push.data.first() {
        Some(redis::Value::BulkString(channel)) => Some(channel.as_slice()),
        _ => None,
    };
    match (push.kind, channel.and_then(name_of_channel)) {
        (redis::PushKind::SMessage, Some(name)) => list.wake(name),
        (redis::PushKind::SSubscribe, Some(name)) => {
            let again = !confirmed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(String::from_utf8_lossy(channel.unwrap_or_default()).into_owned());
            if again {
                list.wake(name);
            }
        }
        (redis::PushKind::Disconnection, _) => {
            for name in list.names() {
                list.wake(&name);
            }
        }
        _ => {}
    }
}

/// Wakes the waiters of each lock name a release is published for, until the connection
/// ends; then has the notifier reconnect for the names still waited on, and wakes every
/// waiter once (a release may have come while no connection listened).
fn listen(
    mut stream: redis::aio::PubSubStream,
    waiters: Weak<WaitList>,
    notifier: Weak<Notifier>,
    number: u64,
) -> BoxFuture<'static, ()> {
    Box::pin(async move {
        while let Some(message) = stream.next().await {
            let Some(list) = waiters.upgrade() else {
                return;
            };
            if let Some(name) = name_of_channel(message.get_channel_name().as_bytes()) {
                list.wake(name);
            }
        }
        let Some(list) = waiters.upgrade() else {
            return;
        };
        if let Some(notifier) = notifier.upgrade() {
            notifier.resubscribe(number, &list, waiters.clone()).await;
        }
        for name in list.names() {
            list.wake(&name);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_parse_back() {
        assert_eq!(
            name_of_channel(b"battlement:lock:{order:42}:released"),
            Some("order:42")
        );
        assert_eq!(name_of_channel(b"battlement:lock:order:released"), None);
        // A prefix that is itself a hash tag.
        assert_eq!(
            name_of_channel(b"{app}:lock:{order:42}:released"),
            Some("order:42")
        );
        assert_eq!(name_of_channel(b"\xff{x}:released"), None);
    }

    #[test]
    fn grants_parse() {
        assert_eq!(
            parse_granted(b"1795672311799001 1795672311799000"),
            Some((1_795_672_311_799_001, 1_795_672_311_799_000))
        );
        for bad in [&b""[..], b"12", b"1 x", b"-1 2", b"1.5e15 1", b"\xff 1"] {
            assert_eq!(parse_granted(bad), None, "{bad:?}");
        }
    }
}
