//! The Redis store: entries as raw bytes behind a small binary header, expiring with `PX`.
//!
//! Layout of a value (all integers big-endian):
//!
//! ```text
//! b"BC1" kind:u8                      kind 0 = response, 1 = vary index, 2 = pass
//! response: status:u16 stored_at_ms:u64 lifetime_ms:u64 swr_ms:u64 sie_ms:u64 flags:u8
//!           headers:u16 { name_len:u16 name value_len:u32 value }*
//!           trailers:u16 (0xFFFF = none) { ... }*
//!           tags:u16 { tag_len:u16 tag version:u64 }*
//!           body_len:u32 body
//! vary:     names:u16 { len:u16 name }*
//! ```
//!
//! A value that does not parse is treated as absent (and overwritten by the next fill).

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use sha2::{Digest, Sha256};

use super::{BoxFuture, Entry, Store, StoreError, Stored};
use crate::cache::key::Key;
use crate::cache::policy::Freshness;
use crate::redis::RedisStore as Redis;

const MAGIC: &[u8; 3] = b"BC1";

/// Deletes a fill claim if it still holds the caller's token. KEYS: claim. ARGV: token.
fn release_script() -> &'static crate::redis::Script {
    static SCRIPT: std::sync::OnceLock<crate::redis::Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| {
        crate::redis::Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
        )
    })
}

/// Cache entries in Redis, shared by every replica.
pub(crate) struct RedisCacheStore {
    redis: Redis,
}

impl RedisCacheStore {
    pub(crate) fn new(redis: Redis) -> Self {
        Self { redis }
    }

    /// `{prefix}:cache:{sha256 of the key}`: fixed length, no client bytes in Redis key
    /// names.
    fn redis_key(&self, key: &[u8]) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let digest = Sha256::digest(key);
        let mut hex = String::with_capacity(64);
        for b in digest {
            hex.push(HEX[usize::from(b >> 4)] as char);
            hex.push(HEX[usize::from(b & 15)] as char);
        }
        self.redis.key_str("cache", &hex)
    }
}

fn put_map(out: &mut BytesMut, map: &HeaderMap) {
    out.put_u16(map.len().min(u16::MAX as usize) as u16);
    for (name, value) in map.iter().take(u16::MAX as usize) {
        out.put_u16(name.as_str().len() as u16);
        out.put_slice(name.as_str().as_bytes());
        out.put_u32(value.len() as u32);
        out.put_slice(value.as_bytes());
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

pub(crate) fn encode(value: &Stored) -> Bytes {
    let mut out = BytesMut::new();
    out.put_slice(MAGIC);
    match value {
        Stored::Response(entry) => {
            out.reserve(entry.body.len() + 256);
            out.put_u8(0);
            out.put_u16(entry.status.as_u16());
            let stored = entry
                .stored_at
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            out.put_u64(millis(stored));
            out.put_u64(millis(entry.freshness.lifetime));
            out.put_u64(millis(entry.freshness.stale_while_revalidate));
            out.put_u64(millis(entry.freshness.stale_if_error));
            out.put_u8(u8::from(entry.freshness.must_revalidate));
            put_map(&mut out, &entry.headers);
            match &entry.trailers {
                Some(trailers) => put_map(&mut out, trailers),
                None => out.put_u16(u16::MAX),
            }
            out.put_u16(entry.tags.len() as u16);
            for (tag, version) in &entry.tags {
                out.put_u16(tag.len() as u16);
                out.put_slice(tag.as_bytes());
                out.put_u64(*version);
            }
            out.put_u32(entry.body.len() as u32);
            out.put_slice(&entry.body);
        }
        Stored::Vary(names, generation) => {
            out.put_u8(1);
            out.put_u16(names.len() as u16);
            for name in names.iter() {
                out.put_u16(name.as_str().len() as u16);
                out.put_slice(name.as_str().as_bytes());
            }
            out.put_u64(*generation);
        }
        Stored::Pass => out.put_u8(2),
    }
    out.freeze()
}

fn take(buf: &mut Bytes, n: usize) -> Option<Bytes> {
    (buf.remaining() >= n).then(|| buf.split_to(n))
}

fn u16_(buf: &mut Bytes) -> Option<u16> {
    (buf.remaining() >= 2).then(|| buf.get_u16())
}

fn u32_(buf: &mut Bytes) -> Option<u32> {
    (buf.remaining() >= 4).then(|| buf.get_u32())
}

fn u64_(buf: &mut Bytes) -> Option<u64> {
    (buf.remaining() >= 8).then(|| buf.get_u64())
}

fn get_map(buf: &mut Bytes, count: u16) -> Option<HeaderMap> {
    let mut map = HeaderMap::with_capacity(count as usize);
    for _ in 0..count {
        let len = u16_(buf)? as usize;
        let name = HeaderName::from_bytes(&take(buf, len)?).ok()?;
        let len = u32_(buf)? as usize;
        let value = HeaderValue::from_maybe_shared(take(buf, len)?).ok()?;
        map.append(name, value);
    }
    Some(map)
}

pub(crate) fn decode(mut buf: Bytes) -> Option<Stored> {
    if take(&mut buf, 3)?.as_ref() != MAGIC {
        return None;
    }
    if !buf.has_remaining() {
        return None;
    }
    match buf.get_u8() {
        0 => {
            let status = StatusCode::from_u16(u16_(&mut buf)?).ok()?;
            let stored_at = UNIX_EPOCH + Duration::from_millis(u64_(&mut buf)?);
            let freshness = Freshness {
                lifetime: Duration::from_millis(u64_(&mut buf)?),
                stale_while_revalidate: Duration::from_millis(u64_(&mut buf)?),
                stale_if_error: Duration::from_millis(u64_(&mut buf)?),
                must_revalidate: (buf.has_remaining() && buf.get_u8() == 1),
            };
            let count = u16_(&mut buf)?;
            let mut headers = get_map(&mut buf, count)?;
            // Room to spare, as the entry had when it was made (a hit replaces two values).
            headers.reserve(4);
            let trailers = match u16_(&mut buf)? {
                u16::MAX => None,
                count => Some(get_map(&mut buf, count)?),
            };
            let mut tags = Vec::new();
            for _ in 0..u16_(&mut buf)? {
                let len = u16_(&mut buf)? as usize;
                let tag = String::from_utf8(take(&mut buf, len)?.to_vec()).ok()?;
                tags.push((tag, u64_(&mut buf)?));
            }
            let len = u32_(&mut buf)? as usize;
            let body = take(&mut buf, len)?;
            Some(Stored::Response(Arc::new(Entry {
                status,
                headers,
                body,
                trailers,
                stored_at,
                freshness,
                tags,
                last_hit: Default::default(),
            })))
        }
        1 => {
            let mut names = Vec::new();
            for _ in 0..u16_(&mut buf)? {
                let len = u16_(&mut buf)? as usize;
                names.push(HeaderName::from_bytes(&take(&mut buf, len)?).ok()?);
            }
            let generation = u64_(&mut buf)?;
            Some(Stored::Vary(names.into(), generation))
        }
        2 => Some(Stored::Pass),
        _ => None,
    }
}

fn failed(e: crate::redis::StoreError) -> StoreError {
    match e {
        crate::redis::StoreError::Timeout(_) => StoreError::Timeout,
        other => StoreError::Failed(other.to_string()),
    }
}

impl Store for RedisCacheStore {
    fn get<'a>(&'a self, key: &'a [u8]) -> BoxFuture<'a, Result<Option<Stored>, StoreError>> {
        Box::pin(async move {
            let redis_key = self.redis_key(key);
            let raw: Option<Vec<u8>> = self
                .redis
                .call(|mut conn| async move {
                    redis::cmd("GET")
                        .arg(&redis_key)
                        .query_async(&mut conn)
                        .await
                })
                .await
                .map_err(failed)?;
            Ok(raw.and_then(|raw| decode(Bytes::from(raw))))
        })
    }

    fn put(&self, key: Key, value: Stored, ttl: Duration) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let ms = millis(ttl);
            if ms == 0 {
                return Ok(());
            }
            let redis_key = self.redis_key(&key);
            let bytes = encode(&value);
            self.redis
                .call(|mut conn| async move {
                    redis::cmd("SET")
                        .arg(&redis_key)
                        .arg(bytes.as_ref())
                        .arg("PX")
                        .arg(ms)
                        .query_async::<()>(&mut conn)
                        .await
                })
                .await
                .map_err(failed)
        })
    }

    fn claim_fill<'a>(
        &'a self,
        key: &'a [u8],
        ttl: Duration,
        token: u64,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let lock = format!("{}:fill", self.redis_key(key));
            let ms = millis(ttl).max(1);
            let set: Option<String> = self
                .redis
                .call(|mut conn| async move {
                    redis::cmd("SET")
                        .arg(&lock)
                        .arg(token)
                        .arg("NX")
                        .arg("PX")
                        .arg(ms)
                        .query_async(&mut conn)
                        .await
                })
                .await
                .map_err(failed)?;
            Ok(set.is_some())
        })
    }

    fn release_fill<'a>(
        &'a self,
        key: &'a [u8],
        token: u64,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let lock = format!("{}:fill", self.redis_key(key));
            let token = token.to_string();
            // Only this fill's claim: one that lapsed may be another replica's now.
            self.redis
                .eval::<i64>(release_script(), &[&lock], &[token.as_bytes()])
                .await
                .map(|_| ())
                .map_err(failed)
        })
    }

    fn shared(&self) -> bool {
        true
    }

    fn remove<'a>(&'a self, key: &'a [u8]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let redis_key = self.redis_key(key);
            self.redis
                .call(|mut conn| async move {
                    redis::cmd("DEL")
                        .arg(&redis_key)
                        .query_async::<()>(&mut conn)
                        .await
                })
                .await
                .map_err(failed)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    #[test]
    fn entries_round_trip_through_the_binary_frame() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "application/json".parse().unwrap());
        headers.append("x-multi", "a".parse().unwrap());
        headers.append("x-multi", "b".parse().unwrap());
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let stored_at = UNIX_EPOCH + Duration::from_millis(1_800_000_000_123);
        let entry = Stored::Response(Arc::new(Entry {
            status: StatusCode::NOT_FOUND,
            headers,
            body: Bytes::from_static(b"\x00\x01binary body"),
            trailers: Some(trailers),
            stored_at,
            freshness: Freshness {
                lifetime: Duration::from_secs(30),
                stale_while_revalidate: Duration::from_secs(5),
                stale_if_error: Duration::ZERO,
                must_revalidate: true,
            },
            tags: vec![("product-7".into(), 3)],
            last_hit: Default::default(),
        }));
        let Some(Stored::Response(back)) = decode(encode(&entry)) else {
            panic!("did not round-trip")
        };
        assert_eq!(back.status, StatusCode::NOT_FOUND);
        assert_eq!(back.headers.get_all("x-multi").iter().count(), 2);
        assert_eq!(back.trailers.as_ref().unwrap()["grpc-status"], "0");
        assert_eq!(back.body, Bytes::from_static(b"\x00\x01binary body"));
        assert_eq!(back.stored_at, stored_at);
        assert!(back.freshness.must_revalidate);
        assert_eq!(back.freshness.lifetime, Duration::from_secs(30));
        assert_eq!(back.tags, vec![("product-7".to_owned(), 3)]);
        let vary = Stored::Vary(vec![HeaderName::from_static("accept-language")].into(), 7);
        assert!(matches!(decode(encode(&vary)), Some(Stored::Vary(n, 7)) if n.len() == 1));
        assert!(matches!(decode(encode(&Stored::Pass)), Some(Stored::Pass)));
        let _ = SystemTime::now();
    }

    #[test]
    fn garbage_is_absent_not_a_panic() {
        for raw in [&b""[..], b"BC1", b"XX1\x00", b"BC1\x00\x00", b"BC1\x09"] {
            assert!(decode(Bytes::copy_from_slice(raw)).is_none());
        }
        let mut truncated = encode(&Stored::Vary(
            vec![HeaderName::from_static("accept")].into(),
            1,
        ))
        .to_vec();
        truncated.pop();
        assert!(decode(Bytes::from(truncated)).is_none());
    }
}
