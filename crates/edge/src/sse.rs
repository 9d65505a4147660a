//! The Server-Sent Events transport, shared by every dialect that offers an
//! SSE fallback. A dialect authenticates and authorises the request (its own
//! rules) and hands [`serve`] an [`SseAccepted`]: who the client is, the
//! rooms, where to resume from and an SSE [`Renderer`] (see [`SseRenderer`]).
//!
//! The stream is an ordinary session: registered with the node (so a drain
//! ends it and the connection cap counts it), its outbox holds ready-made
//! SSE chunks (rendered once per event per renderer, like WebSocket frames)
//! and a full outbox cuts the client off as a slow consumer. Heartbeat
//! comments keep proxies from timing the stream out. When the client goes
//! away the session leaves its rooms and unregisters.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use roomcast_auth::Identity;
use roomcast_protocol::native::ErrorCode;
use roomcast_protocol::{Event, EventId, RoomName};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::Limits;
use crate::dialect::Refusal;
use crate::disconnect::Disconnect;
use crate::http::{json_error, Body};
use crate::node::{ConnectionSlot, Node};
use crate::outbox::Next;
use crate::session::{Renderer, Session};

/// Renders an event's SSE `data:` payload (one JSON document, usually).
pub(crate) type RenderData = dyn Fn(&Event, &RoomName) -> Option<Bytes> + Send + Sync;

/// A [`Renderer`] whose frames are whole SSE events: `id:` is the event id
/// (what `Last-Event-ID` resumes from), `data:` what the dialect renders.
pub(crate) struct SseRenderer {
    slot: usize,
    data: Box<RenderData>,
}

impl SseRenderer {
    pub(crate) fn new(
        slot: usize,
        data: impl Fn(&Event, &RoomName) -> Option<Bytes> + Send + Sync + 'static,
    ) -> Self {
        Self {
            slot,
            data: Box::new(data),
        }
    }
}

impl Renderer for SseRenderer {
    fn slot(&self) -> usize {
        self.slot
    }

    fn render(&self, event: &Event, room: &RoomName) -> Option<Bytes> {
        let data = (self.data)(event, room)?;
        let id = (event.id != EventId::ZERO).then_some(event.id);
        Some(sse_event(id, None, &data))
    }
}

/// One SSE event: optional `id:` and `event:` lines, the data split into
/// `data:` lines (SSE joins them back with `\n`), and the blank line.
pub(crate) fn sse_event(id: Option<EventId>, name: Option<&str>, data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + 48);
    if let Some(id) = id {
        out.put_slice(format!("id: {id}\n").as_bytes());
    }
    if let Some(name) = name {
        out.put_slice(b"event: ");
        out.put_slice(name.as_bytes());
        out.put_u8(b'\n');
    }
    for line in data.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        out.put_slice(b"data: ");
        out.put_slice(line);
        out.put_u8(b'\n');
    }
    out.put_u8(b'\n');
    out.freeze()
}

/// The comment sent every heartbeat interval.
const HEARTBEAT: &[u8] = b": heartbeat\n\n";

/// What a dialect decided before the stream opens.
pub(crate) struct SseAccepted {
    pub(crate) identity: Identity,
    /// An SSE renderer (frames are whole SSE events).
    pub(crate) renderer: Arc<dyn Renderer>,
    /// Rooms to join, already authorised.
    pub(crate) rooms: Vec<RoomName>,
    /// Resume every room after this id (`Last-Event-ID`).
    pub(crate) since: Option<EventId>,
    /// Interval of heartbeat comments.
    pub(crate) heartbeat: Duration,
    pub(crate) limits: Limits,
    /// Transport label for metrics.
    pub(crate) transport: &'static str,
    /// The first event of the stream, given what was joined (e.g. the
    /// native `subscribed` reply); queued before any replayed event.
    pub(crate) opening: Opening,
}

/// The rooms an SSE stream holds, and whether each resumed without a gap.
pub(crate) struct Opened {
    pub(crate) rooms: Vec<RoomName>,
    /// Per room, when resuming: `false` means history no longer reached back.
    pub(crate) recovered: BTreeMap<String, bool>,
}

/// The resume position a request carries: the `Last-Event-ID` header (set
/// by `EventSource` on reconnect), else the `lastEventId` or
/// `last_event_id` query parameter. `Err` for one that is not an event id.
pub(crate) fn last_event_id(parts: &http::request::Parts) -> Result<Option<EventId>, Refusal> {
    let raw = parts
        .headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| crate::http::query_param(parts.uri.query(), "lastEventId"))
        .or_else(|| crate::http::query_param(parts.uri.query(), "last_event_id"));
    match raw.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(s) => s.parse().map(Some).map_err(|_| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidMessage,
                "Last-Event-ID must be an event id <ms>-<seq>",
                "bad_last_event_id",
            )
        }),
    }
}

/// Serves one SSE request: the node's connection cap (503), the dialect's
/// `accept` (401/403/400 as JSON, before any streaming), the joins (503 when
/// the broker cannot subscribe), then a `200 text/event-stream` whose body
/// the session's pump feeds until the client leaves or the server ends it.
pub(crate) async fn serve<F, Fut>(
    node: Arc<Node>,
    req: Request<Incoming>,
    accept: F,
) -> Response<Body>
where
    F: FnOnce(http::request::Parts) -> Fut,
    Fut: std::future::Future<Output = Result<SseAccepted, Refusal>>,
{
    let Some(slot) = node.try_reserve_connection() else {
        return Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::ConnectionLimit,
            "node is at its connection limit or draining; retry another node",
            "connection_limit",
        )
        .into_response();
    };
    let (parts, _body) = req.into_parts();
    let accepted = match accept(parts).await {
        Ok(a) => a,
        Err(refusal) => return refusal.into_response(),
    };
    // Opened in its own task: a client that hangs up meanwhile drops this
    // handler, not the half-joined session, which then cleans up itself.
    let (answer, answered) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _ = answer.send(open(node, slot, accepted).await);
    });
    answered.await.unwrap_or_else(|_| {
        json_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::InternalError,
            "the stream could not be opened",
        )
    })
}

/// Creates the session, joins (resuming), queues the opening and replays,
/// then starts the pump and answers with the streaming response.
async fn open(node: Arc<Node>, slot: ConnectionSlot, accepted: SseAccepted) -> Response<Body> {
    let SseAccepted {
        identity,
        renderer,
        rooms,
        since,
        heartbeat,
        limits,
        transport,
        opening,
    } = accepted;
    let session = Session::for_identity("s", &identity, renderer, &limits);
    node.register(&session);
    // An early comment, so the head and a first chunk go out at once.
    let _ = session.outbox.push(Bytes::from_static(b": open\n\n"));
    if since.is_none() {
        // Live events wait while the rooms are joined, so the opening (sent
        // once every room is joined) comes first and means "subscribed".
        for room in &rooms {
            session.begin_replay(room);
        }
    }
    let mut resumes = Vec::new();
    let mut recovered = BTreeMap::new();
    for room in &rooms {
        let joined = match since {
            Some(since) => node
                .hub()
                .join_resuming(&session, room.clone(), since)
                .await
                .map(|resume| {
                    recovered.insert(room.to_string(), resume.recovered);
                    resumes.push(resume);
                }),
            None => node.hub().join(&session, room.clone()).await.map(|_| ()),
        };
        if let Err(e) = joined {
            tracing::warn!(session = %session.id, error = %e, "sse join failed");
            for resume in resumes {
                resume.replay(&session);
            }
            for room in &rooms {
                session.end_replay(room, EventId::ZERO);
            }
            node.hub().leave_all(&session).await;
            node.unregister(&session.id);
            return json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::InternalError,
                "rooms could not be subscribed; retry",
            );
        }
    }
    // Every room holds its live events until replayed (or released): the
    // opening comes first.
    push_opening(&session, opening, rooms.clone(), recovered);
    if since.is_none() {
        for room in &rooms {
            session.end_replay(room, EventId::ZERO);
        }
    }
    // Missed events, in order, then the live ones held meanwhile.
    for resume in resumes {
        resume.replay(&session);
    }
    let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
    metrics::gauge!("roomcast_connections", "transport" => transport).increment(1.0);
    metrics::counter!("roomcast_connections_total", "transport" => transport).increment(1);
    tracing::debug!(session = %session.id, user = %identity.user, tenant = %identity.tenant, transport, "sse session open");
    let expires = crate::ws::token_deadline(identity.expires_at + node.config().auth.leeway_secs);
    tokio::spawn(pump(node, slot, session, tx, heartbeat, expires, transport));
    let response = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", HeaderValue::from_static("no"))
        .body(Body::default())
        .expect("static response parts are valid");
    crate::http::streaming(response, rx)
}

type Opening = Option<Box<dyn FnOnce(&Opened) -> Option<Bytes> + Send>>;

fn push_opening(
    session: &Session,
    opening: Opening,
    rooms: Vec<RoomName>,
    recovered: BTreeMap<String, bool>,
) {
    if let Some(first) = opening.and_then(|f| f(&Opened { rooms, recovered })) {
        let _ = session.outbox.push(first);
    }
}

/// Chunks in flight between the pump and the HTTP connection; beyond it the
/// outbox holds them (and overflows for a slow consumer).
const CHANNEL_CHUNKS: usize = 8;

/// How long one chunk may wait for the connection to take it before the
/// client counts as a slow consumer.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Moves the session's queued chunks into the response body, adds the
/// heartbeats and ends the stream; then cleans up.
async fn pump(
    node: Arc<Node>,
    slot: ConnectionSlot,
    session: Arc<Session>,
    tx: mpsc::Sender<Bytes>,
    heartbeat: Duration,
    expires: Instant,
    transport: &'static str,
) {
    let heartbeat = heartbeat.max(Duration::from_millis(10));
    let mut beat = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
    let send = |chunk: Bytes| {
        let tx = &tx;
        async move {
            match tokio::time::timeout(SEND_TIMEOUT, tx.send(chunk)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(Disconnect::CLIENT_GONE),
                Err(_) => Err(Disconnect::SLOW_CONSUMER),
            }
        }
    };
    let mut expired = false;
    let reason = 'stream: loop {
        let next = tokio::select! {
            biased;
            _ = tx.closed() => break Disconnect::CLIENT_GONE,
            _ = tokio::time::sleep_until(expires), if !expired => {
                expired = true;
                session.outbox.close(Disconnect::TOKEN_EXPIRED, true);
                continue;
            }
            _ = beat.tick() => {
                let _ = session.outbox.push(Bytes::from_static(HEARTBEAT));
                continue;
            }
            next = session.outbox.next() => next,
        };
        match next {
            Next::Write(chunks) => {
                for chunk in chunks {
                    if let Err(d) = send(chunk).await {
                        break 'stream d;
                    }
                }
            }
            Next::Close(chunks, disconnect) => {
                for chunk in chunks {
                    if let Err(d) = send(chunk).await {
                        break 'stream d;
                    }
                }
                let _ = send(close_event(disconnect)).await;
                break disconnect;
            }
        }
    };
    session.outbox.close(reason, false);
    drop(tx);
    node.hub().leave_all(&session).await;
    node.unregister(&session.id);
    metrics::gauge!("roomcast_connections", "transport" => transport).decrement(1.0);
    metrics::counter!("roomcast_disconnects_total", "reason" => reason.label).increment(1);
    tracing::debug!(session = %session.id, reason = reason.label, "sse session closed");
    drop(slot);
}

/// The last event of a stream the server ends: `event: close` with the
/// close code table's code and reason (clients reconnect when `reconnect`).
fn close_event(d: Disconnect) -> Bytes {
    let data = serde_json::json!({
        "code": d.code,
        "reason": d.reason,
        "reconnect": d.reconnect,
    });
    sse_event(None, Some("close"), data.to_string().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_data_lines_and_carry_the_id() {
        let e = sse_event(Some(EventId::new(5, 1)), None, b"{\"a\":\n1}");
        assert_eq!(&e[..], b"id: 5-1\ndata: {\"a\":\ndata: 1}\n\n");
        let e = sse_event(None, Some("close"), b"x");
        assert_eq!(&e[..], b"event: close\ndata: x\n\n");
    }
}
