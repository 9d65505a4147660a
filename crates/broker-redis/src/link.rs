//! One subscriber connection to one Redis node, driven by hand in RESP2:
//! connect (+ AUTH), then a reader task that hands messages straight to the
//! sink and everything else (confirmations, errors, close) to the
//! subscriber's actor.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::config::ConfigError;
use crate::resp::{self, Frame};
use crate::subscriber::{Batch, LinkEvent, Msg, Shared};
use crate::tls::TlsClient;

/// A link's read side: a TCP stream's, or a TLS session's.
pub(crate) type LinkRead = Box<dyn AsyncRead + Send + Unpin>;
/// A link's write side.
pub(crate) type LinkWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// Where a node is and how to log in to it.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
    /// Set for `rediss://`: the link speaks TLS.
    pub(crate) tls: Option<TlsClient>,
}

impl Endpoint {
    /// `tls` is the broker's TLS client, required for a `rediss://` URL.
    pub(crate) fn from_url(url: &str, tls: Option<&TlsClient>) -> Result<Endpoint, ConfigError> {
        let info = redis::Client::open(url)
            .map_err(|source| ConfigError::Url {
                url: url.to_owned(),
                source,
            })?
            .get_connection_info()
            .clone();
        let (host, port, tls) = match (info.addr().clone(), tls) {
            (redis::ConnectionAddr::Tcp(host, port), _) => (host, port, None),
            (redis::ConnectionAddr::TcpTls { host, port, .. }, Some(tls)) => {
                (host, port, Some(tls.clone()))
            }
            _ => return Err(ConfigError::Scheme(url.to_owned())),
        };
        Ok(Endpoint {
            host,
            port,
            username: info.redis_settings().username().map(str::to_owned),
            password: info.redis_settings().password().map(str::to_owned),
            tls,
        })
    }

    /// Another node of the same deployment (same credentials).
    pub(crate) fn with_addr(&self, host: &str, port: u16) -> Endpoint {
        Endpoint {
            host: host.to_owned(),
            port,
            ..self.clone()
        }
    }

    /// `host:port`, the node's identity in the slot map.
    pub(crate) fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// A connected, logged-in link, not yet reading.
pub(crate) struct Connected {
    pub(crate) reader: BufReader<LinkRead>,
    pub(crate) writer: LinkWrite,
}

/// Connects and authenticates within `timeout`.
pub(crate) async fn connect(ep: &Endpoint, timeout: Duration) -> io::Result<Connected> {
    let fut = async {
        let stream = TcpStream::connect((ep.host.as_str(), ep.port)).await?;
        stream.set_nodelay(true)?;
        let (r, mut writer): (LinkRead, LinkWrite) = match &ep.tls {
            None => {
                let (r, w) = stream.into_split();
                (Box::new(r), Box::new(w))
            }
            Some(tls) => {
                let session = tls.connect(&ep.host, stream).await.map_err(|e| {
                    io::Error::new(e.kind(), format!("TLS handshake with {}: {e}", ep.addr()))
                })?;
                let (r, w) = tokio::io::split(session);
                (Box::new(r), Box::new(w))
            }
        };
        let mut reader = BufReader::with_capacity(READ_BUFFER, r);
        if let Some(pass) = &ep.password {
            let cmd = match &ep.username {
                Some(user) => resp::encode(&["AUTH", user, pass]),
                None => resp::encode(&["AUTH", pass]),
            };
            writer.write_all(&cmd).await?;
            writer.flush().await?;
            match resp::read_frame(&mut reader).await? {
                Frame::Simple(_) => {}
                other => {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!("AUTH refused: {other:?}"),
                    ))
                }
            }
        }
        Ok(Connected { reader, writer })
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))?
}

/// Reads one link until it fails or goes quiet for `idle` (the actor sends
/// a PING more often than that), then reports it closed.
pub(crate) async fn read_loop(
    conn_id: u64,
    mut reader: BufReader<LinkRead>,
    shared: Arc<Shared>,
    events: mpsc::UnboundedSender<Msg>,
    idle: Duration,
) {
    // Messages already read are delivered together, so the hub can send a
    // member several frames of one room in one write; they are handed over
    // before anything else happens and before the reader could wait.
    let mut batch = Batch::with_capacity(MAX_BATCH);
    let reason = loop {
        if batch.len() >= MAX_BATCH || !resp::holds_frame(reader.buffer()) {
            shared.deliver(&mut batch).await;
        }
        let frame = match tokio::time::timeout(idle, resp::read_frame(&mut reader)).await {
            Ok(Ok(frame)) => frame,
            Ok(Err(e)) => break e.to_string(),
            Err(_) => break format!("no reply for {idle:?}"),
        };
        if !matches!(&frame, Frame::Array(Some(items)) if is_message(items)) {
            shared.deliver(&mut batch).await;
        }
        match frame {
            Frame::Array(Some(items)) => {
                let kind = items.first().and_then(Frame::as_bytes).unwrap_or(b"");
                let channel = items.get(1).and_then(Frame::as_bytes);
                match (kind, channel) {
                    (b"message" | b"smessage", Some(ch)) => {
                        let payload = match items.get(2) {
                            Some(Frame::Bulk(Some(b))) => b.clone(),
                            _ => Bytes::new(),
                        };
                        shared.receive(ch, &payload, &mut batch);
                    }
                    (b"subscribe" | b"ssubscribe", Some(ch)) => {
                        let _ = events.send(Msg::Link(LinkEvent::Subscribed {
                            conn_id,
                            channel: ch.into(),
                        }));
                    }
                    (b"unsubscribe" | b"sunsubscribe", Some(ch)) => {
                        let _ = events.send(Msg::Link(LinkEvent::Unsubscribed {
                            conn_id,
                            channel: ch.into(),
                        }));
                    }
                    _ => {} // pong, or a confirmation of nothing
                }
            }
            Frame::Error(message) => {
                let _ = events.send(Msg::Link(LinkEvent::ServerError { conn_id, message }));
            }
            _ => {}
        }
    };
    shared.deliver(&mut batch).await;
    let _ = events.send(Msg::Link(LinkEvent::Closed { conn_id, reason }));
}

/// A subscriber connection's read buffer: what one read can take in, and so
/// how many messages a node that fell behind can batch (~250 per 64 KiB).
const READ_BUFFER: usize = 64 * 1024;

/// Most events delivered as one batch: bounds how long the first waits for
/// the fan-out of the others.
const MAX_BATCH: usize = 256;

fn is_message(items: &[Frame]) -> bool {
    matches!(
        items.first().and_then(Frame::as_bytes),
        Some(b"message" | b"smessage")
    )
}
