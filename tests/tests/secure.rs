//! Secure connections: TLS with a private CA (a certificate this test makes), and an ACL user
//! limited to the commands and keys the limiter needs. Passwords never show.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use ratelimit_domain::{
    BucketRequest, BucketStore, ErrorCode, KeyBuilder, RateLimitRule, RateLimitScope,
};
use ratelimit_redis::{KeyLayout, RedisConfig, RedisStorage};
use ratelimit_tests::contract;
use ratelimit_tests::redis_server::{RedisServer, free_port, unique_prefix};

/// A CA and a server certificate for 127.0.0.1, made with the `openssl` command.
struct Certificates {
    dir: PathBuf,
}

impl Certificates {
    fn make() -> Self {
        let dir = std::env::temp_dir().join(format!("ratelimit-tls-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let run = |args: &[&str]| {
            let out = Command::new("openssl").args(args).current_dir(&dir).output().unwrap_or_else(|err| {
                panic!("the TLS test needs the openssl command (Debian: apt-get install openssl): {err}")
            });
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "1",
            "-subj",
            "/CN=ratelimit test CA",
        ]);
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        std::fs::write(
            dir.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
        ]);
        Self { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

impl Drop for Certificates {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tls_server(certs: &Certificates) -> (RedisServer, u16) {
    let tls_port = free_port();
    let server = RedisServer::start_with_args(&[
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        &certs.path("server.crt"),
        "--tls-key-file",
        &certs.path("server.key"),
        "--tls-ca-cert-file",
        &certs.path("ca.crt"),
        "--tls-auth-clients",
        "no",
    ]);
    (server, tls_port)
}

fn store(config: RedisConfig) -> RedisStorage {
    RedisStorage::new(
        &config
            .with_check_timeout(Duration::from_secs(5))
            .with_admin_timeout(Duration::from_secs(2)),
    )
    .unwrap()
}

#[tokio::test]
async fn the_contract_holds_over_tls_with_a_private_ca() {
    let certs = Certificates::make();
    let (_server, port) = tls_server(&certs);
    let url = format!("rediss://127.0.0.1:{port}/");
    let store = store(RedisConfig::new(&url).with_ca_file(certs.path("ca.crt")));
    store.ping().await.unwrap();
    contract::run_all(&store, &unique_prefix()).await;
}

#[tokio::test]
async fn tls_refuses_a_server_whose_certificate_is_not_trusted() {
    let certs = Certificates::make();
    let (_server, port) = tls_server(&certs);
    // The system's roots do not include the test CA.
    let untrusted = store(RedisConfig::new(format!("rediss://127.0.0.1:{port}/")));
    let err = untrusted.ping().await.unwrap_err();
    assert!(err.code().is_infrastructure(), "{err}");
}

#[tokio::test]
async fn a_missing_ca_file_is_a_configuration_error() {
    let config =
        RedisConfig::new("rediss://127.0.0.1:1/").with_ca_file(Path::new("/nonexistent/ca.pem"));
    let err = RedisStorage::new(&config).unwrap_err();
    assert_eq!(err.code(), ErrorCode::Configuration);
    assert!(err.message().contains("/nonexistent/ca.pem"));
}

/// The ACL line documented in docs/failure.md, for keys under `prefix`.
fn acl_args(prefix: &str) -> Vec<String> {
    ["--user", "limiter", "on", ">s3cret-pass"]
        .iter()
        .map(|s| (*s).to_owned())
        .chain([format!("~{prefix}:*")])
        .chain(
            [
                "resetchannels",
                "&ratelimit:resets",
                "-@all",
                "+publish",
                "+subscribe",
                "+evalsha",
                "+eval",
                "+del",
                "+ping",
                "+info",
                "+get",
                "+mget",
                "+set",
                "+setex",
                "+setrange",
                "+time",
            ]
            .iter()
            .map(|s| (*s).to_owned()),
        )
        .collect()
}

#[tokio::test]
async fn an_acl_user_limited_to_the_limiter_s_commands_and_keys_is_enough() {
    let prefix = unique_prefix();
    let args = acl_args(&prefix);
    let server = RedisServer::start_with_args(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let url = format!("redis://limiter:s3cret-pass@127.0.0.1:{}/", server.port());
    let compact = store(RedisConfig::new(&url).with_coalescing(true));
    contract::run_all(&compact, &prefix).await;
    // Both layouts (the default is the compact one), and checks in batches.
    let two_keys = store(
        RedisConfig::new(&url)
            .with_layout(KeyLayout::TwoKeys)
            .with_coalescing(true),
    );
    contract::run_all(&two_keys, &prefix).await;
    let rule = RateLimitRule::new(RateLimitScope::Ip, 5, 5.0).unwrap();
    for (n, store) in [Arc::new(two_keys), Arc::new(compact)]
        .into_iter()
        .enumerate()
    {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..64 {
            let (store, rule) = (Arc::clone(&store), rule.clone());
            let key = KeyBuilder::new(&prefix, RateLimitScope::Ip, "GET /acl")
                .unwrap()
                .key(&format!("10.{n}.0.{i}"))
                .unwrap();
            set.spawn(async move {
                store
                    .check_and_consume(&BucketRequest::new(&key, &rule))
                    .await
                    .unwrap()
            });
        }
        while let Some(done) = set.join_next().await {
            assert_eq!(done.unwrap().remaining, 4);
        }
        assert!(
            store.coalescing_stats().batches > 0,
            "{n}: no batch was sent"
        );
    }
    let store = store(RedisConfig::new(&url));

    // Keys outside the prefix are refused: the user cannot touch other data.
    let foreign = KeyBuilder::new("someone_else", RateLimitScope::Ip, "GET /x")
        .unwrap()
        .key("1.2.3.4")
        .unwrap();
    let rule = RateLimitRule::new(RateLimitScope::Ip, 5, 5.0).unwrap();
    let err = store
        .check_and_consume(&BucketRequest::new(&foreign, &rule).with_cost(1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), ErrorCode::StorageError, "{err}");
}

#[tokio::test]
async fn passwords_never_appear_in_errors_or_debug_output() {
    // Nothing listens there; the error and the Debug output must still hide the password.
    let url = format!("redis://limiter:hunter2-secret@127.0.0.1:{}/", free_port());
    let config = RedisConfig::new(&url)
        .with_check_timeout(Duration::from_millis(100))
        .with_admin_timeout(Duration::from_millis(200));
    let store = RedisStorage::new(&config).unwrap();
    let err = store.ping().await.unwrap_err();
    for shown in [
        format!("{err}"),
        format!("{err:?}"),
        format!("{store:?}"),
        format!("{config:?}"),
    ] {
        assert!(
            !shown.contains("hunter2-secret"),
            "password leaked: {shown}"
        );
    }
    let bad =
        RedisStorage::new(&RedisConfig::new("redis://u:hunter2-secret@[not a host")).unwrap_err();
    assert!(!format!("{bad} {bad:?}").contains("hunter2-secret"));
}
