//! The rate limiter's benchmark.
//!
//! Run it with `just bench` (about 3 minutes on 2 cores) or `just bench --quick` (about
//! 30 s; or set `BENCH_QUICK=1`). It builds in release mode, starts its own throwaway
//! `redis-server`, and measures:
//!
//! 1. **The Redis path**: the adapter's `is_allowed` at 1, 16 and 64 concurrent tasks
//!    (checks/s, p50/p99 latency) against the same `EVALSHA` sent raw over one multiplexed
//!    connection from this process, and against `redis-benchmark` when it is installed.
//! 2. **Redis's cost**: CPU per check (`INFO commandstats`) against a script that does
//!    nothing, and memory per bucket (`INFO memory`) against one plain key per bucket.
//! 3. **The memory backend**: ns per check of `MemoryStorage` and of the adapter over it,
//!    against the `governor` crate's keyed limiter.
//! 4. **A deny flood**: one denied key checked in a loop, against allowed checks.
//! 5. **Several limits**: a two-limit check against a one-limit check and against the same
//!    two limits checked separately, at 64 tasks (checks/s, Redis CPU per check), and the
//!    tokens that refused requests cost each way.
//! 6. **Coalesced checks**: the adapter with coalescing on (default settings otherwise) at 1, 16, 64
//!    and 256 tasks against one raw `EVALSHA` per check, Redis CPU per check batched and not,
//!    redis-benchmark, and limitador with its Redis storage (see `coalesced`).
//!
//! `just bench-http` (`ratelimit-bench http`) compares the HTTP layer with no layer and with
//! `tower_governor` on one axum route over real connections (see `http_layer`).
//!
//! `just bench memory-flood` runs something else: 10 million distinct identifiers through a
//! `MemoryStorage`, with the process's memory every million keys, to show that the store's
//! capacity holds it flat (see `memory_flood`).
//!
//! Machines are shared and noisy, so every figure is a ratio to a baseline measured in the
//! same run, in alternating rounds. It prints a table with PASS/FAIL against the targets,
//! and writes `target/bench/summary.json` (figure name → value) and `target/bench/redis.svg`.
//! See `docs/performance.md`.

// A benchmark's job is to print its results.
#![allow(clippy::print_stdout)]

mod chart;
mod coalesced;
mod http_layer;
mod limitador;
mod load;
mod memory_backend;
mod memory_flood;
mod multi_limit;
mod progress;
mod redis_benchmark;
mod redis_cost;
mod redis_path;
mod report;
mod scaling;
mod stats;
mod thread_cpu;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use ratelimit_redis::TOKEN_BUCKET_SCRIPT;
use ratelimit_tests::redis_server::RedisServer;
use serde_json::json;

use crate::progress::Progress;
use crate::redis_path::Targets;
use crate::report::Verdict;

/// Any error, from any part of the benchmark.
type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A result with any error.
type BoxResult<T> = Result<T, BoxError>;

/// Benchmarks the rate limiter against baselines measured in the same run.
#[derive(Debug, Parser)]
#[command(name = "ratelimit-bench")]
struct Args {
    /// A short run (~30 s): fewer and shorter rounds, fewer buckets. Also BENCH_QUICK=1.
    #[arg(long, env = "BENCH_QUICK", value_parser = clap::builder::BoolishValueParser::new())]
    quick: bool,
    /// Where to write summary.json and redis.svg.
    #[arg(long, default_value_os_t = default_out())]
    out: PathBuf,
    /// Exit with status 1 when a target is missed.
    #[arg(long)]
    strict: bool,
    /// Something other than the benchmark's figures.
    #[command(subcommand)]
    command: Option<BenchCommand>,
}

/// What else the benchmark binary can run.
#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Distinct identifiers (10 million by default) through MemoryStorage, printing buckets
    /// held, evictions and the process's resident memory every million keys.
    MemoryFlood(memory_flood::FloodArgs),
    /// Figure 6 alone: coalesced checks against one EVALSHA per check, redis-benchmark and
    /// limitador, at 1, 16, 64 and 256 tasks (about 1 minute; with --quick about 20 s).
    Coalesced,
    /// Only figure 5 (several limits per request), on its own throwaway redis-server.
    SeveralLimits,
    /// The HTTP layer against no layer and tower_governor on one axum route, over real
    /// connections, in rotating rounds (see `http_layer`).
    Http(http_layer::HttpArgs),
    /// Where the limiter stands against one Redis core's ceiling for an exact shared limit, and
    /// how a check's cost grows with concurrency (1 → 256 tasks) and with the buckets Redis
    /// holds (1 → 10 million); writes target/bench/scaling.md (see `scaling`).
    Scaling(scaling::ScalingArgs),
    /// Figure 3 alone (the memory store against governor), or one contender for callgrind.
    Memory(memory_backend::MemoryArgs),
}

/// `target/bench` of the workspace.
fn default_out() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .nth(2)
        .unwrap_or(manifest)
        .join("target")
        .join("bench")
}

/// How long and how much to measure.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// Paired rounds per figure, figure 1 apart.
    pub(crate) rounds: usize,
    /// Length of one timed run of one contender.
    pub(crate) round: Duration,
    /// Paired rounds per concurrency level of figure 1 (shorter and more of them: each opens
    /// fresh connections).
    pub(crate) pairs: usize,
    /// Length of one timed run of one contender in figure 1.
    pub(crate) pair_round: Duration,
    /// Buckets created for the memory figure.
    pub(crate) buckets: u64,
    /// Checks per CPU-per-check measurement.
    pub(crate) cpu_checks: u64,
    /// Rounds of redis-benchmark, adapter and raw baseline (one `round` each).
    pub(crate) rb_rounds: usize,
    /// At most this many requests per `redis-benchmark` round.
    pub(crate) rb_requests: u64,
    /// Checks per round of the memory backend figure.
    pub(crate) memory_checks: usize,
}

impl Settings {
    pub(crate) fn new(quick: bool) -> Self {
        if quick {
            Self {
                rounds: 2,
                round: Duration::from_millis(700),
                pairs: 6,
                pair_round: Duration::from_millis(250),
                buckets: 100_000,
                cpu_checks: 50_000,
                rb_rounds: 2,
                rb_requests: 200_000,
                memory_checks: 300_000,
            }
        } else {
            Self {
                rounds: 6,
                round: Duration::from_millis(1_500),
                pairs: 20,
                pair_round: Duration::from_millis(400),
                buckets: 1_000_000,
                cpu_checks: 100_000,
                rb_rounds: 10,
                rb_requests: 400_000,
                memory_checks: 1_000_000,
            }
        }
    }

    /// Progress steps of a whole run.
    fn steps(&self) -> u64 {
        let rounds = self.rounds as u64;
        let layouts = redis_cost::LAYOUTS.len() as u64;
        // warm-up, figure 1, redis-benchmark rounds, deny flood, memory baseline, memory per
        // layout, CPU rounds (every layout each), memory backend.
        1 + 3 * self.pairs as u64
            + self.rb_rounds as u64
            + rounds
            + 1
            + layouts
            + rounds
            + rounds
            + multi_limit::steps(self)
            + coalesced::steps(self)
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(BenchCommand::Memory(memory)) = &args.command {
        return memory_backend::run(memory, args.quick);
    }
    if let Some(BenchCommand::MemoryFlood(flood)) = &args.command {
        return match memory_flood::run(flood) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("ratelimit-bench memory-flood: error: {err}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(BenchCommand::Coalesced) = &args.command {
        return match coalesced::run_alone(args.quick, args.strict) {
            Ok(all_passed) if all_passed || !args.strict => ExitCode::SUCCESS,
            Ok(_) => ExitCode::FAILURE,
            Err(err) => {
                eprintln!("ratelimit-bench coalesced: error: {err}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(BenchCommand::SeveralLimits) = &args.command {
        return match run_several_limits(&args) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) if !args.strict => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(err) => {
                eprintln!("ratelimit-bench several-limits: error: {err}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(BenchCommand::Scaling(scaling)) = &args.command {
        return match scaling::run(scaling, args.quick) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("ratelimit-bench scaling: error: {err}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(BenchCommand::Http(http)) = &args.command {
        return match http_layer::run(http) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("ratelimit-bench http: error: {err}");
                ExitCode::FAILURE
            }
        };
    }
    match run(&args) {
        Ok(all_passed) if all_passed || !args.strict => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("ratelimit-bench: error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Runs every figure and reports; `Ok(true)` when no target was missed.
fn run(args: &Args) -> BoxResult<bool> {
    let settings = Settings::new(args.quick);
    std::fs::create_dir_all(&args.out)?;
    let out = args.out.canonicalize()?;
    let progress = Progress::new(settings.steps());
    progress.begin("starting redis-server");
    let server = RedisServer::start();
    let redis_version = info_value(&server, "server", "redis_version")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;

    let mut targets = runtime.block_on(Targets::connect(&server.url()))?;
    progress.begin("warming up");
    runtime.block_on(targets.warm_up())?;
    progress.done();
    let levels = runtime.block_on(targets.measure_levels(&settings, &progress))?;

    let sha = redis::Script::new(TOKEN_BUCKET_SCRIPT)
        .get_hash()
        .to_owned();
    let estimate = levels
        .iter()
        .find(|level| level.concurrency == 64)
        .map_or(30_000.0, redis_path::Level::raw_throughput);
    let (versus, rb_note) = match runtime.block_on(targets.versus_redis_benchmark(
        server.port(),
        &sha,
        &settings,
        &progress,
        estimate,
    )) {
        Ok(Some(versus)) => (Some(versus), String::new()),
        Ok(None) => (None, "redis-benchmark not installed".to_owned()),
        Err(err) => {
            progress.note(format!("warning: redis-benchmark: {err}"));
            (None, "redis-benchmark failed".to_owned())
        }
    };

    let deny = runtime.block_on(targets.deny_flood(&settings, &progress))?;
    let failed_open = targets.failed_open;
    drop(targets);
    let coalesced = runtime.block_on(coalesced::measure(&server, &settings, &progress))?;
    let multi = runtime.block_on(multi_limit::measure(&server, &settings, &progress))?;
    let cost = runtime.block_on(redis_cost::measure(&server, &settings, &progress))?;
    drop(runtime);
    let memory = memory_backend::measure(&settings, &progress)?;
    progress.finish();
    drop(server);

    let mut figures = redis_path::figures(&levels, versus.as_ref(), &rb_note);
    figures.extend(cost);
    figures.extend(memory);
    figures.push(deny);
    figures.extend(multi);
    figures.extend(coalesced);

    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    println!(
        "ratelimit-bench, {} run, {} UTC, {cores} cores, redis {redis_version}",
        if args.quick { "quick" } else { "full" },
        utc_date(now)
    );
    println!("Every ratio is value / baseline, both measured in this run.\n");
    print!("{}", report::table(&figures));
    if failed_open > 0 {
        println!(
            "\nwarning: {failed_open} adapter checks failed open (Redis slower than the check \
             deadline); their latencies are in the figures"
        );
    }

    let summary = report::summary(
        &figures,
        &[
            ("quick", json!(args.quick)),
            ("unix_time", json!(now)),
            ("cores", json!(cores)),
            ("redis_version", json!(redis_version)),
            ("adapter_failed_open", json!(failed_open)),
        ],
    );
    let summary_path = out.join("summary.json");
    std::fs::write(
        &summary_path,
        serde_json::to_string_pretty(&summary)? + "\n",
    )?;
    let chart_path = out.join("redis.svg");
    chart::draw(
        &chart_path,
        &levels,
        versus
            .as_ref()
            .map(redis_path::VersusRedisBenchmark::redis_benchmark_throughput),
    )?;
    println!("\nwrote {}", summary_path.display());
    println!("wrote {}", chart_path.display());

    let failed = figures
        .iter()
        .filter(|f| f.verdict() == Verdict::Fail)
        .count();
    let passed = figures
        .iter()
        .filter(|f| f.verdict() == Verdict::Pass)
        .count();
    println!("targets: {passed} passed, {failed} failed");
    Ok(failed == 0)
}

/// Figure 5 alone; `Ok(true)` when no target was missed.
fn run_several_limits(args: &Args) -> BoxResult<bool> {
    let settings = Settings::new(args.quick);
    let progress = Progress::new(multi_limit::steps(&settings));
    progress.begin("starting redis-server");
    let server = RedisServer::start();
    let redis_version = info_value(&server, "server", "redis_version")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let figures = runtime.block_on(multi_limit::measure(&server, &settings, &progress))?;
    progress.finish();
    drop(runtime);
    drop(server);
    println!("ratelimit-bench several-limits, redis {redis_version}");
    println!("Every ratio is value / baseline, both measured in this run.\n");
    print!("{}", report::table(&figures));
    Ok(figures.iter().all(|f| f.verdict() != Verdict::Fail))
}

/// One field of `INFO <section>`.
fn info_value(server: &RedisServer, section: &str, field: &str) -> BoxResult<String> {
    let text: String = redis::from_redis_value(server.cmd(redis::cmd("INFO").arg(section)))?;
    redis_cost::info_field(&text, field)
        .ok_or_else(|| format!("no {field} in INFO {section}").into())
}

/// `YYYY-MM-DD HH:MM` of a Unix time, in UTC.
fn utc_date(unix_seconds: u64) -> String {
    let days = unix_seconds / 86_400;
    let secs = unix_seconds % 86_400;
    // Howard Hinnant's civil_from_days, for days since 1970-01-01 (non-negative here).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}",
        secs / 3_600,
        secs % 3_600 / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc_date(0), "1970-01-01 00:00");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00");
        assert_eq!(utc_date(1_700_000_000), "2023-11-14 22:13");
    }

    #[test]
    fn quick_runs_are_smaller() {
        let quick = Settings::new(true);
        let full = Settings::new(false);
        assert!(quick.round < full.round && quick.buckets < full.buckets);
        assert!(quick.steps() < full.steps());
    }

    #[test]
    fn arguments_parse() -> BoxResult<()> {
        let args = Args::try_parse_from(["ratelimit-bench", "--quick", "--out", "x"])?;
        assert!(args.quick && !args.strict);
        assert_eq!(args.out, PathBuf::from("x"));
        assert!(args.command.is_none());
        let args = Args::try_parse_from(["ratelimit-bench", "memory-flood", "--keys", "5"])?;
        assert!(matches!(args.command, Some(BenchCommand::MemoryFlood(_))));
        Ok(())
    }
}
