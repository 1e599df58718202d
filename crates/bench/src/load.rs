//! A closed-loop load generator: N tokio tasks, each checking as fast as its answers come back.

use std::future::Future;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::BoxResult;
use crate::stats::{self, Rng};

/// What one check decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Allowed by the store.
    Allowed,
    /// Denied by the store.
    Denied,
    /// Allowed without the store having decided (fail-open): a measurement error here.
    FailOpen,
}

/// Something that checks one identifier: the adapter, or a raw `EVALSHA`.
///
/// Generic rather than boxed, so that the raw baseline pays for no boxed future it does not
/// need.
pub(crate) trait Checker: Clone + Send + Sync + 'static {
    /// Checks (and consumes from) the bucket of `identifier`.
    fn check(&self, identifier: &str) -> impl Future<Output = BoxResult<Outcome>> + Send;
}

/// Which identifiers the tasks check.
#[derive(Debug, Clone)]
pub(crate) enum Identifiers {
    /// A fresh random IPv4-looking identifier per check: (almost) every check its own bucket.
    Random,
    /// The same identifier every time: one bucket.
    Fixed(String),
    /// A random one of this many identifiers (`10.0.x.y`-like): after a warm-up, every check
    /// finds its bucket in Redis.
    RandomOf(u64),
}

/// What a load run measured.
#[derive(Debug)]
pub(crate) struct LoadResult {
    /// Checks completed.
    pub(crate) checks: u64,
    /// Wall time from the start until the last task finished.
    pub(crate) elapsed: Duration,
    /// Latency of each check, in nanoseconds.
    pub(crate) latency: Histogram<u64>,
    /// Checks by outcome.
    pub(crate) allowed: u64,
    /// Checks denied.
    pub(crate) denied: u64,
    /// Checks that failed open.
    pub(crate) failed_open: u64,
}

impl LoadResult {
    /// Checks per second.
    pub(crate) fn throughput(&self) -> f64 {
        self.checks as f64 / self.elapsed.as_secs_f64()
    }
}

/// Runs `concurrency` tasks checking with `checker` for `duration`, on the current runtime.
///
/// # Errors
/// The first error a check returned (the run stops being meaningful then).
pub(crate) async fn run<C: Checker>(
    checker: &C,
    concurrency: usize,
    duration: Duration,
    identifiers: &Identifiers,
    seed: u64,
) -> BoxResult<LoadResult> {
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..concurrency {
        let checker = checker.clone();
        let identifiers = identifiers.clone();
        let stream = seed.wrapping_mul(1_000).wrapping_add(task as u64);
        tasks.spawn(async move { one_task(checker, identifiers, stream, deadline).await });
    }
    let mut total = LoadResult {
        checks: 0,
        elapsed: Duration::ZERO,
        latency: stats::latency_histogram()?,
        allowed: 0,
        denied: 0,
        failed_open: 0,
    };
    while let Some(joined) = tasks.join_next().await {
        let part = joined??;
        total.checks += part.checks;
        total.allowed += part.allowed;
        total.denied += part.denied;
        total.failed_open += part.failed_open;
        total.latency.add(&part.latency)?;
    }
    total.elapsed = start.elapsed();
    Ok(total)
}

async fn one_task<C: Checker>(
    checker: C,
    identifiers: Identifiers,
    stream: u64,
    deadline: Instant,
) -> BoxResult<LoadResult> {
    let mut rng = Rng::seeded(stream);
    let mut identifier = match &identifiers {
        Identifiers::Fixed(id) => id.clone(),
        Identifiers::Random | Identifiers::RandomOf(_) => String::with_capacity(16),
    };
    let mut part = LoadResult {
        checks: 0,
        elapsed: Duration::ZERO,
        latency: stats::latency_histogram()?,
        allowed: 0,
        denied: 0,
        failed_open: 0,
    };
    loop {
        match identifiers {
            Identifiers::Random => rng.ip_into(&mut identifier),
            Identifiers::RandomOf(n) => {
                let i = rng.next_u64() % n.max(1);
                identifier.clear();
                // Writing to a String cannot fail.
                let _ = std::fmt::Write::write_fmt(
                    &mut identifier,
                    format_args!("10.0.{}.{}", i / 256, i % 256),
                );
            }
            Identifiers::Fixed(_) => {}
        }
        let started = Instant::now();
        let outcome = checker.check(&identifier).await?;
        let finished = Instant::now();
        stats::record(&mut part.latency, finished - started);
        part.checks += 1;
        match outcome {
            Outcome::Allowed => part.allowed += 1,
            Outcome::Denied => part.denied += 1,
            Outcome::FailOpen => part.failed_open += 1,
        }
        if finished >= deadline {
            return Ok(part);
        }
    }
}
