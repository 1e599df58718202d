//! Figure 1 (the Redis path) and figure 4 (a deny flood).
//!
//! The adapter — built by the container as a service gets it, event logging off, in the two-key
//! layout with one script call per check (coalescing off; figure 6 has the compact layout with coalescing on) —
//! against a raw baseline: the same `EVALSHA` (same script, same keys, same arguments) over one
//! redis-rs multiplexed connection, with the same number of tasks, from the same process.
//! Rounds pair raw and adapter back to back so that both see the same machine, and every round
//! opens fresh connections for both: a connection keeps its socket, its driver task and how the
//! scheduler placed them for as long as it lives, and on a shared 2-core machine that placement
//! alone moved a whole run's adapter/raw ratio by ±10% when the two kept theirs for the run.

use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use ratelimit_adapter::domain::KeyBuilder;
use ratelimit_adapter::{
    DecisionSource, DynRateLimiter, RateLimitRule, RateLimitScope, RateLimiterExt, RuleSet,
};
use ratelimit_container::{Backend, Container, ContainerConfig};
use ratelimit_redis::{KeyLayout, RedisConfig, TOKEN_BUCKET_SCRIPT};
use redis::Value;
use redis::aio::MultiplexedConnection;

use crate::load::{self, Checker, Identifiers, LoadResult, Outcome};
use crate::progress::Progress;
use crate::report::{Figure, Target, Unit};
use crate::stats::{self, median};
use crate::{BoxResult, Settings, redis_benchmark};

/// The endpoint every allowed check goes to.
pub(crate) const ENDPOINT: &str = "POST /bench";
/// The endpoint of the deny flood: one token, (almost) never refilled.
const DENY_ENDPOINT: &str = "POST /bench/deny";
/// Large enough that no check in a run is ever denied.
pub(crate) const MAX_TOKENS: u64 = 1_000_000_000;
/// Tokens per minute.
pub(crate) const REFILL_RATE: f64 = 1_000_000_000.0;
/// The task counts of figure 1.
pub(crate) const CONCURRENCY: [usize; 3] = [1, 16, 64];
/// The task count of the deny flood.
const DENY_CONCURRENCY: usize = 16;

/// One concurrency level of figure 1, every round merged.
#[derive(Debug)]
pub(crate) struct Level {
    /// Tasks.
    pub(crate) concurrency: usize,
    /// Raw checks/s per round.
    pub(crate) raw: Vec<f64>,
    /// Adapter checks/s per round.
    pub(crate) adapter: Vec<f64>,
    /// Adapter / raw per round (paired: the two runs of a round are back to back).
    pub(crate) ratios: Vec<f64>,
    /// Raw latencies, all rounds.
    pub(crate) raw_latency: Histogram<u64>,
    /// Adapter latencies, all rounds.
    pub(crate) adapter_latency: Histogram<u64>,
}

impl Level {
    /// Median raw checks/s.
    pub(crate) fn raw_throughput(&self) -> f64 {
        median(&self.raw)
    }

    /// Median adapter checks/s.
    pub(crate) fn adapter_throughput(&self) -> f64 {
        median(&self.adapter)
    }
}

/// The limiter and the raw connection, shared by figures 1 and 4.
#[derive(Debug)]
pub(crate) struct Targets {
    url: String,
    rules: RuleSet,
    adapter: AdapterChecker,
    /// The same adapter with a local deny cache (`ContainerConfig::with_deny_cache`).
    cached: DynRateLimiter,
    raw: RawChecker,
    /// Checks that failed open across the run (they should not happen on a healthy Redis).
    pub(crate) failed_open: u64,
}

impl Targets {
    /// Builds the adapter through the container (event logging off) and opens the raw
    /// connection; loads the script for the raw `EVALSHA`.
    pub(crate) async fn connect(url: &str) -> BoxResult<Self> {
        let rules = RuleSet::try_from_rules([
            (
                ENDPOINT,
                RateLimitRule::new(RateLimitScope::Ip, MAX_TOKENS, REFILL_RATE)?,
            ),
            (
                DENY_ENDPOINT,
                RateLimitRule::new(RateLimitScope::Ip, 1, 0.000_1)?,
            ),
        ])?;
        // The raw baseline builds the adapter's keys by hand; make sure they are the same.
        let key = KeyBuilder::new(KeyBuilder::DEFAULT_PREFIX, RateLimitScope::Ip, ENDPOINT)?
            .key("203.0.113.9")?;
        if key.as_str() != raw_base("203.0.113.9") {
            return Err(format!(
                "the raw baseline's key {:?} is not the adapter's {:?}",
                raw_base("203.0.113.9"),
                key.as_str()
            )
            .into());
        }
        let cached = Container::build(
            ContainerConfig::redis(url, rules.clone())
                .with_backend(one_call_per_check(url))
                .with_event_logging(false)
                .with_deny_cache(10_000),
        )
        .await?
        .rate_limiter();
        let mut conn = redis::Client::open(url)?
            .get_multiplexed_async_connection()
            .await?;
        let sha: String = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(TOKEN_BUCKET_SCRIPT)
            .query_async(&mut conn)
            .await?;
        let expected = redis::Script::new(TOKEN_BUCKET_SCRIPT);
        if sha != expected.get_hash() {
            return Err(format!(
                "SCRIPT LOAD returned {sha}, expected {}",
                expected.get_hash()
            )
            .into());
        }
        Ok(Self {
            url: url.to_owned(),
            adapter: AdapterChecker {
                limiter: Self::adapter(url, &rules).await?,
                endpoint: ENDPOINT,
            },
            rules,
            cached,
            raw: RawChecker {
                conn,
                sha: sha.into(),
            },
            failed_open: 0,
        })
    }

    /// A new adapter, with a pool of its own.
    async fn adapter(url: &str, rules: &RuleSet) -> BoxResult<DynRateLimiter> {
        let config = ContainerConfig::redis(url, rules.clone())
            .with_backend(one_call_per_check(url))
            .with_event_logging(false);
        Ok(Container::build(config).await?.rate_limiter())
    }

    /// Replaces the adapter (and so its pool) and the raw connection with new ones, each of
    /// which has answered one check.
    async fn reconnect(&mut self) -> BoxResult<()> {
        self.adapter.limiter = Self::adapter(&self.url, &self.rules).await?;
        self.raw.conn = redis::Client::open(self.url.as_str())?
            .get_multiplexed_async_connection()
            .await?;
        let warm = Identifiers::Fixed("192.0.2.1".to_owned());
        let raw = load::run(&self.raw, 1, Duration::ZERO, &warm, 0).await?;
        let adapter = load::run(&self.adapter, 1, Duration::ZERO, &warm, 0).await?;
        self.failed_open += raw.failed_open + adapter.failed_open;
        Ok(())
    }

    /// A short run of each, so that connections are open and Redis is warm.
    pub(crate) async fn warm_up(&mut self) -> BoxResult<()> {
        let time = Duration::from_millis(300);
        let raw = load::run(&self.raw, 16, time, &Identifiers::Random, 1).await?;
        let adapter = load::run(&self.adapter, 16, time, &Identifiers::Random, 2).await?;
        self.failed_open += raw.failed_open + adapter.failed_open;
        Ok(())
    }

    /// Figure 1 at every concurrency level: `settings.pairs` paired rounds each, on fresh
    /// connections every round.
    pub(crate) async fn measure_levels(
        &mut self,
        settings: &Settings,
        progress: &Progress,
    ) -> BoxResult<Vec<Level>> {
        let mut levels = Vec::new();
        for concurrency in CONCURRENCY {
            let mut level = Level {
                concurrency,
                raw: Vec::new(),
                adapter: Vec::new(),
                ratios: Vec::new(),
                raw_latency: stats::latency_histogram()?,
                adapter_latency: stats::latency_histogram()?,
            };
            for round in 0..settings.pairs {
                progress.begin(format!(
                    "redis path, {concurrency} task(s): round {}/{}",
                    round + 1,
                    settings.pairs
                ));
                self.reconnect().await?;
                let seed = (concurrency * 100 + round) as u64;
                let time = settings.pair_round;
                // Alternate which goes first, so that drift during a round favours neither.
                let (raw, adapter) = if round % 2 == 0 {
                    let raw = self.run_raw(concurrency, time, seed).await?;
                    let adapter = self.run_adapter(concurrency, time, seed).await?;
                    (raw, adapter)
                } else {
                    let adapter = self.run_adapter(concurrency, time, seed).await?;
                    let raw = self.run_raw(concurrency, time, seed).await?;
                    (raw, adapter)
                };
                level.raw.push(raw.throughput());
                level.adapter.push(adapter.throughput());
                level.ratios.push(adapter.throughput() / raw.throughput());
                level.raw_latency.add(&raw.latency)?;
                level.adapter_latency.add(&adapter.latency)?;
                progress.done();
            }
            levels.push(level);
        }
        Ok(levels)
    }

    async fn run_raw(
        &mut self,
        concurrency: usize,
        time: Duration,
        seed: u64,
    ) -> BoxResult<LoadResult> {
        let result = load::run(&self.raw, concurrency, time, &Identifiers::Random, seed).await?;
        ensure_all_allowed("raw EVALSHA", &result)?;
        Ok(result)
    }

    async fn run_adapter(
        &mut self,
        concurrency: usize,
        time: Duration,
        seed: u64,
    ) -> BoxResult<LoadResult> {
        let result =
            load::run(&self.adapter, concurrency, time, &Identifiers::Random, seed).await?;
        self.failed_open += result.failed_open;
        ensure_all_allowed("adapter", &result)?;
        Ok(result)
    }

    /// Figure 4: one denied identifier checked by [`DENY_CONCURRENCY`] tasks (a client that
    /// ignores 429s) through an adapter with the local deny cache, against the same flood
    /// without it, in paired rounds.
    pub(crate) async fn deny_flood(
        &mut self,
        settings: &Settings,
        progress: &Progress,
    ) -> BoxResult<Figure> {
        let flood = AdapterChecker {
            limiter: self.adapter.limiter.clone(),
            endpoint: DENY_ENDPOINT,
        };
        let cached_flood = AdapterChecker {
            limiter: self.cached.clone(),
            endpoint: DENY_ENDPOINT,
        };
        let client = Identifiers::Fixed("198.51.100.7".to_owned());
        // Take the bucket's one token, so that every check from now on is denied.
        let _ = flood.check("198.51.100.7").await?;
        let mut denied = Vec::new();
        let mut allowed = Vec::new();
        let mut ratios = Vec::new();
        for round in 0..settings.rounds {
            progress.begin(format!(
                "deny flood, {DENY_CONCURRENCY} tasks: round {}/{}",
                round + 1,
                settings.rounds
            ));
            let seed = 9_000 + round as u64;
            let flood_run =
                load::run(&flood, DENY_CONCURRENCY, settings.round, &client, seed).await?;
            let cached_run = load::run(
                &cached_flood,
                DENY_CONCURRENCY,
                settings.round,
                &client,
                seed,
            )
            .await?;
            self.failed_open += flood_run.failed_open + cached_run.failed_open;
            for (name, run) in [("uncached", &flood_run), ("cached", &cached_run)] {
                if run.allowed > 0 || run.denied == 0 {
                    return Err(format!(
                        "the {name} deny flood was not denied: {} allowed, {} denied",
                        run.allowed, run.denied
                    )
                    .into());
                }
            }
            denied.push(cached_run.throughput());
            allowed.push(flood_run.throughput());
            ratios.push(cached_run.throughput() / flood_run.throughput());
            progress.done();
        }
        Ok(Figure::new(
            format!("redis.deny_flood.c{DENY_CONCURRENCY}.checks_per_s"),
            format!("Deny flood: one denied key, deny cache on, {DENY_CONCURRENCY} tasks"),
            median(&denied),
            Unit::PerSecond,
            "the same flood without the cache".to_owned(),
            Some(median(&allowed)),
        )
        .ratio(median(&ratios))
        .target(Target::RatioAtLeast(10.0)))
    }
}

/// The adapter and the raw baseline at 64 tasks against `redis-benchmark`, in paired rounds:
/// each round runs all three back to back (order rotating), so that each ratio compares runs
/// seconds apart.
#[derive(Debug, Default)]
pub(crate) struct VersusRedisBenchmark {
    /// redis-benchmark's requests/s per round.
    pub(crate) redis_benchmark: Vec<f64>,
    /// Adapter checks/s per round.
    pub(crate) adapter: Vec<f64>,
    /// Raw checks/s per round.
    pub(crate) raw: Vec<f64>,
    /// Adapter / redis-benchmark per round.
    pub(crate) adapter_ratios: Vec<f64>,
    /// Raw / redis-benchmark per round.
    pub(crate) raw_ratios: Vec<f64>,
}

impl VersusRedisBenchmark {
    /// Median requests/s of redis-benchmark.
    pub(crate) fn redis_benchmark_throughput(&self) -> f64 {
        median(&self.redis_benchmark)
    }
}

/// Tasks of the comparison with redis-benchmark (its `-c`).
const RB_CONCURRENCY: usize = 64;

impl Targets {
    /// `settings.rb_rounds` rounds of redis-benchmark, the adapter and the raw baseline at 64 tasks,
    /// each for about `settings.round` (redis-benchmark's request count is sized from its
    /// previous round, starting from `estimate` requests/s). `Ok(None)` when redis-benchmark
    /// is not installed.
    pub(crate) async fn versus_redis_benchmark(
        &mut self,
        port: u16,
        sha: &str,
        settings: &Settings,
        progress: &Progress,
        mut estimate: f64,
    ) -> BoxResult<Option<VersusRedisBenchmark>> {
        let mut out = VersusRedisBenchmark::default();
        for round in 0..settings.rb_rounds {
            progress.begin(format!(
                "redis-benchmark vs adapter vs raw, 64 tasks: round {}/{}",
                round + 1,
                settings.rb_rounds
            ));
            self.reconnect().await?;
            let (mut rb, mut adapter, mut raw) = (None, None, None);
            let seed = 7_000 + round as u64;
            for step in 0..3 {
                match (step + round) % 3 {
                    0 => {
                        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                        let requests = ((estimate * settings.round.as_secs_f64()) as u64)
                            .clamp(10_000, settings.rb_requests);
                        let sha = sha.to_owned();
                        let rps = tokio::task::spawn_blocking(move || {
                            redis_benchmark::run(port, &sha, requests)
                        })
                        .await??;
                        let Some(rps) = rps else {
                            return Ok(None);
                        };
                        estimate = rps;
                        rb = Some(rps);
                    }
                    1 => {
                        adapter = Some(
                            self.run_adapter(RB_CONCURRENCY, settings.round, seed)
                                .await?
                                .throughput(),
                        );
                    }
                    _ => {
                        raw = Some(
                            self.run_raw(RB_CONCURRENCY, settings.round, seed)
                                .await?
                                .throughput(),
                        );
                    }
                }
            }
            if let (Some(rb), Some(adapter), Some(raw)) = (rb, adapter, raw) {
                out.redis_benchmark.push(rb);
                out.adapter.push(adapter);
                out.raw.push(raw);
                out.adapter_ratios.push(adapter / rb);
                out.raw_ratios.push(raw / rb);
            }
            progress.done();
        }
        Ok(Some(out))
    }
}

/// Figure 1 as table rows.
pub(crate) fn figures(
    levels: &[Level],
    versus: Option<&VersusRedisBenchmark>,
    rb_note: &str,
) -> Vec<Figure> {
    let mut out = Vec::new();
    for level in levels {
        let c = level.concurrency;
        let tasks = if c == 1 {
            "1 task".to_owned()
        } else {
            format!("{c} tasks")
        };
        let throughput = Figure::new(
            format!("redis.adapter.c{c}.checks_per_s"),
            format!("Redis: adapter is_allowed, {tasks}"),
            level.adapter_throughput(),
            Unit::PerSecond,
            format!("raw EVALSHA, same process, {tasks}"),
            Some(level.raw_throughput()),
        )
        .ratio(median(&level.ratios));
        out.push(if c == 64 {
            throughput.target(Target::RatioAtLeast(0.9))
        } else {
            throughput
        });
        for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
            let figure = Figure::new(
                format!("redis.adapter.c{c}.{name}_us"),
                format!("Redis: adapter {name} latency, {tasks}"),
                stats::quantile_us(&level.adapter_latency, q),
                Unit::Micros,
                format!("raw EVALSHA {name}, {tasks}"),
                Some(stats::quantile_us(&level.raw_latency, q)),
            );
            out.push(if c == 1 && name == "p50" {
                figure.target(Target::RatioAtMost(1.2))
            } else {
                figure
            });
        }
    }
    let rb = "redis-benchmark -c 64 -P 16, same script, same rounds";
    match versus {
        Some(versus) => {
            out.push(
                Figure::new(
                    "redis.adapter.c64.vs_redis_benchmark",
                    "Redis: adapter is_allowed, 64 tasks",
                    median(&versus.adapter),
                    Unit::PerSecond,
                    rb,
                    Some(versus.redis_benchmark_throughput()),
                )
                .ratio(median(&versus.adapter_ratios))
                .target(Target::RatioAtLeast(0.8)),
            );
            out.push(
                Figure::new(
                    "redis.raw.c64.vs_redis_benchmark",
                    "Redis: raw EVALSHA, 64 tasks",
                    median(&versus.raw),
                    Unit::PerSecond,
                    rb,
                    Some(versus.redis_benchmark_throughput()),
                )
                .ratio(median(&versus.raw_ratios)),
            );
        }
        None => {
            if let Some(top) = levels.iter().find(|level| level.concurrency == 64) {
                out.push(
                    Figure::new(
                        "redis.adapter.c64.vs_redis_benchmark",
                        "Redis: adapter is_allowed, 64 tasks",
                        top.adapter_throughput(),
                        Unit::PerSecond,
                        rb,
                        None,
                    )
                    .target(Target::Note(rb_note.to_owned())),
                );
            }
        }
    }
    out
}

fn ensure_all_allowed(what: &str, result: &LoadResult) -> BoxResult<()> {
    if result.denied > 0 {
        return Err(format!(
            "{what}: {} of {} checks were denied; the benchmark's buckets are meant to be \
             distinct and never empty",
            result.denied, result.checks
        )
        .into());
    }
    Ok(())
}

/// The store of figures 1 and 4: the two-key layout, whose script the raw baseline and
/// redis-benchmark send, and one script call per check (coalescing off), so that the figure
/// isolates what the adapter adds to one call. Figure 6 (`coalesced`) measures the default
/// settings.
fn one_call_per_check(url: &str) -> Backend {
    Backend::Redis(
        RedisConfig::new(url)
            .with_layout(KeyLayout::TwoKeys)
            .with_coalescing(false),
    )
}

/// The adapter's key for the ip scope, built by hand: `rate_limit:ip:<identifier>:<endpoint>`.
fn raw_base(identifier: &str) -> String {
    format!("rate_limit:ip:{identifier}:{ENDPOINT}")
}

/// The adapter as services call it.
#[derive(Debug, Clone)]
struct AdapterChecker {
    limiter: DynRateLimiter,
    endpoint: &'static str,
}

impl Checker for AdapterChecker {
    async fn check(&self, identifier: &str) -> BoxResult<Outcome> {
        let result = self.limiter.is_allowed(self.endpoint, identifier).await?;
        Ok(match (result.allowed, result.source) {
            (_, DecisionSource::FailOpen) => Outcome::FailOpen,
            (true, _) => Outcome::Allowed,
            (false, _) => Outcome::Denied,
        })
    }
}

/// The baseline: the adapter's `EVALSHA`, byte for byte, with nothing around it.
#[derive(Debug, Clone)]
struct RawChecker {
    conn: MultiplexedConnection,
    sha: Arc<str>,
}

impl Checker for RawChecker {
    async fn check(&self, identifier: &str) -> BoxResult<Outcome> {
        let base = raw_base(identifier);
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&*self.sha)
            .arg(2)
            .arg(format!("{base}:tokens"))
            .arg(format!("{base}:time"))
            .arg(MAX_TOKENS)
            // As RedisStorage writes it (redis-rs formats an f64 with ryu).
            .arg(REFILL_RATE)
            .arg(1)
            .arg("");
        let mut conn = self.conn.clone();
        let reply: Value = cmd.query_async(&mut conn).await?;
        match reply {
            Value::Array(items) => match items.first() {
                Some(Value::Int(1)) => Ok(Outcome::Allowed),
                Some(Value::Int(0)) => Ok(Outcome::Denied),
                other => Err(format!("unexpected script reply {other:?}").into()),
            },
            other => Err(format!("unexpected script reply {other:?}").into()),
        }
    }
}
