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

/// A `redis-server` of the benchmark's own, on a free loopback port, with nothing on disk.
pub struct Redis {
    child: Child,
    pub port: u16,
}

impl Redis {
    pub fn start() -> anyhow::Result<Redis> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = spawn_redis(port)?;
        let redis = Redis { child, port };
        redis.wait_ready()?;
        Ok(redis)
    }

    /// Kills Redis (like a crash; nothing is on disk, so everything is lost) and starts it again.
    pub fn crash_and_restart(&mut self, down_for: Duration) -> anyhow::Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(down_for);
        self.child = spawn_redis(self.port)?;
        self.wait_ready()
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

fn spawn_redis(port: u16) -> anyhow::Result<Child> {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
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
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Cluster {
    pub redis: Redis,
    pub nodes: Vec<Node>,
}

impl Cluster {
    pub async fn start(herald: &str, size: usize) -> anyhow::Result<Cluster> {
        let redis = Redis::start()?;
        let url = redis.url();
        let mut nodes = Vec::new();
        for _ in 0..size.max(2) {
            nodes.push(
                Node::start(herald, &[("HERALD_ENGINE", url.as_str()), ("HERALD_REDIS__PREFIX", "bench")]).await?,
            );
        }
        Ok(Cluster { redis, nodes })
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
/// subscribers each on node 0, and waits for every delivery.
pub async fn run(
    cluster: &Cluster,
    rate: u64,
    seconds: u64,
    channels: usize,
    per_channel: usize,
) -> anyhow::Result<Run> {
    let names: Vec<String> = (0..channels).map(|i| format!("bench:{i}")).collect();
    let fleet = SseFleet::connect(cluster.nodes[0].addr, &names, channels * per_channel, true).await?;
    let before_received = received(cluster).await?;
    cluster.redis.command(&["CONFIG", "RESETSTAT"])?;
    let cpu_before = cluster.cpu_seconds()?;
    let total = rate * seconds;
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
            while k < total {
                let due = clock + Duration::from_nanos(k * 1_000_000_000 / rate);
                tokio::time::sleep_until(due.into()).await;
                let sent = clock.elapsed().as_nanos() as u64;
                let channel = &names[(k as usize) % names.len()];
                let url = &targets[(k as usize) % targets.len()];
                let body = json!({"channel": channel, "data": {"t": sent}});
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
