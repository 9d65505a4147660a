//! The Redis broker: roomcast's [`Broker`](roomcast_broker::Broker) contract
//! on Redis standalone or Redis Cluster (see docs/redis.md).
//!
//! * Each room has one pub/sub channel, one capped history stream and one
//!   trim mark, `<prefix>{<tenant>/<room>}:c`, `:h` and `:t`, sharing a hash
//!   tag so they live in one Cluster slot.
//! * Publishing runs [`PUBLISH_SCRIPT`] per room: `XADD` (the stream entry
//!   id is the event id) + trim + `PUBLISH`/`SPUBLISH` of `<id>\n<envelope>`,
//!   atomically on the room's shard.
//! * Subscribing holds one Redis subscription per room per node on a fixed
//!   set of connections (one per standalone server or per Cluster master),
//!   driven by one actor task that reconnects with backoff, resubscribes
//!   every wanted room, follows moved slots, and then tells the sink to
//!   resync from history.
//! * Presence (`impl roomcast_broker::Presence for RedisBroker`): per-session
//!   entries in `:p` (HASH), `:pz` (ZSET of expiries) and `:pu` (HASH of
//!   per-user counts) under the room's hash tag, changed only by Lua scripts
//!   so joins, leaves and lapses are decided atomically per room; a registry
//!   sharded over [`PRESENCE_REGISTRY_SHARDS`] keys lets any node's sweep
//!   find the rooms with lapsed sessions.
//! * Counters (`impl roomcast_broker::Counters for RedisBroker`): one
//!   fixed-window key per counter and window, `<prefix>{ctr:<key>}:<n>`,
//!   counted by [`HIT_SCRIPT`] (`INCR` + `PEXPIRE`, atomically).
//!
//! Depends on `roomcast-broker` and `roomcast-protocol` only; knows nothing
//! of sockets, sessions or dialects.

mod actor;
mod broker;
mod commands;
mod config;
mod counters;
mod history;
mod lanes;
mod link;
mod names;
mod presence;
mod resp;
mod script;
mod subscriber;
mod tls;
mod topology;

pub use broker::{parse_room_channel, publish_direct, room_channel, room_stream, RedisBroker};
pub use config::{ConfigError, RedisConfig, RedisMode, RedisTls};
pub use counters::{counter_key, HIT_SCRIPT};
pub use presence::{PRESENCE_KEY_GRACE, PRESENCE_REGISTRY_SHARDS};
pub use script::{publish_script_sha, PUBLISH_SCRIPT};
