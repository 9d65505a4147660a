//! Reconciling what Redis holds with what the node wants, and the health
//! and resync bookkeeping that follows each change.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::{Actor, Mode, State, BATCH};
use crate::resp;

/// What to send to one node in this round.
#[derive(Default)]
struct Plan {
    sub: Vec<Box<[u8]>>,
    unsub: Vec<Box<[u8]>>,
}

impl Actor {
    /// Makes Redis hold exactly the wanted rooms, each on its owner, then
    /// updates health and answers waiting subscribers.
    pub(super) async fn reconcile(&mut self) {
        let sharded = matches!(self.mode, Mode::Cluster { .. });
        let (sub, unsub) = if sharded {
            ("SSUBSCRIBE", "SUNSUBSCRIBE")
        } else {
            ("SUBSCRIBE", "UNSUBSCRIBE")
        };
        let held = self.hold_until.is_some();
        let channels: Vec<Box<[u8]>> = match self.dirty.take() {
            Some(dirty) => dirty.into_iter().collect(),
            None => {
                let mut all: HashSet<Box<[u8]>> = self
                    .shared
                    .rooms
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .keys()
                    .cloned()
                    .collect();
                for link in self.links.values() {
                    if let Some(c) = &link.conn {
                        all.extend(c.subscribed.iter().cloned());
                        all.extend(c.pending.iter().cloned());
                    }
                }
                all.into_iter().collect()
            }
        };
        self.dirty = Some(HashSet::new());
        let mut plan: HashMap<Arc<str>, Plan> = HashMap::new();
        for ch in channels {
            let owner = if self.shared.wants(&ch) {
                self.owner(&ch)
            } else {
                None
            };
            for (addr, link) in self.links.iter_mut() {
                let Some(conn) = &mut link.conn else { continue };
                let should = owner.as_ref() == Some(addr);
                if conn.holds(&ch) && !should {
                    conn.subscribed.remove(&ch);
                    conn.pending.remove(&ch);
                    conn.leaving.insert(ch.clone());
                    plan.entry(addr.clone()).or_default().unsub.push(ch.clone());
                } else if should && !conn.holds(&ch) && !held {
                    conn.pending.insert(ch.clone());
                    conn.leaving.remove(&ch);
                    plan.entry(addr.clone()).or_default().sub.push(ch.clone());
                }
            }
        }
        for (addr, p) in plan {
            let mut bytes = Vec::new();
            for (cmd, list) in [(sub, &p.sub), (unsub, &p.unsub)] {
                for chunk in list.chunks(BATCH) {
                    let mut args: Vec<&[u8]> = vec![cmd.as_bytes()];
                    args.extend(chunk.iter().map(|c| &c[..]));
                    bytes.extend(resp::encode(&args));
                }
            }
            self.write(&addr, &bytes).await;
        }
        self.update_health();
    }

    pub(super) fn update_health(&mut self) {
        let topology_known = matches!(self.mode, Mode::Standalone { .. }) || self.slots.is_some();
        let links_up = topology_known
            && !self.links.is_empty()
            && self.links.values().all(|l| l.conn.is_some());
        metrics::gauge!("roomcast_redis_connected").set(if links_up { 1.0 } else { 0.0 });
        let confirmed = |actor: &Actor, ch: &[u8]| -> bool {
            actor
                .owner(ch)
                .and_then(|addr| actor.links.get(&addr))
                .and_then(|l| l.conn.as_ref())
                .is_some_and(|c| c.subscribed.contains(ch))
        };
        // Answer subscribers: confirmed, or known down (then it is queued).
        let down = self.state == State::Recovering;
        let owner_up = |actor: &Actor, ch: &[u8]| -> bool {
            actor
                .owner(ch)
                .and_then(|a| actor.links.get(&a))
                .is_some_and(|l| l.conn.is_some())
        };
        let ready: Vec<Box<[u8]>> = self
            .waiters
            .keys()
            .filter(|ch| confirmed(self, ch) || (down && !owner_up(self, ch)))
            .cloned()
            .collect();
        for ch in ready {
            for done in self.waiters.remove(&ch).unwrap_or_default() {
                let _ = done.send(());
            }
        }
        if !links_up {
            self.shared.set_healthy(false);
            return;
        }
        match self.state {
            State::Healthy => {}
            State::Starting => self.state = State::Healthy,
            State::Recovering => {
                let wanted: Vec<Box<[u8]>> = self
                    .shared
                    .rooms
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .keys()
                    .cloned()
                    .collect();
                if wanted.iter().all(|ch| confirmed(self, ch)) {
                    self.state = State::Healthy;
                    tracing::info!(rooms = wanted.len(), "redis subscriptions restored");
                    self.shared.sink.resynced();
                }
            }
        }
        self.shared.set_healthy(self.state == State::Healthy);
    }
}
