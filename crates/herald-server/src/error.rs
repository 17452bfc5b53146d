//! The server API's error type: every failure becomes the contract's JSON body
//! `{"error":{"code":"…","message":"…"}}` with a fitting status. Classification lives here only: the
//! HTTP errors ([`ApiError`]), the WebSocket's error frames ([`FrameError`]) and close codes
//! ([`WsClose`]), and the reason labels of refused sockets.
//! Server-side failures (5xx) get a generic message; their detail goes to the log.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use herald_core::{ChannelError, CloseReason, CursorError, EngineError, HubError};
use serde_json::json;

/// The `reason` label under which a socket refused over `limits.max_sockets` is counted
/// (`herald_connections_refused_total`; the socket is answered `limit_exceeded`).
pub const SOCKET_CAP_REASON: &str = "max_sockets";

/// An error answer of the HTTP API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("invalid channel: {0}")]
    Channel(#[from] ChannelError),
    #[error("invalid cursor: {0}")]
    Cursor(#[from] CursorError),
    #[error("request body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("request body does not match: {0}")]
    InvalidBody(String),
    #[error("request body is larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    /// The request head is over the size limit or has too many header lines (the message says which).
    #[error("{0}")]
    HeadersTooLarge(String),
    /// The request head or body did not arrive in time (the message says which).
    #[error("{0}")]
    RequestTimeout(String),
    /// A body that is not `application/json` where JSON is expected.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// A request the server cannot serve with its current protocol (a WebSocket route without a valid
    /// upgrade).
    #[error("{0}")]
    UpgradeRequired(String),
    #[error("method not allowed on this path")]
    MethodNotAllowed,
    /// A transfer coding the server does not implement.
    #[error("{0}")]
    NotImplemented(String),
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("history no longer covers the requested position")]
    HistoryGone,
    #[error("{0}")]
    Limit(String),
    #[error("not found")]
    NotFound,
    #[error("engine unavailable")]
    Unavailable(String),
    /// Written, but not to as many replicas as `redis.durability` requires.
    #[error("not durable")]
    NotDurable(String),
    /// The connect or subscribe proxy's backend could not be reached, answered an unexpected status or
    /// an answer that is not the contract's JSON (the detail goes to the log).
    #[error("proxy unavailable")]
    ProxyUnavailable(String),
    /// The connect or subscribe proxy's backend did not answer within `proxy.timeout_ms`.
    #[error("proxy timeout")]
    ProxyTimeout(String),
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_)
            | Self::Channel(_)
            | Self::Cursor(_)
            | Self::MalformedJson(_)
            | Self::InvalidBody(_) => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::UpgradeRequired(_) => StatusCode::UPGRADE_REQUIRED,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            Self::Unauthorized | Self::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::HistoryGone => StatusCode::GONE,
            Self::Limit(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::Unavailable(_) | Self::NotDurable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::ProxyUnavailable(_) => StatusCode::BAD_GATEWAY,
            Self::ProxyTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad_request",
            Self::Channel(_) => "invalid_channel",
            Self::Cursor(_) => "invalid_cursor",
            Self::MalformedJson(_) => "malformed_json",
            Self::InvalidBody(_) => "invalid_body",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::HeadersTooLarge(_) => "headers_too_large",
            Self::RequestTimeout(_) => "request_timeout",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::UpgradeRequired(_) => "upgrade_required",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::NotImplemented(_) => "not_implemented",
            Self::Unauthorized => "unauthorized",
            Self::Unauthenticated(_) => "unauthenticated",
            Self::Forbidden(_) => "forbidden",
            Self::HistoryGone => "history_gone",
            Self::Limit(_) => "limit_exceeded",
            Self::NotFound => "not_found",
            Self::Unavailable(_) => "engine_unavailable",
            Self::NotDurable(_) => "not_durable",
            Self::ProxyUnavailable(_) => "proxy_unavailable",
            Self::ProxyTimeout(_) => "proxy_timeout",
            Self::Internal(_) => "internal",
        }
    }

    /// The message clients see; server-side details stay in the log.
    pub fn public_message(&self) -> String {
        match self {
            Self::Unavailable(_) => "the engine is unavailable; retry later".to_owned(),
            Self::NotDurable(_) => "the publication was accepted but not replicated as required; it may or may not be \
                                    delivered and kept; retry with the same idempotency_key"
                .to_owned(),
            Self::ProxyUnavailable(_) => {
                "the backend that authorizes clients could not decide; nothing was granted; retry later".to_owned()
            }
            Self::ProxyTimeout(_) => {
                "the backend that authorizes clients did not answer in time; nothing was granted; retry later"
                    .to_owned()
            }
            Self::Internal(_) => "internal error".to_owned(),
            other => other.to_string(),
        }
    }

    /// Whether the answer carries `Retry-After: 1` (a limit, or a failure that passes: 429, 502, 503,
    /// 504).
    pub fn retry_after(&self) -> bool {
        matches!(self.status().as_u16(), 429 | 502 | 503 | 504)
    }

    /// The JSON body, also used for WebSocket error frames.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"code": self.code(), "message": self.public_message()}})
    }
}

/// Why Herald closes a WebSocket: the close code (RFC 6455 section 7.4) and reason it sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsClose {
    /// The session ended in the hub (node shutting down, too slow, disconnected by the server API).
    Session(CloseReason),
    PingTimeout,
    TokenExpired,
    /// A message or frame over `limits.ws_max_message_bytes`.
    FrameTooLarge,
    InvalidUtf8,
    ProtocolError,
    Internal,
}

impl WsClose {
    pub fn code(self) -> u16 {
        match self {
            Self::Session(CloseReason::ShuttingDown) => 1001,
            Self::Session(CloseReason::SlowConsumer) => 4000,
            Self::Session(CloseReason::Disconnected) => 4001,
            Self::PingTimeout => 4002,
            Self::TokenExpired => 4003,
            Self::FrameTooLarge => 1009,
            Self::InvalidUtf8 => 1007,
            Self::ProtocolError => 1002,
            Self::Internal => 1011,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Self::Session(reason) => reason.as_str(),
            Self::PingTimeout => "ping_timeout",
            Self::TokenExpired => "token_expired",
            Self::FrameTooLarge => "frame_too_large",
            Self::InvalidUtf8 => "invalid_utf8",
            Self::ProtocolError => "protocol_error",
            Self::Internal => "internal_error",
        }
    }
}

/// A client WebSocket frame Herald cannot act on: answered with an `error` frame, the socket stays open
/// (an [`ApiError`] is answered the same way, with its own code).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// Not JSON.
    MalformedJson(String),
    /// JSON, but not a valid op.
    InvalidFrame(String),
    /// An `op` Herald does not know.
    UnknownOp(String),
    /// A binary frame.
    UnsupportedFrame,
    /// Over `limits.ws_max_message_bytes` (sent just before the close).
    FrameTooLarge { limit: usize },
}

impl FrameError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::MalformedJson(_) => "malformed_json",
            Self::InvalidFrame(_) => "invalid_frame",
            Self::UnknownOp(_) => "unknown_op",
            Self::UnsupportedFrame => "unsupported_frame",
            Self::FrameTooLarge { .. } => "frame_too_large",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Self::MalformedJson(detail) | Self::InvalidFrame(detail) => detail.clone(),
            Self::UnknownOp(op) => format!("unknown op {op:?}; expected subscribe, unsubscribe, ping or refresh"),
            Self::UnsupportedFrame => "binary frames are not supported; send JSON text".to_owned(),
            Self::FrameTooLarge { limit } => format!("messages may be at most {limit} bytes"),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> Self {
        match error {
            EngineError::NotDurable(detail) => Self::NotDurable(detail),
            other => Self::Unavailable(other.to_string()),
        }
    }
}

impl From<HubError> for ApiError {
    fn from(error: HubError) -> Self {
        match error {
            HubError::Engine(e) => e.into(),
            HubError::TooManyConnections(_) | HubError::TooManyConnectionsForUser(_) | HubError::TooManyChannels(_) => {
                Self::Limit(error.to_string())
            }
            HubError::AlreadySubscribed(_) | HubError::NotSubscribed(_) => Self::BadRequest(error.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            match &self {
                Self::Unavailable(detail)
                | Self::NotDurable(detail)
                | Self::ProxyUnavailable(detail)
                | Self::ProxyTimeout(detail)
                | Self::Internal(detail) => {
                    tracing::warn!(%status, detail, "request failed")
                }
                _ => tracing::warn!(%status, "request failed"),
            }
        }
        let mut response = (status, Json(self.body())).into_response();
        if self.retry_after() {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if status == StatusCode::UPGRADE_REQUIRED {
            // RFC 9110 §15.5.22 (a 426 names the protocol to upgrade to) and RFC 6455 §4.4 (the version).
            response.headers_mut().insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            response.headers_mut().insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        }
        response
    }
}
