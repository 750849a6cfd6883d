//! Verification keys, each bound to exactly one algorithm, and the sets they come in.

use std::fmt;
use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey};

/// One key a token signature can be checked with, bound to exactly one algorithm: a token
/// whose header names another algorithm is never checked with it (no RS256/HS256
/// confusion, no `alg: none`).
#[derive(Clone)]
pub struct VerifyKey {
    pub(crate) kid: Option<Arc<str>>,
    pub(crate) alg: Algorithm,
    pub(crate) key: DecodingKey,
    /// Unique per key made in this process: a verified token remembers the key that
    /// verified it, and is verified again once that key is no longer in the set (a key
    /// set fetched again makes new keys, even for the same material).
    pub(crate) id: u64,
}

impl VerifyKey {
    /// A key for `alg` with `kid` (or none).
    pub(crate) fn new(kid: Option<&str>, alg: Algorithm, key: DecodingKey) -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Self {
            kid: kid.map(Arc::from),
            alg,
            key,
            id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// The key id.
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// The one algorithm this key verifies.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

impl fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key material (an HMAC key is a secret).
        f.debug_struct("VerifyKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// The keys of one issuer at one moment, swapped as a whole when they are refreshed.
#[derive(Clone, Debug, Default)]
pub struct KeySet {
    keys: Vec<Arc<VerifyKey>>,
}

impl KeySet {
    /// A set of `keys`. Keys that share a `kid` are all dropped: a `kid` must name one key.
    pub(crate) fn new(keys: Vec<VerifyKey>) -> Self {
        let mut out: Vec<Arc<VerifyKey>> = Vec::with_capacity(keys.len());
        let mut duplicated: Vec<Arc<str>> = Vec::new();
        for key in keys {
            if let Some(kid) = &key.kid
                && out.iter().any(|k| k.kid.as_ref() == Some(kid))
            {
                duplicated.push(kid.clone());
                continue;
            }
            out.push(Arc::new(key));
        }
        if !duplicated.is_empty() {
            tracing::warn!(
                kids = ?duplicated,
                "battlement::auth: keys sharing a kid were dropped (a kid must name one key)"
            );
            out.retain(|k| k.kid.as_ref().is_none_or(|kid| !duplicated.contains(kid)));
        }
        Self { keys: out }
    }

    /// The key for a token header's `kid` and `alg`: by `kid` when there is one (and only if
    /// that key is bound to `alg`); without a `kid`, the only key bound to `alg`, if exactly
    /// one is.
    pub(crate) fn find(&self, kid: Option<&str>, alg: Algorithm) -> Option<&Arc<VerifyKey>> {
        match kid {
            Some(kid) => self
                .keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid))
                .filter(|k| k.alg == alg),
            None => {
                let mut matching = self.keys.iter().filter(|k| k.alg == alg);
                let first = matching.next()?;
                matching.next().is_none().then_some(first)
            }
        }
    }

    /// Whether the key made with this [`VerifyKey::id`] is in the set.
    pub(crate) fn contains_id(&self, id: u64) -> bool {
        self.keys.iter().any(|k| k.id == id)
    }

    /// Whether a key with this `kid` is in the set.
    pub(crate) fn contains_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }

    /// The keys.
    pub fn keys(&self) -> impl Iterator<Item = &VerifyKey> {
        self.keys.iter().map(|k| &**k)
    }

    /// How many keys there are.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hmac(kid: Option<&str>, alg: Algorithm) -> VerifyKey {
        VerifyKey::new(kid, alg, DecodingKey::from_secret(b"secret"))
    }

    #[test]
    fn lookup_binds_kid_and_algorithm() {
        let set = KeySet::new(vec![
            hmac(Some("a"), Algorithm::HS256),
            hmac(Some("b"), Algorithm::HS384),
        ]);
        assert_eq!(
            set.find(Some("a"), Algorithm::HS256).unwrap().kid(),
            Some("a")
        );
        // The right kid with another algorithm is no match.
        assert!(set.find(Some("a"), Algorithm::HS384).is_none());
        assert!(set.find(Some("c"), Algorithm::HS256).is_none());
        // No kid: the only key of that algorithm.
        assert_eq!(set.find(None, Algorithm::HS384).unwrap().kid(), Some("b"));
        assert!(set.find(None, Algorithm::HS512).is_none());
    }

    #[test]
    fn no_kid_is_ambiguous_with_two_keys_of_one_algorithm() {
        let set = KeySet::new(vec![
            hmac(Some("a"), Algorithm::HS256),
            hmac(Some("b"), Algorithm::HS256),
        ]);
        assert!(set.find(None, Algorithm::HS256).is_none());
    }

    #[test]
    fn duplicate_kids_are_dropped() {
        let set = KeySet::new(vec![
            hmac(Some("a"), Algorithm::HS256),
            hmac(Some("a"), Algorithm::HS256),
            hmac(Some("b"), Algorithm::HS256),
        ]);
        assert_eq!(set.len(), 1);
        assert!(!set.contains_kid("a"));
        assert!(set.contains_kid("b"));
        assert!(format!("{:?}", set).contains("VerifyKey"));
    }
}
