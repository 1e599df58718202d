//! Mapping of redis and bb8 errors onto the domain's error.

use std::time::Duration;

use bb8_redis::bb8::RunError;
use ratelimit_domain::{ErrorCode, RateLimitError};
use redis::RedisError;

use crate::connection::breaks_connection;

pub(crate) fn from_redis(err: RedisError, operation: &'static str) -> RateLimitError {
    let code = if err.is_timeout() {
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

pub(crate) fn bad_reply(detail: impl Into<String>) -> RateLimitError {
    RateLimitError::new(
        ErrorCode::StorageError,
        "unexpected reply from the token-bucket script",
    )
    .with_detail("reply", detail)
}
