//! The node's pub/sub connection and the tasks around it.
//!
//! On one Redis (or behind Sentinel) the connection is one classic pub/sub connection. On a Redis
//! Cluster it is a cluster client subscribed with sharded pub/sub (`SSUBSCRIBE`): one connection per
//! shard primary, each channel subscribed at the primary serving its slot. When a slot moves, that
//! server unsubscribes its channels itself (`sunsubscribe` arrives unasked); the actor subscribes them
//! again (the client finds the new owner through the redirection) and the receiver re-syncs a channel
//! whenever it is confirmed again, since messages may have passed meanwhile. A shard's connection that
//! closes makes the actor connect anew and re-sync everything, as on one Redis.
//!
//! - The **actor** owns the subscription set. Requests arrive in the order the hub's channel
//!   memberships changed (it sends them under its lock), are applied in batches (one SUBSCRIBE or
//!   UNSUBSCRIBE for many channels), and a subscriber is answered once Redis confirmed the SUBSCRIBE.
//!   When the connection is lost (or the relay's probe says it went stale) the actor reconnects with
//!   backoff, resubscribes everything and hands the receiver the list of channels to re-sync.
//!   While it is disconnected, new subscriptions are refused at once (clients get 503) instead of waiting.
//! - The **receiver** reads messages in order and hands them to herald-core's relay (ordering, gap
//!   repair, re-sync, control protocols).
//! - The **keeper** extends the life of subscribed channels' state and checks, every probe interval,
//!   who answers on the command connection (a primary turned into a replica keeps its connections).
//!
//! The command queue from the hub is unbounded on purpose: it is fed under the hub's lock, where
//! waiting is not allowed; its length is bounded by how fast connections join and leave channels.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use futures_util::StreamExt;
use herald_core::engine::SubscribeFuture;
use herald_core::{ChannelName, EngineError, Policies, Relay};
use redis::aio::{PubSubSink, PubSubStream};
use redis::cluster_async::ClusterConnection;
use tokio::sync::{mpsc, oneshot};

use crate::connection::{ClusterTarget, Commands, lock};
use crate::keys::Keys;
use crate::scripts::key_life_ms;

enum Command {
    Subscribe(ChannelName, oneshot::Sender<Result<(), EngineError>>),
    Unsubscribe(ChannelName),
    /// The server dropped the channel's subscription itself (its slot moved to another shard).
    Resubscribe(ChannelName),
    /// The receiver of connection `generation` saw its stream end.
    Lost(u64),
    /// The prober found the subscription stale.
    Stale,
    /// Subscribe to these probe channels (Redis Cluster: one per shard) instead of the ones before.
    ProbeChannels(Vec<String>, oneshot::Sender<Result<(), EngineError>>),
}

/// Probe rounds kept waiting for their copies at most (older ones are given up).
const PROBE_ROUNDS: usize = 8;

/// A cluster's probes: the channels they go through (one per shard), and the rounds whose copies have
/// not all come back.
#[derive(Default)]
struct Probes {
    channels: Vec<String>,
    awaiting: VecDeque<(Vec<u8>, usize)>,
}

/// Most requests applied in one batch.
const MAX_BATCH: usize = 1024;
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The node's pub/sub side: what the engine asks of it, and what its tasks share.
pub(crate) struct PubSub {
    keys: Keys,
    /// The command connection: where the primary is, and the keeper's refreshes.
    commands: Arc<Commands>,
    policies: Policies,
    probe_interval: Duration,
    /// What received messages are handed to (set once, at start).
    relay: OnceLock<Arc<Relay>>,
    requests: mpsc::UnboundedSender<Command>,
    requests_rx: Mutex<Option<mpsc::UnboundedReceiver<Command>>>,
    /// Channels this node subscribes to (a copy of the actor's set, for the keeper).
    subscribed: Mutex<HashSet<ChannelName>>,
    /// On a cluster: the probe channels and the rounds under way.
    probes: Mutex<Probes>,
    /// The pub/sub connection is up.
    connected: AtomicBool,
    reconnects: AtomicU64,
    stopping: AtomicBool,
}

impl PubSub {
    pub(crate) fn new(keys: Keys, commands: Arc<Commands>, policies: Policies, probe_interval: Duration) -> Self {
        let (requests, rx) = mpsc::unbounded_channel();
        Self {
            keys,
            commands,
            policies,
            probe_interval,
            relay: OnceLock::new(),
            requests,
            requests_rx: Mutex::new(Some(rx)),
            subscribed: Mutex::new(HashSet::new()),
            probes: Mutex::new(Probes::default()),
            connected: AtomicBool::new(false),
            reconnects: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
        }
    }

    /// Starts the tasks (once): the actor, the verifier and the keeper.
    pub(crate) fn start(self: &Arc<Self>, relay: Arc<Relay>) -> Result<(), EngineError> {
        let twice = || EngineError::Protocol("engine started twice".into());
        self.relay.set(relay).map_err(|_| twice())?;
        let rx = lock(&self.requests_rx).take().ok_or_else(twice)?;
        tokio::spawn(actor(self.clone(), rx));
        tokio::spawn(verifier(self.clone()));
        tokio::spawn(keeper(self.clone()));
        Ok(())
    }

    /// As `Backplane::subscribe`: taken now, resolved once Redis confirmed the SUBSCRIBE.
    pub(crate) fn subscribe(&self, channel: &ChannelName) -> SubscribeFuture {
        let (tx, rx) = oneshot::channel();
        let sent = self.requests.send(Command::Subscribe(channel.clone(), tx));
        herald_core::engine::subscribe_answer(sent.is_ok(), rx)
    }

    pub(crate) fn unsubscribe(&self, channel: &ChannelName) {
        let _ = self.requests.send(Command::Unsubscribe(channel.clone()));
    }

    /// The relay's probe found the subscription stale: connect anew.
    pub(crate) fn stale(&self) {
        let _ = self.requests.send(Command::Stale);
    }

    /// Makes sure the probe goes through `channels` (one per shard), subscribing to them first when
    /// they changed.
    pub(crate) async fn probe_through(&self, channels: &[String]) -> Result<(), EngineError> {
        if lock(&self.probes).channels == channels {
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        if self.requests.send(Command::ProbeChannels(channels.to_vec(), tx)).is_err() {
            return Err(EngineError::Unavailable("redis pub/sub stopped".into()));
        }
        rx.await.unwrap_or_else(|_| Err(EngineError::Unavailable("redis pub/sub is reconnecting".into())))
    }

    /// The probe channels of the last round (Redis Cluster).
    pub(crate) fn probe_channels(&self) -> Vec<String> {
        lock(&self.probes).channels.clone()
    }

    /// A probe round is sent as `payload` through `copies` shards.
    pub(crate) fn expect_probe(&self, payload: &[u8], copies: usize) {
        let mut probes = lock(&self.probes);
        if probes.awaiting.len() >= PROBE_ROUNDS {
            probes.awaiting.pop_front();
        }
        probes.awaiting.push_back((payload.to_vec(), copies));
    }

    /// A copy of a probe came back; true once every shard's copy of its round did.
    fn probe_copy(&self, payload: &[u8]) -> bool {
        let mut probes = lock(&self.probes);
        let Some(index) = probes.awaiting.iter().position(|(p, _)| p == payload) else { return false };
        let remaining = &mut probes.awaiting[index].1;
        *remaining = remaining.saturating_sub(1);
        if *remaining > 0 {
            return false;
        }
        probes.awaiting.remove(index);
        true
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    pub(crate) fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// The tasks end at their next turn.
    pub(crate) fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }
}

/// Channels this node subscribes to keep their epoch while idle: their stream state is refreshed three
/// times per history age. History entries still age out (old cursors then get a reset).
async fn keeper(inner: Arc<PubSub>) {
    let every = (inner.policies.shortest_history_ttl() / 3).clamp(Duration::from_millis(100), Duration::from_secs(60));
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        if inner.stopping.load(Ordering::SeqCst) {
            return;
        }
        refresh_subscribed(&inner).await;
    }
}

async fn actor(inner: Arc<PubSub>, mut rx: mpsc::UnboundedReceiver<Command>) {
    let mut desired: BTreeSet<ChannelName> = BTreeSet::new();
    let mut generation = 0u64;
    let mut backoff = MIN_BACKOFF;
    let mut first = true;
    loop {
        if inner.stopping.load(Ordering::SeqCst) && inner.requests.is_closed() {
            return;
        }
        // Connect and subscribe everything wanted so far.
        let connected = connect(&inner, &desired).await;
        let (mut sink, stream) = match connected {
            Ok(pair) => pair,
            Err(error) => {
                inner.connected.store(false, Ordering::SeqCst);
                tracing::warn!(%error, retry_in_ms = backoff.as_millis() as u64, "redis pub/sub unavailable");
                let deadline = tokio::time::Instant::now() + backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                // Keep taking requests while down: refuse subscriptions, remember the wanted set.
                while let Ok(Some(command)) = tokio::time::timeout_at(deadline, rx.recv()).await {
                    match command {
                        Command::Subscribe(channel, reply) => {
                            lock(&inner.subscribed).insert(channel.clone());
                            desired.insert(channel);
                            let _ = reply.send(Err(EngineError::Unavailable("redis pub/sub is reconnecting".into())));
                        }
                        Command::Unsubscribe(channel) => {
                            lock(&inner.subscribed).remove(&channel);
                            desired.remove(&channel);
                        }
                        Command::ProbeChannels(channels, reply) => {
                            lock(&inner.probes).channels = channels;
                            let _ = reply.send(Err(EngineError::Unavailable("redis pub/sub is reconnecting".into())));
                        }
                        Command::Resubscribe(_) | Command::Lost(_) | Command::Stale => {}
                    }
                }
                continue;
            }
        };
        backoff = MIN_BACKOFF;
        generation += 1;
        if !first {
            inner.reconnects.fetch_add(1, Ordering::Relaxed);
            tracing::info!(channels = desired.len(), "redis pub/sub reconnected; re-syncing");
        }
        let resync: Vec<ChannelName> = if first { Vec::new() } else { desired.iter().cloned().collect() };
        if !first {
            // Redis went away and came back: the command connection may be a dead one nothing has used
            // since; check it before this node says it is ready again.
            inner.commands.verify().await;
        }
        first = false;
        inner.connected.store(true, Ordering::SeqCst);
        tokio::spawn(receiver(inner.clone(), stream, generation, resync));

        // Serve requests until the connection is lost.
        let mut batch = Vec::new();
        loop {
            batch.clear();
            match rx.recv().await {
                Some(command) => batch.push(command),
                None => return,
            }
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(command) => batch.push(command),
                    Err(_) => break,
                }
            }
            if let Err(reason) = apply(&inner, &mut sink, &mut desired, generation, &mut batch).await {
                tracing::warn!(reason, "redis pub/sub connection lost");
                inner.connected.store(false, Ordering::SeqCst);
                break;
            }
        }
    }
}

/// Where subscriptions are asked for.
enum Sink {
    Classic(PubSubSink),
    /// Sharded pub/sub on a cluster: one channel per call (a call's channels must share a slot).
    Sharded(ClusterConnection),
}

/// Where messages arrive.
enum Source {
    Classic(PubSubStream),
    Sharded(mpsc::UnboundedReceiver<redis::PushInfo>),
}

/// Calls of a batch in flight at once on a cluster.
const SHARDED_CONCURRENCY: usize = 64;

impl Sink {
    async fn subscribe(&mut self, names: &[String]) -> redis::RedisResult<()> {
        match self {
            Sink::Classic(sink) => sink.subscribe(names).await,
            Sink::Sharded(conn) => each(conn, names, true).await,
        }
    }

    async fn unsubscribe(&mut self, names: &[String]) -> redis::RedisResult<()> {
        match self {
            Sink::Classic(sink) => sink.unsubscribe(names).await,
            Sink::Sharded(conn) => each(conn, names, false).await,
        }
    }
}

/// `SSUBSCRIBE` (or `SUNSUBSCRIBE`) each of `names` on its own, several at once.
async fn each(conn: &ClusterConnection, names: &[String], subscribe: bool) -> redis::RedisResult<()> {
    // Collected first: a stream over a borrowing closure would not be `Send` for every lifetime.
    let calls: Vec<_> = names
        .iter()
        .map(|name| {
            let (mut conn, name) = (conn.clone(), name.clone());
            async move { if subscribe { conn.ssubscribe(name).await } else { conn.sunsubscribe(name).await } }
        })
        .collect();
    let mut results = futures_util::stream::iter(calls).buffer_unordered(SHARDED_CONCURRENCY);
    while let Some(result) = results.next().await {
        result?;
    }
    Ok(())
}

async fn connect(inner: &PubSub, desired: &BTreeSet<ChannelName>) -> Result<(Sink, Source), EngineError> {
    let timeout = inner.commands.timeout() * 3;
    if let Some(cluster) = inner.commands.cluster() {
        return connect_sharded(inner, cluster, desired).await;
    }
    let (client, _address) = inner.commands.primary_client().await?;
    let pubsub = tokio::time::timeout(timeout, client.get_async_pubsub())
        .await
        .map_err(|_| EngineError::Timeout)?
        .map_err(|e| EngineError::Unavailable(e.to_string()))?;
    let (sink, stream) = pubsub.split();
    let mut sink = Sink::Classic(sink);
    let mut names = vec![inner.keys.own_control(), inner.keys.control_all()];
    names.extend(desired.iter().map(|c| inner.keys.pubsub(c)));
    for chunk in names.chunks(MAX_BATCH) {
        inner.commands.bounded(sink.subscribe(chunk)).await?;
    }
    Ok((sink, Source::Classic(stream)))
}

async fn connect_sharded(
    inner: &PubSub,
    cluster: &ClusterTarget,
    desired: &BTreeSet<ChannelName>,
) -> Result<(Sink, Source), EngineError> {
    let timeout = inner.commands.timeout() * 3;
    let (pushes, source) = mpsc::unbounded_channel();
    let client = inner.commands.connector().cluster(cluster, inner.commands.timeout(), Some(pushes))?;
    let mut conn = tokio::time::timeout(timeout, client.get_async_connection())
        .await
        .map_err(|_| EngineError::Timeout)?
        .map_err(|e| EngineError::Unavailable(e.to_string()))?;
    // Requests for every node go to all servers: a classic channel, which a cluster broadcasts.
    inner.commands.bounded(conn.subscribe(inner.keys.control_all())).await?;
    let mut sink = Sink::Sharded(conn);
    let mut names = vec![inner.keys.own_control()];
    names.extend(lock(&inner.probes).channels.iter().cloned());
    names.extend(desired.iter().map(|c| inner.keys.pubsub(c)));
    for chunk in names.chunks(MAX_BATCH) {
        inner.commands.bounded(sink.subscribe(chunk)).await?;
    }
    Ok((sink, Source::Sharded(source)))
}

/// Applies a batch of requests; Err when the connection is unusable (the actor then reconnects).
async fn apply(
    inner: &PubSub,
    sink: &mut Sink,
    desired: &mut BTreeSet<ChannelName>,
    generation: u64,
    batch: &mut Vec<Command>,
) -> Result<(), &'static str> {
    let mut replies = Vec::new();
    let mut changed: HashMap<ChannelName, bool> = HashMap::new();
    let mut lost = false;
    let mut again = Vec::new();
    let mut probe_change = None;
    for command in batch.drain(..) {
        match command {
            Command::Subscribe(channel, reply) => {
                if !desired.contains(&channel) {
                    lock(&inner.subscribed).insert(channel.clone());
                    desired.insert(channel.clone());
                    changed.insert(channel, true);
                }
                replies.push(reply);
            }
            Command::Unsubscribe(channel) => {
                if desired.remove(&channel) {
                    lock(&inner.subscribed).remove(&channel);
                    changed.insert(channel, false);
                }
            }
            Command::Resubscribe(channel) => {
                if desired.contains(&channel) && !changed.contains_key(&channel) {
                    again.push(inner.keys.pubsub(&channel));
                }
            }
            Command::ProbeChannels(channels, reply) => {
                if let Some((_, earlier)) = probe_change.replace((channels, reply)) {
                    let _ = earlier.send(Ok(()));
                }
            }
            Command::Lost(of) if of == generation => lost = true,
            Command::Stale => lost = true,
            Command::Lost(_) => {}
        }
    }
    if lost {
        for reply in replies {
            let _ = reply.send(Err(EngineError::Unavailable("redis pub/sub is reconnecting".into())));
        }
        if let Some((channels, reply)) = probe_change {
            lock(&inner.probes).channels = channels;
            let _ = reply.send(Err(EngineError::Unavailable("redis pub/sub is reconnecting".into())));
        }
        return Err("stream ended or probe stale");
    }
    if let Some((channels, reply)) = probe_change {
        let before = std::mem::replace(&mut lock(&inner.probes).channels, channels.clone());
        let added: Vec<String> = channels.iter().filter(|c| !before.contains(c)).cloned().collect();
        let gone: Vec<String> = before.into_iter().filter(|c| !channels.contains(c)).collect();
        let mut changed = Ok(());
        if !added.is_empty() {
            changed = inner.commands.bounded(sink.subscribe(&added)).await;
        }
        if changed.is_ok() && !gone.is_empty() {
            changed = inner.commands.bounded(sink.unsubscribe(&gone)).await;
        }
        let failed = changed.is_err();
        let _ = reply.send(changed);
        if failed {
            return Err("probe subscription failed");
        }
    }
    let mut subscribe: Vec<String> = changed.iter().filter(|(_, on)| **on).map(|(c, _)| inner.keys.pubsub(c)).collect();
    subscribe.extend(again);
    let unsubscribe: Vec<String> = changed.iter().filter(|(_, on)| !**on).map(|(c, _)| inner.keys.pubsub(c)).collect();
    let mut result = Ok(());
    if !unsubscribe.is_empty() && inner.commands.bounded(sink.unsubscribe(&unsubscribe)).await.is_err() {
        result = Err("unsubscribe failed");
    }
    if result.is_ok() && !subscribe.is_empty() && inner.commands.bounded(sink.subscribe(&subscribe)).await.is_err() {
        result = Err("subscribe failed");
    }
    for reply in replies {
        let answer = result.map_err(|reason| EngineError::Unavailable(reason.into()));
        let _ = reply.send(answer);
    }
    result
}

async fn receiver(inner: Arc<PubSub>, source: Source, generation: u64, resync: Vec<ChannelName>) {
    let Some(relay) = inner.relay.get().cloned() else { return };
    let mut link = relay.connected(resync).await;
    let own_control = inner.keys.own_control();
    let control_all = inner.keys.control_all();
    match source {
        Source::Classic(mut stream) => {
            while let Some(message) = stream.next().await {
                let name = message.get_channel_name();
                let payload = message.get_payload_bytes();
                if name == own_control || name == control_all {
                    relay.control(payload).await;
                } else if let Some(channel) = inner.keys.channel_of(name) {
                    link.publication(channel, payload).await;
                }
            }
        }
        Source::Sharded(mut pushes) => {
            // Shard channels confirmed on this connection: one confirmed again was subscribed anew
            // (after its slot moved, or after the client reconnected to its shard), so what passed
            // between is read from history.
            let mut confirmed: HashSet<String> = HashSet::new();
            while let Some(push) = pushes.recv().await {
                let mut data = push.data.into_iter();
                let name = match data.next() {
                    Some(redis::Value::BulkString(name)) => String::from_utf8(name).unwrap_or_default(),
                    _ => String::new(),
                };
                match push.kind {
                    redis::PushKind::Message | redis::PushKind::SMessage => {
                        let Some(redis::Value::BulkString(payload)) = data.next() else { continue };
                        if inner.keys.is_probe(&name) {
                            // Handed on once every shard returned its copy of the round.
                            if inner.probe_copy(&payload) {
                                relay.control(&payload).await;
                            }
                        } else if name == own_control || name == control_all {
                            relay.control(&payload).await;
                        } else if let Some(channel) = inner.keys.channel_of(&name) {
                            link.publication(channel, &payload).await;
                        }
                    }
                    redis::PushKind::SSubscribe if !confirmed.insert(name.clone()) => {
                        if let Some(channel) = inner.keys.channel_of(&name) {
                            relay.recheck(&channel).await;
                        }
                    }
                    redis::PushKind::SUnsubscribe => match inner.keys.channel_of(&name) {
                        // Still wanted: the server dropped it (its slot moved). Keep it confirmed, so the
                        // confirmation at the new owner re-syncs it.
                        Some(channel) if lock(&inner.subscribed).contains(&channel) => {
                            tracing::debug!(%channel, "shard dropped the subscription; subscribing again");
                            let _ = inner.requests.send(Command::Resubscribe(channel));
                        }
                        _ if name == own_control => {
                            let _ = inner.requests.send(Command::Stale);
                        }
                        _ => {
                            confirmed.remove(&name);
                        }
                    },
                    redis::PushKind::Disconnection => {
                        tracing::warn!("a redis cluster connection closed; subscribing anew");
                        break;
                    }
                    _ => {}
                }
            }
        }
    }
    let _ = inner.requests.send(Command::Lost(generation));
}

/// A primary turned into a replica and back keeps its connections: check who answers, every probe
/// interval.
async fn verifier(inner: Arc<PubSub>) {
    let mut interval = tokio::time::interval(inner.probe_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        if inner.stopping.load(Ordering::SeqCst) {
            return;
        }
        inner.commands.verify().await;
    }
}

/// Extends the life of the epoch of every channel this node subscribes to.
async fn refresh_subscribed(inner: &PubSub) {
    let channels: Vec<ChannelName> = lock(&inner.subscribed).iter().cloned().collect();
    if inner.keys.sharded() {
        return refresh_each(inner, &channels).await;
    }
    for chunk in channels.chunks(1000) {
        let mut pipe = redis::pipe();
        for channel in chunk {
            let ttl = inner.policies.history(channel).ttl.as_millis() as u64;
            pipe.pexpire(inner.keys.meta(channel), key_life_ms(ttl) as i64).ignore();
        }
        let refreshed = async {
            let live = inner.commands.get().await?;
            let mut conn = live.conn.clone();
            inner.commands.on(&live, pipe.query_async::<()>(&mut conn)).await
        };
        if let Err(error) = refreshed.await {
            tracing::debug!(%error, "refreshing subscribed channels failed");
            return;
        }
    }
}

/// As [`refresh_subscribed`] on a cluster, where one pipeline may not span slots: a command per
/// channel, several at once.
async fn refresh_each(inner: &PubSub, channels: &[ChannelName]) {
    let Ok(live) = inner.commands.get().await else { return };
    let commands = inner.commands.clone();
    let calls: Vec<_> = channels
        .iter()
        .map(|channel| {
            let (live, commands) = (live.clone(), commands.clone());
            let ttl = inner.policies.history(channel).ttl.as_millis() as u64;
            let command = redis::cmd("PEXPIRE").arg(inner.keys.meta(channel)).arg(key_life_ms(ttl)).to_owned();
            async move {
                let mut conn = live.conn.clone();
                commands.on(&live, command.query_async::<()>(&mut conn)).await
            }
        })
        .collect();
    let mut results = futures_util::stream::iter(calls).buffer_unordered(SHARDED_CONCURRENCY);
    while let Some(result) = results.next().await {
        if let Err(error) = result {
            tracing::debug!(%error, "refreshing subscribed channels failed");
            return;
        }
    }
}
