//! The [`ResponseFuture`] of the [`super::Validate`] service.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http::request::Parts;
use http::{Request, Response, StatusCode};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_service::Service;

use super::layer::Shared;
use super::service::{Found, finish, refuse, too_large};
use crate::body::ResponseBody;
use crate::key::RequestHead;

pub(crate) struct Collect<S> {
    parts: Option<Parts>,
    // A body that arrives in one frame (the usual case) is kept as it is, not copied.
    first: Option<Bytes>,
    buf: BytesMut,
    len: usize,
    service: Option<S>,
    shared: Arc<Shared>,
    found: Option<Found>,
}

pin_project! {
    /// The response future of [`super::Validate`].
    pub struct ResponseFuture<S, ReqBody>
    where
        S: Service<Request<ReqBody>>,
    {
        #[pin]
        state: State<S, ReqBody>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqBody>
    where
        S: Service<Request<ReqBody>>,
    {
        Collecting { #[pin] body: ReqBody, collect: Box<Collect<S>> },
        Inner { #[pin] future: S::Future },
        Refused { response: Option<Response<Bytes>> },
    }
}

impl<S, ReqBody> fmt::Debug for ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S, ReqBody> ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    pub(crate) fn inner(future: S::Future) -> Self {
        Self {
            state: State::Inner { future },
        }
    }

    pub(crate) fn refused(response: Response<Bytes>) -> Self {
        Self {
            state: State::Refused {
                response: Some(response),
            },
        }
    }

    pub(crate) fn collecting(
        req: Request<ReqBody>,
        service: S,
        shared: Arc<Shared>,
        found: Found,
        declared: Option<u64>,
    ) -> Self {
        let (parts, body) = req.into_parts();
        let capacity = declared
            .map_or(8 * 1024, |n| n as usize)
            .min(shared.max_body);
        Self {
            state: State::Collecting {
                body,
                collect: Box::new(Collect {
                    parts: Some(parts),
                    first: None,
                    buf: BytesMut::new(),
                    len: capacity,
                    service: Some(service),
                    shared,
                    found: Some(found),
                }),
            },
        }
    }
}

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ReqBody: Body<Data = Bytes> + From<Bytes>,
    ReqBody::Error: fmt::Display,
{
    type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let next = match this.state.as_mut().project() {
                StateProj::Collecting { mut body, collect } => {
                    let max = collect.shared.max_body;
                    let refusal = loop {
                        match ready!(body.as_mut().poll_frame(cx)) {
                            Some(Ok(frame)) => {
                                if let Ok(data) = frame.into_data() {
                                    let so_far = collect.first.as_ref().map_or(0, Bytes::len)
                                        + collect.buf.len();
                                    if so_far + data.len() > max {
                                        let parts = collect.parts.as_ref().expect("parts");
                                        break Some(too_large(&RequestHead::of_parts(parts), max));
                                    }
                                    if so_far == 0 {
                                        collect.first = Some(data);
                                    } else {
                                        if let Some(first) = collect.first.take() {
                                            collect
                                                .buf
                                                .reserve(collect.len.max(so_far + data.len()));
                                            collect.buf.extend_from_slice(&first);
                                        }
                                        collect.buf.extend_from_slice(&data);
                                    }
                                }
                            }
                            Some(Err(error)) => {
                                let parts = collect.parts.as_ref().expect("parts");
                                break Some(refuse(
                                    &RequestHead::of_parts(parts),
                                    StatusCode::BAD_REQUEST,
                                    "Bad Request",
                                    format!("The body could not be read: {error}."),
                                ));
                            }
                            None => break None,
                        }
                    };
                    match refusal {
                        Some(response) => State::Refused {
                            response: Some(response),
                        },
                        None => {
                            let parts = collect.parts.take().expect("polled after completion");
                            let bytes: Bytes = match collect.first.take() {
                                Some(first) => first,
                                None => std::mem::take(&mut collect.buf).freeze(),
                            };
                            let found = collect.found.take().unwrap_or_default();
                            match finish::<ReqBody>(&collect.shared, parts, bytes, found) {
                                Ok(req) => {
                                    let mut service =
                                        collect.service.take().expect("polled after completion");
                                    State::Inner {
                                        future: service.call(req),
                                    }
                                }
                                Err(response) => State::Refused {
                                    response: Some(*response),
                                },
                            }
                        }
                    }
                }
                StateProj::Inner { future } => {
                    return future
                        .poll(cx)
                        .map_ok(|response| response.map(ResponseBody::inner));
                }
                StateProj::Refused { response } => {
                    let response = response
                        .take()
                        .expect("ResponseFuture polled after completion");
                    return Poll::Ready(Ok(response.map(ResponseBody::full)));
                }
            };
            this.state.set(next);
        }
    }
}
