//! One type for every refusal: [`Rejection`].
//!
//! Every layer that refuses a request builds a [`Rejection`]: an HTTP status, an RFC 9457
//! problem type and title, an optional detail, extra response headers (`Retry-After`,
//! `WWW-Authenticate`, `RateLimit`, ...), extension members, and the gRPC status code to use
//! when the caller speaks gRPC. It is turned into a response by a [`Render`]er:
//!
//! - for HTTP, an `application/problem+json` body (RFC 9457) with `type`, `title`, `status`,
//!   `detail` and the extension members;
//! - for a request whose `content-type` starts with `application/grpc`, a trailers-only gRPC
//!   response: HTTP 200, `content-type: application/grpc`, `grpc-status` and a percent-encoded
//!   `grpc-message`, and no body.
//!
//! The renderer is replaceable: put [`RenderLayer`] outside the other layers and every
//! refusal below it goes through your [`Render`] implementation.
//!
//! ```
//! use battlement::reject::{GrpcCode, Rejection};
//! use battlement::key::RequestHead;
//! use http::{Request, StatusCode};
//! use http_body_util::{BodyExt, Empty};
//! use bytes::Bytes;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let rejection = Rejection::new(StatusCode::TOO_MANY_REQUESTS, "Too Many Requests")
//!     .with_detail("slow down")
//!     .with_header(http::header::RETRY_AFTER, http::HeaderValue::from_static("3"));
//!
//! // An HTTP caller gets problem+json.
//! let req = Request::new(());
//! let res = rejection.clone().into_response::<Empty<Bytes>>(&RequestHead::of(&req));
//! assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
//! assert_eq!(res.headers()["content-type"], "application/problem+json");
//! assert_eq!(res.headers()["retry-after"], "3");
//! let body = res.into_body().collect().await.unwrap().to_bytes();
//! let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
//! assert_eq!(json["status"], 429);
//! assert_eq!(json["detail"], "slow down");
//!
//! // A gRPC caller gets a trailers-only response.
//! let req = Request::builder().header("content-type", "application/grpc").body(()).unwrap();
//! let res = rejection.into_response::<Empty<Bytes>>(&RequestHead::of(&req));
//! assert_eq!(res.status(), StatusCode::OK);
//! assert_eq!(res.headers()["grpc-status"], GrpcCode::ResourceExhausted.as_str());
//! # }
//! ```

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use serde_json::{Map, Value};
use tower_layer::Layer;
use tower_service::Service;

use crate::body::ResponseBody;
use crate::key::RequestHead;

/// The problem type for a request refused by a rate limit
/// (draft-ietf-httpapi-ratelimit-headers).
pub const QUOTA_EXCEEDED: &str = "https://iana.org/assignments/http-problem-types#quota-exceeded";

/// The problem type that means "nothing more than the status code" (RFC 9457 §4.2.1).
pub const ABOUT_BLANK: &str = "about:blank";

/// A gRPC status code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GrpcCode {
    /// `OK` (0).
    Ok,
    /// `CANCELLED` (1).
    Cancelled,
    /// `UNKNOWN` (2).
    Unknown,
    /// `INVALID_ARGUMENT` (3).
    InvalidArgument,
    /// `DEADLINE_EXCEEDED` (4).
    DeadlineExceeded,
    /// `NOT_FOUND` (5).
    NotFound,
    /// `ALREADY_EXISTS` (6).
    AlreadyExists,
    /// `PERMISSION_DENIED` (7).
    PermissionDenied,
    /// `RESOURCE_EXHAUSTED` (8).
    ResourceExhausted,
    /// `FAILED_PRECONDITION` (9).
    FailedPrecondition,
    /// `ABORTED` (10).
    Aborted,
    /// `OUT_OF_RANGE` (11).
    OutOfRange,
    /// `UNIMPLEMENTED` (12).
    Unimplemented,
    /// `INTERNAL` (13).
    Internal,
    /// `UNAVAILABLE` (14).
    Unavailable,
    /// `DATA_LOSS` (15).
    DataLoss,
    /// `UNAUTHENTICATED` (16).
    Unauthenticated,
}

impl GrpcCode {
    /// The numeric code as it goes on the wire in `grpc-status`.
    pub fn as_str(self) -> &'static str {
        match self {
            GrpcCode::Ok => "0",
            GrpcCode::Cancelled => "1",
            GrpcCode::Unknown => "2",
            GrpcCode::InvalidArgument => "3",
            GrpcCode::DeadlineExceeded => "4",
            GrpcCode::NotFound => "5",
            GrpcCode::AlreadyExists => "6",
            GrpcCode::PermissionDenied => "7",
            GrpcCode::ResourceExhausted => "8",
            GrpcCode::FailedPrecondition => "9",
            GrpcCode::Aborted => "10",
            GrpcCode::OutOfRange => "11",
            GrpcCode::Unimplemented => "12",
            GrpcCode::Internal => "13",
            GrpcCode::Unavailable => "14",
            GrpcCode::DataLoss => "15",
            GrpcCode::Unauthenticated => "16",
        }
    }

    /// The usual gRPC code for an HTTP status (the mapping gRPC itself documents, extended
    /// to the statuses this crate refuses with).
    pub fn from_http(status: StatusCode) -> Self {
        match status.as_u16() {
            400 | 411 | 413 | 414 | 415 | 422 | 431 => GrpcCode::InvalidArgument,
            401 => GrpcCode::Unauthenticated,
            403 => GrpcCode::PermissionDenied,
            404 => GrpcCode::NotFound,
            408 | 504 => GrpcCode::DeadlineExceeded,
            409 => GrpcCode::Aborted,
            412 => GrpcCode::FailedPrecondition,
            429 => GrpcCode::ResourceExhausted,
            501 => GrpcCode::Unimplemented,
            502 | 503 => GrpcCode::Unavailable,
            _ if status.is_server_error() => GrpcCode::Internal,
            _ => GrpcCode::Unknown,
        }
    }
}

/// A refusal: everything needed to answer a request that a layer will not let through.
///
/// Build one with [`Rejection::new`] and the `with_*` methods; render it with
/// [`Rejection::into_response`], which uses the [`Render`]er installed by [`RenderLayer`]
/// or, when there is none, [`DefaultRender`].
#[derive(Clone, Debug)]
pub struct Rejection {
    status: StatusCode,
    problem_type: Cow<'static, str>,
    title: Cow<'static, str>,
    detail: Option<Cow<'static, str>>,
    headers: HeaderMap,
    grpc_code: GrpcCode,
    grpc_metadata: HeaderMap,
    members: Vec<(Cow<'static, str>, Value)>,
}

impl Rejection {
    /// A refusal with `status` and `title`, problem type `about:blank`, and the gRPC code
    /// that usually goes with the status.
    pub fn new(status: StatusCode, title: impl Into<Cow<'static, str>>) -> Self {
        Self {
            status,
            problem_type: Cow::Borrowed(ABOUT_BLANK),
            title: title.into(),
            detail: None,
            headers: HeaderMap::new(),
            grpc_code: GrpcCode::from_http(status),
            grpc_metadata: HeaderMap::new(),
            members: Vec::new(),
        }
    }

    /// Sets the RFC 9457 problem type (a URI).
    #[must_use]
    pub fn with_type(mut self, problem_type: impl Into<Cow<'static, str>>) -> Self {
        self.problem_type = problem_type.into();
        self
    }

    /// Sets the human-readable detail. Never put a request value in it: it is sent back
    /// to the caller and often logged.
    #[must_use]
    pub fn with_detail(mut self, detail: impl Into<Cow<'static, str>>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Adds a header to the HTTP response (and to the gRPC response's headers).
    #[must_use]
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.append(name, value);
        self
    }

    /// Adds metadata sent only on a gRPC response (for example `grpc-retry-pushback-ms`).
    #[must_use]
    pub fn with_grpc_metadata(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.grpc_metadata.append(name, value);
        self
    }

    /// Overrides the gRPC status code.
    #[must_use]
    pub fn with_grpc_code(mut self, code: GrpcCode) -> Self {
        self.grpc_code = code;
        self
    }

    /// Adds an RFC 9457 extension member to the problem document.
    #[must_use]
    pub fn with_member(mut self, name: impl Into<Cow<'static, str>>, value: Value) -> Self {
        self.members.push((name.into(), value));
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The problem type URI.
    pub fn problem_type(&self) -> &str {
        &self.problem_type
    }

    /// The title.
    pub fn title(&self) -> &str {
        &self.title
    }

    /// The detail, if any.
    pub fn detail(&self) -> Option<&str> {
        self.detail.as_deref()
    }

    /// The extra response headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The gRPC-only metadata.
    pub fn grpc_metadata(&self) -> &HeaderMap {
        &self.grpc_metadata
    }

    /// The gRPC status code.
    pub fn grpc_code(&self) -> GrpcCode {
        self.grpc_code
    }

    /// The extension members.
    pub fn members(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.members.iter().map(|(k, v)| (k.as_ref(), v))
    }

    /// The problem document as JSON (`type`, `title`, `status`, `detail`, members).
    pub fn to_problem_json(&self) -> Value {
        let mut doc = Map::new();
        doc.insert("type".into(), Value::from(self.problem_type.as_ref()));
        doc.insert("title".into(), Value::from(self.title.as_ref()));
        doc.insert("status".into(), Value::from(self.status.as_u16()));
        if let Some(detail) = &self.detail {
            doc.insert("detail".into(), Value::from(detail.as_ref()));
        }
        for (name, value) in &self.members {
            // The standard members cannot be overridden by an extension.
            if !matches!(name.as_ref(), "type" | "title" | "status" | "detail") {
                doc.insert(name.to_string(), value.clone());
            }
        }
        Value::Object(doc)
    }

    /// Renders this refusal for `request`, with the renderer a [`RenderLayer`] put into the
    /// request's extensions, or with [`DefaultRender`].
    pub fn into_response<B>(self, request: &RequestHead<'_>) -> Response<ResponseBody<B>> {
        self.render(request).map(ResponseBody::full)
    }

    /// Renders this refusal for `request` into a response with a buffered body (what
    /// [`Rejection::into_response`] does before wrapping the body).
    pub fn render(&self, request: &RequestHead<'_>) -> Response<Bytes> {
        match request.extensions.get::<SharedRender>() {
            Some(render) => render.0.render(self, request),
            None => DefaultRender.render(self, request),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.title)?;
        if let Some(detail) = &self.detail {
            write!(f, ": {detail}")?;
        }
        Ok(())
    }
}

/// Whether a request speaks gRPC (its `content-type` starts with `application/grpc`).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Turns a [`Rejection`] into a response. Implement it to change how every refusal looks.
pub trait Render: Send + Sync + 'static {
    /// Renders `rejection` as the answer to `request`.
    fn render(&self, rejection: &Rejection, request: &RequestHead<'_>) -> Response<Bytes>;
}

impl<F> Render for F
where
    F: Fn(&Rejection, &RequestHead<'_>) -> Response<Bytes> + Send + Sync + 'static,
{
    fn render(&self, rejection: &Rejection, request: &RequestHead<'_>) -> Response<Bytes> {
        self(rejection, request)
    }
}

/// The default renderer: RFC 9457 problem+json for HTTP, trailers-only for gRPC.
#[derive(Clone, Copy, Debug, Default)]
pub struct DefaultRender;

impl DefaultRender {
    /// The HTTP rendering: `application/problem+json`.
    pub fn problem_json(rejection: &Rejection) -> Response<Bytes> {
        let body = serde_json::to_vec(&rejection.to_problem_json()).unwrap_or_default();
        let mut response = Response::new(Bytes::from(body));
        *response.status_mut() = rejection.status;
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        for (name, value) in &rejection.headers {
            headers.append(name, value.clone());
        }
        response
    }

    /// The gRPC rendering: a trailers-only response. Its content type is the request's
    /// (`application/grpc`, `application/grpc+proto`, `application/grpc-web`, ...), or
    /// `application/grpc` when `request_content_type` is `None`.
    pub fn grpc(
        rejection: &Rejection,
        request_content_type: Option<&HeaderValue>,
    ) -> Response<Bytes> {
        let mut response = Response::new(Bytes::new());
        let headers = response.headers_mut();
        let content_type = request_content_type
            .filter(|v| v.as_bytes().starts_with(b"application/grpc"))
            .cloned()
            .unwrap_or(HeaderValue::from_static("application/grpc"));
        headers.insert(CONTENT_TYPE, content_type);
        headers.insert(
            "grpc-status",
            HeaderValue::from_static(rejection.grpc_code.as_str()),
        );
        let message = match &rejection.detail {
            Some(detail) => format!("{}: {}", rejection.title, detail),
            None => rejection.title.to_string(),
        };
        if let Ok(value) = HeaderValue::from_str(&grpc_percent_encode(&message)) {
            headers.insert("grpc-message", value);
        }
        for (name, value) in rejection.headers.iter().chain(&rejection.grpc_metadata) {
            headers.append(name, value.clone());
        }
        response
    }
}

impl Render for DefaultRender {
    fn render(&self, rejection: &Rejection, request: &RequestHead<'_>) -> Response<Bytes> {
        if is_grpc(request.headers) {
            Self::grpc(rejection, request.headers.get(CONTENT_TYPE))
        } else {
            Self::problem_json(rejection)
        }
    }
}

/// Percent-encodes a `grpc-message` as the gRPC HTTP/2 protocol says: every byte outside
/// printable ASCII, and `%` itself.
pub fn grpc_percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[derive(Clone)]
struct SharedRender(Arc<dyn Render>);

/// What a layer keeps of a request so that it can still render a refusal after the request
/// has moved into the inner service (a panic caught later, for example): the content type
/// (gRPC or not) and the installed renderer.
#[derive(Clone, Default)]
#[allow(dead_code)] // Used by layers behind features.
pub(crate) struct RenderContext {
    content_type: Option<HeaderValue>,
    render: Option<SharedRender>,
}

#[allow(dead_code)] // Used by layers behind features.
impl RenderContext {
    /// The context of `request`.
    pub(crate) fn of(request: &RequestHead<'_>) -> Self {
        Self {
            content_type: request.headers.get(CONTENT_TYPE).cloned(),
            render: request.extensions.get::<SharedRender>().cloned(),
        }
    }

    /// Renders `rejection` as the answer to the request this context came from.
    pub(crate) fn render(&self, rejection: &Rejection) -> Response<Bytes> {
        let mut request = Request::new(());
        if let Some(content_type) = &self.content_type {
            request
                .headers_mut()
                .insert(CONTENT_TYPE, content_type.clone());
        }
        if let Some(render) = &self.render {
            request.extensions_mut().insert(render.clone());
        }
        rejection.render(&RequestHead::of(&request))
    }
}

/// Installs a [`Render`]er for every refusal made by the layers inside it.
///
/// ```
/// use battlement::reject::{RenderLayer, Rejection};
/// use battlement::key::RequestHead;
/// use bytes::Bytes;
/// use http::Response;
///
/// let layer = RenderLayer::new(|rejection: &Rejection, _req: &RequestHead<'_>| {
///     let mut res = Response::new(Bytes::from(rejection.title().to_owned()));
///     *res.status_mut() = rejection.status();
///     res
/// });
/// # let _ = layer;
/// ```
#[derive(Clone)]
pub struct RenderLayer {
    render: SharedRender,
}

impl RenderLayer {
    /// Uses `render` for every refusal below this layer.
    pub fn new(render: impl Render) -> Self {
        Self {
            render: SharedRender(Arc::new(render)),
        }
    }
}

impl fmt::Debug for RenderLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RenderLayer").finish_non_exhaustive()
    }
}

impl<S> Layer<S> for RenderLayer {
    type Service = Renderer<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Renderer {
            inner,
            render: self.render.clone(),
        }
    }
}

/// The service made by [`RenderLayer`].
#[derive(Clone)]
pub struct Renderer<S> {
    inner: S,
    render: SharedRender,
}

impl<S> fmt::Debug for Renderer<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Renderer").finish_non_exhaustive()
    }
}

impl<S, B> Service<Request<B>> for Renderer<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        req.extensions_mut().insert(self.render.clone());
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(grpc_percent_encode("a b%c\né"), "a b%25c%0A%C3%A9");
    }

    #[test]
    fn standard_members_are_not_overridden() {
        let r = Rejection::new(StatusCode::BAD_REQUEST, "Bad")
            .with_member("status", Value::from(200))
            .with_member("errors", serde_json::json!([]));
        let doc = r.to_problem_json();
        assert_eq!(doc["status"], 400);
        assert_eq!(doc["errors"], serde_json::json!([]));
    }

    #[test]
    fn grpc_codes_follow_http_statuses() {
        assert_eq!(
            GrpcCode::from_http(StatusCode::UNAUTHORIZED),
            GrpcCode::Unauthenticated
        );
        assert_eq!(
            GrpcCode::from_http(StatusCode::FORBIDDEN),
            GrpcCode::PermissionDenied
        );
        assert_eq!(
            GrpcCode::from_http(StatusCode::SERVICE_UNAVAILABLE),
            GrpcCode::Unavailable
        );
        assert_eq!(
            GrpcCode::from_http(StatusCode::UNPROCESSABLE_ENTITY),
            GrpcCode::InvalidArgument
        );
    }
}
