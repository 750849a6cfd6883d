//! JSON Schema: compiled once, linted for what can be abused, errors without values.

use jsonschema::error::ValidationErrorKind;
use jsonschema::{PatternOptions, Validator};
use serde::Serialize;
use serde_json::{Map, Value};

use super::ConfigError;

/// One violation, as it appears in the `errors` member of a `422` problem.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// JSON pointer to the offending value, in wire names (`/items/0/quantity`), prefixed
    /// with `/query` or `/header` for those parts of the request.
    pub pointer: String,
    /// The JSON Schema keyword that failed (`maximum`, `required`, ...).
    pub keyword: String,
    /// What is wrong, without the offending value.
    pub detail: String,
}

/// A compiled schema.
pub(crate) struct Schema {
    validator: Validator,
}

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Schema").finish_non_exhaustive()
    }
}

impl Schema {
    /// Lints `schema`, then compiles it: patterns with the linear-time `regex` engine unless
    /// backtracking is allowed (then `fancy-regex` with a backtracking limit).
    pub(crate) fn compile(schema: &Value, allow_backtracking: bool) -> Result<Self, ConfigError> {
        lint(schema, "")?;
        let options = jsonschema::options();
        let options = if allow_backtracking {
            options.with_pattern_options(PatternOptions::fancy_regex().backtrack_limit(10_000))
        } else {
            options.with_pattern_options(PatternOptions::regex())
        };
        let validator = options.build(schema).map_err(|e| {
            let text = e.to_string();
            if matches!(e.kind(), ValidationErrorKind::Pattern { .. })
                || text.contains("regex")
                || text.contains("pattern")
            {
                ConfigError::Backtracking(text)
            } else {
                ConfigError::Schema(text)
            }
        })?;
        Ok(Self { validator })
    }

    pub(crate) fn is_valid(&self, value: &Value) -> bool {
        self.validator.is_valid(value)
    }

    /// Up to `cap` violations of `value`, pointers prefixed with `prefix`.
    pub(crate) fn violations(
        &self,
        value: &Value,
        prefix: &str,
        cap: usize,
    ) -> (Vec<Violation>, usize) {
        let mut out = Vec::new();
        let mut total = 0;
        for error in self.validator.iter_errors(value) {
            let kind = error.kind();
            let base = format!("{prefix}{}", error.instance_path().as_str());
            // One error names every unexpected property: one violation each, so that
            // `errors[]` points at all of them and the total counts them.
            // The pointer of a violation about property `name` of the instance, if any.
            let violation = |name: Option<&str>| {
                let mut pointer = base.clone();
                if let Some(name) = name {
                    pointer.push('/');
                    pointer.push_str(&name.replace('~', "~0").replace('/', "~1"));
                }
                Violation {
                    pointer: truncate(pointer, 256),
                    keyword: kind.keyword().to_owned(),
                    detail: detail(kind),
                }
            };
            let names: Vec<Option<&str>> = match kind {
                ValidationErrorKind::AdditionalProperties { unexpected }
                    if !unexpected.is_empty() =>
                {
                    unexpected.iter().map(|n| Some(n.as_str())).collect()
                }
                ValidationErrorKind::Required { property } => vec![property.as_str()],
                _ => vec![None],
            };
            for name in names {
                total += 1;
                if out.len() < cap {
                    out.push(violation(name));
                }
            }
        }
        (out, total)
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// What is wrong, from the schema's side only: the limit, never the offending value.
fn detail(kind: &ValidationErrorKind) -> String {
    use ValidationErrorKind as K;
    match kind {
        K::AdditionalProperties { .. } => "is not an allowed property".into(),
        K::AdditionalItems { limit } => format!("must have at most {limit} items"),
        K::Required { .. } => "is required".into(),
        K::Type { kind } => format!("must be of type {}", type_names(kind)),
        K::Maximum { limit } => format!("must be at most {limit}"),
        K::Minimum { limit } => format!("must be at least {limit}"),
        K::ExclusiveMaximum { limit } => format!("must be less than {limit}"),
        K::ExclusiveMinimum { limit } => format!("must be greater than {limit}"),
        K::MaxLength { limit } => format!("must be at most {limit} characters long"),
        K::MinLength { limit } => format!("must be at least {limit} characters long"),
        K::MaxItems { limit } => format!("must have at most {limit} items"),
        K::MinItems { limit } => format!("must have at least {limit} items"),
        K::MaxProperties { limit } => format!("must have at most {limit} properties"),
        K::MinProperties { limit } => format!("must have at least {limit} properties"),
        K::Pattern { .. } => "does not match the required pattern".into(),
        K::Format { format } => format!("must be a valid {format}"),
        K::Enum { .. } => "must be one of the allowed values".into(),
        K::Constant { .. } => "must be the required constant".into(),
        K::UniqueItems => "must not contain duplicate items".into(),
        K::MultipleOf { .. } => "must be a multiple of the required number".into(),
        K::BacktrackLimitExceeded { .. } => "took too long to match its pattern".into(),
        other => format!("fails the {} constraint", other.keyword()),
    }
}

fn type_names(kind: &jsonschema::error::TypeKind) -> String {
    match kind {
        jsonschema::error::TypeKind::Single(t) => t.to_string(),
        jsonschema::error::TypeKind::Multiple(set) => {
            let names: Vec<String> = set.iter().map(|t| t.to_string()).collect();
            names.join(" or ")
        }
    }
}

/// Refuses what can be abused at request time: `pattern` or `format` on a string without
/// `maxLength`, and `uniqueItems` without `maxItems` (quadratic in the array's length).
fn lint(schema: &Value, at: &str) -> Result<(), ConfigError> {
    match schema {
        Value::Object(map) => {
            lint_object(map, at)?;
            for (key, value) in map {
                // `properties`, `$defs` and friends map names to schemas; `enum`, `const`
                // and `examples` hold data, not schemas.
                if matches!(key.as_str(), "enum" | "const" | "examples" | "default") {
                    continue;
                }
                lint(value, &format!("{at}/{key}"))?;
            }
            Ok(())
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                lint(item, &format!("{at}/{i}"))?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn lint_object(map: &Map<String, Value>, at: &str) -> Result<(), ConfigError> {
    let has = |k: &str| map.contains_key(k);
    if (map.get("pattern").is_some_and(Value::is_string)
        || map.get("format").is_some_and(Value::is_string))
        && !has("maxLength")
    {
        return Err(ConfigError::Lint(format!(
            "{at}: `pattern` or `format` needs a `maxLength` (matching an unbounded string costs unbounded time)"
        )));
    }
    if map.get("uniqueItems") == Some(&Value::Bool(true)) && !has("maxItems") {
        return Err(ConfigError::Lint(format!(
            "{at}: `uniqueItems` needs a `maxItems` (checking it is quadratic in the array's length)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_backtracking_pattern_is_refused_unless_allowed() {
        let schema = json!({"type": "string", "maxLength": 100, "pattern": "^(a)\\1$"});
        assert!(matches!(
            Schema::compile(&schema, false),
            Err(ConfigError::Backtracking(_))
        ));
        assert!(Schema::compile(&schema, true).is_ok());
        let linear = json!({"type": "string", "maxLength": 100, "pattern": "^[a-z]+$"});
        assert!(Schema::compile(&linear, false).is_ok());
    }

    #[test]
    fn the_lint_wants_bounds() {
        let unbounded = json!({"properties": {"name": {"type": "string", "pattern": "^a"}}});
        assert!(matches!(
            Schema::compile(&unbounded, false),
            Err(ConfigError::Lint(m)) if m.contains("/properties/name")
        ));
        let email = json!({"type": "string", "format": "email"});
        assert!(Schema::compile(&email, false).is_err());
        let unique = json!({"type": "array", "uniqueItems": true});
        assert!(Schema::compile(&unique, false).is_err());
        let ok = json!({"type": "array", "uniqueItems": true, "maxItems": 10});
        assert!(Schema::compile(&ok, false).is_ok());
        // Data inside `enum` is not a schema.
        let data = json!({"enum": [{"pattern": "x"}]});
        assert!(Schema::compile(&data, false).is_ok());
    }

    #[test]
    fn violations_name_pointers_and_never_values() {
        let schema = json!({
            "type": "object",
            "properties": {
                "quantity": {"type": "integer", "minimum": 1, "maximum": 100},
                "note": {"type": "string", "maxLength": 5}
            },
            "required": ["product_id"],
            "additionalProperties": false
        });
        let schema = Schema::compile(&schema, false).unwrap();
        let value = json!({"quantity": 1234567, "note": "SECRET-VALUE", "extra": true});
        let (violations, total) = schema.violations(&value, "", 20);
        assert_eq!(total, 4);
        let pointers: Vec<&str> = violations.iter().map(|v| v.pointer.as_str()).collect();
        for p in ["/quantity", "/note", "/product_id", "/extra"] {
            assert!(pointers.contains(&p), "{pointers:?}");
        }
        let text = serde_json::to_string(&violations).unwrap();
        assert!(
            !text.contains("1234567") && !text.contains("SECRET"),
            "{text}"
        );
        let (capped, total) = schema.violations(&value, "/body", 2);
        assert_eq!((capped.len(), total), (2, 4));
        assert!(capped[0].pointer.starts_with("/body"));
    }
}
