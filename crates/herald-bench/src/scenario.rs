//! `herald-bench scenario`: the production story on one machine. N Herald nodes behind a round-robin
//! TCP balancer, C simulated browsers each following its own `user:<id>` channel over SSE (reconnecting
//! with `Last-Event-ID` as EventSource does), and an external system that finishes J jobs after random
//! delays and sends each result as a publish, with a correlation ID, to a random node.
//!
//! Every update is followed by its job number from the publish that produced it to the client that holds
//! it, so the report can say, per update: delivered live, recovered on resume, covered by a reset, or
//! lost silently (published with 200, never delivered, never announced). Faults can be injected while
//! it runs. `--engine naive` runs every node with its own in-memory engine (no coordination): the design
//! that loses updates; `--engine redis` starts a `redis-server` of its own for the fixed design,
//! `--engine redis-cluster` a Redis Cluster of three primaries with a replica each, `--engine nats` a
//! JetStream cluster of three `nats-server`s with a replicated (R3) stream.
//!
//! Over 600 lines on purpose: the scenario's steps (engine, nodes, browsers, faults, jobs, drain) and its
//! accounting share the private types of one run (`Ack`, `ClientLog`, `ClientControl`), and reading the
//! report means reading how each number was counted; each step is its own short function.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use rand::Rng;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use herald_testkit::{NatsCluster, RedisCluster, RedisServer};

use crate::cluster::Sentineled;
use crate::node::Node;

/// What to run.
#[derive(Debug, Clone, clap::Args)]
pub struct ScenarioArgs {
    /// Herald nodes.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Simulated browsers, one channel `user:<id>` each.
    #[arg(long, default_value_t = 500)]
    pub clients: usize,
    /// Jobs finished by the external system (one publication each).
    #[arg(long, default_value_t = 10_000)]
    pub jobs: usize,
    /// Seconds over which the jobs finish.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// `naive` (each node alone), `redis` (a redis-server of the tool's own), `redis-cluster` (a Redis
    /// Cluster of the tool's own: three primaries, a replica each), `nats` (three JetStream servers of
    /// the tool's own, R3), or a `redis://` / `nats://` URL.
    #[arg(long, default_value = "redis")]
    pub engine: String,
    /// SIGKILL one node at 30% of the run and start it again.
    #[arg(long)]
    pub kill_node: bool,
    /// Restart every node one by one with SIGTERM, from 40% of the run, as a deployment does.
    #[arg(long)]
    pub rolling_restart: bool,
    /// Crash Redis at 60% of the run and start it again (engine `redis` only).
    #[arg(long)]
    pub restart_engine: bool,
    /// Roll Redis back: a snapshot at 30% of the run, Redis crashed at 70% and restarted from that
    /// snapshot, so it comes back without the publications acknowledged in between (engine `redis`).
    #[arg(long)]
    pub rollback_engine: bool,
    /// Fail Redis over to a replica that lags: a primary with one replica and three sentinels (the nodes
    /// use `redis+sentinel://`); at 50% the replica is stopped and cut off, the primary takes writes
    /// alone for 500 ms and is killed, and the sentinels promote the replica (engine `redis`). With
    /// `redis-cluster`: the primary of the first users' shard is killed at 50% and its replica takes
    /// over; the old primary comes back (as a replica) at 70%.
    #[arg(long)]
    pub failover_engine: bool,
    /// Move the slots of the first 16 users' channels (which every run publishes to) to the next
    /// primary, one after another, from 40% of the run (engine `redis-cluster`).
    #[arg(long)]
    pub reshard: bool,
    /// Kill one NATS server (SIGKILL) at 40% of the run and start it again at 70% (engine `nats`).
    #[arg(long)]
    pub kill_engine_server: bool,
    /// Every 3 s, close this share (0-1) of client connections, like flaky mobile networks.
    #[arg(long, default_value_t = 0.0)]
    pub drop_connections: f64,
    /// How long a client whose connection was dropped stays offline before reconnecting (milliseconds;
    /// default: the server's `retry:`).
    #[arg(long)]
    pub offline_ms: Option<u64>,
    /// This share (0-1) of clients reads slowly (a pause after every read).
    #[arg(long, default_value_t = 0.0)]
    pub slow_clients: f64,
    /// Clients connect to the nodes round robin themselves instead of through the balancer (for runs
    /// with more clients than one process's file descriptors allow behind a proxy).
    #[arg(long)]
    pub direct: bool,
    /// Print only the JSON line.
    #[arg(long)]
    pub json: bool,
    /// Drain window of the nodes (milliseconds over which a stopping node tells its clients to leave).
    #[arg(long, default_value_t = 3000)]
    pub drain_window_ms: u64,
    /// Fail (exit 1) when more clients than this reconnect within any one second.
    #[arg(long)]
    pub max_reconnects_per_sec: Option<u64>,
}

/// The outcome, as printed in the JSON line.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    pub design: String,
    pub nodes: usize,
    pub clients: usize,
    pub jobs: usize,
    pub faults: Vec<String>,
    /// Callbacks answered 200.
    pub published: u64,
    /// Callbacks that never got a 200, even after retries (the sender knows: not silent).
    pub publish_failed: u64,
    pub delivered_live: u64,
    pub recovered: u64,
    pub reset_covered: u64,
    pub lost_silently: u64,
    /// Resets clients received (any reason).
    pub resets: u64,
    /// Positions a client saw twice with different publications (must be 0).
    pub positions_reused: u64,
    pub duplicates_dropped: u64,
    pub reconnects: u64,
    /// The most reconnects in any one second of the run (how stormy restarts were).
    pub reconnects_per_sec_max: u64,
    pub latency_ms: Percentiles,
    pub recovery_ms: RecoveryPercentiles,
    /// The bound on reconnects per second the run was held to, if any.
    pub reconnects_per_sec_bound: Option<u64>,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RecoveryPercentiles {
    pub p99: f64,
}

impl Report {
    /// Zero silent loss is the only acceptable outcome of the fixed design (and, when a bound was
    /// given, no second with more reconnects than it).
    pub fn acceptable(&self) -> bool {
        let calm = self.reconnects_per_sec_bound.is_none_or(|bound| self.reconnects_per_sec_max <= bound);
        (self.design == "naive" || (self.lost_silently == 0 && self.positions_reused == 0)) && calm
    }

    pub fn table(&self) -> String {
        let share = |n: u64| if self.published == 0 { 0.0 } else { 100.0 * n as f64 / self.published as f64 };
        let faults = if self.faults.is_empty() { "none".to_owned() } else { self.faults.join(", ") };
        format!(
            "design {} | {} nodes | {} clients | {} jobs | faults: {}\n\
             published (callback got 200)   {:>8}\n\
             delivered live                 {:>8}  {:>6.2}%\n\
             recovered on resume            {:>8}  {:>6.2}%\n\
             covered by a reset             {:>8}  {:>6.2}%\n\
             LOST SILENTLY                  {:>8}  {:>6.2}%\n\
             resets received by clients     {:>8}\n\
             positions reused               {:>8}\n\
             duplicates dropped by offset   {:>8}\n\
             callbacks that failed loudly   {:>8}\n\
             client reconnects              {:>8}  (at most {} in one second)\n\
             end-to-end latency ms          p50 {:.1}  p99 {:.1}  max {:.1}\n\
             recovery latency ms            p99 {:.1}",
            self.design,
            self.nodes,
            self.clients,
            self.jobs,
            faults,
            self.published,
            self.delivered_live,
            share(self.delivered_live),
            self.recovered,
            share(self.recovered),
            self.reset_covered,
            share(self.reset_covered),
            self.lost_silently,
            share(self.lost_silently),
            self.resets,
            self.positions_reused,
            self.duplicates_dropped,
            self.publish_failed,
            self.reconnects,
            self.reconnects_per_sec_max,
            self.latency_ms.p50,
            self.latency_ms.p99,
            self.latency_ms.max,
            self.recovery_ms.p99,
        )
    }
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// One acknowledged publication.
#[derive(Debug, Clone)]
struct Ack {
    user: usize,
    epoch: String,
    offset: u64,
    acked_us: u64,
}

/// What one simulated browser saw.
#[derive(Debug, Default)]
struct ClientLog {
    /// Job -> (receive time, recovered, sent time).
    received: HashMap<u64, (u64, bool, u64)>,
    /// (epoch, offset, receive time) of each reset.
    resets: Vec<(String, u64, u64)>,
    /// (epoch, offset) -> job of every publication received, to catch a position handed out twice.
    positions: HashMap<(String, u64), u64>,
    positions_reused: u64,
    duplicates: u64,
    reconnects: u64,
    /// When each reconnect succeeded (µs since the Unix epoch).
    reconnect_times_us: Vec<u64>,
    /// Per connection that replayed something: time from open to the last replayed event.
    recoveries_us: Vec<u64>,
}

struct ClientControl {
    drop_now: Notify,
    stop: AtomicBool,
    stopped: Notify,
}

/// Runs the scenario and returns its report: the engine, the nodes behind a balancer, the browsers,
/// the faults and the jobs, then a drain until every update is accounted for (or time is up).
pub async fn run(herald: &str, args: &ScenarioArgs) -> anyhow::Result<Report> {
    if args.nodes == 0 || args.clients == 0 {
        bail!("need at least one node and one client");
    }
    let naive = args.engine == "naive";
    let (engine_url, engines) = start_engine(args)?;
    let (nodes, http) = start_nodes(herald, args, &engine_url).await?;
    let backends: Vec<SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let balancer = TcpListener::bind("127.0.0.1:0").await?;
    let balancer_addr = balancer.local_addr()?;
    let balancer_task = tokio::spawn(balance(balancer, backends.clone()));
    let browsers = start_browsers(args, balancer_addr, &backends).await?;

    let run_for = Duration::from_secs(args.seconds.max(1));
    let nodes = Arc::new(tokio::sync::Mutex::new(nodes));
    let mut faults = Faults::default();
    node_faults(args, run_for, &nodes, &http, &mut faults);
    engine_faults(args, run_for, &engines, &mut faults);
    let dropping = connection_faults(args, &browsers.controls, &mut faults);
    let (acks, failed) = run_jobs(args, run_for, &http, &backends).await?;
    for task in faults.tasks {
        task.await?.context("fault injection")?;
    }
    dropping.store(false, Ordering::Relaxed);

    let report = drain(args, naive, &faults.names, &acks, failed, &browsers.logs).await;
    browsers.stop().await;
    balancer_task.abort();
    drop(nodes);
    drop(engines);
    Ok(report)
}

/// The Redis processes this tool started (none for `naive` or a given URL), shared with the faults.
struct Engines {
    redis: Arc<Mutex<Option<RedisServer>>>,
    cluster: Arc<Mutex<Option<RedisCluster>>>,
    nats: Arc<Mutex<Option<NatsCluster>>>,
    sentineled: Arc<Mutex<Option<Sentineled>>>,
}

/// The engine URL the nodes use, and the processes behind it.
fn start_engine(args: &ScenarioArgs) -> anyhow::Result<(String, Engines)> {
    let mut redis = None;
    let mut sentineled = None;
    let mut nats = None;
    let mut cluster = None;
    let engine_url = match args.engine.as_str() {
        "naive" => "memory".to_owned(),
        "redis-cluster" => {
            let started = RedisCluster::try_start(3, 1)?;
            let url = started.url();
            cluster = Some(started);
            url
        }
        "redis" if args.failover_engine => {
            let set = Sentineled::start()?;
            let url = set.url();
            sentineled = Some(set);
            url
        }
        "redis" => {
            let server = RedisServer::try_start(&[], args.rollback_engine)?;
            let url = server.url();
            redis = Some(server);
            url
        }
        "nats" => {
            let cluster = NatsCluster::try_start(3)?;
            let url = cluster.url();
            nats = Some(cluster);
            url
        }
        url if url.starts_with("redis://") || url.starts_with("nats://") => url.to_owned(),
        other => bail!("unknown engine {other:?}: use naive, redis, redis-cluster, nats or a redis:// or nats:// URL"),
    };
    if args.reshard && args.engine != "redis-cluster" {
        bail!("--reshard needs --engine redis-cluster (a Redis Cluster this tool started)");
    }
    if args.kill_engine_server && args.engine != "nats" {
        bail!("--kill-engine-server needs --engine nats (a NATS cluster this tool started)");
    }
    let own_redis = args.engine == "redis";
    if (args.restart_engine || args.rollback_engine) && !own_redis {
        bail!("--restart-engine and --rollback-engine need --engine redis (a Redis this tool started)");
    }
    if args.failover_engine && !own_redis && args.engine != "redis-cluster" {
        bail!("--failover-engine needs --engine redis or redis-cluster (started by this tool)");
    }
    if args.failover_engine && (args.restart_engine || args.rollback_engine) {
        bail!("--failover-engine replaces the single Redis that --restart-engine and --rollback-engine act on");
    }
    let engines = Engines {
        redis: Arc::new(Mutex::new(redis)),
        cluster: Arc::new(Mutex::new(cluster)),
        nats: Arc::new(Mutex::new(nats)),
        sentineled: Arc::new(Mutex::new(sentineled)),
    };
    Ok((engine_url, engines))
}

/// Starts `args.nodes` nodes on `engine_url` and waits until each is ready.
async fn start_nodes(
    herald: &str,
    args: &ScenarioArgs,
    engine_url: &str,
) -> anyhow::Result<(Vec<Node>, reqwest::Client)> {
    let prefix = format!("scenario{:08x}", rand::rng().random::<u32>());
    let drain_window = args.drain_window_ms.to_string();
    // The NATS cluster this tool starts has three servers: history on all three.
    let replicas = if args.engine == "nats" { "3" } else { "1" };
    let env = [
        ("HERALD_ENGINE", engine_url),
        ("HERALD_REDIS__PREFIX", prefix.as_str()),
        ("HERALD_REDIS__PROBE_INTERVAL_MS", "200"),
        ("HERALD_REDIS__PROBE_TIMEOUT_MS", "1000"),
        ("HERALD_NATS__PREFIX", prefix.as_str()),
        ("HERALD_NATS__PROBE_INTERVAL_MS", "200"),
        ("HERALD_NATS__PROBE_TIMEOUT_MS", "1000"),
        ("HERALD_NATS__COMMAND_TIMEOUT_MS", "2000"),
        ("HERALD_NATS__REPLICAS", replicas),
        ("HERALD_SHUTDOWN_GRACE_SECS", "10"),
        ("HERALD_DRAIN_WINDOW_MS", drain_window.as_str()),
        ("HERALD_LOG", "error"),
    ];
    let mut nodes = Vec::new();
    for _ in 0..args.nodes {
        nodes.push(Node::start(herald, &env).await?);
    }
    let http = reqwest::Client::builder().no_proxy().tcp_nodelay(true).build()?;
    for node in &nodes {
        wait_ready(&http, node.addr).await?;
    }
    Ok((nodes, http))
}

/// The simulated browsers: how to reach each, what each saw, their tasks.
struct Browsers {
    controls: Vec<Arc<ClientControl>>,
    logs: Vec<Arc<Mutex<ClientLog>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Browsers {
    /// Tells every browser to stop and waits for them.
    async fn stop(self) {
        for control in &self.controls {
            control.stop.store(true, Ordering::Relaxed);
            control.stopped.notify_one();
        }
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Starts one browser per client (through the balancer, or round robin with `--direct`) and waits
/// until every one is connected.
async fn start_browsers(
    args: &ScenarioArgs,
    balancer_addr: SocketAddr,
    backends: &[SocketAddr],
) -> anyhow::Result<Browsers> {
    let connected = Arc::new(AtomicUsize::new(0));
    let mut controls = Vec::new();
    let mut logs = Vec::new();
    let mut tasks = Vec::new();
    for user in 0..args.clients {
        let control =
            Arc::new(ClientControl { drop_now: Notify::new(), stop: AtomicBool::new(false), stopped: Notify::new() });
        let log = Arc::new(Mutex::new(ClientLog::default()));
        let targets = if args.direct { vec![backends[user % backends.len()]] } else { vec![balancer_addr] };
        let slow = rand::rng().random_bool(args.slow_clients.clamp(0.0, 1.0));
        let task = tokio::spawn(
            Browser {
                offline: args.offline_ms.map(Duration::from_millis),
                user,
                targets,
                backends: backends.to_vec(),
                direct: args.direct,
                slow,
                control: control.clone(),
                log: log.clone(),
                connected: connected.clone(),
            }
            .run(),
        );
        controls.push(control);
        logs.push(log);
        tasks.push(task);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while connected.load(Ordering::Relaxed) < args.clients {
        if Instant::now() > deadline {
            bail!("only {} of {} clients connected", connected.load(Ordering::Relaxed), args.clients);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    Ok(Browsers { controls, logs, tasks })
}

/// The faults injected, by name, and the tasks injecting them.
#[derive(Default)]
struct Faults {
    names: Vec<String>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// `--kill-node` and `--rolling-restart`.
fn node_faults(
    args: &ScenarioArgs,
    run_for: Duration,
    nodes: &Arc<tokio::sync::Mutex<Vec<Node>>>,
    http: &reqwest::Client,
    faults: &mut Faults,
) {
    if args.kill_node {
        faults.names.push("kill-node".to_owned());
        let (nodes, http) = (nodes.clone(), http.clone());
        faults.tasks.push(tokio::spawn(async move {
            tokio::time::sleep(run_for.mul_f64(0.3)).await;
            let mut nodes = nodes.lock().await;
            let victim = nodes.len() - 1;
            nodes[victim].signal("KILL")?;
            nodes[victim].wait_exit().await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            nodes[victim].restart().await?;
            wait_ready(&http, nodes[victim].addr).await
        }));
    }
    if args.rolling_restart {
        faults.names.push("rolling-restart".to_owned());
        let (nodes, http) = (nodes.clone(), http.clone());
        faults.tasks.push(tokio::spawn(async move {
            tokio::time::sleep(run_for.mul_f64(0.4)).await;
            let mut nodes = nodes.lock().await;
            for node in nodes.iter_mut() {
                node.signal("TERM")?;
                node.wait_exit().await?;
                node.restart().await?;
                wait_ready(&http, node.addr).await?;
            }
            Ok(())
        }));
    }
}

/// `--restart-engine`, `--rollback-engine`, `--failover-engine` and `--kill-engine-server`.
fn engine_faults(args: &ScenarioArgs, run_for: Duration, engines: &Engines, faults: &mut Faults) {
    if args.kill_engine_server {
        faults.names.push("kill-engine-server".to_owned());
        let nats = engines.nats.clone();
        faults.tasks.push(tokio::spawn(async move {
            tokio::time::sleep(run_for.mul_f64(0.4)).await;
            let victim = nats.clone();
            tokio::task::spawn_blocking(move || {
                if let Ok(mut guard) = victim.lock() {
                    if let Some(cluster) = guard.as_mut() {
                        cluster.kill(0);
                    }
                }
            })
            .await?;
            tokio::time::sleep(run_for.mul_f64(0.3)).await;
            tokio::task::spawn_blocking(move || match nats.lock() {
                Ok(mut guard) => guard.as_mut().map_or(Ok(()), |cluster| cluster.try_restart(0)),
                Err(_) => Ok(()),
            })
            .await?
        }));
    }
    if args.restart_engine {
        faults.names.push("restart-engine".to_owned());
        let redis = engines.redis.clone();
        faults.tasks.push(tokio::spawn(async move {
            tokio::time::sleep(run_for.mul_f64(0.6)).await;
            tokio::task::spawn_blocking(move || match redis.lock() {
                Ok(mut guard) => guard.as_mut().map_or(Ok(()), |r| r.crash_and_restart(Duration::from_secs(1))),
                Err(_) => Ok(()),
            })
            .await?
        }));
    }
    if args.rollback_engine {
        faults.names.push("rollback-engine".to_owned());
        let redis = engines.redis.clone();
        faults.tasks.push(tokio::spawn(async move {
            tokio::time::sleep(run_for.mul_f64(0.3)).await;
            let saved = {
                let redis = redis.clone();
                tokio::task::spawn_blocking(move || match redis.lock() {
                    Ok(guard) => guard.as_ref().map_or(Ok(String::new()), |r| r.query::<String>(&["SAVE"])),
                    Err(_) => Ok(String::new()),
                })
                .await??
            };
            if saved != "OK" {
                bail!("SAVE failed: {saved}");
            }
            tokio::time::sleep(run_for.mul_f64(0.4)).await;
            tokio::task::spawn_blocking(move || match redis.lock() {
                Ok(mut guard) => guard.as_mut().map_or(Ok(()), |r| r.crash_and_restart(Duration::from_millis(500))),
                Err(_) => Ok(()),
            })
            .await?
        }));
    }
    if args.reshard {
        faults.names.push("reshard".to_owned());
        let cluster = engines.cluster.clone();
        faults.tasks.push(tokio::spawn(async move {
            tokio::time::sleep(run_for.mul_f64(0.4)).await;
            tokio::task::spawn_blocking(move || match cluster.lock() {
                Ok(guard) => guard.as_ref().map_or(Ok(()), reshard_first_users),
                Err(_) => Ok(()),
            })
            .await?
        }));
    }
    if args.failover_engine && engines.cluster.lock().is_ok_and(|c| c.is_some()) {
        faults.names.push("failover-engine".to_owned());
        let cluster = engines.cluster.clone();
        faults.tasks.push(tokio::spawn(async move {
            tokio::time::sleep(run_for.mul_f64(0.5)).await;
            let victim = {
                let cluster = cluster.clone();
                tokio::task::spawn_blocking(move || match cluster.lock() {
                    Ok(mut guard) => guard.as_mut().map_or(Ok(None), kill_first_users_primary),
                    Err(_) => Ok(None),
                })
                .await??
            };
            tokio::time::sleep(run_for.mul_f64(0.2)).await;
            tokio::task::spawn_blocking(move || match (cluster.lock(), victim) {
                (Ok(mut guard), Some(victim)) => guard.as_mut().map_or(Ok(()), |c| c.restart(victim)),
                _ => Ok(()),
            })
            .await?
        }));
    } else if args.failover_engine {
        faults.names.push("failover-engine".to_owned());
        let sentineled = engines.sentineled.clone();
        faults.tasks.push(tokio::spawn(async move {
            tokio::time::sleep(run_for.mul_f64(0.5)).await;
            tokio::task::spawn_blocking(move || match sentineled.lock() {
                Ok(mut guard) => {
                    guard.as_mut().map_or(Ok(()), |s| s.fail_over_to_a_lagging_replica(Duration::from_millis(500)))
                }
                Err(_) => Ok(()),
            })
            .await?
        }));
    }
}

/// Moves the slot of each of the first 16 users' channels to the next primary.
fn reshard_first_users(cluster: &RedisCluster) -> anyhow::Result<()> {
    for user in 0..16 {
        let slot = cluster.slot_of(&format!("{{user:{user}}}"))?;
        let primaries = cluster.primaries();
        let owner = cluster.owner_of(slot)?;
        let next = primaries.iter().position(|p| *p == owner).map_or(0, |i| (i + 1) % primaries.len());
        cluster.migrate_slot(slot, primaries[next])?;
    }
    Ok(())
}

/// Kills the primary serving user 0's channel and waits until its replica took over; returns it.
fn kill_first_users_primary(cluster: &mut RedisCluster) -> anyhow::Result<Option<usize>> {
    let victim = cluster.owner_of(cluster.slot_of("{user:0}")?)?;
    cluster.kill(victim);
    cluster.wait_settled()?;
    Ok(Some(victim))
}

/// `--drop-connections` (every 3 s while the returned flag holds) and `--slow-clients` (named only: the
/// browsers read slowly themselves).
fn connection_faults(args: &ScenarioArgs, controls: &[Arc<ClientControl>], faults: &mut Faults) -> Arc<AtomicBool> {
    let dropping = Arc::new(AtomicBool::new(true));
    if args.drop_connections > 0.0 {
        faults.names.push(format!("drop-connections {}", args.drop_connections));
        let (controls, share, dropping) = (controls.to_vec(), args.drop_connections.clamp(0.0, 1.0), dropping.clone());
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_secs(3));
            interval.tick().await;
            while dropping.load(Ordering::Relaxed) {
                interval.tick().await;
                for control in &controls {
                    if rand::rng().random_bool(share) {
                        control.drop_now.notify_one();
                    }
                }
            }
        });
    }
    if args.slow_clients > 0.0 {
        faults.names.push(format!("slow-clients {}", args.slow_clients));
    }

    dropping
}

/// The external system: jobs finish at random times and call back a random node. Returns the
/// acknowledged publications by job, and how many callbacks never got a 200.
async fn run_jobs(
    args: &ScenarioArgs,
    run_for: Duration,
    http: &reqwest::Client,
    backends: &[SocketAddr],
) -> anyhow::Result<(Arc<Mutex<HashMap<u64, Ack>>>, u64)> {
    let acks: Arc<Mutex<HashMap<u64, Ack>>> = Arc::new(Mutex::new(HashMap::new()));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut job_tasks = Vec::new();
    for job in 0..args.jobs as u64 {
        let delay = run_for.mul_f64(rand::rng().random::<f64>());
        let user = rand::rng().random_range(0..args.clients);
        let (http, acks, failed, backends) = (http.clone(), acks.clone(), failed.clone(), backends.to_vec());
        job_tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until((started + delay).into()).await;
            match callback(&http, &backends, job, user).await {
                Some(ack) => {
                    if let Ok(mut acks) = acks.lock() {
                        acks.insert(job, ack);
                    }
                }
                None => {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for task in job_tasks {
        task.await?;
    }
    Ok((acks, failed.load(Ordering::Relaxed)))
}

/// Gives clients time to receive, resume or be told; the fixed design must account for all.
async fn drain(
    args: &ScenarioArgs,
    naive: bool,
    faults: &[String],
    acks: &Mutex<HashMap<u64, Ack>>,
    failed: u64,
    logs: &[Arc<Mutex<ClientLog>>],
) -> Report {
    let drain_until = Instant::now() + if naive { Duration::from_secs(3) } else { Duration::from_secs(20) };
    let mut report;
    loop {
        report = account(args, faults, acks, logs, failed);
        if report.lost_silently == 0 || Instant::now() > drain_until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    report
}

async fn wait_ready(http: &reqwest::Client, addr: SocketAddr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(response) = http.get(format!("http://{addr}/readyz")).send().await {
            if response.status().is_success() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("node {addr} never became ready");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Round-robin TCP balancer: each accepted connection goes to the next backend that accepts it.
async fn balance(listener: TcpListener, backends: Vec<SocketAddr>) {
    let next = Arc::new(AtomicUsize::new(0));
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else { continue };
        let (backends, next) = (backends.clone(), next.clone());
        tokio::spawn(async move {
            let _ = inbound.set_nodelay(true);
            for _ in 0..backends.len() {
                let backend = backends[next.fetch_add(1, Ordering::Relaxed) % backends.len()];
                if let Ok(mut outbound) = TcpStream::connect(backend).await {
                    let _ = outbound.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    return;
                }
            }
        });
    }
}

/// Sends one job's result to random nodes until one answers 200 (like a webhook sender retrying).
async fn callback(http: &reqwest::Client, backends: &[SocketAddr], job: u64, user: usize) -> Option<Ack> {
    for _ in 0..100 {
        let node = backends[rand::rng().random_range(0..backends.len())];
        let body =
            json!({"channel": format!("user:{user}"), "event": "job.done", "data": {"job": job, "sent_us": now_us()}});
        let answer = http
            .post(format!("http://{node}/v1/publish"))
            .header("x-correlation-id", format!("job-{job}"))
            .json(&body)
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        if let Ok(response) = answer {
            if response.status().is_success() {
                let value: Value = response.json().await.ok()?;
                return Some(Ack {
                    user,
                    epoch: value["epoch"].as_str()?.to_owned(),
                    offset: value["offset"].as_u64()?,
                    acked_us: now_us(),
                });
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// One simulated browser: an EventSource on its own `user:<id>` channel that reconnects with
/// `Last-Event-ID` after every drop, logging what it receives.
struct Browser {
    /// How long it stays offline after a dropped connection (default: the server's `retry:`).
    offline: Option<Duration>,
    user: usize,
    /// Where it connects (the balancer), unless `direct`.
    targets: Vec<SocketAddr>,
    /// The nodes, for `direct` browsers that move on to the next one when theirs is gone.
    backends: Vec<SocketAddr>,
    direct: bool,
    /// Pauses after every read.
    slow: bool,
    control: Arc<ClientControl>,
    log: Arc<Mutex<ClientLog>>,
    /// Counts browsers whose first connection succeeded.
    connected: Arc<AtomicUsize>,
}

impl Browser {
    async fn run(self) {
        let Browser { offline, user, targets, backends, direct, slow, control, log, connected } = self;
        let http = match reqwest::Client::builder().no_proxy().tcp_nodelay(true).build() {
            Ok(http) => http,
            Err(_) => return,
        };
        let mut last_id = String::new();
        let mut position: Option<(String, u64)> = None;
        let mut first = true;
        let mut attempt = 0usize;
        while !control.stop.load(Ordering::Relaxed) {
            // Direct clients move to the next node when theirs is gone, as a DNS round robin would.
            let target = if direct { backends[(user + attempt) % backends.len()] } else { targets[0] };
            attempt += 1;
            let mut request = http.get(format!("http://{target}/v1/sse?channel=user:{user}"));
            if !last_id.is_empty() {
                request = request.header("last-event-id", &last_id);
            }
            let mut retry = Duration::from_millis(1000);
            if let Ok(response) = request.send().await {
                if response.status().is_success() {
                    let opened_us = now_us();
                    if first {
                        connected.fetch_add(1, Ordering::Relaxed);
                        first = false;
                    } else if let Ok(mut log) = log.lock() {
                        log.reconnects += 1;
                        log.reconnect_times_us.push(opened_us);
                    }
                    let mut last_replayed = None;
                    let mut events = response.bytes_stream().eventsource();
                    loop {
                        let event = tokio::select! {
                            event = events.next() => event,
                            _ = control.drop_now.notified() => {
                                if let Some(offline) = offline {
                                    retry = offline;
                                }
                                None
                            }
                            _ = control.stopped.notified() => None,
                        };
                        let Some(Ok(event)) = event else { break };
                        if let Some(value) = event.retry {
                            retry = value;
                        }
                        if !event.id.is_empty() {
                            last_id = event.id.clone();
                        }
                        if let Some(at) = record(&log, &event.event, &event.data, opened_us, &mut position) {
                            last_replayed = Some(at);
                        }
                        if slow {
                            tokio::time::sleep(Duration::from_millis(250)).await;
                        }
                    }
                    if let (Some(at), Ok(mut log)) = (last_replayed, log.lock()) {
                        log.recoveries_us.push(at.saturating_sub(opened_us));
                    }
                }
            }
            if control.stop.load(Ordering::Relaxed) {
                break;
            }
            // EventSource waits `retry` before reconnecting; a little jitter spreads a storm.
            let jitter = Duration::from_millis(rand::rng().random_range(0..250));
            tokio::select! {
                _ = tokio::time::sleep(retry.min(Duration::from_secs(10)) + jitter) => {}
                _ = control.stopped.notified() => break,
            }
        }
    }
}

/// Records one event in the client's log, dropping what the client already holds (by offset) as a
/// careful client does. Returns the receive time when the event reached the client through recovery.
fn record(
    log: &Mutex<ClientLog>,
    event: &str,
    data: &str,
    opened_us: u64,
    position: &mut Option<(String, u64)>,
) -> Option<u64> {
    let data: Value = serde_json::from_str(data).ok()?;
    let now = now_us();
    let mut log = log.lock().ok()?;
    let epoch = data["epoch"].as_str().unwrap_or_default().to_owned();
    let offset = data["offset"].as_u64().unwrap_or(0);
    match event {
        "herald.reset" => {
            log.resets.push((epoch.clone(), offset, now));
            *position = Some((epoch, offset));
            None
        }
        "job.done" => {
            if position.as_ref().is_some_and(|(e, o)| *e == epoch && offset <= *o) {
                log.duplicates += 1;
                return None;
            }
            let published_us = data["published_at"]
                .as_str()
                .and_then(|t| humantime::parse_rfc3339(t).ok())
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_micros() as u64);
            // Published before this connection opened: it reached the client through recovery.
            let recovered = published_us + 1000 < opened_us;
            let job = data["data"]["job"].as_u64().unwrap_or(u64::MAX);
            if log.positions.insert((epoch.clone(), offset), job).is_some_and(|earlier| earlier != job) {
                log.positions_reused += 1;
            }
            let sent = data["data"]["sent_us"].as_u64().unwrap_or(now);
            log.received.entry(job).or_insert((now, recovered, sent));
            *position = Some((epoch, offset));
            recovered.then_some(now)
        }
        _ => None,
    }
}

fn account(
    args: &ScenarioArgs,
    faults: &[String],
    acks: &Mutex<HashMap<u64, Ack>>,
    logs: &[Arc<Mutex<ClientLog>>],
    failed: u64,
) -> Report {
    let acks = acks.lock().map(|a| a.clone()).unwrap_or_default();
    let mut report = Report {
        design: match args.engine.as_str() {
            "naive" => "naive".into(),
            "redis-cluster" => "redis-cluster".into(),
            url if url.starts_with("nats") => "nats".into(),
            url if url.contains("+cluster://") => "redis-cluster".into(),
            _ => "redis".into(),
        },
        nodes: args.nodes,
        clients: args.clients,
        jobs: args.jobs,
        faults: faults.to_vec(),
        published: acks.len() as u64,
        publish_failed: failed,
        reconnects_per_sec_bound: args.max_reconnects_per_sec,
        ..Report::default()
    };
    let mut latency = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("constant bounds are valid");
    let mut recovery = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("constant bounds are valid");
    let mut per_second: HashMap<u64, u64> = HashMap::new();
    for log in logs {
        if let Ok(log) = log.lock() {
            report.duplicates_dropped += log.duplicates;
            report.reconnects += log.reconnects;
            report.resets += log.resets.len() as u64;
            report.positions_reused += log.positions_reused;
            for at in &log.reconnect_times_us {
                *per_second.entry(at / 1_000_000).or_default() += 1;
            }
            for value in &log.recoveries_us {
                let _ = recovery.record((*value).max(1));
            }
        }
    }
    for (job, ack) in &acks {
        let Some(log) = logs.get(ack.user) else { continue };
        let Ok(log) = log.lock() else { continue };
        if let Some((at, recovered, sent)) = log.received.get(job) {
            let _ = latency.record(at.saturating_sub(*sent).max(1));
            if *recovered {
                report.recovered += 1;
            } else {
                report.delivered_live += 1;
            }
            continue;
        }
        let covered = log.resets.iter().any(|(epoch, offset, at)| {
            (*epoch == ack.epoch && *offset >= ack.offset) || (*epoch != ack.epoch && *at >= ack.acked_us)
        });
        if covered {
            report.reset_covered += 1;
        } else {
            report.lost_silently += 1;
            if std::env::var_os("SCENARIO_DEBUG_LOST").is_some() {
                let mut seen: Vec<_> = log.positions.iter().map(|((e, o), j)| (e.clone(), *o, *j)).collect();
                seen.sort();
                eprintln!(
                    "LOST job {job} user {} at {}:{} acked {} seen {:?} resets {:?}",
                    ack.user, ack.epoch, ack.offset, ack.acked_us, seen, log.resets
                );
            }
        }
    }
    report.reconnects_per_sec_max = per_second.values().copied().max().unwrap_or(0);
    let ms = |us: u64| (us as f64 / 100.0).round() / 10.0;
    report.latency_ms = Percentiles {
        p50: ms(latency.value_at_quantile(0.5)),
        p99: ms(latency.value_at_quantile(0.99)),
        max: ms(latency.max()),
    };
    report.recovery_ms = RecoveryPercentiles { p99: ms(recovery.value_at_quantile(0.99)) };
    report
}
