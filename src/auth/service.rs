//! The [`Auth`] service.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tower_service::Service;

use super::future::ResponseFuture;
use super::jwt::Verified;
use super::layer::{Claims, Credentials, Shared, credentials};
use super::{AuthFailure, annotate};
use crate::body::ResponseBody;
use crate::key::RequestHead;
use crate::principal::Principal;

/// Authenticates requests to the inner service. Made by [`super::AuthLayer`].
pub struct Auth<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Auth<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: Clone> Clone for Auth<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Auth<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// Puts what authentication found into the request.
pub(crate) fn accept<B>(
    shared: &Shared,
    req: &mut Request<B>,
    principal: Principal,
    claims: Option<Claims>,
) -> Result<(), AuthFailure> {
    let extensions = req.extensions_mut();
    if let Some(claims) = claims {
        if let Some(insert) = &shared.claims
            && !insert(&claims, extensions)
        {
            return Err(AuthFailure::MissingClaim);
        }
        extensions.insert(claims);
    }
    annotate(extensions, Some(principal.subject()), None);
    extensions.insert(principal);
    Ok(())
}

/// The refusal for `failure`, rendered for `req`.
pub(crate) fn refuse<B>(
    shared: &Shared,
    req: &Request<B>,
    failure: AuthFailure,
) -> Response<Bytes> {
    annotate(req.extensions(), None, Some(failure));
    failure
        .rejection(&shared.realm, shared.challenge(), None)
        .render(&RequestHead::of(req))
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Auth<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let shared = &*self.shared;
        let found = credentials(shared, &RequestHead::of(&req));
        let outcome: Result<(Principal, Option<Claims>), AuthFailure> = match found {
            Err(failure) => Err(failure),
            Ok(Credentials::None) if shared.optional => {
                return ResponseFuture::inner(self.inner.call(req));
            }
            Ok(Credentials::None) => Err(AuthFailure::Missing),
            Ok(Credentials::ApiKey(key)) => match &shared.api_keys {
                Some(keys) => keys.verify(&key).map(|p| (p, None)),
                None => Err(AuthFailure::ApiKey),
            },
            Ok(Credentials::Token(token)) => {
                let jwt = shared
                    .jwt
                    .as_ref()
                    .expect("tokens are read only with a validator");
                match jwt.verify_now(&token) {
                    Some(result) => result.map(|v: Verified| (v.principal, Some(v.claims))),
                    None => return self.verify_later(token, req),
                }
            }
        };
        match outcome.and_then(|(principal, claims)| accept(shared, &mut req, principal, claims)) {
            Ok(()) => ResponseFuture::inner(self.inner.call(req)),
            Err(failure) => ResponseFuture::refused(refuse(shared, &req, failure)),
        }
    }
}

impl<S: Clone> Auth<S> {
    /// The slow path: a key to fetch or a revocation store to ask. The inner service that
    /// was driven to readiness goes into the future; a clone stays here.
    #[cold]
    fn verify_later<ReqBody, ResBody>(
        &mut self,
        token: String,
        req: Request<ReqBody>,
    ) -> ResponseFuture<S, ReqBody>
    where
        S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    {
        let jwt = self
            .shared
            .jwt
            .clone()
            .expect("tokens are read only with a validator");
        let verify = Box::pin(async move { jwt.verify(&token).await });
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::verifying(verify, inner, req, self.shared.clone())
    }
}
