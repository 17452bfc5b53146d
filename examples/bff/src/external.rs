//! The simulated external system (a payment provider, a render farm, …): it accepts a job, works on it
//! for a while, then calls the app's webhook with the result, on a replica picked at random, the way a
//! callback lands on whichever replica the load balancer or DNS hands it. An answer other than 2xx is
//! retried with backoff, as webhook senders do.

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use rand::Rng;
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// Longest a callback is retried for.
const GIVE_UP_AFTER: Duration = Duration::from_secs(120);

/// Counters of the callbacks sent.
#[derive(Default)]
pub struct Counters {
    /// Callbacks a replica answered with 2xx.
    pub acknowledged: AtomicUsize,
    /// Attempts that failed (connection refused, 5xx) and were retried.
    pub retried: AtomicUsize,
    /// Callbacks given up on.
    pub abandoned: AtomicUsize,
}

struct Shared {
    replicas: Vec<SocketAddr>,
    /// How long a job takes: a random duration in this range.
    work: Range<Duration>,
    http: reqwest::Client,
    counters: Arc<Counters>,
    jobs: std::sync::Mutex<JoinSet<()>>,
}

/// A running external system.
pub struct External {
    pub addr: SocketAddr,
    pub counters: Arc<Counters>,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

#[derive(Deserialize)]
struct NewJob {
    job_id: String,
}

/// Starts the external system on `listener`; its callbacks go to `replicas`.
pub fn start(listener: TcpListener, replicas: Vec<SocketAddr>, work: Range<Duration>) -> anyhow::Result<External> {
    anyhow::ensure!(!replicas.is_empty(), "the external system needs a replica to call back");
    let addr = listener.local_addr()?;
    let counters = Arc::new(Counters::default());
    let shared = Arc::new(Shared {
        replicas,
        work,
        // One connection per callback, like a webhook sender that does not keep connections alive.
        http: reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(5))
            .build()?,
        counters: counters.clone(),
        jobs: std::sync::Mutex::new(JoinSet::new()),
    });
    let app = Router::new().route("/jobs", post(accept)).with_state(shared.clone());
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("external system: serving stopped: {e}");
        }
    });
    Ok(External { addr, counters, shared, task })
}

async fn accept(State(shared): State<Arc<Shared>>, Json(job): Json<NewJob>) -> (StatusCode, Json<serde_json::Value>) {
    let worker = shared.clone();
    let Ok(mut jobs) = shared.jobs.lock() else {
        return (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({ "error": "poisoned" })));
    };
    while jobs.try_join_next().is_some() {}
    jobs.spawn(work_on(worker, job.job_id));
    (StatusCode::ACCEPTED, Json(json!({ "accepted": true })))
}

/// Works on the job, then calls back until a replica acknowledges.
async fn work_on(shared: Arc<Shared>, job_id: String) {
    let (took, result) = {
        let mut rng = rand::rng();
        let took = if shared.work.is_empty() { shared.work.start } else { rng.random_range(shared.work.clone()) };
        (took, format!("{} widgets counted", rng.random_range(1..1000)))
    };
    tokio::time::sleep(took).await;
    let started = tokio::time::Instant::now();
    let mut backoff = Duration::from_millis(100);
    loop {
        let replica = shared.replicas[rand::rng().random_range(0..shared.replicas.len())];
        let sent = shared
            .http
            .post(format!("http://{replica}/webhooks/job-finished"))
            .header("x-correlation-id", format!("job-{job_id}"))
            .json(&json!({ "job_id": job_id, "result": result }))
            .send()
            .await;
        match sent {
            Ok(answer) if answer.status().is_success() => {
                shared.counters.acknowledged.fetch_add(1, Ordering::SeqCst);
                return;
            }
            Ok(answer) if answer.status() == StatusCode::NOT_FOUND => {
                eprintln!("external system: job {job_id} is unknown to {replica}; dropping it");
                shared.counters.abandoned.fetch_add(1, Ordering::SeqCst);
                return;
            }
            _ => {
                shared.counters.retried.fetch_add(1, Ordering::SeqCst);
                if started.elapsed() > GIVE_UP_AFTER {
                    shared.counters.abandoned.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

impl External {
    /// Jobs accepted whose callback is still to be acknowledged (or given up).
    pub fn outstanding(&self) -> usize {
        self.shared
            .jobs
            .lock()
            .map(|mut jobs| {
                while jobs.try_join_next().is_some() {}
                jobs.len()
            })
            .unwrap_or(0)
    }

    pub fn stop(&self) {
        self.task.abort();
        if let Ok(mut jobs) = self.shared.jobs.lock() {
            jobs.abort_all();
        }
    }
}

impl Drop for External {
    fn drop(&mut self) {
        self.stop();
    }
}
