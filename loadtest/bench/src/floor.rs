//! The floor probe: the least a fan-out process can do. It accepts the same
//! number of sockets (each says its room in 2 bytes), then for every event
//! builds one frame shaped like the node's native JSON event frame and writes
//! it to every socket of the room with one plain non-blocking `write(2)`:
//! no queue, no task per socket, no broker. Its CPU per million frames is the
//! floor the node's figure is compared with.
//!
//! `--io uring` / `uring-fixed` instead put an event's sends to all its sockets
//! into one `io_uring` submission (with `uring-fixed`, on registered files, so
//! the kernel skips the per-send descriptor lookup): what a node could save by
//! batching its writes that way, measured before the server takes on the
//! `unsafe` it would need.

use std::cell::RefCell;
use std::io::Write;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::Result;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::TcpListener;

use crate::common::{now_ms, now_ns, room_name, Rng};

#[derive(Serialize)]
struct RunReport {
    published: u64,
    expected: u64,
    written: u64,
    short: u64,
}

/// How the floor probe writes an event's frame to the sockets of its room.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FloorIo {
    /// One non-blocking `write(2)` per socket.
    Write,
    /// One `io_uring` submission per event (up to 1,024 sends each).
    Uring,
    /// As `uring`, on registered (fixed) files.
    UringFixed,
}

impl FloorIo {
    pub fn describe(self) -> &'static str {
        match self {
            FloorIo::Write => "one write(2) per frame per socket",
            FloorIo::Uring => "one io_uring submission per event",
            FloorIo::UringFixed => "one io_uring submission per event, fixed files",
        }
    }
}

/// Submission queue size: the most sends in one submission.
const RING_ENTRIES: u32 = 1024;
/// Registered-file slots: above the process's file limit, so every socket fits.
const FIXED_SLOTS: u32 = 20_000;

/// An event's sends in `io_uring` submissions.
struct Uring {
    ring: io_uring::IoUring,
    fixed: bool,
    registered: u32,
}

impl Uring {
    fn new(fixed: bool) -> Result<Self> {
        let ring = io_uring::IoUring::new(RING_ENTRIES)?;
        if fixed {
            ring.submitter().register_files_sparse(FIXED_SLOTS)?;
        }
        Ok(Self {
            ring,
            fixed,
            registered: 0,
        })
    }

    /// The slot for a socket's descriptor (its fixed-file index, or unused).
    fn register(&mut self, fd: RawFd) -> Result<u32> {
        let slot = self.registered;
        if self.fixed {
            self.ring.submitter().register_files_update(slot, &[fd])?;
        }
        self.registered += 1;
        Ok(slot)
    }

    /// Sends `frame` to every target; returns (complete sends, short or failed).
    fn send_all(&mut self, targets: &[(RawFd, u32)], frame: &[u8]) -> Result<(u64, u64)> {
        let (mut written, mut short) = (0, 0);
        for chunk in targets.chunks(RING_ENTRIES as usize) {
            {
                let mut sq = self.ring.submission();
                for &(fd, slot) in chunk {
                    let op = if self.fixed {
                        io_uring::opcode::Send::new(
                            io_uring::types::Fixed(slot),
                            frame.as_ptr(),
                            frame.len() as u32,
                        )
                    } else {
                        io_uring::opcode::Send::new(
                            io_uring::types::Fd(fd),
                            frame.as_ptr(),
                            frame.len() as u32,
                        )
                    };
                    // MSG_DONTWAIT: a full socket completes at once with
                    // EAGAIN (counted short), as write(2) would, instead of
                    // being parked on a poll.
                    let sqe = op.flags(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL).build();
                    // SAFETY: `frame` and the descriptors outlive the
                    // operation: this call waits for every completion of the
                    // chunk before it returns, and the chunk fits the queue.
                    unsafe { sq.push(&sqe) }
                        .map_err(|_| anyhow::anyhow!("submission queue full"))?;
                }
            }
            self.ring.submit_and_wait(chunk.len())?;
            for cqe in self.ring.completion() {
                if cqe.result() == frame.len() as i32 {
                    written += 1;
                } else {
                    short += 1;
                }
            }
        }
        Ok((written, short))
    }
}

pub fn main(listen: String, rooms: usize, io: FloorIo) -> Result<()> {
    crate::common::raise_nofile();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, run(listen, rooms, io))
}

/// The frame the node would send for this event (same fields and order).
pub fn event_frame(room: &str, seq: u64, w: u8, id_ms: u64) -> Vec<u8> {
    let t = now_ns();
    let payload = format!(
        r#"{{"op":"event","room":"{room}","id":"{id_ms}-0","type":"bench","ts":{},"data":{{"w":{w},"seq":{seq},"t_ns":{t}}}}}"#,
        t / 1_000_000
    );
    let len = payload.len();
    let mut f = Vec::with_capacity(len + 4);
    f.push(0x81);
    if len < 126 {
        f.push(len as u8);
    } else {
        f.push(126);
        f.extend_from_slice(&(len as u16).to_be_bytes());
    }
    f.extend_from_slice(payload.as_bytes());
    f
}

/// The sockets of one room, and for the io_uring variants their descriptors
/// and slots.
#[derive(Default)]
struct RoomSockets {
    streams: Vec<TcpStream>,
    targets: Vec<(RawFd, u32)>,
}

async fn run(listen: String, rooms: usize, io: FloorIo) -> Result<()> {
    let sockets: Rc<RefCell<Vec<RoomSockets>>> = Rc::new(RefCell::new(
        (0..rooms).map(|_| RoomSockets::default()).collect(),
    ));
    let uring = match io {
        FloorIo::Write => None,
        FloorIo::Uring => Some(Rc::new(RefCell::new(Uring::new(false)?))),
        FloorIo::UringFixed => Some(Rc::new(RefCell::new(Uring::new(true)?))),
    };
    let listener = TcpListener::bind(&listen).await?;
    println!("listening");
    {
        let sockets = sockets.clone();
        let uring = uring.clone();
        tokio::task::spawn_local(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    continue;
                };
                let sockets = sockets.clone();
                let uring = uring.clone();
                tokio::task::spawn_local(async move {
                    let mut id = [0u8; 2];
                    if s.read_exact(&mut id).await.is_err() {
                        return;
                    }
                    let _ = s.set_nodelay(true);
                    if let Ok(std) = s.into_std() {
                        let r = u16::from_be_bytes(id) as usize;
                        if let Some(room) = sockets.borrow_mut().get_mut(r) {
                            let fd = std.as_raw_fd();
                            let slot = match &uring {
                                None => 0,
                                Some(u) => match u.borrow_mut().register(fd) {
                                    Ok(slot) => slot,
                                    Err(e) => {
                                        eprintln!("floor: registering a socket: {e}");
                                        return;
                                    }
                                },
                            };
                            room.targets.push((fd, slot));
                            room.streams.push(std);
                        }
                    }
                });
            }
        });
    }
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut rng = Rng::new(0x5eed_f100);
    let mut seq = 0u64;
    while let Some(line) = lines.next_line().await? {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["count"] => {
                let n: usize = sockets.borrow().iter().map(|r| r.streams.len()).sum();
                println!("{n}");
            }
            ["run", rate, w, secs] => {
                let rate: f64 = rate.parse()?;
                let w: u8 = w.parse()?;
                let secs: f64 = secs.parse()?;
                let mut rep = RunReport {
                    published: 0,
                    expected: 0,
                    written: 0,
                    short: 0,
                };
                let start = Instant::now();
                let mut tick = tokio::time::interval(Duration::from_millis(1));
                let total = (rate * secs) as u64;
                while rep.published < total {
                    tick.tick().await;
                    let due = ((start.elapsed().as_secs_f64() * rate) as u64).min(total);
                    while rep.published < due {
                        let r = rng.below(rooms);
                        seq += 1;
                        let frame = event_frame(&room_name(r), seq, w, now_ms());
                        let socks = sockets.borrow();
                        let room = &socks[r];
                        rep.expected += room.streams.len() as u64;
                        match &uring {
                            None => {
                                for mut s in room.streams.iter() {
                                    match s.write(&frame) {
                                        Ok(n) if n == frame.len() => rep.written += 1,
                                        _ => rep.short += 1,
                                    }
                                }
                            }
                            Some(u) => {
                                let (w, sh) = u.borrow_mut().send_all(&room.targets, &frame)?;
                                rep.written += w;
                                rep.short += sh;
                            }
                        }
                        rep.published += 1;
                    }
                }
                println!("{}", serde_json::to_string(&rep)?);
            }
            ["quit"] | [] => break,
            _ => println!("{{\"error\":\"unknown command\"}}"),
        }
    }
    std::process::exit(0);
}
