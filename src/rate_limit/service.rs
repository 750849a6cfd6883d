//! The [`RateLimit`] service.

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response};
use tower_service::Service;

use super::future::RateLimitHeaders;
use super::future::ResponseFuture;
use super::gcra::{Backend, Check, CheckFuture, PoliciesRef};
use super::layer::Shared;
use super::{Outcome, Settings};
use crate::annotate::Annotation;
use crate::body::{BodyMode, Wrapped};
use crate::key::{KeyExtractor, RequestHead};

/// Rate-limits requests to the inner service. Made by [`super::RateLimitLayer`]; `M` is
/// its [`BodyMode`].
pub struct RateLimit<S, X, Bk, M = Wrapped> {
    inner: S,
    shared: Arc<Shared<X, Bk>>,
    mode: PhantomData<fn() -> M>,
}

impl<S, X, Bk, M> RateLimit<S, X, Bk, M> {
    pub(crate) fn new(inner: S, shared: Arc<Shared<X, Bk>>) -> Self {
        Self {
            inner,
            shared,
            mode: PhantomData,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: Clone, X, Bk, M> Clone for RateLimit<S, X, Bk, M> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            mode: PhantomData,
        }
    }
}

impl<S: fmt::Debug, X, Bk, M> fmt::Debug for RateLimit<S, X, Bk, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .field("name", &self.shared.settings.name)
            .finish_non_exhaustive()
    }
}

#[inline]
fn is_preflight(head: &RequestHead<'_>) -> bool {
    *head.method == Method::OPTIONS
        && head
            .headers
            .contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD)
}

impl<S, X, Bk, M, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S, X, Bk, M>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    X: KeyExtractor,
    Bk: Backend<X::Key>,
    M: BodyMode<ResBody>,
{
    type Response = Response<M::Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody, M>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        // Decide on the borrowed head first, so that the request is moved once, at one
        // place per outcome (no copies of it on the hot path).
        match route(&self.shared, &RequestHead::of(&req)) {
            Route::Pass(None) => ResponseFuture::pass(self.inner.call(req)),
            Route::Pass(headers) => ResponseFuture::inner(self.inner.call(req), headers),
            Route::Refuse(response) => ResponseFuture::refused(response),
            Route::Wait(check) => self.wait(check, req),
        }
    }
}

impl<S: Clone, X, Bk, M> RateLimit<S, X, Bk, M> {
    /// The Redis path: the inner service that was driven to readiness goes into the
    /// future; a fresh clone stays here for the next call.
    #[cold]
    #[inline(never)]
    fn wait<ReqBody>(
        &mut self,
        check: CheckFuture,
        req: Request<ReqBody>,
    ) -> ResponseFuture<S, ReqBody, M>
    where
        S: Service<Request<ReqBody>>,
    {
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::checking(check, inner, req, self.shared.settings.clone())
    }
}

enum Route {
    Pass(Option<Box<RateLimitHeaders>>),
    Refuse(Box<Response<Bytes>>),
    Wait(CheckFuture),
}

#[inline]
fn route<X, Bk>(shared: &Shared<X, Bk>, head: &RequestHead<'_>) -> Route
where
    X: KeyExtractor,
    Bk: Backend<X::Key>,
{
    let settings: &Settings = &shared.settings;
    let skip = (!settings.count_preflight && is_preflight(head))
        || settings.exempt.as_ref().is_some_and(|exempt| exempt(head));
    let cost = match &settings.cost {
        _ if skip => 0,
        Some(cost) => cost(head),
        None => 1,
    };
    let key = if cost == 0 {
        None
    } else {
        shared.extractor.extract(head)
    };
    let Some(key) = key else {
        return Route::Pass(None);
    };
    if u64::from(cost) > settings.policies.max_cost() {
        settings.annotate_impossible(head, cost, shared.backend.source());
        if settings.shadow {
            return Route::Pass(None);
        }
        return Route::Refuse(Box::new(settings.refuse_impossible(head, cost)));
    }
    let policies = PoliciesRef {
        inner: &settings.policies,
        // Details are for headers on allowed responses and for the annotation.
        details: settings.headers_on_success || Annotation::of(head.extensions).is_some(),
    };
    match shared.backend.check(&settings.name, &key, &policies, cost) {
        // The common case, kept short: allowed, nothing to record, no headers to add.
        Check::Allowed => Route::Pass(None),
        Check::Ready(result) => match settings.outcome(result, head) {
            Outcome::Pass(headers) => Route::Pass(headers),
            Outcome::Refuse(response) => Route::Refuse(response),
        },
        Check::Pending(check) => Route::Wait(check),
    }
}
