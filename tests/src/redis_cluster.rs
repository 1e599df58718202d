//! A throwaway Redis Cluster on loopback ports.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::redis_server::RedisServer;

/// A local Redis Cluster: `masters` primaries, each with `replicas` replicas, one
/// `redis-server` process per node, stopped when dropped.
#[derive(Debug)]
pub struct RedisCluster {
    /// Every node, primaries first as `redis-cli --cluster create` assigned them.
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts the nodes, joins them with `redis-cli --cluster create` and waits until every
    /// node reports `cluster_state:ok` and every replica is in sync.
    ///
    /// # Panics
    /// When `redis-server` or `redis-cli` is missing, or the cluster does not form in 30 s.
    pub fn start(masters: usize, replicas: usize) -> Self {
        let args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "1000",
            // Disk-based sync: diskless sync never started its fork on this machine.
            "--repl-diskless-sync",
            "no",
        ];
        let nodes: Vec<RedisServer> = (0..masters * (1 + replicas))
            .map(|_| RedisServer::start_with_args(&args))
            .collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port()));
        }
        create.args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"]);
        let out = create.output().unwrap_or_else(|err| {
            panic!("redis-cli is needed to form the test cluster (Debian: apt-get install redis-tools): {err}")
        });
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = Self { nodes };
        cluster.wait_until_ok(Duration::from_secs(30));
        cluster
    }

    /// URLs of every node, for `RedisConfig::cluster`.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// Waits until every running node says `cluster_state:ok` and sees every slot covered, and
    /// every replica's link to its primary is up.
    ///
    /// # Panics
    /// When that does not happen within `timeout`.
    pub fn wait_until_ok(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let ok = self
                .nodes
                .iter()
                .filter(|node| node.pid().is_some())
                .all(|node| {
                    let cluster = info(node, "CLUSTER", &["INFO"]);
                    let replication = info(node, "INFO", &["replication"]);
                    // A replica that has not finished its first sync cannot take over.
                    let synced = replication.contains("role:master")
                        || replication.contains("master_link_status:up");
                    cluster.contains("cluster_state:ok")
                        && cluster.contains("cluster_slots_ok:16384")
                        && synced
                });
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the test cluster did not become ok within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Indexes (into [`nodes`](Self::nodes)) of the nodes that are primaries now.
    pub fn primaries(&self) -> Vec<usize> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, node)| {
                node.pid().is_some() && info(node, "ROLE", &[]).starts_with("master")
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// Index of the primary that owns `key` now.
    ///
    /// # Panics
    /// When no running primary owns the key's slot.
    pub fn primary_of(&self, key: &str) -> usize {
        let any = self
            .nodes
            .iter()
            .find(|node| node.pid().is_some())
            .unwrap_or_else(|| panic!("no running node"));
        let slot = match any.cmd(redis::cmd("CLUSTER").arg("KEYSLOT").arg(key)) {
            redis::Value::Int(slot) => slot,
            other => panic!("CLUSTER KEYSLOT answered {other:?}"),
        };
        for index in self.primaries() {
            let nodes = info(&self.nodes[index], "CLUSTER", &["NODES"]);
            if nodes.lines().any(|line| {
                line.contains("myself") && line.contains("master") && serves(line, slot)
            }) {
                return index;
            }
        }
        panic!("no running primary owns slot {slot}");
    }

    /// Keys stored on the node at `index`.
    pub fn dbsize(&self, index: usize) -> i64 {
        match self.nodes[index].cmd(&redis::cmd("DBSIZE")) {
            redis::Value::Int(n) => n,
            other => panic!("DBSIZE answered {other:?}"),
        }
    }
}

/// Whether a `CLUSTER NODES` line serves `slot` (ranges like `0-5460` or single slots).
fn serves(line: &str, slot: i64) -> bool {
    line.split_whitespace()
        .skip(8)
        .any(|range| match range.split_once('-') {
            Some((from, to)) => {
                from.parse::<i64>().is_ok_and(|from| from <= slot)
                    && to.parse::<i64>().is_ok_and(|to| slot <= to)
            }
            None => range.parse::<i64>() == Ok(slot),
        })
}

fn info(node: &RedisServer, command: &str, args: &[&str]) -> String {
    let mut cmd = redis::cmd(command);
    for arg in args {
        cmd.arg(*arg);
    }
    match node.cmd(&cmd) {
        redis::Value::BulkString(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        redis::Value::VerbatimString { text, .. } => text,
        redis::Value::SimpleString(text) => text,
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::BulkString(bytes)) => String::from_utf8_lossy(bytes).into_owned(),
            Some(redis::Value::SimpleString(text)) => text.clone(),
            _ => String::new(),
        },
        _ => String::new(),
    }
}
