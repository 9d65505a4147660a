//! How far behind this node delivers: the largest publish→fan-out delay seen
//! over the last two one-second buckets. The publish API refuses new events
//! while it is past the configured limit, so a publisher that outruns the
//! cluster is told so instead of the cluster silently falling behind.

use std::sync::atomic::{AtomicU64, Ordering};

/// Lock-free tracker of the recent maximum delivery lag.
#[derive(Debug, Default)]
pub(crate) struct LagTracker {
    /// Current second (unix s) and the max lag seen in it (ms), packed.
    current: AtomicU64,
    previous: AtomicU64,
}

const SECOND_BITS: u32 = 34;

fn pack(second: u64, lag_ms: u64) -> u64 {
    (second << (64 - SECOND_BITS)) | lag_ms.min((1 << (64 - SECOND_BITS)) - 1)
}

fn unpack(v: u64) -> (u64, u64) {
    (v >> (64 - SECOND_BITS), v & ((1 << (64 - SECOND_BITS)) - 1))
}

impl LagTracker {
    /// Records one event fanned out `lag_ms` after it was published, at `now_ms`.
    pub(crate) fn record(&self, now_ms: u64, lag_ms: u64) {
        let second = now_ms / 1000;
        let mut cur = self.current.load(Ordering::Relaxed);
        loop {
            let (s, max) = unpack(cur);
            let next = if s == second {
                if lag_ms <= max {
                    return;
                }
                pack(second, lag_ms)
            } else {
                pack(second, lag_ms)
            };
            match self.current.compare_exchange_weak(
                cur,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    if s != second {
                        self.previous.store(cur, Ordering::Relaxed);
                    }
                    return;
                }
                Err(actual) => cur = actual,
            }
        }
    }

    /// The largest lag (ms) seen in this second or the one before.
    pub(crate) fn recent_max(&self, now_ms: u64) -> u64 {
        let second = now_ms / 1000;
        [&self.current, &self.previous]
            .iter()
            .map(|a| unpack(a.load(Ordering::Relaxed)))
            .filter(|(s, _)| *s + 1 >= second)
            .map(|(_, lag)| lag)
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_max_of_the_last_two_seconds() {
        let t = LagTracker::default();
        t.record(10_000, 5);
        t.record(10_500, 40);
        t.record(10_900, 7);
        assert_eq!(t.recent_max(10_999), 40);
        t.record(11_100, 3);
        assert_eq!(t.recent_max(11_200), 40, "the previous second still counts");
        t.record(12_100, 2);
        assert_eq!(t.recent_max(12_200), 3);
        assert_eq!(t.recent_max(20_000), 0, "old buckets expire");
    }
}
