//! The Redis broker against a real standalone redis-server.

mod common;

use std::time::Duration;

use common::{event, eventually, key, n_of, sink};
use roomcast_broker::{Broker, BrokerError, HistoryCap};
use roomcast_broker_redis::{room_channel, room_stream, RedisBroker, RedisConfig, PUBLISH_SCRIPT};
use roomcast_protocol::EventId;
use roomcast_testkit::{query, unique_prefix, RedisServer};

fn config(server: &RedisServer) -> RedisConfig {
    let mut c = RedisConfig::standalone(server.url());
    c.prefix = unique_prefix();
    c.backoff_base = Duration::from_millis(20);
    c.backoff_max = Duration::from_millis(200);
    c
}

async fn numsub(url: &str, channel: &str) -> i64 {
    let reply: (String, i64) = query(url, redis::cmd("PUBSUB").arg("NUMSUB").arg(channel)).await;
    reply.1
}

#[tokio::test]
async fn publishes_reach_only_the_subscribed_node_once() {
    let server = RedisServer::start().await;
    let cfg = config(&server);
    let (sink_a, mut got_a) = sink();
    let (sink_b, mut got_b) = sink();
    let a = RedisBroker::connect(cfg.clone(), sink_a).await.unwrap();
    let b = RedisBroker::connect(cfg.clone(), sink_b).await.unwrap();
    assert!(a.healthy() && b.healthy());
    assert_eq!(a.kind(), "redis");

    let room = key("acme", "team:1");
    let sentinel = key("acme", "team:2");
    a.subscribe(&room).await.unwrap();
    a.subscribe(&room).await.unwrap(); // idempotent
    b.subscribe(&sentinel).await.unwrap();
    assert_eq!(numsub(server.url(), &a.channel_name(&room)).await, 1);

    let published = b.publish(event(&["team:1"], 1)).await.unwrap();
    assert_eq!(published.ids.len(), 1);
    let id = published.ids[0].1;
    let (r, ev) = got_a.next().await;
    assert_eq!((r, ev.id, n_of(&ev)), (room.clone(), id, 1));
    assert_eq!(ev.tenant.as_str(), "acme");

    // B hears its sentinel room and nothing before it: channel messages on
    // one connection arrive in publish order.
    b.publish(event(&["team:2"], 2)).await.unwrap();
    let (r, ev) = got_b.next().await;
    assert_eq!((r, n_of(&ev)), (sentinel, 2));

    // Exactly once: the next delivery on A is the next event, not a copy.
    let second = a.publish(event(&["team:1"], 3)).await.unwrap().ids[0].1;
    let (_, ev) = got_a.next().await;
    assert_eq!((ev.id, n_of(&ev)), (second, 3));
    assert!(second > id);
    got_a.assert_empty();

    a.unsubscribe(&room).await.unwrap();
    a.unsubscribe(&room).await.unwrap(); // harmless
    let url = server.url().to_owned();
    let channel = a.channel_name(&room);
    eventually("NUMSUB 0 after unsubscribe", || {
        let (url, channel) = (url.clone(), channel.clone());
        async move { numsub(&url, &channel).await == 0 }
    })
    .await;
}

#[tokio::test]
async fn history_is_ordered_capped_and_reports_gaps() {
    let server = RedisServer::start().await;
    let mut cfg = config(&server);
    cfg.exact_trim = true;
    let cap = |max_len| HistoryCap {
        max_len,
        max_age: Duration::from_secs(3600),
    };
    cfg.history.per_kind.insert("task".into(), cap(3));
    cfg.history.per_kind.insert("user".into(), cap(0));
    let (s, _got) = sink();
    let broker = RedisBroker::connect(cfg, s).await.unwrap();
    let room = key("acme", "task:1");

    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(broker.publish(event(&["task:1"], n)).await.unwrap().ids[0].1);
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]));

    let h = broker.history_since(&room, ids[1], 100).await.unwrap();
    assert!(h.recovered && !h.more);
    assert_eq!(h.events.iter().map(|e| e.id).collect::<Vec<_>>(), ids[2..]);
    assert_eq!(
        h.events.iter().map(|e| n_of(e)).collect::<Vec<_>>(),
        [2, 3, 4]
    );

    let h = broker.history_since(&room, ids[0], 100).await.unwrap();
    assert!(!h.recovered, "ids[1] was trimmed away");

    let h = broker.history_since(&room, ids[2], 1).await.unwrap();
    assert_eq!((h.events.len(), h.more, h.recovered), (1, true, true));
    assert_eq!(h.events[0].id, ids[3]);

    let h = broker
        .history_since(&room, EventId::ZERO, 100)
        .await
        .unwrap();
    assert_eq!(h.events.len(), 3);
    assert!(!h.recovered, "reading from zero after a trim is a gap");

    let none = broker
        .history_since(&key("acme", "task:nope"), EventId::ZERO, 10)
        .await
        .unwrap();
    assert!(none.recovered && none.events.is_empty() && !none.more);

    // max_len 0: still published with an id, no history kept.
    let user = key("acme", "user:u1");
    let a = broker.publish(event(&["user:u1"], 1)).await.unwrap().ids[0].1;
    let b = broker.publish(event(&["user:u1"], 2)).await.unwrap().ids[0].1;
    assert!(b > a);
    let h = broker.history_since(&user, b, 10).await.unwrap();
    assert!(h.recovered && h.events.is_empty());
    let h = broker.history_since(&user, a, 10).await.unwrap();
    assert!(!h.recovered && h.events.is_empty());
}

#[tokio::test]
async fn supplied_ids_must_increase() {
    let server = RedisServer::start().await;
    let (s, mut got) = sink();
    let broker = RedisBroker::connect(config(&server), s).await.unwrap();
    let room = key("acme", "team:9");
    broker.subscribe(&room).await.unwrap();
    let mut e = event(&["team:9"], 1);
    e.id = EventId::new(10, 5);
    let ids = broker.publish(e.clone()).await.unwrap().ids;
    assert_eq!(ids[0].1, EventId::new(10, 5));
    assert_eq!(got.next().await.1.id, EventId::new(10, 5));
    assert!(matches!(
        broker.publish(e).await,
        Err(BrokerError::Conflict(_))
    ));
}

#[tokio::test]
async fn a_multi_room_event_gets_one_id_per_room() {
    let server = RedisServer::start().await;
    let (s, mut got) = sink();
    let broker = RedisBroker::connect(config(&server), s).await.unwrap();
    let (team, task) = (key("acme", "team:1"), key("acme", "task:7"));
    // Give the rooms different histories so their ids differ.
    let mut early = event(&["task:7"], 0);
    early.id = EventId::new(1, 0);
    broker.publish(early).await.unwrap();
    broker.subscribe(&team).await.unwrap();
    broker.subscribe(&task).await.unwrap();

    let published = broker
        .publish(event(&["team:1", "task:7"], 9))
        .await
        .unwrap();
    let ids: Vec<(String, EventId)> = published
        .ids
        .iter()
        .map(|(r, id)| (r.to_string(), *id))
        .collect();
    assert_eq!(ids.len(), 2);
    assert_eq!((ids[0].0.as_str(), ids[1].0.as_str()), ("team:1", "task:7"));

    for (room, id) in [(&team, ids[0].1), (&task, ids[1].1)] {
        let h = broker.history_since(room, EventId::ZERO, 10).await.unwrap();
        let last = h.events.last().unwrap();
        assert_eq!((last.id, n_of(last)), (id, 9));
    }
    let mut seen = [got.next().await, got.next().await];
    seen.sort_by(|a, b| a.0.cmp(&b.0));
    let mut expect = vec![(team, ids[0].1), (task, ids[1].1)];
    expect.sort();
    assert_eq!(
        seen.iter()
            .map(|(r, e)| (r.clone(), e.id))
            .collect::<Vec<_>>(),
        expect
    );
}

#[tokio::test]
async fn survives_a_redis_restart() {
    let mut server = RedisServer::start().await;
    if server.is_external() {
        eprintln!("REDIS_URL is set: skipping the restart test");
        return;
    }
    let cfg = config(&server);
    let (sink_a, mut got_a) = sink();
    let (sink_b, _got_b) = sink();
    let a = RedisBroker::connect(cfg.clone(), sink_a).await.unwrap();
    let b = RedisBroker::connect(cfg.clone(), sink_b).await.unwrap();
    let room = key("acme", "team:1");
    a.subscribe(&room).await.unwrap();
    b.publish(event(&["team:1"], 1)).await.unwrap();
    assert_eq!(n_of(&got_a.next().await.1), 1);

    server.kill();
    eventually("unhealthy after the kill", || {
        let h = a.healthy();
        async move { !h }
    })
    .await;
    // Subscribing while Redis is down is recorded and answered at once.
    let later = key("acme", "team:2");
    a.subscribe(&later).await.unwrap();

    let seen = *got_a.resyncs.borrow();
    server.start_again().await;
    got_a.resynced_after(seen).await;
    assert!(a.healthy());

    // The publisher's first attempt may meet a connection that died with
    // the old server: a publisher retries on Unavailable.
    for (n, room_name) in [(2, "team:1"), (3, "team:2")] {
        let deadline = tokio::time::Instant::now() + common::PATIENCE;
        loop {
            match b.publish(event(&[room_name], n)).await {
                Ok(_) => break,
                Err(BrokerError::Unavailable { .. }) if tokio::time::Instant::now() < deadline => {}
                Err(e) => panic!("publish after restart: {e}"),
            }
        }
        let (r, ev) = got_a.next().await;
        assert_eq!((r.room.as_str(), n_of(&ev)), (room_name, n));
    }
}

/// Runs the publish script for `room` as any publisher would, with its own
/// caps; returns the id Redis gave the entry.
async fn run_script(
    url: &str,
    prefix: &str,
    room: &roomcast_protocol::RoomKey,
    id: &str,
    (max_len, slack, max_age_ms): (u64, u64, u64),
) -> String {
    let stream = room_stream(prefix, room);
    let mark = format!("{}:t", stream.strip_suffix(":h").expect("stream name"));
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(PUBLISH_SCRIPT)
        .arg(3)
        .arg(&stream)
        .arg(room_channel(prefix, room))
        .arg(mark)
        .arg(id)
        .arg(r#"{"v":1,"tenant":"acme","rooms":["team:1"],"type":"t","data":{}}"#)
        .arg(max_len)
        .arg(slack)
        .arg(max_age_ms)
        .arg("PUBLISH");
    query(url, &cmd).await
}

async fn stream_ids(url: &str, prefix: &str, room: &roomcast_protocol::RoomKey) -> Vec<String> {
    type Entry = (String, Vec<(String, Vec<u8>)>);
    let entries: Vec<Entry> = query(
        url,
        redis::cmd("XRANGE")
            .arg(room_stream(prefix, room))
            .arg("-")
            .arg("+"),
    )
    .await;
    entries.into_iter().map(|(id, _)| id).collect()
}

#[tokio::test]
async fn age_trimming_removes_only_old_entries_and_marks_the_newest_of_them() {
    let server = RedisServer::start().await;
    let cfg = config(&server);
    let (url, prefix) = (server.url(), cfg.prefix.clone());
    let (s, _got) = sink();
    let broker = RedisBroker::connect(cfg, s).await.unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let recent = now_ms - 1_000;
    let no_age = (100, 0, 0);
    let one_minute = (100, 0, 60_000);

    // Entries from 1970 next to entries of a second ago, added without an
    // age cap; then publishes with a one-minute cap.
    let room = key("acme", "team:1");
    for id in ["1000-1", "2000-1", "3000-1"] {
        run_script(url, &prefix, &room, id, no_age).await;
    }
    for seq in [1, 2] {
        run_script(url, &prefix, &room, &format!("{recent}-{seq}"), no_age).await;
    }
    let recovered = async |room: &roomcast_protocol::RoomKey, since: &str| {
        let since = since.parse::<EventId>().unwrap();
        broker
            .history_since(room, since, 10)
            .await
            .unwrap()
            .recovered
    };
    assert!(recovered(&room, "0-0").await, "nothing trimmed yet");

    let fresh = run_script(url, &prefix, &room, "*", one_minute).await;
    let kept = vec![format!("{recent}-1"), format!("{recent}-2"), fresh.clone()];
    assert_eq!(stream_ids(url, &prefix, &room).await, kept);
    let h = broker
        .history_since(&room, "3000-1".parse().unwrap(), 10)
        .await
        .unwrap();
    assert!(h.recovered, "the newest trimmed id is the mark");
    assert_eq!(h.events.len(), 3);
    assert!(!recovered(&room, "2000-1").await);

    // Nothing old left: the next publish removes nothing, the mark stays.
    let next = run_script(url, &prefix, &room, "*", one_minute).await;
    assert_eq!(stream_ids(url, &prefix, &room).await.len(), 4);
    assert!(recovered(&room, "3000-1").await);
    assert!(next > fresh);

    // Length and age trims in one publish: the length trim takes the four
    // oldest, the age trim the other two old ones, whose newest is the mark.
    let room = key("acme", "team:2");
    for ms in 1..=6 {
        run_script(url, &prefix, &room, &format!("{ms}000-0"), no_age).await;
    }
    run_script(url, &prefix, &room, &format!("{recent}-0"), no_age).await;
    let last = run_script(url, &prefix, &room, "*", (5, 0, 60_000)).await;
    assert_eq!(
        stream_ids(url, &prefix, &room).await,
        vec![format!("{recent}-0"), last]
    );
    assert!(recovered(&room, "6000-0").await);
    assert!(!recovered(&room, "5000-0").await);
}

/// A Redis that stops answering (here `CLIENT PAUSE`) makes a publish fail
/// after `command_timeout` instead of hanging the publisher.
#[tokio::test]
async fn a_publish_to_a_redis_that_does_not_answer_fails_within_the_command_timeout() {
    let server = RedisServer::start().await;
    let mut cfg = config(&server);
    cfg.command_timeout = Duration::from_millis(300);
    let (sink_a, _got_a) = sink();
    let a = RedisBroker::connect(cfg, sink_a).await.unwrap();
    a.publish(event(&["team:1"], 1)).await.unwrap();

    let _: () = query(
        server.url(),
        redis::cmd("CLIENT").arg("PAUSE").arg(5000).arg("WRITE"),
    )
    .await;
    let outcome = tokio::time::timeout(common::PATIENCE, a.publish(event(&["team:1"], 2))).await;
    let _: () = query(server.url(), redis::cmd("CLIENT").arg("UNPAUSE")).await;
    match outcome {
        Ok(Err(BrokerError::Unavailable { .. })) => {}
        Ok(other) => panic!("expected Unavailable, got {other:?}"),
        Err(_) => panic!("the publish hung past {:?}", common::PATIENCE),
    }
}

/// With several fan-out lanes the rooms' events are handed over on the
/// lanes' tasks, and each room's still arrive complete and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fan_out_lanes_keep_each_room_complete_and_in_order() {
    let server = RedisServer::start().await;
    let mut cfg = config(&server);
    cfg.fanout_lanes = 4;
    let (s, mut got) = sink();
    let node = RedisBroker::connect(cfg.clone(), s).await.unwrap();
    let rooms: Vec<String> = (0..16).map(|n| format!("team:{n}")).collect();
    for room in &rooms {
        node.subscribe(&key("acme", room)).await.unwrap();
    }
    const PER_ROOM: u64 = 25;
    // One publisher per room, all at once, so that a read of the
    // subscription holds messages of several rooms.
    let publisher = RedisBroker::connect(cfg, sink().0).await.unwrap();
    let publishers: Vec<_> = rooms
        .iter()
        .map(|room| {
            let (publisher, room) = (publisher.clone(), room.clone());
            tokio::spawn(async move {
                for n in 1..=PER_ROOM {
                    publisher.publish(event(&[&room], n)).await.unwrap();
                }
            })
        })
        .collect();
    for p in publishers {
        p.await.unwrap();
    }
    let mut last: std::collections::HashMap<String, (u64, EventId)> = Default::default();
    for _ in 0..rooms.len() as u64 * PER_ROOM {
        let (room, ev) = got.next().await;
        let (n, id) = last.entry(room.room.to_string()).or_default();
        assert_eq!(n_of(&ev), *n + 1, "{room}: in order, none missing");
        assert!(ev.id > *id, "{room}: ids increase");
        (*n, *id) = (n_of(&ev), ev.id);
    }
    assert!(last.values().all(|(n, _)| *n == PER_ROOM));
    got.assert_empty();
}

/// A server that accepts connections and never answers (a hung Redis, a
/// wrong port behind a proxy) fails the broker's start within a bound
/// instead of hanging the node's start, in either mode.
#[tokio::test]
async fn connecting_to_a_server_that_never_answers_fails_in_time() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            open.push(socket); // read nothing, answer nothing
        }
    });
    let url = format!("redis://{addr}/");
    for mut cfg in [RedisConfig::standalone(&url), RedisConfig::cluster([&url])] {
        cfg.command_timeout = Duration::from_millis(300);
        let result = tokio::time::timeout(
            Duration::from_secs(10),
            RedisBroker::connect(cfg.clone(), sink().0),
        )
        .await
        .unwrap_or_else(|_| panic!("{:?}: connect still waiting after 10 s", cfg.mode));
        match result {
            Err(BrokerError::Unavailable { .. }) => {}
            Ok(_) => panic!("{:?}: a silent server was taken for Redis", cfg.mode),
            Err(e) => panic!("{:?}: {e}", cfg.mode),
        }
    }
    held.abort();
}

/// A channel Redis refuses (an ACL without it) keeps only its own room
/// out: after the refusal the node subscribes one channel per command, so
/// the other rooms of the refused batch are back, and the node stays
/// unhealthy (a wanted room is missing).
#[tokio::test]
async fn a_refused_channel_does_not_keep_the_other_rooms_of_its_batch_out() {
    let server = RedisServer::start().await;
    let mut cfg = config(&server);
    let good = key("acme", "team:good");
    let refused = key("acme", "team:refused");
    let good_channel = room_channel(&cfg.prefix, &good);
    let ok = roomcast_testkit::redis_cli(
        server.url(),
        &[
            "ACL",
            "SETUSER",
            "node",
            "on",
            ">pw",
            "~*",
            "+@all",
            "resetchannels",
            &format!("&{good_channel}"),
        ],
    );
    assert_eq!(ok, "OK");
    cfg.mode = roomcast_broker_redis::RedisMode::Standalone {
        url: format!("redis://node:pw@127.0.0.1:{}/", server.port()),
    };
    cfg.subscribe_timeout = Duration::from_millis(200);
    let (s, mut got) = sink();
    let node = RedisBroker::connect(cfg.clone(), s).await.unwrap();
    node.subscribe(&good).await.unwrap();
    node.subscribe(&refused).await.unwrap();
    // On a new connection both rooms go out in one SUBSCRIBE, which Redis
    // refuses whole.
    let ok = roomcast_testkit::redis_cli(server.url(), &["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert!(ok.parse::<u32>().is_ok_and(|n| n >= 1), "killed: {ok}");
    let url = server.url().to_owned();
    eventually("the good room subscribed again", || {
        let (url, channel) = (url.clone(), good_channel.clone());
        async move { numsub(&url, &channel).await == 1 }
    })
    .await;
    let publisher = RedisBroker::connect(config_like(&cfg, &server), sink().0)
        .await
        .unwrap();
    let id = publisher
        .publish(event(&["team:good"], 7))
        .await
        .unwrap()
        .ids[0]
        .1;
    let (room, ev) = got.next().await;
    assert_eq!((room, ev.id, n_of(&ev)), (good, id, 7));
    assert!(!node.healthy(), "a wanted room is still refused");
}

/// `cfg` with the default user (no ACL limits) on `server`.
fn config_like(cfg: &RedisConfig, server: &RedisServer) -> RedisConfig {
    let mut c = cfg.clone();
    c.mode = roomcast_broker_redis::RedisMode::Standalone {
        url: server.url().to_owned(),
    };
    c
}
