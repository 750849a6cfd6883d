//! Cache keys: built unambiguously (every part length-prefixed), never shown to clients.
//!
//! The primary key is the method (`HEAD` is looked up as `GET`), the host when the layer
//! has a host allowlist, the path, the query normalized (parameters sorted, optionally
//! filtered by an allowlist), and the principal's subject for routes cached per principal.
//! A response with `Vary` is stored under a variant key: the primary key plus the values
//! of the varying request headers.

use http::{HeaderMap, HeaderName, Method, Uri};

/// How requests map to keys.
#[derive(Clone, Debug, Default)]
pub(crate) struct KeyRules {
    /// Hosts whose requests are cached (lowercase, without port). `None`: the host is not
    /// part of the key (one site per layer).
    pub(crate) hosts: Option<Vec<String>>,
    /// Query parameters that are part of the key; `None`: all of them.
    pub(crate) query_allow: Option<Vec<String>>,
}

/// A cache key: the canonical bytes themselves (so two requests share an entry only if
/// their keys are equal byte for byte; no hash collisions to exploit).
pub(crate) type Key = Box<[u8]>;

fn push(out: &mut Vec<u8>, part: &[u8]) {
    out.extend_from_slice(&(part.len() as u32).to_be_bytes());
    out.extend_from_slice(part);
}

/// The host of a request, lowercase and without port: `Host` header first, then the URI's
/// authority (HTTP/2).
fn host<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Option<String> {
    let raw = headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()))?;
    let without_port = if raw.starts_with('[') {
        // An IPv6 literal: `[::1]` or `[::1]:8080`.
        raw.split_once(']')
            .map_or(raw, |(h, _)| &raw[..h.len() + 1])
    } else {
        match raw.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => raw,
        }
    };
    Some(without_port.to_ascii_lowercase())
}

/// The primary key of a request, or `None` when its host is not on the allowlist (the
/// layer then stands aside).
pub(crate) fn primary(
    rules: &KeyRules,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    principal: Option<&str>,
) -> Option<Key> {
    let mut out = Vec::with_capacity(64 + uri.path().len() + uri.query().map_or(0, str::len));
    primary_into(rules, method, uri, headers, principal, &mut out)?;
    Some(out.into_boxed_slice())
}

/// [`primary`], written into `out` (cleared first) instead of a new allocation.
pub(crate) fn primary_into(
    rules: &KeyRules,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    principal: Option<&str>,
    out: &mut Vec<u8>,
) -> Option<()> {
    out.clear();
    let method = if *method == Method::HEAD {
        Method::GET
    } else {
        method.clone()
    };
    push(out, method.as_str().as_bytes());
    match &rules.hosts {
        Some(allowed) => {
            let host = host(uri, headers)?;
            if !allowed.contains(&host) {
                return None;
            }
            push(out, host.as_bytes());
        }
        None => push(out, b""),
    }
    push(out, uri.path().as_bytes());
    let mut params: Vec<(&str, &str)> = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .filter(|(name, _)| {
            rules
                .query_allow
                .as_ref()
                .is_none_or(|allow| allow.iter().any(|a| a == name))
        })
        .collect();
    params.sort_unstable();
    push(out, &(params.len() as u32).to_be_bytes());
    for (name, value) in params {
        push(out, name.as_bytes());
        push(out, value.as_bytes());
    }
    match principal {
        Some(subject) => {
            push(out, b"principal");
            push(out, subject.as_bytes());
        }
        None => push(out, b"shared"),
    }
    Some(())
}

/// The variant key of `primary` for a response that varies on `vary` (lowercase names),
/// in the variant list's `generation` (a purge of the URL drops the list, and the next one
/// starts a new generation, so variants stored before the purge are never reached again).
pub(crate) fn variant(
    primary: &[u8],
    vary: &[HeaderName],
    generation: u64,
    headers: &HeaderMap,
) -> Key {
    let mut out = Vec::with_capacity(primary.len() + 8 + 32 * vary.len());
    push(&mut out, primary);
    push(&mut out, &generation.to_be_bytes());
    for name in vary {
        push(&mut out, name.as_str().as_bytes());
        let values: Vec<&[u8]> = headers.get_all(name).iter().map(|v| v.as_bytes()).collect();
        push(&mut out, &(values.len() as u32).to_be_bytes());
        for value in values {
            push(&mut out, value);
        }
    }
    out.into_boxed_slice()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(rules: &KeyRules, uri: &str, headers: &[(&str, &str)]) -> Option<Key> {
        let uri: Uri = uri.parse().unwrap();
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        primary(rules, &Method::GET, &uri, &map, None)
    }

    #[test]
    fn the_query_is_normalized() {
        let rules = KeyRules::default();
        assert_eq!(
            key(&rules, "/p?b=2&a=1", &[]),
            key(&rules, "/p?a=1&b=2", &[])
        );
        assert_ne!(key(&rules, "/p?a=1", &[]), key(&rules, "/p?a=2", &[]));
        let only_page = KeyRules {
            query_allow: Some(vec!["page".into()]),
            ..KeyRules::default()
        };
        assert_eq!(
            key(&only_page, "/p?page=1&utm_source=x", &[]),
            key(&only_page, "/p?page=1", &[])
        );
    }

    #[test]
    fn parts_cannot_run_into_each_other() {
        let rules = KeyRules::default();
        // Without length prefixes these would collide.
        assert_ne!(key(&rules, "/a?b=c", &[]), key(&rules, "/a?b=&c", &[]));
        assert_ne!(key(&rules, "/ab?c=d", &[]), key(&rules, "/a?bc=d", &[]));
    }

    #[test]
    fn head_shares_the_get_entry_and_other_methods_do_not() {
        let rules = KeyRules::default();
        let uri: Uri = "/p".parse().unwrap();
        let h = HeaderMap::new();
        assert_eq!(
            primary(&rules, &Method::HEAD, &uri, &h, None),
            primary(&rules, &Method::GET, &uri, &h, None)
        );
        assert_ne!(
            primary(&rules, &Method::POST, &uri, &h, None),
            primary(&rules, &Method::GET, &uri, &h, None)
        );
    }

    #[test]
    fn hosts_come_from_an_allowlist() {
        let rules = KeyRules {
            hosts: Some(vec!["shop.example".into()]),
            ..KeyRules::default()
        };
        assert!(key(&rules, "/p", &[("host", "shop.example:8080")]).is_some());
        assert!(key(&rules, "/p", &[("host", "SHOP.example")]).is_some());
        assert!(key(&rules, "/p", &[("host", "evil.example")]).is_none());
        assert!(key(&rules, "/p", &[]).is_none());
        let v6 = KeyRules {
            hosts: Some(vec!["[::1]".into()]),
            ..KeyRules::default()
        };
        assert!(key(&v6, "/p", &[("host", "[::1]:3000")]).is_some());
        // Without an allowlist, a forged Host cannot split or poison the entry.
        let any = KeyRules::default();
        assert_eq!(
            key(&any, "/p", &[("host", "evil.example")]),
            key(&any, "/p", &[("host", "shop.example")])
        );
    }

    #[test]
    fn principals_and_variants_get_their_own_keys() {
        let rules = KeyRules::default();
        let uri: Uri = "/me".parse().unwrap();
        let h = HeaderMap::new();
        let alice = primary(&rules, &Method::GET, &uri, &h, Some("alice")).unwrap();
        let bob = primary(&rules, &Method::GET, &uri, &h, Some("bob")).unwrap();
        let shared = primary(&rules, &Method::GET, &uri, &h, None).unwrap();
        assert!(alice != bob && alice != shared);

        let vary = [HeaderName::from_static("accept-language")];
        let mut fr = HeaderMap::new();
        fr.insert("accept-language", "fr".parse().unwrap());
        let mut de = HeaderMap::new();
        de.insert("accept-language", "de".parse().unwrap());
        let mut other = de.clone();
        other.insert("x-unrelated", "1".parse().unwrap());
        assert_ne!(
            variant(&shared, &vary, 1, &fr),
            variant(&shared, &vary, 1, &de)
        );
        // A header outside the key changes nothing.
        assert_eq!(
            variant(&shared, &vary, 1, &de),
            variant(&shared, &vary, 1, &other)
        );
        // Another generation of the variant list, another key.
        assert_ne!(
            variant(&shared, &vary, 1, &de),
            variant(&shared, &vary, 2, &de)
        );
    }
}
