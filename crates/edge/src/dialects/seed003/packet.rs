//! Engine.IO v4 and Socket.IO v5 (socket.io 4.x) packets: parsed once at
//! the edge into enums, and encoded as the text of an Engine.IO message.
//!
//! Engine.IO: one digit (`0` open, `1` close, `2` ping, `3` pong,
//! `4` message, `5` upgrade, `6` noop) then the data. Polling payloads join
//! packets with the record separator `\x1e`.
//!
//! Socket.IO (inside an Engine.IO message): one digit (`0` CONNECT,
//! `1` DISCONNECT, `2` EVENT, `3` ACK, `4` CONNECT_ERROR, `5`/`6` binary
//! EVENT/ACK), `<n>-` attachments for binary kinds, `/nsp,` unless the
//! namespace is `/`, an optional ack id, then JSON.

use bytes::Bytes;

use crate::frame::{ws_frame, OP_TEXT};

/// The v4 polling record separator.
pub(crate) const SEPARATOR: u8 = 0x1e;

/// One Engine.IO packet read from a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EnginePacket<'a> {
    Close,
    Ping(&'a str),
    Pong(&'a str),
    Message(&'a str),
    Upgrade,
    Noop,
}

/// Input that is not a packet of the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct PacketError(pub(crate) &'static str);

pub(crate) fn parse_engine(text: &str) -> Result<EnginePacket<'_>, PacketError> {
    let mut chars = text.char_indices();
    let Some((_, kind)) = chars.next() else {
        return Err(PacketError("empty Engine.IO packet"));
    };
    let data = &text[kind.len_utf8()..];
    Ok(match kind {
        '1' => EnginePacket::Close,
        '2' => EnginePacket::Ping(data),
        '3' => EnginePacket::Pong(data),
        '4' => EnginePacket::Message(data),
        '5' => EnginePacket::Upgrade,
        '6' => EnginePacket::Noop,
        '0' => return Err(PacketError("clients do not send open packets")),
        _ => return Err(PacketError("unknown Engine.IO packet type")),
    })
}

/// Socket.IO packet types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Connect,
    Disconnect,
    Event,
    Ack,
    ConnectError,
    BinaryEvent,
    BinaryAck,
}

impl Kind {
    fn from_digit(c: u8) -> Option<Kind> {
        Some(match c {
            b'0' => Kind::Connect,
            b'1' => Kind::Disconnect,
            b'2' => Kind::Event,
            b'3' => Kind::Ack,
            b'4' => Kind::ConnectError,
            b'5' => Kind::BinaryEvent,
            b'6' => Kind::BinaryAck,
            _ => return None,
        })
    }

    fn digit(self) -> char {
        match self {
            Kind::Connect => '0',
            Kind::Disconnect => '1',
            Kind::Event => '2',
            Kind::Ack => '3',
            Kind::ConnectError => '4',
            Kind::BinaryEvent => '5',
            Kind::BinaryAck => '6',
        }
    }
}

/// One Socket.IO packet read from a client; `data` is raw JSON text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SocketPacket<'a> {
    pub(crate) kind: Kind,
    pub(crate) nsp: &'a str,
    pub(crate) ack: Option<u64>,
    pub(crate) data: Option<&'a str>,
}

pub(crate) fn parse_socket(text: &str) -> Result<SocketPacket<'_>, PacketError> {
    let bytes = text.as_bytes();
    let kind = bytes
        .first()
        .and_then(|c| Kind::from_digit(*c))
        .ok_or(PacketError("unknown Socket.IO packet type"))?;
    let mut i = 1;
    if matches!(kind, Kind::BinaryEvent | Kind::BinaryAck) {
        let dash = text[i..]
            .find('-')
            .ok_or(PacketError("binary packet without an attachment count"))?;
        i += dash + 1;
    }
    let mut nsp = "/";
    if bytes.get(i) == Some(&b'/') {
        let end = text[i..].find(',').map_or(text.len(), |p| i + p);
        nsp = &text[i..end];
        i = (end + 1).min(text.len());
    }
    let digits = bytes[i..].iter().take_while(|c| c.is_ascii_digit()).count();
    let mut ack = None;
    if digits > 0 {
        ack = Some(
            text[i..i + digits]
                .parse()
                .map_err(|_| PacketError("ack id out of range"))?,
        );
        i += digits;
    }
    let rest = &text[i..];
    Ok(SocketPacket {
        kind,
        nsp,
        ack,
        data: (!rest.is_empty()).then_some(rest),
    })
}

/// The text of an Engine.IO message carrying a Socket.IO packet:
/// `4` + type + `nsp,` + ack id + JSON.
pub(crate) fn socket_text(kind: Kind, nsp: &str, ack: Option<u64>, data: Option<&str>) -> String {
    let mut s = String::with_capacity(8 + nsp.len() + data.map_or(0, str::len));
    s.push('4');
    s.push(kind.digit());
    if nsp != "/" {
        s.push_str(nsp);
        s.push(',');
    }
    if let Some(id) = ack {
        s.push_str(&id.to_string());
    }
    if let Some(d) = data {
        s.push_str(d);
    }
    s
}

/// An EVENT packet `42<nsp>,["<name>",<data>]`; `data` is raw JSON text.
pub(crate) fn event_text(nsp: &str, name: &str, data: &str) -> String {
    let name = serde_json::to_string(name).expect("a string always serialises");
    socket_text(Kind::Event, nsp, None, Some(&format!("[{name},{data}]")))
}

/// A packet as queued: every packet is kept as a whole WebSocket text frame
/// (built once, written as is on the websocket transport); the polling
/// transport takes the payload back out with [`frame_payload`].
pub(crate) fn frame(text: &str) -> Bytes {
    ws_frame(OP_TEXT, text.as_bytes())
}

/// The payload of an unmasked frame built by [`frame`] (no copy).
pub(crate) fn frame_payload(frame: &Bytes) -> Bytes {
    let header = match frame.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        Some(_) => 2,
        None => return Bytes::new(),
    };
    frame.slice(header.min(frame.len())..)
}

/// A polling response body: the payloads joined with `\x1e`.
pub(crate) fn polling_payload<'a>(frames: impl IntoIterator<Item = &'a Bytes>) -> Bytes {
    let mut out = Vec::new();
    for f in frames {
        if !out.is_empty() {
            out.push(SEPARATOR);
        }
        out.extend_from_slice(&frame_payload(f));
    }
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_packets() {
        assert_eq!(parse_engine("2probe"), Ok(EnginePacket::Ping("probe")));
        assert_eq!(parse_engine("3"), Ok(EnginePacket::Pong("")));
        assert_eq!(
            parse_engine("40/ws/app,{}"),
            Ok(EnginePacket::Message("0/ws/app,{}"))
        );
        assert_eq!(parse_engine("5"), Ok(EnginePacket::Upgrade));
        assert!(parse_engine("").is_err());
        assert!(parse_engine("9").is_err());
        assert!(parse_engine("é").is_err());
    }

    #[test]
    fn socket_packets() {
        let p = parse_socket("2/ws/app,12[\"conversations:join\",{\"conversationId\":\"c1\"}]")
            .unwrap();
        assert_eq!(p.kind, Kind::Event);
        assert_eq!(p.nsp, "/ws/app");
        assert_eq!(p.ack, Some(12));
        assert_eq!(
            p.data,
            Some("[\"conversations:join\",{\"conversationId\":\"c1\"}]")
        );
        let p = parse_socket("0/ws/app,{\"token\":\"t\"}").unwrap();
        assert_eq!((p.kind, p.nsp, p.ack), (Kind::Connect, "/ws/app", None));
        let p = parse_socket("0").unwrap();
        assert_eq!((p.nsp, p.data), ("/", None));
        let p = parse_socket("1/ws/app,").unwrap();
        assert_eq!((p.kind, p.nsp, p.data), (Kind::Disconnect, "/ws/app", None));
        let p = parse_socket("51-/ws/app,[\"x\",{\"_placeholder\":true,\"num\":0}]").unwrap();
        assert_eq!((p.kind, p.nsp), (Kind::BinaryEvent, "/ws/app"));
        assert!(parse_socket("7").is_err());
        assert!(parse_socket("").is_err());
        assert!(parse_socket("5/x").is_err());
        assert!(parse_socket("2/a,99999999999999999999999[]").is_err());
    }

    #[test]
    fn encoding_and_polling_framing() {
        assert_eq!(
            event_text("/ws/app", "messages:new", "{\"a\":1}"),
            "42/ws/app,[\"messages:new\",{\"a\":1}]"
        );
        assert_eq!(
            socket_text(Kind::Ack, "/ws/app", Some(3), Some("[{\"success\":true}]")),
            "43/ws/app,3[{\"success\":true}]"
        );
        assert_eq!(socket_text(Kind::Disconnect, "/", None, None), "41");
        let long = "x".repeat(300);
        let frames = [frame("2"), frame(&long), frame("6")];
        let body = polling_payload(frames.iter());
        assert_eq!(body, Bytes::from(format!("2\x1e{long}\x1e6")));
        assert_eq!(frame_payload(&frame(&"y".repeat(70_000))).len(), 70_000);
    }
}
