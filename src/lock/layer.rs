//! [`LockLayer`]: holds a named lock for the whole of a request.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::{Lock, LockManager};
use crate::key::RequestHead;

/// What a request that could not get its lock in time receives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum BusyResponse {
    /// `503 Service Unavailable` with `Retry-After` (gRPC `UNAVAILABLE`): the default, for
    /// work that will succeed once the holder is done.
    #[default]
    ServiceUnavailable,
    /// `409 Conflict` (gRPC `ABORTED`): for work that conflicts with the holder's.
    Conflict,
}

pub(crate) type NameFn = dyn Fn(&RequestHead<'_>) -> Option<String> + Send + Sync;

#[derive(Clone)]
pub(crate) struct Settings {
    pub(crate) manager: LockManager,
    pub(crate) name: Arc<NameFn>,
    pub(crate) wait: Duration,
    pub(crate) busy: BusyResponse,
}

/// A layer that takes a lock named after the request before calling the service, and holds
/// it until the response body has ended (or the client went away).
///
/// The name comes from a closure over the request head (`None`: the request takes no lock).
/// The request waits up to a budget (2 s by default), then is refused with
/// [`BusyResponse`]. The handler finds a [`HeldLock`](super::HeldLock) in the request
/// extensions, with the fencing token. Wait time and outcome go into the request's
/// [`annotate::Record`](crate::annotate::Record).
///
/// The lock is held while the handler reads the request body and while the client reads
/// the response (the watchdog extends it, up to the manager's hold cap): a client that
/// uploads or downloads slowly keeps others on the same name waiting. Put the layer inside
/// a layer that reads the body first ([`validate`](crate::validate), whose
/// `body_idle_timeout` also refuses a stalled upload), and keep locked responses small.
///
/// ```
/// use battlement::lock::{HeldLock, LockLayer, LockManager};
/// use http::{Request, Response};
/// use std::convert::Infallible;
/// use std::time::Duration;
/// use tower::{ServiceBuilder, ServiceExt};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let layer = LockLayer::new(LockManager::memory(), |req| {
///     let id = req.uri.path().strip_prefix("/orders/")?.strip_suffix("/pay")?;
///     Some(format!("order:{id}"))
/// })
/// .wait(Duration::from_secs(2));
/// let svc = ServiceBuilder::new().layer(layer).service_fn(|req: Request<String>| async move {
///     let lock = req.extensions().get::<HeldLock>().expect("the layer put it there");
///     Ok::<_, Infallible>(Response::new(format!("paid with fence {}", lock.fencing_token())))
/// });
/// let res = svc.oneshot(Request::post("/orders/42/pay").body(String::new()).unwrap()).await.unwrap();
/// assert_eq!(res.status(), 200);
/// # }
/// ```
#[derive(Clone)]
pub struct LockLayer {
    settings: Arc<Settings>,
}

impl fmt::Debug for LockLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockLayer")
            .field("manager", &self.settings.manager)
            .field("wait", &self.settings.wait)
            .field("busy", &self.settings.busy)
            .finish_non_exhaustive()
    }
}

impl LockLayer {
    /// A layer that locks the name `name` gives for each request, on `manager`.
    pub fn new<F>(manager: LockManager, name: F) -> Self
    where
        F: Fn(&RequestHead<'_>) -> Option<String> + Send + Sync + 'static,
    {
        Self {
            settings: Arc::new(Settings {
                manager,
                name: Arc::new(name),
                wait: Duration::from_secs(2),
                busy: BusyResponse::default(),
            }),
        }
    }

    fn settings_mut(&mut self) -> &mut Settings {
        Arc::make_mut(&mut self.settings)
    }

    /// How long a request waits for the lock (2 s by default).
    #[must_use]
    pub fn wait(mut self, wait: Duration) -> Self {
        self.settings_mut().wait = wait;
        self
    }

    /// What a request that did not get the lock in time receives (`503` by default).
    #[must_use]
    pub fn on_busy(mut self, busy: BusyResponse) -> Self {
        self.settings_mut().busy = busy;
        self
    }
}

impl<S> Layer<S> for LockLayer {
    type Service = Lock<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Lock {
            inner,
            settings: self.settings.clone(),
        }
    }
}
