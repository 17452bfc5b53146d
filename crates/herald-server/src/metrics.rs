//! This node's metrics: the hub keeps its own counters (plain atomics on the hot path); at each scrape
//! they are copied into this node's Prometheus recorder and rendered. The recorder is local to the node
//! (no global state), so several nodes can live in one process (tests, embedding).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use herald_core::{EventKind, Hub};
use metrics::{counter, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::error::ApiError;
use crate::hooks::Hooks;
use crate::proxy::{Kind, Outcome, ProxyStats};

/// This node's metrics registry plus counters the server itself keeps.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// Publications refused, by the error code of the answer.
    refused: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
    /// Connections the accept loop answered with an error itself, by the error code of the answer.
    connections_refused: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
    /// Where the time of single publishes went (`herald_publish_stage_seconds`).
    stages: PublishStages,
}

/// The stages of a single publish in its handler, summed: `request` (reading the body, parsing and
/// validating it), `engine` (the engine's round trip: dedup, position, history, fan-out) and `answer`
/// (encoding the answer). Hyper's own parse of the request head and its write of the answer happen
/// outside the handler; a client's round trip minus the three is their cost plus the network's.
#[derive(Default)]
struct PublishStages {
    count: AtomicU64,
    nanos: [AtomicU64; 3],
}

const STAGES: [&str; 3] = ["request", "engine", "answer"];

/// The times at which a single publish's handler started, called the engine, and had its answer back.
pub struct PublishTimes {
    pub started: Instant,
    pub engine_called: Instant,
    pub engine_answered: Instant,
}

impl Metrics {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        Self {
            recorder,
            handle,
            refused: Default::default(),
            connections_refused: Default::default(),
            stages: Default::default(),
        }
    }

    /// A single publish answered: its stages' times, up to now (its answer encoded).
    pub fn published(&self, times: &PublishTimes) {
        let now = Instant::now();
        let spans = [
            times.engine_called - times.started,
            times.engine_answered - times.engine_called,
            now - times.engine_answered,
        ];
        for (sum, span) in self.stages.nanos.iter().zip(spans) {
            sum.fetch_add(span.as_nanos() as u64, Ordering::Relaxed);
        }
        self.stages.count.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection refused before any route saw it (socket cap, bad or slow request head), by reason.
    pub fn connection_refused(&self, reason: &'static str) {
        if let Ok(mut refused) = self.connections_refused.lock() {
            *refused.entry(reason).or_default() += 1;
        }
    }

    /// A publication the API could not accept, by the code of its answer.
    pub fn refused(&self, error: &ApiError) {
        if let Ok(mut refused) = self.refused.lock() {
            *refused.entry(error.code()).or_default() += 1;
        }
    }

    /// The Prometheus text of this node: the hub's counters, whether it is `ready`, its open sockets,
    /// the calls of the connect and subscribe proxies, and the lifecycle webhooks (zeros when off).
    pub fn render(
        &self,
        hub: &Hub,
        ready: bool,
        open_sockets: usize,
        proxy: &ProxyStats,
        hooks: Option<&Hooks>,
    ) -> String {
        let hook_counts = hooks.map(Hooks::counts).unwrap_or_default();
        let s = hub.stats();
        let refused = self.refused.lock().map(|r| r.clone()).unwrap_or_default();
        let connections_refused = self.connections_refused.lock().map(|r| r.clone()).unwrap_or_default();
        let engine = hub.engine().stats();
        metrics::with_local_recorder(&self.recorder, || {
            counter!("herald_publications_total", "result" => "accepted").absolute(s.published);
            counter!("herald_publications_total", "result" => "duplicate").absolute(s.duplicates);
            for (reason, count) in &refused {
                counter!("herald_publications_refused_total", "reason" => *reason).absolute(*count);
            }
            for (reason, count) in &connections_refused {
                counter!("herald_connections_refused_total", "reason" => *reason).absolute(*count);
            }
            counter!("herald_publications_without_subscribers_total").absolute(s.no_subscriber);
            counter!("herald_deliveries_total", "transport" => "sse").absolute(s.delivered_sse);
            counter!("herald_deliveries_total", "transport" => "ws").absolute(s.delivered_ws);
            counter!("herald_recovered_total").absolute(s.recovered);
            counter!("herald_duplicates_dropped_total").absolute(s.duplicates_dropped);
            counter!("herald_resets_total", "reason" => "history_gone").absolute(s.resets_history_gone);
            counter!("herald_resets_total", "reason" => "gap").absolute(s.resets_gap);
            counter!("herald_resets_total", "reason" => "epoch_changed").absolute(s.resets_epoch_changed);
            counter!("herald_resets_total", "reason" => "engine_rollback").absolute(s.resets_engine_rollback);
            counter!("herald_gaps_detected_total").absolute(s.gaps_detected);
            counter!("herald_slow_client_disconnects_total").absolute(s.slow_consumer_disconnects);
            counter!("herald_connections_opened_total").absolute(s.connections_opened);
            counter!("herald_engine_reconnects_total").absolute(engine.reconnects);
            counter!("herald_engine_gaps_repaired_total").absolute(engine.gaps_repaired);
            counter!("herald_engine_messages_received_total").absolute(engine.messages_received);
            counter!("herald_engine_rollbacks_total").absolute(engine.rollbacks);
            for kind in Kind::ALL {
                for outcome in Outcome::ALL {
                    counter!("herald_proxy_requests_total", "proxy" => kind.as_str(), "outcome" => outcome.as_str())
                        .absolute(proxy.outcomes(kind, outcome));
                }
            }
            for (kind, count) in EventKind::ALL.iter().zip(hook_counts.events) {
                counter!("herald_hooks_events_total", "type" => kind.as_str()).absolute(count);
            }
            for (outcome, count) in [
                ("sent", hook_counts.sent),
                ("failed", hook_counts.failed),
                ("retried", hook_counts.retried),
                ("dropped", hook_counts.dropped),
            ] {
                counter!("herald_hooks_deliveries_total", "outcome" => outcome).absolute(count);
            }
            if let Some(rtt) = engine.probe_rtt_us {
                gauge!("herald_backplane_probe_rtt_seconds").set(rtt as f64 / 1e6);
            }
            gauge!("herald_ready").set(if ready { 1.0 } else { 0.0 });
            gauge!("herald_connections").set(s.connections as f64);
            gauge!("herald_channels").set(s.channels as f64);
            gauge!("herald_sockets_open").set(open_sockets as f64);
        });
        self.handle.run_upkeep();
        let mut text = self.handle.render();
        render_latency(&mut text, hub.latency());
        render_proxy_latency(&mut text, proxy);
        self.render_stages(&mut text);
        text
    }

    /// Appends `herald_publish_stage_seconds`, a summary (sum and count) per stage.
    fn render_stages(&self, text: &mut String) {
        use std::fmt::Write as _;
        let name = "herald_publish_stage_seconds";
        let count = self.stages.count.load(Ordering::Relaxed);
        let _ = writeln!(text, "# HELP {name} Time single publishes spent in each stage of their handler");
        let _ = writeln!(text, "# TYPE {name} summary");
        for (stage, sum) in STAGES.iter().zip(&self.stages.nanos) {
            let seconds = sum.load(Ordering::Relaxed) as f64 / 1e9;
            let _ = writeln!(text, "{name}_sum{{stage=\"{stage}\"}} {seconds}");
            let _ = writeln!(text, "{name}_count{{stage=\"{stage}\"}} {count}");
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Appends the delivery latency histogram, kept by the hub in fixed buckets, in Prometheus text format.
fn render_latency(text: &mut String, (counts, sum_us): ([u64; 15], u64)) {
    use herald_core::hub::LATENCY_BUCKETS_US;
    use std::fmt::Write;
    let name = "herald_delivery_latency_seconds";
    let _ = writeln!(
        text,
        "# HELP {name} Time from a publication's acceptance by the engine to its write to a client (live deliveries)."
    );
    let _ = writeln!(text, "# TYPE {name} histogram");
    let mut cumulative = 0;
    for (bound, count) in LATENCY_BUCKETS_US.iter().zip(&counts) {
        cumulative += count;
        let _ = writeln!(text, "{name}_bucket{{le=\"{}\"}} {cumulative}", *bound as f64 / 1e6);
    }
    cumulative += counts[LATENCY_BUCKETS_US.len()];
    let _ = writeln!(text, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
    let _ = writeln!(text, "{name}_sum {}", sum_us as f64 / 1e6);
    let _ = writeln!(text, "{name}_count {cumulative}");
}

/// Appends the latency of the proxies' calls (those made, not answers reused), one histogram series
/// per proxy.
fn render_proxy_latency(text: &mut String, proxy: &ProxyStats) {
    use crate::proxy::LATENCY_BUCKETS_US;
    use std::fmt::Write;
    let name = "herald_proxy_duration_seconds";
    let _ = writeln!(text, "# HELP {name} Time from sending a connect or subscribe proxy call to its whole answer.");
    let _ = writeln!(text, "# TYPE {name} histogram");
    for kind in Kind::ALL {
        let (counts, sum_us) = proxy.latency(kind);
        let label = kind.as_str();
        let mut cumulative = 0;
        for (bound, count) in LATENCY_BUCKETS_US.iter().zip(&counts) {
            cumulative += count;
            let _ = writeln!(text, "{name}_bucket{{proxy=\"{label}\",le=\"{}\"}} {cumulative}", *bound as f64 / 1e6);
        }
        cumulative += counts[LATENCY_BUCKETS_US.len()];
        let _ = writeln!(text, "{name}_bucket{{proxy=\"{label}\",le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(text, "{name}_sum{{proxy=\"{label}\"}} {}", sum_us as f64 / 1e6);
        let _ = writeln!(text, "{name}_count{{proxy=\"{label}\"}} {cumulative}");
    }
}
