//! Figure 3: the in-process backend, against the `governor` crate's keyed limiter.
//!
//! Everything runs in a tight loop on a current-thread runtime, one key after another from a
//! set of distinct keys built beforehand, so that the figures are the cost of a check and
//! nothing else. Each round runs every contender once, in an order that changes from round to
//! round.
//!
//! `ratelimit-bench memory` runs this figure alone. With `--only <contender> --checks N` it
//! runs one contender alone (one warm-up pass over every key, then N checks), so that
//! `valgrind --tool=callgrind` counts its instructions per check: the count of a run with N
//! checks less that of a run with none, over N. Instruction counts hold still on a loaded
//! machine where timings drift.

use std::hint::black_box;
use std::num::NonZeroU32;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter as Governor};
use ratelimit_adapter::domain::{BucketRequest, KeyBuilder};
use ratelimit_adapter::{
    BroadcastEventBus, BucketKey, BucketStore, DecisionSource, RateLimitRule, RateLimitScope,
    RateLimiterExt, RuleSet, TokenBucketAdapter,
};
use ratelimit_memory::MemoryStorage;

use crate::progress::Progress;
use crate::redis_path::{ENDPOINT, MAX_TOKENS, REFILL_RATE};
use crate::report::{Figure, Target, Unit};
use crate::stats::median;
use crate::{BoxResult, Settings};

/// Distinct keys cycled through.
const KEYS: usize = 100_000;

/// The contenders' order in a round (store, governor, store without a future, adapter), by
/// round: a balanced Latin square, where each contender comes right after each other once.
const ORDERS: [[usize; 4]; 4] = [[0, 1, 3, 2], [1, 2, 0, 3], [2, 3, 1, 0], [3, 0, 2, 1]];

struct Contenders {
    identifiers: Vec<String>,
    keys: Vec<BucketKey>,
    strings: Vec<String>,
    rule: RateLimitRule,
    store: MemoryStorage,
    adapter: TokenBucketAdapter,
    governor: DefaultKeyedRateLimiter<String>,
}

impl Contenders {
    fn new() -> BoxResult<Self> {
        let rule = RateLimitRule::new(RateLimitScope::Ip, MAX_TOKENS, REFILL_RATE)?;
        let builder = KeyBuilder::new(KeyBuilder::DEFAULT_PREFIX, RateLimitScope::Ip, ENDPOINT)?;
        let identifiers: Vec<String> = (0..KEYS)
            .map(|i| {
                let [a, b, c, ..] = i.to_le_bytes();
                format!("10.{c}.{b}.{a}")
            })
            .collect();
        let keys = identifiers
            .iter()
            .map(|id| builder.key(id))
            .collect::<Result<Vec<_>, _>>()?;
        let strings = keys.iter().map(|key| key.as_str().to_owned()).collect();
        let adapter = TokenBucketAdapter::builder(
            Arc::new(MemoryStorage::new()),
            RuleSet::try_from_rules([(ENDPOINT, rule.clone())])?,
        )
        .events(Arc::new(BroadcastEventBus::default()))
        .build()?;
        let burst = NonZeroU32::new(1_000_000_000).ok_or("zero burst")?;
        Ok(Self {
            identifiers,
            keys,
            strings,
            rule,
            store: MemoryStorage::new(),
            adapter,
            governor: Governor::keyed(Quota::per_second(burst)),
        })
    }

    /// ns per check of the store alone through the port, as the adapter calls it: a
    /// `dyn BucketStore`, `check_now` first (the memory store always answers it), the async
    /// `check_and_consume` only for a store that has to wait.
    async fn store(&self, checks: usize) -> BoxResult<f64> {
        let store: &dyn BucketStore = &self.store;
        let started = Instant::now();
        for i in 0..checks {
            let key = &self.keys[i % KEYS];
            let request = BucketRequest::new(key, &self.rule).with_cost(1);
            let decision = match store.check_now(&request) {
                Some(decision) => decision?,
                None => store.check_and_consume(&request).await?,
            };
            if !black_box(decision).allowed {
                return Err("the memory store denied a check".into());
            }
        }
        Ok(per_check(started, checks))
    }

    /// ns per [`MemoryStorage::check`]: the same step without the port's boxed future.
    #[inline(never)] // callgrind/memory.sh counts inside it
    fn store_sync(&self, checks: usize) -> BoxResult<f64> {
        let started = Instant::now();
        for i in 0..checks {
            let key = &self.keys[i % KEYS];
            let decision = self
                .store
                .check(&BucketRequest::new(key, &self.rule).with_cost(1))?;
            if !black_box(decision).allowed {
                return Err("the memory store denied a check".into());
            }
        }
        Ok(per_check(started, checks))
    }

    /// ns per `is_allowed` of the adapter over the store, events to a bus nobody listens to.
    async fn adapter(&self, checks: usize) -> BoxResult<f64> {
        let started = Instant::now();
        for i in 0..checks {
            let id = &self.identifiers[i % KEYS];
            let result = self.adapter.is_allowed(ENDPOINT, id).await?;
            if !(black_box(&result).allowed && result.source == DecisionSource::Store) {
                return Err(format!("the adapter did not allow a check: {result:?}").into());
            }
        }
        Ok(per_check(started, checks))
    }

    /// ns per `check_key` of governor's keyed limiter.
    #[inline(never)] // callgrind/memory.sh counts inside it
    fn governor(&self, checks: usize) -> BoxResult<f64> {
        let started = Instant::now();
        for i in 0..checks {
            let key = &self.strings[i % KEYS];
            if black_box(self.governor.check_key(key)).is_err() {
                return Err("governor denied a check".into());
            }
        }
        Ok(per_check(started, checks))
    }
}

fn per_check(started: Instant, checks: usize) -> f64 {
    started.elapsed().as_nanos() as f64 / checks as f64
}

/// Figure 3: the store (through the port and without a future) and the adapter (with events)
/// against governor, ns per check.
pub(crate) fn measure(settings: &Settings, progress: &Progress) -> BoxResult<Vec<Figure>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        progress.begin("memory backend: warming up");
        let contenders = Contenders::new()?;
        // One pass over every key first: later rounds update buckets, as most checks do.
        contenders.store(KEYS).await?;
        contenders.adapter(KEYS).await?;
        contenders.governor(KEYS)?;
        let (mut store, mut adapter, mut governor) = (Vec::new(), Vec::new(), Vec::new());
        let (mut store_ratio, mut adapter_ratio) = (Vec::new(), Vec::new());
        let (mut sync, mut sync_ratio) = (Vec::new(), Vec::new());
        for round in 0..settings.rounds {
            progress.begin(format!(
                "memory backend: round {}/{}",
                round + 1,
                settings.rounds
            ));
            let n = settings.memory_checks;
            // The four contenders' data do not fit in the caches together, and each starts on
            // what the one before it left there: the order changes from round to round so that
            // each comes right after each other once in 4 rounds.
            let (mut s, mut g, mut c, mut a) = (0.0, 0.0, 0.0, 0.0);
            for &contender in &ORDERS[round % ORDERS.len()] {
                match contender {
                    0 => s = contenders.store(n).await?,
                    1 => g = contenders.governor(n)?,
                    2 => c = contenders.store_sync(n)?,
                    _ => a = contenders.adapter(n).await?,
                }
            }
            store.push(s);
            governor.push(g);
            adapter.push(a);
            store_ratio.push(s / g);
            sync.push(c);
            sync_ratio.push(c / g);
            adapter_ratio.push(a / g);
            progress.done();
        }
        let governor = median(&governor);
        let mut figures = figures(&store, &adapter, governor, &store_ratio, &adapter_ratio);
        figures.insert(
            1,
            Figure::new(
                "memory.store_sync.ns_per_check",
                "Memory: MemoryStorage::check, no future",
                median(&sync),
                Unit::Nanos,
                "governor keyed limiter, String keys",
                Some(governor),
            )
            .ratio(median(&sync_ratio)),
        );
        Ok(figures)
    })
}

/// The figure's rows from the rounds' timings.
fn figures(
    store: &[f64],
    adapter: &[f64],
    governor: f64,
    store_ratio: &[f64],
    adapter_ratio: &[f64],
) -> Vec<Figure> {
    vec![
        Figure::new(
            "memory.store.ns_per_check",
            "Memory: MemoryStorage through the port (check_now, as the adapter calls it)",
            median(store),
            Unit::Nanos,
            "governor keyed limiter, String keys",
            Some(governor),
        )
        .ratio(median(store_ratio))
        .target(Target::RatioAtMost(1.0)),
        Figure::new(
            "memory.adapter.ns_per_check",
            "Memory: adapter is_allowed, events on",
            median(adapter),
            Unit::Nanos,
            "governor keyed limiter, String keys",
            Some(governor),
        )
        .ratio(median(adapter_ratio))
        .target(Target::ValueBelow(1_000.0)),
    ]
}

/// One of the figure's contenders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Contender {
    /// `MemoryStorage` through the port, as the adapter calls it (`check_now`).
    Store,
    /// `MemoryStorage::check`, the same without the port's boxed future.
    StoreSync,
    /// The adapter's `is_allowed` over a `MemoryStorage`.
    Adapter,
    /// governor's keyed limiter, `check_key`.
    Governor,
}

/// `ratelimit-bench memory`: figure 3 alone, or one contender for callgrind.
#[derive(Debug, clap::Args)]
pub(crate) struct MemoryArgs {
    /// Run only this contender: one warm-up pass over every key, then `--checks` checks, and
    /// print its ns per check. For instruction counts under callgrind.
    #[arg(long, value_enum)]
    only: Option<Contender>,
    /// Checks of `--only`'s contender after the warm-up pass.
    #[arg(long, default_value_t = 1_000_000, requires = "only")]
    checks: usize,
}

/// Runs `ratelimit-bench memory`.
pub(crate) fn run(args: &MemoryArgs, quick: bool) -> ExitCode {
    match run_inner(args, quick) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ratelimit-bench memory: error: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run_inner(args: &MemoryArgs, quick: bool) -> BoxResult<()> {
    let Some(only) = args.only else {
        let settings = Settings::new(quick);
        let progress = Progress::new(settings.rounds as u64);
        let figures = measure(&settings, &progress)?;
        progress.finish();
        print!("{}", crate::report::table(&figures));
        return Ok(());
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let ns = runtime.block_on(async {
        let contenders = Contenders::new()?;
        match only {
            Contender::Store => {
                contenders.store(KEYS).await?;
                contenders.store(args.checks).await
            }
            Contender::StoreSync => {
                contenders.store_sync(KEYS)?;
                contenders.store_sync(args.checks)
            }
            Contender::Adapter => {
                contenders.adapter(KEYS).await?;
                contenders.adapter(args.checks).await
            }
            Contender::Governor => {
                contenders.governor(KEYS)?;
                contenders.governor(args.checks)
            }
        }
    })?;
    println!("{only:?}: {} checks, {ns:.1} ns per check", args.checks);
    Ok(())
}
