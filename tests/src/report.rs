//! What `just chaos` and `just attack` share to write their tables into `docs/`.

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::redis_server::SERVER_BIN_VAR;

/// Replaces what lies between the markers `begin` and `end` of the file `doc` with
/// `section`, keeping the markers and the rest.
///
/// # Errors
/// When the file cannot be read or written, or lacks the markers in that order.
pub fn write_between_markers(
    doc: &str,
    begin: &str,
    end: &str,
    section: &str,
) -> Result<(), String> {
    let text = std::fs::read_to_string(doc).map_err(|err| format!("cannot read {doc}: {err}"))?;
    let (Some(from), Some(to)) = (text.find(begin), text.find(end)) else {
        return Err(format!("{doc} lacks the {begin} … {end} markers"));
    };
    if to < from {
        return Err(format!("{doc}: {end} comes before {begin}"));
    }
    let head = &text[..from + begin.len()];
    let tail = &text[to..];
    std::fs::write(doc, format!("{head}\n{section}{tail}"))
        .map_err(|err| format!("cannot write {doc}: {err}"))
}

/// Date, CPUs, CPU model, kernel, Redis version and build profile, on one line.
pub fn machine_facts() -> String {
    let date = output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_else(|| {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        format!("{secs} s since the Unix epoch")
    });
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .map_or_else(String::new, |model| format!(" ({model})"));
    let kernel = output("uname", &["-sr"]).unwrap_or_else(|| "unknown OS".to_owned());
    let bin = std::env::var(SERVER_BIN_VAR).unwrap_or_else(|_| "redis-server".to_owned());
    let redis = output(&bin, &["--version"])
        .map(|v| v.split(" sha=").next().unwrap_or_default().to_owned())
        .unwrap_or_else(|| "redis-server version unknown".to_owned());
    let build = if cfg!(debug_assertions) {
        "debug build"
    } else {
        "release build"
    };
    format!("{date}, {cpus} CPUs{model}, {kernel}, {redis}, {build}")
}

/// The trimmed stdout of a command that succeeded.
fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
