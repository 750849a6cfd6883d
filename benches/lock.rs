//! Lock latency and contended throughput, side by side with `rslock`, on `redis-server`s
//! the bench starts itself (free loopback ports, no persistence).
//!
//! - `lock/uncontended`: one acquire + release of a free lock, on a current-thread runtime
//!   (no cross-thread wakeups in the measurement): memory, one Redis, Redlock over three
//!   nodes, the same two with `fencing(false)` (`_unfenced`: a plain `SET NX PX`, no token,
//!   which is what `rslock` does), and `rslock` on one and three nodes.
//! - `lock/contended` (on a 2-worker runtime): 16 tasks take turns on one name, 4 times each (64 lock-unlock
//!   cycles per iteration): battlement woken by release notifications, battlement polling
//!   only (its default backoff, 5 ms to 250 ms, jittered), and `rslock`'s `acquire`
//!   (retries with a random delay of up to 200 ms, its default).
//!
//! - Paired (printed after the uncontended group): criterion measures one function after
//!   another, and on a shared machine the speed drifts between them; this pass alternates
//!   blocks of 200 cycles of `rslock` and of battlement (31 rounds) and prints the median
//!   of the per-round ratios, the figure the README quotes.
//!
//! Run with `cargo bench --features full --bench lock`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use battlement::lock::LockManager;
use battlement::redis::{RedisConfig, RedisStore};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use support::RedisServer;

const TASKS: usize = 16;
const ROUNDS: usize = 4;

async fn store(server: &RedisServer) -> RedisStore {
    RedisStore::connect(RedisConfig::single(server.url()).timeout(Duration::from_secs(1)))
        .await
        .expect("connect to the bench's redis-server")
}

async fn contended_battlement(locks: &LockManager) {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..TASKS {
        let locks = locks.clone();
        tasks.spawn(async move {
            for _ in 0..ROUNDS {
                let guard = locks
                    .acquire("contended", Duration::from_secs(60))
                    .await
                    .expect("acquired within a minute");
                guard.release().await.expect("released");
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
}

async fn contended_rslock(locks: &Arc<rslock::LockManager>) {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..TASKS {
        let locks = locks.clone();
        tasks.spawn(async move {
            for _ in 0..ROUNDS {
                let lock = locks
                    .acquire_no_guard("contended".as_bytes(), Duration::from_secs(10))
                    .await
                    .expect("rslock acquired");
                locks.unlock(&lock).await;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
}

fn bench(c: &mut Criterion) {
    let servers: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (single_mt, polling) = rt.block_on(async {
        let store = store(&servers[0]).await;
        (
            LockManager::redis(store.clone()),
            LockManager::builder().notifications(false).redis(store),
        )
    });
    let urls: Vec<String> = servers.iter().map(|s| s.url()).collect();
    let rs_single = Arc::new(rslock::LockManager::new(vec![urls[0].clone()]));

    // Latency on one thread: no cross-thread wakeups in the measurement.
    let local = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (memory, single, redlock, single_unfenced, redlock_unfenced) = local.block_on(async {
        let mut stores = Vec::new();
        for s in &servers {
            stores.push(store(s).await);
        }
        let unfenced = || LockManager::builder().fencing(false);
        (
            LockManager::memory(),
            LockManager::redis(stores[0].clone()),
            LockManager::redlock(stores.clone()).unwrap(),
            unfenced().redis(stores[0].clone()),
            unfenced().redlock(stores).unwrap(),
        )
    });
    let (rs_single_local, rs_three_local) = (
        rslock::LockManager::new(vec![urls[0].clone()]),
        rslock::LockManager::new(urls.clone()),
    );
    let mut group = c.benchmark_group("lock/uncontended");
    for (name, locks) in [
        ("battlement_memory", &memory),
        ("battlement_redis", &single),
        ("battlement_redlock3", &redlock),
        ("battlement_redis_unfenced", &single_unfenced),
        ("battlement_redlock3_unfenced", &redlock_unfenced),
    ] {
        group.bench_function(name, |b| {
            b.to_async(&local).iter(|| async {
                let guard = locks
                    .acquire("free", Duration::from_secs(1))
                    .await
                    .expect("free lock");
                guard.release().await.expect("released");
            })
        });
    }
    for (name, locks) in [
        ("rslock_redis", &rs_single_local),
        ("rslock_redlock3", &rs_three_local),
    ] {
        group.bench_function(name, |b| {
            b.to_async(&local).iter(|| async {
                let lock = locks
                    .lock("free".as_bytes(), Duration::from_secs(10))
                    .await
                    .expect("free lock");
                locks.unlock(&lock).await;
            })
        });
    }
    group.finish();

    // Paired: the machine drifts between criterion's runs of one function and the next, so
    // alternate short blocks of each and report the median of the per-block ratios.
    type Cycle<'a> =
        Box<dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + 'a>> + 'a>;
    let ours = |locks: &'static LockManager| -> Cycle<'static> {
        Box::new(move || {
            Box::pin(async move {
                let guard = locks
                    .acquire("paired", Duration::from_secs(1))
                    .await
                    .expect("free lock");
                guard.release().await.expect("released");
            })
        })
    };
    let theirs = |locks: &'static rslock::LockManager| -> Cycle<'static> {
        Box::new(move || {
            Box::pin(async move {
                let lock = locks
                    .lock("paired".as_bytes(), Duration::from_secs(10))
                    .await
                    .expect("free lock");
                locks.unlock(&lock).await;
            })
        })
    };
    let leak = |l: &LockManager| -> &'static LockManager { Box::leak(Box::new(l.clone())) };
    let (rs1, rs3): (&'static rslock::LockManager, &'static rslock::LockManager) = (
        Box::leak(Box::new(rslock::LockManager::new(vec![urls[0].clone()]))),
        Box::leak(Box::new(rslock::LockManager::new(urls.clone()))),
    );
    for (label, peer, variants) in [
        (
            "one Redis",
            theirs(rs1),
            vec![
                ("fenced", ours(leak(&single))),
                ("fencing(false)", ours(leak(&single_unfenced))),
            ],
        ),
        (
            "Redlock, 3 nodes",
            theirs(rs3),
            vec![
                ("fenced", ours(leak(&redlock))),
                ("fencing(false)", ours(leak(&redlock_unfenced))),
            ],
        ),
    ] {
        const BLOCKS: usize = 31;
        const CYCLES: u32 = 200;
        let block = |run: &Cycle<'static>| {
            local.block_on(async {
                let started = Instant::now();
                for _ in 0..CYCLES {
                    run().await;
                }
                started.elapsed() / CYCLES
            })
        };
        block(&peer);
        let mut ratios = vec![Vec::new(); variants.len()];
        let mut peer_times = Vec::new();
        for _ in 0..BLOCKS {
            let base = block(&peer);
            peer_times.push(base);
            for (i, (_, run)) in variants.iter().enumerate() {
                let t = block(run);
                ratios[i].push(t.as_secs_f64() / base.as_secs_f64());
            }
        }
        peer_times.sort();
        let peer_median = peer_times[BLOCKS / 2];
        for ((name, _), mut r) in variants.iter().zip(ratios) {
            r.sort_by(f64::total_cmp);
            println!(
                "uncontended paired, {label}, battlement {name} / rslock: median {:.2} (quartiles {:.2} to {:.2}; rslock {:.0} µs a cycle)",
                r[BLOCKS / 2],
                r[BLOCKS / 4],
                r[3 * BLOCKS / 4],
                peer_median.as_secs_f64() * 1e6,
            );
        }
    }

    let mut group = c.benchmark_group("lock/contended");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.throughput(Throughput::Elements((TASKS * ROUNDS) as u64));
    group.bench_function("battlement_redis_notified", |b| {
        b.to_async(&rt).iter(|| contended_battlement(&single_mt))
    });
    group.bench_function("battlement_redis_polling", |b| {
        b.to_async(&rt).iter(|| contended_battlement(&polling))
    });
    group.bench_function("rslock_redis", |b| {
        b.to_async(&rt).iter(|| contended_rslock(&rs_single))
    });
    group.finish();

    // One fixed pass of each, printed as cycles per second for the README.
    for (name, run) in [
        ("battlement notified", 0),
        ("battlement polling", 1),
        ("rslock", 2),
    ] {
        let started = Instant::now();
        rt.block_on(async {
            match run {
                0 => contended_battlement(&single_mt).await,
                1 => contended_battlement(&polling).await,
                _ => contended_rslock(&rs_single).await,
            }
        });
        let per_s = (TASKS * ROUNDS) as f64 / started.elapsed().as_secs_f64();
        println!("contended 16 tasks, one name, {name}: {per_s:.0} lock-unlock cycles/s");
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
