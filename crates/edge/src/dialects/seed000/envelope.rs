//! Seed 000's one message shape, `{"type","timestamp","payload"}`: events
//! (payload = the event's data), the replies this dialect adds
//! (`subscribed`, `unsubscribed`, `pong`) and errors, plus the ISO-8601
//! times it reads and writes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use roomcast_protocol::{Body, Event};
use serde_json::{json, Value};

/// An event as the envelope, or `None` for a protobuf body (seed 000 is JSON).
pub(crate) fn event(event: &Event) -> Option<Bytes> {
    let Body::Json(data) = &event.body else {
        return None;
    };
    let mut out = Vec::with_capacity(64 + event.kind.len() + data.len());
    out.extend_from_slice(br#"{"type":"#);
    serde_json::to_writer(&mut out, &*event.kind).ok()?;
    out.extend_from_slice(br#","timestamp":""#);
    out.extend_from_slice(iso(event.ts).as_bytes());
    out.extend_from_slice(br#"","payload":"#);
    out.extend_from_slice(data);
    out.push(b'}');
    Some(Bytes::from(out))
}

/// A reply this dialect adds, in the same envelope, stamped now.
pub(crate) fn reply(kind: &str, payload: Value) -> String {
    json!({"type": kind, "timestamp": iso(crate::hub::now_ms()), "payload": payload}).to_string()
}

/// Error codes of the `error` envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorCode {
    /// Not JSON, not an object, or a field of the wrong shape.
    BadMessage,
    /// An `action` this server does not know.
    UnknownAction,
    /// A channel that is not `worker:<id>`, `board:zoo` or `board:readonly`.
    InvalidChannel,
    /// A channel this session may not read.
    Forbidden,
    /// More channels than the session's room limit.
    SubscriptionLimit,
    /// Too many messages; the socket closes 1008 if it goes on.
    RateLimited,
    /// A message over the size limit; the socket closes 1009.
    MessageTooLarge,
    /// No or a bad token (HTTP 401 on /api/events).
    Unauthenticated,
    /// The server could not subscribe; retrying may help.
    Internal,
}

impl ErrorCode {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadMessage => "BAD_MESSAGE",
            ErrorCode::UnknownAction => "UNKNOWN_ACTION",
            ErrorCode::InvalidChannel => "INVALID_CHANNEL",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::SubscriptionLimit => "SUBSCRIPTION_LIMIT",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::MessageTooLarge => "MESSAGE_TOO_LARGE",
            ErrorCode::Unauthenticated => "UNAUTHENTICATED",
            ErrorCode::Internal => "INTERNAL",
        }
    }
}

/// `{"type":"error","timestamp":…,"payload":{"code","message"[,"channel"]}}`.
pub(crate) fn error(code: ErrorCode, message: &str, channel: Option<&str>) -> String {
    let mut payload = json!({"code": code.as_str(), "message": message});
    if let Some(c) = channel {
        payload["channel"] = Value::from(c);
    }
    reply("error", payload)
}

/// Unix milliseconds as ISO-8601 UTC with milliseconds (`…T10:15:00.000Z`).
pub(crate) fn iso(ms: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

/// ISO-8601 date-time (`Z`, `±HH:MM` or no offset, which means UTC; any
/// fraction) as unix milliseconds.
pub(crate) fn parse_iso(text: &str) -> Option<u64> {
    let s = text.trim();
    if !s.is_ascii() {
        return None;
    }
    let (local, offset_s): (&str, i64) = if let Some(rest) = s.strip_suffix(['Z', 'z']) {
        (rest, 0)
    } else if s.len() > 19 && matches!(s.as_bytes()[s.len() - 6], b'+' | b'-') {
        let (rest, off) = s.split_at(s.len() - 6);
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let (h, m) = off[1..].split_once(':')?;
        let (h, m): (i64, i64) = (h.parse().ok()?, m.parse().ok()?);
        if h > 23 || m > 59 {
            return None;
        }
        (rest, sign * (h * 3600 + m * 60))
    } else {
        (s, 0)
    };
    let t = humantime::parse_rfc3339_weak(local).ok()?;
    let ms = t.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_millis() as i64;
    u64::try_from(ms - offset_s * 1000).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_round_trips_and_offsets() {
        assert_eq!(iso(1_764_929_700_000), "2025-12-05T10:15:00.000Z");
        assert_eq!(parse_iso("2025-12-05T10:15:00Z"), Some(1_764_929_700_000));
        assert_eq!(
            parse_iso("2025-12-05T10:15:00.250Z"),
            Some(1_764_929_700_250)
        );
        assert_eq!(
            parse_iso("2025-12-05T11:15:00+01:00"),
            Some(1_764_929_700_000)
        );
        assert_eq!(parse_iso("2025-12-05T10:15:00"), Some(1_764_929_700_000));
        for bad in [
            "",
            "yesterday",
            "2025-12-05",
            "2025-13-05T10:15:00Z",
            "2025-12-05T10:15:00+99:00",
            "ü2025-12-05T10:15:00Z",
        ] {
            assert_eq!(parse_iso(bad), None, "{bad}");
        }
    }

    #[test]
    fn errors_use_the_envelope() {
        let v: Value =
            serde_json::from_str(&error(ErrorCode::Forbidden, "no", Some("worker:w2"))).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["payload"]["code"], "FORBIDDEN");
        assert_eq!(v["payload"]["channel"], "worker:w2");
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
    }
}
