//! The conformance suite of the [`BucketStore`] port.
//!
//! Every store must pass every function here; `tests/contract.rs` runs them against the
//! memory store and the Redis store. The checks use explicit `now` values so that both stores
//! see the same times, and each takes a key prefix so that tests sharing a Redis never share
//! a bucket.

use std::time::Duration;

use ratelimit_domain::token_bucket::{self, BucketState};
use ratelimit_domain::{
    BucketDecision, BucketKey, BucketStore, KeyBuilder, RateLimitRule, RateLimitScope,
};

/// A fixed "now" for the suite: 2023-11-14T22:13:20Z.
pub const T0: f64 = 1_700_000_000.0;

/// The specification's login rule: 5 tokens, 5 per minute (one every 12 s), per IP.
pub fn login_rule() -> RateLimitRule {
    rule(5, 5.0)
}

/// A per-IP rule with the given capacity and refill rate.
///
/// # Panics
/// For an invalid rule (a bug in the test).
pub fn rule(max_tokens: u64, refill_rate: f64) -> RateLimitRule {
    RateLimitRule::new(RateLimitScope::Ip, max_tokens, refill_rate)
        .unwrap_or_else(|err| panic!("bad test rule: {err}"))
}

/// The key of `identifier`'s bucket for `endpoint`, under `prefix`.
///
/// # Panics
/// For an unusable identifier (a bug in the test).
pub fn key(prefix: &str, identifier: &str, endpoint: &str) -> BucketKey {
    KeyBuilder::new(prefix, RateLimitScope::Ip, endpoint)
        .and_then(|keys| keys.key(identifier))
        .unwrap_or_else(|err| panic!("bad test key: {err}"))
}

async fn take(
    store: &dyn BucketStore,
    key: &BucketKey,
    rule: &RateLimitRule,
    cost: u64,
    now: f64,
) -> BucketDecision {
    store
        .check_and_consume(key, rule, cost, Some(now))
        .await
        .unwrap_or_else(|err| panic!("check_and_consume failed: {err}"))
}

async fn remaining(
    store: &dyn BucketStore,
    key: &BucketKey,
    rule: &RateLimitRule,
    now: f64,
) -> u64 {
    store
        .get_remaining(key, rule, Some(now))
        .await
        .unwrap_or_else(|err| panic!("get_remaining failed: {err}"))
}

/// Runs the whole suite.
pub async fn run_all(store: &dyn BucketStore, prefix: &str) {
    first_request_leaves_four_of_five(store, prefix).await;
    consecutive_requests_count_down(store, prefix).await;
    exhaustion_denies_with_retry_after_of_twelve_seconds(store, prefix).await;
    costs_are_taken_whole(store, prefix).await;
    tokens_refill_with_time(store, prefix).await;
    refill_caps_at_max_tokens(store, prefix).await;
    get_remaining_consumes_nothing(store, prefix).await;
    reset_restores_a_full_bucket(store, prefix).await;
    identifiers_and_endpoints_are_isolated(store, prefix).await;
    a_cost_above_capacity_is_denied_for_ever(store, prefix).await;
    a_clock_running_behind_earns_nothing(store, prefix).await;
    retry_after_keeps_sub_second_precision(store, prefix).await;
    invalid_now_is_rejected(store, prefix).await;
}

/// A new bucket is full: the first request leaves 4 of 5.
pub async fn first_request_leaves_four_of_five(store: &dyn BucketStore, prefix: &str) {
    let d = take(
        store,
        &key(prefix, "192.168.1.1", "POST /api/v1/sessions"),
        &login_rule(),
        1,
        T0,
    )
    .await;
    assert!(d.allowed);
    assert_eq!(d.remaining, 4);
    assert_eq!(d.retry_after, Duration::ZERO);
}

/// Requests at the same instant count down 4, 3, 2, 1, 0.
pub async fn consecutive_requests_count_down(store: &dyn BucketStore, prefix: &str) {
    let k = key(prefix, "10.0.0.2", "POST /api/v1/sessions");
    for expected in [4, 3, 2, 1, 0] {
        let d = take(store, &k, &login_rule(), 1, T0).await;
        assert!(d.allowed);
        assert_eq!(d.remaining, expected);
    }
}

/// The sixth request is denied and told to come back in 12 s (5 per minute).
pub async fn exhaustion_denies_with_retry_after_of_twelve_seconds(
    store: &dyn BucketStore,
    prefix: &str,
) {
    let k = key(prefix, "10.0.0.3", "POST /api/v1/sessions");
    for _ in 0..5 {
        assert!(take(store, &k, &login_rule(), 1, T0).await.allowed);
    }
    let d = take(store, &k, &login_rule(), 1, T0).await;
    assert!(!d.allowed);
    assert_eq!(d.remaining, 0);
    assert_eq!(d.retry_after, Duration::from_secs(12));
    // Still denied a moment later, with the wait shrinking accordingly.
    let d = take(store, &k, &login_rule(), 1, T0 + 2.0).await;
    assert!(!d.allowed);
    assert_eq!(d.retry_after, Duration::from_secs(10));
}

/// Cost 3 then cost 5 out of 10 leave 7 then 2; another 5 is denied.
pub async fn costs_are_taken_whole(store: &dyn BucketStore, prefix: &str) {
    let k = key(prefix, "10.0.0.4", "POST /export");
    let r = rule(10, 1.0);
    let d = take(store, &k, &r, 3, T0).await;
    assert!(d.allowed);
    assert_eq!(d.remaining, 7);
    let d = take(store, &k, &r, 5, T0).await;
    assert!(d.allowed);
    assert_eq!(d.remaining, 2);
    let d = take(store, &k, &r, 5, T0).await;
    assert!(!d.allowed);
    assert_eq!(d.remaining, 2);
    assert_eq!(d.retry_after, Duration::from_secs(180));
}

/// At 60 per minute, 3 s after emptying the bucket 3 tokens are back.
pub async fn tokens_refill_with_time(store: &dyn BucketStore, prefix: &str) {
    let k = key(prefix, "10.0.0.5", "GET /items");
    let r = rule(10, 60.0);
    assert!(take(store, &k, &r, 10, T0).await.allowed);
    assert!(!take(store, &k, &r, 1, T0).await.allowed);
    assert_eq!(remaining(store, &k, &r, T0 + 3.0).await, 3);
    let d = take(store, &k, &r, 3, T0 + 3.0).await;
    assert!(d.allowed);
    assert_eq!(d.remaining, 0);
}

/// However long a bucket idles, it holds at most `max_tokens`.
pub async fn refill_caps_at_max_tokens(store: &dyn BucketStore, prefix: &str) {
    let k = key(prefix, "10.0.0.6", "GET /items");
    let r = rule(10, 60.0);
    assert!(take(store, &k, &r, 1, T0).await.allowed);
    assert_eq!(remaining(store, &k, &r, T0 + 100.0).await, 10);
    let d = take(store, &k, &r, 1, T0 + 100.0).await;
    assert_eq!(d.remaining, 9);
}

/// Asking how many tokens remain takes none.
pub async fn get_remaining_consumes_nothing(store: &dyn BucketStore, prefix: &str) {
    let k = key(prefix, "10.0.0.7", "POST /api/v1/sessions");
    assert_eq!(remaining(store, &k, &login_rule(), T0).await, 5);
    take(store, &k, &login_rule(), 2, T0).await;
    for _ in 0..10 {
        assert_eq!(remaining(store, &k, &login_rule(), T0).await, 3);
    }
    assert_eq!(take(store, &k, &login_rule(), 1, T0).await.remaining, 2);
}

/// A reset bucket is full again.
pub async fn reset_restores_a_full_bucket(store: &dyn BucketStore, prefix: &str) {
    let k = key(prefix, "10.0.0.8", "POST /api/v1/sessions");
    for _ in 0..5 {
        take(store, &k, &login_rule(), 1, T0).await;
    }
    assert!(!take(store, &k, &login_rule(), 1, T0).await.allowed);
    store
        .reset(&k, &login_rule())
        .await
        .unwrap_or_else(|err| panic!("reset failed: {err}"));
    assert_eq!(remaining(store, &k, &login_rule(), T0).await, 5);
    let d = take(store, &k, &login_rule(), 1, T0).await;
    assert!(d.allowed);
    assert_eq!(d.remaining, 4);
    // Resetting a bucket that does not exist is fine too.
    store
        .reset(&key(prefix, "never-seen", "GET /x"), &login_rule())
        .await
        .unwrap_or_else(|err| panic!("reset failed: {err}"));
}

/// Emptying one bucket leaves other identifiers and other endpoints untouched.
pub async fn identifiers_and_endpoints_are_isolated(store: &dyn BucketStore, prefix: &str) {
    let a = key(prefix, "10.0.0.9", "POST /api/v1/sessions");
    for _ in 0..5 {
        take(store, &a, &login_rule(), 1, T0).await;
    }
    assert!(!take(store, &a, &login_rule(), 1, T0).await.allowed);
    let other_ip = key(prefix, "10.0.0.10", "POST /api/v1/sessions");
    assert_eq!(
        take(store, &other_ip, &login_rule(), 1, T0).await.remaining,
        4
    );
    let other_endpoint = key(prefix, "10.0.0.9", "POST /api/v1/users");
    assert_eq!(
        take(store, &other_endpoint, &login_rule(), 1, T0)
            .await
            .remaining,
        4
    );
}

/// A cost above capacity is denied with a "never" retry, and takes nothing.
pub async fn a_cost_above_capacity_is_denied_for_ever(store: &dyn BucketStore, prefix: &str) {
    let k = key(prefix, "10.0.0.11", "POST /export");
    let r = rule(10, 60.0);
    let d = take(store, &k, &r, 11, T0).await;
    assert!(!d.allowed);
    assert!(
        d.is_never(),
        "retry_after {:?} should say never",
        d.retry_after
    );
    assert_eq!(d.remaining, 10);
    assert_eq!(take(store, &k, &r, 10, T0).await.remaining, 0);
}

/// A caller whose clock is behind neither earns tokens nor moves the bucket's time back.
pub async fn a_clock_running_behind_earns_nothing(store: &dyn BucketStore, prefix: &str) {
    let k = key(prefix, "10.0.0.12", "GET /items");
    let r = rule(5, 60.0); // one token per second
    assert!(take(store, &k, &r, 5, T0 + 10.0).await.allowed);
    // Ten seconds "earlier": nothing has refilled.
    assert!(!take(store, &k, &r, 1, T0).await.allowed);
    // Back at the later time: still nothing, since the bucket's time did not go back.
    assert!(!take(store, &k, &r, 1, T0 + 10.0).await.allowed);
    assert!(take(store, &k, &r, 1, T0 + 11.0).await.allowed);
}

/// Retry-after is not truncated to whole seconds.
pub async fn retry_after_keeps_sub_second_precision(store: &dyn BucketStore, prefix: &str) {
    let k = key(prefix, "10.0.0.13", "POST /api/v1/sessions");
    for _ in 0..5 {
        take(store, &k, &login_rule(), 1, T0).await;
    }
    let d = take(store, &k, &login_rule(), 1, T0 + 6.25).await;
    assert!(!d.allowed);
    assert_eq!(d.retry_after, Duration::from_millis(5_750));
}

/// A non-finite or negative `now` is an error, not a panic and not a decision.
pub async fn invalid_now_is_rejected(store: &dyn BucketStore, prefix: &str) {
    let k = key(prefix, "10.0.0.14", "GET /items");
    for bad in [f64::NAN, f64::INFINITY, -1.0] {
        let err = store
            .check_and_consume(&k, &login_rule(), 1, Some(bad))
            .await
            .err();
        assert_eq!(
            err.map(|e| e.code()),
            Some(ratelimit_domain::ErrorCode::InvalidInput),
            "now = {bad}"
        );
    }
}

/// A deterministic pseudo-random sequence (xorshift64*), so failures can be replayed.
#[derive(Debug, Clone)]
pub struct Sequence(u64);

impl Sequence {
    /// A sequence from a non-zero seed.
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// One step of a random workload: a cost and a time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RandomStep {
    /// Tokens asked for (0 peeks; above capacity is never allowed).
    pub cost: u64,
    /// The explicit now.
    pub now: f64,
}

/// A long random workload over a bucket of `max_tokens`: mostly small steps forward in time,
/// some bursts at the same instant, a few steps back (a host whose clock is behind), costs
/// from 0 to above capacity.
pub fn random_workload(seed: u64, len: usize, max_tokens: u64) -> Vec<RandomStep> {
    let mut rng = Sequence::new(seed);
    let mut now = T0;
    (0..len)
        .map(|_| {
            let dt = match rng.below(10) {
                0..=3 => 0.0,
                4..=7 => rng.below(5_000) as f64 / 1_000.0,
                8 => rng.below(60_000) as f64 / 1_000.0,
                _ => -(rng.below(3_000) as f64 / 1_000.0),
            };
            now += dt;
            let cost = match rng.below(20) {
                0 => 0,
                1 => max_tokens + 1,
                _ => 1 + rng.below(max_tokens.min(4)),
            };
            RandomStep { cost, now }
        })
        .collect()
}

/// Replays a workload through the reference [`token_bucket::step`], returning its decisions.
pub fn reference_decisions(steps: &[RandomStep], rule: &RateLimitRule) -> Vec<BucketDecision> {
    let mut state: Option<BucketState> = None;
    steps
        .iter()
        .map(|s| {
            let out =
                token_bucket::step(state, rule.max_tokens(), rule.refill_rate(), s.cost, s.now);
            if out.store.is_some() {
                state = out.store;
            }
            out.decision
        })
        .collect()
}

/// Replays a workload through a store, returning its decisions.
pub async fn store_decisions(
    store: &dyn BucketStore,
    key: &BucketKey,
    steps: &[RandomStep],
    rule: &RateLimitRule,
) -> Vec<BucketDecision> {
    let mut out = Vec::with_capacity(steps.len());
    for s in steps {
        out.push(take(store, key, rule, s.cost, s.now).await);
    }
    out
}
