//! One replica of the backend-for-frontend: the app's own routes and Herald's, on one listener.
//!
//! ```text
//! GET  /                       the page
//! POST /api/session {"user"}   the demo's login: a session in SQLite and its cookie (`bff_session`)
//! POST /internal/herald/connect  Herald's connect proxy call: the session cookie's user, or 401
//! GET  /api/jobs?user=         the user's jobs, from SQLite (what the page loads on every reset)
//! POST /api/jobs {"user"}      records a pending job and hands it to the external system
//! POST /webhooks/job-finished  the external system's callback: persist the result, publish to user:<id>
//! /herald/…                    Herald's router (herald_server::router), nested: /herald/v1/sse,
//!                              /herald/v1/ws, /herald/herald-client.js, …
//! ```
//!
//! The replica publishes in process (`Hub::publish`), so Herald's HTTP publish API is not needed: it is
//! locked with an API key nobody outside the process knows. Clients bring no token: Herald's connect
//! proxy (`proxy.connect_url`, this replica's own `/internal/herald/connect`) asks the app who the
//! session cookie belongs to, and Herald's default rule for `user:` lets that user read `user:<id>` only.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::anyhow;
use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use herald_core::{ChannelName, PublishRequest};
use herald_server::{AppState, Config, Settings};
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::db::{Db, Job};

/// The page every replica serves at `/`.
const PAGE: &str = include_str!("page.html");
/// The event name of a finished job's publication.
pub const JOB_FINISHED: &str = "job.finished";
/// Lifetime of a login session (Herald's grant ends with it: the stream then closes as for an expired
/// token, and the page logs in again).
const SESSION_LIFETIME: Duration = Duration::from_secs(3600);
/// The login cookie.
pub const SESSION_COOKIE: &str = "bff_session";

/// What a replica is started with.
#[derive(Clone)]
pub struct ReplicaConfig {
    /// Also its Herald node id (`replica-1`, …).
    pub name: String,
    /// Herald's engine: `memory` (naive: no coordination) or a `redis://` URL.
    pub engine: String,
    pub database: std::path::PathBuf,
    /// Where jobs are handed to the external system (`http://127.0.0.1:P`).
    pub external_url: String,
}

struct Ctx {
    name: String,
    db: Db,
    herald: AppState,
    external_url: String,
    http: reqwest::Client,
}

/// A running replica, stopped through [`Replica::stop`].
pub struct Replica {
    pub name: String,
    pub addr: SocketAddr,
    herald: AppState,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

/// Herald's settings for one replica: its engine, its node id, the connect proxy (this replica's own
/// `/internal/herald/connect` at `addr`: clients are identified by their session cookie, no token), and
/// a random API key that closes the HTTP publish API (the app publishes in process).
fn herald_settings(config: &ReplicaConfig, addr: SocketAddr) -> anyhow::Result<Settings> {
    let api_key: String = crate::random_id(32);
    let mut herald = Config {
        engine: config.engine.clone(),
        node_id: Some(config.name.clone()),
        api_keys: vec![api_key],
        ..Config::default()
    };
    herald.proxy.connect_url = Some(format!("http://{addr}/internal/herald/connect"));
    herald.proxy.timeout_ms = 1000;
    Settings::from_config(herald).map_err(|problems| anyhow!("herald settings: {}", problems.join("; ")))
}

/// Starts a replica serving `listener`.
pub async fn start(config: ReplicaConfig, listener: TcpListener) -> anyhow::Result<Replica> {
    let addr = listener.local_addr()?;
    let herald = herald_server::start(herald_settings(&config, addr)?).await?;
    let ctx = Arc::new(Ctx {
        name: config.name.clone(),
        db: Db::open(&config.database)?,
        herald: herald.clone(),
        external_url: config.external_url.clone(),
        http: reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(5)).build()?,
    });
    let app = Router::new()
        .route("/", get(page))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/api/session", post(login))
        .route("/internal/herald/connect", post(herald_connect))
        .route("/api/jobs", get(list_jobs).post(start_job))
        .route("/webhooks/job-finished", post(job_finished))
        .with_state(ctx)
        .nest("/herald", herald_server::router(herald.clone()));
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let name = config.name.clone();
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await {
            eprintln!("{name}: serving stopped: {e}");
        }
    });
    Ok(Replica { name: config.name, addr, herald, shutdown, task })
}

impl Replica {
    /// Stops serving: open streams are closed (their clients would reconnect elsewhere), then the
    /// engine stops.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.herald.drain();
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(2), &mut task).await.is_err() {
            task.abort();
        }
        self.herald.hub().engine().stop().await;
    }
}

/// A user id the app accepts (it becomes part of the channel name `user:<id>`).
fn valid_user(user: &str) -> bool {
    (1..=64).contains(&user.len()) && user.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, Json(json!({ "error": message.to_string() }))).into_response()
}

fn internal(e: anyhow::Error) -> Response {
    error(StatusCode::INTERNAL_SERVER_ERROR, e)
}

#[derive(Deserialize)]
struct UserQuery {
    user: String,
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

/// The demo's stand-in for a login: the user named in the body, no password. It makes a session in
/// SQLite (every replica sees it) and sets its cookie; Herald learns the user from that cookie through
/// the connect proxy.
async fn login(State(ctx): State<Arc<Ctx>>, Json(body): Json<UserQuery>) -> Response {
    if !valid_user(&body.user) {
        return error(StatusCode::BAD_REQUEST, "user: 1 to 64 of A-Z a-z 0-9 - _");
    }
    let session = crate::random_id(32);
    let expires_at = (SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default() + SESSION_LIFETIME).as_secs();
    if let Err(e) = ctx.db.create_session(session.clone(), body.user.clone(), expires_at).await {
        return internal(e);
    }
    let cookie =
        format!("{SESSION_COOKIE}={session}; Path=/; HttpOnly; SameSite=Lax; Max-Age={}", SESSION_LIFETIME.as_secs());
    ([(header::SET_COOKIE, cookie)], Json(json!({ "user": body.user, "expires_at": expires_at }))).into_response()
}

/// What Herald's connect proxy sends (the fields this app uses).
#[derive(Deserialize)]
struct HeraldConnect {
    cookies: String,
}

/// Herald's connect proxy: the user of the session cookie, with no extra channels (Herald's `owner`
/// rule for `user:` already lets a user read `user:<own id>` and nothing else), until the session ends;
/// 401 without a live session.
async fn herald_connect(State(ctx): State<Arc<Ctx>>, Json(call): Json<HeraldConnect>) -> Response {
    let session = call.cookies.split(';').find_map(|cookie| {
        let (name, value) = cookie.trim().split_once('=')?;
        (name == SESSION_COOKIE).then(|| value.to_owned())
    });
    let Some(session) = session else { return StatusCode::UNAUTHORIZED.into_response() };
    match ctx.db.session(session).await {
        Ok(Some((user, expires_at))) => {
            Json(json!({ "user": user, "channels": [], "expires_at": expires_at })).into_response()
        }
        Ok(None) => StatusCode::UNAUTHORIZED.into_response(),
        Err(e) => internal(e),
    }
}

async fn list_jobs(State(ctx): State<Arc<Ctx>>, Query(q): Query<UserQuery>) -> Response {
    if !valid_user(&q.user) {
        return error(StatusCode::BAD_REQUEST, "user: 1 to 64 of A-Z a-z 0-9 - _");
    }
    match ctx.db.jobs_of(q.user).await {
        Ok(jobs) => Json(json!({ "replica": ctx.name, "jobs": jobs })).into_response(),
        Err(e) => internal(e),
    }
}

#[derive(Deserialize)]
struct StartJob {
    user: String,
}

/// Records the job as pending, then hands it to the external system, which calls back later on any
/// replica.
async fn start_job(State(ctx): State<Arc<Ctx>>, Json(body): Json<StartJob>) -> Response {
    if !valid_user(&body.user) {
        return error(StatusCode::BAD_REQUEST, "user: 1 to 64 of A-Z a-z 0-9 - _");
    }
    let job = match ctx.db.insert(crate::random_id(12), body.user, ctx.name.clone()).await {
        Ok(job) => job,
        Err(e) => return internal(e),
    };
    let handed = ctx.http.post(format!("{}/jobs", ctx.external_url)).json(&json!({ "job_id": job.id })).send().await;
    match handed.map(|r| r.error_for_status()) {
        Ok(Ok(_)) => (StatusCode::CREATED, Json(job)).into_response(),
        Ok(Err(e)) | Err(e) => {
            if let Err(e) = ctx.db.delete(job.id).await {
                eprintln!("{}: forgetting a job the external system refused: {e}", ctx.name);
            }
            error(StatusCode::BAD_GATEWAY, format!("the external system refused the job: {e}"))
        }
    }
}

#[derive(Deserialize)]
struct JobFinished {
    job_id: String,
    result: String,
}

/// The webhook: persist first (the database is the truth), then tell the user's page through Herald.
/// A publish that fails answers 503 so that the external system retries; the retry finds the job done
/// and publishes again under the same idempotency key, so the page never gets it twice.
async fn job_finished(State(ctx): State<Arc<Ctx>>, headers: HeaderMap, Json(body): Json<JobFinished>) -> Response {
    let job = match ctx.db.finish(body.job_id, body.result, ctx.name.clone()).await {
        Ok(Some(job)) => job,
        Ok(None) => return error(StatusCode::NOT_FOUND, "no such job"),
        Err(e) => return internal(e),
    };
    match publish(&ctx, &headers, &job).await {
        Ok(position) => Json(json!({ "job": job, "published": position })).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, format!("persisted, not published: {e}")),
    }
}

/// Publishes `job` to `user:<id>` through this replica's Herald node.
async fn publish(ctx: &Ctx, headers: &HeaderMap, job: &Job) -> anyhow::Result<serde_json::Value> {
    let correlation_id = herald_server::api::correlation_id(headers).map_err(|e| anyhow!("{e}"))?;
    let request = PublishRequest {
        channel: ChannelName::parse(&format!("user:{}", job.user))?,
        event: Arc::from(JOB_FINISHED),
        data: serde_json::value::to_raw_value(job)?,
        idempotency_key: Some(format!("job-finished:{}", job.id)),
        correlation_id,
        receipt: None,
        trace_parent: None,
    };
    let outcome = ctx.herald.hub().publish(request).await?;
    Ok(json!({
        "epoch": outcome.position.epoch.to_string(),
        "offset": outcome.position.offset,
        "duplicate": outcome.duplicate,
    }))
}
