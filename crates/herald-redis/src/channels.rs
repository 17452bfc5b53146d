//! A channel's position and history in Redis: its top (made, or fenced into a new epoch, by the top
//! script), the fence for a position seen going backwards, and history reads from its stream.

use std::sync::Arc;

use herald_core::publication::now_ms;
use herald_core::{ChannelName, EngineError, Epoch, History, Policies, Position, Publication};
use redis::Script;

use crate::connection::Commands;
use crate::keys::Keys;
use crate::scripts;

/// History entries asked for by a first `XRANGE`, and at most by any.
const FIRST_PAGE: usize = 16;
const MAX_PAGE: usize = 512;

/// A channel's state as the top script reports it.
#[derive(Debug, Clone)]
pub(crate) struct TopState {
    pub(crate) top: Position,
    /// First part of the IDs of this epoch's history entries.
    pub(crate) generation: u64,
    /// The epoch a fence replaced with this one: its positions were possibly seen with other contents.
    pub(crate) fenced_from: Option<Epoch>,
}

/// Reads channels' positions and histories.
pub(crate) struct Channels {
    keys: Keys,
    commands: Arc<Commands>,
    policies: Policies,
    /// Bytes of history one read holds at most (one more entry beyond it).
    max_read_bytes: usize,
    top_script: Script,
    fence_script: Script,
}

impl Channels {
    pub(crate) fn new(keys: Keys, commands: Arc<Commands>, policies: Policies, max_read_bytes: usize) -> Self {
        Self {
            keys,
            commands,
            policies,
            max_read_bytes,
            top_script: Script::new(&scripts::top()),
            fence_script: Script::new(&scripts::fence()),
        }
    }

    /// The channel's top, its generation and the epoch it continues (fencing it first when its position
    /// was assigned under another history of the primary). A connection that broke on the way is made
    /// again once, so a re-sync right after a reconnect does not fail for a stale connection.
    pub(crate) async fn top_state(&self, channel: &ChannelName) -> Result<TopState, EngineError> {
        match self.top_state_once(channel).await {
            Err(EngineError::Unavailable(_) | EngineError::Timeout) => self.top_state_once(channel).await,
            other => other,
        }
    }

    async fn top_state_once(&self, channel: &ChannelName) -> Result<TopState, EngineError> {
        let policy = self.policies.history(channel);
        let live = self.commands.get().await?;
        let mut conn = live.conn.clone();
        let mut invocation = self.top_script.prepare_invoke();
        invocation
            .key(self.keys.meta(channel))
            .key(self.keys.stream(channel))
            .arg(Epoch::generate().as_str())
            .arg(policy.ttl.as_millis() as u64)
            .arg(&*live.identity.replid);
        let (epoch, offset, generation, fenced, previous): (String, u64, u64, u8, String) =
            self.commands.on(&live, invocation.invoke_async(&mut conn)).await?;
        let epoch = Epoch::parse(&epoch).map_err(|e| EngineError::Protocol(e.to_string()))?;
        if fenced == 1 {
            tracing::info!(%channel, epoch = %epoch, replaces = %previous,
                "channel fenced into a new epoch");
        }
        Ok(TopState { top: Position::new(epoch, offset), generation, fenced_from: Epoch::parse(&previous).ok() })
    }

    /// Moves `channel` to a new epoch if it is still in `epoch`, with nothing of `epoch` continued: its
    /// position went backwards, so some of its offsets may have been handed out twice.
    pub(crate) async fn fence_backwards(&self, channel: &ChannelName, epoch: &Epoch, seen: u64, now: u64) {
        tracing::warn!(%channel, %epoch, seen_offset = seen, engine_offset = now,
            "channel position went backwards in redis (its data rolled back); fencing it into a new epoch");
        let Ok(live) = self.commands.get().await else { return };
        let mut conn = live.conn.clone();
        let mut invocation = self.fence_script.prepare_invoke();
        invocation
            .key(self.keys.meta(channel))
            .key(self.keys.stream(channel))
            .arg(epoch.as_str())
            .arg(Epoch::generate().as_str())
            .arg(&*live.identity.replid);
        if let Err(error) = self.commands.on(&live, invocation.invoke_async::<u8>(&mut conn)).await {
            tracing::warn!(%channel, %error, "fencing failed; retried at the next re-sync");
        }
    }

    /// History entries with IDs from `start` to `end` (at most `limit`), oldest first, skipping entries
    /// older than the namespace's history age. Read a few entries at a time and stopped once they hold
    /// `max_read_bytes` (the entry that crosses it included), so concurrent reads of a large history
    /// hold a bounded amount each; callers page on from the last entry.
    pub(crate) async fn range(
        &self,
        channel: &ChannelName,
        start: String,
        end: String,
        limit: usize,
    ) -> Result<Vec<Arc<Publication>>, EngineError> {
        let oldest_kept = now_ms().saturating_sub(self.policies.history(channel).ttl.as_millis() as u64);
        let budget = self.max_read_bytes.max(1);
        let (mut publications, mut bytes, mut start, mut page) = (Vec::new(), 0usize, start, FIRST_PAGE);
        while publications.len() < limit && bytes < budget {
            let count = page.min(limit - publications.len());
            let live = self.commands.get().await?;
            let mut conn = live.conn.clone();
            let entries: Vec<(String, Vec<Vec<u8>>)> = self
                .commands
                .on(
                    &live,
                    redis::cmd("XRANGE")
                        .arg(self.keys.stream(channel))
                        .arg(&start)
                        .arg(&end)
                        .arg("COUNT")
                        .arg(count)
                        .query_async(&mut conn),
                )
                .await?;
            let read = entries.len();
            let mut page_bytes = 0;
            for (id, fields) in entries {
                start = format!("({id}");
                let mut stamp = 0u64;
                let mut envelope = None;
                let mut fields = fields.into_iter();
                while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
                    match name.as_slice() {
                        b"t" => stamp = std::str::from_utf8(&value).ok().and_then(|v| v.parse().ok()).unwrap_or(0),
                        b"p" => envelope = Some(value),
                        _ => {}
                    }
                }
                let Some(envelope) = envelope.filter(|_| stamp >= oldest_kept) else { continue };
                page_bytes += envelope.len();
                match Publication::from_envelope(envelope.into(), None) {
                    Ok(publication) => publications.push(Arc::new(publication)),
                    Err(error) => tracing::warn!(%channel, %error, "unreadable history entry"),
                }
                if bytes + page_bytes >= budget {
                    break;
                }
            }
            bytes += page_bytes;
            if read < count {
                break;
            }
            // Size the next read by what entries of this channel weigh, within the budget left.
            let average = (page_bytes / read.max(1)).max(1);
            page = ((budget.saturating_sub(bytes)) / average + 1).clamp(1, MAX_PAGE);
        }
        Ok(publications)
    }

    /// Publications after `since` (see [`Engine::history`]). A `since` in the epoch a fence replaced is
    /// gone as rolled back.
    pub(crate) async fn history(
        &self,
        channel: &ChannelName,
        since: Option<&Position>,
        limit: usize,
    ) -> Result<History, EngineError> {
        let TopState { top, generation, fenced_from } = self.top_state(channel).await?;
        let Some(since) = since else {
            if top.offset == 0 {
                return Ok(History::Covered { top, publications: Vec::new() });
            }
            let from = top.offset.saturating_sub(limit as u64) + 1;
            let publications = self
                .range(channel, format!("{generation}-{from}"), format!("{generation}-{}", top.offset), limit)
                .await?
                .into_iter()
                .filter(|p| p.position.epoch == top.epoch);
            return Ok(History::Covered { publications: publications.collect(), top });
        };
        if since.epoch != top.epoch || since.offset > top.offset {
            let rolled_back = fenced_from.as_ref() == Some(&since.epoch);
            return Ok(History::Gone { top, rolled_back });
        }
        if since.offset == top.offset {
            return Ok(History::Covered { top, publications: Vec::new() });
        }
        let start = format!("{generation}-{}", since.offset + 1);
        let entries = self.range(channel, start, "+".to_owned(), limit).await?;
        // Keep the unbroken run after `since`; a hole (trimmed, expired, unreadable) ends it.
        let publications: Vec<Arc<Publication>> = (since.offset + 1..)
            .zip(entries)
            .take_while(|(next, p)| p.position.epoch == since.epoch && p.position.offset == *next)
            .map(|(_, publication)| publication)
            .collect();
        if publications.is_empty() {
            return Ok(History::Gone { top, rolled_back: false });
        }
        Ok(History::Covered { top, publications })
    }
}
