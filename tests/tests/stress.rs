//! A concurrency proof on a real `redis-server`: several "hosts" hammer one bucket at once.
//!
//! Each host is an OS thread running its own multi-thread Tokio runtime with its own store and
//! connection pool, as separate service instances sharing one Redis would. The bucket is one and
//! the same for all of them.
//!
//! - **Without refill**, exactly `max_tokens` worth of cost is admitted, whatever the
//!   interleaving, and every decision comes from the store (nothing failed open).
//! - **With refill**, every check passes an explicit `now` drawn from a shared virtual clock, so
//!   the arithmetic is deterministic; for every window of recorded times, the admitted cost is at
//!   most a full bucket plus what refilled during the window.
//! - **No leaked connections**: once the hosts have finished and their runtimes are gone, Redis
//!   lists no connection but the inspector's own.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ratelimit_container::{Backend, Container, ContainerConfig, RedisConfig};
use ratelimit_domain::{
    BucketRequest, BucketStore, DecisionSource, KeyBuilder, RateLimitRule, RateLimitScope,
    RateLimiter, RateLimiterExt, RuleSet,
};
use ratelimit_redis::{KeyLayout, RedisStorage};
use ratelimit_tests::redis_server::{RedisServer, unique_prefix};

/// Service instances sharing the bucket.
const HOSTS: u64 = 3;
/// Concurrent tasks on each host's runtime.
const TASKS_PER_HOST: u64 = 4;
const ENDPOINT: &str = "POST /api/v1/exports";
const USER: &str = "alice";

/// Generous, so that a slow CI machine never turns a check into a fail-open decision.
fn redis_config(server: &RedisServer) -> RedisConfig {
    // The two-key layout: the test reads the tokens left from `<key>:tokens`.
    RedisConfig::new(server.url())
        .with_layout(KeyLayout::TwoKeys)
        .with_check_timeout(Duration::from_secs(5))
        .with_pool_size(4)
}

/// A cost in 1..=3 that differs between hosts, tasks and checks; a third of the checks cost 1.
fn cost_of(host: u64, task: u64, check: u64) -> u64 {
    (host * 7 + task * 3 + check) % 3 + 1
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A synchronous connection for inspection, and its client id.
fn inspector(server: &RedisServer) -> (redis::Connection, i64) {
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let id: i64 = redis::cmd("CLIENT").arg("ID").query(&mut conn).unwrap();
    (conn, id)
}

/// `CLIENT LIST` lines of every connection but the inspector's.
fn other_clients(conn: &mut redis::Connection, own_id: i64) -> Vec<String> {
    let list: String = redis::cmd("CLIENT").arg("LIST").query(conn).unwrap();
    let own = format!("id={own_id} ");
    list.lines()
        .filter(|line| !line.starts_with(&own))
        .map(str::to_owned)
        .collect()
}

/// Waits (at most 5 s) until the inspector is the only client left.
fn assert_no_connection_left(conn: &mut redis::Connection, own_id: i64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let others = other_clients(conn, own_id);
        if others.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} connection(s) still open 5 s after every host had finished:\n{}",
            others.len(),
            others.join("\n")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Joins every host, failing the test with the panic message of any that panicked.
fn join_all<T>(hosts: Vec<JoinHandle<T>>) -> Vec<T> {
    hosts
        .into_iter()
        .enumerate()
        .map(|(host, handle)| {
            handle.join().unwrap_or_else(|panic| {
                let message = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)");
                panic!("host {host} panicked: {message}")
            })
        })
        .collect()
}

/// Starts [`HOSTS`] hosts, each an OS thread with a runtime of its own: `set_up(host)` runs on
/// it, then the host waits at `ready` with everyone else, then runs [`TASKS_PER_HOST`] tasks of
/// `task(host, task, set_up's value)` and returns what they all returned. Its runtime goes
/// when it is done, and with it every connection of the host.
fn on_hosts<S, T, SetUp, SetUpFut, Task, TaskFut>(
    ready: &Arc<Barrier>,
    set_up: SetUp,
    task: Task,
) -> Vec<JoinHandle<Vec<T>>>
where
    SetUp: Fn(u64) -> SetUpFut + Send + Sync + 'static,
    SetUpFut: Future<Output = S>,
    S: Clone + Send + 'static,
    Task: Fn(u64, u64, S) -> TaskFut + Send + Sync + 'static,
    TaskFut: Future<Output = Vec<T>> + Send + 'static,
    T: Send + 'static,
{
    let (set_up, task) = (Arc::new(set_up), Arc::new(task));
    (0..HOSTS)
        .map(|host| {
            let (set_up, task, ready) = (set_up.clone(), task.clone(), ready.clone());
            std::thread::Builder::new()
                .name(format!("host-{host}"))
                .spawn(move || {
                    let rt = runtime();
                    let shared = rt.block_on(set_up(host));
                    ready.wait();
                    let records = rt.block_on(async move {
                        let tasks: Vec<_> = (0..TASKS_PER_HOST)
                            .map(|n| tokio::spawn(task(host, n, shared.clone())))
                            .collect();
                        let mut all = Vec::new();
                        for task in tasks {
                            all.extend(task.await.unwrap());
                        }
                        all
                    });
                    drop(rt);
                    records
                })
                .unwrap()
        })
        .collect()
}

/// What one host saw of one check.
#[derive(Debug, Clone, Copy)]
struct Outcome {
    cost: u64,
    allowed: bool,
    source: DecisionSource,
}

#[test]
fn hosts_sharing_a_bucket_without_refill_admit_exactly_its_capacity() {
    const MAX_TOKENS: u64 = 50;
    const CHECKS_PER_TASK: u64 = 75; // 300 per host, 900 in all
    let server = RedisServer::start();
    let (mut inspect, own_id) = inspector(&server);
    let prefix = unique_prefix();
    // 0.0001 token a minute: during the test the bucket refills by about a millionth of a token.
    let rule = RateLimitRule::new(RateLimitScope::User, MAX_TOKENS, 0.0001).unwrap();
    let rules = RuleSet::try_from_rules([(ENDPOINT, rule)]).unwrap();

    // The hosts and this thread: everyone starts once every host has its limiter.
    let ready = Arc::new(Barrier::new(usize::try_from(HOSTS).unwrap() + 1));
    let set_up = {
        let (url, redis, prefix) = (server.url(), redis_config(&server), prefix.clone());
        move |_host| {
            let config = ContainerConfig::redis(url.clone(), rules.clone())
                .with_backend(Backend::Redis(redis.clone()))
                .with_key_prefix(prefix.clone())
                .with_event_logging(false);
            async move { Container::build(config).await.unwrap().rate_limiter() }
        }
    };
    let hosts = on_hosts(
        &ready,
        set_up,
        |host, task, limiter: Arc<dyn RateLimiter>| async move {
            let mut seen = Vec::new();
            for check in 0..CHECKS_PER_TASK {
                let cost = cost_of(host, task, check);
                let result = limiter
                    .is_allowed_with_cost(ENDPOINT, USER, cost)
                    .await
                    .unwrap();
                seen.push(Outcome {
                    cost,
                    allowed: result.allowed,
                    source: result.source,
                });
            }
            seen
        },
    );

    ready.wait();
    let while_running = other_clients(&mut inspect, own_id).len();
    let per_host = join_all(hosts);

    let all: Vec<Outcome> = per_host.iter().flatten().copied().collect();
    assert_eq!(
        all.len(),
        usize::try_from(HOSTS * TASKS_PER_HOST * CHECKS_PER_TASK).unwrap()
    );
    let degraded: Vec<&Outcome> = all
        .iter()
        .filter(|o| o.source != DecisionSource::Store)
        .collect();
    assert!(
        degraded.is_empty(),
        "{} decision(s) did not come from the store, e.g. {:?}",
        degraded.len(),
        degraded.first()
    );
    // Exactness: tokens only ever go down, so if less than the capacity had been admitted, a
    // whole token would still be there at the end and every cost-1 check would have been
    // admitted; there are more cost-1 checks than tokens, so the total must be the capacity.
    let cost_one = all.iter().filter(|o| o.cost == 1).count();
    assert!(u64::try_from(cost_one).unwrap() > MAX_TOKENS);
    let admitted: u64 = all.iter().filter(|o| o.allowed).map(|o| o.cost).sum();
    let admitted_per_host: Vec<u64> = per_host
        .iter()
        .map(|seen| seen.iter().filter(|o| o.allowed).map(|o| o.cost).sum())
        .collect();
    assert_eq!(
        admitted, MAX_TOKENS,
        "admitted cost per host: {admitted_per_host:?}"
    );
    println!("admitted cost per host: {admitted_per_host:?} (total {admitted})");

    // Redis agrees: less than one token left.
    let key = KeyBuilder::new(&prefix, RateLimitScope::User, ENDPOINT)
        .unwrap()
        .key(USER)
        .unwrap();
    let tokens: String = redis::cmd("GET")
        .arg(format!("{}:tokens", key.as_str()))
        .query(&mut inspect)
        .unwrap();
    let tokens: f64 = tokens.parse().unwrap();
    assert!(
        (0.0..1.0).contains(&tokens),
        "tokens left in redis: {tokens}"
    );

    // Every host held at least its start-up connection while running; none is left now.
    assert!(
        while_running >= usize::try_from(HOSTS).unwrap(),
        "expected a connection per host while running, saw {while_running}"
    );
    assert_no_connection_left(&mut inspect, own_id);
}

/// One check with an explicit time, as a host recorded it.
#[derive(Debug, Clone, Copy)]
struct Timed {
    /// The virtual time passed to the store, in milliseconds.
    now_ms: u64,
    /// The virtual clock once the reply was back: above every time drawn before the store
    /// could have run this check, so above the bucket's stored time when it ran.
    done_ms: u64,
    cost: u64,
    allowed: bool,
}

#[test]
fn hosts_sharing_a_refilling_bucket_never_admit_more_than_it_refills() {
    const MAX_TOKENS: u64 = 10;
    /// Tokens a minute: 10 a second of virtual time.
    const REFILL_PER_MINUTE: f64 = 600.0;
    const CHECKS_PER_TASK: u64 = 40; // 480 in all
    /// Virtual time between two draws: half a token of refill, a quarter of the mean demand
    /// (cost 2), so the bucket is oversubscribed four times.
    const STEP_MS: u64 = 50;
    const START_MS: u64 = 1_700_000_000_000;

    let server = RedisServer::start();
    let (mut inspect, own_id) = inspector(&server);
    let prefix = unique_prefix();
    let rule = RateLimitRule::new(RateLimitScope::Ip, MAX_TOKENS, REFILL_PER_MINUTE).unwrap();
    let key = KeyBuilder::new(&prefix, RateLimitScope::Ip, ENDPOINT)
        .unwrap()
        .key("203.0.113.7")
        .unwrap();
    let clock = Arc::new(AtomicU64::new(START_MS));

    let ready = Arc::new(Barrier::new(usize::try_from(HOSTS).unwrap() + 1));
    let set_up = {
        let redis = redis_config(&server);
        move |_host| {
            let redis = redis.clone();
            async move {
                let store = Arc::new(RedisStorage::new(&redis).unwrap());
                // Open a connection before the start, so that every host is on the line.
                store.ping().await.unwrap();
                store
            }
        }
    };
    let hosts = on_hosts(
        &ready,
        set_up,
        move |host, task, store: Arc<RedisStorage>| {
            let (rule, key, clock) = (rule.clone(), key.clone(), clock.clone());
            async move {
                let mut seen = Vec::new();
                for check in 0..CHECKS_PER_TASK {
                    let cost = cost_of(host, task, check);
                    let now_ms = clock.fetch_add(STEP_MS, Ordering::SeqCst);
                    let now = now_ms as f64 / 1000.0;
                    let decision = store
                        .check_and_consume(&BucketRequest::new(&key, &rule).with_cost(cost).at(now))
                        .await
                        .unwrap();
                    let done_ms = clock.load(Ordering::SeqCst);
                    seen.push(Timed {
                        now_ms,
                        done_ms,
                        cost,
                        allowed: decision.allowed,
                    });
                }
                seen
            }
        },
    );

    ready.wait();
    let while_running = other_clients(&mut inspect, own_id).len();
    let mut records: Vec<Timed> = join_all(hosts).into_iter().flatten().collect();
    assert_eq!(
        records.len(),
        usize::try_from(HOSTS * TASKS_PER_HOST * CHECKS_PER_TASK).unwrap()
    );
    records.sort_by_key(|r| r.now_ms);

    // Soundness of the bound. Take the admitted checks whose `now` lies in [t1, t2], in the
    // order Redis ran them, from the first (k) to the last (m). When k ran, the bucket held at
    // most `max_tokens` (after its refill). From then until m, the script credited refill only
    // for the stored time moving forward: from at least t1 (k's own time) to at most the
    // largest time drawn before m's reply came back, which is below m's `done_ms`. Checks may
    // reach Redis out of time order (a check drawn at t may run after one drawn later, and then
    // refills nothing), which is why the bound runs to the largest `done_ms` of the window's
    // admitted checks rather than to t2.
    let per_ms = REFILL_PER_MINUTE / 60.0 / 1000.0;
    let mut windows = 0_u64;
    let mut beyond_naive_bound = 0_u64;
    for (i, first) in records.iter().enumerate() {
        let t1 = first.now_ms;
        let mut admitted = 0_u64;
        let mut latest_done = t1;
        for last in &records[i..] {
            if last.allowed {
                admitted += last.cost;
                latest_done = latest_done.max(last.done_ms);
            }
            windows += 1;
            let t2 = last.now_ms;
            let bound = MAX_TOKENS as f64 + per_ms * (latest_done - t1) as f64 + 1e-6;
            assert!(
                admitted as f64 <= bound,
                "window [{t1}, {t2}] ms admitted {admitted} tokens, more than {bound:.3}"
            );
            if admitted as f64 > MAX_TOKENS as f64 + per_ms * (t2 - t1) as f64 + 1e-6 {
                beyond_naive_bound += 1;
            }
        }
    }

    // Limiting, not blocking: the bucket is oversubscribed, so nearly all the refill is taken.
    let span_ms = records.last().unwrap().now_ms - records[0].now_ms;
    let supply = MAX_TOKENS as f64 + per_ms * span_ms as f64;
    let admitted: u64 = records.iter().filter(|r| r.allowed).map(|r| r.cost).sum();
    let demand: u64 = records.iter().map(|r| r.cost).sum();
    assert!(
        admitted as f64 >= supply / 2.0,
        "only {admitted} of {supply:.1} tokens admitted"
    );
    assert!(admitted < demand);
    println!(
        "{windows} windows checked; admitted {admitted} of {demand} demanded, {supply:.1} \
         supplied; {beyond_naive_bound} window(s) above the bound that ignores out-of-order \
         arrival"
    );

    assert!(
        while_running >= usize::try_from(HOSTS).unwrap(),
        "expected a connection per host while running, saw {while_running}"
    );
    assert_no_connection_left(&mut inspect, own_id);
}
