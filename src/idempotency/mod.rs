//! Idempotency keys (draft-ietf-httpapi-idempotency-key-header): a retried `POST` runs
//! once, and the retry gets the first response again.
//!
//! A client that does not know whether its `POST /orders` went through (the connection
//! dropped, a proxy timed out) sends it again with the same `Idempotency-Key`.
//! [`IdempotencyLayer`] makes sure the order is placed once:
//!
//! | the request | the answer |
//! |---|---|
//! | a key never seen | the handler runs; its response is stored |
//! | the same key and the same request again | the stored response, with `Idempotent-Replayed: true`; the handler does not run |
//! | the same key while the first request still runs | `409 Conflict`, `Retry-After: 1` |
//! | the same key with another request (body, path, ...) | `422 Unprocessable Content` |
//! | no key, on a layer built with [`require_key(true)`](IdempotencyBuilder::require_key) | `400 Bad Request` |
//! | a malformed key | `400 Bad Request` |
//! | no key otherwise, or a method other than `POST` / `PATCH` | straight through, untouched |
//!
//! Every refusal is an RFC 9457 problem (a gRPC status for gRPC callers) that never echoes
//! the key or the body.
//!
//! ```
//! use axum::{Router, routing::post};
//! use battlement::idempotency::IdempotencyLayer;
//! use http::{Request, StatusCode};
//! use http_body_util::BodyExt;
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let placed = Arc::new(AtomicUsize::new(0));
//! let counter = placed.clone();
//! let app: Router = Router::new()
//!     .route("/orders", post(move |body: String| async move {
//!         let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
//!         (StatusCode::CREATED, [("location", format!("/orders/{n}"))], format!("order {n}: {body}"))
//!     }))
//!     .layer(IdempotencyLayer::builder().build().unwrap());
//!
//! let order = |key: &str, body: &'static str| {
//!     Request::post("/orders")
//!         .header("content-type", "application/json")
//!         .header("idempotency-key", key)
//!         .body(axum::body::Body::from(body))
//!         .unwrap()
//! };
//! let first = app.clone().oneshot(order("\"8e03978e-40d5\"", r#"{"qty":1}"#)).await.unwrap();
//! assert_eq!(first.status(), StatusCode::CREATED);
//! let body = first.into_body().collect().await.unwrap().to_bytes();
//!
//! // The client retries: same key, same request. The handler does not run again.
//! let retry = app.clone().oneshot(order("\"8e03978e-40d5\"", r#"{"qty":1}"#)).await.unwrap();
//! assert_eq!(retry.status(), StatusCode::CREATED);
//! assert_eq!(retry.headers()["idempotent-replayed"], "true");
//! assert_eq!(retry.headers()["location"], "/orders/1");
//! assert_eq!(retry.into_body().collect().await.unwrap().to_bytes(), body);
//! assert_eq!(placed.load(Ordering::SeqCst), 1);
//!
//! // The same key with another body is a client bug.
//! let reused = app.oneshot(order("\"8e03978e-40d5\"", r#"{"qty":2}"#)).await.unwrap();
//! assert_eq!(reused.status(), StatusCode::UNPROCESSABLE_ENTITY);
//! assert_eq!(reused.headers()["content-type"], "application/problem+json");
//! # }
//! ```
//!
//! The layer reads the body of a keyed request before the handler runs (to fingerprint
//! it), so the inner service takes a [`RequestBody`](crate::body::RequestBody) around the
//! server's body type: the bytes read, or the body untouched for requests without a key.
//! axum routes, tonic servers and a generic hyper `service_fn` accept it as they are.
//!
//! ## The key
//!
//! The `Idempotency-Key` header holds a Structured Field string
//! (`"8e03978e-40d5-43e8-bc93-6894a57f9324"`), as the draft defines it; a bare token
//! (`8e03978e-40d5-...`, what Stripe's clients send) is accepted too and names the same
//! key. Once unquoted it must be 1 to 255 visible ASCII characters; anything else, or two
//! `Idempotency-Key` headers, is a `400`.
//!
//! Keys are **scoped**: the principal (issuer and subject of the
//! [`Principal`](crate::principal::Principal) an auth layer set, or anonymous), the method,
//! the route (axum's route template with feature `axum`, else the path) and the key itself,
//! hashed together with SHA-256. Two users who pick the same key never see each other's
//! responses; put the auth layer outside this one.
//!
//! ## What "the same request" means
//!
//! A fingerprint: SHA-256 of the method, the path and query, the
//! [chosen headers](IdempotencyBuilder::fingerprint_headers) (`content-type` by default)
//! and the body. To compute it the body is read, up to a cap (1 MiB,
//! [`max_request_body`](IdempotencyBuilder::max_request_body); more is a `413`; a body that
//! sends nothing for [`body_idle_timeout`](IdempotencyBuilder::body_idle_timeout), 30 s, is
//! a `408`), and handed on to the handler as the same bytes. Only requests with a key are
//! read.
//!
//! ## What is stored, and what is not
//!
//! The first request claims its key in one atomic step: an in-flight record holding the
//! fingerprint and a random 128-bit owner token, which lives for a lease
//! ([`in_flight_ttl`](IdempotencyBuilder::in_flight_ttl), 60 s) and is renewed every third
//! of it while the request runs, so a slow request keeps its key (a retry meanwhile gets
//! `409`, never a second run), up to [`max_hold`](IdempotencyBuilder::max_hold) (5
//! minutes): a stuck request then stops renewing, and its key frees itself one lease later. Its response then streams
//! to the client as it comes, and is copied on the side; when the body has ended, the
//! record becomes the stored response: status, the
//! [allowlisted headers](IdempotencyBuilder::stored_headers) (`content-type`,
//! `content-encoding`, `content-location`, `location`, `etag`, `last-modified` by default,
//! gRPC's status headers always; never `set-cookie`),
//! the body and any trailers, kept for the [`retention`](IdempotencyBuilder::retention)
//! (24 h). The write happens only if the record still carries the request's owner token:
//! a request that outlived its lease, and whose key was claimed again since, cannot
//! overwrite what the newer request stores. The write runs in a task of its own, so a client
//! that disconnects right at the end does not lose it.
//!
//! These are **not** stored; their key is released, so a retry runs the request again:
//!
//! - `5xx` responses (unless [`store_server_errors(true)`](IdempotencyBuilder::store_server_errors),
//!   which is what Stripe does) and `429`;
//! - responses over the response cap (1 MiB,
//!   [`max_response_body`](IdempotencyBuilder::max_response_body)) and event streams
//!   (`text/event-stream`): the client gets the whole body, nothing is kept;
//! - responses whose body fails, or that the client drops before their end;
//! - requests whose inner service returns an error.
//!
//! A request whose process dies keeps its key until its lease runs out (no renewal comes);
//! retries meanwhile get `409`. A request that loses its claim while it runs (the store
//! was out of reach for a whole lease, and the record expired) still answers its client,
//! but its response is not stored over a newer claim.
//!
//! ## Stores
//!
//! Records live in an [`IdempotencyStore`]: [`MemoryStore`] (the default; bounded in records
//! and bytes, expired records dropped as it goes, no background task) for one instance, or
//! with feature `redis` [`RedisIdempotencyStore`]
//! ([`IdempotencyBuilder::redis`]) for several: each step is one Lua script (one atomic
//! round trip), key names are SHA-256 hashes (no client bytes), and it runs on Redis
//! Cluster.
//!
//! ## When the store is down
//!
//! A Redis store answers within its timeout or fails (circuit breaker open, timeout). The
//! [`FailurePolicy`] decides: [`Closed`](FailurePolicy::Closed), the default, refuses keyed
//! requests with `503` and `Retry-After: 1`, because running a payment twice is worse than
//! refusing it; [`Open`](FailurePolicy::Open) runs them without idempotency and logs a
//! warning. Requests without a key are not affected either way.
//!
//! ## Annotation
//!
//! With a logging layer outside it, the layer writes an
//! [`IdempotencyNote`](crate::annotate::IdempotencyNote) into the request's record:
//! `stored`, `replayed`, `conflict` (`422`), `in_flight` (`409`), `missing`, `invalid`,
//! `too_large`, `not_stored`, `unavailable` (`503`) or `fail_open`.
//! Requests without a key leave no note.

mod body;
mod future;
mod layer;
mod record;
#[cfg(feature = "redis")]
mod redis;
mod service;
mod store;

use http::HeaderName;

pub use body::IdempotencyBody;
pub use future::ResponseFuture;
pub use layer::{
    DEFAULT_IN_FLIGHT_TTL, DEFAULT_MAX_HOLD, DEFAULT_MAX_REQUEST_BODY, DEFAULT_MAX_RESPONSE_BODY,
    DEFAULT_RETENTION, IdempotencyBuilder, IdempotencyLayer,
};
pub use record::{FRAME_VERSION, FrameError, MAX_FRAME_FIELDS, StoredResponse};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use redis::RedisIdempotencyStore;
pub use service::{Idempotency, MAX_KEY_LEN};
pub use store::{
    BoxFuture, Claim, DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES, Fingerprint, IdempotencyStore,
    MemoryStore, OwnerToken, Scope, StoreError,
};

/// The `Idempotency-Key` request header.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The `Idempotent-Replayed` response header, `true` on a replayed response.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// What the layer does with keyed requests while the store cannot be reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailurePolicy {
    /// Refuse them with `503` and `Retry-After: 1` (the default): running a request twice
    /// is worse than refusing it.
    #[default]
    Closed,
    /// Run them without idempotency, and log a warning.
    Open,
}

/// An idempotency configuration that cannot work, found when the layer is built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// `set-cookie` in the stored headers: a replay would hand a cookie to another request.
    #[error("set-cookie can never be stored for replay")]
    SetCookieStored,
    /// A header that describes one connection (or `idempotent-replayed`) in the stored
    /// headers.
    #[error("the {0} header cannot be stored for replay")]
    HeaderNotStorable(String),
    /// No method to apply to.
    #[error("an idempotency layer needs at least one method")]
    NoMethods,
    /// A duration under a millisecond (the setting is named).
    #[error("{0} must be at least 1 ms")]
    ZeroDuration(&'static str),
    /// A response cap over 4 GiB (what a stored record can hold).
    #[error("max_response_body {0} is over 256 MiB")]
    ResponseCapTooLarge(usize),
}
