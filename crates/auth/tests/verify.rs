//! The verifier against real tokens: HS256, RS256 and ES256 round trips, and
//! every way a token must be refused.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use roomcast_auth::{
    mint_hs256, mint_with_key, unix_now, AuthConfigError, AuthFailure, ClaimNames, Expiry,
    JwtAlgorithm, MintClaims, Verifier, VerifierConfig,
};
use serde_json::json;

const SECRET: &str = "test-secret-of-reasonable-length";
const RSA_PRIVATE: &str = include_str!("keys/rsa_private.pem");
const RSA_PUBLIC: &str = include_str!("keys/rsa_public.pem");
const RSA_OTHER_PRIVATE: &str = include_str!("keys/rsa_other_private.pem");
const EC_PRIVATE: &str = include_str!("keys/ec_private.pem");
const EC_PUBLIC: &str = include_str!("keys/ec_public.pem");

fn hs_config() -> VerifierConfig {
    VerifierConfig {
        algorithm: JwtAlgorithm::HS256,
        hs_secret: Some(SECRET.into()),
        ..Default::default()
    }
}

fn hs_verifier() -> Verifier {
    Verifier::new(hs_config()).unwrap()
}

fn pem_verifier(algorithm: JwtAlgorithm, public: &str) -> Verifier {
    Verifier::new(VerifierConfig {
        algorithm,
        public_key_pem: Some(public.into()),
        ..Default::default()
    })
    .unwrap()
}

fn claims() -> MintClaims {
    let mut c = MintClaims::new("u1", "acme");
    c.teams = vec!["7".into()];
    c.roles = vec!["admin".into()];
    c.rooms = vec!["task:t1".into()];
    c
}

/// A token with this header and payload and a garbage signature.
fn forged(header: serde_json::Value, payload: serde_json::Value, signature: &str) -> String {
    let h = URL_SAFE_NO_PAD.encode(header.to_string());
    let p = URL_SAFE_NO_PAD.encode(payload.to_string());
    format!("{h}.{p}.{signature}")
}

/// Asserts the failure and that neither its message nor its Debug shows the token.
fn refused(v: &Verifier, token: &str, want: AuthFailure) {
    let got = v.verify(token).expect_err("token accepted");
    assert_eq!(got, want);
    if token.len() > 8 {
        assert!(!got.to_string().contains(token));
        assert!(!format!("{got:?}").contains(token));
    }
}

#[test]
fn hs256_round_trip_reads_the_identity() {
    let token = mint_hs256(SECRET.as_bytes(), &claims());
    let id = hs_verifier().verify(&token).unwrap();
    assert_eq!(id.user.as_str(), "u1");
    assert_eq!(id.tenant.as_str(), "acme");
    assert!(id.in_team("7"));
    assert!(id.has_role("admin") && !id.has_role("owner"));
    assert_eq!(id.rooms[0].as_str(), "task:t1");
    let now = unix_now();
    assert!(id.expires_at > now + 3500 && id.expires_at <= now + 3600);
}

#[test]
fn configured_claim_names_and_numeric_teams() {
    let names = ClaimNames {
        user: "user_id".into(),
        tenant: "tenant_id".into(),
        ..Default::default()
    };
    let mut c = MintClaims::new("42", "acme");
    c.names = names.clone();
    c.extra.insert("teams".into(), json!([3, "x"]));
    let token = mint_hs256(SECRET.as_bytes(), &c);
    let v = Verifier::new(VerifierConfig {
        claims: names,
        ..hs_config()
    })
    .unwrap();
    let id = v.verify(&token).unwrap();
    assert_eq!((id.user.as_str(), id.tenant.as_str()), ("42", "acme"));
    assert_eq!(
        id.teams,
        vec!["3".into(), "x".into()] as Vec<std::sync::Arc<str>>
    );
    // The default verifier looks for `sub`, which this token lacks.
    refused(
        &hs_verifier(),
        &token,
        AuthFailure::MissingClaim("sub".into()),
    );
}

#[test]
fn default_tenant_applies_only_when_configured() {
    let mut c = claims();
    c.tenant = None;
    let token = mint_hs256(SECRET.as_bytes(), &c);
    refused(
        &hs_verifier(),
        &token,
        AuthFailure::MissingClaim("tenant".into()),
    );
    let v = Verifier::new(VerifierConfig {
        default_tenant: Some("solo".parse().unwrap()),
        ..hs_config()
    })
    .unwrap();
    assert_eq!(v.verify(&token).unwrap().tenant.as_str(), "solo");
}

#[test]
fn alg_none_is_refused() {
    let payload = json!({"sub": "u1", "tenant": "acme", "exp": unix_now() + 600});
    let v = hs_verifier();
    refused(
        &v,
        &forged(json!({"alg": "none", "typ": "JWT"}), payload.clone(), ""),
        AuthFailure::WrongAlgorithm,
    );
    refused(
        &v,
        &forged(json!({"alg": "None"}), payload.clone(), "c2ln"),
        AuthFailure::WrongAlgorithm,
    );
    refused(
        &v,
        &forged(json!({"typ": "JWT"}), payload, ""),
        AuthFailure::Malformed,
    );
}

#[test]
fn another_algorithm_than_configured_is_refused() {
    let rs = mint_with_key(JwtAlgorithm::RS256, RSA_PRIVATE.as_bytes(), &claims()).unwrap();
    refused(&hs_verifier(), &rs, AuthFailure::WrongAlgorithm);
    // Key confusion: HS256 "signed" with the RSA public key as the secret.
    let confused = mint_hs256(RSA_PUBLIC.as_bytes(), &claims());
    refused(
        &pem_verifier(JwtAlgorithm::RS256, RSA_PUBLIC),
        &confused,
        AuthFailure::WrongAlgorithm,
    );
    let es = mint_with_key(JwtAlgorithm::ES256, EC_PRIVATE.as_bytes(), &claims()).unwrap();
    refused(
        &pem_verifier(JwtAlgorithm::RS256, RSA_PUBLIC),
        &es,
        AuthFailure::WrongAlgorithm,
    );
}

#[test]
fn bad_signatures_are_refused() {
    let v = hs_verifier();
    let other = mint_hs256(b"another-secret", &claims());
    refused(&v, &other, AuthFailure::BadSignature);

    // Swap in a payload granting more, keeping the original signature.
    let token = mint_hs256(SECRET.as_bytes(), &claims());
    let mut parts: Vec<&str> = token.split('.').collect();
    let evil = URL_SAFE_NO_PAD
        .encode(json!({"sub": "root", "tenant": "acme", "exp": unix_now() + 600}).to_string());
    parts[1] = &evil;
    refused(&v, &parts.join("."), AuthFailure::BadSignature);

    let rs_other =
        mint_with_key(JwtAlgorithm::RS256, RSA_OTHER_PRIVATE.as_bytes(), &claims()).unwrap();
    refused(
        &pem_verifier(JwtAlgorithm::RS256, RSA_PUBLIC),
        &rs_other,
        AuthFailure::BadSignature,
    );
}

#[test]
fn expiry_is_required_and_enforced_with_leeway() {
    let v = hs_verifier();
    let mut c = claims();
    c.expiry = Expiry::Never;
    refused(
        &v,
        &mint_hs256(SECRET.as_bytes(), &c),
        AuthFailure::MissingClaim("exp".into()),
    );

    c.expiry = Expiry::At(unix_now() - 5);
    let expired = mint_hs256(SECRET.as_bytes(), &c);
    refused(&v, &expired, AuthFailure::Expired);
    let lenient = Verifier::new(VerifierConfig {
        leeway_secs: 60,
        ..hs_config()
    })
    .unwrap();
    assert!(lenient.verify(&expired).is_ok());

    c.expiry = Expiry::In(Duration::from_secs(60));
    c.extra.insert("exp".into(), json!("tomorrow"));
    let bad_exp = mint_hs256(SECRET.as_bytes(), &c);
    assert_eq!(v.verify(&bad_exp).unwrap_err().reason(), "invalid_claim");
}

#[test]
fn not_before_is_honoured() {
    let v = hs_verifier();
    let mut c = claims();
    c.not_before = Some(unix_now() + 600);
    refused(
        &v,
        &mint_hs256(SECRET.as_bytes(), &c),
        AuthFailure::NotYetValid,
    );
    c.not_before = Some(unix_now() - 10);
    assert!(v.verify(&mint_hs256(SECRET.as_bytes(), &c)).is_ok());
}

#[test]
fn malformed_and_missing_tokens() {
    let v = hs_verifier();
    refused(&v, "", AuthFailure::MissingToken);
    refused(&v, "   ", AuthFailure::MissingToken);
    for bad in ["abc", "a.b", "a.b.c", "a.b.c.d", "...."] {
        let got = v.verify(bad).unwrap_err();
        assert_eq!(got.reason(), "malformed", "{bad}: {got:?}");
    }
    // A valid header whose payload is not JSON.
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256"}"#);
    refused(
        &v,
        &format!("{header}.bm90IGpzb24.c2ln"),
        AuthFailure::BadSignature,
    );
}

#[test]
fn invalid_room_grants_reject_the_token() {
    let mut c = claims();
    c.rooms = vec!["task:ok".into(), "NoColon".into()];
    let token = mint_hs256(SECRET.as_bytes(), &c);
    let err = hs_verifier().verify(&token).unwrap_err();
    assert!(
        matches!(&err, AuthFailure::InvalidClaim { claim, .. } if claim == "rooms"),
        "{err:?}"
    );
}

#[test]
fn rs256_and_es256_round_trips() {
    let rs = mint_with_key(JwtAlgorithm::RS256, RSA_PRIVATE.as_bytes(), &claims()).unwrap();
    let id = pem_verifier(JwtAlgorithm::RS256, RSA_PUBLIC)
        .verify(&rs)
        .unwrap();
    assert_eq!(id.user.as_str(), "u1");
    let es = mint_with_key(JwtAlgorithm::ES256, EC_PRIVATE.as_bytes(), &claims()).unwrap();
    let ev = pem_verifier(JwtAlgorithm::ES256, EC_PUBLIC);
    assert_eq!(ev.verify(&es).unwrap().tenant.as_str(), "acme");
    let mut c = claims();
    c.expiry = Expiry::At(unix_now() - 5);
    let old = mint_with_key(JwtAlgorithm::ES256, EC_PRIVATE.as_bytes(), &c).unwrap();
    refused(&ev, &old, AuthFailure::Expired);
}

#[test]
fn bad_configuration_is_a_clear_error() {
    let err = |c: VerifierConfig| Verifier::new(c).unwrap_err();
    assert!(matches!(
        err(VerifierConfig::default()),
        AuthConfigError::MissingSecret
    ));
    assert!(matches!(
        err(VerifierConfig {
            hs_secret: Some(String::new()),
            ..Default::default()
        }),
        AuthConfigError::EmptySecret
    ));
    let missing = err(VerifierConfig {
        algorithm: JwtAlgorithm::ES256,
        hs_secret: Some(SECRET.into()),
        ..Default::default()
    });
    assert_eq!(
        missing.to_string(),
        "JWT algorithm ES256 needs a PEM public key (public_key_pem), and none was set"
    );
    for (algorithm, pem) in [
        (
            JwtAlgorithm::RS256,
            "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n",
        ),
        (JwtAlgorithm::RS256, "not pem at all"),
        (JwtAlgorithm::ES256, RSA_PUBLIC),
        (JwtAlgorithm::RS256, EC_PUBLIC),
    ] {
        let e = err(VerifierConfig {
            algorithm,
            public_key_pem: Some(pem.into()),
            ..Default::default()
        });
        assert!(
            matches!(e, AuthConfigError::InvalidKey { .. }),
            "{algorithm} {pem:.20}: {e:?}"
        );
    }
    assert!(matches!(
        err(VerifierConfig {
            leeway_secs: 1_000_000,
            ..hs_config()
        }),
        AuthConfigError::LeewayTooLarge(1_000_000)
    ));
}
