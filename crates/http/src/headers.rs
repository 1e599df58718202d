//! The rate-limit response headers.

use std::fmt::Write as _;

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue, RETRY_AFTER};
use ratelimit_adapter::{RateLimitResult, RateLimitRule};

/// `RateLimit-Policy` (IETF draft).
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit` (IETF draft).
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
/// `X-RateLimit-Limit` (conventional).
pub const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
/// `X-RateLimit-Remaining` (conventional).
pub const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
/// `X-RateLimit-Reset` (conventional).
pub const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// Which informational headers responses carry. `Retry-After` is sent on every 429 whose
/// wait is finite, whatever the style.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum HeaderStyle {
    /// The IETF draft's `RateLimit-Policy` and `RateLimit` **and** the conventional
    /// `X-RateLimit-*` headers (the default).
    #[default]
    Both,
    /// Only `RateLimit-Policy` and `RateLimit`.
    Ietf,
    /// Only `X-RateLimit-Limit`, `X-RateLimit-Remaining` and `X-RateLimit-Reset`.
    Legacy,
    /// No informational header.
    None,
}

impl HeaderStyle {
    fn ietf(self) -> bool {
        matches!(self, Self::Both | Self::Ietf)
    }

    fn legacy(self) -> bool {
        matches!(self, Self::Both | Self::Legacy)
    }
}

/// The numbers behind the headers of one decision of a token bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct HeaderNumbers {
    /// `q`: the quota, the bucket's capacity.
    pub quota: u64,
    /// `w`: the window, whole seconds an empty bucket takes to refill completely (rounded up).
    pub window: u64,
    /// `r`: whole tokens left.
    pub remaining: u64,
    /// `t`: whole seconds until the request's cost is available again, rounded up; `None`
    /// when it never will be (the cost exceeds the capacity).
    ///
    /// On a denial this is exactly `Retry-After`. On an allowed request it is 0 when the
    /// bucket still holds the cost, and otherwise an upper bound,
    /// `ceil((cost - remaining) × seconds_per_token)` (the fraction of a token already
    /// refilled is not reported by the store).
    pub reset: Option<u64>,
}

impl HeaderNumbers {
    /// The numbers of `result`, decided under `rule`.
    pub fn new(result: &RateLimitResult, rule: &RateLimitRule) -> Self {
        let reset = if result.allowed {
            let missing = rule.cost().saturating_sub(result.remaining);
            Some(ceil_seconds(missing as f64 * rule.seconds_per_token()))
        } else {
            result.retry_after_whole_seconds()
        };
        Self {
            quota: rule.max_tokens(),
            // As docs/http.md states it: ceil(max_tokens * 60 / refill_rate).
            window: ceil_seconds(rule.max_tokens() as f64 * 60.0 / rule.refill_rate()),
            remaining: result.remaining,
            reset,
        }
    }
}

/// `seconds` rounded up to a whole number, saturating (rule validation bounds these values
/// well below `u64::MAX`).
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // clamped first
fn ceil_seconds(seconds: f64) -> u64 {
    if seconds.is_nan() || seconds <= 0.0 {
        0
    } else if seconds >= u64::MAX as f64 {
        u64::MAX
    } else {
        seconds.ceil() as u64
    }
}

/// Writes `text` as a Structured Field string (RFC 8941 §3.3.3): in double quotes, with `"`
/// and `\` escaped by a backslash. Characters an sf-string cannot hold (control characters,
/// non-ASCII) and `%` itself are percent-encoded as their UTF-8 bytes (`%XX`).
///
/// ```
/// assert_eq!(ratelimit_http::sf_string("POST /api/v1/sessions"), r#""POST /api/v1/sessions""#);
/// assert_eq!(ratelimit_http::sf_string(r#"a"b\c"#), r#""a\"b\\c""#);
/// assert_eq!(ratelimit_http::sf_string("GET /café"), r#""GET /caf%C3%A9""#);
/// ```
pub fn sf_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    let mut buf = [0u8; 4];
    for c in text.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '%' => out.push_str("%25"),
            ' '..='~' => out.push(c),
            _ => {
                for byte in c.encode_utf8(&mut buf).bytes() {
                    // Writing to a String cannot fail.
                    let _ = write!(out, "%{byte:02X}");
                }
            }
        }
    }
    out.push('"');
    out
}

/// The headers of one decision: the informational ones of `style`, plus `Retry-After` on a
/// denial with a finite wait.
///
/// With policy `login` and a 5-token rule refilling 5 per minute, a denial gives:
///
/// ```text
/// RateLimit-Policy: "login";q=5;w=60
/// RateLimit: "login";r=0;t=12
/// X-RateLimit-Limit: 5
/// X-RateLimit-Remaining: 0
/// X-RateLimit-Reset: 12
/// Retry-After: 12
/// ```
///
/// When the wait is infinite (the cost exceeds the capacity), `Retry-After` and
/// `X-RateLimit-Reset` are left out and `RateLimit` has no `t` parameter.
pub fn rate_limit_headers(
    numbers: &HeaderNumbers,
    denied: bool,
    policy: &str,
    style: HeaderStyle,
) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let name = sf_string(policy);
    if style.ietf() {
        let policy_value = format!("{name};q={};w={}", numbers.quota, numbers.window);
        let mut limit_value = format!("{name};r={}", numbers.remaining);
        if let Some(reset) = numbers.reset {
            let _ = write!(limit_value, ";t={reset}");
        }
        // sf-strings and integers are visible ASCII, always valid header values.
        if let Ok(value) = HeaderValue::from_str(&policy_value) {
            headers.insert(RATELIMIT_POLICY, value);
        }
        if let Ok(value) = HeaderValue::from_str(&limit_value) {
            headers.insert(RATELIMIT, value);
        }
    }
    if style.legacy() {
        headers.insert(X_RATELIMIT_LIMIT, HeaderValue::from(numbers.quota));
        headers.insert(X_RATELIMIT_REMAINING, HeaderValue::from(numbers.remaining));
        if let Some(reset) = numbers.reset {
            headers.insert(X_RATELIMIT_RESET, HeaderValue::from(reset));
        }
    }
    if denied && let Some(reset) = numbers.reset {
        headers.insert(RETRY_AFTER, HeaderValue::from(reset));
    }
    headers
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ratelimit_adapter::{BucketDecision, RateLimitScope};

    use super::*;

    fn rule(max: u64, per_minute: f64) -> RateLimitRule {
        RateLimitRule::new(RateLimitScope::Ip, max, per_minute).unwrap()
    }

    fn result(
        allowed: bool,
        retry_after: Duration,
        remaining: u64,
        r: &RateLimitRule,
    ) -> RateLimitResult {
        RateLimitResult::from_decisions(
            [&ratelimit_adapter::Limit::implicit("GET /x", r.clone())],
            &[BucketDecision {
                allowed,
                retry_after,
                remaining,
            }],
        )
    }

    fn pairs(headers: &HeaderMap) -> Vec<(String, String)> {
        let mut pairs: Vec<_> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        pairs.sort();
        pairs
    }

    fn owned(expected: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut v: Vec<_> = expected
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn sf_strings_escape_what_they_must() {
        assert_eq!(sf_string("login"), "\"login\"");
        assert_eq!(sf_string("a\"b"), "\"a\\\"b\"");
        assert_eq!(sf_string("a\\b"), "\"a\\\\b\"");
        assert_eq!(sf_string("100%"), "\"100%25\"");
        assert_eq!(sf_string("tab\there"), "\"tab%09here\"");
        assert_eq!(sf_string("Zoë"), "\"Zo%C3%AB\"");
        assert_eq!(sf_string(""), "\"\"");
        assert_eq!(sf_string("GET /users/{id}"), "\"GET /users/{id}\"");
    }

    #[test]
    fn a_denial_has_every_header() {
        let r = rule(5, 5.0);
        let denied = result(false, Duration::from_millis(11_200), 0, &r);
        let numbers = HeaderNumbers::new(&denied, &r);
        assert_eq!(
            numbers,
            HeaderNumbers {
                quota: 5,
                window: 60,
                remaining: 0,
                reset: Some(12)
            }
        );
        let headers = rate_limit_headers(&numbers, true, "login", HeaderStyle::Both);
        assert_eq!(
            pairs(&headers),
            owned(&[
                ("ratelimit-policy", "\"login\";q=5;w=60"),
                ("ratelimit", "\"login\";r=0;t=12"),
                ("x-ratelimit-limit", "5"),
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset", "12"),
                ("retry-after", "12"),
            ])
        );
    }

    #[test]
    fn allowed_requests_report_zero_or_an_upper_bound() {
        let r = rule(5, 5.0);
        let numbers = HeaderNumbers::new(&result(true, Duration::ZERO, 4, &r), &r);
        assert_eq!((numbers.remaining, numbers.reset), (4, Some(0)));
        let numbers = HeaderNumbers::new(&result(true, Duration::ZERO, 0, &r), &r);
        assert_eq!((numbers.remaining, numbers.reset), (0, Some(12)));
        let headers = rate_limit_headers(&numbers, false, "login", HeaderStyle::Both);
        assert!(headers.get(RETRY_AFTER).is_none());
        assert_eq!(headers[RATELIMIT], "\"login\";r=0;t=12");

        // Cost 3, 1 token left, 7 tokens per minute: 2 × 8.57 s = 17.14 s → 18.
        let r = rule(10, 7.0).with_cost(3).unwrap();
        let numbers = HeaderNumbers::new(&result(true, Duration::ZERO, 1, &r), &r);
        assert_eq!(numbers.reset, Some(18));
        // 10 tokens at 7 per minute: 85.7 s → 86.
        assert_eq!(numbers.window, 86);
        // 15 tokens at 0.9 per minute is exactly 1000 s; a different operation order would
        // round 1000.0000000000001 up to 1001.
        let r = rule(15, 0.9);
        let numbers = HeaderNumbers::new(&result(true, Duration::ZERO, 15, &r), &r);
        assert_eq!(numbers.window, 1000);
    }

    #[test]
    fn whole_seconds_round_up() {
        let r = rule(5, 5.0);
        for (millis, secs) in [(1, 1), (999, 1), (1_000, 1), (1_001, 2), (12_000, 12)] {
            let denied = result(false, Duration::from_millis(millis), 0, &r);
            assert_eq!(
                HeaderNumbers::new(&denied, &r).reset,
                Some(secs),
                "{millis}"
            );
        }
    }

    #[test]
    fn never_has_no_reset_and_no_retry_after() {
        let r = rule(5, 5.0);
        let never = result(false, RateLimitResult::RETRY_NEVER, 5, &r);
        let numbers = HeaderNumbers::new(&never, &r);
        assert_eq!(numbers.reset, None);
        let headers = rate_limit_headers(&numbers, true, "big", HeaderStyle::Both);
        assert_eq!(
            pairs(&headers),
            owned(&[
                ("ratelimit-policy", "\"big\";q=5;w=60"),
                ("ratelimit", "\"big\";r=5"),
                ("x-ratelimit-limit", "5"),
                ("x-ratelimit-remaining", "5"),
            ])
        );
    }

    #[test]
    fn styles_select_headers() {
        let r = rule(5, 5.0);
        let numbers = HeaderNumbers::new(&result(false, Duration::from_secs(3), 0, &r), &r);
        let names = |style| {
            let mut names: Vec<_> = rate_limit_headers(&numbers, true, "p", style)
                .keys()
                .map(|k| k.to_string())
                .collect();
            names.sort();
            names
        };
        assert_eq!(
            names(HeaderStyle::Ietf),
            ["ratelimit", "ratelimit-policy", "retry-after"]
        );
        assert_eq!(
            names(HeaderStyle::Legacy),
            [
                "retry-after",
                "x-ratelimit-limit",
                "x-ratelimit-remaining",
                "x-ratelimit-reset"
            ]
        );
        assert_eq!(names(HeaderStyle::None), ["retry-after"]);
    }

    #[test]
    fn policy_names_are_escaped_in_headers() {
        let r = rule(2, 60.0);
        let numbers = HeaderNumbers::new(&result(true, Duration::ZERO, 1, &r), &r);
        let headers = rate_limit_headers(&numbers, false, "GET /a\"b", HeaderStyle::Ietf);
        assert_eq!(headers[RATELIMIT_POLICY], "\"GET /a\\\"b\";q=2;w=2");
        assert_eq!(headers[RATELIMIT], "\"GET /a\\\"b\";r=1;t=0");
    }
}
