//! Several roomcast nodes on one real Redis (standalone or Cluster): every
//! event reaches every subscribed socket on every node exactly once, nodes
//! hold a room's Redis subscription only while they have members, and the
//! cluster survives a slot migration, a Redis restart and a SIGKILLed node.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use roomcast_broker_redis::room_channel;
use roomcast_protocol::RoomKey;
use roomcast_testkit::{query, unique_prefix, RedisCluster, RedisServer};
use serde_json::{json, Value};
use support::*;

fn room_key(room: &str) -> RoomKey {
    RoomKey::new(TENANT.parse().unwrap(), room.parse().unwrap())
}

async fn numsub(url: &str, channel: &str) -> i64 {
    let reply: (String, i64) = query(url, redis::cmd("PUBSUB").arg("NUMSUB").arg(channel)).await;
    reply.1
}

async fn shardnumsub(url: &str, channel: &str) -> i64 {
    let reply: (String, i64) =
        query(url, redis::cmd("PUBSUB").arg("SHARDNUMSUB").arg(channel)).await;
    reply.1
}

/// Polls `PUBSUB NUMSUB` until it equals `n`.
async fn numsub_becomes(url: &str, channel: &str, n: i64) {
    eventually(
        &format!("PUBSUB NUMSUB {channel} == {n}"),
        PATIENCE,
        || async move { numsub(url, channel).await == n },
    )
    .await;
}

/// `(room, id, n)` of an event published with `{"n": n}`.
fn summary(ev: &Value) -> (String, String, u64) {
    (
        ev["room"].as_str().expect("room").to_owned(),
        ev["id"].as_str().expect("id").to_owned(),
        ev["data"]["n"].as_u64().expect("data.n"),
    )
}

/// Publishes `{"n": n}` into `room` and returns `(room, id, n)`.
async fn publish_n(node: &TestNode, room: &str, n: u64) -> (String, String, u64) {
    let (status, body) = node
        .publish(&event(&[room], "test.n", json!({ "n": n })))
        .await;
    assert_eq!(status, 200, "{body}");
    let id = body["ids"][room]
        .as_str()
        .expect("an id per room")
        .to_owned();
    (room.to_owned(), id, n)
}

/// Reads events until a `fence_type` event arrived in each of `rooms` and
/// returns the events before each room's fence, per room. Rooms on
/// different Redis shards are not ordered with each other, so each room has
/// its own fence; an event in a room after that room's fence fails.
async fn events_until_fences(
    client: &mut Client,
    rooms: &[String],
    fence_type: &str,
    within: Duration,
) -> HashMap<String, Vec<Value>> {
    let mut got: HashMap<String, Vec<Value>> = HashMap::new();
    let mut fenced = HashSet::new();
    while fenced.len() < rooms.len() {
        let frame = match client.next_message_or_end(within).await {
            Some(tokio_tungstenite::tungstenite::Message::Text(t)) => {
                serde_json::from_str::<Value>(t.as_str()).expect("valid JSON")
            }
            other => panic!("expected an event, got {other:?}"),
        };
        assert_eq!(frame["op"], "event", "{frame}");
        let room = frame["room"].as_str().unwrap().to_owned();
        assert!(rooms.contains(&room), "an event of a foreign room: {frame}");
        assert!(
            !fenced.contains(&room),
            "an event after its room's fence: {frame}"
        );
        if frame["type"] == fence_type {
            fenced.insert(room);
        } else {
            got.entry(room).or_default().push(frame);
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_deliver_each_event_exactly_once() {
    let redis = RedisServer::start().await;
    let prefix = unique_prefix();
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(TestNode::start(config(Backend::Standalone(redis.url()), &prefix)).await);
    }
    let mut team1 = Vec::new();
    let mut team2 = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        for j in 0..3 {
            let mut c = node.connect(&token(&format!("a{i}{j}"), &["1"])).await;
            c.subscribe_all(&["team:1"]).await;
            team1.push(c);
        }
        for j in 0..2 {
            let mut c = node.connect(&token(&format!("b{i}{j}"), &["2"])).await;
            c.subscribe_all(&["team:2"]).await;
            team2.push(c);
        }
    }

    // Through node B: every fourth event goes to team:2.
    let publisher = &nodes[1];
    let (mut expect1, mut expect2) = (Vec::new(), Vec::new());
    for n in 0..24 {
        if n % 4 == 3 {
            expect2.push(publish_n(publisher, "team:2", n).await);
        } else {
            expect1.push(publish_n(publisher, "team:1", n).await);
        }
    }
    let (status, body) = publisher
        .publish(&event(&["team:1", "team:2"], "test.fence", json!({})))
        .await;
    assert_eq!(status, 200, "{body}");

    for (clients, expect) in [(&mut team1, &expect1), (&mut team2, &expect2)] {
        for c in clients.iter_mut() {
            let got: Vec<_> = c
                .events_until("test.fence")
                .await
                .iter()
                .map(summary)
                .collect();
            assert_eq!(
                &got, expect,
                "each event once, in order, on {}",
                c.welcome["node"]
            );
        }
    }
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_subscribes_a_room_only_while_it_has_members() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let prefix = unique_prefix();
    let a = TestNode::start(config(Backend::Standalone(url), &prefix)).await;
    let b = TestNode::start(config(Backend::Standalone(url), &prefix)).await;
    let channel = room_channel(&prefix, &room_key("team:7"));
    let tok = token("u", &["7"]);

    let mut a1 = a.connect(&tok).await;
    assert_eq!(
        numsub(url, &channel).await,
        0,
        "a connection alone subscribes nothing"
    );

    a1.subscribe_all(&["team:7"]).await;
    numsub_becomes(url, &channel, 1).await;
    let mut a2 = a.connect(&tok).await;
    a2.subscribe_all(&["team:7"]).await;
    assert_eq!(numsub(url, &channel).await, 1, "one subscription per node");
    let mut b1 = b.connect(&tok).await;
    b1.subscribe_all(&["team:7"]).await;
    numsub_becomes(url, &channel, 2).await;

    // The first of two local members leaves: node A stays subscribed, as
    // delivery to the remaining member through Redis shows.
    a1.unsubscribe(&["team:7"]).await;
    let sent = publish_n(&b, "team:7", 1).await;
    assert_eq!(summary(&a2.next_event().await), sent);
    assert_eq!(summary(&b1.next_event().await), sent);
    assert_eq!(numsub(url, &channel).await, 2);

    // The last local member disconnects: node A lets go.
    drop(a2);
    numsub_becomes(url, &channel, 1).await;
    b1.unsubscribe(&["team:7"]).await;
    numsub_becomes(url, &channel, 0).await;

    // Rejoining subscribes again.
    a1.subscribe_all(&["team:7"]).await;
    numsub_becomes(url, &channel, 1).await;
    let sent = publish_n(&b, "team:7", 2).await;
    assert_eq!(summary(&a1.next_event().await), sent);
    drop(a1);
    numsub_becomes(url, &channel, 0).await;
    drop(b1);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_delivery_and_slot_migration() {
    let cluster = RedisCluster::start(3).await;
    let urls = cluster.urls();
    let prefix = unique_prefix();
    let a = TestNode::start(config(Backend::Cluster(&urls), &prefix)).await;
    let b = TestNode::start(config(Backend::Cluster(&urls), &prefix)).await;

    let names: Vec<String> = (1..=6).map(|i| format!("team:{i}")).collect();
    let channels: Vec<String> = names
        .iter()
        .map(|n| room_channel(&prefix, &room_key(n)))
        .collect();
    let owners: Vec<usize> = channels
        .iter()
        .map(|c| cluster.owner_of(RedisCluster::slot_of(c)))
        .collect();
    assert!(
        owners.iter().collect::<HashSet<_>>().len() >= 2,
        "rooms should span several masters: {owners:?}"
    );

    // On each node: one client in all six rooms, one in the first three,
    // one in the busy room only.
    let teams: Vec<String> = (1..=6).map(|i| i.to_string()).collect();
    let teams: Vec<&str> = teams.iter().map(String::as_str).collect();
    let mut clients: Vec<(Client, Vec<String>)> = Vec::new();
    for node in [&a, &b] {
        for (user, k) in [("all", 6), ("some", 3), ("busy", 1)] {
            let rooms: Vec<String> = names[..k].to_vec();
            let refs: Vec<&str> = rooms.iter().map(String::as_str).collect();
            let mut c = node.connect(&token(user, &teams)).await;
            c.subscribe_all(&refs).await;
            clients.push((c, rooms));
        }
    }

    // Sharded pub/sub: each room's channel is held by both nodes on its owner.
    for (ch, owner) in channels.iter().zip(&owners) {
        assert_eq!(shardnumsub(&urls[*owner], ch).await, 2, "{ch}");
    }

    // Two rounds through node A, one event per room per round.
    let mut expect: HashMap<String, Vec<(String, String, u64)>> = HashMap::new();
    for round in 0..2u64 {
        for (i, name) in names.iter().enumerate() {
            let sent = publish_n(&a, name, round * 100 + i as u64).await;
            expect.entry(name.clone()).or_default().push(sent);
        }
    }
    for name in &names {
        publish_retrying(a.addr, &event(&[name], "test.fence", json!({})), PATIENCE).await;
    }
    for (c, rooms) in &mut clients {
        let got = events_until_fences(c, rooms, "test.fence", PATIENCE).await;
        assert_eq!(got.len(), rooms.len());
        for (room, events) in got {
            let events: Vec<_> = events.iter().map(summary).collect();
            assert_eq!(
                events, expect[&room],
                "each event once, in order, in {room}"
            );
        }
    }

    // A busy room: its slot moves to another master under a steady publisher.
    let busy = names[0].clone();
    let slot = RedisCluster::slot_of(&channels[0]);
    let (from, to) = (owners[0], (owners[0] + 1) % 3);
    // 0: before or during the migration, 1: the slot has moved, 2: both
    // nodes hold the channel on the new owner again.
    let phase = Arc::new(AtomicU8::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = clients
        .into_iter()
        .map(|(mut c, rooms)| {
            tokio::spawn(async move {
                let got = events_until_fences(&mut c, &rooms, "test.final", RECOVERY).await;
                (c, got)
            })
        })
        .collect();
    let (flowing_tx, flowing_rx) = tokio::sync::oneshot::channel();
    let (enough_tx, enough_rx) = tokio::sync::oneshot::channel();
    let publisher = {
        let (addr, phase, stop, busy) = (a.addr, phase.clone(), stop.clone(), busy.clone());
        tokio::spawn(async move {
            let (mut flowing_tx, mut enough_tx) = (Some(flowing_tx), Some(enough_tx));
            let mut accepted: Vec<(String, u64, u8)> = Vec::new();
            let mut refused = 0;
            let mut n = 1000;
            while !stop.load(Ordering::Acquire) {
                let p = phase.load(Ordering::Acquire);
                n += 1;
                let (status, body) =
                    publish(addr, &event(&[&busy], "test.n", json!({ "n": n }))).await;
                match status {
                    200 => {
                        let id = body["ids"][&busy].as_str().unwrap().to_owned();
                        accepted.push((id, n, p));
                    }
                    // A publish in the middle of a migration may fail; a
                    // publisher retries with the next event.
                    503 => refused += 1,
                    other => panic!("publish: {other} {body}"),
                }
                if accepted.len() >= 5 {
                    if let Some(tx) = flowing_tx.take() {
                        let _ = tx.send(());
                    }
                }
                if accepted.iter().filter(|e| e.2 == 2).count() >= 20 {
                    if let Some(tx) = enough_tx.take() {
                        let _ = tx.send(());
                    }
                }
                // Pacing, not synchronisation: a steady trickle of events.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (accepted, refused)
        })
    };
    flowing_rx.await.expect("the publisher is flowing");
    let migration = Instant::now();
    cluster.migrate_slot(slot, to).await;
    assert_eq!(cluster.owner_of(slot), to);
    phase.store(1, Ordering::Release);
    let migrated_in = migration.elapsed();
    let new_owner = urls[to].clone();
    let ch = channels[0].clone();
    eventually(
        "both nodes resubscribe the busy room on its new owner",
        RECOVERY,
        || {
            let (url, ch) = (new_owner.clone(), ch.clone());
            async move { shardnumsub(&url, &ch).await == 2 }
        },
    )
    .await;
    phase.store(2, Ordering::Release);
    let resubscribed_in = migration.elapsed();
    assert_eq!(shardnumsub(&urls[from], &channels[0]).await, 0);
    tokio::time::timeout(RECOVERY, enough_rx)
        .await
        .expect("20 publishes accepted after the migration")
        .unwrap();
    stop.store(true, Ordering::Release);
    let (accepted, refused) = publisher.await.unwrap();
    for name in &names {
        publish_retrying(a.addr, &event(&[name], "test.final", json!({})), PATIENCE).await;
    }

    let by_id: HashMap<&str, (u64, u8)> = accepted
        .iter()
        .map(|(id, n, p)| (id.as_str(), (*n, *p)))
        .collect();
    let mut lost = [0usize; 3];
    for reader in readers {
        let (_client, got) = reader.await.unwrap();
        for (room, events) in &got {
            assert_eq!(room, &busy, "no traffic in the quiet rooms: {events:?}");
        }
        let events: Vec<_> = got
            .get(&busy)
            .map(Vec::as_slice)
            .unwrap_or(&[])
            .iter()
            .map(summary)
            .collect();
        // In order and without duplicates: ids strictly increase.
        let ids: Vec<roomcast_protocol::EventId> = events
            .iter()
            .map(|(_, id, _)| id.parse().expect("an event id"))
            .collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "no duplicates, in order: {events:?}"
        );
        let seen: HashSet<&str> = events.iter().map(|(_, id, _)| id.as_str()).collect();
        for (_, id, n) in &events {
            assert_eq!(
                by_id.get(id.as_str()).map(|e| e.0),
                Some(*n),
                "an accepted event"
            );
        }
        for (id, n, p) in &accepted {
            if !seen.contains(id.as_str()) {
                lost[*p as usize] += 1;
                assert!(
                    *p < 2,
                    "event {n} ({id}), accepted after the migration, was lost"
                );
            }
        }
    }
    eprintln!(
        "migration: slot moved in {migrated_in:?}, resubscribed after {resubscribed_in:?}; \
         {} accepted ({} during, {} between move and resubscribe, {} after), {refused} refused; \
         lost deliveries (over 6 sockets): {} during, {} between move and resubscribe",
        accepted.len(),
        accepted.iter().filter(|e| e.2 == 0).count(),
        accepted.iter().filter(|e| e.2 == 1).count(),
        accepted.iter().filter(|e| e.2 == 2).count(),
        lost[0],
        lost[1],
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_readiness_and_recovery() {
    let mut redis = RedisServer::start().await;
    if redis.is_external() {
        eprintln!("skipped: REDIS_URL names a server that cannot be restarted");
        return;
    }
    let prefix = unique_prefix();
    let url = redis.url().to_owned();
    let a = TestNode::start(config(Backend::Standalone(&url), &prefix)).await;
    let b = TestNode::start(config(Backend::Standalone(&url), &prefix)).await;
    let tok = token("u", &["1"]);
    let mut ca = a.connect(&tok).await;
    let mut cb = b.connect(&tok).await;
    ca.subscribe_all(&["team:1"]).await;
    cb.subscribe_all(&["team:1"]).await;
    assert_eq!((a.readyz().await, b.readyz().await), (200, 200));
    let sent = publish_n(&a, "team:1", 0).await;
    assert_eq!(summary(&ca.next_event().await), sent);
    assert_eq!(summary(&cb.next_event().await), sent);

    redis.kill();
    for node in [&a, &b] {
        eventually(
            "/readyz fails while Redis is down",
            PATIENCE * 2,
            || async { node.readyz().await == 503 },
        )
        .await;
    }
    // The sockets stay up and served.
    ca.ping().await;
    cb.ping().await;
    assert_eq!(
        (a.node.connection_count(), b.node.connection_count()),
        (1, 1)
    );

    redis.start_again().await;
    for node in [&a, &b] {
        eventually("/readyz recovers with Redis", RECOVERY, || async {
            node.readyz().await == 200
        })
        .await;
    }
    let mut expect = Vec::new();
    for n in 1..=5u64 {
        let body = event(&["team:1"], "test.n", json!({ "n": n }));
        let reply = publish_retrying(a.addr, &body, RECOVERY).await;
        let id = reply["ids"]["team:1"].as_str().unwrap().to_owned();
        expect.push(("team:1".to_owned(), id, n));
    }
    publish_retrying(
        b.addr,
        &event(&["team:1"], "test.fence", json!({})),
        PATIENCE,
    )
    .await;
    for c in [&mut ca, &mut cb] {
        let got: Vec<_> = c
            .events_until("test.fence")
            .await
            .iter()
            .map(summary)
            .collect();
        assert_eq!(got, expect, "every post-recovery event once, in order");
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_node_loses_nothing_for_the_others() {
    let redis = RedisServer::start().await;
    let prefix = unique_prefix();
    let mut a = NodeProcess::start(redis.url(), &prefix).await;
    let b = NodeProcess::start(redis.url(), &prefix).await;
    let tok_a = token("ua", &["1"]);
    let mut ca = a.connect(&tok_a).await;
    let mut cb = b.connect(&token("ub", &["1"])).await;
    ca.subscribe_all(&["team:1"]).await;
    cb.subscribe_all(&["team:1"]).await;

    let publish_n = |n: u64| {
        let addr = b.addr;
        async move {
            let (status, body) =
                publish(addr, &event(&["team:1"], "test.n", json!({ "n": n }))).await;
            assert_eq!(status, 200, "{body}");
            (
                "team:1".to_owned(),
                body["ids"]["team:1"].as_str().unwrap().to_owned(),
                n,
            )
        }
    };
    let first = publish_n(1).await;
    assert_eq!(summary(&ca.next_event().await), first);
    assert_eq!(summary(&cb.next_event().await), first);

    a.sigkill().await;
    ca.expect_end().await;

    // The client fails over to node B with the same token.
    let mut ca = b.connect(&tok_a).await;
    assert_eq!(ca.welcome["node"], cb.welcome["node"]);
    ca.subscribe_all(&["team:1"]).await;
    let second = publish_n(2).await;
    assert_eq!(summary(&ca.next_event().await), second);
    // Node B's client saw nothing but the next event.
    assert_eq!(summary(&cb.next_event().await), second);
    cb.ping().await;
    assert_eq!(http_get(b.addr, "/readyz").await.0, 200);
}
