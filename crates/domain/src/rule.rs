//! The configuration of one endpoint's token bucket.

use crate::RateLimitScope;

/// The largest capacity a rule accepts: 2^53, the largest integer that a double (and so
/// Redis's Lua) holds exactly.
pub const MAX_TOKENS_LIMIT: u64 = 1 << 53;

/// The longest bucket lifetime a rule accepts, in seconds (about 136 years). A refill rate so
/// small that an empty bucket would take longer than this to refill is rejected.
pub const MAX_TTL_SECONDS: u64 = u32::MAX as u64;

/// Why a [`RateLimitRule`] could not be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RuleError {
    /// `max_tokens` was zero: a bucket must hold at least one token.
    #[error("max_tokens must be at least 1, got 0")]
    ZeroMaxTokens,
    /// `max_tokens` was larger than [`MAX_TOKENS_LIMIT`].
    #[error("max_tokens must be at most {limit}, got {value}")]
    MaxTokensTooLarge {
        /// The rejected capacity.
        value: u64,
        /// The largest accepted capacity.
        limit: u64,
    },
    /// `refill_rate` was zero, negative, NaN or infinite.
    #[error("refill_rate must be a positive, finite number of tokens per minute, got {value}")]
    InvalidRefillRate {
        /// The rejected rate.
        value: f64,
    },
    /// `cost` was zero: every request must consume at least one token.
    #[error("cost must be at least 1, got 0")]
    ZeroCost,
    /// `cost` was larger than `max_tokens`: no request could ever be allowed.
    #[error("cost {cost} exceeds max_tokens {max_tokens}: no request could ever be allowed")]
    CostExceedsCapacity {
        /// The rejected cost.
        cost: u64,
        /// The rule's capacity.
        max_tokens: u64,
    },
    /// Refilling an empty bucket would take longer than [`MAX_TTL_SECONDS`].
    #[error(
        "refill_rate {refill_rate} per minute is too slow for max_tokens {max_tokens}: \
         refilling would take more than {limit} seconds"
    )]
    TtlOverflow {
        /// The rule's capacity.
        max_tokens: u64,
        /// The rule's refill rate in tokens per minute.
        refill_rate: f64,
        /// The longest accepted refill time in seconds.
        limit: u64,
    },
    /// A limit name that is not safe in keys, headers and metric labels (see
    /// [`crate::Limit`]).
    #[error("limit name {name:?} {reason}")]
    InvalidLimitName {
        /// The rejected name (at most 80 characters of it).
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Two limits of one endpoint share a name.
    #[error("limit name {name:?} is used twice on one endpoint")]
    DuplicateLimitName {
        /// The name used twice.
        name: String,
    },
    /// Two limits of one endpoint keep buckets per identifier of different kinds (`ip` and
    /// `user`, say): a check carries one identifier, so it could not key both.
    #[error(
        "limits {first:?} (scope {first_scope}) and {second:?} (scope {second_scope}) need different identifiers, but a check carries one: the limits of an endpoint that are not global must share one scope"
    )]
    MixedIdentifierScopes {
        /// The first limit with an identifier.
        first: String,
        /// Its scope.
        first_scope: crate::RateLimitScope,
        /// A later limit with another identifier scope.
        second: String,
        /// Its scope.
        second_scope: crate::RateLimitScope,
    },
    /// An endpoint was given an empty list of limits.
    #[error("an endpoint needs at least one limit")]
    NoLimits,
    /// An endpoint was given more than [`crate::MAX_LIMITS_PER_ENDPOINT`] limits.
    #[error("an endpoint may have at most {max} limits, got {count}")]
    TooManyLimits {
        /// How many were given.
        count: usize,
        /// The most accepted.
        max: usize,
    },
}

/// How one endpoint is limited: a token bucket of `max_tokens` that refills at `refill_rate`
/// tokens per minute, shared according to `scope`, with `cost` tokens taken per request.
///
/// A rule is valid by construction: [`RateLimitRule::new`] and the `with_*` methods reject
/// every number that would make the bucket meaningless.
///
/// ```
/// use ratelimit_domain::{RateLimitRule, RateLimitScope};
///
/// // Five login attempts per IP, one more every 12 seconds.
/// let rule = RateLimitRule::new(RateLimitScope::Ip, 5, 5.0)?;
/// assert_eq!(rule.seconds_per_token(), 12.0);
/// assert_eq!(rule.ttl_seconds(), 120);
/// # Ok::<(), ratelimit_domain::RuleError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitRule {
    max_tokens: u64,
    refill_rate: f64,
    scope: RateLimitScope,
    cost: u64,
    enabled: bool,
}

impl RateLimitRule {
    /// A rule with the given capacity and refill rate (tokens per minute), cost 1, enabled.
    ///
    /// # Errors
    /// [`RuleError`] when `max_tokens` is zero or above [`MAX_TOKENS_LIMIT`], when
    /// `refill_rate` is not a positive finite number, or when refilling would take longer than
    /// [`MAX_TTL_SECONDS`].
    pub fn new(
        scope: RateLimitScope,
        max_tokens: u64,
        refill_rate: f64,
    ) -> Result<Self, RuleError> {
        if max_tokens == 0 {
            return Err(RuleError::ZeroMaxTokens);
        }
        if max_tokens > MAX_TOKENS_LIMIT {
            return Err(RuleError::MaxTokensTooLarge {
                value: max_tokens,
                limit: MAX_TOKENS_LIMIT,
            });
        }
        if !(refill_rate.is_finite() && refill_rate > 0.0) {
            return Err(RuleError::InvalidRefillRate { value: refill_rate });
        }
        let refill_seconds = max_tokens as f64 / refill_rate * 60.0;
        let ttl = refill_seconds.ceil() + 60.0;
        if !ttl.is_finite() || ttl > MAX_TTL_SECONDS as f64 {
            return Err(RuleError::TtlOverflow {
                max_tokens,
                refill_rate,
                limit: MAX_TTL_SECONDS,
            });
        }
        Ok(Self {
            max_tokens,
            refill_rate,
            scope,
            cost: 1,
            enabled: true,
        })
    }

    /// The same rule with another cost per request.
    ///
    /// # Errors
    /// [`RuleError::ZeroCost`] or [`RuleError::CostExceedsCapacity`].
    pub fn with_cost(mut self, cost: u64) -> Result<Self, RuleError> {
        if cost == 0 {
            return Err(RuleError::ZeroCost);
        }
        if cost > self.max_tokens {
            return Err(RuleError::CostExceedsCapacity {
                cost,
                max_tokens: self.max_tokens,
            });
        }
        self.cost = cost;
        Ok(self)
    }

    /// The same rule, switched on or off. A disabled rule allows every request without
    /// touching storage.
    #[must_use]
    pub fn with_enabled(mut self, enabled: bool) -> Self {
        self.enabled = enabled;
        self
    }

    /// Bucket capacity; a new bucket starts full.
    pub fn max_tokens(&self) -> u64 {
        self.max_tokens
    }

    /// Tokens added per minute.
    pub fn refill_rate(&self) -> f64 {
        self.refill_rate
    }

    /// Whose requests share a bucket.
    pub fn scope(&self) -> RateLimitScope {
        self.scope
    }

    /// Tokens one request consumes unless the caller names another cost.
    pub fn cost(&self) -> u64 {
        self.cost
    }

    /// Whether the rule limits anything.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Seconds for one token to come back: `60 / refill_rate`.
    pub fn seconds_per_token(&self) -> f64 {
        60.0 / self.refill_rate
    }

    /// The IETF `RateLimit-Policy` window of this bucket, in whole seconds (at least 1): the
    /// time an empty bucket takes to refill, `max_tokens / refill_rate * 60`, rounded up. A
    /// bucket admits at most `max_tokens` requests plus what refills over any such window.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // bounded by MAX_TTL_SECONDS at construction
    pub fn window_seconds(&self) -> u64 {
        ((self.max_tokens as f64 / self.refill_rate * 60.0).ceil() as u64).max(1)
    }

    /// How long an idle bucket is worth keeping, in whole seconds: the time an empty bucket
    /// takes to refill, truncated, plus 60. This is what results report as `reset_seconds`.
    ///
    /// Stores set the key lifetime with the same formula rounded *up*
    /// ([`storage_ttl_seconds`](Self::storage_ttl_seconds)), as the specification's script does.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // bounded by MAX_TTL_SECONDS at construction
    pub fn ttl_seconds(&self) -> u64 {
        (self.max_tokens as f64 / self.refill_rate * 60.0) as u64 + 60
    }

    /// The lifetime stores give a bucket's keys: `ceil(max_tokens / refill_rate * 60) + 60`.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // bounded by MAX_TTL_SECONDS at construction
    pub fn storage_ttl_seconds(&self) -> u64 {
        (self.max_tokens as f64 / self.refill_rate * 60.0).ceil() as u64 + 60
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RateLimitScope::Ip;

    #[test]
    fn derived_values_follow_the_specification() {
        let rule = RateLimitRule::new(Ip, 5, 5.0).unwrap();
        assert_eq!(rule.seconds_per_token(), 12.0);
        assert_eq!(rule.ttl_seconds(), 120);
        assert_eq!(rule.storage_ttl_seconds(), 120);
        assert_eq!(rule.cost(), 1);
        assert!(rule.enabled());

        // 10 tokens at 3 per minute: 200 s to refill.
        let rule = RateLimitRule::new(Ip, 10, 3.0).unwrap();
        assert_eq!(rule.ttl_seconds(), 260);
        // 1 token at 7 per minute: 8.57 s, truncated for the result, rounded up for storage.
        let rule = RateLimitRule::new(Ip, 1, 7.0).unwrap();
        assert_eq!(rule.ttl_seconds(), 68);
        assert_eq!(rule.storage_ttl_seconds(), 69);
    }

    #[test]
    fn rejects_bad_capacity() {
        assert_eq!(
            RateLimitRule::new(Ip, 0, 1.0),
            Err(RuleError::ZeroMaxTokens)
        );
        assert!(matches!(
            RateLimitRule::new(Ip, u64::MAX, 1e12),
            Err(RuleError::MaxTokensTooLarge { .. })
        ));
        assert!(RateLimitRule::new(Ip, MAX_TOKENS_LIMIT, 1e12).is_ok());
        assert!(RateLimitRule::new(Ip, u64::from(u32::MAX), 1e6).is_ok());
    }

    #[test]
    fn rejects_bad_refill_rates() {
        for rate in [
            0.0,
            -0.0,
            -1.0,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            -f64::MIN_POSITIVE,
        ] {
            assert!(
                matches!(
                    RateLimitRule::new(Ip, 5, rate),
                    Err(RuleError::InvalidRefillRate { .. })
                ),
                "rate {rate} accepted"
            );
        }
    }

    #[test]
    fn rejects_a_refill_so_slow_that_the_ttl_overflows() {
        for rate in [f64::MIN_POSITIVE, 1e-300, 1e-9] {
            assert!(
                matches!(
                    RateLimitRule::new(Ip, 5, rate),
                    Err(RuleError::TtlOverflow { .. })
                ),
                "rate {rate} accepted"
            );
        }
        assert!(matches!(
            RateLimitRule::new(Ip, MAX_TOKENS_LIMIT, 1.0),
            Err(RuleError::TtlOverflow { .. })
        ));
    }

    #[test]
    fn rejects_bad_costs() {
        let rule = RateLimitRule::new(Ip, 10, 1.0).unwrap();
        assert_eq!(rule.clone().with_cost(0), Err(RuleError::ZeroCost));
        assert_eq!(
            rule.clone().with_cost(11),
            Err(RuleError::CostExceedsCapacity {
                cost: 11,
                max_tokens: 10
            })
        );
        assert_eq!(rule.clone().with_cost(10).unwrap().cost(), 10);
    }

    #[test]
    fn errors_read_well() {
        let err = RateLimitRule::new(Ip, 5, f64::NAN).unwrap_err();
        assert_eq!(
            err.to_string(),
            "refill_rate must be a positive, finite number of tokens per minute, got NaN"
        );
    }
}
