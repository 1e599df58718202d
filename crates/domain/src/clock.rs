//! Where in-process stores read the time.

use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of "now", in seconds since the Unix epoch (fractional).
///
/// In-process stores read time through this trait so that tests can move time by hand
/// ([`ManualClock`]) instead of sleeping. The Redis store uses Redis's own `TIME` instead,
/// so that every host shares one clock.
pub trait Clock: Send + Sync + Debug + 'static {
    /// The current time in seconds since the Unix epoch.
    fn now(&self) -> f64;
}

/// The host's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> f64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
    }
}

/// A clock that moves only when told to. Clones share the same time.
///
/// ```
/// use std::time::Duration;
/// use ratelimit_domain::{Clock, ManualClock};
///
/// let clock = ManualClock::new(1_000.0);
/// clock.advance(Duration::from_secs(12));
/// assert_eq!(clock.now(), 1_012.0);
/// ```
#[derive(Debug, Clone)]
pub struct ManualClock {
    /// The current time as the bits of an `f64`, so that reads and writes need no lock.
    seconds: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock standing at `seconds` since the Unix epoch.
    pub fn new(seconds: f64) -> Self {
        Self {
            seconds: Arc::new(AtomicU64::new(seconds.to_bits())),
        }
    }

    /// A clock standing at the host's current time.
    pub fn starting_now() -> Self {
        Self::new(SystemClock.now())
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let by = by.as_secs_f64();
        // fetch_update cannot fail with a closure that always returns Some.
        let _ = self
            .seconds
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |bits| {
                Some((f64::from_bits(bits) + by).to_bits())
            });
    }

    /// Sets the clock to `seconds`, forwards or backwards.
    pub fn set(&self, seconds: f64) {
        self.seconds.store(seconds.to_bits(), Ordering::Release);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> f64 {
        f64::from_bits(self.seconds.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told_and_clones_share_it() {
        let clock = ManualClock::new(100.0);
        let twin = clock.clone();
        clock.advance(Duration::from_millis(1_500));
        assert_eq!(twin.now(), 101.5);
        twin.set(50.0);
        assert_eq!(clock.now(), 50.0);
    }

    #[test]
    fn system_clock_is_after_2020() {
        assert!(SystemClock.now() > 1_577_836_800.0);
    }
}
