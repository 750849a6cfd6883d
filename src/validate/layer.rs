//! [`ValidateLayer`] and its builder.

use std::fmt;
use std::sync::Arc;

use serde_json::Value;
use tower_layer::Layer;

use super::ConfigError;
use super::json::JsonLimits;
use super::schema::Schema;
use super::service::Validate;

/// Validates requests before the inner service sees them: body size, content type, JSON
/// (parsed once, with limits) against a JSON Schema, and the query string and headers
/// against schemas of their own. Build it with [`ValidateLayer::builder`].
#[derive(Clone)]
pub struct ValidateLayer {
    shared: Arc<Shared>,
}

impl fmt::Debug for ValidateLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ValidateLayer")
            .field("max_body", &self.shared.max_body)
            .field("content_types", &self.shared.content_types)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for ValidateLayer {
    type Service = Validate<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Validate::new(inner, self.shared.clone())
    }
}

pub(crate) struct Shared {
    pub(crate) max_body: usize,
    pub(crate) content_types: Vec<String>,
    pub(crate) json: Option<JsonLimits>,
    pub(crate) body_schema: Option<Schema>,
    pub(crate) query_schema: Option<(Schema, Value)>,
    pub(crate) header_schema: Option<(Schema, Value)>,
    pub(crate) max_errors: usize,
    pub(crate) report_only: bool,
    pub(crate) reads_body: bool,
    pub(crate) body_idle_timeout: std::time::Duration,
}

/// Default body limit: 1 MiB.
pub const DEFAULT_MAX_BODY: usize = 1024 * 1024;

/// Builds a [`ValidateLayer`]. Schemas are compiled (and linted) in
/// [`ValidateBuilder::build`], so a bad schema stops the service at start, not under load.
#[must_use]
pub struct ValidateBuilder {
    max_body: Option<usize>,
    content_types: Vec<String>,
    json: Option<JsonLimits>,
    body_schema: Option<Value>,
    query_schema: Option<Value>,
    header_schema: Option<Value>,
    allow_backtracking: bool,
    max_errors: usize,
    report_only: bool,
    body_idle_timeout: std::time::Duration,
}

impl fmt::Debug for ValidateBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ValidateBuilder").finish_non_exhaustive()
    }
}

impl ValidateLayer {
    /// A builder.
    pub fn builder() -> ValidateBuilder {
        ValidateBuilder {
            max_body: None,
            content_types: Vec::new(),
            json: None,
            body_schema: None,
            query_schema: None,
            header_schema: None,
            allow_backtracking: false,
            max_errors: 20,
            report_only: false,
            body_idle_timeout: crate::body::DEFAULT_BODY_IDLE_TIMEOUT,
        }
    }
}

impl ValidateBuilder {
    /// The largest body accepted, in bytes (default 1 MiB): `413` from `Content-Length`
    /// before anything is read, or as soon as a chunked body goes over; never more than
    /// this is buffered. Put a decompression layer *outside* this one, so that the limit
    /// applies to the decoded bytes (a small gzip body can inflate a thousandfold).
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.max_body = Some(bytes);
        self
    }

    /// The media types a body may have (`application/json`; parameters such as `charset`
    /// are ignored); anything else, or none, is `415`. Requests without a body pass.
    pub fn content_types<I, T>(mut self, types: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.content_types
            .extend(types.into_iter().map(|t| t.into().to_ascii_lowercase()));
        self
    }

    /// Parses the body as JSON under `limits` (implied by [`ValidateBuilder::schema`] with
    /// the default limits). The parsed value reaches the handler as [`super::ParsedJson`];
    /// the body stays the original bytes.
    pub fn json(mut self, limits: JsonLimits) -> Self {
        self.json = Some(limits);
        self
    }

    /// Validates the JSON body against `schema`.
    pub fn schema(mut self, schema: Value) -> Self {
        self.body_schema = Some(schema);
        self
    }

    /// Validates the query string, as an object of its parameters (strings coerced to the
    /// schema's `integer`, `number`, `boolean` and `array` types), against `schema`.
    /// Pointers start with `/query`.
    pub fn query_schema(mut self, schema: Value) -> Self {
        self.query_schema = Some(schema);
        self
    }

    /// Validates the headers named in `schema`'s `properties` (lowercase names), coerced
    /// like the query. Pointers start with `/header`.
    pub fn header_schema(mut self, schema: Value) -> Self {
        self.header_schema = Some(schema);
        self
    }

    /// Allows `pattern`s that need a backtracking regex engine (backreferences,
    /// lookaround), matched with a backtracking limit. Off by default: such patterns are a
    /// configuration error.
    pub fn allow_backtracking(mut self, allow: bool) -> Self {
        self.allow_backtracking = allow;
        self
    }

    /// The most violations reported in one response (default 20).
    pub fn max_errors(mut self, max: usize) -> Self {
        self.max_errors = max.max(1);
        self
    }

    /// Report-only: schema violations are written into the annotation record and logged,
    /// and the request passes. (Bodies that cannot be read or parsed are still refused:
    /// there is nothing to hand the handler.)
    pub fn report_only(mut self, report_only: bool) -> Self {
        self.report_only = report_only;
        self
    }

    /// How long the body may send nothing before the request is refused with `408`
    /// (default 30 s, [`DEFAULT_BODY_IDLE_TIMEOUT`](crate::body::DEFAULT_BODY_IDLE_TIMEOUT)):
    /// a client that stalls, or declares more than it sends, does not hold the request
    /// forever. A slow upload that keeps sending is not cut.
    pub fn body_idle_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.body_idle_timeout = timeout;
        self
    }

    /// The layer, with every schema compiled and linted.
    pub fn build(self) -> Result<ValidateLayer, ConfigError> {
        let compile = |s: &Value| Schema::compile(s, self.allow_backtracking);
        let body_schema = self.body_schema.as_ref().map(compile).transpose()?;
        let query_schema = match self.query_schema {
            Some(s) => Some((compile(&s)?, s)),
            None => None,
        };
        let header_schema = match self.header_schema {
            Some(s) => Some((compile(&s)?, s)),
            None => None,
        };
        let json = self
            .json
            .or_else(|| body_schema.as_ref().map(|_| JsonLimits::default()));
        let reads_body =
            json.is_some() || self.max_body.is_some() || !self.content_types.is_empty();
        Ok(ValidateLayer {
            shared: Arc::new(Shared {
                max_body: self.max_body.unwrap_or(DEFAULT_MAX_BODY),
                content_types: self.content_types,
                json,
                body_schema,
                query_schema,
                header_schema,
                max_errors: self.max_errors,
                report_only: self.report_only,
                body_idle_timeout: self.body_idle_timeout,
                reads_body,
            }),
        })
    }
}
