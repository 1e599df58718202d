//! The limiter against a real `redis-server`: the specification end to end, the key layouts,
//! concurrency and the deny cache. What happens when Redis misbehaves is in `faults.rs`.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::{Duration, Instant};

use ratelimit_container::{Backend, Container, ContainerConfig, RedisConfig};
use ratelimit_domain::{
    BucketRequest, BucketStore, DecisionSource, ErrorCode, RateLimitEvent, RateLimitRule,
    RateLimitScope, RateLimiterExt, RuleSet,
};
use ratelimit_redis::{KeyLayout, RedisStorage};
use ratelimit_tests::fixtures::{EXPORT, LOGIN};
use ratelimit_tests::redis_server::{RedisServer, TestRedis, unique_prefix, unreachable_url};

fn rules() -> RuleSet {
    RuleSet::try_from_rules([
        (
            LOGIN,
            RateLimitRule::new(RateLimitScope::Ip, 5, 5.0).unwrap(),
        ),
        (
            EXPORT,
            RateLimitRule::new(RateLimitScope::User, 10, 1.0)
                .unwrap()
                .with_cost(3)
                .unwrap(),
        ),
        (
            "GET /api/v1/status",
            RateLimitRule::new(RateLimitScope::Global, 100, 6000.0).unwrap(),
        ),
    ])
    .unwrap()
}

/// The two-key layout, whose keys, values and compatibility with the original these tests
/// inspect (the compact layout's have tests of their own).
fn redis_config(url: &str) -> RedisConfig {
    RedisConfig::new(url)
        .with_layout(KeyLayout::TwoKeys)
        .with_check_timeout(Duration::from_secs(5))
}

async fn container(url: &str, prefix: &str) -> Container {
    let config = ContainerConfig::redis(url, rules())
        .with_backend(Backend::Redis(redis_config(url)))
        .with_key_prefix(prefix)
        .with_event_logging(false);
    Container::build(config).await.unwrap()
}

fn get(redis: &TestRedis, key: &str) -> Option<String> {
    let client = redis::Client::open(redis.url.as_str()).unwrap();
    let mut conn = client.get_connection().unwrap();
    redis::cmd("GET").arg(key).query(&mut conn).unwrap()
}

fn ttl(redis: &TestRedis, key: &str) -> i64 {
    let client = redis::Client::open(redis.url.as_str()).unwrap();
    let mut conn = client.get_connection().unwrap();
    redis::cmd("TTL").arg(key).query(&mut conn).unwrap()
}

#[tokio::test]
async fn the_specification_end_to_end_on_redis() {
    let redis = TestRedis::get();
    let prefix = unique_prefix();
    let container = container(&redis.url, &prefix).await;
    let limiter = container.rate_limiter();
    let mut events = container.events().subscribe();

    // First request leaves 4 of 5; consecutive requests count down; the sixth is denied.
    for expected in [4, 3, 2, 1, 0] {
        let result = limiter.is_allowed(LOGIN, "192.168.1.1").await.unwrap();
        assert!(result.allowed);
        assert_eq!(result.remaining, expected);
        assert_eq!((result.limit, result.reset_seconds), (5, 120));
        assert_eq!(result.source, DecisionSource::Store);
    }
    let denied = limiter.is_allowed(LOGIN, "192.168.1.1").await.unwrap();
    assert!(!denied.allowed);
    // Redis's clock moved on since the bucket was emptied: a little under 12 s (the bound
    // leaves room for a slow machine; exact values are checked with explicit times in the
    // contract suite).
    assert!(
        denied.retry_after <= Duration::from_secs(12)
            && denied.retry_after > Duration::from_secs(6),
        "{denied:?}"
    );
    assert!(matches!(denied.retry_after_whole_seconds(), Some(7..=12)));

    // Events: attempted + allowed five times, then attempted + denied.
    let mut kinds = Vec::new();
    while let Ok(event) = events.try_recv() {
        if let RateLimitEvent::Denied(d) = &event {
            assert_eq!(
                (&*d.endpoint, &*d.identifier, d.scope),
                (LOGIN, "192.168.1.1", RateLimitScope::Ip)
            );
            assert_eq!(d.retry_after, denied.retry_after);
        }
        kinds.push(event.kind());
    }
    let mut expected = ["attempted", "allowed"].repeat(5);
    expected.extend(["attempted", "denied"]);
    assert_eq!(kinds, expected);

    // Other identifiers and endpoints are untouched; get_remaining consumes nothing.
    assert_eq!(
        limiter
            .is_allowed(LOGIN, "192.168.1.2")
            .await
            .unwrap()
            .remaining,
        4
    );
    assert_eq!(
        limiter.get_remaining(LOGIN, "192.168.1.2").await.unwrap(),
        4
    );
    assert_eq!(
        limiter.get_remaining(LOGIN, "192.168.1.2").await.unwrap(),
        4
    );

    // Cost: the rule's 3, then an explicit 5, out of 10.
    assert_eq!(
        limiter.is_allowed(EXPORT, "alice").await.unwrap().remaining,
        7
    );
    assert_eq!(
        limiter
            .is_allowed_with_cost(EXPORT, "alice", 5)
            .await
            .unwrap()
            .remaining,
        2
    );
    let never = limiter
        .is_allowed_with_cost(EXPORT, "alice", 11)
        .await
        .unwrap();
    assert!(!never.allowed && never.retry_never());

    // Reset restores the bucket.
    limiter.reset(LOGIN, "192.168.1.1").await.unwrap();
    assert_eq!(
        limiter.get_remaining(LOGIN, "192.168.1.1").await.unwrap(),
        5
    );
    assert!(
        limiter
            .is_allowed(LOGIN, "192.168.1.1")
            .await
            .unwrap()
            .allowed
    );

    // Global scope: one bucket for everyone.
    limiter.is_allowed("GET /api/v1/status", "a").await.unwrap();
    let shared = limiter.is_allowed("GET /api/v1/status", "b").await.unwrap();
    assert_eq!(shared.remaining, 98);
}

#[tokio::test]
async fn keys_values_and_ttls_follow_the_documented_layout() {
    let redis = TestRedis::get();
    let prefix = unique_prefix();
    let limiter = container(&redis.url, &prefix).await.rate_limiter();
    limiter.is_allowed(LOGIN, "2001:db8::1").await.unwrap();

    let base = format!("{prefix}:ip:2001:db8::1:{LOGIN}");
    let tokens = get(&redis, &format!("{base}:tokens")).expect("tokens key");
    let time = get(&redis, &format!("{base}:time")).expect("time key");
    // Decimal strings, as the original stores them; the first request left 4 tokens.
    assert_eq!(tokens.parse::<f64>().unwrap(), 4.0);
    let stored_time: f64 = time.parse().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (stored_time - now).abs() < 60.0,
        "stored time {stored_time} is Redis's TIME, near {now}"
    );
    // TTL: ceil(5 / 5 * 60) + 60 = 120 s.
    for suffix in [":tokens", ":time"] {
        let ttl = ttl(&redis, &format!("{base}{suffix}"));
        assert!((118..=120).contains(&ttl), "ttl {ttl}");
    }
    // Global buckets have no identifier.
    limiter
        .is_allowed("GET /api/v1/status", "whoever")
        .await
        .unwrap();
    assert!(
        get(
            &redis,
            &format!("{prefix}:global:GET /api/v1/status:tokens")
        )
        .is_some()
    );
}

#[tokio::test]
async fn buckets_written_by_the_original_service_are_read() {
    let redis = TestRedis::get();
    let prefix = unique_prefix();
    let client = redis::Client::open(redis.url.as_str()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let base = format!("{prefix}:ip:10.1.1.1:{LOGIN}");
    // What the Python service leaves behind: an integer count and a float time, via SETEX.
    let _: () = redis::cmd("SETEX")
        .arg(format!("{base}:tokens"))
        .arg(120)
        .arg("2")
        .query(&mut conn)
        .unwrap();
    let _: () = redis::cmd("SETEX")
        .arg(format!("{base}:time"))
        .arg(120)
        .arg("1700000000.5")
        .query(&mut conn)
        .unwrap();
    let store = RedisStorage::new(&redis_config(&redis.url)).unwrap();
    let key = ratelimit_domain::KeyBuilder::new(&prefix, RateLimitScope::Ip, LOGIN)
        .unwrap()
        .key("10.1.1.1")
        .unwrap();
    let rule = RateLimitRule::new(RateLimitScope::Ip, 5, 5.0).unwrap();
    // 6 s later half a token has come back: 2.5 tokens, one taken, 1 whole left.
    let decision = store
        .check_and_consume(
            &BucketRequest::new(&key, &rule)
                .with_cost(1)
                .at(1_700_000_006.5),
        )
        .await
        .unwrap();
    assert!(decision.allowed);
    assert_eq!(decision.remaining, 1);
}

#[tokio::test]
async fn connect_reads_the_redis_version_and_accepts_this_one() {
    let redis = TestRedis::get();
    let store = RedisStorage::connect(&redis_config(&redis.url))
        .await
        .unwrap();
    store.check_version().await.unwrap();
    // Nothing listens on a free port: the error says Redis is unreachable, not too old.
    let nowhere = unreachable_url();
    let err =
        RedisStorage::connect(&redis_config(&nowhere).with_admin_timeout(Duration::from_secs(1)))
            .await
            .unwrap_err();
    assert_ne!(err.code(), ErrorCode::Configuration, "{err}");
    assert!(err.code().is_store_failure(), "{err}");
}

#[tokio::test]
async fn connect_works_for_a_user_not_allowed_to_read_info() {
    // The minimal ACL of docs/failure.md has no +info: the version cannot be read, which is
    // logged, and connect checks that Redis answers instead.
    let server = RedisServer::start_with_args(&[
        "--user",
        "limiter",
        "on",
        ">pw",
        "~*",
        "-@all",
        "+ping",
        "+evalsha",
        "+eval",
        "+get",
        "+mget",
        "+set",
        "+setex",
        "+setrange",
        "+time",
        "+del",
    ]);
    let url = format!("redis://limiter:pw@127.0.0.1:{}/", server.port());
    let store = RedisStorage::connect(&redis_config(&url)).await.unwrap();
    let key = ratelimit_domain::KeyBuilder::new("acl", RateLimitScope::Ip, LOGIN)
        .unwrap()
        .key("1.2.3.4")
        .unwrap();
    let rule = RateLimitRule::new(RateLimitScope::Ip, 5, 5.0).unwrap();
    assert!(
        store
            .check_and_consume(&BucketRequest::new(&key, &rule).with_cost(1))
            .await
            .unwrap()
            .allowed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_concurrent_checks_on_a_bucket_of_ten_admit_exactly_ten() {
    let redis = TestRedis::get();
    let prefix = unique_prefix();
    let rules = RuleSet::try_from_rules([(
        "POST /hot",
        RateLimitRule::new(RateLimitScope::Global, 10, 0.01).unwrap(),
    )])
    .unwrap();
    let config = ContainerConfig::redis(&redis.url, rules)
        .with_backend(Backend::Redis(redis_config(&redis.url).with_pool_size(4)))
        .with_key_prefix(&prefix)
        .with_event_logging(false);
    let limiter = Container::build(config).await.unwrap().rate_limiter();
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let limiter = limiter.clone();
            tokio::spawn(async move {
                limiter
                    .is_allowed("POST /hot", &format!("client-{i}"))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut admitted = 0;
    for task in tasks {
        let result = task.await.unwrap();
        assert_eq!(
            result.source,
            DecisionSource::Store,
            "no check may fail open here"
        );
        admitted += usize::from(result.allowed);
    }
    assert_eq!(admitted, 10);
}

#[tokio::test]
async fn hostile_identifiers_and_endpoints_never_share_a_bucket_on_redis() {
    let redis = TestRedis::get();
    let prefix = unique_prefix();
    let endpoints = [
        "GET /a",
        "GET /a:b",
        "GET /{a}",
        "GET /a%3Ab",
        "GET /日本\n",
    ];
    let rules = RuleSet::try_from_rules(
        endpoints.map(|e| (e, RateLimitRule::new(RateLimitScope::User, 3, 1.0).unwrap())),
    )
    .unwrap();
    let config = ContainerConfig::redis(&redis.url, rules)
        .with_backend(Backend::Redis(redis_config(&redis.url)))
        .with_key_prefix(&prefix)
        .with_event_logging(false);
    let limiter = Container::build(config).await.unwrap().rate_limiter();

    let megabyte = "m".repeat(1 << 20);
    let mut identifiers: Vec<String> = [
        "a",
        "a:b",
        "b",
        "a:",
        ":a",
        "{a}",
        "a%3Ab",
        "%25",
        "%",
        "%H",
        "\n",
        "a\0",
        "é",
        "e\u{301}",
        "::1",
        "::ffff:1.2.3.4",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    identifiers.push(megabyte.clone());
    identifiers.push(format!("{megabyte}x"));
    identifiers.push("x".repeat(257));
    identifiers.push("x".repeat(256));

    for endpoint in endpoints {
        for identifier in &identifiers {
            let result = limiter.is_allowed(endpoint, identifier).await.unwrap();
            assert_eq!(result.source, DecisionSource::Store);
            assert_eq!(
                result.remaining,
                2,
                "{endpoint:?} / {:?} found a used bucket",
                &identifier[..identifier.len().min(20)]
            );
        }
    }
    // Each bucket was used exactly once.
    for endpoint in endpoints {
        for identifier in &identifiers {
            assert_eq!(
                limiter.get_remaining(endpoint, identifier).await.unwrap(),
                2
            );
        }
    }
    // Empty identifiers are rejected, never mapped to a shared bucket.
    assert_eq!(
        limiter.is_allowed("GET /a", "").await.unwrap_err().code(),
        ErrorCode::InvalidInput
    );
}

#[tokio::test]
async fn the_compact_layout_keeps_one_binary_key_per_bucket() {
    let redis = TestRedis::get();
    let prefix = unique_prefix();
    let config = ContainerConfig::redis(&redis.url, rules())
        .with_backend(Backend::Redis(
            redis_config(&redis.url).with_layout(ratelimit_redis::KeyLayout::Compact),
        ))
        .with_key_prefix(&prefix)
        .with_event_logging(false);
    let limiter = Container::build(config).await.unwrap().rate_limiter();
    assert_eq!(
        limiter
            .is_allowed(LOGIN, "9.9.9.9")
            .await
            .unwrap()
            .remaining,
        4
    );

    let base = format!("{prefix}:ip:9.9.9.9:{LOGIN}");
    assert!(get(&redis, &format!("{base}:tokens")).is_none());
    let client = redis::Client::open(redis.url.as_str()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let raw: Vec<u8> = redis::cmd("GET")
        .arg(format!("{base}:tb"))
        .query(&mut conn)
        .unwrap();
    assert_eq!(raw.len(), 20, "two little-endian doubles and the expiry");
    let tokens = f64::from_le_bytes(raw[..8].try_into().unwrap());
    assert_eq!(tokens, 4.0);
    let ttl = ttl(&redis, &format!("{base}:tb"));
    assert!((118..=120).contains(&ttl), "ttl {ttl}");

    limiter.reset(LOGIN, "9.9.9.9").await.unwrap();
    let gone: Option<Vec<u8>> = redis::cmd("GET")
        .arg(format!("{base}:tb"))
        .query(&mut conn)
        .unwrap();
    assert!(gone.is_none());
}

/// A compact bucket's value: tokens, last refill time and the recorded expiry (whole seconds).
fn compact_value(conn: &mut redis::Connection, key: &str) -> (f64, f64, u32) {
    let raw: Vec<u8> = redis::cmd("GET").arg(key).query(conn).unwrap();
    assert_eq!(raw.len(), 20, "{key}: {raw:?}");
    (
        f64::from_le_bytes(raw[..8].try_into().unwrap()),
        f64::from_le_bytes(raw[8..16].try_into().unwrap()),
        u32::from_le_bytes(raw[16..].try_into().unwrap()),
    )
}

fn pttl(conn: &mut redis::Connection, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query(conn).unwrap()
}

fn pexpire(conn: &mut redis::Connection, key: &str, ms: u64) {
    let set: bool = redis::cmd("PEXPIRE").arg(key).arg(ms).query(conn).unwrap();
    assert!(set, "{key} exists");
}

/// Redis's clock, in seconds.
fn redis_time(conn: &mut redis::Connection) -> f64 {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query(conn).unwrap();
    secs as f64 + micros as f64 / 1e6
}

/// Whole seconds of a Redis time, as a compact bucket records its expiry.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // times of today fit
fn whole_seconds(time: f64) -> u32 {
    time.floor() as u32
}

/// Writes a compact bucket's value by hand, with a lifetime of `ttl` seconds.
fn set_compact(conn: &mut redis::Connection, key: &str, value: (f64, f64, u32), ttl: u64) {
    let mut raw = value.0.to_le_bytes().to_vec();
    raw.extend_from_slice(&value.1.to_le_bytes());
    raw.extend_from_slice(&value.2.to_le_bytes());
    let _: () = redis::cmd("SETEX")
        .arg(key)
        .arg(ttl)
        .arg(raw)
        .query(conn)
        .unwrap();
}

#[tokio::test]
async fn the_compact_layout_renews_a_key_lifetime_only_when_its_bucket_needs_it() {
    let redis = TestRedis::get();
    let prefix = unique_prefix();
    let store = RedisStorage::new(
        &redis_config(&redis.url).with_layout(ratelimit_redis::KeyLayout::Compact),
    )
    .unwrap();
    let bucket = |identifier: &str| {
        let key = ratelimit_domain::KeyBuilder::new(&prefix, RateLimitScope::Ip, LOGIN)
            .unwrap()
            .key(identifier)
            .unwrap();
        let tb = format!("{}:tb", key.as_str());
        (key, tb)
    };
    // Full after 60 s; keys live 120 s.
    let rule = RateLimitRule::new(RateLimitScope::Ip, 10, 10.0).unwrap();
    assert_eq!(rule.storage_ttl_seconds(), 120);
    let client = redis::Client::open(redis.url.as_str()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let check = |key: &ratelimit_domain::BucketKey, cost: u64, now: Option<f64>| {
        let store = &store;
        let rule = &rule;
        let key = key.clone();
        async move {
            store
                .check_and_consume(&BucketRequest::new(&key, rule).with_cost(cost).with_now(now))
                .await
                .unwrap()
        }
    };
    let lifetime_kept = |conn: &mut redis::Connection, tb: &str| {
        let pttl = pttl(conn, tb);
        assert!((1..=30_000).contains(&pttl), "{tb}: PTTL {pttl}");
    };
    let lifetime_renewed = |conn: &mut redis::Connection, tb: &str| {
        let pttl = pttl(conn, tb);
        assert!((110_000..=120_000).contains(&pttl), "{tb}: PTTL {pttl}");
    };

    // A new bucket gets the full lifetime, recorded in its value on Redis's clock.
    let (key, tb) = bucket("10.2.2.2");
    let before = redis_time(&mut conn);
    assert_eq!(check(&key, 1, None).await.remaining, 9);
    let after = redis_time(&mut conn);
    let (tokens, last, expires) = compact_value(&mut conn, &tb);
    assert_eq!(tokens, 9.0);
    assert!(before <= last && last <= after, "{before} {last} {after}");
    assert_eq!(f64::from(expires), (last + 120.0).floor());
    lifetime_renewed(&mut conn, &tb);

    // Shorten the real lifetime, so that a renewal would show. Taking 2 more leaves a bucket
    // 18 s from full, well within the recorded expiry: the numbers are overwritten in place
    // and the expiry is kept.
    pexpire(&mut conn, &tb, 30_000);
    assert_eq!(check(&key, 2, None).await.remaining, 7);
    assert_eq!(compact_value(&mut conn, &tb).2, expires);
    lifetime_kept(&mut conn, &tb);
    // Draining it (60 s from full) and a denied check still fit: kept.
    assert_eq!(check(&key, 7, None).await.remaining, 0);
    let denied = check(&key, 1, None).await;
    assert!(!denied.allowed);
    assert_eq!(compact_value(&mut conn, &tb).2, expires);
    lifetime_kept(&mut conn, &tb);

    // When the recorded expiry comes within the refill time plus 30 s, the next write (a
    // denied one here) renews the lifetime.
    let now = redis_time(&mut conn);
    let (tokens, last, _) = compact_value(&mut conn, &tb);
    set_compact(
        &mut conn,
        &tb,
        (tokens, last, whole_seconds(now + 80.0)),
        80,
    );
    assert!(!check(&key, 1, None).await.allowed);
    let (_, _, renewed) = compact_value(&mut conn, &tb);
    assert!(
        f64::from(renewed) >= (now + 119.0).floor(),
        "{renewed} {now}"
    );
    lifetime_renewed(&mut conn, &tb);

    // A bucket whose `last` is ahead of Redis's clock (written by a primary whose clock ran
    // ahead, before a failover) fills up only `refill time` after that `last`: an expiry that
    // would cover the refill from now, but not from `last`, is renewed.
    let (key, tb) = bucket("10.5.5.5");
    let now = redis_time(&mut conn);
    set_compact(
        &mut conn,
        &tb,
        (0.0, now + 100.0, whole_seconds(now + 170.0)),
        170,
    );
    assert!(!check(&key, 1, None).await.allowed);
    let (tokens, last, _) = compact_value(&mut conn, &tb);
    assert_eq!((tokens, last), (0.0, now + 100.0));
    lifetime_renewed(&mut conn, &tb);

    // A bucket written by the previous version of the script (16 bytes, no expiry recorded) is
    // read, and its next write renews the lifetime and records the expiry.
    let (key, tb) = bucket("10.3.3.3");
    let now = redis_time(&mut conn);
    let mut old = 4.0_f64.to_le_bytes().to_vec();
    old.extend_from_slice(&now.to_le_bytes());
    let _: () = redis::cmd("SETEX")
        .arg(&tb)
        .arg(30)
        .arg(old)
        .query(&mut conn)
        .unwrap();
    assert_eq!(check(&key, 1, None).await.remaining, 3);
    let (tokens, _, expires) = compact_value(&mut conn, &tb);
    // 4 tokens, plus what refilled since `now`, minus 1.
    assert!((3.0..3.1).contains(&tokens), "{tokens}");
    assert!(f64::from(expires) >= (now + 119.0).floor());
    lifetime_renewed(&mut conn, &tb);

    // With an explicit `now` (another clock than Redis's), every write renews the lifetime and
    // records no expiry.
    let (key, tb) = bucket("10.4.4.4");
    const T0: f64 = 1_700_000_000.0;
    assert_eq!(check(&key, 1, Some(T0)).await.remaining, 9);
    assert_eq!(compact_value(&mut conn, &tb), (9.0, T0, 0));
    pexpire(&mut conn, &tb, 30_000);
    assert_eq!(check(&key, 1, Some(T0 + 1.0)).await.remaining, 8);
    lifetime_renewed(&mut conn, &tb);
    // Reading consumes nothing and writes nothing.
    let value = compact_value(&mut conn, &tb);
    assert_eq!(
        store
            .get_remaining(&key, &rule, Some(T0 + 1.0))
            .await
            .unwrap(),
        8
    );
    assert_eq!(compact_value(&mut conn, &tb), value);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deny_cache_absorbs_a_flood_and_a_reset_on_another_host_clears_it() {
    // A server of its own: the test counts the EVALSHA calls Redis receives.
    let server = ratelimit_tests::redis_server::RedisServer::start();
    let redis = TestRedis {
        url: server.url(),
        server: Some(server),
    };
    let prefix = unique_prefix();
    let host = |cache: bool| {
        let mut config = ContainerConfig::redis(&redis.url, rules())
            .with_backend(Backend::Redis(redis_config(&redis.url)))
            .with_key_prefix(&prefix)
            .with_event_logging(false);
        if cache {
            config = config.with_deny_cache(1_000);
        }
        Container::build(config)
    };
    let cached = host(true).await.unwrap().rate_limiter();
    let admin = host(false).await.unwrap().rate_limiter();
    // Give the cache's pub/sub subscription a moment to be established.
    tokio::time::sleep(Duration::from_millis(200)).await;

    for _ in 0..5 {
        assert!(cached.is_allowed(LOGIN, "7.7.7.7").await.unwrap().allowed);
    }
    let client = redis::Client::open(redis.url.as_str()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let calls = |conn: &mut redis::Connection| -> u64 {
        let stats: String = redis::cmd("INFO").arg("commandstats").query(conn).unwrap();
        stats
            .lines()
            .find(|line| line.starts_with("cmdstat_evalsha:"))
            .and_then(|line| line.split(['=', ',']).nth(1))
            .and_then(|calls| calls.parse().ok())
            .unwrap_or(0)
    };
    let before = calls(&mut conn);
    for _ in 0..200 {
        let denied = cached.is_allowed(LOGIN, "7.7.7.7").await.unwrap();
        assert!(!denied.allowed);
        assert!(denied.retry_after <= Duration::from_secs(12));
    }
    let reached_redis = calls(&mut conn) - before;
    assert!(
        reached_redis <= 1,
        "{reached_redis} of 200 denied checks reached Redis"
    );

    // The support desk resets the bucket from another host: the cache hears it and lets the
    // next request through.
    admin.reset(LOGIN, "7.7.7.7").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if cached.is_allowed(LOGIN, "7.7.7.7").await.unwrap().allowed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the reset never reached the other host's deny cache"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
