//! Rules, rules text and rules files the tests share.
//!
//! The endpoints and the login rule follow the specification: `POST /api/v1/sessions` allows
//! 5 attempts per IP, refilled at 5 per minute. Tests whose assertions depend on other
//! numbers keep their own rules next to those assertions.

use std::path::{Path, PathBuf};
use std::process::Command;

use ratelimit_domain::{RateLimitRule, RateLimitScope, RuleSet};

/// The login endpoint of the specification, as rules name it.
pub const LOGIN: &str = "POST /api/v1/sessions";

/// The path of [`LOGIN`], as a client requests it.
pub const LOGIN_PATH: &str = "/api/v1/sessions";

/// The export endpoint: a per-user rule with a cost above one.
pub const EXPORT: &str = "POST /api/v1/exports";

/// The example server's rules file, `crates/http/examples/rules.toml` (its login rule is
/// [`login_rule`]).
pub const EXAMPLE_RULES_FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../crates/http/examples/rules.toml"
);

/// The environment variables the `ratelimit` CLI reads its settings from.
pub const CLI_ENV_VARS: [&str; 5] = [
    "REDIS_URL",
    "RATELIMIT_RULES",
    "RATELIMIT_KEY_PREFIX",
    "RATELIMIT_LAYOUT",
    "RATELIMIT_CLUSTER",
];

/// A command running the `ratelimit` CLI at `bin` with none of [`CLI_ENV_VARS`] inherited,
/// so that only its arguments configure it.
pub fn cli_command(bin: impl AsRef<Path>) -> Command {
    let mut command = Command::new(bin.as_ref());
    for var in CLI_ENV_VARS {
        command.env_remove(var);
    }
    command
}

/// A per-IP rule with the given capacity and refill rate (tokens per minute).
///
/// # Panics
/// For an invalid rule (a bug in the test).
pub fn rule(max_tokens: u64, refill_rate: f64) -> RateLimitRule {
    RateLimitRule::new(RateLimitScope::Ip, max_tokens, refill_rate)
        .unwrap_or_else(|err| panic!("bad test rule: {err}"))
}

/// The specification's login rule: 5 tokens, 5 per minute (one every 12 s), per IP.
pub fn login_rule() -> RateLimitRule {
    rule(5, 5.0)
}

/// The login rule alone, on [`LOGIN`].
///
/// # Panics
/// Never for these rules (a bug in the test otherwise).
pub fn login_rules() -> RuleSet {
    RuleSet::try_from_rules([(LOGIN, login_rule())])
        .unwrap_or_else(|err| panic!("bad test rules: {err}"))
}

/// The text of a rules file of one rule, 1 token per minute per IP, named `endpoint`
/// (written as given, so that it may be a name the parser refuses).
pub fn one_rule_text(endpoint: &str) -> String {
    format!("[rules.{endpoint:?}]\nmax_tokens = 1\nrefill_rate = 1.0\nscope = \"ip\"\n")
}

/// A rules file in the temporary directory, removed on drop.
#[derive(Debug)]
pub struct RulesFile(PathBuf);

impl RulesFile {
    /// Writes `text` to a new file of a unique name.
    ///
    /// # Panics
    /// When the file cannot be written.
    pub fn new(text: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "ratelimit-test-rules-{}.toml",
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::write(&path, text)
            .unwrap_or_else(|err| panic!("cannot write {}: {err}", path.display()));
        Self(path)
    }

    /// A path of a unique name in the temporary directory where no file is, removed on drop
    /// should something write it.
    pub fn missing() -> Self {
        Self(std::env::temp_dir().join(format!(
            "ratelimit-test-missing-{}.toml",
            uuid::Uuid::now_v7().simple()
        )))
    }

    /// The file's path.
    ///
    /// # Panics
    /// When the temporary directory's path is not UTF-8.
    pub fn path(&self) -> &str {
        self.0
            .to_str()
            .unwrap_or_else(|| panic!("not UTF-8: {}", self.0.display()))
    }
}

impl Drop for RulesFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
