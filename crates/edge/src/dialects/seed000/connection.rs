//! One seed 000 WebSocket session: `subscribe` / `unsubscribe` (and `ping`)
//! actions, answered in the `{type,timestamp,payload}` envelope.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{json, Value};

use super::channel::Channel;
use super::envelope::{self, ErrorCode};
use super::Settings;
use crate::dialect::{Connection, Inbound, SessionCtx};
use crate::disconnect::Disconnect;

/// A client action, parsed once.
enum Action {
    Subscribe(Vec<String>),
    Unsubscribe(Vec<String>),
    Ping,
}

/// Why a message is not an action.
struct Invalid(ErrorCode, String);

fn parse(payload: &[u8]) -> Result<Action, Invalid> {
    let bad = |m: &str| Invalid(ErrorCode::BadMessage, m.to_owned());
    let v: Value = serde_json::from_slice(payload).map_err(|_| bad("not valid JSON"))?;
    let Value::Object(obj) = v else {
        return Err(bad("a message is a JSON object with an `action`"));
    };
    let Some(action) = obj.get("action").and_then(Value::as_str) else {
        return Err(bad("`action` (a string) is required"));
    };
    let channels = || -> Result<Vec<String>, Invalid> {
        let list = obj
            .get("channels")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("`channels` must be an array of strings"))?;
        list.iter()
            .map(|c| c.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("`channels` must be an array of strings"))
    };
    match action {
        "subscribe" => Ok(Action::Subscribe(channels()?)),
        "unsubscribe" => Ok(Action::Unsubscribe(channels()?)),
        "ping" => Ok(Action::Ping),
        other => Err(Invalid(
            ErrorCode::UnknownAction,
            format!(
                "unknown action {:?}; use subscribe, unsubscribe or ping",
                other.chars().take(64).collect::<String>()
            ),
        )),
    }
}

pub(crate) struct Seed000Connection {
    pub(crate) settings: Arc<Settings>,
    /// Channels subscribed, with the room each maps onto; a room is left
    /// when no channel maps onto it any more.
    pub(crate) channels: Vec<(String, Channel)>,
}

impl Seed000Connection {
    fn error(&self, ctx: &SessionCtx, code: ErrorCode, message: &str, channel: Option<&str>) {
        metrics::counter!("roomcast_client_errors_total", "code" => code.as_str()).increment(1);
        ctx.send_text(&envelope::error(code, message, channel));
    }

    async fn subscribe(&mut self, ctx: &SessionCtx, names: Vec<String>) {
        let max = ctx.node.config().limits.max_rooms_per_session;
        let mut granted = Vec::new();
        for name in names {
            let Some(channel) = Channel::parse(&name) else {
                self.error(
                    ctx,
                    ErrorCode::InvalidChannel,
                    "channels are worker:<id>, board:zoo and board:readonly",
                    Some(&name),
                );
                continue;
            };
            if !channel.allowed(&self.settings, &ctx.identity) {
                self.error(
                    ctx,
                    ErrorCode::Forbidden,
                    "this session may not read this channel",
                    Some(&name),
                );
                continue;
            }
            if self.channels.iter().any(|(n, _)| *n == name) {
                granted.push(name);
                continue;
            }
            if self.channels.len() >= max {
                self.error(
                    ctx,
                    ErrorCode::SubscriptionLimit,
                    &format!("at most {max} channels per session"),
                    Some(&name),
                );
                continue;
            }
            match ctx.join(channel.room(), max).await {
                Ok(_) => {
                    self.channels.push((name.clone(), channel));
                    granted.push(name);
                }
                Err(crate::dialect::JoinError::Limit) => self.error(
                    ctx,
                    ErrorCode::SubscriptionLimit,
                    &format!("at most {max} channels per session"),
                    Some(&name),
                ),
                Err(crate::dialect::JoinError::Broker) => self.error(
                    ctx,
                    ErrorCode::Internal,
                    "the channel could not be subscribed; retry",
                    Some(&name),
                ),
            }
        }
        if self.settings.ack_subscriptions && !granted.is_empty() {
            ctx.send_text(&envelope::reply(
                "subscribed",
                json!({ "channels": granted }),
            ));
        }
    }

    async fn unsubscribe(&mut self, ctx: &SessionCtx, names: Vec<String>) {
        let mut left = Vec::new();
        for name in names {
            let Some(pos) = self.channels.iter().position(|(n, _)| *n == name) else {
                continue;
            };
            let (_, channel) = self.channels.swap_remove(pos);
            let room = channel.room();
            if !self.channels.iter().any(|(_, c)| c.room() == room) {
                ctx.leave(&room).await;
            }
            left.push(name);
        }
        if self.settings.ack_subscriptions {
            ctx.send_text(&envelope::reply(
                "unsubscribed",
                json!({ "channels": left }),
            ));
        }
    }
}

#[async_trait]
impl Connection for Seed000Connection {
    async fn message(&mut self, ctx: &SessionCtx, msg: Inbound<'_>) -> Result<(), Disconnect> {
        if msg.binary {
            self.error(
                ctx,
                ErrorCode::BadMessage,
                "messages are JSON text frames",
                None,
            );
            return Ok(());
        }
        match parse(msg.payload) {
            Ok(Action::Subscribe(c)) => self.subscribe(ctx, c).await,
            Ok(Action::Unsubscribe(c)) => self.unsubscribe(ctx, c).await,
            Ok(Action::Ping) => ctx.send_text(&envelope::reply("pong", json!({}))),
            Err(Invalid(code, message)) => self.error(ctx, code, &message, None),
        }
        Ok(())
    }

    fn rate_limited(&mut self, ctx: &SessionCtx) {
        let l = &ctx.node.config().limits;
        self.error(
            ctx,
            ErrorCode::RateLimited,
            &format!(
                "at most {} messages per {:?}",
                l.rate_messages, l.rate_window
            ),
            None,
        );
    }

    fn too_large(&mut self, ctx: &SessionCtx) {
        let max = ctx.node.config().limits.max_message_bytes;
        self.error(
            ctx,
            ErrorCode::MessageTooLarge,
            &format!("messages are limited to {max} bytes"),
            None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_actions_and_rejects_the_rest() {
        assert!(matches!(
            parse(br#"{"action":"subscribe","channels":["worker:w1","board:zoo"]}"#),
            Ok(Action::Subscribe(c)) if c.len() == 2
        ));
        assert!(matches!(parse(br#"{"action":"ping"}"#), Ok(Action::Ping)));
        let code = |p: &[u8]| match parse(p) {
            Err(Invalid(c, _)) => c,
            Ok(_) => panic!("accepted"),
        };
        assert_eq!(code(b"{nope"), ErrorCode::BadMessage);
        assert_eq!(code(b"[1]"), ErrorCode::BadMessage);
        assert_eq!(code(br#"{"action":"subscribe"}"#), ErrorCode::BadMessage);
        assert_eq!(
            code(br#"{"action":"subscribe","channels":[1]}"#),
            ErrorCode::BadMessage
        );
        assert_eq!(code(br#"{"action":"dance"}"#), ErrorCode::UnknownAction);
    }
}
