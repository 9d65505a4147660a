//! The little of RESP2 a subscriber connection needs: encode a command,
//! read one reply. A connection in subscribe mode only ever sees arrays
//! (`message`, `smessage`, `(s)subscribe`, `(s)unsubscribe`, `pong`) and
//! error lines, so this is all it takes to drive one by hand.

use std::future::Future;
use std::io;
use std::pin::Pin;

use bytes::Bytes;
use tokio::io::{AsyncBufRead, AsyncBufReadExt as _, AsyncReadExt as _};

/// Largest bulk string accepted (Redis' own proto-max-bulk-len default).
const MAX_BULK: usize = 512 * 1024 * 1024;
/// Most elements accepted in one array.
const MAX_ARRAY: usize = 1 << 20;

/// One RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Frame {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Option<Bytes>),
    Array(Option<Vec<Frame>>),
}

impl Frame {
    /// The bytes of a bulk or simple string.
    pub(crate) fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Frame::Bulk(Some(b)) => Some(b),
            Frame::Simple(s) => Some(s.as_bytes()),
            _ => None,
        }
    }
}

/// Encodes a command as a RESP array of bulk strings.
pub(crate) fn encode<A: AsRef<[u8]>>(args: &[A]) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(16 + args.iter().map(|a| a.as_ref().len() + 16).sum::<usize>());
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        let a = a.as_ref();
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn bad(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("bad RESP reply: {what}"),
    )
}

async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let n = r.read_until(b'\n', &mut line).await?;
    if n == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    if !line.ends_with(b"\r\n") {
        return Err(bad("line without CRLF"));
    }
    line.truncate(line.len() - 2);
    Ok(line)
}

fn parse_int(s: &[u8]) -> io::Result<i64> {
    std::str::from_utf8(s)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("integer"))
}

/// Whether `buf` starts with a whole reply, so [`read_frame`] on a reader
/// whose buffer holds `buf` returns without waiting for the socket.
pub(crate) fn holds_frame(buf: &[u8]) -> bool {
    frame_end(buf, 0).is_some()
}

/// Where the reply starting at `at` ends, if `buf` holds all of it.
fn frame_end(buf: &[u8], at: usize) -> Option<usize> {
    let rest = buf.get(at..)?;
    let line = rest.windows(2).position(|w| w == b"\r\n")?;
    let after = at + line + 2;
    let len = || -> Option<i64> { std::str::from_utf8(&rest[1..line]).ok()?.parse().ok() };
    match *rest.first()? {
        b'$' => match usize::try_from(len()?) {
            Err(_) => Some(after), // a null bulk
            Ok(n) => {
                let end = after.checked_add(n)?.checked_add(2)?;
                (end <= buf.len()).then_some(end)
            }
        },
        b'*' => {
            let mut end = after;
            for _ in 0..len()?.max(0) {
                end = frame_end(buf, end)?;
            }
            Some(end)
        }
        _ => Some(after),
    }
}

/// Reads one reply.
pub(crate) fn read_frame<'a, R>(
    r: &'a mut R,
) -> Pin<Box<dyn Future<Output = io::Result<Frame>> + Send + 'a>>
where
    R: AsyncBufRead + Unpin + Send,
{
    Box::pin(async move {
        let line = read_line(r).await?;
        let (&kind, rest) = line.split_first().ok_or_else(|| bad("empty line"))?;
        match kind {
            b'+' => Ok(Frame::Simple(String::from_utf8_lossy(rest).into_owned())),
            b'-' => Ok(Frame::Error(String::from_utf8_lossy(rest).into_owned())),
            b':' => Ok(Frame::Integer(parse_int(rest)?)),
            b'$' => {
                let len = parse_int(rest)?;
                if len < 0 {
                    return Ok(Frame::Bulk(None));
                }
                let len = len as usize;
                if len > MAX_BULK {
                    return Err(bad("bulk too long"));
                }
                let mut buf = vec![0u8; len + 2];
                r.read_exact(&mut buf).await?;
                if !buf.ends_with(b"\r\n") {
                    return Err(bad("bulk without CRLF"));
                }
                buf.truncate(len);
                Ok(Frame::Bulk(Some(Bytes::from(buf))))
            }
            b'*' => {
                let len = parse_int(rest)?;
                if len < 0 {
                    return Ok(Frame::Array(None));
                }
                let len = len as usize;
                if len > MAX_ARRAY {
                    return Err(bad("array too long"));
                }
                let mut items = Vec::with_capacity(len);
                for _ in 0..len {
                    items.push(read_frame(r).await?);
                }
                Ok(Frame::Array(Some(items)))
            }
            _ => Err(bad("unknown type byte")),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_frame_only_when_the_whole_reply_is_buffered() {
        let message = b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nhello\r\n";
        assert!(holds_frame(message));
        for cut in 0..message.len() {
            assert!(!holds_frame(&message[..cut]), "cut at {cut}");
        }
        let mut two = message.to_vec();
        two.extend_from_slice(b"*3\r\n$7\r\nmessage");
        assert!(
            holds_frame(&two),
            "a whole reply followed by part of the next"
        );
        assert!(holds_frame(b"+PONG\r\n"));
        assert!(holds_frame(b"$-1\r\n"));
        assert!(holds_frame(b"*-1\r\n"));
        assert!(!holds_frame(b"$99999999999999999999999\r\n"), "no overflow");
    }

    #[tokio::test]
    async fn reads_pubsub_replies() {
        let wire: &[u8] = b"*3\r\n$8\r\nsmessage\r\n$2\r\nch\r\n$5\r\na\nb\r\n\r\n-MOVED 1 127.0.0.1:7000\r\n*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n";
        let mut r = tokio::io::BufReader::new(wire);
        let msg = read_frame(&mut r).await.unwrap();
        assert_eq!(
            msg,
            Frame::Array(Some(vec![
                Frame::Bulk(Some(Bytes::from_static(b"smessage"))),
                Frame::Bulk(Some(Bytes::from_static(b"ch"))),
                Frame::Bulk(Some(Bytes::from_static(b"a\nb\r\n"))),
            ]))
        );
        assert_eq!(
            read_frame(&mut r).await.unwrap(),
            Frame::Error("MOVED 1 127.0.0.1:7000".into())
        );
        assert!(
            matches!(read_frame(&mut r).await.unwrap(), Frame::Array(Some(v)) if v[2] == Frame::Integer(1))
        );
        assert!(read_frame(&mut r).await.is_err(), "eof");
    }

    #[test]
    fn encodes_commands() {
        assert_eq!(
            encode(&["SSUBSCRIBE", "a"]),
            b"*2\r\n$10\r\nSSUBSCRIBE\r\n$1\r\na\r\n".to_vec()
        );
    }
}
