//! Request metrics through the [`metrics`](https://docs.rs/metrics) facade.
//!
//! The [`TraceLayer`](crate::trace::TraceLayer) records them (turn it off with
//! `TraceBuilder::metrics(false)`); install any `metrics` recorder (Prometheus, StatsD,
//! OpenTelemetry) to export them. Every label comes from a bounded set: methods outside the
//! standard ones are `_OTHER`, routes are templates (`_unmatched` when the router matched
//! none), statuses are classes, and decision labels are fixed words or configured layer
//! names. Never a host, a raw path, an id or a key.
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `http.server.request.duration` | histogram, seconds | `http.request.method`, `http.route`, `http.response.status_class` |
//! | `http.server.active_requests` | gauge | |
//! | `battlement.rate_limit.decisions` | counter | `layer`, `outcome` (`allowed`, `limited`, `shadow_limited`, `store_error`) |
//! | `battlement.cache.lookups` | counter | `status` (`hit`, `miss`, `stale`, `revalidated`, `collapsed`, `bypass`) |
//! | `battlement.auth.failures` | counter | `reason` |
//! | `battlement.validation.failures` | counter | `mode` (`enforced`, `report_only`) |
//! | `battlement.lock.waits` | counter | `outcome` (`acquired`, `timed_out`, `unavailable`, `lost`) |
//! | `battlement.lock.wait.duration` | histogram, seconds | `outcome` |
//! | `battlement.idempotency.requests` | counter | `outcome` (`stored`, `replayed`, `conflict`, `in_flight`, `missing`, `invalid`, `too_large`, `not_stored`, `unavailable`, `fail_open`) |
//!
//! ```
//! use battlement::metrics::REQUEST_DURATION;
//! use battlement::trace::TraceLayer;
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::{BodyExt, Full};
//! use metrics_util::debugging::DebuggingRecorder;
//! use std::convert::Infallible;
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let recorder = DebuggingRecorder::new();
//! let snapshotter = recorder.snapshotter();
//! let _installed = metrics::set_default_local_recorder(&recorder);
//! let service = ServiceBuilder::new()
//!     .layer(TraceLayer::new())
//!     .service_fn(|_req: Request<Full<Bytes>>| async {
//!         Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
//!     });
//! let res = service.oneshot(Request::new(Full::default())).await.unwrap();
//! res.into_body().collect().await.unwrap();
//! let names: Vec<String> = snapshotter
//!     .snapshot()
//!     .into_vec()
//!     .into_iter()
//!     .map(|(key, ..)| key.key().name().to_owned())
//!     .collect();
//! assert!(names.iter().any(|n| n == REQUEST_DURATION));
//! # }
//! ```

use std::time::Duration;

use http::StatusCode;
use metrics::{counter, gauge, histogram};

use crate::annotate::{LimitSource, Record};

/// Request duration to the end of the response body, in seconds.
pub const REQUEST_DURATION: &str = "http.server.request.duration";
/// Requests being served.
pub const ACTIVE_REQUESTS: &str = "http.server.active_requests";
/// Rate-limit decisions.
pub const RATE_LIMIT_DECISIONS: &str = "battlement.rate_limit.decisions";
/// Response cache lookups.
pub const CACHE_LOOKUPS: &str = "battlement.cache.lookups";
/// Authentication failures.
pub const AUTH_FAILURES: &str = "battlement.auth.failures";
/// Requests that failed validation.
pub const VALIDATION_FAILURES: &str = "battlement.validation.failures";
/// Distributed lock waits.
pub const LOCK_WAITS: &str = "battlement.lock.waits";
/// Time spent waiting for distributed locks, in seconds.
pub const LOCK_WAIT_DURATION: &str = "battlement.lock.wait.duration";
/// Requests seen by the idempotency layer.
pub const IDEMPOTENCY_REQUESTS: &str = "battlement.idempotency.requests";

pub(crate) fn request_started() {
    gauge!(ACTIVE_REQUESTS).increment(1.0);
}

fn status_class(status: Option<StatusCode>) -> &'static str {
    match status.map(|s| s.as_u16() / 100) {
        Some(1) => "1xx",
        Some(2) => "2xx",
        Some(3) => "3xx",
        Some(4) => "4xx",
        Some(5) => "5xx",
        _ => "none",
    }
}

pub(crate) fn request_finished(
    method: &'static str,
    route: Option<&str>,
    status: Option<StatusCode>,
    duration: Duration,
    record: Option<&Record>,
) {
    gauge!(ACTIVE_REQUESTS).decrement(1.0);
    let route = route.map_or_else(|| "_unmatched".to_owned(), str::to_owned);
    histogram!(
        REQUEST_DURATION,
        "http.request.method" => method,
        "http.route" => route,
        "http.response.status_class" => status_class(status),
    )
    .record(duration.as_secs_f64());
    if let Some(record) = record {
        decisions(record);
    }
}

fn decisions(record: &Record) {
    for note in &record.rate_limits {
        let outcome = match (note.source, note.allowed, note.shadow) {
            (LimitSource::FailOpen | LimitSource::FailClosed | LimitSource::LocalFallback, ..) => {
                "store_error"
            }
            (_, true, _) => "allowed",
            (_, false, true) => "shadow_limited",
            (_, false, false) => "limited",
        };
        counter!(RATE_LIMIT_DECISIONS, "layer" => note.layer.to_string(), "outcome" => outcome)
            .increment(1);
    }
    if let Some(cache) = &record.cache {
        counter!(CACHE_LOOKUPS, "status" => cache.status.as_str()).increment(1);
    }
    if let Some(reason) = record.auth.as_ref().and_then(|a| a.failure) {
        counter!(AUTH_FAILURES, "reason" => reason).increment(1);
    }
    if let Some(validation) = record.validation.as_ref().filter(|v| v.error_count > 0) {
        let mode = if validation.report_only {
            "report_only"
        } else {
            "enforced"
        };
        counter!(VALIDATION_FAILURES, "mode" => mode).increment(1);
    }
    if let Some(lock) = &record.lock {
        let outcome = lock.outcome.as_str();
        counter!(LOCK_WAITS, "outcome" => outcome).increment(1);
        histogram!(LOCK_WAIT_DURATION, "outcome" => outcome).record(lock.wait.as_secs_f64());
    }
    if let Some(idempotency) = &record.idempotency {
        counter!(IDEMPOTENCY_REQUESTS, "outcome" => idempotency.outcome.as_str()).increment(1);
    }
}
