//! Seed 000 (`shared/seeds/000_*.txt`), a transport-agnostic board protocol:
//! a WebSocket on `/api/realtime` authenticated by a cookie token, with
//! `{"action":"subscribe","channels":[...]}`, and the same events over SSE
//! (`GET /api/events`, `Accept: text/event-stream`) and polling
//! (`GET /api/events?since=<ISO-8601>`), all in the envelope
//! `{"type","timestamp","payload"}`. Channels and their rules: [`channel`].
//! docs/dialects.md has the publisher mapping.

mod channel;
mod connection;
mod envelope;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use hyper::body::Incoming;
use roomcast_auth::{Identity, Verifier};
use roomcast_protocol::{EventId, RoomName};
use serde::{Deserialize, Serialize};

use self::channel::Channel;
use self::envelope::ErrorCode;
use crate::config::{duration, Config, ConfigError};
use crate::dialect::{Accepted, Dialect, Refusal};
use crate::dialects::Slots;
use crate::http::Body;
use crate::node::Node;
use crate::session::Renderer;

/// `[dialects.seed000]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub enabled: bool,
    /// The WebSocket endpoint.
    pub ws_path: String,
    /// SSE (`Accept: text/event-stream`) and polling (`?since=`) endpoint.
    pub events_path: String,
    /// The cookie carrying the token (a JWT verified with the node's key;
    /// `Authorization: Bearer` and `?token=` are accepted too).
    pub cookie_name: String,
    /// Tenant of tokens without a tenant claim (the seed has no tenants).
    pub default_tenant: String,
    /// Role that may read `board:readonly`.
    pub stakeholder_role: String,
    /// Roles that may read `board:zoo`; empty: every authenticated user.
    pub board_roles: Vec<String>,
    /// Role that may read every `worker:<id>` channel, not only its own.
    pub worker_admin_role: String,
    /// Answer `subscribe`/`unsubscribe` with a `subscribed`/`unsubscribed`
    /// envelope (the seed defines no acknowledgement; clients ignore types
    /// they do not know).
    pub ack_subscriptions: bool,
    /// Interval of SSE heartbeat comments.
    #[serde(with = "duration")]
    pub sse_heartbeat: Duration,
    /// How long a poll with nothing new waits for a live event; 0 answers
    /// at once (the seed's periodic polling).
    #[serde(with = "duration")]
    pub poll_wait: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            enabled: true,
            ws_path: "/api/realtime".into(),
            events_path: "/api/events".into(),
            cookie_name: "token".into(),
            default_tenant: "default".into(),
            stakeholder_role: "stakeholder".into(),
            board_roles: Vec::new(),
            worker_admin_role: "admin".into(),
            ack_subscriptions: true,
            sse_heartbeat: Duration::from_secs(15),
            poll_wait: Duration::ZERO,
        }
    }
}

/// The seed 000 dialect.
pub(crate) struct Seed000 {
    settings: Arc<Settings>,
    verifier: Verifier,
    ws: Arc<dyn Renderer>,
    sse: Arc<dyn Renderer>,
    poll: Arc<dyn Renderer>,
}

impl Seed000 {
    pub(crate) fn new(config: &Config, slots: &mut Slots) -> Result<Self, ConfigError> {
        let settings = config.dialects.seed000.clone();
        let verifier = crate::auth::verifier_with_default_tenant(
            config,
            &settings.default_tenant,
            "dialects.seed000",
        )?;
        Ok(Self {
            settings: Arc::new(settings),
            verifier,
            ws: Arc::new(WsRenderer(slots.allocate())),
            sse: Arc::new(crate::sse::SseRenderer::new(slots.allocate(), |e, _| {
                envelope::event(e)
            })),
            poll: Arc::new(crate::poll::ItemRenderer::new(slots.allocate(), |e, _| {
                envelope::event(e)
            })),
        })
    }

    fn authenticate(&self, node: &Node, parts: &http::request::Parts) -> Result<Identity, Refusal> {
        let _ = node;
        let token = roomcast_auth::token_from_request(parts, Some(&self.settings.cookie_name));
        match token.as_deref().map(|t| self.verifier.verify(t)) {
            Some(Ok(identity)) => Ok(identity),
            Some(Err(e)) => Err(Refusal::unauthenticated(&e)),
            None => Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                roomcast_protocol::native::ErrorCode::AuthenticationFailed,
                format!("no token: send the {} cookie", self.settings.cookie_name),
                "missing_token",
            )),
        }
    }

    /// Identity and rooms of an SSE or poll request: the `channels` query
    /// parameter (comma-separated) when given, else the token's implied
    /// channels; every channel must be valid and allowed.
    fn events_request(
        &self,
        node: &Node,
        parts: &http::request::Parts,
    ) -> Result<(Identity, Vec<RoomName>), Box<Response<Body>>> {
        let identity = self.authenticate(node, parts).map_err(|r| {
            metrics::counter!("roomcast_auth_failures_total", "reason" => r.reason).increment(1);
            boxed_error(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthenticated,
                &r.message,
                None,
            )
        })?;
        let names: Vec<String> = match crate::http::query_param(parts.uri.query(), "channels")
            .filter(|c| !c.is_empty())
        {
            Some(list) => list
                .split(',')
                .map(|c| c.trim().to_owned())
                .filter(|c| !c.is_empty())
                .collect(),
            None => Channel::implied(&self.settings, &identity),
        };
        let mut rooms = Vec::new();
        for name in &names {
            let Some(channel) = Channel::parse(name) else {
                return Err(boxed_error(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::InvalidChannel,
                    "channels are worker:<id>, board:zoo and board:readonly",
                    Some(name),
                ));
            };
            if !channel.allowed(&self.settings, &identity) {
                return Err(boxed_error(
                    StatusCode::FORBIDDEN,
                    ErrorCode::Forbidden,
                    "this session may not read this channel",
                    Some(name),
                ));
            }
            let room = channel.room();
            if !rooms.contains(&room) {
                rooms.push(room);
            }
        }
        let max = node.config().limits.max_rooms_per_session;
        if rooms.is_empty() || rooms.len() > max {
            return Err(boxed_error(
                StatusCode::BAD_REQUEST,
                ErrorCode::SubscriptionLimit,
                &format!("name between 1 and {max} channels"),
                None,
            ));
        }
        Ok((identity, rooms))
    }

    /// `since=<ISO-8601>` as the history position `<ms>-0`.
    fn since(parts: &http::request::Parts) -> Result<Option<EventId>, Box<Response<Body>>> {
        match crate::http::query_param(parts.uri.query(), "since")
            .as_deref()
            .map(str::trim)
        {
            None | Some("") => Ok(None),
            Some(s) => envelope::parse_iso(s)
                .map(|ms| Some(EventId::new(ms, 0)))
                .ok_or_else(|| {
                    boxed_error(
                        StatusCode::BAD_REQUEST,
                        ErrorCode::BadMessage,
                        "`since` must be an ISO-8601 date-time",
                        None,
                    )
                }),
        }
    }

    async fn events(&self, node: &Arc<Node>, req: Request<Incoming>) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let (identity, rooms) = match self.events_request(node, &parts) {
            Ok(r) => r,
            Err(response) => return *response,
        };
        let wants_stream = parts
            .headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains("text/event-stream"));
        let limits = node.config().limits.clone();
        if wants_stream {
            // EventSource resumes with Last-Event-ID; `since` works too.
            let since = match crate::sse::last_event_id(&parts) {
                Ok(Some(id)) => Some(id),
                Ok(None) => match Self::since(&parts) {
                    Ok(s) => s,
                    Err(response) => return *response,
                },
                Err(_) => {
                    return error_response(
                        StatusCode::BAD_REQUEST,
                        ErrorCode::BadMessage,
                        "Last-Event-ID must be an event id <ms>-<seq>",
                        None,
                    )
                }
            };
            let accepted = crate::sse::SseAccepted {
                identity,
                renderer: self.sse.clone(),
                rooms,
                since,
                heartbeat: self.settings.sse_heartbeat,
                limits,
                transport: "sse",
                opening: None,
            };
            let req = Request::from_parts(parts, body);
            return crate::sse::serve(node.clone(), req, |_| async { Ok(accepted) }).await;
        }
        let since = match Self::since(&parts) {
            Ok(s) => s,
            Err(response) => return *response,
        };
        let accepted = crate::poll::PollAccepted {
            identity,
            renderer: self.poll.clone(),
            rooms,
            since,
            wait: self.settings.poll_wait,
            limits,
        };
        let req = Request::from_parts(parts, body);
        crate::poll::serve(node.clone(), req, |_| async { Ok(accepted) }).await
    }
}

#[async_trait]
impl Dialect for Seed000 {
    fn name(&self) -> &'static str {
        "seed000"
    }

    fn paths(&self) -> Vec<String> {
        vec![
            self.settings.ws_path.clone(),
            self.settings.events_path.clone(),
        ]
    }

    async fn handle(&self, node: &Arc<Node>, req: Request<Incoming>) -> Response<Body> {
        if req.method() != http::Method::GET {
            return error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::BadMessage,
                "method not allowed",
                None,
            );
        }
        if req.uri().path() == self.settings.events_path {
            return self.events(node, req).await;
        }
        crate::ws::upgrade(node.clone(), req, |parts| async move {
            let identity = self.authenticate(node, &parts)?;
            Ok(Accepted {
                identity,
                renderer: self.ws.clone(),
                subprotocol: None,
                connection: Box::new(connection::Seed000Connection {
                    settings: self.settings.clone(),
                    channels: Vec::new(),
                }),
                limits: node.config().limits.clone(),
                guard: None,
                transport: "ws",
            })
        })
        .await
    }
}

/// Events as whole WebSocket text frames.
struct WsRenderer(usize);

impl Renderer for WsRenderer {
    fn slot(&self) -> usize {
        self.0
    }

    fn render(&self, event: &roomcast_protocol::Event, _room: &RoomName) -> Option<Bytes> {
        let text = envelope::event(event)?;
        Some(crate::frame::ws_frame(crate::frame::OP_TEXT, &text))
    }
}

/// An HTTP error whose body is the `error` envelope.
fn error_response(
    status: StatusCode,
    code: ErrorCode,
    message: &str,
    channel: Option<&str>,
) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(envelope::error(code, message, channel)))
        .expect("static response parts are valid")
}

/// [`error_response`], boxed for `Err` variants.
fn boxed_error(
    status: StatusCode,
    code: ErrorCode,
    message: &str,
    channel: Option<&str>,
) -> Box<Response<Body>> {
    Box::new(error_response(status, code, message, channel))
}
