//! The [`ResponseFuture`] of the [`super::Validate`] service.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response, StatusCode};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_service::Service;

use super::layer::Shared;
use super::service::{Found, finish, refuse, too_large};
use crate::body::{CollectError, Collector, RequestBody, ResponseBody};
use crate::key::RequestHead;

pub(crate) struct Collect<S> {
    parts: Option<Parts>,
    collector: Collector,
    service: Option<S>,
    shared: Arc<Shared>,
    found: Option<Found>,
}

pin_project! {
    /// The response future of [`super::Validate`].
    pub struct ResponseFuture<S, ReqBody>
    where
        S: Service<Request<RequestBody<ReqBody>>>,
    {
        #[pin]
        state: State<S, ReqBody>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqBody>
    where
        S: Service<Request<RequestBody<ReqBody>>>,
    {
        Collecting { #[pin] body: ReqBody, collect: Box<Collect<S>> },
        Inner { #[pin] future: S::Future },
        Refused { response: Option<Response<Bytes>> },
    }
}

impl<S, ReqBody> fmt::Debug for ResponseFuture<S, ReqBody>
where
    S: Service<Request<RequestBody<ReqBody>>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S, ReqBody> ResponseFuture<S, ReqBody>
where
    S: Service<Request<RequestBody<ReqBody>>>,
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
        Self {
            state: State::Collecting {
                body,
                collect: Box::new(Collect {
                    parts: Some(parts),
                    collector: Collector::new(shared.max_body, declared, shared.body_idle_timeout),
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
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
    ReqBody: Body<Data = Bytes>,
    ReqBody::Error: fmt::Display,
{
    type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let next = match this.state.as_mut().project() {
                StateProj::Collecting { body, collect } => {
                    let read = ready!(collect.collector.poll_collect(body, cx));
                    let parts = collect.parts.take().expect("polled after completion");
                    let head = RequestHead::of_parts(&parts);
                    let outcome = match read {
                        Err(CollectError::TooLarge) => {
                            Err(Box::new(too_large(&head, collect.shared.max_body)))
                        }
                        Err(CollectError::Stalled(idle)) => Err(Box::new(refuse(
                            &head,
                            StatusCode::REQUEST_TIMEOUT,
                            "Request Timeout",
                            format!(
                                "The body sent nothing for {} s; send it again.",
                                idle.as_secs_f64()
                            ),
                        ))),
                        Err(CollectError::Failed(error)) => Err(Box::new(refuse(
                            &head,
                            StatusCode::BAD_REQUEST,
                            "Bad Request",
                            format!("The body could not be read: {error}."),
                        ))),
                        Ok(read) => {
                            let found = collect.found.take().unwrap_or_default();
                            finish::<ReqBody>(&collect.shared, parts, read, found)
                        }
                    };
                    match outcome {
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
