//! `GET /api/v1/activity`: the missed updates of a reconnecting client, read
//! from the rooms' history ("fetch missed updates via REST API: query
//! activity log since last_seen_timestamp").
//!
//! ```text
//! GET /api/v1/activity?since=<ms | event id>&project_ids=p1,p2&sprint_ids=s1&work_item_ids=t1
//! Authorization: Bearer <jwt>
//! → 200 application/x-protobuf  BatchUpdate{messages, complete}
//!   x-activity-complete: true|false
//! → 400 / 401 / 403 / 405 / 503 application/x-protobuf  ErrorResponse
//! ```
//!
//! `since` is the client's `last_received_timestamp` (the `timestamp` of the
//! last WebSocketMessage it received, ms) or that message's `message_id`
//! (an event id, exact). The answer holds each event of those rooms
//! published after it, once (an event in several of the rooms is one
//! message), oldest first, rendered exactly as on the WebSocket.
//! `complete: false` says history no longer reaches back that far or the
//! answer was cut at `activity_max_events`: the client must refetch.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::Full;
use prost::Message as _;
use roomcast_auth::{Decision, Identity};
use roomcast_protocol::{Body as EventBody, Event, EventId, RoomName};

use super::connection::KINDS;
use super::wire::{self, pb, Code};
use super::Seed001;
use crate::http::Body;
use crate::node::Node;

/// How far before `since` history is read: one event has slightly different
/// ids in its rooms (and its publish time comes from another clock), so its
/// copies are gathered from a little earlier and judged together.
const MARGIN_MS: u64 = 5_000;
/// History page size.
const PAGE: usize = 500;

/// Where the client's last update was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Since {
    /// `last_received_timestamp`: events with a later `ts`.
    Ms(u64),
    /// A `message_id`: events whose ids are all later.
    Id(EventId),
}

impl Since {
    fn parse(s: &str) -> Option<Since> {
        if s.contains('-') {
            s.parse().ok().map(Since::Id)
        } else {
            s.parse().ok().map(Since::Ms)
        }
    }

    /// The position the client itself is at, for the history's verdict on
    /// whether nothing was lost.
    fn exact(self) -> EventId {
        match self {
            Since::Ms(ms) => EventId::new(ms, 0),
            Since::Id(id) => id,
        }
    }

    /// Where to start reading each room's history.
    fn read_from(self) -> EventId {
        let ms = match self {
            Since::Ms(ms) => ms,
            Since::Id(id) => id.ms,
        };
        EventId::new(ms.saturating_sub(MARGIN_MS), 0)
    }
}

fn error(status: StatusCode, code: Code, message: &str, field: &str) -> Response<Body> {
    metrics::counter!("roomcast_client_errors_total", "code" => code.as_str()).increment(1);
    let body = pb::ErrorResponse {
        error_code: code.as_str().to_owned(),
        error_message: message.to_owned(),
        request_message_id: String::new(),
        field_name: field.to_owned(),
    };
    protobuf(status, body.encode_to_vec(), None)
}

fn protobuf(status: StatusCode, body: Vec<u8>, complete: Option<bool>) -> Response<Body> {
    let mut r = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/x-protobuf")
        .header(header::CACHE_CONTROL, "no-store");
    if let Some(c) = complete {
        r = r.header("x-activity-complete", if c { "true" } else { "false" });
    }
    r.body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

/// The query: `since` and the rooms it names (comma-separated ids, or the
/// parameter repeated).
fn parse_query(
    query: &str,
    max_rooms: usize,
) -> Result<(Since, Vec<RoomName>), (String, &'static str)> {
    let mut since = None;
    let mut rooms: Vec<RoomName> = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v = roomcast_auth::percent_decode(v)
            .ok_or(("not valid percent-encoding".to_owned(), "query"))?;
        if k == "since" {
            since = Some(Since::parse(&v).ok_or((
                "`since` is a ms timestamp or a message_id (<ms>-<seq>)".to_owned(),
                "since",
            ))?);
            continue;
        }
        let Some((kind, field)) = KINDS.iter().find(|(_, f)| *f == k) else {
            continue;
        };
        for id in v.split(',').filter(|id| !id.is_empty()) {
            let room = RoomName::from_parts(kind, id).map_err(|_| {
                (
                    format!(
                        "not a valid id: {}",
                        id.chars().take(64).collect::<String>()
                    ),
                    *field,
                )
            })?;
            if !rooms.contains(&room) {
                rooms.push(room);
            }
        }
    }
    let since = since.ok_or(("`since` is required".to_owned(), "since"))?;
    if rooms.is_empty() {
        return Err((
            "name at least one of project_ids, sprint_ids, work_item_ids".to_owned(),
            "project_ids",
        ));
    }
    if rooms.len() > max_rooms {
        return Err((format!("at most {max_rooms} ids"), "project_ids"));
    }
    Ok((since, rooms))
}

/// One event as published, whichever room's copy: its copies share the
/// publish time, type, actor and body.
fn same_event_key(e: &Event) -> (u64, Arc<str>, Option<Arc<str>>, Bytes) {
    let body = match &e.body {
        EventBody::Json(b) => b.clone(),
        EventBody::Proto { value, .. } => value.clone(),
    };
    (e.ts, e.kind.clone(), e.actor.clone(), body)
}

pub(super) async fn handle(
    dialect: &Seed001,
    node: &Arc<Node>,
    parts: &http::request::Parts,
) -> Response<Body> {
    let identity = match dialect.identify(parts) {
        Ok(i) => i,
        Err(refusal) => {
            metrics::counter!("roomcast_auth_failures_total", "reason" => refusal.reason)
                .increment(1);
            return error(
                StatusCode::UNAUTHORIZED,
                Code::AuthenticationFailed,
                &refusal.message,
                "",
            );
        }
    };
    let s = &dialect.settings;
    let (since, rooms) = match parse_query(parts.uri.query().unwrap_or(""), s.max_subscriptions) {
        Ok(q) => q,
        Err((message, field)) => {
            return error(
                StatusCode::BAD_REQUEST,
                Code::ValidationError,
                &message,
                field,
            )
        }
    };
    if s.authorize_rooms {
        for room in &rooms {
            if let Decision::Deny(_) = node.authorizer().authorize(&identity, room).await {
                return error(
                    StatusCode::FORBIDDEN,
                    Code::AuthorizationFailed,
                    &format!("not allowed: {room}"),
                    "",
                );
            }
        }
    }
    match collect(node, &identity, since, &rooms, s.activity_max_events).await {
        Ok((messages, complete)) => {
            let batch = pb::BatchUpdate { messages, complete };
            protobuf(StatusCode::OK, batch.encode_to_vec(), Some(complete))
        }
        Err(e) => {
            tracing::warn!(error = %e, "activity: history unavailable");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                Code::InternalError,
                "history is unavailable; retry",
                "",
            )
        }
    }
}

/// The missed events of `rooms`, once each, oldest first, at most `max`.
async fn collect(
    node: &Node,
    identity: &Identity,
    since: Since,
    rooms: &[RoomName],
    max: usize,
) -> Result<(Vec<pb::WebSocketMessage>, bool), roomcast_broker::BrokerError> {
    let mut complete = true;
    // One entry per event: its copies' smallest id, and the event.
    let mut events: HashMap<_, (EventId, Arc<Event>)> = HashMap::new();
    for room in rooms {
        let key = identity.room_key(room.clone());
        let mut cursor = since.read_from();
        let mut read = 0;
        loop {
            let page = node.broker().history_since(&key, cursor, PAGE).await?;
            if !page.recovered && cursor == since.read_from() {
                // Trimmed past the margin: is `since` itself still covered?
                let exact = node.broker().history_since(&key, since.exact(), 1).await?;
                complete &= exact.recovered;
            }
            read += page.events.len();
            if let Some(last) = page.events.last() {
                cursor = last.id;
            }
            for e in page.events {
                events
                    .entry(same_event_key(&e))
                    .and_modify(|(first, _)| *first = (*first).min(e.id))
                    .or_insert((e.id, e));
            }
            if !page.more {
                break;
            }
            // Past what one answer may carry (with the margin): stop reading.
            if read > max + PAGE {
                complete = false;
                break;
            }
        }
    }
    let mut missed: Vec<(EventId, Arc<Event>)> = events
        .into_values()
        .filter(|(first, e)| match since {
            Since::Ms(ms) => e.ts > ms,
            Since::Id(id) => *first > id,
        })
        .filter(|(_, e)| {
            e.audience_allows(&identity.roles) && !e.exclude_users.contains(&identity.user)
        })
        .collect();
    missed.sort_by_key(|(first, e)| (e.ts, *first));
    let mut messages = Vec::new();
    for (first, event) in missed {
        if messages.len() == max {
            complete = false;
            break;
        }
        let mut event = (*event).clone();
        event.id = first;
        match wire::event_message(&event) {
            // Typing is stale by the time a client catches up.
            Some(pb::WebSocketMessage {
                payload: Some(pb::web_socket_message::Payload::UserTyping(_)),
                ..
            }) => {}
            Some(m) => messages.push(m),
            None => {}
        }
    }
    Ok((messages, complete))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_names_since_and_rooms() {
        let (since, rooms) = parse_query(
            "since=1700000000000&project_ids=p1,p2&sprint_ids=s%2D1&work_item_ids=&project_ids=p1",
            10,
        )
        .unwrap();
        assert_eq!(since, Since::Ms(1_700_000_000_000));
        let rooms: Vec<&str> = rooms.iter().map(|r| r.as_str()).collect();
        assert_eq!(rooms, ["project:p1", "project:p2", "sprint:s-1"]);
        let (since, _) = parse_query("since=1700000000000-4&work_item_ids=t1", 10).unwrap();
        assert_eq!(since, Since::Id("1700000000000-4".parse().unwrap()));
    }

    #[test]
    fn bad_queries_name_their_field() {
        let field = |q: &str| parse_query(q, 2).unwrap_err().1;
        assert_eq!(field("project_ids=p1"), "since");
        assert_eq!(field("since=abc&project_ids=p1"), "since");
        assert_eq!(field("since=1"), "project_ids");
        assert_eq!(field("since=1&sprint_ids=a%20b"), "sprint_ids");
        assert_eq!(field("since=1&project_ids=a,b,c"), "project_ids");
        assert_eq!(field("since=1&project_ids=%zz"), "query");
    }
}
