//! Cluster-wide counters on Redis across two broker instances ("nodes"),
//! standalone and on a 3-master Cluster. Windows are driven by explicit
//! `now_ms` values, never by sleeping.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::sink;
use roomcast_broker::Broker;
use roomcast_broker_redis::{counter_key, RedisBroker, RedisConfig};
use roomcast_testkit::{query, unique_prefix, RedisCluster, RedisServer};

const MINUTE: Duration = Duration::from_secs(60);
/// A realistic clock origin on a one-minute boundary (unix ms).
const T0: u64 = 1_717_000_020_000;

async fn two_nodes(cfg: RedisConfig) -> (Arc<RedisBroker>, Arc<RedisBroker>) {
    let (sink_a, _) = sink();
    let (sink_b, _) = sink();
    let a = RedisBroker::connect(cfg.clone(), sink_a).await.unwrap();
    let b = RedisBroker::connect(cfg, sink_b).await.unwrap();
    (a, b)
}

/// Hits from both nodes add up in one window, keys stay apart, the next
/// window starts again.
async fn shared_windows(a: &Arc<RedisBroker>, b: &Arc<RedisBroker>) {
    let ca = a.counters().expect("the redis broker has counters");
    let cb = b.counters().expect("the redis broker has counters");
    assert_eq!(ca.hit("u:acme/u1", MINUTE, T0).await.unwrap(), 1);
    assert_eq!(cb.hit("u:acme/u1", MINUTE, T0 + 10).await.unwrap(), 2);
    assert_eq!(ca.hit("u:acme/u1", MINUTE, T0 + 59_999).await.unwrap(), 3);
    assert_eq!(cb.hit("u:acme/u2", MINUTE, T0 + 20).await.unwrap(), 1);
    assert_eq!(cb.hit("t:acme", MINUTE, T0 + 20).await.unwrap(), 1);
    // Concurrent hits are each counted once.
    let hits: Vec<u64> = concurrent_hits(a, b, "t:acme", 20).await;
    let mut sorted = hits.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (2..=21).collect::<Vec<u64>>(), "{hits:?}");
    // The next window.
    assert_eq!(ca.hit("u:acme/u1", MINUTE, T0 + 60_000).await.unwrap(), 1);
    assert_eq!(cb.hit("u:acme/u1", MINUTE, T0 + 60_001).await.unwrap(), 2);
}

/// `n` hits on `key`, alternating nodes, all in flight together.
async fn concurrent_hits(
    a: &Arc<RedisBroker>,
    b: &Arc<RedisBroker>,
    key: &str,
    n: usize,
) -> Vec<u64> {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let node = if i % 2 == 0 { a.clone() } else { b.clone() };
            let key = key.to_owned();
            tokio::spawn(async move {
                node.counters()
                    .unwrap()
                    .hit(&key, MINUTE, T0 + 30)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test]
async fn standalone_counts_across_nodes_with_expiring_keys() {
    let server = RedisServer::start().await;
    let mut cfg = RedisConfig::standalone(server.url());
    cfg.prefix = unique_prefix();
    let (a, b) = two_nodes(cfg.clone()).await;
    shared_windows(&a, &b).await;

    // Keys are prefixed, tagged per counter, and expire after their window
    // (plus a second of grace), measured from the hit's clock.
    let window = T0 / 60_000;
    let name = counter_key(&cfg.prefix, "u:acme/u1", window);
    assert_eq!(name, format!("{}{{ctr:u:acme/u1}}:{window}", cfg.prefix));
    let count: u64 = query(server.url(), redis::cmd("GET").arg(&name)).await;
    assert_eq!(count, 3);
    let ttl: i64 = query(server.url(), redis::cmd("PTTL").arg(&name)).await;
    assert!(ttl > 0 && ttl <= 61_000, "ttl {ttl}");

    // A key that lost its TTL gets one again at the next hit.
    let k = counter_key(&cfg.prefix, "lost", window);
    let _: () = query(server.url(), redis::cmd("SET").arg(&k).arg(5)).await;
    assert_eq!(
        a.counters().unwrap().hit("lost", MINUTE, T0).await.unwrap(),
        6
    );
    let ttl: i64 = query(server.url(), redis::cmd("PTTL").arg(&k)).await;
    assert!(ttl > 0, "ttl {ttl}");

    // Redis down: the hit fails plainly (the caller decides fail-open/closed).
    drop(server);
    assert!(a.counters().unwrap().hit("x", MINUTE, T0).await.is_err());
}

#[tokio::test]
async fn cluster_counts_across_nodes() {
    let cluster = RedisCluster::start(3).await;
    let mut cfg = RedisConfig::cluster(cluster.urls());
    cfg.prefix = unique_prefix();
    let (a, b) = two_nodes(cfg).await;
    shared_windows(&a, &b).await;
    // Many counters spread over the masters.
    for i in 0..24 {
        let key = format!("u:acme/user{i}");
        assert_eq!(
            a.counters().unwrap().hit(&key, MINUTE, T0).await.unwrap(),
            1
        );
        assert_eq!(
            b.counters().unwrap().hit(&key, MINUTE, T0).await.unwrap(),
            2
        );
    }
}
