//! Request validation: bounded bodies, JSON parsed once with limits, JSON Schema, RFC 9457
//! errors that point at every violation without echoing a value.
//!
//! [`ValidateLayer`] refuses bad input before the handler runs:
//!
//! - a body over the limit: `413` (from `Content-Length` at once, or as soon as a chunked
//!   body goes over; never more than the limit is buffered);
//! - a body that sends nothing for [`body_idle_timeout`](ValidateBuilder::body_idle_timeout)
//!   (30 s): `408`; an empty body where JSON is expected (`POST`, `PUT`, `PATCH`): `400`;
//! - a body of another media type: `415`;
//! - malformed JSON, or JSON over the [`JsonLimits`] (depth 64, string, array and object
//!   sizes), duplicate keys, integers outside 64 bits, numbers that overflow or underflow,
//!   invalid UTF-8: `400` with the byte `offset`;
//! - schema violations in the body, the query string or the headers: `422` with
//!   `errors: [{"pointer", "keyword", "detail"}]`, every violation up to a cap (20), pointers
//!   in wire names (`/quantity`, `/query/page`, `/header/x-tenant`), values never echoed.
//!   gRPC callers get `INVALID_ARGUMENT` with the first violation.
//!
//! The handler gets the parsed value as [`ParsedJson`] (no second parse), and the original
//! bytes as the body, for handlers that deserialize themselves: the inner service takes a
//! [`RequestBody`](crate::body::RequestBody) around the server's body type (the body
//! untouched when there was none to read), which axum routes, tonic servers and a generic
//! hyper `service_fn` accept as they are. Schemas are compiled once,
//! when the layer is built, after a lint that refuses what can be abused: a `pattern` that
//! needs a backtracking regex engine (unless allowed), `pattern` or `format` on a string
//! without `maxLength`, `uniqueItems` without `maxItems`. Report-only mode records
//! violations in the annotation record and lets the request pass.
//!
//! Put decompression *outside* this layer, so that the limit applies to decoded bytes.
//!
//! ```
//! use axum::{Router, routing::post, Extension};
//! use battlement::validate::{ParsedJson, ValidateLayer};
//! use http::{Request, StatusCode};
//! use serde_json::json;
//! use tower::ServiceExt;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let validate = ValidateLayer::builder()
//!     .max_body(16 * 1024)
//!     .content_types(["application/json"])
//!     .schema(json!({
//!         "type": "object",
//!         "properties": {"quantity": {"type": "integer", "minimum": 1, "maximum": 100}},
//!         "required": ["quantity"],
//!         "additionalProperties": false
//!     }))
//!     .build()
//!     .unwrap();
//! let app: Router = Router::new()
//!     .route("/orders", post(|Extension(ParsedJson(body)): Extension<ParsedJson>| async move {
//!         format!("{} items", body["quantity"])
//!     }))
//!     .layer(validate);
//!
//! let bad = Request::post("/orders")
//!     .header("content-type", "application/json")
//!     .body(axum::body::Body::from(r#"{"quantity": 1000}"#))
//!     .unwrap();
//! let res = app.clone().oneshot(bad).await.unwrap();
//! assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY);
//!
//! let good = Request::post("/orders")
//!     .header("content-type", "application/json")
//!     .body(axum::body::Body::from(r#"{"quantity": 3}"#))
//!     .unwrap();
//! assert_eq!(app.oneshot(good).await.unwrap().status(), StatusCode::OK);
//! # }
//! ```

mod future;
mod json;
mod layer;
mod params;
mod schema;
mod service;

use std::sync::Arc;

use serde_json::Value;

pub use future::ResponseFuture;
pub use json::{JsonError, JsonLimits};
pub use layer::{DEFAULT_MAX_BODY, ValidateBuilder, ValidateLayer};
pub use schema::Violation;
pub use service::Validate;

/// The request body as parsed by [`ValidateLayer`], in the request extensions.
#[derive(Clone, Debug)]
pub struct ParsedJson(pub Arc<Value>);

/// A configuration the validate layer refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A `pattern` needs a backtracking regex engine and backtracking was not allowed.
    #[error("a pattern needs a backtracking regex engine (allow it explicitly): {0}")]
    Backtracking(String),
    /// The schema is not a valid JSON Schema.
    #[error("invalid schema: {0}")]
    Schema(String),
    /// The schema lint refused something that can be abused.
    #[error("schema lint: {0}")]
    Lint(String),
}
