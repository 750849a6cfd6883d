//! The [`ResponseFuture`] of the [`super::Cache`] service.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use super::store::BoxFuture;

/// The response future of [`super::Cache`]: a fresh hit is answered at once, without an
/// allocation; anything else (a miss, a lookup in a remote store) runs boxed.
pub struct ResponseFuture<R, E> {
    kind: Kind<R, E>,
}

enum Kind<R, E> {
    Ready(Option<R>),
    Pending(BoxFuture<'static, Result<R, E>>),
}

impl<R, E> ResponseFuture<R, E> {
    pub(crate) fn ready(response: R) -> Self {
        Self {
            kind: Kind::Ready(Some(response)),
        }
    }

    pub(crate) fn pending(future: BoxFuture<'static, Result<R, E>>) -> Self {
        Self {
            kind: Kind::Pending(future),
        }
    }
}

// Neither variant is structurally pinned: the boxed future is pinned on the heap.
impl<R, E> Unpin for ResponseFuture<R, E> {}

impl<R, E> Future for ResponseFuture<R, E> {
    type Output = Result<R, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().kind {
            Kind::Ready(response) => Poll::Ready(Ok(response
                .take()
                .expect("ResponseFuture polled after completion"))),
            Kind::Pending(future) => future.as_mut().poll(cx),
        }
    }
}

impl<R, E> fmt::Debug for ResponseFuture<R, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}
