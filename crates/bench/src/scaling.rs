//! `just bench-scaling`: where the limiter stands against the physical limit of this machine
//! for an exact shared limit, and how a check's cost grows with concurrency (1 → 256 tasks) and
//! with the number of buckets Redis holds (1 → 10 million).
//!
//! Everything goes through the adapter the container builds (compact layout, event logging
//! off), once with one script call per check and once with coalescing on, against one
//! throwaway `redis-server` started for the run. For every run it records:
//!
//! - checks/s and p50/p99 latency of the closed-loop load generator (`load`);
//! - **Redis CPU per check**: `used_cpu_user + used_cpu_sys` from `INFO cpu` over the run,
//!   divided by the checks. Unlike `INFO commandstats` this includes reading requests and
//!   writing replies, which is what batching saves, so it is what one Redis core can spend;
//! - **the Redis core's utilisation**: that CPU time over the run's wall time. At 100 % Redis
//!   is the limit; below it, the client (on the same 2 cores here) is;
//! - **the ceiling** `1 / (Redis CPU per check)`: checks/s one Redis core could decide at that
//!   cost (the run's checks/s are the busy share of it);
//! - **client CPU per check**: this process's user + system time (`/proc/self/stat`) over the
//!   checks.
//!
//! Buckets are created beforehand by a Lua loop that writes valid compact-layout values under
//! the very keys the adapter derives for `10.0.x.y` identifiers; the run then checks a random one
//! of them, and the figure verifies that no check created a key.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use ratelimit_adapter::domain::KeyBuilder;
use ratelimit_adapter::{
    DecisionSource, DynRateLimiter, RateLimitRule, RateLimitScope, RateLimiterExt, RuleSet,
};
use ratelimit_container::{Backend, Container, ContainerConfig};
use ratelimit_redis::RedisConfig;
use ratelimit_tests::redis_server::RedisServer;

use crate::BoxResult;
use crate::load::{self, Checker, Identifiers, LoadResult, Outcome};
use crate::redis_path::{ENDPOINT, MAX_TOKENS, REFILL_RATE};
use crate::stats::quantile_us;

/// Options of `ratelimit-bench scaling`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ScalingArgs {
    /// The largest number of buckets held by Redis (steps of 10x from 1,000).
    #[arg(long, default_value_t = 10_000_000)]
    max_buckets: u64,
    /// Length of one run, in seconds.
    #[arg(long, default_value_t = 1.5)]
    seconds: f64,
    /// Runs per row; the row reports the median run by throughput.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// A short run: up to 1 million buckets, one 0.5 s run per row.
    #[arg(long)]
    quick: bool,
    /// Where to write the Markdown tables (also printed).
    #[arg(long, default_value = "target/bench/scaling.md")]
    out: std::path::PathBuf,
}

/// Concurrency levels of the first table.
const TASKS: [usize; 5] = [1, 4, 16, 64, 256];
/// Tasks for the bucket-count table.
const BUCKET_TASKS: usize = 64;
/// Buckets written per call of the fill script (keeps Redis busy for a fraction of a second).
const FILL_CHUNK: u64 = 20_000;

/// Writes buckets `ARGV[3] .. ARGV[4]-1` as full compact-layout buckets of capacity `ARGV[5]`
/// and lifetime `ARGV[6]` seconds, under `ARGV[1] .. "<i/256>.<i%256>" .. ARGV[2]`: the keys of
/// the identifiers `10.0.<i/256>.<i%256>` (see `load::Identifiers::RandomOf`).
const FILL_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[6])
local value = struct.pack('<ddI4', tonumber(ARGV[5]), now, math.floor(now + ttl))
for i = tonumber(ARGV[3]), tonumber(ARGV[4]) - 1 do
  redis.call('SET', ARGV[1] .. math.floor(i / 256) .. '.' .. (i % 256) .. ARGV[2], value, 'EX', ttl)
end
return 0
";

/// The adapter, as a load-generator checker.
#[derive(Debug, Clone)]
struct AdapterChecker(DynRateLimiter);

impl Checker for AdapterChecker {
    async fn check(&self, identifier: &str) -> BoxResult<Outcome> {
        let result = self.0.is_allowed(ENDPOINT, identifier).await?;
        Ok(match (result.allowed, result.source) {
            (_, DecisionSource::FailOpen) => Outcome::FailOpen,
            (true, _) => Outcome::Allowed,
            (false, _) => Outcome::Denied,
        })
    }
}

/// One measured run.
#[derive(Debug, Clone, Copy)]
struct Row {
    throughput: f64,
    p50_us: f64,
    p99_us: f64,
    redis_us: f64,
    redis_busy: f64,
    client_us: f64,
    failed_open: u64,
}

impl Row {
    /// Checks/s one Redis core could decide at this run's Redis CPU per check.
    fn ceiling(&self) -> f64 {
        if self.redis_us > 0.0 {
            1e6 / self.redis_us
        } else {
            f64::NAN
        }
    }
}

/// The two ways the adapter can reach Redis.
#[derive(Debug, Clone, Copy)]
enum Path {
    Single,
    Coalesced,
}

impl Path {
    fn label(self) -> &'static str {
        match self {
            Self::Single => "one call per check",
            Self::Coalesced => "coalesced",
        }
    }
}

/// `ratelimit-bench scaling`.
///
/// # Errors
/// Redis could not be started or reached, or a run failed.
pub(crate) fn run(args: &ScalingArgs, quick: bool) -> BoxResult<()> {
    let mut args = args.clone();
    if quick || args.quick {
        args.max_buckets = args.max_buckets.min(1_000_000);
        args.seconds = args.seconds.min(0.5);
        args.runs = 1;
    }
    let server = RedisServer::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(measure(&server, &args))?;
    drop(runtime);
    drop(server);
    print!("{report}");
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, &report)?;
    println!("written to {}", args.out.display());
    Ok(())
}

async fn measure(server: &RedisServer, args: &ScalingArgs) -> BoxResult<String> {
    let url = server.url();
    let single = adapter(&url, Path::Single).await?;
    let coalesced = adapter(&url, Path::Coalesced).await?;
    let time = Duration::from_secs_f64(args.seconds);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "ratelimit-bench scaling: {} s per run, median of {} run(s); Redis {}; {} CPU(s)\n",
        args.seconds,
        args.runs,
        redis_version(server),
        std::thread::available_parallelism().map_or(0, usize::from)
    );

    // Table 1: one shared bucket (an exact shared limit), 1 → 256 tasks.
    let shared = Identifiers::Fixed("10.0.0.0".to_owned());
    let _ = writeln!(
        out,
        "### One shared bucket (an exact shared limit), by concurrency\n\n{}",
        HEADER
    );
    for tasks in TASKS {
        for path in [Path::Single, Path::Coalesced] {
            let checker = match path {
                Path::Single => &single,
                Path::Coalesced => &coalesced,
            };
            let row = median_run(server, checker, tasks, time, &shared, args.runs).await?;
            eprintln!("shared bucket, {tasks} tasks, {}: {row:?}", path.label());
            push_row(&mut out, &tasks.to_string(), path, &row);
        }
    }

    // Table 2: N buckets held, a random one checked per request, at BUCKET_TASKS tasks.
    let _ = writeln!(
        out,
        "\n### By buckets held ({BUCKET_TASKS} tasks, a random existing bucket per check)\n\n{}",
        HEADER.replacen("| Tasks |", "| Buckets |", 1)
    );
    let mut counts = vec![1_u64];
    let mut n = 1_000;
    while n <= args.max_buckets {
        counts.push(n);
        n *= 10;
    }
    for buckets in counts {
        flush(server);
        fill(server, buckets).await?;
        let memory = used_memory(server);
        for path in [Path::Single, Path::Coalesced] {
            let checker = match path {
                Path::Single => &single,
                Path::Coalesced => &coalesced,
            };
            let ids = Identifiers::RandomOf(buckets);
            let row = median_run(server, checker, BUCKET_TASKS, time, &ids, args.runs).await?;
            let keys = dbsize(server);
            if keys != buckets {
                return Err(format!(
                    "{buckets} buckets: Redis holds {keys} keys after the run: the fill script \
                     did not write the keys the adapter uses"
                )
                .into());
            }
            eprintln!("{buckets} buckets, {}: {row:?}", path.label());
            push_row(
                &mut out,
                &format!("{buckets} ({:.0} MB)", memory / 1e6),
                path,
                &row,
            );
        }
    }
    flush(server);
    Ok(out)
}

const HEADER: &str = "| Tasks | Path | Checks/s | p50 | p99 | Redis CPU per check | Redis core busy | \
Ceiling of one Redis core | Client CPU per check |\n\
|---|---|--:|--:|--:|--:|--:|--:|--:|";

fn push_row(out: &mut String, first: &str, path: Path, row: &Row) {
    let _ = writeln!(
        out,
        "| {first} | {} | {:.1}k | {:.0} µs | {:.0} µs | {:.2} µs | {:.0} % | {:.0}k/s | {:.1} µs |{}",
        path.label(),
        row.throughput / 1e3,
        row.p50_us,
        row.p99_us,
        row.redis_us,
        row.redis_busy * 100.0,
        row.ceiling() / 1e3,
        row.client_us,
        if row.failed_open > 0 {
            format!(" {} failed open", row.failed_open)
        } else {
            String::new()
        }
    );
}

async fn adapter(url: &str, path: Path) -> BoxResult<AdapterChecker> {
    let rules = RuleSet::try_from_rules([(
        ENDPOINT,
        RateLimitRule::new(RateLimitScope::Ip, MAX_TOKENS, REFILL_RATE)?,
    )])?;
    let config = RedisConfig::new(url)
        .with_coalescing(matches!(path, Path::Coalesced))
        .with_check_timeout(Duration::from_secs(2));
    let container = ContainerConfig::redis(url, rules)
        .with_event_logging(false)
        .with_backend(Backend::Redis(config));
    Ok(AdapterChecker(
        Container::build(container).await?.rate_limiter(),
    ))
}

async fn median_run(
    server: &RedisServer,
    checker: &AdapterChecker,
    tasks: usize,
    time: Duration,
    identifiers: &Identifiers,
    runs: usize,
) -> BoxResult<Row> {
    // A short warm-up: connections, scripts, the runtime's threads.
    load::run(checker, tasks, Duration::from_millis(100), identifiers, 7).await?;
    let mut rows = Vec::new();
    for seed in 0..runs.max(1) {
        rows.push(one_run(server, checker, tasks, time, identifiers, seed as u64).await?);
    }
    rows.sort_by(|a, b| a.throughput.total_cmp(&b.throughput));
    Ok(rows[rows.len() / 2])
}

async fn one_run(
    server: &RedisServer,
    checker: &AdapterChecker,
    tasks: usize,
    time: Duration,
    identifiers: &Identifiers,
    seed: u64,
) -> BoxResult<Row> {
    let redis_before = redis_cpu(server)?;
    let client_before = client_cpu();
    let started = Instant::now();
    let result: LoadResult = load::run(checker, tasks, time, identifiers, seed).await?;
    let wall = started.elapsed().as_secs_f64();
    let client_after = client_cpu();
    let redis_after = redis_cpu(server)?;
    let checks = result.checks.max(1) as f64;
    let redis = redis_after - redis_before;
    Ok(Row {
        throughput: result.throughput(),
        p50_us: quantile_us(&result.latency, 0.5),
        p99_us: quantile_us(&result.latency, 0.99),
        redis_us: redis / checks * 1e6,
        redis_busy: redis / wall,
        client_us: client_after
            .zip(client_before)
            .map_or(f64::NAN, |(a, b)| a - b)
            / checks
            * 1e6,
        failed_open: result.failed_open,
    })
}

/// Redis's CPU time so far (user + system), in seconds.
fn redis_cpu(server: &RedisServer) -> BoxResult<f64> {
    let info: String = redis::from_redis_value(server.cmd(redis::cmd("INFO").arg("cpu")))?;
    let field = |name: &str| -> BoxResult<f64> {
        Ok(crate::redis_cost::info_field(&info, name)
            .ok_or_else(|| format!("no {name} in INFO cpu"))?
            .parse::<f64>()?)
    };
    Ok(field("used_cpu_user")? + field("used_cpu_sys")?)
}

/// This process's CPU time so far (user + system), in seconds; `None` where `/proc` is not.
fn client_cpu() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // Linux reports in USER_HZ, 100 on every architecture it supports.
    Some(ticks / 100.0)
}

fn redis_version(server: &RedisServer) -> String {
    redis::from_redis_value::<String>(server.cmd(redis::cmd("INFO").arg("server")))
        .ok()
        .and_then(|info| crate::redis_cost::info_field(&info, "redis_version"))
        .unwrap_or_else(|| "?".to_owned())
}

fn flush(server: &RedisServer) {
    server.cmd(&redis::cmd("FLUSHALL"));
}

fn dbsize(server: &RedisServer) -> u64 {
    redis::from_redis_value(server.cmd(&redis::cmd("DBSIZE"))).unwrap_or(0)
}

fn used_memory(server: &RedisServer) -> f64 {
    redis::from_redis_value::<String>(server.cmd(redis::cmd("INFO").arg("memory")))
        .ok()
        .and_then(|info| crate::redis_cost::info_field(&info, "used_memory"))
        .and_then(|value| value.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Creates buckets `0 .. count` (see [`FILL_SCRIPT`]).
async fn fill(server: &RedisServer, count: u64) -> BoxResult<()> {
    let marker = "0.0";
    let key = KeyBuilder::new(KeyBuilder::DEFAULT_PREFIX, RateLimitScope::Ip, ENDPOINT)?
        .key(&format!("10.0.{marker}"))?;
    let (prefix, suffix) = key
        .as_str()
        .split_once(&format!("10.0.{marker}"))
        .ok_or("the identifier is not in its bucket key")?;
    let prefix = format!("{prefix}10.0.");
    // The compact layout's key (crates/infrastructure-redis/src/keys.rs).
    let suffix = format!("{suffix}:tb");
    let ttl = RateLimitRule::new(RateLimitScope::Ip, MAX_TOKENS, REFILL_RATE)?
        .storage_ttl_seconds()
        .max(3_600);
    let client = redis::Client::open(server.url())?;
    // No response timeout (redis-rs's default is 500 ms): a loaded machine can take longer to
    // write a chunk.
    let mut conn = client
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new().set_response_timeout(None),
        )
        .await?;
    let mut start = 0;
    while start < count {
        let end = (start + FILL_CHUNK).min(count);
        let _: i64 = redis::cmd("EVAL")
            .arg(FILL_SCRIPT)
            .arg(0)
            .arg(&prefix)
            .arg(&suffix)
            .arg(start)
            .arg(end)
            .arg(MAX_TOKENS)
            .arg(ttl)
            .query_async(&mut conn)
            .await?;
        start = end;
    }
    Ok(())
}
