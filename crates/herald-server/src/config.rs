//! Configuration: one serde tree with defaults in code, layered TOML file -> `HERALD_*` environment ->
//! command-line flags, validated as a whole before anything binds a socket.
//!
//! Plain data and its checks: nothing here calls into handlers or authentication. What validation
//! loads (the keys of client tokens) it loads once, into [`Settings`], through `credentials.rs`.
//! Over 600 lines on purpose: every key's type, default and check stay in this one file (the checks are
//! one short function per section), so that a key is added in one place; its tests are the last 90.
//!
//! Environment keys are the TOML keys in upper case with `HERALD_` in front; nested keys join with a
//! double underscore (`HERALD_LIMITS__MAX_BODY_BYTES`). Every key is documented in `docs/config.md`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use herald_core::{HistoryPolicy, HubConfig, Policies};
use serde::{Deserialize, Deserializer, Serialize};

use crate::credentials::{ClientKeys, KeySources, SubscribeRule, key_parts};
use crate::env::EnvPairs;

/// Exit status for a configuration the server refuses (EX_USAGE from sysexits.h).
pub const EXIT_BAD_CONFIG: i32 = 64;

/// Command-line flags. Each has an environment variable and a TOML key of the same name.
#[derive(Debug, Parser, Default)]
#[command(name = "herald", version, about = "Herald real-time delivery gateway")]
pub struct Cli {
    /// Address to listen on (HERALD_LISTEN; default 127.0.0.1:8080). Port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Engine URL: `memory` (default), `redis://…`, `rediss://…`, `redis+sentinel://…`,
    /// `redis+cluster://…`, `nats://…`, `tls://…` (HERALD_ENGINE).
    #[arg(long, value_name = "URL")]
    pub engine: Option<String>,
    /// TOML configuration file (HERALD_CONFIG).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// This node's name in the cluster (HERALD_NODE_ID; default: a random name).
    #[arg(long, value_name = "NAME")]
    pub node_id: Option<String>,
    /// Log format: `text` or `json` (HERALD_LOG_FORMAT).
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Serve a non-loopback address without any authentication (HERALD_INSECURE).
    #[arg(long)]
    pub insecure: bool,
}

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen: String,
    pub engine: String,
    pub node_id: Option<String>,
    pub log_format: String,
    /// Server API keys; when any is set the server API needs `Authorization: Bearer <key>`.
    #[serde(deserialize_with = "string_or_list")]
    pub api_keys: Vec<String>,
    /// HS256 secret for client tokens; when set, clients authenticate with a JWT (see docs/config.md).
    pub jwt_hs256_secret: Option<String>,
    /// PEM public keys for RS256, ES256 and EdDSA client tokens.
    pub jwt_rs256_public_key_file: Option<PathBuf>,
    pub jwt_es256_public_key_file: Option<PathBuf>,
    pub jwt_eddsa_public_key_file: Option<PathBuf>,
    /// A JWK set file (public keys with `alg` and `kid`) for client tokens.
    pub jwt_jwks_file: Option<PathBuf>,
    /// When set, a client token must name this audience in its `aud` claim; when unset, a token with
    /// any `aud` is refused (RFC 7519 section 4.1.3: Herald cannot identify itself with it).
    pub jwt_audience: Option<String>,
    /// When set, a client token's `iss` claim must be exactly this.
    pub jwt_issuer: Option<String>,
    /// Seconds of clock difference allowed between the token issuer and Herald for `nbf` and `iat`
    /// (`exp` is exact: a connection closes when its token expires).
    pub jwt_leeway_secs: u64,
    /// Allow serving a non-loopback address with no authentication at all.
    pub insecure: bool,
    /// Browser origins allowed to call Herald from other sites (`https://app.example.com`, or `*`).
    #[serde(deserialize_with = "string_or_list")]
    pub cors_allowed_origins: Vec<String>,
    /// OTLP/HTTP collector (e.g. `http://127.0.0.1:4318`); when set, publish and deliver spans are exported.
    pub otlp_endpoint: Option<String>,
    pub history: HistoryConfig,
    /// Per-namespace overrides, keyed by namespace (the part of a channel before the first `:`).
    pub namespaces: BTreeMap<String, NamespaceConfig>,
    pub limits: LimitsConfig,
    pub sse: SseConfig,
    pub redis: RedisSection,
    pub nats: NatsSection,
    /// The connect and subscribe proxies: the application's backend decides who a client is and what
    /// it may subscribe to (`proxy.rs`).
    pub proxy: ProxySection,
    /// Lifecycle webhooks: channel occupied and vacated, users joined and left, POSTed to the backend
    /// (`hooks.rs`).
    pub hooks: HooksSection,
    /// How long an idempotency key is remembered, in seconds.
    pub dedup_window_secs: u64,
    /// Longest a graceful shutdown may take before the process exits anyway, in seconds.
    pub shutdown_grace_secs: u64,
    /// Milliseconds over which connected clients are told to reconnect on shutdown (spread evenly).
    pub drain_window_ms: u64,
    /// Threads of the `herald` binary's runtime; 0: one per core available to the process.
    pub worker_threads: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Publications kept per channel.
    pub size: usize,
    /// Seconds a publication stays in history.
    pub ttl_secs: u64,
    /// Envelope bytes kept per channel (oldest dropped first; the newest is always kept, see
    /// `HistoryPolicy::max_bytes`).
    pub max_bytes: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceConfig {
    pub history_size: Option<usize>,
    pub history_ttl_secs: Option<u64>,
    pub history_max_bytes: Option<usize>,
    /// Who may subscribe when client authentication is on (`owner`, `claim`, `authenticated`, `public`).
    pub subscribe: Option<SubscribeRule>,
    /// `stream` (the default): a subscriber without a position starts at the top. `latest`: it gets the
    /// channel's latest publication first.
    pub mode: Option<NamespaceMode>,
    /// Lifecycle webhooks for this namespace's channels; default: on when `hooks.url` is set.
    pub hooks: Option<bool>,
}

/// How a namespace's channels start a subscriber that brings no position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NamespaceMode {
    /// Only what is published from now on.
    Stream,
    /// The latest publication still in history first, then what is published from now on.
    Latest,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest request body of the server API, in bytes.
    pub max_body_bytes: usize,
    /// Largest `/v1/history` answer, in bytes: publications stop before the one that would go over
    /// (at least one is always included); the client pages on with `since` = the last offset it got.
    pub max_history_response_bytes: usize,
    /// `/v1/history` answers being read or sent at once on this node; more wait up to 5 s, then get 429.
    /// With the Redis engine each one holds up to about `max_history_response_bytes` of memory.
    pub max_concurrent_history_reads: usize,
    /// Connections (SSE plus WebSocket) this node accepts.
    pub max_connections: usize,
    /// Connections one authenticated user may hold on this node.
    pub max_connections_per_user: usize,
    /// Publications per second one API key may make on this node (burst: one second's worth); 0 = no limit.
    pub publish_rate_per_key: u64,
    /// Channels one connection may subscribe to.
    pub max_channels_per_connection: usize,
    /// Publications waiting for one connection before it counts as too slow and is closed.
    pub queue_capacity: usize,
    /// Largest WebSocket message a client may send, in bytes.
    pub ws_max_message_bytes: usize,
    /// Channels one broadcast may name.
    pub max_broadcast_channels: usize,
    /// Publications one batch publish (`{"publications":[…]}`) may carry.
    pub max_batch_publications: usize,
    /// Longest `timeout_ms` a publisher may wait for delivery receipts.
    pub max_await_ms: u64,
    /// Seconds a write to a client may stay blocked before the connection is closed.
    pub write_timeout_secs: u64,
    /// Seconds a client gets to send a whole request head; also how long a kept-alive API connection may
    /// sit idle between requests.
    pub header_read_timeout_secs: u64,
    /// Largest request head (request line plus headers), in bytes.
    pub max_header_bytes: usize,
    /// Seconds a client gets to send a whole request body, counted from the end of its head.
    pub body_read_timeout_secs: u64,
    /// Slowest average rate a request body may arrive at once its first second has passed, in bytes per
    /// second (a body that trickles in is refused long before `body_read_timeout_secs`); 0 = no rate.
    pub min_body_rate_bytes_per_sec: u64,
    /// Seconds data sent to a client may stay unacknowledged before the kernel drops the connection
    /// (TCP_USER_TIMEOUT on Linux): a client whose network vanished is noticed within this time; 0 = the
    /// kernel's default (many minutes).
    pub dead_peer_timeout_secs: u64,
    /// Open TCP connections of every kind (streams, API calls, requests still sending their head); when
    /// unset, `max_connections` plus a tenth plus 1,000.
    pub max_sockets: Option<usize>,
}

impl LimitsConfig {
    /// The socket cap in force.
    pub fn sockets(&self) -> usize {
        self.max_sockets.unwrap_or_else(|| self.max_connections.saturating_add(self.max_connections / 10 + 1000))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SseConfig {
    /// Seconds between `: ping` comments on an idle stream.
    pub ping_interval_secs: u64,
    /// Reconnect delay suggested to EventSource clients (`retry:`), in milliseconds.
    pub retry_ms: u64,
}

/// Settings of the Redis engine (used when `engine` is a `redis://` URL).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSection {
    /// Prefix of every key and pub/sub channel; clusters with different prefixes share a Redis safely.
    pub prefix: String,
    /// Milliseconds between backplane probes (a message the node sends itself through pub/sub).
    pub probe_interval_ms: u64,
    /// Milliseconds without a probe coming back before the subscription counts as stale.
    pub probe_timeout_ms: u64,
    /// Seconds after which a node that stopped heartbeating (and its presence) is gone.
    pub node_ttl_secs: u64,
    /// Milliseconds any single Redis command may take before the request fails (503).
    pub command_timeout_ms: u64,
    /// PEM file of the certificate authority that signed the Redis server's certificate (`rediss://`);
    /// without it the system's trust store is used.
    pub tls_ca_file: Option<PathBuf>,
    /// `none`: a publish is acknowledged once the primary has it. `replicated`: only once at least
    /// `min_replicas` replicas have it too (else 503 `not_durable`).
    pub durability: String,
    /// Replicas that must acknowledge a publication with `durability = "replicated"`.
    pub min_replicas: u32,
    /// Milliseconds a publish waits for replicas with `durability = "replicated"`.
    pub replication_timeout_ms: u64,
}

/// Settings of the NATS JetStream engine (used when `engine` is a `nats://` or `tls://` URL).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsSection {
    /// Prefix of every subject, stream and bucket; clusters with different prefixes share NATS safely.
    pub prefix: String,
    /// Replication factor of the history stream and the KV buckets: 1, 3 or 5 (3 recommended; needs
    /// that many JetStream servers).
    pub replicas: usize,
    /// Token authentication.
    pub token: Option<String>,
    /// File holding an NKey seed (`SU…`).
    pub nkey_seed_file: Option<PathBuf>,
    /// A `.creds` file (user JWT and NKey seed).
    pub credentials_file: Option<PathBuf>,
    /// PEM file of the certificate authority of the NATS servers' certificates (`tls://`).
    pub tls_ca_file: Option<PathBuf>,
    /// Milliseconds between probes (a message the node sends itself through NATS).
    pub probe_interval_ms: u64,
    /// Milliseconds without a probe coming back before the subscription counts as stale.
    pub probe_timeout_ms: u64,
    /// Seconds after which a node that stopped heartbeating (and its presence) is gone.
    pub node_ttl_secs: u64,
    /// Milliseconds any single NATS request may take before the request fails (503).
    pub command_timeout_ms: u64,
    /// Milliseconds between re-syncs of every subscribed channel from history (0: never).
    pub resync_interval_ms: u64,
}

/// The connect and subscribe proxies (docs/config.md, "Connect and subscribe proxies").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySection {
    /// `http://…` the backend that identifies a client without a token, once per connection.
    pub connect_url: Option<String>,
    /// `http://…` the backend that decides each subscription to a namespace with `subscribe = "proxy"`.
    pub subscribe_url: Option<String>,
    /// Milliseconds a call may take, its whole answer included, before the client is refused (504).
    pub timeout_ms: u64,
    /// Request headers sent to the backend besides the cookies (case-insensitive names).
    #[serde(deserialize_with = "string_or_list")]
    pub forward_headers: Vec<String>,
    /// Calls in flight at once on this node (both proxies); beyond, clients get 429 at once.
    pub max_concurrent: usize,
    /// Largest answer body read from the backend, in bytes (a longer one refuses the client: 502).
    pub max_response_bytes: usize,
}

/// The lifecycle webhooks (docs/config.md, "Lifecycle webhooks").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HooksSection {
    /// `http://…` the backend that receives the events; unset: no lifecycle webhooks.
    pub url: Option<String>,
    /// `whsec_<base64>` (24 to 64 bytes once decoded): the key of the Standard Webhooks signature.
    /// Several (a list, or comma-separated) while rotating: each request is signed with each.
    #[serde(deserialize_with = "string_or_list")]
    pub secret: Vec<String>,
    /// Milliseconds one delivery attempt may take, its whole answer included.
    pub timeout_ms: u64,
    /// Milliseconds a channel (or a user in it) must stay empty before it counts as vacated (left): a
    /// client back within this time makes no event at all.
    pub vacated_grace_ms: u64,
    /// Attempts per event before it is dropped (counted as dropped).
    pub max_attempts: u32,
    /// Milliseconds before the first retry; each following one waits twice as long, up to `retry_max_ms`.
    pub retry_initial_ms: u64,
    /// Longest wait between two attempts, in milliseconds.
    pub retry_max_ms: u64,
    /// Seconds after its change an event is still worth sending; an older one is dropped unsent (a
    /// backend back after a long outage gets what is still news, not a flood of stale events).
    pub max_event_age_secs: u64,
    /// Channels whose events are sent side by side (each channel's stay in order); 1: one event at a
    /// time, all in order.
    pub max_concurrent: usize,
}

impl Default for HooksSection {
    fn default() -> Self {
        Self {
            url: None,
            secret: Vec::new(),
            timeout_ms: 5000,
            vacated_grace_ms: 5000,
            max_attempts: 10,
            retry_initial_ms: 500,
            retry_max_ms: 60_000,
            max_event_age_secs: 3600,
            max_concurrent: 16,
        }
    }
}

impl Default for ProxySection {
    fn default() -> Self {
        Self {
            connect_url: None,
            subscribe_url: None,
            timeout_ms: 2000,
            forward_headers: Vec::new(),
            max_concurrent: 256,
            max_response_bytes: 64 * 1024,
        }
    }
}

impl Default for NatsSection {
    fn default() -> Self {
        Self {
            prefix: "herald".into(),
            replicas: 1,
            token: None,
            nkey_seed_file: None,
            credentials_file: None,
            tls_ca_file: None,
            probe_interval_ms: 1000,
            probe_timeout_ms: 3000,
            node_ttl_secs: 30,
            command_timeout_ms: 1000,
            resync_interval_ms: 5000,
        }
    }
}

impl Default for RedisSection {
    fn default() -> Self {
        Self {
            prefix: "herald".into(),
            probe_interval_ms: 1000,
            probe_timeout_ms: 3000,
            node_ttl_secs: 30,
            command_timeout_ms: 1000,
            tls_ca_file: None,
            durability: "none".into(),
            min_replicas: 1,
            replication_timeout_ms: 500,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            engine: "memory".into(),
            node_id: None,
            log_format: "text".into(),
            api_keys: Vec::new(),
            jwt_hs256_secret: None,
            jwt_rs256_public_key_file: None,
            jwt_es256_public_key_file: None,
            jwt_eddsa_public_key_file: None,
            jwt_jwks_file: None,
            jwt_audience: None,
            jwt_issuer: None,
            jwt_leeway_secs: 60,
            insecure: false,
            otlp_endpoint: None,
            cors_allowed_origins: Vec::new(),
            history: HistoryConfig::default(),
            namespaces: BTreeMap::new(),
            limits: LimitsConfig::default(),
            sse: SseConfig::default(),
            redis: RedisSection::default(),
            nats: NatsSection::default(),
            proxy: ProxySection::default(),
            hooks: HooksSection::default(),
            dedup_window_secs: 24 * 60 * 60,
            shutdown_grace_secs: 10,
            drain_window_ms: 3000,
            worker_threads: 0,
        }
    }
}

impl Default for HistoryConfig {
    fn default() -> Self {
        let policy = HistoryPolicy::default();
        Self { size: policy.size, ttl_secs: policy.ttl.as_secs(), max_bytes: policy.max_bytes }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let hub = HubConfig::default();
        Self {
            max_body_bytes: 1024 * 1024,
            max_history_response_bytes: 4 * 1024 * 1024,
            max_concurrent_history_reads: 16,
            max_connections: hub.max_connections,
            max_connections_per_user: hub.max_connections_per_user,
            publish_rate_per_key: 50_000,
            max_channels_per_connection: hub.max_channels_per_connection,
            queue_capacity: hub.queue_capacity,
            ws_max_message_bytes: 64 * 1024,
            max_broadcast_channels: 1000,
            max_batch_publications: 1000,
            max_await_ms: 30_000,
            write_timeout_secs: 10,
            header_read_timeout_secs: 10,
            max_header_bytes: 16 * 1024,
            body_read_timeout_secs: 10,
            min_body_rate_bytes_per_sec: 1024,
            dead_peer_timeout_secs: 45,
            max_sockets: None,
        }
    }
}

impl Default for SseConfig {
    fn default() -> Self {
        Self { ping_interval_secs: 15, retry_ms: 1000 }
    }
}

fn string_or_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::One(text) => text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect(),
        OneOrMany::Many(list) => list,
    })
}

impl Config {
    /// Whether `channel`'s namespace is a latest-value one (`namespaces.<ns>.mode = "latest"`).
    pub fn is_latest(&self, channel: &herald_core::ChannelName) -> bool {
        self.namespaces.get(channel.namespace()).and_then(|ns| ns.mode) == Some(NamespaceMode::Latest)
    }

    /// Where the keys of client tokens come from.
    pub fn key_sources(&self) -> KeySources<'_> {
        KeySources {
            hs256_secret: self.jwt_hs256_secret.as_deref(),
            rs256_public_key_file: self.jwt_rs256_public_key_file.as_deref(),
            es256_public_key_file: self.jwt_es256_public_key_file.as_deref(),
            eddsa_public_key_file: self.jwt_eddsa_public_key_file.as_deref(),
            jwks_file: self.jwt_jwks_file.as_deref(),
        }
    }
}

/// Validated settings the server runs with: the configuration and what it names, loaded once. A
/// changed `config` is checked (and its key files read) again with [`Settings::from_config`].
#[derive(Debug, Clone)]
pub struct Settings {
    pub config: Config,
    pub listen: SocketAddr,
    pub node_id: String,
    /// The keys client tokens may be signed with, read from their files when the settings were made.
    pub client_keys: ClientKeys,
    /// `HERALD_*` environment variables that name no configuration key and were ignored (Kubernetes
    /// sets `HERALD_SERVICE_HOST`, `HERALD_PORT`, ... for a Service named `herald`); the binary logs
    /// each as a warning.
    pub ignored_env: Vec<String>,
}

impl Settings {
    /// Validates `config` (a whole tree, defaults included) into settings; every problem found.
    pub fn from_config(config: Config) -> Result<Settings, Vec<String>> {
        validate(config)
    }

    pub fn hub_config(&self) -> HubConfig {
        let limits = &self.config.limits;
        HubConfig {
            queue_capacity: limits.queue_capacity,
            max_channels_per_connection: limits.max_channels_per_connection,
            max_connections: limits.max_connections,
            max_connections_per_user: limits.max_connections_per_user,
            max_replay: self
                .config
                .history
                .size
                .max(self.config.namespaces.values().filter_map(|n| n.history_size).max().unwrap_or(0)),
        }
    }

    pub fn policies(&self) -> Policies {
        let c = &self.config;
        let default_history = HistoryPolicy {
            size: c.history.size,
            ttl: Duration::from_secs(c.history.ttl_secs),
            max_bytes: c.history.max_bytes,
        };
        let namespaces = c
            .namespaces
            .iter()
            .map(|(name, ns)| {
                let policy = HistoryPolicy {
                    size: ns.history_size.unwrap_or(default_history.size),
                    ttl: ns.history_ttl_secs.map_or(default_history.ttl, Duration::from_secs),
                    max_bytes: ns.history_max_bytes.unwrap_or(default_history.max_bytes),
                };
                (name.clone(), policy)
            })
            .collect();
        Policies { default_history, namespaces, dedup_window: Some(Duration::from_secs(c.dedup_window_secs)) }
    }

    pub fn ping_interval(&self) -> Duration {
        Duration::from_secs(self.config.sse.ping_interval_secs)
    }
}

/// Loads the configuration from the file named by `--config`/`HERALD_CONFIG`, the environment and the
/// flags, and validates it. Returns every problem found, not just the first.
pub fn load(cli: &Cli, env: &[(String, String)]) -> Result<Settings, Vec<String>> {
    let config_file =
        cli.config.clone().or_else(|| env.iter().find(|(k, _)| k == "HERALD_CONFIG").map(|(_, v)| PathBuf::from(v)));
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    if let Some(path) = &config_file {
        if !path.is_file() {
            return Err(vec![format!("config file {} does not exist or is not a file", path.display())]);
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    // HERALD_CONFIG names the file; HERALD_LOG is the log filter, read by the binary's logger.
    let (env_pairs, ignored_env) =
        known_env(env.iter().filter(|(k, _)| k.starts_with("HERALD_") && k != "HERALD_CONFIG" && k != "HERALD_LOG"));
    figment = figment.merge(EnvPairs { pairs: env_pairs });
    let mut flags = serde_json::Map::new();
    let mut put = |key: &str, value: &Option<String>| {
        if let Some(v) = value {
            flags.insert(key.to_owned(), serde_json::Value::String(v.clone()));
        }
    };
    put("listen", &cli.listen);
    put("engine", &cli.engine);
    put("node_id", &cli.node_id);
    put("log_format", &cli.log_format);
    if cli.insecure {
        flags.insert("insecure".to_owned(), serde_json::Value::Bool(true));
    }
    figment = figment.merge(Serialized::defaults(serde_json::Value::Object(flags)));
    let config: Config =
        figment.extract().map_err(|errors| errors.into_iter().map(|e| e.to_string()).collect::<Vec<_>>())?;
    let mut settings = validate(config)?;
    settings.ignored_env = ignored_env;
    Ok(settings)
}

/// Splits `HERALD_*` variables into those naming a configuration key and the names of the rest. An
/// unknown key in a configuration file stays an error; in the environment it is only ignored, because
/// the environment is shared with whatever else runs in the process's namespace.
fn known_env<'a>(env: impl Iterator<Item = &'a (String, String)>) -> (Vec<(String, String)>, Vec<String>) {
    let defaults = figment::value::Value::serialize(Config::default()).ok();
    let known = |key: &str| {
        let mut node = defaults.as_ref();
        for part in key.split("__") {
            match node {
                // An empty table is a map keyed by the user (`namespaces`): its keys are all valid here,
                // and their contents are checked when the configuration is read.
                Some(figment::value::Value::Dict(_, dict)) if dict.is_empty() => return true,
                Some(figment::value::Value::Dict(_, dict)) => node = dict.get(part),
                _ => return false,
            }
        }
        node.is_some()
    };
    let (kept, ignored): (Vec<_>, Vec<_>) =
        env.cloned().partition(|(name, _)| crate::env::key_of(name).is_some_and(|key| known(&key)));
    (kept, ignored.into_iter().map(|(name, _)| name).collect())
}

fn check_nats(nats: &NatsSection, problems: &mut Vec<String>) {
    if !matches!(nats.replicas, 1 | 3 | 5) {
        problems.push(format!("nats.replicas: {} must be 1, 3 or 5", nats.replicas));
    }
    let prefix_ok = nats.prefix.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
    if nats.prefix.is_empty() || !prefix_ok {
        problems.push(format!("nats.prefix: {:?} must be letters, digits, _ -", nats.prefix));
    }
    for (key, path) in [
        ("nats.nkey_seed_file", &nats.nkey_seed_file),
        ("nats.credentials_file", &nats.credentials_file),
        ("nats.tls_ca_file", &nats.tls_ca_file),
    ] {
        if let Some(path) = path.as_ref().filter(|p| !p.is_file()) {
            problems.push(format!("{key}: {} does not exist or is not a file", path.display()));
        }
    }
    for (key, value) in [
        ("nats.probe_interval_ms", nats.probe_interval_ms),
        ("nats.probe_timeout_ms", nats.probe_timeout_ms),
        ("nats.node_ttl_secs", nats.node_ttl_secs),
        ("nats.command_timeout_ms", nats.command_timeout_ms),
    ] {
        if value == 0 {
            problems.push(format!("{key} must be greater than 0"));
        }
    }
    if nats.probe_timeout_ms <= nats.probe_interval_ms {
        problems.push("nats.probe_timeout_ms must be greater than nats.probe_interval_ms".to_owned());
    }
}

/// Checks `config` as a whole and loads what it names (the keys of client tokens, once); every problem
/// found, not just the first.
fn validate(config: Config) -> Result<Settings, Vec<String>> {
    let mut problems = Vec::new();
    let listen =
        config.listen.parse::<SocketAddr>().map_err(|e| format!("listen: {:?} is not an address: {e}", config.listen));
    check_engine(&config.engine, &mut problems);
    check_redis(&config.redis, &mut problems);
    check_nats(&config.nats, &mut problems);
    check_names(&config, &mut problems);
    check_limits(&config, &mut problems);
    check_namespaces(&config.namespaces, &mut problems);
    check_proxy(&config, &mut problems);
    check_hooks(&config, &mut problems);
    check_http(&config, &mut problems);
    let client_keys = check_credentials(&config, &mut problems);
    if let (Ok(address), Some(keys)) = (&listen, &client_keys) {
        let open = config.api_keys.is_empty() && keys.is_empty() && config.proxy.connect_url.is_none();
        if !address.ip().is_loopback() && open && !config.insecure {
            problems.push(format!(
                "listen: {address} is reachable from other machines but no authentication is configured; \
                 set api_keys and jwt_hs256_secret, or pass --insecure to serve it open anyway"
            ));
        }
    }
    match (listen, client_keys) {
        (Ok(listen), Some(client_keys)) if problems.is_empty() => {
            let node_id = config.node_id.clone().unwrap_or_else(|| format!("node-{:08x}", rand::random::<u32>()));
            Ok(Settings { config, listen, node_id, client_keys, ignored_env: Vec::new() })
        }
        (Err(problem), _) => {
            problems.insert(0, problem);
            Err(problems)
        }
        _ => Err(problems),
    }
}

fn check_engine(engine: &str, problems: &mut Vec<String>) {
    match crate::engines::kind_of(engine) {
        Some(kind) => {
            if let Err(error) = kind.check(engine) {
                problems.push(format!("engine: {engine:?} is not a usable {} URL: {error}", kind.name));
            }
        }
        None => problems.push(format!(
            "engine: {engine:?} is not an engine URL; expected \"memory\", redis://host:port/db or nats://host:4222"
        )),
    }
}

fn check_redis(redis: &RedisSection, problems: &mut Vec<String>) {
    match redis.durability.as_str() {
        "none" => {}
        "replicated" if redis.min_replicas == 0 => {
            problems.push("redis.min_replicas must be at least 1 with durability = \"replicated\"".to_owned())
        }
        "replicated" if redis.replication_timeout_ms == 0 => {
            problems.push("redis.replication_timeout_ms must be greater than 0".to_owned())
        }
        // A WAIT holds the command connection: commands behind it must not time out first.
        "replicated" if redis.replication_timeout_ms >= redis.command_timeout_ms => problems.push(
            "redis.replication_timeout_ms must be less than redis.command_timeout_ms (a WAIT holds the connection)"
                .to_owned(),
        ),
        "replicated" => {}
        other => problems.push(format!("redis.durability: {other:?} must be \"none\" or \"replicated\"")),
    }
    if let Some(path) = &redis.tls_ca_file {
        if !path.is_file() {
            problems.push(format!("redis.tls_ca_file: {} does not exist or is not a file", path.display()));
        }
    }
    let prefix_ok = redis.prefix.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if redis.prefix.is_empty() || !prefix_ok {
        problems.push(format!("redis.prefix: {:?} must be letters, digits, _ - .", redis.prefix));
    }
    for (key, value) in [
        ("redis.probe_interval_ms", redis.probe_interval_ms),
        ("redis.probe_timeout_ms", redis.probe_timeout_ms),
        ("redis.node_ttl_secs", redis.node_ttl_secs),
        ("redis.command_timeout_ms", redis.command_timeout_ms),
    ] {
        if value == 0 {
            problems.push(format!("{key} must be greater than 0"));
        }
    }
    if redis.probe_timeout_ms <= redis.probe_interval_ms {
        problems.push("redis.probe_timeout_ms must be greater than redis.probe_interval_ms".to_owned());
    }
}

/// The log format and the node's name.
fn check_names(config: &Config, problems: &mut Vec<String>) {
    if !matches!(config.log_format.as_str(), "text" | "json") {
        problems.push(format!("log_format: {:?} must be \"text\" or \"json\"", config.log_format));
    }
    if let Some(node) = &config.node_id {
        if node.is_empty()
            || node.len() > 64
            || !node.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            problems.push(format!("node_id: {node:?} must be 1 to 64 of A-Z a-z 0-9 - _"));
        }
    }
}

fn check_limits(config: &Config, problems: &mut Vec<String>) {
    let limits = &config.limits;
    let positive = [
        ("limits.max_body_bytes", limits.max_body_bytes as u64),
        ("limits.max_history_response_bytes", limits.max_history_response_bytes as u64),
        ("limits.max_concurrent_history_reads", limits.max_concurrent_history_reads as u64),
        ("limits.max_connections", limits.max_connections as u64),
        ("limits.max_connections_per_user", limits.max_connections_per_user as u64),
        ("limits.max_channels_per_connection", limits.max_channels_per_connection as u64),
        ("limits.queue_capacity", limits.queue_capacity as u64),
        ("limits.ws_max_message_bytes", limits.ws_max_message_bytes as u64),
        ("limits.max_broadcast_channels", limits.max_broadcast_channels as u64),
        ("limits.max_batch_publications", limits.max_batch_publications as u64),
        ("limits.write_timeout_secs", limits.write_timeout_secs),
        ("limits.header_read_timeout_secs", limits.header_read_timeout_secs),
        ("limits.body_read_timeout_secs", limits.body_read_timeout_secs),
        ("sse.ping_interval_secs", config.sse.ping_interval_secs),
        ("history.ttl_secs", config.history.ttl_secs),
        ("history.max_bytes", config.history.max_bytes as u64),
        ("dedup_window_secs", config.dedup_window_secs),
    ];
    for (key, value) in positive {
        if value == 0 {
            problems.push(format!("{key} must be greater than 0"));
        }
    }
    if limits.max_sockets == Some(0) {
        problems.push("limits.max_sockets must be greater than 0".to_owned());
    }
    if !(1024..=1024 * 1024).contains(&limits.max_header_bytes) {
        problems.push("limits.max_header_bytes must be between 1024 and 1048576".to_owned());
    }
    if config.drain_window_ms >= config.shutdown_grace_secs.saturating_mul(1000) {
        problems.push("drain_window_ms must be shorter than shutdown_grace_secs".to_owned());
    }
    if config.worker_threads > MAX_WORKER_THREADS {
        problems.push(format!("worker_threads must be at most {MAX_WORKER_THREADS} (0: one per core)"));
    }
}

/// More threads than this is a typo, not a machine.
const MAX_WORKER_THREADS: usize = 1024;

fn check_namespaces(namespaces: &BTreeMap<String, NamespaceConfig>, problems: &mut Vec<String>) {
    for (name, ns) in namespaces {
        if name.is_empty()
            || !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'@' | b'=' | b'/'))
        {
            problems.push(format!("namespaces.{name}: not a valid namespace name"));
        }
        if ns.history_ttl_secs == Some(0) {
            problems.push(format!("namespaces.{name}.history_ttl_secs must be greater than 0"));
        }
        if ns.history_max_bytes == Some(0) {
            problems.push(format!("namespaces.{name}.history_max_bytes must be greater than 0"));
        }
    }
}

/// The proxies: `http://` URLs, sane bounds, header names, and a subscribe URL exactly when some
/// namespace asks it.
fn check_proxy(config: &Config, problems: &mut Vec<String>) {
    let proxy = &config.proxy;
    for (key, url) in [("proxy.connect_url", &proxy.connect_url), ("proxy.subscribe_url", &proxy.subscribe_url)] {
        let Some(url) = url else { continue };
        match axum::http::Uri::try_from(url.as_str()) {
            Ok(uri) if uri.scheme_str() == Some("http") && uri.host().is_some_and(|h| !h.is_empty()) => {}
            Ok(uri) if uri.scheme_str() == Some("https") => problems.push(format!(
                "{key}: {url:?}: https is not supported in this build; reach the backend over http:// on a private network"
            )),
            _ => problems.push(format!("{key}: {url:?} must be an http:// URL with a host")),
        }
    }
    if !(1..=60_000).contains(&proxy.timeout_ms) {
        problems.push("proxy.timeout_ms must be 1 to 60000".to_owned());
    }
    if proxy.max_concurrent == 0 {
        problems.push("proxy.max_concurrent must be greater than 0".to_owned());
    }
    if !(2..=16 * 1024 * 1024).contains(&proxy.max_response_bytes) {
        problems.push("proxy.max_response_bytes must be 2 to 16777216".to_owned());
    }
    for name in &proxy.forward_headers {
        if axum::http::HeaderName::from_bytes(name.trim().as_bytes()).is_err() {
            problems.push(format!("proxy.forward_headers: {name:?} is not a header name"));
        }
    }
    let asking: Vec<&String> =
        config.namespaces.iter().filter(|(_, ns)| ns.subscribe == Some(SubscribeRule::Proxy)).map(|(n, _)| n).collect();
    match (&proxy.subscribe_url, asking.is_empty()) {
        (None, false) => problems
            .push(format!("namespaces {asking:?} have subscribe = \"proxy\" but proxy.subscribe_url is not set")),
        (Some(_), true) => problems.push(
            "proxy.subscribe_url is set but no namespace has subscribe = \"proxy\" (it would never be asked)"
                .to_owned(),
        ),
        _ => {}
    }
}

/// Secrets a request of the lifecycle webhooks may be signed with at once (a rotation needs two).
const MAX_HOOK_SECRETS: usize = 4;

/// The lifecycle webhooks: an `http://` URL with a `whsec_` secret, sane bounds, an engine that has a
/// lifecycle store, and no namespace asking for hooks without a URL.
fn check_hooks(config: &Config, problems: &mut Vec<String>) {
    let hooks = &config.hooks;
    let asking: Vec<&String> =
        config.namespaces.iter().filter(|(_, ns)| ns.hooks == Some(true)).map(|(name, _)| name).collect();
    let Some(url) = &hooks.url else {
        if !hooks.secret.is_empty() {
            problems.push("hooks.secret is set but hooks.url is not (no event would be sent)".to_owned());
        }
        if !asking.is_empty() {
            problems.push(format!("namespaces {asking:?} have hooks = true but hooks.url is not set"));
        }
        return;
    };
    match axum::http::Uri::try_from(url.as_str()) {
        Ok(uri) if uri.scheme_str() == Some("http") && uri.host().is_some_and(|h| !h.is_empty()) => {}
        Ok(uri) if uri.scheme_str() == Some("https") => problems.push(format!(
            "hooks.url: {url:?}: https is not supported in this build; reach the backend over http:// on a private network"
        )),
        _ => problems.push(format!("hooks.url: {url:?} must be an http:// URL with a host")),
    }
    if hooks.secret.is_empty() {
        problems
            .push("hooks.secret must be set when hooks.url is (whsec_ and the base64 of 24 to 64 bytes)".to_owned());
    }
    if hooks.secret.len() > MAX_HOOK_SECRETS {
        problems.push(format!("hooks.secret: at most {MAX_HOOK_SECRETS} secrets (while rotating)"));
    }
    for secret in &hooks.secret {
        if let Err(problem) = crate::hooks::secret_key(secret) {
            problems.push(format!("hooks.secret: {problem}"));
        }
    }
    if !(1..=60_000).contains(&hooks.timeout_ms) {
        problems.push("hooks.timeout_ms must be 1 to 60000".to_owned());
    }
    if hooks.vacated_grace_ms > 600_000 {
        problems.push("hooks.vacated_grace_ms must be 0 to 600000".to_owned());
    }
    if !(1..=100).contains(&hooks.max_attempts) {
        problems.push("hooks.max_attempts must be 1 to 100".to_owned());
    }
    if !(1..=3_600_000).contains(&hooks.retry_initial_ms) {
        problems.push("hooks.retry_initial_ms must be 1 to 3600000".to_owned());
    }
    if hooks.retry_max_ms < hooks.retry_initial_ms || hooks.retry_max_ms > 3_600_000 {
        problems.push("hooks.retry_max_ms must be at least hooks.retry_initial_ms and at most 3600000".to_owned());
    }
    if !(1..=256).contains(&hooks.max_concurrent) {
        problems.push("hooks.max_concurrent must be 1 to 256".to_owned());
    }
    if !(1..=7 * 24 * 3600).contains(&hooks.max_event_age_secs) {
        problems.push("hooks.max_event_age_secs must be 1 to 604800".to_owned());
    }
    let supported = config.engine == "memory" || crate::engines::kind_of(&config.engine) == Some(crate::engines::REDIS);
    if !supported {
        problems.push(format!(
            "hooks: lifecycle webhooks are not supported on this engine yet ({:?}); this build has them with \
             engine = \"memory\" and every Redis URL (redis://, redis+sentinel://, redis+cluster://), not NATS",
            config.engine
        ));
    }
}

/// Allowed browser origins and the trace collector.
fn check_http(config: &Config, problems: &mut Vec<String>) {
    for origin in &config.cors_allowed_origins {
        let valid = origin == "*"
            || ((origin.starts_with("http://") || origin.starts_with("https://"))
                && axum::http::HeaderValue::from_str(origin).is_ok()
                && !origin.ends_with('/'));
        if !valid {
            problems.push(format!(
                "cors_allowed_origins: {origin:?} must be \"*\" or an origin like https://app.example.com"
            ));
        }
    }
    if let Some(endpoint) = &config.otlp_endpoint {
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            problems.push(format!("otlp_endpoint: {endpoint:?} must be an http:// or https:// URL"));
        }
    }
}

/// API keys and the settings of client tokens; loads the token keys (the only time their files are
/// read). `None` when they cannot be loaded.
fn check_credentials(config: &Config, problems: &mut Vec<String>) -> Option<ClientKeys> {
    for (index, entry) in config.api_keys.iter().enumerate() {
        let (_, secret) = key_parts(entry, index);
        if secret.len() < 16 {
            problems.push("api_keys: every key must be at least 16 characters".to_owned());
            break;
        }
    }
    for (key, value) in [("jwt_audience", &config.jwt_audience), ("jwt_issuer", &config.jwt_issuer)] {
        if value.as_deref().is_some_and(str::is_empty) {
            problems.push(format!("{key} must not be empty when set"));
        }
    }
    if let Some(secret) = &config.jwt_hs256_secret {
        if secret.len() < 32 {
            problems.push("jwt_hs256_secret must be at least 32 bytes".to_owned());
        }
    }
    ClientKeys::load(&config.key_sources()).map_err(|problem| problems.push(problem)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_documented() {
        let docs = include_str!("../../../docs/config.md");
        fn keys(prefix: &str, value: &serde_json::Value, out: &mut Vec<String>) {
            if let serde_json::Value::Object(fields) = value {
                for (name, inner) in fields {
                    let key = if prefix.is_empty() { name.clone() } else { format!("{prefix}.{name}") };
                    match inner {
                        // Per-namespace keys are documented as `namespaces.<ns>.…`.
                        _ if key == "namespaces" => {
                            let one = serde_json::to_value(NamespaceConfig::default()).unwrap_or_default();
                            keys("namespaces.<ns>", &one, out);
                        }
                        serde_json::Value::Object(_) => keys(&key, inner, out),
                        _ => out.push(key),
                    }
                }
            }
        }
        let mut all = Vec::new();
        keys("", &serde_json::to_value(Config::default()).expect("config serializes"), &mut all);
        assert!(all.len() > 20, "{all:?}");
        let missing: Vec<&String> = all.iter().filter(|key| !docs.contains(&format!("`{key}`"))).collect();
        assert!(missing.is_empty(), "keys missing from docs/config.md: {missing:?}");
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn defaults_env_and_flags_layer_in_order() {
        let settings = load(&Cli::default(), &[]).expect("defaults are valid");
        assert_eq!(settings.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(settings.config.history.size, 256);

        let e = env(&[
            ("HERALD_LISTEN", "127.0.0.1:9000"),
            ("HERALD_LIMITS__MAX_BODY_BYTES", "2048"),
            ("HERALD_API_KEYS", "aaaaaaaaaaaaaaaa, bbbbbbbbbbbbbbbb"),
        ]);
        let settings = load(&Cli::default(), &e).expect("valid");
        assert_eq!(settings.listen.to_string(), "127.0.0.1:9000");
        assert_eq!(settings.config.limits.max_body_bytes, 2048);
        assert_eq!(settings.config.api_keys.len(), 2);

        let cli = Cli { listen: Some("127.0.0.1:0".into()), ..Cli::default() };
        assert_eq!(load(&cli, &e).expect("valid").listen.to_string(), "127.0.0.1:0");
        let contract = env(&[("HERALD_REDIS_DURABILITY", "replicated"), ("HERALD_REDIS_MIN_REPLICAS", "2")]);
        let settings = load(&Cli::default(), &contract).expect("the contract's names are accepted");
        assert_eq!((settings.config.redis.durability.as_str(), settings.config.redis.min_replicas), ("replicated", 2));
    }

    #[test]
    fn history_bytes_default_and_per_namespace() {
        let e = env(&[("HERALD_HISTORY__MAX_BYTES", "65536"), ("HERALD_NAMESPACES__CHAT__HISTORY_MAX_BYTES", "1024")]);
        let policies = load(&Cli::default(), &e).expect("valid").policies();
        let channel = |name: &str| herald_core::ChannelName::parse(name).expect("channel");
        assert_eq!(policies.history(&channel("user:1")).max_bytes, 65536);
        assert_eq!(policies.history(&channel("chat:1")).max_bytes, 1024);
        assert_eq!(policies.history(&channel("chat:1")).size, 256, "other settings keep their defaults");
        let defaults = load(&Cli::default(), &[]).expect("valid").policies();
        assert_eq!(defaults.history(&channel("x")).max_bytes, herald_core::policy::DEFAULT_HISTORY_MAX_BYTES);
        let problems =
            load(&Cli::default(), &env(&[("HERALD_NAMESPACES__CHAT__HISTORY_MAX_BYTES", "0")])).expect_err("zero");
        assert!(problems[0].contains("history_max_bytes"), "{problems:?}");
    }

    #[test]
    fn proxy_settings_come_from_the_environment_and_are_checked() {
        let e = env(&[
            ("HERALD_PROXY__CONNECT_URL", "http://127.0.0.1:3000/herald/connect"),
            ("HERALD_PROXY__FORWARD_HEADERS", "user-agent, X-Forwarded-For"),
            ("HERALD_PROXY__TIMEOUT_MS", "500"),
            ("HERALD_NAMESPACES__PRICE__MODE", "latest"),
        ]);
        let settings = load(&Cli::default(), &e).expect("valid");
        assert!(settings.ignored_env.is_empty(), "{:?}", settings.ignored_env);
        let proxy = &settings.config.proxy;
        assert_eq!(proxy.connect_url.as_deref(), Some("http://127.0.0.1:3000/herald/connect"));
        assert_eq!((proxy.forward_headers.len(), proxy.timeout_ms), (2, 500));
        assert!(settings.config.is_latest(&herald_core::ChannelName::parse("price:eur").expect("channel")));
        let cases: [(&[(&str, &str)], &str); 7] = [
            (&[("HERALD_PROXY__CONNECT_URL", "https://auth.internal/connect")], "https is not supported"),
            (&[("HERALD_PROXY__CONNECT_URL", "ftp://auth.internal/connect")], "http:// URL"),
            (&[("HERALD_PROXY__TIMEOUT_MS", "0")], "proxy.timeout_ms"),
            (&[("HERALD_PROXY__MAX_CONCURRENT", "0")], "proxy.max_concurrent"),
            (&[("HERALD_PROXY__FORWARD_HEADERS", "bad header")], "not a header name"),
            (&[("HERALD_NAMESPACES__TEAM__SUBSCRIBE", "proxy")], "proxy.subscribe_url is not set"),
            (&[("HERALD_PROXY__SUBSCRIBE_URL", "http://127.0.0.1:3000/s")], "no namespace has subscribe"),
        ];
        for (pairs, problem) in cases {
            let problems = load(&Cli::default(), &env(pairs)).expect_err(problem);
            assert!(problems.iter().any(|p| p.contains(problem)), "{problem}: {problems:?}");
        }
        let both = env(&[
            ("HERALD_PROXY__SUBSCRIBE_URL", "http://127.0.0.1:3000/s"),
            ("HERALD_NAMESPACES__TEAM__SUBSCRIBE", "proxy"),
        ]);
        assert!(load(&Cli::default(), &both).is_ok());
        // A connect proxy authenticates clients: a non-loopback address is not open.
        let exposed = env(&[("HERALD_LISTEN", "0.0.0.0:8080")]);
        assert!(load(&Cli::default(), &exposed).is_err(), "no client authentication at all");
        let mut proxied = exposed.clone();
        proxied.extend(env(&[("HERALD_PROXY__CONNECT_URL", "http://10.0.0.2/connect")]));
        assert!(load(&Cli::default(), &proxied).is_ok());
    }

    #[test]
    fn hooks_settings_come_from_the_environment_and_are_checked() {
        const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let e = env(&[
            ("HERALD_HOOKS__URL", "http://127.0.0.1:3000/herald/hooks"),
            ("HERALD_HOOKS__SECRET", SECRET),
            ("HERALD_HOOKS__VACATED_GRACE_MS", "250"),
            ("HERALD_NAMESPACES__QUIET__HOOKS", "false"),
        ]);
        let settings = load(&Cli::default(), &e).expect("valid");
        assert!(settings.ignored_env.is_empty(), "{:?}", settings.ignored_env);
        assert_eq!(settings.config.hooks.url.as_deref(), Some("http://127.0.0.1:3000/herald/hooks"));
        assert_eq!(settings.config.hooks.vacated_grace_ms, 250);
        assert_eq!(settings.config.namespaces["quiet"].hooks, Some(false));
        let with = |extra: &[(&str, &str)]| {
            let mut pairs = env(&[("HERALD_HOOKS__URL", "http://127.0.0.1:3000/h"), ("HERALD_HOOKS__SECRET", SECRET)]);
            pairs.extend(env(extra));
            pairs
        };
        let cases: Vec<(Vec<(String, String)>, &str)> = vec![
            (env(&[("HERALD_HOOKS__URL", "http://127.0.0.1:3000/h")]), "hooks.secret must be set"),
            (with(&[("HERALD_HOOKS__SECRET", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")]), "must start with whsec_"),
            (with(&[("HERALD_HOOKS__SECRET", "whsec_not*base64")]), "not base64"),
            (with(&[("HERALD_HOOKS__SECRET", "whsec_c2hvcnQ=")]), "24 to 64 bytes"),
            (with(&[("HERALD_HOOKS__URL", "https://backend.internal/h")]), "https is not supported"),
            (with(&[("HERALD_HOOKS__URL", "backend.internal/h")]), "http:// URL"),
            (with(&[("HERALD_HOOKS__VACATED_GRACE_MS", "600001")]), "hooks.vacated_grace_ms"),
            (with(&[("HERALD_HOOKS__TIMEOUT_MS", "0")]), "hooks.timeout_ms"),
            (with(&[("HERALD_HOOKS__MAX_ATTEMPTS", "0")]), "hooks.max_attempts"),
            (with(&[("HERALD_HOOKS__RETRY_MAX_MS", "10")]), "hooks.retry_max_ms"),
            (with(&[("HERALD_HOOKS__MAX_EVENT_AGE_SECS", "0")]), "hooks.max_event_age_secs"),
            (with(&[("HERALD_HOOKS__MAX_CONCURRENT", "0")]), "hooks.max_concurrent"),
            (with(&[("HERALD_HOOKS__SECRET", &format!("{SECRET},whsec_short"))]), "not base64"),
            (with(&[("HERALD_HOOKS__SECRET", &[SECRET; 5].join(","))]), "at most 4 secrets"),
            (with(&[("HERALD_ENGINE", "nats://127.0.0.1:4222")]), "not supported on this engine yet"),
            (env(&[("HERALD_HOOKS__SECRET", SECRET)]), "hooks.url is not"),
            (env(&[("HERALD_NAMESPACES__ROOM__HOOKS", "true")]), "hooks.url is not set"),
        ];
        for (pairs, problem) in cases {
            let problems = load(&Cli::default(), &pairs).expect_err(problem);
            assert!(problems.iter().any(|p| p.contains(problem)), "{problem}: {problems:?}");
        }
    }

    #[test]
    fn worker_threads_default_to_one_per_core_and_are_bounded() {
        assert_eq!(load(&Cli::default(), &[]).expect("valid").config.worker_threads, 0);
        let one = load(&Cli::default(), &env(&[("HERALD_WORKER_THREADS", "1")])).expect("valid");
        assert_eq!(one.config.worker_threads, 1);
        let problems = load(&Cli::default(), &env(&[("HERALD_WORKER_THREADS", "100000")])).expect_err("too many");
        assert!(problems[0].contains("worker_threads"), "{problems:?}");
    }

    #[test]
    fn every_problem_is_reported() {
        let cli = Cli { listen: Some("nope".into()), engine: Some("carrier-pigeon://".into()), ..Cli::default() };
        let problems = load(&cli, &env(&[("HERALD_LIMITS__QUEUE_CAPACITY", "0")])).expect_err("invalid");
        assert_eq!(problems.len(), 3, "{problems:?}");
    }

    #[test]
    fn unknown_environment_variables_are_ignored_but_unknown_file_keys_are_not() {
        // What Kubernetes puts in every pod of a namespace that has a Service named `herald`.
        let kubernetes = env(&[
            ("HERALD_SERVICE_HOST", "10.0.0.1"),
            ("HERALD_SERVICE_PORT", "8080"),
            ("HERALD_PORT", "tcp://10.0.0.1:8080"),
            ("HERALD_PORT_8080_TCP", "tcp://10.0.0.1:8080"),
            ("HERALD_PORT_8080_TCP_ADDR", "10.0.0.1"),
            ("HERALD_REDIS__NO_SUCH_KEY", "1"),
            ("HERALD_LISTEN", "127.0.0.1:9000"),
            ("HERALD_NAMESPACES__CHAT__HISTORY_SIZE", "7"),
        ]);
        let settings = load(&Cli::default(), &kubernetes).expect("unknown variables do not stop start-up");
        assert_eq!(settings.listen.to_string(), "127.0.0.1:9000", "known variables still apply");
        assert_eq!(settings.config.namespaces["chat"].history_size, Some(7), "user-named keys are known");
        assert_eq!(
            settings.ignored_env,
            [
                "HERALD_SERVICE_HOST",
                "HERALD_SERVICE_PORT",
                "HERALD_PORT",
                "HERALD_PORT_8080_TCP",
                "HERALD_PORT_8080_TCP_ADDR",
                "HERALD_REDIS__NO_SUCH_KEY"
            ]
        );
        let typo = env(&[("HERALD_NAMESPACES__CHAT__HISTORY_SIZ", "7")]);
        assert!(load(&Cli::default(), &typo).is_err(), "inside a user-named table, keys are still checked");

        let file = std::env::temp_dir().join(format!("herald-config-test-{}.toml", std::process::id()));
        std::fs::write(&file, "port = 8080\n").expect("write the config file");
        let cli = Cli { config: Some(file.clone()), ..Cli::default() };
        let problems = load(&cli, &[]).expect_err("an unknown key in a file is an error");
        let _ = std::fs::remove_file(&file);
        assert!(problems[0].contains("port"), "{problems:?}");
    }
}
