//! The hub: this node's registry of connections and channel memberships, and the fan-out from the
//! engine to connection queues.
//!
//! Rules every edit must keep:
//! - A publisher never waits on a subscriber: fan-out only `try_send`s into bounded queues; a full
//!   queue closes that connection (`slow_consumer`), and the client resumes from its cursor.
//! - A channel with no local subscriber has no entry here, and a closed connection leaves nothing
//!   behind (the [`Session`] removes itself on drop, synchronously).
//! - No lock is held across `.await`; locks are std mutexes taken inside sync methods.
//! - Lifecycle transitions (first and last member of a channel, of a user in it) are sent under the
//!   channel's shard lock, so in the order membership changed, into an unbounded queue: never a wait.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::channel::ChannelName;
use crate::engine::ReceiptRequest;
use crate::engine::{
    Engine, EngineError, EngineSink, History, NodeInfo, PresenceEntry, PublishOutcome, PublishRequest, SubscribeFuture,
};
use crate::lifecycle::{LifecycleSink, Transition};
use crate::outbound::Control;
pub use crate::outbound::{CloseHook, CloseReason, Outbound};
use crate::position::Position;
use crate::publication::Publication;
use crate::receipt::Receipt;
use crate::stats::StatsSnapshot;
pub use crate::stats::{LATENCY_BUCKETS_US, LatencyHistogram, Stats};
use crate::sync::lock;

/// Outbound queue slots per connection unless configured.
pub const DEFAULT_QUEUE_CAPACITY: usize = 1024;
/// Channels one connection may hold unless configured.
pub const DEFAULT_MAX_CHANNELS_PER_CONNECTION: usize = 128;
/// Connections one user may hold on one node unless configured.
pub const DEFAULT_MAX_CONNECTIONS_PER_USER: usize = 100;
/// Connections one node accepts unless configured.
pub const DEFAULT_MAX_CONNECTIONS: usize = 100_000;
const SHARDS: usize = 64;

/// Hub settings.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Publications a connection may have waiting before it counts as too slow and is closed.
    pub queue_capacity: usize,
    pub max_channels_per_connection: usize,
    pub max_connections: usize,
    /// Connections one authenticated user may hold on this node.
    pub max_connections_per_user: usize,
    /// Most publications replayed for one channel on resume (the history size bounds it anyway).
    pub max_replay: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            max_channels_per_connection: DEFAULT_MAX_CHANNELS_PER_CONNECTION,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_user: DEFAULT_MAX_CONNECTIONS_PER_USER,
            max_replay: 10_000,
        }
    }
}

/// Errors of hub operations, classified for callers.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HubError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("this node already holds {0} connections")]
    TooManyConnections(usize),
    #[error("this user already holds {0} connections on this node")]
    TooManyConnectionsForUser(usize),
    #[error("a connection may hold at most {0} channels")]
    TooManyChannels(usize),
    #[error("already subscribed to {0}")]
    AlreadySubscribed(ChannelName),
    #[error("not subscribed to {0}")]
    NotSubscribed(ChannelName),
}

/// Channel -> its local members, one map per shard.
type ChannelMap = HashMap<ChannelName, ChannelEntry>;

/// One channel's local members.
#[derive(Default)]
pub(crate) struct ChannelEntry {
    /// Connection ID -> member.
    members: HashMap<u64, Member>,
    /// Members per user, kept only while lifecycle transitions are wanted for the channel.
    users: HashMap<String, usize>,
}

pub(crate) struct Member {
    tx: mpsc::Sender<Outbound>,
    control: Arc<Control>,
    /// The member's user, when its channel's lifecycle is tracked (see [`ChannelEntry::users`]).
    user: Option<String>,
}

pub(crate) struct ConnectionRecord {
    user: Option<String>,
    control: Arc<Control>,
}

/// Removes a tracked receipt when dropped.
struct Untrack<'a> {
    shared: &'a HubShared,
    id: u64,
}

impl Drop for Untrack<'_> {
    fn drop(&mut self) {
        self.shared.untrack_receipt(self.id);
    }
}

/// Which connections had an awaited publication written, across the cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryReport {
    pub connections: usize,
    /// Nodes with at least one such connection, sorted.
    pub nodes: Vec<String>,
    /// Some node (or this node's own connections) did not answer within the timeout.
    pub timed_out: bool,
}

/// This node's hub. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    pub(crate) shared: Arc<HubShared>,
}

pub(crate) struct HubShared {
    pub(crate) engine: Arc<dyn Engine>,
    pub(crate) config: HubConfig,
    pub(crate) stats: Stats,
    hasher: RandomState,
    shards: Box<[Mutex<ChannelMap>]>,
    connections: Mutex<HashMap<u64, ConnectionRecord>>,
    /// Open connections per authenticated user (lock order: `connections`, then this).
    per_user: Mutex<HashMap<String, usize>>,
    receipts: Mutex<HashMap<u64, Arc<Receipt>>>,
    next_receipt: AtomicU64,
    deliver_hook: std::sync::OnceLock<DeliverHook>,
    /// Where channel and user transitions go (lifecycle webhooks); none: not tracked.
    lifecycle: std::sync::OnceLock<LifecycleSink>,
}

/// Called after a publication that carries a trace context was handed to this node's connections,
/// with how many received it (the server records a `deliver` span with it).
pub type DeliverHook = Box<dyn Fn(&Publication, usize) + Send + Sync>;

impl Hub {
    /// Builds the hub around `engine` and starts the engine with this hub as its sink.
    pub async fn start(engine: Arc<dyn Engine>, config: HubConfig) -> Result<Self, EngineError> {
        let shared = Arc::new(HubShared {
            engine: engine.clone(),
            config,
            stats: Stats::default(),
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            connections: Mutex::new(HashMap::new()),
            per_user: Mutex::new(HashMap::new()),
            receipts: Mutex::new(HashMap::new()),
            next_receipt: AtomicU64::new(1),
            deliver_hook: std::sync::OnceLock::new(),
            lifecycle: std::sync::OnceLock::new(),
        });
        let sink: Arc<dyn EngineSink> = shared.clone();
        let weak: Weak<dyn EngineSink> = Arc::downgrade(&sink);
        engine.start(weak).await?;
        Ok(Self { shared })
    }

    pub fn node_id(&self) -> &str {
        self.shared.engine.node_id()
    }

    /// Installs the hook called for traced publications after fan-out (only the first one is kept).
    pub fn set_deliver_hook(&self, hook: DeliverHook) {
        let _ = self.shared.deliver_hook.set(hook);
    }

    /// Sends this node's channel and user transitions to `sink` from now on (only the first sink is
    /// kept; install it before the first connection, so that every leave has its join).
    pub fn set_lifecycle(&self, sink: LifecycleSink) {
        let _ = self.shared.lifecycle.set(sink);
    }

    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.shared.engine
    }

    pub fn config(&self) -> &HubConfig {
        &self.shared.config
    }

    /// Publishes through the engine.
    pub async fn publish(&self, request: PublishRequest) -> Result<PublishOutcome, EngineError> {
        let outcome = self.shared.engine.publish(request).await?;
        self.count_publish(&outcome);
        Ok(outcome)
    }

    /// Publishes several (see [`Engine::publish_batch`]): one outcome per request, in order.
    pub async fn publish_batch(&self, requests: Vec<PublishRequest>) -> Vec<Result<PublishOutcome, EngineError>> {
        let outcomes = self.shared.engine.publish_batch(requests).await;
        for outcome in outcomes.iter().flatten() {
            self.count_publish(outcome);
        }
        outcomes
    }

    /// Publishes and waits up to `timeout` for the connections that receive it, on every node, to have
    /// it written.
    pub async fn publish_awaiting_delivery(
        &self,
        mut request: PublishRequest,
        timeout: Duration,
    ) -> Result<(PublishOutcome, DeliveryReport), EngineError> {
        let (id, receipt) = self.shared.track_receipt();
        // Forgotten on every path, including a caller that gives up (its request future is dropped).
        let _untrack = Untrack { shared: &self.shared, id };
        request.receipt = Some(ReceiptRequest { id, timeout });
        let result = self.shared.engine.publish(request).await;
        let report = match &result {
            Ok(outcome) if outcome.duplicate => DeliveryReport::default(),
            Ok(outcome) => match outcome.receivers {
                None => {
                    let summary = receipt.wait(timeout).await;
                    let nodes = if summary.written > 0 { vec![self.node_id().to_owned()] } else { Vec::new() };
                    DeliveryReport { connections: summary.written, nodes, timed_out: summary.timed_out }
                }
                Some(expected) => {
                    let receipts = self.shared.engine.collect_receipts(id, expected, timeout).await.unwrap_or_default();
                    let timed_out = receipts.len() < expected || receipts.iter().any(|r| r.timed_out);
                    let mut nodes: Vec<String> =
                        receipts.iter().filter(|r| r.written > 0).map(|r| r.node.clone()).collect();
                    nodes.sort();
                    let connections = receipts.iter().map(|r| r.written).sum();
                    DeliveryReport { connections, nodes, timed_out }
                }
            },
            Err(_) => DeliveryReport::default(),
        };
        let outcome = result?;
        self.count_publish(&outcome);
        Ok((outcome, report))
    }

    fn count_publish(&self, outcome: &PublishOutcome) {
        let counter = if outcome.duplicate { &self.shared.stats.duplicates } else { &self.shared.stats.published };
        counter.fetch_add(1, Ordering::Relaxed);
        // A distributed engine knows how many nodes got it; none means nobody in the cluster listened.
        // (Without that count, the fan-out counts publications that found no local subscriber.)
        if !outcome.duplicate && outcome.receivers == Some(0) {
            self.shared.stats.no_subscriber.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub async fn history(
        &self,
        channel: &ChannelName,
        since: Option<&Position>,
        limit: usize,
    ) -> Result<History, EngineError> {
        self.shared.engine.history(channel, since, limit).await
    }

    pub async fn presence(&self, channel: &ChannelName) -> Result<Vec<PresenceEntry>, EngineError> {
        self.shared.engine.presence(channel).await
    }

    /// Closes the user's connections in the whole cluster.
    pub async fn disconnect_user(&self, user: &str) -> Result<usize, EngineError> {
        self.shared.engine.disconnect_user(user).await
    }

    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, EngineError> {
        self.shared.engine.nodes().await
    }

    pub async fn ready(&self) -> bool {
        self.shared.engine.ready().await
    }

    /// Closes every local connection (shutdown).
    pub fn close_all(&self, reason: CloseReason) -> usize {
        lock(&self.shared.connections).values().filter(|c| c.control.close(reason)).count()
    }

    /// Closes every local connection, spread evenly over `window` in random order, so that clients
    /// reconnecting elsewhere arrive as a steady trickle instead of a storm. Returns how many it closed.
    pub async fn close_gradually(&self, reason: CloseReason, window: Duration) -> usize {
        use rand::seq::SliceRandom;
        let mut controls: Vec<Arc<Control>> =
            lock(&self.shared.connections).values().map(|c| c.control.clone()).collect();
        controls.shuffle(&mut rand::rng());
        const STEP: Duration = Duration::from_millis(50);
        let steps = (window.as_millis() / STEP.as_millis()).max(1) as usize;
        let per_step = controls.len().div_ceil(steps).max(1);
        let mut closed = 0;
        let mut interval = tokio::time::interval(STEP);
        for slice in controls.chunks(per_step) {
            interval.tick().await;
            closed += slice.iter().filter(|c| c.close(reason)).count();
        }
        // Connections opened while this ran (none should: the caller refuses new ones) go now.
        closed + self.close_all(reason)
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.shared.snapshot()
    }

    /// The publish-to-socket-write latency histogram: per-bucket counts and the sum in microseconds.
    pub fn latency(&self) -> ([u64; 15], u64) {
        self.shared.stats.latency.snapshot()
    }

    /// Channels with at least one local subscriber.
    pub fn channel_count(&self) -> usize {
        self.shared.shards.iter().map(|s| lock(s).len()).sum()
    }

    pub fn connection_count(&self) -> usize {
        lock(&self.shared.connections).len()
    }
}

impl HubShared {
    fn shard(&self, channel: &ChannelName) -> &Mutex<ChannelMap> {
        &self.shards[(self.hasher.hash_one(channel) as usize) % SHARDS]
    }

    /// Adds a member and returns the engine's subscription, live once the future resolves. The engine
    /// is asked under the shard lock, so subscribe and unsubscribe requests reach it in the order the
    /// channel's membership changed (no lost subscription when the last leaves as the next joins).
    /// The lifecycle transitions (occupied, joined) are queued under the same lock, in order.
    pub(crate) fn join(
        &self,
        channel: &ChannelName,
        id: u64,
        user: Option<&str>,
        tx: mpsc::Sender<Outbound>,
        control: Arc<Control>,
    ) -> SubscribeFuture {
        let mut shard = lock(self.shard(channel));
        let lifecycle = self.lifecycle.get().filter(|sink| sink.wants(channel));
        let first = !shard.contains_key(channel);
        let entry = shard.entry(channel.clone()).or_default();
        let user = lifecycle.and(user).map(str::to_owned);
        if let Some(sink) = lifecycle {
            if first {
                sink.send(Transition::Occupied(channel.clone()));
            }
            if let Some(user) = &user {
                let count = entry.users.entry(user.clone()).or_default();
                *count += 1;
                if *count == 1 {
                    sink.send(Transition::Joined(channel.clone(), user.clone()));
                }
            }
        }
        entry.members.insert(id, Member { tx, control, user });
        self.engine.subscribe(channel)
    }

    /// Removes a member; the last one out releases the engine's subscription (under the same lock),
    /// and the lifecycle transitions (left, vacated) are queued under it too.
    pub(crate) fn leave(&self, channel: &ChannelName, id: u64) {
        let mut shard = lock(self.shard(channel));
        let Some(entry) = shard.get_mut(channel) else { return };
        let Some(member) = entry.members.remove(&id) else { return };
        let lifecycle = self.lifecycle.get().filter(|sink| sink.wants(channel));
        if let Some(user) = member.user {
            if let Some(count) = entry.users.get_mut(&user) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    entry.users.remove(&user);
                    if let Some(sink) = lifecycle {
                        sink.send(Transition::Left(channel.clone(), user));
                    }
                }
            }
        }
        if entry.members.is_empty() {
            shard.remove(channel);
            self.engine.unsubscribe(channel);
            if let Some(sink) = lifecycle {
                sink.send(Transition::Vacated(channel.clone()));
            }
        }
    }

    /// Counts a new connection against the node's and the user's limits and registers it: its ID and
    /// close signal. [`Hub::open_session`] (in `session.rs`) wraps them in a `Session`.
    pub(crate) fn register(&self, user: Option<&str>) -> Result<(u64, Arc<Control>), HubError> {
        let max = self.config.max_connections;
        let max_per_user = self.config.max_connections_per_user;
        let control = Arc::new(Control::default());
        let id = {
            let mut connections = lock(&self.connections);
            if connections.len() >= max {
                return Err(HubError::TooManyConnections(max));
            }
            if let Some(user) = user {
                let mut per_user = lock(&self.per_user);
                let count = per_user.entry(user.to_owned()).or_default();
                if *count >= max_per_user {
                    return Err(HubError::TooManyConnectionsForUser(max_per_user));
                }
                *count += 1;
            }
            let mut id = rand::random::<u64>();
            while id == 0 || connections.contains_key(&id) {
                id = rand::random::<u64>();
            }
            connections.insert(id, ConnectionRecord { user: user.map(str::to_owned), control: control.clone() });
            id
        };
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        self.stats.connections_opened.fetch_add(1, Ordering::Relaxed);
        Ok((id, control))
    }

    pub(crate) fn forget_connection(&self, id: u64) {
        let record = lock(&self.connections).remove(&id);
        if let Some(user) = record.and_then(|r| r.user) {
            let mut per_user = lock(&self.per_user);
            if let Some(count) = per_user.get_mut(&user) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    per_user.remove(&user);
                }
            }
        }
        self.stats.connections.fetch_sub(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> StatsSnapshot {
        self.stats.snapshot(self.shards.iter().map(|s| lock(s).len() as u64).sum())
    }
}

impl EngineSink for HubShared {
    fn deliver(&self, publication: Arc<Publication>) {
        let receipt = publication.receipt.and_then(|id| lock(&self.receipts).get(&id).cloned());
        let shard = lock(self.shard(&publication.channel));
        let Some(members) = shard.get(&publication.channel).map(|entry| &entry.members) else {
            drop(shard);
            self.stats.no_subscriber.fetch_add(1, Ordering::Relaxed);
            if let Some(receipt) = receipt {
                receipt.fanned_out(0);
            }
            if let (Some(_), Some(hook)) = (&publication.trace_parent, self.deliver_hook.get()) {
                hook(&publication, 0);
            }
            return;
        };
        // Every token handed out is either written or dropped (counted as abandoned), so the receipt
        // expects one answer per member, including members whose queue refused the item.
        let recipients = members.len();
        for member in members.values() {
            let item = Outbound::Publication {
                publication: publication.clone(),
                receipt: receipt.as_ref().map(|r| r.token()),
            };
            match member.tx.try_send(item) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    if member.control.close(CloseReason::SlowConsumer) {
                        self.stats.slow_consumer_disconnects.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        drop(shard);
        if let Some(receipt) = receipt {
            receipt.fanned_out(recipients);
        }
        if let (Some(_), Some(hook)) = (&publication.trace_parent, self.deliver_hook.get()) {
            hook(&publication, recipients);
        }
    }

    fn track_receipt(&self) -> (u64, Arc<Receipt>) {
        let id = self.next_receipt.fetch_add(1, Ordering::Relaxed);
        let receipt = Arc::new(Receipt::default());
        lock(&self.receipts).insert(id, receipt.clone());
        (id, receipt)
    }

    fn untrack_receipt(&self, id: u64) {
        lock(&self.receipts).remove(&id);
    }

    fn resync(&self, channel: &ChannelName, top: &Position) {
        let shard = lock(self.shard(channel));
        let Some(members) = shard.get(channel).map(|entry| &entry.members) else { return };
        for member in members.values() {
            let item = Outbound::Resync(Box::new((channel.clone(), top.clone())));
            if let Err(mpsc::error::TrySendError::Full(_)) = member.tx.try_send(item) {
                if member.control.close(CloseReason::SlowConsumer) {
                    self.stats.slow_consumer_disconnects.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn has_members(&self, channel: &ChannelName) -> bool {
        lock(self.shard(channel)).contains_key(channel)
    }

    fn disconnect_user(&self, user: &str) -> usize {
        lock(&self.connections)
            .values()
            .filter(|c| c.user.as_deref() == Some(user))
            .filter(|c| c.control.close(CloseReason::Disconnected))
            .count()
    }

    fn stats(&self) -> StatsSnapshot {
        self.snapshot()
    }
}
