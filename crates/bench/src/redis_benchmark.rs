//! `redis-benchmark`'s figure for the same script: what a pipelining C client gets out of the
//! same Redis on the same machine.

use std::io::ErrorKind;
use std::process::Command;

use crate::BoxResult;

/// Runs `redis-benchmark` against `port` with the token-bucket script `sha` (already loaded):
/// 64 clients, 16 commands per pipeline, random buckets. `Ok(None)` when `redis-benchmark` is
/// not installed.
///
/// # Errors
/// When it ran but failed, or printed no "requests per second".
pub(crate) fn run(port: u16, sha: &str, requests: u64) -> BoxResult<Option<f64>> {
    let output = Command::new("redis-benchmark")
        .args(["-p", &port.to_string(), "-n", &requests.to_string()])
        .args(["-c", "64", "-P", "16", "-r", "100000", "-q"])
        .args(["evalsha", sha, "2"])
        .args(["b:{__rand_int__}:tokens", "b:{__rand_int__}:time"])
        .args(["100", "60", "1", ""])
        .output();
    let output = match output {
        Ok(output) => output,
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(format!("cannot run redis-benchmark: {err}").into()),
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "redis-benchmark failed ({}): {stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    parse_requests_per_second(&stdout).map(Some).ok_or_else(|| {
        format!("no \"requests per second\" in redis-benchmark's output: {stdout:?}").into()
    })
}

/// The last "N requests per second" figure of `redis-benchmark -q` output. Progress lines are
/// separated by `\r` and say `rps=`, so they never match.
pub(crate) fn parse_requests_per_second(output: &str) -> Option<f64> {
    output
        .split(['\r', '\n'])
        .filter_map(|line| {
            let before = line.split(" requests per second").next()?;
            if before.len() == line.len() {
                return None;
            }
            before.rsplit([' ', ':']).next()?.trim().parse::<f64>().ok()
        })
        .next_back()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_redis_7_quiet_output_with_progress_lines() {
        let output = "evalsha 0a1b 2 b:{__rand_int__}:tokens: rps=112344.0 (overall: 110000.0) avg_msec=8.1 (overall: 8.2)\r\
                      evalsha 0a1b 2 b:{__rand_int__}:tokens b:{__rand_int__}:time 100 60 1 : 123456.79 requests per second, p50=7.871 msec                    \n\n";
        assert_eq!(parse_requests_per_second(output), Some(123_456.79));
    }

    #[test]
    fn parses_older_output_without_percentiles() {
        let output = "EVALSHA abc: 98765.43 requests per second\n";
        assert_eq!(parse_requests_per_second(output), Some(98_765.43));
    }

    #[test]
    fn no_figure_is_none() {
        assert_eq!(parse_requests_per_second(""), None);
        assert_eq!(
            parse_requests_per_second(
                "Could not connect to Redis at 127.0.0.1:1: Connection refused\n"
            ),
            None
        );
        assert_eq!(
            parse_requests_per_second("x: lots requests per second\n"),
            None
        );
    }
}
