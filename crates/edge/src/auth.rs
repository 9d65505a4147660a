//! Builds the credential checks a node's config asks for.

use roomcast_auth::{
    Authorizer, AuthorizerConfig, ClaimNames, JwtAlgorithm, Verifier, VerifierConfig,
};

use crate::config::{Config, ConfigError};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The verifier settings `config.auth` asks for (algorithm, key, claim
/// names, leeway); dialects adjust claim names or the default tenant.
pub(crate) fn verifier_config(config: &Config) -> Result<VerifierConfig, ConfigError> {
    let a = &config.auth;
    let public_key_pem = match &a.jwt_public_key_file {
        Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
            ConfigError(format!(
                "reading auth.jwt_public_key_file {}: {e}",
                path.display()
            ))
        })?),
        None => None,
    };
    let algorithm: JwtAlgorithm = a
        .algorithm
        .parse()
        .map_err(|e| ConfigError(format!("auth.algorithm: {e}")))?;
    Ok(VerifierConfig {
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
    })
}

pub(crate) fn verifier(config: &Config) -> Result<Verifier, BoxError> {
    Ok(Verifier::new(verifier_config(config)?)?)
}

/// A verifier like the node's, but with `tenant` as the default tenant:
/// seed products issue tokens without a tenant claim.
pub(crate) fn verifier_with_default_tenant(
    config: &Config,
    tenant: &str,
    what: &str,
) -> Result<Verifier, ConfigError> {
    let mut vc = verifier_config(config)?;
    vc.default_tenant = Some(
        tenant
            .parse()
            .map_err(|e| ConfigError(format!("{what}.tenant: {e}")))?,
    );
    Verifier::new(vc).map_err(|e| ConfigError(format!("{what}: {e}")))
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
