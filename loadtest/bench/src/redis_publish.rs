//! The `redis-publish` scenario: what one publish costs Redis, the figure a
//! Redis shard is sized by. Every room's history stream is filled to its
//! cap first, since that is where a running cluster's streams sit (a fresh
//! stream makes the trimming look cheaper than it is). Subscriber
//! connections (`--publish-subscribers`, default 2) stand in for nodes; no
//! nodes, no clients, so Redis's CPU in the window is the publish path
//! alone: the script, the channel messages to the subscribers and the
//! replies to the publisher.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};

use crate::common::{busy_pct, cpu_of, machine_jiffies, Peer, Rng};
use crate::publish::{self, encode_script_call, room_keys, HISTORY_CAP};
use crate::scenarios::{busy_cpu_s, Row};
use crate::Opts;

/// One RESP array at the start of `b` (what a subscribed connection
/// receives): bytes used, and whether it is a channel message.
fn parse_push(b: &[u8]) -> Option<(usize, bool)> {
    let nl = memchr::memmem::find(b, b"\r\n")?;
    let n: usize = std::str::from_utf8(b.strip_prefix(b"*")?.get(..nl - 1)?)
        .ok()?
        .parse()
        .ok()?;
    let (mut at, mut message) = (nl + 2, false);
    for i in 0..n {
        let (used, _, element) = publish::parse_reply(&b[at..])?;
        message |= i == 0 && element == b"message";
        at += used;
    }
    Some((at, message))
}

/// What the subscribers share with the orchestrator: channel messages
/// received, and a wake-up after each read that counted some.
#[derive(Default)]
struct Received {
    messages: AtomicU64,
    more: Notify,
}

/// Subscribes one connection to every room's channel, says so on `ready`,
/// then counts the channel messages it receives until the connection ends.
async fn subscriber(
    addr: &str,
    keys: &[[String; 3]],
    received: Arc<Received>,
    ready: oneshot::Sender<()>,
) -> Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    let mut cmd = format!("*{}\r\n$9\r\nSUBSCRIBE\r\n", keys.len() + 1);
    for [_, channel, _] in keys {
        cmd.push_str(&format!("${}\r\n{channel}\r\n", channel.len()));
    }
    s.write_all(cmd.as_bytes()).await?;
    let (mut buf, mut confirmed) = (Vec::with_capacity(64 * 1024), 0);
    let mut ready = Some(ready);
    loop {
        if s.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
        let (mut pos, mut messages) = (0, 0);
        while let Some((used, message)) = parse_push(&buf[pos..]) {
            pos += used;
            if message {
                messages += 1;
            } else {
                confirmed += 1;
            }
        }
        buf.drain(..pos);
        if messages > 0 {
            received.messages.fetch_add(messages, Ordering::Relaxed);
            received.more.notify_one();
        }
        if confirmed == keys.len() {
            if let Some(r) = ready.take() {
                let _ = r.send(());
            }
        }
    }
}

/// Fills every room's stream to its cap through the script itself.
async fn fill(addr: &str, sha: &str, keys: &[[String; 3]]) -> Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    let envelope = br#"{"v":1,"tenant":"acme","rooms":["team:0"],"type":"fill","data":{}}"#;
    let mut out = Vec::new();
    for k in keys {
        out.clear();
        for _ in 0..HISTORY_CAP {
            encode_script_call(&mut out, sha, k, envelope);
        }
        let (errors, first) = publish::pipeline(&mut s, &out, HISTORY_CAP as u64).await?;
        if errors > 0 {
            bail!("filling the history: {errors} errors, first: {first:?}");
        }
    }
    Ok(())
}

/// Runs one step per `--publish-rates` rate (publishes/s, `--sweep-secs`
/// each) against the Redis at `addr` (process `redis_pid`); one row per step.
pub async fn run(
    addr: &str,
    redis_pid: u32,
    opts: &Opts,
    rng: &mut Rng,
    seq: &mut u64,
) -> Result<Vec<Row>> {
    let (rooms, subscribers, secs) = (opts.rooms, opts.publish_subscribers, opts.sweep_secs);
    let sha = publish::load_script(addr).await?;
    let keys = room_keys(rooms);
    let t = Instant::now();
    fill(addr, &sha, &keys).await?;
    eprintln!(
        "  {rooms} streams filled to {HISTORY_CAP} entries in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let received = Arc::new(Received::default());
    let mut tasks = Vec::new();
    let mut readies = Vec::new();
    for _ in 0..subscribers {
        let (tx, rx) = oneshot::channel();
        let (addr, keys, received) = (addr.to_owned(), keys.clone(), received.clone());
        tasks.push(tokio::spawn(async move {
            subscriber(&addr, &keys, received, tx).await
        }));
        readies.push(rx);
    }
    for r in readies {
        tokio::time::timeout(Duration::from_secs(10), r)
            .await
            .context("subscribers not confirmed within 10 s")?
            .context("a subscriber failed")?;
    }
    let count = || received.messages.load(Ordering::Relaxed);
    let me = std::process::id();
    let mut rows = Vec::new();
    for &rate in &opts.publish_rates {
        let before = count();
        let (cpu0, me0) = (cpu_of(redis_pid), cpu_of(me));
        let (m0, t0) = (machine_jiffies(), Instant::now());
        let sizes = vec![subscribers; rooms];
        let rep = publish::run(addr, Peer::Roomcast, &sha, &sizes, rate, secs, 0, rng, seq)
            .await
            .context("publishing")?;
        // Every reply is in; wait for the subscribers to read the last
        // channel messages, failing fast if they never come.
        let expected = rep.expected;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while count() - before < expected {
            let wait = tokio::time::timeout_at(deadline, received.more.notified());
            if wait.await.is_err() {
                break;
            }
        }
        let (cpu1, me1, m1) = (cpu_of(redis_pid), cpu_of(me), machine_jiffies());
        // Until the last channel message, not the last write: a Redis that
        // cannot keep up queues the publishes in its socket buffer.
        let window_s = t0.elapsed().as_secs_f64();
        let redis_cpu = (cpu1.0 - cpu0.0) + (cpu1.1 - cpu0.1);
        let publisher_cpu = (me1.0 - me0.0) + (me1.1 - me0.1);
        let other = (busy_cpu_s(m0, m1) - redis_cpu - publisher_cpu).max(0.0);
        let published = rep.published as f64;
        let (busy, steal) = busy_pct(m0, m1);
        let us_per_publish = 1e6 * redis_cpu / published.max(1.0);
        let delivered = count() - before;
        rows.push(Row {
            scenario: format!("redis-publish {}k", rate / 1000.0),
            rooms,
            publishes_per_s: published / window_s,
            deliveries_per_s: delivered as f64 / window_s,
            delivered,
            expected,
            redis_cpu_s: redis_cpu,
            publish_errors: rep.errors,
            machine_busy_pct: busy,
            machine_steal_pct: steal,
            gen_cpu_s: publisher_cpu,
            other_cpu_s: other,
            redis_us_per_publish: Some(us_per_publish),
            note: format!(
                "{us_per_publish:.1} µs of Redis CPU per publish (streams at their \
                 {HISTORY_CAP}-entry cap, {subscribers} subscribers): {:.0} publishes/s \
                 per Redis core{}",
                1e6 / us_per_publish.max(1e-9),
                rep.first_error
                    .as_ref()
                    .map(|e| format!("; first error: {e}"))
                    .unwrap_or_default()
            ),
            ..Row::default()
        });
    }
    for t in tasks {
        t.abort();
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::parse_push;

    #[test]
    fn counts_channel_messages_and_waits_for_whole_ones() {
        let confirm = b"*3\r\n$9\r\nsubscribe\r\n$4\r\nrc:a\r\n:1\r\n";
        assert_eq!(parse_push(confirm), Some((confirm.len(), false)));
        let msg = b"*3\r\n$7\r\nmessage\r\n$4\r\nrc:a\r\n$5\r\n1-0\nx\r\n";
        assert_eq!(parse_push(msg), Some((msg.len(), true)));
        for cut in 0..msg.len() {
            assert_eq!(parse_push(&msg[..cut]), None, "cut at {cut}");
        }
    }
}
