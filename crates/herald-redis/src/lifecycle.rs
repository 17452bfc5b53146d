//! The lifecycle store on Redis (one server, a primary found through Sentinel, or a Redis Cluster).
//! Every node applies its own transitions; Redis decides, atomically per transition, whether the
//! cluster's state changed. A script touches a channel's sets and the one events stream together, so on
//! a Redis Cluster every key below carries the hash tag `{hooks}` (the sets as `{hooks}:hn:<channel>`
//! and `{hooks}:hu:<channel> <user>`): the lifecycle state lives on one shard, which sees a few commands
//! per connection that joins or leaves a channel, never per publication.
//!
//! Keys (under the prefix; `<entry>` is `1 <channel> <user>` for a user in a channel, `2 <channel>`
//! for the channel itself: a user's entry sorts before its channel's, so at the same due time its
//! `presence.left` comes before the channel's `channel.vacated`):
//! - `{<channel>}:hn` / `{<channel>}:hu:<user>`: sets of the nodes with local members (connections of
//!   the user) in the channel;
//! - `hooks:idx:<node>`: the entries a node holds, so that a dead node's can be removed;
//!   `hooks:nodes`: the nodes that have an index;
//! - `hooks:pending`: entries whose set became empty, scored by when their grace ends;
//! - `hooks`: the events stream (`MAXLEN ~` [`MAX_STREAM_EVENTS`]), `hooks:cursor`: the last stream ID
//!   delivered (or given up), `hooks:leader`: the delivering node's lease.
//!
//! Rules every edit must keep: an event is appended only by a script that saw the set go from empty to
//! one node (arrive, and no pending grace to cancel) or found it still empty when the grace ended; only
//! the node holding the lease ends graces, sweeps dead nodes and delivers.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use herald_core::lifecycle::{EventKind, LifecycleEvent, LifecycleStore, Transition, new_event_id};
use herald_core::publication::now_ms;
use herald_core::{ChannelName, EngineError};
use redis::{AsyncCommands, Script};

use crate::connection::Commands;

/// Events the stream keeps at most (approximately); older ones are trimmed, delivered or not.
pub const MAX_STREAM_EVENTS: usize = 100_000;
/// How long the delivering node's lease lasts without renewal (it is renewed every third of it).
pub const LEASE: Duration = Duration::from_secs(3);
/// How often the leader looks for nodes whose lease expired.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Due graces ended per tick at most (the rest at the next tick).
const DUE_BATCH: isize = 256;

/// A node's transition joins the set; the first node in appends the arrival event, unless the entry
/// was within its grace (then the grace is cancelled and nothing is sent: no flap).
/// KEYS: set, index, pending, stream, nodes-with-index. ARGV: node, entry, maxlen, id, type, channel,
/// at, user (optional).
const ARRIVE: &str = r#"
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[5], ARGV[1])
if redis.call('SADD', KEYS[1], ARGV[1]) == 1 and redis.call('SCARD', KEYS[1]) == 1 then
  if redis.call('ZREM', KEYS[3], ARGV[2]) == 0 then
    if ARGV[8] then
      redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[3], '*', 'id', ARGV[4], 'type', ARGV[5], 'channel', ARGV[6], 'at', ARGV[7], 'user', ARGV[8])
    else
      redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[3], '*', 'id', ARGV[4], 'type', ARGV[5], 'channel', ARGV[6], 'at', ARGV[7])
    end
  end
end
return 1
"#;

/// A node leaves the set; the last node out starts the entry's grace.
/// KEYS: set, index, pending. ARGV: node, entry, due.
///
/// A grace never ends before one started earlier: its end is at least the latest already pending.
/// Each node passes its own clock's time, taken when the change was queued, so without this a
/// channel emptied last, by a node whose time was earlier, could end its grace before that of the user
/// who left it (`channel.vacated` before `presence.left`). A node makes its `presence.left` entry
/// before its `channel.vacated`, so in the order the scripts run the channel's comes last; on equal
/// ends a user's entry (`1 …`) sorts before the channel's (`2 …`). A grace is longer than asked only by
/// how far the nodes' clocks or their queues differ.
const DEPART: &str = r#"
redis.call('SREM', KEYS[2], ARGV[2])
if redis.call('SREM', KEYS[1], ARGV[1]) == 1 and redis.call('SCARD', KEYS[1]) == 0 then
  local due = ARGV[3]
  local latest = redis.call('ZRANGE', KEYS[3], -1, -1, 'WITHSCORES')
  if latest[2] and tonumber(latest[2]) > tonumber(due) then due = latest[2] end
  redis.call('ZADD', KEYS[3], due, ARGV[2])
end
return 1
"#;

/// The entry's grace ended: the departure event is appended if the set is still empty.
/// KEYS: set, pending, stream. ARGV: entry, now, maxlen, id, type, channel, user (optional).
const FINISH: &str = r#"
local due = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not due or tonumber(due) > tonumber(ARGV[2]) then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('SCARD', KEYS[1]) > 0 then return 0 end
if ARGV[7] then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'id', ARGV[4], 'type', ARGV[5], 'channel', ARGV[6], 'at', due, 'user', ARGV[7])
else
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'id', ARGV[4], 'type', ARGV[5], 'channel', ARGV[6], 'at', due)
end
return 1
"#;

/// Takes the lease when nobody holds it, renews it when this node does. KEYS: lease. ARGV: node, ms.
const LEAD: &str = r#"
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// Gives the lease up if this node holds it. KEYS: lease. ARGV: node.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"#;

/// The Redis lifecycle store of one node.
pub struct RedisLifecycle {
    inner: Arc<Inner>,
}

struct Inner {
    commands: Arc<Commands>,
    prefix: String,
    /// The nodes' heartbeat sorted set (the engine's `Keys::nodes`).
    nodes: String,
    /// On a Redis Cluster: every key under the hash tag `{hooks}`.
    sharded: bool,
    node: String,
    grace: Duration,
    node_ttl: Duration,
    /// Whether this node held the lease at its last renewal (kept by the lease task).
    leading: AtomicBool,
    /// The node stopped: the lease task ends, and the lease is not taken again.
    closed: AtomicBool,
    /// When the leader last swept dead nodes (Unix ms).
    last_sweep: AtomicU64,
    arrive: Script,
    depart: Script,
    finish: Script,
    lead: Script,
    release: Script,
}

/// What a transition is about: the channel, or a user in it.
struct Entry {
    channel: ChannelName,
    user: Option<String>,
}

impl Entry {
    fn parse(text: &str) -> Option<Entry> {
        let (kind, rest) = text.split_once(' ')?;
        match kind {
            "2" => Some(Entry { channel: ChannelName::parse(rest).ok()?, user: None }),
            "1" => {
                let (channel, user) = rest.split_once(' ')?;
                Some(Entry { channel: ChannelName::parse(channel).ok()?, user: Some(user.to_owned()) })
            }
            _ => None,
        }
    }

    fn text(&self) -> String {
        match &self.user {
            Some(user) => format!("1 {} {user}", self.channel),
            None => format!("2 {}", self.channel),
        }
    }
}

impl Inner {
    fn key(&self, name: &str) -> String {
        if self.sharded { format!("{}:{{hooks}}:{name}", self.prefix) } else { format!("{}:{name}", self.prefix) }
    }

    /// The set of nodes of `entry`: in its channel's slot, or on a cluster in the slot of `{hooks}` with
    /// the others (a channel name holds no space, so `<channel> <user>` names one pair).
    fn set(&self, entry: &Entry) -> String {
        match (&entry.user, self.sharded) {
            (Some(user), false) => format!("{}:{{{}}}:hu:{user}", self.prefix, entry.channel),
            (None, false) => format!("{}:{{{}}}:hn", self.prefix, entry.channel),
            (Some(user), true) => format!("{}:{{hooks}}:hu:{} {user}", self.prefix, entry.channel),
            (None, true) => format!("{}:{{hooks}}:hn:{}", self.prefix, entry.channel),
        }
    }

    fn index(&self, node: &str) -> String {
        self.key(&format!("hooks:idx:{node}"))
    }

    async fn arrive(&self, entry: &Entry, now: u64) -> Result<(), EngineError> {
        let kind = if entry.user.is_some() { EventKind::PresenceJoined } else { EventKind::ChannelOccupied };
        let live = self.commands.get().await?;
        let mut invocation = self.arrive.prepare_invoke();
        invocation
            .key(self.set(entry))
            .key(self.index(&self.node))
            .key(self.key("hooks:pending"))
            .key(self.key("hooks"))
            .key(self.key("hooks:nodes"))
            .arg(&self.node)
            .arg(entry.text())
            .arg(MAX_STREAM_EVENTS)
            .arg(new_event_id())
            .arg(kind.as_str())
            .arg(entry.channel.as_str())
            .arg(now);
        if let Some(user) = &entry.user {
            invocation.arg(user);
        }
        let mut conn = live.conn.clone();
        self.commands.on(&live, invocation.invoke_async::<i64>(&mut conn)).await.map(drop)
    }

    async fn depart(&self, node: &str, entry: &Entry, now: u64) -> Result<(), EngineError> {
        let due = now.saturating_add(self.grace.as_millis() as u64);
        let live = self.commands.get().await?;
        let mut invocation = self.depart.prepare_invoke();
        invocation
            .key(self.set(entry))
            .key(self.index(node))
            .key(self.key("hooks:pending"))
            .arg(node)
            .arg(entry.text())
            .arg(due);
        let mut conn = live.conn.clone();
        self.commands.on(&live, invocation.invoke_async::<i64>(&mut conn)).await.map(drop)
    }

    /// Removes every entry of `node`'s index (a node that is gone, or this one as it starts).
    async fn release_node(&self, node: &str, now: u64) -> Result<(), EngineError> {
        let live = self.commands.get().await?;
        let mut conn = live.conn.clone();
        let entries: Vec<String> = self.commands.on(&live, conn.smembers(self.index(node))).await?;
        for text in entries {
            match Entry::parse(&text) {
                Some(entry) => self.depart(node, &entry, now).await?,
                None => {
                    let _: i64 = self.commands.on(&live, conn.srem(self.index(node), &text)).await?;
                }
            }
        }
        let live = self.commands.get().await?;
        let mut conn = live.conn.clone();
        let mut pipe = redis::pipe();
        pipe.del(self.index(node)).ignore().srem(self.key("hooks:nodes"), node).ignore();
        self.commands.on(&live, pipe.query_async::<()>(&mut conn)).await
    }

    /// Releases the entries of nodes whose lease (heartbeat in the nodes sorted set) expired.
    async fn sweep(&self, now: u64) -> Result<(), EngineError> {
        let live = self.commands.get().await?;
        let mut conn = live.conn.clone();
        let indexed: Vec<String> = self.commands.on(&live, conn.smembers(self.key("hooks:nodes"))).await?;
        let since = now.saturating_sub(self.node_ttl.as_millis() as u64);
        let alive: Vec<String> = self.commands.on(&live, conn.zrangebyscore(&self.nodes, since, "+inf")).await?;
        for node in indexed.iter().filter(|node| **node != self.node && !alive.contains(node)) {
            tracing::info!(%node, "hooks: releasing the channels of a node whose lease expired");
            self.release_node(node, now).await?;
        }
        Ok(())
    }

    /// Ends the graces that are due, oldest first.
    async fn finish_due(&self, now: u64) -> Result<(), EngineError> {
        let live = self.commands.get().await?;
        let mut conn = live.conn.clone();
        let due: Vec<String> =
            self.commands.on(&live, conn.zrangebyscore_limit(self.key("hooks:pending"), 0, now, 0, DUE_BATCH)).await?;
        for text in due {
            let Some(entry) = Entry::parse(&text) else {
                let _: i64 = self.commands.on(&live, conn.zrem(self.key("hooks:pending"), &text)).await?;
                continue;
            };
            let kind = if entry.user.is_some() { EventKind::PresenceLeft } else { EventKind::ChannelVacated };
            let mut invocation = self.finish.prepare_invoke();
            invocation
                .key(self.set(&entry))
                .key(self.key("hooks:pending"))
                .key(self.key("hooks"))
                .arg(&text)
                .arg(now)
                .arg(MAX_STREAM_EVENTS)
                .arg(new_event_id())
                .arg(kind.as_str())
                .arg(entry.channel.as_str());
            if let Some(user) = &entry.user {
                invocation.arg(user);
            }
            let _: i64 = self.commands.on(&live, invocation.invoke_async(&mut conn)).await?;
        }
        Ok(())
    }

    async fn renew_lease(&self) -> Result<bool, EngineError> {
        let live = self.commands.get().await?;
        let mut conn = live.conn.clone();
        let mut invocation = self.lead.prepare_invoke();
        invocation.key(self.key("hooks:leader")).arg(&self.node).arg(LEASE.as_millis() as u64);
        let held: i64 = self.commands.on(&live, invocation.invoke_async(&mut conn)).await?;
        Ok(held == 1)
    }
}

/// Renews (or tries to take) the lease every third of it while the store lives.
async fn keep_lease(inner: Weak<Inner>) {
    let mut interval = tokio::time::interval(LEASE / 3);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        interval.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        if inner.closed.load(Ordering::Relaxed) {
            return;
        }
        let held = match inner.renew_lease().await {
            Ok(held) => held,
            Err(error) => {
                tracing::debug!(%error, "hooks: the delivery lease could not be renewed");
                false
            }
        };
        inner.leading.store(held, Ordering::Relaxed);
    }
}

impl RedisLifecycle {
    /// The store of node `node` on `commands`' Redis, keys under `prefix`; graces of `grace`, nodes
    /// gone once they have not heartbeaten (into `nodes`) for `node_ttl`. Releases what this node's previous run left
    /// (it has no connection yet), and starts keeping the delivery lease.
    pub(crate) async fn start(
        commands: Arc<Commands>,
        prefix: &str,
        nodes: String,
        node: &str,
        grace: Duration,
        node_ttl: Duration,
    ) -> Result<Self, EngineError> {
        let sharded = commands.cluster().is_some();
        let inner = Arc::new(Inner {
            commands,
            prefix: prefix.to_owned(),
            nodes,
            sharded,
            node: node.to_owned(),
            grace,
            node_ttl,
            leading: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            last_sweep: AtomicU64::new(0),
            arrive: Script::new(ARRIVE),
            depart: Script::new(DEPART),
            finish: Script::new(FINISH),
            lead: Script::new(LEAD),
            release: Script::new(RELEASE),
        });
        inner.release_node(node, now_ms()).await?;
        tokio::spawn(keep_lease(Arc::downgrade(&inner)));
        Ok(Self { inner })
    }
}

#[async_trait]
impl LifecycleStore for RedisLifecycle {
    async fn apply(&self, transition: Transition, now_ms: u64) -> Result<(), EngineError> {
        let inner = &self.inner;
        match transition {
            Transition::Occupied(channel) => inner.arrive(&Entry { channel, user: None }, now_ms).await,
            Transition::Joined(channel, user) => inner.arrive(&Entry { channel, user: Some(user) }, now_ms).await,
            Transition::Vacated(channel) => inner.depart(&inner.node, &Entry { channel, user: None }, now_ms).await,
            Transition::Left(channel, user) => {
                inner.depart(&inner.node, &Entry { channel, user: Some(user) }, now_ms).await
            }
        }
    }

    async fn tick(&self, now_ms: u64) -> Result<(), EngineError> {
        let inner = &self.inner;
        if !inner.leading.load(Ordering::Relaxed) {
            return Ok(());
        }
        let last = inner.last_sweep.load(Ordering::Relaxed);
        if now_ms.saturating_sub(last) >= SWEEP_INTERVAL.as_millis() as u64 {
            inner.last_sweep.store(now_ms, Ordering::Relaxed);
            inner.sweep(now_ms).await?;
        }
        inner.finish_due(now_ms).await
    }

    async fn lead(&self) -> Result<bool, EngineError> {
        Ok(self.inner.leading.load(Ordering::Relaxed))
    }

    async fn pending(&self, max: usize) -> Result<Vec<LifecycleEvent>, EngineError> {
        let inner = &self.inner;
        let live = inner.commands.get().await?;
        let mut conn = live.conn.clone();
        let cursor: Option<String> = inner.commands.on(&live, conn.get(inner.key("hooks:cursor"))).await?;
        let start = match cursor {
            Some(cursor) => format!("({cursor}"),
            None => "-".to_owned(),
        };
        let reply: redis::streams::StreamRangeReply =
            inner.commands.on(&live, conn.xrange_count(inner.key("hooks"), start, "+", max)).await?;
        let mut events = Vec::new();
        let mut skipped = None;
        for entry in reply.ids {
            let text = |field: &str| entry.get::<String>(field);
            let event = (|| {
                Some(LifecycleEvent {
                    id: text("id")?,
                    kind: EventKind::parse(&text("type")?)?,
                    channel: ChannelName::parse(&text("channel")?).ok()?,
                    user: text("user"),
                    // A score read back (`FINISH`) is a double's text; integral here, but parsed as one.
                    at_ms: text("at")?.parse::<f64>().ok().filter(|at| at.is_finite() && *at >= 0.0)? as u64,
                    seq: entry.id.clone(),
                })
            })();
            match event {
                Some(event) => events.push(event),
                None if events.is_empty() => {
                    tracing::warn!(entry = %entry.id, "hooks: skipping a malformed event");
                    skipped = Some(entry.id.clone());
                }
                None => break,
            }
        }
        if let (Some(seq), true) = (skipped, events.is_empty()) {
            let _: () = inner.commands.on(&live, conn.set(inner.key("hooks:cursor"), seq)).await?;
        }
        Ok(events)
    }

    async fn ack(&self, event: &LifecycleEvent) -> Result<(), EngineError> {
        let inner = &self.inner;
        let live = inner.commands.get().await?;
        let mut conn = live.conn.clone();
        inner.commands.on(&live, conn.set(inner.key("hooks:cursor"), &event.seq)).await
    }

    fn overflowed(&self) -> u64 {
        0
    }

    async fn close(&self) -> Result<(), EngineError> {
        let inner = &self.inner;
        inner.closed.store(true, Ordering::Relaxed);
        inner.leading.store(false, Ordering::Relaxed);
        let live = inner.commands.get().await?;
        let mut conn = live.conn.clone();
        let mut invocation = inner.release.prepare_invoke();
        invocation.key(inner.key("hooks:leader")).arg(&inner.node);
        inner.commands.on(&live, invocation.invoke_async::<i64>(&mut conn)).await.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_a_user_sorts_before_its_channel() {
        let channel = ChannelName::parse("room:1").expect("channel");
        let user = Entry { channel: channel.clone(), user: Some("al ice".into()) };
        let whole = Entry { channel, user: None };
        for entry in [&user, &whole] {
            let parsed = Entry::parse(&entry.text()).expect("parses");
            assert_eq!((parsed.channel, parsed.user), (entry.channel.clone(), entry.user.clone()));
        }
        assert!(user.text() < whole.text(), "same due time: presence.left before channel.vacated");
        assert!(Entry::parse("3 room:1").is_none());
        assert!(Entry::parse("2 bad channel{").is_none());
    }

    const GRACE: Duration = Duration::from_millis(1000);

    /// Two nodes' stores on one real redis-server: `n1` starts first and so holds the lease; both
    /// heartbeat (as their engines would), so neither is swept unless the test stops one's heartbeat.
    async fn two_nodes(redis: &herald_testkit::RedisServer) -> (RedisLifecycle, RedisLifecycle, Arc<Commands>) {
        let prefix = format!("t{:08x}", rand::random::<u32>());
        let commands = || {
            let target = crate::connection::Target::parse(&redis.url()).expect("url");
            Arc::new(Commands::new(target, crate::connection::Connector::new(None), Duration::from_secs(2)))
        };
        let nodes = format!("{prefix}:nodes");
        let heartbeat = commands();
        for node in ["n1", "n2"] {
            heartbeat_now(&heartbeat, &nodes, node).await;
        }
        let ttl = Duration::from_secs(60);
        let n1 = RedisLifecycle::start(commands(), &prefix, nodes.clone(), "n1", GRACE, ttl).await.expect("n1");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !n1.lead().await.expect("lead") {
            assert!(tokio::time::Instant::now() < deadline, "n1 never took the lease");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let n2 = RedisLifecycle::start(commands(), &prefix, nodes, "n2", GRACE, ttl).await.expect("n2");
        (n1, n2, heartbeat)
    }

    async fn heartbeat_now(commands: &Commands, nodes: &str, node: &str) {
        let live = commands.get().await.expect("redis");
        let mut conn = live.conn.clone();
        let _: i64 = commands.on(&live, conn.zadd(nodes, node, now_ms())).await.expect("zadd");
    }

    /// Takes every pending event (acknowledging it): `(type, channel, user)`.
    async fn drain(store: &RedisLifecycle) -> Vec<(&'static str, String, Option<String>)> {
        let events = store.pending(100).await.expect("pending");
        if let Some(last) = events.last() {
            store.ack(last).await.expect("ack");
        }
        events.into_iter().map(|e| (e.kind.as_str(), e.channel.as_str().to_owned(), e.user)).collect()
    }

    fn room() -> ChannelName {
        ChannelName::parse("room:1").expect("channel")
    }

    #[tokio::test]
    async fn the_first_node_in_and_the_last_out_make_the_events_and_a_return_within_the_grace_none() {
        let redis = herald_testkit::RedisServer::start();
        let (n1, n2, _heartbeat) = two_nodes(&redis).await;
        let t = now_ms();
        n1.apply(Transition::Occupied(room()), t).await.expect("apply");
        n2.apply(Transition::Occupied(room()), t).await.expect("apply");
        n2.apply(Transition::Joined(room(), "u".into()), t).await.expect("apply");
        n1.apply(Transition::Joined(room(), "u".into()), t).await.expect("apply");
        assert_eq!(
            drain(&n1).await,
            [("channel.occupied", "room:1".into(), None), ("presence.joined", "room:1".into(), Some("u".into()))]
        );
        n1.apply(Transition::Left(room(), "u".into()), t + 1).await.expect("apply");
        n1.apply(Transition::Vacated(room()), t + 1).await.expect("apply");
        n1.tick(t + 5_000).await.expect("tick");
        assert_eq!(drain(&n1).await, [], "n2 still holds the channel and the user");
        n2.apply(Transition::Left(room(), "u".into()), t + 2).await.expect("apply");
        n2.apply(Transition::Vacated(room()), t + 2).await.expect("apply");
        n1.tick(t + 1_001).await.expect("tick");
        assert_eq!(drain(&n1).await, [], "within the grace");
        // Back within the grace, on the other node: no event at all.
        n1.apply(Transition::Occupied(room()), t + 500).await.expect("apply");
        n1.tick(t + 10_000).await.expect("tick");
        assert_eq!(drain(&n1).await, [("presence.left", "room:1".into(), Some("u".into()))]);
        n1.apply(Transition::Vacated(room()), t + 20_000).await.expect("apply");
        n2.tick(t + 30_000).await.expect("tick"); // not the leader: nothing ends here
        assert_eq!(drain(&n1).await, []);
        n1.tick(t + 30_000).await.expect("tick");
        assert_eq!(drain(&n1).await, [("channel.vacated", "room:1".into(), None)]);
        n1.tick(t + 40_000).await.expect("tick");
        assert_eq!(drain(&n1).await, [], "each event once");
    }

    #[tokio::test]
    async fn a_node_whose_lease_expired_is_released() {
        let redis = herald_testkit::RedisServer::start();
        let (n1, n2, heartbeat) = two_nodes(&redis).await;
        let t = now_ms();
        n2.apply(Transition::Occupied(room()), t).await.expect("apply");
        n2.apply(Transition::Joined(room(), "u".into()), t).await.expect("apply");
        assert_eq!(drain(&n1).await.len(), 2);
        drop(n2); // it stops, without a word; its heartbeat is 60 s old at t + 61 s
        heartbeat_now(&heartbeat, &n1.inner.nodes, "n1").await;
        n1.tick(t + 61_000).await.expect("tick: sweeps n2");
        n1.tick(t + 61_999).await.expect("tick");
        assert_eq!(drain(&n1).await, [], "the grace runs from the release");
        n1.tick(t + 62_000).await.expect("tick");
        assert_eq!(
            drain(&n1).await,
            [("presence.left", "room:1".into(), Some("u".into())), ("channel.vacated", "room:1".into(), None)]
        );
    }
}
