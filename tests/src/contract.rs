//! The conformance suite of the [`BucketStore`] port.
//!
//! Every store must pass every function here; `tests/contract.rs` runs them against the
//! memory store and the Redis store. The checks use explicit `now` values so that both stores
//! see the same times, and each takes a key prefix so that tests sharing a Redis never share
//! a bucket.

use std::time::Duration;

use ratelimit_domain::token_bucket::{self, BucketState};
use ratelimit_domain::{
    BucketDecision, BucketKey, BucketRequest, BucketStore, KeyBuilder, RateLimitRule,
    RateLimitScope,
};

pub use crate::fixtures::{login_rule, rule};

/// A fixed "now" for the suite: 2023-11-14T22:13:20Z.
pub const T0: f64 = 1_700_000_000.0;

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
        .check_and_consume(&BucketRequest::new(key, rule).with_cost(cost).at(now))
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
    a_cost_above_two_to_the_53_is_denied_for_ever(store, prefix).await;
    retry_after_keeps_sub_second_precision(store, prefix).await;
    invalid_now_is_rejected(store, prefix).await;
    an_answer_at_once_is_the_answer_of_the_async_check(store, prefix).await;
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
    // Ten seconds "earlier": nothing has refilled, and nothing will until the clock reaches
    // the bucket's time: 10 s, then 1 s for the token.
    let d = take(store, &k, &r, 1, T0).await;
    assert!(!d.allowed);
    assert_eq!(d.retry_after, Duration::from_secs(11));
    // Back at the later time: still nothing, since the bucket's time did not go back.
    assert!(!take(store, &k, &r, 1, T0 + 10.0).await.allowed);
    assert!(take(store, &k, &r, 1, T0 + 11.0).await.allowed);
}

/// A cost that a double rounds down to the capacity (2^53 + 1 against 2^53) is still above
/// it: denied for ever, and nothing is taken.
pub async fn a_cost_above_two_to_the_53_is_denied_for_ever(store: &dyn BucketStore, prefix: &str) {
    let k = key(prefix, "10.0.0.15", "POST /export");
    let max = ratelimit_domain::MAX_TOKENS_LIMIT;
    let r = rule(max, 1e12);
    for cost in [max + 1, max + 2, u64::MAX] {
        let d = take(store, &k, &r, cost, T0).await;
        assert!(!d.allowed, "cost {cost}");
        assert!(d.is_never(), "cost {cost}: retry_after {:?}", d.retry_after);
        assert_eq!(d.remaining, max, "cost {cost}");
    }
    let d = take(store, &k, &r, max, T0).await;
    assert!(d.allowed);
    assert_eq!(d.remaining, 0);
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
            .check_and_consume(&BucketRequest::new(&k, &login_rule()).with_cost(1).at(bad))
            .await
            .err();
        assert_eq!(
            err.map(|e| e.code()),
            Some(ratelimit_domain::ErrorCode::InvalidInput),
            "now = {bad}"
        );
    }
}

/// `check_now`, where a store answers it, decides and takes exactly as `check_and_consume`:
/// two buckets of the same rule, one driven through each, see the same decisions; a bad `now`
/// is refused the same way. (A store that always waits answers `None`, and the adapter then
/// awaits `check_and_consume`.)
pub async fn an_answer_at_once_is_the_answer_of_the_async_check(
    store: &dyn BucketStore,
    prefix: &str,
) {
    let rule = login_rule();
    let (by_future, at_once) = (
        key(prefix, "10.0.0.15", "GET /now"),
        key(prefix, "10.0.0.16", "GET /now"),
    );
    let mut sequence = Sequence::new(0x5EED_0015);
    let mut now = 1_000.0;
    for step in 0..40 {
        now += (sequence.next_u64() % 4_000) as f64 / 1_000.0;
        let cost = 1 + sequence.next_u64() % 3;
        let expected = take(store, &by_future, &rule, cost, now).await;
        let request = BucketRequest::new(&at_once, &rule).with_cost(cost).at(now);
        let Some(answer) = store.check_now(&request) else {
            return;
        };
        let answer = answer.unwrap_or_else(|err| panic!("check_now failed: {err}"));
        assert_eq!(answer, expected, "step {step}, cost {cost}, now {now}");
    }
    let bad = BucketRequest::new(&at_once, &rule)
        .with_cost(1)
        .at(f64::NAN);
    let refused = store
        .check_now(&bad)
        .map(|answer| answer.err().map(|e| e.code()));
    assert_eq!(
        refused,
        Some(Some(ratelimit_domain::ErrorCode::InvalidInput)),
        "now = NaN"
    );
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

/// A bucket's stored value that no step could have written (or that a step could, chosen to sit
/// on an edge), as someone with write access to Redis, a bug or a corrupt restore may leave it,
/// and the state [`token_bucket::step`] must be given to decide as the store does.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredGarbage {
    /// What it is, for failure messages.
    pub name: String,
    /// What is written at the bucket's key(s).
    pub value: GarbageValue,
    /// The state a Lua script reads from it (`tonumber` of the text, `struct.unpack` of the
    /// bytes), `None` when it reads no state at all (a missing key, a value of another size).
    pub reads_as: Option<BucketState>,
}

/// The raw value of a [`StoredGarbage`], in one of the two Redis layouts.
#[derive(Debug, Clone, PartialEq)]
pub enum GarbageValue {
    /// The specification's layout: the text of `<key>:tokens` and `<key>:time`, `None` for a
    /// key that is not there.
    TwoKeys(Option<String>, Option<String>),
    /// The compact layout: the bytes of `<key>:tb`.
    Compact(Vec<u8>),
}

/// The compact layout's value for `tokens`, `last` and a recorded expiry.
pub fn compact_bytes(tokens: f64, last: f64, expires: u32) -> Vec<u8> {
    let mut raw = tokens.to_le_bytes().to_vec();
    raw.extend_from_slice(&last.to_le_bytes());
    raw.extend_from_slice(&expires.to_le_bytes());
    raw
}

/// The catalogue of hostile stored values for a bucket of `max_tokens` at `now`: every pair of
/// tokens and time from non-finite, negative, above capacity, far-future and edge values, in
/// both layouts; texts Lua reads its own way (`0x10`, spaces, `1e400`, `nan(1)`); text that is
/// no number; one key of two missing; junk bytes (`seed` picks them), values of the wrong size,
/// and the previous version's 16 bytes.
pub fn stored_garbage(
    max_tokens: u64,
    refill_rate: f64,
    now: f64,
    seed: u64,
) -> Vec<StoredGarbage> {
    let max = max_tokens as f64;
    let horizon = token_bucket::future_horizon(max, refill_rate);
    let tokens = [
        f64::NAN,
        -f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        -1e308,
        -1.0,
        -0.0,
        0.0,
        max / 2.0,
        max,
        max + 1.0,
        1e308,
    ];
    let times = [
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        -1e308,
        -1.0,
        0.0,
        now - 30.0,
        now,
        now + 10.0,
        now + horizon,
        now + horizon + 1.0,
        now + 1e9,
        1e308,
    ];
    let mut out = Vec::new();
    for &t in &tokens {
        for &l in &times {
            let reads_as = Some(BucketState { tokens: t, last: l });
            out.push(StoredGarbage {
                name: format!("tokens {t:e}, time {l:e}, two keys"),
                // Rust's shortest round-trip text ("NaN", "inf", digits): Lua's strtod reads
                // each back as the same double.
                value: GarbageValue::TwoKeys(Some(format!("{t:?}")), Some(format!("{l:?}"))),
                reads_as,
            });
            for expires in [0, u32::MAX] {
                out.push(StoredGarbage {
                    name: format!("tokens {t:e}, time {l:e}, expires {expires}, compact"),
                    value: GarbageValue::Compact(compact_bytes(t, l, expires)),
                    reads_as,
                });
            }
        }
    }
    let text =
        |tokens: Option<&str>, last: Option<&str>, reads_as: Option<(f64, f64)>| StoredGarbage {
            name: format!("text {tokens:?} / {last:?}"),
            value: GarbageValue::TwoKeys(tokens.map(str::to_owned), last.map(str::to_owned)),
            reads_as: reads_as.map(|(tokens, last)| BucketState { tokens, last }),
        };
    let now_text = format!("{now:?}");
    let now_text = Some(now_text.as_str());
    out.extend([
        text(Some("nan"), now_text, Some((f64::NAN, now))),
        text(Some("0"), Some("nan"), Some((0.0, f64::NAN))),
        text(Some("0"), Some("nan(123)"), Some((0.0, f64::NAN))),
        text(Some("0"), Some("-Infinity"), Some((0.0, f64::NEG_INFINITY))),
        text(Some("1e400"), now_text, Some((f64::INFINITY, now))),
        text(Some("-1e400"), now_text, Some((f64::NEG_INFINITY, now))),
        text(Some("0x1"), now_text, Some((1.0, now))),
        text(Some(" 1 "), now_text, Some((1.0, now))),
        text(Some("1e-400"), now_text, Some((0.0, now))),
        text(Some("0"), Some("1e400"), Some((0.0, f64::INFINITY))),
        text(Some("abc"), now_text, None),
        text(Some(""), now_text, None),
        text(Some("1 2"), now_text, None),
        text(Some("0"), Some("yesterday"), None),
        text(Some("0"), None, None),
        text(None, Some("1e308"), None),
    ]);
    let compact = |name: String, bytes: Vec<u8>, reads_as: Option<(f64, f64)>| StoredGarbage {
        name,
        value: GarbageValue::Compact(bytes),
        reads_as: reads_as.map(|(tokens, last)| BucketState { tokens, last }),
    };
    let mut rng = Sequence::new(seed);
    for i in 0..64 {
        let junk: Vec<u8> = (0..20).map(|_| rng.next_u64().to_le_bytes()[3]).collect();
        let read = |at: usize| {
            let mut bytes = [0_u8; 8];
            bytes.copy_from_slice(&junk[at..at + 8]);
            f64::from_le_bytes(bytes)
        };
        let reads_as = Some((read(0), read(8)));
        out.push(compact(
            format!("20 junk bytes #{i}: {junk:?}"),
            junk.clone(),
            reads_as,
        ));
        let short = junk[..16].to_vec();
        out.push(compact(
            format!("16 junk bytes #{i}: {short:?}"),
            short,
            reads_as,
        ));
    }
    let nan16 = [f64::NAN.to_le_bytes(), f64::NAN.to_le_bytes()].concat();
    out.push(compact(
        "16 bytes of NaN".to_owned(),
        nan16,
        Some((f64::NAN, f64::NAN)),
    ));
    let legacy = [0.0_f64.to_le_bytes(), (now + 10.0).to_le_bytes()].concat();
    out.push(compact(
        "16 bytes, empty, 10 s ahead (previous version)".to_owned(),
        legacy,
        Some((0.0, now + 10.0)),
    ));
    for size in [0, 1, 8, 15, 17, 19, 21, 24, 40, 1000] {
        let bytes = vec![0xFF; size];
        out.push(compact(format!("{size} bytes of 0xFF"), bytes, None));
        let zeros = vec![0; size];
        out.push(compact(format!("{size} zero bytes"), zeros, None));
    }
    out
}

/// The key of one named limit's bucket: `<prefix>:<scope>#<name>:<identifier>:<endpoint>`.
///
/// # Panics
/// For an unusable name or identifier (a bug in the test).
pub fn limit_key(
    prefix: &str,
    limit: &ratelimit_domain::Limit,
    identifier: &str,
    endpoint: &str,
) -> BucketKey {
    KeyBuilder::for_limit(prefix, endpoint, limit)
        .and_then(|keys| keys.key(identifier))
        .unwrap_or_else(|err| panic!("bad test key: {err}"))
}

/// A named limit, for the multi-limit suite.
///
/// # Panics
/// For an invalid name or rule (a bug in the test).
pub fn named(
    name: &str,
    scope: RateLimitScope,
    max_tokens: u64,
    refill_rate: f64,
) -> ratelimit_domain::Limit {
    let rule = RateLimitRule::new(scope, max_tokens, refill_rate)
        .unwrap_or_else(|err| panic!("bad test rule: {err}"));
    ratelimit_domain::Limit::named(name, rule).unwrap_or_else(|err| panic!("bad test limit: {err}"))
}

async fn take_all(
    store: &dyn BucketStore,
    buckets: &[(&BucketKey, &RateLimitRule, u64)],
    now: f64,
) -> Vec<BucketDecision> {
    let requests: Vec<BucketRequest<'_>> = buckets
        .iter()
        .map(|&(key, rule, cost)| BucketRequest::new(key, rule).with_cost(cost).at(now))
        .collect();
    store
        .check_and_consume_all(&requests)
        .await
        .unwrap_or_else(|err| panic!("check_and_consume_all failed: {err}"))
}

/// Runs the whole multi-limit suite: `check_and_consume_all` is the reference
/// [`token_bucket::step_all`], on every store and every layer.
pub async fn run_multi(store: &dyn BucketStore, prefix: &str) {
    every_limit_takes_or_none_does(store, prefix).await;
    the_longest_wait_and_never_are_reported_per_limit(store, prefix).await;
    one_bucket_is_a_single_check(store, prefix).await;
    repeated_buckets_are_rejected(store, prefix).await;
    multi_limit_random_workloads_match_the_reference(store, prefix).await;
}

/// A per-client limit of 10 and a shared one of 3: three requests pass and take from both; the
/// fourth is refused by the shared limit and takes nothing from the client's.
pub async fn every_limit_takes_or_none_does(store: &dyn BucketStore, prefix: &str) {
    let client = named("per-client", RateLimitScope::Ip, 10, 60.0);
    let shared = named("everyone", RateLimitScope::Global, 3, 60.0);
    let client_key = limit_key(prefix, &client, "203.0.113.9", "GET /search");
    let shared_key = limit_key(prefix, &shared, "203.0.113.9", "GET /search");
    let both = [
        (&client_key, client.rule(), 1),
        (&shared_key, shared.rule(), 1),
    ];
    for expected in [(9, 2), (8, 1), (7, 0)] {
        let d = take_all(store, &both, T0).await;
        assert!(d[0].allowed && d[1].allowed, "{d:?}");
        assert_eq!((d[0].remaining, d[1].remaining), expected);
    }
    let refused = take_all(store, &both, T0).await;
    assert!(refused[0].allowed, "the client limit had its tokens");
    assert_eq!(refused[0].remaining, 7);
    assert_eq!(refused[0].retry_after, Duration::ZERO);
    assert!(!refused[1].allowed);
    assert_eq!(refused[1].retry_after, Duration::from_secs(1));
    // Nothing was taken from the client's bucket by the refused requests.
    for _ in 0..5 {
        assert!(!take_all(store, &both, T0).await[1].allowed);
    }
    assert_eq!(remaining(store, &client_key, client.rule(), T0).await, 7);
    // A second later the shared bucket has one token again: the next request takes from both.
    let later = take_all(store, &both, T0 + 1.0).await;
    assert!(later.iter().all(|d| d.allowed), "{later:?}");
    assert_eq!((later[0].remaining, later[1].remaining), (7, 0));
}

/// Each limit reports its own wait; a cost above one limit's capacity is "never" for it.
pub async fn the_longest_wait_and_never_are_reported_per_limit(
    store: &dyn BucketStore,
    prefix: &str,
) {
    let fast = named("fast", RateLimitScope::Ip, 2, 60.0);
    let slow = named("slow", RateLimitScope::User, 2, 6.0);
    let fast_key = limit_key(prefix, &fast, "u1", "POST /export");
    let slow_key = limit_key(prefix, &slow, "u1", "POST /export");
    let both = |cost| {
        [
            (&fast_key, fast.rule(), cost),
            (&slow_key, slow.rule(), cost),
        ]
    };
    assert!(
        take_all(store, &both(2), T0)
            .await
            .iter()
            .all(|d| d.allowed)
    );
    let d = take_all(store, &both(1), T0).await;
    assert_eq!(d[0].retry_after, Duration::from_secs(1));
    assert_eq!(d[1].retry_after, Duration::from_secs(10));
    assert_eq!(
        token_bucket::combined_retry_after(&d),
        Duration::from_secs(10)
    );
    let small = named("small", RateLimitScope::Ip, 1, 60.0);
    let small_key = limit_key(prefix, &small, "u1", "POST /export");
    let never = take_all(
        store,
        &[(&fast_key, fast.rule(), 2), (&small_key, small.rule(), 2)],
        T0 + 100.0,
    )
    .await;
    assert!(never[0].allowed, "the fast limit had refilled");
    assert!(never[1].is_never());
    assert_eq!(
        token_bucket::combined_retry_after(&never),
        BucketDecision::NEVER
    );
    // Nothing was taken from the fast limit.
    assert_eq!(
        remaining(store, &fast_key, fast.rule(), T0 + 100.0).await,
        2
    );
}

/// `check_and_consume_all` of one bucket decides as `check_and_consume`, and of none answers
/// nothing.
pub async fn one_bucket_is_a_single_check(store: &dyn BucketStore, prefix: &str) {
    let rule = login_rule();
    let k = key(prefix, "198.51.100.1", "POST /api/v1/sessions");
    for n in (0..5).rev() {
        let d = take_all(store, &[(&k, &rule, 1)], T0).await;
        assert_eq!(d.len(), 1);
        assert!(d[0].allowed);
        assert_eq!(d[0].remaining, n);
    }
    let d = take_all(store, &[(&k, &rule, 1)], T0).await;
    assert!(!d[0].allowed);
    assert_eq!(d[0].retry_after, Duration::from_secs(12));
    assert!(take_all(store, &[], T0).await.is_empty());
}

/// The same bucket twice in one check is a caller's bug: an error, nothing taken.
pub async fn repeated_buckets_are_rejected(store: &dyn BucketStore, prefix: &str) {
    let rule = login_rule();
    let k = key(prefix, "198.51.100.2", "POST /api/v1/sessions");
    let requests = [
        BucketRequest::new(&k, &rule).at(T0),
        BucketRequest::new(&k, &rule).at(T0),
    ];
    let err = store
        .check_and_consume_all(&requests)
        .await
        .expect_err("a repeated bucket was accepted");
    assert_eq!(err.code(), ratelimit_domain::ErrorCode::InvalidInput);
    assert_eq!(remaining(store, &k, &rule, T0).await, 5);
}

/// Random requests over three limits (two clients' own buckets, a shared one, a per-user one)
/// with random costs and times, decided bit for bit as [`token_bucket::step_all`] decides them.
pub async fn multi_limit_random_workloads_match_the_reference(
    store: &dyn BucketStore,
    prefix: &str,
) {
    let limits = [
        named("client", RateLimitScope::Ip, 6, 37.0),
        named("shared", RateLimitScope::Global, 9, 23.5),
        named("user", RateLimitScope::User, 4, 11.0),
    ];
    let clients = ["a", "b"];
    // (client, limit) → key; the shared limit's key is the same for both clients.
    let keys: Vec<Vec<BucketKey>> = clients
        .iter()
        .map(|client| {
            limits
                .iter()
                .map(|limit| limit_key(prefix, limit, client, "GET /random"))
                .collect()
        })
        .collect();
    let mut states: std::collections::HashMap<BucketKey, BucketState> =
        std::collections::HashMap::new();
    let mut rng = Sequence::new(0x0A11_0F0E);
    let mut now = T0;
    let (mut allowed, mut refused, mut never) = (0, 0, 0);
    for n in 0..600 {
        now += match rng.below(6) {
            0..=2 => 0.0,
            3 | 4 => rng.below(800) as f64 / 1_000.0,
            _ => -(rng.below(500) as f64 / 1_000.0),
        };
        let client = usize::from(rng.below(2) == 1);
        // Two or three of the limits, in a random order.
        let mut chosen: Vec<usize> = vec![0, 1, 2];
        if rng.below(3) == 0 {
            chosen.remove(usize::from(rng.below(3) > 0) + usize::from(rng.below(2) > 0));
        }
        if rng.below(2) == 0 {
            chosen.reverse();
        }
        let cost = match rng.below(25) {
            0 => 0,
            1 => 5,
            _ => 1 + rng.below(2),
        };
        let buckets: Vec<(&BucketKey, &RateLimitRule, u64)> = chosen
            .iter()
            .map(|&i| (&keys[client][i], limits[i].rule(), cost))
            .collect();
        let inputs: Vec<token_bucket::StepInput> = buckets
            .iter()
            .map(|&(key, rule, cost)| token_bucket::StepInput {
                stored: states.get(key).copied(),
                max_tokens: rule.max_tokens(),
                refill_rate: rule.refill_rate(),
                cost,
            })
            .collect();
        let expected = token_bucket::step_all(&inputs, now);
        let got = take_all(store, &buckets, now).await;
        let want: Vec<BucketDecision> = expected.iter().map(|s| s.decision).collect();
        assert_eq!(
            got, want,
            "step {n}: limits {chosen:?}, cost {cost}, now {now}"
        );
        for (&(key, _, _), step) in buckets.iter().zip(&expected) {
            if let Some(state) = step.store {
                states.insert(key.clone(), state);
            }
        }
        match () {
            () if want.iter().all(|d| d.allowed) => allowed += 1,
            () if want.iter().any(BucketDecision::is_never) => never += 1,
            () => refused += 1,
        }
    }
    // The workload must exercise every kind of decision, or it proves little.
    assert!(
        allowed > 30 && refused > 30 && never > 0,
        "{allowed} {refused} {never}"
    );
}
