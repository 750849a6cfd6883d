//! Query strings and headers as JSON objects, strings coerced to what the schema expects.

use http::HeaderMap;
use serde_json::{Map, Number, Value};

/// The declared type of property `name` in an object schema (`type` of
/// `properties/{name}`), and of its items when it is an array.
fn declared<'s>(schema: &'s Value, name: &str) -> (Option<&'s str>, Option<&'s str>) {
    let prop = schema.get("properties").and_then(|p| p.get(name));
    let ty = prop.and_then(|p| p.get("type")).and_then(Value::as_str);
    let items = prop
        .and_then(|p| p.get("items"))
        .and_then(|i| i.get("type"))
        .and_then(Value::as_str);
    (ty, items)
}

/// `raw` as the JSON type `ty` when it reads as one; otherwise the string itself (and the
/// schema then reports a type error, without echoing it).
fn coerce(raw: &str, ty: Option<&str>) -> Value {
    match ty {
        Some("integer") => raw
            .parse::<i64>()
            .map(|v| Value::Number(v.into()))
            .or_else(|_| raw.parse::<u64>().map(|v| Value::Number(v.into())))
            .unwrap_or_else(|_| Value::String(raw.to_owned())),
        Some("number") => raw
            .parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(raw.to_owned())),
        Some("boolean") => match raw {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => Value::String(raw.to_owned()),
        },
        _ => Value::String(raw.to_owned()),
    }
}

fn insert(out: &mut Map<String, Value>, schema: &Value, name: &str, raw: &str) {
    let (ty, items) = declared(schema, name);
    if ty == Some("array") {
        let entry = out
            .entry(name.to_owned())
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(list) = entry {
            // `a=1&a=2` and `a=1,2` both read as [1, 2].
            for part in raw.split(',').filter(|p| !p.is_empty()) {
                list.push(coerce(part, items));
            }
        }
    } else {
        // A repeated scalar parameter is ambiguous (frameworks keep the first or the last
        // value): it reads as the list of its values, which the schema refuses as not of
        // the declared type, rather than validate one value while the handler uses another.
        let value = coerce(raw, ty);
        match out.get_mut(name) {
            None => {
                out.insert(name.to_owned(), value);
            }
            Some(Value::Array(list)) => list.push(value),
            Some(first) => {
                let first = first.take();
                out.insert(name.to_owned(), Value::Array(vec![first, value]));
            }
        }
    }
}

/// The query string as an object (`a=1&b=x`), percent-decoded, coerced by `schema`.
pub(crate) fn query_object(query: &str, schema: &Value) -> Value {
    let mut out = Map::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = decode(name);
        let value = decode(value);
        insert(&mut out, schema, &name, &value);
    }
    Value::Object(out)
}

/// The headers named in `schema`'s properties (lowercase names), coerced.
pub(crate) fn header_object(headers: &HeaderMap, schema: &Value) -> Value {
    let mut out = Map::new();
    if let Some(Value::Object(props)) = schema.get("properties") {
        for name in props.keys() {
            for value in headers.get_all(name.as_str()) {
                let text = String::from_utf8_lossy(value.as_bytes());
                insert(&mut out, schema, name, text.trim());
            }
        }
    }
    Value::Object(out)
}

/// Percent-decoding (and `+` as space, as forms send it); bad escapes are kept as written.
fn decode(s: &str) -> String {
    if !s.contains(['%', '+']) {
        return s.to_owned();
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn query_values_are_coerced_by_the_schema() {
        let schema = json!({"properties": {
            "page": {"type": "integer"}, "ratio": {"type": "number"},
            "all": {"type": "boolean"}, "ids": {"type": "array", "items": {"type": "integer"}},
            "q": {"type": "string"}
        }});
        let v = query_object(
            "page=2&ratio=0.5&all=true&ids=1&ids=2,3&q=a+b%21&page=9",
            &schema,
        );
        assert_eq!(
            v,
            json!({"page": [2, 9], "ratio": 0.5, "all": true, "ids": [1, 2, 3], "q": "a b!"}),
            "a repeated scalar reads as the list of its values (which its schema refuses)"
        );
        let v = query_object("page=two", &schema);
        assert_eq!(v, json!({"page": "two"}));
    }

    #[test]
    fn decoding_is_forgiving() {
        assert_eq!(decode("a%2"), "a%2");
        assert_eq!(decode("%zz"), "%zz");
        assert_eq!(decode("%41"), "A");
        assert_eq!(decode("x%41y"), "xAy");
    }

    #[test]
    fn headers_named_in_the_schema() {
        let schema = json!({"properties": {"x-page": {"type": "integer"}}});
        let mut headers = HeaderMap::new();
        headers.insert("x-page", "7".parse().unwrap());
        headers.insert("x-other", "1".parse().unwrap());
        assert_eq!(header_object(&headers, &schema), json!({"x-page": 7}));
    }
}
