//! A standalone `redis-server` per test (or the one `REDIS_URL` names), and
//! the small helpers tests use to look at Redis directly.

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::tls::TestCerts;

/// How long a spawned server may take to answer PING.
const READY_PATIENCE: Duration = Duration::from_secs(10);

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A key/channel prefix no other test (in this or another process) uses,
/// ending in `:`. Contains no `{` or `}`, so it never disturbs hash tags.
pub fn unique_prefix() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("t{}-{n}-{nanos}:", std::process::id())
}

/// A fresh temporary directory for one server's files.
pub(crate) fn temp_dir(what: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("roomcast-{what}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create a temp dir for redis-server");
    dir
}

/// A loopback port that was free a moment ago.
pub(crate) fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// Spawns `redis-server` on `port` with no persistence, files in `dir`.
pub(crate) fn spawn_server(port: u16, dir: &Path, extra: &[&str]) -> Child {
    Command::new("redis-server")
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .args(["--loglevel", "warning"])
        .arg("--dir")
        .arg(dir)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn redis-server (install it: apt-get install -y redis-server redis-tools)")
}

/// Waits until the server on `port` answers PING, or panics after the
/// patience runs out (or when `child` exited, e.g. because the port was taken).
pub(crate) async fn wait_ready(port: u16, child: &mut Child) -> bool {
    let deadline = Instant::now() + READY_PATIENCE;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        // The answer must come from our own child: a server of another test
        // process that raced us to the port would otherwise pass for ours.
        if answering_pid(port).await == Some(child.id()) {
            return true;
        }
        assert!(
            Instant::now() < deadline,
            "redis-server on port {port} did not answer PING within {READY_PATIENCE:?}"
        );
        // Polling a process that is starting up: there is nothing to await.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The process id of the redis-server answering on `port`, from `INFO server`.
async fn answering_pid(port: u16) -> Option<u32> {
    let mut s = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
        .await
        .ok()?;
    s.write_all(b"INFO server\r\n").await.ok()?;
    let mut reply = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        reply.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&reply);
        if let Some(rest) = text.split("process_id:").nth(1) {
            if let Some((pid, _)) = rest.split_once("\r\n") {
                return pid.trim().parse().ok();
            }
        }
        if reply.len() > 64 * 1024 {
            return None;
        }
    }
}

/// A standalone Redis for one test.
pub struct RedisServer {
    url: String,
    port: u16,
    /// `None` when the server is external (`REDIS_URL`) or currently killed.
    child: Option<Child>,
    /// `None` when external: kill/restart are not possible then.
    dir: Option<PathBuf>,
    /// The TLS port, beside the plain one, of a [`RedisServer::start_tls`] server.
    tls_port: Option<u16>,
    /// Arguments a restart repeats (the TLS settings).
    extra: Vec<String>,
}

/// Whether a TLS test server asks clients for a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// `tls-auth-clients no`: the server's certificate is checked, the client has none.
    Off,
    /// `tls-auth-clients yes`: mutual TLS, the client needs a certificate of the test CA.
    Required,
}

/// `redis-server` arguments for a TLS port with `certs`.
pub(crate) fn tls_args(tls_port: u16, certs: &TestCerts, auth: ClientAuth) -> Vec<String> {
    let path = |p: PathBuf| p.to_string_lossy().into_owned();
    vec![
        "--tls-port".into(),
        tls_port.to_string(),
        "--tls-cert-file".into(),
        path(certs.server_cert()),
        "--tls-key-file".into(),
        path(certs.server_key()),
        "--tls-ca-cert-file".into(),
        path(certs.ca()),
        "--tls-auth-clients".into(),
        if auth == ClientAuth::Required {
            "yes"
        } else {
            "no"
        }
        .into(),
    ]
}

impl RedisServer {
    /// Uses `REDIS_URL` when set; otherwise spawns a `redis-server` on a
    /// free loopback port and waits until it answers PING.
    pub async fn start() -> RedisServer {
        if let Ok(url) = std::env::var("REDIS_URL") {
            let port = url
                .rsplit(':')
                .next()
                .and_then(|p| p.trim_end_matches('/').split('/').next())
                .and_then(|p| p.parse().ok())
                .unwrap_or(6379);
            return RedisServer {
                url,
                port,
                child: None,
                dir: None,
                tls_port: None,
                extra: Vec::new(),
            };
        }
        Self::spawn(None).await
    }

    /// Spawns a `redis-server` (never `REDIS_URL`'s) that also listens for
    /// TLS on a second port with the server certificate of `certs`: reach it
    /// through [`RedisServer::tls_url`]. The plain port stays for the
    /// readiness check and for tests that look at Redis directly.
    pub async fn start_tls(certs: &TestCerts, auth: ClientAuth) -> RedisServer {
        Self::spawn(Some((certs, auth))).await
    }

    async fn spawn(tls: Option<(&TestCerts, ClientAuth)>) -> RedisServer {
        let dir = temp_dir("redis");
        for _ in 0..20 {
            let port = free_port();
            let tls_port = tls.map(|_| free_port());
            let extra = match (tls, tls_port) {
                (Some((certs, auth)), Some(tls_port)) => tls_args(tls_port, certs, auth),
                _ => Vec::new(),
            };
            let mut child = spawn_server(port, &dir, &as_strs(&extra));
            if wait_ready(port, &mut child).await {
                return RedisServer {
                    url: format!("redis://127.0.0.1:{port}/"),
                    port,
                    child: Some(child),
                    dir: Some(dir),
                    tls_port,
                    extra,
                };
            }
        }
        panic!("could not start redis-server on a free port");
    }

    /// `rediss://127.0.0.1:<tls port>/` of a [`RedisServer::start_tls`] server.
    pub fn tls_url(&self) -> String {
        let port = self.tls_port.expect("a server started with start_tls");
        format!("rediss://127.0.0.1:{port}/")
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// True when the server came from `REDIS_URL`: it cannot be killed or
    /// restarted, so fault tests skip themselves.
    pub fn is_external(&self) -> bool {
        self.dir.is_none()
    }

    /// Kills the server (SIGKILL: no goodbye to its clients) and waits for it to exit.
    pub fn kill(&mut self) {
        assert!(
            !self.is_external(),
            "cannot kill an external REDIS_URL server"
        );
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (empty: no persistence),
    /// and waits until it answers PING.
    pub async fn start_again(&mut self) {
        let dir = self.dir.clone().expect("cannot restart an external server");
        assert!(self.child.is_none(), "kill() the server first");
        // The old socket may linger a moment; retry until the port is ours.
        let deadline = Instant::now() + READY_PATIENCE;
        loop {
            let mut child = spawn_server(self.port, &dir, &as_strs(&self.extra));
            if wait_ready(self.port, &mut child).await {
                self.child = Some(child);
                return;
            }
            assert!(
                Instant::now() < deadline,
                "could not restart redis-server on port {}",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `kill()` then `start_again()`.
    pub async fn restart(&mut self) {
        self.kill();
        self.start_again().await;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

pub(crate) fn as_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Runs `redis-cli -u <url> <args...>` and returns its trimmed stdout.
/// Synchronous and quick: for assertions, not for hot loops.
pub fn redis_cli(url: &str, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-u", url])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run redis-cli (install it: apt-get install -y redis-tools)");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Runs one command on a fresh connection to `url` and converts the reply,
/// e.g. `query::<Vec<redis::Value>>(url, redis::cmd("PUBSUB").arg("NUMSUB").arg(ch))`.
pub async fn query<T: ::redis::FromRedisValue>(url: &str, cmd: &::redis::Cmd) -> T {
    let client = ::redis::Client::open(url).expect("a valid redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis");
    cmd.query_async(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("redis command failed: {e}"))
}
