//! A reproducible fault-injection run against real, throwaway `redis-server` processes.
//!
//! For each fault (and a baseline without one) it starts a fresh Redis, builds the limiter with
//! the default container configuration (fail-open, `check_timeout` 50 ms, default pool, circuit
//! breaker), runs a steady load of 4 concurrent tasks checking in a loop, and injects the fault
//! after 1 s, heals it 2 s later and keeps the load on for 2 s more. Every check's latency and
//! decision source is recorded. The result is printed as a Markdown table and written into
//! `docs/reliability.md`, between the `<!-- chaos:begin -->` and `<!-- chaos:end -->` markers
//! (the rest of the file is kept).
//!
//! ```text
//! just chaos
//! # which runs
//! cargo run --release -q -p ratelimit-tests --example chaos
//! ```
//!
//! Needs `redis-server` on `PATH` (or `REDIS_SERVER_BIN`); it takes about 45 s. Progress goes
//! to stderr, the table to stdout. It fails (after writing the table) if limiting did not
//! resume after some fault.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::BTreeMap;
use std::error::Error;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ratelimit_container::{Backend, CircuitBreakerConfig, Container, ContainerConfig, RedisConfig};
use ratelimit_domain::{DynRateLimiter, RateLimitRule, RateLimitScope, RateLimiterExt, RuleSet};
use ratelimit_tests::redis_server::{RedisServer, free_port, kill_normal_clients, unique_prefix};
use ratelimit_tests::report;

type Res<T> = Result<T, Box<dyn Error>>;

/// Load before the fault.
const BEFORE: Duration = Duration::from_secs(1);
/// How long the fault lasts.
const DURING: Duration = Duration::from_secs(2);
/// Load after the heal.
const AFTER: Duration = Duration::from_secs(2);
/// Concurrent checking tasks.
const TASKS: usize = 4;
/// Pause after each check of a task.
const PACE: Duration = Duration::from_millis(1);
const ENDPOINT: &str = "GET /api/v1/items";
const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/reliability.md");
const BEGIN: &str = "<!-- chaos:begin -->";
const END: &str = "<!-- chaos:end -->";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Baseline,
    Kill,
    Pause,
    ClientKill,
    ScriptFlush,
    OutOfMemory,
    ReadOnly,
    Unreachable,
}

impl Fault {
    const ALL: [Self; 8] = [
        Self::Baseline,
        Self::Kill,
        Self::Pause,
        Self::ClientKill,
        Self::ScriptFlush,
        Self::OutOfMemory,
        Self::ReadOnly,
        Self::Unreachable,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Baseline => "baseline (no fault)",
            Self::Kill => "killed (SIGKILL), restarted empty",
            Self::Pause => "paused (SIGSTOP), then SIGCONT",
            Self::ClientKill => "CLIENT KILL of the pool's connections, every 250 ms",
            Self::ScriptFlush => "SCRIPT FLUSH under load, every 100 ms",
            Self::OutOfMemory => "out of memory (maxmemory below usage, noeviction), then DEL",
            Self::ReadOnly => "read-only (REPLICAOF a dead master), then REPLICAOF NO ONE",
            Self::Unreachable => "unreachable from start-up, then Redis started",
        }
    }

    fn server_args(self) -> &'static [&'static str] {
        match self {
            Self::OutOfMemory => &["--maxmemory-policy", "noeviction"],
            _ => &[],
        }
    }

    /// Faults that act once and are repeated for as long as the fault lasts.
    fn repeat_every(self) -> Option<Duration> {
        match self {
            Self::ClientKill => Some(Duration::from_millis(250)),
            Self::ScriptFlush => Some(Duration::from_millis(100)),
            _ => None,
        }
    }

    fn inject(self, server: &mut RedisServer) -> Res<()> {
        match self {
            Self::Baseline | Self::Unreachable => {}
            Self::Kill => server.kill(),
            Self::Pause => server.pause(),
            Self::ClientKill => {
                command(server, &kill_normal_clients())?;
            }
            Self::ScriptFlush => {
                command(server, redis::cmd("SCRIPT").arg("FLUSH"))?;
            }
            Self::OutOfMemory => {
                let filler = "x".repeat(4 * 1024 * 1024);
                command(server, redis::cmd("SET").arg("chaos:filler").arg(filler))?;
                command(
                    server,
                    redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("2mb"),
                )?;
            }
            Self::ReadOnly => {
                let dead = free_port();
                command(server, redis::cmd("REPLICAOF").arg("127.0.0.1").arg(dead))?;
            }
        }
        Ok(())
    }

    fn heal(self, server: &mut RedisServer) -> Res<()> {
        match self {
            Self::Baseline | Self::ClientKill | Self::ScriptFlush => {}
            Self::Kill | Self::Unreachable => server.restart(),
            Self::Pause => server.resume(),
            Self::OutOfMemory => {
                command(server, redis::cmd("DEL").arg("chaos:filler"))?;
            }
            Self::ReadOnly => {
                command(server, redis::cmd("REPLICAOF").arg("NO").arg("ONE"))?;
            }
        }
        Ok(())
    }
}

/// One command on a connection of its own.
fn command(server: &RedisServer, cmd: &redis::Cmd) -> Res<redis::Value> {
    let client = redis::Client::open(server.url())?;
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(2))?;
    Ok(cmd.query(&mut conn)?)
}

/// One check, as a load task saw it.
#[derive(Debug, Clone, Copy)]
struct Check {
    started: Instant,
    latency: Duration,
    source: &'static str,
}

impl Check {
    fn finished(&self) -> Instant {
        self.started + self.latency
    }
}

/// What one fault's run came to.
#[derive(Debug)]
struct Outcome {
    fault: Fault,
    checks: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
    sources: BTreeMap<&'static str, usize>,
    /// From the heal to the completion of the first check started after it that the store
    /// decided.
    resumed_after: Option<Duration>,
}

fn main() -> Res<()> {
    let machine = report::machine_facts();
    eprintln!("[chaos] {machine}");
    let mut outcomes = Vec::new();
    for fault in Fault::ALL {
        outcomes.push(run(fault)?);
    }
    let section = render(&machine, &outcomes);
    println!("{section}");
    report::write_between_markers(DOC, BEGIN, END, &section)?;
    eprintln!("[chaos] wrote {DOC}");
    let stuck: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.resumed_after.is_none())
        .map(|o| o.fault.name())
        .collect();
    if stuck.is_empty() {
        Ok(())
    } else {
        Err(format!("limiting did not resume within {AFTER:?} after: {stuck:?}").into())
    }
}

fn rules() -> Res<RuleSet> {
    // Ample, so that the table is about who decided, not about the limit being reached.
    let rule = RateLimitRule::new(RateLimitScope::Ip, 100_000, 6_000_000.0)?;
    Ok(RuleSet::try_from_rules([(ENDPOINT, rule)])?)
}

fn run(fault: Fault) -> Res<Outcome> {
    let name = fault.name();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut server = RedisServer::start_with_args(fault.server_args());
    if fault == Fault::Unreachable {
        // Nothing listens on the port until the heal starts Redis there.
        server.kill();
    }
    eprintln!("[chaos] {name}: redis on {}", server.url());
    // The default container configuration, spelled out so that the table states it truly.
    let config = ContainerConfig::redis(server.url(), rules()?)
        .with_backend(Backend::Redis(RedisConfig::new(server.url())))
        .with_circuit_breaker(Some(CircuitBreakerConfig::default()))
        .with_key_prefix(unique_prefix())
        .with_event_logging(false);
    let limiter = rt.block_on(Container::build(config))?.rate_limiter();

    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            rt.spawn(load(
                limiter.clone(),
                format!("10.0.0.{task}"),
                stop.clone(),
            ))
        })
        .collect();
    let start = Instant::now();
    std::thread::sleep(BEFORE);

    let fault_start = Instant::now();
    eprintln!(
        "[chaos] {name}: injecting at {:.2} s",
        secs(start, fault_start)
    );
    fault.inject(&mut server)?;
    let fault_end = fault_start + DURING;
    if let Some(every) = fault.repeat_every() {
        let mut next = fault_start + every;
        while next < fault_end {
            sleep_until(next);
            fault.inject(&mut server)?;
            next += every;
        }
    }
    sleep_until(fault_end);
    fault.heal(&mut server)?;
    let healed = Instant::now();
    eprintln!("[chaos] {name}: healed at {:.2} s", secs(start, healed));
    std::thread::sleep(AFTER);
    stop.store(true, Ordering::Relaxed);

    let mut checks = Vec::new();
    for task in tasks {
        checks.extend(rt.block_on(task)?);
    }
    drop(limiter);
    rt.shutdown_timeout(Duration::from_secs(1));
    drop(server);

    let outcome = summarize(fault, &checks, fault_start, healed);
    eprintln!(
        "[chaos] {name}: {} checks in all, {} during the fault ({}), resumed after {}",
        checks.len(),
        outcome.checks,
        sources_text(&outcome.sources),
        outcome
            .resumed_after
            .map_or_else(|| "never".to_owned(), millis)
    );
    Ok(outcome)
}

/// One task of the steady load: check, pause, repeat, until told to stop.
async fn load(limiter: DynRateLimiter, ip: String, stop: Arc<AtomicBool>) -> Vec<Check> {
    let mut checks = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let result = limiter.is_allowed(ENDPOINT, &ip).await;
        let latency = started.elapsed();
        let source = match result {
            Ok(result) => result.source.as_str(),
            Err(_) => "error",
        };
        checks.push(Check {
            started,
            latency,
            source,
        });
        tokio::time::sleep(PACE).await;
    }
    checks
}

fn summarize(fault: Fault, checks: &[Check], fault_start: Instant, healed: Instant) -> Outcome {
    let during: Vec<&Check> = checks
        .iter()
        .filter(|c| c.started >= fault_start && c.started < healed)
        .collect();
    let mut latencies: Vec<Duration> = during.iter().map(|c| c.latency).collect();
    latencies.sort_unstable();
    let mut sources = BTreeMap::new();
    for check in &during {
        *sources.entry(check.source).or_insert(0) += 1;
    }
    let resumed_after = checks
        .iter()
        .filter(|c| c.started >= healed && c.source == "store")
        .map(Check::finished)
        .min()
        .map(|at| at.duration_since(healed));
    Outcome {
        fault,
        checks: during.len(),
        p50: percentile(&latencies, 50),
        p99: percentile(&latencies, 99),
        max: latencies.last().copied().unwrap_or_default(),
        sources,
        resumed_after,
    }
}

/// The `pct`-th percentile (nearest rank) of sorted values; zero for none.
fn percentile(sorted: &[Duration], pct: usize) -> Duration {
    let rank = (sorted.len() * pct).div_ceil(100).saturating_sub(1);
    sorted.get(rank).copied().unwrap_or_default()
}

fn sleep_until(at: Instant) {
    let now = Instant::now();
    if at > now {
        std::thread::sleep(at - now);
    }
}

fn secs(from: Instant, to: Instant) -> f64 {
    to.duration_since(from).as_secs_f64()
}

fn millis(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 1.0 {
        format!("{} µs", d.as_micros())
    } else if ms < 10.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

/// `store 12 · fail_open 3456`, the store first.
fn sources_text(sources: &BTreeMap<&'static str, usize>) -> String {
    let mut parts: Vec<String> = sources
        .get("store")
        .map(|n| format!("store {n}"))
        .into_iter()
        .collect();
    parts.extend(
        sources
            .iter()
            .filter(|(source, _)| **source != "store")
            .map(|(source, n)| format!("{source} {n}")),
    );
    if parts.is_empty() {
        "none".to_owned()
    } else {
        parts.join(" · ")
    }
}

fn render(machine: &str, outcomes: &[Outcome]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "_Generated by `just chaos`: {machine}._");
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Limiter: default container configuration (fail-open, `check_timeout` 50 ms, pool of {}, \
         breaker opening after 5 consecutive failures and probing every 500 ms). Load: {TASKS} \
         tasks, each checking in a loop with a {} ms pause. Timeline per fault: {} s of load, \
         {} s of fault, heal, {} s of load.",
        ratelimit_redis::RedisConfig::DEFAULT_POOL_SIZE,
        PACE.as_millis(),
        BEFORE.as_secs(),
        DURING.as_secs(),
        AFTER.as_secs()
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| Fault | Checks during | Latency during: p50 / p99 / max | Decisions during | Limiting resumed after |"
    );
    let _ = writeln!(out, "|---|--:|---|---|--:|");
    for o in outcomes {
        let _ = writeln!(
            out,
            "| {} | {} | {} / {} / {} | {} | {} |",
            o.fault.name(),
            o.checks,
            millis(o.p50),
            millis(o.p99),
            millis(o.max),
            sources_text(&o.sources),
            o.resumed_after
                .map_or_else(|| "**not within 2 s**".to_owned(), millis)
        );
    }
    out
}
