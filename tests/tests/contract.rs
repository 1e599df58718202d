//! The conformance suite, run against every store.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::Duration;

use ratelimit_adapter::{CircuitBreakerConfig, CircuitBreakerStore, DenyCacheStore};
use ratelimit_domain::token_bucket::{self, BucketState};
use ratelimit_domain::{BucketRequest, BucketStore, DynBucketStore};
use ratelimit_memory::MemoryStorage;
use ratelimit_redis::{KeyLayout, RedisConfig, RedisStorage};
use ratelimit_tests::contract::{
    self, GarbageValue, T0, key, random_workload, reference_decisions, rule, store_decisions,
    stored_garbage,
};
use ratelimit_tests::redis_server::{TestRedis, unique_prefix};
use ratelimit_tests::stored;

fn compact_store(url: &str) -> RedisStorage {
    let config = RedisConfig::new(url)
        .with_check_timeout(Duration::from_secs(5))
        .with_layout(KeyLayout::Compact);
    RedisStorage::new(&config).unwrap_or_else(|err| panic!("{err}"))
}

fn redis_store(url: &str) -> RedisStorage {
    // Generous deadlines: these tests are about decisions, not about failing open.
    let config = RedisConfig::new(url)
        .with_layout(KeyLayout::TwoKeys)
        .with_check_timeout(Duration::from_secs(5));
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

// Each store layer over each store. The suite passes an explicit `now` with every check, and
// the deny cache answers from its cache only checks without one (its wall-clock deadlines do not
// apply to a caller's clock), so it is held to the very same decisions as the store it wraps:
// nothing of the suite differs for it. `deny_cache_answers_repeats_as_the_store_would` below takes
// the cache's own path over each store.

fn breaker<S: BucketStore + 'static>(store: S) -> CircuitBreakerStore {
    CircuitBreakerStore::new(Arc::new(store), CircuitBreakerConfig::default())
}

fn deny_cache<S: BucketStore + 'static>(store: S) -> DenyCacheStore {
    DenyCacheStore::new(Arc::new(store), 1_000)
}

#[tokio::test]
async fn memory_store_passes_the_multi_limit_contract() {
    contract::run_multi(&MemoryStorage::new(), &unique_prefix()).await;
}

#[tokio::test]
async fn layers_over_memory_pass_the_multi_limit_contract() {
    contract::run_multi(&breaker(MemoryStorage::new()), &unique_prefix()).await;
    contract::run_multi(&deny_cache(MemoryStorage::new()), &unique_prefix()).await;
    let stacked = deny_cache(breaker(MemoryStorage::new()));
    contract::run_multi(&stacked, &unique_prefix()).await;
}

#[tokio::test]
async fn redis_stores_pass_the_multi_limit_contract() {
    let redis = TestRedis::get();
    contract::run_multi(&redis_store(&redis.url), &unique_prefix()).await;
    contract::run_multi(&compact_store(&redis.url), &unique_prefix()).await;
    let stacked = deny_cache(breaker(compact_store(&redis.url)));
    contract::run_multi(&stacked, &unique_prefix()).await;
}

#[tokio::test]
async fn circuit_breaker_over_memory_passes_the_contract() {
    contract::run_all(&breaker(MemoryStorage::new()), &unique_prefix()).await;
}

#[tokio::test]
async fn deny_cache_over_memory_passes_the_contract() {
    contract::run_all(&deny_cache(MemoryStorage::new()), &unique_prefix()).await;
}

#[tokio::test]
async fn circuit_breaker_over_redis_passes_the_contract() {
    let redis = TestRedis::get();
    contract::run_all(&breaker(redis_store(&redis.url)), &unique_prefix()).await;
}

#[tokio::test]
async fn deny_cache_over_redis_passes_the_contract() {
    let redis = TestRedis::get();
    contract::run_all(&deny_cache(redis_store(&redis.url)), &unique_prefix()).await;
}

#[tokio::test]
async fn deny_cache_over_a_circuit_breaker_over_redis_passes_the_contract() {
    // As the container stacks them: store, then breaker, then deny cache.
    let redis = TestRedis::get();
    let store = deny_cache(breaker(redis_store(&redis.url)));
    contract::run_all(&store, &unique_prefix()).await;
}

/// The deny cache's own path, which the suite above never takes (it passes an explicit `now`):
/// on the store's clock, repeats of a denial are answered from the cache with the store's
/// decision, and a reset through the cache lets the next check reach the store again.
async fn deny_cache_answers_repeats_as_the_store_would(inner: DynBucketStore, prefix: &str) {
    let cache = DenyCacheStore::new(inner.clone(), 1_000);
    // Two tokens, one a minute: a denial lasts about a minute, far longer than this test.
    let rule = rule(2, 1.0);
    let k = key(prefix, "203.0.113.9", "POST /login");
    let request = BucketRequest::new(&k, &rule).with_cost(1);
    let check = || cache.check_and_consume(&request);
    assert!(check().await.unwrap().allowed);
    assert!(check().await.unwrap().allowed);
    let first = check().await.unwrap();
    assert!(!first.allowed);
    for _ in 0..100 {
        let again = check().await.unwrap();
        assert!(!again.allowed);
        assert_eq!(again.remaining, first.remaining);
        assert!(again.retry_after <= first.retry_after);
    }
    assert_eq!(cache.hits(), 100, "the repeats did not come from the cache");
    // The store agrees with every cached answer: still no whole token.
    assert_eq!(inner.get_remaining(&k, &rule, None).await.unwrap(), 0);
    assert!(cache.reset(&k, &rule).await.unwrap());
    assert!(
        check().await.unwrap().allowed,
        "a reset did not clear the cached denial"
    );
    assert_eq!(cache.hits(), 100);
}

/// The deny cache's own path with several limits: a request refused by the shared limit is
/// refused from the cache afterwards, the client's own bucket is never charged, and a reset of
/// the refusing bucket through the cache lets requests reach the store again.
async fn deny_cache_answers_multi_limit_repeats(inner: DynBucketStore, prefix: &str) {
    let cache = DenyCacheStore::new(inner.clone(), 1_000);
    let own = contract::named("per-client", ratelimit_domain::RateLimitScope::Ip, 10, 1.0);
    let shared = contract::named("everyone", ratelimit_domain::RateLimitScope::Global, 2, 1.0);
    let own_key = contract::limit_key(prefix, &own, "203.0.113.9", "GET /search");
    let shared_key = contract::limit_key(prefix, &shared, "203.0.113.9", "GET /search");
    let requests = [
        BucketRequest::new(&own_key, own.rule()),
        BucketRequest::new(&shared_key, shared.rule()),
    ];
    let check = || cache.check_and_consume_all(&requests);
    assert!(check().await.unwrap().iter().all(|d| d.allowed));
    assert!(check().await.unwrap().iter().all(|d| d.allowed));
    let refused = check().await.unwrap();
    assert!(refused[0].allowed && !refused[1].allowed, "{refused:?}");
    for _ in 0..50 {
        let again = check().await.unwrap();
        assert!(!again[1].allowed);
        assert!(again[1].retry_after <= refused[1].retry_after);
    }
    assert_eq!(cache.hits(), 50, "the repeats did not come from the cache");
    assert_eq!(
        inner
            .get_remaining(&own_key, own.rule(), None)
            .await
            .unwrap(),
        8,
        "refused requests charged the client's own bucket"
    );
    assert!(cache.reset(&shared_key, shared.rule()).await.unwrap());
    assert!(check().await.unwrap().iter().all(|d| d.allowed));
    assert_eq!(cache.hits(), 50);
}

#[tokio::test]
async fn deny_cache_over_memory_answers_multi_limit_repeats() {
    deny_cache_answers_multi_limit_repeats(Arc::new(MemoryStorage::new()), &unique_prefix()).await;
}

#[tokio::test]
async fn deny_cache_over_redis_answers_multi_limit_repeats() {
    let redis = TestRedis::get();
    for store in [redis_store(&redis.url), compact_store(&redis.url)] {
        deny_cache_answers_multi_limit_repeats(Arc::new(store), &unique_prefix()).await;
    }
}

#[tokio::test]
async fn deny_cache_over_memory_answers_repeats_as_the_store_would() {
    deny_cache_answers_repeats_as_the_store_would(Arc::new(MemoryStorage::new()), &unique_prefix())
        .await;
}

#[tokio::test]
async fn deny_cache_over_redis_answers_repeats_as_the_store_would() {
    let redis = TestRedis::get();
    for store in [redis_store(&redis.url), compact_store(&redis.url)] {
        deny_cache_answers_repeats_as_the_store_would(Arc::new(store), &unique_prefix()).await;
    }
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

/// The layout of a store under test: compact or two keys.
fn layout_of(compact: bool) -> KeyLayout {
    if compact {
        KeyLayout::Compact
    } else {
        KeyLayout::TwoKeys
    }
}

#[tokio::test]
async fn hostile_stored_values_decide_as_the_reference_step_in_both_layouts() {
    let redis = TestRedis::get();
    let spec = redis_store(&redis.url);
    let compact = compact_store(&redis.url);
    let client = redis::Client::open(redis.url.as_str()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let prefix = unique_prefix();
    let rules = [rule(5, 5.0), rule(10, 600.0), rule(3, 0.37)];
    let mut n = 0_u64;
    for (i, rule) in rules.iter().enumerate() {
        let (max, rate) = (rule.max_tokens(), rule.refill_rate());
        for garbage in stored_garbage(max, rate, T0, 0xBAD_DA7A + i as u64) {
            let is_compact = matches!(garbage.value, GarbageValue::Compact(_));
            let store: &RedisStorage = if is_compact { &compact } else { &spec };
            for cost in [0, 1, max, max + 1] {
                n += 1;
                let bucket = key(&prefix, &format!("garbage-{n}"), "GET /garbage");
                let context = format!("{} (rule {max} per {rate}/min, cost {cost})", garbage.name);
                stored::seed(&mut conn, &bucket, &garbage.value);
                let before = stored::raw(&mut conn, &bucket, layout_of(is_compact));
                let expected = token_bucket::step(garbage.reads_as, max, rate, cost, T0);
                let got = store
                    .check_and_consume(&BucketRequest::new(&bucket, rule).with_cost(cost).at(T0))
                    .await
                    .unwrap_or_else(|err| panic!("{context}: {err}"));
                assert_eq!(got, expected.decision, "{context}");
                // The store keeps what the step stores, bit for bit, or leaves the value alone.
                match expected.store {
                    Some(BucketState { tokens, last }) => assert_eq!(
                        stored::written(&mut conn, &bucket, layout_of(is_compact)),
                        (tokens.to_bits(), last.to_bits()),
                        "{context}"
                    ),
                    None => assert_eq!(
                        stored::raw(&mut conn, &bucket, layout_of(is_compact)),
                        before,
                        "{context}"
                    ),
                }
                // The next check decides from what is there as the step does.
                let state = expected.store.or(garbage.reads_as);
                let next = token_bucket::step(state, max, rate, 1, T0 + 1.0);
                let got = store
                    .check_and_consume(&BucketRequest::new(&bucket, rule).with_cost(1).at(T0 + 1.0))
                    .await
                    .unwrap_or_else(|err| panic!("{context}, next check: {err}"));
                assert_eq!(got, next.decision, "{context}, next check");
            }
        }
    }
    assert!(n > 5_000, "only {n} cases");
}
