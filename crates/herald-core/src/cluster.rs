//! What Herald builds once on top of any distributed engine.
//!
//! An engine crate implements [`Backplane`]: ordered per-channel streams (publish with dedup, history,
//! top), live subscribe/unsubscribe per channel on one subscriber per node, presence, node leases, and
//! one primitive for control messages ("send to node X / to every node"). [`ClusterEngine`] turns a
//! backplane into an [`Engine`] the hub can use, and its [`Relay`] holds everything else:
//!
//! - the receiving side: per channel, offsets already handed to the hub are dropped, a jump is filled
//!   from history, a re-sync after the subscriber reconnected replays what was missed and tells every
//!   connection the top (so connections that cannot be caught up get a reset);
//! - rollback detection: a channel's offset that goes backwards on one subscriber connection, or a top
//!   below what was delivered, means the engine lost data; the backplane is asked to fence the channel;
//! - the node-to-node protocols over control messages: disconnect requests and their replies, delivery
//!   receipts, and the self-probe that fails readiness when the subscription goes silent;
//! - the heartbeat, which carries this node's typed counters ([`NodeStats`]) to `/v1/cluster`.
//!
//! Nothing here does I/O itself; the backplane does.
//!
//! Why one file of ~760 lines: the relay's receiving side, its re-sync and its control protocols share
//! one state (`Relay`: what was delivered per channel, pending replies and receipts) and one invariant
//! (per-channel offset order into the hub); split across files they would have to expose that state
//! to each other. What could stand alone does: the header format (`Header`) and the `Engine` adapter
//! (`ClusterEngine`) are separate items at the end, each readable on its own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::channel::ChannelName;
use crate::engine::{
    Engine, EngineError, EngineSink, EngineStats, History, NodeInfo, NodeReceipt, PresenceEntry, PublishOutcome,
    PublishRequest, SubscribeFuture,
};
use crate::position::{Epoch, Position};
use crate::publication::Publication;
use crate::stats::NodeStats;
use crate::sync::lock;

/// Where a control message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recipient<'a> {
    Node(&'a str),
    All,
}

/// Counters only the backplane knows.
#[derive(Debug, Clone, Copy, Default)]
pub struct BackplaneStats {
    /// Times the subscriber connection was re-established.
    pub reconnects: u64,
    /// Times the backplane found its data may have rolled back (and fenced what was concerned).
    pub rollbacks: u64,
}

/// What a distributed engine must do. See the module documentation for what it need not do.
#[async_trait]
pub trait Backplane: Send + Sync + 'static {
    /// The name this node goes by in the cluster.
    fn node_id(&self) -> &str;

    /// Starts the node's subscriber. Every live publication, control message and reconnect goes to
    /// `relay` (see [`Relay`] for the calls, in the order the engine received them).
    async fn start(&self, relay: Arc<Relay>) -> Result<(), EngineError>;

    /// Atomically: deduplicate by idempotency key, assign the next position, store in history, and hand
    /// `header` + `\n` + the envelope to every node subscribed to the channel. `receivers` in the outcome
    /// is the number of nodes it was handed to when the engine knows it, `None` otherwise.
    async fn publish(&self, request: &PublishRequest, header: &str) -> Result<PublishOutcome, EngineError>;

    /// Several publishes in one round trip, each as [`Backplane::publish`] with its header, one outcome
    /// per request in order (requests of one channel in the order given). `None` when the engine cannot:
    /// the requests are then published one by one, channels concurrently.
    async fn publish_batch(
        &self,
        requests: &[(PublishRequest, String)],
    ) -> Option<Vec<Result<PublishOutcome, EngineError>>> {
        let _ = requests;
        None
    }

    /// As [`Engine::subscribe`]: taken when called, resolves once live.
    fn subscribe(&self, channel: &ChannelName) -> SubscribeFuture;
    /// As [`Engine::unsubscribe`].
    fn unsubscribe(&self, channel: &ChannelName);

    async fn history(
        &self,
        channel: &ChannelName,
        since: Option<&Position>,
        limit: usize,
    ) -> Result<History, EngineError>;
    async fn top(&self, channel: &ChannelName) -> Result<Position, EngineError>;

    /// The channel's position went backwards (from `seen` to `now` in `epoch`): its data rolled back.
    /// Move it to a new epoch before any further offset is assigned. Best effort.
    async fn fence(&self, channel: &ChannelName, epoch: &Epoch, seen: u64, now: u64);

    async fn presence_join(&self, channel: &ChannelName, entry: PresenceEntry) -> Result<(), EngineError>;
    /// Fire and forget.
    fn presence_leave(&self, channel: &ChannelName, connection_id: &str);
    /// Entries of live nodes only.
    async fn presence(&self, channel: &ChannelName) -> Result<Vec<PresenceEntry>, EngineError>;

    /// Renews this node's lease and stores its counters with it.
    async fn heartbeat(&self, stats: &NodeStats) -> Result<(), EngineError>;
    /// Nodes whose lease is current, with their last counters.
    async fn nodes(&self) -> Result<Vec<NodeInfo>, EngineError>;

    /// Sends a control message; returns how many nodes it reached (or, when the engine cannot tell,
    /// how many live nodes there are).
    async fn send(&self, to: Recipient<'_>, message: String) -> Result<usize, EngineError>;

    /// Sends this node's probe along the path live publications take; it must come back through
    /// [`Relay::control`]. By default a control message to this node.
    async fn probe(&self, message: String) -> Result<(), EngineError> {
        self.send(Recipient::Node(self.node_id()), message).await.map(|_| ())
    }

    /// Whether one subscriber connection hands over a channel's messages exactly once and in order
    /// (Redis pub/sub). Then an offset that does not grow on one connection means the data rolled back;
    /// otherwise (NATS, whose stream may republish a message again after a leader change) it is a
    /// duplicate, dropped.
    fn ordered_links(&self) -> bool {
        true
    }

    /// The subscriber connection and the command path are up (the relay adds the probe's freshness).
    fn connected(&self) -> bool;
    /// The probe found the subscription silent: drop it and connect again.
    fn reconnect(&self);
    /// Waits until the command path is connected again, or `until`.
    async fn wait_connected(&self, until: tokio::time::Instant) {
        let _ = until;
    }

    /// The node is leaving: withdraw its lease now.
    async fn stop(&self);

    fn stats(&self) -> BackplaneStats {
        BackplaneStats::default()
    }
}

/// Timing of the relay's own machinery.
#[derive(Debug, Clone, Copy)]
pub struct RelayConfig {
    /// How often the node probes itself and (at most this often) heartbeats.
    pub probe_interval: Duration,
    /// A probe not back within this time marks the subscription stale.
    pub probe_timeout: Duration,
    /// A node that has not heartbeated for this long is gone.
    pub node_ttl: Duration,
    /// How long a request to other nodes (disconnect) waits for their replies.
    pub request_timeout: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            probe_interval: Duration::from_secs(1),
            probe_timeout: Duration::from_secs(3),
            node_ttl: Duration::from_secs(30),
            request_timeout: Duration::from_secs(1),
        }
    }
}

/// Times a channel's re-sync waits for the command path before it gives up.
const RESYNC_ATTEMPTS: usize = 3;
/// Receipt channels older than this are dropped: their publisher stopped waiting long ago (a caller that
/// gave up mid-request never reaches `collect_receipts`, which would otherwise remove its entry).
const RECEIPT_CHANNEL_MAX_AGE: Duration = Duration::from_secs(120);

/// Where receipts for one awaited publication arrive (since when, sender, the receiver until
/// `collect_receipts` takes it).
type ReceiptChannel =
    (std::time::Instant, mpsc::UnboundedSender<NodeReceipt>, Option<mpsc::UnboundedReceiver<NodeReceipt>>);

/// The receiving side and the node-to-node protocols, shared by the engine (which feeds it) and
/// [`ClusterEngine`].
pub struct Relay {
    node: String,
    config: RelayConfig,
    backplane: OnceLock<Weak<dyn Backplane>>,
    sink: OnceLock<Weak<dyn EngineSink>>,
    /// Last position handed to the hub per subscribed channel.
    delivered: Mutex<HashMap<ChannelName, Position>>,
    /// Replies to requests this node made to other nodes (disconnect), by request ID.
    replies: Mutex<HashMap<u64, mpsc::UnboundedSender<usize>>>,
    /// Delivery receipts from other nodes for publications this node awaits, by receipt ID.
    receipts: Mutex<HashMap<u64, ReceiptChannel>>,
    next_request: AtomicU64,
    probe_fresh: AtomicBool,
    probe_rtt_us: AtomicU64,
    /// When the last probe came back (µs since the Unix epoch).
    last_probe_us: AtomicU64,
    gaps_repaired: AtomicU64,
    messages_received: AtomicU64,
    /// Channels whose position was seen going backwards (each was fenced).
    positions_backwards: AtomicU64,
    stopping: AtomicBool,
    /// See [`Engine::lose_live_messages`].
    losing_live: AtomicBool,
}

impl Relay {
    fn new(node: String, config: RelayConfig) -> Self {
        Self {
            node,
            config,
            backplane: OnceLock::new(),
            sink: OnceLock::new(),
            delivered: Mutex::new(HashMap::new()),
            replies: Mutex::new(HashMap::new()),
            receipts: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
            probe_fresh: AtomicBool::new(false),
            probe_rtt_us: AtomicU64::new(0),
            last_probe_us: AtomicU64::new(0),
            gaps_repaired: AtomicU64::new(0),
            messages_received: AtomicU64::new(0),
            positions_backwards: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            losing_live: AtomicBool::new(false),
        }
    }

    fn backplane(&self) -> Option<Arc<dyn Backplane>> {
        self.backplane.get().and_then(Weak::upgrade)
    }

    fn sink(&self) -> Option<Arc<dyn EngineSink>> {
        self.sink.get().and_then(Weak::upgrade)
    }

    /// The node is stopping: background tasks end.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// A new subscriber connection: what arrives on it goes through the returned link. `resync` are the
    /// channels it subscribed again after a lost connection; they are re-synced before anything else.
    pub async fn connected(self: &Arc<Self>, resync: Vec<ChannelName>) -> Link {
        let mut patient = true;
        for channel in resync {
            self.resync(&channel, &mut patient).await;
        }
        Link { relay: self.clone(), seen: HashMap::new() }
    }

    /// The last position handed to the hub for `channel`, if it is subscribed (an engine may compare
    /// it with its own top to find data that rolled back).
    pub fn delivered(&self, channel: &ChannelName) -> Option<Position> {
        lock(&self.delivered).get(channel).cloned()
    }

    /// Re-syncs one channel now (as after a reconnect): for an engine that cannot prove a new
    /// subscription was live everywhere when it said so.
    pub async fn recheck(&self, channel: &ChannelName) {
        self.resync(channel, &mut true).await;
    }

    /// The node no longer subscribes to `channel`.
    pub fn forget(&self, channel: &ChannelName) {
        lock(&self.delivered).remove(channel);
    }

    /// A control message (probe, disconnect request or reply, receipt).
    pub async fn control(&self, payload: &[u8]) {
        let Ok(message) = serde_json::from_slice::<Value>(payload) else { return };
        match message["op"].as_str() {
            Some("probe") if message["node"].as_str() == Some(self.node.as_str()) => {
                let sent = message["sent_us"].as_u64().unwrap_or(0);
                self.probe_rtt_us.store(now_us().saturating_sub(sent), Ordering::Relaxed);
                self.last_probe_us.store(now_us(), Ordering::Relaxed);
            }
            Some("disconnect") => {
                let (Some(user), Some(reply_to), Some(id)) =
                    (message["user"].as_str(), message["reply_to"].as_str(), message["id"].as_u64())
                else {
                    return;
                };
                let count = self.sink().map_or(0, |sink| sink.disconnect_user(user));
                let reply = json!({"op": "disconnected", "id": id, "count": count, "node": self.node});
                if let Some(backplane) = self.backplane() {
                    let _ = backplane.send(Recipient::Node(reply_to), reply.to_string()).await;
                }
            }
            // A publisher whose engine cannot count receivers asks every node: those without local
            // subscribers answer at once (the others answer once their connections wrote it).
            Some("receipt_check") => {
                let (Some(id), Some(channel), Some(origin)) =
                    (message["id"].as_u64(), message["channel"].as_str(), message["origin"].as_str())
                else {
                    return;
                };
                let Ok(channel) = ChannelName::parse(channel) else { return };
                if self.sink().is_some_and(|sink| sink.has_members(&channel)) {
                    return;
                }
                let report = json!({"op": "receipt", "id": id, "node": self.node, "written": 0, "timed_out": false});
                if let Some(backplane) = self.backplane() {
                    let _ = backplane.send(Recipient::Node(origin), report.to_string()).await;
                }
            }
            Some("receipt") => {
                let (Some(id), Some(node), Some(written)) =
                    (message["id"].as_u64(), message["node"].as_str(), message["written"].as_u64())
                else {
                    return;
                };
                if let Some((_, sender, _)) = lock(&self.receipts).get(&id) {
                    let timed_out = message["timed_out"].as_bool().unwrap_or(true);
                    let _ = sender.send(NodeReceipt { node: node.to_owned(), written: written as usize, timed_out });
                }
            }
            Some("disconnected") => {
                if let (Some(id), Some(count)) = (message["id"].as_u64(), message["count"].as_u64()) {
                    if let Some(waiter) = lock(&self.replies).get(&id) {
                        let _ = waiter.send(count as usize);
                    }
                }
            }
            _ => {}
        }
    }

    /// Hands `publication` to the hub after everything before it in its channel.
    async fn deliver_in_order(&self, backplane: &dyn Backplane, publication: Arc<Publication>) {
        let Some(sink) = self.sink() else { return };
        let channel = publication.channel.clone();
        let last = lock(&self.delivered).get(&channel).cloned();
        if let Some(last) = last {
            let incoming = &publication.position;
            if incoming.epoch == last.epoch {
                if incoming.offset <= last.offset {
                    return; // already delivered (a re-sync got there first)
                }
                if incoming.offset > last.offset + 1 {
                    // Missed live messages: fill the hole from history, in order.
                    self.gaps_repaired.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%channel, from = last.offset + 1, to = incoming.offset - 1, "gap in live delivery; replaying from history");
                    if let Ok(History::Covered { publications, .. }) =
                        backplane.history(&channel, Some(&last), (incoming.offset - last.offset) as usize).await
                    {
                        for earlier in publications {
                            if earlier.position.epoch == incoming.epoch && earlier.position.offset < incoming.offset {
                                sink.deliver(earlier);
                            }
                        }
                    }
                    // Whatever history no longer had, each connection sees as a gap and resets.
                }
            }
        }
        lock(&self.delivered).insert(channel, publication.position.clone());
        sink.deliver(publication);
    }

    /// When `position` repeats an offset delivered before on another connection: the offset delivered, if
    /// the engine's top is now below it (the data rolled back).
    async fn repeats_below_top(
        &self,
        backplane: &dyn Backplane,
        channel: &ChannelName,
        position: &Position,
    ) -> Option<u64> {
        let delivered = lock(&self.delivered).get(channel).cloned()?;
        if delivered.epoch != position.epoch || position.offset > delivered.offset {
            return None;
        }
        let top = backplane.top(channel).await.ok()?;
        (top.epoch == delivered.epoch && top.offset < delivered.offset).then_some(delivered.offset)
    }

    /// Delivers what the channel got while the subscription was away, then lets connections check.
    /// A top below what was delivered (the data rolled back) fences the channel.
    /// `patient`: wait for the command path between attempts; cleared once a channel gives up, so a
    /// long list of channels does not wait for each in turn while the engine is down.
    async fn resync(&self, channel: &ChannelName, patient: &mut bool) {
        let (Some(sink), Some(backplane)) = (self.sink(), self.backplane()) else { return };
        let mut attempt = 0;
        let mut top = loop {
            match backplane.top(channel).await {
                Ok(top) => break top,
                Err(error) if attempt >= RESYNC_ATTEMPTS || !*patient => {
                    *patient = false;
                    tracing::warn!(%channel, %error, "re-sync failed; connections will repair on the next publication");
                    return;
                }
                Err(_) => {
                    attempt += 1;
                    backplane.wait_connected(tokio::time::Instant::now() + self.config.request_timeout * 2).await;
                }
            }
        };
        let last = lock(&self.delivered).get(channel).cloned();
        if let Some(last) = last.as_ref().filter(|l| l.epoch == top.epoch && l.offset > top.offset) {
            self.positions_backwards.fetch_add(1, Ordering::Relaxed);
            backplane.fence(channel, &last.epoch, last.offset, top.offset).await;
            // Even if fencing failed, connections hear of the top below their position: they reset.
            if let Ok(now) = backplane.top(channel).await {
                top = now;
            }
        }
        if let Some(last) = last.filter(|l| l.epoch == top.epoch && l.offset < top.offset) {
            if let Ok(History::Covered { publications, .. }) = backplane.history(channel, Some(&last), 100_000).await {
                for publication in publications {
                    let next = lock(&self.delivered).get(channel).map_or(0, |p| p.offset) + 1;
                    if publication.position.epoch == top.epoch && publication.position.offset == next {
                        lock(&self.delivered).insert(channel.clone(), publication.position.clone());
                        sink.deliver(publication);
                    }
                }
            }
        }
        // History may have gone past the top read above (publishing went on meanwhile): what was delivered
        // is where the channel is now, never behind it (a top behind a connection means a rollback to it).
        {
            let mut delivered = lock(&self.delivered);
            if let Some(now) = delivered.get(channel).filter(|d| d.epoch == top.epoch && d.offset > top.offset) {
                top = now.clone();
            }
            delivered.insert(channel.clone(), top.clone());
        }
        sink.resync(channel, &top);
    }

    /// Counts this node's writes of a publication someone waits for, then reports them to its origin.
    fn report_receipt(&self, header: &Header, receipt: Arc<crate::receipt::Receipt>, local: u64) {
        let (Some(sink), Some(backplane)) = (self.sink(), self.backplane()) else { return };
        let header = header.clone();
        let node = self.node.clone();
        tokio::spawn(async move {
            let summary = receipt.wait(header.wait).await;
            sink.untrack_receipt(local);
            let report = json!({
                "op": "receipt", "id": header.receipt, "node": node,
                "written": summary.written, "timed_out": summary.timed_out,
            });
            let _ = backplane.send(Recipient::Node(&header.origin), report.to_string()).await;
        });
    }

    /// Sends a probe through the engine every probe interval and watches the answers come back: a
    /// subscription silent for longer than the probe timeout is declared stale and reconnected.
    async fn probe(self: Arc<Self>) {
        let mut interval = tokio::time::interval(self.config.probe_interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stale_after_us = self.config.probe_timeout.as_micros() as u64;
        let started = now_us();
        loop {
            interval.tick().await;
            let Some(backplane) = self.backplane() else { return };
            if self.stopping() {
                return;
            }
            let now = now_us();
            let last = self.last_probe_us.load(Ordering::Relaxed).max(started);
            let fresh = now.saturating_sub(last) <= stale_after_us;
            self.probe_fresh.store(fresh, Ordering::SeqCst);
            // Also when the engine was still reconnecting as the probe went stale: once it says it is
            // connected, a subscription that still brings no probe back is made anew (at most once per
            // probe timeout, see below).
            if !fresh && backplane.connected() {
                tracing::warn!(
                    silent_ms = now.saturating_sub(last) / 1000,
                    "engine subscription is stale; reconnecting"
                );
                // Pretend the last probe came back now, so the fresh connection gets a full timeout to
                // prove itself before it is declared stale again.
                self.last_probe_us.store(now, Ordering::Relaxed);
                backplane.reconnect();
            }
            let probe = json!({"op": "probe", "node": self.node, "sent_us": now_us()});
            let _ = backplane.probe(probe.to_string()).await;
        }
    }

    /// Renews this node's lease with its counters (they reach `/v1/cluster` this way). A loop of its own:
    /// a heartbeat that waits on a slow engine (a NATS bucket electing its leader) must not hold back the
    /// probes, or the node would declare a healthy subscription stale.
    async fn heartbeat(self: Arc<Self>) {
        let every = self.config.probe_interval.min(self.config.node_ttl / 6);
        // The first one went out at start.
        let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let Some(backplane) = self.backplane() else { return };
            if self.stopping() {
                return;
            }
            if let Err(error) = backplane.heartbeat(&self.node_stats(&*backplane)).await {
                tracing::debug!(%error, "heartbeat failed");
            }
        }
    }

    fn node_stats(&self, backplane: &dyn Backplane) -> NodeStats {
        NodeStats {
            hub: self.sink().map(|s| s.stats()).unwrap_or_default(),
            probe_rtt_us: Some(self.probe_rtt_us.load(Ordering::Relaxed)),
            ready: self.ready(backplane),
        }
    }

    fn ready(&self, backplane: &dyn Backplane) -> bool {
        backplane.connected() && self.probe_fresh.load(Ordering::SeqCst)
    }
}

/// One subscriber connection's view: on one connection a channel's offsets only grow, so one that does
/// not means the data rolled back under the engine (a backup loaded into a running server), and that
/// offset was just handed out a second time.
pub struct Link {
    relay: Arc<Relay>,
    /// The last position this connection received per channel.
    seen: HashMap<ChannelName, Position>,
}

impl Link {
    /// A live message of `channel`: the header line, `\n`, the envelope (as the origin's
    /// [`Backplane::publish`] was given them).
    pub async fn publication(&mut self, channel: ChannelName, payload: &[u8]) {
        let relay = &*self.relay;
        let Some(backplane) = relay.backplane() else { return };
        relay.messages_received.fetch_add(1, Ordering::Relaxed);
        if relay.losing_live.load(Ordering::Relaxed) {
            return;
        }
        let Some(split) = payload.iter().position(|b| *b == b'\n') else { return };
        let envelope = Bytes::copy_from_slice(&payload[split + 1..]);
        let header = Header::parse(&payload[..split]);
        // Someone waits for delivery receipts: count this node's writes under a local receipt.
        let tracked = header.as_ref().filter(|h| h.receipt != 0).and_then(|h| {
            let (local, receipt) = relay.sink()?.track_receipt();
            Some((h, local, receipt))
        });
        let trace_parent = header.as_ref().and_then(|h| h.trace_parent.clone());
        let publication = match Publication::from_envelope(envelope, tracked.as_ref().map(|t| t.1)) {
            Ok(publication) if publication.channel == channel => publication.with_trace_parent(trace_parent),
            Ok(_) => return tracing::warn!(%channel, "publication on the wrong engine channel ignored"),
            Err(error) => return tracing::warn!(%channel, %error, "unreadable publication ignored"),
        };
        tracing::debug!(correlation_id = %publication.correlation_id, %channel,
            offset = publication.position.offset, origin = header.as_ref().map_or("", |h| h.origin.as_str()),
            "received from the backplane");
        let position = publication.position.clone();
        let previous = self.seen.insert(channel.clone(), position.clone());
        // Channels this node left are forgotten now and then, when the map grows (not per message).
        if previous.is_none() && self.seen.len() > 1024 && self.seen.len() > 2 * lock(&relay.delivered).len() {
            let delivered = lock(&relay.delivered);
            self.seen.retain(|channel, _| delivered.contains_key(channel));
        }
        let repeated = previous.as_ref().is_some_and(|b| b.epoch == position.epoch && position.offset <= b.offset);
        if repeated && !backplane.ordered_links() {
            // Keep the highest seen; deliver_in_order drops what was delivered already.
            if let Some(before) = previous {
                self.seen.insert(channel.clone(), before);
            }
            return;
        }
        let backwards = match previous {
            Some(before) => repeated.then_some(before.offset),
            // The first on this connection repeats what an earlier one delivered: normal right after a
            // re-sync, a rollback if the engine's top is now below what was delivered.
            None => relay.repeats_below_top(&*backplane, &channel, &position).await,
        };
        if let Some(before) = backwards {
            relay.positions_backwards.fetch_add(1, Ordering::Relaxed);
            backplane.fence(&channel, &position.epoch, before, position.offset).await;
            self.seen.remove(&channel);
            relay.resync(&channel, &mut true).await;
            return;
        }
        relay.deliver_in_order(&*backplane, Arc::new(publication)).await;
        if let Some((header, local, receipt)) = tracked {
            relay.report_receipt(header, receipt, local);
        }
    }
}

/// The line before each envelope: `<origin node>\t<receipt id>\t<wait ms>\t<traceparent or ->`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub origin: String,
    /// 0 when nobody waits for receipts.
    pub receipt: u64,
    pub wait: Duration,
    pub trace_parent: Option<Arc<str>>,
}

impl Header {
    /// The header of a publication `node` makes for `request`.
    pub fn of(node: &str, request: &PublishRequest) -> String {
        if request.receipt.is_none() && request.trace_parent.is_none() {
            // Most publications: no receipt asked for, no trace.
            return [node, "\t0\t0\t-"].concat();
        }
        let (receipt_id, receipt_ms) = request.receipt.map_or((0, 0), |r| (r.id, r.timeout.as_millis() as u64));
        let trace = request.trace_parent.as_deref().unwrap_or("-");
        format!("{node}\t{receipt_id}\t{receipt_ms}\t{trace}")
    }

    pub fn parse(line: &[u8]) -> Option<Header> {
        let text = std::str::from_utf8(line).ok()?;
        let mut parts = text.split('\t');
        let origin = parts.next()?.to_owned();
        let receipt = parts.next()?.parse().ok()?;
        let wait_ms: u64 = parts.next()?.parse().ok()?;
        // A traceparent is 55 printable characters; anything else is ignored.
        let trace_parent = parts
            .next()
            .filter(|t| *t != "-" && t.len() <= 128 && t.bytes().all(|b| b.is_ascii_graphic()))
            .map(Arc::from);
        Some(Header { origin, receipt, wait: Duration::from_millis(wait_ms.min(60_000)), trace_parent })
    }
}

/// A [`Backplane`] made into the hub's [`Engine`], with the protocols of [`Relay`] on top.
pub struct ClusterEngine<B: Backplane> {
    backplane: Arc<B>,
    relay: Arc<Relay>,
}

impl<B: Backplane> ClusterEngine<B> {
    pub fn new(backplane: B, config: RelayConfig) -> Self {
        let backplane = Arc::new(backplane);
        let relay = Arc::new(Relay::new(backplane.node_id().to_owned(), config));
        let dynamic: Arc<dyn Backplane> = backplane.clone();
        let _ = relay.backplane.set(Arc::downgrade(&dynamic));
        Self { backplane, relay }
    }

    pub fn backplane(&self) -> &B {
        &self.backplane
    }
}

/// Removes a pending request's reply channel when dropped.
struct Forget<'a, T> {
    map: &'a Mutex<HashMap<u64, T>>,
    id: u64,
}

impl<T> Drop for Forget<'_, T> {
    fn drop(&mut self) {
        lock(self.map).remove(&self.id);
    }
}

#[async_trait]
impl<B: Backplane> Engine for ClusterEngine<B> {
    fn node_id(&self) -> &str {
        self.backplane.node_id()
    }

    async fn start(&self, sink: Weak<dyn EngineSink>) -> Result<(), EngineError> {
        self.relay.sink.set(sink).map_err(|_| EngineError::Protocol("engine started twice".into()))?;
        self.backplane.start(self.relay.clone()).await?;
        let stats = self.relay.node_stats(&*self.backplane);
        let _ = self.backplane.heartbeat(&stats).await;
        tokio::spawn(self.relay.clone().probe());
        tokio::spawn(self.relay.clone().heartbeat());
        Ok(())
    }

    async fn publish(&self, request: PublishRequest) -> Result<PublishOutcome, EngineError> {
        let receipt_id = request.receipt.map_or(0, |r| r.id);
        if receipt_id != 0 {
            // Registered before publishing: another node may answer before the publish returns.
            let (tx, rx) = mpsc::unbounded_channel();
            let mut channels = lock(&self.relay.receipts);
            channels.retain(|_, (since, _, _)| since.elapsed() < RECEIPT_CHANNEL_MAX_AGE);
            channels.insert(receipt_id, (std::time::Instant::now(), tx, Some(rx)));
        }
        let header = Header::of(self.backplane.node_id(), &request);
        let outcome = self.backplane.publish(&request, &header).await;
        if receipt_id != 0 && !matches!(&outcome, Ok(o) if !o.duplicate) {
            lock(&self.relay.receipts).remove(&receipt_id);
        }
        let mut outcome = outcome?;
        if !outcome.duplicate {
            outcome.correlation_id = request.correlation_id.clone();
            if receipt_id != 0 && outcome.receivers.is_none() {
                let check = json!({
                    "op": "receipt_check", "id": receipt_id, "channel": request.channel.as_str(),
                    "origin": self.relay.node,
                });
                outcome.receivers = Some(self.backplane.send(Recipient::All, check.to_string()).await.unwrap_or(0));
            }
        }
        Ok(outcome)
    }

    /// Receipts are for single publishes: a batch's requests carry none.
    async fn publish_batch(&self, requests: Vec<PublishRequest>) -> Vec<Result<PublishOutcome, EngineError>> {
        let node = self.backplane.node_id();
        let with_headers: Vec<(PublishRequest, String)> = requests
            .into_iter()
            .map(|request| {
                let header = Header::of(node, &request);
                (request, header)
            })
            .collect();
        let Some(outcomes) = self.backplane.publish_batch(&with_headers).await else {
            let requests = with_headers.into_iter().map(|(request, _)| request).collect();
            return crate::engine::publish_grouped(self, requests).await;
        };
        outcomes
            .into_iter()
            .zip(&with_headers)
            .map(|(outcome, (request, _))| {
                outcome.map(|mut outcome| {
                    if !outcome.duplicate {
                        outcome.correlation_id = request.correlation_id.clone();
                    }
                    outcome
                })
            })
            .collect()
    }

    fn subscribe(&self, channel: &ChannelName) -> SubscribeFuture {
        self.backplane.subscribe(channel)
    }

    fn unsubscribe(&self, channel: &ChannelName) {
        self.relay.forget(channel);
        self.backplane.unsubscribe(channel);
    }

    async fn history(
        &self,
        channel: &ChannelName,
        since: Option<&Position>,
        limit: usize,
    ) -> Result<History, EngineError> {
        self.backplane.history(channel, since, limit).await
    }

    async fn top(&self, channel: &ChannelName) -> Result<Position, EngineError> {
        self.backplane.top(channel).await
    }

    async fn presence_join(&self, channel: &ChannelName, entry: PresenceEntry) -> Result<(), EngineError> {
        self.backplane.presence_join(channel, entry).await
    }

    fn presence_leave(&self, channel: &ChannelName, connection_id: &str) {
        self.backplane.presence_leave(channel, connection_id);
    }

    async fn presence(&self, channel: &ChannelName) -> Result<Vec<PresenceEntry>, EngineError> {
        self.backplane.presence(channel).await
    }

    async fn disconnect_user(&self, user: &str) -> Result<usize, EngineError> {
        let relay = &self.relay;
        let id = relay.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::unbounded_channel();
        lock(&relay.replies).insert(id, tx);
        // Removed however this ends, including when the caller stops waiting.
        let _forget = Forget { map: &relay.replies, id };
        let message = json!({"op": "disconnect", "user": user, "reply_to": relay.node, "id": id});
        let receivers = self.backplane.send(Recipient::All, message.to_string()).await?;
        let mut total = 0;
        let deadline = tokio::time::Instant::now() + relay.config.request_timeout;
        for _ in 0..receivers {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(count)) => total += count,
                _ => break,
            }
        }
        Ok(total)
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, EngineError> {
        self.backplane.nodes().await
    }

    async fn ready(&self) -> bool {
        self.relay.ready(&*self.backplane)
    }

    fn lose_live_messages(&self, lose: bool) -> bool {
        self.relay.losing_live.store(lose, Ordering::SeqCst);
        true
    }

    async fn stop(&self) {
        self.relay.stopping.store(true, Ordering::SeqCst);
        self.backplane.stop().await;
    }

    async fn collect_receipts(&self, receipt: u64, expected: usize, timeout: Duration) -> Option<Vec<NodeReceipt>> {
        let rx = lock(&self.relay.receipts).get_mut(&receipt).and_then(|(_, _, rx)| rx.take());
        let mut receipts: Vec<NodeReceipt> = Vec::new();
        if let Some(mut rx) = rx {
            // Each node waits up to `timeout` for its connections; allow the report a moment to travel.
            let deadline = tokio::time::Instant::now() + timeout + self.relay.config.request_timeout / 4;
            while receipts.len() < expected {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(node_receipt)) => receipts.push(node_receipt),
                    _ => break,
                }
            }
        }
        lock(&self.relay.receipts).remove(&receipt);
        Some(receipts)
    }

    fn stats(&self) -> EngineStats {
        let r = &self.relay;
        let b = self.backplane.stats();
        EngineStats {
            probe_rtt_us: Some(r.probe_rtt_us.load(Ordering::Relaxed)),
            reconnects: b.reconnects,
            gaps_repaired: r.gaps_repaired.load(Ordering::Relaxed),
            messages_received: r.messages_received.load(Ordering::Relaxed),
            rollbacks: b.rollbacks + r.positions_backwards.load(Ordering::Relaxed),
        }
    }
}

fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let header = Header {
            origin: "node-a".into(),
            receipt: 7,
            wait: Duration::from_millis(1500),
            trace_parent: Some(Arc::from("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")),
        };
        let line = format!(
            "{}\t{}\t{}\t{}",
            header.origin,
            header.receipt,
            header.wait.as_millis(),
            header.trace_parent.as_deref().unwrap_or("-")
        );
        assert_eq!(Header::parse(line.as_bytes()), Some(header));
        assert_eq!(Header::parse(b"node\tx\t0\t-"), None);
        let plain = Header::parse(b"node\t0\t0\t-").expect("header");
        assert_eq!((plain.receipt, plain.trace_parent), (0, None));
    }
}
