//! `roomcast serve`: wires the broker the config names into a node and runs
//! it until SIGTERM or Ctrl-C, then drains and exits 0.

use std::sync::Arc;

use anyhow::Context as _;
use rand::Rng as _;
use roomcast_auth::{mint_hs256, Expiry, MintClaims};
use roomcast_broker_redis::{RedisBroker, RedisConfig, RedisMode, RedisTls};
use roomcast_edge::{Config, Node};

use crate::cli::ServeArgs;

pub(crate) async fn run(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(&args.log_format)?;
    let mut config = crate::config::load(&args)?;
    let dev_secret = if args.dev && config.auth.jwt_secret.is_none() {
        let secret: String = rand::rng()
            .sample_iter(rand::distr::Alphanumeric)
            .take(32)
            .map(char::from)
            .collect();
        config.auth.jwt_secret = Some(secret.clone());
        Some(secret)
    } else {
        None
    };
    if args.dev && args.listen.is_none() && args.config.is_none() {
        config.listen = "127.0.0.1:8080".parse().expect("static address");
    }
    config.validate()?;
    let listener = listen(config.listen, config.limits.listen_backlog)
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    let node = build_node(config.clone()).await?;
    tracing::info!(%addr, node = %node.id(), broker = node.broker().kind(), "roomcast node listening");
    if args.dev {
        print_dev_banner(&config, dev_secret.as_deref(), addr);
    }
    node.run(listener, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// The node's listener, with `backlog` instead of tokio's default (128 here):
/// a reconnect storm of more connects than that overflows the accept queue,
/// and each dropped handshake waits for a SYN retransmit (1 s, 2 s, 4 s, …).
fn listen(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As tokio's own bind: a restarted node can bind while old sockets linger.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// The Redis broker settings a node config asks for, if any.
pub(crate) fn redis_config(config: &Config) -> Option<RedisConfig> {
    let b = &config.broker;
    let mode = match (&b.redis, b.redis_cluster.is_empty()) {
        (Some(url), _) => RedisMode::Standalone { url: url.clone() },
        (None, false) => RedisMode::Cluster {
            urls: b.redis_cluster.clone(),
        },
        (None, true) => return None,
    };
    let mut redis = RedisConfig::new(mode);
    redis.tls = RedisTls {
        ca_file: b.tls_ca_file.clone(),
        cert_file: b.tls_cert_file.clone(),
        key_file: b.tls_key_file.clone(),
    };
    redis.prefix = b.prefix.clone();
    redis.history = roomcast_edge::history_policy(config);
    redis.fanout_lanes = b.fanout_lanes;
    redis.tls_reload = b.tls_reload;
    Some(redis)
}

async fn build_node(config: Config) -> anyhow::Result<Arc<Node>> {
    let Some(redis) = redis_config(&config) else {
        return Ok(Node::with_memory_broker(config).await?);
    };
    redis.validate()?;
    Ok(Node::build(config, move |sink| async move {
        let broker = RedisBroker::connect(redis, sink).await?;
        Ok(broker as Arc<dyn roomcast_broker::Broker>)
    })
    .await?)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt: draining"),
    }
}

fn init_logging(format: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        "json" => builder.json().init(),
        "text" => builder.init(),
        other => anyhow::bail!("--log-format must be text or json, not {other:?}"),
    }
    Ok(())
}

fn print_dev_banner(config: &Config, generated_secret: Option<&str>, addr: std::net::SocketAddr) {
    let secret = config.auth.jwt_secret.as_deref().unwrap_or_default();
    let mut claims = MintClaims::new("dev", "dev");
    claims.teams = vec!["42".into()];
    claims.roles = vec!["publisher".into()];
    claims.expiry = Expiry::In(std::time::Duration::from_secs(24 * 3600));
    let token = mint_hs256(secret.as_bytes(), &claims);
    let broker = if redis_config(config).is_some() {
        "Redis"
    } else {
        "memory"
    };
    println!("roomcast dev node on http://{addr} ({broker} broker)");
    if let Some(s) = generated_secret {
        println!("generated HS256 secret: {s}");
    }
    println!("token (user dev, tenant dev, team 42, publisher; 24h):\n{token}\n");
    println!("connect:  websocat 'ws://{addr}/v1/ws?token={token}'   then send {{\"op\":\"subscribe\",\"rooms\":[\"team:42\"]}}");
    println!(
        "publish:  curl -s -X POST http://{addr}/v1/publish -H 'Authorization: Bearer {token}' -H 'Content-Type: application/json' -d '{{\"rooms\":[\"team:42\"],\"type\":\"task.updated\",\"data\":{{\"id\":1}}}}'"
    );
}

#[cfg(test)]
mod tests {
    /// For a listening socket, `ss` shows the accept queue's limit as Send-Q.
    #[tokio::test]
    async fn the_listener_asks_the_kernel_for_the_configured_backlog() {
        let listener = super::listen("127.0.0.1:0".parse().unwrap(), 777).unwrap();
        let port = listener.local_addr().unwrap().port();
        let out = std::process::Command::new("ss")
            .args(["-Hltn", &format!("sport = :{port}")])
            .output()
            .expect("ss (iproute2) runs; `make test-deps` installs it");
        let text = String::from_utf8_lossy(&out.stdout);
        // State, Recv-Q, Send-Q, local address, peer address.
        assert_eq!(text.split_whitespace().nth(2), Some("777"), "ss: {text}");
    }
}
