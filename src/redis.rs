//! Shared Redis plumbing for every Redis backend in the crate.
//!
//! One [`RedisConfig`] describes a single node or a Redis Cluster (one URL of a cluster
//! node is enough: [`RedisStore::connect`] asks the node); `connect` turns it into a
//! cheaply cloned handle that every layer can share:
//!
//! - **multiplexed connections**: one pipelined connection per node (redis-rs
//!   `ConnectionManager`, or the cluster connection), never a connection behind a mutex;
//!   both reconnect by themselves, and a single node that answers `READONLY` (a primary
//!   demoted by a failover behind a DNS name, a virtual IP or a proxy) is dialled again, so
//!   the store follows the name to the new primary;
//! - **Redis Sentinel**: [`RedisConfig::sentinel`] asks the Sentinels for the master's
//!   address, and asks again when the master answers `READONLY` or cannot be reached, so
//!   the store (and the layers' pub/sub connections) follow a failover;
//! - **a per-call timeout** (50 ms by default): no request waits longer because Redis is slow;
//! - **a circuit breaker**: after a run of failures (5 by default) calls fail at once for a
//!   cool-down (1 s by default), then one probe call is let through to see whether Redis is
//!   back;
//! - **key namespacing**: every key starts with a prefix (`battlement` by default), and the
//!   part that identifies the object is a hash tag (`battlement:rl:{client}`), so all the keys
//!   of one object land in one cluster slot and multi-key scripts never fail with CROSSSLOT
//!   (a prefix may hold no braces, and a timeout or cool-down is cut to an hour);
//! - **scripts**: Lua scripts are sent once and run with `EVALSHA`; a `NOSCRIPT` answer (a
//!   restarted or failed-over server) loads the script again and retries.
//! - **TLS** (feature `redis-tls`): `rediss://` URLs, checked against the bundled Mozilla
//!   roots, or a private certificate authority given with
//!   [`RedisConfig::tls_root_certificates`]; [`RedisConfig::tls_client_certificate`] for
//!   mutual TLS. Every connection the crate opens (calls, the lock's release notifications,
//!   the cache's purge listener, a cluster's nodes) uses them. Without the feature a
//!   `rediss://` URL is refused at connect.
//!
//! ```no_run
//! use battlement::redis::{RedisConfig, RedisStore};
//! use std::time::Duration;
//!
//! # async fn run() -> Result<(), battlement::redis::StoreError> {
//! // One node ...
//! let store = RedisStore::connect(
//!     RedisConfig::single("redis://127.0.0.1:6379/").timeout(Duration::from_millis(30)),
//! ).await?;
//! // ... or a cluster (a comma-separated list reads as one):
//! let cluster = RedisStore::connect(RedisConfig::from_list("redis://10.0.0.1:7000,redis://10.0.0.2:7000")?).await?;
//! assert_eq!(store.key("rl", &"203.0.113.7"), "battlement:rl:{203.0.113.7}");
//! # let _ = cluster; Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, Pipeline, RedisFuture, Value};

pub use redis::Script;

/// How to reach Redis, and how long to wait for it.
///
/// Its `Debug` output hides the credentials in node URLs.
#[derive(Clone)]
pub struct RedisConfig {
    nodes: Vec<String>,
    cluster: bool,
    timeout: Duration,
    connect_timeout: Duration,
    prefix: String,
    breaker_failures: u32,
    breaker_cooldown: Duration,
    /// Set when `nodes` are Redis Sentinels, asked for this master.
    sentinel: Option<SentinelMaster>,
    #[cfg(feature = "redis-tls")]
    tls: Option<redis::TlsCertificates>,
}

/// The master a Sentinel-configured store asks for, and its credentials (the Sentinels'
/// own are in their URLs).
#[derive(Clone)]
struct SentinelMaster {
    name: String,
    username: Option<String>,
    password: Option<String>,
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = f.debug_struct("RedisConfig");
        out.field("nodes", &self.redacted_nodes())
            .field("cluster", &self.cluster)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("prefix", &self.prefix)
            .field("breaker_failures", &self.breaker_failures)
            .field("breaker_cooldown", &self.breaker_cooldown)
            .field("sentinel_master", &self.sentinel.as_ref().map(|s| &s.name));
        #[cfg(feature = "redis-tls")]
        out.field("tls", &self.tls);
        out.finish()
    }
}

/// Whether `info` is a `rediss://` (TLS) address: decided from the parsed URL, whatever
/// the case of its scheme.
fn is_tls(info: &redis::ConnectionInfo) -> bool {
    matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. })
}

/// `%XX` escapes decoded (as in a URL's password); `None` for a bad escape or bytes that are
/// not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `url` with its credentials shown as `***`, for logs and errors: everything before the
/// last `@` after the scheme (a password may hold an unencoded `/`, `?` or `#`; an `@`
/// further on only hides more), and `pass`/`password` query values (which redis-rs also
/// reads).
fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let rest = match rest.rfind('@') {
        Some(at) => format!("***{}", &rest[at..]),
        None => rest.to_owned(),
    };
    let rest = match rest.split_once('?') {
        Some((before, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _))
                        if key.eq_ignore_ascii_case("pass")
                            || key.eq_ignore_ascii_case("password") =>
                    {
                        format!("{key}=***")
                    }
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{before}?{}", query.join("&"))
        }
        None => rest,
    };
    match scheme {
        Some(scheme) => format!("{scheme}://{rest}"),
        None => rest,
    }
}

/// Default per-call timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(50);

impl RedisConfig {
    /// One Redis node, for example `redis://127.0.0.1:6379/`.
    pub fn single(url: impl Into<String>) -> Self {
        Self::with_nodes(vec![url.into()], false)
    }

    /// A Redis Cluster, from one or more of its nodes.
    pub fn cluster<I, T>(nodes: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        Self::with_nodes(nodes.into_iter().map(Into::into).collect(), true)
    }

    /// A comma-separated list: one URL is a single node (or, if that node belongs to a Redis
    /// Cluster, the cluster it belongs to: [`RedisStore::connect`] finds out), several are
    /// cluster nodes. `redis+sentinel://[user:password@]host:port[,host:port...]/master` is
    /// a master found through those Sentinels (see [`sentinel`](Self::sentinel); the
    /// credentials are the master's; `rediss+sentinel://` for TLS).
    pub fn from_list(list: &str) -> Result<Self, StoreError> {
        if let Some(config) = Self::from_sentinel_url(list.trim())? {
            return Ok(config);
        }
        // A comma inside a URL's credentials (`redis://:p,w@host`) does not separate nodes:
        // a piece with no scheme that holds an `@` continues the one before.
        let mut pieces: Vec<String> = Vec::new();
        for piece in list.split(',') {
            match pieces.last_mut() {
                Some(last) if !piece.contains("://") && piece.contains('@') => {
                    last.push(',');
                    last.push_str(piece);
                }
                _ => pieces.push(piece.to_owned()),
            }
        }
        let nodes: Vec<String> = pieces
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .map(|s| {
                if s.contains("://") {
                    s.to_owned()
                } else {
                    format!("redis://{s}/")
                }
            })
            .collect();
        match nodes.len() {
            0 => Err(StoreError::Config("no Redis URL given".into())),
            1 => Ok(Self::with_nodes(nodes, false)),
            _ => Ok(Self::with_nodes(nodes, true)),
        }
    }

    /// `redis+sentinel://[user:password@]host:port[,host:port]/master`, or `None` for
    /// another scheme.
    fn from_sentinel_url(url: &str) -> Result<Option<Self>, StoreError> {
        let (scheme, rest) = if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            ("redis", rest)
        } else if let Some(rest) = url.strip_prefix("rediss+sentinel://") {
            ("rediss", rest)
        } else {
            return Ok(None);
        };
        let bad = |why: &str| StoreError::Config(format!("{}: {why}", redact_url(url)));
        // Credentials end at the last `@` (a password may hold an unencoded `/`).
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((auth, rest)) => (Some(auth), rest),
            None => (None, rest),
        };
        let (hosts, path) = rest
            .split_once('/')
            .ok_or_else(|| bad("no master name after the Sentinels"))?;
        let master = path.trim_end_matches('/');
        if master.is_empty() || master.contains('/') {
            return Err(bad("the path must be the master's name"));
        }
        let sentinels: Vec<String> = hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|h| format!("{scheme}://{h}/"))
            .collect();
        if sentinels.is_empty() {
            return Err(bad("no Sentinel address"));
        }
        let mut config = Self::sentinel(master, sentinels);
        if let Some(auth) = auth {
            let (user, password) = match auth.split_once(':') {
                Some((user, password)) => ((!user.is_empty()).then_some(user), password),
                None => (None, auth),
            };
            let decode = |text: &str| {
                percent_decode(text)
                    .ok_or_else(|| bad("the credentials are not valid percent-encoding"))
            };
            let user = user.map(decode).transpose()?;
            config = config.sentinel_master_auth(user.as_deref(), &decode(password)?);
        }
        Ok(Some(config))
    }

    fn with_nodes(nodes: Vec<String>, cluster: bool) -> Self {
        Self {
            nodes,
            cluster,
            timeout: DEFAULT_TIMEOUT,
            connect_timeout: Duration::from_secs(1),
            prefix: "battlement".into(),
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(1),
            sentinel: None,
            #[cfg(feature = "redis-tls")]
            tls: None,
        }
    }

    /// The master named `master_name` that Redis Sentinel watches: `sentinels` are the
    /// Sentinels' URLs (`redis://10.0.0.5:26379/`, with the Sentinels' own password if they
    /// have one). [`RedisStore::connect`] asks them, in turn, for the master's address, and
    /// asks again whenever the master it holds answers `READONLY` (demoted by a failover) or
    /// cannot be reached, so the store follows failovers. The master is reached over TLS
    /// when the Sentinels' URLs are `rediss://`; give its credentials with
    /// [`sentinel_master_auth`](Self::sentinel_master_auth).
    pub fn sentinel<I, T>(master_name: impl Into<String>, sentinels: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        let mut config = Self::with_nodes(sentinels.into_iter().map(Into::into).collect(), false);
        config.sentinel = Some(SentinelMaster {
            name: master_name.into(),
            username: None,
            password: None,
        });
        config
    }

    /// The credentials of the master found through Sentinel (ACL user, or `None` for the
    /// default user, and password). No effect without [`sentinel`](Self::sentinel).
    #[must_use]
    pub fn sentinel_master_auth(mut self, username: Option<&str>, password: &str) -> Self {
        if let Some(master) = &mut self.sentinel {
            master.username = username.map(str::to_owned);
            master.password = Some(password.to_owned());
        }
        self
    }

    /// The node URLs with their credentials shown as `***`, for logs.
    pub fn redacted_nodes(&self) -> Vec<String> {
        self.nodes.iter().map(|n| redact_url(n)).collect()
    }

    /// Whether the nodes are Redis Sentinels (see [`sentinel`](Self::sentinel)).
    pub fn is_sentinel(&self) -> bool {
        self.sentinel.is_some()
    }

    /// Trusts these root certificates (PEM, one or more) for `rediss://` nodes, instead of
    /// the bundled Mozilla roots: a private certificate authority (a self-hosted Redis,
    /// Google Memorystore's server CA). Every connection the crate opens uses them (calls,
    /// the lock's and the cache's pub/sub, a cluster's nodes).
    #[cfg(feature = "redis-tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-tls")))]
    #[must_use]
    pub fn tls_root_certificates(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_mut().root_cert = Some(pem.into());
        self
    }

    /// Presents this client certificate chain and private key (PEM) to `rediss://` nodes
    /// that ask for one (mutual TLS, `tls-auth-clients yes`).
    #[cfg(feature = "redis-tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis-tls")))]
    #[must_use]
    pub fn tls_client_certificate(
        mut self,
        certificate_pem: impl Into<Vec<u8>>,
        key_pem: impl Into<Vec<u8>>,
    ) -> Self {
        self.tls_mut().client_tls = Some(redis::ClientTlsConfig {
            client_cert: certificate_pem.into(),
            client_key: key_pem.into(),
        });
        self
    }

    #[cfg(feature = "redis-tls")]
    fn tls_mut(&mut self) -> &mut redis::TlsCertificates {
        self.tls.get_or_insert(redis::TlsCertificates {
            client_tls: None,
            root_cert: None,
        })
    }

    /// A redis-rs client for node `url`, with this configuration's certificates when it is
    /// a `rediss://` URL.
    #[cfg_attr(not(any(feature = "lock", feature = "cache")), allow(dead_code))]
    pub(crate) fn client(&self, url: &str) -> Result<redis::Client, redis::RedisError> {
        self.client_for(redis::IntoConnectionInfo::into_connection_info(url)?)
    }

    fn client_for(&self, info: redis::ConnectionInfo) -> Result<redis::Client, redis::RedisError> {
        let info = info.set_tcp_settings(tcp_settings(self));

        #[cfg(feature = "redis-tls")]
        if is_tls(&info) {
            tls_provider();
            if let Some(certs) = &self.tls {
                return redis::Client::build_with_tls(info, certs.clone());
            }
        }
        redis::Client::open(info)
    }

    /// A redis-rs cluster client builder for the nodes, with this configuration's
    /// certificates when they are `rediss://` URLs.
    pub(crate) fn cluster_client(&self) -> redis::cluster::ClusterClientBuilder {
        #[allow(unused_mut)]
        let mut builder = redis::cluster::ClusterClientBuilder::new(self.nodes.clone())
            .tcp_settings(tcp_settings(self));
        #[cfg(feature = "redis-tls")]
        if self.nodes.iter().any(|n| {
            redis::IntoConnectionInfo::into_connection_info(n.as_str()).is_ok_and(|i| is_tls(&i))
        }) {
            tls_provider();
            if let Some(certs) = &self.tls {
                builder = builder.certs(certs.clone());
            }
        }
        builder
    }

    /// Longest wait for one call (default 50 ms). A call that takes longer fails with
    /// [`StoreError::Timeout`] and counts as a failure for the circuit breaker.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.min(MAX_WAIT);
        self
    }

    /// Longest wait to open a connection (default 1 s).
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout.min(MAX_WAIT);
        self
    }

    /// The prefix of every key (default `battlement`), to share a Redis between services.
    /// It may not hold `{` or `}` (the id after it is each key's Redis Cluster hash tag);
    /// [`RedisStore::connect`] refuses such a prefix.
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Opens the circuit after `failures` consecutive failures, for `cooldown`.
    #[must_use]
    pub fn circuit_breaker(mut self, failures: u32, cooldown: Duration) -> Self {
        self.breaker_failures = failures.max(1);
        self.breaker_cooldown = cooldown.min(MAX_WAIT);
        self
    }

    /// The configured node URLs (one for a single node).
    pub fn nodes(&self) -> &[String] {
        &self.nodes
    }

    /// How long opening a connection may take.
    #[cfg_attr(not(feature = "lock"), allow(dead_code))]
    pub(crate) fn connect_limit(&self) -> Duration {
        self.connect_timeout
    }

    /// Whether this configuration is for a cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// The per-call timeout.
    pub fn call_timeout(&self) -> Duration {
        self.timeout
    }
}

/// Makes sure rustls has a process-wide crypto provider before redis-rs builds a TLS
/// configuration with it: aws-lc-rs (as `jsonwebtoken` here), unless the application
/// installed one. Without it, an application whose dependencies enable both of rustls's
/// providers would panic on its first `rediss://` connection.
#[cfg(feature = "redis-tls")]
fn tls_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }
}

/// Why a Redis call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The call took longer than the configured timeout.
    #[error("redis call timed out after {0:?}")]
    Timeout(Duration),
    /// The circuit breaker is open: recent calls failed, so this one was not tried.
    #[error("redis circuit breaker is open")]
    CircuitOpen,
    /// Redis answered with an error, or the connection failed.
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
    /// The configuration is unusable.
    #[error("redis configuration: {0}")]
    Config(String),
    /// Redis answered something the caller did not expect.
    #[error("unexpected redis reply: {0}")]
    Protocol(String),
}

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// The longest timeout or cool-down a configuration keeps (an hour): longer ones, up to
/// `Duration::MAX`, are cut to it, so no clock arithmetic overflows.
const MAX_WAIT: Duration = Duration::from_secs(3600);

/// A connection to Redis (one node or a cluster) that can be cloned freely: clones share
/// one multiplexed connection. It implements redis-rs's `ConnectionLike`, so any redis-rs
/// command runs on it.
#[derive(Clone)]
pub struct RedisConnection(Conn);

impl fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Conn::Single(_) => f.write_str("RedisConnection::Single"),
            Conn::Cluster(_) => f.write_str("RedisConnection::Cluster"),
        }
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.0 {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.0 {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.0 {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// The state of a [`RedisStore`]'s circuit breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go to Redis.
    Closed,
    /// Calls fail at once until the cool-down ends.
    Open,
}

struct Breaker {
    failures: AtomicU32,
    /// Nanoseconds since `base` until which the circuit is open (0 = closed).
    open_until: AtomicU64,
    threshold: u32,
    cooldown: Duration,
    base: tokio::time::Instant,
}

impl Breaker {
    fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64 + 1
    }

    /// Whether a call may go ahead. When the cool-down is over, exactly one caller wins the
    /// right to probe; the others keep failing fast until it reports back.
    fn admit(&self) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        let now = self.now();
        if now < until {
            return false;
        }
        let next = now + self.cooldown.as_nanos() as u64;
        self.open_until
            .compare_exchange(until, next, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    fn success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.open_until.load(Ordering::Relaxed) != 0 {
            self.open_until.store(0, Ordering::Release);
            tracing::info!("battlement: redis is reachable again; circuit breaker closed");
        }
    }

    fn failure(&self) {
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= self.threshold {
            let until = self.now() + self.cooldown.as_nanos() as u64;
            if self.open_until.swap(until, Ordering::AcqRel) == 0 {
                tracing::warn!(
                    failures = n,
                    "battlement: redis calls are failing; circuit breaker opened"
                );
            }
        }
    }

    fn state(&self) -> BreakerState {
        let until = self.open_until.load(Ordering::Acquire);
        if until != 0 && self.now() < until {
            BreakerState::Open
        } else {
            BreakerState::Closed
        }
    }
}

struct Inner {
    /// The current connection: swapped for a new one when a single node turns out to be a
    /// replica (see [`RedisStore::redial`]).
    conn: arc_swap::ArcSwap<Conn>,
    /// The node a single-node store is connected to (its URL's, or the master the
    /// Sentinels named last), for the pub/sub connections of the layers; `None` on a
    /// cluster.
    node: arc_swap::ArcSwap<Option<redis::ConnectionInfo>>,
    config: RedisConfig,
    breaker: Breaker,
    /// Whether a redial is under way, and when (nanoseconds on the breaker's clock) the
    /// last one started: at most one at a time, and one a second.
    redialing: std::sync::atomic::AtomicBool,
    redialed_at: AtomicU64,
    /// The Sentinel that named the master last: asked first next time.
    sentinel: std::sync::atomic::AtomicUsize,
    /// The runtime the store was made on, which redials run on (the runtime of the request
    /// that set one off may be gone before it ends).
    runtime: Option<tokio::runtime::Handle>,
}

/// The least time between two redials of a single node that answers `READONLY`.
const REDIAL_INTERVAL: Duration = Duration::from_secs(1);

/// A shared handle to Redis: connection, timeout, circuit breaker and key prefix.
/// Clones share everything.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("config", &self.inner.config)
            .field("breaker", &self.inner.breaker.state())
            .finish()
    }
}

async fn connect_cluster(config: &RedisConfig) -> Result<Conn, StoreError> {
    let client = config
        .cluster_client()
        .connection_timeout(config.connect_timeout)
        .response_timeout(config.connect_timeout)
        .retries(2)
        .min_retry_wait(5)
        .max_retry_wait(50)
        .build()?;
    let conn = tokio::time::timeout(config.connect_timeout * 3, client.get_async_connection())
        .await
        .map_err(|_| StoreError::Timeout(config.connect_timeout * 3))??;
    Ok(Conn::Cluster(conn))
}

/// What [`dial`] connected to.
struct Dialled {
    conn: ConnectionManager,
    node: redis::ConnectionInfo,
    /// The Sentinel that named it (0 without Sentinels): the next redial asks it first.
    sentinel: usize,
}

/// Connects a single-node store: to its URL, or to the master the Sentinels name, asking
/// them in turn from the `start`th (the last that answered well) and keeping only a node
/// that says it is a master (a Sentinel cut off from the others may still name the old
/// one). `verify` asks a plain node too (a redial after `READONLY` that reaches the same
/// replica again is no better than the connection it would replace).
async fn dial(config: &RedisConfig, start: usize, verify: bool) -> Result<Dialled, StoreError> {
    let Some(master) = &config.sentinel else {
        let node = redis::IntoConnectionInfo::into_connection_info(config.nodes[0].as_str())?;
        let conn = connect_single(config, node.clone()).await?;
        if verify && !is_master(&conn, config.connect_timeout).await {
            return Err(StoreError::Protocol(format!(
                "{} is a replica",
                redact_url(&config.nodes[0])
            )));
        }
        return Ok(Dialled {
            conn,
            node,
            sentinel: 0,
        });
    };
    let count = config.nodes.len();
    let mut failure = None;
    for k in 0..count {
        let sentinel = (start + k) % count;
        let node = match ask_sentinel(config, master, sentinel).await {
            Ok(node) => node,
            Err(err) => {
                failure = Some(err);
                continue;
            }
        };
        match connect_single(config, node.clone()).await {
            Ok(conn) if is_master(&conn, config.connect_timeout).await => {
                return Ok(Dialled {
                    conn,
                    node,
                    sentinel,
                });
            }
            Ok(_) => {
                failure = Some(StoreError::Protocol(format!(
                    "the Sentinel at {} names {} as master {:?}, and it is a replica",
                    redact_url(&config.nodes[sentinel]),
                    node.addr(),
                    master.name
                )))
            }
            Err(err) => failure = Some(err),
        }
    }
    Err(failure.unwrap_or_else(|| StoreError::Config("no Sentinel given".into())))
}

/// The address Sentinel `index` gives for the master, with the master's credentials, over
/// TLS when the Sentinel is reached over TLS.
async fn ask_sentinel(
    config: &RedisConfig,
    master: &SentinelMaster,
    index: usize,
) -> Result<redis::ConnectionInfo, StoreError> {
    let url = &config.nodes[index];
    let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())?;
    let tls = is_tls(&info);
    let asked = async {
        let mut conn = config
            .client_for(info)?
            .get_multiplexed_async_connection()
            .await?;
        redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(&master.name)
            .query_async::<Option<(String, u16)>>(&mut conn)
            .await
    };
    let (host, port) = match tokio::time::timeout(config.connect_timeout, asked).await {
        Ok(Ok(Some(addr))) => addr,
        Ok(Ok(None)) => {
            return Err(StoreError::Config(format!(
                "the Sentinel at {} knows no master named {:?}",
                redact_url(url),
                master.name
            )));
        }
        Ok(Err(err)) => return Err(StoreError::Redis(err)),
        Err(_) => return Err(StoreError::Timeout(config.connect_timeout)),
    };
    let addr = if tls {
        redis::ConnectionAddr::TcpTls {
            host,
            port,
            insecure: false,
            tls_params: None,
        }
    } else {
        redis::ConnectionAddr::Tcp(host, port)
    };
    let mut settings = redis::RedisConnectionInfo::default();
    if let Some(user) = &master.username {
        settings = settings.set_username(user);
    }
    if let Some(password) = &master.password {
        settings = settings.set_password(password);
    }
    Ok(redis::IntoConnectionInfo::into_connection_info(addr)?.set_redis_settings(settings))
}

/// Whether the node behind `conn` says it is a master (`ROLE`). A node that cannot be
/// asked (an ACL without `ROLE`, no answer in time) is taken at its word.
async fn is_master(conn: &ConnectionManager, limit: Duration) -> bool {
    let mut conn = conn.clone();
    let role = redis::cmd("ROLE");
    match tokio::time::timeout(limit, role.query_async::<Value>(&mut conn)).await {
        Ok(Ok(Value::Array(items))) => match items.first() {
            Some(Value::BulkString(role)) => role.as_slice() == b"master",
            Some(Value::SimpleString(role)) => role == "master",
            _ => true,
        },
        _ => true,
    }
}

/// The TCP settings of every connection the crate opens: `TCP_NODELAY` (redis-rs leaves
/// Nagle's algorithm on, which holds a command back while another is unanswered on the
/// same multiplexed connection); keepalive probes after 30 s idle, so that an idle
/// connection (a pub/sub subscription waiting for releases or purges) notices a peer that
/// vanished without a reset instead of waiting for ever; and on Linux `TCP_USER_TIMEOUT`
/// (see [`connect_single`]), which also bounds the probes.
fn tcp_settings(config: &RedisConfig) -> redis::io::tcp::TcpSettings {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(5));
    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    let keepalive = keepalive.with_retries(3);
    let settings = redis::io::tcp::TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(keepalive);
    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    let settings = settings.set_user_timeout(
        (config.timeout * 20).clamp(Duration::from_secs(2), Duration::from_secs(30)),
    );
    #[cfg(not(any(target_os = "android", target_os = "fuchsia", target_os = "linux")))]
    let _ = config;
    settings
}

async fn connect_single(
    config: &RedisConfig,
    info: redis::ConnectionInfo,
) -> Result<ConnectionManager, StoreError> {
    // A connection whose peer vanished without a reset (a crashed host, a failover to
    // another address, a dropped NAT entry) would otherwise be kept until the kernel gave
    // up retransmitting, minutes later: every call in between times out and the manager
    // never learns it should reconnect. Unacknowledged data for a few seconds now ends
    // the connection (`client_for` applies [`tcp_settings`]), and the manager opens
    // another.
    let client = config.client_for(info)?;
    let manager_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(config.connect_timeout))
        // Every call is bounded by `call`'s own timeout: a second timer per request inside
        // redis-rs would only cost time.
        .set_response_timeout(None)
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(5))
        .set_max_delay(Duration::from_millis(100));
    let conn = tokio::time::timeout(
        config.connect_timeout * 2,
        ConnectionManager::new_with_config(client, manager_config),
    )
    .await
    .map_err(|_| StoreError::Timeout(config.connect_timeout * 2))??;
    Ok(conn)
}

/// Whether `err` says the node is a replica: `READONLY`, also as Redis before 7.0 reports
/// it from inside a script (`ERR Error running script ... -READONLY You can't write
/// against a read only replica.`).
fn read_only(err: &redis::RedisError) -> bool {
    err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
        || (matches!(err.kind(), redis::ErrorKind::Server(_))
            && err
                .detail()
                .is_some_and(|d| d.contains("READONLY You can't write")))
}

impl RedisStore {
    /// Connects to Redis. Fails if no connection can be opened now; once connected, the
    /// store reconnects by itself after Redis goes away and comes back.
    pub async fn connect(mut config: RedisConfig) -> Result<Self, StoreError> {
        if config.prefix.is_empty() || config.prefix.contains(['{', '}']) {
            return Err(StoreError::Config(format!(
                "the key prefix {:?} must be non-empty and hold no braces (the id after it is the hash tag)",
                config.prefix
            )));
        }
        let mut node = None;
        let mut sentinel = 0;
        let conn = if config.cluster {
            connect_cluster(&config).await?
        } else {
            let dialled = dial(&config, 0, false).await?;
            node = Some(dialled.node);
            sentinel = dialled.sentinel;
            let single = dialled.conn;
            // One URL that names a node of a Redis Cluster: the whole cluster, seeded from
            // it (as a single node, every key in another node's slots would be refused
            // with MOVED). A Sentinel names no cluster node.
            let mut probe = single.clone();
            let info = match config.sentinel {
                Some(_) => None,
                None => tokio::time::timeout(
                    config.connect_timeout,
                    redis::cmd("INFO")
                        .arg("cluster")
                        .query_async::<String>(&mut probe),
                )
                .await
                .ok(),
            };
            if matches!(&info, Some(Ok(text)) if text.contains("cluster_enabled:1")) {
                config.cluster = true;
                node = None;
                connect_cluster(&config).await?
            } else {
                Conn::Single(single)
            }
        };
        let breaker = Breaker {
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            threshold: config.breaker_failures,
            cooldown: config.breaker_cooldown,
            base: tokio::time::Instant::now(),
        };
        Ok(Self {
            inner: Arc::new(Inner {
                conn: arc_swap::ArcSwap::from_pointee(conn),
                node: arc_swap::ArcSwap::from_pointee(node),
                config,
                breaker,
                redialing: std::sync::atomic::AtomicBool::new(false),
                redialed_at: AtomicU64::new(0),
                sentinel: std::sync::atomic::AtomicUsize::new(sentinel),
                runtime: tokio::runtime::Handle::try_current().ok(),
            }),
        })
    }

    /// The configuration this store was made from.
    pub fn config(&self) -> &RedisConfig {
        &self.inner.config
    }

    /// A clone of the shared connection (no new socket), for commands of your own. Calls
    /// made on it bypass the timeout and the circuit breaker: use [`RedisStore::call`]. A
    /// clone keeps the connection it was taken from: after the store redials a demoted
    /// primary, take a new one.
    pub fn connection(&self) -> RedisConnection {
        RedisConnection(Conn::clone(&self.inner.conn.load()))
    }

    /// A redis-rs client for the node a single-node store is connected to now (the master
    /// the Sentinels named last, with a Sentinel configuration); `None` on a cluster.
    #[cfg_attr(not(any(feature = "lock", feature = "cache")), allow(dead_code))]
    pub(crate) fn node_client(&self) -> Option<redis::Client> {
        let node = self.inner.node.load();
        let info = (**node).clone()?;
        self.inner.config.client_for(info).ok()
    }

    /// Opens a new connection to a single node that answered `READONLY`, in the background,
    /// and makes it the store's: the node's address now names a replica (a primary demoted
    /// by a failover), and redis-rs keeps a connection that answers, so only a new one,
    /// which resolves the name again, reaches the new primary behind a DNS name, a virtual
    /// IP or a proxy. With Sentinels, the master is asked for again (also when the one held
    /// cannot be reached). At most one redial at a time and one a second; calls go on over
    /// the old connection meanwhile (and fail, which the breaker counts). A Redis Cluster
    /// follows its failovers by itself.
    fn redial(&self, used: &Arc<Conn>, demoted: bool) {
        let inner = &self.inner;
        // Only single nodes; and not for an answer from a connection already replaced (a
        // call still running on it when the redial ended).
        if !matches!(**used, Conn::Single(_)) || !Arc::ptr_eq(used, &inner.conn.load()) {
            return;
        }
        let now = inner.breaker.now();
        let last = inner.redialed_at.load(Ordering::Acquire);
        if last != 0 && now.saturating_sub(last) < REDIAL_INTERVAL.as_nanos() as u64 {
            return;
        }
        let Some(runtime) = inner
            .runtime
            .clone()
            .or_else(|| tokio::runtime::Handle::try_current().ok())
        else {
            return;
        };
        if inner.redialing.swap(true, Ordering::AcqRel) {
            return;
        }
        inner.redialed_at.store(now, Ordering::Release);
        /// Ends a redial however its task ends (finished, or dropped with its runtime).
        struct Done(std::sync::Weak<Inner>);
        impl Drop for Done {
            fn drop(&mut self) {
                if let Some(inner) = self.0.upgrade() {
                    inner
                        .redialed_at
                        .store(inner.breaker.now(), Ordering::Release);
                    inner.redialing.store(false, Ordering::Release);
                }
            }
        }
        let weak = Arc::downgrade(inner);
        runtime.spawn(async move {
            let _done = Done(weak.clone());
            let Some((config, start)) = weak.upgrade().map(|inner| {
                let start = inner.sentinel.load(Ordering::Acquire);
                (inner.config.clone(), start)
            }) else {
                return;
            };
            // An unreachable master that the Sentinels still name: redis-rs reconnects to
            // it by itself; a new connection would only add one more to retry.
            if !demoted && let Some(master) = &config.sentinel {
                let named = ask_sentinel(&config, master, start % config.nodes.len()).await;
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                let current = inner.node.load();
                if let (Ok(named), Some(current)) = (&named, current.as_ref())
                    && named.addr() == current.addr()
                {
                    return;
                }
            }
            let dialled = dial(&config, start, true).await;
            let Some(inner) = weak.upgrade() else {
                return;
            };
            let node = redact_url(&config.nodes[0]);
            match dialled {
                Ok(dialled) => {
                    tracing::warn!(
                        node,
                        master = %dialled.node.addr(),
                        "battlement: redis answered READONLY or could not be reached; connected again"
                    );
                    inner.conn.store(Arc::new(Conn::Single(dialled.conn)));
                    inner.node.store(Arc::new(Some(dialled.node)));
                    inner.sentinel.store(dialled.sentinel, Ordering::Release);
                }
                Err(err) => tracing::warn!(
                    node,
                    error = %err,
                    "battlement: redis answered READONLY or could not be reached; connecting again failed"
                ),
            }
        });
    }

    /// The circuit breaker's state.
    pub fn breaker_state(&self) -> BreakerState {
        self.inner.breaker.state()
    }

    /// The key of object `id` of kind `kind`: `{prefix}:{kind}:{{id}}`. The id is the hash
    /// tag, so every key made for one id is in one cluster slot.
    pub fn key(&self, kind: &str, id: &dyn fmt::Display) -> String {
        format!("{}:{}:{{{}}}", self.inner.config.prefix, kind, id)
    }

    /// [`key`](Self::key) for a string id, without the formatting machinery (hot paths).
    #[cfg_attr(not(any(feature = "lock", feature = "cache")), allow(dead_code))]
    pub(crate) fn key_str(&self, kind: &str, id: &str) -> String {
        let prefix = &self.inner.config.prefix;
        let mut key = String::with_capacity(prefix.len() + kind.len() + id.len() + 4);
        key.push_str(prefix);
        key.push(':');
        key.push_str(kind);
        key.push_str(":{");
        key.push_str(id);
        key.push('}');
        key
    }

    /// Runs `call` on the shared connection under the timeout and the circuit breaker.
    pub async fn call<T, F, Fut>(&self, call: F) -> Result<T, StoreError>
    where
        F: FnOnce(RedisConnection) -> Fut,
        Fut: Future<Output = Result<T, redis::RedisError>>,
    {
        self.call_inner(true, call).await
    }

    async fn call_inner<T, F, Fut>(&self, guarded: bool, call: F) -> Result<T, StoreError>
    where
        F: FnOnce(RedisConnection) -> Fut,
        Fut: Future<Output = Result<T, redis::RedisError>>,
    {
        let breaker = &self.inner.breaker;
        if guarded && !breaker.admit() {
            return Err(StoreError::CircuitOpen);
        }
        let timeout = self.inner.config.timeout;
        let used = self.inner.conn.load_full();
        let result = tokio::time::timeout(timeout, call(RedisConnection(Conn::clone(&used)))).await;
        match &result {
            Ok(Err(err)) if read_only(err) => self.redial(&used, true),
            // A master that cannot be reached may have been replaced: the Sentinels know.
            Ok(Err(err)) if self.inner.config.sentinel.is_some() && err.is_io_error() => {
                self.redial(&used, false)
            }
            Err(_) if self.inner.config.sentinel.is_some() => self.redial(&used, false),
            _ => {}
        }
        if !guarded {
            return match result {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(err)) => Err(StoreError::Redis(err)),
                Err(_) => Err(StoreError::Timeout(timeout)),
            };
        }
        match result {
            Ok(Ok(value)) => {
                breaker.success();
                Ok(value)
            }
            Ok(Err(err)) => {
                // A script error is the caller's bug, not an outage; a server that is
                // loading, read-only (a demoted primary), or a cluster that is down or
                // mid-failover is one.
                use redis::ServerErrorKind as K;
                let outage = read_only(&err)
                    || matches!(
                        err.kind(),
                        redis::ErrorKind::Server(
                            K::BusyLoading | K::MasterDown | K::ClusterDown | K::TryAgain
                        )
                    );
                if outage || !matches!(err.kind(), redis::ErrorKind::Server(_)) || err.is_io_error()
                {
                    breaker.failure();
                } else {
                    breaker.success();
                }
                Err(StoreError::Redis(err))
            }
            Err(_) => {
                breaker.failure();
                Err(StoreError::Timeout(timeout))
            }
        }
    }

    /// Runs `script` (EVALSHA, loading it again on NOSCRIPT) under the timeout and breaker.
    pub async fn eval<T: FromRedisValue>(
        &self,
        script: &Script,
        keys: &[&str],
        args: &[&[u8]],
    ) -> Result<T, StoreError> {
        self.eval_inner(true, script, keys, args).await
    }

    /// [`eval`](Self::eval) past an open breaker, and not counted by it: for the clean-up
    /// that must reach Redis as soon as it answers again (a lock's release, the undo of an
    /// acquisition or a claim whose answer was lost), whatever the requests' calls have
    /// been seeing.
    #[cfg(any(feature = "lock", feature = "idempotency"))]
    pub(crate) async fn eval_unguarded<T: FromRedisValue>(
        &self,
        script: &Script,
        keys: &[&str],
        args: &[&[u8]],
    ) -> Result<T, StoreError> {
        self.eval_inner(false, script, keys, args).await
    }

    async fn eval_inner<T: FromRedisValue>(
        &self,
        guarded: bool,
        script: &Script,
        keys: &[&str],
        args: &[&[u8]],
    ) -> Result<T, StoreError> {
        self.call_inner(guarded, |mut conn| async move {
            // EVALSHA built in place (redis-rs's invocation copies every key and argument
            // twice); only a NOSCRIPT answer goes through it, which loads the script.
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(script.get_hash()).arg(keys.len());
            for key in keys {
                cmd.arg(*key);
            }
            for arg in args {
                cmd.arg(*arg);
            }
            match cmd.query_async(&mut conn).await {
                Err(err)
                    if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    let mut invocation = script.prepare_invoke();
                    for key in keys {
                        invocation.key(*key);
                    }
                    for arg in args {
                        invocation.arg(*arg);
                    }
                    invocation.invoke_async(&mut conn).await
                }
                answer => answer,
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_only_is_recognised_also_inside_a_script_error() {
        let error = |resp: &[u8]| {
            redis::parse_redis_value(resp)
                .unwrap()
                .extract_error()
                .unwrap_err()
        };
        assert!(read_only(&error(
            b"-READONLY You can't write against a read only replica.\r\n"
        )));
        // Redis 6: the error of a write inside a script.
        assert!(read_only(&error(
            b"-ERR Error running script (call to f_0): @user_script:2: @user_script: 2: -READONLY You can't write against a read only replica.\r\n"
        )));
        assert!(!read_only(&error(b"-ERR wrong number of arguments\r\n")));
        assert!(!read_only(&error(b"-NOSCRIPT No matching script\r\n")));
    }

    #[test]
    fn sentinel_urls_name_the_sentinels_and_the_master() {
        let c =
            RedisConfig::from_list("redis+sentinel://:p%40ss@s1:26379,s2:26380/orders").unwrap();
        assert!(c.is_sentinel() && !c.is_cluster());
        assert_eq!(c.nodes(), ["redis://s1:26379/", "redis://s2:26380/"]);
        let master = c.sentinel.as_ref().unwrap();
        assert_eq!(master.name, "orders");
        assert_eq!(master.username, None);
        assert_eq!(master.password.as_deref(), Some("p@ss"));
        let c = RedisConfig::from_list("redis+sentinel://:se/cret@s1:26379/m").unwrap();
        assert_eq!(
            c.sentinel.as_ref().unwrap().password.as_deref(),
            Some("se/cret")
        );
        let c = RedisConfig::from_list("rediss+sentinel://app:pw@s1:26379/m/").unwrap();
        assert_eq!(c.nodes(), ["rediss://s1:26379/"]);
        let master = c.sentinel.as_ref().unwrap();
        assert_eq!(
            (master.username.as_deref(), master.name.as_str()),
            (Some("app"), "m")
        );
        for bad in [
            "redis+sentinel://s1:26379",
            "redis+sentinel://s1:26379/",
            "redis+sentinel:///m",
            "redis+sentinel://:%zz@s1/m",
            "redis+sentinel://:%+4@s1/m",
            "redis+sentinel://:se/cret@s1:26379",
        ] {
            let error = RedisConfig::from_list(bad).expect_err(bad).to_string();
            assert!(
                !error.contains("%zz") && !error.contains("%+4") && !error.contains("cret"),
                "{error}"
            );
        }
    }

    #[test]
    fn debug_output_hides_credentials() {
        assert_eq!(redact_url("redis://:pw@h:6379/0"), "redis://***@h:6379/0");
        assert_eq!(redact_url("rediss://u:p@s@h/"), "rediss://***@h/");
        assert_eq!(redact_url("redis://h:1/?x=a@b"), "redis://***@b");
        assert_eq!(redact_url("redis://:se/cret@h:1/0"), "redis://***@h:1/0");
        assert_eq!(redact_url("redis://:a#b@h/"), "redis://***@h/");
        assert_eq!(
            redact_url("redis+unix:///s.sock?db=1&pass=secret"),
            "redis+unix:///s.sock?db=1&pass=***"
        );
        assert_eq!(
            redact_url("redis+sentinel://:se/cret@s1:26379/m"),
            "redis+sentinel://***@s1:26379/m"
        );
        assert_eq!(redact_url("u:p@h:1"), "***@h:1");
        assert_eq!(redact_url("redis://h:1"), "redis://h:1");
        let shown = format!("{:?}", RedisConfig::single("redis://app:s3cret@h:1/"));
        assert!(
            shown.contains("***@h:1") && !shown.contains("s3cret"),
            "{shown}"
        );
    }

    #[test]
    fn from_list_picks_single_or_cluster() {
        let one = RedisConfig::from_list("redis://127.0.0.1:6379").unwrap();
        assert!(!one.is_cluster());
        // A comma in the credentials does not split the URL.
        let one = RedisConfig::from_list("redis://:p,w@127.0.0.1:6379/").unwrap();
        assert_eq!(one.nodes(), ["redis://:p,w@127.0.0.1:6379/"]);
        assert!(!one.is_cluster());
        let many = RedisConfig::from_list("127.0.0.1:7000, 127.0.0.1:7001").unwrap();
        assert!(many.is_cluster());
        assert_eq!(many.nodes[0], "redis://127.0.0.1:7000/");
        assert!(RedisConfig::from_list(" , ").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn breaker_opens_then_lets_one_probe_through() {
        let b = Breaker {
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            threshold: 3,
            cooldown: Duration::from_secs(1),
            base: tokio::time::Instant::now(),
        };
        for _ in 0..3 {
            assert!(b.admit());
            b.failure();
        }
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.admit());
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert!(b.admit(), "one probe after the cool-down");
        assert!(!b.admit(), "only one probe");
        b.success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.admit());
    }
}
