//! Distributed locks without HTTP: eight workers take turns on one lock and write to a
//! resource that refuses stale fencing tokens.
//!
//! ```text
//! cargo run --example lock                                                 # in memory
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run --features redis --example lock   # on Redis
//! ```
//!
//! Run the Redis form in two terminals at once: both processes take turns on the same lock,
//! and the tokens keep increasing across them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use battlement::lock::{LockError, LockManager};

/// What a database row with a `fence` column does: `UPDATE ... WHERE fence < $1`.
#[derive(Default)]
struct Account {
    balance: i64,
    fence: u64,
}

impl Account {
    fn apply(&mut self, fence: u64, amount: i64) -> Result<(), &'static str> {
        if fence <= self.fence {
            return Err("stale fencing token: a later holder already wrote");
        }
        self.fence = fence;
        self.balance += amount;
        Ok(())
    }
}

async fn manager() -> LockManager {
    let builder = LockManager::builder().ttl(Duration::from_secs(5));
    match std::env::var("REDIS_URL") {
        #[cfg(feature = "redis")]
        Ok(url) if !url.trim().is_empty() => {
            use battlement::redis::{RedisConfig, RedisStore};
            let config = RedisConfig::from_list(&url).expect("a valid REDIS_URL");
            let store = RedisStore::connect(config)
                .await
                .expect("Redis reachable at REDIS_URL");
            println!("locks on Redis at {url}");
            builder.redis(store)
        }
        #[cfg(not(feature = "redis"))]
        Ok(url) if !url.trim().is_empty() => {
            eprintln!("REDIS_URL needs `--features redis`; using memory");
            builder.memory()
        }
        _ => {
            println!("locks in memory");
            builder.memory()
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), LockError> {
    let locks = manager().await;
    let account = Arc::new(Mutex::new(Account::default()));
    let mut workers = Vec::new();
    for worker in 0..8 {
        let locks = locks.clone();
        let account = account.clone();
        workers.push(tokio::spawn(async move {
            for _ in 0..3 {
                let guard = locks.acquire("account:42", Duration::from_secs(10)).await?;
                let token = guard.fencing_token();
                // The work under the lock: stop if the lease is lost meanwhile.
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                    _ = guard.lost() => {
                        eprintln!("worker {worker}: lease lost, giving up this round");
                        continue;
                    }
                }
                let applied = account.lock().unwrap().apply(token.value(), 10);
                println!(
                    "worker {worker}: token {token} (waited {:?}, {} attempt(s)): {}",
                    guard.waited(),
                    guard.attempts(),
                    applied.map_or_else(|e| e.to_string(), |()| "applied".into())
                );
                guard.release().await?;
            }
            Ok::<_, LockError>(())
        }));
    }
    for worker in workers {
        worker.await.expect("worker task")?;
    }
    let account = account.lock().unwrap();
    println!("balance {} after 24 writes of 10", account.balance);
    assert_eq!(account.balance, 240, "every write applied exactly once");
    Ok(())
}
