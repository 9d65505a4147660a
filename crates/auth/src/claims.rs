//! [`ClaimNames`]: which JWT claims carry the user, tenant, teams, roles and
//! rooms. Issuers disagree (`sub` or `user_id`, `tenant` or `tenant_id`), so
//! the names are configuration, shared by verifying and minting.

use serde::{Deserialize, Serialize};

/// The claim names roomcast reads (and [`mint_hs256`](crate::mint_hs256) writes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClaimNames {
    /// The user id claim; default `sub`.
    pub user: String,
    /// The tenant id claim; default `tenant`. May be absent from a token when
    /// the verifier has a default tenant.
    pub tenant: String,
    /// The team ids claim (strings or numbers); default `teams`.
    pub teams: String,
    /// The roles claim; default `roles`.
    pub roles: String,
    /// Explicitly granted rooms (`kind:id` strings); default `rooms`.
    pub rooms: String,
}

impl Default for ClaimNames {
    fn default() -> Self {
        Self {
            user: "sub".to_owned(),
            tenant: "tenant".to_owned(),
            teams: "teams".to_owned(),
            roles: "roles".to_owned(),
            rooms: "rooms".to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_names() {
        let n = ClaimNames::default();
        assert_eq!(
            [&n.user, &n.tenant, &n.teams, &n.roles, &n.rooms],
            ["sub", "tenant", "teams", "roles", "rooms"]
        );
    }

    #[test]
    fn partial_config_keeps_other_defaults() {
        let n: ClaimNames =
            serde_json::from_str(r#"{"user":"user_id","tenant":"tenant_id"}"#).unwrap();
        assert_eq!(n.user, "user_id");
        assert_eq!(n.tenant, "tenant_id");
        assert_eq!(n.teams, "teams");
    }
}
