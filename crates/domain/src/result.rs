//! What a check answers.

use std::time::Duration;

use crate::RateLimitRule;

/// A store's answer to one check-and-consume step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketDecision {
    /// Whether the cost was taken from the bucket.
    pub allowed: bool,
    /// How long until the cost will be available, at full precision; zero when allowed,
    /// [`BucketDecision::NEVER`] when the cost exceeds the bucket's capacity.
    pub retry_after: Duration,
    /// Whole tokens left after the step (floored).
    pub remaining: u64,
}

impl BucketDecision {
    /// The `retry_after` of a request that can never be allowed because it costs more than the
    /// bucket holds.
    pub const NEVER: Duration = Duration::MAX;

    /// Whether waiting will never help.
    pub fn is_never(&self) -> bool {
        self.retry_after == Self::NEVER
    }
}

/// Who made a decision: the bucket, or a policy that stood in for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DecisionSource {
    /// The store counted tokens and decided.
    Store,
    /// The store could not be asked (unreachable, slow, failing) and the request was allowed
    /// by the fail-open policy. The numbers are not real counts.
    FailOpen,
    /// The store could not be asked and the request was denied by the fail-closed policy.
    FailClosed,
    /// The store could not be asked and the request was decided by the in-process fallback
    /// store (the `local` policy): limits hold per host while the shared store is out.
    LocalFallback,
    /// No rule is configured for the endpoint; nothing is limited.
    NoRule,
    /// The endpoint's rule is disabled; nothing is limited.
    RuleDisabled,
}

impl DecisionSource {
    /// A short lower-case name for logs and metrics: `store`, `fail_open`, `no_rule`,
    /// `rule_disabled`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Store => "store",
            Self::FailOpen => "fail_open",
            Self::FailClosed => "fail_closed",
            Self::LocalFallback => "local_fallback",
            Self::NoRule => "no_rule",
            Self::RuleDisabled => "rule_disabled",
        }
    }
}

/// The answer to "may this request go ahead?".
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct RateLimitResult {
    /// Whether the request may go ahead.
    pub allowed: bool,
    /// How long the caller should wait before retrying, at full precision; zero when allowed.
    /// [`RateLimitResult::RETRY_NEVER`] when the request costs more than the bucket can ever
    /// hold.
    pub retry_after: Duration,
    /// Whole tokens left in the bucket.
    pub remaining: u64,
    /// The bucket's capacity (the rule's `max_tokens`; 0 when no rule applies).
    pub limit: u64,
    /// The rule's `ttl_seconds`: an upper bound on how long until an idle bucket is full and
    /// forgotten (0 when no rule applies or the rule is disabled).
    pub reset_seconds: u64,
    /// Who decided.
    pub source: DecisionSource,
}

impl RateLimitResult {
    /// The `retry_after` of a request that can never be allowed.
    pub const RETRY_NEVER: Duration = BucketDecision::NEVER;

    /// The result of a store's decision under `rule`.
    pub fn from_decision(decision: BucketDecision, rule: &RateLimitRule) -> Self {
        Self {
            allowed: decision.allowed,
            retry_after: if decision.allowed {
                Duration::ZERO
            } else {
                decision.retry_after
            },
            remaining: decision.remaining,
            limit: rule.max_tokens(),
            reset_seconds: rule.ttl_seconds(),
            source: DecisionSource::Store,
        }
    }

    /// No rule for the endpoint: allowed, nothing remaining, no limit.
    pub fn no_rule() -> Self {
        Self {
            allowed: true,
            retry_after: Duration::ZERO,
            remaining: 0,
            limit: 0,
            reset_seconds: 0,
            source: DecisionSource::NoRule,
        }
    }

    /// A disabled rule: allowed with the full bucket.
    pub fn disabled(rule: &RateLimitRule) -> Self {
        Self {
            allowed: true,
            retry_after: Duration::ZERO,
            remaining: rule.max_tokens(),
            limit: rule.max_tokens(),
            reset_seconds: 0,
            source: DecisionSource::RuleDisabled,
        }
    }

    /// The store failed: allowed as if the bucket were full, marked as a fail-open decision.
    pub fn fail_open(rule: &RateLimitRule) -> Self {
        Self {
            allowed: true,
            retry_after: Duration::ZERO,
            remaining: rule.max_tokens(),
            limit: rule.max_tokens(),
            reset_seconds: rule.ttl_seconds(),
            source: DecisionSource::FailOpen,
        }
    }

    /// The store failed and the policy is to deny: denied, retry after one token's time.
    pub fn fail_closed(rule: &RateLimitRule) -> Self {
        Self {
            allowed: false,
            retry_after: crate::token_bucket::seconds(rule.seconds_per_token()),
            remaining: 0,
            limit: rule.max_tokens(),
            reset_seconds: rule.ttl_seconds(),
            source: DecisionSource::FailClosed,
        }
    }

    /// The same result, attributed to another decider.
    #[must_use]
    pub fn with_source(mut self, source: DecisionSource) -> Self {
        self.source = source;
        self
    }

    /// Whether the decision came from a failure policy rather than from the shared store.
    pub fn is_degraded(&self) -> bool {
        matches!(
            self.source,
            DecisionSource::FailOpen | DecisionSource::FailClosed | DecisionSource::LocalFallback
        )
    }

    /// Whether waiting will never help.
    pub fn retry_never(&self) -> bool {
        self.retry_after == Self::RETRY_NEVER
    }

    /// `retry_after` in whole seconds, rounded up (for `Retry-After` headers); `None` when the
    /// request can never be allowed.
    pub fn retry_after_whole_seconds(&self) -> Option<u64> {
        if self.retry_never() {
            return None;
        }
        let secs = self.retry_after.as_secs();
        Some(if self.retry_after.subsec_nanos() > 0 {
            secs + 1
        } else {
            secs
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RateLimitScope;

    fn rule() -> RateLimitRule {
        RateLimitRule::new(RateLimitScope::Ip, 5, 5.0).unwrap()
    }

    #[test]
    fn decision_maps_onto_result() {
        let denied = BucketDecision {
            allowed: false,
            retry_after: Duration::from_millis(11_500),
            remaining: 0,
        };
        let result = RateLimitResult::from_decision(denied, &rule());
        assert!(!result.allowed);
        assert_eq!(result.retry_after, Duration::from_millis(11_500));
        assert_eq!(result.retry_after_whole_seconds(), Some(12));
        assert_eq!((result.limit, result.reset_seconds), (5, 120));
        assert_eq!(result.source, DecisionSource::Store);
    }

    #[test]
    fn policy_results_follow_the_specification() {
        let none = RateLimitResult::no_rule();
        assert!(none.allowed);
        assert_eq!((none.remaining, none.limit, none.reset_seconds), (0, 0, 0));

        let disabled = RateLimitResult::disabled(&rule());
        assert!(disabled.allowed);
        assert_eq!(
            (disabled.remaining, disabled.limit, disabled.reset_seconds),
            (5, 5, 0)
        );

        let open = RateLimitResult::fail_open(&rule());
        assert!(open.allowed);
        assert_eq!(
            (open.remaining, open.limit, open.reset_seconds),
            (5, 5, 120)
        );
        assert_eq!(open.source, DecisionSource::FailOpen);
    }

    #[test]
    fn never_has_no_whole_seconds() {
        let never = BucketDecision {
            allowed: false,
            retry_after: BucketDecision::NEVER,
            remaining: 3,
        };
        assert!(never.is_never());
        let result = RateLimitResult::from_decision(never, &rule());
        assert!(result.retry_never());
        assert_eq!(result.retry_after_whole_seconds(), None);
    }
}
