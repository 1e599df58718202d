//! Configuration for ratelimit: the rules file, read and validated before anything is wired.
//!
//! Services, the example server and the `ratelimit` CLI read their rules through this crate;
//! the container (`ratelimit-container`) only wires a [`RuleSet`](ratelimit_domain::RuleSet) it is given. A bad file is
//! refused with a [`ConfigError`] whose fields name the file, the rule, the limit, the field
//! and the reason, so that a service stops at start-up saying what to fix, and a tool can
//! report them without reading them back out of a message.
//!
//! # The rules file
//!
//! One `[rules."METHOD /path"]` table per rule. A rule with one limit:
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
//! Its one limit is named after the endpoint, and its buckets keep the keys they always had.
//!
//! A rule with several limits, checked all or nothing (a request is allowed only when every
//! limit has its tokens, and then each takes its cost):
//!
//! ```toml
//! [rules."GET /api/v1/search"]
//! limits = [
//!   { name = "per-client", scope = "ip", max_tokens = 10, refill_rate = 10.0 },
//!   { name = "everyone", scope = "global", max_tokens = 15, refill_rate = 15.0, cost = 1 },
//! ]
//! enabled = true   # optional, for the endpoint as a whole
//! ```
//!
//! Each member of `limits` has a `name`, `scope`, `max_tokens`, `refill_rate` and optionally
//! `cost`, validated as in the single form. There are 1 to 16 members
//! ([`MAX_LIMITS_PER_ENDPOINT`](ratelimit_domain::MAX_LIMITS_PER_ENDPOINT)); names are unique
//! in the rule, 1 to 64 ASCII letters, digits, `-`, `_` and `.`, starting with a letter or a
//! digit (they appear in keys, HTTP headers and metric labels). A rule has either `limits` or
//! the single form's `max_tokens`, `refill_rate`, `scope` and `cost`, never both.
//!
//! Unknown fields are errors, and so are missing ones. Endpoints are checked here (not in the
//! domain's `RuleSet`, which accepts any name): an endpoint the HTTP layer can never produce
//! (`"get /x "`) would be a rule that limits nothing.
//!
//! # Errors
//!
//! A [`ConfigError::Rule`] names the rule, the [`RuleField`] and, for a field of a member of
//! `limits`, the limit ([`LimitRef`]: its index and name):
//!
//! ```text
//! rule "GET /x", field max_tokens: must be at least 1, got 0
//! rule "GET /api/v1/search", limit "everyone" (limits[1]), field max_tokens: must be at least 1, got 0
//! rule "GET /api/v1/search", limit "per-client" (limits[1]), field name: "per-client" is already the name of limits[0]; names are unique in a rule
//! rule "GET /api/v1/search", field max_tokens: a rule with `limits` has no max_tokens of its own: …
//! ```
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
//!
//!     [rules."GET /api/v1/search"]
//!     limits = [
//!       { name = "per-client", scope = "ip", max_tokens = 10, refill_rate = 10.0 },
//!       { name = "everyone", scope = "global", max_tokens = 15, refill_rate = 15.0 },
//!     ]
//! "#)?;
//! let login = rules.get("POST /api/v1/sessions").expect("a rule");
//! assert!(login.is_single());
//! assert_eq!(login.first().rule().max_tokens(), 5);
//! let search = rules.get("GET /api/v1/search").expect("a rule");
//! let names: Vec<&str> = search.limits().iter().map(|limit| limit.name()).collect();
//! assert_eq!(names, ["per-client", "everyone"]);
//!
//! let err = parse_rules("[rules.\"GET /x\"]\nmax_tokens = 0\nrefill_rate = 1.0\nscope = \"ip\"\n")
//!     .unwrap_err();
//! assert!(matches!(
//!     &err,
//!     ConfigError::Rule { rule, field: RuleField::MaxTokens, .. } if rule == "GET /x"
//! ));
//! assert_eq!(err.to_string(), "rule \"GET /x\", field max_tokens: must be at least 1, got 0");
//!
//! let err = parse_rules(r#"
//!     [rules."GET /x"]
//!     limits = [
//!       { name = "a", scope = "ip", max_tokens = 5, refill_rate = 1.0 },
//!       { name = "b", scope = "global", max_tokens = 0, refill_rate = 1.0 },
//!     ]
//! "#).unwrap_err();
//! assert_eq!(err.limit().map(|limit| limit.index), Some(1));
//! assert_eq!(err.field_path().as_deref(), Some("limits[1].max_tokens"));
//! assert_eq!(
//!     err.to_string(),
//!     "rule \"GET /x\", limit \"b\" (limits[1]), field max_tokens: must be at least 1, got 0"
//! );
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

pub use error::{ConfigError, LimitRef, RuleField};
pub use rules::{load_rules_file, parse_rules};
