//! Reconciling what Redis holds with what the node wants, and the health
//! and resync bookkeeping that follows each change.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use super::{Actor, Mode, State, BATCH};
use crate::names::slot_of;
use crate::resp;

/// What to send to one node in this round.
#[derive(Default)]
struct Plan {
    sub: Vec<Box<[u8]>>,
    unsub: Vec<Box<[u8]>>,
}

/// Splits channels into commands of at most `max` channels. Sharded
/// (Cluster) commands may only name channels of one slot: SSUBSCRIBE or
/// SUNSUBSCRIBE of channels in different slots fails with CROSSSLOT, so
/// there each command carries one slot's channels.
fn batches(mut channels: Vec<Box<[u8]>>, sharded: bool, max: usize) -> Vec<Vec<Box<[u8]>>> {
    let mut out = Vec::new();
    if sharded {
        let mut by_slot: BTreeMap<u16, Vec<Box<[u8]>>> = BTreeMap::new();
        for ch in channels {
            by_slot.entry(slot_of(&ch)).or_default().push(ch);
        }
        for group in by_slot.into_values() {
            out.extend(group.chunks(max).map(<[_]>::to_vec));
        }
    } else {
        while !channels.is_empty() {
            let rest = channels.split_off(channels.len().min(max));
            out.push(std::mem::replace(&mut channels, rest));
        }
    }
    out
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
            let one_each = self
                .links
                .get(&addr)
                .and_then(|l| l.conn.as_ref())
                .is_some_and(|c| c.one_per_command);
            let max = if one_each { 1 } else { BATCH };
            let mut bytes = Vec::new();
            for (cmd, list) in [(sub, p.sub), (unsub, p.unsub)] {
                for batch in batches(list, sharded, max) {
                    let mut args: Vec<&[u8]> = vec![cmd.as_bytes()];
                    args.extend(batch.iter().map(|c| &c[..]));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(s: &str) -> Box<[u8]> {
        s.as_bytes().into()
    }

    #[test]
    fn sharded_commands_never_span_slots() {
        let channels = vec![ch("p:{a}:c"), ch("p:{b}:c"), ch("p:{a}:x"), ch("p:{c}:c")];
        let sharded = batches(channels.clone(), true, BATCH);
        assert_eq!(sharded.len(), 3, "one command per slot: {sharded:?}");
        for batch in &sharded {
            let slot = slot_of(&batch[0]);
            assert!(batch.iter().all(|c| slot_of(c) == slot));
        }
        assert_eq!(sharded.iter().map(Vec::len).sum::<usize>(), 4);
        assert_eq!(batches(channels.clone(), false, BATCH).len(), 1);
        assert_eq!(batches(channels.clone(), false, 1).len(), channels.len());
        let many: Vec<Box<[u8]>> = (0..BATCH + 1).map(|i| ch(&format!("r{i}"))).collect();
        assert_eq!(batches(many, false, BATCH).len(), 2);
    }
}
