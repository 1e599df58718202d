//! The CPU time of chosen threads, read from Linux's `/proc/<pid>/task/<tid>/schedstat`: the
//! nanoseconds each thread has run, kernel time included (`stat`'s user and system ticks are
//! 10 ms apart, too coarse for half-second rounds).
//!
//! `just bench-http` reads it for the servers' thread and for the load generator's, so that the
//! server's CPU per request is measured rather than inferred from requests/s (which equals it
//! only while the server thread is saturated and the client is not).
//!
//! The kernel adds a running thread's time at scheduler ticks and context switches, so a
//! reading lags by at most a tick (a few milliseconds), small against a half-second round; a
//! server thread switches at every wait for its sockets anyway.

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

    /// The nanoseconds the threads have run so far, summed; `None` when no thread can be read
    /// (not Linux). A thread that has ended is dropped from the set: its time is then missing
    /// from the sum, so a reading around a round in which one ended comes out short (or, by
    /// `checked_sub`, not at all), and later readings are whole again.
    pub(crate) fn nanos(&self) -> Option<u64> {
        let mut schedstats = self
            .schedstats
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut total = 0u64;
        let mut read = false;
        schedstats.retain(|path| {
            let ran = std::fs::read_to_string(path)
                .ok()
                .and_then(|text| ran_nanos(&text));
            if let Some(ran) = ran {
                total = total.saturating_add(ran);
                read = true;
            }
            ran.is_some()
        });
        read.then_some(total)
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
    fn a_thread_that_has_ended_is_dropped_from_the_sum() {
        let cpu = ThreadCpu::default();
        let ended = cpu.clone();
        std::thread::spawn(move || ended.add_current_thread())
            .join()
            .unwrap();
        cpu.add_current_thread();
        if !Path::new("/proc/thread-self").exists() {
            assert_eq!(cpu.nanos(), None);
            return;
        }
        // `join` returns once the kernel has cleared the thread's id, which it does a little
        // before it removes the thread from `/proc`: read again until it is gone, for up to 5 s.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            assert!(cpu.nanos().is_some(), "the living thread is still read");
            let threads = cpu.schedstats.lock().unwrap().len();
            if threads == 1 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the ended thread is still read after 5 s ({threads} threads)"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
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
        // The kernel adds a running thread's time at scheduler ticks and switches, so the
        // reading can lag a few milliseconds: work, yield (a switch), read, for up to 5 s.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut x = 0u64;
        loop {
            for i in 0..1_000_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
            std::thread::yield_now();
            let after = cpu.nanos().expect("still readable");
            if after > before {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no CPU time counted in 5 s of work: {before} -> {after} ({x})"
            );
        }
    }
}
