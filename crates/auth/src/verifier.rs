//! [`Verifier`]: checks a JWT against one pinned algorithm and key, then reads
//! the [`Identity`] out of it. Called before a WebSocket upgrade is accepted.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use roomcast_protocol::TenantId;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::{AuthConfigError, AuthFailure, ClaimNames, Identity};

/// The largest `leeway_secs` accepted: a day. More would make `exp` decorative.
pub(crate) const MAX_LEEWAY_SECS: u64 = 86_400;

/// The signature algorithms roomcast verifies. Exactly one is configured, and
/// a token whose header names any other (`none` included) is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum JwtAlgorithm {
    /// HMAC-SHA256 with a shared secret.
    #[default]
    HS256,
    /// RSASSA-PKCS1-v1_5 with SHA-256; verified with an RSA public key.
    RS256,
    /// ECDSA on P-256 with SHA-256; verified with an EC public key.
    ES256,
}

impl JwtAlgorithm {
    /// The name used in JWT headers (`HS256`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            JwtAlgorithm::HS256 => "HS256",
            JwtAlgorithm::RS256 => "RS256",
            JwtAlgorithm::ES256 => "ES256",
        }
    }

    pub(crate) fn to_jwt(self) -> Algorithm {
        match self {
            JwtAlgorithm::HS256 => Algorithm::HS256,
            JwtAlgorithm::RS256 => Algorithm::RS256,
            JwtAlgorithm::ES256 => Algorithm::ES256,
        }
    }
}

impl FromStr for JwtAlgorithm {
    type Err = AuthConfigError;
    /// Case-insensitive: `hs256`, `HS256` and `Hs256` are the same.
    fn from_str(s: &str) -> Result<Self, AuthConfigError> {
        [
            JwtAlgorithm::HS256,
            JwtAlgorithm::RS256,
            JwtAlgorithm::ES256,
        ]
        .into_iter()
        .find(|a| a.as_str().eq_ignore_ascii_case(s.trim()))
        .ok_or_else(|| AuthConfigError::UnknownAlgorithm(s.chars().take(32).collect()))
    }
}

impl fmt::Display for JwtAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for JwtAlgorithm {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for JwtAlgorithm {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Everything a [`Verifier`] needs. `Debug` redacts the secret.
#[derive(Clone, Default)]
pub struct VerifierConfig {
    /// The one algorithm accepted.
    pub algorithm: JwtAlgorithm,
    /// The shared secret, for HS256 (ignored otherwise).
    pub hs_secret: Option<String>,
    /// The PEM public key (SPKI, or PKCS#1 for RSA), for RS256/ES256 (ignored for HS256).
    pub public_key_pem: Option<String>,
    /// Where the user, tenant, teams, roles and rooms are in the token.
    pub claims: ClaimNames,
    /// Clock skew tolerated on `exp` and `nbf`, in seconds; default 0.
    pub leeway_secs: u64,
    /// The tenant of tokens that carry no tenant claim. `None` makes the
    /// tenant claim required (the safe choice for multi-tenant deployments).
    pub default_tenant: Option<TenantId>,
}

impl fmt::Debug for VerifierConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifierConfig")
            .field("algorithm", &self.algorithm)
            .field("hs_secret", &self.hs_secret.as_ref().map(|_| "<redacted>"))
            .field(
                "public_key_pem",
                &self.public_key_pem.as_ref().map(|_| "<pem>"),
            )
            .field("claims", &self.claims)
            .field("leeway_secs", &self.leeway_secs)
            .field("default_tenant", &self.default_tenant)
            .finish()
    }
}

/// Verifies tokens with one pinned algorithm and key. Cheap to share
/// (`Arc<Verifier>`); `verify` does no I/O.
pub struct Verifier {
    algorithm: JwtAlgorithm,
    key: DecodingKey,
    validation: Validation,
    claims: ClaimNames,
    default_tenant: Option<TenantId>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithm", &self.algorithm)
            .field("claims", &self.claims)
            .field("leeway_secs", &self.validation.leeway)
            .field("default_tenant", &self.default_tenant)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Builds a verifier, failing if the key for the configured algorithm is
    /// missing or does not parse.
    pub fn new(config: VerifierConfig) -> Result<Verifier, AuthConfigError> {
        let algorithm = config.algorithm;
        let key = match algorithm {
            JwtAlgorithm::HS256 => {
                let secret = config.hs_secret.ok_or(AuthConfigError::MissingSecret)?;
                if secret.is_empty() {
                    return Err(AuthConfigError::EmptySecret);
                }
                DecodingKey::from_secret(secret.as_bytes())
            }
            JwtAlgorithm::RS256 | JwtAlgorithm::ES256 => {
                let pem = config
                    .public_key_pem
                    .ok_or(AuthConfigError::MissingPublicKey { algorithm })?;
                let parsed = if algorithm == JwtAlgorithm::RS256 {
                    DecodingKey::from_rsa_pem(pem.as_bytes())
                } else {
                    DecodingKey::from_ec_pem(pem.as_bytes())
                };
                parsed.map_err(|source| AuthConfigError::InvalidKey { algorithm, source })?
            }
        };
        if config.leeway_secs > MAX_LEEWAY_SECS {
            return Err(AuthConfigError::LeewayTooLarge(config.leeway_secs));
        }
        let mut validation = Validation::new(algorithm.to_jwt());
        // `exp` is required, but checked after decoding (see `verify`): the
        // library would report a non-numeric `exp` as missing.
        validation.required_spec_claims.clear();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // Audience and issuer checks are not configured in roomcast (yet);
        // a token's `aud` must not make it fail.
        validation.validate_aud = false;
        validation.leeway = config.leeway_secs;
        Ok(Verifier {
            algorithm,
            key,
            validation,
            claims: config.claims,
            default_tenant: config.default_tenant,
        })
    }

    /// The pinned algorithm.
    pub fn algorithm(&self) -> JwtAlgorithm {
        self.algorithm
    }

    /// Verifies `token` (signature, algorithm, `exp`, `nbf`) and reads the
    /// identity from it. An empty token is [`AuthFailure::MissingToken`].
    pub fn verify(&self, token: &str) -> Result<Identity, AuthFailure> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthFailure::MissingToken);
        }
        // Check the header ourselves first: the JWT library cannot even parse
        // `alg: none`, and would call that malformed rather than refused.
        if header_alg(token)? != self.algorithm.as_str() {
            return Err(AuthFailure::WrongAlgorithm);
        }
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation)
            .map_err(|e| failure_of(e.kind()))?;
        // The library has already refused an `exp` that is present but not
        // unix seconds, and checked it against the clock.
        let expires_at = match data.claims.get("exp") {
            None | Some(Value::Null) => return Err(AuthFailure::MissingClaim("exp".to_owned())),
            Some(exp) => exp
                .as_u64()
                .ok_or_else(|| AuthFailure::invalid("exp", "must be unix seconds"))?,
        };
        Identity::from_claims(
            &data.claims,
            &self.claims,
            self.default_tenant.as_ref(),
            expires_at,
        )
    }
}

/// The `alg` of a compact JWS, without trusting anything else in it.
fn header_alg(token: &str) -> Result<String, AuthFailure> {
    #[derive(Deserialize)]
    struct Header {
        alg: String,
    }
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthFailure::Malformed);
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| AuthFailure::Malformed)?;
    let header: Header = serde_json::from_slice(&bytes).map_err(|_| AuthFailure::Malformed)?;
    Ok(header.alg)
}

/// Maps the JWT library's verdict onto ours. Anything unexpected fails closed.
fn failure_of(kind: &ErrorKind) -> AuthFailure {
    match kind {
        ErrorKind::InvalidSignature
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat => AuthFailure::BadSignature,
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            AuthFailure::WrongAlgorithm
        }
        ErrorKind::ExpiredSignature => AuthFailure::Expired,
        ErrorKind::ImmatureSignature => AuthFailure::NotYetValid,
        ErrorKind::MissingRequiredClaim(c) => AuthFailure::MissingClaim(c.clone()),
        ErrorKind::InvalidClaimFormat(c) => AuthFailure::invalid(c, "must be unix seconds"),
        _ => AuthFailure::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithm_parses_case_insensitively() {
        assert_eq!(
            "hs256".parse::<JwtAlgorithm>().unwrap(),
            JwtAlgorithm::HS256
        );
        assert_eq!(
            "Rs256".parse::<JwtAlgorithm>().unwrap(),
            JwtAlgorithm::RS256
        );
        assert_eq!(
            " ES256 ".parse::<JwtAlgorithm>().unwrap(),
            JwtAlgorithm::ES256
        );
        for bad in ["none", "HS512", ""] {
            assert!(matches!(
                bad.parse::<JwtAlgorithm>(),
                Err(AuthConfigError::UnknownAlgorithm(_))
            ));
        }
        let a: JwtAlgorithm = serde_json::from_str("\"es256\"").unwrap();
        assert_eq!(a, JwtAlgorithm::ES256);
    }

    #[test]
    fn config_debug_redacts_the_secret() {
        let c = VerifierConfig {
            hs_secret: Some("hunter2".into()),
            ..Default::default()
        };
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn header_alg_needs_three_parts_and_json() {
        assert_eq!(header_alg("a.b"), Err(AuthFailure::Malformed));
        assert_eq!(header_alg("a.b.c.d"), Err(AuthFailure::Malformed));
        assert_eq!(header_alg("!!.b.c"), Err(AuthFailure::Malformed));
        let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#);
        assert_eq!(header_alg(&format!("{h}.e30.")).unwrap(), "none");
    }
}
