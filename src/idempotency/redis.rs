//! The Redis store: one hash per scope, each step one Lua script (one atomic round trip).
//!
//! The key is `{prefix}:idem:{<hex SHA-256 scope>}` (no client bytes in key names; one hash
//! tag, so it runs unchanged on Redis Cluster). Its fields:
//!
//! ```text
//! st   "f" (in flight) or "c" (completed)
//! fp   the 32-byte fingerprint
//! own  the 16-byte owner token (in flight only)
//! at   when the claim was made, in Redis milliseconds (TIME)
//! res  the response frame (completed only; see `record.rs`)
//! ```
//!
//! The in-flight record expires with the lease (`PX`), the completed one with the
//! retention; Redis drops both by itself.

use std::time::Duration;

use bytes::Bytes;
use redis::Value;

use super::record::StoredResponse;
use super::store::{
    BoxFuture, Claim, Fingerprint, IdempotencyStore, OwnerToken, Scope, StoreError,
};
use crate::redis::{RedisStore, Script};

const CLAIM: &str = r#"
local st = redis.call('HGET', KEYS[1], 'st')
if not st then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('HSET', KEYS[1], 'st', 'f', 'fp', ARGV[1], 'own', ARGV[2], 'at', now)
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {0}
end
if redis.call('HGET', KEYS[1], 'fp') ~= ARGV[1] then
  return {2}
end
if st == 'f' then
  return {1}
end
return {3, redis.call('HGET', KEYS[1], 'res')}
"#;

const COMPLETE: &str = r#"
if redis.call('HGET', KEYS[1], 'st') ~= 'f' or redis.call('HGET', KEYS[1], 'own') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'st', 'c', 'res', ARGV[2])
redis.call('HDEL', KEYS[1], 'own')
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"#;

const RELEASE: &str = r#"
if redis.call('HGET', KEYS[1], 'st') ~= 'f' or redis.call('HGET', KEYS[1], 'own') ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
return 1
"#;

const EXTEND: &str = r#"
if redis.call('HGET', KEYS[1], 'st') ~= 'f' or redis.call('HGET', KEYS[1], 'own') ~= ARGV[1] then
  return 0
end
return redis.call('PEXPIRE', KEYS[1], ARGV[2])
"#;

/// Idempotency records in Redis, shared by every instance of the service.
///
/// Every call waits at most the [`RedisStore`]'s timeout (50 ms by default) and fails at
/// once while its circuit breaker is open; the layer's
/// [`FailurePolicy`](super::FailurePolicy) then decides (default: `503`). A record whose
/// response frame cannot be read is reported as [`StoreError::Corrupt`], never replayed.
#[derive(Clone)]
pub struct RedisIdempotencyStore {
    redis: RedisStore,
    claim: Script,
    complete: Script,
    release: Script,
    extend: Script,
}

impl std::fmt::Debug for RedisIdempotencyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisIdempotencyStore")
            .field("redis", &self.redis)
            .finish_non_exhaustive()
    }
}

impl RedisIdempotencyStore {
    /// Records in `redis`.
    pub fn new(redis: RedisStore) -> Self {
        Self {
            redis,
            claim: Script::new(CLAIM),
            complete: Script::new(COMPLETE),
            release: Script::new(RELEASE),
            extend: Script::new(EXTEND),
        }
    }

    /// The Redis handle.
    pub fn store(&self) -> &RedisStore {
        &self.redis
    }

    fn key(&self, scope: &Scope) -> String {
        self.redis.key("idem", &scope.to_hex())
    }
}

fn millis(d: Duration) -> Vec<u8> {
    d.as_millis()
        .clamp(1, i64::MAX as u128)
        .to_string()
        .into_bytes()
}

fn protocol(what: &str) -> StoreError {
    StoreError::Redis(crate::redis::StoreError::Protocol(format!(
        "idempotency claim script returned {what}"
    )))
}

fn parse_claim(reply: Value) -> Result<Claim, StoreError> {
    let Value::Array(items) = reply else {
        return Err(protocol("something other than an array"));
    };
    match items.as_slice() {
        [Value::Int(0)] => Ok(Claim::Acquired),
        [Value::Int(1)] => Ok(Claim::InFlight),
        [Value::Int(2)] => Ok(Claim::Mismatch),
        [Value::Int(3), Value::BulkString(frame)] => Ok(Claim::Completed(StoredResponse::decode(
            Bytes::copy_from_slice(frame),
        )?)),
        // A completed record without its response (written by hand, or half deleted).
        [Value::Int(3), ..] => Err(StoreError::Corrupt(super::record::FrameError::Empty)),
        _ => Err(protocol("an unknown answer")),
    }
}

impl IdempotencyStore for RedisIdempotencyStore {
    fn claim<'a>(
        &'a self,
        scope: &'a Scope,
        fingerprint: &'a Fingerprint,
        owner: &'a OwnerToken,
        lease: Duration,
    ) -> BoxFuture<'a, Result<Claim, StoreError>> {
        Box::pin(async move {
            let key = self.key(scope);
            let lease = millis(lease);
            let reply: Value = self
                .redis
                .eval(
                    &self.claim,
                    &[key.as_str()],
                    &[
                        fingerprint.as_bytes().as_slice(),
                        owner.as_bytes().as_slice(),
                        &lease,
                    ],
                )
                .await?;
            parse_claim(reply)
        })
    }

    fn complete<'a>(
        &'a self,
        scope: &'a Scope,
        owner: &'a OwnerToken,
        response: &'a StoredResponse,
        retention: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let key = self.key(scope);
            let frame = response.encode()?;
            let retention = millis(retention);
            let written: i64 = self
                .redis
                .eval(
                    &self.complete,
                    &[key.as_str()],
                    &[owner.as_bytes().as_slice(), &frame, &retention],
                )
                .await?;
            Ok(written == 1)
        })
    }

    fn release<'a>(
        &'a self,
        scope: &'a Scope,
        owner: &'a OwnerToken,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let key = self.key(scope);
            // Past an open breaker: a claim given back must reach Redis as soon as it
            // answers, or retries meet it until its lease runs out.
            let released: i64 = self
                .redis
                .eval_unguarded(
                    &self.release,
                    &[key.as_str()],
                    &[owner.as_bytes().as_slice()],
                )
                .await?;
            Ok(released == 1)
        })
    }

    fn extend<'a>(
        &'a self,
        scope: &'a Scope,
        owner: &'a OwnerToken,
        lease: Duration,
    ) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(async move {
            let key = self.key(scope);
            let lease = millis(lease);
            let extended: i64 = self
                .redis
                .eval(
                    &self.extend,
                    &[key.as_str()],
                    &[owner.as_bytes().as_slice(), &lease],
                )
                .await?;
            Ok(extended == 1)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_parsed_strictly() {
        assert_eq!(
            parse_claim(Value::Array(vec![Value::Int(0)])).unwrap(),
            Claim::Acquired
        );
        assert_eq!(
            parse_claim(Value::Array(vec![Value::Int(1)])).unwrap(),
            Claim::InFlight
        );
        assert_eq!(
            parse_claim(Value::Array(vec![Value::Int(2)])).unwrap(),
            Claim::Mismatch
        );
        let frame = super::super::store::contract::response("done")
            .encode()
            .unwrap();
        let Claim::Completed(r) = parse_claim(Value::Array(vec![
            Value::Int(3),
            Value::BulkString(frame.to_vec()),
        ]))
        .unwrap() else {
            panic!("not completed");
        };
        assert_eq!(r.body(), "done");
        for garbage in [
            Value::Nil,
            Value::Int(0),
            Value::Array(vec![]),
            Value::Array(vec![Value::Int(7)]),
            Value::Array(vec![Value::Int(3)]),
            Value::Array(vec![Value::Int(3), Value::BulkString(b"\x01junk".to_vec())]),
        ] {
            assert!(parse_claim(garbage).is_err());
        }
    }
}
