//! The [`Validate`] service.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use serde_json::Value;
use tower_service::Service;

use super::ParsedJson;
use super::future::ResponseFuture;
use super::layer::Shared;
use super::params::{header_object, query_object};
use super::schema::Violation;
use crate::annotate::{Annotation, ValidationNote};
use crate::body::{Collected, RequestBody, ResponseBody};
use crate::key::RequestHead;
use crate::reject::{GrpcCode, Rejection};

/// Validates requests to the inner service. Made by [`super::ValidateLayer`].
pub struct Validate<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Validate<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: Clone> Clone for Validate<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Validate<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Validate")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// Violations found so far, and how many there were in all.
#[derive(Default)]
pub(crate) struct Found {
    pub(crate) violations: Vec<Violation>,
    pub(crate) total: usize,
}

impl Found {
    fn add(&mut self, (violations, total): (Vec<Violation>, usize), cap: usize) {
        self.total += total;
        for v in violations {
            if self.violations.len() < cap {
                self.violations.push(v);
            }
        }
    }
}

/// A refusal without violations (413, 415, 400).
pub(crate) fn refuse(
    head: &RequestHead<'_>,
    status: StatusCode,
    title: &'static str,
    detail: String,
) -> Response<Bytes> {
    Rejection::new(status, title)
        .with_detail(detail)
        .with_grpc_code(GrpcCode::InvalidArgument)
        .render(head)
}

/// Writes what was found into the annotation; `Some(422)` unless report-only or clean.
fn conclude(shared: &Shared, head: &RequestHead<'_>, found: Found) -> Option<Response<Bytes>> {
    let first = found.violations.first().map(|v| v.pointer.clone());
    if let Some(annotation) = Annotation::of(head.extensions) {
        annotation.update(|r| {
            r.validation = Some(ValidationNote {
                error_count: found.total,
                first_pointer: first.clone(),
                report_only: shared.report_only,
            });
        });
    }
    if found.total == 0 {
        return None;
    }
    if shared.report_only {
        // The pointer holds client-chosen names (escaped before they reach a log line).
        let pointer = crate::annotate::escape(first.as_deref().unwrap_or(""));
        tracing::warn!(
            violations = found.total,
            first_pointer = &*pointer,
            "battlement::validate: request violates its schema (report-only)"
        );
        return None;
    }
    let lead = &found.violations[0];
    let more = match found.total - 1 {
        0 => String::new(),
        n => format!(" (and {n} more)"),
    };
    let errors = serde_json::to_value(&found.violations).unwrap_or(Value::Null);
    Some(
        Rejection::new(StatusCode::UNPROCESSABLE_ENTITY, "Unprocessable Content")
            .with_detail(format!("{} {}{more}", lead.pointer, lead.detail))
            .with_member("errors", errors)
            .with_grpc_code(GrpcCode::InvalidArgument)
            .render(head),
    )
}

/// The body is read: parse, validate, and hand the request on (or refuse it).
pub(crate) fn finish<B>(
    shared: &Shared,
    mut parts: Parts,
    read: Collected,
    mut found: Found,
) -> Result<Request<RequestBody<B>>, Box<Response<Bytes>>> {
    let bytes = &read.data;
    if let Some(limits) = &shared.json {
        let value = match limits.parse(bytes) {
            Ok(value) => value,
            Err(e) => {
                let head = RequestHead::of_parts(&parts);
                let response = Rejection::new(StatusCode::BAD_REQUEST, "Bad Request")
                    .with_detail(format!("The body is not acceptable JSON: {e}."))
                    .with_member("offset", Value::from(e.offset))
                    .with_grpc_code(GrpcCode::InvalidArgument)
                    .render(&head);
                return Err(Box::new(response));
            }
        };
        if let Some(schema) = &shared.body_schema
            && !schema.is_valid(&value)
        {
            found.add(
                schema.violations(&value, "", shared.max_errors),
                shared.max_errors,
            );
        }
        if let Some(response) = conclude(shared, &RequestHead::of_parts(&parts), found) {
            return Err(Box::new(response));
        }
        parts.extensions.insert(ParsedJson(Arc::new(value)));
    } else if let Some(response) = conclude(shared, &RequestHead::of_parts(&parts), found) {
        return Err(Box::new(response));
    }
    Ok(Request::from_parts(parts, read.into_body()))
}

fn media_type_allowed(shared: &Shared, head: &RequestHead<'_>) -> bool {
    if shared.content_types.is_empty() {
        return true;
    }
    let Some(value) = head.headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let media = value.split(';').next().unwrap_or("").trim();
    shared
        .content_types
        .iter()
        .any(|allowed| allowed.eq_ignore_ascii_case(media))
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Validate<S>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Clone,
    ReqBody: Body<Data = Bytes>,
    ReqBody::Error: fmt::Display,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let shared = &*self.shared;
        let head = RequestHead::of(&req);
        let cap = shared.max_errors;
        let mut found = Found::default();
        if let Some((schema, raw)) = &shared.query_schema {
            let value = query_object(head.uri.query().unwrap_or(""), raw);
            if !schema.is_valid(&value) {
                found.add(schema.violations(&value, "/query", cap), cap);
            }
        }
        if let Some((schema, raw)) = &shared.header_schema {
            let value = header_object(head.headers, raw);
            if !schema.is_valid(&value) {
                found.add(schema.violations(&value, "/header", cap), cap);
            }
        }
        let has_body = !req.body().is_end_stream()
            && head
                .headers
                .get(CONTENT_LENGTH)
                .is_none_or(|v| v.as_bytes() != b"0");
        // A method that carries a body, on a layer that parses JSON, with an empty one: not
        // a body to skip but one to refuse (it would reach the handler without its parsed
        // JSON), as it is when the same empty body comes chunked.
        let empty_but_expected = !has_body
            && (shared.json.is_some() || shared.body_schema.is_some())
            && matches!(*head.method, Method::POST | Method::PUT | Method::PATCH);
        if !shared.reads_body || !(has_body || empty_but_expected) {
            if (found.total > 0 || shared.query_schema.is_some() || shared.header_schema.is_some())
                && let Some(response) = conclude(shared, &head, found)
            {
                return ResponseFuture::refused(response);
            }
            return ResponseFuture::inner(self.inner.call(req.map(RequestBody::inner)));
        }
        // Cheap refusals before reading anything.
        if found.total > 0 && !shared.report_only {
            if let Some(response) = conclude(shared, &head, found) {
                return ResponseFuture::refused(response);
            }
            unreachable!("conclude refuses violations outside report-only mode");
        }
        if !media_type_allowed(shared, &head) {
            let allowed = shared.content_types.join(", ");
            return ResponseFuture::refused(refuse(
                &head,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Unsupported Media Type",
                format!("The body must be one of: {allowed}."),
            ));
        }
        let declared = crate::body::content_length(head.headers);
        if declared.is_some_and(|n| n > shared.max_body as u64) {
            return ResponseFuture::refused(too_large(&head, shared.max_body));
        }
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::collecting(req, inner, self.shared.clone(), found, declared)
    }
}

pub(crate) fn too_large(head: &RequestHead<'_>, max: usize) -> Response<Bytes> {
    refuse(
        head,
        StatusCode::PAYLOAD_TOO_LARGE,
        "Content Too Large",
        format!("The body is larger than {max} bytes."),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn pointers_are_escaped_for_logs() {
        assert_eq!(crate::annotate::escape("/query/page"), "/query/page");
        assert_eq!(
            crate::annotate::escape("/query/a\u{202e}b\nc\u{2028}"),
            "/query/a\\u{202e}b\\u{a}c\\u{2028}"
        );
    }
}
