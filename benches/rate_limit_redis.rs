//! Throughput and latency of the Redis-backed rate limiter, on a `redis-server` the bench
//! starts itself (on a free loopback port, no persistence; killed at the end).
//!
//! 64 caller tasks on a 2-worker multi-thread tokio runtime send checks through the layer
//! (`oneshot`), keyed by an `x-api-key` header spread over 1,000 keys, with a quota that
//! never refuses. Redis failures refuse (`FailurePolicy::Closed`) instead of falling back
//! to memory, so any of them fails the bench rather than flattering it.
//!
//! - criterion group `rate_limit_redis`: checks/s at 64 callers (`iter_custom`);
//! - then one fixed pass of 20,000 checks printing checks/s, p50 and p99 latency, and the
//!   `EVALSHA`/`EVAL` calls per check read from `INFO commandstats` (it panics unless every
//!   check is exactly one script call: one round trip).
//!
//! Run with `cargo bench --all-features --bench rate_limit_redis`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use battlement::key::Header;
use battlement::rate_limit::{FailurePolicy, Quota, RateLimit, RateLimitLayer, RedisBackend};
use battlement::redis::{RedisConfig, RedisStore};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::header::HeaderName;
use http::{HeaderValue, Request, Response, StatusCode};
use tokio::runtime::Runtime;
use tokio::task::JoinSet;
use tower::util::ServiceFn;
use tower::{Layer, Service, ServiceExt, service_fn};

use support::RedisServer;

/// Concurrent caller tasks.
const CALLERS: usize = 64;
/// Distinct keys the checks are spread over.
const KEYS: usize = 1000;
/// Checks in the fixed latency pass.
const PASS_CHECKS: usize = 20_000;
/// Checks before the fixed pass (script loaded, connection warm).
const WARM_UP_CHECKS: usize = 2_000;

static API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// The inner service's handler: an empty 200.
fn ok(_req: Request<()>) -> Ready<Result<Response<Body>, Infallible>> {
    ready(Ok(Response::new(Body::empty())))
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The inner service: an empty 200.
type Inner = ServiceFn<fn(Request<()>) -> Ready<Result<Response<Body>, Infallible>>>;
/// The service under test.
type Limited = RateLimit<Inner, Header, RedisBackend<Arc<str>>>;

/// A Redis server, a runtime, and the rate-limited service on it.
struct Setup {
    // Dropped in this order: the service, the runtime (and the connection's tasks), then
    // the server.
    svc: Limited,
    rt: Runtime,
    server: RedisServer,
    keys: Arc<[HeaderValue]>,
}

fn setup() -> Setup {
    let server = RedisServer::start();
    let rt = runtime();
    let store = rt
        .block_on(RedisStore::connect(RedisConfig::single(server.url())))
        .expect("connect to the bench's redis-server");
    let layer = RateLimitLayer::builder()
        .name("bench")
        // 10^6 per second per key, burst 10^6: never refuses at these rates.
        .policy(
            "bench",
            Quota::requests_per(1_000_000, Duration::from_secs(1)),
        )
        .key(Header::new(API_KEY.clone()))
        .backend(RedisBackend::new(store).on_failure(FailurePolicy::Closed))
        .build()
        .expect("valid quota");
    let keys: Arc<[HeaderValue]> = (0..KEYS)
        .map(|i| HeaderValue::from_str(&format!("client-{i}")).expect("ASCII key"))
        .collect();
    let inner: Inner = service_fn(ok as fn(_) -> _);
    Setup {
        svc: layer.layer(inner),
        rt,
        server,
        keys,
    }
}

/// What a run of checks measured.
struct Run {
    elapsed: Duration,
    /// Each check's latency, when recorded.
    latencies: Vec<Duration>,
}

/// `checks` checks through `svc` from [`CALLERS`] concurrent tasks, spread over the keys.
/// Panics if any check is not allowed (a refusal, or Redis failing).
async fn run<S, B>(svc: &S, keys: &Arc<[HeaderValue]>, checks: usize, record: bool) -> Run
where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for caller in 0..CALLERS {
        let n = checks / CALLERS + usize::from(caller < checks % CALLERS);
        let svc = svc.clone();
        let keys = keys.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::with_capacity(if record { n } else { 0 });
            let mut refused = 0usize;
            for i in 0..n {
                let mut req = Request::new(());
                req.headers_mut()
                    .insert(&API_KEY, keys[(i * CALLERS + caller) % keys.len()].clone());
                let sent = record.then(Instant::now);
                let res = svc
                    .clone()
                    .oneshot(req)
                    .await
                    .unwrap_or_else(|e| match e {});
                if let Some(sent) = sent {
                    latencies.push(sent.elapsed());
                }
                if res.status() != StatusCode::OK {
                    refused += 1;
                }
            }
            (latencies, refused)
        });
    }
    let mut latencies = Vec::with_capacity(if record { checks } else { 0 });
    let mut refused = 0;
    while let Some(done) = tasks.join_next().await {
        let (lat, r) = done.expect("caller task panicked");
        latencies.extend(lat);
        refused += r;
    }
    let elapsed = start.elapsed();
    assert_eq!(
        refused, 0,
        "{refused} of {checks} checks were not allowed (refused, or Redis failed)"
    );
    Run { elapsed, latencies }
}

fn throughput(c: &mut Criterion) {
    let Setup {
        svc,
        rt,
        server,
        keys,
    } = setup();
    let mut group = c.benchmark_group("rate_limit_redis");
    group.throughput(Throughput::Elements(1));
    group.bench_function(format!("{CALLERS}_callers_{KEYS}_keys"), |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let svc = svc.clone();
            let keys = keys.clone();
            async move { run(&svc, &keys, iters as usize, false).await.elapsed }
        })
    });
    group.finish();
    drop(svc);
    drop(rt);
    drop(server);
}

/// Total `calls=` of `EVALSHA` and `EVAL` in `INFO commandstats`.
fn script_calls(server: &RedisServer) -> u64 {
    let info = server.info("commandstats");
    ["cmdstat_evalsha", "cmdstat_eval"]
        .iter()
        .filter_map(|name| support::info_value(&info, name))
        .map(|stats| {
            stats
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no calls= in commandstats {stats:?}"))
        })
        .sum()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// One fixed pass: checks/s, p50 and p99, and script calls per check.
fn latency_pass() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    // `cargo test --benches` runs this binary without `--bench`: keep that pass short.
    let checks = if args.iter().any(|a| a == "--bench") {
        PASS_CHECKS
    } else {
        CALLERS * 10
    };
    let Setup {
        svc,
        rt,
        server,
        keys,
    } = setup();
    rt.block_on(run(&svc, &keys, WARM_UP_CHECKS, false));

    let before = script_calls(&server);
    let mut pass = rt.block_on(run(&svc, &keys, checks, true));
    let calls = script_calls(&server) - before;

    pass.latencies.sort_unstable();
    let per_second = checks as f64 / pass.elapsed.as_secs_f64();
    let p50 = percentile(&pass.latencies, 0.50);
    let p99 = percentile(&pass.latencies, 0.99);
    println!(
        "redis rate limit: {CALLERS} callers, {checks} checks, {per_second:.0} checks/s, \
         p50 {} us, p99 {} us",
        p50.as_micros(),
        p99.as_micros()
    );
    println!(
        "redis rate limit: {calls} EVALSHA+EVAL calls for {checks} checks = {:.2} per check",
        calls as f64 / checks as f64
    );
    assert_eq!(
        calls, checks as u64,
        "expected exactly one script call (one round trip) per check"
    );
    drop(svc);
    drop(rt);
    drop(server);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .sample_size(10);
    targets = throughput
}
criterion_main!(benches, latency_pass);
