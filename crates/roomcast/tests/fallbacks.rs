//! The native fallback transports on two nodes over one real Redis: SSE
//! (`/v1/sse`, `Last-Event-ID` resume) and long-poll (`/v1/poll?since=`)
//! get exactly the events WebSocket clients get, in the same order.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use roomcast_edge::Config;
use roomcast_testkit::{unique_prefix, RedisServer};
use serde_json::{json, Value};
use support::sse::SseClient;
use support::*;

fn ids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect()
}

fn node_config(redis: &RedisServer, prefix: &str) -> Config {
    let mut c = config(Backend::Standalone(redis.url()), prefix);
    c.dialects.native.poll_wait = Duration::from_secs(2);
    c.dialects.native.sse_heartbeat = Duration::from_millis(100);
    c
}

async fn publish_id(node: &TestNode, room: &str, kind: &str, n: u64) -> String {
    let (status, body) = node.publish(&event(&[room], kind, json!({ "n": n }))).await;
    assert_eq!(status, 200, "{body}");
    body["ids"][room].as_str().unwrap().to_owned()
}

async fn poll(addr: SocketAddr, query: &str, token: Option<&str>) -> (u16, Value) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    let (status, body) =
        http_request(addr, "GET", &format!("/v1/poll?{query}"), &headers, "").await;
    (
        status,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_with_last_event_id_and_long_poll_with_since_get_the_same_events_as_websocket_clients()
{
    let redis = RedisServer::start().await;
    let prefix = unique_prefix();
    let a = TestNode::start(node_config(&redis, &prefix)).await;
    let b = TestNode::start(node_config(&redis, &prefix)).await;
    let tok = token("u1", &["1"]);
    let auth = format!("Bearer {tok}");

    let mut ws = a.connect(&tok).await;
    ws.subscribe_all(&["team:1"]).await;
    let mut sse = SseClient::open(b.addr, "/v1/sse?rooms=team:1", &[("Authorization", &auth)])
        .await
        .expect("SSE opens");
    assert_eq!(sse.subscribed().await["rooms"], json!(["team:1"]));

    let start = publish_id(&a, "team:1", "test.start", 0).await;
    let mut published = Vec::new();
    for n in 1..=5 {
        let node = if n % 2 == 0 { &a } else { &b };
        published.push(publish_id(node, "team:1", "test.n", n).await);
    }
    let fence1 = publish_id(&b, "team:1", "test.fence", 99).await;

    let ws_events = ws.events_until("test.fence").await;
    let ws_ids: Vec<String> = ids(&ws_events)
        .into_iter()
        .filter(|i| *i != start)
        .collect();
    assert_eq!(ws_ids, published);
    let sse_ids: Vec<String> = ids(&sse.events_until("test.fence").await)
        .into_iter()
        .filter(|i| *i != start)
        .collect();
    assert_eq!(sse_ids, published, "SSE gets what WebSocket gets");

    let (status, polled) = poll(a.addr, &format!("rooms=team:1&since={start}"), Some(&tok)).await;
    assert_eq!(status, 200, "{polled}");
    let polled = polled.as_array().expect("a JSON array").clone();
    assert_eq!(polled.last().unwrap()["type"], "test.fence");
    assert_eq!(
        ids(&polled[..polled.len() - 1]),
        published,
        "poll gets the same"
    );
    assert_eq!(polled[0]["op"], "event");
    assert_eq!(polled[0]["data"], json!({"n": 1}));

    // Resume: the SSE client leaves, misses two events, and reconnects to
    // the OTHER node with Last-Event-ID: the missed ones, then live, once.
    let last_seen = fence1;
    drop(sse);
    let missed = vec![
        publish_id(&a, "team:1", "test.n", 6).await,
        publish_id(&b, "team:1", "test.n", 7).await,
    ];
    let mut sse = SseClient::open(
        a.addr,
        "/v1/sse?rooms=team:1",
        &[("Authorization", &auth), ("Last-Event-ID", &last_seen)],
    )
    .await
    .expect("SSE reopens");
    let opening = sse.subscribed().await;
    assert_eq!(opening["recovered"], json!({"team:1": true}), "{opening}");
    let live = publish_id(&b, "team:1", "test.n", 8).await;
    let fence = publish_id(&a, "team:1", "test.fence2", 0).await;
    let got = ids(&sse.events_until("test.fence2").await);
    let mut expected = missed.clone();
    expected.push(live.clone());
    assert_eq!(got, expected, "the missed events, then live, no duplicate");

    // The same resume through the query parameter, for clients that cannot
    // set headers: exactly what came after `live`.
    let mut sse2 = SseClient::open(
        b.addr,
        &format!("/v1/sse?rooms=team:1&lastEventId={live}&token={tok}"),
        &[],
    )
    .await
    .expect("SSE opens with ?lastEventId=");
    sse2.subscribed().await;
    let (ev, v) = sse2.next_json().await.unwrap();
    assert_eq!(ev.id.as_deref(), Some(fence.as_str()), "{v}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_waits_for_the_first_live_event_and_times_out_empty() {
    let redis = RedisServer::start().await;
    let prefix = unique_prefix();
    let a = TestNode::start(node_config(&redis, &prefix)).await;
    let b = TestNode::start(node_config(&redis, &prefix)).await;
    let tok = token("u1", &["1"]);
    let last = publish_id(&a, "team:1", "test.n", 1).await;

    // Nothing after `last`: the poll waits, then answers with the first event.
    let started = Instant::now();
    let waiting = tokio::spawn({
        let tok = tok.clone();
        let addr = b.addr;
        let q = format!("rooms=team:1&since={last}");
        async move { poll(addr, &q, Some(&tok)).await }
    });
    let tenant = TENANT.parse().unwrap();
    let room = "team:1".parse().unwrap();
    eventually("the poll joined team:1", PATIENCE, || {
        let n = b.node.hub().member_count(&tenant, &room);
        async move { n == 1 }
    })
    .await;
    let id = publish_id(&a, "team:1", "test.n", 2).await;
    let (status, body) = waiting.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(ids(body.as_array().unwrap()), vec![id.clone()]);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "answered at once, not at the end of the wait"
    );
    eventually("the poll left team:1", PATIENCE, || {
        let n = b.node.hub().member_count(&tenant, &room);
        async move { n == 0 }
    })
    .await;

    // Still nothing new: an empty array after the configured wait.
    let started = Instant::now();
    let (status, body) = poll(b.addr, &format!("rooms=team:1&since={id}"), Some(&tok)).await;
    assert_eq!((status, body), (200, json!([])));
    assert!(started.elapsed() >= Duration::from_millis(1900));

    // Bad input gets clear errors before any waiting.
    let (status, body) = poll(b.addr, "rooms=team:1", None).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["code"], "AUTHENTICATION_FAILED");
    let (status, body) = poll(b.addr, "rooms=team:2&since=1-0", Some(&tok)).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "AUTHORIZATION_FAILED");
    let (status, body) = poll(b.addr, "rooms=team:1&since=yesterday", Some(&tok)).await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = poll(b.addr, "rooms=", Some(&tok)).await;
    assert_eq!(status, 400);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_heartbeats_refuses_without_a_token_and_ends_on_drain() {
    let redis = RedisServer::start().await;
    let prefix = unique_prefix();
    let a = TestNode::start(node_config(&redis, &prefix)).await;
    let tok = token("u1", &["1"]);

    match SseClient::open(a.addr, "/v1/sse?rooms=team:1", &[]).await {
        Err((401, body)) => {
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["code"], "AUTHENTICATION_FAILED", "{v}");
        }
        Err(other) => panic!("expected 401, got {other:?}"),
        Ok(_) => panic!("expected 401, got a stream"),
    }
    let auth = format!("Bearer {tok}");
    match SseClient::open(a.addr, "/v1/sse?rooms=team:2", &[("Authorization", &auth)]).await {
        Err((403, _)) => {}
        Err(other) => panic!("expected 403, got {other:?}"),
        Ok(_) => panic!("expected 403, got a stream"),
    }

    // The cookie works too (browsers' EventSource sends it).
    let cookie = format!("roomcast_token={tok}");
    let mut sse = SseClient::open(a.addr, "/v1/sse?rooms=team:1", &[("Cookie", &cookie)])
        .await
        .expect("SSE opens");
    sse.subscribed().await;
    assert_eq!(
        a.node.connection_count(),
        1,
        "the connection cap counts SSE"
    );
    loop {
        let ev = sse
            .next_any(Duration::from_secs(2))
            .await
            .expect("stream open");
        if ev.comment.as_deref() == Some("heartbeat") {
            break;
        }
    }

    // SIGTERM: the drain ends the stream with a close event (1001).
    let node = a.node.clone();
    let stopping = tokio::spawn(a.stop());
    let mut closed = None;
    while let Some(ev) = sse.next_any(PATIENCE).await {
        if ev.event.as_deref() == Some("close") {
            closed = Some(serde_json::from_str::<Value>(&ev.data).unwrap());
        }
    }
    let closed = closed.expect("a close event before the end");
    assert_eq!(closed["code"], 1001, "{closed}");
    assert_eq!(closed["reconnect"], true);
    stopping.await.unwrap();
    assert_eq!(node.connection_count(), 0);
}
