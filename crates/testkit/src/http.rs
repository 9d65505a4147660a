//! A plain HTTP/1.1 client for tests: one request per fresh TCP connection,
//! written by hand so that a test controls every byte it sends.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Longest a response may take: a publish may wait for a Redis command
/// timeout (5 s) before its 503.
const RESPONSE_PATIENCE: Duration = Duration::from_secs(15);

/// Sends one request (`Connection: close`) and returns the status and body.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(RESPONSE_PATIENCE, s.read_to_end(&mut raw))
        .await
        .expect("response in time")
        .unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// POSTs a JSON body, with `Authorization: Bearer` when given; the reply as
/// JSON (or as a JSON string when it is not JSON).
pub async fn http_post(
    addr: SocketAddr,
    path: &str,
    bearer: Option<&str>,
    body: &str,
) -> (u16, Value) {
    let auth = bearer.map(|b| format!("Bearer {b}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    let (status, body) = http_request(addr, "POST", path, &headers, body).await;
    (
        status,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}
