//! Idempotency keys (draft-ietf-httpapi-idempotency-key-header): the records of keyed
//! requests and where they live. [`MemoryStore`] keeps them in this process, bounded;
//! [`RedisIdempotencyStore`] (feature `redis`) in Redis, one atomic script per step. Each
//! completed response is kept as a [`StoredResponse`] in a versioned binary frame.

mod record;
#[cfg(feature = "redis")]
mod redis;
mod store;

pub use record::{FRAME_VERSION, FrameError, MAX_FRAME_FIELDS, StoredResponse};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use redis::RedisIdempotencyStore;
pub use store::{
    BoxFuture, Claim, DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES, Fingerprint, IdempotencyStore,
    MemoryStore, OwnerToken, Scope, StoreError,
};

/// What the layer does with keyed requests while the store cannot be reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailurePolicy {
    /// Refuse them with `503` and `Retry-After: 1` (the default): running a request twice
    /// is worse than refusing it.
    #[default]
    Closed,
    /// Run them without idempotency, and log a warning.
    Open,
}
