//! [`CounterClock`]: the host's wall clock, read from the CPU's timestamp counter.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use ratelimit_domain::Clock;

/// How often, in nanoseconds of counter time, the clock sets itself by the wall clock again.
const SYNC_INTERVAL_NS: u64 = 1_000_000_000;

/// The host's wall clock, read from the CPU's timestamp counter: the same time as
/// [`SystemClock`](ratelimit_domain::SystemClock) (seconds since the Unix epoch), at about a
/// quarter of the cost per read (docs/performance.md, "Memory store").
///
/// It reads the counter through the `quanta` crate (as governor does), which falls back to the
/// OS's monotonic clock where the CPU has no invariant counter, and turns counter time into
/// wall time with an offset taken from the wall clock once a second. Between two of those, it
/// runs at the rate the counter was calibrated to (within a few parts per million of the OS's
/// clock), so it stays within microseconds of `SystemClock`; each new offset brings it back,
/// as a step of that size. The wall clock itself steps when it is set (NTP), and this clock
/// follows within a second. A store's decisions are exactly those of
/// [`token_bucket::step`](ratelimit_domain::token_bucket::step) for whatever time the clock
/// gives, and a time a little before a bucket's last update counts as no time passed.
///
/// The counter is calibrated on the first read of the first such clock in the process (up to
/// 200 ms, once). Clones share their offset.
#[derive(Debug, Clone, Default)]
pub struct CounterClock {
    inner: Arc<OnceLock<Counter>>,
}

#[derive(Debug)]
struct Counter {
    clock: quanta::Clock,
    /// The counter's raw reading when the clock was first read.
    start: u64,
    /// Seconds per tick of the raw counter, as calibrated by quanta.
    tick: f64,
    /// Wall time, in seconds since the Unix epoch, less the counter's time since `start` (as
    /// the bits of an `f64`).
    offset: AtomicU64,
    /// Ticks since `start` at or after which the next read takes a new offset.
    next_sync: AtomicU64,
    /// Ticks between offsets.
    interval: u64,
}

impl CounterClock {
    /// A clock; the counter is calibrated on its first read.
    pub fn new() -> Self {
        Self::default()
    }

    /// A clock that takes a new offset every `interval_ns` ns, for tests.
    #[cfg(test)]
    fn with_interval(interval_ns: u64) -> Self {
        let inner = OnceLock::new();
        let _ = inner.set(Counter::new(interval_ns));
        Self {
            inner: Arc::new(inner),
        }
    }
}

impl Counter {
    fn new(interval_ns: u64) -> Self {
        // Ticks over which quanta's scale is read: large enough for its precision, small
        // enough for its arithmetic.
        const SPAN: u64 = 1 << 40;
        let clock = quanta::Clock::new();
        let tick = clock.delta_as_nanos(0, SPAN) as f64 * 1e-9 / SPAN as f64;
        // Bounded by the interval, which is far below u64's range in ticks.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let interval = (interval_ns as f64 * 1e-9 / tick) as u64;
        let start = clock.raw();
        let counter = Self {
            clock,
            start,
            tick,
            offset: AtomicU64::new(0),
            next_sync: AtomicU64::new(interval),
            interval,
        };
        counter.sync(0);
        counter
    }

    /// Ticks since `start`; 0 for a reading behind it (the counters of two cores can differ
    /// by a little).
    fn elapsed(&self) -> u64 {
        let ticks = self.clock.raw().wrapping_sub(self.start);
        if ticks > i64::MAX as u64 { 0 } else { ticks }
    }

    /// Seconds in `ticks` (at most `i64::MAX`, see `elapsed`).
    fn seconds(&self, ticks: u64) -> f64 {
        // A signed conversion is one instruction; an unsigned one is several.
        i64::try_from(ticks).map_or(0.0, |ticks| ticks as f64) * self.tick
    }

    /// Takes a new offset: the wall clock now, less `elapsed` ticks.
    fn sync(&self, elapsed: u64) {
        let offset = wall_clock() - self.seconds(elapsed);
        self.offset.store(offset.to_bits(), Ordering::Relaxed);
    }

    fn now(&self) -> f64 {
        let elapsed = self.elapsed();
        let due = self.next_sync.load(Ordering::Relaxed);
        if elapsed >= due
            && self
                .next_sync
                .compare_exchange(
                    due,
                    elapsed.saturating_add(self.interval),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            // One reader takes the new offset; the others use the last one meanwhile.
            self.sync(elapsed);
        }
        f64::from_bits(self.offset.load(Ordering::Relaxed)) + self.seconds(elapsed)
    }
}

/// What [`SystemClock`](ratelimit_domain::SystemClock) reads.
fn wall_clock() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Clock for CounterClock {
    fn now(&self) -> f64 {
        self.inner
            .get_or_init(|| Counter::new(SYNC_INTERVAL_NS))
            .now()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ratelimit_domain::SystemClock;

    use super::*;

    /// Whether `clock` reads between two readings of the wall clock taken around it, give or
    /// take `slack` seconds.
    fn agrees_with_the_wall_clock(clock: &CounterClock, slack: f64) -> bool {
        let before = SystemClock.now();
        let now = clock.now();
        let after = SystemClock.now();
        before - slack <= now && now <= after + slack
    }

    #[test]
    fn reads_the_wall_clock() {
        let clock = CounterClock::new();
        for _ in 0..1_000 {
            // The counter's calibration error over at most a second, and f64 rounding.
            assert!(agrees_with_the_wall_clock(&clock, 0.01));
        }
    }

    #[test]
    fn moves_with_the_wall_clock() {
        let clock = CounterClock::new();
        let first = clock.now();
        std::thread::sleep(Duration::from_millis(20));
        let later = clock.now();
        assert!(
            (0.019..1.0).contains(&(later - first)),
            "{first} -> {later}"
        );
    }

    #[test]
    fn takes_a_new_offset_when_due() {
        // An offset at every read: the clock is then the wall clock plus at most the time
        // between two instructions. A wrong offset is set right by the next read.
        let clock = CounterClock::with_interval(0);
        for _ in 0..1_000 {
            if let Some(counter) = clock.inner.get() {
                counter.offset.store(0.0_f64.to_bits(), Ordering::Relaxed);
            }
            assert!(agrees_with_the_wall_clock(&clock, 0.001));
        }
        // A clone shares the offset, and the calibration.
        let clone = clock.clone();
        assert!(Arc::ptr_eq(&clock.inner, &clone.inner));
        assert!(agrees_with_the_wall_clock(&clone, 0.001));
    }
}
