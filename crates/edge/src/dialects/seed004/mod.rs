//! Seed 004 (Triven "Real-Time Roadmap Updates"): JSON WebSocket on
//! `/api/roadmap/ws`, authenticated by the session cookie.
//!
//! Rooms (tenant: the configured default): every session starts in
//! `roadmap:all`; `SUBSCRIBE {featureIds}` joins `feature:<id>` rooms and
//! leaves `roadmap:all`, so delivery narrows to those features;
//! `UNSUBSCRIBE` of the last feature returns the session to `roadmap:all`.
//! Publishers send each roadmap update to `["roadmap:all", "feature:<id>"]`;
//! the hub gives a session in both rooms one copy.
//!
//! Policies: the session is re-validated every `revalidate_interval` (an
//! invalid one gets `ERROR SESSION_EXPIRED` and close 4401); `{"type":"PING"}`
//! every `ping_interval`, closed when no `PONG` follows within
//! `pong_timeout`; VOTE_UPDATE coalesced per feature; FEATURE_CREATED and
//! FEATURE_DELETED only to admins; 10 messages per 10 s (`ERROR
//! RATE_LIMIT_EXCEEDED`, then 1008); at most `max_connections` sessions of
//! this dialect per node (503 before the upgrade); past `batch_at_percent`
//! of `broadcast_cap` broadcasts per second, VOTE_UPDATEs coalesce over
//! `batch_window` instead (the `rate` module).

mod check;
mod connection;
mod rate;
mod render;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use roomcast_protocol::native::ErrorCode;
use serde::{Deserialize, Serialize};

use crate::config::{duration, Config, ConfigError};
use crate::dialect::{Accepted, Dialect, Refusal};
use crate::http::Body;
use crate::node::Node;
use crate::session::Renderer;

use check::{SessionCheck, Verdict};
use rate::BroadcastRate;
use render::RoadmapRenderer;

/// How the session cookie is validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SessionCheckKind {
    /// The cookie holds a JWT, verified with the node's `[auth]` key.
    #[default]
    Jwt,
    /// The cookie is sent to `introspection_url` (see the `check` module).
    Introspect,
}

/// `[dialects.seed004]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub enabled: bool,
    /// WebSocket endpoint.
    pub path: String,
    /// The tenant of every roadmap room (the document has no tenants).
    pub tenant: String,
    /// The session cookie.
    pub cookie_name: String,
    pub session_check: SessionCheckKind,
    /// Session introspection endpoint (plain http://), for `introspect`.
    pub introspection_url: Option<String>,
    /// `GET` (cookie only) or `POST` (cookie and `{"token": ...}`).
    pub introspection_method: String,
    #[serde(with = "duration")]
    pub introspection_timeout: Duration,
    /// How often a connected session is validated again.
    #[serde(with = "duration")]
    pub revalidate_interval: Duration,
    /// Interval of `{"type":"PING"}`.
    #[serde(with = "duration")]
    pub ping_interval: Duration,
    /// A PING not answered by a PONG within this closes the socket.
    #[serde(with = "duration")]
    pub pong_timeout: Duration,
    /// VOTE_UPDATEs of one feature within this window: only the last is sent.
    #[serde(with = "duration")]
    pub vote_coalesce_window: Duration,
    /// Sessions of this dialect per node; more are refused with 503.
    pub max_connections: usize,
    /// Features one session may SUBSCRIBE to (SUBSCRIPTION_LIMIT past it).
    pub max_subscriptions: usize,
    /// Inbound messages per `rate_window`; past it ERROR RATE_LIMIT_EXCEEDED.
    pub rate_messages: u32,
    #[serde(with = "duration")]
    pub rate_window: Duration,
    /// Consecutive windows over the limit (or a flood of 4x the limit in
    /// one) before close 1008.
    pub rate_strikes: u32,
    /// The role that receives FEATURE_CREATED and FEATURE_DELETED.
    pub admin_role: String,
    /// The document's global cap: roadmap broadcasts per second (events
    /// rendered by this node) handled without batching; 0 turns batching off.
    pub broadcast_cap: u32,
    /// Batching starts when the rate reaches this share of the cap (percent).
    pub batch_at_percent: u8,
    /// While batching, VOTE_UPDATEs of one feature within this window: only
    /// the last is sent (instead of `vote_coalesce_window`).
    #[serde(with = "duration")]
    pub batch_window: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            enabled: true,
            path: "/api/roadmap/ws".into(),
            tenant: "default".into(),
            cookie_name: "better-auth.session_token".into(),
            session_check: SessionCheckKind::Jwt,
            introspection_url: None,
            introspection_method: "GET".into(),
            introspection_timeout: Duration::from_secs(2),
            revalidate_interval: Duration::from_secs(300),
            ping_interval: Duration::from_secs(30),
            pong_timeout: Duration::from_secs(10),
            vote_coalesce_window: Duration::from_millis(100),
            max_connections: 1000,
            max_subscriptions: 100,
            rate_messages: 10,
            rate_window: Duration::from_secs(10),
            rate_strikes: 3,
            admin_role: "admin".into(),
            broadcast_cap: 100,
            batch_at_percent: 80,
            batch_window: Duration::from_secs(1),
        }
    }
}

/// One of this dialect's connection slots, released on drop.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Settings {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: &str| Err(ConfigError(format!("dialects.seed004: {m}")));
        if self.ping_interval.is_zero()
            || self.pong_timeout.is_zero()
            || self.revalidate_interval.is_zero()
        {
            return err("ping_interval, pong_timeout and revalidate_interval must be positive");
        }
        if self.rate_messages == 0 || self.rate_window.is_zero() || self.rate_strikes == 0 {
            return err("rate_messages, rate_window and rate_strikes must be positive");
        }
        if self.max_connections == 0 || self.max_subscriptions == 0 {
            return err("max_connections and max_subscriptions must be at least 1");
        }
        if self.broadcast_cap > 0
            && (!(1..=100).contains(&self.batch_at_percent) || self.batch_window.is_zero())
        {
            return err("batch_at_percent must be 1-100 and batch_window positive");
        }
        Ok(())
    }
}

/// The seed 004 dialect.
pub(crate) struct Seed004 {
    settings: Arc<Settings>,
    check: Arc<SessionCheck>,
    admin: Arc<dyn Renderer>,
    member: Arc<dyn Renderer>,
    connections: Arc<AtomicUsize>,
}

impl Seed004 {
    pub(crate) fn new(
        config: &Config,
        slots: &mut crate::dialects::Slots,
    ) -> Result<Self, ConfigError> {
        let s = config.dialects.seed004.clone();
        s.validate()?;
        let check = SessionCheck::new(config, &s)?;
        // One count per node, shared by both renderers.
        let rate = (s.broadcast_cap > 0)
            .then(|| Arc::new(BroadcastRate::new(s.broadcast_cap, s.batch_at_percent)));
        let renderer = |admin: bool, slot: usize| RoadmapRenderer {
            slot,
            admin,
            vote_window: s.vote_coalesce_window,
            rate: rate.clone(),
            batch_window: s.batch_window,
        };
        Ok(Self {
            admin: Arc::new(renderer(true, slots.allocate())),
            member: Arc::new(renderer(false, slots.allocate())),
            check: Arc::new(check),
            settings: Arc::new(s),
            connections: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Reserves one of the dialect's connection slots.
    fn reserve(&self) -> Option<Slot> {
        let max = self.settings.max_connections;
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self.connections.clone()))
    }

    async fn accept(&self, node: &Node, parts: &http::request::Parts) -> Result<Accepted, Refusal> {
        let s = &self.settings;
        let Some(slot) = self.reserve() else {
            return Err(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::ConnectionLimit,
                "the roadmap endpoint is at its connection limit; retry later",
                "connection_limit",
            ));
        };
        let Some(credential) = roomcast_auth::token_from_request(parts, Some(&s.cookie_name))
        else {
            return Err(Refusal::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::AuthenticationFailed,
                format!("no session: the {} cookie is required", s.cookie_name),
                "missing_token",
            ));
        };
        let mut identity = match self.check.check(&credential).await {
            Verdict::Valid(identity) => identity,
            Verdict::Invalid(why) => {
                return Err(Refusal::new(
                    StatusCode::UNAUTHORIZED,
                    ErrorCode::AuthenticationFailed,
                    format!("invalid session: {why}"),
                    "invalid_session",
                ))
            }
            Verdict::Unavailable(why) => {
                tracing::warn!(error = %why, "seed004 session check unavailable");
                return Err(Refusal::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::InternalError,
                    "the session could not be checked; retry",
                    "session_check_unavailable",
                ));
            }
        };
        // The dialect ends an expiring session itself (ERROR SESSION_EXPIRED,
        // then 4401); the transport's own expiry close stays as a backstop.
        let session_expires_at = identity.expires_at + node.config().auth.leeway_secs;
        identity.expires_at = identity.expires_at.saturating_add(2);
        let admin = identity.has_role(&s.admin_role);
        let mut limits = node.config().limits.clone();
        limits.rate_messages = s.rate_messages;
        limits.rate_window = s.rate_window;
        limits.rate_strikes = s.rate_strikes;
        Ok(Accepted {
            renderer: if admin {
                self.admin.clone()
            } else {
                self.member.clone()
            },
            connection: Box::new(connection::RoadmapConnection::new(
                self.settings.clone(),
                self.check.clone(),
                credential,
                &identity,
                admin,
                session_expires_at,
            )),
            identity,
            subprotocol: None,
            limits,
            guard: Some(Box::new(slot)),
            transport: "ws",
        })
    }
}

#[async_trait]
impl Dialect for Seed004 {
    fn name(&self) -> &'static str {
        "seed004"
    }

    fn paths(&self) -> Vec<String> {
        vec![self.settings.path.clone()]
    }

    async fn handle(&self, node: &Arc<Node>, req: Request<Incoming>) -> Response<Body> {
        if let Some(refusal) = crate::http::only_get(&req) {
            return refusal;
        }
        let n = node.clone();
        crate::ws::upgrade(node.clone(), req, |parts| async move {
            self.accept(&n, &parts).await
        })
        .await
    }
}
