//! Herald's server: the HTTP, SSE and WebSocket surface of `docs/protocol.md` over a
//! [`herald_core::Hub`], as a library ([`router`], [`run`]) and the `herald` binary (`main.rs`).
//!
//! The server is a thin layer: it parses and checks input, turns core events into wire frames and core
//! errors into the contract's JSON errors. Delivery logic lives in `herald-core`; this crate must not
//! know how an engine stores or moves publications (it only names one by URL in [`build_engine`]).
//!
//! Modules depend one way: `error`, `env`, `credentials` and `socket` need nothing of the crate;
//! `config` is plain data (with `credentials` and `env`); `auth` and `proxy` (the connect and
//! subscribe proxies) decide who a client is and what it may hold; `hooks` sends the lifecycle webhooks
//! (with `config` only); `state` holds what handlers share; the
//! handlers (`api`, `history`, `sse`, `ws`, `ops`) and the accept loop (`serve`, with `head`) sit on
//! top. Only this file ties them together, and no module imports it.

pub mod api;
pub mod auth;
pub mod config;
pub mod cors;
pub mod credentials;
pub mod engines;
mod env;
pub mod error;
mod head;
pub mod history;
pub mod hooks;
pub mod input;
pub mod limiter;
pub mod metrics;
pub mod ops;
pub mod proxy;
pub mod serve;
pub mod socket;
pub mod sse;
pub mod state;
pub mod telemetry;
pub mod ws;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use herald_core::{Engine, Hub, LifecycleStore, MemoryEngine, MemoryLifecycle};
use herald_redis::RedisConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::{Cli, Config, EXIT_BAD_CONFIG, Settings};
pub use cors::cors_allow_origin;
pub use error::ApiError;
pub use state::AppState;

/// Every (method, path) [`router`] serves, in the order it adds them: the list `docs/openapi.yaml` is
/// checked against (`tests/it/openapi.rs`), and that a unit test below checks against the `.route(…)`
/// calls of [`router`] itself. axum cannot list a router's routes, hence this list. A `get` route also
/// answers `HEAD` (axum adds it); only `GET` is listed.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/herald-client.js"),
    ("GET", "/favicon.ico"),
    ("GET", "/dashboard"),
    ("GET", "/v1/sse"),
    ("GET", "/v1/ws"),
    ("POST", "/v1/publish"),
    ("POST", "/v1/broadcast"),
    ("GET", "/v1/history"),
    ("GET", "/v1/presence"),
    ("POST", "/v1/disconnect"),
    ("GET", "/v1/cluster"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
];

/// Every route of the contract, for serving or for nesting into another axum application.
pub fn router(state: AppState) -> Router {
    let body_limit = state.config().limits.max_body_bytes;
    let router = Router::new()
        .route("/", get(ops::index))
        .route("/herald-client.js", get(ops::client_js))
        .route("/favicon.ico", get(ops::favicon))
        .route("/dashboard", get(ops::dashboard))
        .route("/v1/sse", get(sse::handler))
        .route("/v1/ws", get(ws::handler))
        .route("/v1/publish", post(api::publish))
        .route("/v1/broadcast", post(api::broadcast))
        .route("/v1/history", get(history::history))
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
        if state.config().cors_allowed_origins.is_empty() { router } else { router.layer(cors::layer(state.config())) };
    router.with_state(state)
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
        nats.resync_interval = Duration::from_millis(n.resync_interval_ms);
        nats.max_read_bytes = config.limits.max_history_response_bytes;
        let engine = herald_nats::connect(nats).await.map_err(|e| anyhow::anyhow!("connecting to nats: {e}"))?;
        return Ok(Arc::new(engine));
    }
    if kind == Some(engines::REDIS) {
        let engine = herald_redis::connect(redis_config(settings))
            .await
            .map_err(|e| anyhow::anyhow!("connecting to redis: {e}"))?;
        return Ok(Arc::new(engine));
    }
    anyhow::bail!("unsupported engine {:?}", config.engine)
}

/// The Redis engine's settings from the configuration.
fn redis_config(settings: &Settings) -> RedisConfig {
    let config = &settings.config;
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
    redis
}

/// The lifecycle store of the configured engine, for the lifecycle webhooks (validation refused the
/// engines that have none).
async fn lifecycle_store(settings: &Settings) -> anyhow::Result<Arc<dyn LifecycleStore>> {
    let grace = Duration::from_millis(settings.config.hooks.vacated_grace_ms);
    if settings.config.engine == "memory" {
        return Ok(Arc::new(MemoryLifecycle::new(grace)));
    }
    if engines::kind_of(&settings.config.engine) == Some(engines::REDIS) {
        let store = herald_redis::lifecycle(&redis_config(settings), grace)
            .await
            .map_err(|e| anyhow::anyhow!("connecting to redis for the lifecycle webhooks: {e}"))?;
        return Ok(Arc::new(store));
    }
    anyhow::bail!("lifecycle webhooks are not supported on engine {:?} yet", settings.config.engine)
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
    let hooks = match settings.config.hooks.url {
        Some(_) => {
            hooks::start(&hub, &settings.config, lifecycle_store(&settings).await?).map_err(|e| anyhow::anyhow!(e))?
        }
        None => None,
    };
    AppState::new(hub, settings, hooks)
}

/// Longest a graceful shutdown waits for the lifecycle webhooks to record the last connections' leaving.
const HOOKS_FLUSH_BOUND: Duration = Duration::from_secs(2);

/// Serves `state` on `listener` until `shutdown` fires, then drains: readiness fails, clients are told
/// to reconnect elsewhere, in-flight requests finish, bounded by the configured grace period.
pub async fn run(state: AppState, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let tracker = state.connections().clone();
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
    // The connections are closed: their lifecycle transitions are all queued (bounded: a stopping node
    // must not hang on an unreachable engine; what is left is released when its lease expires).
    state.shutdown_background(HOOKS_FLUSH_BOUND).await;
    state.hub().engine().stop().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::ROUTES;

    /// The `(method, path)` pairs of every `.route("PATH", get(…).post(…))` call in [`super::router`],
    /// read from this file's own source.
    fn routes_in_router() -> Vec<(String, String)> {
        const METHODS: &[&str] = &["get", "post", "put", "delete", "patch", "head", "options", "trace", "connect"];
        let source = include_str!("lib.rs");
        let start = source.find("pub fn router(").expect("router() is in lib.rs");
        let end = start + source[start..].find("\n}\n").expect("router() ends");
        let mut found = Vec::new();
        for call in source[start..end].split(".route(").skip(1) {
            let path = call.split('"').nth(1).expect("a route's path is a string literal");
            let (_, method_router) = call.split_once("\",").expect("a path, then its method router");
            // The method router's text outside its handlers' parentheses (`get`, `.post`, …), up to the
            // `)` that closes `.route(`.
            let mut depth = 0usize;
            let mut arguments = String::new();
            for c in method_router.chars() {
                match c {
                    '(' => depth += 1,
                    ')' if depth == 0 => break,
                    ')' => depth -= 1,
                    _ => {}
                }
                if depth == 0 && c != ')' {
                    arguments.push(c);
                }
            }
            let methods: Vec<&str> = arguments
                .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                .filter(|word| METHODS.contains(word))
                .collect();
            assert!(!methods.is_empty(), "no method router found for {path}: {arguments:?}");
            for method in methods {
                found.push((method.to_ascii_uppercase(), path.to_owned()));
            }
        }
        found
    }

    #[test]
    fn routes_lists_exactly_what_router_serves() {
        let mut served = routes_in_router();
        let mut listed: Vec<(String, String)> =
            ROUTES.iter().map(|(method, path)| ((*method).to_owned(), (*path).to_owned())).collect();
        assert!(served.len() > 10, "the source scan found too few routes: {served:?}");
        served.sort();
        listed.sort();
        let before = listed.len();
        listed.dedup();
        assert_eq!(before, listed.len(), "ROUTES lists a route twice");
        assert_eq!(served, listed, "ROUTES must list exactly the (method, path) pairs router() serves");
    }
}
