//! The Redis backend: one Lua script, one round trip, all policies at once.
//!
//! Each key is one Redis hash, `{prefix}:rl:{layer}:{{key}}`, with one field per policy
//! holding its theoretical arrival time in microseconds. The script reads the time from
//! Redis (`TIME`), never from the app servers (whose clocks disagree), checks every policy,
//! charges all of them only if all allow the request, and sets the key to expire when every
//! bucket is full again. One key per client means one cluster slot, so it runs unchanged on
//! Redis Cluster.

use std::fmt::Display;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use super::gcra::{Backend, Check, Decision, PoliciesRef, PolicyState, Unavailable};
use super::memory::{DEFAULT_MAX_KEYS, MemoryBackend};
use super::policy::{FailurePolicy, Limit, MAX_POLICIES};
use crate::annotate::LimitSource;
use crate::redis::{RedisStore, Script, StoreError};

const SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cost = tonumber(ARGV[1])
local n = (#ARGV - 1) / 3
local names = {}
for i = 1, n do names[i] = ARGV[3 * i - 1] end
local all = redis.call('HGETALL', KEYS[1])
local known = {}
for i = 1, #all, 2 do known[all[i]] = tonumber(all[i + 1]) end
local allowed = 1
local clamped = nil
local wait = 0
local tats = {}
local next = {}
local violated = {}
for i = 1, n do
  local interval = tonumber(ARGV[3 * i])
  local cap = tonumber(ARGV[3 * i + 1])
  local tat = known[names[i]] or now
  if tat < now then tat = now end
  if tat > now + cap then
    -- Past the capacity only after a quota change to a faster rate: kept at the
    -- capacity from now (written below even when refused), so it refills at the new pace.
    tat = now + cap
    clamped = clamped or {}
    clamped[#clamped + 1] = names[i]
    clamped[#clamped + 1] = string.format('%d', tat)
  end
  tats[i] = tat
  next[i] = tat + cost * interval
  violated[i] = 0
  local ahead = next[i] - now
  if ahead > cap then
    allowed = 0
    violated[i] = 1
    if ahead - cap > wait then wait = ahead - cap end
  end
end
local out = {allowed, wait}
local ttl = 0
local fields = {}
for i = 1, n do
  local interval = tonumber(ARGV[3 * i])
  local cap = tonumber(ARGV[3 * i + 1])
  local tat = tats[i]
  if allowed == 1 then
    tat = next[i]
    fields[#fields + 1] = names[i]
    fields[#fields + 1] = string.format('%d', tat)
  end
  local used = tat - now
  if used > ttl then ttl = used end
  local remaining = math.floor((cap - used) / interval)
  if remaining < 0 then remaining = 0 end
  out[#out + 1] = remaining
  out[#out + 1] = used
  out[#out + 1] = violated[i]
end
if allowed == 1 then
  -- The key lives as long as its furthest bucket, this layer's or another's (another
  -- layer, or a replica with other policies, shares the key).
  for i = 1, n do known[names[i]] = nil end
  for _, tat in pairs(known) do
    if tat - now > ttl then ttl = tat - now end
  end
  redis.call('HSET', KEYS[1], unpack(fields))
  redis.call('PEXPIRE', KEYS[1], math.floor(ttl / 1000) + 1)
elseif clamped then
  redis.call('HSET', KEYS[1], unpack(clamped))
end
return out
"#;

/// A limiter whose state is in Redis, shared by every instance of the service.
///
/// Requests wait at most the store's timeout (see [`crate::redis::RedisConfig::timeout`]);
/// when Redis cannot answer, the [`FailurePolicy`] decides (default: a local in-memory
/// limiter, `replicas: 1`). It goes back to Redis by itself once Redis answers again.
pub struct RedisBackend<K> {
    inner: Arc<Inner<K>>,
}

struct Inner<K> {
    store: RedisStore,
    script: Script,
    failure: FailurePolicy,
    fallback: MemoryBackend<K>,
}

impl<K> Clone for RedisBackend<K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<K> std::fmt::Debug for RedisBackend<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackend")
            .field("store", &self.inner.store)
            .field("failure", &self.inner.failure)
            .finish()
    }
}

impl<K> RedisBackend<K> {
    /// A limiter on `store`, falling back to a local limiter while Redis is unreachable.
    pub fn new(store: RedisStore) -> Self {
        Self::with(store, FailurePolicy::default(), DEFAULT_MAX_KEYS)
    }

    fn with(store: RedisStore, failure: FailurePolicy, local_max_keys: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                script: Script::new(SCRIPT),
                failure,
                fallback: MemoryBackend::new(local_max_keys),
            }),
        }
    }

    /// What to do while Redis is unreachable.
    #[must_use]
    pub fn on_failure(self, failure: FailurePolicy) -> Self {
        let max = self.inner.fallback.max_keys();
        Self::with(self.inner.store.clone(), failure, max)
    }

    /// The key cap of the local fallback limiter (default 100,000).
    #[must_use]
    pub fn local_max_keys(self, max_keys: usize) -> Self {
        Self::with(self.inner.store.clone(), self.inner.failure, max_keys)
    }

    /// The store this backend uses.
    pub fn store(&self) -> &RedisStore {
        &self.inner.store
    }
}

impl<K> Inner<K>
where
    K: Hash + Eq + Clone,
{
    fn on_unreachable(
        &self,
        err: &StoreError,
        key: &K,
        limits: &[Limit],
        cost: u32,
    ) -> Result<Decision, Unavailable> {
        tracing::debug!(error = %err, "battlement: rate-limit store unreachable");
        match self.failure {
            FailurePolicy::Open => Ok(Decision::pass(LimitSource::FailOpen, limits.len())),
            FailurePolicy::Closed => Err(Unavailable {
                reason: Arc::from(err.to_string()),
            }),
            FailurePolicy::Local { replicas } => {
                let mut local = [Limit::default(); MAX_POLICIES];
                for (l, limit) in local.iter_mut().zip(limits) {
                    *l = limit.divided(replicas);
                }
                // A cost over this replica's share of a burst (but within the whole burst,
                // or the layer would have refused it) could never pass here, and would be
                // told to retry in vain: it is charged the whole local burst instead.
                let local_max = local[..limits.len()]
                    .iter()
                    .map(Limit::burst)
                    .min()
                    .unwrap_or(1);
                let cost = cost.min(u32::try_from(local_max).unwrap_or(u32::MAX));
                let mut d = self.fallback.decide(key, &local[..limits.len()], cost);
                d.source = LimitSource::LocalFallback;
                Ok(d)
            }
        }
    }
}

fn parse_reply(reply: &[i64], len: usize) -> Result<Decision, StoreError> {
    if reply.len() != 2 + 3 * len {
        return Err(StoreError::Protocol(format!(
            "rate-limit script returned {} values, expected {}",
            reply.len(),
            2 + 3 * len
        )));
    }
    let states = (0..len).map(|i| {
        let base = 2 + 3 * i;
        PolicyState {
            remaining: reply[base].max(0) as u64,
            reset: Duration::from_micros(reply[base + 1].max(0) as u64),
            violated: reply[base + 2] == 1,
        }
    });
    Ok(Decision::new(
        reply[0] == 1,
        Duration::from_micros(reply[1].max(0) as u64),
        states,
        LimitSource::Redis,
    ))
}

impl<K> Backend<K> for RedisBackend<K>
where
    K: Hash + Eq + Clone + Display + Send + Sync + 'static,
{
    fn source(&self) -> LimitSource {
        LimitSource::Redis
    }

    fn check(&self, layer: &str, key: &K, policies: &PoliciesRef<'_>, cost: u32) -> Check {
        let inner = self.inner.clone();
        let redis_key = inner.store.key(&format!("rl:{layer}"), key);
        let policies = policies.inner;
        let current = policies.limits();
        let (limits, len): ([Limit; MAX_POLICIES], usize) = (current.limits, current.len);
        // ARGV: cost, then name, interval and capacity (microseconds) per policy.
        let mut args: Vec<Vec<u8>> = Vec::with_capacity(1 + 3 * len);
        args.push(cost.to_string().into_bytes());
        for (name, limit) in policies.names.iter().zip(&limits[..len]) {
            let interval_us = limit.interval_ns.div_ceil(1000).max(1);
            let capacity_us = interval_us * limit.burst();
            args.push(name.as_bytes().to_vec());
            args.push(interval_us.to_string().into_bytes());
            args.push(capacity_us.to_string().into_bytes());
        }
        let key = key.clone();
        Check::Pending(Box::pin(async move {
            let arg_refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
            let result: Result<Vec<i64>, StoreError> = inner
                .store
                .eval(&inner.script, &[redis_key.as_str()], &arg_refs)
                .await;
            match result.and_then(|reply| parse_reply(&reply, len)) {
                Ok(decision) => Ok(decision),
                Err(err) => inner.on_unreachable(&err, &key, &limits[..len], cost),
            }
        }))
    }
}
