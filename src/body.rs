//! The response body every short-circuiting layer returns.
//!
//! A layer that answers by itself (a refusal, a cached response) cannot produce the inner
//! service's body type, so it returns [`ResponseBody<B>`]: either the inner body, passed
//! through untouched, or a body of its own held in memory. Because the enum keeps
//! `Data = Bytes` and the inner body's error type, it works as the response body of an axum
//! `Router::layer`, a plain hyper 1 service and a tonic `Server::layer` with no mapping.
//! Trailers of the inner body pass through, and a buffered body may carry trailers of its
//! own (a replayed gRPC response needs them).
//!
//! ```
//! use battlement::body::ResponseBody;
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let own: ResponseBody<Full<Bytes>> = ResponseBody::full(Bytes::from_static(b"refused"));
//! assert_eq!(own.collect().await.unwrap().to_bytes(), "refused");
//!
//! let passed = ResponseBody::inner(Full::new(Bytes::from_static(b"from the handler")));
//! assert_eq!(passed.collect().await.unwrap().to_bytes(), "from the handler");
//! # }
//! ```

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// The inner service's body, or a body a layer produced itself.
    ///
    /// Build one with [`ResponseBody::inner`], [`ResponseBody::full`],
    /// [`ResponseBody::empty`] or [`ResponseBody::with_trailers`].
    #[derive(Debug)]
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    #[derive(Debug)]
    enum Kind<B> {
        Inner { #[pin] body: B },
        // Boxed so that the enum is no larger than the inner body plus a tag: every
        // response that passes through pays for the size of this enum.
        Buffered { rest: Option<Box<Buffered>> },
    }
}

#[derive(Debug)]
struct Buffered {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl<B> ResponseBody<B> {
    /// Passes the inner service's body through.
    pub fn inner(body: B) -> Self {
        Self {
            kind: Kind::Inner { body },
        }
    }

    /// A body of `data`, held in memory.
    pub fn full(data: impl Into<Bytes>) -> Self {
        Self::buffered(data.into(), None)
    }

    /// An empty body.
    pub fn empty() -> Self {
        Self {
            kind: Kind::Buffered { rest: None },
        }
    }

    /// A body of `data` followed by `trailers` (for example a replayed gRPC response).
    pub fn with_trailers(data: impl Into<Bytes>, trailers: HeaderMap) -> Self {
        Self::buffered(data.into(), Some(trailers))
    }

    fn buffered(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        let rest = (!data.is_empty() || trailers.is_some()).then(|| {
            Box::new(Buffered {
                data: (!data.is_empty()).then_some(data),
                trailers,
            })
        });
        Self {
            kind: Kind::Buffered { rest },
        }
    }

    /// Whether this body is the inner service's (rather than one a layer produced).
    pub fn is_inner(&self) -> bool {
        matches!(self.kind, Kind::Inner { .. })
    }
}

impl<B> Default for ResponseBody<B> {
    fn default() -> Self {
        Self::empty()
    }
}

impl<B> Body for ResponseBody<B>
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
            KindProj::Inner { body } => body.poll_frame(cx),
            KindProj::Buffered { rest } => {
                let Some(buffered) = rest else {
                    return Poll::Ready(None);
                };
                if let Some(data) = buffered.data.take() {
                    if buffered.trailers.is_none() {
                        *rest = None;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                let trailers = buffered.trailers.take();
                *rest = None;
                Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } => body.is_end_stream(),
            Kind::Buffered { rest } => rest.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Buffered { rest } => SizeHint::with_exact(
                rest.as_ref()
                    .and_then(|r| r.data.as_ref())
                    .map_or(0, |d| d.len() as u64),
            ),
        }
    }
}

/// Headers that describe one connection (RFC 9110 §7.6.1): a layer that stores a response
/// to answer later requests with it never keeps them.
#[cfg(any(feature = "cache", feature = "idempotency"))]
pub(crate) const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    #[tokio::test]
    async fn buffered_body_keeps_trailers() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let body: ResponseBody<Full<Bytes>> = ResponseBody::with_trailers("abc", trailers);
        assert_eq!(body.size_hint().exact(), Some(3));
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(collected.to_bytes(), "abc");
    }

    #[test]
    fn empty_body_is_end_of_stream() {
        let body: ResponseBody<Full<Bytes>> = ResponseBody::empty();
        assert!(body.is_end_stream());
        assert!(!body.is_inner());
        assert!(ResponseBody::inner(Full::new(Bytes::new())).is_inner());
    }
}
