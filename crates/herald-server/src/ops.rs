//! Operations endpoints (`/healthz`, `/readyz`, `/metrics`), the demo page at `/`, and the JSON
//! answers for unknown routes and methods.
//!
//! Metrics: the hub keeps its own counters (plain atomics on the hot path); at each scrape they are
//! copied into this node's Prometheus recorder and rendered. The recorder is local to the node (no
//! global state), so several nodes can live in one process (tests, embedding).

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use metrics::{counter, gauge};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use serde_json::json;

use crate::AppState;
use crate::error::ApiError;

const INDEX_HTML: &str = include_str!("../static/index.html");
const DASHBOARD_HTML: &str = include_str!("../static/dashboard.html");

/// This node's metrics registry plus counters the server itself keeps.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// Publications refused, by the error code of the answer.
    refused: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
    /// Connections the accept loop answered with an error itself, by the error code of the answer.
    connections_refused: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

impl Metrics {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        Self { recorder, handle, refused: Default::default(), connections_refused: Default::default() }
    }

    /// A connection refused before any route saw it (socket cap, bad or slow request head), by reason.
    pub fn connection_refused(&self, reason: &'static str) {
        if let Ok(mut refused) = self.connections_refused.lock() {
            *refused.entry(reason).or_default() += 1;
        }
    }

    /// A publication the API could not accept, by reason.
    pub fn refused(&self, reason: &'static str) {
        if let Ok(mut refused) = self.refused.lock() {
            *refused.entry(reason).or_default() += 1;
        }
    }

    async fn render(&self, state: &AppState) -> String {
        let ready = state.hub().ready().await && !state.draining();
        let s = state.hub().stats();
        let refused = self.refused.lock().map(|r| r.clone()).unwrap_or_default();
        let connections_refused = self.connections_refused.lock().map(|r| r.clone()).unwrap_or_default();
        let engine = state.hub().engine().stats();
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
            if let Some(rtt) = engine.probe_rtt_us {
                gauge!("herald_backplane_probe_rtt_seconds").set(rtt as f64 / 1e6);
            }
            gauge!("herald_ready").set(if ready { 1.0 } else { 0.0 });
            gauge!("herald_connections").set(s.connections as f64);
            gauge!("herald_channels").set(s.channels as f64);
            gauge!("herald_sockets_open").set(state.open_sockets() as f64);
        });
        self.handle.run_upkeep();
        let mut text = self.handle.render();
        render_latency(&mut text, state.hub().latency());
        text
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

pub async fn index() -> Html<&'static str> {
    Html(INDEX_HTML)
}

/// The live cluster dashboard (it polls `/v1/cluster`).
pub async fn dashboard() -> Html<&'static str> {
    Html(DASHBOARD_HTML)
}

/// No icon: an empty answer instead of a 404 in every browser console.
pub async fn favicon() -> StatusCode {
    StatusCode::NO_CONTENT
}

pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

pub async fn readyz(State(state): State<AppState>) -> Response {
    let engine_ready = state.hub().ready().await;
    let draining = state.draining();
    let ready = engine_ready && !draining;
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({"ready": ready, "engine": engine_ready, "draining": draining}))).into_response()
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    let text = state.metrics().render(&state).await;
    let mut response = text.into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    response
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
