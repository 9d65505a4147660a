//! The long-poll transport, shared by every dialect that offers a polling
//! fallback. A dialect authenticates and authorises the request and hands
//! [`serve`] a [`PollAccepted`]; the answer is a JSON array of the dialect's
//! rendered events:
//!
//! 1. with a position (`since`), each room's history after it, merged in id
//!    order (an event in several of the rooms once, through the first of
//!    them, as the hub delivers it), returned at once when not empty;
//! 2. otherwise (nothing missed, or no position) a temporary session joins
//!    the rooms (resuming from the position, so nothing published between
//!    the history read and the join is lost) and the answer is the first
//!    batch of events it receives, or `[]` after the wait. A drain ends the
//!    wait early. The session then leaves.
//!
//! The response carries `X-Roomcast-Recovered: false` when history no
//! longer reached back to the position (the client must refetch).

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{header, Request, Response, StatusCode};
use hyper::body::Incoming;
use roomcast_auth::Identity;
use roomcast_protocol::native::ErrorCode;
use roomcast_protocol::{Event, EventId, RoomKey, RoomName};

use crate::config::Limits;
use crate::dialect::Refusal;
use crate::http::{json_error, Body};
use crate::node::{ConnectionSlot, Node};
use crate::outbox::Next;
use crate::session::{Renderer, Session};

/// Most events one poll answers per room from history; the client polls
/// again from the last one for more.
pub(crate) const MAX_POLL_EVENTS: usize = 500;

/// A [`Renderer`] of poll answers' elements: the dialect's JSON for one
/// event, without framing.
pub(crate) struct ItemRenderer {
    slot: usize,
    render: Box<crate::sse::RenderData>,
}

impl ItemRenderer {
    pub(crate) fn new(
        slot: usize,
        render: impl Fn(&Event, &RoomName) -> Option<Bytes> + Send + Sync + 'static,
    ) -> Self {
        Self {
            slot,
            render: Box::new(render),
        }
    }
}

impl Renderer for ItemRenderer {
    fn slot(&self) -> usize {
        self.slot
    }

    fn render(&self, event: &Event, room: &RoomName) -> Option<Bytes> {
        (self.render)(event, room)
    }
}

/// What a dialect decided for one poll.
pub(crate) struct PollAccepted {
    pub(crate) identity: Identity,
    /// Renders one array element per event (a JSON document, no framing).
    pub(crate) renderer: Arc<dyn Renderer>,
    /// Rooms to read, already authorised.
    pub(crate) rooms: Vec<RoomName>,
    /// Events after this id, in every room; `None`: live events only.
    pub(crate) since: Option<EventId>,
    /// How long to wait for a live event when nothing was missed.
    pub(crate) wait: Duration,
    pub(crate) limits: Limits,
}

/// Serves one poll: the dialect's `accept` (its refusal as JSON), then the
/// history read, then the wait (counted by the node's connection cap).
pub(crate) async fn serve<F, Fut>(
    node: Arc<Node>,
    req: Request<Incoming>,
    accept: F,
) -> Response<Body>
where
    F: FnOnce(http::request::Parts) -> Fut,
    Fut: std::future::Future<Output = Result<PollAccepted, Refusal>>,
{
    let (parts, _body) = req.into_parts();
    let accepted = match accept(parts).await {
        Ok(a) => a,
        Err(refusal) => return refusal.into_response(),
    };
    let mut recovered = true;
    if let Some(since) = accepted.since {
        match missed(&node, &accepted, since).await {
            Ok((items, rec)) if !items.is_empty() || !rec || accepted.wait.is_zero() => {
                return array(&items, rec)
            }
            Ok((_, rec)) => recovered = rec,
            Err(e) => {
                tracing::warn!(error = %e, "poll history read failed");
                return json_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ErrorCode::InternalError,
                    "history is unavailable; retry",
                );
            }
        }
    } else if accepted.wait.is_zero() {
        return array(&[], true);
    }
    let Some(slot) = node.try_reserve_connection() else {
        return Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::ConnectionLimit,
            "node is at its connection limit or draining; retry another node",
            "connection_limit",
        )
        .into_response();
    };
    // The wait runs in its own task: if the client hangs up, this handler is
    // dropped but the session still leaves its rooms.
    let waited = tokio::spawn(wait_live(node, slot, accepted)).await;
    match waited {
        Ok(Ok(items)) => array(&items, recovered),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "poll join failed");
            json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::InternalError,
                "rooms could not be subscribed; retry",
            )
        }
        Err(_) => json_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::InternalError,
            "poll failed",
        ),
    }
}

/// Each room's history after `since`, merged in id order, rendered.
async fn missed(
    node: &Node,
    accepted: &PollAccepted,
    since: EventId,
) -> Result<(Vec<Bytes>, bool), roomcast_broker::BrokerError> {
    let identity = &accepted.identity;
    let mut found: Vec<(EventId, RoomName, Arc<Event>)> = Vec::new();
    let mut recovered = true;
    // When a room has more than one page, the answer stops at its last id
    // so that the next poll (from the answer's last id) misses nothing.
    let mut cutoff: Option<EventId> = None;
    for room in &accepted.rooms {
        let key = RoomKey::new(identity.tenant.clone(), room.clone());
        let page = node
            .broker()
            .history_since(&key, since, MAX_POLL_EVENTS)
            .await?;
        recovered &= page.recovered;
        if page.more {
            if let Some(last) = page.events.last() {
                cutoff = Some(cutoff.map_or(last.id, |c| c.min(last.id)));
            }
        }
        for event in page.events {
            let position = event.rooms.iter().position(|r| r == room).unwrap_or(0);
            let earlier = &event.rooms[..position];
            if earlier.iter().any(|r| accepted.rooms.contains(r)) {
                continue;
            }
            if !event.audience.is_empty() && !event.audience_allows(&identity.roles) {
                continue;
            }
            if event.exclude_users.contains(&identity.user) {
                continue;
            }
            found.push((event.id, room.clone(), event));
        }
    }
    found.sort_by_key(|(id, _, _)| *id);
    if let Some(cutoff) = cutoff {
        found.retain(|(id, _, _)| *id <= cutoff);
    }
    let items = found
        .iter()
        .filter_map(|(_, room, event)| accepted.renderer.render(event, room))
        .collect();
    Ok((items, recovered))
}

/// Joins with a temporary session and waits for the first live batch.
async fn wait_live(
    node: Arc<Node>,
    slot: ConnectionSlot,
    accepted: PollAccepted,
) -> Result<Vec<Bytes>, roomcast_broker::BrokerError> {
    let PollAccepted {
        identity,
        renderer,
        rooms,
        since,
        wait,
        limits,
    } = accepted;
    let session = Session::for_identity("p", &identity, renderer, &limits);
    node.register(&session);
    let mut result = Ok(());
    let mut resumes = Vec::new();
    for room in rooms {
        let joined = match since {
            Some(since) => node
                .hub()
                .join_resuming(&session, room, since)
                .await
                .map(|r| resumes.push(r)),
            None => node.hub().join(&session, room).await.map(|_| ()),
        };
        if let Err(e) = joined {
            result = Err(e);
            break;
        }
    }
    for resume in resumes {
        resume.replay(&session);
    }
    let items = match result {
        Ok(()) => {
            let next = tokio::time::timeout(wait, session.outbox.next()).await;
            Ok(match next {
                Ok(Next::Write(frames)) | Ok(Next::Close(frames, _)) => frames.into(),
                Err(_) => Vec::new(),
            })
        }
        Err(e) => Err(e),
    };
    session
        .outbox
        .close(crate::disconnect::Disconnect::CLIENT_GONE, false);
    node.hub().leave_all(&session).await;
    node.unregister(&session.id);
    drop(slot);
    items
}

/// `[item,item,...]` as the response body.
fn array(items: &[Bytes], recovered: bool) -> Response<Body> {
    let mut out = BytesMut::with_capacity(2 + items.iter().map(|i| i.len() + 1).sum::<usize>());
    out.put_u8(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.put_u8(b',');
        }
        out.put_slice(item);
    }
    out.put_u8(b']');
    let mut b = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-store");
    if !recovered {
        b = b.header("x-roomcast-recovered", "false");
    }
    b.body(Body::new(out.freeze()))
        .expect("static response parts are valid")
}
