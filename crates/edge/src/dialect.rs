//! The dialect seam: how one wire protocol maps onto the same rooms and
//! events. A dialect owns some HTTP paths and decides, for each request, where
//! the credential comes from, how inbound frames become commands, which rooms
//! a subscription means, how an event is rendered (through its renderers, once
//! per event) and its own policies (limits, heartbeats, coalescing). The hub,
//! the broker and the contract never change per dialect.
//!
//! WebSocket dialects hand [`crate::ws::upgrade`] an [`Accepted`] and then see
//! their session through a [`Connection`] driven by the shared transport loop.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use roomcast_auth::Identity;
use roomcast_protocol::native::ErrorCode;
use roomcast_protocol::RoomName;
use tokio::time::Instant;

use crate::config::Limits;
use crate::disconnect::Disconnect;
use crate::http::{json_error, Body};
use crate::hub::Joined;
use crate::node::Node;
use crate::session::{Renderer, Session};

/// A wire protocol served by the node.
#[async_trait]
pub trait Dialect: Send + Sync + 'static {
    /// Short name for logs and metric labels (`native`, `seed002`, ...).
    fn name(&self) -> &'static str;

    /// Paths it serves. A path ending in `/` matches every path under it.
    fn paths(&self) -> Vec<String>;

    /// Handles one request on one of its paths.
    async fn handle(&self, node: &Arc<Node>, req: Request<Incoming>) -> Response<Body>;
}

/// A refused request: the HTTP answer sent instead of an upgrade.
#[derive(Debug)]
pub struct Refusal {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    /// Label for `roomcast_rejected_connections_total` / auth failure metrics.
    pub reason: &'static str,
}

impl Refusal {
    pub fn new(
        status: StatusCode,
        code: ErrorCode,
        message: impl Into<String>,
        reason: &'static str,
    ) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            reason,
        }
    }

    /// 401 for a credential that did not verify.
    pub fn unauthenticated(failure: &roomcast_auth::AuthFailure) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::AuthenticationFailed,
            failure.to_string(),
            failure.reason(),
        )
    }

    pub fn into_response(self) -> Response<Body> {
        if self.status == StatusCode::UNAUTHORIZED {
            metrics::counter!("roomcast_auth_failures_total", "reason" => self.reason).increment(1);
        } else {
            metrics::counter!("roomcast_rejected_connections_total", "reason" => self.reason)
                .increment(1);
        }
        json_error(self.status, self.code, &self.message)
    }
}

/// What a WebSocket dialect decided before the upgrade.
pub struct Accepted {
    pub identity: Identity,
    /// How events are rendered for this session.
    pub renderer: Arc<dyn Renderer>,
    /// The `Sec-WebSocket-Protocol` to answer with, if any.
    pub subprotocol: Option<&'static str>,
    /// The session's protocol state machine.
    pub connection: Box<dyn Connection>,
    /// Limits for this session (the node's, or the dialect's own).
    pub limits: Limits,
    /// Kept alive for the session's lifetime (e.g. a per-dialect connection slot).
    pub guard: Option<Box<dyn Send + Sync>>,
    /// Transport label for metrics.
    pub transport: &'static str,
}

/// One inbound message, reassembled from its frames.
#[derive(Debug, Clone, Copy)]
pub struct Inbound<'a> {
    pub binary: bool,
    pub payload: &'a [u8],
}

/// A session's protocol state machine, driven by the transport loop.
#[async_trait]
pub trait Connection: Send + 'static {
    /// Right after the upgrade (welcome frames, automatic rooms).
    async fn opened(&mut self, _ctx: &SessionCtx) -> Result<(), Disconnect> {
        Ok(())
    }

    /// One complete inbound message that passed the size and rate limits.
    async fn message(&mut self, ctx: &SessionCtx, msg: Inbound<'_>) -> Result<(), Disconnect>;

    /// A message refused by the rate limit (once per window); dialects answer
    /// with their own error frame.
    fn rate_limited(&mut self, _ctx: &SessionCtx) {}

    /// An inbound message over the size limit, before the socket closes 1009.
    fn too_large(&mut self, _ctx: &SessionCtx) {}

    /// The next moment a dialect timer is due (application pings,
    /// session re-validation), if any.
    fn deadline(&self) -> Option<Instant> {
        None
    }

    /// Called when [`Connection::deadline`] passes.
    async fn on_deadline(&mut self, _ctx: &SessionCtx) -> Result<(), Disconnect> {
        Ok(())
    }

    /// After the socket closed, before the session leaves its rooms.
    async fn closed(&mut self, _ctx: &SessionCtx) {}
}

/// What a connection's handlers can reach: the node, the session and who it is.
pub struct SessionCtx {
    pub node: Arc<Node>,
    pub session: Arc<Session>,
    pub identity: Identity,
}

/// Why a join was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinError {
    /// The session holds as many rooms as its limit allows.
    Limit,
    /// The broker could not subscribe the room.
    Broker,
}

impl JoinError {
    pub fn code(self) -> ErrorCode {
        match self {
            JoinError::Limit => ErrorCode::SubscriptionLimit,
            JoinError::Broker => ErrorCode::InternalError,
        }
    }
}

impl SessionCtx {
    /// Queues a ready-made frame (whole WebSocket frame for WS sessions).
    /// A closing session drops it.
    pub fn send(&self, frame: Bytes) {
        let _ = self.session.outbox.push(frame);
    }

    /// Queues a text frame.
    pub fn send_text(&self, text: &str) {
        self.send(crate::frame::ws_frame(
            crate::frame::OP_TEXT,
            text.as_bytes(),
        ));
    }

    /// Queues a binary frame.
    pub fn send_binary(&self, bytes: &[u8]) {
        self.send(crate::frame::ws_frame(crate::frame::OP_BINARY, bytes));
    }

    /// Joins a room the dialect has already authorised, within the session's
    /// room limit.
    pub async fn join(&self, room: RoomName, max_rooms: usize) -> Result<Joined, JoinError> {
        if !self.session.in_room(&room) && self.session.room_count() >= max_rooms {
            return Err(JoinError::Limit);
        }
        self.node
            .hub()
            .join(&self.session, room)
            .await
            .map_err(|e| {
                tracing::warn!(session = %self.session.id, error = %e, "join failed");
                JoinError::Broker
            })
    }

    /// Leaves a room; returns whether the session was in it.
    pub async fn leave(&self, room: &RoomName) -> bool {
        self.node.hub().leave(&self.session, room).await
    }

    /// Asks the writer to close the socket after what is queued.
    pub fn close(&self, disconnect: Disconnect) {
        self.session.outbox.close(disconnect, true);
    }
}
