//! Hostile data in Redis, on Redis's own clock (no explicit `now`, as the adapter runs): a key
//! of another type, a time that is NaN or far in the future, a Redis clock behind the bucket's.
//! The bit-for-bit differential of every stored value against the reference step is in
//! `tests/contract.rs`; these follow what a client sees.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use ratelimit_domain::{BucketKey, BucketRequest, BucketStore, ErrorCode, RateLimitRule};
use ratelimit_redis::{KeyLayout, RedisConfig, RedisStorage};
use ratelimit_tests::contract::{compact_bytes, key, rule};
use ratelimit_tests::redis_server::{TestRedis, unique_prefix};

const LAYOUTS: [KeyLayout; 2] = [KeyLayout::TwoKeys, KeyLayout::Compact];

fn store(url: &str, layout: KeyLayout) -> RedisStorage {
    let config = RedisConfig::new(url)
        .with_check_timeout(Duration::from_secs(5))
        .with_layout(layout);
    RedisStorage::new(&config).unwrap()
}

/// A Redis, a connection to it and a key prefix of the test's own.
fn setup() -> (TestRedis, redis::Connection, String) {
    let redis = TestRedis::get();
    let conn = connection(&redis.url);
    (redis, conn, unique_prefix())
}

/// A store on `url` in each layout.
fn stores(url: &str) -> impl Iterator<Item = (KeyLayout, RedisStorage)> + '_ {
    LAYOUTS
        .into_iter()
        .map(move |layout| (layout, store(url, layout)))
}

fn connection(url: &str) -> redis::Connection {
    redis::Client::open(url).unwrap().get_connection().unwrap()
}

/// Redis's clock, in seconds.
fn redis_time(conn: &mut redis::Connection) -> f64 {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query(conn).unwrap();
    secs as f64 + micros as f64 / 1e6
}

fn ttl(conn: &mut redis::Connection, name: &str) -> i64 {
    redis::cmd("TTL").arg(name).query(conn).unwrap()
}

/// Writes `tokens` and `last` into the bucket's key(s) with a lifetime of `ttl` seconds, in the
/// layout's format. Returns the names of the keys.
fn write_bucket(
    conn: &mut redis::Connection,
    layout: KeyLayout,
    bucket: &BucketKey,
    tokens: &str,
    last: &str,
    ttl: u64,
) -> Vec<String> {
    let set = |conn: &mut redis::Connection, name: &str, value: Vec<u8>| {
        let _: () = redis::cmd("SETEX")
            .arg(name)
            .arg(ttl)
            .arg(value)
            .query(conn)
            .unwrap();
    };
    if layout == KeyLayout::Compact {
        let name = format!("{}:tb", bucket.as_str());
        let number = |text: &str| text.parse::<f64>().unwrap();
        set(
            conn,
            &name,
            compact_bytes(number(tokens), number(last), u32::MAX),
        );
        vec![name]
    } else {
        let names = vec![
            format!("{}:tokens", bucket.as_str()),
            format!("{}:time", bucket.as_str()),
        ];
        set(conn, &names[0], tokens.as_bytes().to_vec());
        set(conn, &names[1], last.as_bytes().to_vec());
        names
    }
}

async fn take(store: &RedisStorage, bucket: &BucketKey, rule: &RateLimitRule) -> (bool, f64) {
    let d = store
        .check_and_consume(&BucketRequest::new(bucket, rule).with_cost(1))
        .await
        .unwrap();
    (d.allowed, d.retry_after.as_secs_f64())
}

#[tokio::test]
async fn a_key_of_another_type_is_a_corrupt_bucket_and_other_buckets_carry_on() {
    let (redis, mut conn, prefix) = setup();
    let rule = rule(5, 5.0);
    for (layout, store) in stores(&redis.url) {
        let suffixes: &[&str] = if layout == KeyLayout::Compact {
            &[":tb"]
        } else {
            &[":tokens", ":time"]
        };
        for (i, suffix) in suffixes.iter().enumerate() {
            let bucket = key(&prefix, &format!("{layout:?}-{i}"), "GET /typed");
            let name = format!("{}{suffix}", bucket.as_str());
            let _: () = redis::cmd("HSET")
                .arg(&name)
                .arg("tokens")
                .arg("0")
                .query(&mut conn)
                .unwrap();
            for _ in 0..10 {
                let err = store
                    .check_and_consume(&BucketRequest::new(&bucket, &rule).with_cost(1))
                    .await
                    .unwrap_err();
                assert_eq!(
                    err.code(),
                    ErrorCode::CorruptBucket,
                    "{layout:?} {suffix}: {err}"
                );
                assert!(!err.code().is_store_failure());
                assert_eq!(
                    err.details().get("key").map(String::as_str),
                    Some(bucket.as_str())
                );
                let err = store.get_remaining(&bucket, &rule, None).await.unwrap_err();
                assert_eq!(
                    err.code(),
                    ErrorCode::CorruptBucket,
                    "{layout:?} {suffix}: {err}"
                );
            }
            // Other buckets are decided as usual, on the same connections.
            let other = key(&prefix, &format!("{layout:?}-other-{i}"), "GET /typed");
            assert_eq!(take(&store, &other, &rule).await, (true, 0.0));
            // A reset clears the key whatever its type, and the bucket works again.
            assert!(store.reset(&bucket, &rule).await.unwrap());
            assert_eq!(take(&store, &bucket, &rule).await, (true, 0.0));
        }
    }
}

#[tokio::test]
async fn a_far_future_time_neither_locks_a_bucket_nor_keeps_it_alive() {
    let (redis, mut conn, prefix) = setup();
    let rule = rule(5, 5.0); // refill time 60 s; keys live 120 s
    for (layout, store) in stores(&redis.url) {
        let bucket = key(&prefix, &format!("{layout:?}"), "GET /future");
        let now = redis_time(&mut conn);
        // Empty, a million seconds ahead, with a short lifetime left.
        let names = write_bucket(
            &mut conn,
            layout,
            &bucket,
            "0",
            &format!("{:?}", now + 1e6),
            30,
        );
        // It reads as a missing bucket: full, as of now. (Before: denied with a wait of a
        // million seconds, and every denial wrote the time back and renewed the lifetime.)
        for expected_remaining in [4, 3, 2, 1, 0] {
            let d = store
                .check_and_consume(&BucketRequest::new(&bucket, &rule).with_cost(1))
                .await
                .unwrap();
            assert!(d.allowed, "{layout:?}: {d:?}");
            assert_eq!(d.remaining, expected_remaining);
        }
        let (allowed, wait) = take(&store, &bucket, &rule).await;
        assert!(!allowed);
        assert!(wait <= 12.0, "{layout:?}: retry after {wait} s");
        // The bucket's time is now Redis's, and its keys live no longer than the rule's.
        for name in &names {
            assert!(ttl(&mut conn, name) <= 120, "{layout:?} {name}");
        }
    }
}

#[tokio::test]
async fn a_nan_time_does_not_make_a_bucket_unlimited() {
    let (redis, mut conn, prefix) = setup();
    let rule = rule(5, 5.0);
    for (layout, store) in stores(&redis.url) {
        let bucket = key(&prefix, &format!("{layout:?}"), "GET /nan");
        write_bucket(&mut conn, layout, &bucket, "0", "NaN", 3_600);
        // Before: Lua's math.min(5, NaN) is 5 and the NaN time was kept, so every check passed.
        let mut allowed = 0;
        for _ in 0..50 {
            if take(&store, &bucket, &rule).await.0 {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 5, "{layout:?}");
    }
}

#[tokio::test]
async fn a_redis_clock_behind_the_bucket_counts_in_retry_after() {
    let (redis, mut conn, prefix) = setup();
    let rule = rule(5, 60.0); // one token per second
    for (layout, store) in stores(&redis.url) {
        let bucket = key(&prefix, &format!("{layout:?}"), "GET /skew");
        // Written by a primary whose clock was 10 s ahead of this one (a failover).
        let now = redis_time(&mut conn);
        write_bucket(
            &mut conn,
            layout,
            &bucket,
            "0",
            &format!("{:?}", now + 10.0),
            70,
        );
        let (allowed, wait) = take(&store, &bucket, &rule).await;
        assert!(!allowed, "{layout:?}: a skew of 10 s is honoured");
        // 10 s until this clock reaches the bucket's time, then 1 s for the token. Before:
        // "1 s", for 11 s.
        assert!(
            (10.5..=11.0).contains(&wait),
            "{layout:?}: retry after {wait} s"
        );
    }
}
