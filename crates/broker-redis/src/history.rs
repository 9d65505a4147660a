//! Reading a room's history stream.

use std::sync::Arc;

use redis::Value;
use roomcast_broker::{BrokerError, History};
use roomcast_protocol::{Event, EventDefaults, EventId, RoomKey};

use crate::commands::Commands;
use crate::names::Names;
use crate::subscriber::{count_decode_error, now_ms};

/// The room's events after `since` (exclusive), oldest first, at most
/// `limit`; `recovered` is false when the publish script trimmed an entry
/// newer than `since` (the room's trim mark).
pub(crate) async fn since(
    commands: &Commands,
    names: &Names,
    room: &RoomKey,
    since: EventId,
    limit: usize,
) -> Result<History, BrokerError> {
    let stream = names.stream(room);
    let start = if since == EventId::ZERO {
        "-".to_owned()
    } else {
        format!("({since}")
    };
    // XRANGE first, the mark second: a trim in between can only make
    // `recovered` pessimistic, never hide a gap.
    let mut pipe = redis::pipe();
    pipe.cmd("XRANGE")
        .arg(&stream)
        .arg(&start)
        .arg("+")
        .arg("COUNT")
        .arg(limit.saturating_add(1))
        .cmd("GET")
        .arg(names.trim_mark(room));
    let (entries, mark): (Value, Option<String>) = commands
        .pipeline(&pipe)
        .await
        .map_err(|e| BrokerError::unavailable(format!("reading history of {room}"), e))?;
    let trimmed_up_to = mark
        .and_then(|s| s.parse::<EventId>().ok())
        .unwrap_or(EventId::ZERO);
    let Value::Array(entries) = entries else {
        return Err(BrokerError::Unavailable {
            context: format!("unexpected XRANGE reply for {room}"),
            source: None,
        });
    };
    let more = entries.len() > limit;
    let defaults = EventDefaults {
        tenant: Some(room.tenant.clone()),
        now_ms: now_ms(),
    };
    let mut events = Vec::with_capacity(entries.len().min(limit));
    for entry in entries.into_iter().take(limit) {
        match decode_entry(entry, &defaults, room) {
            Some(event) => events.push(Arc::new(event)),
            None => count_decode_error(room, "history entry"),
        }
    }
    Ok(History {
        events,
        recovered: since >= trimmed_up_to,
        more,
    })
}

/// A field of a flat `[k, v, k, v...]` reply (RESP2) or a map (RESP3).
fn field<'a>(reply: &'a Value, name: &str) -> Option<&'a Value> {
    match reply {
        Value::Array(items) => items
            .chunks(2)
            .find(|kv| matches!(&kv[0], Value::BulkString(k) if k == name.as_bytes()))
            .and_then(|kv| kv.get(1)),
        Value::Map(pairs) => pairs
            .iter()
            .find(|(k, _)| matches!(k, Value::BulkString(k) if k == name.as_bytes()))
            .map(|(_, v)| v),
        _ => None,
    }
}

/// `[id, [field, value, ...]]` → the event in field `e`, with its id.
fn decode_entry(entry: Value, defaults: &EventDefaults, room: &RoomKey) -> Option<Event> {
    let Value::Array(mut parts) = entry else {
        return None;
    };
    if parts.len() != 2 {
        return None;
    }
    let fields = parts.pop()?;
    let id: String = redis::from_redis_value(parts.pop()?).ok()?;
    let Value::BulkString(envelope) = field(&fields, "e")? else {
        return None;
    };
    let mut event = Event::decode(envelope, defaults).ok()?;
    if event.tenant != room.tenant {
        return None;
    }
    event.id = id.parse().ok()?;
    Some(event)
}
