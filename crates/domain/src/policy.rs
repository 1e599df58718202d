//! What a check does when the store cannot answer.

use std::fmt;
use std::str::FromStr;

/// What a check decides when its store fails (unreachable, too slow, erroring, or its circuit
/// breaker is open).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailurePolicy {
    /// Allow the request (the specification's behaviour): a limiter outage never becomes a
    /// service outage.
    #[default]
    Open,
    /// Deny the request: for endpoints where an unlimited burst is worse than refusing.
    Closed,
    /// Ask an in-process fallback store with the same rules: limits keep holding per host
    /// while the shared store is out (each host then allows up to a full bucket on its own).
    Local,
}

impl FailurePolicy {
    /// `open`, `closed` or `local`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Closed => "closed",
            Self::Local => "local",
        }
    }
}

impl fmt::Display for FailurePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FailurePolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Self::Open, Self::Closed, Self::Local]
            .into_iter()
            .find(|policy| policy.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown failure policy {s:?}: expected open, closed or local"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_defaults_to_open() {
        assert_eq!(FailurePolicy::default(), FailurePolicy::Open);
        assert_eq!("LOCAL".parse(), Ok(FailurePolicy::Local));
        assert_eq!(
            "closed".parse::<FailurePolicy>().map(|p| p.to_string()),
            Ok("closed".to_owned())
        );
        assert!("sometimes".parse::<FailurePolicy>().is_err());
    }
}
