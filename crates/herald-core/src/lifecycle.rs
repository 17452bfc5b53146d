//! Lifecycle of channels and of users in channels, for the lifecycle webhooks: the hub's local
//! transitions ([`Transition`], emitted under the hub's shard locks into an unbounded queue, never
//! blocking), the events the cluster agrees on ([`LifecycleEvent`]), and the store that turns the one
//! into the other and keeps the events in order until they are delivered ([`LifecycleStore`]; the
//! in-process one, [`MemoryLifecycle`], is here).
//!
//! What deliberately is not here: HTTP, signing, retries (the server's `hooks.rs`), and the stores of
//! distributed engines (their crates).
//!
//! Rules every edit must keep:
//! - Per channel, transitions are queued in the order the hub's membership changed (they are sent
//!   under the channel's shard lock), and a store emits a channel's events in that order.
//! - A vacated or left transition only becomes an event once the grace has passed with no one back;
//!   a join within the grace cancels it, and then neither it nor the join makes an event (no flap).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::channel::ChannelName;
use crate::engine::EngineError;
use crate::sync::lock;

/// Events a store keeps undelivered at most; beyond, the oldest is dropped (and counted).
pub const MAX_QUEUED_EVENTS: usize = 100_000;

/// A change of this node's membership, as the hub saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// The channel's first local subscriber.
    Occupied(ChannelName),
    /// The channel's last local subscriber is gone.
    Vacated(ChannelName),
    /// The user's first local connection in the channel.
    Joined(ChannelName, String),
    /// The user's last local connection in the channel is gone.
    Left(ChannelName, String),
}

/// Where the hub sends its transitions, and which channels it sends them for.
pub struct LifecycleSink {
    tx: mpsc::UnboundedSender<Transition>,
    wants: Box<dyn Fn(&ChannelName) -> bool + Send + Sync>,
}

impl LifecycleSink {
    pub fn new(
        tx: mpsc::UnboundedSender<Transition>,
        wants: impl Fn(&ChannelName) -> bool + Send + Sync + 'static,
    ) -> Self {
        Self { tx, wants: Box::new(wants) }
    }

    /// Whether transitions of `channel` are wanted (its namespace has hooks on).
    pub fn wants(&self, channel: &ChannelName) -> bool {
        (self.wants)(channel)
    }

    /// Queues a transition (never blocks; dropped when the consumer is gone, at shutdown).
    pub fn send(&self, transition: Transition) {
        let _ = self.tx.send(transition);
    }
}

/// What a lifecycle event says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    ChannelOccupied,
    ChannelVacated,
    PresenceJoined,
    PresenceLeft,
}

impl EventKind {
    pub const ALL: [EventKind; 4] =
        [EventKind::ChannelOccupied, EventKind::ChannelVacated, EventKind::PresenceJoined, EventKind::PresenceLeft];

    /// The event's `type` on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ChannelOccupied => "channel.occupied",
            Self::ChannelVacated => "channel.vacated",
            Self::PresenceJoined => "presence.joined",
            Self::PresenceLeft => "presence.left",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == text)
    }
}

/// One event of the cluster, to be delivered once (at least once, with a stable `id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleEvent {
    /// Unique and stable across redeliveries (the backend dedups on it).
    pub id: String,
    pub kind: EventKind,
    pub channel: ChannelName,
    /// The user of a presence event; `None` for channel events.
    pub user: Option<String>,
    /// When the cluster's state changed, in Unix milliseconds.
    pub at_ms: u64,
    /// Where the store keeps it (a stream entry's ID; empty in memory): opaque to the deliverer, which
    /// hands the event back to [`LifecycleStore::ack`].
    pub seq: String,
}

/// The cluster-wide side of lifecycle events: applies each node's transitions, decides when the
/// cluster's state changed, and keeps the resulting events in order until they are acknowledged.
#[async_trait]
pub trait LifecycleStore: Send + Sync {
    /// Applies one of this node's transitions at `now_ms`; appends an event when it changed the
    /// cluster's state (occupied, joined), or starts the grace of a vacated or left one.
    async fn apply(&self, transition: Transition, now_ms: u64) -> Result<(), EngineError>;
    /// Emits the vacated and left events whose grace has passed by `now_ms`.
    async fn tick(&self, now_ms: u64) -> Result<(), EngineError>;
    /// Whether this node is the one that delivers (taking or renewing the lease where there is one).
    async fn lead(&self) -> Result<bool, EngineError>;
    /// Up to `max` undelivered events, oldest first.
    async fn pending(&self, max: usize) -> Result<Vec<LifecycleEvent>, EngineError>;
    /// `event` and every pending one before it are done with: delivered or given up.
    async fn ack(&self, event: &LifecycleEvent) -> Result<(), EngineError>;
    /// Events dropped unsent because the store was full.
    fn overflowed(&self) -> u64;
    /// The node stops: gives up what it holds (the delivery lease), so that another node takes over at
    /// once rather than when it lapses.
    async fn close(&self) -> Result<(), EngineError> {
        Ok(())
    }
}

/// A new event ID: `msg_` and 32 random hex digits (never reused, also across restarts).
pub fn new_event_id() -> String {
    format!("msg_{:032x}", rand::random::<u128>())
}

/// The lifecycle store of one node on its own (the memory engine): its transitions are the cluster's.
pub struct MemoryLifecycle {
    grace: Duration,
    state: Mutex<MemoryState>,
    overflowed: AtomicU64,
}

#[derive(Default)]
struct MemoryState {
    /// (channel, user) whose vacated or left event waits for the grace to end -> when it ends.
    /// `user` is `None` for the channel itself.
    vacating: HashMap<(ChannelName, Option<String>), u64>,
    events: VecDeque<LifecycleEvent>,
}

impl MemoryLifecycle {
    pub fn new(grace: Duration) -> Self {
        Self { grace, state: Mutex::new(MemoryState::default()), overflowed: AtomicU64::new(0) }
    }

    fn push(&self, state: &mut MemoryState, kind: EventKind, channel: ChannelName, user: Option<String>, at_ms: u64) {
        if state.events.len() >= MAX_QUEUED_EVENTS {
            state.events.pop_front();
            self.overflowed.fetch_add(1, Ordering::Relaxed);
        }
        state.events.push_back(LifecycleEvent { id: new_event_id(), kind, channel, user, at_ms, seq: String::new() });
    }

    fn arrive(&self, kind: EventKind, channel: ChannelName, user: Option<String>, now_ms: u64) {
        let mut state = lock(&self.state);
        let key = (channel, user);
        if state.vacating.remove(&key).is_none() {
            let (channel, user) = key;
            self.push(&mut state, kind, channel, user, now_ms);
        }
    }

    fn depart(&self, channel: ChannelName, user: Option<String>, now_ms: u64) {
        let due = now_ms.saturating_add(self.grace.as_millis() as u64);
        lock(&self.state).vacating.insert((channel, user), due);
    }
}

#[async_trait]
impl LifecycleStore for MemoryLifecycle {
    async fn apply(&self, transition: Transition, now_ms: u64) -> Result<(), EngineError> {
        match transition {
            Transition::Occupied(channel) => self.arrive(EventKind::ChannelOccupied, channel, None, now_ms),
            Transition::Joined(channel, user) => self.arrive(EventKind::PresenceJoined, channel, Some(user), now_ms),
            Transition::Vacated(channel) => self.depart(channel, None, now_ms),
            Transition::Left(channel, user) => self.depart(channel, Some(user), now_ms),
        }
        Ok(())
    }

    async fn tick(&self, now_ms: u64) -> Result<(), EngineError> {
        let mut state = lock(&self.state);
        if state.vacating.is_empty() {
            return Ok(());
        }
        let mut due: Vec<((ChannelName, Option<String>), u64)> =
            state.vacating.iter().filter(|(_, at)| **at <= now_ms).map(|(k, at)| (k.clone(), *at)).collect();
        // In the order they became due; a user's left before its channel's vacated (same due time).
        due.sort_by(|(a, at_a), (b, at_b)| at_a.cmp(at_b).then_with(|| b.1.is_some().cmp(&a.1.is_some())));
        for (key, at) in due {
            state.vacating.remove(&key);
            let (channel, user) = key;
            let kind = if user.is_some() { EventKind::PresenceLeft } else { EventKind::ChannelVacated };
            self.push(&mut state, kind, channel, user, at);
        }
        Ok(())
    }

    async fn lead(&self) -> Result<bool, EngineError> {
        Ok(true)
    }

    async fn pending(&self, max: usize) -> Result<Vec<LifecycleEvent>, EngineError> {
        Ok(lock(&self.state).events.iter().take(max).cloned().collect())
    }

    async fn ack(&self, event: &LifecycleEvent) -> Result<(), EngineError> {
        let mut state = lock(&self.state);
        // Not found: already acknowledged, or dropped from a full queue; nothing moves.
        if let Some(position) = state.events.iter().position(|pending| pending.id == event.id) {
            state.events.drain(..=position);
        }
        Ok(())
    }

    fn overflowed(&self) -> u64 {
        self.overflowed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel(name: &str) -> ChannelName {
        ChannelName::parse(name).expect("channel")
    }

    async fn kinds(store: &MemoryLifecycle) -> Vec<(EventKind, String, Option<String>)> {
        let events = store.pending(100).await.expect("pending");
        for event in &events {
            store.ack(event).await.expect("ack");
        }
        events.into_iter().map(|e| (e.kind, e.channel.as_str().to_owned(), e.user)).collect()
    }

    /// The hub's transitions for channels its sink wants: the first and last member of a channel, the
    /// first and last connection of a user in it; nothing for other channels or anonymous connections.
    #[tokio::test]
    async fn the_hub_sends_first_and_last_transitions_in_order() {
        use crate::hub::{Hub, HubConfig};
        use crate::memory::MemoryEngine;
        use crate::session::Transport;
        let engine = std::sync::Arc::new(MemoryEngine::new("n", crate::policy::Policies::default()));
        let hub = Hub::start(engine, HubConfig::default()).await.expect("hub");
        let (tx, mut rx) = mpsc::unbounded_channel();
        hub.set_lifecycle(LifecycleSink::new(tx, |c: &ChannelName| c.namespace() != "quiet"));
        let open = |user: Option<&str>| hub.open_session(Transport::Ws, user.map(str::to_owned)).expect("session");
        let (mut ann, mut ann_again, mut anonymous, mut bob) =
            (open(Some("ann")), open(Some("ann")), open(None), open(Some("bob")));
        for (session, name) in [(&mut ann, "a:1"), (&mut ann_again, "a:1"), (&mut anonymous, "a:1"), (&mut bob, "a:1")]
        {
            session.subscribe(channel(name), None, &mut Vec::new()).await.expect("subscribe");
        }
        bob.subscribe(channel("quiet:1"), None, &mut Vec::new()).await.expect("subscribe");
        ann.unsubscribe(&channel("a:1")).expect("unsubscribe"); // ann's other connection stays
        drop(bob);
        drop(ann_again);
        drop(anonymous);
        let mut seen = Vec::new();
        while let Ok(transition) = rx.try_recv() {
            seen.push(transition);
        }
        assert_eq!(
            seen,
            [
                Transition::Occupied(channel("a:1")),
                Transition::Joined(channel("a:1"), "ann".into()),
                Transition::Joined(channel("a:1"), "bob".into()),
                Transition::Left(channel("a:1"), "bob".into()),
                Transition::Left(channel("a:1"), "ann".into()),
                Transition::Vacated(channel("a:1")),
            ]
        );
    }

    #[tokio::test]
    async fn occupied_then_vacated_after_the_grace() {
        let store = MemoryLifecycle::new(Duration::from_millis(100));
        store.apply(Transition::Occupied(channel("a:1")), 1_000).await.expect("apply");
        store.apply(Transition::Joined(channel("a:1"), "u".into()), 1_000).await.expect("apply");
        assert_eq!(
            kinds(&store).await,
            vec![
                (EventKind::ChannelOccupied, "a:1".into(), None),
                (EventKind::PresenceJoined, "a:1".into(), Some("u".into()))
            ]
        );
        store.apply(Transition::Left(channel("a:1"), "u".into()), 2_000).await.expect("apply");
        store.apply(Transition::Vacated(channel("a:1")), 2_000).await.expect("apply");
        store.tick(2_099).await.expect("tick");
        assert_eq!(kinds(&store).await, vec![], "nothing before the grace has passed");
        store.tick(2_100).await.expect("tick");
        assert_eq!(
            kinds(&store).await,
            vec![
                (EventKind::PresenceLeft, "a:1".into(), Some("u".into())),
                (EventKind::ChannelVacated, "a:1".into(), None)
            ]
        );
        store.tick(5_000).await.expect("tick");
        assert_eq!(kinds(&store).await, vec![], "each event once");
    }

    #[tokio::test]
    async fn a_return_within_the_grace_makes_no_event() {
        let store = MemoryLifecycle::new(Duration::from_millis(100));
        store.apply(Transition::Occupied(channel("a:1")), 1_000).await.expect("apply");
        let _ = kinds(&store).await;
        store.apply(Transition::Vacated(channel("a:1")), 2_000).await.expect("apply");
        store.apply(Transition::Occupied(channel("a:1")), 2_050).await.expect("apply");
        store.tick(3_000).await.expect("tick");
        assert_eq!(kinds(&store).await, vec![], "a reconnect within the grace does not flap");
        store.apply(Transition::Vacated(channel("a:1")), 4_000).await.expect("apply");
        store.tick(4_100).await.expect("tick");
        assert_eq!(kinds(&store).await, vec![(EventKind::ChannelVacated, "a:1".into(), None)]);
    }

    #[tokio::test]
    async fn ids_are_unique_and_ack_moves_past_the_event_and_those_before() {
        let store = MemoryLifecycle::new(Duration::ZERO);
        store.apply(Transition::Occupied(channel("a:1")), 1).await.expect("apply");
        store.apply(Transition::Occupied(channel("a:2")), 1).await.expect("apply");
        let events = store.pending(10).await.expect("pending");
        assert_eq!(events.len(), 2);
        assert_ne!(events[0].id, events[1].id);
        store.apply(Transition::Occupied(channel("a:3")), 1).await.expect("apply");
        store.ack(&events[1]).await.expect("ack");
        let left = store.pending(10).await.expect("pending");
        assert_eq!(left.len(), 1, "the first two are done with: {left:?}");
        assert_eq!(left[0].channel.as_str(), "a:3");
        store.ack(&events[0]).await.expect("ack an event already done with");
        assert_eq!(store.pending(10).await.expect("pending"), left, "nothing moves");
    }
}
