//! Incremental parser of client-to-server WebSocket frames (RFC 6455).
//!
//! It keeps no buffer while a connection is idle: bytes are parsed straight
//! from the transport's scratch buffer, and only an incomplete frame (or a
//! fragmented message) is copied into per-connection storage, freed again as
//! soon as it completes. That is what keeps an idle connection small.

use bytes::Bytes;

/// One complete inbound item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Inbound {
    /// A text (`binary == false`) or binary message, reassembled.
    Message {
        binary: bool,
        payload: Bytes,
    },
    Ping(Bytes),
    Pong,
    /// The peer's close frame: its code, if it sent one.
    Close(Option<u16>),
}

/// Why the stream cannot go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadError {
    /// A frame or message over the size limit (close 1009).
    TooLarge,
    /// A frame that breaks RFC 6455 (close 1002), e.g. unmasked, reserved
    /// bits, fragmented control frame, continuation without a start.
    Protocol,
    /// Text that is not UTF-8 (close 1007).
    InvalidUtf8,
}

const MAX_HEADER: usize = 14;

/// Parser state of one connection.
#[derive(Debug, Default)]
pub(crate) struct FrameReader {
    /// Bytes of a frame not complete yet. Empty (unallocated) when idle.
    partial: Vec<u8>,
    /// A fragmented message being assembled: (binary, bytes so far).
    message: Option<(bool, Vec<u8>)>,
}

struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    len: usize,
    header_len: usize,
}

fn parse_header(buf: &[u8], max: usize) -> Result<Option<Header>, ReadError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let fin = buf[0] & 0x80 != 0;
    if buf[0] & 0x70 != 0 {
        return Err(ReadError::Protocol);
    }
    let opcode = buf[0] & 0x0f;
    if buf[1] & 0x80 == 0 {
        // Client frames must be masked.
        return Err(ReadError::Protocol);
    }
    let (len, at) = match buf[1] & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (n as u64, 2),
    };
    let control = opcode & 0x8 != 0;
    if control && (!fin || len > 125) {
        return Err(ReadError::Protocol);
    }
    if len > max as u64 {
        return Err(ReadError::TooLarge);
    }
    if buf.len() < at + 4 {
        return Ok(None);
    }
    let mut mask = [0u8; 4];
    mask.copy_from_slice(&buf[at..at + 4]);
    Ok(Some(Header {
        fin,
        opcode,
        mask,
        len: len as usize,
        header_len: at + 4,
    }))
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

impl FrameReader {
    /// True when no partial frame or message is held.
    #[cfg(test)]
    pub(crate) fn is_idle(&self) -> bool {
        self.partial.is_empty() && self.message.is_none()
    }

    /// Parses every complete frame in `data` (after what was held), handing
    /// each complete item to `out`. Stops at the first error.
    pub(crate) fn feed(
        &mut self,
        data: &[u8],
        max: usize,
        out: &mut impl FnMut(Inbound),
    ) -> Result<(), ReadError> {
        if self.partial.is_empty() {
            let used = self.parse_from(data, max, out)?;
            if used < data.len() {
                self.partial.extend_from_slice(&data[used..]);
            }
        } else {
            self.partial.extend_from_slice(data);
            let held = std::mem::take(&mut self.partial);
            let used = self.parse_from(&held, max, out)?;
            if used < held.len() {
                self.partial = held[used..].to_vec();
            }
        }
        if self.partial.capacity() > 0 && self.partial.is_empty() {
            self.partial = Vec::new();
        }
        Ok(())
    }

    /// Parses complete frames from `buf`; returns how many bytes were used.
    fn parse_from(
        &mut self,
        buf: &[u8],
        max: usize,
        out: &mut impl FnMut(Inbound),
    ) -> Result<usize, ReadError> {
        let mut at = 0;
        loop {
            let rest = &buf[at..];
            let Some(h) = parse_header(rest, max)? else {
                return Ok(at);
            };
            if rest.len() < h.header_len + h.len {
                // Reserve once for the whole frame, so it is not regrown.
                if self.partial.capacity() == 0 {
                    self.partial
                        .reserve_exact((h.header_len + h.len).min(max + MAX_HEADER));
                }
                return Ok(at);
            }
            let mut payload = rest[h.header_len..h.header_len + h.len].to_vec();
            unmask(&mut payload, h.mask);
            at += h.header_len + h.len;
            self.frame(h.fin, h.opcode, payload, max, out)?;
        }
    }

    fn frame(
        &mut self,
        fin: bool,
        opcode: u8,
        payload: Vec<u8>,
        max: usize,
        out: &mut impl FnMut(Inbound),
    ) -> Result<(), ReadError> {
        match opcode {
            0x0 => {
                let Some((binary, buf)) = self.message.as_mut() else {
                    return Err(ReadError::Protocol);
                };
                if buf.len() + payload.len() > max {
                    return Err(ReadError::TooLarge);
                }
                buf.extend_from_slice(&payload);
                if fin {
                    let binary = *binary;
                    let (_, buf) = self.message.take().expect("checked above");
                    out(finish(binary, buf)?);
                }
            }
            0x1 | 0x2 => {
                if self.message.is_some() {
                    return Err(ReadError::Protocol);
                }
                let binary = opcode == 0x2;
                if fin {
                    out(finish(binary, payload)?);
                } else {
                    self.message = Some((binary, payload));
                }
            }
            0x8 => {
                let code = match payload.len() {
                    0 => None,
                    1 => return Err(ReadError::Protocol),
                    _ => {
                        if std::str::from_utf8(&payload[2..]).is_err() {
                            return Err(ReadError::InvalidUtf8);
                        }
                        Some(u16::from_be_bytes([payload[0], payload[1]]))
                    }
                };
                out(Inbound::Close(code));
            }
            0x9 => out(Inbound::Ping(Bytes::from(payload))),
            0xA => out(Inbound::Pong),
            _ => return Err(ReadError::Protocol),
        }
        Ok(())
    }
}

fn finish(binary: bool, payload: Vec<u8>) -> Result<Inbound, ReadError> {
    if !binary && std::str::from_utf8(&payload).is_err() {
        return Err(ReadError::InvalidUtf8);
    }
    Ok(Inbound::Message {
        binary,
        payload: Bytes::from(payload),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        f
    }

    fn feed_all(r: &mut FrameReader, bytes: &[u8], max: usize) -> Result<Vec<Inbound>, ReadError> {
        let mut got = Vec::new();
        r.feed(bytes, max, &mut |i| got.push(i))?;
        Ok(got)
    }

    fn text(s: &str) -> Inbound {
        Inbound::Message {
            binary: false,
            payload: Bytes::copy_from_slice(s.as_bytes()),
        }
    }

    #[test]
    fn whole_frames_in_one_read() {
        let mut r = FrameReader::default();
        let mut bytes = client_frame(true, 1, b"hello");
        bytes.extend(client_frame(true, 9, b"p"));
        bytes.extend(client_frame(true, 2, &[1, 2]));
        let got = feed_all(&mut r, &bytes, 1024).unwrap();
        assert_eq!(
            got,
            [
                text("hello"),
                Inbound::Ping(Bytes::from_static(b"p")),
                Inbound::Message {
                    binary: true,
                    payload: Bytes::from_static(&[1, 2])
                }
            ]
        );
        assert!(
            r.is_idle() && r.partial.capacity() == 0,
            "nothing held when idle"
        );
    }

    #[test]
    fn frames_split_at_every_byte_and_fragmented_messages() {
        let mut bytes = client_frame(false, 1, b"he");
        bytes.extend(client_frame(true, 9, b""));
        bytes.extend(client_frame(false, 0, b"ll"));
        bytes.extend(client_frame(true, 0, "o é".as_bytes()));
        bytes.extend(client_frame(true, 2, &vec![7u8; 300]));
        let mut r = FrameReader::default();
        let mut got = Vec::new();
        for b in &bytes {
            r.feed(std::slice::from_ref(b), 1024, &mut |i| got.push(i))
                .unwrap();
        }
        assert_eq!(got[0], Inbound::Ping(Bytes::new()));
        assert_eq!(got[1], text("hello é"));
        assert!(
            matches!(&got[2], Inbound::Message { binary: true, payload } if payload.len() == 300)
        );
        assert!(r.is_idle());
    }

    #[test]
    fn limits_and_protocol_errors() {
        let mut r = FrameReader::default();
        assert_eq!(
            feed_all(&mut r, &client_frame(true, 1, &[b'a'; 200]), 100),
            Err(ReadError::TooLarge)
        );
        // The size check happens on the header, before the payload arrives.
        let big = client_frame(true, 2, &vec![0; 70_000]);
        assert_eq!(
            feed_all(&mut FrameReader::default(), &big[..14], 1024),
            Err(ReadError::TooLarge)
        );
        let mut fragments = client_frame(false, 1, &[b'a'; 60]);
        fragments.extend(client_frame(true, 0, &[b'a'; 60]));
        assert_eq!(
            feed_all(&mut FrameReader::default(), &fragments, 100),
            Err(ReadError::TooLarge)
        );
        let mut unmasked = client_frame(true, 1, b"x");
        unmasked[1] &= 0x7f;
        assert_eq!(
            feed_all(&mut FrameReader::default(), &unmasked, 100),
            Err(ReadError::Protocol)
        );
        let mut rsv = client_frame(true, 1, b"x");
        rsv[0] |= 0x40;
        assert_eq!(
            feed_all(&mut FrameReader::default(), &rsv, 100),
            Err(ReadError::Protocol)
        );
        assert_eq!(
            feed_all(
                &mut FrameReader::default(),
                &client_frame(false, 9, b""),
                100
            ),
            Err(ReadError::Protocol)
        );
        assert_eq!(
            feed_all(
                &mut FrameReader::default(),
                &client_frame(true, 0, b"x"),
                100
            ),
            Err(ReadError::Protocol)
        );
        assert_eq!(
            feed_all(
                &mut FrameReader::default(),
                &client_frame(true, 3, b"x"),
                100
            ),
            Err(ReadError::Protocol)
        );
        assert_eq!(
            feed_all(
                &mut FrameReader::default(),
                &client_frame(true, 1, &[0xff, 0xfe]),
                100
            ),
            Err(ReadError::InvalidUtf8)
        );
    }

    #[test]
    fn close_frames_carry_their_code() {
        let mut payload = 1000u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bye");
        assert_eq!(
            feed_all(
                &mut FrameReader::default(),
                &client_frame(true, 8, &payload),
                100
            )
            .unwrap(),
            [Inbound::Close(Some(1000))]
        );
        assert_eq!(
            feed_all(
                &mut FrameReader::default(),
                &client_frame(true, 8, b""),
                100
            )
            .unwrap(),
            [Inbound::Close(None)]
        );
        assert_eq!(
            feed_all(
                &mut FrameReader::default(),
                &client_frame(true, 8, b"x"),
                100
            ),
            Err(ReadError::Protocol)
        );
    }
}
