//! The server API for backends: publish, broadcast, history, presence, disconnect, cluster.
//!
//! Bodies and queries are parsed here by hand (not with axum's extractors) so that every bad input
//! gets the contract's JSON error with a precise code instead of a framework's plain-text rejection.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use herald_core::publication::{DEFAULT_EVENT, compact_json, validate_correlation_id, validate_event};
use herald_core::{ChannelName, Epoch, History, Position, Publication, PublishOutcome, PublishRequest};
use hyper::body::{Frame, SizeHint};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tracing::Instrument;

use crate::AppState;
use crate::error::ApiError;

/// How long a history read waits for a free slot (`limits.max_concurrent_history_reads`) before 429.
const HISTORY_READ_WAIT: Duration = Duration::from_secs(5);
/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;
/// Publications returned by `/v1/history` unless `limit` says otherwise, and the most it may ask for.
pub const DEFAULT_HISTORY_LIMIT: usize = 100;
pub const MAX_HISTORY_LIMIT: usize = 10_000;
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

/// Checks `Authorization: Bearer <key>` against the configured API keys (if any), in constant time.
/// Returns the matching key's name (`name=secret` entries are named; others are `key-<n>`), or
/// `anonymous` when no keys are configured.
pub fn authorize(state: &AppState, headers: &HeaderMap) -> Result<String, ApiError> {
    let keys = &state.config().api_keys;
    if keys.is_empty() {
        return Ok("anonymous".to_owned());
    }
    let Some(Ok(presented)) = crate::auth::bearer(headers) else { return Err(ApiError::Unauthorized) };
    // Compare against every key without stopping early, so timing says nothing about which matched.
    let mut matched = None;
    for (index, entry) in keys.iter().enumerate() {
        let (name, secret) = key_parts(entry, index);
        if constant_time_eq(secret.as_bytes(), presented.as_bytes()) && matched.is_none() {
            matched = Some(name);
        }
    }
    matched.ok_or(ApiError::Unauthorized)
}

/// `name=secret` (name of letters, digits, `_` and `-`) or a bare secret, named by its position.
pub fn key_parts(entry: &str, index: usize) -> (String, &str) {
    match entry.split_once('=') {
        Some((name, secret))
            if !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
        {
            (name.to_owned(), secret)
        }
        _ => (format!("key-{}", index + 1), entry),
    }
}

/// Per-key token buckets for publications: `publish_rate_per_key` per second, bursting to one second's
/// worth. Refusals answer 429 with `Retry-After`.
#[derive(Default)]
pub struct PublishLimiter {
    buckets: std::sync::Mutex<std::collections::HashMap<String, (f64, std::time::Instant)>>,
}

impl PublishLimiter {
    pub fn take(&self, key: &str, rate: u64, count: u64) -> Result<(), ApiError> {
        if rate == 0 {
            return Ok(());
        }
        let now = std::time::Instant::now();
        let capacity = rate as f64;
        let Ok(mut buckets) = self.buckets.lock() else { return Ok(()) };
        let (tokens, last) = buckets.entry(key.to_owned()).or_insert((capacity, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * capacity).min(capacity);
        *last = now;
        if *tokens >= count as f64 {
            *tokens -= count as f64;
            Ok(())
        } else {
            Err(ApiError::Limit(format!("API key {key} may publish {rate} publications per second")))
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// Time a request body may take before its rate counts (the bytes of a body normally follow its head
/// at once; this covers a round trip, `Expect: 100-continue` and a lost packet).
pub const BODY_RATE_GRACE: Duration = Duration::from_secs(1);

/// Reads and parses a JSON request body, mapping each failure to its contract error: 415 unless
/// `Content-Type` is `application/json` (so a cross-site HTML form, which cannot send that type without
/// a CORS preflight, cannot call the API), 413 past `limits.max_body_bytes` (at once when
/// `Content-Length` says so, else as soon as the body grows past it), 408 when the body does not arrive
/// within `limits.body_read_timeout_secs` or trickles in slower than `limits.min_body_rate_bytes_per_sec`.
pub async fn parse_body<T: DeserializeOwned>(state: &AppState, headers: &HeaderMap, body: Body) -> Result<T, ApiError> {
    let bytes = read_body(state, headers, body).await?;
    decode_json(&bytes)
}

/// Checks that a request says its body is JSON: `application/json`, with optional parameters, any
/// case; a `charset` other than UTF-8 is refused (JSON is UTF-8, RFC 8259 section 8.1).
pub fn check_json_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let refused = || ApiError::UnsupportedMediaType("the request body must be Content-Type: application/json".into());
    let mut values = headers.get_all(header::CONTENT_TYPE).iter();
    let (Some(value), None) = (values.next(), values.next()) else { return Err(refused()) };
    let value = value.to_str().map_err(|_| refused())?;
    let mut parts = value.split(';');
    let media_type = parts.next().unwrap_or_default().trim();
    if !media_type.eq_ignore_ascii_case("application/json") {
        return Err(refused());
    }
    for parameter in parts {
        let (name, value) = parameter.split_once('=').unwrap_or((parameter, ""));
        let value = value.trim().trim_matches('"');
        if name.trim().eq_ignore_ascii_case("charset") && !value.eq_ignore_ascii_case("utf-8") {
            return Err(ApiError::UnsupportedMediaType(format!("charset {value:?} is not supported; JSON is UTF-8")));
        }
    }
    Ok(())
}

async fn read_body(state: &AppState, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    use tokio::time::{Instant, timeout_at};
    check_json_content_type(headers)?;
    let limits = &state.config().limits;
    let max = limits.max_body_bytes;
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > max as u64) {
        return Err(ApiError::BodyTooLarge { limit: max });
    }
    let timeout = Duration::from_secs(limits.body_read_timeout_secs);
    let rate = limits.min_body_rate_bytes_per_sec;
    let started = Instant::now();
    let mut stream = body.into_data_stream();
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut received = 0usize;
    loop {
        // The body must keep up with `rate` from the end of the grace period on: at time t it must hold
        // at least rate * (t - grace) bytes, so the next byte is due by start + grace + received / rate.
        let rate_deadline =
            (rate > 0).then(|| started + BODY_RATE_GRACE + Duration::from_secs_f64(received as f64 / rate as f64));
        let total_deadline = started + timeout;
        let deadline = rate_deadline.map_or(total_deadline, |due| due.min(total_deadline));
        let chunk = match timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(chunk))) => chunk,
            Ok(None) => break,
            Ok(Some(Err(error))) => {
                return Err(ApiError::BadRequest(format!("the request body could not be read: {error}")));
            }
            Err(_) if deadline == total_deadline => {
                return Err(ApiError::RequestTimeout(format!(
                    "the request body did not arrive within {} s",
                    timeout.as_secs()
                )));
            }
            Err(_) => {
                return Err(ApiError::RequestTimeout(format!(
                    "the request body arrived slower than {rate} bytes per second"
                )));
            }
        };
        received += chunk.len();
        if received > max {
            return Err(ApiError::BodyTooLarge { limit: max });
        }
        chunks.push(chunk);
    }
    Ok(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.pop().unwrap_or_default(),
        _ => Bytes::from(chunks.concat()),
    })
}

/// JSON into `T`: syntax errors are `malformed_json`, shape errors `invalid_body`.
fn decode_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|error| match error.classify() {
        serde_json::error::Category::Data => ApiError::InvalidBody(error.to_string()),
        _ => ApiError::MalformedJson(error.to_string()),
    })
}

/// The query string as key-value pairs.
pub fn query_pairs(query: &Option<String>) -> Vec<(String, String)> {
    query.as_deref().map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect()).unwrap_or_default()
}

pub(crate) fn single<'a>(pairs: &'a [(String, String)], key: &str) -> Result<Option<&'a str>, ApiError> {
    let mut values = pairs.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str());
    let first = values.next();
    if values.next().is_some() {
        return Err(ApiError::BadRequest(format!("query parameter {key} given more than once")));
    }
    Ok(first)
}

/// The required `channel` query parameter, validated.
fn channel_param(pairs: &[(String, String)]) -> Result<ChannelName, ApiError> {
    let name = single(pairs, "channel")?.ok_or(ApiError::BadRequest("channel is required".into()))?;
    Ok(ChannelName::parse(name)?)
}

fn number<T: std::str::FromStr>(pairs: &[(String, String)], key: &str) -> Result<Option<T>, ApiError> {
    single(pairs, key)?
        .map(|v| {
            v.parse::<T>()
                .map_err(|_| ApiError::BadRequest(format!("query parameter {key} must be a non-negative integer")))
        })
        .transpose()
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
    Ok(Arc::from(format!("{:032x}", rand::random::<u128>())))
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
    publish_inner(&state, headers, query, body).await.inspect_err(|error| state.metrics().refused(error.code()))
}

async fn publish_inner(
    state: &AppState,
    headers: HeaderMap,
    query: Option<String>,
    body: Body,
) -> Result<Response, ApiError> {
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
    state.publish_limiter().take(&key, state.config().limits.publish_rate_per_key, 1)?;
    let valid = validate_publish(body.into_single()?)?;
    let channel = valid.channel;
    let request = PublishRequest {
        channel: channel.clone(),
        event: valid.event,
        data: valid.data,
        idempotency_key: valid.idempotency_key,
        correlation_id: correlation_id(&headers)?,
        receipt: None,
        trace_parent: None,
    };
    let correlation = request.correlation_id.clone();
    // With trace export on, the publish runs inside a span whose context travels with the publication.
    let span = crate::telemetry::publish_span(&headers, channel.as_str(), &correlation);
    let mut request = request;
    request.trace_parent = span.as_ref().and_then(crate::telemetry::traceparent_of).map(Arc::from);
    let span = span.unwrap_or_else(tracing::Span::none);
    if !await_delivery {
        let outcome = state.hub().publish(request).instrument(span).await?;
        tracing::debug!(correlation_id = %correlation, %channel, offset = outcome.position.offset,
            duplicate = outcome.duplicate, "published");
        return Ok(Json(outcome_json(&channel, &outcome)).into_response());
    }
    let (outcome, report) =
        state.hub().publish_awaiting_delivery(request, Duration::from_millis(timeout_ms)).instrument(span).await?;
    let mut answer = outcome_json(&channel, &outcome);
    answer["delivery"] =
        json!({"connections": report.connections, "nodes": report.nodes, "timed_out": report.timed_out});
    Ok(Json(answer).into_response())
}

/// `POST /v1/publish` with `{"publications":[…]}`: each item is published as a single publish would be
/// (the request's correlation ID on each), items of one channel one after another in the order given,
/// channels concurrently (a networked engine pipelines them); one answer item per publication, in order,
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
    state.publish_limiter().take(key, state.config().limits.publish_rate_per_key, items.len() as u64)?;
    let correlation = correlation_id(headers)?;
    let mut results: Vec<Option<Value>> = vec![None; items.len()];
    // Per channel, the valid items in the order given.
    let mut by_channel: Vec<(ChannelName, Vec<(usize, PublishRequest)>)> = Vec::new();
    for (index, item) in items.iter().enumerate() {
        let body = match decode_json::<PublishBody>(item.get().as_bytes()) {
            Ok(body) => body,
            Err(error) => {
                results[index] = Some(json!({"channel": Value::Null, "error": error.body()["error"]}));
                continue;
            }
        };
        let name = body.channel.clone();
        let valid = match validate_publish(body) {
            Ok(valid) => valid,
            Err(error) => {
                results[index] = Some(json!({"channel": name, "error": error.body()["error"]}));
                continue;
            }
        };
        let request = PublishRequest {
            channel: valid.channel.clone(),
            event: valid.event,
            data: valid.data,
            idempotency_key: valid.idempotency_key,
            correlation_id: correlation.clone(),
            receipt: None,
            trace_parent: None,
        };
        match by_channel.iter_mut().find(|(channel, _)| *channel == valid.channel) {
            Some((_, requests)) => requests.push((index, request)),
            None => by_channel.push((valid.channel, vec![(index, request)])),
        }
    }
    let channels = by_channel.into_iter().map(|(channel, requests)| async move {
        let mut answers = Vec::with_capacity(requests.len());
        for (index, request) in requests {
            let answer = match state.hub().publish(request).await {
                Ok(outcome) => outcome_json(&channel, &outcome),
                Err(error) => {
                    let error = ApiError::from(error);
                    state.metrics().refused(error.code());
                    json!({"channel": channel, "error": error.body()["error"]})
                }
            };
            answers.push((index, answer));
        }
        answers
    });
    let answered: Vec<Vec<(usize, Value)>> =
        futures_util::stream::iter(channels).buffer_unordered(BROADCAST_CONCURRENCY).collect().await;
    for (index, answer) in answered.into_iter().flatten() {
        results[index] = Some(answer);
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
    state.publish_limiter().take(&key, state.config().limits.publish_rate_per_key, body.channels.len() as u64)?;
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
            let request = PublishRequest {
                channel: channel.clone(),
                event,
                data,
                idempotency_key: None,
                correlation_id: correlation,
                receipt: None,
                trace_parent: None,
            };
            match state.hub().publish(request).await {
                Ok(outcome) => outcome_json(&channel, &outcome),
                Err(error) => {
                    state.metrics().refused("engine_unavailable");
                    json!({"channel": channel, "error": ApiError::from(error).body()["error"]})
                }
            }
        }
    });
    let results: Vec<Value> = futures_util::stream::iter(publishes).buffered(BROADCAST_CONCURRENCY).collect().await;
    Ok(Json(json!({ "results": results })).into_response())
}

/// Publishes of one broadcast in flight at once.
const BROADCAST_CONCURRENCY: usize = 64;

/// `GET /v1/history?channel=…&since_epoch=…&since_offset=…&limit=…`
///
/// The answer is bounded in bytes as well as by `limit`: publications go in oldest first and stop
/// before the one that would take it over `limits.max_history_response_bytes` (the first always goes
/// in, so a client always moves on). `epoch` and `offset` are the channel's current top, not the last
/// publication's: when the last offset received is below `offset`, the client pages on with
/// `since_epoch=<epoch>&since_offset=<last offset received>`.
pub async fn history(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let pairs = query_pairs(&query);
    let channel = channel_param(&pairs)?;
    let limit: usize = number(&pairs, "limit")?.unwrap_or(DEFAULT_HISTORY_LIMIT);
    if limit == 0 || limit > MAX_HISTORY_LIMIT {
        return Err(ApiError::BadRequest(format!("limit must be 1 to {MAX_HISTORY_LIMIT}")));
    }
    let since = match (single(&pairs, "since_epoch")?, number::<u64>(&pairs, "since_offset")?) {
        (None, None) => None,
        (Some(epoch), Some(offset)) => Some(Position::new(Epoch::parse(epoch)?, offset)),
        _ => return Err(ApiError::BadRequest("since_epoch and since_offset go together".into())),
    };
    // Held until the answer is sent: a bounded number of answers hold memory at once.
    let permit = tokio::time::timeout(HISTORY_READ_WAIT, state.history_reads().clone().acquire_owned())
        .await
        .ok()
        .and_then(Result::ok)
        .ok_or_else(|| {
            ApiError::Limit(format!(
                "more than {} history reads at once on this node; retry shortly",
                state.config().limits.max_concurrent_history_reads
            ))
        })?;
    match state.hub().history(&channel, since.as_ref(), limit).await? {
        History::Covered { top, publications } => {
            let max_bytes = state.config().limits.max_history_response_bytes;
            Ok(HistoryBody::answer(&channel, &top, &publications, max_bytes, permit))
        }
        History::Gone { .. } => Err(ApiError::HistoryGone),
    }
}

/// A `/v1/history` answer written from the stored envelopes themselves, never re-parsed: each
/// publication is exactly the bytes subscribers got (whatever its depth, numbers, escapes or duplicate
/// keys), and the envelopes are shared `Bytes` (the engine's, for the memory engine), so concurrent
/// answers copy nothing but hyper's write buffer. The length is known up front (`Content-Length`), and
/// bounded (see [`history`]).
struct HistoryBody {
    /// `{"channel":…,"epoch":…,"offset":…,"publications":[`, then envelopes and commas, then `]}`.
    chunks: VecDeque<Bytes>,
    remaining: u64,
    /// This answer's share of `limits.max_concurrent_history_reads`, returned when the body is dropped.
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl HistoryBody {
    fn answer(
        channel: &ChannelName,
        top: &Position,
        publications: &[Arc<Publication>],
        max_bytes: usize,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Response {
        let chunks = history_chunks(channel, top, publications, max_bytes);
        let remaining = chunks.iter().map(|c| c.len() as u64).sum();
        let body = Body::new(HistoryBody { chunks, remaining, _permit: permit });
        ([(header::CONTENT_TYPE, "application/json")], body).into_response()
    }
}

/// The pieces of a `/v1/history` answer, in order (for the handler, tests and fuzzing): the head
/// `{"channel":…,"epoch":…,"offset":…,"publications":[`, the envelopes of `publications` (oldest first,
/// as many as fit `max_bytes` in all, at least one) separated by commas, and `]}`. The envelopes are the
/// stored `Bytes` themselves.
pub fn history_chunks(
    channel: &ChannelName,
    top: &Position,
    publications: &[Arc<Publication>],
    max_bytes: usize,
) -> VecDeque<Bytes> {
    // Channel names and epochs are JSON strings as they are (no quotes, backslashes or control
    // characters); encoding them anyway keeps that true if their rules change.
    let head = format!(
        "{{\"channel\":{},\"epoch\":{},\"offset\":{},\"publications\":[",
        Value::from(channel.as_str()),
        Value::from(top.epoch.as_str()),
        top.offset
    );
    const TAIL: &[u8] = b"]}";
    let mut size = head.len() + TAIL.len();
    let mut chunks = VecDeque::with_capacity(publications.len() * 2 + 2);
    chunks.push_back(Bytes::from(head));
    for (index, publication) in publications.iter().enumerate() {
        let envelope = publication.envelope();
        let added = envelope.len() + usize::from(index > 0);
        if index > 0 && size + added > max_bytes {
            break;
        }
        if index > 0 {
            chunks.push_back(Bytes::from_static(b","));
        }
        chunks.push_back(envelope.clone());
        size += added;
    }
    chunks.push_back(Bytes::from_static(TAIL));
    chunks
}

impl hyper::body::Body for HistoryBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let chunk = this.chunks.pop_front();
        if let Some(chunk) = &chunk {
            this.remaining = this.remaining.saturating_sub(chunk.len() as u64);
        }
        Poll::Ready(chunk.map(|chunk| Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

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

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
