//! The command path (publish script, history reads, topology): a few
//! auto-reconnecting multiplexed connections in standalone mode, the
//! redis crate's cluster client (one connection per master, follows
//! MOVED/ASK) in Cluster mode.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue, Pipeline, RedisFuture, RedisResult, Value};

use crate::config::{RedisConfig, RedisMode};
use crate::tls::TlsMaterial;

/// Command connections of one node. Cheap to clone; clones share the
/// connections, and [`Commands::replace_with`] replaces them for all.
#[derive(Clone)]
pub(crate) struct Commands {
    conns: Arc<RwLock<Conns>>,
    /// Longest any command may take, whatever the client library waits for.
    timeout: Duration,
}

#[derive(Clone)]
enum Conns {
    Standalone {
        conns: Arc<[ConnectionManager]>,
        next: Arc<AtomicUsize>,
    },
    Cluster(ClusterConnection),
}

impl Commands {
    pub(crate) async fn connect(
        config: &RedisConfig,
        tls: Option<&TlsMaterial>,
    ) -> RedisResult<Commands> {
        let t = Some(config.command_timeout);
        match &config.mode {
            RedisMode::Standalone { url } => {
                let client = match tls {
                    Some(tls) => redis::Client::build_with_tls(url.as_str(), tls.certs.clone())?,
                    None => redis::Client::open(url.as_str())?,
                };
                let cfg = ConnectionManagerConfig::new()
                    .set_connection_timeout(t)
                    .set_response_timeout(t)
                    .set_max_delay(config.backoff_max)
                    .set_number_of_retries(2);
                let mut conns = Vec::with_capacity(config.pool_size);
                for _ in 0..config.pool_size {
                    conns.push(
                        ConnectionManager::new_with_config(client.clone(), cfg.clone()).await?,
                    );
                }
                Ok(Commands::new(
                    Conns::Standalone {
                        conns: conns.into(),
                        next: Arc::new(AtomicUsize::new(0)),
                    },
                    config.command_timeout,
                ))
            }
            RedisMode::Cluster { urls } => {
                let mut builder = ClusterClientBuilder::new(urls.iter().map(String::as_str))
                    .connection_timeout(config.command_timeout)
                    .response_timeout(config.command_timeout);
                if let Some(tls) = tls {
                    builder = builder.certs(tls.certs.clone());
                }
                let client = builder.build()?;
                Ok(Commands::new(
                    Conns::Cluster(client.get_async_connection().await?),
                    config.command_timeout,
                ))
            }
        }
    }

    fn new(conns: Conns, timeout: Duration) -> Commands {
        Commands {
            conns: Arc::new(RwLock::new(conns)),
            timeout,
        }
    }

    /// From now on every clone sends its commands over `other`'s
    /// connections (those of the old ones in flight finish on them).
    pub(crate) fn replace_with(&self, other: &Commands) {
        let conns = other
            .conns
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        *self.conns.write().unwrap_or_else(|p| p.into_inner()) = conns;
    }

    pub(crate) async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> RedisResult<T> {
        self.bounded(cmd.query_async(&mut self.pick())).await
    }

    /// Runs a pipeline whose keys all live in one slot.
    pub(crate) async fn pipeline<T: FromRedisValue>(&self, pipe: &Pipeline) -> RedisResult<T> {
        self.bounded(pipe.query_async(&mut self.pick())).await
    }

    /// The connection for the next command (standalone: round robin).
    fn pick(&self) -> Picked {
        match &*self.conns.read().unwrap_or_else(|p| p.into_inner()) {
            Conns::Standalone { conns, next } => {
                let i = next.fetch_add(1, Ordering::Relaxed) % conns.len();
                Picked::Standalone(conns[i].clone())
            }
            Conns::Cluster(conn) => Picked::Cluster(conn.clone()),
        }
    }

    /// `reply`, or a timeout error after `self.timeout`. The clients have
    /// their own response timeouts, but the cluster client was seen waiting
    /// forever, with no timer armed, for a cluster that had failed during a
    /// failover test: a publish must end either way.
    async fn bounded<T>(
        &self,
        reply: impl std::future::Future<Output = RedisResult<T>>,
    ) -> RedisResult<T> {
        match tokio::time::timeout(self.timeout, reply).await {
            Ok(reply) => reply,
            Err(_) => Err(redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no reply from redis within {:?}", self.timeout),
            ))),
        }
    }
}

/// One command connection of either mode (clones share the underlying
/// multiplexed connection).
enum Picked {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Picked {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Picked::Standalone(c) => c.req_packed_command(cmd),
            Picked::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Picked::Standalone(c) => c.req_packed_commands(pipeline, offset, count),
            Picked::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Picked::Standalone(c) => c.get_db(),
            Picked::Cluster(c) => c.get_db(),
        }
    }
}
