//! The limitador contender of figure 6: a process of its own (`crates/bench/limitador/`, built
//! by its `build.sh`, which `just bench` runs), driven by the same load generator with the same
//! number of tasks, against the same Redis.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::coalesced::output;
use crate::{BoxResult, stats};

/// One run of the driver.
#[derive(Debug)]
pub(crate) struct Run {
    /// Checks per second.
    pub(crate) throughput: f64,
    /// Latency of each check, in nanoseconds.
    pub(crate) latency: Histogram<u64>,
}

/// The built driver.
#[derive(Debug)]
pub(crate) struct Driver {
    path: PathBuf,
}

impl Driver {
    /// The driver built by `crates/bench/limitador/build.sh` (or `LIMITADOR_DRIVER`), or why
    /// there is none.
    pub(crate) fn find() -> Result<Self, String> {
        let path = match std::env::var_os("LIMITADOR_DRIVER") {
            Some(path) => PathBuf::from(path),
            None => {
                let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
                manifest
                    .ancestors()
                    .nth(2)
                    .unwrap_or(manifest)
                    .join("target/limitador/release/ratelimit-bench-limitador")
            }
        };
        if path.is_file() {
            Ok(Self { path })
        } else {
            Err(format!(
                "limitador driver not built ({}); run crates/bench/limitador/build.sh",
                path.display()
            ))
        }
    }

    /// `tasks` tasks checking random identifiers through limitador for `time`.
    pub(crate) fn run(&self, url: &str, tasks: usize, time: Duration, seed: u64) -> BoxResult<Run> {
        let text = output(
            Command::new(&self.path)
                .arg(url)
                .arg(tasks.to_string())
                .arg(time.as_millis().to_string())
                .arg(seed.to_string()),
        )?;
        parse(&text)
    }
}

/// Reads the driver's output.
fn parse(text: &str) -> BoxResult<Run> {
    let mut checks = None;
    let mut elapsed = None;
    let mut latency = stats::latency_histogram()?;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("checks"), Some(n), None) => checks = Some(n.parse::<u64>()?),
            (Some("elapsed_ns"), Some(n), None) => elapsed = Some(n.parse::<u64>()?),
            (Some("latency"), Some(value), Some(count)) => {
                latency.record_n(value.parse::<u64>()?.max(1), count.parse::<u64>()?)?;
            }
            _ => return Err(format!("unexpected line from the limitador driver: {line:?}").into()),
        }
    }
    let (Some(checks), Some(elapsed)) = (checks, elapsed) else {
        return Err(format!("incomplete output from the limitador driver: {text:?}").into());
    };
    Ok(Run {
        throughput: checks as f64 / Duration::from_nanos(elapsed).as_secs_f64(),
        latency,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_drivers_output() -> BoxResult<()> {
        let run = parse("checks 500\nelapsed_ns 250000000\nlatency 1000 400\nlatency 3000 100\n")?;
        assert!((run.throughput - 2_000.0).abs() < 1e-6);
        assert_eq!(run.latency.len(), 500);
        assert!(parse("checks 5\n").is_err());
        assert!(parse("checks 5\nelapsed_ns 1\nnoise\n").is_err());
        Ok(())
    }
}
