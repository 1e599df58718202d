//! Shared support of the server's integration tests: a copy of the test configurations, a
//! server in this process or as the real binary, clients.

#![allow(dead_code, unreachable_pub)] // each test binary uses a part

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::google::protobuf::UInt64Value;
use ratelimit_server::run::{RunningServer, ServerArgs};
use tonic::transport::Channel;

/// The test configurations (envoyproxy/ratelimit README examples).
pub const CONFIGS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/configs");

/// A temporary directory, removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("rls-test-{}", uuid_like()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{}-{nanos}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A fresh copy of the test configurations.
pub fn config_copy() -> TempDir {
    let dir = TempDir::new();
    for entry in std::fs::read_dir(CONFIGS).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

/// Arguments for a server on free loopback ports over `config`, plus `extra`.
pub fn args(config: &Path, extra: &[&str]) -> ServerArgs {
    let mut argv = vec![
        "ratelimit-server".to_owned(),
        "--config".to_owned(),
        config.display().to_string(),
        "--grpc-listen".to_owned(),
        "127.0.0.1:0".to_owned(),
        "--http-listen".to_owned(),
        "127.0.0.1:0".to_owned(),
        "--key-prefix".to_owned(),
        format!("rls_test_{}", uuid_like().replace('-', "_")),
    ];
    argv.extend(extra.iter().map(|s| (*s).to_owned()));
    let mut args = <ServerArgs as clap::Parser>::try_parse_from(argv).unwrap();
    // Without an explicit --redis-url the memory store, even when REDIS_URL is set for the
    // workspace's other tests.
    if !extra.contains(&"--redis-url") {
        args.redis_url = None;
    }
    args
}

/// A server in this process.
pub async fn start(config: &Path, extra: &[&str]) -> RunningServer {
    RunningServer::start(&args(config, extra)).await.unwrap()
}

/// A gRPC client of `server`.
pub async fn client(server: &RunningServer) -> RateLimitServiceClient<Channel> {
    RateLimitServiceClient::connect(format!("http://{}", server.grpc_addr))
        .await
        .unwrap()
}

/// A descriptor of `entries`, with its own hits_addend when given.
pub fn descriptor(entries: &[(&str, &str)], hits: Option<u64>) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries
            .iter()
            .map(|(k, v)| Entry {
                key: (*k).to_owned(),
                value: (*v).to_owned(),
            })
            .collect(),
        hits_addend: hits.map(|value| UInt64Value { value }),
        ..RateLimitDescriptor::default()
    }
}

/// A request of `domain` with `descriptors`.
pub fn request(domain: &str, descriptors: Vec<RateLimitDescriptor>) -> RateLimitRequest {
    RateLimitRequest {
        domain: domain.to_owned(),
        descriptors,
        hits_addend: 0,
    }
}

/// Polls `condition` every 100 ms for up to 30 s.
pub async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if condition().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out after 30 s waiting for {what}");
}

/// The real binary, as a child process, stopped on drop.
#[derive(Debug)]
pub struct ServerProcess {
    pub child: Child,
    pub grpc: String,
    pub http: String,
    pub log: PathBuf,
}

impl ServerProcess {
    /// Starts `ratelimit-server` over `config` with `extra` arguments and waits until its
    /// `/healthcheck` answers (30 s at most).
    pub fn start(config: &Path, extra: &[&str], log_dir: &Path) -> Self {
        let grpc = format!("127.0.0.1:{}", ratelimit_tests::redis_server::free_port());
        let http = format!("127.0.0.1:{}", ratelimit_tests::redis_server::free_port());
        let log = log_dir.join("server.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_ratelimit-server"))
            .arg("--config")
            .arg(config)
            .args(["--grpc-listen", &grpc, "--http-listen", &http])
            .args([
                "--key-prefix",
                &format!("rls_test_{}", uuid_like().replace('-', "_")),
            ])
            .args(extra)
            .env("RUST_LOG", "info")
            .env_remove("REDIS_URL")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let server = Self {
            child,
            grpc,
            http,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::net::TcpStream::connect(&server.http).is_ok()
                && std::net::TcpStream::connect(&server.grpc).is_ok()
            {
                return server;
            }
            assert!(
                Instant::now() < deadline,
                "the server did not come up in 30 s; its log:\n{}",
                server.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit (20 s at most); answers whether it exited with 0.
    pub fn terminate(&mut self) -> bool {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            assert!(
                Instant::now() < deadline,
                "no exit 20 s after SIGTERM; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
