//! The [`Idempotency`] service: key parsing, scope and fingerprint, the no-key fast path.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::RETRY_AFTER;
use http::request::Parts;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use sha2::{Digest, Sha256};
use tower_service::Service;

use super::IDEMPOTENCY_KEY;
use super::body::IdempotencyBody;
use super::future::ResponseFuture;
use super::layer::Shared;
use super::store::{Fingerprint, Scope};
use crate::annotate::{Annotation, IdempotencyNote, IdempotencyOutcome};
use crate::body::{RequestBody, ResponseBody};
use crate::key::RequestHead;
use crate::principal::Principal;
use crate::reject::Rejection;

/// The longest key the layer accepts, in characters (after unquoting).
pub const MAX_KEY_LEN: usize = 255;

/// Makes keyed requests to the inner service idempotent. Made by
/// [`super::IdempotencyLayer`].
pub struct Idempotency<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Idempotency<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: Clone> Clone for Idempotency<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Idempotency<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// The key in an `Idempotency-Key` value: a Structured Field string (`"..."`, with `\"`
/// and `\\` escapes), as the draft defines it, or a bare token (what Stripe's clients
/// send); 1 to 255 visible ASCII characters once unquoted. `None` for anything else.
pub(crate) fn parse_key(raw: &[u8]) -> Option<Cow<'_, [u8]>> {
    let raw = raw.trim_ascii();
    let key: Cow<'_, [u8]> = match raw {
        [b'"', inner @ .., b'"'] => {
            if inner.contains(&b'\\') {
                let mut out = Vec::with_capacity(inner.len());
                let mut bytes = inner.iter();
                while let Some(&b) = bytes.next() {
                    match b {
                        b'\\' => match bytes.next() {
                            Some(&escaped @ (b'"' | b'\\')) => out.push(escaped),
                            _ => return None,
                        },
                        b'"' => return None,
                        _ => out.push(b),
                    }
                }
                Cow::Owned(out)
            } else if inner.contains(&b'"') {
                return None;
            } else {
                Cow::Borrowed(inner)
            }
        }
        // An opening quote without its closing one (or with parameters after it).
        [b'"', ..] => return None,
        bare => Cow::Borrowed(bare),
    };
    let visible = key.iter().all(|b| (0x21..=0x7e).contains(b));
    (visible && (1..=MAX_KEY_LEN).contains(&key.len())).then_some(key)
}

fn digest(hash: Sha256) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(&hash.finalize());
    out
}

fn part(hash: &mut Sha256, bytes: &[u8]) {
    hash.update((bytes.len() as u64).to_be_bytes());
    hash.update(bytes);
}

/// The route a request is scoped to: axum's route template when there is one, else the
/// path.
fn route<'a>(head: &RequestHead<'a>) -> &'a str {
    #[cfg(feature = "axum")]
    if let Some(matched) = head.extensions.get::<axum::extract::MatchedPath>() {
        return matched.as_str();
    }
    head.uri.path()
}

/// SHA-256 of the principal (issuer and subject, or none), the method, the route and the
/// key, each part length-prefixed so that no two different scopes hash the same input.
pub(crate) fn scope(head: &RequestHead<'_>, key: &[u8]) -> Scope {
    let mut hash = Sha256::new();
    hash.update(b"battlement/idempotency/scope/1");
    match Principal::of(head.extensions) {
        Some(principal) => {
            hash.update([1]);
            match principal.issuer() {
                Some(issuer) => {
                    hash.update([1]);
                    part(&mut hash, issuer.as_bytes());
                }
                None => hash.update([0]),
            }
            part(&mut hash, principal.subject().as_bytes());
        }
        // Anonymous: a marker no subject can produce.
        None => hash.update([0]),
    }
    part(&mut hash, head.method.as_str().as_bytes());
    part(&mut hash, route(head).as_bytes());
    part(&mut hash, key);
    Scope::from_bytes(digest(hash))
}

/// SHA-256 of the method, the path and query, the chosen headers (every value, in order)
/// and the body.
pub(crate) fn fingerprint(shared: &Shared, parts: &Parts, body: &[u8]) -> Fingerprint {
    let mut hash = Sha256::new();
    hash.update(b"battlement/idempotency/fingerprint/1");
    part(&mut hash, parts.method.as_str().as_bytes());
    let target = parts
        .uri
        .path_and_query()
        .map_or(parts.uri.path(), |pq| pq.as_str());
    part(&mut hash, target.as_bytes());
    for name in &shared.fingerprint_headers {
        part(&mut hash, name.as_str().as_bytes());
        let values = parts.headers.get_all(name);
        hash.update((values.iter().count() as u64).to_be_bytes());
        for value in values {
            part(&mut hash, value.as_bytes());
        }
    }
    part(&mut hash, body);
    Fingerprint::from_bytes(digest(hash))
}

pub(crate) fn note(extensions: &http::Extensions, outcome: IdempotencyOutcome) {
    if let Some(annotation) = Annotation::of(extensions) {
        annotation.update(|r| r.idempotency = Some(IdempotencyNote::new(outcome)));
    }
}

/// The refusals of the layer. None of them echoes the key or the body.
pub(crate) fn refusal(
    head: &RequestHead<'_>,
    outcome: IdempotencyOutcome,
    max: usize,
) -> Response<Bytes> {
    note(head.extensions, outcome);
    let rejection = match outcome {
        IdempotencyOutcome::Missing => Rejection::new(StatusCode::BAD_REQUEST, "Bad Request")
            .with_detail("This request requires an Idempotency-Key header."),
        IdempotencyOutcome::Invalid => Rejection::new(StatusCode::BAD_REQUEST, "Bad Request")
            .with_detail(
                "The request carries an invalid idempotency key: send one Idempotency-Key \
                 header of 1 to 255 visible ASCII characters, bare or as a quoted string.",
            ),
        IdempotencyOutcome::TooLarge => {
            Rejection::new(StatusCode::PAYLOAD_TOO_LARGE, "Content Too Large").with_detail(format!(
                "The body of an idempotent request is larger than {max} bytes."
            ))
        }
        IdempotencyOutcome::InFlight => Rejection::new(StatusCode::CONFLICT, "Conflict")
            .with_detail(
                "A request with this Idempotency-Key is still being processed; retry later.",
            )
            .with_header(RETRY_AFTER, HeaderValue::from_static("1")),
        IdempotencyOutcome::Conflict => {
            Rejection::new(StatusCode::UNPROCESSABLE_ENTITY, "Unprocessable Content").with_detail(
                "This Idempotency-Key was already used with a different request; use a new key.",
            )
        }
        _ => Rejection::new(StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable")
            .with_detail("Idempotency keys cannot be checked right now; retry shortly.")
            .with_header(RETRY_AFTER, HeaderValue::from_static("1")),
    };
    rejection.render(head)
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Idempotency<S>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>> + Clone,
    ReqBody: Body<Data = Bytes>,
    ReqBody::Error: fmt::Display,
    ResBody: Body<Data = Bytes>,
{
    type Response = Response<ResponseBody<IdempotencyBody<ResBody>>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let shared = &*self.shared;
        // Not ours, or no key on a route that does not need one: straight through, with
        // nothing allocated.
        if !shared.methods.contains(req.method()) {
            return ResponseFuture::pass(self.inner.call(req.map(RequestBody::inner)));
        }
        let mut values = req.headers().get_all(&IDEMPOTENCY_KEY).iter();
        let Some(value) = values.next() else {
            if shared.require_key {
                let head = RequestHead::of(&req);
                return ResponseFuture::refused(refusal(&head, IdempotencyOutcome::Missing, 0));
            }
            return ResponseFuture::pass(self.inner.call(req.map(RequestBody::inner)));
        };
        let head = RequestHead::of(&req);
        // Two keys on one request: which one the client meant is anyone's guess.
        let key = if values.next().is_some() {
            None
        } else {
            parse_key(value.as_bytes())
        };
        let Some(key) = key else {
            return ResponseFuture::refused(refusal(&head, IdempotencyOutcome::Invalid, 0));
        };
        let scope = scope(&head, &key);
        let declared = crate::body::content_length(head.headers);
        if declared.is_some_and(|n| n > shared.max_request_body as u64) {
            return ResponseFuture::refused(refusal(
                &head,
                IdempotencyOutcome::TooLarge,
                shared.max_request_body,
            ));
        }
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::keyed(req, inner, self.shared.clone(), scope, declared)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(raw: &[u8]) -> Option<Vec<u8>> {
        parse_key(raw).map(Cow::into_owned)
    }

    #[test]
    fn keys_quoted_or_bare() {
        let uuid = b"8e03978e-40d5-43e8-bc93-6894a57f9324";
        // The draft's Structured Field string, and the bare token Stripe clients send.
        assert_eq!(
            key(b"\"8e03978e-40d5-43e8-bc93-6894a57f9324\"").unwrap(),
            uuid
        );
        assert_eq!(key(uuid).unwrap(), uuid);
        // Both name the same key.
        assert_eq!(key(b"\"abc\""), key(b"abc"));
        // Surrounding whitespace is not part of the value.
        assert_eq!(key(b"  abc\t").unwrap(), b"abc");
        // Escapes inside a string.
        assert_eq!(key(br#""a\"b\\c""#).unwrap(), br#"a"b\c"#);
        assert_eq!(key(b"abc;def=1").unwrap(), b"abc;def=1");
    }

    #[test]
    fn key_length_is_1_to_255() {
        let max = vec![b'k'; 255];
        assert_eq!(key(&max).unwrap().len(), 255);
        assert!(key(&[b'k'; 256]).is_none());
        let mut quoted = vec![b'"'];
        quoted.extend_from_slice(&max);
        quoted.push(b'"');
        assert_eq!(key(&quoted).unwrap().len(), 255);
        quoted.insert(1, b'k');
        assert!(key(&quoted).is_none());
        assert!(key(b"").is_none());
        assert!(key(b"   ").is_none());
        assert!(key(b"\"\"").is_none());
    }

    #[test]
    fn malformed_keys_are_refused() {
        for raw in [
            &b"a\x01b"[..],
            b"a\x7fb",
            b"a b",
            b"a\tb",
            b"\xc3\xa9t\xc3\xa9",
            b"\"",
            b"\"abc",
            b"\"abc\";param=1",
            b"\"a\"b\"",
            b"\"a\\nb\"",
            b"\"ab\\\"",
            b"\"a b\"",
        ] {
            assert!(key(raw).is_none(), "{:?}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn scopes_are_unambiguous() {
        let req = |method: &str, path: &str| {
            Request::builder()
                .method(method)
                .uri(path)
                .body(())
                .unwrap()
        };
        let a = req("POST", "/orders");
        let base = scope(&RequestHead::of(&a), b"k1");
        assert_eq!(base, scope(&RequestHead::of(&a), b"k1"));
        assert_ne!(base, scope(&RequestHead::of(&a), b"k2"));
        assert_ne!(
            base,
            scope(&RequestHead::of(&req("PATCH", "/orders")), b"k1")
        );
        assert_ne!(
            base,
            scope(&RequestHead::of(&req("POST", "/orders/")), b"k1")
        );
        // Route and key cannot trade bytes.
        let ab = scope(&RequestHead::of(&req("POST", "/ab")), b"c");
        let a_bc = scope(&RequestHead::of(&req("POST", "/a")), b"bc");
        assert_ne!(ab, a_bc);
        // Per principal; an absent principal differs from one named "anonymous".
        let mut alice = req("POST", "/orders");
        alice.extensions_mut().insert(Principal::new(
            "alice",
            crate::principal::AuthScheme::Bearer,
        ));
        let mut anonymous = req("POST", "/orders");
        anonymous.extensions_mut().insert(Principal::new(
            "anonymous",
            crate::principal::AuthScheme::Bearer,
        ));
        let mut other_issuer = req("POST", "/orders");
        other_issuer.extensions_mut().insert(
            Principal::new("alice", crate::principal::AuthScheme::Bearer)
                .with_issuer("https://other.example"),
        );
        let scopes = [
            base,
            scope(&RequestHead::of(&alice), b"k1"),
            scope(&RequestHead::of(&anonymous), b"k1"),
            scope(&RequestHead::of(&other_issuer), b"k1"),
        ];
        for i in 0..scopes.len() {
            for j in i + 1..scopes.len() {
                assert_ne!(scopes[i], scopes[j], "{i} {j}");
            }
        }
    }
}
