//! Figure 6: coalesced checks, and a peer measured in the same rounds.
//!
//! At 1, 16, 64 and 256 tasks, in paired rounds (order rotating, fresh connections every
//! round), on the same Redis:
//!
//! - **adapter**: `is_allowed` through the adapter built by the container with coalescing on
//!   and otherwise default settings (event logging off): the default layout;
//! - **raw**: the default layout's single-check script, one `EVALSHA` per check, sent over one
//!   redis-rs multiplexed connection by the same tasks (the one-call-per-check ceiling);
//! - **limitador** (when its driver is built, see `crates/bench/limitador/`): Kuadrant's
//!   limiter with its Redis storage and a limit of the same size, driven by the same load
//!   generator with the same number of tasks, in a process of its own.
//!
//! At 64 tasks each round also measures Redis CPU per check for the adapter and the raw
//! baseline: the whole redis-server process's CPU time (`INFO cpu`, user plus system) over the
//! run, divided by the checks. Only the contender being measured talks to that Redis then, and
//! the whole process counts what a check costs Redis beyond the script (reading the request,
//! dispatching the command, writing the reply, the socket calls), which `INFO commandstats`
//! leaves out and which one call per check pays per check. The round also runs
//! `redis-benchmark -c 64 -P 16` on the two-key script against the adapter in the two-key
//! layout with coalescing on (redis-benchmark cannot send the compact script's binary
//! argument).

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use ratelimit_adapter::{
    DecisionSource, DynRateLimiter, RateLimitRule, RateLimitScope, RateLimiterExt, RuleSet,
};
use ratelimit_container::{Backend, Container, ContainerConfig};
use ratelimit_redis::{
    CompactArgs, KeyLayout, RedisConfig, TOKEN_BUCKET_COMPACT_SCRIPT, TOKEN_BUCKET_SCRIPT,
};
use ratelimit_tests::redis_server::RedisServer;
use redis::Value;
use redis::aio::MultiplexedConnection;

use crate::load::{self, Checker, Identifiers, LoadResult, Outcome};
use crate::progress::Progress;
use crate::redis_path::{ENDPOINT, MAX_TOKENS, REFILL_RATE};
use crate::report::{Figure, Target, Unit};
use crate::stats::{self, median};
use crate::{BoxResult, Settings, redis_benchmark};

/// Task counts of figure 6.
pub(crate) const LEVELS: [usize; 4] = [1, 16, 64, 256];
/// The level with the CPU, redis-benchmark and throughput targets.
const TOP: usize = 64;
/// Buckets of the CPU figure on existing buckets (created by a warm-up).
const EXISTING: u64 = 20_000;

/// Progress steps of [`measure`].
pub(crate) fn steps(settings: &Settings) -> u64 {
    (rounds(settings) * LEVELS.len()) as u64 + 1
}

/// Paired rounds per level.
fn rounds(settings: &Settings) -> usize {
    (settings.pairs / 2).max(3)
}

/// What one contender measured at one level.
#[derive(Debug)]
struct Series {
    throughput: Vec<f64>,
    latency: Histogram<u64>,
    /// Redis CPU per check (µs), at [`TOP`] only: checks that create their bucket.
    cpu: Vec<f64>,
    /// The same, of checks whose bucket exists.
    cpu_existing: Vec<f64>,
}

impl Series {
    fn new() -> BoxResult<Self> {
        Ok(Self {
            throughput: Vec::new(),
            latency: stats::latency_histogram()?,
            cpu: Vec::new(),
            cpu_existing: Vec::new(),
        })
    }

    fn add(&mut self, run: &LoadResult) -> BoxResult<()> {
        self.throughput.push(run.throughput());
        self.latency.add(&run.latency)?;
        Ok(())
    }
}

/// One level: every contender, and the per-round ratios.
#[derive(Debug)]
struct Level {
    tasks: usize,
    adapter: Series,
    raw: Series,
    limitador: Series,
    adapter_vs_raw: Vec<f64>,
    adapter_vs_limitador: Vec<f64>,
    cpu_ratio: Vec<f64>,
    cpu_existing_ratio: Vec<f64>,
    /// Two-key adapter with coalescing / redis-benchmark on the two-key script.
    versus_rb: Vec<f64>,
    two_keys: Vec<f64>,
    rb: Vec<f64>,
}

/// The default layout's single script, one `EVALSHA` per check, nothing around it.
#[derive(Debug, Clone)]
struct RawChecker {
    conn: MultiplexedConnection,
    sha: Arc<str>,
    layout: KeyLayout,
    ttl: u64,
}

impl Checker for RawChecker {
    async fn check(&self, identifier: &str) -> BoxResult<Outcome> {
        let base = format!("rate_limit:ip:{identifier}:{ENDPOINT}");
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&*self.sha);
        if self.layout == KeyLayout::Compact {
            cmd.arg(1)
                .arg(format!("{base}:tb"))
                .arg(CompactArgs::new(MAX_TOKENS, REFILL_RATE, 1, self.ttl).as_bytes());
        } else {
            cmd.arg(2)
                .arg(format!("{base}:tokens"))
                .arg(format!("{base}:time"))
                .arg(MAX_TOKENS)
                .arg(REFILL_RATE)
                .arg(1)
                .arg("");
        }
        let mut conn = self.conn.clone();
        match cmd.query_async::<Value>(&mut conn).await? {
            Value::Int(_) => Ok(Outcome::Allowed),
            Value::Array(items) => match items.first() {
                Some(Value::Int(1)) => Ok(Outcome::Allowed),
                Some(Value::Int(0)) => Ok(Outcome::Denied),
                other => Err(format!("unexpected script reply {other:?}").into()),
            },
            other => Err(format!("unexpected script reply {other:?}").into()),
        }
    }
}

/// The adapter as services call it.
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

fn rules() -> BoxResult<RuleSet> {
    Ok(RuleSet::try_from_rules([(
        ENDPOINT,
        RateLimitRule::new(RateLimitScope::Ip, MAX_TOKENS, REFILL_RATE)?,
    )])?)
}

/// An adapter as the container builds it; `config` `None` for the default settings with
/// coalescing on.
async fn adapter(url: &str, config: Option<RedisConfig>) -> BoxResult<AdapterChecker> {
    let config = config.unwrap_or_else(|| RedisConfig::new(url).with_coalescing(true));
    let container = ContainerConfig::redis(url, rules()?)
        .with_event_logging(false)
        .with_backend(Backend::Redis(config));
    Ok(AdapterChecker(
        Container::build(container).await?.rate_limiter(),
    ))
}

/// Seconds of CPU the redis-server process has used so far, user and system (`INFO cpu`).
fn server_cpu_seconds(server: &RedisServer) -> BoxResult<f64> {
    let text: String = redis::from_redis_value(server.cmd(redis::cmd("INFO").arg("cpu")))?;
    let field = |name: &str| -> BoxResult<f64> {
        crate::redis_cost::info_field(&text, name)
            .and_then(|value| value.parse::<f64>().ok())
            .ok_or_else(|| format!("no {name} in INFO cpu").into())
    };
    Ok(field("used_cpu_user")? + field("used_cpu_sys")?)
}

/// Runs `checker`, refusing runs that failed open or were denied; with `cpu`, returns the
/// microseconds of redis-server CPU per check too (see the module docs).
async fn run<C: Checker>(
    server: &RedisServer,
    what: &str,
    checker: &C,
    tasks: usize,
    time: Duration,
    seed: u64,
    cpu: bool,
) -> BoxResult<(LoadResult, Option<f64>)> {
    run_on(
        server,
        what,
        checker,
        tasks,
        time,
        seed,
        cpu,
        &Identifiers::Random,
    )
    .await
}

/// [`run`] on the given identifiers.
#[allow(clippy::too_many_arguments)]
async fn run_on<C: Checker>(
    server: &RedisServer,
    what: &str,
    checker: &C,
    tasks: usize,
    time: Duration,
    seed: u64,
    cpu: bool,
    identifiers: &Identifiers,
) -> BoxResult<(LoadResult, Option<f64>)> {
    let before = if cpu {
        Some(server_cpu_seconds(server)?)
    } else {
        None
    };
    let result = load::run(checker, tasks, time, identifiers, seed).await?;
    if result.failed_open > 0 || result.denied > 0 {
        return Err(format!(
            "{what}, {tasks} tasks: {} checks failed open and {} were denied; the figure \
             would be meaningless",
            result.failed_open, result.denied
        )
        .into());
    }
    let per_check = match before {
        Some(before) => Some((server_cpu_seconds(server)? - before) * 1e6 / result.checks as f64),
        None => None,
    };
    Ok((result, per_check))
}

/// Figure 6. See the module docs.
pub(crate) async fn measure(
    server: &RedisServer,
    settings: &Settings,
    progress: &Progress,
) -> BoxResult<Vec<Figure>> {
    let url = server.url();
    let layout = RedisConfig::new(url.as_str()).layout;
    let script = match layout {
        KeyLayout::Compact => TOKEN_BUCKET_COMPACT_SCRIPT,
        _ => TOKEN_BUCKET_SCRIPT,
    };
    let sha: Arc<str> = load_script(server, script)?;
    let two_key_sha = load_script(server, TOKEN_BUCKET_SCRIPT)?;
    let ttl =
        RateLimitRule::new(RateLimitScope::Ip, MAX_TOKENS, REFILL_RATE)?.storage_ttl_seconds();
    let limitador = crate::limitador::Driver::find();
    if let Err(why) = &limitador {
        progress.note(format!("limitador: {why}"));
    }
    let two_keys_config = || {
        RedisConfig::new(url.as_str())
            .with_layout(KeyLayout::TwoKeys)
            .with_coalescing(true)
    };
    progress.begin("coalesced checks: warming up");
    let warm = adapter(&url, None).await?;
    load::run(
        &warm,
        64,
        Duration::from_millis(300),
        &Identifiers::Random,
        3,
    )
    .await?;
    let warm = adapter(&url, Some(two_keys_config())).await?;
    load::run(
        &warm,
        64,
        Duration::from_millis(300),
        &Identifiers::Random,
        4,
    )
    .await?;
    progress.done();

    let time = settings.pair_round;
    let mut levels = Vec::new();
    for tasks in LEVELS {
        let mut level = Level {
            tasks,
            adapter: Series::new()?,
            raw: Series::new()?,
            limitador: Series::new()?,
            adapter_vs_raw: Vec::new(),
            adapter_vs_limitador: Vec::new(),
            cpu_ratio: Vec::new(),
            cpu_existing_ratio: Vec::new(),
            versus_rb: Vec::new(),
            two_keys: Vec::new(),
            rb: Vec::new(),
        };
        let top = tasks == TOP;
        for round in 0..rounds(settings) {
            progress.begin(format!(
                "coalesced checks, {tasks} task(s): round {}/{}",
                round + 1,
                rounds(settings)
            ));
            // Fresh connections for every contender, every round.
            let adapter_checker = adapter(&url, None).await?;
            let raw_checker = RawChecker {
                conn: redis::Client::open(url.as_str())?
                    .get_multiplexed_async_connection()
                    .await?,
                sha: Arc::clone(&sha),
                layout,
                ttl,
            };
            let seed = 60_000 + (tasks * 100 + round) as u64;
            let contenders = if top { 5 } else { 3 };
            let (mut a, mut r, mut l, mut two, mut rb) = (None, None, None, None, None);
            for step in 0..contenders {
                match (step + round) % contenders {
                    0 => {
                        a = Some(
                            run(server, "adapter", &adapter_checker, tasks, time, seed, top)
                                .await?,
                        );
                    }
                    1 => {
                        r = Some(
                            run(server, "raw EVALSHA", &raw_checker, tasks, time, seed, top)
                                .await?,
                        );
                    }
                    2 => {
                        if let Ok(driver) = &limitador {
                            l = Some(driver.run(&url, tasks, time, seed)?);
                        }
                    }
                    3 => {
                        let checker = adapter(&url, Some(two_keys_config())).await?;
                        let (result, _) = run(
                            server,
                            "adapter (two keys)",
                            &checker,
                            tasks,
                            time,
                            seed,
                            false,
                        )
                        .await?;
                        two = Some(result.throughput());
                    }
                    _ => {
                        // Sized from the two-key adapter's pace, to run about as long.
                        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                        let requests = (two.unwrap_or(40_000.0) * time.as_secs_f64()) as u64;
                        let sha = two_key_sha.to_string();
                        let port = server.port();
                        rb = tokio::task::spawn_blocking(move || {
                            redis_benchmark::run(port, &sha, requests.clamp(10_000, 400_000))
                        })
                        .await??;
                    }
                }
            }
            if top {
                // Redis CPU per check of existing buckets: a warm-up creates them all first.
                let existing = Identifiers::RandomOf(EXISTING);
                let short = Duration::from_millis(150);
                load::run(&raw_checker, tasks, short, &existing, seed ^ 5).await?;
                // One after the other: each counts the whole server's CPU over its run.
                let (_, adapter_cpu) = run_on(
                    server,
                    "adapter",
                    &adapter_checker,
                    tasks,
                    short,
                    seed,
                    true,
                    &existing,
                )
                .await?;
                let (_, raw_cpu) = run_on(
                    server,
                    "raw EVALSHA",
                    &raw_checker,
                    tasks,
                    short,
                    seed,
                    true,
                    &existing,
                )
                .await?;
                if let (Some(a), Some(r)) = (adapter_cpu, raw_cpu) {
                    level.adapter.cpu_existing.push(a);
                    level.raw.cpu_existing.push(r);
                    level.cpu_existing_ratio.push(a / r);
                }
            }
            if let (Some((a, a_cpu)), Some((r, r_cpu))) = (&a, &r) {
                level.adapter.add(a)?;
                level.raw.add(r)?;
                level.adapter_vs_raw.push(a.throughput() / r.throughput());
                if let (Some(a_cpu), Some(r_cpu)) = (a_cpu, r_cpu) {
                    level.adapter.cpu.push(*a_cpu);
                    level.raw.cpu.push(*r_cpu);
                    level.cpu_ratio.push(a_cpu / r_cpu);
                }
                if let Some(l) = &l {
                    level.limitador.throughput.push(l.throughput);
                    level.limitador.latency.add(&l.latency)?;
                    level
                        .adapter_vs_limitador
                        .push(a.throughput() / l.throughput);
                }
                if let (Some(two), Some(rb)) = (two, rb) {
                    level.two_keys.push(two);
                    level.rb.push(rb);
                    level.versus_rb.push(two / rb);
                }
            }
            progress.done();
        }
        levels.push(level);
    }
    Ok(figures(&levels, layout, limitador.err()))
}

fn load_script(server: &RedisServer, script: &str) -> BoxResult<Arc<str>> {
    let sha: String =
        redis::from_redis_value(server.cmd(redis::cmd("SCRIPT").arg("LOAD").arg(script)))?;
    Ok(sha.into())
}

fn figures(levels: &[Level], layout: KeyLayout, limitador_missing: Option<String>) -> Vec<Figure> {
    let mut out = Vec::new();
    for level in levels {
        let c = level.tasks;
        let tasks = if c == 1 {
            "1 task".to_owned()
        } else {
            format!("{c} tasks")
        };
        let throughput = Figure::new(
            format!("coalesced.adapter.c{c}.checks_per_s"),
            format!("Coalesced: adapter, coalescing on, {tasks}"),
            median(&level.adapter.throughput),
            Unit::PerSecond,
            format!("raw EVALSHA per check ({layout}), {tasks}"),
            Some(median(&level.raw.throughput)),
        )
        .ratio(median(&level.adapter_vs_raw));
        out.push(if c == TOP {
            throughput.target(Target::RatioAtLeast(2.0))
        } else {
            throughput
        });
        for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
            let figure = Figure::new(
                format!("coalesced.adapter.c{c}.{name}_us"),
                format!("Coalesced: adapter {name} latency, {tasks}"),
                stats::quantile_us(&level.adapter.latency, q),
                Unit::Micros,
                format!("raw EVALSHA {name}, {tasks}"),
                Some(stats::quantile_us(&level.raw.latency, q)),
            );
            out.push(match (c, name) {
                (1, "p50") => figure.target(Target::RatioAtMost(1.1)),
                (TOP, "p99") => figure.target(Target::RatioAtMost(1.0)),
                _ => figure,
            });
        }
        let peer = Figure::new(
            format!("coalesced.adapter.c{c}.vs_limitador"),
            format!("Coalesced: adapter, {tasks}"),
            median(&level.adapter.throughput),
            Unit::PerSecond,
            format!("limitador 0.14, Redis storage, {tasks}"),
            (!level.limitador.throughput.is_empty()).then(|| median(&level.limitador.throughput)),
        );
        out.push(match &limitador_missing {
            Some(why) => peer.target(Target::Note(why.clone())),
            None => {
                let peer = peer.ratio(median(&level.adapter_vs_limitador));
                if c == TOP {
                    peer.target(Target::RatioAtLeast(2.0))
                } else {
                    peer
                }
            }
        });
        if limitador_missing.is_none() {
            for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
                out.push(Figure::new(
                    format!("coalesced.limitador.c{c}.{name}_us"),
                    format!("Coalesced: limitador {name} latency, {tasks}"),
                    stats::quantile_us(&level.limitador.latency, q),
                    Unit::Micros,
                    format!("adapter {name}, {tasks}"),
                    Some(stats::quantile_us(&level.adapter.latency, q)),
                ));
            }
        }
        if c == TOP {
            out.push(
                Figure::new(
                    format!("coalesced.adapter.c{c}.redis_cpu_us"),
                    format!("Coalesced: Redis CPU per check creating its bucket, adapter, {tasks}"),
                    median(&level.adapter.cpu),
                    Unit::Micros,
                    format!("one EVALSHA per check ({layout}), same rounds, redis-server CPU"),
                    Some(median(&level.raw.cpu)),
                )
                .ratio(median(&level.cpu_ratio)),
            );
            out.push(
                Figure::new(
                    format!("coalesced.adapter.c{c}.redis_cpu_existing_us"),
                    format!(
                        "Coalesced: Redis CPU per check of an existing bucket, adapter, {tasks}"
                    ),
                    median(&level.adapter.cpu_existing),
                    Unit::Micros,
                    format!(
                        "one EVALSHA per check ({layout}), existing buckets, same rounds, \
                         redis-server CPU"
                    ),
                    Some(median(&level.raw.cpu_existing)),
                )
                .ratio(median(&level.cpu_existing_ratio))
                .target(Target::RatioAtMost(0.5)),
            );
            let rb = "redis-benchmark -c 64 -P 16, two-key script, same rounds";
            let figure = Figure::new(
                format!("coalesced.two_keys.c{c}.vs_redis_benchmark"),
                format!("Coalesced: adapter, two-key layout, {tasks}"),
                median(&level.two_keys),
                Unit::PerSecond,
                rb,
                (!level.rb.is_empty()).then(|| median(&level.rb)),
            );
            out.push(if level.versus_rb.is_empty() {
                figure.target(Target::Note("redis-benchmark not installed".to_owned()))
            } else {
                figure
                    .ratio(median(&level.versus_rb))
                    .target(Target::RatioAtLeast(1.3))
            });
        }
    }
    out
}

/// `just bench coalesced`: figure 6 alone, on its own throwaway Redis; `Ok(true)` when no
/// target was missed.
pub(crate) fn run_alone(quick: bool, _strict: bool) -> BoxResult<bool> {
    let settings = Settings::new(quick);
    let progress = Progress::new(steps(&settings));
    progress.begin("starting redis-server");
    let server = RedisServer::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let figures = runtime.block_on(measure(&server, &settings, &progress))?;
    progress.finish();
    drop(runtime);
    drop(server);
    println!(
        "ratelimit-bench coalesced, {} run. Every ratio is value / baseline, both measured in \
         this run.\n",
        if quick { "quick" } else { "full" }
    );
    print!("{}", crate::report::table(&figures));
    let failed = figures
        .iter()
        .filter(|f| f.verdict() == crate::report::Verdict::Fail)
        .count();
    println!("targets: {failed} failed");
    Ok(failed == 0)
}

/// Runs a command and returns its stdout.
pub(crate) fn output(cmd: &mut Command) -> BoxResult<String> {
    let out = cmd.output()?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8(out.stdout)?)
}
