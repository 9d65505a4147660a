//! Command-line interface. Every `serve` flag also reads a `ROOMCAST_*`
//! environment variable; flags and variables override the config file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use roomcast_auth::{mint_hs256, Expiry, MintClaims};

#[derive(Parser, Debug)]
#[command(
    name = "roomcast",
    version,
    about = "Horizontally scaled realtime fan-out"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Run an edge node.
    Serve(Box<ServeArgs>),
    /// Publish one event (through a node's HTTP API, or straight into Redis).
    Publish(Box<PublishArgs>),
    /// Mint an HS256 client token with the configured secret.
    Token(TokenArgs),
}

fn parse_duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

#[derive(Args, Debug, Default)]
pub(crate) struct ServeArgs {
    /// TOML config file (see docs/configuration.md); a file that fails to load is fatal.
    #[arg(long, env = "ROOMCAST_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Development mode: generated secret, printed token and examples.
    #[arg(long, env = "ROOMCAST_DEV")]
    pub(crate) dev: bool,
    /// Runtime worker threads (default: one per CPU). Fewer than cores leaves
    /// room for Redis or a second node on the same machine.
    #[arg(long, env = "ROOMCAST_WORKER_THREADS")]
    pub(crate) worker_threads: Option<usize>,
    /// Log format: text or json.
    #[arg(long, env = "ROOMCAST_LOG_FORMAT", default_value = "text")]
    pub(crate) log_format: String,
    #[arg(long, env = "ROOMCAST_LISTEN")]
    pub(crate) listen: Option<SocketAddr>,
    #[arg(long, env = "ROOMCAST_NODE_ID")]
    pub(crate) node_id: Option<String>,
    /// HS256 secret for client and publisher tokens.
    #[arg(long, env = "ROOMCAST_JWT_SECRET", hide_env_values = true)]
    pub(crate) jwt_secret: Option<String>,
    /// HS256, RS256 or ES256.
    #[arg(long, env = "ROOMCAST_JWT_ALGORITHM")]
    pub(crate) jwt_algorithm: Option<String>,
    /// PEM public key file for RS256/ES256.
    #[arg(long, env = "ROOMCAST_JWT_PUBLIC_KEY_FILE")]
    pub(crate) jwt_public_key_file: Option<PathBuf>,
    #[arg(long, env = "ROOMCAST_JWT_LEEWAY_SECS")]
    pub(crate) jwt_leeway_secs: Option<u64>,
    /// Cookie that may carry the client token.
    #[arg(long, env = "ROOMCAST_COOKIE_NAME")]
    pub(crate) cookie_name: Option<String>,
    #[arg(long, env = "ROOMCAST_CLAIM_USER")]
    pub(crate) claim_user: Option<String>,
    #[arg(long, env = "ROOMCAST_CLAIM_TENANT")]
    pub(crate) claim_tenant: Option<String>,
    #[arg(long, env = "ROOMCAST_CLAIM_TEAMS")]
    pub(crate) claim_teams: Option<String>,
    #[arg(long, env = "ROOMCAST_CLAIM_ROLES")]
    pub(crate) claim_roles: Option<String>,
    #[arg(long, env = "ROOMCAST_CLAIM_ROOMS")]
    pub(crate) claim_rooms: Option<String>,
    /// Room authorization callback URL (POST {tenant,user,room} → {"allow":bool}).
    #[arg(long, env = "ROOMCAST_AUTHZ_CALLBACK_URL")]
    pub(crate) authz_callback_url: Option<String>,
    #[arg(long, env = "ROOMCAST_AUTHZ_TIMEOUT", value_parser = parse_duration)]
    pub(crate) authz_timeout: Option<Duration>,
    #[arg(long, env = "ROOMCAST_AUTHZ_CACHE_TTL", value_parser = parse_duration)]
    pub(crate) authz_cache_ttl: Option<Duration>,
    /// Static publish API key (repeat, or comma-separate in the variable).
    #[arg(
        long = "api-key",
        env = "ROOMCAST_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub(crate) api_keys: Vec<String>,
    #[arg(long, env = "ROOMCAST_PUBLISH_MAX_BODY_BYTES")]
    pub(crate) publish_max_body_bytes: Option<usize>,
    /// Standalone Redis URL (otherwise the embedded memory broker).
    #[arg(long, env = "ROOMCAST_REDIS")]
    pub(crate) redis: Option<String>,
    /// Redis Cluster seed URLs, comma-separated (sharded pub/sub).
    #[arg(long, env = "ROOMCAST_REDIS_CLUSTER", value_delimiter = ',')]
    pub(crate) redis_cluster: Vec<String>,
    #[arg(long, env = "ROOMCAST_REDIS_PREFIX")]
    pub(crate) redis_prefix: Option<String>,
    #[command(flatten)]
    pub(crate) redis_tls: RedisTlsArgs,
    #[arg(long, env = "ROOMCAST_HISTORY_MAX_LEN")]
    pub(crate) history_max_len: Option<usize>,
    #[arg(long, env = "ROOMCAST_HISTORY_MAX_AGE", value_parser = parse_duration)]
    pub(crate) history_max_age: Option<Duration>,
    /// Tasks fanning out the events received from Redis, each for a fixed
    /// share of the rooms (default 1: on the reader; 0: one per worker thread).
    #[arg(long, env = "ROOMCAST_FANOUT_LANES")]
    pub(crate) fanout_lanes: Option<usize>,
    #[arg(long, env = "ROOMCAST_MAX_CONNECTIONS")]
    pub(crate) max_connections: Option<usize>,
    #[arg(long, env = "ROOMCAST_MAX_MESSAGE_BYTES")]
    pub(crate) max_message_bytes: Option<usize>,
    #[arg(long, env = "ROOMCAST_MAX_ROOMS_PER_SESSION")]
    pub(crate) max_rooms_per_session: Option<usize>,
    #[arg(long, env = "ROOMCAST_RATE_MESSAGES")]
    pub(crate) rate_messages: Option<u32>,
    #[arg(long, env = "ROOMCAST_RATE_WINDOW", value_parser = parse_duration)]
    pub(crate) rate_window: Option<Duration>,
    #[arg(long, env = "ROOMCAST_RATE_STRIKES")]
    pub(crate) rate_strikes: Option<u32>,
    #[arg(long, env = "ROOMCAST_PING_INTERVAL", value_parser = parse_duration)]
    pub(crate) ping_interval: Option<Duration>,
    #[arg(long, env = "ROOMCAST_IDLE_TIMEOUT", value_parser = parse_duration)]
    pub(crate) idle_timeout: Option<Duration>,
    #[arg(long, env = "ROOMCAST_OUTBOUND_QUEUE_FRAMES")]
    pub(crate) outbound_queue_frames: Option<usize>,
    #[arg(long, env = "ROOMCAST_OUTBOUND_QUEUE_BYTES")]
    pub(crate) outbound_queue_bytes: Option<usize>,
    /// limits.io_uring: auto, required or off.
    #[arg(long, env = "ROOMCAST_IO_URING")]
    pub(crate) io_uring: Option<roomcast_edge::config::IoUringMode>,
    #[arg(long, env = "ROOMCAST_DRAIN_WINDOW", value_parser = parse_duration)]
    pub(crate) drain_window: Option<Duration>,
    #[arg(long, env = "ROOMCAST_UNSUBSCRIBE_DELAY", value_parser = parse_duration)]
    pub(crate) unsubscribe_delay: Option<Duration>,
    #[arg(long, env = "ROOMCAST_SIGNAL_MESSAGES")]
    pub(crate) signal_messages: Option<u32>,
    #[arg(long, env = "ROOMCAST_SIGNAL_WINDOW", value_parser = parse_duration)]
    pub(crate) signal_window: Option<Duration>,
    /// Room kinds whose members are tracked in presence (comma-separated).
    #[arg(long, env = "ROOMCAST_PRESENCE_KINDS", value_delimiter = ',')]
    pub(crate) presence_kinds: Vec<String>,
    #[arg(long, env = "ROOMCAST_PRESENCE_TTL", value_parser = parse_duration)]
    pub(crate) presence_ttl: Option<Duration>,
    #[arg(long, env = "ROOMCAST_PRESENCE_HEARTBEAT_INTERVAL", value_parser = parse_duration)]
    pub(crate) presence_heartbeat_interval: Option<Duration>,
    #[arg(long, env = "ROOMCAST_PRESENCE_SWEEP_INTERVAL", value_parser = parse_duration)]
    pub(crate) presence_sweep_interval: Option<Duration>,
}

#[derive(Args, Debug)]
pub(crate) struct PublishArgs {
    /// Room to publish into (repeat for several).
    #[arg(long = "room", required = true)]
    pub(crate) rooms: Vec<String>,
    /// Event type, e.g. task.updated.
    #[arg(long = "type")]
    pub(crate) kind: String,
    /// JSON body.
    #[arg(long, default_value = "null")]
    pub(crate) data: String,
    /// Tenant (required with an API key or --redis; a publisher token implies its own).
    #[arg(long, env = "ROOMCAST_TENANT")]
    pub(crate) tenant: Option<String>,
    #[arg(long)]
    pub(crate) actor: Option<String>,
    #[arg(long)]
    pub(crate) version: Option<u64>,
    /// Roles that may receive the event.
    #[arg(long = "audience")]
    pub(crate) audience: Vec<String>,
    /// User ids that must not receive it.
    #[arg(long = "exclude-user")]
    pub(crate) exclude_users: Vec<String>,
    /// Node to post to.
    #[arg(long, env = "ROOMCAST_URL", default_value = "http://127.0.0.1:8080")]
    pub(crate) url: String,
    /// Publisher token or static API key sent as `Authorization: Bearer`.
    #[arg(long, env = "ROOMCAST_PUBLISH_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// Publish straight into this standalone Redis instead of a node.
    #[arg(long, env = "ROOMCAST_REDIS")]
    pub(crate) redis: Option<String>,
    /// Publish straight into this Redis Cluster (comma-separated seeds).
    #[arg(long, env = "ROOMCAST_REDIS_CLUSTER", value_delimiter = ',')]
    pub(crate) redis_cluster: Vec<String>,
    #[arg(long, env = "ROOMCAST_REDIS_PREFIX", default_value = "rc:")]
    pub(crate) redis_prefix: String,
    #[command(flatten)]
    pub(crate) redis_tls: RedisTlsArgs,
}

/// Certificates for `rediss://` URLs (PEM files).
#[derive(Args, Debug, Default, Clone)]
pub(crate) struct RedisTlsArgs {
    /// CA certificates that sign the Redis servers' certificates, instead of
    /// the system's roots.
    #[arg(long, env = "ROOMCAST_REDIS_TLS_CA_FILE")]
    pub(crate) redis_tls_ca_file: Option<PathBuf>,
    /// Client certificate chain, for a Redis that requires one.
    #[arg(long, env = "ROOMCAST_REDIS_TLS_CERT_FILE")]
    pub(crate) redis_tls_cert_file: Option<PathBuf>,
    /// The client certificate's private key.
    #[arg(long, env = "ROOMCAST_REDIS_TLS_KEY_FILE")]
    pub(crate) redis_tls_key_file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub(crate) struct TokenArgs {
    #[arg(long)]
    pub(crate) sub: String,
    #[arg(long)]
    pub(crate) tenant: String,
    /// Team id (repeat for several).
    #[arg(long = "team")]
    pub(crate) teams: Vec<String>,
    /// Role (repeat), e.g. publisher.
    #[arg(long = "role")]
    pub(crate) roles: Vec<String>,
    /// Explicit room grant (repeat).
    #[arg(long = "room")]
    pub(crate) rooms: Vec<String>,
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub(crate) ttl: Duration,
    #[arg(long, env = "ROOMCAST_JWT_SECRET", hide_env_values = true)]
    pub(crate) jwt_secret: String,
}

pub(crate) fn token(args: TokenArgs) -> anyhow::Result<()> {
    let mut claims = MintClaims::new(args.sub, args.tenant);
    claims.teams = args.teams;
    claims.roles = args.roles;
    claims.rooms = args.rooms;
    claims.expiry = Expiry::In(args.ttl);
    println!("{}", mint_hs256(args.jwt_secret.as_bytes(), &claims));
    Ok(())
}
