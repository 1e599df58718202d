//! What the commands print: reports, rendered for humans or as one JSON object.
//!
//! An endpoint of the single-limit form (one rule, its limit named after the endpoint) prints
//! the one-line reports it always had; an endpoint with several named limits prints a line for
//! the whole, then one per limit. JSON has the same fields in both forms, plus `limits`: one
//! object per limit.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use ratelimit_config::RuleField;
use ratelimit_domain::{DecisionSource, EndpointLimits, RateLimitResult, RateLimitScope};
use serde_json::{Value, json};

use crate::error::{CliError, Exit};

/// Which buckets a report is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    /// The endpoint, as named in the rules file.
    pub(crate) endpoint: String,
    /// Whose buckets, as the service writes it (an `ip` limit's address grouped like the
    /// service's); `None` when no limit concerned needs one (global scope), whose buckets
    /// belong to nobody.
    pub(crate) identifier: Option<String>,
    /// Whether the endpoint has the single-limit form (one rule, its limit named after the
    /// endpoint): its reports keep their one-line shape.
    pub(crate) single: bool,
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

/// One limit of the endpoint, with what a command found or did.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LimitState {
    /// The limit's name (the endpoint, in the single-limit form).
    pub(crate) name: String,
    /// Whose requests share its bucket.
    pub(crate) scope: RateLimitScope,
    /// Its bucket's key (without the store's suffixes `:tokens`, `:time`, `:tb`); `None`
    /// when it was not needed and could not be built (no identifier).
    pub(crate) key: Option<String>,
    /// Its capacity (`max_tokens`).
    pub(crate) capacity: u64,
    /// The tokens a request takes from it: `--cost`, or the limit's own `cost`.
    pub(crate) cost: u64,
    /// Whole tokens left.
    pub(crate) remaining: u64,
    /// `check`: whether it had the request's tokens. `remaining`: whether it has them now.
    pub(crate) allowed: bool,
    /// `check`: how long until it has the tokens, at full precision (zero when it had them).
    /// `remaining`: an upper bound, in whole seconds. [`RateLimitResult::RETRY_NEVER`] when
    /// the cost exceeds the capacity.
    pub(crate) retry_after: Duration,
}

impl LimitState {
    fn never(&self) -> bool {
        self.retry_after == RateLimitResult::RETRY_NEVER
    }

    /// `"per-client (ip)"`.
    fn label(&self) -> String {
        format!("{} ({})", self.name, self.scope)
    }

    fn json(&self) -> Value {
        json!({
            "name": self.name,
            "scope": self.scope.as_str(),
            "key": self.key,
            "limit": self.capacity,
            "cost": self.cost,
            "remaining": self.remaining,
            "allowed": self.allowed,
            "retry_after": wait_json(self.retry_after),
        })
    }
}

/// The outcome of `check`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CheckReport {
    /// The buckets.
    pub(crate) target: Target,
    /// Tokens the check asked of every limit: `--cost`, or the limits' common `cost`; `None`
    /// when the limits' costs differ (each limit says its own).
    pub(crate) cost: Option<u64>,
    /// The limiter's answer; its top-level numbers describe the deciding limit.
    pub(crate) result: RateLimitResult,
    /// Every limit consulted, in the endpoint's order.
    pub(crate) limits: Vec<LimitState>,
}

/// The outcome of `remaining`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RemainingReport {
    /// The buckets.
    pub(crate) target: Target,
    /// The limiter's reading; its top-level numbers describe the tightest limit (the one
    /// that would refuse, or the one with the fewest tokens left).
    pub(crate) result: RateLimitResult,
    /// Every limit, in the endpoint's order.
    pub(crate) limits: Vec<LimitState>,
    /// Whether the endpoint is enabled.
    pub(crate) enabled: bool,
}

/// The outcome of `reset`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ResetReport {
    /// The buckets.
    pub(crate) target: Target,
    /// The limits whose buckets were reset (full again), in the endpoint's order.
    pub(crate) reset: Vec<LimitState>,
    /// The global limits left alone because none was named with `--limit`.
    pub(crate) not_reset: Vec<LimitState>,
    /// Whether there was any bucket to reset; a missing one is already full, or is not the
    /// service's (another endpoint, identifier, grouping, key prefix or database).
    pub(crate) existed: bool,
}

/// The outcome of `rules check`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RulesReport {
    /// The file checked.
    pub(crate) file: PathBuf,
    /// Its rules, sorted by endpoint, or what is wrong with it.
    pub(crate) outcome: Result<Vec<(String, EndpointLimits)>, RulesProblem>,
}

/// What is wrong with a rules file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RulesProblem {
    /// The message, naming rule, limit, field and reason.
    pub(crate) message: String,
    /// The rule at fault, when one is.
    pub(crate) rule: Option<String>,
    /// The member of the rule's `limits` at fault (its index, and its name when it has
    /// one), when one is.
    pub(crate) limit: Option<(usize, Option<String>)>,
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
            Self::Check(check) if check.target.single => check_line(check),
            Self::Check(check) => check_lines(check),
            Self::Remaining(remaining) if remaining.target.single => remaining_line(remaining),
            Self::Remaining(remaining) => remaining_lines(remaining),
            Self::Reset(reset) if reset.target.single && reset.reset.len() == 1 => {
                reset_lines(reset)
            }
            Self::Reset(reset) => reset_limits_lines(reset),
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
                    "retry_after": wait_json(result.retry_after),
                    "remaining": result.remaining,
                    "limit": result.limit,
                    "reset_seconds": result.reset_seconds,
                    "source": result.source.as_str(),
                    "cost": check.cost,
                    "refused_by": result.refused().map(|l| &*l.name).collect::<Vec<_>>(),
                    "limits": check.limits.iter().map(LimitState::json).collect::<Vec<_>>(),
                })
            }
            Self::Remaining(remaining) => {
                let deciding = remaining
                    .result
                    .deciding()
                    .and_then(|d| remaining.limits.iter().find(|l| *l.name == *d.name));
                json!({
                    "endpoint": remaining.target.endpoint,
                    "identifier": remaining.target.identifier,
                    "key": deciding.and_then(|l| l.key.clone()),
                    "remaining": remaining.result.remaining,
                    "limit": remaining.result.limit,
                    "enabled": remaining.enabled,
                    "limits": remaining.limits.iter().map(LimitState::json).collect::<Vec<_>>(),
                })
            }
            Self::Reset(reset) => {
                let mut object = json!({
                    "endpoint": reset.target.endpoint,
                    "identifier": reset.target.identifier,
                    "reset": true,
                    "existed": reset.existed,
                    "limits": reset.reset.iter().map(LimitState::json).collect::<Vec<_>>(),
                    "not_reset": reset.not_reset.iter().map(LimitState::json).collect::<Vec<_>>(),
                });
                // One bucket reset: the fields the single-limit form always had.
                if let ([one], Value::Object(map)) = (&reset.reset[..], &mut object) {
                    map.insert("key".to_owned(), json!(one.key));
                    map.insert("remaining".to_owned(), json!(one.capacity));
                    map.insert("limit".to_owned(), json!(one.capacity));
                }
                object
            }
            Self::Rules(rules) => rules_json(rules),
        }
    }
}

/// A wait in seconds at full precision: 0 when allowed, `null` when never.
fn wait_json(wait: Duration) -> Value {
    if wait == RateLimitResult::RETRY_NEVER {
        Value::Null
    } else {
        json!(wait.as_secs_f64())
    }
}

fn plural(n: u64) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// `"4 of 5 tokens left"`.
fn tokens_left(remaining: u64, limit: u64) -> String {
    format!("{remaining} of {limit} token{} left", plural(limit))
}

/// `" (cost 3)"`, or nothing for a cost of 1.
fn cost_note(cost: u64) -> String {
    if cost == 1 {
        String::new()
    } else {
        format!(" (cost {cost})")
    }
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

/// `check` of a single-limit endpoint: one line.
fn check_line(check: &CheckReport) -> String {
    let result = &check.result;
    let cost = check.cost.unwrap_or(1);
    let note = cost_note(cost);
    match (result.allowed, result.source) {
        (true, DecisionSource::RuleDisabled) => format!(
            "allowed: the rule for {} is disabled, nothing is limited or counted",
            check.target.endpoint
        ),
        (true, _) => format!(
            "allowed: {}{note}",
            tokens_left(result.remaining, result.limit)
        ),
        (false, _) if result.retry_never() => format!(
            "denied: a cost of {cost} is more than the bucket holds ({} token{}); waiting will not help",
            result.limit,
            plural(result.limit)
        ),
        (false, _) => format!(
            "denied: retry after {}; {}{note}",
            format_wait(result.retry_after),
            tokens_left(result.remaining, result.limit)
        ),
    }
}

/// `check` of an endpoint with several limits: the decision, then one line per limit.
fn check_lines(check: &CheckReport) -> String {
    let result = &check.result;
    let note = check.cost.map(cost_note).unwrap_or_default();
    let mut out = match (result.allowed, result.source) {
        (true, DecisionSource::RuleDisabled) => {
            return format!(
                "allowed: the rule for {} is disabled, nothing is limited or counted",
                check.target.endpoint
            );
        }
        (true, _) => format!("allowed: every limit had the tokens, each took its cost{note}"),
        (false, _) => {
            let refused: Vec<String> = result
                .refused()
                .map(|limit| limit.name.to_string())
                .collect();
            let wait = if result.retry_never() {
                "waiting will not help".to_owned()
            } else {
                format!("retry after {}", format_wait(result.retry_after))
            };
            format!(
                "denied by {}: {wait}; no limit took anything{note}",
                refused.join(", ")
            )
        }
    };
    out.push('\n');
    for limit in &check.limits {
        let cost = if check.cost.is_none() {
            cost_note(limit.cost)
        } else {
            String::new()
        };
        let state = match (result.allowed, limit.allowed) {
            (true, _) => tokens_left(limit.remaining, limit.capacity),
            (false, true) => format!(
                "had the tokens; {}",
                tokens_left(limit.remaining, limit.capacity)
            ),
            (false, false) if limit.never() => format!(
                "refused: a cost of {} is more than it holds ({} token{}); waiting will not help",
                limit.cost,
                limit.capacity,
                plural(limit.capacity)
            ),
            (false, false) => format!(
                "refused: retry after {}; {}",
                format_wait(limit.retry_after),
                tokens_left(limit.remaining, limit.capacity)
            ),
        };
        // Writing to a String cannot fail.
        let _ = writeln!(out, "  {}: {state}{cost}", limit.label());
    }
    out
}

/// `remaining` of a single-limit endpoint: the line and the key.
fn remaining_line(report: &RemainingReport) -> String {
    let result = &report.result;
    let mut line = format!(
        "remaining: {} (nothing consumed)",
        tokens_left(result.remaining, result.limit)
    );
    if !report.enabled {
        line.push_str("; the rule is disabled, nothing is limited");
    }
    if let Some(key) = report.limits.first().and_then(|l| l.key.as_deref()) {
        // Writing to a String cannot fail.
        let _ = write!(line, "\n  key: {key}");
    }
    line
}

/// `remaining` of an endpoint with several limits: would a request pass, then each limit
/// with its key.
fn remaining_lines(report: &RemainingReport) -> String {
    let mut out = if !report.enabled {
        "remaining: the rule is disabled, nothing is limited or counted (nothing consumed)"
            .to_owned()
    } else {
        let short: Vec<&str> = report
            .limits
            .iter()
            .filter(|l| !l.allowed)
            .map(|l| l.name.as_str())
            .collect();
        if short.is_empty() {
            "remaining: a request would be allowed (nothing consumed)".to_owned()
        } else {
            format!(
                "remaining: a request would be refused by {} (nothing consumed)",
                short.join(", ")
            )
        }
    };
    out.push('\n');
    for limit in &report.limits {
        let mut state = tokens_left(limit.remaining, limit.capacity);
        if report.enabled && !limit.allowed {
            if limit.never() {
                let _ = write!(state, "; a cost of {} is more than it holds", limit.cost);
            } else {
                let _ = write!(
                    state,
                    "; short of its cost of {}, for at most {}",
                    limit.cost,
                    format_wait(limit.retry_after)
                );
            }
        }
        // Writing to a String cannot fail.
        let _ = writeln!(out, "  {}: {state}", limit.label());
        if let Some(key) = &limit.key {
            let _ = writeln!(out, "    key: {key}");
        }
    }
    out
}

/// What to check when there was no bucket under the key(s).
const NOT_FOUND_HINT: &str = "Either it was already full (a bucket is dropped once it \
    refills), or the service keeps this client's bucket under another key: check the endpoint, \
    the identifier, --ipv6-prefix/--ipv4-prefix (ip rules), --key-prefix, --layout and the Redis \
    database.";

/// `reset` of the one limit of a single-limit endpoint.
fn reset_lines(reset: &ResetReport) -> String {
    let (capacity, key) = reset
        .reset
        .first()
        .map(|l| (l.capacity, l.key.clone().unwrap_or_default()))
        .unwrap_or_default();
    let full = tokens_left(capacity, capacity);
    if reset.existed {
        format!(
            "reset: the bucket of {} is full again ({full})\n  key: {key}",
            reset.target.describe(),
        )
    } else {
        format!(
            "reset: there was no bucket to reset for {} (it is full: {full})\n  key: {key}\n  \
             {NOT_FOUND_HINT}",
            reset.target.describe(),
        )
    }
}

/// `reset` of an endpoint with several limits, or of limits named with `--limit`: a line,
/// then each bucket reset with its key, then the global limits left alone.
fn reset_limits_lines(reset: &ResetReport) -> String {
    let who = reset.target.describe();
    let (buckets, are, were, they) = if reset.reset.len() == 1 {
        ("bucket", "is", "was", "it is")
    } else {
        ("buckets", "are", "were", "they are")
    };
    let mut out = if reset.existed {
        format!("reset: the {buckets} of {who} {are} full again\n")
    } else {
        format!("reset: there {were} no {buckets} to reset for {who} ({they} full)\n")
    };
    for limit in &reset.reset {
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "  {}: {}",
            limit.label(),
            tokens_left(limit.capacity, limit.capacity)
        );
        if let Some(key) = &limit.key {
            let _ = writeln!(out, "    key: {key}");
        }
    }
    for limit in &reset.not_reset {
        let _ = writeln!(
            out,
            "  not reset: {}, shared by every client; reset it with --limit {}",
            limit.label(),
            limit.name
        );
    }
    if !reset.existed {
        let _ = writeln!(out, "  {NOT_FOUND_HINT}");
    }
    out
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
            for (endpoint, limits) in rules {
                // Writing to a String cannot fail.
                if limits.is_single() {
                    let rule = limits.first().rule();
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
                    continue;
                }
                let count = limits.limits().len();
                let _ = writeln!(
                    out,
                    "  {endpoint}: {count} limit{}, all or nothing, enabled={}",
                    plural(u64::try_from(count).unwrap_or(u64::MAX)),
                    limits.enabled()
                );
                for limit in limits.limits() {
                    let rule = limit.rule();
                    let _ = writeln!(
                        out,
                        "    {}: scope={} max_tokens={} refill_rate={}/min cost={} ttl={}s",
                        limit.name(),
                        rule.scope(),
                        rule.max_tokens(),
                        rule.refill_rate(),
                        rule.cost(),
                        rule.ttl_seconds()
                    );
                }
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
                .map(|(endpoint, limits)| {
                    let members: Vec<Value> = limits
                        .limits()
                        .iter()
                        .map(|limit| {
                            let rule = limit.rule();
                            json!({
                                "name": limit.name(),
                                "scope": rule.scope().as_str(),
                                "max_tokens": rule.max_tokens(),
                                "refill_rate": rule.refill_rate(),
                                "cost": rule.cost(),
                                "ttl_seconds": rule.ttl_seconds(),
                            })
                        })
                        .collect();
                    if limits.is_single() {
                        // The single-limit form's fields, as they always were, plus `limits`.
                        let rule = limits.first().rule();
                        json!({
                            "endpoint": endpoint,
                            "scope": rule.scope().as_str(),
                            "max_tokens": rule.max_tokens(),
                            "refill_rate": rule.refill_rate(),
                            "cost": rule.cost(),
                            "enabled": rule.enabled(),
                            "ttl_seconds": rule.ttl_seconds(),
                            "limits": members,
                        })
                    } else {
                        json!({
                            "endpoint": endpoint,
                            "enabled": limits.enabled(),
                            "limits": members,
                        })
                    }
                })
                .collect();
            json!({ "valid": true, "file": file, "rules": rules })
        }
        Err(problem) => json!({
            "valid": false,
            "file": file,
            "error": problem.message,
            "rule": problem.rule,
            "limit": problem.limit.as_ref().and_then(|(_, name)| name.clone()),
            "limit_index": problem.limit.as_ref().map(|(index, _)| *index),
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
    use ratelimit_domain::{
        BucketDecision, Limit, LimitOutcome, Limits, RateLimitRule, RateLimitScope,
    };

    use super::*;

    fn rule() -> RateLimitRule {
        RateLimitRule::new(RateLimitScope::Ip, 5, 5.0).unwrap()
    }

    const KEY: &str = "rate_limit:ip:1.2.3.4:POST /login";

    fn target() -> Target {
        Target {
            endpoint: "POST /login".to_owned(),
            identifier: Some("1.2.3.4".to_owned()),
            single: true,
        }
    }

    /// What the commands build for each outcome: its key and cost.
    fn states(result: &RateLimitResult, keys: &[&str], cost: u64) -> Vec<LimitState> {
        result
            .limits
            .iter()
            .zip(keys)
            .map(|(outcome, key)| LimitState {
                name: outcome.name.to_string(),
                scope: outcome.scope,
                key: Some((*key).to_owned()),
                capacity: outcome.limit,
                cost,
                remaining: outcome.remaining,
                allowed: outcome.allowed,
                retry_after: outcome.retry_after,
            })
            .collect()
    }

    fn check(allowed: bool, retry_after: Duration, remaining: u64, cost: u64) -> Report {
        let decision = BucketDecision {
            allowed,
            retry_after,
            remaining,
        };
        let result =
            RateLimitResult::from_decisions([&Limit::implicit("POST /login", rule())], &[decision]);
        Report::Check(CheckReport {
            target: target(),
            cost: Some(cost),
            limits: states(&result, &[KEY], cost),
            result,
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
                "refused_by": ["POST /login"],
                "limits": [{
                    "name": "POST /login",
                    "scope": "ip",
                    "key": KEY,
                    "limit": 5,
                    "cost": 1,
                    "remaining": 0,
                    "allowed": false,
                    "retry_after": 11.8,
                }],
            })
        );
        let never = check(false, BucketDecision::NEVER, 5, 9).json();
        assert_eq!(never["retry_after"], Value::Null);
        assert_eq!(never["limits"][0]["retry_after"], Value::Null);
        let allowed = check(true, Duration::ZERO, 4, 1).json();
        assert_eq!(allowed["retry_after"], 0.0);
        assert_eq!(allowed["refused_by"], json!([]));
    }

    fn search_limits() -> [Limit; 2] {
        [
            Limit::named(
                "per-client",
                RateLimitRule::new(RateLimitScope::Ip, 10, 10.0).unwrap(),
            )
            .unwrap(),
            Limit::named(
                "everyone",
                RateLimitRule::new(RateLimitScope::Global, 15, 15.0).unwrap(),
            )
            .unwrap(),
        ]
    }

    const SEARCH_KEYS: [&str; 2] = [
        "rate_limit:ip#per-client:1.2.3.4:GET /search",
        "rate_limit:global#everyone:GET /search",
    ];

    fn search_target() -> Target {
        Target {
            endpoint: "GET /search".to_owned(),
            identifier: Some("1.2.3.4".to_owned()),
            single: false,
        }
    }

    fn search_check(decisions: [BucketDecision; 2], cost: u64) -> Report {
        let limits = search_limits();
        let result = RateLimitResult::from_decisions(&limits, &decisions);
        Report::Check(CheckReport {
            target: search_target(),
            cost: Some(cost),
            limits: states(&result, &SEARCH_KEYS, cost),
            result,
        })
    }

    fn decision(allowed: bool, retry_after: Duration, remaining: u64) -> BucketDecision {
        BucketDecision {
            allowed,
            retry_after,
            remaining,
        }
    }

    #[test]
    fn checks_of_several_limits_show_every_limit_and_who_refused() {
        let allowed = search_check(
            [
                decision(true, Duration::ZERO, 9),
                decision(true, Duration::ZERO, 14),
            ],
            1,
        );
        assert_eq!(
            allowed.human(),
            "allowed: every limit had the tokens, each took its cost\n  \
             per-client (ip): 9 of 10 tokens left\n  \
             everyone (global): 14 of 15 tokens left\n"
        );
        assert_eq!(allowed.exit(), Exit::Success);
        let json = allowed.json();
        assert_eq!(
            (json["remaining"].clone(), json["limit"].clone()),
            (9.into(), 10.into())
        );
        assert_eq!(json["refused_by"], json!([]));
        assert_eq!(json["limits"][1]["key"], SEARCH_KEYS[1]);
        assert_eq!(json["limits"][1]["scope"], "global");

        let denied = search_check(
            [
                decision(true, Duration::ZERO, 10),
                decision(false, Duration::from_secs(4), 0),
            ],
            1,
        );
        assert_eq!(
            denied.human(),
            "denied by everyone: retry after 4 s; no limit took anything\n  \
             per-client (ip): had the tokens; 10 of 10 tokens left\n  \
             everyone (global): refused: retry after 4 s; 0 of 15 tokens left\n"
        );
        assert_eq!(denied.exit(), Exit::Denied);
        let json = denied.json();
        assert_eq!(json["refused_by"], json!(["everyone"]));
        assert_eq!(json["retry_after"], 4.0);
        assert_eq!(
            json["limits"],
            json!([
                {"name": "per-client", "scope": "ip", "key": SEARCH_KEYS[0], "limit": 10,
                 "cost": 1, "remaining": 10, "allowed": true, "retry_after": 0.0},
                {"name": "everyone", "scope": "global", "key": SEARCH_KEYS[1], "limit": 15,
                 "cost": 1, "remaining": 0, "allowed": false, "retry_after": 4.0},
            ])
        );

        let never = search_check(
            [
                decision(false, BucketDecision::NEVER, 10),
                decision(true, Duration::ZERO, 15),
            ],
            12,
        );
        assert_eq!(
            never.human(),
            "denied by per-client: waiting will not help; no limit took anything (cost 12)\n  \
             per-client (ip): refused: a cost of 12 is more than it holds (10 tokens); waiting \
             will not help\n  \
             everyone (global): had the tokens; 15 of 15 tokens left\n"
        );
        assert_eq!(never.json()["retry_after"], Value::Null);
    }

    #[test]
    fn disabled_rules_say_so() {
        let limit = Limit::implicit("POST /login", rule());
        let result = RateLimitResult::disabled([&limit]);
        let report = Report::Check(CheckReport {
            target: target(),
            cost: Some(1),
            limits: states(&result, &[KEY], 1),
            result: result.clone(),
        });
        assert_eq!(
            report.human(),
            "allowed: the rule for POST /login is disabled, nothing is limited or counted\n"
        );
        assert_eq!(report.json()["source"], "rule_disabled");

        let remaining = Report::Remaining(RemainingReport {
            target: target(),
            limits: states(&result, &[KEY], 1),
            result,
            enabled: false,
        });
        assert_eq!(
            remaining.human(),
            "remaining: 5 of 5 tokens left (nothing consumed); the rule is disabled, nothing is limited\n  key: rate_limit:ip:1.2.3.4:POST /login\n"
        );
    }

    fn one_left() -> RemainingReport {
        let limit = Limit::implicit(
            "POST /login",
            RateLimitRule::new(RateLimitScope::Ip, 1, 1.0).unwrap(),
        );
        let result = RateLimitResult::from_outcomes(
            Limits::one(LimitOutcome::from_decision(
                &limit,
                decision(true, Duration::ZERO, 1),
            )),
            DecisionSource::Store,
        );
        RemainingReport {
            target: target(),
            limits: states(&result, &[KEY], 1),
            result,
            enabled: true,
        }
    }

    #[test]
    fn remaining_and_reset_read_well() {
        let remaining = Report::Remaining(one_left());
        assert_eq!(
            remaining.human(),
            "remaining: 1 of 1 token left (nothing consumed)\n  key: rate_limit:ip:1.2.3.4:POST /login\n"
        );
        let json = remaining.json();
        assert_eq!(
            json,
            json!({"endpoint": "POST /login", "identifier": "1.2.3.4", "key": KEY,
                   "remaining": 1, "limit": 1, "enabled": true,
                   "limits": [{"name": "POST /login", "scope": "ip", "key": KEY, "limit": 1,
                               "cost": 1, "remaining": 1, "allowed": true, "retry_after": 0.0}]})
        );

        let global = Target {
            endpoint: "GET /x".to_owned(),
            identifier: None,
            single: true,
        };
        let full = |name: &str, scope: RateLimitScope, key: &str, capacity: u64| LimitState {
            name: name.to_owned(),
            scope,
            key: Some(key.to_owned()),
            capacity,
            cost: 1,
            remaining: capacity,
            allowed: true,
            retry_after: Duration::ZERO,
        };
        let reset = Report::Reset(ResetReport {
            target: global.clone(),
            reset: vec![full(
                "GET /x",
                RateLimitScope::Global,
                "rate_limit:global:GET /x",
                5,
            )],
            not_reset: Vec::new(),
            existed: true,
        });
        assert_eq!(
            reset.human(),
            "reset: the bucket of everyone on GET /x (global) is full again (5 of 5 tokens left)\n  key: rate_limit:global:GET /x\n"
        );
        assert_eq!(reset.json()["identifier"], Value::Null);
        assert_eq!(reset.json()["existed"], true);
        assert_eq!(reset.json()["key"], "rate_limit:global:GET /x");
        assert_eq!(reset.json()["remaining"], 5);
        assert_eq!(reset.exit(), Exit::Success);

        // Nothing to reset: still done (exit 0), but said, with what to check.
        let nothing = Report::Reset(ResetReport {
            target: target(),
            reset: vec![full("POST /login", RateLimitScope::Ip, KEY, 5)],
            not_reset: Vec::new(),
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

        // Several limits: each key reset, and the global limit left alone, said.
        let several = Report::Reset(ResetReport {
            target: search_target(),
            reset: vec![full("per-client", RateLimitScope::Ip, SEARCH_KEYS[0], 10)],
            not_reset: vec![full("everyone", RateLimitScope::Global, SEARCH_KEYS[1], 15)],
            existed: true,
        });
        assert_eq!(
            several.human(),
            "reset: the bucket of 1.2.3.4 on GET /search is full again\n  \
             per-client (ip): 10 of 10 tokens left\n    \
             key: rate_limit:ip#per-client:1.2.3.4:GET /search\n  \
             not reset: everyone (global), shared by every client; reset it with --limit everyone\n"
        );
        let json = several.json();
        assert_eq!(json["limits"][0]["key"], SEARCH_KEYS[0]);
        assert_eq!(json["not_reset"][0]["name"], "everyone");
        assert_eq!(json["key"], SEARCH_KEYS[0]);
    }

    #[test]
    fn remaining_of_several_limits_says_which_would_refuse() {
        let limits = search_limits();
        let mut outcomes: Vec<LimitOutcome> = limits
            .iter()
            .zip([3, 0])
            .map(|(limit, remaining)| {
                LimitOutcome::from_decision(limit, decision(true, Duration::ZERO, remaining))
            })
            .collect();
        outcomes[1].allowed = false;
        let result = RateLimitResult::from_outcomes(outcomes.into(), DecisionSource::Store);
        let mut shown = states(&result, &SEARCH_KEYS, 1);
        shown[1].retry_after = Duration::from_secs(4);
        let report = Report::Remaining(RemainingReport {
            target: search_target(),
            result,
            limits: shown,
            enabled: true,
        });
        assert_eq!(
            report.human(),
            "remaining: a request would be refused by everyone (nothing consumed)\n  \
             per-client (ip): 3 of 10 tokens left\n    \
             key: rate_limit:ip#per-client:1.2.3.4:GET /search\n  \
             everyone (global): 0 of 15 tokens left; short of its cost of 1, for at most 4 s\n    \
             key: rate_limit:global#everyone:GET /search\n"
        );
        let json = report.json();
        assert_eq!(
            (json["remaining"].clone(), json["limit"].clone()),
            (0.into(), 15.into())
        );
        assert_eq!(json["key"], SEARCH_KEYS[1]);
        assert_eq!(json["limits"][1]["allowed"], false);
        assert_eq!(json["limits"][1]["retry_after"], 4.0);

        let disabled = RateLimitResult::disabled(&limits);
        let report = Report::Remaining(RemainingReport {
            target: search_target(),
            limits: states(&disabled, &SEARCH_KEYS, 1),
            result: disabled,
            enabled: false,
        });
        assert_eq!(
            report.human(),
            "remaining: the rule is disabled, nothing is limited or counted (nothing consumed)\n  \
             per-client (ip): 10 of 10 tokens left\n    \
             key: rate_limit:ip#per-client:1.2.3.4:GET /search\n  \
             everyone (global): 15 of 15 tokens left\n    \
             key: rate_limit:global#everyone:GET /search\n"
        );
        assert_eq!(report.json()["enabled"], false);
    }

    #[test]
    fn rules_reports_list_rules_or_the_problem() {
        let good = Report::Rules(RulesReport {
            file: PathBuf::from("rules.toml"),
            outcome: Ok(vec![
                (
                    "GET /search".to_owned(),
                    EndpointLimits::new(search_limits().to_vec()).unwrap(),
                ),
                (
                    "POST /login".to_owned(),
                    EndpointLimits::single("POST /login", rule()),
                ),
            ]),
        });
        assert_eq!(
            good.human(),
            "valid: rules.toml has 2 rules\n  \
             GET /search: 2 limits, all or nothing, enabled=true\n    \
             per-client: scope=ip max_tokens=10 refill_rate=10/min cost=1 ttl=120s\n    \
             everyone: scope=global max_tokens=15 refill_rate=15/min cost=1 ttl=120s\n  \
             POST /login: scope=ip max_tokens=5 refill_rate=5/min cost=1 enabled=true ttl=120s\n"
        );
        let json = good.json();
        assert_eq!(json["rules"][1]["ttl_seconds"], 120);
        assert_eq!(json["rules"][1]["limits"][0]["name"], "POST /login");
        assert_eq!(json["rules"][0]["enabled"], true);
        assert_eq!(json["rules"][0]["limits"][1]["name"], "everyone");
        assert_eq!(json["rules"][0]["limits"][1]["scope"], "global");
        assert_eq!(good.exit(), Exit::Success);

        let bad = Report::Rules(RulesReport {
            file: PathBuf::from("rules.toml"),
            outcome: Err(RulesProblem {
                message: "rule \"GET /x\", field cost: must be at least 1, got 0".to_owned(),
                rule: Some("GET /x".to_owned()),
                limit: None,
                field: Some(RuleField::Cost),
            }),
        });
        assert_eq!(bad.exit(), Exit::Usage);
        assert_eq!(bad.json()["valid"], false);
        assert_eq!(bad.json()["field"], "cost");
        assert_eq!(bad.json()["limit"], Value::Null);
        assert!(
            bad.human()
                .starts_with("invalid: rule \"GET /x\", field cost")
        );
        let bad_limit = Report::Rules(RulesReport {
            file: PathBuf::from("rules.toml"),
            outcome: Err(RulesProblem {
                message: "…".to_owned(),
                rule: Some("GET /x".to_owned()),
                limit: Some((1, Some("everyone".to_owned()))),
                field: Some(RuleField::MaxTokens),
            }),
        });
        let json = bad_limit.json();
        assert_eq!(
            (
                json["limit"].clone(),
                json["limit_index"].clone(),
                json["field"].clone()
            ),
            ("everyone".into(), 1.into(), "max_tokens".into())
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
