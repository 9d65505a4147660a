//! Seed 002 (TaskForge "Realtime design"): a plain JSON WebSocket on
//! `/realtime?token=<JWT>`.
//!
//! - Client: `{"type":"subscribe","teamId":"…"}` joins `team:{teamId}`
//!   (members only: the token's teams claim); adding `"taskId":"…"` joins
//!   `task:{taskId}` instead, for a member of the team whose access the
//!   product's authorization callback confirms (asked about
//!   [`Settings::task_authz_room`], which names the team and the task, so the
//!   callback checks that the task belongs to the team and the user may see
//!   it). `unsubscribe` mirrors both.
//! - Server: `subscribed` / `unsubscribed` (echoing `teamId` and `taskId`),
//!   `{"type":"activity","activity":{type,teamId,actorUserId,ts,data}}` for
//!   each event of the rooms joined, and `{"type":"error","code":"…"}`.
//!
//! Events are rendered once per event: `activity.type` is the event type,
//! `teamId` comes from `data.teamId` or else the `team:` room it arrived on,
//! `actorUserId` is the event actor and `ts` the event time (ms).

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use roomcast_auth::{Decision, DenyReason, Identity, Verifier};
use roomcast_protocol::native::ErrorCode;
use roomcast_protocol::{Event, RoomName};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::config::{Config, ConfigError};
use crate::dialect::{Accepted, Connection, Dialect, Inbound, JoinError, Refusal, SessionCtx};
use crate::disconnect::Disconnect;
use crate::frame::{ws_frame, OP_TEXT};
use crate::http::Body;
use crate::node::Node;
use crate::session::Renderer;

/// `[dialects.seed002]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub enabled: bool,
    /// WebSocket endpoint; the token comes in `?token=` (or `Authorization: Bearer`).
    pub path: String,
    /// Tenant of tokens without a tenant claim (the seed has no tenants).
    pub tenant: String,
    /// Join every team of the token at connect (the design's step 3, with a
    /// `subscribed` frame each). Off: the document's current implementation,
    /// where the client subscribes to each team itself.
    pub auto_join_teams: bool,
    /// The room the authorization callback is asked about for a task room
    /// join; `{teamId}` and `{taskId}` are replaced. The default names both,
    /// so the callback can check that the task belongs to the team.
    pub task_authz_room: String,
    /// Event types delivered as `activity`; empty delivers every type.
    pub event_types: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            enabled: true,
            path: "/realtime".into(),
            tenant: "default".into(),
            auto_join_teams: false,
            task_authz_room: "task:{taskId}@team:{teamId}".into(),
            event_types: [
                "task.created",
                "task.updated",
                "task.deleted",
                "task.assigned",
                "comment.created",
                "comment.deleted",
                "presence.joined",
                "presence.left",
            ]
            .into_iter()
            .map(String::from)
            .collect(),
        }
    }
}

/// Renders events as `activity` frames.
struct ActivityRenderer {
    slot: usize,
    event_types: Vec<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Activity<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    team_id: Option<&'a RawValue>,
    actor_user_id: Option<&'a str>,
    ts: u64,
    data: &'a RawValue,
}

#[derive(Serialize)]
struct ActivityFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    activity: Activity<'a>,
}

#[derive(Deserialize)]
struct TeamOf<'a> {
    #[serde(rename = "teamId", borrow)]
    team_id: Option<&'a RawValue>,
}

impl Renderer for ActivityRenderer {
    fn slot(&self) -> usize {
        self.slot
    }

    fn render(&self, event: &Event, room: &RoomName) -> Option<Bytes> {
        if !self.event_types.is_empty() && !self.event_types.iter().any(|t| **t == *event.kind) {
            return None;
        }
        let text = event.body.json_text()?;
        let data: &RawValue = serde_json::from_str(text).ok()?;
        let room_team = (room.kind() == "team")
            .then(|| serde_json::to_string(room.id()).ok())
            .flatten();
        let room_team: Option<Box<RawValue>> =
            room_team.and_then(|s| RawValue::from_string(s).ok());
        // Only an object names a team (serde would read a struct out of an array).
        let team_id = (data.get().trim_start().starts_with('{'))
            .then(|| serde_json::from_str::<TeamOf<'_>>(text).ok())
            .flatten()
            .and_then(|t| t.team_id)
            .filter(|v| v.get() != "null")
            .or(room_team.as_deref());
        let frame = ActivityFrame {
            kind: "activity",
            activity: Activity {
                kind: &event.kind,
                team_id,
                actor_user_id: event.actor.as_deref(),
                ts: event.ts,
                data,
            },
        };
        // The body is embedded as is, never re-serialised.
        let text = serde_json::to_vec(&frame).ok()?;
        Some(ws_frame(OP_TEXT, &text))
    }
}

/// The seed 002 dialect.
pub(crate) struct Seed002 {
    settings: Settings,
    verifier: Arc<Verifier>,
    renderer: Arc<dyn Renderer>,
}

impl Seed002 {
    pub(crate) fn new(
        config: &Config,
        slots: &mut crate::dialects::Slots,
    ) -> Result<Self, ConfigError> {
        let settings = config.dialects.seed002.clone();
        if !settings.task_authz_room.contains("{taskId}") {
            return Err(ConfigError(
                "dialects.seed002.task_authz_room must contain {taskId}".into(),
            ));
        }
        let verifier = crate::auth::verifier_with_default_tenant(
            config,
            &settings.tenant,
            "dialects.seed002",
        )?;
        Ok(Self {
            renderer: Arc::new(ActivityRenderer {
                slot: slots.allocate(),
                event_types: settings.event_types.clone(),
            }),
            verifier: Arc::new(verifier),
            settings,
        })
    }

    fn accept(&self, node: &Node, parts: &http::request::Parts) -> Result<Accepted, Refusal> {
        let identity = match roomcast_auth::token_from_request(parts, None) {
            Some(token) => self
                .verifier
                .verify(&token)
                .map_err(|e| Refusal::unauthenticated(&e))?,
            None => {
                return Err(Refusal::new(
                    StatusCode::UNAUTHORIZED,
                    ErrorCode::AuthenticationFailed,
                    "no token: connect to /realtime?token=<accessToken>",
                    "missing_token",
                ))
            }
        };
        Ok(Accepted {
            identity,
            renderer: self.renderer.clone(),
            subprotocol: None,
            connection: Box::new(Seed002Connection {
                auto_join_teams: self.settings.auto_join_teams,
                task_authz_room: self.settings.task_authz_room.clone(),
            }),
            limits: node.config().limits.clone(),
            guard: None,
            transport: "ws",
        })
    }
}

#[async_trait]
impl Dialect for Seed002 {
    fn name(&self) -> &'static str {
        "seed002"
    }

    fn paths(&self) -> Vec<String> {
        vec![self.settings.path.clone()]
    }

    async fn handle(&self, node: &Arc<Node>, req: Request<Incoming>) -> Response<Body> {
        if let Some(refusal) = crate::http::only_get(&req) {
            return refusal;
        }
        let n = node.clone();
        crate::ws::upgrade(
            node.clone(),
            req,
            |parts| async move { self.accept(&n, &parts) },
        )
        .await
    }
}

/// A client message.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum ClientMessage {
    Subscribe(Scope),
    Unsubscribe(Scope),
}

/// What a subscribe names: a team, or a task of a team.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Scope {
    team_id: String,
    #[serde(default)]
    task_id: Option<String>,
}

impl Scope {
    /// The room this scope means, or why it names none.
    fn room(&self) -> Result<RoomName, &'static str> {
        let room = match &self.task_id {
            Some(task) => RoomName::from_parts("task", task),
            None => RoomName::from_parts("team", &self.team_id),
        };
        room.map_err(|_| {
            "teamId and taskId must be 1-160 characters of A-Z a-z 0-9 . _ - @ : = + ~"
        })
    }

    /// The frame answering a (un)subscribe of this scope.
    fn reply(&self, kind: &str) -> serde_json::Value {
        let mut v = serde_json::json!({ "type": kind, "teamId": self.team_id });
        if let Some(task) = &self.task_id {
            v["taskId"] = task.as_str().into();
        }
        v
    }
}

struct Seed002Connection {
    auto_join_teams: bool,
    task_authz_room: String,
}

fn send_json(ctx: &SessionCtx, v: &serde_json::Value) {
    ctx.send_text(&v.to_string());
}

fn send_error(ctx: &SessionCtx, code: ErrorCode, message: &str, scope: Option<&Scope>) {
    metrics::counter!("roomcast_client_errors_total", "code" => code.as_str()).increment(1);
    let mut v = serde_json::json!({"type": "error", "code": code.as_str(), "message": message});
    if let Some(s) = scope {
        v["teamId"] = s.team_id.as_str().into();
        if let Some(task) = &s.task_id {
            v["taskId"] = task.as_str().into();
        }
    }
    send_json(ctx, &v);
}

impl Seed002Connection {
    /// May this identity join the scope's room?
    async fn authorize(&self, ctx: &SessionCtx, scope: &Scope, room: &RoomName) -> Decision {
        let id: &Identity = &ctx.identity;
        let authz = ctx.node.authorizer();
        let Ok(team_room) = RoomName::from_parts("team", &scope.team_id) else {
            return Decision::Deny(DenyReason::NotInTeam);
        };
        // Team rooms (and the team half of a task join) are settled by the token.
        let team = authz.authorize(id, &team_room).await;
        if scope.task_id.is_none() || !team.is_allowed() {
            return team;
        }
        if id.rooms.contains(room) {
            return Decision::Allow;
        }
        let task = scope.task_id.as_deref().unwrap_or_default();
        let question = self
            .task_authz_room
            .replace("{teamId}", &scope.team_id)
            .replace("{taskId}", task);
        match question.parse::<RoomName>() {
            Ok(q) => authz.ask_callback(id, &q).await,
            Err(_) => Decision::Deny(DenyReason::CallbackDenied),
        }
    }

    async fn subscribe(&self, ctx: &SessionCtx, scope: Scope) {
        let room = match scope.room() {
            Ok(r) => r,
            Err(m) => return send_error(ctx, ErrorCode::InvalidMessage, m, Some(&scope)),
        };
        if let Decision::Deny(reason) = self.authorize(ctx, &scope, &room).await {
            return send_error(ctx, reason.error_code(), &reason.to_string(), Some(&scope));
        }
        let max = ctx.node.config().limits.max_rooms_per_session;
        match ctx.join(room, max).await {
            Ok(_) => send_json(ctx, &scope.reply("subscribed")),
            Err(e) => {
                let message = match e {
                    JoinError::Limit => "too many subscriptions on this connection",
                    JoinError::Broker => "could not subscribe; try again",
                };
                send_error(ctx, e.code(), message, Some(&scope))
            }
        }
    }

    async fn unsubscribe(&self, ctx: &SessionCtx, scope: Scope) {
        match scope.room() {
            Ok(room) => {
                ctx.leave(&room).await;
                send_json(ctx, &scope.reply("unsubscribed"));
            }
            Err(m) => send_error(ctx, ErrorCode::InvalidMessage, m, Some(&scope)),
        }
    }
}

#[async_trait]
impl Connection for Seed002Connection {
    async fn opened(&mut self, ctx: &SessionCtx) -> Result<(), Disconnect> {
        if !self.auto_join_teams {
            return Ok(());
        }
        for team in ctx.identity.teams.clone() {
            let scope = Scope {
                team_id: team.to_string(),
                task_id: None,
            };
            self.subscribe(ctx, scope).await;
        }
        Ok(())
    }

    async fn message(&mut self, ctx: &SessionCtx, msg: Inbound<'_>) -> Result<(), Disconnect> {
        if msg.binary {
            send_error(
                ctx,
                ErrorCode::InvalidMessage,
                "send JSON text frames",
                None,
            );
            return Ok(());
        }
        match serde_json::from_slice::<ClientMessage>(msg.payload) {
            Ok(ClientMessage::Subscribe(scope)) => self.subscribe(ctx, scope).await,
            Ok(ClientMessage::Unsubscribe(scope)) => self.unsubscribe(ctx, scope).await,
            Err(_) => send_error(
                ctx,
                ErrorCode::InvalidMessage,
                "expected {\"type\":\"subscribe\"|\"unsubscribe\",\"teamId\":\"…\"[,\"taskId\":\"…\"]}",
                None,
            ),
        }
        Ok(())
    }

    fn rate_limited(&mut self, ctx: &SessionCtx) {
        let l = &ctx.node.config().limits;
        let m = format!(
            "at most {} messages per {:?}",
            l.rate_messages, l.rate_window
        );
        send_error(ctx, ErrorCode::RateLimitExceeded, &m, None);
    }

    fn too_large(&mut self, ctx: &SessionCtx) {
        let max = ctx.node.config().limits.max_message_bytes;
        let m = format!("messages are limited to {max} bytes");
        send_error(ctx, ErrorCode::MessageTooLarge, &m, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str, data: &str, actor: Option<&str>) -> Event {
        Event {
            id: roomcast_protocol::EventId::new(1, 0),
            tenant: "default".parse().unwrap(),
            rooms: vec!["task:t1".parse().unwrap()],
            kind: kind.into(),
            ts: 1700,
            actor: actor.map(Into::into),
            version: None,
            audience: vec![],
            exclude_users: vec![],
            exclude_sessions: vec![],
            body: roomcast_protocol::Body::Json(Bytes::copy_from_slice(data.as_bytes())),
        }
    }

    fn render(e: &Event, room: &str) -> Option<serde_json::Value> {
        let r = ActivityRenderer {
            slot: 0,
            event_types: Settings::default().event_types,
        };
        let frame = r.render(e, &room.parse().unwrap())?;
        Some(serde_json::from_slice(&frame[if frame[1] == 126 { 4 } else { 2 }..]).unwrap())
    }

    #[test]
    fn activity_takes_team_from_data_then_room() {
        let v = render(
            &event(
                "comment.created",
                r#"{"teamId":"T9","text":"hi"}"#,
                Some("u2"),
            ),
            "task:t1",
        )
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"activity","activity":{"type":"comment.created",
                "teamId":"T9","actorUserId":"u2","ts":1700,"data":{"teamId":"T9","text":"hi"}}})
        );
        let v = render(&event("task.created", r#"{"id":"t1"}"#, None), "team:42").unwrap();
        assert_eq!(v["activity"]["teamId"], "42");
        assert_eq!(v["activity"]["actorUserId"], serde_json::Value::Null);
        let v = render(&event("task.created", "[1]", None), "task:t1").unwrap();
        assert_eq!(v["activity"]["teamId"], serde_json::Value::Null);
        assert!(render(&event("chat.message", "{}", None), "team:1").is_none());
    }

    #[test]
    fn scopes_map_to_rooms() {
        let s: ClientMessage =
            serde_json::from_str(r#"{"type":"subscribe","teamId":"a","taskId":"t"}"#).unwrap();
        let ClientMessage::Subscribe(s) = s else {
            panic!()
        };
        assert_eq!(s.room().unwrap().as_str(), "task:t");
        assert_eq!(
            s.reply("subscribed"),
            serde_json::json!({"type":"subscribed","teamId":"a","taskId":"t"})
        );
        let bad = Scope {
            team_id: "a b".into(),
            task_id: None,
        };
        assert!(bad.room().is_err());
        assert!(serde_json::from_str::<ClientMessage>(r#"{"type":"subscribe"}"#).is_err());
        assert!(serde_json::from_str::<ClientMessage>(r#"{"type":"hello","teamId":"a"}"#).is_err());
    }
}
