//! The cache service: lookup, single-flight fill, serving stored responses.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{AGE, CONTENT_LENGTH, ETAG, LAST_MODIFIED, SET_COOKIE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::sync::watch;
use tower_service::Service;

use super::body::{CacheBody, Capture, CaptureBody};
use super::future::ResponseFuture;
use super::key::{Key, KeyRules, primary, variant};
use super::policy::{
    self, CacheControl, Present, RequestVerdict, Settings, Staleness, Storable, cache_status,
};
use super::store::{Entry, Hit, Store, Stored};
use crate::annotate::{Annotation, CacheNote, CacheStatus};
use crate::body::ResponseBody;
use crate::principal::Principal;

/// `Cache-Status` header name (RFC 9211).
pub(crate) const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

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
    pub(crate) origin_timeout: Option<Duration>,
    pub(crate) clock: Arc<dyn Fn() -> SystemTime + Send + Sync>,
    fills: Mutex<HashMap<Key, watch::Receiver<Delivered>>>,
    /// Purge tag versions: purging a tag moves its version on, which every entry stored
    /// with the old version sees on lookup. O(1) per purge, whatever the number of entries.
    pub(crate) tag_versions: super::store::TagVersions,
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
            origin_timeout: None,
            clock: Arc::new(SystemTime::now),
            fills: Mutex::new(HashMap::new()),
            tag_versions: Default::default(),
        }
    }
}

/// How many tag versions a process keeps for a shared store before it starts over.
const MAX_KNOWN_TAGS: usize = 100_000;

/// Response headers that name purge tags; they never leave the cache.
const TAG_HEADERS: [&str; 2] = ["surrogate-key", "cache-tag"];

impl Shared {
    /// The tags a response names (`Surrogate-Key` is space-separated, `Cache-Tag`
    /// comma-separated), at most 64.
    fn tag_names(headers: &HeaderMap) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for (i, name) in TAG_HEADERS.iter().enumerate() {
            for value in headers.get_all(*name) {
                let Ok(text) = value.to_str() else { continue };
                let parts: Vec<&str> = if i == 0 {
                    text.split_ascii_whitespace().collect()
                } else {
                    text.split(',').map(str::trim).collect()
                };
                // A tag over 256 bytes is not a tag (and would not fit the store's frame).
                for tag in parts
                    .into_iter()
                    .filter(|t| !t.is_empty() && t.len() <= 256)
                {
                    if out.len() < 64 && !out.iter().any(|t| t == tag) {
                        out.push(tag.to_owned());
                    }
                }
            }
        }
        out
    }

    /// The tags of a response with their current versions (learnt from a shared store
    /// first, when this process does not know them yet).
    async fn tags(&self, headers: &HeaderMap) -> Vec<(String, u64)> {
        let names = Self::tag_names(headers);
        if names.is_empty() {
            return Vec::new();
        }
        // Could not be read: version 0, which other replicas take for purged if the tag
        // was purged (a miss for them, never a stale hit).
        let _ = self.learn_tags(&names).await;
        let versions = self.tag_versions.lock().unwrap_or_else(|e| e.into_inner());
        names
            .into_iter()
            .map(|tag| {
                let v = versions.get(&tag).copied().unwrap_or(0);
                (tag, v)
            })
            .collect()
    }

    /// Reads from a shared store the versions of the `tags` this process does not know yet
    /// (it learns a version when it first meets a tag, and from purge messages after that).
    /// False when they could not be read.
    async fn learn_tags(&self, tags: &[String]) -> bool {
        let unknown: Vec<String> = {
            let versions = self.tag_versions.lock().unwrap_or_else(|e| e.into_inner());
            tags.iter()
                .filter(|t| !versions.contains_key(t.as_str()))
                .cloned()
                .collect()
        };
        if unknown.is_empty() {
            return true;
        }
        let Some(read) = self.store.tag_versions(&unknown) else {
            return true;
        };
        let Ok(Ok(found)) = tokio::time::timeout(self.store_timeout * 2, read).await else {
            return false;
        };
        let mut versions = self.tag_versions.lock().unwrap_or_else(|e| e.into_inner());
        if versions.len() + unknown.len() > MAX_KNOWN_TAGS {
            // Bounded: forgotten versions are read again when needed.
            versions.clear();
        }
        for (tag, version) in unknown.into_iter().zip(found) {
            let current = versions.entry(tag).or_insert(0);
            *current = (*current).max(version);
        }
        true
    }

    /// Whether `entry` was stored before a purge of one of its tags; `None` when a tag's
    /// version is not known here yet (a shared store's: [`Shared::purged`] reads it).
    fn purged_now(&self, entry: &Entry) -> Option<bool> {
        if entry.tags.is_empty() {
            return Some(false);
        }
        let local = !self.store.shared();
        let versions = self.tag_versions.lock().unwrap_or_else(|e| e.into_inner());
        let mut purged = false;
        for (tag, v) in entry.tags.iter() {
            match versions.get(tag) {
                Some(current) => purged |= current != v,
                None if local => purged |= *v != 0,
                None => return None,
            }
        }
        Some(purged)
    }

    /// [`Shared::purged_now`], reading unknown tag versions from the shared store; an entry
    /// whose versions cannot be read counts as purged.
    async fn purged(&self, entry: &Entry) -> bool {
        if let Some(purged) = self.purged_now(entry) {
            return purged;
        }
        let names: Vec<String> = entry.tags.iter().map(|(t, _)| t.clone()).collect();
        if !self.learn_tags(&names).await {
            return true;
        }
        self.purged_now(entry).unwrap_or(true)
    }

    /// Purges every entry stored with `tag`: in every replica when the store is shared
    /// (a global version from the store; a local version never runs ahead of it, so an old
    /// entry can never match a newer version), locally otherwise.
    pub(crate) async fn purge_tag(&self, tag: &str) {
        let global = self.store.purge_tag(tag).await;
        let mut versions = self.tag_versions.lock().unwrap_or_else(|e| e.into_inner());
        match global {
            Ok(Some(version)) => {
                let current = versions.entry(tag.to_owned()).or_insert(0);
                *current = (*current).max(version);
            }
            // A store private to this process: the purge is this process's.
            Ok(None) => *versions.entry(tag.to_owned()).or_insert(0) += 1,
            // A shared store that could not be told: the purge did not happen. Running a
            // version of our own ahead of the store's would later match the store's next
            // real version and bring purged entries back; the tag's version is forgotten
            // instead, so this process reads it again (and, until it can, serves none of
            // the tag's entries).
            Err(error) => {
                tracing::warn!(%error, tag, "battlement::cache: a tag purge could not reach the shared store");
                versions.remove(tag);
            }
        }
    }
}

/// Held by the one request filling a key; dropping it (stored, abandoned, or the client
/// gone) wakes every request waiting for that key.
pub(crate) struct FillGuard {
    shared: Arc<Shared>,
    key: Key,
    done: watch::Sender<Delivered>,
    /// The fill was also claimed in a shared store (other replicas wait for it).
    claimed_in_store: bool,
    /// What this fill's claim holds in a shared store: its release removes the claim only
    /// if it is still this one (a claim that lapsed may have been taken by another replica).
    token: u64,
}

/// The entry a fill stored, handed to the requests of this process waiting for it, so that
/// they do not all read it back from a shared store at once (a burst that a slow store
/// answers with timeouts, and those requests would then go to the origin).
pub(crate) type Delivered = Option<Arc<Entry>>;

impl FillGuard {
    /// Hands `entry`, which the store now holds, to the requests waiting on this fill.
    pub(crate) fn deliver(&self, entry: &Arc<Entry>) {
        self.done.send_replace(Some(entry.clone()));
    }
}

impl Drop for FillGuard {
    fn drop(&mut self) {
        self.shared
            .fills
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
        if self.claimed_in_store
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            let store = self.shared.store.clone();
            let key = self.key.clone();
            let token = self.token;
            handle.spawn(async move {
                let _ = store.release_fill(&key, token).await;
            });
        }
    }
}

enum Role {
    Leader(FillGuard),
    Waiter(watch::Receiver<Delivered>),
}

fn claim(shared: &Arc<Shared>, key: &Key) -> Role {
    let mut fills = shared.fills.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(rx) = fills.get(key) {
        return Role::Waiter(rx.clone());
    }
    let (tx, rx) = watch::channel(None);
    fills.insert(key.clone(), rx);
    Role::Leader(FillGuard {
        shared: shared.clone(),
        key: key.clone(),
        done: tx,
        claimed_in_store: false,
        token: new_generation(),
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

type Answer<B> = Response<ResponseBody<CacheBody<B>>>;

async fn get(shared: &Shared, key: &[u8]) -> Option<Stored> {
    // A store that answers at once (memory) needs no timer.
    if let Some(found) = shared.store.get_now(key) {
        return found;
    }
    match tokio::time::timeout(shared.store_timeout, shared.store.get(key)).await {
        Ok(Ok(found)) => found,
        // A slow or failing store is a miss: the origin answers.
        _ => None,
    }
}

async fn lookup(shared: &Shared, key: &[u8], headers: &HeaderMap) -> Option<Stored> {
    match get(shared, key).await? {
        Stored::Vary(names, generation) => {
            get(shared, &variant(key, &names, generation, headers)).await
        }
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
fn serve<B, R: Body>(
    shared: &Shared,
    req: &Request<B>,
    entry: &Entry,
    collapsed: bool,
    fwd: Option<&str>,
) -> Answer<R> {
    serve_at(shared, req, entry, collapsed, fwd, (shared.clock)())
}

fn serve_at<B, R: Body>(
    shared: &Shared,
    req: &Request<B>,
    entry: &Entry,
    collapsed: bool,
    fwd: Option<&str>,
    now: SystemTime,
) -> Answer<R> {
    let since = policy::age(entry.stored_at, now);
    let ttl = entry.freshness.ttl(entry.stored_at, now);
    let plain = fwd.is_none() && !collapsed;
    let hit = match plain.then(|| entry.last_hit.get(since, ttl)).flatten() {
        Some(hit) => hit,
        None => {
            let age = policy::age_header(&entry.headers).unwrap_or(0) + since;
            let hit = Hit {
                since,
                ttl,
                age,
                age_value: HeaderValue::from(age),
                status_value: cache_status(&shared.name, true, fwd, false, collapsed, Some(ttl)),
            };
            if plain {
                entry.last_hit.set(hit.clone());
            }
            hit
        }
    };
    let age = hit.age;
    // Preconditions apply to a 2xx answer only (RFC 9110 §13.2.1): a stored 404 or 301 is
    // served as it is, never as `304`.
    let not_modified = entry.status.is_success()
        && policy::not_modified(
            req.headers(),
            entry.headers.get(ETAG),
            entry.headers.get(LAST_MODIFIED),
        );
    let mut headers = entry.headers.clone();
    headers.insert(AGE, hit.age_value);
    headers.insert(CACHE_STATUS, hit.status_value);
    let status = if fwd == Some("stale") {
        CacheStatus::Stale
    } else if collapsed {
        CacheStatus::Collapsed
    } else {
        CacheStatus::Hit
    };
    note(req, status, Some(age));
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

fn forwarded<R: Body>(
    shared: &Shared,
    response: Response<R>,
    fwd: &str,
    capture: Option<Box<Capture>>,
) -> Answer<R> {
    let stored = capture.is_some();
    let (mut parts, body) = response.into_parts();
    for name in TAG_HEADERS {
        parts.headers.remove(name);
    }
    parts.headers.insert(
        CACHE_STATUS,
        cache_status(&shared.name, false, Some(fwd), stored, false, None),
    );
    Response::from_parts(
        parts,
        ResponseBody::inner(CacheBody::capture(CaptureBody::new(body, capture))),
    )
}

/// The headers kept with a stored response.
///
/// They also hold `Age` (the origin's, or 0) and a `Cache-Status` placeholder: serving a hit
/// then replaces two values in place instead of growing a copied map.
fn stored_headers(headers: &HeaderMap) -> HeaderMap {
    let upstream_age = policy::age_header(headers).unwrap_or(0);
    let mut out = headers.clone();
    for name in crate::body::HOP_BY_HOP {
        out.remove(name);
    }
    out.remove(SET_COOKIE);
    for name in TAG_HEADERS {
        out.remove(name);
    }
    out.insert(AGE, HeaderValue::from(upstream_age));
    out.insert(CACHE_STATUS, HeaderValue::from_static("battlement"));
    out
}

/// A generation for a new variant list: unique across processes in practice (a per-process
/// random hasher over the clock and a counter).
fn new_generation() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    static SEED: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    let mut hasher = SEED.get_or_init(Default::default).build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    hasher.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    hasher.finish()
}

/// Calls the origin with `req` and wraps the response so that it is stored when its body
/// ends (if it may be), or leaves a pass marker (if it may not).
async fn from_origin<S, ReqBody, ResBody>(
    shared: &Arc<Shared>,
    inner: &mut S,
    req: Request<ReqBody>,
    key: &Key,
    fill: Option<FillGuard>,
    fwd: &str,
    keep_stale: bool,
) -> Result<Answer<ResBody>, S::Error>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes>,
{
    let method = req.method().clone();
    let req_headers = req.headers().clone();
    let response = inner.call(req).await?;
    let decision = policy::storable(
        &method,
        &req_headers,
        response.status(),
        response.headers(),
        &shared.settings,
        (shared.clock)(),
    );
    let vary = policy::vary(response.headers());
    // An event stream never ends: it passes through untouched, never captured.
    let streaming = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if streaming {
        drop(fill);
        return Ok(forwarded(shared, response, fwd, None));
    }
    let (freshness, vary) = match (decision, vary) {
        (Storable::Yes(freshness), Ok(vary)) => (freshness, vary),
        (decision, _) => {
            // A pass marker says "this resource is not cacheable"; a server error says
            // nothing of the kind, and must not replace a stale entry kept for errors. Nor
            // does an answer shaped by this request rather than by the resource: one to a
            // request with credentials, a range (`206`) or a condition (`304`), or a
            // `no-store` request: it would wipe the shared entry others are served.
            let about_the_request = matches!(
                decision,
                Storable::No("credentials" | "request no-store" | "method")
            ) || matches!(
                response.status(),
                StatusCode::PARTIAL_CONTENT | StatusCode::NOT_MODIFIED
            );
            if method == Method::GET
                && !response.status().is_server_error()
                && !keep_stale
                && !about_the_request
            {
                let _ = shared
                    .store
                    .put(key.clone(), Stored::Pass, shared.pass_for)
                    .await;
            }
            drop(fill);
            return Ok(forwarded(shared, response, fwd, None));
        }
    };
    let store_key: Key = if vary.is_empty() {
        key.clone()
    } else {
        let names: Arc<[HeaderName]> = vary.clone().into();
        // The variant list's generation: the current list's when it varies on the same
        // headers, else a new one (the first fill after a purge of the URL starts one).
        let generation = match get(shared, key).await {
            Some(Stored::Vary(current, generation)) if current == names => generation,
            _ => new_generation(),
        };
        let _ = shared
            .store
            .put(
                key.clone(),
                Stored::Vary(names, generation),
                freshness.retain(),
            )
            .await;
        variant(key, &vary, generation, &req_headers)
    };
    let capture = Box::new(Capture {
        shared: shared.clone(),
        key: store_key,
        status: response.status(),
        headers: stored_headers(response.headers()),
        freshness,
        tags: shared.tags(response.headers()).await,
        buf: BytesMut::new(),
        fill,
        declared: crate::body::content_length(response.headers()),
    });
    Ok(forwarded(shared, response, fwd, Some(capture)))
}

/// A stale entry was served: refresh it once, in the background, from a copy of the
/// request's head (no other request for the key queues behind it).
fn revalidate_in_background<S, ReqBody, ResBody>(
    shared: &Arc<Shared>,
    inner: &S,
    req: &Request<ReqBody>,
    key: &Key,
) where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    ReqBody: Default + Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send,
{
    let Role::Leader(guard) = claim(shared, key) else {
        // Someone is refreshing it already.
        return;
    };
    let mut copy = Request::new(ReqBody::default());
    *copy.method_mut() = Method::GET;
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    // The refresh asks for the whole representation, unconditionally: a `304` or a `206`
    // answered to this client's conditions or range would store nothing, and the entry
    // would stay stale, each stale hit starting another futile refresh.
    for name in [
        http::header::IF_NONE_MATCH,
        http::header::IF_MODIFIED_SINCE,
        http::header::IF_MATCH,
        http::header::IF_UNMODIFIED_SINCE,
        http::header::IF_RANGE,
        http::header::RANGE,
    ] {
        copy.headers_mut().remove(name);
    }
    // What the layers outside put in the extensions (the principal, the peer address) is
    // the handler's to read, in the refresh too; not the client request's annotation,
    // which records what the client got.
    *copy.extensions_mut() = req.extensions().clone();
    copy.extensions_mut().remove::<Annotation>();
    let shared = shared.clone();
    let mut inner = inner.clone();
    let key = key.clone();
    tokio::spawn(async move {
        if std::future::poll_fn(|cx| inner.poll_ready(cx))
            .await
            .is_err()
        {
            return;
        }
        if let Ok(response) =
            from_origin(&shared, &mut inner, copy, &key, Some(guard), "stale", true).await
        {
            // Read the body to its end, which stores it.
            let _ = response.into_body().collect().await;
        }
    });
}

/// What waiting for another replica's fill came to.
enum RemoteFill {
    /// It stored a fresh entry.
    Entry(Arc<Entry>),
    /// It found the resource uncacheable (a pass marker).
    Pass,
    /// It ended without storing anything usable (a server error, an abandoned body, a
    /// crash that let its claim lapse): this request now holds the claim, and fills.
    Claimed,
    /// The wait budget ran out, or the store failed: fill without the claim.
    GaveUp,
}

/// Polls the shared store for the entry another replica is filling, up to the wait budget:
/// first after 2 ms (a fast origin is done by then), then at doubling intervals up to
/// 25 ms, so a slow fill costs the store few reads per waiter. A read that finds nothing
/// usable tries to take the fill claim: once the other fill has ended, this request gets
/// it and goes to the origin at once rather than waiting out its budget.
async fn wait_for_remote_fill(
    shared: &Shared,
    key: &Key,
    headers: &HeaderMap,
    request_cc: &CacheControl,
    token: u64,
) -> RemoteFill {
    let fresh = |stored: Option<Stored>| match stored {
        Some(Stored::Response(entry))
            if policy::staleness(
                entry.stored_at,
                &entry.freshness,
                (shared.clock)(),
                request_cc,
            ) == Staleness::Fresh =>
        {
            Some(RemoteFill::Entry(entry))
        }
        Some(Stored::Pass) => Some(RemoteFill::Pass),
        _ => None,
    };
    let deadline = tokio::time::Instant::now() + shared.wait;
    let mut pause = Duration::from_millis(2);
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(pause.min(deadline - tokio::time::Instant::now())).await;
        pause = (pause * 2).min(Duration::from_millis(25));
        // An entry still there from before a purge of one of its tags is not the fill's.
        let unpurged = async |stored: Option<Stored>| match stored {
            Some(Stored::Response(entry)) if shared.purged(&entry).await => None,
            other => other,
        };
        if let Some(found) = fresh(unpurged(lookup(shared, key, headers).await).await) {
            return found;
        }
        match shared.store.claim_fill(key, shared.wait, token).await {
            Ok(false) => {}
            Ok(true) => {
                // The other fill has ended. What it stored just before its claim went
                // away is read once more; otherwise this request fills.
                if let Some(found) = fresh(unpurged(lookup(shared, key, headers).await).await) {
                    let _ = shared.store.release_fill(key, token).await;
                    return found;
                }
                return RemoteFill::Claimed;
            }
            Err(_) => return RemoteFill::GaveUp,
        }
    }
    RemoteFill::GaveUp
}

/// A fresh entry for `req` from a store that answers without waiting, if there is one.
fn fresh_hit_now<B, R: Body>(shared: &Arc<Shared>, req: &Request<B>) -> Option<Answer<R>> {
    let present = Present::of(req.headers());
    let request_cc = CacheControl::parse_request(req.headers(), present);
    if policy::request_verdict(req.method(), present, &request_cc, &shared.settings)
        != RequestVerdict::Lookup
    {
        return None;
    }
    let principal = if shared.settings.per_principal {
        Some(Principal::of(req.extensions())?.subject().to_owned())
    } else {
        None
    };
    thread_local! {
        // The key of a lookup, built without an allocation per request.
        static KEY: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let found = KEY.with(|buf| {
        let mut key = buf.borrow_mut();
        super::key::primary_into(
            &shared.rules,
            req.method(),
            req.uri(),
            req.headers(),
            principal.as_deref(),
            &mut key,
        )?;
        match shared.store.get_now(&key)?? {
            Stored::Vary(names, generation) => {
                shared
                    .store
                    .get_now(&variant(&key, &names, generation, req.headers()))?
            }
            other => Some(other),
        }
    });
    let entry = match found? {
        Stored::Response(entry) => entry,
        _ => return None,
    };
    if shared.purged_now(&entry) != Some(false) {
        return None;
    }
    let now = (shared.clock)();
    (policy::staleness(entry.stored_at, &entry.freshness, now, &request_cc) == Staleness::Fresh)
        .then(|| serve_at(shared, req, &entry, false, None, now))
}

/// The leader's fill, in a task of its own: the origin's answer is stored however the
/// leader's client behaves, and relayed to it while it listens.
async fn fill_in_task<S, ReqBody, ResBody>(
    shared: Arc<Shared>,
    mut inner: S,
    req: Request<ReqBody>,
    key: Key,
    fill: Option<FillGuard>,
    fwd: &'static str,
) -> Answer<ResBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    ReqBody: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send,
{
    let (head_tx, head_rx) = tokio::sync::oneshot::channel();
    let (frames_tx, frames_rx) = tokio::sync::mpsc::channel(16);
    let task_shared = shared.clone();
    let render = crate::reject::RenderContext::of(&crate::key::RequestHead::of(&req));
    tokio::spawn(async move {
        let answer = from_origin(&task_shared, &mut inner, req, &key, fill, fwd, false).await;
        let Ok(response) = answer else {
            // The inner service failed: the leader answers that itself (see below).
            return;
        };
        let (parts, body) = response.into_parts();
        // Read to the end, or to the last declared byte: a body that has sent them all may
        // never say it has ended, and waiting on it would hold this task for ever.
        let declared = crate::body::content_length(&parts.headers);
        let _ = head_tx.send(parts);
        let mut body = std::pin::pin!(body);
        let mut listening = true;
        let mut sent = 0u64;
        while declared.is_none_or(|n| sent < n)
            && let Some(frame) = body.frame().await
        {
            let failed = frame.is_err();
            if let Ok(data) = frame.as_ref().map(|f| f.data_ref()) {
                sent += data.map_or(0, |d| d.len() as u64);
            }
            if listening && frames_tx.send(frame).await.is_err() {
                // The client went away; keep reading so that the entry is stored.
                listening = false;
            }
            if failed {
                break;
            }
        }
    });
    match head_rx.await {
        Ok(parts) => Response::from_parts(parts, ResponseBody::inner(CacheBody::relay(frames_rx))),
        Err(_) => {
            let rejection = crate::reject::Rejection::new(StatusCode::BAD_GATEWAY, "Bad Gateway")
                .with_detail("The origin failed to answer.");
            render.render(&rejection).map(ResponseBody::full)
        }
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Cache<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Send,
    ReqBody: Default + Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Send,
{
    type Response = Answer<ResBody>;
    type Error = S::Error;
    type Future = ResponseFuture<Self::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        // The common case, a fresh hit in a store that answers at once, needs neither the
        // inner service nor an async state machine.
        if let Some(response) = fresh_hit_now(&self.shared, &req) {
            return ResponseFuture::ready(response);
        }
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let shared = self.shared.clone();
        ResponseFuture::pending(Box::pin(async move {
            let present = Present::of(req.headers());
            let request_cc = CacheControl::parse_request(req.headers(), present);
            let verdict =
                policy::request_verdict(req.method(), present, &request_cc, &shared.settings);
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
                // An unsafe method that succeeds changes its target: what is stored for the
                // URI is forgotten (RFC 9111 §4.4), here and, through a shared store, in
                // every replica.
                let invalidates = matches!(
                    *req.method(),
                    Method::POST | Method::PUT | Method::PATCH | Method::DELETE
                )
                .then(|| {
                    primary(
                        &shared.rules,
                        &Method::GET,
                        req.uri(),
                        req.headers(),
                        principal.as_deref(),
                    )
                })
                .flatten();
                let response = inner.call(req).await?;
                if let Some(target) = invalidates
                    && (response.status().is_success() || response.status().is_redirection())
                {
                    let _ = tokio::time::timeout(
                        shared.store_timeout * 2,
                        shared.store.remove(&target),
                    )
                    .await;
                }
                let fwd = verdict.fwd().unwrap_or("bypass");
                return Ok(forwarded(&shared, response, fwd, None));
            };
            let mut collapsed = false;
            let mut fwd = verdict.fwd().unwrap_or("uri-miss");
            let mut fill = None;
            // A stale entry kept for `stale-if-error`, served if the origin fails.
            let mut fallback: Option<Arc<Entry>> = None;
            if verdict == RequestVerdict::Lookup {
                loop {
                    let found = match lookup(&shared, &key, req.headers()).await {
                        Some(Stored::Response(entry)) if shared.purged(&entry).await => None,
                        found => found,
                    };
                    match found {
                        Some(Stored::Response(entry)) => {
                            let now = (shared.clock)();
                            match policy::staleness(
                                entry.stored_at,
                                &entry.freshness,
                                now,
                                &request_cc,
                            ) {
                                Staleness::Fresh => {
                                    return Ok(serve_at(
                                        &shared, &req, &entry, collapsed, None, now,
                                    ));
                                }
                                Staleness::StaleWhileRevalidate => {
                                    revalidate_in_background(&shared, &inner, &req, &key);
                                    return Ok(serve(
                                        &shared,
                                        &req,
                                        &entry,
                                        collapsed,
                                        Some("stale"),
                                    ));
                                }
                                Staleness::StaleIfError => {
                                    fwd = "stale";
                                    fallback = Some(entry);
                                }
                                Staleness::Expired => fwd = "stale",
                            }
                        }
                        Some(Stored::Pass) => {
                            // Known uncacheable: straight to the origin, no queue.
                            note(&req, CacheStatus::Bypass, None);
                            let response = inner.call(req).await?;
                            return Ok(forwarded(&shared, response, "uri-miss", None));
                        }
                        _ => {}
                    }
                    if request_cc.only_if_cached {
                        // Nothing usable stored, and the client wants nothing else
                        // (RFC 9111 §5.2.1.7).
                        note(&req, CacheStatus::Miss, None);
                        let rejection = crate::reject::Rejection::new(
                            StatusCode::GATEWAY_TIMEOUT,
                            "Gateway Timeout",
                        )
                        .with_detail(
                            "Not in the cache, and the request asked for a stored answer only.",
                        );
                        let response = rejection.render(&crate::key::RequestHead::of(&req));
                        return Ok(response.map(ResponseBody::full));
                    }
                    if collapsed || fallback.is_some() {
                        // Woken and still nothing usable, or a stale entry to fall back on:
                        // go to the origin ourselves.
                        break;
                    }
                    match claim(&shared, &key) {
                        Role::Leader(mut guard) => {
                            if shared.store.shared() {
                                match shared
                                    .store
                                    .claim_fill(&key, shared.wait, guard.token)
                                    .await
                                {
                                    Ok(true) => guard.claimed_in_store = true,
                                    Ok(false) => {
                                        // Another replica is filling: wait for its entry.
                                        let headers = req.headers().clone();
                                        match wait_for_remote_fill(
                                            &shared,
                                            &key,
                                            &headers,
                                            &request_cc,
                                            guard.token,
                                        )
                                        .await
                                        {
                                            RemoteFill::Entry(entry) => {
                                                guard.deliver(&entry);
                                                drop(guard);
                                                return Ok(serve(
                                                    &shared, &req, &entry, true, None,
                                                ));
                                            }
                                            RemoteFill::Pass => {
                                                // Uncacheable: this request and the ones
                                                // queued behind it go straight through.
                                                drop(guard);
                                                note(&req, CacheStatus::Bypass, None);
                                                let response = inner.call(req).await?;
                                                return Ok(forwarded(
                                                    &shared, response, "uri-miss", None,
                                                ));
                                            }
                                            RemoteFill::Claimed => guard.claimed_in_store = true,
                                            RemoteFill::GaveUp => {}
                                        }
                                    }
                                    // The store is down: fill without it.
                                    Err(_) => {}
                                }
                            }
                            fill = Some(guard);
                            break;
                        }
                        Role::Waiter(mut rx) => {
                            let _ = tokio::time::timeout(shared.wait, rx.changed()).await;
                            collapsed = true;
                            // The entry the fill stored, when it has no variants to choose
                            // between; otherwise (or without one) the loop looks it up.
                            let delivered = rx.borrow().clone();
                            if let Some(entry) = delivered
                                && !entry.headers.contains_key(http::header::VARY)
                                && shared.purged_now(&entry) == Some(false)
                            {
                                let now = (shared.clock)();
                                if policy::staleness(
                                    entry.stored_at,
                                    &entry.freshness,
                                    now,
                                    &request_cc,
                                ) == Staleness::Fresh
                                {
                                    return Ok(serve_at(&shared, &req, &entry, true, None, now));
                                }
                            }
                        }
                    }
                }
            }
            note(&req, CacheStatus::Miss, None);
            let Some(stale) = fallback else {
                if fill.is_some() {
                    return Ok(fill_in_task(shared, inner, req, key, fill, fwd).await);
                }
                return from_origin(&shared, &mut inner, req, &key, fill, fwd, false).await;
            };
            // stale-if-error: the origin's 5xx or error is answered with the stale entry.
            // What serving the stale entry needs of the request, kept before it moves on
            // (its annotation too, so the decision is still recorded).
            let mut head = Request::new(());
            *head.method_mut() = req.method().clone();
            *head.uri_mut() = req.uri().clone();
            *head.headers_mut() = req.headers().clone();
            if let Some(annotation) = Annotation::of(req.extensions()) {
                head.extensions_mut().insert(annotation.clone());
            }
            let answer = from_origin(&shared, &mut inner, req, &key, fill, fwd, true);
            let answer = match shared.origin_timeout {
                Some(limit) => tokio::time::timeout(limit, answer).await.ok(),
                None => Some(answer.await),
            };
            match answer {
                Some(Ok(response)) if !response.status().is_server_error() => Ok(response),
                // A 5xx, an error, or no answer in time: the stale entry.
                _ => Ok(serve(&shared, &head, &stale, false, Some("stale"))),
            }
        }))
    }
}
