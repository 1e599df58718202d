//! A local cache of denials in front of a store.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use foldhash::fast::RandomState;
use ratelimit_domain::{
    BucketDecision, BucketKey, BucketRequest, BucketStore, RateLimitRule, Result,
};
// Tokio's clock: the host's monotonic clock, which tests can pause and move.
use tokio::time::Instant;

/// Shards of the cache; each has its own lock, so checks of unrelated keys rarely contend.
const SHARDS: usize = 16;

/// How often, at most, one shard is scanned for expired denials while the cache is full.
const PRUNE_INTERVAL: Duration = Duration::from_millis(50);

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
/// - **Resets.** A reset through this store clears its entry before and after the store's
///   reset, and a denial that was in flight while any invalidation of its shard happened is
///   not cached (each shard counts its invalidations; a denial is only remembered if the count
///   did not move while it was on its way). Resets made elsewhere are seen only through
///   [`invalidate`](Self::invalidate) / [`clear`](Self::clear), which the container calls from
///   Redis pub/sub (`RedisStorage::spawn_reset_listener`); until such a message arrives, a
///   bucket reset by another host may still be denied here for up to its remaining
///   `retry_after`. The container therefore refuses the cache where no listener runs.
/// - **Bounded memory and work.** At most `capacity` entries in 16 shards, each behind its own
///   lock. When the cache is full, a new denial makes one shard (in turn) drop its expired
///   entries, at most once per 50 ms per shard; if there is still no room, the denial is simply
///   not cached. A check never scans more than one shard.
/// - A cached denial reports the store's `remaining` at the time of the denial (a lower bound)
///   and the time left of its `retry_after`.
///
/// Generic over the store it wraps, like [`CircuitBreakerStore`](crate::CircuitBreakerStore).
#[derive(Debug)]
pub struct DenyCacheStore<S: ?Sized = dyn BucketStore> {
    inner: Arc<S>,
    capacity: usize,
    shards: Box<[Shard]>,
    /// Entries in all shards together; never above `capacity`.
    len: AtomicUsize,
    /// The shard that the next prune of a full cache scans.
    prune_cursor: AtomicUsize,
    /// Picks a key's shard; seeded at random per cache, so crafted keys cannot aim at one.
    hasher: RandomState,
    hits: AtomicU64,
}

#[derive(Debug)]
struct Shard {
    /// Key → denial. A std mutex: held for a map operation only, never across an await.
    denials: Mutex<ShardMap>,
    /// Invalidations of this shard so far. Changed only while `denials` is locked.
    generation: AtomicU64,
}

#[derive(Debug)]
struct ShardMap {
    map: HashMap<Box<str>, Denial, RandomState>,
    /// Not pruned again before this instant.
    next_prune: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Denial {
    until: Instant,
    cost: u64,
    remaining: u64,
}

/// What a check saw before it went to the store: where its key lives and how many
/// invalidations that shard had seen.
#[derive(Debug, Clone, Copy)]
struct Ticket {
    shard: usize,
    generation: u64,
    sent_at: Instant,
}

impl<S: ?Sized> DenyCacheStore<S> {
    /// A cache of at most `capacity` denials (at least 1) in front of `inner`.
    pub fn new(inner: Arc<S>, capacity: usize) -> Self {
        let now = Instant::now();
        let shards = (0..SHARDS)
            .map(|_| Shard {
                denials: Mutex::new(ShardMap {
                    map: HashMap::default(),
                    next_prune: now,
                }),
                generation: AtomicU64::new(0),
            })
            .collect();
        Self {
            inner,
            capacity: capacity.max(1),
            shards,
            len: AtomicUsize::new(0),
            prune_cursor: AtomicUsize::new(0),
            hasher: RandomState::default(),
            hits: AtomicU64::new(0),
        }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &Arc<S> {
        &self.inner
    }

    /// Forgets the denial of one bucket (its key as [`BucketKey::as_str`] gives it), and keeps
    /// a denial of its shard that is in flight now from being cached.
    pub fn invalidate(&self, key: &str) {
        let index = self.shard_of(key);
        let mut shard = self.lock(index);
        self.shards[index].generation.fetch_add(1, Ordering::AcqRel);
        if shard.map.remove(key).is_some() {
            self.len.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Forgets every denial, and keeps every denial in flight now from being cached.
    pub fn clear(&self) {
        for index in 0..self.shards.len() {
            let mut shard = self.lock(index);
            self.shards[index].generation.fetch_add(1, Ordering::AcqRel);
            let dropped = shard.map.len();
            shard.map.clear();
            self.len.fetch_sub(dropped, Ordering::AcqRel);
        }
    }

    /// How many checks were denied from the cache.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// How many denials are cached, expired ones not yet dropped included.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// Whether no denial is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard_of(&self, key: &str) -> usize {
        // The top bits: HashMap's own hash of the key (another seed) picks slots by the low ones.
        let hash = self.hasher.hash_one(key);
        (hash >> 60) as usize % SHARDS
    }

    fn lock(&self, index: usize) -> MutexGuard<'_, ShardMap> {
        // Every update is a single map operation, so a poisoned map is still consistent.
        self.shards[index]
            .denials
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The cached denial of a check, or the ticket to send it to the store with.
    fn cached(&self, key: &BucketKey, cost: u64) -> std::result::Result<BucketDecision, Ticket> {
        let index = self.shard_of(key.as_str());
        let now = Instant::now();
        let mut shard = self.lock(index);
        let ticket = Ticket {
            shard: index,
            generation: self.shards[index].generation.load(Ordering::Acquire),
            sent_at: now,
        };
        let Some(denial) = shard.map.get(key.as_str()).copied() else {
            return Err(ticket);
        };
        if now >= denial.until {
            shard.map.remove(key.as_str());
            self.len.fetch_sub(1, Ordering::AcqRel);
            return Err(ticket);
        }
        if cost >= denial.cost {
            Ok(BucketDecision {
                allowed: false,
                retry_after: denial.until - now,
                remaining: denial.remaining,
            })
        } else {
            Err(ticket)
        }
    }

    fn remember(&self, key: &BucketKey, cost: u64, ticket: Ticket, decision: &BucketDecision) {
        let cacheable =
            !(decision.allowed || decision.is_never() || decision.retry_after == Duration::ZERO);
        let until = ticket.sent_at.checked_add(decision.retry_after);
        let denial = match until {
            Some(until) if cacheable => Denial {
                until,
                cost,
                remaining: decision.remaining,
            },
            _ => {
                let mut shard = self.lock(ticket.shard);
                if shard.map.remove(key.as_str()).is_some() {
                    self.len.fetch_sub(1, Ordering::AcqRel);
                }
                return;
            }
        };
        if self.len() >= self.capacity {
            self.prune_one();
        }
        let mut shard = self.lock(ticket.shard);
        if self.shards[ticket.shard].generation.load(Ordering::Acquire) != ticket.generation {
            // An invalidation (a reset) happened while this denial was on its way: it may
            // describe the bucket as it was before the reset.
            return;
        }
        if let Some(entry) = shard.map.get_mut(key.as_str()) {
            *entry = denial;
            return;
        }
        let reserved = self
            .len
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.capacity).then_some(n + 1)
            })
            .is_ok();
        if reserved {
            shard.map.insert(key.as_str().into(), denial);
        }
    }

    /// Drops the expired denials of the next shard in turn, unless it was scanned very lately.
    fn prune_one(&self) {
        let index = self.prune_cursor.fetch_add(1, Ordering::Relaxed) % SHARDS;
        let now = Instant::now();
        let mut shard = self.lock(index);
        if now < shard.next_prune {
            return;
        }
        shard.next_prune = now + PRUNE_INTERVAL;
        let before = shard.map.len();
        shard.map.retain(|_, denial| denial.until > now);
        self.len
            .fetch_sub(before - shard.map.len(), Ordering::AcqRel);
    }
}

#[async_trait]
impl<S: BucketStore + ?Sized> BucketStore for DenyCacheStore<S> {
    async fn check_and_consume<'a>(&self, request: &BucketRequest<'a>) -> Result<BucketDecision> {
        let BucketRequest { key, cost, now, .. } = *request;
        if cost == 0 || now.is_some() {
            return self.inner.check_and_consume(request).await;
        }
        let ticket = match self.cached(key, cost) {
            Ok(denied) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                // No I/O here: spend Tokio's cooperative budget so that a client hammering a
                // denied key still lets other tasks run (see CircuitBreakerStore).
                tokio::task::consume_budget().await;
                return Ok(denied);
            }
            Err(ticket) => ticket,
        };
        let decision = self.inner.check_and_consume(request).await?;
        self.remember(key, cost, ticket, &decision);
        Ok(decision)
    }

    /// Several limits: each bucket that refused is remembered as a single check's denial would
    /// be (nothing was taken from it, so it holds fewer than its cost until its wait has
    /// passed). A check is denied here when any of its buckets has a live cached denial for
    /// its cost; the limits that were not asked then report `allowed` with 0 remaining, a
    /// lower bound.
    async fn check_and_consume_all<'a>(
        &self,
        requests: &[BucketRequest<'a>],
    ) -> Result<Vec<BucketDecision>> {
        if let [one] = requests {
            return Ok(vec![self.check_and_consume(one).await?]);
        }
        let Some(first) = requests.first() else {
            return Ok(Vec::new());
        };
        if first.now.is_some() || requests.iter().any(|request| request.cost == 0) {
            return self.inner.check_and_consume_all(requests).await;
        }
        let mut tickets = Vec::with_capacity(requests.len());
        for (i, request) in requests.iter().enumerate() {
            match self.cached(request.key, request.cost) {
                Ok(denied) => {
                    self.hits.fetch_add(1, Ordering::Relaxed);
                    tokio::task::consume_budget().await;
                    let not_asked = BucketDecision {
                        allowed: true,
                        retry_after: Duration::ZERO,
                        remaining: 0,
                    };
                    let mut decisions = vec![not_asked; requests.len()];
                    decisions[i] = denied;
                    return Ok(decisions);
                }
                Err(ticket) => tickets.push(ticket),
            }
        }
        let decisions = self.inner.check_and_consume_all(requests).await?;
        for ((request, ticket), decision) in requests.iter().zip(tickets).zip(&decisions) {
            self.remember(request.key, request.cost, ticket, decision);
        }
        Ok(decisions)
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
        // Before: no check waits on a denial the reset is about to void. After: a denial that
        // the store gave just before the reset and that arrives after it is not kept either.
        self.invalidate(key.as_str());
        let outcome = self.inner.reset(key, rule).await;
        self.invalidate(key.as_str());
        outcome
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
        async fn check_and_consume<'a>(
            &self,
            request: &BucketRequest<'a>,
        ) -> Result<BucketDecision> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.inner.check_and_consume(request).await
        }
        async fn check_and_consume_all<'a>(
            &self,
            requests: &[BucketRequest<'a>],
        ) -> Result<Vec<BucketDecision>> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.inner.check_and_consume_all(requests).await
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

    fn setup(
        capacity: usize,
    ) -> (
        Arc<Counting>,
        DenyCacheStore<Counting>,
        ManualClock,
        RateLimitRule,
    ) {
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
    async fn allowed<S: BucketStore + ?Sized>(
        cache: &DenyCacheStore<S>,
        id: &str,
        rule: &RateLimitRule,
        cost: u64,
    ) -> bool {
        cache
            .check_and_consume(&BucketRequest::new(&key(id), rule).with_cost(cost))
            .await
            .unwrap()
            .allowed
    }

    #[tokio::test]
    async fn repeated_denials_are_answered_without_the_store() {
        let (counting, cache, _clock, rule) = setup(16);
        assert!(allowed(&cache, "a", &rule, 2).await);
        let first = cache
            .check_and_consume(&BucketRequest::new(&key("a"), &rule).with_cost(1))
            .await
            .unwrap();
        assert!(!first.allowed);
        assert_eq!(counting.calls.load(Ordering::SeqCst), 2);
        for _ in 0..1_000 {
            let again = cache
                .check_and_consume(&BucketRequest::new(&key("a"), &rule).with_cost(1))
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
            .check_and_consume(&BucketRequest::new(&key("a"), &rule).with_cost(2))
            .await
            .unwrap();
        assert!(!allowed(&cache, "a", &rule, 1).await);
        cache.reset(&key("a"), &rule).await.unwrap();
        assert!(allowed(&cache, "a", &rule, 1).await);

        cache
            .check_and_consume(&BucketRequest::new(&key("a"), &rule).with_cost(1))
            .await
            .unwrap();
        assert!(!allowed(&cache, "a", &rule, 1).await);
        assert_eq!(cache.len(), 1);
        cache.invalidate(key("a").as_str());
        assert!(cache.is_empty());
    }

    /// Denies every check, after waiting for `open` when `gate` is set.
    #[derive(Debug, Default)]
    struct Gated {
        gate: std::sync::atomic::AtomicBool,
        entered: tokio::sync::Notify,
        open: tokio::sync::Notify,
        calls: AtomicU64,
    }

    #[async_trait]
    impl BucketStore for Gated {
        async fn check_and_consume<'a>(&self, _: &BucketRequest<'a>) -> Result<BucketDecision> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.gate.load(Ordering::SeqCst) {
                self.entered.notify_one();
                self.open.notified().await;
            }
            Ok(BucketDecision {
                allowed: false,
                retry_after: Duration::from_secs(60),
                remaining: 0,
            })
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
            Ok(0)
        }
        async fn reset(&self, _: &BucketKey, _: &RateLimitRule) -> Result<bool> {
            Ok(true)
        }
    }

    /// A denial that the store gave before a reset, arriving after the reset's invalidation,
    /// must not be cached: it would deny a freshly reset bucket for its whole retry_after.
    /// On the code before the fix, the second check below was answered from the cache.
    #[tokio::test]
    async fn a_denial_in_flight_during_an_invalidation_is_not_cached() {
        let gated = Arc::new(Gated::default());
        let cache = Arc::new(DenyCacheStore::new(gated.clone(), 16));
        let rule = RateLimitRule::new(RateLimitScope::Ip, 2, 1.0).unwrap();
        gated.gate.store(true, Ordering::SeqCst);
        let in_flight = {
            let cache = cache.clone();
            let rule = rule.clone();
            tokio::spawn(async move {
                cache
                    .check_and_consume(&BucketRequest::new(&key("a"), &rule).with_cost(1))
                    .await
            })
        };
        gated.entered.notified().await;
        // The reset notice from another host arrives while the denial is on its way.
        cache.invalidate(key("a").as_str());
        gated.open.notify_one();
        assert!(!in_flight.await.unwrap().unwrap().allowed);
        gated.gate.store(false, Ordering::SeqCst);

        assert!(!allowed(&cache, "a", &rule, 1).await);
        assert_eq!(
            gated.calls.load(Ordering::SeqCst),
            2,
            "the stale denial was cached"
        );
        // With no invalidation in between, the next denial is cached as before.
        assert!(!allowed(&cache, "a", &rule, 1).await);
        assert_eq!(gated.calls.load(Ordering::SeqCst), 2);
        assert_eq!(cache.hits(), 1);
    }

    /// A full cache whose entries have all expired makes room again, one shard at a time.
    #[tokio::test(start_paused = true)]
    async fn a_full_cache_of_expired_denials_makes_room() {
        let clock = ManualClock::starting_now();
        let cache = DenyCacheStore::new(Arc::new(MemoryStorage::with_clock(clock.clone())), 8);
        // One token, 600 a minute: each denial lasts 100 ms of real time.
        let rule = RateLimitRule::new(RateLimitScope::Ip, 1, 600.0).unwrap();
        for i in 0..8 {
            let id = format!("old-{i}");
            assert!(allowed(&cache, &id, &rule, 1).await);
            assert!(!allowed(&cache, &id, &rule, 1).await);
        }
        assert_eq!(cache.len(), 8);
        tokio::time::sleep(Duration::from_millis(150)).await;
        // Every new denial scans one shard: within one round of them, one finds room.
        let mut cached = false;
        for i in 0..=SHARDS {
            let id = format!("new-{i}");
            assert!(allowed(&cache, &id, &rule, 1).await);
            assert!(!allowed(&cache, &id, &rule, 1).await);
            let hits = cache.hits();
            assert!(!allowed(&cache, &id, &rule, 1).await);
            if cache.hits() > hits {
                cached = true;
                break;
            }
        }
        assert!(
            cached,
            "no new denial was cached: the full cache never made room"
        );
        assert!(cache.len() <= 8);
    }

    #[tokio::test]
    async fn memory_stays_bounded() {
        let (_counting, cache, _clock, rule) = setup(8);
        for i in 0..100 {
            let k = key(&i.to_string());
            cache
                .check_and_consume(&BucketRequest::new(&k, &rule).with_cost(2))
                .await
                .unwrap();
            assert!(
                !cache
                    .check_and_consume(&BucketRequest::new(&k, &rule).with_cost(1))
                    .await
                    .unwrap()
                    .allowed
            );
        }
        assert_eq!(cache.len(), 8);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cached_denial_expires_when_the_store_would_allow_again() {
        // 60 tokens a minute: the denial lasts about a second of real time.
        let clock = ManualClock::starting_now();
        let cache = DenyCacheStore::new(Arc::new(MemoryStorage::with_clock(clock.clone())), 16);
        let rule = RateLimitRule::new(RateLimitScope::Ip, 1, 60.0).unwrap();
        assert!(allowed(&cache, "a", &rule, 1).await);
        let denied = cache
            .check_and_consume(&BucketRequest::new(&key("a"), &rule).with_cost(1))
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
