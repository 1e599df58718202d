//! Faults injected into a real `redis-server`: the circuit breaker, the failure policies,
//! Redis refusing writes (out of memory, read-only replica), Redis unreachable, paused, killed
//! and restarted, and its scripts flushed.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::Arc;
use std::time::{Duration, Instant};

use ratelimit_adapter::{
    CircuitBreakerConfig, CircuitBreakerStore, CircuitState, TokenBucketAdapter,
};
use ratelimit_container::{Backend, Container, ContainerConfig, RedisConfig};
use ratelimit_domain::{
    BucketRequest, BucketStore, DecisionSource, ErrorCode, FailurePolicy, RateLimitEvent,
    RateLimitRule, RateLimitScope, RateLimiter, RateLimiterExt, RuleSet,
};
use ratelimit_redis::RedisStorage;
use ratelimit_tests::eventually_from_store;
use ratelimit_tests::fixtures::{LOGIN, login_rules as rules};
use ratelimit_tests::logs::CapturedLogs;
use ratelimit_tests::redis_server::{
    RedisServer, TestRedis, kill_normal_clients, unique_prefix, unreachable_url,
};

fn redis(server: &RedisServer) -> RedisConfig {
    RedisConfig::new(server.url())
        .with_check_timeout(Duration::from_millis(200))
        .with_admin_timeout(Duration::from_millis(500))
}

/// What a login check of `identifier` leaves.
async fn remaining(limiter: &dyn RateLimiter, identifier: &str) -> u64 {
    limiter
        .is_allowed(LOGIN, identifier)
        .await
        .unwrap()
        .remaining
}

/// What a login check of `identifier` leaves, once the store decides again.
async fn remaining_once_back(limiter: &dyn RateLimiter, identifier: &str) -> u64 {
    eventually_from_store(limiter, LOGIN, identifier)
        .await
        .remaining
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
    assert_eq!(remaining(&limiter, "1.1.1.1").await, 4);

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
    let back = eventually_from_store(&limiter, LOGIN, "1.1.1.1").await;
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
        eventually_from_store(&*limiter, LOGIN, "2.2.2.2")
            .await
            .allowed
    );
}

#[tokio::test]
async fn the_local_policy_keeps_limiting_per_host_while_redis_is_down() {
    let mut server = RedisServer::start();
    let limiter = limiter_with(&server, FailurePolicy::Local).await;
    assert_eq!(remaining(&*limiter, "3.3.3.3").await, 4);
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
    assert_eq!(remaining_once_back(&*limiter, "3.3.3.3").await, 4);
}

#[tokio::test]
async fn out_of_memory_fails_open_and_limiting_resumes_when_memory_is_freed() {
    let server = RedisServer::start_with_args(&["--maxmemory-policy", "noeviction"]);
    let limiter = limiter_with(&server, FailurePolicy::Open).await;
    assert_eq!(remaining(&*limiter, "4.4.4.4").await, 4);

    // Fill Redis with a value of its own, then lower maxmemory below what it uses.
    let filler = "x".repeat(4 * 1024 * 1024);
    server.cmd(redis::cmd("SET").arg("filler").arg(&filler));
    server.cmd(redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("2mb"));
    let result = limiter.is_allowed(LOGIN, "4.4.4.4").await.unwrap();
    assert!(result.allowed);
    assert_eq!(result.source, DecisionSource::FailOpen);

    server.cmd(redis::cmd("DEL").arg("filler"));
    assert_eq!(remaining_once_back(&*limiter, "4.4.4.4").await, 3);
}

#[tokio::test]
async fn a_read_only_replica_fails_open_and_promotion_resumes_limiting() {
    let server = RedisServer::start();
    let limiter = limiter_with(&server, FailurePolicy::Open).await;
    assert_eq!(remaining(&*limiter, "5.5.5.5").await, 4);

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
    let back = eventually_from_store(&*limiter, LOGIN, "5.5.5.5").await;
    assert!(back.allowed);
}

#[tokio::test]
async fn killed_client_connections_are_replaced() {
    let server = RedisServer::start();
    let limiter = limiter_with(&server, FailurePolicy::Open).await;
    assert_eq!(remaining(&*limiter, "6.6.6.6").await, 4);
    // Kill every normal client connection (the pool's), as an operator or a proxy might.
    server.cmd(&kill_normal_clients());
    assert_eq!(remaining_once_back(&*limiter, "6.6.6.6").await, 3);
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

// Redis unreachable, paused, killed and restarted, and its scripts flushed.

#[tokio::test]
async fn unreachable_redis_fails_open_within_the_deadline_and_says_so() {
    let (logs, _guard) = CapturedLogs::install();

    // Nothing listens on this port.
    let url = unreachable_url();
    let timeout = Duration::from_millis(200);
    let config = ContainerConfig::redis(&url, rules())
        .with_backend(Backend::Redis(
            RedisConfig::new(&url)
                .with_check_timeout(timeout)
                .with_admin_timeout(timeout),
        ))
        .with_event_logging(false);
    let container = Container::build(config).await.unwrap();
    let mut events = container.events().subscribe();
    let limiter = container.rate_limiter();

    for _ in 0..3 {
        let started = Instant::now();
        let result = limiter.is_allowed(LOGIN, "192.168.1.1").await.unwrap();
        let took = started.elapsed();
        assert!(result.allowed);
        assert_eq!(result.source, DecisionSource::FailOpen);
        assert_eq!((result.remaining, result.limit), (5, 5));
        // A deadline, not a benchmark: the check must not hang past its timeout.
        assert!(
            took < timeout + Duration::from_secs(1),
            "check took {took:?}"
        );
    }
    let _attempted = events.try_recv().unwrap();
    let RateLimitEvent::Allowed(allowed) = events.try_recv().unwrap() else {
        panic!("expected an Allowed event")
    };
    assert_eq!(allowed.source, DecisionSource::FailOpen);
    assert!(
        logs.text().contains("fail-open"),
        "no fail-open warning in: {}",
        logs.text()
    );

    // Admin operations do not fail open.
    let err = limiter.reset(LOGIN, "192.168.1.1").await.unwrap_err();
    assert_eq!(err.code(), ErrorCode::ResetFailed);
    assert!(logs.text().contains("rate limit reset failed"));
}

#[tokio::test]
async fn a_paused_redis_fails_open_within_the_deadline_and_limiting_resumes() {
    let server = RedisServer::start();
    let timeout = Duration::from_millis(100);
    let store =
        RedisStorage::new(&RedisConfig::new(server.url()).with_check_timeout(timeout)).unwrap();
    let limiter = TokenBucketAdapter::builder(Arc::new(store), rules())
        .build()
        .unwrap();
    assert_eq!(remaining(&limiter, "1.1.1.1").await, 4);

    server.pause();
    let started = Instant::now();
    let result = limiter.is_allowed(LOGIN, "1.1.1.1").await.unwrap();
    let took = started.elapsed();
    server.resume();
    assert_eq!(result.source, DecisionSource::FailOpen);
    assert!(
        took < timeout + Duration::from_secs(1),
        "check took {took:?}"
    );

    // Once Redis answers again, its decisions are back (the abandoned connection is dropped).
    // The abandoned command sat in the socket buffer and ran when Redis woke up, so it may
    // have taken its token: 3 left without it, 2 with it, never more.
    let resumed = eventually_from_store(&limiter, LOGIN, "1.1.1.1").await;
    assert!(matches!(resumed.remaining, 2 | 3), "{resumed:?}");
}

#[tokio::test]
async fn limiting_resumes_after_redis_is_killed_and_restarted_empty() {
    let mut server = RedisServer::start();
    let store = RedisStorage::new(
        &RedisConfig::new(server.url()).with_check_timeout(Duration::from_millis(500)),
    )
    .unwrap();
    let store = Arc::new(store);
    let limiter = TokenBucketAdapter::builder(store.clone(), rules())
        .build()
        .unwrap();
    assert_eq!(remaining(&limiter, "1.1.1.1").await, 4);

    server.kill();
    let down = limiter.is_allowed(LOGIN, "1.1.1.1").await.unwrap();
    assert_eq!(down.source, DecisionSource::FailOpen);

    server.restart(); // same port, no data, no scripts
    let back = eventually_from_store(&limiter, LOGIN, "1.1.1.1").await;
    assert_eq!(
        back.remaining, 4,
        "the restarted Redis starts with a full bucket"
    );
    assert!(
        store.script_reloads() >= 1,
        "the lost script must have been reloaded"
    );
    for expected in [3, 2, 1, 0] {
        assert_eq!(remaining(&limiter, "1.1.1.1").await, expected);
    }
    assert!(!limiter.is_allowed(LOGIN, "1.1.1.1").await.unwrap().allowed);
}

#[tokio::test]
async fn a_flushed_script_is_reloaded_and_limiting_continues() {
    let redis = TestRedis::get();
    let store =
        RedisStorage::new(&RedisConfig::new(&redis.url).with_check_timeout(Duration::from_secs(5)))
            .unwrap();
    let prefix = unique_prefix();
    let key = ratelimit_domain::KeyBuilder::new(&prefix, RateLimitScope::Ip, LOGIN)
        .unwrap()
        .key("1.1.1.1")
        .unwrap();
    let rule = RateLimitRule::new(RateLimitScope::Ip, 3, 1.0).unwrap();
    let take = || async {
        store
            .check_and_consume(&BucketRequest::new(&key, &rule).with_cost(1))
            .await
            .unwrap()
    };

    assert_eq!(take().await.remaining, 2);
    let reloads_before = store.script_reloads();
    let client = redis::Client::open(redis.url.as_str()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let _: () = redis::cmd("SCRIPT").arg("FLUSH").query(&mut conn).unwrap();

    // The original would now fail open for ever; this store reloads and keeps counting.
    let d = take().await;
    assert_eq!(d.remaining, 1);
    assert_eq!(store.script_reloads(), reloads_before + 1);
    assert_eq!(take().await.remaining, 0);
    assert!(!take().await.allowed);
    assert_eq!(
        store.script_reloads(),
        reloads_before + 1,
        "one reload is enough"
    );
}
