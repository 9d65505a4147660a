//! The native fallback transports on two nodes over one real Redis: SSE
//! (`/v1/sse`, `Last-Event-ID` resume) and long-poll (`/v1/poll?since=`)
//! get exactly the events WebSocket clients get, in the same order.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use roomcast_edge::Config;
use roomcast_testkit::{unique_prefix, RedisServer};
use serde_json::{json, Value};
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// One SSE event as a client parses it; comments have `comment` set.
#[derive(Debug, Clone, Default)]
struct SseEvent {
    id: Option<String>,
    event: Option<String>,
    data: String,
    comment: Option<String>,
}

/// A plain HTTP/1.1 client reading a chunked `text/event-stream` body.
struct SseClient {
    reader: BufReader<TcpStream>,
    buf: String,
    ended: bool,
}

impl SseClient {
    /// Opens the stream; returns the status and, for non-200, the body.
    async fn open(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<SseClient, (u16, String)> {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut req =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut reader = BufReader::new(s);
        let mut status_line = String::new();
        tokio::time::timeout(PATIENCE, reader.read_line(&mut status_line))
            .await
            .expect("a response head in time")
            .unwrap();
        let status: u16 = status_line.split(' ').nth(1).unwrap().parse().unwrap();
        let mut length = 0usize;
        let mut chunked = false;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).await.unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
            if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
            if status == 200 && lower.starts_with("content-type:") {
                assert!(lower.contains("text/event-stream"), "{line}");
            }
        }
        if status != 200 {
            let mut body = vec![0; length];
            reader.read_exact(&mut body).await.unwrap();
            return Err((status, String::from_utf8_lossy(&body).into_owned()));
        }
        assert!(chunked, "an SSE body is chunked");
        Ok(SseClient {
            reader,
            buf: String::new(),
            ended: false,
        })
    }

    /// Reads one chunk into the buffer; false at the end of the body.
    async fn read_chunk(&mut self) -> bool {
        let mut size = String::new();
        if self.reader.read_line(&mut size).await.unwrap_or(0) == 0 {
            return false;
        }
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            return false;
        };
        if n == 0 {
            return false;
        }
        let mut data = vec![0; n + 2];
        if self.reader.read_exact(&mut data).await.is_err() {
            return false;
        }
        self.buf.push_str(&String::from_utf8_lossy(&data[..n]));
        true
    }

    /// The next event or comment; `None` when the stream ended.
    async fn next_any(&mut self, within: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut ev = SseEvent::default();
                let mut data = Vec::new();
                for line in block.lines() {
                    if let Some(c) = line.strip_prefix(':') {
                        ev.comment = Some(c.trim().to_owned());
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        ev.id = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        ev.event = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push(v);
                    }
                }
                ev.data = data.join("\n");
                return Some(ev);
            }
            if self.ended {
                return None;
            }
            match tokio::time::timeout_at(deadline, self.read_chunk()).await {
                Ok(true) => {}
                Ok(false) => self.ended = true,
                Err(_) => panic!("nothing on the SSE stream within {within:?}"),
            }
        }
    }

    /// The next data event (comments skipped), parsed.
    async fn next_json(&mut self) -> Option<(SseEvent, Value)> {
        loop {
            let ev = self.next_any(PATIENCE).await?;
            if ev.comment.is_some() {
                continue;
            }
            let v: Value = serde_json::from_str(&ev.data).expect("JSON data");
            return Some((ev, v));
        }
    }

    /// Waits for the native `subscribed` opening (every room joined).
    async fn subscribed(&mut self) -> Value {
        let (ev, v) = self.next_json().await.expect("the opening event");
        assert_eq!(v["op"], "subscribed", "{ev:?}");
        v
    }

    /// Event frames until the first of type `fence`; asserts `id:` = `id`.
    async fn events_until(&mut self, fence: &str) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let (ev, v) = self.next_json().await.expect("an event before the end");
            assert_eq!(v["op"], "event", "{v}");
            assert_eq!(ev.id.as_deref(), v["id"].as_str(), "id: is the event id");
            if v["type"] == fence {
                return out;
            }
            out.push(v);
        }
    }
}

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
