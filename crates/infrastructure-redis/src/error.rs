//! Mapping of redis and bb8 errors onto the domain's error.

use std::time::Duration;

use bb8_redis::bb8::RunError;
use ratelimit_domain::{BucketKey, ErrorCode, RateLimitError};
use redis::RedisError;

use crate::connection::breaks_connection;

pub(crate) fn from_redis(err: RedisError, operation: &'static str) -> RateLimitError {
    let code = if is_wrong_type(&err) {
        // One bucket's key holds another type (someone wrote a hash or a list there): that
        // bucket is unusable, the store is fine.
        ErrorCode::CorruptBucket
    } else if err.is_timeout() {
        ErrorCode::StorageTimeout
    } else if err.is_connection_refusal() || breaks_connection(&err) {
        ErrorCode::StorageUnavailable
    } else {
        ErrorCode::StorageError
    };
    RateLimitError::new(code, format!("redis {operation} failed: {err}"))
        .with_detail("operation", operation)
        .with_source(err)
}

pub(crate) fn from_pool(err: RunError<RedisError>, operation: &'static str) -> RateLimitError {
    match err {
        RunError::User(err) => from_redis(err, operation),
        RunError::TimedOut => RateLimitError::new(
            ErrorCode::StorageTimeout,
            "timed out waiting for a redis connection",
        )
        .with_detail("operation", operation),
    }
}

pub(crate) fn deadline(operation: &'static str, timeout: Duration) -> RateLimitError {
    RateLimitError::new(
        ErrorCode::StorageTimeout,
        format!("redis {operation} did not finish within {timeout:?}"),
    )
    .with_detail("operation", operation)
    .with_detail("timeout_ms", timeout.as_millis().to_string())
}

/// Whether Redis refused a command because a key holds another type. Redis 7 passes the error
/// of a `redis.call` inside a script through with its code (`WRONGTYPE …`); Redis 5 and 6 wrap
/// it in `ERR Error running script …: WRONGTYPE …`.
pub(crate) fn is_wrong_type(err: &RedisError) -> bool {
    const MESSAGE: &str = "WRONGTYPE";
    err.code() == Some(MESSAGE)
        || (err.code() == Some("ERR") && err.detail().is_some_and(|d| d.contains(MESSAGE)))
}

/// A reply of the token-bucket script that cannot be read. The script only sends such a reply
/// about one bucket's stored data, so it is that bucket's problem, not the store's.
pub(crate) fn bad_reply(detail: impl Into<String>) -> RateLimitError {
    RateLimitError::new(
        ErrorCode::CorruptBucket,
        "unusable reply from the token-bucket script",
    )
    .with_detail("reply", detail)
}

/// Adds the bucket's key to an error about that bucket's data.
pub(crate) fn name_corrupt_bucket(err: RateLimitError, key: &BucketKey) -> RateLimitError {
    if err.code() == ErrorCode::CorruptBucket {
        err.with_detail("key", key.as_str())
    } else {
        err
    }
}
