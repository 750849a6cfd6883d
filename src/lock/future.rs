//! The [`ResponseFuture`] of the [`Lock`](super::Lock) service.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::{HeaderValue, Request, Response, StatusCode, header};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::body::{Held, LockBody};
use super::layer::{BusyResponse, Settings};
use super::{LockError, LockGuard};
use crate::annotate::{Annotation, LockNote, LockOutcome};
use crate::body::ResponseBody;
use crate::key::RequestHead;
use crate::reject::Rejection;

type Acquire = Pin<Box<dyn Future<Output = Result<LockGuard, LockError>> + Send>>;

pin_project! {
    /// The response future of [`Lock`](super::Lock).
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
        Locking {
            acquire: Acquire,
            call: Option<(S, Request<ReqBody>)>,
            settings: Arc<Settings>,
            started: tokio::time::Instant,
        },
        Inner {
            #[pin]
            future: S::Future,
            held: Option<Held>,
        },
    }
}

impl<S, ReqBody> ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    pub(crate) fn pass(future: S::Future) -> Self {
        Self {
            state: State::Inner { future, held: None },
        }
    }

    pub(crate) fn locking(
        settings: Arc<Settings>,
        name: String,
        service: S,
        req: Request<ReqBody>,
    ) -> Self {
        let manager = settings.manager.clone();
        let wait = settings.wait;
        let acquire: Acquire = Box::pin(async move { manager.acquire(&name, wait).await });
        Self {
            state: State::Locking {
                acquire,
                call: Some((service, req)),
                settings,
                started: tokio::time::Instant::now(),
            },
        }
    }
}

fn refusal(error: &LockError, busy: BusyResponse) -> (Rejection, LockOutcome) {
    let retry = HeaderValue::from_static("1");
    match error {
        LockError::InvalidName => (
            Rejection::new(StatusCode::BAD_REQUEST, "Invalid resource identifier")
                .with_detail("The request names a resource that cannot be locked."),
            LockOutcome::InvalidName,
        ),
        LockError::TimedOut { .. } => {
            let rejection = match busy {
                BusyResponse::Conflict => Rejection::new(StatusCode::CONFLICT, "Resource busy")
                    .with_detail("Another request is working on this resource."),
                BusyResponse::ServiceUnavailable => {
                    Rejection::new(StatusCode::SERVICE_UNAVAILABLE, "Resource busy")
                        .with_detail("Another request is working on this resource; retry shortly.")
                        .with_header(header::RETRY_AFTER, retry)
                }
            };
            (rejection, LockOutcome::TimedOut)
        }
        _ => (
            Rejection::new(StatusCode::SERVICE_UNAVAILABLE, "Lock service unavailable")
                .with_detail("The resource could not be locked; retry shortly.")
                .with_header(header::RETRY_AFTER, retry),
            LockOutcome::Unavailable,
        ),
    }
}

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
{
    type Output = Result<Response<ResponseBody<LockBody<ResBody>>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Locking {
                    acquire,
                    call,
                    settings,
                    started,
                } => {
                    let result = ready!(acquire.as_mut().poll(cx));
                    let (mut service, mut req) =
                        call.take().expect("ResponseFuture polled after completion");
                    let annotation = Annotation::of(req.extensions()).cloned();
                    match result {
                        Ok(guard) => {
                            if let Some(a) = &annotation {
                                let note = LockNote::new(guard.waited(), LockOutcome::Acquired);
                                a.update(|record| record.lock = Some(note));
                            }
                            req.extensions_mut().insert(guard.handle());
                            let future = service.call(req);
                            this.state.set(State::Inner {
                                future,
                                held: Some(Held { guard, annotation }),
                            });
                        }
                        Err(error) => {
                            let (rejection, outcome) = refusal(&error, settings.busy);
                            if let Some(a) = &annotation {
                                let note = LockNote::new(started.elapsed(), outcome);
                                a.update(|record| record.lock = Some(note));
                            }
                            tracing::debug!(%error, "battlement: request refused by the lock layer");
                            let response = rejection.render(&RequestHead::of(&req));
                            return Poll::Ready(Ok(response.map(ResponseBody::full)));
                        }
                    }
                }
                StateProj::Inner { future, held } => {
                    let response = ready!(future.poll(cx))?;
                    let held = held.take();
                    return Poll::Ready(Ok(
                        response.map(|body| ResponseBody::inner(LockBody::new(body, held)))
                    ));
                }
            }
        }
    }
}
