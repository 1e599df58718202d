//! Rules from a TOML file.
//!
//! ```toml
//! [rules."POST /api/v1/sessions"]
//! max_tokens = 5
//! refill_rate = 5.0        # tokens per minute
//! scope = "ip"             # ip | user | user_provider | global
//! cost = 1                 # optional, default 1
//! enabled = true           # optional, default true
//! ```
//!
//! Every problem is reported with the rule, the field and the reason, so that a bad file
//! stops a service at start-up with a message that says what to fix.

use std::collections::BTreeMap;
use std::path::Path;

use ratelimit_domain::{
    ErrorCode, RateLimitError, RateLimitRule, RateLimitScope, Result, RuleError, RuleSet,
};
use serde::Deserialize;

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

/// Reads and validates a rules file.
///
/// # Errors
/// [`ErrorCode::Configuration`] when the file cannot be read or parsed, or when a rule is
/// invalid; the message names the file, the rule and the field, and `details()` holds them
/// as `path`, `rule` and `field`.
pub fn load_rules_file(path: impl AsRef<Path>) -> Result<RuleSet> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|err| {
        RateLimitError::new(
            ErrorCode::Configuration,
            format!("cannot read rules file {}: {err}", path.display()),
        )
        .with_detail("path", path.display().to_string())
    })?;
    parse_rules(&text).map_err(|err| {
        let message = format!("rules file {}: {}", path.display(), err.message());
        let mut located = RateLimitError::new(ErrorCode::Configuration, message)
            .with_detail("path", path.display().to_string());
        for (name, value) in err.details() {
            located = located.with_detail(name, value.clone());
        }
        located
    })
}

/// Parses and validates rules written in TOML: one `[rules."<endpoint>"]` table per rule with
/// `max_tokens`, `refill_rate` (tokens per minute), `scope` (`ip`, `user`, `user_provider` or
/// `global`), and optionally `cost` (default 1) and `enabled` (default true); unknown fields are
/// errors.
///
/// # Errors
/// As [`load_rules_file`], without the path.
pub fn parse_rules(text: &str) -> Result<RuleSet> {
    let file: RulesFile = toml::from_str(text).map_err(|err| {
        RateLimitError::new(
            ErrorCode::Configuration,
            format!("invalid TOML: {}", err.message().trim()),
        )
    })?;
    let mut rules = RuleSet::new();
    for (endpoint, raw) in file.rules {
        let rule = build(&endpoint, &raw)?;
        rules
            .insert(endpoint.clone(), rule)
            .map_err(|err| problem(&endpoint, "endpoint", err.message()))?;
    }
    Ok(rules)
}

fn build(endpoint: &str, raw: &RawRule) -> Result<RateLimitRule> {
    let scope: RateLimitScope =
        raw.scope
            .parse()
            .map_err(|err: ratelimit_domain::ParseScopeError| {
                problem(endpoint, "scope", &err.to_string())
            })?;
    let max_tokens = positive(endpoint, "max_tokens", raw.max_tokens)?;
    let mut rule = RateLimitRule::new(scope, max_tokens, raw.refill_rate)
        .map_err(|err| rule_problem(endpoint, &err))?;
    if let Some(cost) = raw.cost {
        let cost = positive(endpoint, "cost", cost)?;
        rule = rule
            .with_cost(cost)
            .map_err(|err| rule_problem(endpoint, &err))?;
    }
    Ok(rule.with_enabled(raw.enabled.unwrap_or(true)))
}

fn positive(endpoint: &str, field: &'static str, value: i64) -> Result<u64> {
    u64::try_from(value)
        .ok()
        .filter(|&v| v > 0)
        .ok_or_else(|| problem(endpoint, field, &format!("must be at least 1, got {value}")))
}

fn rule_problem(endpoint: &str, err: &RuleError) -> RateLimitError {
    let field = match err {
        RuleError::ZeroMaxTokens | RuleError::MaxTokensTooLarge { .. } => "max_tokens",
        RuleError::ZeroCost | RuleError::CostExceedsCapacity { .. } => "cost",
        _ => "refill_rate",
    };
    problem(endpoint, field, &err.to_string())
}

fn problem(endpoint: &str, field: &'static str, reason: &str) -> RateLimitError {
    RateLimitError::new(
        ErrorCode::Configuration,
        format!("rule {endpoint:?}, field {field}: {reason}"),
    )
    .with_detail("rule", endpoint)
    .with_detail("field", field)
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
        let login = rules.get("POST /api/v1/sessions").unwrap();
        assert_eq!(
            (login.max_tokens(), login.refill_rate(), login.scope()),
            (5, 5.0, RateLimitScope::Ip)
        );
        assert_eq!((login.cost(), login.enabled()), (1, true));
        let export = rules.get("POST /api/v1/exports").unwrap();
        assert_eq!(
            (export.cost(), export.enabled(), export.refill_rate()),
            (4, false, 2.0)
        );
    }

    fn error_of(text: &str) -> RateLimitError {
        parse_rules(text).unwrap_err()
    }

    #[test]
    fn every_bad_field_is_named() {
        let cases = [
            (
                "max_tokens = 0\nrefill_rate = 1.0\nscope = \"ip\"",
                "max_tokens",
                "at least 1",
            ),
            (
                "max_tokens = -3\nrefill_rate = 1.0\nscope = \"ip\"",
                "max_tokens",
                "got -3",
            ),
            (
                "max_tokens = 5\nrefill_rate = -1.0\nscope = \"ip\"",
                "refill_rate",
                "positive",
            ),
            (
                "max_tokens = 5\nrefill_rate = nan\nscope = \"ip\"",
                "refill_rate",
                "NaN",
            ),
            (
                "max_tokens = 5\nrefill_rate = inf\nscope = \"ip\"",
                "refill_rate",
                "inf",
            ),
            (
                "max_tokens = 5\nrefill_rate = 1e-300\nscope = \"ip\"",
                "refill_rate",
                "too slow",
            ),
            (
                "max_tokens = 5\nrefill_rate = 1.0\nscope = \"planet\"",
                "scope",
                "planet",
            ),
            (
                "max_tokens = 5\nrefill_rate = 1.0\nscope = \"ip\"\ncost = 6",
                "cost",
                "exceeds",
            ),
            (
                "max_tokens = 5\nrefill_rate = 1.0\nscope = \"ip\"\ncost = 0",
                "cost",
                "at least 1",
            ),
        ];
        for (body, field, reason) in cases {
            let err = error_of(&format!("[rules.\"GET /x\"]\n{body}\n"));
            assert_eq!(err.code(), ErrorCode::Configuration);
            assert_eq!(
                err.details().get("rule").map(String::as_str),
                Some("GET /x"),
                "{body}"
            );
            assert_eq!(
                err.details().get("field").map(String::as_str),
                Some(field),
                "{body}: {err}"
            );
            assert!(err.message().contains(reason), "{body}: {err}");
        }
    }

    #[test]
    fn syntax_errors_unknown_fields_and_missing_fields_are_reported() {
        assert!(
            error_of("[rules.\"GET /x\"\n")
                .message()
                .contains("invalid TOML")
        );
        let unknown = error_of(
            "[rules.\"GET /x\"]\nmax_tokens = 5\nrefill_rate = 1.0\nscope = \"ip\"\nburst = 3\n",
        );
        assert!(unknown.message().contains("burst"), "{unknown}");
        let missing = error_of("[rules.\"GET /x\"]\nmax_tokens = 5\nscope = \"ip\"\n");
        assert!(missing.message().contains("refill_rate"), "{missing}");
    }

    #[test]
    fn a_file_that_cannot_be_read_names_its_path() {
        let err = load_rules_file("/nonexistent/rules.toml").unwrap_err();
        assert!(err.message().contains("/nonexistent/rules.toml"));
        assert_eq!(err.code(), ErrorCode::Configuration);
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
            err.message()
                .starts_with(&format!("rules file {}", path.display())),
            "{err}"
        );
        assert_eq!(err.details()["field"], "max_tokens");
    }

    #[test]
    fn an_empty_file_has_no_rules() {
        assert!(parse_rules("").unwrap().is_empty());
    }
}
