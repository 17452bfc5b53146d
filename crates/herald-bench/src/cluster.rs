//! Cluster benchmarks: a `redis-server` and several `herald` nodes started by this tool, subscribers
//! on node 0, publications sent to the other nodes, so every delivery crosses nodes through Redis.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;

use crate::clients::{SseFleet, publish_client};
use crate::node::{Node, cpu_seconds_of};

/// A `redis-server` of the benchmark's own, on a free loopback port: with nothing on disk, or keeping
/// snapshots in a folder of its own (removed on drop) so that a restart loads an older state.
pub struct Redis {
    child: Child,
    pub port: u16,
    args: Vec<String>,
    dir: Option<std::path::PathBuf>,
}

impl Redis {
    pub fn start() -> anyhow::Result<Redis> {
        Self::start_with(&[], false)
    }

    /// Starts with `extra` arguments (`--replicaof …`); with `persistent`, in a data folder of its own
    /// where `SAVE` writes a snapshot that the next start loads.
    pub fn start_with(extra: &[&str], persistent: bool) -> anyhow::Result<Redis> {
        let port = free_port()?;
        let mut args: Vec<String> = vec!["--save".into(), String::new()];
        let dir = if persistent {
            let dir = std::env::temp_dir().join(format!("herald-bench-redis-{}-{port}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            args.extend(["--dir".to_owned(), dir.display().to_string()]);
            Some(dir)
        } else {
            args.extend(["--appendonly".to_owned(), "no".to_owned()]);
            None
        };
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let child = spawn_redis(port, &args)?;
        let redis = Redis { child, port, args, dir };
        redis.wait_ready()?;
        Ok(redis)
    }

    /// Kills Redis (like a crash) and starts it again: empty, or from its last snapshot when persistent.
    pub fn crash_and_restart(&mut self, down_for: Duration) -> anyhow::Result<()> {
        self.crash();
        std::thread::sleep(down_for);
        self.child = spawn_redis(self.port, &self.args)?;
        self.wait_ready()
    }

    /// Kills Redis (SIGKILL) for good.
    pub fn crash(&mut self) {
        // A stopped process is woken first, so it exits at once (and never twice: a dead one is left be).
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.signal("CONT");
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends a signal (`STOP`, `CONT`) to the process.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = Command::new("kill").args(["-s", signal, &self.child.id().to_string()]).status()?;
        if !status.success() {
            bail!("kill -s {signal} {} failed", self.child.id());
        }
        Ok(())
    }

    fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.command(&["PING"]).map(|r| r.starts_with("+PONG")).unwrap_or(false) {
            if Instant::now() > deadline {
                bail!("redis-server did not start");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Waits until this replica follows `primary` (its link is up).
    pub fn wait_synced(&self, primary: &Redis) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let info = self.command(&["INFO", "replication"])?;
            if info.contains("master_link_status:up") && info.contains(&format!("master_port:{}", primary.port)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("replica of port {} never caught up", primary.port);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// One command over RESP; the raw answer.
    pub fn command(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{}\r\n", arg.len(), arg));
        }
        stream.write_all(request.as_bytes())?;
        let mut answer = Vec::new();
        let mut buffer = [0u8; 65536];
        loop {
            let read = stream.read(&mut buffer)?;
            answer.extend_from_slice(&buffer[..read]);
            if read == 0 || complete(&answer) {
                break;
            }
        }
        Ok(String::from_utf8_lossy(&answer).into_owned())
    }

    /// Total calls of every command since the last `CONFIG RESETSTAT`.
    pub fn total_calls(&self) -> anyhow::Result<u64> {
        let info = self.command(&["INFO", "commandstats"])?;
        Ok(info
            .lines()
            .filter_map(|l| l.split_once("calls=").map(|(_, rest)| rest))
            .filter_map(|rest| rest.split(',').next()?.parse::<u64>().ok())
            .sum())
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn spawn_redis(port: u16, args: &[String]) -> anyhow::Result<Child> {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(args)
        .stdout(Stdio::null())
        .spawn()
        .context("starting redis-server (install it: apt-get install redis-server)")
}

/// Whether a RESP answer has arrived whole (enough for the simple and bulk replies used here).
fn complete(answer: &[u8]) -> bool {
    match answer.first() {
        Some(b'$') => {
            let text = String::from_utf8_lossy(answer);
            let Some((len, rest)) = text[1..].split_once("\r\n") else { return false };
            len.parse::<usize>().map(|len| rest.len() >= len + 2).unwrap_or(true)
        }
        Some(_) => answer.ends_with(b"\r\n"),
        None => false,
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.crash();
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A Redis primary with one replica and three sentinels watching it (quorum 2, a primary silent for one
/// second is failed over); every process of its own, stopped on drop.
pub struct Sentineled {
    pub primary: Redis,
    pub replica: Redis,
    sentinels: Vec<Child>,
    ports: Vec<u16>,
    dir: std::path::PathBuf,
}

/// The name the sentinels know the primary by.
pub const SENTINEL_MASTER: &str = "herald";

impl Sentineled {
    pub fn start() -> anyhow::Result<Sentineled> {
        let primary = Redis::start_with(&[], true)?;
        let replica_of = format!("127.0.0.1 {}", primary.port);
        let replica = Redis::start_with(&["--replicaof", &replica_of], true)?;
        let dir = std::env::temp_dir().join(format!("herald-bench-sentinel-{}-{}", std::process::id(), primary.port));
        std::fs::create_dir_all(&dir)?;
        let (mut sentinels, mut ports) = (Vec::new(), Vec::new());
        for i in 0..3 {
            let port = free_port()?;
            // Sentinels rewrite their configuration file: each gets a writable one.
            let file = dir.join(format!("sentinel-{i}.conf"));
            std::fs::write(
                &file,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor {SENTINEL_MASTER} 127.0.0.1 {} 2\n\
                     sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
                     sentinel failover-timeout {SENTINEL_MASTER} 10000\n",
                    dir.display(),
                    primary.port
                ),
            )?;
            let child = Command::new("redis-server")
                .arg(&file)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .spawn()
                .context("starting redis-server --sentinel")?;
            sentinels.push(child);
            ports.push(port);
        }
        let set = Sentineled { primary, replica, sentinels, ports, dir };
        for port in &set.ports {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !ping(*port) {
                if Instant::now() > deadline {
                    bail!("sentinel on port {port} did not start");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(set)
    }

    /// `redis+sentinel://…` for Herald.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        format!("redis+sentinel://{}/{SENTINEL_MASTER}/0", hosts.join(","))
    }

    /// Makes the replica lag for real (stopped and cut off from the primary), lets `lag_for` of writes
    /// reach the primary alone, kills the primary and wakes the replica, which the sentinels promote.
    pub fn fail_over_to_a_lagging_replica(&mut self, lag_for: Duration) -> anyhow::Result<()> {
        self.replica.signal("STOP")?;
        // Without the cut, the primary's next writes would wait in the stopped replica's socket buffer.
        self.primary.command(&["CLIENT", "KILL", "TYPE", "replica"])?;
        std::thread::sleep(lag_for);
        self.primary.crash();
        self.replica.signal("CONT")
    }
}

fn ping(port: u16) -> bool {
    let probe = || -> anyhow::Result<bool> {
        let mut stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(1)))?;
        stream.write_all(b"PING\r\n")?;
        let mut buffer = [0u8; 16];
        let read = stream.read(&mut buffer)?;
        Ok(buffer[..read].starts_with(b"+PONG"))
    };
    probe().unwrap_or(false)
}

impl Drop for Sentineled {
    fn drop(&mut self) {
        for child in &mut self.sentinels {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub struct Cluster {
    pub redis: Redis,
    /// With durable publishing: the replica every publish waits for (its CPU is not counted).
    pub replica: Option<Redis>,
    pub nodes: Vec<Node>,
}

impl Cluster {
    pub async fn start(herald: &str, size: usize) -> anyhow::Result<Cluster> {
        Self::start_with(herald, size, false).await
    }

    /// With `replicated`, Redis gets a replica and the nodes publish with `durability = "replicated"`.
    pub async fn start_with(herald: &str, size: usize, replicated: bool) -> anyhow::Result<Cluster> {
        let redis = Redis::start()?;
        let replica = if replicated {
            let replica_of = format!("127.0.0.1 {}", redis.port);
            Some(Redis::start_with(&["--replicaof", &replica_of], false)?)
        } else {
            None
        };
        let url = redis.url();
        let mut env = vec![("HERALD_ENGINE", url.as_str()), ("HERALD_REDIS__PREFIX", "bench")];
        // Only when asked, so that binaries without the setting can be compared (`--herald`).
        if replicated {
            env.push(("HERALD_REDIS__DURABILITY", "replicated"));
        }
        let mut nodes = Vec::new();
        for _ in 0..size.max(2) {
            nodes.push(Node::start(herald, &env).await?);
        }
        if let Some(replica) = &replica {
            replica.wait_synced(&redis)?;
        }
        Ok(Cluster { redis, replica, nodes })
    }

    /// CPU seconds used so far: Redis, then every node in order.
    pub fn cpu_seconds(&self) -> anyhow::Result<Vec<f64>> {
        let mut all = vec![cpu_seconds_of(self.redis.pid())?];
        for node in &self.nodes {
            all.push(node.cpu_seconds()?);
        }
        Ok(all)
    }
}

/// Result of one fixed-rate run.
pub struct Run {
    pub published: u64,
    pub delivered: u64,
    pub achieved_rate: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    /// CPU seconds of Redis, then of each node, during the run.
    pub cpu_seconds: Vec<f64>,
    pub redis_calls: u64,
    pub received_by_node: Vec<u64>,
}

/// Publishes at `rate` for `seconds` to nodes 1.. (round robin), `channels` channels with `per_channel`
/// subscribers each on node 0, and waits for every delivery. With `batch` above 1, each request carries
/// that many publications (`{"publications":[…]}`, consecutive channels).
pub async fn run(
    cluster: &Cluster,
    rate: u64,
    seconds: u64,
    channels: usize,
    per_channel: usize,
    batch: usize,
) -> anyhow::Result<Run> {
    let batch = batch.max(1) as u64;
    let names: Vec<String> = (0..channels).map(|i| format!("bench:{i}")).collect();
    let fleet = SseFleet::connect(cluster.nodes[0].addr, &names, channels * per_channel, true).await?;
    let before_received = received(cluster).await?;
    cluster.redis.command(&["CONFIG", "RESETSTAT"])?;
    let cpu_before = cluster.cpu_seconds()?;
    let total = (rate * seconds).div_ceil(batch) * batch;
    let requests = total / batch;
    let publishers = 32u64;
    let clock = fleet.clock();
    let started = Instant::now();
    let targets: Vec<String> = cluster.nodes[1..].iter().map(|n| n.url("/v1/publish")).collect();
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let (http, names, targets) = (publish_client(), names.clone(), targets.clone());
        tasks.push(tokio::spawn(async move {
            let mut k = p;
            let mut failures = 0u64;
            while k < requests {
                let due = clock + Duration::from_nanos(k * batch * 1_000_000_000 / rate);
                tokio::time::sleep_until(due.into()).await;
                let sent = clock.elapsed().as_nanos() as u64;
                let url = &targets[(k as usize) % targets.len()];
                let item = |m: u64| json!({"channel": names[(m as usize) % names.len()], "data": {"t": sent}});
                let body = if batch == 1 {
                    item(k)
                } else {
                    json!({"publications": (k * batch..(k + 1) * batch).map(item).collect::<Vec<_>>()})
                };
                match http.post(url).json(&body).send().await {
                    Ok(response) if response.status().is_success() => {}
                    _ => failures += 1,
                }
                k += publishers;
            }
            failures
        }));
    }
    let mut failures = 0;
    for task in tasks {
        failures += task.await?;
    }
    let publish_seconds = started.elapsed().as_secs_f64();
    if failures > 0 {
        bail!("{failures} publications failed");
    }
    fleet.wait_for(total * per_channel as u64, Duration::from_secs(30)).await?;
    let cpu_seconds = cluster.cpu_seconds()?.iter().zip(&cpu_before).map(|(a, b)| a - b).collect();
    let redis_calls = cluster.redis.total_calls()?;
    let after_received = received(cluster).await?;
    let histogram = fleet.latencies();
    let run = Run {
        published: total,
        delivered: fleet.delivered(),
        achieved_rate: total as f64 / publish_seconds,
        p50_us: histogram.value_at_quantile(0.5),
        p99_us: histogram.value_at_quantile(0.99),
        max_us: histogram.max(),
        cpu_seconds,
        redis_calls,
        received_by_node: after_received.iter().zip(&before_received).map(|(a, b)| a - b).collect(),
    };
    fleet.close();
    Ok(run)
}

/// Backplane messages each node has received (from its `/metrics`).
async fn received(cluster: &Cluster) -> anyhow::Result<Vec<u64>> {
    let http = publish_client();
    let mut counts = Vec::new();
    for node in &cluster.nodes {
        let text = http.get(node.url("/metrics")).send().await?.text().await?;
        let count = text
            .lines()
            .find_map(|l| l.strip_prefix("herald_engine_messages_received_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        counts.push(count as u64);
    }
    Ok(counts)
}
