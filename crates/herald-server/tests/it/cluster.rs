//! The Redis engine with several nodes on a real `redis-server` of the test's own: cross-node delivery,
//! ordering, resume anywhere, idempotency, subscription release, Redis restart, pub/sub kill, node crash.

use std::time::Duration;

use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Server, Sse, TIMEOUT, client, eventually};
use crate::process::Node;
use herald_testkit::RedisServer;

fn prefix() -> String {
    format!("t{:08x}", rand::random::<u32>())
}

async fn node(redis: &RedisServer, prefix: &str) -> Server {
    let (url, prefix) = (redis.url(), prefix.to_owned());
    Server::with(move |config| {
        config.engine = url;
        config.redis.prefix = prefix;
        config.redis.probe_interval_ms = 100;
        config.redis.probe_timeout_ms = 1000;
        config.redis.node_ttl_secs = 3;
    })
    .await
}

pub async fn cluster(redis: &RedisServer, size: usize) -> Vec<Server> {
    let prefix = prefix();
    let mut nodes = Vec::new();
    for _ in 0..size {
        nodes.push(node(redis, &prefix).await);
    }
    nodes
}

async fn wait_ready(server: &Server) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if server.get("/readyz").await.0 == StatusCode::OK {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "node never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_on_one_node_reaches_clients_on_the_others() {
    let redis = RedisServer::start();
    let nodes = cluster(&redis, 3).await;
    let (mut on_a, _) = Sse::open(&nodes[0], "channel=user:42", None).await;
    let (mut on_c, _) = Sse::open(&nodes[2], "channel=user:42", None).await;
    let answer = nodes[1].publish("user:42", json!({"from": "b"})).await;
    assert_eq!(answer["offset"], 1);
    nodes[2].publish("user:42", json!({"from": "c"})).await;
    for sse in [&mut on_a, &mut on_c] {
        assert_eq!(sse.expect_offsets("user:42", 0, 2).await, vec![json!({"from": "b"}), json!({"from": "c"})]);
    }
    let (status, cluster) = nodes[0].get("/v1/cluster").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(cluster["nodes"].as_array().map(Vec::len), Some(3));
    let (_, presence) = nodes[1].get("/v1/presence?channel=user:42").await;
    assert_eq!(presence["connections"].as_array().map(Vec::len), Some(2), "presence is cluster-wide: {presence}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_publishers_on_several_nodes_keep_one_strict_order() {
    let redis = RedisServer::start();
    let nodes = cluster(&redis, 3).await;
    let mut subscribers = Vec::new();
    for node in &nodes {
        subscribers.push(Sse::open(node, "channel=order:1", None).await.0);
    }
    let per_node = 100;
    let publishers = nodes.iter().enumerate().map(|(n, node)| async move {
        for i in 0..per_node {
            node.publish("order:1", json!({"node": n, "i": i})).await;
        }
    });
    join_all(publishers).await;
    for sse in &mut subscribers {
        let data = sse.expect_offsets("order:1", 0, 3 * per_node).await;
        // Per publisher, its own publications keep their order too.
        for n in 0..3 {
            let mine: Vec<u64> = data.iter().filter(|d| d["node"] == n).filter_map(|d| d["i"].as_u64()).collect();
            assert_eq!(mine, (0..per_node).collect::<Vec<_>>());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_on_another_node_with_exactly_what_it_missed() {
    let redis = RedisServer::start();
    let nodes = cluster(&redis, 3).await;
    let (mut sse, _) = Sse::open(&nodes[0], "channel=user:7&channel=user:8", None).await;
    nodes[1].publish("user:7", json!(1)).await;
    sse.expect_offsets("user:7", 0, 1).await;
    let cursor = sse.last_id.clone();
    drop(sse);
    for i in 2..=5 {
        nodes[2].publish("user:7", json!(i)).await;
    }
    nodes[2].publish("user:8", json!("eight")).await;
    let (mut resumed, _) = Sse::open(&nodes[1], "channel=user:7&channel=user:8", Some(&cursor)).await;
    let mut got = Vec::new();
    for _ in 0..5 {
        let (_, envelope) = resumed.next().await;
        got.push((envelope["channel"].clone(), envelope["offset"].clone()));
    }
    let seven: Vec<_> = got.iter().filter(|(c, _)| c == "user:7").map(|(_, o)| o.clone()).collect();
    assert_eq!(seven, vec![json!(2), json!(3), json!(4), json!(5)]);
    assert!(got.contains(&(json!("user:8"), json!(1))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_are_shared_by_the_cluster() {
    let redis = RedisServer::start();
    let nodes = cluster(&redis, 2).await;
    let body = json!({"channel": "pay:9", "data": 1, "idempotency_key": "charge-77"});
    let (_, first) = nodes[0].post("/v1/publish", body.clone()).await;
    let (_, again) = nodes[1].post("/v1/publish", body).await;
    assert_eq!((first["duplicate"].as_bool(), again["duplicate"].as_bool()), (Some(false), Some(true)));
    assert_eq!((&first["epoch"], &first["offset"]), (&again["epoch"], &again["offset"]));
    assert_eq!(first["correlation_id"], again["correlation_id"]);
}

/// Single publishes that arrive while one is on its way to Redis go together in the next call
/// (group commit): fewer script calls than publications, and every publication gets its own next
/// offset, its own answer (duplicates included) and reaches its subscribers in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_share_script_calls_and_each_keeps_its_position() {
    let redis = RedisServer::start();
    let nodes = cluster(&redis, 2).await;
    let channels = ["g:0", "g:1", "g:2", "g:3"];
    let mut subscribers = Vec::new();
    for channel in channels {
        subscribers.push(Sse::open(&nodes[0], &format!("channel={channel}"), None).await.0);
    }
    let script_calls = || -> u64 {
        let stats: String = redis.query(&["INFO", "commandstats"]).unwrap_or_default();
        stats
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let before = script_calls();
    let count = 200;
    let http = client();
    let url = nodes[1].url("/v1/publish");
    // Every tenth publication carries an idempotency key that the next one repeats.
    let body = |i: usize| {
        let mut body = json!({"channel": channels[i % 4], "data": i});
        if i % 10 == 0 || i % 10 == 4 {
            body["idempotency_key"] = json!(format!("k-{}", i / 10));
            body["channel"] = json!("g:0");
        }
        body
    };
    let answers = join_all((0..count).map(|i| {
        let (http, url, body) = (http.clone(), url.clone(), body(i));
        async move {
            let response = http.post(url).json(&body).send().await.expect("publish");
            assert_eq!(response.status(), StatusCode::OK);
            response.json::<Value>().await.expect("answer")
        }
    }))
    .await;
    let calls = script_calls() - before;
    assert!(calls < count as u64, "{calls} script calls for {count} publications: none went together");
    // Per channel, the new publications hold exactly the offsets 1..=n, each once.
    let mut offsets: Vec<Vec<u64>> = vec![Vec::new(); channels.len()];
    for (i, answer) in answers.iter().enumerate() {
        let channel = answer["channel"].as_str().unwrap_or_default();
        let index = channels.iter().position(|c| *c == channel).expect("a channel of the test");
        if answer["duplicate"] == json!(false) {
            offsets[index].push(answer["offset"].as_u64().expect("offset"));
        } else {
            let key = format!("k-{}", i / 10);
            let first = answers
                .iter()
                .enumerate()
                .find(|(j, a)| *j != i && a["duplicate"] == json!(false) && body(*j)["idempotency_key"] == json!(key));
            let (_, first) = first.expect("the duplicate's first publication");
            assert_eq!((&answer["epoch"], &answer["offset"]), (&first["epoch"], &first["offset"]));
        }
    }
    let duplicates = answers.iter().filter(|a| a["duplicate"] == json!(true)).count();
    assert_eq!(duplicates, count / 10, "each repeated key is one duplicate");
    for (index, sse) in subscribers.iter_mut().enumerate() {
        let mut got = offsets[index].clone();
        got.sort_unstable();
        let n = got.len() as u64;
        assert_eq!(got, (1..=n).collect::<Vec<u64>>(), "{}: one offset each, none skipped", channels[index]);
        sse.expect_offsets(channels[index], 0, n).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_subscribes_in_redis_only_while_it_has_local_subscribers() {
    let redis = RedisServer::start();
    let prefix = prefix();
    let a = node(&redis, &prefix).await;
    let b = node(&redis, &prefix).await;
    let pubsub = format!("{prefix}:c:room:5");
    assert_eq!(redis.numsub(&pubsub), 0);
    let (first, _) = Sse::open(&a, "channel=room:5", None).await;
    assert_eq!(redis.numsub(&pubsub), 1, "live before herald.connected");
    let (second, _) = Sse::open(&a, "channel=room:5", None).await;
    assert_eq!(redis.numsub(&pubsub), 1, "one subscription per node, not per client");
    // Publishing from B reaches A only; B, with no subscriber, receives nothing.
    b.publish("room:5", json!(1)).await;
    drop(first);
    drop(second);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while redis.numsub(&pubsub) != 0 {
        assert!(tokio::time::Instant::now() < deadline, "subscription not released");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(b.state.hub().stats().delivered_sse, 0);
    // With nobody subscribed anywhere, the publishing node counts the publication as unheard.
    let before = b.state.hub().stats().no_subscriber;
    b.publish("room:5", json!(2)).await;
    assert_eq!(b.state.hub().stats().no_subscriber, before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_pubsub_connection_is_repaired_and_nothing_is_lost() {
    let redis = RedisServer::start();
    let nodes = cluster(&redis, 2).await;
    let (mut sse, _) = Sse::open(&nodes[0], "channel=feed:1", None).await;
    for i in 1..=5 {
        nodes[1].publish("feed:1", json!(i)).await;
    }
    sse.expect_offsets("feed:1", 0, 5).await;
    let killed: i64 = redis.query(&["CLIENT", "KILL", "TYPE", "pubsub"]).expect("CLIENT KILL answers a count");
    assert!(killed >= 1, "CLIENT KILL closed {killed} connections");
    // Published while node A's subscription is down or coming back: recovered from history.
    for i in 6..=15 {
        nodes[1].publish("feed:1", json!(i)).await;
    }
    let data = sse.expect_offsets("feed:1", 5, 10).await;
    assert_eq!(data, (6..=15).map(|i| json!(i)).collect::<Vec<_>>());
    eventually("reconnect counted", || nodes[0].state.hub().engine().stats().reconnects >= 1).await;
    wait_ready(&nodes[0]).await;
    nodes[1].publish("feed:1", json!(16)).await;
    sse.expect_offsets("feed:1", 15, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_loses_nothing_silently_and_publishes_fail_fast_meanwhile() {
    let mut redis = RedisServer::start();
    let nodes = cluster(&redis, 2).await;
    let (mut sse, _) = Sse::open(&nodes[0], "channel=jobs:1", None).await;
    let mut acked: Vec<Value> = Vec::new();
    for i in 0..10 {
        acked.push(nodes[1].publish("jobs:1", json!(i)).await);
    }
    redis.stop();
    for i in 10..13 {
        let started = std::time::Instant::now();
        let (status, body) = nodes[1].post("/v1/publish", json!({"channel": "jobs:1", "data": i})).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["error"]["code"], "engine_unavailable");
        assert!(started.elapsed() < Duration::from_secs(5), "503 must come quickly, took {:?}", started.elapsed());
    }
    let (status, _) = nodes[0].get("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "not ready while Redis is down");
    redis.restart();
    wait_ready(&nodes[0]).await;
    wait_ready(&nodes[1]).await;
    for i in 13..23 {
        acked.push(nodes[1].publish("jobs:1", json!(i)).await);
    }
    // Read until the last acknowledged publication arrives; check every acknowledged one is covered.
    let last = acked.last().cloned().unwrap_or_default();
    let mut delivered: Vec<(Value, Value)> = Vec::new();
    let mut resets: Vec<Value> = Vec::new();
    while !delivered.contains(&(last["epoch"].clone(), last["offset"].clone())) {
        let (event, data) = sse.next().await;
        match event.as_str() {
            "message" => delivered.push((data["epoch"].clone(), data["offset"].clone())),
            "herald.reset" => resets.push(data),
            other => panic!("unexpected event {other}"),
        }
    }
    for ack in &acked {
        let position = (ack["epoch"].clone(), ack["offset"].clone());
        let covered =
            resets.iter().any(|r| r["epoch"] != ack["epoch"] || r["offset"].as_u64() >= ack["offset"].as_u64());
        assert!(delivered.contains(&position) || covered, "acknowledged {ack} was lost silently; resets {resets:?}");
    }
    // Before the restart everything arrived; the new epoch starts after a reset.
    assert_eq!(delivered.iter().filter(|(e, _)| *e == acked[0]["epoch"]).count(), 10);
    assert!(!resets.is_empty(), "the lost history is announced with a reset");
}

// A crashed node leaving no presence behind: conformance::redis::a_dead_node_leaves_no_ghosts.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn await_delivery_gathers_receipts_from_every_node_with_subscribers() {
    let redis = RedisServer::start();
    let nodes = cluster(&redis, 3).await;
    let path = "/v1/publish?await=delivery&timeout_ms=2000";
    let (_, nobody) = nodes[1].post(path, json!({"channel": "user:1", "data": 0})).await;
    assert_eq!(nobody["delivery"], json!({"connections": 0, "nodes": [], "timed_out": false}));
    let (_a1, _) = Sse::open(&nodes[0], "channel=user:1", None).await;
    let (_a2, _) = Sse::open(&nodes[0], "channel=user:1", None).await;
    let (_c1, _) = Sse::open(&nodes[2], "channel=user:1", None).await;
    let (status, answer) = nodes[1].post(path, json!({"channel": "user:1", "data": 1})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let mut expected_nodes = vec![nodes[0].state.hub().node_id().to_owned(), nodes[2].state.hub().node_id().to_owned()];
    expected_nodes.sort();
    assert_eq!(answer["delivery"], json!({"connections": 3, "nodes": expected_nodes, "timed_out": false}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribed_idle_channel_keeps_its_epoch_past_its_history_age() {
    let redis = RedisServer::start();
    let (url, prefix) = (redis.url(), prefix());
    let server = Server::with(move |config| {
        config.engine = url;
        config.redis.prefix = prefix;
        config.namespaces.insert(
            "brief".into(),
            herald_server::config::NamespaceConfig { history_ttl_secs: Some(2), ..Default::default() },
        );
    })
    .await;
    let (mut sse, _) = Sse::open(&server, "channel=brief:1", None).await;
    server.publish("brief:1", json!(1)).await;
    sse.expect_offsets("brief:1", 0, 1).await;
    // Idle for three history ages: the history entry expires, the live subscriber's epoch must not.
    tokio::time::sleep(Duration::from_secs(5)).await;
    server.publish("brief:1", json!(2)).await;
    let (event, envelope) = sse.next().await;
    assert_eq!((event.as_str(), envelope["offset"].as_u64()), ("message", Some(2)), "{envelope}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_talk_to_redis_over_tls_with_rediss_urls() {
    let redis = RedisServer::start_tls();
    let prefix = prefix();
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let (url, prefix, ca) = (redis.url(), prefix.clone(), redis.tls_ca.clone());
        assert!(url.starts_with("rediss://"));
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
    let (mut sse, _) = Sse::open(&nodes[0], "channel=secure:1", None).await;
    nodes[1].publish("secure:1", json!("over tls")).await;
    assert_eq!(sse.expect_offsets("secure:1", 0, 1).await, vec![json!("over tls")]);
    wait_ready(&nodes[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_reaches_the_users_connections_on_every_node() {
    let redis = RedisServer::start();
    let prefix = prefix();
    let secret = "0123456789abcdef0123456789abcdef-cluster";
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let (url, prefix) = (redis.url(), prefix.clone());
        nodes.push(
            Server::with(move |config| {
                config.engine = url;
                config.redis.prefix = prefix;
                config.jwt_hs256_secret = Some(secret.to_owned());
            })
            .await,
        );
    }
    let token = |sub: &str| {
        let claims = json!({"sub": sub, "exp": 4_000_000_000u64});
        let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).expect("token")
    };
    let alice = token("alice");
    let (mut on_a, _) = Sse::open(&nodes[0], &format!("channel=user:alice&token={alice}"), None).await;
    let (mut on_b, _) = Sse::open(&nodes[1], &format!("channel=user:alice&token={alice}"), None).await;
    let (mut bob, _) = Sse::open(&nodes[2], &format!("channel=user:bob&token={}", token("bob")), None).await;
    let (status, answer) = nodes[2].post("/v1/disconnect", json!({"user": "alice"})).await;
    assert_eq!((status, answer), (StatusCode::OK, json!({"disconnected": 2})));
    on_a.until_closed().await;
    on_b.until_closed().await;
    nodes[0].publish("user:bob", json!("still here")).await;
    assert_eq!(bob.expect_offsets("user:bob", 0, 1).await, vec![json!("still here")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traceparent_follows_the_update_into_both_nodes_logs_and_the_envelope() {
    let redis = RedisServer::start();
    let prefix = prefix();
    let dir = std::env::temp_dir().join(format!("herald-logs-{}-{}", std::process::id(), rand::random::<u32>()));
    std::fs::create_dir_all(&dir).expect("log dir");
    let env = [
        ("HERALD_ENGINE", redis.url()),
        ("HERALD_REDIS__PREFIX", prefix.clone()),
        ("HERALD_LOG_FORMAT", "json".to_owned()),
        ("HERALD_LOG", "herald_server=debug,herald_core=trace,herald_redis=debug".to_owned()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (log_a, log_b) = (dir.join("a.log"), dir.join("b.log"));
    let mut node_a = Node::spawn_logging(&env, &log_a);
    let mut node_b = Node::spawn_logging(&env, &log_b);
    let url = format!("http://{}/v1/sse?channel=user:5", node_a.addr);
    let mut sse = Sse::connect_url(&url, None).await.expect("SSE");
    assert_eq!(sse.next().await.0, "herald.connected");
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let answer = client()
        .post(format!("http://{}/v1/publish", node_b.addr))
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .json(&json!({"channel": "user:5", "data": 1}))
        .send()
        .await
        .expect("publish");
    assert_eq!(answer.status(), StatusCode::OK);
    let (_, envelope) = sse.next().await;
    assert_eq!(envelope["correlation_id"], trace_id);
    // Stop both so their logs are complete, then look for the ID at publish (B) and delivery (A).
    for node in [&node_a, &node_b] {
        node.signal("TERM");
    }
    node_a.wait_exit(Duration::from_secs(10));
    node_b.wait_exit(Duration::from_secs(10));
    let has = |path: &std::path::Path, message: &str| {
        std::fs::read_to_string(path).unwrap_or_default().lines().any(|line| {
            let entry: Value = serde_json::from_str(line).unwrap_or(Value::Null);
            entry["fields"]["message"] == message && entry["fields"]["correlation_id"] == trace_id
        })
    };
    assert!(has(&log_b, "published"), "B's publish log lacks the trace ID");
    assert!(has(&log_a, "received from the backplane"), "A's hand-off log lacks the trace ID");
    assert!(has(&log_a, "delivered"), "A's delivery log lacks the trace ID");
    let _ = std::fs::remove_dir_all(dir);
}
