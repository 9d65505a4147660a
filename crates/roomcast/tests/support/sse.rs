//! A plain HTTP/1.1 client for the native SSE stream (`/v1/sse`).

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::PATIENCE;

/// One SSE event as a client parses it; comments have `comment` set.
#[derive(Debug, Clone, Default)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
    pub comment: Option<String>,
}

/// A plain HTTP/1.1 client reading a chunked `text/event-stream` body.
pub struct SseClient {
    reader: BufReader<TcpStream>,
    buf: String,
    ended: bool,
}

impl SseClient {
    /// Opens the stream; returns the status and, for non-200, the body.
    pub async fn open(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<SseClient, (u16, String)> {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut req =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut reader = BufReader::new(s);
        let mut status_line = String::new();
        tokio::time::timeout(PATIENCE, reader.read_line(&mut status_line))
            .await
            .expect("a response head in time")
            .unwrap();
        let status: u16 = status_line.split(' ').nth(1).unwrap().parse().unwrap();
        let mut length = 0usize;
        let mut chunked = false;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).await.unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
            if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
            if status == 200 && lower.starts_with("content-type:") {
                assert!(lower.contains("text/event-stream"), "{line}");
            }
        }
        if status != 200 {
            let mut body = vec![0; length];
            reader.read_exact(&mut body).await.unwrap();
            return Err((status, String::from_utf8_lossy(&body).into_owned()));
        }
        assert!(chunked, "an SSE body is chunked");
        Ok(SseClient {
            reader,
            buf: String::new(),
            ended: false,
        })
    }

    /// Reads one chunk into the buffer; false at the end of the body.
    async fn read_chunk(&mut self) -> bool {
        let mut size = String::new();
        if self.reader.read_line(&mut size).await.unwrap_or(0) == 0 {
            return false;
        }
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            return false;
        };
        if n == 0 {
            return false;
        }
        let mut data = vec![0; n + 2];
        if self.reader.read_exact(&mut data).await.is_err() {
            return false;
        }
        self.buf.push_str(&String::from_utf8_lossy(&data[..n]));
        true
    }

    /// The next event or comment; `None` when the stream ended.
    pub async fn next_any(&mut self, within: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut ev = SseEvent::default();
                let mut data = Vec::new();
                for line in block.lines() {
                    if let Some(c) = line.strip_prefix(':') {
                        ev.comment = Some(c.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        ev.id = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        ev.event = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push(v);
                    }
                }
                ev.data = data.join("\n");
                return Some(ev);
            }
            if self.ended {
                return None;
            }
            match tokio::time::timeout_at(deadline, self.read_chunk()).await {
                Ok(true) => {}
                Ok(false) => self.ended = true,
                Err(_) => panic!("nothing on the SSE stream within {within:?}"),
            }
        }
    }

    /// The next data event (comments skipped), parsed.
    pub async fn next_json(&mut self) -> Option<(SseEvent, Value)> {
        loop {
            let ev = self.next_any(PATIENCE).await?;
            if ev.comment.is_some() {
                continue;
            }
            let v: Value = serde_json::from_str(&ev.data).expect("JSON data");
            return Some((ev, v));
        }
    }

    /// Waits for the native `subscribed` opening (every room joined).
    pub async fn subscribed(&mut self) -> Value {
        let (ev, v) = self.next_json().await.expect("the opening event");
        assert_eq!(v["op"], "subscribed", "{ev:?}");
        v
    }

    /// Event frames until the first of type `fence`; asserts `id:` = `id`.
    pub async fn events_until(&mut self, fence: &str) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let (ev, v) = self.next_json().await.expect("an event before the end");
            assert_eq!(v["op"], "event", "{v}");
            assert_eq!(ev.id.as_deref(), v["id"].as_str(), "id: is the event id");
            if v["type"] == fence {
                return out;
            }
            out.push(v);
        }
    }
}
