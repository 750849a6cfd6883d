//! The [`Trace`] service.

use quanta::Instant;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderName, Request, Response};
use http_body::Body;
use tower_service::Service;

use super::body::TraceBody;
use super::event::{Pending, RouteName, Start};
use super::future::ResponseFuture;
use super::layer::Config;
use super::request_id::RequestId;
use super::traceparent::{RemoteContext, TraceContext};
use crate::annotate::Annotation;
use crate::key::RequestHead;
use crate::reject::RenderContext;

/// The W3C trace context header.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Logs, identifies and traces requests to the inner service. Made by
/// [`super::TraceLayer`].
pub struct Trace<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S> Trace<S> {
    pub(crate) fn new(inner: S, config: Arc<Config>) -> Self {
        Self { inner, config }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: Clone> Clone for Trace<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            config: self.config.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Trace<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trace")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Trace<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: fmt::Display,
    ResBody: Body<Data = Bytes>,
    ResBody::Error: fmt::Display,
{
    type Response = Response<TraceBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    #[inline]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let start = Instant::now();
        let config = &self.config;
        let request_id = config
            .trust_request_id
            .then(|| {
                req.headers()
                    .get(&config.request_id_header)
                    .and_then(RequestId::from_header)
            })
            .flatten()
            .unwrap_or_else(RequestId::generate);
        let trace = match req
            .headers()
            .get(TRACEPARENT)
            .and_then(|v| RemoteContext::parse(v.as_bytes()))
        {
            Some(remote) if config.public_endpoint => TraceContext::linked_to(remote),
            Some(remote) => TraceContext::child_of(remote),
            None => TraceContext::new_root(),
        };
        let capture = config.logging_possible();
        // An annotation an outer layer already put in the request is shared, not replaced:
        // what the inner layers decide reaches both.
        let annotation = (capture || config.metrics_on()).then(|| {
            Annotation::of(req.extensions())
                .cloned()
                .unwrap_or_else(Annotation::new)
        });
        // Inner layers and handlers see the id that is logged and echoed, never a rejected one.
        req.headers_mut().insert(
            config.request_id_header.clone(),
            request_id.header_value().clone(),
        );
        let extensions = req.extensions_mut();
        extensions.insert(request_id.clone());
        extensions.insert(trace);
        if let Some(annotation) = &annotation {
            extensions.insert(annotation.clone());
        }
        let head = RequestHead::of(&req);
        let route = RouteName::of(config, &head);
        let render = config.catch_panics.then(|| RenderContext::of(&head));
        let pending = Pending::new(
            config.clone(),
            &head,
            Start {
                start,
                route,
                trace,
                request_id,
                annotation,
                capture,
            },
        );
        let called = {
            let _entered = pending.span.enter();
            let inner = &mut self.inner;
            if config.catch_panics {
                catch_unwind(AssertUnwindSafe(|| inner.call(req)))
            } else {
                Ok(inner.call(req))
            }
        };
        match called {
            Ok(future) => ResponseFuture::new(future, pending, render),
            Err(payload) => ResponseFuture::panicked(&*payload, pending, render),
        }
    }
}
