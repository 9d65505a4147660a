//! The node's one configuration struct. Every field has a serde default, so
//! a config file names only what it changes; the `roomcast` binary layers
//! flags and `ROOMCAST_*` environment variables on top, then calls
//! [`Config::validate`]. Defaults are documented in docs/configuration.md
//! and a test keeps the two equal.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Serde helpers for durations written as `"10s"`, `"500ms"`, `"1h"`.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// Everything a node needs to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the HTTP/WebSocket listener binds.
    pub listen: SocketAddr,
    /// This node's id in welcome frames, presence and logs; random when unset.
    pub node_id: Option<String>,
    pub limits: Limits,
    pub auth: AuthSettings,
    pub publish: PublishSettings,
    pub broker: BrokerSettings,
    /// Which protocols the node serves, and on which paths.
    pub dialects: Dialects,
    /// Who is in which room, across the cluster.
    pub presence: PresenceSettings,
    /// Time over which SIGTERM closes sockets (1001), spread so clients do
    /// not all reconnect at once.
    #[serde(with = "duration")]
    pub drain_window: Duration,
    /// How long a room stays subscribed in the broker after its last local
    /// member left, so churn does not thrash Redis.
    #[serde(with = "duration")]
    pub unsubscribe_delay: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            node_id: None,
            limits: Limits::default(),
            auth: AuthSettings::default(),
            publish: PublishSettings::default(),
            broker: BrokerSettings::default(),
            dialects: Dialects::default(),
            presence: PresenceSettings::default(),
            drain_window: Duration::from_secs(10),
            unsubscribe_delay: Duration::from_millis(500),
        }
    }
}

/// Per-node and per-session limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Sessions per node; past it upgrades get HTTP 503 before the socket opens.
    pub max_connections: usize,
    /// Connections the kernel may hold for the listener before it accepts
    /// them (capped by `net.core.somaxconn`). A reconnect storm overflowing
    /// it costs clients SYN retransmits of seconds each.
    pub listen_backlog: u32,
    /// Whether a fan-out hands its WebSocket sends to the kernel in one
    /// `io_uring` submission per chunk of members instead of one `send(2)`
    /// each: a system call per delivery is a measurable share of its cost.
    pub io_uring: IoUringMode,
    /// Largest inbound message; bigger ones close the socket with 1009.
    pub max_message_bytes: usize,
    /// Rooms one session may hold at once (SUBSCRIPTION_LIMIT past it).
    pub max_rooms_per_session: usize,
    /// Inbound messages allowed per session per `rate_window`.
    pub rate_messages: u32,
    #[serde(with = "duration")]
    pub rate_window: Duration,
    /// Consecutive windows over the limit before the socket is closed with 1008.
    pub rate_strikes: u32,
    /// Server WebSocket ping interval.
    #[serde(with = "duration")]
    pub ping_interval: Duration,
    /// A socket that sends nothing (not even a pong) for this long is closed.
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// Frames queued for one session before it counts as a slow consumer.
    pub outbound_queue_frames: usize,
    /// Bytes queued for one session before it counts as a slow consumer.
    pub outbound_queue_bytes: usize,
    /// Signals (typing, ...) one session may send per `signal_window`.
    pub signal_messages: u32,
    #[serde(with = "duration")]
    pub signal_window: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 20_000,
            listen_backlog: 4096,
            io_uring: IoUringMode::Auto,
            max_message_bytes: 64 * 1024,
            max_rooms_per_session: 200,
            rate_messages: 100,
            rate_window: Duration::from_secs(10),
            rate_strikes: 3,
            ping_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(60),
            outbound_queue_frames: 1024,
            outbound_queue_bytes: 4 * 1024 * 1024,
            signal_messages: 20,
            signal_window: Duration::from_secs(10),
        }
    }
}

/// `limits.io_uring`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoUringMode {
    /// Use it where the kernel and the sandbox allow it; otherwise `send(2)`,
    /// with one line in the log.
    Auto,
    /// Refuse to start where it cannot be used.
    Required,
    /// Always `send(2)`.
    Off,
}

/// The names of the config file, for the command line and the environment.
impl std::str::FromStr for IoUringMode {
    type Err = serde::de::value::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        use serde::de::IntoDeserializer as _;
        Self::deserialize(s.into_deserializer())
    }
}

/// How clients prove who they are and which rooms they may join.
/// `Debug` redacts the secret, so logging a config never leaks it.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// `HS256`, `RS256` or `ES256`; tokens signed otherwise are refused.
    pub algorithm: String,
    /// HS256 shared secret.
    pub jwt_secret: Option<String>,
    /// RS256/ES256 public key (PEM file).
    pub jwt_public_key_file: Option<PathBuf>,
    /// Seconds of clock skew tolerated on `exp`/`nbf`.
    pub leeway_secs: u64,
    /// Cookie that may carry the token (after `Authorization` and `?token=`).
    pub cookie_name: String,
    pub claim_user: String,
    pub claim_tenant: String,
    pub claim_teams: String,
    pub claim_roles: String,
    pub claim_rooms: String,
    /// POST {tenant,user,room} → {"allow":bool} for rooms the token does not grant.
    pub authz_callback_url: Option<String>,
    #[serde(with = "duration")]
    pub authz_timeout: Duration,
    #[serde(with = "duration")]
    pub authz_cache_ttl: Duration,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            algorithm: "HS256".into(),
            jwt_secret: None,
            jwt_public_key_file: None,
            leeway_secs: 0,
            cookie_name: "roomcast_token".into(),
            claim_user: "sub".into(),
            claim_tenant: "tenant".into(),
            claim_teams: "teams".into(),
            claim_roles: "roles".into(),
            claim_rooms: "rooms".into(),
            authz_callback_url: None,
            authz_timeout: Duration::from_secs(2),
            authz_cache_ttl: Duration::from_secs(30),
        }
    }
}

/// The HTTP publish API. `Debug` redacts the keys.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PublishSettings {
    /// Static API keys for trusted services (`Authorization: Bearer <key>`);
    /// they may publish into any tenant named in the body.
    pub api_keys: Vec<String>,
    /// Largest publish request body.
    pub max_body_bytes: usize,
    /// Publishes handled at once by this node; past it, 429 (push back).
    pub max_in_flight: usize,
    /// While this node delivers events later than this after they were
    /// published, the publish API answers 503 with Retry-After instead of
    /// letting the cluster fall further behind.
    #[serde(with = "duration")]
    pub max_delivery_lag: Duration,
}

impl Default for PublishSettings {
    fn default() -> Self {
        Self {
            api_keys: Vec::new(),
            max_body_bytes: 1024 * 1024,
            max_in_flight: 1024,
            max_delivery_lag: Duration::from_secs(2),
        }
    }
}

fn redacted<T>(value: &Option<T>) -> &'static str {
    if value.is_some() {
        "<redacted>"
    } else {
        "<unset>"
    }
}

impl std::fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthSettings")
            .field("algorithm", &self.algorithm)
            .field("jwt_secret", &redacted(&self.jwt_secret))
            .field("jwt_public_key_file", &self.jwt_public_key_file)
            .field("leeway_secs", &self.leeway_secs)
            .field("cookie_name", &self.cookie_name)
            .field("claim_user", &self.claim_user)
            .field("claim_tenant", &self.claim_tenant)
            .field("claim_teams", &self.claim_teams)
            .field("claim_roles", &self.claim_roles)
            .field("claim_rooms", &self.claim_rooms)
            .field("authz_callback_url", &self.authz_callback_url)
            .field("authz_timeout", &self.authz_timeout)
            .field("authz_cache_ttl", &self.authz_cache_ttl)
            .finish()
    }
}

impl std::fmt::Debug for PublishSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishSettings")
            .field(
                "api_keys",
                &format_args!("<{} redacted>", self.api_keys.len()),
            )
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_in_flight", &self.max_in_flight)
            .field("max_delivery_lag", &self.max_delivery_lag)
            .finish()
    }
}

/// Which broker carries events between nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerSettings {
    /// Standalone Redis URL; with neither this nor `redis_cluster` the
    /// embedded memory broker is used (single node).
    pub redis: Option<String>,
    /// Redis Cluster seed URLs (sharded pub/sub).
    pub redis_cluster: Vec<String>,
    /// CA certificates (PEM) for `rediss://` instead of the system's roots.
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM) for a Redis that requires one.
    pub tls_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub tls_key_file: Option<PathBuf>,
    /// How often the TLS files are read again for a rotation; `0s`: once.
    #[serde(with = "duration")]
    pub tls_reload: Duration,
    /// Prefix of every Redis key and channel.
    pub prefix: String,
    /// Events kept per room (history for resume).
    pub history_max_len: usize,
    /// Oldest event kept per room.
    #[serde(with = "duration")]
    pub history_max_age: Duration,
    /// Caps for particular room kinds (e.g. `task`), overriding the two above.
    pub history_kinds: std::collections::BTreeMap<String, HistoryKindCap>,
    /// Tasks fanning out the events received from Redis, each for a fixed
    /// share of the rooms; `1`: on each connection's reader; `0`: one per
    /// worker thread.
    pub fanout_lanes: usize,
}

/// Most `broker.fanout_lanes` a node takes (the Redis broker's own limit).
const MAX_FANOUT_LANES: usize = 64;

/// A room kind's own history cap.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryKindCap {
    pub max_len: usize,
    #[serde(with = "duration")]
    pub max_age: Duration,
}

impl Default for BrokerSettings {
    fn default() -> Self {
        Self {
            redis: None,
            redis_cluster: Vec::new(),
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_reload: Duration::from_secs(60),
            prefix: "rc:".into(),
            history_max_len: 1000,
            history_max_age: Duration::from_secs(3600),
            history_kinds: std::collections::BTreeMap::new(),
            fanout_lanes: 1,
        }
    }
}

/// Presence: per-session entries in the broker that lapse unless refreshed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PresenceSettings {
    /// Room kinds whose members are tracked (`task`, `conversation`, ...);
    /// tracking costs a broker write per join, leave and heartbeat.
    pub kinds: Vec<String>,
    /// An entry lapses this long after its last heartbeat.
    #[serde(with = "duration")]
    pub ttl: Duration,
    /// How often a node refreshes its sessions' entries.
    #[serde(with = "duration")]
    pub heartbeat_interval: Duration,
    /// How often a node sweeps lapsed entries (emitting `presence.left`).
    #[serde(with = "duration")]
    pub sweep_interval: Duration,
}

impl Default for PresenceSettings {
    fn default() -> Self {
        Self {
            kinds: vec!["task".into(), "conversation".into()],
            ttl: Duration::from_secs(60),
            heartbeat_interval: Duration::from_secs(20),
            sweep_interval: Duration::from_secs(5),
        }
    }
}

/// The protocols a node serves. Each can be disabled or mounted elsewhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Dialects {
    pub native: NativeSettings,
    pub seed000: crate::dialects::seed000::Settings,
    pub seed001: crate::dialects::seed001::Settings,
    pub seed002: crate::dialects::seed002::Settings,
    pub seed003: crate::dialects::seed003::Settings,
    pub seed004: crate::dialects::seed004::Settings,
}

/// The native protocol (docs/protocol.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NativeSettings {
    pub enabled: bool,
    /// WebSocket endpoint.
    pub ws_path: String,
    /// Server-Sent Events fallback (`?rooms=a,b`, `Last-Event-ID` resumes).
    pub sse_path: String,
    /// Long-poll fallback (`?rooms=a,b&since=<id>`): a JSON array of events.
    pub poll_path: String,
    /// Interval of SSE heartbeat comments, which keep proxies from closing
    /// an idle stream.
    #[serde(with = "duration")]
    pub sse_heartbeat: Duration,
    /// How long a long-poll with nothing to return waits for a live event.
    #[serde(with = "duration")]
    pub poll_wait: Duration,
}

impl Default for NativeSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            ws_path: "/v1/ws".into(),
            sse_path: "/v1/sse".into(),
            poll_path: "/v1/poll".into(),
            sse_heartbeat: Duration::from_secs(15),
            poll_wait: Duration::from_secs(25),
        }
    }
}

/// A configuration that cannot run.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Checks what serde cannot: relations between fields and required secrets.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: &str| Err(ConfigError(m.to_owned()));
        let l = &self.limits;
        if l.listen_backlog == 0 {
            return err("limits.listen_backlog must be at least 1");
        }
        if l.max_connections == 0 {
            return err("limits.max_connections must be at least 1");
        }
        if l.max_message_bytes < 128 {
            return err("limits.max_message_bytes must be at least 128");
        }
        if l.rate_messages == 0 || l.rate_window.is_zero() {
            return err("limits.rate_messages and limits.rate_window must be positive");
        }
        if l.ping_interval.is_zero() || l.idle_timeout <= l.ping_interval {
            return err("limits.idle_timeout must be longer than limits.ping_interval");
        }
        if l.outbound_queue_frames == 0 || l.outbound_queue_bytes == 0 {
            return err("limits.outbound_queue_* must be positive");
        }
        if l.max_rooms_per_session == 0 {
            // Zero would deny every subscribe: a session could never receive.
            return err("limits.max_rooms_per_session must be at least 1");
        }
        match self.auth.algorithm.to_ascii_uppercase().as_str() {
            "HS256" if self.auth.jwt_secret.as_deref().unwrap_or("").is_empty() => {
                return err("auth.jwt_secret is required with HS256 (or use --dev)")
            }
            "RS256" | "ES256" if self.auth.jwt_public_key_file.is_none() => {
                return err("auth.jwt_public_key_file is required with RS256/ES256")
            }
            "HS256" | "RS256" | "ES256" => {}
            _ => return err("auth.algorithm must be HS256, RS256 or ES256"),
        }
        let p = &self.presence;
        if p.heartbeat_interval.is_zero()
            || p.heartbeat_interval >= p.ttl
            || p.sweep_interval.is_zero()
        {
            return err("presence.heartbeat_interval must be positive and shorter than presence.ttl; sweep_interval positive");
        }
        let b = &self.broker;
        if b.redis.is_some() && !b.redis_cluster.is_empty() {
            return err("set broker.redis or broker.redis_cluster, not both");
        }
        let tls_files =
            b.tls_ca_file.is_some() || b.tls_cert_file.is_some() || b.tls_key_file.is_some();
        if tls_files && b.redis.is_none() && b.redis_cluster.is_empty() {
            // The memory broker would ignore them: say so instead.
            return err("broker.tls_* files need a rediss:// broker.redis or broker.redis_cluster");
        }
        if b.fanout_lanes > MAX_FANOUT_LANES {
            return err("broker.fanout_lanes must be at most 64 (0: one per worker thread)");
        }
        if b.fanout_lanes != 1 && b.redis.is_none() && b.redis_cluster.is_empty() {
            // The memory broker fans out on the publisher's task: no lanes.
            return err("broker.fanout_lanes applies to a Redis broker: set broker.redis or broker.redis_cluster");
        }
        if self.publish.max_in_flight == 0 || self.publish.max_delivery_lag.is_zero() {
            return err("publish.max_in_flight and publish.max_delivery_lag must be positive");
        }
        if self.publish.max_body_bytes < 128 {
            // Below this even a one-room event with a tiny payload is refused (413).
            return err("publish.max_body_bytes must be at least 128");
        }
        if self.publish.api_keys.iter().any(|k| k.len() < 16) {
            return err("publish.api_keys must be at least 16 characters each");
        }
        // Every dialect's settings, enabled or not: a file that would fail
        // only once someone enables a dialect fails now, at the same place.
        let d = &self.dialects;
        d.seed001.validate()?;
        d.seed003.validate()?;
        d.seed004.validate()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_means_defaults() {
        let c: Config = toml::from_str("").unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn durations_read_as_text_and_unknown_keys_fail() {
        let c: Config =
            toml::from_str("drain_window = \"2s\"\n[limits]\nping_interval = \"500ms\"").unwrap();
        assert_eq!(c.drain_window, Duration::from_secs(2));
        assert_eq!(c.limits.ping_interval, Duration::from_millis(500));
        assert!(toml::from_str::<Config>("bogus = 1").is_err());
    }

    /// `--io-uring` and `ROOMCAST_IO_URING` take the file's names, and say
    /// which ones when given another.
    #[test]
    fn io_uring_mode_reads_the_same_names_as_the_file() {
        for (name, mode) in [
            ("auto", IoUringMode::Auto),
            ("required", IoUringMode::Required),
            ("off", IoUringMode::Off),
        ] {
            assert_eq!(name.parse::<IoUringMode>().unwrap(), mode);
            let c: Config = toml::from_str(&format!("[limits]\nio_uring = \"{name}\"")).unwrap();
            assert_eq!(c.limits.io_uring, mode);
        }
        let e = "sometimes".parse::<IoUringMode>().unwrap_err().to_string();
        assert!(e.contains("`auto`, `required`, `off`"), "{e}");
    }

    #[test]
    fn debug_output_never_shows_secrets() {
        let mut c = Config::default();
        c.auth.jwt_secret = Some("hunter2-secret".into());
        c.publish.api_keys = vec!["key-0123456789abcdef".into()];
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("key-0123"),
            "{shown}"
        );
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn validate_requires_a_secret() {
        let mut c = Config::default();
        assert!(c.validate().is_err());
        c.auth.jwt_secret = Some("s3cret".into());
        c.validate().unwrap();
    }

    #[test]
    fn a_zero_listen_backlog_is_refused() {
        let mut c: Config = toml::from_str("[limits]\nlisten_backlog = 0").unwrap();
        c.auth.jwt_secret = Some("s3cret".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("limits.listen_backlog"), "{e}");
    }

    #[test]
    fn redis_tls_files_without_redis_are_refused() {
        let mut c: Config = toml::from_str("[broker]\ntls_ca_file = \"/etc/ca.pem\"").unwrap();
        c.auth.jwt_secret = Some("s3cret".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("broker.tls_"), "{e}");
        c.broker.redis = Some("rediss://redis:6380".into());
        c.validate().unwrap();
    }

    #[test]
    fn fanout_lanes_are_bounded_and_need_redis() {
        let mut c: Config = toml::from_str("[broker]\nfanout_lanes = 4").unwrap();
        c.auth.jwt_secret = Some("s3cret".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("broker.fanout_lanes"), "{e}");
        c.broker.redis = Some("redis://redis:6379".into());
        c.validate().unwrap();
        c.broker.fanout_lanes = MAX_FANOUT_LANES + 1;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("at most 64"), "{e}");
    }

    /// Settings that would make a node refuse every subscribe or every
    /// publish are a startup error, not a node that silently does nothing.
    #[test]
    fn limits_that_would_refuse_everything_are_refused() {
        for (toml_text, named) in [
            (
                "[limits]\nmax_rooms_per_session = 0",
                "limits.max_rooms_per_session",
            ),
            ("[publish]\nmax_body_bytes = 0", "publish.max_body_bytes"),
            ("[publish]\nmax_body_bytes = 127", "publish.max_body_bytes"),
        ] {
            let mut c: Config = toml::from_str(toml_text).unwrap();
            c.auth.jwt_secret = Some("s3cret".into());
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(named), "{toml_text}: {e}");
        }
    }

    #[test]
    fn a_disabled_dialects_settings_are_checked_too() {
        let mut c: Config =
            toml::from_str("[dialects.seed004]\nenabled = false\nmax_connections = 0").unwrap();
        c.auth.jwt_secret = Some("s3cret".into());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("dialects.seed004"), "{e}");
    }
}
