//! The edge server: the [`Node`] that holds client sessions, the [`Hub`]
//! (local room index and fan-out), the WebSocket transport, the native
//! protocol, the publish API, health and metrics.
//!
//! Depends on the contract (`roomcast-protocol`), the broker seam
//! (`roomcast-broker`) and credentials (`roomcast-auth`); it never names a
//! concrete remote broker: the binary wires Redis in through [`Node::build`].

mod auth;
pub mod config;
pub mod dialect;
pub mod dialects;
mod disconnect;
mod frame;
mod http;
mod hub;
mod ids;
mod lag;
mod metrics;
mod native;
mod node;
mod outbox;
mod poll;
mod publish;
mod ratelimit;
mod session;
mod sse;
mod uring;
pub mod ws;
mod wsread;

pub use config::Config;
pub use dialect::{Accepted, Connection, Dialect, Inbound, JoinError, Refusal, SessionCtx};
pub use disconnect::Disconnect;
pub use hub::{Hub, Joined, Resume, MAX_REPLAY};
pub use metrics::prometheus;
pub use native::Format;
pub use node::{history_policy, Node, NodeError};
pub use publish::PUBLISHER_ROLE;
pub use session::{Renderer, Session, MAX_RENDER_SLOTS};
