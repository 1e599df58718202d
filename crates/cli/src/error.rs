//! Exit codes and the errors that lead to them.

use std::process::ExitCode;

use ratelimit_config::ConfigError;
use ratelimit_domain::{ErrorCode, RateLimitError};

/// How `ratelimit` ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exit {
    /// 0: allowed, or done.
    Success,
    /// 1: the check was denied.
    Denied,
    /// 2: a usage or configuration error (bad flag, bad rules file, unknown endpoint, no Redis
    /// URL, …).
    Usage,
    /// 3: Redis could not be reached or failed.
    Redis,
}

impl Exit {
    /// The process exit status.
    pub(crate) const fn code(self) -> u8 {
        match self {
            Self::Success => 0,
            Self::Denied => 1,
            Self::Usage => 2,
            Self::Redis => 3,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        Self::from(exit.code())
    }
}

/// Why a command could not do its job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorKind {
    /// The command line is incomplete or contradicts the rules (exit 2).
    Usage,
    /// The rules file or the Redis URL is unusable (exit 2).
    Configuration,
    /// Redis failed (exit 3).
    Redis,
}

impl ErrorKind {
    /// A short lower-case name for JSON output: `usage`, `configuration`, `redis`.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            Self::Usage => "usage",
            Self::Configuration => "configuration",
            Self::Redis => "redis",
        }
    }
}

/// A failed command: what kind of failure, and a message for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CliError {
    /// What kind of failure, which decides the exit code.
    pub(crate) kind: ErrorKind,
    /// What went wrong, for humans (never holding a password).
    pub(crate) message: String,
    /// The library's error code, when the failure came from the library.
    pub(crate) code: Option<ErrorCode>,
}

impl CliError {
    /// A usage error (exit 2).
    pub(crate) fn usage(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Usage,
            message: message.into(),
            code: None,
        }
    }

    /// A configuration error (exit 2).
    pub(crate) fn configuration(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Configuration,
            message: message.into(),
            code: None,
        }
    }

    /// A Redis error (exit 3).
    pub(crate) fn redis(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Redis,
            message: message.into(),
            code: None,
        }
    }

    /// A library error, classified by its code: bad input and configuration exit 2, anything
    /// that came from Redis exits 3. `context` says what was being done.
    pub(crate) fn from_library(context: &str, err: &RateLimitError) -> Self {
        let kind = match err.code() {
            ErrorCode::InvalidInput | ErrorCode::InvalidRule => ErrorKind::Usage,
            ErrorCode::Configuration => ErrorKind::Configuration,
            _ => ErrorKind::Redis,
        };
        let message = if context.is_empty() {
            err.message().to_owned()
        } else {
            format!("{context}: {}", err.message())
        };
        Self {
            kind,
            message,
            code: Some(err.code()),
        }
    }

    /// A rules file that cannot be used (exit 2): its message names the file, and the rule,
    /// field and reason when one rule is at fault. Reported under the library's
    /// [`ErrorCode::Configuration`], as every configuration error is.
    pub(crate) fn from_config(err: &ConfigError) -> Self {
        Self {
            kind: ErrorKind::Configuration,
            message: err.to_string(),
            code: Some(ErrorCode::Configuration),
        }
    }

    /// The exit code this error leads to.
    pub(crate) const fn exit(&self) -> Exit {
        match self.kind {
            ErrorKind::Usage | ErrorKind::Configuration => Exit::Usage,
            ErrorKind::Redis => Exit::Redis,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_errors_map_onto_exit_codes() {
        let cases = [
            (ErrorCode::InvalidInput, Exit::Usage),
            (ErrorCode::Configuration, Exit::Usage),
            (ErrorCode::StorageUnavailable, Exit::Redis),
            (ErrorCode::StorageTimeout, Exit::Redis),
            (ErrorCode::StorageError, Exit::Redis),
            (ErrorCode::ResetFailed, Exit::Redis),
        ];
        for (code, exit) in cases {
            let err = CliError::from_library("doing", &RateLimitError::new(code, "broke"));
            assert_eq!(err.exit(), exit, "{code}");
            assert_eq!(err.message, "doing: broke");
            assert_eq!(err.code, Some(code));
        }
        assert_eq!(
            [Exit::Success, Exit::Denied, Exit::Usage, Exit::Redis].map(Exit::code),
            [0, 1, 2, 3]
        );
    }

    #[test]
    fn a_bad_rules_file_is_a_configuration_error() {
        let bad =
            ratelimit_config::parse_rules("[rules.\"GET /x\"]\nmax_tokens = 0\n").unwrap_err();
        let err = CliError::from_config(&bad);
        assert_eq!(err.kind, ErrorKind::Configuration);
        assert_eq!(err.exit(), Exit::Usage);
        assert_eq!(err.code, Some(ErrorCode::Configuration));
        assert_eq!(err.message, bad.to_string());
    }
}
