//! API keys: stored only as SHA-256 hashes, compared in constant time, with a visible id.

use std::collections::HashMap;
use std::fmt;

use aws_lc_rs::digest::{SHA256, digest};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::HeaderName;
use subtle::ConstantTimeEq;

use super::{AuthFailure, ConfigError};
use crate::principal::{AuthScheme, Principal};

/// Shortest secret part accepted (128 bits of base64url).
const MIN_SECRET: usize = 22;
/// Longest presented key looked at; anything longer is refused unread.
const MAX_KEY: usize = 256;

/// One API key as the server keeps it: its id (the visible part before the `.`), the
/// SHA-256 of the whole key, and who it authenticates as. The key itself is never kept,
/// and `Debug` shows the id only.
///
/// A key reads `{id}.{secret}`: `id` is 1 to 64 characters of `[A-Za-z0-9_-]` (say
/// `live_3f9a`, safe to log and show in a dashboard), `secret` at least 22 characters of
/// `[A-Za-z0-9_-]`.
///
/// ```
/// use battlement::auth::{ApiKey, ApiKeys};
///
/// // Minting: show `plaintext` to the user once, store `key` (or `key.hash_hex()`).
/// let (plaintext, key) = ApiKey::generate("live_3f9a", "billing-service").unwrap();
/// let keys = ApiKeys::new().with(key.scopes(["invoices:read"])).unwrap();
/// let who = keys.verify(&plaintext).unwrap();
/// assert_eq!(who.subject(), "billing-service");
/// assert!(keys.verify("live_3f9a.wrong-secret-wrong-secret-wrong").is_err());
/// assert!(!format!("{keys:?}").contains(plaintext.split('.').nth(1).unwrap()));
/// ```
#[derive(Clone)]
#[must_use]
pub struct ApiKey {
    id: String,
    hash: [u8; 32],
    subject: String,
    scopes: Vec<String>,
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("id", &self.id)
            .field("subject", &self.subject)
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}

fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn valid_secret(secret: &str) -> bool {
    secret.len() >= MIN_SECRET
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}

impl ApiKey {
    /// The entry for the full key `key` (`{id}.{secret}`), hashed at once.
    pub fn from_key(key: &str, subject: impl Into<String>) -> Result<Self, ConfigError> {
        let (id, secret) = key
            .split_once('.')
            .ok_or(ConfigError::ApiKey("a key is {id}.{secret}"))?;
        if !valid_id(id) {
            return Err(ConfigError::ApiKey("the id must be 1-64 of [A-Za-z0-9_-]"));
        }
        if !valid_secret(secret) {
            return Err(ConfigError::ApiKey(
                "the secret must be at least 22 of [A-Za-z0-9_-]",
            ));
        }
        Ok(Self {
            id: id.to_owned(),
            hash: sha256(key.as_bytes()),
            subject: subject.into(),
            scopes: Vec::new(),
        })
    }

    /// The entry for a key known only by its id and the hex SHA-256 of the whole key (what
    /// a database of issued keys keeps).
    pub fn from_hash(
        id: &str,
        sha256_hex: &str,
        subject: impl Into<String>,
    ) -> Result<Self, ConfigError> {
        if !valid_id(id) {
            return Err(ConfigError::ApiKey("the id must be 1-64 of [A-Za-z0-9_-]"));
        }
        let hex = sha256_hex.as_bytes();
        if hex.len() != 64 {
            return Err(ConfigError::ApiKey("the hash must be 64 hex digits"));
        }
        let mut hash = [0u8; 32];
        for (i, out) in hash.iter_mut().enumerate() {
            let pair = std::str::from_utf8(&hex[2 * i..2 * i + 2])
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or(ConfigError::ApiKey("the hash must be 64 hex digits"))?;
            *out = pair;
        }
        Ok(Self {
            id: id.to_owned(),
            hash,
            subject: subject.into(),
            scopes: Vec::new(),
        })
    }

    /// A new random key with id `id`: the plaintext to hand out once, and its entry.
    pub fn generate(id: &str, subject: impl Into<String>) -> Result<(String, Self), ConfigError> {
        let mut secret = [0u8; 24];
        aws_lc_rs::rand::fill(&mut secret)
            .map_err(|_| ConfigError::ApiKey("the system random generator failed"))?;
        let plaintext = format!("{id}.{}", URL_SAFE_NO_PAD.encode(secret));
        let entry = Self::from_key(&plaintext, subject)?;
        Ok((plaintext, entry))
    }

    /// The scopes of the principal this key authenticates as.
    pub fn scopes<I, T>(mut self, scopes: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.scopes = scopes.into_iter().map(Into::into).collect();
        self
    }

    /// The id (the visible part).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The hex SHA-256 of the whole key, for storage.
    pub fn hash_hex(&self) -> String {
        self.hash.iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[derive(Clone)]
struct Stored {
    hash: [u8; 32],
    principal: Principal,
}

/// The API keys a service accepts, read from one header (`x-api-key` by default). Several
/// keys may share an id, so a key can be rotated without downtime: add the new one, roll it
/// out, remove the old one.
#[derive(Clone)]
pub struct ApiKeys {
    by_id: HashMap<String, Vec<Stored>>,
    header: HeaderName,
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ids: Vec<&String> = self.by_id.keys().collect();
        ids.sort();
        f.debug_struct("ApiKeys")
            .field("ids", &ids)
            .field("header", &self.header)
            .finish()
    }
}

impl Default for ApiKeys {
    fn default() -> Self {
        Self::new()
    }
}

impl ApiKeys {
    /// No keys, read from `x-api-key`.
    pub fn new() -> Self {
        Self {
            by_id: HashMap::new(),
            header: HeaderName::from_static("x-api-key"),
        }
    }

    /// Adds `key`.
    pub fn with(mut self, key: ApiKey) -> Result<Self, ConfigError> {
        let entries = self.by_id.entry(key.id.clone()).or_default();
        if entries.iter().any(|e| e.hash == key.hash) {
            return Err(ConfigError::DuplicateApiKey(key.id));
        }
        let principal = Principal::new(key.subject.as_str(), AuthScheme::ApiKey)
            .with_scopes(key.scopes.iter().map(String::as_str));
        entries.push(Stored {
            hash: key.hash,
            principal,
        });
        Ok(self)
    }

    /// The header keys are read from.
    #[must_use]
    pub fn header(mut self, header: HeaderName) -> Self {
        self.header = header;
        self
    }

    pub(crate) fn header_name(&self) -> &HeaderName {
        &self.header
    }

    /// How many keys are configured.
    pub fn len(&self) -> usize {
        self.by_id.values().map(Vec::len).sum()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The principal of `presented`, or [`AuthFailure::ApiKey`].
    pub fn verify(&self, presented: &str) -> Result<Principal, AuthFailure> {
        if presented.len() > MAX_KEY {
            return Err(AuthFailure::ApiKey);
        }
        let Some((id, _)) = presented.split_once('.') else {
            return Err(AuthFailure::ApiKey);
        };
        // The id is public: looking it up need not be constant-time. The hash comparison
        // is, and every entry of the id is compared, so timing says nothing of the secret.
        let hash = sha256(presented.as_bytes());
        let mut found: Option<&Principal> = None;
        for stored in self.by_id.get(id).into_iter().flatten() {
            if bool::from(stored.hash.ct_eq(&hash)) {
                found = Some(&stored.principal);
            }
        }
        found.cloned().ok_or(AuthFailure::ApiKey)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_byte_off_is_refused() {
        let key = "live_1.abcdefghijklmnopqrstuvwxyz012345";
        let keys = ApiKeys::new()
            .with(ApiKey::from_key(key, "svc").unwrap())
            .unwrap();
        assert_eq!(keys.verify(key).unwrap().subject(), "svc");
        let mut bytes = key.as_bytes().to_vec();
        for i in 0..bytes.len() {
            let original = bytes[i];
            bytes[i] = if original == b'a' { b'b' } else { b'a' };
            let wrong = String::from_utf8(bytes.clone()).unwrap();
            assert!(keys.verify(&wrong).is_err(), "{wrong}");
            bytes[i] = original;
        }
        assert!(keys.verify(&format!("{key}x")).is_err());
        assert!(keys.verify(&key[..key.len() - 1]).is_err());
        assert!(keys.verify("").is_err());
        assert!(keys.verify(&"x".repeat(10_000)).is_err());
    }

    #[test]
    fn rotation_keeps_both_keys_of_an_id() {
        let (old, old_entry) = ApiKey::generate("svc", "svc").unwrap();
        let (new, new_entry) = ApiKey::generate("svc", "svc").unwrap();
        let keys = ApiKeys::new()
            .with(old_entry)
            .unwrap()
            .with(new_entry.clone())
            .unwrap();
        assert!(keys.verify(&old).is_ok());
        assert!(keys.verify(&new).is_ok());
        assert_eq!(keys.len(), 2);
        assert!(keys.clone().with(new_entry).is_err());
    }

    #[test]
    fn stored_hashes_work_and_secrets_are_not_printed() {
        let (plain, entry) = ApiKey::generate("ops", "ops-bot").unwrap();
        let from_hash = ApiKey::from_hash("ops", &entry.hash_hex(), "ops-bot")
            .unwrap()
            .scopes(["admin"]);
        let keys = ApiKeys::new().with(from_hash).unwrap();
        let who = keys.verify(&plain).unwrap();
        assert!(who.has_scope("admin"));
        let secret = plain.split_once('.').unwrap().1;
        assert!(!format!("{keys:?} {entry:?}").contains(secret));
        assert!(!format!("{entry:?}").contains(&entry.hash_hex()));
    }

    #[test]
    fn malformed_keys_are_config_errors() {
        assert!(ApiKey::from_key("no-dot", "s").is_err());
        assert!(ApiKey::from_key("id.short", "s").is_err());
        assert!(ApiKey::from_key("bad id.abcdefghijklmnopqrstuvwxyz", "s").is_err());
        assert!(ApiKey::from_hash("id", "zz", "s").is_err());
    }
}
