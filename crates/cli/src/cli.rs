//! The command line: what `ratelimit` accepts, parsed by clap.

use std::path::PathBuf;

use clap::builder::TypedValueParser as _;
use clap::{Args, Parser, Subcommand};
use ratelimit_domain::IpGrouping;
use ratelimit_redis::KeyLayout;

/// The default `--key-prefix`: the one the service uses unless configured otherwise.
pub(crate) const DEFAULT_KEY_PREFIX: &str = "rate_limit";

/// `ratelimit`: operate the token buckets the service keeps in Redis.
#[derive(Debug, Parser)]
#[command(
    name = "ratelimit",
    version,
    about = "Operate the rate limiter's token buckets in Redis and validate rules files",
    long_about = "Operate the rate limiter's token buckets in Redis and validate rules files.\n\n\
        Exit codes: 0 allowed or done, 1 denied, 2 usage or configuration error, \
        3 Redis error.\n\n\
        Bucket commands (check, remaining, reset) need the service's rules file \
        (--rules or RATELIMIT_RULES) and its Redis (--redis-url or REDIS_URL). \
        They never fall back to a private in-memory store: its buckets would not be the service's."
)]
pub(crate) struct Cli {
    /// Print one JSON object on stdout instead of human-readable lines.
    #[arg(long, global = true)]
    pub(crate) json: bool,

    /// What to do.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Checks one request and CONSUMES its cost, exactly as the service would.
    ///
    /// This is a real check, not a dry run: an allowed check takes tokens from the bucket of
    /// every limit of the endpoint (a denied one takes nothing from any).
    /// Use `remaining` to look without touching. Exit 0 when allowed, 1 when denied.
    Check(CheckArgs),

    /// Shows how many whole tokens every limit of the endpoint has left, consuming nothing.
    Remaining(BucketArgs),

    /// Refills the identifier's buckets: the support desk's "unlock this user".
    ///
    /// Resets every limit of the endpoint that keeps a bucket per client; a global limit
    /// (shared by every client) only when named with --limit.
    Reset(ResetArgs),

    /// Works with rules files.
    #[command(subcommand)]
    Rules(RulesCommand),
}

/// Arguments of `check`.
#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    /// Which buckets.
    #[command(flatten)]
    pub(crate) bucket: BucketArgs,

    /// Tokens this request costs (at least 1), taken from every limit of the endpoint;
    /// default: each limit's own cost.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) cost: Option<u64>,
}

/// Arguments of `reset`.
#[derive(Debug, Args)]
pub(crate) struct ResetArgs {
    /// Which buckets.
    #[command(flatten)]
    pub(crate) bucket: BucketArgs,

    /// Reset only the limit of this name (repeatable), whatever its scope: the only way to
    /// reset a global limit. Default: every limit that is not global (for a rule of the
    /// single-limit form, its one limit).
    #[arg(long, value_name = "NAME")]
    pub(crate) limit: Vec<String>,
}

/// Which buckets (those of one endpoint and identifier, one per limit), and how to reach
/// them.
#[derive(Debug, Args)]
pub(crate) struct BucketArgs {
    /// The endpoint, exactly as named in the rules file, e.g. "POST /api/v1/sessions".
    #[arg(long, short = 'e', value_name = "ENDPOINT")]
    pub(crate) endpoint: String,

    /// Whose buckets: an IP address, a user id, … as the limits' scopes say. Not needed when
    /// every limit concerned has the global scope. For `ip` rules it is read as an address (`::1`,
    /// `[::1]`, `::ffff:1.2.3.4`, `fe80::1%eth0`, or an identifier the service wrote such as
    /// `2001:db8::/64`) and grouped exactly as the service groups clients.
    #[arg(long, short = 'i', value_name = "IDENTIFIER")]
    pub(crate) identifier: Option<String>,

    /// How the service groups IPv6 clients: the prefix length of one bucket (the HTTP layer's
    /// and the example server's default is 64). Used for `ip` rules only.
    #[arg(
        long,
        value_name = "BITS",
        default_value_t = IpGrouping::DEFAULT_IPV6_PREFIX,
        value_parser = clap::value_parser!(u8).range(0..=128)
    )]
    pub(crate) ipv6_prefix: u8,

    /// How the service groups IPv4 clients: the prefix length of one bucket (default 32, one
    /// bucket per address). Used for `ip` rules only.
    #[arg(
        long,
        value_name = "BITS",
        default_value_t = IpGrouping::DEFAULT_IPV4_PREFIX,
        value_parser = clap::value_parser!(u8).range(0..=32)
    )]
    pub(crate) ipv4_prefix: u8,

    /// Use --identifier exactly as given, even for an `ip` rule: for a service whose own
    /// identifier extractor writes something other than an address for `ip` rules.
    #[arg(long)]
    pub(crate) raw_identifier: bool,

    /// Where the rules and Redis are.
    #[command(flatten)]
    pub(crate) connection: ConnectionArgs,
}

/// Rules file, Redis and key prefix: the same as the service's, so that the CLI addresses the
/// service's buckets.
#[derive(Debug, Args)]
pub(crate) struct ConnectionArgs {
    /// The service's rules file (TOML).
    // Parsed as an OS string so that an empty RATELIMIT_RULES counts as unset (reported with
    // the CLI's own message) instead of being a clap error.
    #[arg(
        long,
        value_name = "FILE",
        env = "RATELIMIT_RULES",
        value_parser = clap::builder::OsStringValueParser::new().map(PathBuf::from)
    )]
    pub(crate) rules: Option<PathBuf>,

    /// The service's Redis, e.g. redis://127.0.0.1:6379/0.
    #[arg(long, value_name = "URL", env = "REDIS_URL", hide_env_values = true)]
    pub(crate) redis_url: Option<String>,

    /// The first part of every bucket key; must match the service's (empty means the default).
    #[arg(
        long,
        value_name = "PREFIX",
        env = "RATELIMIT_KEY_PREFIX",
        default_value = DEFAULT_KEY_PREFIX
    )]
    pub(crate) key_prefix: String,

    /// How the service stores its buckets; must match the service's `RedisConfig` layout.
    /// `compact` (the default) or `two-keys` (the original service's layout; also accepted as
    /// `specification`, its former name).
    #[arg(
        long,
        value_name = "two-keys|compact",
        env = "RATELIMIT_LAYOUT",
        default_value_t = KeyLayout::Compact
    )]
    pub(crate) layout: KeyLayout,

    /// The service uses Redis Cluster: --redis-url is then a comma-separated list of nodes.
    #[arg(long, env = "RATELIMIT_CLUSTER")]
    pub(crate) cluster: bool,

    /// How long to wait for Redis, per operation, in milliseconds.
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 2000,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    pub(crate) timeout_ms: u64,
}

/// Subcommands of `rules`.
#[derive(Debug, Subcommand)]
pub(crate) enum RulesCommand {
    /// Validates a rules file and prints its rules. Exit 0 when valid, 2 when not.
    Check {
        /// The rules file (TOML).
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

impl Cli {
    /// The Redis URL given to a bucket command, if any, for scrubbing its password from output.
    pub(crate) fn redis_url(&self) -> Option<&str> {
        match &self.command {
            Command::Check(args) => args.bucket.connection.redis_url.as_deref(),
            Command::Remaining(args) => args.connection.redis_url.as_deref(),
            Command::Reset(args) => args.bucket.connection.redis_url.as_deref(),
            Command::Rules(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn json_is_accepted_anywhere_and_cost_must_be_positive() {
        let cli = Cli::try_parse_from([
            "ratelimit",
            "check",
            "--endpoint",
            "GET /x",
            "-i",
            "a",
            "--json",
            "--cost",
            "3",
        ])
        .unwrap();
        assert!(cli.json);
        let Command::Check(args) = cli.command else {
            panic!("not a check")
        };
        assert_eq!(args.cost, Some(3));
        assert_eq!(args.bucket.connection.timeout_ms, 2000);

        let err =
            Cli::try_parse_from(["ratelimit", "check", "-e", "x", "--cost", "0"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }
}
