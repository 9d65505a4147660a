//! roomcast's credentials and room access: verifying a client's JWT into an
//! [`Identity`] ([`Verifier`]), finding the token in an upgrade request
//! ([`token_from_request`]), minting tokens for the CLI and tests
//! ([`mint_hs256`], [`mint_with_key`]), and deciding whether an identity may
//! join a room ([`Authorizer`]: token claims first, then an HTTP callback,
//! always inside the identity's tenant and never "allow" on error).
//!
//! This crate decides; it does not enforce. It must not depend on sockets,
//! the hub, sessions or the broker: the edge asks it before upgrading a
//! connection and before subscribing a session, and counts failures by
//! [`AuthFailure::reason`]. Its only network use is the callback's HTTP client.
//! Tokens never appear in its errors or logs.

mod authorizer;
mod cache;
mod callback;
mod claims;
mod error;
mod extract;
mod failure;
mod identity;
mod mint;
mod verifier;

pub use authorizer::{Authorizer, AuthorizerConfig, Decision, DenyReason};
pub use claims::ClaimNames;
pub use error::AuthConfigError;
pub use extract::{percent_decode, token_from_request};
pub use failure::AuthFailure;
pub use identity::Identity;
pub use mint::{mint_hs256, mint_with_key, unix_now, Expiry, MintClaims};
pub use verifier::{JwtAlgorithm, Verifier, VerifierConfig};
