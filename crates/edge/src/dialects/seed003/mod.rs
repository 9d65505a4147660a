//! Seed 003: Socket.IO v4 (Engine.IO v4) on `/socket.io/`, namespace
//! `/ws/app`, served from the hub's rooms and events.
//!
//! Transports: WebSocket, and HTTP long-polling with the `2probe`/`3probe`/`5`
//! upgrade. An Engine.IO session ([`engine::Engine`], one per `sid`) exists
//! from the handshake; the token arrives later, in the namespace CONNECT
//! packet (`auth: {token}`), and only then is a hub [`crate::session::Session`]
//! created and registered with the node. Polling sessions live on the node
//! that holds their `sid`: a load balancer needs sticky sessions for polling
//! (as Socket.IO itself requires); another node answers
//! `{"code":1,"message":"Session ID unknown"}` with HTTP 400.
//!
//! Every outbound packet is queued as a whole WebSocket text frame, rendered
//! once per event ([`render::SocketIoRenderer`]); the polling transport takes
//! the payloads back out (no copy) and joins them with `\x1e`.

mod engine;
mod packet;
mod polling;
mod presence;
mod render;
mod socket;
mod websocket;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use roomcast_auth::Verifier;
use serde::{Deserialize, Serialize};

use crate::config::{duration, Config, ConfigError};
use crate::dialect::Dialect;
use crate::http::Body;
use crate::node::Node;

use self::engine::Engine;

/// `[dialects.seed003]`: every number of the seed document, configurable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub enabled: bool,
    /// The Engine.IO path (a prefix: every path under it is served).
    pub path: String,
    /// The one Socket.IO namespace served; CONNECT to another gets CONNECT_ERROR.
    pub namespace: String,
    /// Tenant of tokens without a tenant claim (the seed has no tenants).
    pub tenant: String,
    /// Engine.IO `pingInterval`: the server pings this often.
    #[serde(with = "duration")]
    pub ping_interval: Duration,
    /// Engine.IO `pingTimeout`: a ping unanswered this long closes the session.
    #[serde(with = "duration")]
    pub ping_timeout: Duration,
    /// Engine.IO `maxPayload` (`SOCKET_MAX_PAYLOAD_BYTES`): the largest
    /// inbound WebSocket message or polling POST body.
    pub max_payload_bytes: usize,
    /// An Engine.IO session that has not connected the namespace by then is closed.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// Presence entries lapse this long after their last refresh (`PRESENCE_TTL_SECONDS`).
    #[serde(with = "duration")]
    pub presence_ttl: Duration,
    /// How often a socket's presence entry is refreshed (silently).
    #[serde(with = "duration")]
    pub presence_refresh: Duration,
    /// The namespace-wide room every socket joins (`namespace.emit`).
    pub broadcast_room: String,
    /// Event types delivered to sockets, as Socket.IO events of the same name.
    pub events: Vec<String>,
    /// Take the client's IP (presence `ip`) from the last `X-Forwarded-For`
    /// entry, the one the proxy in front of the node added. Only behind a
    /// load balancer that sets it: otherwise clients could claim any address.
    pub trust_forwarded_for: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            enabled: true,
            path: "/socket.io/".into(),
            namespace: "/ws/app".into(),
            tenant: "default".into(),
            ping_interval: Duration::from_secs(25),
            ping_timeout: Duration::from_secs(20),
            max_payload_bytes: 5120,
            connect_timeout: Duration::from_secs(45),
            presence_ttl: Duration::from_secs(60),
            presence_refresh: Duration::from_secs(20),
            broadcast_room: "ns:app".into(),
            events: [
                "notifications:new",
                "messages:new",
                "messages:updated",
                "messages:deleted",
                "presence:update",
                "error",
                "system:disconnect",
            ]
            .map(String::from)
            .to_vec(),
            trust_forwarded_for: false,
        }
    }
}

impl Settings {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: &str| Err(ConfigError(format!("dialects.seed003.{m}")));
        if !self.path.starts_with('/') || !self.path.ends_with('/') {
            return err("path must start and end with /");
        }
        if !self.namespace.starts_with('/') || self.namespace.contains(',') {
            return err("namespace must start with / and contain no comma");
        }
        if self.ping_interval.is_zero() || self.ping_timeout.is_zero() {
            return err("ping_interval and ping_timeout must be positive");
        }
        if self.max_payload_bytes < 64 {
            return err("max_payload_bytes must be at least 64");
        }
        if self.presence_refresh.is_zero() || self.presence_refresh >= self.presence_ttl {
            return err("presence_refresh must be positive and shorter than presence_ttl");
        }
        if self
            .broadcast_room
            .parse::<roomcast_protocol::RoomName>()
            .is_err()
        {
            return err("broadcast_room must be a room name (kind:id)");
        }
        if self.tenant.parse::<roomcast_protocol::TenantId>().is_err() {
            return err("tenant must be a valid tenant id");
        }
        Ok(())
    }
}

/// What every Engine.IO session of the dialect shares.
pub(crate) struct Shared {
    settings: Settings,
    broadcast_room: roomcast_protocol::RoomName,
    tenant: roomcast_protocol::TenantId,
    renderer: Arc<render::SocketIoRenderer>,
    verifier: Verifier,
    /// Engine.IO sessions of this node, by `sid`.
    engines: Mutex<HashMap<Arc<str>, Arc<Engine>>>,
}

impl Shared {
    fn engine(&self, sid: &str) -> Option<Arc<Engine>> {
        self.engines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(sid)
            .cloned()
    }

    fn insert(&self, engine: &Arc<Engine>) {
        self.engines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(engine.sid.clone(), engine.clone());
    }

    fn remove(&self, sid: &str) {
        self.engines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(sid);
    }
}

/// The dialect mounted on the node.
pub(crate) struct Seed003 {
    shared: Arc<Shared>,
}

impl Seed003 {
    pub(crate) fn new(
        settings: &Settings,
        config: &Config,
        slots: &mut super::Slots,
    ) -> Result<Self, ConfigError> {
        settings.validate()?;
        Ok(Self {
            shared: Arc::new(Shared {
                broadcast_room: settings
                    .broadcast_room
                    .parse()
                    .map_err(|_| ConfigError("dialects.seed003.broadcast_room".into()))?,
                tenant: settings
                    .tenant
                    .parse()
                    .map_err(|_| ConfigError("dialects.seed003.tenant".into()))?,
                renderer: Arc::new(render::SocketIoRenderer::new(
                    slots.allocate(),
                    &settings.namespace,
                    &settings.events,
                )),
                verifier: crate::auth::verifier_with_default_tenant(
                    config,
                    &settings.tenant,
                    "dialects.seed003",
                )?,
                settings: settings.clone(),
                engines: Mutex::default(),
            }),
        })
    }
}

/// Where the hub's presence sweep also announces a user whose last session
/// lapsed (a crashed node's): `presence.left` of a `user:` room goes to the
/// namespace-wide room too, and sockets there get the user's offline
/// `presence:update`, as they do when a user disconnects.
pub(crate) fn presence_left_rooms(config: &Config) -> Vec<(String, roomcast_protocol::RoomName)> {
    let s = &config.dialects.seed003;
    match s.broadcast_room.parse() {
        Ok(room) if s.enabled => vec![("user".to_owned(), room)],
        _ => Vec::new(),
    }
}

/// The query parameters Engine.IO reads.
#[derive(Debug, Default)]
struct Query<'a> {
    eio: Option<&'a str>,
    transport: Option<&'a str>,
    sid: Option<&'a str>,
}

fn query(uri: &http::Uri) -> Query<'_> {
    let mut q = Query::default();
    for pair in uri.query().unwrap_or("").split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "EIO" => q.eio = Some(v),
            "transport" => q.transport = Some(v),
            "sid" => q.sid = Some(v),
            _ => {}
        }
    }
    q
}

/// Engine.IO's error answer: HTTP 400 (or `status`) with `{code, message}`.
pub(crate) fn engine_error(status: StatusCode, code: u8, message: &str) -> Response<Body> {
    crate::http::json(
        status,
        &serde_json::json!({ "code": code, "message": message }),
    )
}

pub(crate) const UNKNOWN_TRANSPORT: (u8, &str) = (0, "Transport unknown");
pub(crate) const UNKNOWN_SID: (u8, &str) = (1, "Session ID unknown");
pub(crate) const BAD_METHOD: (u8, &str) = (2, "Bad handshake method");
pub(crate) const BAD_REQUEST: (u8, &str) = (3, "Bad request");
pub(crate) const BAD_VERSION: (u8, &str) = (5, "Unsupported protocol version");

fn bad((code, message): (u8, &str)) -> Response<Body> {
    engine_error(StatusCode::BAD_REQUEST, code, message)
}

/// Lets a page on another origin use the polling transport (the token
/// travels in the CONNECT packet, not in a cookie).
fn with_cors(req_origin: Option<&http::HeaderValue>, mut resp: Response<Body>) -> Response<Body> {
    if let Some(origin) = req_origin {
        let h = resp.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        h.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            http::HeaderValue::from_static("true"),
        );
    }
    resp
}

#[async_trait]
impl Dialect for Seed003 {
    fn name(&self) -> &'static str {
        "seed003"
    }

    fn paths(&self) -> Vec<String> {
        vec![self.shared.settings.path.clone()]
    }

    async fn handle(&self, node: &Arc<Node>, req: Request<Incoming>) -> Response<Body> {
        let origin = req.headers().get(header::ORIGIN).cloned();
        if req.method() == Method::OPTIONS {
            let resp = Response::builder()
                .status(StatusCode::NO_CONTENT)
                .header(header::ACCESS_CONTROL_ALLOW_METHODS, "GET, POST")
                .header(header::ACCESS_CONTROL_ALLOW_HEADERS, "content-type")
                .body(Full::new(Bytes::new()))
                .expect("static response parts are valid");
            return with_cors(origin.as_ref(), resp);
        }
        let q = query(req.uri());
        if q.eio != Some("4") {
            return with_cors(origin.as_ref(), bad(BAD_VERSION));
        }
        let sid = q.sid.map(str::to_owned);
        let resp = match (q.transport, req.method().clone()) {
            (Some("websocket"), Method::GET) => {
                websocket::handle(&self.shared, node, req, sid).await
            }
            (Some("polling"), Method::GET) => polling::get(&self.shared, node, req, sid).await,
            (Some("polling"), Method::POST) => polling::post(&self.shared, req, sid).await,
            (Some("websocket" | "polling"), _) => bad(BAD_METHOD),
            _ => bad(UNKNOWN_TRANSPORT),
        };
        with_cors(origin.as_ref(), resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_the_seed() {
        let s = Settings::default();
        s.validate().unwrap();
        assert_eq!(s.max_payload_bytes, 5 * 1024);
        assert_eq!(s.presence_ttl, Duration::from_secs(60));
        assert_eq!(s.ping_interval, Duration::from_secs(25));
        assert_eq!(s.ping_timeout, Duration::from_secs(20));
        let bad = Settings {
            presence_refresh: Duration::from_secs(90),
            ..Settings::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn reads_the_engine_io_query() {
        let uri: http::Uri = "/socket.io/?EIO=4&transport=polling&t=abc&sid=e_1"
            .parse()
            .unwrap();
        let q = query(&uri);
        assert_eq!(
            (q.eio, q.transport, q.sid),
            (Some("4"), Some("polling"), Some("e_1"))
        );
    }
}
