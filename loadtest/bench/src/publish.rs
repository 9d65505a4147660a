//! The event generator: publishes straight into Redis the way a domain
//! service does (docs/redis.md: EVALSHA of the publish script, one per room,
//! `KEYS = [stream, channel, trim mark]`), pipelined on one raw RESP
//! connection, paced every millisecond. Against the Socket.IO peer it
//! publishes what `@socket.io/redis-emitter` would: the Redis adapter's
//! msgpack message on the room's adapter channel.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{now_ns, room_name, Peer, Rng, PREFIX, TENANT};

/// The contract's publish script, from the one copy the server ships.
pub const SCRIPT: &str = include_str!("../../../crates/broker-redis/src/publish.lua");

fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// One RESP reply at the start of `b`: (bytes used, error text if an error).
pub fn parse_reply(b: &[u8]) -> Option<(usize, Option<String>, Vec<u8>)> {
    let nl = memchr::memmem::find(b, b"\r\n")?;
    let line = &b[1..nl];
    match b.first()? {
        b'+' | b':' => Some((nl + 2, None, line.to_vec())),
        b'-' => Some((
            nl + 2,
            Some(String::from_utf8_lossy(line).into_owned()),
            vec![],
        )),
        b'$' => {
            let n: i64 = std::str::from_utf8(line).ok()?.parse().ok()?;
            if n < 0 {
                return Some((nl + 2, None, vec![]));
            }
            let end = nl + 2 + n as usize + 2;
            (b.len() >= end).then(|| (end, None, b[nl + 2..end - 2].to_vec()))
        }
        _ => Some((b.len(), Some("unexpected reply type".into()), vec![])),
    }
}

async fn roundtrip(s: &mut TcpStream, args: &[&[u8]]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    encode(&mut out, args);
    s.write_all(&out).await?;
    let mut buf = Vec::new();
    loop {
        if s.read_buf(&mut buf).await? == 0 {
            bail!("redis closed");
        }
        if let Some((_, err, v)) = parse_reply(&buf) {
            if let Some(e) = err {
                bail!("redis: {e}");
            }
            return Ok(v);
        }
    }
}

/// Every room's stream, channel and trim mark (docs/redis.md).
pub fn room_keys(rooms: usize) -> Vec<[String; 3]> {
    (0..rooms)
        .map(|r| {
            let tag = format!("{PREFIX}{{{TENANT}/{}}}", room_name(r));
            [format!("{tag}:h"), format!("{tag}:c"), format!("{tag}:t")]
        })
        .collect()
}

/// Most entries a room's history keeps: the server's default `max_len`.
pub const HISTORY_CAP: usize = 1000;
/// `HISTORY_CAP` and the broker's slack (`max_len / 8`) as the script's
/// arguments, spelled out so that a publish allocates nothing for them.
const CAP_ARGS: [&[u8]; 2] = [b"1000", b"125"];

/// One EVALSHA of the publish script with the server's default caps
/// (1000 entries, slack 125, one hour).
pub fn encode_script_call(out: &mut Vec<u8>, sha: &str, keys: &[String; 3], envelope: &[u8]) {
    let [h, c, tm] = keys;
    encode(
        out,
        &[
            b"EVALSHA",
            sha.as_bytes(),
            b"3",
            h.as_bytes(),
            c.as_bytes(),
            tm.as_bytes(),
            b"*",
            envelope,
            CAP_ARGS[0],
            CAP_ARGS[1],
            b"3600000",
            b"PUBLISH",
        ],
    );
}

/// Replies counted so far on one connection.
#[derive(Default)]
struct Replies {
    got: u64,
    errors: u64,
    first_error: Option<String>,
}

impl Replies {
    /// Counts every complete reply at the front of `buf` and removes it.
    fn take(&mut self, buf: &mut Vec<u8>) {
        let mut pos = 0;
        while let Some((used, err, _)) = parse_reply(&buf[pos..]) {
            pos += used;
            self.got += 1;
            if let Some(e) = err {
                self.errors += 1;
                self.first_error.get_or_insert(e);
            }
        }
        buf.drain(..pos);
    }
}

/// Writes `cmds` (encoded, `count` of them) and reads their replies;
/// returns how many were errors and the first error's text.
pub async fn pipeline(s: &mut TcpStream, cmds: &[u8], count: u64) -> Result<(u64, Option<String>)> {
    s.write_all(cmds).await?;
    let (mut buf, mut replies) = (Vec::new(), Replies::default());
    while replies.got < count {
        if s.read_buf(&mut buf).await? == 0 {
            bail!("redis closed");
        }
        replies.take(&mut buf);
    }
    Ok((replies.errors, replies.first_error))
}

/// Loads the publish script; returns its sha.
pub async fn load_script(addr: &str) -> Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    let sha = roundtrip(&mut s, &[b"SCRIPT", b"LOAD", SCRIPT.as_bytes()]).await?;
    Ok(String::from_utf8(sha)?)
}

pub async fn ping(addr: &str) -> Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    roundtrip(&mut s, &[b"PING"]).await?;
    Ok(())
}

/// msgpack, just the shapes one adapter message needs.
fn mp_str(out: &mut Vec<u8>, s: &str) {
    let n = s.len();
    if n < 32 {
        out.push(0xa0 | n as u8);
    } else {
        out.push(0xd9);
        out.push(u8::try_from(n).expect("short strings only"));
    }
    out.extend_from_slice(s.as_bytes());
}

fn mp_u64(out: &mut Vec<u8>, v: u64) {
    if v < 128 {
        out.push(v as u8);
    } else {
        out.push(0xcf);
        out.extend_from_slice(&v.to_be_bytes());
    }
}

/// The Redis adapter's broadcast of event `bench` with `{w, seq, t_ns}` to
/// `room`: `[uid, {type: 2, data: [name, body], nsp: "/"}, {rooms, except,
/// flags}]` (@socket.io/redis-adapter 8, `broadcast`).
fn socketio_message(room: &str, w: u8, seq: u64, t_ns: u64) -> Vec<u8> {
    let mut m = Vec::with_capacity(96);
    m.push(0x93);
    mp_str(&mut m, "bench-publisher");
    m.push(0x83);
    mp_str(&mut m, "type");
    m.push(2);
    mp_str(&mut m, "data");
    m.push(0x92);
    mp_str(&mut m, "bench");
    m.push(0x83);
    mp_str(&mut m, "w");
    mp_u64(&mut m, w.into());
    mp_str(&mut m, "seq");
    mp_u64(&mut m, seq);
    mp_str(&mut m, "t_ns");
    mp_u64(&mut m, t_ns);
    mp_str(&mut m, "nsp");
    mp_str(&mut m, "/");
    m.push(0x83);
    mp_str(&mut m, "rooms");
    m.push(0x91);
    mp_str(&mut m, room);
    mp_str(&mut m, "except");
    m.push(0x90);
    mp_str(&mut m, "flags");
    m.push(0x80);
    m
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct PubReport {
    pub published: u64,
    /// Deliveries the run should produce: Σ room size over the publishes.
    pub expected: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed_s: f64,
}

/// Publishes `rate` events/s for `secs`, each into one random room, tagged
/// `"w":w` (1 = measured, 0 = warm-up).
#[allow(clippy::too_many_arguments)] // one call site per scenario step; a struct would only rename them
pub async fn run(
    addr: &str,
    peer: Peer,
    sha: &str,
    sizes: &[u64],
    rate: f64,
    secs: f64,
    w: u8,
    rng: &mut Rng,
    seq: &mut u64,
) -> Result<PubReport> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let (mut rd, mut wr) = s.into_split();
    let total = (rate * secs).round() as u64;
    let reader = tokio::spawn(async move {
        let (mut buf, mut replies) = (Vec::with_capacity(64 * 1024), Replies::default());
        while replies.got < total {
            match rd.read_buf(&mut buf).await {
                Ok(n) if n > 0 => {}
                _ => break,
            }
            replies.take(&mut buf);
        }
        (replies.got, replies.errors, replies.first_error)
    });
    let mut rep = PubReport::default();
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut out = Vec::with_capacity(64 * 1024);
    let names = room_keys(sizes.len());
    while rep.published < total {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * rate) as u64).min(total);
        out.clear();
        while rep.published < due {
            let r = rng.below(sizes.len());
            *seq += 1;
            let t = now_ns();
            if peer == Peer::Socketio {
                let room = room_name(r);
                let channel = format!("socket.io#/#{room}#");
                let msg = socketio_message(&room, w, *seq, t);
                encode(&mut out, &[b"PUBLISH", channel.as_bytes(), &msg]);
                rep.expected += sizes[r];
                rep.published += 1;
                continue;
            }
            let env = format!(
                r#"{{"v":1,"tenant":"{TENANT}","rooms":["{}"],"type":"bench","ts":{},"data":{{"w":{w},"seq":{},"t_ns":{t}}}}}"#,
                room_name(r),
                t / 1_000_000,
                *seq
            );
            encode_script_call(&mut out, sha, &names[r], env.as_bytes());
            rep.expected += sizes[r];
            rep.published += 1;
        }
        if !out.is_empty() {
            wr.write_all(&out).await?;
        }
    }
    rep.elapsed_s = start.elapsed().as_secs_f64();
    match tokio::time::timeout(Duration::from_secs(10), reader).await {
        Ok(Ok((got, errors, first))) => {
            rep.errors = errors + total.saturating_sub(got);
            rep.first_error = first;
        }
        _ => {
            rep.errors = total;
            rep.first_error = Some("no replies from redis within 10 s".into());
        }
    }
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::{CAP_ARGS, HISTORY_CAP};

    #[test]
    fn the_script_arguments_spell_the_cap() {
        let [cap, slack] = CAP_ARGS.map(|a| std::str::from_utf8(a).unwrap().parse::<usize>());
        assert_eq!(
            (cap.unwrap(), slack.unwrap()),
            (HISTORY_CAP, HISTORY_CAP / 8)
        );
    }
}
