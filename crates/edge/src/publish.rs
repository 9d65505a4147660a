//! `POST /v1/publish`: an Event in its JSON form, from a service holding a
//! publisher token (publishes into its own tenant) or a static API key
//! (any tenant, named in the body).

use std::sync::Arc;

use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use roomcast_broker::BrokerError;
use roomcast_protocol::native::ErrorCode;
use roomcast_protocol::{Event, EventDefaults, EventJson, TenantId};

use crate::http::{json, json_error, Body};
use crate::node::Node;

/// The role a client token needs to publish.
pub const PUBLISHER_ROLE: &str = "publisher";

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Who is publishing: a trusted service (any tenant) or a token's tenant.
enum Publisher {
    Service,
    Tenant(TenantId),
}

fn authenticate(node: &Node, req: &Request<Incoming>) -> Result<Publisher, Box<Response<Body>>> {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(bearer) = bearer else {
        metrics::counter!("roomcast_auth_failures_total", "reason" => "missing_token").increment(1);
        return Err(Box::new(json_error(
            StatusCode::UNAUTHORIZED,
            ErrorCode::AuthenticationFailed,
            "publishing needs Authorization: Bearer <publisher token or API key>",
        )));
    };
    if node
        .config()
        .publish
        .api_keys
        .iter()
        .any(|k| constant_time_eq(k.as_bytes(), bearer.as_bytes()))
    {
        return Ok(Publisher::Service);
    }
    match node.verifier().verify(bearer) {
        Ok(identity) if identity.has_role(PUBLISHER_ROLE) => Ok(Publisher::Tenant(identity.tenant)),
        Ok(_) => Err(Box::new(json_error(
            StatusCode::FORBIDDEN,
            ErrorCode::AuthorizationFailed,
            "the token lacks the `publisher` role",
        ))),
        Err(e) => {
            metrics::counter!("roomcast_auth_failures_total", "reason" => e.reason()).increment(1);
            Err(Box::new(json_error(
                StatusCode::UNAUTHORIZED,
                ErrorCode::AuthenticationFailed,
                &e.to_string(),
            )))
        }
    }
}

/// Refuses a publish the node cannot take now: too many in flight (429),
/// or deliveries running late (503). Either way with `Retry-After`.
fn push_back(node: &Node) -> Option<Response<Body>> {
    let settings = &node.config().publish;
    let lag = node.hub().recent_lag_ms();
    let (status, message) = if lag > settings.max_delivery_lag.as_millis() as u64 {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("deliveries are running {lag} ms behind; publish again shortly"),
        )
    } else if node.publishes_in_flight() >= settings.max_in_flight {
        (
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "more than {} publishes in flight on this node",
                settings.max_in_flight
            ),
        )
    } else {
        return None;
    };
    metrics::counter!("roomcast_publish_rejected_total", "reason" => if status == StatusCode::SERVICE_UNAVAILABLE { "lag" } else { "in_flight" }).increment(1);
    let mut resp = json_error(status, ErrorCode::RateLimitExceeded, &message);
    resp.headers_mut()
        .insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
    Some(resp)
}

pub(crate) async fn handle(node: Arc<Node>, req: Request<Incoming>) -> Response<Body> {
    let publisher = match authenticate(&node, &req) {
        Ok(p) => p,
        Err(resp) => return *resp,
    };
    if let Some(refusal) = push_back(&node) {
        return refusal;
    }
    let _in_flight = node.publish_started();
    let limit = node.config().publish.max_body_bytes;
    let body = match Limited::new(req.into_body(), limit).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return json_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::MessageTooLarge,
                &format!("publish bodies are limited to {limit} bytes"),
            )
        }
        Err(e) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidMessage,
                &e.to_string(),
            )
        }
    };
    let form: EventJson<'_> = match serde_json::from_slice(&body) {
        Ok(f) => f,
        Err(e) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidMessage,
                &format!("invalid event: {e}"),
            )
        }
    };
    let default_tenant = match &publisher {
        Publisher::Service => None,
        Publisher::Tenant(t) => {
            if form
                .tenant
                .as_deref()
                .is_some_and(|named| named != t.as_str())
            {
                return json_error(
                    StatusCode::FORBIDDEN,
                    ErrorCode::AuthorizationFailed,
                    "a publisher token publishes into its own tenant only",
                );
            }
            Some(t.clone())
        }
    };
    let defaults = EventDefaults {
        tenant: default_tenant,
        now_ms: crate::hub::now_ms(),
    };
    let event = match Event::from_json_form(form, &defaults) {
        Ok(e) => e,
        Err(e) => {
            return json_error(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidMessage,
                &format!("invalid event: {e}"),
            )
        }
    };
    match node.broker().publish(event).await {
        Ok(published) => {
            metrics::counter!("roomcast_events_published_total").increment(1);
            let ids: serde_json::Map<String, serde_json::Value> = published
                .ids
                .iter()
                .map(|(room, id)| (room.to_string(), serde_json::Value::String(id.to_string())))
                .collect();
            let first = published.ids.first().map(|(_, id)| id.to_string());
            json(
                StatusCode::OK,
                &serde_json::json!({ "id": first, "ids": ids }),
            )
        }
        Err(BrokerError::Conflict(m)) => json_error(StatusCode::CONFLICT, ErrorCode::Conflict, &m),
        Err(e @ BrokerError::Overloaded(_)) => json_error(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::RateLimitExceeded,
            &e.to_string(),
        ),
        Err(e @ BrokerError::Unavailable { .. }) => {
            tracing::warn!(error = %e, "publish failed");
            json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::InternalError,
                "broker unavailable; retry",
            )
        }
    }
}
