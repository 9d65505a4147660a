//! The HTTP authorization callback: `POST <url>` with
//! `{"tenant":..,"user":..,"room":..}`, answered by `200 {"allow":bool}`,
//! or `403`/`404` for no. Plain HTTP/1 (point it at a sidecar or an internal
//! service); every request is bounded by a timeout and a body size cap.

use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use roomcast_protocol::{RoomName, TenantId, UserId};
use serde::{Deserialize, Serialize};

use crate::AuthConfigError;

/// Largest callback response body read; the answer is a few bytes.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Why the callback gave no usable answer. Logged, then treated as a deny.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallbackError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("request failed")]
    Request(#[source] hyper_util::client::legacy::Error),
    #[error("could not build the request")]
    Build(#[source] http::Error),
    #[error("could not read the response body")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("unexpected status {0}")]
    Status(StatusCode),
    #[error("response is not {{\"allow\": bool}}")]
    Answer(#[source] serde_json::Error),
}

#[derive(Serialize)]
struct Question<'a> {
    tenant: &'a TenantId,
    user: &'a UserId,
    room: &'a RoomName,
}

#[derive(Deserialize)]
struct Answer {
    allow: bool,
}

/// A configured callback endpoint with its pooled HTTP/1 client.
pub(crate) struct Callback {
    client: Client<HttpConnector, Full<Bytes>>,
    uri: Uri,
    timeout: Duration,
}

impl Callback {
    /// Checks that `url` is `http://host[:port]/path` and builds the client.
    pub(crate) fn new(url: &str, timeout: Duration) -> Result<Self, AuthConfigError> {
        let uri: Uri = url
            .parse()
            .map_err(|source| AuthConfigError::InvalidCallbackUrl {
                url: url.to_owned(),
                source,
            })?;
        let unsupported = |reason| AuthConfigError::UnsupportedCallbackUrl {
            url: url.to_owned(),
            reason,
        };
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => return Err(unsupported("https is not supported; use http://")),
            _ => return Err(unsupported("the scheme must be http://")),
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(unsupported("the host is missing"));
        }
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Self {
            client,
            uri,
            timeout,
        })
    }

    /// Asks whether `user` of `tenant` may join `room`.
    pub(crate) async fn ask(
        &self,
        tenant: &TenantId,
        user: &UserId,
        room: &RoomName,
    ) -> Result<bool, CallbackError> {
        let body =
            serde_json::to_vec(&Question { tenant, user, room }).map_err(CallbackError::Answer)?;
        let request = Request::builder()
            .method(Method::POST)
            .uri(self.uri.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(CallbackError::Build)?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(CallbackError::Request)?;
            let status = response.status();
            if status == StatusCode::FORBIDDEN || status == StatusCode::NOT_FOUND {
                return Ok(false);
            }
            if status != StatusCode::OK {
                return Err(CallbackError::Status(status));
            }
            let bytes = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(CallbackError::Body)?
                .to_bytes();
            let answer: Answer = serde_json::from_slice(&bytes).map_err(CallbackError::Answer)?;
            Ok(answer.allow)
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| CallbackError::Timeout(self.timeout))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_urls_are_accepted() {
        let t = Duration::from_secs(1);
        assert!(Callback::new("http://127.0.0.1:8080/authz", t).is_ok());
        assert!(Callback::new("http://authz.internal/v1/check", t).is_ok());
        for (bad, want) in [
            ("https://authz/check", "https"),
            ("ftp://authz/check", "scheme"),
            ("/just/a/path", "scheme"),
        ] {
            match Callback::new(bad, t) {
                Err(e @ AuthConfigError::UnsupportedCallbackUrl { .. }) => {
                    assert!(e.to_string().contains(want), "{bad}: {e}")
                }
                Err(e) => panic!("{bad}: unexpected {e:?}"),
                Ok(_) => panic!("{bad} accepted"),
            }
        }
        assert!(matches!(
            Callback::new("http://a b/", t),
            Err(AuthConfigError::InvalidCallbackUrl { .. })
        ));
    }
}
