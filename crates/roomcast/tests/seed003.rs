//! Seed 003 (Socket.IO v4 on `/socket.io/`, namespace `/ws/app`): two nodes
//! on a real Redis, a real HTTP authorization callback, and the official
//! socket.io-client in e2e/seed003.mjs (polling + upgrade, websocket only,
//! polling only).

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use roomcast_auth::{mint_hs256, Expiry, MintClaims};
use roomcast_broker::PresenceEntry;
use roomcast_protocol::RoomKey;
use roomcast_testkit::{unique_prefix, RedisServer};
use serde_json::{json, Value};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

/// An HTTP authorization callback that allows `conversation:c1` to u1 and u2.
async fn callback() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Some(body) = read_request(&mut s).await else {
                    return;
                };
                let q: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let allow =
                    q["room"] == "conversation:c1" && (q["user"] == "u1" || q["user"] == "u2");
                let body = format!("{{\"allow\":{allow}}}");
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

/// A token as the product mints it: no tenant claim (the dialect's default).
fn token(user: &str, expiry: Expiry) -> String {
    let mut c = MintClaims::new(user, TENANT);
    c.tenant = None;
    c.expiry = expiry;
    mint_hs256(SECRET.as_bytes(), &c)
}

async fn two_nodes(redis: &RedisServer) -> (TestNode, TestNode) {
    let cb = callback().await;
    let prefix = unique_prefix();
    let cfg = || {
        let mut c = config(Backend::Standalone(redis.url()), &prefix);
        c.auth.authz_callback_url = Some(format!("http://{cb}/authorize"));
        c.dialects.seed003.tenant = TENANT.into();
        c
    };
    (TestNode::start(cfg()).await, TestNode::start(cfg()).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_io_client_over_polling_upgrade_and_websocket_on_two_nodes() {
    let redis = RedisServer::start().await;
    let (a, b) = two_nodes(&redis).await;
    let past = roomcast_auth::unix_now() - 60;
    let env = [
        ("NODE_A", format!("http://{}", a.addr)),
        ("NODE_B", format!("http://{}", b.addr)),
        (
            "TOKEN_U1",
            token("u1", Expiry::In(Duration::from_secs(3600))),
        ),
        (
            "TOKEN_U2",
            token("u2", Expiry::In(Duration::from_secs(3600))),
        ),
        (
            "TOKEN_U3",
            token("u3", Expiry::In(Duration::from_secs(3600))),
        ),
        ("TOKEN_EXPIRED", token("u1", Expiry::At(past))),
        ("API_KEY", API_KEY.to_owned()),
        ("TENANT", TENANT.to_owned()),
    ];
    run_e2e("node", "seed003.mjs", &env, Duration::from_secs(60)).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_io_handshake_and_errors_over_raw_http() {
    let redis = RedisServer::start().await;
    let (a, b) = two_nodes(&redis).await;
    let (status, body) = http_get(a.addr, "/socket.io/?EIO=4&transport=polling").await;
    assert_eq!(status, 200, "{body}");
    let open: Value =
        serde_json::from_str(body.strip_prefix('0').expect("an open packet")).unwrap();
    assert_eq!(open["upgrades"], serde_json::json!(["websocket"]));
    assert_eq!(open["pingInterval"], 25000);
    assert_eq!(open["pingTimeout"], 20000);
    assert_eq!(open["maxPayload"], 5120);
    let sid = open["sid"].as_str().unwrap();
    // Another node does not hold the sid.
    let (status, body) = http_get(
        b.addr,
        &format!("/socket.io/?EIO=4&transport=polling&sid={sid}"),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        serde_json::json!({"code": 1, "message": "Session ID unknown"})
    );
    // A CONNECT without a token, then the poll that carries the answer.
    let path = format!("/socket.io/?EIO=4&transport=polling&sid={sid}");
    let (status, body) = http_request(
        a.addr,
        "POST",
        &path,
        &[("Content-Type", "text/plain")],
        "40/ws/app,{}",
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    let (status, body) = http_get(a.addr, &path).await;
    assert_eq!(status, 200);
    assert!(
        body.starts_with("44/ws/app,") && body.contains("socket_error:unauthorized"),
        "{body}"
    );
    // Bad version, unknown transport, an oversized POST.
    assert_eq!(
        http_get(a.addr, "/socket.io/?EIO=3&transport=polling")
            .await
            .0,
        400
    );
    assert_eq!(
        http_get(a.addr, "/socket.io/?EIO=4&transport=carrier-pigeon")
            .await
            .0,
        400
    );
    let big = format!("42/ws/app,[\"x\",\"{}\"]", "y".repeat(6000));
    let (status, _) = http_request(a.addr, "POST", &path, &[], &big).await;
    assert_eq!(status, 413);
    eventually("the oversized session is gone", PATIENCE, || async {
        http_get(a.addr, &path).await.0 == 400
    })
    .await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_never_pongs_is_closed_after_ping_timeout() {
    let redis = RedisServer::start().await;
    let mut c = config(Backend::Standalone(redis.url()), &unique_prefix());
    c.dialects.seed003.ping_interval = Duration::from_millis(200);
    c.dialects.seed003.ping_timeout = Duration::from_millis(200);
    let node = TestNode::start(c).await;
    let (_, body) = http_get(node.addr, "/socket.io/?EIO=4&transport=polling").await;
    let open: Value = serde_json::from_str(body.strip_prefix('0').unwrap()).unwrap();
    let path = format!(
        "/socket.io/?EIO=4&transport=polling&sid={}",
        open["sid"].as_str().unwrap()
    );
    // The long poll returns the server's ping; it goes unanswered.
    let (status, body) = http_get(node.addr, &path).await;
    assert_eq!((status, body.as_str()), (200, "2"));
    // The next poll ends with the close packet, then the sid is gone.
    let (status, body) = http_get(node.addr, &path).await;
    assert_eq!(
        (status, body.as_str()),
        (200, "1"),
        "closed after pingTimeout"
    );
    assert_eq!(http_get(node.addr, &path).await.0, 400);
    eventually("the connection slot is released", PATIENCE, || async {
        node.node.connection_count() == 0
    })
    .await;
    node.stop().await;
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next text frame (an Engine.IO packet).
async fn next_text(ws: &mut Ws) -> String {
    loop {
        match tokio::time::timeout(PATIENCE, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return t.as_str().to_owned(),
            Ok(Some(Ok(_))) => continue,
            other => panic!("no packet in time: {other:?}"),
        }
    }
}

/// A raw Socket.IO client: Engine.IO over a websocket, then the namespace
/// CONNECT with the token.
async fn socket_io(addr: SocketAddr, token: &str) -> Ws {
    let url = format!("ws://{addr}/socket.io/?EIO=4&transport=websocket");
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert!(next_text(&mut ws).await.starts_with('0'), "the open packet");
    let connect = format!("40/ws/app,{}", json!({ "token": token }));
    ws.send(Message::text(connect)).await.unwrap();
    let answer = next_text(&mut ws).await;
    assert!(answer.starts_with("40/ws/app,"), "{answer}");
    ws
}

/// The first Socket.IO event matching `pred`, answering the server's pings.
async fn event_matching(ws: &mut Ws, what: &str, pred: impl Fn(&str, &Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut seen = Vec::new();
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not seen; seen {seen:?}"
        );
        let packet = next_text(ws).await;
        if packet == "2" {
            ws.send(Message::text("3")).await.unwrap();
            continue;
        }
        if let Some(args) = packet.strip_prefix("42/ws/app,") {
            let v: Value = serde_json::from_str(args).unwrap();
            if pred(v[0].as_str().unwrap_or_default(), &v[1]) {
                return v[1].clone();
            }
        }
        seen.push(packet);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_reports_the_ip_and_a_lapsed_user_goes_offline() {
    let redis = RedisServer::start().await;
    let mut c = config(Backend::Standalone(redis.url()), &unique_prefix());
    c.dialects.seed003.tenant = TENANT.into();
    c.presence.sweep_interval = Duration::from_millis(100);
    let node = TestNode::start(c).await;
    let mut ws = socket_io(
        node.addr,
        &token("u1", Expiry::In(Duration::from_secs(3600))),
    )
    .await;
    let own = event_matching(&mut ws, "u1's own snapshot", |n, d| {
        n == "presence:update" && d["userId"] == "u1"
    })
    .await;
    assert_eq!(own["isOnline"], true, "{own}");
    assert_eq!(own["sockets"][0]["ip"], "127.0.0.1", "the TCP peer: {own}");

    // What a crashed node leaves behind: u9's entry, never refreshed again.
    // The sweep drops it once it lapses and announces `presence.left`, which
    // reaches every socket of the namespace as u9's offline snapshot.
    let store = node.node.broker().presence().expect("redis keeps presence");
    let key = RoomKey::new(TENANT.parse().unwrap(), "user:u9".parse().unwrap());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let entry = PresenceEntry {
        session: "s-on-a-dead-node".parse().unwrap(),
        user: "u9".parse().unwrap(),
        node: "n-crashed".parse().unwrap(),
        connected_at: now,
        last_seen: now,
        user_agent: None,
        ip: Some("10.0.0.9".into()),
    };
    store
        .upsert(&key, entry, Duration::from_millis(300), now)
        .await
        .unwrap();
    let gone = event_matching(&mut ws, "u9's offline snapshot", |n, d| {
        n == "presence:update" && d["userId"] == "u9"
    })
    .await;
    assert_eq!(gone["isOnline"], false, "{gone}");
    assert_eq!(gone["sockets"], json!([]), "{gone}");
    assert!(
        gone["lastSeen"].as_u64().unwrap() >= now + 300,
        "lastSeen is the sweep's time: {gone}"
    );
    node.stop().await;
}
