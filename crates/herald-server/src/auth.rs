//! Client authentication (JWT) and channel authorization.
//!
//! With no client authentication configured every client is anonymous and may subscribe to any channel
//! (the server then refuses to bind a non-loopback address unless `insecure` is set; see `main.rs`).
//! With a key configured:
//! - a token comes from `Authorization: Bearer <token>` or `?token=`; a request with no token at all is
//!   anonymous and may only use `public` namespaces; a token that is present but invalid, expired, signed
//!   with another key or with another algorithm (including `alg: none`) is refused with 401, never
//!   downgraded to anonymous;
//! - `sub` is the user; the optional `channels` claim grants channels (exact names, or a prefix ending
//!   in `*`);
//! - each namespace has a subscribe rule (`namespaces.<ns>.subscribe`): `owner` (the part after the
//!   namespace is the user: the default for `user`), `claim` (only through the `channels` claim: the
//!   default elsewhere), `authenticated` (any valid token) or `public` (anyone, even without a token).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, header};
use herald_core::ChannelName;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::error::ApiError;

/// Longest token accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

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
}

/// The client behind a connection.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    pub user: Option<String>,
    /// Channel patterns granted by the token.
    pub grants: Vec<String>,
    /// When the token expires (Unix seconds), if it does.
    pub expires_at: Option<u64>,
}

impl Identity {
    /// Time left until the token expires.
    pub fn expires_in(&self) -> Option<Duration> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        self.expires_at.map(|at| Duration::from_secs(at.saturating_sub(now)))
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: Option<u64>,
    #[serde(default)]
    channels: Vec<String>,
}

/// Client authentication as configured.
pub struct ClientAuth {
    key: Option<(DecodingKey, Validation)>,
}

impl ClientAuth {
    pub fn from_config(config: &Config) -> Self {
        let key = config.jwt_hs256_secret.as_ref().map(|secret| {
            let mut validation = Validation::new(Algorithm::HS256);
            validation.set_required_spec_claims(&["sub"]);
            validation.validate_exp = true;
            // Expiry is exact: a connection is closed when its token expires, not a minute later.
            validation.leeway = 0;
            (DecodingKey::from_secret(secret.as_bytes()), validation)
        });
        Self { key }
    }

    pub fn enabled(&self) -> bool {
        self.key.is_some()
    }

    /// The identity of a request: anonymous without a token, 401 with a bad one.
    pub fn authenticate(&self, headers: &HeaderMap, query_token: Option<&str>) -> Result<Identity, ApiError> {
        let Some((key, validation)) = &self.key else { return Ok(Identity::default()) };
        let from_header = headers.get(header::AUTHORIZATION).map(|value| {
            value
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim)
                .ok_or(ApiError::Unauthenticated("Authorization must be \"Bearer <token>\"".into()))
        });
        let token = match (from_header.transpose()?, query_token) {
            (Some(token), _) => token,
            (None, Some(token)) => token,
            (None, None) => return Ok(Identity::default()),
        };
        self.verify(token, key, validation)
    }

    /// Checks a token (for example one a WebSocket client sends to refresh its connection).
    pub fn verify_token(&self, token: &str) -> Result<Identity, ApiError> {
        match &self.key {
            Some((key, validation)) => self.verify(token, key, validation),
            None => Ok(Identity::default()),
        }
    }

    fn verify(&self, token: &str, key: &DecodingKey, validation: &Validation) -> Result<Identity, ApiError> {
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return Err(ApiError::Unauthenticated("token is empty or too long".into()));
        }
        let data = jsonwebtoken::decode::<Claims>(token, key, validation).map_err(|error| {
            use jsonwebtoken::errors::ErrorKind;
            let why = match error.kind() {
                ErrorKind::ExpiredSignature => "token expired",
                ErrorKind::InvalidSignature => "token signature is not valid",
                ErrorKind::InvalidAlgorithm => "token algorithm is not accepted",
                ErrorKind::MissingRequiredClaim(_) => "token lacks a sub claim",
                _ => "token is not valid",
            };
            ApiError::Unauthenticated(why.into())
        })?;
        let claims = data.claims;
        if claims.sub.is_empty() || claims.sub.len() > 256 {
            return Err(ApiError::Unauthenticated("token sub must be 1 to 256 bytes".into()));
        }
        Ok(Identity { user: Some(claims.sub), grants: claims.channels, expires_at: claims.exp })
    }

    /// Whether `identity` may subscribe to `channel` (403 if not; 401 if it should bring a token).
    pub fn authorize(&self, config: &Config, identity: &Identity, channel: &ChannelName) -> Result<(), ApiError> {
        if !self.enabled() {
            return Ok(());
        }
        let namespace = channel.namespace();
        let rule = config.namespaces.get(namespace).and_then(|n| n.subscribe).unwrap_or(if namespace == "user" {
            SubscribeRule::Owner
        } else {
            SubscribeRule::Claim
        });
        if rule == SubscribeRule::Public {
            return Ok(());
        }
        let Some(user) = &identity.user else {
            return Err(ApiError::Unauthenticated(format!("channel {channel} needs a token")));
        };
        let granted = identity.grants.iter().any(|pattern| match pattern.strip_suffix('*') {
            Some(prefix) => channel.as_str().starts_with(prefix),
            None => pattern == channel.as_str(),
        });
        let allowed = granted
            || match rule {
                SubscribeRule::Owner => channel.as_str().split_once(':').is_some_and(|(_, id)| id == user),
                SubscribeRule::Authenticated => true,
                SubscribeRule::Claim | SubscribeRule::Public => false,
            };
        if allowed { Ok(()) } else { Err(ApiError::Forbidden(format!("channel {channel} is not permitted"))) }
    }
}
