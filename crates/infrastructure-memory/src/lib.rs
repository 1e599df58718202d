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
//! - Memory stays bounded, by time and by count. A bucket lives as long as its keys would in
//!   Redis (time to refill plus 60 s after its last write); expired buckets read as missing
//!   (full) and are swept out as time passes. And the store holds at most its capacity in
//!   buckets, [`MemoryStorage::DEFAULT_CAPACITY`] (1,000,000) unless
//!   [`MemoryStorage::builder`] sets another: refill times may be years, and every new
//!   identifier (an IPv6 /64, a free account) adds a bucket. What a full store costs in memory
//!   is measured in docs/performance.md ("A flood of distinct identifiers").
//!
//! # When the store is full
//! A new bucket then takes the place of one that gives the least away. Evicting a bucket
//! that is full loses nothing (a missing bucket *is* a full one), so each bucket records when
//! it will be full again (its last update plus the time its missing tokens take to come
//! back), and the eviction drops a full or expired bucket if it finds one, else the one that
//! will be full soonest: the smallest refill handed out, counted in time. It does not search
//! the whole store: it looks at up to 5 buckets in up to 64 random slots of the new key's
//! shard (a small shard, of at most 64 slots, whole), so a check that creates a bucket in a
//! full store reads a few more cache lines, and every other check is unchanged.
//!
//! Each shard holds its share of the capacity (1/16 of it), so a flood of distinct keys,
//! crafted or not, cannot crowd the other shards; since the hasher's seed is random per store,
//! the shards fill alike. [`MemoryStorage::stats`] counts evictions, and the non-full ones apart: each of
//! those handed a client a refill it had not earned yet. A steady client whose bucket is
//! further from full than the buckets around it keeps it through a flood of one-shot
//! identifiers; one whose bucket is the furthest from full is the one that loses it, so
//! watch `evictions_not_full` and size the capacity to the clients of one refill time.
//!
//! # How it is laid out
//! Keys are spread over 16 shards, each a mutex around a hash table. A key is hashed once per
//! operation, with foldhash seeded at random per store (so that crafted identifiers cannot be
//! aimed at one shard or one slot): high bits of the hash pick the shard, low bits the slot.
//! A slot is a 16-byte pointer to one allocation holding the bucket's state, its expiry and its
//! key, so a check reads one small slot and one allocation, and the slots stay small enough
//! to be found in the CPU's caches (2 MB of them for 100,000 keys). The price is paid by the
//! sweep, which reads every bucket's allocation, one shard at a time, once per 10 s of clock
//! time. Why this layout, in figures: docs/performance.md ("Memory store").
//!
//! ```
//! use std::time::Duration;
//! use ratelimit_domain::{
//!     BucketKey, BucketRequest, BucketStore, ManualClock, RateLimitRule, RateLimitScope,
//! };
//! use ratelimit_memory::MemoryStorage;
//!
//! # tokio_test_block_on(async {
//! let clock = ManualClock::new(1_000.0);
//! let store = MemoryStorage::with_clock(clock.clone());
//! let rule = RateLimitRule::new(RateLimitScope::Ip, 1, 5.0)?; // one token every 12 s
//! let key = BucketKey::new(RateLimitScope::Ip, "203.0.113.9", "POST /login")?;
//!
//! assert!(store.check_and_consume(&BucketRequest::new(&key, &rule).with_cost(1)).await?.allowed);
//! assert!(!store.check_and_consume(&BucketRequest::new(&key, &rule).with_cost(1)).await?.allowed);
//! clock.advance(Duration::from_secs(12));
//! assert!(store.check_and_consume(&BucketRequest::new(&key, &rule).with_cost(1)).await?.allowed);
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
use ratelimit_domain::token_bucket::{self, BucketState, StepInput};
use ratelimit_domain::{
    BucketDecision, BucketKey, BucketRequest, BucketStore, Clock, ErrorCode, RateLimitError,
    RateLimitRule, Result,
};

mod clock;

pub use clock::CounterClock;

/// Shards of the key space (fewer for a capacity below it); each has its own lock, so
/// unrelated keys rarely contend. A power of two.
const MAX_SHARDS: usize = 16;

/// Where a key's shard index sits in its hash: the bits just below the top seven, which the
/// shard's table keeps as a tag, and far above the low bits it picks a slot with.
const SHARD_SHIFT: u32 = 64 - 7 - MAX_SHARDS.trailing_zeros();

/// How often, in clock seconds, a shard drops its expired buckets.
const SWEEP_INTERVAL_SECONDS: f64 = 10.0;

/// Buckets compared to choose the one to evict, at most (a full one ends the search). Redis
/// samples 5 keys for its approximated LRU by default, for the same reason: each costs a
/// cache miss, and 5 already find one of the fullest few.
const EVICTION_SAMPLE: usize = 5;

/// Random table slots looked at to find that sample, at most. A table at capacity is about a
/// quarter occupied or more, so 5 buckets take about 20 probes (control bytes only), and finding
/// fewer than 2 in 64 has odds of about 1 in 5 million.
const EVICTION_PROBES: usize = 64;

/// An in-process token-bucket store. See the [crate docs](crate).
#[derive(Debug)]
pub struct MemoryStorage {
    shards: Box<[Mutex<Shard>]>,
    /// `shards.len() - 1`; the length is a power of two.
    shard_mask: usize,
    /// Buckets held at most, over all shards.
    capacity: usize,
    clock: Arc<dyn Clock>,
    /// Hashes each key once per operation, for both its shard and its slot in the shard's
    /// table. foldhash rather than std's SipHash, for speed on short keys (docs/performance.md,
    /// "Memory store"); its seed is random per store, so that crafted identifiers cannot be
    /// aimed at one shard or slot.
    hasher: RandomState,
}

/// What a [`MemoryStorage`] holds and what it had to let go, from [`MemoryStorage::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct MemoryStats {
    /// Buckets held now, expired ones not yet swept included.
    pub buckets: usize,
    /// Buckets held at most (the store's capacity).
    pub capacity: usize,
    /// Buckets dropped to make room for a new one, since the store was built. Expired buckets
    /// swept out as time passes are not counted.
    pub evictions: u64,
    /// Those of [`evictions`](Self::evictions) whose bucket was not full: each one handed a
    /// client a refill it had not earned yet (its next check starts from a full bucket). Zero
    /// while the store has room, or while there are full buckets to drop instead.
    pub evictions_not_full: u64,
}

/// Builds a [`MemoryStorage`]: see [`MemoryStorage::builder`].
#[derive(Debug)]
#[must_use]
pub struct MemoryStorageBuilder {
    capacity: usize,
    clock: Option<Arc<dyn Clock>>,
}

impl MemoryStorageBuilder {
    /// Buckets held at most (default [`MemoryStorage::DEFAULT_CAPACITY`]); at least 1.
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// The clock the store reads (default: the host's wall clock, read from the CPU's
    /// timestamp counter: [`CounterClock`]).
    pub fn clock(self, clock: impl Clock) -> Self {
        self.shared_clock(Arc::new(clock))
    }

    /// A clock shared with other components.
    pub fn shared_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// The store.
    ///
    /// # Errors
    /// [`ErrorCode::InvalidInput`] for a capacity of 0: a store that can hold no bucket would
    /// limit nothing.
    pub fn build(self) -> Result<MemoryStorage> {
        if self.capacity == 0 {
            return Err(RateLimitError::new(
                ErrorCode::InvalidInput,
                "the memory store's capacity must be at least 1 bucket",
            )
            .with_detail("capacity", "0"));
        }
        let clock = self
            .clock
            .unwrap_or_else(|| Arc::new(CounterClock::default()));
        Ok(MemoryStorage::from_parts(
            self.capacity,
            shard_count(self.capacity),
            clock,
        ))
    }
}

#[derive(Debug)]
struct Shard {
    /// Found by the hashes [`MemoryStorage::hasher`] computes, which the table does not store.
    buckets: HashTable<StoredBucket>,
    /// The clock time at or after which the next operation sweeps out expired buckets.
    next_sweep: f64,
    /// Buckets this shard holds at most: its share of the store's capacity.
    capacity: usize,
    /// xorshift state: where the next eviction starts looking.
    rng: u64,
    /// See [`MemoryStats`].
    evictions: u64,
    /// See [`MemoryStats`].
    evictions_not_full: u64,
    /// The storage lifetime of the last rule seen, in seconds, and that rule's `max_tokens`
    /// and `refill_rate` (as bits), of which it is a function: most checks of a shard are of
    /// one rule or a few, so this saves a division and a rounding per check.
    ttl: (u64, u64, f64),
}

/// The buckets looked at to choose one to evict.
#[derive(Debug, Default)]
struct Sample {
    /// The slot and [rank](StoredBucket::eviction_rank) of the bucket to evict so far.
    best: Option<(usize, f64)>,
    /// Buckets looked at.
    seen: usize,
}

impl Sample {
    /// Looks at the bucket in slot `index`; `true` if it is full, which ends the search (it
    /// gives nothing away).
    fn consider(&mut self, index: usize, rank: f64, now: f64) -> bool {
        self.seen += 1;
        if self.best.is_none_or(|(_, best)| rank < best) {
            self.best = Some((index, rank));
        }
        rank <= now
    }
}

/// One bucket and its key in a single allocation: tokens, last, expires_at and full_at as
/// native-endian doubles, then the key's bytes.
///
/// A table slot is then only this 16-byte pointer, and a check touches one slot and one
/// allocation. With many keys, waiting for the slot is most of a check, so the slot is kept
/// small; the measurements behind that are in docs/performance.md ("Memory store").
#[derive(Debug)]
struct StoredBucket(Box<[u8]>);

/// Offsets in a [`StoredBucket`]'s allocation.
const TOKENS: usize = 0;
const LAST: usize = 8;
const EXPIRES_AT: usize = 16;
const FULL_AT: usize = 24;
const KEY: usize = 32;

/// When a bucket left alone is full again: `last` plus the time its missing tokens take to
/// come back. From then on it decides exactly as a missing bucket would, so dropping it loses
/// nothing.
fn full_at(state: BucketState, rule: &RateLimitRule) -> f64 {
    let missing = (rule.max_tokens() as f64 - state.tokens).max(0.0);
    state.last + missing * 60.0 / rule.refill_rate()
}

impl StoredBucket {
    fn new(key: &[u8], state: BucketState, expires_at: f64, full_at: f64) -> Self {
        let mut bytes = Vec::with_capacity(KEY + key.len());
        bytes.extend_from_slice(&state.tokens.to_ne_bytes());
        bytes.extend_from_slice(&state.last.to_ne_bytes());
        bytes.extend_from_slice(&expires_at.to_ne_bytes());
        bytes.extend_from_slice(&full_at.to_ne_bytes());
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

    /// How much evicting the bucket at `now` would give away, as the time at which it is full
    /// again: at or before `now` for a full (or expired) bucket, which gives nothing away.
    fn eviction_rank(&self, now: f64) -> f64 {
        let header = self.header();
        if read(&header, EXPIRES_AT) <= now {
            f64::NEG_INFINITY
        } else {
            read(&header, FULL_AT)
        }
    }

    fn set(&mut self, state: BucketState, expires_at: f64, full_at: f64) {
        // Every bucket has its header (see new), so this always writes.
        if let Some(header) = self.0.first_chunk_mut::<KEY>() {
            header[TOKENS..LAST].copy_from_slice(&state.tokens.to_ne_bytes());
            header[LAST..EXPIRES_AT].copy_from_slice(&state.last.to_ne_bytes());
            header[EXPIRES_AT..FULL_AT].copy_from_slice(&expires_at.to_ne_bytes());
            header[FULL_AT..KEY].copy_from_slice(&full_at.to_ne_bytes());
        }
    }

    fn header(&self) -> [u8; KEY] {
        // Every bucket has its header (see new); the default is never used.
        self.0.first_chunk().copied().unwrap_or([0; KEY])
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
    /// Buckets a store holds at most unless told otherwise: 1,000,000. Enough for a million
    /// clients within one refill time of each other. Each bucket is one heap allocation of its
    /// state (32 bytes) and its key, plus its table slot; what a full store takes in resident
    /// memory is measured by `just bench memory-flood` (docs/performance.md).
    pub const DEFAULT_CAPACITY: usize = 1_000_000;

    /// A store on the host's wall clock ([`CounterClock`]), holding at most
    /// [`DEFAULT_CAPACITY`](Self::DEFAULT_CAPACITY) buckets.
    pub fn new() -> Self {
        Self::with_clock(CounterClock::default())
    }

    /// A store on the given clock (a [`ManualClock`](ratelimit_domain::ManualClock) in tests),
    /// holding at most [`DEFAULT_CAPACITY`](Self::DEFAULT_CAPACITY) buckets.
    pub fn with_clock(clock: impl Clock) -> Self {
        Self::with_shared_clock(Arc::new(clock))
    }

    /// A store on a clock shared with other components, holding at most
    /// [`DEFAULT_CAPACITY`](Self::DEFAULT_CAPACITY) buckets.
    pub fn with_shared_clock(clock: Arc<dyn Clock>) -> Self {
        let capacity = Self::DEFAULT_CAPACITY;
        Self::from_parts(capacity, shard_count(capacity), clock)
    }

    /// A builder, to choose the capacity as well as the clock:
    ///
    /// ```
    /// # use ratelimit_domain::ManualClock;
    /// # use ratelimit_memory::MemoryStorage;
    /// let store = MemoryStorage::builder()
    ///     .capacity(10_000)
    ///     .clock(ManualClock::new(0.0))
    ///     .build()?;
    /// assert_eq!(store.stats().capacity, 10_000);
    /// # Ok::<(), ratelimit_domain::RateLimitError>(())
    /// ```
    pub fn builder() -> MemoryStorageBuilder {
        MemoryStorageBuilder {
            capacity: Self::DEFAULT_CAPACITY,
            clock: None,
        }
    }

    /// `count` shards: a power of two, at most the capacity and [`MAX_SHARDS`].
    fn from_parts(capacity: usize, count: usize, clock: Arc<dyn Clock>) -> Self {
        let capacity = capacity.max(1);
        let count = if count.is_power_of_two() && count <= capacity.min(MAX_SHARDS) {
            count
        } else {
            shard_count(capacity)
        };
        let hasher = RandomState::default();
        let shards = (0..count)
            .map(|index| {
                Mutex::new(Shard {
                    buckets: HashTable::new(),
                    next_sweep: 0.0,
                    // Shares that differ by at most one and add up to the capacity.
                    capacity: capacity / count + usize::from(index < capacity % count),
                    // xorshift needs a state other than zero.
                    rng: hasher.hash_one(index) | 1,
                    evictions: 0,
                    evictions_not_full: 0,
                    // No rule has a max_tokens of 0, so the first check computes it.
                    ttl: (0, 0, 0.0),
                })
            })
            .collect();
        Self {
            shards,
            shard_mask: count - 1,
            capacity,
            clock,
            hasher,
        }
    }

    /// How many buckets the store holds, expired ones not yet swept included.
    pub fn bucket_count(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| lock(shard).buckets.len())
            .sum()
    }

    /// What the store holds and what it had to let go (one shard locked at a time, so the
    /// figures of a store in use are each a moment's).
    pub fn stats(&self) -> MemoryStats {
        let mut stats = MemoryStats {
            capacity: self.capacity,
            ..MemoryStats::default()
        };
        for shard in &self.shards {
            let shard = lock(shard);
            stats.buckets += shard.buckets.len();
            stats.evictions += shard.evictions;
            stats.evictions_not_full += shard.evictions_not_full;
        }
        stats
    }

    /// Drops every expired bucket now, rather than as time passes.
    pub fn sweep_expired(&self) {
        let now = self.clock.now();
        for shard in &self.shards {
            lock(shard).sweep(now);
        }
    }

    /// [`BucketStore::check_and_consume`] without a future: the same step on the same bucket,
    /// for callers that are not async (as governor's keyed limiter is called). The port's
    /// method calls this; it saves the boxed future an `async_trait` method returns, a heap
    /// allocation and its release per check (docs/performance.md, "Memory store").
    ///
    /// ```
    /// use ratelimit_domain::{BucketKey, BucketRequest, ManualClock, RateLimitRule, RateLimitScope};
    /// use ratelimit_memory::MemoryStorage;
    ///
    /// let store = MemoryStorage::with_clock(ManualClock::new(1_000.0));
    /// let rule = RateLimitRule::new(RateLimitScope::Ip, 2, 5.0)?;
    /// let key = BucketKey::new(RateLimitScope::Ip, "203.0.113.9", "POST /login")?;
    /// let request = BucketRequest::new(&key, &rule).with_cost(1);
    /// assert_eq!(store.check(&request)?.remaining, 1);
    /// assert_eq!(store.check(&request)?.remaining, 0);
    /// assert!(!store.check(&request)?.allowed);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`ErrorCode::InvalidInput`] for a `now` that is negative, infinite or NaN.
    pub fn check(&self, request: &BucketRequest<'_>) -> Result<BucketDecision> {
        let BucketRequest {
            key,
            rule,
            cost,
            now,
            ..
        } = *request;
        let now = self.now(now)?;
        let key = key.as_str().as_bytes();
        let hash = hash(&self.hasher, key);
        let decision = self
            .shard(hash)
            .check_and_consume(&self.hasher, key, hash, rule, cost, now);
        Ok(decision)
    }

    fn now(&self, now: Option<f64>) -> Result<f64> {
        let now = now.unwrap_or_else(|| self.clock.now());
        // validate_now's check (finite and not negative; NaN fails both comparisons), inline:
        // the call is only made to build the error.
        if (0.0..f64::INFINITY).contains(&now) {
            Ok(now)
        } else {
            token_bucket::validate_now(now)
        }
    }

    fn shard(&self, hash: u64) -> MutexGuard<'_, Shard> {
        lock(&self.shards[self.shard_index(hash)])
    }

    fn shard_index(&self, hash: u64) -> usize {
        // Masked below the shard count, so the cast cannot truncate.
        #[allow(clippy::cast_possible_truncation)]
        let index = (hash >> SHARD_SHIFT) as usize & self.shard_mask;
        index
    }
}

/// Shards for a capacity: [`MAX_SHARDS`], or for a smaller capacity the largest power of two
/// at most the capacity, so that every shard holds at least one bucket.
fn shard_count(capacity: usize) -> usize {
    let capacity = capacity.max(1);
    MAX_SHARDS.min(1 << (usize::BITS - 1 - capacity.leading_zeros()))
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // A panic while the lock was held cannot leave a bucket half-written (nothing that can
    // panic runs while one is written), so a poisoned lock is safe to use.
    shard
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shard {
    /// When a bucket of `rule` written at `now` expires: `now` plus the rule's
    /// [storage lifetime](RateLimitRule::storage_ttl_seconds).
    fn expires_at(&mut self, rule: &RateLimitRule, now: f64) -> f64 {
        let (max_tokens, refill_rate) = (rule.max_tokens(), rule.refill_rate().to_bits());
        if (self.ttl.0, self.ttl.1) != (max_tokens, refill_rate) {
            self.ttl = (max_tokens, refill_rate, rule.storage_ttl_seconds() as f64);
        }
        now + self.ttl.2
    }

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
        let expires_at = self.expires_at(rule, now);
        if let Some(bucket) = self.buckets.find_mut(hash, |bucket| bucket.key() == key) {
            // An expired bucket reads as missing; a step that stores brings it back to life.
            let step = step((bucket.expires_at() > now).then(|| bucket.state()));
            if let Some(state) = step.store {
                bucket.set(state, expires_at, full_at(state, rule));
            }
            return step.decision;
        }
        let step = step(None);
        if let Some(state) = step.store {
            while self.buckets.len() >= self.capacity {
                if !self.evict_one(now) {
                    break;
                }
            }
            let bucket = StoredBucket::new(key, state, expires_at, full_at(state, rule));
            // The table rehashes its buckets when it grows.
            self.buckets
                .insert_unique(hash, bucket, |bucket| self::hash(hasher, bucket.key()));
        }
        step.decision
    }

    /// The live state of the bucket of `key` (an expired one reads as missing).
    fn read(&self, key: &[u8], hash: u64, now: f64) -> Option<BucketState> {
        self.buckets
            .find(hash, |bucket| bucket.key() == key)
            .filter(|bucket| bucket.expires_at() > now)
            .map(StoredBucket::state)
    }

    /// Stores `state` as the bucket of `key`, making room as a new bucket does.
    fn write(
        &mut self,
        hasher: &RandomState,
        key: &[u8],
        hash: u64,
        rule: &RateLimitRule,
        state: BucketState,
        now: f64,
    ) {
        let expires_at = self.expires_at(rule, now);
        if let Some(bucket) = self.buckets.find_mut(hash, |bucket| bucket.key() == key) {
            bucket.set(state, expires_at, full_at(state, rule));
            return;
        }
        while self.buckets.len() >= self.capacity {
            if !self.evict_one(now) {
                break;
            }
        }
        let bucket = StoredBucket::new(key, state, expires_at, full_at(state, rule));
        self.buckets
            .insert_unique(hash, bucket, |bucket| self::hash(hasher, bucket.key()));
    }

    /// Drops the bucket that gives the least away, of a few looked at in random slots: the
    /// first full (or expired) one met, else the one that will be full soonest. `false` if
    /// the shard holds no bucket.
    ///
    /// Work is bounded: at most [`EVICTION_SAMPLE`] buckets read, in at most
    /// [`EVICTION_PROBES`] slots unless none of those held one; a table of at most that many
    /// slots is read whole. Each slot is drawn on its own
    /// (not a run of neighbours from one random start, which evicts the bucket after the
    /// widest gap more often, widens the gaps, and leaves samples of one or two buckets).
    fn evict_one(&mut self, now: f64) -> bool {
        let slots = self.buckets.num_buckets();
        if slots == 0 || self.buckets.is_empty() {
            return false;
        }
        let mut sample = Sample::default();
        if slots > EVICTION_PROBES {
            for _ in 0..EVICTION_PROBES {
                // Any bits of the random number will do; hashbrown's slot count is a power
                // of two, so the remainder is a mask.
                #[allow(clippy::cast_possible_truncation)]
                let random = self.next_random() as usize;
                let index = if slots.is_power_of_two() {
                    random & (slots - 1)
                } else {
                    random % slots
                };
                if let Some(bucket) = self.buckets.get_bucket(index)
                    && (sample.consider(index, bucket.eviction_rank(now), now)
                        || sample.seen == EVICTION_SAMPLE)
                {
                    break;
                }
            }
        }
        if sample.seen == 0 {
            // A small table, read whole for the best choice; or (which a table at capacity,
            // about a quarter occupied or more, all but never shows) no bucket in those slots.
            for index in 0..slots {
                if let Some(bucket) = self.buckets.get_bucket(index)
                    && sample.consider(index, bucket.eviction_rank(now), now)
                {
                    break;
                }
            }
        }
        let Some((index, rank)) = sample.best else {
            return false;
        };
        match self.buckets.get_bucket_entry(index) {
            Ok(entry) => {
                entry.remove();
                self.evictions += 1;
                // A NaN rank (never written so) counts as not full, to err on the safe side.
                let full = rank <= now;
                if !full {
                    self.evictions_not_full += 1;
                }
                true
            }
            Err(_) => false,
        }
    }

    /// The next xorshift64 number.
    fn next_random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }
}

#[async_trait]
impl BucketStore for MemoryStorage {
    async fn check_and_consume<'a>(&self, request: &BucketRequest<'a>) -> Result<BucketDecision> {
        self.check(request)
    }

    /// Always `Some`: the memory store never waits.
    fn check_now<'a>(&self, request: &BucketRequest<'a>) -> Option<Result<BucketDecision>> {
        Some(self.check(request))
    }

    /// Locks the shards of every key, in ascending order (so that concurrent checks never
    /// wait on each other in a cycle), steps all buckets with
    /// [`token_bucket::step_all`], and writes what it says before releasing any lock: atomic.
    async fn check_and_consume_all<'a>(
        &self,
        requests: &[BucketRequest<'a>],
    ) -> Result<Vec<BucketDecision>> {
        let first = match requests {
            [] => return Ok(Vec::new()),
            [one] => return Ok(vec![self.check_and_consume(one).await?]),
            [first, ..] => first,
        };
        let now = self.now(first.now)?;
        for (i, request) in requests.iter().enumerate() {
            if requests[..i].iter().any(|other| other.key == request.key) {
                return Err(RateLimitError::new(
                    ErrorCode::InvalidInput,
                    "the buckets of one check must be distinct",
                )
                .with_detail("key", request.key.as_str()));
            }
        }
        let located: Vec<(&[u8], u64, usize)> = requests
            .iter()
            .map(|request| {
                let key = request.key.as_str().as_bytes();
                let hash = hash(&self.hasher, key);
                (key, hash, self.shard_index(hash))
            })
            .collect();
        let mut order: Vec<usize> = located.iter().map(|&(_, _, shard)| shard).collect();
        order.sort_unstable();
        order.dedup();
        let mut guards: Vec<MutexGuard<'_, Shard>> = order
            .iter()
            .map(|&index| lock(&self.shards[index]))
            .collect();
        let slot = |shard: usize| order.binary_search(&shard).unwrap_or(0);
        for guard in &mut guards {
            if now >= guard.next_sweep {
                guard.sweep(now);
            }
        }
        let inputs: Vec<StepInput> = requests
            .iter()
            .zip(&located)
            .map(|(request, &(key, hash, shard))| StepInput {
                stored: guards[slot(shard)].read(key, hash, now),
                max_tokens: request.rule.max_tokens(),
                refill_rate: request.rule.refill_rate(),
                cost: request.cost,
            })
            .collect();
        let steps = token_bucket::step_all(&inputs, now);
        for ((request, &(key, hash, shard)), step) in requests.iter().zip(&located).zip(&steps) {
            if let Some(state) = step.store {
                guards[slot(shard)].write(&self.hasher, key, hash, request.rule, state, now);
            }
        }
        Ok(steps.into_iter().map(|step| step.decision).collect())
    }

    async fn get_remaining(
        &self,
        key: &BucketKey,
        rule: &RateLimitRule,
        now: Option<f64>,
    ) -> Result<u64> {
        let request = BucketRequest::new(key, rule).with_cost(0).with_now(now);
        Ok(self.check_and_consume(&request).await?.remaining)
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
                .check_and_consume(&BucketRequest::new(&key("a"), &rule).with_cost(1))
                .await
                .unwrap();
            assert!(d.allowed);
            assert_eq!(d.remaining, expected);
        }
        let denied = store
            .check_and_consume(&BucketRequest::new(&key("a"), &rule).with_cost(1))
            .await
            .unwrap();
        assert!(!denied.allowed);
        assert_eq!(denied.retry_after, Duration::from_secs(12));
        clock.advance(Duration::from_secs(12));
        assert!(
            store
                .check_and_consume(&BucketRequest::new(&key("a"), &rule).with_cost(1))
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
                .check_and_consume(&BucketRequest::new(&key(&i.to_string()), &rule).with_cost(1))
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
            .check_and_consume(&BucketRequest::new(&key("other"), &rule).with_cost(1))
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
            .check_and_consume(&BucketRequest::new(&key("a"), &rule).with_cost(7))
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
                .check_and_consume(&BucketRequest::new(key, &rule).with_cost(cost))
                .await
                .unwrap();
            assert_eq!(d.remaining, 10 - cost);
        }
        assert_eq!(store.bucket_count(), keys.len());
        for (i, key) in keys.iter().enumerate() {
            let d = store
                .check_and_consume(&BucketRequest::new(key, &rule).with_cost(1))
                .await
                .unwrap();
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
                    .check_and_consume(&BucketRequest::new(&key("a"), rule).with_cost(cost).at(now))
                    .await
                    .unwrap()
            }
        };
        // Sweeps at 2000, so the shard's next sweep is not before 2010.
        assert_eq!(at(2_000.0, 1).await.remaining, 4);
        // Time goes back 115 s (within what a stored time may be ahead): nothing refills, and
        // the bucket now expires at 2005.
        assert_eq!(at(1_885.0, 1).await.remaining, 3);
        // Expired and not swept: a peek reads it as full and leaves it be.
        assert_eq!(at(2_007.0, 0).await.remaining, 5);
        assert_eq!(store.bucket_count(), 1);
        // A check starts it over from full, in place.
        assert_eq!(at(2_007.0, 2).await.remaining, 3);
        assert_eq!(store.bucket_count(), 1);
        assert_eq!(at(2_007.0, 0).await.remaining, 3);
    }

    #[tokio::test]
    async fn invalid_now_is_an_error_not_a_panic() {
        let store = MemoryStorage::new();
        let (key, rule) = (key("a"), rule(1, 1.0));
        for now in [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            -1.0,
            -f64::MIN_POSITIVE,
        ] {
            let request = BucketRequest::new(&key, &rule).with_cost(1).at(now);
            let err = store.check_and_consume(&request).await.unwrap_err();
            assert_eq!(err.code(), ErrorCode::InvalidInput, "{now}");
            assert_eq!(
                store.check(&request).unwrap_err().code(),
                ErrorCode::InvalidInput
            );
        }
        assert_eq!(store.bucket_count(), 0);
        // The edges that are valid: both answer (0 and -0 are the epoch).
        for now in [0.0, -0.0, f64::MAX] {
            let request = BucketRequest::new(&key, &rule).with_cost(0).at(now);
            assert!(
                store.check_and_consume(&request).await.unwrap().allowed,
                "{now}"
            );
            assert!(store.check(&request).unwrap().allowed, "{now}");
        }
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
                        .check_and_consume(&BucketRequest::new(&key("hot"), &rule).with_cost(1))
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_multi_limit_checks_are_all_or_nothing() {
        // Four clients with 10 tokens each share a limit of 15; no refill during the test.
        let store = Arc::new(MemoryStorage::with_clock(ManualClock::new(1.0)));
        let own = rule(10, 1.0);
        let shared = rule(15, 1.0);
        let shared_key = key("everyone");
        let tasks: Vec<_> = (0..400)
            .map(|i| {
                let (store, own, shared, shared_key) = (
                    store.clone(),
                    own.clone(),
                    shared.clone(),
                    shared_key.clone(),
                );
                tokio::spawn(async move {
                    let client = i % 4;
                    let own_key = key(&format!("client-{client}"));
                    let requests = [
                        BucketRequest::new(&own_key, &own),
                        BucketRequest::new(&shared_key, &shared),
                    ];
                    let decisions = store.check_and_consume_all(&requests).await.unwrap();
                    (client, decisions.iter().all(|d| d.allowed))
                })
            })
            .collect();
        let mut admitted = [0_u64; 4];
        for task in tasks {
            let (client, allowed) = task.await.unwrap();
            admitted[client] += u64::from(allowed);
        }
        assert_eq!(admitted.iter().sum::<u64>(), 15, "{admitted:?}");
        for (client, taken) in admitted.iter().enumerate() {
            let left = remaining(&store, &format!("client-{client}"), &own).await;
            assert_eq!(
                left,
                10 - taken,
                "refused requests took from client {client}"
            );
        }
        assert_eq!(remaining(&store, "everyone", &shared).await, 0);
    }

    #[tokio::test]
    async fn buckets_of_different_rules_in_one_shard_keep_their_own_lifetimes() {
        // The shard remembers the last rule's lifetime: a check of another rule must not get it.
        let clock = ManualClock::new(1_000.0);
        let store = one_shard(100, &clock);
        let short = rule(5, 5.0); // storage TTL 120 s
        let long = rule(100, 1.0); // storage TTL 6,060 s
        for round in 0..3 {
            take(&store, &format!("short-{round}"), &short, 1).await;
            take(&store, &format!("long-{round}"), &long, 50).await;
            // Through the several-limits path (Shard::write) as well.
            let (a, b) = (
                key(&format!("short-all-{round}")),
                key(&format!("long-all-{round}")),
            );
            let requests = [
                BucketRequest::new(&a, &short).with_cost(1),
                BucketRequest::new(&b, &long).with_cost(50),
            ];
            store.check_and_consume_all(&requests).await.unwrap();
        }
        clock.advance(Duration::from_secs(121));
        store.sweep_expired();
        assert_eq!(
            store.bucket_count(),
            6,
            "only the short rule's buckets expire"
        );
        for round in 0..3 {
            // 50 left, and 2 refilled in 121 s.
            assert_eq!(remaining(&store, &format!("long-{round}"), &long).await, 52);
            assert_eq!(
                remaining(&store, &format!("long-all-{round}"), &long).await,
                52
            );
        }
        clock.advance(Duration::from_secs(6_000));
        store.sweep_expired();
        assert_eq!(store.bucket_count(), 0);
    }

    /// A store of one shard, so that a test knows which buckets compete for room.
    fn one_shard(capacity: usize, clock: &ManualClock) -> MemoryStorage {
        MemoryStorage::from_parts(capacity, 1, Arc::new(clock.clone()))
    }

    /// Buckets held by each shard, and each shard's share of the capacity.
    fn shard_fill(store: &MemoryStorage) -> Vec<(usize, usize)> {
        store
            .shards
            .iter()
            .map(|shard| {
                let shard = lock(shard);
                (shard.buckets.len(), shard.capacity)
            })
            .collect()
    }

    async fn remaining(store: &MemoryStorage, id: &str, rule: &RateLimitRule) -> u64 {
        store.get_remaining(&key(id), rule, None).await.unwrap()
    }

    async fn take(store: &MemoryStorage, id: &str, rule: &RateLimitRule, cost: u64) -> u64 {
        let d = store
            .check_and_consume(&BucketRequest::new(&key(id), rule).with_cost(cost))
            .await
            .unwrap();
        assert!(d.allowed, "{id}");
        d.remaining
    }

    #[test]
    fn the_existing_constructors_hold_the_default_capacity() {
        assert_eq!(
            MemoryStorage::new().stats().capacity,
            MemoryStorage::DEFAULT_CAPACITY
        );
        let stats = MemoryStorage::with_clock(ManualClock::new(0.0)).stats();
        assert_eq!(
            stats,
            MemoryStats {
                buckets: 0,
                capacity: MemoryStorage::DEFAULT_CAPACITY,
                evictions: 0,
                evictions_not_full: 0,
            }
        );
        let default = MemoryStorage::builder().build().unwrap();
        assert_eq!(default.stats().capacity, MemoryStorage::DEFAULT_CAPACITY);
    }

    #[test]
    fn a_capacity_of_zero_is_an_error() {
        let err = MemoryStorage::builder().capacity(0).build().unwrap_err();
        assert_eq!(err.code(), ratelimit_domain::ErrorCode::InvalidInput);
    }

    #[tokio::test]
    async fn a_flood_of_distinct_keys_never_exceeds_the_capacity_nor_a_shards_share() {
        let clock = ManualClock::new(1_000.0);
        let store = MemoryStorage::builder()
            .capacity(1_000)
            .clock(clock.clone())
            .build()
            .unwrap();
        let shares = shard_fill(&store);
        assert_eq!(shares.len(), 16);
        assert_eq!(shares.iter().map(|&(_, share)| share).sum::<usize>(), 1_000);
        // A refill time of ten years: nothing expires, only eviction makes room.
        let rule = rule(10, 10.0 / (10.0 * 365.0 * 24.0 * 60.0));
        for i in 0..20_000 {
            let id = format!("attacker-{i}");
            assert_eq!(take(&store, &id, &rule, 1).await, 9);
            // The newest bucket is held, never evicted to make room for itself.
            assert_eq!(remaining(&store, &id, &rule).await, 9);
            if i % 500 == 0 {
                assert!(store.bucket_count() <= 1_000);
                for (held, share) in shard_fill(&store) {
                    assert!(held <= share, "{held} > {share}");
                }
            }
            clock.advance(Duration::from_millis(1));
        }
        let stats = store.stats();
        assert_eq!(stats.buckets, 1_000);
        assert_eq!(stats.capacity, 1_000);
        assert_eq!(stats.evictions, 19_000);
        // Every one-shot bucket was one token short of full for years.
        assert_eq!(stats.evictions_not_full, 19_000);
    }

    #[tokio::test]
    async fn small_capacities_hold_and_are_never_exceeded() {
        let clock = ManualClock::new(1_000.0);
        let rule = rule(10, 1.0);
        for capacity in 1..=40 {
            let store = MemoryStorage::builder()
                .capacity(capacity)
                .clock(clock.clone())
                .build()
                .unwrap();
            for i in 0..200 {
                let id = i.to_string();
                assert_eq!(take(&store, &id, &rule, 1).await, 9);
                assert_eq!(remaining(&store, &id, &rule).await, 9);
                assert!(store.bucket_count() <= capacity, "capacity {capacity}");
            }
            assert_eq!(store.stats().evictions, 200 - store.bucket_count() as u64);
        }
    }

    #[tokio::test]
    async fn full_buckets_are_evicted_before_non_full_ones() {
        let clock = ManualClock::new(1_000.0);
        let store = one_shard(8, &clock);
        let rule = rule(10, 10.0); // a token every 6 s
        // Eight buckets, one to eight tokens short: full again after 6, 12, ..., 48 s.
        for i in 0..8 {
            take(&store, &format!("k{i}"), &rule, i + 1).await;
        }
        clock.advance(Duration::from_secs(7)); // k0 is full again
        take(&store, "n1", &rule, 1).await; // full at 1013
        let stats = store.stats();
        assert_eq!((stats.buckets, stats.evictions), (8, 1));
        assert_eq!(stats.evictions_not_full, 0);
        for i in 1..8 {
            assert!(remaining(&store, &format!("k{i}"), &rule).await < 10);
        }
        // None is full now: the one full soonest goes, k1 (at 1012), and is counted.
        take(&store, "n2", &rule, 1).await;
        let stats = store.stats();
        assert_eq!((stats.evictions, stats.evictions_not_full), (2, 1));
        assert_eq!(remaining(&store, "k1", &rule).await, 10); // handed a refill
        assert_eq!(remaining(&store, "n1", &rule).await, 9);
        for i in 2..8 {
            // k2 has 8 + 1 token back after 7 s, k3 7 + 1, ...
            assert_eq!(remaining(&store, &format!("k{i}"), &rule).await, 10 - i);
        }
    }

    #[tokio::test]
    async fn in_a_large_shard_the_sample_still_finds_full_buckets_first() {
        let clock = ManualClock::new(1_000.0);
        let store = one_shard(2_000, &clock);
        let short = rule(10, 10.0); // a token every 6 s
        let long = rule(10, 0.01); // a token every 100 min
        for i in 0..1_000 {
            take(&store, &format!("short-{i}"), &short, 1).await;
            take(&store, &format!("long-{i}"), &long, 1).await;
        }
        clock.advance(Duration::from_secs(7)); // every short bucket is full again
        for i in 0..500 {
            take(&store, &format!("new-{i}"), &long, 1).await;
        }
        // Half the buckets full at first, a quarter by the end: a sample of 5 misses them all
        // one time in 32 at first, one in 4 by the end, about 50 times in all (picking at
        // random would drop about 300 non-full buckets).
        let stats = store.stats();
        assert_eq!(stats.evictions, 500);
        assert!(stats.evictions_not_full < 100, "{stats:?}");
    }

    #[tokio::test]
    async fn a_steady_client_survives_a_flood_of_one_shot_identifiers() {
        let clock = ManualClock::new(1_000.0);
        let store = MemoryStorage::builder()
            .capacity(1_024)
            .clock(clock.clone())
            .build()
            .unwrap();
        let steady = rule(1_000, 1.0); // 1,000 tokens, one back a minute
        let one_shot = rule(10, 10.0); // one back every 6 s
        let mut expected = 1_000;
        for i in 0..100_000 {
            if i % 1_000 == 0 {
                expected -= 1;
                // Never handed a refill: each check finds the tokens the last one left.
                assert_eq!(take(&store, "steady", &steady, 1).await, expected);
            }
            take(&store, &format!("flood-{i}"), &one_shot, 1).await;
        }
        let stats = store.stats();
        assert_eq!(stats.buckets, 1_024);
        assert_eq!(stats.evictions, 100_001 - 1_024);
        assert_eq!(stats.evictions_not_full, stats.evictions);
        assert_eq!(remaining(&store, "steady", &steady).await, 900);
    }

    #[tokio::test]
    async fn decisions_are_unchanged_up_to_the_capacity() {
        let clock = ManualClock::new(1_000.0);
        // 16 shards of 16: the 16 keys checked below fit even if all hash into one shard (the
        // hash is seeded per store, so which shard each lands in is not known in advance).
        let exact = MemoryStorage::builder()
            .capacity(256)
            .clock(clock.clone())
            .build()
            .unwrap();
        let roomy = MemoryStorage::with_clock(clock.clone());
        let rule = rule(5, 30.0);
        // 64 keys in one shard of 64: exactly full, never over.
        let exact_one = one_shard(64, &clock);
        let mut held = 0;
        for round in 0..20 {
            for i in 0..64 {
                let key = key(&i.to_string());
                let cost = (round + i) % 3;
                let a = roomy
                    .check_and_consume(&BucketRequest::new(&key, &rule).with_cost(cost))
                    .await;
                let b = exact_one
                    .check_and_consume(&BucketRequest::new(&key, &rule).with_cost(cost))
                    .await;
                assert_eq!(a.unwrap(), b.unwrap());
                // A store with room for every key decides the same too.
                if i % 4 == 0 {
                    let c = exact
                        .check_and_consume(&BucketRequest::new(&key, &rule).with_cost(cost))
                        .await;
                    assert_eq!(
                        c.unwrap().remaining,
                        roomy.get_remaining(&key, &rule, None).await.unwrap()
                    );
                    held += 1;
                }
            }
            clock.advance(Duration::from_secs(1));
        }
        assert!(held > 0);
        assert_eq!(exact.stats().evictions, 0);
        assert_eq!(exact_one.stats().evictions, 0);
        assert_eq!(roomy.stats().evictions, 0);
    }
}
