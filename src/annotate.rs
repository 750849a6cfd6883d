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
