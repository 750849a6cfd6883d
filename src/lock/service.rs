//! The [`Lock`] service.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use super::body::LockBody;
use super::future::ResponseFuture;
use super::layer::Settings;
use crate::body::ResponseBody;
use crate::key::RequestHead;

/// The service [`LockLayer`](super::LockLayer) makes.
#[derive(Clone)]
pub struct Lock<S> {
    pub(crate) inner: S,
    pub(crate) settings: Arc<Settings>,
}

impl<S: fmt::Debug> fmt::Debug for Lock<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lock")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Lock<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    ReqBody: Send + 'static,
{
    type Response = Response<ResponseBody<LockBody<ResBody>>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let Some(name) = (self.settings.name)(&RequestHead::of(&req)) else {
            return ResponseFuture::pass(self.inner.call(req));
        };
        // The service driven to readiness goes into the future; a clone stays here.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture::locking(self.settings.clone(), name, inner, req)
    }
}
