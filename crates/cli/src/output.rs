//! What the commands print: reports, rendered for humans or as one JSON object.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use ratelimit_config::RuleField;
use ratelimit_domain::{DecisionSource, RateLimitResult, RateLimitRule};
use serde_json::{Value, json};

use crate::error::{CliError, Exit};

/// Which bucket a report is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// The endpoint, as named in the rules file.
    pub(crate) endpoint: String,
    /// Whose bucket, as the service writes it (an `ip` rule's address grouped like the
    /// service's); `None` for the global scope, whose one bucket belongs to nobody.
    pub(crate) identifier: Option<String>,
    /// The bucket's key (without the store's suffixes `:tokens`, `:time`, `:tb`).
    pub(crate) key: String,
}

impl Target {
    /// `"1.2.3.4 on POST /login"` or `"everyone on GET /x (global)"`.
    fn describe(&self) -> String {
        match &self.identifier {
            Some(identifier) => format!("{identifier} on {}", self.endpoint),
            None => format!("everyone on {} (global)", self.endpoint),
        }
    }
}

/// The outcome of `check`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CheckReport {
    /// The bucket.
    pub(crate) target: Target,
    /// Tokens the check asked for.
    pub(crate) cost: u64,
    /// The limiter's answer.
    pub(crate) result: RateLimitResult,
}

/// The outcome of `remaining`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RemainingReport {
    /// The bucket.
    pub(crate) target: Target,
    /// Whole tokens left.
    pub(crate) remaining: u64,
    /// The bucket's capacity.
    pub(crate) limit: u64,
    /// Whether the endpoint's rule is enabled.
    pub(crate) enabled: bool,
}

/// The outcome of `reset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResetReport {
    /// The bucket.
    pub(crate) target: Target,
    /// The bucket's capacity, which it holds again.
    pub(crate) limit: u64,
    /// Whether there was a bucket to reset; a missing one is already full, or is not the
    /// service's (another endpoint, identifier, grouping, key prefix or database).
    pub(crate) existed: bool,
}

/// The outcome of `rules check`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RulesReport {
    /// The file checked.
    pub(crate) file: PathBuf,
    /// Its rules, sorted by endpoint, or what is wrong with it.
    pub(crate) outcome: Result<Vec<(String, RateLimitRule)>, RulesProblem>,
}

/// What is wrong with a rules file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RulesProblem {
    /// The message, naming rule, field and reason.
    pub(crate) message: String,
    /// The rule at fault, when one is.
    pub(crate) rule: Option<String>,
    /// The field at fault, when one is.
    pub(crate) field: Option<RuleField>,
}

/// The outcome of any command that ran to the end.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Report {
    /// `check`.
    Check(CheckReport),
    /// `remaining`.
    Remaining(RemainingReport),
    /// `reset`.
    Reset(ResetReport),
    /// `rules check`.
    Rules(RulesReport),
}

impl Report {
    /// The exit code: 1 for a denied check, 2 for an invalid rules file, 0 otherwise.
    pub(crate) fn exit(&self) -> Exit {
        match self {
            Self::Check(check) if !check.result.allowed => Exit::Denied,
            Self::Rules(RulesReport {
                outcome: Err(_), ..
            }) => Exit::Usage,
            _ => Exit::Success,
        }
    }

    /// Human-readable lines, each ending in a newline.
    pub(crate) fn human(&self) -> String {
        let mut out = match self {
            Self::Check(check) => check_line(check),
            Self::Remaining(remaining) => remaining_line(remaining),
            Self::Reset(reset) => reset_lines(reset),
            Self::Rules(rules) => rules_lines(rules),
        };
        if !out.ends_with('\n') {
            out.push('\n');
        }
        out
    }

    /// One JSON object.
    pub(crate) fn json(&self) -> Value {
        match self {
            Self::Check(check) => {
                let result = &check.result;
                json!({
                    "endpoint": check.target.endpoint,
                    "identifier": check.target.identifier,
                    "allowed": result.allowed,
                    "retry_after": retry_after_json(result),
                    "remaining": result.remaining,
                    "limit": result.limit,
                    "reset_seconds": result.reset_seconds,
                    "source": result.source.as_str(),
                    "cost": check.cost,
                })
            }
            Self::Remaining(remaining) => json!({
                "endpoint": remaining.target.endpoint,
                "identifier": remaining.target.identifier,
                "key": remaining.target.key,
                "remaining": remaining.remaining,
                "limit": remaining.limit,
                "enabled": remaining.enabled,
            }),
            Self::Reset(reset) => json!({
                "endpoint": reset.target.endpoint,
                "identifier": reset.target.identifier,
                "key": reset.target.key,
                "reset": true,
                "existed": reset.existed,
                "remaining": reset.limit,
                "limit": reset.limit,
            }),
            Self::Rules(rules) => rules_json(rules),
        }
    }
}

/// `retry_after` in seconds at full precision: 0 when allowed, `null` when never.
fn retry_after_json(result: &RateLimitResult) -> Value {
    if result.retry_never() {
        Value::Null
    } else {
        json!(result.retry_after.as_secs_f64())
    }
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// `"4 of 5 tokens left"`.
fn tokens_left(remaining: u64, limit: u64) -> String {
    format!("{remaining} of {limit} token{} left", plural(limit))
}

/// A wait for humans: `"11.8 s (12 s rounded up)"`, or `"12 s"` when whole. Tenths are
/// rounded up too, so that the advice is never to retry too early.
pub(crate) fn format_wait(wait: Duration) -> String {
    if wait.subsec_nanos() == 0 {
        return format!("{} s", wait.as_secs());
    }
    let tenths = wait.as_nanos().div_ceil(100_000_000);
    let whole = wait.as_secs() + 1;
    if tenths.is_multiple_of(10) {
        // 11.96 s: "12.0 s (12 s rounded up)" would say the same thing twice.
        return format!("{whole} s");
    }
    format!("{}.{} s ({whole} s rounded up)", tenths / 10, tenths % 10)
}

fn check_line(check: &CheckReport) -> String {
    let result = &check.result;
    let cost = if check.cost == 1 {
        String::new()
    } else {
        format!(" (cost {})", check.cost)
    };
    match (result.allowed, result.source) {
        (true, DecisionSource::RuleDisabled) => format!(
            "allowed: the rule for {} is disabled, nothing is limited or counted",
            check.target.endpoint
        ),
        (true, _) => format!(
            "allowed: {}{cost}",
            tokens_left(result.remaining, result.limit)
        ),
        (false, _) if result.retry_never() => format!(
            "denied: a cost of {} is more than the bucket holds ({} token{}); waiting will not help",
            check.cost,
            result.limit,
            plural(result.limit)
        ),
        (false, _) => format!(
            "denied: retry after {}; {}{cost}",
            format_wait(result.retry_after),
            tokens_left(result.remaining, result.limit)
        ),
    }
}

fn remaining_line(report: &RemainingReport) -> String {
    let mut line = format!(
        "remaining: {} (nothing consumed)",
        tokens_left(report.remaining, report.limit)
    );
    if !report.enabled {
        line.push_str("; the rule is disabled, nothing is limited");
    }
    // Writing to a String cannot fail.
    let _ = write!(line, "\n  key: {}", report.target.key);
    line
}

fn reset_lines(reset: &ResetReport) -> String {
    let full = tokens_left(reset.limit, reset.limit);
    if reset.existed {
        format!(
            "reset: the bucket of {} is full again ({full})\n  key: {}",
            reset.target.describe(),
            reset.target.key
        )
    } else {
        format!(
            "reset: there was no bucket to reset for {} (it is full: {full})\n  key: {}\n  \
             Either it was already full (a bucket is dropped once it refills), or the service \
             keeps this client's bucket under another key: check the endpoint, the identifier, \
             --ipv6-prefix/--ipv4-prefix (ip rules), --key-prefix, --layout and the Redis \
             database.",
            reset.target.describe(),
            reset.target.key
        )
    }
}

fn rules_lines(report: &RulesReport) -> String {
    let file = report.file.display();
    match &report.outcome {
        Err(problem) => format!("invalid: {}", problem.message),
        Ok(rules) if rules.is_empty() => {
            format!("valid: {file} has no rules (nothing would be limited)")
        }
        Ok(rules) => {
            let mut out = format!(
                "valid: {file} has {} rule{}\n",
                rules.len(),
                plural(u64::try_from(rules.len()).unwrap_or(u64::MAX))
            );
            for (endpoint, rule) in rules {
                // Writing to a String cannot fail.
                let _ = writeln!(
                    out,
                    "  {endpoint}: scope={} max_tokens={} refill_rate={}/min cost={} enabled={} ttl={}s",
                    rule.scope(),
                    rule.max_tokens(),
                    rule.refill_rate(),
                    rule.cost(),
                    rule.enabled(),
                    rule.ttl_seconds()
                );
            }
            out
        }
    }
}

fn rules_json(report: &RulesReport) -> Value {
    let file = report.file.display().to_string();
    match &report.outcome {
        Ok(rules) => {
            let rules: Vec<Value> = rules
                .iter()
                .map(|(endpoint, rule)| {
                    json!({
                        "endpoint": endpoint,
                        "scope": rule.scope().as_str(),
                        "max_tokens": rule.max_tokens(),
                        "refill_rate": rule.refill_rate(),
                        "cost": rule.cost(),
                        "enabled": rule.enabled(),
                        "ttl_seconds": rule.ttl_seconds(),
                    })
                })
                .collect();
            json!({ "valid": true, "file": file, "rules": rules })
        }
        Err(problem) => json!({
            "valid": false,
            "file": file,
            "error": problem.message,
            "rule": problem.rule,
            "field": problem.field.map(RuleField::as_str),
        }),
    }
}

/// An error for humans: one line for stderr.
pub(crate) fn error_human(err: &CliError) -> String {
    match err.kind {
        crate::error::ErrorKind::Redis => format!("ratelimit: redis error: {}\n", err.message),
        _ => format!("ratelimit: error: {}\n", err.message),
    }
}

/// An error as one JSON object, for stdout under `--json`.
pub(crate) fn error_json(err: &CliError) -> Value {
    json!({
        "error": {
            "kind": err.kind.as_str(),
            "code": err.code.map(|code| code.as_str()),
            "message": err.message,
            "exit_code": err.exit().code(),
        }
    })
}

/// `text` with every secret replaced by `***`: the last line of defence against a password
/// reaching a terminal or a log.
pub(crate) fn scrub(text: &str, secrets: &[String]) -> String {
    secrets
        .iter()
        .filter(|secret| !secret.is_empty())
        .fold(text.to_owned(), |text, secret| {
            text.replace(secret.as_str(), "***")
        })
}

/// The password of a `scheme://user:password@host…` URL, if it has one.
pub(crate) fn url_password(url: &str) -> Option<&str> {
    let rest = &url[url.find("://")? + 3..];
    // The last '@' ends the user info, even when an unencoded password holds '/', '?' or '#'.
    let userinfo = &rest[..rest.rfind('@')?];
    let (_, password) = userinfo.split_once(':')?;
    (!password.is_empty()).then_some(password)
}

#[cfg(test)]
mod tests {
    use ratelimit_domain::{BucketDecision, RateLimitScope};

    use super::*;

    fn rule() -> RateLimitRule {
        RateLimitRule::new(RateLimitScope::Ip, 5, 5.0).unwrap()
    }

    fn target() -> Target {
        Target {
            endpoint: "POST /login".to_owned(),
            identifier: Some("1.2.3.4".to_owned()),
            key: "rate_limit:ip:1.2.3.4:POST /login".to_owned(),
        }
    }

    fn check(allowed: bool, retry_after: Duration, remaining: u64, cost: u64) -> Report {
        let decision = BucketDecision {
            allowed,
            retry_after,
            remaining,
        };
        Report::Check(CheckReport {
            target: target(),
            cost,
            result: RateLimitResult::from_decisions(
                [&ratelimit_domain::Limit::implicit("POST /x", rule())],
                &[decision],
            ),
        })
    }

    #[test]
    fn waits_are_rounded_up_for_humans() {
        assert_eq!(
            format_wait(Duration::from_millis(11_800)),
            "11.8 s (12 s rounded up)"
        );
        assert_eq!(
            format_wait(Duration::from_millis(11_801)),
            "11.9 s (12 s rounded up)"
        );
        assert_eq!(
            format_wait(Duration::from_millis(10)),
            "0.1 s (1 s rounded up)"
        );
        assert_eq!(format_wait(Duration::from_secs(12)), "12 s");
        assert_eq!(format_wait(Duration::from_millis(11_960)), "12 s");
    }

    #[test]
    fn allowed_and_denied_checks_read_well() {
        let allowed = check(true, Duration::ZERO, 4, 1);
        assert_eq!(allowed.human(), "allowed: 4 of 5 tokens left\n");
        assert_eq!(allowed.exit(), Exit::Success);
        assert_eq!(
            check(true, Duration::ZERO, 2, 2).human(),
            "allowed: 2 of 5 tokens left (cost 2)\n"
        );

        let denied = check(false, Duration::from_millis(11_800), 0, 1);
        assert_eq!(
            denied.human(),
            "denied: retry after 11.8 s (12 s rounded up); 0 of 5 tokens left\n"
        );
        assert_eq!(denied.exit(), Exit::Denied);

        let never = check(false, BucketDecision::NEVER, 5, 9);
        assert_eq!(
            never.human(),
            "denied: a cost of 9 is more than the bucket holds (5 tokens); waiting will not help\n"
        );
    }

    #[test]
    fn check_json_mirrors_the_result() {
        let denied = check(false, Duration::from_millis(11_800), 0, 1).json();
        assert_eq!(
            denied,
            json!({
                "endpoint": "POST /login",
                "identifier": "1.2.3.4",
                "allowed": false,
                "retry_after": 11.8,
                "remaining": 0,
                "limit": 5,
                "reset_seconds": 120,
                "source": "store",
                "cost": 1,
            })
        );
        let never = check(false, BucketDecision::NEVER, 5, 9).json();
        assert_eq!(never["retry_after"], Value::Null);
        assert_eq!(check(true, Duration::ZERO, 4, 1).json()["retry_after"], 0.0);
    }

    #[test]
    fn disabled_rules_say_so() {
        let report = Report::Check(CheckReport {
            target: target(),
            cost: 1,
            result: RateLimitResult::disabled([&ratelimit_domain::Limit::implicit(
                "POST /x",
                rule(),
            )]),
        });
        assert_eq!(
            report.human(),
            "allowed: the rule for POST /login is disabled, nothing is limited or counted\n"
        );
        assert_eq!(report.json()["source"], "rule_disabled");

        let remaining = Report::Remaining(RemainingReport {
            target: target(),
            remaining: 5,
            limit: 5,
            enabled: false,
        });
        assert_eq!(
            remaining.human(),
            "remaining: 5 of 5 tokens left (nothing consumed); the rule is disabled, nothing is limited\n  key: rate_limit:ip:1.2.3.4:POST /login\n"
        );
    }

    #[test]
    fn remaining_and_reset_read_well() {
        let remaining = Report::Remaining(RemainingReport {
            target: target(),
            remaining: 1,
            limit: 1,
            enabled: true,
        });
        assert_eq!(
            remaining.human(),
            "remaining: 1 of 1 token left (nothing consumed)\n  key: rate_limit:ip:1.2.3.4:POST /login\n"
        );
        assert_eq!(
            remaining.json(),
            json!({"endpoint": "POST /login", "identifier": "1.2.3.4", "key": "rate_limit:ip:1.2.3.4:POST /login", "remaining": 1, "limit": 1, "enabled": true})
        );

        let global = Target {
            endpoint: "GET /x".to_owned(),
            identifier: None,
            key: "rate_limit:global:GET /x".to_owned(),
        };
        let reset = Report::Reset(ResetReport {
            target: global.clone(),
            limit: 5,
            existed: true,
        });
        assert_eq!(
            reset.human(),
            "reset: the bucket of everyone on GET /x (global) is full again (5 of 5 tokens left)\n  key: rate_limit:global:GET /x\n"
        );
        assert_eq!(reset.json()["identifier"], Value::Null);
        assert_eq!(reset.json()["existed"], true);
        assert_eq!(reset.json()["key"], "rate_limit:global:GET /x");
        assert_eq!(reset.exit(), Exit::Success);

        // Nothing to reset: still done (exit 0), but said, with what to check.
        let nothing = Report::Reset(ResetReport {
            target: target(),
            limit: 5,
            existed: false,
        });
        let human = nothing.human();
        assert!(
            human.starts_with(
                "reset: there was no bucket to reset for 1.2.3.4 on POST /login (it is full: 5 of 5 tokens left)\n  key: rate_limit:ip:1.2.3.4:POST /login\n"
            ),
            "{human}"
        );
        for hint in ["endpoint", "identifier", "--ipv6-prefix", "--key-prefix"] {
            assert!(human.contains(hint), "{human}");
        }
        assert!(!human.contains("full again"), "{human}");
        assert_eq!(nothing.json()["existed"], false);
        assert_eq!(nothing.json()["reset"], true);
        assert_eq!(nothing.exit(), Exit::Success);
    }

    #[test]
    fn rules_reports_list_rules_or_the_problem() {
        let good = Report::Rules(RulesReport {
            file: PathBuf::from("rules.toml"),
            outcome: Ok(vec![("POST /login".to_owned(), rule())]),
        });
        assert_eq!(
            good.human(),
            "valid: rules.toml has 1 rule\n  POST /login: scope=ip max_tokens=5 refill_rate=5/min cost=1 enabled=true ttl=120s\n"
        );
        assert_eq!(good.json()["rules"][0]["ttl_seconds"], 120);
        assert_eq!(good.exit(), Exit::Success);

        let bad = Report::Rules(RulesReport {
            file: PathBuf::from("rules.toml"),
            outcome: Err(RulesProblem {
                message: "rule \"GET /x\", field cost: must be at least 1, got 0".to_owned(),
                rule: Some("GET /x".to_owned()),
                field: Some(RuleField::Cost),
            }),
        });
        assert_eq!(bad.exit(), Exit::Usage);
        assert_eq!(bad.json()["valid"], false);
        assert_eq!(bad.json()["field"], "cost");
        assert!(
            bad.human()
                .starts_with("invalid: rule \"GET /x\", field cost")
        );
    }

    #[test]
    fn errors_render_for_humans_and_scripts() {
        let err = CliError::redis("cannot reach Redis");
        assert_eq!(
            error_human(&err),
            "ratelimit: redis error: cannot reach Redis\n"
        );
        assert_eq!(error_json(&err)["error"]["exit_code"], 3);
        assert_eq!(
            error_human(&CliError::usage("no rules file")),
            "ratelimit: error: no rules file\n"
        );
    }

    #[test]
    fn passwords_are_found_and_scrubbed() {
        assert_eq!(url_password("redis://u:s3cret@h:1/0"), Some("s3cret"));
        assert_eq!(url_password("rediss://:s3cret@h"), Some("s3cret"));
        assert_eq!(url_password("redis://u@h"), None);
        assert_eq!(url_password("redis://h:6379"), None);
        assert_eq!(url_password("redis://u:pa/ss@h:1/0"), Some("pa/ss"));
        assert_eq!(url_password("nonsense"), None);
        assert_eq!(
            scrub("a s3cret b s3cret", &["s3cret".to_owned(), String::new()]),
            "a *** b ***"
        );
    }
}
