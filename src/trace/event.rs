//! The per-request state the layer carries from the request to the end of the body, and the
//! one event it emits there.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use quanta::Instant;

use http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use tracing::field::{Empty, Value, display};
use tracing::{Level, Span};

use super::layer::{Config, ResolvedPolicy};
use super::redact;
use super::request_id::RequestId;
use super::traceparent::TraceContext;
use crate::annotate::{Annotation, Record};
use crate::key::RequestHead;

/// Longest `user_agent.original` logged.
const MAX_USER_AGENT: usize = 256;
/// Longest `url.path` logged.
const MAX_PATH: usize = 1024;
/// Longest logged header value and error message.
const MAX_VALUE: usize = 256;

/// How a request ended, as the event's `outcome` field says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The response body was sent to its end.
    Completed,
    /// The client went away before the end of the response (the body or the response
    /// future was dropped).
    ClientAborted,
    /// The inner service or the body returned an error, or panicked.
    Errored,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::ClientAborted => "client_aborted",
            Outcome::Errored => "errored",
        }
    }
}

/// The route template of a request.
pub(crate) enum RouteName {
    Custom(String),
    #[cfg(feature = "axum")]
    Axum(axum::extract::MatchedPath),
}

impl RouteName {
    pub(crate) fn of(config: &Config, head: &RequestHead<'_>) -> Option<Self> {
        if let Some(route_from) = &config.route_from {
            return route_from(head).map(RouteName::Custom);
        }
        #[cfg(feature = "axum")]
        if let Some(matched) = head.extensions.get::<axum::extract::MatchedPath>() {
            return Some(RouteName::Axum(matched.clone()));
        }
        None
    }

    pub(crate) fn as_str(&self) -> &str {
        match self {
            RouteName::Custom(s) => s,
            #[cfg(feature = "axum")]
            RouteName::Axum(m) => m.as_str(),
        }
    }
}

/// The method as OpenTelemetry names it: the standard ones as themselves, any other as
/// `_OTHER` (a client can send any token, and methods label metrics).
pub(crate) fn method_name(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "_OTHER",
    }
}

/// What is captured only when an event can be emitted.
struct LogFields {
    uri: Uri,
    client: Option<IpAddr>,
    user_agent: Option<HeaderValue>,
    headers: Option<String>,
}

/// Everything the layer knows about one request until it ends.
pub(crate) struct Pending {
    config: Arc<Config>,
    start: Instant,
    head_at: Option<Duration>,
    method: Method,
    route: Option<RouteName>,
    policy: ResolvedPolicy,
    trace: TraceContext,
    request_id: RequestId,
    annotation: Option<Annotation>,
    pub(crate) span: Span,
    log: Option<LogFields>,
    status: Option<StatusCode>,
    grpc: bool,
    grpc_status: Option<u16>,
    bytes: u64,
    error: Option<(&'static str, String)>,
}

pub(crate) struct Start {
    pub(crate) start: Instant,
    pub(crate) route: Option<RouteName>,
    pub(crate) trace: TraceContext,
    pub(crate) request_id: RequestId,
    pub(crate) annotation: Option<Annotation>,
    pub(crate) capture: bool,
}

impl Pending {
    pub(crate) fn new(config: Arc<Config>, head: &RequestHead<'_>, start: Start) -> Box<Self> {
        let policy = config.policy(start.route.as_ref().map(RouteName::as_str));
        let log = start.capture.then(|| LogFields {
            uri: head.uri.clone(),
            client: config.client_ip.client_addr(head),
            user_agent: head.headers.get(http::header::USER_AGENT).cloned(),
            headers: allowed_headers(&config.headers, head.headers),
        });
        let span = match &log {
            Some(log) if !policy.skip => make_span(
                config.span_level,
                head.method,
                start.route.as_ref(),
                log,
                &start.request_id,
                &start.trace,
            ),
            _ => Span::none(),
        };
        #[cfg(feature = "metrics")]
        if config.metrics {
            crate::metrics::request_started();
        }
        Box::new(Self {
            start: start.start,
            head_at: None,
            method: head.method.clone(),
            route: start.route,
            policy,
            trace: start.trace,
            request_id: start.request_id,
            annotation: start.annotation,
            span,
            log,
            status: None,
            grpc: false,
            grpc_status: None,
            bytes: 0,
            error: None,
            config,
        })
    }

    /// The response head is ready: time to first byte, status, gRPC status when the
    /// response is trailers-only.
    pub(crate) fn on_head(&mut self, status: StatusCode, headers: &HeaderMap) {
        self.head_at = Some(self.start.elapsed());
        self.status = Some(status);
        self.grpc = crate::reject::is_grpc(headers);
        if self.grpc {
            self.on_trailers(headers);
        }
    }

    /// Response body bytes seen so far.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    pub(crate) fn on_data(&mut self, len: usize) {
        self.bytes += len as u64;
    }

    pub(crate) fn on_trailers(&mut self, trailers: &HeaderMap) {
        if let Some(code) = trailers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
        {
            self.grpc_status = Some(code);
        }
    }

    pub(crate) fn on_error(&mut self, kind: &'static str, message: &dyn std::fmt::Display) {
        let mut text = String::new();
        let _ = write!(text, "{message}");
        self.error = Some((kind, redact::clean(&text, MAX_VALUE).into_owned()));
    }

    pub(crate) fn request_id(&self) -> &RequestId {
        &self.request_id
    }

    pub(crate) fn request_id_header(&self) -> &http::HeaderName {
        &self.config.request_id_header
    }

    /// Whether the response has a body to send (not for `HEAD`, 1xx, 204 and 304).
    pub(crate) fn body_expected(&self) -> bool {
        self.method != Method::HEAD
            && !self.status.is_some_and(|s| {
                s.is_informational() || s == StatusCode::NO_CONTENT || s == StatusCode::NOT_MODIFIED
            })
    }

    /// The request is over: record metrics and, unless filtered, emit the event.
    pub(crate) fn finish(self: Box<Self>, outcome: Outcome) {
        let duration = self.start.elapsed();
        // A caught panic was answered with a 500, but the request did fail.
        let outcome = if self.error.as_ref().is_some_and(|e| e.0 == "panic") {
            Outcome::Errored
        } else {
            outcome
        };
        let record = self.annotation.as_ref().map(Annotation::snapshot);
        #[cfg(feature = "metrics")]
        if self.config.metrics {
            crate::metrics::request_finished(
                method_name(&self.method),
                self.route.as_ref().map(RouteName::as_str),
                self.status,
                duration,
                record.as_ref(),
            );
        }
        if self.log.is_none() {
            return;
        }
        let record = record.unwrap_or_default();
        let server_error = outcome == Outcome::Errored
            || self.status.is_some_and(|s| s.is_server_error())
            || self.grpc_status.is_some_and(grpc_server_error);
        let slow = duration >= self.policy.slow;
        let level = if server_error {
            self.config.server_error_level
        } else if slow {
            self.config.slow_level
        } else {
            self.policy.level
        };
        let kept = server_error
            || (!self.policy.skip
                && (slow
                    || outcome != Outcome::Completed
                    || self.status.is_some_and(|s| s.as_u16() >= 400)
                    || self.grpc_status.is_some_and(|c| c != 0)
                    || record.refused()
                    || self.trace.trace_id().sampling_value() < self.policy.sample
                    || self.policy.sample == u64::MAX));
        self.record_on_span(outcome, server_error, duration, &record);
        if kept {
            self.emit(level, outcome, duration, &record);
        }
    }

    fn record_on_span(&self, outcome: Outcome, error: bool, duration: Duration, record: &Record) {
        if self.span.is_disabled() {
            return;
        }
        let Some(meta) = self.span.metadata() else {
            return;
        };
        let fields = meta.fields();
        let status = self.status.map(|s| s.as_u16());
        let duration_ms = millis(duration);
        let error_type = self.error.as_ref().map(|e| e.0);
        let otel_status = error.then_some("ERROR");
        let verdict = record.deciding_rate_limit().map(verdict);
        let cache = record.cache.as_ref().map(|c| c.status.as_str());
        let subject = record.auth.as_ref().and_then(|a| a.subject.as_deref());
        let violations = record.validation.as_ref().map(|v| v.error_count as u64);
        let lock = record.lock.as_ref().map(|l| l.outcome.as_str());
        let idempotency = record.idempotency.as_ref().map(|i| i.outcome.as_str());
        let outcome = outcome.as_str();
        // One `record_all`: subscribers that reformat a span's fields on every record pay
        // once, not once per field.
        macro_rules! values {
            ($($name:literal => $value:expr),* $(,)?) => {
                [$((fields.field($name), $value as Option<&dyn Value>)),*]
            };
        }
        let named = values![
            "http.response.status_code" => status.as_ref().map(|v| v as &dyn Value),
            "rpc.grpc.status_code" => self.grpc_status.as_ref().map(|v| v as &dyn Value),
            "outcome" => Some(&outcome as &dyn Value),
            "duration_ms" => Some(&duration_ms as &dyn Value),
            "error.type" => error_type.as_ref().map(|v| v as &dyn Value),
            "otel.status_code" => otel_status.as_ref().map(|v| v as &dyn Value),
            "rate_limit.verdict" => verdict.as_ref().map(|v| v as &dyn Value),
            "cache.status" => cache.as_ref().map(|v| v as &dyn Value),
            "enduser.id" => subject.as_ref().map(|v| v as &dyn Value),
            "validation.error_count" => violations.as_ref().map(|v| v as &dyn Value),
            "lock.outcome" => lock.as_ref().map(|v| v as &dyn Value),
            "idempotency.outcome" => idempotency.as_ref().map(|v| v as &dyn Value),
        ];
        let present: Vec<_> = named
            .iter()
            .filter_map(|(f, v)| f.as_ref().map(|f| (f, *v)))
            .collect();
        record_present(&self.span, fields, &present);
    }

    fn emit(&self, level: Level, outcome: Outcome, duration: Duration, record: &Record) {
        let Some(log) = &self.log else { return };
        let method = method_name(&self.method);
        let route = self.route.as_ref().map(RouteName::as_str);
        let path = redact::clean(log.uri.path(), MAX_PATH);
        let path: &str = &path;
        let query = log
            .uri
            .query()
            .and_then(|q| redact::query(q, &self.config.query));
        let status = self.status.map(|s| s.as_u16());
        let client = log.client.map(display);
        let user_agent = log
            .user_agent
            .as_ref()
            .map(|ua| redact::header_text(ua, MAX_USER_AGENT));
        let duration_ms = millis(duration);
        let ttfb_ms = self.head_at.map(millis);
        let (error_type, error_message) = match &self.error {
            Some((kind, message)) => (Some(*kind), Some(message.as_str())),
            None => (None, None),
        };
        let link = self.trace.link().map(display);
        let limit = record.deciding_rate_limit();
        let rl_verdict = limit.map(verdict);
        let rl_policy = limit.and_then(|n| n.policy.as_deref());
        let rl_remaining = limit.and_then(|n| n.remaining);
        let rl_source = limit.map(|n| n.source.as_str());
        let cache_status = record.cache.as_ref().map(|c| c.status.as_str());
        let cache_age = record.cache.as_ref().and_then(|c| c.age);
        let subject = record
            .auth
            .as_ref()
            .and_then(|a| a.subject.as_deref())
            .map(|s| redact::clean(s, MAX_VALUE));
        let auth_failure = record.auth.as_ref().and_then(|a| a.failure);
        let violations = record.validation.as_ref().map(|v| v.error_count as u64);
        let first_pointer = record
            .validation
            .as_ref()
            .and_then(|v| v.first_pointer.as_deref())
            .map(|p| redact::clean(p, MAX_VALUE));
        let lock_wait_ms = record.lock.as_ref().map(|l| millis(l.wait));
        let lock_outcome = record.lock.as_ref().map(|l| l.outcome.as_str());
        let idempotency = record.idempotency.as_ref().map(|i| i.outcome.as_str());
        macro_rules! event_at {
            ($level:expr) => {
                tracing::event!(
                    target: "battlement::trace",
                    parent: None,
                    $level,
                    http.request.method = method,
                    http.route = route,
                    url.path = path,
                    url.query = query.as_deref(),
                    http.response.status_code = status,
                    rpc.grpc.status_code = self.grpc_status,
                    client.address = client,
                    user_agent.original = user_agent.as_deref(),
                    http.request.header = log.headers.as_deref(),
                    request_id = self.request_id.as_str(),
                    trace_id = %self.trace.trace_id(),
                    trace.link = link,
                    outcome = outcome.as_str(),
                    duration_ms = duration_ms,
                    ttfb_ms = ttfb_ms,
                    http.response.body.size = self.bytes,
                    error.type = error_type,
                    error.message = error_message,
                    rate_limit.verdict = rl_verdict,
                    rate_limit.policy = rl_policy,
                    rate_limit.remaining = rl_remaining,
                    rate_limit.source = rl_source,
                    cache.status = cache_status,
                    cache.age = cache_age,
                    enduser.id = subject.as_deref(),
                    auth.failure = auth_failure,
                    validation.error_count = violations,
                    validation.first_pointer = first_pointer.as_deref(),
                    lock.wait_ms = lock_wait_ms,
                    lock.outcome = lock_outcome,
                    idempotency.outcome = idempotency,
                )
            };
        }
        if level == Level::ERROR {
            event_at!(Level::ERROR);
        } else if level == Level::WARN {
            event_at!(Level::WARN);
        } else if level == Level::INFO {
            event_at!(Level::INFO);
        } else if level == Level::DEBUG {
            event_at!(Level::DEBUG);
        } else {
            event_at!(Level::TRACE);
        }
    }
}

fn record_present(
    span: &Span,
    fields: &tracing::field::FieldSet,
    present: &[(&tracing::field::Field, Option<&dyn Value>)],
) {
    macro_rules! record_n {
        ($($n:literal)*) => {
            match present.len() {
                $($n => {
                    let array: &[(&tracing::field::Field, Option<&dyn Value>); $n] =
                        present.try_into().expect("length checked");
                    span.record_all(&fields.value_set(array));
                })*
                _ => {}
            }
        };
    }
    record_n!(1 2 3 4 5 6 7 8 9 10 11 12);
}

fn verdict(note: &crate::annotate::RateLimitNote) -> &'static str {
    match (note.allowed, note.shadow) {
        (true, _) => "allowed",
        (false, true) => "shadow_limited",
        (false, false) => "limited",
    }
}

/// gRPC codes that are server errors under the OpenTelemetry conventions: UNKNOWN,
/// DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS.
fn grpc_server_error(code: u16) -> bool {
    matches!(code, 2 | 4 | 12 | 13 | 14 | 15)
}

fn allowed_headers(names: &[http::HeaderName], headers: &HeaderMap) -> Option<String> {
    if names.is_empty() {
        return None;
    }
    let mut out = String::new();
    for name in names {
        let mut values = headers.get_all(name).iter().peekable();
        if values.peek().is_none() {
            continue;
        }
        if !out.is_empty() {
            out.push_str("; ");
        }
        out.push_str(name.as_str());
        out.push('=');
        for (i, value) in values.enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&redact::header_text(value, MAX_VALUE));
        }
    }
    (!out.is_empty()).then_some(out)
}

fn make_span(
    level: Level,
    method: &Method,
    route: Option<&RouteName>,
    log: &LogFields,
    request_id: &RequestId,
    trace: &TraceContext,
) -> Span {
    let method = method_name(method);
    let route = route.map(RouteName::as_str);
    let name = match route {
        Some(route) => format!("{method} {route}"),
        None => method.to_owned(),
    };
    let path = redact::clean(log.uri.path(), MAX_PATH);
    let path: &str = &path;
    let client = log.client.map(display);
    macro_rules! span_at {
        ($level:expr) => {
            tracing::span!(
                target: "battlement::trace",
                $level,
                "request",
                otel.name = name.as_str(),
                otel.kind = "server",
                otel.status_code = Empty,
                http.request.method = method,
                http.route = route,
                url.path = path,
                client.address = client,
                request_id = request_id.as_str(),
                trace_id = %trace.trace_id(),
                span_id = %trace.span_id(),
                http.response.status_code = Empty,
                rpc.grpc.status_code = Empty,
                outcome = Empty,
                duration_ms = Empty,
                error.type = Empty,
                rate_limit.verdict = Empty,
                cache.status = Empty,
                enduser.id = Empty,
                validation.error_count = Empty,
                lock.outcome = Empty,
                idempotency.outcome = Empty,
            )
        };
    }
    if level == Level::ERROR {
        span_at!(Level::ERROR)
    } else if level == Level::WARN {
        span_at!(Level::WARN)
    } else if level == Level::INFO {
        span_at!(Level::INFO)
    } else if level == Level::DEBUG {
        span_at!(Level::DEBUG)
    } else {
        span_at!(Level::TRACE)
    }
}

/// Turns a panic payload into a bounded, escaped message.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.as_str()
    } else {
        "a panic with a non-string payload"
    };
    redact::clean(text, MAX_VALUE).into_owned()
}

/// Milliseconds with microsecond precision (`2.456`, not `2.4560060000000004`).
fn millis(d: Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}
