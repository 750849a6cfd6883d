//! The stored response and its compact binary frame.
//!
//! Layout of a frame (all integers big-endian):
//!
//! ```text
//! version:u8 (1)
//! status:u16
//! headers:u16 { name_len:u16 name value_len:u32 value }*
//! trailers:u16 (0xFFFF = none) { name_len:u16 name value_len:u32 value }*
//! body_len:u32 body
//! ```
//!
//! Nothing may follow the body. Decoding checks every length against what is left, every
//! name and value against HTTP's rules, and caps the number of fields, so bytes that are not
//! a frame give a [`FrameError`], never a panic or a large allocation.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

/// The version byte that opens every frame this crate writes.
pub const FRAME_VERSION: u8 = 1;

/// Most header (or trailer) fields a frame may hold. The layer stores only allowlisted
/// headers, so real records are far below it; it bounds what decoding a hostile frame costs.
pub const MAX_FRAME_FIELDS: usize = 1024;

const NO_TRAILERS: u16 = u16::MAX;

/// Why bytes could not be read as a [`StoredResponse`] frame, or a response not written as
/// one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The frame was empty.
    #[error("empty frame")]
    Empty,
    /// The frame starts with a version this crate does not know.
    #[error("unknown frame version {0}")]
    Version(u8),
    /// The frame ended before a length it announced.
    #[error("truncated frame")]
    Truncated,
    /// The status code is not one HTTP allows.
    #[error("invalid status code {0}")]
    Status(u16),
    /// A header name or value is not valid HTTP.
    #[error("invalid header field")]
    Field,
    /// More fields than [`MAX_FRAME_FIELDS`].
    #[error("too many header fields")]
    TooManyFields,
    /// Bytes follow the body.
    #[error("{0} bytes after the end of the frame")]
    TrailingBytes(usize),
    /// The response is too large for the frame's length fields (a body over 4 GiB, a header
    /// value over 4 GiB or a header name over 64 KiB).
    #[error("the response is too large to store")]
    TooLarge,
}

/// A response as the idempotency layer stores and replays it: status, the allowlisted
/// headers, the whole body, and the trailers when it had any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredResponse {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

impl StoredResponse {
    /// A response of `status`, `headers` and `body`, without trailers.
    pub fn new(status: StatusCode, headers: HeaderMap, body: Bytes) -> Self {
        Self {
            status,
            headers,
            body,
            trailers: None,
        }
    }

    /// Sets the trailers.
    #[must_use]
    pub fn with_trailers(mut self, trailers: Option<HeaderMap>) -> Self {
        self.trailers = trailers;
        self
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The stored headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The body.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The trailers, if the response had any.
    pub fn trailers(&self) -> Option<&HeaderMap> {
        self.trailers.as_ref()
    }

    /// Takes the response apart: status, headers, body, trailers.
    pub fn into_parts(self) -> (StatusCode, HeaderMap, Bytes, Option<HeaderMap>) {
        (self.status, self.headers, self.body, self.trailers)
    }

    /// Roughly how many bytes it holds, for stores bounded in bytes.
    pub fn weight(&self) -> usize {
        let fields = |map: &HeaderMap| -> usize {
            map.iter()
                .map(|(k, v)| k.as_str().len() + v.len() + 32)
                .sum()
        };
        self.body.len() + fields(&self.headers) + self.trailers.as_ref().map_or(0, fields) + 64
    }

    /// Writes the response as a compact binary frame (all integers big-endian):
    ///
    /// ```text
    /// version:u8 (FRAME_VERSION, 1)
    /// status:u16
    /// headers:u16 { name_len:u16 name value_len:u32 value }*
    /// trailers:u16 (0xFFFF = none) { name_len:u16 name value_len:u32 value }*
    /// body_len:u32 body
    /// ```
    pub fn encode(&self) -> Result<Bytes, FrameError> {
        let body_len = u32::try_from(self.body.len()).map_err(|_| FrameError::TooLarge)?;
        let mut out = BytesMut::with_capacity(self.weight());
        out.put_u8(FRAME_VERSION);
        out.put_u16(self.status.as_u16());
        put_fields(&mut out, &self.headers)?;
        match &self.trailers {
            Some(trailers) => put_fields(&mut out, trailers)?,
            None => out.put_u16(NO_TRAILERS),
        }
        out.put_u32(body_len);
        out.put_slice(&self.body);
        Ok(out.freeze())
    }

    /// Reads a frame written by [`StoredResponse::encode`]. Every length is checked against
    /// what is left, every name and value against HTTP's rules, the number of fields is
    /// capped ([`MAX_FRAME_FIELDS`]) and nothing may follow the body: bytes that are not a
    /// frame give a [`FrameError`], never a panic or a large allocation.
    pub fn decode(mut frame: Bytes) -> Result<Self, FrameError> {
        if !frame.has_remaining() {
            return Err(FrameError::Empty);
        }
        let version = frame.get_u8();
        if version != FRAME_VERSION {
            return Err(FrameError::Version(version));
        }
        let code = u16_(&mut frame)?;
        let status = StatusCode::from_u16(code).map_err(|_| FrameError::Status(code))?;
        let count = u16_(&mut frame)?;
        let headers = get_fields(&mut frame, count)?;
        let trailers = match u16_(&mut frame)? {
            NO_TRAILERS => None,
            count => Some(get_fields(&mut frame, count)?),
        };
        let len = u32_(&mut frame)? as usize;
        let body = take(&mut frame, len)?;
        if frame.has_remaining() {
            return Err(FrameError::TrailingBytes(frame.remaining()));
        }
        Ok(Self {
            status,
            headers,
            body,
            trailers,
        })
    }
}

fn put_fields(out: &mut BytesMut, map: &HeaderMap) -> Result<(), FrameError> {
    if map.len() > MAX_FRAME_FIELDS {
        return Err(FrameError::TooManyFields);
    }
    out.put_u16(map.len() as u16);
    for (name, value) in map {
        let name_len = u16::try_from(name.as_str().len()).map_err(|_| FrameError::TooLarge)?;
        let value_len = u32::try_from(value.len()).map_err(|_| FrameError::TooLarge)?;
        out.put_u16(name_len);
        out.put_slice(name.as_str().as_bytes());
        out.put_u32(value_len);
        out.put_slice(value.as_bytes());
    }
    Ok(())
}

fn take(buf: &mut Bytes, n: usize) -> Result<Bytes, FrameError> {
    if buf.remaining() < n {
        return Err(FrameError::Truncated);
    }
    Ok(buf.split_to(n))
}

fn u16_(buf: &mut Bytes) -> Result<u16, FrameError> {
    if buf.remaining() < 2 {
        return Err(FrameError::Truncated);
    }
    Ok(buf.get_u16())
}

fn u32_(buf: &mut Bytes) -> Result<u32, FrameError> {
    if buf.remaining() < 4 {
        return Err(FrameError::Truncated);
    }
    Ok(buf.get_u32())
}

fn get_fields(buf: &mut Bytes, count: u16) -> Result<HeaderMap, FrameError> {
    let count = count as usize;
    if count > MAX_FRAME_FIELDS {
        return Err(FrameError::TooManyFields);
    }
    // Sized from the frame's claim only up to a small bound: the claim is not trusted.
    let mut map = HeaderMap::with_capacity(count.min(16));
    for _ in 0..count {
        let len = u16_(buf)? as usize;
        let name = HeaderName::from_bytes(&take(buf, len)?).map_err(|_| FrameError::Field)?;
        let len = u32_(buf)? as usize;
        let value =
            HeaderValue::from_maybe_shared(take(buf, len)?).map_err(|_| FrameError::Field)?;
        map.try_append(name, value)
            .map_err(|_| FrameError::TooManyFields)?;
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StoredResponse {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("location", HeaderValue::from_static("/orders/7"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        StoredResponse::new(
            StatusCode::CREATED,
            headers,
            Bytes::from_static(b"\x00\x01{\"id\":7}\xff"),
        )
        .with_trailers(Some(trailers))
    }

    #[test]
    fn frames_round_trip() {
        let response = sample();
        let frame = response.encode().unwrap();
        assert_eq!(frame[0], FRAME_VERSION);
        let back = StoredResponse::decode(frame).unwrap();
        assert_eq!(back, response);
        assert_eq!(back.headers().get_all("x-multi").iter().count(), 2);
        assert_eq!(back.trailers().unwrap()["grpc-status"], "0");

        // No trailers and an empty body are kept apart from empty trailers.
        let plain = StoredResponse::new(StatusCode::NO_CONTENT, HeaderMap::new(), Bytes::new());
        let back = StoredResponse::decode(plain.encode().unwrap()).unwrap();
        assert_eq!(back, plain);
        assert!(back.trailers().is_none());
        let empty_trailers = plain.clone().with_trailers(Some(HeaderMap::new()));
        let back = StoredResponse::decode(empty_trailers.encode().unwrap()).unwrap();
        assert_eq!(back.trailers().map(HeaderMap::len), Some(0));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let cases: [(&[u8], FrameError); 7] = [
            (b"", FrameError::Empty),
            (b"\x02", FrameError::Version(2)),
            (b"\x01", FrameError::Truncated),
            (
                b"\x01\x00\x05\x00\x00\xff\xff\x00\x00\x00\x00",
                FrameError::Status(5),
            ),
            // 65,535 headers announced: refused before anything is allocated for them.
            (b"\x01\x00\xc8\xff\xfe", FrameError::TooManyFields),
            // A header name with a space in it.
            (
                b"\x01\x00\xc8\x00\x01\x00\x03a b\x00\x00\x00\x00",
                FrameError::Field,
            ),
            // A body longer than the frame.
            (
                b"\x01\x00\xc8\x00\x00\xff\xff\xff\xff\xff\xff",
                FrameError::Truncated,
            ),
        ];
        for (raw, expected) in cases {
            assert_eq!(
                StoredResponse::decode(Bytes::copy_from_slice(raw)),
                Err(expected),
                "{raw:?}"
            );
        }
        let frame = sample().encode().unwrap();
        // Every truncation of a good frame, and a byte after it, is refused.
        for cut in 0..frame.len() {
            assert!(
                StoredResponse::decode(frame.slice(..cut)).is_err(),
                "cut {cut}"
            );
        }
        let mut longer = frame.to_vec();
        longer.push(0);
        assert_eq!(
            StoredResponse::decode(Bytes::from(longer)),
            Err(FrameError::TrailingBytes(1))
        );
        // Pseudo-random bytes behind a valid version byte never panic.
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..2000 {
            let mut raw = vec![FRAME_VERSION];
            for _ in 0..(seed % 64) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                raw.push(seed as u8);
            }
            let _ = StoredResponse::decode(Bytes::from(raw));
        }
    }
}
