//! What a check answers.

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use smallvec::SmallVec;

#[cfg(doc)]
use crate::RateLimitRule;
use crate::{Limit, RateLimitScope};

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

/// What one limit of a request said.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct LimitOutcome {
    /// The limit's name (the endpoint, for the single-limit form).
    pub name: Arc<str>,
    /// Whose requests share its bucket.
    pub scope: RateLimitScope,
    /// Its capacity (`max_tokens`).
    pub limit: u64,
    /// Its refill rate, tokens per minute.
    pub refill_rate: f64,
    /// Whole tokens left in its bucket: after this request's cost when the request was
    /// allowed, untouched otherwise.
    pub remaining: u64,
    /// Whether this limit had the request's tokens. A request is allowed only when every
    /// limit had them; a limit can have them while another refuses the request.
    pub allowed: bool,
    /// How long until this limit has the tokens: zero when it had them,
    /// [`RateLimitResult::RETRY_NEVER`] when the cost exceeds its capacity.
    pub retry_after: Duration,
}

impl LimitOutcome {
    /// What `limit`'s bucket decided.
    #[inline]
    pub fn from_decision(limit: &Limit, decision: BucketDecision) -> Self {
        let rule = limit.rule();
        Self {
            name: limit.shared_name().clone(),
            scope: rule.scope(),
            limit: rule.max_tokens(),
            refill_rate: rule.refill_rate(),
            remaining: decision.remaining,
            allowed: decision.allowed,
            retry_after: if decision.allowed {
                Duration::ZERO
            } else {
                decision.retry_after
            },
        }
    }

    /// `limit` reported as a full bucket that allows (fail-open, disabled).
    pub fn full(limit: &Limit) -> Self {
        let max = limit.rule().max_tokens();
        Self::from_decision(
            limit,
            BucketDecision {
                allowed: true,
                retry_after: Duration::ZERO,
                remaining: max,
            },
        )
    }

    /// `limit` reported as an empty bucket that refuses for one token's time (fail-closed).
    pub fn refusing(limit: &Limit) -> Self {
        Self::from_decision(
            limit,
            BucketDecision {
                allowed: false,
                retry_after: crate::token_bucket::seconds(limit.rule().seconds_per_token()),
                remaining: 0,
            },
        )
    }

    /// The IETF `RateLimit-Policy` window of this limit in whole seconds: the time its empty
    /// bucket takes to refill, rounded up (see [`RateLimitRule::window_seconds`]).
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // bounded by MAX_TTL_SECONDS in rules
    pub fn window_seconds(&self) -> u64 {
        ((self.limit as f64 / self.refill_rate * 60.0).ceil() as u64).max(1)
    }

    /// An upper bound on how long until its idle bucket is full and forgotten (the rule's
    /// `ttl_seconds`).
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // bounded by MAX_TTL_SECONDS in rules
    pub fn reset_seconds(&self) -> u64 {
        (self.limit as f64 / self.refill_rate * 60.0) as u64 + 60
    }

    /// `retry_after` in whole seconds, rounded up; `None` for never.
    pub fn retry_after_whole_seconds(&self) -> Option<u64> {
        whole_seconds(self.retry_after)
    }
}

/// Every limit's answer in a [`RateLimitResult`], in the endpoint's order. It reads as a slice
/// (it dereferences to `[LimitOutcome]`); one answer, the usual case, is held without a heap
/// allocation, so that a single-limit check allocates nothing for its result.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Limits(SmallVec<[LimitOutcome; 1]>);

impl Limits {
    /// No answers (an endpoint without a rule).
    #[inline]
    pub fn new() -> Self {
        Self(SmallVec::new())
    }

    /// One limit's answer.
    #[inline]
    pub fn one(outcome: LimitOutcome) -> Self {
        let mut limits = SmallVec::new();
        limits.push(outcome);
        Self(limits)
    }

    /// Appends an answer.
    #[inline]
    pub fn push(&mut self, outcome: LimitOutcome) {
        self.0.push(outcome);
    }

    /// The answers as a vector.
    pub fn into_vec(self) -> Vec<LimitOutcome> {
        self.0.into_vec()
    }
}

impl Deref for Limits {
    type Target = [LimitOutcome];

    #[inline]
    fn deref(&self) -> &[LimitOutcome] {
        &self.0
    }
}

impl FromIterator<LimitOutcome> for Limits {
    #[inline]
    fn from_iter<I: IntoIterator<Item = LimitOutcome>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

impl From<Vec<LimitOutcome>> for Limits {
    fn from(limits: Vec<LimitOutcome>) -> Self {
        Self(SmallVec::from_vec(limits))
    }
}

impl PartialEq<Vec<LimitOutcome>> for Limits {
    fn eq(&self, other: &Vec<LimitOutcome>) -> bool {
        self[..] == other[..]
    }
}

impl IntoIterator for Limits {
    type Item = LimitOutcome;
    type IntoIter = LimitsIntoIter;

    #[inline]
    fn into_iter(self) -> Self::IntoIter {
        LimitsIntoIter(self.0.into_iter())
    }
}

/// The answers of a [`Limits`], by value, in order.
#[derive(Debug)]
pub struct LimitsIntoIter(smallvec::IntoIter<[LimitOutcome; 1]>);

impl Iterator for LimitsIntoIter {
    type Item = LimitOutcome;

    #[inline]
    fn next(&mut self) -> Option<LimitOutcome> {
        self.0.next()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl ExactSizeIterator for LimitsIntoIter {}

impl<'a> IntoIterator for &'a Limits {
    type Item = &'a LimitOutcome;
    type IntoIter = std::slice::Iter<'a, LimitOutcome>;

    #[inline]
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// The answer to "may this request go ahead?".
///
/// The top-level numbers describe the *deciding* limit ([`deciding`](Self::deciding)): the one
/// that refused with the longest wait, or, when the request was allowed, the tightest one (the
/// fewest tokens left). [`limits`](Self::limits) holds every limit's own answer.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RateLimitResult {
    /// Whether the request may go ahead: every limit had its tokens.
    pub allowed: bool,
    /// How long the caller should wait before retrying, at full precision: the longest wait
    /// among the limits that refused; zero when allowed. [`RateLimitResult::RETRY_NEVER`]
    /// when the request costs more than some bucket can ever hold.
    pub retry_after: Duration,
    /// Whole tokens left in the deciding limit's bucket.
    pub remaining: u64,
    /// The deciding limit's capacity (0 when no rule applies).
    pub limit: u64,
    /// The deciding limit's `ttl_seconds`: an upper bound on how long until an idle bucket is
    /// full and forgotten (0 when no rule applies or the rule is disabled).
    pub reset_seconds: u64,
    /// Who decided.
    pub source: DecisionSource,
    /// Every limit consulted, in the endpoint's order (empty when no rule applies).
    pub limits: Limits,
}

impl RateLimitResult {
    /// The `retry_after` of a request that can never be allowed.
    pub const RETRY_NEVER: Duration = BucketDecision::NEVER;

    /// The result of every limit's answer, decided by `source`.
    #[inline]
    pub fn from_outcomes(limits: Limits, source: DecisionSource) -> Self {
        if let [only] = &limits[..] {
            // One limit, the usual case: it decides (as `from_any_outcomes` would find).
            return Self {
                allowed: only.allowed,
                retry_after: if only.allowed {
                    Duration::ZERO
                } else {
                    only.retry_after
                },
                remaining: only.remaining,
                limit: only.limit,
                reset_seconds: only.reset_seconds(),
                source,
                limits,
            };
        }
        Self::from_any_outcomes(limits, source)
    }

    /// [`from_outcomes`](Self::from_outcomes) for any number of limits.
    fn from_any_outcomes(limits: Limits, source: DecisionSource) -> Self {
        let allowed = limits.iter().all(|l| l.allowed);
        let deciding = deciding_index(&limits, allowed);
        let retry_after = if allowed {
            Duration::ZERO
        } else {
            limits
                .iter()
                .filter(|l| !l.allowed)
                .map(|l| l.retry_after)
                .max()
                .unwrap_or(Duration::ZERO)
        };
        let (remaining, limit, reset_seconds) = deciding
            .map(|i| &limits[i])
            .map_or((0, 0, 0), |l| (l.remaining, l.limit, l.reset_seconds()));
        Self {
            allowed,
            retry_after,
            remaining,
            limit,
            reset_seconds,
            source,
            limits,
        }
    }

    /// The result of a store's decisions, one per limit in the same order.
    #[inline]
    pub fn from_decisions<'a>(
        limits: impl IntoIterator<Item = &'a Limit>,
        decisions: &[BucketDecision],
    ) -> Self {
        let mut outcomes = Limits::new();
        for (limit, decision) in limits.into_iter().zip(decisions) {
            outcomes.push(LimitOutcome::from_decision(limit, *decision));
        }
        Self::from_outcomes(outcomes, DecisionSource::Store)
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
            limits: Limits::new(),
        }
    }

    /// A disabled endpoint: allowed with every bucket full, `reset_seconds` 0.
    pub fn disabled<'a>(limits: impl IntoIterator<Item = &'a Limit>) -> Self {
        let mut result = Self::from_outcomes(
            limits
                .into_iter()
                .map(LimitOutcome::full)
                .collect::<Limits>(),
            DecisionSource::RuleDisabled,
        );
        result.reset_seconds = 0;
        result
    }

    /// The store failed: allowed as if every bucket were full, marked as a fail-open decision.
    pub fn fail_open<'a>(limits: impl IntoIterator<Item = &'a Limit>) -> Self {
        Self::from_outcomes(
            limits
                .into_iter()
                .map(LimitOutcome::full)
                .collect::<Limits>(),
            DecisionSource::FailOpen,
        )
    }

    /// The store failed and the policy is to deny: denied, every limit refusing for one
    /// token's time.
    pub fn fail_closed<'a>(limits: impl IntoIterator<Item = &'a Limit>) -> Self {
        Self::from_outcomes(
            limits
                .into_iter()
                .map(LimitOutcome::refusing)
                .collect::<Limits>(),
            DecisionSource::FailClosed,
        )
    }

    /// The same result, attributed to another decider.
    #[must_use]
    pub fn with_source(mut self, source: DecisionSource) -> Self {
        self.source = source;
        self
    }

    /// The limit the top-level numbers describe: the refusing limit with the longest wait, or
    /// the one with the fewest tokens left when allowed (the first, on ties).
    pub fn deciding(&self) -> Option<&LimitOutcome> {
        deciding_index(&self.limits, self.allowed).map(|i| &self.limits[i])
    }

    /// The limits that refused the request.
    pub fn refused(&self) -> impl Iterator<Item = &LimitOutcome> {
        self.limits.iter().filter(|l| !l.allowed)
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
        whole_seconds(self.retry_after)
    }
}

fn whole_seconds(wait: Duration) -> Option<u64> {
    if wait == BucketDecision::NEVER {
        return None;
    }
    let secs = wait.as_secs();
    Some(if wait.subsec_nanos() > 0 {
        secs + 1
    } else {
        secs
    })
}

fn deciding_index(limits: &[LimitOutcome], allowed: bool) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, l) in limits.iter().enumerate() {
        let better = match best.map(|b| &limits[b]) {
            None => allowed || !l.allowed,
            Some(b) if allowed => l.remaining < b.remaining,
            Some(b) => !l.allowed && l.retry_after > b.retry_after,
        };
        if better {
            best = Some(i);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RateLimitRule;

    fn rule() -> RateLimitRule {
        RateLimitRule::new(RateLimitScope::Ip, 5, 5.0).unwrap()
    }

    /// A single limit's result, built by the shortcut, is the one the general computation gives,
    /// whatever the limit said (allowed, refused, refused for ever) and whoever decided.
    #[test]
    fn a_single_limit_decides_as_the_general_computation_says() {
        let limit = Limit::implicit("GET /x", rule());
        let waits = [
            Duration::ZERO,
            Duration::from_millis(1),
            Duration::from_millis(11_500),
            BucketDecision::NEVER,
        ];
        for allowed in [true, false] {
            for retry_after in waits {
                for remaining in [0, 1, 4, 5] {
                    for source in [DecisionSource::Store, DecisionSource::LocalFallback] {
                        let outcome = LimitOutcome::from_decision(
                            &limit,
                            BucketDecision {
                                allowed,
                                retry_after,
                                remaining,
                            },
                        );
                        let one = Limits::one(outcome);
                        assert_eq!(
                            RateLimitResult::from_outcomes(one.clone(), source),
                            RateLimitResult::from_any_outcomes(one, source),
                            "{allowed} {retry_after:?} {remaining} {source:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn limits_read_as_a_slice_in_the_order_given() {
        let limits: Vec<Limit> = ["a", "b", "c"]
            .into_iter()
            .map(|name| Limit::named(name, rule()).unwrap())
            .collect();
        let mut held = Limits::new();
        assert!(held.is_empty());
        for limit in &limits {
            held.push(LimitOutcome::full(limit));
        }
        let names: Vec<&str> = held.iter().map(|l| &*l.name).collect();
        assert_eq!(names, ["a", "b", "c"]);
        let as_vec = held.clone().into_vec();
        assert_eq!(held, as_vec);
        assert_eq!(Limits::from(as_vec.clone()), held);
        assert_eq!(held.into_iter().collect::<Vec<_>>(), as_vec);
        let one: Limits = limits[..1].iter().map(LimitOutcome::full).collect();
        assert_eq!(one.len(), 1);
        assert_eq!((&one).into_iter().count(), 1);
    }

    #[test]
    fn decision_maps_onto_result() {
        let denied = BucketDecision {
            allowed: false,
            retry_after: Duration::from_millis(11_500),
            remaining: 0,
        };
        let result =
            RateLimitResult::from_decisions([&Limit::implicit("GET /x", rule())], &[denied]);
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

        let disabled = RateLimitResult::disabled([&Limit::implicit("GET /x", rule())]);
        assert!(disabled.allowed);
        assert_eq!(
            (disabled.remaining, disabled.limit, disabled.reset_seconds),
            (5, 5, 0)
        );

        let open = RateLimitResult::fail_open([&Limit::implicit("GET /x", rule())]);
        assert!(open.allowed);
        assert_eq!(
            (open.remaining, open.limit, open.reset_seconds),
            (5, 5, 120)
        );
        assert_eq!(open.source, DecisionSource::FailOpen);
    }

    #[test]
    fn the_deciding_limit_is_the_longest_refusal_or_the_tightest_pass() {
        let per_client = Limit::named("per-client", rule()).unwrap();
        let everyone = Limit::named(
            "everyone",
            RateLimitRule::new(RateLimitScope::Global, 15, 15.0).unwrap(),
        )
        .unwrap();
        let d = |allowed, secs, remaining| BucketDecision {
            allowed,
            retry_after: Duration::from_secs(secs),
            remaining,
        };
        let passed = RateLimitResult::from_decisions(
            [&per_client, &everyone],
            &[d(true, 0, 4), d(true, 0, 2)],
        );
        assert!(passed.allowed);
        assert_eq!(&*passed.deciding().unwrap().name, "everyone");
        assert_eq!((passed.remaining, passed.limit), (2, 15));
        assert_eq!(passed.refused().count(), 0);

        let refused = RateLimitResult::from_decisions(
            [&per_client, &everyone],
            &[d(true, 0, 4), d(false, 4, 0)],
        );
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after, Duration::from_secs(4));
        assert_eq!(&*refused.deciding().unwrap().name, "everyone");
        assert_eq!(
            refused.refused().map(|l| &*l.name).collect::<Vec<_>>(),
            ["everyone"]
        );
        assert_eq!(
            (refused.remaining, refused.limit, refused.reset_seconds),
            (0, 15, 120)
        );

        let both = RateLimitResult::from_decisions(
            [&per_client, &everyone],
            &[d(false, 9, 0), d(false, 4, 0)],
        );
        assert_eq!(both.retry_after, Duration::from_secs(9));
        assert_eq!(&*both.deciding().unwrap().name, "per-client");

        let closed = RateLimitResult::fail_closed([&per_client, &everyone]);
        assert!(!closed.allowed);
        assert_eq!(closed.retry_after, Duration::from_secs(12));
        assert_eq!(closed.source, DecisionSource::FailClosed);
    }

    #[test]
    fn never_has_no_whole_seconds() {
        let never = BucketDecision {
            allowed: false,
            retry_after: BucketDecision::NEVER,
            remaining: 3,
        };
        assert!(never.is_never());
        let result =
            RateLimitResult::from_decisions([&Limit::implicit("GET /x", rule())], &[never]);
        assert!(result.retry_never());
        assert_eq!(result.retry_after_whole_seconds(), None);
    }
}
