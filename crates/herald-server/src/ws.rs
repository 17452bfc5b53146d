//! `GET /v1/ws`: the WebSocket transport over one session.
//!
//! One task owns the socket: it `select!`s over the client's frames, the session's queue and the
//! heartbeat. Client frames are JSON ops (`subscribe`, `unsubscribe`, `ping`, `refresh`); a bad frame
//! gets an `error` reply (with the frame's `id` if it is a u64, else `"id": null`) and the socket stays
//! open. Writes are bounded by `limits.write_timeout_secs`, so a
//! client that stops reading is closed instead of pinning the task. Queued publications are written as
//! one batch of frames with a single flush (one write for many messages).
//!
//! Closes follow RFC 6455 section 7: a client's Close is echoed before the socket is closed; Herald's own
//! Close is followed by a short wait for the client's (the server closes TCP after the handshake); no
//! socket that can still be written to is dropped without a close code. Codes sent by Herald: 1001 (node
//! shutting down), 1002 (protocol error: unmasked, reserved bits or opcodes, an oversized or fragmented
//! control frame, a bad continuation; a Close with an invalid code is answered by tungstenite itself,
//! with the reason `Protocol violation`), 1007 (a text message that is not UTF-8), 1009 (message too big, or any frame
//! over `limits.ws_max_message_bytes`, a control frame too: its size is checked before its type),
//! 4000 (too slow: resume with `since`), 4001 (disconnected by the server API), 4002 (client stopped
//! answering pings), 4003 (the client's token expired; send `refresh` with a fresh token before that).
//!
//! A `refresh` re-checks every subscription against the fresh token's grants; those no longer allowed
//! end with `{"type":"unsubscribed","channel":…,"reason":"permission_revoked"}`.

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use axum::Extension;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use futures_util::SinkExt;
use herald_core::{ChannelName, Epoch, Outbound, Position, Session, SessionEvent, Transport};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::{MissedTickBehavior, Sleep};

use crate::auth::Identity;
use crate::error::{ApiError, FrameError, WsClose};
use crate::proxy::Forwarded;
use crate::socket::ClientAddr;
use crate::state::AppState;

/// Most queued publications handled per wake-up.
pub const MAX_BATCH: usize = 256;
/// Read buffer of each WebSocket connection (grown while a larger message arrives).
pub const WS_READ_BUFFER_BYTES: usize = 1024;
/// Frames written but not yet flushed stop accumulating past this many bytes.
pub const MAX_UNFLUSHED_BYTES: usize = 64 * 1024;
/// How long Herald waits, after sending its Close frame, for the client's Close (RFC 6455 section
/// 7.1.1: the server closes TCP once the closing handshake is done); bounded so that a client that never
/// answers cannot keep the connection.
pub const CLOSE_HANDSHAKE_TIME: Duration = Duration::from_secs(1);

/// `GET /v1/ws`
pub async fn handler(
    State(state): State<AppState>,
    peer: Option<Extension<ClientAddr>>,
    connect_info: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    if state.draining() {
        return Err(ApiError::Unavailable("node is draining".into()));
    }
    let upgrade = upgrade.map_err(upgrade_error)?;
    let pairs = crate::input::query_pairs(&query);
    let token = crate::input::single(&pairs, "token")?;
    let forwarded = state.proxy().forwarded(&headers, crate::socket::peer_of(peer, connect_info));
    // A WebSocket names its channels later, one `subscribe` at a time: the connect proxy is asked with none.
    let identity = state.identify(&headers, token, &[], &forwarded).await?;
    // Kept for the subscribe proxy, which later subscribes ask (boxed: most connections never need it).
    let forwarded = state.config().proxy.subscribe_url.is_some().then(|| Box::new(forwarded));
    let session = state.hub().open_session(Transport::Ws, identity.user.clone())?;
    let limit = state.config().limits.ws_max_message_bytes;
    // tungstenite reserves its whole read buffer per connection up front (128 KiB by default): most of
    // an idle connection's memory. Client frames are small ops, so a small buffer costs nothing.
    let upgrade = upgrade.read_buffer_size(WS_READ_BUFFER_BYTES);
    Ok(upgrade.max_message_size(limit).max_frame_size(limit).on_upgrade(move |socket| {
        let expiry = identity.expires_in().map(|left| Box::pin(tokio::time::sleep(left)));
        let write_timeout = Duration::from_secs(state.config().limits.write_timeout_secs);
        // The connection runs in a task of its own, sized for what it holds: the task axum runs this in
        // also holds the upgrade's state, and an idle connection's memory is mostly its task. Tracked, so
        // that a graceful shutdown waits for its close (1001) to be written.
        let connections = state.connections().clone();
        connections.spawn(Connection { socket, session, state, identity, forwarded, expiry, write_timeout }.run());
        std::future::ready(())
    }))
}

/// The contract's JSON error for a request to `/v1/ws` that is not a valid WebSocket upgrade.
fn upgrade_error(rejection: WebSocketUpgradeRejection) -> ApiError {
    let message = format!("a WebSocket upgrade is required: {}", rejection.body_text());
    match rejection {
        WebSocketUpgradeRejection::MethodNotGet(_) | WebSocketUpgradeRejection::MethodNotConnect(_) => {
            ApiError::MethodNotAllowed
        }
        WebSocketUpgradeRejection::WebSocketKeyHeaderMissing(_) => ApiError::BadRequest(message),
        _ => ApiError::UpgradeRequired(message),
    }
}

/// The close for a read error (matched on tungstenite's error variants, never on message text), or
/// `None` when the socket is gone and nothing can be sent (the peer reset or closed TCP).
fn read_error_close(error: axum::Error) -> Option<WsClose> {
    use tokio_tungstenite::tungstenite::Error;
    use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
    let Ok(error) = error.into_inner().downcast::<Error>() else { return Some(WsClose::Internal) };
    match *error {
        // A message or a frame over the limit (tungstenite checks a frame's size before its type); too
        // many headers only happens in a handshake, and is answered as too large as ever.
        Error::Capacity(CapacityError::MessageTooLong { .. } | CapacityError::TooManyHeaders) => {
            Some(WsClose::FrameTooLarge)
        }
        Error::Utf8(_) => Some(WsClose::InvalidUtf8),
        Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        Error::Protocol(_) => Some(WsClose::ProtocolError),
        Error::ConnectionClosed | Error::AlreadyClosed | Error::Io(_) => None,
        _ => Some(WsClose::Internal),
    }
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum Op {
    Subscribe {
        id: Option<u64>,
        channel: String,
        since: Option<Since>,
    },
    Unsubscribe {
        id: Option<u64>,
        channel: String,
    },
    Ping {
        id: Option<u64>,
    },
    /// A fresh token for the same user, before the current one expires.
    Refresh {
        id: Option<u64>,
        token: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Since {
    epoch: String,
    offset: u64,
}

struct Connection {
    socket: WebSocket,
    session: Session,
    state: AppState,
    identity: Identity,
    /// What the subscribe proxy is told about the client (only when a subscribe proxy is configured).
    forwarded: Option<Box<Forwarded>>,
    /// Fires when the token (or the connect proxy's grant) expires; replaced on `refresh`.
    expiry: Option<Pin<Box<Sleep>>>,
    /// Longest a write (or a batch of them) may take before the client counts as too slow.
    write_timeout: Duration,
}

enum Flow {
    Continue,
    Stop,
}

impl Connection {
    async fn run(mut self) {
        let mut batch: Vec<Outbound> = Vec::new();
        let mut events: Vec<SessionEvent> = Vec::new();
        let ping_every = self.state.settings().ping_interval();
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut awaiting_pong = false;
        loop {
            let flow = tokio::select! {
                _ = async { match self.expiry.as_mut() { Some(expiry) => expiry.as_mut().await, None => std::future::pending().await } } => {
                    Box::pin(self.close(WsClose::TokenExpired)).await;
                    Flow::Stop
                }
                frame = self.socket.recv() => match frame {
                    Some(Ok(message)) => {
                        if matches!(message, Message::Pong(_)) {
                            awaiting_pong = false;
                        }
                        // Boxed, like every rare path here: what a client operation awaits (a subscribe
                        // and its replay) would otherwise be part of every connection task's size.
                        Box::pin(self.on_message(message)).await
                    }
                    Some(Err(error)) => Box::pin(self.on_read_error(error)).await,
                    None => Flow::Stop,
                },
                received = self.session.recv(&mut batch, MAX_BATCH) => match received {
                    Ok(()) => {
                        self.session.resolve(&mut batch, &mut events).await;
                        self.send_all(&mut events).await
                    }
                    Err(reason) => {
                        Box::pin(self.close(WsClose::Session(reason))).await;
                        Flow::Stop
                    }
                },
                _ = ping.tick() => {
                    if awaiting_pong {
                        Box::pin(self.close(WsClose::PingTimeout)).await;
                        Flow::Stop
                    } else {
                        awaiting_pong = true;
                        self.send(Message::Ping(Default::default())).await
                    }
                }
            };
            if let Flow::Stop = flow {
                break;
            }
        }
    }

    async fn send(&mut self, message: Message) -> Flow {
        match tokio::time::timeout(self.write_timeout, self.socket.send(message)).await {
            Ok(Ok(())) => Flow::Continue,
            _ => Flow::Stop,
        }
    }

    /// Writes every event as its own frame, flushing once at the end or whenever [`MAX_UNFLUSHED_BYTES`]
    /// are waiting (so small events leave in one write, and a connection never buffers more than about
    /// that much, whatever the size of its publications), all within one write timeout.
    async fn send_all(&mut self, events: &mut Vec<SessionEvent>) -> Flow {
        let socket = &mut self.socket;
        let written = tokio::time::timeout(self.write_timeout, async {
            let mut unflushed = 0;
            for event in events.drain(..) {
                let frame = event_frame(&event);
                unflushed += match &frame {
                    Message::Text(text) => text.len(),
                    _ => 0,
                };
                socket.feed(frame).await?;
                if unflushed >= MAX_UNFLUSHED_BYTES {
                    socket.flush().await?;
                    unflushed = 0;
                }
            }
            socket.flush().await
        })
        .await;
        // Whether it finished, failed or timed out, the drain has emptied `events`.
        match written {
            Ok(Ok(())) => Flow::Continue,
            _ => Flow::Stop,
        }
    }

    /// Sends a Close frame, then waits (briefly) for the client's Close before the socket is dropped.
    async fn close(&mut self, close: WsClose) {
        let frame = CloseFrame { code: close.code(), reason: Utf8Bytes::from_static(close.reason()) };
        let sent = tokio::time::timeout(self.write_timeout, self.socket.send(Message::Close(Some(frame)))).await;
        if !matches!(sent, Ok(Ok(()))) {
            return;
        }
        let socket = &mut self.socket;
        let _ = tokio::time::timeout(CLOSE_HANDSHAKE_TIME, async {
            while let Some(Ok(message)) = socket.recv().await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }

    async fn on_read_error(&mut self, error: axum::Error) -> Flow {
        let Some(close) = read_error_close(error) else { return Flow::Stop };
        if close == WsClose::FrameTooLarge {
            let limit = self.state.config().limits.ws_max_message_bytes;
            let _ = self.send(error_frame(Value::Null, &FrameError::FrameTooLarge { limit })).await;
        }
        self.close(close).await;
        Flow::Stop
    }

    async fn on_message(&mut self, message: Message) -> Flow {
        let text = match message {
            Message::Text(text) => text,
            Message::Binary(_) => {
                return self.send(error_frame(Value::Null, &FrameError::UnsupportedFrame)).await;
            }
            Message::Close(_) => {
                // tungstenite queued the echo of the client's Close; flushing sends it.
                let _ = tokio::time::timeout(self.write_timeout, self.socket.flush()).await;
                return Flow::Stop;
            }
            Message::Ping(_) | Message::Pong(_) => return Flow::Continue,
        };
        let op = match parse_frame(text.as_str()) {
            Ok(op) => op,
            Err((id, error)) => return self.send(error_frame(id, &error)).await,
        };
        match op {
            Op::Ping { id } => self.send(text_frame(json!({"type": "pong", "id": id}))).await,
            Op::Refresh { id, token } => match self.state.auth().verify_token(&token) {
                Ok(fresh) if fresh.user == self.identity.user => {
                    self.expiry = fresh.expires_in().map(|left| Box::pin(tokio::time::sleep(left)));
                    self.identity = fresh;
                    if let Flow::Stop = self.revoke_lost_grants().await {
                        return Flow::Stop;
                    }
                    let expires_at = self.identity.expires_at;
                    self.send(text_frame(json!({"type": "refreshed", "id": id, "expires_at": expires_at}))).await
                }
                Ok(_) => {
                    let error = ApiError::Forbidden("a refreshed token must be for the same user".into());
                    self.send(api_error_frame(id, &error)).await
                }
                Err(error) => self.send(api_error_frame(id, &error)).await,
            },
            Op::Subscribe { id, channel, since } => self.subscribe(id, channel, since).await,
            Op::Unsubscribe { id, channel } => {
                let result = ChannelName::parse(&channel)
                    .map_err(ApiError::from)
                    .and_then(|channel| self.session.unsubscribe(&channel).map_err(ApiError::from));
                match result {
                    Ok(()) => {
                        self.send(text_frame(json!({"type": "unsubscribed", "id": id, "channel": channel}))).await
                    }
                    Err(error) => self.send(api_error_frame(id, &error)).await,
                }
            }
        }
    }

    /// Ends every subscription the current identity no longer may hold: the session leaves the channel
    /// at once (publications of it still queued are dropped) and the client is told why.
    async fn revoke_lost_grants(&mut self) -> Flow {
        let (auth, config) = (self.state.auth(), self.state.config());
        let revoked: Vec<ChannelName> = self
            .session
            .channels()
            .filter(|channel| auth.authorize(config, &self.identity, channel).is_err())
            .cloned()
            .collect();
        for channel in &revoked {
            // Listed from the session's own channels just above, so it is subscribed.
            let _ = self.session.unsubscribe(channel);
        }
        for channel in revoked {
            let notice = json!({"type": "unsubscribed", "channel": channel, "reason": "permission_revoked"});
            if let Flow::Stop = self.send(text_frame(notice)).await {
                return Flow::Stop;
            }
        }
        Flow::Continue
    }

    async fn subscribe(&mut self, id: Option<u64>, channel: String, since: Option<Since>) -> Flow {
        let channel = match ChannelName::parse(&channel) {
            Ok(channel) => channel,
            Err(error) => return self.send(api_error_frame(id, &ApiError::from(error))).await,
        };
        let since = match since.map(|s| Epoch::parse(&s.epoch).map(|epoch| Position::new(epoch, s.offset))).transpose()
        {
            Ok(since) => since,
            Err(error) => return self.send(api_error_frame(id, &ApiError::from(error))).await,
        };
        let nothing = Forwarded::default();
        let forwarded = self.forwarded.as_deref().unwrap_or(&nothing);
        if let Err(error) = self.state.authorize(&self.identity, &channel, forwarded).await {
            return self.send(api_error_frame(id, &error)).await;
        }
        let mut events = Vec::new();
        let subscribed = if self.state.config().is_latest(&channel) {
            self.session.subscribe_latest(channel.clone(), since, &mut events).await
        } else {
            self.session.subscribe(channel.clone(), since, &mut events).await
        };
        match subscribed {
            Ok(position) => {
                if let Flow::Stop = self.send_all(&mut events).await {
                    return Flow::Stop;
                }
                let reply = json!({"type": "subscribed", "id": id, "channel": channel, "epoch": position.epoch, "offset": position.offset});
                self.send(text_frame(reply)).await
            }
            Err(error) => self.send(api_error_frame(id, &ApiError::from(error))).await,
        }
    }
}

/// A client frame's op, or the error reply it gets: the client's id and the error.
fn parse_frame(text: &str) -> Result<Op, (Value, FrameError)> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| (Value::Null, FrameError::MalformedJson(e.to_string())))?;
    // Error replies echo the client's id when it is a valid one (a u64), even if the rest of the frame is
    // not; any other id is answered with `null` (re-serialised, a number beyond u64 would come back as a
    // float, not as sent).
    let raw_id = value.get("id").filter(|id| id.is_u64()).cloned().unwrap_or(Value::Null);
    let name = value.get("op").and_then(Value::as_str).map(str::to_owned);
    match name.as_deref() {
        Some("subscribe" | "unsubscribe" | "ping" | "refresh") => {
            serde_json::from_value::<Op>(value).map_err(|e| (raw_id, FrameError::InvalidFrame(e.to_string())))
        }
        Some(other) => Err((raw_id, FrameError::UnknownOp(other.to_owned()))),
        None => Err((raw_id, FrameError::InvalidFrame("a frame needs an \"op\" string".to_owned()))),
    }
}

/// The op a client text frame holds, or the error code it is answered with (for tests and fuzzing).
pub fn frame_kind(text: &str) -> Result<&'static str, &'static str> {
    match parse_frame(text) {
        Ok(Op::Subscribe { .. }) => Ok("subscribe"),
        Ok(Op::Unsubscribe { .. }) => Ok("unsubscribe"),
        Ok(Op::Ping { .. }) => Ok("ping"),
        Ok(Op::Refresh { .. }) => Ok("refresh"),
        Err((_, error)) => Err(error.code()),
    }
}

fn text_frame(value: Value) -> Message {
    Message::Text(Utf8Bytes::from(value.to_string()))
}

fn error_frame(id: Value, error: &FrameError) -> Message {
    text_frame(json!({"type": "error", "id": id, "code": error.code(), "message": error.message()}))
}

fn api_error_frame(id: Option<u64>, error: &ApiError) -> Message {
    text_frame(json!({"type": "error", "id": id, "code": error.code(), "message": error.public_message()}))
}

fn event_frame(event: &SessionEvent) -> Message {
    match event {
        SessionEvent::Publication { publication, .. } => {
            // Shared by every connection; the envelope is JSON, so the check cannot fail.
            let text =
                Utf8Bytes::try_from(publication.ws_message().clone()).unwrap_or_else(|_| Utf8Bytes::from_static("{}"));
            Message::Text(text)
        }
        SessionEvent::Reset { channel, reason, position, .. } => text_frame(json!({
            "type": "reset", "channel": channel, "reason": reason.as_str(), "epoch": position.epoch, "offset": position.offset,
        })),
    }
}
