//! `GET /v1/sse`: a Server-Sent Events stream over one session.
//!
//! The response body is a stream that owns the [`Session`]; when the client goes away hyper drops the
//! body and the session's `Drop` removes the connection from the hub at once. Queued publications are
//! read in batches and written as one chunk per batch. Every event carries `id: <cursor>`, the
//! position of every channel of the connection right after that event, so `Last-Event-ID` resumes
//! exactly where the client stopped. The first event (`herald.connected`) carries the starting cursor.

use std::convert::Infallible;
use std::net::SocketAddr;

use axum::body::{Body, Bytes};
use std::sync::Arc;

use axum::Extension;
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use herald_core::position::CursorEncoder;
use herald_core::{ChannelName, CloseReason, Outbound, Position, Session, SessionEvent, Transport, decode_cursor};
use serde_json::json;
use tokio::time::{Interval, MissedTickBehavior};

use crate::error::ApiError;
use crate::input::query_pairs;
use crate::socket::{ClientAddr, KillSwitch};
use crate::state::AppState;

/// Most queued publications taken from the queue at once.
pub const MAX_BATCH: usize = 256;
/// A chunk stops growing past this many bytes (the rest of a batch follows in the next chunk).
pub const MAX_CHUNK_BYTES: usize = 64 * 1024;

/// `GET /v1/sse?channel=A[&channel=B…][&last_event_id=…]` through axum (used when the router is
/// embedded in another application; the `herald` server answers SSE on its own accept loop, see
/// `serve.rs`).
pub async fn handler(
    State(state): State<AppState>,
    kill: Option<Extension<Arc<KillSwitch>>>,
    peer: Option<Extension<ClientAddr>>,
    connect_info: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let peer = crate::socket::peer_of(peer, connect_info);
    let stream = open(&state, kill.map(|Extension(kill)| kill), &headers, query, peer).await?;
    let body = Body::from_stream(futures_util::stream::unfold(stream, |mut stream| async move {
        stream.next_chunk().await.map(|chunk| (Ok::<_, Infallible>(chunk), stream))
    }));
    let mut response = body.into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// Checks an SSE request and subscribes its connection: either the stream to write (its first chunk is
/// `herald.connected` and any replayed events) or the error to answer with. `peer` is the client's
/// address (told to the proxies' backend), when known.
pub async fn open(
    state: &AppState,
    kill: Option<Arc<KillSwitch>>,
    headers: &HeaderMap,
    query: Option<String>,
    peer: Option<SocketAddr>,
) -> Result<SseStream, ApiError> {
    if state.draining() {
        return Err(ApiError::Unavailable("node is draining".into()));
    }
    let pairs = query_pairs(&query);
    let SseQuery { channels, token, format } = parse_query(&pairs, state.hub().config().max_channels_per_connection)?;
    let header_cursor = headers
        .get("last-event-id")
        .map(|v| v.to_str().map_err(|_| ApiError::BadRequest("Last-Event-ID must be ASCII".into())));
    let cursor = match header_cursor.transpose()? {
        Some(text) if !text.is_empty() => Some(text.to_owned()),
        _ => pairs.iter().find(|(k, v)| k == "last_event_id" && !v.is_empty()).map(|(_, v)| v.clone()),
    };
    let since: Option<Vec<Position>> = cursor.map(|c| decode_cursor(&c, &channels)).transpose()?;

    let forwarded = state.proxy().forwarded(headers, peer);
    let identity = state.identify(headers, token, &channels, &forwarded).await?;
    // Every channel must be allowed (only the channels asked for are subscribed, whatever a grant
    // holds); those the subscribe proxy decides are asked at once.
    futures_util::future::try_join_all(channels.iter().map(|channel| state.authorize(&identity, channel, &forwarded)))
        .await?;
    let mut session = state.hub().open_session(Transport::Sse, identity.user.clone())?;
    if let Some(kill) = kill {
        // A client too slow to keep up must go now, even while hyper is blocked writing to it; it resumes
        // from its cursor. Other closes end the stream gracefully (the write timeout bounds them).
        session.on_close(Box::new(move |reason| {
            if reason == CloseReason::SlowConsumer {
                kill.kill();
            }
        }));
    }
    let mut initial = Vec::new();
    let mut start = Vec::with_capacity(channels.len());
    for (index, channel) in channels.iter().enumerate() {
        let from = since.as_ref().map(|positions| positions[index].clone());
        let before = initial.len();
        let position = if state.config().is_latest(channel) {
            session.subscribe_latest(channel.clone(), from.clone(), &mut initial).await?
        } else {
            session.subscribe(channel.clone(), from.clone(), &mut initial).await?
        };
        // A latest value handed out to a client without a cursor: `herald.connected` carries the
        // position just before it, so a client that drops before reading it gets it again on resume.
        let latest_handed_out = from.is_none() && initial.len() > before;
        start.push(match from {
            Some(from) => from,
            None if latest_handed_out => Position::new(position.epoch.clone(), position.offset.saturating_sub(1)),
            None => position,
        });
    }
    let encoder = CursorEncoder::new(&channels);
    let config = &state.config().sse;
    let mut first = Vec::with_capacity(512);
    first.extend_from_slice(format!("retry: {}\n", config.retry_ms).as_bytes());
    let connected = json!({"node": state.hub().node_id(), "connection_id": session.id(), "channels": channels});
    let mut cursor = Vec::with_capacity(64);
    encoder.write(&mut cursor, &start);
    put_event(&mut first, &cursor, "herald.connected", connected.to_string().as_bytes());
    let mut stream = SseStream {
        session,
        channels,
        positions: start,
        encoder,
        batch: Vec::new(),
        // Replayed events follow `herald.connected` in bounded chunks, each cursor advancing its own
        // channel from the start positions.
        events: initial,
        sent: 0,
        // Checked every half interval: a stream silent since the last check gets a ping, so no stream is
        // ever silent for a whole interval (the promise), at the cost of a check twice as often.
        ping: tokio::time::interval_at(
            tokio::time::Instant::now() + state.settings().ping_interval() / 2,
            state.settings().ping_interval() / 2,
        ),
        wrote_since_ping: true,
        expiry: identity.expires_in().map(|left| Box::pin(tokio::time::sleep(left))),
        first: None,
        done: false,
        format,
    };
    stream.ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    stream.first = Some(Bytes::from(first));
    Ok(stream)
}

/// The channels of an SSE request (sorted, without repeats, at most `max`) and its `token`, checking
/// that no other parameter is there and none is repeated.
fn parse_query(pairs: &[(String, String)], max: usize) -> Result<SseQuery<'_>, ApiError> {
    let mut channels = Vec::new();
    let mut token = None;
    let mut format = None;
    for (key, value) in pairs {
        match key.as_str() {
            "channel" => channels.push(ChannelName::parse(value)?),
            "token" if token.is_some() => {
                return Err(ApiError::BadRequest("query parameter token given more than once".into()));
            }
            "token" => token = Some(value.as_str()),
            "format" if format.is_some() => {
                return Err(ApiError::BadRequest("query parameter format given more than once".into()));
            }
            "format" => {
                format = Some(match value.as_str() {
                    "envelope" => Format::Envelope,
                    "compact" => Format::Compact,
                    other => {
                        return Err(ApiError::BadRequest(format!("format must be envelope or compact, not {other:?}")));
                    }
                });
            }
            "last_event_id" if pairs.iter().filter(|(k, _)| k == "last_event_id").count() > 1 => {
                return Err(ApiError::BadRequest("query parameter last_event_id given more than once".into()));
            }
            "last_event_id" => {}
            other => return Err(ApiError::BadRequest(format!("unknown query parameter {other:?}"))),
        }
    }
    if channels.is_empty() {
        return Err(ApiError::BadRequest("at least one channel parameter is required".into()));
    }
    channels.sort();
    channels.dedup();
    if channels.len() > max {
        return Err(ApiError::Limit(format!("a connection may hold at most {max} channels")));
    }
    Ok(SseQuery { channels, token, format: format.unwrap_or(Format::Envelope) })
}

/// What an SSE request's query asks for.
struct SseQuery<'a> {
    /// Sorted, without repeats.
    channels: Vec<ChannelName>,
    token: Option<&'a str>,
    format: Format,
}

/// What a publication's `data:` line carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// The whole envelope (the default).
    Envelope,
    /// The publication's `data` alone (`format=compact`); the position is in `id:`, the event name in
    /// `event:`, and Herald's own events are unchanged.
    Compact,
}

/// One subscribed SSE connection: yields the chunks to write, in order, until the connection closes.
pub struct SseStream {
    session: Session,
    /// The connection's channels, sorted: the cursor's order.
    channels: Vec<ChannelName>,
    /// What the client holds in each channel after the last event written.
    positions: Vec<Position>,
    encoder: CursorEncoder,
    batch: Vec<Outbound>,
    events: Vec<SessionEvent>,
    /// How many of `events` were already written.
    sent: usize,
    ping: Interval,
    /// Pings go out only on streams that were silent since the last check (half a ping interval).
    wrote_since_ping: bool,
    /// Fires when the client's token expires: the stream ends (the client must bring a fresh token).
    expiry: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    first: Option<Bytes>,
    done: bool,
    format: Format,
}

impl SseStream {
    /// The next chunk to write; `None` once the stream is over (the client should reconnect).
    pub async fn next_chunk(&mut self) -> Option<Bytes> {
        if let Some(first) = self.first.take() {
            return Some(first);
        }
        // Events resolved earlier that did not fit in the last chunk go first.
        if self.sent < self.events.len() {
            return Some(self.take_encoded());
        }
        if self.done {
            return None;
        }
        loop {
            tokio::select! {
                received = self.session.recv(&mut self.batch, MAX_BATCH) => {
                    if let Err(reason) = received {
                        self.done = true;
                        let jitter = rand::random::<u64>() % 1000;
                        let text = format!(": closed {}\nretry: {}\n\n", reason.as_str(), 250 + jitter);
                        return Some(Bytes::from(text));
                    }
                    self.session.resolve(&mut self.batch, &mut self.events).await;
                    if self.events.is_empty() {
                        continue;
                    }
                    return Some(self.take_encoded());
                }
                _ = async { if let Some(expiry) = self.expiry.as_mut() { expiry.as_mut().await } else { std::future::pending().await } } => {
                    self.done = true;
                    return Some(Bytes::from_static(b": closed token_expired\n\n"));
                }
                _ = self.ping.tick() => {
                    if !std::mem::replace(&mut self.wrote_since_ping, false) {
                        return Some(Bytes::from_static(b": ping\n\n"));
                    }
                }
            }
        }
    }

    /// Encodes resolved events into one chunk of at most about [`MAX_CHUNK_BYTES`]; what does not fit
    /// stays for the next chunk, so a client that reads slowly pins one bounded buffer, not a batch.
    fn take_encoded(&mut self) -> Bytes {
        let events = std::mem::take(&mut self.events);
        let mut buffer = Vec::with_capacity(((events.len() - self.sent) * 256).min(MAX_CHUNK_BYTES));
        while self.sent < events.len() && buffer.len() < MAX_CHUNK_BYTES {
            self.encode(&mut buffer, &events[self.sent]);
            self.sent += 1;
        }
        self.events = events;
        if self.sent == self.events.len() {
            self.events.clear();
            self.sent = 0;
        }
        self.wrote_since_ping = true;
        Bytes::from(buffer)
    }

    /// Appends one event with the cursor that holds once the client has it.
    fn encode(&mut self, buffer: &mut Vec<u8>, event: &SessionEvent) {
        let (channel, position) = event.position();
        let index = if self.channels.len() == 1 { Ok(0) } else { self.channels.binary_search(channel) };
        if let Ok(index) = index {
            let held = &mut self.positions[index];
            if held.epoch == position.epoch {
                held.offset = position.offset;
            } else {
                *held = position.clone();
            }
        }
        let mut cursor = Vec::with_capacity(24 + 16 * self.positions.len());
        self.encoder.write(&mut cursor, &self.positions);
        match event {
            SessionEvent::Publication { publication, .. } => {
                let data = match self.format {
                    Format::Envelope => publication.envelope(),
                    Format::Compact => publication.payload(),
                };
                put_event(buffer, &cursor, &publication.event, data);
            }
            SessionEvent::Reset { channel, reason, position } => {
                let data = json!({"channel": channel, "reason": reason.as_str(), "epoch": position.epoch, "offset": position.offset});
                put_event(buffer, &cursor, "herald.reset", data.to_string().as_bytes());
            }
        }
    }
}

fn put_event(buffer: &mut Vec<u8>, id: &[u8], event: &str, data: &[u8]) {
    buffer.reserve(id.len() + event.len() + data.len() + 24);
    buffer.extend_from_slice(b"id: ");
    buffer.extend_from_slice(id);
    buffer.extend_from_slice(b"\nevent: ");
    buffer.extend_from_slice(event.as_bytes());
    buffer.extend_from_slice(b"\ndata: ");
    buffer.extend_from_slice(data);
    buffer.extend_from_slice(b"\n\n");
}
