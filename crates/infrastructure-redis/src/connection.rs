//! Pooled connections, to one Redis or to a Redis Cluster, that leave the pool once they have
//! failed, and the deadline every operation on them runs under.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use bb8_redis::bb8::{ManageConnection, Pool, PooledConnection, State};
use ratelimit_domain::{ErrorCode, RateLimitError, Result};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Client, Cmd, Pipeline, RedisError, RedisFuture, RedisResult,
    TlsCertificates, Value,
};

use crate::RedisConfig;
use crate::error::{deadline, from_pool, from_redis};

/// The bb8 pool of a store, and how one operation runs on it: within a deadline, taking the
/// connection included, on a connection that is dropped once it has failed.
///
/// Cloning shares the pool (the coalescer's batches run on the store's connections).
#[derive(Clone)]
pub(crate) struct Connections {
    pool: Pool<Manager>,
    /// A copy of the pool's manager, for connections outside the pool (the reset listener's).
    manager: Manager,
}

impl Connections {
    /// The pool for `config`. Connections are opened on first use.
    ///
    /// # Errors
    /// [`ErrorCode::Configuration`] when the URL cannot be parsed or the CA file cannot be read.
    pub(crate) fn new(config: &RedisConfig) -> Result<Self> {
        let manager = Manager::new(config)?;
        let pool = Pool::builder()
            .max_size(config.pool_size.max(1))
            // A PING per checkout would double the round trips; failed connections are
            // dropped on return instead (see `TrackedConnection`).
            .test_on_check_out(false)
            // A failed connect is not retried in the background with bb8's backoff (0.4 s, then
            // 0.8 s, …): the next check starts a fresh attempt, so limiting resumes as soon as
            // Redis answers again.
            .retry_connection(false)
            .connection_timeout(config.admin_timeout.max(config.check_timeout))
            .build_unchecked(manager.clone());
        Ok(Self { pool, manager })
    }

    /// The manager, which knows how to open a connection outside the pool.
    pub(crate) fn manager(&self) -> &Manager {
        &self.manager
    }

    /// The pool's connections, for `Debug`.
    pub(crate) fn state(&self) -> State {
        self.pool.state()
    }

    /// Runs one operation on a pooled connection within `timeout`, taking the connection
    /// included, and marks the connection for disposal unless the operation answered.
    pub(crate) async fn run<T, F, Fut>(
        &self,
        operation: &'static str,
        timeout: Duration,
        f: F,
    ) -> Result<T>
    where
        F: FnOnce(RedisConn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        self.run_until(operation, Instant::now() + timeout, timeout, f)
            .await
    }

    /// [`run`](Self::run) until `deadline` rather than for a duration; `timeout` is the deadline
    /// the error names (the batch of coalesced checks runs until its last check's deadline).
    pub(crate) async fn run_until<T, F, Fut>(
        &self,
        operation: &'static str,
        deadline_at: Instant,
        timeout: Duration,
        f: F,
    ) -> Result<T>
    where
        F: FnOnce(RedisConn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        // The pool hands out a connection only to clone its handle: the guard goes back at
        // once, so any number of concurrent checks share the pool's multiplexed connections
        // (pipelining on the socket) instead of queueing for one each.
        let checkout = async {
            loop {
                let pooled: PooledConnection<'_, Manager> = self
                    .pool
                    .get()
                    .await
                    .map_err(|err| from_pool(err, operation))?;
                // A connection another check saw fail is dropped as its guard goes back; take
                // the next one (or a new one) instead of failing on it too.
                if !pooled.broken.load(Ordering::Acquire) {
                    return Ok::<_, RateLimitError>((
                        pooled.conn.clone(),
                        pooled.broken.clone(),
                        pooled.calls.clone(),
                    ));
                }
            }
        };
        // One deadline (one timer) covers the checkout and the command.
        let mut in_flight: Option<Arc<AtomicBool>> = None;
        let operation_future = async {
            let (conn, broken, calls) = checkout.await?;
            // A cluster connection's turn (see `CLUSTER_CALLS_IN_FLIGHT`), held until the reply.
            // Its semaphore is never closed.
            let _turn = match calls {
                Some(calls) => calls.acquire_owned().await.ok(),
                None => None,
            };
            let flag = in_flight.insert(broken);
            match f(conn).await {
                Ok(reply) => Ok(reply),
                Err(err) => {
                    if breaks_connection(&err) {
                        // The pool drops the connection the next time it comes back.
                        flag.store(true, Ordering::Release);
                    }
                    Err(from_redis(err, operation))
                }
            }
        };
        let outcome = tokio::time::timeout_at(deadline_at.into(), operation_future).await;
        outcome.unwrap_or_else(|_| {
            if let Some(broken) = &in_flight {
                // A reply may still arrive late on this socket; do not trust it any more.
                broken.store(true, Ordering::Release);
            }
            Err(deadline(operation, timeout))
        })
    }
}

/// Opens connections for the bb8 pool, and discards a connection which failed (or whose
/// command was abandoned at a deadline) when it returns to the pool.
///
/// bb8-redis's `RedisConnectionManager` is not used because it can neither trust a private CA
/// for `rediss://`, nor talk to a cluster, nor report a connection as broken; checking with a
/// `PING` on every checkout would double the round trips of a check, so instead a user that
/// sees a connection fail flags it, and the pool drops it when it next comes back.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // one manager per pool: its size does not matter
pub(crate) enum Manager {
    Single {
        client: Client,
        /// How long opening a connection may take.
        connect_timeout: Duration,
    },
    Cluster(ClusterClient),
}

impl Manager {
    pub(crate) fn new(config: &RedisConfig) -> Result<Self> {
        let redacted = config.redacted_url();
        let invalid = |err: RedisError| {
            RateLimitError::new(
                ErrorCode::Configuration,
                format!("invalid redis url {redacted}: {:?}", err.kind()),
            )
            .with_detail("url", redacted.clone())
        };
        let certificates = match &config.ca_file {
            None => None,
            Some(path) => {
                let pem = std::fs::read(path).map_err(|err| {
                    RateLimitError::new(
                        ErrorCode::Configuration,
                        format!("cannot read CA file {}: {err}", path.display()),
                    )
                    .with_detail("ca_file", path.display().to_string())
                })?;
                Some(TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                })
            }
        };
        if config.is_cluster() {
            let mut builder =
                ClusterClientBuilder::new(config.cluster_nodes.iter().map(String::as_str))
                    .connection_timeout(config.admin_timeout)
                    .response_timeout(config.admin_timeout.max(config.check_timeout));
            if let Some(certificates) = certificates {
                builder = builder.certs(certificates);
            }
            return builder.build().map(Self::Cluster).map_err(invalid);
        }
        let client = match certificates {
            None => Client::open(config.url.as_str()),
            Some(certificates) => Client::build_with_tls(config.url.as_str(), certificates),
        };
        client
            .map(|client| Self::Single {
                client,
                connect_timeout: config.admin_timeout.max(config.check_timeout),
            })
            .map_err(invalid)
    }
}

/// A connection to one Redis or to a cluster.
#[derive(Clone)]
pub(crate) enum RedisConn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

/// A pooled connection and whether it is known to be broken.
pub(crate) struct TrackedConnection {
    pub(crate) conn: RedisConn,
    /// Set by any user of the connection that saw it fail (I/O error, or a command abandoned
    /// at its deadline); the pool then drops it instead of handing it out again. Shared because
    /// users keep a clone of the multiplexed handle after giving the pooled guard back.
    pub(crate) broken: Arc<AtomicBool>,
    /// On a cluster connection, the calls it may carry at once ([`CLUSTER_CALLS_IN_FLIGHT`]);
    /// `None` on a single Redis.
    pub(crate) calls: Option<Arc<Semaphore>>,
}

/// The most calls one Redis Cluster connection carries at once; more wait for a turn, within
/// their deadline.
///
/// redis-rs 1.8's cluster connection (and 2.0.0-rc.2's) deadlocks under tokio ≥ 1.54 when a
/// slot moves while many calls are in flight. Its driver task polls many request futures in
/// one pass and runs out of tokio's cooperative budget. Since tokio 1.54 ("preserve FIFO lock
/// order when coop budget is exhausted") an out-of-budget `RwLock::read()` keeps the permit it
/// was granted and returns `Pending`. The `MOVED` of the moved slot then starts a slot refresh,
/// whose `write()` waits behind those permits; while it waits, the driver polls nothing else,
/// so the futures holding them are never polled again. Every call through that connection then
/// times out until it is replaced. Measured on a local 3-primary cluster with one key's slot
/// moved under load (`tests/tests/coalesce_cluster.rs`, and a standalone reproduction with only
/// redis-rs and tokio): 64 calls in flight hung in 5 to 8 runs out of 10, and 48 in 8 out of
/// 10; 8, 16, 24 and 32 in none out of 10. Coalesced checks send at most two batches at a
/// time, but a batch goes as one call per slot, so the cap applies to them too.
pub(crate) const CLUSTER_CALLS_IN_FLIGHT: usize = 16;

impl std::fmt::Debug for TrackedConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.conn {
            RedisConn::Single(_) => "single",
            RedisConn::Cluster(_) => "cluster",
        };
        f.debug_struct("TrackedConnection")
            .field("kind", &kind)
            .field("broken", &self.broken.load(Ordering::Acquire))
            .finish()
    }
}

impl ManageConnection for Manager {
    type Connection = TrackedConnection;
    type Error = RedisError;

    async fn connect(&self) -> Result<Self::Connection, Self::Error> {
        let conn = match self {
            Self::Single {
                client,
                connect_timeout,
            } => {
                // No response timeout of redis-rs's own (its default is 500 ms): every operation
                // of the store runs under its own deadline, the check's or the admin one, so a
                // second timer per command would only cost time, and cut admin operations short.
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(*connect_timeout))
                    .set_response_timeout(None);
                RedisConn::Single(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                )
            }
            Self::Cluster(client) => RedisConn::Cluster(client.get_async_connection().await?),
        };
        let calls = matches!(conn, RedisConn::Cluster(_))
            .then(|| Arc::new(Semaphore::new(CLUSTER_CALLS_IN_FLIGHT)));
        Ok(TrackedConnection {
            conn,
            broken: Arc::new(AtomicBool::new(false)),
            calls,
        })
    }

    async fn is_valid(&self, conn: &mut Self::Connection) -> Result<(), Self::Error> {
        redis::cmd("PING")
            .query_async::<Value>(&mut conn.conn)
            .await
            .map(drop)
    }

    fn has_broken(&self, conn: &mut Self::Connection) -> bool {
        conn.broken.load(Ordering::Acquire)
    }
}

/// Whether an error means the connection itself cannot be trusted any more.
pub(crate) fn breaks_connection(err: &RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_dropped()
        || err.is_unrecoverable_error()
        || err.is_timeout()
}
