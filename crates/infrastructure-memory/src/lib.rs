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
//! # How it is laid out
//! Keys are spread over 16 shards, each a mutex around a hash table. A key is hashed once per
//! operation, with foldhash seeded at random per store (so that crafted identifiers cannot be
//! aimed at one shard or one slot): high bits of the hash pick the shard, low bits the slot.
//! A slot is a 16-byte pointer to one allocation holding the bucket's state, its expiry and its
//! key, so a check reads one small slot and one allocation, and the slots stay small enough
//! to be found in the CPU's caches (2 MB of them for 100,000 keys). The price is paid by the
//! sweep, which reads every bucket's allocation: about 30 ns per bucket, one shard at a time,
//! once per 10 s of clock time.
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

use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use foldhash::fast::RandomState;
use hashbrown::HashTable;
use ratelimit_domain::token_bucket::{self, BucketState};
use ratelimit_domain::{
    BucketDecision, BucketKey, BucketStore, Clock, RateLimitRule, Result, SystemClock,
};

/// Shards of the key space; each has its own lock, so unrelated keys rarely contend.
const SHARDS: usize = 16;

/// Where a key's shard index sits in its hash: the bits just below the top seven, which the
/// shard's table keeps as a tag, and far above the low bits it picks a slot with.
const SHARD_SHIFT: u32 = 64 - 7 - SHARDS.trailing_zeros();

/// How often, in clock seconds, a shard drops its expired buckets.
const SWEEP_INTERVAL_SECONDS: f64 = 10.0;

/// An in-process token-bucket store. See the [crate docs](crate).
#[derive(Debug)]
pub struct MemoryStorage {
    shards: Box<[Mutex<Shard>]>,
    clock: Arc<dyn Clock>,
    /// Hashes each key once per operation, for both its shard and its slot in the shard's
    /// table. foldhash is several times faster than std's SipHash on short keys; its seed is
    /// random per store, so that crafted identifiers cannot be aimed at one shard or slot.
    hasher: RandomState,
}

#[derive(Debug, Default)]
struct Shard {
    /// Found by the hashes [`MemoryStorage::hasher`] computes, which the table does not store.
    buckets: HashTable<StoredBucket>,
    /// The clock time at or after which the next operation sweeps out expired buckets.
    next_sweep: f64,
}

/// One bucket and its key in a single allocation: tokens, last and expires_at as native-endian
/// doubles, then the key's bytes.
///
/// A table slot is then only this 16-byte pointer, and a check touches one slot and one
/// allocation. With many keys, waiting for the slot is most of a check, so its size matters:
/// over 100,000 keys, checks took about a quarter longer with 40-byte slots (key pointer and
/// state), and longer too with 24 (expiry moved into the slot to make sweeps cheaper).
#[derive(Debug)]
struct StoredBucket(Box<[u8]>);

/// Offsets in a [`StoredBucket`]'s allocation.
const TOKENS: usize = 0;
const LAST: usize = 8;
const EXPIRES_AT: usize = 16;
const KEY: usize = 24;

impl StoredBucket {
    fn new(key: &[u8], state: BucketState, expires_at: f64) -> Self {
        let mut bytes = Vec::with_capacity(KEY + key.len());
        bytes.extend_from_slice(&state.tokens.to_ne_bytes());
        bytes.extend_from_slice(&state.last.to_ne_bytes());
        bytes.extend_from_slice(&expires_at.to_ne_bytes());
        bytes.extend_from_slice(key);
        Self(bytes.into_boxed_slice())
    }

    fn key(&self) -> &[u8] {
        self.0.get(KEY..).unwrap_or_default()
    }

    fn state(&self) -> BucketState {
        let header = self.header();
        BucketState {
            tokens: read(&header, TOKENS),
            last: read(&header, LAST),
        }
    }

    /// When the bucket is forgotten, as a Redis key with a TTL would be.
    fn expires_at(&self) -> f64 {
        read(&self.header(), EXPIRES_AT)
    }

    fn set(&mut self, state: BucketState, expires_at: f64) {
        // Every bucket has its header (see new), so this always writes.
        if let Some(header) = self.0.first_chunk_mut::<KEY>() {
            header[TOKENS..LAST].copy_from_slice(&state.tokens.to_ne_bytes());
            header[LAST..EXPIRES_AT].copy_from_slice(&state.last.to_ne_bytes());
            header[EXPIRES_AT..KEY].copy_from_slice(&expires_at.to_ne_bytes());
        }
    }

    fn header(&self) -> [u8; KEY] {
        // Every bucket has its header (see new); the default is never used.
        self.0.first_chunk().copied().unwrap_or_default()
    }
}

/// The double at `offset` in a bucket's header.
fn read(header: &[u8; KEY], offset: usize) -> f64 {
    let mut bytes = [0; 8];
    bytes.copy_from_slice(&header[offset..offset + 8]);
    f64::from_ne_bytes(bytes)
}

fn hash(hasher: &RandomState, key: &[u8]) -> u64 {
    let mut hasher = hasher.build_hasher();
    hasher.write(key);
    hasher.finish()
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
        self.shards
            .iter()
            .map(|shard| lock(shard).buckets.len())
            .sum()
    }

    /// Drops every expired bucket now, rather than as time passes.
    pub fn sweep_expired(&self) {
        let now = self.clock.now();
        for shard in &self.shards {
            lock(shard).sweep(now);
        }
    }

    fn now(&self, now: Option<f64>) -> Result<f64> {
        let now = now.unwrap_or_else(|| self.clock.now());
        // validate_now's check, inline: the call is only made to build the error.
        if now.is_finite() && now >= 0.0 {
            Ok(now)
        } else {
            token_bucket::validate_now(now)
        }
    }

    fn shard(&self, hash: u64) -> MutexGuard<'_, Shard> {
        // Masked below SHARDS, so the cast cannot truncate.
        #[allow(clippy::cast_possible_truncation)]
        let index = (hash >> SHARD_SHIFT) as usize & (SHARDS - 1);
        lock(&self.shards[index])
    }
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // A panic while the lock was held cannot leave a bucket half-written (nothing that can
    // panic runs while one is written), so a poisoned lock is safe to use.
    shard
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shard {
    fn sweep(&mut self, now: f64) {
        self.buckets.retain(|bucket| bucket.expires_at() > now);
        self.next_sweep = now + SWEEP_INTERVAL_SECONDS;
    }

    /// One step on the bucket of `key`, whose hash is `hash`, in a single probe of the table.
    fn check_and_consume(
        &mut self,
        hasher: &RandomState,
        key: &[u8],
        hash: u64,
        rule: &RateLimitRule,
        cost: u64,
        now: f64,
    ) -> BucketDecision {
        if now >= self.next_sweep {
            self.sweep(now);
        }
        let step =
            |stored| token_bucket::step(stored, rule.max_tokens(), rule.refill_rate(), cost, now);
        if let Some(bucket) = self.buckets.find_mut(hash, |bucket| bucket.key() == key) {
            // An expired bucket reads as missing; a step that stores brings it back to life.
            let step = step((bucket.expires_at() > now).then(|| bucket.state()));
            if let Some(state) = step.store {
                bucket.set(state, now + rule.storage_ttl_seconds() as f64);
            }
            return step.decision;
        }
        let step = step(None);
        if let Some(state) = step.store {
            let expires_at = now + rule.storage_ttl_seconds() as f64;
            let bucket = StoredBucket::new(key, state, expires_at);
            // The table rehashes its buckets when it grows.
            self.buckets
                .insert_unique(hash, bucket, |bucket| self::hash(hasher, bucket.key()));
        }
        step.decision
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
        let key = key.as_str().as_bytes();
        let hash = hash(&self.hasher, key);
        let decision = self
            .shard(hash)
            .check_and_consume(&self.hasher, key, hash, rule, cost, now);
        Ok(decision)
    }

    async fn get_remaining(
        &self,
        key: &BucketKey,
        rule: &RateLimitRule,
        now: Option<f64>,
    ) -> Result<u64> {
        Ok(self.check_and_consume(key, rule, 0, now).await?.remaining)
    }

    async fn reset(&self, key: &BucketKey, _rule: &RateLimitRule) -> Result<bool> {
        let key = key.as_str().as_bytes();
        let hash = hash(&self.hasher, key);
        let now = self.clock.now();
        let mut shard = self.shard(hash);
        match shard.buckets.find_entry(hash, |bucket| bucket.key() == key) {
            Ok(bucket) => {
                // An expired bucket not yet swept is a missing one: nothing was reset.
                let live = bucket.get().expires_at() > now;
                bucket.remove();
                Ok(live)
            }
            Err(_) => Ok(false),
        }
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
    async fn every_key_keeps_its_own_bucket_as_the_tables_grow() {
        let store = MemoryStorage::with_clock(ManualClock::new(1_000.0));
        let rule = rule(10, 1.0);
        // Keys that are prefixes of each other, and enough of them to grow every table.
        let keys: Vec<BucketKey> = (0..5_000).map(|i| key(&i.to_string())).collect();
        for (i, key) in keys.iter().enumerate() {
            let cost = 1 + i as u64 % 3;
            let d = store
                .check_and_consume(key, &rule, cost, None)
                .await
                .unwrap();
            assert_eq!(d.remaining, 10 - cost);
        }
        assert_eq!(store.bucket_count(), keys.len());
        for (i, key) in keys.iter().enumerate() {
            let d = store.check_and_consume(key, &rule, 1, None).await.unwrap();
            assert_eq!(d.remaining, 9 - (1 + i as u64 % 3), "key {i}");
        }
        for key in &keys[..2_500] {
            store.reset(key, &rule).await.unwrap();
        }
        assert_eq!(store.bucket_count(), 2_500);
        assert_eq!(
            store.get_remaining(&keys[0], &rule, None).await.unwrap(),
            10
        );
        assert_eq!(
            store
                .get_remaining(&keys[2_500], &rule, None)
                .await
                .unwrap(),
            7 // 10 - 2 - 1
        );
    }

    #[tokio::test]
    async fn an_expired_bucket_not_yet_swept_reads_as_full() {
        let store = MemoryStorage::with_clock(ManualClock::new(0.0));
        let rule = rule(5, 5.0); // storage TTL 120 s
        let at = |now: f64, cost: u64| {
            let store = &store;
            let rule = &rule;
            async move {
                store
                    .check_and_consume(&key("a"), rule, cost, Some(now))
                    .await
                    .unwrap()
            }
        };
        // Sweeps at 2000, so the shard's next sweep is not before 2010.
        assert_eq!(at(2_000.0, 1).await.remaining, 4);
        // Time goes back: nothing refills, and the bucket now expires at 1120.
        assert_eq!(at(1_000.0, 1).await.remaining, 3);
        // Expired and not swept: a peek reads it as full and leaves it be.
        assert_eq!(at(1_200.0, 0).await.remaining, 5);
        assert_eq!(store.bucket_count(), 1);
        // A check starts it over from full, in place.
        assert_eq!(at(1_200.0, 2).await.remaining, 3);
        assert_eq!(store.bucket_count(), 1);
        assert_eq!(at(1_200.0, 0).await.remaining, 3);
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
