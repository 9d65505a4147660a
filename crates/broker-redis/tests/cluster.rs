//! The Redis broker against a real 3-master Redis Cluster: sharded pub/sub
//! on the slot owner, and following a room whose slot migrates.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{event, eventually, key, n_of, sink};
use roomcast_broker::Broker;
use roomcast_broker_redis::{RedisBroker, RedisConfig};
use roomcast_protocol::{EventId, RoomKey};
use roomcast_testkit::{query, unique_prefix, RedisCluster};

async fn shardnumsub(url: &str, channel: &str) -> i64 {
    let reply: (String, i64) =
        query(url, redis::cmd("PUBSUB").arg("SHARDNUMSUB").arg(channel)).await;
    reply.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_pubsub_follows_a_migrating_slot() {
    let cluster = RedisCluster::start(3).await;
    let mut cfg = RedisConfig::cluster(cluster.urls());
    cfg.prefix = unique_prefix();
    cfg.backoff_base = Duration::from_millis(20);
    cfg.backoff_max = Duration::from_millis(200);
    let (sink_a, mut got_a) = sink();
    let (sink_b, _got_b) = sink();
    let a = RedisBroker::connect(cfg.clone(), sink_a).await.unwrap();
    let b = RedisBroker::connect(cfg.clone(), sink_b).await.unwrap();
    assert!(a.healthy(), "the subscriber is up on every master");
    assert_eq!(a.kind(), "redis-cluster");

    // Rooms spread over the masters.
    let names: Vec<String> = (1..=6).map(|i| format!("team:{i}")).collect();
    let rooms: Vec<RoomKey> = names.iter().map(|n| key("acme", n)).collect();
    let owners: Vec<usize> = rooms
        .iter()
        .map(|r| cluster.owner_of(RedisCluster::slot_of(&a.channel_name(r))))
        .collect();
    assert!(
        owners.iter().collect::<HashSet<_>>().len() >= 2,
        "rooms should span several masters: {owners:?}"
    );
    for room in &rooms {
        a.subscribe(room).await.unwrap();
    }
    let urls = cluster.urls();
    for (room, owner) in rooms.iter().zip(&owners) {
        assert_eq!(shardnumsub(&urls[*owner], &a.channel_name(room)).await, 1);
    }

    // Two rounds through the other node: each event arrives exactly once.
    for round in 0..2u64 {
        let mut expect = HashMap::new();
        for (i, name) in names.iter().enumerate() {
            let n = round * 100 + i as u64;
            let id = b.publish(event(&[name], n)).await.unwrap().ids[0].1;
            expect.insert(key("acme", name), (id, n));
        }
        for _ in 0..names.len() {
            let (room, ev) = got_a.next().await;
            let (id, n) = expect.remove(&room).expect("one event per room per round");
            assert_eq!((ev.id, n_of(&ev)), (id, n));
        }
    }
    got_a.assert_empty();

    // A busy room: a publisher keeps writing while its slot migrates.
    let busy = rooms[0].clone();
    let channel = a.channel_name(&busy);
    let slot = RedisCluster::slot_of(&channel);
    let from = owners[0];
    let to = (from + 1) % 3;
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (b, stop, name) = (b.clone(), stop.clone(), names[0].clone());
        tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut n = 1000;
            while !stop.load(Ordering::Relaxed) {
                // A publish may fail while the slot moves; a publisher retries.
                if let Ok(p) = b.publish(event(&[&name], n)).await {
                    ids.push(p.ids[0].1);
                    n += 1;
                }
                // Pacing, not synchronisation: a steady trickle of events.
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            ids
        })
    };
    // Wait until the stream is flowing, then move the slot under it.
    let (room, _) = got_a.next().await;
    assert_eq!(room, busy);
    let resyncs = *got_a.resyncs.borrow();
    cluster.migrate_slot(slot, to).await;
    assert_eq!(cluster.owner_of(slot), to);
    got_a.resynced_after(resyncs).await;
    // Under load a second topology refresh may still be settling: healthy
    // must come back, not necessarily at the very instant of the resync.
    eventually("the broker to be healthy after the move", || {
        let healthy = a.healthy();
        async move { healthy }
    })
    .await;
    let new_owner = urls[to].clone();
    eventually("the subscription to move to the new owner", || {
        let (url, ch) = (new_owner.clone(), channel.clone());
        async move { shardnumsub(&url, &ch).await == 1 }
    })
    .await;
    assert_eq!(shardnumsub(&urls[from], &channel).await, 0);

    // Events published after the migration arrive.
    let after = b.publish(event(&[&names[0]], 5000)).await.unwrap().ids[0].1;
    loop {
        let (room, ev) = got_a.next().await;
        if room == busy && ev.id == after {
            assert_eq!(n_of(&ev), 5000);
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let ids = publisher.await.unwrap();
    assert!(!ids.is_empty());

    // History moved with the slot: every accepted publish is there, in order.
    let h = a
        .history_since(&busy, EventId::ZERO, 100_000)
        .await
        .unwrap();
    assert!(h.recovered && !h.more);
    let kept: Vec<EventId> = h.events.iter().map(|e| e.id).collect();
    assert!(kept.windows(2).all(|w| w[0] < w[1]));
    let kept: HashSet<EventId> = kept.into_iter().collect();
    assert!(ids.iter().all(|id| kept.contains(id)) && kept.contains(&after));

    // Rooms on other slots were not disturbed.
    let other = &names[1];
    let id = b.publish(event(&[other], 7)).await.unwrap().ids[0].1;
    loop {
        let (room, ev) = got_a.next().await;
        if room.room.as_str() == other {
            assert_eq!(ev.id, id);
            break;
        }
    }
}
