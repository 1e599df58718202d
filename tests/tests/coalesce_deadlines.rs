//! Deadlines of coalesced checks: a queued check has no timer of its own (its batch answers it
//! by its deadline), so a check queued early in a batch must still fail at its own deadline,
//! not at the deadline of the batch's last check.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::{Duration, Instant};

use ratelimit_domain::{BucketRequest, BucketStore, ErrorCode};
use ratelimit_redis::{KeyLayout, MAX_IN_FLIGHT, RedisConfig, RedisStorage};
use ratelimit_tests::contract::{key, rule};
use ratelimit_tests::redis_server::{RedisServer, unique_prefix};
use tokio::task::JoinSet;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_check_in_a_batch_fails_at_its_own_deadline_not_the_last_ones() {
    let timeout = Duration::from_millis(400);
    // The second queued check comes this much later: its deadline is the batch call's.
    let gap = Duration::from_millis(250);
    for layout in [KeyLayout::Compact, KeyLayout::TwoKeys] {
        let server = RedisServer::start();
        let config = RedisConfig::new(server.url())
            .with_layout(layout)
            .with_check_timeout(timeout)
            .with_coalescing(true);
        let store = Arc::new(RedisStorage::new(&config).unwrap());
        let prefix = unique_prefix();
        let rule = rule(5, 5.0);
        // Warm up: connection open, both scripts loaded.
        for i in 0..3 {
            let bucket = key(&prefix, &format!("warm-{i}"), "GET /late");
            store
                .check_and_consume(&BucketRequest::new(&bucket, &rule))
                .await
                .unwrap();
        }
        server.pause();
        let mut set = JoinSet::new();
        let spawn = |set: &mut JoinSet<_>, name: String| {
            let (store, rule) = (Arc::clone(&store), rule.clone());
            let bucket = key(&prefix, &name, "GET /late");
            set.spawn(async move {
                let started = Instant::now();
                let result = store
                    .check_and_consume(&BucketRequest::new(&bucket, &rule))
                    .await;
                (name, started.elapsed(), result)
            });
        };
        // Every call slot taken by a check that hangs until its deadline.
        for i in 0..MAX_IN_FLIGHT {
            spawn(&mut set, format!("slot-{i}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        spawn(&mut set, "early".to_owned());
        tokio::time::sleep(gap).await;
        spawn(&mut set, "late".to_owned());
        let mut results = Vec::new();
        while let Some(joined) = set.join_next().await {
            results.push(joined.unwrap());
        }
        server.resume();
        assert_eq!(results.len(), MAX_IN_FLIGHT + 2);
        for (name, elapsed, result) in results {
            let err = result.unwrap_err();
            assert_eq!(
                err.code(),
                ErrorCode::StorageTimeout,
                "{layout:?} {name}: {err}"
            );
            // Without the batch's timer for its earlier entries, "early" would fail only with
            // "late", about `gap` after its own deadline.
            assert!(
                elapsed >= timeout - Duration::from_millis(5)
                    && elapsed < timeout + Duration::from_millis(120),
                "{layout:?} {name}: failed after {elapsed:?}, deadline {timeout:?}"
            );
        }
        let stats = store.coalescing_stats();
        assert!(stats.batches >= 1, "{layout:?}: {stats:?}");
    }
}
