//! Fixtures for the edge tests: a real node on 127.0.0.1:0, real WebSocket
//! clients (tokio-tungstenite), real HTTP publishes over TCP.
#![allow(dead_code, unreachable_pub)] // each test binary uses a subset

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use roomcast_auth::{mint_hs256, Expiry, MintClaims};
use roomcast_edge::{Config, Node};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

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
        Client::connect(&self.ws_url(), token, None)
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

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub welcome: Value,
}

/// A refused upgrade: status and JSON body.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub body: Value,
}

impl Client {
    pub async fn connect(
        url: &str,
        token: &str,
        subprotocol: Option<&str>,
    ) -> Result<Client, Refused> {
        let mut req = url.into_client_request().unwrap();
        req.headers_mut()
            .insert("Authorization", format!("Bearer {token}").parse().unwrap());
        if let Some(p) = subprotocol {
            req.headers_mut()
                .insert("Sec-WebSocket-Protocol", p.parse().unwrap());
        }
        Self::connect_request(req, subprotocol != Some("roomcast.v1.proto")).await
    }

    pub async fn connect_request(
        req: tokio_tungstenite::tungstenite::handshake::client::Request,
        expect_json_welcome: bool,
    ) -> Result<Client, Refused> {
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, _)) => {
                let mut c = Client {
                    ws,
                    welcome: Value::Null,
                };
                if expect_json_welcome {
                    c.welcome = c.next_json().await;
                    assert_eq!(
                        c.welcome["op"], "welcome",
                        "first frame is welcome: {}",
                        c.welcome
                    );
                }
                Ok(c)
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let status = resp.status().as_u16();
                let body = resp
                    .body()
                    .as_ref()
                    .and_then(|b| serde_json::from_slice(b).ok())
                    .unwrap_or(Value::Null);
                Err(Refused { status, body })
            }
            Err(e) => panic!("unexpected connect error: {e}"),
        }
    }

    pub async fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.unwrap();
    }

    pub async fn send_raw(&mut self, m: Message) {
        self.ws.send(m).await.unwrap();
    }

    /// The next data message, skipping pings.
    pub async fn next_message(&mut self) -> Message {
        loop {
            let m = tokio::time::timeout(PATIENCE, self.ws.next())
                .await
                .expect("a message in time")
                .expect("stream open")
                .expect("no socket error");
            match m {
                Message::Ping(_) | Message::Pong(_) => continue,
                m => return m,
            }
        }
    }

    pub async fn next_json(&mut self) -> Value {
        match self.next_message().await {
            Message::Text(t) => serde_json::from_str(t.as_str()).expect("valid JSON"),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// Subscribes and returns the `subscribed` reply.
    pub async fn subscribe(&mut self, rooms: &[&str]) -> Value {
        self.send(serde_json::json!({"op":"subscribe","ref":"s","rooms":rooms}))
            .await;
        let reply = self.next_json().await;
        assert_eq!(reply["op"], "subscribed", "{reply}");
        reply
    }

    /// Waits for the close frame and returns its code and reason.
    pub async fn expect_close(&mut self) -> (u16, String) {
        loop {
            match tokio::time::timeout(PATIENCE, self.ws.next())
                .await
                .expect("close in time")
            {
                Some(Ok(Message::Close(Some(f)))) => {
                    return (u16::from(f.code), f.reason.to_string())
                }
                Some(Ok(Message::Close(None))) => return (1005, String::new()),
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("socket error before close frame: {e}"),
                None => panic!("stream ended without a close frame"),
            }
        }
    }
}

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
