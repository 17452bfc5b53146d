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

use crate::Inner;

pub(crate) enum Command {
    Subscribe(ChannelName, oneshot::Sender<Result<(), EngineError>>),
    Unsubscribe(ChannelName),
    /// The client (re)connected to a server.
    Connected,
    Disconnected,
    /// The relay's probe found the subscription stale.
    Stale,
}

type Live = BoxStream<'static, (ChannelName, async_nats::Message)>;

/// Subscribes the control subjects and spawns the subscriber task.
pub(crate) async fn start(inner: Arc<Inner>, rx: mpsc::UnboundedReceiver<Command>) -> Result<(), EngineError> {
    let own = inner.bounded(inner.client.subscribe(inner.names.own_control())).await?;
    let all = inner.bounded(inner.client.subscribe(inner.names.control_all())).await?;
    inner.bounded(inner.client.flush()).await?;
    tokio::spawn(run(inner, rx, futures_util::stream::select(own, all).boxed()));
    Ok(())
}

async fn run(
    inner: Arc<Inner>,
    mut rx: mpsc::UnboundedReceiver<Command>,
    mut control: BoxStream<'static, async_nats::Message>,
) {
    let Some(relay) = inner.relay.get().cloned() else { return };
    let mut link = relay.connected(Vec::new()).await;
    let mut live: SelectAll<Live> = SelectAll::new();
    // Dropping a channel's sender ends its stream, which drops (and so unsubscribes) its subscription.
    let mut subscribed: HashMap<ChannelName, oneshot::Sender<()>> = HashMap::new();
    let mut lost = false;
    loop {
        tokio::select! {
            biased;
            command = rx.recv() => {
                let Some(command) = command else { return };
                match command {
                    Command::Subscribe(channel, reply) => subscribe(&inner, &mut live, &mut subscribed, channel, reply).await,
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
                        }
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
            Some(message) = control.next() => relay.control(&message.payload).await,
            Some((channel, message)) = live.next() => link.publication(channel, &message.payload).await,
        }
        if inner.stopping.load(Ordering::SeqCst) && rx.is_closed() {
            return;
        }
    }
}

async fn subscribe(
    inner: &Arc<Inner>,
    live: &mut SelectAll<Live>,
    subscribed: &mut HashMap<ChannelName, oneshot::Sender<()>>,
    channel: ChannelName,
    reply: oneshot::Sender<Result<(), EngineError>>,
) {
    if inner.client.connection_state() != async_nats::connection::State::Connected {
        let _ = reply.send(Err(EngineError::Unavailable("nats is reconnecting".into())));
        return;
    }
    if let std::collections::hash_map::Entry::Vacant(entry) = subscribed.entry(channel.clone()) {
        match inner.bounded(inner.client.subscribe(inner.names.live(&channel))).await {
            Ok(subscriber) => {
                let (stop, stopped) = oneshot::channel::<()>();
                live.push(subscriber.take_until(stopped).map(move |message| (channel.clone(), message)).boxed());
                entry.insert(stop);
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
