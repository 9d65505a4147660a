//! roomcast's contract and wire types: identifier newtypes, the [`Event`]
//! envelope (protobuf and JSON forms) and the native protocol's frames.
//!
//! This crate does no I/O and depends on nothing of roomcast's: the broker,
//! the edge server and the dialects all speak in its types.

mod event;
mod ids;
pub mod native;

/// Types generated from `proto/roomcast.proto`.
#[allow(unreachable_pub, clippy::all)] // generated code
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/roomcast.v1.rs"));
}

pub use event::{
    Body, Event, EventDefaults, EventError, EventJson, ProtoBodyJson, CONTRACT_VERSION,
    MAX_ROOMS_PER_EVENT, MAX_TYPE_LEN,
};
pub use ids::{
    EventId, EventIdError, IdError, NodeId, RoomKey, RoomName, SessionId, TenantId, UserId,
    MAX_ID_LEN, MAX_ROOM_KIND_LEN, MAX_ROOM_LEN,
};

/// The proto source, shipped so clients in other languages can generate code from it.
pub const PROTO_SOURCE: &str = include_str!("../proto/roomcast.proto");
