//! [`AuthFailure`]: why a presented token was not accepted.

use std::fmt;

use roomcast_protocol::native::ErrorCode;

/// Why a token was rejected. Neither the variants nor their messages ever
/// contain the token itself, so they are safe to log and to show the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    /// No token was presented at all.
    #[error("no token was presented")]
    MissingToken,
    /// The token is not a well-formed JWT (shape, base64 or JSON).
    #[error("the token is not a well-formed JWT")]
    Malformed,
    /// The signature does not verify with the configured key.
    #[error("the token's signature does not verify")]
    BadSignature,
    /// The token's `alg` is not the configured one (this includes `none`).
    #[error("the token is signed with an algorithm other than the one configured")]
    WrongAlgorithm,
    /// The token's `exp` is in the past (beyond the configured leeway).
    #[error("the token has expired")]
    Expired,
    /// The token's `nbf` is in the future (beyond the configured leeway).
    #[error("the token is not valid yet (nbf is in the future)")]
    NotYetValid,
    /// A required claim is absent. Holds the claim's name.
    #[error("the token has no `{0}` claim")]
    MissingClaim(String),
    /// A claim is present but unusable.
    #[error("the token's `{claim}` claim is invalid: {reason}")]
    InvalidClaim {
        /// The claim's name.
        claim: String,
        /// What is wrong with it (never echoes the value at length).
        reason: String,
    },
}

impl AuthFailure {
    /// A short snake_case label, stable enough for a metrics label
    /// (`roomcast_auth_failures_total{reason="expired"}`).
    pub fn reason(&self) -> &'static str {
        match self {
            AuthFailure::MissingToken => "missing_token",
            AuthFailure::Malformed => "malformed",
            AuthFailure::BadSignature => "bad_signature",
            AuthFailure::WrongAlgorithm => "wrong_algorithm",
            AuthFailure::Expired => "expired",
            AuthFailure::NotYetValid => "not_yet_valid",
            AuthFailure::MissingClaim(_) => "missing_claim",
            AuthFailure::InvalidClaim { .. } => "invalid_claim",
        }
    }

    /// The protocol error code a client is told: always `AUTHENTICATION_FAILED`.
    pub fn error_code(&self) -> ErrorCode {
        ErrorCode::AuthenticationFailed
    }

    pub(crate) fn invalid(claim: &str, reason: impl fmt::Display) -> Self {
        AuthFailure::InvalidClaim {
            claim: claim.to_owned(),
            reason: reason.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_distinct_snake_case_labels() {
        let all = [
            AuthFailure::MissingToken,
            AuthFailure::Malformed,
            AuthFailure::BadSignature,
            AuthFailure::WrongAlgorithm,
            AuthFailure::Expired,
            AuthFailure::NotYetValid,
            AuthFailure::MissingClaim("sub".into()),
            AuthFailure::invalid("rooms", "entry 0 is not a room name"),
        ];
        let mut labels: Vec<_> = all.iter().map(AuthFailure::reason).collect();
        for l in &labels {
            assert!(
                l.bytes().all(|c| c.is_ascii_lowercase() || c == b'_'),
                "{l}"
            );
        }
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), all.len());
    }

    #[test]
    fn messages_name_the_claim() {
        assert_eq!(
            AuthFailure::MissingClaim("tenant_id".into()).to_string(),
            "the token has no `tenant_id` claim"
        );
        assert_eq!(
            AuthFailure::invalid("rooms", "entry 2 is not a room name").to_string(),
            "the token's `rooms` claim is invalid: entry 2 is not a room name"
        );
    }
}
