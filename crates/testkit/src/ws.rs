//! A native-protocol WebSocket client for tests (tokio-tungstenite): it
//! connects with a bearer token, reads the `welcome`, and has one helper per
//! protocol step, each failing fast when the node does not answer.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a client waits for something that should happen at once.
const PATIENCE: Duration = Duration::from_secs(5);

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The `welcome` frame (`Null` for a protobuf session).
    pub welcome: Value,
}

/// A refused upgrade: status and JSON body.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub body: Value,
}

impl Client {
    /// `ws://<addr>/v1/ws` with `Authorization: Bearer <token>`; panics if
    /// the upgrade is refused.
    pub async fn connect(addr: SocketAddr, token: &str) -> Client {
        let url = format!("ws://{addr}/v1/ws");
        match tokio::time::timeout(PATIENCE, Self::connect_url(&url, token, None)).await {
            Ok(Ok(c)) => c,
            Ok(Err(refused)) => panic!("upgrade refused: {refused:?}"),
            Err(_) => panic!("not connected within {PATIENCE:?}"),
        }
    }

    /// `url` with a bearer token and, if given, a subprotocol; a refusal is
    /// returned, not a panic. A protobuf session's welcome is left unread.
    pub async fn connect_url(
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

    /// Upgrades with `req` as it is.
    pub async fn connect_request(
        req: Request,
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

    /// The next message, skipping pings: data or a close frame. Panics when
    /// the socket ends without one.
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

    /// The next data message, skipping pings; `None` when the socket ended
    /// (close frame, EOF or reset).
    pub async fn next_message_or_end(&mut self, within: Duration) -> Option<Message> {
        loop {
            let m = tokio::time::timeout(within, self.ws.next())
                .await
                .expect("a message (or the end) in time");
            match m {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return None,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(m)) => return Some(m),
            }
        }
    }

    pub async fn next_json(&mut self) -> Value {
        match self.next_message().await {
            Message::Text(t) => serde_json::from_str(t.as_str()).expect("valid JSON"),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// Subscribes and returns the `subscribed` reply, whichever rooms it grants.
    pub async fn subscribe(&mut self, rooms: &[&str]) -> Value {
        self.send(json!({"op":"subscribe","ref":"s","rooms":rooms}))
            .await;
        let reply = self.next_json().await;
        assert_eq!(reply["op"], "subscribed", "{reply}");
        reply
    }

    /// Subscribes and checks that every room was granted.
    pub async fn subscribe_all(&mut self, rooms: &[&str]) -> Value {
        let reply = self.subscribe(rooms).await;
        assert_eq!(reply["rooms"], json!(rooms), "{reply}");
        reply
    }

    pub async fn unsubscribe(&mut self, rooms: &[&str]) {
        self.send(json!({"op":"unsubscribe","ref":"u","rooms":rooms}))
            .await;
        let reply = self.next_json().await;
        assert_eq!(reply["op"], "unsubscribed", "{reply}");
    }

    /// A protocol round trip: the session is alive and being served.
    pub async fn ping(&mut self) {
        self.send(json!({"op":"ping","ref":"p"})).await;
        let reply = self.next_json().await;
        assert_eq!(reply["op"], "pong", "{reply}");
    }

    /// The next frame, which must be an event.
    pub async fn next_event(&mut self) -> Value {
        let ev = self.next_json().await;
        assert_eq!(ev["op"], "event", "{ev}");
        ev
    }

    /// Every event up to (not including) the first of type `fence_type`.
    pub async fn events_until(&mut self, fence_type: &str) -> Vec<Value> {
        let mut before = Vec::new();
        loop {
            let ev = self.next_event().await;
            if ev["type"] == fence_type {
                return before;
            }
            before.push(ev);
        }
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

    /// Waits until the socket ends (without asserting how).
    pub async fn expect_end(&mut self) {
        if let Some(m) = self.next_message_or_end(PATIENCE).await {
            panic!("expected the socket to end, got {m:?}");
        }
    }
}
