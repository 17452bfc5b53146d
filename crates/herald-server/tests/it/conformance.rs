//! The engine conformance suite: one set of tests every engine must pass, run against the memory, Redis,
//! Redis Cluster and NATS engines (each test with a `redis-server`, a Redis Cluster or a
//! `nats-server -js` of its own). Tests that need more than one node, or a node that dies, run on the
//! distributed engines only; the engine faults of a Redis Cluster (a shard failed over, a slot moved)
//! have tests of their own (`redis_cluster.rs`).
//!
//! Adding an engine: a variant of [`Backend`], its line in [`Under::configure`], and a module in the
//! `conformance!` calls at the end.

use std::time::Duration;

use futures_util::future::join_all;
use herald_server::config::{Config, NamespaceConfig, NamespaceMode};
use reqwest::StatusCode;
use serde_json::{Value, json};

use herald_testkit::{NatsServer, Proxy, RedisCluster, RedisServer};

use crate::harness::{Server, Sse, TIMEOUT, client};
use crate::process::Node;

pub enum Backend {
    Memory,
    Redis(RedisServer),
    RedisCluster(RedisCluster),
    Nats(NatsServer),
}

/// An engine under test and the nodes made on it.
pub struct Under {
    backend: Backend,
    prefix: String,
}

impl Under {
    pub fn memory() -> Under {
        Under { backend: Backend::Memory, prefix: String::new() }
    }

    pub fn redis() -> Under {
        // With a data folder (and no automatic snapshots), so a test can take one and restart from it.
        Under { backend: Backend::Redis(RedisServer::start_persistent(&[])), prefix: prefix() }
    }

    /// Three primaries without replicas.
    pub fn redis_cluster() -> Under {
        Under { backend: Backend::RedisCluster(RedisCluster::start(3, 0)), prefix: prefix() }
    }

    pub fn nats() -> Under {
        Under { backend: Backend::Nats(NatsServer::start()), prefix: prefix() }
    }

    /// Nodes that share state: one for the memory engine, two otherwise.
    fn size(&self) -> usize {
        if matches!(self.backend, Backend::Memory) { 1 } else { 2 }
    }

    fn configure(&self, config: &mut Config) {
        match &self.backend {
            Backend::Memory => {}
            Backend::Redis(_) | Backend::RedisCluster(_) => {
                config.engine = self.url().unwrap_or_default();
                config.redis.prefix = self.prefix.clone();
                config.redis.probe_interval_ms = 100;
                config.redis.probe_timeout_ms = 1000;
                config.redis.node_ttl_secs = 3;
            }
            Backend::Nats(nats) => {
                config.engine = nats.url();
                config.nats.prefix = self.prefix.clone();
                config.nats.probe_interval_ms = 100;
                config.nats.probe_timeout_ms = 1000;
                config.nats.node_ttl_secs = 3;
                // A presence or cluster answer takes several JetStream requests; on this 2-core machine
                // running the whole suite, one second for each is not always enough.
                config.nats.command_timeout_ms = 2000;
            }
        }
    }

    /// The engine's URL.
    fn url(&self) -> Option<String> {
        match &self.backend {
            Backend::Memory => None,
            Backend::Redis(redis) => Some(redis.url()),
            Backend::RedisCluster(cluster) => Some(cluster.url()),
            Backend::Nats(nats) => Some(nats.url()),
        }
    }

    /// The engine's URL and port, for engines reached over the network at one address.
    fn address(&self) -> Option<(String, u16)> {
        match &self.backend {
            Backend::Memory | Backend::RedisCluster(_) => None,
            Backend::Redis(redis) => Some((redis.url(), redis.port())),
            Backend::Nats(nats) => Some((nats.url(), nats.port())),
        }
    }

    /// Environment for a node run as a process.
    fn env(&self) -> Vec<(String, String)> {
        let (url, section) = match &self.backend {
            Backend::Memory => return Vec::new(),
            Backend::Redis(redis) => (redis.url(), "REDIS"),
            Backend::RedisCluster(cluster) => (cluster.url(), "REDIS"),
            Backend::Nats(nats) => (nats.url(), "NATS"),
        };
        vec![
            ("HERALD_ENGINE".into(), url),
            (format!("HERALD_{section}__PREFIX"), self.prefix.clone()),
            (format!("HERALD_{section}__NODE_TTL_SECS"), "3".into()),
            (format!("HERALD_{section}__PROBE_INTERVAL_MS"), "100".into()),
            (format!("HERALD_{section}__COMMAND_TIMEOUT_MS"), "2000".into()),
        ]
    }

    async fn node(&self, tweak: impl FnOnce(&mut Config)) -> Server {
        Server::with(|config| {
            self.configure(config);
            tweak(config);
        })
        .await
    }

    async fn nodes(&self, tweak: impl Fn(&mut Config)) -> Vec<Server> {
        let mut nodes = Vec::new();
        for _ in 0..self.size() {
            nodes.push(self.node(&tweak).await);
        }
        nodes
    }
}

fn prefix() -> String {
    format!("t{:08x}", rand::random::<u32>())
}

fn namespace(name: &str, size: Option<usize>, ttl_secs: Option<u64>) -> impl Fn(&mut Config) {
    let name = name.to_owned();
    move |config: &mut Config| {
        let settings = NamespaceConfig { history_size: size, history_ttl_secs: ttl_secs, ..Default::default() };
        config.namespaces.insert(name.clone(), settings);
    }
}

async fn history(server: &Server, query: &str) -> Value {
    let (status, answer) = server.get(&format!("/v1/history?{query}")).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer
}

fn offsets(history: &Value) -> Vec<u64> {
    let publications = history["publications"].as_array().cloned().unwrap_or_default();
    publications.iter().filter_map(|p| p["offset"].as_u64()).collect()
}

/// Publishers on every node at once: one order, offsets without holes, each publisher's order kept,
/// and history holds exactly what subscribers got.
async fn order_and_offsets_without_holes(under: Under) {
    let nodes = under.nodes(|_| {}).await;
    let mut subscribers = Vec::new();
    for node in &nodes {
        subscribers.push(Sse::open(node, "channel=order:1", None).await.0);
    }
    let (publishers, per) = (4, 40u64);
    join_all((0..publishers).map(|p| {
        let node = &nodes[p % nodes.len()];
        async move {
            for i in 0..per {
                node.publish("order:1", json!({"p": p, "i": i})).await;
            }
        }
    }))
    .await;
    let total = per * publishers as u64;
    for sse in &mut subscribers {
        let data = sse.expect_offsets("order:1", 0, total).await;
        for p in 0..publishers {
            let mine: Vec<u64> = data.iter().filter(|d| d["p"] == p).filter_map(|d| d["i"].as_u64()).collect();
            assert_eq!(mine, (0..per).collect::<Vec<_>>(), "publisher {p} kept its order");
        }
    }
    let stored = history(&nodes[nodes.len() - 1], "channel=order:1&limit=1000").await;
    assert_eq!(offsets(&stored), (1..=total).collect::<Vec<_>>());
}

/// The same idempotency key through any node publishes once, and says where the first one went.
async fn idempotency_within_the_window(under: Under) {
    let nodes = under.nodes(|_| {}).await;
    let (mut sse, _) = Sse::open(&nodes[0], "channel=pay:9", None).await;
    let body = json!({"channel": "pay:9", "data": 1, "idempotency_key": "charge-77"});
    let (_, first) = nodes[0].post("/v1/publish", body.clone()).await;
    let (_, again) = nodes[nodes.len() - 1].post("/v1/publish", body).await;
    assert_eq!((first["duplicate"].as_bool(), again["duplicate"].as_bool()), (Some(false), Some(true)));
    assert_eq!(
        (&first["epoch"], &first["offset"], &first["correlation_id"]),
        (&again["epoch"], &again["offset"], &again["correlation_id"])
    );
    nodes[0].publish("pay:9", json!(2)).await;
    assert_eq!(sse.expect_offsets("pay:9", 0, 2).await, vec![json!(1), json!(2)], "the duplicate was not delivered");
}

/// A position that history trimmed away (by size) gets a reset, then the live stream.
async fn a_trimmed_position_gets_a_reset(under: Under) {
    let nodes = under.nodes(namespace("small", Some(3), None)).await;
    let (mut sse, _) = Sse::open(&nodes[0], "channel=small:1", None).await;
    nodes[0].publish("small:1", json!(1)).await;
    sse.expect_offsets("small:1", 0, 1).await;
    let cursor = sse.last_id.clone();
    drop(sse);
    for i in 2..=6 {
        nodes[nodes.len() - 1].publish("small:1", json!(i)).await;
    }
    assert_eq!(offsets(&history(&nodes[0], "channel=small:1").await), vec![4, 5, 6]);
    let (mut resumed, _) = Sse::open(&nodes[nodes.len() - 1], "channel=small:1", Some(&cursor)).await;
    let (event, reset) = resumed.next().await;
    assert_eq!(
        (event.as_str(), reset["reason"].as_str(), reset["offset"].as_u64()),
        ("herald.reset", Some("history_gone"), Some(6)),
        "{reset}"
    );
    nodes[0].publish("small:1", json!(7)).await;
    assert_eq!(resumed.expect_offsets("small:1", 6, 1).await, vec![json!(7)]);
}

/// A position whose history expired (by age) gets a reset.
async fn an_expired_position_gets_a_reset(under: Under) {
    let nodes = under.nodes(namespace("brief", None, Some(1))).await;
    let (mut sse, _) = Sse::open(&nodes[0], "channel=brief:1", None).await;
    nodes[0].publish("brief:1", json!(1)).await;
    sse.expect_offsets("brief:1", 0, 1).await;
    let cursor = sse.last_id.clone();
    drop(sse);
    nodes[nodes.len() - 1].publish("brief:1", json!(2)).await;
    // The history age is the thing under test: wait it out.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (mut resumed, _) = Sse::open(&nodes[0], "channel=brief:1", Some(&cursor)).await;
    let (event, reset) = resumed.next().await;
    assert_eq!((event.as_str(), reset["reason"].as_str()), ("herald.reset", Some("history_gone")), "{reset}");
}

/// A latest-value namespace: a subscriber without a position, on another node than the publisher,
/// gets the channel's latest publication first, then live ones (SSE and WebSocket), and
/// `/v1/history?latest=1` answers it alone.
async fn a_latest_value_reaches_a_subscriber_on_another_node(under: Under) {
    let nodes = under
        .nodes(|config: &mut Config| {
            let latest = NamespaceConfig { mode: Some(NamespaceMode::Latest), ..Default::default() };
            config.namespaces.insert("price".into(), latest);
        })
        .await;
    let (publisher, subscriber) = (&nodes[0], &nodes[nodes.len() - 1]);
    let (mut empty, _) = Sse::open(subscriber, "channel=price:empty", None).await;
    publisher.publish("price:empty", json!("first")).await;
    assert_eq!(empty.expect_offsets("price:empty", 0, 1).await, vec![json!("first")], "nothing came before it");
    for value in 1..=3 {
        publisher.publish("price:eur", json!(value)).await;
    }
    let (mut sse, _) = Sse::open(subscriber, "channel=price:eur&channel=other:1", None).await;
    assert_eq!(sse.expect_offsets("price:eur", 2, 1).await, vec![json!(3)], "the latest value first");
    let after_latest = sse.last_id.clone();
    publisher.publish("price:eur", json!(4)).await;
    assert_eq!(sse.expect_offsets("price:eur", 3, 1).await, vec![json!(4)], "then live ones");
    // Another namespace keeps starting at the top.
    publisher.publish("other:2", json!("x")).await;
    let (mut plain, _) = Sse::open(subscriber, "channel=other:2", None).await;
    publisher.publish("other:2", json!("y")).await;
    assert_eq!(plain.expect_offsets("other:2", 1, 1).await, vec![json!("y")]);
    // A cursor resumes as in any namespace: what followed it, not the latest again.
    let (mut resumed, _) = Sse::open(subscriber, "channel=price:eur&channel=other:1", Some(&after_latest)).await;
    assert_eq!(resumed.expect_offsets("price:eur", 3, 1).await, vec![json!(4)]);

    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/v1/ws", subscriber.addr)).await.expect("WS");
    use futures_util::{SinkExt, StreamExt};
    let op = json!({"op": "subscribe", "id": 1, "channel": "price:eur"}).to_string();
    ws.send(tokio_tungstenite::tungstenite::Message::text(op)).await.expect("send");
    let mut frames = Vec::new();
    while frames.len() < 2 {
        let frame = tokio::time::timeout(TIMEOUT, ws.next()).await.expect("a frame").expect("open").expect("read");
        if let tokio_tungstenite::tungstenite::Message::Text(text) = frame {
            frames.push(serde_json::from_str::<Value>(text.as_str()).expect("JSON"));
        }
    }
    assert_eq!((frames[0]["type"].as_str(), frames[0]["offset"].as_u64()), (Some("message"), Some(4)), "{frames:?}");
    assert_eq!((frames[1]["type"].as_str(), frames[1]["offset"].as_u64()), (Some("subscribed"), Some(4)), "{frames:?}");

    let latest = history(subscriber, "channel=price:eur&latest=1").await;
    assert_eq!((offsets(&latest), latest["offset"].as_u64()), (vec![4], Some(4)), "{latest}");
    assert_eq!(offsets(&history(subscriber, "channel=price:none&latest=1").await), Vec::<u64>::new());
    for bad in ["latest=2", "latest=1&limit=5", "latest=1&since_epoch=abc&since_offset=1"] {
        let (status, answer) = subscriber.get(&format!("/v1/history?channel=price:eur&{bad}")).await;
        assert_eq!((status, answer["error"]["code"].as_str()), (StatusCode::BAD_REQUEST, Some("bad_request")), "{bad}");
    }
}

/// Presence is seen from every node and leaves with its connection.
async fn presence_follows_connections(under: Under) {
    let nodes = under.nodes(|_| {}).await;
    let (sse, connected) = Sse::open(&nodes[0], "channel=room:1", None).await;
    let other = &nodes[nodes.len() - 1];
    let (_, presence) = other.get("/v1/presence?channel=room:1").await;
    let connections = presence["connections"].as_array().cloned().unwrap_or_default();
    assert_eq!(connections.len(), 1, "{presence}");
    assert_eq!(connections[0]["connection_id"], connected["connection_id"]);
    drop(sse);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while other.get("/v1/presence?channel=room:1").await.1["connections"] != json!([]) {
        assert!(tokio::time::Instant::now() < deadline, "presence stayed after the connection closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `await=delivery` gathers receipts from every node with subscribers, and none from the others.
async fn receipts_from_every_node(under: Under) {
    let nodes = under.nodes(|_| {}).await;
    let path = "/v1/publish?await=delivery&timeout_ms=2000";
    let publisher = &nodes[nodes.len() - 1];
    let (_, nobody) = publisher.post(path, json!({"channel": "user:1", "data": 0})).await;
    assert_eq!(nobody["delivery"], json!({"connections": 0, "nodes": [], "timed_out": false}));
    let (_a1, _) = Sse::open(&nodes[0], "channel=user:1", None).await;
    let (_a2, _) = Sse::open(&nodes[0], "channel=user:1", None).await;
    let started = std::time::Instant::now();
    let (status, answer) = publisher.post(path, json!({"channel": "user:1", "data": 1})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let node = nodes[0].state.hub().node_id().to_owned();
    assert_eq!(answer["delivery"], json!({"connections": 2, "nodes": [node], "timed_out": false}));
    assert!(started.elapsed() < Duration::from_millis(1500), "receipts came back without waiting for the timeout");
}

/// A disconnect request reaches the user's connections on every node.
async fn disconnect_on_every_node(under: Under) {
    let secret = "0123456789abcdef0123456789abcdef-conformance";
    let nodes = under.nodes(|config| config.jwt_hs256_secret = Some(secret.to_owned())).await;
    let token = |sub: &str| {
        let claims = json!({"sub": sub, "exp": 4_000_000_000u64});
        let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes());
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).expect("token")
    };
    let alice = token("alice");
    let mut alices = Vec::new();
    for node in &nodes {
        alices.push(Sse::open(node, &format!("channel=user:alice&token={alice}"), None).await.0);
    }
    let (mut bob, _) = Sse::open(&nodes[0], &format!("channel=user:bob&token={}", token("bob")), None).await;
    let (status, answer) = nodes[nodes.len() - 1].post("/v1/disconnect", json!({"user": "alice"})).await;
    assert_eq!((status, answer), (StatusCode::OK, json!({"disconnected": nodes.len()})));
    for sse in &mut alices {
        sse.until_closed().await;
    }
    nodes[0].publish("user:bob", json!("still here")).await;
    assert_eq!(bob.expect_offsets("user:bob", 0, 1).await, vec![json!("still here")]);
}

/// A node killed without a goodbye leaves no presence and no node entry once its lease expires.
async fn a_dead_node_leaves_no_ghosts(under: Under) {
    let env = under.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut doomed = Node::spawn(&env);
    let survivor = under.node(|_| {}).await;
    let response = client().get(format!("http://{}/v1/sse?channel=room:9", doomed.addr)).send().await.expect("SSE");
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.bytes_stream();
    use futures_util::StreamExt;
    assert!(tokio::time::timeout(TIMEOUT, body.next()).await.expect("connected event").is_some());
    let (_, presence) = survivor.get("/v1/presence?channel=room:9").await;
    assert_eq!(presence["connections"].as_array().map(Vec::len), Some(1), "{presence}");
    let (_, cluster) = survivor.get("/v1/cluster").await;
    assert_eq!(cluster["nodes"].as_array().map(Vec::len), Some(2), "{cluster}");
    doomed.signal("KILL");
    doomed.wait_exit(Duration::from_secs(5));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (_, presence) = survivor.get("/v1/presence?channel=room:9").await;
        let (_, cluster) = survivor.get("/v1/cluster").await;
        if presence["connections"] == json!([]) && cluster["nodes"].as_array().map(Vec::len) == Some(1) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "ghosts after the node died: {presence} {cluster}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A live message lost between the engine and a node (it is stored; the node never receives it): the
/// node notices the hole when the next one arrives, or at its next re-sync, and repairs it from history.
/// The client gets everything in order, without a reset.
async fn a_lost_live_message_is_repaired_from_history(under: Under) {
    let nodes = under.nodes(|_| {}).await;
    let (subscriber, publisher) = (&nodes[0], &nodes[nodes.len() - 1]);
    let (mut sse, _) = Sse::open(subscriber, "channel=gap:1", None).await;
    publisher.publish("gap:1", json!(1)).await;
    sse.expect_offsets("gap:1", 0, 1).await;
    if !subscriber.state.hub().engine().lose_live_messages(true) {
        return;
    }
    publisher.publish("gap:1", json!(2)).await;
    publisher.publish("gap:1", json!(3)).await;
    subscriber.state.hub().engine().lose_live_messages(false);
    publisher.publish("gap:1", json!(4)).await;
    assert_eq!(sse.expect_offsets("gap:1", 1, 3).await, vec![json!(2), json!(3), json!(4)]);
}

/// The engine comes back from an older copy of its data (a Redis snapshot, a NATS backup) under a client
/// that saw more: the channel is fenced into a new epoch, the client gets a reset `engine_rollback` (never
/// silence, never a lost position handed out again), and publishing goes on in the new epoch.
async fn a_rolled_back_engine_fences_the_channel(mut under: Under) {
    if matches!(under.backend, Backend::Memory) {
        return;
    }
    let nodes = under.nodes(|_| {}).await;
    let publisher = &nodes[nodes.len() - 1];
    let (mut sse, _) = Sse::open(&nodes[0], "channel=back:1", None).await;
    for i in 1..=3 {
        publisher.publish("back:1", json!(i)).await;
    }
    sse.expect_offsets("back:1", 0, 3).await;
    let backup = match &mut under.backend {
        Backend::Memory | Backend::RedisCluster(_) => return,
        Backend::Redis(redis) => {
            assert_eq!(redis.query::<String>(&["SAVE"]).expect("SAVE"), "OK");
            None
        }
        Backend::Nats(nats) => {
            // The copy is taken with the server stopped; it comes back with every write kept.
            let copy = crate::jetstream::backup(nats);
            nats.restart();
            Some(copy)
        }
    };
    publisher.publish_eventually("back:1", json!(4)).await;
    let old_epoch = publisher.publish_eventually("back:1", json!(5)).await["epoch"].clone();
    assert_eq!(sse.expect_offsets("back:1", 3, 2).await, vec![json!(4), json!(5)]);
    match &mut under.backend {
        Backend::Memory | Backend::RedisCluster(_) => return,
        Backend::Redis(redis) => {
            redis.stop();
            redis.restart();
        }
        Backend::Nats(nats) => crate::jetstream::restore(nats, &backup.expect("a backup")),
    }
    let (event, reset) = sse.next().await;
    assert_eq!((event.as_str(), reset["reason"].as_str()), ("herald.reset", Some("engine_rollback")), "{reset}");
    assert_ne!(reset["epoch"], old_epoch, "a new epoch, so no lost position is handed out again");
    let answer = publisher.publish_eventually("back:1", json!(6)).await;
    assert_eq!(answer["epoch"], reset["epoch"]);
    let (event, envelope) = sse.next().await;
    assert_eq!((event.as_str(), &envelope["data"]), ("message", &json!(6)), "{envelope}");
}

/// A node's connections to the engine are cut and it cannot reconnect for a while (the engine keeps
/// running, the other node publishes): what was published meanwhile
/// reaches its client from history, in order and without a reset, and live delivery goes on.
async fn a_cut_engine_connection_is_resynced(under: Under) {
    let Some((url, port)) = under.address() else { return };
    let proxy = Proxy::start(port).expect("proxy");
    let proxied = url.replace(&format!(":{port}"), &format!(":{}", proxy.port()));
    let cut_off = under.node(|config| config.engine = proxied.clone()).await;
    let publisher = under.node(|_| {}).await;
    let (mut sse, _) = Sse::open(&cut_off, "channel=cut:1", None).await;
    for i in 1..=3 {
        publisher.publish("cut:1", json!(i)).await;
    }
    sse.expect_offsets("cut:1", 0, 3).await;
    assert!(proxy.cut() >= 1, "the node's engine connections go through the proxy");
    // Published while the node cannot reach the engine at all.
    for i in 4..=10 {
        publisher.publish("cut:1", json!(i)).await;
    }
    proxy.restore();
    assert_eq!(sse.expect_offsets("cut:1", 3, 7).await, (4..=10).map(|i| json!(i)).collect::<Vec<_>>());
    publisher.publish("cut:1", json!(11)).await;
    assert_eq!(sse.expect_offsets("cut:1", 10, 1).await, vec![json!(11)]);
}

/// The engine restarts with its data lost: connected clients and returning ones get a reset, never
/// silence, and publishing goes on.
async fn engine_data_lost_means_reset(mut under: Under) {
    let nodes = under.nodes(|_| {}).await;
    let (mut sse, _) = Sse::open(&nodes[0], "channel=lost:1", None).await;
    nodes[nodes.len() - 1].publish("lost:1", json!(1)).await;
    sse.expect_offsets("lost:1", 0, 1).await;
    match &mut under.backend {
        Backend::Memory | Backend::RedisCluster(_) => return,
        Backend::Redis(redis) => {
            redis.stop();
            redis.restart();
        }
        Backend::Nats(nats) => restart_empty(nats),
    }
    let publisher = &nodes[nodes.len() - 1];
    let answer = publisher.publish_eventually("lost:1", json!(2)).await;
    let mut resets = 0;
    loop {
        let (event, data) = sse.next().await;
        match event.as_str() {
            "herald.reset" => resets += 1,
            "message" if data["data"] == json!(2) => {
                assert_eq!(data["epoch"], answer["epoch"]);
                break;
            }
            "message" => panic!("only the new publication may follow: {data}"),
            _ => {}
        }
    }
    assert!(resets >= 1, "the lost history was announced with a reset");
}

/// The engine restarts keeping its data: clients continue where they were, without a reset.
async fn engine_restart_with_data_kept_continues(under: Under) {
    let Backend::Nats(_) = &under.backend else { return };
    let mut under = under;
    let nodes = under.nodes(|_| {}).await;
    let (mut sse, _) = Sse::open(&nodes[0], "channel=kept:1", None).await;
    nodes[nodes.len() - 1].publish("kept:1", json!(1)).await;
    sse.expect_offsets("kept:1", 0, 1).await;
    if let Backend::Nats(nats) = &mut under.backend {
        nats.stop();
        nats.restart();
    }
    nodes[nodes.len() - 1].publish_eventually("kept:1", json!(2)).await;
    let (event, data) = sse.next().await;
    assert_eq!((event.as_str(), data["offset"].as_u64(), &data["data"]), ("message", Some(2), &json!(2)), "{data}");
}

/// Starts `nats` again with its store emptied: everything it held is lost.
pub fn restart_empty(nats: &mut NatsServer) {
    nats.stop();
    let store = nats.store_dir();
    let _ = std::fs::remove_dir_all(&store);
    std::fs::create_dir_all(&store).expect("store dir");
    nats.restart();
}

macro_rules! conformance {
    ($engine:ident: $($test:ident),* $(,)?) => {
        mod $engine {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Under::$engine()).await;
                }
            )*
        }
    };
}

conformance!(memory: order_and_offsets_without_holes, a_latest_value_reaches_a_subscriber_on_another_node, idempotency_within_the_window, a_trimmed_position_gets_a_reset,
    an_expired_position_gets_a_reset, presence_follows_connections, receipts_from_every_node, disconnect_on_every_node,
    a_cut_engine_connection_is_resynced, a_lost_live_message_is_repaired_from_history);
conformance!(redis: order_and_offsets_without_holes, a_latest_value_reaches_a_subscriber_on_another_node, idempotency_within_the_window, a_trimmed_position_gets_a_reset,
    an_expired_position_gets_a_reset, presence_follows_connections, receipts_from_every_node, disconnect_on_every_node,
    a_dead_node_leaves_no_ghosts, a_cut_engine_connection_is_resynced, a_lost_live_message_is_repaired_from_history,
    a_rolled_back_engine_fences_the_channel, engine_data_lost_means_reset);
conformance!(redis_cluster: order_and_offsets_without_holes, a_latest_value_reaches_a_subscriber_on_another_node,
    idempotency_within_the_window,
    a_trimmed_position_gets_a_reset, an_expired_position_gets_a_reset, presence_follows_connections,
    receipts_from_every_node, disconnect_on_every_node, a_dead_node_leaves_no_ghosts,
    a_lost_live_message_is_repaired_from_history);
conformance!(nats: order_and_offsets_without_holes, a_latest_value_reaches_a_subscriber_on_another_node, idempotency_within_the_window, a_trimmed_position_gets_a_reset,
    an_expired_position_gets_a_reset, presence_follows_connections, receipts_from_every_node, disconnect_on_every_node,
    a_dead_node_leaves_no_ghosts, a_cut_engine_connection_is_resynced, a_lost_live_message_is_repaired_from_history,
    a_rolled_back_engine_fences_the_channel, engine_data_lost_means_reset, engine_restart_with_data_kept_continues);
