//! The Redis broker against a Redis Cluster with replicas: a master dies
//! while its rooms are busy, a replica takes over, and the node's sharded
//! subscriptions follow it, without disturbing rooms on other masters.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{event, eventually, key, n_of, sink, PATIENCE};
use roomcast_broker::Broker;
use roomcast_broker_redis::{RedisBroker, RedisConfig};
use roomcast_protocol::{EventId, RoomKey};
use roomcast_testkit::{query, unique_prefix, RedisCluster};
use tokio::task::JoinHandle;

async fn shardnumsub(url: &str, channel: &str) -> i64 {
    let reply: (String, i64) =
        query(url, redis::cmd("PUBSUB").arg("SHARDNUMSUB").arg(channel)).await;
    reply.1
}

/// What one room's publisher did.
#[derive(Default)]
struct Sent {
    /// Accepted publishes, in order: (n, id).
    accepted: Vec<(u64, EventId)>,
    /// Every `n` whose publish failed at least once: the failure may have
    /// come after Redis ran it (a lost reply), so it may still be delivered.
    failed: HashSet<u64>,
}

/// A publisher that keeps writing `{"n": n}` to one room through `broker`,
/// retrying an `n` until it is accepted, until `stop` is set or `n` reaches
/// `stop_at`. `next` is the `n` it is about to publish.
struct Publisher {
    next: Arc<AtomicU64>,
    stop_at: Arc<AtomicU64>,
    task: JoinHandle<Sent>,
}

impl Publisher {
    fn spawn(broker: Arc<RedisBroker>, room: String, stop: Arc<AtomicBool>) -> Publisher {
        let next = Arc::new(AtomicU64::new(0));
        let stop_at = Arc::new(AtomicU64::new(u64::MAX));
        let task = {
            let (next, stop_at) = (next.clone(), stop_at.clone());
            tokio::spawn(async move {
                let mut sent = Sent::default();
                loop {
                    let n = next.load(Ordering::SeqCst);
                    if stop.load(Ordering::SeqCst) || n >= stop_at.load(Ordering::SeqCst) {
                        return sent;
                    }
                    match broker.publish(event(&[&room], n)).await {
                        Ok(p) => {
                            sent.accepted.push((n, p.ids[0].1));
                            next.store(n + 1, Ordering::SeqCst);
                        }
                        Err(_) => {
                            // The slot's master is gone until a replica takes over.
                            sent.failed.insert(n);
                        }
                    }
                    // Pacing, not synchronisation: a steady trickle of events.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        Publisher {
            next,
            stop_at,
            task,
        }
    }

    fn next(&self) -> u64 {
        self.next.load(Ordering::SeqCst)
    }
}

/// Checks one room's deliveries: ids strictly increasing (each event at most
/// once, in order), and from `from_n` on exactly the accepted publishes
/// (tolerating only publishes whose reply was lost).
fn check_room(room: &RoomKey, sent: &Sent, got: &[(EventId, u64)], from_n: u64) {
    assert!(
        got.windows(2).all(|w| w[0].0 < w[1].0),
        "{room}: deliveries out of order or repeated: {got:?}"
    );
    let expected: Vec<(EventId, u64)> = sent
        .accepted
        .iter()
        .filter(|(n, _)| *n >= from_n)
        .map(|&(n, id)| (id, n))
        .collect();
    let accepted: HashSet<EventId> = expected.iter().map(|(id, _)| *id).collect();
    let delivered: Vec<(EventId, u64)> = got
        .iter()
        .filter(|(id, n)| *n >= from_n && (accepted.contains(id) || !sent.failed.contains(n)))
        .copied()
        .collect();
    assert_eq!(
        delivered, expected,
        "{room}: events from n={from_n} on must arrive exactly once, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_pubsub_follows_a_master_failover() {
    let mut cluster = RedisCluster::start_with_replicas(3, 1).await;
    let urls = cluster.urls();
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3, "3 masters, each with a replica");
    let mut cfg = RedisConfig::cluster(urls.clone());
    cfg.prefix = unique_prefix();
    cfg.backoff_base = Duration::from_millis(20);
    cfg.backoff_max = Duration::from_millis(200);
    cfg.command_timeout = Duration::from_secs(2);
    // The periodic re-read must not be what saves the day: a dead master is
    // a hint of its own.
    cfg.topology_refresh = Duration::from_secs(3600);
    let (sink_a, mut got_a) = sink();
    let (sink_b, _got_b) = sink();
    let a = RedisBroker::connect(cfg.clone(), sink_a).await.unwrap();
    let b = RedisBroker::connect(cfg.clone(), sink_b).await.unwrap();
    assert!(a.healthy(), "the subscriber is up on every master");

    // Rooms on every master, at least two on each.
    let mut names = Vec::new();
    let mut per_master: HashMap<usize, usize> = HashMap::new();
    for i in 1.. {
        let name = format!("team:{i}");
        let owner = cluster.owner_of(RedisCluster::slot_of(&a.channel_name(&key("acme", &name))));
        if per_master.get(&owner).copied().unwrap_or(0) < 2 {
            *per_master.entry(owner).or_default() += 1;
            names.push(name);
        }
        if per_master.len() == 3 && per_master.values().all(|&c| c == 2) {
            break;
        }
    }
    let rooms: Vec<RoomKey> = names.iter().map(|n| key("acme", n)).collect();
    for room in &rooms {
        a.subscribe(room).await.unwrap();
        let owner = cluster.owner_of(RedisCluster::slot_of(&a.channel_name(room)));
        assert_eq!(shardnumsub(&urls[owner], &a.channel_name(room)).await, 1);
    }

    // One round through the other node: each event arrives exactly once.
    let mut expect = HashMap::new();
    for name in &names {
        let id = b.publish(event(&[name], 1_000_000)).await.unwrap().ids[0].1;
        expect.insert(key("acme", name), id);
    }
    for _ in 0..names.len() {
        let (room, ev) = got_a.next().await;
        assert_eq!(expect.remove(&room), Some(ev.id), "one event per room");
    }
    got_a.assert_empty();

    // Every room busy; then the master of the first room's slot dies.
    let stop = Arc::new(AtomicBool::new(false));
    let publishers: Vec<Publisher> = names
        .iter()
        .map(|n| Publisher::spawn(b.clone(), n.clone(), stop.clone()))
        .collect();
    let mut got: HashMap<RoomKey, Vec<(EventId, u64)>> = HashMap::new();
    let busy = rooms[0].clone();
    let channel = a.channel_name(&busy);
    let slot = RedisCluster::slot_of(&channel);
    while got.get(&busy).is_none_or(|g| g.len() < 5) {
        let (room, ev) = got_a.next().await;
        got.entry(room).or_default().push((ev.id, n_of(&ev)));
    }
    let resyncs = *got_a.resyncs.borrow();
    let before: Vec<u64> = publishers.iter().map(Publisher::next).collect();
    let dead = cluster.kill_master_of(slot);
    let promoted = cluster.wait_failover(slot, dead).await;
    assert_ne!(promoted, dead);
    let during: Vec<u64> = publishers.iter().map(Publisher::next).collect();
    let owners: Vec<usize> = rooms
        .iter()
        .map(|r| cluster.owner_of(RedisCluster::slot_of(&a.channel_name(r))))
        .collect();
    for (i, room) in rooms.iter().enumerate() {
        if owners[i] != promoted {
            assert!(
                during[i] > before[i],
                "{room} on a surviving master kept being published during the failover"
            );
        }
    }

    // The node follows the slot to the promoted replica on its own. From
    // then on every publish to the moved rooms must arrive: `from[i]` is an
    // `n` chosen after the subscription was seen on the new master.
    let moved: Vec<usize> = (0..rooms.len())
        .filter(|&i| owners[i] == promoted)
        .collect();
    let mut from = vec![0; rooms.len()];
    for &i in &moved {
        eventually("the subscription to move to the promoted replica", || {
            let (url, ch) = (urls[promoted].clone(), a.channel_name(&rooms[i]));
            async move { shardnumsub(&url, &ch).await == 1 }
        })
        .await;
        from[i] = publishers[i].next() + 1;
    }
    got_a.resynced_after(resyncs).await;
    eventually("the broker to be healthy after the failover", || {
        let healthy = a.healthy();
        async move { healthy }
    })
    .await;

    // Let the moved rooms publish 30 more events each, then stop everyone.
    for &i in &moved {
        publishers[i].stop_at.store(from[i] + 30, Ordering::SeqCst);
    }
    let mut tasks: Vec<Option<JoinHandle<Sent>>> =
        publishers.into_iter().map(|p| Some(p.task)).collect();
    let mut sent: Vec<Sent> = (0..rooms.len()).map(|_| Sent::default()).collect();
    for &i in &moved {
        let task = tasks[i].take().unwrap();
        sent[i] = tokio::time::timeout(PATIENCE, task)
            .await
            .expect("the publisher reaches the promoted master")
            .unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    for (i, task) in tasks.into_iter().enumerate() {
        if let Some(task) = task {
            // A publish ends within command_timeout, so a stopped
            // publisher finishes well within PATIENCE.
            sent[i] = tokio::time::timeout(PATIENCE, task)
                .await
                .expect("a stopped publisher finishes")
                .unwrap();
        }
    }

    // Drain until every room's last accepted event has arrived.
    let last: HashMap<RoomKey, EventId> = rooms
        .iter()
        .zip(&sent)
        .map(|(room, s)| (room.clone(), s.accepted.last().expect("some accepted").1))
        .collect();
    let arrived = |got: &HashMap<RoomKey, Vec<(EventId, u64)>>| {
        last.iter()
            .all(|(room, id)| got.get(room).is_some_and(|g| g.iter().any(|e| e.0 == *id)))
    };
    while !arrived(&got) {
        let (room, ev) = got_a.next().await;
        got.entry(room).or_default().push((ev.id, n_of(&ev)));
    }

    // Rooms on the surviving masters never lost their subscription: every
    // accepted event arrived. Moved rooms: every event after the move.
    for (i, room) in rooms.iter().enumerate() {
        check_room(room, &sent[i], &got[room], from[i]);
    }
}
