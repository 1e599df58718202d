//! The Redis store on a real local Redis Cluster (3 primaries, 3 replicas): the conformance
//! suite, keys spread over every primary, and a primary killed under load.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::{Duration, Instant};

use ratelimit_adapter::TokenBucketAdapter;
use ratelimit_domain::{DecisionSource, RateLimitRule, RateLimitScope, RateLimiterExt, RuleSet};
use ratelimit_redis::{RedisConfig, RedisStorage};
use ratelimit_tests::contract;
use ratelimit_tests::redis_cluster::RedisCluster;
use ratelimit_tests::redis_server::unique_prefix;

fn store(cluster: &RedisCluster, check_timeout: Duration) -> RedisStorage {
    let config = RedisConfig::cluster(cluster.urls())
        .with_check_timeout(check_timeout)
        .with_admin_timeout(Duration::from_secs(2));
    RedisStorage::new(&config).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_passes_the_contract_and_spreads_buckets_over_every_primary() {
    let cluster = RedisCluster::start(3, 1);
    let store = store(&cluster, Duration::from_secs(5));
    let prefix = unique_prefix();
    contract::run_all(&store, &prefix).await;

    // Many identifiers: their buckets land on every primary, each bucket's two keys together.
    let rules = RuleSet::try_from_rules([(
        "GET /x",
        RateLimitRule::new(RateLimitScope::Ip, 5, 5.0).unwrap(),
    )])
    .unwrap();
    let limiter = TokenBucketAdapter::builder(Arc::new(store), rules)
        .key_prefix(&prefix)
        .build()
        .unwrap();
    for i in 0..60 {
        let result = limiter
            .is_allowed("GET /x", &format!("10.0.0.{i}"))
            .await
            .unwrap();
        assert_eq!(
            (result.source, result.remaining),
            (DecisionSource::Store, 4)
        );
    }
    let primaries = cluster.primaries();
    assert_eq!(primaries.len(), 3);
    for index in primaries {
        let keys = cluster.dbsize(index);
        assert!(
            keys > 0 && keys % 2 == 0,
            "primary {index} holds {keys} keys: buckets must spread, two keys each"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_primary_fails_open_within_the_deadline_and_limiting_resumes_after_failover() {
    let mut cluster = RedisCluster::start(3, 1);
    let deadline = Duration::from_millis(200);
    let prefix = unique_prefix();
    let rules = RuleSet::try_from_rules([(
        "GET /x",
        RateLimitRule::new(RateLimitScope::Ip, 1000, 1.0).unwrap(),
    )])
    .unwrap();
    let limiter = TokenBucketAdapter::builder(Arc::new(store(&cluster, deadline)), rules)
        .key_prefix(&prefix)
        .build()
        .unwrap();
    assert_eq!(
        limiter.is_allowed("GET /x", "victim").await.unwrap().source,
        DecisionSource::Store
    );

    let key = format!("{{{prefix}:ip:victim:GET /x}}:tokens");
    let victim = cluster.primary_of(&key);
    cluster.nodes[victim].kill();

    // Checks keep answering within the deadline, fail-open, until the replica takes over.
    let started = Instant::now();
    let mut failed_open = 0;
    let resumed = loop {
        let begun = Instant::now();
        let result = limiter.is_allowed("GET /x", "victim").await.unwrap();
        let took = begun.elapsed();
        assert!(
            took < deadline + Duration::from_secs(1),
            "a check took {took:?} during the failover"
        );
        if result.source == DecisionSource::Store {
            break result;
        }
        assert_eq!(result.source, DecisionSource::FailOpen);
        failed_open += 1;
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "limiting did not resume after the failover"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        failed_open > 0,
        "the killed primary should have caused at least one fail-open check"
    );
    // The replica had the bucket: counting continues from what the old primary held
    // (replication is asynchronous, so at most the last write may be lost).
    assert!(
        resumed.remaining >= 997 && resumed.remaining <= 998,
        "{resumed:?}"
    );
    assert_ne!(cluster.primary_of(&key), victim);
}
