//! The typed error of a rules file.

use std::fmt;
use std::path::{Path, PathBuf};

/// Why rules could not be read: the file, the rule, the field and the reason, each a field of
/// its own.
///
/// The message (`Display`) says the same in one line, e.g.
/// `rules file rules.toml: rule "GET /x", field cost: must be at least 1, got 0`. Errors of
/// [`parse_rules`](crate::parse_rules) have no file; [`load_rules_file`](crate::load_rules_file)
/// adds it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read rules file {}: {error}", file.display())]
    Read {
        /// The file.
        file: PathBuf,
        /// Why it could not be read (part of the message, hence not also a `source`).
        error: std::io::Error,
    },
    /// The text is not a rules file: a TOML syntax error, an unknown or missing field, or a
    /// value of the wrong type.
    #[error("{}invalid TOML: {reason}", InFile(file.as_deref()))]
    Syntax {
        /// The file, when the text came from one.
        file: Option<PathBuf>,
        /// The TOML parser's message, which names the line and the field.
        reason: String,
    },
    /// A rule is invalid.
    #[error("{}rule {rule:?}, field {field}: {reason}", InFile(file.as_deref()))]
    Rule {
        /// The file, when the text came from one.
        file: Option<PathBuf>,
        /// The rule at fault: its endpoint, as written.
        rule: String,
        /// The field at fault.
        field: RuleField,
        /// What is wrong with it, for humans.
        reason: String,
    },
}

impl ConfigError {
    /// The file at fault, when the rules came from one.
    pub fn file(&self) -> Option<&Path> {
        match self {
            Self::Read { file, .. } => Some(file),
            Self::Syntax { file, .. } | Self::Rule { file, .. } => file.as_deref(),
        }
    }

    /// The rule at fault (its endpoint), when one is.
    pub fn rule(&self) -> Option<&str> {
        match self {
            Self::Rule { rule, .. } => Some(rule),
            Self::Read { .. } | Self::Syntax { .. } => None,
        }
    }

    /// The field at fault, when one is.
    pub fn field(&self) -> Option<RuleField> {
        match self {
            Self::Rule { field, .. } => Some(*field),
            Self::Read { .. } | Self::Syntax { .. } => None,
        }
    }

    /// The same error, located in `path`.
    pub(crate) fn in_file(mut self, path: &Path) -> Self {
        match &mut self {
            Self::Read { .. } => {}
            Self::Syntax { file, .. } | Self::Rule { file, .. } => {
                *file = Some(path.to_owned());
            }
        }
        self
    }
}

/// A field of a rule, as the rules file names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RuleField {
    /// The table's name, `METHOD /path`.
    Endpoint,
    /// `max_tokens`.
    MaxTokens,
    /// `refill_rate`.
    RefillRate,
    /// `scope`.
    Scope,
    /// `cost`.
    Cost,
}

impl RuleField {
    /// The name in the file: `endpoint`, `max_tokens`, `refill_rate`, `scope` or `cost`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Endpoint => "endpoint",
            Self::MaxTokens => "max_tokens",
            Self::RefillRate => "refill_rate",
            Self::Scope => "scope",
            Self::Cost => "cost",
        }
    }
}

impl fmt::Display for RuleField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `"rules file PATH: "`, or nothing without a file.
struct InFile<'a>(Option<&'a Path>);

impl fmt::Display for InFile<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(path) => write!(f, "rules file {}: ", path.display()),
            None => Ok(()),
        }
    }
}
