//! A small, bounded, time-limited cache of callback answers keyed by
//! (tenant, user, room), plus the in-flight table that lets concurrent
//! identical lookups share one request.
//!
//! Eviction is FIFO. Every entry lives for the same TTL, so insertion order is
//! expiry order: expired entries are dropped from the front as new ones come
//! in, and when the cache is full the oldest (soonest to expire) goes first.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use roomcast_protocol::{RoomName, TenantId, UserId};
use tokio::sync::OnceCell;
use tokio::time::Instant;

/// What a cache entry is about.
pub(crate) type CacheKey = (TenantId, UserId, RoomName);

/// One shared lookup: `Some(allow)` once answered, `None` if the callback
/// could not be reached.
pub(crate) type Flight = Arc<OnceCell<Option<bool>>>;

pub(crate) struct DecisionCache {
    ttl: Duration,
    max_entries: usize,
    inner: Mutex<Inner>,
    in_flight: Mutex<HashMap<CacheKey, Flight>>,
}

#[derive(Default)]
struct Inner {
    map: HashMap<CacheKey, Entry>,
    /// Insertion order, with the generation of the entry each slot was for:
    /// a slot whose generation no longer matches the map is stale.
    order: VecDeque<(CacheKey, u64)>,
    next_generation: u64,
}

struct Entry {
    allow: bool,
    inserted: Instant,
    generation: u64,
}

impl DecisionCache {
    /// A zero `ttl` or `max_entries` disables caching.
    pub(crate) fn new(ttl: Duration, max_entries: usize) -> Self {
        Self {
            ttl,
            max_entries,
            inner: Mutex::new(Inner::default()),
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    fn enabled(&self) -> bool {
        !self.ttl.is_zero() && self.max_entries > 0
    }

    /// A fresh cached answer, if any.
    pub(crate) fn get(&self, key: &CacheKey) -> Option<bool> {
        if !self.enabled() {
            return None;
        }
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let e = inner.map.get(key)?;
        (e.inserted.elapsed() < self.ttl).then_some(e.allow)
    }

    /// Remembers an answer for the TTL, evicting to stay within bounds.
    pub(crate) fn insert(&self, key: CacheKey, allow: bool) {
        if !self.enabled() {
            return;
        }
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let inner = &mut *inner;
        while let Some((front, generation)) = inner.order.front() {
            let current = inner.map.get(front).filter(|e| e.generation == *generation);
            let fresh = current.is_some_and(|e| now.duration_since(e.inserted) < self.ttl);
            if fresh && inner.order.len() < self.max_entries {
                break;
            }
            if current.is_some() {
                inner.map.remove(front);
            }
            inner.order.pop_front();
        }
        let generation = inner.next_generation;
        inner.next_generation += 1;
        inner.order.push_back((key.clone(), generation));
        inner.map.insert(
            key,
            Entry {
                allow,
                inserted: now,
                generation,
            },
        );
    }

    /// Number of entries held (fresh or not yet purged).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.map.len()
    }

    /// Joins the lookup in flight for `key`, or starts one.
    pub(crate) fn flight(&self, key: &CacheKey) -> Flight {
        let mut flights = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        flights.entry(key.clone()).or_default().clone()
    }

    /// Forgets a finished lookup (unless a newer one already replaced it).
    pub(crate) fn land(&self, key: &CacheKey, flight: &Flight) {
        let mut flights = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if flights.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            flights.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(room: &str) -> CacheKey {
        (
            "acme".parse().unwrap(),
            "u1".parse().unwrap(),
            room.parse().unwrap(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire_after_ttl() {
        let c = DecisionCache::new(Duration::from_secs(30), 10);
        c.insert(key("task:1"), true);
        c.insert(key("task:2"), false);
        assert_eq!(c.get(&key("task:1")), Some(true));
        assert_eq!(c.get(&key("task:2")), Some(false));
        assert_eq!(c.get(&key("task:3")), None);
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(c.get(&key("task:1")), Some(true));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(c.get(&key("task:1")), None);
        // Expired entries are purged on the next insert.
        c.insert(key("task:4"), true);
        assert_eq!(c.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn full_cache_evicts_oldest_and_stays_bounded() {
        let c = DecisionCache::new(Duration::from_secs(30), 3);
        for i in 0..100 {
            c.insert(key(&format!("task:{i}")), true);
            tokio::time::advance(Duration::from_millis(10)).await;
            assert!(c.len() <= 3);
            let inner = c.inner.lock().unwrap();
            assert!(inner.order.len() <= 3);
        }
        assert_eq!(c.get(&key("task:96")), None);
        for i in 97..100 {
            assert_eq!(c.get(&key(&format!("task:{i}"))), Some(true), "task:{i}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn reinserting_a_key_keeps_the_newest_answer() {
        let c = DecisionCache::new(Duration::from_secs(30), 2);
        c.insert(key("task:1"), true);
        c.insert(key("task:1"), false);
        c.insert(key("task:2"), true);
        // The stale slot for the first insert went first, not the live entry.
        assert_eq!(c.get(&key("task:1")), Some(false));
        assert_eq!(c.get(&key("task:2")), Some(true));
    }

    #[test]
    fn zero_ttl_or_size_disables_caching() {
        for c in [
            DecisionCache::new(Duration::ZERO, 10),
            DecisionCache::new(Duration::from_secs(1), 0),
        ] {
            c.insert(key("task:1"), true);
            assert_eq!(c.get(&key("task:1")), None);
        }
    }
}
