//! Figure 5: several limits on one request.
//!
//! Three contenders over the same Redis, at [`CONCURRENCY`] tasks, in rotating rounds:
//!
//! - **single**: one per-client limit, one `EVALSHA` per check (the baseline);
//! - **two limits**: the same per-client limit plus a limit shared by everyone, checked all or
//!   nothing in one script call (`check_and_consume_all`);
//! - **separate**: the same two limits as two endpoints of one limit each, checked one after the
//!   other, as every peer does it (two round trips, and a request refused by the second limit
//!   has already paid the first).
//!
//! Redis CPU per check comes from `INFO commandstats` (`EVALSHA` microseconds over checks, stats
//! reset before each run). A last, deterministic scenario counts the tokens that refused
//! requests cost: 40 clients of 10 tokens each send 10 requests each against a shared limit of
//! 100; a token taken from a client's own bucket by a request that was refused is lost.

use std::time::Duration;

use ratelimit_adapter::{
    DecisionSource, DynRateLimiter, EndpointLimits, Limit, RateLimitRule, RateLimitScope,
    RateLimiterExt, RuleSet,
};
use ratelimit_container::{Backend, Container, ContainerConfig, KeyLayout, RedisConfig};
use ratelimit_tests::redis_server::RedisServer;

use crate::load::{self, Checker, Identifiers, LoadResult, Outcome};
use crate::progress::Progress;
use crate::redis_cost::info_field;
use crate::redis_path::{MAX_TOKENS, REFILL_RATE};
use crate::report::{Figure, Target, Unit};
use crate::stats::median;
use crate::{BoxResult, Settings};

/// Tasks of every run.
pub(crate) const CONCURRENCY: usize = 64;
const SINGLE: &str = "GET /bench/single";
const TWO: &str = "GET /bench/two";
const FIRST: &str = "GET /bench/per-client";
const SECOND: &str = "GET /bench/everyone";
/// The token-loss scenario's endpoints (small, never refilled within the run).
const LOSS_TWO: &str = "GET /bench/loss/two";
const LOSS_FIRST: &str = "GET /bench/loss/per-client";
const LOSS_SECOND: &str = "GET /bench/loss/everyone";
const LOSS_CLIENTS: usize = 40;
const LOSS_REQUESTS_PER_CLIENT: usize = 10;
const LOSS_OWN: u64 = 10;
const LOSS_SHARED: u64 = 100;
/// Tokens per minute of the loss scenario: one token in 10 minutes, nothing during the run.
const LOSS_RATE: f64 = 0.1;

/// The layouts measured, each with its own figures.
const LAYOUTS: [KeyLayout; 2] = [KeyLayout::Compact, KeyLayout::TwoKeys];

/// Progress steps of [`measure`].
pub(crate) fn steps(settings: &Settings) -> u64 {
    (settings.rounds as u64 + 1) * LAYOUTS.len() as u64
}

fn rules() -> BoxResult<RuleSet> {
    let own = |max, rate| RateLimitRule::new(RateLimitScope::Ip, max, rate);
    let shared = |max, rate| RateLimitRule::new(RateLimitScope::Global, max, rate);
    let two = |max_own, max_shared, rate| -> BoxResult<EndpointLimits> {
        Ok(EndpointLimits::new(vec![
            Limit::named("per-client", own(max_own, rate)?)?,
            Limit::named("everyone", shared(max_shared, rate)?)?,
        ])?)
    };
    let mut rules = RuleSet::new();
    rules.insert(SINGLE, own(MAX_TOKENS, REFILL_RATE)?)?;
    rules.insert_limits(TWO, two(MAX_TOKENS, MAX_TOKENS, REFILL_RATE)?)?;
    rules.insert(FIRST, own(MAX_TOKENS, REFILL_RATE)?)?;
    rules.insert(SECOND, shared(MAX_TOKENS, REFILL_RATE)?)?;
    rules.insert_limits(LOSS_TWO, two(LOSS_OWN, LOSS_SHARED, LOSS_RATE)?)?;
    rules.insert(LOSS_FIRST, own(LOSS_OWN, LOSS_RATE)?)?;
    rules.insert(LOSS_SECOND, shared(LOSS_SHARED, LOSS_RATE)?)?;
    Ok(rules)
}

/// Checks a request against `endpoints` one after the other, stopping at the first refusal:
/// one endpoint is an ordinary check, two are what a service does with two separate limits.
#[derive(Debug, Clone)]
struct Sequential {
    limiter: DynRateLimiter,
    endpoints: &'static [&'static str],
}

impl Checker for Sequential {
    async fn check(&self, identifier: &str) -> BoxResult<Outcome> {
        for endpoint in self.endpoints {
            let result = self.limiter.is_allowed(endpoint, identifier).await?;
            match (result.allowed, result.source) {
                (_, DecisionSource::FailOpen) => return Ok(Outcome::FailOpen),
                (true, _) => {}
                (false, _) => return Ok(Outcome::Denied),
            }
        }
        Ok(Outcome::Allowed)
    }
}

/// What each contender measured over all rounds.
#[derive(Debug, Default)]
struct Contender {
    throughput: Vec<f64>,
    cpu_per_check: Vec<f64>,
}

/// Microseconds Redis spent in `EVALSHA` since the last `CONFIG RESETSTAT`.
fn evalsha_usec(server: &RedisServer) -> BoxResult<f64> {
    let text: String = redis::from_redis_value(server.cmd(redis::cmd("INFO").arg("commandstats")))?;
    let Some(stats) = info_field(&text, "cmdstat_evalsha") else {
        return Ok(0.0);
    };
    stats
        .split(',')
        .find_map(|pair| {
            let (name, value) = pair.split_once('=')?;
            (name == "usec").then(|| value.parse::<f64>().ok())?
        })
        .ok_or_else(|| "no usec in cmdstat_evalsha".into())
}

async fn run_one(
    server: &RedisServer,
    checker: &Sequential,
    time: Duration,
    seed: u64,
    into: &mut Contender,
) -> BoxResult<()> {
    server.cmd(redis::cmd("CONFIG").arg("RESETSTAT"));
    let result: LoadResult =
        load::run(checker, CONCURRENCY, time, &Identifiers::Random, seed).await?;
    if result.failed_open > 0 || result.denied > 0 {
        return Err(format!(
            "{:?}: {} checks failed open and {} were denied; the figure would be meaningless",
            checker.endpoints, result.failed_open, result.denied
        )
        .into());
    }
    into.throughput.push(result.throughput());
    into.cpu_per_check
        .push(evalsha_usec(server)? / result.checks as f64);
    Ok(())
}

/// Tokens lost to refused requests, and requests admitted, when 40 clients each send 10
/// requests (64 at a time) to `endpoints` checked in sequence.
async fn tokens_lost(
    limiter: &DynRateLimiter,
    endpoints: &'static [&'static str],
    own_endpoint: &str,
) -> BoxResult<(u64, u64)> {
    let checker = Sequential {
        limiter: limiter.clone(),
        endpoints,
    };
    let mut tasks = tokio::task::JoinSet::new();
    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    for request in 0..LOSS_CLIENTS * LOSS_REQUESTS_PER_CLIENT {
        let checker = checker.clone();
        let semaphore = semaphore.clone();
        tasks.spawn(async move {
            let _permit = semaphore.acquire_owned().await?;
            let client = format!("198.51.100.{}", request % LOSS_CLIENTS);
            checker.check(&client).await
        });
    }
    let mut admitted = 0;
    while let Some(joined) = tasks.join_next().await {
        if joined?? == Outcome::Allowed {
            admitted += 1;
        }
    }
    let mut taken = 0;
    for client in 0..LOSS_CLIENTS {
        let client = format!("198.51.100.{client}");
        let status = limiter.status(own_endpoint, &client).await?;
        let own = status
            .limits
            .first()
            .ok_or("the per-client limit reported nothing")?;
        taken += own.limit - own.remaining;
    }
    Ok((taken.saturating_sub(admitted), admitted))
}

/// Figure 5: checks/s and Redis CPU per check of a two-limit check against a single-limit
/// one and against two separate checks, and the tokens refused requests cost.
pub(crate) async fn measure(
    server: &RedisServer,
    settings: &Settings,
    progress: &Progress,
) -> BoxResult<Vec<Figure>> {
    let mut figures = Vec::new();
    for layout in LAYOUTS {
        figures.extend(measure_layout(server, settings, progress, layout).await?);
    }
    Ok(figures)
}

async fn measure_layout(
    server: &RedisServer,
    settings: &Settings,
    progress: &Progress,
    layout: KeyLayout,
) -> BoxResult<Vec<Figure>> {
    let rules = rules()?;
    let redis = RedisConfig::new(server.url()).with_layout(layout);
    let container = Container::build(
        ContainerConfig::memory(rules)
            .with_backend(Backend::Redis(redis))
            .with_key_prefix(format!("bench_multi_{layout}"))
            .with_event_logging(false),
    )
    .await?;
    let limiter = container.rate_limiter();
    let contenders = [
        Sequential {
            limiter: limiter.clone(),
            endpoints: &[SINGLE],
        },
        Sequential {
            limiter: limiter.clone(),
            endpoints: &[TWO],
        },
        Sequential {
            limiter: limiter.clone(),
            endpoints: &[FIRST, SECOND],
        },
    ];
    // Warm every path (scripts loaded, connections open).
    for contender in &contenders {
        load::run(
            contender,
            8,
            Duration::from_millis(100),
            &Identifiers::Random,
            7,
        )
        .await?;
    }
    let mut measured: [Contender; 3] = Default::default();
    for round in 0..settings.rounds {
        progress.begin(format!(
            "several limits ({layout}), {CONCURRENCY} tasks: round {}/{}",
            round + 1,
            settings.rounds
        ));
        // Rotate the order, so that drift during a round favours none.
        for i in 0..3 {
            let which = (round + i) % 3;
            let seed = 50_000 + (round * 3 + which) as u64;
            run_one(
                server,
                &contenders[which],
                settings.round,
                seed,
                &mut measured[which],
            )
            .await?;
        }
        progress.done();
    }
    progress.begin(format!(
        "several limits ({layout}): tokens lost to refused requests"
    ));
    let (lost_one_step, admitted_one_step) = tokens_lost(&limiter, &[LOSS_TWO], LOSS_TWO).await?;
    let (lost_separate, admitted_separate) =
        tokens_lost(&limiter, &[LOSS_FIRST, LOSS_SECOND], LOSS_FIRST).await?;
    progress.done();
    if admitted_one_step != LOSS_SHARED || admitted_separate != LOSS_SHARED {
        progress.note(format!(
            "warning: the loss scenario admitted {admitted_one_step} (one step) and \
             {admitted_separate} (separate), expected {LOSS_SHARED} each"
        ));
    }

    let [single, two, separate] = &measured;
    let ratio = |a: &Contender, b: &Contender| {
        let paired: Vec<f64> = a
            .throughput
            .iter()
            .zip(&b.throughput)
            .map(|(x, y)| x / y)
            .collect();
        median(&paired)
    };
    Ok(vec![
        Figure::new(
            format!("multi.{layout}.two_limits.c64.checks_per_s"),
            format!("{layout}: two limits, one check, 64 tasks"),
            median(&two.throughput),
            Unit::PerSecond,
            "one limit",
            Some(median(&single.throughput)),
        )
        .ratio(ratio(two, single)),
        Figure::new(
            format!("multi.{layout}.two_limits.redis_cpu_us_per_check"),
            format!("{layout}: two limits, Redis CPU per check"),
            median(&two.cpu_per_check),
            Unit::Micros,
            "one limit",
            Some(median(&single.cpu_per_check)),
        ),
        Figure::new(
            format!("multi.{layout}.separate.redis_cpu_us_per_check"),
            format!("{layout}: two separate checks, Redis CPU per request"),
            median(&separate.cpu_per_check),
            Unit::Micros,
            "one limit",
            Some(median(&single.cpu_per_check)),
        ),
        Figure::new(
            format!("multi.{layout}.one_step_vs_separate.c64.checks_per_s"),
            format!("{layout}: two limits in one step vs two checks, 64 tasks"),
            median(&two.throughput),
            Unit::PerSecond,
            "two separate checks",
            Some(median(&separate.throughput)),
        )
        .ratio(ratio(two, separate))
        .target(Target::RatioAtLeast(1.6)),
        Figure::new(
            format!("multi.{layout}.tokens_lost.one_step"),
            format!("{layout}: tokens lost to refused requests, one step"),
            lost_one_step as f64,
            Unit::Count,
            "two separate checks",
            Some(lost_separate as f64),
        )
        .target(Target::ValueBelow(1.0)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rules_build() -> BoxResult<()> {
        let rules = rules()?;
        assert_eq!(rules.len(), 7);
        assert_eq!(rules.get(TWO).map(|l| l.limits().len()), Some(2));
        Ok(())
    }
}
