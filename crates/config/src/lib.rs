//! Configuration for ratelimit: the rules file, read and validated before anything is wired.
//!
//! Services, the example server and the `ratelimit` CLI read their rules through this crate;
//! the container (`ratelimit-container`) only wires a [`RuleSet`](ratelimit_domain::RuleSet) it is given. A bad file is
//! refused with a [`ConfigError`] whose fields name the file, the rule, the field and the
//! reason, so that a service stops at start-up saying what to fix, and a tool can report the
//! rule and field without reading them back out of a message.
//!
//! # The rules file
//!
//! One `[rules."METHOD /path"]` table per rule:
//!
//! ```toml
//! [rules."POST /api/v1/sessions"]  # METHOD /path: upper-case method, one space, a path
//! max_tokens = 5
//! refill_rate = 5.0        # tokens per minute
//! scope = "ip"             # ip | user | user_provider | global
//! cost = 1                 # optional, default 1
//! enabled = true           # optional, default true
//! ```
//!
//! Unknown fields are errors. Endpoints are checked here (not in the domain's `RuleSet`, which
//! accepts any name): an endpoint the HTTP layer can never produce (`"get /x "`) would be a
//! rule that limits nothing.
//!
//! # Example
//!
//! ```
//! use ratelimit_config::{ConfigError, RuleField, parse_rules};
//!
//! let rules = parse_rules(r#"
//!     [rules."POST /api/v1/sessions"]
//!     max_tokens = 5
//!     refill_rate = 5.0
//!     scope = "ip"
//! "#)?;
//! assert_eq!(rules.get("POST /api/v1/sessions").map(|rule| rule.max_tokens()), Some(5));
//!
//! let err = parse_rules("[rules.\"GET /x\"]\nmax_tokens = 0\nrefill_rate = 1.0\nscope = \"ip\"\n")
//!     .unwrap_err();
//! assert!(matches!(
//!     &err,
//!     ConfigError::Rule { rule, field: RuleField::MaxTokens, .. } if rule == "GET /x"
//! ));
//! assert_eq!(err.to_string(), "rule \"GET /x\", field max_tokens: must be at least 1, got 0");
//! # Ok::<(), ConfigError>(())
//! ```
//!
//! A service reads its file with [`load_rules_file`], whose errors also name the file:
//!
//! ```no_run
//! let rules = ratelimit_config::load_rules_file("rules.toml")?;
//! # Ok::<(), ratelimit_config::ConfigError>(())
//! ```

mod error;
mod rules;

pub use error::{ConfigError, RuleField};
pub use rules::{load_rules_file, parse_rules};
