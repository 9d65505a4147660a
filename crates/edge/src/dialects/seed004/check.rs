//! Validating the roadmap's session cookie, at connect and every
//! `revalidate_interval`: either a JWT in the cookie, verified with the
//! node's key, or the product backend's session introspection endpoint.
//!
//! Introspection: `GET <url>` (or `POST <url>` with `{"token": "<value>"}`),
//! both with `Cookie: <cookie_name>=<value>`. `401`/`403`/`404`, a `null`
//! body, `"valid": false` or no user id mean "invalid"; a `200` JSON body
//! gives the user (`user.id`, `userId`, `user_id` or `sub`) and roles
//! (`user.role` — comma-separated allowed, as better-auth's admin plugin
//! writes it — `user.roles`, `roles` or `role`). Anything else (timeout,
//! other status, unreadable body) is "unavailable": a connect is refused with
//! 503, a connected session is kept and asked again later.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use roomcast_auth::{Identity, Verifier};
use roomcast_protocol::{TenantId, UserId};
use serde_json::Value;

use super::{SessionCheckKind, Settings};
use crate::config::{Config, ConfigError};

/// Largest introspection response read.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// Introspected sessions carry no expiry of their own; re-validation ends them.
const NO_EXPIRY_SECS: u64 = 10 * 365 * 24 * 3600;

/// What one check said.
#[derive(Debug)]
pub(crate) enum Verdict {
    Valid(Identity),
    Invalid(String),
    /// The check could not be made; neither valid nor invalid.
    Unavailable(String),
}

/// The configured session check.
pub(crate) enum SessionCheck {
    Jwt(Verifier),
    Introspect(Introspector),
}

pub(crate) struct Introspector {
    client: Client<HttpConnector, Full<Bytes>>,
    uri: Uri,
    method: Method,
    cookie_name: String,
    tenant: TenantId,
    timeout: Duration,
}

impl SessionCheck {
    pub(crate) fn new(config: &Config, s: &Settings) -> Result<Self, ConfigError> {
        match s.session_check {
            SessionCheckKind::Jwt => Ok(SessionCheck::Jwt(
                crate::auth::verifier_with_default_tenant(config, &s.tenant, "dialects.seed004")?,
            )),
            SessionCheckKind::Introspect => {
                let err = |m: &str| ConfigError(format!("dialects.seed004.introspection_url: {m}"));
                let url = s
                    .introspection_url
                    .as_deref()
                    .ok_or_else(|| err("required with session_check = \"introspect\""))?;
                let uri: Uri = url.parse().map_err(|_| err("not a URL"))?;
                if uri.scheme_str() != Some("http") || uri.host().is_none_or(str::is_empty) {
                    return Err(err("must be http://host[:port]/path"));
                }
                let method = match s.introspection_method.to_ascii_uppercase().as_str() {
                    "GET" => Method::GET,
                    "POST" => Method::POST,
                    _ => {
                        return Err(ConfigError(
                            "dialects.seed004.introspection_method must be GET or POST".into(),
                        ))
                    }
                };
                let tenant = s
                    .tenant
                    .parse()
                    .map_err(|e| ConfigError(format!("dialects.seed004.tenant: {e}")))?;
                let mut connector = HttpConnector::new();
                connector.set_nodelay(true);
                connector.set_connect_timeout(Some(s.introspection_timeout));
                Ok(SessionCheck::Introspect(Introspector {
                    client: Client::builder(TokioExecutor::new()).build(connector),
                    uri,
                    method,
                    cookie_name: s.cookie_name.clone(),
                    tenant,
                    timeout: s.introspection_timeout,
                }))
            }
        }
    }

    /// Checks one cookie value.
    pub(crate) async fn check(&self, credential: &str) -> Verdict {
        match self {
            SessionCheck::Jwt(v) => match v.verify(credential) {
                Ok(identity) => Verdict::Valid(identity),
                Err(e) => Verdict::Invalid(e.to_string()),
            },
            SessionCheck::Introspect(i) => i.check(credential).await,
        }
    }
}

impl Introspector {
    async fn check(&self, credential: &str) -> Verdict {
        match tokio::time::timeout(self.timeout, self.exchange(credential)).await {
            Ok(v) => v,
            Err(_) => Verdict::Unavailable(format!("no answer within {:?}", self.timeout)),
        }
    }

    async fn exchange(&self, credential: &str) -> Verdict {
        let body = if self.method == Method::POST {
            Bytes::from(serde_json::json!({ "token": credential }).to_string())
        } else {
            Bytes::new()
        };
        let request = Request::builder()
            .method(self.method.clone())
            .uri(self.uri.clone())
            .header(header::COOKIE, format!("{}={credential}", self.cookie_name))
            .header(header::ACCEPT, "application/json")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body));
        let request = match request {
            Ok(r) => r,
            // A cookie value that is not a valid header value.
            Err(_) => return Verdict::Invalid("malformed session cookie".into()),
        };
        let response = match self.client.request(request).await {
            Ok(r) => r,
            Err(e) => return Verdict::Unavailable(format!("request failed: {e}")),
        };
        let status = response.status();
        if matches!(
            status,
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND
        ) {
            return Verdict::Invalid(format!("introspection answered {status}"));
        }
        if status != StatusCode::OK {
            return Verdict::Unavailable(format!("unexpected status {status}"));
        }
        let bytes = match Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) => return Verdict::Unavailable(format!("reading the body: {e}")),
        };
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(v) => self.identity_of(&v),
            Err(_) => Verdict::Unavailable("the answer is not JSON".into()),
        }
    }

    /// Reads a user and roles out of an introspection answer.
    fn identity_of(&self, v: &Value) -> Verdict {
        if v.is_null() || v.get("valid") == Some(&Value::Bool(false)) {
            return Verdict::Invalid("no session".into());
        }
        let user = [
            v.pointer("/user/id"),
            v.get("userId"),
            v.get("user_id"),
            v.get("sub"),
        ]
        .into_iter()
        .flatten()
        .find_map(|u| match u {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        });
        let Some(user) = user else {
            return Verdict::Invalid("no user in the session".into());
        };
        let Ok(user) = user.parse::<UserId>() else {
            return Verdict::Invalid("the session's user id is not usable".into());
        };
        let mut roles: Vec<Arc<str>> = Vec::new();
        for r in [
            v.pointer("/user/role"),
            v.pointer("/user/roles"),
            v.get("roles"),
            v.get("role"),
        ]
        .into_iter()
        .flatten()
        {
            let mut add = |s: &str| {
                for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    if !roles.iter().any(|r| &**r == part) {
                        roles.push(part.into());
                    }
                }
            };
            match r {
                Value::String(s) => add(s),
                Value::Array(items) => items.iter().filter_map(Value::as_str).for_each(add),
                _ => {}
            }
        }
        Verdict::Valid(Identity {
            user,
            tenant: self.tenant.clone(),
            teams: Vec::new(),
            roles,
            rooms: Vec::new(),
            expires_at: crate::hub::now_ms() / 1000 + NO_EXPIRY_SECS,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn introspector() -> Introspector {
        let settings = Settings {
            session_check: SessionCheckKind::Introspect,
            introspection_url: Some("http://127.0.0.1:9/session".into()),
            ..Settings::default()
        };
        match SessionCheck::new(&Config::default(), &settings).unwrap() {
            SessionCheck::Introspect(i) => i,
            SessionCheck::Jwt(_) => unreachable!(),
        }
    }

    #[test]
    fn reads_better_auth_and_flat_answers() {
        let i = introspector();
        let Verdict::Valid(id) = i.identity_of(
            &json!({"session": {"id": "s"}, "user": {"id": "u1", "role": "admin,user"}}),
        ) else {
            panic!()
        };
        assert_eq!(id.user.as_str(), "u1");
        assert!(id.has_role("admin") && id.has_role("user"));
        assert_eq!(id.tenant.as_str(), "default");
        let Verdict::Valid(id) =
            i.identity_of(&json!({"valid": true, "userId": 7, "roles": ["x"]}))
        else {
            panic!()
        };
        assert_eq!(id.user.as_str(), "7");
        assert!(id.has_role("x"));
        for invalid in [
            json!(null),
            json!({"valid": false, "userId": "u"}),
            json!({"user": {}}),
            json!({"userId": "a b"}),
        ] {
            assert!(
                matches!(i.identity_of(&invalid), Verdict::Invalid(_)),
                "{invalid}"
            );
        }
    }

    #[test]
    fn introspection_needs_an_http_url() {
        let mut s = Settings {
            session_check: SessionCheckKind::Introspect,
            ..Settings::default()
        };
        assert!(SessionCheck::new(&Config::default(), &s).is_err());
        s.introspection_url = Some("https://x/y".into());
        assert!(SessionCheck::new(&Config::default(), &s).is_err());
        s.introspection_url = Some("http://x/y".into());
        s.introspection_method = "PUT".into();
        assert!(SessionCheck::new(&Config::default(), &s).is_err());
    }
}
