//! The authorizer against a real HTTP callback server on 127.0.0.1:0.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use roomcast_auth::{Authorizer, AuthorizerConfig, Decision, DenyReason, Identity};
use roomcast_protocol::RoomName;
use serde_json::Value;
use tokio::net::TcpListener;

/// A callback server. It allows `task:ok` only to user `u1` of tenant `acme`
/// and answers other rooms by name; `hits` counts requests.
struct CallbackServer {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

impl CallbackServer {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let counter = counter.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| answer(req, counter.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, hits }
    }

    fn url(&self) -> String {
        format!("http://{}/authorize", self.addr)
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

async fn answer(
    req: Request<Incoming>,
    hits: Arc<AtomicUsize>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    hits.fetch_add(1, Ordering::SeqCst);
    assert_eq!(req.method(), hyper::Method::POST);
    assert_eq!(req.uri().path(), "/authorize");
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let q: Value = serde_json::from_slice(&body).unwrap();
    let (tenant, user, room) = (&q["tenant"], &q["user"], q["room"].as_str().unwrap_or(""));
    let reply = |status: StatusCode, body: &str| {
        let mut r = Response::new(Full::new(Bytes::from(body.to_owned())));
        *r.status_mut() = status;
        Ok(r)
    };
    match room {
        "task:ok" if tenant == "acme" && user == "u1" => reply(StatusCode::OK, r#"{"allow":true}"#),
        "conversation:c1" => reply(StatusCode::OK, r#"{"allow": true}"#),
        "task:forbidden" => reply(StatusCode::FORBIDDEN, ""),
        "task:gone" => reply(StatusCode::NOT_FOUND, "no such task"),
        "task:boom" => reply(StatusCode::INTERNAL_SERVER_ERROR, "oops"),
        "task:garbage" => reply(StatusCode::OK, "allow"),
        "task:slow" => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            reply(StatusCode::OK, r#"{"allow":true}"#)
        }
        _ => reply(StatusCode::OK, r#"{"allow":false}"#),
    }
}

fn identity(tenant: &str, user: &str) -> Identity {
    Identity {
        user: user.parse().unwrap(),
        tenant: tenant.parse().unwrap(),
        teams: vec!["7".into()],
        roles: vec![],
        rooms: vec![],
        expires_at: 0,
    }
}

fn room(s: &str) -> RoomName {
    s.parse().unwrap()
}

fn authorizer(url: String) -> Authorizer {
    Authorizer::new(AuthorizerConfig {
        callback_url: Some(url),
        timeout: Duration::from_millis(500),
        ..Default::default()
    })
    .unwrap()
}

#[tokio::test]
async fn callback_allows_one_room_denies_another_and_caches() {
    let server = CallbackServer::start().await;
    let a = authorizer(server.url());
    let u1 = identity("acme", "u1");

    assert_eq!(a.authorize(&u1, &room("task:ok")).await, Decision::Allow);
    assert_eq!(server.hits(), 1);
    assert_eq!(a.authorize(&u1, &room("task:ok")).await, Decision::Allow);
    assert_eq!(
        server.hits(),
        1,
        "second identical lookup must come from the cache"
    );

    let denied = Decision::Deny(DenyReason::CallbackDenied);
    assert_eq!(a.authorize(&u1, &room("task:other")).await, denied);
    assert_eq!(a.authorize(&u1, &room("task:other")).await, denied);
    assert_eq!(server.hits(), 2, "denials are cached too");

    // The cache is per (tenant, user, room), and the callback is told both.
    assert_eq!(
        a.authorize(&identity("acme", "u2"), &room("task:ok")).await,
        denied
    );
    assert_eq!(
        a.authorize(&identity("globex", "u1"), &room("task:ok"))
            .await,
        denied
    );
    assert_eq!(server.hits(), 4);
}

#[tokio::test]
async fn static_rooms_never_reach_the_callback() {
    let server = CallbackServer::start().await;
    let a = authorizer(server.url());
    let u1 = identity("acme", "u1");
    assert_eq!(a.authorize_static(&u1, &room("task:ok")), None);
    assert!(a.authorize(&u1, &room("user:u1")).await.is_allowed());
    assert!(a.authorize(&u1, &room("team:7")).await.is_allowed());
    assert_eq!(
        a.authorize(&u1, &room("user:u2")).await,
        Decision::Deny(DenyReason::NotOwnUserRoom)
    );
    assert_eq!(
        a.authorize(&u1, &room("team:8")).await,
        Decision::Deny(DenyReason::NotInTeam)
    );
    assert_eq!(server.hits(), 0);
}

#[tokio::test]
async fn status_codes_and_bad_bodies() {
    let server = CallbackServer::start().await;
    let a = authorizer(server.url());
    let u1 = identity("acme", "u1");
    let denied = Decision::Deny(DenyReason::CallbackDenied);
    let unavailable = Decision::Deny(DenyReason::CallbackUnavailable);
    assert_eq!(a.authorize(&u1, &room("task:forbidden")).await, denied);
    assert_eq!(a.authorize(&u1, &room("task:gone")).await, denied);
    assert_eq!(server.hits(), 2);
    for r in ["task:boom", "task:garbage"] {
        assert_eq!(a.authorize(&u1, &room(r)).await, unavailable, "{r}");
        assert_eq!(a.authorize(&u1, &room(r)).await, unavailable, "{r}");
    }
    assert_eq!(server.hits(), 6, "failures are not cached");
}

#[tokio::test]
async fn slow_callback_times_out_and_denies() {
    let server = CallbackServer::start().await;
    let a = Authorizer::new(AuthorizerConfig {
        callback_url: Some(server.url()),
        timeout: Duration::from_millis(200),
        ..Default::default()
    })
    .unwrap();
    let started = tokio::time::Instant::now();
    let d = a
        .authorize(&identity("acme", "u1"), &room("task:slow"))
        .await;
    assert_eq!(d, Decision::Deny(DenyReason::CallbackUnavailable));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn dead_callback_url_denies() {
    // A port that was just free: nothing listens there now.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let a = authorizer(format!("http://{addr}/authorize"));
    let d = a.authorize(&identity("acme", "u1"), &room("task:ok")).await;
    assert_eq!(d, Decision::Deny(DenyReason::CallbackUnavailable));
    assert_eq!(
        d,
        a.authorize(&identity("acme", "u1"), &room("task:ok")).await
    );
}

#[tokio::test]
async fn concurrent_identical_lookups_share_one_request() {
    let server = CallbackServer::start().await;
    let a = authorizer(server.url());
    let u1 = identity("acme", "u1");
    let r = room("task:ok");
    // join! polls every future before any can finish, so all five are in
    // flight together.
    let (d1, d2, d3, d4, d5) = tokio::join!(
        a.authorize(&u1, &r),
        a.authorize(&u1, &r),
        a.authorize(&u1, &r),
        a.authorize(&u1, &r),
        a.authorize(&u1, &r),
    );
    for d in [d1, d2, d3, d4, d5] {
        assert_eq!(d, Decision::Allow);
    }
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn dialects_can_ask_the_callback_directly() {
    let server = CallbackServer::start().await;
    let a = authorizer(server.url());
    let mut u1 = identity("acme", "u1");
    u1.rooms = vec![room("conversation:c2")];
    // ask_callback skips the static rules, even an explicit grant.
    assert_eq!(
        a.ask_callback(&u1, &room("conversation:c1")).await,
        Decision::Allow
    );
    assert_eq!(
        a.ask_callback(&u1, &room("conversation:c2")).await,
        Decision::Deny(DenyReason::CallbackDenied)
    );
    assert_eq!(server.hits(), 2);
}

#[tokio::test]
async fn no_callback_denies_rooms_that_need_one() {
    let a = Authorizer::new(AuthorizerConfig::default()).unwrap();
    let d = a.authorize(&identity("acme", "u1"), &room("task:ok")).await;
    assert_eq!(d, Decision::Deny(DenyReason::NoCallback));
    assert!(Authorizer::new(AuthorizerConfig {
        callback_url: Some("https://authz.example/check".into()),
        ..Default::default()
    })
    .is_err());
}
