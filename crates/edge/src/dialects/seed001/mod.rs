//! Seed 001 (work tracking, "WebSocket Protocol Documentation"): binary
//! protobuf frames on `/ws`, authenticated by `Authorization: Bearer <JWT>`
//! with `tenant_id` and `user_id` claims (anything else: HTTP 401).
//!
//! - Client: `WebSocketMessage{message_id, timestamp, Subscribe|Unsubscribe|Ping}`.
//!   `Subscribe{project_ids, sprint_ids, work_item_ids}` joins
//!   `project:<id>`, `sprint:<id>` and `work_item:<id>` inside the token's
//!   tenant (so a subscription naming another tenant's ids only ever
//!   reaches this tenant's rooms) and is answered by `SubscriptionConfirmed`.
//! - Server: each event whose body is one of the document's messages
//!   (protobuf, `type_name` `roomcast.seed001.<Message>`), rendered once per
//!   event as `WebSocketMessage{message_id: <event id>, timestamp: <event
//!   ts>, payload}`; `Pong`; `ErrorResponse` with the document's codes.
//! - Rate limits (100 messages per minute per user, 1000 per tenant) hold
//!   across the cluster through the broker's [`roomcast_broker::Counters`].
//! - Missed updates: `GET /api/v1/activity?since=…&project_ids=…` answers a
//!   protobuf `BatchUpdate` read from the rooms' history (see [`activity`]).
//!
//! The contract is `crates/edge/proto/seed001.proto`, shipped for clients.

mod activity;
mod connection;
mod wire;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use roomcast_auth::Verifier;
use roomcast_protocol::native::ErrorCode;
use serde::{Deserialize, Serialize};

use crate::config::{Config, ConfigError};
use crate::dialect::{Accepted, Dialect, Refusal};
use crate::http::Body;
use crate::node::Node;
use crate::session::Renderer;

pub use wire::{pb, EVENT_MESSAGES, PROTO_SOURCE, TYPE_PREFIX};

/// `[dialects.seed001]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub enabled: bool,
    /// WebSocket endpoint.
    pub path: String,
    /// Missed-updates endpoint (`GET ?since=&project_ids=&sprint_ids=&work_item_ids=`).
    pub activity_path: String,
    /// Claim carrying the user id.
    pub claim_user: String,
    /// Claim carrying the tenant id (required in every token).
    pub claim_tenant: String,
    /// Messages per user per `rate_window`, across the cluster.
    pub user_messages_per_window: u64,
    /// Messages per tenant per `rate_window`, across the cluster.
    pub tenant_messages_per_window: u64,
    #[serde(with = "crate::config::duration")]
    pub rate_window: Duration,
    /// One connection's own cap per `rate_window` (checked on the node,
    /// before the cluster counters): past it the transport answers once per
    /// window and closes 1008 after `limits.rate_strikes` windows in a row.
    pub connection_messages_per_window: u32,
    /// Rooms (projects + sprints + work items) one connection may hold.
    pub max_subscriptions: usize,
    /// Largest inbound message; bigger ones get an ErrorResponse and close 1009.
    pub max_message_bytes: usize,
    /// Server WebSocket ping interval (the client's own Ping is every 30 s).
    #[serde(with = "crate::config::duration")]
    pub ping_interval: Duration,
    /// A socket that sends nothing (not even a pong) for this long is closed.
    #[serde(with = "crate::config::duration")]
    pub idle_timeout: Duration,
    /// Ask the node's room authorization (token rooms claim, then the
    /// product's callback) before joining a room. Off: any id inside the
    /// token's tenant may be subscribed, as the document states.
    pub authorize_rooms: bool,
    /// Most events one activity answer carries (it says `complete: false`
    /// past it).
    pub activity_max_events: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            enabled: true,
            path: "/ws".into(),
            activity_path: "/api/v1/activity".into(),
            claim_user: "user_id".into(),
            claim_tenant: "tenant_id".into(),
            user_messages_per_window: 100,
            tenant_messages_per_window: 1000,
            rate_window: Duration::from_secs(60),
            connection_messages_per_window: 200,
            max_subscriptions: 200,
            max_message_bytes: 64 * 1024,
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            authorize_rooms: false,
            activity_max_events: 1000,
        }
    }
}

impl Settings {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: &str| Err(ConfigError(format!("dialects.seed001.{m}")));
        if self.user_messages_per_window == 0
            || self.tenant_messages_per_window == 0
            || self.connection_messages_per_window == 0
            || self.rate_window.is_zero()
        {
            return err("*_messages_per_window and rate_window must be positive");
        }
        if self.max_subscriptions == 0 || self.activity_max_events == 0 {
            return err("max_subscriptions and activity_max_events must be positive");
        }
        if self.max_message_bytes < 128 {
            return err("max_message_bytes must be at least 128");
        }
        if self.ping_interval.is_zero() || self.idle_timeout <= self.ping_interval {
            return err("idle_timeout must be longer than ping_interval");
        }
        if !self.path.starts_with('/') || !self.activity_path.starts_with('/') {
            return err("path and activity_path must start with /");
        }
        Ok(())
    }
}

/// The seed 001 dialect.
pub(crate) struct Seed001 {
    settings: Arc<Settings>,
    verifier: Arc<Verifier>,
    renderer: Arc<dyn Renderer>,
}

impl Seed001 {
    pub(crate) fn new(
        config: &Config,
        slots: &mut crate::dialects::Slots,
    ) -> Result<Self, ConfigError> {
        let settings = config.dialects.seed001.clone();
        settings.validate()?;
        // The node's key and algorithm, with this product's claim names.
        let mut own = crate::auth::verifier_config(config)?;
        own.claims.user = settings.claim_user.clone();
        own.claims.tenant = settings.claim_tenant.clone();
        let verifier = roomcast_auth::Verifier::new(own)
            .map_err(|e| ConfigError(format!("dialects.seed001: {e}")))?;
        Ok(Self {
            settings: Arc::new(settings),
            verifier: Arc::new(verifier),
            renderer: Arc::new(wire::Seed001Renderer::new(slots.allocate())),
        })
    }

    /// Verifies the Bearer token of a request.
    fn identify(&self, parts: &http::request::Parts) -> Result<roomcast_auth::Identity, Refusal> {
        match roomcast_auth::token_from_request(parts, None) {
            Some(token) => self
                .verifier
                .verify(&token)
                .map_err(|e| Refusal::unauthenticated(&e)),
            None => Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::AuthenticationFailed,
                "no token: send Authorization: Bearer <jwt>",
                "missing_token",
            )),
        }
    }

    async fn accept(
        &self,
        node: Arc<Node>,
        parts: http::request::Parts,
    ) -> Result<Accepted, Refusal> {
        let identity = self.identify(&parts)?;
        let s = &self.settings;
        let mut limits = node.config().limits.clone();
        limits.max_message_bytes = s.max_message_bytes;
        limits.max_rooms_per_session = s.max_subscriptions;
        limits.rate_messages = s.connection_messages_per_window;
        limits.rate_window = s.rate_window;
        limits.ping_interval = s.ping_interval;
        limits.idle_timeout = s.idle_timeout;
        Ok(Accepted {
            identity,
            renderer: self.renderer.clone(),
            subprotocol: None,
            connection: Box::new(connection::Seed001Connection::new(self.settings.clone())),
            limits,
            guard: None,
            transport: "ws",
        })
    }
}

#[async_trait]
impl Dialect for Seed001 {
    fn name(&self) -> &'static str {
        "seed001"
    }

    fn paths(&self) -> Vec<String> {
        vec![
            self.settings.path.clone(),
            self.settings.activity_path.clone(),
        ]
    }

    async fn handle(&self, node: &Arc<Node>, req: Request<Incoming>) -> Response<Body> {
        if let Some(refusal) = crate::http::only_get(&req) {
            return refusal;
        }
        if req.uri().path() == self.settings.activity_path {
            let (parts, _) = req.into_parts();
            return activity::handle(self, node, &parts).await;
        }
        let n = node.clone();
        crate::ws::upgrade(node.clone(), req, |parts| self.accept(n, parts)).await
    }
}
