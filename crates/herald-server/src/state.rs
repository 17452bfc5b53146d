//! [`AppState`]: what every handler of one node shares (hub, settings, client authentication and the
//! proxies, the publish limiter, metrics, the socket and history-read caps, the draining flag), and the
//! two steps every transport takes through them: who the client is ([`AppState::identify`]) and
//! whether it may subscribe ([`AppState::authorize`]). Handlers depend on it; it depends on no handler.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::http::HeaderMap;
use herald_core::{ChannelName, CloseReason, Hub};

use crate::auth::{Access, ClientAuth, Identity};
use crate::config::{Config, Settings};
use crate::error::ApiError;
use crate::hooks::Hooks;
use crate::limiter::PublishLimiter;
use crate::metrics::Metrics;
use crate::proxy::{Forwarded, Proxy};

/// Shared state of one running node. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<AppInner>,
}

struct AppInner {
    hub: Hub,
    settings: Settings,
    draining: AtomicBool,
    metrics: Metrics,
    auth: ClientAuth,
    proxy: Proxy,
    publish_limiter: PublishLimiter,
    /// One permit per open TCP connection (`limits.max_sockets`), taken by the accept loop.
    sockets: Arc<tokio::sync::Semaphore>,
    /// One permit per `/v1/history` answer being read or sent (`limits.max_concurrent_history_reads`).
    history_reads: Arc<tokio::sync::Semaphore>,
    /// Every connection's task (and every upgraded WebSocket's): a graceful shutdown waits for them, so
    /// that each client gets its close (an SSE comment, a WebSocket 1001) before the process exits.
    connections: tokio_util::task::TaskTracker,
    /// The lifecycle webhooks, when `hooks.url` is set.
    hooks: Option<Hooks>,
}

impl AppState {
    /// The state of a node serving `hub` with `settings` (whose key files were read when they were
    /// validated; nothing is read again here), and its lifecycle webhooks when they run. Fails only when
    /// the proxies' HTTP client cannot be made.
    pub fn new(hub: Hub, settings: Settings, hooks: Option<Hooks>) -> anyhow::Result<Self> {
        let auth = ClientAuth::new(settings.client_keys.clone(), &settings.config);
        let proxy = Proxy::new(&settings.config.proxy).map_err(|e| anyhow::anyhow!(e))?;
        let publish_limiter = PublishLimiter::new(settings.config.limits.publish_rate_per_key);
        let sockets = Arc::new(tokio::sync::Semaphore::new(settings.config.limits.sockets()));
        let history_reads = Arc::new(tokio::sync::Semaphore::new(settings.config.limits.max_concurrent_history_reads));
        Ok(Self {
            inner: Arc::new(AppInner {
                auth,
                proxy,
                sockets,
                history_reads,
                publish_limiter,
                hub,
                settings,
                draining: AtomicBool::new(false),
                metrics: Metrics::new(),
                connections: tokio_util::task::TaskTracker::new(),
                hooks,
            }),
        })
    }

    pub fn hub(&self) -> &Hub {
        &self.inner.hub
    }

    /// The tasks of open connections (see `run`'s graceful shutdown).
    pub fn connections(&self) -> &tokio_util::task::TaskTracker {
        &self.inner.connections
    }

    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    pub fn config(&self) -> &Config {
        &self.inner.settings.config
    }

    pub(crate) fn history_reads(&self) -> &Arc<tokio::sync::Semaphore> {
        &self.inner.history_reads
    }

    pub(crate) fn publish_limiter(&self) -> &PublishLimiter {
        &self.inner.publish_limiter
    }

    pub fn auth(&self) -> &ClientAuth {
        &self.inner.auth
    }

    pub fn proxy(&self) -> &Proxy {
        &self.inner.proxy
    }

    /// Who the client of a connection is: from its token when it brings one (a token wins), else from
    /// the connect proxy when one is configured, else anonymous.
    pub async fn identify(
        &self,
        headers: &HeaderMap,
        query_token: Option<&str>,
        channels: &[ChannelName],
        forwarded: &Forwarded,
    ) -> Result<Identity, ApiError> {
        if self.proxy().connect_enabled() && !ClientAuth::has_token(headers, query_token) {
            return self.proxy().connect(channels, forwarded).await;
        }
        self.auth().authenticate(headers, query_token)
    }

    /// Whether `identity` may subscribe to `channel`: by the namespace's rule, or by the subscribe proxy
    /// for a namespace whose rule is `proxy`.
    pub async fn authorize(
        &self,
        identity: &Identity,
        channel: &ChannelName,
        forwarded: &Forwarded,
    ) -> Result<(), ApiError> {
        match self.auth().access(self.config(), identity, channel)? {
            Access::Granted => Ok(()),
            Access::AskBackend => self.proxy().subscribe(identity, channel, forwarded).await,
        }
    }

    /// The lifecycle webhooks, when configured.
    pub fn hooks(&self) -> Option<&Hooks> {
        self.inner.hooks.as_ref()
    }

    /// Stops the background tasks (after a graceful shutdown, or when embedding ends the node).
    pub fn stop_background(&self) {
        if let Some(hooks) = &self.inner.hooks {
            hooks.stop();
        }
    }

    /// Stops the background tasks once every connection is closed, letting the lifecycle webhooks
    /// record what the last connections left (up to `bound`).
    pub async fn shutdown_background(&self, bound: Duration) {
        if let Some(hooks) = &self.inner.hooks {
            hooks.shutdown(bound).await;
        }
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub(crate) fn sockets(&self) -> &Arc<tokio::sync::Semaphore> {
        &self.inner.sockets
    }

    /// Open TCP connections (every kind) served by the accept loop.
    pub fn open_sockets(&self) -> usize {
        self.config().limits.sockets().saturating_sub(self.inner.sockets.available_permits())
    }

    /// True once shutdown began: readiness fails and new connections are refused.
    pub fn draining(&self) -> bool {
        self.inner.draining.load(Ordering::SeqCst)
    }

    /// Starts draining: readiness fails, new clients are refused, connected clients are told to go.
    pub fn drain(&self) -> usize {
        self.inner.draining.store(true, Ordering::SeqCst);
        self.inner.hub.close_all(CloseReason::ShuttingDown)
    }

    /// Drains gradually: readiness fails and new clients are refused at once; connected clients are told
    /// to reconnect (elsewhere, through their cursor) spread over the configured drain window.
    pub async fn drain_gradually(&self) -> usize {
        self.inner.draining.store(true, Ordering::SeqCst);
        let window = Duration::from_millis(self.config().drain_window_ms);
        self.inner.hub.close_gradually(CloseReason::ShuttingDown, window).await
    }
}
