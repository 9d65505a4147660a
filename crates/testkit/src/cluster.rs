//! A Redis Cluster per test: 3 masters by default, optionally with replicas.
//! Helpers migrate a slot and kill a master (then wait for its replica to
//! take over) for the topology-change tests.

use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::redis::{as_strs, redis_cli, spawn_server, temp_dir, tls_args, wait_ready, ClientAuth};
use crate::tls::TestCerts;

/// How long the cluster may take to agree on `cluster_state:ok`, and a
/// replica to be promoted after its master died. Only a failing test waits
/// this long.
const PATIENCE: Duration = Duration::from_secs(30);

/// Highest client port: the cluster bus listens on port + 10000.
const MAX_PORT: u16 = 55535;

/// `cluster-node-timeout` without replicas: nothing fails over, so a
/// loaded machine's pauses should not mark a node as failing.
const NODE_TIMEOUT_MS: &str = "2000";

/// `cluster-node-timeout` with replicas: short, so a killed master is
/// declared failed and replaced within a couple of seconds.
const FAILOVER_NODE_TIMEOUT_MS: &str = "1000";

/// A Redis Cluster on loopback: masters, and optionally replicas of each.
pub struct RedisCluster {
    /// Every node's client port, in start order (see [`RedisCluster::urls`]).
    ports: Vec<u16>,
    /// Every node's TLS port, same order, for [`RedisCluster::start_tls`].
    tls_ports: Vec<u16>,
    /// The node processes, same order; `None` once a node was killed.
    children: Vec<Option<Child>>,
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
        Self::launch(masters, 0, NODE_TIMEOUT_MS, None).await
    }

    /// Like [`RedisCluster::start`], and every node also takes TLS clients
    /// (no client certificate) on a second port with the server certificate
    /// of `certs`: reach them through [`RedisCluster::tls_urls`]. The bus and
    /// replication use TLS too (`tls-cluster yes`), which is what makes a
    /// TLS client be told the TLS ports in `CLUSTER SLOTS` and in redirects;
    /// the plain ports, which the helpers use, stay open.
    pub async fn start_tls(masters: usize, certs: &TestCerts) -> RedisCluster {
        Self::launch(masters, 0, NODE_TIMEOUT_MS, Some(certs)).await
    }

    /// Like [`RedisCluster::start`], plus `replicas_per_master` replicas of
    /// each master, a 1 s `cluster-node-timeout` (a killed master is
    /// replaced within a few seconds) and no replica-validity limit (any
    /// replica may take over). Returns once every replica's link to its
    /// master is up, so what was written before is on the replicas too.
    pub async fn start_with_replicas(masters: usize, replicas_per_master: usize) -> RedisCluster {
        let cluster =
            Self::launch(masters, replicas_per_master, FAILOVER_NODE_TIMEOUT_MS, None).await;
        cluster
            .wait_replicas_synced(masters * replicas_per_master)
            .await;
        cluster
    }

    async fn launch(
        masters: usize,
        replicas: usize,
        node_timeout_ms: &str,
        tls: Option<&TestCerts>,
    ) -> RedisCluster {
        let nodes = masters * (1 + replicas);
        let mut cluster = RedisCluster {
            ports: Vec::new(),
            tls_ports: Vec::new(),
            children: Vec::new(),
            dirs: Vec::new(),
        };
        while cluster.ports.len() < nodes {
            let port = free_cluster_port(&cluster.all_ports());
            // With `tls-cluster yes` the bus listens on the TLS port + 10000.
            let tls_port =
                tls.map(|_| free_cluster_port(&[cluster.all_ports(), vec![port]].concat()));
            let dir = temp_dir("cluster");
            let mut args = vec![
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                node_timeout_ms,
                "--cluster-replica-validity-factor",
                "0",
                // Feed a new replica at once instead of waiting 5 s for
                // more replicas to share the transfer.
                "--repl-diskless-sync-delay",
                "0",
            ]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
            if let (Some(certs), Some(tls_port)) = (tls, tls_port) {
                args.extend(tls_args(tls_port, certs, ClientAuth::Off));
                // Only then does `CLUSTER SLOTS` tell a TLS client the TLS
                // ports (Redis 7.0); the bus and replication go over TLS too.
                args.extend(["--tls-cluster", "yes", "--tls-replication", "yes"].map(String::from));
            }
            let mut child = spawn_server(port, &dir, &as_strs(&args));
            if wait_ready(port, &mut child).await {
                cluster.ports.push(port);
                cluster.tls_ports.extend(tls_port);
                cluster.children.push(Some(child));
            }
            cluster.dirs.push(dir);
        }
        // The nodes meet on the ports their bus is derived from.
        let (meet_ports, tls_flags) = match tls {
            Some(certs) => (
                &cluster.tls_ports,
                vec![
                    "--tls".to_owned(),
                    "--cacert".to_owned(),
                    certs.ca().to_string_lossy().into_owned(),
                ],
            ),
            None => (&cluster.ports, Vec::new()),
        };
        let hosts: Vec<String> = meet_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let status = Command::new("redis-cli")
            .args(&tls_flags)
            .arg("--cluster")
            .arg("create")
            .args(&hosts)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run redis-cli --cluster create");
        assert!(status.success(), "redis-cli --cluster create failed");
        cluster.wait_ok().await;
        cluster
    }

    /// Waits until `expected` live nodes are replicas whose link to their
    /// master is up (the initial sync is done).
    async fn wait_replicas_synced(&self, expected: usize) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let synced = self
                .live()
                .filter(|&i| {
                    let info = redis_cli(&self.url(i), &["INFO", "replication"]);
                    info.contains("role:slave") && info.contains("master_link_status:up")
                })
                .count();
            if synced >= expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "only {synced} of {expected} replicas synced with their masters"
            );
            // Polling replication state: nothing to await.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every live node says `cluster_state:ok` and they all
    /// agree on who owns every slot.
    pub async fn wait_ok(&self) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let urls: Vec<String> = self.live().map(|i| self.url(i)).collect();
            let ok = urls
                .iter()
                .all(|u| redis_cli(u, &["CLUSTER", "INFO"]).contains("cluster_state:ok"));
            let views: Vec<String> = urls.iter().map(|u| slots_view(u)).collect();
            if ok && views.windows(2).all(|w| w[0] == w[1]) {
                return;
            }
            assert!(Instant::now() < deadline, "cluster did not become ok");
            // Polling gossip convergence: nothing to await.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One `redis://127.0.0.1:<port>/` per node, in start order (killed
    /// nodes included, so indices stay stable). Without replicas these are
    /// exactly the masters; with replicas, which node is a master is decided
    /// by `redis-cli` and by failovers: see [`RedisCluster::masters`].
    pub fn urls(&self) -> Vec<String> {
        (0..self.ports.len()).map(|i| self.url(i)).collect()
    }

    /// The client port of every node, in the order of [`RedisCluster::urls`].
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    fn all_ports(&self) -> Vec<u16> {
        [&self.ports[..], &self.tls_ports[..]].concat()
    }

    /// Every node's `rediss://` URL, for a cluster from [`RedisCluster::start_tls`].
    pub fn tls_urls(&self) -> Vec<String> {
        self.tls_ports
            .iter()
            .map(|p| format!("rediss://127.0.0.1:{p}/"))
            .collect()
    }

    fn url(&self, i: usize) -> String {
        format!("redis://127.0.0.1:{}/", self.ports[i])
    }

    /// Indices of the nodes not killed.
    fn live(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.ports.len()).filter(|&i| self.children[i].is_some())
    }

    /// The indices (into `urls()`) of the live nodes that are masters now.
    pub fn masters(&self) -> Vec<usize> {
        self.live()
            .filter(|&i| redis_cli(&self.url(i), &["ROLE"]).starts_with("master"))
            .collect()
    }

    /// Kills (SIGKILL: no goodbye to clients or peers) the master that owns
    /// `slot` and returns its index. Its replica takes over after the node
    /// timeout: see [`RedisCluster::wait_failover`].
    pub fn kill_master_of(&mut self, slot: u16) -> usize {
        let owner = self.owner_of(slot);
        let mut child = self.children[owner]
            .take()
            .expect("the owner of a slot is alive");
        let _ = child.kill();
        let _ = child.wait();
        owner
    }

    /// Waits until a node other than `dead` owns `slot`, answers as a
    /// master, and every live node agrees (`cluster_state:ok`); returns the
    /// new owner's index.
    pub async fn wait_failover(&self, slot: u16, dead: usize) -> usize {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let owner = self.owner_of(slot);
            if owner != dead && self.masters().contains(&owner) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no replica took over slot {slot} from node {dead}"
            );
            // Polling the cluster's failure detection and election.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.wait_ok().await;
        self.owner_of(slot)
    }

    /// The index (into `urls()`) of the master that owns `slot`, as the
    /// first live node sees it.
    pub fn owner_of(&self, slot: u16) -> usize {
        let first = self.live().next().expect("a live node");
        let nodes = redis_cli(&self.url(first), &["CLUSTER", "NODES"]);
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
        // The importing node first, then the old owner, then the other
        // masters (replicas follow their masters and refuse SETSLOT).
        let mut order = vec![to, from];
        order.extend(
            self.masters()
                .into_iter()
                .filter(|i| *i != to && *i != from),
        );
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
        for mut child in self.children.iter_mut().filter_map(Option::take) {
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
