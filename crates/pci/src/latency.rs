//! Command latency histograms for `--stats` and the API's `stats`: lock-free counters in
//! power-of-two buckets of microseconds, from when a device took a command from the guest to
//! when it posted the completion.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Buckets: under 1 µs, under 2 µs, … under 2^(N-2) µs (about 1 s), then everything longer.
pub const BUCKETS: usize = 22;

/// Prefix of the bucket counters in [`LatencyHistogram::stats`].
pub const STAT_PREFIX: &str = "latency_us_lt_";

/// Command latencies.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; BUCKETS],
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl LatencyHistogram {
    /// Count one command that took `d`.
    pub fn record(&self, d: Duration) {
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        // Bucket i holds latencies below 2^i µs: i = bits needed for `us`.
        let i = (u64::BITS - us.leading_zeros()) as usize;
        self.buckets[i.min(BUCKETS - 1)].fetch_add(1, Relaxed);
    }

    /// The counts, as `latency_us_lt_1`, `latency_us_lt_2`, … `latency_us_lt_inf` (buckets that
    /// never counted anything are left out).
    pub fn stats(&self) -> Vec<(String, u64)> {
        self.buckets
            .iter()
            .enumerate()
            .filter_map(|(i, b)| {
                let n = b.load(Relaxed);
                let bound = if i + 1 == BUCKETS {
                    "inf".to_string()
                } else {
                    (1u64 << i).to_string()
                };
                (n > 0).then(|| (format!("{STAT_PREFIX}{bound}"), n))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_powers_of_two_of_microseconds() {
        let h = LatencyHistogram::default();
        for us in [0, 1, 3, 4, 1000, 10_000_000] {
            h.record(Duration::from_micros(us));
        }
        assert_eq!(
            h.stats(),
            vec![
                ("latency_us_lt_1".to_string(), 1),
                ("latency_us_lt_2".to_string(), 1),
                ("latency_us_lt_4".to_string(), 1),
                ("latency_us_lt_8".to_string(), 1),
                ("latency_us_lt_1024".to_string(), 1),
                ("latency_us_lt_inf".to_string(), 1),
            ]
        );
    }
}
