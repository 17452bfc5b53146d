//! Publications and their wire envelope.
//!
//! A [`Publication`] is immutable once made and shared as `Arc<Publication>` by every connection that
//! delivers it. Its JSON envelope is encoded exactly once, when the publication is made (or received
//! from another node), so fan-out copies pointers, never JSON.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::channel::ChannelName;
use crate::position::{Epoch, Position};

/// Event name used when a publisher gives none.
pub const DEFAULT_EVENT: &str = "message";
/// Longest event name, in bytes.
pub const MAX_EVENT_BYTES: usize = 64;
/// Longest correlation ID kept from a caller, in bytes.
pub const MAX_CORRELATION_ID_BYTES: usize = 128;

/// One message in a channel, with its position.
#[derive(Debug)]
pub struct Publication {
    pub channel: ChannelName,
    pub position: Position,
    pub event: Arc<str>,
    pub correlation_id: Arc<str>,
    /// Milliseconds since the Unix epoch, set by the engine when the publication was accepted.
    pub published_at_ms: u64,
    /// Asks the delivering hub to count writes for a publisher awaiting delivery (never sent to clients).
    pub receipt: Option<u64>,
    /// W3C `traceparent` of the publish span, when traces are exported (never sent to clients).
    pub trace_parent: Option<Arc<str>>,
    /// `{"channel":…,"epoch":…,"offset":…,"event":…,"data":…,"correlation_id":…,"published_at":…}`,
    /// compact JSON without newlines, so it fits on one SSE `data:` line.
    envelope: Bytes,
    /// The WebSocket message (`{"type":"message",…envelope fields…}`), made once, on first use.
    ws_message: std::sync::OnceLock<Bytes>,
}

#[derive(Serialize)]
struct EnvelopeOut<'a> {
    channel: &'a str,
    epoch: &'a str,
    offset: u64,
    event: &'a str,
    data: &'a RawValue,
    correlation_id: &'a str,
    published_at: String,
}

/// The envelope as read back from another node or from history.
#[derive(Deserialize)]
struct EnvelopeIn<'a> {
    channel: ChannelName,
    epoch: Epoch,
    offset: u64,
    #[serde(borrow)]
    event: &'a str,
    correlation_id: &'a str,
    published_at: &'a str,
}

/// Why an envelope or a field of a publication is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublicationError {
    #[error(
        "event name must be 1 to {MAX_EVENT_BYTES} characters of A-Z a-z 0-9 _ - . : and must not start with \"herald.\""
    )]
    InvalidEvent,
    #[error("correlation ID must be 1 to {MAX_CORRELATION_ID_BYTES} printable ASCII characters")]
    InvalidCorrelationId,
    #[error("envelope is not valid: {0}")]
    InvalidEnvelope(String),
}

impl Publication {
    /// Makes a publication and encodes its envelope. `data` must be compact JSON (see [`compact_json`]).
    pub fn new(
        channel: ChannelName,
        position: Position,
        event: Arc<str>,
        data: &RawValue,
        correlation_id: Arc<str>,
        published_at_ms: u64,
        receipt: Option<u64>,
    ) -> Self {
        let out = EnvelopeOut {
            channel: channel.as_str(),
            epoch: position.epoch.as_str(),
            offset: position.offset,
            event: &event,
            data,
            correlation_id: &correlation_id,
            published_at: format_timestamp(published_at_ms),
        };
        // Serialising borrowed strings and a raw value into a Vec cannot fail.
        let envelope = serde_json::to_vec(&out).map(Bytes::from).unwrap_or_default();
        Self {
            channel,
            position,
            event,
            correlation_id,
            published_at_ms,
            receipt,
            trace_parent: None,
            envelope,
            ws_message: std::sync::OnceLock::new(),
        }
    }

    /// Rebuilds a publication from an envelope made by [`Publication::new`] (for example on another node).
    pub fn from_envelope(envelope: Bytes, receipt: Option<u64>) -> Result<Self, PublicationError> {
        let parsed: EnvelopeIn<'_> =
            serde_json::from_slice(&envelope).map_err(|e| PublicationError::InvalidEnvelope(e.to_string()))?;
        let published_at = humantime::parse_rfc3339(parsed.published_at)
            .map_err(|e| PublicationError::InvalidEnvelope(e.to_string()))?;
        let published_at_ms = published_at.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let event = validate_event(parsed.event)?;
        let correlation_id = validate_correlation_id(parsed.correlation_id)?;
        Ok(Self {
            channel: parsed.channel,
            position: Position::new(parsed.epoch, parsed.offset),
            event,
            correlation_id,
            published_at_ms,
            receipt,
            trace_parent: None,
            envelope,
            ws_message: std::sync::OnceLock::new(),
        })
    }

    /// Attaches the publisher's trace context (set by the engine when it makes the publication).
    pub fn with_trace_parent(mut self, trace_parent: Option<Arc<str>>) -> Self {
        self.trace_parent = trace_parent;
        self
    }

    /// The envelope JSON, shared.
    pub fn envelope(&self) -> &Bytes {
        &self.envelope
    }

    /// The envelope as a WebSocket `message`: the `type` field spliced in front of the envelope's
    /// fields. Made by the first connection that needs it; every other one shares it.
    pub fn ws_message(&self) -> &Bytes {
        self.ws_message.get_or_init(|| {
            let mut text = Vec::with_capacity(self.envelope.len() + 17);
            text.extend_from_slice(b"{\"type\":\"message\",");
            text.extend_from_slice(self.envelope.get(1..).unwrap_or(b"}"));
            Bytes::from(text)
        })
    }
}

/// Checks an event name: 1..=64 of `A-Z a-z 0-9 _ - . :`, not in the reserved `herald.` space.
pub fn validate_event(event: &str) -> Result<Arc<str>, PublicationError> {
    let ok = !event.is_empty()
        && event.len() <= MAX_EVENT_BYTES
        && !event.starts_with("herald.")
        && event.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'));
    if ok { Ok(Arc::from(event)) } else { Err(PublicationError::InvalidEvent) }
}

/// Checks a correlation ID: 1..=128 printable ASCII characters (no spaces, quotes or backslashes).
pub fn validate_correlation_id(id: &str) -> Result<Arc<str>, PublicationError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_CORRELATION_ID_BYTES
        && id.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\');
    if ok { Ok(Arc::from(id)) } else { Err(PublicationError::InvalidCorrelationId) }
}

/// Returns `raw` if it holds no line break, else the same value re-encoded compactly.
/// JSON strings cannot contain raw line breaks, so a line break can only be whitespace between tokens.
pub fn compact_json(raw: Box<RawValue>) -> Box<RawValue> {
    if !raw.get().contains(['\n', '\r']) {
        return raw;
    }
    serde_json::from_str::<serde_json::Value>(raw.get())
        .ok()
        .and_then(|value| serde_json::value::to_raw_value(&value).ok())
        .unwrap_or(raw)
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Microseconds since the Unix epoch, now.
pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-28T05:19:46.123Z`.
pub fn format_timestamp(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips_and_is_one_line() {
        let raw = RawValue::from_string("{\n \"a\": [1,\n 2], \"s\": \"x\\ny\"\n}".to_owned()).expect("json");
        let data = compact_json(raw);
        let publication = Publication::new(
            ChannelName::parse("user:1").expect("channel"),
            Position::new(Epoch::parse("abc").expect("epoch"), 7),
            Arc::from("message"),
            &data,
            Arc::from("corr-1"),
            1_700_000_000_123,
            None,
        );
        let text = std::str::from_utf8(publication.envelope()).expect("utf8");
        assert!(!text.contains('\n'), "{text}");
        let value: serde_json::Value = serde_json::from_str(text).expect("json");
        assert_eq!(value["offset"], 7);
        assert_eq!(value["data"]["s"], "x\ny");
        assert_eq!(value["published_at"], "2023-11-14T22:13:20.123Z");
        let back = Publication::from_envelope(publication.envelope().clone(), None).expect("parse");
        assert_eq!(back.position, publication.position);
        assert_eq!(back.published_at_ms, publication.published_at_ms);
        assert_eq!(back.envelope(), publication.envelope());
        let ws: serde_json::Value = serde_json::from_slice(publication.ws_message()).expect("ws message is JSON");
        assert_eq!(ws["type"], "message");
        let mut without_type = ws.clone();
        without_type.as_object_mut().map(|fields| fields.remove("type"));
        assert_eq!(without_type, value, "the WebSocket message is the envelope plus its type");
    }

    #[test]
    fn event_and_correlation_rules() {
        assert!(validate_event("order.updated").is_ok());
        for bad in ["", "herald.reset", "a b", "a\nb", &"e".repeat(65)] {
            assert!(validate_event(bad).is_err(), "{bad:?}");
        }
        assert!(validate_correlation_id("00-abc-01").is_ok());
        for bad in ["", "a b", "a\"b", &"c".repeat(129)] {
            assert!(validate_correlation_id(bad).is_err(), "{bad:?}");
        }
    }
}
