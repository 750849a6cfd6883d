//! The RFC 9111 rules of a shared cache, as pure functions over `http` types.
//!
//! Nothing here reads the clock, touches a store or awaits: the layer passes the current time
//! in, and decides what to do with the verdicts. The rules are those of a *shared* cache
//! (RFC 9111 §3, §4, §5.2), with RFC 5861 (`stale-while-revalidate`, `stale-if-error`),
//! RFC 8246 (`immutable`), RFC 9110 §13 (conditional requests) and RFC 9211 (`Cache-Status`).
//!
//! Where RFC 9111 leaves room, this module picks the safe reading and says so on the item:
//! responses that must be revalidated on every use (`no-cache`) are not stored at all; the
//! qualified forms `private="field"` and `no-cache="field"` count as the unqualified forms;
//! a request carrying `Authorization` or `Cookie` is not answered from a shared entry; an
//! invalid `Expires` or freshness directive makes the response stale, never heuristically fresh.

// The layer, the service and the stores each use a part of these rules; items that no
// consumer uses yet are still covered by the tests below.
#![cfg_attr(
    not(test),
    allow(dead_code, reason = "pure rules consumed piecewise by the cache layer")
)]

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{
    AGE, AUTHORIZATION, CACHE_CONTROL, COOKIE, DATE, EXPIRES, IF_MODIFIED_SINCE, IF_NONE_MATCH,
    PRAGMA, SET_COOKIE, UPGRADE, VARY,
};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};

/// The largest delta-seconds value kept (RFC 9111 §1.2.2: 2^31); larger values are clamped.
pub(crate) const MAX_DELTA_SECONDS: u64 = 1 << 31;

/// The directives of all `Cache-Control` lines of a request or a response.
///
/// Names are case-insensitive, values may be tokens or quoted strings, unknown directives are
/// ignored. When a directive appears twice, the first occurrence wins (RFC 9111 §4.2.1); a
/// directive whose value is not delta-seconds is absent. Numbers are clamped to
/// [`MAX_DELTA_SECONDS`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct CacheControl {
    /// `no-store`: do not store the request or its response.
    pub(crate) no_store: bool,
    /// `no-cache` (also the qualified `no-cache="field"` form): do not use a stored response
    /// without revalidation. On a request, also set by `Pragma: no-cache` when the request has
    /// no `Cache-Control`.
    pub(crate) no_cache: bool,
    /// `private` (also the qualified `private="field"` form): a shared cache must not store it.
    pub(crate) private: bool,
    /// `public`: a shared cache may store it, even for a request with `Authorization`.
    pub(crate) public: bool,
    /// `must-revalidate`: once stale, never used without revalidation.
    pub(crate) must_revalidate: bool,
    /// `proxy-revalidate`: `must-revalidate` for shared caches.
    pub(crate) proxy_revalidate: bool,
    /// `max-age`: on a response, its freshness lifetime; on a request, the oldest response
    /// the client accepts.
    pub(crate) max_age: Option<u64>,
    /// `s-maxage`: the freshness lifetime for shared caches; overrides `max-age`.
    pub(crate) s_maxage: Option<u64>,
    /// `stale-while-revalidate` (RFC 5861): seconds a stale response may be served while it is
    /// refreshed in the background.
    pub(crate) stale_while_revalidate: Option<u64>,
    /// `stale-if-error` (RFC 5861): seconds a stale response may be served when the origin
    /// fails.
    pub(crate) stale_if_error: Option<u64>,
    /// `only-if-cached` (request): answer from the cache or with `504`.
    pub(crate) only_if_cached: bool,
    /// `max-stale` (request): `Some(None)` accepts a stale response of any staleness,
    /// `Some(Some(n))` one stale by at most `n` seconds.
    pub(crate) max_stale: Option<Option<u64>>,
    /// `min-fresh` (request): the response must stay fresh for at least this many seconds.
    pub(crate) min_fresh: Option<u64>,
    /// `immutable` (RFC 8246): the response will not change while fresh.
    pub(crate) immutable: bool,
    /// A `max-age` or `s-maxage` directive was present with a value that is not delta-seconds.
    /// RFC 9111 §4.2.1 encourages treating such a response as stale, which [`storable`] does.
    pub(crate) invalid_freshness: bool,
}

impl CacheControl {
    /// Parses the `Cache-Control` lines of a request. With no `Cache-Control` line at all,
    /// `Pragma: no-cache` counts as `no-cache` (RFC 9111 §5.4).
    pub(crate) fn parse(headers: &HeaderMap) -> Self {
        Self::parse_request(headers, Present::of(headers))
    }

    /// [`parse`](Self::parse), knowing which of the headers it reads are `present`.
    pub(crate) fn parse_request(headers: &HeaderMap, present: Present) -> Self {
        if !present.cache_control {
            return Self {
                no_cache: present.pragma && pragma_no_cache(headers),
                ..Self::default()
            };
        }
        Self::parse_response(headers)
    }

    /// Parses the `Cache-Control` lines of a response. `Pragma` is ignored: RFC 9111 §5.4
    /// defines it for requests only.
    pub(crate) fn parse_response(headers: &HeaderMap) -> Self {
        let mut cc = Self::default();
        // Outer `Some` = seen, so that the first occurrence wins even when it is malformed.
        let mut max_age: Option<Option<u64>> = None;
        let mut s_maxage: Option<Option<u64>> = None;
        let mut swr: Option<Option<u64>> = None;
        let mut sie: Option<Option<u64>> = None;
        let mut min_fresh: Option<Option<u64>> = None;
        let mut max_stale: Option<Option<Option<u64>>> = None;
        for line in headers.get_all(CACHE_CONTROL) {
            for_each_directive(line.as_bytes(), |name, value| {
                let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
                let number = || value.as_ref().and_then(|v| delta_seconds(v));
                if is("no-store") {
                    cc.no_store = true;
                } else if is("no-cache") {
                    cc.no_cache = true;
                } else if is("private") {
                    cc.private = true;
                } else if is("public") {
                    cc.public = true;
                } else if is("must-revalidate") {
                    cc.must_revalidate = true;
                } else if is("proxy-revalidate") {
                    cc.proxy_revalidate = true;
                } else if is("only-if-cached") {
                    cc.only_if_cached = true;
                } else if is("immutable") {
                    cc.immutable = true;
                } else if is("max-age") {
                    max_age.get_or_insert_with(number);
                } else if is("s-maxage") {
                    s_maxage.get_or_insert_with(number);
                } else if is("stale-while-revalidate") {
                    swr.get_or_insert_with(number);
                } else if is("stale-if-error") {
                    sie.get_or_insert_with(number);
                } else if is("min-fresh") {
                    min_fresh.get_or_insert_with(number);
                } else if is("max-stale") {
                    max_stale.get_or_insert_with(|| match &value {
                        None => Some(None),
                        Some(v) => delta_seconds(v).map(Some),
                    });
                }
            });
        }
        cc.invalid_freshness = matches!(max_age, Some(None)) || matches!(s_maxage, Some(None));
        cc.max_age = max_age.flatten();
        cc.s_maxage = s_maxage.flatten();
        cc.stale_while_revalidate = swr.flatten();
        cc.stale_if_error = sie.flatten();
        cc.min_fresh = min_fresh.flatten();
        cc.max_stale = max_stale.flatten();
        cc
    }
}

/// Whether any `Pragma` line lists `no-cache`.
fn pragma_no_cache(headers: &HeaderMap) -> bool {
    headers.get_all(PRAGMA).iter().any(|line| {
        line.as_bytes()
            .split(|&b| b == b',')
            .any(|member| trim_ows(member).eq_ignore_ascii_case(b"no-cache"))
    })
}

/// Calls `f(name, value)` for each directive of one `Cache-Control` line. `value` is `None`
/// for a bare directive, and an empty slice (never a valid number) when the value is malformed
/// (an unterminated quoted string, or trailing garbage before the next comma).
fn for_each_directive(line: &[u8], mut f: impl FnMut(&[u8], Option<Cow<'_, [u8]>>)) {
    let n = line.len();
    let mut i = 0;
    loop {
        while i < n && matches!(line[i], b',' | b' ' | b'\t') {
            i += 1;
        }
        if i >= n {
            return;
        }
        let start = i;
        while i < n && !matches!(line[i], b'=' | b',' | b' ' | b'\t') {
            i += 1;
        }
        let name = &line[start..i];
        i = skip_ows(line, i);
        let mut value = None;
        if i < n && line[i] == b'=' {
            i = skip_ows(line, i + 1);
            if i < n && line[i] == b'"' {
                let (quoted, next) = quoted_string(line, i);
                value = Some(quoted.unwrap_or(Cow::Borrowed(&[][..])));
                i = next;
            } else {
                let vstart = i;
                while i < n && !matches!(line[i], b',' | b' ' | b'\t') {
                    i += 1;
                }
                value = Some(Cow::Borrowed(&line[vstart..i]));
            }
        }
        i = skip_ows(line, i);
        if i < n && line[i] != b',' {
            // Garbage after the directive: its value is malformed; resync on the next comma
            // outside a quoted string.
            if value.is_some() {
                value = Some(Cow::Borrowed(&[][..]));
            }
            while i < n && line[i] != b',' {
                if line[i] == b'"' {
                    i = quoted_string(line, i).1;
                } else {
                    i += 1;
                }
            }
        }
        f(name, value);
    }
}

/// Reads the quoted string starting at `line[start] == b'"'`. Returns its unescaped content
/// (`None` when unterminated) and the index just past it.
fn quoted_string(line: &[u8], start: usize) -> (Option<Cow<'_, [u8]>>, usize) {
    let mut i = start + 1;
    let mut owned: Option<Vec<u8>> = None;
    while i < line.len() {
        match line[i] {
            b'"' => {
                let value = match owned {
                    Some(v) => Cow::Owned(v),
                    None => Cow::Borrowed(&line[start + 1..i]),
                };
                return (Some(value), i + 1);
            }
            b'\\' if i + 1 < line.len() => {
                owned
                    .get_or_insert_with(|| line[start + 1..i].to_vec())
                    .push(line[i + 1]);
                i += 2;
            }
            c => {
                if let Some(v) = owned.as_mut() {
                    v.push(c);
                }
                i += 1;
            }
        }
    }
    (None, line.len())
}

fn skip_ows(line: &[u8], mut i: usize) -> usize {
    while i < line.len() && matches!(line[i], b' ' | b'\t') {
        i += 1;
    }
    i
}

fn trim_ows(mut b: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = b {
        b = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = b {
        b = rest;
    }
    b
}

/// `delta-seconds` (RFC 9111 §1.2.2): one or more digits, clamped to [`MAX_DELTA_SECONDS`].
fn delta_seconds(value: &[u8]) -> Option<u64> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut n: u64 = 0;
    for &d in value {
        n = (n * 10 + u64::from(d - b'0')).min(MAX_DELTA_SECONDS);
    }
    Some(n)
}

/// What the route lets the cache do, as far as these rules are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Settings {
    /// Freshness lifetime for responses without explicit freshness (`s-maxage`, `max-age`,
    /// `Expires`); `None` stores only responses that state their own.
    pub(crate) default_ttl: Option<Duration>,
    /// The route opted into a per-principal key scope: entries are keyed by who asked, so
    /// requests with credentials may be looked up and `private` responses may be stored.
    pub(crate) per_principal: bool,
    /// Upper bound of any freshness lifetime, and of the stale windows.
    pub(crate) max_ttl: Duration,
}

/// What the cache may do with a request before it reaches the origin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RequestVerdict {
    /// Look the request up: serve a usable entry, else forward it and store the response if
    /// [`storable`] allows.
    Lookup,
    /// The client asked for an end-to-end reload (request `no-cache`, `max-age=0`, or
    /// `Pragma: no-cache`): do not serve a stored response without revalidating it; forward
    /// (conditionally, with the stored validators, if the layer wants) and store the response
    /// if [`storable`] allows.
    Refresh,
    /// The request carries `Authorization` or `Cookie` and the route's key scope is shared:
    /// do not look up, because what the origin answers this caller may differ from the shared
    /// entry; forward, and store the response only if [`storable`] allows it (which, for such
    /// a request, requires `public` or `s-maxage`, RFC 9111 §3.5).
    Credentialed,
    /// Neither look up nor store; the reason is for logs (`"method"`, `"no-store"`,
    /// `"upgrade"`).
    Bypass(&'static str),
}

impl RequestVerdict {
    /// The RFC 9211 `fwd` parameter this verdict implies, if it alone decides it (a
    /// [`RequestVerdict::Lookup`] forwards for `uri-miss`, `vary-miss` or `stale`, which the
    /// lookup decides).
    pub(crate) fn fwd(&self) -> Option<&'static str> {
        match self {
            Self::Lookup => None,
            Self::Refresh => Some("request"),
            Self::Credentialed => Some("bypass"),
            Self::Bypass("method") => Some("method"),
            Self::Bypass(_) => Some("bypass"),
        }
    }
}

/// Decides whether a request may be answered from the cache.
///
/// Only `GET` and `HEAD` are looked up (a `HEAD` is answered from the `GET` entry). A request
/// with `Upgrade` (a WebSocket handshake) is never answered from the cache. Request `no-store`
/// bypasses; `no-cache` or `max-age=0` refreshes. A request with `Authorization` or `Cookie`
/// is looked up only on a per-principal route (as Varnish's built-in policy does for both
/// headers; RFC 9111 §3.5 names `Authorization` only, `Cookie` is the same risk).
pub(crate) fn request_verdict(
    method: &Method,
    present: Present,
    cc: &CacheControl,
    settings: &Settings,
) -> RequestVerdict {
    if method != Method::GET && method != Method::HEAD {
        return RequestVerdict::Bypass("method");
    }
    if present.upgrade {
        return RequestVerdict::Bypass("upgrade");
    }
    if cc.no_store {
        return RequestVerdict::Bypass("no-store");
    }
    if present.credentials && !settings.per_principal {
        return RequestVerdict::Credentialed;
    }
    if cc.no_cache || cc.max_age == Some(0) {
        return RequestVerdict::Refresh;
    }
    RequestVerdict::Lookup
}

/// Which of the request headers the cache decides on are there, found in one pass over
/// the names of a request's handful of headers (cheaper than a lookup for each).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Present {
    upgrade: bool,
    credentials: bool,
    cache_control: bool,
    pragma: bool,
}

impl Present {
    pub(crate) fn of(headers: &HeaderMap) -> Self {
        if headers.keys_len() > 16 {
            return Self {
                upgrade: headers.contains_key(UPGRADE),
                credentials: has_credentials(headers),
                cache_control: headers.contains_key(CACHE_CONTROL),
                pragma: headers.contains_key(PRAGMA),
            };
        }
        let mut present = Self::default();
        for name in headers.keys() {
            if *name == CACHE_CONTROL {
                present.cache_control = true;
            } else if *name == PRAGMA {
                present.pragma = true;
            } else if *name == AUTHORIZATION || *name == COOKIE {
                present.credentials = true;
            } else if *name == UPGRADE {
                present.upgrade = true;
            }
        }
        present
    }
}

fn has_credentials(headers: &HeaderMap) -> bool {
    headers.contains_key(AUTHORIZATION) || headers.contains_key(COOKIE)
}

/// How long a stored response may be used, decided when it is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Freshness {
    /// How long after storing the response is fresh (upstream `Age` already subtracted,
    /// capped at [`Settings::max_ttl`]).
    pub(crate) lifetime: Duration,
    /// How long after going stale it may be served while a background refresh runs
    /// (zero under `must-revalidate` / `proxy-revalidate`).
    pub(crate) stale_while_revalidate: Duration,
    /// How long after going stale it may be served when the origin fails (zero under
    /// `must-revalidate` / `proxy-revalidate`).
    pub(crate) stale_if_error: Duration,
    /// Once stale it must be revalidated: no request `max-stale` lets it be served as is
    /// (`must-revalidate`, `proxy-revalidate`, or `s-maxage`, which implies
    /// `proxy-revalidate`, RFC 9111 §5.2.2.10).
    pub(crate) must_revalidate: bool,
}

impl Freshness {
    /// How long the store should keep the entry: the lifetime plus the longer stale window.
    pub(crate) fn retain(&self) -> Duration {
        self.lifetime
            .saturating_add(self.stale_while_revalidate.max(self.stale_if_error))
    }

    /// Seconds of freshness left at `now` (negative once stale): the RFC 9211 `ttl`.
    pub(crate) fn ttl(&self, stored_at: SystemTime, now: SystemTime) -> i64 {
        let age = now.duration_since(stored_at).unwrap_or_default();
        let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        if age <= self.lifetime {
            secs(self.lifetime - age)
        } else {
            // Stale by a fraction of a second already counts as -1, not 0.
            let over = age - self.lifetime;
            let whole = secs(over) + i64::from(over.subsec_nanos() > 0);
            -whole
        }
    }
}

/// Whether a response may be stored, and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Storable {
    /// Not stored; the reason is for logs.
    No(&'static str),
    /// Stored, with this freshness.
    Yes(Freshness),
}

/// The status codes RFC 9110 §15.1 makes heuristically cacheable, without `206` (partial
/// content is never stored: the layer caches whole representations only).
const CACHEABLE_STATUS: [u16; 11] = [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501];

/// Decides whether a response may be stored by a shared cache, and computes its freshness.
///
/// - Only responses to `GET` (a `HEAD` response has no body to store) with a heuristically
///   cacheable status (RFC 9110 §15.1, without `206`). A request `no-store` forbids storing.
/// - Never: response `no-store`; `private` unless the route is per-principal; `no-cache`
///   (a simplification: RFC 9111 allows storing it if every use is revalidated, which for an
///   in-process cache saves little over forwarding); any `Set-Cookie`, even with `public`;
///   `Vary: *` or an invalid `Vary`; an invalid `max-age` / `s-maxage` value (RFC 9111
///   §4.2.1: treat as stale).
/// - A request with `Authorization` or `Cookie` on a shared-scope route: only with `public`
///   or `s-maxage` (RFC 9111 §3.5; `must-revalidate`, which §3.5 also accepts, is not enough
///   here, because applications send it on personal responses to mean "never stale").
/// - Lifetime: `s-maxage`, else `max-age`, else `Expires - Date` (`Date` missing or invalid:
///   `now`), else `default_ttl`, else not stored. An invalid `Expires` (such as `0`) means
///   already expired (RFC 9111 §5.3) and `default_ttl` does not apply, since heuristic
///   freshness is only for responses without explicit expiration (§4.2.2). An upstream `Age`
///   is subtracted, the result is capped at `max_ttl`, and a zero lifetime is not stored.
///   The apparent age (`now - Date`) is not used: the origin usually runs in-process and
///   sets no `Date`, and a proxied origin's clock skew would otherwise shorten every entry.
pub(crate) fn storable(
    req_method: &Method,
    req_headers: &HeaderMap,
    status: StatusCode,
    resp_headers: &HeaderMap,
    settings: &Settings,
    now: SystemTime,
) -> Storable {
    if req_method != Method::GET {
        return Storable::No("method");
    }
    if !CACHEABLE_STATUS.contains(&status.as_u16()) {
        return Storable::No("status");
    }
    if CacheControl::parse(req_headers).no_store {
        return Storable::No("request no-store");
    }
    let cc = CacheControl::parse_response(resp_headers);
    if cc.no_store {
        return Storable::No("no-store");
    }
    if cc.private && !settings.per_principal {
        return Storable::No("private");
    }
    if cc.no_cache {
        return Storable::No("no-cache");
    }
    if resp_headers.contains_key(SET_COOKIE) {
        return Storable::No("set-cookie");
    }
    if vary(resp_headers).is_err() {
        return Storable::No("vary");
    }
    if has_credentials(req_headers)
        && !settings.per_principal
        && !cc.public
        && cc.s_maxage.is_none()
    {
        return Storable::No("credentials");
    }
    if cc.invalid_freshness {
        return Storable::No("invalid freshness");
    }

    let lifetime = if let Some(secs) = cc.s_maxage.or(cc.max_age) {
        Duration::from_secs(secs)
    } else if let Some(expires) = resp_headers.get(EXPIRES) {
        let Some(expires) = parse_http_date(expires.as_bytes()) else {
            return Storable::No("expired");
        };
        let date = resp_headers
            .get(DATE)
            .and_then(|d| parse_http_date(d.as_bytes()))
            .unwrap_or(now);
        expires.duration_since(date).unwrap_or_default()
    } else if let Some(ttl) = settings.default_ttl {
        ttl
    } else {
        return Storable::No("no explicit freshness");
    };
    let upstream_age = age_header(resp_headers).unwrap_or(0);
    let lifetime = lifetime
        .saturating_sub(Duration::from_secs(upstream_age))
        .min(settings.max_ttl);
    if lifetime.is_zero() {
        return Storable::No("expired");
    }

    let revalidate = cc.must_revalidate || cc.proxy_revalidate;
    let window = |secs: Option<u64>| {
        if revalidate {
            Duration::ZERO
        } else {
            Duration::from_secs(secs.unwrap_or(0)).min(settings.max_ttl)
        }
    };
    Storable::Yes(Freshness {
        lifetime,
        stale_while_revalidate: window(cc.stale_while_revalidate),
        stale_if_error: window(cc.stale_if_error),
        // s-maxage implies proxy-revalidate (RFC 9111 §5.2.2.10), which blocks max-stale; it
        // does not clear explicit stale-* windows sent beside it (`s-maxage=1,
        // stale-while-revalidate=59` is the common CDN idiom, and CDNs honour it).
        must_revalidate: revalidate || cc.s_maxage.is_some(),
    })
}

/// The `Age` a response arrived with (RFC 9111 §5.1: the first member of the first line;
/// an invalid value is ignored).
pub(crate) fn age_header(headers: &HeaderMap) -> Option<u64> {
    let line = headers.get(AGE)?.as_bytes();
    let first = line.split(|&b| b == b',').next().unwrap_or_default();
    delta_seconds(trim_ows(first))
}

/// The header names listed in all `Vary` lines: lowercase, sorted, deduplicated.
///
/// `Err` for `Vary: *` (the response varies on things outside the request, so it can never
/// be reused) or for a member that is not a valid header name.
#[allow(
    clippy::result_unit_err,
    reason = "the only failure is 'cannot be cached'"
)]
pub(crate) fn vary(resp_headers: &HeaderMap) -> Result<Vec<HeaderName>, ()> {
    let mut names = Vec::new();
    for line in resp_headers.get_all(VARY) {
        for member in line.as_bytes().split(|&b| b == b',') {
            let member = trim_ows(member);
            if member.is_empty() {
                continue;
            }
            if member == b"*" {
                return Err(());
            }
            // from_bytes lowercases.
            names.push(HeaderName::from_bytes(member).map_err(|_| ())?);
        }
    }
    names.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    Ok(names)
}

/// How usable a stored response is for a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Staleness {
    /// Serve it as is: fresh and acceptable to the request, or stale within the request's
    /// `max-stale`.
    Fresh,
    /// Stale, but within `stale-while-revalidate`: serve it and refresh in the background.
    StaleWhileRevalidate,
    /// Not usable as is, but within `stale-if-error`: forward, and serve it if the origin
    /// fails (a `5xx`, or no answer).
    StaleIfError,
    /// Forward; the entry is of no further use unless revalidation confirms it.
    Expired,
}

/// Decides how a stored response may be used at `now` for a request with these directives.
///
/// - Fresh when its age is below the lifetime, at most the request `max-age`, and leaves at
///   least the request `min-fresh`.
/// - Stale within the request `max-stale` (any staleness when it has no value): served as is,
///   unless the response must be revalidated.
/// - Stale within `stale-while-revalidate`: served while refreshing, unless the request set a
///   `max-age` that the entry exceeds or a `min-fresh` it cannot meet (the client asked for
///   something fresher, so it should wait for it).
/// - Otherwise, still fresh but refused by the request's own limits, or within
///   `stale-if-error` of going stale: kept as the fallback for an origin failure.
pub(crate) fn staleness(
    stored_at: SystemTime,
    freshness: &Freshness,
    now: SystemTime,
    request: &CacheControl,
) -> Staleness {
    // A clock that went backwards makes the entry brand new, not negative-aged.
    let age = now.duration_since(stored_at).unwrap_or_default();
    let within_request_max_age = request.max_age.is_none_or(|m| age.as_secs() <= m);
    let error_fallback = if age < freshness.lifetime.saturating_add(freshness.stale_if_error) {
        Staleness::StaleIfError
    } else {
        Staleness::Expired
    };
    if !within_request_max_age {
        return error_fallback;
    }
    if age < freshness.lifetime {
        let left = freshness.lifetime - age;
        return match request.min_fresh {
            Some(min) if left < Duration::from_secs(min) => error_fallback,
            _ => Staleness::Fresh,
        };
    }
    let stale_by = age - freshness.lifetime;
    if !freshness.must_revalidate
        && let Some(max_stale) = request.max_stale
        && max_stale.is_none_or(|s| stale_by <= Duration::from_secs(s))
    {
        return Staleness::Fresh;
    }
    if request.min_fresh.is_none() && stale_by < freshness.stale_while_revalidate {
        return Staleness::StaleWhileRevalidate;
    }
    error_fallback
}

/// Whole seconds the entry has been stored at `now` (rounded down, zero if the clock went
/// backwards, clamped to [`MAX_DELTA_SECONDS`]). The `Age` header to send is this plus the
/// stored response's own [`age_header`], since [`storable`] subtracted that from the
/// lifetime.
pub(crate) fn age(stored_at: SystemTime, now: SystemTime) -> u64 {
    now.duration_since(stored_at)
        .unwrap_or_default()
        .as_secs()
        .min(MAX_DELTA_SECONDS)
}

/// Whether a conditional `GET` / `HEAD` can be answered `304 Not Modified` from a stored
/// response with these validators (RFC 9110 §13.1.2, §13.1.3, §13.2.2).
///
/// `If-None-Match` takes precedence: when present, `If-Modified-Since` is ignored. It matches
/// `*` (the cache holds a representation) or any listed entity-tag equal to `etag` under the
/// weak comparison; a malformed list matches nothing. Otherwise `If-Modified-Since` (one
/// line, a valid HTTP-date) matches when the stored `Last-Modified` is not later. Without a
/// usable validator the answer is `false`: a full response is always correct.
pub(crate) fn not_modified(
    req_headers: &HeaderMap,
    etag: Option<&HeaderValue>,
    last_modified: Option<&HeaderValue>,
) -> bool {
    if req_headers.contains_key(IF_NONE_MATCH) {
        let stored = etag.and_then(|e| single_entity_tag(e.as_bytes()));
        return req_headers
            .get_all(IF_NONE_MATCH)
            .iter()
            .any(|line| if_none_match_line(line.as_bytes(), stored));
    }
    let mut ims = req_headers.get_all(IF_MODIFIED_SINCE).iter();
    let (Some(since), None) = (ims.next(), ims.next()) else {
        return false;
    };
    let (Some(since), Some(modified)) = (
        parse_http_date(since.as_bytes()),
        last_modified.and_then(|lm| parse_http_date(lm.as_bytes())),
    ) else {
        return false;
    };
    modified <= since
}

/// Whether one `If-None-Match` line matches the stored opaque tag (weak comparison).
fn if_none_match_line(line: &[u8], stored: Option<&[u8]>) -> bool {
    if trim_ows(line) == b"*" {
        return true;
    }
    // The whole line is parsed before answering: a malformed list matches nothing.
    let mut matched = false;
    let mut i = 0;
    loop {
        while i < line.len() && matches!(line[i], b',' | b' ' | b'\t') {
            i += 1;
        }
        if i >= line.len() {
            return matched;
        }
        let Some((opaque, next)) = entity_tag(line, i) else {
            return false;
        };
        matched |= stored == Some(opaque);
        i = skip_ows(line, next);
        if i < line.len() && line[i] != b',' {
            return false;
        }
    }
}

/// Parses an entity-tag (`"xyz"` or `W/"xyz"`) starting at `line[i]`: its opaque part
/// (between the quotes) and the index past it.
fn entity_tag(line: &[u8], mut i: usize) -> Option<(&[u8], usize)> {
    if line[i..].starts_with(b"W/") {
        i += 2;
    }
    if line.get(i) != Some(&b'"') {
        return None;
    }
    let start = i + 1;
    let len = line[start..].iter().position(|&b| b == b'"')?;
    let opaque = &line[start..start + len];
    // etagc = %x21 / %x23-7E / obs-text
    if opaque.iter().any(|&b| b <= b' ' || b == 0x7f) {
        return None;
    }
    Some((opaque, start + len + 1))
}

/// The opaque part of a header value holding exactly one entity-tag.
fn single_entity_tag(value: &[u8]) -> Option<&[u8]> {
    let value = trim_ows(value);
    match entity_tag(value, 0) {
        Some((opaque, end)) if end == value.len() => Some(opaque),
        _ => None,
    }
}

/// A strong `ETag` for a body: `"` + 22 base64url characters of a 128-bit hash + `"`.
///
/// The hash is fast and well mixed but not cryptographic: accidental collisions are
/// negligible (2^-64 for 2^32 versions of one resource), a party who controls the bodies
/// could construct two that collide.
pub(crate) fn strong_etag(body: &[u8]) -> HeaderValue {
    let digest = hash128(body).to_le_bytes();
    let mut tag = String::with_capacity(24);
    tag.push('"');
    base64url(&digest, &mut tag);
    tag.push('"');
    HeaderValue::from_str(&tag).expect("quotes and base64url are visible ASCII")
}

/// Two 64-bit lanes over 16-byte blocks. Each step folds a 64x64->128 multiply of the block
/// (keyed with different secrets per lane) into the lane, then applies a bijection, so no
/// block can erase a lane's earlier state; the lanes are cross-mixed and avalanched at the
/// end.
fn hash128(data: &[u8]) -> u128 {
    const K: [u64; 8] = [
        0xa076_1d64_78bd_642f,
        0xe703_7ed1_a0b4_28db,
        0x8ebc_6af0_9c88_c6e3,
        0x5899_65cc_7537_4cc3,
        0x1d8e_4e27_c47d_124f,
        0x9e37_79b9_7f4a_7c15,
        0xc2b2_ae3d_27d4_eb4f,
        0x1656_67b1_9e37_79f9,
    ];
    fn fold(a: u64, b: u64) -> u64 {
        let r = u128::from(a) * u128::from(b);
        (r as u64) ^ ((r >> 64) as u64)
    }
    fn fmix(mut h: u64) -> u64 {
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    let len = data.len() as u64;
    let mut a = K[0] ^ len;
    let mut b = K[1] ^ len.rotate_left(32);
    let mut step = |x: u64, y: u64| {
        a = (a ^ fold(x ^ K[2], y ^ K[3]))
            .rotate_left(23)
            .wrapping_mul(K[5]);
        b = (b ^ fold(y ^ K[4], x.rotate_left(32) ^ K[6]))
            .rotate_left(41)
            .wrapping_mul(K[7]);
    };
    let mut blocks = data.chunks_exact(16);
    for block in &mut blocks {
        step(word(&block[..8]), word(&block[8..]));
    }
    let tail = blocks.remainder();
    if !tail.is_empty() {
        let mut padded = [0u8; 16];
        padded[..tail.len()].copy_from_slice(tail);
        // The length is in the seed, so zero padding cannot collide with real zeros.
        step(word(&padded[..8]), word(&padded[8..]));
    }
    let lo = fmix(a ^ fold(b ^ K[0], a ^ K[3]));
    let hi = fmix(b ^ fold(a ^ K[1], b ^ K[2]) ^ lo);
    (u128::from(hi) << 64) | u128::from(lo)
}

/// Appends the unpadded base64url encoding of `bytes` to `out`.
fn base64url(bytes: &[u8], out: &mut String) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
}

/// An RFC 9211 `Cache-Status` value, such as `battlement; hit; ttl=12`,
/// `battlement; fwd=uri-miss; stored` or `battlement; fwd=stale; collapsed`.
///
/// Parameters come in the RFC's order (`hit`, `fwd`, `ttl`, `stored`, `collapsed`). The name
/// is written as a token when it is one, else as a quoted string; a `fwd` that is not a token
/// is left out.
pub(crate) fn cache_status(
    name: &str,
    hit: bool,
    fwd: Option<&str>,
    stored: bool,
    collapsed: bool,
    ttl: Option<i64>,
) -> HeaderValue {
    let mut out = String::with_capacity(48);
    if is_sf_token(name) {
        out.push_str(name);
    } else {
        out.push('"');
        for c in name.chars() {
            match c {
                '"' | '\\' => {
                    out.push('\\');
                    out.push(c);
                }
                ' '..='~' => out.push(c),
                _ => out.push('?'),
            }
        }
        out.push('"');
    }
    if hit {
        out.push_str("; hit");
    }
    if let Some(fwd) = fwd.filter(|f| is_sf_token(f)) {
        out.push_str("; fwd=");
        out.push_str(fwd);
    }
    if let Some(ttl) = ttl {
        out.push_str("; ttl=");
        push_int(&mut out, ttl);
    }
    if stored {
        out.push_str("; stored");
    }
    if collapsed {
        out.push_str("; collapsed");
    }
    HeaderValue::from_str(&out).unwrap_or_else(|_| HeaderValue::from_static("battlement"))
}

/// Appends `n` in decimal (without `core::fmt`: this runs on every hit).
fn push_int(out: &mut String, n: i64) {
    if n < 0 {
        out.push('-');
    }
    let mut n = n.unsigned_abs();
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[i..] {
        out.push(char::from(d));
    }
}

/// RFC 8941 sf-token: `( ALPHA / "*" ) *( tchar / ":" / "/" )`.
fn is_sf_token(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'*')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:/".contains(&b))
}

const DAYS: [&[u8]; 7] = [b"Sun", b"Mon", b"Tue", b"Wed", b"Thu", b"Fri", b"Sat"];
const LONG_DAYS: [&[u8]; 7] = [
    b"Sunday",
    b"Monday",
    b"Tuesday",
    b"Wednesday",
    b"Thursday",
    b"Friday",
    b"Saturday",
];
const MONTHS: [&[u8]; 12] = [
    b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec",
];

/// Parses an HTTP-date (RFC 9110 §5.6.7): IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), or
/// the obsolete RFC 850 (`Sunday, 06-Nov-94 08:49:37 GMT`) and asctime
/// (`Sun Nov  6 08:49:37 1994`) forms. Names are matched case-insensitively and the weekday
/// is not checked against the date. An RFC 850 two-digit year means 1970-2069 (`70`-`99` are
/// 19xx): the RFC's "not more than 50 years ahead" rule gives the same years for any date a
/// cache meets. `None` for anything else, including `0`.
pub(crate) fn parse_http_date(value: &[u8]) -> Option<SystemTime> {
    let v = trim_ows(value);
    if v.len() == 29 && v[3] == b',' {
        // IMF-fixdate: "Sun, 06 Nov 1994 08:49:37 GMT"
        name_index(&DAYS, &v[..3])?;
        expect(
            v,
            &[(4, b' '), (7, b' '), (11, b' '), (16, b' '), (25, b' ')],
        )?;
        gmt(&v[26..])?;
        let day = digits(&v[5..7])?;
        let month = name_index(&MONTHS, &v[8..11])? + 1;
        let year = digits(&v[12..16])?;
        return to_time(year, month, day, &v[17..25]);
    }
    if let Some(comma) = v.iter().position(|&b| b == b',') {
        // RFC 850: "Sunday, 06-Nov-94 08:49:37 GMT"
        name_index(&LONG_DAYS, &v[..comma])?;
        let r = &v[comma + 1..];
        if r.len() != 23 {
            return None;
        }
        expect(
            r,
            &[(0, b' '), (3, b'-'), (7, b'-'), (10, b' '), (19, b' ')],
        )?;
        gmt(&r[20..])?;
        let day = digits(&r[1..3])?;
        let month = name_index(&MONTHS, &r[4..7])? + 1;
        let yy = digits(&r[8..10])?;
        let year = if yy < 70 { 2000 + yy } else { 1900 + yy };
        return to_time(year, month, day, &r[11..19]);
    }
    if v.len() == 24 {
        // asctime: "Sun Nov  6 08:49:37 1994"
        name_index(&DAYS, &v[..3])?;
        expect(v, &[(3, b' '), (7, b' '), (10, b' '), (19, b' ')])?;
        let month = name_index(&MONTHS, &v[4..7])? + 1;
        let day = if v[8] == b' ' {
            digits(&v[9..10])?
        } else {
            digits(&v[8..10])?
        };
        let year = digits(&v[20..24])?;
        return to_time(year, month, day, &v[11..19]);
    }
    None
}

fn name_index(names: &[&[u8]], candidate: &[u8]) -> Option<u32> {
    let i = names
        .iter()
        .position(|n| n.eq_ignore_ascii_case(candidate))?;
    u32::try_from(i).ok()
}

fn expect(v: &[u8], bytes: &[(usize, u8)]) -> Option<()> {
    bytes.iter().all(|&(i, b)| v[i] == b).then_some(())
}

fn gmt(v: &[u8]) -> Option<()> {
    (v == b"GMT").then_some(())
}

fn digits(v: &[u8]) -> Option<u32> {
    v.iter().try_fold(0u32, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + u32::from(b - b'0'))
    })
}

/// Builds the instant from a validated date and an `HH:MM:SS` time of day.
fn to_time(year: u32, month: u32, day: u32, time: &[u8]) -> Option<SystemTime> {
    expect(time, &[(2, b':'), (5, b':')])?;
    let (h, m, s) = (
        digits(&time[..2])?,
        digits(&time[3..5])?,
        digits(&time[6..8])?,
    );
    // 60 is a leap second (RFC 5322 allows it).
    if h > 23 || m > 59 || s > 60 || !(1..=12).contains(&month) {
        return None;
    }
    if day == 0 || day > days_in_month(year, month) {
        return None;
    }
    let days = days_from_civil(i64::from(year), month, day);
    let secs = days * 86_400 + i64::from(h * 3600 + m * 60 + s);
    if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(secs.unsigned_abs()))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
    }
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400)) => {
            29
        }
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((month + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// Formats an instant as an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), for `Date`,
/// `Expires` or `Last-Modified`. Times before 1970 or after 9999 are clamped to that range.
pub(crate) fn http_date(time: SystemTime) -> String {
    const MAX: u64 = 253_402_300_799; // 9999-12-31T23:59:59Z
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .min(MAX);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    // 1970-01-01 was a Thursday.
    let weekday = DAYS[((days + 4) % 7) as usize];
    format!(
        "{}, {day:02} {} {year:04} {:02}:{:02}:{:02} GMT",
        std::str::from_utf8(weekday).unwrap_or("Thu"),
        std::str::from_utf8(MONTHS[month as usize - 1]).unwrap_or("Jan"),
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for &(name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn cc(lines: &[&str]) -> CacheControl {
        let pairs: Vec<_> = lines.iter().map(|l| ("cache-control", *l)).collect();
        CacheControl::parse(&headers(&pairs))
    }

    const SHARED: Settings = Settings {
        default_ttl: None,
        per_principal: false,
        max_ttl: Duration::from_secs(86_400),
    };
    const PER_PRINCIPAL: Settings = Settings {
        per_principal: true,
        ..SHARED
    };

    /// 2024-03-01T12:00:00Z
    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_709_294_400)
    }

    fn store(req: &[(&str, &str)], status: u16, resp: &[(&str, &str)], s: &Settings) -> Storable {
        storable(
            &Method::GET,
            &headers(req),
            StatusCode::from_u16(status).unwrap(),
            &headers(resp),
            s,
            now(),
        )
    }

    fn lifetime(storable: Storable) -> Duration {
        match storable {
            Storable::Yes(f) => f.lifetime,
            Storable::No(why) => panic!("not storable: {why}"),
        }
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    // --- Cache-Control ----------------------------------------------------------------

    #[test]
    fn parses_every_directive() {
        let c = cc(&[
            "no-store, no-cache, private, public, must-revalidate, proxy-revalidate, \
             max-age=60, s-maxage=120, stale-while-revalidate=30, stale-if-error=300, \
             only-if-cached, max-stale=5, min-fresh=7, immutable",
        ]);
        assert_eq!(
            c,
            CacheControl {
                no_store: true,
                no_cache: true,
                private: true,
                public: true,
                must_revalidate: true,
                proxy_revalidate: true,
                max_age: Some(60),
                s_maxage: Some(120),
                stale_while_revalidate: Some(30),
                stale_if_error: Some(300),
                only_if_cached: true,
                max_stale: Some(Some(5)),
                min_fresh: Some(7),
                immutable: true,
                invalid_freshness: false,
            }
        );
    }

    #[test]
    fn names_are_case_insensitive_and_lines_combine() {
        let c = cc(&["Public, MAX-AGE=10", "S-MaxAge=20", "No-Store"]);
        assert!(c.public && c.no_store);
        assert_eq!((c.max_age, c.s_maxage), (Some(10), Some(20)));
    }

    #[test]
    fn empty_members_and_whitespace_are_tolerated() {
        let c = cc(&[" , ,public ,,\tmax-age = 10 ,"]);
        assert!(c.public);
        assert_eq!(c.max_age, Some(10));
    }

    #[test]
    fn quoted_values() {
        let c = cc(&[r#"max-age="60", private="Set-Cookie, max-age=1", s-maxage="1\2""#]);
        assert_eq!(c.max_age, Some(60));
        assert!(c.private, "qualified private counts as private");
        // The escaped quoted string unescapes to 12.
        assert_eq!(c.s_maxage, Some(12));
        let c = cc(&[r#"no-cache="x, no-store", public"#]);
        assert!(
            c.no_cache && c.public && !c.no_store,
            "no split inside quotes"
        );
    }

    #[test]
    fn unknown_directives_are_ignored() {
        let c = cc(&["foo, bar=\"baz, qux\", community=UCI, max-age=3"]);
        assert_eq!(c.max_age, Some(3));
        assert!(!c.public && !c.no_store);
    }

    #[test]
    fn malformed_numbers_make_the_directive_absent() {
        let c = cc(&["max-age=abc, min-fresh=-1, stale-if-error=, max-stale=1.5, s-maxage"]);
        assert_eq!(c.max_age, None);
        assert_eq!(c.s_maxage, None);
        assert_eq!(c.min_fresh, None);
        assert_eq!(c.stale_if_error, None);
        assert_eq!(c.max_stale, None);
        assert!(c.invalid_freshness);
        let c = cc(&["max-age=10 junk, public"]);
        assert_eq!(c.max_age, None);
        assert!(c.public);
        let c = cc(&[r#"max-age="10"#]);
        assert_eq!(c.max_age, None, "unterminated quote");
        assert!(!cc(&["stale-if-error=x"]).invalid_freshness);
    }

    #[test]
    fn present_headers_are_found_with_few_or_many_headers() {
        for extra in [0, 30] {
            let mut h = HeaderMap::new();
            for i in 0..extra {
                h.insert(
                    HeaderName::from_bytes(format!("x-extra-{i}").as_bytes()).unwrap(),
                    HeaderValue::from_static("1"),
                );
            }
            let settings = SHARED;
            let verdict = |h: &HeaderMap| {
                request_verdict(
                    &Method::GET,
                    Present::of(h),
                    &CacheControl::parse(h),
                    &settings,
                )
            };
            assert_eq!(verdict(&h), RequestVerdict::Lookup, "{extra}");
            h.insert(PRAGMA, HeaderValue::from_static("no-cache"));
            assert_eq!(verdict(&h), RequestVerdict::Refresh, "{extra}");
            h.insert(CACHE_CONTROL, HeaderValue::from_static("max-age=5"));
            assert_eq!(
                verdict(&h),
                RequestVerdict::Lookup,
                "{extra}: Cache-Control wins"
            );
            h.insert(COOKIE, HeaderValue::from_static("a=1"));
            assert_eq!(verdict(&h), RequestVerdict::Credentialed, "{extra}");
            h.insert(UPGRADE, HeaderValue::from_static("websocket"));
            assert_eq!(verdict(&h), RequestVerdict::Bypass("upgrade"), "{extra}");
        }
    }

    #[test]
    fn first_duplicate_wins_even_when_malformed() {
        assert_eq!(cc(&["max-age=10, max-age=20"]).max_age, Some(10));
        assert_eq!(cc(&["max-age=10", "max-age=20"]).max_age, Some(10));
        let c = cc(&["max-age=x, max-age=20"]);
        assert_eq!(c.max_age, None);
        assert!(c.invalid_freshness);
    }

    #[test]
    fn values_are_clamped_to_two_to_the_31() {
        let c = cc(&["max-age=99999999999999999999999999, min-fresh=2147483649"]);
        assert_eq!(c.max_age, Some(MAX_DELTA_SECONDS));
        assert_eq!(c.min_fresh, Some(MAX_DELTA_SECONDS));
    }

    #[test]
    fn max_stale_without_value_means_any() {
        assert_eq!(cc(&["max-stale"]).max_stale, Some(None));
        assert_eq!(cc(&["max-stale=30"]).max_stale, Some(Some(30)));
        assert_eq!(cc(&["public"]).max_stale, None);
    }

    #[test]
    fn pragma_counts_only_without_cache_control() {
        let req = headers(&[("pragma", "foo, No-Cache")]);
        assert!(CacheControl::parse(&req).no_cache);
        assert!(!CacheControl::parse_response(&req).no_cache);
        let req = headers(&[("pragma", "no-cache"), ("cache-control", "max-stale")]);
        assert!(!CacheControl::parse(&req).no_cache);
        assert!(!CacheControl::parse(&headers(&[("pragma", "x-no-cache")])).no_cache);
    }

    // --- request verdict ----------------------------------------------------------------

    fn verdict(method: Method, pairs: &[(&str, &str)], s: &Settings) -> RequestVerdict {
        let headers = headers(pairs);
        let present = Present::of(&headers);
        request_verdict(&method, present, &CacheControl::parse(&headers), s)
    }

    #[test]
    fn only_get_and_head_are_looked_up() {
        assert_eq!(verdict(Method::GET, &[], &SHARED), RequestVerdict::Lookup);
        assert_eq!(verdict(Method::HEAD, &[], &SHARED), RequestVerdict::Lookup);
        for m in [Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS] {
            assert_eq!(verdict(m, &[], &SHARED), RequestVerdict::Bypass("method"));
        }
        assert_eq!(RequestVerdict::Bypass("method").fwd(), Some("method"));
    }

    #[test]
    fn credentials_are_looked_up_only_per_principal() {
        for h in [("authorization", "Bearer x"), ("cookie", "sid=1")] {
            assert_eq!(
                verdict(Method::GET, &[h], &SHARED),
                RequestVerdict::Credentialed
            );
            assert_eq!(
                verdict(Method::GET, &[h], &PER_PRINCIPAL),
                RequestVerdict::Lookup
            );
        }
        let refresh = [("authorization", "Bearer x"), ("cache-control", "no-cache")];
        assert_eq!(
            verdict(Method::GET, &refresh, &SHARED),
            RequestVerdict::Credentialed
        );
        assert_eq!(RequestVerdict::Credentialed.fwd(), Some("bypass"));
    }

    #[test]
    fn request_no_store_bypasses_and_no_cache_refreshes() {
        let v = verdict(
            Method::GET,
            &[("cache-control", "no-store")],
            &PER_PRINCIPAL,
        );
        assert_eq!(v, RequestVerdict::Bypass("no-store"));
        for cc in ["no-cache", "max-age=0", "MAX-AGE=0, max-stale"] {
            let v = verdict(Method::GET, &[("cache-control", cc)], &SHARED);
            assert_eq!(v, RequestVerdict::Refresh, "{cc}");
        }
        let pragma = verdict(Method::GET, &[("pragma", "no-cache")], &SHARED);
        assert_eq!(pragma, RequestVerdict::Refresh);
        assert_eq!(RequestVerdict::Refresh.fwd(), Some("request"));
        let v = verdict(Method::GET, &[("cache-control", "max-age=5")], &SHARED);
        assert_eq!(v, RequestVerdict::Lookup);
    }

    #[test]
    fn upgrade_requests_bypass() {
        let ws = [("connection", "upgrade"), ("upgrade", "websocket")];
        let v = verdict(Method::GET, &ws, &SHARED);
        assert_eq!(v, RequestVerdict::Bypass("upgrade"));
        assert_eq!(v.fwd(), Some("bypass"));
    }

    // --- storable -------------------------------------------------------------------------

    #[test]
    fn max_age_response_is_stored() {
        let s = store(&[], 200, &[("cache-control", "max-age=60")], &SHARED);
        assert_eq!(
            s,
            Storable::Yes(Freshness {
                lifetime: secs(60),
                stale_while_revalidate: Duration::ZERO,
                stale_if_error: Duration::ZERO,
                must_revalidate: false,
            })
        );
    }

    #[test]
    fn only_get_responses_are_stored() {
        let resp = headers(&[("cache-control", "max-age=60")]);
        for m in [Method::HEAD, Method::POST] {
            let s = storable(&m, &HeaderMap::new(), StatusCode::OK, &resp, &SHARED, now());
            assert_eq!(s, Storable::No("method"));
        }
    }

    #[test]
    fn only_heuristically_cacheable_statuses_are_stored() {
        let cc = [("cache-control", "max-age=60")];
        for ok in [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501] {
            assert!(
                matches!(store(&[], ok, &cc, &SHARED), Storable::Yes(_)),
                "{ok}"
            );
        }
        for no in [201, 206, 302, 304, 307, 400, 401, 403, 429, 500, 502, 503] {
            assert_eq!(store(&[], no, &cc, &SHARED), Storable::No("status"), "{no}");
        }
    }

    #[test]
    fn no_store_private_and_no_cache_are_not_stored() {
        let no = |cc: &str, s: &Settings| store(&[], 200, &[("cache-control", cc)], s);
        assert_eq!(
            no("max-age=60, no-store", &SHARED),
            Storable::No("no-store")
        );
        assert_eq!(no("max-age=60, private", &SHARED), Storable::No("private"));
        assert_eq!(
            no(r#"max-age=60, private="set-cookie""#, &SHARED),
            Storable::No("private")
        );
        assert!(matches!(
            no("max-age=60, private", &PER_PRINCIPAL),
            Storable::Yes(_)
        ));
        assert_eq!(
            no("max-age=60, no-cache", &SHARED),
            Storable::No("no-cache")
        );
        assert_eq!(
            no("max-age=60, no-store", &PER_PRINCIPAL),
            Storable::No("no-store")
        );
    }

    #[test]
    fn request_no_store_is_not_stored() {
        let s = store(
            &[("cache-control", "no-store")],
            200,
            &[("cache-control", "max-age=60")],
            &SHARED,
        );
        assert_eq!(s, Storable::No("request no-store"));
    }

    #[test]
    fn set_cookie_is_never_stored_even_public() {
        let resp = [
            ("cache-control", "public, s-maxage=60"),
            ("set-cookie", "sid=1"),
        ];
        assert_eq!(store(&[], 200, &resp, &SHARED), Storable::No("set-cookie"));
        assert_eq!(
            store(&[], 200, &resp, &PER_PRINCIPAL),
            Storable::No("set-cookie")
        );
    }

    #[test]
    fn vary_star_and_invalid_vary_are_not_stored() {
        let star = [("cache-control", "max-age=60"), ("vary", "Accept, *")];
        assert_eq!(store(&[], 200, &star, &SHARED), Storable::No("vary"));
        let bad = [("cache-control", "max-age=60"), ("vary", "accept encoding")];
        assert_eq!(store(&[], 200, &bad, &SHARED), Storable::No("vary"));
        let ok = [("cache-control", "max-age=60"), ("vary", "Accept-Encoding")];
        assert!(matches!(store(&[], 200, &ok, &SHARED), Storable::Yes(_)));
    }

    #[test]
    fn credentials_need_public_or_s_maxage() {
        for req in [("authorization", "Bearer x"), ("cookie", "sid=1")] {
            let plain = [("cache-control", "max-age=60")];
            assert_eq!(
                store(&[req], 200, &plain, &SHARED),
                Storable::No("credentials")
            );
            let revalidate = [("cache-control", "max-age=60, must-revalidate")];
            assert_eq!(
                store(&[req], 200, &revalidate, &SHARED),
                Storable::No("credentials")
            );
            let public = [("cache-control", "public, max-age=60")];
            assert_eq!(lifetime(store(&[req], 200, &public, &SHARED)), secs(60));
            let shared = [("cache-control", "s-maxage=30")];
            assert_eq!(lifetime(store(&[req], 200, &shared, &SHARED)), secs(30));
            assert_eq!(
                lifetime(store(&[req], 200, &plain, &PER_PRINCIPAL)),
                secs(60)
            );
        }
    }

    #[test]
    fn s_maxage_wins_over_max_age_and_expires() {
        let resp = [
            ("cache-control", "max-age=600, s-maxage=30"),
            ("expires", "Fri, 01 Mar 2024 13:00:00 GMT"),
        ];
        assert_eq!(lifetime(store(&[], 200, &resp, &SHARED)), secs(30));
        let resp = [
            ("cache-control", "max-age=600"),
            ("expires", "Fri, 01 Mar 2024 13:00:00 GMT"),
        ];
        assert_eq!(lifetime(store(&[], 200, &resp, &SHARED)), secs(600));
    }

    #[test]
    fn s_maxage_implies_proxy_revalidate_but_keeps_explicit_stale_windows() {
        let resp = [("cache-control", "s-maxage=1, stale-while-revalidate=59")];
        let Storable::Yes(f) = store(&[], 200, &resp, &SHARED) else {
            panic!("storable");
        };
        assert!(f.must_revalidate);
        assert_eq!(f.stale_while_revalidate, secs(59));
    }

    #[test]
    fn expires_minus_date() {
        let resp = [
            ("date", "Fri, 01 Mar 2024 11:00:00 GMT"),
            ("expires", "Fri, 01 Mar 2024 11:05:00 GMT"),
        ];
        // Relative to the origin's Date, whatever our clock says.
        assert_eq!(lifetime(store(&[], 200, &resp, &SHARED)), secs(300));
    }

    #[test]
    fn expires_without_date_counts_from_now() {
        let resp = [("expires", "Fri, 01 Mar 2024 12:02:00 GMT")];
        assert_eq!(lifetime(store(&[], 200, &resp, &SHARED)), secs(120));
        let resp = [
            ("date", "garbage"),
            ("expires", "Fri, 01 Mar 2024 12:02:00 GMT"),
        ];
        assert_eq!(lifetime(store(&[], 200, &resp, &SHARED)), secs(120));
    }

    #[test]
    fn expires_in_the_past_is_not_stored_even_with_a_default() {
        let with_default = Settings {
            default_ttl: Some(secs(60)),
            ..SHARED
        };
        let past = [("expires", "Thu, 01 Jan 1970 00:00:00 GMT")];
        assert_eq!(
            store(&[], 200, &past, &with_default),
            Storable::No("expired")
        );
        let same = [
            ("date", "Fri, 01 Mar 2024 12:00:00 GMT"),
            ("expires", "Fri, 01 Mar 2024 12:00:00 GMT"),
        ];
        assert_eq!(store(&[], 200, &same, &SHARED), Storable::No("expired"));
    }

    #[test]
    fn invalid_expires_means_already_expired() {
        let with_default = Settings {
            default_ttl: Some(secs(60)),
            ..SHARED
        };
        for bad in ["0", "-1", "tomorrow", "Fri, 31 Feb 2024 12:00:00 GMT"] {
            let resp = [("expires", bad)];
            assert_eq!(
                store(&[], 200, &resp, &with_default),
                Storable::No("expired"),
                "{bad}"
            );
        }
        // max-age overrides an invalid Expires (RFC 9111 §5.3).
        let resp = [("expires", "0"), ("cache-control", "max-age=60")];
        assert_eq!(lifetime(store(&[], 200, &resp, &SHARED)), secs(60));
    }

    #[test]
    fn default_ttl_applies_only_without_explicit_freshness() {
        assert_eq!(
            store(&[], 200, &[], &SHARED),
            Storable::No("no explicit freshness")
        );
        let with_default = Settings {
            default_ttl: Some(secs(45)),
            ..SHARED
        };
        assert_eq!(lifetime(store(&[], 200, &[], &with_default)), secs(45));
        let public = [("cache-control", "public")];
        assert_eq!(lifetime(store(&[], 200, &public, &with_default)), secs(45));
        let explicit = [("cache-control", "max-age=5")];
        assert_eq!(lifetime(store(&[], 200, &explicit, &with_default)), secs(5));
    }

    #[test]
    fn zero_lifetime_and_invalid_max_age_are_not_stored() {
        let zero = [("cache-control", "max-age=0")];
        assert_eq!(store(&[], 200, &zero, &SHARED), Storable::No("expired"));
        let with_default = Settings {
            default_ttl: Some(secs(60)),
            ..SHARED
        };
        let bad = [("cache-control", "max-age=soon")];
        assert_eq!(
            store(&[], 200, &bad, &with_default),
            Storable::No("invalid freshness")
        );
        let no_ttl = Settings {
            max_ttl: Duration::ZERO,
            ..SHARED
        };
        let resp = [("cache-control", "max-age=60")];
        assert_eq!(store(&[], 200, &resp, &no_ttl), Storable::No("expired"));
    }

    #[test]
    fn upstream_age_is_subtracted() {
        let resp = [("cache-control", "max-age=60"), ("age", "25")];
        assert_eq!(lifetime(store(&[], 200, &resp, &SHARED)), secs(35));
        let resp = [("cache-control", "max-age=60"), ("age", "60")];
        assert_eq!(store(&[], 200, &resp, &SHARED), Storable::No("expired"));
        let resp = [("cache-control", "max-age=60"), ("age", "10, 50")];
        assert_eq!(lifetime(store(&[], 200, &resp, &SHARED)), secs(50));
        let resp = [("cache-control", "max-age=60"), ("age", "-3")];
        assert_eq!(lifetime(store(&[], 200, &resp, &SHARED)), secs(60));
        let resp = [
            ("date", "Fri, 01 Mar 2024 11:00:00 GMT"),
            ("expires", "Fri, 01 Mar 2024 11:05:00 GMT"),
            ("age", "100"),
        ];
        assert_eq!(lifetime(store(&[], 200, &resp, &SHARED)), secs(200));
    }

    #[test]
    fn lifetime_and_stale_windows_are_capped() {
        let s = Settings {
            max_ttl: secs(100),
            ..SHARED
        };
        let resp = [(
            "cache-control",
            "max-age=31536000, stale-while-revalidate=500, stale-if-error=50",
        )];
        let Storable::Yes(f) = store(&[], 200, &resp, &s) else {
            panic!("storable");
        };
        assert_eq!(f.lifetime, secs(100));
        assert_eq!(f.stale_while_revalidate, secs(100));
        assert_eq!(f.stale_if_error, secs(50));
        assert_eq!(f.retain(), secs(200));
    }

    #[test]
    fn must_revalidate_clears_stale_windows() {
        for directive in ["must-revalidate", "proxy-revalidate"] {
            let resp = [(
                "cache-control",
                format!("max-age=60, stale-while-revalidate=30, stale-if-error=60, {directive}"),
            )];
            let resp: Vec<_> = resp.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let Storable::Yes(f) = store(&[], 200, &resp, &SHARED) else {
                panic!("storable");
            };
            assert!(f.must_revalidate);
            assert_eq!(f.stale_while_revalidate, Duration::ZERO);
            assert_eq!(f.stale_if_error, Duration::ZERO);
        }
    }

    // --- Vary -----------------------------------------------------------------------------

    #[test]
    fn vary_is_lowercase_sorted_and_deduplicated() {
        let h = headers(&[
            ("vary", "Accept-Encoding, X-Tenant"),
            ("vary", " accept , ,ACCEPT-ENCODING"),
        ]);
        let names: Vec<_> = vary(&h).unwrap();
        let names: Vec<_> = names.iter().map(HeaderName::as_str).collect();
        assert_eq!(names, ["accept", "accept-encoding", "x-tenant"]);
        assert_eq!(vary(&HeaderMap::new()), Ok(vec![]));
    }

    #[test]
    fn vary_star_or_invalid_is_an_error() {
        assert_eq!(vary(&headers(&[("vary", "*")])), Err(()));
        assert_eq!(
            vary(&headers(&[("vary", "accept"), ("vary", " * ")])),
            Err(())
        );
        assert_eq!(vary(&headers(&[("vary", "a(b)")])), Err(()));
    }

    // --- staleness and age ---------------------------------------------------------------

    fn fresh_for(lifetime: u64, swr: u64, sie: u64, must_revalidate: bool) -> Freshness {
        Freshness {
            lifetime: secs(lifetime),
            stale_while_revalidate: secs(swr),
            stale_if_error: secs(sie),
            must_revalidate,
        }
    }

    fn at(f: &Freshness, age: u64, request: &str) -> Staleness {
        let stored = now();
        let req = if request.is_empty() {
            CacheControl::default()
        } else {
            cc(&[request])
        };
        staleness(stored, f, stored + secs(age), &req)
    }

    #[test]
    fn fresh_then_swr_then_sie_then_expired() {
        let f = fresh_for(60, 30, 120, false);
        assert_eq!(at(&f, 0, ""), Staleness::Fresh);
        assert_eq!(at(&f, 59, ""), Staleness::Fresh);
        assert_eq!(at(&f, 60, ""), Staleness::StaleWhileRevalidate);
        assert_eq!(at(&f, 89, ""), Staleness::StaleWhileRevalidate);
        assert_eq!(at(&f, 90, ""), Staleness::StaleIfError);
        assert_eq!(at(&f, 179, ""), Staleness::StaleIfError);
        assert_eq!(at(&f, 180, ""), Staleness::Expired);
        assert_eq!(at(&fresh_for(60, 0, 0, false), 60, ""), Staleness::Expired);
    }

    #[test]
    fn clock_going_backwards_is_fresh() {
        let f = fresh_for(60, 0, 0, false);
        let stored = now();
        let earlier = stored - secs(10);
        assert_eq!(
            staleness(stored, &f, earlier, &CacheControl::default()),
            Staleness::Fresh
        );
        assert_eq!(age(stored, earlier), 0);
    }

    #[test]
    fn request_max_age_limits_age() {
        let f = fresh_for(600, 30, 60, false);
        assert_eq!(at(&f, 10, "max-age=10"), Staleness::Fresh);
        assert_eq!(at(&f, 11, "max-age=10"), Staleness::StaleIfError);
        // Stale but still within the request's max-age: the response's windows apply.
        assert_eq!(at(&f, 610, "max-age=1000"), Staleness::StaleWhileRevalidate);
        // Beyond both: no stale-while-revalidate for a client that asked for younger.
        assert_eq!(at(&f, 610, "max-age=605"), Staleness::StaleIfError);
        assert_eq!(at(&f, 700, "max-age=605"), Staleness::Expired);
    }

    #[test]
    fn request_min_fresh() {
        let f = fresh_for(60, 30, 0, false);
        assert_eq!(at(&f, 40, "min-fresh=20"), Staleness::Fresh);
        // Still fresh, only refused by the client: a fallback should the origin fail.
        assert_eq!(at(&f, 41, "min-fresh=20"), Staleness::StaleIfError);
        assert_eq!(at(&f, 61, "min-fresh=20"), Staleness::Expired, "no swr");
        let f = fresh_for(60, 0, 30, false);
        assert_eq!(at(&f, 61, "min-fresh=20"), Staleness::StaleIfError);
    }

    #[test]
    fn request_max_stale() {
        let f = fresh_for(60, 0, 0, false);
        assert_eq!(at(&f, 70, "max-stale=10"), Staleness::Fresh);
        assert_eq!(at(&f, 71, "max-stale=10"), Staleness::Expired);
        assert_eq!(at(&f, 1_000_000, "max-stale"), Staleness::Fresh);
        let f = fresh_for(60, 30, 0, false);
        assert_eq!(at(&f, 75, "max-stale=10"), Staleness::StaleWhileRevalidate);
    }

    #[test]
    fn must_revalidate_ignores_max_stale() {
        let f = fresh_for(60, 0, 0, true);
        assert_eq!(at(&f, 59, "max-stale"), Staleness::Fresh);
        assert_eq!(at(&f, 61, "max-stale"), Staleness::Expired);
        assert_eq!(at(&f, 61, "max-stale=100"), Staleness::Expired);
    }

    #[test]
    fn age_rounds_down() {
        let t = now();
        assert_eq!(age(t, t), 0);
        assert_eq!(age(t, t + Duration::from_millis(999)), 0);
        assert_eq!(age(t, t + Duration::from_millis(61_500)), 61);
        assert_eq!(age(t, t + secs(u64::from(u32::MAX))), MAX_DELTA_SECONDS);
    }

    #[test]
    fn ttl_counts_down_through_zero() {
        let f = fresh_for(60, 0, 0, false);
        let t = now();
        assert_eq!(f.ttl(t, t), 60);
        assert_eq!(f.ttl(t, t + Duration::from_millis(12_500)), 47);
        assert_eq!(f.ttl(t, t + secs(60)), 0);
        assert_eq!(f.ttl(t, t + Duration::from_millis(60_001)), -1);
        assert_eq!(f.ttl(t, t + secs(75)), -15);
        assert_eq!(f.ttl(t, t - secs(5)), 60);
    }

    #[test]
    fn age_header_parsing() {
        assert_eq!(age_header(&headers(&[("age", " 12 ")])), Some(12));
        assert_eq!(age_header(&headers(&[("age", "x")])), None);
        assert_eq!(age_header(&HeaderMap::new()), None);
    }

    // --- dates ----------------------------------------------------------------------------

    fn date(s: &str) -> Option<SystemTime> {
        parse_http_date(s.as_bytes())
    }

    #[test]
    fn three_date_formats_agree() {
        let expected = UNIX_EPOCH + secs(784_111_777);
        assert_eq!(date("Sun, 06 Nov 1994 08:49:37 GMT"), Some(expected));
        assert_eq!(date("Sunday, 06-Nov-94 08:49:37 GMT"), Some(expected));
        assert_eq!(date("Sun Nov  6 08:49:37 1994"), Some(expected));
        assert_eq!(date("  sun, 06 nov 1994 08:49:37 GMT "), Some(expected));
        assert_eq!(
            date("Sun Nov 16 08:49:37 1994"),
            Some(expected + secs(10 * 86_400))
        );
    }

    #[test]
    fn rfc850_two_digit_years() {
        assert_eq!(date("Thursday, 01-Jan-70 00:00:00 GMT"), Some(UNIX_EPOCH),);
        assert_eq!(date("Friday, 01-Mar-24 12:00:00 GMT"), Some(now()),);
    }

    #[test]
    fn edge_dates() {
        assert_eq!(date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(UNIX_EPOCH));
        assert_eq!(
            date("Wed, 31 Dec 1969 23:59:59 GMT"),
            Some(UNIX_EPOCH - secs(1))
        );
        assert_eq!(
            date("Thu, 29 Feb 2024 00:00:00 GMT"),
            Some(UNIX_EPOCH + secs(1_709_164_800))
        );
        assert!(
            date("Thu, 31 Dec 2099 23:59:60 GMT").is_some(),
            "leap second"
        );
        assert!(date("Fri, 31 Dec 9999 23:59:59 GMT").is_some());
    }

    #[test]
    fn invalid_dates() {
        for bad in [
            "",
            "0",
            "Sun, 06 Nov 1994 08:49:37 UTC",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "Sun, 29 Feb 2023 08:49:37 GMT",
            "Sun, 29 Feb 1900 08:49:37 GMT",
            "Sun, 00 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 24:00:00 GMT",
            "Sun, 06 Nov 1994 08:60:37 GMT",
            "Sun, 06 Nov 1994 08.49.37 GMT",
            "Xyz, 06 Nov 1994 08:49:37 GMT",
            "Sun, 6 Nov 1994 08:49:37 GMT",
            "Sun,  6 Nov 1994 08:49:37 GMT",
            "Sun, 06 Nov 94 08:49:37 GMT",
            "Sunday, 06-Nov-1994 08:49:37 GMT",
            "Someday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov 6 08:49:37 1994",
            "Sun Nov  6 08:49:37 94",
            "Sun, 06 Nov 1994 08:49:37 GMT+",
            "Sun, 06 Nov 1994 08:49:37 GMT, Sun, 06 Nov 1994 08:49:37 GMT",
            "Ünday, 06-Nov-94 08:49:37 GMT",
        ] {
            assert_eq!(date(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn formats_imf_fixdate() {
        assert_eq!(
            http_date(UNIX_EPOCH + secs(784_111_777)),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
        assert_eq!(http_date(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(
            http_date(UNIX_EPOCH - secs(5)),
            "Thu, 01 Jan 1970 00:00:00 GMT"
        );
        assert_eq!(http_date(now()), "Fri, 01 Mar 2024 12:00:00 GMT");
        assert_eq!(
            http_date(UNIX_EPOCH + secs(1 << 40)),
            "Fri, 31 Dec 9999 23:59:59 GMT"
        );
    }

    #[test]
    fn format_and_parse_round_trip() {
        // One instant every ~3.7 days across 1970..2100, at odd times of day.
        let mut t = 0u64;
        while t < 4_102_444_800 {
            let time = UNIX_EPOCH + secs(t);
            let text = http_date(time);
            assert_eq!(date(&text), Some(time), "{text}");
            t += 321_113;
        }
    }

    // --- conditional requests -------------------------------------------------------------

    fn nm(req: &[(&str, &str)], etag: Option<&str>, lm: Option<&str>) -> bool {
        let etag = etag.map(|e| HeaderValue::from_str(e).unwrap());
        let lm = lm.map(|l| HeaderValue::from_str(l).unwrap());
        not_modified(&headers(req), etag.as_ref(), lm.as_ref())
    }

    const LM: &str = "Fri, 01 Mar 2024 11:00:00 GMT";

    #[test]
    fn if_none_match_strong_weak_list_and_star() {
        let inm = |v| [("if-none-match", v)];
        assert!(nm(&inm(r#""abc""#), Some(r#""abc""#), None));
        assert!(!nm(&inm(r#""abc""#), Some(r#""abd""#), None));
        // Weak comparison: W/ on either side still matches.
        assert!(nm(&inm(r#"W/"abc""#), Some(r#""abc""#), None));
        assert!(nm(&inm(r#""abc""#), Some(r#"W/"abc""#), None));
        assert!(nm(&inm(r#"W/"abc""#), Some(r#"W/"abc""#), None));
        // Lists, across lines too, with commas inside a tag.
        assert!(nm(&inm(r#""x", W/"y" ,"abc""#), Some(r#""abc""#), None));
        assert!(nm(
            &[("if-none-match", r#""x""#), ("if-none-match", r#""a,b""#)],
            Some(r#""a,b""#),
            None
        ));
        assert!(!nm(&inm(r#""x", "y""#), Some(r#""abc""#), None));
        // * matches any stored representation, even without an ETag.
        assert!(nm(&inm("*"), None, None));
        assert!(nm(&inm(" * "), Some(r#""abc""#), None));
        // No stored ETag, or an unquoted one: nothing but * matches.
        assert!(!nm(&inm(r#""abc""#), None, None));
        assert!(!nm(&inm(r#""abc""#), Some("abc"), None));
        // Malformed lists match nothing.
        assert!(!nm(&inm("abc"), Some(r#""abc""#), None));
        assert!(!nm(&inm(r#""abc"x"#), Some(r#""abc""#), None));
        assert!(!nm(&inm(r#""x" "abc""#), Some(r#""abc""#), None));
        assert!(!nm(&inm(r#""ab"#), Some(r#""ab""#), None));
    }

    #[test]
    fn if_none_match_beats_if_modified_since() {
        let both = |inm| [("if-none-match", inm), ("if-modified-since", LM)];
        // The date alone would answer 304; the tag mismatch wins.
        assert!(!nm(&both(r#""old""#), Some(r#""new""#), Some(LM)));
        // A matching tag wins over a date that would say modified.
        let older = [
            ("if-none-match", r#""new""#),
            ("if-modified-since", "Thu, 01 Jan 1970 00:00:00 GMT"),
        ];
        assert!(nm(&older, Some(r#""new""#), Some(LM)));
        // If-None-Match present without a stored ETag still disables the date check.
        assert!(!nm(&both(r#""x""#), None, Some(LM)));
    }

    #[test]
    fn if_modified_since() {
        let ims = |v| [("if-modified-since", v)];
        assert!(nm(&ims(LM), None, Some(LM)));
        assert!(nm(&ims("Fri, 01 Mar 2024 11:00:01 GMT"), None, Some(LM)));
        assert!(nm(&ims("Friday, 01-Mar-24 11:00:00 GMT"), None, Some(LM)));
        assert!(!nm(&ims("Fri, 01 Mar 2024 10:59:59 GMT"), None, Some(LM)));
        assert!(!nm(&ims("yesterday"), None, Some(LM)));
        assert!(!nm(&ims(LM), None, None));
        assert!(!nm(&ims(LM), None, Some("garbage")));
        let twice = [("if-modified-since", LM), ("if-modified-since", LM)];
        assert!(!nm(&twice, None, Some(LM)), "more than one member");
        assert!(!nm(&[], Some(r#""a""#), Some(LM)));
    }

    // --- ETag -----------------------------------------------------------------------------

    #[test]
    fn strong_etag_shape() {
        for body in [&b""[..], b"hello", &[0u8; 1000]] {
            let tag = strong_etag(body);
            let s = tag.to_str().unwrap();
            assert_eq!(s.len(), 24, "{s}");
            assert!(s.starts_with('"') && s.ends_with('"'));
            assert!(
                s[1..23]
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            );
            assert_eq!(strong_etag(body), tag, "deterministic");
            assert!(nm(&[("if-none-match", s)], Some(s), None));
        }
    }

    #[test]
    fn strong_etag_distinguishes_bodies() {
        let mut seen = std::collections::HashSet::new();
        let mut body = Vec::new();
        // Every length 0..=64 of zeros and of a counter pattern, plus single-bit flips:
        // catches padding, length and block-boundary mistakes.
        for len in 0..=64usize {
            body.clear();
            body.resize(len, 0);
            assert!(seen.insert(hash128(&body)), "zeros len {len}");
            let pattern: Vec<u8> = (0..len).map(|i| i as u8 + 1).collect();
            if len > 0 {
                assert!(seen.insert(hash128(&pattern)), "pattern len {len}");
            }
            for bit in 0..len * 8 {
                let mut flipped = pattern.clone();
                flipped[bit / 8] ^= 1 << (bit % 8);
                if flipped != body {
                    seen.insert(hash128(&flipped));
                }
            }
        }
        for i in 0..20_000u32 {
            let body = format!("{{\"id\":{i}}}");
            assert!(seen.insert(hash128(body.as_bytes())), "{body}");
        }
        assert_ne!(strong_etag(b"a"), strong_etag(b"a\0"));
        assert_ne!(strong_etag(b"ab"), strong_etag(b"ba"));
    }

    #[test]
    fn hash_bits_are_balanced() {
        // Flipping one input bit should flip about half of the 128 output bits.
        let base: Vec<u8> = (0..40u8).collect();
        let h = hash128(&base);
        let mut total = 0;
        for bit in 0..base.len() * 8 {
            let mut other = base.clone();
            other[bit / 8] ^= 1 << (bit % 8);
            let flipped = (hash128(&other) ^ h).count_ones();
            assert!((32..=96).contains(&flipped), "bit {bit}: {flipped}");
            total += flipped;
        }
        let mean = f64::from(total) / (base.len() * 8) as f64;
        assert!((60.0..=68.0).contains(&mean), "{mean}");
    }

    #[test]
    fn base64url_matches_rfc_4648_vectors() {
        for (input, expected) in [
            (&b""[..], ""),
            (b"f", "Zg"),
            (b"fo", "Zm8"),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg"),
            (b"fooba", "Zm9vYmE"),
            (b"foobar", "Zm9vYmFy"),
            (&[0xfb, 0xff], "-_8"),
        ] {
            let mut out = String::new();
            base64url(input, &mut out);
            assert_eq!(out, expected);
        }
    }

    // --- Cache-Status ---------------------------------------------------------------------

    #[test]
    fn cache_status_values() {
        let s = |v: HeaderValue| v.to_str().unwrap().to_owned();
        assert_eq!(
            s(cache_status(
                "battlement",
                true,
                None,
                false,
                false,
                Some(12)
            )),
            "battlement; hit; ttl=12"
        );
        assert_eq!(
            s(cache_status(
                "battlement",
                false,
                Some("uri-miss"),
                true,
                false,
                None
            )),
            "battlement; fwd=uri-miss; stored"
        );
        assert_eq!(
            s(cache_status(
                "battlement",
                false,
                Some("stale"),
                false,
                true,
                None
            )),
            "battlement; fwd=stale; collapsed"
        );
        assert_eq!(
            s(cache_status(
                "battlement",
                true,
                None,
                false,
                false,
                Some(-3)
            )),
            "battlement; hit; ttl=-3"
        );
        assert_eq!(
            s(cache_status(
                "edge cache \"1\"",
                false,
                Some("bad value"),
                false,
                false,
                None
            )),
            r#""edge cache \"1\"""#
        );
        assert_eq!(
            s(cache_status("cachë", true, None, false, false, None)),
            "\"cach?\"; hit"
        );
        for ttl in [0, 7, 10, 86_400, i64::MAX, i64::MIN] {
            assert_eq!(
                s(cache_status("c", true, None, false, false, Some(ttl))),
                format!("c; hit; ttl={ttl}")
            );
        }
    }
}
