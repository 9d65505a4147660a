//! `limits.io_uring`: a room's direct sends go to the kernel in submissions
//! of up to 64, and every member still gets exactly its own frames (JSON or
//! protobuf, mixed in one submission), in order. Its own test binary, so the
//! nodes' counters are these tests' alone.

mod common;

use std::time::Duration;

use common::*;
use prost::Message as _;
use roomcast_edge::config::IoUringMode;
use roomcast_edge::Node;
use roomcast_protocol::pb;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// Whether the kernel allows io_uring at all (`kernel.io_uring_disabled`);
/// a sandbox that blocks it is caught by `required` refusing to start.
fn io_uring_disabled() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").is_ok_and(|v| v.trim() != "0")
}

/// A node that must send with io_uring, or `None` (the test is skipped)
/// where the kernel disables it.
async fn uring_node(adjust: impl FnOnce(&mut roomcast_edge::config::Config)) -> Option<TestNode> {
    if io_uring_disabled() {
        eprintln!("kernel.io_uring_disabled is set; skipping");
        return None;
    }
    let mut cfg = config();
    cfg.limits.io_uring = IoUringMode::Required;
    adjust(&mut cfg);
    Some(TestNode::start(cfg).await)
}

fn event_json(rooms: &[&str], kind: &str, data: Value) -> Value {
    json!({"tenant":"acme","rooms":rooms,"type":kind,"data":data})
}

async fn proto_client(node: &TestNode) -> Client {
    let mut c = Client::connect_url(
        &node.ws_url(),
        &token("p", "acme", &["1"]),
        Some("roomcast.v1.proto"),
    )
    .await
    .unwrap();
    assert!(matches!(
        decode(c.next_message().await).op,
        Some(pb::server_frame::Op::Welcome(_))
    ));
    let sub = pb::ClientFrame {
        r#ref: "s".into(),
        op: Some(pb::client_frame::Op::Subscribe(pb::Subscribe {
            rooms: vec!["team:1".into()],
            since: Default::default(),
        })),
    };
    c.send_raw(Message::binary(sub.encode_to_vec())).await;
    assert!(matches!(
        decode(c.next_message().await).op,
        Some(pb::server_frame::Op::Subscribed(_))
    ));
    c
}

fn decode(m: Message) -> pb::ServerFrame {
    match m {
        Message::Binary(b) => pb::ServerFrame::decode(&b[..]).unwrap(),
        other => panic!("expected a binary frame, got {other:?}"),
    }
}

/// The `n` of the next event frame, in either format.
async fn next_n(c: &mut Client, proto: bool) -> u64 {
    if proto {
        match decode(c.next_message().await).op {
            Some(pb::server_frame::Op::Event(e)) => match e.body {
                Some(pb::event_frame::Body::Json(j)) => serde_json::from_str::<Value>(&j).unwrap()
                    ["n"]
                    .as_u64()
                    .unwrap(),
                other => panic!("expected a JSON body, got {other:?}"),
            },
            other => panic!("expected an event, got {other:?}"),
        }
    } else {
        let ev = c.next_json().await;
        assert_eq!(ev["op"], "event", "{ev}");
        ev["data"]["n"].as_u64().unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_larger_than_a_submission_gets_every_frame_in_its_format_and_order() {
    let Some(node) = uring_node(|_| {}).await else {
        return;
    };
    // 150 members: three submissions per event (64, 64, 22), JSON and
    // protobuf members alternating so every submission mixes both frames.
    const MEMBERS: usize = 150;
    const EVENTS: u64 = 30;
    let mut members = Vec::new();
    for i in 0..MEMBERS {
        let proto = i % 2 == 1;
        let c = if proto {
            proto_client(&node).await
        } else {
            let mut c = node.connect(&token(&format!("j{i}"), "acme", &["1"])).await;
            c.subscribe(&["team:1"]).await;
            c
        };
        members.push((c, proto));
    }
    for n in 0..EVENTS {
        let (status, body) = node
            .publish(event_json(&["team:1"], "test.n", json!({ "n": n })))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    for (i, (c, proto)) in members.iter_mut().enumerate() {
        for n in 0..EVENTS {
            assert_eq!(next_n(c, *proto).await, n, "member {i}");
        }
    }
    let (_, page) = http_request(node.addr, "GET", "/metrics", &[], "").await;
    let sends = metric_value(&page, "roomcast_io_uring_sends_total");
    let submissions = metric_value(&page, "roomcast_io_uring_submissions_total");
    let deliveries = metric_value(&page, "roomcast_deliveries_total");
    println!("{sends} sends in {submissions} submissions, {deliveries} deliveries");
    // The counters are the process's: the other tests here add to them.
    assert!(
        deliveries >= (MEMBERS as u64 * EVENTS) as f64,
        "{deliveries}"
    );
    assert!(
        sends > 0.0 && sends <= deliveries,
        "{sends} of {deliveries}"
    );
    assert!(
        submissions >= (sends / 64.0).ceil(),
        "at most 64 sends per submission: {sends} in {submissions}"
    );
    node.stop().await;
}

/// A member that stops reading fills its socket: a send comes back short
/// from the submission and the rest of the frame, then every later one,
/// waits for the member's writer. When it reads again it gets every frame in
/// order, and the members that kept reading were never held up. (Checked:
/// dropping the rest of a short send fails this test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_stops_reading_gets_the_rest_later_in_order() {
    let Some(node) = uring_node(|c| c.limits.outbound_queue_bytes = 64 << 20).await else {
        return;
    };
    let mut readers = Vec::new();
    for i in 0..3 {
        let mut c = node.connect(&token(&format!("r{i}"), "acme", &["1"])).await;
        c.subscribe(&["team:1"]).await;
        readers.push(c);
    }
    let mut stalled = node.connect(&token("stalled", "acme", &["1"])).await;
    stalled.subscribe(&["team:1"]).await;
    // ~12 MB of frames: more than the kernel buffers for a reader that does
    // not read (up to tcp_wmem's 4 MiB plus the receive window), less than
    // the outbound queue allowed here.
    const EVENTS: u64 = 400;
    let filler = "x".repeat(30_000);
    for n in 0..EVENTS {
        let (status, body) = node
            .publish(event_json(
                &["team:1"],
                "test.n",
                json!({ "n": n, "filler": filler }),
            ))
            .await;
        assert_eq!(status, 200, "{body}");
        for (i, c) in readers.iter_mut().enumerate() {
            assert_eq!(next_n(c, false).await, n, "reader {i}");
        }
    }
    for n in 0..EVENTS {
        assert_eq!(next_n(&mut stalled, false).await, n, "the stalled member");
    }
    node.stop().await;
}

/// Fan-outs run concurrently (here: publishes on both worker threads into
/// rooms whose members joined in opposite orders), and each holds up to 64
/// sends at once. None may wait on a session another holds while holding
/// one that the other waits on: every event still arrives, in order per
/// room. (Checked: holding each outbox's lock until its send, as a first
/// version did, deadlocks and fails this test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_fan_outs_into_rooms_in_opposite_orders_never_deadlock() {
    let Some(node) = uring_node(|_| {}).await else {
        return;
    };
    const MEMBERS: usize = 140;
    const EVENTS: u64 = 100;
    let rooms = ["team:1", "team:2", "team:3", "team:4"];
    let mut members = Vec::new();
    for i in 0..MEMBERS {
        let mut c = node
            .connect(&token(&format!("m{i}"), "acme", &["1", "2", "3", "4"]))
            .await;
        c.subscribe(&["team:1", "team:3"]).await;
        members.push(c);
    }
    // Rooms 2 and 4 list the members in reverse.
    for c in members.iter_mut().rev() {
        c.subscribe(&["team:2", "team:4"]).await;
    }
    // A deadlock blocks both worker threads, and with them the runtime's
    // timers: only a thread outside it can fail the test.
    let (done, watched) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
            watched.recv_timeout(Duration::from_secs(60))
        {
            eprintln!("the fan-outs deadlocked: no progress in 60 s");
            std::process::abort();
        }
    });
    let publishers: Vec<_> = rooms
        .iter()
        .map(|room| {
            let addr = node.addr;
            let room = room.to_string();
            tokio::spawn(async move {
                for n in 0..EVENTS {
                    let body = event_json(&[&room], "test.n", json!({ "n": n, "room": room }));
                    let (status, reply) =
                        http_post(addr, "/v1/publish", Some(API_KEY), &body.to_string()).await;
                    assert_eq!(status, 200, "{reply}");
                }
            })
        })
        .collect();
    for p in publishers {
        p.await.unwrap();
    }
    for (i, c) in members.iter_mut().enumerate() {
        let mut next = [0u64; 4];
        for _ in 0..EVENTS * rooms.len() as u64 {
            let ev = c.next_json().await;
            assert_eq!(ev["op"], "event", "{ev}");
            let room = rooms
                .iter()
                .position(|r| ev["data"]["room"] == *r)
                .expect("one of the rooms");
            assert_eq!(ev["data"]["n"], next[room], "member {i}, {}", rooms[room]);
            next[room] += 1;
        }
    }
    let _ = done.send(());
    node.stop().await;
}

/// `required` where io_uring cannot be used refuses to start, saying why;
/// checked where the kernel disables it, otherwise `required` must start.
#[tokio::test]
async fn required_starts_only_where_io_uring_works() {
    let mut cfg = config();
    cfg.limits.io_uring = IoUringMode::Required;
    match Node::with_memory_broker(cfg).await {
        Ok(_) => assert!(!io_uring_disabled(), "started with io_uring disabled"),
        Err(e) => {
            assert!(io_uring_disabled(), "refused although io_uring works: {e}");
            assert!(e.to_string().contains("limits.io_uring"), "{e}");
        }
    }
}
