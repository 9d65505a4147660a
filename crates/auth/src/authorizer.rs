//! [`Authorizer`]: may this identity join this room? Always answered inside
//! the identity's own tenant, and never "yes" because something failed.
//!
//! The rules, in order:
//! 1. a room listed in the token's rooms claim is allowed;
//! 2. `user:<id>` is allowed only to that user;
//! 3. `team:<id>` is allowed only to members of that team (per the token);
//! 4. anything else is asked of the HTTP callback (cached briefly), and
//!    denied when no callback is configured or it gives no usable answer.

use std::fmt;
use std::time::Duration;

use roomcast_protocol::native::ErrorCode;
use roomcast_protocol::RoomName;

use crate::cache::DecisionCache;
use crate::callback::Callback;
use crate::{AuthConfigError, Identity};

/// How room access is decided beyond the token's own claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizerConfig {
    /// `http://host[:port]/path` asked about rooms the token does not settle.
    /// `None` denies those rooms.
    pub callback_url: Option<String>,
    /// Bound on one callback exchange, connect included; default 2s.
    pub timeout: Duration,
    /// How long an answer (allow or deny) is reused; default 30s. Zero
    /// disables caching. Failures are never cached.
    pub cache_ttl: Duration,
    /// Most answers held at once; default 100 000. Zero disables caching.
    pub cache_max_entries: usize,
}

impl Default for AuthorizerConfig {
    fn default() -> Self {
        Self {
            callback_url: None,
            timeout: Duration::from_secs(2),
            cache_ttl: Duration::from_secs(30),
            cache_max_entries: 100_000,
        }
    }
}

/// The answer for one room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The identity may join.
    Allow,
    /// It may not, and why.
    Deny(DenyReason),
}

impl Decision {
    /// Whether this is [`Decision::Allow`].
    pub fn is_allowed(self) -> bool {
        self == Decision::Allow
    }
}

/// Why a room was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// A `user:<id>` room of someone else.
    NotOwnUserRoom,
    /// A `team:<id>` room of a team the token does not list.
    NotInTeam,
    /// The callback said no (`allow: false`, 403 or 404).
    CallbackDenied,
    /// The room needs the callback and none is configured.
    NoCallback,
    /// The callback could not be asked or gave no usable answer (timeout,
    /// connection error, unexpected status or body).
    CallbackUnavailable,
}

impl DenyReason {
    /// A short snake_case label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::NotOwnUserRoom => "not_own_user_room",
            DenyReason::NotInTeam => "not_in_team",
            DenyReason::CallbackDenied => "callback_denied",
            DenyReason::NoCallback => "no_callback",
            DenyReason::CallbackUnavailable => "callback_unavailable",
        }
    }

    /// The protocol error the client is told: `INTERNAL_ERROR` when the
    /// callback was unavailable (retrying may help), else `AUTHORIZATION_FAILED`.
    pub fn error_code(self) -> ErrorCode {
        match self {
            DenyReason::CallbackUnavailable => ErrorCode::InternalError,
            _ => ErrorCode::AuthorizationFailed,
        }
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DenyReason::NotOwnUserRoom => "a user room is only open to that user",
            DenyReason::NotInTeam => "not a member of this team",
            DenyReason::CallbackDenied => "access to this room was denied",
            DenyReason::NoCallback => "no rule grants access to this room",
            DenyReason::CallbackUnavailable => "room access could not be checked; try again",
        })
    }
}

/// Decides room access. Share one per node (`Arc<Authorizer>`): it holds the
/// callback's connection pool and the answer cache.
pub struct Authorizer {
    callback: Option<Callback>,
    cache: DecisionCache,
}

impl fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authorizer")
            .field("callback", &self.callback.is_some())
            .finish_non_exhaustive()
    }
}

impl Authorizer {
    /// Builds an authorizer; fails if the callback URL is not plain `http://`.
    pub fn new(config: AuthorizerConfig) -> Result<Authorizer, AuthConfigError> {
        let callback = config
            .callback_url
            .as_deref()
            .map(|url| Callback::new(url, config.timeout))
            .transpose()?;
        Ok(Authorizer {
            callback,
            cache: DecisionCache::new(config.cache_ttl, config.cache_max_entries),
        })
    }

    /// Whether a callback is configured.
    pub fn has_callback(&self) -> bool {
        self.callback.is_some()
    }

    /// The rules that need no I/O. `None` means the callback must be asked
    /// (see [`Authorizer::ask_callback`]), so hot paths can skip awaiting.
    pub fn authorize_static(&self, identity: &Identity, room: &RoomName) -> Option<Decision> {
        if identity.rooms.contains(room) {
            return Some(Decision::Allow);
        }
        match room.kind() {
            "user" if room.id() == identity.user.as_str() => Some(Decision::Allow),
            "user" => Some(Decision::Deny(DenyReason::NotOwnUserRoom)),
            "team" if identity.in_team(room.id()) => Some(Decision::Allow),
            "team" => Some(Decision::Deny(DenyReason::NotInTeam)),
            _ => None,
        }
    }

    /// The full decision: [`Authorizer::authorize_static`], else the callback.
    pub async fn authorize(&self, identity: &Identity, room: &RoomName) -> Decision {
        match self.authorize_static(identity, room) {
            Some(decision) => decision,
            None => self.ask_callback(identity, room).await,
        }
    }

    /// Asks the callback about `room` for this identity, skipping the static
    /// rules: the seam for dialects that map their own names onto rooms (a
    /// task or conversation membership check). Answers are cached per
    /// (tenant, user, room); concurrent identical questions share one request.
    pub async fn ask_callback(&self, identity: &Identity, room: &RoomName) -> Decision {
        let Some(callback) = &self.callback else {
            return Decision::Deny(DenyReason::NoCallback);
        };
        let key = (identity.tenant.clone(), identity.user.clone(), room.clone());
        if let Some(allow) = self.cache.get(&key) {
            return allowed(allow);
        }
        let flight = self.cache.flight(&key);
        let answer = *flight
            .get_or_init(|| async {
                // Another flight may have landed between our cache miss and
                // joining; its answer is as good as a new one.
                if let Some(allow) = self.cache.get(&key) {
                    return Some(allow);
                }
                match callback.ask(&identity.tenant, &identity.user, room).await {
                    Ok(allow) => {
                        self.cache.insert(key.clone(), allow);
                        Some(allow)
                    }
                    Err(error) => {
                        tracing::warn!(
                            tenant = %identity.tenant,
                            user = %identity.user,
                            %room,
                            error = &error as &dyn std::error::Error,
                            "authorization callback unavailable; denying"
                        );
                        None
                    }
                }
            })
            .await;
        self.cache.land(&key, &flight);
        match answer {
            Some(allow) => allowed(allow),
            None => Decision::Deny(DenyReason::CallbackUnavailable),
        }
    }
}

fn allowed(allow: bool) -> Decision {
    if allow {
        Decision::Allow
    } else {
        Decision::Deny(DenyReason::CallbackDenied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Identity {
        Identity {
            user: "u1".parse().unwrap(),
            tenant: "acme".parse().unwrap(),
            teams: vec!["7".into(), "blue".into()],
            roles: vec![],
            rooms: vec!["board:b1".parse().unwrap(), "user:u2".parse().unwrap()],
            expires_at: 0,
        }
    }

    fn room(s: &str) -> RoomName {
        s.parse().unwrap()
    }

    #[test]
    fn static_rules() {
        let a = Authorizer::new(AuthorizerConfig::default()).unwrap();
        let id = identity();
        let deny = |r| Some(Decision::Deny(r));
        assert_eq!(
            a.authorize_static(&id, &room("user:u1")),
            Some(Decision::Allow)
        );
        assert_eq!(
            a.authorize_static(&id, &room("user:u3")),
            deny(DenyReason::NotOwnUserRoom)
        );
        assert_eq!(
            a.authorize_static(&id, &room("team:7")),
            Some(Decision::Allow)
        );
        assert_eq!(
            a.authorize_static(&id, &room("team:blue")),
            Some(Decision::Allow)
        );
        assert_eq!(
            a.authorize_static(&id, &room("team:8")),
            deny(DenyReason::NotInTeam)
        );
        // Explicit grants win, even for another user's room.
        assert_eq!(
            a.authorize_static(&id, &room("board:b1")),
            Some(Decision::Allow)
        );
        assert_eq!(
            a.authorize_static(&id, &room("user:u2")),
            Some(Decision::Allow)
        );
        assert_eq!(a.authorize_static(&id, &room("board:b2")), None);
        assert_eq!(a.authorize_static(&id, &room("task:t1")), None);
    }

    #[tokio::test]
    async fn without_a_callback_other_rooms_are_denied() {
        let a = Authorizer::new(AuthorizerConfig::default()).unwrap();
        assert!(!a.has_callback());
        let d = a.authorize(&identity(), &room("task:t1")).await;
        assert_eq!(d, Decision::Deny(DenyReason::NoCallback));
        assert!(a.authorize(&identity(), &room("team:7")).await.is_allowed());
    }

    #[test]
    fn deny_reasons_map_to_protocol_codes() {
        assert_eq!(
            DenyReason::CallbackUnavailable.error_code(),
            ErrorCode::InternalError
        );
        for r in [
            DenyReason::NotOwnUserRoom,
            DenyReason::NotInTeam,
            DenyReason::CallbackDenied,
            DenyReason::NoCallback,
        ] {
            assert_eq!(r.error_code(), ErrorCode::AuthorizationFailed, "{r:?}");
        }
        assert_eq!(
            DenyReason::CallbackUnavailable.as_str(),
            "callback_unavailable"
        );
    }
}
