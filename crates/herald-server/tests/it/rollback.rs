//! Redis losing acknowledged data: restarts from older snapshots, failovers to lagging replicas, and
//! durable publishing. In every case each publication answered 200 reaches the client in order or is
//! covered by a reset, and no (epoch, offset) is delivered twice with different contents.

use std::collections::HashMap;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Server, Sse, TIMEOUT, client};
use herald_testkit::{RedisServer, Sentinels};

async fn node_on(engine: String, tweak: impl FnOnce(&mut herald_server::Config) + Send) -> Server {
    Server::with(move |config| {
        config.engine = engine;
        config.redis.prefix = format!("t{:08x}", rand::random::<u32>());
        config.redis.probe_interval_ms = 100;
        config.redis.probe_timeout_ms = 1000;
        config.redis.node_ttl_secs = 3;
        tweak(config);
    })
    .await
}

async fn wait_ready(server: &Server) {
    let deadline = tokio::time::Instant::now() + TIMEOUT * 2;
    while server.get("/readyz").await.0 != StatusCode::OK {
        assert!(tokio::time::Instant::now() < deadline, "node never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a client received, checked against what publishers were told.
#[derive(Default)]
pub struct Ledger {
    /// (epoch, offset) -> data, for every message delivered.
    delivered: HashMap<(String, u64), Value>,
    /// In arrival order: ("message" | "reset", epoch, offset, reason).
    events: Vec<(String, String, u64, String)>,
}

impl Ledger {
    pub fn record(&mut self, event: &str, data: &Value) {
        let epoch = data["epoch"].as_str().unwrap_or_default().to_owned();
        let offset = data["offset"].as_u64().unwrap_or_default();
        match event {
            "message" => {
                let previous = self.delivered.insert((epoch.clone(), offset), data["data"].clone());
                assert!(
                    previous.as_ref().is_none_or(|p| *p == data["data"]),
                    "({epoch}, {offset}) delivered twice with different contents: {previous:?} then {data}"
                );
                self.events.push(("message".into(), epoch, offset, String::new()));
            }
            "herald.reset" => {
                let reason = data["reason"].as_str().unwrap_or_default().to_owned();
                self.events.push(("reset".into(), epoch, offset, reason));
            }
            other => panic!("unexpected event {other}: {data}"),
        }
    }

    /// Reads `sse` until the publication acknowledged as `last` arrives.
    pub async fn read_until(&mut self, sse: &mut Sse, last: &Value) {
        let want = (last["epoch"].as_str().unwrap_or_default().to_owned(), last["offset"].as_u64().unwrap_or(0));
        while !self.delivered.contains_key(&want) {
            let (event, data) = sse.next().await;
            self.record(&event, &data);
        }
    }

    pub fn resets(&self, reason: &str) -> usize {
        self.events.iter().filter(|(kind, _, _, r)| kind == "reset" && r == reason).count()
    }

    /// Every acknowledged publication was delivered with its data, or a reset came after the client's
    /// last delivery of that epoch and before anything newer.
    pub fn check(&self, acked: &[(Value, Value)]) {
        for (ack, data) in acked {
            let key = (ack["epoch"].as_str().unwrap_or_default().to_owned(), ack["offset"].as_u64().unwrap_or(0));
            match self.delivered.get(&key) {
                Some(got) => assert_eq!(got, data, "{ack} was delivered with other contents"),
                None => assert!(
                    self.events
                        .iter()
                        .any(|(kind, epoch, offset, _)| kind == "reset" && (*epoch != key.0 || *offset >= key.1)),
                    "acknowledged {ack} was lost silently: {:?}",
                    self.events
                ),
            }
        }
    }
}

async fn publish(node: &Server, channel: &str, data: Value, acked: &mut Vec<(Value, Value)>) -> Value {
    let answer = node.publish(channel, data.clone()).await;
    acked.push((answer.clone(), data));
    answer
}

/// Publishes 1 to 10, has Redis write a snapshot, publishes 11 to 15: a restart from it loses 11 to 15.
async fn publish_around_a_snapshot(node: &Server, redis: &RedisServer, channel: &str, acked: &mut Vec<(Value, Value)>) {
    for i in 1..=10 {
        publish(node, channel, json!(i), acked).await;
    }
    assert_eq!(redis.query::<String>(&["SAVE"]).expect("SAVE"), "OK");
    for i in 11..=15 {
        publish(node, channel, json!(i), acked).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_from_an_older_snapshot_fences_the_channel_and_resets_the_client_that_saw_lost_data() {
    let mut redis = RedisServer::start_persistent(&[]);
    let node = node_on(redis.url(), |_| {}).await;
    let (mut sse, _) = Sse::open(&node, "channel=user:1", None).await;
    let mut acked = Vec::new();
    publish_around_a_snapshot(&node, &redis, "user:1", &mut acked).await;
    let mut ledger = Ledger::default();
    ledger.read_until(&mut sse, &acked[14].0).await;
    let old_epoch = acked[0].0["epoch"].clone();

    redis.stop();
    redis.restart(); // from the snapshot: offsets 11..15 are gone
    wait_ready(&node).await;
    // The re-sync after the reconnect fences the channel and tells the client at once.
    let (event, reset) = sse.next().await;
    assert_eq!(event, "herald.reset", "{reset}");
    assert_eq!(reset["reason"], "engine_rollback");
    assert_ne!(reset["epoch"], old_epoch, "a new epoch, so no offset is handed out twice");
    ledger.record(&event, &reset);
    for i in 16..=20 {
        let answer = publish(&node, "user:1", json!(i), &mut acked).await;
        assert_ne!(answer["epoch"], old_epoch, "publications after a rollback never reuse the old positions");
    }
    ledger.read_until(&mut sse, &acked[19].0).await;
    ledger.check(&acked);
    assert_eq!(ledger.resets("engine_rollback"), 1);
    assert!(node.state.hub().engine().stats().rollbacks >= 1);
    let metrics = client().get(node.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
    assert!(metrics.contains("herald_resets_total{reason=\"engine_rollback\"} 1"), "{metrics}");
    assert!(!metrics.contains("herald_engine_rollbacks_total 0"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_returning_after_a_rollback_get_a_reset_even_when_the_channel_passed_their_offset() {
    let mut redis = RedisServer::start_persistent(&[]);
    let node = node_on(redis.url(), |_| {}).await;
    let (mut ahead, _) = Sse::open(&node, "channel=feed:7", None).await;
    let (mut behind, _) = Sse::open(&node, "channel=feed:7", None).await;
    let mut acked = Vec::new();
    publish_around_a_snapshot(&node, &redis, "feed:7", &mut acked).await;
    ahead.expect_offsets("feed:7", 0, 15).await;
    behind.expect_offsets("feed:7", 0, 8).await;
    let (ahead_cursor, behind_cursor) = (ahead.last_id.clone(), behind.last_id.clone());
    drop((ahead, behind));

    redis.stop();
    redis.restart();
    wait_ready(&node).await;
    // The channel passes the old offsets before the clients come back.
    for i in 16..=35 {
        publish(&node, "feed:7", json!(i), &mut acked).await;
    }
    let new_epoch = acked[34].0["epoch"].clone();
    assert_ne!(new_epoch, acked[0].0["epoch"]);
    assert_eq!(acked[34].0["offset"], 20);

    // At offset 15 the client saw publications the snapshot lost. At offset 8 it saw nothing lost, but
    // it never got 11..15, acknowledged and then lost: both are told, then get the whole new epoch.
    for cursor in [ahead_cursor, behind_cursor] {
        let (mut sse, _) = Sse::open(&node, "channel=feed:7", Some(&cursor)).await;
        let (event, reset) = sse.next().await;
        assert_eq!((event.as_str(), reset["reason"].as_str()), ("herald.reset", Some("engine_rollback")), "{reset}");
        assert_eq!((&reset["epoch"], &reset["offset"]), (&new_epoch, &json!(0)), "the new epoch from its start");
        let mut ledger = Ledger::default();
        ledger.record(&event, &reset);
        ledger.read_until(&mut sse, &acked[34].0).await;
        ledger.check(&acked[15..]);
        assert_eq!(ledger.delivered.len(), 20, "{:?}", ledger.events);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_restart_fences_even_one_that_kept_every_write() {
    // Herald cannot tell an append-only file that kept everything from an older one restored: a
    // restart always resets, and loses nothing.
    let mut redis = RedisServer::start_persistent(&["--appendonly", "yes", "--appendfsync", "always"]);
    let node = node_on(redis.url(), |_| {}).await;
    let (mut sse, _) = Sse::open(&node, "channel=jobs:3", None).await;
    let mut acked = Vec::new();
    for i in 1..=5 {
        publish(&node, "jobs:3", json!(i), &mut acked).await;
    }
    let mut ledger = Ledger::default();
    ledger.read_until(&mut sse, &acked[4].0).await;
    redis.stop();
    redis.restart();
    wait_ready(&node).await;
    for i in 6..=8 {
        publish(&node, "jobs:3", json!(i), &mut acked).await;
    }
    ledger.read_until(&mut sse, &acked[7].0).await;
    ledger.check(&acked);
    assert_eq!(ledger.resets("engine_rollback"), 1, "{:?}", ledger.events);
    assert_ne!(acked[7].0["epoch"], acked[0].0["epoch"]);
    assert_eq!(acked[7].0["offset"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_durable_publishes_a_failover_loses_nothing_acknowledged_and_resets_its_clients() {
    // Two replicas: after the failover the new primary still has one to acknowledge durable publishes.
    let primary = RedisServer::start_persistent(&[]);
    let replica_of = format!("127.0.0.1 {}", primary.port);
    let replica = RedisServer::start_persistent(&["--replicaof", &replica_of]);
    let second = RedisServer::start_persistent(&["--replicaof", &replica_of]);
    eventually_synced(&primary, &replica).await;
    eventually_synced(&primary, &second).await;
    let sentinels = Sentinels::start("herald", primary.port);
    let node = node_on(sentinels.url("herald"), |config| {
        config.redis.durability = "replicated".into();
        config.redis.replication_timeout_ms = 1500;
        config.redis.command_timeout_ms = 3000;
    })
    .await;
    let (mut live, _) = Sse::open(&node, "channel=doc:5", None).await;
    let (mut offline, _) = Sse::open(&node, "channel=doc:5", None).await;
    let mut acked = Vec::new();
    for i in 1..=6 {
        publish(&node, "doc:5", json!(i), &mut acked).await;
    }
    offline.expect_offsets("doc:5", 0, 3).await;
    let offline_cursor = offline.last_id.clone();
    drop(offline);
    let mut ledger = Ledger::default();
    ledger.read_until(&mut live, &acked[5].0).await;
    // Every acknowledged publication is on both replicas, so on the one promoted.
    eventually_synced(&primary, &replica).await;
    eventually_synced(&primary, &second).await;
    let old_stream = format!("{}:{{doc:5}}:s", node.state.config().redis.prefix);
    let mut primary = primary;
    primary.stop();
    for i in 7..=9 {
        publish_through_failover(&node, "doc:5", json!(i), &mut acked, false).await;
    }
    let promoted = [&replica, &second].into_iter().find(|r| r.replication("role").as_deref() == Some("master"));
    let promoted = promoted.expect("a replica was promoted");
    assert!(promoted.query::<i64>(&["XLEN", &old_stream]).ok() == Some(9), "6 old entries and 3 new ones");
    assert_ne!(acked[8].0["epoch"], acked[0].0["epoch"], "a new epoch: positions are never reused");
    ledger.read_until(&mut live, &acked[8].0).await;
    ledger.check(&acked);
    // A failover cannot prove what the promoted replica lacks, so the channel's clients reconcile.
    assert_eq!(ledger.resets("engine_rollback"), 1, "{:?}", ledger.events);
    let (mut sse, _) = Sse::open(&node, "channel=doc:5", Some(&offline_cursor)).await;
    let (event, reset) = sse.next().await;
    assert_eq!((event.as_str(), reset["reason"].as_str()), ("herald.reset", Some("engine_rollback")), "{reset}");
}

/// A primary, a replica and three sentinels; the replica is made to lag for real (stopped and cut off),
/// the primary killed, the replica promoted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_to_a_lagging_replica_resets_only_what_was_lost_and_never_answers_200_for_a_lost_write() {
    let primary = RedisServer::start_persistent(&[]);
    let replica_of = format!("127.0.0.1 {}", primary.port);
    let replica = RedisServer::start_persistent(&["--replicaof", &replica_of]);
    eventually_synced(&primary, &replica).await;
    let sentinels = Sentinels::start("herald", primary.port);
    let node = node_on(sentinels.url("herald"), |_| {}).await;
    let (mut sse, _) = Sse::open(&node, "channel=order:9", None).await;
    let mut acked = Vec::new();
    for i in 1..=5 {
        publish(&node, "order:9", json!(i), &mut acked).await;
    }
    eventually_synced(&primary, &replica).await;
    // Stopped and cut off (without the cut, what the primary sends next would wait in the stopped
    // replica's socket buffer and arrive after all).
    replica.signal("STOP").expect("kill -s STOP");
    assert!(primary.query::<i64>(&["CLIENT", "KILL", "TYPE", "replica"]).ok() == Some(1), "replica cut off");
    for i in 6..=8 {
        publish(&node, "order:9", json!(i), &mut acked).await; // acknowledged by the primary alone
    }
    let mut ledger = Ledger::default();
    ledger.read_until(&mut sse, &acked[7].0).await;
    let mut primary = primary;
    primary.stop();
    replica.signal("CONT").expect("kill -s CONT");

    // Until the sentinels promote the replica, publishes fail; none answers 200 for a write then lost.
    let refused = publish_through_failover(&node, "order:9", json!(9), &mut acked, true).await;
    assert!(refused > 0, "publishes fail while there is no primary");
    assert_eq!(replica.replication("role").as_deref(), Some("master"), "the replica was promoted");
    for data in 10..13 {
        publish(&node, "order:9", json!(data), &mut acked).await;
    }
    let last = acked.last().map(|(a, _)| a.clone()).unwrap_or_default();
    ledger.read_until(&mut sse, &last).await;
    ledger.check(&acked);
    assert_eq!(ledger.resets("engine_rollback"), 1, "offsets 6..8 were lost with the primary: {:?}", ledger.events);
    assert_ne!(last["epoch"], acked[0].0["epoch"]);
}

/// Publishes `data` until it is answered 200, for up to 30 s while a failover goes on; every other answer
/// must be a 503 (with `unready`, also with the node not ready). Returns how many were refused.
async fn publish_through_failover(
    node: &Server,
    channel: &str,
    data: Value,
    acked: &mut Vec<(Value, Value)>,
    unready: bool,
) -> u32 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut refused = 0;
    loop {
        let (status, body) = node.post("/v1/publish", json!({"channel": channel, "data": data})).await;
        if status == StatusCode::OK {
            acked.push((body, data));
            return refused;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        if unready {
            assert_eq!(node.get("/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE, "not ready without a primary");
        }
        refused += 1;
        assert!(tokio::time::Instant::now() < deadline, "no failover within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn eventually_synced(primary: &RedisServer, replica: &RedisServer) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let link = replica.replication("master_link_status");
        let (ours, theirs) = (replica.replication("slave_repl_offset"), primary.replication("master_repl_offset"));
        if link.as_deref() == Some("up") && ours.is_some() && ours == theirs {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "replica never caught up: {link:?} {ours:?} {theirs:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_publishes_answer_503_not_durable_while_the_replica_cannot_acknowledge() {
    let primary = RedisServer::start_persistent(&[]);
    let replica_of = format!("127.0.0.1 {}", primary.port);
    let replica = RedisServer::start_persistent(&["--replicaof", &replica_of]);
    eventually_synced(&primary, &replica).await;
    let node = node_on(primary.url(), |config| {
        config.redis.durability = "replicated".into();
        config.redis.min_replicas = 1;
        // Long enough that a replica that is merely slow to be scheduled on a busy machine still
        // acknowledges in time; a stopped one never does. A WAIT holds the connection meanwhile, so
        // commands get longer than it.
        config.redis.replication_timeout_ms = 1500;
        config.redis.command_timeout_ms = 3000;
    })
    .await;
    let (mut sse, _) = Sse::open(&node, "channel=pay:1", None).await;
    let mut acked = Vec::new();
    for i in 1..=3 {
        publish(&node, "pay:1", json!(i), &mut acked).await;
    }
    replica.signal("STOP").expect("kill -s STOP");
    let started = std::time::Instant::now();
    let (status, body) = node.post("/v1/publish", json!({"channel": "pay:1", "data": 4})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "not_durable");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(1400), "it waited for the replica: {waited:?}");
    assert!(waited < Duration::from_secs(5), "answered once the replication timeout passed: {waited:?}");
    replica.signal("CONT").expect("kill -s CONT");
    eventually_synced(&primary, &replica).await;
    let answer = node.publish("pay:1", json!(5)).await;
    acked.push((answer, json!(5)));
    let mut ledger = Ledger::default();
    ledger.read_until(&mut sse, &acked[3].0).await;
    ledger.check(&acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_loaded_into_a_running_redis_is_caught_by_positions_going_backwards() {
    backup_loaded_into_a_running_redis(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_loaded_right_after_a_pubsub_reconnect_is_caught_too() {
    backup_loaded_into_a_running_redis(true).await;
}

async fn backup_loaded_into_a_running_redis(reconnect_first: bool) {
    // `DEBUG RELOAD NOSAVE` loads the last snapshot into the running server: same process, same
    // connections, same replication ID. Only the positions tell.
    let redis = RedisServer::start_persistent(&["--enable-debug-command", "yes"]);
    let node = node_on(redis.url(), |_| {}).await;
    let (mut sse, _) = Sse::open(&node, "channel=user:5", None).await;
    let mut acked = Vec::new();
    publish_around_a_snapshot(&node, &redis, "user:5", &mut acked).await;
    let mut ledger = Ledger::default();
    ledger.read_until(&mut sse, &acked[14].0).await;
    if reconnect_first {
        // A new pub/sub connection has seen nothing of the channel yet.
        let reconnects = node.state.hub().engine().stats().reconnects;
        assert!(redis.query::<i64>(&["CLIENT", "KILL", "TYPE", "pubsub"]).is_ok());
        crate::harness::eventually("pub/sub reconnected", || node.state.hub().engine().stats().reconnects > reconnects)
            .await;
        wait_ready(&node).await;
    }
    assert_eq!(redis.query::<String>(&["DEBUG", "RELOAD", "NOSAVE"]).expect("DEBUG RELOAD"), "OK");
    // The first publication after it is given offset 11 again (nothing in Redis can tell): the
    // subscribed node sees the offset go back, fences the channel and resets its clients, which covers
    // that publication; later publications are in the new epoch.
    let reused = node.publish("user:5", json!(16)).await;
    assert_eq!((&reused["epoch"], &reused["offset"]), (&acked[0].0["epoch"], &json!(11)));
    let (event, reset) = sse.next().await;
    assert_eq!((event.as_str(), reset["reason"].as_str()), ("herald.reset", Some("engine_rollback")), "{reset}");
    ledger.record(&event, &reset);
    for i in 17..=20 {
        let answer = publish(&node, "user:5", json!(i), &mut acked).await;
        assert_eq!(answer["epoch"], reset["epoch"]);
    }
    ledger.read_until(&mut sse, &acked[18].0).await;
    ledger.check(&acked);
    assert_eq!(ledger.delivered.get(&(reused["epoch"].as_str().unwrap_or_default().to_owned(), 11)), Some(&json!(11)));
    assert!(node.state.hub().engine().stats().rollbacks >= 1);
}
