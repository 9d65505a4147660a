//! [`Identity`]: who a verified token says the client is, and how it is read
//! out of the token's claims.

use std::sync::Arc;

use roomcast_protocol::{IdError, RoomKey, RoomName, TenantId, UserId};
use serde_json::{Map, Value};

use crate::{AuthFailure, ClaimNames};

/// A verified client: the output of [`Verifier::verify`](crate::Verifier::verify)
/// and the input of every room decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user the token was issued to.
    pub user: UserId,
    /// The tenant every room of this client lives in.
    pub tenant: TenantId,
    /// Team ids; grant `team:<id>` rooms. Numbers in the token are stringified.
    pub teams: Vec<Arc<str>>,
    /// Free-form roles, for dialects and callbacks that care.
    pub roles: Vec<Arc<str>>,
    /// Rooms granted explicitly by the token.
    pub rooms: Vec<RoomName>,
    /// The token's `exp`, unix seconds: the session should end by then.
    pub expires_at: u64,
}

impl Identity {
    /// Whether the token carries `role`.
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| &**r == role)
    }

    /// Whether the token lists team `team`.
    pub fn in_team(&self, team: &str) -> bool {
        self.teams.iter().any(|t| &**t == team)
    }

    /// `room` inside this identity's tenant: the only key it may ever reach.
    pub fn room_key(&self, room: RoomName) -> RoomKey {
        RoomKey::new(self.tenant.clone(), room)
    }

    /// Reads an identity from verified claims.
    pub(crate) fn from_claims(
        claims: &Map<String, Value>,
        names: &ClaimNames,
        default_tenant: Option<&TenantId>,
        expires_at: u64,
    ) -> Result<Self, AuthFailure> {
        let user = match present(claims, &names.user) {
            Some(v) => id_claim(&names.user, v)?,
            None => return Err(AuthFailure::MissingClaim(names.user.clone())),
        };
        let tenant = match (present(claims, &names.tenant), default_tenant) {
            (Some(v), _) => id_claim(&names.tenant, v)?,
            (None, Some(t)) => t.clone(),
            (None, None) => return Err(AuthFailure::MissingClaim(names.tenant.clone())),
        };
        let teams = string_list(claims, &names.teams)?;
        let roles = string_list(claims, &names.roles)?;
        let rooms = string_list(claims, &names.rooms)?
            .iter()
            .enumerate()
            .map(|(i, r)| {
                r.parse::<RoomName>().map_err(|e| {
                    AuthFailure::invalid(&names.rooms, format!("entry {i}: {}", describe(&e)))
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            user,
            tenant,
            teams,
            roles,
            rooms,
            expires_at,
        })
    }
}

/// A claim that is present and not `null`.
fn present<'a>(claims: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    claims.get(name).filter(|v| !v.is_null())
}

/// A string, or an integer written as its decimal form.
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

/// A user or tenant id claim (string or integer), validated as an id.
fn id_claim<T: std::str::FromStr<Err = IdError>>(name: &str, v: &Value) -> Result<T, AuthFailure> {
    let s =
        scalar(v).ok_or_else(|| AuthFailure::invalid(name, "must be a string or an integer"))?;
    s.parse()
        .map_err(|e| AuthFailure::invalid(name, describe(&e)))
}

/// A list claim: absent means empty; one scalar counts as a one-entry list.
fn string_list(claims: &Map<String, Value>, name: &str) -> Result<Vec<Arc<str>>, AuthFailure> {
    let one = |i: usize, v: &Value| {
        scalar(v)
            .filter(|s| !s.is_empty())
            .map(Arc::from)
            .ok_or_else(|| {
                AuthFailure::invalid(
                    name,
                    format!("entry {i} is not a non-empty string or integer"),
                )
            })
    };
    match present(claims, name) {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().enumerate().map(|(i, v)| one(i, v)).collect(),
        Some(v) => Ok(vec![one(0, v)?]),
    }
}

/// An [`IdError`] without the offending value, which came from the token and
/// may be long: failure messages end up in logs and close frames.
fn describe(e: &IdError) -> &'static str {
    match e {
        IdError::Empty { .. } => "is empty",
        IdError::TooLong { .. } => "is too long",
        IdError::RoomShape(_) => "is not of the form kind:id",
        IdError::RoomKind(_) => "has a room kind outside a-z, 0-9 and _",
        IdError::Charset { .. } => "contains a character outside A-Z a-z 0-9 . _ - @ : = + ~",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn read(v: Value, default_tenant: Option<&str>) -> Result<Identity, AuthFailure> {
        let Value::Object(map) = v else {
            panic!("not an object")
        };
        let dt = default_tenant.map(|t| t.parse().unwrap());
        Identity::from_claims(&map, &ClaimNames::default(), dt.as_ref(), 99)
    }

    #[test]
    fn reads_all_claims_and_stringifies_numeric_teams() {
        let id = read(
            json!({"sub": 7, "tenant": "acme", "teams": ["a", 42], "roles": "admin",
                   "rooms": ["task:t1"]}),
            None,
        )
        .unwrap();
        assert_eq!(id.user.as_str(), "7");
        assert_eq!(id.tenant.as_str(), "acme");
        assert!(id.in_team("42") && id.in_team("a") && !id.in_team("b"));
        assert!(id.has_role("admin") && !id.has_role("owner"));
        assert_eq!(id.rooms, vec!["task:t1".parse::<RoomName>().unwrap()]);
        assert_eq!(id.expires_at, 99);
        assert_eq!(id.room_key(id.rooms[0].clone()).to_string(), "acme/task:t1");
    }

    #[test]
    fn tenant_falls_back_to_default_only_when_absent() {
        let id = read(json!({"sub": "u"}), Some("dflt")).unwrap();
        assert_eq!(id.tenant.as_str(), "dflt");
        let id = read(json!({"sub": "u", "tenant": "acme"}), Some("dflt")).unwrap();
        assert_eq!(id.tenant.as_str(), "acme");
        assert_eq!(
            read(json!({"sub": "u"}), None),
            Err(AuthFailure::MissingClaim("tenant".into()))
        );
    }

    #[test]
    fn rejects_bad_claims_without_echoing_values() {
        let secret_looking = "x y".repeat(50);
        let err = read(
            json!({"sub": "u", "tenant": "t", "rooms": ["team:1", secret_looking]}),
            None,
        )
        .unwrap_err();
        assert_eq!(err.reason(), "invalid_claim");
        assert!(err.to_string().contains("entry 1"), "{err}");
        assert!(!err.to_string().contains("x y"), "{err}");
        for bad in [
            json!({"sub": {"a": 1}, "tenant": "t"}),
            json!({"sub": "u u", "tenant": "t"}),
            json!({"sub": "u", "tenant": "t", "teams": [true]}),
            json!({"sub": "u", "tenant": "t", "teams": [1.5]}),
            json!({"sub": "u", "tenant": "t", "roles": [""]}),
        ] {
            assert_eq!(
                read(bad.clone(), None).unwrap_err().reason(),
                "invalid_claim",
                "{bad}"
            );
        }
        assert_eq!(
            read(json!({"tenant": "t"}), None),
            Err(AuthFailure::MissingClaim("sub".into()))
        );
    }
}
