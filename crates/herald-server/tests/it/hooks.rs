//! Lifecycle webhooks against a real backend: a small axum application each test starts on a free
//! loopback port, which records every request and answers with the statuses the test scripts. Every
//! signature is checked with an independent implementation (Python's `hmac`, in a subprocess).

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode as AxumStatus};
use axum::routing::post;
use herald_server::Config;
use herald_server::config::NamespaceConfig;
use herald_server::credentials::SubscribeRule;
use jsonwebtoken::{EncodingKey, Header};
use serde_json::{Value, json};

use crate::harness::{Server, Sse, client, eventually};

const JWT_SECRET: &str = "a-secret-of-at-least-32-bytes-for-hs256";
/// 32 random bytes, base64.
const HOOK_SECRET: &str = "whsec_q9Yb0Ns2JmCw7uMEq1v3qK9oWc3iKdGQm6b7HrZ3xdo=";

/// One request the backend received.
#[derive(Debug, Clone)]
struct Received {
    id: String,
    timestamp: String,
    signature: String,
    content_type: String,
    body: String,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|_| panic!("body is not JSON: {:?}", self.body))
    }

    /// `(type, channel, user)` of the event.
    fn event(&self) -> (String, String, Option<String>) {
        let event = self.json();
        let text = |key: &str| event[key].as_str().map(str::to_owned);
        (text("type").unwrap_or_default(), text("channel").unwrap_or_default(), text("user"))
    }
}

/// The test's backend: what it received, and the statuses of its next answers (then 200).
#[derive(Default)]
struct Backend {
    received: Mutex<Vec<Received>>,
    script: Mutex<VecDeque<u16>>,
    /// Events of this channel are always answered 503.
    down_for: Mutex<Option<String>>,
    /// Events of these channels get no answer until the gate opens (recorded as they arrive).
    gates: Mutex<std::collections::HashMap<String, Arc<tokio::sync::Semaphore>>>,
}

impl Backend {
    fn close_gate(&self, channel: &str) {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        self.gates.lock().expect("lock").insert(channel.to_owned(), gate);
    }

    fn open_gate(&self, channel: &str) {
        if let Some(gate) = self.gates.lock().expect("lock").remove(channel) {
            gate.add_permits(1_000);
        }
    }
}

impl Backend {
    fn count(&self) -> usize {
        self.received.lock().map(|r| r.len()).unwrap_or(0)
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().expect("lock").clone()
    }
}

async fn hook(State(backend): State<Arc<Backend>>, headers: HeaderMap, body: String) -> AxumStatus {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    backend.received.lock().expect("lock").push(Received {
        id: header("webhook-id"),
        timestamp: header("webhook-timestamp"),
        signature: header("webhook-signature"),
        content_type: header("content-type"),
        body,
    });
    let down_for = backend.down_for.lock().expect("lock").clone();
    let received = backend.received.lock().expect("lock").last().map(Received::event);
    let channel = received.as_ref().map(|(_, channel, _)| channel.clone()).unwrap_or_default();
    let gate = backend.gates.lock().expect("lock").get(&channel).cloned();
    if let Some(gate) = gate {
        let _ = gate.acquire().await;
    }
    if down_for.is_some() && received.map(|(_, channel, _)| channel) == down_for {
        return AxumStatus::SERVICE_UNAVAILABLE;
    }
    let status = backend.script.lock().expect("lock").pop_front().unwrap_or(200);
    AxumStatus::from_u16(status).expect("status")
}

async fn start_backend(script: &[u16]) -> (Arc<Backend>, SocketAddr) {
    let backend = Arc::new(Backend::default());
    backend.script.lock().expect("lock").extend(script);
    let app = axum::Router::new().route("/hooks", post(hook)).with_state(backend.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
    let addr = listener.local_addr().expect("backend address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (backend, addr)
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn token(sub: &str) -> String {
    let claims = json!({"sub": sub, "exp": now() + 600});
    jsonwebtoken::encode(&Header::default(), &claims, &EncodingKey::from_secret(JWT_SECRET.as_bytes())).expect("token")
}

/// How many of `received` do NOT carry a valid Standard Webhooks signature, by Python's `hmac`.
fn invalid_signatures(received: &[Received]) -> usize {
    invalid_signatures_for(received, HOOK_SECRET)
}

/// How many of `received` carry no signature valid with `secret`, by Python's `hmac`.
fn invalid_signatures_for(received: &[Received], secret: &str) -> usize {
    use std::io::Write;
    const VERIFY: &str = r#"
import base64, hashlib, hmac, json, sys
key = base64.b64decode(sys.argv[1][len("whsec_"):])
bad = 0
for r in json.load(sys.stdin):
    signed = (r["id"] + "." + r["timestamp"] + ".").encode() + r["body"].encode()
    expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    if not any(hmac.compare_digest(expected, s) for s in r["signature"].split(" ")):
        bad += 1
print(bad)
"#;
    let input: Vec<Value> = received
        .iter()
        .map(|r| json!({"id": r.id, "timestamp": r.timestamp, "signature": r.signature, "body": r.body}))
        .collect();
    let mut child = std::process::Command::new("python3")
        .args(["-c", VERIFY, secret])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs (it verifies the signatures independently)");
    child.stdin.take().expect("stdin").write_all(Value::Array(input).to_string().as_bytes()).expect("write");
    let output = child.wait_with_output().expect("python3 output");
    assert!(output.status.success(), "python3 failed");
    String::from_utf8_lossy(&output.stdout).trim().parse().expect("a count")
}

fn hooked(backend: SocketAddr, grace_ms: u64) -> impl FnOnce(&mut Config) {
    move |config: &mut Config| {
        config.hooks.url = Some(format!("http://{backend}/hooks"));
        config.hooks.secret = vec![HOOK_SECRET.into()];
        config.hooks.vacated_grace_ms = grace_ms;
        config.hooks.retry_initial_ms = 20;
        config.hooks.retry_max_ms = 100;
        config.jwt_hs256_secret = Some(JWT_SECRET.into());
        for (name, hooks) in [("room", None), ("quiet", Some(false))] {
            let namespace =
                NamespaceConfig { subscribe: Some(SubscribeRule::Authenticated), hooks, ..NamespaceConfig::default() };
            config.namespaces.insert(name.into(), namespace);
        }
    }
}

async fn open(server: &Server, channel: &str, user: &str) -> Sse {
    Sse::open(server, &format!("channel={channel}&token={}", token(user)), None).await.0
}

async fn wait_for(backend: &Backend, count: usize) {
    eventually(&format!("{count} webhook requests"), || backend.count() >= count).await;
}

fn metric(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{series} is not in the metrics:\n{text}"))
}

#[tokio::test]
async fn channel_and_presence_events_come_once_each_in_order_and_signed() {
    let (backend, addr) = start_backend(&[]).await;
    let server = Server::with(hooked(addr, 300)).await;

    // A namespace with hooks off makes no event at all (were it to, its events would come first).
    let quiet = open(&server, "quiet:1", "alice").await;
    let alice = open(&server, "room:1", "alice").await;
    wait_for(&backend, 2).await;
    let alice_again = open(&server, "room:1", "alice").await; // the same user again: no event
    let bob = open(&server, "room:1", "bob").await;
    wait_for(&backend, 3).await;
    drop(quiet);
    drop(bob);
    wait_for(&backend, 4).await;
    drop(alice_again);
    drop(alice);
    wait_for(&backend, 6).await;
    // A last event after everything: delivery is in order, so any event sent twice, or sent for the
    // quiet namespace, would have come before it.
    let _carol = open(&server, "room:2", "carol").await;
    wait_for(&backend, 8).await;

    let received = backend.received();
    let events: Vec<(String, String, Option<String>)> = received.iter().map(Received::event).collect();
    let user = |name: &str| Some(name.to_owned());
    assert_eq!(
        events,
        vec![
            ("channel.occupied".into(), "room:1".into(), None),
            ("presence.joined".into(), "room:1".into(), user("alice")),
            ("presence.joined".into(), "room:1".into(), user("bob")),
            ("presence.left".into(), "room:1".into(), user("bob")),
            ("presence.left".into(), "room:1".into(), user("alice")),
            ("channel.vacated".into(), "room:1".into(), None),
            ("channel.occupied".into(), "room:2".into(), None),
            ("presence.joined".into(), "room:2".into(), user("carol")),
        ]
    );
    let ids: HashSet<&str> = received.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), received.len(), "every event has its own webhook-id");
    for r in &received {
        assert!(r.id.starts_with("msg_"), "{r:?}");
        assert_eq!(r.content_type, "application/json");
        let sent_at: u64 = r.timestamp.parse().expect("webhook-timestamp is Unix seconds");
        assert!(sent_at.abs_diff(now()) < 300, "{r:?}");
        let body = r.json();
        assert!(body["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')), "{body}");
        assert_eq!(body.as_object().map(|o| o.len()), Some(4), "type, channel, user, timestamp: {body}");
    }
    assert_eq!(invalid_signatures(&received), 0, "every signature verifies");
    let mut tampered = received[0].clone();
    tampered.body = tampered.body.replace("room:1", "room:X");
    assert_eq!(invalid_signatures(&[tampered]), 1, "the independent check does catch a bad signature");

    let text = client().get(server.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
    assert_eq!(metric(&text, r#"herald_hooks_events_total{type="presence.joined"}"#), 3);
    assert_eq!(metric(&text, r#"herald_hooks_deliveries_total{outcome="sent"}"#), 8);
    assert_eq!(metric(&text, r#"herald_hooks_deliveries_total{outcome="dropped"}"#), 0);
}

#[tokio::test]
async fn an_event_is_retried_after_503_and_one_refused_with_400_is_dropped() {
    // occupied: 503, 503, then 200; joined: 200; left: 400 (dropped, not retried); then 200s.
    let (backend, addr) = start_backend(&[503, 503, 200, 200, 400]).await;
    let server = Server::with(hooked(addr, 0)).await;

    let first = open(&server, "room:9", "dora").await;
    // occupied x3 (two 503s, then 200), then joined.
    wait_for(&backend, 4).await;
    let received = backend.received();
    assert_eq!(received[0].event().0, "channel.occupied");
    assert!(received[..3].iter().all(|r| r.id == received[0].id && r.body == received[0].body), "{received:?}");
    assert_eq!(received[3].event().0, "presence.joined");
    assert_ne!(received[3].id, received[0].id);
    drop(first);
    // left: 400, dropped; vacated: 200.
    wait_for(&backend, 6).await;
    let _again = open(&server, "room:9", "dora").await;
    wait_for(&backend, 8).await;
    let received = backend.received();
    let kinds: Vec<String> = received.iter().map(|r| r.event().0).collect();
    assert_eq!(
        kinds,
        [
            "channel.occupied",
            "channel.occupied",
            "channel.occupied",
            "presence.joined",
            "presence.left",
            "channel.vacated",
            "channel.occupied",
            "presence.joined"
        ]
    );
    assert_eq!(invalid_signatures(&received), 0, "retries are signed too (with their own timestamp)");

    let text = client().get(server.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
    assert_eq!(metric(&text, r#"herald_hooks_deliveries_total{outcome="sent"}"#), 5);
    assert_eq!(metric(&text, r#"herald_hooks_deliveries_total{outcome="failed"}"#), 3);
    assert_eq!(metric(&text, r#"herald_hooks_deliveries_total{outcome="retried"}"#), 2);
    assert_eq!(metric(&text, r#"herald_hooks_deliveries_total{outcome="dropped"}"#), 1);
    assert_eq!(metric(&text, r#"herald_hooks_events_total{type="channel.occupied"}"#), 2);
}

/// Waits up to `bound` for `count` requests (a dead node's events wait for its lease to expire).
async fn wait_long(backend: &Backend, count: usize, bound: std::time::Duration) {
    let deadline = tokio::time::Instant::now() + bound;
    while backend.count() < count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {count} webhook requests; got {:?}",
            backend.received().iter().map(Received::event).collect::<Vec<_>>()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_on_redis_send_each_event_once_also_when_a_node_is_killed() {
    let (backend, addr) = start_backend(&[]).await;
    let redis = herald_testkit::RedisServer::start();
    let prefix = format!("t{:08x}", rand::random::<u32>());
    let in_process = |url: String, prefix: String| {
        let hooks = hooked(addr, 300);
        move |config: &mut Config| {
            hooks(config);
            config.engine = url;
            config.redis.prefix = prefix;
            config.redis.probe_interval_ms = 100;
            config.redis.probe_timeout_ms = 1000;
            config.redis.node_ttl_secs = 3;
        }
    };
    // The process node starts first, so it is also the one that delivers (it holds the lease): killing
    // it kills the delivering node too, and another must take over.
    let hook_url = format!("http://{addr}/hooks");
    let redis_url = redis.url();
    let c = crate::process::Node::spawn(&[
        ("HERALD_NODE_ID", "hooks-c"),
        ("HERALD_ENGINE", redis_url.as_str()),
        ("HERALD_REDIS__PREFIX", prefix.as_str()),
        ("HERALD_REDIS__PROBE_INTERVAL_MS", "100"),
        ("HERALD_REDIS__PROBE_TIMEOUT_MS", "1000"),
        ("HERALD_REDIS__NODE_TTL_SECS", "3"),
        ("HERALD_HOOKS__URL", hook_url.as_str()),
        ("HERALD_HOOKS__SECRET", HOOK_SECRET),
        ("HERALD_HOOKS__VACATED_GRACE_MS", "300"),
        ("HERALD_JWT_HS256_SECRET", JWT_SECRET),
        ("HERALD_NAMESPACES__ROOM__SUBSCRIBE", "authenticated"),
    ]);
    let leader = format!("{prefix}:hooks:leader");
    let holder = || redis.query::<Option<String>>(&["GET", &leader]).ok().flatten();
    eventually("the process node holds the delivery lease", || holder().as_deref() == Some("hooks-c")).await;
    let a = Server::with(in_process(redis.url(), prefix.clone())).await;
    let b = Server::with(in_process(redis.url(), prefix.clone())).await;
    let open_on_c = |channel: &str, user: &str| {
        let url = c.url(&format!("/v1/sse?channel={channel}&token={}", token(user)));
        async move {
            let mut sse = Sse::connect_url(&url, None).await.expect("SSE on the process node");
            assert_eq!(sse.next().await.0, "herald.connected");
            sse
        }
    };

    let alice = open(&a, "room:1", "alice").await;
    wait_for(&backend, 2).await;
    let bob = open(&b, "room:1", "bob").await;
    wait_for(&backend, 3).await;
    let alice_on_c = open_on_c("room:1", "alice").await; // alice on a second node: no event
    let carol_on_c = open_on_c("room:1", "carol").await;
    wait_for(&backend, 4).await;
    drop(alice); // still connected on c: no event
    drop(bob);
    wait_for(&backend, 5).await;
    // Every event so far acknowledged (the cursor at the stream's last entry), so that none is sent
    // again by the next leader (delivery is at least once: one in flight at the kill would be).
    let (stream, cursor) = (format!("{prefix}:hooks"), format!("{prefix}:hooks:cursor"));
    let last_entry = || {
        redis
            .query::<Vec<(String, Vec<String>)>>(&["XREVRANGE", &stream, "+", "-", "COUNT", "1"])
            .ok()
            .and_then(|entries| entries.into_iter().next().map(|(id, _)| id))
    };
    let acknowledged = || redis.query::<Option<String>>(&["GET", &cursor]).ok().flatten();
    eventually("every event acknowledged", || last_entry().is_some() && last_entry() == acknowledged()).await;

    // Only the process node holds room:1 now. Killed, it says nothing: its users and the channel are
    // released once its lease expires (node_ttl_secs), then vacated after the grace, by whichever
    // node delivers.
    c.signal("KILL");
    drop((alice_on_c, carol_on_c));
    wait_long(&backend, 8, std::time::Duration::from_secs(30)).await;
    assert_ne!(holder().as_deref(), Some("hooks-c"), "another node delivers now");
    // A last event after everything: anything sent twice would have come before it.
    let _dave = open(&b, "room:2", "dave").await;
    wait_for(&backend, 10).await;

    let received = backend.received();
    let events: Vec<(String, String, Option<String>)> = received.iter().map(Received::event).collect();
    let user = |name: &str| Some(name.to_owned());
    assert_eq!(
        events,
        vec![
            ("channel.occupied".into(), "room:1".into(), None),
            ("presence.joined".into(), "room:1".into(), user("alice")),
            ("presence.joined".into(), "room:1".into(), user("bob")),
            ("presence.joined".into(), "room:1".into(), user("carol")),
            ("presence.left".into(), "room:1".into(), user("bob")),
            ("presence.left".into(), "room:1".into(), user("alice")),
            ("presence.left".into(), "room:1".into(), user("carol")),
            ("channel.vacated".into(), "room:1".into(), None),
            ("channel.occupied".into(), "room:2".into(), None),
            ("presence.joined".into(), "room:2".into(), user("dave")),
        ]
    );
    let ids: HashSet<&str> = received.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), received.len(), "every event once, each with its own webhook-id");
    assert_eq!(invalid_signatures(&received), 0, "every signature verifies");
}

#[tokio::test]
async fn an_event_past_its_age_limit_is_dropped_with_attempts_left_and_delivery_moves_on() {
    let (backend, addr) = start_backend(&[]).await;
    *backend.down_for.lock().expect("lock") = Some("room:7".into());
    let hooks = hooked(addr, 0);
    let server = Server::with(|config: &mut Config| {
        hooks(config);
        config.hooks.max_attempts = 100;
        config.hooks.retry_initial_ms = 100;
        config.hooks.retry_max_ms = 200;
        config.hooks.max_event_age_secs = 1;
    })
    .await;
    let metrics = || async {
        let text = client().get(server.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
        metric(&text, r#"herald_hooks_deliveries_total{outcome="dropped"}"#)
    };

    let _doomed = open(&server, "room:7", "erin").await;
    // Its occupied and joined events are answered 503 until they are a second old, then dropped.
    let deadline = tokio::time::Instant::now() + crate::harness::TIMEOUT;
    while metrics().await < 2 {
        assert!(tokio::time::Instant::now() < deadline, "the old events were never dropped");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let _fresh = open(&server, "room:8", "erin").await;
    wait_for(&backend, backend.count() + 2).await;
    let received = backend.received();
    let attempts_on_7 = received.iter().filter(|r| r.event().1 == "room:7").count();
    assert!((1..100).contains(&attempts_on_7), "dropped for age, long before 100 attempts: {attempts_on_7}");
    let tail: Vec<(String, String, Option<String>)> =
        received[received.len() - 2..].iter().map(Received::event).collect();
    assert_eq!(
        tail,
        [
            ("channel.occupied".into(), "room:8".into(), None),
            ("presence.joined".into(), "room:8".into(), Some("erin".into()))
        ]
    );
    assert_eq!(metrics().await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_gracefully_records_its_leaving_at_once() {
    let (backend, addr) = start_backend(&[]).await;
    let redis = herald_testkit::RedisServer::start();
    let prefix = format!("t{:08x}", rand::random::<u32>());
    // Leases of ten minutes: a channel vacated within the test was recorded by the stopping node itself,
    // not released by the others after its lease. The process node starts first, so it delivers; the
    // grace (2 s) outlasts its shutdown, so the node that takes over ends it and sends the events.
    let (hook_url, redis_url) = (format!("http://{addr}/hooks"), redis.url());
    let node_c = "hooks-t";
    let mut c = crate::process::Node::spawn(&[
        ("HERALD_NODE_ID", node_c),
        ("HERALD_ENGINE", redis_url.as_str()),
        ("HERALD_REDIS__PREFIX", prefix.as_str()),
        ("HERALD_REDIS__NODE_TTL_SECS", "600"),
        ("HERALD_HOOKS__URL", hook_url.as_str()),
        ("HERALD_HOOKS__SECRET", HOOK_SECRET),
        ("HERALD_HOOKS__VACATED_GRACE_MS", "2000"),
        ("HERALD_JWT_HS256_SECRET", JWT_SECRET),
        ("HERALD_NAMESPACES__ROOM__SUBSCRIBE", "authenticated"),
        ("HERALD_DRAIN_WINDOW_MS", "100"),
    ]);
    let leader = format!("{prefix}:hooks:leader");
    let holder = || redis.query::<Option<String>>(&["GET", &leader]).ok().flatten();
    eventually("the process node delivers", || holder().as_deref() == Some(node_c)).await;
    let (url, hooks, node_prefix) = (redis.url(), hooked(addr, 2000), prefix.clone());
    let _a = Server::with(move |config: &mut Config| {
        hooks(config);
        config.engine = url;
        config.redis.prefix = node_prefix;
        config.redis.node_ttl_secs = 600;
    })
    .await;
    let url = c.url(&format!("/v1/sse?channel=room:3&token={}", token("frank")));
    let mut frank = Sse::connect_url(&url, None).await.expect("SSE on the process node");
    assert_eq!(frank.next().await.0, "herald.connected");
    wait_for(&backend, 2).await;

    c.signal("TERM");
    assert_eq!(c.wait_exit(std::time::Duration::from_secs(10)), Some(0));
    // It gave its lease up as it stopped (it would hold it seconds more otherwise).
    assert_ne!(holder().as_deref(), Some(node_c), "the stopped node gave up the delivery lease");
    drop(frank);
    wait_for(&backend, 4).await;
    let events: Vec<(String, String, Option<String>)> = backend.received().iter().map(Received::event).collect();
    assert_eq!(
        events,
        [
            ("channel.occupied".into(), "room:3".into(), None),
            ("presence.joined".into(), "room:3".into(), Some("frank".into())),
            ("presence.left".into(), "room:3".into(), Some("frank".into())),
            ("channel.vacated".into(), "room:3".into(), None),
        ]
    );
}

#[tokio::test]
async fn through_sentinel_too() {
    let (backend, addr) = start_backend(&[]).await;
    let primary = herald_testkit::RedisServer::start();
    let sentinels = herald_testkit::Sentinels::start("herald", primary.port);
    let (url, hooks) = (sentinels.url("herald"), hooked(addr, 0));
    let server = Server::with(move |config: &mut Config| {
        hooks(config);
        config.engine = url;
        config.redis.prefix = format!("t{:08x}", rand::random::<u32>());
    })
    .await;
    let gus = open(&server, "room:4", "gus").await;
    wait_for(&backend, 2).await;
    drop(gus);
    wait_for(&backend, 4).await;
    let events: Vec<(String, String, Option<String>)> = backend.received().iter().map(Received::event).collect();
    assert_eq!(
        events,
        [
            ("channel.occupied".into(), "room:4".into(), None),
            ("presence.joined".into(), "room:4".into(), Some("gus".into())),
            ("presence.left".into(), "room:4".into(), Some("gus".into())),
            ("channel.vacated".into(), "room:4".into(), None),
        ]
    );
    let stream = format!("{}:hooks", server.state.config().redis.prefix);
    assert_eq!(primary.query::<i64>(&["XLEN", &stream]).ok(), Some(4), "the events went through the primary's stream");
}

/// On a Redis Cluster (the lifecycle state on the shard of `{hooks}`): a user on two nodes makes one
/// event of each kind, not one per node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_redis_cluster_too_once_per_cluster() {
    let (backend, addr) = start_backend(&[]).await;
    let cluster = herald_testkit::RedisCluster::start(3, 0);
    let prefix = format!("t{:08x}", rand::random::<u32>());
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let (url, prefix, hooks) = (cluster.url(), prefix.clone(), hooked(addr, 0));
        nodes.push(
            Server::with(move |config: &mut Config| {
                hooks(config);
                config.engine = url;
                config.redis.prefix = prefix;
            })
            .await,
        );
    }
    let on_a = open(&nodes[0], "room:5", "gus").await;
    wait_for(&backend, 2).await;
    let on_b = open(&nodes[1], "room:5", "gus").await;
    drop(on_a);
    drop(on_b);
    wait_for(&backend, 4).await;
    let events: Vec<(String, String, Option<String>)> = backend.received().iter().map(Received::event).collect();
    assert_eq!(
        events,
        [
            ("channel.occupied".into(), "room:5".into(), None),
            ("presence.joined".into(), "room:5".into(), Some("gus".into())),
            ("presence.left".into(), "room:5".into(), Some("gus".into())),
            ("channel.vacated".into(), "room:5".into(), None),
        ]
    );
    assert_eq!(invalid_signatures(&backend.received()), 0);
}

#[tokio::test]
async fn channels_are_sent_side_by_side_each_in_order() {
    let (backend, addr) = start_backend(&[]).await;
    let server = Server::with(hooked(addr, 0)).await;
    // While the first channel's events wait for the backend, the next channels' events queue up, so
    // that they are taken up together.
    backend.close_gate("room:0");
    let _first = open(&server, "room:0", "hal").await;
    wait_for(&backend, 1).await;
    backend.close_gate("room:slow");
    let _slow = open(&server, "room:slow", "ivy").await;
    let _fast = open(&server, "room:fast", "jo").await;
    let store = server.state.hooks().expect("hooks run").store().clone();
    let deadline = tokio::time::Instant::now() + crate::harness::TIMEOUT;
    let recorded = |events: &[herald_core::LifecycleEvent]| {
        events.iter().any(|e| e.channel.as_str() == "room:fast" && e.user.is_some())
    };
    while !recorded(&store.pending(256).await.expect("pending")) {
        assert!(tokio::time::Instant::now() < deadline, "room:fast's events were never recorded");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    backend.open_gate("room:0");
    // room:slow's occupied gets no answer; room:fast's two events still arrive meanwhile.
    eventually("room:fast delivered while room:slow waits", || {
        backend.received().iter().filter(|r| r.event().1 == "room:fast").count() == 2
    })
    .await;
    let slow: Vec<String> =
        backend.received().iter().filter(|r| r.event().1 == "room:slow").map(|r| r.event().0).collect();
    assert_eq!(slow, ["channel.occupied"], "room:slow's joined waits for its occupied");
    backend.open_gate("room:slow");
    eventually("room:slow delivered", || backend.received().iter().filter(|r| r.event().1 == "room:slow").count() == 2)
        .await;
    let slow: Vec<String> =
        backend.received().iter().filter(|r| r.event().1 == "room:slow").map(|r| r.event().0).collect();
    assert_eq!(slow, ["channel.occupied", "presence.joined"]);
}

#[tokio::test]
async fn while_a_secret_is_rotated_each_request_is_signed_with_both() {
    const NEW_SECRET: &str = "whsec_3Hq0V1m2b0z2kTQ8cNwXk6f9Yx8uJ1zq8s0dE4rYb2E=";
    let (backend, addr) = start_backend(&[]).await;
    let hooks = hooked(addr, 0);
    let server = Server::with(|config: &mut Config| {
        hooks(config);
        config.hooks.secret = vec![NEW_SECRET.into(), HOOK_SECRET.into()];
    })
    .await;
    let _kim = open(&server, "room:5", "kim").await;
    wait_for(&backend, 2).await;
    let received = backend.received();
    assert!(received.iter().all(|r| r.signature.split(' ').count() == 2), "{received:?}");
    assert_eq!(invalid_signatures_for(&received, NEW_SECRET), 0, "a backend with the new secret verifies");
    assert_eq!(invalid_signatures_for(&received, HOOK_SECRET), 0, "and one still on the old secret too");
    let other = "whsec_ZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXp7fH1+f4CBgoM=";
    assert_eq!(invalid_signatures_for(&received, other), 2, "another secret does not");
}
