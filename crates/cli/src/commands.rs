//! The commands: from parsed arguments to a [`Report`] or a [`CliError`].

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ratelimit_adapter::TokenBucketAdapter;
use ratelimit_config::load_rules_file;
use ratelimit_container::RedisConfig;
use ratelimit_domain::{
    BucketKey, BucketStore, CheckOptions, DecisionSource, EndpointLimits, ErrorCode, IpGrouping,
    KeyBuilder, Limit, LimitOutcome, RateLimitError, RateLimitResult, RateLimitScope, RateLimiter,
    RuleSet,
};
use ratelimit_redis::RedisStorage;

use crate::cli::{BucketArgs, Cli, Command, ConnectionArgs, DEFAULT_KEY_PREFIX, RulesCommand};
use crate::error::CliError;
use crate::output::{
    CheckReport, LimitState, RemainingReport, Report, ResetReport, RulesProblem, RulesReport,
    Target,
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
            let bucket = Bucket::open(&args.bucket, Selection::All).await?;
            bucket.check(args.cost).await.map(Report::Check)
        }
        Command::Remaining(args) => {
            let bucket = Bucket::open(args, Selection::All).await?;
            bucket.remaining().await.map(Report::Remaining)
        }
        Command::Reset(args) => {
            let selection = if args.limit.is_empty() {
                Selection::Identifier
            } else {
                Selection::Named(&args.limit)
            };
            let bucket = Bucket::open(&args.bucket, selection).await?;
            bucket.reset().await.map(Report::Reset)
        }
        Command::Rules(RulesCommand::Check { file }) => Ok(Report::Rules(check_rules(file))),
    }
}

/// `rules check FILE`.
pub(crate) fn check_rules(file: &Path) -> RulesReport {
    let outcome = match load_rules_file(file) {
        Ok(rules) => {
            let mut rules: Vec<(String, EndpointLimits)> = rules
                .iter()
                .map(|(endpoint, limits)| (endpoint.to_owned(), limits.clone()))
                .collect();
            rules.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(rules)
        }
        Err(err) => Err(RulesProblem {
            message: err.to_string(),
            rule: err.rule().map(str::to_owned),
            limit: err.limit().map(|limit| (limit.index, limit.name.clone())),
            field: err.field(),
        }),
    };
    RulesReport {
        file: file.to_owned(),
        outcome,
    }
}

/// The rules file, which has a rule for `endpoint`.
///
/// # Errors
/// Exit 2 when no file is named, when it is invalid, or when it has no rule for `endpoint`.
fn load_rules(connection: &ConnectionArgs, endpoint: &str) -> Result<RuleSet, CliError> {
    let path = connection
        .rules
        .as_deref()
        .filter(|path| !path.as_os_str().is_empty())
        .ok_or_else(|| CliError::usage(NEED_RULES))?;
    let rules = load_rules_file(path).map_err(|err| CliError::from_config(&err))?;
    if rules.get(endpoint).is_none() {
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
    }
    Ok(rules)
}

/// Which limits of the endpoint a command works on.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Selection<'a> {
    /// Every limit (`check`, `remaining`).
    All,
    /// The identifier's own buckets, as the limiter's `reset` resets them: the one limit of
    /// the single-limit form whatever its scope, otherwise every limit that is not global
    /// (`reset` without `--limit`).
    Identifier,
    /// The limits named with `--limit`, whatever their scope.
    Named(&'a [String]),
}

/// The buckets of one endpoint of the service's, reachable in Redis: one per limit.
#[derive(Debug)]
pub(crate) struct Bucket<S> {
    store: Arc<ErrorCaptureStore<S>>,
    limiter: TokenBucketAdapter,
    /// The endpoint's limits, from the rules file.
    limits: EndpointLimits,
    /// The key of every limit, in the endpoint's order; `None` for a limit that needs an
    /// identifier when the command needed none (`reset --limit GLOBAL_LIMIT` without `-i`).
    keys: Vec<Option<BucketKey>>,
    /// Indexes into `limits` of the limits the command works on, in the endpoint's order.
    selected: Vec<usize>,
    /// Whether the limits were named with `--limit` (reset one by one), rather than chosen
    /// by the limiter's `reset`.
    named: bool,
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
    async fn open(args: &BucketArgs, selection: Selection<'_>) -> Result<Self, CliError> {
        let connection = &args.connection;
        let rules = load_rules(connection, &args.endpoint)?;
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
        let bucket = Self::with_store(store, rules, args, key_prefix, selection)?;
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
    /// The buckets of the endpoint `args` names, over `store`, for the limits `selection`
    /// picks.
    ///
    /// # Errors
    /// Exit 2 for an endpoint without a rule, a `--limit` the endpoint does not have, a reset
    /// of an endpoint whose limits are all global without `--limit`, a missing or unusable
    /// identifier, or an empty key prefix.
    pub(crate) fn with_store(
        store: S,
        rules: RuleSet,
        args: &BucketArgs,
        key_prefix: &str,
        selection: Selection<'_>,
    ) -> Result<Self, CliError> {
        let endpoint = args.endpoint.as_str();
        let limits = rules
            .get(endpoint)
            .cloned()
            .ok_or_else(|| CliError::configuration(format!("no rule for endpoint {endpoint:?}")))?;
        let selected = select(endpoint, &limits, selection)?;
        // The identifier is needed when a limit worked on keeps a bucket per client.
        let identifying = selected
            .iter()
            .map(|&i| &limits.limits()[i])
            .find(|limit| limit.rule().scope().uses_identifier());
        let identifier = match identifying {
            None => None,
            Some(limit) => {
                let scope = limit.rule().scope();
                let Some(identifier) = args.identifier.as_deref() else {
                    let whose = if limits.is_single() {
                        format!("the rule for {endpoint:?}")
                    } else {
                        format!("the limit {:?} of {endpoint:?}", limit.name())
                    };
                    return Err(CliError::usage(format!(
                        "{whose} has scope {scope}: pass --identifier (the {})",
                        identifier_meaning(scope.as_str())
                    )));
                };
                Some(service_identifier(scope, identifier, args)?)
            }
        };
        let store = Arc::new(ErrorCaptureStore::new(store));
        let limiter = TokenBucketAdapter::builder(store.clone(), rules)
            .key_prefix(key_prefix)
            .build()
            .map_err(|err| CliError::from_library("--key-prefix", &err))?;
        let keys = match &identifier {
            Some(identifier) => keys_of(&limiter, endpoint, identifier)?,
            None if limits
                .limits()
                .iter()
                .all(|limit| !limit.rule().scope().uses_identifier()) =>
            {
                keys_of(&limiter, endpoint, "")?
            }
            // Only global limits are worked on: their keys need no identifier.
            None => limits
                .limits()
                .iter()
                .map(|limit| global_key(key_prefix, endpoint, limit))
                .collect::<Result<_, _>>()?,
        };
        Ok(Self {
            store,
            limiter,
            target: Target {
                endpoint: endpoint.to_owned(),
                identifier,
                single: limits.is_single(),
            },
            limits,
            keys,
            selected,
            named: matches!(selection, Selection::Named(_)),
        })
    }

    fn identifier(&self) -> &str {
        self.target.identifier.as_deref().unwrap_or("")
    }

    /// The endpoint's limit called `name`, with its index.
    fn limit_named(&self, name: &str) -> Option<(usize, &Limit)> {
        self.limits
            .limits()
            .iter()
            .enumerate()
            .find(|(_, limit)| limit.name() == name)
    }

    /// What the limiter said of each limit, with its key and cost.
    fn states(&self, outcomes: &[LimitOutcome], cost: Option<u64>) -> Vec<LimitState> {
        outcomes
            .iter()
            .map(|outcome| {
                let found = self.limit_named(&outcome.name);
                LimitState {
                    name: outcome.name.to_string(),
                    scope: outcome.scope,
                    key: found
                        .and_then(|(i, _)| self.keys[i].as_ref())
                        .map(|key| key.as_str().to_owned()),
                    capacity: outcome.limit,
                    cost: cost
                        .or_else(|| found.map(|(_, limit)| limit.rule().cost()))
                        .unwrap_or(1),
                    remaining: outcome.remaining,
                    allowed: outcome.allowed,
                    retry_after: outcome.retry_after,
                }
            })
            .collect()
    }

    /// A full bucket of the limit at `index` (after a reset).
    fn full(&self, index: usize) -> LimitState {
        let limit = &self.limits.limits()[index];
        let rule = limit.rule();
        LimitState {
            name: limit.name().to_owned(),
            scope: rule.scope(),
            key: self.keys[index].as_ref().map(|key| key.as_str().to_owned()),
            capacity: rule.max_tokens(),
            cost: rule.cost(),
            remaining: rule.max_tokens(),
            allowed: true,
            retry_after: Duration::ZERO,
        }
    }

    /// An answer of the limiter that is not the store's (a failure policy's stand-in) as the
    /// Redis error it hides.
    fn degraded(&self, result: &RateLimitResult, what: &str) -> Option<CliError> {
        if matches!(
            result.source,
            DecisionSource::Store | DecisionSource::RuleDisabled | DecisionSource::NoRule
        ) {
            return None;
        }
        let cause = self
            .store
            .last_error()
            .unwrap_or_else(|| "unknown store error".to_owned());
        Some(CliError::redis(format!(
            "{what} could not be completed ({cause}); the service would have answered with its \
             failure policy ({})",
            result.source.as_str()
        )))
    }

    /// `check`: a real check through the adapter, consuming tokens from every limit, or from
    /// none. A fail-open answer is reported as the Redis error it hides.
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
        if let Some(mut err) = self.degraded(&result, "the check") {
            err.message
                .push_str(", and whether tokens were taken is unknown");
            return Err(err);
        }
        let limits = self.states(&result.limits, cost);
        // One cost for the whole request: --cost, or the limits' own when they agree.
        let common = limits
            .first()
            .map(|l| l.cost)
            .filter(|&first| limits.iter().all(|l| l.cost == first));
        Ok(CheckReport {
            target: self.target.clone(),
            cost: cost.or(common),
            result,
            limits,
        })
    }

    /// `remaining`: every limit's bucket, read in one store call, consuming nothing. A
    /// failure-policy answer is reported as the Redis error it hides, never as full buckets.
    ///
    /// # Errors
    /// Exit 3 when the store failed.
    pub(crate) async fn remaining(&self) -> Result<RemainingReport, CliError> {
        let result = self
            .limiter
            .status(&self.target.endpoint, self.identifier())
            .await
            .map_err(|err| redis_error("remaining", &err))?;
        if let Some(err) = self.degraded(&result, "the reading") {
            return Err(err);
        }
        let mut limits = self.states(&result.limits, None);
        for (state, outcome) in limits.iter_mut().zip(&result.limits) {
            state.retry_after = self.wait_at_most(outcome);
        }
        Ok(RemainingReport {
            target: self.target.clone(),
            enabled: result.source != DecisionSource::RuleDisabled,
            result,
            limits,
        })
    }

    /// How long at most until `outcome`'s limit has its cost, in whole seconds: the store
    /// reports whole tokens (floored), so the true wait is at most this.
    fn wait_at_most(&self, outcome: &LimitOutcome) -> Duration {
        let Some((_, limit)) = self.limit_named(&outcome.name) else {
            return Duration::ZERO;
        };
        let rule = limit.rule();
        if outcome.remaining >= rule.cost() {
            return Duration::ZERO;
        }
        if rule.cost() > rule.max_tokens() {
            return RateLimitResult::RETRY_NEVER;
        }
        #[allow(
            clippy::cast_precision_loss,
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss
        )]
        // At most max_tokens tokens short, and rules bound the refill time.
        let seconds =
            ((rule.cost() - outcome.remaining) as f64 * rule.seconds_per_token()).ceil() as u64;
        Duration::from_secs(seconds)
    }

    /// `reset`: refill the identifier's buckets (the limiter's `reset`: every limit but the
    /// global ones, or the one limit of the single-limit form), or the limits named with
    /// `--limit`.
    ///
    /// # Errors
    /// Exit 3 when the store failed.
    pub(crate) async fn reset(&self) -> Result<ResetReport, CliError> {
        let endpoint = &self.target.endpoint;
        let existed = if self.named {
            let mut existed = false;
            for &index in &self.selected {
                let name = self.limits.limits()[index].name();
                existed |= self
                    .limiter
                    .reset_limit(endpoint, self.identifier(), name)
                    .await
                    .map_err(|err| redis_error("reset", &err))?;
            }
            existed
        } else {
            self.limiter
                .reset(endpoint, self.identifier())
                .await
                .map_err(|err| redis_error("reset", &err))?
        };
        let not_reset = if self.named {
            Vec::new()
        } else {
            (0..self.limits.limits().len())
                .filter(|i| !self.selected.contains(i))
                .map(|i| self.full(i))
                .collect()
        };
        Ok(ResetReport {
            target: self.target.clone(),
            reset: self.selected.iter().map(|&i| self.full(i)).collect(),
            not_reset,
            existed,
        })
    }
}

/// The indexes of the limits `selection` picks among `limits`.
///
/// # Errors
/// Exit 2 for a name the endpoint does not have, or for a reset of an endpoint whose limits
/// are all global without `--limit`.
fn select(
    endpoint: &str,
    limits: &EndpointLimits,
    selection: Selection<'_>,
) -> Result<Vec<usize>, CliError> {
    let all = limits.limits();
    let names = || {
        all.iter()
            .map(|limit| format!("{:?}", limit.name()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match selection {
        Selection::All => Ok((0..all.len()).collect()),
        Selection::Identifier if limits.is_single() => Ok(vec![0]),
        Selection::Identifier => {
            let own: Vec<usize> = (0..all.len())
                .filter(|&i| all[i].rule().scope() != RateLimitScope::Global)
                .collect();
            if own.is_empty() {
                return Err(CliError::usage(format!(
                    "every limit of {endpoint:?} is global, shared by every client: a global \
                     limit is reset only when named, with --limit NAME (its limits: {})",
                    names()
                )));
            }
            Ok(own)
        }
        Selection::Named(wanted) => {
            let mut selected = Vec::with_capacity(wanted.len());
            for name in wanted {
                let Some(index) = all.iter().position(|limit| limit.name() == name) else {
                    return Err(CliError::usage(format!(
                        "--limit: the rule for {endpoint:?} has no limit named {name:?} (its \
                         limits: {})",
                        names()
                    )));
                };
                selected.push(index);
            }
            selected.sort_unstable();
            selected.dedup();
            Ok(selected)
        }
    }
}

/// Every limit's key for `identifier`, as the limiter builds them, in the endpoint's order.
fn keys_of(
    limiter: &TokenBucketAdapter,
    endpoint: &str,
    identifier: &str,
) -> Result<Vec<Option<BucketKey>>, CliError> {
    let keys = limiter
        .bucket_keys(endpoint, identifier)
        .ok_or_else(|| CliError::configuration(format!("no rule for endpoint {endpoint:?}")))?
        .map_err(|err| CliError::from_library("--identifier", &err))?;
    Ok(keys.into_iter().map(|(_, key)| Some(key)).collect())
}

/// The key of a global `limit` (which needs no identifier), or `None` for any other.
fn global_key(
    key_prefix: &str,
    endpoint: &str,
    limit: &Limit,
) -> Result<Option<BucketKey>, CliError> {
    if limit.rule().scope().uses_identifier() {
        return Ok(None);
    }
    KeyBuilder::for_limit(key_prefix, endpoint, limit)
        .and_then(|builder| builder.key(""))
        .map(Some)
        .map_err(|err| CliError::from_library("--key-prefix", &err))
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
        BucketDecision, ErrorCode, MockBucketStore, RateLimitRule, RateLimitScope, RateLimiterExt,
    };

    use super::*;
    use crate::error::{ErrorKind, Exit};

    /// A mock store that, as a network store, never answers at once (`check_now` is `None`),
    /// so that checks reach the expectations set on `check_and_consume`.
    fn mock_store() -> MockBucketStore {
        let mut store = MockBucketStore::new();
        store.expect_check_now().returning(|_| None);
        store
    }

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
        Bucket::with_store(
            store,
            rules,
            &args("GET /x", id),
            "rate_limit",
            Selection::All,
        )
        .unwrap()
    }

    fn unavailable() -> RateLimitError {
        RateLimitError::new(ErrorCode::StorageUnavailable, "connection refused")
    }

    #[tokio::test]
    async fn a_fail_open_check_is_a_redis_error_with_the_real_cause() {
        let mut store = mock_store();
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
        let mut store = mock_store();
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
        let mut store = mock_store();
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
        assert_eq!((report.cost, report.result.remaining), (Some(3), 2));
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
            mock_store(),
            rules.clone(),
            &args("GET /x", None),
            "rate_limit",
            Selection::All,
        )
        .unwrap_err();
        assert_eq!(missing.kind, ErrorKind::Usage);
        assert!(
            missing.message.contains("--identifier"),
            "{}",
            missing.message
        );
        let empty = Bucket::with_store(
            mock_store(),
            rules.clone(),
            &args("GET /x", Some("")),
            "rate_limit",
            Selection::All,
        )
        .unwrap_err();
        assert_eq!(empty.exit(), Exit::Usage);
        let prefix = Bucket::with_store(
            mock_store(),
            rules,
            &args("GET /x", Some("a")),
            "",
            Selection::All,
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
            Bucket::with_store(mock_store(), rules, args, "rate_limit", Selection::All).map(
                |bucket| {
                    let key = bucket.keys[0].as_ref().map(|key| key.as_str().to_owned());
                    (key.unwrap_or_default(), bucket.target.identifier)
                },
            )
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
            let mut store = mock_store();
            store
                .expect_reset()
                .withf(|key, _| key.as_str() == "rate_limit:ip:::/64:GET /x")
                .times(1)
                .returning(move |_, _| Ok(existed));
            let report = Bucket::with_store(
                store,
                RuleSet::try_from_rules([("GET /x", rule(RateLimitScope::Ip))]).unwrap(),
                &args("GET /x", Some("[::1]")),
                "rate_limit",
                Selection::Identifier,
            )
            .unwrap()
            .reset()
            .await
            .unwrap();
            assert_eq!(report.existed, existed);
            assert_eq!(
                report.reset[0].key.as_deref(),
                Some("rate_limit:ip:::/64:GET /x")
            );
            assert!(report.not_reset.is_empty());
        }
    }

    #[test]
    fn missing_rules_file_is_a_usage_error() {
        let mut connection = args("GET /x", None).connection;
        connection.rules = None;
        let err = load_rules(&connection, "GET /x").unwrap_err();
        assert_eq!(
            (err.kind, err.message.as_str()),
            (ErrorKind::Usage, NEED_RULES)
        );
    }

    mod several_limits {
        use async_trait::async_trait;
        use ratelimit_domain::{BucketDecision, BucketRequest, RateLimitRule};
        use ratelimit_memory::MemoryStorage;

        use super::*;

        /// One memory store behind every command of a test, as one Redis is behind the CLI's
        /// successive runs.
        #[derive(Debug, Clone, Default)]
        struct Shared(Arc<MemoryStorage>);

        #[async_trait]
        impl BucketStore for Shared {
            async fn check_and_consume<'a>(
                &self,
                request: &BucketRequest<'a>,
            ) -> ratelimit_domain::Result<BucketDecision> {
                self.0.check_and_consume(request).await
            }

            async fn check_and_consume_all<'a>(
                &self,
                requests: &[BucketRequest<'a>],
            ) -> ratelimit_domain::Result<Vec<BucketDecision>> {
                self.0.check_and_consume_all(requests).await
            }

            async fn get_remaining(
                &self,
                key: &BucketKey,
                rule: &RateLimitRule,
                now: Option<f64>,
            ) -> ratelimit_domain::Result<u64> {
                self.0.get_remaining(key, rule, now).await
            }

            async fn reset(
                &self,
                key: &BucketKey,
                rule: &RateLimitRule,
            ) -> ratelimit_domain::Result<bool> {
                self.0.reset(key, rule).await
            }
        }

        const SEARCH: &str = "GET /search";

        /// per-client: 2 tokens per ip; everyone: 3 tokens for all; 1 per minute each.
        fn rules() -> RuleSet {
            ratelimit_config::parse_rules(
                r#"
                [rules."GET /search"]
                limits = [
                  { name = "per-client", scope = "ip", max_tokens = 2, refill_rate = 1.0 },
                  { name = "everyone", scope = "global", max_tokens = 3, refill_rate = 1.0 },
                ]

                [rules."GET /global"]
                limits = [
                  { name = "all", scope = "global", max_tokens = 3, refill_rate = 1.0 },
                ]
                "#,
            )
            .unwrap()
        }

        fn open(
            store: &Shared,
            endpoint: &str,
            id: Option<&str>,
            selection: Selection<'_>,
        ) -> Result<Bucket<Shared>, CliError> {
            Bucket::with_store(
                store.clone(),
                rules(),
                &args(endpoint, id),
                "rate_limit",
                selection,
            )
        }

        async fn check(store: &Shared, id: &str) -> CheckReport {
            open(store, SEARCH, Some(id), Selection::All)
                .unwrap()
                .check(None)
                .await
                .unwrap()
        }

        fn remaining_of(report: &CheckReport) -> Vec<(String, u64, bool)> {
            report
                .limits
                .iter()
                .map(|l| (l.name.clone(), l.remaining, l.allowed))
                .collect()
        }

        #[tokio::test]
        async fn a_check_takes_from_every_limit_or_from_none() {
            let store = Shared::default();
            for left in [1, 0] {
                let report = check(&store, "192.0.2.1").await;
                assert!(report.result.allowed);
                assert_eq!(report.limits[0].remaining, left);
                assert_eq!(
                    report.limits[0].key.as_deref(),
                    Some("rate_limit:ip#per-client:192.0.2.1:GET /search")
                );
                assert_eq!(
                    report.limits[1].key.as_deref(),
                    Some("rate_limit:global#everyone:GET /search")
                );
            }
            // The client is out; everyone still has 1, which the refused check does not take.
            let refused = check(&store, "192.0.2.1").await;
            assert!(!refused.result.allowed);
            assert_eq!(
                remaining_of(&refused),
                [
                    ("per-client".to_owned(), 0, false),
                    ("everyone".to_owned(), 1, true)
                ]
            );
            assert_eq!(
                refused
                    .result
                    .refused()
                    .map(|l| l.name.to_string())
                    .collect::<Vec<_>>(),
                ["per-client"]
            );
            assert!(check(&store, "192.0.2.2").await.result.allowed);
            // Now everyone is out: another client is refused by it, and keeps its tokens.
            let third = check(&store, "192.0.2.3").await;
            assert!(!third.result.allowed);
            assert_eq!(
                remaining_of(&third),
                [
                    ("per-client".to_owned(), 2, true),
                    ("everyone".to_owned(), 0, false)
                ]
            );
            assert_eq!(third.cost, Some(1));
        }

        #[tokio::test]
        async fn remaining_reads_every_limit_and_consumes_nothing() {
            let store = Shared::default();
            check(&store, "192.0.2.1").await;
            check(&store, "192.0.2.1").await;
            let bucket = open(&store, SEARCH, Some("192.0.2.1"), Selection::All).unwrap();
            for _ in 0..2 {
                let report = bucket.remaining().await.unwrap();
                let states: Vec<_> = report
                    .limits
                    .iter()
                    .map(|l| (l.name.as_str(), l.remaining, l.allowed, l.retry_after))
                    .collect();
                assert_eq!(
                    states,
                    [
                        ("per-client", 0, false, Duration::from_secs(60)),
                        ("everyone", 1, true, Duration::ZERO),
                    ]
                );
                assert!(report.enabled);
            }
        }

        #[tokio::test]
        async fn reset_resets_the_identifier_s_buckets_and_a_global_one_only_when_named() {
            let store = Shared::default();
            check(&store, "192.0.2.1").await;
            check(&store, "192.0.2.1").await;
            let reset = open(&store, SEARCH, Some("192.0.2.1"), Selection::Identifier)
                .unwrap()
                .reset()
                .await
                .unwrap();
            assert!(reset.existed);
            let reset_keys: Vec<_> = reset.reset.iter().map(|l| l.key.clone()).collect();
            assert_eq!(
                reset_keys,
                [Some(
                    "rate_limit:ip#per-client:192.0.2.1:GET /search".to_owned()
                )]
            );
            assert_eq!(reset.not_reset.len(), 1);
            assert_eq!(reset.not_reset[0].name, "everyone");
            // The client has its 2 tokens again; everyone still has 1 of 3.
            let after = check(&store, "192.0.2.1").await;
            assert_eq!(
                remaining_of(&after),
                [
                    ("per-client".to_owned(), 1, true),
                    ("everyone".to_owned(), 0, true)
                ]
            );

            // The global limit, named: no identifier needed.
            let names = ["everyone".to_owned()];
            let bucket = open(&store, SEARCH, None, Selection::Named(&names)).unwrap();
            assert_eq!(bucket.target.identifier, None);
            let reset = bucket.reset().await.unwrap();
            assert!(reset.existed);
            assert_eq!(
                reset.reset[0].key.as_deref(),
                Some("rate_limit:global#everyone:GET /search")
            );
            assert!(reset.not_reset.is_empty());
            let after = check(&store, "192.0.2.9").await;
            assert_eq!(after.limits[1].remaining, 2);
        }

        #[test]
        fn the_command_line_must_match_the_limits() {
            let store = Shared::default();
            let unknown = ["evryone".to_owned()];
            let err = open(
                &store,
                SEARCH,
                Some("192.0.2.1"),
                Selection::Named(&unknown),
            )
            .unwrap_err();
            assert_eq!(err.exit(), Exit::Usage);
            assert!(
                err.message.contains("no limit named \"evryone\"")
                    && err.message.contains("\"per-client\", \"everyone\""),
                "{}",
                err.message
            );
            let all_global = open(&store, "GET /global", None, Selection::Identifier).unwrap_err();
            assert_eq!(all_global.exit(), Exit::Usage);
            assert!(
                all_global.message.contains("--limit"),
                "{}",
                all_global.message
            );
            let missing = open(&store, SEARCH, None, Selection::All).unwrap_err();
            assert_eq!(missing.exit(), Exit::Usage);
            assert!(
                missing
                    .message
                    .starts_with("the limit \"per-client\" of \"GET /search\" has scope ip"),
                "{}",
                missing.message
            );
            // A global-only endpoint needs no identifier, and ignores one.
            let global = open(&store, "GET /global", Some("x"), Selection::All).unwrap();
            assert_eq!(global.target.identifier, None);
        }
    }
}
