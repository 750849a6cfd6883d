//! Rate limiting: GCRA over one or more named policies, in memory or on Redis.
//!
//! A [`RateLimitLayer`] holds up to four named policies ("10 per second" and "1000 per
//! day", say). A request is allowed only if **every** policy allows it, and only then is it
//! charged on all of them: a refusal never uses up quota. Requests are keyed by any
//! [`KeyExtractor`](crate::key::KeyExtractor), [`ClientIp`](crate::key::ClientIp) by default.
//!
//! - **Refusals** are `429` problem+json (type `quota-exceeded`, with `violated-policies`),
//!   with `Retry-After` in whole seconds rounded up, and `RateLimit-Policy` / `RateLimit`
//!   headers in the format of draft-ietf-httpapi-ratelimit-headers-10
//!   (`RateLimit-Policy: "burst";q=10;w=1` and `RateLimit: "burst";r=0;t=1`). gRPC callers get
//!   `RESOURCE_EXHAUSTED` with `grpc-retry-pushback-ms`.
//! - **Not counted**: CORS preflights (unless [`RateLimitBuilder::count_preflight`]),
//!   requests an [`exempt`](RateLimitBuilder::exempt) predicate picks, requests whose
//!   [`cost`](RateLimitBuilder::cost) is 0, and requests the extractor has no key for.
//! - **Shadow mode** decides, charges and annotates, but never refuses: roll a limit out by
//!   watching what it would do.
//! - **Quotas change at run time** with [`RateLimitLayer::set_quota`]: every service and
//!   clone of the layer applies the new quota from the next request, keys keep their state.
//! - **Memory** ([`MemoryBackend`]): bounded by construction (see its docs), no background
//!   task. **Redis** ([`RedisBackend`], feature `redis`): one Lua script and one round trip
//!   per request, time from Redis `TIME`, works on Redis Cluster, and a [`FailurePolicy`]
//!   for when Redis is gone.
//! - Each decision goes into the request's [`crate::annotate::Annotation`], when there is
//!   one.
//! - **Body type**: responses carry [`ResponseBody`](crate::body::ResponseBody) of the
//!   inner body by default, which fits axum, hyper and tonic alike. With
//!   [`native_body`](RateLimitBuilder::native_body) they carry the inner body type itself
//!   (axum's `Body`, `Full<Bytes>`: any body that is `From<Bytes>`): allowed responses pass
//!   untouched, which is the cheapest the layer can be (and on an axum `Router`, saves
//!   axum boxing the wrapper again).
//!
//! ```
//! use battlement::rate_limit::{Quota, RateLimitLayer};
//! use battlement::key::{Global, PeerAddr};
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use std::time::Duration;
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let layer = RateLimitLayer::builder()
//!     .policy("burst", Quota::requests_per(2, Duration::from_secs(1)))
//!     .policy("daily", Quota::requests_per(1000, Duration::from_secs(86_400)))
//!     .key(Global)
//!     .build()
//!     .expect("valid policies");
//!
//! let service = ServiceBuilder::new().layer(layer).service_fn(|_req: Request<()>| async {
//!     Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("hello"))))
//! });
//!
//! for _ in 0..2 {
//!     let res = service.clone().oneshot(Request::new(())).await.unwrap();
//!     assert_eq!(res.status(), StatusCode::OK);
//! }
//! let res = service.clone().oneshot(Request::new(())).await.unwrap();
//! assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
//! assert_eq!(res.headers()["retry-after"], "1");
//! assert_eq!(res.headers()["ratelimit-policy"], r#""burst";q=2;w=1, "daily";q=1000;w=86400"#);
//! assert_eq!(res.headers()["content-type"], "application/problem+json");
//! # }
//! ```

mod future;
mod gcra;
mod layer;
mod memory;
mod policy;
#[cfg(feature = "redis")]
mod redis;
mod service;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};

pub use future::ResponseFuture;
pub use gcra::{Backend, Check, CheckFuture, Decision, PoliciesRef, PolicyState, Unavailable};
pub use layer::{BackendChoice, Chosen, DefaultBackend, RateLimitBuilder, RateLimitLayer};
pub use memory::{Clock, DEFAULT_MAX_KEYS, ManualClock, MemoryBackend};
pub use policy::{FailurePolicy, MAX_POLICIES, Quota};
#[cfg(feature = "redis")]
pub use redis::RedisBackend;
pub use service::RateLimit;

use crate::annotate::{Annotation, LimitSource, RateLimitNote};
use crate::key::RequestHead;
use crate::reject::{QUOTA_EXCEEDED, Rejection};
use layer::{CostFn, ExemptFn};
use policy::Policies;

/// The `RateLimit-Policy` header (draft-ietf-httpapi-ratelimit-headers-10).
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// The `RateLimit` header (draft-ietf-httpapi-ratelimit-headers-10).
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
const GRPC_RETRY_PUSHBACK: HeaderName = HeaderName::from_static("grpc-retry-pushback-ms");

/// A rate-limit configuration that cannot work, found when the layer is built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// No policy was added.
    #[error("a rate-limit layer needs at least one policy")]
    NoPolicy,
    /// More than [`MAX_POLICIES`] policies.
    #[error("{0} policies given; a layer holds at most {MAX_POLICIES}")]
    TooManyPolicies(usize),
    /// Two policies share a name.
    #[error("two policies are named {0:?}")]
    DuplicatePolicy(String),
    /// A policy name is empty, too long, or not made of letters, digits and `-_.:`.
    #[error("invalid policy name {0:?}: use 1-64 letters, digits or -_.:")]
    InvalidPolicyName(String),
    /// A layer name is empty or not made of letters, digits and `-_.`.
    #[error("invalid layer name {0:?}: use letters, digits or -_.")]
    InvalidLayerName(String),
    /// A quota cannot work.
    #[error("policy {0:?}: {1}")]
    InvalidQuota(String, String),
    /// `max_keys(0)`.
    #[error("max_keys must be at least 1")]
    ZeroMaxKeys,
    /// [`RateLimitLayer::set_quota`] named a policy the layer does not have.
    #[error("the layer has no policy named {0:?}")]
    UnknownPolicy(String),
}

/// The layer's settings that the response future needs too.
pub(crate) struct Settings {
    pub(crate) name: Arc<str>,
    pub(crate) policies: Policies,
    pub(crate) cost: Option<CostFn>,
    pub(crate) exempt: Option<ExemptFn>,
    pub(crate) count_preflight: bool,
    pub(crate) shadow: bool,
    pub(crate) headers_on_success: bool,
}

pub(crate) enum Outcome {
    Pass(Option<Box<future::RateLimitHeaders>>),
    // Boxed: the outcome is made on every request, a refusal on few.
    Refuse(Box<Response<Bytes>>),
}

fn whole_seconds_up(d: Duration) -> u64 {
    d.as_nanos().div_ceil(1_000_000_000) as u64
}

impl Settings {
    fn ratelimit_header(&self, decision: &Decision) -> HeaderValue {
        let mut out = String::with_capacity(32 * decision.len());
        for (name, state) in self.policies.names.iter().zip(decision.states()) {
            if !out.is_empty() {
                out.push_str(", ");
            }
            use std::fmt::Write;
            let _ = write!(
                out,
                "\"{name}\";r={};t={}",
                state.remaining,
                whole_seconds_up(state.reset)
            );
        }
        HeaderValue::from_str(&out).unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    fn annotate(&self, head: &RequestHead<'_>, decision: &Decision) {
        if let Some(annotation) = Annotation::of(head.extensions) {
            let deciding = decision.deciding();
            let known = !matches!(decision.source, LimitSource::FailOpen);
            annotation.update(|record| {
                record.rate_limits.push(RateLimitNote {
                    layer: self.name.clone(),
                    policy: deciding.map(|i| self.policies.names[i].clone()),
                    allowed: decision.allowed,
                    remaining: deciding
                        .filter(|_| known)
                        .map(|i| decision.state(i).remaining),
                    shadow: self.shadow,
                    source: decision.source,
                })
            });
        }
    }

    /// Turns a backend's answer into what the service does.
    pub(crate) fn outcome(
        &self,
        result: Result<Decision, Unavailable>,
        head: &RequestHead<'_>,
    ) -> Outcome {
        let decision = match result {
            Ok(decision) => decision,
            Err(unavailable) => {
                let mut failed = Decision::pass(LimitSource::FailClosed, self.policies.len);
                failed.allowed = false;
                self.annotate(head, &failed);
                if self.shadow {
                    return Outcome::Pass(None);
                }
                tracing::debug!(reason = %unavailable.reason, "rate limit store unavailable; refusing");
                let rejection =
                    Rejection::new(StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable")
                        .with_detail("Rate limiting is temporarily unavailable; retry shortly.")
                        .with_header(RETRY_AFTER, HeaderValue::from_static("1"))
                        .with_grpc_metadata(GRPC_RETRY_PUSHBACK, HeaderValue::from_static("1000"));
                return Outcome::Refuse(Box::new(rejection.render(head)));
            }
        };
        self.annotate(head, &decision);
        let known = !matches!(decision.source, LimitSource::FailOpen);
        if decision.allowed || self.shadow {
            let headers = (self.headers_on_success && known).then(|| {
                Box::new((
                    self.policies.policy_header(),
                    self.ratelimit_header(&decision),
                ))
            });
            return Outcome::Pass(headers);
        }
        Outcome::Refuse(Box::new(self.refuse(&decision, head)))
    }

    /// The 429 problem naming the policies for which `violated(i)` is true.
    fn quota_exceeded(&self, violated: impl Fn(usize) -> bool) -> Rejection {
        let names = (0..self.policies.len)
            .filter(|&i| violated(i))
            .map(|i| serde_json::Value::from(self.policies.names[i].as_ref()))
            .collect();
        Rejection::new(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests")
            .with_type(QUOTA_EXCEEDED)
            .with_member("violated-policies", serde_json::Value::Array(names))
            .with_header(RATELIMIT_POLICY, self.policies.policy_header())
    }

    fn refuse(&self, decision: &Decision, head: &RequestHead<'_>) -> Response<Bytes> {
        let seconds = whole_seconds_up(decision.retry_after()).max(1);
        let millis = decision.retry_after().as_micros().div_ceil(1000).max(1);
        let rejection = self
            .quota_exceeded(|i| decision.state(i).violated)
            .with_detail(format!("Rate limit exceeded; retry in {seconds} s."))
            .with_header(RETRY_AFTER, HeaderValue::from(seconds))
            .with_header(RATELIMIT, self.ratelimit_header(decision))
            .with_grpc_metadata(GRPC_RETRY_PUSHBACK, HeaderValue::from(millis as u64));
        rejection.render(head)
    }

    /// Records a request whose cost no burst of some policy can cover (refused, or in
    /// shadow mode passed) in the annotation.
    pub(crate) fn annotate_impossible(
        &self,
        head: &RequestHead<'_>,
        cost: u32,
        source: LimitSource,
    ) {
        if Annotation::of(head.extensions).is_none() {
            return;
        }
        let limits = self.policies.limits();
        let mut decision = Decision::pass(source, self.policies.len);
        decision.allowed = false;
        for (i, limit) in limits.iter().enumerate() {
            if limit.burst() < u64::from(cost) {
                decision.violated |= 1 << i;
            }
        }
        self.annotate(head, &decision);
    }

    /// A request whose cost exceeds a policy's burst can never pass: refuse it without a
    /// `Retry-After`, which would only invite a retry that fails again.
    pub(crate) fn refuse_impossible(&self, head: &RequestHead<'_>, cost: u32) -> Response<Bytes> {
        let limits = self.policies.limits();
        self.quota_exceeded(|i| limits[i].burst() < u64::from(cost))
            .with_detail(
                "The request costs more than a policy's whole burst; it can never be allowed.",
            )
            .render(head)
    }
}
