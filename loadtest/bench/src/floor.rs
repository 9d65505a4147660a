//! The floor probe: the least a fan-out process can do. It accepts the same
//! number of sockets (each says its room in 2 bytes), then for every event
//! builds one frame shaped like the node's native JSON event frame and writes
//! it to every socket of the room with one plain non-blocking `write(2)`:
//! no queue, no task per socket, no broker. Its CPU per million frames is the
//! floor the node's figure is compared with.

use std::cell::RefCell;
use std::io::Write;
use std::net::TcpStream;
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

pub fn main(listen: String, rooms: usize) -> Result<()> {
    crate::common::raise_nofile();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, run(listen, rooms))
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

async fn run(listen: String, rooms: usize) -> Result<()> {
    let sockets: Rc<RefCell<Vec<Vec<TcpStream>>>> =
        Rc::new(RefCell::new((0..rooms).map(|_| Vec::new()).collect()));
    let listener = TcpListener::bind(&listen).await?;
    println!("listening");
    {
        let sockets = sockets.clone();
        tokio::task::spawn_local(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    continue;
                };
                let sockets = sockets.clone();
                tokio::task::spawn_local(async move {
                    let mut id = [0u8; 2];
                    if s.read_exact(&mut id).await.is_err() {
                        return;
                    }
                    let _ = s.set_nodelay(true);
                    if let Ok(std) = s.into_std() {
                        let r = u16::from_be_bytes(id) as usize;
                        if let Some(v) = sockets.borrow_mut().get_mut(r) {
                            v.push(std);
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
                let n: usize = sockets.borrow().iter().map(Vec::len).sum();
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
                        rep.expected += socks[r].len() as u64;
                        for mut s in socks[r].iter() {
                            match s.write(&frame) {
                                Ok(n) if n == frame.len() => rep.written += 1,
                                _ => rep.short += 1,
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
