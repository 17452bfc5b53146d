//! Credentials as configured: the names and secrets of API keys, the subscribe rule of a namespace, and
//! the keys client tokens may be signed with, loaded from their files once.
//!
//! Shared by the configuration (which loads and checks them) and the code that uses them (`api.rs`,
//! `history.rs`, `auth.rs`); it depends on no other module of this crate but `error.rs`.

use std::path::Path;
use std::sync::Arc;

use axum::http::{HeaderMap, header};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::error::ApiError;

/// Who may subscribe to a namespace's channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscribeRule {
    /// The channel's name after the namespace is the token's `sub` (`user:42` for `sub: "42"`).
    Owner,
    /// Only channels granted by the token's `channels` claim.
    Claim,
    /// Any valid token.
    Authenticated,
    /// Anyone, with or without a token.
    Public,
    /// The backend at `proxy.subscribe_url` decides, for every subscription to the namespace.
    Proxy,
}

/// An `api_keys` entry: `name=secret` (name of letters, digits, `_` and `-`) or a bare secret, named by
/// its position (`key-<n>`, from 1).
pub fn key_parts(entry: &str, index: usize) -> (String, &str) {
    match entry.split_once('=') {
        Some((name, secret))
            if !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
        {
            (name.to_owned(), secret)
        }
        _ => (format!("key-{}", index + 1), entry),
    }
}

/// The credentials of the request's `Authorization` header: `None` without one, `Some(Err(()))` when
/// it is not a single `Bearer <credentials>` header. The scheme is matched in any case (RFC 9110
/// section 11.1); used for client tokens and API keys alike.
pub fn bearer(headers: &HeaderMap) -> Option<Result<&str, ()>> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let first = values.next()?;
    if values.next().is_some() {
        return Some(Err(()));
    }
    let parsed = first.to_str().ok().and_then(|value| {
        let (scheme, credentials) = value.trim().split_once(' ')?;
        let credentials = credentials.trim();
        (scheme.eq_ignore_ascii_case("bearer") && !credentials.is_empty()).then_some(credentials)
    });
    Some(parsed.ok_or(()))
}

/// Checks `Authorization: Bearer <key>` against the configured API keys (if any), in constant time.
/// Returns the matching key's name (`name=secret` entries are named; others are `key-<n>`), or
/// `anonymous` when no keys are configured.
pub fn api_key_name(keys: &[String], headers: &HeaderMap) -> Result<String, ApiError> {
    if keys.is_empty() {
        return Ok("anonymous".to_owned());
    }
    let Some(Ok(presented)) = bearer(headers) else { return Err(ApiError::Unauthorized) };
    // Compare against every key without stopping early, so timing says nothing about which matched.
    let mut matched = None;
    for (index, entry) in keys.iter().enumerate() {
        let (name, secret) = key_parts(entry, index);
        if bool::from(secret.as_bytes().ct_eq(presented.as_bytes())) && matched.is_none() {
            matched = Some(name);
        }
    }
    matched.ok_or(ApiError::Unauthorized)
}

/// Where the keys of client tokens come from (the `jwt_*` settings).
#[derive(Debug, Clone, Copy, Default)]
pub struct KeySources<'a> {
    pub hs256_secret: Option<&'a str>,
    pub rs256_public_key_file: Option<&'a Path>,
    pub es256_public_key_file: Option<&'a Path>,
    pub eddsa_public_key_file: Option<&'a Path>,
    pub jwks_file: Option<&'a Path>,
}

/// One key a token may be signed with.
pub(crate) struct VerifyKey {
    pub(crate) algorithm: Algorithm,
    pub(crate) key: DecodingKey,
    /// The JWK's `kid`, for keys from a JWK set.
    pub(crate) kid: Option<String>,
}

/// The keys client tokens may be signed with (none: client authentication is off). Cheap to clone.
#[derive(Clone, Default)]
pub struct ClientKeys {
    keys: Arc<Vec<VerifyKey>>,
}

impl std::fmt::Debug for ClientKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let algorithms: Vec<Algorithm> = self.keys.iter().map(|k| k.algorithm).collect();
        f.debug_struct("ClientKeys").field("algorithms", &algorithms).finish()
    }
}

impl ClientKeys {
    /// Loads every configured key: the HS256 secret, RS256/ES256/EdDSA public keys in PEM, a JWK set.
    /// The error names the setting (or file) at fault.
    pub fn load(sources: &KeySources<'_>) -> Result<ClientKeys, String> {
        let mut keys = Vec::new();
        if let Some(secret) = sources.hs256_secret {
            keys.push(VerifyKey {
                algorithm: Algorithm::HS256,
                key: DecodingKey::from_secret(secret.as_bytes()),
                kid: None,
            });
        }
        let pem = |path: &Path| std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()));
        if let Some(path) = sources.rs256_public_key_file {
            let key = DecodingKey::from_rsa_pem(&pem(path)?).map_err(|e| format!("jwt_rs256_public_key_file: {e}"))?;
            keys.push(VerifyKey { algorithm: Algorithm::RS256, key, kid: None });
        }
        if let Some(path) = sources.es256_public_key_file {
            let key = DecodingKey::from_ec_pem(&pem(path)?).map_err(|e| format!("jwt_es256_public_key_file: {e}"))?;
            keys.push(VerifyKey { algorithm: Algorithm::ES256, key, kid: None });
        }
        if let Some(path) = sources.eddsa_public_key_file {
            let key = DecodingKey::from_ed_pem(&pem(path)?).map_err(|e| format!("jwt_eddsa_public_key_file: {e}"))?;
            keys.push(VerifyKey { algorithm: Algorithm::EdDSA, key, kid: None });
        }
        if let Some(path) = sources.jwks_file {
            keys.extend(jwk_set(path)?);
        }
        Ok(ClientKeys { keys: Arc::new(keys) })
    }

    /// Whether any key is configured (client authentication is on).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &VerifyKey> {
        self.keys.iter()
    }
}

/// The public keys of a JWK set file; each needs an `alg`, and symmetric ones are refused.
fn jwk_set(path: &Path) -> Result<Vec<VerifyKey>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let set: jsonwebtoken::jwk::JwkSet =
        serde_json::from_str(&text).map_err(|e| format!("jwt_jwks_file: not a JWK set: {e}"))?;
    let mut keys = Vec::with_capacity(set.keys.len());
    for jwk in &set.keys {
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("jwt_jwks_file: {e}"))?;
        let algorithm = jwk
            .common
            .key_algorithm
            .and_then(|a| a.to_string().parse::<Algorithm>().ok())
            .ok_or("jwt_jwks_file: every key needs an \"alg\"")?;
        if matches!(algorithm, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
            return Err("jwt_jwks_file: symmetric keys are not accepted in a JWK set".into());
        }
        keys.push(VerifyKey { algorithm, key, kid: jwk.common.key_id.clone() });
    }
    Ok(keys)
}
