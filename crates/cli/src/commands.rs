//! The commands: from parsed arguments to a [`Report`] or a [`CliError`].

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ratelimit_adapter::TokenBucketAdapter;
use ratelimit_config::load_rules_file;
use ratelimit_container::RedisConfig;
use ratelimit_domain::{
    BucketKey, BucketStore, CheckOptions, DecisionSource, ErrorCode, IpGrouping, RateLimitError,
    RateLimitRule, RateLimitScope, RateLimiter, RuleSet,
};
use ratelimit_redis::RedisStorage;

use crate::cli::{BucketArgs, Cli, Command, ConnectionArgs, DEFAULT_KEY_PREFIX, RulesCommand};
use crate::error::CliError;
use crate::output::{
    CheckReport, RemainingReport, Report, ResetReport, RulesProblem, RulesReport, Target,
};
use ratelimit_adapter::ErrorCaptureStore;

/// What `--redis-url`/`REDIS_URL` missing means, said once.
pub(crate) const NEED_REDIS: &str = "admin commands need Redis: pass --redis-url URL or set \
    REDIS_URL to the service's Redis (the CLI never uses a private in-memory store, whose \
    buckets would not be the service's)";

/// What `--rules`/`RATELIMIT_RULES` missing means.
pub(crate) const NEED_RULES: &str =
    "no rules file: pass --rules FILE or set RATELIMIT_RULES to the service's rules file";

/// Runs the command `cli` names.
///
/// # Errors
/// A [`CliError`] whose kind decides the exit code.
pub(crate) async fn run(cli: &Cli) -> Result<Report, CliError> {
    match &cli.command {
        Command::Check(args) => {
            let bucket = Bucket::open(&args.bucket).await?;
            bucket.check(args.cost).await.map(Report::Check)
        }
        Command::Remaining(args) => {
            let bucket = Bucket::open(args).await?;
            bucket.remaining().await.map(Report::Remaining)
        }
        Command::Reset(args) => {
            let bucket = Bucket::open(args).await?;
            bucket.reset().await.map(Report::Reset)
        }
        Command::Rules(RulesCommand::Check { file }) => Ok(Report::Rules(check_rules(file))),
    }
}

/// `rules check FILE`.
pub(crate) fn check_rules(file: &Path) -> RulesReport {
    let outcome = match load_rules_file(file) {
        Ok(rules) => {
            let mut rules: Vec<(String, RateLimitRule)> = rules
                .iter()
                .map(|(endpoint, rule)| (endpoint.to_owned(), rule.first().rule().clone()))
                .collect();
            rules.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(rules)
        }
        Err(err) => Err(RulesProblem {
            message: err.to_string(),
            rule: err.rule().map(str::to_owned),
            field: err.field(),
        }),
    };
    RulesReport {
        file: file.to_owned(),
        outcome,
    }
}

/// The endpoint's rule from the rules file.
///
/// # Errors
/// Exit 2 when no file is named, when it is invalid, or when it has no rule for `endpoint`.
fn load_rule(
    connection: &ConnectionArgs,
    endpoint: &str,
) -> Result<(RuleSet, RateLimitRule), CliError> {
    let path = connection
        .rules
        .as_deref()
        .filter(|path| !path.as_os_str().is_empty())
        .ok_or_else(|| CliError::usage(NEED_RULES))?;
    let rules = load_rules_file(path).map_err(|err| CliError::from_config(&err))?;
    let Some(rule) = rules
        .get(endpoint)
        .map(|limits| limits.first().rule().clone())
    else {
        let mut known: Vec<&str> = rules.iter().map(|(endpoint, _)| endpoint).collect();
        known.sort_unstable();
        let known = if known.is_empty() {
            "it has no rules".to_owned()
        } else {
            format!("known endpoints: {}", known.join(", "))
        };
        return Err(CliError::configuration(format!(
            "no rule for endpoint {endpoint:?} in {} ({known})",
            path.display()
        )));
    };
    Ok((rules, rule))
}

/// One bucket of the service's, reachable in Redis.
#[derive(Debug)]
pub(crate) struct Bucket<S> {
    store: Arc<ErrorCaptureStore<S>>,
    limiter: TokenBucketAdapter,
    rule: RateLimitRule,
    key: BucketKey,
    target: Target,
}

impl Bucket<RedisStorage> {
    /// Reads the rules, checks the arguments against them, then connects to Redis.
    ///
    /// Everything that can be checked without Redis is checked first, so that a typo is
    /// reported as a typo (exit 2) even when Redis is down.
    ///
    /// # Errors
    /// Exit 2 for bad arguments, rules or URL; exit 3 when Redis does not answer a `PING`.
    async fn open(args: &BucketArgs) -> Result<Self, CliError> {
        let connection = &args.connection;
        let (rules, rule) = load_rule(connection, &args.endpoint)?;
        let url = connection
            .redis_url
            .as_deref()
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .ok_or_else(|| CliError::usage(NEED_REDIS))?;
        let timeout = Duration::from_millis(connection.timeout_ms);
        let config = if connection.cluster {
            RedisConfig::cluster(
                url.split(',')
                    .map(str::trim)
                    .filter(|node| !node.is_empty()),
            )
        } else {
            RedisConfig::new(url)
        };
        let config = config
            .with_layout(connection.layout)
            .with_pool_size(1)
            .with_check_timeout(timeout)
            .with_admin_timeout(timeout);
        let store = RedisStorage::new(&config).map_err(|err| CliError::from_library("", &err))?;
        let key_prefix = match connection.key_prefix.trim() {
            "" => DEFAULT_KEY_PREFIX,
            prefix => prefix,
        };
        let bucket = Self::with_store(store, rules, rule, args, key_prefix)?;
        bucket.store.inner().check_version().await.map_err(|err| {
            let context = if err.code() == ErrorCode::Configuration {
                format!("unsupported Redis at {}", config.redacted_url())
            } else {
                format!("cannot reach Redis at {}", config.redacted_url())
            };
            CliError::from_library(&context, &err)
        })?;
        Ok(bucket)
    }
}

impl<S: BucketStore> Bucket<S> {
    /// The bucket `args` names, over `store`.
    ///
    /// # Errors
    /// Exit 2 for a missing or unusable identifier or an empty key prefix.
    pub(crate) fn with_store(
        store: S,
        rules: RuleSet,
        rule: RateLimitRule,
        args: &BucketArgs,
        key_prefix: &str,
    ) -> Result<Self, CliError> {
        let endpoint = args.endpoint.as_str();
        let scope = rule.scope();
        let identifier = if scope.uses_identifier() {
            let Some(identifier) = args.identifier.as_deref() else {
                return Err(CliError::usage(format!(
                    "the rule for {endpoint:?} has scope {scope}: pass --identifier (the {})",
                    identifier_meaning(scope.as_str())
                )));
            };
            Some(service_identifier(scope, identifier, args)?)
        } else {
            None
        };
        let store = Arc::new(ErrorCaptureStore::new(store));
        let limiter = TokenBucketAdapter::builder(store.clone(), rules)
            .key_prefix(key_prefix)
            .build()
            .map_err(|err| CliError::from_library("--key-prefix", &err))?;
        let key = limiter
            .bucket_key(endpoint, identifier.as_deref().unwrap_or(""))
            .ok_or_else(|| CliError::configuration(format!("no rule for endpoint {endpoint:?}")))?
            .map_err(|err| CliError::from_library("--identifier", &err))?;
        Ok(Self {
            store,
            limiter,
            rule,
            target: Target {
                endpoint: endpoint.to_owned(),
                identifier,
                key: key.as_str().to_owned(),
            },
            key,
        })
    }

    fn identifier(&self) -> &str {
        self.target.identifier.as_deref().unwrap_or("")
    }

    /// `check`: a real check through the adapter, consuming tokens. A fail-open answer is
    /// reported as the Redis error it hides.
    ///
    /// # Errors
    /// Exit 3 when the store failed.
    pub(crate) async fn check(&self, cost: Option<u64>) -> Result<CheckReport, CliError> {
        let options = cost.map(CheckOptions::with_cost).unwrap_or_default();
        let result = self
            .limiter
            .is_allowed_opts(&self.target.endpoint, self.identifier(), options)
            .await
            .map_err(|err| CliError::from_library("check", &err))?;
        // Only the store's own answer (or a rule that limits nothing) is a real decision: a
        // failure policy's stand-in (fail-open, and any other) hides a Redis error.
        if !matches!(
            result.source,
            DecisionSource::Store | DecisionSource::RuleDisabled | DecisionSource::NoRule
        ) {
            let cause = self
                .store
                .last_error()
                .unwrap_or_else(|| "unknown store error".to_owned());
            return Err(CliError::redis(format!(
                "the check could not be completed ({cause}); the service would have answered \
                 with its failure policy ({}), and whether tokens were taken is unknown",
                result.source.as_str()
            )));
        }
        Ok(CheckReport {
            target: self.target.clone(),
            cost: cost.unwrap_or(self.rule.cost()),
            result,
        })
    }

    /// `remaining`: read straight from the store, so that errors surface instead of being
    /// answered with a full bucket.
    ///
    /// # Errors
    /// Exit 3 when the store failed.
    pub(crate) async fn remaining(&self) -> Result<RemainingReport, CliError> {
        let remaining = self
            .store
            .get_remaining(&self.key, &self.rule, None)
            .await
            .map_err(|err| redis_error("remaining", &err))?;
        Ok(RemainingReport {
            target: self.target.clone(),
            remaining,
            limit: self.rule.max_tokens(),
            enabled: self.rule.enabled(),
        })
    }

    /// `reset`: refill the bucket.
    ///
    /// # Errors
    /// Exit 3 when the store failed.
    pub(crate) async fn reset(&self) -> Result<ResetReport, CliError> {
        let existed = self
            .limiter
            .reset(&self.target.endpoint, self.identifier())
            .await
            .map_err(|err| redis_error("reset", &err))?;
        Ok(ResetReport {
            target: self.target.clone(),
            limit: self.rule.max_tokens(),
            existed,
        })
    }
}

/// A store error: always exit 3, whatever the code says.
fn redis_error(operation: &str, err: &RateLimitError) -> CliError {
    CliError {
        code: Some(err.code()),
        ..CliError::redis(format!("{operation} failed: {err}"))
    }
}

/// The identifier the service uses for `identifier` under `scope`.
///
/// For `ip` rules the text is read as an address and grouped as the HTTP layer groups
/// clients ([`IpGrouping`], with the `--ipv4-prefix`/`--ipv6-prefix` given), so that `::1`,
/// `[::1]` and `0::1` all name the service's `::/64` bucket. Anything else is a usage error
/// unless `--raw-identifier` says the service writes its own identifiers.
///
/// # Errors
/// Exit 2 for an `ip` rule and a text that is not an address.
fn service_identifier(
    scope: RateLimitScope,
    identifier: &str,
    args: &BucketArgs,
) -> Result<String, CliError> {
    if scope != RateLimitScope::Ip || args.raw_identifier {
        return Ok(identifier.to_owned());
    }
    IpGrouping::new()
        .ipv4_prefix(args.ipv4_prefix)
        .ipv6_prefix(args.ipv6_prefix)
        .normalize(identifier)
        .map_err(|err| {
            CliError::usage(format!(
                "--identifier: the rule for {:?} has scope ip, and {err}; pass the client's \
                 address (1.2.3.4, ::1, [2001:db8::1]), or --raw-identifier if the service's \
                 own identifier extractor writes something else for ip rules",
                args.endpoint
            ))
        })
}

fn identifier_meaning(scope: &str) -> &'static str {
    match scope {
        "ip" => "client's IP address",
        "user" => "user id",
        "user_provider" => "user id with its provider, as the service builds it",
        _ => "identifier",
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use ratelimit_domain::{
        BucketDecision, ErrorCode, MockBucketStore, RateLimitScope, RateLimiterExt,
    };

    use super::*;
    use crate::error::{ErrorKind, Exit};

    fn rule(scope: RateLimitScope) -> RateLimitRule {
        RateLimitRule::new(scope, 5, 5.0).unwrap()
    }

    fn args(endpoint: &str, identifier: Option<&str>) -> BucketArgs {
        BucketArgs {
            endpoint: endpoint.to_owned(),
            identifier: identifier.map(str::to_owned),
            ipv6_prefix: 64,
            ipv4_prefix: 32,
            raw_identifier: false,
            connection: ConnectionArgs {
                rules: Some(PathBuf::from("rules.toml")),
                redis_url: None,
                key_prefix: "rate_limit".to_owned(),
                layout: ratelimit_redis::KeyLayout::TwoKeys,
                cluster: false,
                timeout_ms: 100,
            },
        }
    }

    fn bucket(
        store: MockBucketStore,
        scope: RateLimitScope,
        id: Option<&str>,
    ) -> Bucket<MockBucketStore> {
        let rules = RuleSet::try_from_rules([("GET /x", rule(scope))]).unwrap();
        Bucket::with_store(store, rules, rule(scope), &args("GET /x", id), "rate_limit").unwrap()
    }

    fn unavailable() -> RateLimitError {
        RateLimitError::new(ErrorCode::StorageUnavailable, "connection refused")
    }

    #[tokio::test]
    async fn a_fail_open_check_is_a_redis_error_with_the_real_cause() {
        let mut store = MockBucketStore::new();
        store
            .expect_check_and_consume()
            .returning(|_| Err(unavailable()));
        let err = bucket(store, RateLimitScope::Ip, Some("1.2.3.4"))
            .check(None)
            .await
            .unwrap_err();
        assert_eq!(err.exit(), Exit::Redis);
        assert!(
            err.message.contains("connection refused"),
            "{}",
            err.message
        );
        assert!(err.message.contains("fail_open"), "{}", err.message);
    }

    #[tokio::test]
    async fn remaining_and_reset_report_store_errors() {
        let mut store = MockBucketStore::new();
        store
            .expect_get_remaining()
            .returning(|_, _, _| Err(unavailable()));
        store
            .expect_reset()
            .returning(|_, _| Err(unavailable().recoded(ErrorCode::ResetFailed)));
        let bucket = bucket(store, RateLimitScope::Ip, Some("1.2.3.4"));
        assert_eq!(bucket.remaining().await.unwrap_err().exit(), Exit::Redis);
        let reset = bucket.reset().await.unwrap_err();
        assert_eq!(reset.exit(), Exit::Redis);
        assert_eq!(reset.code, Some(ErrorCode::ResetFailed));
    }

    #[tokio::test]
    async fn checks_use_the_service_key_and_the_given_cost() {
        let mut store = MockBucketStore::new();
        store
            .expect_check_and_consume()
            .withf(|request| {
                request.key.as_str() == "rate_limit:global:GET /x" && request.cost == 3
            })
            .times(1)
            .returning(|_| {
                Ok(BucketDecision {
                    allowed: true,
                    retry_after: Duration::ZERO,
                    remaining: 2,
                })
            });
        let bucket = bucket(store, RateLimitScope::Global, Some("ignored"));
        assert_eq!(bucket.target.identifier, None);
        let report = bucket.check(Some(3)).await.unwrap();
        assert_eq!((report.cost, report.result.remaining), (3, 2));
        // The adapter is a plain limiter too.
        assert!(
            bucket
                .limiter
                .is_allowed("GET /other", "a")
                .await
                .unwrap()
                .allowed
        );
    }

    #[test]
    fn missing_or_empty_identifiers_are_usage_errors() {
        let rules = RuleSet::try_from_rules([("GET /x", rule(RateLimitScope::User))]).unwrap();
        let missing = Bucket::with_store(
            MockBucketStore::new(),
            rules.clone(),
            rule(RateLimitScope::User),
            &args("GET /x", None),
            "rate_limit",
        )
        .unwrap_err();
        assert_eq!(missing.kind, ErrorKind::Usage);
        assert!(
            missing.message.contains("--identifier"),
            "{}",
            missing.message
        );
        let empty = Bucket::with_store(
            MockBucketStore::new(),
            rules.clone(),
            rule(RateLimitScope::User),
            &args("GET /x", Some("")),
            "rate_limit",
        )
        .unwrap_err();
        assert_eq!(empty.exit(), Exit::Usage);
        let prefix = Bucket::with_store(
            MockBucketStore::new(),
            rules,
            rule(RateLimitScope::User),
            &args("GET /x", Some("a")),
            "",
        )
        .unwrap_err();
        assert_eq!(prefix.exit(), Exit::Usage);
    }

    /// `reset -i ::1` used to reset `rate_limit:ip:::1:GET /x`, a key the service never
    /// writes: the layer groups IPv6 clients by /64.
    #[test]
    fn ip_identifiers_are_grouped_as_the_service_groups_them() {
        let key_of = |args: &BucketArgs, scope: RateLimitScope| {
            let rules = RuleSet::try_from_rules([("GET /x", rule(scope))]).unwrap();
            Bucket::with_store(
                MockBucketStore::new(),
                rules,
                rule(scope),
                args,
                "rate_limit",
            )
            .map(|bucket| (bucket.key.as_str().to_owned(), bucket.target.identifier))
        };
        for (typed, identifier) in [
            ("::1", "::/64"),
            ("[::1]", "::/64"),
            ("0:0::1", "::/64"),
            ("::/64", "::/64"),
            ("2001:DB8::1:2", "2001:db8::/64"),
            ("::ffff:192.0.2.7", "192.0.2.7"),
            ("fe80::1%eth0", "fe80::/64"),
            (" 192.0.2.7", "192.0.2.7"),
        ] {
            let (key, shown) = key_of(&args("GET /x", Some(typed)), RateLimitScope::Ip).unwrap();
            assert_eq!(key, format!("rate_limit:ip:{identifier}:GET /x"), "{typed}");
            assert_eq!(shown.as_deref(), Some(identifier));
        }
        // The service's grouping, when it is not the default.
        let mut fine = args("GET /x", Some("2001:db8::1:2"));
        fine.ipv6_prefix = 128;
        fine.ipv4_prefix = 24;
        assert_eq!(
            key_of(&fine, RateLimitScope::Ip).unwrap().0,
            "rate_limit:ip:2001:db8::1:2:GET /x"
        );
        fine.identifier = Some("192.0.2.7".to_owned());
        assert_eq!(
            key_of(&fine, RateLimitScope::Ip).unwrap().0,
            "rate_limit:ip:192.0.2.0/24:GET /x"
        );
        // Not an address: a usage error that says what to pass.
        for bad in ["alice", "1.2.3.4:80", "2001:db8::/48", "[::1"] {
            let err = key_of(&args("GET /x", Some(bad)), RateLimitScope::Ip).unwrap_err();
            assert_eq!(err.exit(), Exit::Usage, "{bad}");
            assert!(err.message.contains("--raw-identifier"), "{}", err.message);
        }
        // Unless the operator says the service writes its own identifiers.
        let mut raw = args("GET /x", Some("alice"));
        raw.raw_identifier = true;
        assert_eq!(
            key_of(&raw, RateLimitScope::Ip).unwrap().0,
            "rate_limit:ip:alice:GET /x"
        );
        // Other scopes take the identifier as it is.
        assert_eq!(
            key_of(&args("GET /x", Some("::1")), RateLimitScope::User)
                .unwrap()
                .0,
            "rate_limit:user:::1:GET /x"
        );
    }

    #[tokio::test]
    async fn reset_says_whether_there_was_a_bucket() {
        for existed in [true, false] {
            let mut store = MockBucketStore::new();
            store
                .expect_reset()
                .withf(|key, _| key.as_str() == "rate_limit:ip:::/64:GET /x")
                .times(1)
                .returning(move |_, _| Ok(existed));
            let report = bucket(store, RateLimitScope::Ip, Some("[::1]"))
                .reset()
                .await
                .unwrap();
            assert_eq!(report.existed, existed);
            assert_eq!(report.target.key, "rate_limit:ip:::/64:GET /x");
        }
    }

    #[test]
    fn missing_rules_file_is_a_usage_error() {
        let mut connection = args("GET /x", None).connection;
        connection.rules = None;
        let err = load_rule(&connection, "GET /x").unwrap_err();
        assert_eq!(
            (err.kind, err.message.as_str()),
            (ErrorKind::Usage, NEED_RULES)
        );
    }
}
