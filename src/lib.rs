//! # battlement
//!
//! Production middleware for `tower`: composable layers that any axum router, hyper
//! service or tonic server stacks to become ready for real traffic.
//!
//! | module | what it does |
//! |---|---|
//! | [`trace`] | one structured event per request, request ids, W3C trace context, panic capture |
//! | [`rate_limit`] | GCRA rate limiting over several named policies, in memory or on Redis |
//! | [`validate`] | bounded bodies, JSON parsed once with limits, JSON Schema, `422` with every violation |
//! | [`cache`] | a shared response cache: RFC 9111, `Cache-Status`, `304`, one origin call per key |
//! | [`auth`] | JWT bearer tokens with JWKS, API keys, scopes and policy hooks, RFC 6750 refusals |
//! | [`lock`] | distributed locks with fencing tokens (memory, Redis, Redlock), a layer that holds one per request |
//! | [`idempotency`] | `Idempotency-Key` handling: replay, `409` in flight, `422` on another body |
//! | [`metrics`] | bounded-cardinality request metrics through the `metrics` facade |
//! | [`key`] | what layers key on: the client IP behind trusted proxies, a header, the principal |
//! | [`reject`] | one refusal type, rendered as RFC 9457 problem+json or a gRPC status |
//! | [`builder`] | `ServiceBuilderExt`: the layers as methods of tower's `ServiceBuilder` |
//! | [`body`] | the response body every short-circuiting layer returns |
//! | [`annotate`] | the per-request record layers write their decisions into |
//! | [`principal`] | who the request is, for handlers and for other layers |
//! | [`redis`] | shared Redis plumbing: one node or a cluster, timeouts, circuit breaker |
//!
//! Every stateful layer runs on an embedded in-memory backend by default, and on Redis (one
//! node or a Redis Cluster, feature `redis`) when the service runs as several replicas.
//! Refusals are always responses, never errors, so the layers fit axum's `Infallible`
//! services; gRPC callers get trailers-only responses with the right status code.
//!
//! ```
//! use axum::{Router, routing::get};
//! use battlement::key::ClientIp;
//! use battlement::rate_limit::{Quota, RateLimitLayer};
//! use battlement::trace::{RoutePolicy, TraceLayer};
//! use std::time::Duration;
//!
//! let client_ip = ClientIp::new().trust_proxies(["10.0.0.0/8"]).unwrap();
//! let per_ip = RateLimitLayer::builder()
//!     .policy("per-minute", Quota::requests_per(600, Duration::from_secs(60)))
//!     .key(client_ip.clone())
//!     .build()
//!     .unwrap();
//! let trace = TraceLayer::builder()
//!     .client_ip(client_ip)
//!     .route("/healthz", RoutePolicy::skip())
//!     .build()
//!     .unwrap();
//! let app: Router = Router::new()
//!     .route("/products/{id}", get(|| async { "a product" }))
//!     .layer(per_ip)
//!     .route("/healthz", get(|| async { "ok" }))
//!     // Outermost: it sees every request and every other layer's decision.
//!     .layer(trace);
//! # let _ = app;
//! ```
//!
//! ## Layout
//!
//! Core modules (`body`, `reject`, `annotate`, `key`, `principal`, `redis`) never import a
//! layer; layers never import each other. Each layer module is `layer.rs` (the `FooLayer`
//! and its builder), `service.rs` (the `Foo` service), `future.rs` (its named
//! `ResponseFuture`), and one file per backend behind one trait; `trace` adds `body.rs`
//! (its counting response body) and one file per thing it reads (`request_id.rs`,
//! `traceparent.rs`, `redact.rs`, `event.rs`); `auth` adds `keys.rs` (keys bound to one
//! algorithm), `cache.rs` (verified tokens) and `revoke.rs`; `validate` adds `params.rs`
//! (query and header coercion); `cache` keeps its rules in `policy.rs`, its keys in
//! `key.rs`, its capturing body in `body.rs` and its stores in `store/` (memory, Redis,
//! tiered); `idempotency` adds `body.rs` (its capturing body and the claim's lease),
//! `record.rs` (the stored response's binary frame) and `store.rs` (its store trait and
//! memory store); `lock` is a lock API first, with its layer beside it: `client.rs` (the
//! manager), `guard.rs` (the guard), `fence.rs` (fencing tokens), `backend.rs` (the backend
//! trait), `watchdog.rs` (lease extension) and `body.rs` (holds the lock until the response
//! body ends). Shared state is built when the layer is built and lives in an `Arc`, so cloning a layer, or axum calling
//! `Layer::layer` once per route, shares it.
//!
//! ## Features
//!
//! - `rate-limit` (default): the [`rate_limit`] layer.
//! - `trace` (default): the [`trace`] layer.
//! - `auth` (default): the [`auth`] layers.
//! - `validate` (default): the [`validate`] layer.
//! - `cache` (default): the [`cache`] layer.
//! - `lock` (default): the [`lock`] API and layer.
//! - `idempotency` (default): the [`idempotency`] layer.
//! - `metrics`: request metrics recorded by the trace layer (implies `trace`).
//! - `redis`: the Redis backends and [`redis`] plumbing.
//! - `axum`: [`key::ClientIp`] reads axum's `ConnectInfo<SocketAddr>`, and the trace layer
//!   reads the route template from axum's `MatchedPath`.
//! - `tonic`: [`key::ClientIp`] reads tonic's `TcpConnectInfo`.
//! - `full`: all of them.

#![forbid(unsafe_code)]
#![warn(missing_docs, rust_2018_idioms, unreachable_pub)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod annotate;
#[cfg(feature = "auth")]
pub mod auth;
pub mod body;
pub mod builder;
#[cfg(feature = "cache")]
pub mod cache;
#[cfg(feature = "idempotency")]
pub mod idempotency;
pub mod key;
#[cfg(feature = "lock")]
pub mod lock;
#[cfg(feature = "metrics")]
pub mod metrics;
pub mod principal;
#[cfg(feature = "rate-limit")]
pub mod rate_limit;
#[cfg(feature = "redis")]
pub mod redis;
pub mod reject;
#[cfg(feature = "trace")]
pub mod trace;
#[cfg(feature = "validate")]
pub mod validate;

pub use body::ResponseBody;
pub use builder::ServiceBuilderExt;
pub use key::{ClientIp, KeyExtractor, RequestHead};
pub use principal::Principal;
#[cfg(feature = "rate-limit")]
pub use rate_limit::{Quota, RateLimitLayer};
pub use reject::Rejection;
#[cfg(feature = "trace")]
pub use trace::TraceLayer;
