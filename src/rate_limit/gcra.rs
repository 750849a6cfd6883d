//! The generic cell rate algorithm over several policies at once, and the contract every
//! backend obeys.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use super::policy::{Limit, MAX_POLICIES, Policies};
use crate::annotate::LimitSource;

/// The state of one policy after a decision.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyState {
    /// Requests (of cost 1) left before this policy refuses.
    pub remaining: u64,
    /// Time until this policy's bucket is full again.
    pub reset: Duration,
    /// Whether this policy refused the request.
    pub violated: bool,
}

/// A rate-limit decision over all of a layer's policies.
///
/// Kept compact (it is made on every request): per-policy figures are stored as plain
/// arrays and handed out as [`PolicyState`]s on demand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Whether every policy allowed the request (and so it was charged on all of them).
    pub allowed: bool,
    /// Where the decision came from.
    pub source: LimitSource,
    len: u8,
    /// Bit `i` set: policy `i` refused.
    pub(crate) violated: u8,
    retry_after_ns: u64,
    remaining: [u64; MAX_POLICIES],
    reset_ns: [u64; MAX_POLICIES],
}

impl Decision {
    /// A decision from its parts (for backends): per policy `(remaining, reset, violated)`.
    pub fn new(
        allowed: bool,
        retry_after: Duration,
        states: impl IntoIterator<Item = PolicyState>,
        source: LimitSource,
    ) -> Self {
        let mut d = Self::pass(source, 0);
        d.allowed = allowed;
        d.retry_after_ns = retry_after.as_nanos().min(u128::from(u64::MAX)) as u64;
        for (i, state) in states.into_iter().take(MAX_POLICIES).enumerate() {
            d.remaining[i] = state.remaining;
            d.reset_ns[i] = state.reset.as_nanos().min(u128::from(u64::MAX)) as u64;
            if state.violated {
                d.violated |= 1 << i;
            }
            d.len = i as u8 + 1;
        }
        d
    }

    /// When refused: how long until the same request would be allowed.
    pub fn retry_after(&self) -> Duration {
        Duration::from_nanos(self.retry_after_ns)
    }

    /// How many policies the decision covers.
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// Whether it covers none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The state of policy `i` (in the layer's policy order).
    pub fn state(&self, i: usize) -> PolicyState {
        PolicyState {
            remaining: self.remaining[i],
            reset: Duration::from_nanos(self.reset_ns[i]),
            violated: self.violated & (1 << i) != 0,
        }
    }

    /// The per-policy states, in the layer's policy order.
    pub fn states(&self) -> impl Iterator<Item = PolicyState> + '_ {
        (0..self.len()).map(|i| self.state(i))
    }

    /// A decision that lets the request through without knowing any state.
    pub(crate) fn pass(source: LimitSource, len: usize) -> Self {
        Self {
            allowed: true,
            source,
            len: len as u8,
            violated: 0,
            retry_after_ns: 0,
            remaining: [0; MAX_POLICIES],
            reset_ns: [0; MAX_POLICIES],
        }
    }

    /// The policy that decided: the first violated one, else the one with least left.
    pub(crate) fn deciding(&self) -> Option<usize> {
        if self.violated != 0 {
            return Some(self.violated.trailing_zeros() as usize);
        }
        (0..self.len()).min_by_key(|&i| self.remaining[i])
    }
}

/// The store could not be asked, and the failure policy is to refuse.
#[derive(Clone, Debug, thiserror::Error)]
#[error("rate-limit store unavailable: {reason}")]
pub struct Unavailable {
    /// Why.
    pub reason: Arc<str>,
}

/// A pending decision from a backend that must wait (for Redis).
pub type CheckFuture = Pin<Box<dyn Future<Output = Result<Decision, Unavailable>> + Send>>;

/// What a backend's [`Backend::check`] returns: a decision made at once (in memory, with
/// no allocation), or one to wait for.
pub enum Check {
    /// Allowed and charged. Only when the caller asked for no details
    /// ([`PoliciesRef::details`] is false): the in-memory hot path.
    Allowed,
    /// Decided.
    Ready(Result<Decision, Unavailable>),
    /// To be awaited.
    Pending(CheckFuture),
}

impl fmt::Debug for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Check::Allowed => f.write_str("Allowed"),
            Check::Ready(r) => f.debug_tuple("Ready").field(r).finish(),
            Check::Pending(_) => f.write_str("Pending"),
        }
    }
}

/// Where a layer keeps its GCRA state. The in-memory and the Redis backends obey the same
/// contract, proven by one test suite run against both:
///
/// - a request is allowed only if every policy allows it at cost `cost`, and only then is it
///   charged on all of them;
/// - a refused request changes nothing (except a bucket left past its capacity by a quota
///   change to a faster rate, which is brought back to it);
/// - the decision reports, per policy, what is left and when the bucket is full again.
pub trait Backend<K>: Send + Sync + 'static {
    /// Checks and (if allowed) charges `key`.
    #[doc(hidden)]
    fn check(&self, layer: &str, key: &K, policies: &PoliciesRef<'_>, cost: u32) -> Check;

    /// Where this backend's decisions come from, for the annotation of a request decided
    /// without asking it (a cost no burst can cover).
    #[doc(hidden)]
    fn source(&self) -> LimitSource {
        LimitSource::Memory
    }
}

/// The policies of a layer, as a backend sees them.
#[derive(Clone, Copy, Debug)]
pub struct PoliciesRef<'a> {
    pub(crate) inner: &'a Policies,
    pub(crate) details: bool,
}

impl PoliciesRef<'_> {
    /// Whether the caller needs the decision's details (remaining, reset) even when the
    /// request is allowed. When false, a backend may answer [`Check::Allowed`].
    pub fn details(&self) -> bool {
        self.details
    }

    /// The policy names, in order.
    pub fn names(&self) -> &[Arc<str>] {
        &self.inner.names
    }

    /// How many policies there are.
    pub fn len(&self) -> usize {
        self.inner.len
    }

    /// Whether there are none (never, for a built layer).
    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }
}

/// Where a bucket with theoretical arrival time `tat` stands at `now`: never before `now`
/// (an idle bucket is full), and never further ahead than the limit's capacity. Under one
/// quota a bucket never gets further ahead; after a quota change to a faster rate it can,
/// and would then keep a limited client out for the old, longer window.
#[inline]
fn start(tat: u64, now: u64, limit: &Limit) -> u64 {
    tat.clamp(now, now.saturating_add(limit.capacity_ns))
}

/// Checks `cost` against every limit with theoretical arrival times `tats` (0 = a fresh
/// bucket) at time `now` (nanoseconds, any consistent origin). Charges all limits if all
/// allow it; changes nothing otherwise.
/// The hot path of [`check_all`]: charges all limits and returns true if all allow `cost`,
/// changes nothing and returns false otherwise. No details are computed.
#[inline]
pub(crate) fn charge(tats: &mut [u64], limits: &[Limit], now: u64, cost: u32) -> bool {
    let mut next = [0u64; MAX_POLICIES];
    for ((limit, tat), next) in limits.iter().zip(tats.iter()).zip(&mut next) {
        let new_tat = start(*tat, now, limit) + u64::from(cost) * limit.interval_ns;
        if new_tat - now > limit.capacity_ns {
            return false;
        }
        *next = new_tat;
    }
    for (tat, next) in tats.iter_mut().zip(next).take(limits.len()) {
        *tat = next;
    }
    true
}

#[inline]
pub(crate) fn check_all(
    tats: &mut [u64],
    limits: &[Limit],
    now: u64,
    cost: u32,
    source: LimitSource,
) -> Decision {
    let limits = &limits[..limits.len().min(MAX_POLICIES)];
    let mut next = [0u64; MAX_POLICIES];
    let mut violated = 0u8;
    let mut wait = 0u64;
    for (i, ((limit, tat), next)) in limits.iter().zip(tats.iter()).zip(&mut next).enumerate() {
        let new_tat = start(*tat, now, limit) + u64::from(cost) * limit.interval_ns;
        *next = new_tat;
        let ahead = new_tat - now;
        if ahead > limit.capacity_ns {
            violated |= 1 << i;
            wait = wait.max(ahead - limit.capacity_ns);
        }
    }
    let allowed = violated == 0;
    let mut d = Decision {
        allowed,
        source,
        len: limits.len() as u8,
        violated,
        retry_after_ns: wait,
        remaining: [0; MAX_POLICIES],
        reset_ns: [0; MAX_POLICIES],
    };
    for (i, ((limit, tat), next)) in limits.iter().zip(tats.iter_mut()).zip(next).enumerate() {
        if allowed {
            *tat = next;
        } else {
            // Past the capacity only after a quota change to a faster rate: kept at the
            // capacity from now, so the bucket refills at the new pace from here.
            *tat = (*tat).min(now.saturating_add(limit.capacity_ns));
        }
        let used = start(*tat, now, limit) - now;
        d.remaining[i] = limit.capacity_ns.saturating_sub(used) / limit.interval_ns;
        d.reset_ns[i] = used;
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate_limit::Quota;

    fn limit(count: u32, secs: u64, burst: Option<u32>) -> Limit {
        let mut q = Quota::requests_per(count, Duration::from_secs(secs));
        if let Some(b) = burst {
            q = q.with_burst(b);
        }
        q.validate().unwrap()
    }

    const S: u64 = 1_000_000_000;

    #[test]
    fn burst_then_steady_rate() {
        // 10 per second, burst 10: ten at once, then one every 100 ms.
        let limits = [limit(10, 1, None)];
        let mut tats = [0u64; MAX_POLICIES];
        let now = 5 * S;
        for i in 0..10 {
            let d = check_all(&mut tats, &limits, now, 1, LimitSource::Memory);
            assert!(d.allowed, "request {i}");
            assert_eq!(d.state(0).remaining, 9 - i);
        }
        let d = check_all(&mut tats, &limits, now, 1, LimitSource::Memory);
        assert!(!d.allowed);
        assert_eq!(d.retry_after(), Duration::from_millis(100));
        assert_eq!(d.state(0).reset, Duration::from_secs(1));
        // 99 ms later: still refused; 100 ms later: exactly one more.
        assert!(!check_all(&mut tats, &limits, now + S / 10 - 1, 1, LimitSource::Memory).allowed);
        assert!(check_all(&mut tats, &limits, now + S / 10, 1, LimitSource::Memory).allowed);
        assert!(!check_all(&mut tats, &limits, now + S / 10, 1, LimitSource::Memory).allowed);
        // After a full second idle the bucket is full again.
        let d = check_all(&mut tats, &limits, now + 2 * S, 1, LimitSource::Memory);
        assert_eq!(d.state(0).remaining, 9);
    }

    #[test]
    fn all_or_nothing_across_policies() {
        // "burst": 5 per second; "daily": 7 per day.
        let limits = [limit(5, 1, None), limit(7, 86_400, None)];
        let mut tats = [0u64; MAX_POLICIES];
        let mut now = S;
        let mut allowed = 0;
        for _ in 0..20 {
            if check_all(&mut tats, &limits, now, 1, LimitSource::Memory).allowed {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 5, "burst policy caps the first second");
        let before = tats;
        // A refusal by the burst policy must not charge the daily one.
        let d = check_all(&mut tats, &limits, now, 1, LimitSource::Memory);
        assert!(!d.allowed && d.state(0).violated && !d.state(1).violated);
        assert_eq!(tats, before);
        assert_eq!(d.state(1).remaining, 2);
        // Over time only 2 more pass: the daily policy.
        for _ in 0..10 {
            now += S;
            if check_all(&mut tats, &limits, now, 1, LimitSource::Memory).allowed {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 7);
    }

    #[test]
    fn cost_charges_several_units() {
        let limits = [limit(10, 1, None)];
        let mut tats = [0u64; MAX_POLICIES];
        let d = check_all(&mut tats, &limits, S, 4, LimitSource::Memory);
        assert!(d.allowed);
        assert_eq!(d.state(0).remaining, 6);
        assert!(check_all(&mut tats, &limits, S, 6, LimitSource::Memory).allowed);
        let d = check_all(&mut tats, &limits, S, 3, LimitSource::Memory);
        assert!(!d.allowed);
        assert_eq!(d.retry_after(), Duration::from_millis(300));
    }

    #[test]
    fn smaller_burst_same_rate() {
        let limits = [limit(100, 60, Some(2))];
        let mut tats = [0u64; MAX_POLICIES];
        assert!(check_all(&mut tats, &limits, S, 1, LimitSource::Memory).allowed);
        assert!(check_all(&mut tats, &limits, S, 1, LimitSource::Memory).allowed);
        let d = check_all(&mut tats, &limits, S, 1, LimitSource::Memory);
        assert!(!d.allowed);
        assert_eq!(d.retry_after(), Duration::from_millis(600));
    }

    #[test]
    fn divided_limit_for_local_fallback() {
        let l = limit(100, 60, None).divided(4);
        assert_eq!(l.burst(), 25);
        assert_eq!(l.interval_ns, 2_400_000_000);
    }
}
