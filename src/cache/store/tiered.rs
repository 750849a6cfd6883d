//! The tiered store: this process's memory in front of Redis. A purge on one replica
//! reaches every replica's memory tier through Redis pub/sub.

use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;

use super::memory::MemoryStore;
use super::redis::RedisCacheStore;
use super::{BoxFuture, Store, StoreError, Stored, TagVersions};
use crate::cache::key::Key;
use crate::redis::RedisStore as Redis;

/// How long a value read from Redis is kept in memory at most: short, so that an entry
/// replaced on another replica is not served from this one's memory for long.
const MEMORY_TTL: Duration = Duration::from_secs(30);

/// Marks a purge message that names a tag rather than a key (keys start with a length,
/// whose first byte is never 0xFF).
const TAG_MESSAGE: &[u8] = b"\xFFtag\x00";

pub(crate) struct TieredStore {
    memory: Option<Arc<MemoryStore>>,
    redis: RedisCacheStore,
    publisher: Redis,
    channel: String,
    versions: TagVersions,
}

impl TieredStore {
    /// A memory tier of `memory_bytes` (none for `0`) in front of `redis`; spawns the task
    /// that listens for purges from other replicas (it stops when the store is dropped).
    pub(crate) fn new(redis: Redis, memory_bytes: u64, versions: TagVersions) -> Arc<Self> {
        let channel = redis.key("cache-purge", &"all");
        let store = Arc::new(Self {
            memory: (memory_bytes > 0).then(|| Arc::new(MemoryStore::new(memory_bytes))),
            versions,
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

/// Removes from this memory tier every key another replica purged.
///
/// When the subscription drops (Redis restarted, a proxy's idle timeout, a network blip),
/// it subscribes again at once, then every second while that fails, going round the
/// configured nodes (any node of a cluster hears every purge). Purges published while it
/// was not listening are lost, so after a reconnect the memory tier is emptied: the next
/// requests read Redis again rather than serve what may have been purged, and the tag
/// versions this process knows are forgotten (they are read from Redis again).
async fn listen(store: Weak<TieredStore>) {
    let mut attempt = 0usize;
    let mut listened = false;
    loop {
        let Some((client, channel, memory, versions)) = store.upgrade().and_then(|s| {
            let config = s.publisher.config();
            let nodes = config.nodes();
            (!nodes.is_empty()).then(|| {
                (
                    // A single node (or the Sentinels' master): the node the store is
                    // connected to now; on a cluster, any node, in turn.
                    match s.publisher.node_client() {
                        Some(client) => Ok(client),
                        None => config.client(&nodes[attempt % nodes.len()]),
                    },
                    s.channel.clone(),
                    s.memory.clone(),
                    s.versions.clone(),
                )
            })
        }) else {
            return;
        };
        attempt += 1;
        let subscribed = async {
            let client = client.ok()?;
            let mut pubsub = client.get_async_pubsub().await.ok()?;
            pubsub.subscribe(&channel).await.ok()?;
            Some(pubsub)
        };
        let subscribed = tokio::time::timeout(Duration::from_secs(2), subscribed)
            .await
            .ok()
            .flatten();
        if let Some(pubsub) = subscribed {
            if listened {
                // Purges may have been missed: forget what they could have changed. Tag
                // versions are read from Redis again as entries need them.
                if let Some(memory) = &memory {
                    memory.clear();
                }
                versions.lock().unwrap_or_else(|e| e.into_inner()).clear();
            }
            listened = true;
            let since = tokio::time::Instant::now();
            let mut messages = pubsub.into_on_message();
            while let Some(message) = messages.next().await {
                if store.strong_count() == 0 {
                    return;
                }
                let payload = message.get_payload_bytes();
                if let Some(rest) = payload.strip_prefix(TAG_MESSAGE) {
                    if rest.len() > 8 {
                        let mut v = [0u8; 8];
                        v.copy_from_slice(&rest[..8]);
                        let version = u64::from_be_bytes(v);
                        let tag = String::from_utf8_lossy(&rest[8..]).into_owned();
                        let mut versions = versions.lock().unwrap_or_else(|e| e.into_inner());
                        let current = versions.entry(tag).or_insert(0);
                        *current = (*current).max(version);
                    }
                } else if let Some(memory) = &memory {
                    let _ = memory.remove(payload).await;
                }
            }
            if store.strong_count() == 0 {
                return;
            }
            // Dropped: straight back, to the same node first (unless it keeps dropping).
            attempt -= 1;
            if since.elapsed() < Duration::from_secs(1) {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            continue;
        }
        if store.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

impl Store for TieredStore {
    /// A memory-tier hit, answered at once (with the memory store's per-thread front) so the
    /// layer serves it on its allocation-free path; a memory miss asks [`Store::get`].
    fn get_now(&self, key: &[u8]) -> Option<Option<Stored>> {
        self.memory.as_ref()?.get_now(key)?.map(Some)
    }

    fn get<'a>(&'a self, key: &'a [u8]) -> BoxFuture<'a, Result<Option<Stored>, StoreError>> {
        Box::pin(async move {
            let Some(memory) = &self.memory else {
                return self.redis.get(key).await;
            };
            if let Some(found) = memory.get(key).await? {
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
                memory.put(key.into(), value.clone(), ttl).await?;
            }
            Ok(found)
        })
    }

    fn put(&self, key: Key, value: Stored, ttl: Duration) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            if let Some(memory) = &self.memory {
                memory
                    .put(key.clone(), value.clone(), ttl.min(MEMORY_TTL))
                    .await?;
            }
            self.redis.put(key, value, ttl).await
        })
    }

    fn remove<'a>(&'a self, key: &'a [u8]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            if let Some(memory) = &self.memory {
                memory.remove(key).await?;
            }
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
        token: u64,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        self.redis.claim_fill(key, ttl, token)
    }

    fn release_fill<'a>(
        &'a self,
        key: &'a [u8],
        token: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.redis.release_fill(key, token)
    }

    fn shared(&self) -> bool {
        true
    }

    fn tag_versions<'a>(
        &'a self,
        tags: &'a [String],
    ) -> Option<BoxFuture<'a, Result<Vec<u64>, StoreError>>> {
        Some(Box::pin(async move {
            // One read per tag, side by side: each counter has its own slot on a cluster.
            let reads = tags.iter().map(|tag| {
                let counter = self.publisher.key("cache-tag", tag);
                async move {
                    self.publisher
                        .call(|mut conn| async move {
                            redis::cmd("GET")
                                .arg(&counter)
                                .query_async::<Option<u64>>(&mut conn)
                                .await
                        })
                        .await
                        .map(Option::unwrap_or_default)
                        .map_err(|e| StoreError::Failed(e.to_string()))
                }
            });
            futures_util::future::try_join_all(reads).await
        }))
    }

    fn purge_tag<'a>(&'a self, tag: &'a str) -> BoxFuture<'a, Result<Option<u64>, StoreError>> {
        Box::pin(async move {
            let counter = self.publisher.key("cache-tag", &tag);
            let version: u64 = self
                .publisher
                .call(|mut conn| async move {
                    redis::cmd("INCR")
                        .arg(&counter)
                        .query_async(&mut conn)
                        .await
                })
                .await
                .map_err(|e| StoreError::Failed(e.to_string()))?;
            let mut payload = TAG_MESSAGE.to_vec();
            payload.extend_from_slice(&version.to_be_bytes());
            payload.extend_from_slice(tag.as_bytes());
            let channel = self.channel.clone();
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
            Ok(Some(version))
        })
    }
}
