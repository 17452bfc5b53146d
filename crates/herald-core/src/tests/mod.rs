//! Tests of the delivery logic (hub fan-out, session ordering, recovery and resets) against the real
//! in-memory engine, with tokio's paused time. Faults the memory engine cannot show on its own (lost
//! live messages, a fenced or rolled-back channel) come from its `#[cfg(test)]` hooks; re-syncs and
//! out-of-order deliveries are driven through the hub's [`EngineSink`], the way engines talk to it.

mod delivery;
mod properties;

use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;

use crate::channel::ChannelName;
use crate::engine::{EngineSink, History, PublishRequest};
use crate::hub::{Hub, HubConfig};
use crate::memory::MemoryEngine;
use crate::outbound::CloseReason;
use crate::policy::{HistoryPolicy, Policies};
use crate::position::Position;
use crate::publication::Publication;
use crate::session::{ResetReason, Session, SessionEvent, Transport};
use crate::stats::StatsSnapshot;

/// One node: a memory engine and the hub started on it.
pub(crate) struct Node {
    pub engine: Arc<MemoryEngine>,
    pub hub: Hub,
}

impl Node {
    pub async fn start(history: HistoryPolicy, config: HubConfig) -> Node {
        let policies = Policies { default_history: history, ..Policies::default() };
        let engine = Arc::new(MemoryEngine::new("n", policies));
        let hub = Hub::start(engine.clone(), config).await.expect("hub starts");
        Node { engine, hub }
    }

    pub async fn with_history(history: HistoryPolicy) -> Node {
        Self::start(history, HubConfig::default()).await
    }

    pub async fn default() -> Node {
        Self::start(HistoryPolicy::default(), HubConfig::default()).await
    }

    /// The hub as its engine sees it.
    pub fn sink(&self) -> &dyn EngineSink {
        &*self.hub.shared
    }

    pub fn session(&self) -> Session {
        self.hub.open_session(Transport::Sse, None).expect("session opens")
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.hub.stats()
    }

    pub async fn publish(&self, channel: &ChannelName) -> Position {
        self.hub.publish(request(channel)).await.expect("publish").position
    }

    /// Published and stored, but the live message never reaches the hub.
    pub async fn publish_lost(&self, channel: &ChannelName) -> Position {
        self.engine.set_muted(true);
        let position = self.publish(channel).await;
        self.engine.set_muted(false);
        position
    }

    /// The stored publication of `channel` at `position` (to deliver it again, late or twice).
    pub async fn stored(&self, channel: &ChannelName, position: &Position) -> Arc<Publication> {
        let history = self.history(channel).await;
        history.into_iter().find(|p| p.position == *position).expect("still in history")
    }

    /// Everything the engine still holds for `channel`, oldest first.
    pub async fn history(&self, channel: &ChannelName) -> Vec<Arc<Publication>> {
        match self.hub.history(channel, None, 10_000).await.expect("history") {
            History::Covered { publications, .. } => publications,
            History::Gone { .. } => Vec::new(),
        }
    }

    pub async fn top(&self, channel: &ChannelName) -> Position {
        use crate::engine::Engine;
        self.engine.top(channel).await.expect("top")
    }
}

pub(crate) fn channel(name: &str) -> ChannelName {
    ChannelName::parse(name).expect("channel name")
}

pub(crate) fn request(channel: &ChannelName) -> PublishRequest {
    PublishRequest {
        channel: channel.clone(),
        event: Arc::from("message"),
        data: RawValue::from_string("1".into()).expect("json"),
        idempotency_key: None,
        correlation_id: Arc::from("c"),
        receipt: None,
        trace_parent: None,
    }
}

/// Receives and resolves everything queued for `session` until its queue stays empty for a moment
/// (paused time: the moment passes as soon as nothing else can run), or the hub closes it.
pub(crate) async fn drain(session: &mut Session) -> Result<Vec<SessionEvent>, CloseReason> {
    let (mut batch, mut out) = (Vec::new(), Vec::new());
    loop {
        match tokio::time::timeout(Duration::from_millis(10), session.recv(&mut batch, 64)).await {
            Ok(Ok(())) => session.resolve(&mut batch, &mut out).await,
            Ok(Err(reason)) => return Err(reason),
            Err(_) => return Ok(out),
        }
    }
}

/// An event as the tests compare it: the offset handed out, or where a reset continues from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seen {
    Live(u64),
    Recovered(u64),
    Reset(ResetReason, u64),
}

pub(crate) fn seen<'a>(events: impl IntoIterator<Item = &'a SessionEvent>) -> Vec<Seen> {
    events
        .into_iter()
        .map(|event| match event {
            SessionEvent::Publication { publication, recovered: false } => Seen::Live(publication.position.offset),
            SessionEvent::Publication { publication, recovered: true } => Seen::Recovered(publication.position.offset),
            SessionEvent::Reset { reason, position, .. } => Seen::Reset(*reason, position.offset),
        })
        .collect()
}
