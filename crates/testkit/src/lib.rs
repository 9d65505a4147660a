//! Test fixtures shared by roomcast's crates: real `redis-server` processes
//! (a standalone server, and a Redis Cluster of masters with or without
//! replicas) started on free loopback ports, killed on drop, with unique key
//! prefixes per test, certificates for their TLS ports, and a hand-written
//! HTTP/1.1 client and a native-protocol WebSocket client.
//!
//! Test-only: nothing outside `[dev-dependencies]` may depend on this crate.
//! Each fixture family lives in its own module; this file only declares them.

mod cluster;
mod http;
mod redis;
mod tls;
mod ws;

pub use cluster::RedisCluster;
pub use http::{http_post, http_request};
pub use redis::{query, redis_cli, unique_prefix, ClientAuth, RedisServer};
pub use tls::TestCerts;
pub use ws::{Client, Refused};
