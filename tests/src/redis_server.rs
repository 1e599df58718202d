//! A throwaway `redis-server` per test.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Environment variable naming the `redis-server` binary (default: `redis-server` on `PATH`).
pub const SERVER_BIN_VAR: &str = "REDIS_SERVER_BIN";

const INSTALL_HINT: &str = "redis-server is needed by the ratelimit tests but could not be started. \
Install it (Debian/Ubuntu: `sudo apt-get install redis-server`; macOS: `brew install redis`), \
or set REDIS_SERVER_BIN to its path, or set REDIS_URL to a Redis the tests may use.";

/// A `redis-server` child process on a loopback port, stopped when dropped.
///
/// It keeps nothing on disk (`--save ""`, no AOF) and writes its log into a temporary
/// directory that is removed on drop.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    extra_args: Vec<String>,
}

impl RedisServer {
    /// Starts a server on a free loopback port and waits until it answers `PING`.
    ///
    /// # Panics
    /// When `redis-server` is missing or does not come up, with a message saying how to
    /// install it or where its log is.
    pub fn start() -> Self {
        Self::start_with_args(&[])
    }

    /// Like [`start`](Self::start), with extra `redis-server` arguments (`--maxmemory 1mb`, …).
    ///
    /// # Panics
    /// As [`start`](Self::start).
    pub fn start_with_args(args: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("ratelimit-redis-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|err| panic!("cannot create {}: {err}", dir.display()));
        let mut server = Self {
            child: None,
            port: free_port(),
            dir,
            extra_args: args.iter().map(|s| (*s).to_owned()).collect(),
        };
        // Another test may grab the free port between our check and redis-server's bind: then
        // our server exits, and we try again on another port.
        for _ in 0..5 {
            match server.spawn() {
                Ok(()) => return server,
                Err(_) => server.port = free_port(),
            }
        }
        if let Err(problem) = server.spawn() {
            panic!("{problem}");
        }
        server
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The port the server listens on (kept across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server with SIGKILL (all data and scripts are lost) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        if let Err(problem) = self.spawn() {
            panic!("{problem}");
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open but nothing answers.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws a paused server (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// Runs one command synchronously (for test setup and inspection).
    ///
    /// # Panics
    /// When the server cannot be reached.
    pub fn cmd(&self, cmd: &redis::Cmd) -> redis::Value {
        let client = redis::Client::open(self.url()).unwrap_or_else(|err| panic!("bad url: {err}"));
        let mut conn = client
            .get_connection()
            .unwrap_or_else(|err| panic!("cannot reach redis on {}: {err}", self.port));
        cmd.query(&mut conn)
            .unwrap_or_else(|err| panic!("redis command failed: {err}"))
    }

    fn signal(&self, signal: &str) {
        if let Some(pid) = self.pid() {
            let status = Command::new("kill")
                .arg(signal)
                .arg(pid.to_string())
                .status();
            assert!(
                matches!(status, Ok(s) if s.success()),
                "kill {signal} {pid} failed: {status:?}"
            );
        }
    }

    /// What the server has logged so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("redis.log")
    }

    /// Starts the process and waits until it answers; `Err` when it exited first (usually: the
    /// port was taken) or did not answer within 10 s.
    fn spawn(&mut self) -> Result<(), String> {
        let bin = std::env::var(SERVER_BIN_VAR).unwrap_or_else(|_| "redis-server".to_owned());
        let child = Command::new(&bin)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.log_path())
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(err) => panic!("{INSTALL_HINT}\n(spawning {bin:?} failed: {err})"),
        };
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                return Err(format!(
                    "redis-server exited with {status} before answering.\n{INSTALL_HINT}\nLog:\n{log}"
                ));
            }
            // Only our own process counts: another test's server may answer on this port.
            if ping(self.port) && serves_pid(self.port, pid) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(format!(
            "redis-server on port {} did not answer PING within 10 s; log: {}",
            self.port,
            self.log_path().display()
        ))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // A paused server would ignore nothing but SIGKILL, which kill() sends anyway.
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis for tests that only need *a* Redis: `REDIS_URL` when set, else a throwaway server.
///
/// Tests sharing a `REDIS_URL` server must use their own key prefix ([`unique_prefix`]).
#[derive(Debug)]
pub struct TestRedis {
    /// The server this test started, if it started one.
    pub server: Option<RedisServer>,
    /// Where to connect.
    pub url: String,
}

impl TestRedis {
    /// `REDIS_URL` when set and not empty, a new [`RedisServer`] otherwise.
    pub fn get() -> Self {
        match std::env::var("REDIS_URL") {
            Ok(url) if !url.trim().is_empty() => Self {
                server: None,
                url: url.trim().to_owned(),
            },
            _ => {
                let server = RedisServer::start();
                Self {
                    url: server.url(),
                    server: Some(server),
                }
            }
        }
    }
}

/// A Redis URL on a free loopback port, where nothing listens: every command to it fails.
pub fn unreachable_url() -> String {
    format!("redis://127.0.0.1:{}/", free_port())
}

/// `CLIENT KILL TYPE normal SKIPME yes`: closes every client connection but the caller's and
/// those of replicas and subscribers, as an operator or a proxy might.
pub fn kill_normal_clients() -> redis::Cmd {
    let mut cmd = redis::cmd("CLIENT");
    cmd.arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes");
    cmd
}

/// A key prefix no other test uses, for tests that share a Redis.
pub fn unique_prefix() -> String {
    format!("rl_test_{}", uuid::Uuid::now_v7().simple())
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0")
        .unwrap_or_else(|err| panic!("cannot bind a loopback port: {err}"));
    listener
        .local_addr()
        .map(|addr| addr.port())
        .unwrap_or_else(|err| panic!("no local address: {err}"))
}

/// Whether the server on `port` is the process `pid` (`INFO server` names its process id).
fn serves_pid(port: u16, pid: u32) -> bool {
    let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}/")) else {
        return false;
    };
    let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_millis(500)) else {
        return false;
    };
    let info: redis::RedisResult<String> = redis::cmd("INFO").arg("server").query(&mut conn);
    info.is_ok_and(|info| {
        info.lines()
            .any(|line| line.trim() == format!("process_id:{pid}"))
    })
}

fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}
