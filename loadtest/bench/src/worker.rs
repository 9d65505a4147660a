//! A load-generator worker process: holds `count` client connections on a
//! single-threaded runtime (raw tokio TCP and a minimal WebSocket framing:
//! masked client frames, unmasked server frames), answers pings, and records
//! publish→deliver latency from the `t_ns` the publisher put in each event.
//! Driven over stdin/stdout by the orchestrator, one line per command.

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use memchr::memmem;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, Semaphore};

use crate::common::{
    mint, now_ms, now_ns, room_name, source_of, ConnectReport, WorkerSpec, WorkerStats,
};
use crate::poller::Poller;

pub struct Stats {
    hist: Histogram<u64>,
    /// Per delivery, ms from the publisher's stamp to the id Redis gave the
    /// event: the part of the latency spent before any node saw it.
    to_broker: Histogram<u64>,
    measured: u64,
    all: u64,
    pub closed: u64,
}

/// The worker's figures, shared by its readers (tokio tasks or the poller
/// thread) and the command loop; readers lock it once per read.
pub static STATS: LazyLock<Mutex<Stats>> = LazyLock::new(|| {
    Mutex::new(Stats {
        hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
        to_broker: Histogram::new_with_bounds(1, 60_000, 3).expect("valid bounds"),
        measured: 0,
        all: 0,
        closed: 0,
    })
});

static W1: LazyLock<memmem::Finder<'static>> = LazyLock::new(|| memmem::Finder::new(br#""w":1"#));
static TNS: LazyLock<memmem::Finder<'static>> =
    LazyLock::new(|| memmem::Finder::new(br#""t_ns":"#));
static ID: LazyLock<memmem::Finder<'static>> = LazyLock::new(|| memmem::Finder::new(br#""id":""#));

/// The unsigned integer at the start of `bytes`.
fn leading_number(bytes: &[u8]) -> u64 {
    let mut n = 0u64;
    for &d in bytes.iter().take_while(|d| d.is_ascii_digit()) {
        n = n * 10 + (d - b'0') as u64;
    }
    n
}

impl Stats {
    /// Counts an event frame received at `now` (ns) and records its latency
    /// from the `t_ns` the publisher put in it.
    pub fn on_event(&mut self, payload: &[u8], now: u64) {
        self.all += 1;
        if W1.find(payload).is_none() {
            return;
        }
        self.measured += 1;
        if let Some(p) = TNS.find(payload) {
            let t = leading_number(&payload[p + 7..]);
            let us = now.saturating_sub(t) / 1000;
            self.hist.saturating_record(us.max(1));
            // Frames without a stream id (a peer's) say nothing of the broker.
            if let Some(i) = ID.find(payload) {
                let id_ms = leading_number(&payload[i + 6..]);
                self.to_broker
                    .saturating_record(id_ms.saturating_sub(t / 1_000_000).max(1));
            }
        }
    }
}

pub fn stats() -> std::sync::MutexGuard<'static, Stats> {
    STATS.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn main(spec: WorkerSpec) -> Result<()> {
    crate::common::raise_nofile();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(spec))
}

async fn run(spec: WorkerSpec) -> Result<()> {
    let poller = match spec.poll_us {
        0 => None,
        us => Some(Arc::new(Poller::start(Duration::from_micros(us))?)),
    };
    let spec = Arc::new(spec);
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        match line.trim() {
            "connect" => {
                let report = connect_all(&spec, poller.clone()).await;
                println!("{}", serde_json::to_string(&report)?);
            }
            "stats" => {
                let s = {
                    let s = stats();
                    WorkerStats {
                        measured: s.measured,
                        all: s.all,
                        closed: s.closed,
                        hist: s
                            .hist
                            .iter_recorded()
                            .map(|v| (v.value_iterated_to(), v.count_at_value()))
                            .collect(),
                        to_broker: s
                            .to_broker
                            .iter_recorded()
                            .map(|v| (v.value_iterated_to(), v.count_at_value()))
                            .collect(),
                    }
                };
                println!("{}", serde_json::to_string(&s)?);
            }
            "count" => println!("{}", stats().measured),
            "reset" => {
                {
                    let mut s = stats();
                    s.hist.reset();
                    s.to_broker.reset();
                    s.measured = 0;
                    s.all = 0;
                }
                println!("ok");
            }
            "quit" | "" => break,
            other => println!("{{\"error\":\"unknown command {other}\"}}"),
        }
    }
    std::process::exit(0);
}

async fn connect_all(spec: &Arc<WorkerSpec>, poller: Option<Arc<Poller>>) -> ConnectReport {
    let sem = Arc::new(Semaphore::new(spec.concurrency.max(1)));
    let (tx, mut rx) = mpsc::unbounded_channel();
    for i in spec.first..spec.first + spec.count {
        let (spec, sem, tx, poller) = (spec.clone(), sem.clone(), tx.clone(), poller.clone());
        tokio::spawn(async move {
            let permit = sem.acquire_owned().await.expect("never closed");
            let res = tokio::time::timeout(Duration::from_secs(30), establish(&spec, i)).await;
            drop(permit);
            match res {
                Ok(Ok((stream, buf))) => {
                    let _ = tx.send(Ok(now_ms()));
                    match (poller, stream.into_std()) {
                        (Some(p), Ok(std)) => p.add(std, buf),
                        (Some(_), Err(_)) => stats().closed += 1,
                        (None, Ok(std)) => match TcpStream::from_std(std) {
                            Ok(stream) => read_loop(stream, buf).await,
                            Err(_) => stats().closed += 1,
                        },
                        (None, Err(_)) => stats().closed += 1,
                    }
                }
                Ok(Err(e)) => {
                    let _ = tx.send(Err(format!("conn {i}: {e:#}")));
                }
                Err(_) => {
                    let _ = tx.send(Err(format!("conn {i}: timed out after 30 s")));
                }
            }
        });
    }
    drop(tx);
    let mut report = ConnectReport::default();
    for _ in 0..spec.count {
        match rx.recv().await {
            Some(Ok(t)) => {
                report.ok += 1;
                report.last_subscribed_ms = report.last_subscribed_ms.max(t);
            }
            Some(Err(e)) => {
                report.failed += 1;
                report.first_error.get_or_insert(e);
            }
            None => break,
        }
    }
    report
}

/// One WebSocket frame header: (opcode, header length, payload length).
fn parse_header(b: &[u8]) -> Option<(u8, usize, usize)> {
    if b.len() < 2 {
        return None;
    }
    let opcode = b[0] & 0x0f;
    let masked = b[1] & 0x80 != 0;
    let (len, mut hl) = match b[1] & 0x7f {
        126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
        127 if b.len() >= 10 => (
            u64::from_be_bytes(b[2..10].try_into().expect("8 bytes")) as usize,
            10,
        ),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    if masked {
        hl += 4;
    }
    Some((opcode, hl, len))
}

/// A server frame a reader acts on.
pub enum Frame<'a> {
    /// A text or binary message.
    Event(&'a [u8]),
    /// A ping, with its payload for the pong.
    Ping(&'a [u8]),
    Close,
}

pub const OP_PONG: u8 = 0xA;

/// Hands each complete frame at the start of `buf` to `on_frame` (which
/// returns false to stop: the connection is over); returns how many bytes
/// were whole frames, or None when `on_frame` stopped.
pub fn parse_frames(buf: &[u8], mut on_frame: impl FnMut(Frame<'_>) -> bool) -> Option<usize> {
    let mut pos = 0;
    while let Some((op, hl, len)) = parse_header(&buf[pos..]) {
        if buf.len() - pos < hl + len {
            break;
        }
        let payload = &buf[pos + hl..pos + hl + len];
        let go_on = match op {
            0x1 | 0x2 => on_frame(Frame::Event(payload)),
            0x9 => on_frame(Frame::Ping(payload)),
            0x8 => on_frame(Frame::Close),
            _ => true,
        };
        if !go_on {
            return None;
        }
        pos += hl + len;
    }
    Some(pos)
}

/// A masked client frame (payload < 126 bytes).
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let key = (now_ns() as u32).to_be_bytes();
    let mut f = Vec::with_capacity(6 + payload.len());
    f.push(0x80 | opcode);
    f.push(0x80 | payload.len() as u8);
    f.extend_from_slice(&key);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    f
}

async fn establish(spec: &WorkerSpec, i: usize) -> Result<(TcpStream, Vec<u8>)> {
    let layout = spec.layout;
    let room = layout.room_of(i);
    let target: SocketAddr = spec.targets[layout.node_of(i) % spec.targets.len()].parse()?;
    let sock = TcpSocket::new_v4()?;
    // Closed with a reset when the worker ends: no TIME_WAIT is left behind,
    // so back-to-back runs do not meet the last run's TIME_WAIT sockets
    // (tcp_tw_reuse=2 reuses their ports on loopback, and a few handshakes
    // then wait out SYN retransmits: connect storms of 16-33 s in run 17).
    sock.set_zero_linger()?;
    sock.bind(SocketAddr::new(source_of(i).into(), 0))
        .context("bind source address")?;
    let mut s = sock.connect(target).await.context("connect")?;
    s.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(1024);
    if spec.mode == "floor" {
        s.write_all(&(room as u16).to_be_bytes()).await?;
        return Ok((s, buf));
    }
    let socketio = spec.mode == "socketio";
    let path = if socketio {
        // The peer joins the room named in the query before its connect ack.
        format!(
            "/socket.io/?EIO=4&transport=websocket&room={}",
            room_name(room)
        )
    } else {
        format!("/v1/ws?token={}", mint(spec.secret.as_bytes(), i, room))
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {target}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let end = loop {
        if s.read_buf(&mut buf).await? == 0 {
            bail!("closed during handshake");
        }
        if let Some(p) = memmem::find(&buf, b"\r\n\r\n") {
            break p + 4;
        }
    };
    if !buf.starts_with(b"HTTP/1.1 101") {
        bail!(
            "handshake refused: {}",
            String::from_utf8_lossy(&buf[..end.min(300)])
        );
    }
    buf.drain(..end);
    if socketio {
        return socketio_connect(s, buf).await;
    }
    let sub = format!(
        r#"{{"op":"subscribe","ref":"1","rooms":["{}"]}}"#,
        room_name(room)
    );
    s.write_all(&client_frame(0x1, sub.as_bytes())).await?;
    loop {
        while let Some((op, hl, len)) = parse_header(&buf) {
            if buf.len() < hl + len {
                break;
            }
            let payload = &buf[hl..hl + len];
            if op == 0x1 && memmem::find(payload, br#""op":"subscribed""#).is_some() {
                if memmem::find(payload, br#""denied":[]"#).is_none() {
                    bail!("denied: {}", String::from_utf8_lossy(payload));
                }
                buf.drain(..hl + len);
                return Ok((s, buf));
            }
            if op == 0x8 {
                bail!("closed: {:?}", String::from_utf8_lossy(payload));
            }
            buf.drain(..hl + len);
        }
        if s.read_buf(&mut buf).await? == 0 {
            return Err(anyhow!("closed before subscribed"));
        }
    }
}

/// Engine.IO 4 over WebSocket: the server's open packet (`0{…}`), our
/// namespace connect (`40`), its ack (`40{"sid":…}`); the room was joined
/// from the handshake query before the ack.
async fn socketio_connect(mut s: TcpStream, mut buf: Vec<u8>) -> Result<(TcpStream, Vec<u8>)> {
    let mut opened = false;
    loop {
        while let Some((op, hl, len)) = parse_header(&buf) {
            if buf.len() < hl + len {
                break;
            }
            let payload = &buf[hl..hl + len];
            match (op, payload.first()) {
                (0x1, Some(b'0')) if !opened => {
                    opened = true;
                    s.write_all(&client_frame(0x1, b"40")).await?;
                }
                (0x1, _) if opened && payload.starts_with(b"40") => {
                    buf.drain(..hl + len);
                    return Ok((s, buf));
                }
                (0x1, _) if payload.starts_with(b"44") => {
                    bail!("connect refused: {}", String::from_utf8_lossy(payload));
                }
                (0x8, _) => bail!("closed: {:?}", String::from_utf8_lossy(payload)),
                _ => {}
            }
            buf.drain(..hl + len);
        }
        if s.read_buf(&mut buf).await? == 0 {
            return Err(anyhow!("closed before the connect ack"));
        }
    }
}

async fn read_loop(mut s: TcpStream, mut buf: Vec<u8>) {
    loop {
        let mut pongs = Vec::new();
        let used = {
            let mut st = stats();
            let now = now_ns();
            parse_frames(&buf, |frame| match frame {
                Frame::Event(payload) => {
                    st.on_event(payload, now);
                    true
                }
                Frame::Ping(payload) => {
                    pongs.extend(client_frame(OP_PONG, payload));
                    true
                }
                Frame::Close => false,
            })
        };
        let Some(used) = used else {
            stats().closed += 1;
            return;
        };
        if !pongs.is_empty() && s.write_all(&pongs).await.is_err() {
            stats().closed += 1;
            return;
        }
        buf.drain(..used);
        if buf.capacity() - buf.len() < 512 {
            buf.reserve(2048);
        }
        match s.read_buf(&mut buf).await {
            Ok(n) if n > 0 => {}
            _ => {
                stats().closed += 1;
                return;
            }
        }
    }
}
