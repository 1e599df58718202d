//! A [`BucketStore`](ratelimit_domain::BucketStore) on Redis: [`RedisStorage`].
//!
//! # How a check runs
//! One `EVALSHA` of `lua/token_bucket.lua` per check, on a connection from a bb8 pool of
//! multiplexed connections (concurrent checks share connections and pipeline their
//! commands). The script reads and writes the bucket's two keys atomically and, unless the
//! caller passes an explicit `now`, takes the time from Redis's own `TIME`, so every host
//! limits on one clock.
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
//!   [`StorageError`](ratelimit_domain::ErrorCode::StorageError); deciding to fail open is the
//!   adapter's job, so that the policy sits in one place for every store. One bucket's
//!   unusable data (a key of another type: `WRONGTYPE`; a reply that cannot be read) is
//!   [`CorruptBucket`](ratelimit_domain::ErrorCode::CorruptBucket), naming the key, which says
//!   nothing about the store's health.
//! - **Hostile stored values.** The scripts validate what they read as
//!   [`token_bucket::step`](ratelimit_domain::token_bucket::step) does: a value no step could
//!   have written reads as a missing (full) bucket.
//! - **Old servers.** [`RedisStorage::connect`] refuses Redis before 5.0
//!   ([`RedisStorage::check_version`]).
//!
//! The key layout and the script contract are in `docs/lua.md`.

mod config;
mod connection;
mod error;
mod storage;

pub use config::{KeyLayout, RedisConfig};
pub use storage::{RESET_CHANNEL, RedisStorage};

use std::io::Write as _;

/// The token-bucket script, as Redis runs it.
pub const TOKEN_BUCKET_SCRIPT: &str = include_str!("../../../lua/token_bucket.lua");

/// The token-bucket script of the compact layout ([`KeyLayout::Compact`]).
pub const TOKEN_BUCKET_COMPACT_SCRIPT: &str = include_str!("../../../lua/token_bucket_compact.lua");

/// The compact script's `ARGV[1]`: `max_tokens`, `refill_rate` and `cost` as three
/// little-endian doubles, as `struct.unpack('<ddd', …)` reads them, followed by the key
/// lifetime in seconds as decimal text (see docs/lua.md).
///
/// `as f64` is the conversion the reference step ([`ratelimit_domain::token_bucket::step`]) and
/// Lua's `tonumber` make too; rules keep `max_tokens` at or below 2^53, where it is exact, and
/// a `cost` up to `max_tokens` is exact too. A `cost` above `max_tokens` is decided here, on the
/// integers, and sent as `+inf`, which the script denies for ever as the step does: as a
/// double, a cost above 2^53 could round down to `max_tokens`. Built on the stack: no
/// allocation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CompactArgs {
    bytes: [u8; CompactArgs::CAPACITY],
    len: usize,
}

impl CompactArgs {
    /// 24 bytes of numbers and at most 20 digits of lifetime.
    const CAPACITY: usize = 24 + 20;

    /// Packs the numbers of one check.
    #[allow(clippy::cast_precision_loss)]
    pub fn new(max_tokens: u64, refill_rate: f64, cost: u64, ttl_seconds: u64) -> Self {
        let mut bytes = [0_u8; Self::CAPACITY];
        for (chunk, number) in bytes[..24].chunks_exact_mut(8).zip([
            max_tokens as f64,
            refill_rate,
            Self::cost(max_tokens, cost),
        ]) {
            chunk.copy_from_slice(&number.to_le_bytes());
        }
        // The lifetime's digits; 20 bytes hold any u64, so the write cannot fail.
        let mut digits = &mut bytes[24..];
        let _ = write!(digits, "{ttl_seconds}");
        let len = Self::CAPACITY - digits.len();
        Self { bytes, len }
    }

    /// `cost` as the script reads it: exact up to `max_tokens`, `+inf` above.
    #[allow(clippy::cast_precision_loss)] // exact: cost <= max_tokens <= 2^53
    fn cost(max_tokens: u64, cost: u64) -> f64 {
        if cost > max_tokens {
            f64::INFINITY
        } else {
            cost as f64
        }
    }

    /// The argument as sent.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl std::fmt::Debug for CompactArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let number = |i: usize| {
            let mut chunk = [0_u8; 8];
            chunk.copy_from_slice(&self.bytes[i * 8..i * 8 + 8]);
            f64::from_le_bytes(chunk)
        };
        f.debug_struct("CompactArgs")
            .field("max_tokens", &number(0))
            .field("refill_rate", &number(1))
            .field("cost", &number(2))
            .field("ttl", &String::from_utf8_lossy(&self.bytes[24..self.len]))
            .finish()
    }
}
