//! A [`BucketStore`](ratelimit_domain::BucketStore) on Redis: [`RedisStorage`], the store for
//! services that run on several hosts and must share one limit per client. Every host checks the
//! same buckets, on Redis's clock, so a client gets the same allowance whichever host it reaches.
//! (One host alone can use `ratelimit-memory` instead.)
//!
//! # How a check runs
//! One `EVALSHA` of the layout's token-bucket script ([`TOKEN_BUCKET_COMPACT_SCRIPT`] in the
//! default [`KeyLayout::Compact`], [`TOKEN_BUCKET_SCRIPT`] with [`KeyLayout::TwoKeys`]) per
//! check, on a connection from a bb8 pool of multiplexed connections (concurrent checks share
//! connections and pipeline their commands). With coalescing on, checks that arrive while
//! [`MAX_IN_FLIGHT`] calls are on their way are coalesced: they go to Redis together in one call of the layout's batch
//! script ([`TOKEN_BUCKET_COMPACT_BATCH_SCRIPT`], [`TOKEN_BUCKET_BATCH_SCRIPT`]), each still its
//! own atomic step (off by default: [`RedisConfig::with_coalescing`]; on a Redis Cluster, one
//! call per hash slot). The script reads and writes the bucket's keys atomically and, unless the caller
//! passes an explicit `now`, takes the time from Redis's own `TIME`, so every host limits on one
//! clock.
//!
//! A check of several limits at once
//! ([`check_and_consume_all`](ratelimit_domain::BucketStore::check_and_consume_all), all or
//! nothing) is one `EVALSHA` of the layout's multi-bucket script ([`TOKEN_BUCKET_MULTI_SCRIPT`],
//! [`TOKEN_BUCKET_COMPACT_MULTI_SCRIPT`]) over every bucket: atomic, exactly as
//! [`token_bucket::step_all`](ratelimit_domain::token_bucket::step_all). On a Redis Cluster, where
//! one script reaches one slot only, it is one call per slot, all at once, and the slots that took
//! give their tokens back when another refused: never more admitted than every limit allows, but
//! for a round trip a concurrent request may be refused that would have passed (`docs/lua.md`,
//! "Several limits in one check").
//!
//! # Failure handling
//! - **Lost scripts.** When Redis answers `NOSCRIPT` (after a restart, a failover or
//!   `SCRIPT FLUSH`), the store sends the call once more as `EVAL` with the script's text
//!   (which also restores Redis's script cache), so limiting never silently stops. Each resend is
//!   logged as a warning and counted
//!   ([`RedisStorage::script_reloads`]).
//! - **Deadlines.** Every operation, taking a connection from the pool included, has a
//!   deadline ([`RedisConfig::check_timeout`] for checks, [`RedisConfig::admin_timeout`] for
//!   resets). A connection that failed or timed out is dropped from the pool instead of being
//!   handed out again.
//! - **Honest errors.** The store reports failures as
//!   [`StorageUnavailable`](ratelimit_domain::ErrorCode::StorageUnavailable),
//!   [`StorageTimeout`](ratelimit_domain::ErrorCode::StorageTimeout) or
//!   [`StorageError`](ratelimit_domain::ErrorCode::StorageError) and never decides a request
//!   itself: what a failed check means (allow, deny, or ask a local store) is the adapter's
//!   failure policy, so that it sits in one place for every store. One bucket's
//!   unusable data (a key of another type: `WRONGTYPE`; a reply that cannot be read) is
//!   [`CorruptBucket`](ratelimit_domain::ErrorCode::CorruptBucket), naming the key, which says
//!   nothing about the store's health.
//! - **Hostile stored values.** The scripts validate what they read as
//!   [`token_bucket::step`](ratelimit_domain::token_bucket::step) does: a value no step could
//!   have written reads as a missing (full) bucket.
//! - **Old servers.** [`RedisStorage::connect`] refuses Redis before 5.0
//!   ([`RedisStorage::check_version`]).
//!
//! The key layouts and the script contract are in `docs/lua.md`.
//!
//! # Where things are
//! | Module | Job |
//! |---|---|
//! | `storage` | [`RedisStorage`] and its `BucketStore` implementation |
//! | `config` | [`RedisConfig`] and [`KeyLayout`] |
//! | `keys` | a bucket's Redis keys in each layout, hash-tagged on a cluster |
//! | `coalesce` | coalesced checks: what waits while calls are in flight goes as one batch script call |
//! | `script` | the scripts, and building and sending one call (`EVALSHA`, `EVAL` after `NOSCRIPT`) |
//! | `multi` | several buckets in one check: the multi-bucket and give-back calls, grouping by cluster slot |
//! | `reply` | reading the scripts' replies into decisions |
//! | `connection` | the bb8 pool, dropping failed connections, the deadline of each operation |
//! | `listener` | the reset listener's self-healing pub/sub subscription ([`RESET_CHANNEL`]) |
//! | `version` | refusing Redis before 5.0 |
//! | `error` | redis and bb8 errors as the domain's |
//!
//! # Features
//! - `bench-internals` (hidden, not part of the public API, no stability promise): exports
//!   `CompactArgs`, the compact script's packed argument, for `crates/bench`, which sends the
//!   scripts raw to measure what Redis spends on them. Applications do not need it.

mod coalesce;
mod config;
mod connection;
mod error;
mod keys;
mod listener;
mod multi;
mod reply;
mod script;
mod storage;
mod version;

pub use coalesce::{
    CoalescingStats, MAX_BATCH, MAX_IN_FLIGHT, TOKEN_BUCKET_BATCH_SCRIPT,
    TOKEN_BUCKET_COMPACT_BATCH_SCRIPT,
};
pub use config::{KeyLayout, RedisConfig};
pub use listener::RESET_CHANNEL;
#[cfg(feature = "bench-internals")]
#[doc(hidden)]
pub use script::CompactArgs;
pub use script::{
    TOKEN_BUCKET_COMPACT_MULTI_SCRIPT, TOKEN_BUCKET_COMPACT_SCRIPT, TOKEN_BUCKET_MULTI_SCRIPT,
    TOKEN_BUCKET_SCRIPT,
};
pub use storage::RedisStorage;
