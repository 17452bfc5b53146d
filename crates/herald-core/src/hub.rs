//! The hub: this node's registry of connections and channel memberships, and the fan-out from the
//! engine to connection queues.
//!
//! Rules every edit must keep:
//! - A publisher never waits on a subscriber: fan-out only `try_send`s into bounded queues; a full
//!   queue closes that connection (`slow_consumer`), and the client resumes from its cursor.
//! - A channel with no local subscriber has no entry here, and a closed connection leaves nothing
//!   behind (the [`Session`] removes itself on drop, synchronously).
//! - No lock is held across `.await`; locks are std mutexes taken inside sync methods.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::sync::mpsc;

use crate::channel::ChannelName;
use crate::engine::ReceiptRequest;
use crate::engine::{
    Engine, EngineError, EngineSink, History, NodeInfo, PresenceEntry, PublishOutcome, PublishRequest, SubscribeFuture,
};
use crate::position::Position;
use crate::publication::Publication;
use crate::receipt::{Receipt, ReceiptToken};
use crate::session::{Session, Transport};
use crate::stats::{DeliveryHealth, StatsSnapshot};

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

/// Why the hub closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Its outbound queue was full: it could not keep up.
    SlowConsumer,
    /// `/v1/disconnect` asked for it.
    Disconnected,
    /// The node is shutting down.
    ShuttingDown,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SlowConsumer => "slow_consumer",
            Self::Disconnected => "disconnected",
            Self::ShuttingDown => "shutting_down",
        }
    }

    fn code(self) -> usize {
        self as usize + 1
    }

    fn from_code(code: usize) -> Option<Self> {
        [Self::SlowConsumer, Self::Disconnected, Self::ShuttingDown].get(code.checked_sub(1)?).copied()
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

/// One queued item for a connection.
#[derive(Debug)]
pub enum Outbound {
    /// A publication to deliver, with this connection's share of a delivery receipt if one is awaited.
    Publication { publication: Arc<Publication>, receipt: Option<ReceiptToken> },
    /// The engine may have missed publications of `channel` up to `top` (it reconnected or history was
    /// lost): the session checks its position against `top` and replays or resets.
    /// Boxed: resyncs are rare, and a small item keeps every queue slot small on the hot path.
    Resync(Box<(ChannelName, Position)>),
}

/// Called once when the hub closes a connection, so the transport can abort a write that is blocked
/// on a client that stopped reading (the connection's task cannot see the close signal while it waits).
pub type CloseHook = Box<dyn Fn(CloseReason) + Send + Sync>;

/// The close signal of one connection; set once, by whoever closes it first.
///
/// The connection's task waits on it through an `AtomicWaker` (registered in the same poll as the
/// queue), which costs far less per wake-up than a `Notify` waiter list.
#[derive(Default)]
pub(crate) struct Control {
    reason: AtomicUsize,
    waker: AtomicWaker,
    hook: std::sync::OnceLock<CloseHook>,
}

impl Control {
    pub(crate) fn close(&self, reason: CloseReason) -> bool {
        let first = self.reason.compare_exchange(0, reason.code(), Ordering::SeqCst, Ordering::SeqCst).is_ok();
        if first {
            self.waker.wake();
            if let Some(hook) = self.hook.get() {
                hook(reason);
            }
        }
        first
    }

    pub(crate) fn set_hook(&self, hook: CloseHook) {
        let _ = self.hook.set(hook);
    }

    pub(crate) fn reason(&self) -> Option<CloseReason> {
        CloseReason::from_code(self.reason.load(Ordering::SeqCst))
    }

    /// Ready with the reason once closed; otherwise registers the task to be woken by `close`.
    pub(crate) fn poll_closed(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<CloseReason> {
        if let Some(reason) = self.reason() {
            return std::task::Poll::Ready(reason);
        }
        self.waker.register(cx.waker());
        match self.reason() {
            Some(reason) => std::task::Poll::Ready(reason),
            None => std::task::Poll::Pending,
        }
    }
}

/// Channel -> (connection ID -> member), one map per shard.
type ChannelMap = HashMap<ChannelName, HashMap<u64, Member>>;

pub(crate) struct Member {
    tx: mpsc::Sender<Outbound>,
    control: Arc<Control>,
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

/// Counters of this node, exported as metrics and in `/v1/cluster`.
#[derive(Debug, Default)]
pub struct Stats {
    pub published: AtomicU64,
    pub duplicates: AtomicU64,
    pub no_subscriber: AtomicU64,
    pub delivered_sse: AtomicU64,
    pub delivered_ws: AtomicU64,
    pub recovered: AtomicU64,
    pub duplicates_dropped: AtomicU64,
    pub resets_history_gone: AtomicU64,
    pub resets_gap: AtomicU64,
    pub resets_epoch_changed: AtomicU64,
    pub resets_engine_rollback: AtomicU64,
    pub gaps_detected: AtomicU64,
    pub slow_consumer_disconnects: AtomicU64,
    pub connections_opened: AtomicU64,
    pub connections: AtomicU64,
    /// Publish-to-socket-write latency of live deliveries.
    pub latency: LatencyHistogram,
}

/// Upper bounds of the latency histogram's buckets, in microseconds (the last bucket is unbounded).
pub const LATENCY_BUCKETS_US: [u64; 14] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000,
    10_000_000,
];

/// A fixed-bucket histogram of atomics: recording is one bucket search and two atomic adds, cheap
/// enough for every delivery; quantiles are estimated by interpolating inside a bucket.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// One counter per bucket of [`LATENCY_BUCKETS_US`], plus one for larger values.
    buckets: [AtomicU64; 15],
    sum_us: AtomicU64,
}

impl LatencyHistogram {
    /// Records `count` values of `micros` at once (a connection's batch, timed by its oldest event):
    /// the hot path touches the shared counters once per batch, not once per delivery.
    pub fn record_many(&self, micros: u64, count: u64) {
        if count == 0 {
            return;
        }
        let index = LATENCY_BUCKETS_US.iter().position(|bound| micros <= *bound).unwrap_or(LATENCY_BUCKETS_US.len());
        self.buckets[index].fetch_add(count, Ordering::Relaxed);
        self.sum_us.fetch_add(micros.saturating_mul(count), Ordering::Relaxed);
    }

    /// Per-bucket counts (not cumulative) and the sum of all values in microseconds.
    pub fn snapshot(&self) -> ([u64; 15], u64) {
        let mut counts = [0u64; 15];
        for (count, bucket) in counts.iter_mut().zip(&self.buckets) {
            *count = bucket.load(Ordering::Relaxed);
        }
        (counts, self.sum_us.load(Ordering::Relaxed))
    }

    /// Estimated `q` quantile in microseconds (0 when empty).
    pub fn quantile_us(&self, q: f64) -> f64 {
        let (counts, _) = self.snapshot();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut seen = 0u64;
        for (index, count) in counts.iter().enumerate() {
            if *count > 0 && (seen + count) as f64 >= rank {
                let low = if index == 0 { 0 } else { LATENCY_BUCKETS_US[index - 1] } as f64;
                let high = LATENCY_BUCKETS_US.get(index).copied().unwrap_or(LATENCY_BUCKETS_US[13] * 2) as f64;
                let within = (rank - seen as f64) / *count as f64;
                return low + (high - low) * within.clamp(0.0, 1.0);
            }
            seen += count;
        }
        0.0
    }
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
}

/// Called after a publication that carries a trace context was handed to this node's connections,
/// with how many received it (the server records a `deliver` span with it).
pub type DeliverHook = Box<dyn Fn(&Publication, usize) + Send + Sync>;

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves its map consistent at each step; a poisoned lock is still usable.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

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

    /// Opens a session (one client connection) on this node.
    pub fn open_session(&self, transport: Transport, user: Option<String>) -> Result<Session, HubError> {
        let max = self.shared.config.max_connections;
        let max_per_user = self.shared.config.max_connections_per_user;
        let (tx, rx) = mpsc::channel(self.shared.config.queue_capacity.max(1));
        let control = Arc::new(Control::default());
        let id = {
            let mut connections = lock(&self.shared.connections);
            if connections.len() >= max {
                return Err(HubError::TooManyConnections(max));
            }
            if let Some(user) = &user {
                let mut per_user = lock(&self.shared.per_user);
                let count = per_user.entry(user.clone()).or_default();
                if *count >= max_per_user {
                    return Err(HubError::TooManyConnectionsForUser(max_per_user));
                }
                *count += 1;
            }
            let mut id = rand::random::<u64>();
            while id == 0 || connections.contains_key(&id) {
                id = rand::random::<u64>();
            }
            connections.insert(id, ConnectionRecord { user: user.clone(), control: control.clone() });
            id
        };
        self.shared.stats.connections.fetch_add(1, Ordering::Relaxed);
        self.shared.stats.connections_opened.fetch_add(1, Ordering::Relaxed);
        Ok(Session::new(self.shared.clone(), id, transport, user, tx, rx, control))
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
    pub(crate) fn join(
        &self,
        channel: &ChannelName,
        id: u64,
        tx: mpsc::Sender<Outbound>,
        control: Arc<Control>,
    ) -> SubscribeFuture {
        let mut shard = lock(self.shard(channel));
        let members = shard.entry(channel.clone()).or_default();
        members.insert(id, Member { tx, control });
        self.engine.subscribe(channel)
    }

    /// Removes a member; the last one out releases the engine's subscription (under the same lock).
    pub(crate) fn leave(&self, channel: &ChannelName, id: u64) {
        let mut shard = lock(self.shard(channel));
        let Some(members) = shard.get_mut(channel) else { return };
        members.remove(&id);
        if members.is_empty() {
            shard.remove(channel);
            self.engine.unsubscribe(channel);
        }
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
        let s = &self.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            connections: get(&s.connections),
            channels: self.shards.iter().map(|s| lock(s).len() as u64).sum(),
            connections_opened: get(&s.connections_opened),
            published: get(&s.published),
            duplicates: get(&s.duplicates),
            no_subscriber: get(&s.no_subscriber),
            delivered_sse: get(&s.delivered_sse),
            delivered_ws: get(&s.delivered_ws),
            recovered: get(&s.recovered),
            duplicates_dropped: get(&s.duplicates_dropped),
            resets_history_gone: get(&s.resets_history_gone),
            resets_gap: get(&s.resets_gap),
            resets_epoch_changed: get(&s.resets_epoch_changed),
            resets_engine_rollback: get(&s.resets_engine_rollback),
            gaps_detected: get(&s.gaps_detected),
            slow_consumer_disconnects: get(&s.slow_consumer_disconnects),
            latency_p50_ms: (s.latency.quantile_us(0.5) / 10.0).round() / 100.0,
            latency_p99_ms: (s.latency.quantile_us(0.99) / 10.0).round() / 100.0,
            health: {
                let live = get(&s.delivered_sse) + get(&s.delivered_ws);
                let recovered = get(&s.recovered);
                let resets = get(&s.resets_history_gone)
                    + get(&s.resets_gap)
                    + get(&s.resets_epoch_changed)
                    + get(&s.resets_engine_rollback);
                let total = (live + recovered + resets) as f64;
                (total > 0.0).then(|| DeliveryHealth {
                    delivered_live: live as f64 / total,
                    recovered: recovered as f64 / total,
                    reset: resets as f64 / total,
                })
            },
        }
    }
}

impl EngineSink for HubShared {
    fn deliver(&self, publication: Arc<Publication>) {
        let receipt = publication.receipt.and_then(|id| lock(&self.receipts).get(&id).cloned());
        let shard = lock(self.shard(&publication.channel));
        let Some(members) = shard.get(&publication.channel) else {
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
        let Some(members) = shard.get(channel) else { return };
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
