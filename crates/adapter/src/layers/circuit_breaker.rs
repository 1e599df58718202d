//! A circuit breaker in front of a store.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ratelimit_domain::{
    BucketDecision, BucketKey, BucketRequest, BucketStore, ErrorCode, RateLimitError,
    RateLimitRule, Result,
};
use tokio::time::Instant;

/// When a [`CircuitBreakerStore`] opens and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CircuitBreakerConfig {
    /// Consecutive infrastructure failures that open the circuit.
    pub failure_threshold: u32,
    /// How long the circuit stays open before one probe is let through.
    pub cooldown: Duration,
}

impl CircuitBreakerConfig {
    /// A breaker that opens after `failure_threshold` consecutive failures (at least 1) and
    /// probes again after `cooldown`.
    pub fn new(failure_threshold: u32, cooldown: Duration) -> Self {
        Self {
            failure_threshold: failure_threshold.max(1),
            cooldown,
        }
    }
}

impl Default for CircuitBreakerConfig {
    /// Opens after 5 consecutive failures; probes every 500 ms.
    fn default() -> Self {
        Self::new(5, Duration::from_millis(500))
    }
}

/// Where a breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CircuitState {
    /// Calls go to the store.
    Closed,
    /// Calls fail at once, without touching the store, until the cool-down ends.
    Open,
    /// The cool-down has ended and one probe call is (or may be) on its way to the store.
    HalfOpen,
}

/// A [`BucketStore`] that stops calling a failing store for a while.
///
/// After [`failure_threshold`](CircuitBreakerConfig::failure_threshold) consecutive
/// store failures (unavailable, timeout, store error: [`ErrorCode::is_store_failure`]) the
/// circuit opens: checks fail at once with [`ErrorCode::StorageUnavailable`], so the adapter
/// applies its failure policy without waiting for a deadline on every request. After the
/// cool-down one probe goes through; if it answers, the circuit closes, otherwise it stays
/// open for another cool-down.
///
/// Only the store's own health moves the breaker, never what a caller does or one bucket
/// holds:
/// - Bad input (`InvalidInput`) neither counts as a failure nor closes the circuit.
/// - One bucket's unusable data ([`ErrorCode::CorruptBucket`]: a key of the wrong type, say)
///   is an answer from a working store: it counts as a success, so a corrupt key cannot open
///   the circuit for every other key.
/// - A call whose caller goes away before the store answers (a client that disconnects, an
///   outer timeout) is not counted at all: it says nothing about the store. Were it counted as
///   a failure, any client could open the circuit — and, under fail-open, switch limiting off
///   for everyone — by cancelling a handful of requests. An abandoned probe hands the probe
///   to the next call. The store's own deadline still bounds every call that is awaited, so a
///   store that really hangs is still noticed by the callers that wait for it.
///
/// `reset` always goes to the store: an admin operation wants the store's real answer.
///
/// Generic over the store it wraps: `CircuitBreakerStore<RedisStorage>` calls Redis directly,
/// `CircuitBreakerStore` (`S = dyn BucketStore`) whatever store was chosen at run time.
#[derive(Debug)]
pub struct CircuitBreakerStore<S: ?Sized = dyn BucketStore> {
    inner: Arc<S>,
    config: CircuitBreakerConfig,
    consecutive_failures: AtomicU32,
    /// When the circuit opened; `None` while closed. Short critical sections, never held
    /// across an await, hence a std mutex.
    opened_at: Mutex<Option<Instant>>,
    /// Whether `opened_at` is `Some`: lets the common case (closed circuit) admit and record
    /// calls without taking the lock. Written only while the lock is held.
    open: std::sync::atomic::AtomicBool,
    /// Whether the half-open probe has been handed out.
    probing: std::sync::atomic::AtomicBool,
    /// Calls turned away without touching the store.
    short_circuited: AtomicU64,
}

/// What to do with one call.
enum Admission {
    Call { probe: bool },
    Reject,
}

impl<S: ?Sized> CircuitBreakerStore<S> {
    /// Wraps `inner`.
    pub fn new(inner: Arc<S>, config: CircuitBreakerConfig) -> Self {
        Self {
            inner,
            config,
            consecutive_failures: AtomicU32::new(0),
            opened_at: Mutex::new(None),
            open: std::sync::atomic::AtomicBool::new(false),
            probing: std::sync::atomic::AtomicBool::new(false),
            short_circuited: AtomicU64::new(0),
        }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &Arc<S> {
        &self.inner
    }

    /// Where the breaker stands now.
    pub fn state(&self) -> CircuitState {
        match *self.opened() {
            None => CircuitState::Closed,
            Some(at) if at.elapsed() < self.config.cooldown => CircuitState::Open,
            Some(_) => CircuitState::HalfOpen,
        }
    }

    /// How many calls were turned away without touching the store.
    pub fn short_circuited(&self) -> u64 {
        self.short_circuited.load(Ordering::Relaxed)
    }

    fn opened(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        // Every write is a single assignment, so a poisoned lock still holds a valid value.
        self.opened_at
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn admit(&self) -> Admission {
        if !self.open.load(Ordering::Acquire) {
            return Admission::Call { probe: false };
        }
        let opened_at = *self.opened();
        match opened_at {
            None => Admission::Call { probe: false },
            Some(at) if at.elapsed() < self.config.cooldown => Admission::Reject,
            Some(_) => {
                if self.probing.swap(true, Ordering::AcqRel) {
                    Admission::Reject
                } else {
                    Admission::Call { probe: true }
                }
            }
        }
    }

    fn record<T>(&self, probe: bool, outcome: &Result<T>) {
        match outcome {
            Err(err) if err.code().is_store_failure() => {
                let failures = self
                    .consecutive_failures
                    .fetch_add(1, Ordering::AcqRel)
                    .saturating_add(1);
                if probe || failures >= self.config.failure_threshold {
                    let mut opened = self.opened();
                    let was_closed = opened.is_none();
                    *opened = Some(Instant::now());
                    self.open.store(true, Ordering::Release);
                    drop(opened);
                    if was_closed {
                        tracing::warn!(failures, cooldown_ms = self.config.cooldown.as_millis(), error = %err, "rate-limit store failing; circuit opened");
                    }
                }
                if probe {
                    self.probing.store(false, Ordering::Release);
                }
            }
            Err(err) if err.code() != ErrorCode::CorruptBucket => {
                // Bad input says nothing about the store's health: no state changes.
                if probe {
                    self.probing.store(false, Ordering::Release);
                }
            }
            // An answer, even one about a corrupt bucket, shows a working store.
            Ok(_) | Err(_) => {
                self.consecutive_failures.store(0, Ordering::Release);
                let was_open = self.open.load(Ordering::Acquire) && {
                    let mut opened = self.opened();
                    self.open.store(false, Ordering::Release);
                    opened.take().is_some()
                };
                if probe {
                    self.probing.store(false, Ordering::Release);
                }
                if was_open {
                    tracing::info!("rate-limit store answering again; circuit closed");
                }
            }
        }
    }

    fn rejected(&self) -> RateLimitError {
        self.short_circuited.fetch_add(1, Ordering::Relaxed);
        RateLimitError::new(
            ErrorCode::StorageUnavailable,
            "circuit open: the store failed repeatedly and is not being called",
        )
        .with_detail("circuit", "open")
    }
}

impl<S: BucketStore + ?Sized> CircuitBreakerStore<S> {
    /// Runs one call to the store through the breaker.
    async fn guarded<T: Send>(&self, call: impl Future<Output = Result<T>> + Send) -> Result<T> {
        let Admission::Call { probe } = self.admit() else {
            // A rejected check does no I/O, so nothing else would make the task yield: a
            // caller looping on failed-open checks could then starve the very tasks (the
            // probe, the connection's driver) that close the circuit again. Spend Tokio's
            // cooperative budget, which yields every so often.
            tokio::task::consume_budget().await;
            return Err(self.rejected());
        };
        // If the caller drops this future mid-call (a client disconnects, an outer timeout), the
        // guard releases the probe, so that it never stays "in flight" for ever with the
        // circuit rejecting everything behind it; the abandoned call itself is not counted.
        let mut guard = Pending {
            breaker: self,
            probe,
            done: false,
        };
        let outcome = call.await;
        guard.done = true;
        self.record(probe, &outcome);
        outcome
    }
}

/// Releases the probe of a call dropped before the store answered; records nothing else.
struct Pending<'a, S: ?Sized> {
    breaker: &'a CircuitBreakerStore<S>,
    probe: bool,
    done: bool,
}

impl<S: ?Sized> Drop for Pending<'_, S> {
    fn drop(&mut self) {
        if !self.done && self.probe {
            self.breaker.probing.store(false, Ordering::Release);
        }
    }
}

#[async_trait]
impl<S: BucketStore + ?Sized> BucketStore for CircuitBreakerStore<S> {
    async fn check_and_consume<'a>(&self, request: &BucketRequest<'a>) -> Result<BucketDecision> {
        self.guarded(self.inner.check_and_consume(request)).await
    }

    async fn check_and_consume_all<'a>(
        &self,
        requests: &[BucketRequest<'a>],
    ) -> Result<Vec<BucketDecision>> {
        self.guarded(self.inner.check_and_consume_all(requests))
            .await
    }

    async fn get_remaining(
        &self,
        key: &BucketKey,
        rule: &RateLimitRule,
        now: Option<f64>,
    ) -> Result<u64> {
        self.guarded(self.inner.get_remaining(key, rule, now)).await
    }

    async fn reset(&self, key: &BucketKey, rule: &RateLimitRule) -> Result<bool> {
        let outcome = self.inner.reset(key, rule).await;
        if outcome.is_ok() {
            self.record(false, &outcome);
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use ratelimit_domain::RateLimitScope;

    use super::*;

    /// A store that fails while `down` is set, and counts calls.
    #[derive(Debug, Default)]
    struct Flaky {
        down: AtomicBool,
        /// While set, calls never answer.
        hang: AtomicBool,
        /// While set (and not down), calls answer that the bucket's data is unusable.
        corrupt: AtomicBool,
        calls: AtomicU32,
    }

    #[async_trait]
    impl BucketStore for Flaky {
        async fn check_and_consume<'a>(&self, _: &BucketRequest<'a>) -> Result<BucketDecision> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.hang.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            if self.down.load(Ordering::SeqCst) {
                Err(RateLimitError::new(ErrorCode::StorageTimeout, "slow"))
            } else if self.corrupt.load(Ordering::SeqCst) {
                Err(RateLimitError::new(
                    ErrorCode::CorruptBucket,
                    "WRONGTYPE Operation against a key holding the wrong kind of value",
                ))
            } else {
                Ok(BucketDecision {
                    allowed: true,
                    retry_after: Duration::ZERO,
                    remaining: 1,
                })
            }
        }
        async fn check_and_consume_all<'a>(
            &self,
            requests: &[BucketRequest<'a>],
        ) -> Result<Vec<BucketDecision>> {
            super::super::one_by_one(self, requests).await
        }
        async fn get_remaining(
            &self,
            _: &BucketKey,
            _: &RateLimitRule,
            _: Option<f64>,
        ) -> Result<u64> {
            Err(RateLimitError::new(ErrorCode::InvalidInput, "bad"))
        }
        async fn reset(&self, _: &BucketKey, _: &RateLimitRule) -> Result<bool> {
            Ok(true)
        }
    }

    /// One check of cost 1 through `breaker`.
    async fn check(
        breaker: &CircuitBreakerStore<Flaky>,
        key: &BucketKey,
        rule: &RateLimitRule,
    ) -> Result<BucketDecision> {
        breaker
            .check_and_consume(&BucketRequest::new(key, rule).with_cost(1))
            .await
    }

    /// Three failed checks: with the threshold of [`setup`], the circuit opens.
    async fn fail_three_times(
        flaky: &Flaky,
        breaker: &CircuitBreakerStore<Flaky>,
        key: &BucketKey,
        rule: &RateLimitRule,
    ) {
        flaky.down.store(true, Ordering::SeqCst);
        for _ in 0..3 {
            let _ = check(breaker, key, rule).await;
        }
    }

    fn setup() -> (
        Arc<Flaky>,
        CircuitBreakerStore<Flaky>,
        BucketKey,
        RateLimitRule,
    ) {
        let flaky = Arc::new(Flaky::default());
        let breaker = CircuitBreakerStore::new(
            flaky.clone(),
            CircuitBreakerConfig::new(3, Duration::from_secs(1)),
        );
        let key = BucketKey::new(RateLimitScope::Ip, "1.2.3.4", "GET /x").unwrap();
        let rule = RateLimitRule::new(RateLimitScope::Ip, 5, 5.0).unwrap();
        (flaky, breaker, key, rule)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_loop_of_rejected_checks_still_lets_other_tasks_run() {
        let (flaky, breaker, key, rule) = setup();
        flaky.down.store(true, Ordering::SeqCst);
        let other_ran = Arc::new(AtomicBool::new(false));
        let flag = other_ran.clone();
        tokio::spawn(async move { flag.store(true, Ordering::SeqCst) });
        for _ in 0..1_000 {
            assert!(check(&breaker, &key, &rule).await.is_err());
        }
        assert!(breaker.short_circuited() > 900);
        assert!(
            other_ran.load(Ordering::SeqCst),
            "the spawned task never ran"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_the_threshold_then_probes_and_closes() {
        let (flaky, breaker, key, rule) = setup();
        flaky.down.store(true, Ordering::SeqCst);
        for _ in 0..3 {
            assert!(check(&breaker, &key, &rule).await.is_err());
        }
        assert_eq!(breaker.state(), CircuitState::Open);
        // Open: no call reaches the store.
        for _ in 0..100 {
            let err = check(&breaker, &key, &rule).await.unwrap_err();
            assert_eq!(err.code(), ErrorCode::StorageUnavailable);
        }
        assert_eq!(flaky.calls.load(Ordering::SeqCst), 3);
        assert_eq!(breaker.short_circuited(), 100);

        // After the cool-down one probe goes through; it fails, so the circuit stays open.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(breaker.state(), CircuitState::HalfOpen);
        assert!(check(&breaker, &key, &rule).await.is_err());
        assert_eq!(flaky.calls.load(Ordering::SeqCst), 4);
        assert_eq!(breaker.state(), CircuitState::Open);

        // The store recovers: the next probe closes the circuit.
        flaky.down.store(false, Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(check(&breaker, &key, &rule).await.is_ok());
        assert_eq!(breaker.state(), CircuitState::Closed);
        assert!(check(&breaker, &key, &rule).await.is_ok());
        assert_eq!(flaky.calls.load(Ordering::SeqCst), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn successes_reset_the_count_and_bad_input_does_not_count() {
        let (flaky, breaker, key, rule) = setup();
        for _ in 0..10 {
            flaky.down.store(true, Ordering::SeqCst);
            let _ = check(&breaker, &key, &rule).await;
            let _ = check(&breaker, &key, &rule).await;
            let _ = breaker.get_remaining(&key, &rule, None).await; // InvalidInput
            flaky.down.store(false, Ordering::SeqCst);
            assert!(check(&breaker, &key, &rule).await.is_ok());
        }
        assert_eq!(breaker.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_probe_does_not_leave_the_circuit_stuck() {
        let (flaky, breaker, key, rule) = setup();
        fail_three_times(&flaky, &breaker, &key, &rule).await;
        tokio::time::advance(Duration::from_secs(1)).await;
        // The probe's caller gives up before the store answers.
        flaky.hang.store(true, Ordering::SeqCst);
        let abandoned =
            tokio::time::timeout(Duration::from_millis(10), check(&breaker, &key, &rule)).await;
        assert!(abandoned.is_err(), "the probe should have been cut off");
        flaky.hang.store(false, Ordering::SeqCst);
        flaky.down.store(false, Ordering::SeqCst);
        // One cool-down later a new probe goes through and closes the circuit.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(check(&breaker, &key, &rule).await.is_ok());
        assert_eq!(breaker.state(), CircuitState::Closed);
    }

    /// The attack of issue 10: clients that disconnect before their answer. On the code
    /// before the fix, three abandoned calls opened the circuit.
    #[tokio::test(start_paused = true)]
    async fn abandoned_calls_never_open_the_circuit() {
        let (flaky, breaker, key, rule) = setup();
        flaky.hang.store(true, Ordering::SeqCst);
        for _ in 0..100 {
            let abandoned =
                tokio::time::timeout(Duration::from_millis(1), check(&breaker, &key, &rule)).await;
            assert!(abandoned.is_err(), "the call should have been cut off");
        }
        assert_eq!(breaker.state(), CircuitState::Closed);
        assert_eq!(breaker.short_circuited(), 0);
        assert_eq!(flaky.calls.load(Ordering::SeqCst), 100);
        // Real failures still count from zero: the abandoned calls left no debt.
        flaky.hang.store(false, Ordering::SeqCst);
        flaky.down.store(true, Ordering::SeqCst);
        for _ in 0..2 {
            let _ = check(&breaker, &key, &rule).await;
        }
        assert_eq!(breaker.state(), CircuitState::Closed);
        let _ = check(&breaker, &key, &rule).await;
        assert_eq!(breaker.state(), CircuitState::Open);
    }

    /// One corrupt bucket (a key of the wrong type) must not switch the store off for every
    /// other key: the store answered.
    #[tokio::test(start_paused = true)]
    async fn a_corrupt_bucket_is_an_answer_not_a_failure() {
        let (flaky, breaker, key, rule) = setup();
        flaky.corrupt.store(true, Ordering::SeqCst);
        for _ in 0..10 {
            let err = check(&breaker, &key, &rule).await.unwrap_err();
            assert_eq!(err.code(), ErrorCode::CorruptBucket);
        }
        assert_eq!(breaker.state(), CircuitState::Closed);
        // It even closes an open circuit when it is the probe's answer.
        fail_three_times(&flaky, &breaker, &key, &rule).await;
        assert_eq!(breaker.state(), CircuitState::Open);
        flaky.down.store(false, Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(1)).await;
        let _ = check(&breaker, &key, &rule).await;
        assert_eq!(breaker.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn bad_input_neither_opens_nor_closes_the_circuit() {
        let (flaky, breaker, key, rule) = setup();
        fail_three_times(&flaky, &breaker, &key, &rule).await;
        assert_eq!(breaker.state(), CircuitState::Open);
        tokio::time::advance(Duration::from_secs(1)).await;
        // The probe is a call with bad input: the circuit must not close on it.
        assert!(breaker.get_remaining(&key, &rule, None).await.is_err());
        assert_ne!(breaker.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_successful_reset_closes_the_circuit() {
        let (flaky, breaker, key, rule) = setup();
        fail_three_times(&flaky, &breaker, &key, &rule).await;
        assert_eq!(breaker.state(), CircuitState::Open);
        breaker.reset(&key, &rule).await.unwrap();
        assert_eq!(breaker.state(), CircuitState::Closed);
    }
}
