//! An in-process [`BucketStore`]: the same decisions as the Redis store, without Redis.
//!
//! # What it is for
//! - **The fake for services' unit tests.** Build the adapter over a [`MemoryStorage`] with a
//!   [`ManualClock`](ratelimit_domain::ManualClock), exhaust a bucket, advance the clock, and
//!   see the next request allowed, with no Redis and no sleeping.
//! - **A per-host limiter**, where limits need not be shared between hosts.
//!
//! # Guarantees
//! - Decisions are exactly those of [`ratelimit_domain::token_bucket::step`], which is what the
//!   Redis script computes; the workspace's conformance suite runs against both stores.
//! - `check_and_consume` is atomic per key (a mutex per shard of keys), and the store is
//!   `Send + Sync`.
//! - Memory stays bounded: a bucket lives as long as its keys would in Redis (time to refill
//!   plus 60 s after its last write); expired buckets read as missing (full) and are swept out
//!   as time passes.
//!
//! ```
//! use std::time::Duration;
//! use ratelimit_domain::{BucketKey, BucketStore, ManualClock, RateLimitRule, RateLimitScope};
//! use ratelimit_memory::MemoryStorage;
//!
//! # tokio_test_block_on(async {
//! let clock = ManualClock::new(1_000.0);
//! let store = MemoryStorage::with_clock(clock.clone());
//! let rule = RateLimitRule::new(RateLimitScope::Ip, 1, 5.0)?; // one token every 12 s
//! let key = BucketKey::new(RateLimitScope::Ip, "203.0.113.9", "POST /login")?;
//!
//! assert!(store.check_and_consume(&key, &rule, 1, None).await?.allowed);
//! assert!(!store.check_and_consume(&key, &rule, 1, None).await?.allowed);
//! clock.advance(Duration::from_secs(12));
//! assert!(store.check_and_consume(&key, &rule, 1, None).await?.allowed);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
//! # }
//! ```

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::BuildHasher;

use foldhash::fast::RandomState;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use ratelimit_domain::token_bucket::{self, BucketState};
use ratelimit_domain::{
    BucketDecision, BucketKey, BucketStore, Clock, RateLimitRule, Result, SystemClock,
};

/// Shards of the key space; each has its own lock, so unrelated keys rarely contend.
const SHARDS: usize = 16;

/// How often, in clock seconds, a shard drops its expired buckets.
const SWEEP_INTERVAL_SECONDS: f64 = 10.0;

/// An in-process token-bucket store. See the [crate docs](crate).
#[derive(Debug)]
pub struct MemoryStorage {
    shards: Box<[Mutex<Shard>]>,
    clock: Arc<dyn Clock>,
    /// Picks a key's shard. Seeded at random per store, like the shards' maps, so that crafted
    /// identifiers cannot be aimed at one shard.
    hasher: RandomState,
}

#[derive(Debug, Default)]
struct Shard {
    /// foldhash with a random seed: several times faster than std's SipHash on short keys.
    buckets: HashMap<Box<str>, StoredBucket, RandomState>,
    /// The clock time at or after which the next operation sweeps out expired buckets.
    next_sweep: f64,
}

#[derive(Debug, Clone, Copy)]
struct StoredBucket {
    state: BucketState,
    /// When the bucket is forgotten, as a Redis key with a TTL would be.
    expires_at: f64,
}

impl Default for MemoryStorage {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStorage {
    /// A store on the host's wall clock.
    pub fn new() -> Self {
        Self::with_clock(SystemClock)
    }

    /// A store on the given clock (a [`ManualClock`](ratelimit_domain::ManualClock) in tests).
    pub fn with_clock(clock: impl Clock) -> Self {
        Self::with_shared_clock(Arc::new(clock))
    }

    /// A store on a clock shared with other components.
    pub fn with_shared_clock(clock: Arc<dyn Clock>) -> Self {
        let shards = (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect();
        Self {
            shards,
            clock,
            hasher: RandomState::default(),
        }
    }

    /// How many buckets the store holds, expired ones not yet swept included.
    pub fn bucket_count(&self) -> usize {
        (0..SHARDS).map(|i| self.lock(i).buckets.len()).sum()
    }

    /// Drops every expired bucket now, rather than as time passes.
    pub fn sweep_expired(&self) {
        let now = self.clock.now();
        for i in 0..SHARDS {
            self.lock(i).sweep(now);
        }
    }

    fn now(&self, now: Option<f64>) -> Result<f64> {
        token_bucket::validate_now(now.unwrap_or_else(|| self.clock.now()))
    }

    fn shard_of(&self, key: &BucketKey) -> usize {
        // The remainder is below SHARDS, so the cast cannot truncate.
        #[allow(clippy::cast_possible_truncation)]
        let index = (self.hasher.hash_one(key.as_str()) % SHARDS as u64) as usize;
        index
    }

    fn lock(&self, index: usize) -> MutexGuard<'_, Shard> {
        // A panic while the lock was held cannot leave a bucket half-written (every update is
        // one assignment), so a poisoned lock is safe to use.
        self.shards[index]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Shard {
    fn sweep(&mut self, now: f64) {
        self.buckets.retain(|_, bucket| bucket.expires_at > now);
        self.next_sweep = now + SWEEP_INTERVAL_SECONDS;
    }

    fn live(&mut self, key: &str, now: f64) -> Option<BucketState> {
        if now >= self.next_sweep {
            self.sweep(now);
        }
        self.buckets
            .get(key)
            .filter(|bucket| bucket.expires_at > now)
            .map(|bucket| bucket.state)
    }

    fn store(&mut self, key: &str, state: BucketState, expires_at: f64) {
        let bucket = StoredBucket { state, expires_at };
        // Look up by &str first so that updating an existing bucket allocates nothing.
        if let Some(existing) = self.buckets.get_mut(key) {
            *existing = bucket;
        } else if let Entry::Vacant(slot) = self.buckets.entry(key.into()) {
            slot.insert(bucket);
        }
    }
}

#[async_trait]
impl BucketStore for MemoryStorage {
    async fn check_and_consume(
        &self,
        key: &BucketKey,
        rule: &RateLimitRule,
        cost: u64,
        now: Option<f64>,
    ) -> Result<BucketDecision> {
        let now = self.now(now)?;
        let mut shard = self.lock(self.shard_of(key));
        let step = token_bucket::step(
            shard.live(key.as_str(), now),
            rule.max_tokens(),
            rule.refill_rate(),
            cost,
            now,
        );
        if let Some(state) = step.store {
            shard.store(key.as_str(), state, now + rule.storage_ttl_seconds() as f64);
        }
        Ok(step.decision)
    }

    async fn get_remaining(
        &self,
        key: &BucketKey,
        rule: &RateLimitRule,
        now: Option<f64>,
    ) -> Result<u64> {
        Ok(self.check_and_consume(key, rule, 0, now).await?.remaining)
    }

    async fn reset(&self, key: &BucketKey, _rule: &RateLimitRule) -> Result<()> {
        self.lock(self.shard_of(key)).buckets.remove(key.as_str());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ratelimit_domain::{ManualClock, RateLimitScope};

    use super::*;

    fn rule(max: u64, rate: f64) -> RateLimitRule {
        RateLimitRule::new(RateLimitScope::Ip, max, rate).unwrap()
    }

    fn key(id: &str) -> BucketKey {
        BucketKey::new(RateLimitScope::Ip, id, "POST /login").unwrap()
    }

    #[tokio::test]
    async fn login_bucket_refills_when_the_clock_moves() {
        let clock = ManualClock::new(1_000.0);
        let store = MemoryStorage::with_clock(clock.clone());
        let rule = rule(5, 5.0);
        for expected in (0..5).rev() {
            let d = store
                .check_and_consume(&key("a"), &rule, 1, None)
                .await
                .unwrap();
            assert!(d.allowed);
            assert_eq!(d.remaining, expected);
        }
        let denied = store
            .check_and_consume(&key("a"), &rule, 1, None)
            .await
            .unwrap();
        assert!(!denied.allowed);
        assert_eq!(denied.retry_after, Duration::from_secs(12));
        clock.advance(Duration::from_secs(12));
        assert!(
            store
                .check_and_consume(&key("a"), &rule, 1, None)
                .await
                .unwrap()
                .allowed
        );
    }

    #[tokio::test]
    async fn idle_buckets_are_evicted_after_their_ttl() {
        let clock = ManualClock::new(1_000.0);
        let store = MemoryStorage::with_clock(clock.clone());
        let rule = rule(5, 5.0); // storage TTL 120 s
        for i in 0..100 {
            store
                .check_and_consume(&key(&i.to_string()), &rule, 1, None)
                .await
                .unwrap();
        }
        assert_eq!(store.bucket_count(), 100);
        clock.advance(Duration::from_secs(119));
        store.sweep_expired();
        assert_eq!(store.bucket_count(), 100);
        clock.advance(Duration::from_secs(2));
        // Any operation past the sweep interval sweeps its shard; sweep_expired does all.
        store
            .check_and_consume(&key("other"), &rule, 1, None)
            .await
            .unwrap();
        store.sweep_expired();
        assert_eq!(store.bucket_count(), 1);
    }

    #[tokio::test]
    async fn reset_and_peek() {
        let store = MemoryStorage::with_clock(ManualClock::new(10.0));
        let rule = rule(10, 1.0);
        store
            .check_and_consume(&key("a"), &rule, 7, None)
            .await
            .unwrap();
        assert_eq!(
            store.get_remaining(&key("a"), &rule, None).await.unwrap(),
            3
        );
        assert_eq!(
            store.get_remaining(&key("a"), &rule, None).await.unwrap(),
            3
        );
        store.reset(&key("a"), &rule).await.unwrap();
        assert_eq!(
            store.get_remaining(&key("a"), &rule, None).await.unwrap(),
            10
        );
        // Peeking at a bucket that does not exist creates nothing.
        assert_eq!(
            store.get_remaining(&key("b"), &rule, None).await.unwrap(),
            10
        );
        assert_eq!(store.bucket_count(), 0);
    }

    #[tokio::test]
    async fn invalid_now_is_an_error_not_a_panic() {
        let store = MemoryStorage::new();
        let err = store
            .check_and_consume(&key("a"), &rule(1, 1.0), 1, Some(f64::NAN))
            .await
            .unwrap_err();
        assert_eq!(err.code(), ratelimit_domain::ErrorCode::InvalidInput);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_checks_admit_exactly_capacity() {
        let store = Arc::new(MemoryStorage::with_clock(ManualClock::new(1.0)));
        let rule = rule(10, 1.0);
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let (store, rule) = (store.clone(), rule.clone());
                tokio::spawn(async move {
                    store
                        .check_and_consume(&key("hot"), &rule, 1, None)
                        .await
                        .unwrap()
                        .allowed
                })
            })
            .collect();
        let mut admitted = 0;
        for task in tasks {
            admitted += usize::from(task.await.unwrap());
        }
        assert_eq!(admitted, 10);
    }
}
