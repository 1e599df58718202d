//! Who a bucket belongs to.

use std::fmt;
use std::str::FromStr;

/// Whose requests share one bucket.
///
/// The scope decides the shape of the bucket's key (see [`crate::BucketKey`]): every scope but
/// [`Global`](RateLimitScope::Global) has one bucket per identifier and endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RateLimitScope {
    /// One bucket per client IP address and endpoint.
    Ip,
    /// One bucket per authenticated user and endpoint.
    User,
    /// One bucket per (user, identity provider) and endpoint.
    UserProvider,
    /// One bucket per endpoint, shared by every caller.
    Global,
}

impl RateLimitScope {
    /// Every scope, in declaration order.
    pub const ALL: [RateLimitScope; 4] = [Self::Ip, Self::User, Self::UserProvider, Self::Global];

    /// The scope's name as it appears in keys and configuration: `ip`, `user`,
    /// `user_provider` or `global`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ip => "ip",
            Self::User => "user",
            Self::UserProvider => "user_provider",
            Self::Global => "global",
        }
    }

    /// Whether buckets of this scope are told apart by an identifier.
    pub const fn uses_identifier(self) -> bool {
        !matches!(self, Self::Global)
    }
}

impl fmt::Display for RateLimitScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The text named no known scope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown rate-limit scope {0:?}: expected ip, user, user_provider or global")]
pub struct ParseScopeError(pub String);

impl FromStr for RateLimitScope {
    type Err = ParseScopeError;

    /// Parses `ip`, `user`, `user_provider` or `global` (ASCII case-insensitive).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|scope| scope.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| ParseScopeError(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for scope in RateLimitScope::ALL {
            assert_eq!(scope.as_str().parse::<RateLimitScope>(), Ok(scope));
            assert_eq!(scope.to_string(), scope.as_str());
        }
        assert_eq!("USER_PROVIDER".parse(), Ok(RateLimitScope::UserProvider));
        assert!("everyone".parse::<RateLimitScope>().is_err());
    }

    #[test]
    fn only_global_ignores_identifier() {
        assert!(RateLimitScope::Ip.uses_identifier());
        assert!(RateLimitScope::User.uses_identifier());
        assert!(RateLimitScope::UserProvider.uses_identifier());
        assert!(!RateLimitScope::Global.uses_identifier());
    }
}
