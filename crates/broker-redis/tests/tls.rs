//! The Redis broker over TLS (`rediss://`) against real redis-server TLS
//! ports: the command path (redis-rs) and the subscriber links (our own
//! RESP) both go through TLS, since the URLs name only the TLS ports.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{event, key, n_of, sink};
use roomcast_broker::{Broker, BrokerError};
use roomcast_broker_redis::{RedisBroker, RedisConfig, RedisMode, RedisTls};
use roomcast_protocol::{EventId, RoomKey};
use roomcast_testkit::{unique_prefix, ClientAuth, RedisCluster, RedisServer, TestCerts};

fn tuned(mut c: RedisConfig, tls: RedisTls) -> RedisConfig {
    c.tls = tls;
    c.prefix = unique_prefix();
    c.backoff_base = Duration::from_millis(20);
    c.backoff_max = Duration::from_millis(200);
    // A refused handshake fails at once; this only bounds a hung one.
    c.command_timeout = Duration::from_secs(2);
    c
}

fn ca_only(certs: &TestCerts) -> RedisTls {
    RedisTls {
        ca_file: Some(certs.ca()),
        ..RedisTls::default()
    }
}

fn with_client_cert(certs: &TestCerts) -> RedisTls {
    RedisTls {
        ca_file: Some(certs.ca()),
        cert_file: Some(certs.client_cert()),
        key_file: Some(certs.client_key()),
    }
}

/// A publishes, B (subscribed) receives it exactly once, and the history
/// read comes back: every Redis path of a node worked over TLS.
async fn round_trip(a: &RedisBroker, b: &RedisBroker, got_b: &mut common::Received, n: u64) {
    let room = key("acme", "team:tls");
    b.subscribe(&room).await.unwrap();
    let id = retried(|| a.publish(event(&["team:tls"], n))).await.ids[0].1;
    let (r, ev) = got_b.next().await;
    assert_eq!((r, ev.id, n_of(&ev)), (room.clone(), id, n));
    let h = retried(|| b.history_since(&room, EventId::ZERO, 100)).await;
    assert_eq!(h.events.last().map(|e| e.id), Some(id));
}

/// After a restart the first use of a pooled command connection may meet
/// the dead one: callers retry on `Unavailable`, as a publisher does.
async fn retried<T, F, Fut>(mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, BrokerError>>,
{
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    loop {
        match call().await {
            Ok(v) => return v,
            Err(BrokerError::Unavailable { .. }) if tokio::time::Instant::now() < deadline => {}
            Err(e) => panic!("{e}"),
        }
    }
}

#[tokio::test]
async fn nodes_publish_subscribe_and_read_history_over_tls_and_survive_a_restart() {
    let certs = TestCerts::generate();
    let mut server = RedisServer::start_tls(&certs, ClientAuth::Off).await;
    let cfg = tuned(RedisConfig::standalone(server.tls_url()), ca_only(&certs));
    let (sink_a, _got_a) = sink();
    let (sink_b, mut got_b) = sink();
    let a = RedisBroker::connect(cfg.clone(), sink_a).await.unwrap();
    let b = RedisBroker::connect(cfg.clone(), sink_b).await.unwrap();
    assert!(a.healthy() && b.healthy(), "the subscriber links are up");
    round_trip(&a, &b, &mut got_b, 1).await;

    // A host name is checked as a DNS name (the certificate names localhost).
    let by_name = server.tls_url().replace("127.0.0.1", "localhost");
    let cfg_by_name = RedisConfig {
        mode: RedisMode::Standalone { url: by_name },
        ..cfg
    };
    let (sink_c, mut got_c) = sink();
    let c = RedisBroker::connect(cfg_by_name, sink_c).await.unwrap();
    round_trip(&a, &c, &mut got_c, 10).await;
    assert_eq!(n_of(&got_b.next().await.1), 10, "B is in the room too");
    drop(c);

    // The subscriber reconnects over TLS and resubscribes.
    let seen = *got_b.resyncs.borrow();
    server.restart().await;
    got_b.resynced_after(seen).await;
    round_trip(&a, &b, &mut got_b, 2).await;
    got_b.assert_empty();
}

#[tokio::test]
async fn mutual_tls_works_with_the_client_certificate_and_is_refused_without() {
    let certs = TestCerts::generate();
    let server = RedisServer::start_tls(&certs, ClientAuth::Required).await;

    let without = tuned(RedisConfig::standalone(server.tls_url()), ca_only(&certs));
    let (lone, _got) = sink();
    let refused = RedisBroker::connect(without, lone).await;
    match refused {
        Err(e) => eprintln!("refused as expected: {}", error_chain(&e)),
        Ok(_) => panic!("a server that requires a client certificate accepted a node without one"),
    }

    let cfg = tuned(
        RedisConfig::standalone(server.tls_url()),
        with_client_cert(&certs),
    );
    let (sink_a, _got_a) = sink();
    let (sink_b, mut got_b) = sink();
    let a = RedisBroker::connect(cfg.clone(), sink_a).await.unwrap();
    let b = RedisBroker::connect(cfg, sink_b).await.unwrap();
    assert!(b.healthy());
    round_trip(&a, &b, &mut got_b, 1).await;
}

#[tokio::test]
async fn a_server_certificate_from_another_ca_is_refused_with_the_reason() {
    let certs = TestCerts::generate();
    let server = RedisServer::start_tls(&certs, ClientAuth::Off).await;
    let wrong_ca = RedisTls {
        ca_file: Some(certs.other_ca()),
        ..RedisTls::default()
    };
    let cfg = tuned(RedisConfig::standalone(server.tls_url()), wrong_ca);
    let (sink, _got) = sink();
    let Err(e) = RedisBroker::connect(cfg, sink).await else {
        panic!("a certificate no configured CA signed was accepted");
    };
    let chain = error_chain(&e);
    eprintln!("refused as expected: {chain}");
    assert!(chain.contains("certificate"), "{chain}");
}

#[tokio::test]
async fn tls_settings_that_cannot_work_are_refused_before_connecting() {
    let certs = TestCerts::generate();
    let plain = |tls| {
        let mut c = RedisConfig::standalone("redis://127.0.0.1:1/");
        c.tls = tls;
        c
    };
    let cases: Vec<(&str, RedisConfig, &str)> = vec![
        (
            "CA file with redis://",
            plain(ca_only(&certs)),
            "not rediss://",
        ),
        (
            "certificate without key",
            {
                let mut c = RedisConfig::standalone("rediss://127.0.0.1:1/");
                c.tls.cert_file = Some(certs.client_cert());
                c
            },
            "go together",
        ),
        (
            "mixed schemes",
            RedisConfig::cluster(["rediss://127.0.0.1:1/", "redis://127.0.0.1:2/"]),
            "mix redis:// and rediss://",
        ),
        (
            "#insecure",
            RedisConfig::standalone("rediss://127.0.0.1:1/#insecure"),
            "#fragment",
        ),
        (
            "another scheme",
            RedisConfig::standalone("redis+unix:///tmp/redis.sock"),
            "only redis:// and rediss://",
        ),
    ];
    for (what, cfg, expect) in cases {
        let e = cfg.validate().expect_err(what).to_string();
        assert!(e.contains(expect), "{what}: {e}");
    }

    // Files are read when the broker connects; a missing one is named.
    let mut cfg = RedisConfig::standalone("rediss://127.0.0.1:1/");
    cfg.tls.ca_file = Some("/nonexistent/ca.pem".into());
    cfg.validate().unwrap();
    let (sink, _got) = sink();
    let Err(e) = RedisBroker::connect(cfg, sink).await else {
        panic!("a missing CA file was accepted");
    };
    let chain = error_chain(&e);
    assert!(chain.contains("/nonexistent/ca.pem"), "{chain}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_over_tls_tells_the_tls_ports_and_fans_out_on_every_master() {
    let certs = TestCerts::generate();
    let cluster = RedisCluster::start_tls(3, &certs).await;
    let cfg = tuned(RedisConfig::cluster(cluster.tls_urls()), ca_only(&certs));
    let (sink_a, _got_a) = sink();
    let (sink_b, mut got_b) = sink();
    let a = RedisBroker::connect(cfg.clone(), sink_a).await.unwrap();
    let b = RedisBroker::connect(cfg, sink_b).await.unwrap();
    assert!(b.healthy(), "a TLS subscriber link is up on every master");

    let names: Vec<String> = (1..=6).map(|i| format!("team:{i}")).collect();
    let rooms: Vec<RoomKey> = names.iter().map(|n| key("acme", n)).collect();
    let owners: HashSet<usize> = rooms
        .iter()
        .map(|r| cluster.owner_of(RedisCluster::slot_of(&b.channel_name(r))))
        .collect();
    assert!(owners.len() >= 2, "rooms should span several masters");
    for room in &rooms {
        b.subscribe(room).await.unwrap();
    }
    for (i, name) in names.iter().enumerate() {
        let id = a.publish(event(&[name], i as u64)).await.unwrap().ids[0].1;
        let (room, ev) = got_b.next().await;
        assert_eq!((room, ev.id, n_of(&ev)), (rooms[i].clone(), id, i as u64));
    }
    got_b.assert_empty();
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Certificates rotated on disk (a new CA, server and client certificate,
/// as a renewed Kubernetes secret is) are picked up without a restart of
/// the node: once Redis runs on the new ones, both the command path and the
/// subscriber work again. Without the reload both would be refused for
/// ever (`UnknownIssuer`).
#[tokio::test]
async fn certificates_rotated_on_disk_are_used_without_a_restart() {
    let certs = TestCerts::generate();
    let mut server = RedisServer::start_tls(&certs, ClientAuth::Required).await;
    let mut cfg = tuned(
        RedisConfig::standalone(server.tls_url()),
        with_client_cert(&certs),
    );
    cfg.tls_reload = Duration::from_millis(100);
    let (sink_a, _got_a) = sink();
    let (sink_b, mut got_b) = sink();
    let a = RedisBroker::connect(cfg.clone(), sink_a).await.unwrap();
    let b = RedisBroker::connect(cfg, sink_b).await.unwrap();
    round_trip(&a, &b, &mut got_b, 1).await;

    let renewed = TestCerts::generate();
    for (from, to) in [
        (renewed.ca(), certs.ca()),
        (renewed.server_cert(), certs.server_cert()),
        (renewed.server_key(), certs.server_key()),
        (renewed.client_cert(), certs.client_cert()),
        (renewed.client_key(), certs.client_key()),
    ] {
        // Replaced whole, as a secret volume swaps its files.
        let staged = to.with_extension("new");
        std::fs::copy(&from, &staged).unwrap();
        std::fs::rename(&staged, &to).unwrap();
    }
    let seen = *got_b.resyncs.borrow();
    server.restart().await;
    got_b.resynced_after(seen).await;
    round_trip(&a, &b, &mut got_b, 2).await;
    got_b.assert_empty();
}
