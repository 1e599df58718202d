//! The service over gRPC with a tonic client (Envoy's generated client from `envoy-types`):
//! answers, health, failure policies, live reload (a Kubernetes ConfigMap's symlink swap
//! included), graceful shutdown. Memory store, and a real redis-server where Redis matters.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::{TempDir, client, config_copy, descriptor, eventually, request, start};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use ratelimit_server::config::Unit;
use ratelimit_tests::redis_server::{RedisServer, unreachable_url};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const OK: i32 = Code::Ok as i32;
const OVER_LIMIT: i32 = Code::OverLimit as i32;

#[tokio::test]
async fn answers_every_field_and_checks_all_or_nothing_in_memory() {
    answers_every_field_and_checks_all_or_nothing(&[]).await;
}

#[tokio::test]
async fn answers_every_field_and_checks_all_or_nothing_on_redis() {
    let redis = RedisServer::start();
    for layout in ["compact", "two-keys"] {
        answers_every_field_and_checks_all_or_nothing(&[
            "--redis-url",
            &redis.url(),
            "--redis-layout",
            layout,
        ])
        .await;
    }
}

async fn answers_every_field_and_checks_all_or_nothing(extra: &[&str]) {
    let config = config_copy();
    let server = start(config.path(), extra).await;
    assert_eq!(
        server.container.backend_name(),
        if extra.is_empty() { "memory" } else { "redis" }
    );
    let mut rls = client(&server).await;
    let marketing = descriptor(&[("message_type", "marketing"), ("to_number", "1")], None);
    let per_number = descriptor(&[("to_number", "1")], None);
    for i in 0..5u32 {
        let r = rls
            .should_rate_limit(request(
                "messaging",
                vec![marketing.clone(), per_number.clone()],
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.overall_code, OK, "{r:?}");
        let limit = r.statuses[0].current_limit.clone().unwrap();
        assert_eq!(
            (limit.requests_per_unit, limit.unit, limit.name.as_str()),
            (5, Unit::Day.proto_number(), "")
        );
        assert_eq!(r.statuses[0].limit_remaining, 4 - i);
        assert_eq!(r.statuses[1].limit_remaining, 99 - i);
        // Until full: (i + 1) tokens of 17280 s each (rounded up to whole tokens).
        let until_full = r.statuses[0].duration_until_reset.unwrap();
        let expected = i64::from(i + 1) * 17_280;
        assert!(
            (expected - 60..=expected).contains(&until_full.seconds),
            "{until_full:?}"
        );
    }
    let r = rls
        .should_rate_limit(request(
            "messaging",
            vec![marketing.clone(), per_number.clone()],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.overall_code, OVER_LIMIT);
    assert_eq!(
        (r.statuses[0].code, r.statuses[0].limit_remaining),
        (OVER_LIMIT, 0)
    );
    let wait = r.statuses[0].duration_until_reset.unwrap();
    assert!((17_000..=17_280).contains(&wait.seconds), "{wait:?}");
    assert_eq!(
        (r.statuses[1].code, r.statuses[1].limit_remaining),
        (OK, 95)
    );
    // The refused request took nothing from the per-number bucket.
    let r = rls
        .should_rate_limit(request("messaging", vec![per_number.clone()]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.statuses[0].limit_remaining, 94);
    let metrics = server.service.metrics();
    assert_eq!(
        metrics.decision_count(
            "messaging",
            "messaging.message_type_marketing.to_number",
            "over_limit"
        ),
        1
    );
    assert!(server.shutdown().await);
}

#[tokio::test]
async fn the_same_bucket_twice_in_one_request_counts_both_hits() {
    let config = config_copy();
    let server = start(config.path(), &[]).await;
    let mut rls = client(&server).await;
    let d = descriptor(&[("to_number", "twice")], None);
    let r = rls
        .should_rate_limit(request("messaging", vec![d.clone(), d.clone()]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.overall_code, OK);
    assert_eq!(r.statuses[0].limit_remaining, 98);
    assert_eq!(r.statuses[1].limit_remaining, 98);
    assert!(server.shutdown().await);
}

#[tokio::test]
async fn health_service_reports_serving() {
    let config = config_copy();
    let server = start(config.path(), &[]).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    for service in ["", "envoy.service.ratelimit.v3.RateLimitService"] {
        let answer = health
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.status, ServingStatus::Serving as i32, "{service:?}");
    }
    assert!(server.shutdown().await);
}

#[tokio::test]
async fn a_failing_store_answers_ok_under_open_and_unavailable_under_closed() {
    let config = config_copy();
    let url = unreachable_url();
    let d = || vec![descriptor(&[("to_number", "1")], None)];

    let open = start(
        config.path(),
        &["--redis-url", &url, "--redis-timeout-ms", "200"],
    )
    .await;
    let r = client(&open)
        .await
        .should_rate_limit(request("messaging", d()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.overall_code, OK);
    let text = open.service.metrics().encode().unwrap();
    assert!(
        text.contains("ratelimit_server_store_failures_total{policy=\"open\"} 1"),
        "{text}"
    );
    assert!(open.shutdown().await);

    let closed = start(
        config.path(),
        &[
            "--redis-url",
            &url,
            "--redis-timeout-ms",
            "200",
            "--failure-policy",
            "closed",
        ],
    )
    .await;
    let err = client(&closed)
        .await
        .should_rate_limit(request("messaging", d()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(closed.shutdown().await);
}

#[tokio::test]
async fn redis_goes_away_and_comes_back() {
    let mut redis = RedisServer::start();
    let config = config_copy();
    let server = start(
        config.path(),
        &[
            "--redis-url",
            &redis.url(),
            "--failure-policy",
            "closed",
            "--no-circuit-breaker",
        ],
    )
    .await;
    let mut rls = client(&server).await;
    let d = || vec![descriptor(&[("to_number", "redis")], None)];
    let r = rls
        .should_rate_limit(request("messaging", d()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.overall_code, r.statuses[0].limit_remaining), (OK, 99));
    redis.kill();
    let err = rls
        .should_rate_limit(request("messaging", d()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    redis.restart();
    eventually("Redis to answer again", || {
        let mut rls = rls.clone();
        async move {
            rls.should_rate_limit(request("messaging", d()))
                .await
                .is_ok_and(|r| r.into_inner().overall_code == OK)
        }
    })
    .await;
    assert!(server.shutdown().await);
}

/// A Kubernetes ConfigMap volume: the files are links into `..data`, itself a link to a
/// timestamped directory, swapped atomically on update.
#[cfg(unix)]
#[tokio::test]
async fn reloads_on_a_configmap_symlink_swap_and_keeps_unchanged_buckets() {
    use std::os::unix::fs::symlink;

    let dir = TempDir::new();
    let root = dir.path();
    let messaging = std::fs::read_to_string(format!("{}/messaging.yaml", common::CONFIGS)).unwrap();
    let mongo = std::fs::read_to_string(format!("{}/mongo_cps.yaml", common::CONFIGS)).unwrap();
    let write_version = |name: &str, mongo: &str| {
        let version = root.join(name);
        std::fs::create_dir(&version).unwrap();
        std::fs::write(version.join("messaging.yaml"), &messaging).unwrap();
        std::fs::write(version.join("mongo_cps.yaml"), mongo).unwrap();
    };
    write_version("..2026_11_30_01", &mongo);
    symlink("..2026_11_30_01", root.join("..data")).unwrap();
    symlink("..data/messaging.yaml", root.join("messaging.yaml")).unwrap();
    symlink("..data/mongo_cps.yaml", root.join("mongo_cps.yaml")).unwrap();

    let server = start(root, &[]).await;
    let mut rls = client(&server).await;
    let number = descriptor(&[("to_number", "kept")], None);
    for _ in 0..3 {
        rls.should_rate_limit(request("messaging", vec![number.clone()]))
            .await
            .unwrap();
    }
    let users = || vec![descriptor(&[("database", "users")], Some(0))];
    let version = server.service.config().version().to_owned();

    // The kubelet's update: a new directory, a new `..data` link renamed over the old one.
    write_version("..2026_11_30_02", &mongo.replace("500", "9"));
    symlink("..2026_11_30_02", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();

    eventually("the swapped configuration", || {
        let mut rls = rls.clone();
        async move {
            rls.should_rate_limit(request("mongo_cps", users()))
                .await
                .unwrap()
                .into_inner()
                .statuses[0]
                .current_limit
                .as_ref()
                .is_some_and(|l| l.requests_per_unit == 9)
        }
    })
    .await;
    assert_ne!(server.service.config().version(), version);
    // The unchanged limit kept its bucket: three taken before, one now.
    let r = rls
        .should_rate_limit(request("messaging", vec![number.clone()]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.statuses[0].limit_remaining, 96);
    assert!(server.shutdown().await);
}

#[tokio::test]
async fn an_invalid_configuration_does_not_start() {
    let dir = TempDir::new();
    std::fs::write(
        dir.path().join("bad.yaml"),
        "domain: d\ndescriptors:\n  - value: x\n",
    )
    .unwrap();
    let err = ratelimit_server::run::RunningServer::start(&common::args(dir.path(), &[]))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad.yaml: descriptors[0].key: must not be empty"),
        "{err}"
    );
}

#[tokio::test]
async fn shutdown_finishes_within_its_deadline() {
    let config = config_copy();
    let server = start(config.path(), &["--shutdown-timeout", "5"]).await;
    let grpc = server.grpc_addr;
    let started = std::time::Instant::now();
    assert!(server.shutdown().await);
    assert!(started.elapsed() < Duration::from_secs(5));
    // Nothing listens any more.
    assert!(tokio::net::TcpStream::connect(grpc).await.is_err());
}

#[tokio::test]
async fn response_headers_describe_the_closest_limit() {
    let config = config_copy();
    let server = start(config.path(), &["--response-headers", "both"]).await;
    let mut rls = client(&server).await;
    let ip = || vec![descriptor(&[("remote_address", "192.0.2.7")], None)];
    let headers = |r: &envoy_types::pb::envoy::service::ratelimit::v3::RateLimitResponse| {
        r.response_headers_to_add
            .iter()
            .map(|h| (h.key.clone(), h.value.clone()))
            .collect::<Vec<_>>()
    };
    let first = rls
        .should_rate_limit(request("edge_proxy_per_ip", ip()))
        .await
        .unwrap()
        .into_inner();
    let policy = "\"edge_proxy_per_ip.remote_address\"";
    assert_eq!(
        headers(&first),
        [
            ("x-ratelimit-limit".to_owned(), "10".to_owned()),
            ("x-ratelimit-remaining".to_owned(), "9".to_owned()),
            ("x-ratelimit-reset".to_owned(), "0".to_owned()),
            (
                "ratelimit-policy".to_owned(),
                format!("{policy};q=10;w=3600")
            ),
            ("ratelimit".to_owned(), format!("{policy};r=9;t=0")),
        ]
    );
    for _ in 0..9 {
        rls.should_rate_limit(request("edge_proxy_per_ip", ip()))
            .await
            .unwrap();
    }
    let refused = rls
        .should_rate_limit(request("edge_proxy_per_ip", ip()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(refused.overall_code, OVER_LIMIT);
    let h = headers(&refused);
    // One token every 360 s; the wait is rounded up to whole seconds.
    let reset: u64 = h[2].1.parse().unwrap();
    assert!((350..=360).contains(&reset), "{h:?}");
    assert_eq!(h[1], ("x-ratelimit-remaining".to_owned(), "0".to_owned()));
    assert_eq!(h[4].1, format!("{policy};r=0;t={reset}"));
    // Without the option, no headers.
    let plain = start(config.path(), &[]).await;
    let r = client(&plain)
        .await
        .should_rate_limit(request("edge_proxy_per_ip", ip()))
        .await
        .unwrap()
        .into_inner();
    assert!(r.response_headers_to_add.is_empty());
    assert!(server.shutdown().await);
    assert!(plain.shutdown().await);
}

#[tokio::test]
async fn empty_descriptors_match_nothing_and_overrides_get_their_own_bucket() {
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::RateLimitOverride;

    let config = config_copy();
    let server = start(config.path(), &[]).await;
    let mut rls = client(&server).await;
    let r = rls
        .should_rate_limit(request("messaging", vec![descriptor(&[], None)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.overall_code, OK);
    assert!(r.statuses[0].current_limit.is_none());

    let mut overridden = descriptor(&[("to_number", "override")], None);
    overridden.limit = Some(RateLimitOverride {
        requests_per_unit: 2,
        unit: Unit::Hour.proto_number(),
    });
    for remaining in [1, 0] {
        let r = rls
            .should_rate_limit(request("messaging", vec![overridden.clone()]))
            .await
            .unwrap()
            .into_inner();
        let limit = r.statuses[0].current_limit.clone().unwrap();
        assert_eq!(
            (limit.requests_per_unit, limit.unit),
            (2, Unit::Hour.proto_number())
        );
        assert_eq!(r.statuses[0].limit_remaining, remaining);
    }
    let r = rls
        .should_rate_limit(request("messaging", vec![overridden.clone()]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.overall_code, OVER_LIMIT);
    // The configured limit of the same entries is another bucket, untouched.
    let r = rls
        .should_rate_limit(request(
            "messaging",
            vec![descriptor(&[("to_number", "override")], None)],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.statuses[0].limit_remaining, 99);
    assert!(server.shutdown().await);
}

#[tokio::test]
async fn health_watchers_hear_not_serving_on_shutdown() {
    let config = config_copy();
    let server = start(config.path(), &[]).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "envoy.service.ratelimit.v3.RateLimitService".to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    let stopping = tokio::spawn(server.shutdown());
    let next = tokio::time::timeout(Duration::from_secs(10), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    drop(watch);
    assert!(
        stopping.await.unwrap(),
        "shutdown within its deadline once the watcher left"
    );
}

/// envoyproxy/ratelimit's own layout: `--config` is a link to the directory of the current
/// version, and a deployment swaps the link.
#[cfg(unix)]
#[tokio::test]
async fn reloads_when_the_configuration_link_itself_is_swapped() {
    use std::os::unix::fs::symlink;

    let dir = TempDir::new();
    let root = dir.path();
    let mongo = std::fs::read_to_string(format!("{}/mongo_cps.yaml", common::CONFIGS)).unwrap();
    for (version, limit) in [("v1", "500"), ("v2", "11")] {
        std::fs::create_dir(root.join(version)).unwrap();
        std::fs::write(
            root.join(version).join("mongo_cps.yaml"),
            mongo.replace("500", limit),
        )
        .unwrap();
    }
    symlink("v1", root.join("current")).unwrap();
    let server = start(&root.join("current"), &[]).await;
    let rls = client(&server).await;
    let limit = |mut rls: envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient<tonic::transport::Channel>| async move {
        rls.should_rate_limit(request(
            "mongo_cps",
            vec![descriptor(&[("database", "users")], Some(0))],
        ))
        .await
        .unwrap()
        .into_inner()
        .statuses[0]
            .current_limit
            .as_ref()
            .map_or(0, |l| l.requests_per_unit)
    };
    assert_eq!(limit(rls.clone()).await, 500);
    symlink("v2", root.join("current.tmp")).unwrap();
    std::fs::rename(root.join("current.tmp"), root.join("current")).unwrap();
    eventually("the swapped link's configuration", || {
        let rls = rls.clone();
        async move { limit(rls).await == 11 }
    })
    .await;
    // Edits inside the new directory are watched too.
    std::fs::write(
        root.join("v2").join("mongo_cps.yaml"),
        mongo.replace("500", "12"),
    )
    .unwrap();
    eventually("an edit in the new directory", || {
        let rls = rls.clone();
        async move { limit(rls).await == 12 }
    })
    .await;
    assert!(server.shutdown().await);
}
