//! The typed error of a rules file.

use std::fmt;
use std::path::{Path, PathBuf};

/// Why rules could not be read: the file, the rule, the field and the reason, each a field of
/// its own.
///
/// The message (`Display`) says the same in one line, e.g.
/// `rules file rules.toml: rule "GET /x", field cost: must be at least 1, got 0`, or, for one
/// limit of a rule's `limits` array,
/// `rule "GET /x", limit "everyone" (limits[1]), field max_tokens: must be at least 1, got 0`.
/// Errors of
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
    /// The text is not a rules file: a TOML syntax error, an unknown field, or a value of the
    /// wrong type. (A missing field is a [`ConfigError::Rule`] naming it.)
    #[error("{}invalid TOML: {reason}", InFile(file.as_deref()))]
    Syntax {
        /// The file, when the text came from one.
        file: Option<PathBuf>,
        /// The TOML parser's message, which names the line and the field.
        reason: String,
    },
    /// A rule is invalid.
    #[error("{}rule {rule:?}, {}field {field}: {reason}", InFile(file.as_deref()), InLimit(limit.as_ref()))]
    Rule {
        /// The file, when the text came from one.
        file: Option<PathBuf>,
        /// The rule at fault: its endpoint, as written.
        rule: String,
        /// The limit at fault, when the field is one of a member of the rule's `limits` array.
        limit: Option<LimitRef>,
        /// The field at fault (of the limit, when there is one; of the rule otherwise).
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

    /// The field at fault, when one is: of the limit, when [`limit`](Self::limit) names one.
    pub fn field(&self) -> Option<RuleField> {
        match self {
            Self::Rule { field, .. } => Some(*field),
            Self::Read { .. } | Self::Syntax { .. } => None,
        }
    }

    /// The limit at fault, when the field is one of a member of the rule's `limits` array.
    pub fn limit(&self) -> Option<&LimitRef> {
        match self {
            Self::Rule { limit, .. } => limit.as_ref(),
            Self::Read { .. } | Self::Syntax { .. } => None,
        }
    }

    /// Where the field is in the rule, as a path: `max_tokens`, or `limits[1].max_tokens` for
    /// a field of the rule's second limit; `None` when no field is at fault.
    pub fn field_path(&self) -> Option<String> {
        let field = self.field()?;
        Some(match self.limit() {
            Some(limit) => format!("limits[{}].{field}", limit.index),
            None => field.as_str().to_owned(),
        })
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

/// One member of a rule's `limits` array: where it is, and its name when it has one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct LimitRef {
    /// Its position in the array, from 0 (`limits[0]` is the first).
    pub index: usize,
    /// Its `name` as written, when it has one.
    pub name: Option<String>,
}

impl LimitRef {
    /// The member at `index`, called `name` if it has a name.
    pub fn new(index: usize, name: Option<&str>) -> Self {
        Self {
            index,
            name: name.map(str::to_owned),
        }
    }
}

impl fmt::Display for LimitRef {
    /// `limit "everyone" (limits[1])`, or `limits[1]` for a limit without a name.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(f, "limit {name:?} (limits[{}])", self.index),
            None => write!(f, "limits[{}]", self.index),
        }
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
    /// `limits`: the array of a rule with several limits.
    Limits,
    /// `name`: a limit's name, in a rule's `limits` array.
    Name,
}

impl RuleField {
    /// The name in the file: `endpoint`, `max_tokens`, `refill_rate`, `scope`, `cost`,
    /// `limits` or `name`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Endpoint => "endpoint",
            Self::MaxTokens => "max_tokens",
            Self::RefillRate => "refill_rate",
            Self::Scope => "scope",
            Self::Cost => "cost",
            Self::Limits => "limits",
            Self::Name => "name",
        }
    }
}

impl fmt::Display for RuleField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `"limit NAME (limits[I]), "`, or nothing for a field of the rule itself.
struct InLimit<'a>(Option<&'a LimitRef>);

impl fmt::Display for InLimit<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(limit) => write!(f, "{limit}, "),
            None => Ok(()),
        }
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
