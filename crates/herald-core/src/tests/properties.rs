//! Random interleavings of live, lost, repeated and re-synced publications, epoch changes, expiry and
//! reconnects, fed to one client's sessions; after every step the client's view must satisfy:
//!
//! - every publication handed out is the next offset after the client's position in its channel, and
//!   a reset names where delivery continues from (the next publication follows that);
//! - a reset happens only when the engine could not replay from the client's position;
//! - at the end (after a last re-sync) the client is at the engine's top, and every publication the
//!   engine acknowledged and still holds was handed out or lies behind a reset.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use proptest::prelude::*;

use super::{Node, channel, drain};
use crate::channel::ChannelName;
use crate::engine::{Engine, History};
use crate::policy::HistoryPolicy;
use crate::position::Position;
use crate::session::{Session, SessionEvent};

const CHANNELS: usize = 2;

#[derive(Debug, Clone)]
enum Op {
    /// Published and delivered live.
    Publish(usize),
    /// Published and stored, the live message lost.
    PublishLost(usize),
    /// A publication still in history delivered again (late, twice, or ahead of a lost one).
    Redeliver(usize, usize),
    /// The engine re-syncs the channel at its top.
    Resync(usize),
    /// A re-sync whose top was read some offsets ago.
    StaleResync(usize, u64),
    /// The channel moves to a new epoch; with `Some(n)`, the old epoch kept only offsets up to n.
    Fence(usize, Option<u64>),
    /// The client reads what is queued.
    Drain,
    /// The client drops its connection and resumes every channel from its positions.
    Reconnect,
    /// Time passes (history ages out).
    Wait(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let ch = 0..CHANNELS;
    prop_oneof![
        4 => ch.clone().prop_map(Op::Publish),
        2 => ch.clone().prop_map(Op::PublishLost),
        1 => (ch.clone(), any::<usize>()).prop_map(|(c, i)| Op::Redeliver(c, i)),
        1 => ch.clone().prop_map(Op::Resync),
        1 => (ch.clone(), 0..4u64).prop_map(|(c, back)| Op::StaleResync(c, back)),
        1 => (ch, proptest::option::of(0..6u64)).prop_map(|(c, kept)| Op::Fence(c, kept)),
        3 => Just(Op::Drain),
        1 => Just(Op::Reconnect),
        1 => (0..15u64).prop_map(Op::Wait),
    ]
}

/// What the client has been told, per channel.
struct Client {
    positions: BTreeMap<ChannelName, Position>,
    handed: HashSet<(ChannelName, Position)>,
    /// Every reset's channel and position: what lies at or before it in its epoch was reconciled.
    resets: Vec<(ChannelName, Position)>,
}

impl Client {
    /// Checks one batch of events against the rules, in order; `node` answers whether a reset was due.
    async fn take(&mut self, node: &Node, events: Vec<SessionEvent>, log: &[Op]) {
        for event in events {
            let (channel, position) = event.position();
            let before = self.positions.get(channel).cloned().expect("subscribed");
            match &event {
                SessionEvent::Publication { .. } => {
                    let next = position.epoch == before.epoch && position.offset == before.offset + 1;
                    assert!(next, "{position:?} handed out after {before:?} in {channel}; ops: {log:?}");
                    self.handed.insert((channel.clone(), position.clone()));
                }
                SessionEvent::Reset { reason, .. } => {
                    let replayable = matches!(
                        node.engine.history(channel, Some(&before), 10_000).await,
                        Ok(History::Covered { .. })
                    );
                    assert!(
                        !replayable,
                        "reset {reason:?} from {before:?} in {channel}, still in history; ops: {log:?}"
                    );
                    self.resets.push((channel.clone(), position.clone()));
                }
            }
            self.positions.insert(channel.clone(), position.clone());
        }
    }

    fn reconciled(&self, channel: &ChannelName, position: &Position) -> bool {
        self.handed.contains(&(channel.clone(), position.clone()))
            || self.resets.iter().any(|(c, r)| c == channel && r.epoch == position.epoch && position.offset <= r.offset)
    }
}

async fn subscribe_all(node: &Node, client: &mut Client, channels: &[ChannelName], log: &[Op]) -> Session {
    let mut session = node.session();
    for channel in channels {
        let since = client.positions.get(channel).cloned();
        let mut out = Vec::new();
        let at = session.subscribe(channel.clone(), since.clone(), &mut out).await.expect("subscribe");
        if since.is_none() {
            client.positions.insert(channel.clone(), at.clone());
        }
        client.take(node, out, log).await;
        assert_eq!(client.positions.get(channel), Some(&at), "subscribe reports where the client is");
    }
    session
}

async fn run(ops: Vec<Op>) {
    let node =
        Node::with_history(HistoryPolicy { size: 4, ttl: Duration::from_secs(20), ..HistoryPolicy::default() }).await;
    let channels: Vec<ChannelName> = (0..CHANNELS).map(|i| channel(&format!("c{i}"))).collect();
    let mut client = Client { positions: BTreeMap::new(), handed: HashSet::new(), resets: Vec::new() };
    let mut session = subscribe_all(&node, &mut client, &channels, &[]).await;
    let mut acknowledged: Vec<(ChannelName, Position)> = Vec::new();
    for (step, op) in ops.iter().enumerate() {
        let log = &ops[..=step];
        match op {
            Op::Publish(c) => acknowledged.push((channels[*c].clone(), node.publish(&channels[*c]).await)),
            Op::PublishLost(c) => acknowledged.push((channels[*c].clone(), node.publish_lost(&channels[*c]).await)),
            Op::Redeliver(c, index) => {
                let history = node.history(&channels[*c]).await;
                if !history.is_empty() {
                    node.sink().deliver(history[index % history.len()].clone());
                }
            }
            Op::Resync(c) => node.sink().resync(&channels[*c], &node.top(&channels[*c]).await),
            Op::StaleResync(c, back) => {
                let top = node.top(&channels[*c]).await;
                node.sink().resync(&channels[*c], &Position::new(top.epoch, top.offset.saturating_sub(*back)));
            }
            Op::Fence(c, kept) => {
                let top = node.top(&channels[*c]).await;
                node.engine.fence(&channels[*c], kept.map(|k| k.min(top.offset)));
            }
            Op::Drain => client.take(&node, drain(&mut session).await.expect("never too slow"), log).await,
            Op::Reconnect => {
                drop(session);
                session = subscribe_all(&node, &mut client, &channels, log).await;
            }
            Op::Wait(secs) => tokio::time::sleep(Duration::from_secs(*secs)).await,
        }
    }
    for channel in &channels {
        node.sink().resync(channel, &node.top(channel).await);
    }
    client.take(&node, drain(&mut session).await.expect("never too slow"), &ops).await;
    for channel in &channels {
        assert_eq!(client.positions.get(channel), Some(&node.top(channel).await), "client at the top; ops: {ops:?}");
        for publication in node.history(channel).await {
            let position = &publication.position;
            assert!(client.reconciled(channel, position), "{position:?} in {channel} skipped silently; ops: {ops:?}");
        }
    }
    // Every acknowledged publication of an epoch the client is in, at or before its position, was
    // handed out or lies behind a reset (a later epoch's client never hears of older epochs' offsets).
    for (channel, position) in &acknowledged {
        let at = &client.positions[channel];
        if position.epoch == at.epoch && position.offset <= at.offset {
            assert!(client.reconciled(channel, position), "{position:?} in {channel} skipped silently; ops: {ops:?}");
        }
    }
}

proptest! {
    #[test]
    fn every_offset_handed_out_is_the_next_one_or_follows_a_reset(ops in proptest::collection::vec(op(), 1..60)) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime");
        runtime.block_on(run(ops));
    }
}
