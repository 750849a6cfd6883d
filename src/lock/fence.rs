//! Fencing tokens: numbers that let the protected resource refuse a stale lock holder.

use std::fmt;

/// A fencing token, minted by the backend in the same atomic step that grants the lock.
///
/// Tokens for one lock name only go up: a holder that was paused past its lease (a long GC,
/// a stalled network) and wakes up still believing it holds the lock carries a token lower
/// than the one the resource has already seen, and the resource refuses it. The lock alone
/// cannot prevent that; only the resource can (see the [module docs](super) for how).
///
/// - [`value`](Self::value) is what the resource compares. It goes up with every
///   acquisition and never runs ahead of the clock, so it keeps increasing even when the
///   counter behind it is lost. One Redis node adds one to its counter; a counter that is
///   new (the name's first lock, or lost with the node's data, or forgotten after a week
///   unused) starts from the node's `TIME` in microseconds, which is past every token the
///   old counter minted (it advanced once per lock, far slower than the clock), as long as
///   the clock did not go backwards. Under Redlock each node keeps such a counter and the
///   token is the largest the quorum minted. The memory backend mints
///   `max(previous + 1, now)` on the process clock.
/// - [`epoch`](Self::epoch) is the time (microseconds since the Unix epoch) the counter was
///   created. A change of epoch between two tokens tells that the counter was made again
///   (lost with the node's data, or forgotten after a week unused), which an operator may
///   want to know; tokens still increase across it.
///
/// Tokens order by value, then epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FencingToken {
    value: u64,
    epoch: u64,
}

impl FencingToken {
    /// What a guard of a manager built with
    /// [`fencing(false)`](super::LockManagerBuilder::fencing) carries: value 0, epoch 0. It
    /// orders nothing, and fails safe: a resource checking `fence < $1` refuses it.
    pub const NONE: FencingToken = FencingToken { value: 0, epoch: 0 };

    /// A token. Backends make these; applications compare them.
    pub fn new(value: u64, epoch: u64) -> Self {
        Self { value, epoch }
    }

    /// Whether this is [`FencingToken::NONE`] (the lock was taken without minting one).
    pub fn is_none(&self) -> bool {
        *self == Self::NONE
    }

    /// The number the protected resource compares: strictly greater for every later
    /// acquisition of the same lock name.
    pub fn value(&self) -> u64 {
        self.value
    }

    /// When (microseconds since the Unix epoch) the counter behind this token was created.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.value)
    }
}

/// Microseconds since the Unix epoch on this machine's clock.
pub(crate) fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_by_value_then_epoch() {
        let a = FencingToken::new(10, 5);
        let b = FencingToken::new(11, 1);
        assert!(a < b);
        assert!(FencingToken::new(10, 4) < a);
        assert_eq!(a.to_string(), "10");
        assert_eq!((a.value(), a.epoch()), (10, 5));
        assert!(FencingToken::NONE < a && FencingToken::NONE.is_none() && !a.is_none());
    }
}
