//! How a node reaches Redis.

use std::path::PathBuf;
use std::time::Duration;

use roomcast_broker::HistoryPolicy;

/// Standalone Redis or a Redis Cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisMode {
    /// One server (`redis://[user:pass@]host:port[/db]`, or `rediss://`
    /// for TLS). Channels use PUBLISH/SUBSCRIBE.
    Standalone { url: String },
    /// A Cluster, reached through any of these seed nodes (all `redis://`
    /// or all `rediss://`). Channels use
    /// sharded pub/sub (SPUBLISH/SSUBSCRIBE, Redis 7+), so a room's traffic
    /// stays on the shard that owns its slot.
    Cluster { urls: Vec<String> },
}

/// Certificates for `rediss://` URLs. Without `ca_file` the server's
/// certificate is checked against the system's roots; with `cert_file` and
/// `key_file` the node offers a client certificate (mutual TLS, Redis's
/// `tls-auth-clients yes`). Files are PEM, read when the broker connects.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    /// CA certificates that sign the servers' certificates, instead of the
    /// system's roots.
    pub ca_file: Option<PathBuf>,
    /// The node's client certificate chain.
    pub cert_file: Option<PathBuf>,
    /// The client certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
}

impl RedisTls {
    fn any_set(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }
}

/// Configuration of the Redis broker.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub mode: RedisMode,
    /// Certificates for `rediss://` (unused with `redis://`).
    pub tls: RedisTls,
    /// Prepended to every key and channel, so several deployments (or tests)
    /// can share one Redis. Must not contain `{`, `}` or whitespace.
    pub prefix: String,
    /// History caps per room kind.
    pub history: HistoryPolicy,
    /// Exact history trimming (`MAXLEN = n`) instead of approximate
    /// (`MAXLEN ~ n`, Redis trims whole stream nodes, so a room may keep up to
    /// ~100 entries more than `max_len`). Exact costs a little CPU per publish.
    pub exact_trim: bool,
    /// Command connections in standalone mode (each is multiplexed, so a few
    /// are plenty). In Cluster mode the cluster client keeps one connection
    /// per master instead and this is unused.
    pub pool_size: usize,
    /// Longest a `subscribe` waits for Redis to confirm before returning
    /// anyway (the room stays wanted and is subscribed when Redis answers).
    pub subscribe_timeout: Duration,
    /// Timeout for connecting and for each command.
    pub command_timeout: Duration,
    /// How often Cluster mode re-reads the slot map even when nothing hinted
    /// at a change (a moved slot normally announces itself).
    pub topology_refresh: Duration,
    /// How often each subscriber connection is PINGed; one that stays
    /// silent for three of these is dropped and reconnected.
    pub keepalive: Duration,
    /// First and largest delay between reconnect attempts.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// How often the TLS files are read again: when they changed (a
    /// certificate rotated on disk) and the new ones work, connections made
    /// from then on use them. Zero: read once, at start.
    pub tls_reload: Duration,
    /// Tasks that hand received events to the sink, each for a fixed share
    /// of the rooms (so a room's events stay in order): the node's fan-out
    /// runs on this many threads at once instead of on each connection's
    /// reader. `1` (the default): on the reader itself, with no hand-off;
    /// `0`: one per runtime worker thread. More lanes pay off only where
    /// the node has cores to spare (docs/performance.md, run 41).
    pub fanout_lanes: usize,
}

/// Most fan-out lanes a node may ask for.
pub(crate) const MAX_FANOUT_LANES: usize = 64;

impl RedisConfig {
    /// The defaults for a mode: prefix `rc:`, default history caps,
    /// approximate trimming, 4 command connections.
    pub fn new(mode: RedisMode) -> Self {
        Self {
            mode,
            tls: RedisTls::default(),
            prefix: "rc:".to_owned(),
            history: HistoryPolicy::default(),
            exact_trim: false,
            pool_size: 4,
            subscribe_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(5),
            topology_refresh: Duration::from_secs(10),
            keepalive: Duration::from_secs(5),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            fanout_lanes: 1,
            tls_reload: Duration::from_secs(60),
        }
    }

    /// Standalone defaults for one URL.
    pub fn standalone(url: impl Into<String>) -> Self {
        Self::new(RedisMode::Standalone { url: url.into() })
    }

    /// Cluster defaults for a list of seed URLs.
    pub fn cluster(urls: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self::new(RedisMode::Cluster {
            urls: urls.into_iter().map(Into::into).collect(),
        })
    }

    /// Checks what can be checked without a connection.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self
            .prefix
            .chars()
            .any(|c| c == '{' || c == '}' || c.is_whitespace())
        {
            return Err(ConfigError::Prefix(self.prefix.clone()));
        }
        match &self.mode {
            RedisMode::Standalone { url } if url.is_empty() => Err(ConfigError::NoUrl),
            RedisMode::Cluster { urls } if urls.is_empty() => Err(ConfigError::NoUrl),
            _ => Ok(()),
        }?;
        if self.pool_size == 0 {
            return Err(ConfigError::PoolSize);
        }
        if self.fanout_lanes > MAX_FANOUT_LANES {
            return Err(ConfigError::FanoutLanes(self.fanout_lanes));
        }
        let tls = self.uses_tls()?;
        if !tls && self.tls.any_set() {
            return Err(ConfigError::TlsWithoutRediss);
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return Err(ConfigError::TlsCertWithoutKey);
        }
        Ok(())
    }

    /// The URLs, whatever the mode.
    pub(crate) fn urls(&self) -> &[String] {
        match &self.mode {
            RedisMode::Standalone { url } => std::slice::from_ref(url),
            RedisMode::Cluster { urls } => urls,
        }
    }

    /// Whether the URLs are `rediss://` (all of them, or an error).
    pub(crate) fn uses_tls(&self) -> Result<bool, ConfigError> {
        let mut tls = None;
        for url in self.urls() {
            let this = match url.split_once("://").map(|(scheme, _)| scheme) {
                Some("redis") => false,
                Some("rediss") => true,
                _ => return Err(ConfigError::Scheme(url.clone())),
            };
            if this && url.contains('#') {
                // redis-rs reads `#insecure` as "skip certificate checks".
                return Err(ConfigError::TlsInsecure(url.clone()));
            }
            if *tls.get_or_insert(this) != this {
                return Err(ConfigError::MixedSchemes);
            }
        }
        Ok(tls.unwrap_or(false))
    }
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("redis prefix `{0}` must not contain braces or whitespace")]
    Prefix(String),
    #[error("no redis url configured")]
    NoUrl,
    #[error("redis pool_size must be at least 1")]
    PoolSize,
    #[error("broker.fanout_lanes = {0}: at most {MAX_FANOUT_LANES} (0: one per worker thread)")]
    FanoutLanes(usize),
    #[error("redis url `{url}`: {source}")]
    Url {
        url: String,
        #[source]
        source: redis::RedisError,
    },
    #[error("redis url `{0}`: only redis:// and rediss:// (TLS) over TCP are supported")]
    Scheme(String),
    #[error("redis urls mix redis:// and rediss://: use one scheme for every node")]
    MixedSchemes,
    #[error("redis url `{0}`: a #fragment (#insecure skips certificate checks) is not supported; give the CA with broker.tls_ca_file instead")]
    TlsInsecure(String),
    #[error("broker.tls_* files are set but the redis url is not rediss://")]
    TlsWithoutRediss,
    #[error("broker.tls_cert_file and broker.tls_key_file go together")]
    TlsCertWithoutKey,
    #[error("redis TLS: {path}: {source}")]
    TlsFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("redis TLS: {0}")]
    Tls(String),
}
