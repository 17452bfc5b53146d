//! Publications and their wire envelope.
//!
//! A [`Publication`] is immutable once made and shared as `Arc<Publication>` by every connection that
//! delivers it. Its JSON envelope is encoded exactly once, when the publication is made (or received
//! from another node), so fan-out copies pointers, never JSON.

use std::borrow::Cow;
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
    /// The envelope's `data` alone (a slice of `envelope`, for compact SSE), found on first use.
    payload: std::sync::OnceLock<Bytes>,
}

/// The one field compact SSE needs, borrowed from the envelope.
#[derive(Deserialize)]
struct PayloadIn<'a> {
    #[serde(borrow)]
    data: &'a RawValue,
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
#[derive(Debug, PartialEq, Deserialize)]
struct EnvelopeIn<'a> {
    channel: ChannelName,
    epoch: Epoch,
    offset: u64,
    #[serde(borrow)]
    event: &'a str,
    correlation_id: &'a str,
    published_at: &'a str,
}

/// The fields [`Publication::from_envelope`] needs, read straight from the layout Herald writes
/// ([`EnvelopeOut`]'s order, which the Redis publish script follows too) without a general JSON parse:
/// the most frequent work of a node that receives publications. Each string but `data` ends at its first
/// quote, and must hold no backslash, so it is exactly what a JSON parser would read; the last two are
/// found from the end (each value runs from the last quote before it), and `data` is what lies between
/// `"data":` and them, which must be one JSON value. `None` for anything else (another order,
/// whitespace, escapes, extra fields, a field its rule refuses): the caller then parses the envelope in
/// full, and that decides.
fn read_own_layout(text: &str) -> Option<EnvelopeIn<'_>> {
    // What a JSON string holds unchanged: no escape, no control character.
    let plain = |s: &str| !s.bytes().any(|b| b == b'\\' || b < 0x20);
    let (channel, rest) = text.strip_prefix(r#"{"channel":""#)?.split_once('"')?;
    let (epoch, rest) = rest.strip_prefix(r#","epoch":""#)?.split_once('"')?;
    let rest = rest.strip_prefix(r#","offset":"#)?;
    let (offset, rest) = rest.split_at(rest.bytes().take_while(u8::is_ascii_digit).count());
    if offset.len() > 1 && offset.starts_with('0') {
        return None;
    }
    let offset: u64 = offset.parse().ok()?;
    let (event, rest) = rest.strip_prefix(r#","event":""#)?.split_once('"')?;
    // From the end: each of the last two values runs from the last quote before it.
    let rest = rest.strip_prefix(r#","data":"#)?.strip_suffix(r#""}"#)?;
    let quote = rest.rfind('"')?;
    let (rest, published_at) = (rest[..quote].strip_suffix(r#"","published_at":"#)?, &rest[quote + 1..]);
    let quote = rest.rfind('"')?;
    let (data, correlation_id) = (rest[..quote].strip_suffix(r#","correlation_id":"#)?, &rest[quote + 1..]);
    // Channel and epoch are checked by their own rules below, which allow neither.
    if ![event, correlation_id, published_at].iter().all(|field| plain(field)) {
        return None;
    }
    serde_json::from_str::<serde::de::IgnoredAny>(data).ok()?;
    Some(EnvelopeIn {
        channel: ChannelName::parse(channel).ok()?,
        epoch: Epoch::parse(epoch).ok()?,
        offset,
        event,
        correlation_id,
        published_at,
    })
}

/// Whether [`read_own_layout`] agrees with the full JSON parse on `text`: it leaves the envelope to the
/// parser, or reads exactly the fields the parser reads (the envelope fuzz target checks this).
#[doc(hidden)]
pub fn own_layout_agrees(text: &str) -> bool {
    match read_own_layout(text) {
        None => true,
        Some(fast) => serde_json::from_str::<EnvelopeIn<'_>>(text).ok().as_ref() == Some(&fast),
    }
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
    /// Publication data that is not JSON once compacted (cannot happen for data serde_json accepted).
    #[error("data is not valid JSON: {0}")]
    InvalidData(String),
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
            payload: std::sync::OnceLock::new(),
        }
    }

    /// Rebuilds a publication from an envelope made by [`Publication::new`] (for example on another node).
    ///
    /// Only the envelope's own fields are decoded; `data` is skipped (serde's `IgnoredAny`, which
    /// serde_json skips without recursion, so no depth limit applies) and kept as the bytes it is, so
    /// data of any depth, number size, escapes or duplicate keys reads back unchanged. The whole envelope
    /// must be UTF-8 (serde_json does not check skipped strings), since it is sent as SSE and WebSocket text.
    pub fn from_envelope(envelope: Bytes, receipt: Option<u64>) -> Result<Self, PublicationError> {
        let text = std::str::from_utf8(&envelope).map_err(|e| PublicationError::InvalidEnvelope(e.to_string()))?;
        let parsed: EnvelopeIn<'_> = match read_own_layout(text) {
            Some(parsed) => parsed,
            None => serde_json::from_str(text).map_err(|e| PublicationError::InvalidEnvelope(e.to_string()))?,
        };
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
            payload: std::sync::OnceLock::new(),
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

    /// The publication's `data`, exactly as it stands in the envelope (compact JSON on one line),
    /// sharing the envelope's memory. Found by the first connection that needs it.
    pub fn payload(&self) -> &Bytes {
        self.payload.get_or_init(|| {
            // Every envelope was made by `new` or checked by `from_envelope`, so it has a `data` field;
            // `null` stands in should that ever not hold.
            match serde_json::from_slice::<PayloadIn<'_>>(&self.envelope) {
                Ok(parsed) => self.envelope.slice_ref(parsed.data.get().as_bytes()),
                Err(_) => Bytes::from_static(b"null"),
            }
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

/// `raw` without the whitespace between its tokens, so it fits one SSE `data:` line.
///
/// Only spaces, tabs and line breaks outside strings are removed; every other byte stays as the publisher
/// sent it (numbers of any size or precision, escapes such as lone surrogates, key order, duplicate keys,
/// any depth), so what subscribers, recovery and history hand out is exactly what was accepted. JSON
/// strings cannot hold a raw line break, so the result has none. Nothing is parsed into values, so
/// nothing here can fail on valid JSON; the error exists only because the result is checked once more
/// when it becomes a `RawValue`.
pub fn compact_json(raw: Box<RawValue>) -> Result<Box<RawValue>, PublicationError> {
    let compact = match minify_json(raw.get().as_bytes()) {
        Cow::Borrowed(_) => return Ok(raw),
        Cow::Owned(bytes) => bytes,
    };
    let text = String::from_utf8(compact).map_err(|e| PublicationError::InvalidData(e.to_string()))?;
    RawValue::from_string(text).map_err(|e| PublicationError::InvalidData(e.to_string()))
}

/// JSON text without whitespace outside strings (space, tab, line feed, carriage return: JSON's only
/// whitespace), byte for byte otherwise. Borrows the input when there is nothing to remove. Works on any
/// bytes: inside a string a backslash escapes the next byte, a quote ends it; nothing else is looked at.
pub fn minify_json(text: &[u8]) -> Cow<'_, [u8]> {
    let mut out: Option<Vec<u8>> = None;
    let (mut in_string, mut escaped) = (false, false);
    for (index, &byte) in text.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = false;
            }
        } else if byte == b'"' {
            in_string = true;
        } else if matches!(byte, b' ' | b'\t' | b'\n' | b'\r') {
            out.get_or_insert_with(|| {
                let mut kept = Vec::with_capacity(text.len());
                kept.extend_from_slice(text.get(..index).unwrap_or_default());
                kept
            });
            continue;
        }
        if let Some(out) = out.as_mut() {
            out.push(byte);
        }
    }
    out.map_or(Cow::Borrowed(text), Cow::Owned)
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
    fn the_own_layout_reads_as_the_json_parser_reads_or_leaves_it_to_the_parser() {
        let made = |data: &str| {
            let data = compact_json(RawValue::from_string(data.to_owned()).expect("json")).expect("compact");
            let channel = ChannelName::parse("user:1").expect("channel");
            let position = Position::new(Epoch::parse("e1").expect("epoch"), 7);
            let publication =
                Publication::new(channel, position, "message".into(), &data, "c0ffee".into(), 1_700_000_000_123, None);
            String::from_utf8(publication.envelope().to_vec()).expect("utf-8")
        };
        let mut envelopes: Vec<String> = [
            r#"{"a":[1,2,{"b":null}]}"#,
            r#""text with \"quotes\", a \\ and ,\"correlation_id\":\"x""#,
            r#"{"correlation_id":"inside","published_at":"also"}"#,
            r#"[",\"correlation_id\":\"", "\u00e9 é"]"#,
            "12.5e3",
            "null",
        ]
        .iter()
        .map(|data| made(data))
        .collect();
        let own = envelopes[0].clone();
        envelopes.extend([
            own.replace(r#""offset":7"#, r#""offset":07"#),
            own.replace(r#""offset":7"#, r#""offset": 7"#),
            own.replace("user:1", r#"user:\u0031"#),
            own.replace(r#","event""#, r#","extra":1,"event""#),
            own.replace(r#"},"correlation_id""#, r#"},"more":2,"correlation_id""#),
            own.replace(r#""c0ffee""#, r#""c0\u0066fee""#),
            own.replace(r#""data":{"#, r#""data":{{"#),
            own.replacen('{', "{ ", 1),
            // A control character, which a JSON string may not hold (found by the fuzz target).
            own.replace("c0ffee", "c0\u{1c}ffee"),
        ]);
        let mut read_fast = 0;
        for envelope in &envelopes {
            let parsed: Result<EnvelopeIn<'_>, _> = serde_json::from_str(envelope);
            match read_own_layout(envelope) {
                Some(fast) => {
                    read_fast += 1;
                    assert_eq!(Some(&fast), parsed.as_ref().ok(), "{envelope}");
                }
                None => assert!(
                    envelopes[..6].iter().all(|e| e != envelope),
                    "an envelope Herald made must read without the parser: {envelope}"
                ),
            }
            let back = Publication::from_envelope(Bytes::from(envelope.clone()), None);
            assert_eq!(back.is_ok(), parsed.is_ok(), "{envelope}: {back:?}");
        }
        assert_eq!(read_fast, 6, "only Herald's own layout reads without the parser");
    }

    #[test]
    fn envelope_round_trips_and_is_one_line() {
        let raw = RawValue::from_string("{\n \"a\": [1,\n 2], \"s\": \"x\\ny\"\n}".to_owned()).expect("json");
        let data = compact_json(raw).expect("compact");
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
        assert_eq!(&publication.payload()[..], data.get().as_bytes(), "the payload is data as given");
        assert_eq!(back.payload(), publication.payload());
    }

    #[test]
    fn payload_of_deep_data_read_back_from_an_envelope() {
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let data = compact_json(RawValue::from_string(deep.clone()).expect("json")).expect("compact");
        let publication = Publication::new(
            ChannelName::parse("user:1").expect("channel"),
            Position::new(Epoch::parse("abc").expect("epoch"), 1),
            Arc::from("message"),
            &data,
            Arc::from("corr-1"),
            0,
            None,
        );
        let back = Publication::from_envelope(publication.envelope().clone(), None).expect("parse");
        assert_eq!(&back.payload()[..], deep.as_bytes());
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

    #[test]
    fn compact_json_keeps_every_byte_but_whitespace() {
        let cases = [
            ("{\"id\":123456789012345678901234567890,\"b\":1,\"a\":2,\"a\":3,\"f\":1.0000000000000000000001}", None),
            (
                "{ \"id\" : 123456789012345678901234567890 ,\n \"a\":2,\r\n\t\"a\":3 }",
                Some("{\"id\":123456789012345678901234567890,\"a\":2,\"a\":3}"),
            ),
            ("[1e400,\n-0.0e-999]", Some("[1e400,-0.0e-999]")),
            ("[\"\\ud800 x\",\n \"a \\\" b\",\"\\\\\", 1]", Some("[\"\\ud800 x\",\"a \\\" b\",\"\\\\\",1]")),
        ];
        for (input, expected) in cases {
            let raw = RawValue::from_string(input.to_owned()).expect("valid JSON");
            let compact = compact_json(raw).expect("compact");
            assert_eq!(compact.get(), expected.unwrap_or(input), "{input:?}");
        }
        let deep = format!("{}\n{}", "[".repeat(10_000), "]".repeat(10_000));
        let compact =
            compact_json(RawValue::from_string(deep).expect("raw values have no depth limit")).expect("compact");
        assert_eq!(compact.get(), format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)));
    }

    #[test]
    fn envelopes_of_hostile_data_read_back_byte_for_byte() {
        let deep = format!("{}1{}", "{\"a\":[".repeat(5_000), "]}".repeat(5_000));
        for data in [
            deep.as_str(),
            "1e400",
            "\"\\ud800\"",
            "{\"id\":123456789012345678901234567890,\"b\":1,\"a\":2,\"a\":3,\"f\":1.0000000000000000000001}",
        ] {
            let raw = compact_json(RawValue::from_string(data.to_owned()).expect("json")).expect("compact");
            let publication = Publication::new(
                ChannelName::parse("c").expect("channel"),
                Position::new(Epoch::parse("e").expect("epoch"), 1),
                Arc::from("message"),
                &raw,
                Arc::from("corr"),
                0,
                None,
            );
            let envelope = publication.envelope().clone();
            assert_eq!(data_of(&envelope), data.as_bytes());
            let back =
                Publication::from_envelope(envelope.clone(), None).expect("from_envelope skips data at any depth");
            assert_eq!(back.envelope(), &envelope);
            assert_eq!(data_of(publication.ws_message()), data.as_bytes());
        }
    }

    #[test]
    fn envelopes_that_are_not_utf8_are_refused() {
        let envelope = br#"{"channel":"c","epoch":"e","offset":1,"event":"message","data":"#;
        let mut bytes = envelope.to_vec();
        bytes.extend_from_slice(b"\"\xff\"");
        bytes.extend_from_slice(br#","correlation_id":"c","published_at":"2026-11-28T05:19:46.123Z"}"#);
        let error = Publication::from_envelope(Bytes::from(bytes.clone()), None).err();
        assert!(matches!(error, Some(PublicationError::InvalidEnvelope(_))), "{error:?}");
        let valid = String::from_utf8_lossy(&bytes).replace('\u{fffd}', "x");
        assert!(Publication::from_envelope(Bytes::from(valid), None).is_ok());
    }

    /// The `data` member of an envelope, as bytes: everything between `"data":` and `,"correlation_id"`.
    fn data_of(envelope: &[u8]) -> &[u8] {
        let text = std::str::from_utf8(envelope).expect("utf8");
        let start = text.find("\"data\":").expect("data") + 7;
        let end = text.rfind(",\"correlation_id\"").expect("correlation_id");
        &envelope[start..end]
    }

    mod minify {
        use super::super::minify_json;
        use proptest::prelude::*;
        use serde_json::Value;

        fn whitespace() -> impl Strategy<Value = String> {
            "[ \t\n\r]{0,3}"
        }

        /// JSON text as a publisher may write it: whitespace anywhere between tokens, numbers of any size,
        /// escapes (lone surrogates too), duplicate keys.
        fn json_text() -> impl Strategy<Value = String> {
            let string = r#""([^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*""#;
            let leaf = prop_oneof![
                Just("null".to_owned()),
                Just("true".to_owned()),
                Just("false".to_owned()),
                "-?(0|[1-9][0-9]{0,40})(\\.[0-9]{1,30})?([eE][+-]?[0-9]{1,4})?",
                string,
            ];
            leaf.prop_recursive(6, 64, 6, move |inner| {
                let member = (whitespace(), string, whitespace(), whitespace(), inner.clone(), whitespace())
                    .prop_map(|(a, key, b, c, value, d)| format!("{a}{key}{b}:{c}{value}{d}"));
                let element = (whitespace(), inner, whitespace()).prop_map(|(a, value, b)| format!("{a}{value}{b}"));
                prop_oneof![
                    (prop::collection::vec(element, 0..6), whitespace()).prop_map(|(items, ws)| if items.is_empty() {
                        format!("[{ws}]")
                    } else {
                        format!("[{}]", items.join(","))
                    }),
                    (prop::collection::vec(member, 0..6), whitespace()).prop_map(|(items, ws)| if items.is_empty() {
                        format!("{{{ws}}}")
                    } else {
                        format!("{{{}}}", items.join(","))
                    }),
                ]
            })
        }

        fn value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
                any::<String>().prop_map(Value::from),
            ];
            leaf.prop_recursive(5, 64, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                    prop::collection::btree_map(any::<String>(), inner, 0..6)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        fn has_whitespace_outside_strings(text: &[u8]) -> bool {
            let (mut in_string, mut escaped) = (false, false);
            text.iter().any(|&b| {
                let outside = !in_string;
                if in_string {
                    if escaped {
                        escaped = false;
                    } else if b == b'\\' {
                        escaped = true;
                    } else if b == b'"' {
                        in_string = false;
                    }
                } else if b == b'"' {
                    in_string = true;
                }
                outside && b" \t\n\r".contains(&b)
            })
        }

        /// What every input must satisfy: parseable input keeps its value, and input without whitespace
        /// outside strings comes back identical (borrowed, not copied).
        fn check(input: &[u8]) {
            let output = minify_json(input);
            if let Ok(before) = serde_json::from_slice::<Value>(input) {
                let after: Value = serde_json::from_slice(&output).expect("minified JSON parses");
                assert_eq!(before, after);
            }
            if serde_json::from_slice::<serde::de::IgnoredAny>(input).is_ok() {
                assert!(!output.contains(&b'\n') && !output.contains(&b'\r'), "{:?}", String::from_utf8_lossy(&output));
                assert!(!has_whitespace_outside_strings(&output));
            }
            if !has_whitespace_outside_strings(input) {
                assert!(matches!(output, std::borrow::Cow::Borrowed(_)));
                assert_eq!(&*output, input);
            }
        }

        proptest! {
            #[test]
            fn json_with_whitespace_keeps_its_value_and_loses_its_line_breaks(text in json_text()) {
                prop_assert!(serde_json::from_str::<serde::de::IgnoredAny>(&text).is_ok(), "generator makes JSON: {text:?}");
                check(text.as_bytes());
            }

            #[test]
            fn pretty_json_minifies_to_serde_json_compact_output(value in value()) {
                let pretty = serde_json::to_string_pretty(&value).expect("serialize");
                let compact = serde_json::to_string(&value).expect("serialize");
                prop_assert_eq!(&*minify_json(pretty.as_bytes()), compact.as_bytes());
                check(pretty.as_bytes());
                check(compact.as_bytes());
            }

            #[test]
            fn any_bytes_are_handled(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
                check(&bytes);
            }

            #[test]
            fn any_text_is_handled(text in any::<String>()) {
                check(text.as_bytes());
            }
        }
    }
}
