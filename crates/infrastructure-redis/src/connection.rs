//! Pooled connections that leave the pool once they have failed.

use bb8_redis::bb8::ManageConnection;
use ratelimit_domain::{ErrorCode, RateLimitError, Result};
use redis::aio::MultiplexedConnection;
use redis::{Client, RedisError, TlsCertificates};

use crate::RedisConfig;

/// Opens multiplexed connections for the bb8 pool, and discards a connection which failed
/// (or whose command was abandoned at a deadline) when it returns to the pool.
///
/// bb8-redis's `RedisConnectionManager` is not used because it can neither trust a private CA
/// for `rediss://` nor report a connection as broken; checking with a `PING` on every checkout
/// would double the round trips of a check, so instead each command marks its connection as
/// suspect until it has answered.
#[derive(Debug, Clone)]
pub(crate) struct Manager {
    client: Client,
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
        let client = match &config.ca_file {
            None => Client::open(config.url.as_str()).map_err(invalid)?,
            Some(path) => {
                let pem = std::fs::read(path).map_err(|err| {
                    RateLimitError::new(
                        ErrorCode::Configuration,
                        format!("cannot read CA file {}: {err}", path.display()),
                    )
                    .with_detail("ca_file", path.display().to_string())
                })?;
                let certificates = TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                };
                Client::build_with_tls(config.url.as_str(), certificates).map_err(invalid)?
            }
        };
        Ok(Self { client })
    }
}

/// A multiplexed connection and whether it may be broken.
#[derive(Debug)]
pub(crate) struct TrackedConnection {
    pub(crate) conn: MultiplexedConnection,
    /// True from the moment a command is sent until it has answered without a connection
    /// error; a connection still suspect when it returns to the pool is dropped.
    pub(crate) suspect: bool,
}

impl ManageConnection for Manager {
    type Connection = TrackedConnection;
    type Error = RedisError;

    async fn connect(&self) -> Result<Self::Connection, Self::Error> {
        let conn = self.client.get_multiplexed_async_connection().await?;
        Ok(TrackedConnection {
            conn,
            suspect: false,
        })
    }

    async fn is_valid(&self, conn: &mut Self::Connection) -> Result<(), Self::Error> {
        redis::cmd("PING")
            .query_async::<String>(&mut conn.conn)
            .await
            .map(drop)
    }

    fn has_broken(&self, conn: &mut Self::Connection) -> bool {
        conn.suspect
    }
}

/// Whether an error means the connection itself cannot be trusted any more.
pub(crate) fn breaks_connection(err: &RedisError) -> bool {
    err.is_io_error()
        || err.is_connection_dropped()
        || err.is_unrecoverable_error()
        || err.is_timeout()
}
