//! Seed 000 on two nodes over one real Redis: a browser (headless Chromium,
//! e2e/seed000.mjs) with its own WebSocket, EventSource and fetch, and a
//! stakeholder's `board:readonly` session, against events published through
//! the contract.

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use roomcast_auth::{mint_hs256, MintClaims};
use roomcast_testkit::{unique_prefix, RedisServer};
use serde_json::{json, Value};
use support::*;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// The seed has no tenants: tokens carry none and land in the default.
const SEED_TENANT: &str = "default";

fn seed_token(user: &str, roles: &[&str]) -> String {
    let mut c = MintClaims::new(user, SEED_TENANT);
    c.tenant = None;
    c.roles = roles.iter().map(|r| r.to_string()).collect();
    mint_hs256(SECRET.as_bytes(), &c)
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(addr: std::net::SocketAddr, cookie: Option<&str>) -> Result<Ws, u16> {
    let mut req = format!("ws://{addr}/api/realtime")
        .into_client_request()
        .unwrap();
    if let Some(c) = cookie {
        req.headers_mut()
            .insert("Cookie", format!("token={c}").parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("connect: {e}"),
    }
}

async fn next(ws: &mut Ws) -> Value {
    loop {
        let m = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("a message in time")
            .expect("socket open")
            .unwrap();
        match m {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_websocket_eventsource_and_polling_get_exactly_the_published_envelopes() {
    let redis = RedisServer::start().await;
    let prefix = unique_prefix();
    let a = TestNode::start(config(Backend::Standalone(redis.url()), &prefix)).await;
    let b = TestNode::start(config(Backend::Standalone(redis.url()), &prefix)).await;
    let env = [
        ("NODE_A", a.addr.to_string()),
        ("NODE_B", b.addr.to_string()),
        ("API_KEY", API_KEY.to_owned()),
        ("TENANT", SEED_TENANT.to_owned()),
        ("TOKEN_W123", seed_token("w123", &[])),
    ];
    run_e2e("node", "seed000.mjs", &env, Duration::from_secs(60)).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stakeholders_read_the_board_and_workers_only_their_own_channel() {
    let redis = RedisServer::start().await;
    let prefix = unique_prefix();
    let a = TestNode::start(config(Backend::Standalone(redis.url()), &prefix)).await;
    let b = TestNode::start(config(Backend::Standalone(redis.url()), &prefix)).await;

    assert_eq!(
        connect(a.addr, None).await.err(),
        Some(401),
        "no cookie, no socket"
    );
    assert_eq!(connect(a.addr, Some("not-a-jwt")).await.err(), Some(401));

    let mut stake = connect(b.addr, Some(&seed_token("s1", &["stakeholder"])))
        .await
        .unwrap();
    send(
        &mut stake,
        json!({"action":"subscribe","channels":["board:readonly"]}),
    )
    .await;
    assert_eq!(
        next(&mut stake).await["payload"]["channels"],
        json!(["board:readonly"])
    );

    let mut worker = connect(a.addr, Some(&seed_token("w1", &[]))).await.unwrap();
    send(
        &mut worker,
        json!({"action":"subscribe","channels":["board:readonly","worker:w2","nope:x","worker:w1"]}),
    )
    .await;
    let mut codes = Vec::new();
    for _ in 0..3 {
        let e = next(&mut worker).await;
        assert_eq!(e["type"], "error", "{e}");
        codes.push((
            e["payload"]["code"].as_str().unwrap().to_owned(),
            e["payload"]["channel"].as_str().unwrap().to_owned(),
        ));
    }
    assert_eq!(
        codes,
        [
            ("FORBIDDEN".into(), "board:readonly".into()),
            ("FORBIDDEN".into(), "worker:w2".into()),
            ("INVALID_CHANNEL".into(), "nope:x".into()),
        ]
    );
    assert_eq!(
        next(&mut worker).await["payload"]["channels"],
        json!(["worker:w1"])
    );
    send(
        &mut worker,
        json!({"action":"subscribe","channels":"board:zoo"}),
    )
    .await;
    assert_eq!(next(&mut worker).await["payload"]["code"], "BAD_MESSAGE");

    for (rooms, kind) in [
        (json!(["worker:w2"]), "task.updated"),
        (json!(["board:zoo"]), "board.refreshHint"),
        (json!(["worker:w1"]), "worker.statsUpdated"),
    ] {
        let body = json!({"tenant": SEED_TENANT, "rooms": rooms, "type": kind, "data": {"k": kind}, "ts": 1_764_929_700_000u64});
        let (status, reply) = a.publish(&body).await;
        assert_eq!(status, 200, "{reply}");
    }
    let e = next(&mut stake).await;
    assert_eq!(
        e,
        json!({"type":"board.refreshHint","timestamp":"2025-12-05T10:15:00.000Z","payload":{"k":"board.refreshHint"}})
    );
    let e = next(&mut worker).await;
    assert_eq!(
        e["type"], "worker.statsUpdated",
        "nothing of worker:w2 before it: {e}"
    );

    // Unsubscribe stops delivery; the ack says so.
    send(
        &mut worker,
        json!({"action":"unsubscribe","channels":["worker:w1"]}),
    )
    .await;
    assert_eq!(next(&mut worker).await["type"], "unsubscribed");

    // /api/events: 401 without a token, 400 for a bad `since`, in the envelope.
    let (status, body) = http_get(b.addr, "/api/events?since=2025-12-05T10:00:00Z").await;
    assert_eq!(status, 401, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["type"].as_str(), v["payload"]["code"].as_str()),
        (Some("error"), Some("UNAUTHENTICATED"))
    );
    let cookie = format!("token={}", seed_token("w1", &[]));
    let (status, body) = http_request(
        b.addr,
        "GET",
        "/api/events?since=soon",
        &[("Cookie", &cookie)],
        "",
    )
    .await;
    assert_eq!(status, 400, "{body}");
    a.stop().await;
    b.stop().await;
}
