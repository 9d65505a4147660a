//! The Prometheus recorder. Installed once per process, before any metric
//! handle is created (handles made earlier would bind to the no-op recorder).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Latency buckets, in seconds: fine below 10 ms where the SLO lives.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Installs the recorder on first use and returns the handle that renders
/// `/metrics`. When another recorder is already installed (an embedding
/// program's), roomcast renders an empty page rather than fail.
pub fn prometheus() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .expect("static bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics shows only roomcast's own recorder");
        }
        describe();
        handle
    })
}

/// Creates the series dashboards and alerts read, at zero, so an idle node
/// exports them (a counter first seen at its first increment makes
/// `increase()` miss that increment and panels show "no data").
pub(crate) fn register_defaults(max_connections: usize) {
    metrics::gauge!("roomcast_connections_max").set(max_connections as f64);
    for transport in ["ws", "sse", "poll", "socketio"] {
        metrics::gauge!("roomcast_connections", "transport" => transport).increment(0.0);
        metrics::counter!("roomcast_connections_total", "transport" => transport).increment(0);
    }
    for reason in [
        "missing_token",
        "malformed",
        "bad_signature",
        "wrong_algorithm",
        "expired",
        "not_yet_valid",
        "missing_claim",
        "invalid_claim",
    ] {
        metrics::counter!("roomcast_auth_failures_total", "reason" => reason).increment(0);
    }
    metrics::counter!("roomcast_rejected_connections_total", "reason" => "connection_limit")
        .increment(0);
    for reason in ["in_flight", "lag"] {
        metrics::counter!("roomcast_publish_rejected_total", "reason" => reason).increment(0);
    }
    for code in [
        "INVALID_MESSAGE",
        "RATE_LIMIT_EXCEEDED",
        "MESSAGE_TOO_LARGE",
        "AUTHORIZATION_FAILED",
    ] {
        metrics::counter!("roomcast_client_errors_total", "code" => code).increment(0);
    }
    metrics::counter!("roomcast_events_published_total").increment(0);
    metrics::counter!("roomcast_redis_reconnects_total").increment(0);
    metrics::counter!("roomcast_broker_decode_errors_total").increment(0);
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(
        "roomcast_connections",
        "Open client sessions on this node, by transport."
    );
    describe_counter!(
        "roomcast_connections_total",
        "Sessions accepted since start, by transport."
    );
    describe_counter!("roomcast_disconnects_total", "Sessions closed, by reason.");
    describe_gauge!(
        "roomcast_subscriptions",
        "Session-room memberships on this node."
    );
    describe_gauge!(
        "roomcast_rooms",
        "Rooms with at least one local member (one broker subscription each)."
    );
    describe_counter!(
        "roomcast_events_in_total",
        "Events received from the broker for local rooms."
    );
    describe_counter!(
        "roomcast_events_published_total",
        "Events published through this node's HTTP API."
    );
    describe_counter!(
        "roomcast_deliveries_total",
        "Event frames queued to sessions."
    );
    describe_counter!(
        "roomcast_deliveries_deferred_total",
        "Deliveries held to share one socket write with a later frame of the same room read in the same broker batch."
    );
    describe_counter!(
        "roomcast_io_uring_submissions_total",
        "io_uring submissions of direct sends (limits.io_uring); 0 when off or refused by the kernel."
    );
    describe_counter!(
        "roomcast_io_uring_sends_total",
        "Direct sends that went to the kernel in an io_uring submission."
    );
    describe_counter!(
        "roomcast_drops_total",
        "Frames or sessions dropped, by reason."
    );
    describe_counter!(
        "roomcast_auth_failures_total",
        "Refused credentials, by reason."
    );
    describe_counter!(
        "roomcast_rejected_connections_total",
        "Upgrades refused before the socket opened, by reason."
    );
    describe_counter!(
        "roomcast_client_errors_total",
        "Error frames sent to clients, by code."
    );
    describe_gauge!(
        "roomcast_ready",
        "1 while the node reports ready on /readyz."
    );
    describe_gauge!(
        "roomcast_broker_healthy",
        "1 while the broker connection is up."
    );
    describe_counter!(
        "roomcast_broker_subscribe_errors_total",
        "Room subscriptions the broker refused (the join is denied with INTERNAL_ERROR)."
    );
    describe_histogram!(
        "roomcast_publish_to_deliver_seconds",
        Unit::Seconds,
        "Time from an event's ts to its fan-out on this node."
    );
}
