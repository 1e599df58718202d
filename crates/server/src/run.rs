//! The command line and the running server: gRPC and HTTP listeners, the configuration watch,
//! graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::Parser;
use ratelimit_container::{
    Backend, CircuitBreakerConfig, Container, ContainerConfig, FailurePolicy, KeyLayout,
    RedisConfig,
};
use ratelimit_domain::RuleSet;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::RateLimitConfig;
use crate::http::{HttpState, router};
use crate::metrics::ServerMetrics;
use crate::reload::{ConfigWatch, watch as watch_config};
use crate::service::{RateLimitService, RequestBounds, ResponseHeaders, ServiceOptions};

/// `ratelimit-server`'s command line. Every option can also come from the environment
/// variable named in its help.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "ratelimit-server",
    version,
    about = "Envoy's rate limit service (envoy.service.ratelimit.v3) over token buckets, \
             configured in envoyproxy/ratelimit's YAML format"
)]
#[non_exhaustive]
pub struct ServerArgs {
    /// The configuration: one YAML file, or a directory of `*.yaml` / `*.yml` files.
    #[arg(long, value_name = "PATH", env = "RATELIMIT_CONFIG")]
    pub config: PathBuf,

    /// Where gRPC (the rate limit and health services) listens.
    #[arg(
        long,
        value_name = "ADDR",
        env = "RATELIMIT_GRPC_LISTEN",
        default_value = "127.0.0.1:8081"
    )]
    pub grpc_listen: SocketAddr,

    /// Where HTTP (`/json`, `/healthcheck`, `/metrics`, `/rlconfig`) listens.
    #[arg(
        long,
        value_name = "ADDR",
        env = "RATELIMIT_HTTP_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    pub http_listen: SocketAddr,

    /// Redis, e.g. `redis://127.0.0.1:6379/0` or `rediss://user:secret@host:6380` (a bare
    /// `host:port`, as envoyproxy/ratelimit's `REDIS_URL`, means `redis://host:port`). Without
    /// it (and without `REDIS_URL`) buckets live in this process's memory.
    #[arg(long, value_name = "URL", env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// Redis Cluster: `--redis-url` is then a comma-separated list of some of its nodes.
    #[arg(long, env = "RATELIMIT_REDIS_CLUSTER")]
    pub redis_cluster: bool,

    /// A PEM file of the certificate authorities to trust for `rediss://` (a private CA).
    #[arg(long, value_name = "FILE", env = "RATELIMIT_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// Deadline of one check against Redis, in milliseconds; past it the failure policy answers.
    #[arg(long, value_name = "MS", env = "RATELIMIT_REDIS_TIMEOUT_MS", default_value_t = 50,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub redis_timeout_ms: u64,

    /// Multiplexed connections to Redis [default: 1, or 4 on a Redis Cluster].
    #[arg(long, value_name = "N", env = "RATELIMIT_REDIS_POOL_SIZE",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub redis_pool_size: Option<u32>,

    /// How buckets are stored in Redis: `two-keys` or `compact` (docs/lua.md).
    #[arg(long, value_name = "two-keys|compact", env = "RATELIMIT_REDIS_LAYOUT",
          default_value_t = KeyLayout::Compact)]
    pub redis_layout: KeyLayout,

    /// What a check answers when Redis fails: `open` (OK, counted in a metric), `closed` (the
    /// call fails with UNAVAILABLE, so Envoy's `failure_mode_deny` decides) or `local`
    /// (in-process buckets while Redis is out).
    #[arg(long, value_name = "open|closed|local", env = "RATELIMIT_FAILURE_POLICY",
          default_value_t = FailurePolicy::Open)]
    pub failure_policy: FailurePolicy,

    /// Turns off the circuit breaker in front of Redis.
    #[arg(long, env = "RATELIMIT_NO_CIRCUIT_BREAKER")]
    pub no_circuit_breaker: bool,

    /// The first part of every bucket key.
    #[arg(
        long,
        value_name = "PREFIX",
        env = "RATELIMIT_KEY_PREFIX",
        default_value = "rls"
    )]
    pub key_prefix: String,

    /// Rate-limit headers for Envoy to add to responses: `off`, `x-ratelimit`, `ietf` or `both`.
    #[arg(
        long,
        value_name = "SET",
        env = "RATELIMIT_RESPONSE_HEADERS",
        default_value = "off"
    )]
    pub response_headers: ResponseHeaders,

    /// Most descriptors per request (beyond: INVALID_ARGUMENT).
    #[arg(
        long,
        value_name = "N",
        env = "RATELIMIT_MAX_DESCRIPTORS",
        default_value_t = 64
    )]
    pub max_descriptors: usize,

    /// Most entries per descriptor (beyond: INVALID_ARGUMENT).
    #[arg(
        long,
        value_name = "N",
        env = "RATELIMIT_MAX_ENTRIES",
        default_value_t = 16
    )]
    pub max_entries: usize,

    /// Longest domain, key or value in bytes (beyond: INVALID_ARGUMENT).
    #[arg(
        long,
        value_name = "BYTES",
        env = "RATELIMIT_MAX_VALUE_BYTES",
        default_value_t = 4096
    )]
    pub max_value_bytes: usize,

    /// The most buckets the memory store (or the `local` policy's fallback) holds.
    #[arg(long, value_name = "N", env = "RATELIMIT_MEMORY_CAPACITY",
          default_value_t = ContainerConfig::DEFAULT_MEMORY_CAPACITY)]
    pub memory_capacity: usize,

    /// How long a graceful shutdown (SIGTERM, Ctrl-C) may take before calls in flight are cut.
    #[arg(
        long,
        value_name = "SECONDS",
        env = "RATELIMIT_SHUTDOWN_TIMEOUT",
        default_value_t = 10
    )]
    pub shutdown_timeout: u64,

    /// Log every check's events (attempted, allowed, denied) through `tracing`; off by default,
    /// since a busy proxy makes many.
    #[arg(long, env = "RATELIMIT_LOG_DECISIONS")]
    pub log_decisions: bool,

    /// Do not watch the configuration for changes.
    #[arg(long, env = "RATELIMIT_NO_WATCH")]
    pub no_watch: bool,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration is invalid.
    #[error("configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    /// The store could not be set up.
    #[error("store: {0}")]
    Store(#[from] ratelimit_domain::RateLimitError),
    /// A listener could not be bound.
    #[error("cannot listen on {address}: {source}")]
    Listen {
        /// The address.
        address: SocketAddr,
        /// The system's error.
        source: std::io::Error,
    },
    /// The configuration cannot be watched.
    #[error("cannot watch the configuration: {0}")]
    Watch(#[from] notify::Error),
}

/// The container configuration the arguments describe.
pub fn container_config(args: &ServerArgs) -> ContainerConfig {
    let mut config = ContainerConfig::memory(RuleSet::new())
        .with_memory_capacity(args.memory_capacity)
        .with_failure_policy(args.failure_policy)
        .with_key_prefix(args.key_prefix.clone())
        .with_event_logging(args.log_decisions);
    if args.no_circuit_breaker {
        config = config.with_circuit_breaker(None);
    } else {
        config = config.with_circuit_breaker(Some(CircuitBreakerConfig::default()));
    }
    let url = args
        .redis_url
        .as_deref()
        .map(str::trim)
        .filter(|url| !url.is_empty());
    if let Some(url) = url {
        let mut redis = if args.redis_cluster {
            RedisConfig::cluster(
                url.split(',')
                    .map(str::trim)
                    .filter(|n| !n.is_empty())
                    .map(with_scheme),
            )
        } else {
            RedisConfig::new(with_scheme(url))
        };
        redis = redis
            .with_layout(args.redis_layout)
            .with_check_timeout(Duration::from_millis(args.redis_timeout_ms));
        if let Some(size) = args.redis_pool_size {
            redis = redis.with_pool_size(size);
        }
        if let Some(ca) = &args.redis_ca_file {
            redis = redis.with_ca_file(ca.clone());
        }
        config = config.with_backend(Backend::Redis(redis));
    }
    config
}

/// `url` with `redis://` in front when it has no scheme: envoyproxy/ratelimit's `REDIS_URL` is
/// a bare `host:port`, so a deployment moving over keeps working.
fn with_scheme(url: &str) -> String {
    if url.contains("://") {
        url.to_owned()
    } else {
        format!("redis://{url}")
    }
}

/// A running server.
#[derive(Debug)]
pub struct RunningServer {
    /// Where gRPC listens.
    pub grpc_addr: SocketAddr,
    /// Where HTTP listens.
    pub http_addr: SocketAddr,
    /// The service (configuration, metrics).
    pub service: Arc<RateLimitService>,
    /// The container (store, adapter, events).
    pub container: Container,
    shutdown: watch::Sender<bool>,
    draining: Arc<AtomicBool>,
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    http: JoinHandle<std::io::Result<()>>,
    _watch: Option<ConfigWatch>,
    deadline: Duration,
}

impl RunningServer {
    /// Starts the server described by `args`: loads the configuration (an invalid one stops
    /// the start), builds the store, binds both listeners and starts watching.
    ///
    /// # Errors
    /// [`StartError`].
    pub async fn start(args: &ServerArgs) -> Result<Self, StartError> {
        let config = RateLimitConfig::load(&args.config)?;
        let container = Container::build(container_config(args)).await?;
        let metrics = ServerMetrics::new();
        metrics.config_load(true);
        let options = ServiceOptions {
            key_prefix: args.key_prefix.clone(),
            bounds: RequestBounds {
                max_descriptors: args.max_descriptors,
                max_entries: args.max_entries,
                max_value_bytes: args.max_value_bytes,
            },
            response_headers: args.response_headers,
            failure_policy: args.failure_policy,
        };
        tracing::info!(
            version = config.version(),
            domains = config.domain_count(),
            path = %args.config.display(),
            backend = container.backend_name(),
            "configuration loaded"
        );
        let service = Arc::new(RateLimitService::new(
            config,
            container.adapter().clone(),
            metrics,
            options,
        ));
        let bind = |address: SocketAddr| async move {
            tokio::net::TcpListener::bind(address)
                .await
                .map_err(|source| StartError::Listen { address, source })
        };
        let grpc_listener = bind(args.grpc_listen).await?;
        let http_listener = bind(args.http_listen).await?;
        let local =
            |l: &tokio::net::TcpListener, fallback: SocketAddr| l.local_addr().unwrap_or(fallback);
        let grpc_addr = local(&grpc_listener, args.grpc_listen);
        let http_addr = local(&http_listener, args.http_listen);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let draining = Arc::new(AtomicBool::new(false));

        let mut rx = shutdown_rx.clone();
        let grpc = tokio::spawn(crate::grpc::serve(
            service.clone(),
            grpc_listener,
            async move {
                let _ = rx.wait_for(|stop| *stop).await;
            },
        ));
        let mut rx = shutdown_rx;
        let app = router(HttpState {
            service: service.clone(),
            draining: draining.clone(),
        });
        let http = tokio::spawn(async move {
            axum::serve(http_listener, app)
                .with_graceful_shutdown(async move {
                    let _ = rx.wait_for(|stop| *stop).await;
                })
                .await
        });
        let watch = if args.no_watch {
            None
        } else {
            Some(watch_config(service.clone(), &args.config)?)
        };
        tracing::info!(%grpc_addr, %http_addr, "ratelimit-server listening");
        Ok(Self {
            grpc_addr,
            http_addr,
            service,
            container,
            shutdown,
            draining,
            grpc,
            http,
            _watch: watch,
            deadline: Duration::from_secs(args.shutdown_timeout),
        })
    }

    /// Stops gracefully: `/healthcheck` turns 503, the listeners stop accepting, calls in
    /// flight finish; whatever is still running after the shutdown deadline is cut. Answers
    /// whether everything finished in time.
    pub async fn shutdown(self) -> bool {
        self.draining.store(true, Ordering::Relaxed);
        let _ = self.shutdown.send(true);
        let grpc_abort = self.grpc.abort_handle();
        let http_abort = self.http.abort_handle();
        let both = async {
            let _ = self.grpc.await;
            let _ = self.http.await;
        };
        match tokio::time::timeout(self.deadline, both).await {
            Ok(()) => true,
            Err(_) => {
                tracing::warn!(deadline = ?self.deadline, "shutdown deadline passed; cutting calls in flight");
                grpc_abort.abort();
                http_abort.abort();
                false
            }
        }
    }
}

/// Completes on SIGTERM or Ctrl-C (SIGINT).
pub async fn termination() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_redis_addresses_get_a_scheme() {
        assert_eq!(with_scheme("127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(with_scheme("rediss://h:1"), "rediss://h:1");
    }

    #[test]
    fn defaults_are_envoyproxy_ratelimits_ports() {
        let args = ServerArgs::try_parse_from(["ratelimit-server", "--config", "x.yaml"]).unwrap();
        assert_eq!(args.grpc_listen.to_string(), "127.0.0.1:8081");
        assert_eq!(args.http_listen.to_string(), "127.0.0.1:8080");
        assert_eq!(args.failure_policy, FailurePolicy::Open);
        assert!(ServerArgs::try_parse_from(["ratelimit-server"]).is_err());
    }

    /// The pool size of the Redis settings the arguments give.
    fn pool_size(args: &[&str]) -> u32 {
        let args = ServerArgs::try_parse_from(args).unwrap();
        match container_config(&args).backend {
            Backend::Redis(redis) => redis.pool_size,
            other => panic!("expected Redis settings, got {other:?}"),
        }
    }

    #[test]
    fn the_pool_size_defaults_per_kind_of_redis_and_an_explicit_one_wins() {
        let single = [
            "ratelimit-server",
            "--config",
            "x.yaml",
            "--redis-url",
            "h:1",
        ];
        let cluster = [&single[..], &["--redis-cluster"]].concat();
        assert_eq!(pool_size(&single), RedisConfig::DEFAULT_POOL_SIZE);
        assert_eq!(pool_size(&cluster), RedisConfig::DEFAULT_CLUSTER_POOL_SIZE);
        assert_eq!(
            pool_size(&[&single[..], &["--redis-pool-size", "3"]].concat()),
            3
        );
        assert_eq!(
            pool_size(&[&cluster[..], &["--redis-pool-size", "1"]].concat()),
            1
        );
        let zero = [&single[..], &["--redis-pool-size", "0"]].concat();
        assert!(ServerArgs::try_parse_from(zero).is_err());
    }
}
