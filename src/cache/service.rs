//! The cache service: lookup, single-flight fill, serving stored responses.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{AGE, CONTENT_LENGTH, ETAG, LAST_MODIFIED, SET_COOKIE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use tokio::sync::watch;
use tower_service::Service;

use super::body::{Capture, CaptureBody};
use super::key::{Key, KeyRules, primary, variant};
use super::policy::{
    self, CacheControl, RequestVerdict, Settings, Staleness, Storable, cache_status,
};
use super::store::{BoxFuture, Entry, Store, Stored};
use crate::annotate::{Annotation, CacheNote, CacheStatus};
use crate::body::ResponseBody;
use crate::principal::Principal;

/// `Cache-Status` header name (RFC 9211).
pub(crate) const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// Headers that describe one connection, never stored.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// State shared by every clone of a cache layer.
pub(crate) struct Shared {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) rules: KeyRules,
    pub(crate) settings: Settings,
    pub(crate) max_body: usize,
    pub(crate) name: String,
    pub(crate) wait: Duration,
    pub(crate) pass_for: Duration,
    pub(crate) etag: bool,
    pub(crate) store_timeout: Duration,
    fills: Mutex<HashMap<Key, watch::Receiver<()>>>,
}

impl Shared {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        rules: KeyRules,
        settings: Settings,
        max_body: usize,
        name: String,
    ) -> Self {
        Self {
            store,
            rules,
            settings,
            max_body,
            name,
            wait: Duration::from_secs(5),
            pass_for: Duration::from_secs(5),
            etag: true,
            store_timeout: Duration::from_millis(50),
            fills: Mutex::new(HashMap::new()),
        }
    }
}

/// Held by the one request filling a key; dropping it (stored, abandoned, or the client
/// gone) wakes every request waiting for that key.
pub(crate) struct FillGuard {
    shared: Arc<Shared>,
    key: Key,
    _done: watch::Sender<()>,
}

impl Drop for FillGuard {
    fn drop(&mut self) {
        self.shared
            .fills
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

enum Role {
    Leader(FillGuard),
    Waiter(watch::Receiver<()>),
}

fn claim(shared: &Arc<Shared>, key: &Key) -> Role {
    let mut fills = shared.fills.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(rx) = fills.get(key) {
        return Role::Waiter(rx.clone());
    }
    let (tx, rx) = watch::channel(());
    fills.insert(key.clone(), rx);
    Role::Leader(FillGuard {
        shared: shared.clone(),
        key: key.clone(),
        _done: tx,
    })
}

/// The cache in front of the inner service. Made by [`super::CacheLayer`].
pub struct Cache<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Cache<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
    }
}

impl<S: Clone> Clone for Cache<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S> std::fmt::Debug for Cache<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache").finish_non_exhaustive()
    }
}

type Answer<B> = Response<ResponseBody<CaptureBody<B>>>;

async fn lookup(shared: &Shared, key: &[u8], headers: &HeaderMap) -> Option<(Key, Stored)> {
    let get = |k: Key| async move {
        match tokio::time::timeout(shared.store_timeout, shared.store.get(&k)).await {
            Ok(Ok(found)) => found.map(|v| (k, v)),
            // A slow or failing store is a miss: the origin answers.
            _ => None,
        }
    };
    match get(key.into()).await? {
        (_, Stored::Vary(names)) => get(variant(key, &names, headers)).await,
        found => Some(found),
    }
}

fn note<B>(req: &Request<B>, status: CacheStatus, age: Option<u64>) {
    if let Some(annotation) = Annotation::of(req.extensions()) {
        annotation.update(|r| r.cache = Some(CacheNote::new(status, age)));
    }
}

/// A stored response, as the answer to `req` (`304` when its validators match, no body
/// for `HEAD`).
fn serve<B, R>(shared: &Shared, req: &Request<B>, entry: &Entry, collapsed: bool) -> Answer<R> {
    let now = SystemTime::now();
    let age = policy::age_header(&entry.headers).unwrap_or(0) + policy::age(entry.stored_at, now);
    let ttl = entry.freshness.ttl(entry.stored_at, now);
    let not_modified = policy::not_modified(
        req.headers(),
        entry.headers.get(ETAG),
        entry.headers.get(LAST_MODIFIED),
    );
    let mut headers = entry.headers.clone();
    headers.insert(AGE, HeaderValue::from(age));
    headers.insert(
        CACHE_STATUS,
        cache_status(&shared.name, true, None, false, collapsed, Some(ttl)),
    );
    note(
        req,
        if collapsed {
            CacheStatus::Collapsed
        } else {
            CacheStatus::Hit
        },
        Some(age),
    );
    let (status, body) = if not_modified {
        headers.remove(CONTENT_LENGTH);
        (StatusCode::NOT_MODIFIED, ResponseBody::empty())
    } else if *req.method() == Method::HEAD {
        (entry.status, ResponseBody::empty())
    } else {
        let body = match &entry.trailers {
            Some(t) => ResponseBody::with_trailers(entry.body.clone(), t.clone()),
            None => ResponseBody::full(entry.body.clone()),
        };
        (entry.status, body)
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

fn forwarded<R>(
    shared: &Shared,
    response: Response<R>,
    fwd: &str,
    capture: Option<Box<Capture>>,
) -> Answer<R> {
    let stored = capture.is_some();
    let (mut parts, body) = response.into_parts();
    parts.headers.insert(
        CACHE_STATUS,
        cache_status(&shared.name, false, Some(fwd), stored, false, None),
    );
    Response::from_parts(parts, ResponseBody::inner(CaptureBody::new(body, capture)))
}

/// The headers kept with a stored response.
fn stored_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = headers.clone();
    for name in HOP_BY_HOP {
        out.remove(name);
    }
    out.remove(SET_COOKIE);
    out.remove(CACHE_STATUS);
    out.remove(AGE);
    out
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Cache<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    ReqBody: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
{
    type Response = Answer<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        Box::pin(async move {
            let verdict = policy::request_verdict(req.method(), req.headers(), &shared.settings);
            let principal = shared
                .settings
                .per_principal
                .then(|| Principal::of(req.extensions()).map(|p| p.subject().to_owned()))
                .flatten();
            let key = match verdict {
                RequestVerdict::Bypass(_) => None,
                _ if shared.settings.per_principal && principal.is_none() => None,
                _ => primary(
                    &shared.rules,
                    req.method(),
                    req.uri(),
                    req.headers(),
                    principal.as_deref(),
                ),
            };
            let Some(key) = key else {
                note(&req, CacheStatus::Bypass, None);
                let response = inner.call(req).await?;
                return Ok(forwarded(
                    &shared,
                    response,
                    verdict.fwd().unwrap_or("bypass"),
                    None,
                ));
            };
            let mut collapsed = false;
            let mut fwd = verdict.fwd().unwrap_or("uri-miss");
            let mut fill = None;
            if verdict == RequestVerdict::Lookup {
                let request_cc = CacheControl::parse(req.headers());
                loop {
                    match lookup(&shared, &key, req.headers()).await {
                        Some((_, Stored::Response(entry))) => {
                            match policy::staleness(
                                entry.stored_at,
                                &entry.freshness,
                                SystemTime::now(),
                                &request_cc,
                            ) {
                                Staleness::Fresh => {
                                    return Ok(serve(&shared, &req, &entry, collapsed));
                                }
                                _ => fwd = "stale",
                            }
                        }
                        Some((_, Stored::Pass)) => {
                            // Known uncacheable: straight to the origin, no queue.
                            note(&req, CacheStatus::Bypass, None);
                            let response = inner.call(req).await?;
                            return Ok(forwarded(&shared, response, "uri-miss", None));
                        }
                        _ => {}
                    }
                    if collapsed {
                        // Woken, and still nothing usable: go to the origin ourselves.
                        break;
                    }
                    match claim(&shared, &key) {
                        Role::Leader(guard) => {
                            fill = Some(guard);
                            break;
                        }
                        Role::Waiter(mut rx) => {
                            let _ = tokio::time::timeout(shared.wait, rx.changed()).await;
                            collapsed = true;
                        }
                    }
                }
            }
            note(&req, CacheStatus::Miss, None);
            let method = req.method().clone();
            let req_headers = req.headers().clone();
            let response = inner.call(req).await?;
            let now = SystemTime::now();
            let decision = policy::storable(
                &method,
                &req_headers,
                response.status(),
                response.headers(),
                &shared.settings,
                now,
            );
            let vary = policy::vary(response.headers());
            let (freshness, vary) = match (decision, vary) {
                (Storable::Yes(freshness), Ok(vary)) => (freshness, vary),
                _ => {
                    if method == Method::GET {
                        let store = shared.store.clone();
                        let pass_key = key.clone();
                        let ttl = shared.pass_for;
                        tokio::spawn(async move {
                            let _ = store.put(pass_key, Stored::Pass, ttl).await;
                        });
                    }
                    drop(fill);
                    return Ok(forwarded(&shared, response, fwd, None));
                }
            };
            let store_key: Key = if vary.is_empty() {
                key.clone()
            } else {
                let names: Arc<[HeaderName]> = vary.clone().into();
                let _ = shared
                    .store
                    .put(key.clone(), Stored::Vary(names), freshness.retain())
                    .await;
                variant(&key, &vary, &req_headers)
            };
            let mut headers = stored_headers(response.headers());
            let capture = Box::new(Capture {
                shared: shared.clone(),
                key: store_key,
                status: response.status(),
                headers: std::mem::take(&mut headers),
                freshness,
                buf: BytesMut::new(),
                fill,
            });
            Ok(forwarded(&shared, response, fwd, Some(capture)))
        })
    }
}
