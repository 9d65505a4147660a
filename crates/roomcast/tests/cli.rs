//! The `roomcast` binary as an operator uses it: serve, token, publish,
//! --dev, and SIGTERM draining (1001 to every socket, exit status 0).

use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

mod support;

use support::{NodeProcess, API_KEY, SECRET};

const PATIENCE: Duration = Duration::from_secs(10);

fn roomcast() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_roomcast"));
    c.kill_on_drop(true).env_remove("RUST_LOG");
    c
}

/// Starts `roomcast serve` (memory broker) on an ephemeral port.
async fn serve(extra: &[&str]) -> (NodeProcess, String) {
    let node = NodeProcess::spawn(extra).await;
    let addr = node.addr.to_string();
    (node, addr)
}

async fn run(args: &[&str]) -> (bool, String) {
    let out = roomcast().args(args).output().await.unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    )
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(addr: &str, token: &str) -> Ws {
    let mut req = format!("ws://{addr}/v1/ws").into_client_request().unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    tokio_tungstenite::connect_async(req)
        .await
        .expect("connects")
        .0
}

async fn next_json(ws: &mut Ws) -> Value {
    loop {
        match tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("in time")
            .unwrap()
            .unwrap()
        {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

async fn close_code(ws: &mut Ws) -> u16 {
    loop {
        match tokio::time::timeout(PATIENCE, ws.next())
            .await
            .expect("close in time")
        {
            Some(Ok(Message::Close(Some(f)))) => return u16::from(f.code),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// A socket of user u1 (tenant acme) subscribed to `team:<team>`, with a
/// token from `roomcast token`.
async fn subscribed_with_a_cli_token(addr: &str, team: &str) -> Ws {
    let (ok, token) = run(&[
        "token",
        "--sub",
        "u1",
        "--tenant",
        "acme",
        "--team",
        team,
        "--ttl",
        "10m",
        "--jwt-secret",
        SECRET,
    ])
    .await;
    assert!(ok);
    let mut ws = connect(addr, &token).await;
    assert_eq!(next_json(&mut ws).await["op"], "welcome");
    let room = format!("team:{team}");
    let subscribe = serde_json::json!({"op": "subscribe", "ref": "1", "rooms": [room]});
    ws.send(Message::text(subscribe.to_string())).await.unwrap();
    assert_eq!(next_json(&mut ws).await["rooms"], serde_json::json!([room]));
    ws
}

#[tokio::test]
async fn token_and_publish_commands_work_against_a_served_node() {
    let (_node, addr) = serve(&[]).await;
    let mut ws = subscribed_with_a_cli_token(&addr, "42").await;

    let url = format!("http://{addr}");
    let (ok, out) = run(&[
        "publish",
        "--url",
        &url,
        "--token",
        API_KEY,
        "--tenant",
        "acme",
        "--room",
        "team:42",
        "--type",
        "task.updated",
        "--data",
        r#"{"id":1}"#,
        "--actor",
        "u2",
    ])
    .await;
    assert!(ok, "{out}");
    let ev = next_json(&mut ws).await;
    assert_eq!(
        (ev["type"].as_str(), ev["actor"].as_str()),
        (Some("task.updated"), Some("u2"))
    );
    assert_eq!(ev["data"]["id"], 1);
    let (ok, _) = run(&[
        "publish",
        "--url",
        &url,
        "--token",
        "wrong-key",
        "--tenant",
        "acme",
        "--room",
        "team:42",
        "--type",
        "x",
    ])
    .await;
    assert!(!ok, "a refused publish exits non-zero");
}

#[tokio::test]
async fn sigterm_drains_with_1001_and_exits_zero() {
    let (mut node, addr) = serve(&["--drain-window", "300ms"]).await;
    let (_, token) = run(&[
        "token",
        "--sub",
        "u1",
        "--tenant",
        "acme",
        "--jwt-secret",
        SECRET,
    ])
    .await;
    let mut a = connect(&addr, &token).await;
    let mut b = connect(&addr, &token).await;
    next_json(&mut a).await;
    next_json(&mut b).await;
    let pid = node.pid().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap()
        .success());
    assert_eq!(close_code(&mut a).await, 1001);
    assert_eq!(close_code(&mut b).await, 1001);
    let status = tokio::time::timeout(PATIENCE, node.wait())
        .await
        .expect("exits");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn dev_mode_prints_a_working_token() {
    let mut child = roomcast()
        .args(["serve", "--dev", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut addr, mut token) = (None, None);
    tokio::time::timeout(PATIENCE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(rest) = line.strip_prefix("roomcast dev node on http://") {
                addr = rest.split_whitespace().next().map(str::to_owned);
            } else if line.starts_with("eyJ") {
                token = Some(line.trim().to_owned());
            }
            if line.starts_with("publish:") {
                return;
            }
        }
    })
    .await
    .expect("banner printed");
    let mut ws = connect(&addr.unwrap(), &token.unwrap()).await;
    assert_eq!(next_json(&mut ws).await["user"], "dev");
}

#[tokio::test]
async fn a_config_without_a_secret_is_refused_at_start() {
    let out = roomcast()
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env_remove("ROOMCAST_JWT_SECRET")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("jwt_secret"),
        "says what is missing"
    );
}

#[tokio::test]
async fn worker_threads_must_be_positive_and_are_honoured() {
    let out = roomcast()
        .args([
            "serve",
            "--worker-threads",
            "0",
            "--listen",
            "127.0.0.1:0",
            "--jwt-secret",
            SECRET,
        ])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--worker-threads"));
    // One worker thread still serves sessions (the run-6 benchmark setting).
    let (_node, addr) = serve(&["--worker-threads", "1"]).await;
    let (_, token) = run(&[
        "token",
        "--sub",
        "u1",
        "--tenant",
        "acme",
        "--jwt-secret",
        SECRET,
    ])
    .await;
    let mut ws = connect(&addr, &token).await;
    assert_eq!(next_json(&mut ws).await["op"], "welcome");
}

/// An operator's rediss:// set-up end to end: `serve` and `publish --redis`
/// both reach a Redis that takes only TLS clients with a certificate of its
/// CA, and a node without the client certificate refuses to start, saying why.
#[tokio::test]
async fn serve_and_publish_work_over_rediss_with_a_client_certificate() {
    use roomcast_testkit::{ClientAuth, RedisServer, TestCerts};
    let certs = TestCerts::generate();
    let redis = RedisServer::start_tls(&certs, ClientAuth::Required).await;
    let url = redis.tls_url();
    let (ca, cert, key) = (
        certs.ca().display().to_string(),
        certs.client_cert().display().to_string(),
        certs.client_key().display().to_string(),
    );
    let prefix = roomcast_testkit::unique_prefix();
    let tls_args = [
        "--redis",
        &url,
        "--redis-prefix",
        &prefix,
        "--redis-tls-ca-file",
        &ca,
        "--redis-tls-cert-file",
        &cert,
        "--redis-tls-key-file",
        &key,
    ];

    let refused = roomcast()
        .args(["serve", "--listen", "127.0.0.1:0", "--jwt-secret", SECRET])
        .args(&tls_args[..6])
        .output()
        .await
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("CertificateRequired"), "{stderr}");

    let (_node, addr) = serve(&tls_args).await;
    let mut ws = subscribed_with_a_cli_token(&addr, "7").await;

    let publish = [
        "publish",
        "--tenant",
        "acme",
        "--room",
        "team:7",
        "--type",
        "vote.counted",
        "--data",
        r#"{"n":3}"#,
    ];
    let (ok, out) = run(&[&publish[..], &tls_args[..]].concat()).await;
    assert!(ok, "{out}");
    let ev = next_json(&mut ws).await;
    assert_eq!(
        (ev["type"].as_str(), &ev["data"]["n"]),
        (Some("vote.counted"), &serde_json::json!(3))
    );
}

/// A subscriber that cannot get back to Redis says why at warn level (the
/// default log filter), so an operator sees a refused connection, an
/// expired certificate or a wrong password without turning on debug logs.
#[tokio::test]
async fn a_subscriber_that_cannot_reconnect_warns_with_the_reason() {
    let mut redis = roomcast_testkit::RedisServer::start().await;
    if redis.is_external() {
        eprintln!("REDIS_URL is set: skipping a test that kills Redis");
        return;
    }
    let prefix = roomcast_testkit::unique_prefix();
    let mut node = NodeProcess::start(redis.url(), &prefix).await;
    redis.kill();
    let line = node
        .log_line("redis subscriber cannot connect; retrying", PATIENCE)
        .await;
    assert_eq!(line["level"], "WARN", "{line}");
    let error = line["fields"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("refused"), "the reason is given: {line}");
}

/// `--fanout-lanes` reaches the Redis broker (its gauge says how many run)
/// and out-of-range or brokerless settings are refused at start.
#[tokio::test]
async fn fanout_lanes_are_set_by_flag_and_checked() {
    let redis = roomcast_testkit::RedisServer::start().await;
    let prefix = roomcast_testkit::unique_prefix();
    let node = NodeProcess::spawn(&[
        "--redis",
        redis.url(),
        "--redis-prefix",
        &prefix,
        "--fanout-lanes",
        "3",
    ])
    .await;
    let (status, body) =
        roomcast_testkit::http_request(node.addr, "GET", "/metrics", &[], "").await;
    assert_eq!(status, 200);
    assert!(
        body.lines().any(|l| l == "roomcast_redis_fanout_lanes 3"),
        "{body}"
    );
    for (args, says) in [
        (
            vec!["--redis", redis.url(), "--fanout-lanes", "65"],
            "at most 64",
        ),
        (vec!["--fanout-lanes", "2"], "applies to a Redis broker"),
    ] {
        let out = roomcast()
            .args(["serve", "--listen", "127.0.0.1:0", "--jwt-secret", SECRET])
            .args(&args)
            .output()
            .await
            .unwrap();
        assert!(!out.status.success(), "{args:?} is refused");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}
