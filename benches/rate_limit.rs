//! Per-request overhead of the in-memory rate limiter, against the bare service and against
//! `tower_governor`, with the same quota and the same key, in the same run.
//!
//! Every variant drives one service with `ready().await` + `call` on a current-thread tokio
//! runtime, building a fresh `Request<()>` per iteration (every variant pays for that, the
//! bare service included), so `battlement/x - bare/x` is the layer's own cost.
//!
//! `battlement` is the layer in its native body mode (`native_body()`: it answers
//! `Response<Body>`, as tower_governor does); `battlement_wrapped` is the default mode, whose
//! responses carry `ResponseBody<Body>`. `router_global` mounts each on an axum `Router`
//! with `Router::layer`, as an application does.
//!
//! - `global`: one key for every request (`Global` / `GlobalKeyExtractor`);
//! - `peer_ip`: the peer address from axum's `ConnectInfo<SocketAddr>`, one client
//!   (`ClientIp` / `PeerIpKeyExtractor`; needs battlement's `axum` feature);
//! - `peer_ip_10k_keys`: the same, rotating through 10,000 client addresses.
//!
//! The quota (10^9 per second: one request per nanosecond, burst 10^9) never refuses, so the
//! allowed path is what is measured; a check before the benchmarks makes sure of it, and
//! that each limiter tracks the number of keys it should.
//!
//! Run with `cargo bench --all-features --bench rate_limit`.

use std::convert::Infallible;
use std::fmt::Debug;
use std::future::{Ready, ready};
use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use battlement::key::Global;
use battlement::rate_limit::{Quota, RateLimitLayer};
use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response, StatusCode};
use tokio::runtime::Runtime;
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_governor::GovernorLayer;
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::key_extractor::GlobalKeyExtractor;

/// Requests per second of the quota: an emission interval of 1 ns and a burst of 10^9.
const RATE: u32 = 1_000_000_000;
/// Distinct client addresses of the `peer_ip_10k_keys` variant.
const KEYS: usize = 10_000;

fn quota() -> Quota {
    Quota::requests_per(RATE, Duration::from_secs(1))
}

/// The same quota for `tower_governor`: one cell back every nanosecond, burst 10^9.
fn governor_config<K: tower_governor::key_extractor::KeyExtractor>(
    key: K,
) -> Arc<tower_governor::governor::GovernorConfig<K, governor::middleware::NoOpMiddleware>> {
    Arc::new(
        GovernorConfigBuilder::default()
            .per_nanosecond(1)
            .burst_size(RATE)
            .key_extractor(key)
            .finish()
            .expect("valid governor quota"),
    )
}

/// The inner service: an empty 200.
fn ok(_req: Request<()>) -> Ready<Result<Response<Body>, Infallible>> {
    ready(Ok(Response::new(Body::empty())))
}

/// Makes the requests: without a peer address when `addrs` is empty, otherwise with
/// `ConnectInfo` of each address in turn.
struct Requests<'a> {
    addrs: &'a [SocketAddr],
    next: usize,
}

impl Requests<'_> {
    #[inline]
    fn make(&mut self) -> Request<()> {
        let mut req = Request::new(());
        if !self.addrs.is_empty() {
            req.extensions_mut()
                .insert(ConnectInfo(self.addrs[self.next]));
            self.next += 1;
            if self.next == self.addrs.len() {
                self.next = 0;
            }
        }
        req
    }
}

/// `iters` requests through `svc`, one after another; the time they took.
async fn drive<S>(mut svc: S, iters: u64, mut requests: Requests<'_>) -> Duration
where
    S: Service<Request<()>>,
    S::Error: Debug,
{
    let start = Instant::now();
    for _ in 0..iters {
        let req = requests.make();
        let res = svc.ready().await.unwrap().call(req).await.unwrap();
        black_box(res);
    }
    start.elapsed()
}

/// Makes sure `svc` allows every request (so the benchmark measures the allowed path).
fn check_allows<S, B>(rt: &Runtime, name: &str, mut svc: S, addrs: &[SocketAddr])
where
    S: Service<Request<()>, Response = Response<B>>,
    S::Error: Debug,
{
    rt.block_on(async {
        let mut requests = Requests { addrs, next: 0 };
        for i in 0..2 * KEYS {
            let res = svc
                .ready()
                .await
                .unwrap()
                .call(requests.make())
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::OK, "{name}: request {i} refused");
        }
    });
}

/// Benchmarks `svc` as `group/variant`.
fn bench<S>(
    c: &mut Criterion,
    rt: &Runtime,
    group: &str,
    variant: &str,
    svc: S,
    addrs: &[SocketAddr],
) where
    S: Service<Request<()>> + Clone,
    S::Error: Debug,
{
    let mut g = c.benchmark_group(group);
    g.bench_function(variant, |b| {
        // The rotation goes on from sample to sample, so every sample sees every key.
        let mut next = 0;
        b.to_async(rt).iter_custom(|iters| {
            let svc = svc.clone();
            let requests = Requests { addrs, next };
            if !addrs.is_empty() {
                next = (next + (iters % addrs.len() as u64) as usize) % addrs.len();
            }
            drive(svc, iters, requests)
        })
    });
    g.finish();
}

/// Benchmarks the bare service, battlement with key `X` and tower_governor with key `G` on
/// the requests of `addrs`, after checking that both limiters allow every request and
/// track `expect_keys` keys.
fn compare<X, G>(
    c: &mut Criterion,
    rt: &Runtime,
    variant: &str,
    battlement_key: X,
    governor_key: G,
    addrs: &[SocketAddr],
    expect_keys: usize,
) where
    X: battlement::KeyExtractor + Clone,
    G: tower_governor::key_extractor::KeyExtractor,
{
    let bare = service_fn(ok);

    // Native body mode: answers `Response<Body>`, as tower_governor does.
    let ours = RateLimitLayer::builder()
        .policy("bench", quota())
        .key(battlement_key.clone())
        .native_body()
        .build()
        .expect("valid quota");
    let ours_svc = ours.layer(service_fn(ok));
    check_allows(rt, "battlement", ours_svc.clone(), addrs);
    assert_eq!(
        ours.backend().tracked_keys(),
        expect_keys,
        "battlement/{variant}: tracked keys"
    );
    // The default body mode: answers `Response<ResponseBody<Body>>`.
    let wrapped = RateLimitLayer::builder()
        .policy("bench", quota())
        .key(battlement_key)
        .build()
        .expect("valid quota");
    let wrapped_svc = wrapped.layer(service_fn(ok));
    check_allows(rt, "battlement_wrapped", wrapped_svc.clone(), addrs);

    let config = governor_config(governor_key);
    let governor_svc = GovernorLayer::<_, _, Body>::new(config.clone()).layer(service_fn(ok));
    check_allows(rt, "tower_governor", governor_svc.clone(), addrs);
    assert_eq!(
        config.limiter().len(),
        expect_keys,
        "tower_governor/{variant}: tracked keys"
    );

    bench(c, rt, "bare", variant, bare, addrs);
    bench(c, rt, "battlement", variant, ours_svc, addrs);
    bench(c, rt, "battlement_wrapped", variant, wrapped_svc, addrs);
    bench(c, rt, "tower_governor", variant, governor_svc, addrs);
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// `n` distinct IPv4 peers, 10.0.0.1 upwards.
fn peers(n: usize) -> Vec<SocketAddr> {
    (0..n as u32)
        .map(|i| SocketAddr::from((Ipv4Addr::from(0x0a00_0001 + i), 40_000)))
        .collect()
}

fn global(c: &mut Criterion) {
    let rt = runtime();
    compare(c, &rt, "global", Global, GlobalKeyExtractor, &[], 1);
}

/// The same quota and global key on an axum `Router` (`Router::layer`), as an application
/// mounts it: axum turns each layer's response into its own `Response<Body>`.
fn router(c: &mut Criterion) {
    use axum::Router;
    use axum::routing::get;

    let rt = runtime();
    let app = || Router::new().route("/", get(|| async { "" }));
    let layer = || {
        RateLimitLayer::builder()
            .policy("bench", quota())
            .key(Global)
    };
    let native = layer().native_body().build().expect("valid quota");
    let wrapped = layer().build().expect("valid quota");
    let variants = [
        ("bare", app()),
        ("battlement", app().layer(native)),
        ("battlement_wrapped", app().layer(wrapped)),
        (
            "tower_governor",
            app().layer(GovernorLayer::<_, _, Body>::new(governor_config(
                GlobalKeyExtractor,
            ))),
        ),
    ];
    for (name, router) in variants {
        let svc = router.map_request(|req: Request<()>| {
            let (mut parts, ()) = req.into_parts();
            parts.uri = http::Uri::from_static("/");
            Request::from_parts(parts, Body::empty())
        });
        check_allows(&rt, name, svc.clone(), &[]);
        bench(c, &rt, name, "router_global", svc, &[]);
    }
}

#[cfg(feature = "axum")]
fn peer_ip(c: &mut Criterion) {
    use battlement::key::ClientIp;
    use tower_governor::key_extractor::PeerIpKeyExtractor;

    let rt = runtime();
    let one = peers(1);
    compare(
        c,
        &rt,
        "peer_ip",
        ClientIp::new(),
        PeerIpKeyExtractor,
        &one,
        1,
    );
    let many = peers(KEYS);
    compare(
        c,
        &rt,
        "peer_ip_10k_keys",
        ClientIp::new(),
        PeerIpKeyExtractor,
        &many,
        KEYS,
    );
}

/// Without battlement's `axum` feature `ClientIp` cannot read `ConnectInfo`, so there is
/// nothing fair to compare.
#[cfg(not(feature = "axum"))]
fn peer_ip(_c: &mut Criterion) {
    let _ = peers;
    eprintln!("peer_ip benchmarks skipped: run with --all-features (battlement's `axum`)");
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50);
    targets = global, router, peer_ip
}
criterion_main!(benches);
