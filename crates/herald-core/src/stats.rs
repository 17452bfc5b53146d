//! The counters a node keeps and reports: the hub's live atomics ([`Stats`], with the latency
//! histogram), their snapshot, and, in a cluster, what a node tells the others.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

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

impl Stats {
    /// The counters now, with `channels` (a gauge only the hub knows).
    pub fn snapshot(&self, channels: u64) -> StatsSnapshot {
        let s = self;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            connections: get(&s.connections),
            channels,
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
