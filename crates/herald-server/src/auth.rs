//! Client authentication (JWT) and channel authorization.
//!
//! With no client authentication configured every client is anonymous and may subscribe to any channel
//! (the server then refuses to bind a non-loopback address unless `insecure` is set; see `main.rs`).
//! With a key configured:
//! - a token comes from `Authorization: Bearer <token>` (the scheme in any case) or `?token=` (once),
//!   never both (400: which one counts would be a guess); a request with no token at all is
//!   anonymous and may only use `public` namespaces; a token that is present but invalid, expired (from
//!   the first instant of its `exp` second on, RFC 7519 section 4.1.4, without leeway), not yet valid
//!   (`nbf`, or an `iat` in the future, beyond `jwt_leeway_secs`), for another audience or issuer (with
//!   `jwt_issuer`, `iss` must be that one string, not a list), signed with another key or with another
//!   algorithm (including `alg: none`), or carrying a `crit` header (Herald understands no extension,
//!   RFC 7515 section 4.1.11) is refused with 401, never downgraded to anonymous;
//! - `sub` is the user; the optional `channels` claim grants channels (exact names, or a prefix ending
//!   in `*`);
//! - each namespace has a subscribe rule (`namespaces.<ns>.subscribe`): `owner` (the part after the
//!   namespace is the user: the default for `user`), `claim` (only through the `channels` claim: the
//!   default elsewhere), `authenticated` (any valid token), `public` (anyone, even without a token) or
//!   `proxy` (the subscribe proxy asks the backend, `proxy.rs`).
//! - with a connect proxy, a client without a token gets its identity (user, granted channels, expiry)
//!   from the backend instead (`proxy.rs`); a token, when present, wins.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, header};
use herald_core::ChannelName;
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;

use crate::config::Config;
use crate::credentials::ClientKeys;
pub use crate::credentials::SubscribeRule;
pub use crate::credentials::bearer;
use crate::error::ApiError;

/// Longest token accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

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
    /// Time left until the token expires (to the millisecond: a token is expired from the first instant
    /// of its `exp` second on).
    pub fn expires_in(&self) -> Option<Duration> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        self.expires_at.map(|at| Duration::from_secs(at).saturating_sub(now))
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: Option<u64>,
    nbf: Option<u64>,
    iat: Option<u64>,
    /// Kept as sent: jsonwebtoken also accepts a list containing the issuer, Herald only the string.
    iss: Option<serde_json::Value>,
    #[serde(default)]
    channels: Vec<String>,
}

/// Whether a channel's subscription is decided here or by the application's backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Granted,
    /// The namespace's rule is `proxy`: the subscribe proxy decides (see `proxy.rs`).
    AskBackend,
}

/// Client authentication as configured.
pub struct ClientAuth {
    keys: ClientKeys,
    /// A connect or subscribe proxy is configured: clients are authorized even without token keys.
    proxied: bool,
    audience: Option<String>,
    issuer: Option<String>,
    /// Allowed clock difference for `nbf` and `iat`, in seconds.
    leeway: u64,
}

impl ClientAuth {
    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut validation = Validation::new(algorithm);
        let mut required = vec!["sub"];
        validation.validate_exp = true;
        // Expiry is exact: a connection is closed when its token expires, not a minute later. jsonwebtoken
        // still accepts `exp == now`, so `check_times` checks `exp` again; `nbf` and `iat` are checked
        // there too, with their own leeway.
        validation.leeway = 0;
        validation.validate_nbf = false;
        // Without a configured audience, jsonwebtoken refuses any token that has an `aud` claim.
        if let Some(audience) = &self.audience {
            validation.set_audience(&[audience]);
            required.push("aud");
        }
        if let Some(issuer) = &self.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        validation
    }

    /// `exp` must lie after the current second (a token is expired from the first instant of its `exp`
    /// second on, RFC 7519 section 4.1.4: no leeway); `nbf` (not before) and `iat` (issued at) must not
    /// lie in the future beyond the leeway.
    fn check_times(&self, claims: &Claims) -> Result<(), ApiError> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        if claims.exp.is_some_and(|exp| exp <= now) {
            return Err(ApiError::Unauthenticated("token expired".into()));
        }
        let latest = now.saturating_add(self.leeway);
        if claims.nbf.is_some_and(|nbf| nbf > latest) {
            return Err(ApiError::Unauthenticated("token is not valid yet (nbf)".into()));
        }
        if claims.iat.is_some_and(|iat| iat > latest) {
            return Err(ApiError::Unauthenticated("token is issued in the future (iat)".into()));
        }
        Ok(())
    }

    /// With `jwt_issuer`, `iss` must be exactly that string (RFC 7519 section 4.1.1: one StringOrURI);
    /// jsonwebtoken has already refused a token without it or with another one.
    fn check_issuer(&self, claims: &Claims) -> Result<(), ApiError> {
        match &self.issuer {
            Some(issuer) if claims.iss.as_ref().and_then(serde_json::Value::as_str) != Some(issuer.as_str()) => {
                Err(ApiError::Unauthenticated("token issuer is not accepted".into()))
            }
            _ => Ok(()),
        }
    }
}

impl ClientAuth {
    /// Client authentication with `keys` (loaded once, with the configuration: `Settings::client_keys`)
    /// and the audience, issuer and leeway of `config`.
    pub fn new(keys: ClientKeys, config: &Config) -> Self {
        Self {
            keys,
            proxied: config.proxy.connect_url.is_some() || config.proxy.subscribe_url.is_some(),
            audience: config.jwt_audience.clone(),
            issuer: config.jwt_issuer.clone(),
            leeway: config.jwt_leeway_secs,
        }
    }

    /// Loads the keys `config` names and sets up client authentication with them (for embedders and
    /// fuzzing; a node uses the keys its validated `Settings` already hold).
    pub fn from_config(config: &Config) -> Result<Self, String> {
        Ok(Self::new(ClientKeys::load(&config.key_sources())?, config))
    }

    /// Whether clients are authenticated and channels authorized (token keys or a proxy configured).
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty() || self.proxied
    }

    /// Whether the request brings a token (in `Authorization` or `?token=`), valid or not: with a
    /// connect proxy configured, a token wins and the proxy is not asked.
    pub fn has_token(headers: &HeaderMap, query_token: Option<&str>) -> bool {
        query_token.is_some() || headers.contains_key(header::AUTHORIZATION)
    }

    /// The identity of a request: anonymous without a token, 401 with a bad one, 400 with a token both in
    /// `Authorization` and in `?token=`.
    pub fn authenticate(&self, headers: &HeaderMap, query_token: Option<&str>) -> Result<Identity, ApiError> {
        if !self.enabled() {
            return Ok(Identity::default());
        }
        if query_token.is_some() && headers.contains_key(header::AUTHORIZATION) {
            return Err(ApiError::BadRequest(
                "a token may be given in Authorization or in the token query parameter, not both".into(),
            ));
        }
        let from_header = bearer(headers).map(|token| {
            token.map_err(|()| ApiError::Unauthenticated("Authorization must be \"Bearer <token>\"".into()))
        });
        let token = match (from_header.transpose()?, query_token) {
            (Some(token), _) => token,
            (None, Some(token)) => token,
            (None, None) => return Ok(Identity::default()),
        };
        self.verify(token)
    }

    /// Checks a token (for example one a WebSocket client sends to refresh its connection).
    pub fn verify_token(&self, token: &str) -> Result<Identity, ApiError> {
        if !self.enabled() {
            return Ok(Identity::default());
        }
        self.verify(token)
    }

    fn verify(&self, token: &str) -> Result<Identity, ApiError> {
        if self.keys.is_empty() {
            return Err(ApiError::Unauthenticated("this server accepts no client tokens".into()));
        }
        if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
            return Err(ApiError::Unauthenticated("token is empty or too long".into()));
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| ApiError::Unauthenticated("token is not valid".into()))?;
        if header.crit.is_some() {
            return Err(ApiError::Unauthenticated("token has a crit header; no extension is understood".into()));
        }
        // Only keys of the token's algorithm (and its `kid`, when both name one) are tried, so a token can
        // never choose how it is checked: `alg: none`, or HS256 signed with a public key, match no key.
        let candidates = self.keys.iter().filter(|k| {
            k.algorithm == header.alg
                && match (&k.kid, &header.kid) {
                    (Some(mine), Some(theirs)) => mine == theirs,
                    _ => true,
                }
        });
        let mut outcome = Err(ApiError::Unauthenticated("token algorithm is not accepted".into()));
        for candidate in candidates {
            outcome = jsonwebtoken::decode::<Claims>(token, &candidate.key, &self.validation(candidate.algorithm))
                .map_err(|error| {
                    use jsonwebtoken::errors::ErrorKind;
                    let why = match error.kind() {
                        ErrorKind::ExpiredSignature => "token expired",
                        ErrorKind::InvalidSignature => "token signature is not valid",
                        ErrorKind::InvalidAlgorithm => "token algorithm is not accepted",
                        ErrorKind::MissingRequiredClaim(claim) if claim == "aud" => "token lacks an aud claim",
                        ErrorKind::MissingRequiredClaim(claim) if claim == "iss" => "token lacks an iss claim",
                        ErrorKind::MissingRequiredClaim(_) => "token lacks a sub claim",
                        ErrorKind::InvalidAudience if self.audience.is_none() => {
                            "token has an aud claim but this server has no jwt_audience"
                        }
                        ErrorKind::InvalidAudience => "token audience is not accepted",
                        ErrorKind::InvalidIssuer => "token issuer is not accepted",
                        _ => "token is not valid",
                    };
                    ApiError::Unauthenticated(why.into())
                })
                .and_then(|data| {
                    self.check_times(&data.claims)?;
                    self.check_issuer(&data.claims)?;
                    Ok(data.claims)
                })
                .and_then(identity_of);
            if outcome.is_ok() {
                break;
            }
        }
        outcome
    }
}

fn identity_of(claims: Claims) -> Result<Identity, ApiError> {
    if claims.sub.is_empty() || claims.sub.len() > 256 {
        return Err(ApiError::Unauthenticated("token sub must be 1 to 256 bytes".into()));
    }
    Ok(Identity { user: Some(claims.sub), grants: claims.channels, expires_at: claims.exp })
}

impl ClientAuth {
    /// Whether `identity` may hold `channel` (403 if not; 401 if it should bring a token), where a
    /// channel the subscribe proxy decides counts as allowed (it was asked when it was subscribed).
    pub fn authorize(&self, config: &Config, identity: &Identity, channel: &ChannelName) -> Result<(), ApiError> {
        self.access(config, identity, channel).map(|_| ())
    }

    /// Whether `identity` may subscribe to `channel`, or whether the backend must be asked (403 if not;
    /// 401 if it should bring a token).
    pub fn access(&self, config: &Config, identity: &Identity, channel: &ChannelName) -> Result<Access, ApiError> {
        if !self.enabled() {
            return Ok(Access::Granted);
        }
        let namespace = channel.namespace();
        let rule = config.namespaces.get(namespace).and_then(|n| n.subscribe).unwrap_or(if namespace == "user" {
            SubscribeRule::Owner
        } else {
            SubscribeRule::Claim
        });
        match rule {
            SubscribeRule::Public => return Ok(Access::Granted),
            SubscribeRule::Proxy => return Ok(Access::AskBackend),
            _ => {}
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
                SubscribeRule::Claim | SubscribeRule::Public | SubscribeRule::Proxy => false,
            };
        if allowed {
            Ok(Access::Granted)
        } else {
            Err(ApiError::Forbidden(format!("channel {channel} is not permitted")))
        }
    }
}
