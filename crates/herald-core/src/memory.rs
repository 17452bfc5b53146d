//! The embedded in-memory engine: a single node's streams, history, dedup keys and presence.
//!
//! This is the default engine and the reference for what the `Engine` contract means. It holds no
//! connection state (that is the hub's); it only owns what a distributed engine would keep in its
//! shared store. Publishing hands the publication to the hub while the channel's shard lock is held,
//! which is what keeps per-channel delivery order equal to offset order.
//!
//! Memory is bounded: history per channel by the namespace's size, bytes and age (see
//! [`HistoryPolicy::max_bytes`] for how bytes are counted and why the newest is always kept), stream state is dropped
//! once a channel with no local subscribers has been idle for its history age, and idempotency keys
//! are capped at [`MAX_DEDUP_KEYS`] (oldest forgotten first) besides expiring with the dedup window.
//! The engine sweeps itself every [`SWEEP_INTERVAL`] from a task spawned by [`Engine::start`] (it holds
//! the store weakly and ends with the engine), so an embedder need not call [`MemoryEngine::sweep`].
//!
//! Ages are measured on tokio's monotonic clock from the engine's creation, not on the wall clock: a
//! clock step (NTP, a suspended VM) neither empties history nor keeps it forever, and tests can drive
//! expiry with paused time. `published_at` in envelopes stays wall-clock time.
//!
//! Over 600 lines because half of it is tests: the engine itself is the first ~390 lines; then the
//! `#[cfg(test)]` fault hooks the delivery tests use, then this engine's own tests.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use async_trait::async_trait;

use crate::channel::ChannelName;
use crate::engine::{
    Engine, EngineError, EngineSink, History, NodeInfo, PresenceEntry, PublishOutcome, PublishRequest, SubscribeFuture,
};
use crate::policy::{HistoryPolicy, Policies};
use crate::position::{Epoch, Position};
use crate::publication::{Publication, now_ms};
use crate::sync::lock;

/// Most idempotency keys remembered at once; beyond this the oldest are forgotten early.
pub const MAX_DEDUP_KEYS: usize = 1_000_000;
/// How often idle streams are swept.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(30);
const SHARDS: usize = 64;

/// The in-memory engine. Cheap to share behind an `Arc`.
pub struct MemoryEngine {
    node_id: String,
    sink: OnceLock<Weak<dyn EngineSink>>,
    /// Shared with the sweeping task, which holds it weakly.
    store: Arc<Store>,
    /// Tests only: publications are stored but not handed to the hub (a lost live message).
    #[cfg(test)]
    muted: std::sync::atomic::AtomicBool,
}

/// What the engine keeps: streams, idempotency keys, presence.
struct Store {
    policies: Policies,
    /// Zero of the engine's clock (see the module documentation).
    started: tokio::time::Instant,
    hasher: RandomState,
    shards: Box<[Mutex<HashMap<ChannelName, Stream>>]>,
    dedup: Mutex<Dedup>,
    presence: Mutex<HashMap<ChannelName, HashMap<String, PresenceEntry>>>,
    /// Channels with local subscribers: their stream state is never swept, so their epoch is stable.
    subscribed: Mutex<HashSet<ChannelName>>,
}

struct Stream {
    epoch: Epoch,
    offset: u64,
    /// Each publication with when it was stored (milliseconds on the engine's clock).
    history: VecDeque<(u64, Arc<Publication>)>,
    /// Sum of the envelope lengths in `history`.
    history_bytes: usize,
    last_publish_ms: u64,
    /// Tests only: the epoch this stream was fenced from and the last offset of it that survived.
    #[cfg(test)]
    fenced_from: Option<(Epoch, u64)>,
}

#[derive(Default)]
struct Dedup {
    keys: HashMap<(ChannelName, String), DedupEntry>,
    /// Insertion order, for expiry and the cap; entries whose key was replaced are skipped.
    order: VecDeque<(u64, ChannelName, String)>,
}

struct DedupEntry {
    position: Position,
    correlation_id: Arc<str>,
    expires_ms: u64,
}

impl Stream {
    fn new(now: u64) -> Self {
        Self {
            epoch: Epoch::generate(),
            offset: 0,
            history: VecDeque::new(),
            history_bytes: 0,
            last_publish_ms: now,
            #[cfg(test)]
            fenced_from: None,
        }
    }

    /// Whether `since` lies beyond what survived a loss of this stream's data. This engine never loses
    /// what it acknowledged; tests simulate a loss with `MemoryEngine::fence`.
    fn lost(&self, since: &Position) -> bool {
        #[cfg(test)]
        if let Some((epoch, survived)) = &self.fenced_from {
            return since.epoch == *epoch && since.offset > *survived;
        }
        let _ = since;
        false
    }

    fn top(&self) -> Position {
        Position::new(self.epoch.clone(), self.offset)
    }

    fn push(&mut self, now: u64, publication: Arc<Publication>) {
        self.history_bytes += publication.envelope().len();
        self.history.push_back((now, publication));
    }

    /// Drops the oldest publications while history is over its count or its bytes (keeping the newest
    /// one whatever its size) and those older than its age.
    fn trim(&mut self, policy: &HistoryPolicy, now: u64) {
        let oldest_kept = now.saturating_sub(policy.ttl.as_millis() as u64);
        while self.history.len() > policy.size
            || (self.history.len() > 1 && self.history_bytes > policy.max_bytes)
            || self.history.front().is_some_and(|(stored_ms, _)| *stored_ms < oldest_kept)
        {
            if let Some((_, dropped)) = self.history.pop_front() {
                self.history_bytes -= dropped.envelope().len();
            }
        }
    }
}

impl MemoryEngine {
    pub fn new(node_id: impl Into<String>, policies: Policies) -> Self {
        let store = Store {
            policies,
            started: tokio::time::Instant::now(),
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            dedup: Mutex::new(Dedup::default()),
            presence: Mutex::new(HashMap::new()),
            subscribed: Mutex::new(HashSet::new()),
        };
        Self {
            node_id: node_id.into(),
            sink: OnceLock::new(),
            store: Arc::new(store),
            #[cfg(test)]
            muted: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn sink(&self) -> Option<Arc<dyn EngineSink>> {
        self.sink.get().and_then(Weak::upgrade)
    }

    /// Drops stream state of channels idle for longer than their history age and without local
    /// subscribers, and expired idempotency keys. Returns how many streams were dropped. The engine
    /// does this itself once started; calling it too is harmless.
    pub fn sweep(&self) -> usize {
        self.store.sweep()
    }
}

/// Sweeps `store` every [`SWEEP_INTERVAL`] until the engine that owns it is dropped.
async fn sweep_periodically(store: Weak<Store>) {
    let mut interval = tokio::time::interval(SWEEP_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    loop {
        interval.tick().await;
        let Some(store) = store.upgrade() else { break };
        let dropped = store.sweep();
        tracing::debug!(dropped, "swept idle streams");
    }
}

impl Store {
    /// Milliseconds on the engine's clock.
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn shard(&self, channel: &ChannelName) -> &Mutex<HashMap<ChannelName, Stream>> {
        let index = (self.hasher.hash_one(channel) as usize) % SHARDS;
        &self.shards[index]
    }

    fn sweep(&self) -> usize {
        let now = self.now();
        let subscribed = lock(&self.subscribed).clone();
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut streams = lock(shard);
            streams.retain(|channel, stream| {
                let policy = self.policies.history(channel);
                stream.trim(&policy, now);
                let idle = now.saturating_sub(stream.last_publish_ms) > policy.ttl.as_millis() as u64;
                let keep = !idle || subscribed.contains(channel);
                dropped += usize::from(!keep);
                keep
            });
        }
        let mut dedup = lock(&self.dedup);
        dedup.prune(now, MAX_DEDUP_KEYS);
        dropped
    }
}

impl Dedup {
    fn prune(&mut self, now: u64, cap: usize) {
        while let Some((expires_ms, _, _)) = self.order.front() {
            if *expires_ms > now && self.order.len() <= cap {
                break;
            }
            if let Some((expires_ms, channel, key)) = self.order.pop_front() {
                let map_key = (channel, key);
                if self.keys.get(&map_key).is_some_and(|e| e.expires_ms == expires_ms) {
                    self.keys.remove(&map_key);
                }
            }
        }
    }
}

#[async_trait]
impl Engine for MemoryEngine {
    fn node_id(&self) -> &str {
        &self.node_id
    }

    async fn start(&self, sink: Weak<dyn EngineSink>) -> Result<(), EngineError> {
        self.sink.set(sink).map_err(|_| EngineError::Protocol("engine started twice".into()))?;
        tokio::spawn(sweep_periodically(Arc::downgrade(&self.store)));
        Ok(())
    }

    async fn publish(&self, request: PublishRequest) -> Result<PublishOutcome, EngineError> {
        let store = &*self.store;
        let now = store.now();
        let window_ms = store.policies.dedup_window().as_millis() as u64;
        // Lock order: dedup, then the channel's shard. The dedup lock is only taken for keyed publishes.
        let mut dedup = request.idempotency_key.as_ref().map(|_| lock(&store.dedup));
        if let (Some(dedup), Some(key)) = (dedup.as_mut(), request.idempotency_key.as_ref()) {
            dedup.prune(now, MAX_DEDUP_KEYS);
            if let Some(entry) = dedup.keys.get(&(request.channel.clone(), key.clone())) {
                return Ok(PublishOutcome {
                    position: entry.position.clone(),
                    correlation_id: entry.correlation_id.clone(),
                    duplicate: true,
                    receivers: None,
                });
            }
        }
        let policy = store.policies.history(&request.channel);
        let mut streams = lock(store.shard(&request.channel));
        let stream = streams.entry(request.channel.clone()).or_insert_with(|| Stream::new(now));
        stream.offset += 1;
        stream.last_publish_ms = now;
        let position = stream.top();
        let publication = Arc::new(
            Publication::new(
                request.channel.clone(),
                position.clone(),
                request.event,
                &request.data,
                request.correlation_id.clone(),
                now_ms(),
                request.receipt.map(|r| r.id),
            )
            .with_trace_parent(request.trace_parent.clone()),
        );
        stream.push(now, publication.clone());
        stream.trim(&policy, now);
        if let (Some(dedup), Some(key)) = (dedup.as_mut(), request.idempotency_key) {
            let expires_ms = now + window_ms;
            dedup.order.push_back((expires_ms, request.channel.clone(), key.clone()));
            dedup.keys.insert(
                (request.channel, key),
                DedupEntry { position: position.clone(), correlation_id: request.correlation_id.clone(), expires_ms },
            );
        }
        drop(dedup);
        if let Some(sink) = self.sink().filter(|_| !self.is_muted()) {
            sink.deliver(publication);
        }
        drop(streams);
        Ok(PublishOutcome { position, correlation_id: request.correlation_id, duplicate: false, receivers: None })
    }

    fn subscribe(&self, channel: &ChannelName) -> SubscribeFuture {
        lock(&self.store.subscribed).insert(channel.clone());
        Box::pin(std::future::ready(Ok(())))
    }

    fn unsubscribe(&self, channel: &ChannelName) {
        lock(&self.store.subscribed).remove(channel);
    }

    async fn history(
        &self,
        channel: &ChannelName,
        since: Option<&Position>,
        limit: usize,
    ) -> Result<History, EngineError> {
        let store = &*self.store;
        let now = store.now();
        let policy = store.policies.history(channel);
        let mut streams = lock(store.shard(channel));
        let stream = streams.entry(channel.clone()).or_insert_with(|| Stream::new(now));
        stream.trim(&policy, now);
        let top = stream.top();
        let Some(since) = since else {
            let skip = stream.history.len().saturating_sub(limit);
            return Ok(History::Covered {
                top,
                publications: stream.history.iter().skip(skip).map(|(_, p)| p.clone()).collect(),
            });
        };
        if since.epoch != stream.epoch || since.offset > stream.offset {
            return Ok(History::Gone { top, rolled_back: stream.lost(since) });
        }
        if since.offset == stream.offset {
            return Ok(History::Covered { top, publications: Vec::new() });
        }
        let first = stream.history.front().map_or(u64::MAX, |(_, p)| p.position.offset);
        if first > since.offset + 1 {
            return Ok(History::Gone { top, rolled_back: false });
        }
        let skip = (since.offset + 1 - first) as usize;
        let publications = stream.history.iter().skip(skip).take(limit).map(|(_, p)| p.clone()).collect();
        Ok(History::Covered { top, publications })
    }

    async fn top(&self, channel: &ChannelName) -> Result<Position, EngineError> {
        let store = &*self.store;
        let mut streams = lock(store.shard(channel));
        Ok(streams.entry(channel.clone()).or_insert_with(|| Stream::new(store.now())).top())
    }

    async fn presence_join(&self, channel: &ChannelName, entry: PresenceEntry) -> Result<(), EngineError> {
        lock(&self.store.presence).entry(channel.clone()).or_default().insert(entry.connection_id.clone(), entry);
        Ok(())
    }

    fn presence_leave(&self, channel: &ChannelName, connection_id: &str) {
        let mut presence = lock(&self.store.presence);
        if let Entry::Occupied(mut entries) = presence.entry(channel.clone()) {
            entries.get_mut().remove(connection_id);
            if entries.get().is_empty() {
                entries.remove();
            }
        }
    }

    async fn presence(&self, channel: &ChannelName) -> Result<Vec<PresenceEntry>, EngineError> {
        let presence = lock(&self.store.presence);
        let mut entries: Vec<_> = presence.get(channel).map(|m| m.values().cloned().collect()).unwrap_or_default();
        entries.sort_by(|a, b| a.connection_id.cmp(&b.connection_id));
        Ok(entries)
    }

    async fn disconnect_user(&self, user: &str) -> Result<usize, EngineError> {
        Ok(self.sink().map_or(0, |sink| sink.disconnect_user(user)))
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, EngineError> {
        let hub = self.sink().map(|sink| sink.stats()).unwrap_or_default();
        Ok(vec![NodeInfo {
            node: self.node_id.clone(),
            stats: crate::stats::NodeStats { hub, probe_rtt_us: None, ready: true },
        }])
    }

    async fn ready(&self) -> bool {
        true
    }
}

impl MemoryEngine {
    #[cfg(not(test))]
    fn is_muted(&self) -> bool {
        false
    }
}

/// Faults a real engine can show and this one cannot, for the delivery tests of the hub and sessions.
#[cfg(test)]
impl MemoryEngine {
    fn is_muted(&self) -> bool {
        self.muted.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// While muted, publications are stored in history but never handed to the hub (as when a
    /// distributed engine's subscriber lost live messages).
    pub(crate) fn set_muted(&self, muted: bool) {
        self.muted.store(muted, std::sync::atomic::Ordering::SeqCst);
    }

    /// Moves `channel` to a new epoch with empty history, as a distributed engine fences a channel.
    /// With `survived`, the old epoch lost its data after that offset: positions beyond it are
    /// answered `History::Gone { rolled_back: true }`. Returns the new top.
    pub(crate) fn fence(&self, channel: &ChannelName, survived: Option<u64>) -> Position {
        let store = &*self.store;
        let mut streams = lock(store.shard(channel));
        let stream = streams.entry(channel.clone()).or_insert_with(|| Stream::new(store.now()));
        let mut fresh = Stream::new(store.now());
        fresh.fenced_from = survived.map(|offset| (stream.epoch.clone(), offset));
        *stream = fresh;
        stream.top()
    }

    /// Takes `channel` back to `offset` in the same epoch, forgetting what came after (data restored
    /// under a running engine, not yet fenced): offsets after it will be assigned again.
    pub(crate) fn roll_back(&self, channel: &ChannelName, offset: u64) {
        let mut streams = lock(self.store.shard(channel));
        if let Some(stream) = streams.get_mut(channel) {
            stream.offset = stream.offset.min(offset);
            while stream.history.back().is_some_and(|(_, p)| p.position.offset > offset) {
                if let Some((_, dropped)) = stream.history.pop_back() {
                    stream.history_bytes -= dropped.envelope().len();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn request(channel: &ChannelName, key: Option<&str>) -> PublishRequest {
        PublishRequest {
            channel: channel.clone(),
            event: Arc::from("message"),
            data: RawValue::from_string("1".into()).expect("json"),
            idempotency_key: key.map(str::to_owned),
            correlation_id: Arc::from("c"),
            receipt: None,
            trace_parent: None,
        }
    }

    #[tokio::test]
    async fn offsets_history_and_gaps() {
        let policies = Policies {
            default_history: HistoryPolicy { size: 3, ttl: Duration::from_secs(60), ..HistoryPolicy::default() },
            ..Policies::default()
        };
        let engine = MemoryEngine::new("n", policies);
        let ch = ChannelName::parse("a").expect("channel");
        let start = engine.top(&ch).await.expect("top");
        assert_eq!(start.offset, 0);
        for expected in 1..=5 {
            let out = engine.publish(request(&ch, None)).await.expect("publish");
            assert_eq!(out.position, Position::new(start.epoch.clone(), expected));
        }
        let covered = |since: u64| {
            let engine = &engine;
            let ch = &ch;
            let epoch = start.epoch.clone();
            async move {
                match engine.history(ch, Some(&Position::new(epoch, since)), 100).await.expect("history") {
                    History::Covered { publications, .. } => {
                        Some(publications.iter().map(|p| p.position.offset).collect::<Vec<_>>())
                    }
                    History::Gone { .. } => None,
                }
            }
        };
        assert_eq!(covered(5).await, Some(vec![]));
        assert_eq!(covered(2).await, Some(vec![3, 4, 5]));
        assert_eq!(covered(1).await, None, "offset 2 was trimmed");
        assert_eq!(covered(6).await, None, "a position from the future is not covered");
        let other = Position::new(Epoch::generate(), 5);
        assert!(matches!(engine.history(&ch, Some(&other), 10).await, Ok(History::Gone { .. })));
    }

    #[tokio::test]
    async fn history_is_bounded_in_bytes_and_keeps_the_newest_whatever_its_size() {
        async fn publish(engine: &MemoryEngine, bytes: usize) {
            let mut request = request(&ChannelName::parse("a").expect("channel"), None);
            request.data = RawValue::from_string(format!("\"{}\"", "x".repeat(bytes))).expect("json");
            engine.publish(request).await.expect("publish");
        }
        async fn kept(engine: &MemoryEngine) -> (Vec<u64>, usize) {
            match engine.history(&ChannelName::parse("a").expect("channel"), None, 1000).await.expect("history") {
                History::Covered { publications, .. } => {
                    let bytes: usize = publications.iter().map(|p| p.envelope().len()).sum();
                    (publications.iter().map(|p| p.position.offset).collect(), bytes)
                }
                History::Gone { .. } => panic!("no since, no gap"),
            }
        }
        let max_bytes = 10_000;
        let policies = Policies {
            default_history: HistoryPolicy { size: 100, max_bytes, ..HistoryPolicy::default() },
            ..Policies::default()
        };
        let engine = MemoryEngine::new("n", policies);
        for _ in 0..30 {
            publish(&engine, 1_000).await;
        }
        let (offsets, bytes) = kept(&engine).await;
        assert!(bytes <= max_bytes, "{bytes} bytes kept");
        assert!(bytes + 1_200 > max_bytes, "only as many dropped as needed: {bytes}");
        assert_eq!(offsets.last(), Some(&30));
        assert!(offsets.windows(2).all(|w| w[1] == w[0] + 1), "the oldest go first: {offsets:?}");
        // A publication larger than the whole budget is kept, alone, until the next one.
        publish(&engine, 50_000).await;
        assert_eq!(kept(&engine).await.0, vec![31]);
        publish(&engine, 10).await;
        assert_eq!(kept(&engine).await.0, vec![32]);
        publish(&engine, 10).await;
        assert_eq!(kept(&engine).await.0, vec![32, 33]);
        // The count bound still applies, and 0 keeps nothing.
        let none =
            Policies { default_history: HistoryPolicy { size: 0, ..HistoryPolicy::default() }, ..Policies::default() };
        let engine = MemoryEngine::new("n", none);
        publish(&engine, 10).await;
        assert_eq!(kept(&engine).await, (vec![], 0));
    }

    #[tokio::test]
    async fn idempotency_key_publishes_once() {
        let engine = MemoryEngine::new("n", Policies::default());
        let ch = ChannelName::parse("a").expect("channel");
        let first = engine.publish(request(&ch, Some("k"))).await.expect("publish");
        let second = engine.publish(request(&ch, Some("k"))).await.expect("publish");
        let other_channel = engine.publish(request(&ChannelName::parse("b").expect("c"), Some("k"))).await.expect("p");
        assert!(!first.duplicate && second.duplicate && !other_channel.duplicate);
        assert_eq!(first.position, second.position);
        assert_eq!(engine.top(&ch).await.expect("top").offset, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn history_expires_by_age_on_the_engines_clock() {
        let policies = Policies {
            default_history: HistoryPolicy { ttl: Duration::from_secs(10), ..HistoryPolicy::default() },
            ..Policies::default()
        };
        let engine = MemoryEngine::new("n", policies);
        let ch = ChannelName::parse("a").expect("channel");
        let first = engine.publish(request(&ch, None)).await.expect("publish").position;
        tokio::time::sleep(Duration::from_secs(6)).await;
        engine.publish(request(&ch, None)).await.expect("publish");
        tokio::time::sleep(Duration::from_secs(6)).await;
        let since = Position::new(first.epoch.clone(), 0);
        assert!(matches!(engine.history(&ch, Some(&since), 10).await, Ok(History::Gone { rolled_back: false, .. })));
        match engine.history(&ch, Some(&first), 10).await.expect("history") {
            History::Covered { publications, .. } => assert_eq!(publications.len(), 1),
            History::Gone { .. } => panic!("offset 2 is 6 s old, within the 10 s age"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_started_engine_sweeps_itself_and_stops_with_the_engine() {
        let policies = Policies {
            default_history: HistoryPolicy { ttl: Duration::from_secs(10), ..HistoryPolicy::default() },
            dedup_window: Some(Duration::from_secs(10)),
            ..Policies::default()
        };
        let engine = Arc::new(MemoryEngine::new("n", policies));
        let hub = crate::hub::Hub::start(engine.clone(), crate::hub::HubConfig::default()).await.expect("hub");
        let (idle, watched) = (ChannelName::parse("idle").expect("c"), ChannelName::parse("watched").expect("c"));
        let mut session = hub.open_session(crate::session::Transport::Sse, None).expect("session");
        session.subscribe(watched.clone(), None, &mut Vec::new()).await.expect("subscribe");
        let idle_before = engine.publish(request(&idle, Some("k"))).await.expect("publish").position;
        let watched_before = engine.publish(request(&watched, None)).await.expect("publish").position;
        tokio::time::sleep(SWEEP_INTERVAL * 2 + Duration::from_secs(1)).await;
        // Nobody called `sweep`: the idle channel's state is gone (a fresh epoch), its key forgotten.
        let idle_now = engine.top(&idle).await.expect("top");
        assert_ne!(idle_now.epoch, idle_before.epoch);
        assert!(!engine.publish(request(&idle, Some("k"))).await.expect("publish").duplicate);
        // A channel with a local subscriber keeps its epoch.
        assert_eq!(engine.top(&watched).await.expect("top"), watched_before);
        drop((session, hub));
        let store = Arc::downgrade(&engine.store);
        drop(engine);
        assert_eq!(store.strong_count(), 0, "the sweeping task holds the store weakly");
        tokio::time::sleep(SWEEP_INTERVAL * 2).await;
    }

    #[test]
    fn dedup_cap_forgets_oldest() {
        let mut dedup = Dedup::default();
        let ch = ChannelName::parse("a").expect("channel");
        for i in 0..10u64 {
            dedup.order.push_back((u64::MAX, ch.clone(), i.to_string()));
            dedup.keys.insert(
                (ch.clone(), i.to_string()),
                DedupEntry {
                    position: Position::new(Epoch::generate(), i),
                    correlation_id: Arc::from("c"),
                    expires_ms: u64::MAX,
                },
            );
        }
        dedup.prune(0, 4);
        assert_eq!(dedup.keys.len(), 4);
        assert!(dedup.keys.contains_key(&(ch, "9".to_owned())));
    }
}
