//! One case per rule of delivery: order, duplicates, gap repair, and a reset at every boundary.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::{Node, Seen, channel, drain, seen};
use crate::hub::HubConfig;
use crate::outbound::CloseReason;
use crate::policy::HistoryPolicy;
use crate::position::{Epoch, Position};
use crate::session::{ResetReason, SessionEvent};

use Seen::{Live, Recovered, Reset};

fn history(size: usize, ttl_secs: u64) -> HistoryPolicy {
    HistoryPolicy { size, ttl: Duration::from_secs(ttl_secs), ..HistoryPolicy::default() }
}

fn epoch_of(event: &SessionEvent) -> Epoch {
    event.position().1.epoch.clone()
}

#[tokio::test(start_paused = true)]
async fn live_publications_arrive_in_offset_order_per_channel() {
    let node = Node::default().await;
    let (a, b) = (channel("a"), channel("b"));
    let mut session = node.session();
    assert_eq!(session.subscribe(a.clone(), None, &mut Vec::new()).await.expect("subscribe").offset, 0);
    session.subscribe(b.clone(), None, &mut Vec::new()).await.expect("subscribe");
    for _ in 0..3 {
        node.publish(&a).await;
        node.publish(&b).await;
    }
    let events = drain(&mut session).await.expect("open");
    for name in [&a, &b] {
        assert_eq!(seen(events.iter().filter(|e| e.position().0 == name)), vec![Live(1), Live(2), Live(3)]);
    }
    assert_eq!(node.stats().delivered_sse, 6);
}

#[tokio::test(start_paused = true)]
async fn duplicates_of_live_publications_are_dropped() {
    let node = Node::default().await;
    let a = channel("a");
    let mut session = node.session();
    session.subscribe(a.clone(), None, &mut Vec::new()).await.expect("subscribe");
    let one = node.publish(&a).await;
    let two = node.publish(&a).await;
    node.sink().deliver(node.stored(&a, &one).await);
    node.sink().deliver(node.stored(&a, &two).await);
    node.publish(&a).await;
    assert_eq!(seen(&drain(&mut session).await.expect("open")), vec![Live(1), Live(2), Live(3)]);
    assert_eq!(node.stats().duplicates_dropped, 2);
}

#[tokio::test(start_paused = true)]
async fn a_resume_replays_history_and_drops_the_live_copies_it_covered() {
    let node = Node::default().await;
    let a = channel("a");
    let first = node.publish(&a).await;
    for _ in 0..3 {
        node.publish(&a).await;
    }
    let mut session = node.session();
    let mut out = Vec::new();
    let at = session.subscribe(a.clone(), Some(first.clone()), &mut out).await.expect("subscribe");
    assert_eq!(seen(&out), vec![Recovered(2), Recovered(3), Recovered(4)]);
    assert_eq!(at.offset, 4);
    // Live copies of what the replay covered were queued while it ran (the channel is joined first).
    for offset in [3, 4] {
        node.sink().deliver(node.stored(&a, &Position::new(first.epoch.clone(), offset)).await);
    }
    node.publish(&a).await;
    assert_eq!(seen(&drain(&mut session).await.expect("open")), vec![Live(5)]);
    let stats = node.stats();
    assert_eq!((stats.recovered, stats.duplicates_dropped), (3, 2));
}

#[tokio::test(start_paused = true)]
async fn a_gap_in_live_delivery_is_repaired_from_history() {
    let node = Node::default().await;
    let a = channel("a");
    let mut session = node.session();
    session.subscribe(a.clone(), None, &mut Vec::new()).await.expect("subscribe");
    node.publish(&a).await;
    node.publish_lost(&a).await;
    node.publish_lost(&a).await;
    node.publish(&a).await;
    assert_eq!(seen(&drain(&mut session).await.expect("open")), vec![Live(1), Recovered(2), Recovered(3), Live(4)]);
    let stats = node.stats();
    assert_eq!((stats.gaps_detected, stats.resets_gap, stats.recovered), (1, 0, 2));
}

#[tokio::test(start_paused = true)]
async fn a_gap_trimmed_from_history_resets_with_gap() {
    let node = Node::with_history(history(2, 600)).await;
    let a = channel("a");
    let mut session = node.session();
    session.subscribe(a.clone(), None, &mut Vec::new()).await.expect("subscribe");
    node.publish(&a).await;
    for _ in 0..3 {
        node.publish_lost(&a).await; // 2, 3, 4; history keeps the last two
    }
    node.publish(&a).await;
    assert_eq!(seen(&drain(&mut session).await.expect("open")), vec![Live(1), Reset(ResetReason::Gap, 4), Live(5)]);
    assert_eq!(node.stats().resets_gap, 1);
}

#[tokio::test(start_paused = true)]
async fn a_gap_expired_from_history_resets_with_gap() {
    let node = Node::with_history(history(100, 10)).await;
    let a = channel("a");
    let mut session = node.session();
    session.subscribe(a.clone(), None, &mut Vec::new()).await.expect("subscribe");
    node.publish(&a).await;
    node.publish_lost(&a).await;
    tokio::time::sleep(Duration::from_secs(11)).await;
    node.publish(&a).await;
    assert_eq!(seen(&drain(&mut session).await.expect("open")), vec![Live(1), Reset(ResetReason::Gap, 2), Live(3)]);
}

#[tokio::test(start_paused = true)]
async fn a_resume_from_a_trimmed_position_resets_to_the_top() {
    let node = Node::with_history(history(3, 600)).await;
    let a = channel("a");
    let mut positions = Vec::new();
    for _ in 0..10 {
        positions.push(node.publish(&a).await);
    }
    let mut session = node.session();
    let mut out = Vec::new();
    let at = session.subscribe(a.clone(), Some(positions[1].clone()), &mut out).await.expect("subscribe");
    assert_eq!(seen(&out), vec![Reset(ResetReason::HistoryGone, 10)]);
    assert_eq!(at, positions[9]);
    node.publish(&a).await;
    assert_eq!(seen(&drain(&mut session).await.expect("open")), vec![Live(11)]);
    assert_eq!(node.stats().resets_history_gone, 1);
}

#[tokio::test(start_paused = true)]
async fn a_resume_from_an_expired_position_resets_to_the_top() {
    let node = Node::with_history(history(100, 10)).await;
    let a = channel("a");
    let first = node.publish(&a).await;
    node.publish(&a).await;
    node.publish(&a).await;
    tokio::time::sleep(Duration::from_secs(11)).await;
    let mut session = node.session();
    let mut out = Vec::new();
    session.subscribe(a.clone(), Some(first), &mut out).await.expect("subscribe");
    assert_eq!(seen(&out), vec![Reset(ResetReason::HistoryGone, 3)]);
}

#[tokio::test(start_paused = true)]
async fn a_resume_from_another_epoch_replays_the_whole_current_epoch() {
    let node = Node::default().await;
    let a = channel("a");
    let current = node.publish(&a).await.epoch;
    node.publish(&a).await;
    let mut session = node.session();
    let mut out = Vec::new();
    let at = session.subscribe(a.clone(), Some(Position::new(Epoch::generate(), 7)), &mut out).await.expect("sub");
    assert_eq!(seen(&out), vec![Reset(ResetReason::HistoryGone, 0), Recovered(1), Recovered(2)]);
    assert!(out.iter().all(|e| epoch_of(e) == current));
    assert_eq!(at, Position::new(current, 2));
}

#[tokio::test(start_paused = true)]
async fn an_epoch_change_while_connected_resets_and_replays_the_new_epoch() {
    let node = Node::default().await;
    let a = channel("a");
    let mut session = node.session();
    session.subscribe(a.clone(), None, &mut Vec::new()).await.expect("subscribe");
    node.publish(&a).await;
    node.publish(&a).await;
    assert_eq!(drain(&mut session).await.expect("open").len(), 2);
    let fenced = node.engine.fence(&a, None);
    node.publish_lost(&a).await;
    node.publish(&a).await;
    let events = drain(&mut session).await.expect("open");
    assert_eq!(seen(&events), vec![Reset(ResetReason::EpochChanged, 0), Recovered(1), Live(2)]);
    assert!(events.iter().all(|e| epoch_of(e) == fenced.epoch));
    assert_eq!(node.stats().resets_epoch_changed, 1);
}

#[tokio::test(start_paused = true)]
async fn a_rollback_found_at_resume_resets_engine_rollback() {
    let node = Node::default().await;
    let a = channel("a");
    let mut old = Vec::new();
    for _ in 0..5 {
        old.push(node.publish(&a).await);
    }
    // The engine kept offsets up to 3 of the old epoch; 4 and 5, which clients saw, are gone.
    node.engine.fence(&a, Some(3));
    node.publish(&a).await;
    let (mut lost, mut kept) = (node.session(), node.session());
    let mut out = Vec::new();
    lost.subscribe(a.clone(), Some(old[4].clone()), &mut out).await.expect("subscribe");
    assert_eq!(seen(&out), vec![Reset(ResetReason::EngineRollback, 0), Recovered(1)]);
    out.clear();
    kept.subscribe(a.clone(), Some(old[2].clone()), &mut out).await.expect("subscribe");
    assert_eq!(seen(&out), vec![Reset(ResetReason::HistoryGone, 0), Recovered(1)]);
    let stats = node.stats();
    assert_eq!((stats.resets_engine_rollback, stats.resets_history_gone), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_rollback_while_connected_resets_engine_rollback() {
    let node = Node::default().await;
    let a = channel("a");
    let mut session = node.session();
    session.subscribe(a.clone(), None, &mut Vec::new()).await.expect("subscribe");
    for _ in 0..5 {
        node.publish(&a).await;
    }
    assert_eq!(drain(&mut session).await.expect("open").len(), 5);
    let fenced = node.engine.fence(&a, Some(3));
    node.publish(&a).await;
    let events = drain(&mut session).await.expect("open");
    assert_eq!(seen(&events), vec![Reset(ResetReason::EngineRollback, 0), Live(1)]);
    assert!(events.iter().all(|e| epoch_of(e) == fenced.epoch));
}

#[tokio::test(start_paused = true)]
async fn a_resync_ahead_of_the_session_replays_what_the_engine_missed() {
    let node = Node::default().await;
    let a = channel("a");
    let mut session = node.session();
    session.subscribe(a.clone(), None, &mut Vec::new()).await.expect("subscribe");
    node.publish(&a).await;
    node.publish_lost(&a).await;
    let top = node.publish_lost(&a).await;
    node.sink().resync(&a, &top);
    assert_eq!(seen(&drain(&mut session).await.expect("open")), vec![Live(1), Recovered(2), Recovered(3)]);
    node.publish(&a).await;
    assert_eq!(seen(&drain(&mut session).await.expect("open")), vec![Live(4)]);
}

#[tokio::test(start_paused = true)]
async fn a_resync_into_a_new_epoch_resets_epoch_changed() {
    let node = Node::default().await;
    let a = channel("a");
    let mut session = node.session();
    session.subscribe(a.clone(), None, &mut Vec::new()).await.expect("subscribe");
    node.publish(&a).await;
    node.engine.fence(&a, None);
    let top = node.publish_lost(&a).await;
    node.sink().resync(&a, &top);
    let events = drain(&mut session).await.expect("open");
    assert_eq!(seen(&events), vec![Live(1), Reset(ResetReason::EpochChanged, 0), Recovered(1)]);
    assert_eq!(epoch_of(&events[2]), top.epoch);
}

#[tokio::test(start_paused = true)]
async fn a_resync_top_behind_the_session_is_a_rollback_when_the_engine_confirms_it() {
    let node = Node::default().await;
    let a = channel("a");
    let mut session = node.session();
    session.subscribe(a.clone(), None, &mut Vec::new()).await.expect("subscribe");
    let mut positions = Vec::new();
    for _ in 0..4 {
        positions.push(node.publish(&a).await);
    }
    assert_eq!(drain(&mut session).await.expect("open").len(), 4);
    // A top read before this session caught up: the engine, asked again, is at 4. No reset.
    node.sink().resync(&a, &positions[1]);
    assert_eq!(seen(&drain(&mut session).await.expect("open")), vec![]);
    // Data restored under the running engine: its top really is behind what the client saw.
    node.engine.roll_back(&a, 2);
    node.sink().resync(&a, &positions[1]);
    assert_eq!(seen(&drain(&mut session).await.expect("open")), vec![Reset(ResetReason::EngineRollback, 2)]);
    node.publish(&a).await;
    assert_eq!(seen(&drain(&mut session).await.expect("open")), vec![Live(3)]);
    assert_eq!(node.stats().resets_engine_rollback, 1);
}

#[tokio::test(start_paused = true)]
async fn resyncs_queued_while_replaying_neither_repeat_nor_skip() {
    let node = Node::default().await;
    let a = channel("a");
    let first = node.publish(&a).await;
    let second = node.publish(&a).await;
    let third = node.publish(&a).await;
    let mut session = node.session();
    let mut out = Vec::new();
    session.subscribe(a.clone(), Some(first), &mut out).await.expect("subscribe");
    assert_eq!(seen(&out), vec![Recovered(2), Recovered(3)]);
    // What reached the queue while the replay ran: a live copy of 3, a re-sync whose top was read
    // before the replay caught up, then a publication lost in transit and the re-sync that found it.
    node.sink().deliver(node.stored(&a, &third).await);
    node.sink().resync(&a, &second);
    let fourth = node.publish_lost(&a).await;
    node.sink().resync(&a, &fourth);
    assert_eq!(seen(&drain(&mut session).await.expect("open")), vec![Recovered(4)]);
    let stats = node.stats();
    assert_eq!((stats.resets_gap + stats.resets_engine_rollback, stats.duplicates_dropped), (0, 1));
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_closes_that_connection_as_a_slow_consumer() {
    let node = Node::start(HistoryPolicy::default(), HubConfig { queue_capacity: 2, ..HubConfig::default() }).await;
    let a = channel("a");
    let (mut slow, mut fast) = (node.session(), node.session());
    let hooked = Arc::new(AtomicUsize::new(0));
    let counter = hooked.clone();
    slow.on_close(Box::new(move |reason| {
        assert_eq!(reason, CloseReason::SlowConsumer);
        counter.fetch_add(1, Ordering::SeqCst);
    }));
    slow.subscribe(a.clone(), None, &mut Vec::new()).await.expect("subscribe");
    fast.subscribe(a.clone(), None, &mut Vec::new()).await.expect("subscribe");
    let mut fast_seen = Vec::new();
    for _ in 0..4 {
        node.publish(&a).await; // a publisher never waits for the slow one
        fast_seen.extend(seen(&drain(&mut fast).await.expect("the fast one stays open")));
    }
    assert_eq!(fast_seen, vec![Live(1), Live(2), Live(3), Live(4)]);
    assert_eq!(drain(&mut slow).await.map(|_| ()), Err(CloseReason::SlowConsumer));
    assert_eq!(hooked.load(Ordering::SeqCst), 1);
    assert_eq!(node.stats().slow_consumer_disconnects, 1);
}

#[tokio::test(start_paused = true)]
async fn a_resync_into_a_full_queue_closes_the_connection_too() {
    let node = Node::start(HistoryPolicy::default(), HubConfig { queue_capacity: 1, ..HubConfig::default() }).await;
    let a = channel("a");
    let mut session = node.session();
    session.subscribe(a.clone(), None, &mut Vec::new()).await.expect("subscribe");
    let top = node.publish(&a).await;
    node.sink().resync(&a, &top);
    assert_eq!(drain(&mut session).await.map(|_| ()), Err(CloseReason::SlowConsumer));
}

#[tokio::test(start_paused = true)]
async fn publications_of_a_channel_left_are_not_handed_out() {
    let node = Node::default().await;
    let a = channel("a");
    let mut session = node.session();
    session.subscribe(a.clone(), None, &mut Vec::new()).await.expect("subscribe");
    node.publish(&a).await;
    session.unsubscribe(&a).expect("unsubscribe");
    assert_eq!(seen(&drain(&mut session).await.expect("open")), vec![]);
    assert_eq!(node.hub.channel_count(), 0, "the last member out removes the channel's entry");
}

#[tokio::test(start_paused = true)]
async fn a_latest_value_subscriber_gets_the_latest_publication_first_then_live_ones() {
    let node = Node::default().await;
    let a = channel("a");
    let mut session = node.session();
    let mut out = Vec::new();
    assert_eq!(session.subscribe_latest(a.clone(), None, &mut out).await.expect("subscribe").offset, 0);
    assert!(out.is_empty(), "a channel without publications has no latest value");
    let first = node.publish(&a).await;
    node.publish(&a).await;
    node.publish(&a).await;
    let mut late = node.session();
    let mut out = Vec::new();
    let at = late.subscribe_latest(a.clone(), None, &mut out).await.expect("subscribe");
    assert_eq!((seen(&out), at.offset), (vec![Recovered(3)], 3), "only the latest, and the client holds it");
    // A live copy of the latest, queued while it was read, is not handed out twice; the next one is.
    node.sink().deliver(node.stored(&a, &Position::new(first.epoch.clone(), 3)).await);
    node.publish(&a).await;
    assert_eq!(seen(&drain(&mut late).await.expect("open")), vec![Live(4)]);
    let mut resumed = node.session();
    let mut out = Vec::new();
    resumed.subscribe_latest(a.clone(), Some(first), &mut out).await.expect("subscribe");
    assert_eq!(seen(&out), vec![Recovered(2), Recovered(3), Recovered(4)], "a position replays as ever");
}

#[tokio::test(start_paused = true)]
async fn a_latest_value_gone_from_history_is_not_handed_out() {
    let node = Node::with_history(history(10, 5)).await;
    let a = channel("a");
    node.publish(&a).await;
    tokio::time::advance(Duration::from_secs(6)).await;
    let mut session = node.session();
    let mut out = Vec::new();
    let at = session.subscribe_latest(a.clone(), None, &mut out).await.expect("subscribe");
    assert!(out.is_empty(), "an expired value is not the latest any more: {:?}", seen(&out));
    assert_eq!(at, node.top(&a).await);
}
