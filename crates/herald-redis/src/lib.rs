//! Herald's Redis engine: any node delivers to any client through one Redis.
//!
//! - Publish is one Lua script (`scripts.rs`): idempotency key, next offset, epoch, history (a stream
//!   trimmed to the namespace's size, expiring with its age) and the pub/sub message, atomically. It is
//!   acknowledged only once Redis ran it; every command is bounded by a timeout, so while Redis is
//!   unreachable callers get an error quickly (the API answers 503).
//! - Fan-out: one pub/sub connection per node (`subscriber.rs`), subscribed per channel while the
//!   node has local subscribers, so a publication reaches only nodes that need it.
//! - Cluster state: nodes heartbeat into a sorted set; presence entries carry their node and are
//!   ignored (and removed) once that node stops heartbeating, so a crashed node leaves no ghosts.
//! - Rollback fencing: every channel's hash records the primary's replication ID (`connection.rs`,
//!   `scripts.rs`); a channel assigned under another history moves to a new epoch first.
//!
//! This crate is a [`Backplane`]: ordering, gap repair, re-sync, the probe and the node-to-node
//! protocols are herald-core's (`cluster.rs`), which this crate feeds and knows nothing else of.

mod connection;
mod keys;
mod scripts;
mod subscriber;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use herald_core::engine::SubscribeFuture;
use herald_core::publication::{format_timestamp, now_ms};
use herald_core::{
    Backplane, BackplaneStats, ChannelName, ClusterEngine, EngineError, Epoch, History, NodeInfo, NodeStats, Policies,
    Position, PresenceEntry, Publication, PublishOutcome, PublishRequest, Recipient, Relay, RelayConfig,
};
use redis::{AsyncCommands, Script};
use tokio::sync::{mpsc, oneshot};

use connection::{Commands, Live};
pub use connection::{Identity, Target};
pub use keys::Keys;

/// How long a starting node waits for Redis to become reachable.
pub const STARTUP_WAIT: Duration = Duration::from_secs(30);
/// History entries asked for by a first `XRANGE`, and at most by any.
const FIRST_PAGE: usize = 16;
const MAX_PAGE: usize = 512;

/// Settings of the Redis engine.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port/db`.
    pub url: String,
    /// Prefix of every key and pub/sub channel.
    pub prefix: String,
    pub node_id: String,
    pub policies: Policies,
    /// A node that has not heartbeated for this long is gone (with its presence).
    pub node_ttl: Duration,
    /// How often the node sends itself a probe through pub/sub.
    pub probe_interval: Duration,
    /// A probe not back within this time marks the subscription stale.
    pub probe_timeout: Duration,
    /// Bound on every Redis command.
    pub command_timeout: Duration,
    /// PEM file of the certificate authority for `rediss://` (default: the system's trust store).
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// Whether a publish waits for replicas before it is acknowledged.
    pub durability: Durability,
    /// Bytes of history one read holds at most (one more entry beyond it); a read of more pages on.
    pub max_read_bytes: usize,
}

/// When a publish counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Once the primary ran the publish script.
    None,
    /// Once at least `min_replicas` replicas have it too (`WAIT`), within `timeout`; otherwise the publish
    /// fails with [`EngineError::NotDurable`] (the publication may still have been delivered).
    Replicated { min_replicas: u32, timeout: Duration },
}

impl RedisConfig {
    pub fn new(url: impl Into<String>, node_id: impl Into<String>, policies: Policies) -> Self {
        Self {
            url: url.into(),
            prefix: "herald".into(),
            node_id: node_id.into(),
            policies,
            node_ttl: Duration::from_secs(30),
            probe_interval: Duration::from_secs(1),
            probe_timeout: Duration::from_secs(3),
            command_timeout: Duration::from_secs(1),
            tls_ca_file: None,
            durability: Durability::None,
            max_read_bytes: 4 * 1024 * 1024,
        }
    }
}

/// Checks that `url` is a Redis URL this engine can use (without connecting): `redis://`, `rediss://`,
/// `redis+sentinel://` or `rediss+sentinel://`.
pub fn check_url(url: &str) -> Result<(), String> {
    install_crypto_provider();
    let target = Target::parse(url)?;
    redis::Client::open(target.sample_url().as_str()).map(|_| ()).map_err(|e| e.to_string())
}

/// rustls needs one process-wide crypto provider; Herald uses ring. Installing twice is harmless.
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Makes clients for one server URL with the configured TLS settings.
fn client_factory(config: &RedisConfig) -> Result<connection::ClientFactory, EngineError> {
    install_crypto_provider();
    let root_cert = match &config.tls_ca_file {
        Some(path) => {
            Some(std::fs::read(path).map_err(|e| EngineError::Protocol(format!("reading {}: {e}", path.display())))?)
        }
        None => None,
    };
    Ok(Box::new(move |url: &str| {
        let protocol = |e: redis::RedisError| EngineError::Protocol(e.to_string());
        match &root_cert {
            Some(root_cert) if url.starts_with("rediss://") => {
                let certificates = redis::TlsCertificates { client_tls: None, root_cert: Some(root_cert.clone()) };
                redis::Client::build_with_tls(url, certificates).map_err(protocol)
            }
            _ => redis::Client::open(url).map_err(protocol),
        }
    }))
}

/// Whether a failed command means the connection must be made again (it broke, timed out, or the
/// server is no longer a primary).
fn needs_new_connection(error: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_unrecoverable_error()
        || matches!(
            error.kind(),
            ErrorKind::Server(ServerErrorKind::ReadOnly)
                | ErrorKind::Server(ServerErrorKind::MasterDown)
                | ErrorKind::Server(ServerErrorKind::BusyLoading)
        )
}

/// The Redis engine as the hub uses it: [`Redis`] with herald-core's protocols on top.
pub type RedisEngine = ClusterEngine<Redis>;

/// The Redis backplane. Create with [`connect`], hand to `Hub::start`.
pub struct Redis {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) config: RedisConfig,
    pub(crate) keys: Keys,
    pub(crate) commands: Commands,
    publish_script: Script,
    top_script: Script,
    fence_script: Script,
    /// What the subscriber hands received messages to (set once, at start).
    pub(crate) relay: OnceLock<Arc<Relay>>,
    pub(crate) subscriber: mpsc::UnboundedSender<subscriber::Command>,
    subscriber_rx: Mutex<Option<mpsc::UnboundedReceiver<subscriber::Command>>>,
    /// Channels this node subscribes to (a copy of the actor's set, for periodic upkeep).
    pub(crate) subscribed: Mutex<std::collections::HashSet<ChannelName>>,
    /// The pub/sub connection is up.
    pub(crate) connected: AtomicBool,
    pub(crate) reconnects: AtomicU64,
    pub(crate) stopping: AtomicBool,
    /// Publishes waiting for replicas (`durability = replicated`); one `WAIT` answers all of them.
    durable: Mutex<DurableWaits>,
}

/// Where a publish waiting for replicas hears the outcome.
type DurableReply = oneshot::Sender<Result<(), EngineError>>;

/// Publishes waiting for the next `WAIT`, each with the connection it wrote on.
#[derive(Default)]
struct DurableWaits {
    waiting: Vec<(Live, DurableReply)>,
    running: bool,
}

/// A channel's state as the top script reports it.
#[derive(Debug, Clone)]
pub(crate) struct TopState {
    pub(crate) top: Position,
    /// First part of the IDs of this epoch's history entries.
    pub(crate) generation: u64,
    /// The epoch a fence replaced with this one: its positions were possibly seen with other contents.
    pub(crate) fenced_from: Option<Epoch>,
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn unavailable(error: impl std::fmt::Display) -> EngineError {
    EngineError::Unavailable(error.to_string())
}

/// Connects the command connection, waiting up to [`STARTUP_WAIT`] for Redis (or, with Sentinel, for a
/// primary) to be reachable.
pub async fn connect(config: RedisConfig) -> Result<RedisEngine, EngineError> {
    let target = Target::parse(&config.url).map_err(EngineError::Protocol)?;
    let commands = Commands::new(target, client_factory(&config)?, config.command_timeout);
    commands.wait_connected(tokio::time::Instant::now() + STARTUP_WAIT).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    let keys = Keys::new(&config.prefix, &config.node_id);
    let relay = RelayConfig {
        probe_interval: config.probe_interval,
        probe_timeout: config.probe_timeout,
        node_ttl: config.node_ttl,
        request_timeout: config.command_timeout,
    };
    let redis = Redis {
        inner: Arc::new(Inner {
            config,
            keys,
            commands,
            publish_script: Script::new(&scripts::publish()),
            top_script: Script::new(&scripts::top()),
            fence_script: Script::new(&scripts::fence()),
            relay: OnceLock::new(),
            subscriber: tx,
            subscriber_rx: Mutex::new(Some(rx)),
            subscribed: Mutex::new(std::collections::HashSet::new()),
            connected: AtomicBool::new(false),
            reconnects: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            durable: Mutex::new(DurableWaits::default()),
        }),
    };
    Ok(ClusterEngine::new(redis, relay))
}

impl Redis {
    /// The identity of the primary the command connection talks to now.
    pub async fn primary(&self) -> Result<Identity, EngineError> {
        Ok((*self.inner.commands.get().await?.identity).clone())
    }
}

impl Inner {
    /// The command connection (made first if needed).
    pub(crate) async fn live(&self) -> Result<Live, EngineError> {
        self.commands.get().await
    }

    /// `call`, bounded by the command timeout (for the pub/sub connection's requests).
    pub(crate) async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, EngineError> {
        match tokio::time::timeout(self.config.command_timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(unavailable(error)),
            Err(_) => Err(EngineError::Timeout),
        }
    }

    /// Runs `call` on `live`'s connection, bounded by the command timeout; a failure that means the
    /// connection is unusable makes the next caller connect anew.
    pub(crate) async fn on<T>(
        &self,
        live: &Live,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, EngineError> {
        match tokio::time::timeout(self.config.command_timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => {
                if needs_new_connection(&error) {
                    self.commands.broken(live);
                }
                Err(unavailable(error))
            }
            Err(_) => {
                self.commands.broken(live);
                Err(EngineError::Timeout)
            }
        }
    }

    /// Publishes `message` to a control channel; returns how many nodes it reached.
    pub(crate) async fn send_control(&self, target: String, message: String) -> Result<usize, EngineError> {
        let live = self.live().await?;
        let mut conn = live.conn.clone();
        self.on(&live, conn.publish(target, message)).await
    }

    /// The channel's top, its generation and the epoch it continues (fencing it first when its position
    /// was assigned under another history of the primary). A connection that broke on the way is made
    /// again once, so a re-sync right after a reconnect does not fail for a stale connection.
    pub(crate) async fn top_state(&self, channel: &ChannelName) -> Result<TopState, EngineError> {
        match self.top_state_once(channel).await {
            Err(EngineError::Unavailable(_) | EngineError::Timeout) => self.top_state_once(channel).await,
            other => other,
        }
    }

    async fn top_state_once(&self, channel: &ChannelName) -> Result<TopState, EngineError> {
        let policy = self.config.policies.history(channel);
        let live = self.live().await?;
        let mut conn = live.conn.clone();
        let mut invocation = self.top_script.prepare_invoke();
        invocation
            .key(self.keys.meta(channel))
            .key(self.keys.stream(channel))
            .arg(Epoch::generate().as_str())
            .arg(policy.ttl.as_millis() as u64)
            .arg(&*live.identity.replid);
        let (epoch, offset, generation, fenced, previous): (String, u64, u64, u8, String) =
            self.on(&live, invocation.invoke_async(&mut conn)).await?;
        let epoch = Epoch::parse(&epoch).map_err(|e| EngineError::Protocol(e.to_string()))?;
        if fenced == 1 {
            tracing::info!(%channel, epoch = %epoch, replaces = %previous,
                "channel fenced into a new epoch");
        }
        Ok(TopState { top: Position::new(epoch, offset), generation, fenced_from: Epoch::parse(&previous).ok() })
    }

    /// Moves `channel` to a new epoch if it is still in `epoch`, with nothing of `epoch` continued: its
    /// position went backwards, so some of its offsets may have been handed out twice.
    pub(crate) async fn fence_backwards(&self, channel: &ChannelName, epoch: &Epoch, seen: u64, now: u64) {
        tracing::warn!(%channel, %epoch, seen_offset = seen, engine_offset = now,
            "channel position went backwards in redis (its data rolled back); fencing it into a new epoch");
        let Ok(live) = self.live().await else { return };
        let mut conn = live.conn.clone();
        let mut invocation = self.fence_script.prepare_invoke();
        invocation
            .key(self.keys.meta(channel))
            .key(self.keys.stream(channel))
            .arg(epoch.as_str())
            .arg(Epoch::generate().as_str())
            .arg(&*live.identity.replid);
        if let Err(error) = self.on(&live, invocation.invoke_async::<u8>(&mut conn)).await {
            tracing::warn!(%channel, %error, "fencing failed; retried at the next re-sync");
        }
    }

    /// History entries with IDs from `start` to `end` (at most `limit`), oldest first, skipping entries
    /// older than the namespace's history age. Read a few entries at a time and stopped once they hold
    /// `max_read_bytes` (the entry that crosses it included), so concurrent reads of a large history
    /// hold a bounded amount each; callers page on from the last entry.
    pub(crate) async fn range(
        &self,
        channel: &ChannelName,
        start: String,
        end: String,
        limit: usize,
    ) -> Result<Vec<Arc<Publication>>, EngineError> {
        let oldest_kept = now_ms().saturating_sub(self.config.policies.history(channel).ttl.as_millis() as u64);
        let budget = self.config.max_read_bytes.max(1);
        let (mut publications, mut bytes, mut start, mut page) = (Vec::new(), 0usize, start, FIRST_PAGE);
        while publications.len() < limit && bytes < budget {
            let count = page.min(limit - publications.len());
            let live = self.live().await?;
            let mut conn = live.conn.clone();
            let entries: Vec<(String, Vec<Vec<u8>>)> = self
                .on(
                    &live,
                    redis::cmd("XRANGE")
                        .arg(self.keys.stream(channel))
                        .arg(&start)
                        .arg(&end)
                        .arg("COUNT")
                        .arg(count)
                        .query_async(&mut conn),
                )
                .await?;
            let read = entries.len();
            let mut page_bytes = 0;
            for (id, fields) in entries {
                start = format!("({id}");
                let mut stamp = 0u64;
                let mut envelope = None;
                let mut fields = fields.into_iter();
                while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
                    match name.as_slice() {
                        b"t" => stamp = std::str::from_utf8(&value).ok().and_then(|v| v.parse().ok()).unwrap_or(0),
                        b"p" => envelope = Some(value),
                        _ => {}
                    }
                }
                let Some(envelope) = envelope.filter(|_| stamp >= oldest_kept) else { continue };
                page_bytes += envelope.len();
                match Publication::from_envelope(envelope.into(), None) {
                    Ok(publication) => publications.push(Arc::new(publication)),
                    Err(error) => tracing::warn!(%channel, %error, "unreadable history entry"),
                }
                if bytes + page_bytes >= budget {
                    break;
                }
            }
            bytes += page_bytes;
            if read < count {
                break;
            }
            // Size the next read by what entries of this channel weigh, within the budget left.
            let average = (page_bytes / read.max(1)).max(1);
            page = ((budget.saturating_sub(bytes)) / average + 1).clamp(1, MAX_PAGE);
        }
        Ok(publications)
    }

    /// Publications after `since` (see [`Engine::history`]). A `since` in the epoch a fence replaced is
    /// gone as rolled back.
    pub(crate) async fn history(
        &self,
        channel: &ChannelName,
        since: Option<&Position>,
        limit: usize,
    ) -> Result<History, EngineError> {
        let TopState { top, generation, fenced_from } = self.top_state(channel).await?;
        let Some(since) = since else {
            if top.offset == 0 {
                return Ok(History::Covered { top, publications: Vec::new() });
            }
            let from = top.offset.saturating_sub(limit as u64) + 1;
            let publications = self
                .range(channel, format!("{generation}-{from}"), format!("{generation}-{}", top.offset), limit)
                .await?
                .into_iter()
                .filter(|p| p.position.epoch == top.epoch);
            return Ok(History::Covered { publications: publications.collect(), top });
        };
        if since.epoch != top.epoch || since.offset > top.offset {
            let rolled_back = fenced_from.as_ref() == Some(&since.epoch);
            return Ok(History::Gone { top, rolled_back });
        }
        if since.offset == top.offset {
            return Ok(History::Covered { top, publications: Vec::new() });
        }
        let start = format!("{generation}-{}", since.offset + 1);
        let entries = self.range(channel, start, "+".to_owned(), limit).await?;
        // Keep the unbroken run after `since`; a hole (trimmed, expired, unreadable) ends it.
        let publications: Vec<Arc<Publication>> = (since.offset + 1..)
            .zip(entries)
            .take_while(|(next, p)| p.position.epoch == since.epoch && p.position.offset == *next)
            .map(|(_, publication)| publication)
            .collect();
        if publications.is_empty() {
            return Ok(History::Gone { top, rolled_back: false });
        }
        Ok(History::Covered { top, publications })
    }

    /// Waits until replicas hold everything `live`'s connection wrote so far (`durability =
    /// replicated`). Publishes that arrive while a `WAIT` runs share the next one.
    async fn replicated(self: &Arc<Self>, live: Live, min_replicas: u32, timeout: Duration) -> Result<(), EngineError> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut durable = lock(&self.durable);
            durable.waiting.push((live, tx));
            !std::mem::replace(&mut durable.running, true)
        };
        if start {
            let inner = self.clone();
            tokio::spawn(async move { inner.run_waits(min_replicas, timeout).await });
        }
        rx.await.unwrap_or_else(|_| Err(EngineError::NotDurable("the replication wait was abandoned".into())))
    }

    async fn run_waits(self: Arc<Self>, min_replicas: u32, timeout: Duration) {
        loop {
            let waiting = {
                let mut durable = lock(&self.durable);
                if durable.waiting.is_empty() {
                    durable.running = false;
                    return;
                }
                std::mem::take(&mut durable.waiting)
            };
            // WAIT counts the writes of the connection it is sent on, so each connection gets its own.
            let mut by_connection: Vec<(Live, Vec<DurableReply>)> = Vec::new();
            for (live, tx) in waiting {
                match by_connection.iter_mut().find(|(l, _)| l.same_connection(&live)) {
                    Some((_, senders)) => senders.push(tx),
                    None => by_connection.push((live, vec![tx])),
                }
            }
            for (live, senders) in by_connection {
                let mut conn = live.conn.clone();
                let mut command = redis::cmd("WAIT");
                command.arg(min_replicas).arg(timeout.as_millis() as u64);
                let wait = command.query_async::<u32>(&mut conn);
                let answer = match tokio::time::timeout(timeout + self.config.command_timeout, wait).await {
                    Ok(Ok(count)) if count >= min_replicas => Ok(()),
                    Ok(Ok(count)) => Err(EngineError::NotDurable(format!(
                        "{count} of the {min_replicas} replicas required acknowledged the publication in time"
                    ))),
                    Ok(Err(error)) => {
                        if needs_new_connection(&error) {
                            self.commands.broken(&live);
                        }
                        Err(EngineError::NotDurable(format!("waiting for replicas failed: {error}")))
                    }
                    Err(_) => {
                        self.commands.broken(&live);
                        Err(EngineError::NotDurable("waiting for replicas timed out".into()))
                    }
                };
                for tx in senders {
                    let _ = tx.send(answer.clone());
                }
            }
        }
    }

    pub(crate) async fn live_nodes(&self) -> Result<Vec<String>, EngineError> {
        let live = self.live().await?;
        let mut conn = live.conn.clone();
        let since = now_ms().saturating_sub(self.config.node_ttl.as_millis() as u64);
        self.on(&live, conn.zrangebyscore(self.keys.nodes(), since, "+inf")).await
    }

    pub(crate) async fn heartbeat(&self, stats: &NodeStats) -> Result<(), EngineError> {
        let stats = serde_json::to_string(stats).map_err(|e| EngineError::Protocol(e.to_string()))?;
        let live = self.live().await?;
        let mut conn = live.conn.clone();
        let now = now_ms();
        let ttl = self.config.node_ttl.as_millis() as u64;
        let mut pipe = redis::pipe();
        pipe.zadd(self.keys.nodes(), &self.config.node_id, now)
            .ignore()
            .zrembyscore(self.keys.nodes(), 0, now.saturating_sub(ttl))
            .ignore()
            .pset_ex(self.keys.node_stats(&self.config.node_id), stats, ttl)
            .ignore();
        self.on(&live, pipe.query_async::<()>(&mut conn)).await
    }
}

#[async_trait]
impl Backplane for Redis {
    fn node_id(&self) -> &str {
        &self.inner.config.node_id
    }

    async fn start(&self, relay: Arc<Relay>) -> Result<(), EngineError> {
        self.inner.relay.set(relay).map_err(|_| EngineError::Protocol("engine started twice".into()))?;
        let rx = lock(&self.inner.subscriber_rx).take().ok_or(EngineError::Protocol("engine started twice".into()))?;
        subscriber::spawn(self.inner.clone(), rx);
        Ok(())
    }

    async fn publish(&self, request: &PublishRequest, header: &str) -> Result<PublishOutcome, EngineError> {
        let inner = &self.inner;
        let channel = &request.channel;
        let policy = inner.config.policies.history(channel);
        let now = now_ms();
        let live = inner.live().await?;
        let mut invocation = inner.publish_script.prepare_invoke();
        invocation.key(inner.keys.meta(channel)).key(inner.keys.stream(channel));
        if let Some(key) = &request.idempotency_key {
            invocation.key(inner.keys.dedup(channel, key));
        }
        invocation
            .arg(inner.keys.pubsub(channel))
            .arg(channel.as_str())
            .arg(&*request.event)
            .arg(request.data.get())
            .arg(&*request.correlation_id)
            .arg(format_timestamp(now))
            .arg(now)
            .arg(policy.size)
            .arg(policy.ttl.as_millis() as u64)
            .arg(inner.config.policies.dedup_window().as_secs())
            .arg(Epoch::generate().as_str())
            .arg(format!("{header}\n"))
            .arg(&*live.identity.replid)
            .arg(history_max_bytes(&policy));
        let mut conn = live.conn.clone();
        let outcome = inner.on(&live, invocation.invoke_async::<redis::Value>(&mut conn)).await?;
        let outcome = parse_publish_reply(outcome)?;
        if let (Durability::Replicated { min_replicas, timeout }, false) = (inner.config.durability, outcome.duplicate)
        {
            self.inner.replicated(live, min_replicas, timeout).await?;
        }
        Ok(outcome)
    }

    fn subscribe(&self, channel: &ChannelName) -> SubscribeFuture {
        let (tx, rx) = oneshot::channel();
        let sent = self.inner.subscriber.send(subscriber::Command::Subscribe(channel.clone(), tx));
        herald_core::engine::subscribe_answer(sent.is_ok(), rx)
    }

    fn unsubscribe(&self, channel: &ChannelName) {
        let _ = self.inner.subscriber.send(subscriber::Command::Unsubscribe(channel.clone()));
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
        Ok(self.inner.top_state(channel).await?.top)
    }

    async fn fence(&self, channel: &ChannelName, epoch: &Epoch, seen: u64, now: u64) {
        self.inner.fence_backwards(channel, epoch, seen, now).await;
    }

    async fn presence_join(&self, channel: &ChannelName, entry: PresenceEntry) -> Result<(), EngineError> {
        let inner = &self.inner;
        let value = serde_json::to_string(&entry).map_err(|e| EngineError::Protocol(e.to_string()))?;
        let live = inner.live().await?;
        let mut conn = live.conn.clone();
        let key = inner.keys.presence(channel);
        let mut pipe = redis::pipe();
        pipe.hset(&key, &entry.connection_id, value).ignore().expire(&key, 24 * 3600).ignore();
        inner.on(&live, pipe.query_async::<()>(&mut conn)).await
    }

    fn presence_leave(&self, channel: &ChannelName, connection_id: &str) {
        let inner = self.inner.clone();
        let key = inner.keys.presence(channel);
        let field = connection_id.to_owned();
        tokio::spawn(async move {
            let left = async {
                let live = inner.live().await?;
                let mut conn = live.conn.clone();
                inner.on(&live, conn.hdel::<_, _, ()>(&key, &field)).await
            };
            if let Err(error) = left.await {
                // The entry's node liveness still hides it once this node stops; a stale entry of a live
                // node stays until the next successful leave or the key's expiry.
                tracing::debug!(%error, key, "presence leave failed");
            }
        });
    }

    async fn presence(&self, channel: &ChannelName) -> Result<Vec<PresenceEntry>, EngineError> {
        let inner = &self.inner;
        let key = inner.keys.presence(channel);
        let live = inner.live().await?;
        let mut conn = live.conn.clone();
        let raw: HashMap<String, String> = inner.on(&live, conn.hgetall(&key)).await?;
        let nodes = inner.live_nodes().await?;
        let mut entries = Vec::with_capacity(raw.len());
        let mut ghosts = Vec::new();
        for (field, value) in raw {
            match PresenceEntry::from_json(value.as_bytes()) {
                Some(entry) if nodes.contains(&entry.node) => entries.push(entry),
                _ => ghosts.push(field),
            }
        }
        if !ghosts.is_empty() {
            let _ = inner.on(&live, conn.hdel::<_, _, ()>(&key, ghosts)).await;
        }
        entries.sort_by(|a, b| (&a.node, &a.connection_id).cmp(&(&b.node, &b.connection_id)));
        Ok(entries)
    }

    async fn heartbeat(&self, stats: &NodeStats) -> Result<(), EngineError> {
        self.inner.heartbeat(stats).await
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, EngineError> {
        let inner = &self.inner;
        let live = inner.live_nodes().await?;
        if live.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = live.iter().map(|n| inner.keys.node_stats(n)).collect();
        let connection = inner.live().await?;
        let mut conn = connection.conn.clone();
        let stats: Vec<Option<String>> =
            inner.on(&connection, redis::cmd("MGET").arg(keys).query_async(&mut conn)).await?;
        Ok(live
            .into_iter()
            .zip(stats)
            .map(|(node, stats)| {
                let stats = stats.and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default();
                NodeInfo { node, stats }
            })
            .collect())
    }

    async fn send(&self, to: Recipient<'_>, message: String) -> Result<usize, EngineError> {
        let target = match to {
            Recipient::Node(node) => self.inner.keys.control(node),
            Recipient::All => self.inner.keys.control_all(),
        };
        self.inner.send_control(target, message).await
    }

    fn connected(&self) -> bool {
        self.inner.connected.load(Ordering::SeqCst) && self.inner.commands.is_connected()
    }

    fn reconnect(&self) {
        let _ = self.inner.subscriber.send(subscriber::Command::Stale);
    }

    async fn wait_connected(&self, until: tokio::time::Instant) {
        let _ = self.inner.commands.wait_connected(until).await;
    }

    async fn stop(&self) {
        let inner = &self.inner;
        inner.stopping.store(true, Ordering::SeqCst);
        let Ok(live) = inner.live().await else { return };
        let mut conn = live.conn.clone();
        let _ = inner.on(&live, conn.zrem::<_, _, ()>(inner.keys.nodes(), &inner.config.node_id)).await;
        let _ = inner.on(&live, conn.del::<_, ()>(inner.keys.node_stats(&inner.config.node_id))).await;
    }

    fn stats(&self) -> BackplaneStats {
        let i = &self.inner;
        BackplaneStats {
            reconnects: i.reconnects.load(Ordering::Relaxed),
            rollbacks: i.commands.identity_changes.load(Ordering::Relaxed),
        }
    }
}

/// The bytes of envelopes a channel's history keeps (the script keeps the newest entry in any case).
fn history_max_bytes(policy: &herald_core::HistoryPolicy) -> u64 {
    policy.max_bytes as u64
}

fn parse_publish_reply(reply: redis::Value) -> Result<PublishOutcome, EngineError> {
    let protocol = |what: &str| EngineError::Protocol(format!("unexpected publish reply: {what}"));
    let redis::Value::Array(items) = reply else { return Err(protocol("not an array")) };
    let text = |value: &redis::Value| -> Option<String> {
        match value {
            redis::Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
            redis::Value::SimpleString(text) => Some(text.clone()),
            redis::Value::Int(number) => Some(number.to_string()),
            _ => None,
        }
    };
    match items.as_slice() {
        [redis::Value::Int(1), seen] => {
            let seen = text(seen).ok_or_else(|| protocol("duplicate"))?;
            let mut parts = seen.splitn(3, ':');
            let (Some(epoch), Some(offset), Some(correlation)) = (parts.next(), parts.next(), parts.next()) else {
                return Err(protocol("duplicate record"));
            };
            let epoch = Epoch::parse(epoch).map_err(|e| EngineError::Protocol(e.to_string()))?;
            let offset = offset.parse().map_err(|_| protocol("offset"))?;
            Ok(PublishOutcome {
                position: Position::new(epoch, offset),
                correlation_id: Arc::from(correlation),
                duplicate: true,
                receivers: None,
            })
        }
        [
            redis::Value::Int(0),
            epoch,
            redis::Value::Int(offset),
            redis::Value::Int(receivers),
            redis::Value::Int(_fenced),
        ] => {
            let epoch = text(epoch).ok_or_else(|| protocol("epoch"))?;
            let epoch = Epoch::parse(&epoch).map_err(|e| EngineError::Protocol(e.to_string()))?;
            Ok(PublishOutcome {
                position: Position::new(epoch, (*offset).max(0) as u64),
                // The caller's correlation ID; filled in by the caller.
                correlation_id: Arc::from(""),
                duplicate: false,
                receivers: Some((*receivers).max(0) as usize),
            })
        }
        _ => Err(protocol("shape")),
    }
}
