//! Coalesced checks (`RedisConfig::with_coalescing`): checks that wait while script calls are
//! in flight go to Redis as one batch script call, and every one of them is decided exactly as
//! it would be alone, in both layouts.
//!
//! The batch path only runs under concurrency, so these tests run many checks at once and
//! assert, through `RedisStorage::coalescing_stats`, that batches were sent. Where the outcome
//! must not depend on how checks fall into batches, each key's checks are sequential (so its
//! decisions are fixed) while different keys run concurrently. The tests that need a batch of
//! known content freeze their own redis-server (SIGSTOP) while the store's call slots are
//! taken, so that everything sent next queues.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::{Duration, Instant};

use ratelimit_domain::token_bucket::{self, BucketState};
use ratelimit_domain::{BucketDecision, BucketKey, BucketRequest, BucketStore, ErrorCode};
use ratelimit_redis::{
    KeyLayout, MAX_IN_FLIGHT, RedisConfig, RedisStorage, TOKEN_BUCKET_BATCH_SCRIPT,
    TOKEN_BUCKET_COMPACT_BATCH_SCRIPT,
};
use ratelimit_tests::contract::{
    self, GarbageValue, Sequence, T0, key, random_workload, reference_decisions, rule,
    store_decisions, stored_garbage,
};
use ratelimit_tests::redis_server::{RedisServer, TestRedis, unique_prefix};
use ratelimit_tests::stored::assert_recorded_expiry;
use tokio::task::JoinSet;

const LAYOUTS: [KeyLayout; 2] = [KeyLayout::TwoKeys, KeyLayout::Compact];

fn store(url: &str, layout: KeyLayout, timeout: Duration) -> Arc<RedisStorage> {
    let config = RedisConfig::new(url)
        .with_layout(layout)
        .with_check_timeout(timeout)
        .with_coalescing(true);
    Arc::new(RedisStorage::new(&config).unwrap_or_else(|err| panic!("{err}")))
}

/// Generous deadlines: these tests are about decisions, not about failing open.
fn patient(url: &str, layout: KeyLayout) -> Arc<RedisStorage> {
    store(url, layout, Duration::from_secs(5))
}

async fn join_all<T: 'static>(mut set: JoinSet<T>) -> Vec<T> {
    let mut out = Vec::new();
    while let Some(joined) = set.join_next().await {
        out.push(joined.unwrap_or_else(|err| panic!("task failed: {err}")));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_contract_holds_through_batches_in_both_layouts() {
    let redis = TestRedis::get();
    for layout in LAYOUTS {
        let store = patient(&redis.url, layout);
        // 24 suites at once, each on its own keys: within a suite every check waits for the
        // previous one, so its decisions are fixed, but the suites' checks share batches.
        let mut set = JoinSet::new();
        for _ in 0..24 {
            let store = Arc::clone(&store);
            set.spawn(async move { contract::run_all(&*store, &unique_prefix()).await });
        }
        join_all(set).await;
        let stats = store.coalescing_stats();
        assert!(
            stats.batches > 0 && stats.batched_checks > stats.batches,
            "{layout:?}: the suites never went through a batch: {stats:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_workloads_replayed_per_key_match_the_reference_step() {
    let redis = TestRedis::get();
    let rules = [rule(10, 7.3), rule(1, 5.0), rule(25, 600.0), rule(3, 0.37)];
    for layout in LAYOUTS {
        let store = patient(&redis.url, layout);
        let prefix = unique_prefix();
        let mut set = JoinSet::new();
        for i in 0..32_usize {
            let store = Arc::clone(&store);
            let rule = rules[i % rules.len()].clone();
            let bucket = key(&prefix, &format!("workload-{i}"), "GET /random");
            set.spawn(async move {
                let seed = 0xC0A1_E5CE + i as u64;
                let steps = random_workload(seed, 300, rule.max_tokens());
                let expected = reference_decisions(&steps, &rule);
                let got = store_decisions(&*store, &bucket, &steps, &rule).await;
                for (n, step) in steps.iter().enumerate() {
                    assert_eq!(
                        got[n], expected[n],
                        "{layout:?}: diverged at step {n} ({step:?}) of seed {seed:#x}"
                    );
                }
            });
        }
        join_all(set).await;
        let stats = store.coalescing_stats();
        assert!(stats.batched_checks > 1_000, "{layout:?}: {stats:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_bucket_admits_exactly_its_capacity_under_concurrency() {
    let redis = TestRedis::get();
    // 50 tokens, refilled one per 10 minutes: nothing refills during the test.
    let rule = rule(50, 0.1);
    for layout in LAYOUTS {
        let store = patient(&redis.url, layout);
        let shared = key(&unique_prefix(), "everyone", "POST /shared");
        let mut set = JoinSet::new();
        for _ in 0..64 {
            let (store, shared, rule) = (Arc::clone(&store), shared.clone(), rule.clone());
            set.spawn(async move {
                let mut allowed = 0;
                for _ in 0..10 {
                    let d = store
                        .check_and_consume(&BucketRequest::new(&shared, &rule))
                        .await
                        .unwrap();
                    allowed += u32::from(d.allowed);
                }
                allowed
            });
        }
        let allowed: u32 = join_all(set).await.into_iter().sum();
        assert_eq!(allowed, 50, "{layout:?}");
        assert!(store.coalescing_stats().batches > 0, "{layout:?}");
        assert_eq!(store.get_remaining(&shared, &rule, None).await.unwrap(), 0);
    }
}

/// What Redis holds for a bucket, for seeding garbage.
fn seed(conn: &mut redis::Connection, key: &BucketKey, value: &GarbageValue) {
    let set = |conn: &mut redis::Connection, name: String, value: &[u8]| {
        let _: () = redis::cmd("SET")
            .arg(name)
            .arg(value)
            .arg("EX")
            .arg(3_600)
            .query(conn)
            .unwrap();
    };
    match value {
        GarbageValue::TwoKeys(tokens, time) => {
            for (suffix, value) in [(":tokens", tokens), (":time", time)] {
                let name = format!("{}{suffix}", key.as_str());
                let _: () = redis::cmd("DEL").arg(&name).query(conn).unwrap();
                if let Some(value) = value {
                    set(conn, name, value.as_bytes());
                }
            }
        }
        GarbageValue::Compact(bytes) => set(conn, format!("{}:tb", key.as_str()), bytes),
    }
}

/// A server of its own (so that tests can pause it), a plain connection to seed it, and a
/// patient store on it in each layout (two-key first).
fn server_with_both_layouts() -> (RedisServer, redis::Connection, [Arc<RedisStorage>; 2]) {
    let server = RedisServer::start();
    let client = redis::Client::open(server.url()).unwrap();
    let conn = client.get_connection().unwrap();
    let stores = [
        patient(&server.url(), KeyLayout::TwoKeys),
        patient(&server.url(), KeyLayout::Compact),
    ];
    (server, conn, stores)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_stored_values_decide_as_the_reference_step_through_batches() {
    // A server of its own, paused while the checks are sent: the first checks take the call
    // slots and hang, so that the rest queue and go through batches whatever the scheduler
    // does.
    let (server, mut conn, stores) = server_with_both_layouts();
    let prefix = unique_prefix();
    let rule = rule(5, 5.0);
    let (max, rate) = (rule.max_tokens(), rule.refill_rate());
    let mut cases = Vec::new();
    for (n, garbage) in stored_garbage(max, rate, T0, 0x0BA7_C4ED)
        .into_iter()
        .enumerate()
    {
        let bucket = key(&prefix, &format!("garbage-{n}"), "GET /garbage");
        seed(&mut conn, &bucket, &garbage.value);
        cases.push((bucket, garbage));
    }
    server.pause();
    let mut set = JoinSet::new();
    for (bucket, garbage) in cases {
        let compact = matches!(garbage.value, GarbageValue::Compact(_));
        let store = Arc::clone(&stores[usize::from(compact)]);
        let rule = rule.clone();
        set.spawn(async move {
            // Two checks in a row: the first decides from the garbage, the second from what
            // the first wrote (or from the garbage, when nothing was written).
            let first = token_bucket::step(garbage.reads_as, max, rate, 1, T0);
            let state: Option<BucketState> = first.store.or(garbage.reads_as);
            let second = token_bucket::step(state, max, rate, 1, T0 + 1.0);
            for (cost_now, expected) in [(T0, first.decision), (T0 + 1.0, second.decision)] {
                let got = store
                    .check_and_consume(&BucketRequest::new(&bucket, &rule).at(cost_now))
                    .await
                    .unwrap_or_else(|err| panic!("{}: {err}", garbage.name));
                assert_eq!(got, expected, "{} at {cost_now}", garbage.name);
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.resume();
    let cases = join_all(set).await.len();
    assert!(cases > 300, "only {cases} cases");
    for store in &stores {
        assert!(store.coalescing_stats().batched_checks > 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_stored_values_in_a_group_decide_as_step_all_through_batches() {
    // The group entry of a multi-limit check reads its buckets from the batch's one MGET:
    // garbage planted in one bucket of a group must be read exactly as the reference reads it,
    // and decide the whole group with the clean bucket beside it, as `step_all` does.
    let (server, mut conn, stores) = server_with_both_layouts();
    let prefix = unique_prefix();
    let (planted_rule, clean_rule) = (rule(5, 5.0), rule(3, 60.0));
    let (max, rate) = (planted_rule.max_tokens(), planted_rule.refill_rate());
    let mut cases = Vec::new();
    for (n, garbage) in stored_garbage(max, rate, T0, 0x6A2B_A6E5)
        .into_iter()
        .enumerate()
    {
        let planted = key(&prefix, &format!("planted-{n}"), "GET /group-garbage");
        let clean = key(&prefix, &format!("clean-{n}"), "GET /group-garbage");
        seed(&mut conn, &planted, &garbage.value);
        cases.push((planted, clean, garbage));
    }
    // Paused while the checks are sent: the first take the call slots, the rest queue, so the
    // groups go through batches whatever the scheduler does.
    server.pause();
    let mut set = JoinSet::new();
    for (planted, clean, garbage) in cases {
        let compact = matches!(garbage.value, GarbageValue::Compact(_));
        let store = Arc::clone(&stores[usize::from(compact)]);
        let (planted_rule, clean_rule) = (planted_rule.clone(), clean_rule.clone());
        set.spawn(async move {
            // Two group checks in a row: the second sees what the first wrote, or the
            // garbage (and a missing clean bucket) where it wrote nothing.
            let mut states = [garbage.reads_as, None];
            for now in [T0, T0 + 1.0] {
                let inputs = [
                    token_bucket::StepInput {
                        stored: states[0],
                        max_tokens: planted_rule.max_tokens(),
                        refill_rate: planted_rule.refill_rate(),
                        cost: 1,
                    },
                    token_bucket::StepInput {
                        stored: states[1],
                        max_tokens: clean_rule.max_tokens(),
                        refill_rate: clean_rule.refill_rate(),
                        cost: 1,
                    },
                ];
                let steps = token_bucket::step_all(&inputs, now);
                let requests = [
                    BucketRequest::new(&planted, &planted_rule).at(now),
                    BucketRequest::new(&clean, &clean_rule).at(now),
                ];
                let got = store
                    .check_and_consume_all(&requests)
                    .await
                    .unwrap_or_else(|err| panic!("{}: {err}", garbage.name));
                let expected: Vec<BucketDecision> = steps.iter().map(|s| s.decision).collect();
                assert_eq!(got, expected, "{} at {now}", garbage.name);
                for (state, step) in states.iter_mut().zip(&steps) {
                    if let Some(written) = step.store {
                        *state = Some(written);
                    }
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.resume();
    let cases = join_all(set).await.len();
    assert!(cases > 300, "only {cases} cases");
    for store in &stores {
        assert!(
            store.coalescing_stats().batched_groups > 0,
            "no group went through a batch: {:?}",
            store.coalescing_stats()
        );
    }
}

/// A store on a server of its own, warmed up (connection open, both scripts loaded).
async fn own_server(layout: KeyLayout, timeout: Duration) -> (RedisServer, Arc<RedisStorage>) {
    let server = RedisServer::start();
    let store = store(&server.url(), layout, timeout);
    let prefix = unique_prefix();
    let rule = rule(1_000, 1_000.0);
    let mut set = JoinSet::new();
    for i in 0..32 {
        let (store, rule) = (Arc::clone(&store), rule.clone());
        let bucket = key(&prefix, &format!("warm-{i}"), "GET /warm");
        set.spawn(async move {
            for _ in 0..5 {
                store
                    .check_and_consume(&BucketRequest::new(&bucket, &rule))
                    .await
                    .unwrap();
            }
        });
    }
    join_all(set).await;
    (server, store)
}

/// Asserts that every key of `bucket` exists with a lifetime of at most `ttl` seconds.
fn assert_lives(server: &RedisServer, bucket: &BucketKey, layout: KeyLayout, ttl: u64) {
    let names = match layout {
        KeyLayout::Compact => vec![format!("{}:tb", bucket.as_str())],
        _ => vec![
            format!("{}:tokens", bucket.as_str()),
            format!("{}:time", bucket.as_str()),
        ],
    };
    for name in names {
        let left: i64 = redis::from_redis_value(server.cmd(redis::cmd("TTL").arg(&name))).unwrap();
        assert!(
            left > 0 && left.unsigned_abs() <= ttl,
            "{layout:?}: {name} has TTL {left}, lifetime {ttl}"
        );
    }
}

/// [`assert_recorded_expiry`] over a connection of its own to `server`.
fn assert_expiry_on(server: &RedisServer, bucket: &BucketKey) {
    let client = redis::Client::open(server.url()).unwrap();
    assert_recorded_expiry(&mut client.get_connection().unwrap(), bucket);
}

/// A spawned check: its bucket, how long it took, what it answered.
type Checked = (
    BucketKey,
    Duration,
    ratelimit_domain::Result<BucketDecision>,
);
/// Takes every call slot of `store` with a check of its own (each hangs while Redis is paused),
/// so that everything checked after them queues for one batch.
async fn take_the_call_slots(
    set: &mut JoinSet<Checked>,
    store: &Arc<RedisStorage>,
    prefix: &str,
    endpoint: &str,
    rule: &ratelimit_domain::RateLimitRule,
) {
    for i in 0..MAX_IN_FLIGHT {
        spawn_check(
            set,
            store,
            key(prefix, &format!("slot-{i}"), endpoint),
            rule,
        )
        .await;
    }
}

/// Writes a hash under the first key of `bucket` in `layout` (a key of another type, which no
/// script can read as a bucket) and answers that key.
fn plant_foreign_key(server: &RedisServer, bucket: &BucketKey, layout: KeyLayout) -> String {
    let first_key = if layout == KeyLayout::Compact {
        format!("{}:tb", bucket.as_str())
    } else {
        format!("{}:time", bucket.as_str())
    };
    server.cmd(redis::cmd("HSET").arg(&first_key).arg("tokens").arg("0"));
    first_key
}

/// Spawns one check of `bucket` and gives it time to be sent or queued.
async fn spawn_check(
    set: &mut JoinSet<Checked>,
    store: &Arc<RedisStorage>,
    bucket: BucketKey,
    rule: &ratelimit_domain::RateLimitRule,
) {
    let (store, rule) = (Arc::clone(store), rule.clone());
    set.spawn(async move {
        let started = Instant::now();
        let result = store
            .check_and_consume(&BucketRequest::new(&bucket, &rule))
            .await;
        (bucket, started.elapsed(), result)
    });
    tokio::time::sleep(Duration::from_millis(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_of_another_type_fails_only_its_own_check_in_a_batch() {
    for layout in LAYOUTS {
        let (server, store) = own_server(layout, Duration::from_secs(5)).await;
        let prefix = unique_prefix();
        let rule = rule(5, 5.0);
        let bad = key(&prefix, "bad", "GET /typed");
        plant_foreign_key(&server, &bad, layout);
        let before = store.coalescing_stats();
        server.pause();
        let mut set = JoinSet::new();
        // These take the call slots; everything after them queues for one batch.
        take_the_call_slots(&mut set, &store, &prefix, "GET /typed", &rule).await;
        for i in 0..20 {
            let bucket = if i == 7 {
                bad.clone()
            } else {
                key(&prefix, &format!("good-{i}"), "GET /typed")
            };
            spawn_check(&mut set, &store, bucket, &rule).await;
        }
        server.resume();
        for (bucket, _, result) in join_all(set).await {
            if bucket == bad {
                let err = result.unwrap_err();
                assert_eq!(err.code(), ErrorCode::CorruptBucket, "{layout:?}: {err}");
                assert_eq!(
                    err.details().get("key").map(String::as_str),
                    Some(bad.as_str())
                );
            } else {
                let d = result.unwrap_or_else(|err| panic!("{layout:?} {bucket}: {err}"));
                assert!(d.allowed && d.remaining == 4, "{layout:?} {bucket}: {d:?}");
            }
        }
        let after = store.coalescing_stats();
        assert_eq!(
            after.batched_checks - before.batched_checks,
            20,
            "{layout:?}: {after:?}"
        );
        assert_eq!(after.batches - before.batches, 1, "{layout:?}: {after:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_check_keeps_its_own_deadline_and_a_cancelled_one_takes_nothing() {
    let timeout = Duration::from_millis(300);
    for layout in LAYOUTS {
        let (server, store) = own_server(layout, timeout).await;
        let prefix = unique_prefix();
        let rule = rule(5, 5.0);
        server.pause();
        let mut set = JoinSet::new();
        take_the_call_slots(&mut set, &store, &prefix, "GET /late", &rule).await;
        // A queued caller that gives up before its batch is sent.
        let cancelled = key(&prefix, "cancelled", "GET /late");
        let handle = {
            let (store, rule, bucket) = (Arc::clone(&store), rule.clone(), cancelled.clone());
            tokio::spawn(async move {
                store
                    .check_and_consume(&BucketRequest::new(&bucket, &rule))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        // Queued checks, started 100 ms apart: each fails at its own deadline.
        spawn_check(
            &mut set,
            &store,
            key(&prefix, "queued-0", "GET /late"),
            &rule,
        )
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        spawn_check(
            &mut set,
            &store,
            key(&prefix, "queued-1", "GET /late"),
            &rule,
        )
        .await;
        handle.abort();
        let results = join_all(set).await;
        server.resume();
        for (bucket, elapsed, result) in results {
            let err = result.unwrap_err();
            assert_eq!(
                err.code(),
                ErrorCode::StorageTimeout,
                "{layout:?} {bucket}: {err}"
            );
            assert!(
                elapsed >= timeout - Duration::from_millis(5)
                    && elapsed < timeout + Duration::from_millis(150),
                "{layout:?} {bucket}: failed after {elapsed:?}, deadline {timeout:?}"
            );
        }
        assert!(
            store.coalescing_stats().abandoned >= 1,
            "{:?}",
            store.coalescing_stats()
        );
        // Redis is back: checks are decided again, and the cancelled check took nothing.
        let check = || async {
            for _ in 0..50 {
                match store.get_remaining(&cancelled, &rule, None).await {
                    Ok(remaining) => return remaining,
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
            panic!("{layout:?}: redis never answered again");
        };
        assert_eq!(
            check().await,
            5,
            "{layout:?}: the cancelled check took a token"
        );
        let fresh = key(&prefix, "after", "GET /late");
        let d = store
            .check_and_consume(&BucketRequest::new(&fresh, &rule))
            .await
            .unwrap();
        assert!(d.allowed && d.remaining == 4);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_sends_its_script_again_after_script_flush() {
    for layout in LAYOUTS {
        let (server, store) = own_server(layout, Duration::from_secs(5)).await;
        let prefix = unique_prefix();
        let rule = rule(5, 5.0);
        let reloads = store.script_reloads();
        server.cmd(redis::cmd("SCRIPT").arg("FLUSH"));
        server.pause();
        let mut set = JoinSet::new();
        for i in 0..MAX_IN_FLIGHT + 30 {
            spawn_check(
                &mut set,
                &store,
                key(&prefix, &format!("k-{i}"), "GET /flush"),
                &rule,
            )
            .await;
        }
        let batches = store.coalescing_stats().batches;
        server.resume();
        for (bucket, _, result) in join_all(set).await {
            let d = result.unwrap_or_else(|err| panic!("{layout:?} {bucket}: {err}"));
            assert!(d.allowed && d.remaining == 4, "{layout:?} {bucket}: {d:?}");
        }
        assert!(store.coalescing_stats().batches > batches);
        // Each call slot's single script, then the batch script.
        assert!(
            store.script_reloads() > reloads + MAX_IN_FLIGHT as u64,
            "{layout:?}: {} reloads",
            store.script_reloads() - reloads
        );
        let batch_script = match layout {
            KeyLayout::Compact => TOKEN_BUCKET_COMPACT_BATCH_SCRIPT,
            _ => TOKEN_BUCKET_BATCH_SCRIPT,
        };
        let sha = redis::Script::new(batch_script).get_hash().to_owned();
        let exists: Vec<i64> =
            redis::from_redis_value(server.cmd(redis::cmd("SCRIPT").arg("EXISTS").arg(&sha)))
                .unwrap();
        assert_eq!(
            exists,
            [1],
            "{layout:?}: the batch script is not back in redis"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_repeated_in_a_batch_is_stepped_in_order() {
    for layout in LAYOUTS {
        let (server, store) = own_server(layout, Duration::from_secs(5)).await;
        let prefix = unique_prefix();
        let rule = rule(5, 5.0);
        let shared = key(&prefix, "shared", "GET /repeat");
        server.pause();
        let mut set = JoinSet::new();
        take_the_call_slots(&mut set, &store, &prefix, "GET /repeat", &rule).await;
        for _ in 0..8 {
            spawn_check(&mut set, &store, shared.clone(), &rule).await;
        }
        server.resume();
        let mut remaining: Vec<u64> = Vec::new();
        let mut denied = 0;
        for (bucket, _, result) in join_all(set).await {
            let d = result.unwrap();
            if bucket == shared {
                if d.allowed {
                    remaining.push(d.remaining);
                } else {
                    denied += 1;
                    assert_eq!(d.remaining, 0);
                }
            }
        }
        remaining.sort_unstable();
        assert_eq!(remaining, [0, 1, 2, 3, 4], "{layout:?}");
        assert_eq!(denied, 3, "{layout:?}");
        // Written many times in one batch (the compact script defers all but the first write
        // to the end of the batch): the bucket holds its last state and still expires.
        assert_eq!(store.get_remaining(&shared, &rule, None).await.unwrap(), 0);
        assert_lives(&server, &shared, layout, rule.storage_ttl_seconds());
        if layout == KeyLayout::Compact {
            assert_expiry_on(&server, &shared);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buckets_repeated_in_a_batch_across_groups_record_the_expiry_redis_keeps() {
    // Group entries (several limits, all or nothing) and single entries on the same two
    // buckets, at Redis's time, in one batch: the batch carries each bucket's state from entry
    // to entry, and what it finally writes must record the expiry its key really has.
    let (server, store) = own_server(KeyLayout::Compact, Duration::from_secs(5)).await;
    let prefix = unique_prefix();
    let rule = rule(100, 6.0);
    let shared = [
        key(&prefix, "group-a", "GET /repeat-group"),
        key(&prefix, "group-b", "GET /repeat-group"),
    ];
    let before = store.coalescing_stats();
    server.pause();
    let mut slots = JoinSet::new();
    take_the_call_slots(&mut slots, &store, &prefix, "GET /repeat-group", &rule).await;
    let mut queued = Vec::new();
    for n in 0..6 {
        let store = Arc::clone(&store);
        let (shared, rule) = (shared.clone(), rule.clone());
        let mut future = Box::pin(async move {
            if n % 3 == 2 {
                store
                    .check_and_consume(&BucketRequest::new(&shared[0], &rule))
                    .await
                    .map(|d| vec![d])
            } else {
                let requests = [
                    BucketRequest::new(&shared[0], &rule),
                    BucketRequest::new(&shared[1], &rule),
                ];
                store.check_and_consume_all(&requests).await
            }
        });
        let first =
            std::future::poll_fn(|cx| std::task::Poll::Ready(future.as_mut().poll(cx))).await;
        assert!(first.is_pending(), "entry {n} answered while Redis slept");
        queued.push(future);
    }
    server.resume();
    join_all(slots).await;
    for future in queued {
        assert!(future.await.unwrap().iter().all(|d| d.allowed));
    }
    let after = store.coalescing_stats();
    assert_eq!(after.batches - before.batches, 1, "{after:?}");
    for bucket in &shared {
        assert_lives(
            &server,
            bucket,
            KeyLayout::Compact,
            rule.storage_ttl_seconds(),
        );
        assert_expiry_on(&server, bucket);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_of_another_type_repeated_in_a_batch_fails_every_entry_and_is_left_alone() {
    // The batch script reads every key with one MGET, which answers nil for a key of another
    // type as for a missing one: the entries that would create it (SET NX) and those that
    // write nothing (cost 0) must still fail, each, and the key must keep its value.
    for layout in LAYOUTS {
        let (server, store) = own_server(layout, Duration::from_secs(5)).await;
        let prefix = unique_prefix();
        let rule = rule(5, 5.0);
        let bad = key(&prefix, "bad", "GET /typed-twice");
        let first_key = plant_foreign_key(&server, &bad, layout);
        let before = store.coalescing_stats();
        server.pause();
        let mut set = JoinSet::new();
        take_the_call_slots(&mut set, &store, &prefix, "GET /typed-twice", &rule).await;
        let mut reads = JoinSet::new();
        for i in 0..6 {
            if i == 3 {
                let (store, rule, bad) = (Arc::clone(&store), rule.clone(), bad.clone());
                reads.spawn(async move {
                    store
                        .check_and_consume(&BucketRequest::new(&bad, &rule).with_cost(0))
                        .await
                });
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            spawn_check(&mut set, &store, bad.clone(), &rule).await;
        }
        server.resume();
        for (bucket, _, result) in join_all(set).await {
            if bucket == bad {
                let err = result.unwrap_err();
                assert_eq!(err.code(), ErrorCode::CorruptBucket, "{layout:?}: {err}");
            } else {
                assert!(result.unwrap().allowed);
            }
        }
        for result in join_all(reads).await {
            let err = result.unwrap_err();
            assert_eq!(err.code(), ErrorCode::CorruptBucket, "{layout:?}: {err}");
        }
        let after = store.coalescing_stats();
        assert_eq!(after.batches - before.batches, 1, "{layout:?}: {after:?}");
        assert_eq!(after.batched_checks - before.batched_checks, 7);
        let kind: String =
            redis::from_redis_value(server.cmd(redis::cmd("TYPE").arg(&first_key))).unwrap();
        assert_eq!(kind, "hash", "{layout:?}");
        let value: Vec<String> =
            redis::from_redis_value(server.cmd(redis::cmd("HGETALL").arg(&first_key))).unwrap();
        assert_eq!(value, ["tokens", "0"], "{layout:?}");
        if layout == KeyLayout::TwoKeys {
            // The tokens key, missing, was not left behind by the entries that failed.
            let tokens = format!("{}:tokens", bad.as_str());
            let exists: i64 =
                redis::from_redis_value(server.cmd(redis::cmd("EXISTS").arg(&tokens))).unwrap();
            assert_eq!(exists, 0, "{tokens} was written");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_multi_limit_contract_holds_through_batches_in_both_layouts() {
    let redis = TestRedis::get();
    for layout in LAYOUTS {
        let store = patient(&redis.url, layout);
        let mut set = JoinSet::new();
        for _ in 0..24 {
            let store = Arc::clone(&store);
            set.spawn(async move { contract::run_multi(&*store, &unique_prefix()).await });
        }
        join_all(set).await;
        let stats = store.coalescing_stats();
        assert!(
            stats.batched_groups > 100,
            "{layout:?}: too few multi-limit checks went through a batch: {stats:?}"
        );
    }
}

/// One operation of a mixed workload: a single check of one bucket, or a multi-limit check of
/// several, each bucket with its cost; all at `now`.
#[derive(Debug, Clone)]
struct Op {
    buckets: Vec<(usize, u64)>,
    now: f64,
}

/// A random mix of single and multi-limit checks over `keys` buckets of capacity `max`: costs
/// 0 to 3 (now and then above capacity), a clock that mostly stands or moves on, sometimes
/// back.
#[allow(clippy::cast_possible_truncation)] // below(n) < n, a usize
fn mixed_workload(seed: u64, len: usize, keys: usize, max: &[u64]) -> Vec<Op> {
    let mut rng = Sequence::new(seed);
    let mut now = T0;
    (0..len)
        .map(|_| {
            now += match rng.below(6) {
                0..=2 => 0.0,
                3 | 4 => rng.below(900) as f64 / 1_000.0,
                _ => -(rng.below(400) as f64 / 1_000.0),
            };
            let mut chosen: Vec<usize> = (0..keys).collect();
            // One bucket (a single check) or two or more, in a random order.
            let size = 1 + rng.below(keys as u64) as usize;
            for i in 0..keys {
                let j = i + rng.below((keys - i) as u64) as usize;
                chosen.swap(i, j);
            }
            chosen.truncate(size);
            let buckets = chosen
                .into_iter()
                .map(|k| {
                    let cost = match rng.below(30) {
                        0 => 0,
                        1 => max[k] + 1,
                        _ => 1 + rng.below(3),
                    };
                    (k, cost)
                })
                .collect();
            Op { buckets, now }
        })
        .collect()
}

/// The decisions of `ops` by the reference (`step` for one bucket, `step_all` for several).
fn reference_mixed(
    ops: &[Op],
    rules: &[ratelimit_domain::RateLimitRule],
) -> Vec<Vec<BucketDecision>> {
    let mut states: Vec<Option<BucketState>> = vec![None; rules.len()];
    ops.iter()
        .map(|op| {
            let inputs: Vec<token_bucket::StepInput> = op
                .buckets
                .iter()
                .map(|&(k, cost)| token_bucket::StepInput {
                    stored: states[k],
                    max_tokens: rules[k].max_tokens(),
                    refill_rate: rules[k].refill_rate(),
                    cost,
                })
                .collect();
            let steps = token_bucket::step_all(&inputs, op.now);
            for (&(k, _), step) in op.buckets.iter().zip(&steps) {
                if let Some(state) = step.store {
                    states[k] = Some(state);
                }
            }
            steps.into_iter().map(|step| step.decision).collect()
        })
        .collect()
}

/// `op` through the store: `check_and_consume` for one bucket, `check_and_consume_all` for
/// several.
async fn run_op(
    store: &RedisStorage,
    keys: &[BucketKey],
    rules: &[ratelimit_domain::RateLimitRule],
    op: &Op,
) -> ratelimit_domain::Result<Vec<BucketDecision>> {
    let requests: Vec<BucketRequest<'_>> = op
        .buckets
        .iter()
        .map(|&(k, cost)| {
            BucketRequest::new(&keys[k], &rules[k])
                .with_cost(cost)
                .at(op.now)
        })
        .collect();
    match requests.as_slice() {
        [one] => store.check_and_consume(one).await.map(|d| vec![d]),
        _ => store.check_and_consume_all(&requests).await,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_single_and_multi_limit_workloads_match_the_reference() {
    // 24 lanes at once, each on its own three buckets: within a lane every check waits for
    // the previous one (so its decisions are fixed) and single and multi-limit checks share
    // the buckets; the lanes' checks share batches.
    let redis = TestRedis::get();
    let rules = vec![rule(6, 37.0), rule(9, 23.5), rule(4, 11.0)];
    let max: Vec<u64> = rules.iter().map(|r| r.max_tokens()).collect();
    for layout in LAYOUTS {
        let store = patient(&redis.url, layout);
        let prefix = unique_prefix();
        let mut set = JoinSet::new();
        for lane in 0..24_u64 {
            let (store, rules, max) = (Arc::clone(&store), rules.clone(), max.clone());
            let keys: Vec<BucketKey> = (0..rules.len())
                .map(|k| key(&prefix, &format!("lane-{lane}-{k}"), "GET /mixed"))
                .collect();
            set.spawn(async move {
                let seed = 0x5EED_0000 + lane;
                let ops = mixed_workload(seed, 200, rules.len(), &max);
                let expected = reference_mixed(&ops, &rules);
                for (n, op) in ops.iter().enumerate() {
                    let got = run_op(&store, &keys, &rules, op)
                        .await
                        .unwrap_or_else(|err| panic!("{layout:?} seed {seed:#x} op {n}: {err}"));
                    assert_eq!(
                        got, expected[n],
                        "{layout:?}: diverged at op {n} ({op:?}) of seed {seed:#x}"
                    );
                }
            });
        }
        join_all(set).await;
        let stats = store.coalescing_stats();
        assert!(
            stats.batched_groups > 200 && stats.batched_checks > stats.batched_groups + 200,
            "{layout:?}: {stats:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_and_multi_limit_checks_on_shared_buckets_in_one_batch_run_in_order() {
    // Redis frozen while the call slots are taken: the checks sent next queue, in the order
    // they are sent, into one batch, where single and group entries step the same buckets.
    let rules = vec![rule(5, 6.0), rule(3, 2.0), rule(8, 60.0)];
    let max: Vec<u64> = rules.iter().map(|r| r.max_tokens()).collect();
    for layout in LAYOUTS {
        for seed in [1_u64, 2, 3] {
            let (server, store) = own_server(layout, Duration::from_secs(5)).await;
            let prefix = unique_prefix();
            let keys: Vec<BucketKey> = (0..rules.len())
                .map(|k| key(&prefix, &format!("shared-{k}"), "GET /one-batch"))
                .collect();
            // Mostly explicit times that stand still, so that buckets run dry within the batch.
            let ops: Vec<Op> = mixed_workload(0xBA7C_0000 + seed, 24, rules.len(), &max)
                .into_iter()
                .map(|op| Op {
                    now: T0 + (op.now - T0).round(),
                    ..op
                })
                .collect();
            let expected = reference_mixed(&ops, &rules);
            let before = store.coalescing_stats();
            server.pause();
            let mut slots = JoinSet::new();
            for i in 0..MAX_IN_FLIGHT {
                spawn_check(
                    &mut slots,
                    &store,
                    key(&prefix, &format!("slot-{i}"), "GET /one-batch"),
                    &rules[0],
                )
                .await;
            }
            // Each op is polled once here, which queues it, before the next is made: the queue
            // holds them in this order whatever the scheduler does (spawned tasks a few
            // milliseconds apart can start out of order on a loaded machine).
            let mut queued = Vec::new();
            for (n, op) in ops.iter().enumerate() {
                let mut future = Box::pin(run_op(&store, &keys, &rules, op));
                let first =
                    std::future::poll_fn(|cx| std::task::Poll::Ready(future.as_mut().poll(cx)))
                        .await;
                assert!(
                    first.is_pending(),
                    "{layout:?} op {n} answered while Redis slept"
                );
                queued.push(future);
            }
            server.resume();
            join_all(slots).await;
            for (n, future) in queued.into_iter().enumerate() {
                let got = future
                    .await
                    .unwrap_or_else(|err| panic!("{layout:?} op {n}: {err}"));
                assert_eq!(
                    got, expected[n],
                    "{layout:?} seed {seed}: op {n} ({:?})",
                    ops[n]
                );
            }
            let after = store.coalescing_stats();
            assert_eq!(after.batches - before.batches, 1, "{layout:?}: {after:?}");
            assert_eq!(
                after.batched_checks - before.batched_checks,
                ops.len() as u64
            );
            for (k, bucket) in keys.iter().enumerate() {
                if ops
                    .iter()
                    .any(|op| op.buckets.iter().any(|&(b, c)| b == k && c > 0))
                {
                    assert_lives(&server, bucket, layout, rules[k].storage_ttl_seconds());
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_with_a_key_of_another_type_fails_alone_and_writes_nothing() {
    for layout in LAYOUTS {
        let (server, store) = own_server(layout, Duration::from_secs(5)).await;
        let prefix = unique_prefix();
        let rule = rule(5, 5.0);
        let (a, bad, b) = (
            key(&prefix, "a", "GET /group"),
            key(&prefix, "bad", "GET /group"),
            key(&prefix, "b", "GET /group"),
        );
        let names = |k: &BucketKey| -> Vec<String> {
            match layout {
                KeyLayout::Compact => vec![format!("{}:tb", k.as_str())],
                _ => vec![
                    format!("{}:tokens", k.as_str()),
                    format!("{}:time", k.as_str()),
                ],
            }
        };
        let hash_at = names(&bad).pop().unwrap();
        server.cmd(redis::cmd("HSET").arg(&hash_at).arg("x").arg("1"));
        let before = store.coalescing_stats();
        server.pause();
        let mut slots = JoinSet::new();
        take_the_call_slots(&mut slots, &store, &prefix, "GET /group", &rule).await;
        let group = {
            let (store, rule, keys) = (
                Arc::clone(&store),
                rule.clone(),
                [a.clone(), bad.clone(), b.clone()],
            );
            tokio::spawn(async move {
                let requests: Vec<BucketRequest<'_>> =
                    keys.iter().map(|k| BucketRequest::new(k, &rule)).collect();
                store.check_and_consume_all(&requests).await
            })
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        // A single check of another bucket in the same batch is decided as usual.
        let other = key(&prefix, "other", "GET /group");
        let mut singles = JoinSet::new();
        spawn_check(&mut singles, &store, other.clone(), &rule).await;
        server.resume();
        join_all(slots).await;
        let err = group.await.unwrap().unwrap_err();
        assert_eq!(err.code(), ErrorCode::CorruptBucket, "{layout:?}: {err}");
        assert_eq!(
            err.details().get("key").map(String::as_str),
            Some(bad.as_str()),
            "{layout:?}: {err}"
        );
        for (_, _, result) in join_all(singles).await {
            let d = result.unwrap();
            assert!(d.allowed && d.remaining == 4, "{layout:?}: {d:?}");
        }
        for k in [&a, &b] {
            for name in names(k) {
                let exists: i64 =
                    redis::from_redis_value(server.cmd(redis::cmd("EXISTS").arg(&name))).unwrap();
                assert_eq!(exists, 0, "{layout:?}: {name} was written");
            }
        }
        let after = store.coalescing_stats();
        assert_eq!(after.batches - before.batches, 1, "{layout:?}: {after:?}");
        assert_eq!(after.batched_groups - before.batched_groups, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_multi_limit_check_keeps_its_deadline_and_a_cancelled_one_takes_nothing() {
    let timeout = Duration::from_millis(300);
    for layout in LAYOUTS {
        let (server, store) = own_server(layout, timeout).await;
        let prefix = unique_prefix();
        let rule = rule(5, 5.0);
        let pair = |name: &str| {
            [
                key(&prefix, &format!("{name}-a"), "GET /late-group"),
                key(&prefix, &format!("{name}-b"), "GET /late-group"),
            ]
        };
        let (gone, late) = (pair("cancelled"), pair("late"));
        let spawn_group = |store: &Arc<RedisStorage>, keys: &[BucketKey; 2]| {
            let (store, rule, keys) = (Arc::clone(store), rule.clone(), keys.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let requests: Vec<BucketRequest<'_>> =
                    keys.iter().map(|k| BucketRequest::new(k, &rule)).collect();
                let result = store.check_and_consume_all(&requests).await;
                (started.elapsed(), result)
            })
        };
        server.pause();
        let mut slots = JoinSet::new();
        take_the_call_slots(&mut slots, &store, &prefix, "GET /late-group", &rule).await;
        let cancelled = spawn_group(&store, &gone);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let waiting = spawn_group(&store, &late);
        tokio::time::sleep(Duration::from_millis(5)).await;
        cancelled.abort();
        let (elapsed, result) = waiting.await.unwrap();
        let err = result.unwrap_err();
        assert_eq!(err.code(), ErrorCode::StorageTimeout, "{layout:?}: {err}");
        assert!(
            elapsed >= timeout - Duration::from_millis(5)
                && elapsed < timeout + Duration::from_millis(150),
            "{layout:?}: failed after {elapsed:?}, deadline {timeout:?}"
        );
        join_all(slots).await;
        server.resume();
        assert!(store.coalescing_stats().abandoned >= 1, "{layout:?}");
        // Redis is back: the cancelled group took nothing.
        for bucket in &gone {
            let mut remaining = None;
            for _ in 0..50 {
                match store.get_remaining(bucket, &rule, None).await {
                    Ok(left) => {
                        remaining = Some(left);
                        break;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
            assert_eq!(remaining, Some(5), "{layout:?}: {bucket} lost tokens");
        }
    }
}

/// Not a test: a probe that measures what a check costs a Redis that something else watches
/// (`crates/bench/callgrind/store.sh` runs it under callgrind). Sends `RCPU_PROBE_CHECKS`
/// checks per task from 64 tasks over 20,000 existing buckets, through the coalescing store
/// (`RCPU_PROBE_MODE=coalesced`) or as one `EVALSHA` of the compact script per check over one
/// multiplexed connection (`raw`), to the Redis at `RCPU_PROBE_PORT`, and prints that Redis's
/// CPU per check (`INFO cpu`) and the batches. With `RCPU_PROBE_CALLGRIND=<pid>` it resets
/// callgrind's counts of that process before the measured checks and dumps them after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measuring probe, run by crates/bench/callgrind/store.sh"]
async fn probe_redis_cost_per_check() {
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set"));
    let url = format!("redis://127.0.0.1:{}", var("RCPU_PROBE_PORT"));
    let raw = var("RCPU_PROBE_MODE") == "raw";
    let per_task: u64 = var("RCPU_PROBE_CHECKS").parse().unwrap();
    let callgrind = std::env::var("RCPU_PROBE_CALLGRIND").ok();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut admin = client.get_connection().unwrap();
    let cpu = |conn: &mut redis::Connection| -> (f64, f64) {
        let text: String = redis::cmd("INFO").arg("cpu").query(conn).unwrap();
        let field = |name: &str| -> f64 {
            text.lines()
                .filter_map(|line| line.trim().split_once(':'))
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.parse().unwrap())
                .unwrap()
        };
        (field("used_cpu_user"), field("used_cpu_sys"))
    };
    let store = store(&url, KeyLayout::Compact, Duration::from_secs(60));
    let rule = rule(1_000_000_000, 1e9);
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(ratelimit_redis::TOKEN_BUCKET_COMPACT_SCRIPT)
        .query(&mut admin)
        .unwrap();
    // The compact script's packed argument: max_tokens, refill_rate, cost, then the lifetime.
    let mut packed = Vec::new();
    for number in [1e9_f64, 1e9, 1.0] {
        packed.extend_from_slice(&number.to_le_bytes());
    }
    packed.extend_from_slice(b"120");
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    let bucket = |task: u64, i: u64| {
        key(
            "probe",
            &format!("e{}", (task * 7_919 + i * 31) % 20_000),
            "GET /x",
        )
    };
    // Every bucket created first.
    let mut set = JoinSet::new();
    for task in 0..64_u64 {
        let (store, rule) = (Arc::clone(&store), rule.clone());
        set.spawn(async move {
            for i in 0..700 {
                let k = key(
                    "probe",
                    &format!("e{}", (task * 313 + i) % 20_000),
                    "GET /x",
                );
                store
                    .check_and_consume(&BucketRequest::new(&k, &rule))
                    .await
                    .unwrap();
            }
        });
    }
    join_all(set).await;
    let before = store.coalescing_stats();
    if let Some(pid) = &callgrind {
        std::process::Command::new("callgrind_control")
            .arg("-z")
            .arg(pid)
            .status()
            .unwrap();
    }
    let (user, sys) = cpu(&mut admin);
    let mut set = JoinSet::new();
    for task in 0..64_u64 {
        let (store, rule, mut conn, sha, packed) = (
            Arc::clone(&store),
            rule.clone(),
            conn.clone(),
            sha.clone(),
            packed.clone(),
        );
        set.spawn(async move {
            for i in 0..per_task {
                let k = bucket(task, i);
                if raw {
                    let _: redis::Value = redis::cmd("EVALSHA")
                        .arg(&sha)
                        .arg(1)
                        .arg(format!("{}:tb", k.as_str()))
                        .arg(&packed)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                } else {
                    store
                        .check_and_consume(&BucketRequest::new(&k, &rule))
                        .await
                        .unwrap();
                }
            }
        });
    }
    join_all(set).await;
    let (user_after, sys_after) = cpu(&mut admin);
    if let Some(pid) = &callgrind {
        std::process::Command::new("callgrind_control")
            .arg("-d")
            .arg(pid)
            .status()
            .unwrap();
    }
    let after = store.coalescing_stats();
    let checks = (64 * per_task) as f64;
    println!(
        "{}: {checks} checks, Redis CPU {:.2} us per check (user {:.2}, system {:.2}); {} checks in {} batches",
        if raw { "raw" } else { "coalesced" },
        (user_after + sys_after - user - sys) * 1e6 / checks,
        (user_after - user) * 1e6 / checks,
        (sys_after - sys) * 1e6 / checks,
        after.batched_checks - before.batched_checks,
        after.batches - before.batches,
    );
}
