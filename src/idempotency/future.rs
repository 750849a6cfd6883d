//! The [`ResponseFuture`] of the [`super::Idempotency`] service.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::HeaderValue;
use http::request::Parts;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_service::Service;

use super::FailurePolicy;
use super::IDEMPOTENT_REPLAYED;
use super::body::{IdempotencyBody, Lease, detach, first_response, give_back};
use super::layer::Shared;
use super::record::StoredResponse;
use super::service::{fingerprint, note, refusal};
use super::store::{BoxFuture, Claim, OwnerToken, Scope, StoreError};
use crate::annotate::{Annotation, IdempotencyOutcome};
use crate::body::{CollectError, Collected, Collector, RequestBody, ResponseBody};
use crate::key::RequestHead;
use crate::reject::Rejection;

/// A response the layer answers with itself (a refusal or a replay).
pub(crate) struct Buffered {
    data: Bytes,
    trailers: Option<HeaderMap>,
}

fn buffered(response: Response<Bytes>) -> Box<Response<Buffered>> {
    Box::new(response.map(|data| Buffered {
        data,
        trailers: None,
    }))
}

/// A stored response, answered again with `Idempotent-Replayed: true`.
fn replay(stored: StoredResponse) -> Box<Response<Buffered>> {
    let (status, mut headers, data, trailers) = stored.into_parts();
    headers.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    let mut response = Response::new(Buffered { data, trailers });
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Box::new(response)
}

/// Everything a keyed request carries from reading its body to calling the inner service.
pub(crate) struct Keyed<S> {
    shared: Arc<Shared>,
    parts: Option<Parts>,
    collector: Collector,
    body: Option<Collected>,
    service: Option<S>,
    scope: Scope,
    owner: Option<OwnerToken>,
    /// A claim was sent and its answer not yet seen: if the request goes away now, the
    /// claim may have been made, and is released (a no-op when it was not).
    claim_pending: bool,
}

impl<S> Drop for Keyed<S> {
    fn drop(&mut self) {
        if let (true, Some(owner)) = (self.claim_pending, self.owner) {
            detach(Box::pin(give_back(self.shared.clone(), self.scope, owner)));
        }
    }
}

impl<S> Keyed<S> {
    fn parts(&self) -> &Parts {
        self.parts
            .as_ref()
            .expect("ResponseFuture polled after completion")
    }

    fn refuse(&self, outcome: IdempotencyOutcome) -> Box<Response<Buffered>> {
        let head = RequestHead::of_parts(self.parts());
        buffered(refusal(&head, outcome, self.shared.max_request_body))
    }

    /// The request as it came, its body rebuilt from the bytes read.
    fn request<B>(&mut self) -> Request<RequestBody<B>> {
        let parts = self
            .parts
            .take()
            .expect("ResponseFuture polled after completion");
        Request::from_parts(parts, self.body.take().unwrap_or_default().into_body())
    }

    /// The store could not answer: refuse (`Closed`), or run the request unprotected
    /// (`Open`).
    fn store_failed<ReqBody>(&mut self, error: &StoreError) -> State<S, ReqBody>
    where
        S: Service<Request<RequestBody<ReqBody>>>,
    {
        match self.shared.failure {
            FailurePolicy::Closed => {
                tracing::debug!(%error, "battlement::idempotency: store unavailable; refusing");
                State::Ready {
                    response: Some(self.refuse(IdempotencyOutcome::Unavailable)),
                }
            }
            FailurePolicy::Open => {
                tracing::warn!(%error, "battlement::idempotency: store unavailable; running the request without idempotency");
                note(&self.parts().extensions, IdempotencyOutcome::FailOpen);
                let req = self.request::<ReqBody>();
                let mut service = self
                    .service
                    .take()
                    .expect("ResponseFuture polled after completion");
                State::Pass {
                    future: service.call(req),
                }
            }
        }
    }
}

pin_project! {
    /// The response future of [`super::Idempotency`].
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
        // No key (or not a method the layer applies to): the inner future, untouched.
        Pass { #[pin] future: S::Future },
        Collecting { #[pin] body: ReqBody, keyed: Option<Box<Keyed<S>>> },
        Claiming {
            claim: BoxFuture<'static, Result<Claim, StoreError>>,
            keyed: Option<Box<Keyed<S>>>,
        },
        // The key is ours: the inner future, and the lease that completes or releases it.
        Running { #[pin] future: S::Future, lease: Option<Box<Lease>> },
        Ready { response: Option<Box<Response<Buffered>>> },
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
    #[inline]
    pub(crate) fn pass(future: S::Future) -> Self {
        Self {
            state: State::Pass { future },
        }
    }

    pub(crate) fn refused(response: Response<Bytes>) -> Self {
        Self {
            state: State::Ready {
                response: Some(buffered(response)),
            },
        }
    }

    pub(crate) fn keyed(
        req: Request<ReqBody>,
        service: S,
        shared: Arc<Shared>,
        scope: Scope,
        declared: Option<u64>,
    ) -> Self {
        let (parts, body) = req.into_parts();
        let collector = Collector::new(shared.max_request_body, declared, shared.body_idle_timeout);
        Self {
            state: State::Collecting {
                body,
                keyed: Some(Box::new(Keyed {
                    shared,
                    parts: Some(parts),
                    collector,
                    body: None,
                    service: Some(service),
                    scope,
                    owner: None,
                    claim_pending: false,
                })),
            },
        }
    }
}

/// Reads the request body into `keyed`, up to the cap. `Some(refusal)` when it cannot.
fn collect<S, B>(
    body: Pin<&mut B>,
    keyed: &mut Keyed<S>,
    cx: &mut Context<'_>,
) -> Poll<Option<Box<Response<Buffered>>>>
where
    B: Body<Data = Bytes>,
    B::Error: fmt::Display,
{
    Poll::Ready(match ready!(keyed.collector.poll_collect(body, cx)) {
        Ok(read) => {
            keyed.body = Some(read);
            None
        }
        Err(CollectError::TooLarge) => Some(keyed.refuse(IdempotencyOutcome::TooLarge)),
        Err(CollectError::Stalled(idle)) => {
            let head = RequestHead::of_parts(keyed.parts());
            let response = Rejection::new(StatusCode::REQUEST_TIMEOUT, "Request Timeout")
                .with_detail(format!(
                    "The body sent nothing for {} s; send it again.",
                    idle.as_secs_f64()
                ))
                .render(&head);
            Some(buffered(response))
        }
        Err(CollectError::Failed(error)) => {
            let head = RequestHead::of_parts(keyed.parts());
            let response = Rejection::new(StatusCode::BAD_REQUEST, "Bad Request")
                .with_detail(format!("The body could not be read: {error}."))
                .render(&head);
            Some(buffered(response))
        }
    })
}

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, ReqBody>
where
    S: Service<Request<RequestBody<ReqBody>>, Response = Response<ResBody>>,
    ReqBody: Body<Data = Bytes>,
    ReqBody::Error: fmt::Display,
    ResBody: Body<Data = Bytes>,
{
    type Output = Result<Response<ResponseBody<IdempotencyBody<ResBody>>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let next = match this.state.as_mut().project() {
                StateProj::Pass { future } => {
                    return future.poll(cx).map_ok(|response| {
                        response.map(|body| ResponseBody::inner(IdempotencyBody::pass(body)))
                    });
                }
                StateProj::Collecting { body, keyed } => {
                    let k = keyed
                        .as_mut()
                        .expect("ResponseFuture polled after completion");
                    match ready!(collect(body, k, cx)) {
                        Some(response) => State::Ready {
                            response: Some(response),
                        },
                        None => {
                            let mut k = keyed
                                .take()
                                .expect("ResponseFuture polled after completion");
                            let fp = fingerprint(
                                &k.shared,
                                k.parts(),
                                k.body.as_ref().map_or(&[][..], |b| &b.data[..]),
                            );
                            match OwnerToken::generate() {
                                Ok(owner) => {
                                    k.owner = Some(owner);
                                    k.claim_pending = true;
                                    let store = k.shared.store.clone();
                                    let (scope, lease) = (k.scope, k.shared.in_flight_ttl);
                                    State::Claiming {
                                        claim: Box::pin(async move {
                                            store.claim(&scope, &fp, &owner, lease).await
                                        }),
                                        keyed: Some(k),
                                    }
                                }
                                Err(error) => k.store_failed(&error),
                            }
                        }
                    }
                }
                StateProj::Claiming { claim, keyed } => {
                    let result = ready!(claim.as_mut().poll(cx));
                    let mut k = keyed
                        .take()
                        .expect("ResponseFuture polled after completion");
                    // A claim the store did not answer (a timeout, a dropped connection)
                    // may still land: `k` gives it back when it drops.
                    k.claim_pending = result.is_err();
                    match result {
                        Ok(Claim::Acquired) => {
                            let annotation = Annotation::of(&k.parts().extensions).cloned();
                            let lease = Box::new(Lease::new(
                                k.shared.clone(),
                                k.scope,
                                k.owner.expect("an owner token for every claim"),
                                annotation,
                            ));
                            let req = k.request::<ReqBody>();
                            let mut service = k
                                .service
                                .take()
                                .expect("ResponseFuture polled after completion");
                            State::Running {
                                future: service.call(req),
                                lease: Some(lease),
                            }
                        }
                        Ok(Claim::InFlight) => State::Ready {
                            response: Some(k.refuse(IdempotencyOutcome::InFlight)),
                        },
                        Ok(Claim::Mismatch) => State::Ready {
                            response: Some(k.refuse(IdempotencyOutcome::Conflict)),
                        },
                        Ok(Claim::Completed(stored)) => {
                            note(&k.parts().extensions, IdempotencyOutcome::Replayed);
                            State::Ready {
                                response: Some(replay(stored)),
                            }
                        }
                        Err(error) => k.store_failed(&error),
                    }
                }
                StateProj::Running { future, lease } => {
                    let result = ready!(future.poll(cx));
                    // On an error the lease is dropped here, which releases the key.
                    let lease = lease
                        .take()
                        .expect("ResponseFuture polled after completion");
                    return Poll::Ready(result.map(|response| first_response(response, lease)));
                }
                StateProj::Ready { response } => {
                    let response = response
                        .take()
                        .expect("ResponseFuture polled after completion");
                    return Poll::Ready(Ok((*response).map(|b| match b.trailers {
                        Some(trailers) => ResponseBody::with_trailers(b.data, trailers),
                        None => ResponseBody::full(b.data),
                    })));
                }
            };
            this.state.set(next);
        }
    }
}
