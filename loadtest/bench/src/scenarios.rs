//! The scenarios, the measurement step they share, and the report table.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{
    busy_pct, cpu_of, machine_jiffies, now_ms, rss_of, run_delay_ns, slab_bytes, tcp_mem_bytes,
    ConnectReport, Layout, Peer, Rng, WorkerSpec, WorkerStats,
};
use crate::procs::{spawn, Proc};
use crate::publish;
use crate::Opts;

const SECRET: &str = "bench-secret-0123456789abcdef0123456789";
const API_KEY: &str = "bench-api-key-0123456789";
const PATIENCE: Duration = Duration::from_secs(120);

#[derive(Debug, Default, Clone, Serialize)]
pub struct Row {
    pub scenario: String,
    pub nodes: usize,
    pub conns: usize,
    pub rooms: usize,
    pub publishes_per_s: f64,
    pub deliveries_per_s: f64,
    pub delivered: u64,
    pub expected: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub node_user_s: f64,
    pub node_sys_s: f64,
    /// Node CPU-seconds (user+sys, all nodes) per million deliveries.
    pub node_cpu_s_per_m: f64,
    pub redis_cpu_s: f64,
    pub redis_cpu_s_per_m: f64,
    /// Generator CPU-seconds (workers + orchestrator/publisher) in the window.
    pub gen_cpu_s: f64,
    /// Sum of node RSS at the end of the step, MiB.
    pub node_rss_mib: f64,
    pub closed_conns: u64,
    pub publish_errors: u64,
    /// All CPUs busy / stolen during the window, percent of 2 cores etc.
    pub machine_busy_pct: f64,
    pub machine_steal_pct: f64,
    /// CPU-seconds used in the window by processes outside this benchmark
    /// (the machine is shared: e.g. concurrent compiles). Non-zero means noise.
    pub other_cpu_s: f64,
    /// Seconds from the end of the publishing to the last measured delivery
    /// seen: how far behind the cluster ran when the publishers stopped.
    pub drain_s: f64,
    /// Seconds the CPU figures cover.
    #[serde(skip)]
    pub window_s: f64,
    /// Percent of the nodes' deliveries in the window that left in one write
    /// with a later frame of their room (`roomcast_deliveries_deferred_total`
    /// over `roomcast_deliveries_total`); absent for a server without them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shared_write_pct: Option<f64>,
    /// p99 of publish→broker (ms, at the event id's 1 ms resolution): the
    /// part of the latency spent before a node could see the event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_broker_p99_ms: Option<f64>,
    /// p99 of publish→node (ms, the upper bound of the node histogram's
    /// bucket, from the publisher's `ts`): each event's arrival at a node,
    /// before its fan-out, from `roomcast_publish_to_deliver_seconds`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arrival_p99_ms: Option<f64>,
    /// Milliseconds per second of the window the server's threads (all
    /// nodes', or the floor probe's) waited on a run queue for a CPU
    /// (`/proc/<pid>/task/*/schedstat`), where the kernel keeps it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runq_ms_per_s: Option<f64>,
    /// redis-publish: Redis CPU per publish, µs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_us_per_publish: Option<f64>,
    pub note: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub per_node: Vec<NodeFigures>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct NodeFigures {
    pub addr: String,
    pub user_s: f64,
    pub sys_s: f64,
    pub rss_mib: f64,
}

struct Env {
    dir: PathBuf,
    bin: PathBuf,
    me: PathBuf,
    opts: Opts,
}

impl Env {
    /// The workers' protocol against the nodes of this run.
    fn client_mode(&self) -> &'static str {
        match self.opts.peer {
            Peer::Roomcast => "ws",
            Peer::Socketio => "socketio",
        }
    }
}

/// Redis, nodes and workers of one scenario; killed together.
struct Cluster {
    redis: Option<Proc>,
    redis_addr: String,
    nodes: Vec<(Proc, String)>,
    workers: Vec<Proc>,
    layout: Layout,
    peer: Peer,
}

impl Cluster {
    async fn teardown(self) {
        for w in self.workers {
            w.kill().await;
        }
        for (n, _) in self.nodes {
            n.kill().await;
        }
        if let Some(r) = self.redis {
            r.kill().await;
        }
    }
}

fn free_port(ip: &str) -> Result<u16> {
    let l = std::net::TcpListener::bind((ip, 0))?;
    Ok(l.local_addr()?.port())
}

async fn start_redis(env: &Env) -> Result<(Proc, String)> {
    let port = free_port("127.0.0.1")?;
    let args: Vec<String> = [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--protected-mode",
        "no",
        "--loglevel",
        "warning",
        "--dir",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([env.dir.display().to_string()])
    .collect();
    let p = spawn("redis", &env.opts.redis_server, &args, &env.dir, false)?;
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while publish::ping(&addr).await.is_err() {
        if Instant::now() > deadline {
            bail!(
                "redis-server did not start (see {}/redis.log)",
                env.dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((p, addr))
}

async fn ready(addr: &str) -> bool {
    let Ok(Ok(mut s)) =
        tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr)).await
    else {
        return false;
    };
    let req = format!("GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut buf)).await;
    buf.starts_with(b"HTTP/1.1 200")
}

/// One counter from a node's `/metrics`, if the node exports it.
/// A node's `/metrics` page.
async fn metrics_page(addr: &str) -> Option<String> {
    let mut s = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    let req = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

fn series_of(page: &str, series: &str) -> Option<f64> {
    page.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// The cumulative `(le, count)` buckets of histogram `name`, `+Inf` last.
fn buckets_of(page: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    page.lines()
        .filter_map(|l| {
            let (le, count) = l.strip_prefix(&prefix)?.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// What the nodes' metrics say, summed over the nodes.
#[derive(Clone, Default)]
struct NodeCounters {
    deliveries: f64,
    deferred: f64,
    /// `roomcast_publish_to_deliver_seconds`: each event's arrival at a node
    /// (before its fan-out) from the publisher's `ts`, cumulative buckets.
    arrival: Vec<(f64, f64)>,
}

/// The nodes' counters, if they all export the delivery counters.
async fn node_counters(nodes: &[(Proc, String)]) -> Option<NodeCounters> {
    let mut sum = NodeCounters::default();
    for (_, addr) in nodes {
        let page = metrics_page(addr).await?;
        sum.deliveries += series_of(&page, "roomcast_deliveries_total")?;
        sum.deferred += series_of(&page, "roomcast_deliveries_deferred_total")?;
        let arrival = buckets_of(&page, "roomcast_publish_to_deliver_seconds");
        if sum.arrival.is_empty() {
            sum.arrival = arrival;
        } else if arrival.len() == sum.arrival.len() {
            for (s, (_, c)) in sum.arrival.iter_mut().zip(arrival) {
                s.1 += c;
            }
        }
    }
    Some(sum)
}

/// Run-queue wait per second of `window_s`, `None` when the kernel keeps none.
fn runq_ms_per_s(before_ns: u64, after_ns: u64, window_s: f64) -> Option<f64> {
    (after_ns > before_ns).then(|| (after_ns - before_ns) as f64 / 1e6 / window_s)
}

fn runq_note(row: &Row) -> String {
    row.runq_ms_per_s
        .map(|ms| format!("waited for a CPU {ms:.0} ms/s; "))
        .unwrap_or_default()
}

/// The bucket bound (ms) at or below which 99 % of the events between two
/// scrapes arrived at the nodes; `None` without events.
fn arrival_p99_ms(before: &NodeCounters, after: &NodeCounters) -> Option<f64> {
    let delta: Vec<(f64, f64)> = after
        .arrival
        .iter()
        .map(|&(le, c)| {
            let b = before
                .arrival
                .iter()
                .find(|b| b.0 == le)
                .map_or(0.0, |b| b.1);
            (le, c - b)
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    delta
        .iter()
        .find(|(_, c)| *c >= 0.99 * total)
        .map(|(le, _)| le * 1000.0)
}

async fn start_nodes(env: &Env, n: usize, redis_addr: &str) -> Result<Vec<(Proc, String)>> {
    let cores = std::thread::available_parallelism()
        .map(|c| c.get())
        .unwrap_or(1);
    let threads = match env.opts.node_threads {
        0 => (cores / n.max(1)).max(1),
        t => t,
    };
    let mut nodes = Vec::new();
    for k in 0..n {
        let ip = format!("127.0.0.{}", 2 + k);
        let addr = format!("{ip}:{}", free_port(&ip)?);
        if env.opts.peer == Peer::Socketio {
            let script = std::env::current_dir()?.join("loadtest/peers/socketio/server.js");
            if !script.with_file_name("node_modules").is_dir() {
                bail!(
                    "{} has no node_modules: run `npm ci --prefix loadtest/peers/socketio` (make bench-peer does)",
                    script.display()
                );
            }
            let args: Vec<String> = vec![
                script.display().to_string(),
                "--listen".into(),
                addr.clone(),
                "--redis".into(),
                format!("redis://{redis_addr}"),
            ];
            let node = Path::new("node");
            nodes.push((
                spawn(&format!("node{k}"), node, &args, &env.dir, false)?,
                addr,
            ));
            continue;
        }
        let args: Vec<String> = [
            "serve",
            "--listen",
            &addr,
            "--jwt-secret",
            SECRET,
            "--api-key",
            API_KEY,
            "--redis",
            &format!("redis://{redis_addr}"),
            "--max-connections",
            "19000",
            "--log-format",
            "json",
            "--node-id",
            &format!("n_bench{k}"),
            "--worker-threads",
            &threads.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        nodes.push((
            spawn(&format!("node{k}"), &env.bin, &args, &env.dir, false)?,
            addr,
        ));
    }
    for (p, addr) in nodes.iter_mut() {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready(addr).await {
            if !p.alive() || Instant::now() > deadline {
                bail!(
                    "node {addr} did not become ready (see {}/{}.log)",
                    env.dir.display(),
                    p.name
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(nodes)
}

fn spawn_workers(
    env: &Env,
    tag: &str,
    mode: &str,
    targets: Vec<String>,
    layout: Layout,
    concurrency: usize,
) -> Result<Vec<Proc>> {
    let per = env.opts.per_worker.max(1);
    let count = layout.conns.div_ceil(per);
    (0..count)
        .map(|w| {
            let first = w * per;
            let spec = WorkerSpec {
                mode: mode.into(),
                targets: targets.clone(),
                layout,
                first,
                count: per.min(layout.conns - first),
                secret: SECRET.into(),
                concurrency,
                poll_us: env.opts.client_poll_us,
            };
            let args = vec![
                "worker".into(),
                "--spec".into(),
                serde_json::to_string(&spec)?,
            ];
            spawn(&format!("{tag}-worker{w}"), &env.me, &args, &env.dir, true)
        })
        .collect()
}

/// Tells every worker to connect at once; returns the merged report and the
/// wall-clock ms when the order went out.
async fn connect(workers: &mut [Proc]) -> Result<(ConnectReport, u64)> {
    let t0 = now_ms();
    for w in workers.iter_mut() {
        w.send("connect").await?;
    }
    let mut all = ConnectReport::default();
    for w in workers.iter_mut() {
        let r: ConnectReport = serde_json::from_str(&w.recv(PATIENCE).await?)?;
        all.ok += r.ok;
        all.failed += r.failed;
        all.last_subscribed_ms = all.last_subscribed_ms.max(r.last_subscribed_ms);
        if all.first_error.is_none() {
            all.first_error = r.first_error;
        }
    }
    if all.failed > 0 {
        eprintln!(
            "  ! {} connections failed; first: {}",
            all.failed,
            all.first_error.as_deref().unwrap_or("?")
        );
    }
    Ok((all, t0))
}

/// After the last publish, how long deliveries may pause before the ones
/// still missing count as lost, and the longest the drain may take.
const DRAIN_QUIET: Duration = Duration::from_millis(1500);
const DRAIN_MAX: Duration = Duration::from_secs(60);

/// Waits for the deliveries still on their way after the last publish: until
/// the workers have all `expected`, or none arrived for [`DRAIN_QUIET`] (the
/// rest are lost), or [`DRAIN_MAX`]. Returns the seconds until the last
/// delivery seen, so a cluster that fell behind shows as late, not as lossy.
async fn drain(workers: &mut [Proc], expected: u64) -> Result<f64> {
    let t0 = Instant::now();
    let mut seen = measured_count(workers).await?;
    let mut last_change = t0;
    loop {
        let now = Instant::now();
        if seen >= expected || now - last_change >= DRAIN_QUIET || now - t0 >= DRAIN_MAX {
            return Ok((last_change - t0).as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let count = measured_count(workers).await?;
        if count != seen {
            seen = count;
            last_change = Instant::now();
        }
    }
}

/// Measured deliveries the workers have received so far.
async fn measured_count(workers: &mut [Proc]) -> Result<u64> {
    let mut count = 0;
    for w in workers.iter_mut() {
        count += w.ask("count", PATIENCE).await?.trim().parse::<u64>()?;
    }
    Ok(count)
}

/// The row's note on a step that fell behind or lost deliveries.
fn drain_note(row: &Row) -> Option<String> {
    if row.delivered < row.expected {
        Some(format!(
            "LOST {} (none arrived for {:.1} s)",
            row.expected - row.delivered,
            DRAIN_QUIET.as_secs_f64()
        ))
    } else if row.drain_s >= 0.5 {
        Some(format!(
            "BEHIND: last delivery {:.1} s after the last publish",
            row.drain_s
        ))
    } else {
        None
    }
}

/// The workers' counts and latency histograms, merged.
struct Received {
    counts: WorkerStats,
    /// Publish→deliver, µs.
    latency: Histogram<u64>,
    /// Publish→broker (the event id's clock), ms.
    to_broker: Histogram<u64>,
}

async fn stats(workers: &mut [Proc]) -> Result<Received> {
    let mut got = Received {
        counts: WorkerStats::default(),
        latency: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        to_broker: Histogram::new_with_bounds(1, 60_000, 3)?,
    };
    for w in workers.iter_mut() {
        let s: WorkerStats = serde_json::from_str(&w.ask("stats", PATIENCE).await?)?;
        got.counts.measured += s.measured;
        got.counts.all += s.all;
        got.counts.closed += s.closed;
        for (v, c) in s.hist {
            got.latency.saturating_record_n(v, c);
        }
        for (v, c) in s.to_broker {
            got.to_broker.saturating_record_n(v, c);
        }
    }
    Ok(got)
}

fn cpu_sum(pids: &[u32]) -> (f64, f64) {
    pids.iter()
        .map(|p| cpu_of(*p))
        .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
}

fn self_pid() -> u32 {
    std::process::id()
}

fn fill_latency(row: &mut Row, h: &Histogram<u64>) {
    if h.is_empty() {
        return;
    }
    let ms = |us: u64| us as f64 / 1000.0;
    row.p50_ms = ms(h.value_at_quantile(0.5));
    row.p90_ms = ms(h.value_at_quantile(0.9));
    row.p99_ms = ms(h.value_at_quantile(0.99));
    row.p999_ms = ms(h.value_at_quantile(0.999));
    row.max_ms = ms(h.max());
}

pub(crate) fn busy_cpu_s(a: (u64, u64, u64), b: (u64, u64, u64)) -> f64 {
    #[allow(unsafe_code)]
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (b.0 - a.0) as f64 / hz
}

/// The machine is shared (others compile here): wait, bounded, until it is
/// quiet before a measurement, and say so when it never was.
async fn wait_quiet() {
    let start = Instant::now();
    loop {
        let a = machine_jiffies();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let (busy, _) = busy_pct(a, machine_jiffies());
        if busy < 15.0 {
            return;
        }
        if start.elapsed() > Duration::from_secs(20) {
            eprintln!("  ! machine still {busy:.0}% busy after 20 s of waiting; measuring anyway");
            return;
        }
        if start.elapsed() < Duration::from_secs(2) {
            eprintln!("  machine {busy:.0}% busy with other work; waiting up to 20 s for quiet");
        }
    }
}

/// `step_once`, repeated (at most twice) while processes outside the
/// benchmark took more than 5% of the machine during the window; the row
/// says how noisy the kept attempt was.
async fn step(
    c: &mut Cluster,
    name: &str,
    deliveries_per_s: f64,
    secs: f64,
    warm_s: f64,
    rng: &mut Rng,
    seq: &mut u64,
) -> Result<Row> {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as f64;
    let mut attempt = 1;
    loop {
        let mut row = step_once(c, name, deliveries_per_s, secs, warm_s, rng, seq).await?;
        let share = row.other_cpu_s / (row.window_s * cores);
        if share <= 0.05 || attempt == 2 {
            if share > 0.05 {
                row.note = format!(
                    "NOISY: other processes used {:.0}% of the machine; {}",
                    share * 100.0,
                    row.note
                );
            }
            return Ok(row);
        }
        eprintln!(
            "  {name}: other processes used {:.0}% of the machine; measuring again",
            share * 100.0
        );
        attempt += 1;
    }
}

/// One measured step against nodes: warm-up, then `secs` of measured
/// publishes, a drain, and the figures.
async fn step_once(
    c: &mut Cluster,
    name: &str,
    deliveries_per_s: f64,
    secs: f64,
    warm_s: f64,
    rng: &mut Rng,
    seq: &mut u64,
) -> Result<Row> {
    let sizes = c.layout.room_sizes();
    let mean_room = sizes.iter().sum::<u64>() as f64 / sizes.len() as f64;
    let pub_rate = deliveries_per_s / mean_room;
    let sha = publish::load_script(&c.redis_addr).await?;
    wait_quiet().await;
    for w in c.workers.iter_mut() {
        w.ask("reset", PATIENCE).await?;
    }
    publish::run(
        &c.redis_addr,
        c.peer,
        &sha,
        &sizes,
        pub_rate,
        warm_s,
        0,
        rng,
        seq,
    )
    .await?;
    let node_pids: Vec<u32> = c.nodes.iter().map(|(p, _)| p.pid).collect();
    let gen_pids: Vec<u32> = c
        .workers
        .iter()
        .map(|w| w.pid)
        .chain([self_pid()])
        .collect();
    let redis_pid = c.redis.as_ref().map(|r| r.pid).unwrap_or(0);
    let per0: Vec<(f64, f64)> = node_pids.iter().map(|p| cpu_of(*p)).collect();
    let (n0, g0, r0) = (cpu_sum(&node_pids), cpu_sum(&gen_pids), cpu_of(redis_pid));
    let d0 = node_counters(&c.nodes).await;
    let q0: u64 = node_pids.iter().map(|p| run_delay_ns(*p)).sum();
    let m0 = machine_jiffies();
    let t0 = Instant::now();
    let rep = publish::run(
        &c.redis_addr,
        c.peer,
        &sha,
        &sizes,
        pub_rate,
        secs,
        1,
        rng,
        seq,
    )
    .await?;
    let drain_s = drain(&mut c.workers, rep.expected).await?;
    let window_s = t0.elapsed().as_secs_f64();
    let d1 = node_counters(&c.nodes).await;
    let q1: u64 = node_pids.iter().map(|p| run_delay_ns(*p)).sum();
    let per1: Vec<(f64, f64)> = node_pids.iter().map(|p| cpu_of(*p)).collect();
    let (n1, g1, r1) = (cpu_sum(&node_pids), cpu_sum(&gen_pids), cpu_of(redis_pid));
    let m1 = machine_jiffies();
    let (busy, steal) = busy_pct(m0, m1);
    let ours = (n1.0 - n0.0)
        + (n1.1 - n0.1)
        + (g1.0 - g0.0)
        + (g1.1 - g0.1)
        + (r1.0 - r0.0)
        + (r1.1 - r0.1);
    let other = (busy_cpu_s(m0, m1) - ours).max(0.0);
    let received = stats(&mut c.workers).await?;
    let ws = &received.counts;
    let mut row = Row {
        scenario: name.into(),
        nodes: c.nodes.len(),
        conns: c.layout.conns,
        rooms: c.layout.rooms,
        publishes_per_s: rep.published as f64 / rep.elapsed_s,
        deliveries_per_s: ws.measured as f64 / (rep.elapsed_s + drain_s),
        delivered: ws.measured,
        expected: rep.expected,
        drain_s,
        window_s,
        node_user_s: n1.0 - n0.0,
        node_sys_s: n1.1 - n0.1,
        redis_cpu_s: (r1.0 - r0.0) + (r1.1 - r0.1),
        gen_cpu_s: (g1.0 - g0.0) + (g1.1 - g0.1),
        closed_conns: ws.closed,
        publish_errors: rep.errors,
        machine_busy_pct: busy,
        machine_steal_pct: steal,
        other_cpu_s: other,
        ..Row::default()
    };
    let m = ws.measured.max(1) as f64 / 1e6;
    row.node_cpu_s_per_m = (row.node_user_s + row.node_sys_s) / m;
    row.redis_cpu_s_per_m = row.redis_cpu_s / m;
    for (i, (p, addr)) in c.nodes.iter().enumerate() {
        let rss = rss_of(p.pid) as f64 / (1 << 20) as f64;
        row.node_rss_mib += rss;
        row.per_node.push(NodeFigures {
            addr: addr.clone(),
            user_s: per1[i].0 - per0[i].0,
            sys_s: per1[i].1 - per0[i].1,
            rss_mib: rss,
        });
    }
    fill_latency(&mut row, &received.latency);
    row.runq_ms_per_s = runq_ms_per_s(q0, q1, window_s);
    if !received.to_broker.is_empty() {
        row.to_broker_p99_ms = Some(received.to_broker.value_at_quantile(0.99) as f64);
    }
    if let Some(n) = drain_note(&row) {
        row.note = n;
    }
    if let (Some(a), Some(b)) = (&d0, &d1) {
        let pct = 100.0 * (b.deferred - a.deferred) / (b.deliveries - a.deliveries).max(1.0);
        row.shared_write_pct = Some(pct);
        row.note = format!("{pct:.0}% in shared writes; {}", row.note);
        row.arrival_p99_ms = arrival_p99_ms(a, b);
    }
    let stages = match (row.to_broker_p99_ms, row.arrival_p99_ms) {
        (Some(r), Some(n)) if n.is_finite() => {
            format!("p99 publish->Redis {r:.0} ms, ->node <= {n} ms; ")
        }
        (Some(r), _) => format!("p99 publish->Redis {r:.0} ms; "),
        _ => String::new(),
    };
    row.note = format!("{stages}{}{}", runq_note(&row), row.note);
    if c.peer == Peer::Socketio {
        row.note = format!("peer: Socket.IO + Redis adapter; {}", row.note);
    }
    if let Some(e) = rep.first_error {
        row.note = format!("publish error: {e}; {}", row.note);
    }
    Ok(row)
}

async fn setup(env: &Env, tag: &str, layout: Layout, concurrency: usize) -> Result<Cluster> {
    let (redis, redis_addr) = start_redis(env).await?;
    let mut c = Cluster {
        redis: Some(redis),
        redis_addr,
        nodes: vec![],
        workers: vec![],
        layout,
        peer: env.opts.peer,
    };
    match async {
        c.nodes = start_nodes(env, layout.nodes, &c.redis_addr).await?;
        let targets = c.nodes.iter().map(|(_, a)| a.clone()).collect();
        c.workers = spawn_workers(env, tag, env.client_mode(), targets, layout, concurrency)?;
        let (rep, t0) = connect(&mut c.workers).await?;
        eprintln!(
            "  {} connections subscribed in {:.2} s ({} failed)",
            rep.ok,
            rep.last_subscribed_ms.saturating_sub(t0) as f64 / 1000.0,
            rep.failed
        );
        anyhow::Ok(())
    }
    .await
    {
        Ok(()) => Ok(c),
        Err(e) => {
            c.teardown().await;
            Err(e)
        }
    }
}

async fn idle_and_storm(
    env: &Env,
    want_idle: bool,
    want_storm: bool,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let n = env.opts.idle_conns;
    let layout = Layout {
        conns: n,
        rooms: 100,
        nodes: 1,
    };
    let (redis, redis_addr) = start_redis(env).await?;
    let mut c = Cluster {
        redis: Some(redis),
        redis_addr,
        nodes: vec![],
        workers: vec![],
        layout,
        peer: env.opts.peer,
    };
    let res = async {
        c.nodes = start_nodes(env, 1, &c.redis_addr).await?;
        let targets = c.nodes.iter().map(|(_, a)| a.clone()).collect();
        c.workers = spawn_workers(
            env,
            "idle",
            env.client_mode(),
            targets,
            layout,
            env.opts.storm_concurrency,
        )?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        wait_quiet().await;
        let pid = c.nodes[0].0.pid;
        let (rss0, tcp0, slab0) = (rss_of(pid), tcp_mem_bytes(), slab_bytes());
        let cpu0 = cpu_of(pid);
        let (rep, t0) = connect(&mut c.workers).await?;
        let storm_s = rep.last_subscribed_ms.saturating_sub(t0) as f64 / 1000.0;
        let cpu1 = cpu_of(pid);
        if want_storm {
            rows.push(Row {
                scenario: "connect-storm".into(),
                nodes: 1,
                conns: n,
                rooms: 100,
                node_user_s: cpu1.0 - cpu0.0,
                node_sys_s: cpu1.1 - cpu0.1,
                node_rss_mib: rss_of(pid) as f64 / (1 << 20) as f64,
                closed_conns: rep.failed,
                note: format!(
                    "{} of {n} connected+authenticated+subscribed in {storm_s:.2} s ({:.0}/s; {} workers x {} in flight)",
                    rep.ok,
                    rep.ok as f64 / storm_s.max(1e-3),
                    c.workers.len(),
                    env.opts.storm_concurrency
                ),
                ..Row::default()
            });
        }
        if want_idle {
            tokio::time::sleep(Duration::from_secs(3)).await;
            let (rss1, tcp1, slab1) = (rss_of(pid), tcp_mem_bytes(), slab_bytes());
            let per = |a: u64, b: u64| (b as f64 - a as f64) / rep.ok.max(1) as f64;
            rows.push(Row {
                scenario: "idle".into(),
                nodes: 1,
                conns: rep.ok as usize,
                rooms: 100,
                node_rss_mib: rss1 as f64 / (1 << 20) as f64,
                closed_conns: rep.failed,
                note: format!(
                    "node RSS +{:.0} B/conn ({:.1} -> {:.1} MiB); kernel TCP buffers {:.0} B/conn, slab {:.0} B/conn (machine-wide, both ends of loopback)",
                    per(rss0, rss1),
                    rss0 as f64 / 1048576.0,
                    rss1 as f64 / 1048576.0,
                    per(tcp0, tcp1),
                    per(slab0, slab1)
                ),
                ..Row::default()
            });
        }
        anyhow::Ok(())
    }
    .await;
    c.teardown().await;
    res
}

/// The floor probe and its clients, kept for several steps.
struct FloorRig {
    probe: Proc,
    workers: Vec<Proc>,
    layout: Layout,
    io: crate::floor::FloorIo,
}

impl FloorRig {
    async fn start(env: &Env, layout: Layout) -> Result<Self> {
        let addr = format!("127.0.0.2:{}", free_port("127.0.0.2")?);
        let args = vec![
            "floor".into(),
            "--listen".into(),
            addr.clone(),
            "--rooms".into(),
            layout.rooms.to_string(),
            "--io".into(),
            clap::ValueEnum::to_possible_value(&env.opts.floor_io)
                .expect("no skipped variants")
                .get_name()
                .to_string(),
        ];
        let probe = spawn("floor", &env.me, &args, &env.dir, true)?;
        let mut rig = FloorRig {
            probe,
            workers: vec![],
            layout,
            io: env.opts.floor_io,
        };
        let res = async {
            let l = rig.probe.recv(Duration::from_secs(10)).await?;
            if l != "listening" {
                bail!("floor: {l}");
            }
            rig.workers = spawn_workers(env, "floor", "floor", vec![addr.clone()], layout, 256)?;
            connect(&mut rig.workers).await?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while rig.probe.ask("count", PATIENCE).await?.parse::<usize>()? < layout.conns
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            anyhow::Ok(())
        }
        .await;
        match res {
            Ok(()) => Ok(rig),
            Err(e) => {
                rig.teardown().await;
                Err(e)
            }
        }
    }

    async fn teardown(self) {
        for w in self.workers {
            w.kill().await;
        }
        self.probe.kill().await;
    }

    /// One measured step: a 2 s warm-up, then `secs` at `deliveries_per_s`.
    async fn step(&mut self, name: &str, deliveries_per_s: f64, secs: f64) -> Result<Row> {
        let (layout, fl, workers) = (self.layout, &mut self.probe, &mut self.workers);
        wait_quiet().await;
        let mean_room = layout.conns as f64 / layout.rooms as f64;
        let rate = deliveries_per_s / mean_room;
        fl.ask(&format!("run {rate} 0 2"), PATIENCE).await?;
        for w in workers.iter_mut() {
            w.ask("reset", PATIENCE).await?;
        }
        let gen_pids: Vec<u32> = workers.iter().map(|w| w.pid).chain([self_pid()]).collect();
        let (f0, g0) = (cpu_of(fl.pid), cpu_sum(&gen_pids));
        let q0 = run_delay_ns(fl.pid);
        let m0 = machine_jiffies();
        let t = Instant::now();
        let out: serde_json::Value =
            serde_json::from_str(&fl.ask(&format!("run {rate} 1 {secs}"), PATIENCE).await?)?;
        let elapsed = t.elapsed().as_secs_f64();
        let f1 = cpu_of(fl.pid);
        let q1 = run_delay_ns(fl.pid);
        let expected = out["expected"].as_u64().unwrap_or(0);
        let t_drain = Instant::now();
        let drain_s = drain(workers, expected).await?;
        let window = elapsed + t_drain.elapsed().as_secs_f64();
        let g1 = cpu_sum(&gen_pids);
        let m1 = machine_jiffies();
        let (busy, steal) = busy_pct(m0, m1);
        let ours = (f1.0 - f0.0) + (f1.1 - f0.1) + (g1.0 - g0.0) + (g1.1 - g0.1);
        let other = (busy_cpu_s(m0, m1) - ours).max(0.0);
        let received = stats(workers).await?;
        let ws = &received.counts;
        let written = out["written"].as_u64().unwrap_or(0);
        let mut row = Row {
            scenario: name.into(),
            nodes: 1,
            conns: layout.conns,
            rooms: layout.rooms,
            publishes_per_s: out["published"].as_u64().unwrap_or(0) as f64 / elapsed,
            deliveries_per_s: ws.measured as f64 / (elapsed + drain_s),
            delivered: ws.measured,
            expected,
            drain_s,
            window_s: window,
            node_user_s: f1.0 - f0.0,
            node_sys_s: f1.1 - f0.1,
            gen_cpu_s: (g1.0 - g0.0) + (g1.1 - g0.1),
            node_rss_mib: rss_of(fl.pid) as f64 / 1048576.0,
            closed_conns: ws.closed,
            machine_busy_pct: busy,
            machine_steal_pct: steal,
            other_cpu_s: other,
            note: format!(
                "floor probe: {}; short writes {}",
                self.io.describe(),
                out["short"]
            ),
            ..Row::default()
        };
        row.node_cpu_s_per_m = (row.node_user_s + row.node_sys_s) / (written.max(1) as f64 / 1e6);
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1) as f64;
        if other / (window * cores) > 0.05 {
            row.note = format!(
                "NOISY: other processes used {:.0}% of the machine; {}",
                100.0 * other / (window * cores),
                row.note
            );
        }
        fill_latency(&mut row, &received.latency);
        row.runq_ms_per_s = runq_ms_per_s(q0, q1, elapsed);
        row.note = format!("{}{}", runq_note(&row), row.note);
        if let Some(n) = drain_note(&row) {
            row.note = format!("{n}; {}", row.note);
        }
        Ok(row)
    }
}

/// The sweep's criterion: the step ran at its rate (≥ 97 % of `target`
/// deliveries/s: a sender that falls behind its schedule fails even when
/// its frames, stamped as they are built, look fast), p99 ≤ 10 ms, nothing
/// lost, no connection closed.
fn passes(r: &Row, target: f64) -> bool {
    r.deliveries_per_s >= 0.97 * target
        && r.delivered == r.expected
        && r.p99_ms <= 10.0
        && r.closed_conns == 0
}

/// Steps through `rates` (deliveries/s), marking each row pass or FAIL,
/// until two fail in a row; returns the highest passing rate.
async fn sweep_rates(
    label: &str,
    rates: &[f64],
    rows: &mut Vec<Row>,
    mut step: impl AsyncFnMut(String, f64) -> Result<Row>,
) -> Result<Option<f64>> {
    let (mut best, mut fails) = (None, 0);
    for &target in rates {
        let mut r = step(format!("{label} {}k", target / 1000.0), target).await?;
        let pass = passes(&r, target);
        r.note = format!(
            "{} (rate, p99<=10ms, 0 loss) {}",
            if pass { "pass" } else { "FAIL" },
            r.note
        );
        eprintln!(
            "  {label} {target}: {:.0}/s p99 {:.2} ms, {}/{} -> {}",
            r.deliveries_per_s,
            r.p99_ms,
            r.delivered,
            r.expected,
            if pass { "pass" } else { "fail" }
        );
        rows.push(r);
        if pass {
            best = Some(target);
            fails = 0;
        } else {
            fails += 1;
            if fails >= 2 {
                break;
            }
        }
    }
    Ok(best)
}

fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    serde_json::json!({
        "date": date,
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "kernel": kernel,
        "command": std::env::args().collect::<Vec<_>>().join(" "),
    })
}

pub async fn run(mut opts: Opts) -> Result<()> {
    if opts.scenarios.is_empty() {
        opts.scenarios = [
            "idle",
            "connect-storm",
            "fanout",
            "floor",
            "broadcast",
            "sweep",
            "floor-sweep",
            "redis-publish",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
    }
    let known = [
        "idle",
        "connect-storm",
        "fanout",
        "floor",
        "broadcast",
        "sweep",
        "floor-sweep",
        "redis-publish",
        "cluster",
    ];
    for s in &opts.scenarios {
        if !known.contains(&s.as_str()) {
            bail!("unknown scenario {s}; known: {}", known.join(", "));
        }
    }
    let dir = std::env::temp_dir().join(format!("roomcast-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let bin = dir.join("roomcast");
    std::fs::copy(&opts.server_bin, &bin).with_context(|| {
        format!(
            "copying {} (build it: cargo build --release -p roomcast)",
            opts.server_bin.display()
        )
    })?;
    let env = Env {
        dir: dir.clone(),
        bin,
        me: std::env::current_exe()?,
        opts: opts.clone(),
    };
    let want = |s: &str| opts.scenarios.iter().any(|x| x == s);
    let mut rows: Vec<Row> = Vec::new();
    let mut rng = Rng::new(0x00c0_ffee);
    let mut seq = 0u64;
    let started = Instant::now();
    let mut sweep_summary = None;
    let mut floor_summary = None;

    if want("idle") || want("connect-storm") {
        eprintln!(
            "== idle / connect-storm: {} connections, 1 node",
            opts.idle_conns
        );
        idle_and_storm(&env, want("idle"), want("connect-storm"), &mut rows).await?;
    }
    let fan_layout = Layout {
        conns: opts.conns,
        rooms: opts.rooms,
        nodes: opts.nodes,
    };
    if want("fanout") || want("sweep") {
        eprintln!(
            "== fanout: {} connections, {} rooms, {} nodes",
            opts.conns, opts.rooms, opts.nodes
        );
        let mut c = setup(&env, "fanout", fan_layout, 256).await?;
        let res = async {
            if want("fanout") {
                rows.push(
                    step(
                        &mut c, "fanout", opts.rate, opts.secs, 2.0, &mut rng, &mut seq,
                    )
                    .await?,
                );
            }
            if want("sweep") {
                let best = sweep_rates("sweep", &opts.sweep, &mut rows, async |name, target| {
                    step(
                        &mut c,
                        &name,
                        target,
                        opts.sweep_secs,
                        1.0,
                        &mut rng,
                        &mut seq,
                    )
                    .await
                })
                .await?;
                sweep_summary = Some(best);
            }
            anyhow::Ok(())
        }
        .await;
        c.teardown().await;
        res?;
    }
    if want("floor") || want("floor-sweep") {
        eprintln!(
            "== floor probe: {} sockets, {} rooms",
            opts.conns, opts.rooms
        );
        let mut rig = FloorRig::start(
            &env,
            Layout {
                nodes: 1,
                ..fan_layout
            },
        )
        .await?;
        let res = async {
            if want("floor") {
                let mut r = rig.step("floor", opts.rate, opts.secs).await?;
                if let Some(f) = rows.iter().find(|r| r.scenario == "fanout") {
                    r.note = format!(
                        "{}; fanout node CPU/M is {:.2}x the floor",
                        r.note,
                        f.node_cpu_s_per_m / r.node_cpu_s_per_m.max(1e-9)
                    );
                }
                rows.push(r);
            }
            if want("floor-sweep") {
                let best = sweep_rates(
                    "floor-sweep",
                    &opts.sweep,
                    &mut rows,
                    async |name, target| rig.step(&name, target, opts.sweep_secs).await,
                )
                .await?;
                floor_summary = Some(best);
            }
            anyhow::Ok(())
        }
        .await;
        rig.teardown().await;
        res?;
    }
    if want("broadcast") {
        eprintln!(
            "== broadcast: {} connections, 1 room, {} nodes",
            opts.conns, opts.nodes
        );
        let layout = Layout {
            conns: opts.conns,
            rooms: 1,
            nodes: opts.nodes,
        };
        let mut c = setup(&env, "broadcast", layout, 256).await?;
        let res = step(
            &mut c,
            "broadcast",
            opts.rate,
            opts.secs,
            2.0,
            &mut rng,
            &mut seq,
        )
        .await;
        c.teardown().await;
        rows.push(res?);
    }
    if want("redis-publish") {
        eprintln!(
            "== redis-publish: {} rooms, Redis alone, {} subscribers",
            opts.rooms, opts.publish_subscribers
        );
        let (redis, addr) = start_redis(&env).await?;
        let res = crate::redis_publish::run(&addr, redis.pid, &opts, &mut rng, &mut seq).await;
        redis.kill().await;
        rows.extend(res?);
    }
    if want("cluster") {
        eprintln!(
            "== cluster: {} nodes, {} connections, {} rooms",
            opts.cluster_nodes, opts.conns, opts.rooms
        );
        let layout = Layout {
            conns: opts.conns,
            rooms: opts.rooms,
            nodes: opts.cluster_nodes,
        };
        let mut c = setup(&env, "cluster", layout, 256).await?;
        let res = step(
            &mut c,
            "cluster",
            opts.cluster_rate,
            opts.cluster_secs,
            2.0,
            &mut rng,
            &mut seq,
        )
        .await;
        c.teardown().await;
        let mut r = res?;
        r.note = r.note.clone()
            + &r.per_node
                .iter()
                .map(|n| {
                    format!(
                        "{}: {:.2}+{:.2} CPU-s, {:.0} MiB",
                        n.addr, n.user_s, n.sys_s, n.rss_mib
                    )
                })
                .collect::<Vec<_>>()
                .join("; ");
        rows.push(r);
    }

    let m = machine();
    print_table(&rows, &m, sweep_summary, floor_summary, started.elapsed());
    if let Some(path) = &opts.json {
        let doc = serde_json::json!({
            "machine": m,
            "rows": rows,
            "sweep_highest_passing_deliveries_per_s": sweep_summary.flatten(),
            "floor_sweep_highest_passing_deliveries_per_s": floor_summary.flatten(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)?;
        eprintln!("wrote {}", path.display());
    }
    if opts.keep {
        eprintln!("logs kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if opts.check {
        let lost: Vec<String> = rows
            .iter()
            .filter(|r| r.delivered != r.expected || r.closed_conns > 0 || r.publish_errors > 0)
            .map(|r| {
                format!(
                    "{}: {}/{} delivered, {} connections closed or failed, {} publish errors",
                    r.scenario, r.delivered, r.expected, r.closed_conns, r.publish_errors
                )
            })
            .collect();
        if !lost.is_empty() {
            bail!("--check: {}", lost.join("; "));
        }
        eprintln!("--check: {} rows, nothing lost", rows.len());
    }
    Ok(())
}

fn print_table(
    rows: &[Row],
    m: &serde_json::Value,
    sweep: Option<Option<f64>>,
    floor_sweep: Option<Option<f64>>,
    took: Duration,
) {
    println!(
        "\nroomcast-bench  {}  nproc={}  {}  kernel {}  ({:.0} s)",
        m["date"].as_str().unwrap_or(""),
        m["nproc"],
        m["cpu"].as_str().unwrap_or(""),
        m["kernel"].as_str().unwrap_or(""),
        took.as_secs_f64()
    );
    println!(
        "{:<14} {:>5} {:>6} {:>5} {:>8} {:>10} {:>19} {:>7} {:>7} {:>7} {:>7} {:>7} {:>15} {:>8} {:>7} {:>8} {:>5} {:>6} {:>6}  note",
        "scenario", "nodes", "conns", "rooms", "pub/s", "deliv/s", "delivered/expected", "p50ms", "p90ms",
        "p99ms", "p999ms", "maxms", "nodeCPU usr+sys", "CPU-s/M", "redis/M", "gen CPU", "busy%", "steal%", "other"
    );
    let dash = |v: f64, p: usize| {
        if v == 0.0 {
            "-".to_string()
        } else {
            format!("{v:.p$}")
        }
    };
    for r in rows {
        let de = if r.expected == 0 && r.delivered == 0 {
            "-".into()
        } else {
            format!("{}/{}", r.delivered, r.expected)
        };
        let cpu = format!("{:.2}+{:.2}", r.node_user_s, r.node_sys_s);
        let closed = if r.closed_conns > 0 {
            format!(" [closed/failed conns: {}]", r.closed_conns)
        } else {
            String::new()
        };
        let errors = if r.publish_errors > 0 {
            format!(" [publish errors: {}]", r.publish_errors)
        } else {
            String::new()
        };
        println!(
            "{:<14} {:>5} {:>6} {:>5} {:>8} {:>10} {:>19} {:>7} {:>7} {:>7} {:>7} {:>7} {:>15} {:>8} {:>7} {:>8} {:>5} {:>6} {:>6}  {}{closed}{errors}",
            r.scenario, r.nodes, r.conns, r.rooms, dash(r.publishes_per_s, 0), dash(r.deliveries_per_s, 0), de,
            dash(r.p50_ms, 2), dash(r.p90_ms, 2), dash(r.p99_ms, 2), dash(r.p999_ms, 2), dash(r.max_ms, 2),
            cpu, dash(r.node_cpu_s_per_m, 2),
            dash(r.redis_cpu_s_per_m, 2), dash(r.gen_cpu_s, 2), dash(r.machine_busy_pct, 0),
            // Time the host took the vCPUs away: a slow-state run (docs/performance.md, runs 28-30).
            dash(r.machine_steal_pct, 1), dash(r.other_cpu_s, 2),
            r.note,
        );
    }
    for (label, prefix, summary) in [
        ("sweep", "sweep ", sweep),
        (
            "floor-sweep (the floor probe, same clients)",
            "floor-sweep ",
            floor_sweep,
        ),
    ] {
        // A host that takes the vCPUs away fails steps a quiet one passes.
        let steal = rows
            .iter()
            .filter(|r| r.scenario.starts_with(prefix))
            .map(|r| r.machine_steal_pct)
            .fold(0.0, f64::max);
        let steal = if steal > 2.0 {
            format!(" [steal up to {steal:.0}% in its steps: the host's slow state, see docs/performance.md]")
        } else {
            String::new()
        };
        match summary {
            Some(Some(b)) => {
                println!("{label}: highest rate sustained with p99 <= 10 ms and 0 loss: {b:.0} deliveries/s{steal}")
            }
            Some(None) => {
                println!("{label}: no step passed (rate sustained, p99 <= 10 ms, 0 loss){steal}")
            }
            None => {}
        }
    }
}
