//! Layers the configuration: defaults < config file < `ROOMCAST_*` / flags.

use anyhow::Context as _;
use roomcast_edge::Config;

use crate::cli::ServeArgs;

/// Builds the node's config from the file (if any) and the flags.
pub(crate) fn load(args: &ServeArgs) -> anyhow::Result<Config> {
    let mut c = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config file {}", path.display()))?;
            toml::from_str(&text)
                .with_context(|| format!("parsing config file {}", path.display()))?
        }
        None => Config::default(),
    };
    macro_rules! set {
        ($($field:expr => $arg:expr),* $(,)?) => {
            $(if let Some(v) = $arg.clone() { $field = v.into(); })*
        };
    }
    set!(
        c.listen => args.listen,
        c.drain_window => args.drain_window,
        c.unsubscribe_delay => args.unsubscribe_delay,
        c.limits.max_connections => args.max_connections,
        c.limits.max_message_bytes => args.max_message_bytes,
        c.limits.max_rooms_per_session => args.max_rooms_per_session,
        c.limits.rate_messages => args.rate_messages,
        c.limits.rate_window => args.rate_window,
        c.limits.rate_strikes => args.rate_strikes,
        c.limits.ping_interval => args.ping_interval,
        c.limits.idle_timeout => args.idle_timeout,
        c.limits.outbound_queue_frames => args.outbound_queue_frames,
        c.limits.outbound_queue_bytes => args.outbound_queue_bytes,
        c.limits.io_uring => args.io_uring,
        c.auth.algorithm => args.jwt_algorithm,
        c.auth.leeway_secs => args.jwt_leeway_secs,
        c.auth.cookie_name => args.cookie_name,
        c.auth.claim_user => args.claim_user,
        c.auth.claim_tenant => args.claim_tenant,
        c.auth.claim_teams => args.claim_teams,
        c.auth.claim_roles => args.claim_roles,
        c.auth.claim_rooms => args.claim_rooms,
        c.auth.authz_timeout => args.authz_timeout,
        c.auth.authz_cache_ttl => args.authz_cache_ttl,
        c.publish.max_body_bytes => args.publish_max_body_bytes,
        c.broker.prefix => args.redis_prefix,
        c.broker.history_max_len => args.history_max_len,
        c.broker.history_max_age => args.history_max_age,
        c.broker.fanout_lanes => args.fanout_lanes,
        c.broker.tls_ca_file => args.redis_tls.redis_tls_ca_file,
        c.broker.tls_cert_file => args.redis_tls.redis_tls_cert_file,
        c.broker.tls_key_file => args.redis_tls.redis_tls_key_file,
        c.limits.signal_messages => args.signal_messages,
        c.limits.signal_window => args.signal_window,
        c.presence.ttl => args.presence_ttl,
        c.presence.heartbeat_interval => args.presence_heartbeat_interval,
        c.presence.sweep_interval => args.presence_sweep_interval,
    );
    if !args.presence_kinds.is_empty() {
        c.presence.kinds = args.presence_kinds.clone();
    }
    if args.node_id.is_some() {
        c.node_id = args.node_id.clone();
    }
    if args.jwt_secret.is_some() {
        c.auth.jwt_secret = args.jwt_secret.clone();
    }
    if args.jwt_public_key_file.is_some() {
        c.auth.jwt_public_key_file = args.jwt_public_key_file.clone();
    }
    if args.authz_callback_url.is_some() {
        c.auth.authz_callback_url = args.authz_callback_url.clone();
    }
    if !args.api_keys.is_empty() {
        c.publish.api_keys = args.api_keys.clone();
    }
    if args.redis.is_some() {
        c.broker.redis = args.redis.clone();
    }
    if !args.redis_cluster.is_empty() {
        c.broker.redis_cluster = args.redis_cluster.clone();
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::time::Duration;

    use super::*;

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let mut file = tempfile();
        writeln!(
            file.1,
            "drain_window = \"3s\"\n[limits]\nmax_connections = 5\nrate_messages = 7"
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(file.0.clone()),
            max_connections: Some(9),
            ..ServeArgs::default()
        };
        let c = load(&args).unwrap();
        assert_eq!(c.drain_window, Duration::from_secs(3));
        assert_eq!(c.limits.max_connections, 9);
        assert_eq!(c.limits.rate_messages, 7);
        assert_eq!(
            c.limits.ping_interval,
            Config::default().limits.ping_interval
        );
        std::fs::remove_file(&file.0).unwrap();
    }

    #[test]
    fn a_broken_config_file_is_fatal() {
        let mut file = tempfile();
        writeln!(file.1, "no_such_key = 1").unwrap();
        let args = ServeArgs {
            config: Some(file.0.clone()),
            ..ServeArgs::default()
        };
        assert!(load(&args).is_err());
        std::fs::remove_file(&file.0).unwrap();
        let missing = ServeArgs {
            config: Some("/nonexistent/roomcast.toml".into()),
            ..ServeArgs::default()
        };
        assert!(load(&missing).is_err());
    }

    fn tempfile() -> (std::path::PathBuf, std::fs::File) {
        let path =
            std::env::temp_dir().join(format!("roomcast-test-{}.toml", rand::random::<u64>()));
        let f = std::fs::File::create(&path).unwrap();
        (path, f)
    }
}
