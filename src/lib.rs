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
//! | [`body`] | the response body every short-circuiting layer returns (or, with `BodyMode::Native`, the inner body itself), and the request body of those that read it first |
//! | [`annotate`] | the per-request record layers write their decisions into |
//! | [`principal`] | who the request is, for handlers and for other layers |
//! | [`redis`] | shared Redis plumbing: one node or a cluster, timeouts, circuit breaker |
//!
//! Every stateful layer runs on an embedded in-memory backend by default, and on Redis (one
//! node or a Redis Cluster, feature `redis`) when the service runs as several replicas.
//! Refusals are always responses, never errors, so the layers fit axum's `Infallible`
//! services; gRPC callers get trailers-only responses with the right status code.
//!
//! ## A full stack
//!
//! A public route that is rate limited per client IP and cached, and private routes behind
//! a bearer token, a per-subject limit, idempotency keys, body validation and a lock. Each
//! layer is built once and shared by every clone of it. This example runs as a doc test:
//!
//! ```
//! # #[cfg(all(feature = "rate-limit", feature = "trace", feature = "auth", feature = "validate",
//! #     feature = "cache", feature = "lock", feature = "idempotency"))]
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use axum::{Extension, Router, body::Body, routing::{get, post}};
//! use battlement::auth::{AuthLayer, Issuer, JwtValidator, RequireScopes};
//! use battlement::cache::CacheLayer;
//! use battlement::idempotency::IdempotencyLayer;
//! use battlement::key::{ClientIp, Principal};
//! use battlement::lock::{HeldLock, LockLayer, LockManager};
//! use battlement::rate_limit::{Quota, RateLimitLayer};
//! use battlement::trace::{RoutePolicy, TraceLayer};
//! use battlement::validate::ValidateLayer;
//! use http::{Request, StatusCode};
//! use jsonwebtoken::Algorithm;
//! use std::time::Duration;
//! use tower::ServiceExt;
//!
//! let client_ip = ClientIp::new().trust_proxies(["10.0.0.0/8"]).unwrap();
//! let per_ip = RateLimitLayer::builder()
//!     .policy("per-minute", Quota::requests_per(600, Duration::from_secs(60)))
//!     .key(client_ip.clone())
//!     .build()
//!     .unwrap();
//! let per_subject = RateLimitLayer::builder()
//!     .policy("orders", Quota::requests_per(60, Duration::from_secs(60)))
//!     .key(Principal)
//!     .build()
//!     .unwrap();
//! let auth = AuthLayer::builder()
//!     .jwt(
//!         JwtValidator::builder()
//!             .issuer(
//!                 Issuer::new("https://issuer.example", ["orders-api"])
//!                     .hmac_key(Algorithm::HS256, b"a secret of at least thirty-two bytes"),
//!             )
//!             .algorithms([Algorithm::HS256])
//!             .build()
//!             .unwrap(),
//!     )
//!     .build()
//!     .unwrap();
//! let new_order = ValidateLayer::builder()
//!     .max_body(16 * 1024)
//!     .content_types(["application/json"])
//!     .schema(serde_json::json!({
//!         "type": "object",
//!         "properties": {"quantity": {"type": "integer", "minimum": 1}},
//!         "required": ["quantity"],
//!     }))
//!     .build()
//!     .unwrap();
//! // One payment per order at a time, across every replica when the manager is on Redis.
//! let pay_lock = LockLayer::new(LockManager::memory(), |req| {
//!     let id = req.uri.path().strip_prefix("/orders/")?.strip_suffix("/pay")?;
//!     Some(format!("order:{id}"))
//! });
//!
//! // Public, so the cache may sit anywhere; here inside the per-IP limit.
//! let products = Router::new()
//!     .route("/products/{id}", get(|| async {
//!         ([("cache-control", "public, max-age=30")], "a product")
//!     }))
//!     .layer(CacheLayer::builder().build());
//! // Private: auth first, then what needs to know who is asking.
//! // (`route_layer`: each layer wraps the route(s) above it, the last one outermost.)
//! let create = Router::new()
//!     .route("/orders", post(|| async { (StatusCode::CREATED, "created") }))
//!     .route_layer(new_order)
//!     .route_layer(IdempotencyLayer::builder().build().unwrap())
//!     .route_layer(per_subject)
//!     .route_layer(RequireScopes::all(["orders:write"]));
//! let pay = Router::new()
//!     .route("/orders/{id}/pay", post(|lock: Extension<HeldLock>| async move {
//!         // Hand the token to the store, which refuses writes with an older one.
//!         format!("paid under fencing token {}", lock.fencing_token())
//!     }))
//!     .route_layer(pay_lock)
//!     .route_layer(RequireScopes::all(["orders:write"]));
//! let orders = create.merge(pay).layer(auth);
//! let app: Router = products
//!     .merge(orders)
//!     .layer(per_ip)
//!     .route("/healthz", get(|| async { "ok" }))
//!     // Outermost: it sees every request, refusals included, and every layer's decision.
//!     .layer(
//!         TraceLayer::builder()
//!             .client_ip(client_ip)
//!             .route("/healthz", RoutePolicy::skip())
//!             .build()
//!             .unwrap(),
//!     );
//!
//! let get = |uri: &str| Request::get(uri).body(Body::empty()).unwrap();
//! let first = app.clone().oneshot(get("/products/7")).await.unwrap();
//! assert_eq!(first.headers()["cache-status"], "battlement; fwd=uri-miss; stored");
//! // No token: a 401 problem with `WWW-Authenticate: Bearer ...` (RFC 6750).
//! let anonymous = Request::post("/orders").body(Body::empty()).unwrap();
//! let refused = app.clone().oneshot(anonymous).await.unwrap();
//! assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
//! assert_eq!(refused.headers()["content-type"], "application/problem+json");
//! # let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap()
//! #     .as_secs() + 600;
//! # let token = jsonwebtoken::encode(&jsonwebtoken::Header::new(Algorithm::HS256),
//! #     &serde_json::json!({"iss": "https://issuer.example", "aud": "orders-api",
//! #         "sub": "user-1", "exp": exp, "scope": "orders:write"}),
//! #     &jsonwebtoken::EncodingKey::from_secret(b"a secret of at least thirty-two bytes"))
//! #     .unwrap();
//! // A token with the scope (made above, hidden): a retry with the same key is replayed.
//! let order = || {
//!     Request::post("/orders")
//!         .header("authorization", format!("Bearer {token}"))
//!         .header("content-type", "application/json")
//!         .header("idempotency-key", "\"order-1\"")
//!         .body(Body::from(r#"{"quantity": 2}"#))
//!         .unwrap()
//! };
//! let created = app.clone().oneshot(order()).await.unwrap();
//! assert_eq!(created.status(), StatusCode::CREATED);
//! // The record is complete when the body has been sent (a dropped body releases the key).
//! http_body_util::BodyExt::collect(created.into_body()).await.unwrap();
//! let retry = app.clone().oneshot(order()).await.unwrap();
//! assert_eq!(retry.headers()["idempotent-replayed"], "true");
//! # }
//! # #[cfg(not(all(feature = "rate-limit", feature = "trace", feature = "auth",
//! #     feature = "validate", feature = "cache", feature = "lock", feature = "idempotency")))]
//! # fn main() {}
//! ```
//!
//! The same stack reads top-down with [`ServiceBuilderExt`] on a hyper or tonic server
//! (`ServiceBuilder::new().trace(..).limit_requests(..).auth(..)`); the crate's `examples/`
//! show axum (`orders.rs`, the demo API), plain hyper (`hyper.rs`) and tonic (`grpc.rs`).
//! The README explains the order: trace outermost; a per-IP limit before auth (it is
//! cheaper than a signature check, and anonymous floods meet it first) and a per-subject
//! limit after it; the cache before auth only on public routes; the body limit and
//! validation closest to the handler that reads the body.
//!
//! ## Many replicas: Redis
//!
//! With the `redis` feature, one [`redis::RedisStore`] (a single node, or a cluster from a
//! node list) backs every stateful layer, so replicas share one limit, one cache (a purge
//! reaches every replica's memory tier), one set of locks and one record per idempotency
//! key. When Redis is slow or gone, each layer follows its failure policy: the limiter
//! fails open, closed or to a local limiter; the cache goes to the origin; idempotency
//! fails closed (`503`) unless told otherwise; a lock that cannot be had is a `503`.
//!
//! ```no_run
//! # #[cfg(all(feature = "redis", feature = "rate-limit", feature = "cache", feature = "lock",
//! #     feature = "idempotency"))]
//! # async fn stack() -> Result<(), Box<dyn std::error::Error>> {
//! use battlement::cache::CacheLayer;
//! use battlement::idempotency::IdempotencyLayer;
//! use battlement::lock::LockManager;
//! use battlement::rate_limit::{FailurePolicy, Quota, RateLimitLayer, RedisBackend};
//! use battlement::redis::{RedisConfig, RedisStore};
//! use std::time::Duration;
//!
//! // `redis://host:6379`, or `redis://a:7000,redis://b:7001,redis://c:7002` for a cluster.
//! let url = std::env::var("REDIS_URL")?;
//! let store = RedisStore::connect(RedisConfig::from_list(&url)?).await?;
//! let per_ip = RateLimitLayer::builder()
//!     .policy("per-minute", Quota::requests_per(600, Duration::from_secs(60)))
//!     // While Redis is unreachable: a local limiter with a quarter of the quota each.
//!     .backend(RedisBackend::new(store.clone()).on_failure(FailurePolicy::Local { replicas: 4 }))
//!     .build()?;
//! // Memory in front of Redis.
//! let cache = CacheLayer::builder().tiered(store.clone()).build();
//! let locks = LockManager::redis(store.clone());
//! let idempotency = IdempotencyLayer::builder().redis(store).build()?;
//! # let _ = (per_ip, cache, locks, idempotency);
//! # Ok(())
//! # }
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
//! - `redis-tls`: TLS to Redis (`rediss://` URLs, a private CA, mutual TLS; implies `redis`).
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

/// The longest duration a layer accepts for a TTL, a lease or a wait ("forever" in
/// practice): longer ones, up to `Duration::MAX`, are cut to it, so that adding one to a
/// clock reading can never overflow (which panics).
#[allow(dead_code)]
pub(crate) const FOREVER: std::time::Duration =
    std::time::Duration::from_secs(10 * 365 * 24 * 3600);
