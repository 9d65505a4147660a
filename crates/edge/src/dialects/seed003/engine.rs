//! One Engine.IO session (`sid`): its queue, its transport state, its
//! timers (Engine.IO ping/pong, connect timeout, token expiry, presence
//! refresh) and, once the namespace is connected, its hub session.
//!
//! Two queues feed the transport, both holding whole WebSocket text frames:
//! the engine's own (handshake, pings, noops, anything before the namespace
//! CONNECT) and the hub session's outbox (the CONNECT answer, acks and
//! every event, in order). Exactly one consumer drains them at a time: the
//! pending polling GET, or the WebSocket writer.
//!
//! The engine's queue is the outbox of a "lobby" session: an unauthenticated
//! placeholder that joins no room and is registered with the node until the
//! namespace connects, so a drain (or the node's sweep of its sessions)
//! closes a session that has not authenticated yet too.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::packet::{self, EnginePacket};
use super::socket::Socket;
use super::Shared;
use crate::disconnect::Disconnect;
use crate::node::{ConnectionSlot, Node};
use crate::outbox::{Next, Outbox};
use crate::ratelimit::{RateLimiter, Verdict};
use crate::session::Session;

/// No pong within `pingTimeout`.
pub(crate) const PING_TIMEOUT: Disconnect = Disconnect {
    code: 4000,
    reason: "ping timeout",
    reconnect: true,
    label: "ping_timeout",
};

/// The namespace was not connected within `connect_timeout`.
pub(crate) const CONNECT_TIMEOUT: Disconnect = Disconnect {
    code: 4000,
    reason: "namespace not connected in time",
    reconnect: true,
    label: "connect_timeout",
};

/// Who the client is, from the handshake request (for presence).
#[derive(Debug, Clone, Default)]
pub(crate) struct ClientInfo {
    pub(crate) user_agent: Option<String>,
    /// The TCP peer's address, or with `trust_forwarded_for` the last
    /// `X-Forwarded-For` entry (the address the proxy saw).
    pub(crate) ip: Option<String>,
}

impl ClientInfo {
    pub(crate) fn of<B>(req: &http::Request<B>, trust_forwarded_for: bool) -> Self {
        let h = req.headers();
        let forwarded = trust_forwarded_for.then(|| forwarded_for(h)).flatten();
        let peer = req
            .extensions()
            .get::<crate::http::PeerAddr>()
            .map(|p| p.0.ip());
        Self {
            user_agent: h
                .get(http::header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map(|s| s.chars().take(256).collect()),
            ip: forwarded.or(peer).map(|ip| ip.to_canonical().to_string()),
        }
    }
}

/// The last address of the last `X-Forwarded-For` header: the one the proxy
/// in front of the node appended (earlier ones are the client's word).
/// Entries may carry a port (`1.2.3.4:5678`, `[2001:db8::1]:443`).
fn forwarded_for(h: &http::HeaderMap) -> Option<std::net::IpAddr> {
    let last = h.get_all("x-forwarded-for").iter().next_back()?;
    let entry = last.to_str().ok()?.rsplit(',').next()?.trim();
    entry
        .parse::<std::net::IpAddr>()
        .ok()
        .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
}

/// Timers that depend on the Socket.IO state.
#[derive(Default)]
struct SocketTimers {
    connected: bool,
    token_expires: Option<Instant>,
}

pub(crate) struct Engine {
    pub(crate) sid: Arc<str>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) node: Arc<Node>,
    pub(crate) client: ClientInfo,
    /// The placeholder session whose outbox is the engine's queue.
    lobby: Arc<Session>,
    hub: Mutex<Option<Arc<Session>>>,
    hub_set: Notify,
    /// The transport is the WebSocket (from the start or since the upgrade).
    websocket: AtomicBool,
    /// A polling GET is waiting for packets.
    polling: AtomicBool,
    pong: Notify,
    reason: Mutex<Option<Disconnect>>,
    done: watch::Sender<bool>,
    limiter: Mutex<RateLimiter>,
    timers: Mutex<SocketTimers>,
    /// The Socket.IO state; inbound packets are handled one at a time.
    pub(crate) socket: tokio::sync::Mutex<Socket>,
}

impl Engine {
    /// A new session on `websocket` or polling: queues the open packet,
    /// registers the sid and starts the session's timers, which own `slot`.
    pub(crate) fn create(
        shared: &Arc<Shared>,
        node: &Arc<Node>,
        slot: ConnectionSlot,
        websocket: bool,
        client: ClientInfo,
    ) -> Arc<Engine> {
        let limits = &node.config().limits;
        let sid = crate::ids::random_id("e");
        let lobby = Arc::new(Session::new(
            crate::ids::random_id("s")
                .parse()
                .expect("generated ids are valid"),
            sid.parse().expect("generated ids are valid user ids"),
            shared.tenant.clone(),
            Box::new([]),
            shared.renderer.clone(),
            Outbox::new(limits.outbound_queue_frames, limits.outbound_queue_bytes),
        ));
        node.register(&lobby);
        let engine = Arc::new(Engine {
            sid: sid.into(),
            shared: shared.clone(),
            node: node.clone(),
            client,
            lobby: lobby.clone(),
            hub: Mutex::new(None),
            hub_set: Notify::new(),
            websocket: AtomicBool::new(websocket),
            polling: AtomicBool::new(false),
            pong: Notify::new(),
            reason: Mutex::new(None),
            done: watch::Sender::new(false),
            limiter: Mutex::new(RateLimiter::new(
                limits.rate_messages,
                limits.rate_window,
                limits.rate_strikes,
            )),
            timers: Mutex::default(),
            socket: tokio::sync::Mutex::new(Socket::Waiting),
        });
        let s = &shared.settings;
        let open = serde_json::json!({
            "sid": &*engine.sid,
            "upgrades": if websocket { vec![] } else { vec!["websocket"] },
            "pingInterval": s.ping_interval.as_millis() as u64,
            "pingTimeout": s.ping_timeout.as_millis() as u64,
            "maxPayload": s.max_payload_bytes,
        });
        engine.push_engine(packet::frame(&format!("0{open}")));
        shared.insert(&engine);
        let transport = if websocket {
            "socketio_ws"
        } else {
            "socketio_polling"
        };
        metrics::counter!("roomcast_connections_total", "transport" => transport).increment(1);
        tokio::spawn(engine.clone().drive(slot));
        engine
    }

    pub(crate) fn is_websocket(&self) -> bool {
        self.websocket.load(Ordering::Acquire)
    }

    /// Switches to the WebSocket transport (the upgrade's `5`).
    pub(crate) fn upgraded(&self) {
        self.websocket.store(true, Ordering::Release);
    }

    pub(crate) fn is_closed(&self) -> bool {
        *self.done.borrow()
    }

    /// A receiver that turns true once the session is closing.
    pub(crate) fn done(&self) -> watch::Receiver<bool> {
        self.done.subscribe()
    }

    /// Claims the polling consumer slot; `None` while another GET waits.
    pub(crate) fn claim_poll(self: &Arc<Self>) -> Option<PollClaim> {
        (!self.polling.swap(true, Ordering::AcqRel)).then(|| PollClaim(self.clone()))
    }

    /// Queues an Engine-level packet (ping, noop, handshake).
    pub(crate) fn push_engine(&self, frame: Bytes) {
        let _ = self.lobby.outbox.push(frame);
    }

    /// Queues a Socket.IO packet behind what the namespace already queued.
    pub(crate) fn push_socket(&self, text: &str) {
        let frame = packet::frame(text);
        match self.hub() {
            Some(session) => {
                let _ = session.outbox.push(frame);
            }
            None => self.push_engine(frame),
        }
    }

    pub(crate) fn hub(&self) -> Option<Arc<Session>> {
        self.hub.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Attaches the hub session once the namespace is connected.
    pub(crate) fn set_hub(&self, session: Arc<Session>, token_expires: Instant) {
        *self.hub.lock().unwrap_or_else(|p| p.into_inner()) = Some(session);
        // From now on the hub session stands for this client at the node.
        self.node.unregister(&self.lobby.id);
        *self.timers.lock().unwrap_or_else(|p| p.into_inner()) = SocketTimers {
            connected: true,
            token_expires: Some(token_expires),
        };
        self.hub_set.notify_one();
    }

    /// Closes the session: the transport flushes what is queued (unless the
    /// client is gone), then ends. The first reason wins.
    pub(crate) fn close(&self, disconnect: Disconnect) {
        {
            let mut reason = self.reason.lock().unwrap_or_else(|p| p.into_inner());
            if reason.is_some() {
                return;
            }
            *reason = Some(disconnect);
        }
        let flush = disconnect != Disconnect::CLIENT_GONE;
        match self.hub() {
            Some(session) => session.outbox.close(disconnect, flush),
            None => self.lobby.outbox.close(disconnect, flush),
        }
        self.done.send_replace(true);
    }

    /// The next frames to write, or the close to perform.
    pub(crate) async fn next_batch(&self) -> Next {
        loop {
            let hub = self.hub();
            let from_hub = async {
                match &hub {
                    Some(s) => s.outbox.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                next = self.lobby.outbox.next() => return next,
                next = from_hub => return next,
                _ = self.hub_set.notified() => continue,
            }
        }
    }

    /// One inbound Engine.IO packet (a WebSocket text frame or one record of
    /// a polling POST).
    pub(crate) async fn on_text(self: &Arc<Self>, text: &str) {
        let packet = match packet::parse_engine(text) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(sid = %self.sid, error = %e, "engine.io parse error");
                return self.close(Disconnect::PROTOCOL_ERROR);
            }
        };
        match packet {
            EnginePacket::Pong(_) => self.pong.notify_one(),
            EnginePacket::Ping(data) => self.push_engine(packet::frame(&format!("3{data}"))),
            EnginePacket::Close => self.close(Disconnect::CLIENT_CLOSED),
            EnginePacket::Upgrade | EnginePacket::Noop => {}
            EnginePacket::Message(m) => {
                let verdict = self
                    .limiter
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .check(Instant::now());
                match verdict {
                    Verdict::Allow => self.socket.lock().await.on_message(self, m).await,
                    Verdict::Reject { first_in_window } => {
                        if first_in_window {
                            self.socket.lock().await.rate_limited(self);
                        }
                    }
                    Verdict::Disconnect => self.close(Disconnect::RATE_LIMIT),
                }
            }
        }
    }

    /// The session's timers, until it closes; then the cleanup, once.
    async fn drive(self: Arc<Self>, slot: ConnectionSlot) {
        let s = &self.shared.settings;
        let far = || Instant::now() + Duration::from_secs(365 * 24 * 3600);
        let mut done = self.done();
        let mut next_ping = Instant::now() + s.ping_interval;
        let mut pong_deadline: Option<Instant> = None;
        let connect_deadline = Instant::now() + s.connect_timeout;
        let mut refresh = Instant::now() + s.presence_refresh;
        loop {
            let (connected, expires) = {
                let t = self.timers.lock().unwrap_or_else(|p| p.into_inner());
                (t.connected, t.token_expires)
            };
            tokio::select! {
                _ = closing(&mut done) => break,
                _ = self.pong.notified() => {
                    pong_deadline = None;
                    next_ping = Instant::now() + s.ping_interval;
                }
                _ = tokio::time::sleep_until(pong_deadline.unwrap_or_else(far)) => {
                    self.close(PING_TIMEOUT);
                }
                _ = tokio::time::sleep_until(next_ping), if pong_deadline.is_none() => {
                    self.push_engine(packet::frame("2"));
                    pong_deadline = Some(Instant::now() + s.ping_timeout);
                }
                _ = tokio::time::sleep_until(connect_deadline), if !connected => {
                    self.close(CONNECT_TIMEOUT);
                }
                _ = tokio::time::sleep_until(expires.unwrap_or_else(far)), if connected => {
                    self.socket.lock().await.token_expired(&self);
                }
                _ = tokio::time::sleep_until(refresh), if connected => {
                    refresh = Instant::now() + s.presence_refresh;
                    self.socket.lock().await.refresh_presence(&self, false).await;
                }
            }
        }
        self.shared.remove(&self.sid);
        self.node.unregister(&self.lobby.id);
        self.socket.lock().await.closed(&self).await;
        let reason = self
            .reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or(Disconnect::CLIENT_GONE);
        metrics::counter!("roomcast_disconnects_total", "reason" => reason.label).increment(1);
        tracing::debug!(sid = %self.sid, reason = reason.label, "socket.io session closed");
        drop(slot);
    }
}

/// Resolves once the session is closing.
pub(crate) async fn closing(done: &mut watch::Receiver<bool>) {
    let _ = done.wait_for(|d| *d).await;
}

/// The one waiting polling GET; released when dropped (also when the
/// request is abandoned).
pub(crate) struct PollClaim(Arc<Engine>);

impl Drop for PollClaim {
    fn drop(&mut self) {
        self.0.polling.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(forwarded: &[&str]) -> http::Request<()> {
        let mut req = http::Request::builder().header(http::header::USER_AGENT, "ua");
        for f in forwarded {
            req = req.header("x-forwarded-for", *f);
        }
        let mut req = req.body(()).unwrap();
        req.extensions_mut().insert(crate::http::PeerAddr(
            "[::ffff:127.0.0.1]:4000".parse().unwrap(),
        ));
        req
    }

    #[test]
    fn client_ip_is_the_peer_unless_forwarded_for_is_trusted() {
        let peer = |r: &http::Request<()>, trust| ClientInfo::of(r, trust).ip;
        let plain = request(&[]);
        assert_eq!(peer(&plain, false).as_deref(), Some("127.0.0.1"));
        assert_eq!(peer(&plain, true).as_deref(), Some("127.0.0.1"));
        let forwarded = request(&["6.6.6.6", "203.0.113.9, 198.51.100.7:5678"]);
        assert_eq!(peer(&forwarded, false).as_deref(), Some("127.0.0.1"));
        assert_eq!(peer(&forwarded, true).as_deref(), Some("198.51.100.7"));
        let v6 = request(&["[2001:db8::1]:443"]);
        assert_eq!(peer(&v6, true).as_deref(), Some("2001:db8::1"));
        let junk = request(&["unknown"]);
        assert_eq!(peer(&junk, true).as_deref(), Some("127.0.0.1"));
        assert_eq!(
            ClientInfo::of(&plain, false).user_agent.as_deref(),
            Some("ua")
        );
    }
}
