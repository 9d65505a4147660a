//! The node: one edge process. Owns the hub, the broker handle, credentials,
//! the session registry and readiness; `run` serves until shutdown and then
//! drains.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use roomcast_auth::{Authorizer, Verifier};
use roomcast_broker::{Broker, EventSink, HistoryCap, HistoryPolicy, MemoryBroker};
use roomcast_protocol::{NodeId, SessionId};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{Config, IoUringMode};
use crate::dialect::Dialect;
use crate::disconnect::Disconnect;
use crate::hub::Hub;
use crate::session::Session;

const REGISTRY_SHARDS: usize = 16;

/// One shard of the session registry.
type RegistryShard = Mutex<HashMap<SessionId, Arc<Session>>>;

/// A node that could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("authentication setup: {0}")]
    Auth(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("broker setup: {0}")]
    Broker(#[source] roomcast_broker::BrokerError),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// One edge node.
pub struct Node {
    config: Config,
    id: NodeId,
    hub: Arc<Hub>,
    broker: Arc<dyn Broker>,
    verifier: Verifier,
    authorizer: Authorizer,
    sessions: Box<[RegistryShard]>,
    connections: AtomicUsize,
    /// Publishes being handled by the HTTP API right now.
    publishes: Arc<AtomicUsize>,
    /// False once shutdown began, so `/readyz` fails before sockets close.
    accepting: AtomicBool,
    shutdown: watch::Sender<bool>,
    /// Exact paths, then prefixes (paths ending in `/`), to their dialect.
    routes: Vec<(String, Arc<dyn Dialect>)>,
}

/// The history caps a config asks for.
pub fn history_policy(config: &Config) -> HistoryPolicy {
    HistoryPolicy {
        default: HistoryCap {
            max_len: config.broker.history_max_len,
            max_age: config.broker.history_max_age,
        },
        per_kind: config
            .broker
            .history_kinds
            .iter()
            .map(|(kind, cap)| {
                (
                    kind.clone(),
                    HistoryCap {
                        max_len: cap.max_len,
                        max_age: cap.max_age,
                    },
                )
            })
            .collect(),
    }
}

impl Node {
    /// Builds a node on the embedded memory broker.
    pub async fn with_memory_broker(config: Config) -> Result<Arc<Node>, NodeError> {
        let policy = history_policy(&config);
        Self::build(config, move |sink| async move {
            let broker = Arc::new(MemoryBroker::new(policy));
            broker.attach(sink);
            Ok(broker as Arc<dyn Broker>)
        })
        .await
    }

    /// Builds a node whose broker is made by `make_broker`, which receives
    /// the hub as the sink for incoming events.
    pub async fn build<F, Fut>(config: Config, make_broker: F) -> Result<Arc<Node>, NodeError>
    where
        F: FnOnce(Arc<dyn EventSink>) -> Fut,
        Fut: Future<Output = Result<Arc<dyn Broker>, roomcast_broker::BrokerError>>,
    {
        config.validate()?;
        crate::metrics::prometheus();
        crate::metrics::register_defaults(config.limits.max_connections);
        let verifier = crate::auth::verifier(&config).map_err(NodeError::Auth)?;
        let authorizer = crate::auth::authorizer(&config).map_err(NodeError::Auth)?;
        let io_uring = match config.limits.io_uring {
            IoUringMode::Off => false,
            IoUringMode::Auto => true,
            IoUringMode::Required => {
                crate::uring::probe().map_err(|e| {
                    crate::config::ConfigError(format!(
                        "limits.io_uring = \"required\", but this process may not use io_uring: {e}"
                    ))
                })?;
                true
            }
        };
        let hub = Hub::new(config.unsubscribe_delay, io_uring);
        let broker = make_broker(hub.clone() as Arc<dyn EventSink>)
            .await
            .map_err(NodeError::Broker)?;
        hub.attach(broker.clone());
        let id: NodeId = match &config.node_id {
            Some(id) => id
                .parse()
                .map_err(|e| crate::config::ConfigError(format!("node_id: {e}")))?,
            None => crate::ids::random_id("n")
                .parse()
                .expect("generated ids are valid"),
        };
        let mut routes = Vec::new();
        for dialect in crate::dialects::build(&config)? {
            for path in dialect.paths() {
                if routes.iter().any(|(p, _): &(String, _)| *p == path) {
                    return Err(crate::config::ConfigError(format!(
                        "two dialects are mounted on {path}"
                    ))
                    .into());
                }
                routes.push((path, dialect.clone()));
            }
        }
        // Exact paths before prefixes; longer prefixes first.
        routes.sort_by_key(|(p, _)| (p.ends_with('/'), std::cmp::Reverse(p.len())));
        hub.track_presence(crate::hub::PresenceTracking {
            kinds: config.presence.kinds.clone(),
            ttl: config.presence.ttl,
            node: id.clone(),
            left_also: crate::dialects::seed003::presence_left_rooms(&config),
        });
        let (shutdown, _) = watch::channel(false);
        Ok(Arc::new(Node {
            id,
            hub,
            broker,
            verifier,
            authorizer,
            sessions: (0..REGISTRY_SHARDS).map(|_| Mutex::default()).collect(),
            connections: AtomicUsize::new(0),
            publishes: Arc::new(AtomicUsize::new(0)),
            accepting: AtomicBool::new(true),
            shutdown,
            routes,
            config,
        }))
    }

    /// The dialect serving `path`, if any.
    pub(crate) fn dialect_for(&self, path: &str) -> Option<&Arc<dyn Dialect>> {
        self.routes
            .iter()
            .find(|(p, _)| p == path || (p.ends_with('/') && path.starts_with(p.as_str())))
            .map(|(_, d)| d)
    }

    pub fn id(&self) -> &NodeId {
        &self.id
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    pub(crate) fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    pub(crate) fn authorizer(&self) -> &Authorizer {
        &self.authorizer
    }

    /// Ready: accepting and the broker is healthy.
    pub fn is_ready(&self) -> bool {
        self.accepting.load(Ordering::Acquire) && self.broker.healthy()
    }

    /// Publishes being handled right now.
    pub fn publishes_in_flight(&self) -> usize {
        self.publishes.load(Ordering::Acquire)
    }

    /// Counts a publish until the returned guard drops.
    pub(crate) fn publish_started(&self) -> InFlight {
        self.publishes.fetch_add(1, Ordering::AcqRel);
        InFlight(self.publishes.clone())
    }

    /// Open sessions on this node.
    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// Reserves a connection slot; `None` at the cap or while draining.
    pub(crate) fn try_reserve_connection(self: &Arc<Self>) -> Option<ConnectionSlot> {
        if !self.accepting.load(Ordering::Acquire) {
            return None;
        }
        let max = self.config.limits.max_connections;
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnectionSlot { node: self.clone() })
    }

    fn registry(&self, id: &SessionId) -> &RegistryShard {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        id.hash(&mut h);
        &self.sessions[(h.finish() as usize) % REGISTRY_SHARDS]
    }

    pub(crate) fn register(&self, session: &Arc<Session>) {
        self.registry(&session.id)
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(session.id.clone(), session.clone());
        // A session that registered after the drain sweep still gets closed.
        if *self.shutdown.borrow() {
            session.outbox.close(Disconnect::SHUTDOWN, true);
        }
    }

    pub(crate) fn unregister(&self, id: &SessionId) {
        self.registry(id)
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    fn all_sessions(&self) -> Vec<Arc<Session>> {
        self.sessions
            .iter()
            .flat_map(|s| {
                s.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .values()
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Serves `listener` until `shutdown` resolves, then drains: `/readyz`
    /// fails, the listener closes, sockets are closed with 1001 spread over
    /// the drain window, and `run` returns once they are gone (or the window
    /// plus a grace period has passed).
    pub async fn run(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), NodeError> {
        let gauges = tokio::spawn({
            let node = self.clone();
            async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    node.publish_health_gauges();
                }
            }
        });
        self.publish_health_gauges();
        let presence = tokio::spawn(self.clone().presence_loop());
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let node = self.clone();
                        tokio::spawn(async move { crate::http::serve_connection(node, stream, peer).await });
                    }
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        // Not ready first, then stop accepting, then close sockets.
        self.accepting.store(false, Ordering::Release);
        self.publish_health_gauges();
        drop(listener);
        self.drain().await;
        gauges.abort();
        presence.abort();
        Ok(())
    }

    /// Refreshes this node's presence entries (heartbeats) and sweeps lapsed
    /// ones, so a crashed node's users get `presence.left` within the TTL.
    async fn presence_loop(self: Arc<Self>) {
        let p = self.config.presence.clone();
        let mut heartbeat = tokio::time::interval(p.heartbeat_interval);
        let mut sweep = tokio::time::interval(p.sweep_interval);
        heartbeat.tick().await;
        loop {
            tokio::select! {
                _ = heartbeat.tick() => {
                    for session in self.all_sessions() {
                        let rooms: Vec<_> = session.rooms().clone();
                        for room in rooms {
                            if self.hub.tracks_presence(&room) {
                                let key = roomcast_protocol::RoomKey::new(session.tenant.clone(), room);
                                self.hub.presence_refresh(&session, &key).await;
                            }
                        }
                    }
                }
                _ = sweep.tick() => self.hub.sweep_presence().await,
            }
        }
    }

    fn publish_health_gauges(&self) {
        metrics::gauge!("roomcast_ready").set(if self.is_ready() { 1.0 } else { 0.0 });
        metrics::gauge!("roomcast_broker_healthy").set(if self.broker.healthy() {
            1.0
        } else {
            0.0
        });
    }

    async fn drain(&self) {
        let _ = self.shutdown.send(true);
        let sessions = self.all_sessions();
        let window = self.config.drain_window;
        tracing::info!(sessions = sessions.len(), ?window, "draining");
        let n = sessions.len().max(1) as u32;
        let start = tokio::time::Instant::now();
        for (i, session) in sessions.iter().enumerate() {
            tokio::time::sleep_until(start + window * i as u32 / n).await;
            session.outbox.close(Disconnect::SHUTDOWN, true);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.connection_count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::info!(remaining = self.connection_count(), "drain finished");
    }
}

/// One publish in flight, counted until dropped.
pub(crate) struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A reserved connection slot, released on drop.
pub(crate) struct ConnectionSlot {
    node: Arc<Node>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.node.connections.fetch_sub(1, Ordering::AcqRel);
    }
}
