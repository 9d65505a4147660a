//! A 3-master Redis Cluster per test, with a slot-migration helper for the
//! topology-change tests.

use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::redis::{redis_cli, spawn_server, temp_dir, wait_ready};

/// How long the cluster may take to agree on `cluster_state:ok`.
const PATIENCE: Duration = Duration::from_secs(20);

/// Highest client port: the cluster bus listens on port + 10000.
const MAX_PORT: u16 = 55535;

/// A Redis Cluster of `masters` masters and no replicas on loopback.
pub struct RedisCluster {
    ports: Vec<u16>,
    children: Vec<Child>,
    dirs: Vec<PathBuf>,
}

fn port_free(port: u16) -> bool {
    TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// A port ≤ 55535 whose bus port (+10000) is free too.
fn free_cluster_port(taken: &[u16]) -> u16 {
    // Spread the start by pid so parallel test processes rarely collide.
    let mut port = 20000 + (std::process::id() as u16 % 30000);
    loop {
        port = if port >= MAX_PORT { 20000 } else { port + 1 };
        let clash = taken
            .iter()
            .any(|&t| t == port || t + 10000 == port || port + 10000 == t);
        if !clash && port_free(port) && port_free(port + 10000) {
            return port;
        }
    }
}

impl RedisCluster {
    /// Starts `masters` cluster-enabled servers, creates the cluster with
    /// `redis-cli --cluster create`, and waits until every node reports
    /// `cluster_state:ok`.
    pub async fn start(masters: usize) -> RedisCluster {
        let mut cluster = RedisCluster {
            ports: Vec::new(),
            children: Vec::new(),
            dirs: Vec::new(),
        };
        while cluster.ports.len() < masters {
            let port = free_cluster_port(&cluster.ports);
            let dir = temp_dir("cluster");
            let mut child = spawn_server(
                port,
                &dir,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ],
            );
            if wait_ready(port, &mut child).await {
                cluster.ports.push(port);
                cluster.children.push(child);
            }
            cluster.dirs.push(dir);
        }
        let hosts: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let status = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&hosts)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run redis-cli --cluster create");
        assert!(status.success(), "redis-cli --cluster create failed");
        cluster.wait_ok().await;
        cluster
    }

    /// Waits until every node says `cluster_state:ok` and agrees on who owns
    /// every slot.
    pub async fn wait_ok(&self) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let ok = self
                .urls()
                .iter()
                .all(|u| redis_cli(u, &["CLUSTER", "INFO"]).contains("cluster_state:ok"));
            let views: Vec<String> = self.urls().iter().map(|u| slots_view(u)).collect();
            if ok && views.windows(2).all(|w| w[0] == w[1]) {
                return;
            }
            assert!(Instant::now() < deadline, "cluster did not become ok");
            // Polling gossip convergence: nothing to await.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One `redis://127.0.0.1:<port>/` per master.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}/"))
            .collect()
    }

    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// The index (into `urls()`) of the master that owns `slot`.
    pub fn owner_of(&self, slot: u16) -> usize {
        let url = &self.urls()[0];
        let nodes = redis_cli(url, &["CLUSTER", "NODES"]);
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 {
                continue;
            }
            let owns = fields[8..].iter().any(|r| {
                if r.starts_with('[') {
                    return false;
                }
                let (a, b) = r.split_once('-').unwrap_or((r, r));
                let (a, b): (u16, u16) = (a.parse().unwrap_or(1), b.parse().unwrap_or(0));
                (a..=b).contains(&slot)
            });
            if owns {
                let port: u16 = fields[1]
                    .split('@')
                    .next()
                    .and_then(|hp| hp.rsplit(':').next())
                    .and_then(|p| p.parse().ok())
                    .expect("a node address in CLUSTER NODES");
                return self
                    .ports
                    .iter()
                    .position(|&p| p == port)
                    .expect("a known port");
            }
        }
        panic!("no master owns slot {slot}");
    }

    /// The cluster slot of a key or channel (CRC16 of its hash tag).
    pub fn slot_of(key: &str) -> u16 {
        let bytes = key.as_bytes();
        let tagged = bytes
            .iter()
            .position(|&b| b == b'{')
            .and_then(|open| {
                let rest = &bytes[open + 1..];
                rest.iter()
                    .position(|&b| b == b'}')
                    .filter(|&close| close > 0)
                    .map(|close| &rest[..close])
            })
            .unwrap_or(bytes);
        crc16(tagged) % 16384
    }

    /// Moves `slot` (and its keys) from its owner to master `to`, the way
    /// `redis-cli --cluster reshard` does: SETSLOT IMPORTING / MIGRATING,
    /// MIGRATE the keys, then SETSLOT NODE on every master.
    pub async fn migrate_slot(&self, slot: u16, to: usize) {
        let from = self.owner_of(slot);
        assert_ne!(from, to, "slot {slot} is already on master {to}");
        let urls = self.urls();
        let id = |i: usize| redis_cli(&urls[i], &["CLUSTER", "MYID"]);
        let (from_id, to_id) = (id(from), id(to));
        let s = slot.to_string();
        expect_ok(redis_cli(
            &urls[to],
            &["CLUSTER", "SETSLOT", &s, "IMPORTING", &from_id],
        ));
        expect_ok(redis_cli(
            &urls[from],
            &["CLUSTER", "SETSLOT", &s, "MIGRATING", &to_id],
        ));
        loop {
            let keys = redis_cli(&urls[from], &["CLUSTER", "GETKEYSINSLOT", &s, "100"]);
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let port = self.ports[to].to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            args.extend(keys);
            expect_ok(redis_cli(&urls[from], &args));
        }
        // The importing node first, then the old owner, then the rest.
        let mut order = vec![to, from];
        order.extend((0..urls.len()).filter(|i| *i != to && *i != from));
        for i in order {
            expect_ok(redis_cli(
                &urls[i],
                &["CLUSTER", "SETSLOT", &s, "NODE", &to_id],
            ));
        }
        self.wait_ok().await;
    }
}

fn expect_ok(reply: String) {
    assert!(
        reply == "OK" || reply == "NOKEY",
        "unexpected redis reply: {reply}"
    );
}

/// Every node's claimed slot ranges, for comparing views.
fn slots_view(url: &str) -> String {
    let mut lines: Vec<String> = redis_cli(url, &["CLUSTER", "NODES"])
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 8).then(|| format!("{} {}", f[0], f[8..].join(" ")))
        })
        .collect();
    lines.sort();
    lines.join("\n")
}

/// CRC16/XMODEM, as Redis Cluster uses for key slots.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for dir in &self.dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_hash_tags() {
        // Known values from the Redis Cluster specification.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(RedisCluster::slot_of("foo"), 12182);
        assert_eq!(
            RedisCluster::slot_of("a{user1000}.following"),
            RedisCluster::slot_of("user1000")
        );
    }
}
