//! The NATS engine's settings.

use std::path::PathBuf;
use std::time::Duration;

use herald_core::Policies;

/// Settings of the NATS engine.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// `nats://[user:password@]host:4222[,host2:4222]` or `tls://…` (TLS required).
    pub url: String,
    /// Prefix of every subject, and (upper-cased) of the stream and bucket names.
    pub prefix: String,
    pub node_id: String,
    pub policies: Policies,
    /// Replication factor of the history stream and the KV buckets (1, 3 or 5; the NATS system needs
    /// at least that many JetStream servers).
    pub replicas: usize,
    pub token: Option<String>,
    /// File holding an NKey seed (`SU…`).
    pub nkey_seed_file: Option<PathBuf>,
    /// A `.creds` file (user JWT and NKey seed).
    pub credentials_file: Option<PathBuf>,
    /// PEM file of the certificate authority for TLS (default: the system's trust store).
    pub tls_ca_file: Option<PathBuf>,
    /// A node that has not heartbeated for this long is gone (with its presence).
    pub node_ttl: Duration,
    /// How often the node sends itself a probe through NATS.
    pub probe_interval: Duration,
    /// A probe not back within this time marks the subscription stale.
    pub probe_timeout: Duration,
    /// Bound on every NATS request.
    pub command_timeout: Duration,
    /// Bytes of history one read holds at most (one more entry beyond it).
    pub max_read_bytes: usize,
    /// How often every subscribed channel is re-synced from history (zero: never). The stream's
    /// republish is core NATS, at most once: a message it dropped (a leader failing over between
    /// storing and republishing) reaches subscribers at the channel's next publication, or at this.
    pub resync_interval: Duration,
}

impl NatsConfig {
    pub fn new(url: impl Into<String>, node_id: impl Into<String>, policies: Policies) -> Self {
        Self {
            url: url.into(),
            prefix: "herald".into(),
            node_id: node_id.into(),
            policies,
            replicas: 1,
            token: None,
            nkey_seed_file: None,
            credentials_file: None,
            tls_ca_file: None,
            node_ttl: Duration::from_secs(30),
            probe_interval: Duration::from_secs(1),
            probe_timeout: Duration::from_secs(3),
            command_timeout: Duration::from_secs(1),
            max_read_bytes: 4 * 1024 * 1024,
            resync_interval: Duration::from_secs(5),
        }
    }
}
