//! Counters: cluster-wide fixed-window hit counts (rate limits that hold
//! across every node, not per node). An optional capability of a broker, in
//! its own trait like [`crate::Presence`].
//!
//! A counter is named by a key and a window: every hit in the same window
//! (`now_ms / window`, the caller's clock) adds one, and the count starts
//! again at zero in the next window. Counts of past windows are forgotten
//! shortly after their window ends.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;

use crate::broker::BrokerError;

/// Fixed-window counters shared by the cluster.
#[async_trait]
pub trait Counters: Send + Sync + 'static {
    /// Counts one hit on `key` in the window of length `window` that holds
    /// `now_ms` (unix ms) and returns the window's count, this hit included.
    /// A zero window counts as one millisecond.
    async fn hit(&self, key: &str, window: Duration, now_ms: u64) -> Result<u64, BrokerError>;
}

/// The window a hit at `now_ms` falls in: its index and its end (unix ms).
pub fn fixed_window(window: Duration, now_ms: u64) -> (u64, u64) {
    let len = (window.as_millis() as u64).max(1);
    let index = now_ms / len;
    (index, index.saturating_add(1).saturating_mul(len))
}

/// Counters kept in this process (the memory broker's, single node).
#[derive(Default)]
pub struct MemoryCounters {
    inner: Mutex<Windows>,
}

#[derive(Default)]
struct Windows {
    /// key → (window index, window end ms, count)
    counts: HashMap<String, (u64, u64, u64)>,
    /// Size at which past windows are swept next.
    sweep_at: usize,
}

/// Fewest entries before a sweep of past windows is worth it.
const SWEEP_MIN: usize = 1024;

#[async_trait]
impl Counters for MemoryCounters {
    async fn hit(&self, key: &str, window: Duration, now_ms: u64) -> Result<u64, BrokerError> {
        let (index, end) = fixed_window(window, now_ms);
        let mut w = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if w.counts.len() >= w.sweep_at.max(SWEEP_MIN) {
            w.counts.retain(|_, (_, end, _)| *end > now_ms);
            w.sweep_at = w.counts.len() * 2;
        }
        let entry = w.counts.entry(key.to_owned()).or_insert((index, end, 0));
        if entry.0 != index {
            *entry = (index, end, 0);
        }
        entry.2 += 1;
        Ok(entry.2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);
    const T0: u64 = 1_717_000_020_000; // a window boundary of one minute

    #[tokio::test]
    async fn counts_per_key_and_window() {
        let c = MemoryCounters::default();
        assert_eq!(c.hit("u1", MINUTE, T0).await.unwrap(), 1);
        assert_eq!(c.hit("u1", MINUTE, T0 + 59_999).await.unwrap(), 2);
        assert_eq!(c.hit("u2", MINUTE, T0 + 1).await.unwrap(), 1);
        // The next window starts again.
        assert_eq!(c.hit("u1", MINUTE, T0 + 60_000).await.unwrap(), 1);
        assert_eq!(c.hit("u1", MINUTE, T0 + 60_001).await.unwrap(), 2);
    }

    #[tokio::test]
    async fn past_windows_are_swept() {
        let c = MemoryCounters::default();
        for i in 0..SWEEP_MIN {
            c.hit(&format!("k{i}"), MINUTE, T0).await.unwrap();
        }
        c.hit("late", MINUTE, T0 + 120_000).await.unwrap();
        let len = c.inner.lock().unwrap().counts.len();
        assert_eq!(len, 1, "only the live window is kept");
    }

    #[test]
    fn windows_are_aligned() {
        assert_eq!(fixed_window(MINUTE, T0 + 5), (T0 / 60_000, T0 + 60_000));
        assert_eq!(fixed_window(Duration::ZERO, 7), (7, 8));
    }
}
