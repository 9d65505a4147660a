//! Seed 004 (`/api/roadmap/ws`): the document's own client class in headless
//! Chromium against two nodes on a real Redis (e2e/seed004.mjs), plus the
//! session, heartbeat and cap policies with a plain WebSocket client.

mod support;

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use roomcast_auth::{mint_hs256, Expiry, MintClaims};
use roomcast_edge::Config;
use roomcast_testkit::{unique_prefix, RedisServer};
use serde_json::{json, Value};
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const COOKIE: &str = "better-auth.session_token";
/// The seed has no tenants: sessions and publishers use the configured default.
const ROADMAP_TENANT: &str = "default";

/// A session cookie: a JWT without a tenant claim, as a product would issue.
fn session(user: &str, roles: &[&str], expiry: Expiry) -> String {
    let mut c = MintClaims::new(user, ROADMAP_TENANT);
    c.tenant = None;
    c.roles = roles.iter().map(|r| r.to_string()).collect();
    c.expiry = expiry;
    mint_hs256(SECRET.as_bytes(), &c)
}

fn cookie(user: &str, roles: &[&str]) -> String {
    session(user, roles, Expiry::In(Duration::from_secs(3600)))
}

fn node_config(redis: &RedisServer, prefix: &str) -> Config {
    let mut c = config(Backend::Standalone(redis.url()), prefix);
    c.dialects.seed004.max_subscriptions = 3;
    c
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens the roadmap socket with `cookie_value`; `Err(status)` when refused.
async fn open(addr: std::net::SocketAddr, cookie_value: Option<&str>) -> Result<Ws, u16> {
    let mut req = format!("ws://{addr}/api/roadmap/ws")
        .into_client_request()
        .unwrap();
    if let Some(v) = cookie_value {
        req.headers_mut().insert(
            "Cookie",
            format!("theme=dark; {COOKIE}={v}").parse().unwrap(),
        );
    }
    match tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(req))
        .await
        .expect("an answer in time")
    {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("unexpected failure: {e}"),
    }
}

/// The next text message as JSON, or the close code when the socket closes.
async fn next(ws: &mut Ws) -> Result<Value, Option<u16>> {
    loop {
        let m = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("a message or the end in time");
        match m {
            Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(t.as_str()).unwrap()),
            Some(Ok(Message::Close(f))) => return Err(f.map(|f| u16::from(f.code))),
            None | Some(Err(_)) => return Err(None),
            Some(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn document_client_class_in_chromium() {
    let redis = RedisServer::start().await;
    let prefix = unique_prefix();
    let node_a = TestNode::start(node_config(&redis, &prefix)).await;
    let node_b = TestNode::start(node_config(&redis, &prefix)).await;
    let env = [
        ("NODE_A", node_a.addr.to_string()),
        ("NODE_B", node_b.addr.to_string()),
        ("COOKIE_NAME", COOKIE.to_owned()),
        ("COOKIE_VOTER", cookie("u-voter", &[])),
        ("COOKIE_ADMIN", cookie("u-admin", &["admin"])),
        ("COOKIE_VIEWER", cookie("u-viewer", &["user"])),
        ("API_KEY", API_KEY.to_owned()),
        ("TENANT", ROADMAP_TENANT.to_owned()),
    ];
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg("e2e/seed004.mjs")
        .current_dir(repo_root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in &env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("node is installed");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stderr = child.stderr.take().unwrap();
    let stderr = tokio::spawn(async move {
        let mut buf = String::new();
        let _ = stderr.read_to_string(&mut buf).await;
        buf
    });
    // Follows the script's output, stopping node A when it asks.
    let mut node_a = Some(node_a);
    let mut out = Vec::new();
    let run = async {
        while let Ok(Some(line)) = stdout.next_line().await {
            if line == "CONTROL stop-a" {
                node_a.take().expect("node A runs").stop().await;
                stdin.write_all(b"stopped-a\n").await.unwrap();
            }
            out.push(line);
        }
        child.wait().await.unwrap()
    };
    let status = tokio::time::timeout(Duration::from_secs(90), run).await;
    let _ = child.kill().await;
    let text = format!(
        "--- stdout\n{}\n--- stderr\n{}",
        out.join("\n"),
        stderr.await.unwrap()
    );
    match status {
        Ok(s) => assert!(s.success(), "seed004.mjs failed: {s}\n{text}"),
        Err(_) => panic!("seed004.mjs did not finish in time\n{text}"),
    }
    println!("{text}");
    node_b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_bad_sessions_and_past_the_connection_cap() {
    let redis = RedisServer::start().await;
    let mut c = node_config(&redis, &unique_prefix());
    c.dialects.seed004.max_connections = 2;
    let node = TestNode::start(c).await;
    assert_eq!(open(node.addr, None).await.err(), Some(401), "no cookie");
    assert_eq!(
        open(node.addr, Some("x.y.z")).await.err(),
        Some(401),
        "bad cookie"
    );
    let expired = session("u1", &[], Expiry::At(1));
    assert_eq!(
        open(node.addr, Some(&expired)).await.err(),
        Some(401),
        "expired"
    );
    let mut a = open(node.addr, Some(&cookie("u1", &[]))).await.unwrap();
    let _b = open(node.addr, Some(&cookie("u2", &[]))).await.unwrap();
    assert_eq!(
        open(node.addr, Some(&cookie("u3", &[]))).await.err(),
        Some(503),
        "past the dialect's connection cap, refused before the upgrade"
    );
    // Bad input gets the document's error and the session lives on.
    a.send(Message::text("{\"type\":\"HELLO\"}")).await.unwrap();
    assert_eq!(next(&mut a).await.unwrap()["code"], "INVALID_MESSAGE");
    a.send(Message::text(
        "{\"type\":\"SUBSCRIBE\",\"featureIds\":[\"a b\"]}",
    ))
    .await
    .unwrap();
    assert_eq!(next(&mut a).await.unwrap()["code"], "INVALID_MESSAGE");
    a.close(None).await.unwrap();
    drop(a);
    eventually("a slot is free again", PATIENCE, || async {
        open(node.addr, Some(&cookie("u4", &[]))).await.is_ok()
    })
    .await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_and_closes_when_no_pong_follows() {
    let redis = RedisServer::start().await;
    let mut c = node_config(&redis, &unique_prefix());
    c.dialects.seed004.ping_interval = Duration::from_millis(200);
    c.dialects.seed004.pong_timeout = Duration::from_millis(300);
    let node = TestNode::start(c).await;
    let mut ws = open(node.addr, Some(&cookie("u1", &[]))).await.unwrap();
    for _ in 0..3 {
        assert_eq!(next(&mut ws).await.unwrap(), json!({"type":"PING"}));
        ws.send(Message::text("{\"type\":\"PONG\"}")).await.unwrap();
    }
    // Silence: the next PING goes unanswered.
    assert_eq!(next(&mut ws).await.unwrap(), json!({"type":"PING"}));
    loop {
        match next(&mut ws).await {
            Ok(v) => assert_eq!(v, json!({"type":"PING"})),
            Err(code) => {
                assert_eq!(code, Some(4000), "closed for the missing PONG");
                break;
            }
        }
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_session_expiry_sends_session_expired_then_4401() {
    let redis = RedisServer::start().await;
    let node = TestNode::start(node_config(&redis, &unique_prefix())).await;
    let short = session("u1", &[], Expiry::In(Duration::from_secs(2)));
    let mut ws = open(node.addr, Some(&short)).await.unwrap();
    let err = next(&mut ws).await.unwrap();
    assert_eq!(
        (err["type"].as_str(), err["code"].as_str()),
        (Some("ERROR"), Some("SESSION_EXPIRED")),
        "{err}"
    );
    assert_eq!(next(&mut ws).await.err(), Some(Some(4401)));
    node.stop().await;
}

/// A session introspection endpoint: `GET` with the cookie; valid while
/// `valid` holds, then `null` (no session).
async fn introspection_server(valid: Arc<AtomicBool>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let valid = valid.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut n = 0;
                while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(m) => n += m,
                    }
                }
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                let has_cookie = head.contains(&format!("{COOKIE}=opaque-session-1"));
                let body = if has_cookie && valid.load(Ordering::SeqCst) {
                    json!({"session": {"id": "s1"}, "user": {"id": "u-intro", "role": "admin"}})
                        .to_string()
                } else {
                    "null".to_owned()
                };
                let reply = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(reply.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspected_session_is_revalidated_and_closed_when_invalid() {
    let redis = RedisServer::start().await;
    let valid = Arc::new(AtomicBool::new(true));
    let intro = introspection_server(valid.clone()).await;
    let mut c = node_config(&redis, &unique_prefix());
    let s = &mut c.dialects.seed004;
    s.session_check = roomcast_edge::dialects::seed004::SessionCheckKind::Introspect;
    s.introspection_url = Some(format!("http://{intro}/api/auth/get-session"));
    s.revalidate_interval = Duration::from_millis(300);
    let node = TestNode::start(c).await;
    assert_eq!(open(node.addr, Some("someone-else")).await.err(), Some(401));
    let mut ws = open(node.addr, Some("opaque-session-1")).await.unwrap();
    // The introspected role counts: admins get FEATURE_CREATED.
    let feature = json!({"id": "f1", "title": "t"});
    let body = json!({"tenant": ROADMAP_TENANT, "rooms": ["roadmap:all"],
        "type": "FEATURE_CREATED", "data": {"feature": feature}});
    // The session joins roadmap:all just after the upgrade: publish until it
    // receives (later copies are ignored below).
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let created = loop {
        assert_eq!(node.publish(&body).await.0, 200);
        if let Ok(Some(Ok(Message::Text(t)))) =
            tokio::time::timeout(Duration::from_millis(200), ws.next()).await
        {
            break serde_json::from_str::<Value>(t.as_str()).unwrap();
        }
        assert!(tokio::time::Instant::now() < deadline, "never received");
    };
    assert_eq!(created["type"], "FEATURE_CREATED", "{created}");
    assert_eq!(created["feature"], feature);
    // Still valid after a few re-validations: nothing else arrives (PINGs
    // are 30 s apart). Then the backend drops the session.
    valid.store(false, Ordering::SeqCst);
    let mut seen = Vec::new();
    let closed = loop {
        match next(&mut ws).await {
            Ok(v) => seen.push(v),
            Err(code) => break code,
        }
    };
    let codes: Vec<&str> = seen.iter().filter_map(|v| v["code"].as_str()).collect();
    assert!(codes.ends_with(&["SESSION_EXPIRED"]), "{seen:?}");
    assert_eq!(closed, Some(4401));
    node.stop().await;
}

/// Publishes `votes` (feature, count) VOTE_UPDATEs `every` apart, by u-voter,
/// to a session of another user opened on `node`, and returns the
/// VOTE_UPDATE frames that session receives until the last count of each
/// feature has arrived.
async fn votes_seen(node: &TestNode, votes: &[(&str, u64)], every: Duration) -> Vec<Value> {
    let mut ws = open(node.addr, Some(&cookie("u-watcher", &[])))
        .await
        .unwrap();
    // The session joins roadmap:all just after the upgrade: publish a
    // FEATURE_UPDATE until one arrives.
    let ready = json!({"tenant": ROADMAP_TENANT, "rooms": ["roadmap:all"],
        "type": "FEATURE_UPDATE", "data": {"featureId": "f0", "changes": {"title": "t"}}});
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        assert_eq!(node.publish(&ready).await.0, 200);
        if let Ok(Some(Ok(Message::Text(_)))) =
            tokio::time::timeout(Duration::from_millis(200), ws.next()).await
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never received");
    }
    let mut tick = tokio::time::interval(every);
    for (feature, count) in votes {
        tick.tick().await;
        let body = json!({"tenant": ROADMAP_TENANT,
            "rooms": ["roadmap:all", format!("feature:{feature}")],
            "type": "VOTE_UPDATE", "exclude_users": ["u-voter"],
            "data": {"featureId": feature, "voteCount": count,
                     "voterId": "u-voter", "action": "add"}});
        assert_eq!(node.publish(&body).await.0, 200);
    }
    let mut last: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    for (feature, count) in votes {
        last.insert(feature, *count);
    }
    let mut seen = Vec::new();
    while !last.is_empty() {
        let v = next(&mut ws).await.expect("the socket stays open");
        if v["type"] != "VOTE_UPDATE" {
            continue;
        }
        let feature = v["featureId"].as_str().unwrap();
        if last.get(feature).copied() == v["voteCount"].as_u64() {
            last.remove(feature);
        }
        seen.push(v);
    }
    seen
}

/// Alternating votes on f1 and f2, counts 1, 2, ... per feature.
fn alternating(n: u64) -> Vec<(&'static str, u64)> {
    (0..n)
        .map(|i| (if i % 2 == 0 { "f1" } else { "f2" }, i / 2 + 1))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn votes_batch_only_when_broadcasts_near_the_global_cap() {
    let redis = RedisServer::start().await;
    let every = Duration::from_millis(250);
    let votes = alternating(12);
    // 4 broadcasts per second, each feature's votes 500 ms apart: far over
    // the 100 ms vote window, and under the default cap (100/s).
    let node = TestNode::start(node_config(&redis, &unique_prefix())).await;
    let seen = votes_seen(&node, &votes, every).await;
    let counts: Vec<(&str, u64)> = seen
        .iter()
        .map(|v| {
            (
                v["featureId"].as_str().unwrap(),
                v["voteCount"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        counts, votes,
        "under the cap every vote is delivered, in order"
    );
    node.stop().await;

    // The same traffic over a cap of 3/s (batching from 2.4/s): votes of a
    // feature coalesce over the 1 s batch window, the last count winning.
    let mut c = node_config(&redis, &unique_prefix());
    c.dialects.seed004.broadcast_cap = 3;
    let node = TestNode::start(c).await;
    let seen = votes_seen(&node, &votes, every).await;
    assert!(
        seen.len() < votes.len(),
        "batched: {} frames for {} votes: {seen:?}",
        seen.len(),
        votes.len()
    );
    for feature in ["f1", "f2"] {
        let counts: Vec<u64> = seen
            .iter()
            .filter(|v| v["featureId"] == feature)
            .map(|v| v["voteCount"].as_u64().unwrap())
            .collect();
        assert!(
            counts.windows(2).all(|w| w[0] < w[1]),
            "{feature}: {counts:?}"
        );
        assert_eq!(counts.last(), Some(&6), "{feature}'s last count arrives");
    }
    node.stop().await;
}
