//! The [`ResponseFuture`] of the [`super::Trace`] service.

use std::fmt;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body::Body;
use pin_project_lite::pin_project;

use super::body::TraceBody;
use super::event::{Outcome, Pending, panic_message};
use crate::body::ResponseBody;
use crate::reject::{Rejection, RenderContext};

pin_project! {
    /// The response future of [`super::Trace`].
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
        pending: Option<Box<Pending>>,
        // Present when panics are caught: what is needed to render the 500.
        render: Option<RenderContext>,
    }

    impl<F> PinnedDrop for ResponseFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            // Dropped before the response head: the client went away (or a panic unwinds).
            if let Some(pending) = this.project().pending.take() {
                let outcome = if std::thread::panicking() {
                    Outcome::Errored
                } else {
                    Outcome::ClientAborted
                };
                pending.finish(outcome);
            }
        }
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Running { #[pin] future: F },
        Panicked { message: String },
        Done,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(future: F, pending: Box<Pending>, render: Option<RenderContext>) -> Self {
        Self {
            state: State::Running { future },
            pending: Some(pending),
            render,
        }
    }

    pub(crate) fn panicked(
        payload: &(dyn std::any::Any + Send),
        pending: Box<Pending>,
        render: Option<RenderContext>,
    ) -> Self {
        Self {
            state: State::Panicked {
                message: panic_message(payload),
            },
            pending: Some(pending),
            render,
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

/// The answer to a request whose handler panicked: a plain 500 that says nothing of the
/// panic (the message goes to the log only).
fn panic_response<B>(
    message: &str,
    mut pending: Box<Pending>,
    render: Option<&RenderContext>,
) -> Response<TraceBody<B>>
where
    B: Body<Data = Bytes>,
    B::Error: fmt::Display,
{
    pending.on_error("panic", &message);
    let rejection = Rejection::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error")
        .with_detail("The server failed to handle the request.");
    let rendered = match render {
        Some(render) => render.render(&rejection),
        None => crate::reject::DefaultRender::problem_json(&rejection),
    };
    respond(rendered.map(ResponseBody::full), pending)
}

fn respond<B>(
    response: Response<ResponseBody<B>>,
    mut pending: Box<Pending>,
) -> Response<TraceBody<B>>
where
    B: Body<Data = Bytes>,
    B::Error: fmt::Display,
{
    let (mut parts, body) = response.into_parts();
    pending.on_head(parts.status, &parts.headers);
    parts.headers.insert(
        pending.request_id_header().clone(),
        pending.request_id().header_value().clone(),
    );
    let content_length = crate::body::content_length(&parts.headers);
    Response::from_parts(parts, TraceBody::new(body, pending, content_length))
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: fmt::Display,
    B: Body<Data = Bytes>,
    B::Error: fmt::Display,
{
    type Output = Result<Response<TraceBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        match this.state.as_mut().project() {
            StateProj::Running { future } => {
                let polled = {
                    let _entered = this.pending.as_ref().map(|p| p.span.enter());
                    if this.render.is_some() {
                        catch_unwind(AssertUnwindSafe(|| future.poll(cx)))
                    } else {
                        Ok(future.poll(cx))
                    }
                };
                let result = match polled {
                    Ok(Poll::Pending) => return Poll::Pending,
                    Ok(Poll::Ready(result)) => result,
                    Err(payload) => {
                        let message = panic_message(&*payload);
                        this.state.set(State::Done);
                        let pending = this.pending.take().expect("polled after completion");
                        return Poll::Ready(Ok(panic_response(
                            &message,
                            pending,
                            this.render.as_ref(),
                        )));
                    }
                };
                this.state.set(State::Done);
                let mut pending = this.pending.take().expect("polled after completion");
                Poll::Ready(match result {
                    Ok(response) => Ok(respond(response.map(ResponseBody::inner), pending)),
                    Err(error) => {
                        pending.on_error("service_error", &error);
                        pending.finish(Outcome::Errored);
                        Err(error)
                    }
                })
            }
            StateProj::Panicked { message } => {
                let message = std::mem::take(message);
                this.state.set(State::Done);
                let pending = this.pending.take().expect("polled after completion");
                Poll::Ready(Ok(panic_response(&message, pending, this.render.as_ref())))
            }
            StateProj::Done => panic!("ResponseFuture polled after completion"),
        }
    }
}
