//! The node's subscriber: one task that owns the live subscriptions and hands what arrives to the relay.
//!
//! Requests arrive in the order the hub's channel memberships changed (it sends them under its lock).
//! A channel's live subject is subscribed while the node has local members; a subscriber is answered
//! once the server has the subscription (a flush). The client reconnects by itself and subscribes
//! again; what was published meanwhile is re-synced from history (`Relay::connected`). While it is
//! disconnected, new subscriptions are refused at once (clients get 503) instead of waiting.
//!
//! The request queue is unbounded on purpose: it is fed under the hub's lock, where waiting is not
//! allowed; its length is bounded by how fast connections join and leave channels.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::StreamExt;
use futures_util::stream::{BoxStream, SelectAll};
use herald_core::{ChannelName, EngineError};
use tokio::sync::{mpsc, oneshot};

use crate::shared::{Command, Inner};

/// Messages of one live subscription, tagged with the subscription's number.
type Live = BoxStream<'static, (ChannelName, u64, async_nats::Message)>;

/// Subscribes the control subjects and spawns the subscriber task.
pub(crate) async fn start(inner: Arc<Inner>, rx: mpsc::UnboundedReceiver<Command>) -> Result<(), EngineError> {
    let own = inner.bounded(inner.client.subscribe(inner.names.own_control())).await?;
    let all = inner.bounded(inner.client.subscribe(inner.names.control_all())).await?;
    inner.bounded(inner.client.flush()).await?;
    tokio::spawn(watch_leader(inner.clone()));
    if !inner.config.resync_interval.is_zero() {
        tokio::spawn(resync_periodically(inner.clone()));
    }
    // The control task ends with the subscriber task (which holds `running`).
    let (running, ended) = oneshot::channel::<()>();
    let messages = futures_util::stream::select(own, all).take_until(ended).boxed();
    tokio::spawn(control(inner.clone(), messages));
    tokio::spawn(async move {
        let _running = running;
        run(inner, rx).await;
    });
    Ok(())
}

/// Hands control messages (probes above all) to the relay, in a task of its own: the subscriber task
/// waits on JetStream while it re-syncs channels (after a reconnect, for as long as the stream elects a
/// leader), and a probe waiting behind that would make a healthy connection look stale, so that it is
/// reconnected, re-synced and found stale again, for as long as the election lasts.
async fn control(inner: Arc<Inner>, mut messages: BoxStream<'static, async_nats::Message>) {
    let Some(relay) = inner.relay.get().cloned() else { return };
    while let Some(message) = messages.next().await {
        relay.control(&message.payload).await;
    }
}

/// Re-syncs every subscribed channel every `resync_interval`.
async fn resync_periodically(inner: Arc<Inner>) {
    let mut interval = tokio::time::interval(inner.config.resync_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    loop {
        interval.tick().await;
        if inner.stopping.load(Ordering::SeqCst) || inner.subscriber.send(Command::ResyncAll).is_err() {
            return;
        }
    }
}

/// Asks for the history stream's leader every probe interval; a change means a failover inside NATS.
async fn watch_leader(inner: Arc<Inner>) {
    let mut interval = tokio::time::interval(inner.config.probe_interval);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leader: Option<String> = None;
    loop {
        interval.tick().await;
        if inner.stopping.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = inner.bounded(inner.js.get_stream(inner.names.stream())).await else { continue };
        let now = stream.cached_info().cluster.as_ref().and_then(|c| c.leader.clone());
        if now.is_some() && leader.is_some() && now != leader {
            tracing::info!(from = ?leader, to = ?now, "nats history stream has a new leader; re-syncing");
            let _ = inner.subscriber.send(Command::ResyncAll);
        }
        if now.is_some() {
            leader = now;
        }
    }
}

async fn run(inner: Arc<Inner>, mut rx: mpsc::UnboundedReceiver<Command>) {
    let Some(relay) = inner.relay.get().cloned() else { return };
    let mut link = relay.connected(Vec::new()).await;
    let mut live: SelectAll<Live> = SelectAll::new();
    // Dropping a channel's sender ends its stream, which drops (and so unsubscribes) its subscription.
    // With the number of the channel's current subscription: messages of one being replaced (left and
    // joined again before its stream ended) are not handed over twice.
    let mut subscribed: HashMap<ChannelName, (oneshot::Sender<()>, u64)> = HashMap::new();
    let mut next_id = 0u64;
    let mut lost = false;
    loop {
        tokio::select! {
            biased;
            command = rx.recv() => {
                let Some(command) = command else { return };
                match command {
                    Command::Subscribe(channel, reply) => {
                        next_id += 1;
                        subscribe(&inner, &mut live, &mut subscribed, channel, reply, next_id).await;
                    }
                    Command::Unsubscribe(channel) => {
                        subscribed.remove(&channel);
                    }
                    Command::Disconnected => {
                        lost = true;
                        tracing::warn!("nats connection lost");
                    }
                    Command::Connected => {
                        if std::mem::take(&mut lost) {
                            inner.reconnects.fetch_add(1, Ordering::Relaxed);
                            tracing::info!(channels = subscribed.len(), "nats reconnected; re-syncing");
                            link = relay.connected(subscribed.keys().cloned().collect()).await;
                            // The subscriptions the client made again reach the stream's leader through
                            // the cluster a moment later: re-sync once more after that moment.
                            let (commands, delay) = (inner.subscriber.clone(), inner.config.probe_interval * 2);
                            tokio::spawn(async move {
                                tokio::time::sleep(delay).await;
                                let _ = commands.send(Command::ResyncAll);
                            });
                        }
                    }
                    Command::Recheck(channel) => {
                        if subscribed.contains_key(&channel) {
                            relay.recheck(&channel).await;
                        }
                    }
                    Command::ResyncAll => {
                        link = relay.connected(subscribed.keys().cloned().collect()).await;
                    }
                    Command::Stale => {
                        let client = inner.client.clone();
                        tokio::spawn(async move {
                            if let Err(error) = client.force_reconnect().await {
                                tracing::warn!(%error, "nats reconnect failed");
                            }
                        });
                    }
                }
            }
            Some((channel, id, message)) = live.next() => {
                if subscribed.get(&channel).is_some_and(|(_, current)| *current == id) {
                    if message.payload.is_empty() {
                        // A marker: the channel began or moved to a new epoch (a fence).
                        relay.recheck(&channel).await;
                    } else {
                        link.publication(channel, &message.payload).await;
                    }
                }
            }
        }
        if inner.stopping.load(Ordering::SeqCst) && rx.is_closed() {
            return;
        }
    }
}

async fn subscribe(
    inner: &Arc<Inner>,
    live: &mut SelectAll<Live>,
    subscribed: &mut HashMap<ChannelName, (oneshot::Sender<()>, u64)>,
    channel: ChannelName,
    reply: oneshot::Sender<Result<(), EngineError>>,
    id: u64,
) {
    if inner.client.connection_state() != async_nats::connection::State::Connected {
        let _ = reply.send(Err(EngineError::Unavailable("nats is reconnecting".into())));
        return;
    }
    if let std::collections::hash_map::Entry::Vacant(entry) = subscribed.entry(channel.clone()) {
        match inner.bounded(inner.client.subscribe(inner.names.live(&channel))).await {
            Ok(subscriber) => {
                let (stop, stopped) = oneshot::channel::<()>();
                let name = channel.clone();
                live.push(subscriber.take_until(stopped).map(move |message| (name.clone(), id, message)).boxed());
                entry.insert((stop, id));
                // The server this node is connected to has the subscription once the flush below
                // returns, but the stream's leader may sit on another server of the cluster and learn
                // of it a moment later: what it republishes meanwhile does not come here. One re-sync
                // after that moment catches it up from history.
                let (commands, delay) = (inner.subscriber.clone(), inner.config.probe_interval);
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = commands.send(Command::Recheck(channel));
                });
            }
            Err(error) => {
                let _ = reply.send(Err(error));
                return;
            }
        }
    }
    // Live once the server processed the SUB: a flush (PING/PONG) after it proves that.
    let inner = inner.clone();
    tokio::spawn(async move {
        let _ = reply.send(inner.bounded(inner.client.flush()).await);
    });
}
