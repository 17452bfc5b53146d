//! The node's one pub/sub connection and the tasks around it.
//!
//! - The **actor** owns the subscription set. Requests arrive in the order the hub's channel
//!   memberships changed (it sends them under its lock), are applied in batches (one SUBSCRIBE or
//!   UNSUBSCRIBE for many channels), and a subscriber is answered once Redis confirmed the SUBSCRIBE.
//!   When the connection is lost (or the probe says it went stale) the actor reconnects with backoff,
//!   resubscribes everything and hands the receiver the list of channels to re-sync. While it is
//!   disconnected, new subscriptions are refused at once (clients get 503) instead of waiting.
//! - The **receiver** reads messages in order. For each channel it knows the last offset handed to the
//!   hub; duplicates are dropped and a jump is filled from history before the newer publication.
//!   After a reconnect it first re-syncs every channel from history, and tells the hub the top position
//!   so connections that cannot be caught up get a reset.
//! - The **prober** publishes a probe to the node's own control channel every probe interval and marks
//!   the connection stale when probes stop coming back; it also writes the node's heartbeat.
//!
//! The command queue from the hub is unbounded on purpose: it is fed under the hub's lock, where
//! waiting is not allowed; its length is bounded by how fast connections join and leave channels.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use herald_core::{ChannelName, EngineError, History, NodeReceipt, Position, Publication};
use redis::aio::{PubSubSink, PubSubStream};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use crate::{Inner, lock};

pub(crate) enum Command {
    Subscribe(ChannelName, oneshot::Sender<Result<(), EngineError>>),
    Unsubscribe(ChannelName),
    /// The receiver of connection `generation` saw its stream end.
    Lost(u64),
    /// The prober found the subscription stale.
    Stale,
}

/// Times a channel's re-sync waits for the command connection before it gives up.
const RESYNC_ATTEMPTS: usize = 3;
/// Most requests applied in one batch.
const MAX_BATCH: usize = 1024;
const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

pub(crate) fn spawn(inner: Arc<Inner>, rx: mpsc::UnboundedReceiver<Command>) {
    tokio::spawn(actor(inner.clone(), rx));
    tokio::spawn(prober(inner.clone()));
    tokio::spawn(keeper(inner));
}

/// Channels this node subscribes to keep their epoch while idle: their stream state is refreshed three
/// times per history age. History entries still age out (old cursors then get a reset).
async fn keeper(inner: Arc<Inner>) {
    let every =
        (inner.config.policies.shortest_history_ttl() / 3).clamp(Duration::from_millis(100), Duration::from_secs(60));
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

async fn actor(inner: Arc<Inner>, mut rx: mpsc::UnboundedReceiver<Command>) {
    let mut desired: BTreeSet<ChannelName> = BTreeSet::new();
    let mut generation = 0u64;
    let mut backoff = MIN_BACKOFF;
    let mut first = true;
    loop {
        if inner.stopping.load(Ordering::SeqCst) && inner.subscriber.is_closed() {
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
                        Command::Lost(_) | Command::Stale => {}
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

async fn connect(inner: &Inner, desired: &BTreeSet<ChannelName>) -> Result<(PubSubSink, PubSubStream), EngineError> {
    let timeout = inner.config.command_timeout * 3;
    let (client, _address) = inner.commands.primary_client().await?;
    let pubsub = tokio::time::timeout(timeout, client.get_async_pubsub())
        .await
        .map_err(|_| EngineError::Timeout)?
        .map_err(|e| EngineError::Unavailable(e.to_string()))?;
    let (mut sink, stream) = pubsub.split();
    let mut names = vec![inner.keys.own_control(), inner.keys.control_all()];
    names.extend(desired.iter().map(|c| inner.keys.pubsub(c)));
    for chunk in names.chunks(MAX_BATCH) {
        inner.bounded(sink.subscribe(chunk)).await?;
    }
    Ok((sink, stream))
}

/// Applies a batch of requests; Err when the connection is unusable (the actor then reconnects).
async fn apply(
    inner: &Inner,
    sink: &mut PubSubSink,
    desired: &mut BTreeSet<ChannelName>,
    generation: u64,
    batch: &mut Vec<Command>,
) -> Result<(), &'static str> {
    let mut replies = Vec::new();
    let mut changed: HashMap<ChannelName, bool> = HashMap::new();
    let mut lost = false;
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
            Command::Lost(of) if of == generation => lost = true,
            Command::Stale => lost = true,
            Command::Lost(_) => {}
        }
    }
    if lost {
        for reply in replies {
            let _ = reply.send(Err(EngineError::Unavailable("redis pub/sub is reconnecting".into())));
        }
        return Err("stream ended or probe stale");
    }
    let subscribe: Vec<String> = changed.iter().filter(|(_, on)| **on).map(|(c, _)| inner.keys.pubsub(c)).collect();
    let unsubscribe: Vec<String> = changed.iter().filter(|(_, on)| !**on).map(|(c, _)| inner.keys.pubsub(c)).collect();
    let mut result = Ok(());
    if !unsubscribe.is_empty() {
        {
            let mut delivered = lock(&inner.delivered);
            for (channel, on) in &changed {
                if !on {
                    delivered.remove(channel);
                }
            }
        }
        if inner.bounded(sink.unsubscribe(&unsubscribe)).await.is_err() {
            result = Err("unsubscribe failed");
        }
    }
    if result.is_ok() && !subscribe.is_empty() && inner.bounded(sink.subscribe(&subscribe)).await.is_err() {
        result = Err("subscribe failed");
    }
    for reply in replies {
        let answer = result.map_err(|reason| EngineError::Unavailable(reason.into()));
        let _ = reply.send(answer);
    }
    result
}

async fn receiver(inner: Arc<Inner>, mut stream: PubSubStream, generation: u64, resync: Vec<ChannelName>) {
    let mut patient = true;
    for channel in resync {
        resync_channel(&inner, &channel, &mut patient).await;
    }
    // The last offset this connection received per channel. Redis runs publish scripts one at a time and
    // pub/sub keeps their order, so on one connection a channel's offsets only grow: one that does not
    // means the data rolled back under an unchanged primary history (a backup loaded into a running
    // server), and the offset was just handed out a second time.
    let mut seen: HashMap<ChannelName, Position> = HashMap::new();
    let own_control = inner.keys.own_control();
    let control_all = inner.keys.control_all();
    while let Some(message) = stream.next().await {
        let name = message.get_channel_name();
        let payload = message.get_payload_bytes();
        if name == own_control || name == control_all {
            on_control(&inner, payload).await;
            continue;
        }
        let Some(channel) = inner.keys.channel_of(name) else { continue };
        inner.messages_received.fetch_add(1, Ordering::Relaxed);
        let Some(split) = payload.iter().position(|b| *b == b'\n') else { continue };
        let envelope = Bytes::copy_from_slice(&payload[split + 1..]);
        let header = Header::parse(&payload[..split]);
        // Someone waits for delivery receipts: count this node's writes under a local receipt.
        let tracked = header.as_ref().filter(|h| h.receipt != 0).and_then(|h| {
            let sink = inner.sink()?;
            let (local, receipt) = sink.track_receipt();
            Some((h.clone(), local, receipt, sink))
        });
        let trace_parent = header.as_ref().and_then(|h| h.trace_parent.clone());
        match Publication::from_envelope(envelope, tracked.as_ref().map(|t| t.1))
            .map(|p| p.with_trace_parent(trace_parent))
        {
            Ok(publication) if publication.channel == channel => {
                tracing::debug!(correlation_id = %publication.correlation_id, %channel,
                    offset = publication.position.offset, origin = header.as_ref().map_or("", |h| h.origin.as_str()),
                    "received from the backplane");
                let position = publication.position.clone();
                let previous = seen.insert(channel.clone(), position.clone());
                // Channels this node left are forgotten now and then, when the map grows (not per message).
                if previous.is_none() && seen.len() > 1024 && seen.len() > 2 * lock(&inner.subscribed).len() {
                    let subscribed = lock(&inner.subscribed).clone();
                    seen.retain(|channel, _| subscribed.contains(channel));
                }
                let backwards = match previous {
                    Some(before) => {
                        (before.epoch == position.epoch && position.offset <= before.offset).then_some(before.offset)
                    }
                    // The first on this connection repeats what an earlier one delivered: normal right
                    // after a re-sync, a rollback if the engine's top is now below what was delivered.
                    None => repeats_below_top(&inner, &channel, &position).await,
                };
                if let Some(before) = backwards {
                    inner.fence_backwards(&channel, &position.epoch, before, position.offset).await;
                    seen.remove(&channel);
                    resync_channel(&inner, &channel, &mut true).await;
                    continue;
                }
                deliver_in_order(&inner, Arc::new(publication)).await;
                if let Some((header, local, receipt, sink)) = tracked {
                    let inner = inner.clone();
                    tokio::spawn(async move {
                        let summary = receipt.wait(header.wait).await;
                        sink.untrack_receipt(local);
                        let report = json!({
                            "op": "receipt", "id": header.receipt, "node": inner.config.node_id,
                            "written": summary.written, "timed_out": summary.timed_out,
                        });
                        let target = inner.keys.control(&header.origin);
                        let _ = inner.send_control(target, report.to_string()).await;
                    });
                }
            }
            Ok(_) => tracing::warn!(%channel, "publication on the wrong pub/sub channel ignored"),
            Err(error) => tracing::warn!(%channel, %error, "unreadable publication ignored"),
        }
    }
    let _ = inner.subscriber.send(Command::Lost(generation));
}

/// The line before each envelope: `<origin node>\t<receipt id>\t<wait ms>\t<traceparent or ->`.
#[derive(Clone)]
struct Header {
    origin: String,
    /// 0 when nobody waits for receipts.
    receipt: u64,
    wait: Duration,
    trace_parent: Option<Arc<str>>,
}

impl Header {
    fn parse(line: &[u8]) -> Option<Header> {
        let text = std::str::from_utf8(line).ok()?;
        let mut parts = text.split('\t');
        let origin = parts.next()?.to_owned();
        let receipt = parts.next()?.parse().ok()?;
        let wait_ms: u64 = parts.next()?.parse().ok()?;
        // A traceparent is 55 printable characters; anything else is ignored.
        let trace_parent = parts
            .next()
            .filter(|t| *t != "-" && t.len() <= 128 && t.bytes().all(|b| b.is_ascii_graphic()))
            .map(Arc::from);
        Some(Header { origin, receipt, wait: Duration::from_millis(wait_ms.min(60_000)), trace_parent })
    }
}

/// Hands `publication` to the hub after everything before it in its channel.
async fn deliver_in_order(inner: &Inner, publication: Arc<Publication>) {
    let Some(sink) = inner.sink() else { return };
    let channel = publication.channel.clone();
    let last = lock(&inner.delivered).get(&channel).cloned();
    if let Some(last) = last {
        let incoming = &publication.position;
        if incoming.epoch == last.epoch {
            if incoming.offset <= last.offset {
                return; // already delivered (a re-sync got there first)
            }
            if incoming.offset > last.offset + 1 {
                // Missed pub/sub messages: fill the hole from history, in order.
                inner.gaps_repaired.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%channel, from = last.offset + 1, to = incoming.offset - 1, "gap in pub/sub; replaying from history");
                if let Ok(History::Covered { publications, .. }) =
                    inner.history(&channel, Some(&last), (incoming.offset - last.offset) as usize).await
                {
                    for earlier in publications {
                        if earlier.position.epoch == incoming.epoch && earlier.position.offset < incoming.offset {
                            sink.deliver(earlier);
                        }
                    }
                }
                // Whatever history no longer had, each connection sees as a gap and resets.
            }
        }
    }
    lock(&inner.delivered).insert(channel, publication.position.clone());
    sink.deliver(publication);
}

/// When `position` repeats an offset delivered before on another connection: the offset delivered, if
/// the engine's top is now below it (the data rolled back).
async fn repeats_below_top(inner: &Inner, channel: &ChannelName, position: &Position) -> Option<u64> {
    let delivered = lock(&inner.delivered).get(channel).cloned()?;
    if delivered.epoch != position.epoch || position.offset > delivered.offset {
        return None;
    }
    let top = inner.top_state(channel).await.ok()?.top;
    (top.epoch == delivered.epoch && top.offset < delivered.offset).then_some(delivered.offset)
}

/// After a reconnect: deliver what the channel got while we were away, then let connections check.
/// Reading the top fences the channel first when the primary's history changed (restart, failover); a
/// position that went backwards under an unchanged history fences it here.
/// `patient`: wait for the command connection between attempts; cleared once a channel gives up, so a
/// long list of channels does not wait for each in turn while Redis is down.
async fn resync_channel(inner: &Inner, channel: &ChannelName, patient: &mut bool) {
    let Some(sink) = inner.sink() else { return };
    // Right after a reconnect the command connection may still be coming back: wait for it a little
    // rather than leave the channel's connections unchecked until its next publication.
    let mut attempt = 0;
    let mut top = loop {
        match inner.top_state(channel).await {
            Ok(state) => break state.top,
            Err(error) if attempt >= RESYNC_ATTEMPTS || !*patient => {
                *patient = false;
                tracing::warn!(%channel, %error, "re-sync failed; connections will repair on the next publication");
                return;
            }
            Err(_) => {
                attempt += 1;
                let deadline = tokio::time::Instant::now() + inner.config.command_timeout * 2;
                let _ = inner.commands.wait_connected(deadline).await;
            }
        }
    };
    let last = lock(&inner.delivered).get(channel).cloned();
    if let Some(last) = last.as_ref().filter(|l| l.epoch == top.epoch && l.offset > top.offset) {
        inner.fence_backwards(channel, &last.epoch, last.offset, top.offset).await;
        // Even if fencing failed, connections hear of the top below their position: they reset.
        if let Ok(state) = inner.top_state(channel).await {
            top = state.top;
        }
    }
    if let Some(last) = last.filter(|l| l.epoch == top.epoch && l.offset < top.offset) {
        if let Ok(History::Covered { publications, .. }) = inner.history(channel, Some(&last), 100_000).await {
            for publication in publications {
                let next = lock(&inner.delivered).get(channel).map_or(0, |p| p.offset) + 1;
                if publication.position.epoch == top.epoch && publication.position.offset == next {
                    lock(&inner.delivered).insert(channel.clone(), publication.position.clone());
                    sink.deliver(publication);
                }
            }
        }
    }
    // History may have gone past the top read above (publishing went on meanwhile): what was delivered
    // is where the channel is now, never behind it (a top behind a connection means a rollback to it).
    {
        let mut delivered = lock(&inner.delivered);
        if let Some(now) = delivered.get(channel).filter(|d| d.epoch == top.epoch && d.offset > top.offset) {
            top = now.clone();
        }
        delivered.insert(channel.clone(), top.clone());
    }
    sink.resync(channel, &top);
}

async fn on_control(inner: &Inner, payload: &[u8]) {
    let Ok(message) = serde_json::from_slice::<Value>(payload) else { return };
    match message["op"].as_str() {
        Some("probe") if message["node"].as_str() == Some(inner.config.node_id.as_str()) => {
            let sent = message["sent_us"].as_u64().unwrap_or(0);
            inner.probe_rtt_us.store(now_us().saturating_sub(sent), Ordering::Relaxed);
            inner.last_probe_us.store(now_us(), Ordering::Relaxed);
        }
        Some("disconnect") => {
            let (Some(user), Some(reply_to), Some(id)) =
                (message["user"].as_str(), message["reply_to"].as_str(), message["id"].as_u64())
            else {
                return;
            };
            let count = inner.sink().map_or(0, |sink| sink.disconnect_user(user));
            let reply = json!({"op": "disconnected", "id": id, "count": count, "node": inner.config.node_id});
            let _ = inner.send_control(inner.keys.control(reply_to), reply.to_string()).await;
        }
        Some("receipt") => {
            let (Some(id), Some(node), Some(written)) =
                (message["id"].as_u64(), message["node"].as_str(), message["written"].as_u64())
            else {
                return;
            };
            if let Some((_, sender, _)) = lock(&inner.receipt_replies).get(&id) {
                let timed_out = message["timed_out"].as_bool().unwrap_or(true);
                let _ = sender.send(NodeReceipt { node: node.to_owned(), written: written as usize, timed_out });
            }
        }
        Some("disconnected") => {
            if let (Some(id), Some(count)) = (message["id"].as_u64(), message["count"].as_u64()) {
                if let Some(waiter) = lock(&inner.replies).get(&id) {
                    let _ = waiter.send(count as usize);
                }
            }
        }
        _ => {}
    }
}

pub(crate) fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// Probes the subscription and heartbeats the node.
async fn prober(inner: Arc<Inner>) {
    let mut interval = tokio::time::interval(inner.config.probe_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Heartbeats carry the node's counters to /v1/cluster, so they go out with every probe.
    let heartbeat_every = inner.config.probe_interval.min(inner.config.node_ttl / 6);
    let mut last_heartbeat = tokio::time::Instant::now();
    let stale_after_us = inner.config.probe_timeout.as_micros() as u64;
    let started = now_us();
    loop {
        interval.tick().await;
        if inner.stopping.load(Ordering::SeqCst) {
            return;
        }
        let now = now_us();
        let last = inner.last_probe_us.load(Ordering::Relaxed).max(started);
        let fresh = now.saturating_sub(last) <= stale_after_us;
        let was_fresh = inner.probe_fresh.swap(fresh, Ordering::SeqCst);
        if was_fresh && !fresh && inner.connected.load(Ordering::SeqCst) {
            tracing::warn!(silent_ms = now.saturating_sub(last) / 1000, "pub/sub subscription is stale; reconnecting");
            // Pretend the last probe came back now, so the fresh connection gets a full timeout to prove
            // itself before it is declared stale again.
            inner.last_probe_us.store(now, Ordering::Relaxed);
            let _ = inner.subscriber.send(Command::Stale);
        }
        // A primary turned into a replica and back keeps its connections: check who answers.
        inner.commands.verify().await;
        let probe = json!({"op": "probe", "node": inner.config.node_id, "sent_us": now_us()});
        let _ = inner.send_control(inner.keys.own_control(), probe.to_string()).await;
        if last_heartbeat.elapsed() >= heartbeat_every {
            last_heartbeat = tokio::time::Instant::now();
            if let Err(error) = inner.heartbeat().await {
                tracing::debug!(%error, "heartbeat failed");
            }
        }
    }
}

/// Extends the life of the epoch of every channel this node subscribes to.
async fn refresh_subscribed(inner: &Inner) {
    let channels: Vec<ChannelName> = lock(&inner.subscribed).iter().cloned().collect();
    for chunk in channels.chunks(1000) {
        let mut pipe = redis::pipe();
        for channel in chunk {
            let ttl = inner.config.policies.history(channel).ttl.as_millis() as u64;
            pipe.pexpire(inner.keys.meta(channel), ttl as i64).ignore();
        }
        let refreshed = async {
            let live = inner.live().await?;
            let mut conn = live.conn.clone();
            inner.on(&live, pipe.query_async::<()>(&mut conn)).await
        };
        if let Err(error) = refreshed.await {
            tracing::debug!(%error, "refreshing subscribed channels failed");
            return;
        }
    }
}
