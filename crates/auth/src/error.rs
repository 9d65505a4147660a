//! Configuration errors: a verifier, minter or authorizer that cannot be built.
//! These surface at startup, so they say exactly which setting is wrong.
//! Per-request failures are [`AuthFailure`](crate::AuthFailure) and
//! [`DenyReason`](crate::DenyReason), not this.

use crate::JwtAlgorithm;

/// Why a [`Verifier`](crate::Verifier), an [`Authorizer`](crate::Authorizer)
/// or a PEM-signed token could not be set up. Never contains key material.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    /// The algorithm name is not one roomcast accepts.
    #[error("unknown JWT algorithm `{0}`: expected HS256, RS256 or ES256")]
    UnknownAlgorithm(String),
    /// HS256 was chosen but no shared secret was given.
    #[error("JWT algorithm HS256 needs a shared secret (hs_secret), and none was set")]
    MissingSecret,
    /// HS256 was chosen with an empty secret, which anyone could sign with.
    #[error("the HS256 shared secret (hs_secret) is empty")]
    EmptySecret,
    /// RS256/ES256 was chosen but no public key was given.
    #[error("JWT algorithm {algorithm} needs a PEM public key (public_key_pem), and none was set")]
    MissingPublicKey {
        /// The configured algorithm.
        algorithm: JwtAlgorithm,
    },
    /// The PEM key does not parse as a key for the configured algorithm.
    #[error("the PEM key is not a valid {algorithm} key")]
    InvalidKey {
        /// The configured algorithm.
        algorithm: JwtAlgorithm,
        /// What the JWT library reported.
        #[source]
        source: jsonwebtoken::errors::Error,
    },
    /// The leeway is large enough to make expiry meaningless.
    #[error("leeway_secs is {0}; at most {max} seconds are allowed", max = crate::verifier::MAX_LEEWAY_SECS)]
    LeewayTooLarge(u64),
    /// Signing a token failed (for example the key type does not fit the algorithm).
    #[error("could not sign a {algorithm} token")]
    Signing {
        /// The algorithm asked for.
        algorithm: JwtAlgorithm,
        /// What the JWT library reported.
        #[source]
        source: jsonwebtoken::errors::Error,
    },
    /// The authorization callback URL does not parse as a URI.
    #[error("authorization callback URL `{url}` is not a valid URI")]
    InvalidCallbackUrl {
        /// The URL as configured.
        url: String,
        /// What the URI parser reported.
        #[source]
        source: http::uri::InvalidUri,
    },
    /// The authorization callback URL is not a plain `http://host[:port]/path` URL.
    #[error("authorization callback URL `{url}` must be http://host[:port]/path ({reason})")]
    UnsupportedCallbackUrl {
        /// The URL as configured.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}
