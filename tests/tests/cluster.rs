//! The Redis store on a real local Redis Cluster (3 primaries, 3 replicas): the conformance
//! suite, keys spread over every primary, and a primary killed under load.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::{Duration, Instant};

use ratelimit_adapter::TokenBucketAdapter;
use ratelimit_domain::{DecisionSource, RateLimitRule, RateLimitScope, RateLimiterExt, RuleSet};
use ratelimit_redis::{KeyLayout, RedisConfig, RedisStorage};
use ratelimit_tests::contract;
use ratelimit_tests::redis_cluster::RedisCluster;
use ratelimit_tests::redis_server::unique_prefix;

fn store(cluster: &RedisCluster, check_timeout: Duration) -> RedisStorage {
    // The two-key layout, so that the test sees each bucket's two keys share a slot.
    let config = RedisConfig::cluster(cluster.urls())
        .with_layout(KeyLayout::TwoKeys)
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
    // The first connection discovers the cluster's topology; wait for the store to answer.
    let first = ratelimit_tests::eventually_from_store(&limiter, "GET /x", "victim").await;
    assert_eq!(first.remaining, 999);

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
    // The replica had the bucket: counting continues from what the old primary held.
    // Replication is asynchronous (the last write may be lost), and a check abandoned at its
    // deadline may still have run, so allow a little slack either way.
    assert!((990..=998).contains(&resumed.remaining), "{resumed:?}");
    assert_ne!(cluster.primary_of(&key), victim);
}

#[test]
fn hosts_hammering_one_bucket_on_the_cluster_admit_exactly_its_capacity() {
    const HOSTS: usize = 3;
    const CHECKS_PER_HOST: usize = 200;
    let cluster = RedisCluster::start(3, 1);
    let prefix = unique_prefix();
    let rules = RuleSet::try_from_rules([(
        "POST /export",
        RateLimitRule::new(RateLimitScope::Global, 40, 0.0001).unwrap(),
    )])
    .unwrap();
    let barrier = Arc::new(std::sync::Barrier::new(HOSTS));
    let hosts: Vec<_> = (0..HOSTS)
        .map(|host| {
            let (urls, rules, prefix, barrier) = (
                cluster.urls(),
                rules.clone(),
                prefix.clone(),
                barrier.clone(),
            );
            std::thread::spawn(move || {
                // Each "host" has its own runtime, pool and cluster connections.
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let config =
                        RedisConfig::cluster(urls).with_check_timeout(Duration::from_secs(5));
                    let store = Arc::new(RedisStorage::new(&config).unwrap());
                    let limiter = Arc::new(
                        TokenBucketAdapter::builder(store, rules)
                            .key_prefix(&prefix)
                            .build()
                            .unwrap(),
                    );
                    barrier.wait();
                    let tasks: Vec<_> = (0..4)
                        .map(|task| {
                            let limiter = limiter.clone();
                            tokio::spawn(async move {
                                let mut admitted = 0;
                                for check in 0..CHECKS_PER_HOST / 4 {
                                    let cost = ((host + task + check) % 3 + 1) as u64;
                                    let result = limiter
                                        .is_allowed_with_cost("POST /export", "-", cost)
                                        .await
                                        .unwrap();
                                    assert_eq!(
                                        result.source,
                                        DecisionSource::Store,
                                        "no check may fail open here"
                                    );
                                    if result.allowed {
                                        admitted += cost;
                                    }
                                }
                                admitted
                            })
                        })
                        .collect();
                    let mut admitted = 0;
                    for task in tasks {
                        admitted += task.await.unwrap();
                    }
                    admitted
                })
            })
        })
        .collect();
    let admitted: u64 = hosts.into_iter().map(|host| host.join().unwrap()).sum();
    // Cost-1 checks outnumber the tokens, so the bucket is always emptied exactly.
    assert_eq!(admitted, 40);
}
