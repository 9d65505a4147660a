//! [`RedisBroker`]: the `Broker` contract on Redis.

use std::sync::Arc;

use async_trait::async_trait;
use roomcast_broker::{Broker, BrokerError, EventSink, History, Published};
use roomcast_protocol::{Event, EventId, RoomKey};
use tokio::sync::mpsc;

use crate::actor::{Actor, Mode};
use crate::commands::Commands;
use crate::config::{ConfigError, RedisConfig, RedisMode};
use crate::link::Endpoint;
use crate::names::Names;
use crate::subscriber::{Shared, Subscriber};
use crate::{history, script, tls};

/// The Redis broker of one node: publishes with [`crate::PUBLISH_SCRIPT`],
/// holds one subscription per wanted room on a fixed set of connections,
/// and reads history from the rooms' streams.
pub struct RedisBroker {
    config: Arc<RedisConfig>,
    names: Names,
    commands: Commands,
    subscriber: Subscriber,
}

fn config_error(e: ConfigError) -> BrokerError {
    BrokerError::Unavailable {
        context: "invalid redis configuration".into(),
        source: Some(Box::new(e)),
    }
}

impl RedisBroker {
    /// Connects the command path (fails when Redis cannot be reached),
    /// starts the subscriber, and waits briefly for it to be up. Events of
    /// subscribed rooms go to `sink`, from the broker's own tasks.
    pub async fn connect(
        config: RedisConfig,
        sink: Arc<dyn EventSink>,
    ) -> Result<Arc<RedisBroker>, BrokerError> {
        config.validate().map_err(config_error)?;
        let tls = tls::material(&config).map_err(config_error)?;
        let commands = Commands::connect(&config, tls.as_ref())
            .await
            .map_err(|e| BrokerError::unavailable("connecting to redis", e))?;
        let tls_client = tls.as_ref().map(|m| &m.client);
        let mode = match &config.mode {
            RedisMode::Standalone { url } => Mode::Standalone {
                endpoint: Endpoint::from_url(url, tls_client).map_err(config_error)?,
            },
            RedisMode::Cluster { urls } => Mode::Cluster {
                seed: Endpoint::from_url(&urls[0], tls_client).map_err(config_error)?,
                commands: commands.clone(),
            },
        };
        let tls_client = tls_client.cloned();
        let config = Arc::new(config);
        let shared = Arc::new(Shared::new(sink, config.fanout_lanes));
        metrics::gauge!("roomcast_redis_fanout_lanes").set(shared.lanes() as f64);
        let (tx, rx) = mpsc::unbounded_channel();
        Actor::spawn(shared.clone(), config.clone(), mode, rx);
        if !shared.wait_healthy(config.command_timeout).await {
            tracing::warn!("redis subscriber not up yet; it keeps trying");
        }
        let broker = Arc::new(RedisBroker {
            names: Names::new(&config.prefix),
            config,
            commands,
            subscriber: Subscriber { tx, shared },
        });
        if let (Some(material), Some(client)) = (tls, tls_client) {
            if !broker.config.tls_reload.is_zero() {
                tokio::spawn(reload_tls(Arc::downgrade(&broker), client, material.files));
            }
        }
        Ok(broker)
    }

    pub fn config(&self) -> &RedisConfig {
        &self.config
    }

    /// The room's pub/sub channel name.
    pub fn channel_name(&self, room: &RoomKey) -> String {
        self.names.channel(room)
    }

    /// The room's history stream key.
    pub fn stream_name(&self, room: &RoomKey) -> String {
        self.names.stream(room)
    }

    pub(crate) fn commands(&self) -> &Commands {
        &self.commands
    }

    pub(crate) fn names(&self) -> &Names {
        &self.names
    }

    fn sharded(&self) -> bool {
        matches!(self.config.mode, RedisMode::Cluster { .. })
    }
}

/// Reads the TLS files every `tls_reload` while the broker lives. When
/// they changed, new command connections are made with them first: only if
/// those work do the command path and the subscriber links (on their next
/// connect) switch, so a half-written or wrong rotation keeps the node on
/// what works, and is tried again at the next read.
async fn reload_tls(
    broker: std::sync::Weak<RedisBroker>,
    links: tls::TlsClient,
    mut current: tls::TlsFiles,
) {
    let every = match broker.upgrade() {
        Some(b) => b.config.tls_reload,
        None => return,
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(broker) = broker.upgrade() else {
            return;
        };
        let config = &broker.config;
        let switched = match tls::reloaded(&config.tls, &current) {
            Ok(None) => continue,
            Ok(Some(material)) => match Commands::connect(config, Some(&material)).await {
                Ok(commands) => {
                    broker.commands.replace_with(&commands);
                    links.replace_with(&material.client);
                    current = material.files;
                    Ok(())
                }
                Err(e) => Err(format!("Redis refuses them: {e}")),
            },
            Err(e) => Err(format!("they cannot be used: {e}")),
        };
        let outcome = if switched.is_ok() { "ok" } else { "failed" };
        metrics::counter!("roomcast_redis_tls_reloads_total", "outcome" => outcome).increment(1);
        match switched {
            Ok(()) => tracing::info!("redis TLS files changed; new connections use them"),
            Err(e) => {
                tracing::warn!(error = %e, "redis TLS files changed but are not used; keeping the current ones")
            }
        }
    }
}

fn stopped() -> BrokerError {
    BrokerError::Unavailable {
        context: "the redis subscriber has stopped".into(),
        source: None,
    }
}

#[async_trait]
impl Broker for RedisBroker {
    async fn publish(&self, event: Event) -> Result<Published, BrokerError> {
        script::publish(
            &self.commands,
            &self.names,
            &self.config,
            self.sharded(),
            event,
        )
        .await
    }

    async fn publish_ephemeral(&self, event: Event) -> Result<(), BrokerError> {
        script::publish_ephemeral(&self.commands, &self.names, self.sharded(), event).await
    }

    /// Records the room and waits (up to `subscribe_timeout`) for Redis to
    /// confirm. While Redis is unreachable it returns `Ok` at once: the room
    /// is subscribed on reconnect, followed by `EventSink::resynced`.
    async fn subscribe(&self, room: &RoomKey) -> Result<(), BrokerError> {
        let channel = self.names.channel(room);
        if self
            .subscriber
            .subscribe(room, channel, self.config.subscribe_timeout)
            .await
        {
            Ok(())
        } else {
            Err(stopped())
        }
    }

    async fn unsubscribe(&self, room: &RoomKey) -> Result<(), BrokerError> {
        if self.subscriber.unsubscribe(self.names.channel(room)).await {
            Ok(())
        } else {
            Err(stopped())
        }
    }

    async fn history_since(
        &self,
        room: &RoomKey,
        since: EventId,
        limit: usize,
    ) -> Result<History, BrokerError> {
        history::since(&self.commands, &self.names, room, since, limit).await
    }

    fn healthy(&self) -> bool {
        self.subscriber.shared.healthy()
    }

    fn presence(&self) -> Option<&dyn roomcast_broker::Presence> {
        Some(self)
    }

    fn counters(&self) -> Option<&dyn roomcast_broker::Counters> {
        Some(self)
    }

    fn kind(&self) -> &'static str {
        if self.sharded() {
            "redis-cluster"
        } else {
            "redis"
        }
    }
}

/// Publishes one event straight into Redis with the publish script, without
/// a node (for `roomcast publish --redis` and tools). Uses `config.mode`,
/// `prefix`, `history` and `exact_trim`.
pub async fn publish_direct(config: &RedisConfig, event: Event) -> Result<Published, BrokerError> {
    config.validate().map_err(config_error)?;
    let mut one = config.clone();
    one.pool_size = 1;
    let tls = tls::material(config).map_err(config_error)?;
    let commands = Commands::connect(&one, tls.as_ref())
        .await
        .map_err(|e| BrokerError::unavailable("connecting to redis", e))?;
    let sharded = matches!(config.mode, RedisMode::Cluster { .. });
    script::publish(
        &commands,
        &Names::new(&config.prefix),
        config,
        sharded,
        event,
    )
    .await
}

/// The channel of `room` under `prefix` (`<prefix>{<tenant>/<room>}:c`).
pub fn room_channel(prefix: &str, room: &RoomKey) -> String {
    Names::new(prefix).channel(room)
}

/// The history stream of `room` under `prefix` (`<prefix>{<tenant>/<room>}:h`).
pub fn room_stream(prefix: &str, room: &RoomKey) -> String {
    Names::new(prefix).stream(room)
}

/// The room a channel name under `prefix` names, if it is one of ours
/// (the subscriber itself trusts only its own channel → room map).
pub fn parse_room_channel(prefix: &str, channel: &[u8]) -> Option<RoomKey> {
    Names::new(prefix).parse_channel(channel)
}
