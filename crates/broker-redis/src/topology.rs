//! Which Cluster master owns which slot, read from `CLUSTER SLOTS`.

use std::sync::Arc;

use redis::Value;

/// Slot ranges and their masters (`host:port`), sorted by first slot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SlotMap {
    ranges: Vec<(u16, u16, Arc<str>)>,
}

impl SlotMap {
    /// Parses a `CLUSTER SLOTS` reply. `fallback_host` replaces an empty
    /// host (a node that does not know its own address answers `""`).
    pub(crate) fn from_cluster_slots(reply: &Value, fallback_host: &str) -> Option<SlotMap> {
        let Value::Array(entries) = reply else {
            return None;
        };
        let mut ranges = Vec::with_capacity(entries.len());
        for entry in entries {
            let Value::Array(fields) = entry else {
                return None;
            };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
                (fields.first(), fields.get(1), fields.get(2))
            else {
                return None;
            };
            let host = match master.first() {
                Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                Some(Value::SimpleString(s)) => s.clone(),
                _ => return None,
            };
            let host = if host.is_empty() || host == "?" {
                fallback_host.to_owned()
            } else {
                host
            };
            let Some(Value::Int(port)) = master.get(1) else {
                return None;
            };
            ranges.push((
                *start as u16,
                *end as u16,
                Arc::from(format!("{host}:{port}")),
            ));
        }
        ranges.sort();
        Some(SlotMap { ranges })
    }

    /// The master owning `slot`, if any.
    pub(crate) fn owner(&self, slot: u16) -> Option<&Arc<str>> {
        let i = self.ranges.partition_point(|(start, _, _)| *start <= slot);
        let (start, end, addr) = self.ranges.get(i.checked_sub(1)?)?;
        (*start..=*end).contains(&slot).then_some(addr)
    }

    /// Records a `MOVED <slot> <host:port>` redirect for one slot.
    pub(crate) fn moved(&mut self, slot: u16, addr: &str) {
        let mut out = Vec::with_capacity(self.ranges.len() + 2);
        for (start, end, owner) in self.ranges.drain(..) {
            if (start..=end).contains(&slot) {
                if start < slot {
                    out.push((start, slot - 1, owner.clone()));
                }
                if slot < end {
                    out.push((slot + 1, end, owner));
                }
            } else {
                out.push((start, end, owner));
            }
        }
        out.push((slot, slot, Arc::from(addr)));
        out.sort();
        self.ranges = out;
    }

    /// Every master that owns at least one slot.
    pub(crate) fn masters(&self) -> Vec<Arc<str>> {
        let mut m: Vec<_> = self.ranges.iter().map(|(_, _, a)| a.clone()).collect();
        m.sort();
        m.dedup();
        m
    }
}

/// Parses `MOVED <slot> <host:port>`.
pub(crate) fn parse_moved(error: &str) -> Option<(u16, &str)> {
    let mut parts = error.split_whitespace();
    if parts.next()? != "MOVED" {
        return None;
    }
    let slot = parts.next()?.parse().ok()?;
    Some((slot, parts.next()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(host: &str, port: i64) -> Value {
        Value::Array(vec![
            Value::BulkString(host.as_bytes().to_vec()),
            Value::Int(port),
            Value::BulkString(b"id".to_vec()),
        ])
    }

    #[test]
    fn parses_slots_and_applies_moves() {
        let reply = Value::Array(vec![
            Value::Array(vec![Value::Int(5461), Value::Int(16383), node("", 7001)]),
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("10.0.0.1", 7000),
            ]),
        ]);
        let mut map = SlotMap::from_cluster_slots(&reply, "127.0.0.1").unwrap();
        assert_eq!(map.owner(0).map(|a| &**a), Some("10.0.0.1:7000"));
        assert_eq!(map.owner(5461).map(|a| &**a), Some("127.0.0.1:7001"));
        assert_eq!(map.masters().len(), 2);
        map.moved(100, "127.0.0.1:7001");
        assert_eq!(map.owner(100).map(|a| &**a), Some("127.0.0.1:7001"));
        assert_eq!(map.owner(99).map(|a| &**a), Some("10.0.0.1:7000"));
        assert_eq!(map.owner(101).map(|a| &**a), Some("10.0.0.1:7000"));
        assert_eq!(
            parse_moved("MOVED 3999 127.0.0.1:6381"),
            Some((3999, "127.0.0.1:6381"))
        );
        assert_eq!(parse_moved("ERR nope"), None);
    }
}
