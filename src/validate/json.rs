//! JSON parsed once, with limits that hold before anything large is built.
//!
//! A first linear pass over the bytes checks what `serde_json` would let through silently
//! or too late: nesting depth, string, array and object sizes, and numbers (an integer that
//! fits neither `i64` nor `u64`, a number that overflows to infinity or underflows to zero,
//! are refused, not rounded). The parse itself is `serde_json`'s, into a `Value`, refusing
//! duplicate object keys (a handler's own deserializer might keep the other one).

use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Limits on a JSON document.
///
/// ```
/// use battlement::validate::JsonLimits;
///
/// let limits = JsonLimits::default().max_depth(16).max_string_len(1024);
/// let err = limits.parse(br#"{"a": [[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]}"#).unwrap_err();
/// assert!(err.to_string().contains("deeper than 16"));
/// assert_eq!(limits.parse(br#"{"a": 1}"#).unwrap()["a"], 1);
/// assert!(limits.parse(br#"{"a": 1, "a": 2}"#).is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub struct JsonLimits {
    depth: usize,
    string: usize,
    array: usize,
    members: usize,
}

impl Default for JsonLimits {
    fn default() -> Self {
        Self {
            depth: 64,
            string: 64 * 1024,
            array: 10_000,
            members: 1_000,
        }
    }
}

/// Why a JSON document was refused, and where (a byte offset into the body).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what} at byte {offset}")]
pub struct JsonError {
    /// What is wrong.
    pub what: String,
    /// Where, in bytes from the start of the body.
    pub offset: usize,
}

impl JsonError {
    fn new(what: impl Into<String>, offset: usize) -> Self {
        Self {
            what: what.into(),
            offset,
        }
    }
}

impl JsonLimits {
    /// Deepest nesting of arrays and objects (default 64).
    pub fn max_depth(mut self, depth: usize) -> Self {
        self.depth = depth;
        self
    }

    /// Longest string, in bytes once decoded (UTF-8, escapes resolved; default 64 KiB).
    pub fn max_string_len(mut self, bytes: usize) -> Self {
        self.string = bytes;
        self
    }

    /// Most elements in one array (default 10,000).
    pub fn max_array_len(mut self, len: usize) -> Self {
        self.array = len;
        self
    }

    /// Most members in one object (default 1,000).
    pub fn max_members(mut self, members: usize) -> Self {
        self.members = members;
        self
    }

    /// Parses `bytes` under these limits.
    pub fn parse(&self, bytes: &[u8]) -> Result<Value, JsonError> {
        let state = State {
            limits: *self,
            depth: std::cell::Cell::new(0),
            suspicious: std::cell::Cell::new(false),
        };
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let parsed = ValueSeed(&state).deserialize(&mut de).and_then(|v| {
            de.end()?;
            Ok(v)
        });
        match parsed {
            // A number that may have been rounded (a zero, or an integral value beyond 64
            // bits): the linear scan looks at the text and decides.
            Ok(value) if state.suspicious.get() => {
                self.scan(bytes)?;
                Ok(value)
            }
            Ok(value) => Ok(value),
            // The scan gives the precise reason and offset for limits and numbers.
            Err(e) => {
                self.scan(bytes)?;
                Err(serde_error(bytes, &e))
            }
        }
    }

    /// The linear scan: depth, sizes and numbers, with byte offsets.
    fn scan(&self, bytes: &[u8]) -> Result<(), JsonError> {
        // Per open container: (is an object, separators seen, has content).
        let mut stack: Vec<(bool, usize, bool)> = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            match b {
                b'"' => {
                    let start = i;
                    i += 1;
                    // Most of a document is inside strings: jump to the next quote or
                    // backslash instead of looking at every byte.
                    loop {
                        match memchr::memchr2(b'"', b'\\', bytes.get(i..).unwrap_or(&[])) {
                            None => return Err(JsonError::new("unterminated string", start)),
                            Some(at) if bytes[i + at] == b'\\' => i += at + 2,
                            Some(at) => {
                                i += at;
                                break;
                            }
                        }
                    }
                    // The limit is on the string decoded (as the parse checks it), which
                    // is never longer than its text: decoded only when the text is over.
                    if i - start - 1 > self.string
                        && decoded_len(&bytes[start + 1..i]) > self.string
                    {
                        return Err(JsonError::new(
                            format!("a string longer than {} bytes", self.string),
                            start,
                        ));
                    }
                    if let Some(top) = stack.last_mut() {
                        top.2 = true;
                    }
                }
                b'[' | b'{' => {
                    if let Some(top) = stack.last_mut() {
                        top.2 = true;
                    }
                    if stack.len() >= self.depth {
                        return Err(JsonError::new(
                            format!("nesting deeper than {}", self.depth),
                            i,
                        ));
                    }
                    stack.push((b == b'{', 0, false));
                }
                b']' | b'}' => {
                    stack.pop();
                }
                b',' => {
                    if let Some(top) = stack.last_mut() {
                        top.1 += 1;
                        let (limit, what) = if top.0 {
                            (self.members, "an object with more than")
                        } else {
                            (self.array, "an array with more than")
                        };
                        if top.1 >= limit {
                            let unit = if top.0 { "members" } else { "elements" };
                            return Err(JsonError::new(format!("{what} {limit} {unit}"), i));
                        }
                    }
                }
                b'-' | b'0'..=b'9' => {
                    let start = i;
                    while i < bytes.len()
                        && matches!(bytes[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                    {
                        i += 1;
                    }
                    check_number(&bytes[start..i], start)?;
                    if let Some(top) = stack.last_mut() {
                        top.2 = true;
                    }
                    continue;
                }
                _ => {}
            }
            i += 1;
        }
        Ok(())
    }
}

/// Refuses an integer outside `i64`/`u64` and a number that overflows or underflows `f64`.
/// Malformed numbers are left to the parser, which reports them with their position.
fn check_number(token: &[u8], offset: usize) -> Result<(), JsonError> {
    let exponent = token.iter().any(|b| matches!(b, b'e' | b'E'));
    let integer = !exponent && !token.contains(&b'.');
    // The common cases cannot overflow or underflow: an integer of at most 18 digits, a
    // decimal without an exponent and shorter than any double's range. No parsing for them.
    if (integer && token.len() <= 18) || (!integer && !exponent && token.len() <= 300) {
        return Ok(());
    }
    let Ok(text) = std::str::from_utf8(token) else {
        return Ok(());
    };
    if integer {
        let fits = if text.starts_with('-') {
            text.parse::<i64>().is_ok()
        } else {
            text.parse::<u64>().is_ok()
        };
        // A malformed integer ("01", "-") is the parser's to report.
        let well_formed = text
            .trim_start_matches('-')
            .bytes()
            .all(|b| b.is_ascii_digit())
            && text.len() > usize::from(text.starts_with('-'));
        if !fits && well_formed {
            return Err(JsonError::new(
                "an integer that does not fit 64 bits",
                offset,
            ));
        }
        return Ok(());
    }
    let Ok(value) = text.parse::<f64>() else {
        return Ok(());
    };
    if value.is_infinite() {
        return Err(JsonError::new("a number too large for a double", offset));
    }
    if value == 0.0 {
        let mantissa = text.split(['e', 'E']).next().unwrap_or("");
        if mantissa.bytes().any(|b| matches!(b, b'1'..=b'9')) {
            return Err(JsonError::new("a number too small for a double", offset));
        }
    }
    Ok(())
}

/// A `serde_json` error as a byte offset (it reports lines and columns).
fn serde_error(bytes: &[u8], e: &serde_json::Error) -> JsonError {
    let (line, column) = (e.line(), e.column());
    let mut offset = 0;
    let mut current = 1;
    for (i, b) in bytes.iter().enumerate() {
        if current == line {
            offset = i;
            break;
        }
        if *b == b'\n' {
            current += 1;
            offset = i + 1;
        }
    }
    let offset = (offset + column.saturating_sub(1)).min(bytes.len());
    let what = match e.classify() {
        serde_json::error::Category::Eof => "unexpected end of input".to_owned(),
        _ => {
            // serde_json's message names the position itself; keep the reason only.
            let text = e.to_string();
            match text.rfind(" at line ") {
                Some(cut) => text[..cut].to_owned(),
                None => text,
            }
        }
    };
    JsonError::new(what, offset)
}

/// What the parse tracks: the limits, the current depth, and whether a number was seen that
/// `serde_json` may have rounded.
struct State {
    limits: JsonLimits,
    depth: std::cell::Cell<usize>,
    suspicious: std::cell::Cell<bool>,
}

/// Builds a `Value` under the limits, refusing duplicate keys.
struct ValueSeed<'s>(&'s State);

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(ValueVisitor(self.0))
    }
}

struct ValueVisitor<'s>(&'s State);

impl ValueVisitor<'_> {
    fn enter<E: de::Error>(&self) -> Result<(), E> {
        let depth = self.0.depth.get() + 1;
        if depth > self.0.limits.depth {
            return Err(E::custom(format_args!(
                "nesting deeper than {}",
                self.0.limits.depth
            )));
        }
        self.0.depth.set(depth);
        Ok(())
    }

    fn leave(&self) {
        self.0.depth.set(self.0.depth.get() - 1);
    }

    fn string<E: de::Error>(&self, v: &str) -> Result<(), E> {
        if v.len() > self.0.limits.string {
            return Err(E::custom(format_args!(
                "a string longer than {} bytes",
                self.0.limits.string
            )));
        }
        Ok(())
    }
}

impl<'de> Visitor<'de> for ValueVisitor<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        // serde_json reads an integer beyond 64 bits as a float, and a number below the
        // smallest double as zero: both look like ordinary floats here.
        if v == 0.0 || v.abs() >= 9.223_372_036_854_775e18 {
            self.0.suspicious.set(true);
        }
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("a number that is not finite"))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        self.string(v)?;
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        self.string(&v)?;
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.enter()?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(ValueSeed(self.0))? {
            if items.len() >= self.0.limits.array {
                return Err(de::Error::custom(format_args!(
                    "an array with more than {} elements",
                    self.0.limits.array
                )));
            }
            items.push(item);
        }
        self.leave();
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.enter()?;
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            self.string(&key)?;
            if out.len() >= self.0.limits.members {
                return Err(de::Error::custom(format_args!(
                    "an object with more than {} members",
                    self.0.limits.members
                )));
            }
            let value = map.next_value_seed(ValueSeed(self.0))?;
            if out.insert(key, value).is_some() {
                return Err(de::Error::custom("a duplicate object key"));
            }
        }
        self.leave();
        Ok(Value::Object(out))
    }
}

/// The length in UTF-8 bytes of the JSON string whose text (between the quotes) is `raw`,
/// escapes resolved (`\u00e9` is 2 bytes, a surrogate pair 4, `\n` 1).
fn decoded_len(raw: &[u8]) -> usize {
    let hex = |at: usize| -> Option<u32> {
        let digits = raw.get(at..at + 4)?;
        u32::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
    };
    let mut len = 0;
    let mut i = 0;
    while i < raw.len() {
        if raw[i] != b'\\' {
            len += 1;
            i += 1;
            continue;
        }
        if raw.get(i + 1) != Some(&b'u') {
            len += 1;
            i += 2;
            continue;
        }
        match hex(i + 2) {
            Some(0xD800..=0xDBFF)
                if raw.get(i + 6..i + 8) == Some(b"\\u")
                    && hex(i + 8).is_some_and(|low| (0xDC00..=0xDFFF).contains(&low)) =>
            {
                len += 4;
                i += 12;
            }
            Some(cp) => {
                len += match cp {
                    0..=0x7F => 1,
                    0x80..=0x7FF => 2,
                    _ => 3,
                };
                i += 6;
            }
            None => {
                len += 1;
                i += 2;
            }
        }
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &[u8]) -> Result<Value, JsonError> {
        JsonLimits::default().parse(s)
    }

    #[test]
    fn a_depth_bomb_is_refused_fast_without_recursion() {
        let bomb = "[".repeat(100_000);
        let err = parse(bomb.as_bytes()).unwrap_err();
        assert_eq!(err.offset, 64);
        assert!(err.what.contains("deeper than 64"));
        let ok = format!("{}{}", "[".repeat(64), "]".repeat(64));
        assert!(parse(ok.as_bytes()).is_ok());
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let err = parse(br#"{"a": 1, "b": {"c": 1, "c": 2}}"#).unwrap_err();
        assert!(err.what.contains("duplicate"), "{err}");
        assert!(parse(br#"{"a": {"c": 1}, "b": {"c": 2}}"#).is_ok());
    }

    #[test]
    fn numbers_are_never_rounded_silently() {
        assert!(parse(b"9223372036854775807").is_ok());
        assert!(parse(b"-9223372036854775808").is_ok());
        assert!(parse(b"18446744073709551615").is_ok());
        for bad in [
            &b"18446744073709551616"[..],
            b"-9223372036854775809",
            b"[1, 123456789012345678901234567890]",
            b"1e400",
            b"-1e400",
            b"1e-400",
            b"{\"x\": 2.5e-330}",
        ] {
            let err = parse(bad).unwrap_err();
            assert!(
                err.what.contains("number") || err.what.contains("integer"),
                "{err}"
            );
        }
        assert!(parse(b"0.0").is_ok());
        assert!(parse(b"0e10").is_ok());
        assert!(parse(b"1.5e300").is_ok());
    }

    #[test]
    fn sizes_are_bounded() {
        let limits = JsonLimits::default()
            .max_string_len(8)
            .max_array_len(3)
            .max_members(2);
        assert!(limits.parse(br#""12345678""#).is_ok());
        assert!(limits.parse(br#""123456789""#).is_err());
        assert!(limits.parse(b"[1,2,3]").is_ok());
        assert!(limits.parse(b"[1,2,3,4]").is_err());
        assert!(limits.parse(br#"{"a":1,"b":2}"#).is_ok());
        assert!(limits.parse(br#"{"a":1,"b":2,"c":3}"#).is_err());
        // The limit is on decoded bytes, whether or not the scan runs (a zero float makes
        // it run): 8 escaped letters are 8 bytes; 9 are too many.
        let escaped8 = br#"["\u0041\u0041\u0041\u0041\u0041\u0041\u0041\u0041""#;
        for tail in [&b"]"[..], b", 0.0]"] {
            let doc = [&escaped8[..], tail].concat();
            assert!(
                limits.parse(&doc).is_ok(),
                "{}",
                String::from_utf8_lossy(&doc)
            );
        }
        assert!(
            limits
                .parse(br#"["\u00e9\u00e9\u00e9\u00e9\u00e9", 0.0]"#)
                .is_err()
        );
        assert!(
            limits
                .parse(br#"["\ud83d\ude00\ud83d\ude00", 0.0]"#)
                .is_ok()
        );
        assert_eq!(
            super::decoded_len(br#"a\n\u00e9\ud83d\ude00"#),
            1 + 1 + 2 + 4
        );
        // Commas inside strings are not separators.
        assert!(limits.parse(br#"["a,b,c,d"]"#).is_ok());
        assert!(limits.parse(br#"["a\",b,c"]"#).is_ok());
    }

    #[test]
    fn malformed_json_reports_the_offset() {
        let err = parse(b"{\"a\": 1,\n \"b\": ]}").unwrap_err();
        // The `]` where a value should be.
        assert_eq!(err.offset, 15, "{err}");
        let err = parse(b"{\"a\": 1").unwrap_err();
        assert!(err.what.contains("end of input"), "{err}");
        assert!(parse(b"{} x").is_err());
        assert!(parse(b"").is_err());
    }

    #[test]
    fn invalid_utf8_is_refused() {
        assert!(parse(b"\"\xff\xfe\"").is_err());
        assert!(parse("\"é\"".as_bytes()).is_ok());
    }
}
