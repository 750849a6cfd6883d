//! The [`TraceBody`]: counts the response and ends the request's event when it ends.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::event::{Outcome, Pending};
use crate::body::ResponseBody;

pin_project! {
    /// The response body of [`super::Trace`]: the inner body, counted frame by frame. The
    /// request's event is emitted when it ends, errors, or is dropped before its end (the
    /// client went away).
    pub struct TraceBody<B> {
        #[pin]
        inner: ResponseBody<B>,
        pending: Option<Box<Pending>>,
        // The body's length when known up front (`Content-Length`, or an exact size hint).
        declared: Option<u64>,
    }

    impl<B> PinnedDrop for TraceBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(mut pending) = this.pending.take() {
                let outcome = if std::thread::panicking() {
                    pending.on_error("panic", &"panicked while streaming the response body");
                    Outcome::Errored
                } else if !pending.body_expected() {
                    // HEAD, 204 and 304 bodies are never polled: that is their end.
                    Outcome::Completed
                } else if *this.declared == Some(pending.bytes()) {
                    // Every declared byte was sent: an HTTP/1 server stops there and drops
                    // a body that never said it had ended.
                    Outcome::Completed
                } else {
                    Outcome::ClientAborted
                };
                pending.finish(outcome);
            }
        }
    }
}

impl<B: Body<Data = Bytes>> TraceBody<B> {
    pub(crate) fn new(
        inner: ResponseBody<B>,
        pending: Box<Pending>,
        content_length: Option<u64>,
    ) -> Self {
        // An empty body may never be polled: it has ended already.
        let pending = if inner.is_end_stream() {
            pending.finish(Outcome::Completed);
            None
        } else {
            Some(pending)
        };
        let declared = content_length.or_else(|| inner.size_hint().exact());
        Self {
            inner,
            pending,
            declared,
        }
    }
}

impl<B> fmt::Debug for TraceBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceBody").finish_non_exhaustive()
    }
}

impl<B> Body for TraceBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: fmt::Display,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        let polled = {
            let _entered = this.pending.as_ref().map(|p| p.span.enter());
            ready!(this.inner.as_mut().poll_frame(cx))
        };
        let Some(pending) = this.pending.as_mut() else {
            return Poll::Ready(polled);
        };
        let ended = match &polled {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    pending.on_data(data.len());
                    this.inner.is_end_stream().then_some(Outcome::Completed)
                } else if let Some(trailers) = frame.trailers_ref() {
                    pending.on_trailers(trailers);
                    // Trailers are the last frame of a body, whether or not it says so:
                    // HTTP/2 servers stop polling once they have sent them.
                    Some(Outcome::Completed)
                } else {
                    this.inner.is_end_stream().then_some(Outcome::Completed)
                }
            }
            Some(Err(error)) => {
                pending.on_error("body_error", error);
                Some(Outcome::Errored)
            }
            None => Some(Outcome::Completed),
        };
        if let Some(outcome) = ended
            && let Some(pending) = this.pending.take()
        {
            pending.finish(outcome);
        }
        Poll::Ready(polled)
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
