//! Herald's NATS JetStream engine: any node delivers to any client through a NATS system.
//!
//! - History: one JetStream stream holds every channel, one subject per channel (`names.rs`). Each
//!   message carries its Herald position in a header; offsets are assigned with optimistic concurrency
//!   on the subject's last sequence (`Nats-Expected-Last-Subject-Sequence`), so concurrent publishers
//!   on any nodes get gap-free offsets per channel (the loser of a race reads the new top and retries).
//!   Each message also names the sequence of the one before it on its subject, so a history read
//!   walks back from the top without scanning the stream (`stream.rs`).
//! - Fan-out: the stream republishes every stored message to a live subject, in stream order and only
//!   once it is stored; a node subscribes to a channel's live subject while it has local members
//!   (`subscriber.rs`).
//! - Idempotency for the configured window (24 h by default) in a KV bucket; node leases and presence
//!   in KV buckets with TTLs, so a killed node leaves no ghosts.
//! - Replicated by design: the stream's and buckets' replication factor is configurable (3 recommended),
//!   so history survives the loss of a server and a failover keeps acknowledged data.
//!
//! This crate is a [`Backplane`]: ordering, gap repair, re-sync, the probe and the node-to-node
//! protocols are herald-core's (`cluster.rs`), which this crate feeds and knows nothing else of.
//!
//! Modules, each knowing only those before it: `config.rs` (settings), `names.rs` (subjects, stream and
//! bucket names), `url.rs` (engine URLs), `shared.rs` (the connection and state every part uses),
//! `stream.rs` (publish, top, history walk, fencing) and `subscriber.rs` (live subscriptions, control
//! messages); this file connects and ties them into the [`Backplane`] (leases, presence, heartbeat).

mod config;
mod names;
mod shared;
mod stream;
mod subscriber;
mod url;

pub use url::{Servers, check_url, parse_url};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_nats::ConnectErrorKind;
use async_nats::jetstream::{self, kv};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use herald_core::engine::SubscribeFuture;
use herald_core::{
    Backplane, BackplaneStats, ChannelName, ClusterEngine, EngineError, Epoch, History, NodeInfo, NodeStats, Position,
    PresenceEntry, PublishOutcome, PublishRequest, Recipient, Relay, RelayConfig,
};
use tokio::sync::{mpsc, oneshot};

pub use config::NatsConfig;
pub use names::Names;
use shared::{Command, Inner, lock, unavailable};

/// Presence entries are removed by their connection or, for a node that died, ignored once its lease
/// expires; this bounds how long an entry of a live node whose removal failed stays.
const PRESENCE_TTL: Duration = Duration::from_secs(24 * 3600);

/// How long a starting node waits for NATS to become reachable.
pub const STARTUP_WAIT: Duration = Duration::from_secs(30);

/// The NATS engine as the hub uses it: [`Nats`] with herald-core's protocols on top.
pub type NatsEngine = ClusterEngine<Nats>;

/// The NATS backplane. Create with [`connect`], hand to `Hub::start`.
pub struct Nats {
    inner: Arc<Inner>,
}

/// The write found no stream for its subject (the answer JetStream gives while the stream is missing).
fn stream_missing(error: &kv::PutError) -> bool {
    std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<jetstream::context::PublishError>())
        .is_some_and(|error| error.kind() == jetstream::context::PublishErrorKind::StreamNotFound)
}

impl Inner {
    /// Makes the history stream and the buckets where they are missing.
    async fn ensure_layout(&self) -> Result<(), EngineError> {
        layout(&self.js, &self.names, &self.config).await.map(|_| ())
    }

    /// The keys of a bucket under `filter` (`>` for all), from the stream's own list of subjects with a
    /// message. (The client's `keys()` walks a consumer and waits for as many messages as it was told are
    /// pending; a lease that expires during the walk is never delivered, and the walk would wait out
    /// the timeout.)
    async fn keys(&self, store: &kv::Store, bucket: &str, filter: &str) -> Result<Vec<String>, EngineError> {
        let head = format!("$KV.{bucket}.");
        let mut listed = self.bounded(store.stream.info_with_subjects(format!("{head}{filter}"))).await?;
        let mut keys = Vec::new();
        while let Some(item) =
            tokio::time::timeout(self.config.command_timeout, listed.next()).await.map_err(|_| EngineError::Timeout)?
        {
            let (subject, _) = item.map_err(unavailable)?;
            if let Some(key) = subject.strip_prefix(&head) {
                keys.push(key.to_owned());
            }
        }
        Ok(keys)
    }

    async fn live_nodes(&self) -> Result<Vec<(String, NodeStats)>, EngineError> {
        let mut nodes = Vec::new();
        for key in self.keys(&self.nodes, &self.names.nodes_bucket(), ">").await? {
            let Some(node) = Names::node_of_key(&key) else { continue };
            // Gone meanwhile (its lease expired): not live.
            if let Some(value) = self.bounded(self.nodes.get(key)).await? {
                nodes.push((node, serde_json::from_slice(&value).unwrap_or_default()));
            }
        }
        nodes.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(nodes)
    }
}

async fn bucket(
    js: &jetstream::Context,
    name: String,
    max_age: Duration,
    replicas: usize,
) -> Result<kv::Store, EngineError> {
    if let Ok(store) = js.get_key_value(&name).await {
        return Ok(store);
    }
    // The bucket's stream is made here rather than by `create_key_value`, which asks for account
    // details that nats-server 2.9 answers in a form the client does not read. Same layout.
    let config = jetstream::stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        max_age,
        storage: jetstream::stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        num_replicas: replicas,
        discard: jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    };
    if let Err(error) = js.create_stream(config).await {
        // Another node may have made it meanwhile.
        tracing::debug!(%error, bucket = name, "making a bucket failed");
    }
    js.get_key_value(&name).await.map_err(|e| unavailable(format!("bucket {name}: {e}")))
}

async fn client_options(
    config: &NatsConfig,
    servers: &Servers,
    events: mpsc::UnboundedSender<Command>,
) -> Result<async_nats::ConnectOptions, EngineError> {
    let protocol = |what: &str, e: std::io::Error| EngineError::Protocol(format!("{what}: {e}"));
    let mut options = match &config.credentials_file {
        Some(path) => async_nats::ConnectOptions::new()
            .credentials_file(path)
            .await
            .map_err(|e| protocol(&path.display().to_string(), e))?,
        None => async_nats::ConnectOptions::new(),
    };
    if let Some((user, password)) = &servers.user {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &config.token {
        options = options.token(token.clone());
    }
    if let Some(path) = &config.nkey_seed_file {
        let seed = std::fs::read_to_string(path).map_err(|e| protocol(&path.display().to_string(), e))?;
        options = options.nkey(seed.trim().to_owned());
    }
    if let Some(path) = &config.tls_ca_file {
        options = options.add_root_certificates(path.clone());
    }
    Ok(options
        .require_tls(servers.tls)
        .name(format!("herald {}", config.node_id))
        .connection_timeout(config.command_timeout * 2)
        .request_timeout(Some(config.command_timeout))
        .max_reconnects(None)
        .event_callback(move |event| {
            let events = events.clone();
            async move {
                let command = match event {
                    async_nats::Event::Connected => Command::Connected,
                    async_nats::Event::Disconnected => Command::Disconnected,
                    other => {
                        tracing::debug!(event = %other, "nats client event");
                        return;
                    }
                };
                let _ = events.send(command);
            }
        }))
}

/// The history stream and the three buckets, made where missing.
async fn layout(
    js: &jetstream::Context,
    names: &Names,
    config: &NatsConfig,
) -> Result<(jetstream::stream::Stream, kv::Store, kv::Store, kv::Store), EngineError> {
    let stream = stream::ensure(js, names, config).await?;
    let replicas = config.replicas;
    let nodes = bucket(js, names.nodes_bucket(), config.node_ttl, replicas).await?;
    let presence = bucket(js, names.presence_bucket(), PRESENCE_TTL, replicas).await?;
    let dedup = bucket(js, names.dedup_bucket(), config.policies.dedup_window(), replicas).await?;
    Ok((stream, nodes, presence, dedup))
}

/// Connects to NATS (waiting up to [`STARTUP_WAIT`]) and makes the stream and buckets if they are missing.
pub async fn connect(config: NatsConfig) -> Result<NatsEngine, EngineError> {
    let servers = parse_url(&config.url).map_err(EngineError::Protocol)?;
    let addresses: Vec<async_nats::ServerAddr> = servers
        .addresses
        .iter()
        .map(|a| a.parse().map_err(|e| EngineError::Protocol(format!("{a}: {e}"))))
        .collect::<Result<_, _>>()?;
    let (tx, rx) = mpsc::unbounded_channel();
    // Until NATS answers (it may start after this node), up to the start-up wait; refused credentials
    // or a TLS setup that cannot work end the wait at once, since trying again cannot fix them.
    let deadline = tokio::time::Instant::now() + STARTUP_WAIT;
    let client = loop {
        let options = client_options(&config, &servers, tx.clone()).await?;
        let attempt = tokio::time::timeout_at(deadline, options.connect(addresses.clone())).await;
        match attempt.map_err(|_| EngineError::Unavailable("nats did not answer in time".into()))? {
            Ok(client) => break client,
            Err(error) => match error.kind() {
                ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => {
                    return Err(EngineError::Protocol(format!("nats refused this node's credentials: {error}")));
                }
                ConnectErrorKind::Tls => return Err(EngineError::Protocol(format!("nats over TLS: {error}"))),
                // The client reports a certificate it does not trust as an I/O error (rustls's own words).
                ConnectErrorKind::Io if error.to_string().contains("invalid peer certificate") => {
                    return Err(EngineError::Protocol(format!("nats over TLS: {error}")));
                }
                _ if tokio::time::Instant::now() >= deadline => return Err(unavailable(error)),
                _ => {
                    tracing::warn!(%error, "nats not reachable yet; retrying");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            },
        }
    };
    let js = jetstream::new(client.clone());
    let names = Names::new(&config.prefix, &config.node_id);
    // While JetStream elects leaders (a server down, a cluster starting) its API fails for a while.
    let deadline = tokio::time::Instant::now() + STARTUP_WAIT;
    let (stream, nodes, presence, dedup) = loop {
        match layout(&js, &names, &config).await {
            Ok(made) => break made,
            Err(error) if tokio::time::Instant::now() >= deadline => return Err(error),
            Err(error) => {
                tracing::warn!(%error, "nats jetstream not ready; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    let relay = RelayConfig {
        probe_interval: config.probe_interval,
        probe_timeout: config.probe_timeout,
        node_ttl: config.node_ttl,
        request_timeout: config.command_timeout,
    };
    let nats = Nats {
        inner: Arc::new(Inner {
            config,
            names,
            client,
            stream,
            js,
            nodes,
            presence,
            dedup,
            relay: OnceLock::new(),
            subscriber: tx,
            subscriber_rx: Mutex::new(Some(rx)),
            jetstream_ok: AtomicBool::new(true),
            reconnects: AtomicU64::new(0),
            rollbacks: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            tops: Mutex::new(HashMap::new()),
        }),
    };
    Ok(ClusterEngine::new(nats, relay))
}

#[async_trait]
impl Backplane for Nats {
    fn node_id(&self) -> &str {
        &self.inner.config.node_id
    }

    async fn start(&self, relay: Arc<Relay>) -> Result<(), EngineError> {
        self.inner.relay.set(relay).map_err(|_| EngineError::Protocol("engine started twice".into()))?;
        let rx = lock(&self.inner.subscriber_rx).take().ok_or(EngineError::Protocol("engine started twice".into()))?;
        subscriber::start(self.inner.clone(), rx).await
    }

    async fn publish(&self, request: &PublishRequest, header: &str) -> Result<PublishOutcome, EngineError> {
        self.inner.publish(request, header).await
    }

    fn subscribe(&self, channel: &ChannelName) -> SubscribeFuture {
        let (tx, rx) = oneshot::channel();
        let sent = self.inner.subscriber.send(Command::Subscribe(channel.clone(), tx));
        herald_core::engine::subscribe_answer(sent.is_ok(), rx)
    }

    fn unsubscribe(&self, channel: &ChannelName) {
        let _ = self.inner.subscriber.send(Command::Unsubscribe(channel.clone()));
    }

    async fn history(
        &self,
        channel: &ChannelName,
        since: Option<&Position>,
        limit: usize,
    ) -> Result<History, EngineError> {
        self.inner.history(channel, since, limit).await
    }

    async fn top(&self, channel: &ChannelName) -> Result<Position, EngineError> {
        Ok(self.inner.top(channel).await?.position)
    }

    async fn fence(&self, channel: &ChannelName, epoch: &Epoch, seen: u64, now: u64) {
        tracing::warn!(%channel, %epoch, seen_offset = seen, engine_offset = now,
            "channel position went backwards in nats (its data rolled back); fencing it into a new epoch");
        if let Err(error) = self.inner.fence(channel, epoch).await {
            tracing::warn!(%channel, %error, "fencing failed; retried at the next re-sync");
        }
    }

    async fn presence_join(&self, channel: &ChannelName, entry: PresenceEntry) -> Result<(), EngineError> {
        let inner = &self.inner;
        let value = serde_json::to_vec(&entry).map_err(|e| EngineError::Protocol(e.to_string()))?;
        let key = Names::presence_key(channel, &entry.connection_id);
        inner.bounded(inner.presence.put(key, value.into())).await.map(|_| ())
    }

    fn presence_leave(&self, channel: &ChannelName, connection_id: &str) {
        let inner = self.inner.clone();
        let key = Names::presence_key(channel, connection_id);
        tokio::spawn(async move {
            if let Err(error) = inner.bounded(inner.presence.purge(&key)).await {
                // The entry's node liveness still hides it once this node stops.
                tracing::debug!(%error, key, "presence leave failed");
            }
        });
    }

    async fn presence(&self, channel: &ChannelName) -> Result<Vec<PresenceEntry>, EngineError> {
        let inner = &self.inner;
        let filter = format!("{}.>", Names::presence_prefix(channel));
        let keys = inner.keys(&inner.presence, &inner.names.presence_bucket(), &filter).await?;
        let nodes: Vec<String> = inner.live_nodes().await?.into_iter().map(|(node, _)| node).collect();
        let mut entries = Vec::with_capacity(keys.len());
        for key in keys {
            let Some(value) = inner.bounded(inner.presence.get(key.clone())).await? else { continue };
            match PresenceEntry::from_json(&value) {
                Some(entry) if nodes.contains(&entry.node) => entries.push(entry),
                _ => {
                    let _ = inner.bounded(inner.presence.purge(&key)).await;
                }
            }
        }
        entries.sort_by(|a, b| (&a.node, &a.connection_id).cmp(&(&b.node, &b.connection_id)));
        Ok(entries)
    }

    async fn heartbeat(&self, stats: &NodeStats) -> Result<(), EngineError> {
        let inner = &self.inner;
        let value: Bytes = serde_json::to_vec(stats).map_err(|e| EngineError::Protocol(e.to_string()))?.into();
        let key = Names::node_key(&inner.config.node_id);
        let put = || tokio::time::timeout(inner.config.command_timeout, inner.nodes.put(&key, value.clone()));
        let mut result = put().await;
        if matches!(&result, Ok(Err(error)) if stream_missing(error)) {
            // JetStream came back without its data (a server restarted with an empty store), or is still
            // recovering its streams after a restart: make what is missing (making one that exists is a
            // no-op), then try once more. A timeout is no reason: the bucket is there, electing a leader.
            if let Err(error) = inner.ensure_layout().await {
                tracing::debug!(%error, "making the nats stream and buckets failed");
            }
            result = put().await;
        }
        let result = match result {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(unavailable(error)),
            Err(_) => Err(EngineError::Timeout),
        };
        inner.jetstream_ok.store(result.is_ok(), Ordering::SeqCst);
        result
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, EngineError> {
        Ok(self.inner.live_nodes().await?.into_iter().map(|(node, stats)| NodeInfo { node, stats }).collect())
    }

    async fn send(&self, to: Recipient<'_>, message: String) -> Result<usize, EngineError> {
        let inner = &self.inner;
        let subject = match to {
            Recipient::Node(node) => inner.names.control(node),
            Recipient::All => inner.names.control_all(),
        };
        inner.bounded(inner.client.publish(subject, message.into())).await?;
        inner.bounded(inner.client.flush()).await?;
        // Core NATS does not say how many received it: every live node subscribes to both subjects.
        match to {
            Recipient::Node(_) => Ok(1),
            Recipient::All => Ok(inner.live_nodes().await?.len()),
        }
    }

    fn connected(&self) -> bool {
        let inner = &self.inner;
        inner.jetstream_ok.load(Ordering::SeqCst)
            && inner.client.connection_state() == async_nats::connection::State::Connected
    }

    fn reconnect(&self) {
        let _ = self.inner.subscriber.send(Command::Stale);
    }

    fn ordered_links(&self) -> bool {
        false
    }

    async fn wait_connected(&self, until: tokio::time::Instant) {
        while !self.connected() && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(&self) {
        let inner = &self.inner;
        inner.stopping.store(true, Ordering::SeqCst);
        let _ = inner.bounded(inner.nodes.purge(Names::node_key(&inner.config.node_id))).await;
    }

    fn stats(&self) -> BackplaneStats {
        let inner = &self.inner;
        BackplaneStats {
            reconnects: inner.reconnects.load(Ordering::Relaxed),
            rollbacks: inner.rollbacks.load(Ordering::Relaxed),
        }
    }
}
