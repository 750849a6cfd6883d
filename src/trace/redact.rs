//! What may appear in a log line, and in what form.
//!
//! Everything a client sent is attacker-controlled text. Before it is recorded it is cut to
//! a bounded length and every control character (CR, LF, ESC, ...), Unicode line separator
//! and bidirectional override is written as a `\u{..}` escape, so a log line stays one line
//! and reads as what it is whatever formatter the subscriber uses.

use std::borrow::Cow;

use http::HeaderValue;
use http::header::{AUTHORIZATION, COOKIE, HeaderName, PROXY_AUTHORIZATION, SET_COOKIE};

/// Headers whose values never reach a log line, whatever the allowlist says.
pub(crate) const SECRET_HEADERS: [HeaderName; 4] =
    [AUTHORIZATION, PROXY_AUTHORIZATION, COOKIE, SET_COOKIE];

/// How the query string is logged (field `url.query`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueryLog {
    /// No `url.query` field at all.
    Omit,
    /// Parameter names with every value replaced by `[redacted]` (the default): which
    /// parameters were sent is often useful, their values often secret (tokens, e-mail
    /// addresses).
    #[default]
    Redacted,
    /// Like [`QueryLog::Redacted`], except the values of the named parameters, which are
    /// logged as sent.
    AllowValues(Vec<String>),
}

/// Marker written in place of a redacted value.
pub(crate) const REDACTED: &str = "[redacted]";

/// Longest query string logged, after redaction.
const MAX_QUERY: usize = 512;

pub(crate) use crate::annotate::escape;

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `s` cut to `max` bytes, then escaped.
pub(crate) fn clean(s: &str, max: usize) -> Cow<'_, str> {
    escape(truncate(s, max))
}

/// A header value as loggable text: cut to `max` bytes, non-UTF-8 bytes replaced, escaped.
pub(crate) fn header_text(value: &HeaderValue, max: usize) -> String {
    let bytes = &value.as_bytes()[..value.as_bytes().len().min(max)];
    let text = String::from_utf8_lossy(bytes);
    escape(&text).into_owned()
}

/// The query string as `QueryLog` says it may be logged, or `None` for no field.
pub(crate) fn query(query: &str, how: &QueryLog) -> Option<String> {
    let allow: &[String] = match how {
        QueryLog::Omit => return None,
        QueryLog::Redacted => &[],
        QueryLog::AllowValues(names) => names,
    };
    let mut out = String::with_capacity(query.len().min(MAX_QUERY));
    for (i, pair) in query.split('&').filter(|p| !p.is_empty()).enumerate() {
        let (name, value) = match pair.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (pair, None),
        };
        if i > 0 {
            out.push('&');
        }
        // A bare item or a name that does not look like a parameter name (`?<token>`,
        // `?<base64>==`) may be the secret itself: redacted whole.
        if !name_like(name) || value.is_some_and(|v| v.starts_with('=')) {
            out.push_str(REDACTED);
            if value.is_some() {
                out.push('=');
                out.push_str(REDACTED);
            }
        } else {
            out.push_str(&escape(name));
            if let Some(value) = value {
                out.push('=');
                if allow.iter().any(|a| a == name) {
                    out.push_str(&escape(value));
                } else {
                    out.push_str(REDACTED);
                }
            }
        }
        if out.len() > MAX_QUERY {
            let cut = truncate(&out, MAX_QUERY).len();
            out.truncate(cut);
            out.push_str("...");
            break;
        }
    }
    Some(out)
}

/// Whether a query parameter name reads as one: at most 24 bytes of letters, digits and
/// `_ - . [ ] %` (percent-encoded brackets included). Tokens and signatures put where a
/// name goes are longer, or carry other characters (a pair that starts its value with `=`
/// is base64 padding, and is redacted too).
fn name_like(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 24
        && name.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'[' | b']' | b'%')
        })
}

/// Whether `name` may never be logged.
pub(crate) fn is_secret(name: &HeaderName) -> bool {
    SECRET_HEADERS.contains(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape("plain text"), "plain text");
        assert!(matches!(escape("plain"), Cow::Borrowed(_)));
        assert_eq!(escape("a\r\nlevel=error"), "a\\u{d}\\u{a}level=error");
        assert_eq!(escape("\u{1b}[31mred"), "\\u{1b}[31mred");
        assert_eq!(escape("x\u{2028}y\u{202e}z"), "x\\u{2028}y\\u{202e}z");
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }

    #[test]
    fn query_values_are_redacted_by_default() {
        let q = query("token=s3cret&page=2&flag", &QueryLog::Redacted).unwrap();
        assert_eq!(q, "token=[redacted]&page=[redacted]&flag");
        // A secret where a name goes: a bare token, base64 with its padding, a signature.
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJl";
        let q = query(
            &format!("{jwt}&dGhpcyBpcyBhIHNlY3JldCB0b2tlbg==&ok"),
            &QueryLog::Redacted,
        )
        .unwrap();
        assert_eq!(q, "[redacted]&[redacted]=[redacted]&ok");
        let q = query("filter%5Bstatus%5D=open&a+b=1", &QueryLog::Redacted).unwrap();
        assert_eq!(q, "filter%5Bstatus%5D=[redacted]&[redacted]=[redacted]");
        assert!(query("a=1", &QueryLog::Omit).is_none());
        let allowed = QueryLog::AllowValues(vec!["page".into()]);
        assert_eq!(
            query("token=s3cret&page=2", &allowed).unwrap(),
            "token=[redacted]&page=2"
        );
    }

    #[test]
    fn long_queries_are_cut() {
        let long = "k=v&".repeat(1000);
        let q = query(&long, &QueryLog::Redacted).unwrap();
        assert!(q.len() <= MAX_QUERY + 3, "{}", q.len());
        assert!(q.ends_with("..."));
    }

    #[test]
    fn header_values_are_cleaned() {
        let v = HeaderValue::from_bytes(b"agent\t/1 \xff").unwrap();
        assert_eq!(header_text(&v, 100), "agent\\u{9}/1 \u{fffd}");
        assert!(is_secret(&AUTHORIZATION) && is_secret(&SET_COOKIE));
        assert!(!is_secret(&http::header::USER_AGENT));
    }
}
