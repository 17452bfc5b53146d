//! What the engine's parts share: the connection and its state (`Inner`), the subscriber task's requests
//! and a channel's cached last message. Knows only the configuration and the names; `stream.rs`,
//! `subscriber.rs` and `lib.rs` build on it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use async_nats::jetstream::{self, kv};
use herald_core::{ChannelName, EngineError, Epoch, Position, Relay};
use tokio::sync::{mpsc, oneshot};

use crate::config::NatsConfig;
use crate::names::Names;

/// The connection to the NATS system and the node's state around it.
pub(crate) struct Inner {
    pub(crate) config: NatsConfig,
    pub(crate) names: Names,
    pub(crate) client: async_nats::Client,
    pub(crate) stream: jetstream::stream::Stream,
    pub(crate) js: jetstream::Context,
    pub(crate) nodes: kv::Store,
    pub(crate) presence: kv::Store,
    pub(crate) dedup: kv::Store,
    pub(crate) relay: OnceLock<Arc<Relay>>,
    pub(crate) subscriber: mpsc::UnboundedSender<Command>,
    pub(crate) subscriber_rx: Mutex<Option<mpsc::UnboundedReceiver<Command>>>,
    /// The last JetStream request (heartbeat) succeeded.
    pub(crate) jetstream_ok: AtomicBool,
    pub(crate) reconnects: AtomicU64,
    /// Channels found behind what this node had seen of them (each was fenced).
    pub(crate) rollbacks: AtomicU64,
    pub(crate) stopping: AtomicBool,
    /// The last message of channels this node published to: a publish tries it first.
    pub(crate) tops: Mutex<HashMap<ChannelName, Last>>,
}

/// Requests to the subscriber task (`subscriber.rs`).
pub(crate) enum Command {
    Subscribe(ChannelName, oneshot::Sender<Result<(), EngineError>>),
    Unsubscribe(ChannelName),
    /// The client (re)connected to a server.
    Connected,
    Disconnected,
    /// The relay's probe found the subscription stale.
    Stale,
    /// Re-sync every subscribed channel: the history stream has a new leader (what the old one stored
    /// but had not republished yet never reaches the live subjects), or a while after a reconnect.
    ResyncAll,
    /// A while after a channel was subscribed: re-sync it once.
    Recheck(ChannelName),
}

/// A channel's last message, as far as publishing and reading need it.
#[derive(Debug, Clone)]
pub(crate) struct Last {
    pub(crate) sequence: u64,
    pub(crate) position: Position,
    pub(crate) replaces: Option<Epoch>,
}

/// Locks `mutex`, also after a panic elsewhere poisoned it (every value kept under one stays valid).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub(crate) fn unavailable(error: impl std::fmt::Display) -> EngineError {
    EngineError::Unavailable(error.to_string())
}

impl Inner {
    /// `call`, bounded by the command timeout.
    pub(crate) async fn bounded<T, E: std::fmt::Display>(
        &self,
        call: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, EngineError> {
        match tokio::time::timeout(self.config.command_timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(unavailable(error)),
            Err(_) => Err(EngineError::Timeout),
        }
    }
}
