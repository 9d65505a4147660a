//! Slow consumers, token expiry, idle sockets, audience and exclusions, the
//! authorization callback, and the publish API's refusals.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;

/// The code of the close frame in a raw server-to-client byte stream.
fn last_close_code(mut raw: &[u8]) -> Option<u16> {
    let mut code = None;
    while raw.len() >= 2 {
        let opcode = raw[0] & 0x0f;
        let (len, header) = match raw[1] & 0x7f {
            126 => (u16::from_be_bytes([raw[2], raw[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(raw[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        let payload = &raw[header..header + len];
        if opcode == 0x8 && payload.len() >= 2 {
            code = Some(u16::from_be_bytes([payload[0], payload[1]]));
        }
        raw = &raw[header + len..];
    }
    code
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_while_others_get_every_event() {
    let mut cfg = config();
    cfg.limits.outbound_queue_frames = 64;
    cfg.limits.outbound_queue_bytes = 256 * 1024;
    let node = TestNode::start(cfg).await;
    let t = token("u1", "acme", &["1"]);
    let mut slow = node.connect(&t).await;
    slow.subscribe(&["team:1"]).await;
    let mut healthy = node.connect(&t).await;
    healthy.subscribe(&["team:1"]).await;

    let received = Arc::new(AtomicUsize::new(0));
    let reader = tokio::spawn({
        let received = received.clone();
        async move {
            let mut expected = 0u64;
            loop {
                let ev = healthy.next_json().await;
                if ev["type"] == "test.done" {
                    return (expected, healthy);
                }
                assert_eq!(
                    ev["data"]["seq"].as_u64(),
                    Some(expected),
                    "in order, none missing"
                );
                expected += 1;
                received.fetch_add(1, Ordering::Relaxed);
            }
        }
    });

    let pad = "x".repeat(32 * 1024);
    let mut published = 0u64;
    let slow_drops = || async {
        let (_, metrics) = http_request(node.addr, "GET", "/metrics", &[], "").await;
        metric_value(&metrics, "roomcast_drops_total{reason=\"slow_consumer\"}") > 0.0
    };
    // Publish until the slow session is cut off (bounded: ~64 MB at most).
    while !slow_drops().await {
        assert!(published < 2000, "slow consumer never cut off");
        for _ in 0..25 {
            let (status, _) = node
                .publish(json!({"tenant":"acme","rooms":["team:1"],"type":"bulk","data":{"seq":published,"pad":pad}}))
                .await;
            assert_eq!(status, 200);
            published += 1;
        }
    }
    node.publish(json!({"tenant":"acme","rooms":["team:1"],"type":"test.done"}))
        .await;
    let (got, healthy) = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, published, "the healthy client received every event");

    // The slow client finds its backlog and then the documented close code.
    let (code, reason) = slow.expect_close().await;
    assert_eq!(code, 4008, "{reason}");
    eventually("slow session gone", || node.node.connection_count() == 1).await;
    drop(healthy);
}

#[tokio::test]
async fn an_expiring_token_closes_the_socket_with_4401() {
    let node = TestNode::start(config()).await;
    let t = token_with(|c| c.expiry = expiring_in(2));
    let mut c = node.connect(&t).await;
    let (code, reason) = c.expect_close().await;
    assert_eq!((code, reason.as_str()), (4401, "token expired"));
}

#[tokio::test]
async fn a_silent_socket_is_closed_after_the_idle_timeout() {
    let mut cfg = config();
    cfg.limits.ping_interval = Duration::from_millis(100);
    cfg.limits.idle_timeout = Duration::from_millis(400);
    let node = TestNode::start(cfg).await;
    let silent = node.connect(&token("u1", "acme", &[])).await;
    let mut lively = node.connect(&token("u2", "acme", &[])).await;
    // The lively client reads (and so answers pings) while the silent one does not.
    let lively_task = tokio::spawn(async move {
        for _ in 0..8 {
            match tokio::time::timeout(PATIENCE, lively.ws.next()).await {
                Ok(Some(Ok(Message::Ping(_)))) => continue,
                other => panic!("lively client got {other:?}"),
            }
        }
        lively
    });
    eventually("silent socket closed", || node.node.connection_count() == 1).await;
    // Read the raw bytes: a WebSocket client would try to answer the queued
    // pings on a socket the server already closed.
    let MaybeTlsStream::Plain(mut tcp) = silent.ws.into_inner() else {
        unreachable!("plain ws://")
    };
    let mut raw = Vec::new();
    tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(last_close_code(&raw), Some(4000));
    let _lively = lively_task.await.unwrap();
    assert_eq!(
        node.node.connection_count(),
        1,
        "a client answering pings stays"
    );
}

#[tokio::test]
async fn audience_and_exclusions_are_honoured() {
    let node = TestNode::start(config()).await;
    let admin = token_with(|c| {
        c.sub = "admin1".into();
        c.teams = vec!["1".into()];
        c.roles = vec!["admin".into()];
    });
    let mut admin = node.connect(&admin).await;
    admin.subscribe(&["team:1"]).await;
    let mut plain = node.connect(&token("u1", "acme", &["1"])).await;
    plain.subscribe(&["team:1"]).await;
    let mut originator = node.connect(&token("u2", "acme", &["1"])).await;
    originator.subscribe(&["team:1"]).await;

    node.publish(
        json!({"tenant":"acme","rooms":["team:1"],"type":"admins.only","audience":["admin"]}),
    )
    .await;
    node.publish(
        json!({"tenant":"acme","rooms":["team:1"],"type":"not.for.u2","exclude_users":["u2"]}),
    )
    .await;
    let session = originator.welcome["session"].as_str().unwrap().to_owned();
    node.publish(json!({"tenant":"acme","rooms":["team:1"],"type":"not.for.session","exclude_sessions":[session]})).await;
    node.publish(json!({"tenant":"acme","rooms":["team:1"],"type":"everyone"}))
        .await;

    let types = |mut c: Client| async move {
        let mut seen = Vec::new();
        loop {
            let t = c.next_json().await["type"].as_str().unwrap().to_owned();
            let last = t == "everyone";
            seen.push(t);
            if last {
                return seen;
            }
        }
    };
    assert_eq!(
        types(admin).await,
        ["admins.only", "not.for.u2", "not.for.session", "everyone"]
    );
    assert_eq!(
        types(plain).await,
        ["not.for.u2", "not.for.session", "everyone"]
    );
    assert_eq!(types(originator).await, ["everyone"]);
}

/// A product backend's room-authorization endpoint: allows `task:t1` only.
async fn authz_server() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/authz", listener.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let body = loop {
                    let n = s.read(&mut chunk).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len: usize = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        if body.len() >= len {
                            break body.to_owned();
                        }
                    }
                };
                counter.fetch_add(1, Ordering::SeqCst);
                let req: Value = serde_json::from_str(&body).unwrap();
                let allow =
                    req["room"] == "task:t1" && req["tenant"] == "acme" && req["user"] == "u1";
                let answer = json!({"allow": allow}).to_string();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                    answer.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    (url, hits)
}

#[tokio::test]
async fn the_authorization_callback_allows_and_denies() {
    let (url, hits) = authz_server().await;
    let mut cfg = config();
    cfg.auth.authz_callback_url = Some(url);
    let node = TestNode::start(cfg).await;
    let mut c = node.connect(&token("u1", "acme", &[])).await;
    let reply = c.subscribe(&["task:t1", "task:t2"]).await;
    assert_eq!(reply["rooms"], json!(["task:t1"]));
    assert_eq!(
        reply["denied"],
        json!([{"room":"task:t2","code":"AUTHORIZATION_FAILED"}])
    );
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    node.publish(json!({"tenant":"acme","rooms":["task:t2"],"type":"hidden"}))
        .await;
    node.publish(json!({"tenant":"acme","rooms":["task:t1"],"type":"shown"}))
        .await;
    assert_eq!(c.next_json().await["type"], "shown");
    // Cached: a second session asking again does not reach the backend.
    let mut again = node.connect(&token("u1", "acme", &[])).await;
    again.subscribe(&["task:t1"]).await;
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn publish_api_refuses_bad_requests_clearly() {
    let mut cfg = config();
    cfg.publish.max_body_bytes = 2048;
    let node = TestNode::start(cfg).await;
    let addr = node.addr;
    let ev = json!({"tenant":"acme","rooms":["team:1"],"type":"x"});
    let cases: Vec<(&str, Option<String>, String, u16, &str)> = vec![
        (
            "no credentials",
            None,
            ev.to_string(),
            401,
            "AUTHENTICATION_FAILED",
        ),
        (
            "bad credentials",
            Some("nope".into()),
            ev.to_string(),
            401,
            "AUTHENTICATION_FAILED",
        ),
        (
            "unknown field",
            Some(API_KEY.into()),
            json!({"tenant":"acme","rooms":["team:1"],"type":"x","colour":1}).to_string(),
            400,
            "INVALID_MESSAGE",
        ),
        (
            "bad room",
            Some(API_KEY.into()),
            json!({"tenant":"acme","rooms":["Team 1"],"type":"x"}).to_string(),
            400,
            "INVALID_MESSAGE",
        ),
        (
            "no rooms",
            Some(API_KEY.into()),
            json!({"tenant":"acme","rooms":[],"type":"x"}).to_string(),
            400,
            "INVALID_MESSAGE",
        ),
        (
            "api key without tenant",
            Some(API_KEY.into()),
            json!({"rooms":["team:1"],"type":"x"}).to_string(),
            400,
            "INVALID_MESSAGE",
        ),
        (
            "not json",
            Some(API_KEY.into()),
            "{".into(),
            400,
            "INVALID_MESSAGE",
        ),
        (
            "oversized",
            Some(API_KEY.into()),
            json!({"tenant":"acme","rooms":["team:1"],"type":"x","data":"y".repeat(4096)})
                .to_string(),
            413,
            "MESSAGE_TOO_LARGE",
        ),
        (
            "token without publisher role",
            Some(token("svc", "acme", &[])),
            ev.to_string(),
            403,
            "AUTHORIZATION_FAILED",
        ),
        (
            "publisher token naming another tenant",
            Some(token_with(|c| c.roles = vec!["publisher".into()])),
            json!({"tenant":"globex","rooms":["team:1"],"type":"x"}).to_string(),
            403,
            "AUTHORIZATION_FAILED",
        ),
    ];
    for (name, bearer, body, status, code) in cases {
        let (got, resp) = http_post(addr, "/v1/publish", bearer.as_deref(), &body).await;
        assert_eq!(got, status, "{name}: {resp}");
        assert_eq!(resp["code"], code, "{name}: {resp}");
        assert!(
            resp["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}"
        );
    }
    // A publisher token publishes into its own tenant without naming it.
    let mut c = node.connect(&token("u1", "acme", &["1"])).await;
    c.subscribe(&["team:1"]).await;
    let publisher = token_with(|c| c.roles = vec!["publisher".into()]);
    let (status, resp) = http_post(
        addr,
        "/v1/publish",
        Some(&publisher),
        &json!({"rooms":["team:1"],"type":"from.token"}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(c.next_json().await["type"], "from.token");
}

#[tokio::test]
async fn health_readiness_and_metrics_endpoints() {
    let node = TestNode::start(config()).await;
    assert_eq!(
        http_request(node.addr, "GET", "/healthz", &[], "").await.0,
        200
    );
    assert_eq!(
        http_request(node.addr, "GET", "/readyz", &[], "").await.0,
        200
    );
    let mut c = node.connect(&token("u1", "acme", &["1"])).await;
    c.subscribe(&["team:1"]).await;
    node.publish(json!({"tenant":"acme","rooms":["team:1"],"type":"m"}))
        .await;
    c.next_json().await;
    let (status, metrics) = http_request(node.addr, "GET", "/metrics", &[], "").await;
    assert_eq!(status, 200);
    for name in [
        "roomcast_connections{transport=\"ws\"}",
        "roomcast_subscriptions",
        "roomcast_rooms",
        "roomcast_events_in_total",
        "roomcast_deliveries_total",
        "roomcast_publish_to_deliver_seconds_bucket",
        "roomcast_events_published_total",
    ] {
        assert!(metrics.contains(name), "/metrics lacks {name}");
    }
    let (status, body) = http_request(node.addr, "GET", "/nope", &[], "").await;
    assert_eq!(status, 404, "{body}");
}

#[tokio::test]
async fn draining_closes_sockets_with_1001() {
    let node = TestNode::start(config()).await;
    let mut a = node.connect(&token("u1", "acme", &[])).await;
    let mut b = node.connect(&token("u2", "acme", &[])).await;
    let stopping = tokio::spawn(node.stop());
    assert_eq!(a.expect_close().await.0, 1001);
    assert_eq!(b.expect_close().await.0, 1001);
    stopping.await.unwrap();
}

/// A raw HTTP exchange: the whole response, head included.
async fn raw_post(addr: std::net::SocketAddr, body: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST /v1/publish HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {API_KEY}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(PATIENCE, s.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&raw).to_string()
}

#[tokio::test]
async fn publishers_are_pushed_back_when_too_many_publishes_are_in_flight() {
    let mut cfg = config();
    cfg.publish.max_in_flight = 1;
    let node = TestNode::start(cfg).await;
    // A publish whose body never completes holds the only slot.
    let mut stalled = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let head = format!(
        "POST /v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\nContent-Length: 100\r\n\r\n{{"
    );
    stalled.write_all(head.as_bytes()).await.unwrap();
    eventually("the stalled publish is in flight", || {
        node.node.publishes_in_flight() == 1
    })
    .await;
    let response = raw_post(
        node.addr,
        &json!({"tenant":"acme","rooms":["team:1"],"type":"x"}).to_string(),
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 429"), "{response}");
    assert!(
        response.to_ascii_lowercase().contains("retry-after: 1"),
        "{response}"
    );
    assert!(response.contains("RATE_LIMIT_EXCEEDED"), "{response}");
    drop(stalled);
    eventually("the slot frees", || node.node.publishes_in_flight() == 0).await;
    let (status, _) = node
        .publish(json!({"tenant":"acme","rooms":["team:1"],"type":"ok"}))
        .await;
    assert_eq!(
        status, 200,
        "publishing resumes once the stalled one is gone"
    );
}

#[tokio::test]
async fn publishers_get_503_while_this_node_delivers_late() {
    let node = TestNode::start(config()).await;
    let mut c = node.connect(&token("u1", "acme", &["1"])).await;
    c.subscribe(&["team:1"]).await;
    // An event whose broker id says it was published long ago: fanning it
    // out now means deliveries run late.
    let (status, _) = node
        .publish(json!({"tenant":"acme","rooms":["team:1"],"type":"late","id":"1-0"}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(c.next_json().await["type"], "late");
    let response = raw_post(
        node.addr,
        &json!({"tenant":"acme","rooms":["team:1"],"type":"x"}).to_string(),
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    assert!(
        response.to_ascii_lowercase().contains("retry-after: 1"),
        "{response}"
    );
    assert!(response.contains("behind"), "{response}");
}
