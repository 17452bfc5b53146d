//! The `Engine` abstraction: what a node needs from whatever coordinates the cluster.
//!
//! The hub calls the engine; the engine calls back into the hub only through [`EngineSink`], which it
//! holds weakly (the hub owns the engine, never the reverse). The trait is shaped for distributed
//! engines: publish is one atomic step (dedup, position, history, fan-out); subscriptions are per channel
//! on one shared subscriber per node; history either covers a gap completely or says it cannot;
//! presence entries are owned by the node that holds the connection.
//!
//! Nothing in this file does I/O; implementations live in `memory.rs` and in their own crates.

use std::sync::{Arc, Weak};

use async_trait::async_trait;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::channel::ChannelName;
use crate::position::Position;
use crate::publication::Publication;

/// What a publisher asks for.
#[derive(Debug, Clone)]
pub struct PublishRequest {
    pub channel: ChannelName,
    pub event: Arc<str>,
    /// Compact JSON (no line breaks).
    pub data: Box<RawValue>,
    pub idempotency_key: Option<String>,
    pub correlation_id: Arc<str>,
    /// Set when the publisher waits for delivery receipts; travels with the publication, not to clients.
    pub receipt: Option<ReceiptRequest>,
    /// W3C `traceparent` of the publish span (when traces are exported); travels to delivering nodes.
    pub trace_parent: Option<Arc<str>>,
}

/// A publisher waiting for delivery receipts: the ID its node waits under, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiptRequest {
    pub id: u64,
    pub timeout: std::time::Duration,
}

/// What one node reports for an awaited publication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeReceipt {
    pub node: String,
    /// Connections that had the publication written.
    pub written: usize,
    /// Some of its connections had not written it when the node's wait ran out.
    pub timed_out: bool,
}

/// The answer to a publish.
#[derive(Debug, Clone)]
pub struct PublishOutcome {
    /// Where the publication sits; for a duplicate, the first publication's position.
    pub position: Position,
    /// The correlation ID stored with it (for a duplicate, the first publication's).
    pub correlation_id: Arc<str>,
    /// True when the idempotency key had been seen: nothing new was published.
    pub duplicate: bool,
    /// How many nodes the publication was handed to, when the engine knows (a distributed engine's
    /// fan-out count); `None` means only this node can deliver it.
    pub receivers: Option<usize>,
}

/// The answer to a history query.
#[derive(Debug, Clone)]
pub enum History {
    /// Every publication after `since` (up to the limit), oldest first, one offset at a time in
    /// `since`'s epoch, and the channel's current top.
    Covered { top: Position, publications: Vec<Arc<Publication>> },
    /// `since` can no longer be replayed (another epoch, trimmed or expired); `top` is where the stream is now.
    Gone {
        top: Position,
        /// `since` lies beyond what survived a loss of the engine's data (a restart from an older
        /// snapshot, a failover to a lagging replica): the client saw publications that no longer exist.
        rolled_back: bool,
    },
}

/// One connection's presence in one channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PresenceEntry {
    pub node: String,
    pub connection_id: String,
    pub user: Option<String>,
    pub transport: &'static str,
    pub connected_at: String,
}

impl PresenceEntry {
    /// An entry as an engine stored it (the JSON this type serialises to); `None` if it is not one.
    pub fn from_json(bytes: &[u8]) -> Option<PresenceEntry> {
        #[derive(serde::Deserialize)]
        struct Stored {
            node: String,
            connection_id: String,
            user: Option<String>,
            transport: String,
            connected_at: String,
        }
        let stored: Stored = serde_json::from_slice(bytes).ok()?;
        Some(PresenceEntry {
            node: stored.node,
            connection_id: stored.connection_id,
            user: stored.user,
            transport: if stored.transport == "ws" { "ws" } else { "sse" },
            connected_at: stored.connected_at,
        })
    }
}

/// A node as the engine sees it, with the counters it last reported.
#[derive(Debug, Clone, Serialize)]
pub struct NodeInfo {
    pub node: String,
    #[serde(flatten)]
    pub stats: crate::stats::NodeStats,
}

/// Counters of an engine's own machinery.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct EngineStats {
    /// Round trip of the last backplane probe, if the engine probes itself.
    pub probe_rtt_us: Option<u64>,
    /// Times the engine's subscriber connection was re-established.
    pub reconnects: u64,
    /// Gaps in the backplane's delivery that were filled from history.
    pub gaps_repaired: u64,
    /// Publications this node received from the backplane.
    pub messages_received: u64,
    /// Times this node found that the engine's data may have rolled back (its primary restarted or
    /// failed over, or a channel's position went backwards); the channels concerned were fenced.
    pub rollbacks: u64,
}

/// Engine failures; all of them mean "the engine cannot do this now".
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("engine unavailable: {0}")]
    Unavailable(String),
    #[error("engine timed out")]
    Timeout,
    #[error("engine protocol error: {0}")]
    Protocol(String),
    /// The publication was written but not to as many replicas as durability requires (it may still
    /// be delivered, and may be lost if the primary fails now).
    #[error("publication not durable: {0}")]
    NotDurable(String),
}

/// The pending answer to [`Engine::subscribe`].
pub type SubscribeFuture = futures_util::future::BoxFuture<'static, Result<(), EngineError>>;

/// The answer to a subscription handed to an engine's subscriber task: `sent` tells whether the task
/// took the request, `answer` is where it replies once the subscription is live.
pub fn subscribe_answer(
    sent: bool,
    answer: tokio::sync::oneshot::Receiver<Result<(), EngineError>>,
) -> SubscribeFuture {
    let stopped = || EngineError::Unavailable("subscriber stopped".into());
    Box::pin(async move {
        if !sent {
            return Err(stopped());
        }
        answer.await.unwrap_or_else(|_| Err(stopped()))
    })
}

/// How the engine hands things to the node's hub.
pub trait EngineSink: Send + Sync {
    /// A publication of a channel this node subscribed to. Called in offset order per channel.
    fn deliver(&self, publication: Arc<Publication>);
    /// The engine may have missed publications of `channel` up to `top` (after a reconnect, or its
    /// history was lost): every local connection checks its position and replays or resets.
    fn resync(&self, channel: &ChannelName, top: &Position);
    /// Registers a receipt that the next delivery carrying its ID will count; for engines that report
    /// receipts of publications made on other nodes.
    fn track_receipt(&self) -> (u64, Arc<crate::receipt::Receipt>);
    /// Forgets a receipt made by `track_receipt`.
    fn untrack_receipt(&self, id: u64);
    /// Whether this node has local subscribers of `channel`.
    fn has_members(&self, channel: &ChannelName) -> bool;
    /// Close this user's local connections; returns how many were closed.
    fn disconnect_user(&self, user: &str) -> usize;
    /// This node's counters, for `/v1/cluster`.
    fn stats(&self) -> crate::stats::StatsSnapshot;
}

/// [`Engine::publish_batch`]'s default: the channels concurrently, each channel's requests in order.
pub async fn publish_grouped<E: Engine + ?Sized>(
    engine: &E,
    requests: Vec<PublishRequest>,
) -> Vec<Result<PublishOutcome, EngineError>> {
    let total = requests.len();
    let mut by_channel: Vec<(ChannelName, Vec<(usize, PublishRequest)>)> = Vec::new();
    for (index, request) in requests.into_iter().enumerate() {
        match by_channel.iter_mut().find(|(channel, _)| *channel == request.channel) {
            Some((_, group)) => group.push((index, request)),
            None => by_channel.push((request.channel.clone(), vec![(index, request)])),
        }
    }
    let groups = by_channel.into_iter().map(|(_, group)| async move {
        let mut outcomes = Vec::with_capacity(group.len());
        for (index, request) in group {
            outcomes.push((index, engine.publish(request).await));
        }
        outcomes
    });
    let mut results: Vec<Option<Result<PublishOutcome, EngineError>>> = (0..total).map(|_| None).collect();
    for (index, outcome) in futures_util::future::join_all(groups).await.into_iter().flatten() {
        results[index] = Some(outcome);
    }
    results.into_iter().map(|r| r.unwrap_or_else(|| Err(EngineError::Protocol("no outcome".into())))).collect()
}

/// The coordination layer of a cluster (or of a single node).
#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// The name this node goes by in the cluster.
    fn node_id(&self) -> &str;

    /// Connects the engine to the node's hub. Called once, before anything else.
    async fn start(&self, sink: Weak<dyn EngineSink>) -> Result<(), EngineError>;

    /// Atomically: deduplicate by idempotency key, assign the next position, store in history, and hand
    /// the publication to every node subscribed to the channel. Returns once the engine accepted it.
    async fn publish(&self, request: PublishRequest) -> Result<PublishOutcome, EngineError>;

    /// Publishes several, each as [`Engine::publish`] would, one outcome per request in the order given;
    /// requests of one channel are published in the order given. By default the channels run
    /// concurrently and each channel's requests one after another; an engine that can do the lot in one
    /// round trip does so.
    async fn publish_batch(&self, requests: Vec<PublishRequest>) -> Vec<Result<PublishOutcome, EngineError>> {
        publish_grouped(self, requests).await
    }

    /// Makes this node receive the channel's publications. The request is taken when this is called
    /// (the hub calls it under its lock, to order it against `unsubscribe`); the future resolves once
    /// the subscription is live. Cheap for a channel already subscribed.
    fn subscribe(&self, channel: &ChannelName) -> SubscribeFuture;

    /// This node no longer needs the channel. Fire and forget; ordered after earlier `subscribe` calls.
    fn unsubscribe(&self, channel: &ChannelName);

    /// Publications after `since` (all of them up to `limit`), or `Gone`. With `since = None`, the
    /// latest `limit` publications.
    async fn history(
        &self,
        channel: &ChannelName,
        since: Option<&Position>,
        limit: usize,
    ) -> Result<History, EngineError>;

    /// The channel's current top position (offset 0 of a fresh epoch when it has none).
    async fn top(&self, channel: &ChannelName) -> Result<Position, EngineError>;

    async fn presence_join(&self, channel: &ChannelName, entry: PresenceEntry) -> Result<(), EngineError>;
    /// Fire and forget.
    fn presence_leave(&self, channel: &ChannelName, connection_id: &str);
    async fn presence(&self, channel: &ChannelName) -> Result<Vec<PresenceEntry>, EngineError>;

    /// Closes the user's connections on every node; returns how many were closed.
    async fn disconnect_user(&self, user: &str) -> Result<usize, EngineError>;

    /// The live nodes of the cluster with their counters.
    async fn nodes(&self) -> Result<Vec<NodeInfo>, EngineError>;

    /// Whether this node can deliver right now.
    async fn ready(&self) -> bool;

    /// The node is leaving: withdraw it from the cluster now rather than when its heartbeat expires.
    async fn stop(&self) {}

    /// Gathers the receipts of `expected` nodes for the publication published with `receipt` (each
    /// node reports once its connections wrote it or its wait ran out), until `timeout`. Engines that
    /// only deliver locally return `None`; the hub then counts its own connections.
    async fn collect_receipts(
        &self,
        receipt: u64,
        expected: usize,
        timeout: std::time::Duration,
    ) -> Option<Vec<NodeReceipt>> {
        let _ = (receipt, expected, timeout);
        None
    }

    /// Counters of the engine's own machinery, for metrics.
    fn stats(&self) -> EngineStats {
        EngineStats::default()
    }

    /// A fault for tests: while `lose` holds, live publications reaching this node from the engine are
    /// dropped on arrival, as if the engine had lost them (they stay in history, for the node to
    /// repair). Returns whether the engine has such a path (the in-process engine does not).
    #[doc(hidden)]
    fn lose_live_messages(&self, lose: bool) -> bool {
        let _ = lose;
        false
    }
}

#[cfg(test)]
mod presence_tests {
    use super::PresenceEntry;

    #[test]
    fn stored_presence_reads_back() {
        let entry = PresenceEntry {
            node: "n1".into(),
            connection_id: "c1".into(),
            user: Some("alice".into()),
            transport: "ws",
            connected_at: "2026-12-02T00:00:00.000Z".into(),
        };
        let stored = serde_json::to_vec(&entry).expect("json");
        assert_eq!(PresenceEntry::from_json(&stored), Some(entry));
        assert_eq!(PresenceEntry::from_json(b"{}"), None);
        assert_eq!(PresenceEntry::from_json(b"not json"), None);
    }
}
