//! One roadmap session: SUBSCRIBE/UNSUBSCRIBE/PONG, the PING timer, the
//! PONG deadline and session re-validation.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use roomcast_auth::Identity;
use roomcast_protocol::RoomName;
use serde::Deserialize;
use serde_json::json;
use tokio::time::Instant;

use super::check::{SessionCheck, Verdict};
use super::render::{error_frame, ping_frame};
use super::Settings;
use crate::dialect::{Connection, Inbound, SessionCtx};
use crate::disconnect::Disconnect;

/// Every session without feature subscriptions is here.
const ALL: &str = "roadmap:all";

fn all_room() -> RoomName {
    ALL.parse().expect("a valid constant room name")
}

/// The document's error codes.
mod code {
    pub(super) const SESSION_EXPIRED: &str = "SESSION_EXPIRED";
    pub(super) const RATE_LIMIT_EXCEEDED: &str = "RATE_LIMIT_EXCEEDED";
    pub(super) const INVALID_MESSAGE: &str = "INVALID_MESSAGE";
    pub(super) const SUBSCRIPTION_LIMIT: &str = "SUBSCRIPTION_LIMIT";
    pub(super) const SERVER_ERROR: &str = "SERVER_ERROR";
}

#[derive(Deserialize)]
#[serde(tag = "type")]
enum ClientMessage {
    #[serde(rename = "PONG")]
    Pong {},
    #[serde(rename = "SUBSCRIBE")]
    Subscribe {
        #[serde(rename = "featureIds")]
        feature_ids: Vec<String>,
    },
    #[serde(rename = "UNSUBSCRIBE")]
    Unsubscribe {
        #[serde(rename = "featureIds")]
        feature_ids: Vec<String>,
    },
}

pub(crate) struct RoadmapConnection {
    settings: Arc<Settings>,
    check: Arc<SessionCheck>,
    /// The cookie value, validated again every `revalidate_interval`.
    credential: String,
    user: roomcast_protocol::UserId,
    admin: bool,
    next_ping: Instant,
    /// Set by a PING, cleared by any PONG.
    pong_due: Option<Instant>,
    next_revalidate: Instant,
    /// When the session's own expiry (a JWT's `exp`) passes.
    expires: Instant,
    /// Subscribed features; empty means the session is in `roadmap:all`.
    features: BTreeSet<String>,
}

/// `Instant` of a unix-seconds moment (far future when absurdly far).
fn instant_at(unix_secs: u64) -> Instant {
    let now_s = crate::hub::now_ms() / 1000;
    let left = Duration::from_secs(unix_secs.saturating_sub(now_s));
    Instant::now() + left.min(Duration::from_secs(10 * 365 * 24 * 3600))
}

impl RoadmapConnection {
    pub(crate) fn new(
        settings: Arc<Settings>,
        check: Arc<SessionCheck>,
        credential: String,
        identity: &Identity,
        admin: bool,
        expires_at: u64,
    ) -> Self {
        let now = Instant::now();
        Self {
            next_ping: now + settings.ping_interval,
            next_revalidate: now + settings.revalidate_interval,
            pong_due: None,
            expires: instant_at(expires_at),
            settings,
            check,
            credential,
            user: identity.user.clone(),
            admin,
            features: BTreeSet::new(),
        }
    }

    fn error(
        ctx: &SessionCtx,
        code: &'static str,
        message: &str,
        context: Option<serde_json::Value>,
    ) {
        metrics::counter!("roomcast_client_errors_total", "code" => code).increment(1);
        ctx.send(error_frame(code, message, context));
    }

    /// Parses feature ids into rooms; `None` (after an error frame) when one is invalid.
    fn rooms_of(ctx: &SessionCtx, ids: &[String]) -> Option<Vec<(String, RoomName)>> {
        if ids.is_empty() {
            Self::error(
                ctx,
                code::INVALID_MESSAGE,
                "featureIds must name at least one feature",
                None,
            );
            return None;
        }
        let mut out: Vec<(String, RoomName)> = Vec::with_capacity(ids.len());
        for id in ids {
            let Ok(room) = RoomName::from_parts("feature", id) else {
                Self::error(
                    ctx,
                    code::INVALID_MESSAGE,
                    "featureIds must be 1-150 characters of A-Z a-z 0-9 . _ - @ : = + ~",
                    None,
                );
                return None;
            };
            if !out.iter().any(|(i, _)| i == id) {
                out.push((id.clone(), room));
            }
        }
        Some(out)
    }

    async fn subscribe(&mut self, ctx: &SessionCtx, ids: Vec<String>) {
        let Some(rooms) = Self::rooms_of(ctx, &ids) else {
            return;
        };
        let new: Vec<_> = rooms
            .into_iter()
            .filter(|(id, _)| !self.features.contains(id))
            .collect();
        let max = self.settings.max_subscriptions;
        if self.features.len() + new.len() > max {
            let m = format!("at most {max} feature subscriptions per connection");
            Self::error(
                ctx,
                code::SUBSCRIPTION_LIMIT,
                &m,
                Some(json!({ "limit": max })),
            );
            return;
        }
        // Join the features before leaving roadmap:all, so nothing is missed.
        for (id, room) in new {
            if ctx.join(room, max + 1).await.is_err() {
                Self::error(ctx, code::SERVER_ERROR, "could not subscribe; retry", None);
                break;
            }
            self.features.insert(id);
        }
        if !self.features.is_empty() {
            ctx.leave(&all_room()).await;
        }
    }

    async fn unsubscribe(&mut self, ctx: &SessionCtx, ids: Vec<String>) {
        let Some(rooms) = Self::rooms_of(ctx, &ids) else {
            return;
        };
        let leaving: Vec<_> = rooms
            .into_iter()
            .filter(|(id, _)| self.features.contains(id))
            .collect();
        if leaving.len() == self.features.len() && !leaving.is_empty() {
            // Back to every update: join roadmap:all before leaving the last features.
            if ctx.join(all_room(), usize::MAX).await.is_err() {
                Self::error(
                    ctx,
                    code::SERVER_ERROR,
                    "could not unsubscribe; retry",
                    None,
                );
                return;
            }
        }
        for (id, room) in leaving {
            ctx.leave(&room).await;
            self.features.remove(&id);
        }
    }

    /// Validates the session again; `Err` ends it.
    async fn revalidate(&mut self, ctx: &SessionCtx) -> Result<(), Disconnect> {
        let now = Instant::now();
        match self.check.check(&self.credential).await {
            Verdict::Valid(identity) => {
                if identity.user != self.user
                    || identity.has_role(&self.settings.admin_role) != self.admin
                {
                    // Not expired, but the session is someone else's now: the
                    // client reconnects (the document's class does on any
                    // close but 1000) and gets the new role.
                    return Err(Disconnect::SESSION_EXPIRED);
                }
                self.expires = instant_at(identity.expires_at + ctx.node.config().auth.leeway_secs);
                self.next_revalidate = now + self.settings.revalidate_interval;
                Ok(())
            }
            Verdict::Invalid(why) => {
                tracing::debug!(session = %ctx.session.id, why, "seed004 session no longer valid");
                Self::error(
                    ctx,
                    code::SESSION_EXPIRED,
                    "Your session has expired. Please sign in again.",
                    None,
                );
                Err(Disconnect::SESSION_EXPIRED)
            }
            Verdict::Unavailable(why) => {
                // Not the client's fault: keep the session, ask again soon.
                tracing::warn!(session = %ctx.session.id, error = %why, "seed004 session re-validation unavailable");
                let retry = self
                    .settings
                    .revalidate_interval
                    .min(Duration::from_secs(30));
                self.next_revalidate = now + retry;
                Ok(())
            }
        }
    }
}

#[async_trait]
impl Connection for RoadmapConnection {
    async fn opened(&mut self, ctx: &SessionCtx) -> Result<(), Disconnect> {
        if ctx.join(all_room(), usize::MAX).await.is_err() {
            Self::error(
                ctx,
                code::SERVER_ERROR,
                "could not start the session; retry",
                None,
            );
            return Err(Disconnect::INTERNAL);
        }
        Ok(())
    }

    async fn message(&mut self, ctx: &SessionCtx, msg: Inbound<'_>) -> Result<(), Disconnect> {
        let parsed = if msg.binary {
            None
        } else {
            serde_json::from_slice::<ClientMessage>(msg.payload).ok()
        };
        match parsed {
            Some(ClientMessage::Pong {}) => self.pong_due = None,
            Some(ClientMessage::Subscribe { feature_ids }) => {
                self.subscribe(ctx, feature_ids).await
            }
            Some(ClientMessage::Unsubscribe { feature_ids }) => {
                self.unsubscribe(ctx, feature_ids).await
            }
            None => Self::error(
                ctx,
                code::INVALID_MESSAGE,
                "Message format not recognized: expected PONG, SUBSCRIBE or UNSUBSCRIBE",
                None,
            ),
        }
        Ok(())
    }

    fn rate_limited(&mut self, ctx: &SessionCtx) {
        let s = &self.settings;
        Self::error(
            ctx,
            code::RATE_LIMIT_EXCEEDED,
            "Too many requests. Please slow down.",
            Some(json!({
                "limit": s.rate_messages,
                "window": humantime::format_duration(s.rate_window).to_string(),
            })),
        );
    }

    fn too_large(&mut self, ctx: &SessionCtx) {
        let max = ctx.node.config().limits.max_message_bytes;
        let m = format!("messages are limited to {max} bytes");
        Self::error(
            ctx,
            code::INVALID_MESSAGE,
            &m,
            Some(json!({ "maxBytes": max })),
        );
    }

    fn deadline(&self) -> Option<Instant> {
        let mut d = self.next_ping.min(self.next_revalidate).min(self.expires);
        if let Some(p) = self.pong_due {
            d = d.min(p);
        }
        Some(d)
    }

    async fn on_deadline(&mut self, ctx: &SessionCtx) -> Result<(), Disconnect> {
        let now = Instant::now();
        if self.pong_due.is_some_and(|p| p <= now) {
            return Err(Disconnect::HEARTBEAT_TIMEOUT);
        }
        if self.expires <= now {
            Self::error(
                ctx,
                code::SESSION_EXPIRED,
                "Your session has expired. Please sign in again.",
                None,
            );
            return Err(Disconnect::SESSION_EXPIRED);
        }
        if self.next_revalidate <= now {
            self.revalidate(ctx).await?;
        }
        if self.next_ping <= now {
            ctx.send(ping_frame());
            if self.pong_due.is_none() {
                self.pong_due = Some(now + self.settings.pong_timeout);
            }
            self.next_ping = now + self.settings.ping_interval;
        }
        Ok(())
    }
}
