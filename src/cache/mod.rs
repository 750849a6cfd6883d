//! A shared response cache: RFC 9111 semantics, safe by default, and one origin call per
//! key however many requests miss at once.
//!
//! [`CacheLayer`] answers `GET` and `HEAD` from stored responses:
//!
//! - Only responses that say how long they are fresh are stored (`s-maxage`, `max-age`,
//!   `Expires`), unless the layer has a default TTL; `no-store`, `private`, `no-cache` and
//!   `Vary: *` responses are not, nor any response with `Set-Cookie`, ever.
//! - A request with `Authorization` or `Cookie` is neither answered from nor stored into the
//!   shared cache unless the response says `public` or `s-maxage`, or the layer is
//!   [per principal](CacheBuilder::per_principal) (each subject its own entries).
//! - Keys are built from the method, the path, the sorted query (optionally only some
//!   parameters) and the host when an allowlist is given; every part is length-prefixed, and
//!   a key never appears in a response. `Vary` is honoured with a variant per value.
//! - Stored responses carry `Age`, an RFC 9211 `Cache-Status` (`hit`, `fwd=uri-miss`,
//!   `collapsed`, `ttl`), a strong `ETag` generated from the body when the origin sent none;
//!   `If-None-Match` / `If-Modified-Since` get `304`, `HEAD` is answered from the `GET`
//!   entry.
//! - Concurrent misses for one key make one origin call; the others wait (a bounded time)
//!   and are answered from what it stored. The fill runs in a task of its own, so a client
//!   that goes away does not restart it for the others. A response that turns out
//!   uncacheable leaves a short "pass" marker so that later requests go straight to the
//!   origin.
//! - RFC 5861: `stale-while-revalidate` serves the stale entry and refreshes it once in the
//!   background; `stale-if-error` answers an origin `5xx` or error with the stale entry.
//! - The body streams to the client while it is captured up to a cap (1 MiB); past the cap
//!   the copy is abandoned and the client still gets every byte. Trailers are kept.
//!
//! - Purges: [`CacheLayer::purge`] by URL, [`CacheLayer::purge_tag`] by the tags a response
//!   named in `Surrogate-Key` or `Cache-Tag` (removed before the response leaves), in O(1).
//!   A successful `POST`, `PUT`, `PATCH` or `DELETE` through the layer purges its own URL
//!   (RFC 9111 §4.4).
//!
//! The store is in memory, bounded in bytes; with the `redis` feature, in Redis
//! ([`CacheBuilder::redis`]) or tiered, memory in front of Redis ([`CacheBuilder::tiered`]),
//! where replicas coordinate fills (one origin call across them) and purges reach every
//! replica's memory tier. Tag versions live in Redis: a replica reads a tag's version the
//! first time it meets the tag, so replicas started at different times agree, and one that
//! was cut off from purge messages forgets its memory tier and its versions once it hears
//! them again. A slow or absent store sends requests to the origin. The cache writes its
//! status and the entry's age into the annotation record.
//!
//! ```
//! use axum::{Router, routing::get};
//! use battlement::cache::CacheLayer;
//! use http::Request;
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let app: Router = Router::new()
//!     .route("/products/{id}", get(|| async {
//!         ([("cache-control", "public, max-age=30")], "a product")
//!     }))
//!     .layer(CacheLayer::builder().build());
//!
//! let first = app.clone().oneshot(Request::get("/products/1").body(axum::body::Body::empty()).unwrap()).await.unwrap();
//! assert!(first.headers()["cache-status"].to_str().unwrap().contains("fwd=uri-miss"));
//! # use http_body_util::BodyExt; first.into_body().collect().await.unwrap();
//! # tokio::task::yield_now().await;
//! let second = app.oneshot(Request::get("/products/1").body(axum::body::Body::empty()).unwrap()).await.unwrap();
//! assert!(second.headers()["cache-status"].to_str().unwrap().contains("hit"));
//! # }
//! ```

mod body;
mod future;
pub(crate) mod key;
mod layer;
pub(crate) mod policy;
mod service;
pub(crate) mod store;

pub use body::{CacheBody, CaptureBody};
pub use future::ResponseFuture;
pub use layer::{CacheBuilder, CacheLayer};
pub use service::Cache;

#[cfg(test)]
mod tests;
