//! How much history each room keeps.

use std::collections::HashMap;
use std::time::Duration;

/// A cap on one room's history: whichever limit is hit first trims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryCap {
    /// Most events kept per room; 0 keeps no history.
    pub max_len: usize,
    /// Oldest event kept.
    pub max_age: Duration,
}

impl Default for HistoryCap {
    fn default() -> Self {
        Self {
            max_len: 1000,
            max_age: Duration::from_secs(3600),
        }
    }
}

/// History caps, by room kind (`team`, `task`, ...), with a default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryPolicy {
    pub default: HistoryCap,
    pub per_kind: HashMap<String, HistoryCap>,
}

impl HistoryPolicy {
    pub fn cap_for(&self, room_kind: &str) -> HistoryCap {
        self.per_kind
            .get(room_kind)
            .copied()
            .unwrap_or(self.default)
    }
}
