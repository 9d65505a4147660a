//! HTTP routing: the WebSocket upgrade, the publish API, health and metrics.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use roomcast_protocol::native::ErrorCode;
use tokio::net::TcpStream;

use crate::node::Node;

pub(crate) type Body = Full<Bytes>;

/// Serves one TCP connection (HTTP/1.1 with upgrades).
pub(crate) async fn serve_connection(node: Arc<Node>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let service = hyper::service::service_fn(move |req| {
        let node = node.clone();
        async move { Ok::<_, Infallible>(route(node, req, peer).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(%peer, error = %e, "http connection ended with an error");
    }
}

async fn route(node: Arc<Node>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    // Only the path is ever logged: query strings may carry tokens.
    tracing::trace!(method = %req.method(), path = req.uri().path(), %peer, "request");
    if let Some(dialect) = node.dialect_for(req.uri().path()).cloned() {
        return dialect.handle(&node, req).await;
    }
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/v1/publish") => crate::publish::handle(node, req).await,
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => {
            if node.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        (&Method::GET, "/metrics") => Response::builder()
            .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
            .body(Full::new(Bytes::from(
                crate::metrics::prometheus().render(),
            )))
            .expect("static response parts are valid"),
        (_, "/v1/ws" | "/v1/publish" | "/healthz" | "/readyz" | "/metrics") => json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::InvalidMessage,
            "method not allowed",
        ),
        _ => json_error(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "no such endpoint",
        ),
    }
}

pub(crate) fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .expect("static response parts are valid")
}

pub(crate) fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(value.to_string())))
        .expect("static response parts are valid")
}

/// `{"code": ..., "message": ...}` with the status.
pub(crate) fn json_error(status: StatusCode, code: ErrorCode, message: &str) -> Response<Body> {
    json(
        status,
        &serde_json::json!({ "code": code, "message": message }),
    )
}
