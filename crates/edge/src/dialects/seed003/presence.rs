//! `presence:update` snapshots: each socket keeps an entry in the broker's
//! presence store under its user's room (`user:<id>`), refreshed on a timer
//! and on `presence:heartbeat`, lapsing after the TTL; on connect,
//! heartbeat and disconnect the user's snapshot (every live socket of that
//! user, across nodes) is published, ephemeral, to the namespace-wide room
//! and to `user:<id>` (delivered once to a socket in both). A user whose
//! last socket lapsed (its node crashed) is announced by the presence sweep
//! as `presence.left`, which the renderer turns into the offline snapshot.

use std::sync::Arc;

use roomcast_broker::PresenceEntry;
use roomcast_protocol::{Body, Event, EventId, RoomKey, RoomName};
use serde_json::{json, Value};

use super::engine::Engine;
use crate::dialect::SessionCtx;
use crate::hub::now_ms;

fn user_key(ctx: &SessionCtx) -> Option<RoomKey> {
    let room = RoomName::from_parts("user", ctx.identity.user.as_str()).ok()?;
    Some(RoomKey::new(ctx.identity.tenant.clone(), room))
}

/// Upserts the socket's entry; with `announce`, broadcasts the snapshot.
pub(crate) async fn refresh(engine: &Engine, ctx: &SessionCtx, announce: bool) {
    let (Some(store), Some(key)) = (ctx.node.broker().presence(), user_key(ctx)) else {
        return;
    };
    let now = now_ms();
    let entry = PresenceEntry {
        session: ctx.session.id.clone(),
        user: ctx.identity.user.clone(),
        node: ctx.node.id().clone(),
        connected_at: ctx.session.connected_at,
        last_seen: now,
        user_agent: ctx.session.user_agent().cloned(),
        ip: ctx.session.ip().cloned(),
    };
    let ttl = engine.shared.settings.presence_ttl;
    if let Err(e) = store.upsert(&key, entry, ttl, now).await {
        tracing::warn!(room = %key, error = %e, "presence refresh failed");
        return;
    }
    if announce {
        broadcast(engine, ctx, &key, now).await;
    }
}

/// Removes the socket's entry and broadcasts the user's snapshot.
pub(crate) async fn remove(engine: &Engine, ctx: &SessionCtx) {
    let (Some(store), Some(key)) = (ctx.node.broker().presence(), user_key(ctx)) else {
        return;
    };
    let now = now_ms();
    if let Err(e) = store.remove(&key, &ctx.session.id, now).await {
        tracing::warn!(room = %key, error = %e, "presence remove failed");
    }
    broadcast(engine, ctx, &key, now).await;
}

async fn broadcast(engine: &Engine, ctx: &SessionCtx, key: &RoomKey, now: u64) {
    let Some(store) = ctx.node.broker().presence() else {
        return;
    };
    let entries = match store.members(key, now).await {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(room = %key, error = %e, "presence members failed");
            return;
        }
    };
    let data = snapshot(ctx.identity.user.as_str(), &entries, now);
    let event = Event {
        id: EventId::ZERO,
        tenant: key.tenant.clone(),
        rooms: vec![engine.shared.broadcast_room.clone(), key.room.clone()],
        kind: Arc::from("presence:update"),
        ts: now,
        actor: Some(Arc::from(ctx.identity.user.as_str())),
        version: None,
        audience: Vec::new(),
        exclude_users: Vec::new(),
        exclude_sessions: Vec::new(),
        body: Body::from_value(&data),
    };
    if let Err(e) = ctx.node.broker().publish_ephemeral(event).await {
        tracing::warn!(room = %key, error = %e, "presence:update not published");
    }
}

/// The seed's `PresenceSnapshot`. `lastSeen` is the newest heartbeat, or
/// now when the last socket just left. `ip` is the client's address as the
/// node saw it (see `trust_forwarded_for`), `null` when unknown.
pub(crate) fn snapshot(user: &str, entries: &[PresenceEntry], now: u64) -> Value {
    let sockets: Vec<Value> = entries
        .iter()
        .map(|e| {
            json!({
                "socketId": e.session.as_str(),
                "connectedAt": e.connected_at,
                "lastSeen": e.last_seen,
                "userAgent": e.user_agent.as_deref(),
                "ip": e.ip.as_deref(),
            })
        })
        .collect();
    let last_seen = entries.iter().map(|e| e.last_seen).max().unwrap_or(now);
    json!({
        "userId": user,
        "isOnline": !entries.is_empty(),
        "lastSeen": last_seen,
        "sockets": sockets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_shape() {
        let e = PresenceEntry {
            session: "s_1".parse().unwrap(),
            user: "u1".parse().unwrap(),
            node: "n1".parse().unwrap(),
            connected_at: 10,
            last_seen: 20,
            user_agent: Some("ua".into()),
            ip: None,
        };
        let mut with_ip = e.clone();
        with_ip.ip = Some("127.0.0.1".into());
        assert_eq!(
            snapshot("u1", &[with_ip], 30)["sockets"][0]["ip"],
            "127.0.0.1"
        );
        let s = snapshot("u1", &[e], 30);
        assert_eq!(s["isOnline"], true);
        assert_eq!(s["lastSeen"], 20);
        assert_eq!(s["sockets"][0]["socketId"], "s_1");
        assert_eq!(s["sockets"][0]["userAgent"], "ua");
        assert!(s["sockets"][0]["ip"].is_null());
        let gone = snapshot("u1", &[], 30);
        assert_eq!(
            (gone["isOnline"].clone(), gone["lastSeen"].clone()),
            (json!(false), json!(30))
        );
    }
}
