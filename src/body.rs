//! The response body every short-circuiting layer returns, and the request body of the
//! layers that read it first.
//!
//! A layer that answers by itself (a refusal, a cached response) cannot produce the inner
//! service's body type, so it returns [`ResponseBody<B>`]: either the inner body, passed
//! through untouched, or a body of its own held in memory. Because the enum keeps
//! `Data = Bytes` and the inner body's error type, it works as the response body of an axum
//! `Router::layer`, a plain hyper 1 service and a tonic `Server::layer` with no mapping.
//! Trailers of the inner body pass through, and a buffered body may carry trailers of its
//! own (a replayed gRPC response needs them). [`RequestBody`] is the same type, handed on
//! by `validate` and `idempotency`, which may have read the request body before the inner
//! service runs.
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
use std::time::Duration;

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
        // Bytes alone (refusals, cache hits, replays without trailers): not boxed, as
        // every such response would pay an allocation for it.
        Full { data: Option<Bytes> },
        // With trailers: boxed, so that the enum stays the size of the larger of the inner
        // body and `Bytes`.
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
            kind: Kind::Full { data: None },
        }
    }

    /// A body of `data` followed by `trailers` (for example a replayed gRPC response).
    pub fn with_trailers(data: impl Into<Bytes>, trailers: HeaderMap) -> Self {
        Self::buffered(data.into(), Some(trailers))
    }

    fn buffered(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        if trailers.is_none() {
            return Self {
                kind: Kind::Full {
                    data: (!data.is_empty()).then_some(data),
                },
            };
        }
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
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
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
            Kind::Full { data } => data.is_none(),
            Kind::Buffered { rest } => rest.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } => body.size_hint(),
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            Kind::Buffered { rest } => SizeHint::with_exact(
                rest.as_ref()
                    .and_then(|r| r.data.as_ref())
                    .map_or(0, |d| d.len() as u64),
            ),
        }
    }
}

/// How a layer that may answer by itself types the bodies of its responses.
///
/// [`Wrapped`] (the default) answers with [`ResponseBody<B>`], which fits any inner body
/// `B`: axum's, hyper's and tonic's alike. [`Native`] answers with `B` itself, for bodies
/// that can be made from [`Bytes`] (axum's `Body`, `http_body_util::Full<Bytes>`): passing
/// responses then go through untouched, with no wrapper to move, and axum's `Router::layer`
/// has nothing to box again. The rate limiter offers the choice
/// (`RateLimitBuilder::native_body`).
///
/// ```
/// use battlement::body::{BodyMode, Native, ResponseBody, Wrapped};
/// use bytes::Bytes;
/// use http::Response;
/// use http_body_util::Full;
///
/// let made = Response::new(Bytes::from_static(b"refused"));
/// let native: Response<Full<Bytes>> = <Native as BodyMode<Full<Bytes>>>::own(made.clone());
/// let wrapped: Response<ResponseBody<Full<Bytes>>> =
///     <Wrapped as BodyMode<Full<Bytes>>>::own(made);
/// assert!(!wrapped.body().is_inner());
/// # let _ = native;
/// ```
pub trait BodyMode<B> {
    /// The body type of the layer's responses.
    type Body;
    /// A response of the inner service, passed on.
    fn pass(response: http::Response<B>) -> http::Response<Self::Body>;
    /// A response the layer made itself, its body in memory.
    fn own(response: http::Response<Bytes>) -> http::Response<Self::Body>;
}

/// The default [`BodyMode`]: responses carry [`ResponseBody<B>`], whatever `B` is.
#[derive(Clone, Copy, Debug, Default)]
pub struct Wrapped;

/// The [`BodyMode`] that keeps the inner service's body type `B` (which must be
/// `From<Bytes>`): nothing wraps a passing response.
#[derive(Clone, Copy, Debug, Default)]
pub struct Native;

impl<B> BodyMode<B> for Wrapped {
    type Body = ResponseBody<B>;

    #[inline]
    fn pass(response: http::Response<B>) -> http::Response<ResponseBody<B>> {
        response.map(ResponseBody::inner)
    }

    #[inline]
    fn own(response: http::Response<Bytes>) -> http::Response<ResponseBody<B>> {
        response.map(ResponseBody::full)
    }
}

impl<B: From<Bytes>> BodyMode<B> for Native {
    type Body = B;

    #[inline(always)]
    fn pass(response: http::Response<B>) -> http::Response<B> {
        response
    }

    #[inline]
    fn own(response: http::Response<Bytes>) -> http::Response<B> {
        response.map(B::from)
    }
}

/// The request body handed on by a layer that may read the body first (`validate`,
/// `idempotency`): the client's body untouched when the layer did not read it, or the bytes
/// (and trailers) it read. The same type as [`ResponseBody`], so the inner service takes
/// `Request<RequestBody<B>>` for whatever `B` the server gives (axum's `Body`, hyper's
/// `Incoming`, tonic's `Body`): axum routes and tonic servers accept any such body, and a
/// hyper `service_fn` names it in its argument.
///
/// ```
/// use battlement::body::RequestBody;
/// use bytes::Bytes;
/// use http_body_util::{BodyExt, Full};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let read: RequestBody<Full<Bytes>> = RequestBody::full(Bytes::from_static(b"{}"));
/// assert_eq!(read.collect().await.unwrap().to_bytes(), "{}");
/// # }
/// ```
pub type RequestBody<B> = ResponseBody<B>;

/// Reads a request body into memory up to a cap: the one reader of the layers that read
/// request bodies. A body that arrives in one frame (the usual case) is kept as it is, not
/// copied.
#[cfg(any(feature = "validate", feature = "idempotency"))]
#[derive(Debug)]
pub(crate) struct Collector {
    first: Option<Bytes>,
    buf: bytes::BytesMut,
    capacity: usize,
    max: usize,
    trailers: Option<HeaderMap>,
    /// How long the body may send nothing; the timer exists only once the body has kept
    /// the reader waiting (a body already buffered costs none).
    idle: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// A message's `Content-Length`, when it has a valid one.
#[cfg_attr(
    not(any(
        feature = "trace",
        feature = "cache",
        feature = "validate",
        feature = "idempotency"
    )),
    allow(dead_code)
)]
pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// How long the layers that read a request body wait for its next bytes by default.
pub const DEFAULT_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a [`Collector`] stopped.
#[cfg(any(feature = "validate", feature = "idempotency"))]
#[derive(Debug)]
pub(crate) enum CollectError {
    /// The body is larger than the cap.
    TooLarge,
    /// The body failed; the error's text.
    Failed(String),
    /// The body sent nothing for the idle timeout.
    Stalled(Duration),
}

/// A body read to its end.
#[cfg(any(feature = "validate", feature = "idempotency"))]
#[derive(Debug, Default)]
pub(crate) struct Collected {
    pub(crate) data: Bytes,
    pub(crate) trailers: Option<HeaderMap>,
}

#[cfg(any(feature = "validate", feature = "idempotency"))]
impl Collected {
    /// The body again, for the inner service.
    pub(crate) fn into_body<B>(self) -> RequestBody<B> {
        ResponseBody::buffered(self.data, self.trailers)
    }
}

#[cfg(any(feature = "validate", feature = "idempotency"))]
impl Collector {
    /// A reader that refuses more than `max` bytes, sized for `declared` (`Content-Length`).
    pub(crate) fn new(max: usize, declared: Option<u64>, idle: Duration) -> Self {
        Self {
            first: None,
            buf: bytes::BytesMut::new(),
            capacity: declared.map_or(8 * 1024, |n| n as usize).min(max),
            max,
            trailers: None,
            idle,
            stalled: None,
        }
    }

    /// Reads `body` until it ends, it fails, or it passes the cap.
    pub(crate) fn poll_collect<B>(
        &mut self,
        mut body: Pin<&mut B>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Collected, CollectError>>
    where
        B: Body<Data = Bytes>,
        B::Error: std::fmt::Display,
    {
        loop {
            let polled = match body.as_mut().poll_frame(cx) {
                Poll::Ready(polled) => polled,
                Poll::Pending => {
                    // A client that stops sending (or declared more than it sends) must
                    // not hold the request, and what it holds, forever.
                    let idle = self.idle;
                    let stalled = self
                        .stalled
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                    if stalled.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(CollectError::Stalled(idle)));
                    }
                    return Poll::Pending;
                }
            };
            if let Some(stalled) = self.stalled.as_mut() {
                stalled
                    .as_mut()
                    .reset(tokio::time::Instant::now() + self.idle);
            }
            let frame = match polled {
                Some(Ok(frame)) => frame,
                Some(Err(error)) => {
                    return Poll::Ready(Err(CollectError::Failed(error.to_string())));
                }
                None => {
                    let data = match self.first.take() {
                        Some(first) => first,
                        None => std::mem::take(&mut self.buf).freeze(),
                    };
                    let trailers = self.trailers.take();
                    return Poll::Ready(Ok(Collected { data, trailers }));
                }
            };
            let data = match frame.into_data() {
                Ok(data) => data,
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        self.trailers
                            .get_or_insert_with(HeaderMap::new)
                            .extend(trailers);
                    }
                    continue;
                }
            };
            let so_far = self.first.as_ref().map_or(0, Bytes::len) + self.buf.len();
            if so_far + data.len() > self.max {
                return Poll::Ready(Err(CollectError::TooLarge));
            }
            if so_far == 0 {
                self.first = Some(data);
            } else {
                if let Some(first) = self.first.take() {
                    self.buf.reserve(self.capacity.max(so_far + data.len()));
                    self.buf.extend_from_slice(&first);
                }
                self.buf.extend_from_slice(&data);
            }
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

    /// A body of the given frames, then the end (or an error where `None` stands).
    #[cfg(any(feature = "validate", feature = "idempotency"))]
    struct Frames(std::collections::VecDeque<Option<Frame<Bytes>>>);

    #[cfg(any(feature = "validate", feature = "idempotency"))]
    impl Body for Frames {
        type Data = Bytes;
        type Error = &'static str;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, &'static str>>> {
            Poll::Ready(match self.0.pop_front() {
                Some(Some(frame)) => Some(Ok(frame)),
                Some(None) => Some(Err("connection reset")),
                None => None,
            })
        }
    }

    #[cfg(any(feature = "validate", feature = "idempotency"))]
    async fn collect(
        max: usize,
        frames: Vec<Option<Frame<Bytes>>>,
    ) -> Result<Collected, CollectError> {
        let mut body = std::pin::pin!(Frames(frames.into()));
        let mut collector = Collector::new(max, None, DEFAULT_BODY_IDLE_TIMEOUT);
        std::future::poll_fn(|cx| collector.poll_collect(body.as_mut(), cx)).await
    }

    #[cfg(any(feature = "validate", feature = "idempotency"))]
    #[tokio::test]
    async fn collector_joins_frames_keeps_trailers_and_refuses_past_the_cap() {
        let data = |s: &'static str| Some(Frame::data(Bytes::from_static(s.as_bytes())));
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", "1".parse().unwrap());
        let read = collect(
            6,
            vec![
                data("ab"),
                data("cd"),
                data("ef"),
                Some(Frame::trailers(trailers)),
            ],
        )
        .await
        .unwrap();
        assert_eq!(read.data, "abcdef");
        assert_eq!(read.trailers.as_ref().unwrap()["x-checksum"], "1");
        let again = read.into_body::<Full<Bytes>>().collect().await.unwrap();
        assert_eq!(again.trailers().unwrap()["x-checksum"], "1");
        assert_eq!(again.to_bytes(), "abcdef");
        // One frame is kept as it came (no copy).
        let one = Bytes::from_static(b"whole");
        let read = collect(5, vec![Some(Frame::data(one.clone()))])
            .await
            .unwrap();
        assert_eq!(read.data.as_ptr(), one.as_ptr());
        assert!(matches!(
            collect(5, vec![data("abc"), data("def")]).await,
            Err(CollectError::TooLarge)
        ));
        assert!(matches!(
            collect(5, vec![data("abc"), None]).await,
            Err(CollectError::Failed(e)) if e == "connection reset"
        ));
        assert!(collect(5, vec![]).await.unwrap().data.is_empty());
    }

    #[tokio::test]
    async fn full_body_is_one_data_frame() {
        let mut body: ResponseBody<Full<Bytes>> = ResponseBody::full("abc");
        assert_eq!(body.size_hint().exact(), Some(3));
        assert!(!body.is_end_stream());
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "abc");
        assert!(body.is_end_stream());
        assert_eq!(body.size_hint().exact(), Some(0));
        assert!(body.frame().await.is_none());
    }

    #[test]
    fn empty_body_is_end_of_stream() {
        let body: ResponseBody<Full<Bytes>> = ResponseBody::empty();
        assert!(body.is_end_stream());
        assert!(!body.is_inner());
        assert!(ResponseBody::inner(Full::new(Bytes::new())).is_inner());
    }
}
