//! Herald's server: the HTTP, SSE and WebSocket surface of `docs/protocol.md` over a
//! [`herald_core::Hub`], as a library ([`router`], [`run`]) and the `herald` binary (`main.rs`).
//!
//! The server is a thin layer: it parses and checks input, turns core events into wire frames and core
//! errors into the contract's JSON errors. Delivery logic lives in `herald-core`.

pub mod api;
pub mod auth;
pub mod config;
pub mod engines;
pub mod error;
pub mod ops;
pub mod serve;
pub mod sse;
pub mod telemetry;
pub mod ws;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use herald_core::{CloseReason, Engine, Hub, MemoryEngine};
use herald_redis::RedisConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Cli, Config, EXIT_BAD_CONFIG, Settings};
pub use error::ApiError;

/// Shared state of one running node. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<AppInner>,
}

struct AppInner {
    hub: Hub,
    settings: Settings,
    draining: AtomicBool,
    metrics: ops::Metrics,
    auth: auth::ClientAuth,
    publish_limiter: api::PublishLimiter,
    /// One permit per open TCP connection (`limits.max_sockets`), taken by the accept loop.
    sockets: Arc<tokio::sync::Semaphore>,
    /// One permit per `/v1/history` answer being read or sent (`limits.max_concurrent_history_reads`).
    history_reads: Arc<tokio::sync::Semaphore>,
}

impl AppState {
    /// Fails when a configured key file can no longer be read (it was checked at start-up).
    pub fn new(hub: Hub, settings: Settings) -> anyhow::Result<Self> {
        let auth = auth::ClientAuth::from_config(&settings.config).map_err(|problem| anyhow::anyhow!(problem))?;
        let sockets = Arc::new(tokio::sync::Semaphore::new(settings.config.limits.sockets()));
        let history_reads = Arc::new(tokio::sync::Semaphore::new(settings.config.limits.max_concurrent_history_reads));
        Ok(Self {
            inner: Arc::new(AppInner {
                auth,
                sockets,
                history_reads,
                publish_limiter: api::PublishLimiter::default(),
                hub,
                settings,
                draining: AtomicBool::new(false),
                metrics: ops::Metrics::new(),
            }),
        })
    }

    pub fn hub(&self) -> &Hub {
        &self.inner.hub
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

    pub(crate) fn publish_limiter(&self) -> &api::PublishLimiter {
        &self.inner.publish_limiter
    }

    pub fn auth(&self) -> &auth::ClientAuth {
        &self.inner.auth
    }

    pub(crate) fn metrics(&self) -> &ops::Metrics {
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

/// Every route of the contract, for serving or for nesting into another axum application.
pub fn router(state: AppState) -> Router {
    let body_limit = state.config().limits.max_body_bytes;
    let router = Router::new()
        .route("/", get(ops::index))
        .route("/favicon.ico", get(ops::favicon))
        .route("/dashboard", get(ops::dashboard))
        .route("/v1/sse", get(sse::handler))
        .route("/v1/ws", get(ws::handler))
        .route("/v1/publish", post(api::publish))
        .route("/v1/broadcast", post(api::broadcast))
        .route("/v1/history", get(api::history))
        .route("/v1/presence", get(api::presence))
        .route("/v1/disconnect", post(api::disconnect))
        .route("/v1/cluster", get(api::cluster))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .fallback(ops::not_found)
        .method_not_allowed_fallback(ops::method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit));
    // Without allowed origins there is no CORS layer at all: an OPTIONS request is then an ordinary
    // request (405 or 404 JSON), not an empty preflight answer.
    let router =
        if state.config().cors_allowed_origins.is_empty() { router } else { router.layer(cors(state.config())) };
    router.with_state(state)
}

/// CORS for browser clients on other origins (`cors_allowed_origins`); none allowed by default.
fn cors(config: &Config) -> tower_http::cors::CorsLayer {
    use axum::http::{HeaderName, Method, header};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let origins = &config.cors_allowed_origins;
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| o.parse().ok()))
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("last-event-id"),
            HeaderName::from_static("x-correlation-id"),
            HeaderName::from_static("traceparent"),
        ])
        .max_age(Duration::from_secs(3600))
}

/// The `Access-Control-Allow-Origin` value for a request from `origin`, if that origin is allowed
/// (used by the SSE path that bypasses the router).
pub fn cors_allow_origin(config: &Config, origin: Option<&str>) -> Option<String> {
    let origin = origin?;
    let origins = &config.cors_allowed_origins;
    if origins.iter().any(|o| o == "*") {
        Some("*".to_owned())
    } else {
        origins.iter().any(|o| o == origin).then(|| origin.to_owned())
    }
}

/// Builds the engine named by the configuration (connecting to it when it is remote).
pub async fn build_engine(settings: &Settings) -> anyhow::Result<Arc<dyn Engine>> {
    let config = &settings.config;
    if config.engine == "memory" {
        let memory = Arc::new(MemoryEngine::new(settings.node_id.clone(), settings.policies()));
        return Ok(memory);
    }
    let kind = engines::kind_of(&config.engine);
    if kind == Some(engines::NATS) {
        let n = &config.nats;
        let mut nats =
            herald_nats::NatsConfig::new(config.engine.clone(), settings.node_id.clone(), settings.policies());
        nats.prefix = n.prefix.clone();
        nats.replicas = n.replicas;
        nats.token = n.token.clone();
        nats.nkey_seed_file = n.nkey_seed_file.clone();
        nats.credentials_file = n.credentials_file.clone();
        nats.tls_ca_file = n.tls_ca_file.clone();
        nats.probe_interval = Duration::from_millis(n.probe_interval_ms);
        nats.probe_timeout = Duration::from_millis(n.probe_timeout_ms);
        nats.node_ttl = Duration::from_secs(n.node_ttl_secs);
        nats.command_timeout = Duration::from_millis(n.command_timeout_ms);
        nats.max_read_bytes = config.limits.max_history_response_bytes;
        let engine = herald_nats::connect(nats).await.map_err(|e| anyhow::anyhow!("connecting to nats: {e}"))?;
        return Ok(Arc::new(engine));
    }
    if kind == Some(engines::REDIS) {
        let r = &config.redis;
        let mut redis = RedisConfig::new(config.engine.clone(), settings.node_id.clone(), settings.policies());
        redis.prefix = r.prefix.clone();
        redis.probe_interval = Duration::from_millis(r.probe_interval_ms);
        redis.probe_timeout = Duration::from_millis(r.probe_timeout_ms);
        redis.node_ttl = Duration::from_secs(r.node_ttl_secs);
        redis.command_timeout = Duration::from_millis(r.command_timeout_ms);
        redis.tls_ca_file = r.tls_ca_file.clone();
        redis.max_read_bytes = config.limits.max_history_response_bytes;
        if r.durability == "replicated" {
            redis.durability = herald_redis::Durability::Replicated {
                min_replicas: r.min_replicas,
                timeout: Duration::from_millis(r.replication_timeout_ms),
            };
        }
        let engine = herald_redis::connect(redis).await.map_err(|e| anyhow::anyhow!("connecting to redis: {e}"))?;
        return Ok(Arc::new(engine));
    }
    anyhow::bail!("unsupported engine {:?}", config.engine)
}

/// Starts the hub and the engine for `settings`.
pub async fn start(settings: Settings) -> anyhow::Result<AppState> {
    let engine = build_engine(&settings).await?;
    let hub = Hub::start(engine, settings.hub_config()).await?;
    if telemetry::enabled() {
        hub.set_deliver_hook(Box::new(|publication, recipients| {
            if let Some(traceparent) = &publication.trace_parent {
                telemetry::deliver_span(
                    traceparent,
                    publication.channel.as_str(),
                    &publication.correlation_id,
                    publication.position.offset,
                    recipients,
                );
            }
        }));
    }
    AppState::new(hub, settings)
}

/// Serves `state` on `listener` until `shutdown` fires, then drains: readiness fails, clients are told
/// to reconnect elsewhere, in-flight requests finish, bounded by the configured grace period.
pub async fn run(state: AppState, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let tracker = TaskTracker::new();
    let app = router(state.clone());
    let grace = Duration::from_secs(state.config().shutdown_grace_secs);
    let limits = serve::ConnectionLimits::from(&state.config().limits);
    let accept =
        tokio::spawn(serve::accept_loop(listener, app, state.clone(), limits, shutdown.clone(), tracker.clone()));
    shutdown.cancelled().await;
    // The accept loop stops at once (new connections are refused); readiness fails first thing in
    // drain_gradually, which then spreads the existing clients' reconnects over the drain window.
    let _ = accept.await;
    tracker.close();
    let deadline = tokio::time::Instant::now() + grace;
    let told = tokio::time::timeout_at(deadline, state.drain_gradually()).await.unwrap_or_else(|_| state.drain());
    tracing::info!(connections = told, "drained");
    if tokio::time::timeout_at(deadline, tracker.wait()).await.is_err() {
        tracing::warn!(grace_secs = grace.as_secs(), "connections still open after the grace period; exiting anyway");
    }
    state.hub().engine().stop().await;
    Ok(())
}
