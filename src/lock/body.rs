//! [`LockBody`]: a response body that holds the request's lock until it ends.

use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::LockGuard;
use crate::annotate::{Annotation, LockOutcome};

pin_project! {
    /// The response body of the [`Lock`](super::Lock) service: the inner body, holding the
    /// lock until its last frame (or an error) has been read, or until it is dropped (the
    /// client went away).
    pub struct LockBody<B> {
        #[pin]
        inner: B,
        held: Option<Held>,
    }
}

pub(crate) struct Held {
    pub(crate) guard: LockGuard,
    pub(crate) annotation: Option<Annotation>,
}

impl Drop for Held {
    fn drop(&mut self) {
        // A lease lost while the request ran is worth a line in the request's log.
        if self.guard.is_lost()
            && let Some(annotation) = &self.annotation
        {
            annotation.update(|record| {
                if let Some(note) = &mut record.lock {
                    note.outcome = LockOutcome::Lost;
                }
            });
        }
    }
}

impl<B> LockBody<B> {
    pub(crate) fn new(inner: B, held: Option<Held>) -> Self {
        Self { inner, held }
    }
}

impl<B: Body> Body for LockBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = std::task::ready!(this.inner.poll_frame(cx));
        if !matches!(frame, Some(Ok(_))) {
            // The end of the body, or an error: release now, not when hyper drops it.
            this.held.take();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
