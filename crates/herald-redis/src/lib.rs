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

//!
//! Modules, each knowing only those below it: `connection.rs` (where the primary is; the command
//! connection), `keys.rs` (key names), `scripts.rs` (the Lua scripts), `topology.rs` (a cluster's
//! shards, for the probe), and on top of them
//! `channels.rs` (positions and history reads), `durable.rs` (waiting for replicas), `subscriber.rs`
//! (the pub/sub connection and its tasks) and `lifecycle.rs` (the lifecycle webhooks' store, on a
//! command connection of its own: [`lifecycle`]). This file ties them into the [`Backplane`], with presence and
//! cluster state, which are a command or two each.

mod channels;
mod connection;
mod durable;
mod grouped;
mod keys;
mod lifecycle;
mod scripts;
mod subscriber;
mod topology;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use herald_core::engine::SubscribeFuture;
use herald_core::publication::{format_timestamp, now_ms};
use herald_core::{
    Backplane, BackplaneStats, ChannelName, ClusterEngine, EngineError, Epoch, History, NodeInfo, NodeStats, Policies,
    Position, PresenceEntry, PublishOutcome, PublishRequest, Recipient, Relay, RelayConfig,
};
use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
use redis::{AsyncCommands, Script};

use channels::Channels;
use connection::Commands;
pub use connection::{Identity, Target};
use durable::Replication;
pub use keys::Keys;
pub use lifecycle::RedisLifecycle;
use subscriber::PubSub;

/// How long a starting node waits for Redis to become reachable.
pub const STARTUP_WAIT: Duration = Duration::from_secs(30);

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

/// Makes clients with the configured TLS settings.
fn connector(config: &RedisConfig) -> Result<connection::Connector, EngineError> {
    install_crypto_provider();
    let root_cert = match &config.tls_ca_file {
        Some(path) => {
            Some(std::fs::read(path).map_err(|e| EngineError::Protocol(format!("reading {}: {e}", path.display())))?)
        }
        None => None,
    };
    Ok(connection::Connector::new(root_cert))
}

/// The Redis engine as the hub uses it: [`Redis`] with herald-core's protocols on top.
pub type RedisEngine = ClusterEngine<Redis>;

/// The Redis backplane. Create with [`connect`], hand to `Hub::start`.
pub struct Redis {
    inner: Arc<Inner>,
}

struct Inner {
    config: RedisConfig,
    keys: Keys,
    commands: Arc<Commands>,
    publish_script: Script,
    publish_batch_script: Script,
    channels: Channels,
    pubsub: Arc<PubSub>,
    /// Publishes waiting for replicas (`durability = replicated`).
    replication: Arc<Replication>,
    /// Channels a publish script fenced on a cluster, where the node sees no server's identity (each
    /// script reads its own server's): the cluster's count of rollbacks.
    fenced: AtomicU64,
    /// Single publishes waiting for the call on its way (group commit, `grouped.rs`; one Redis only).
    group: std::sync::Mutex<grouped::Group>,
}

/// The call on its way for the group (a publish, or a lot): hands the waiting ones on when it comes
/// back ([`Lead::hand_on`]), or when it is dropped first (its publisher went away and its task was
/// cancelled): the others' publishes still go.
struct Lead(Option<Arc<Inner>>);

impl Lead {
    /// `unavailable`: the call failed for want of Redis (see [`grouped::hand_on`]).
    fn hand_on(mut self, unavailable: Option<&EngineError>) {
        if let Some(inner) = self.0.take() {
            Self::next(inner, unavailable);
        }
    }

    /// Sends the next lot, if any, from a task of its own, which leads it. (The lead is made inside the
    /// task: a task dropped before it ever runs, as a runtime shutting down does, leaves no lead to
    /// drop.)
    fn next(inner: Arc<Inner>, unavailable: Option<&EngineError>) {
        if let Some(lot) = grouped::hand_on(&inner.group, unavailable) {
            tokio::spawn(async move {
                let lead = Lead(Some(inner.clone()));
                inner.send_lot(lot, lead).await
            });
        }
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        let Some(inner) = self.0.take() else { return };
        if tokio::runtime::Handle::try_current().is_ok() {
            Self::next(inner, None);
        } else {
            // No runtime to send them from: they hear it now.
            grouped::abandon(&inner.group);
        }
    }
}

/// Connects the command connection, waiting up to [`STARTUP_WAIT`] for Redis (or, with Sentinel, for a
/// primary) to be reachable.
pub async fn connect(config: RedisConfig) -> Result<RedisEngine, EngineError> {
    let target = Target::parse(&config.url).map_err(EngineError::Protocol)?;
    let commands = Arc::new(Commands::new(target, connector(&config)?, config.command_timeout));
    commands.wait_connected(tokio::time::Instant::now() + STARTUP_WAIT).await?;
    let sharded = commands.cluster().is_some();
    let keys = Keys::new(&config.prefix, &config.node_id, sharded);
    let relay = RelayConfig {
        probe_interval: config.probe_interval,
        probe_timeout: config.probe_timeout,
        node_ttl: config.node_ttl,
        request_timeout: config.command_timeout,
    };
    let policies = config.policies.clone();
    let redis = Redis {
        inner: Arc::new(Inner {
            channels: Channels::new(keys.clone(), commands.clone(), policies.clone(), config.max_read_bytes),
            pubsub: Arc::new(PubSub::new(keys.clone(), commands.clone(), policies, config.probe_interval)),
            replication: Arc::new(Replication::new(commands.clone())),
            publish_script: Script::new(&scripts::publish(sharded)),
            publish_batch_script: Script::new(&scripts::publish_batch(sharded)),
            config,
            keys,
            commands,
            fenced: AtomicU64::new(0),
            group: Default::default(),
        }),
    };
    Ok(ClusterEngine::new(redis, relay))
}

/// The lifecycle store (lifecycle webhooks) of `config`'s node, on a command connection of its own,
/// with graces of `grace`. Not on a Redis Cluster (its scripts touch a channel's keys and the one events
/// stream together).
pub async fn lifecycle(config: &RedisConfig, grace: Duration) -> Result<RedisLifecycle, EngineError> {
    let target = Target::parse(&config.url).map_err(EngineError::Protocol)?;
    let commands = Arc::new(Commands::new(target, connector(config)?, config.command_timeout));
    commands.wait_connected(tokio::time::Instant::now() + STARTUP_WAIT).await?;
    let nodes = Keys::new(&config.prefix, &config.node_id, commands.cluster().is_some()).nodes();
    RedisLifecycle::start(commands, &config.prefix, nodes, &config.node_id, grace, config.node_ttl).await
}

impl Redis {
    /// The identity of the primary the command connection talks to now.
    pub async fn primary(&self) -> Result<Identity, EngineError> {
        Ok((*self.inner.commands.get().await?.identity).clone())
    }
}

impl Inner {
    /// The command connection (made first if needed).
    async fn live(&self) -> Result<connection::Live, EngineError> {
        self.commands.get().await
    }

    /// Runs `call` on `live`'s connection (see [`Commands::on`]).
    async fn on<T>(
        &self,
        live: &connection::Live,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, EngineError> {
        self.commands.on(live, call).await
    }

    /// The `EVALSHA` of the publish script for one publication, or with `batch` of the batch script for
    /// `items` in order (see `scripts.rs` for the keys and arguments). Every key and argument is
    /// written straight into the command's one buffer: no string of its own for each.
    fn publish_call(&self, items: &[(&PublishRequest, &str)], live: &connection::Live, batch: bool) -> redis::Cmd {
        let keys_of = |request: &PublishRequest| 2 + usize::from(request.idempotency_key.is_some());
        let keys: usize = items.iter().map(|(request, _)| keys_of(request)).sum();
        let bytes: usize = items.iter().map(|(request, header)| 320 + request.data.get().len() + header.len()).sum();
        let script = if batch { &self.publish_batch_script } else { &self.publish_script };
        let mut cmd = redis::Cmd::with_capacity(4 + keys + 15 * items.len(), bytes);
        cmd.arg("EVALSHA").arg(script.get_hash()).arg(keys);
        for (request, _) in items {
            let channel = &request.channel;
            cmd.arg(self.keys.meta_name(channel)).arg(self.keys.stream_name(channel));
            if let Some(key) = &request.idempotency_key {
                cmd.arg(self.keys.dedup_name(channel, key));
            }
        }
        if batch {
            cmd.arg(items.len());
        }
        let now = now_ms();
        let published_at = format_timestamp(now);
        let dedup_window = self.config.policies.dedup_window().as_secs();
        for (request, header) in items {
            let channel = &request.channel;
            let policy = self.config.policies.history(channel);
            if batch {
                cmd.arg(keys_of(request));
            }
            cmd.arg(self.keys.pubsub_name(channel))
                .arg(channel.as_str())
                .arg(&*request.event)
                .arg(request.data.get())
                .arg(&*request.correlation_id)
                .arg(&published_at)
                .arg(now)
                .arg(policy.size)
                .arg(policy.ttl.as_millis() as u64)
                .arg(dedup_window)
                .arg(&Epoch::fresh_text()[..])
                .arg(keys::Name([header, "\n", "", "", ""]))
                .arg(&*live.identity.replid)
                .arg(history_max_bytes(&policy));
        }
        cmd
    }

    /// Runs `call` (an `EVALSHA` of `script`) on `live`'s connection, loading the script first when
    /// the server does not hold it (a restart, a failover, `SCRIPT FLUSH`).
    async fn run_script<T: redis::FromRedisValue>(
        &self,
        live: &connection::Live,
        script: &Script,
        call: &redis::Cmd,
    ) -> Result<T, EngineError> {
        let mut conn = live.conn.clone();
        let run = async {
            match call.query_async::<T>(&mut conn).await {
                Err(error) if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                    script.load_async(&mut conn).await?;
                    call.query_async(&mut conn).await
                }
                other => other,
            }
        };
        self.on(live, run).await
    }

    /// Publishes `message` to a control channel; returns how many nodes it reached. On a cluster a
    /// node's own channel is a shard channel (`SPUBLISH`); the channel for every node is a classic one,
    /// whose count only covers the server it was published on, so the live nodes are counted instead.
    async fn send_control(&self, to: Recipient<'_>, message: String) -> Result<usize, EngineError> {
        let live = self.live().await?;
        let mut conn = live.conn.clone();
        match (to, self.keys.sharded()) {
            (Recipient::Node(node), false) => self.on(&live, conn.publish(self.keys.control(node), message)).await,
            (Recipient::All, false) => self.on(&live, conn.publish(self.keys.control_all(), message)).await,
            (Recipient::Node(node), true) => self.on(&live, conn.spublish(self.keys.control(node), message)).await,
            (Recipient::All, true) => {
                self.on(&live, conn.publish::<_, _, usize>(self.keys.control_all(), message)).await?;
                Ok(self.live_nodes().await?.len())
            }
        }
    }

    /// A publish with `durability = replicated` on a cluster: the script and a `WAIT` in one pipeline on
    /// the connection to the channel's primary, since `WAIT` counts the writes of the connection it is
    /// sent on (the cluster client may make a connection anew between two calls). A primary that does
    /// not hold the script yet runs nothing and answers `NOSCRIPT`: the script is loaded and the pipeline
    /// sent again, once.
    async fn publish_replicated_on_shard(
        &self,
        live: &connection::Live,
        call: redis::Cmd,
        channel: &ChannelName,
        min_replicas: u32,
        timeout: Duration,
    ) -> Result<PublishOutcome, EngineError> {
        let connection::Conn::Cluster(mut conn) = live.conn.clone() else {
            return Err(EngineError::Protocol("not a Redis Cluster".into()));
        };
        let mut pipe = redis::pipe();
        pipe.add_command(call).cmd("WAIT").arg(min_replicas).arg(timeout.as_millis() as u64);
        let route =
            SingleNodeRoutingInfo::SpecificNode(Route::new(topology::slot_of(channel.as_str()), SlotAddr::Master));
        let mut loaded = false;
        let (reply, count) = loop {
            let sent = conn.route_pipeline(pipe.clone(), 0, 2, route.clone());
            let replies = match tokio::time::timeout(timeout + self.commands.timeout(), sent).await {
                Ok(Ok(replies)) => replies,
                Ok(Err(error)) => return Err(EngineError::Unavailable(error.to_string())),
                // The publication may have been written: the caller retries with its idempotency key.
                Err(_) => return Err(EngineError::NotDurable("waiting for replicas timed out".into())),
            };
            let mut replies = replies.into_iter();
            let (Some(reply), Some(count)) = (replies.next(), replies.next()) else {
                return Err(EngineError::Protocol("unexpected reply to a durable publish".into()));
            };
            match &reply {
                // The shard's primary does not hold the script yet (it ran nothing): load it, once.
                redis::Value::ServerError(error)
                    if error.kind() == Some(redis::ServerErrorKind::NoScript) && !loaded =>
                {
                    loaded = true;
                    self.on(live, self.publish_script.load_async(&mut conn)).await?;
                }
                redis::Value::ServerError(error) => {
                    return Err(EngineError::Unavailable(format!("the publish script failed: {error:?}")));
                }
                _ => break (reply, count),
            }
        };
        let outcome = self.outcome(parse_publish_reply(reply))?;
        match count {
            redis::Value::Int(count) if count >= i64::from(min_replicas) => Ok(outcome),
            redis::Value::Int(count) => Err(EngineError::NotDurable(format!(
                "{count} of the {min_replicas} replicas required acknowledged the publication in time"
            ))),
            other => Err(EngineError::NotDurable(format!("waiting for replicas failed: {other:?}"))),
        }
    }

    /// One call of the batch script for `items`: one outcome each, in order.
    async fn batch_call(
        &self,
        live: &connection::Live,
        items: &[&(PublishRequest, String)],
    ) -> Vec<Result<PublishOutcome, EngineError>> {
        let failed = |error: EngineError| items.iter().map(|_| Err(error.clone())).collect();
        let items: Vec<(&PublishRequest, &str)> =
            items.iter().map(|(request, header)| (request, header.as_str())).collect();
        let call = self.publish_call(&items, live, true);
        match self.run_script::<Vec<redis::Value>>(live, &self.publish_batch_script, &call).await {
            Ok(replies) if replies.len() == items.len() => {
                replies.into_iter().map(|reply| self.outcome(parse_publish_reply(reply))).collect()
            }
            Ok(_) => failed(EngineError::Protocol("unexpected batch reply: not one per publication".into())),
            Err(error) => failed(error),
        }
    }

    /// One publication: its script call (and with `durability = replicated` the wait for replicas).
    async fn publish_one(&self, request: &PublishRequest, header: &str) -> Result<PublishOutcome, EngineError> {
        let live = self.live().await?;
        let call = self.publish_call(&[(request, header)], &live, false);
        if let (Durability::Replicated { min_replicas, timeout }, true) = (self.config.durability, self.keys.sharded())
        {
            return self.publish_replicated_on_shard(&live, call, &request.channel, min_replicas, timeout).await;
        }
        let outcome = self.run_script::<redis::Value>(&live, &self.publish_script, &call).await?;
        let outcome = self.outcome(parse_publish_reply(outcome))?;
        if let (Durability::Replicated { min_replicas, timeout }, false) = (self.config.durability, outcome.duplicate) {
            self.replication.replicated(live, min_replicas, timeout).await?;
        }
        Ok(outcome)
    }

    /// Several publications on one Redis: one call of the batch script, then (with `durability =
    /// replicated`) one wait for replicas.
    async fn publish_together(
        &self,
        live: connection::Live,
        requests: &[(PublishRequest, String)],
    ) -> Vec<Result<PublishOutcome, EngineError>> {
        let all: Vec<&(PublishRequest, String)> = requests.iter().collect();
        let mut outcomes = self.batch_call(&live, &all).await;
        if let Durability::Replicated { min_replicas, timeout } = self.config.durability {
            if outcomes.iter().any(|o| matches!(o, Ok(o) if !o.duplicate)) {
                if let Err(error) = self.replication.replicated(live, min_replicas, timeout).await {
                    for outcome in &mut outcomes {
                        if matches!(outcome, Ok(o) if !o.duplicate) {
                            *outcome = Err(error.clone());
                        }
                    }
                }
            }
        }
        outcomes
    }

    /// Sends a lot of the group (`grouped.rs`) and answers each of its publishes; `lead` then hands on.
    async fn send_lot(self: Arc<Self>, lot: Vec<grouped::Waiting>, lead: Lead) {
        let (requests, answers): (Vec<_>, Vec<_>) = lot.into_iter().map(|w| (w.request, w.answer)).unzip();
        let outcomes = match requests.as_slice() {
            [(request, header)] => vec![self.publish_one(request, header).await],
            _ => match self.live().await {
                Ok(live) => self.publish_together(live, &requests).await,
                Err(error) => requests.iter().map(|_| Err(error.clone())).collect(),
            },
        };
        lead.hand_on(unavailable(&outcomes));
        for (answer, outcome) in answers.into_iter().zip(outcomes) {
            let _ = answer.send(outcome);
        }
    }

    /// A batch on a cluster: a call of the batch script per slot, all at once, the outcomes put back in
    /// the order of `requests`.
    async fn batch_by_slot(
        &self,
        live: &connection::Live,
        requests: &[(PublishRequest, String)],
    ) -> Vec<Result<PublishOutcome, EngineError>> {
        let mut by_slot: std::collections::BTreeMap<u16, Vec<usize>> = std::collections::BTreeMap::new();
        for (index, (request, _)) in requests.iter().enumerate() {
            by_slot.entry(topology::slot_of(request.channel.as_str())).or_default().push(index);
        }
        let calls = by_slot.into_values().map(|indices| async move {
            let items: Vec<&(PublishRequest, String)> = indices.iter().map(|i| &requests[*i]).collect();
            (indices.clone(), self.batch_call(live, &items).await)
        });
        let mut outcomes: Vec<Option<Result<PublishOutcome, EngineError>>> = requests.iter().map(|_| None).collect();
        for (indices, results) in futures_util::future::join_all(calls).await {
            for (index, result) in indices.into_iter().zip(results) {
                outcomes[index] = Some(result);
            }
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Err(EngineError::Protocol("a batch item got no outcome".into()))))
            .collect()
    }

    /// A publish reply's outcome, counting a fence.
    fn outcome(&self, parsed: Result<(PublishOutcome, bool), EngineError>) -> Result<PublishOutcome, EngineError> {
        let (outcome, fenced) = parsed?;
        if fenced {
            self.fenced.fetch_add(1, Ordering::Relaxed);
        }
        Ok(outcome)
    }

    async fn live_nodes(&self) -> Result<Vec<String>, EngineError> {
        let live = self.live().await?;
        let mut conn = live.conn.clone();
        let since = now_ms().saturating_sub(self.config.node_ttl.as_millis() as u64);
        self.on(&live, conn.zrangebyscore(self.keys.nodes(), since, "+inf")).await
    }

    async fn heartbeat(&self, stats: &NodeStats) -> Result<(), EngineError> {
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
        self.inner.pubsub.start(relay)
    }

    /// At once when no publish is on its way to Redis; otherwise in the next lot (`grouped.rs`). Always
    /// at once on a Redis Cluster (a lot would need one call per slot) and with `durability =
    /// replicated` (a call would hold the next lot back for its wait for replicas, and concurrent
    /// publishes share their waits already: `durable.rs`).
    async fn publish(&self, request: &PublishRequest, header: &str) -> Result<PublishOutcome, EngineError> {
        let inner = &self.inner;
        if inner.keys.sharded() || inner.config.durability != Durability::None {
            return inner.publish_one(request, header).await;
        }
        match grouped::enter(&inner.group, request, header) {
            grouped::Turn::Wait(outcome) => outcome.await.unwrap_or_else(|_| Err(grouped::dropped())),
            grouped::Turn::Lead => {
                let lead = Lead(Some(inner.clone()));
                let outcome = inner.publish_one(request, header).await;
                lead.hand_on(unavailable(std::slice::from_ref(&outcome)));
                outcome
            }
        }
    }

    /// One call of the batch script for the lot, then (with `durability = replicated`) one `WAIT`. On a
    /// cluster, one call per slot among the lot (a script's keys must share one), all at once; a
    /// channel's publications share its slot, so they keep their order.
    async fn publish_batch(
        &self,
        requests: &[(PublishRequest, String)],
    ) -> Option<Vec<Result<PublishOutcome, EngineError>>> {
        let inner = &self.inner;
        let failed = |error: EngineError| Some(requests.iter().map(|_| Err(error.clone())).collect());
        let live = match inner.live().await {
            Ok(live) => live,
            Err(error) => return failed(error),
        };
        if inner.keys.sharded() {
            if inner.config.durability != Durability::None {
                // One by one (channels at once, each channel in order), each with its own WAIT on its
                // shard's connection.
                return None;
            }
            return Some(inner.batch_by_slot(&live, requests).await);
        }
        Some(inner.publish_together(live, requests).await)
    }

    fn subscribe(&self, channel: &ChannelName) -> SubscribeFuture {
        self.inner.pubsub.subscribe(channel)
    }

    fn unsubscribe(&self, channel: &ChannelName) {
        self.inner.pubsub.unsubscribe(channel);
    }

    async fn history(
        &self,
        channel: &ChannelName,
        since: Option<&Position>,
        limit: usize,
    ) -> Result<History, EngineError> {
        self.inner.channels.history(channel, since, limit).await
    }

    async fn top(&self, channel: &ChannelName) -> Result<Position, EngineError> {
        Ok(self.inner.channels.top_state(channel).await?.top)
    }

    async fn fence(&self, channel: &ChannelName, epoch: &Epoch, seen: u64, now: u64) {
        self.inner.channels.fence_backwards(channel, epoch, seen, now).await;
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
        self.inner.send_control(to, message).await
    }

    /// On a cluster the probe goes through every shard (one shard channel on a slot of each primary)
    /// and counts as back once every copy came back, so a silent subscription on any shard is noticed.
    async fn probe(&self, message: String) -> Result<(), EngineError> {
        let inner = &self.inner;
        if !inner.keys.sharded() {
            return inner.send_control(Recipient::Node(&inner.config.node_id), message).await.map(|_| ());
        }
        let live = inner.live().await?;
        let channels: Vec<String> = match topology::primary_slots(&inner.commands, &live).await {
            Ok(slots) => slots.into_iter().map(|slot| inner.keys.probe(&topology::tag_for_slot(slot))).collect(),
            // The layout could not be read this time: the last round's shards still tell whether every
            // subscription answers.
            Err(error) => {
                let known = inner.pubsub.probe_channels();
                if known.is_empty() {
                    return Err(error);
                }
                known
            }
        };
        inner.pubsub.probe_through(&channels).await?;
        inner.pubsub.expect_probe(message.as_bytes(), channels.len());
        for channel in channels {
            let mut conn = live.conn.clone();
            inner.on(&live, conn.spublish::<_, _, usize>(channel, &message)).await?;
        }
        Ok(())
    }

    fn connected(&self) -> bool {
        self.inner.pubsub.is_connected() && self.inner.commands.is_connected()
    }

    fn reconnect(&self) {
        self.inner.pubsub.stale();
    }

    async fn wait_connected(&self, until: tokio::time::Instant) {
        let _ = self.inner.commands.wait_connected(until).await;
    }

    async fn stop(&self) {
        let inner = &self.inner;
        inner.pubsub.stop();
        let Ok(live) = inner.live().await else { return };
        let mut conn = live.conn.clone();
        let _ = inner.on(&live, conn.zrem::<_, _, ()>(inner.keys.nodes(), &inner.config.node_id)).await;
        let _ = inner.on(&live, conn.del::<_, ()>(inner.keys.node_stats(&inner.config.node_id))).await;
    }

    fn stats(&self) -> BackplaneStats {
        let i = &self.inner;
        BackplaneStats {
            reconnects: i.pubsub.reconnects(),
            rollbacks: if i.keys.sharded() {
                i.fenced.load(Ordering::Relaxed)
            } else {
                i.commands.identity_changes.load(Ordering::Relaxed)
            },
        }
    }
}

/// The error when every one of `outcomes` failed for want of Redis (a call that could not be made or
/// timed out), so that publishes waiting behind it fail too (`grouped.rs`).
fn unavailable(outcomes: &[Result<PublishOutcome, EngineError>]) -> Option<&EngineError> {
    let mut errors = outcomes.iter().map(|outcome| match outcome {
        Err(error @ EngineError::Unavailable(_)) => Some(error),
        _ => None,
    });
    let first = errors.next().flatten()?;
    errors.all(|error| error.is_some()).then_some(first)
}

/// The bytes of envelopes a channel's history keeps (the script keeps the newest entry in any case).
fn history_max_bytes(policy: &herald_core::HistoryPolicy) -> u64 {
    policy.max_bytes as u64
}

/// The outcome, and whether the script fenced the channel first (the replies: `scripts.rs`).
fn parse_publish_reply(reply: redis::Value) -> Result<(PublishOutcome, bool), EngineError> {
    let protocol = |what: &str| EngineError::Protocol(format!("unexpected publish reply: {what}"));
    let text = |value: &redis::Value| -> Option<String> {
        match value {
            redis::Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
            redis::Value::SimpleString(text) => Some(text.clone()),
            redis::Value::Int(number) => Some(number.to_string()),
            _ => None,
        }
    };
    let reply = match reply {
        redis::Value::BulkString(bytes) => bytes,
        // A publication of a batch that failed inside the script (the others ran).
        redis::Value::Array(items) => match items.as_slice() {
            [redis::Value::Int(-1), error] => {
                return Err(EngineError::Unavailable(
                    text(error).unwrap_or_else(|| "the publish script failed".into()),
                ));
            }
            _ => return Err(protocol("shape")),
        },
        _ => return Err(protocol("not a string")),
    };
    let reply = std::str::from_utf8(&reply).map_err(|_| protocol("not UTF-8"))?;
    let position = |epoch: &str, offset: &str| -> Result<Position, EngineError> {
        let epoch = Epoch::parse(epoch).map_err(|e| EngineError::Protocol(e.to_string()))?;
        Ok(Position::new(epoch, offset.parse().map_err(|_| protocol("offset"))?))
    };
    if let Some(seen) = reply.strip_prefix("d:") {
        let mut parts = seen.splitn(3, ':');
        let (Some(epoch), Some(offset), Some(correlation)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(protocol("duplicate record"));
        };
        let outcome = PublishOutcome {
            position: position(epoch, offset)?,
            correlation_id: Arc::from(correlation),
            duplicate: true,
            receivers: None,
        };
        return Ok((outcome, false));
    }
    let mut parts = reply.strip_prefix("p:").ok_or_else(|| protocol("kind"))?.split(':');
    let (Some(epoch), Some(offset), Some(receivers), Some(fenced), None) =
        (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(protocol("fields"));
    };
    let outcome = PublishOutcome {
        position: position(epoch, offset)?,
        // The caller's correlation ID; filled in by the caller.
        correlation_id: Arc::from(""),
        duplicate: false,
        receivers: Some(receivers.parse().map_err(|_| protocol("receivers"))?),
    };
    Ok((outcome, fenced == "1"))
}
