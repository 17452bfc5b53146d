//! History is what subscribers got: hostile but valid data (nesting 200 and 10,000 deep, `1e400`, lone
//! surrogates, duplicate keys, integers and fractions beyond f64, line breaks in the body) published
//! on the memory engine and on Redis comes back byte for byte from every path: live SSE (envelope and
//! compact), live WebSocket, SSE resume (`Last-Event-ID`), WebSocket `since`, and `/v1/history`.
//! Also: history is bounded in bytes, and a paged read returns everything.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::cluster::cluster;
use crate::harness::{Server, Sse, Ws, client};
use herald_testkit::RedisServer;

/// One publication's `data` as written in the request body, and as every path must deliver it: the
/// same bytes without the whitespace between tokens.
struct Case {
    sent: String,
    delivered: String,
}

fn case(sent: impl Into<String>, delivered: impl Into<String>) -> Case {
    Case { sent: sent.into(), delivered: delivered.into() }
}

fn same(data: impl Into<String>) -> Case {
    let data = data.into();
    Case { sent: data.clone(), delivered: data }
}

fn cases() -> Vec<Case> {
    let nested = |depth: usize| format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
    let objects = |depth: usize| format!("{}true{}", "{\"a\":[".repeat(depth / 2), "]}".repeat(depth / 2));
    let records = r#"{"id":123456789012345678901234567890,"b":1,"a":2,"a":3,"f":1.0000000000000000000001}"#;
    vec![
        same(nested(200)),
        case(format!("{}1{}", "[\n".repeat(200), "\r\n]".repeat(200)), nested(200)),
        same(objects(10_000)),
        case(format!("{}true{}", "{ \"a\" :\n[".repeat(5_000), "]\n}".repeat(5_000)), objects(10_000)),
        same("1e400"),
        case(
            "[1e400,\n -1E-400,\n 0.10000000000000000000000000001]",
            "[1e400,-1E-400,0.10000000000000000000000000001]",
        ),
        same(r#""\ud800""#),
        case("{\"s\":\n \"\\udfff \\ud800\\u0000 x\\n y\"}", r#"{"s":"\udfff \ud800\u0000 x\n y"}"#),
        same(records),
        case(
            "{\r\n  \"id\": 123456789012345678901234567890,\r\n  \"b\": 1,\n  \"a\": 2,\n  \"a\": 3,\n\t\"f\": 1.0000000000000000000001\n}",
            records,
        ),
        same(r#"{"z":{"b":[],"a":{}},"":"","é":"\"\\\/"}"#),
    ]
}

/// The `data` member of an envelope (which is `{"channel","epoch","offset","event","data",
/// "correlation_id","published_at"}` in that order; no field before `data` can hold a quote).
fn data_of(envelope: &str) -> &str {
    let start = envelope.find("\"data\":").map(|i| i + 7).unwrap_or_else(|| panic!("no data: {envelope:.200}"));
    let end = envelope.rfind(",\"correlation_id\":").unwrap_or_else(|| panic!("no correlation_id: {envelope:.200}"));
    &envelope[start..end]
}

async fn history_text(server: &Server, query: &str) -> (StatusCode, String) {
    let response = client().get(server.url(&format!("/v1/history?{query}"))).send().await.expect("GET /v1/history");
    let status = response.status();
    if status == StatusCode::OK {
        assert_eq!(response.headers()["content-type"], "application/json");
    }
    (status, response.text().await.expect("history body"))
}

/// The history answer the server must give for these envelopes, byte for byte.
fn history_answer(channel: &str, epoch: &str, top: u64, envelopes: &[String]) -> String {
    format!(
        "{{\"channel\":\"{channel}\",\"epoch\":\"{epoch}\",\"offset\":{top},\"publications\":[{}]}}",
        envelopes.join(",")
    )
}

/// Publishes every case on `publisher` (bodies with line breaks around the data too) while an SSE and
/// a WebSocket client of `subscriber` listen, then reads everything back through every path of both.
async fn every_path_delivers_the_same_bytes(publisher: &Server, subscriber: &Server) {
    let channel = "hostile:1";
    let cases = cases();
    let (mut sse, _) = Sse::open(subscriber, &format!("channel={channel}"), None).await;
    let start = sse.last_id.clone();
    let (mut compact, _) = Sse::open(subscriber, &format!("channel={channel}&format=compact"), None).await;
    let mut ws = Ws::connect(subscriber).await;
    let subscribed = ws.subscribe(1, channel, None).await;
    assert_eq!(subscribed.last().map(|f| f["type"].clone()), Some(json!("subscribed")), "{subscribed:?}");
    let mut epoch = String::new();
    for (index, case) in cases.iter().enumerate() {
        let body = if index % 2 == 0 {
            format!("{{\"channel\":\"{channel}\",\"data\":{}}}", case.sent)
        } else {
            format!("{{\n  \"channel\": \"{channel}\",\r\n  \"data\": {}\n}}\n", case.sent)
        };
        let (status, answer) = publisher.post_raw("/v1/publish", body).await;
        assert_eq!(status, StatusCode::OK, "case {index}: {answer}");
        assert_eq!(answer["offset"], index as u64 + 1);
        epoch = answer["epoch"].as_str().expect("epoch").to_owned();
    }
    let top = cases.len() as u64;

    // Live delivery: SSE and WebSocket carry the same envelope, with the data as sent.
    let mut envelopes = Vec::new();
    for (index, case) in cases.iter().enumerate() {
        let (event, envelope) = sse.next_raw().await;
        assert_eq!(event, "message");
        assert_eq!(data_of(&envelope), case.delivered, "case {index}: live SSE");
        let message = ws.next_text().await;
        assert_eq!(message, format!("{{\"type\":\"message\",{}", &envelope[1..]), "case {index}: live WS");
        assert_eq!(compact.next_raw().await, (event, case.delivered.clone()), "case {index}: compact SSE");
        envelopes.push(envelope);
    }

    // Recovery: SSE resume and WebSocket `since` replay the same bytes (from the engine's history).
    for server in [subscriber, publisher] {
        let (mut resumed, _) = Sse::open(server, &format!("channel={channel}"), Some(&start)).await;
        for (index, envelope) in envelopes.iter().enumerate() {
            let (event, replayed) = resumed.next_raw().await;
            assert_eq!((event.as_str(), &replayed), ("message", envelope), "case {index}: SSE resume");
        }
        let query = format!("channel={channel}&format=compact");
        let (mut resumed, _) = Sse::open(server, &query, Some(&start)).await;
        for (index, case) in cases.iter().enumerate() {
            let (_, replayed) = resumed.next_raw().await;
            assert_eq!(replayed, case.delivered, "case {index}: compact SSE resume");
        }
        let mut ws = Ws::connect(server).await;
        ws.send(json!({"op": "subscribe", "id": 2, "channel": channel, "since": {"epoch": epoch, "offset": 0}})).await;
        for (index, envelope) in envelopes.iter().enumerate() {
            let message = ws.next_text().await;
            assert_eq!(message, format!("{{\"type\":\"message\",{}", &envelope[1..]), "case {index}: WS since");
        }
        assert_eq!(ws.next().await["type"], "subscribed");

        // History: exactly the delivered envelopes, on every node, read as often as one likes.
        let expected = history_answer(channel, &epoch, top, &envelopes);
        for query in [format!("channel={channel}"), format!("channel={channel}&since_epoch={epoch}&since_offset=0")] {
            for _ in 0..2 {
                assert_eq!(history_text(server, &query).await, (StatusCode::OK, expected.clone()), "{query}");
            }
        }
        let (status, after) =
            history_text(server, &format!("channel={channel}&since_epoch={epoch}&since_offset=9")).await;
        assert_eq!((status, after), (StatusCode::OK, history_answer(channel, &epoch, top, &envelopes[9..])));
    }

    // The channel still works afterwards.
    publisher.publish(channel, json!("after")).await;
    let (_, envelope) = sse.next().await;
    assert_eq!(envelope["data"], "after");
    let (status, last) = history_text(subscriber, &format!("channel={channel}&limit=1")).await;
    assert_eq!(status, StatusCode::OK);
    let last: Value = serde_json::from_str(&last).expect("history of plain data is JSON");
    assert_eq!(last["publications"][0], envelope);
}

#[tokio::test]
async fn hostile_data_is_delivered_recovered_and_kept_byte_for_byte_on_the_memory_engine() {
    let server = Server::start().await;
    every_path_delivers_the_same_bytes(&server, &server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_data_is_delivered_recovered_and_kept_byte_for_byte_on_redis() {
    let redis = RedisServer::start();
    let nodes = cluster(&redis, 2).await;
    // Published on one node, delivered on the other: live delivery crosses Redis pub/sub and recovery
    // and history read the Redis stream, each through `Publication::from_envelope`.
    every_path_delivers_the_same_bytes(&nodes[1], &nodes[0]).await;
}

/// Envelopes of a history answer (plain data, so serde_json can read it).
async fn history_offsets(server: &Server, query: &str) -> (Value, Vec<u64>, usize) {
    let (status, text) = history_text(server, query).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let answer: Value = serde_json::from_str(&text).expect("history is JSON");
    let publications = answer["publications"].as_array().cloned().unwrap_or_default();
    let offsets = publications.iter().map(|p| p["offset"].as_u64().unwrap_or(0)).collect();
    let bytes = publications.iter().map(|p| p.to_string().len()).sum();
    (answer, offsets, bytes)
}

#[tokio::test]
async fn history_is_bounded_in_bytes_per_channel_and_per_namespace() {
    history_is_bounded_in_bytes(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_bounded_in_bytes_on_redis_too() {
    let redis = RedisServer::start();
    history_is_bounded_in_bytes(Some(redis.url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_bounded_in_bytes_on_nats_too() {
    let nats = herald_testkit::NatsServer::start();
    history_is_bounded_in_bytes(Some(nats.url())).await;
}

async fn history_is_bounded_in_bytes(engine: Option<String>) {
    let server = Server::with(|config| {
        if let Some(url) = engine {
            config.engine = url;
        }
        config.history.max_bytes = 64 * 1024;
        config.namespaces.insert(
            "tiny".into(),
            herald_server::config::NamespaceConfig { history_max_bytes: Some(4 * 1024), ..Default::default() },
        );
    })
    .await;
    let payload = "x".repeat(1000);
    let (mut sse, _) = Sse::open(&server, "channel=tiny:1", None).await;
    let start = sse.last_id.clone();
    for _ in 0..200 {
        server.publish("big:1", json!(payload)).await;
        server.publish("tiny:1", json!(payload)).await;
    }
    sse.expect_offsets("tiny:1", 0, 200).await;
    let (_, offsets, bytes) = history_offsets(&server, "channel=big:1&limit=1000").await;
    assert!(bytes <= 64 * 1024 && bytes > 60 * 1024, "{bytes} bytes of history");
    assert_eq!(offsets.last(), Some(&200));
    let (_, offsets, bytes) = history_offsets(&server, "channel=tiny:1&limit=1000").await;
    assert!(bytes <= 4 * 1024, "{bytes} bytes of history");
    assert_eq!((offsets.len(), offsets.last()), (3, Some(&200)));
    // A client that fell behind what the bytes bound keeps is reset, not silently skipped.
    let (mut resumed, _) = Sse::open(&server, "channel=tiny:1", Some(&start)).await;
    let (event, reset) = resumed.next().await;
    assert_eq!(
        (event.as_str(), reset["reason"].as_str(), reset["offset"].as_u64()),
        ("herald.reset", Some("history_gone"), Some(200))
    );
    // One publication larger than the whole bound is kept (alone) and recoverable.
    let cursor = sse.last_id.clone();
    drop(sse);
    let large = "y".repeat(8 * 1024);
    server.publish("tiny:1", json!(large)).await;
    let (_, offsets, _) = history_offsets(&server, "channel=tiny:1").await;
    assert_eq!(offsets, vec![201]);
    let (mut resumed, _) = Sse::open(&server, "channel=tiny:1", Some(&cursor)).await;
    assert_eq!(resumed.expect_offsets("tiny:1", 200, 1).await, vec![json!(large)]);
}

#[tokio::test]
async fn history_answers_are_bounded_in_bytes_and_paging_returns_everything() {
    paging_returns_everything(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_reads_from_redis_are_paged_and_a_resume_still_recovers_everything() {
    let redis = RedisServer::start();
    paging_returns_everything(Some(redis.url())).await;
}

async fn paging_returns_everything(engine: Option<String>) {
    let max = 64 * 1024;
    let server = Server::with(|config| {
        if let Some(url) = engine {
            config.engine = url;
        }
        config.limits.max_history_response_bytes = 64 * 1024;
    })
    .await;
    let mut expected = Vec::new();
    let mut epoch = String::new();
    for i in 0..200u64 {
        // Sizes vary so that pages end at different places.
        let data = json!({"i": i, "pad": "z".repeat(500 + (i as usize * 37) % 3000)});
        epoch = server.publish("paged:1", data.clone()).await["epoch"].as_str().expect("epoch").to_owned();
        expected.push(data);
    }
    let mut received = Vec::new();
    let mut since = 0u64;
    let mut pages = 0;
    loop {
        let query = format!("channel=paged:1&since_epoch={epoch}&since_offset={since}&limit=10000");
        let (status, text) = history_text(&server, &query).await;
        assert_eq!(status, StatusCode::OK);
        assert!(text.len() <= max, "answer of {} bytes", text.len());
        let answer: Value = serde_json::from_str(&text).expect("history is JSON");
        assert_eq!((answer["epoch"].as_str(), answer["offset"].as_u64()), (Some(epoch.as_str()), Some(200)));
        let publications = answer["publications"].as_array().cloned().unwrap_or_default();
        assert!(!publications.is_empty(), "a page always moves on");
        for publication in publications {
            since += 1;
            assert_eq!(publication["offset"], since, "pages continue exactly");
            received.push(publication["data"].clone());
        }
        pages += 1;
        if since == 200 {
            break;
        }
        // The page was full: one more publication would not have fitted.
        let next = expected[since as usize].to_string().len();
        assert!(text.len() + next > max - 300, "page of {} bytes stopped early", text.len());
    }
    assert_eq!(received, expected);
    assert!(pages > 5, "{pages} pages");
    // Without `since` the answer is bounded too, starting at the latest `limit`.
    let (_, offsets, _) = history_offsets(&server, "channel=paged:1&limit=10").await;
    assert_eq!(offsets, (191..=200).collect::<Vec<_>>());
    // A publication larger than the bound comes alone, whole.
    let large = "L".repeat(100 * 1024);
    server.publish("paged:1", json!(large)).await;
    server.publish("paged:1", json!("small")).await;
    let query = format!("channel=paged:1&since_epoch={epoch}&since_offset=200");
    let (answer, offsets, _) = history_offsets(&server, &query).await;
    assert_eq!(offsets, vec![201]);
    assert_eq!(answer["publications"][0]["data"], json!(large));
    let query = format!("channel=paged:1&since_epoch={epoch}&since_offset=201");
    assert_eq!(history_offsets(&server, &query).await.1, vec![202]);
    // A client resuming from the start recovers all of it, across as many reads as it takes.
    let cursor = herald_core::encode_cursor(
        &[herald_core::ChannelName::parse("paged:1").expect("channel")],
        &[herald_core::Position::new(herald_core::Epoch::parse(&epoch).expect("epoch"), 0)],
    );
    let (mut sse, _) = Sse::open(&server, "channel=paged:1", Some(&cursor)).await;
    let data = sse.expect_offsets("paged:1", 0, 202).await;
    assert_eq!(&data[..200], &expected[..]);
}
