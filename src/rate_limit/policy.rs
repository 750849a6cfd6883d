//! Quotas, named policies, and what to do when the shared store is unreachable.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::HeaderValue;
use parking_lot::RwLock;

/// How many requests a key may make: a sustained rate and a burst.
///
/// `Quota::requests_per(100, Duration::from_secs(60))` means 100 requests per minute, all of
/// which may come at once (the burst defaults to the count); after that one more request
/// is allowed every 600 ms. [`Quota::with_burst`] sets a smaller (or larger) burst with the
/// same sustained rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    count: u32,
    period: Duration,
    burst: Option<u32>,
}

impl Quota {
    /// `count` requests per `period`, with a burst of `count`.
    pub fn requests_per(count: u32, period: Duration) -> Self {
        Self {
            count,
            period,
            burst: None,
        }
    }

    /// Sets how many requests may come at once (default: the count).
    #[must_use]
    pub fn with_burst(mut self, burst: u32) -> Self {
        self.burst = Some(burst);
        self
    }

    /// Requests per period.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The period.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// The burst: requests a full bucket holds.
    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or(self.count)
    }

    /// The time one request's capacity takes to come back.
    pub fn interval(&self) -> Duration {
        self.period / self.count.max(1)
    }

    pub(crate) fn validate(&self) -> Result<Limit, String> {
        if self.count == 0 {
            return Err("the request count must be at least 1".into());
        }
        if self.burst() == 0 {
            return Err("the burst must be at least 1".into());
        }
        let interval_ns = (self.period.as_nanos() / u128::from(self.count)) as u64;
        if interval_ns == 0 {
            return Err("the period is too short for the count (under 1 ns per request)".into());
        }
        let capacity_ns = interval_ns
            .checked_mul(u64::from(self.burst()))
            .filter(|c| *c < u64::MAX / 4)
            .ok_or_else(|| "the burst times the interval overflows".to_string())?;
        Ok(Limit {
            interval_ns,
            capacity_ns,
        })
    }
}

/// The compiled form of a [`Quota`] that the GCRA arithmetic uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(crate) struct Limit {
    /// Emission interval: the time one unit of cost takes to come back.
    pub(crate) interval_ns: u64,
    /// Burst times interval: how far ahead of now the theoretical arrival time may run.
    pub(crate) capacity_ns: u64,
}

impl Limit {
    pub(crate) fn burst(&self) -> u64 {
        self.capacity_ns / self.interval_ns
    }

    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn divided(&self, replicas: u32) -> Limit {
        let replicas = u64::from(replicas.max(1));
        let interval_ns = self.interval_ns.saturating_mul(replicas);
        let burst = (self.burst() / replicas).max(1);
        Limit {
            interval_ns,
            capacity_ns: interval_ns.saturating_mul(burst),
        }
    }
}

/// The most policies one layer may hold.
pub const MAX_POLICIES: usize = 4;

/// The compiled policies of one layer. The quotas can be changed while the layer runs
/// ([`Policies::set`]); the names and their order cannot.
#[derive(Debug)]
pub(crate) struct Policies {
    pub(crate) names: Arc<[Arc<str>]>,
    pub(crate) len: usize,
    /// Each limit as two atomics, read with plain (relaxed) loads on the hot path.
    limits: [AtomicLimit; MAX_POLICIES],
    /// The smallest burst: a cost above it can never be allowed.
    max_cost: AtomicU64,
    /// The quotas and the `RateLimit-Policy` field value built from them; changed together.
    described: RwLock<Described>,
}

#[derive(Debug, Default)]
struct AtomicLimit {
    interval_ns: AtomicU64,
    capacity_ns: AtomicU64,
}

#[derive(Debug)]
struct Described {
    quotas: [Option<Quota>; MAX_POLICIES],
    header: HeaderValue,
}

/// A copy of the current limits.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Current {
    pub(crate) limits: [Limit; MAX_POLICIES],
    pub(crate) len: usize,
}

impl std::ops::Deref for Current {
    type Target = [Limit];

    #[inline]
    fn deref(&self) -> &[Limit] {
        &self.limits[..self.len]
    }
}

fn describe(names: &[Arc<str>], quotas: &[Option<Quota>]) -> Result<HeaderValue, String> {
    let mut header = String::new();
    for (name, quota) in names.iter().zip(quotas) {
        let Some(quota) = quota else { continue };
        let limit = quota.validate()?;
        if !header.is_empty() {
            header.push_str(", ");
        }
        let window = Duration::from_nanos(limit.capacity_ns).as_secs_f64().ceil() as u64;
        header.push_str(&format!(
            "\"{name}\";q={};w={}",
            quota.burst(),
            window.max(1)
        ));
    }
    HeaderValue::from_str(&header).map_err(|_| header)
}

impl Policies {
    pub(crate) fn new(list: &[(Arc<str>, Quota)]) -> Result<Self, super::ConfigError> {
        use super::ConfigError;
        if list.is_empty() {
            return Err(ConfigError::NoPolicy);
        }
        if list.len() > MAX_POLICIES {
            return Err(ConfigError::TooManyPolicies(list.len()));
        }
        let mut quotas = [None; MAX_POLICIES];
        for (i, (name, quota)) in list.iter().enumerate() {
            if name.is_empty()
                || name.len() > 64
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
            {
                return Err(ConfigError::InvalidPolicyName(name.to_string()));
            }
            if list[..i].iter().any(|(other, _)| other == name) {
                return Err(ConfigError::DuplicatePolicy(name.to_string()));
            }
            quota
                .validate()
                .map_err(|why| ConfigError::InvalidQuota(name.to_string(), why))?;
            quotas[i] = Some(*quota);
        }
        let names: Arc<[Arc<str>]> = list.iter().map(|(n, _)| n.clone()).collect();
        let header = describe(&names, &quotas).map_err(ConfigError::InvalidPolicyName)?;
        let policies = Self {
            names,
            len: list.len(),
            limits: Default::default(),
            max_cost: AtomicU64::new(1),
            described: RwLock::new(Described { quotas, header }),
        };
        policies.publish(&quotas);
        Ok(policies)
    }

    /// Writes the limits of `quotas` (all valid) and the smallest burst.
    fn publish(&self, quotas: &[Option<Quota>; MAX_POLICIES]) {
        let mut max_cost = u64::MAX;
        for (slot, quota) in self.limits.iter().zip(quotas).take(self.len) {
            let limit = quota
                .expect("a quota per policy")
                .validate()
                .expect("validated");
            slot.interval_ns.store(limit.interval_ns, Ordering::Relaxed);
            slot.capacity_ns.store(limit.capacity_ns, Ordering::Relaxed);
            max_cost = max_cost.min(limit.burst());
        }
        self.max_cost.store(max_cost, Ordering::Relaxed);
    }

    /// Replaces the quota of policy `name`.
    pub(crate) fn set(&self, name: &str, quota: Quota) -> Result<(), super::ConfigError> {
        use super::ConfigError;
        let i = self.names[..self.len]
            .iter()
            .position(|n| n.as_ref() == name)
            .ok_or_else(|| ConfigError::UnknownPolicy(name.to_owned()))?;
        quota
            .validate()
            .map_err(|why| ConfigError::InvalidQuota(name.to_owned(), why))?;
        let mut described = self.described.write();
        let mut quotas = described.quotas;
        quotas[i] = Some(quota);
        let header = describe(&self.names, &quotas).map_err(ConfigError::InvalidPolicyName)?;
        self.publish(&quotas);
        *described = Described { quotas, header };
        Ok(())
    }

    /// The current limits.
    #[inline]
    pub(crate) fn limits(&self) -> Current {
        let mut limits = [Limit::default(); MAX_POLICIES];
        for (limit, slot) in limits.iter_mut().zip(&self.limits).take(self.len) {
            *limit = Limit {
                interval_ns: slot.interval_ns.load(Ordering::Relaxed),
                capacity_ns: slot.capacity_ns.load(Ordering::Relaxed),
            };
        }
        Current {
            limits,
            len: self.len,
        }
    }

    /// The smallest burst of the current quotas.
    #[inline]
    pub(crate) fn max_cost(&self) -> u64 {
        self.max_cost.load(Ordering::Relaxed)
    }

    /// The `RateLimit-Policy` field value of the current quotas.
    pub(crate) fn policy_header(&self) -> HeaderValue {
        self.described.read().header.clone()
    }

    /// The current quota of each policy, in order.
    pub(crate) fn quotas(&self) -> Vec<Quota> {
        let described = self.described.read();
        described.quotas[..self.len]
            .iter()
            .flatten()
            .copied()
            .collect()
    }
}

/// What a Redis-backed limiter does while Redis is unreachable (timed out, refused, or
/// the circuit breaker is open).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailurePolicy {
    /// Let requests through unchecked (logged and annotated as `fail_open`).
    Open,
    /// Refuse requests with `503 Service Unavailable` (gRPC `UNAVAILABLE`).
    Closed,
    /// Limit each instance in memory with the quota divided by `replicas`, so the fleet as
    /// a whole stays near the shared limit. The default, with `replicas: 1`.
    Local {
        /// How many instances share the limit.
        replicas: u32,
    },
}

impl Default for FailurePolicy {
    fn default() -> Self {
        FailurePolicy::Local { replicas: 1 }
    }
}
