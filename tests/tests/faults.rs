//! Faults injected into a real `redis-server`: the circuit breaker, the failure policies, and
//! Redis refusing writes (out of memory, read-only replica).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::Duration;

use ratelimit_adapter::{
    CircuitBreakerConfig, CircuitBreakerStore, CircuitState, TokenBucketAdapter,
};
use ratelimit_container::{Backend, Container, ContainerConfig, RedisConfig};
use ratelimit_domain::{
    DecisionSource, FailurePolicy, RateLimitRule, RateLimitScope, RateLimiter, RateLimiterExt,
    RuleSet,
};
use ratelimit_redis::RedisStorage;
use ratelimit_tests::redis_server::RedisServer;

const LOGIN: &str = "POST /api/v1/sessions";

fn rules() -> RuleSet {
    RuleSet::try_from_rules([(
        LOGIN,
        RateLimitRule::new(RateLimitScope::Ip, 5, 5.0).unwrap(),
    )])
    .unwrap()
}

fn redis(server: &RedisServer) -> RedisConfig {
    RedisConfig::new(server.url())
        .with_check_timeout(Duration::from_millis(200))
        .with_admin_timeout(Duration::from_millis(500))
}

async fn limiter_with(server: &RedisServer, policy: FailurePolicy) -> Arc<dyn RateLimiter> {
    let config = ContainerConfig::redis(server.url(), rules())
        .with_backend(Backend::Redis(redis(server)))
        .with_failure_policy(policy)
        .with_event_logging(false);
    Container::build(config).await.unwrap().rate_limiter()
}

#[tokio::test]
async fn the_circuit_opens_while_redis_is_down_and_closes_when_it_is_back() {
    let mut server = RedisServer::start();
    let store = Arc::new(RedisStorage::new(&redis(&server)).unwrap());
    let breaker = Arc::new(CircuitBreakerStore::new(
        store,
        CircuitBreakerConfig::new(3, Duration::from_millis(200)),
    ));
    let limiter = TokenBucketAdapter::builder(breaker.clone(), rules())
        .build()
        .unwrap();
    assert_eq!(
        limiter
            .is_allowed(LOGIN, "1.1.1.1")
            .await
            .unwrap()
            .remaining,
        4
    );

    server.kill();
    for _ in 0..20 {
        let result = limiter.is_allowed(LOGIN, "1.1.1.1").await.unwrap();
        assert!(result.allowed);
        assert_eq!(result.source, DecisionSource::FailOpen);
    }
    // Open, or half-open if a loaded machine let the cool-down pass: never closed.
    assert_ne!(breaker.state(), CircuitState::Closed);
    assert!(
        breaker.short_circuited() >= 10,
        "checks kept waiting on a dead Redis: {}",
        breaker.short_circuited()
    );

    server.restart();
    let back = ratelimit_tests::eventually_from_store(&limiter, LOGIN, "1.1.1.1").await;
    assert_eq!(back.remaining, 4, "restarted empty: a full bucket");
    assert_eq!(breaker.state(), CircuitState::Closed);
}

#[tokio::test]
async fn the_closed_policy_denies_while_redis_is_down() {
    let mut server = RedisServer::start();
    let limiter = limiter_with(&server, FailurePolicy::Closed).await;
    assert!(limiter.is_allowed(LOGIN, "2.2.2.2").await.unwrap().allowed);
    server.kill();
    let result = limiter.is_allowed(LOGIN, "2.2.2.2").await.unwrap();
    assert!(!result.allowed);
    assert_eq!(result.source, DecisionSource::FailClosed);
    server.restart();
    assert!(
        ratelimit_tests::eventually_from_store(&*limiter, LOGIN, "2.2.2.2")
            .await
            .allowed
    );
}

#[tokio::test]
async fn the_local_policy_keeps_limiting_per_host_while_redis_is_down() {
    let mut server = RedisServer::start();
    let limiter = limiter_with(&server, FailurePolicy::Local).await;
    assert_eq!(
        limiter
            .is_allowed(LOGIN, "3.3.3.3")
            .await
            .unwrap()
            .remaining,
        4
    );
    server.kill();
    // The local bucket is new, so it starts full: five allowed, then denied.
    for expected in [4, 3, 2, 1, 0] {
        let result = limiter.is_allowed(LOGIN, "3.3.3.3").await.unwrap();
        assert!(result.allowed);
        assert_eq!(
            (result.remaining, result.source),
            (expected, DecisionSource::LocalFallback)
        );
    }
    let denied = limiter.is_allowed(LOGIN, "3.3.3.3").await.unwrap();
    assert!(!denied.allowed);
    assert_eq!(denied.source, DecisionSource::LocalFallback);
    server.restart();
    assert_eq!(
        ratelimit_tests::eventually_from_store(&*limiter, LOGIN, "3.3.3.3")
            .await
            .remaining,
        4
    );
}

#[tokio::test]
async fn out_of_memory_fails_open_and_limiting_resumes_when_memory_is_freed() {
    let server = RedisServer::start_with_args(&["--maxmemory-policy", "noeviction"]);
    let limiter = limiter_with(&server, FailurePolicy::Open).await;
    assert_eq!(
        limiter
            .is_allowed(LOGIN, "4.4.4.4")
            .await
            .unwrap()
            .remaining,
        4
    );

    // Fill Redis with a value of its own, then lower maxmemory below what it uses.
    let filler = "x".repeat(4 * 1024 * 1024);
    server.cmd(redis::cmd("SET").arg("filler").arg(&filler));
    server.cmd(redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("2mb"));
    let result = limiter.is_allowed(LOGIN, "4.4.4.4").await.unwrap();
    assert!(result.allowed);
    assert_eq!(result.source, DecisionSource::FailOpen);

    server.cmd(redis::cmd("DEL").arg("filler"));
    assert_eq!(
        ratelimit_tests::eventually_from_store(&*limiter, LOGIN, "4.4.4.4")
            .await
            .remaining,
        3
    );
}

#[tokio::test]
async fn a_read_only_replica_fails_open_and_promotion_resumes_limiting() {
    let server = RedisServer::start();
    let limiter = limiter_with(&server, FailurePolicy::Open).await;
    assert_eq!(
        limiter
            .is_allowed(LOGIN, "5.5.5.5")
            .await
            .unwrap()
            .remaining,
        4
    );

    // Demote to a replica of a master that does not exist: writes answer READONLY.
    let dead = ratelimit_tests::redis_server::free_port();
    server.cmd(redis::cmd("REPLICAOF").arg("127.0.0.1").arg(dead));
    let result = limiter.is_allowed(LOGIN, "5.5.5.5").await.unwrap();
    assert!(result.allowed);
    assert_eq!(result.source, DecisionSource::FailOpen);
    let err = limiter.reset(LOGIN, "5.5.5.5").await.unwrap_err();
    assert_eq!(err.code(), ratelimit_domain::ErrorCode::ResetFailed);

    // Promote it back, as a failover would: limiting resumes by itself.
    server.cmd(redis::cmd("REPLICAOF").arg("NO").arg("ONE"));
    let back = ratelimit_tests::eventually_from_store(&*limiter, LOGIN, "5.5.5.5").await;
    assert!(back.allowed);
}

#[tokio::test]
async fn killed_client_connections_are_replaced() {
    let server = RedisServer::start();
    let limiter = limiter_with(&server, FailurePolicy::Open).await;
    assert_eq!(
        limiter
            .is_allowed(LOGIN, "6.6.6.6")
            .await
            .unwrap()
            .remaining,
        4
    );
    // Kill every normal client connection (the pool's), as an operator or a proxy might.
    server.cmd(
        redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("normal")
            .arg("SKIPME")
            .arg("yes"),
    );
    assert_eq!(
        ratelimit_tests::eventually_from_store(&*limiter, LOGIN, "6.6.6.6")
            .await
            .remaining,
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_flush_under_load_never_reaches_the_caller_and_loses_no_count() {
    let server = RedisServer::start();
    let rules = RuleSet::try_from_rules([(
        LOGIN,
        RateLimitRule::new(RateLimitScope::Global, 300, 0.0001).unwrap(),
    )])
    .unwrap();
    let store = Arc::new(
        RedisStorage::new(&redis(&server).with_check_timeout(Duration::from_secs(5))).unwrap(),
    );
    let limiter = Arc::new(
        TokenBucketAdapter::builder(store.clone(), rules)
            .build()
            .unwrap(),
    );
    // Load the script, so that every later reload is caused by a flush.
    assert!(limiter.is_allowed(LOGIN, "-").await.unwrap().allowed);
    let reloads_before = store.script_reloads();
    let flushing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    // Checks run for as long as the flusher does, and at least 50 per task.
    let load: Vec<_> = (0..8)
        .map(|_| {
            let (limiter, flushing) = (limiter.clone(), flushing.clone());
            tokio::spawn(async move {
                let (mut admitted, mut checks) = (0, 0);
                while checks < 50 || flushing.load(std::sync::atomic::Ordering::Acquire) {
                    let result = limiter.is_allowed(LOGIN, "-").await.unwrap();
                    assert_eq!(
                        result.source,
                        DecisionSource::Store,
                        "NOSCRIPT must never turn into a fail-open"
                    );
                    admitted += u32::from(result.allowed);
                    checks += 1;
                }
                admitted
            })
        })
        .collect();
    // Flush the script cache again and again while the checks run.
    let flusher = {
        let (url, flushing) = (server.url(), flushing.clone());
        tokio::task::spawn_blocking(move || {
            let client = redis::Client::open(url).unwrap();
            let mut conn = client.get_connection().unwrap();
            for _ in 0..20 {
                let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut conn).unwrap();
                std::thread::sleep(Duration::from_millis(5));
            }
            flushing.store(false, std::sync::atomic::Ordering::Release);
        })
    };
    let mut admitted = 1; // the warm-up check
    for task in load {
        admitted += task.await.unwrap();
    }
    flusher.await.unwrap();
    // More checks than tokens on a bucket of 300 with no refill: exactly 300 admitted, none
    // lost or doubled by a resend.
    assert_eq!(admitted, 300);
    assert!(
        store.script_reloads() > reloads_before,
        "the flushes during the load should have forced a resend"
    );
}

#[tokio::test]
async fn an_admin_deadline_longer_than_half_a_second_is_honoured() {
    // redis-rs gives up on a reply after 500 ms by default; the store's own deadlines must be
    // the only ones, or a reset allowed 3 s would fail after 0.5 s.
    let server = RedisServer::start();
    let store = RedisStorage::new(
        &RedisConfig::new(server.url())
            .with_check_timeout(Duration::from_millis(200))
            .with_admin_timeout(Duration::from_secs(3)),
    )
    .unwrap();
    store.ping().await.unwrap();
    let key = ratelimit_domain::KeyBuilder::new("pause", RateLimitScope::Ip, LOGIN)
        .unwrap()
        .key("1.2.3.4")
        .unwrap();
    let rule = RateLimitRule::new(RateLimitScope::Ip, 5, 5.0).unwrap();
    server.cmd(redis::cmd("CLIENT").arg("PAUSE").arg(900).arg("ALL"));
    let started = std::time::Instant::now();
    ratelimit_domain::BucketStore::reset(&store, &key, &rule)
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(700),
        "the reset should have waited for the pause: {:?}",
        started.elapsed()
    );
}
