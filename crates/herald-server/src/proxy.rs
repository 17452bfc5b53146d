//! The connect and subscribe proxies (`[proxy]`): Herald asks the application's backend, over HTTP,
//! who a client that brings no token is and which channels it may hold (`proxy.connect_url`, once per
//! connection), or whether a client may subscribe to one channel of a namespace whose rule is
//! `subscribe = "proxy"` (`proxy.subscribe_url`, once per subscription).
//!
//! Rule every edit must keep: nothing is granted unless the backend answered 200 with the expected JSON.
//! A backend that is slow (no whole answer within `proxy.timeout_ms`), down, answers another status, or
//! a body that is not the expected JSON (or longer than `proxy.max_response_bytes`) refuses the client:
//! `proxy_timeout` (504) or `proxy_unavailable` (502); 401 and 403 become `unauthenticated` and
//! `forbidden`. At most `proxy.max_concurrent` calls are in flight per node; beyond, the client gets 429
//! `limit_exceeded` at once (a reconnect storm must not pile up on a slow backend). A 200 is reused for
//! a later request with the same content only when the backend's `Cache-Control: max-age` allows it (never
//! past a grant's `expires_at`; `no-store` and `no-cache` turn it off); refusals and failures are never
//! reused.
//!
//! What is sent: the requested channels (connect) or the channel and user (subscribe), the request's
//! cookies, the headers named in `proxy.forward_headers` (and only those: `Authorization` only when
//! listed), the client's address and a correlation ID (also in `X-Correlation-ID`).
//! Depends on `auth.rs` (the identity it makes), `config.rs` and `error.rs`; no handler.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use bytes::Bytes;
use herald_core::ChannelName;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

/// The header types of [`cache_time`], for callers without an `http` dependency (the fuzz targets).
pub use axum::http::{HeaderMap as ProxyHeaderMap, HeaderValue};

use crate::auth::Identity;
use crate::config::ProxySection;
use crate::error::ApiError;

/// Answers kept for reuse at most (each a few hundred bytes); when full, expired ones go, and if none
/// had expired, all of them.
pub const MAX_CACHED_ANSWERS: usize = 10_000;
/// Longest a backend's answer is reused, whatever its `max-age` says.
pub const MAX_CACHE_TIME: Duration = Duration::from_secs(3600);
/// Upper bounds of the latency buckets, in microseconds (the last bucket is everything above).
pub const LATENCY_BUCKETS_US: [u64; 12] =
    [1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000];
/// Longest user name a connect answer may give (as a token's `sub`).
const MAX_USER_BYTES: usize = 256;

/// Which proxy a call is for (the `proxy` label of its metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Connect,
    Subscribe,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Connect, Kind::Subscribe];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Subscribe => "subscribe",
        }
    }
}

/// How a proxy call ended (the `outcome` label of `herald_proxy_requests_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The backend answered 200 with a valid answer.
    Granted,
    /// A 200 the backend allowed to be reused answered it; no call was made.
    Cached,
    /// The backend answered 401 or 403.
    Refused,
    /// No whole answer within `proxy.timeout_ms`.
    Timeout,
    /// The backend could not be reached or answered another status.
    Unavailable,
    /// A 200 whose body is not the expected JSON, or is too long.
    Malformed,
    /// `proxy.max_concurrent` calls were already in flight.
    Overloaded,
}

impl Outcome {
    pub const ALL: [Outcome; 7] = [
        Outcome::Granted,
        Outcome::Cached,
        Outcome::Refused,
        Outcome::Timeout,
        Outcome::Unavailable,
        Outcome::Malformed,
        Outcome::Overloaded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Granted => "granted",
            Self::Cached => "cached",
            Self::Refused => "refused",
            Self::Timeout => "timeout",
            Self::Unavailable => "unavailable",
            Self::Malformed => "malformed",
            Self::Overloaded => "overloaded",
        }
    }
}

/// What Herald tells the backend about a client besides the channels: taken from the connection's
/// request once, and kept by a WebSocket connection for the subscribes it makes later.
#[derive(Debug, Clone, Default)]
pub struct Forwarded {
    /// The allow-listed headers, by lower-case name (repeated headers joined with `, `).
    headers: BTreeMap<String, String>,
    /// The `Cookie` header(s) as sent (several joined with `; `); empty without any.
    cookies: String,
    remote_addr: Option<String>,
    correlation_id: String,
}

impl Forwarded {
    pub fn correlation_id(&self) -> &str {
        &self.correlation_id
    }
}

/// The body of a connect call (the contract's names).
#[derive(Serialize)]
struct ConnectCall<'a> {
    channels: &'a [ChannelName],
    headers: &'a BTreeMap<String, String>,
    cookies: &'a str,
    remote_addr: Option<&'a str>,
    correlation_id: &'a str,
}

/// The body of a subscribe call.
#[derive(Serialize)]
struct SubscribeCall<'a> {
    user: Option<&'a str>,
    channel: &'a ChannelName,
    headers: &'a BTreeMap<String, String>,
    cookies: &'a str,
    remote_addr: Option<&'a str>,
    correlation_id: &'a str,
}

/// A connect answer: the user, the channels it may subscribe to (names, or prefixes ending in `*`, as
/// a token's `channels` claim), and when the grant ends. Other fields are ignored.
#[derive(Deserialize)]
struct ConnectAnswer {
    user: String,
    channels: Vec<String>,
    #[serde(default)]
    expires_at: Option<u64>,
}

/// The connect and subscribe proxies of one node. Cheap to share (it sits in `AppState`).
pub struct Proxy {
    client: reqwest::Client,
    connect_url: Option<reqwest::Url>,
    subscribe_url: Option<reqwest::Url>,
    timeout: Duration,
    forward_headers: Vec<HeaderName>,
    max_response_bytes: usize,
    /// One permit per call in flight (`proxy.max_concurrent`), shared by both proxies.
    permits: Arc<Semaphore>,
    cache: Cache,
    stats: ProxyStats,
}

impl Proxy {
    /// The proxies `section` configures (the URLs and names were checked with the configuration).
    pub fn new(section: &ProxySection) -> Result<Self, String> {
        let parse = |url: &Option<String>| url.as_deref().map(reqwest::Url::parse).transpose();
        let connect_url = parse(&section.connect_url).map_err(|e| format!("proxy.connect_url: {e}"))?;
        let subscribe_url = parse(&section.subscribe_url).map_err(|e| format!("proxy.subscribe_url: {e}"))?;
        let forward_headers = section
            .forward_headers
            .iter()
            .map(|name| {
                HeaderName::from_bytes(name.trim().as_bytes()).map_err(|e| format!("proxy.forward_headers: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let client = reqwest::Client::builder()
            // The backend is the operator's own service: no environment proxy, no redirects (a 3xx is
            // an answer Herald does not expect, hence a refusal).
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .tcp_nodelay(true)
            .pool_max_idle_per_host(section.max_concurrent)
            .build()
            .map_err(|e| format!("proxy: cannot make the HTTP client: {e}"))?;
        Ok(Self {
            client,
            connect_url,
            subscribe_url,
            timeout: Duration::from_millis(section.timeout_ms),
            forward_headers,
            max_response_bytes: section.max_response_bytes,
            permits: Arc::new(Semaphore::new(section.max_concurrent)),
            cache: Cache::default(),
            stats: ProxyStats::default(),
        })
    }

    /// Whether clients without a token are identified by the connect proxy.
    pub fn connect_enabled(&self) -> bool {
        self.connect_url.is_some()
    }

    pub fn stats(&self) -> &ProxyStats {
        &self.stats
    }

    /// What the backend is told about the client of `headers`, connected from `peer` (nothing, at no
    /// cost, when no proxy is configured).
    pub fn forwarded(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> Forwarded {
        if self.connect_url.is_none() && self.subscribe_url.is_none() {
            return Forwarded::default();
        }
        let mut forwarded = BTreeMap::new();
        for name in &self.forward_headers {
            let values: Vec<&str> = headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect();
            if !values.is_empty() {
                forwarded.insert(name.as_str().to_owned(), values.join(", "));
            }
        }
        let cookies: Vec<&str> = headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).collect();
        let correlation_id = headers
            .get("x-correlation-id")
            .and_then(|v| v.to_str().ok())
            .and_then(|text| herald_core::publication::validate_correlation_id(text).ok())
            .map_or_else(|| format!("{:032x}", rand::random::<u128>()), |id| id.to_string());
        Forwarded {
            headers: forwarded,
            cookies: cookies.join("; "),
            remote_addr: peer.map(|peer| peer.to_string()),
            correlation_id,
        }
    }

    /// Asks the connect proxy who the client is: its identity (user, granted channels, expiry) or the
    /// refusal to answer it with.
    pub async fn connect(&self, channels: &[ChannelName], forwarded: &Forwarded) -> Result<Identity, ApiError> {
        let Some(url) = &self.connect_url else {
            return Err(ApiError::Internal("the connect proxy is not configured".into()));
        };
        let call = ConnectCall {
            channels,
            headers: &forwarded.headers,
            cookies: &forwarded.cookies,
            remote_addr: forwarded.remote_addr.as_deref(),
            correlation_id: &forwarded.correlation_id,
        };
        // The cache key leaves out what differs on every request (address, correlation ID).
        let key = self.cache.key(Kind::Connect, &(channels, &forwarded.headers, &forwarded.cookies));
        let answer = self.call(Kind::Connect, url, &call, key, &forwarded.correlation_id).await?;
        match connect_identity(answer.body()) {
            Ok(identity) => {
                if let Answer::Made { body, cache_for } = answer {
                    self.stats.count(Kind::Connect, Outcome::Granted);
                    // Never reused past the grant's end.
                    let left = identity.expires_in();
                    if let Some(cache_for) = cache_for.map(|time| left.map_or(time, |left| time.min(left))) {
                        self.cache.put(key, body, cache_for);
                    }
                }
                Ok(identity)
            }
            Err(problem) => {
                self.stats.count(Kind::Connect, Outcome::Malformed);
                Err(malformed(Kind::Connect, &forwarded.correlation_id, &problem))
            }
        }
    }

    /// Asks the subscribe proxy whether `identity` may subscribe to `channel`.
    pub async fn subscribe(
        &self,
        identity: &Identity,
        channel: &ChannelName,
        forwarded: &Forwarded,
    ) -> Result<(), ApiError> {
        let Some(url) = &self.subscribe_url else {
            return Err(ApiError::Internal("the subscribe proxy is not configured".into()));
        };
        let user = identity.user.as_deref();
        let call = SubscribeCall {
            user,
            channel,
            headers: &forwarded.headers,
            cookies: &forwarded.cookies,
            remote_addr: forwarded.remote_addr.as_deref(),
            correlation_id: &forwarded.correlation_id,
        };
        let key = self.cache.key(Kind::Subscribe, &(user, channel, &forwarded.headers, &forwarded.cookies));
        let answer = self.call(Kind::Subscribe, url, &call, key, &forwarded.correlation_id).await?;
        match serde_json::from_slice::<serde_json::Value>(answer.body()) {
            Ok(serde_json::Value::Object(_)) => {
                if let Answer::Made { body, cache_for } = answer {
                    self.stats.count(Kind::Subscribe, Outcome::Granted);
                    if let Some(cache_for) = cache_for {
                        self.cache.put(key, body, cache_for);
                    }
                }
                Ok(())
            }
            _ => {
                self.stats.count(Kind::Subscribe, Outcome::Malformed);
                Err(malformed(Kind::Subscribe, &forwarded.correlation_id, "the answer is not a JSON object"))
            }
        }
    }

    /// One call: a reusable answer if there is one, else the backend's 200 body (its shape is the
    /// caller's to check, and so is keeping it for as long as the second value allows), or the
    /// refusal. Counts the outcome and, for calls made, the latency.
    async fn call(
        &self,
        kind: Kind,
        url: &reqwest::Url,
        body: &impl Serialize,
        key: u128,
        correlation_id: &str,
    ) -> Result<Answer, ApiError> {
        if let Some(body) = self.cache.get(key) {
            self.stats.count(kind, Outcome::Cached);
            return Ok(Answer::Cached(body));
        }
        let Ok(_permit) = self.permits.try_acquire() else {
            self.stats.count(kind, Outcome::Overloaded);
            return Err(ApiError::Limit("too many backend calls at once on this node; retry shortly".into()));
        };
        let json = serde_json::to_vec(body).map_err(|e| ApiError::Internal(format!("encoding a proxy call: {e}")))?;
        let started = Instant::now();
        let answer = tokio::time::timeout(self.timeout, self.exchange(url, json, correlation_id)).await;
        self.stats.observe(kind, started.elapsed());
        let failure = match answer {
            // Counted as granted (or malformed) by the caller, once it checked the body.
            Ok(Ok(Exchange::Granted { body, cache_for })) => return Ok(Answer::Made { body, cache_for }),
            Ok(Ok(Exchange::Refused(status))) => {
                self.stats.count(kind, Outcome::Refused);
                tracing::debug!(proxy = kind.as_str(), %status, correlation_id, "the backend refused");
                return Err(if status == StatusCode::FORBIDDEN {
                    ApiError::Forbidden("the backend refused this client".into())
                } else {
                    ApiError::Unauthenticated("the backend did not authenticate this client".into())
                });
            }
            Ok(Ok(Exchange::TooLong)) => {
                self.stats.count(kind, Outcome::Malformed);
                return Err(malformed(kind, correlation_id, "the answer is longer than proxy.max_response_bytes"));
            }
            Ok(Err(Failure::Timeout)) | Err(_) => {
                self.stats.count(kind, Outcome::Timeout);
                return Err(ApiError::ProxyTimeout(format!(
                    "{} proxy: no answer within {} ms (correlation_id {correlation_id})",
                    kind.as_str(),
                    self.timeout.as_millis()
                )));
            }
            Ok(Err(Failure::Unavailable(detail))) => detail,
        };
        self.stats.count(kind, Outcome::Unavailable);
        Err(ApiError::ProxyUnavailable(format!("{} proxy: {failure} (correlation_id {correlation_id})", kind.as_str())))
    }

    /// Posts `json` and reads the answer, its body bounded by `proxy.max_response_bytes`.
    async fn exchange(&self, url: &reqwest::Url, json: Vec<u8>, correlation_id: &str) -> Result<Exchange, Failure> {
        let request = self
            .client
            .post(url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json")
            .header("x-correlation-id", correlation_id)
            .body(json);
        let mut response = request.send().await.map_err(Failure::of)?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Ok(Exchange::Refused(status));
        }
        if status != StatusCode::OK {
            return Err(Failure::Unavailable(format!("the backend answered {status}")));
        }
        let cache_for = cache_time(response.headers());
        if response.content_length().is_some_and(|length| length > self.max_response_bytes as u64) {
            return Ok(Exchange::TooLong);
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(Failure::of)? {
            if body.len() + chunk.len() > self.max_response_bytes {
                return Ok(Exchange::TooLong);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Exchange::Granted { body: Bytes::from(body), cache_for })
    }
}

/// The 502 for an answer that is not what the contract says.
fn malformed(kind: Kind, correlation_id: &str, problem: &str) -> ApiError {
    ApiError::ProxyUnavailable(format!(
        "{} proxy: the backend's answer is not valid: {problem} (correlation_id {correlation_id})",
        kind.as_str()
    ))
}

/// A 200's body: reused, or just received (with how long the backend lets it be reused).
enum Answer {
    Cached(Bytes),
    Made { body: Bytes, cache_for: Option<Duration> },
}

impl Answer {
    fn body(&self) -> &[u8] {
        match self {
            Self::Cached(body) | Self::Made { body, .. } => body,
        }
    }
}

/// What one exchange with the backend gave.
enum Exchange {
    /// 200, with how long the backend lets the answer be reused.
    Granted { body: Bytes, cache_for: Option<Duration> },
    /// 401 or 403.
    Refused(StatusCode),
    /// A 200 whose body is over `proxy.max_response_bytes`.
    TooLong,
}

enum Failure {
    Timeout,
    Unavailable(String),
}

impl Failure {
    fn of(error: reqwest::Error) -> Self {
        if error.is_timeout() {
            return Failure::Timeout;
        }
        let what = if error.is_connect() { "the backend cannot be reached" } else { "the exchange failed" };
        // The error's own text can name the URL; that goes to the log only (see `ApiError::public_message`).
        Failure::Unavailable(format!("{what}: {error}"))
    }
}

/// A connect answer checked: a user of 1 to 256 bytes, a list of channel names or prefixes ending in
/// `*`, an `expires_at` (Unix seconds) in the future if any. Public for fuzzing (`fuzz/`).
pub fn connect_identity(body: &[u8]) -> Result<Identity, String> {
    let answer: ConnectAnswer = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    if answer.user.is_empty() || answer.user.len() > MAX_USER_BYTES {
        return Err(format!("user must be 1 to {MAX_USER_BYTES} bytes"));
    }
    for pattern in &answer.channels {
        // A prefix (`chat:*`) need not be a whole channel name, but it must be made of channel bytes.
        let valid = match pattern.strip_suffix('*') {
            Some(prefix) => {
                prefix.len() < 255 && prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-:.@=/".contains(&b))
            }
            None => ChannelName::parse(pattern).is_ok(),
        };
        if !valid {
            return Err(format!("{pattern:?} is not a channel name or a prefix ending in *"));
        }
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    if answer.expires_at.is_some_and(|at| at <= now) {
        return Err("expires_at is not in the future".into());
    }
    Ok(Identity { user: Some(answer.user), grants: answer.channels, expires_at: answer.expires_at })
}

/// How long a 200 may be reused: its `Cache-Control: max-age` (at most [`MAX_CACHE_TIME`]), unless
/// `no-store` or `no-cache` is there too; `None` without a `max-age` above 0. Public for fuzzing.
pub fn cache_time(headers: &HeaderMap) -> Option<Duration> {
    let mut max_age = None;
    for value in headers.get_all(header::CACHE_CONTROL) {
        let Ok(text) = value.to_str() else { return None };
        for directive in text.split(',') {
            let directive = directive.trim().to_ascii_lowercase();
            if directive == "no-store" || directive == "no-cache" {
                return None;
            }
            if let Some(seconds) = directive.strip_prefix("max-age=") {
                max_age = Some(seconds.trim_matches('"').parse::<u64>().ok()?);
            }
        }
    }
    max_age.filter(|&seconds| seconds > 0).map(|seconds| Duration::from_secs(seconds).min(MAX_CACHE_TIME))
}

/// Answers the backend allowed to be reused, by a keyed 128-bit hash of what was asked (the keys are
/// random per node, so nobody can make two requests collide on purpose).
#[derive(Default)]
struct Cache {
    hashers: [std::collections::hash_map::RandomState; 2],
    entries: std::sync::Mutex<HashMap<u128, (Instant, Bytes)>>,
}

impl Cache {
    fn key(&self, kind: Kind, what: &impl Serialize) -> u128 {
        let text = serde_json::to_string(what).unwrap_or_default();
        let [first, second] = &self.hashers;
        let tag = kind.as_str();
        (u128::from(first.hash_one((tag, &text))) << 64) | u128::from(second.hash_one((tag, &text)))
    }

    fn get(&self, key: u128) -> Option<Bytes> {
        let mut entries = self.entries.lock().ok()?;
        match entries.get(&key) {
            Some((until, body)) if *until > Instant::now() => Some(body.clone()),
            Some(_) => {
                entries.remove(&key);
                None
            }
            None => None,
        }
    }

    fn put(&self, key: u128, body: Bytes, cache_for: Duration) {
        let Ok(mut entries) = self.entries.lock() else { return };
        if entries.len() >= MAX_CACHED_ANSWERS {
            let now = Instant::now();
            entries.retain(|_, (until, _)| *until > now);
            if entries.len() >= MAX_CACHED_ANSWERS {
                entries.clear();
            }
        }
        entries.insert(key, (Instant::now() + cache_for, body));
    }
}

/// The proxies' counters: calls by outcome, and the latency of the calls made, per proxy.
#[derive(Default)]
pub struct ProxyStats {
    outcomes: [[AtomicU64; Outcome::ALL.len()]; 2],
    /// Per proxy: one count per bucket of [`LATENCY_BUCKETS_US`], plus one for everything above.
    latency: [[AtomicU64; LATENCY_BUCKETS_US.len() + 1]; 2],
    latency_sum_us: [AtomicU64; 2],
}

impl ProxyStats {
    fn count(&self, kind: Kind, outcome: Outcome) {
        let index = Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0);
        self.outcomes[kind as usize][index].fetch_add(1, Ordering::Relaxed);
    }

    fn observe(&self, kind: Kind, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BUCKETS_US.iter().position(|bound| us <= *bound).unwrap_or(LATENCY_BUCKETS_US.len());
        self.latency[kind as usize][bucket].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us[kind as usize].fetch_add(us, Ordering::Relaxed);
    }

    /// Calls of `kind` that ended with `outcome`.
    pub fn outcomes(&self, kind: Kind, outcome: Outcome) -> u64 {
        let index = Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0);
        self.outcomes[kind as usize][index].load(Ordering::Relaxed)
    }

    /// The latency histogram of `kind`'s calls: the count per bucket (the last one: above every bound)
    /// and the sum in microseconds.
    pub fn latency(&self, kind: Kind) -> ([u64; LATENCY_BUCKETS_US.len() + 1], u64) {
        let counts = std::array::from_fn(|bucket| self.latency[kind as usize][bucket].load(Ordering::Relaxed));
        (counts, self.latency_sum_us[kind as usize].load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_answers_are_checked() {
        let future = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) + 60;
        let good = format!(r#"{{"user":"42","channels":["chat:1","room:*","*"],"expires_at":{future},"x":1}}"#);
        let identity = connect_identity(good.as_bytes()).expect("valid");
        assert_eq!(
            (identity.user.as_deref(), identity.grants.len(), identity.expires_at),
            (Some("42"), 3, Some(future))
        );
        assert!(connect_identity(br#"{"user":"42","channels":[]}"#).is_ok(), "expires_at is optional");
        for bad in [
            &b"not json"[..],
            b"[]",
            b"{}",
            br#"{"user":"","channels":[]}"#,
            br#"{"user":42,"channels":[]}"#,
            br#"{"user":"42"}"#,
            br#"{"user":"42","channels":"chat:1"}"#,
            br#"{"user":"42","channels":["bad name"]}"#,
            br#"{"user":"42","channels":[],"expires_at":1}"#,
            br#"{"user":"42","channels":[],"expires_at":"soon"}"#,
            br#"{"user":"42","channels":[],"expires_at":-5}"#,
        ] {
            assert!(connect_identity(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn only_answers_the_backend_allows_are_reused() {
        let headers = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::CACHE_CONTROL, value.parse().expect("header"));
            headers
        };
        assert_eq!(cache_time(&headers("max-age=30")), Some(Duration::from_secs(30)));
        assert_eq!(cache_time(&headers("private, max-age=5")), Some(Duration::from_secs(5)));
        assert_eq!(cache_time(&headers("max-age=999999")), Some(MAX_CACHE_TIME));
        for none in ["no-store, max-age=30", "max-age=30, no-cache", "max-age=0", "max-age=soon", "public"] {
            assert_eq!(cache_time(&headers(none)), None, "{none}");
        }
        assert_eq!(cache_time(&HeaderMap::new()), None);
    }

    #[test]
    fn only_allow_listed_headers_and_the_cookies_are_forwarded() {
        let section = ProxySection {
            connect_url: Some("http://127.0.0.1:1/connect".into()),
            forward_headers: vec!["X-Tenant".into()],
            ..ProxySection::default()
        };
        let proxy = Proxy::new(&section).expect("proxy");
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "Basic c2VjcmV0".parse().expect("header"));
        headers.append("x-tenant", "a".parse().expect("header"));
        headers.append("x-tenant", "b".parse().expect("header"));
        headers.append(header::COOKIE, "session=1".parse().expect("header"));
        headers.append(header::COOKIE, "theme=dark".parse().expect("header"));
        headers.insert("x-correlation-id", "abc-123".parse().expect("header"));
        let forwarded = proxy.forwarded(&headers, Some("127.0.0.1:5000".parse().expect("address")));
        assert_eq!(forwarded.headers.len(), 1, "{:?}", forwarded.headers);
        assert_eq!(forwarded.headers["x-tenant"], "a, b");
        assert_eq!(forwarded.cookies, "session=1; theme=dark");
        assert_eq!((forwarded.remote_addr.as_deref(), forwarded.correlation_id()), (Some("127.0.0.1:5000"), "abc-123"));
        let generated = proxy.forwarded(&HeaderMap::new(), None);
        assert_eq!((generated.correlation_id().len(), generated.remote_addr), (32, None));
    }
}
