//! The first response for a key on its way to the client, captured on the side, and the
//! lease that completes or releases the key whatever happens to it.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::CONTENT_TYPE;
use http::{HeaderMap, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::layer::Shared;
use super::record::StoredResponse;
use super::store::{BoxFuture, OwnerToken, Scope, StoreError};
use crate::annotate::{Annotation, IdempotencyNote, IdempotencyOutcome};
use crate::body::ResponseBody;

/// gRPC headers a replay needs whatever the stored-header list says: a trailers-only
/// answer carries its status in them, and compressed messages need their encoding.
const GRPC_HEADERS: [&str; 4] = [
    "grpc-status",
    "grpc-message",
    "grpc-status-details-bin",
    "grpc-encoding",
];

/// Whether a gRPC status (from a trailers-only answer's headers, or the trailers) says the
/// call must run again rather than be replayed, by the HTTP class it matches: `CANCELLED`,
/// `RESOURCE_EXHAUSTED` and `ABORTED` like `429` (never stored); `UNKNOWN`,
/// `DEADLINE_EXCEEDED`, `INTERNAL`, `UNAVAILABLE` and `DATA_LOSS` like a `5xx` (stored
/// only with `store_server_errors`). Other codes are answers, kept like a `4xx`.
fn grpc_transient(status: Option<&http::HeaderValue>, store_server_errors: bool) -> bool {
    match status
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u32>().ok())
    {
        Some(1 | 8 | 10) => true,
        Some(2 | 4 | 13 | 14 | 15) => !store_server_errors,
        _ => false,
    }
}

/// Runs a store call to its end without holding up the response: a store that answers at
/// once (memory) is done before this returns; a remote one finishes in a task of its own,
/// so a client that goes away cannot cut it short.
pub(crate) fn detach(mut call: BoxFuture<'static, ()>) {
    if call
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
        .is_ready()
    {
        return;
    }
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(call);
    }
}

/// The claim a running request holds. Dropped without [`Lease::complete`] (the response
/// was not stored, the client went away, the inner service failed), it releases the key,
/// so that a retry runs the request again at once instead of waiting out the lease.
pub(crate) struct Lease {
    shared: Arc<Shared>,
    scope: Scope,
    owner: OwnerToken,
    annotation: Option<Annotation>,
    done: bool,
    /// Renews the claim every third of `in_flight_ttl` while the request runs and its
    /// response streams, so that a slow request keeps its key (a retry gets `409`, never a
    /// second run), for at most `max_hold`; stopped when the lease ends.
    keeper: Option<tokio::task::AbortHandle>,
}

impl Lease {
    /// The claim `owner` just acquired on `scope`, renewed until the lease ends.
    pub(crate) fn new(
        shared: Arc<Shared>,
        scope: Scope,
        owner: OwnerToken,
        annotation: Option<Annotation>,
    ) -> Self {
        let keeper = tokio::runtime::Handle::try_current().ok().map(|runtime| {
            let shared = shared.clone();
            runtime
                .spawn(async move {
                    let lease = shared.in_flight_ttl;
                    let started = tokio::time::Instant::now();
                    loop {
                        tokio::time::sleep(lease / 3).await;
                        if started.elapsed() >= shared.max_hold {
                            tracing::warn!(
                                max_hold_ms = shared.max_hold.as_millis() as u64,
                                "battlement::idempotency: a request still running at max_hold \
                                 stops renewing its claim; a retry can run once it lapses"
                            );
                            return;
                        }
                        match shared.store.extend(&scope, &owner, lease).await {
                            Ok(true) => {}
                            Ok(false) => {
                                tracing::warn!(
                                    "battlement::idempotency: a running request lost its claim (it was released, or \
                                     expired while the store was unreachable); its response \
                                     will not be stored"
                                );
                                return;
                            }
                            // Tried again at the next renewal; the lease runs out meanwhile
                            // only if the store stays unreachable.
                            Err(error) => tracing::debug!(
                                %error,
                                "battlement::idempotency: a claim could not be renewed"
                            ),
                        }
                    }
                })
                .abort_handle()
        });
        Self {
            shared,
            scope,
            owner,
            annotation,
            done: false,
            keeper,
        }
    }

    pub(crate) fn note(&self, outcome: IdempotencyOutcome) {
        note(self.annotation.as_ref(), outcome);
    }

    /// Stores `response` as the key's outcome, if the claim is still ours (the store
    /// fences the write).
    fn complete(mut self, response: StoredResponse) {
        self.done = true;
        if let Some(keeper) = self.keeper.take() {
            keeper.abort();
        }
        let shared = self.shared.clone();
        let (scope, owner) = (self.scope, self.owner);
        let annotation = self.annotation.take();
        detach(Box::pin(async move {
            let store = &shared.store;
            // The request has run: storing its answer is worth a few tries (a Redis blip)
            // within half the lease, which nothing renews any more; a retry meanwhile gets
            // `409`. Only then is the key given up, and a retry runs the request again.
            let deadline = tokio::time::Instant::now() + shared.in_flight_ttl / 2;
            let mut pause = Duration::from_millis(50);
            loop {
                match store
                    .complete(&scope, &owner, &response, shared.retention)
                    .await
                {
                    Ok(true) => return,
                    Ok(false) => {
                        tracing::warn!(
                            "battlement::idempotency: a response was not stored: its claim \
                             expired (in_flight_ttl) and the key was claimed again, or it was \
                             released"
                        );
                        note(annotation.as_ref(), IdempotencyOutcome::NotStored);
                        return;
                    }
                    // A response that cannot be encoded (too many trailer fields, say) will
                    // not be stored by trying again.
                    Err(error)
                        if matches!(error, StoreError::Corrupt(_))
                            || tokio::time::Instant::now() + pause >= deadline =>
                    {
                        tracing::warn!(%error, "battlement::idempotency: a response could not be stored");
                        note(annotation.as_ref(), IdempotencyOutcome::NotStored);
                        give_back(shared.clone(), scope, owner).await;
                        return;
                    }
                    Err(_) => {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(2));
                    }
                }
            }
        }));
    }
}

/// Releases the claim `owner` holds (or may hold: a claim whose answer was lost may still
/// have landed) on `scope`. A store that fails is tried again, at growing intervals, until
/// the claim would have lapsed anyway: the release checks the owner, so a late or repeated
/// one harms nothing, and a retry of the request need not wait out the lease.
pub(crate) async fn give_back(shared: Arc<Shared>, scope: Scope, owner: OwnerToken) {
    let deadline = tokio::time::Instant::now() + shared.in_flight_ttl;
    let mut pause = Duration::from_millis(50);
    loop {
        match shared.store.release(&scope, &owner).await {
            Ok(_) => return,
            Err(error) if tokio::time::Instant::now() + pause >= deadline => {
                tracing::debug!(%error, "battlement::idempotency: a key could not be released; it frees itself when its lease ends");
                return;
            }
            Err(_) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
        }
    }
}

fn note(annotation: Option<&Annotation>, outcome: IdempotencyOutcome) {
    if let Some(annotation) = annotation {
        annotation.update(|r| r.idempotency = Some(IdempotencyNote::new(outcome)));
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(keeper) = self.keeper.take() {
            keeper.abort();
        }
        if self.done {
            return;
        }
        detach(Box::pin(give_back(
            self.shared.clone(),
            self.scope,
            self.owner,
        )));
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// What is needed to store the response once its body has ended. Dropped before that (an
/// error, the cap, the client gone), it notes that nothing was stored, and its lease
/// releases the key.
pub(crate) struct Capture {
    lease: Option<Box<Lease>>,
    status: StatusCode,
    headers: HeaderMap,
    buf: BytesMut,
    max: usize,
    /// The response's `Content-Length`: a body dropped once that many bytes were copied
    /// has been sent whole (an HTTP/1 server stops there, whether or not the body said it
    /// had ended), and is stored.
    declared: Option<u64>,
}

impl Capture {
    /// Stores what was captured, once (a second call finds no lease).
    fn finish(&mut self, trailers: Option<HeaderMap>) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        if let Some(trailers) = &trailers
            && grpc_transient(
                trailers.get("grpc-status"),
                lease.shared.store_server_errors,
            )
        {
            // A gRPC error that a retry must run again: the lease releases the key.
            lease.note(IdempotencyOutcome::NotStored);
            return;
        }
        let body = std::mem::take(&mut self.buf).freeze();
        let headers = std::mem::take(&mut self.headers);
        let response = StoredResponse::new(self.status, headers, body).with_trailers(trailers);
        lease.complete(response);
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if self.declared == Some(self.buf.len() as u64) {
            self.finish(None);
        } else if let Some(lease) = self.lease.take() {
            lease.note(IdempotencyOutcome::NotStored);
        }
    }
}

pin_project! {
    /// The response body of the idempotency layer: the inner service's body, streamed to
    /// the client as it comes. For the first request with a key it is also copied (up to
    /// the layer's cap) and stored when it ends; past the cap, on an error, or when the
    /// client drops it early, the copy is abandoned and the key released.
    pub struct IdempotencyBody<B> {
        #[pin]
        inner: B,
        capture: Option<Box<Capture>>,
    }
}

impl<B> IdempotencyBody<B> {
    pub(crate) fn pass(inner: B) -> Self {
        Self {
            inner,
            capture: None,
        }
    }
}

impl<B> fmt::Debug for IdempotencyBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyBody")
            .field("capturing", &self.capture.is_some())
            .finish_non_exhaustive()
    }
}

impl<B> Body for IdempotencyBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        let polled = ready!(this.inner.as_mut().poll_frame(cx));
        if this.capture.is_none() {
            return Poll::Ready(polled);
        }
        match &polled {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let over = this
                        .capture
                        .as_ref()
                        .is_some_and(|c| c.buf.len() + data.len() > c.max);
                    if over {
                        // Too big to keep: stop copying; the client still gets every byte.
                        this.capture.take();
                    } else if let Some(c) = this.capture.as_mut() {
                        c.buf.extend_from_slice(data);
                    }
                    // A body that says it has ended may never be polled again.
                    if this.inner.is_end_stream()
                        && let Some(mut c) = this.capture.take()
                    {
                        c.finish(None);
                    }
                } else if let Some(trailers) = frame.trailers_ref()
                    && let Some(mut c) = this.capture.take()
                {
                    c.finish(Some(trailers.clone()));
                }
            }
            // An error: nothing complete to keep.
            Some(Err(_)) => {
                if let Some(mut c) = this.capture.take() {
                    c.declared = None;
                }
            }
            None => {
                if let Some(mut c) = this.capture.take() {
                    c.finish(None);
                }
            }
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The response a request that holds a claim got from the inner service: passed on, and
/// either captured to be stored or, when it must not be stored, with its key released.
pub(crate) fn first_response<B>(
    response: Response<B>,
    lease: Box<Lease>,
) -> Response<ResponseBody<IdempotencyBody<B>>>
where
    B: Body<Data = Bytes>,
{
    let shared = &*lease.shared;
    let status = response.status();
    let headers = response.headers();
    let max = shared.max_response_body;
    // An event stream may never end: passed through, never captured.
    let streaming = headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let declared = crate::body::content_length(headers);
    let too_big = declared.is_some_and(|n| n > max as u64)
        || response.body().size_hint().lower() > max as u64;
    // A server error, or "too many requests", says nothing about what the request does:
    // a retry must run it again.
    let transient = (status.is_server_error() && !shared.store_server_errors)
        || status == StatusCode::TOO_MANY_REQUESTS
        || grpc_transient(headers.get("grpc-status"), shared.store_server_errors);
    if transient || streaming || too_big || status.is_informational() {
        lease.note(IdempotencyOutcome::NotStored);
        drop(lease);
        return response.map(|body| ResponseBody::inner(IdempotencyBody::pass(body)));
    }
    let mut stored = HeaderMap::with_capacity(shared.stored_headers.len());
    for name in &shared.stored_headers {
        for value in headers.get_all(name) {
            stored.append(name.clone(), value.clone());
        }
    }
    for name in GRPC_HEADERS {
        if !stored.contains_key(name) {
            for value in headers.get_all(name) {
                stored.append(http::HeaderName::from_static(name), value.clone());
            }
        }
    }
    lease.note(IdempotencyOutcome::Stored);
    let (parts, body) = response.into_parts();
    let mut capture = Box::new(Capture {
        lease: Some(lease),
        status,
        headers: stored,
        buf: BytesMut::new(),
        max,
        declared,
    });
    if body.is_end_stream() {
        // An empty body may never be polled: store it now.
        capture.finish(None);
        return Response::from_parts(parts, ResponseBody::inner(IdempotencyBody::pass(body)));
    }
    Response::from_parts(
        parts,
        ResponseBody::inner(IdempotencyBody {
            inner: body,
            capture: Some(capture),
        }),
    )
}
