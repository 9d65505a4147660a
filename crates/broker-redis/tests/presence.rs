//! Presence on Redis across two broker instances ("nodes"), standalone and
//! on a 3-master Cluster. Expiry is driven by explicit `now_ms` values,
//! never by sleeping.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::{key, sink};
use roomcast_broker::{Presence, PresenceChange, PresenceEntry};
use roomcast_broker_redis::{
    RedisBroker, RedisConfig, PRESENCE_KEY_GRACE, PRESENCE_REGISTRY_SHARDS,
};
use roomcast_protocol::{RoomKey, UserId};
use roomcast_testkit::{query, unique_prefix, RedisCluster, RedisServer};

const TTL: Duration = Duration::from_millis(60_000);
/// A realistic clock origin (unix ms).
const T0: u64 = 1_717_000_000_000;

use PresenceChange::{Unchanged, UserJoined, UserLeft};

fn entry(session: &str, user: &str, node: &str, at: u64) -> PresenceEntry {
    PresenceEntry {
        session: session.parse().unwrap(),
        user: user.parse().unwrap(),
        node: node.parse().unwrap(),
        connected_at: at,
        last_seen: at,
        user_agent: Some(format!("agent of {session}").into()),
        ip: None,
    }
}

fn user(u: &str) -> UserId {
    u.parse().unwrap()
}

async fn two_nodes(cfg: RedisConfig) -> (Arc<RedisBroker>, Arc<RedisBroker>) {
    let (sink_a, _) = sink();
    let (sink_b, _) = sink();
    let a = RedisBroker::connect(cfg.clone(), sink_a).await.unwrap();
    let b = RedisBroker::connect(cfg, sink_b).await.unwrap();
    (a, b)
}

fn standalone(server: &RedisServer) -> RedisConfig {
    let mut c = RedisConfig::standalone(server.url());
    c.prefix = unique_prefix();
    c
}

/// Both nodes sweep at the same `now`, concurrently; returns everything
/// they reported together.
async fn sweep_both(a: &RedisBroker, b: &RedisBroker, now: u64) -> Vec<(RoomKey, UserId)> {
    let (ra, rb) = tokio::join!(a.expire(now), b.expire(now));
    let mut all = ra.unwrap();
    all.extend(rb.unwrap());
    all.sort();
    all
}

/// The scenario of the issue on one room; shared by standalone and Cluster.
async fn sessions_on_two_nodes(a: &RedisBroker, b: &RedisBroker, room: &RoomKey) {
    let t = T0;
    assert_eq!(
        a.upsert(room, entry("s-a", "u1", "node-a", t), TTL, t)
            .await
            .unwrap(),
        UserJoined
    );
    assert_eq!(
        b.upsert(room, entry("s-b", "u1", "node-b", t + 5), TTL, t + 5)
            .await
            .unwrap(),
        Unchanged,
        "a second session of a present user"
    );
    for node in [a, b] {
        let members = node.members(room, t + 10).await.unwrap();
        let seen: Vec<(&str, &str, &str, u64)> = members
            .iter()
            .map(|e| {
                (
                    e.session.as_str(),
                    e.user.as_str(),
                    e.node.as_str(),
                    e.connected_at,
                )
            })
            .collect();
        assert_eq!(
            seen,
            [("s-a", "u1", "node-a", t), ("s-b", "u1", "node-b", t + 5)]
        );
        assert_eq!(members[0].user_agent.as_deref(), Some("agent of s-a"));
    }
    assert_eq!(
        a.remove(room, &"s-a".parse().unwrap(), t + 20)
            .await
            .unwrap(),
        Unchanged
    );
    assert_eq!(
        a.remove(room, &"s-a".parse().unwrap(), t + 20)
            .await
            .unwrap(),
        Unchanged,
        "removing twice is harmless"
    );
    assert_eq!(
        b.remove(room, &"s-b".parse().unwrap(), t + 30)
            .await
            .unwrap(),
        UserLeft
    );
    assert!(a.members(room, t + 40).await.unwrap().is_empty());
    // Nothing lapsed: a sweep past every due time reports nothing.
    assert!(sweep_both(a, b, t + 10 * TTL.as_millis() as u64)
        .await
        .is_empty());
}

async fn exists(url: &str, key: &str) -> bool {
    query::<i64>(url, redis::cmd("EXISTS").arg(key)).await == 1
}

async fn registry_len(url: &str, prefix: &str) -> i64 {
    let mut n = 0;
    for shard in 0..PRESENCE_REGISTRY_SHARDS {
        n += query::<i64>(
            url,
            redis::cmd("ZCARD").arg(format!("{prefix}{{presence:{shard}}}:rooms")),
        )
        .await;
    }
    n
}

#[tokio::test]
async fn two_nodes_share_presence() {
    let server = RedisServer::start().await;
    let cfg = standalone(&server);
    let (a, b) = two_nodes(cfg.clone()).await;
    let room = key("acme", "team:1");
    sessions_on_two_nodes(&a, &b, &room).await;

    // No leftovers: the room's keys are gone and the sweep deregistered it.
    let p = &cfg.prefix;
    for suffix in ["p", "pz", "pu", "pr"] {
        assert!(
            !exists(server.url(), &format!("{p}{{acme/team:1}}:{suffix}")).await,
            "{suffix} left behind"
        );
    }
    assert_eq!(registry_len(server.url(), p).await, 0);

    // Tenants are isolated: the same room name of another tenant is empty.
    a.upsert(&room, entry("s1", "u1", "node-a", T0), TTL, T0)
        .await
        .unwrap();
    assert!(b
        .members(&key("globex", "team:1"), T0)
        .await
        .unwrap()
        .is_empty());

    // The room's keys carry a safety-net TTL: latest expiry + the grace.
    let pttl: i64 = query(
        server.url(),
        redis::cmd("PTTL").arg(format!("{p}{{acme/team:1}}:pz")),
    )
    .await;
    let most = (TTL + PRESENCE_KEY_GRACE).as_millis() as i64;
    assert!(pttl > most - 5_000 && pttl <= most, "pttl {pttl}");

    // Node A crashes (its broker is gone, no goodbye): node B's sweep
    // reports A's user once the session lapses.
    drop(a);
    assert!(b.expire(T0 + 59_999).await.unwrap().is_empty());
    assert_eq!(
        b.expire(T0 + 60_000).await.unwrap(),
        vec![(room.clone(), user("u1"))]
    );
    assert_eq!(registry_len(server.url(), p).await, 0);
}

#[tokio::test]
async fn lapsed_sessions_are_reported_once_and_refresh_keeps_alive() {
    let server = RedisServer::start().await;
    let (a, b) = two_nodes(standalone(&server)).await;
    let room = key("acme", "task:t1");
    let ttl = Duration::from_millis(100);
    let t = T0;
    // u1 on node A, u2 on node B, u3 with one session on each.
    a.upsert(&room, entry("s1", "u1", "node-a", t), ttl, t)
        .await
        .unwrap();
    b.upsert(&room, entry("s2", "u2", "node-b", t), ttl, t)
        .await
        .unwrap();
    a.upsert(&room, entry("s3a", "u3", "node-a", t), ttl, t)
        .await
        .unwrap();
    b.upsert(&room, entry("s3b", "u3", "node-b", t), ttl, t)
        .await
        .unwrap();

    // Heartbeats: node B refreshes its sessions, node A has "crashed".
    let mut hb = entry("s2", "u2", "node-b", t);
    hb.last_seen = t + 90;
    assert_eq!(b.upsert(&room, hb, ttl, t + 90).await.unwrap(), Unchanged);
    assert_eq!(
        b.upsert(&room, entry("s3b", "u3", "node-b", t), ttl, t + 90)
            .await
            .unwrap(),
        Unchanged
    );

    // Before anything lapses nothing is reported.
    assert!(sweep_both(&a, &b, t + 99).await.is_empty());
    // At exactly the expiry the entry has lapsed (expiry ≤ now).
    // members hides lapsed entries even before a sweep.
    let live: Vec<String> = b
        .members(&room, t + 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.session.to_string())
        .collect();
    assert_eq!(live, ["s2", "s3b"]);
    let s2 = &b.members(&room, t + 100).await.unwrap()[0];
    assert_eq!((s2.connected_at, s2.last_seen), (t, t + 90));

    // Both nodes sweep the same instant: u1 left, reported exactly once; u3
    // is still present through its session on B.
    assert_eq!(
        sweep_both(&a, &b, t + 150).await,
        vec![(room.clone(), user("u1"))]
    );
    assert!(sweep_both(&a, &b, t + 150).await.is_empty());
    assert!(sweep_both(&a, &b, t + 189).await.is_empty());

    // Node B's sessions lapse too.
    assert_eq!(
        sweep_both(&a, &b, t + 190).await,
        vec![(room.clone(), user("u2")), (room.clone(), user("u3"))]
    );
    assert!(a.members(&room, t + 190).await.unwrap().is_empty());
    assert!(sweep_both(&a, &b, t + 10_000).await.is_empty());
}

#[tokio::test]
async fn lapsed_but_unswept_entries_keep_join_and_leave_paired() {
    let server = RedisServer::start().await;
    let (a, b) = two_nodes(standalone(&server)).await;
    let room = key("acme", "team:9");
    let ttl = Duration::from_millis(100);
    let t = T0;
    assert_eq!(
        a.upsert(&room, entry("s1", "u1", "node-a", t), ttl, t)
            .await
            .unwrap(),
        UserJoined
    );
    // s1 lapsed at t+100 but nobody swept yet: a new session of u1 is no
    // new join, and the sweep of s1 is no leave.
    assert_eq!(
        b.upsert(&room, entry("s2", "u1", "node-b", t + 150), ttl, t + 150)
            .await
            .unwrap(),
        Unchanged
    );
    assert!(sweep_both(&a, &b, t + 160).await.is_empty());
    let live = a.members(&room, t + 160).await.unwrap();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].session.as_str(), "s2");

    // A late heartbeat of a lapsed, unswept session revives it.
    assert_eq!(
        a.upsert(&room, entry("s2", "u1", "node-b", t + 150), ttl, t + 260)
            .await
            .unwrap(),
        Unchanged
    );
    assert!(sweep_both(&a, &b, t + 300).await.is_empty());

    // Removing the last session while another of the user's lapsed but was
    // not swept: the sweep reports the leave, once.
    a.upsert(&room, entry("s3", "u1", "node-a", t + 300), ttl, t + 300)
        .await
        .unwrap();
    // s2 expires at t+360, s3 at t+400.
    assert_eq!(
        b.remove(&room, &"s3".parse().unwrap(), t + 380)
            .await
            .unwrap(),
        Unchanged
    );
    assert_eq!(
        sweep_both(&a, &b, t + 380).await,
        vec![(room.clone(), user("u1"))]
    );

    // A room emptied by `remove` and joined again before the sweep stays
    // registered: its next lapse is still found.
    a.upsert(&room, entry("s4", "u4", "node-a", t + 400), ttl, t + 400)
        .await
        .unwrap();
    assert_eq!(
        a.remove(&room, &"s4".parse().unwrap(), t + 410)
            .await
            .unwrap(),
        UserLeft
    );
    assert_eq!(
        b.upsert(&room, entry("s5", "u5", "node-b", t + 420), ttl, t + 420)
            .await
            .unwrap(),
        UserJoined
    );
    assert!(sweep_both(&a, &b, t + 510).await.is_empty());
    assert_eq!(
        sweep_both(&a, &b, t + 520).await,
        vec![(room.clone(), user("u5"))]
    );

    // A shorter TTL than the room's other entries moves the room's due time
    // earlier.
    a.upsert(&room, entry("s6", "u6", "node-a", t + 600), TTL, t + 600)
        .await
        .unwrap();
    b.upsert(
        &room,
        entry("s7", "u7", "node-b", t + 600),
        Duration::from_millis(10),
        t + 600,
    )
    .await
    .unwrap();
    assert_eq!(
        sweep_both(&a, &b, t + 610).await,
        vec![(room.clone(), user("u7"))]
    );
}

/// Many rooms, many users, both nodes sweeping at every step: every lapse
/// is reported exactly once.
async fn concurrent_sweeps(a: &Arc<RedisBroker>, b: &Arc<RedisBroker>, rooms: &[RoomKey]) {
    let t = T0;
    let ttl = Duration::from_millis(1000);
    let mut expected = HashSet::new();
    for (r, room) in rooms.iter().enumerate() {
        for u in 0..5u64 {
            let node = if u % 2 == 0 { a } else { b };
            let at = t + u * 100;
            let e = entry(&format!("s{r}-{u}"), &format!("u{u}"), "n", at);
            assert_eq!(node.upsert(room, e, ttl, at).await.unwrap(), UserJoined);
            expected.insert((room.clone(), user(&format!("u{u}"))));
        }
    }
    let mut reported = Vec::new();
    let mut now = t;
    while now <= t + 2000 {
        let (ra, rb) = tokio::join!(a.expire(now), b.expire(now));
        reported.extend(ra.unwrap());
        reported.extend(rb.unwrap());
        now += 50;
    }
    let unique: HashSet<_> = reported.iter().cloned().collect();
    assert_eq!(unique.len(), reported.len(), "a lapse reported twice");
    assert_eq!(unique, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_sweeps_report_each_lapse_once() {
    let server = RedisServer::start().await;
    let cfg = standalone(&server);
    let (a, b) = two_nodes(cfg.clone()).await;
    let rooms: Vec<RoomKey> = (0..40).map(|i| key("acme", &format!("team:{i}"))).collect();
    concurrent_sweeps(&a, &b, &rooms).await;
    assert_eq!(registry_len(server.url(), &cfg.prefix).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn presence_on_a_cluster() {
    let cluster = RedisCluster::start(3).await;
    let mut cfg = RedisConfig::cluster(cluster.urls());
    cfg.prefix = unique_prefix();
    let (a, b) = two_nodes(cfg.clone()).await;

    let rooms: Vec<RoomKey> = (0..24).map(|i| key("acme", &format!("team:{i}"))).collect();
    let owners: HashSet<usize> = rooms
        .iter()
        .map(|r| {
            let tag = format!("{}{{{}/{}}}:p", cfg.prefix, r.tenant, r.room);
            cluster.owner_of(RedisCluster::slot_of(&tag))
        })
        .collect();
    assert_eq!(owners.len(), 3, "rooms should span every master");
    let registry_owners: HashSet<usize> = (0..PRESENCE_REGISTRY_SHARDS)
        .map(|n| {
            let k = format!("{}{{presence:{n}}}:rooms", cfg.prefix);
            cluster.owner_of(RedisCluster::slot_of(&k))
        })
        .collect();
    assert!(
        registry_owners.len() >= 2,
        "registry shards spread over masters"
    );

    for room in &rooms[..3] {
        sessions_on_two_nodes(&a, &b, room).await;
    }
    concurrent_sweeps(&a, &b, &rooms).await;
}

#[tokio::test]
async fn a_failed_registration_is_retried_by_the_next_heartbeat() {
    let server = RedisServer::start().await;
    let cfg = standalone(&server);
    let (a, b) = two_nodes(cfg.clone()).await;
    let room = key("acme", "team:7");
    let p = &cfg.prefix;
    let ttl = Duration::from_millis(100);
    let t = T0;
    a.upsert(&room, entry("s1", "u1", "node-a", t), ttl, t)
        .await
        .unwrap();
    assert!(exists(server.url(), &format!("{p}{{acme/team:7}}:pr")).await);
    assert_eq!(registry_len(server.url(), p).await, 1);

    // As if node A's registration had failed after its room script: the
    // room has an entry but is neither listed nor marked.
    for shard in 0..PRESENCE_REGISTRY_SHARDS {
        let _: i64 = query(
            server.url(),
            redis::cmd("ZREM")
                .arg(format!("{p}{{presence:{shard}}}:rooms"))
                .arg("acme/team:7"),
        )
        .await;
    }
    let _: i64 = query(
        server.url(),
        redis::cmd("DEL").arg(format!("{p}{{acme/team:7}}:pr")),
    )
    .await;
    assert_eq!(registry_len(server.url(), p).await, 0);

    // The retried upsert (or the next heartbeat) registers the room again.
    assert_eq!(
        a.upsert(&room, entry("s1", "u1", "node-a", t), ttl, t + 10)
            .await
            .unwrap(),
        Unchanged
    );
    assert_eq!(registry_len(server.url(), p).await, 1);
    assert_eq!(
        sweep_both(&a, &b, t + 110).await,
        vec![(room.clone(), user("u1"))]
    );
    assert!(!exists(server.url(), &format!("{p}{{acme/team:7}}:pr")).await);
    assert_eq!(registry_len(server.url(), p).await, 0);
}
