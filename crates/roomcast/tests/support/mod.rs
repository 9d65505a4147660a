//! Fixtures for the cluster tests: in-process nodes on a real Redis (or
//! Redis Cluster) with a unique prefix, nodes run as real processes of the
//! built binary, real WebSocket clients (tokio-tungstenite) and real HTTP
//! requests over TCP.
#![allow(dead_code, unreachable_pub)] // each test uses a subset

pub mod sse;

use std::future::Future;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use roomcast_auth::{mint_hs256, MintClaims};
use roomcast_broker_redis::{RedisBroker, RedisConfig, RedisMode};
use roomcast_edge::{Config, Node};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub const SECRET: &str = "test-secret-0123456789";
pub const API_KEY: &str = "test-api-key-0123456789";
pub const TENANT: &str = "acme";
/// How long a test waits for something that should happen at once.
pub const PATIENCE: Duration = Duration::from_secs(5);
/// How long a test waits for a recovery (reconnect with backoff, resubscribe).
pub const RECOVERY: Duration = Duration::from_secs(20);

/// Where a node's broker lives.
pub enum Backend<'a> {
    Standalone(&'a str),
    Cluster(&'a [String]),
}

/// A node config on `backend` under `prefix`, listening on 127.0.0.1:0,
/// leaving rooms at once (`unsubscribe_delay` 0).
pub fn config(backend: Backend<'_>, prefix: &str) -> Config {
    let mut c = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        unsubscribe_delay: Duration::ZERO,
        drain_window: Duration::from_millis(200),
        ..Config::default()
    };
    c.auth.jwt_secret = Some(SECRET.into());
    c.publish.api_keys = vec![API_KEY.into()];
    match backend {
        Backend::Standalone(url) => c.broker.redis = Some(url.to_owned()),
        Backend::Cluster(urls) => c.broker.redis_cluster = urls.to_vec(),
    }
    c.broker.prefix = prefix.to_owned();
    c
}

/// The Redis broker settings a node config asks for: the same mapping as
/// `roomcast serve` (src/serve.rs `redis_config`).
pub fn redis_config(config: &Config) -> RedisConfig {
    let b = &config.broker;
    let mode = match (&b.redis, b.redis_cluster.is_empty()) {
        (Some(url), _) => RedisMode::Standalone { url: url.clone() },
        (None, false) => RedisMode::Cluster {
            urls: b.redis_cluster.clone(),
        },
        (None, true) => panic!("the cluster tests need a Redis broker"),
    };
    let mut redis = RedisConfig::new(mode);
    redis.prefix = b.prefix.clone();
    redis.history = roomcast_edge::history_policy(config);
    redis.fanout_lanes = b.fanout_lanes;
    redis.tls_reload = b.tls_reload;
    redis
}

/// An in-process node on a Redis broker, serving on 127.0.0.1:0.
pub struct TestNode {
    pub addr: SocketAddr,
    pub node: Arc<Node>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestNode {
    pub async fn start(config: Config) -> TestNode {
        let redis = redis_config(&config);
        redis.validate().expect("a valid redis config");
        let node = Node::build(config, move |sink| async move {
            let broker = RedisBroker::connect(redis, sink).await?;
            Ok(broker as Arc<dyn roomcast_broker::Broker>)
        })
        .await
        .expect("node builds");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn({
            let node = node.clone();
            async move {
                node.run(listener, async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
            }
        });
        TestNode {
            addr,
            node,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Starts the drain and waits for `run` to return.
    pub async fn stop(mut self) {
        let _ = self.shutdown.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.task.take().unwrap())
            .await
            .expect("drain finishes")
            .unwrap();
    }

    pub async fn connect(&self, token: &str) -> Client {
        Client::connect(self.addr, token).await
    }

    pub async fn publish(&self, body: &Value) -> (u16, Value) {
        publish(self.addr, body).await
    }

    pub async fn readyz(&self) -> u16 {
        http_get(self.addr, "/readyz").await.0
    }

    /// The value of an unlabelled metric series (0 before its first use).
    pub async fn counter(&self, series: &str) -> f64 {
        let (status, page) = http_get(self.addr, "/metrics").await;
        assert_eq!(status, 200);
        page.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

/// A node running as a child process of the built `roomcast` binary;
/// SIGKILLed when dropped.
pub struct NodeProcess {
    pub addr: SocketAddr,
    child: tokio::process::Child,
    /// The node's JSON log lines after "listening".
    log: tokio::sync::mpsc::UnboundedReceiver<Value>,
}

impl NodeProcess {
    /// Runs `roomcast serve` on 127.0.0.1:0 on a Redis and waits for its
    /// "roomcast node listening" log line, which names the bound address.
    pub async fn start(redis_url: &str, prefix: &str) -> NodeProcess {
        Self::spawn(&["--redis", redis_url, "--redis-prefix", prefix]).await
    }

    /// Runs `roomcast serve` on 127.0.0.1:0 with the test secret and API key
    /// plus `args`, and waits until it reports its address.
    pub async fn spawn(args: &[&str]) -> NodeProcess {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_roomcast"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(["--jwt-secret", SECRET, "--api-key", API_KEY])
            .args(["--log-format", "json"])
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the roomcast binary");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = oneshot::channel();
        let (log_tx, log) = tokio::sync::mpsc::unbounded_channel();
        // Reads the log for the address, then keeps draining it (to
        // `log`) so the child never blocks on a full pipe.
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            let mut tx = Some(tx);
            let mut seen = Vec::new();
            while let Ok(Some(line)) = lines.next_line().await {
                if tx.is_none() {
                    let _ = log_tx.send(serde_json::from_str(&line).unwrap_or(Value::Null));
                }
                if let Some(t) = tx.take() {
                    let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                    if v["fields"]["message"] == "roomcast node listening" {
                        let addr = v["fields"]["addr"].as_str().unwrap_or_default();
                        let _ = t.send(Ok(addr.parse::<SocketAddr>().expect("an address")));
                    } else {
                        seen.push(line);
                        tx = Some(t);
                    }
                }
            }
            if let Some(t) = tx {
                let _ = t.send(Err(seen.join("\n")));
            }
        });
        let addr = match tokio::time::timeout(RECOVERY, rx).await {
            Ok(Ok(Ok(addr))) => addr,
            Ok(Ok(Err(log))) => panic!("roomcast exited before listening:\n{log}"),
            other => panic!("roomcast did not report its address: {other:?}"),
        };
        NodeProcess { addr, child, log }
    }

    /// The next log line (after "listening") whose message is `message`;
    /// panics if none comes within `within`.
    pub async fn log_line(&mut self, message: &str, within: Duration) -> Value {
        let wait = async {
            while let Some(line) = self.log.recv().await {
                if line["fields"]["message"] == message {
                    return line;
                }
            }
            panic!("the node's log ended before {message:?}");
        };
        tokio::time::timeout(within, wait)
            .await
            .unwrap_or_else(|_| panic!("no {message:?} in the node's log within {within:?}"))
    }

    /// The process id (to signal it).
    pub fn pid(&self) -> u32 {
        self.child.id().expect("the node runs")
    }

    /// Waits for the process to exit.
    pub async fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().await.expect("reap the node")
    }

    /// SIGKILL (no drain, no goodbye) and reap.
    pub async fn sigkill(&mut self) {
        self.child.start_kill().expect("SIGKILL the node");
        let status = self.child.wait().await.unwrap();
        assert!(!status.success(), "killed, not exited: {status}");
    }

    pub async fn connect(&self, token: &str) -> Client {
        Client::connect(self.addr, token).await
    }

    pub async fn publish(&self, body: &Value) -> (u16, Value) {
        publish(self.addr, body).await
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// An HS256 client token for `user` in tenant `acme` with these teams.
pub fn token(user: &str, teams: &[&str]) -> String {
    let mut c = MintClaims::new(user, TENANT);
    c.teams = teams.iter().map(|t| t.to_string()).collect();
    mint_hs256(SECRET.as_bytes(), &c)
}

/// A publish body for tenant `acme`.
pub fn event(rooms: &[&str], kind: &str, data: Value) -> Value {
    json!({"tenant": TENANT, "rooms": rooms, "type": kind, "data": data})
}

#[allow(unused_imports)] // each test binary uses its own subset
pub use roomcast_testkit::{http_post, http_request};

pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path, &[], "").await
}

/// POST /v1/publish with the API key.
pub async fn publish(addr: SocketAddr, body: &Value) -> (u16, Value) {
    http_post(addr, "/v1/publish", Some(API_KEY), &body.to_string()).await
}

/// Publishes, retrying while the node answers 503 (broker unavailable), and
/// returns the accepted reply; fails after `within`.
pub async fn publish_retrying(addr: SocketAddr, body: &Value, within: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (status, reply) = publish(addr, body).await;
        match status {
            200 => return reply,
            503 if tokio::time::Instant::now() < deadline => {
                // Backing off between retries, as a publisher would.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            _ => panic!("publish failed: {status} {reply}"),
        }
    }
}

pub use roomcast_testkit::Client;

/// Polls `check` until it holds, failing after `within`. Only for state that
/// has no event to await (inside a server or Redis).
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {within:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The repository root (where `e2e/` lives).
pub fn repo_root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `program e2e/<script>` from the repository root with `env`, and fails
/// the test, showing the script's output, unless it exits 0 within `within`.
pub async fn run_e2e(program: &str, script: &str, env: &[(&str, String)], within: Duration) {
    let mut cmd = tokio::process::Command::new(program);
    cmd.arg(format!("e2e/{script}"))
        .current_dir(repo_root())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{program} runs (make test-deps installs it): {e}"));
    let out = tokio::time::timeout(within, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{script} did not finish within {within:?}"))
        .unwrap();
    let text = format!(
        "--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{script} failed: {}\n{text}",
        out.status
    );
    println!("{text}");
}

/// Reads one HTTP/1.1 request from `s` and returns its body (for the small
/// product backends the tests stand up: authorization callbacks, introspection).
pub async fn read_request(s: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if buf.len() >= end + 4 + len {
            return Some(buf[end + 4..end + 4 + len].to_vec());
        }
    }
}
