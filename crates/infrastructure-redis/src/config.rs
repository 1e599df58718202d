//! Connection settings.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// How a bucket is stored in Redis (the keys and values are in docs/lua.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyLayout {
    /// Two string keys per bucket, `<key>:tokens` and `<key>:time`, holding decimal numbers:
    /// the layout the original Python service uses, so buckets can be shared with it during a
    /// migration. Pick it only for that.
    TwoKeys,
    /// One key per bucket, `<key>:tb`, holding both numbers and the key's expiry in 20 binary
    /// bytes: about half the Redis memory and a third of the Redis CPU per check of the two-key
    /// layout, same decisions. Not readable by the original service. The default.
    #[default]
    Compact,
}

impl KeyLayout {
    /// The layout's name in configuration and on command lines: `two-keys` or `compact`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::TwoKeys => "two-keys",
            Self::Compact => "compact",
        }
    }
}

impl fmt::Display for KeyLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for KeyLayout {
    type Err = String;

    /// `two-keys` or `compact`, in any case; `specification`, the two-key layout's former name,
    /// is accepted too.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("specification") {
            return Ok(Self::TwoKeys);
        }
        [Self::TwoKeys, Self::Compact]
            .into_iter()
            .find(|layout| layout.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| format!("unknown key layout {s:?}: expected two-keys or compact"))
    }
}

/// How to reach Redis and how long to wait for it.
#[derive(Clone)]
#[non_exhaustive]
pub struct RedisConfig {
    /// A `redis://` URL, e.g. `redis://127.0.0.1:6379/0` or `redis://user:secret@host:6379`.
    /// Never printed with its password.
    pub url: String,
    /// Connections in the pool. Each is multiplexed: concurrent checks share it and are
    /// pipelined on its socket, so one connection carries all the checks a host makes.
    pub pool_size: u32,
    /// Deadline of one check, taking a connection included. Past it the check fails with
    /// `StorageTimeout` (and the adapter's failure policy decides the request).
    pub check_timeout: Duration,
    /// Deadline of admin operations (reset) and of opening a connection for them.
    pub admin_timeout: Duration,
    /// Redis Cluster: the URLs of some of the cluster's nodes (the rest are discovered). Empty
    /// for a single Redis at [`url`](Self::url). In cluster mode each bucket's two keys carry a
    /// hash tag so that they live in one slot (see docs/lua.md).
    pub cluster_nodes: Vec<String>,
    /// How buckets are stored (default: [`KeyLayout::Compact`]; [`KeyLayout::TwoKeys`] to share
    /// buckets with the original service).
    pub layout: KeyLayout,
    /// For `rediss://` URLs: a PEM file of the certificate authorities to trust instead of the
    /// system's (a private CA, as managed Redis services and self-hosted TLS often use).
    pub ca_file: Option<PathBuf>,
    /// How often the reset listener ([`RedisStorage::spawn_reset_listener`]) sends a `PING` on
    /// its pub/sub connection, to notice a connection that died silently (a NAT or firewall
    /// dropping it). An answer must come within [`admin_timeout`](Self::admin_timeout), or
    /// the listener subscribes again on a new connection.
    ///
    /// [`RedisStorage::spawn_reset_listener`]: crate::RedisStorage::spawn_reset_listener
    pub reset_ping_interval: Duration,
    /// Coalesced checks: checks that arrive while script calls are in flight go to Redis
    /// together, as one call of the layout's batch script (default:
    /// [`DEFAULT_COALESCING`](Self::DEFAULT_COALESCING)). Each check is still its own atomic
    /// step, decided as it would be alone. On a Redis Cluster a batch goes as one call per hash
    /// slot. See docs/lua.md, "Coalesced checks".
    pub coalescing: bool,
}

impl RedisConfig {
    /// Default pool size: one multiplexed connection, on which all of a host's concurrent checks
    /// are pipelined. More connections split the checks into smaller writes, so each check
    /// pays more system calls (the measurements: docs/performance.md, "One multiplexed
    /// connection"). Raise it when a single connection's task becomes the bottleneck on a
    /// many-core host.
    pub const DEFAULT_POOL_SIZE: u32 = 1;
    /// Default pool size on a Redis Cluster ([`cluster`](Self::cluster)): four connections.
    /// Each cluster connection carries at most 16 calls at once (a guard against a redis-rs
    /// deadlock, docs/lua.md, "Redis Cluster"), which on one connection cost a third of the
    /// checks/s at 64 concurrent checks; four connections regained them.
    pub const DEFAULT_CLUSTER_POOL_SIZE: u32 = 4;
    /// Whether checks are coalesced unless [`with_coalescing`](Self::with_coalescing) says
    /// otherwise: not yet. On 2 shared cores coalescing gave 1.0x–1.5x the checks/s of one
    /// script call per check from 16 tasks on, short of the 2x its issue set as the condition for
    /// turning it on by default (docs/performance.md, "Coalesced checks").
    pub const DEFAULT_COALESCING: bool = false;
    /// Default deadline of a check.
    pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_millis(50);
    /// Default deadline of an admin operation.
    pub const DEFAULT_ADMIN_TIMEOUT: Duration = Duration::from_secs(2);
    /// Default interval of the reset listener's keepalive `PING`: a dead subscription is
    /// noticed within this plus the admin deadline (7 s by default), for one `PING` per 5 s.
    pub const DEFAULT_RESET_PING_INTERVAL: Duration = Duration::from_secs(5);

    /// Settings for `url` with the default pool size and deadlines.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            pool_size: Self::DEFAULT_POOL_SIZE,
            check_timeout: Self::DEFAULT_CHECK_TIMEOUT,
            admin_timeout: Self::DEFAULT_ADMIN_TIMEOUT,
            ca_file: None,
            cluster_nodes: Vec::new(),
            layout: KeyLayout::Compact,
            reset_ping_interval: Self::DEFAULT_RESET_PING_INTERVAL,
            coalescing: Self::DEFAULT_COALESCING,
        }
    }

    /// Settings for a Redis Cluster reachable through `nodes` (at least one node's URL; the
    /// others are discovered), with the cluster's default pool size
    /// ([`DEFAULT_CLUSTER_POOL_SIZE`](Self::DEFAULT_CLUSTER_POOL_SIZE)) and the default
    /// deadlines.
    pub fn cluster<S: Into<String>>(nodes: impl IntoIterator<Item = S>) -> Self {
        let nodes: Vec<String> = nodes.into_iter().map(Into::into).collect();
        let mut config = Self::new(nodes.first().cloned().unwrap_or_default());
        config.cluster_nodes = nodes;
        config.pool_size = Self::DEFAULT_CLUSTER_POOL_SIZE;
        config
    }

    /// The same settings with another key layout.
    #[must_use]
    pub fn with_layout(mut self, layout: KeyLayout) -> Self {
        self.layout = layout;
        self
    }

    /// The same settings with coalesced checks on or off ([`coalescing`](Self::coalescing)).
    #[must_use]
    pub fn with_coalescing(mut self, coalescing: bool) -> Self {
        self.coalescing = coalescing;
        self
    }

    /// Whether these settings name a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        !self.cluster_nodes.is_empty()
    }

    /// The same settings, trusting the certificate authorities in the PEM file at `path` for
    /// `rediss://` connections.
    #[must_use]
    pub fn with_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// The same settings with another pool size (at least 1).
    #[must_use]
    pub fn with_pool_size(mut self, pool_size: u32) -> Self {
        self.pool_size = pool_size.max(1);
        self
    }

    /// The same settings with another check deadline.
    #[must_use]
    pub fn with_check_timeout(mut self, timeout: Duration) -> Self {
        self.check_timeout = timeout;
        self
    }

    /// The same settings with another interval for the reset listener's keepalive `PING`
    /// (at least 10 ms).
    #[must_use]
    pub fn with_reset_ping_interval(mut self, interval: Duration) -> Self {
        self.reset_ping_interval = interval.max(Duration::from_millis(10));
        self
    }

    /// The same settings with another admin deadline.
    #[must_use]
    pub fn with_admin_timeout(mut self, timeout: Duration) -> Self {
        self.admin_timeout = timeout;
        self
    }

    /// The URL with any password replaced by `***`, fit for logs and errors.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &self.redacted_url())
            .field("pool_size", &self.pool_size)
            .field("check_timeout", &self.check_timeout)
            .field("admin_timeout", &self.admin_timeout)
            .field("ca_file", &self.ca_file)
            .field("layout", &self.layout)
            .field("reset_ping_interval", &self.reset_ping_interval)
            .field("coalescing", &self.coalescing)
            .field(
                "cluster_nodes",
                &self
                    .cluster_nodes
                    .iter()
                    .map(|node| redact_url(node))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// Replaces the password of `scheme://user:password@host…` (or `scheme://:password@host…`).
pub(crate) fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    // The last '@' ends the user info, even when an unencoded password holds '/', '?' or '#'
    // (better to hide too much than to print a secret).
    let Some(at) = rest.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &rest[..at];
    let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
    let hidden = if userinfo.contains(':') {
        format!("{user}:***")
    } else {
        user.to_owned()
    };
    format!("{}{hidden}{}", &url[..scheme_end], &rest[at..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_parse_by_name_and_former_name_and_print_back() {
        for layout in [KeyLayout::TwoKeys, KeyLayout::Compact] {
            assert_eq!(layout.to_string().parse::<KeyLayout>(), Ok(layout));
        }
        assert_eq!("Specification".parse(), Ok(KeyLayout::TwoKeys));
        assert_eq!(" COMPACT ".parse(), Ok(KeyLayout::Compact));
        for bad in ["", "two_keys", "compact\0", "tb"] {
            let err = bad.parse::<KeyLayout>().unwrap_err();
            assert!(err.contains("two-keys or compact"), "{err}");
        }
    }

    #[test]
    fn a_cluster_gets_its_own_default_pool_size_which_settings_still_override() {
        assert_eq!(RedisConfig::new("redis://h:1").pool_size, 1);
        let cluster = RedisConfig::cluster(["redis://a:1", "redis://b:2"]);
        assert_eq!(cluster.pool_size, RedisConfig::DEFAULT_CLUSTER_POOL_SIZE);
        assert_eq!(cluster.with_pool_size(2).pool_size, 2);
    }

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            redact_url("redis://user:s3cret@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(redact_url("rediss://:s3cret@host"), "rediss://:***@host");
        assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
        assert_eq!(redact_url("redis://user@host"), "redis://user@host");
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(
            redact_url("redis://u:pa/ss?x#y@h:1/0"),
            "redis://u:***@h:1/0"
        );
        let config = RedisConfig::new("redis://u:p4ss@h:1");
        assert!(!format!("{config:?}").contains("p4ss"));
    }
}
