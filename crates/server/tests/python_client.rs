//! End to end with a client this project did not write: the real `ratelimit-server` binary,
//! asked by the Python code generated from Envoy's protos (`grpcio` + `xds-protos` from PyPI),
//! on the memory store and on a real redis-server.
//!
//! The Python packages are installed into a virtualenv under `target/` the first time
//! (`crates/server/tests/python/requirements.txt`); when that is impossible (no `python3`, no
//! `venv` module, no access to PyPI) the test fails and says so. It never skips.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use common::{ServerProcess, TempDir, config_copy};
use ratelimit_tests::redis_server::TestRedis;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/rls_client.py");
const REQUIREMENTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/requirements.txt");

/// One installation at a time (both tests of this binary need it).
static VENV: Mutex<()> = Mutex::new(());

fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"),
    }
}

fn imports_work(python: &Path) -> bool {
    python.exists()
        && Command::new(python)
            .args([
                "-c",
                "import grpc; from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc; \
                 from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2",
            ])
            .output()
            .is_ok_and(|out| out.status.success())
}

/// The virtualenv's python, created and filled if needed.
///
/// The virtualenv is built under a temporary name and renamed into place, so test processes
/// running at once (nextest runs each test in its own) never see a half-made one.
fn python() -> PathBuf {
    let _guard = VENV
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let venv = target_dir().join("server-e2e-venv");
    let python = venv.join("bin").join("python");
    if imports_work(&python) {
        return python;
    }
    let building = target_dir().join(format!("server-e2e-venv.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&building);
    let host_python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let fail = |what: &str, detail: String| -> ! {
        panic!(
            "the Python end-to-end test needs a virtualenv with grpcio and xds-protos from PyPI \
             ({REQUIREMENTS}) and could not make one at {}: {what}\n{detail}\n\
             Install python3 with its venv module (Debian/Ubuntu: apt-get install python3-venv) \
             and allow access to PyPI, or set PYTHON to a Python 3.9+ interpreter.",
            venv.display()
        )
    };
    let out = Command::new(&host_python)
        .args(["-m", "venv"])
        .arg(&building)
        .output()
        .unwrap_or_else(|err| fail(&format!("cannot run {host_python}"), err.to_string()));
    if !out.status.success() {
        fail(
            &format!("{host_python} -m venv failed"),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
    }
    let out = Command::new(building.join("bin").join("python"))
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-r",
            REQUIREMENTS,
        ])
        .output()
        .unwrap_or_else(|err| fail("cannot run pip", err.to_string()));
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&building);
        fail(
            "pip install failed",
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
    }
    if imports_work(&python) {
        // Another process finished first.
        let _ = std::fs::remove_dir_all(&building);
        return python;
    }
    let _ = std::fs::remove_dir_all(&venv);
    if let Err(err) = std::fs::rename(&building, &venv) {
        if !imports_work(&python) {
            fail("cannot move the virtualenv into place", err.to_string());
        }
        let _ = std::fs::remove_dir_all(&building);
    }
    if !imports_work(&python) {
        fail("the packages installed but do not import", String::new());
    }
    python
}

fn run_client(extra: &[&str]) {
    let python = python();
    let config = config_copy();
    let logs = TempDir::new();
    let mut server = ServerProcess::start(config.path(), extra, logs.path());
    let out = Command::new(&python)
        .arg(SCRIPT)
        .args([
            "--grpc",
            &server.grpc,
            "--http",
            &server.http,
            "--config-dir",
        ])
        .arg(config.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the Python client failed:\n{stdout}\n{stderr}\nserver log:\n{}",
        server.log_text()
    );
    assert!(stdout.contains("11 passed, 0 failed"), "{stdout}");
    // SIGTERM: a graceful stop, exit status 0.
    assert!(
        server.terminate(),
        "no clean exit on SIGTERM; log:\n{}",
        server.log_text()
    );
    assert!(
        server.log_text().contains("stopped"),
        "{}",
        server.log_text()
    );
}

#[test]
fn python_client_against_the_memory_store() {
    run_client(&[]);
}

#[test]
fn python_client_against_redis() {
    let redis = TestRedis::get();
    run_client(&["--redis-url", &redis.url]);
}
