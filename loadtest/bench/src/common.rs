//! Shared by the orchestrator and its worker processes: the connection
//! layout, HS256 tokens, clocks and /proc readers.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

pub const TENANT: &str = "acme";
pub const PREFIX: &str = "rc:";

/// How connection `i` of a run is placed: its room and its node. Rooms get
/// members on every node (`(i / rooms) % nodes`), as random load balancing
/// would do, so every publish reaches every node.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Layout {
    pub conns: usize,
    pub rooms: usize,
    pub nodes: usize,
}

impl Layout {
    pub fn room_of(&self, i: usize) -> usize {
        i % self.rooms
    }
    pub fn node_of(&self, i: usize) -> usize {
        (i / self.rooms) % self.nodes
    }
    pub fn room_sizes(&self) -> Vec<u64> {
        let mut sizes = vec![0u64; self.rooms];
        for i in 0..self.conns {
            sizes[self.room_of(i)] += 1;
        }
        sizes
    }
}

/// Client source address for connection `i`: 4,000 connections per
/// 127.0.1.x address keeps each source far below its ephemeral port range.
pub fn source_of(i: usize) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(127, 0, 1, 1 + (i / 4000) as u8)
}

/// The server the node scenarios run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
pub enum Peer {
    /// `roomcast serve`, publishes through the contract's publish script.
    #[default]
    Roomcast,
    /// Socket.IO 4 on `@socket.io/redis-adapter` (loadtest/peers/socketio),
    /// publishes in the adapter's own format, as `@socket.io/redis-emitter`.
    Socketio,
}

pub fn room_name(r: usize) -> String {
    format!("team:{r}")
}

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

pub fn now_ms() -> u64 {
    now_ns() / 1_000_000
}

/// A client token (HS256) for user `u<i>` allowed into `team:<room>`.
pub fn mint(secret: &[u8], i: usize, room: usize) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = format!(
        r#"{{"sub":"u{i}","tenant":"{TENANT}","teams":["{room}"],"exp":{}}}"#,
        now_ms() / 1000 + 4 * 3600
    );
    let body = URL_SAFE_NO_PAD.encode(claims.as_bytes());
    let signing = format!("{header}.{body}");
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(signing.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signing}.{sig}")
}

/// xorshift64*: cheap, deterministic room picks.
pub struct Rng(u64);
impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }
    pub fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n
    }
}

/// Raises the soft open-files limit to the hard one (20,000 here).
pub fn raise_nofile() {
    #[allow(unsafe_code)]
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

/// (user, system) CPU seconds of a process from /proc/<pid>/stat.
pub fn cpu_of(pid: u32) -> (f64, f64) {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return (0.0, 0.0);
    };
    // Fields after the parenthesised command name; utime is field 14.
    let rest = &s[s.rfind(')').map_or(0, |p| p + 2)..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    #[allow(unsafe_code)]
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let ut = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let st = f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ut / hz, st / hz)
}

/// Nanoseconds the threads of `pid` have waited on a run queue for a CPU
/// (the second field of each `/proc/<pid>/task/*/schedstat`), summed; 0
/// where the kernel keeps no such figure (built without `CONFIG_SCHED_INFO`).
pub fn run_delay_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// Resident set size in bytes, from /proc/<pid>/status.
pub fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// Kernel TCP socket buffer memory in bytes (machine-wide), from
/// /proc/net/sockstat (`TCP: ... mem <pages>`).
pub fn tcp_mem_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    let pages = s
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.iter()
                .position(|x| *x == "mem")
                .and_then(|p| f.get(p + 1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    pages * 4096
}

/// Slab memory (kernel objects: socket structs, dentries for socket fds…), bytes.
pub fn slab_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Slab:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// What a worker (or the floor) is told to do, as one JSON argument.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    /// `ws`: the native protocol against nodes; `socketio`: Engine.IO 4 over
    /// WebSocket against a Socket.IO peer; `floor`: the floor probe's raw
    /// framing (2-byte room id, then server frames).
    pub mode: String,
    pub targets: Vec<String>,
    pub layout: Layout,
    pub first: usize,
    pub count: usize,
    pub secret: String,
    /// Connections being established at once by this worker.
    pub concurrency: usize,
    /// Read connections from one thread polling every this many µs
    /// (`poller`); 0: a tokio task per connection, asleep until data comes.
    pub poll_us: u64,
}

/// A worker's answer to `connect`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnectReport {
    pub ok: u64,
    pub failed: u64,
    pub first_error: Option<String>,
    pub last_subscribed_ms: u64,
}

/// A worker's answer to `stats`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkerStats {
    /// Measured events received (`"w":1`).
    pub measured: u64,
    /// All events received.
    pub all: u64,
    pub closed: u64,
    /// Latency histogram (µs) as (value, count) pairs.
    pub hist: Vec<(u64, u64)>,
    /// Publish→broker histogram (ms): the event id's ms (the Redis stream
    /// entry's clock, when the script ran) minus the publisher's `t_ns`.
    #[serde(default)]
    pub to_broker: Vec<(u64, u64)>,
}

/// Machine-wide (busy, steal, total) jiffies from the `cpu` line of /proc/stat.
pub fn machine_jiffies() -> (u64, u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    let steal = v.get(7).copied().unwrap_or(0);
    (total - idle - steal, steal, total)
}

/// Busy and steal percent of all CPUs between two `machine_jiffies` samples.
pub fn busy_pct(a: (u64, u64, u64), b: (u64, u64, u64)) -> (f64, f64) {
    let t = (b.2 - a.2).max(1) as f64;
    (
        100.0 * (b.0 - a.0) as f64 / t,
        100.0 * (b.1 - a.1) as f64 / t,
    )
}
