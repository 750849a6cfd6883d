//! What the stateful layers key on: [`KeyExtractor`] and its implementations.
//!
//! - [`ClientIp`]: the client's address, believing `X-Forwarded-For` or RFC 7239 `Forwarded`
//!   only from configured proxy networks, IPv6 masked to a prefix.
//! - [`Header`]: the value of one request header (for example an API key id).
//! - [`Principal`]: the subject of the authenticated [`principal::Principal`].
//! - [`Route`]: the method and path.
//! - [`Global`]: one key for every request.
//! - a pair `(A, B)` of extractors, and any closure `Fn(&RequestHead) -> Option<K>`.
//!
//! An extractor returns `None` when it has no key for a request; the layer using it then
//! lets the request through unkeyed (its documentation says so).
//!
//! ```
//! use battlement::key::{ClientIp, ClientKey, KeyExtractor, PeerAddr, RequestHead};
//! use http::Request;
//!
//! let client_ip = ClientIp::new().trust_proxies(["10.0.0.0/8"]).unwrap();
//!
//! // Behind a trusted proxy, the rightmost untrusted address of X-Forwarded-For is the client.
//! let mut req = Request::builder()
//!     .header("x-forwarded-for", "6.6.6.6, 203.0.113.7, 10.0.0.2")
//!     .body(())
//!     .unwrap();
//! req.extensions_mut().insert(PeerAddr("10.0.0.1:443".parse().unwrap()));
//! assert_eq!(
//!     client_ip.extract(&RequestHead::of(&req)),
//!     Some(ClientKey::ip("203.0.113.7".parse().unwrap()))
//! );
//!
//! // From an untrusted peer the header is ignored: it could say anything.
//! req.extensions_mut().insert(PeerAddr("198.51.100.9:5000".parse().unwrap()));
//! assert_eq!(
//!     client_ip.extract(&RequestHead::of(&req)).unwrap().to_string(),
//!     "198.51.100.9"
//! );
//! ```
//!
//! [`principal::Principal`]: crate::principal::Principal

use std::fmt;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::header::{FORWARDED, HeaderName};
use http::{Extensions, HeaderMap, Method, Request, Uri, Version};

/// A borrowed view of a request's head: what extractors, predicates and renderers look at.
///
/// It does not depend on the body type, so closures over it work with any service.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct RequestHead<'a> {
    /// The method.
    pub method: &'a Method,
    /// The URI.
    pub uri: &'a Uri,
    /// The HTTP version.
    pub version: Version,
    /// The headers.
    pub headers: &'a HeaderMap,
    /// The extensions.
    pub extensions: &'a Extensions,
}

impl<'a> RequestHead<'a> {
    /// The head of `req`.
    pub fn of<B>(req: &'a Request<B>) -> Self {
        Self {
            method: req.method(),
            uri: req.uri(),
            version: req.version(),
            headers: req.headers(),
            extensions: req.extensions(),
        }
    }

    /// The head of a request taken apart (for layers that hold the body separately).
    pub fn of_parts(parts: &'a http::request::Parts) -> Self {
        Self {
            method: &parts.method,
            uri: &parts.uri,
            version: parts.version,
            headers: &parts.headers,
            extensions: &parts.extensions,
        }
    }
}

/// Finds the key a request is counted, locked or cached under.
pub trait KeyExtractor: Send + Sync + 'static {
    /// The key. `Display` is how it is written into a Redis key.
    type Key: Hash + Eq + Clone + fmt::Display + Send + Sync + 'static;

    /// The key of `req`, or `None` when there is none.
    fn extract(&self, req: &RequestHead<'_>) -> Option<Self::Key>;
}

impl<F, K> KeyExtractor for F
where
    F: Fn(&RequestHead<'_>) -> Option<K> + Send + Sync + 'static,
    K: Hash + Eq + Clone + fmt::Display + Send + Sync + 'static,
{
    type Key = K;

    fn extract(&self, req: &RequestHead<'_>) -> Option<K> {
        self(req)
    }
}

impl<X: KeyExtractor + ?Sized> KeyExtractor for Arc<X> {
    type Key = X::Key;

    fn extract(&self, req: &RequestHead<'_>) -> Option<X::Key> {
        (**self).extract(req)
    }
}

/// Two keys joined: present only when both are.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PairKey<A, B>(pub A, pub B);

impl<A: fmt::Display, B: fmt::Display> fmt::Display for PairKey<A, B> {
    /// `<length of the first>:<first>|<second>`: the length keeps `("x|y", "z")` and
    /// `("x", "y|z")` apart (they are two keys in Redis too).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let first = self.0.to_string();
        write!(f, "{}:{first}|{}", first.len(), self.1)
    }
}

impl<A: KeyExtractor, B: KeyExtractor> KeyExtractor for (A, B) {
    type Key = PairKey<A::Key, B::Key>;

    fn extract(&self, req: &RequestHead<'_>) -> Option<Self::Key> {
        Some(PairKey(self.0.extract(req)?, self.1.extract(req)?))
    }
}

/// One key for every request: a limit for the whole service (or the route it wraps).
#[derive(Clone, Copy, Debug, Default)]
pub struct Global;

/// The key [`Global`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GlobalKey;

impl fmt::Display for GlobalKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("global")
    }
}

impl KeyExtractor for Global {
    type Key = GlobalKey;

    fn extract(&self, _req: &RequestHead<'_>) -> Option<GlobalKey> {
        Some(GlobalKey)
    }
}

/// The method and path of the request (no query). Put the layer on the routes it should
/// cover; the path of a route with parameters differs per value (`/orders/1`, `/orders/2`).
/// A path longer than [`MAX_ROUTE_KEY_PATH`] bytes is keyed on its first bytes and a hash of
/// the rest, so a key costs a bounded amount of memory (and of Redis) whatever the path.
#[derive(Clone, Copy, Debug, Default)]
pub struct Route;

/// The longest path [`Route`] keeps whole in a key.
pub const MAX_ROUTE_KEY_PATH: usize = 256;

impl KeyExtractor for Route {
    type Key = String;

    fn extract(&self, req: &RequestHead<'_>) -> Option<String> {
        let path = req.uri.path();
        if path.len() <= MAX_ROUTE_KEY_PATH {
            return Some(format!("{} {path}", req.method));
        }
        // FNV-1a: the same on every replica and every build, unlike std's hashers.
        let hash = path.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        let mut cut = MAX_ROUTE_KEY_PATH - 24;
        while !path.is_char_boundary(cut) {
            cut -= 1;
        }
        Some(format!("{} {}#{hash:016x}", req.method, &path[..cut]))
    }
}

/// Longest header value [`Header`] keys on; longer values are not keys (they are refused
/// as garbage rather than stored).
pub const MAX_HEADER_KEY_LEN: usize = 256;

/// The value of one request header. Requests without it (or with a value longer than
/// [`MAX_HEADER_KEY_LEN`] bytes, or not visible ASCII) have no key.
#[derive(Clone, Debug)]
pub struct Header {
    name: HeaderName,
}

impl Header {
    /// Keys on the header `name`.
    pub fn new(name: HeaderName) -> Self {
        Self { name }
    }
}

impl KeyExtractor for Header {
    type Key = Arc<str>;

    fn extract(&self, req: &RequestHead<'_>) -> Option<Arc<str>> {
        let value = req.headers.get(&self.name)?;
        if value.len() > MAX_HEADER_KEY_LEN {
            return None;
        }
        value.to_str().ok().map(Arc::from)
    }
}

/// The subject of the authenticated [`crate::principal::Principal`] in the extensions.
/// Anonymous requests have no key.
#[derive(Clone, Copy, Debug, Default)]
pub struct Principal;

impl KeyExtractor for Principal {
    type Key = Arc<str>;

    fn extract(&self, req: &RequestHead<'_>) -> Option<Arc<str>> {
        crate::principal::Principal::of(req.extensions).map(|p| p.subject_arc().clone())
    }
}

/// The peer address of the connection, for servers that insert it themselves (a plain
/// hyper server, for example with `tower_http::add_extension::AddExtensionLayer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// An error in a [`ClientIp`] or [`Cidr`] configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A network is not `address/prefix` (or a bare address).
    #[error("invalid network {0:?}: expected an address or address/prefix, like 10.0.0.0/8")]
    InvalidNetwork(String),
    /// A prefix length is out of range for its address family.
    #[error("prefix length {0} is out of range")]
    InvalidPrefix(u8),
}

/// An IP network: an address and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The network `addr/prefix` (host bits are cleared).
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, ConfigError> {
        let addr = addr.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(ConfigError::InvalidPrefix(prefix));
        }
        Ok(Self {
            addr: mask(addr, prefix),
            prefix,
        })
    }

    /// Whether `ip` is inside this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix) == self.addr
    }
}

impl FromStr for Cidr {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let s = s.trim();
        let bad = || ConfigError::InvalidNetwork(s.to_owned());
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => {
                let addr: IpAddr = a.parse().map_err(|_| bad())?;
                let prefix: u8 = p.parse().map_err(|_| bad())?;
                (addr, prefix)
            }
            None => {
                let addr: IpAddr = s.parse().map_err(|_| bad())?;
                let canonical = addr.to_canonical();
                (addr, if canonical.is_ipv4() { 32 } else { 128 })
            }
        };
        // An IPv4-mapped IPv6 network is written against the mapped address.
        let prefix = match addr {
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() && prefix >= 96 => prefix - 96,
            _ => prefix,
        };
        Cidr::new(addr, prefix)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix.min(32)))
            };
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix.min(128)))
            };
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

/// Which header the trusted proxies write the client chain into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ProxyHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2` (the default).
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client, for=proxy1`.
    Forwarded,
}

/// The client of a request, as [`ClientIp`] found it: an address (IPv6 masked to the
/// configured prefix), or "unknown".
///
/// Sixteen bytes, with no padding: the in-memory limiters keep one per tracked client.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey {
    /// The address as IPv6 (IPv4 mapped); the unspecified address `::` stands for
    /// "unknown", which no real client has.
    bits: [u8; 16],
}

impl ClientKey {
    /// The key of every request without a usable address.
    pub const UNKNOWN: ClientKey = ClientKey { bits: [0; 16] };

    /// The key of address `ip` (as given: not masked again).
    pub fn ip(ip: IpAddr) -> Self {
        let v6 = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        ClientKey { bits: v6.octets() }
    }

    /// The address, or `None` for [`ClientKey::UNKNOWN`].
    pub fn addr(&self) -> Option<IpAddr> {
        if *self == Self::UNKNOWN {
            return None;
        }
        Some(IpAddr::V6(Ipv6Addr::from(self.bits)).to_canonical())
    }

    /// Whether this is the shared key of requests without an address.
    pub fn is_unknown(&self) -> bool {
        *self == Self::UNKNOWN
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr() {
            Some(ip) => write!(f, "{ip}"),
            None => f.write_str("unknown"),
        }
    }
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientKey({self})")
    }
}

type PeerLookup = Arc<dyn Fn(&Extensions) -> Option<IpAddr> + Send + Sync>;

/// The client's IP address, the way a proxy-aware server must find it.
///
/// - The peer address comes from, in order: the crate's [`PeerAddr`] extension, axum's
///   `ConnectInfo<SocketAddr>` (feature `axum`), tonic's `TcpConnectInfo` (feature
///   `tonic`), or a lookup of your own ([`ClientIp::peer_lookup`]).
/// - Only when the peer is inside a trusted proxy network is the proxy header read
///   (`X-Forwarded-For` by default, or RFC 7239 `Forwarded`; choose the one your proxies
///   *write*, since a client can send the other one with any content). The chain is walked
///   from the right; the first address that is not a trusted proxy is the client. Several
///   header lines are read as one list.
/// - A malformed entry stops the walk: the header is not believed past it, and the last
///   trusted hop is the key (never an address the client could have chosen).
/// - IPv6 addresses are masked to a prefix (`/64` by default, since one subscriber gets a
///   whole /64), IPv4-mapped IPv6 addresses count as IPv4.
/// - A request with no usable address at all (no peer address recorded) gets
///   [`ClientKey::UNKNOWN`]: all such requests share one key, so they are limited together
///   rather than failing. A warning is logged once, because it usually means the server was
///   not set up to record peer addresses (`into_make_service_with_connect_info` in axum).
#[derive(Clone)]
pub struct ClientIp {
    trusted: Arc<[Cidr]>,
    header: ProxyHeader,
    v4_prefix: u8,
    v6_prefix: u8,
    lookup: Option<PeerLookup>,
}

impl fmt::Debug for ClientIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIp")
            .field("trusted", &self.trusted)
            .field("header", &self.header)
            .field("v4_prefix", &self.v4_prefix)
            .field("v6_prefix", &self.v6_prefix)
            .finish_non_exhaustive()
    }
}

impl Default for ClientIp {
    fn default() -> Self {
        Self::new()
    }
}

static WARNED_UNKNOWN: AtomicBool = AtomicBool::new(false);

impl ClientIp {
    /// The peer address, trusting no proxy; IPv6 masked to /64.
    pub fn new() -> Self {
        Self {
            trusted: Arc::from(Vec::new()),
            header: ProxyHeader::XForwardedFor,
            v4_prefix: 32,
            v6_prefix: 64,
            lookup: None,
        }
    }

    /// Believes the proxy header from peers inside these networks (CIDR or bare addresses).
    pub fn trust_proxies<I, T>(mut self, networks: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: AsRef<str>,
    {
        let parsed = networks
            .into_iter()
            .map(|n| n.as_ref().parse::<Cidr>())
            .collect::<Result<Vec<_>, _>>()?;
        self.trusted = Arc::from(parsed);
        Ok(self)
    }

    /// Parses a comma-separated list of networks (for example an environment variable).
    pub fn trust_proxy_list(self, list: &str) -> Result<Self, ConfigError> {
        self.trust_proxies(list.split(',').map(str::trim).filter(|s| !s.is_empty()))
    }

    /// Reads this header from trusted proxies (default `X-Forwarded-For`).
    #[must_use]
    pub fn proxy_header(mut self, header: ProxyHeader) -> Self {
        self.header = header;
        self
    }

    /// Masks IPv6 client addresses to `prefix` bits (default 64; 128 keeps them whole).
    pub fn ipv6_prefix(mut self, prefix: u8) -> Result<Self, ConfigError> {
        if prefix > 128 {
            return Err(ConfigError::InvalidPrefix(prefix));
        }
        self.v6_prefix = prefix;
        Ok(self)
    }

    /// Masks IPv4 client addresses to `prefix` bits (default 32: whole addresses).
    pub fn ipv4_prefix(mut self, prefix: u8) -> Result<Self, ConfigError> {
        if prefix > 32 {
            return Err(ConfigError::InvalidPrefix(prefix));
        }
        self.v4_prefix = prefix;
        Ok(self)
    }

    /// Finds the peer address with `lookup` when none of the built-in sources has it (for
    /// a framework whose connection info type this crate does not know).
    #[must_use]
    pub fn peer_lookup(
        mut self,
        lookup: impl Fn(&Extensions) -> Option<IpAddr> + Send + Sync + 'static,
    ) -> Self {
        self.lookup = Some(Arc::new(lookup));
        self
    }

    /// The trusted proxy networks.
    pub fn trusted(&self) -> &[Cidr] {
        &self.trusted
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|n| n.contains(ip))
    }

    fn peer(&self, ext: &Extensions) -> Option<IpAddr> {
        // With the `axum` feature, axum's record is the likely one: look there first.
        #[cfg(feature = "axum")]
        if let Some(info) = ext.get::<axum::extract::ConnectInfo<SocketAddr>>() {
            return Some(info.0.ip());
        }
        if let Some(PeerAddr(addr)) = ext.get::<PeerAddr>() {
            return Some(addr.ip());
        }
        #[cfg(feature = "tonic")]
        if let Some(addr) = ext
            .get::<tonic::transport::server::TcpConnectInfo>()
            .and_then(|info| info.remote_addr())
        {
            return Some(addr.ip());
        }
        self.lookup.as_ref().and_then(|lookup| lookup(ext))
    }

    /// The client address of a request before masking, or `None` when there is no peer.
    pub fn client_addr(&self, req: &RequestHead<'_>) -> Option<IpAddr> {
        let peer = self.peer(req.extensions)?.to_canonical();
        if self.trusted.is_empty() || !self.is_trusted(peer) {
            return Some(peer);
        }
        let mut last_trusted = peer;
        let mut verdict = None;
        let mut walk = |entry: Option<IpAddr>| -> bool {
            match entry {
                // Garbage: believe nothing further left.
                None => {
                    verdict = Some(last_trusted);
                    false
                }
                Some(ip) if self.is_trusted(ip) => {
                    last_trusted = ip;
                    true
                }
                Some(ip) => {
                    verdict = Some(ip);
                    false
                }
            }
        };
        match self.header {
            ProxyHeader::XForwardedFor => {
                'lines: for line in req.headers.get_all(&X_FORWARDED_FOR).iter().rev() {
                    let Ok(line) = line.to_str() else {
                        walk(None);
                        break;
                    };
                    for entry in line.rsplit(',') {
                        if !walk(parse_node(entry.trim())) {
                            break 'lines;
                        }
                    }
                }
            }
            ProxyHeader::Forwarded => {
                'lines: for line in req.headers.get_all(FORWARDED).iter().rev() {
                    let Ok(line) = line.to_str() else {
                        walk(None);
                        break;
                    };
                    for element in line.rsplit(',') {
                        if !walk(forwarded_for(element)) {
                            break 'lines;
                        }
                    }
                }
            }
        }
        // Every hop was a trusted proxy: the leftmost one is as far as we can see.
        Some(verdict.unwrap_or(last_trusted))
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Parses one node of a proxy chain: `1.2.3.4`, `1.2.3.4:80`, `::1`, `[::1]` or `[::1]:80`.
fn parse_node(s: &str) -> Option<IpAddr> {
    if s.is_empty() || s.len() > 64 {
        return None;
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Some(rest) = s.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        return inside
            .parse::<Ipv6Addr>()
            .ok()
            .map(|ip| IpAddr::V6(ip).to_canonical());
    }
    let (host, port) = s.rsplit_once(':')?;
    if !is_port(port) {
        return None;
    }
    host.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
}

fn is_port(s: &str) -> bool {
    !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit())
}

/// The `for=` node of one RFC 7239 forwarded-element, or `None` when it is missing or not
/// an address (`unknown`, obfuscated identifiers, malformed quoting).
fn forwarded_for(element: &str) -> Option<IpAddr> {
    let mut found = None;
    for pair in element.split(';') {
        let (name, value) = pair.trim().split_once('=')?;
        if name.trim().eq_ignore_ascii_case("for") {
            if found.is_some() {
                return None;
            }
            let value = value.trim();
            let value = match value.strip_prefix('"') {
                Some(v) => v.strip_suffix('"')?,
                None => value,
            };
            found = Some(parse_node(value)?);
        }
    }
    found
}

impl KeyExtractor for ClientIp {
    type Key = ClientKey;

    fn extract(&self, req: &RequestHead<'_>) -> Option<ClientKey> {
        match self.client_addr(req) {
            Some(ip @ IpAddr::V4(_)) => Some(ClientKey::ip(mask(ip, self.v4_prefix))),
            Some(ip @ IpAddr::V6(_)) => Some(ClientKey::ip(mask(ip, self.v6_prefix))),
            None => {
                if !WARNED_UNKNOWN.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "battlement::key::ClientIp found no peer address; such requests share \
                         the key \"unknown\". Record peer addresses (axum: \
                         into_make_service_with_connect_info; hyper: insert PeerAddr)."
                    );
                }
                Some(ClientKey::UNKNOWN)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(peer: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder();
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let mut r = b.body(()).unwrap();
        r.extensions_mut().insert(PeerAddr(peer.parse().unwrap()));
        r
    }

    fn key(ip: &ClientIp, r: &Request<()>) -> String {
        ip.extract(&RequestHead::of(r)).unwrap().to_string()
    }

    #[test]
    fn untrusted_peer_ignores_spoofed_headers() {
        let ip = ClientIp::new().trust_proxies(["10.0.0.0/8"]).unwrap();
        let r = req("203.0.113.5:1000", &[("x-forwarded-for", "1.1.1.1")]);
        assert_eq!(key(&ip, &r), "203.0.113.5");
        let no_trust = ClientIp::new();
        let r = req("10.0.0.1:1000", &[("x-forwarded-for", "1.1.1.1")]);
        assert_eq!(key(&no_trust, &r), "10.0.0.1");
    }

    #[test]
    fn rightmost_untrusted_behind_several_proxies() {
        let ip = ClientIp::new()
            .trust_proxies(["10.0.0.0/8", "192.168.1.1"])
            .unwrap();
        let r = req(
            "10.1.1.1:80",
            &[
                ("x-forwarded-for", "9.9.9.9, 198.51.100.2"),
                ("x-forwarded-for", "192.168.1.1, 10.2.2.2"),
            ],
        );
        assert_eq!(key(&ip, &r), "198.51.100.2");
    }

    #[test]
    fn forwarded_header_parsing() {
        let ip = ClientIp::new()
            .trust_proxies(["10.0.0.0/8"])
            .unwrap()
            .proxy_header(ProxyHeader::Forwarded);
        let r = req(
            "10.0.0.1:80",
            &[(
                "forwarded",
                "for=6.6.6.6, for=\"[2001:db8:cafe::17]:4711\";proto=https, for=10.0.0.9;by=10.0.0.1",
            )],
        );
        assert_eq!(key(&ip, &r), "2001:db8:cafe::");
        // X-Forwarded-For is not read when Forwarded is configured.
        let r = req("10.0.0.1:80", &[("x-forwarded-for", "1.2.3.4")]);
        assert_eq!(key(&ip, &r), "10.0.0.1");
        // `unknown` stops the walk at the last trusted hop.
        let r = req("10.0.0.1:80", &[("forwarded", "for=1.2.3.4, for=unknown")]);
        assert_eq!(key(&ip, &r), "10.0.0.1");
    }

    #[test]
    fn ipv6_masking_and_mapped_v4() {
        let ip = ClientIp::new();
        let r = req("[2001:db8:1:2:3:4:5:6]:80", &[]);
        assert_eq!(key(&ip, &r), "2001:db8:1:2::");
        let whole = ClientIp::new().ipv6_prefix(128).unwrap();
        assert_eq!(key(&whole, &r), "2001:db8:1:2:3:4:5:6");
        let r = req("[::ffff:192.0.2.1]:80", &[]);
        assert_eq!(key(&ip, &r), "192.0.2.1");
        let v4net = ClientIp::new().ipv4_prefix(24).unwrap();
        let r = req("192.0.2.77:80", &[]);
        assert_eq!(key(&v4net, &r), "192.0.2.0");
    }

    #[test]
    fn garbage_headers_never_trusted_never_panic() {
        let ip = ClientIp::new().trust_proxies(["10.0.0.0/8"]).unwrap();
        for garbage in [
            "",
            ",,,",
            "not-an-ip",
            "1.2.3.4.5",
            "[::1",
            "[::1]x",
            "1.2.3.4:99999999",
            "💥",
            "300.1.1.1",
            &"1".repeat(10_000),
        ] {
            let r = req("10.0.0.1:80", &[("x-forwarded-for", garbage)]);
            assert_eq!(key(&ip, &r), "10.0.0.1", "{garbage:?}");
        }
        // Garbage left of the client does not matter.
        let r = req("10.0.0.1:80", &[("x-forwarded-for", "garbage, 5.5.5.5")]);
        assert_eq!(key(&ip, &r), "5.5.5.5");
        // Non-UTF-8 bytes.
        let mut r = req("10.0.0.1:80", &[]);
        r.headers_mut().insert(
            "x-forwarded-for",
            http::HeaderValue::from_bytes(b"\xff\xfe").unwrap(),
        );
        assert_eq!(key(&ip, &r), "10.0.0.1");
    }

    #[test]
    fn no_address_is_one_shared_unknown_key() {
        let ip = ClientIp::new();
        let r = Request::new(());
        assert_eq!(ip.extract(&RequestHead::of(&r)), Some(ClientKey::UNKNOWN));
        assert_eq!(ClientKey::UNKNOWN.to_string(), "unknown");
        assert!(ClientKey::ip("::1".parse().unwrap()).addr().is_some());
    }

    #[test]
    fn custom_peer_lookup() {
        #[derive(Clone)]
        struct MyConn(IpAddr);
        let ip = ClientIp::new().peer_lookup(|ext| ext.get::<MyConn>().map(|c| c.0));
        let mut r = Request::new(());
        r.extensions_mut()
            .insert(MyConn("8.8.4.4".parse().unwrap()));
        assert_eq!(key(&ip, &r), "8.8.4.4");
    }

    #[test]
    fn cidr_parsing() {
        assert!(
            "10.0.0.0/8"
                .parse::<Cidr>()
                .unwrap()
                .contains("10.9.9.9".parse().unwrap())
        );
        assert!(
            !"10.0.0.0/8"
                .parse::<Cidr>()
                .unwrap()
                .contains("11.0.0.1".parse().unwrap())
        );
        assert!(
            "::ffff:10.0.0.0/104"
                .parse::<Cidr>()
                .unwrap()
                .contains("10.1.2.3".parse().unwrap())
        );
        assert!(
            "fd00::/8"
                .parse::<Cidr>()
                .unwrap()
                .contains("fd12::1".parse().unwrap())
        );
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope".parse::<Cidr>().is_err());
        assert!(
            ClientIp::new()
                .trust_proxies(["10.0.0.0/8", "bad"])
                .is_err()
        );
    }

    #[test]
    fn other_extractors() {
        let mut r = Request::builder()
            .method("POST")
            .uri("/a/b?x=1")
            .header("x-api-key", "k1")
            .body(())
            .unwrap();
        let head = RequestHead::of(&r);
        assert_eq!(Route.extract(&head).unwrap(), "POST /a/b");
        assert_eq!(Global.extract(&head), Some(GlobalKey));
        assert_eq!(
            &*Header::new(HeaderName::from_static("x-api-key"))
                .extract(&head)
                .unwrap(),
            "k1"
        );
        assert_eq!(Principal.extract(&head), None);
        let pair = (Global, Route);
        assert_eq!(
            pair.extract(&head).unwrap().to_string(),
            "6:global|POST /a/b"
        );
        // Components with the separator in them stay apart.
        assert_ne!(
            PairKey("x|y", "z").to_string(),
            PairKey("x", "y|z").to_string()
        );
        // A long path keys on its start and a hash: bounded, and still one key per path.
        let long = |tail: &str| {
            Request::get(format!("/{}{tail}", "p".repeat(5000)))
                .body(())
                .unwrap()
        };
        let (a, b) = (long("a"), long("b"));
        let (ka, kb) = (
            Route.extract(&RequestHead::of(&a)).unwrap(),
            Route.extract(&RequestHead::of(&b)).unwrap(),
        );
        assert!(ka.len() <= MAX_ROUTE_KEY_PATH + 8, "{}", ka.len());
        assert_ne!(ka, kb);
        assert_eq!(ka, Route.extract(&RequestHead::of(&long("a"))).unwrap());
        r.extensions_mut().insert(crate::principal::Principal::new(
            "alice",
            crate::principal::AuthScheme::Bearer,
        ));
        assert_eq!(&*Principal.extract(&RequestHead::of(&r)).unwrap(), "alice");
        let closure = |h: &RequestHead<'_>| Some(h.uri.path().len());
        assert_eq!(closure.extract(&RequestHead::of(&r)), Some(4));
    }
}
