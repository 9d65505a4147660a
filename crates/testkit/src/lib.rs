//! Test fixtures shared by roomcast's crates: real `redis-server` processes
//! (a standalone server, and a Redis Cluster of masters with or without
//! replicas) started on free loopback ports, killed on drop, with unique key
//! prefixes per test, and certificates for their TLS ports.
//!
//! Test-only: nothing outside `[dev-dependencies]` may depend on this crate.
//! Each fixture family lives in its own module; this file only declares them.

mod cluster;
mod redis;
mod tls;

pub use cluster::RedisCluster;
pub use redis::{query, redis_cli, unique_prefix, ClientAuth, RedisServer};
pub use tls::TestCerts;
