//! The broker seam: the [`Broker`] trait (read its module docs: they are the
//! contract every implementation keeps), the in-memory [`MemoryBroker`] that
//! makes a single node complete with no engine, history caps, the optional
//! [`Presence`] capability (with [`MemoryPresence`]), the optional cluster-wide
//! [`Counters`] capability (with [`MemoryCounters`]), and the one reconnect
//! [`Backoff`].
//!
//! Depends only on `roomcast-protocol`; knows nothing of sockets or dialects.

mod backoff;
mod broker;
mod counters;
mod history;
mod memory;
mod presence;

pub use backoff::Backoff;
pub use broker::{Broker, BrokerError, EventSink, History, Published};
pub use counters::{fixed_window, Counters, MemoryCounters};
pub use history::{HistoryCap, HistoryPolicy};
pub use memory::MemoryBroker;
pub use presence::{MemoryPresence, Presence, PresenceChange, PresenceEntry};
