//! The [`ResponseFuture`] of the [`super::Auth`] service.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::AuthFailure;
use super::jwt::Verified;
use super::layer::Shared;
use super::revoke::BoxFuture;
use super::service::{accept, refuse};
use crate::body::ResponseBody;

pub(crate) struct Verifying<S, ReqBody> {
    verify: BoxFuture<'static, Result<Verified, AuthFailure>>,
    call: Option<(S, Request<ReqBody>)>,
    shared: Arc<Shared>,
}

pin_project! {
    /// The response future of [`super::Auth`].
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
        Verifying { pending: Box<Verifying<S, ReqBody>> },
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

impl<S, ReqBody, ResBody> ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
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

    pub(crate) fn verifying(
        verify: BoxFuture<'static, Result<Verified, AuthFailure>>,
        service: S,
        req: Request<ReqBody>,
        shared: Arc<Shared>,
    ) -> Self {
        Self {
            state: State::Verifying {
                pending: Box::new(Verifying {
                    verify,
                    call: Some((service, req)),
                    shared,
                }),
            },
        }
    }
}

impl<S, ReqBody> Verifying<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    /// Waits for the verification, then calls the inner service or refuses.
    fn poll_decision(&mut self, cx: &mut Context<'_>) -> Poll<State<S, ReqBody>> {
        let result = ready!(self.verify.as_mut().poll(cx));
        let (mut service, mut req) = self
            .call
            .take()
            .expect("ResponseFuture polled after completion");
        let shared = &*self.shared;
        let accepted = result.and_then(|v| accept(shared, &mut req, v.principal, Some(v.claims)));
        Poll::Ready(match accepted {
            Ok(()) => State::Inner {
                future: service.call(req),
            },
            Err(failure) => State::Refused {
                response: Some(refuse(shared, &req, failure)),
            },
        })
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
                StateProj::Verifying { pending } => {
                    let next = ready!(pending.poll_decision(cx));
                    this.state.set(next);
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
            }
        }
    }
}
