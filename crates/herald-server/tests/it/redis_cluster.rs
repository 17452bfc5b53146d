//! The Redis engine on a real Redis Cluster of the test's own (`redis-server --cluster-enabled yes`
//! processes joined by `redis-cli --cluster create`): sharded fan-out through the channel's shard only,
//! cross-node delivery and resume, a slot moved while its channel is busy, a shard's primary killed and
//! its replica promoted. The engine conformance suite runs on a cluster too (`conformance.rs`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Server, Sse};
use herald_testkit::RedisCluster;

fn prefix() -> String {
    format!("t{:08x}", rand::random::<u32>())
}

async fn node(cluster: &RedisCluster, prefix: &str, probe_interval_ms: u64) -> Server {
    let (url, prefix) = (cluster.url(), prefix.to_owned());
    Server::with(move |config| {
        config.engine = url;
        config.redis.prefix = prefix;
        config.redis.probe_interval_ms = probe_interval_ms;
        config.redis.probe_timeout_ms = (probe_interval_ms * 10).max(1000);
        config.redis.node_ttl_secs = 3;
        config.redis.command_timeout_ms = 2000;
    })
    .await
}

async fn nodes(cluster: &RedisCluster, size: usize, probe_interval_ms: u64) -> Vec<Server> {
    let prefix = prefix();
    let mut nodes = Vec::new();
    for _ in 0..size {
        nodes.push(node(cluster, &prefix, probe_interval_ms).await);
    }
    nodes
}

/// Calls of `command` on server `i` since its last `CONFIG RESETSTAT`.
fn calls(cluster: &RedisCluster, i: usize, command: &str) -> u64 {
    let info: String = cluster.server(i).query(&["INFO", "commandstats"]).unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// The channel's slot (its keys' hash tag is the channel name).
fn slot(cluster: &RedisCluster, channel: &str) -> u16 {
    cluster.slot_of(&format!("{{{channel}}}")).expect("CLUSTER KEYSLOT")
}

/// Reads `sse` until every position in `acked` (channel -> answers) was delivered or covered by a reset
/// of its channel; returns the resets per channel.
async fn expect_covered(sse: &mut Sse, acked: &HashMap<String, Vec<Value>>) -> HashMap<String, Vec<Value>> {
    let mut delivered: HashMap<String, Vec<(Value, Value)>> = HashMap::new();
    let mut resets: HashMap<String, Vec<Value>> = HashMap::new();
    let covered = |channel: &str,
                   ack: &Value,
                   delivered: &HashMap<String, Vec<(Value, Value)>>,
                   resets: &HashMap<String, Vec<Value>>| {
        let position = (ack["epoch"].clone(), ack["offset"].clone());
        delivered.get(channel).is_some_and(|d| d.contains(&position))
            || resets.get(channel).is_some_and(|r| {
                r.iter().any(|r| r["epoch"] != ack["epoch"] || r["offset"].as_u64() >= ack["offset"].as_u64())
            })
    };
    loop {
        let last_missing = acked.iter().any(|(channel, answers)| {
            answers.last().is_some_and(|last| {
                let position = (last["epoch"].clone(), last["offset"].clone());
                !delivered.get(channel).is_some_and(|d| d.contains(&position))
            })
        });
        if !last_missing {
            break;
        }
        let (event, data) = sse.next().await;
        let channel = data["channel"].as_str().unwrap_or_default().to_owned();
        match event.as_str() {
            "message" => delivered.entry(channel).or_default().push((data["epoch"].clone(), data["offset"].clone())),
            "herald.reset" => resets.entry(channel).or_default().push(data),
            other => panic!("unexpected event {other}: {data}"),
        }
    }
    for (channel, answers) in acked {
        for ack in answers {
            assert!(
                covered(channel, ack, &delivered, &resets),
                "acknowledged {ack} of {channel} was lost silently; resets {:?}",
                resets.get(channel)
            );
        }
    }
    resets
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_passes_only_through_its_shard_and_reaches_every_node() {
    let cluster = RedisCluster::start(3, 0);
    // Probes (which also travel through shards) rare enough not to blur the counts below.
    let nodes = nodes(&cluster, 3, 30_000).await;
    let channels: Vec<String> = (1..=12).map(|i| format!("user:{i}")).collect();
    let query: Vec<String> = channels.iter().map(|c| format!("channel={c}")).collect();
    let (mut on_a, _) = Sse::open(&nodes[0], &query.join("&"), None).await;
    let (mut on_c, _) = Sse::open(&nodes[2], &query.join("&"), None).await;
    let mut owners = HashMap::new();
    for channel in &channels {
        owners.insert(channel.clone(), cluster.owner_of(slot(&cluster, channel)).expect("owner"));
    }
    let shards: std::collections::HashSet<usize> = owners.values().copied().collect();
    assert_eq!(shards.len(), 3, "twelve user channels land on every shard: {owners:?}");

    let busy = &channels[0];
    for i in 0..3 {
        let _: String = cluster.server(i).query(&["CONFIG", "RESETSTAT"]).expect("CONFIG RESETSTAT");
    }
    for i in 1..=5 {
        nodes[1].publish(busy, json!(i)).await;
    }
    for sse in [&mut on_a, &mut on_c] {
        assert_eq!(sse.expect_offsets(busy, 0, 5).await, (1..=5).map(|i| json!(i)).collect::<Vec<_>>());
    }
    for i in 0..3 {
        let scripts = calls(&cluster, i, "evalsha") + calls(&cluster, i, "eval");
        let (spublish, publish) = (calls(&cluster, i, "spublish"), calls(&cluster, i, "publish"));
        if i == owners[busy] {
            assert!(
                scripts >= 5 && spublish >= 5,
                "the owner ran the publishes: {scripts} scripts, {spublish} spublish"
            );
        } else {
            assert_eq!((scripts, spublish), (0, 0), "server {i} does not own {busy}: nothing passed through it");
        }
        assert_eq!(publish, 0, "no classic PUBLISH, which a cluster broadcasts to every server");
    }

    // Every channel, wherever its shard: delivered in order on both nodes.
    for channel in &channels[1..] {
        nodes[1].publish(channel, json!("a")).await;
        nodes[2].publish(channel, json!("b")).await;
    }
    for sse in [&mut on_a, &mut on_c] {
        let mut seen: HashMap<String, Vec<u64>> = HashMap::new();
        for _ in 0..2 * (channels.len() - 1) {
            let (event, envelope) = sse.next().await;
            assert_eq!(event, "message", "{envelope}");
            let channel = envelope["channel"].as_str().unwrap_or_default().to_owned();
            seen.entry(channel).or_default().push(envelope["offset"].as_u64().unwrap_or(0));
        }
        for channel in &channels[1..] {
            assert_eq!(seen.get(channel), Some(&vec![1, 2]), "{channel} in order");
        }
    }
    let (_, presence) = nodes[1].get(&format!("/v1/presence?channel={busy}")).await;
    assert_eq!(presence["connections"].as_array().map(Vec::len), Some(2), "presence is cluster-wide: {presence}");
    let (status, view) = nodes[0].get("/v1/cluster").await;
    assert_eq!((status, view["nodes"].as_array().map(Vec::len)), (StatusCode::OK, Some(3)), "{view}");
}

/// Every server requires a password, given in the URL as for `redis://`: commands, the sharded
/// subscriptions and a slot's move all work with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_that_requires_a_password_is_used_with_it() {
    let cluster = RedisCluster::try_start_with(3, 0, Some("s3cret-pw")).expect("a cluster with a password");
    assert!(cluster.url().starts_with("redis+cluster://:s3cret-pw@"));
    let nodes = nodes(&cluster, 2, 100).await;
    let (mut sse, _) = Sse::open(&nodes[0], "channel=user:1", None).await;
    nodes[1].publish("user:1", json!("with a password")).await;
    assert_eq!(sse.expect_offsets("user:1", 0, 1).await, vec![json!("with a password")]);
    let the_slot = slot(&cluster, "user:1");
    let to = (cluster.owner_of(the_slot).expect("owner") + 1) % 3;
    let cluster = tokio::task::spawn_blocking(move || cluster.migrate_slot(the_slot, to).map(|_| cluster))
        .await
        .expect("moving")
        .expect("the slot moved");
    let answer = nodes[1].publish_eventually("user:1", json!("after the move")).await;
    let mut acked = HashMap::new();
    acked.insert("user:1".to_owned(), vec![answer]);
    expect_covered(&mut sse, &acked).await;
    drop(cluster);
}

/// A cluster that speaks only TLS (`rediss+cluster://`, trusting `redis.tls_ca_file`), to clients and
/// between its servers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_that_speaks_only_tls_is_used_over_tls() {
    let cluster = RedisCluster::try_start_tls(3, 0).expect("a TLS cluster (redis-server, redis-cli, openssl)");
    assert!(cluster.url().starts_with("rediss+cluster://"));
    let prefix = prefix();
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let (url, prefix, ca) = (cluster.url(), prefix.clone(), cluster.tls_ca());
        nodes.push(
            Server::with(move |config| {
                config.engine = url;
                config.redis.prefix = prefix;
                config.redis.tls_ca_file = ca;
                config.redis.probe_interval_ms = 100;
            })
            .await,
        );
    }
    let channels: Vec<String> = (1..=6).map(|i| format!("user:{i}")).collect();
    let query: Vec<String> = channels.iter().map(|c| format!("channel={c}")).collect();
    let (mut sse, _) = Sse::open(&nodes[0], &query.join("&"), None).await;
    for channel in &channels {
        nodes[1].publish(channel, json!("over tls")).await;
        assert_eq!(sse.expect_offsets(channel, 0, 1).await, vec![json!("over tls")]);
    }
}

/// A batch spanning every shard: one script call per slot (a script's keys must share one), each
/// channel's publications in the order given, one answer per publication in the request's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_across_every_shard_is_published_in_order() {
    let cluster = RedisCluster::start(3, 0);
    let nodes = nodes(&cluster, 2, 100).await;
    let channels: Vec<String> = (1..=12).map(|i| format!("user:{i}")).collect();
    let query: Vec<String> = channels.iter().map(|c| format!("channel={c}")).collect();
    let (mut sse, _) = Sse::open(&nodes[0], &query.join("&"), None).await;
    let publications: Vec<Value> =
        (0..3).flat_map(|round| channels.iter().map(move |c| json!({"channel": c, "data": round}))).collect();
    let (status, answer) = nodes[1].post("/v1/publish", json!({"publications": publications})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let results = answer["results"].as_array().cloned().unwrap_or_default();
    assert_eq!(results.len(), 36, "{answer}");
    for (i, result) in results.iter().enumerate() {
        assert_eq!(result["channel"], json!(channels[i % 12]), "{result}");
        assert_eq!(result["offset"], json!(i / 12 + 1), "the channel's publications in the order given: {result}");
    }
    let mut seen: HashMap<String, Vec<Value>> = HashMap::new();
    for _ in 0..36 {
        let (event, envelope) = sse.next().await;
        assert_eq!(event, "message", "{envelope}");
        seen.entry(envelope["channel"].as_str().unwrap_or_default().to_owned())
            .or_default()
            .push(envelope["data"].clone());
    }
    for channel in &channels {
        assert_eq!(seen.get(channel), Some(&vec![json!(0), json!(1), json!(2)]), "{channel}");
    }
}

/// `durability = "replicated"` on a cluster: a publish is answered 200 once its shard's replica holds it,
/// and 503 `not_durable` when that replica cannot acknowledge in time; other shards are not held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_publishing_waits_for_the_replica_of_the_channels_shard() {
    let cluster = RedisCluster::start(3, 1);
    let prefix = prefix();
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let (url, prefix) = (cluster.url(), prefix.clone());
        nodes.push(
            Server::with(move |config| {
                config.engine = url;
                config.redis.prefix = prefix;
                config.redis.probe_interval_ms = 100;
                config.redis.durability = "replicated".into();
                config.redis.min_replicas = 1;
                config.redis.replication_timeout_ms = 300;
                config.redis.command_timeout_ms = 2000;
            })
            .await,
        );
    }
    let (mut sse, _) = Sse::open(&nodes[0], "channel=user:1", None).await;
    let answer = nodes[1].publish("user:1", json!("kept twice")).await;
    assert_eq!(answer["offset"], 1, "{answer}");
    assert_eq!(sse.expect_offsets("user:1", 0, 1).await, vec![json!("kept twice")]);
    let (status, batch) = nodes[1]
        .post(
            "/v1/publish",
            json!({"publications": [{"channel": "user:1", "data": 2}, {"channel": "user:2", "data": 1}]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{batch}");
    assert!(batch["results"].as_array().is_some_and(|r| r.iter().all(|r| r["offset"].is_u64())), "{batch}");

    // The replica of user:1's shard stops acknowledging (stopped, and cut off from its primary).
    let primary = cluster.owner_of(slot(&cluster, "user:1")).expect("owner");
    let primary_port = cluster.server(primary).port.to_string();
    let replica = (0..cluster.servers.len())
        .find(|i| cluster.server(*i).replication("master_port").as_deref() == Some(primary_port.as_str()))
        .expect("the shard's replica");
    cluster.server(replica).signal("STOP").expect("SIGSTOP");
    let _: i64 = cluster.server(primary).query(&["CLIENT", "KILL", "TYPE", "replica"]).expect("CLIENT KILL");
    let (status, refused) = nodes[1].post("/v1/publish", json!({"channel": "user:1", "data": 3})).await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("not_durable")),
        "{refused}"
    );
    // A channel of another shard is not held up.
    let other =
        (3..=40).map(|i| format!("user:{i}")).find(|c| cluster.owner_of(slot(&cluster, c)).ok() != Some(primary));
    let other = other.expect("a channel on another shard");
    let (status, kept) = nodes[1].post("/v1/publish", json!({"channel": other, "data": "elsewhere"})).await;
    assert_eq!(status, StatusCode::OK, "{kept}");
    cluster.server(replica).signal("CONT").expect("SIGCONT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_on_another_node_with_exactly_what_it_missed() {
    let cluster = RedisCluster::start(3, 0);
    let nodes = nodes(&cluster, 2, 100).await;
    let (mut sse, _) = Sse::open(&nodes[0], "channel=user:7&channel=org:9:feed", None).await;
    nodes[1].publish("user:7", json!(1)).await;
    sse.expect_offsets("user:7", 0, 1).await;
    let cursor = sse.last_id.clone();
    drop(sse);
    for i in 2..=4 {
        nodes[0].publish("user:7", json!(i)).await;
    }
    nodes[0].publish("org:9:feed", json!("feed")).await;
    let (mut resumed, _) = Sse::open(&nodes[1], "channel=user:7&channel=org:9:feed", Some(&cursor)).await;
    let mut got = Vec::new();
    for _ in 0..4 {
        let (event, envelope) = resumed.next().await;
        assert_eq!(event, "message", "{envelope}");
        got.push((envelope["channel"].clone(), envelope["offset"].clone()));
    }
    let seven: Vec<_> = got.iter().filter(|(c, _)| c == "user:7").map(|(_, o)| o.clone()).collect();
    assert_eq!(seven, vec![json!(2), json!(3), json!(4)]);
    assert!(got.contains(&(json!("org:9:feed"), json!(1))));
}

/// A slot is moved to another primary while its channel is published to without pause: the node's
/// subscription follows the slot (the old owner drops it, the node subscribes at the new one and
/// re-syncs), and every acknowledged publication arrives or is covered by a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_moved_while_its_channel_is_busy_loses_nothing_silently() {
    let cluster = Arc::new(RedisCluster::start(3, 0));
    let nodes = nodes(&cluster, 2, 100).await;
    let busy = "user:42";
    let quiet = "user:43";
    let (mut sse, _) = Sse::open(&nodes[0], &format!("channel={busy}&channel={quiet}"), None).await;
    let the_slot = slot(&cluster, busy);
    let from = cluster.owner_of(the_slot).expect("owner");
    assert_ne!(slot(&cluster, quiet), the_slot);
    let to = (from + 1) % 3;

    let moving = Arc::new(AtomicBool::new(true));
    let mover = {
        let (cluster, moving) = (cluster.clone(), moving.clone());
        tokio::task::spawn_blocking(move || {
            std::thread::sleep(Duration::from_millis(300));
            let moved = cluster.migrate_slot(the_slot, to);
            moving.store(false, Ordering::SeqCst);
            moved
        })
    };
    let mut acked: HashMap<String, Vec<Value>> = HashMap::new();
    let mut i = 0u64;
    // Publish before, during and after the move.
    let mut after_move = 0;
    while after_move < 20 {
        i += 1;
        let (status, answer) = nodes[1].post("/v1/publish", json!({"channel": busy, "data": i})).await;
        match status {
            StatusCode::OK => acked.entry(busy.to_owned()).or_default().push(answer),
            StatusCode::SERVICE_UNAVAILABLE => {}
            other => panic!("publish answered {other}: {answer}"),
        }
        if !moving.load(Ordering::SeqCst) {
            after_move += 1;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    mover.await.expect("mover").expect("the slot moved");
    assert_eq!(cluster.owner_of(the_slot).expect("owner"), to, "the slot moved");
    acked.entry(quiet.to_owned()).or_default().push(nodes[1].publish(quiet, json!("quiet")).await);
    let resets = expect_covered(&mut sse, &acked).await;
    assert!(!resets.contains_key(quiet), "a channel whose slot stayed put gets no reset: {resets:?}");
    // Live delivery goes on through the new owner.
    let last = nodes[1].publish_eventually(busy, json!("after")).await;
    loop {
        let (event, data) = sse.next().await;
        if event == "message" && data["offset"] == last["offset"] && data["epoch"] == last["epoch"] {
            break;
        }
    }
}

/// A shard's primary is killed and its replica takes over: that shard's channels continue or are reset
/// (its new primary's history cannot vouch for what the old one acknowledged last), the other shards'
/// channels continue untouched, and every acknowledged publication arrives or is covered by a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_failover_resets_only_that_shards_channels() {
    let mut cluster = RedisCluster::start(3, 1);
    let nodes = nodes(&cluster, 2, 100).await;
    let channels: Vec<String> = (1..=12).map(|i| format!("user:{i}")).collect();
    let query: Vec<String> = channels.iter().map(|c| format!("channel={c}")).collect();
    let (mut sse, _) = Sse::open(&nodes[0], &query.join("&"), None).await;
    let mut acked: HashMap<String, Vec<Value>> = HashMap::new();
    for channel in &channels {
        acked.entry(channel.clone()).or_default().push(nodes[1].publish(channel, json!(1)).await);
    }
    let victim = cluster.owner_of(slot(&cluster, &channels[0])).expect("owner");
    let on_victim: Vec<&String> =
        channels.iter().filter(|c| cluster.owner_of(slot(&cluster, c)).ok() == Some(victim)).collect();
    cluster.kill(victim);
    let promoted = tokio::task::spawn_blocking(move || cluster.wait_settled().map(|_| cluster));
    let cluster = promoted.await.expect("waiting").expect("a replica took over");
    assert_ne!(cluster.owner_of(slot(&cluster, &channels[0])).expect("owner"), victim);
    for channel in &channels {
        acked.entry(channel.clone()).or_default().push(nodes[1].publish_eventually(channel, json!(2)).await);
    }
    let resets = expect_covered(&mut sse, &acked).await;
    for channel in resets.keys() {
        assert!(on_victim.contains(&channel), "{channel} is not on the failed shard but was reset: {resets:?}");
    }
}

/// A primary is added to the Redis Cluster and a busy channel's slot is moved onto it: the nodes find
/// the new server through the redirection, with no restart, and nothing is lost silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_added_to_the_cluster_takes_a_busy_slot() {
    let mut cluster = RedisCluster::start(3, 0);
    let nodes = nodes(&cluster, 2, 100).await;
    let channel = "org:7:feed";
    let (mut sse, _) = Sse::open(&nodes[0], &format!("channel={channel}"), None).await;
    let mut acked: HashMap<String, Vec<Value>> = HashMap::new();
    for i in 1..=5 {
        acked.entry(channel.to_owned()).or_default().push(nodes[1].publish(channel, json!(i)).await);
    }
    let added = cluster.add_primary().expect("a new primary");
    let the_slot = slot(&cluster, channel);
    let cluster = tokio::task::spawn_blocking(move || cluster.migrate_slot(the_slot, added).map(|_| cluster))
        .await
        .expect("moving")
        .expect("the slot moved to the new primary");
    assert_eq!(cluster.owner_of(the_slot).expect("owner"), added);
    for i in 6..=10 {
        acked.entry(channel.to_owned()).or_default().push(nodes[1].publish_eventually(channel, json!(i)).await);
    }
    expect_covered(&mut sse, &acked).await;
    let keys: i64 = cluster.server(added).query(&["DBSIZE"]).expect("DBSIZE");
    assert!(keys >= 2, "the channel's keys live on the new primary now ({keys} keys)");
}

/// A shard's primary hangs (SIGSTOP: its connections stay open, silent) and its replica takes over. The
/// node's subscription on that shard is silent, not closed: the probe, which goes through every shard,
/// finds it stale, and the node subscribes anew and re-syncs, so a publication made meanwhile arrives
/// without waiting for a later one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_shard_is_found_by_the_probe_and_nothing_waits_for_a_later_publication() {
    let mut cluster = RedisCluster::start(3, 1);
    let nodes = nodes(&cluster, 2, 100).await;
    let channel = "user:5";
    let (mut sse, _) = Sse::open(&nodes[0], &format!("channel={channel}"), None).await;
    nodes[1].publish(channel, json!(1)).await;
    sse.expect_offsets(channel, 0, 1).await;
    let victim = cluster.owner_of(slot(&cluster, channel)).expect("owner");
    cluster.pause(victim).expect("SIGSTOP");
    let cluster = tokio::task::spawn_blocking(move || cluster.wait_settled().map(|_| cluster))
        .await
        .expect("waiting")
        .expect("a replica took over");
    let answer = nodes[1].publish_eventually(channel, json!(2)).await;
    // No later publication: this one (or a reset covering it) must arrive on its own.
    let mut acked = HashMap::new();
    acked.insert(channel.to_owned(), vec![answer]);
    expect_covered(&mut sse, &acked).await;
    let mut cluster = cluster;
    cluster.resume(victim).expect("SIGCONT");
}
