//! The server API: publish (idempotency, correlation, receipts), broadcast, history, presence,
//! disconnect, cluster, operations endpoints, API keys, and every bad input.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Server, Sse, client, error_code, read_json};

#[tokio::test]
async fn publish_answers_the_position_and_idempotency_keys_publish_once() {
    let server = Server::start().await;
    let (mut sse, _) = Sse::open(&server, "channel=pay:1", None).await;
    let first = server.post("/v1/publish", json!({"channel": "pay:1", "data": 1, "idempotency_key": "k-1"})).await.1;
    assert_eq!(first["channel"], "pay:1");
    assert_eq!(first["offset"], 1);
    assert_eq!(first["duplicate"], false);
    assert!(first["epoch"].is_string() && first["correlation_id"].is_string());
    let again = server.post("/v1/publish", json!({"channel": "pay:1", "data": 2, "idempotency_key": "k-1"})).await.1;
    assert_eq!(again["duplicate"], true);
    assert_eq!((&again["offset"], &again["epoch"]), (&first["offset"], &first["epoch"]));
    assert_eq!(again["correlation_id"], first["correlation_id"]);
    let other = server.post("/v1/publish", json!({"channel": "pay:1", "data": 3, "idempotency_key": "k-2"})).await.1;
    assert_eq!((other["offset"].as_u64(), other["duplicate"].as_bool()), (Some(2), Some(false)));
    let data = sse.expect_offsets("pay:1", 0, 2).await;
    assert_eq!(data, vec![json!(1), json!(3)], "the duplicate was not delivered");
}

#[tokio::test]
async fn correlation_ids_come_from_the_header_or_traceparent() {
    let server = Server::start().await;
    let publish = |header: Option<(&'static str, &'static str)>| {
        let mut request = client().post(server.url("/v1/publish")).json(&json!({"channel": "c", "data": null}));
        if let Some((name, value)) = header {
            request = request.header(name, value);
        }
        async move { read_json(request.send().await.expect("publish")).await }
    };
    let (_, body) = publish(Some(("x-correlation-id", "abc-123"))).await;
    assert_eq!(body["correlation_id"], "abc-123");
    let (_, body) = publish(Some(("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"))).await;
    assert_eq!(body["correlation_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    let (_, body) = publish(None).await;
    assert_eq!(body["correlation_id"].as_str().map(str::len), Some(32));
    let (status, body) = publish(Some(("x-correlation-id", "has space"))).await;
    assert_eq!((status, error_code(&body)), (StatusCode::BAD_REQUEST, "bad_request"));
}

#[tokio::test]
async fn await_delivery_reports_local_connections() {
    let server = Server::start().await;
    let (status, nobody) =
        server.post("/v1/publish?await=delivery&timeout_ms=500", json!({"channel": "u:1", "data": 1})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(nobody["delivery"], json!({"connections": 0, "nodes": [], "timed_out": false}));
    let (_sse_a, _) = Sse::open(&server, "channel=u:1", None).await;
    let (_sse_b, _) = Sse::open(&server, "channel=u:1&channel=u:2", None).await;
    let (_, two) =
        server.post("/v1/publish?await=delivery&timeout_ms=2000", json!({"channel": "u:1", "data": 2})).await;
    let node = server.state.hub().node_id();
    assert_eq!(two["delivery"], json!({"connections": 2, "nodes": [node], "timed_out": false}));
    assert_eq!(two["offset"], 2);
    for (query, code) in [
        ("?await=later", "bad_request"),
        ("?await=delivery&timeout_ms=-1", "bad_request"),
        ("?await=delivery&timeout_ms=999999999", "bad_request"),
    ] {
        let (status, body) = server.post(&format!("/v1/publish{query}"), json!({"channel": "u:1", "data": 1})).await;
        assert_eq!((status, error_code(&body)), (StatusCode::BAD_REQUEST, code), "{query}");
    }
}

#[tokio::test]
async fn every_bad_publish_gets_the_contract_error() {
    let server = Server::with(|config| config.limits.max_body_bytes = 4096).await;
    let long_channel = "x".repeat(256);
    let cases: Vec<(String, StatusCode, &str)> = vec![
        ("{".into(), StatusCode::BAD_REQUEST, "malformed_json"),
        ("".into(), StatusCode::BAD_REQUEST, "malformed_json"),
        ("[1,2]".into(), StatusCode::BAD_REQUEST, "invalid_body"),
        (r#"{"data":1}"#.into(), StatusCode::BAD_REQUEST, "invalid_body"),
        (r#"{"channel":"a"}"#.into(), StatusCode::BAD_REQUEST, "invalid_body"),
        (r#"{"channel":42,"data":1}"#.into(), StatusCode::BAD_REQUEST, "invalid_body"),
        (r#"{"channel":"a","data":1,"extra":true}"#.into(), StatusCode::BAD_REQUEST, "invalid_body"),
        (r#"{"channel":"a b","data":1}"#.into(), StatusCode::BAD_REQUEST, "invalid_channel"),
        (r#"{"channel":"","data":1}"#.into(), StatusCode::BAD_REQUEST, "invalid_channel"),
        (format!(r#"{{"channel":"{long_channel}","data":1}}"#), StatusCode::BAD_REQUEST, "invalid_channel"),
        (r#"{"channel":"a","data":1,"event":"herald.reset"}"#.into(), StatusCode::BAD_REQUEST, "invalid_body"),
        (r#"{"channel":"a","data":1,"event":"two words"}"#.into(), StatusCode::BAD_REQUEST, "invalid_body"),
        (r#"{"channel":"a","data":1,"event":7}"#.into(), StatusCode::BAD_REQUEST, "invalid_body"),
        (r#"{"channel":"a","data":1,"idempotency_key":""}"#.into(), StatusCode::BAD_REQUEST, "invalid_body"),
        (
            format!(r#"{{"channel":"a","data":"{}"}}"#, "x".repeat(5000)),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
        ("\u{0}\u{1}".into(), StatusCode::BAD_REQUEST, "malformed_json"),
    ];
    for (body, status, code) in cases {
        let (got, answer) = server.post_raw("/v1/publish", body.clone()).await;
        assert_eq!(got, status, "{body:.80}: {answer}");
        assert_eq!(error_code(&answer), code, "{body:.80}");
    }
    let invalid_utf8 = vec![b'{', 0xff, 0xfe, b'}'];
    let (status, answer) = server.post_raw("/v1/publish", invalid_utf8).await;
    assert_eq!((status, error_code(&answer)), (StatusCode::BAD_REQUEST, "malformed_json"));
    // Pretty-printed data is accepted and delivered on one SSE line.
    let (status, _) = server.post_raw("/v1/publish", "{\"channel\":\"a\",\n\"data\": {\n  \"k\": [1,\n 2]\n}}").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(server.state.hub().stats().published, 1);
}

#[tokio::test]
async fn broadcast_publishes_once_per_channel_and_reports_each() {
    let server = Server::start().await;
    let (mut sse, _) = Sse::open(&server, "channel=a&channel=b", None).await;
    let (status, body) = server
        .post("/v1/broadcast", json!({"channels": ["a", "b", "not valid"], "data": {"x": 1}, "event": "ping.all"}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let results = body["results"].as_array().expect("results");
    assert_eq!(results.len(), 3);
    assert_eq!((results[0]["channel"].as_str(), results[0]["offset"].as_u64()), (Some("a"), Some(1)));
    assert_eq!((results[1]["channel"].as_str(), results[1]["offset"].as_u64()), (Some("b"), Some(1)));
    assert_eq!(results[2]["channel"], "not valid");
    assert_eq!(results[2]["error"]["code"], "invalid_channel");
    let mut channels = vec![];
    for _ in 0..2 {
        let (event, envelope) = sse.next().await;
        assert_eq!(event, "ping.all");
        channels.push(envelope["channel"].as_str().unwrap_or_default().to_owned());
    }
    channels.sort();
    assert_eq!(channels, ["a", "b"]);
    for body in [json!({"channels": [], "data": 1}), json!({"channels": "a", "data": 1}), json!({"channels": ["a"]})] {
        let (status, answer) = server.post("/v1/broadcast", body.clone()).await;
        assert_eq!((status, error_code(&answer)), (StatusCode::BAD_REQUEST, "invalid_body"), "{body}");
    }
}

#[tokio::test]
async fn history_returns_publications_after_a_position_or_410() {
    let server = Server::with(|config| config.history.size = 5).await;
    let mut epoch = Value::Null;
    for i in 1..=8 {
        epoch = server.publish("h", json!(i)).await["epoch"].clone();
    }
    let epoch = epoch.as_str().expect("epoch").to_owned();
    let (status, all) = server.get("/v1/history?channel=h").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!((all["epoch"].as_str(), all["offset"].as_u64()), (Some(epoch.as_str()), Some(8)));
    let offsets = |body: &Value| {
        body["publications"].as_array().map(|p| p.iter().map(|e| e["offset"].clone()).collect::<Vec<_>>())
    };
    assert_eq!(offsets(&all), Some(vec![json!(4), json!(5), json!(6), json!(7), json!(8)]));
    let (_, after) = server.get(&format!("/v1/history?channel=h&since_epoch={epoch}&since_offset=6")).await;
    assert_eq!(offsets(&after), Some(vec![json!(7), json!(8)]));
    let (_, limited) = server.get(&format!("/v1/history?channel=h&since_epoch={epoch}&since_offset=3&limit=2")).await;
    assert_eq!(offsets(&limited), Some(vec![json!(4), json!(5)]));
    assert_eq!(after["publications"][0]["data"], json!(7));
    let cases = [
        (format!("/v1/history?channel=h&since_epoch={epoch}&since_offset=1"), StatusCode::GONE, "history_gone"),
        ("/v1/history?channel=h&since_epoch=other&since_offset=1".to_owned(), StatusCode::GONE, "history_gone"),
        ("/v1/history".to_owned(), StatusCode::BAD_REQUEST, "bad_request"),
        ("/v1/history?channel=a%20b".to_owned(), StatusCode::BAD_REQUEST, "invalid_channel"),
        ("/v1/history?channel=h&since_epoch=x".to_owned(), StatusCode::BAD_REQUEST, "bad_request"),
        ("/v1/history?channel=h&since_epoch=x&since_offset=-2".to_owned(), StatusCode::BAD_REQUEST, "bad_request"),
        ("/v1/history?channel=h&since_epoch=a!&since_offset=1".to_owned(), StatusCode::BAD_REQUEST, "invalid_cursor"),
        ("/v1/history?channel=h&limit=0".to_owned(), StatusCode::BAD_REQUEST, "bad_request"),
        ("/v1/history?channel=h&channel=g".to_owned(), StatusCode::BAD_REQUEST, "bad_request"),
    ];
    for (path, status, code) in cases {
        let (got, body) = server.get(&path).await;
        assert_eq!((got, error_code(&body)), (status, code), "{path}");
    }
}

#[tokio::test]
async fn presence_lists_connections_and_forgets_them_on_disconnect() {
    let server = Server::start().await;
    let (sse, connected) = Sse::open(&server, "channel=room:1", None).await;
    let (status, presence) = server.get("/v1/presence?channel=room:1").await;
    assert_eq!(status, StatusCode::OK);
    let entries = presence["connections"].as_array().expect("connections");
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0]["connection_id"], connected["connection_id"]);
    assert_eq!(entries[0]["node"], server.state.hub().node_id());
    assert_eq!(entries[0]["transport"], "sse");
    assert_eq!(entries[0]["user"], Value::Null);
    assert!(entries[0]["connected_at"].is_string());
    drop(sse);
    crate::harness::eventually("presence emptied", || server.state.hub().connection_count() == 0).await;
    let (_, presence) = server.get("/v1/presence?channel=room:1").await;
    assert_eq!(presence["connections"], json!([]));
    let (status, body) = server.get("/v1/presence").await;
    assert_eq!((status, error_code(&body)), (StatusCode::BAD_REQUEST, "bad_request"));
}

#[tokio::test]
async fn disconnect_and_cluster_answer() {
    let server = Server::start().await;
    let (status, body) = server.post("/v1/disconnect", json!({"user": "42"})).await;
    assert_eq!((status, body), (StatusCode::OK, json!({"disconnected": 0})));
    for bad in [json!({}), json!({"user": ""}), json!({"user": 42})] {
        let (status, body) = server.post("/v1/disconnect", bad.clone()).await;
        assert_eq!((status, error_code(&body)), (StatusCode::BAD_REQUEST, "invalid_body"), "{bad}");
    }
    let (mut sse, _) = Sse::open(&server, "channel=a&channel=b", None).await;
    server.publish("a", json!(1)).await;
    sse.expect_offsets("a", 0, 1).await;
    let (status, cluster) = server.get("/v1/cluster").await;
    assert_eq!(status, StatusCode::OK);
    let nodes = cluster["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0]["node"], server.state.hub().node_id());
    assert_eq!((nodes[0]["connections"].as_u64(), nodes[0]["channels"].as_u64()), (Some(1), Some(2)));
    assert_eq!(nodes[0]["published"], 1);
    assert!(nodes[0]["latency_p99_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{}", nodes[0]);
    assert_eq!(nodes[0]["health"], json!({"delivered_live": 1.0, "recovered": 0.0, "reset": 0.0}));
}

#[tokio::test]
async fn operations_endpoints_and_unknown_routes() {
    let server = Server::start().await;
    assert_eq!(server.get("/healthz").await, (StatusCode::OK, json!({"status": "ok"})));
    let (status, ready) = server.get("/readyz").await;
    assert_eq!((status, ready["ready"].as_bool()), (StatusCode::OK, Some(true)));
    let (status, body) = server.get("/nope").await;
    assert_eq!((status, error_code(&body)), (StatusCode::NOT_FOUND, "not_found"));
    let response = client().delete(server.url("/v1/publish")).send().await.expect("DELETE");
    let (status, body) = read_json(response).await;
    assert_eq!((status, error_code(&body)), (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"));
    let page = client().get(server.url("/")).send().await.expect("GET /");
    assert_eq!(page.status(), StatusCode::OK);
    let page = page.text().await.expect("page");
    assert!(page.contains("EventSource") && page.contains("/herald-client.js"), "{page}");
    let script = client().get(server.url("/herald-client.js")).send().await.expect("GET /herald-client.js");
    assert_eq!(script.status(), StatusCode::OK);
    assert_eq!(script.headers()["content-type"], "text/javascript; charset=utf-8", "browsers load modules only so");
    assert!(script.text().await.expect("script").contains("export"), "an ES module");
}

#[tokio::test]
async fn metrics_count_what_happened() {
    let server = Server::start().await;
    let (mut sse, _) = Sse::open(&server, "channel=m", None).await;
    for i in 0..3 {
        server.publish("m", json!(i)).await;
    }
    sse.expect_offsets("m", 0, 3).await;
    server.publish("nobody-listens", json!(1)).await;
    server.post_raw("/v1/publish", "{not json").await;
    server.post("/v1/publish", json!({"channel": "bad channel", "data": 1})).await;
    let text = client().get(server.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
    for line in [
        "herald_publications_total{result=\"accepted\"} 4",
        "herald_deliveries_total{transport=\"sse\"} 3",
        "herald_publications_without_subscribers_total 1",
        "herald_connections 1",
        "herald_channels 1",
        "herald_delivery_latency_seconds_count 3",
        "herald_publications_refused_total{reason=\"malformed_json\"} 1",
        "herald_publications_refused_total{reason=\"invalid_channel\"} 1",
        "herald_ready 1",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
    }
}

#[tokio::test]
async fn api_keys_guard_the_server_api_when_configured() {
    let key = "k".repeat(24);
    let server = Server::with(|config| config.api_keys = vec!["a".repeat(20), "k".repeat(24)]).await;
    let body = json!({"channel": "a", "data": 1});
    let (status, answer) = server.post("/v1/publish", body.clone()).await;
    assert_eq!((status, error_code(&answer)), (StatusCode::UNAUTHORIZED, "unauthorized"));
    for auth in ["Bearer wrong", "Basic abc", &format!("Bearer {key}x"), &key] {
        let response = client().post(server.url("/v1/publish")).header("authorization", auth).json(&body).send().await;
        assert_eq!(response.expect("publish").status(), StatusCode::UNAUTHORIZED, "{auth}");
    }
    let response = client()
        .post(server.url("/v1/publish"))
        .header("authorization", format!("Bearer {key}"))
        .json(&body)
        .send()
        .await;
    assert_eq!(response.expect("publish").status(), StatusCode::OK);
    let (status, _) = server.get("/v1/history?channel=a").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(server.get("/healthz").await.0, StatusCode::OK, "operations endpoints stay open");
}

#[tokio::test]
async fn the_router_serves_sse_when_embedded_in_another_axum_application() {
    // An application that embeds Herald serves `router(state)` with its own server (here `axum::serve`),
    // so SSE goes through the axum handler rather than Herald's accept loop.
    let cli = herald_server::Cli { listen: Some("127.0.0.1:0".into()), ..herald_server::Cli::default() };
    let settings = herald_server::config::load(&cli, &[]).expect("config");
    let state = herald_server::start(settings).await.expect("node");
    let app = axum::Router::new().nest_service("/herald", herald_server::router(state.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    let mut sse = Sse::connect_url(&format!("http://{addr}/herald/v1/sse?channel=embedded"), None).await.expect("SSE");
    assert_eq!(sse.next().await.0, "herald.connected");
    let response = client()
        .post(format!("http://{addr}/herald/v1/publish"))
        .json(&json!({"channel": "embedded", "data": "hi"}))
        .send()
        .await
        .expect("publish");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(sse.expect_offsets("embedded", 0, 1).await, vec![json!("hi")]);
}

#[tokio::test]
async fn a_batch_publishes_each_item_in_order_and_answers_each() {
    let server = Server::start().await;
    batch_items_are_single_publishes(&server, &server).await;
    batch_refusals(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_on_redis_is_one_script_call_with_the_same_answers() {
    let redis = herald_testkit::RedisServer::start();
    let nodes = crate::cluster::cluster(&redis, 2).await;
    let calls = |redis: &herald_testkit::RedisServer| -> u64 {
        let stats: String = redis.query(&["INFO", "commandstats"]).unwrap_or_default();
        let field = |name: &str| -> u64 {
            stats
                .lines()
                .find_map(|l| l.strip_prefix(&format!("cmdstat_{name}:calls=")))
                .and_then(|rest| rest.split(',').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        field("evalsha") + field("eval")
    };
    // Published on one node, delivered on the other through Redis.
    batch_items_are_single_publishes(&nodes[1], &nodes[0]).await;
    let before = calls(&redis);
    let items: Vec<Value> = (0..50).map(|i| json!({"channel": format!("c:{}", i % 5), "data": i})).collect();
    let (status, body) = nodes[1].post("/v1/publish", json!({ "publications": items })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let offsets: Vec<u64> =
        body["results"].as_array().map_or(Vec::new(), |r| r.iter().filter_map(|r| r["offset"].as_u64()).collect());
    assert_eq!(offsets, (0..50).map(|i| i / 5 + 1).collect::<Vec<u64>>(), "each channel in the order given");
    assert_eq!(calls(&redis) - before, 1, "the whole batch is one script call");
}

/// The batch of mixed items every engine must answer as single publishes would be answered.
async fn batch_items_are_single_publishes(publisher: &Server, subscriber: &Server) {
    let (mut sse, _) = Sse::open(subscriber, "channel=a:1&channel=b:1", None).await;
    let (status, body) = publisher
        .post(
            "/v1/publish",
            json!({"publications": [
                {"channel": "a:1", "data": 1},
                {"channel": "b:1", "data": {"x": null}, "event": "changed"},
                {"channel": "not a channel", "data": 2},
                {"channel": "a:1", "data": null, "idempotency_key": "k1"},
                {"channel": "a:1"},
                {"channel": "a:1", "data": 3, "event": "herald.nope"},
                {"channel": "a:1", "data": 4, "idempotency_key": "k1"},
                {"channel": "b:1", "data": [5]},
            ]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let results = body["results"].as_array().cloned().unwrap_or_default();
    assert_eq!(results.len(), 8, "{body}");
    let offsets: Vec<Value> = results.iter().map(|r| r["offset"].clone()).collect();
    assert_eq!(offsets, [json!(1), json!(1), Value::Null, json!(2), Value::Null, Value::Null, json!(2), json!(2)]);
    assert_eq!(results[6]["duplicate"], true, "the idempotency key holds within a batch");
    assert_eq!(error_code(&results[2]), "invalid_channel");
    assert_eq!(error_code(&results[4]), "invalid_body");
    assert_eq!(error_code(&results[5]), "invalid_body");
    // Delivered as single publishes would be, in the order given per channel.
    let mut got = Vec::new();
    while got.len() < 4 {
        let (event, envelope) = sse.next().await;
        got.push((event, envelope["channel"].clone(), envelope["offset"].clone(), envelope["data"].clone()));
    }
    got.sort_by_key(|(_, channel, offset, _)| (channel.to_string(), offset.as_u64()));
    assert_eq!(
        got,
        [
            ("message".to_owned(), json!("a:1"), json!(1), json!(1)),
            ("message".to_owned(), json!("a:1"), json!(2), Value::Null),
            ("changed".to_owned(), json!("b:1"), json!(1), json!({"x": null})),
            ("message".to_owned(), json!("b:1"), json!(2), json!([5])),
        ]
    );
}

/// Requests refused as a whole.
async fn batch_refusals(server: &Server) {
    // The whole request is refused when it is not a batch at all.
    for bad in [
        json!({"publications": []}),
        json!({"publications": [{"channel": "a:1", "data": 1}], "channel": "a:1"}),
        json!({"publications": {"channel": "a:1"}}),
    ] {
        let (status, body) = server.post("/v1/publish", bad.clone()).await;
        assert_eq!((status, error_code(&body)), (StatusCode::BAD_REQUEST, "invalid_body"), "{bad}");
    }
    let (status, body) =
        server.post("/v1/publish?await=delivery", json!({"publications": [{"channel": "a:1", "data": 1}]})).await;
    assert_eq!((status, error_code(&body)), (StatusCode::BAD_REQUEST, "bad_request"), "{body}");
    let too_many: Vec<Value> = (0..1001).map(|i| json!({"channel": "a:1", "data": i})).collect();
    let (status, body) = server.post("/v1/publish", json!({ "publications": too_many })).await;
    assert_eq!((status, error_code(&body)), (StatusCode::BAD_REQUEST, "invalid_body"), "{body}");
    // A single publish of `null` data is still a publish.
    assert_eq!(server.publish("a:1", Value::Null).await["offset"], 3);
}
