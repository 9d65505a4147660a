//! Seed 002 (`/realtime?token=`): two nodes on a real Redis, a real HTTP
//! authorization callback, and the `ws` npm client in e2e/seed002.mjs.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use roomcast_testkit::{unique_prefix, RedisServer};
use serde_json::Value;
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

/// An HTTP authorization callback: allows the rooms in `allow`, denies the
/// rest, and records every room it was asked about.
struct Callback {
    addr: SocketAddr,
    asked: Arc<Mutex<Vec<String>>>,
}

impl Callback {
    async fn start(allow: &'static [&'static str]) -> Callback {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let log = asked.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let Some(body) = read_request(&mut s).await else {
                        return;
                    };
                    let q: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    let room = q["room"].as_str().unwrap_or_default().to_owned();
                    let allow = allow.contains(&room.as_str());
                    log.lock().unwrap().push(room);
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
        Callback { addr, asked }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_client_subscribes_to_teams_and_tasks_through_the_callback() {
    let redis = RedisServer::start().await;
    let prefix = unique_prefix();
    let callback = Callback::start(&["task:k1@team:t1"]).await;
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let mut c = config(Backend::Standalone(redis.url()), &prefix);
        c.auth.authz_callback_url = Some(format!("http://{}/authorize", callback.addr));
        nodes.push(TestNode::start(c).await);
    }
    let env = [
        ("NODE_A", nodes[0].addr.to_string()),
        ("NODE_B", nodes[1].addr.to_string()),
        ("TOKEN_MEMBER", token("u1", &["t1"])),
        ("TOKEN_OUTSIDER", token("u2", &["t2"])),
        ("API_KEY", API_KEY.to_owned()),
        ("TENANT", TENANT.to_owned()),
    ];
    run_e2e("node", "seed002.mjs", &env, Duration::from_secs(30)).await;
    let mut asked = callback.asked.lock().unwrap().clone();
    asked.sort();
    assert_eq!(
        asked,
        ["task:k1@team:t1", "task:k2@team:t1"],
        "the callback decides task rooms (naming the team); team rooms and \
         tasks of foreign teams never reach it"
    );
    for node in nodes {
        node.stop().await;
    }
}
