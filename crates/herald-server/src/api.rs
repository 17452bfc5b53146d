//! The server API for backends: publish (single and batch), broadcast, presence, disconnect, cluster
//! (`/v1/history` is `history.rs`).
//!
//! Bodies and queries are parsed by hand (`input.rs`, not axum's extractors) so that every bad input
//! gets the contract's JSON error with a precise code instead of a framework's plain-text rejection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use herald_core::publication::{DEFAULT_EVENT, compact_json, validate_correlation_id, validate_event};
use herald_core::{ChannelName, PublishOutcome, PublishRequest};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tracing::Instrument;

use crate::error::ApiError;
pub use crate::history::{DEFAULT_HISTORY_LIMIT, MAX_HISTORY_LIMIT, history_chunks};
pub use crate::input::{BODY_RATE_GRACE, check_json_content_type, parse_body, query_pairs};
use crate::input::{channel_param, decode_json, number, single};
use crate::metrics::PublishTimes;
use crate::state::AppState;

/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;
/// Longest user name `/v1/disconnect` accepts, in bytes.
pub const MAX_USER_BYTES: usize = 256;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    channel: String,
    data: Box<RawValue>,
    event: Option<String>,
    idempotency_key: Option<String>,
}

/// `POST /v1/publish`: one publication, or `{"publications":[…]}`, each item as a single publish.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishOrBatch {
    channel: Option<String>,
    /// Present (even as JSON `null`) or absent.
    #[serde(default, deserialize_with = "present")]
    data: Option<Box<RawValue>>,
    event: Option<String>,
    idempotency_key: Option<String>,
    /// Items parsed one by one, so that each bad item gets its own error.
    publications: Option<Vec<Box<RawValue>>>,
}

fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(deserializer).map(Some)
}

impl PublishOrBatch {
    fn into_single(self) -> Result<PublishBody, ApiError> {
        let missing = |field: &str| ApiError::InvalidBody(format!("missing field `{field}`"));
        Ok(PublishBody {
            channel: self.channel.ok_or_else(|| missing("channel"))?,
            data: self.data.ok_or_else(|| missing("data"))?,
            event: self.event,
            idempotency_key: self.idempotency_key,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BroadcastBody {
    channels: Vec<String>,
    data: Box<RawValue>,
    event: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectBody {
    user: String,
}

/// A publish body that passed every check.
pub struct ValidPublish {
    pub channel: ChannelName,
    pub event: Arc<str>,
    /// Compact JSON (no line breaks).
    pub data: Box<RawValue>,
    pub idempotency_key: Option<String>,
}

impl ValidPublish {
    /// The engine's request for this publication, under `correlation_id`.
    pub fn into_request(self, correlation_id: Arc<str>) -> PublishRequest {
        PublishRequest {
            channel: self.channel,
            event: self.event,
            data: self.data,
            idempotency_key: self.idempotency_key,
            correlation_id,
            receipt: None,
            trace_parent: None,
        }
    }
}

fn validate_publish(body: PublishBody) -> Result<ValidPublish, ApiError> {
    let channel = ChannelName::parse(&body.channel)?;
    if let Some(key) = &body.idempotency_key {
        if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
            return Err(ApiError::InvalidBody(format!(
                "idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes"
            )));
        }
    }
    Ok(ValidPublish {
        channel,
        event: parse_event(body.event)?,
        data: compact_data(body.data)?,
        idempotency_key: body.idempotency_key,
    })
}

/// The publication's data as sent, without whitespace between tokens (see [`compact_json`]).
fn compact_data(data: Box<RawValue>) -> Result<Box<RawValue>, ApiError> {
    compact_json(data).map_err(|e| ApiError::InvalidBody(e.to_string()))
}

/// Parses and checks a publish request body exactly as `POST /v1/publish` does (for tests and fuzzing).
pub fn parse_publish_body(bytes: &[u8]) -> Result<ValidPublish, ApiError> {
    validate_publish(decode_json(bytes)?)
}

/// Checks `Authorization: Bearer <key>` against the configured API keys (see
/// [`crate::credentials::api_key_name`]): the key's name, `anonymous` without keys, else 401.
pub fn authorize(state: &AppState, headers: &HeaderMap) -> Result<String, ApiError> {
    crate::credentials::api_key_name(&state.config().api_keys, headers)
}

/// The correlation ID of a publish: `X-Correlation-ID`, else the trace ID of a valid W3C `traceparent`,
/// else a fresh one.
pub fn correlation_id(headers: &HeaderMap) -> Result<Arc<str>, ApiError> {
    if let Some(value) = headers.get("x-correlation-id") {
        let text = value.to_str().map_err(|_| ApiError::BadRequest("X-Correlation-ID must be ASCII".into()))?;
        return validate_correlation_id(text).map_err(|e| ApiError::BadRequest(format!("X-Correlation-ID: {e}")));
    }
    if let Some(trace_id) = headers.get("traceparent").and_then(|v| v.to_str().ok()).and_then(trace_id_of) {
        return Ok(Arc::from(trace_id));
    }
    Ok(new_correlation_id())
}

/// 32 random lower-case hex digits, the form of a trace ID.
fn new_correlation_id() -> Arc<str> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bits = rand::random::<u128>();
    let text: String = (0..32).rev().map(|i| char::from(HEX[((bits >> (4 * i)) & 0xf) as usize])).collect();
    Arc::from(text)
}

/// The trace ID of a `traceparent` header (`version-traceid-parentid-flags`), if well formed.
fn trace_id_of(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.trim().split('-');
    let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && hex(parent, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && parent.bytes().any(|b| b != b'0');
    valid.then_some(trace)
}

fn parse_event(event: Option<String>) -> Result<Arc<str>, ApiError> {
    match event {
        None => Ok(Arc::from(DEFAULT_EVENT)),
        Some(event) => validate_event(&event).map_err(|e| ApiError::InvalidBody(e.to_string())),
    }
}

/// A single publish's answer, encoded straight from the outcome (the keys in the order of
/// [`outcome_json`]'s).
#[derive(Serialize)]
struct Published<'a> {
    channel: &'a str,
    correlation_id: &'a str,
    duplicate: bool,
    epoch: &'a str,
    offset: u64,
}

impl<'a> Published<'a> {
    fn of(channel: &'a ChannelName, outcome: &'a PublishOutcome) -> Self {
        Published {
            channel: channel.as_str(),
            correlation_id: &outcome.correlation_id,
            duplicate: outcome.duplicate,
            epoch: outcome.position.epoch.as_str(),
            offset: outcome.position.offset,
        }
    }
}

fn outcome_json(channel: &ChannelName, outcome: &PublishOutcome) -> Value {
    json!({
        "channel": channel,
        "epoch": outcome.position.epoch,
        "offset": outcome.position.offset,
        "duplicate": outcome.duplicate,
        "correlation_id": &*outcome.correlation_id,
    })
}

/// `POST /v1/publish`
pub async fn publish(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Body,
) -> Result<Response, ApiError> {
    // Every refusal is counted by the code it is answered with.
    publish_inner(&state, headers, query, body).await.inspect_err(|error| state.metrics().refused(error))
}

async fn publish_inner(
    state: &AppState,
    headers: HeaderMap,
    query: Option<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let key = authorize(state, &headers)?;
    let pairs = query_pairs(&query);
    let await_delivery = match single(&pairs, "await")? {
        None => false,
        Some("delivery") => true,
        Some(other) => {
            return Err(ApiError::BadRequest(format!("await={other:?} is not supported; use await=delivery")));
        }
    };
    let max_await = state.config().limits.max_await_ms;
    let timeout_ms: u64 = number(&pairs, "timeout_ms")?.unwrap_or(1000);
    if timeout_ms > max_await {
        return Err(ApiError::BadRequest(format!("timeout_ms must be at most {max_await}")));
    }
    let body: PublishOrBatch = parse_body(state, &headers, body).await?;
    if let Some(items) = body.publications {
        let single_fields = body.channel.is_some() || body.data.is_some() || body.event.is_some();
        if single_fields || body.idempotency_key.is_some() {
            return Err(ApiError::InvalidBody("a batch carries only `publications`".into()));
        }
        if await_delivery {
            return Err(ApiError::BadRequest("await=delivery is for a single publication, not a batch".into()));
        }
        return publish_batch(state, &key, &headers, items).await;
    }
    state.publish_limiter().take(&key, 1)?;
    let valid = validate_publish(body.into_single()?)?;
    let channel = valid.channel.clone();
    let request = valid.into_request(correlation_id(&headers)?);
    let correlation = request.correlation_id.clone();
    // With trace export on, the publish runs inside a span whose context travels with the publication.
    let span = crate::telemetry::publish_span(&headers, channel.as_str(), &correlation);
    let mut request = request;
    request.trace_parent = span.as_ref().and_then(crate::telemetry::traceparent_of).map(Arc::from);
    let span = span.unwrap_or_else(tracing::Span::none);
    if !await_delivery {
        let engine_called = Instant::now();
        let outcome = state.hub().publish(request).instrument(span).await?;
        let engine_answered = Instant::now();
        tracing::debug!(correlation_id = %correlation, %channel, offset = outcome.position.offset,
            duplicate = outcome.duplicate, "published");
        let answer = Json(Published::of(&channel, &outcome)).into_response();
        state.metrics().published(&PublishTimes { started, engine_called, engine_answered });
        return Ok(answer);
    }
    let (outcome, report) =
        state.hub().publish_awaiting_delivery(request, Duration::from_millis(timeout_ms)).instrument(span).await?;
    let mut answer = outcome_json(&channel, &outcome);
    answer["delivery"] =
        json!({"connections": report.connections, "nodes": report.nodes, "timed_out": report.timed_out});
    Ok(Json(answer).into_response())
}

/// `POST /v1/publish` with `{"publications":[…]}`: each item is published as a single publish would be
/// (the request's correlation ID on each), items of one channel in the order given, all in one engine
/// round trip where the engine can (`Engine::publish_batch`); one answer item per publication, in order,
/// an error item for each that could not be published.
async fn publish_batch(
    state: &AppState,
    key: &str,
    headers: &HeaderMap,
    items: Vec<Box<RawValue>>,
) -> Result<Response, ApiError> {
    let max = state.config().limits.max_batch_publications;
    if items.is_empty() || items.len() > max {
        return Err(ApiError::InvalidBody(format!("publications must list 1 to {max} publications")));
    }
    state.publish_limiter().take(key, items.len() as u64)?;
    let correlation = correlation_id(headers)?;
    let mut results: Vec<Option<Value>> = vec![None; items.len()];
    // The valid items in the order given, with their place in the answer.
    let mut valid: Vec<(usize, ChannelName, PublishRequest)> = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let body = match decode_json::<PublishBody>(item.get().as_bytes()) {
            Ok(body) => body,
            Err(error) => {
                results[index] = Some(json!({"channel": Value::Null, "error": error.body()["error"]}));
                continue;
            }
        };
        let name = body.channel.clone();
        match validate_publish(body) {
            Ok(item) => valid.push((index, item.channel.clone(), item.into_request(correlation.clone()))),
            Err(error) => results[index] = Some(json!({"channel": name, "error": error.body()["error"]})),
        }
    }
    let (places, requests): (Vec<(usize, ChannelName)>, Vec<PublishRequest>) =
        valid.into_iter().map(|(index, channel, request)| ((index, channel), request)).unzip();
    // One engine round trip for the lot where the engine can (one script call on Redis).
    let outcomes = state.hub().publish_batch(requests).await;
    for ((index, channel), outcome) in places.into_iter().zip(outcomes) {
        results[index] = Some(match outcome {
            Ok(outcome) => outcome_json(&channel, &outcome),
            Err(error) => {
                let error = ApiError::from(error);
                state.metrics().refused(&error);
                json!({"channel": channel, "error": error.body()["error"]})
            }
        });
    }
    let results: Vec<Value> = results.into_iter().map(Option::unwrap_or_default).collect();
    Ok(Json(json!({ "results": results })).into_response())
}

/// `POST /v1/broadcast`
pub async fn broadcast(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let key = authorize(&state, &headers)?;
    let body: BroadcastBody = parse_body(&state, &headers, body).await?;
    let max = state.config().limits.max_broadcast_channels;
    if body.channels.is_empty() || body.channels.len() > max {
        return Err(ApiError::InvalidBody(format!("channels must list 1 to {max} channels")));
    }
    state.publish_limiter().take(&key, body.channels.len() as u64)?;
    let event = parse_event(body.event)?;
    let data = compact_data(body.data)?;
    let correlation = correlation_id(&headers)?;
    // Channels are independent: their publishes run concurrently (a bounded number at a time), which
    // lets a networked engine pipeline them; results keep the request's order.
    let publishes = body.channels.into_iter().map(|name| {
        let (state, event, data, correlation) = (&state, event.clone(), data.clone(), correlation.clone());
        async move {
            let channel = match ChannelName::parse(&name) {
                Ok(channel) => channel,
                Err(error) => return json!({"channel": name, "error": ApiError::from(error).body()["error"]}),
            };
            let valid = ValidPublish { channel: channel.clone(), event, data, idempotency_key: None };
            let request = valid.into_request(correlation);
            match state.hub().publish(request).await {
                Ok(outcome) => outcome_json(&channel, &outcome),
                Err(error) => {
                    let error = ApiError::from(error);
                    state.metrics().refused(&error);
                    json!({"channel": channel, "error": error.body()["error"]})
                }
            }
        }
    });
    let results: Vec<Value> = futures_util::stream::iter(publishes).buffered(BROADCAST_CONCURRENCY).collect().await;
    Ok(Json(json!({ "results": results })).into_response())
}

/// Publishes of one broadcast in flight at once.
const BROADCAST_CONCURRENCY: usize = 64;

/// `GET /v1/presence?channel=…`
pub async fn presence(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let pairs = query_pairs(&query);
    let channel = channel_param(&pairs)?;
    let connections = state.hub().presence(&channel).await?;
    Ok(Json(json!({"channel": channel, "connections": connections})).into_response())
}

/// `POST /v1/disconnect` with `{"user":"…"}`
pub async fn disconnect(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let body: DisconnectBody = parse_body(&state, &headers, body).await?;
    if body.user.is_empty() || body.user.len() > MAX_USER_BYTES {
        return Err(ApiError::InvalidBody(format!("user must be 1 to {MAX_USER_BYTES} bytes")));
    }
    let disconnected = state.hub().disconnect_user(&body.user).await?;
    Ok(Json(json!({ "disconnected": disconnected })).into_response())
}

/// `GET /v1/cluster`
pub async fn cluster(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let nodes = state.hub().nodes().await?;
    Ok(Json(json!({"node": state.hub().node_id(), "engine": engine_kind(&state), "nodes": nodes})).into_response())
}

fn engine_kind(state: &AppState) -> &str {
    crate::engines::kind_of(&state.config().engine).map_or("unknown", |kind| kind.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_gives_its_trace_id() {
        assert_eq!(
            trace_id_of("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        for bad in [
            "",
            "00-0000-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(trace_id_of(bad), None, "{bad}");
        }
    }
}
