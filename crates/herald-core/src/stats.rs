//! The counters a node reports: its hub's snapshot and, in a cluster, what it tells the others.

use serde::{Deserialize, Serialize};

/// A snapshot of the hub's counters plus gauges.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StatsSnapshot {
    pub connections: u64,
    pub channels: u64,
    pub connections_opened: u64,
    pub published: u64,
    pub duplicates: u64,
    pub no_subscriber: u64,
    pub delivered_sse: u64,
    pub delivered_ws: u64,
    pub recovered: u64,
    pub duplicates_dropped: u64,
    pub resets_history_gone: u64,
    pub resets_gap: u64,
    pub resets_epoch_changed: u64,
    pub resets_engine_rollback: u64,
    pub gaps_detected: u64,
    pub slow_consumer_disconnects: u64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    /// Shares of what reached clients: live deliveries, recovered publications, resets (`None` before
    /// anything happened).
    pub health: Option<DeliveryHealth>,
}

/// Shares of live deliveries, recoveries and resets among everything this node handed to clients.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct DeliveryHealth {
    pub delivered_live: f64,
    pub recovered: f64,
    pub reset: f64,
}

/// A node's counters as it last reported them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeStats {
    #[serde(flatten)]
    pub hub: StatsSnapshot,
    /// Round trip of the node's last probe through the engine, in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_rtt_us: Option<u64>,
    pub ready: bool,
}
