//! Rules from TOML: parsing, then validation of every endpoint and field.

use std::collections::BTreeMap;
use std::path::Path;

use ratelimit_domain::{ParseScopeError, RateLimitRule, RateLimitScope, RuleError, RuleSet};
use serde::Deserialize;

use crate::error::{ConfigError, RuleField};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    rules: BTreeMap<String, RawRule>,
}

/// A rule as written, before validation. Integers are signed so that a negative number is
/// reported as such rather than as a type error.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    max_tokens: i64,
    refill_rate: f64,
    scope: String,
    cost: Option<i64>,
    enabled: Option<bool>,
}

/// Reads and validates a rules file (the format is in the [crate docs](crate)).
///
/// # Errors
/// [`ConfigError::Read`] when the file cannot be read; otherwise as [`parse_rules`], with the
/// file set.
pub fn load_rules_file(path: impl AsRef<Path>) -> Result<RuleSet, ConfigError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        file: path.to_owned(),
        error,
    })?;
    parse_rules(&text).map_err(|err| err.in_file(path))
}

/// Parses and validates rules written in TOML: one `[rules."METHOD /path"]` table per rule
/// (an upper-case method token, exactly one space, a path starting with `/`) with
/// `max_tokens`, `refill_rate` (tokens per minute), `scope` (`ip`, `user`, `user_provider` or
/// `global`), and optionally `cost` (default 1) and `enabled` (default true); unknown fields are
/// errors.
///
/// # Errors
/// [`ConfigError::Syntax`] for text that is not a rules file (bad TOML, an unknown or missing
/// field, a value of the wrong type); [`ConfigError::Rule`] naming the rule and the field for
/// an invalid endpoint or value. The error has no file.
pub fn parse_rules(text: &str) -> Result<RuleSet, ConfigError> {
    let file: RulesFile = toml::from_str(text).map_err(|err| ConfigError::Syntax {
        file: None,
        reason: err.message().trim().to_owned(),
    })?;
    let mut rules = RuleSet::new();
    for (endpoint, raw) in file.rules {
        check_endpoint(&endpoint)?;
        let rule = build(&endpoint, &raw)?;
        rules
            .insert(endpoint.clone(), rule)
            .map_err(|err| problem(&endpoint, RuleField::Endpoint, err.message()))?;
    }
    Ok(rules)
}

/// Checks that `endpoint` is one the HTTP layer can produce: `METHOD /path`, an upper-case
/// method token (RFC 9110 `tchar`s, no lower-case letters), exactly one space, and a path
/// that starts with `/` and holds no whitespace; no control characters, no surrounding space.
fn check_endpoint(endpoint: &str) -> Result<(), ConfigError> {
    let fail = |reason: String| Err(problem(endpoint, RuleField::Endpoint, &reason));
    const SHAPE: &str = "an endpoint is `METHOD /path`, e.g. \"POST /api/v1/sessions\"";
    if endpoint.is_empty() {
        return fail(format!("is empty; {SHAPE}"));
    }
    if endpoint.chars().any(char::is_control) {
        return fail(format!("holds a control character; {SHAPE}"));
    }
    if endpoint.trim() != endpoint {
        return fail(format!(
            "has leading or trailing whitespace, which no request's endpoint has; {SHAPE}"
        ));
    }
    let Some((method, path)) = endpoint.split_once(' ') else {
        return fail(format!("has no space between method and path; {SHAPE}"));
    };
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return fail(format!(
            "the method {method:?} is not an HTTP method token; {SHAPE}"
        ));
    }
    if method.bytes().any(|b| b.is_ascii_lowercase()) {
        return fail(format!(
            "the method {method:?} must be upper-case (methods are case-sensitive: {:?}, \
             not {method:?})",
            method.to_ascii_uppercase()
        ));
    }
    if path.chars().any(char::is_whitespace) {
        return fail(format!(
            "exactly one space separates method and path, and a path holds no whitespace; \
             {SHAPE}"
        ));
    }
    if !path.starts_with('/') {
        return fail(format!("the path must start with /, got {path:?}; {SHAPE}"));
    }
    Ok(())
}

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn build(endpoint: &str, raw: &RawRule) -> Result<RateLimitRule, ConfigError> {
    let scope: RateLimitScope = raw
        .scope
        .parse()
        .map_err(|err: ParseScopeError| problem(endpoint, RuleField::Scope, &err.to_string()))?;
    let max_tokens = positive(endpoint, RuleField::MaxTokens, raw.max_tokens)?;
    let mut rule = RateLimitRule::new(scope, max_tokens, raw.refill_rate)
        .map_err(|err| rule_problem(endpoint, &err))?;
    if let Some(cost) = raw.cost {
        let cost = positive(endpoint, RuleField::Cost, cost)?;
        rule = rule
            .with_cost(cost)
            .map_err(|err| rule_problem(endpoint, &err))?;
    }
    Ok(rule.with_enabled(raw.enabled.unwrap_or(true)))
}

fn positive(endpoint: &str, field: RuleField, value: i64) -> Result<u64, ConfigError> {
    u64::try_from(value)
        .ok()
        .filter(|&v| v > 0)
        .ok_or_else(|| problem(endpoint, field, &format!("must be at least 1, got {value}")))
}

fn rule_problem(endpoint: &str, err: &RuleError) -> ConfigError {
    let field = match err {
        RuleError::ZeroMaxTokens | RuleError::MaxTokensTooLarge { .. } => RuleField::MaxTokens,
        RuleError::ZeroCost | RuleError::CostExceedsCapacity { .. } => RuleField::Cost,
        _ => RuleField::RefillRate,
    };
    problem(endpoint, field, &err.to_string())
}

fn problem(endpoint: &str, field: RuleField, reason: &str) -> ConfigError {
    ConfigError::Rule {
        file: None,
        rule: endpoint.to_owned(),
        field,
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [rules."POST /api/v1/sessions"]
        max_tokens = 5
        refill_rate = 5.0
        scope = "ip"

        [rules."POST /api/v1/exports"]
        max_tokens = 10
        refill_rate = 2      # an integer rate is fine
        scope = "user"
        cost = 4
        enabled = false
    "#;

    #[test]
    fn reads_rules_with_defaults() {
        let rules = parse_rules(GOOD).unwrap();
        assert_eq!(rules.len(), 2);
        let login = rules.get("POST /api/v1/sessions").unwrap().first().rule();
        assert_eq!(
            (login.max_tokens(), login.refill_rate(), login.scope()),
            (5, 5.0, RateLimitScope::Ip)
        );
        assert_eq!((login.cost(), login.enabled()), (1, true));
        let export = rules.get("POST /api/v1/exports").unwrap().first().rule();
        assert_eq!(
            (export.cost(), export.enabled(), export.refill_rate()),
            (4, false, 2.0)
        );
    }

    fn error_of(text: &str) -> ConfigError {
        parse_rules(text).unwrap_err()
    }

    #[test]
    fn every_bad_field_is_named() {
        use RuleField::{Cost, MaxTokens, RefillRate, Scope};
        let cases = [
            (
                "max_tokens = 0\nrefill_rate = 1.0\nscope = \"ip\"",
                MaxTokens,
                "at least 1",
            ),
            (
                "max_tokens = -3\nrefill_rate = 1.0\nscope = \"ip\"",
                MaxTokens,
                "got -3",
            ),
            (
                "max_tokens = 5\nrefill_rate = -1.0\nscope = \"ip\"",
                RefillRate,
                "positive",
            ),
            (
                "max_tokens = 5\nrefill_rate = nan\nscope = \"ip\"",
                RefillRate,
                "NaN",
            ),
            (
                "max_tokens = 5\nrefill_rate = inf\nscope = \"ip\"",
                RefillRate,
                "inf",
            ),
            (
                "max_tokens = 5\nrefill_rate = 1e-300\nscope = \"ip\"",
                RefillRate,
                "too slow",
            ),
            (
                "max_tokens = 5\nrefill_rate = 1.0\nscope = \"planet\"",
                Scope,
                "planet",
            ),
            (
                "max_tokens = 5\nrefill_rate = 1.0\nscope = \"ip\"\ncost = 6",
                Cost,
                "exceeds",
            ),
            (
                "max_tokens = 5\nrefill_rate = 1.0\nscope = \"ip\"\ncost = 0",
                Cost,
                "at least 1",
            ),
        ];
        for (body, field, reason) in cases {
            let err = error_of(&format!("[rules.\"GET /x\"]\n{body}\n"));
            assert!(matches!(err, ConfigError::Rule { .. }), "{body}: {err:?}");
            assert_eq!(err.rule(), Some("GET /x"), "{body}");
            assert_eq!(err.field(), Some(field), "{body}: {err}");
            assert_eq!(err.file(), None, "{body}");
            assert!(err.to_string().contains(reason), "{body}: {err}");
            assert!(
                err.to_string()
                    .starts_with(&format!("rule \"GET /x\", field {field}: ")),
                "{body}: {err}"
            );
        }
    }

    #[test]
    fn syntax_errors_unknown_fields_and_missing_fields_are_reported() {
        let syntax = error_of("[rules.\"GET /x\"\n");
        assert!(matches!(syntax, ConfigError::Syntax { .. }), "{syntax:?}");
        assert!(syntax.to_string().contains("invalid TOML"), "{syntax}");
        let unknown = error_of(
            "[rules.\"GET /x\"]\nmax_tokens = 5\nrefill_rate = 1.0\nscope = \"ip\"\nburst = 3\n",
        );
        assert!(unknown.to_string().contains("burst"), "{unknown}");
        let missing = error_of("[rules.\"GET /x\"]\nmax_tokens = 5\nscope = \"ip\"\n");
        assert!(missing.to_string().contains("refill_rate"), "{missing}");
    }

    #[test]
    fn a_file_that_cannot_be_read_names_its_path() {
        let err = load_rules_file("/nonexistent/rules.toml").unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
        assert!(
            err.to_string()
                .starts_with("cannot read rules file /nonexistent/rules.toml: "),
            "{err}"
        );
        assert_eq!(err.file(), Some(Path::new("/nonexistent/rules.toml")));
    }

    #[test]
    fn load_adds_the_path_to_rule_errors() {
        let path =
            std::env::temp_dir().join(format!("ratelimit-rules-{}.toml", std::process::id()));
        std::fs::write(
            &path,
            "[rules.\"GET /x\"]\nmax_tokens = 0\nrefill_rate = 1.0\nscope = \"ip\"\n",
        )
        .unwrap();
        let err = load_rules_file(&path).unwrap_err();
        let _ = std::fs::remove_file(&path);
        assert!(
            err.to_string()
                .starts_with(&format!("rules file {}", path.display())),
            "{err}"
        );
        assert_eq!(err.field(), Some(RuleField::MaxTokens));
        assert_eq!(err.file(), Some(path.as_path()));
    }

    /// `"get /x "` was accepted: a rule no request can ever match, so nothing is limited.
    #[test]
    fn endpoints_that_no_request_can_match_are_refused_naming_the_rule() {
        for (endpoint, reason) in [
            ("get /x ", "whitespace"),
            ("get /x", "upper-case"),
            ("Get /x", "upper-case"),
            (" GET /x", "whitespace"),
            ("GET /x\t", "control"),
            ("GET  /x", "no whitespace"),
            ("GET\t/x", "control"),
            ("GET /a b", "no whitespace"),
            ("GET x", "the path must start with /"),
            ("GET", "no space"),
            ("/x", "no space"),
            ("", "empty"),
            (" /x", "whitespace"),
            ("G(T /x", "not an HTTP method token"),
            ("GET /x\u{7f}", "control"),
            ("GET /x\u{85}", "control"),
        ] {
            let toml_key: String = endpoint
                .chars()
                .map(|c| match c {
                    '"' | '\\' => format!("\\{c}"),
                    c if c.is_control() => format!("\\u{:04X}", u32::from(c)),
                    c => c.to_string(),
                })
                .collect();
            let err = error_of(&format!(
                "[rules.\"{toml_key}\"]\nmax_tokens = 5\nrefill_rate = 1.0\nscope = \"ip\"\n"
            ));
            assert!(
                matches!(err, ConfigError::Rule { .. }),
                "{endpoint:?}: {err:?}"
            );
            assert_eq!(err.rule(), Some(endpoint), "{endpoint:?}: {err}");
            assert_eq!(err.field(), Some(RuleField::Endpoint), "{endpoint:?}");
            assert!(err.to_string().contains(reason), "{endpoint:?}: {err}");
        }
        for endpoint in [
            "GET /",
            "GET /users/{id}",
            "POST /api/v1/sessions",
            "M-SEARCH /upnp",
            "FETCH /x",
            "GET /users/:id",
            "GET /café",
        ] {
            let text = format!(
                "[rules.\"{endpoint}\"]\nmax_tokens = 5\nrefill_rate = 1.0\nscope = \"ip\"\n"
            );
            assert!(parse_rules(&text).is_ok(), "{endpoint:?}");
        }
    }

    #[test]
    fn the_repository_s_example_rules_load() {
        let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../http/examples/rules.toml");
        let rules = load_rules_file(examples).unwrap();
        assert!(!rules.is_empty());
    }

    #[test]
    fn an_empty_file_has_no_rules() {
        assert!(parse_rules("").unwrap().is_empty());
    }
}
