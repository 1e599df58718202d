//! Small statistics helpers: latency histograms, medians, a fast PRNG for identifiers.

use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::BoxResult;

/// A latency histogram in nanoseconds (1 ns … 60 s, 3 significant digits).
pub(crate) fn latency_histogram() -> BoxResult<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 60_000_000_000, 3)?)
}

/// Records one latency, saturating at the histogram's bounds.
pub(crate) fn record(hist: &mut Histogram<u64>, elapsed: Duration) {
    let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
    hist.saturating_record(nanos.max(1));
}

/// The `q` quantile (0.0 ..= 1.0) of a histogram, in microseconds.
pub(crate) fn quantile_us(hist: &Histogram<u64>, q: f64) -> f64 {
    hist.value_at_quantile(q) as f64 / 1_000.0
}

/// The median of some values (the mean of the middle two for an even count); NaN when empty.
pub(crate) fn median(values: &[f64]) -> f64 {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

/// SplitMix64: a tiny, fast, good-enough generator for random identifiers.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    /// A generator seeded from the clock and a stream number.
    pub(crate) fn seeded(stream: u64) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        Self(u64::from(now) ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    /// The next 64 random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Writes a random IPv4-looking identifier into `out` (replacing its content): 2^32
    /// distinct values, so random checks almost never share a bucket.
    pub(crate) fn ip_into(&mut self, out: &mut String) {
        let [a, b, c, d, ..] = self.next_u64().to_le_bytes();
        out.clear();
        // Writing to a String cannot fail.
        let _ = write!(out, "{a}.{b}.{c}.{d}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(median(&[f64::NAN, 5.0]), 5.0);
    }

    #[test]
    fn quantiles_are_in_microseconds() -> BoxResult<()> {
        let mut hist = latency_histogram()?;
        for micros in 1..=100_u64 {
            record(&mut hist, Duration::from_micros(micros));
        }
        let p50 = quantile_us(&hist, 0.5);
        let p99 = quantile_us(&hist, 0.99);
        assert!((49.9..=50.1).contains(&p50), "{p50}");
        assert!((98.9..=99.1).contains(&p99), "{p99}");
        Ok(())
    }

    #[test]
    fn identifiers_look_like_ipv4_and_vary() {
        let mut rng = Rng::seeded(7);
        let mut a = String::new();
        let mut b = String::new();
        rng.ip_into(&mut a);
        rng.ip_into(&mut b);
        assert_ne!(a, b);
        assert_eq!(a.split('.').count(), 4);
        assert!(a.split('.').all(|part| part.parse::<u8>().is_ok()));
    }
}
