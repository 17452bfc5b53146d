//! `herald-bench`: benchmarks of a Herald node, run against a `herald` process this tool starts (so it
//! can read the server's CPU time and resident memory from /proc) or against a running node.
//!
//! Subcommands: `fanout` (deliveries per second and CPU per delivery), `latency` (publish-to-socket
//! latency at a fixed rate), `cluster` (cross-node latency, CPU and Redis commands per publication),
//! `scenario` (the scaling story with faults, every update accounted for), `churn` (memory after a
//! connection storm and slow readers), `broadcast` (time per broadcast on Redis), `memory` (resident
//! memory per idle connection) and `connect` (connections opened per second, anonymous, with a token and
//! through the connect proxy). Every run is bounded in connections, publications and time, and targets
//! loopback only.

use std::time::{Duration, Instant};

use anyhow::bail;
use clap::{Parser, Subcommand};
use serde_json::{Value, json};

use herald_bench::clients::{SseFleet, Transport, publish_client};
use herald_bench::node::{Node, Usage};
use herald_bench::{cluster, connect, scenario};

#[derive(Parser)]
#[command(name = "herald-bench", about = "Benchmarks for Herald (loopback only)")]
struct Cli {
    /// The `herald` binary to start (use a release build); by default the one built next to this tool.
    #[arg(long, global = true)]
    herald: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Deliveries per second: `--channels` channels, `--subscribers` SSE connections spread over them.
    Fanout {
        #[arg(long, default_value_t = 10_000)]
        subscribers: usize,
        #[arg(long, default_value_t = 1)]
        channels: usize,
        /// Publications per channel.
        #[arg(long, default_value_t = 200)]
        publications: usize,
        /// Payload bytes per publication (approximate).
        #[arg(long, default_value_t = 64)]
        payload: usize,
        /// Publish requests in flight at once.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Client protocol of the subscribers.
        #[arg(long, value_enum, default_value_t = Transport::Sse)]
        transport: Transport,
    },
    /// Publish-to-socket latency at a fixed publication rate.
    Latency {
        #[arg(long, default_value_t = 10_000)]
        rate: u64,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Channels published to round-robin, one subscriber each.
        #[arg(long, default_value_t = 100)]
        channels: usize,
    },
    /// Cross-node latency, CPU per delivery and Redis commands per publication on a cluster of nodes
    /// on one engine.
    Cluster {
        /// `redis`, `redis-cluster` (a Redis Cluster of `--primaries` shards), `nats` (one JetStream
        /// server, stream R1) or `nats-r3` (three servers, stream R3).
        #[arg(long, default_value = "redis")]
        engine: String,
        /// Shards of `--engine redis-cluster`.
        #[arg(long, default_value_t = 3)]
        primaries: usize,
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value_t = 5000)]
        rate: u64,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 100)]
        channels: usize,
        /// Subscribers per channel (all on node 0).
        #[arg(long, default_value_t = 1)]
        subscribers: usize,
        /// Also raise the rate step by step to find the highest one held without loss.
        #[arg(long)]
        find_max: bool,
        /// `none`, or `replicated`: Redis gets a replica and every publish waits for it (`WAIT`).
        #[arg(long, default_value = "none")]
        durability: String,
        /// Publications per request (`{"publications":[…]}` above 1).
        #[arg(long, default_value_t = 1)]
        batch: usize,
    },
    /// The scaling story end to end: several nodes, browsers behind a balancer, callbacks to random
    /// nodes, optional faults; reports every update as delivered, recovered, reset-covered or lost.
    Scenario(scenario::ScenarioArgs),
    /// Resident memory before and after a connect/disconnect storm and slow readers (should return
    /// to where it was).
    Churn {
        /// Connect/disconnect cycles in the storm.
        #[arg(long, default_value_t = 20_000)]
        cycles: usize,
        /// Clients that stop reading while publications pile up for them.
        #[arg(long, default_value_t = 200)]
        slow_readers: usize,
        /// Seconds the node is left idle after each phase before its resident memory is read.
        #[arg(long, default_value_t = 20)]
        settle_secs: u64,
    },
    /// Time per `POST /v1/broadcast` to many channels on one node with the Redis engine (own redis-server).
    Broadcast {
        #[arg(long, default_value_t = 1000)]
        channels: usize,
        #[arg(long, default_value_t = 10)]
        rounds: usize,
    },
    /// How channels of realistic names spread over Redis Cluster's 16,384 slots and over shards that
    /// split the slots evenly (as `redis-cli --cluster create` does). No process is started.
    Slots {
        #[arg(long, default_value_t = 10_000)]
        channels: usize,
        /// Shard counts to report, comma-separated.
        #[arg(long, default_value = "3,6,12")]
        shards: String,
    },
    /// Connections opened per second (to `herald.connected`, then closed), by how clients
    /// authenticate: anonymous, a token, the connect proxy (a backend in this process).
    Connect {
        #[arg(long, default_value_t = 5000)]
        connections: usize,
        /// Connections being opened at once.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// The ways to run, one JSON line each.
        #[arg(long, value_enum, value_delimiter = ',', default_value = "none,token,proxy")]
        auth: Vec<connect::Auth>,
    },
    /// Resident memory per idle connection (SSE, or WebSocket with `--transport ws`).
    Memory {
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        #[arg(long, value_enum, default_value = "sse")]
        transport: Transport,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let herald = cli.herald.clone().unwrap_or_else(default_herald);
    let cli = Cli { herald: Some(herald.clone()), ..cli };
    match cli.command {
        Command::Fanout { subscribers, channels, publications, payload, concurrency, transport } => {
            fanout(&herald, subscribers, channels, publications, payload, concurrency, transport).await
        }
        Command::Latency { rate, seconds, channels } => latency(&herald, rate, seconds, channels).await,
        Command::Memory { connections, transport } => memory(&herald, connections, transport).await,
        Command::Connect { connections, concurrency, auth } => {
            for auth in auth {
                println!("{}", connect::run(&herald, auth, connections, concurrency).await?);
            }
            Ok(())
        }
        Command::Broadcast { channels, rounds } => broadcast(&herald, channels, rounds).await,
        Command::Slots { channels, shards } => slots(channels, &shards),
        Command::Churn { cycles, slow_readers, settle_secs } => {
            churn(&herald, cycles, slow_readers, Duration::from_secs(settle_secs)).await
        }
        Command::Scenario(args) => {
            let report = scenario::run(&herald, &args).await?;
            if !args.json {
                println!("{}", report.table());
            }
            println!("{}", serde_json::to_string(&report)?);
            if !report.acceptable() {
                eprintln!(
                    "herald-bench: {} updates lost silently; at most {} reconnects in one second (bound {:?})",
                    report.lost_silently, report.reconnects_per_sec_max, report.reconnects_per_sec_bound
                );
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Cluster {
            engine,
            primaries,
            nodes,
            rate,
            seconds,
            channels,
            subscribers,
            find_max,
            durability,
            batch,
        } => {
            let settings =
                ClusterSettings { engine, primaries, nodes, channels, subscribers, find_max, durability, batch };
            cluster_bench(&herald, rate, seconds, settings).await
        }
    }
}

/// `herald` in the same folder as this executable (both are built into the same target directory).
fn default_herald() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("herald")))
        .filter(|path| path.exists())
        .map_or_else(|| "target/release/herald".to_owned(), |path| path.display().to_string())
}

fn channel_names(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("bench:{i}")).collect()
}

async fn fanout(
    herald: &str,
    subscribers: usize,
    channels: usize,
    publications: usize,
    payload: usize,
    concurrency: usize,
    transport: Transport,
) -> anyhow::Result<()> {
    if channels == 0 || subscribers < channels {
        bail!("need at least one subscriber per channel");
    }
    // Queues deep enough for every publication in flight: the benchmark measures throughput, not drops.
    let queue = (publications + 64).max(1024).to_string();
    let node = Node::start(herald, &[("HERALD_LIMITS__QUEUE_CAPACITY", queue.as_str())]).await?;
    let names = channel_names(channels);
    let fleet = SseFleet::connect_with(node.addr, &names, subscribers, false, transport).await?;
    let expected = (subscribers * publications) as u64;
    let pad = "x".repeat(payload);
    // Every request publishes one round to up to 1,000 channels, so the HTTP API is not what is measured.
    let mut requests = Vec::new();
    for round in 0..publications {
        for batch in names.chunks(1000) {
            requests.push(json!({"channels": batch, "data": {"n": round, "pad": pad}}).to_string());
        }
    }
    let requests = std::sync::Arc::new(std::sync::Mutex::new(requests.into_iter()));
    let cpu_before = node.cpu_seconds()?;
    let started = Instant::now();
    let mut publishers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (requests, http, url) = (requests.clone(), publish_client(), node.url("/v1/broadcast"));
        publishers.push(tokio::spawn(async move {
            loop {
                let next = requests.lock().ok().and_then(|mut r| r.next());
                let Some(body) = next else { return Ok(()) };
                let response = http.post(&url).header("content-type", "application/json").body(body).send().await?;
                if !response.status().is_success() {
                    bail!("broadcast failed: {}", response.status());
                }
            }
        }));
    }
    for publisher in publishers {
        publisher.await??;
    }
    fleet.wait_for(expected, Duration::from_secs(120)).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = node.cpu_seconds()? - cpu_before;
    let delivered = fleet.delivered();
    println!(
        "{}",
        json!({
            "bench": "fanout", "transport": format!("{transport:?}").to_lowercase(), "subscribers": subscribers, "channels": channels, "publications_per_channel": publications,
            "payload_bytes": payload, "publish_concurrency": concurrency, "deliveries": delivered, "seconds": round3(elapsed),
            "deliveries_per_sec": (delivered as f64 / elapsed).round(),
            "server_cpu_seconds": round3(cpu), "server_cpu_us_per_delivery": round3(cpu * 1e6 / delivered as f64),
        })
    );
    fleet.close();
    Ok(())
}

async fn latency(herald: &str, rate: u64, seconds: u64, channels: usize) -> anyhow::Result<()> {
    let node = Node::start(herald, &[]).await?;
    let names = channel_names(channels);
    let fleet = SseFleet::connect(node.addr, &names, channels, true).await?;
    let total = rate * seconds;
    let publishers = 16u64;
    let clock = fleet.clock();
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let http = publish_client();
        let url = node.url("/v1/publish");
        let names = names.clone();
        tasks.push(tokio::spawn(async move {
            // Open loop: publication k is due at k / rate seconds, whatever the answers' latency.
            let mut k = p;
            while k < total {
                let due = clock + Duration::from_nanos(k * 1_000_000_000 / rate);
                tokio::time::sleep_until(due.into()).await;
                let sent = clock.elapsed().as_nanos() as u64;
                let channel = &names[(k as usize) % names.len()];
                let body = json!({"channel": channel, "data": {"t": sent}});
                if let Err(error) = http.post(&url).json(&body).send().await {
                    eprintln!("publish failed: {error}");
                }
                k += publishers;
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    fleet.wait_for(total, Duration::from_secs(30)).await?;
    let histogram = fleet.latencies();
    println!(
        "{}",
        json!({
            "bench": "latency", "rate": rate, "seconds": seconds, "channels": channels, "publications": total,
            "p50_us": histogram.value_at_quantile(0.50), "p99_us": histogram.value_at_quantile(0.99),
            "p999_us": histogram.value_at_quantile(0.999), "max_us": histogram.max(),
        })
    );
    fleet.close();
    Ok(())
}

async fn memory(herald: &str, connections: usize, transport: Transport) -> anyhow::Result<()> {
    let node = Node::start(herald, &[]).await?;
    // Warm up allocator and runtime with a few connections, then measure the growth for the rest.
    let names = channel_names(connections);
    let warm_count = 100.min(connections);
    let warm = SseFleet::connect_with(node.addr, &names[..warm_count], warm_count, false, transport).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = node.rss_bytes()?;
    let fleet = SseFleet::connect_with(node.addr, &names, connections, false, transport).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = node.rss_bytes()?;
    println!(
        "{}",
        json!({
            "bench": "memory", "transport": format!("{transport:?}").to_lowercase(), "connections": connections,
            "rss_before_bytes": before, "rss_after_bytes": after,
            "bytes_per_connection": (after.saturating_sub(before)) as f64 / connections as f64,
        })
    );
    fleet.close();
    warm.close();
    Ok(())
}

/// One storm round: `count` clients connect (each gets `herald.connected`) and all disconnect.
async fn storm(node: &Node, count: usize) -> anyhow::Result<()> {
    let names = channel_names(count.min(500));
    let fleet = SseFleet::connect(node.addr, &names, count, false).await?;
    fleet.close();
    Ok(())
}

/// Slow readers: `count` raw clients subscribe to one channel and never read while large publications
/// are published to it, until the node closes them as too slow.
async fn slow_readers(node: &Node, count: usize) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sockets = Vec::new();
    for _ in 0..count {
        let mut socket = tokio::net::TcpStream::connect(node.addr).await?;
        socket.write_all(b"GET /v1/sse?channel=slow HTTP/1.1\r\nHost: bench\r\n\r\n").await?;
        let mut head = [0u8; 256];
        let _ = socket.read(&mut head).await?;
        sockets.push(socket);
    }
    let http = publish_client();
    let pad = "x".repeat(4096);
    for i in 0..3000 {
        let body = json!({"channel": "slow", "data": {"i": i, "pad": pad}});
        http.post(node.url("/v1/publish")).json(&body).send().await?;
    }
    drop(sockets);
    Ok(())
}

async fn broadcast(herald: &str, channels: usize, rounds: usize) -> anyhow::Result<()> {
    let redis = herald_testkit::RedisServer::try_start(&[], false)?;
    let engine = redis.url();
    let node = Node::start(herald, &[("HERALD_ENGINE", engine.as_str())]).await?;
    let body = json!({"channels": channel_names(channels), "data": {"x": 1}}).to_string();
    let http = publish_client();
    let mut millis = Vec::new();
    for _ in 0..rounds.max(1) {
        let started = Instant::now();
        let response = http
            .post(node.url("/v1/broadcast"))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("broadcast failed: {}", response.status());
        }
        let answer: serde_json::Value = response.json().await?;
        let published = answer["results"].as_array().map_or(0, |r| r.iter().filter(|r| r["offset"].is_u64()).count());
        if published != channels {
            bail!("only {published} of {channels} channels published");
        }
        millis.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    millis.sort_by(f64::total_cmp);
    println!(
        "{}",
        json!({
            "bench": "broadcast", "engine": "redis", "channels": channels, "rounds": millis.len(),
            "median_ms": round3(millis[millis.len() / 2]), "min_ms": round3(millis[0]),
            "max_ms": round3(millis[millis.len() - 1]),
        })
    );
    Ok(())
}

/// Resident memory of `node` once a second while it is idle for `settle`; the last reading counts.
async fn settled(node: &Node, settle: Duration) -> anyhow::Result<Vec<u64>> {
    let mut samples = Vec::new();
    for _ in 0..settle.as_secs().max(1) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        samples.push(node.rss_bytes()?);
    }
    Ok(samples)
}

async fn churn(herald: &str, cycles: usize, readers: usize, settle: Duration) -> anyhow::Result<()> {
    let node = Node::start(herald, &[("HERALD_LIMITS__QUEUE_CAPACITY", "64")]).await?;
    let names = channel_names(1000);
    let steady = SseFleet::connect(node.addr, &names, 1000, false).await?;
    // One round of everything first, so the allocator and runtime reach their working size.
    storm(&node, 2000).await?;
    slow_readers(&node, readers.min(50)).await?;
    let before_series = settled(&node, settle).await?;
    let before = before_series.last().copied().unwrap_or_default();
    let before_breakdown = node.rss_breakdown()?;
    let mut done = 0;
    while done < cycles {
        let round = (cycles - done).min(2000);
        storm(&node, round).await?;
        done += round;
    }
    slow_readers(&node, readers).await?;
    let after_series = settled(&node, settle).await?;
    let after = after_series.last().copied().unwrap_or_default();
    let after_breakdown = node.rss_breakdown()?;
    let stats: serde_json::Value = publish_client().get(node.url("/v1/cluster")).send().await?.json().await?;
    println!(
        "{}",
        json!({
            "bench": "churn", "steady_connections": 1000, "cycles": cycles, "slow_readers": readers,
            "rss_before_bytes": before, "rss_after_bytes": after,
            "rss_change_percent": round3((after as f64 - before as f64) * 100.0 / before as f64),
            "rss_before": before_breakdown, "rss_after": after_breakdown,
            "rss_kib_each_second_before": before_series.iter().map(|b| b / 1024).collect::<Vec<_>>(),
            "rss_kib_each_second_after": after_series.iter().map(|b| b / 1024).collect::<Vec<_>>(),
            "slow_client_disconnects": stats["nodes"][0]["slow_consumer_disconnects"],
            "connections_after": stats["nodes"][0]["connections"],
        })
    );
    steady.close();
    Ok(())
}

/// The shape of a cluster benchmark.
struct ClusterSettings {
    engine: String,
    primaries: usize,
    nodes: usize,
    channels: usize,
    subscribers: usize,
    find_max: bool,
    durability: String,
    batch: usize,
}

async fn cluster_bench(herald: &str, rate: u64, seconds: u64, settings: ClusterSettings) -> anyhow::Result<()> {
    let ClusterSettings { engine, primaries, nodes, channels, subscribers, find_max, durability, batch } = settings;
    let replicated = match durability.as_str() {
        "none" => false,
        "replicated" => true,
        other => anyhow::bail!("--durability {other:?}: use none or replicated"),
    };
    let cluster = match engine.as_str() {
        "redis" => cluster::Cluster::start_with(herald, nodes, replicated).await?,
        "redis-cluster" => cluster::Cluster::start_redis_cluster(herald, nodes, primaries, replicated).await?,
        "nats" if !replicated => cluster::Cluster::start_nats(herald, nodes, 1).await?,
        "nats-r3" if !replicated => cluster::Cluster::start_nats(herald, nodes, 3).await?,
        "nats" | "nats-r3" => anyhow::bail!("--durability is a Redis setting; use --engine nats-r3 for replicas"),
        other => anyhow::bail!("--engine {other:?}: use redis, redis-cluster, nats or nats-r3"),
    };
    let report = |run: &cluster::Run, rate: u64, seconds: u64| {
        let per_delivery = |seconds: f64| round3(seconds * 1e6 / run.delivered.max(1) as f64);
        let cpu: Vec<f64> = run.usage.iter().map(Usage::cpu_s).collect();
        let total: f64 = cpu.iter().sum();
        let mut publishing = Usage::default();
        run.usage[2..].iter().for_each(|u| publishing.add(u));
        // Per publication: CPU in user space and in the kernel, and wake-ups (a thread put to sleep and
        // woken again), by process.
        let split = |u: &Usage| {
            let per = |x: f64| round3(x / run.published.max(1) as f64);
            json!({"user_us": per(u.user_s * 1e6), "system_us": per(u.system_s * 1e6), "wakeups": per(u.wakeups as f64)})
        };
        let stages = run.stages_us.map(|s| {
            json!({
                "round_trip": round3(s.round_trip), "outside_handler": round3(s.outside_handler()),
                "request": round3(s.request), "engine": round3(s.engine), "answer": round3(s.answer),
            })
        });
        json!({
            "bench": "cluster", "nodes": nodes, "rate": rate, "seconds": seconds, "channels": channels,
            "subscribers_per_channel": subscribers, "engine": engine, "durability": durability, "batch": batch,
            "published": run.published, "delivered": run.delivered, "achieved_rate": run.achieved_rate.round(),
            "p50_us": run.p50_us, "p99_us": run.p99_us, "max_us": run.max_us,
            "cpu_us_per_delivery_all_processes": per_delivery(total),
            "cpu_us_per_delivery_by_process": {
                "engine": per_delivery(cpu[0]),
                "subscriber_node": per_delivery(cpu[1]),
                "publishing_nodes": per_delivery(cpu[2..].iter().sum()),
            },
            "per_publication_by_process": {
                "engine": split(&run.usage[0]), "subscriber_node": split(&run.usage[1]),
                "publishing_nodes": split(&publishing),
            },
            "publish_stages_us": stages,
            "redis_commands_per_publication": run.redis_calls.map(|calls| round3(calls as f64 / run.published.max(1) as f64)),
            "backplane_messages_received_by_node": run.received_by_node,
            "shards": shard_report(run),
        })
    };
    let run = cluster::run(&cluster, rate, seconds, channels, subscribers, batch).await?;
    println!("{}", report(&run, rate, seconds));
    if find_max {
        let mut best = None;
        for step in [10_000u64, 15_000, 20_000, 25_000, 30_000, 40_000] {
            let run = match cluster::run(&cluster, step, 3, channels, subscribers, batch).await {
                Ok(run) => run,
                Err(error) => {
                    eprintln!("rate {step}: {error:#}");
                    break;
                }
            };
            println!("{}", report(&run, step, 3));
            let held = run.delivered == run.published && run.achieved_rate >= 0.95 * step as f64;
            if !held {
                break;
            }
            best = Some(step);
        }
        println!("{}", json!({"bench": "cluster_max_rate", "highest_rate_held_without_loss": best}));
    }
    Ok(())
}

/// Redis Cluster's slot of a key: CRC16 (XMODEM) of its hash tag, or of the whole key without one.
/// Herald's keys of a channel carry the channel name as their tag.
fn slot_of(channel: &str) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(channel.as_bytes()) % 16384
}

fn slots(channels: usize, shards: &str) -> anyhow::Result<()> {
    let shard_counts: Vec<usize> = shards
        .split(',')
        .map(|n| n.trim().parse())
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("--shards: {e}"))?;
    type Naming = fn(usize) -> String;
    let patterns: [(&str, Naming); 3] = [
        ("user:<id>", |i| format!("user:{i}")),
        ("org:<id>:feed", |i| format!("org:{i}:feed")),
        ("user:<uuid-like>", |i| format!("user:{:08x}-{:04x}", i.wrapping_mul(2_654_435_761) as u32, i % 65_536)),
    ];
    for (pattern, name) in patterns {
        let mut per_slot = vec![0u32; 16384];
        for i in 0..channels {
            per_slot[slot_of(&name(i)) as usize] += 1;
        }
        let used = per_slot.iter().filter(|n| **n > 0).count();
        let busiest = per_slot.iter().copied().max().unwrap_or(0);
        for &count in &shard_counts {
            let count = count.max(1);
            let mut per_shard = vec![0u64; count];
            for (slot, channels) in per_slot.iter().enumerate() {
                // The shard owning the slot when the slots are split into `count` even ranges.
                per_shard[(slot * count / 16384).min(count - 1)] += u64::from(*channels);
            }
            let mean = channels as f64 / count as f64;
            let worst = per_shard.iter().map(|n| (*n as f64 / mean - 1.0).abs()).fold(0.0, f64::max);
            println!(
                "{}",
                json!({
                    "bench": "slots", "pattern": pattern, "channels": channels, "shards": count,
                    "channels_per_shard": per_shard, "largest_deviation_from_mean": round3(worst),
                    "slots_used": used, "most_channels_in_one_slot": busiest,
                })
            );
        }
    }
    Ok(())
}

/// Per shard of a Redis Cluster: CPU per publication, commands, and its share of all commands against
/// an even share (1.0 = exactly the mean).
fn shard_report(run: &cluster::Run) -> Value {
    if run.shards.is_empty() {
        return Value::Null;
    }
    let total: u64 = run.shards.iter().map(|(_, calls)| calls).sum();
    let mean = total as f64 / run.shards.len() as f64;
    let shards: Vec<Value> = run
        .shards
        .iter()
        .map(|(cpu, calls)| {
            json!({
                "cpu_us_per_publication": round3(cpu * 1e6 / run.published.max(1) as f64),
                "commands": calls,
                "load_vs_mean": round3(*calls as f64 / mean.max(1.0)),
                // Its CPU over the publications that passed through it (by its share of commands).
                "cpu_us_per_own_publication": round3(
                    cpu * 1e6 / (run.published as f64 * *calls as f64 / total.max(1) as f64).max(1.0)
                ),
            })
        })
        .collect();
    let worst = run.shards.iter().map(|(_, calls)| (*calls as f64 / mean.max(1.0) - 1.0).abs()).fold(0.0, f64::max);
    json!({"per_shard": shards, "largest_deviation_from_mean": round3(worst)})
}

fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    #[test]
    fn slots_are_redis_clusters() {
        // Values from Redis's documentation of CLUSTER KEYSLOT.
        assert_eq!(super::slot_of("somekey"), 11058);
        assert_eq!(super::slot_of("hash_tag"), 2515);
    }
}
