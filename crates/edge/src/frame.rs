//! Server-to-client WebSocket frames, built whole (header + payload) once
//! and shared as `Bytes` by every recipient: server frames are unmasked, so
//! the bytes on the wire are the same for everyone.

use bytes::{BufMut, Bytes, BytesMut};

pub(crate) const OP_TEXT: u8 = 0x1;
pub(crate) const OP_BINARY: u8 = 0x2;
pub(crate) const OP_CLOSE: u8 = 0x8;
pub(crate) const OP_PING: u8 = 0x9;
pub(crate) const OP_PONG: u8 = 0xA;

/// A complete, final (FIN) frame with the given opcode.
pub(crate) fn ws_frame(opcode: u8, payload: &[u8]) -> Bytes {
    let len = payload.len();
    let mut out = BytesMut::with_capacity(len + 10);
    out.put_u8(0x80 | opcode);
    if len < 126 {
        out.put_u8(len as u8);
    } else if len <= u16::MAX as usize {
        out.put_u8(126);
        out.put_u16(len as u16);
    } else {
        out.put_u8(127);
        out.put_u64(len as u64);
    }
    out.extend_from_slice(payload);
    out.freeze()
}

/// A close frame; the reason is cut to the 123 bytes a close frame allows,
/// on a character boundary.
pub(crate) fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    ws_frame(OP_CLOSE, &payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_lengths() {
        assert_eq!(&ws_frame(OP_TEXT, b"hi")[..], b"\x81\x02hi");
        let mid = ws_frame(OP_BINARY, &[0; 300]);
        assert_eq!(&mid[..4], &[0x82, 126, 1, 44]);
        assert_eq!(mid.len(), 304);
        let big = ws_frame(OP_TEXT, &vec![0; 70_000]);
        assert_eq!(big[1], 127);
        assert_eq!(big.len(), 70_010);
    }

    #[test]
    fn close_reason_is_capped_on_a_char_boundary() {
        let f = close_frame(1008, &"é".repeat(100));
        assert!(f.len() <= 2 + 2 + 123);
        assert!(std::str::from_utf8(&f[4..]).is_ok());
        assert_eq!(&f[2..4], &1008u16.to_be_bytes());
    }
}
