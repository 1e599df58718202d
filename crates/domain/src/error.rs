//! The workspace's one error type.

use std::collections::BTreeMap;
use std::fmt;

/// A `Result` whose error defaults to [`RateLimitError`].
pub type Result<T, E = RateLimitError> = std::result::Result<T, E>;

/// What went wrong, in a form callers can branch on and log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// A rule could not be built or registered.
    InvalidRule,
    /// An identifier, endpoint or cost given to a check was unusable.
    InvalidInput,
    /// The store could not be reached (refused, dropped, no connection).
    StorageUnavailable,
    /// The store did not answer within its deadline.
    StorageTimeout,
    /// The store answered with an error or with a reply this crate cannot read.
    StorageError,
    /// The store answered, but one bucket's stored value (a key of another type, say) or the
    /// reply about it could not be used. Says nothing about the store's health: other buckets
    /// are unaffected, so it does not count towards opening a circuit breaker.
    CorruptBucket,
    /// A reset did not happen.
    ResetFailed,
    /// An event could not be published.
    EventPublishFailed,
    /// The configuration handed to the container was unusable.
    Configuration,
}

impl ErrorCode {
    /// The code as a stable, upper-case string, e.g. `RATE_LIMIT_RESET_FAILED`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRule => "RATE_LIMIT_INVALID_RULE",
            Self::InvalidInput => "RATE_LIMIT_INVALID_INPUT",
            Self::StorageUnavailable => "RATE_LIMIT_STORAGE_UNAVAILABLE",
            Self::StorageTimeout => "RATE_LIMIT_STORAGE_TIMEOUT",
            Self::StorageError => "RATE_LIMIT_STORAGE_ERROR",
            Self::CorruptBucket => "RATE_LIMIT_CORRUPT_BUCKET",
            Self::ResetFailed => "RATE_LIMIT_RESET_FAILED",
            Self::EventPublishFailed => "RATE_LIMIT_EVENT_PUBLISH_FAILED",
            Self::Configuration => "RATE_LIMIT_CONFIGURATION",
        }
    }

    /// Whether the error came from infrastructure (store or event bus) rather than from the
    /// caller's input. A check answers these with its failure policy.
    pub const fn is_infrastructure(self) -> bool {
        matches!(
            self,
            Self::StorageUnavailable
                | Self::StorageTimeout
                | Self::StorageError
                | Self::CorruptBucket
                | Self::EventPublishFailed
        )
    }

    /// Whether the error says the store as a whole is failing (unreachable, too slow, or
    /// answering with errors), as opposed to one bucket's data ([`Self::CorruptBucket`]) or the
    /// caller's input. Only these count towards opening a circuit breaker.
    pub const fn is_store_failure(self) -> bool {
        matches!(
            self,
            Self::StorageUnavailable | Self::StorageTimeout | Self::StorageError
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error with a machine-readable [`ErrorCode`], a human message, structured details and,
/// where there is one, the underlying cause.
///
/// The message never contains secrets: stores put what they know into `details` with care
/// (no passwords, no full connection URLs).
#[derive(Debug, thiserror::Error)]
#[error("{code}: {message}")]
pub struct RateLimitError {
    code: ErrorCode,
    message: String,
    details: BTreeMap<&'static str, String>,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl RateLimitError {
    /// An error with a code and a message (lower case, no trailing period).
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            details: BTreeMap::new(),
            source: None,
        }
    }

    /// Adds one structured detail, such as the key or endpoint involved.
    #[must_use]
    pub fn with_detail(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.details.insert(name, value.into());
        self
    }

    /// Attaches the underlying cause.
    #[must_use]
    pub fn with_source(
        mut self,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        self.source = Some(source.into());
        self
    }

    /// The machine-readable code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The human-readable message, without the code.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Structured details (key, endpoint, …).
    pub fn details(&self) -> &BTreeMap<&'static str, String> {
        &self.details
    }

    /// Re-labels the error with another code, keeping message, details and cause; for example
    /// a storage timeout during a reset becomes [`ErrorCode::ResetFailed`].
    #[must_use]
    pub fn recoded(mut self, code: ErrorCode) -> Self {
        if self.code != code {
            self.details
                .insert("cause_code", self.code.as_str().to_owned());
            self.code = code;
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_shows_code_and_message_and_keeps_details() {
        let err = RateLimitError::new(
            ErrorCode::StorageTimeout,
            "redis did not answer within 50ms",
        )
        .with_detail("operation", "check_and_consume")
        .recoded(ErrorCode::ResetFailed);
        assert_eq!(
            err.to_string(),
            "RATE_LIMIT_RESET_FAILED: redis did not answer within 50ms"
        );
        assert_eq!(err.code(), ErrorCode::ResetFailed);
        assert_eq!(err.details()["operation"], "check_and_consume");
        assert_eq!(err.details()["cause_code"], "RATE_LIMIT_STORAGE_TIMEOUT");
    }

    #[test]
    fn source_is_kept() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let err =
            RateLimitError::new(ErrorCode::StorageUnavailable, "cannot connect").with_source(io);
        assert!(std::error::Error::source(&err).is_some());
        assert!(err.code().is_infrastructure());
        assert!(!ErrorCode::InvalidInput.is_infrastructure());
    }
}
