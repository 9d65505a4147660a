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
use tokio::sync::mpsc;

use crate::node::Node;

pub(crate) type Body = Full<Bytes>;

/// A body streamed after the head (SSE). The dialect seam answers with a
/// [`Body`] (a whole body); a streaming transport puts its chunks' receiver
/// in the response's extensions with [`streaming`], and [`serve_connection`]
/// swaps it in for the (empty) whole body.
#[derive(Clone)]
struct StreamSource(Arc<std::sync::Mutex<Option<mpsc::Receiver<Bytes>>>>);

/// A response whose body is every chunk received on `chunks` until its
/// sender is dropped. Dropping the receiver (client gone) closes the channel.
pub(crate) fn streaming(
    mut response: Response<Body>,
    chunks: mpsc::Receiver<Bytes>,
) -> Response<Body> {
    response
        .extensions_mut()
        .insert(StreamSource(Arc::new(std::sync::Mutex::new(Some(chunks)))));
    response
}

/// What goes on the wire: a whole body, or a stream of chunks.
enum WireBody {
    Whole(Body),
    Stream(mpsc::Receiver<Bytes>),
}

impl hyper::body::Body for WireBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            WireBody::Whole(b) => std::pin::Pin::new(b).poll_frame(cx),
            WireBody::Stream(rx) => rx
                .poll_recv(cx)
                .map(|chunk| chunk.map(|c| Ok(hyper::body::Frame::data(c)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            WireBody::Whole(b) => b.is_end_stream(),
            WireBody::Stream(_) => false,
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            WireBody::Whole(b) => b.size_hint(),
            WireBody::Stream(_) => hyper::body::SizeHint::default(),
        }
    }
}

fn into_wire(mut response: Response<Body>) -> Response<WireBody> {
    let stream = response
        .extensions_mut()
        .remove::<StreamSource>()
        .and_then(|s| s.0.lock().unwrap_or_else(|p| p.into_inner()).take());
    match stream {
        Some(rx) => response.map(|_| WireBody::Stream(rx)),
        None => response.map(WireBody::Whole),
    }
}

/// The TCP peer of the connection a request arrived on, put in the
/// request's extensions before routing, for dialects that report the
/// client's address (seed003 presence).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PeerAddr(pub(crate) SocketAddr);

/// Serves one TCP connection (HTTP/1.1 with upgrades).
pub(crate) async fn serve_connection(node: Arc<Node>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let service = hyper::service::service_fn(move |req| {
        let node = node.clone();
        async move { Ok::<_, Infallible>(into_wire(route(node, req, peer).await)) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(%peer, error = %e, "http connection ended with an error");
    }
}

async fn route(node: Arc<Node>, mut req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    // Only the path is ever logged: query strings may carry tokens.
    tracing::trace!(method = %req.method(), path = req.uri().path(), %peer, "request");
    if let Some(dialect) = node.dialect_for(req.uri().path()).cloned() {
        req.extensions_mut().insert(PeerAddr(peer));
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

/// 405 unless the request is a GET: every WebSocket upgrade, SSE stream
/// and poll is one.
pub(crate) fn only_get<B>(req: &Request<B>) -> Option<Response<Body>> {
    (req.method() != Method::GET).then(|| {
        json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::InvalidMessage,
            "method not allowed",
        )
    })
}

/// `{"code": ..., "message": ...}` with the status.
pub(crate) fn json_error(status: StatusCode, code: ErrorCode, message: &str) -> Response<Body> {
    json(
        status,
        &serde_json::json!({ "code": code, "message": message }),
    )
}

/// The first value of query parameter `name`, percent-decoded
/// (`application/x-www-form-urlencoded`); `None` when absent or undecodable.
pub(crate) fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if roomcast_auth::percent_decode(k)? != name {
            return None;
        }
        roomcast_auth::percent_decode(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params_are_decoded() {
        let q = Some("rooms=team%3A42,task:t1&since=1-0&e=");
        assert_eq!(query_param(q, "rooms").as_deref(), Some("team:42,task:t1"));
        assert_eq!(query_param(q, "since").as_deref(), Some("1-0"));
        assert_eq!(query_param(q, "e").as_deref(), Some(""));
        assert_eq!(query_param(q, "x"), None);
        assert_eq!(query_param(Some("a=%zz"), "a"), None);
        assert_eq!(query_param(None, "a"), None);
    }
}
