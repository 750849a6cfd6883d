//! W3C Trace Context: the `traceparent` header, parsed strictly, and the ids of this request.

use std::cell::Cell;
use std::fmt;
use std::hash::{BuildHasher, Hasher};

use http::HeaderValue;

/// A 16-byte trace id; never all zero.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId([u8; 16]);

/// An 8-byte span id; never all zero.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId([u8; 8]);

impl TraceId {
    /// A new random trace id.
    pub fn random() -> Self {
        loop {
            let mut b = [0u8; 16];
            random_bytes(&mut b);
            if b != [0; 16] {
                return Self(b);
            }
        }
    }

    /// The id's bytes.
    pub fn to_bytes(self) -> [u8; 16] {
        self.0
    }

    /// The low 8 bytes as a number, which sampling decisions use: every service that samples
    /// on the same trace id with the same ratio makes the same decision.
    pub fn sampling_value(self) -> u64 {
        let mut low = [0u8; 8];
        low.copy_from_slice(&self.0[8..]);
        u64::from_be_bytes(low)
    }
}

impl SpanId {
    /// A new random span id.
    pub fn random() -> Self {
        loop {
            let mut b = [0u8; 8];
            random_bytes(&mut b);
            if b != [0; 8] {
                return Self(b);
            }
        }
    }

    /// The id's bytes.
    pub fn to_bytes(self) -> [u8; 8] {
        self.0
    }
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 32];
    for (i, b) in bytes.iter().enumerate() {
        buf[2 * i] = HEX[(b >> 4) as usize];
        buf[2 * i + 1] = HEX[(b & 0xf) as usize];
    }
    f.write_str(std::str::from_utf8(&buf[..bytes.len() * 2]).map_err(|_| fmt::Error)?)
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceId({self})")
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpanId({self})")
    }
}

/// A trace context as a `traceparent` header carried it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteContext {
    /// The caller's trace id.
    pub trace_id: TraceId,
    /// The caller's span id (the parent of this request's span).
    pub span_id: SpanId,
    /// The caller's trace flags (bit 0: sampled).
    pub flags: u8,
}

impl RemoteContext {
    /// Parses a `traceparent` value strictly: version `00`, exactly
    /// `00-{32 hex}-{16 hex}-{2 hex}` in lowercase, neither id all zeros. Anything else is
    /// `None` (and a new trace is started).
    ///
    /// ```
    /// use battlement::trace::RemoteContext;
    ///
    /// let ok = RemoteContext::parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
    /// assert_eq!(ok.trace_id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
    /// assert!(RemoteContext::parse(b"00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
    /// assert!(RemoteContext::parse(b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01").is_none());
    /// ```
    pub fn parse(value: &[u8]) -> Option<Self> {
        if value.len() != 55 || &value[..3] != b"00-" || value[35] != b'-' || value[52] != b'-' {
            return None;
        }
        let mut trace = [0u8; 16];
        hex_into(&value[3..35], &mut trace)?;
        let mut span = [0u8; 8];
        hex_into(&value[36..52], &mut span)?;
        let mut flags = [0u8; 1];
        hex_into(&value[53..55], &mut flags)?;
        if trace == [0; 16] || span == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id: TraceId(trace),
            span_id: SpanId(span),
            flags: flags[0],
        })
    }

    /// Whether the caller sampled its trace.
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

impl fmt::Display for RemoteContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

fn hex_into(src: &[u8], dst: &mut [u8]) -> Option<()> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    for (i, out) in dst.iter_mut().enumerate() {
        *out = (nibble(src[2 * i])? << 4) | nibble(src[2 * i + 1])?;
    }
    Some(())
}

/// The trace context of this request, in the request extensions.
///
/// Its trace id is the caller's when a valid `traceparent` came in (and the layer trusts
/// it), a new one otherwise; its span id is always new. Use [`TraceContext::traceparent`]
/// to propagate it on outgoing calls.
///
/// ```
/// use battlement::trace::{RemoteContext, TraceContext};
///
/// let incoming = RemoteContext::parse(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
/// let ctx = TraceContext::child_of(incoming);
/// assert_eq!(ctx.trace_id(), incoming.trace_id);
/// assert_eq!(ctx.parent_span_id(), Some(incoming.span_id));
/// assert!(ctx.traceparent().to_str().unwrap().starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: TraceId,
    span_id: SpanId,
    parent: Option<SpanId>,
    flags: u8,
    link: Option<RemoteContext>,
}

impl TraceContext {
    /// A new trace (no parent), sampled.
    pub fn new_root() -> Self {
        Self {
            trace_id: TraceId::random(),
            span_id: SpanId::random(),
            parent: None,
            flags: 1,
            link: None,
        }
    }

    /// A span in the caller's trace.
    pub fn child_of(remote: RemoteContext) -> Self {
        Self {
            trace_id: remote.trace_id,
            span_id: SpanId::random(),
            parent: Some(remote.span_id),
            flags: remote.flags & 1,
            link: None,
        }
    }

    /// A new trace that records the caller's context as a link rather than a parent (for
    /// public endpoints, whose callers' trace ids are not to be trusted).
    pub fn linked_to(remote: RemoteContext) -> Self {
        Self {
            link: Some(remote),
            ..Self::new_root()
        }
    }

    /// The trace id.
    pub fn trace_id(&self) -> TraceId {
        self.trace_id
    }

    /// This request's span id.
    pub fn span_id(&self) -> SpanId {
        self.span_id
    }

    /// The caller's span id, when the caller's context was trusted as the parent.
    pub fn parent_span_id(&self) -> Option<SpanId> {
        self.parent
    }

    /// The caller's context, when it was recorded as a link instead of a parent.
    pub fn link(&self) -> Option<RemoteContext> {
        self.link
    }

    /// Whether the trace is sampled (the caller's flag, or set for a new trace).
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The `traceparent` header value to send on calls made while handling this request.
    pub fn traceparent(&self) -> HeaderValue {
        let text = format!("00-{}-{}-{:02x}", self.trace_id, self.span_id, self.flags);
        HeaderValue::from_str(&text).expect("hex digits and dashes are a valid header value")
    }
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    // `RandomState` is seeded from the operating system once per thread and varied per
    // instance: enough for ids that must be unpredictable to a client, not for secrets.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    h.finish()
}

/// Fills `out` from a per-thread wyrand generator: a few nanoseconds per id, no lock, no
/// system call on the request path.
pub(crate) fn random_bytes(out: &mut [u8]) {
    RNG.with(|state| {
        for chunk in out.chunks_mut(8) {
            let s = state.get().wrapping_add(0xa076_1d64_78bd_642f);
            state.set(s);
            let t = u128::from(s) * u128::from(s ^ 0xe703_7ed1_a0b4_28db);
            let v = ((t >> 64) as u64) ^ (t as u64);
            chunk.copy_from_slice(&v.to_le_bytes()[..chunk.len()]);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &[u8] = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn strict_parsing() {
        let ctx = RemoteContext::parse(VALID).unwrap();
        assert_eq!(ctx.span_id.to_string(), "00f067aa0ba902b7");
        assert!(ctx.sampled());
        assert_eq!(ctx.to_string().as_bytes(), VALID);
        for bad in [
            &b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"[..],
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            b"",
        ] {
            assert!(
                RemoteContext::parse(bad).is_none(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn contexts() {
        let remote = RemoteContext::parse(VALID).unwrap();
        let child = TraceContext::child_of(remote);
        assert_eq!(child.trace_id(), remote.trace_id);
        assert_ne!(child.span_id(), remote.span_id);
        let linked = TraceContext::linked_to(remote);
        assert_ne!(linked.trace_id(), remote.trace_id);
        assert_eq!(linked.link(), Some(remote));
        assert_eq!(linked.parent_span_id(), None);
        let root = TraceContext::new_root();
        assert!(RemoteContext::parse(root.traceparent().as_bytes()).is_some());
    }

    #[test]
    fn random_ids_differ() {
        let ids: std::collections::HashSet<_> = (0..1000).map(|_| TraceId::random()).collect();
        assert_eq!(ids.len(), 1000);
    }
}
