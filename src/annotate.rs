//! The per-request record that layers write their decisions into.
//!
//! The outermost logging layer puts an [`Annotation`] into the request extensions; rate
//! limiting, caching, auth, validation, locking and idempotency write what they decided into
//! it, and the logging layer emits one event per request with all of it. Without an
//! [`Annotation`] in the extensions the layers write nothing and pay nothing.
//!
//! ```
//! use battlement::annotate::{Annotation, RateLimitNote};
//! use http::Request;
//!
//! let annotation = Annotation::new();
//! let mut req = Request::new(());
//! req.extensions_mut().insert(annotation.clone());
//!
//! // A layer deep inside the stack records its decision ...
//! if let Some(a) = Annotation::of(req.extensions()) {
//!     a.update(|record| record.rate_limits.push(RateLimitNote::allowed("per-ip", Some(9))));
//! }
//! // ... and the outer layer reads it when the response is done.
//! let record = annotation.snapshot();
//! assert_eq!(record.rate_limits[0].remaining, Some(9));
//! assert!(record.rate_limits[0].allowed);
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use http::Extensions;

/// Set once any [`Annotation`] has been made in this process: until then no request can
/// carry one, and layers skip even the lookup.
static IN_USE: AtomicBool = AtomicBool::new(false);

/// A shared, cheaply cloned handle to one request's [`Record`].
#[derive(Clone, Debug)]
pub struct Annotation {
    record: Arc<Mutex<Record>>,
}

impl Default for Annotation {
    fn default() -> Self {
        Self::new()
    }
}

impl Annotation {
    /// A new, empty record.
    pub fn new() -> Self {
        if !IN_USE.load(Ordering::Relaxed) {
            IN_USE.store(true, Ordering::Relaxed);
        }
        Self {
            record: Arc::default(),
        }
    }

    /// The annotation in `extensions`, if a logging layer put one there.
    #[inline]
    pub fn of(extensions: &Extensions) -> Option<&Annotation> {
        // The common case without a logging layer costs one relaxed load, not a lookup.
        if !IN_USE.load(Ordering::Relaxed) {
            return None;
        }
        extensions.get::<Annotation>()
    }

    /// Changes the record. The lock is held only for the duration of `f`.
    pub fn update(&self, f: impl FnOnce(&mut Record)) {
        let mut record = self.record.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut record);
    }

    /// A copy of the record as it is now.
    pub fn snapshot(&self) -> Record {
        self.record
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Everything the layers decided about one request.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct Record {
    /// One note per rate-limit layer that looked at the request, outermost first.
    pub rate_limits: Vec<RateLimitNote>,
    /// What the response cache did, when one looked at the request.
    pub cache: Option<CacheNote>,
    /// Who the caller turned out to be, or why authentication failed.
    pub auth: Option<AuthNote>,
    /// What request validation found.
    pub validation: Option<ValidationNote>,
    /// How long the request waited for a distributed lock, and whether it got it.
    pub lock: Option<LockNote>,
    /// What the idempotency layer did with the request's `Idempotency-Key`.
    pub idempotency: Option<IdempotencyNote>,
}

impl Record {
    /// The rate-limit note that decided the request: the first that refused it (or would
    /// have, in shadow mode), else the one with the fewest requests left.
    pub fn deciding_rate_limit(&self) -> Option<&RateLimitNote> {
        self.rate_limits.iter().find(|n| !n.allowed).or_else(|| {
            self.rate_limits
                .iter()
                .min_by_key(|n| n.remaining.unwrap_or(u64::MAX))
        })
    }

    /// Whether a layer refused the request (or would have, in shadow mode): a logging layer
    /// keeps such requests even when it samples the rest.
    pub fn refused(&self) -> bool {
        self.rate_limits.iter().any(|n| !n.allowed)
            || self.auth.as_ref().is_some_and(|a| a.failure.is_some())
            || self.validation.as_ref().is_some_and(|v| v.error_count > 0)
            || self
                .lock
                .as_ref()
                .is_some_and(|l| l.outcome != LockOutcome::Acquired)
            || self.idempotency.as_ref().is_some_and(|i| {
                matches!(
                    i.outcome,
                    IdempotencyOutcome::Conflict
                        | IdempotencyOutcome::InFlight
                        | IdempotencyOutcome::Missing
                        | IdempotencyOutcome::Invalid
                        | IdempotencyOutcome::TooLarge
                        | IdempotencyOutcome::Unavailable
                )
            })
    }
}

/// What the response cache did with one request, after RFC 9211 `Cache-Status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CacheStatus {
    /// Answered from the cache.
    Hit,
    /// Not in the cache; the origin answered (and the response may have been stored).
    Miss,
    /// A stale entry was served (`stale-while-revalidate` or `stale-if-error`).
    Stale,
    /// A stored entry was revalidated with the origin and served.
    Revalidated,
    /// Waited for another request's fill of the same key and was answered by it.
    Collapsed,
    /// The request or response was not cacheable; the cache stood aside.
    Bypass,
}

impl CacheStatus {
    /// A short lowercase name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Stale => "stale",
            CacheStatus::Revalidated => "revalidated",
            CacheStatus::Collapsed => "collapsed",
            CacheStatus::Bypass => "bypass",
        }
    }
}

/// What the response cache did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheNote {
    /// The outcome.
    pub status: CacheStatus,
    /// The age of the served entry in seconds, when one was served.
    pub age: Option<u64>,
}

impl CacheNote {
    /// A note with `status` and `age`.
    pub fn new(status: CacheStatus, age: Option<u64>) -> Self {
        Self { status, age }
    }
}

/// What authentication decided.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct AuthNote {
    /// The authenticated subject, when there is one.
    pub subject: Option<Arc<str>>,
    /// Why the request was refused (a short fixed reason such as `expired` or
    /// `insufficient_scope`), when it was.
    pub failure: Option<&'static str>,
}

impl AuthNote {
    /// An authenticated caller.
    pub fn subject(subject: impl Into<Arc<str>>) -> Self {
        Self {
            subject: Some(subject.into()),
            failure: None,
        }
    }

    /// A refusal for a fixed, low-cardinality `reason`.
    pub fn failure(reason: &'static str) -> Self {
        Self {
            subject: None,
            failure: Some(reason),
        }
    }
}

/// What request validation found.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ValidationNote {
    /// How many violations were found (0 when the request was valid).
    pub error_count: usize,
    /// The JSON pointer of the first violation (never the offending value).
    pub first_pointer: Option<String>,
    /// Report-only mode: the violations were recorded and the request passed.
    pub report_only: bool,
}

impl ValidationNote {
    /// A note of `error_count` violations, the first at `first_pointer`.
    pub fn new(error_count: usize, first_pointer: Option<String>) -> Self {
        Self {
            error_count,
            first_pointer,
            report_only: false,
        }
    }
}

/// How a lock request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LockOutcome {
    /// The lock was obtained.
    Acquired,
    /// The wait budget ran out.
    TimedOut,
    /// The lock backend could not be reached.
    Unavailable,
    /// The lock was obtained and later lost (an extension failed).
    Lost,
    /// The request named a resource that cannot be locked (the name was refused).
    InvalidName,
}

impl LockOutcome {
    /// A short lowercase name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            LockOutcome::Acquired => "acquired",
            LockOutcome::TimedOut => "timed_out",
            LockOutcome::Unavailable => "unavailable",
            LockOutcome::Lost => "lost",
            LockOutcome::InvalidName => "invalid_name",
        }
    }
}

/// How long a request waited for a lock, and how it ended.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LockNote {
    /// Time spent waiting for the lock.
    pub wait: std::time::Duration,
    /// How it ended.
    pub outcome: LockOutcome,
}

impl LockNote {
    /// A note of `wait` and `outcome`.
    pub fn new(wait: std::time::Duration, outcome: LockOutcome) -> Self {
        Self { wait, outcome }
    }
}

/// What the idempotency layer did with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdempotencyOutcome {
    /// First request with this key: it ran and its response was stored.
    Stored,
    /// A stored response was replayed.
    Replayed,
    /// The key was reused with a different request: refused.
    Conflict,
    /// A request with the same key is still running: refused.
    InFlight,
    /// The route requires a key and the request had none: refused.
    Missing,
    /// The key was malformed (or given twice): refused.
    Invalid,
    /// The body of a keyed request was over the layer's cap: refused.
    TooLarge,
    /// The request ran, but its response was not stored (a server error, too large, an
    /// event stream, a body that failed or was dropped): its key was released.
    NotStored,
    /// The store could not be reached and the layer fails closed: refused.
    Unavailable,
    /// The store could not be reached and the layer fails open: the request ran without
    /// idempotency.
    FailOpen,
}

impl IdempotencyOutcome {
    /// A short lowercase name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            IdempotencyOutcome::Stored => "stored",
            IdempotencyOutcome::Replayed => "replayed",
            IdempotencyOutcome::Conflict => "conflict",
            IdempotencyOutcome::InFlight => "in_flight",
            IdempotencyOutcome::Missing => "missing",
            IdempotencyOutcome::Invalid => "invalid",
            IdempotencyOutcome::TooLarge => "too_large",
            IdempotencyOutcome::NotStored => "not_stored",
            IdempotencyOutcome::Unavailable => "unavailable",
            IdempotencyOutcome::FailOpen => "fail_open",
        }
    }
}

/// What the idempotency layer did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct IdempotencyNote {
    /// The outcome.
    pub outcome: IdempotencyOutcome,
}

impl IdempotencyNote {
    /// A note of `outcome`.
    pub fn new(outcome: IdempotencyOutcome) -> Self {
        Self { outcome }
    }
}

/// Where a rate-limit decision came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LimitSource {
    /// The in-memory limiter.
    Memory,
    /// The shared Redis limiter.
    Redis,
    /// The in-memory fallback used while Redis is unreachable.
    LocalFallback,
    /// Redis was unreachable and the policy let the request through unchecked.
    FailOpen,
    /// Redis was unreachable and the policy refused the request.
    FailClosed,
    /// The key table was full of keys still being limited; the request was charged to the
    /// shared overflow bucket.
    Overflow,
}

impl LimitSource {
    /// A short lowercase name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitSource::Memory => "memory",
            LimitSource::Redis => "redis",
            LimitSource::LocalFallback => "local_fallback",
            LimitSource::FailOpen => "fail_open",
            LimitSource::FailClosed => "fail_closed",
            LimitSource::Overflow => "overflow",
        }
    }
}

/// What one rate-limit layer decided.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct RateLimitNote {
    /// The layer's name (see `RateLimitLayer::builder().name(...)`).
    pub layer: Arc<str>,
    /// The deciding policy: the first violated one when refused, the one with the fewest
    /// requests left when allowed.
    pub policy: Option<Arc<str>>,
    /// Whether the request was let through by the limiter's decision.
    pub allowed: bool,
    /// Requests left in the deciding policy, when known.
    pub remaining: Option<u64>,
    /// Shadow mode: the decision was recorded but never enforced.
    pub shadow: bool,
    /// Where the decision came from.
    pub source: LimitSource,
}

impl RateLimitNote {
    /// An "allowed" note from the in-memory limiter (handy in tests and custom layers).
    pub fn allowed(layer: &str, remaining: Option<u64>) -> Self {
        Self {
            layer: Arc::from(layer),
            policy: None,
            allowed: true,
            remaining,
            shadow: false,
            source: LimitSource::Memory,
        }
    }
}

/// Whether `c` could break or disguise a log line: a control character, a line or
/// paragraph separator, a zero-width character or a bidirectional override.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
                | '\u{feff}'
        )
}

/// `s` as a log line may hold it: client-chosen text with every character [`needs_escape`]
/// finds written as `\u{..}`, so a line stays one line and reads as what it is whatever
/// formatter the subscriber uses.
#[cfg_attr(not(any(feature = "trace", feature = "validate")), allow(dead_code))]
pub(crate) fn escape(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if needs_escape(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}
