//! The conformance suite, run against every store.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::Duration;

use ratelimit_domain::DynBucketStore;
use ratelimit_memory::MemoryStorage;
use ratelimit_redis::{KeyLayout, RedisConfig, RedisStorage};
use ratelimit_tests::contract::{
    self, key, random_workload, reference_decisions, rule, store_decisions,
};
use ratelimit_tests::redis_server::{TestRedis, unique_prefix};

fn compact_store(url: &str) -> RedisStorage {
    let config = RedisConfig::new(url)
        .with_check_timeout(Duration::from_secs(5))
        .with_layout(KeyLayout::Compact);
    RedisStorage::new(&config).unwrap_or_else(|err| panic!("{err}"))
}

fn redis_store(url: &str) -> RedisStorage {
    // Generous deadlines: these tests are about decisions, not about failing open.
    let config = RedisConfig::new(url).with_check_timeout(Duration::from_secs(5));
    RedisStorage::new(&config).unwrap_or_else(|err| panic!("{err}"))
}

#[tokio::test]
async fn memory_store_passes_the_contract() {
    contract::run_all(&MemoryStorage::new(), &unique_prefix()).await;
}

#[tokio::test]
async fn memory_store_passes_the_contract_through_a_dyn_pointer() {
    // As the adapter and the combinators hold a store.
    let store: DynBucketStore = Arc::new(MemoryStorage::new());
    contract::run_all(&*store, &unique_prefix()).await;
}

#[tokio::test]
async fn redis_store_passes_the_contract() {
    let redis = TestRedis::get();
    contract::run_all(&redis_store(&redis.url), &unique_prefix()).await;
}

#[tokio::test]
async fn redis_store_with_the_compact_layout_passes_the_contract() {
    let redis = TestRedis::get();
    contract::run_all(&compact_store(&redis.url), &unique_prefix()).await;
}

#[tokio::test]
async fn memory_and_redis_agree_step_by_step_on_long_random_workloads() {
    let redis = TestRedis::get();
    let redis_store = redis_store(&redis.url);
    let compact_store = compact_store(&redis.url);
    let prefix = unique_prefix();
    let rules = [rule(10, 7.3), rule(1, 5.0), rule(25, 600.0), rule(3, 0.37)];
    for (i, rule) in rules.iter().enumerate() {
        let seed = 0x5EED_0000 + i as u64;
        let steps = random_workload(seed, 1_500, rule.max_tokens());
        let bucket = key(&prefix, &format!("workload-{i}"), "GET /random");
        let expected = reference_decisions(&steps, rule);
        let memory = store_decisions(&MemoryStorage::new(), &bucket, &steps, rule).await;
        let redis = store_decisions(&redis_store, &bucket, &steps, rule).await;
        let compact = store_decisions(&compact_store, &bucket, &steps, rule).await;
        for (n, step) in steps.iter().enumerate() {
            assert_eq!(
                compact[n], expected[n],
                "redis (compact layout) diverged at step {n} ({step:?}) of seed {seed:#x}"
            );
            assert_eq!(
                memory[n], expected[n],
                "memory diverged at step {n} ({step:?}) of seed {seed:#x}"
            );
            assert_eq!(
                redis[n], expected[n],
                "redis diverged at step {n} ({step:?}) of seed {seed:#x}"
            );
        }
        // The workload must exercise every kind of decision, or it proves little.
        assert!(expected.iter().any(|d| d.allowed));
        assert!(expected.iter().any(|d| !d.allowed && !d.is_never()));
        assert!(expected.iter().any(|d| d.is_never()));
    }
}
