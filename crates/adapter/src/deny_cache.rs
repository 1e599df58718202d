//! A local cache of denials in front of a store.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ratelimit_domain::{
    BucketDecision, BucketKey, BucketStore, DynBucketStore, RateLimitRule, Result,
};

/// A [`BucketStore`] that remembers denials and answers repeats of them in process.
///
/// When the store denies a check of cost `c` with `retry_after = r`, the bucket holds fewer than
/// `c` tokens until `r` has passed: refill is deterministic, and other callers can only take
/// tokens away. So until then, any check of the same bucket costing `c` or more is denied here,
/// without a round trip — a client that ignores 429s costs Redis nothing.
///
/// # Guarantees
/// - **Never denies what the store would allow**, except after a reset (below): the deadline is
///   measured from *before* the request was sent, so it ends no later than the store's own.
///   Checks of a lower cost, zero-cost peeks and checks with an explicit `now` always go to the
///   store.
/// - **Resets.** A reset through this store clears its entry at once. Resets made elsewhere are
///   seen only through [`invalidate`](Self::invalidate) / [`clear`](Self::clear), which the
///   container calls from Redis pub/sub (`RedisStorage::spawn_reset_listener`); until such a
///   message arrives, a bucket reset by another host may still be denied here for up to its
///   remaining `retry_after`.
/// - **Bounded memory.** At most `capacity` entries; when full, expired entries are dropped and,
///   if it is still full, new denials are simply not cached.
/// - A cached denial reports the store's `remaining` at the time of the denial (a lower bound)
///   and the time left of its `retry_after`.
#[derive(Debug)]
pub struct DenyCacheStore {
    inner: DynBucketStore,
    capacity: usize,
    /// Key → denial. A std mutex: held for a map operation only, never across an await.
    denials: Mutex<HashMap<Box<str>, Denial>>,
    hits: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct Denial {
    until: Instant,
    cost: u64,
    remaining: u64,
}

impl DenyCacheStore {
    /// A cache of at most `capacity` denials (at least 1) in front of `inner`.
    pub fn new(inner: DynBucketStore, capacity: usize) -> Self {
        Self {
            inner,
            capacity: capacity.max(1),
            denials: Mutex::new(HashMap::new()),
            hits: AtomicU64::new(0),
        }
    }

    /// Forgets the denial of one bucket (its key as [`BucketKey::as_str`] gives it).
    pub fn invalidate(&self, key: &str) {
        self.lock().remove(key);
    }

    /// Forgets every denial.
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// How many checks were denied from the cache.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// How many denials are cached, expired ones not yet dropped included.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no denial is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Denial>> {
        // Every update is a single map operation, so a poisoned map is still consistent.
        self.denials
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn cached(&self, key: &BucketKey, cost: u64) -> Option<BucketDecision> {
        let now = Instant::now();
        let mut denials = self.lock();
        let denial = *denials.get(key.as_str())?;
        if now >= denial.until {
            denials.remove(key.as_str());
            return None;
        }
        (cost >= denial.cost).then(|| BucketDecision {
            allowed: false,
            retry_after: denial.until - now,
            remaining: denial.remaining,
        })
    }

    fn remember(&self, key: &BucketKey, cost: u64, sent_at: Instant, decision: &BucketDecision) {
        let mut denials = self.lock();
        if decision.allowed || decision.is_never() || decision.retry_after == Duration::ZERO {
            denials.remove(key.as_str());
            return;
        }
        let Some(until) = sent_at.checked_add(decision.retry_after) else {
            return;
        };
        if denials.len() >= self.capacity && !denials.contains_key(key.as_str()) {
            let now = Instant::now();
            denials.retain(|_, denial| denial.until > now);
            if denials.len() >= self.capacity {
                return;
            }
        }
        denials.insert(
            key.as_str().into(),
            Denial {
                until,
                cost,
                remaining: decision.remaining,
            },
        );
    }
}

#[async_trait]
impl BucketStore for DenyCacheStore {
    async fn check_and_consume(
        &self,
        key: &BucketKey,
        rule: &RateLimitRule,
        cost: u64,
        now: Option<f64>,
    ) -> Result<BucketDecision> {
        if cost == 0 || now.is_some() {
            return self.inner.check_and_consume(key, rule, cost, now).await;
        }
        if let Some(denied) = self.cached(key, cost) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            // No I/O here: spend Tokio's cooperative budget so that a client hammering a
            // denied key still lets other tasks run (see CircuitBreakerStore).
            tokio::task::consume_budget().await;
            return Ok(denied);
        }
        let sent_at = Instant::now();
        let decision = self.inner.check_and_consume(key, rule, cost, now).await?;
        self.remember(key, cost, sent_at, &decision);
        Ok(decision)
    }

    async fn get_remaining(
        &self,
        key: &BucketKey,
        rule: &RateLimitRule,
        now: Option<f64>,
    ) -> Result<u64> {
        self.inner.get_remaining(key, rule, now).await
    }

    async fn reset(&self, key: &BucketKey, rule: &RateLimitRule) -> Result<bool> {
        self.invalidate(key.as_str());
        self.inner.reset(key, rule).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use ratelimit_domain::{ManualClock, RateLimitScope};
    use ratelimit_memory::MemoryStorage;

    use super::*;

    /// Counts the calls that reach the store.
    #[derive(Debug)]
    struct Counting {
        inner: MemoryStorage,
        calls: AtomicU64,
    }

    #[async_trait]
    impl BucketStore for Counting {
        async fn check_and_consume(
            &self,
            key: &BucketKey,
            rule: &RateLimitRule,
            cost: u64,
            now: Option<f64>,
        ) -> Result<BucketDecision> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.inner.check_and_consume(key, rule, cost, now).await
        }
        async fn get_remaining(
            &self,
            key: &BucketKey,
            rule: &RateLimitRule,
            now: Option<f64>,
        ) -> Result<u64> {
            self.inner.get_remaining(key, rule, now).await
        }
        async fn reset(&self, key: &BucketKey, rule: &RateLimitRule) -> Result<bool> {
            self.inner.reset(key, rule).await
        }
    }

    fn setup(capacity: usize) -> (Arc<Counting>, DenyCacheStore, ManualClock, RateLimitRule) {
        let clock = ManualClock::new(1_000.0);
        let counting = Arc::new(Counting {
            inner: MemoryStorage::with_clock(clock.clone()),
            calls: AtomicU64::new(0),
        });
        let cache = DenyCacheStore::new(counting.clone(), capacity);
        // 2 tokens, one more per minute. The memory store runs on the manual clock, which the
        // tests move; the cache runs on real time.
        let rule = RateLimitRule::new(RateLimitScope::Ip, 2, 1.0).unwrap();
        (counting, cache, clock, rule)
    }

    fn key(id: &str) -> BucketKey {
        BucketKey::new(RateLimitScope::Ip, id, "POST /login").unwrap()
    }

    /// Whether a check of `id` at `cost` through `cache` is allowed.
    async fn allowed(cache: &DenyCacheStore, id: &str, rule: &RateLimitRule, cost: u64) -> bool {
        cache
            .check_and_consume(&key(id), rule, cost, None)
            .await
            .unwrap()
            .allowed
    }

    #[tokio::test]
    async fn repeated_denials_are_answered_without_the_store() {
        let (counting, cache, _clock, rule) = setup(16);
        assert!(allowed(&cache, "a", &rule, 2).await);
        let first = cache
            .check_and_consume(&key("a"), &rule, 1, None)
            .await
            .unwrap();
        assert!(!first.allowed);
        assert_eq!(counting.calls.load(Ordering::SeqCst), 2);
        for _ in 0..1_000 {
            let again = cache
                .check_and_consume(&key("a"), &rule, 1, None)
                .await
                .unwrap();
            assert!(!again.allowed);
            assert!(again.retry_after <= first.retry_after);
            assert_eq!(again.remaining, first.remaining);
        }
        assert_eq!(
            counting.calls.load(Ordering::SeqCst),
            2,
            "the flood must not reach the store"
        );
        assert_eq!(cache.hits(), 1_000);
        // A higher cost is denied too; other buckets and zero-cost peeks still reach the store.
        assert!(!allowed(&cache, "a", &rule, 2).await);
        assert!(allowed(&cache, "b", &rule, 1).await);
        assert_eq!(
            cache.get_remaining(&key("a"), &rule, None).await.unwrap(),
            0
        );
        assert_eq!(counting.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_lower_cost_than_the_cached_denial_goes_to_the_store() {
        let (counting, cache, _clock, rule) = setup(16);
        assert!(allowed(&cache, "a", &rule, 1).await);
        assert!(!allowed(&cache, "a", &rule, 2).await);
        // One token is left: a cost of 1 must be asked of the store, and is allowed.
        assert!(allowed(&cache, "a", &rule, 1).await);
        assert_eq!(counting.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn reset_and_invalidation_clear_the_denial() {
        let (_counting, cache, _clock, rule) = setup(16);
        cache
            .check_and_consume(&key("a"), &rule, 2, None)
            .await
            .unwrap();
        assert!(!allowed(&cache, "a", &rule, 1).await);
        cache.reset(&key("a"), &rule).await.unwrap();
        assert!(allowed(&cache, "a", &rule, 1).await);

        cache
            .check_and_consume(&key("a"), &rule, 1, None)
            .await
            .unwrap();
        assert!(!allowed(&cache, "a", &rule, 1).await);
        assert_eq!(cache.len(), 1);
        cache.invalidate(key("a").as_str());
        assert!(cache.is_empty());
    }

    #[tokio::test]
    async fn memory_stays_bounded() {
        let (_counting, cache, _clock, rule) = setup(8);
        for i in 0..100 {
            let k = key(&i.to_string());
            cache.check_and_consume(&k, &rule, 2, None).await.unwrap();
            assert!(
                !cache
                    .check_and_consume(&k, &rule, 1, None)
                    .await
                    .unwrap()
                    .allowed
            );
        }
        assert_eq!(cache.len(), 8);
    }

    #[tokio::test]
    async fn a_cached_denial_expires_when_the_store_would_allow_again() {
        // 60 tokens a minute: the denial lasts about a second of real time.
        let clock = ManualClock::starting_now();
        let cache = DenyCacheStore::new(Arc::new(MemoryStorage::with_clock(clock.clone())), 16);
        let rule = RateLimitRule::new(RateLimitScope::Ip, 1, 60.0).unwrap();
        assert!(allowed(&cache, "a", &rule, 1).await);
        let denied = cache
            .check_and_consume(&key("a"), &rule, 1, None)
            .await
            .unwrap();
        assert!(!denied.allowed);
        assert!(denied.retry_after <= Duration::from_secs(1));
        // Past the deadline the entry is dropped and the store is asked again.
        tokio::time::sleep(denied.retry_after + Duration::from_millis(20)).await;
        clock.advance(Duration::from_secs(1));
        assert!(allowed(&cache, "a", &rule, 1).await);
    }
}
