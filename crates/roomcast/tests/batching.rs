//! A burst of events that a node reads from Redis in one go: a member's
//! frames of one room leave in shared writes (the hub defers all but the
//! room's last event of the burst), and still every member gets exactly its
//! events, in order, including a member the burst's last event skips.
//! Its own test binary, so the node's counters are this test's alone.

mod support;

use roomcast_broker_redis::{room_channel, room_stream, PUBLISH_SCRIPT};
use roomcast_protocol::RoomKey;
use roomcast_testkit::{unique_prefix, RedisServer};
use serde_json::{json, Value};
use support::*;

fn room_key(room: &str) -> RoomKey {
    RoomKey::new(TENANT.parse().unwrap(), room.parse().unwrap())
}

/// `(room, n)` of each event.
fn summaries(events: &[Value]) -> Vec<(String, u64)> {
    events
        .iter()
        .map(|ev| {
            (
                ev["room"].as_str().expect("room").to_owned(),
                ev["data"]["n"].as_u64().expect("data.n"),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_into_one_room_shares_writes_and_keeps_every_members_order() {
    let redis = RedisServer::start().await;
    let prefix = unique_prefix();
    let node = TestNode::start(config(Backend::Standalone(redis.url()), &prefix)).await;
    let mut alice = node.connect(&token("alice", &["1"])).await;
    alice.subscribe_all(&["team:1"]).await;
    let mut bob = node.connect(&token("bob", &["1"])).await;
    bob.subscribe_all(&["team:1"]).await;
    let mut carol = node.connect(&token("carol", &["1", "2"])).await;
    carol.subscribe_all(&["team:1", "team:2"]).await;

    // One pipeline, so Redis runs the publishes in one go and the node reads
    // their messages together. team:2's events sit between team:1's, and
    // team:1's last one is not for bob: his deferred frames must still go.
    const BURST: u64 = 24;
    let room_of = |n: u64| if n % 3 == 2 { "team:2" } else { "team:1" };
    let last_of_team1 = (0..BURST).rev().find(|&n| room_of(n) == "team:1").unwrap();
    let mut pipe = redis::pipe();
    let (mut team1, mut team2) = (Vec::new(), Vec::new());
    for n in 0..BURST {
        let room = room_of(n);
        let mut envelope = json!({
            "v": 1, "tenant": TENANT, "rooms": [room], "type": "test.n", "data": { "n": n },
        });
        if n == last_of_team1 {
            envelope["exclude_users"] = json!(["bob"]);
        }
        if room == "team:1" {
            team1.push((room.to_owned(), n));
        } else {
            team2.push((room.to_owned(), n));
        }
        let key = room_key(room);
        let stream = room_stream(&prefix, &key);
        let mark = format!("{}:t", stream.strip_suffix(":h").expect("stream name"));
        pipe.cmd("EVAL")
            .arg(PUBLISH_SCRIPT)
            .arg(3)
            .arg(&stream)
            .arg(room_channel(&prefix, &key))
            .arg(mark)
            .arg("*")
            .arg(envelope.to_string())
            .arg(1000)
            .arg(0)
            .arg(0)
            .arg("PUBLISH")
            .ignore();
    }
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let () = pipe.query_async(&mut conn).await.unwrap();

    // Before anything else is published: nothing may wait for a later push.
    let mut got_bob = Vec::new();
    for _ in 1..team1.len() {
        got_bob.push(bob.next_event().await);
    }
    let got_bob = summaries(&got_bob);
    assert_eq!(
        got_bob,
        team1[..team1.len() - 1],
        "all but the one excluding bob"
    );

    let (status, body) = node
        .publish(&event(&["team:1", "team:2"], "test.fence", json!({})))
        .await;
    assert_eq!(status, 200, "{body}");

    let last = ("team:1".to_owned(), last_of_team1);
    assert_eq!(team1.last(), Some(&last));
    assert_eq!(summaries(&alice.events_until("test.fence").await), team1);
    assert!(
        bob.events_until("test.fence").await.is_empty(),
        "nothing more for bob"
    );
    let got_carol = summaries(&carol.events_until("test.fence").await);
    let (c1, c2): (Vec<_>, Vec<_>) = got_carol.into_iter().partition(|(r, _)| r == "team:1");
    assert_eq!(
        (c1, c2),
        (team1.clone(), team2.clone()),
        "each room in order"
    );

    let deliveries = node.counter("roomcast_deliveries_total").await;
    let deferred = node.counter("roomcast_deliveries_deferred_total").await;
    let expected = (3 * team1.len() - 1 + team2.len() + 3) as f64;
    assert_eq!(deliveries, expected, "each delivery counted once");
    println!("{deferred} of {deliveries} deliveries deferred");
    assert!(
        deferred > 0.0,
        "a burst read in one go shares writes ({deferred} of {deliveries} deferred)"
    );
    node.stop().await;
}
