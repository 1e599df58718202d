//! Rules from TOML: parsing, then validation of every endpoint, limit and field.

use std::collections::BTreeMap;
use std::path::Path;

use ratelimit_domain::{
    EndpointLimits, Limit, MAX_LIMITS_PER_ENDPOINT, ParseScopeError, RateLimitRule, RateLimitScope,
    RuleError, RuleSet, validate_limit_name,
};
use serde::Deserialize;

use crate::error::{ConfigError, LimitRef, RuleField};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    #[serde(default)]
    rules: BTreeMap<String, RawRule>,
}

/// A rule as written, before validation: either the single-limit form (`max_tokens`,
/// `refill_rate`, `scope`, `cost`) or `limits`, never both. Every field is optional here so
/// that a missing one is reported naming the rule and the field. Integers are signed so that
/// a negative number is reported as such rather than as a type error.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    max_tokens: Option<i64>,
    refill_rate: Option<f64>,
    scope: Option<String>,
    cost: Option<i64>,
    enabled: Option<bool>,
    limits: Option<Vec<RawLimit>>,
}

/// One member of a rule's `limits` array, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimit {
    name: Option<String>,
    scope: Option<String>,
    max_tokens: Option<i64>,
    refill_rate: Option<f64>,
    cost: Option<i64>,
}

/// The bucket fields shared by both forms, as written.
#[derive(Debug, Clone, Copy)]
struct RawBucket<'a> {
    max_tokens: Option<i64>,
    refill_rate: Option<f64>,
    scope: Option<&'a str>,
    cost: Option<i64>,
}

/// Where a problem is: the rule (its endpoint) and, for a field of one of its `limits`, that
/// limit.
#[derive(Debug, Clone)]
struct At<'a> {
    endpoint: &'a str,
    limit: Option<LimitRef>,
}

impl At<'_> {
    fn problem(&self, field: RuleField, reason: &str) -> ConfigError {
        ConfigError::Rule {
            file: None,
            rule: self.endpoint.to_owned(),
            limit: self.limit.clone(),
            field,
            reason: reason.to_owned(),
        }
    }
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
/// (an upper-case method token, exactly one space, a path starting with `/`), either with
/// `max_tokens`, `refill_rate` (tokens per minute), `scope` (`ip`, `user`, `user_provider` or
/// `global`) and optionally `cost` (default 1) — one limit, named after the endpoint — or
/// with `limits`, an array of 1 to 16 tables holding each a `name` and those fields; and in
/// both forms optionally `enabled` (default true). Unknown fields are errors. The format is
/// in the [crate docs](crate).
///
/// # Errors
/// [`ConfigError::Syntax`] for text that is not a rules file (bad TOML, an unknown field, a
/// value of the wrong type); [`ConfigError::Rule`] naming the rule, the limit (for a member
/// of `limits`) and the field for a missing field, an invalid endpoint, name or value, or a
/// rule that mixes both forms. The error has no file.
pub fn parse_rules(text: &str) -> Result<RuleSet, ConfigError> {
    let file: RulesFile = toml::from_str(text).map_err(|err| ConfigError::Syntax {
        file: None,
        reason: err.message().trim().to_owned(),
    })?;
    let mut rules = RuleSet::new();
    for (endpoint, raw) in file.rules {
        check_endpoint(&endpoint)?;
        let at = At {
            endpoint: &endpoint,
            limit: None,
        };
        let limits = build_endpoint(&at, &raw)?;
        rules
            .insert_limits(endpoint.clone(), limits)
            .map_err(|err| at.problem(RuleField::Endpoint, err.message()))?;
    }
    Ok(rules)
}

/// The limits of one rule, in either form.
fn build_endpoint(at: &At<'_>, raw: &RawRule) -> Result<EndpointLimits, ConfigError> {
    let enabled = raw.enabled.unwrap_or(true);
    let Some(raw_limits) = &raw.limits else {
        let rule = build_bucket(
            at,
            RawBucket {
                max_tokens: raw.max_tokens,
                refill_rate: raw.refill_rate,
                scope: raw.scope.as_deref(),
                cost: raw.cost,
            },
        )?;
        return Ok(EndpointLimits::single(
            at.endpoint,
            rule.with_enabled(enabled),
        ));
    };
    let beside = [
        (RuleField::MaxTokens, raw.max_tokens.is_some()),
        (RuleField::RefillRate, raw.refill_rate.is_some()),
        (RuleField::Scope, raw.scope.is_some()),
        (RuleField::Cost, raw.cost.is_some()),
    ];
    if let Some((field, _)) = beside.into_iter().find(|(_, present)| *present) {
        return Err(at.problem(
            field,
            &format!(
                "a rule with `limits` has no {field} of its own: give it to each limit in \
                 `limits`, or drop `limits` for the single-limit form"
            ),
        ));
    }
    if raw_limits.is_empty() {
        return Err(at.problem(
            RuleField::Limits,
            "is empty; give at least one limit, e.g. limits = [{ name = \"per-client\", \
             scope = \"ip\", max_tokens = 10, refill_rate = 10.0 }]",
        ));
    }
    if raw_limits.len() > MAX_LIMITS_PER_ENDPOINT {
        return Err(at.problem(
            RuleField::Limits,
            &RuleError::TooManyLimits {
                count: raw_limits.len(),
                max: MAX_LIMITS_PER_ENDPOINT,
            }
            .to_string(),
        ));
    }
    let mut limits = Vec::with_capacity(raw_limits.len());
    for (index, raw_limit) in raw_limits.iter().enumerate() {
        limits.push(build_limit(
            at.endpoint,
            index,
            raw_limit,
            &raw_limits[..index],
        )?);
    }
    EndpointLimits::new(limits)
        .map(|limits| limits.with_enabled(enabled))
        .map_err(|err| at.problem(RuleField::Limits, &err.to_string()))
}

/// The limit at `index` of a rule's `limits`, given the members before it.
fn build_limit(
    endpoint: &str,
    index: usize,
    raw: &RawLimit,
    before: &[RawLimit],
) -> Result<Limit, ConfigError> {
    let at = At {
        endpoint,
        limit: Some(LimitRef::new(index, raw.name.as_deref())),
    };
    let Some(name) = raw.name.as_deref() else {
        return Err(at.problem(
            RuleField::Name,
            "is missing; every member of `limits` needs a name, unique in the rule, e.g. \
             name = \"per-client\"",
        ));
    };
    validate_limit_name(name).map_err(|err| match err {
        RuleError::InvalidLimitName { reason, .. } => at.problem(RuleField::Name, reason),
        other => at.problem(RuleField::Name, &other.to_string()),
    })?;
    if let Some(first) = before
        .iter()
        .position(|other| other.name.as_deref() == Some(name))
    {
        return Err(at.problem(
            RuleField::Name,
            &format!("{name:?} is already the name of limits[{first}]; names are unique in a rule"),
        ));
    }
    let rule = build_bucket(
        &at,
        RawBucket {
            max_tokens: raw.max_tokens,
            refill_rate: raw.refill_rate,
            scope: raw.scope.as_deref(),
            cost: raw.cost,
        },
    )?;
    Limit::named(name, rule).map_err(|err| at.problem(RuleField::Name, &err.to_string()))
}

/// Checks that `endpoint` is one the HTTP layer can produce: `METHOD /path`, an upper-case
/// method token (RFC 9110 `tchar`s, no lower-case letters), exactly one space, and a path
/// that starts with `/` and holds no whitespace; no control characters, no surrounding space.
fn check_endpoint(endpoint: &str) -> Result<(), ConfigError> {
    let at = At {
        endpoint,
        limit: None,
    };
    let fail = |reason: String| Err(at.problem(RuleField::Endpoint, &reason));
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

/// One bucket: the fields of a single-limit rule, or of one member of `limits`.
fn build_bucket(at: &At<'_>, raw: RawBucket<'_>) -> Result<RateLimitRule, ConfigError> {
    let missing = |field: RuleField| {
        let shape = if at.limit.is_some() {
            "every member of `limits` needs max_tokens, refill_rate and scope"
        } else {
            "a rule needs max_tokens, refill_rate and scope, or a `limits` array"
        };
        at.problem(field, &format!("is missing; {shape}"))
    };
    let max_tokens = raw
        .max_tokens
        .ok_or_else(|| missing(RuleField::MaxTokens))?;
    let refill_rate = raw
        .refill_rate
        .ok_or_else(|| missing(RuleField::RefillRate))?;
    let scope = raw.scope.ok_or_else(|| missing(RuleField::Scope))?;
    let scope: RateLimitScope = scope
        .parse()
        .map_err(|err: ParseScopeError| at.problem(RuleField::Scope, &err.to_string()))?;
    let max_tokens = positive(at, RuleField::MaxTokens, max_tokens)?;
    let mut rule =
        RateLimitRule::new(scope, max_tokens, refill_rate).map_err(|err| rule_problem(at, &err))?;
    if let Some(cost) = raw.cost {
        let cost = positive(at, RuleField::Cost, cost)?;
        rule = rule.with_cost(cost).map_err(|err| rule_problem(at, &err))?;
    }
    Ok(rule)
}

fn positive(at: &At<'_>, field: RuleField, value: i64) -> Result<u64, ConfigError> {
    u64::try_from(value)
        .ok()
        .filter(|&v| v > 0)
        .ok_or_else(|| at.problem(field, &format!("must be at least 1, got {value}")))
}

fn rule_problem(at: &At<'_>, err: &RuleError) -> ConfigError {
    let field = match err {
        RuleError::ZeroMaxTokens | RuleError::MaxTokensTooLarge { .. } => RuleField::MaxTokens,
        RuleError::ZeroCost | RuleError::CostExceedsCapacity { .. } => RuleField::Cost,
        _ => RuleField::RefillRate,
    };
    at.problem(field, &err.to_string())
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

    const SEARCH: &str = r#"
        [rules."GET /api/v1/search"]
        limits = [
          { name = "per-client", scope = "ip", max_tokens = 10, refill_rate = 10.0 },
          { name = "everyone", scope = "global", max_tokens = 15, refill_rate = 15.0, cost = 1 },
        ]
        enabled = true   # optional, for the endpoint as a whole
    "#;

    #[test]
    fn reads_several_named_limits_in_order() {
        let rules = parse_rules(SEARCH).unwrap();
        let search = rules.get("GET /api/v1/search").unwrap();
        assert!(!search.is_single());
        assert!(search.enabled());
        let limits: Vec<_> = search
            .limits()
            .iter()
            .map(|limit| {
                let rule = limit.rule();
                (
                    limit.name(),
                    limit.is_named(),
                    rule.scope(),
                    rule.max_tokens(),
                    rule.refill_rate(),
                    rule.cost(),
                )
            })
            .collect();
        assert_eq!(
            limits,
            [
                ("per-client", true, RateLimitScope::Ip, 10, 10.0, 1),
                ("everyone", true, RateLimitScope::Global, 15, 15.0, 1),
            ]
        );
        // One limit in the new form is still a named limit, not the single-limit form.
        let one = parse_rules(
            "[rules.\"GET /x\"]\nlimits = [{ name = \"a\", scope = \"user\", max_tokens = 3, \
             refill_rate = 1.0, cost = 2 }]\n",
        )
        .unwrap();
        let one = one.get("GET /x").unwrap();
        assert!(!one.is_single());
        assert_eq!((one.first().name(), one.first().rule().cost()), ("a", 2));
        // The single-limit form is unchanged: one limit named after the endpoint.
        let single = parse_rules(GOOD).unwrap();
        let login = single.get("POST /api/v1/sessions").unwrap();
        assert!(login.is_single());
        assert_eq!(login.first().name(), "POST /api/v1/sessions");
    }

    #[test]
    fn enabled_switches_the_whole_endpoint() {
        let off = parse_rules(&SEARCH.replace("enabled = true", "enabled = false")).unwrap();
        let search = off.get("GET /api/v1/search").unwrap();
        assert!(!search.enabled());
        assert_eq!(search.active().count(), 0);
        assert_eq!(search.limits().len(), 2);
        let default = parse_rules(&SEARCH.replace("enabled = true", "")).unwrap();
        assert!(default.get("GET /api/v1/search").unwrap().enabled());
    }

    /// `[rules."GET /x"]` with `limits = [LIMITS]`.
    fn limits_rule(limits: &str) -> String {
        format!("[rules.\"GET /x\"]\nlimits = [\n{limits}\n]\n")
    }

    const PER_CLIENT: &str =
        "{ name = \"per-client\", scope = \"ip\", max_tokens = 5, refill_rate = 1.0 },";

    #[test]
    fn every_bad_field_of_a_limit_is_named_with_the_limit() {
        use RuleField::{Cost, MaxTokens, Name, RefillRate, Scope};
        let cases = [
            (
                "max_tokens = 0, refill_rate = 1.0, scope = \"ip\"",
                MaxTokens,
                "at least 1",
            ),
            (
                "max_tokens = -3, refill_rate = 1.0, scope = \"ip\"",
                MaxTokens,
                "got -3",
            ),
            (
                "max_tokens = 5, refill_rate = -1.0, scope = \"ip\"",
                RefillRate,
                "positive",
            ),
            (
                "max_tokens = 5, refill_rate = nan, scope = \"ip\"",
                RefillRate,
                "NaN",
            ),
            (
                "max_tokens = 5, refill_rate = 1e-300, scope = \"ip\"",
                RefillRate,
                "too slow",
            ),
            (
                "max_tokens = 5, refill_rate = 1.0, scope = \"planet\"",
                Scope,
                "planet",
            ),
            (
                "max_tokens = 5, refill_rate = 1.0, scope = \"ip\", cost = 6",
                Cost,
                "exceeds",
            ),
            (
                "max_tokens = 5, refill_rate = 1.0, scope = \"ip\", cost = 0",
                Cost,
                "at least 1",
            ),
            ("refill_rate = 1.0, scope = \"ip\"", MaxTokens, "is missing"),
            ("max_tokens = 5, scope = \"ip\"", RefillRate, "is missing"),
            ("max_tokens = 5, refill_rate = 1.0", Scope, "is missing"),
        ];
        for (fields, field, reason) in cases {
            let text = limits_rule(&format!("{PER_CLIENT}\n{{ name = \"b\", {fields} }},"));
            let err = error_of(&text);
            assert!(matches!(err, ConfigError::Rule { .. }), "{fields}: {err:?}");
            assert_eq!(err.rule(), Some("GET /x"), "{fields}");
            assert_eq!(err.field(), Some(field), "{fields}: {err}");
            assert_eq!(err.limit(), Some(&LimitRef::new(1, Some("b"))), "{fields}");
            assert_eq!(
                err.field_path(),
                Some(format!("limits[1].{field}")),
                "{fields}"
            );
            let message = err.to_string();
            assert!(
                message.starts_with(&format!(
                    "rule \"GET /x\", limit \"b\" (limits[1]), field {field}: "
                )),
                "{fields}: {message}"
            );
            assert!(message.contains(reason), "{fields}: {message}");
        }

        // Names: missing, unsafe, duplicated.
        let missing = error_of(&limits_rule(
            "{ scope = \"ip\", max_tokens = 5, refill_rate = 1.0 },",
        ));
        assert_eq!(missing.field(), Some(Name));
        assert_eq!(missing.limit(), Some(&LimitRef::new(0, None)));
        assert!(
            missing
                .to_string()
                .starts_with("rule \"GET /x\", limits[0], field name: is missing"),
            "{missing}"
        );
        for bad in [
            "",
            "per client",
            "-x",
            "a:b",
            "a#b",
            "quote\\\"",
            "é",
            "tab\\t",
        ] {
            let err = error_of(&limits_rule(&format!(
                "{{ name = \"{bad}\", scope = \"ip\", max_tokens = 5, refill_rate = 1.0 }},"
            )));
            assert!(matches!(err, ConfigError::Rule { .. }), "{bad}: {err:?}");
            assert_eq!(err.field(), Some(Name), "{bad}: {err}");
            assert_eq!(err.limit().map(|limit| limit.index), Some(0), "{bad}");
            assert_eq!(err.field_path().as_deref(), Some("limits[0].name"));
        }
        let long = error_of(&limits_rule(&format!(
            "{{ name = \"{}\", scope = \"ip\", max_tokens = 5, refill_rate = 1.0 }},",
            "a".repeat(65)
        )));
        assert!(long.to_string().contains("64 bytes"), "{long}");
        let unsafe_name = error_of(&limits_rule(
            "{ name = \"per client\", scope = \"ip\", max_tokens = 5, refill_rate = 1.0 },",
        ));
        assert_eq!(
            unsafe_name.to_string(),
            "rule \"GET /x\", limit \"per client\" (limits[0]), field name: may hold only \
             ASCII letters, digits, '-', '_' and '.'"
        );
        let duplicate = error_of(&limits_rule(&format!(
            "{PER_CLIENT}\n{{ name = \"everyone\", scope = \"global\", max_tokens = 9, \
             refill_rate = 1.0 }},\n{PER_CLIENT}"
        )));
        assert_eq!(duplicate.field(), Some(Name));
        assert_eq!(
            duplicate.limit(),
            Some(&LimitRef::new(2, Some("per-client")))
        );
        assert_eq!(
            duplicate.to_string(),
            "rule \"GET /x\", limit \"per-client\" (limits[2]), field name: \"per-client\" is \
             already the name of limits[0]; names are unique in a rule"
        );
    }

    #[test]
    fn a_rule_has_limits_or_the_single_form_never_both() {
        for (field, line) in [
            (RuleField::MaxTokens, "max_tokens = 5"),
            (RuleField::RefillRate, "refill_rate = 1.0"),
            (RuleField::Scope, "scope = \"ip\""),
            (RuleField::Cost, "cost = 1"),
        ] {
            // The line must be inside the table, after its header.
            let text =
                limits_rule(PER_CLIENT).replace("limits = [", &format!("{line}\nlimits = ["));
            let err = error_of(&text);
            assert!(matches!(err, ConfigError::Rule { .. }), "{line}: {err:?}");
            assert_eq!(err.field(), Some(field), "{line}: {err}");
            assert_eq!(err.limit(), None, "{line}");
            assert!(
                err.to_string().starts_with(&format!(
                    "rule \"GET /x\", field {field}: a rule with `limits` has no {field} of its own"
                )),
                "{err}"
            );
        }
    }

    #[test]
    fn limits_keyed_by_different_identifiers_are_refused() {
        let mixed = error_of(&limits_rule(&format!(
            "{PER_CLIENT}\n{{ name = \"per-user\", scope = \"user\", max_tokens = 5, refill_rate = 1.0 }},"
        )));
        assert_eq!(mixed.field(), Some(RuleField::Limits));
        assert!(
            mixed.to_string().starts_with(
                "rule \"GET /x\", field limits: limits \"per-client\" (scope ip) and \"per-user\" (scope user) need different identifiers"
            ),
            "{mixed}"
        );
        let with_global = limits_rule(&format!(
            "{PER_CLIENT}\n{{ name = \"everyone\", scope = \"global\", max_tokens = 5, refill_rate = 1.0 }},"
        ));
        assert!(parse_rules(&with_global).is_ok());
    }

    #[test]
    fn limits_hold_one_to_sixteen_members() {
        let empty = error_of("[rules.\"GET /x\"]\nlimits = []\n");
        assert_eq!(empty.field(), Some(RuleField::Limits));
        assert_eq!(empty.limit(), None);
        assert!(
            empty
                .to_string()
                .starts_with("rule \"GET /x\", field limits: is empty"),
            "{empty}"
        );
        let members = |n: usize| {
            (0..n)
                .map(|i| {
                    format!(
                        "{{ name = \"l{i}\", scope = \"ip\", max_tokens = 5, refill_rate = 1.0 }},"
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        let sixteen = parse_rules(&limits_rule(&members(16))).unwrap();
        assert_eq!(sixteen.get("GET /x").unwrap().limits().len(), 16);
        let seventeen = error_of(&limits_rule(&members(17)));
        assert_eq!(seventeen.field(), Some(RuleField::Limits));
        assert_eq!(
            seventeen.to_string(),
            "rule \"GET /x\", field limits: an endpoint may have at most 16 limits, got 17"
        );
    }

    #[test]
    fn missing_fields_of_the_single_form_are_named() {
        for (body, field) in [
            ("refill_rate = 1.0\nscope = \"ip\"", RuleField::MaxTokens),
            ("max_tokens = 5\nscope = \"ip\"", RuleField::RefillRate),
            ("max_tokens = 5\nrefill_rate = 1.0", RuleField::Scope),
            ("enabled = false", RuleField::MaxTokens),
            ("", RuleField::MaxTokens),
        ] {
            let err = error_of(&format!("[rules.\"GET /x\"]\n{body}\n"));
            assert_eq!(err.field(), Some(field), "{body:?}: {err}");
            assert_eq!(err.limit(), None);
            assert!(
                err.to_string().starts_with(&format!(
                    "rule \"GET /x\", field {field}: is missing; a rule needs max_tokens, \
                     refill_rate and scope, or a `limits` array"
                )),
                "{err}"
            );
        }
    }

    #[test]
    fn unknown_fields_and_wrong_types_in_limits_are_syntax_errors() {
        for (limits, needle) in [
            (
                "{ name = \"a\", scope = \"ip\", max_tokens = 5, refill_rate = 1.0, burst = 2 },",
                "burst",
            ),
            (
                "{ name = \"a\", scope = \"ip\", max_tokens = 5, refill_rate = 1.0, enabled = false },",
                "enabled",
            ),
            (
                "{ name = 7, scope = \"ip\", max_tokens = 5, refill_rate = 1.0 },",
                "string",
            ),
            ("\"per-client\",", "struct"),
        ] {
            let err = error_of(&limits_rule(limits));
            assert!(
                matches!(err, ConfigError::Syntax { .. }),
                "{limits}: {err:?}"
            );
            assert!(err.to_string().contains(needle), "{limits}: {err}");
        }
        let not_an_array = error_of("[rules.\"GET /x\"]\nlimits = 3\n");
        assert!(
            matches!(not_an_array, ConfigError::Syntax { .. }),
            "{not_an_array:?}"
        );
    }

    #[test]
    fn load_adds_the_path_to_limit_errors() {
        let path = std::env::temp_dir().join(format!(
            "ratelimit-rules-limits-{}.toml",
            std::process::id()
        ));
        std::fs::write(&path, limits_rule(&format!("{PER_CLIENT}\n{PER_CLIENT}"))).unwrap();
        let err = load_rules_file(&path).unwrap_err();
        let _ = std::fs::remove_file(&path);
        assert_eq!(
            err.to_string(),
            format!(
                "rules file {}: rule \"GET /x\", limit \"per-client\" (limits[1]), field name: \
                 \"per-client\" is already the name of limits[0]; names are unique in a rule",
                path.display()
            )
        );
        assert_eq!(err.file(), Some(path.as_path()));
        assert_eq!(err.field_path().as_deref(), Some("limits[1].name"));
    }
}
