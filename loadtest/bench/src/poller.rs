//! The polling reader: one thread per worker reads every connection, asking
//! the kernel which sockets are readable every `tick` and sleeping between
//! asks, instead of sleeping in `epoll_wait` until data arrives.
//!
//! Why: on loopback the sender's `write(2)` runs the receiver's TCP path in
//! its own context, and when the receiving process sleeps in `epoll_wait`
//! that includes waking it (`sock_def_readable` → `ep_poll_callback` →
//! `try_to_wake_up`, an inter-processor interrupt in a VM): about a third of
//! the floor probe's CPU in a `perf` profile. Real clients sit on other
//! machines and never charge their wake-ups to the server, so a generator
//! whose readers are not asleep on the sockets measures the server more
//! faithfully — and costs the shared cores less, since one wake-up serves
//! a whole batch of ready sockets. A delivery waits at most one tick longer
//! to be read, and that wait is inside the measured latency.

use std::io::{ErrorKind, Read, Write};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::Result;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::worker::{client_frame, parse_frames, stats, Frame, OP_PONG};

/// Hands connections to the polling thread.
pub struct Poller {
    tx: mpsc::Sender<(std::net::TcpStream, Vec<u8>)>,
}

struct Conn {
    stream: TcpStream,
    /// Bytes of a frame not yet complete (empty almost always).
    partial: Vec<u8>,
}

/// Most sockets handled per poll; a full batch polls again without sleeping.
const BATCH: usize = 1024;

impl Poller {
    pub fn start(tick: Duration) -> Result<Self> {
        let poll = Poll::new()?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("poller".into())
            .spawn(move || run(poll, rx, tick))?;
        Ok(Self { tx })
    }

    /// Reads `stream` from now on; `leftover` holds bytes already received
    /// after the subscription's reply.
    pub fn add(&self, stream: std::net::TcpStream, leftover: Vec<u8>) {
        let _ = self.tx.send((stream, leftover));
    }
}

fn run(mut poll: Poll, rx: mpsc::Receiver<(std::net::TcpStream, Vec<u8>)>, tick: Duration) {
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut events = Events::with_capacity(BATCH);
    let mut scratch = vec![0u8; 64 * 1024];
    loop {
        while let Ok((stream, leftover)) = rx.try_recv() {
            let mut conn = Conn {
                stream: TcpStream::from_std(stream),
                partial: Vec::new(),
            };
            let token = Token(conns.len());
            if poll
                .registry()
                .register(&mut conn.stream, token, Interest::READABLE)
                .is_err()
            {
                stats().closed += 1;
                continue;
            }
            let open = consume(&mut conn, &leftover);
            conns.push(open.then_some(conn));
        }
        if let Err(e) = poll.poll(&mut events, Some(Duration::ZERO)) {
            if e.kind() != ErrorKind::Interrupted {
                eprintln!("poller: {e}");
                std::process::exit(1);
            }
            continue;
        }
        let mut ready = 0;
        for ev in events.iter() {
            ready += 1;
            let slot = &mut conns[ev.token().0];
            let Some(conn) = slot.as_mut() else { continue };
            let open = loop {
                match conn.stream.read(&mut scratch) {
                    Ok(0) => break false,
                    Ok(n) if !consume(conn, &scratch[..n]) => break false,
                    // A short read emptied the receive queue; readiness is
                    // edge-triggered and fires again on the next arrival,
                    // so no read is spent learning it would block.
                    Ok(n) if n < scratch.len() => break true,
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break true,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => break false,
                }
            };
            if !open {
                if let Some(mut c) = slot.take() {
                    let _ = poll.registry().deregister(&mut c.stream);
                }
                stats().closed += 1;
            }
        }
        if ready < BATCH {
            std::thread::sleep(tick);
        }
    }
}

/// Handles every complete frame of `data` (after what was partial);
/// false when the connection is over.
fn consume(conn: &mut Conn, data: &[u8]) -> bool {
    let owned;
    let buf = if conn.partial.is_empty() {
        data
    } else {
        conn.partial.extend_from_slice(data);
        owned = std::mem::take(&mut conn.partial);
        &owned[..]
    };
    let stream = &mut conn.stream;
    let mut stats = stats();
    let now = crate::common::now_ns();
    let used = parse_frames(buf, |frame| match frame {
        Frame::Event(payload) => {
            stats.on_event(payload, now);
            true
        }
        Frame::Ping(payload) => {
            // A pong is a few bytes into an idle send buffer: it fits.
            let _ = stream.write_all(&client_frame(OP_PONG, payload));
            true
        }
        Frame::Close => false,
    });
    match used {
        Some(used) => {
            conn.partial.extend_from_slice(&buf[used..]);
            true
        }
        None => false,
    }
}
