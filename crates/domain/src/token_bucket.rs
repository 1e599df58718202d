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
/// - A missing bucket is full, as of `now`. So is a stored one that no step could have
///   written ([`is_usable`]): tokens that are not a number in `0..=max_tokens`, or a time that
///   is not a number, is before the epoch, or lies further ahead of `now` than
///   [`future_horizon`]. Garbage in a store (hostile or corrupt) therefore never disables a
///   bucket nor locks it.
/// - Tokens refill continuously at `refill_rate` per minute, up to `max_tokens`. Time that
///   runs backwards (a host whose clock is behind) refills nothing, and the stored time keeps
///   its later value.
/// - A `cost` of zero only reads: allowed, nothing to store.
/// - A `cost` above `max_tokens` is denied with [`BucketDecision::NEVER`] and stores nothing.
///   It is decided on the integers, before any conversion to a double (which would round a cost
///   above 2^53).
/// - If at least `cost` tokens are there, they are taken and the request is allowed.
///   Otherwise nothing is taken and `retry_after` says when `cost` tokens will be there: the
///   wait for `now` to reach the stored time (nothing refills before it) plus the refill time.
pub fn step(
    stored: Option<BucketState>,
    max_tokens: u64,
    refill_rate: f64,
    cost: u64,
    now: f64,
) -> Step {
    // Exact: rules keep max_tokens at or below 2^53.
    let max = max_tokens as f64;
    let BucketState { tokens, last } = stored
        .filter(|state| is_usable(state, max, refill_rate, now))
        .unwrap_or(BucketState {
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
    if cost > max_tokens {
        // Waiting never helps, and nothing is taken: nothing to store either.
        let decision = BucketDecision {
            allowed: false,
            retry_after: BucketDecision::NEVER,
            remaining: floor(current),
        };
        return Step {
            decision,
            store: None,
        };
    }
    // Exact: cost <= max_tokens <= 2^53.
    let cost_f = cost as f64;
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
    // Nothing refills until `now` reaches `last` (0 unless a clock went back).
    let retry_after = seconds((last - now) + (cost_f - current) / (refill_rate / 60.0));
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

/// One bucket of a [`step_all`]: what is stored, the bucket's rule, and the cost to take.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInput {
    /// The stored state, `None` when the bucket is missing.
    pub stored: Option<BucketState>,
    /// The bucket's capacity.
    pub max_tokens: u64,
    /// Tokens per minute.
    pub refill_rate: f64,
    /// Tokens to take; 0 only reads.
    pub cost: u64,
}

/// One all-or-nothing step over several buckets at time `now`: the reference of every store's
/// multi-limit check.
///
/// Each bucket is first stepped alone ([`step`]). If every one of them has its tokens, the
/// result is exactly those steps: each takes its cost. If any lacks them, **none** takes
/// anything:
/// - a bucket that lacked its tokens reports and stores what [`step`] does (refilled, nothing
///   taken, its wait; nothing stored for a cost above capacity);
/// - a bucket that had them reports `allowed: true` (it had the tokens), a zero wait, the
///   tokens it holds now (nothing taken), and stores nothing.
///
/// So the request is allowed exactly when every returned decision is, and then its wait is the
/// longest of the refusing buckets' ([`combined_retry_after`]). With one bucket this is
/// [`step`].
pub fn step_all(inputs: &[StepInput], now: f64) -> Vec<Step> {
    let mut steps: Vec<Step> = inputs
        .iter()
        .map(|input| {
            step(
                input.stored,
                input.max_tokens,
                input.refill_rate,
                input.cost,
                now,
            )
        })
        .collect();
    if steps.iter().all(|s| s.decision.allowed) {
        return steps;
    }
    for (out, input) in steps.iter_mut().zip(inputs) {
        if out.decision.allowed {
            // Had the tokens, takes nothing: report what it holds, write nothing.
            let read = step(input.stored, input.max_tokens, input.refill_rate, 0, now);
            *out = Step {
                decision: read.decision,
                store: None,
            };
        }
    }
    steps
}

/// The wait of a whole multi-bucket request: the longest wait among its decisions (zero when
/// all were allowed; [`BucketDecision::NEVER`] when any is never).
pub fn combined_retry_after(decisions: &[BucketDecision]) -> Duration {
    decisions
        .iter()
        .filter(|d| !d.allowed)
        .map(|d| d.retry_after)
        .max()
        .unwrap_or(Duration::ZERO)
}

/// How far ahead of `now` a stored time may lie and still be trusted: the bucket's refill time
/// plus 60 s (`max_tokens / refill_rate * 60 + 60`, the lifetime Redis gives its keys, before
/// rounding up).
///
/// A stored time ahead of `now` only comes from clocks that disagree (a failover to a Redis whose
/// clock is behind, or hosts passing their own `now`): it is ahead by at most the skew between
/// them. This bound honours a skew of at least a minute for every rule, and longer for slower
/// rules, while a time beyond it, which would hold the bucket below full for longer than the rule
/// itself ever does, is treated as garbage. docs/lua.md has the reasoning.
pub fn future_horizon(max_tokens: f64, refill_rate: f64) -> f64 {
    max_tokens / refill_rate * 60.0 + 60.0
}

/// Whether a stored bucket is one that [`step`] could have written: `tokens` a number in
/// `0..=max_tokens` and `last` a number, not before the epoch, at most [`future_horizon`] ahead
/// of `now`. NaN fails every comparison, so it is never usable. The Lua scripts make the same
/// test with the same operations.
pub fn is_usable(state: &BucketState, max_tokens: f64, refill_rate: f64, now: f64) -> bool {
    state.tokens >= 0.0
        && state.tokens <= max_tokens
        && state.last >= 0.0
        && (state.last <= now || state.last - now <= future_horizon(max_tokens, refill_rate))
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

/// `seconds` rounded up to whole seconds, for headers and protocol fields: 0 for nothing (zero,
/// negative or NaN), saturating at `u64::MAX`.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // clamped first
pub fn ceil_seconds(seconds: f64) -> u64 {
    if seconds.is_nan() || seconds <= 0.0 {
        0
    } else if seconds >= u64::MAX as f64 {
        u64::MAX
    } else {
        seconds.ceil() as u64
    }
}

/// Seconds as a `Duration`; anything not representable (infinite, NaN, too large) is "never".
pub fn seconds(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs).unwrap_or(BucketDecision::NEVER)
}

/// Whole tokens: `tokens` rounded down. `as` rounds toward zero, which is down for the
/// non-negative counts a bucket holds, and saturates below zero and at infinity as a cast of
/// `floor()` would; without `floor()`'s libm call (x86-64's baseline has no rounding
/// instruction).
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // tokens are in 0..=2^53
fn floor(tokens: f64) -> u64 {
    tokens as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    fn whole_tokens_are_the_count_rounded_down_even_where_a_bucket_never_is() {
        let counts = [
            0.0,
            -0.0,
            0.25,
            0.999_999_9,
            1.0,
            2.5,
            4_294_967_296.75,
            9_007_199_254_740_992.0,
            1.0e300,
            f64::MAX,
            f64::INFINITY,
            -0.5,
            -1.0,
            -1.0e300,
            f64::NEG_INFINITY,
            f64::NAN,
            f64::MIN_POSITIVE,
        ];
        for tokens in counts {
            assert_eq!(floor(tokens), tokens.floor() as u64, "{tokens}");
        }
    }

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
        // Nothing refills for the 10 s until now reaches the stored time, then 1 s per token.
        assert_eq!(back.decision.retry_after, Duration::from_secs(11));
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

    /// Stored values no step could have written, as a hostile or corrupt store may hold them.
    fn garbage(max: f64, now: f64) -> Vec<BucketState> {
        let mut states = Vec::new();
        for tokens in [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            -1e308,
            -1.0,
            -1e-300,
        ] {
            states.push(BucketState { tokens, last: now });
        }
        for tokens in [max + 1.0, max * 2.0, 1e308] {
            states.push(BucketState { tokens, last: now });
        }
        for last in [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            -1.0,
            1e308,
            now + 1e9,
        ] {
            states.push(BucketState { tokens: 0.0, last });
        }
        // NaN with another sign bit and payload, as 8 junk bytes may read.
        states.push(BucketState {
            tokens: f64::from_bits(0xFFF8_0000_DEAD_BEEF),
            last: f64::from_bits(0x7FF0_0000_0000_0001),
        });
        states
    }

    #[test]
    fn stored_garbage_is_a_missing_bucket() {
        for (max, rate) in [(5_u64, 5.0), (10, 60.0), (1, 0.01), (1 << 53, 1e12)] {
            let max_f = max as f64;
            for state in garbage(max_f, T0) {
                for cost in [0, 1, max, max + 1] {
                    let got = step(Some(state), max, rate, cost, T0);
                    let missing = step(None, max, rate, cost, T0);
                    assert_eq!(
                        (
                            got.decision,
                            got.store.map(|s| (s.tokens.to_bits(), s.last.to_bits()))
                        ),
                        (
                            missing.decision,
                            missing
                                .store
                                .map(|s| (s.tokens.to_bits(), s.last.to_bits()))
                        ),
                        "max {max}, rate {rate}, cost {cost}, stored {state:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_clock_skew_within_the_horizon_is_honoured_and_beyond_it_is_not() {
        // 5 tokens at 5 per minute: refill time 60 s, horizon 120 s.
        let horizon = future_horizon(5.0, 5.0);
        assert_eq!(horizon, 120.0);
        let empty_at = |last: f64| Some(BucketState { tokens: 0.0, last });
        // A Redis 10 s behind the one that wrote the bucket: still empty, and the wait counts
        // the 10 s before anything refills.
        let skewed = step(empty_at(T0 + 10.0), 5, 5.0, 1, T0);
        assert!(!skewed.decision.allowed);
        assert_eq!(skewed.decision.retry_after, Duration::from_secs(22));
        assert_eq!(skewed.store.map(|s| s.last), Some(T0 + 10.0));
        // At the horizon exactly: trusted.
        let edge = step(empty_at(T0 + horizon), 5, 5.0, 1, T0);
        assert!(!edge.decision.allowed);
        assert_eq!(edge.decision.retry_after, Duration::from_secs(132));
        // Beyond it: garbage, so the bucket is full as of now and its time is now.
        let beyond = step(empty_at(T0 + horizon + 0.001), 5, 5.0, 1, T0);
        assert!(beyond.decision.allowed);
        assert_eq!(beyond.decision.remaining, 4);
        assert_eq!(beyond.store.map(|s| s.last), Some(T0));
    }

    #[test]
    fn a_far_future_time_does_not_lock_a_bucket_and_a_nan_time_does_not_free_it() {
        // Before validation a far-future time locked the bucket (and every denial kept it).
        let locked = step(
            Some(BucketState {
                tokens: 0.0,
                last: T0 + 1e9,
            }),
            5,
            5.0,
            1,
            T0,
        );
        assert!(locked.decision.allowed);
        assert_eq!(locked.store.map(|s| s.last), Some(T0));
        // A NaN token count reads as a full bucket, and what is stored is a real state again.
        let out = step(
            Some(BucketState {
                tokens: f64::NAN,
                last: T0,
            }),
            5,
            5.0,
            5,
            T0,
        );
        assert!(out.decision.allowed);
        assert_eq!(
            out.store,
            Some(BucketState {
                tokens: 0.0,
                last: T0
            })
        );
        assert!(!step(out.store, 5, 5.0, 1, T0).decision.allowed);
    }

    #[test]
    fn costs_above_capacity_are_never_allowed_however_large() {
        let max = 1_u64 << 53;
        // 2^53 + 1 rounds to 2^53 as a double: it must still be "never", not a finite wait.
        for cost in [max + 1, max + 2, u64::MAX] {
            let out = step(None, max, 1e12, cost, T0);
            assert!(!out.decision.allowed, "cost {cost}");
            assert!(out.decision.is_never(), "cost {cost}");
            assert_eq!(out.decision.remaining, max);
            assert_eq!(out.store, None);
        }
        let all = step(None, max, 1e12, max, T0);
        assert!(all.decision.allowed);
        assert_eq!(all.decision.remaining, 0);
    }

    fn input(stored: Option<BucketState>, max: u64, rate: f64, cost: u64) -> StepInput {
        StepInput {
            stored,
            max_tokens: max,
            refill_rate: rate,
            cost,
        }
    }

    #[test]
    fn step_all_of_one_bucket_is_step() {
        let mut state = None;
        for (cost, dt) in [(3, 0.0), (3, 0.5), (3, 1.0), (0, 2.0), (11, 3.0), (1, 90.0)] {
            let one = step(state, 10, 6.0, cost, T0 + dt);
            let all = step_all(&[input(state, 10, 6.0, cost)], T0 + dt);
            assert_eq!(all, vec![one]);
            if one.store.is_some() {
                state = one.store;
            }
        }
    }

    #[test]
    fn step_all_takes_from_every_bucket_or_from_none() {
        // A per-client bucket with 10 tokens and a shared one with 2.
        let client = Some(BucketState {
            tokens: 10.0,
            last: T0,
        });
        let shared = Some(BucketState {
            tokens: 2.0,
            last: T0,
        });
        let both = step_all(
            &[input(client, 10, 60.0, 1), input(shared, 15, 60.0, 1)],
            T0,
        );
        assert!(both.iter().all(|s| s.decision.allowed));
        assert_eq!(
            both.iter()
                .map(|s| s.store.map(|s| s.tokens))
                .collect::<Vec<_>>(),
            [Some(9.0), Some(1.0)]
        );

        // Cost 3: the shared bucket refuses, so the client's bucket loses nothing.
        let refused = step_all(
            &[input(client, 10, 60.0, 3), input(shared, 15, 60.0, 3)],
            T0,
        );
        assert!(
            refused[0].decision.allowed,
            "the client limit had the tokens"
        );
        assert_eq!(refused[0].decision.remaining, 10);
        assert_eq!(refused[0].decision.retry_after, Duration::ZERO);
        assert_eq!(refused[0].store, None, "nothing taken, nothing written");
        assert!(!refused[1].decision.allowed);
        assert_eq!(refused[1].decision.retry_after, Duration::from_secs(1));
        assert_eq!(
            combined_retry_after(&[refused[0].decision, refused[1].decision]),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn the_longest_wait_wins_and_never_beats_everything() {
        let empty = Some(BucketState {
            tokens: 0.0,
            last: T0,
        });
        let out = step_all(&[input(empty, 5, 60.0, 1), input(empty, 5, 6.0, 1)], T0);
        let decisions: Vec<_> = out.iter().map(|s| s.decision).collect();
        assert_eq!(combined_retry_after(&decisions), Duration::from_secs(10));
        let out = step_all(&[input(empty, 5, 60.0, 1), input(None, 5, 6.0, 6)], T0);
        let decisions: Vec<_> = out.iter().map(|s| s.decision).collect();
        assert_eq!(combined_retry_after(&decisions), BucketDecision::NEVER);
        assert!(step_all(&[], T0).is_empty());
    }

    #[test]
    fn ceil_seconds_rounds_up_and_saturates() {
        assert_eq!(ceil_seconds(0.0), 0);
        assert_eq!(ceil_seconds(-3.0), 0);
        assert_eq!(ceil_seconds(f64::NAN), 0);
        assert_eq!(ceil_seconds(11.000_1), 12);
        assert_eq!(ceil_seconds(12.0), 12);
        assert_eq!(ceil_seconds(f64::INFINITY), u64::MAX);
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
