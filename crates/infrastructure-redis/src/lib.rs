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
//!   adapter's job, so that the policy sits in one place for every store.
//!
//! The key layout and the script contract are in `docs/lua.md`.

mod config;
mod connection;
mod error;
mod storage;

pub use config::{KeyLayout, RedisConfig};
pub use storage::{RESET_CHANNEL, RedisStorage};

/// The token-bucket script, as Redis runs it.
pub const TOKEN_BUCKET_SCRIPT: &str = include_str!("../../../lua/token_bucket.lua");

/// The token-bucket script of the compact layout ([`KeyLayout::Compact`]).
pub const TOKEN_BUCKET_COMPACT_SCRIPT: &str = include_str!("../../../lua/token_bucket_compact.lua");

/// The compact script's `ARGV[1]`: `max_tokens`, `refill_rate` and `cost` as three little-endian
/// doubles, as `struct.unpack('<ddd', …)` reads them (see docs/lua.md).
///
/// `as f64` is the conversion the reference step ([`ratelimit_domain::token_bucket::step`]) and
/// Lua's `tonumber` make too; rules keep `max_tokens` below 2^53, where it is exact.
#[allow(clippy::cast_precision_loss)]
pub fn compact_numbers(max_tokens: u64, refill_rate: f64, cost: u64) -> [u8; 24] {
    let mut packed = [0_u8; 24];
    for (chunk, number) in
        packed
            .chunks_exact_mut(8)
            .zip([max_tokens as f64, refill_rate, cost as f64])
    {
        chunk.copy_from_slice(&number.to_le_bytes());
    }
    packed
}
