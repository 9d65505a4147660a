//! Native protocol v1 end to end: a real node, real WebSocket clients, real
//! HTTP publishes.

mod common;

use common::*;
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

fn event_json(rooms: &[&str], kind: &str, data: Value) -> Value {
    json!({"tenant":"acme","rooms":rooms,"type":kind,"actor":"u2","data":data})
}

/// Publishes a sentinel into `room` and returns once `client` received it:
/// everything published before it to the client's rooms has been seen.
async fn fence(node: &TestNode, client: &mut Client, room: &str) -> Vec<Value> {
    let (status, _) = node
        .publish(event_json(&[room], "test.fence", json!({})))
        .await;
    assert_eq!(status, 200);
    let mut before = Vec::new();
    loop {
        let m = client.next_json().await;
        if m["type"] == "test.fence" {
            return before;
        }
        before.push(m);
    }
}

#[tokio::test]
async fn event_arrives_once_with_every_field_and_stops_after_unsubscribe() {
    let node = TestNode::start(config()).await;
    let mut c = node.connect(&token("u1", "acme", &["42"])).await;
    assert_eq!(c.welcome["user"], "u1");
    assert_eq!(c.welcome["tenant"], "acme");
    assert_eq!(c.welcome["node"], node.node.id().to_string());
    assert!(c.welcome["session"].as_str().unwrap().starts_with("s_"));

    let reply = c.subscribe(&["team:42", "user:u1"]).await;
    assert_eq!(reply["ref"], "s");
    assert_eq!(reply["rooms"], json!(["team:42", "user:u1"]));
    assert_eq!(reply["denied"], json!([]));

    let (status, body) = node
        .publish(json!({"tenant":"acme","rooms":["team:42"],"type":"task.updated","actor":"u2","version":7,"data":{"id":1}}))
        .await;
    assert_eq!(status, 200, "{body}");
    let id = body["ids"]["team:42"].as_str().unwrap().to_owned();
    let ev = c.next_json().await;
    let ts = ev["ts"].as_u64().unwrap();
    assert!(ts > 1_600_000_000_000);
    assert_eq!(
        ev,
        json!({"op":"event","room":"team:42","id":id,"type":"task.updated","ts":ts,"actor":"u2","version":7,"data":{"id":1}})
    );
    // Exactly once: the next thing after a fence is the fence itself.
    assert!(fence(&node, &mut c, "user:u1").await.is_empty());

    c.send(json!({"op":"unsubscribe","ref":"2","rooms":["team:42"]}))
        .await;
    assert_eq!(
        c.next_json().await,
        json!({"op":"unsubscribed","ref":"2","rooms":["team:42"]})
    );
    node.publish(event_json(&["team:42"], "task.updated", json!({"id":2})))
        .await;
    assert!(
        fence(&node, &mut c, "user:u1").await.is_empty(),
        "nothing after unsubscribe"
    );
    assert_eq!(
        node.node
            .hub()
            .member_count(&"acme".parse().unwrap(), &"team:42".parse().unwrap()),
        0
    );
}

#[tokio::test]
async fn an_event_naming_two_rooms_reaches_a_member_of_both_once() {
    let node = TestNode::start(config()).await;
    let mut both = node.connect(&token("u1", "acme", &["1", "2"])).await;
    both.subscribe(&["team:1", "team:2"]).await;
    let mut second_only = node.connect(&token("u2", "acme", &["2"])).await;
    second_only.subscribe(&["team:2"]).await;

    node.publish(event_json(&["team:2", "team:1"], "x.y", json!(1)))
        .await;
    let ev = both.next_json().await;
    assert_eq!(ev["type"], "x.y");
    assert!(
        fence(&node, &mut both, "team:1").await.is_empty(),
        "delivered once"
    );
    let ev = second_only.next_json().await;
    assert_eq!(
        (ev["type"].as_str(), ev["room"].as_str()),
        (Some("x.y"), Some("team:2"))
    );
}

#[tokio::test]
async fn unauthorized_and_cross_tenant_rooms_are_denied_and_never_delivered() {
    let node = TestNode::start(config()).await;
    let mut c = node.connect(&token("u1", "acme", &["42"])).await;
    let reply = c
        .subscribe(&["team:42", "team:43", "user:u9", "task:t1", "bad room"])
        .await;
    assert_eq!(reply["rooms"], json!(["team:42"]));
    assert_eq!(
        reply["denied"],
        json!([
            {"room":"team:43","code":"AUTHORIZATION_FAILED"},
            {"room":"user:u9","code":"AUTHORIZATION_FAILED"},
            {"room":"task:t1","code":"AUTHORIZATION_FAILED"},
            {"room":"bad room","code":"INVALID_ROOM"}
        ])
    );
    // Another tenant's team:42 is another room.
    let mut other = node.connect(&token("u1", "globex", &["42"])).await;
    other.subscribe(&["team:42"]).await;
    for room in ["team:43", "user:u9", "task:t1"] {
        node.publish(event_json(&[room], "secret", json!({}))).await;
    }
    node.publish(json!({"tenant":"globex","rooms":["team:42"],"type":"secret","data":{}}))
        .await;
    assert!(
        fence(&node, &mut c, "team:42").await.is_empty(),
        "nothing from denied rooms or other tenants"
    );
    let ev = other.next_json().await;
    assert_eq!(ev["type"], "secret", "globex's own event reaches globex");
}

#[tokio::test]
async fn explicit_room_grants_in_the_token_are_honoured() {
    let node = TestNode::start(config()).await;
    let t = token_with(|c| c.rooms = vec!["task:t1".into()]);
    let mut c = node.connect(&t).await;
    let reply = c.subscribe(&["task:t1"]).await;
    assert_eq!(reply["rooms"], json!(["task:t1"]));
}

#[tokio::test]
async fn every_bad_token_is_refused_with_401_before_the_upgrade() {
    let node = TestNode::start(config()).await;
    let url = node.ws_url();
    let wrong_secret = roomcast_auth::mint_hs256(
        b"another-secret-000000",
        &roomcast_auth::MintClaims::new("u1", "acme"),
    );
    let expired =
        token_with(|c| c.expiry = roomcast_auth::Expiry::At(roomcast_auth::unix_now() - 10));
    let no_exp = token_with(|c| c.expiry = roomcast_auth::Expiry::Never);
    // alg none: header {"alg":"none","typ":"JWT"}, no signature.
    use base64::Engine as _;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let exp = roomcast_auth::unix_now() + 3600;
    let claims = json!({"sub":"u1","tenant":"acme","exp":exp});
    let alg_none = format!(
        "{}.{}.",
        b64(&json!({"alg":"none","typ":"JWT"})),
        b64(&claims)
    );
    let hs384 = {
        let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS384),
            &claims,
            &key,
        )
        .unwrap()
    };
    let good = token("u1", "acme", &[]);
    let tampered = format!("{}x", &good[..good.len() - 1]);
    for (name, tok) in [
        ("garbage", "not-a-jwt".to_owned()),
        ("wrong secret", wrong_secret),
        ("expired", expired),
        ("no exp", no_exp),
        ("alg none", alg_none),
        ("other algorithm", hs384),
        ("tampered signature", tampered),
    ] {
        let refused = Client::connect_url(&url, &tok, None)
            .await
            .err()
            .unwrap_or_else(|| panic!("{name}: socket opened"));
        assert_eq!(refused.status, 401, "{name}");
        assert_eq!(
            refused.body["code"], "AUTHENTICATION_FAILED",
            "{name}: {:?}",
            refused.body
        );
        assert!(
            refused.body["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{name}"
        );
    }
    // No token at all.
    let req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        url.as_str(),
    )
    .unwrap();
    let refused = Client::connect_request(req, true)
        .await
        .err()
        .expect("refused");
    assert_eq!(refused.status, 401);
    // The query parameter and the cookie are accepted sources.
    let good = token("u1", "acme", &[]);
    let req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        format!("{url}?token={good}"),
    )
    .unwrap();
    assert!(Client::connect_request(req, true).await.is_ok());
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
        url.as_str(),
    )
    .unwrap();
    req.headers_mut().insert(
        "Cookie",
        format!("a=b; roomcast_token={good}").parse().unwrap(),
    );
    assert!(Client::connect_request(req, true).await.is_ok());
}

#[tokio::test]
async fn bad_input_gets_errors_while_other_clients_keep_receiving() {
    let mut cfg = config();
    cfg.limits.max_message_bytes = 1024;
    cfg.limits.max_rooms_per_session = 2;
    cfg.limits.rate_messages = 20;
    cfg.limits.rate_strikes = 2;
    let node = TestNode::start(cfg).await;
    let mut bystander = node.connect(&token("u0", "acme", &["1"])).await;
    bystander.subscribe(&["team:1"]).await;

    let mut c = node.connect(&token("u1", "acme", &["1", "2", "3"])).await;
    c.send_raw(Message::text("{not json")).await;
    let e = c.next_json().await;
    assert_eq!(
        (e["op"].as_str(), e["code"].as_str()),
        (Some("error"), Some("INVALID_MESSAGE"))
    );
    c.send(json!({"op":"dance","ref":"7"})).await;
    let e = c.next_json().await;
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_str()),
        (Some("INVALID_MESSAGE"), Some("7"))
    );
    assert!(e["message"].as_str().unwrap().contains("dance"), "{e}");
    c.send_raw(Message::binary(vec![1, 2, 3])).await;
    assert_eq!(c.next_json().await["code"], "INVALID_MESSAGE");

    let reply = c.subscribe(&["team:1", "team:2", "team:3"]).await;
    assert_eq!(reply["rooms"], json!(["team:1", "team:2"]));
    assert_eq!(
        reply["denied"],
        json!([{"room":"team:3","code":"SUBSCRIPTION_LIMIT"}])
    );

    node.publish(event_json(&["team:1"], "still.flowing", json!(1)))
        .await;
    assert_eq!(bystander.next_json().await["type"], "still.flowing");
    assert_eq!(c.next_json().await["type"], "still.flowing");

    // Oversized frame: MESSAGE_TOO_LARGE, then close 1009.
    let mut big = node.connect(&token("u3", "acme", &[])).await;
    big.send_raw(Message::text(format!(
        "{{\"op\":\"ping\",\"pad\":\"{}\"}}",
        "x".repeat(2000)
    )))
    .await;
    assert_eq!(big.next_json().await["code"], "MESSAGE_TOO_LARGE");
    assert_eq!(big.expect_close().await.0, 1009);

    // Flooding: RATE_LIMIT_EXCEEDED, then close 1008.
    let mut flood = node.connect(&token("u4", "acme", &[])).await;
    for i in 0..200 {
        if flood
            .ws
            .send(Message::text(
                json!({"op":"ping","ref":i.to_string()}).to_string(),
            ))
            .await
            .is_err()
        {
            break;
        }
    }
    let mut saw_rate_error = false;
    let code = loop {
        match flood.next_message().await {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v["code"] == "RATE_LIMIT_EXCEEDED" {
                    saw_rate_error = true;
                }
            }
            Message::Close(Some(f)) => break u16::from(f.code),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(saw_rate_error);
    assert_eq!(code, 1008);

    node.publish(event_json(&["team:1"], "after.abuse", json!(2)))
        .await;
    assert_eq!(bystander.next_json().await["type"], "after.abuse");
    assert_eq!(c.next_json().await["type"], "after.abuse");
}

#[tokio::test]
async fn ping_gets_pong_with_the_client_timestamp() {
    let node = TestNode::start(config()).await;
    let mut c = node.connect(&token("u1", "acme", &[])).await;
    c.send(json!({"op":"ping","ref":"3","ts":1700000000000u64}))
        .await;
    let pong = c.next_json().await;
    assert_eq!(
        (pong["op"].as_str(), pong["ref"].as_str()),
        (Some("pong"), Some("3"))
    );
    assert_eq!(pong["client_ts"], 1700000000000u64);
    assert!(pong["ts"].as_u64().unwrap() > 1700000000000);
}

#[tokio::test]
async fn protobuf_subprotocol_round_trip() {
    use prost::Message as _;
    use roomcast_protocol::pb;
    let node = TestNode::start(config()).await;
    let mut c = Client::connect_url(
        &node.ws_url(),
        &token("u1", "acme", &["42"]),
        Some("roomcast.v1.proto"),
    )
    .await
    .unwrap();
    let decode = |m: Message| match m {
        Message::Binary(b) => pb::ServerFrame::decode(&b[..]).unwrap(),
        other => panic!("expected binary, got {other:?}"),
    };
    let welcome = decode(c.next_message().await);
    assert!(
        matches!(welcome.op, Some(pb::server_frame::Op::Welcome(ref w)) if w.user == "u1" && w.tenant == "acme")
    );
    let sub = pb::ClientFrame {
        r#ref: "1".into(),
        op: Some(pb::client_frame::Op::Subscribe(pb::Subscribe {
            rooms: vec!["team:42".into(), "team:7".into()],
            since: Default::default(),
        })),
    };
    c.send_raw(Message::binary(sub.encode_to_vec())).await;
    let reply = decode(c.next_message().await);
    assert_eq!(reply.r#ref, "1");
    match reply.op {
        Some(pb::server_frame::Op::Subscribed(s)) => {
            assert_eq!(s.rooms, vec!["team:42"]);
            assert_eq!(s.denied[0].room, "team:7");
            assert_eq!(s.denied[0].code, "AUTHORIZATION_FAILED");
        }
        other => panic!("expected subscribed, got {other:?}"),
    }
    node.publish(event_json(&["team:42"], "task.updated", json!({"id":1})))
        .await;
    match decode(c.next_message().await).op {
        Some(pb::server_frame::Op::Event(e)) => {
            assert_eq!(
                (e.room.as_str(), e.r#type.as_str(), e.actor.as_str()),
                ("team:42", "task.updated", "u2")
            );
            assert_eq!(
                e.body,
                Some(pb::event_frame::Body::Json(r#"{"id":1}"#.into()))
            );
        }
        other => panic!("expected event, got {other:?}"),
    }
    let ping = pb::ClientFrame {
        r#ref: "p".into(),
        op: Some(pb::client_frame::Op::Ping(pb::Ping { ts: 5 })),
    };
    c.send_raw(Message::binary(ping.encode_to_vec())).await;
    assert!(
        matches!(decode(c.next_message().await).op, Some(pb::server_frame::Op::Pong(p)) if p.client_ts == 5)
    );
    c.send_raw(Message::binary(vec![0xff, 0xff])).await;
    assert!(
        matches!(decode(c.next_message().await).op, Some(pb::server_frame::Op::Error(e)) if e.code == "INVALID_MESSAGE")
    );
}

#[tokio::test]
async fn unknown_subprotocol_is_refused() {
    let node = TestNode::start(config()).await;
    let refused = Client::connect_url(
        &node.ws_url(),
        &token("u1", "acme", &[]),
        Some("graphql-ws"),
    )
    .await
    .err()
    .unwrap();
    assert_eq!(refused.status, 400);
}

#[tokio::test]
async fn connection_cap_refuses_with_503_before_upgrade() {
    let mut cfg = config();
    cfg.limits.max_connections = 2;
    let node = TestNode::start(cfg).await;
    let t = token("u1", "acme", &[]);
    let _a = node.connect(&t).await;
    let mut b = node.connect(&t).await;
    let refused = Client::connect_url(&node.ws_url(), &t, None)
        .await
        .err()
        .expect("third is refused");
    assert_eq!(refused.status, 503);
    assert_eq!(refused.body["code"], "CONNECTION_LIMIT");
    b.ws.close(None).await.unwrap();
    b.expect_close().await;
    // The slot frees once the server has processed the close.
    eventually("slot released", || node.node.connection_count() == 1).await;
    assert!(
        Client::connect_url(&node.ws_url(), &t, None).await.is_ok(),
        "a freed slot is reusable"
    );
}
