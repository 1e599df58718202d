//! The token-bucket step, as a pure function.
//!
//! Every store must reach exactly the decisions of [`step`] for the same inputs: the Redis
//! store runs the same arithmetic in Lua (`lua/token_bucket.lua`), the memory store calls this
//! function. The operations are written in the same order as in the script so that both
//! produce bit-identical doubles; the conformance suite checks it.

use std::time::Duration;

use crate::{BucketDecision, ErrorCode, RateLimitError, Result};

/// What a store keeps for one bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketState {
    /// Tokens in the bucket at `last`, fractional.
    pub tokens: f64,
    /// When the bucket was last brought up to date, in seconds since the Unix epoch. Never
    /// moves backwards.
    pub last: f64,
}

/// The outcome of one [`step`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Step {
    /// The decision to report.
    pub decision: BucketDecision,
    /// The state to store, or `None` when the step changed nothing (a zero-cost peek).
    pub store: Option<BucketState>,
}

/// One check-and-consume step at time `now` (seconds since the Unix epoch).
///
/// - A missing bucket is full, as of `now`.
/// - Tokens refill continuously at `refill_rate` per minute, up to `max_tokens`. Time that
///   runs backwards (a host whose clock is behind) refills nothing, and the stored time keeps
///   its later value.
/// - If at least `cost` tokens are there, they are taken and the request is allowed.
///   Otherwise nothing is taken and `retry_after` says when `cost` tokens will be there, or
///   [`BucketDecision::NEVER`] when `cost` exceeds `max_tokens`.
/// - A `cost` of zero only reads: allowed, nothing to store.
pub fn step(
    stored: Option<BucketState>,
    max_tokens: u64,
    refill_rate: f64,
    cost: u64,
    now: f64,
) -> Step {
    let max = max_tokens as f64;
    let cost_f = cost as f64;
    let BucketState { tokens, last } = stored.unwrap_or(BucketState {
        tokens: max,
        last: now,
    });
    let elapsed = (now - last).max(0.0);
    // Same operation order as the Lua script: tokens + ((elapsed * refill_rate) / 60).
    let current = max.min(tokens + elapsed * refill_rate / 60.0);
    let last = last.max(now);

    if cost == 0 {
        let decision = BucketDecision {
            allowed: true,
            retry_after: Duration::ZERO,
            remaining: floor(current),
        };
        return Step {
            decision,
            store: None,
        };
    }
    if current >= cost_f {
        let left = current - cost_f;
        let decision = BucketDecision {
            allowed: true,
            retry_after: Duration::ZERO,
            remaining: floor(left),
        };
        return Step {
            decision,
            store: Some(BucketState { tokens: left, last }),
        };
    }
    let retry_after = if cost > max_tokens {
        BucketDecision::NEVER
    } else {
        seconds((cost_f - current) / (refill_rate / 60.0))
    };
    let decision = BucketDecision {
        allowed: false,
        retry_after,
        remaining: floor(current),
    };
    Step {
        decision,
        store: Some(BucketState {
            tokens: current,
            last,
        }),
    }
}

/// Checks an explicit "now" given to a store.
///
/// # Errors
/// [`ErrorCode::InvalidInput`] unless `now` is finite and not negative.
pub fn validate_now(now: f64) -> Result<f64> {
    if now.is_finite() && now >= 0.0 {
        Ok(now)
    } else {
        Err(RateLimitError::new(
            ErrorCode::InvalidInput,
            "now must be a finite, non-negative number of seconds",
        )
        .with_detail("now", now.to_string()))
    }
}

/// Seconds as a `Duration`; anything not representable (infinite, NaN, too large) is "never".
pub fn seconds(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs).unwrap_or(BucketDecision::NEVER)
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // tokens are in 0..=2^53
fn floor(tokens: f64) -> u64 {
    tokens.floor() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: f64 = 1_700_000_000.0;

    fn run(steps: &[(u64, f64)], max: u64, rate: f64) -> Vec<BucketDecision> {
        let mut state = None;
        steps
            .iter()
            .map(|&(cost, now)| {
                let out = step(state, max, rate, cost, now);
                if out.store.is_some() {
                    state = out.store;
                }
                out.decision
            })
            .collect()
    }

    #[test]
    fn a_new_bucket_is_full_and_counts_down() {
        let d = run(
            &[(1, T0), (1, T0), (1, T0), (1, T0), (1, T0), (1, T0)],
            5,
            5.0,
        );
        let remaining: Vec<u64> = d.iter().map(|d| d.remaining).collect();
        assert_eq!(remaining, [4, 3, 2, 1, 0, 0]);
        assert!(d[..5].iter().all(|d| d.allowed));
        assert!(!d[5].allowed);
        assert_eq!(d[5].retry_after, Duration::from_secs(12));
    }

    #[test]
    fn refills_with_time_and_caps_at_max() {
        // 10 tokens at 60 per minute: one token per second.
        let d = run(&[(10, T0), (0, T0 + 3.0), (0, T0 + 1_000.0)], 10, 60.0);
        assert_eq!(d[1].remaining, 3);
        assert_eq!(d[2].remaining, 10);
    }

    #[test]
    fn costs_are_taken_whole() {
        let d = run(&[(3, T0), (5, T0), (5, T0)], 10, 1.0);
        assert_eq!(
            d.iter()
                .map(|d| (d.allowed, d.remaining))
                .collect::<Vec<_>>(),
            [(true, 7), (true, 2), (false, 2)]
        );
        assert_eq!(d[2].retry_after, Duration::from_secs(180));
    }

    #[test]
    fn a_cost_above_capacity_is_never_allowed() {
        let d = run(&[(11, T0)], 10, 60.0);
        assert!(!d[0].allowed);
        assert!(d[0].is_never());
        assert_eq!(d[0].remaining, 10);
    }

    #[test]
    fn zero_cost_only_reads() {
        let out = step(None, 5, 5.0, 0, T0);
        assert_eq!(out.store, None);
        assert_eq!(out.decision.remaining, 5);
    }

    #[test]
    fn time_running_backwards_earns_nothing_and_keeps_the_later_time() {
        let first = step(None, 5, 60.0, 5, T0 + 10.0);
        let back = step(first.store, 5, 60.0, 1, T0);
        assert!(!back.decision.allowed);
        assert_eq!(back.store.map(|s| s.last), Some(T0 + 10.0));
        // Catching up to the stored time still refills nothing extra.
        let caught_up = step(back.store, 5, 60.0, 1, T0 + 10.0);
        assert!(!caught_up.decision.allowed);
        let later = step(back.store, 5, 60.0, 1, T0 + 11.0);
        assert!(later.decision.allowed);
    }

    #[test]
    fn retry_after_keeps_sub_second_precision() {
        // 1 token per 12 s; half a token refilled after 6 s, so 6 s remain.
        let d = run(&[(5, T0), (1, T0 + 6.0)], 5, 5.0);
        assert_eq!(d[1].retry_after, Duration::from_secs(6));
        let d = run(&[(5, T0), (1, T0 + 6.25)], 5, 5.0);
        assert_eq!(d[1].retry_after, Duration::from_millis(5_750));
    }

    #[test]
    fn validate_now_rejects_non_finite_and_negative() {
        assert!(validate_now(T0).is_ok());
        for bad in [f64::NAN, f64::INFINITY, -1.0] {
            assert_eq!(
                validate_now(bad).unwrap_err().code(),
                ErrorCode::InvalidInput
            );
        }
    }
}
