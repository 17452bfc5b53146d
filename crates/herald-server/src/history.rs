//! `GET /v1/history`: a channel's stored publications since a position, answered from the stored
//! envelope bytes themselves and bounded in bytes.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use herald_core::{ChannelName, Epoch, History, Position, Publication};
use hyper::body::{Frame, SizeHint};
use serde_json::Value;

use crate::credentials::api_key_name;
use crate::error::ApiError;
use crate::input::{channel_param, number, query_pairs, single};
use crate::state::AppState;

/// How long a history read waits for a free slot (`limits.max_concurrent_history_reads`) before 429.
const HISTORY_READ_WAIT: Duration = Duration::from_secs(5);
/// Publications returned by `/v1/history` unless `limit` says otherwise, and the most it may ask for.
pub const DEFAULT_HISTORY_LIMIT: usize = 100;
pub const MAX_HISTORY_LIMIT: usize = 10_000;

/// `GET /v1/history?channel=…&since_epoch=…&since_offset=…&limit=…`, or `?channel=…&latest=1` for the
/// latest publication alone (what a latest-value subscriber gets first).
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
    api_key_name(&state.config().api_keys, &headers)?;
    let pairs = query_pairs(&query);
    let channel = channel_param(&pairs)?;
    let latest = match single(&pairs, "latest")? {
        None | Some("0" | "false") => false,
        Some("1" | "true") => true,
        Some(other) => return Err(ApiError::BadRequest(format!("latest must be 1 or 0, not {other:?}"))),
    };
    let asked_limit: Option<usize> = number(&pairs, "limit")?;
    let limit = asked_limit.unwrap_or(DEFAULT_HISTORY_LIMIT);
    if limit == 0 || limit > MAX_HISTORY_LIMIT {
        return Err(ApiError::BadRequest(format!("limit must be 1 to {MAX_HISTORY_LIMIT}")));
    }
    let since = match (single(&pairs, "since_epoch")?, number::<u64>(&pairs, "since_offset")?) {
        (None, None) => None,
        (Some(epoch), Some(offset)) => Some(Position::new(Epoch::parse(epoch)?, offset)),
        _ => return Err(ApiError::BadRequest("since_epoch and since_offset go together".into())),
    };
    if latest && (since.is_some() || asked_limit.is_some()) {
        return Err(ApiError::BadRequest("latest=1 asks for the latest publication alone: no since or limit".into()));
    }
    // The newest publication still kept is the channel's latest value (none when history holds none).
    let limit = if latest { 1 } else { limit };
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
