//! Fixtures for the edge tests: a real node on 127.0.0.1:0, real WebSocket
//! clients (tokio-tungstenite), real HTTP publishes over TCP.
#![allow(dead_code, unreachable_pub)] // each test binary uses a subset

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use roomcast_auth::{mint_hs256, Expiry, MintClaims};
use roomcast_edge::{Config, Node};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

pub const SECRET: &str = "test-secret-0123456789";
pub const API_KEY: &str = "test-api-key-0123456789";
/// How long a test waits for something that should happen at once.
pub const PATIENCE: Duration = Duration::from_secs(5);

pub struct TestNode {
    pub addr: SocketAddr,
    pub node: Arc<Node>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

pub fn config() -> Config {
    let mut c = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    };
    c.auth.jwt_secret = Some(SECRET.into());
    c.publish.api_keys = vec![API_KEY.into()];
    c.unsubscribe_delay = Duration::ZERO;
    c.drain_window = Duration::from_millis(200);
    c
}

impl TestNode {
    pub async fn start(config: Config) -> TestNode {
        let node = Node::with_memory_broker(config).await.expect("node builds");
        Self::serve(node).await
    }

    pub async fn serve(node: Arc<Node>) -> TestNode {
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

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    pub async fn connect(&self, token: &str) -> Client {
        Client::connect_url(&self.ws_url(), token, None)
            .await
            .expect("connects")
    }

    pub async fn publish(&self, body: Value) -> (u16, Value) {
        http_post(self.addr, "/v1/publish", Some(API_KEY), &body.to_string()).await
    }
}

pub fn token(sub: &str, tenant: &str, teams: &[&str]) -> String {
    let mut c = MintClaims::new(sub, tenant);
    c.teams = teams.iter().map(|t| t.to_string()).collect();
    mint_hs256(SECRET.as_bytes(), &c)
}

pub fn token_with(f: impl FnOnce(&mut MintClaims)) -> String {
    let mut c = MintClaims::new("u1", "acme");
    f(&mut c);
    mint_hs256(SECRET.as_bytes(), &c)
}

pub fn expiring_in(secs: u64) -> Expiry {
    Expiry::In(Duration::from_secs(secs))
}

/// A plain HTTP/1.1 request over a fresh TCP connection.
#[allow(unused_imports)] // each test binary uses its own subset
pub use roomcast_testkit::{http_post, http_request};

#[allow(unused_imports)] // each test binary uses its own subset
pub use roomcast_testkit::{Client, Refused};

pub fn close_code(c: CloseCode) -> u16 {
    u16::from(c)
}

/// Polls `check` until it holds, failing after [`PATIENCE`]. For state that
/// has no event to await (a counter inside the server).
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {PATIENCE:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The value of one series in a Prometheus text page (0 when absent).
pub fn metric_value(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(0.0)
}
