//! Distributed locks on memory, one real Redis, and Redlock over real Redis masters.

#![cfg(all(feature = "lock", feature = "redis"))]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use battlement::lock::{
    FencingToken, LockError, LockManager, LockManagerBuilder, MemoryLockBackend,
};
use battlement::redis::{RedisConfig, RedisStore};
use support::RedisServer;

async fn store(server: &RedisServer) -> RedisStore {
    RedisStore::connect(RedisConfig::single(server.url()).timeout(Duration::from_millis(200)))
        .await
        .expect("connect to the test redis")
}

/// A resource that refuses stale fencing tokens and detects overlapping writers.
#[derive(Default)]
struct Resource {
    value: AtomicU64,
    last_fence: std::sync::Mutex<Option<FencingToken>>,
    writes: AtomicU64,
}

/// Many tasks spread over `managers` (as replicas) each do a read-modify-write in the
/// critical section; no update may be lost and fencing tokens must strictly increase.
async fn mutual_exclusion(managers: Vec<LockManager>, tasks_per_manager: usize, rounds: usize) {
    mutual_exclusion_with(managers, tasks_per_manager, rounds, true).await
}

/// [`mutual_exclusion`]; `fenced: false` checks that every token is `FencingToken::NONE`
/// instead of increasing.
async fn mutual_exclusion_with(
    managers: Vec<LockManager>,
    tasks_per_manager: usize,
    rounds: usize,
    fenced: bool,
) {
    let resource = Arc::new(Resource::default());
    let mut handles = Vec::new();
    for manager in &managers {
        for _ in 0..tasks_per_manager {
            let manager = manager.clone();
            let resource = resource.clone();
            handles.push(tokio::spawn(async move {
                for _ in 0..rounds {
                    let guard = manager
                        .acquire("counter", Duration::from_secs(20))
                        .await
                        .expect("acquire within the wait");
                    {
                        let mut last = resource.last_fence.lock().unwrap();
                        let token = guard.fencing_token();
                        if fenced {
                            assert!(
                                last.is_none_or(|l| token > l),
                                "fencing token {token:?} not above {last:?}"
                            );
                        } else {
                            assert!(token.is_none(), "unfenced lock minted {token:?}");
                        }
                        *last = Some(token);
                    }
                    let read = resource.value.load(Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    tokio::time::sleep(Duration::from_micros(200)).await;
                    resource.value.store(read + 1, Ordering::SeqCst);
                    resource.writes.fetch_add(1, Ordering::SeqCst);
                    guard.release().await.expect("still ours at release");
                }
            }));
        }
    }
    for h in handles {
        h.await.expect("task");
    }
    let expected = (managers.len() * tasks_per_manager * rounds) as u64;
    assert_eq!(resource.writes.load(Ordering::SeqCst), expected);
    assert_eq!(
        resource.value.load(Ordering::SeqCst),
        expected,
        "an update was lost: two holders overlapped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_mutual_exclusion_three_managers() {
    let backend = Arc::new(MemoryLockBackend::new());
    let managers = (0..3)
        .map(|_| LockManager::builder().backend(backend.clone()))
        .collect();
    mutual_exclusion(managers, 4, 25).await;
    assert_eq!(backend.held(), 0, "every lock released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_mutual_exclusion_three_replicas() {
    let server = RedisServer::start();
    let mut managers = Vec::new();
    for _ in 0..3 {
        managers.push(LockManager::redis(store(&server).await));
    }
    mutual_exclusion(managers, 4, 10).await;
    assert_eq!(
        server.command(&["EXISTS", "battlement:lock:{counter}"]),
        "0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redlock_mutual_exclusion_three_replicas() {
    let servers: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let mut managers = Vec::new();
    for _ in 0..3 {
        let mut stores = Vec::new();
        for s in &servers {
            stores.push(store(s).await);
        }
        managers.push(LockManager::redlock(stores).unwrap());
    }
    mutual_exclusion(managers, 3, 8).await;
}

/// `fencing(false)`: a plain `SET NX PX` per lock, still mutually exclusive across
/// replicas, on one node and under Redlock, with no fence key written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfenced_locks_are_still_mutually_exclusive_on_redis_and_redlock() {
    let server = RedisServer::start();
    let mut managers = Vec::new();
    for _ in 0..3 {
        managers.push(
            LockManager::builder()
                .fencing(false)
                .redis(store(&server).await),
        );
    }
    mutual_exclusion_with(managers.clone(), 4, 10, false).await;
    assert_eq!(
        server.command(&["DBSIZE"]),
        "0",
        "no fence key, no lock left"
    );
    // Each acquisition is a plain SET; no counter was minted.
    let info = server.info("commandstats");
    let set_calls = support::info_value(&info, "cmdstat_set")
        .and_then(|v| {
            v.split(',')
                .next()?
                .strip_prefix("calls=")?
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(0);
    assert!(
        set_calls >= 120,
        "one SET per acquisition attempt: {set_calls}"
    );
    assert!(
        support::info_value(&info, "cmdstat_hincrby").is_none(),
        "a fencing counter was minted: {info}"
    );

    // A held lock is refused to another manager until released.
    let held = managers[0]
        .acquire("held", Duration::from_secs(1))
        .await
        .unwrap();
    assert!(managers[1].try_acquire("held").await.unwrap().is_none());
    held.release().await.unwrap();
    assert!(managers[1].try_acquire("held").await.unwrap().is_some());

    let servers: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let mut managers = Vec::new();
    for _ in 0..2 {
        let mut stores = Vec::new();
        for s in &servers {
            stores.push(store(s).await);
        }
        managers.push(
            LockManager::builder()
                .fencing(false)
                .redlock(stores)
                .unwrap(),
        );
    }
    mutual_exclusion_with(managers, 3, 6, false).await;
}

#[tokio::test]
async fn redlock_survives_two_of_five_down_and_refuses_with_three_down() {
    let mut servers: Vec<RedisServer> = (0..5).map(|_| RedisServer::start()).collect();
    let mut stores = Vec::new();
    for s in &servers {
        stores.push(store(s).await);
    }
    let locks = LockManager::builder()
        .ttl(Duration::from_secs(5))
        .redlock(stores)
        .unwrap();

    let first = locks.acquire("r", Duration::from_secs(1)).await.unwrap();
    let t1 = first.fencing_token();
    first.release().await.unwrap();

    servers[0].stop();
    servers[1].stop();
    let second = locks
        .acquire("r", Duration::from_secs(2))
        .await
        .expect("a majority (3 of 5) is still up");
    assert!(second.fencing_token() > t1);
    // Exclusive on the remaining majority.
    assert!(locks.try_acquire("r").await.unwrap().is_none());
    second.release().await.unwrap();

    servers[2].stop();
    let started = Instant::now();
    let wait = Duration::from_millis(800);
    let refused = tokio::time::timeout(Duration::from_secs(5), locks.acquire("r", wait))
        .await
        .expect("the acquisition must end within its deadline, not hang");
    match refused {
        Err(LockError::NoQuorum {
            needed, granted, ..
        }) => {
            assert_eq!(needed, 3);
            assert!(granted < 3);
        }
        other => panic!("expected NoQuorum, got {other:?}"),
    }
    assert!(started.elapsed() < wait + Duration::from_secs(2));
    // Nothing is left held on the live nodes after the failed attempts.
    for s in &servers[3..] {
        assert_eq!(s.command(&["EXISTS", "battlement:lock:{r}"]), "0");
    }
}

#[tokio::test]
async fn redlock_node_restarted_without_data_keeps_tokens_increasing() {
    let mut servers: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let mut stores = Vec::new();
    for s in &servers {
        stores.push(store(s).await);
    }
    let locks = LockManager::redlock(stores).unwrap();
    let held = locks.acquire("n", Duration::from_secs(1)).await.unwrap();
    let t1 = held.fencing_token();
    // The acquisition returned at a quorum; the third node's grant lands in the background.
    // Let it land before blocking this thread on the restart below.
    for _ in 0..100 {
        if servers
            .iter()
            .all(|s| s.command(&["EXISTS", "battlement:lock:{n}"]) == "1")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // One node loses everything (its lock key and its fencing counter).
    servers[0].restart();
    assert_eq!(servers[0].command(&["EXISTS", "battlement:lock:{n}"]), "0");
    // The other two still hold the lock: no one else gets it.
    assert!(locks.try_acquire("n").await.unwrap().is_none());
    held.release()
        .await
        .expect("released on the two nodes that had it");
    // The restarted node's counter starts again from its clock: tokens still increase.
    let next = locks.acquire("n", Duration::from_secs(2)).await.unwrap();
    assert!(
        next.fencing_token() > t1,
        "{:?} !> {t1:?}",
        next.fencing_token()
    );
    next.release().await.unwrap();
}

#[tokio::test]
async fn redis_restart_without_data_changes_epoch_and_tokens_still_increase() {
    let mut server = RedisServer::start();
    let locks = LockManager::redis(store(&server).await);
    let first = locks.acquire("e", Duration::from_secs(1)).await.unwrap();
    let t1 = first.fencing_token();
    first.release().await.unwrap();
    server.restart();
    let mut second = None;
    for _ in 0..50 {
        match locks.acquire("e", Duration::from_secs(1)).await {
            Ok(g) => {
                second = Some(g);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let second = second.expect("the store reconnects after the restart");
    let t2 = second.fencing_token();
    assert!(t2 > t1, "{t2:?} !> {t1:?}");
    assert_ne!(
        t2.epoch(),
        t1.epoch(),
        "a lost counter shows as a new epoch"
    );
}

#[tokio::test]
async fn watchdog_keeps_the_lock_past_its_ttl() {
    let server = RedisServer::start();
    let ttl = Duration::from_millis(300);
    let holder = LockManager::builder().ttl(ttl).redis(store(&server).await);
    let other = LockManager::redis(store(&server).await);
    let guard = holder.acquire("w", Duration::from_secs(1)).await.unwrap();
    tokio::time::sleep(ttl * 4).await;
    assert!(!guard.is_lost());
    assert!(
        other.try_acquire("w").await.unwrap().is_none(),
        "extended past its TTL"
    );
    assert!(guard.deadline() > tokio::time::Instant::now());
    guard.release().await.unwrap();
    assert!(other.try_acquire("w").await.unwrap().is_some());
}

#[tokio::test]
async fn hold_cap_stops_the_watchdog() {
    let server = RedisServer::start();
    let ttl = Duration::from_millis(200);
    let holder = LockManager::builder()
        .ttl(ttl)
        .max_hold(Duration::from_millis(300))
        .redis(store(&server).await);
    let guard = holder.acquire("cap", Duration::from_secs(1)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(3), guard.lost())
        .await
        .expect("the lease runs out after the cap");
    // The server's copy of the lease ends at most a round trip after the local deadline.
    assert!(holder.acquire("cap", Duration::from_secs(1)).await.is_ok());
}

#[tokio::test]
async fn redis_paused_past_the_ttl_fires_lost() {
    let server = RedisServer::start_with_args(&["--enable-debug-command", "yes"]);
    let ttl = Duration::from_millis(300);
    let locks = LockManager::builder().ttl(ttl).redis(store(&server).await);
    let guard = locks.acquire("p", Duration::from_secs(1)).await.unwrap();
    let addr = server.addr();
    let sleeper = std::thread::spawn(move || {
        support::resp_command(&addr, &["DEBUG", "SLEEP", "1.5"], Duration::from_secs(5))
    });
    tokio::time::timeout(Duration::from_secs(5), guard.lost())
        .await
        .expect("lost() fires when the lease cannot be extended in time");
    assert!(guard.is_lost());
    let reply = sleeper.join().unwrap().expect("DEBUG SLEEP answered");
    assert!(!reply.is_error(), "{reply:?}");
    assert!(matches!(guard.release().await, Err(LockError::Lost)));
}

#[tokio::test]
async fn cancelled_acquire_leaves_nothing_held() {
    let server = RedisServer::start();
    let locks = LockManager::builder()
        .ttl(Duration::from_secs(30))
        .redis(store(&server).await);
    // Writes are held back: the SET of the acquisition is in flight when it is cancelled.
    server.pause_writes(Duration::from_secs(5));
    let cancelled = tokio::time::timeout(
        Duration::from_millis(50),
        locks.acquire("c", Duration::from_secs(5)),
    )
    .await;
    assert!(
        cancelled.is_err(),
        "the acquisition was cancelled mid-flight"
    );
    server.unpause();
    // The SET landed after the cancellation; the undo that followed it released it, long
    // before the 30 s TTL.
    let other = LockManager::redis(store(&server).await);
    let got = other.acquire("c", Duration::from_secs(3)).await;
    assert!(got.is_ok(), "{got:?}");
}

#[tokio::test]
async fn aborted_task_releases_its_guard() {
    let server = RedisServer::start();
    let locks = LockManager::builder()
        .ttl(Duration::from_secs(30))
        .redis(store(&server).await);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let holder = {
        let locks = locks.clone();
        tokio::spawn(async move {
            let _guard = locks.acquire("a", Duration::from_secs(1)).await.unwrap();
            tx.send(()).unwrap();
            std::future::pending::<()>().await;
        })
    };
    rx.await.unwrap();
    assert!(locks.try_acquire("a").await.unwrap().is_none());
    holder.abort();
    let got = locks.acquire("a", Duration::from_secs(3)).await;
    assert!(got.is_ok(), "released when the holding task died: {got:?}");
}

#[tokio::test]
async fn waiter_is_woken_by_release_not_by_polling() {
    let server = RedisServer::start();
    let holder = slow_poll().redis(store(&server).await);
    let waiter = slow_poll().redis(store(&server).await);
    let got = woken_by_release(&holder, &waiter, "wake", "").await;
    assert!(got.waited() >= Duration::from_millis(250));
}

/// `holder` takes `name` and releases it 300 ms later while `waiter` (a [`slow_poll`]
/// manager) waits for it with a 5 s budget: the waiter must be woken by the release.
async fn woken_by_release(
    holder: &LockManager,
    waiter: &LockManager,
    name: &str,
    label: &str,
) -> battlement::lock::LockGuard {
    let guard = holder.acquire(name, Duration::from_secs(1)).await.unwrap();
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        guard.release().await.unwrap();
    });
    let got = waiter
        .acquire(name, Duration::from_secs(5))
        .await
        .unwrap_or_else(|e| panic!("{label}: not woken by the release: {e}"));
    assert!(got.attempts() <= 3, "{label}: {} attempts", got.attempts());
    // Not woken, it would have slept to the end of its budget (polling every minute) and
    // got the lock on its last attempt there.
    assert!(
        got.waited() < Duration::from_secs(4),
        "{label}: waited {:?}: not woken by the release",
        got.waited()
    );
    release.await.unwrap();
    got
}

#[tokio::test]
async fn waiters_in_one_process_share_one_subscription() {
    let server = RedisServer::start();
    let locks = LockManager::builder()
        .retry_backoff(Duration::from_secs(60), Duration::from_secs(60))
        .redis(store(&server).await);
    let guard = locks
        .acquire("shared", Duration::from_secs(1))
        .await
        .unwrap();
    let mut waiters = Vec::new();
    for _ in 0..8 {
        let locks = locks.clone();
        waiters.push(tokio::spawn(async move {
            let g = locks
                .acquire("shared", Duration::from_secs(10))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
            g.release().await.unwrap();
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let numsub = server.command(&["PUBSUB", "NUMSUB", "battlement:lock:{shared}:released"]);
    assert_eq!(
        numsub, "battlement:lock:{shared}:released\n1",
        "one subscription"
    );
    guard.release().await.unwrap();
    for w in waiters {
        tokio::time::timeout(Duration::from_secs(10), w)
            .await
            .expect("each waiter is woken in turn")
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let numsub = server.command(&["PUBSUB", "NUMSUB", "battlement:lock:{shared}:released"]);
    assert_eq!(
        numsub, "battlement:lock:{shared}:released\n0",
        "unsubscribed at the end"
    );
}

#[tokio::test]
async fn redis_down_is_unavailable_within_the_wait() {
    let mut server = RedisServer::start();
    let locks = LockManager::redis(store(&server).await);
    server.stop();
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        locks.acquire("down", Duration::from_millis(300)),
    )
    .await
    .expect("bounded by the wait");
    assert!(matches!(r, Err(LockError::Unavailable(_))), "{r:?}");
}

#[tokio::test]
async fn invalid_names_are_refused() {
    let locks = LockManager::memory();
    // A held lock with no wait is a timeout, not a panic.
    let held = locks.acquire("zero", Duration::ZERO).await.unwrap();
    assert!(matches!(
        locks.acquire("zero", Duration::ZERO).await,
        Err(LockError::TimedOut { .. })
    ));
    drop(held);
    for name in [
        "",
        "a{b}",
        "a}",
        "line\nbreak",
        "del\u{7f}",
        "caf\u{e9}\u{85}",
        &"x".repeat(300),
    ] {
        assert!(
            matches!(locks.try_acquire(name).await, Err(LockError::InvalidName)),
            "{name:?}"
        );
    }
    // Any other UTF-8 is a fine name.
    for name in ["order:42", "caf\u{e9}:\u{1f512}", "a b"] {
        let guard = locks.try_acquire(name).await.unwrap().expect(name);
        guard.release().await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn memory_watchdog_and_ttl_on_paused_time() {
    let locks = LockManager::builder().ttl(Duration::from_secs(3)).memory();
    let guard = locks.acquire("m", Duration::ZERO).await.unwrap();
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert!(!guard.is_lost(), "extended by the watchdog");
    assert!(locks.try_acquire("m").await.unwrap().is_none());
    drop(guard);
    tokio::task::yield_now().await;
    assert!(
        locks.try_acquire("m").await.unwrap().is_some(),
        "released on drop"
    );

    let no_watchdog = LockManager::builder()
        .ttl(Duration::from_secs(3))
        .watchdog(false)
        .memory();
    let g = no_watchdog.acquire("m2", Duration::ZERO).await.unwrap();
    tokio::time::timeout(Duration::from_secs(4), g.lost())
        .await
        .expect("without a watchdog the lease ends at its TTL");
    assert!(no_watchdog.try_acquire("m2").await.unwrap().is_some());
}

#[tokio::test]
async fn redlock_raises_lagging_counters_to_the_token_it_hands_out() {
    let servers: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let mut stores = Vec::new();
    for s in &servers {
        stores.push(store(s).await);
    }
    let locks = LockManager::redlock(stores).unwrap();
    // Nodes 0 and 1 once minted far more than node 2 (clocks ahead, say): whichever two
    // nodes grant first, one of them is ahead.
    let ahead = "8000000000000000";
    for s in &servers[..2] {
        s.command(&["HSET", "battlement:lockfence:{raise}", "c", ahead, "e", "1"]);
    }
    let guard = locks
        .acquire("raise", Duration::from_secs(1))
        .await
        .unwrap();
    let token = guard.fencing_token().value();
    assert_eq!(token, 8_000_000_000_000_001, "the largest of the quorum");
    // The quorum that granted it (2 of 3) is at the token now; a node that answered after
    // the quorum may lag, but every later quorum includes one of the raised nodes.
    let raised = servers
        .iter()
        .filter(|s| {
            // A node whose grant has not landed yet has no counter: "(nil)".
            let c: u64 = s
                .command(&["HGET", "battlement:lockfence:{raise}", "c"])
                .parse()
                .unwrap_or(0);
            c >= token
        })
        .count();
    assert!(raised >= 2, "only {raised} nodes raised to {token}");
    guard.release().await.unwrap();
    // Any later quorum (it shares a node with this one) mints more.
    let next = locks
        .acquire("raise", Duration::from_secs(1))
        .await
        .unwrap();
    assert!(next.fencing_token().value() > token);
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// Managers whose waiters poll once a minute: within a few seconds' budget, only a release
/// notification gets a waiter in before its last attempt at the deadline.
fn slow_poll() -> LockManagerBuilder {
    LockManager::builder()
        .ttl(Duration::from_secs(30))
        .retry_backoff(Duration::from_secs(60), Duration::from_secs(60))
}

/// One acquire and release of a free lock; its token.
async fn cycle(locks: &LockManager, name: &str) -> FencingToken {
    let guard = locks.acquire(name, Duration::from_secs(1)).await.unwrap();
    let token = guard.fencing_token();
    guard.release().await.unwrap();
    token
}

const WEEK_MS: i64 = 7 * 24 * 3600 * 1000;

fn pttl(server: &RedisServer, key: &str) -> i64 {
    server.command(&["PTTL", key]).parse().unwrap()
}

#[tokio::test]
async fn one_node_counter_starts_at_the_clock_and_its_expiry_is_pushed_back_when_stale() {
    let server = RedisServer::start();
    let locks = LockManager::redis(store(&server).await);
    let key = "battlement:lockfence:{x}";
    let before = now_micros();
    let t1 = cycle(&locks, "x").await;
    // A new counter starts from the node's clock (microseconds) and opens an epoch.
    let slack = 5_000_000;
    assert!(
        t1.value() + slack >= before && t1.value() <= now_micros() + slack,
        "{t1:?} is not near {before}"
    );
    assert_eq!(t1.epoch(), t1.value());
    assert!(pttl(&server, key) > WEEK_MS - 60_000);

    // Pushed back recently: the next acquisitions leave the expiry alone (three commands).
    server.command(&["PEXPIRE", key, "600000"]);
    let t2 = cycle(&locks, "x").await;
    assert_eq!((t2.value(), t2.epoch()), (t1.value() + 1, t1.epoch()));
    assert!(pttl(&server, key) <= 600_000);

    // Pushed back long ago (more than a quarter of the week): pushed back again.
    server.command(&["HSET", key, "r", "0"]);
    let t3 = cycle(&locks, "x").await;
    assert_eq!(t3.value(), t2.value() + 1);
    assert!(pttl(&server, key) > WEEK_MS - 60_000);
    let r: u64 = server.command(&["HGET", key, "r"]).parse().unwrap();
    let quarter = (WEEK_MS as u64) * 1000 / 4;
    assert_eq!(
        r,
        now_micros() / quarter,
        "the quarter of the push-back was written"
    );

    // Gone (expired, evicted, or lost with the node's data): it starts again from the
    // clock, in a new epoch, and tokens still increase.
    server.command(&["DEL", key]);
    let t4 = cycle(&locks, "x").await;
    assert!(t4 > t3, "{t4:?} !> {t3:?}");
    assert!(t4.epoch() > t3.epoch());
    assert_eq!(t4.epoch(), t4.value());

    // A counter somehow ahead of the clock (a clock stepped back) is never lowered.
    let ahead = (now_micros() + 3_600_000_000).to_string();
    server.command(&["HSET", key, "c", &ahead]);
    server.command(&["HDEL", key, "e"]);
    let t5 = cycle(&locks, "x").await;
    assert_eq!(t5.value(), ahead.parse::<u64>().unwrap() + 1);
}

#[tokio::test]
async fn redlock_quorum_holds_the_token_and_expiry_is_pushed_back_when_stale() {
    let servers: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let mut stores = Vec::new();
    for s in &servers {
        stores.push(store(s).await);
    }
    let locks = LockManager::redlock(stores).unwrap();
    let key = "battlement:lockfence:{q}";
    let before = now_micros();
    let token = cycle(&locks, "q").await;
    // Each node's new counter starts from its clock (these three share one): the token is
    // the largest the quorum minted, and the quorum that granted it was raised to it.
    assert!(token.value() >= before && token.value() <= now_micros());
    // The third node's grant may land after the quorum answered: wait for it.
    let mut landed = false;
    for _ in 0..100 {
        if servers.iter().all(|s| s.command(&["EXISTS", key]) == "1") {
            landed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(landed, "every node minted");
    let holding = servers
        .iter()
        .filter(|s| s.command(&["HGET", key, "c"]) == token.value().to_string())
        .count();
    assert!(holding >= 2, "only {holding} nodes hold the token");
    for s in &servers {
        assert!(pttl(s, key) > WEEK_MS - 60_000);
        s.command(&["PEXPIRE", key, "600000"]);
    }
    let next = cycle(&locks, "q").await;
    assert!(next > token);
    tokio::time::sleep(Duration::from_millis(100)).await;
    for s in &servers {
        assert!(
            pttl(s, key) <= 600_000,
            "not pushed back: refreshed recently"
        );
        s.command(&["HSET", key, "r", "0"]);
    }
    let last = cycle(&locks, "q").await;
    assert!(last > next);
    // A node answering after the quorum finishes in the background: give it time.
    let mut pushed = 0;
    for _ in 0..200 {
        pushed = servers
            .iter()
            .filter(|s| pttl(s, key) > WEEK_MS - 60_000)
            .count();
        if pushed == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(pushed, 3, "every node that granted pushed its expiry back");
}

#[tokio::test]
async fn waiters_are_woken_after_the_pubsub_connection_was_dropped() {
    let server = RedisServer::start();
    let holder = slow_poll().redis(store(&server).await);
    let waiter = slow_poll().redis(store(&server).await);
    for round in 0..2 {
        let got = woken_by_release(&holder, &waiter, "drop", &format!("round {round}")).await;
        got.release().await.unwrap();
        // The waiter's pub/sub connection goes away (a proxy timeout, a network blip): it
        // is the one that last unsubscribed.
        let clients = server.command(&["CLIENT", "LIST"]);
        let ids: Vec<&str> = clients
            .lines()
            .filter(|l| l.contains("cmd=unsubscribe"))
            .filter_map(|l| l.split_whitespace().next()?.strip_prefix("id="))
            .collect();
        assert_eq!(
            ids.len(),
            1,
            "one shared subscription connection: {clients}"
        );
        assert_eq!(server.command(&["CLIENT", "KILL", "ID", ids[0]]), "1");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_waiter_whose_pubsub_connection_drops_mid_wait_is_still_woken_by_the_release() {
    let server = RedisServer::start();
    let holder = slow_poll().redis(store(&server).await);
    let waiter = slow_poll().redis(store(&server).await);
    let guard = holder.acquire("mid", Duration::from_secs(1)).await.unwrap();
    let waiting = tokio::spawn(async move { waiter.acquire("mid", Duration::from_secs(5)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The waiter's subscription connection dies while it waits.
    assert_eq!(server.command(&["CLIENT", "KILL", "TYPE", "pubsub"]), "1");
    // It is back, subscribed, shortly after.
    let mut back = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if server.command(&["PUBSUB", "NUMSUB", "battlement:lock:{mid}:released"])
            == "battlement:lock:{mid}:released\n1"
        {
            back = true;
            break;
        }
    }
    assert!(back, "resubscribed after the connection dropped");
    guard.release().await.unwrap();
    let got = waiting.await.unwrap().expect("acquired");
    // Polling every minute, it would only have got in at the end of its 5 s budget.
    assert!(
        got.waited() < Duration::from_secs(4),
        "waited {:?}: not woken by the release",
        got.waited()
    );
}

#[tokio::test]
async fn scripts_flushed_from_redis_are_loaded_again() {
    let server = RedisServer::start();
    let locks = LockManager::redis(store(&server).await);
    let first = cycle(&locks, "flush").await;
    // A restart with persistence, a failover or an operator empties the script cache.
    assert_eq!(server.command(&["SCRIPT", "FLUSH"]), "OK");
    let second = cycle(&locks, "flush").await;
    assert!(second > first);
    assert_eq!(server.command(&["EXISTS", "battlement:lock:{flush}"]), "0");
}

/// A Redis Cluster is one lock service: three managers (as replicas) on a real three-master
/// cluster exclude each other with increasing tokens; a waiter is woken by a release on a
/// shard channel, which stays on its master (nothing crosses the cluster bus), also after
/// its subscription's connection was killed mid-wait; and names in many slots each lock
/// and release on their own master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_locks_exclude_wake_and_spread_over_slots() {
    let cluster = support::RedisCluster::start();
    let connect = || async {
        RedisStore::connect(RedisConfig::cluster(cluster.urls()).timeout(Duration::from_secs(1)))
            .await
            .expect("connect to the test cluster")
    };
    let mut managers = Vec::new();
    for _ in 0..3 {
        managers.push(LockManager::redis(connect().await));
    }
    mutual_exclusion(managers, 3, 8).await;

    let holder = slow_poll().redis(connect().await);
    let waiter = slow_poll().redis(connect().await);
    for (name, kill) in [("wake", false), ("wake-killed", true)] {
        let key = format!("battlement:lock:{{{name}}}");
        let channel = format!("{key}:released");
        let owner = (0..3)
            .find(|&n| !cluster.command_on(n, &["GET", &key]).starts_with("-MOVED"))
            .expect("a master serves the key");
        let shard_subscribers = || {
            let reply = cluster.command_on(owner, &["PUBSUB", "SHARDNUMSUB", &channel]);
            reply.lines().nth(1).unwrap_or("").to_owned()
        };
        let guard = holder.acquire(name, Duration::from_secs(1)).await.unwrap();
        let waiting = {
            let waiter = waiter.clone();
            let name = name.to_owned();
            tokio::spawn(async move { waiter.acquire(&name, Duration::from_secs(5)).await })
        };
        wait_until(
            || shard_subscribers() == "1",
            &format!("{name}: shard subscription"),
        )
        .await;
        for n in 0..3 {
            let numsub = cluster.command_on(n, &["PUBSUB", "NUMSUB", &channel]);
            assert_eq!(
                numsub.lines().nth(1),
                Some("0"),
                "{name}: a classic subscriber"
            );
        }
        if kill {
            let killed = cluster.command_on(owner, &["CLIENT", "KILL", "TYPE", "pubsub"]);
            assert_eq!(
                killed, "1",
                "{name}: the subscription's connection was killed"
            );
            // redis-rs reconnects and subscribes again by itself.
            wait_until(
                || shard_subscribers() == "1",
                &format!("{name}: resubscribed"),
            )
            .await;
        }
        let bus_before = bus_publishes(&cluster);
        tokio::time::sleep(Duration::from_millis(300)).await;
        guard.release().await.unwrap();
        let got = waiting
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{name}: not woken by the release: {e}"));
        // Attempts: the first, one after subscribing, the release's; with the connection
        // killed, one when it dropped and one when redis-rs subscribed again.
        let most = if kill { 5 } else { 3 };
        assert!(
            got.attempts() <= most,
            "{name}: {} attempts",
            got.attempts()
        );
        assert!(
            got.waited() < Duration::from_secs(4),
            "{name}: waited {:?}: not woken by the release",
            got.waited()
        );
        assert!(got.fencing_token().value() > 0);
        assert_eq!(
            bus_publishes(&cluster),
            bus_before,
            "{name}: the release crossed the cluster bus"
        );
        got.release().await.unwrap();
    }

    let locks = LockManager::redis(connect().await);
    let mut masters = std::collections::HashSet::new();
    for i in 0..30 {
        let name = format!("spread-{i}");
        let guard = locks.try_acquire(&name).await.unwrap().expect("free");
        assert!(guard.fencing_token().value() > 0, "{name}: no token");
        assert!(
            locks.try_acquire(&name).await.unwrap().is_none(),
            "{name}: held twice"
        );
        let key = format!("battlement:lock:{{{name}}}");
        let on: Vec<usize> = (0..3)
            .filter(|&n| cluster.command_on(n, &["EXISTS", &key]) == "1")
            .collect();
        assert_eq!(on.len(), 1, "{name}: held on {on:?}");
        masters.insert(on[0]);
        guard.release().await.unwrap();
        assert_eq!(
            cluster.command(&["EXISTS", &key]),
            "0",
            "{name}: not released"
        );
    }
    assert_eq!(masters.len(), 3, "30 names should land on every master");
}

/// Classic `PUBLISH` messages the cluster's nodes sent each other over the cluster bus.
fn bus_publishes(cluster: &support::RedisCluster) -> u64 {
    (0..3)
        .map(|n| {
            let info = cluster.command_on(n, &["CLUSTER", "INFO"]);
            support::info_value(&info, "cluster_stats_messages_publish_sent")
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        })
        .sum()
}

/// Polls `check` every 10 ms for up to 3 s; fails the test with `what` if it never holds.
async fn wait_until(check: impl Fn() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within 3 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// "Forever" durations (`Duration::MAX`) for the TTL, the hold cap, the backoff and the
/// wait are cut to a very long time: no clock arithmetic overflows (which would panic).
#[tokio::test]
async fn durations_of_forever_do_not_overflow() {
    let locks = LockManager::builder()
        .ttl(Duration::MAX)
        .max_hold(Duration::MAX)
        .retry_backoff(Duration::MAX, Duration::MAX)
        .memory();
    let guard = locks.acquire("forever", Duration::MAX).await.unwrap();
    assert!(locks.try_acquire("forever").await.unwrap().is_none());
    guard.release().await.unwrap();
    assert!(locks.try_acquire("forever").await.unwrap().is_some());
}

/// Redlock hands a token out only when a quorum of nodes ends at or above it: a node that
/// minted less and could not be raised (here its ACL refuses the raise's `HGET`, with a
/// third node down) would let a later quorum repeat the token or go below it. The attempt
/// is undone and the lock is not granted; once the raise works again, it is.
#[tokio::test]
async fn redlock_grants_only_when_a_quorum_reaches_the_token() {
    let mut servers: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let key = "battlement:lockfence:{x}";
    for (i, c) in [(0, "1000"), (1, "1000"), (2, "10")] {
        servers[i].command(&["HSET", key, "c", c, "e", c, "r", "0"]);
    }
    let mut stores = Vec::new();
    for s in &servers {
        stores.push(store(s).await);
    }
    let locks = LockManager::builder()
        .retry_backoff(Duration::from_millis(20), Duration::from_millis(50))
        .redlock(stores)
        .unwrap();
    assert_eq!(
        servers[2].command(&["ACL", "SETUSER", "default", "-hget"]),
        "OK"
    );
    servers[1].stop();
    let got = locks.acquire("x", Duration::from_millis(300)).await;
    assert!(
        matches!(got, Err(LockError::TimedOut { .. })),
        "granted without a quorum at the token: {:?}",
        got.map(|g| g.fencing_token())
    );
    for i in [0, 2] {
        assert_eq!(
            servers[i].command(&["EXISTS", "battlement:lock:{x}"]),
            "0",
            "node {i}: the attempt was not undone"
        );
    }
    assert_eq!(
        servers[2].command(&["ACL", "SETUSER", "default", "+hget"]),
        "OK"
    );
    let guard = locks.acquire("x", Duration::from_secs(2)).await.unwrap();
    let token = guard.fencing_token().value();
    assert!(token > 1000, "{token}");
    assert_eq!(
        servers[2].command(&["HGET", key, "c"]),
        token.to_string(),
        "the lagging node was raised to the token"
    );
    guard.release().await.unwrap();
}

/// Releases go past an open circuit breaker: after Redis stalled long enough to open it,
/// a holder's release (and the undo of attempts whose answers were lost) still reaches
/// Redis as soon as it answers, instead of leaving the lock held for its whole TTL.
#[tokio::test]
async fn a_release_reaches_redis_past_an_open_breaker() {
    let server = RedisServer::start();
    let store = RedisStore::connect(
        RedisConfig::single(server.url())
            .timeout(Duration::from_millis(100))
            .circuit_breaker(2, Duration::from_secs(5)),
    )
    .await
    .unwrap();
    let locks = LockManager::builder()
        .ttl(Duration::from_secs(30))
        .redis(store.clone());
    let guard = locks.acquire("held", Duration::from_secs(1)).await.unwrap();
    server.pause_writes(Duration::from_millis(400));
    for name in ["a", "b"] {
        assert!(
            locks.try_acquire(name).await.is_err(),
            "{name}: Redis is paused"
        );
    }
    assert_eq!(store.breaker_state(), battlement::redis::BreakerState::Open);
    tokio::time::sleep(Duration::from_millis(500)).await;
    guard
        .release()
        .await
        .expect("released past the open breaker");
    assert_eq!(server.command(&["EXISTS", "battlement:lock:{held}"]), "0");
    // The attempts that landed after the pause are undone too (asked again in the
    // background until Redis answers), well before their 30 s TTL.
    for name in ["a", "b"] {
        let key = format!("battlement:lock:{{{name}}}");
        let deadline = Instant::now() + Duration::from_secs(3);
        while server.command(&["EXISTS", &key]) != "0" {
            assert!(Instant::now() < deadline, "{name} left held");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A slow acquisition (Redis stalled for half the TTL) still gets a lease that the
/// watchdog extends: the time the attempt took counts once against it, not twice, and the
/// first extension comes before the lease's deadline rather than after it.
#[tokio::test]
async fn a_slow_acquisition_is_extended_not_lost() {
    let server = RedisServer::start();
    let store =
        RedisStore::connect(RedisConfig::single(server.url()).timeout(Duration::from_secs(2)))
            .await
            .unwrap();
    let locks = LockManager::builder()
        .ttl(Duration::from_millis(600))
        .redis(store);
    // Warm: the scripts are loaded.
    assert!(cycle(&locks, "warm").await.value() > 0);
    server.pause_writes(Duration::from_millis(300));
    let started = Instant::now();
    let guard = locks.acquire("slow", Duration::from_secs(3)).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(250));
    let left = guard
        .deadline()
        .saturating_duration_since(tokio::time::Instant::now());
    assert!(
        left > Duration::from_millis(150),
        "only {left:?} of the lease left"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !guard.is_lost(),
        "the watchdog let a slow acquisition's lease run out"
    );
    assert_eq!(server.command(&["EXISTS", "battlement:lock:{slow}"]), "1");
    guard.release().await.unwrap();
}

/// A Redlock release that only one node confirms, the others being down or slow, is not
/// "lost" (no node said the lock was not ours): the caller is told the backend was
/// unavailable.
#[tokio::test]
async fn a_redlock_release_cut_short_by_outages_is_unavailable_not_lost() {
    let mut servers: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let mut stores = Vec::new();
    for s in &servers {
        stores.push(store(s).await);
    }
    let locks = LockManager::redlock(stores).unwrap();
    let guard = locks.acquire("r", Duration::from_secs(1)).await.unwrap();
    servers[1].stop();
    servers[2].pause_writes(Duration::from_millis(600));
    let released = guard.release().await;
    assert!(
        matches!(released, Err(LockError::Unavailable(_))),
        "{released:?}"
    );
}

/// A backend whose first release never answers (a connection being re-established).
struct FirstReleaseHangs {
    inner: Arc<MemoryLockBackend>,
    hung: std::sync::atomic::AtomicBool,
}

impl battlement::lock::LockBackend for FirstReleaseHangs {
    fn acquire<'a>(
        &'a self,
        name: &'a str,
        owner: battlement::lock::OwnerToken,
        ttl: Duration,
    ) -> battlement::lock::BoxFuture<'a, Result<battlement::lock::Attempt, LockError>> {
        self.inner.acquire(name, owner, ttl)
    }

    fn extend<'a>(
        &'a self,
        name: &'a str,
        owner: battlement::lock::OwnerToken,
        ttl: Duration,
    ) -> battlement::lock::BoxFuture<'a, Result<Option<Duration>, LockError>> {
        self.inner.extend(name, owner, ttl)
    }

    fn release<'a>(
        &'a self,
        name: &'a str,
        owner: battlement::lock::OwnerToken,
    ) -> battlement::lock::BoxFuture<'a, Result<bool, LockError>> {
        if !self.hung.swap(true, Ordering::SeqCst) {
            return Box::pin(std::future::pending());
        }
        self.inner.release(name, owner)
    }

    fn subscribe<'a>(
        &'a self,
        name: &'a str,
    ) -> battlement::lock::BoxFuture<'a, Option<battlement::lock::Subscription>> {
        self.inner.subscribe(name)
    }
}

/// A release cancelled before the backend answered (its caller timed out) still releases:
/// the guard's drop does it in the background, rather than leave the lock to its TTL.
#[tokio::test]
async fn a_cancelled_release_still_releases() {
    let memory = Arc::new(MemoryLockBackend::new());
    let locks = LockManager::builder().backend(FirstReleaseHangs {
        inner: memory.clone(),
        hung: std::sync::atomic::AtomicBool::new(false),
    });
    let guard = locks.acquire("c", Duration::from_secs(1)).await.unwrap();
    let cut = tokio::time::timeout(Duration::from_millis(50), guard.release()).await;
    assert!(cut.is_err(), "the first release hangs");
    let deadline = Instant::now() + Duration::from_secs(2);
    while memory.held() != 0 {
        assert!(
            Instant::now() < deadline,
            "still held after a cancelled release"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A pub/sub connection given up after a failed subscribe (Redis stalled past the
/// subscribe's 500 ms) is closed, not left open and subscribed with its listener.
#[tokio::test]
async fn a_pubsub_connection_given_up_is_closed() {
    let server = RedisServer::start();
    let holder = LockManager::redis(store(&server).await);
    let waiter = slow_poll().redis(store(&server).await);
    let _z = holder.acquire("z", Duration::from_secs(5)).await.unwrap();
    let _y = holder.acquire("y", Duration::from_secs(5)).await.unwrap();
    let w1 = {
        let waiter = waiter.clone();
        tokio::spawn(async move { waiter.acquire("z", Duration::from_secs(4)).await })
    };
    let pubsub_clients = || {
        server
            .command(&["CLIENT", "LIST", "TYPE", "pubsub"])
            .lines()
            .filter(|l| l.contains("id="))
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    while pubsub_clients() != 1 {
        assert!(
            Instant::now() < deadline,
            "the first waiter never subscribed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Redis stalls: the second name's subscribe times out, and so does a new connection.
    server.pause(Duration::from_millis(1200));
    let w2 = {
        let waiter = waiter.clone();
        tokio::spawn(async move { waiter.acquire("y", Duration::from_millis(1500)).await })
    };
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert!(w2.await.unwrap().is_err(), "y is held");
    assert_eq!(pubsub_clients(), 0, "a connection given up is still open");
    w1.abort();
}

/// Through Redis Sentinel: locks are taken on the master it names, and a waiter's release
/// notifications come over a subscription on that master (not on the Sentinel, which
/// also answers SUBSCRIBE but never hears the master's releases).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_locks_and_notifications_are_on_the_master() {
    let (master, _replica, sentinel) = support::Sentinel::with_pair("locks");
    let config =
        || RedisConfig::sentinel("locks", [sentinel.url()]).timeout(Duration::from_millis(500));
    let a = LockManager::redis(RedisStore::connect(config()).await.unwrap());
    let b = LockManager::redis(RedisStore::connect(config()).await.unwrap());
    let held = a.acquire("s", Duration::from_secs(1)).await.unwrap();
    assert_eq!(master.command(&["EXISTS", "battlement:lock:{s}"]), "1");
    let first = held.fencing_token();
    let waiter = tokio::spawn(async move {
        b.acquire("s", Duration::from_secs(5))
            .await
            .map(|g| g.fencing_token())
    });
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let subscribers = master.command(&["PUBSUB", "NUMSUB", "battlement:lock:{s}:released"]);
        if subscribers.lines().nth(1) == Some("1") {
            break;
        }
        assert!(Instant::now() < deadline, "no subscription on the master");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    held.release().await.unwrap();
    assert!(waiter.await.unwrap().unwrap() > first);
}

/// Every connection the crate opens to Redis has TCP keepalive on (idle 30 s, then
/// probes): an idle subscription, waiting for a release, notices a peer that vanished
/// without a reset instead of waiting for ever. Read from the kernel with `ss`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_keep_tcp_keepalive_on() {
    let server = RedisServer::start();
    let locks = LockManager::redis(store(&server).await);
    let held = locks.acquire("k", Duration::from_secs(1)).await.unwrap();
    let waiting = locks.clone();
    let waiter = tokio::spawn(async move { waiting.acquire("k", Duration::from_secs(5)).await });
    let deadline = Instant::now() + Duration::from_secs(3);
    while server
        .command(&["PUBSUB", "NUMSUB", "battlement:lock:{k}:released"])
        .lines()
        .nth(1)
        != Some("1")
    {
        assert!(Instant::now() < deadline, "the waiter never subscribed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let filter = format!("( dport = :{} )", server.port());
    let out = std::process::Command::new("ss")
        .args(["-tnoH", "state", "established", &filter])
        .output()
        .expect("run ss (iproute2) to read the sockets' options");
    let sockets = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = sockets.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        lines.len() >= 2,
        "the store's and the subscription's connections: {sockets}"
    );
    for line in &lines {
        assert!(line.contains("timer:(keepalive"), "no keepalive: {line}");
    }
    held.release().await.unwrap();
    waiter.await.unwrap().unwrap().release().await.unwrap();
}
