//! The tiered store: this process's memory in front of Redis. A purge on one replica
//! reaches every replica's memory tier through Redis pub/sub.

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;

use super::memory::MemoryStore;
use super::redis::RedisCacheStore;
use super::{BoxFuture, Store, StoreError, Stored};
use crate::cache::key::Key;
use crate::redis::RedisStore as Redis;

/// How long a value read from Redis is kept in memory at most: short, so that an entry
/// replaced on another replica is not served from this one's memory for long.
const MEMORY_TTL: Duration = Duration::from_secs(30);

pub(crate) struct TieredStore {
    memory: Arc<MemoryStore>,
    redis: RedisCacheStore,
    publisher: Redis,
    channel: String,
}

impl TieredStore {
    /// A memory tier of `memory_bytes` in front of `redis`; spawns the task that listens
    /// for purges from other replicas (it stops when the store is dropped).
    pub(crate) fn new(redis: Redis, memory_bytes: u64) -> Arc<Self> {
        let channel = redis.key("cache-purge", &"all");
        let store = Arc::new(Self {
            memory: Arc::new(MemoryStore::new(memory_bytes)),
            redis: RedisCacheStore::new(redis.clone()),
            publisher: redis,
            channel,
        });
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(listen(Arc::downgrade(&store)));
        }
        store
    }
}

/// Removes from this memory tier every key another replica purged. Reconnects after
/// Redis goes away.
async fn listen(store: Weak<TieredStore>) {
    loop {
        let Some((url, channel, memory)) = store.upgrade().and_then(|s| {
            s.publisher
                .config()
                .nodes()
                .first()
                .map(|url| (url.clone(), s.channel.clone(), s.memory.clone()))
        }) else {
            return;
        };
        let subscribed = async {
            let client = redis::Client::open(url.as_str()).ok()?;
            let mut pubsub = client.get_async_pubsub().await.ok()?;
            pubsub.subscribe(&channel).await.ok()?;
            Some(pubsub)
        };
        if let Some(pubsub) = subscribed.await {
            let mut messages = pubsub.into_on_message();
            while let Some(message) = messages.next().await {
                if store.strong_count() == 0 {
                    return;
                }
                let key: Vec<u8> = message.get_payload_bytes().to_vec();
                let _ = memory.remove(&key).await;
            }
        }
        if store.strong_count() == 0 {
            return;
        }
        // Purges missed while disconnected are bounded by MEMORY_TTL.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

impl Store for TieredStore {
    fn get<'a>(&'a self, key: &'a [u8]) -> BoxFuture<'a, Result<Option<Stored>, StoreError>> {
        Box::pin(async move {
            if let Some(found) = self.memory.get(key).await? {
                return Ok(Some(found));
            }
            let found = self.redis.get(key).await?;
            if let Some(value) = &found {
                let ttl = match value {
                    Stored::Response(entry) => {
                        let age = std::time::SystemTime::now()
                            .duration_since(entry.stored_at)
                            .unwrap_or_default();
                        entry.freshness.retain().saturating_sub(age).min(MEMORY_TTL)
                    }
                    _ => Duration::from_secs(5),
                };
                self.memory.put(key.into(), value.clone(), ttl).await?;
            }
            Ok(found)
        })
    }

    fn put(&self, key: Key, value: Stored, ttl: Duration) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            self.memory
                .put(key.clone(), value.clone(), ttl.min(MEMORY_TTL))
                .await?;
            self.redis.put(key, value, ttl).await
        })
    }

    fn remove<'a>(&'a self, key: &'a [u8]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.memory.remove(key).await?;
            self.redis.remove(key).await?;
            let channel = self.channel.clone();
            let payload = key.to_vec();
            let _ = self
                .publisher
                .call(|mut conn| async move {
                    redis::cmd("PUBLISH")
                        .arg(&channel)
                        .arg(payload)
                        .query_async::<i64>(&mut conn)
                        .await
                })
                .await;
            Ok(())
        })
    }

    fn claim_fill<'a>(
        &'a self,
        key: &'a [u8],
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.redis.claim_fill(key, ttl)
    }

    fn release_fill<'a>(&'a self, key: &'a [u8]) -> BoxFuture<'a, Result<(), StoreError>> {
        self.redis.release_fill(key)
    }

    fn shared(&self) -> bool {
        true
    }
}
