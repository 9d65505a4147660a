//! Builds the credential checks a node's config asks for.

use roomcast_auth::{
    Authorizer, AuthorizerConfig, ClaimNames, JwtAlgorithm, Verifier, VerifierConfig,
};

use crate::config::Config;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub(crate) fn verifier(config: &Config) -> Result<Verifier, BoxError> {
    let a = &config.auth;
    let public_key_pem = match &a.jwt_public_key_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|e| format!("reading auth.jwt_public_key_file {}: {e}", path.display()))?,
        ),
        None => None,
    };
    let algorithm: JwtAlgorithm = a.algorithm.parse()?;
    Ok(Verifier::new(VerifierConfig {
        algorithm,
        hs_secret: a.jwt_secret.clone(),
        public_key_pem,
        claims: ClaimNames {
            user: a.claim_user.clone(),
            tenant: a.claim_tenant.clone(),
            teams: a.claim_teams.clone(),
            roles: a.claim_roles.clone(),
            rooms: a.claim_rooms.clone(),
        },
        leeway_secs: a.leeway_secs,
        default_tenant: None,
    })?)
}

pub(crate) fn authorizer(config: &Config) -> Result<Authorizer, BoxError> {
    let a = &config.auth;
    Ok(Authorizer::new(AuthorizerConfig {
        callback_url: a.authz_callback_url.clone(),
        timeout: a.authz_timeout,
        cache_ttl: a.authz_cache_ttl,
        ..AuthorizerConfig::default()
    })?)
}
