//! The CPU time of chosen threads, read from Linux's `/proc/<pid>/task/<tid>/schedstat`: the
//! nanoseconds each thread has run, kernel time included (`stat`'s user and system ticks are
//! 10 ms apart, too coarse for half-second rounds).
//!
//! `just bench-http` reads it for the servers' thread and for the load generator's, so that the
//! server's CPU per request is measured rather than inferred from requests/s (which equals it
//! only while the server thread is saturated and the client is not).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

/// A set of threads whose CPU time is summed.
#[derive(Debug, Clone, Default)]
pub(crate) struct ThreadCpu {
    schedstats: Arc<Mutex<Vec<PathBuf>>>,
}

impl ThreadCpu {
    /// Adds the calling thread (a no-op where `/proc/thread-self` does not exist).
    pub(crate) fn add_current_thread(&self) {
        if let Ok(task) = std::fs::read_link("/proc/thread-self") {
            self.schedstats
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(Path::new("/proc").join(task).join("schedstat"));
        }
    }

    /// The nanoseconds the threads have run so far, summed; `None` when there is no thread or
    /// one cannot be read (not Linux, or a thread that has ended).
    pub(crate) fn nanos(&self) -> Option<u64> {
        let schedstats = self
            .schedstats
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if schedstats.is_empty() {
            return None;
        }
        let mut total = 0u64;
        for path in schedstats.iter() {
            let text = std::fs::read_to_string(path).ok()?;
            total = total.checked_add(ran_nanos(&text)?)?;
        }
        Some(total)
    }
}

/// The first field of a `schedstat` line: nanoseconds spent on a CPU.
fn ran_nanos(schedstat: &str) -> Option<u64> {
    schedstat.split_ascii_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_first_schedstat_field() {
        assert_eq!(ran_nanos("123456789 2000 17\n"), Some(123_456_789));
        assert_eq!(ran_nanos(""), None);
        assert_eq!(ran_nanos("x 1 2"), None);
    }

    #[test]
    fn a_busy_thread_runs_for_nanoseconds_that_grow() {
        let cpu = ThreadCpu::default();
        cpu.add_current_thread();
        let Some(before) = cpu.nanos() else {
            // Not Linux: nothing to read, and the benchmark says so in its table.
            assert!(!Path::new("/proc/thread-self").exists());
            return;
        };
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        let after = cpu.nanos().expect("still readable");
        assert!(after > before, "{before} -> {after} ({x})");
    }
}
