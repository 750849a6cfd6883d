//! The [`ResponseFuture`] of the [`super::RateLimit`] service.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::gcra::CheckFuture;
use super::{Outcome, Settings};
use crate::body::ResponseBody;
use crate::key::RequestHead;

pub(crate) type RateLimitHeaders = (HeaderValue, HeaderValue);

pin_project! {
    /// The response future of [`super::RateLimit`].
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
        Checking {
            check: CheckFuture,
            pending: Option<(S, Request<ReqBody>)>,
            settings: Arc<Settings>,
        },
        Inner {
            #[pin]
            future: S::Future,
            headers: Option<RateLimitHeaders>,
        },
        Refused {
            response: Option<Response<Bytes>>,
        },
    }
}

impl<S, ReqBody> ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    pub(crate) fn inner(future: S::Future, headers: Option<RateLimitHeaders>) -> Self {
        Self {
            state: State::Inner { future, headers },
        }
    }

    pub(crate) fn refused(response: Response<Bytes>) -> Self {
        Self {
            state: State::Refused {
                response: Some(response),
            },
        }
    }

    pub(crate) fn checking(
        check: CheckFuture,
        service: S,
        req: Request<ReqBody>,
        settings: Arc<Settings>,
    ) -> Self {
        Self {
            state: State::Checking {
                check,
                pending: Some((service, req)),
                settings,
            },
        }
    }
}

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Output = Result<Response<ResponseBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Checking {
                    check,
                    pending,
                    settings,
                } => {
                    let result = ready!(check.as_mut().poll(cx));
                    let (mut service, req) = pending
                        .take()
                        .expect("ResponseFuture polled after completion");
                    let outcome = settings.outcome(result, &RequestHead::of(&req));
                    let next = match outcome {
                        Outcome::Pass(headers) => State::Inner {
                            future: service.call(req),
                            headers,
                        },
                        Outcome::Refuse(response) => State::Refused {
                            response: Some(response),
                        },
                    };
                    this.state.set(next);
                }
                StateProj::Inner { future, headers } => {
                    let mut response = ready!(future.poll(cx))?;
                    if let Some((policy, limit)) = headers.take() {
                        let h = response.headers_mut();
                        h.append(super::RATELIMIT_POLICY, policy);
                        h.append(super::RATELIMIT, limit);
                    }
                    return Poll::Ready(Ok(response.map(ResponseBody::inner)));
                }
                StateProj::Refused { response } => {
                    let response = response
                        .take()
                        .expect("ResponseFuture polled after completion");
                    return Poll::Ready(Ok(response.map(ResponseBody::full)));
                }
            }
        }
    }
}
