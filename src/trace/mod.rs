//! Structured request logging: one event per request, a span, request ids, W3C trace
//! context and (feature `metrics`) request metrics.
//!
//! [`TraceLayer`] is meant to be the outermost layer. For every request it
//!
//! - keeps a valid incoming `X-Request-Id` (1 to 128 characters of `[A-Za-z0-9._-]`) or makes
//!   a UUIDv7, puts the [`RequestId`] into the request extensions and echoes it on the
//!   response;
//! - continues the caller's W3C trace from a strictly parsed `traceparent`, or starts a new
//!   one ([`TraceContext`] in the extensions; [`TraceBuilder::public_endpoint`] records the
//!   caller's context as a link instead);
//! - opens a span `request` (OpenTelemetry name `{method} {route}` in `otel.name`) in which
//!   the handler's own logs nest;
//! - puts an [`Annotation`](crate::annotate::Annotation) into the extensions, which the other
//!   layers write their decisions into;
//! - and emits **one** event when the response body has really ended (`outcome =
//!   completed`), failed (`errored`) or was dropped by a departing client
//!   (`client_aborted`), with the OpenTelemetry HTTP field names and every decision of the
//!   other layers.
//!
//! | field | what |
//! |---|---|
//! | `http.request.method` | the method; unknown methods as `_OTHER` |
//! | `http.route` | the route template (axum `MatchedPath` or [`TraceBuilder::route_from`]); absent rather than the raw path |
//! | `url.path`, `url.query` | the path; the query with values redacted ([`QueryLog`]) |
//! | `http.response.status_code`, `rpc.grpc.status_code` | the status; for gRPC, `grpc-status` from the headers or the trailers |
//! | `client.address` | the client IP ([`ClientIp`](crate::key::ClientIp) rules: trusted proxies only) |
//! | `user_agent.original` | truncated to 256 bytes |
//! | `http.request.header` | the allowlisted request headers ([`TraceBuilder::log_headers`]), none by default |
//! | `request_id`, `trace_id`, `trace.link` | the ids |
//! | `outcome`, `duration_ms`, `ttfb_ms`, `http.response.body.size` | how it ended, to the last byte; time to the response head; bytes counted from the body's frames |
//! | `error.type`, `error.message` | `panic`, `service_error` or `body_error`, and a truncated message |
//! | `rate_limit.verdict`, `.policy`, `.remaining`, `.source` | the deciding rate limit |
//! | `cache.status`, `cache.age` | what the cache did |
//! | `enduser.id`, `auth.failure` | the authenticated subject, or why authentication failed |
//! | `validation.error_count`, `validation.first_pointer` | what validation found |
//! | `lock.wait_ms`, `lock.outcome` | the distributed lock |
//! | `idempotency.outcome` | `stored`, `replayed`, `conflict`, `in_flight`, `missing`, `invalid`, `too_large`, `not_stored`, `unavailable`, `fail_open` |
//!
//! Levels: 5xx, gRPC server errors, errored bodies and panics at `ERROR`; requests slower than
//! the slow threshold at `WARN`; the rest (4xx included: a client error is not a server
//! error) at `INFO`. All of it, and per-route skip, level, threshold and sampling, is
//! configurable ([`RoutePolicy`]).
//!
//! Nothing secret by default: no header is logged unless allowlisted, and `Authorization`,
//! `Proxy-Authorization`, `Cookie` and `Set-Cookie` cannot be; query values are redacted;
//! bodies are never logged. Every client-supplied value is truncated and has its control
//! characters escaped before it is recorded, so no formatter can be tricked into writing a
//! forged line.
//!
//! A panic in the inner service is caught: the client gets a `500` problem (gRPC `INTERNAL`)
//! that does not reveal it, the event gets `error.type = "panic"` and the message, and the
//! server keeps serving.
//!
//! ```
//! use battlement::trace::{RequestId, RoutePolicy, TraceLayer};
//! use bytes::Bytes;
//! use http::{Request, Response, StatusCode};
//! use http_body_util::Full;
//! use std::convert::Infallible;
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let service = ServiceBuilder::new()
//!     .layer(
//!         TraceLayer::builder()
//!             .route_from(|req| Some(req.uri.path().starts_with("/orders/").then(|| "/orders/{id}").unwrap_or("/").to_owned()))
//!             .route("/healthz", RoutePolicy::skip())
//!             .build()
//!             .unwrap(),
//!     )
//!     .service_fn(|req: Request<Full<Bytes>>| async move {
//!         // Handlers read the request id from the extensions.
//!         let id = req.extensions().get::<RequestId>().unwrap().clone();
//!         Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(id.to_string()))))
//!     });
//!
//! let req = Request::get("/orders/7?token=secret")
//!     .header("x-request-id", "checkout-42")
//!     .body(Full::default())
//!     .unwrap();
//! let res = service.oneshot(req).await.unwrap();
//! assert_eq!(res.status(), StatusCode::OK);
//! assert_eq!(res.headers()["x-request-id"], "checkout-42");
//! # }
//! ```

mod body;
mod event;
mod future;
mod layer;
mod redact;
mod request_id;
mod service;
mod traceparent;

pub use body::TraceBody;
pub use future::ResponseFuture;
pub use layer::{ConfigError, RoutePolicy, TraceBuilder, TraceLayer, X_REQUEST_ID};
pub use redact::QueryLog;
pub use request_id::{MAX_REQUEST_ID_LEN, RequestId};
pub use service::{TRACEPARENT, Trace};
pub use traceparent::{RemoteContext, SpanId, TraceContext, TraceId};
