//! The [`ResponseFuture`] of the [`super::RateLimit`] service.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::gcra::CheckFuture;
use super::{Outcome, Settings};
use crate::body::BodyMode;
use crate::key::RequestHead;

pub(crate) type RateLimitHeaders = (HeaderValue, HeaderValue);

pub(crate) struct Pending<S, ReqBody> {
    check: CheckFuture,
    call: Option<(S, Request<ReqBody>)>,
    settings: Arc<Settings>,
}

impl<S, ReqBody> State<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    #[inline]
    fn new_inner(future: S::Future, headers: Option<Box<RateLimitHeaders>>) -> Self {
        match headers {
            None => State::Inner { future },
            headers => State::InnerWithHeaders { future, headers },
        }
    }
}

impl<S, ReqBody> Pending<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    /// Waits for the backend, then calls the inner service or refuses. Kept out of line so
    /// that the in-memory path's `poll` stays small.
    #[inline(never)]
    fn poll_decision(&mut self, cx: &mut Context<'_>) -> Poll<State<S, ReqBody>> {
        let result = ready!(self.check.as_mut().poll(cx));
        let (mut service, req) = self
            .call
            .take()
            .expect("ResponseFuture polled after completion");
        let next = match self.settings.outcome(result, &RequestHead::of(&req)) {
            Outcome::Pass(headers) => State::new_inner(service.call(req), headers),
            Outcome::Refuse(response) => State::Refused {
                response: Some(response),
            },
        };
        Poll::Ready(next)
    }
}

pin_project! {
    /// The response future of [`super::RateLimit`].
    pub struct ResponseFuture<S, ReqBody, M = crate::body::Wrapped>
    where
        S: Service<Request<ReqBody>>,
    {
        #[pin]
        state: State<S, ReqBody>,
        mode: PhantomData<fn() -> M>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqBody>
    where
        S: Service<Request<ReqBody>>,
    {
        // Boxed: only the Redis path waits, and the in-memory hot path should not move a
        // future as large as a whole request around.
        Checking {
            pending: Box<Pending<S, ReqBody>>,
        },
        Inner {
            #[pin]
            future: S::Future,
        },
        InnerWithHeaders {
            #[pin]
            future: S::Future,
            headers: Option<Box<RateLimitHeaders>>,
        },
        Refused {
            response: Option<Box<Response<Bytes>>>,
        },
    }
}

impl<S, ReqBody, M> ResponseFuture<S, ReqBody, M>
where
    S: Service<Request<ReqBody>>,
{
    #[inline(always)]
    pub(crate) fn pass(future: S::Future) -> Self {
        Self {
            state: State::Inner { future },
            mode: PhantomData,
        }
    }

    #[inline]
    pub(crate) fn inner(future: S::Future, headers: Option<Box<RateLimitHeaders>>) -> Self {
        Self {
            state: State::new_inner(future, headers),
            mode: PhantomData,
        }
    }

    pub(crate) fn refused(response: Box<Response<Bytes>>) -> Self {
        Self {
            state: State::Refused {
                response: Some(response),
            },
            mode: PhantomData,
        }
    }

    #[inline(never)]
    pub(crate) fn checking(
        check: CheckFuture,
        service: S,
        req: Request<ReqBody>,
        settings: Arc<Settings>,
    ) -> Self {
        Self {
            state: State::Checking {
                pending: Box::new(Pending {
                    check,
                    call: Some((service, req)),
                    settings,
                }),
            },
            mode: PhantomData,
        }
    }
}

impl<S, ReqBody, ResBody, M> Future for ResponseFuture<S, ReqBody, M>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    M: BodyMode<ResBody>,
{
    type Output = Result<Response<M::Body>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Checking { pending } => {
                    let next = ready!(pending.poll_decision(cx));
                    this.state.set(next);
                }
                StateProj::Inner { future } => {
                    return future.poll(cx).map_ok(M::pass);
                }
                StateProj::InnerWithHeaders { future, headers } => {
                    let mut response = ready!(future.poll(cx))?;
                    if let Some(block) = headers.take() {
                        let (policy, limit) = *block;
                        let h = response.headers_mut();
                        h.append(super::RATELIMIT_POLICY, policy);
                        h.append(super::RATELIMIT, limit);
                    }
                    return Poll::Ready(Ok(M::pass(response)));
                }
                StateProj::Refused { response } => {
                    let response = response
                        .take()
                        .expect("ResponseFuture polled after completion");
                    return Poll::Ready(Ok(M::own(*response)));
                }
            }
        }
    }
}
