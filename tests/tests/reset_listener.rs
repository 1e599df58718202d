//! The reset listener (`RedisStorage::spawn_reset_listener`) keeps its pub/sub subscription
//! alive: a connection closed by the server, one that died silently (a NAT dropping it, played
//! by a proxy that stops forwarding without closing anything) and a frozen server are all
//! noticed, and resets published afterwards reach the listener again.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ratelimit_redis::{RESET_CHANNEL, RedisConfig, RedisStorage};
use ratelimit_tests::redis_server::RedisServer;
use tokio::net::{TcpListener, TcpStream};

/// What the listener passed on: `Some(key)` per reset, `None` per (re)subscription.
#[derive(Debug, Clone, Default)]
struct Heard(Arc<Mutex<Vec<Option<String>>>>);

impl Heard {
    fn callback(&self) -> impl Fn(Option<&str>) + Send + Sync + 'static {
        let heard = self.0.clone();
        move |key| heard.lock().unwrap().push(key.map(str::to_owned))
    }

    fn subscriptions(&self) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|k| k.is_none())
            .count()
    }

    fn has(&self, key: &str) -> bool {
        self.0
            .lock()
            .unwrap()
            .iter()
            .any(|k| k.as_deref() == Some(key))
    }

    /// Waits up to `within` for `what`, polling.
    async fn wait_for(&self, within: Duration, what: impl Fn(&Self) -> bool) -> bool {
        let started = Instant::now();
        while started.elapsed() < within {
            if what(self) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        what(self)
    }
}

fn publish(server: &RedisServer, key: &str) -> i64 {
    match server.cmd(redis::cmd("PUBLISH").arg(RESET_CHANNEL).arg(key)) {
        redis::Value::Int(receivers) => receivers,
        other => panic!("PUBLISH answered {other:?}"),
    }
}

/// Publishes `key` every 100 ms until the listener has it, for at most `within`.
async fn delivered(server: &RedisServer, heard: &Heard, key: &str, within: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < within {
        publish(server, key);
        if heard
            .wait_for(Duration::from_millis(100), |h| h.has(key))
            .await
        {
            return true;
        }
    }
    false
}

/// A store on `url` whose reset listener runs and has subscribed once; the store, what the
/// listener hears, and its task.
async fn subscribed(url: &str) -> (RedisStorage, Heard, tokio::task::JoinHandle<()>) {
    let store = RedisStorage::new(&listener_config(url)).unwrap();
    let heard = Heard::default();
    let task = store.spawn_reset_listener(heard.callback()).unwrap();
    assert!(
        heard
            .wait_for(Duration::from_secs(5), |h| h.subscriptions() == 1)
            .await
    );
    (store, heard, task)
}

fn listener_config(url: &str) -> RedisConfig {
    RedisConfig::new(url)
        .with_reset_ping_interval(Duration::from_millis(200))
        .with_admin_timeout(Duration::from_millis(500))
}

/// A TCP proxy to Redis that can cut its current connections silently: their bytes stop
/// flowing both ways, but neither side sees the connection close, as when a NAT or a
/// firewall forgets it. Connections opened after a cut are forwarded normally.
struct SilentCutProxy {
    port: u16,
    /// The "cut" flag of each connection so far.
    connections: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
}

impl SilentCutProxy {
    async fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let registry = connections.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                    continue;
                };
                let cut = Arc::new(AtomicBool::new(false));
                registry.lock().unwrap().push(cut.clone());
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(forward(client_read, server_write, cut.clone()));
                tokio::spawn(forward(server_read, client_write, cut));
            }
        });
        Self { port, connections }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn cut_all(&self) {
        for cut in self.connections.lock().unwrap().iter() {
            cut.store(true, Ordering::SeqCst);
        }
    }

    fn connections(&self) -> usize {
        self.connections.lock().unwrap().len()
    }
}

/// Copies bytes until the connection closes; once `cut`, swallows them and keeps both sockets
/// open for ever.
async fn forward(
    from: tokio::net::tcp::OwnedReadHalf,
    to: tokio::net::tcp::OwnedWriteHalf,
    cut: Arc<AtomicBool>,
) {
    let mut buf = vec![0_u8; 16 * 1024];
    loop {
        // readable/try_read and writable/try_write: the test crate's tokio has no io-util.
        if from.readable().await.is_err() {
            return;
        }
        let n = match from.try_read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        };
        if cut.load(Ordering::SeqCst) {
            // Hold the sockets: nothing closes, nothing arrives.
            let _held = (from, to);
            std::future::pending::<()>().await;
            return;
        }
        let mut sent = 0;
        while sent < n {
            if to.writable().await.is_err() {
                return;
            }
            match to.try_write(&buf[sent..n]) {
                Ok(written) => sent += written,
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    }
}

#[tokio::test]
async fn a_silently_dropped_subscription_is_noticed_and_resets_arrive_again() {
    let server = RedisServer::start();
    let proxy = SilentCutProxy::start(server.port()).await;
    let (_store, heard, task) = subscribed(&proxy.url()).await;
    assert!(delivered(&server, &heard, "before-the-cut", Duration::from_secs(3)).await);

    // The NAT forgets the connection. Before the keepalive, the listener waited on it for ever
    // and no reset arrived again.
    proxy.cut_all();
    let cut_at = Instant::now();
    assert!(
        delivered(&server, &heard, "after-the-cut", Duration::from_secs(5)).await,
        "no reset reached the listener within 5 s of a silent cut: {heard:?}"
    );
    // It subscribed again on a new connection, and said so (the deny cache clears itself).
    assert!(heard.subscriptions() >= 2, "{heard:?}");
    assert!(proxy.connections() >= 2);
    eprintln!("resets arrived again {:?} after the cut", cut_at.elapsed());
    task.abort();
}

#[tokio::test]
async fn a_subscription_killed_by_the_server_is_replaced() {
    let server = RedisServer::start();
    let (_store, heard, task) = subscribed(&server.url()).await;

    for round in 0..3 {
        let killed = server.cmd(redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub"));
        assert_eq!(killed, redis::Value::Int(1), "round {round}");
        let key = format!("after-kill-{round}");
        assert!(
            delivered(&server, &heard, &key, Duration::from_secs(5)).await,
            "round {round}: {heard:?}"
        );
        assert!(
            heard.subscriptions() >= round + 2,
            "round {round}: {heard:?}"
        );
    }
    task.abort();
}

#[tokio::test]
async fn a_frozen_server_is_waited_out_and_resets_arrive_after_it_thaws() {
    let server = RedisServer::start();
    let (_store, heard, task) = subscribed(&server.url()).await;

    // Frozen for longer than a PING may take: the listener gives the connection up and keeps
    // trying new ones (which cannot subscribe while the server is frozen).
    server.pause();
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.resume();
    assert!(
        delivered(&server, &heard, "after-the-thaw", Duration::from_secs(8)).await,
        "{heard:?}"
    );
    assert!(heard.subscriptions() >= 2, "{heard:?}");
    task.abort();
}

#[tokio::test]
async fn the_keepalive_interval_is_configurable_with_a_sane_default() {
    assert_eq!(
        RedisConfig::new("redis://127.0.0.1/").reset_ping_interval,
        Duration::from_secs(5)
    );
    assert_eq!(
        RedisConfig::new("redis://127.0.0.1/")
            .with_reset_ping_interval(Duration::ZERO)
            .reset_ping_interval,
        Duration::from_millis(10)
    );
}
