//! The origin's body on its way to the client, captured on the side up to a cap.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::key::Key;
use super::policy::Freshness;
use super::service::{FillGuard, Shared};
use super::store::{Entry, Stored};

/// What is needed to store the response once its body has ended.
pub(crate) struct Capture {
    pub(crate) shared: Arc<Shared>,
    pub(crate) key: Key,
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) freshness: Freshness,
    pub(crate) tags: Vec<(String, u64)>,
    pub(crate) buf: BytesMut,
    pub(crate) fill: Option<FillGuard>,
    /// The response's `Content-Length`: once that many bytes are copied the body is whole,
    /// whether or not it says so (a stream whose producer lingers).
    pub(crate) declared: Option<u64>,
}

pin_project! {
    /// The response body of a cache miss: the origin's body, streamed to the client as it
    /// comes, and copied (up to the layer's cap) to be stored when it ends. Past the cap the
    /// copy is abandoned and the client still gets every byte.
    pub struct CaptureBody<B> {
        #[pin]
        inner: B,
        capture: Option<Box<Capture>>,
    }
}

impl<B> CaptureBody<B> {
    pub(crate) fn new(inner: B, capture: Option<Box<Capture>>) -> Self {
        Self { inner, capture }
    }
}

impl<B> fmt::Debug for CaptureBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaptureBody").finish_non_exhaustive()
    }
}

fn store(capture: Box<Capture>, trailers: Option<HeaderMap>) {
    let Capture {
        shared,
        key,
        status,
        mut headers,
        freshness,
        tags,
        buf,
        fill,
        ..
    } = *capture;
    // The buffer grew by doubling: kept as it is, an entry could hold up to twice the bytes
    // the store weighs it at. A buffer with much room to spare is copied to its length.
    let body = if buf.capacity() > buf.len() + buf.len() / 8 {
        Bytes::copy_from_slice(&buf)
    } else {
        buf.freeze()
    };
    // The length of what is stored, which a hit then carries as it is (also for `HEAD`),
    // instead of the server adding a header to, and so growing, the copied map on every
    // hit. Not with trailers (gRPC), which frame their own length.
    if trailers.is_none() {
        headers.insert(
            http::header::CONTENT_LENGTH,
            http::HeaderValue::from(body.len()),
        );
    }
    // A strong validator for conditional requests, when the origin gave none.
    if shared.etag && !headers.contains_key(http::header::ETAG) {
        headers.insert(http::header::ETAG, super::policy::strong_etag(&body));
    }
    // Room to spare, which a copy keeps: a full map grows (and rehashes) on any insert,
    // even one that replaces a value, and every hit replaces two.
    headers.reserve(4);
    let entry = Entry {
        status,
        headers,
        body,
        trailers,
        stored_at: (shared.clock)(),
        freshness,
        tags,
        last_hit: Default::default(),
    };
    let ttl = freshness.retain();
    let store = shared.store.clone();
    // The memory store answers at once; a remote one must not hold up the response.
    let put = async move {
        let entry = Arc::new(entry);
        // Only what the store really holds is handed to the waiters: while the store is
        // down, they go to the origin as every other request does.
        if store
            .put(key, Stored::Response(entry.clone()), ttl)
            .await
            .is_ok()
            && let Some(fill) = &fill
        {
            fill.deliver(&entry);
        }
        drop(fill);
    };
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn(put);
        }
        Err(_) => drop(put),
    }
}

fn abandon(capture: Box<Capture>) {
    let Capture {
        shared, key, fill, ..
    } = *capture;
    let store = shared.store.clone();
    let ttl = shared.pass_for;
    let mark = async move {
        let _ = store.put(key, Stored::Pass, ttl).await;
        drop(fill);
    };
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(mark);
    }
}

impl<B> Body for CaptureBody<B>
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
        match &polled {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let over = this
                        .capture
                        .as_ref()
                        .is_some_and(|c| c.buf.len() + data.len() > c.shared.max_body);
                    if over && let Some(c) = this.capture.take() {
                        // Too big to keep: stop copying, leave a pass marker so that later
                        // requests go straight to the origin instead of queueing, and
                        // release the waiters.
                        abandon(c);
                    } else if let Some(c) = this.capture.as_mut() {
                        c.buf.extend_from_slice(data);
                    }
                    // A body that says it has ended may never be polled again; nor may one
                    // that has sent every byte it declared.
                    let whole = this
                        .capture
                        .as_ref()
                        .is_some_and(|c| c.declared == Some(c.buf.len() as u64));
                    if (whole || this.inner.is_end_stream())
                        && let Some(c) = this.capture.take()
                    {
                        store(c, None);
                    }
                } else if let Some(trailers) = frame.trailers_ref()
                    && let Some(c) = this.capture.take()
                {
                    store(c, Some(trailers.clone()));
                }
            }
            // An error: nothing complete to keep.
            Some(Err(_)) => {
                this.capture.take();
            }
            None => {
                if let Some(c) = this.capture.take() {
                    store(c, None);
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

pin_project! {
    /// The response body of the cache layer: a body being captured, or the body of a fill
    /// that runs in its own task (so that the client that started it can go away without
    /// stopping it for everyone waiting), relayed through a channel.
    pub struct CacheBody<B>
    where
        B: Body,
    {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B>
    where
        B: Body,
    {
        Capture { #[pin] body: CaptureBody<B> },
        Relay { rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, B::Error>>, done: bool },
    }
}

impl<B: Body> CacheBody<B> {
    pub(crate) fn capture(body: CaptureBody<B>) -> Self {
        Self {
            kind: Kind::Capture { body },
        }
    }

    pub(crate) fn relay(rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, B::Error>>) -> Self {
        Self {
            kind: Kind::Relay { rx, done: false },
        }
    }
}

impl<B: Body> fmt::Debug for CacheBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheBody").finish_non_exhaustive()
    }
}

impl<B> Body for CacheBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Capture { body } => body.poll_frame(cx),
            KindProj::Relay { rx, done } => {
                if *done {
                    return Poll::Ready(None);
                }
                let next = ready!(rx.poll_recv(cx));
                if next.is_none() {
                    *done = true;
                }
                Poll::Ready(next)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Capture { body } => body.is_end_stream(),
            Kind::Relay { done, .. } => *done,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Capture { body } => body.size_hint(),
            Kind::Relay { .. } => SizeHint::default(),
        }
    }
}
