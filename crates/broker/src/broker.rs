//! The `Broker` contract.
//!
//! A broker carries published events to the edge nodes that have members in
//! the events' rooms, and keeps each room's recent history.
//!
//! * **Delivery is at most once.** An event published while a node is not
//!   subscribed to a room, or while the node's connection to the engine is
//!   down, is not delivered live to that node. History makes it recoverable:
//!   [`Broker::history_since`] returns what a room received after an id, or
//!   says plainly that history no longer reaches back that far.
//! * **Order is per room.** Events of one room reach a node's [`EventSink`]
//!   in the order of their ids. Nothing is promised across rooms.
//! * **Ids increase per room.** `publish` assigns each room a stream-style
//!   id `<ms>-<seq>` when the event has none, and the event delivered on a
//!   room carries that room's id; a supplied id must be greater than the
//!   room's last one ([`BrokerError::Conflict`] otherwise).
//! * **Subscribe is idempotent and per node.** The hub calls `subscribe` when
//!   a room gets its first local member and `unsubscribe` after the last one
//!   left; subscribing twice is harmless, and so is unsubscribing a room that
//!   is not subscribed. A broker never subscribes a room on its own, so a node
//!   with no member in a room receives none of its traffic.
//! * **Reconnects are the broker's job.** A broker that loses its engine
//!   reconnects with [`crate::Backoff`], resubscribes every room it holds,
//!   reports `healthy() == false` meanwhile, and calls
//!   [`EventSink::resynced`] once it is back so the hub can fill the gap
//!   from history.
//! * **Thread-safety.** Every method may be called concurrently from any
//!   task; `EventSink::deliver` is called from the broker's own tasks and must
//!   not block.

use std::sync::Arc;

use async_trait::async_trait;
use roomcast_protocol::{Event, EventId, RoomKey, RoomName};

/// Where a broker hands the events of the rooms a node subscribes.
pub trait EventSink: Send + Sync + 'static {
    /// One event received on `room`'s channel. Must return quickly and never
    /// await a client: the hub only enqueues.
    fn deliver(&self, room: &RoomKey, event: Arc<Event>);

    /// Events the broker received together, in order (what one read of its
    /// connection held). A sink may hold an event's frames for a member
    /// until a later event of the same room in this batch, so both leave
    /// in one write; it must not hold anything past the call.
    fn deliver_batch(&self, events: &[(RoomKey, Arc<Event>)]) {
        for (room, event) in events {
            self.deliver(room, event.clone());
        }
    }

    /// The broker lost `room`'s subscription (its connection, or its slot
    /// moved): events published from now on may miss the sink live until
    /// the next [`EventSink::resynced`]. A sink that fills such gaps from
    /// history holds the room's live events until then, so that they follow
    /// the missed ones instead of overtaking them.
    fn interrupted(&self, _room: &RoomKey) {}

    /// The broker's connection was lost and is back, with every room
    /// resubscribed: events published in between may be missing live.
    fn resynced(&self) {}
}

/// The ids an event received, one per room. Each room's history (a Redis
/// stream) assigns its own id, and a client resumes each room from the id it
/// saw in that room; the memory broker gives every room the same id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Published {
    pub ids: Vec<(RoomName, EventId)>,
}

/// What a room's history holds after a given id.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// Events with an id greater than the one asked for, oldest first, at
    /// most the requested limit.
    pub events: Vec<Arc<Event>>,
    /// False when history was trimmed past the requested id: events were lost
    /// for that reader, who must refetch its state.
    pub recovered: bool,
    /// True when more events follow the last one returned (the limit cut it).
    pub more: bool,
}

/// Why a broker call failed.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The engine cannot be reached right now; retrying later may succeed.
    #[error("broker unavailable: {context}")]
    Unavailable {
        context: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The request conflicts with the room's state (e.g. an id not above the last).
    #[error("{0}")]
    Conflict(String),
    /// The publish path is saturated; the publisher should back off.
    #[error("broker overloaded: {0}")]
    Overloaded(String),
}

impl BrokerError {
    pub fn unavailable(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        BrokerError::Unavailable {
            context: context.into(),
            source: Some(Box::new(source)),
        }
    }
}

/// The seam to the engine that carries events between nodes: the embedded
/// [`crate::MemoryBroker`] or Redis (standalone or Cluster).
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Appends the event to the history of each of its rooms and publishes it
    /// on each room's channel, atomically per room. Returns each room's id.
    async fn publish(&self, event: Event) -> Result<Published, BrokerError>;

    /// Publishes the event on each room's channel without storing it:
    /// presence changes and client signals (typing…), which a resuming client
    /// must not replay. Its id stays [`EventId::ZERO`] and it does not move
    /// any room's last id.
    async fn publish_ephemeral(&self, event: Event) -> Result<(), BrokerError>;

    /// Starts receiving `room`'s events on this node's sink.
    async fn subscribe(&self, room: &RoomKey) -> Result<(), BrokerError>;

    /// Stops receiving `room`'s events.
    async fn unsubscribe(&self, room: &RoomKey) -> Result<(), BrokerError>;

    /// The room's events after `since`, oldest first, at most `limit`.
    /// `since == EventId::ZERO` reads from the oldest event kept.
    async fn history_since(
        &self,
        room: &RoomKey,
        since: EventId,
        limit: usize,
    ) -> Result<History, BrokerError>;

    /// Whether the engine is reachable and every subscription is in place.
    fn healthy(&self) -> bool;

    /// A short name for logs and metrics (`memory`, `redis`, `redis-cluster`).
    fn kind(&self) -> &'static str;

    /// The broker's presence store, when it has one (see [`crate::Presence`]).
    fn presence(&self) -> Option<&dyn crate::Presence> {
        None
    }

    /// The broker's cluster-wide counters, when it has them (see
    /// [`crate::Counters`]): rate limits that hold across every node.
    fn counters(&self) -> Option<&dyn crate::Counters> {
        None
    }
}
