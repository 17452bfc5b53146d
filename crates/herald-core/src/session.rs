//! One client connection's view of the hub: its channels, the position it holds in each, and the
//! ordering rules that make recovery safe.
//!
//! Rule every edit must keep: every offset handed to the transport is the next one after the
//! connection's position in that channel, or is preceded by a reset for that channel. To get there a
//! subscription joins the channel first (live publications start queueing), then replays history from
//! the client's position, and [`Session::resolve`] drops queued publications the replay already covered.
//! A jump in offsets is repaired from history; what history cannot cover becomes a reset.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;

use crate::channel::ChannelName;
use crate::engine::{History, PresenceEntry};
use crate::hub::{Hub, HubError, HubShared};
use crate::outbound::{CloseHook, CloseReason, Control, Outbound};
use crate::position::Position;
use crate::publication::{Publication, format_timestamp, now_ms};

/// How the client is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Sse,
    Ws,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sse => "sse",
            Self::Ws => "ws",
        }
    }
}

/// Why a client is told to reconcile a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetReason {
    /// The client's position can no longer be replayed (trimmed, expired or another epoch).
    HistoryGone,
    /// Publications went missing in transit and history no longer holds them.
    Gap,
    /// The channel's stream started a new epoch while the client was connected.
    EpochChanged,
    /// The engine lost data the client had already seen (it restarted from an older snapshot or failed
    /// over to a replica that lagged); the channel continues in a new epoch.
    EngineRollback,
}

impl ResetReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HistoryGone => "history_gone",
            Self::Gap => "gap",
            Self::EpochChanged => "epoch_changed",
            Self::EngineRollback => "engine_rollback",
        }
    }
}

/// Where a new subscription starts.
enum Start {
    /// At the channel's top: only what is published from now on.
    Top,
    /// At the channel's latest publication (a latest-value channel), then what follows.
    Latest,
    /// Right after the client's position (replayed, or a reset).
    Since(Position),
}

/// What the transport writes to the client, in order.
#[derive(Debug)]
pub enum SessionEvent {
    Publication {
        publication: Arc<Publication>,
        /// Replayed from history rather than delivered live.
        recovered: bool,
    },
    Reset {
        channel: ChannelName,
        reason: ResetReason,
        /// Where delivery continues from.
        position: Position,
    },
}

impl SessionEvent {
    /// The channel and the position the client holds in it after this event.
    pub fn position(&self) -> (&ChannelName, &Position) {
        match self {
            Self::Publication { publication, .. } => (&publication.channel, &publication.position),
            Self::Reset { channel, position, .. } => (channel, position),
        }
    }
}

impl Hub {
    /// Opens a session (one client connection) on this node. (Defined here rather than in `hub.rs` so
    /// that the hub does not depend on the session: the session is built on the hub, not the reverse.)
    pub fn open_session(&self, transport: Transport, user: Option<String>) -> Result<Session, HubError> {
        let (id, control) = self.shared.register(user.as_deref())?;
        let (tx, rx) = mpsc::channel(self.shared.config.queue_capacity.max(1));
        Ok(Session::new(self.shared.clone(), id, transport, user, tx, rx, control))
    }
}

/// One client connection. Dropping it removes every trace of the connection from the hub and presence.
pub struct Session {
    shared: Arc<HubShared>,
    id: u64,
    id_text: String,
    transport: Transport,
    user: Option<String>,
    connected_at: String,
    tx: mpsc::Sender<Outbound>,
    rx: mpsc::Receiver<Outbound>,
    control: Arc<Control>,
    /// The position delivered so far in each subscribed channel, in name order (the cursor's order).
    positions: BTreeMap<ChannelName, Position>,
}

impl Session {
    pub(crate) fn new(
        shared: Arc<HubShared>,
        id: u64,
        transport: Transport,
        user: Option<String>,
        tx: mpsc::Sender<Outbound>,
        rx: mpsc::Receiver<Outbound>,
        control: Arc<Control>,
    ) -> Self {
        Self {
            shared,
            id,
            id_text: format!("{id:016x}"),
            transport,
            user,
            connected_at: format_timestamp(now_ms()),
            tx,
            rx,
            control,
            positions: BTreeMap::new(),
        }
    }

    /// The connection ID clients and presence see.
    pub fn id(&self) -> &str {
        &self.id_text
    }

    /// Registers what to do, besides waking [`Session::recv`], when the hub closes this connection
    /// (typically: abort the socket, whose task may be blocked writing to a client that stopped reading).
    /// Only the first hook is kept.
    pub fn on_close(&self, hook: CloseHook) {
        self.control.set_hook(hook);
    }

    /// Subscribes to `channel`, live in the engine before this returns. With `since`, appends to `out`
    /// the publications after it (or a reset when they cannot be replayed). Without, starts at the top.
    pub async fn subscribe(
        &mut self,
        channel: ChannelName,
        since: Option<Position>,
        out: &mut Vec<SessionEvent>,
    ) -> Result<Position, HubError> {
        let start = match since {
            Some(since) => Start::Since(since),
            None => Start::Top,
        };
        self.subscribe_from(channel, start, out).await
    }

    /// Subscribes to a latest-value channel: as [`Session::subscribe`], except that without `since` the
    /// channel's latest publication still in history (if any) is appended to `out` first, and the
    /// client holds its position (so live publications follow it in order, none twice).
    pub async fn subscribe_latest(
        &mut self,
        channel: ChannelName,
        since: Option<Position>,
        out: &mut Vec<SessionEvent>,
    ) -> Result<Position, HubError> {
        let start = match since {
            Some(since) => Start::Since(since),
            None => Start::Latest,
        };
        self.subscribe_from(channel, start, out).await
    }

    async fn subscribe_from(
        &mut self,
        channel: ChannelName,
        start: Start,
        out: &mut Vec<SessionEvent>,
    ) -> Result<Position, HubError> {
        if self.positions.contains_key(&channel) {
            return Err(HubError::AlreadySubscribed(channel));
        }
        let max = self.shared.config.max_channels_per_connection;
        if self.positions.len() >= max {
            return Err(HubError::TooManyChannels(max));
        }
        let live = self.shared.join(&channel, self.id, self.user.as_deref(), self.tx.clone(), self.control.clone());
        match self.start_position(&channel, live, start, out).await {
            Ok(position) => {
                self.positions.insert(channel, position.clone());
                Ok(position)
            }
            Err(error) => {
                self.release(&channel);
                Err(error)
            }
        }
    }

    /// Once joined: waits for the engine's subscription, joins presence, then finds where the client
    /// starts (the top, or its position after the replay or reset appended to `out`).
    async fn start_position(
        &mut self,
        channel: &ChannelName,
        live: crate::engine::SubscribeFuture,
        start: Start,
        out: &mut Vec<SessionEvent>,
    ) -> Result<Position, HubError> {
        let engine = self.shared.engine.clone();
        live.await?;
        let entry = PresenceEntry {
            node: engine.node_id().to_owned(),
            connection_id: self.id_text.clone(),
            user: self.user.clone(),
            transport: self.transport.as_str(),
            connected_at: self.connected_at.clone(),
        };
        engine.presence_join(channel, entry).await?;
        let since = match start {
            Start::Since(since) => since,
            Start::Top => return Ok(engine.top(channel).await?),
            Start::Latest => return self.latest(channel, out).await,
        };
        match self.history(channel, &since, self.shared.config.max_replay).await? {
            History::Covered { publications, .. } => Ok(self.replay(channel, since, publications, out)),
            History::Gone { top, rolled_back } => self.reset_on_resume(channel, top, rolled_back, out).await,
        }
    }

    /// The channel's latest publication, handed out when it is still the top (one trimmed or expired
    /// from history while the channel's offset stayed is not: the client then starts at the top with
    /// nothing, as any subscriber without a position). Returns the position the client holds. Read after
    /// joining, like any replay: live publications queued meanwhile follow it, and [`Session::resolve`]
    /// drops those at or below it.
    async fn latest(&self, channel: &ChannelName, out: &mut Vec<SessionEvent>) -> Result<Position, HubError> {
        let top = match self.shared.engine.history(channel, None, 1).await? {
            History::Covered { top, publications } => {
                if let Some(latest) = publications.into_iter().last().filter(|p| p.position == top) {
                    out.push(SessionEvent::Publication { publication: latest, recovered: true });
                    self.shared.stats.recovered.fetch_add(1, Ordering::Relaxed);
                }
                top
            }
            History::Gone { top, .. } => top,
        };
        Ok(top)
    }

    /// Hands out the publications that follow `since`; returns the position reached.
    fn replay(
        &self,
        channel: &ChannelName,
        since: Position,
        publications: Vec<Arc<Publication>>,
        out: &mut Vec<SessionEvent>,
    ) -> Position {
        let mut position = since;
        let mut replayed = 0u64;
        for publication in publications {
            if follows(&position, &publication.position) {
                tracing::debug!(correlation_id = %publication.correlation_id, %channel,
                    offset = publication.position.offset, connection = %self.id_text, "recovered");
                position = publication.position.clone();
                out.push(SessionEvent::Publication { publication, recovered: true });
                replayed += 1;
            }
        }
        // `out` may already hold other channels' events (SSE subscribes several into one list).
        self.shared.stats.recovered.fetch_add(replayed, Ordering::Relaxed);
        position
    }

    /// The client's position can no longer be replayed: a reset to where it continues, then what
    /// history holds of the current epoch up to `top`. Returns `top`.
    async fn reset_on_resume(
        &self,
        channel: &ChannelName,
        top: Position,
        rolled_back: bool,
        out: &mut Vec<SessionEvent>,
    ) -> Result<Position, HubError> {
        let (reason, counter) = if rolled_back {
            (ResetReason::EngineRollback, &self.shared.stats.resets_engine_rollback)
        } else {
            (ResetReason::HistoryGone, &self.shared.stats.resets_history_gone)
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let (from, replay) = self.reset_point(channel, &top).await;
        out.push(SessionEvent::Reset { channel: channel.clone(), reason, position: from });
        let replayed = replay.len() as u64;
        out.extend(replay.into_iter().map(|publication| SessionEvent::Publication { publication, recovered: true }));
        self.shared.stats.recovered.fetch_add(replayed, Ordering::Relaxed);
        Ok(top)
    }

    /// The channels this connection is subscribed to, in name order.
    pub fn channels(&self) -> impl Iterator<Item = &ChannelName> {
        self.positions.keys()
    }

    /// Leaves `channel`. Publications of it still queued are dropped by [`Session::resolve`].
    pub fn unsubscribe(&mut self, channel: &ChannelName) -> Result<(), HubError> {
        if self.positions.remove(channel).is_none() {
            return Err(HubError::NotSubscribed(channel.clone()));
        }
        self.release(channel);
        Ok(())
    }

    fn release(&self, channel: &ChannelName) {
        self.shared.leave(channel, self.id);
        self.shared.engine.presence_leave(channel, &self.id_text);
    }

    /// Waits for queued publications (up to `max`, appended to `batch`) or for the hub to close the
    /// connection. Cancel-safe: nothing is lost when the future is dropped before it completes.
    pub async fn recv(&mut self, batch: &mut Vec<Outbound>, max: usize) -> Result<(), CloseReason> {
        let max = max.max(1);
        std::future::poll_fn(|cx| {
            if let std::task::Poll::Ready(reason) = self.control.poll_closed(cx) {
                return std::task::Poll::Ready(Err(reason));
            }
            self.rx.poll_recv_many(cx, batch, max).map(|_| Ok(()))
        })
        .await
    }

    /// Turns received items into events, in order, dropping what the client already has and repairing
    /// gaps from history. Must run to completion (do not race it against other futures).
    pub async fn resolve(&mut self, batch: &mut Vec<Outbound>, out: &mut Vec<SessionEvent>) {
        let before = out.len();
        // The batch's latency is that of its oldest live publication (events of one batch were written
        // together), recorded once for the whole batch to keep shared counters off the per-event path.
        let mut oldest_ms = u64::MAX;
        let mut recovered = 0u64;
        for item in batch.drain(..) {
            match item {
                Outbound::Resync(resync) => {
                    let (channel, top) = *resync;
                    // Boxed, as is the slow path of `live`: the awaits of a repair would otherwise be part
                    // of every connection task's size, idle ones included, for the rare gap.
                    recovered += Box::pin(self.resync(&channel, top, out)).await;
                }
                Outbound::Publication { publication, receipt } => {
                    let (deliver, replayed) = match self.in_order(&publication) {
                        Some(deliver) => (deliver, 0),
                        None => Box::pin(self.live(&publication, out)).await,
                    };
                    recovered += replayed;
                    if !deliver {
                        continue;
                    }
                    if let Some(token) = receipt {
                        token.written();
                    }
                    oldest_ms = oldest_ms.min(publication.published_at_ms);
                    tracing::trace!(correlation_id = %publication.correlation_id, channel = %publication.channel,
                        offset = publication.position.offset, connection = %self.id_text, "delivered");
                    out.push(SessionEvent::Publication { publication, recovered: false });
                }
            }
        }
        self.count_batch(&out[before..], recovered, oldest_ms);
    }

    /// The common cases of a live publication, decided without the engine: `Some(true)` for the next one
    /// in order (the position moves to it), `Some(false)` for a duplicate or a channel unsubscribed since
    /// it was queued; `None` when only [`Session::live`] can tell.
    fn in_order(&mut self, publication: &Publication) -> Option<bool> {
        let Some(position) = self.positions.get_mut(&publication.channel) else {
            return Some(false); // unsubscribed since it was queued
        };
        let incoming = &publication.position;
        if incoming.epoch != position.epoch {
            return None;
        }
        if incoming.offset <= position.offset {
            self.shared.stats.duplicates_dropped.fetch_add(1, Ordering::Relaxed);
            return Some(false);
        }
        if incoming.offset == position.offset + 1 {
            position.offset = incoming.offset;
            return Some(true);
        }
        None
    }

    /// Where a live publication goes when [`Session::in_order`] could not tell (another epoch, or a
    /// gap before it). Returns whether to hand it out, and how many publications were replayed (pushed
    /// to `out`) to fill the gap or to reach the channel's current epoch.
    async fn live(&mut self, publication: &Publication, out: &mut Vec<SessionEvent>) -> (bool, u64) {
        let channel = &publication.channel;
        let Some(position) = self.positions.get(channel) else { return (false, 0) };
        let incoming = &publication.position;
        let same_epoch = incoming.epoch == position.epoch;
        if !same_epoch {
            // Another epoch: the channel's next one, or one it has already left (an item queued before
            // this client moved on). Epochs never come back, so the engine's current one tells which.
            if let Ok(now) = self.shared.engine.top(channel).await {
                if now.epoch != incoming.epoch {
                    self.shared.stats.duplicates_dropped.fetch_add(1, Ordering::Relaxed);
                    return (false, self.catch_up(channel, now, out).await);
                }
            }
            // The current epoch, or the engine cannot tell: repair towards the publication.
        }
        // An engine never makes offset 0, but a corrupt message must not underflow.
        let before_it = Position::new(incoming.epoch.clone(), incoming.offset.saturating_sub(1));
        let replayed = self.repair(channel, &before_it, out).await;
        self.positions.insert(channel.clone(), incoming.clone());
        (true, replayed)
    }

    /// The engine may have missed publications of `channel` up to `top`: replay, or reset. A top of
    /// another epoch or behind the client may be stale (read before the client moved on), so the
    /// engine is asked again. Returns how many publications it replayed.
    async fn resync(&mut self, channel: &ChannelName, top: Position, out: &mut Vec<SessionEvent>) -> u64 {
        let Some(position) = self.positions.get(channel) else { return 0 };
        let behind = position.epoch == top.epoch && position.offset > top.offset;
        if position.epoch == top.epoch && !behind {
            return if position.offset < top.offset { self.repair(channel, &top, out).await } else { 0 };
        }
        match self.shared.engine.top(channel).await {
            Ok(now) => self.catch_up(channel, now, out).await,
            // The engine cannot say: a top behind the client is not taken for a rollback on its own
            // word; a top of another epoch is followed (the client resets rather than stays behind).
            Err(_) if behind => 0,
            Err(_) => self.repair(channel, &top, out).await,
        }
    }

    /// Brings the client to `now`, the engine's current top of `channel` (just read): replays up to it,
    /// resets into its epoch, or resets back to it when it is behind the client (the data rolled back).
    async fn catch_up(&mut self, channel: &ChannelName, now: Position, out: &mut Vec<SessionEvent>) -> u64 {
        let Some(position) = self.positions.get(channel) else { return 0 };
        if position.epoch == now.epoch && position.offset > now.offset {
            self.rolled_back(channel, now, out);
            0
        } else if position.epoch != now.epoch || position.offset < now.offset {
            self.repair(channel, &now, out).await
        } else {
            0
        }
    }

    /// Counts what one `resolve` handed out: live deliveries (and their latency), recoveries.
    fn count_batch(&self, events: &[SessionEvent], recovered: u64, oldest_ms: u64) {
        let resets = events.iter().filter(|e| matches!(e, SessionEvent::Reset { .. })).count() as u64;
        let live = events.len() as u64 - recovered - resets;
        if live > 0 {
            let latency = crate::publication::now_us().saturating_sub(oldest_ms.saturating_mul(1000));
            self.shared.stats.latency.record_many(latency, live);
        }
        let counter = match self.transport {
            Transport::Sse => &self.shared.stats.delivered_sse,
            Transport::Ws => &self.shared.stats.delivered_ws,
        };
        counter.fetch_add(live, Ordering::Relaxed);
        self.shared.stats.recovered.fetch_add(recovered, Ordering::Relaxed);
    }

    /// Brings the client from its position in `channel` up to `target` from history, or emits a reset
    /// that moves it to `target`. Returns how many publications it replayed.
    async fn repair(&mut self, channel: &ChannelName, target: &Position, out: &mut Vec<SessionEvent>) -> u64 {
        let Some(mut position) = self.positions.get(channel).cloned() else { return 0 };
        let stats = &self.shared.stats;
        let same_epoch = position.epoch == target.epoch;
        if same_epoch {
            stats.gaps_detected.fetch_add(1, Ordering::Relaxed);
        }
        let mut replayed = 0;
        let mut rolled_back = false;
        match self.history(channel, &position, self.shared.config.max_replay).await {
            Ok(History::Covered { publications, .. }) => {
                for publication in publications {
                    let p = &publication.position;
                    if !follows(&position, p) || (p.epoch == target.epoch && p.offset > target.offset) {
                        break;
                    }
                    position = p.clone();
                    out.push(SessionEvent::Publication { publication, recovered: true });
                    replayed += 1;
                }
            }
            Ok(History::Gone { rolled_back: lost, .. }) => rolled_back = lost,
            Err(_) => {}
        }
        if position.epoch == target.epoch && position.offset >= target.offset {
            self.positions.insert(channel.clone(), position);
            return replayed;
        }
        let (reason, counter) = if rolled_back {
            (ResetReason::EngineRollback, &stats.resets_engine_rollback)
        } else if same_epoch {
            (ResetReason::Gap, &stats.resets_gap)
        } else {
            (ResetReason::EpochChanged, &stats.resets_epoch_changed)
        };
        tracing::info!(%channel, reason = reason.as_str(), connection = %self.id_text, "reset");
        counter.fetch_add(1, Ordering::Relaxed);
        let (from, replay) =
            if same_epoch { (target.clone(), Vec::new()) } else { self.reset_point(channel, target).await };
        out.push(SessionEvent::Reset { channel: channel.clone(), reason, position: from });
        for publication in replay {
            out.push(SessionEvent::Publication { publication, recovered: true });
            replayed += 1;
        }
        self.positions.insert(channel.clone(), target.clone());
        replayed
    }

    /// Publications after `since`, up to `limit`, reading history as many times as it takes: an engine
    /// may answer with a part (the Redis engine bounds each read in bytes). Stops at the top, at `limit`,
    /// or when a later read no longer covers the position reached (what follows is then a gap).
    async fn history(
        &self,
        channel: &ChannelName,
        since: &Position,
        limit: usize,
    ) -> Result<History, crate::engine::EngineError> {
        let engine = &self.shared.engine;
        let first = engine.history(channel, Some(since), limit).await?;
        let History::Covered { mut top, mut publications } = first else { return Ok(first) };
        while let Some(last) = publications.last().map(|p| p.position.clone()) {
            if last == top || publications.len() >= limit {
                break;
            }
            match engine.history(channel, Some(&last), limit - publications.len()).await {
                Ok(History::Covered { top: now, publications: more }) if !more.is_empty() => {
                    top = now;
                    publications.extend(more);
                }
                _ => break,
            }
        }
        Ok(History::Covered { top, publications })
    }

    /// The engine's top is behind the client's position in the same epoch: the offsets in between may
    /// be handed out again for other publications, so the client reconciles and continues from `top`.
    fn rolled_back(&mut self, channel: &ChannelName, top: Position, out: &mut Vec<SessionEvent>) {
        tracing::info!(%channel, reason = ResetReason::EngineRollback.as_str(), connection = %self.id_text, "reset");
        self.shared.stats.resets_engine_rollback.fetch_add(1, Ordering::Relaxed);
        out.push(SessionEvent::Reset {
            channel: channel.clone(),
            reason: ResetReason::EngineRollback,
            position: top.clone(),
        });
        self.positions.insert(channel.clone(), top);
    }

    /// Where a reset into `top`'s epoch should continue from: the start of that epoch when history still
    /// holds all of it (the client then gets every publication of the new epoch), else `top` itself.
    /// Returns the reset position and the publications to replay after the reset, up to `top`.
    async fn reset_point(&self, channel: &ChannelName, top: &Position) -> (Position, Vec<Arc<Publication>>) {
        if top.offset == 0 {
            return (top.clone(), Vec::new());
        }
        let start = Position::new(top.epoch.clone(), 0);
        let limit = self.shared.config.max_replay;
        match self.history(channel, &start, limit).await {
            Ok(History::Covered { publications, .. }) => {
                let mut expected = 1;
                let mut replay = Vec::new();
                for publication in publications {
                    let p = &publication.position;
                    if p.epoch != top.epoch || p.offset != expected || p.offset > top.offset {
                        break;
                    }
                    expected += 1;
                    replay.push(publication);
                }
                if expected > top.offset { (start, replay) } else { (top.clone(), Vec::new()) }
            }
            _ => (top.clone(), Vec::new()),
        }
    }
}

/// Whether `next` is the publication right after `position`.
fn follows(position: &Position, next: &Position) -> bool {
    next.epoch == position.epoch && next.offset == position.offset + 1
}

impl Drop for Session {
    fn drop(&mut self) {
        let channels: Vec<ChannelName> = std::mem::take(&mut self.positions).into_keys().collect();
        for channel in &channels {
            self.release(channel);
        }
        self.shared.forget_connection(self.id);
    }
}
