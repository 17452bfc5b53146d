//! Cluster benchmarks: an engine (a `redis-server`, a Redis Cluster, or `nats-server -js`: one, or three
//! with an R3 stream) and several `herald` nodes started by this tool, subscribers on node 0, publications sent to
//! the other nodes, so every delivery crosses nodes through the engine.

use std::time::{Duration, Instant};

use anyhow::bail;
use herald_testkit::{NatsCluster, NatsServer, RedisCluster, RedisServer, Sentinels};
use serde_json::json;

use crate::clients::{SseFleet, publish_client};
use crate::node::{Node, Usage, cpu_seconds_of, usage_of};

/// A Redis primary with one replica and three sentinels watching it (quorum 2, a primary silent for one
/// second is failed over); every process of its own, stopped on drop.
pub struct Sentineled {
    pub primary: RedisServer,
    pub replica: RedisServer,
    sentinels: Sentinels,
}

/// The name the sentinels know the primary by.
pub const SENTINEL_MASTER: &str = "herald";

impl Sentineled {
    pub fn start() -> anyhow::Result<Sentineled> {
        let primary = RedisServer::try_start(&[], true)?;
        let replica_of = format!("127.0.0.1 {}", primary.port);
        let replica = RedisServer::try_start(&["--replicaof", &replica_of], true)?;
        let sentinels = Sentinels::try_start(SENTINEL_MASTER, primary.port)?;
        Ok(Sentineled { primary, replica, sentinels })
    }

    /// `redis+sentinel://…` for Herald.
    pub fn url(&self) -> String {
        self.sentinels.url(SENTINEL_MASTER)
    }

    /// Makes the replica lag for real (stopped and cut off from the primary), lets `lag_for` of writes
    /// reach the primary alone, kills the primary and wakes the replica, which the sentinels promote.
    pub fn fail_over_to_a_lagging_replica(&mut self, lag_for: Duration) -> anyhow::Result<()> {
        self.replica.signal("STOP")?;
        // Without the cut, the primary's next writes would wait in the stopped replica's socket buffer.
        self.primary.query::<i64>(&["CLIENT", "KILL", "TYPE", "replica"])?;
        std::thread::sleep(lag_for);
        self.primary.stop();
        self.replica.signal("CONT")
    }
}

/// The engine processes behind a benchmark cluster.
#[expect(clippy::large_enum_variant, reason = "one value per benchmark run")]
pub enum Engine {
    Redis {
        redis: RedisServer,
        /// With durable publishing: the replica every publish waits for (its CPU is not counted).
        replica: Option<RedisServer>,
    },
    /// A Redis Cluster; the CPU and commands of its primaries are counted, shard by shard.
    RedisCluster(RedisCluster),
    /// One JetStream server (stream R1).
    Nats(NatsServer),
    /// Three JetStream servers (stream R3); the CPU of all three is counted.
    NatsReplicated(NatsCluster),
}

pub struct Cluster {
    pub engine: Engine,
    pub nodes: Vec<Node>,
}

impl Cluster {
    pub async fn start(herald: &str, size: usize) -> anyhow::Result<Cluster> {
        Self::start_with(herald, size, false).await
    }

    /// With `replicated`, Redis gets a replica and the nodes publish with `durability = "replicated"`.
    pub async fn start_with(herald: &str, size: usize, replicated: bool) -> anyhow::Result<Cluster> {
        let redis = RedisServer::try_start(&[], false)?;
        let replica = if replicated {
            let replica_of = format!("127.0.0.1 {}", redis.port);
            Some(RedisServer::try_start(&["--replicaof", &replica_of], false)?)
        } else {
            None
        };
        let nodes = start_nodes(herald, size, &redis_env(&redis.url(), replicated)).await?;
        if let Some(replica) = &replica {
            replica.wait_synced(&redis)?;
        }
        Ok(Cluster { engine: Engine::Redis { redis, replica }, nodes })
    }

    /// On a Redis Cluster of `primaries` shards; with `replicated`, each gets a replica and the nodes
    /// publish with `durability = "replicated"` (the replicas' CPU is not counted).
    pub async fn start_redis_cluster(
        herald: &str,
        size: usize,
        primaries: usize,
        replicated: bool,
    ) -> anyhow::Result<Cluster> {
        let cluster = RedisCluster::try_start(primaries, usize::from(replicated))?;
        let nodes = start_nodes(herald, size, &redis_env(&cluster.url(), replicated)).await?;
        Ok(Cluster { engine: Engine::RedisCluster(cluster), nodes })
    }

    /// The primaries of a Redis Cluster (servers by index), empty for other engines.
    fn shards(&self) -> Vec<usize> {
        match &self.engine {
            Engine::RedisCluster(cluster) => cluster.primaries(),
            _ => Vec::new(),
        }
    }

    /// CPU seconds and commands so far of each shard's primary.
    fn shard_usage(&self) -> anyhow::Result<Vec<(f64, u64)>> {
        let Engine::RedisCluster(cluster) = &self.engine else { return Ok(Vec::new()) };
        let missing = || anyhow::anyhow!("a cluster server is not running");
        self.shards()
            .into_iter()
            .map(|i| {
                let server = cluster.server(i);
                Ok((cpu_seconds_of(server.pid().ok_or_else(missing)?)?, server.total_calls()?))
            })
            .collect()
    }

    /// On NATS JetStream: one server (`servers = 1`, stream R1) or a cluster of three (stream R3).
    pub async fn start_nats(herald: &str, size: usize, servers: usize) -> anyhow::Result<Cluster> {
        let (engine, url) = if servers >= 3 {
            let cluster = NatsCluster::try_start(3)?;
            let url = cluster.url();
            (Engine::NatsReplicated(cluster), url)
        } else {
            let server = NatsServer::try_start()?;
            let url = server.url();
            (Engine::Nats(server), url)
        };
        let replicas = if servers >= 3 { "3" } else { "1" };
        let env = [
            ("HERALD_ENGINE", url),
            ("HERALD_NATS__PREFIX", "bench".to_owned()),
            ("HERALD_NATS__REPLICAS", replicas.to_owned()),
        ];
        let nodes = start_nodes(herald, size, &env).await?;
        Ok(Cluster { engine, nodes })
    }

    /// The engine's processes whose CPU counts.
    fn engine_pids(&self) -> anyhow::Result<Vec<u32>> {
        let missing = || anyhow::anyhow!("an engine process is not running");
        Ok(match &self.engine {
            Engine::Redis { redis, .. } => vec![redis.pid().ok_or_else(missing)?],
            Engine::RedisCluster(cluster) => self
                .shards()
                .into_iter()
                .map(|i| cluster.server(i).pid().ok_or_else(missing))
                .collect::<Result<_, _>>()?,
            Engine::Nats(server) => vec![server.pid().ok_or_else(missing)?],
            Engine::NatsReplicated(cluster) => {
                (0..cluster.len()).map(|i| cluster.server(i).pid().ok_or_else(missing)).collect::<Result<_, _>>()?
            }
        })
    }

    /// What was used so far: by the engine (all its processes), then by every node in order.
    pub fn usage(&self) -> anyhow::Result<Vec<Usage>> {
        let mut engine = Usage::default();
        for pid in self.engine_pids()? {
            engine.add(&usage_of(pid)?);
        }
        let mut all = vec![engine];
        for node in &self.nodes {
            all.push(node.usage()?);
        }
        Ok(all)
    }

    /// Starts counting Redis commands (nothing for NATS).
    fn reset_engine_stats(&self) -> anyhow::Result<()> {
        match &self.engine {
            Engine::Redis { redis, .. } => {
                redis.query::<String>(&["CONFIG", "RESETSTAT"])?;
            }
            Engine::RedisCluster(cluster) => {
                for i in self.shards() {
                    cluster.server(i).query::<String>(&["CONFIG", "RESETSTAT"])?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Redis commands since `reset_engine_stats` (none counted for NATS).
    fn engine_calls(&self) -> anyhow::Result<Option<u64>> {
        match &self.engine {
            Engine::Redis { redis, .. } => Ok(Some(redis.total_calls()?)),
            Engine::RedisCluster(_) => Ok(Some(self.shard_usage()?.iter().map(|(_, calls)| calls).sum())),
            _ => Ok(None),
        }
    }
}

/// The environment of nodes on the Redis engine at `url`; with `replicated`, durable publishing (only
/// when asked, so that binaries without the setting can be compared with `--herald`).
fn redis_env(url: &str, replicated: bool) -> Vec<(&'static str, String)> {
    let mut env = vec![("HERALD_ENGINE", url.to_owned()), ("HERALD_REDIS__PREFIX", "bench".to_owned())];
    if replicated {
        env.push(("HERALD_REDIS__DURABILITY", "replicated".to_owned()));
    }
    env
}

/// Starts `size` nodes (at least two) with `env`, one after another.
async fn start_nodes(herald: &str, size: usize, env: &[(&'static str, String)]) -> anyhow::Result<Vec<Node>> {
    let env: Vec<(&str, &str)> = env.iter().map(|(key, value)| (*key, value.as_str())).collect();
    let mut nodes = Vec::new();
    for _ in 0..size.max(2) {
        nodes.push(Node::start(herald, &env).await?);
    }
    Ok(nodes)
}

/// Result of one fixed-rate run.
pub struct Run {
    pub published: u64,
    pub delivered: u64,
    pub achieved_rate: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    /// What the engine, then each node, used during the run.
    pub usage: Vec<Usage>,
    /// Single publishes only: the mean time of a publish request as the publisher saw it, and of each
    /// stage of the publishing nodes' handler (`herald_publish_stage_seconds`), in µs.
    pub stages_us: Option<Stages>,
    /// Redis commands during the run (`None` on NATS).
    pub redis_calls: Option<u64>,
    pub received_by_node: Vec<u64>,
    /// On a Redis Cluster, per shard primary: CPU seconds and commands during the run.
    pub shards: Vec<(f64, u64)>,
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
    let names: Vec<String> = (0..channels).map(|i| format!("user:{i}")).collect();
    let fleet = SseFleet::connect(cluster.nodes[0].addr, &names, channels * per_channel, true).await?;
    let before_received = received(cluster).await?;
    cluster.reset_engine_stats()?;
    let usage_before = cluster.usage()?;
    let stages_before = stage_sums(cluster).await?;
    let shards_before = cluster.shard_usage()?;
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
            let mut round_trips = Duration::ZERO;
            while k < requests {
                // Paced from the start of publishing (connecting many subscribers takes a while after the
                // fleet's clock started); send times are read on the fleet's clock, as its latencies are.
                let due = started + Duration::from_nanos(k * batch * 1_000_000_000 / rate);
                tokio::time::sleep_until(due.into()).await;
                let sent = clock.elapsed().as_nanos() as u64;
                let url = &targets[(k as usize) % targets.len()];
                let item = |m: u64| json!({"channel": names[(m as usize) % names.len()], "data": {"t": sent}});
                let body = if batch == 1 {
                    item(k)
                } else {
                    json!({"publications": (k * batch..(k + 1) * batch).map(item).collect::<Vec<_>>()})
                };
                let request = Instant::now();
                match http.post(url).json(&body).send().await {
                    Ok(response) if response.status().is_success() => {
                        // The answer's body is read too: the round trip ends with it.
                        if response.bytes().await.is_err() {
                            failures += 1;
                        }
                    }
                    _ => failures += 1,
                }
                round_trips += request.elapsed();
                k += publishers;
            }
            (failures, round_trips)
        }));
    }
    let (mut failures, mut round_trips) = (0, Duration::ZERO);
    for task in tasks {
        let (failed, spent) = task.await?;
        failures += failed;
        round_trips += spent;
    }
    let publish_seconds = started.elapsed().as_secs_f64();
    if failures > 0 {
        bail!("{failures} publications failed");
    }
    let stages_after = stage_sums(cluster).await?;
    fleet.wait_for(total * per_channel as u64, Duration::from_secs(30)).await?;
    let usage = cluster.usage()?.iter().zip(&usage_before).map(|(after, before)| after.since(before)).collect();
    let stages_us =
        if batch == 1 { Stages::between(&stages_before, &stages_after, round_trips, requests) } else { None };
    let redis_calls = cluster.engine_calls()?;
    // Commands were counted from the reset; CPU from the reading before the run.
    let shards = cluster
        .shard_usage()?
        .iter()
        .zip(&shards_before)
        .map(|((cpu, calls), (cpu_before, _))| (cpu - cpu_before, *calls))
        .collect();
    let after_received = received(cluster).await?;
    let histogram = fleet.latencies();
    let run = Run {
        published: total,
        delivered: fleet.delivered(),
        achieved_rate: total as f64 / publish_seconds,
        p50_us: histogram.value_at_quantile(0.5),
        p99_us: histogram.value_at_quantile(0.99),
        max_us: histogram.max(),
        usage,
        stages_us,
        redis_calls,
        received_by_node: after_received.iter().zip(&before_received).map(|(a, b)| a - b).collect(),
        shards,
    };
    fleet.close();
    Ok(run)
}

/// Where a single publish's time went, in mean µs per request: the publisher's whole round trip, and the
/// publishing node's handler stages (`request`: body read, parsed, validated; `engine`: the engine's
/// round trip; `answer`: the answer encoded). `outside_handler` is the rest of the round trip: the
/// network both ways, hyper parsing the request head and writing the answer, and waiting for a thread.
#[derive(Debug, Clone, Copy)]
pub struct Stages {
    pub round_trip: f64,
    pub request: f64,
    pub engine: f64,
    pub answer: f64,
}

impl Stages {
    fn between(before: &StageSums, after: &StageSums, round_trips: Duration, requests: u64) -> Option<Stages> {
        let count = after.count.checked_sub(before.count).filter(|c| *c > 0)? as f64;
        let mean = |i: usize| (after.seconds[i] - before.seconds[i]) * 1e6 / count;
        Some(Stages {
            round_trip: round_trips.as_secs_f64() * 1e6 / requests.max(1) as f64,
            request: mean(0),
            engine: mean(1),
            answer: mean(2),
        })
    }

    pub fn outside_handler(&self) -> f64 {
        self.round_trip - self.request - self.engine - self.answer
    }
}

/// `herald_publish_stage_seconds` summed over the publishing nodes (nodes 1..).
struct StageSums {
    count: u64,
    /// request, engine, answer
    seconds: [f64; 3],
}

async fn stage_sums(cluster: &Cluster) -> anyhow::Result<StageSums> {
    let http = publish_client();
    let mut sums = StageSums { count: 0, seconds: [0.0; 3] };
    for node in &cluster.nodes[1..] {
        let text = http.get(node.url("/metrics")).send().await?.text().await?;
        let value = |prefix: &str| {
            text.lines().find_map(|l| l.strip_prefix(prefix)).and_then(|v| v.trim().parse::<f64>().ok()).unwrap_or(0.0)
        };
        sums.count += value("herald_publish_stage_seconds_count{stage=\"engine\"} ") as u64;
        for (i, stage) in ["request", "engine", "answer"].iter().enumerate() {
            sums.seconds[i] += value(&format!("herald_publish_stage_seconds_sum{{stage=\"{stage}\"}} "));
        }
    }
    Ok(sums)
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
