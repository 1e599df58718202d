//! Pooled connections that leave the pool once they have failed.

use bb8_redis::RedisConnectionManager;
use bb8_redis::bb8::ManageConnection;
use redis::RedisError;
use redis::aio::MultiplexedConnection;

/// Wraps bb8-redis's manager so that a connection which failed (or whose command was
/// abandoned at a deadline) is discarded when it returns to the pool.
///
/// bb8-redis's own manager never reports a connection as broken, and checking with a `PING`
/// on every checkout would double the round trips of a check; instead each command marks its
/// connection as suspect until it has answered.
#[derive(Debug, Clone)]
pub(crate) struct Manager {
    inner: RedisConnectionManager,
}

impl Manager {
    pub(crate) fn new(url: &str) -> Result<Self, RedisError> {
        Ok(Self {
            inner: RedisConnectionManager::new(url)?,
        })
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
        let conn = self.inner.connect().await?;
        Ok(TrackedConnection {
            conn,
            suspect: false,
        })
    }

    async fn is_valid(&self, conn: &mut Self::Connection) -> Result<(), Self::Error> {
        self.inner.is_valid(&mut conn.conn).await
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
