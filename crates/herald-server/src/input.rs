//! Request input, parsed by hand so that every bad input gets the contract's JSON error with a precise
//! code: JSON bodies (content type, size, deadline and minimum rate, syntax versus shape) and query
//! strings (single parameters, numbers, the `channel` parameter).

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, header};
use futures_util::StreamExt;
use herald_core::ChannelName;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::state::AppState;

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
pub fn decode_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|error| match error.classify() {
        serde_json::error::Category::Data => ApiError::InvalidBody(error.to_string()),
        _ => ApiError::MalformedJson(error.to_string()),
    })
}

/// The query string as key-value pairs.
pub fn query_pairs(query: &Option<String>) -> Vec<(String, String)> {
    query.as_deref().map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect()).unwrap_or_default()
}

pub fn single<'a>(pairs: &'a [(String, String)], key: &str) -> Result<Option<&'a str>, ApiError> {
    let mut values = pairs.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str());
    let first = values.next();
    if values.next().is_some() {
        return Err(ApiError::BadRequest(format!("query parameter {key} given more than once")));
    }
    Ok(first)
}

/// The required `channel` query parameter, validated.
pub fn channel_param(pairs: &[(String, String)]) -> Result<ChannelName, ApiError> {
    let name = single(pairs, "channel")?.ok_or(ApiError::BadRequest("channel is required".into()))?;
    Ok(ChannelName::parse(name)?)
}

pub fn number<T: std::str::FromStr>(pairs: &[(String, String)], key: &str) -> Result<Option<T>, ApiError> {
    single(pairs, key)?
        .map(|v| {
            v.parse::<T>()
                .map_err(|_| ApiError::BadRequest(format!("query parameter {key} must be a non-negative integer")))
        })
        .transpose()
}
