//! Token minting, for the `roomcast token` command and for tests. Writes the
//! same [`ClaimNames`] the verifier reads, and can build deliberately bad
//! tokens (expired, not yet valid, no `exp`) for failure tests.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Map, Value};

use crate::{AuthConfigError, ClaimNames, JwtAlgorithm};

/// When a minted token expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// This long after minting.
    In(Duration),
    /// At this unix second (in the past for an expired token).
    At(u64),
    /// No `exp` claim at all: the verifier refuses such tokens.
    Never,
}

/// The claims of a token to mint. Build with [`MintClaims::new`] and adjust
/// the public fields.
#[derive(Debug, Clone, PartialEq)]
pub struct MintClaims {
    /// The user id, written under `names.user`.
    pub sub: String,
    /// The tenant id, written under `names.tenant`; `None` leaves it out.
    pub tenant: Option<String>,
    /// Team ids; left out when empty.
    pub teams: Vec<String>,
    /// Roles; left out when empty.
    pub roles: Vec<String>,
    /// Explicit room grants (`kind:id`); left out when empty. Not validated
    /// here, so tests can mint invalid ones.
    pub rooms: Vec<String>,
    /// When the token expires; default one hour from now.
    pub expiry: Expiry,
    /// `nbf`, unix seconds, if any.
    pub not_before: Option<u64>,
    /// Which claim names to write.
    pub names: ClaimNames,
    /// Any other claims. Written last, so they can also override the ones
    /// above (handy for odd shapes in tests, e.g. numeric teams).
    pub extra: Map<String, Value>,
}

impl MintClaims {
    /// Claims for `sub` in `tenant`, expiring in an hour, default claim names.
    pub fn new(sub: impl Into<String>, tenant: impl Into<String>) -> Self {
        Self {
            sub: sub.into(),
            tenant: Some(tenant.into()),
            teams: Vec::new(),
            roles: Vec::new(),
            rooms: Vec::new(),
            expiry: Expiry::In(Duration::from_secs(3600)),
            not_before: None,
            names: ClaimNames::default(),
            extra: Map::new(),
        }
    }

    /// The JSON claims object this would sign, as of `now` (unix seconds).
    pub fn to_json(&self, now: u64) -> Map<String, Value> {
        let mut m = Map::new();
        let n = &self.names;
        m.insert(n.user.clone(), Value::from(self.sub.as_str()));
        if let Some(t) = &self.tenant {
            m.insert(n.tenant.clone(), Value::from(t.as_str()));
        }
        for (name, list) in [
            (&n.teams, &self.teams),
            (&n.roles, &self.roles),
            (&n.rooms, &self.rooms),
        ] {
            if !list.is_empty() {
                m.insert(name.clone(), Value::from(list.clone()));
            }
        }
        m.insert("iat".to_owned(), Value::from(now));
        match self.expiry {
            Expiry::In(ttl) => {
                m.insert(
                    "exp".to_owned(),
                    Value::from(now.saturating_add(ttl.as_secs())),
                );
            }
            Expiry::At(exp) => {
                m.insert("exp".to_owned(), Value::from(exp));
            }
            Expiry::Never => {}
        }
        if let Some(nbf) = self.not_before {
            m.insert("nbf".to_owned(), Value::from(nbf));
        }
        m.extend(self.extra.clone());
        m
    }
}

/// Seconds since the unix epoch, as the verifier sees them.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Mints an HS256 token signed with `secret`.
pub fn mint_hs256(secret: &[u8], claims: &MintClaims) -> String {
    let key = EncodingKey::from_secret(secret);
    jsonwebtoken::encode(
        &Header::new(jsonwebtoken::Algorithm::HS256),
        &claims.to_json(unix_now()),
        &key,
    )
    // HMAC accepts any key length and a JSON map always serializes.
    .expect("HS256 signing of a JSON object cannot fail")
}

/// Mints a token with a PEM private key (PKCS#8, or PKCS#1 for RSA), or with
/// a shared secret given as the "PEM" bytes when `algorithm` is HS256.
pub fn mint_with_key(
    algorithm: JwtAlgorithm,
    key: &[u8],
    claims: &MintClaims,
) -> Result<String, AuthConfigError> {
    let encoding_key = match algorithm {
        JwtAlgorithm::HS256 => Ok(EncodingKey::from_secret(key)),
        JwtAlgorithm::RS256 => EncodingKey::from_rsa_pem(key),
        JwtAlgorithm::ES256 => EncodingKey::from_ec_pem(key),
    }
    .map_err(|source| AuthConfigError::InvalidKey { algorithm, source })?;
    jsonwebtoken::encode(
        &Header::new(algorithm.to_jwt()),
        &claims.to_json(unix_now()),
        &encoding_key,
    )
    .map_err(|source| AuthConfigError::Signing { algorithm, source })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn writes_configured_claim_names_and_expiry() {
        let mut c = MintClaims::new("u1", "acme");
        c.names.user = "user_id".into();
        c.names.tenant = "tenant_id".into();
        c.teams = vec!["t1".into()];
        c.expiry = Expiry::In(Duration::from_secs(60));
        let j = Value::Object(c.to_json(1000));
        assert_eq!(
            j,
            json!({"user_id": "u1", "tenant_id": "acme", "teams": ["t1"], "iat": 1000, "exp": 1060})
        );
    }

    #[test]
    fn never_omits_exp_and_extra_overrides() {
        let mut c = MintClaims::new("u1", "acme");
        c.expiry = Expiry::Never;
        c.not_before = Some(5);
        c.extra.insert("teams".into(), json!([1, 2]));
        let j = c.to_json(1000);
        assert!(!j.contains_key("exp"));
        assert_eq!(j["nbf"], json!(5));
        assert_eq!(j["teams"], json!([1, 2]));
    }

    #[test]
    fn bad_pem_is_a_clear_error() {
        let c = MintClaims::new("u1", "acme");
        let err = mint_with_key(JwtAlgorithm::RS256, b"not a key", &c).unwrap_err();
        assert!(matches!(err, AuthConfigError::InvalidKey { .. }), "{err:?}");
    }
}
