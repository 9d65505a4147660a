//! One seed 001 session: Subscribe / Unsubscribe / Ping, the cluster-wide
//! rate limits, and the error frames.

use std::sync::Arc;

use async_trait::async_trait;
use prost::Message as _;
use roomcast_auth::Decision;
use roomcast_protocol::RoomName;

use super::wire::{self, pb, Code};
use super::Settings;
use crate::dialect::{Connection, Inbound, JoinError, SessionCtx};
use crate::disconnect::Disconnect;

use pb::web_socket_message::Payload;

/// The room kinds a subscription names, with the field that names them.
pub(crate) const KINDS: [(&str, &str); 3] = [
    ("project", "project_ids"),
    ("sprint", "sprint_ids"),
    ("work_item", "work_item_ids"),
];

pub(crate) struct Seed001Connection {
    settings: Arc<Settings>,
}

/// Ids of one field that could not be subscribed, by reason.
#[derive(Default)]
struct Refused {
    invalid: Vec<String>,
    denied: Vec<String>,
    over_limit: Vec<String>,
    failed: Vec<String>,
}

impl Seed001Connection {
    pub(crate) fn new(settings: Arc<Settings>) -> Self {
        Self { settings }
    }

    /// Counts the message against the user's and the tenant's cluster-wide
    /// limits; `Some(reason)` when one is exceeded. A user over its limit
    /// does not use up the tenant's. When the counters cannot be reached
    /// the message passes (the per-connection limit still holds): an
    /// outage of the rate limiter must not stop every client.
    async fn over_limit(&self, ctx: &SessionCtx) -> Option<String> {
        let counters = ctx.node.broker().counters()?;
        let s = &self.settings;
        let now = crate::hub::now_ms();
        let tenant = &ctx.identity.tenant;
        let checks = [
            (
                format!("seed001:u:{tenant}/{}", ctx.identity.user),
                s.user_messages_per_window,
                "user",
            ),
            (
                format!("seed001:t:{tenant}"),
                s.tenant_messages_per_window,
                "tenant",
            ),
        ];
        for (key, limit, who) in checks {
            match counters.hit(&key, s.rate_window, now).await {
                Ok(n) if n > limit => {
                    metrics::counter!("roomcast_rate_limited_total", "dialect" => "seed001", "scope" => who)
                        .increment(1);
                    return Some(format!(
                        "at most {limit} messages per {} per {who}",
                        humantime::format_duration(s.rate_window)
                    ));
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "rate limit counters unavailable; letting the message pass");
                    metrics::counter!("roomcast_rate_limit_errors_total", "dialect" => "seed001")
                        .increment(1);
                    return None;
                }
            }
        }
        None
    }

    async fn subscribe(&self, ctx: &SessionCtx, sub: pb::Subscribe, request: &str) {
        let max = self.settings.max_subscriptions;
        let mut confirmed: [Vec<String>; 3] = Default::default();
        let mut refused: [Refused; 3] = Default::default();
        let lists = [sub.project_ids, sub.sprint_ids, sub.work_item_ids];
        for (i, ids) in lists.into_iter().enumerate() {
            let kind = KINDS[i].0;
            for id in ids {
                if confirmed[i].contains(&id) {
                    continue;
                }
                let Ok(room) = RoomName::from_parts(kind, &id) else {
                    refused[i].invalid.push(id);
                    continue;
                };
                if self.settings.authorize_rooms {
                    if let Decision::Deny(_) =
                        ctx.node.authorizer().authorize(&ctx.identity, &room).await
                    {
                        refused[i].denied.push(id);
                        continue;
                    }
                }
                match ctx.join(room, max).await {
                    Ok(_) => confirmed[i].push(id),
                    Err(JoinError::Limit) => refused[i].over_limit.push(id),
                    Err(JoinError::Broker) => refused[i].failed.push(id),
                }
            }
        }
        let [projects, sprints, items] = confirmed;
        ctx.send(wire::reply(Payload::SubscriptionConfirmed(
            pb::SubscriptionConfirmed {
                subscribed_project_ids: projects,
                subscribed_sprint_ids: sprints,
                subscribed_work_item_ids: items,
            },
        )));
        for (i, r) in refused.iter().enumerate() {
            let field = KINDS[i].1;
            let limit = format!("over the subscription limit of {max}");
            let report = [
                (&r.invalid, Code::ValidationError, "not valid ids"),
                (&r.denied, Code::AuthorizationFailed, "not allowed"),
                (&r.over_limit, Code::ValidationError, limit.as_str()),
                (
                    &r.failed,
                    Code::InternalError,
                    "could not be subscribed; retry",
                ),
            ];
            for (ids, code, why) in report {
                if !ids.is_empty() {
                    let message = format!("{why}: {}", shown(ids));
                    ctx.send(wire::error(code, message, request, field));
                }
            }
        }
    }

    async fn unsubscribe(&self, ctx: &SessionCtx, unsub: pb::Unsubscribe, request: &str) {
        let lists = [unsub.project_ids, unsub.sprint_ids, unsub.work_item_ids];
        for (i, ids) in lists.into_iter().enumerate() {
            let (kind, field) = KINDS[i];
            let mut invalid = Vec::new();
            for id in ids {
                match RoomName::from_parts(kind, &id) {
                    Ok(room) => {
                        ctx.leave(&room).await;
                    }
                    Err(_) => invalid.push(id),
                }
            }
            if !invalid.is_empty() {
                ctx.send(wire::error(
                    Code::ValidationError,
                    format!("not valid ids: {}", shown(&invalid)),
                    request,
                    field,
                ));
            }
        }
    }
}

/// Ids for an error message, cut short so the frame stays small.
fn shown(ids: &[String]) -> String {
    const MAX: usize = 10;
    let mut out: Vec<String> = ids
        .iter()
        .take(MAX)
        .map(|id| id.chars().take(64).collect())
        .collect();
    if ids.len() > MAX {
        out.push(format!("and {} more", ids.len() - MAX));
    }
    out.join(", ")
}

#[async_trait]
impl Connection for Seed001Connection {
    async fn message(&mut self, ctx: &SessionCtx, msg: Inbound<'_>) -> Result<(), Disconnect> {
        let decoded = if msg.binary {
            pb::WebSocketMessage::decode(msg.payload)
                .map_err(|e| format!("not a protobuf WebSocketMessage: {e}"))
        } else {
            Err("send binary protobuf WebSocketMessage frames".to_owned())
        };
        let request = decoded
            .as_ref()
            .map(|m| m.message_id.clone())
            .unwrap_or_default();
        if let Some(reason) = self.over_limit(ctx).await {
            ctx.send(wire::error(Code::RateLimitExceeded, reason, &request, ""));
            return Ok(());
        }
        let m = match decoded {
            Ok(m) => m,
            Err(reason) => {
                ctx.send(wire::error(Code::ValidationError, reason, "", ""));
                return Ok(());
            }
        };
        match m.payload {
            Some(Payload::Subscribe(s)) => self.subscribe(ctx, s, &request).await,
            Some(Payload::Unsubscribe(u)) => self.unsubscribe(ctx, u, &request).await,
            Some(Payload::Ping(p)) => ctx.send(wire::reply(Payload::Pong(pb::Pong {
                timestamp: crate::hub::now_ms() as i64,
                client_timestamp: p.timestamp,
            }))),
            None => ctx.send(wire::error(
                Code::ValidationError,
                "a payload is required (Subscribe, Unsubscribe or Ping)",
                &request,
                "payload",
            )),
            Some(_) => ctx.send(wire::error(
                Code::ValidationError,
                "clients send Subscribe, Unsubscribe or Ping",
                &request,
                "payload",
            )),
        }
        Ok(())
    }

    fn rate_limited(&mut self, ctx: &SessionCtx) {
        let s = &self.settings;
        ctx.send(wire::error(
            Code::RateLimitExceeded,
            format!(
                "at most {} messages per {} per connection",
                s.connection_messages_per_window,
                humantime::format_duration(s.rate_window)
            ),
            "",
            "",
        ));
    }

    fn too_large(&mut self, ctx: &SessionCtx) {
        ctx.send(wire::error(
            Code::ValidationError,
            format!(
                "messages are limited to {} bytes",
                self.settings.max_message_bytes
            ),
            "",
            "",
        ));
    }
}
