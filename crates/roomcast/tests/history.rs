//! No missed events: resume from room history across nodes, trimmed history
//! reported as `recovered: false`, a node refilling the gap after Redis comes
//! back, presence across nodes (a SIGKILLed node's users leave within the
//! TTL) and ephemeral signals. Real redis-server, several nodes.

mod support;

use std::sync::Arc;
use std::time::Duration;

use roomcast_broker_redis::room_channel;
use roomcast_protocol::RoomKey;
use roomcast_testkit::{query, redis_cli, unique_prefix, RedisCluster, RedisServer};
use serde_json::{json, Value};
use support::sse::SseClient;
use support::*;

/// A token granting explicit rooms.
fn token_with_rooms(user: &str, rooms: &[&str]) -> String {
    let mut c = roomcast_auth::MintClaims::new(user, TENANT);
    c.rooms = rooms.iter().map(|r| r.to_string()).collect();
    roomcast_auth::mint_hs256(SECRET.as_bytes(), &c)
}

fn numbered(seq: u64) -> Value {
    event(&["team:1"], "task.updated", json!({ "seq": seq }))
}

/// Subscribes with a resume position and returns the `subscribed` reply.
async fn resume(client: &mut Client, room: &str, since: &str) -> Value {
    client
        .send(json!({"op":"subscribe","ref":"r","rooms":[room],"since":{room: since}}))
        .await;
    let reply = client.next_json().await;
    assert_eq!(reply["op"], "subscribed", "{reply}");
    reply
}

#[tokio::test]
async fn a_client_resumes_on_another_node_with_exactly_the_missed_events() {
    let redis = RedisServer::start().await;
    let prefix = unique_prefix();
    let a = TestNode::start(config(Backend::Standalone(redis.url()), &prefix)).await;
    let b = TestNode::start(config(Backend::Standalone(redis.url()), &prefix)).await;
    let t = token("u1", &["1"]);

    let mut client = a.connect(&t).await;
    client.subscribe_all(&["team:1"]).await;
    a.publish(&numbered(0)).await;
    let seen = client.next_event().await;
    let last = seen["id"].as_str().unwrap().to_owned();
    drop(client);

    for seq in 1..=500 {
        let (status, body) = b.publish(&numbered(seq)).await;
        assert_eq!(status, 200, "{body}");
    }
    let mut client = b.connect(&t).await;
    let reply = resume(&mut client, "team:1", &last).await;
    assert_eq!(reply["recovered"], json!({"team:1": true}));
    let mut previous = last.clone();
    for seq in 1..=500 {
        let ev = client.next_event().await;
        assert_eq!(ev["data"]["seq"], seq, "in order, none missing");
        let id = ev["id"].as_str().unwrap().to_owned();
        let (p, i): (roomcast_protocol::EventId, roomcast_protocol::EventId) =
            (previous.parse().unwrap(), id.parse().unwrap());
        assert!(i > p, "ids increase");
        previous = id;
    }
    // Then live, with no duplicate: the next event is the live one.
    a.publish(&numbered(501)).await;
    assert_eq!(client.next_event().await["data"]["seq"], 501);
    a.publish(&event(&["team:1"], "fence", json!({}))).await;
    assert!(
        client.events_until("fence").await.is_empty(),
        "nothing replayed twice"
    );
}

#[tokio::test]
async fn resuming_from_before_the_cap_says_recovered_false() {
    let redis = RedisServer::start().await;
    let prefix = unique_prefix();
    let mut cfg = config(Backend::Standalone(redis.url()), &prefix);
    cfg.broker.history_max_len = 50;
    let node = TestNode::start(cfg).await;
    let mut first = None;
    for seq in 0..200 {
        let (_, body) = node.publish(&numbered(seq)).await;
        first.get_or_insert_with(|| body["ids"]["team:1"].as_str().unwrap().to_owned());
    }
    let mut client = node.connect(&token("u1", &["1"])).await;
    let reply = resume(&mut client, "team:1", first.as_deref().unwrap()).await;
    assert_eq!(reply["recovered"], json!({"team:1": false}), "{reply}");
    // A position inside the kept history recovers.
    let mut fresh = node.connect(&token("u1", &["1"])).await;
    let (_, body) = node.publish(&numbered(200)).await;
    let recent = body["ids"]["team:1"].as_str().unwrap().to_owned();
    node.publish(&numbered(201)).await;
    let reply = resume(&mut fresh, "team:1", &recent).await;
    assert_eq!(reply["recovered"], json!({"team:1": true}));
    assert_eq!(fresh.next_event().await["data"]["seq"], 201);
}

#[tokio::test]
async fn history_caps_apply_per_room_kind() {
    let redis = RedisServer::start().await;
    let prefix = unique_prefix();
    let mut cfg = config(Backend::Standalone(redis.url()), &prefix);
    cfg.broker.history_kinds.insert(
        "task".into(),
        roomcast_edge::config::HistoryKindCap {
            max_len: 5,
            max_age: Duration::from_secs(3600),
        },
    );
    let node = TestNode::start(cfg).await;
    let (mut first_task, mut first_team) = (None, None);
    for seq in 0..40 {
        let (_, body) = node
            .publish(&event(&["task:t1", "team:1"], "x", json!({ "seq": seq })))
            .await;
        first_task.get_or_insert_with(|| body["ids"]["task:t1"].as_str().unwrap().to_owned());
        first_team.get_or_insert_with(|| body["ids"]["team:1"].as_str().unwrap().to_owned());
    }
    let t = token_with_rooms("u1", &["task:t1", "team:1"]);
    let mut client = node.connect(&t).await;
    let reply = resume(&mut client, "task:t1", first_task.as_deref().unwrap()).await;
    assert_eq!(
        reply["recovered"],
        json!({"task:t1": false}),
        "task rooms keep 5"
    );
    let mut other = node.connect(&t).await;
    let reply = resume(&mut other, "team:1", first_team.as_deref().unwrap()).await;
    assert_eq!(
        reply["recovered"],
        json!({"team:1": true}),
        "team rooms keep the default 1000"
    );
    for seq in 1..40 {
        assert_eq!(other.next_event().await["data"]["seq"], seq);
    }
}

#[tokio::test]
async fn a_node_fills_the_gap_after_redis_comes_back() {
    let mut redis = RedisServer::start().await;
    if redis.is_external() {
        return; // an external Redis cannot be restarted by the test
    }
    let prefix = unique_prefix();
    let node = TestNode::start(config(Backend::Standalone(redis.url()), &prefix)).await;
    let mut client = node.connect(&token("u1", &["1"])).await;
    client.subscribe_all(&["team:1"]).await;
    node.publish(&numbered(0)).await;
    assert_eq!(client.next_event().await["data"]["seq"], 0);

    redis.kill();
    eventually("node reports not ready", PATIENCE, || async {
        node.readyz().await == 503
    })
    .await;
    redis.start_again().await;
    // A second path (a domain service, straight into Redis) publishes while
    // the node may still be reconnecting: those events miss it live.
    let mut direct = roomcast_broker_redis::RedisConfig::standalone(redis.url());
    direct.prefix = prefix.clone();
    for seq in 1..=20 {
        let ev = roomcast_protocol::Event::decode(
            numbered(seq).to_string().as_bytes(),
            &roomcast_protocol::EventDefaults {
                tenant: None,
                now_ms: now_ms(),
            },
        )
        .unwrap();
        roomcast_broker_redis::publish_direct(&direct, ev)
            .await
            .expect("redis is back");
    }
    eventually("node ready again", RECOVERY, || async {
        node.readyz().await == 200
    })
    .await;
    publish_retrying(node.addr, &numbered(21), RECOVERY).await;
    for seq in 1..=21 {
        assert_eq!(
            client.next_event().await["data"]["seq"],
            seq,
            "the gap is refilled in order"
        );
    }
    node.publish(&event(&["team:1"], "fence", json!({}))).await;
    assert!(
        client.events_until("fence").await.is_empty(),
        "no duplicate"
    );
}

/// A node on a 3-master cluster whose subscription of team:1 was lost and
/// is back, while another room on the same master is refused (so the node
/// is not resynced yet), with one event of team:1 that reached history
/// only, as if published while the node was away (seq 1; seq 0 came
/// before).
struct RefusedRoom {
    cluster: RedisCluster,
    prefix: String,
    node: TestNode,
    client: Client,
}

impl RefusedRoom {
    async fn start() -> RefusedRoom {
        let cluster = RedisCluster::start(3).await;
        let prefix = unique_prefix();
        let key = |room: &str| RoomKey::new(TENANT.parse().unwrap(), room.parse().unwrap());
        let slot = |room: &str| RedisCluster::slot_of(&room_channel(&prefix, &key(room)));
        // Two rooms on one master, in different slots (so they are
        // subscribed with separate commands and one can be refused alone).
        let master = cluster.owner_of(slot("team:1"));
        let other = (2..200)
            .map(|n| format!("team:{n}"))
            .find(|r| cluster.owner_of(slot(r)) == master && slot(r) != slot("team:1"))
            .expect("some room shares team:1's master");
        let team1_channel = room_channel(&prefix, &key("team:1"));
        // The node logs in as a user whose channel rights the test can take away.
        for url in cluster.urls() {
            let ok = redis_cli(
                &url,
                &["ACL", "SETUSER", "node", "on", ">pw", "~*", "&*", "+@all"],
            );
            assert_eq!(ok, "OK");
        }
        let node_urls: Vec<String> = cluster
            .ports()
            .iter()
            .map(|p| format!("redis://node:pw@127.0.0.1:{p}"))
            .collect();
        let node = TestNode::start(config(Backend::Cluster(&node_urls), &prefix)).await;
        let teams = ["1", other.trim_start_matches("team:")];
        let mut client = node.connect(&token("u1", &teams)).await;
        client.subscribe_all(&["team:1", &other]).await;
        node.publish(&numbered(0)).await;
        assert_eq!(client.next_event().await["data"]["seq"], 0);

        // Taking the other room away makes Redis drop the node's subscriber
        // connection to that master; the node comes back with team:1 but is
        // refused the other room, so it is not resynced yet.
        let admin = cluster.urls()[master].clone();
        let subscribers = |url: &str| redis_cli(url, &["CLIENT", "LIST", "TYPE", "pubsub"]);
        let before: Vec<String> = subscribers(&admin).lines().map(client_id).collect();
        let ok = redis_cli(
            &admin,
            &[
                "ACL",
                "SETUSER",
                "node",
                "resetchannels",
                &format!("&{team1_channel}"),
            ],
        );
        assert_eq!(ok, "OK");
        eventually("the node resubscribes team:1 alone", RECOVERY, || async {
            subscribers(&admin)
                .lines()
                .any(|l| !before.contains(&client_id(l)) && l.contains(" ssub=1 "))
        })
        .await;
        let stream = roomcast_broker_redis::room_stream(&prefix, &key("team:1"));
        let id: String = query(
            &admin,
            redis::cmd("XADD")
                .arg(&stream)
                .arg("*")
                .arg("e")
                .arg(direct_event(1).encode_envelope()),
        )
        .await;
        assert!(id.contains('-'), "XADD: {id}");
        RefusedRoom {
            cluster,
            prefix,
            node,
            client,
        }
    }

    /// Publishes events `seqs` of team:1 straight into Redis: they reach
    /// the node live.
    async fn publish_live(&self, seqs: std::ops::RangeInclusive<u64>) {
        let mut direct = roomcast_broker_redis::RedisConfig::cluster(self.cluster.urls());
        direct.prefix = self.prefix.clone();
        let publisher = roomcast_broker_redis::RedisBroker::connect(direct, Arc::new(Discard))
            .await
            .expect("cluster is up");
        for seq in seqs {
            roomcast_broker::Broker::publish(&*publisher, direct_event(seq))
                .await
                .expect("cluster is up");
        }
    }

    /// Publishes event 2 live and waits until the node holds it.
    async fn hold_event_2(&self) {
        let arrived = self.node.counter("roomcast_events_in_total").await;
        self.publish_live(2..=2).await;
        eventually("the node holds event 2", RECOVERY, || async {
            self.node.counter("roomcast_events_in_total").await > arrived
        })
        .await;
    }

    /// Publishes event 3 live, lets the node resync, and expects events 1-3
    /// for the client from before, then a fence (for every client).
    async fn refill_after_event_3(&mut self) {
        self.publish_live(3..=3).await;
        self.allow_every_room();
        for seq in 1..=3 {
            assert_eq!(
                self.client.next_event().await["data"]["seq"],
                seq,
                "in order"
            );
        }
        self.assert_no_duplicate().await;
    }

    /// Gives the node back the refused room, so it resyncs.
    fn allow_every_room(&self) {
        for url in self.cluster.urls() {
            assert_eq!(
                redis_cli(&url, &["ACL", "SETUSER", "node", "allchannels"]),
                "OK"
            );
        }
    }

    /// Each event of team:1 exactly once: no duplicate before a fence.
    async fn assert_no_duplicate(&mut self) {
        self.node
            .publish(&event(&["team:1"], "fence", json!({})))
            .await;
        assert!(
            self.client.events_until("fence").await.is_empty(),
            "no duplicate"
        );
    }
}

/// A sink for a publisher's own broker, which subscribes nothing.
struct Discard;

impl roomcast_broker::EventSink for Discard {
    fn deliver(&self, _: &RoomKey, _: Arc<roomcast_protocol::Event>) {}
}

/// A room whose subscription was lost holds its live events until the gap
/// is refilled, even when its subscription is back before the others are:
/// the event that reached history while the node was away is delivered
/// before a later one that arrived live, and neither is lost.
#[tokio::test]
async fn live_events_wait_while_a_lost_room_is_refilled() {
    let mut t = RefusedRoom::start().await;
    t.publish_live(2..=2).await;
    t.allow_every_room();
    assert_eq!(
        t.client.next_event().await["data"]["seq"],
        1,
        "the event that only reached history comes first"
    );
    assert_eq!(t.client.next_event().await["data"]["seq"], 2);
    t.assert_no_duplicate().await;
}

/// A room does not wait for the others without end: once it holds 1,000
/// live events it refills on its own, while the other room is still
/// refused, and afterwards the resync adds nothing twice.
#[tokio::test]
async fn a_room_that_held_a_thousand_events_refills_on_its_own() {
    let mut t = RefusedRoom::start().await;
    t.publish_live(2..=1001).await;
    for seq in 1..=1001 {
        assert_eq!(t.client.next_event().await["data"]["seq"], seq, "in order");
    }
    t.allow_every_room();
    t.assert_no_duplicate().await;
}

/// A client that subscribes while the room waits for its refill gets only
/// what was published after it joined: not the event the room held from
/// before, nor the one the refill reads from the outage before that.
#[tokio::test]
async fn a_client_subscribing_to_a_room_being_refilled_gets_nothing_from_before() {
    let mut t = RefusedRoom::start().await;
    t.hold_event_2().await;
    let mut late = t.node.connect(&token("u2", &["1"])).await;
    late.subscribe_all(&["team:1"]).await;
    t.refill_after_event_3().await;
    let seqs: Vec<Value> = late.events_until("fence").await;
    let seqs: Vec<&Value> = seqs.iter().map(|e| &e["data"]["seq"]).collect();
    assert_eq!(seqs, [&json!(3)], "only what came after, once");
}

/// The same for an SSE stream opened meanwhile, whose rooms wait behind
/// its opening event.
#[tokio::test]
async fn an_sse_stream_opened_on_a_room_being_refilled_gets_nothing_from_before() {
    let mut t = RefusedRoom::start().await;
    t.hold_event_2().await;
    let auth = format!("Bearer {}", token("u2", &["1"]));
    let mut late = SseClient::open(
        t.node.addr,
        "/v1/sse?rooms=team:1",
        &[("Authorization", &auth)],
    )
    .await
    .expect("the stream opens");
    assert_eq!(late.subscribed().await["rooms"], json!(["team:1"]));
    t.refill_after_event_3().await;
    let got: Vec<Value> = late.events_until("fence").await;
    let seqs: Vec<&Value> = got.iter().map(|e| &e["data"]["seq"]).collect();
    assert_eq!(seqs, [&json!(3)], "only what came after, once");
}

/// The `id=` of a `CLIENT LIST` line.
fn client_id(line: &str) -> String {
    line.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Event `seq` of team:1, as a domain service would publish it.
fn direct_event(seq: u64) -> roomcast_protocol::Event {
    roomcast_protocol::Event::decode(
        numbered(seq).to_string().as_bytes(),
        &roomcast_protocol::EventDefaults {
            tenant: None,
            now_ms: now_ms(),
        },
    )
    .unwrap()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A node process with short presence timings.
async fn presence_node(redis_url: &str, prefix: &str) -> NodeProcess {
    NodeProcess::spawn(&[
        "--redis",
        redis_url,
        "--redis-prefix",
        prefix,
        "--presence-ttl",
        "2s",
        "--presence-heartbeat-interval",
        "500ms",
        "--presence-sweep-interval",
        "200ms",
        "--unsubscribe-delay",
        "0s",
    ])
    .await
}

async fn next_of_type(client: &mut Client, kind: &str) -> Value {
    loop {
        let ev = client.next_event().await;
        if ev["type"] == kind {
            return ev;
        }
    }
}

#[tokio::test]
async fn presence_spans_nodes_and_a_killed_node_leaves_no_ghost() {
    let redis = RedisServer::start().await;
    let prefix = unique_prefix();
    let mut a = presence_node(redis.url(), &prefix).await;
    let b = presence_node(redis.url(), &prefix).await;
    let t1 = token_with_rooms("u1", &["task:t1"]);
    let t2 = token_with_rooms("u2", &["task:t1"]);

    let mut alice = Client::connect(b.addr, &t1).await;
    alice.subscribe_all(&["task:t1"]).await;
    let mut bob = Client::connect(a.addr, &t2).await;
    bob.subscribe_all(&["task:t1"]).await;
    let joined = next_of_type(&mut alice, "presence.joined").await;
    assert_eq!(joined["data"]["user"], "u2");
    assert!(
        joined.get("id").is_none(),
        "presence events are not in history"
    );

    alice
        .send(json!({"op":"presence","ref":"p","room":"task:t1"}))
        .await;
    let who = alice.next_json().await;
    assert_eq!(who["op"], "presence", "{who}");
    let mut users: Vec<&str> = who["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["user"].as_str().unwrap())
        .collect();
    users.sort();
    assert_eq!(users, ["u1", "u2"]);
    let bob_sessions = &who["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["user"] == "u2")
        .unwrap()["sessions"];
    assert_eq!(bob_sessions[0]["session"], bob.welcome["session"]);
    assert!(bob_sessions[0]["connected_at"].as_u64().unwrap() > 0);

    // Bob's node dies without a goodbye: within the TTL, alice sees him leave.
    a.sigkill().await;
    let left = tokio::time::timeout(
        Duration::from_secs(6),
        next_of_type(&mut alice, "presence.left"),
    )
    .await
    .expect("presence.left within the TTL plus a sweep");
    assert_eq!(left["data"]["user"], "u2");
    drop(bob);
}

#[tokio::test]
async fn signals_reach_the_other_members_only_and_are_never_stored() {
    let redis = RedisServer::start().await;
    let prefix = unique_prefix();
    let mut cfg = config(Backend::Standalone(redis.url()), &prefix);
    cfg.limits.signal_messages = 3;
    cfg.limits.signal_window = Duration::from_secs(60);
    let a = TestNode::start(cfg.clone()).await;
    let b = TestNode::start(cfg).await;
    let mut typist = a.connect(&token("u1", &["1"])).await;
    typist.subscribe_all(&["team:1"]).await;
    let mut reader = b.connect(&token("u2", &["1"])).await;
    reader.subscribe_all(&["team:1"]).await;

    typist
        .send(json!({"op":"signal","ref":"s1","room":"team:1","type":"typing","data":{"on":true}}))
        .await;
    assert_eq!(
        typist.next_json().await,
        json!({"op":"signaled","ref":"s1"})
    );
    let ev = reader.next_event().await;
    assert_eq!(
        (ev["type"].as_str(), ev["actor"].as_str()),
        (Some("signal.typing"), Some("u1"))
    );
    assert_eq!(ev["data"], json!({"on":true}));

    // Not to a room the sender is not in, and not past the budget.
    typist
        .send(json!({"op":"signal","ref":"s2","room":"team:2","type":"typing"}))
        .await;
    assert_eq!(typist.next_json().await["code"], "AUTHORIZATION_FAILED");
    for i in 0..3 {
        typist
            .send(json!({"op":"signal","ref":format!("b{i}"),"room":"team:1","type":"typing"}))
            .await;
    }
    let mut codes = Vec::new();
    for _ in 0..3 {
        let m = typist.next_json().await;
        codes.push(
            m["code"]
                .as_str()
                .unwrap_or(m["op"].as_str().unwrap())
                .to_owned(),
        );
    }
    assert_eq!(codes, ["signaled", "signaled", "RATE_LIMIT_EXCEEDED"]);

    // The sender never gets its own signal back, and history holds none.
    a.publish(&event(&["team:1"], "fence", json!({}))).await;
    assert!(typist.events_until("fence").await.is_empty());
    let mut late = b.connect(&token("u3", &["1"])).await;
    let reply = resume(&mut late, "team:1", "0-0").await;
    assert_eq!(reply["recovered"], json!({"team:1": true}));
    assert_eq!(
        late.next_event().await["type"],
        "fence",
        "history holds the fence only"
    );
}
