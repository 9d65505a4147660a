//! The subscriber actor: owns the pub/sub connections (one in standalone
//! mode, one per master in Cluster mode), keeps the subscriptions Redis
//! holds equal to the rooms the node wants, reconnects with backoff,
//! follows slot moves, and reports health and resyncs.
//!
//! Everything that changes subscription state runs on this one task, so the
//! bookkeeping needs no locks; received messages bypass it (the reader tasks
//! deliver them directly, see [`crate::subscriber::Shared::receive`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use roomcast_broker::Backoff;
use tokio::io::AsyncWriteExt as _;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;

use crate::commands::Commands;
use crate::config::RedisConfig;
use crate::link::{self, Connected, Endpoint};
use crate::names::slot_of;
use crate::resp;
use crate::subscriber::{LinkEvent, Msg, Shared};
use crate::topology::{parse_moved, SlotMap};

mod reconcile;

/// Least time between two warnings of one kind (a link that cannot
/// (re)connect, Redis refusing subscriptions): an operator must see why,
/// but a problem that lasts should not flood the log.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Says whether a repeated warning is due: the first time, then at most
/// once per [`WARN_EVERY`]; the others go to debug.
#[derive(Default)]
struct WarnEvery {
    last: Option<Instant>,
}

impl WarnEvery {
    fn due(&mut self) -> bool {
        self.due_at(Instant::now())
    }

    fn due_at(&mut self, now: Instant) -> bool {
        let due = self.last.is_none_or(|at| now - at >= WARN_EVERY);
        if due {
            self.last = Some(now);
        }
        due
    }
}

/// Channels per SUBSCRIBE command when resubscribing many rooms.
const BATCH: usize = 256;
/// Pause before re-sending subscriptions that Redis refused.
const HOLD_AFTER_ERROR: Duration = Duration::from_millis(200);

pub(crate) enum Mode {
    Standalone { endpoint: Endpoint },
    Cluster { seed: Endpoint, commands: Commands },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not yet up for the first time: subscribers wait.
    Starting,
    Healthy,
    /// Lost a connection or a slot: back to `Healthy` (with a resync) once
    /// every wanted room is confirmed again.
    Recovering,
}

struct Link {
    endpoint: Endpoint,
    conn: Option<Conn>,
    /// The task retrying the connection, while there is one: aborted when
    /// the node leaves the slot map, so a dead node is not dialled forever.
    connecting: Option<AbortHandle>,
    was_up: bool,
}

struct Conn {
    id: u64,
    writer: link::LinkWrite,
    reader: JoinHandle<()>,
    subscribed: HashSet<Box<[u8]>>,
    pending: HashSet<Box<[u8]>>,
    leaving: HashSet<Box<[u8]>>,
    /// Redis refused a command on this connection (not a slot move): from
    /// then on each channel goes in a command of its own, so one refused
    /// channel (an ACL) does not keep the others of its batch out.
    one_per_command: bool,
}

impl Conn {
    fn holds(&self, ch: &[u8]) -> bool {
        self.subscribed.contains(ch) || self.pending.contains(ch)
    }
}

pub(crate) struct Actor {
    shared: Arc<Shared>,
    config: Arc<RedisConfig>,
    mode: Mode,
    slots: Option<SlotMap>,
    links: HashMap<Arc<str>, Link>,
    waiters: HashMap<Box<[u8]>, Vec<oneshot::Sender<()>>>,
    state: State,
    next_conn_id: u64,
    events: mpsc::UnboundedSender<Msg>,
    hold_until: Option<Instant>,
    topology_in_flight: bool,
    topology_again: bool,
    /// Channels to look at on the next reconcile; `None` means all.
    dirty: Option<HashSet<Box<[u8]>>>,
    refused_warn: WarnEvery,
}

impl Actor {
    /// Starts the actor. `commands` receives subscribe/unsubscribe from the
    /// broker; `events`/`inbox` are the actor's own channel (readers and
    /// connect tasks send there).
    pub(crate) fn spawn(
        shared: Arc<Shared>,
        config: Arc<RedisConfig>,
        mode: Mode,
        commands: mpsc::UnboundedReceiver<Msg>,
    ) -> JoinHandle<()> {
        let (events, inbox) = mpsc::unbounded_channel();
        let mut actor = Actor {
            shared,
            config,
            mode,
            slots: None,
            links: HashMap::new(),
            waiters: HashMap::new(),
            state: State::Starting,
            next_conn_id: 0,
            events,
            hold_until: None,
            topology_in_flight: false,
            topology_again: false,
            dirty: None,
            refused_warn: WarnEvery::default(),
        };
        tokio::spawn(async move { actor.run(commands, inbox).await })
    }

    async fn run(
        &mut self,
        mut commands: mpsc::UnboundedReceiver<Msg>,
        mut inbox: mpsc::UnboundedReceiver<Msg>,
    ) {
        match &self.mode {
            Mode::Standalone { endpoint } => {
                let addr: Arc<str> = Arc::from(endpoint.addr());
                self.ensure_link(&addr, endpoint.clone());
            }
            Mode::Cluster { .. } => self.request_topology(Duration::ZERO),
        }
        let mut ping = tokio::time::interval(self.config.keepalive);
        let mut refresh = tokio::time::interval(self.config.topology_refresh);
        refresh.tick().await;
        let cluster = matches!(self.mode, Mode::Cluster { .. });
        loop {
            let hold = self.hold_until;
            tokio::select! {
                msg = commands.recv() => match msg {
                    Some(msg) => self.handle(msg).await,
                    None => break, // the broker is gone
                },
                Some(msg) = inbox.recv() => self.handle(msg).await,
                _ = ping.tick() => self.ping_all().await,
                _ = refresh.tick(), if cluster => self.request_topology(Duration::ZERO),
                _ = tokio::time::sleep_until(hold.unwrap_or_else(Instant::now)), if hold.is_some() => {
                    self.hold_until = None;
                    self.dirty = None;
                }
            }
            self.reconcile().await;
        }
        for link in self.links.values_mut() {
            if let Some(conn) = link.conn.take() {
                conn.reader.abort();
            }
            if let Some(task) = link.connecting.take() {
                task.abort();
            }
        }
    }

    fn mark_dirty(&mut self, ch: &[u8]) {
        if let Some(d) = &mut self.dirty {
            d.insert(ch.into());
        }
    }

    fn mark_all_dirty(&mut self) {
        self.dirty = None;
    }

    async fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Subscribe {
                room,
                channel,
                done,
            } => {
                self.shared
                    .rooms
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(channel.clone(), room);
                self.waiters.entry(channel.clone()).or_default().push(done);
                self.mark_dirty(&channel);
            }
            Msg::Unsubscribe { channel, done } => {
                self.shared
                    .rooms
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&channel);
                // Anyone still waiting for it is answered: it is no longer wanted.
                self.waiters.remove(&channel);
                self.mark_dirty(&channel);
                self.reconcile().await;
                let _ = done.send(());
            }
            Msg::Connected { addr, conn } => self.connected(addr, conn),
            Msg::ConnectFailed { addr } => self.connect_failed(&addr),
            Msg::Link(event) => self.link_event(event),
            Msg::Topology(result) => self.topology(result),
        }
    }

    fn ensure_link(&mut self, addr: &Arc<str>, endpoint: Endpoint) {
        if !self.links.contains_key(addr) {
            self.links.insert(
                addr.clone(),
                Link {
                    endpoint,
                    conn: None,
                    connecting: None,
                    was_up: false,
                },
            );
            self.spawn_connect(addr.clone(), false);
        }
    }

    /// Connects to `addr` in the background, retrying with backoff, and
    /// reports `Msg::Connected`.
    fn spawn_connect(&mut self, addr: Arc<str>, delay_first: bool) {
        let Some(link) = self.links.get_mut(&addr) else {
            return;
        };
        if link.connecting.is_some() || link.conn.is_some() {
            return;
        }
        let endpoint = link.endpoint.clone();
        let events = self.events.clone();
        let timeout = self.config.command_timeout;
        let mut backoff = Backoff::new(self.config.backoff_base, self.config.backoff_max);
        let task = tokio::spawn(async move {
            let mut wait = delay_first;
            let mut warn = WarnEvery::default();
            loop {
                if wait {
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                wait = true;
                if events.is_closed() {
                    return;
                }
                match link::connect(&endpoint, timeout).await {
                    Ok(conn) => {
                        let _ = events.send(Msg::Connected { addr, conn });
                        return;
                    }
                    Err(e) => {
                        // Why matters (refused, TLS, AUTH); once a minute.
                        if warn.due() {
                            tracing::warn!(addr = %addr, error = %e, attempt = backoff.attempts(), "redis subscriber cannot connect; retrying");
                        } else {
                            tracing::debug!(addr = %addr, error = %e, attempt = backoff.attempts(), "redis subscriber connect failed");
                        }
                        let _ = events.send(Msg::ConnectFailed { addr: addr.clone() });
                    }
                }
            }
        });
        link.connecting = Some(task.abort_handle());
    }

    /// A node we want is unreachable. In a Cluster it may have died and been
    /// replaced by a replica; nothing else announces that (the dead node
    /// cannot say MOVED and the survivors do not talk to us), so re-read the
    /// slot map at the pace of the reconnect attempts. Once the slots list
    /// the promoted replica, [`Actor::topology`] drops the dead node's link
    /// and the rooms are subscribed on the new owner.
    fn connect_failed(&mut self, addr: &Arc<str>) {
        if self.links.contains_key(addr) {
            self.request_topology(Duration::ZERO);
        }
    }

    fn connected(&mut self, addr: Arc<str>, conn: Connected) {
        let Some(link) = self.links.get_mut(&addr) else {
            return; // no longer a node we use
        };
        link.connecting = None;
        if link.conn.is_some() {
            return; // already connected (a stale attempt finished late)
        }
        self.next_conn_id += 1;
        let id = self.next_conn_id;
        let idle = self.config.keepalive * 3;
        let reader = tokio::spawn(link::read_loop(
            id,
            conn.reader,
            self.shared.clone(),
            self.events.clone(),
            idle,
        ));
        if link.was_up {
            metrics::counter!("roomcast_redis_reconnects_total").increment(1);
            tracing::info!(addr = %addr, "redis subscriber reconnected; resubscribing");
        }
        link.was_up = true;
        link.conn = Some(Conn {
            id,
            writer: conn.writer,
            reader,
            subscribed: HashSet::new(),
            pending: HashSet::new(),
            leaving: HashSet::new(),
            one_per_command: false,
        });
        self.mark_all_dirty();
    }

    fn conn_by_id(&mut self, conn_id: u64) -> Option<(Arc<str>, &mut Conn)> {
        self.links
            .iter_mut()
            .find_map(|(addr, link)| match &mut link.conn {
                Some(c) if c.id == conn_id => Some((addr.clone(), c)),
                _ => None,
            })
    }

    fn link_event(&mut self, event: LinkEvent) {
        match event {
            LinkEvent::Subscribed { conn_id, channel } => {
                if let Some((_, conn)) = self.conn_by_id(conn_id) {
                    conn.pending.remove(&channel);
                    conn.subscribed.insert(channel);
                }
            }
            LinkEvent::Unsubscribed { conn_id, channel } => {
                let Some((addr, conn)) = self.conn_by_id(conn_id) else {
                    return;
                };
                if conn.leaving.remove(&channel) {
                    return; // the answer to our own unsubscribe
                }
                conn.pending.remove(&channel);
                conn.subscribed.remove(&channel);
                if self.shared.wants(&channel) {
                    self.shared.interrupted([&channel]);
                    // Redis dropped a room we want: its slot moved away.
                    tracing::info!(addr = %addr, channel = %String::from_utf8_lossy(&channel),
                        "redis dropped a sharded subscription (slot moved); following it");
                    self.state = State::Recovering;
                    self.request_topology(Duration::ZERO);
                    self.mark_dirty(&channel);
                }
            }
            LinkEvent::ServerError { conn_id, message } => {
                // Retried every HOLD_AFTER_ERROR: a lasting refusal (an ACL
                // without the node's channels) is told once a minute.
                if self.refused_warn.due() {
                    tracing::warn!(error = %message, "redis refused a subscription command");
                } else {
                    tracing::debug!(error = %message, "redis refused a subscription command");
                }
                let moved = parse_moved(&message).is_some();
                if let Some((_, conn)) = self.conn_by_id(conn_id) {
                    conn.pending.clear();
                    conn.one_per_command |= !moved;
                }
                if let (Some(slots), Some((slot, addr))) = (&mut self.slots, parse_moved(&message))
                {
                    slots.moved(slot, addr);
                    let addr: Arc<str> = Arc::from(addr);
                    if let Mode::Cluster { seed, .. } = &self.mode {
                        if let Some((host, port)) = addr.rsplit_once(':') {
                            let ep = seed.with_addr(host, port.parse().unwrap_or(6379));
                            self.ensure_link(&addr, ep);
                        }
                    }
                }
                if matches!(self.mode, Mode::Cluster { .. }) {
                    self.request_topology(HOLD_AFTER_ERROR);
                }
                self.hold_until = Some(Instant::now() + HOLD_AFTER_ERROR);
            }
            LinkEvent::Closed { conn_id, reason } => {
                let Some((addr, _)) = self.conn_by_id(conn_id) else {
                    return;
                };
                self.drop_conn(&addr, &reason);
            }
        }
    }

    /// Forgets a broken connection and starts reconnecting it.
    fn drop_conn(&mut self, addr: &Arc<str>, reason: &str) {
        let Some(link) = self.links.get_mut(addr) else {
            return;
        };
        if let Some(conn) = link.conn.take() {
            conn.reader.abort();
            tracing::warn!(addr = %addr, reason, "redis subscriber connection lost");
            self.shared
                .interrupted(conn.subscribed.iter().chain(conn.pending.iter()));
        }
        self.state = State::Recovering;
        self.shared.set_healthy(false);
        metrics::gauge!("roomcast_redis_connected").set(0.0);
        self.spawn_connect(addr.clone(), true);
        if matches!(self.mode, Mode::Cluster { .. }) {
            self.request_topology(Duration::ZERO);
        }
        self.mark_all_dirty();
    }

    fn request_topology(&mut self, delay: Duration) {
        let Mode::Cluster { commands, .. } = &self.mode else {
            return;
        };
        if self.topology_in_flight {
            self.topology_again = true;
            return;
        }
        self.topology_in_flight = true;
        let commands = commands.clone();
        let events = self.events.clone();
        let fallback = match &self.mode {
            Mode::Cluster { seed, .. } => seed.host.clone(),
            Mode::Standalone { .. } => String::new(),
        };
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let result = match commands
                .query::<redis::Value>(redis::cmd("CLUSTER").arg("SLOTS"))
                .await
            {
                Ok(reply) => SlotMap::from_cluster_slots(&reply, &fallback)
                    .ok_or_else(|| "unexpected CLUSTER SLOTS reply".to_owned()),
                Err(e) => Err(e.to_string()),
            };
            let _ = events.send(Msg::Topology(result));
        });
    }

    fn topology(&mut self, result: Result<SlotMap, String>) {
        self.topology_in_flight = false;
        match result {
            Ok(map) => {
                let Mode::Cluster { seed, .. } = &self.mode else {
                    return;
                };
                let seed = seed.clone();
                let masters = map.masters();
                for addr in &masters {
                    if let Some((host, port)) = addr.rsplit_once(':') {
                        let ep = seed.with_addr(host, port.parse().unwrap_or(6379));
                        self.ensure_link(addr, ep);
                    }
                }
                // Masters that own no slot any more are let go.
                let shared = &self.shared;
                self.links.retain(|addr, link| {
                    let keep = masters.contains(addr);
                    if !keep {
                        if let Some(conn) = link.conn.take() {
                            conn.reader.abort();
                            shared.interrupted(conn.subscribed.iter().chain(conn.pending.iter()));
                        }
                        if let Some(task) = link.connecting.take() {
                            task.abort();
                        }
                    }
                    keep
                });
                if self.slots.as_ref() != Some(&map) {
                    self.slots = Some(map);
                    self.mark_all_dirty();
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the redis cluster topology failed");
                self.topology_again = true;
            }
        }
        if std::mem::take(&mut self.topology_again) {
            self.request_topology(HOLD_AFTER_ERROR);
        }
    }

    /// The node that should hold `ch`'s subscription.
    fn owner(&self, ch: &[u8]) -> Option<Arc<str>> {
        match &self.mode {
            Mode::Standalone { .. } => self.links.keys().next().cloned(),
            Mode::Cluster { .. } => self.slots.as_ref()?.owner(slot_of(ch)).cloned(),
        }
    }

    async fn ping_all(&mut self) {
        let ping = resp::encode(&["PING"]);
        let addrs: Vec<Arc<str>> = self.links.keys().cloned().collect();
        for addr in addrs {
            self.write(&addr, &ping).await;
        }
    }

    async fn write(&mut self, addr: &Arc<str>, bytes: &[u8]) -> bool {
        let timeout = self.config.command_timeout;
        let Some(conn) = self.links.get_mut(addr).and_then(|l| l.conn.as_mut()) else {
            return false;
        };
        // The flush matters for TLS only: a record the socket could not take
        // at once would otherwise wait in rustls for the next write.
        let writer = &mut conn.writer;
        let send = async move {
            writer.write_all(bytes).await?;
            writer.flush().await
        };
        let result = tokio::time::timeout(timeout, send).await;
        match result {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                self.drop_conn(addr, &e.to_string());
                false
            }
            Err(_) => {
                self.drop_conn(addr, "write timed out");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_warning_is_due_first_then_once_a_minute() {
        let start = Instant::now();
        let mut warn = WarnEvery::default();
        // Two minutes of retries HOLD_AFTER_ERROR apart.
        let told: Vec<Duration> = (0..=600)
            .map(|i| HOLD_AFTER_ERROR * i)
            .filter(|&t| warn.due_at(start + t))
            .collect();
        assert_eq!(told, [0, 60, 120].map(Duration::from_secs));
    }
}
