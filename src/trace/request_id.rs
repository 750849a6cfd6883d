//! Request ids: taken from a valid incoming header, otherwise made as UUIDv7.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use http::HeaderValue;

use super::traceparent::random_bytes;

/// Longest incoming request id accepted.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// The id of one request, in the request extensions for handlers and echoed on the response.
///
/// An incoming id is kept only when it is 1 to 128 characters of `[A-Za-z0-9._-]`: anything
/// else (too long, spaces, quotes, control characters) is replaced by a fresh UUIDv7, so an id
/// read from the extensions is always safe to log and to put in a header.
///
/// ```
/// use battlement::trace::RequestId;
/// use http::HeaderValue;
///
/// let kept = RequestId::from_header(&HeaderValue::from_static("req-42.a_b")).unwrap();
/// assert_eq!(kept.as_str(), "req-42.a_b");
/// assert!(RequestId::from_header(&HeaderValue::from_static("no spaces")).is_none());
/// assert_eq!(RequestId::generate().as_str().len(), 36);
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RequestId(HeaderValue);

impl RequestId {
    /// `value` as a request id, if it is 1 to 128 characters of `[A-Za-z0-9._-]`.
    pub fn from_header(value: &HeaderValue) -> Option<Self> {
        is_valid(value.as_bytes()).then(|| Self(value.clone()))
    }

    /// A new UUIDv7 (time-ordered, 74 random bits).
    pub fn generate() -> Self {
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut random = [0u8; 10];
        random_bytes(&mut random);
        let uuid = uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid();
        let mut buf = uuid::Uuid::encode_buffer();
        let text = uuid.hyphenated().encode_lower(&mut buf);
        // A hyphenated UUID is always a valid header value.
        Self(HeaderValue::from_str(text).expect("a UUID is a valid header value"))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        // Only ASCII ever gets in (checked in `from_header`, or a UUID).
        self.0.to_str().unwrap_or_default()
    }

    /// The id as a header value.
    pub fn header_value(&self) -> &HeaderValue {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RequestId").field(&self.as_str()).finish()
    }
}

/// Whether `bytes` is 1 to 128 characters of `[A-Za-z0-9._-]`.
pub(crate) fn is_valid(bytes: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&bytes.len())
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        assert!(is_valid(b"a"));
        assert!(is_valid(b"A-z_0.9"));
        assert!(is_valid(&[b'x'; 128]));
        assert!(!is_valid(&[b'x'; 129]));
        assert!(!is_valid(b""));
        assert!(!is_valid(b"a b"));
        assert!(!is_valid(b"a\"b"));
        assert!(!is_valid(b"a/b"));
        assert!(!is_valid("é".as_bytes()));
    }

    #[test]
    fn generated_ids_are_uuid_v7_and_distinct() {
        let a = RequestId::generate();
        let b = RequestId::generate();
        assert_ne!(a, b);
        let parsed = uuid::Uuid::try_parse(a.as_str()).unwrap();
        assert_eq!(parsed.get_version_num(), 7);
        assert!(is_valid(a.as_str().as_bytes()));
    }
}
