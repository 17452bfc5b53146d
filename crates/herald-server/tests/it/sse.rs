//! SSE transport: ordering, multi-channel streams, resume through `Last-Event-ID`, resets, bad input.

use futures_util::StreamExt;
use herald_server::config::NamespaceConfig;
use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{Server, Sse, TIMEOUT, client, error_code};

#[tokio::test]
async fn publications_arrive_in_order_with_their_positions() {
    let server = Server::start().await;
    let (mut sse, connected) = Sse::open(&server, "channel=user:42", None).await;
    assert_eq!(connected["channels"], json!(["user:42"]));
    assert_eq!(connected["node"], server.state.hub().node_id());
    for i in 0..200 {
        server.publish("user:42", json!({"n": i})).await;
    }
    let data = sse.expect_offsets("user:42", 0, 200).await;
    assert_eq!(data, (0..200).map(|i| json!({"n": i})).collect::<Vec<_>>());
}

#[tokio::test]
async fn envelope_carries_the_contract_fields() {
    let server = Server::start().await;
    let (mut sse, _) = Sse::open(&server, "channel=order:8f3a", None).await;
    let answer = client()
        .post(server.url("/v1/publish"))
        .header("x-correlation-id", "req-123")
        .json(&json!({"channel": "order:8f3a", "event": "order.updated", "data": {"status": "paid"}}))
        .send()
        .await
        .expect("publish");
    assert_eq!(answer.status(), StatusCode::OK);
    let (event, envelope) = sse.next().await;
    assert_eq!(event, "order.updated");
    assert_eq!(envelope["channel"], "order:8f3a");
    assert_eq!(envelope["offset"], 1);
    assert_eq!(envelope["event"], "order.updated");
    assert_eq!(envelope["data"], json!({"status": "paid"}));
    assert_eq!(envelope["correlation_id"], "req-123");
    assert!(envelope["epoch"].as_str().is_some_and(|e| !e.is_empty()));
    let published_at = envelope["published_at"].as_str().expect("published_at");
    assert!(published_at.ends_with('Z') && published_at.contains('T'), "{published_at}");
}

#[tokio::test]
async fn one_stream_carries_several_channels_and_resumes_them_all() {
    let server = Server::start().await;
    let (mut sse, connected) = Sse::open(&server, "channel=b&channel=a&channel=a", None).await;
    assert_eq!(connected["channels"], json!(["a", "b"]), "channels are deduplicated and sorted");
    for i in 0..5 {
        server.publish("a", json!(i)).await;
        server.publish("b", json!(i)).await;
    }
    let mut next = [1u64, 1u64];
    for _ in 0..10 {
        let (_, envelope) = sse.next().await;
        let index = usize::from(envelope["channel"] == "b");
        assert_eq!(envelope["offset"], next[index], "{envelope}");
        next[index] += 1;
    }
    let cursor = sse.last_id.clone();
    drop(sse);
    for i in 5..8 {
        server.publish("b", json!(i)).await;
        server.publish("a", json!(i)).await;
    }
    let (mut resumed, _) = Sse::open(&server, "channel=a&channel=b", Some(&cursor)).await;
    let mut seen = Vec::new();
    for _ in 0..6 {
        let (_, envelope) = resumed.next().await;
        seen.push((envelope["channel"].as_str().unwrap_or_default().to_owned(), envelope["offset"].as_u64()));
    }
    let of = |ch: &str| seen.iter().filter(|(c, _)| c == ch).map(|(_, o)| o.unwrap_or(0)).collect::<Vec<_>>();
    assert_eq!(of("a"), vec![6, 7, 8]);
    assert_eq!(of("b"), vec![6, 7, 8]);
    assert_eq!(server.state.hub().stats().recovered, 6, "each replayed publication counted once");
    server.publish("a", json!("live")).await;
    resumed.expect_offsets("a", 8, 1).await;
}

#[tokio::test]
async fn last_event_id_resumes_exactly_after_missed_publications() {
    let server = Server::start().await;
    let (mut sse, _) = Sse::open(&server, "channel=user:1", None).await;
    for i in 1..=3 {
        server.publish("user:1", json!(i)).await;
    }
    sse.expect_offsets("user:1", 0, 3).await;
    let cursor = sse.last_id.clone();
    drop(sse);
    for i in 4..=9 {
        server.publish("user:1", json!(i)).await;
    }
    let (mut sse, _) = Sse::open(&server, "channel=user:1", Some(&cursor)).await;
    let recovered = sse.expect_offsets("user:1", 3, 6).await;
    assert_eq!(recovered, (4..=9).map(|i| json!(i)).collect::<Vec<_>>());
    server.publish("user:1", json!(10)).await;
    sse.expect_offsets("user:1", 9, 1).await;
    let stats = server.state.hub().stats();
    assert_eq!(stats.recovered, 6);
}

#[tokio::test]
async fn the_connected_cursor_resumes_a_client_that_saw_nothing_yet() {
    let server = Server::start().await;
    let (sse, _) = Sse::open(&server, "channel=user:1", None).await;
    let cursor = sse.last_id.clone();
    assert!(!cursor.is_empty(), "herald.connected carries the starting cursor");
    drop(sse);
    server.publish("user:1", json!("missed")).await;
    let (mut sse, _) = Sse::open(&server, "channel=user:1", Some(&cursor)).await;
    assert_eq!(sse.expect_offsets("user:1", 0, 1).await, vec![json!("missed")]);
}

#[tokio::test]
async fn last_event_id_also_works_as_a_query_parameter() {
    let server = Server::start().await;
    let (sse, _) = Sse::open(&server, "channel=x", None).await;
    let cursor = sse.last_id.clone();
    drop(sse);
    server.publish("x", json!(1)).await;
    let query = format!("channel=x&last_event_id={}", urlencode(&cursor));
    let (mut sse, _) = Sse::open(&server, &query, None).await;
    sse.expect_offsets("x", 0, 1).await;
}

#[tokio::test]
async fn a_gap_history_cannot_cover_becomes_a_reset_then_delivery_goes_on() {
    let server = Server::with(|config| {
        config
            .namespaces
            .insert("short".into(), NamespaceConfig { history_size: Some(3), ..NamespaceConfig::default() });
    })
    .await;
    let (mut sse, _) = Sse::open(&server, "channel=short:1", None).await;
    server.publish("short:1", json!(1)).await;
    sse.expect_offsets("short:1", 0, 1).await;
    let cursor = sse.last_id.clone();
    drop(sse);
    for i in 2..=10 {
        server.publish("short:1", json!(i)).await;
    }
    let (mut sse, _) = Sse::open(&server, "channel=short:1", Some(&cursor)).await;
    let (event, reset) = sse.next().await;
    assert_eq!(event, "herald.reset");
    assert_eq!(reset["channel"], "short:1");
    assert_eq!(reset["reason"], "history_gone");
    assert_eq!(reset["offset"], 10, "delivery continues from the current position");
    server.publish("short:1", json!(11)).await;
    sse.expect_offsets("short:1", 10, 1).await;
    // A cursor from another epoch (history lost) also resets.
    let foreign_epoch = cursor.rsplit_once('.').map(|(head, _)| format!("{head}.OtherEpoch-1")).expect("cursor shape");
    let (mut sse, _) = Sse::open(&server, "channel=short:1", Some(&foreign_epoch)).await;
    let (event, reset) = sse.next().await;
    assert_eq!((event.as_str(), reset["reason"].as_str()), ("herald.reset", Some("history_gone")));
    assert_eq!(server.state.hub().stats().resets_history_gone, 2);
}

#[tokio::test]
async fn the_compact_format_carries_the_payload_alone() {
    let server = Server::with(|config| {
        config
            .namespaces
            .insert("short".into(), NamespaceConfig { history_size: Some(2), ..NamespaceConfig::default() });
    })
    .await;
    let (mut compact, connected) = Sse::open(&server, "channel=short:1&format=compact", None).await;
    assert_eq!(connected["channels"], json!(["short:1"]), "herald.connected is unchanged");
    let (mut full, _) = Sse::open(&server, "channel=short:1&format=envelope", None).await;
    let payload = json!({"text": "hello there, this is thirty b", "n": [1, 2.5, null]});
    server.publish("short:1", payload.clone()).await;
    let (event, data) = compact.next().await;
    assert_eq!((event.as_str(), &data), ("message", &payload), "data: is the payload");
    let (_, envelope) = full.next().await;
    assert_eq!(envelope["data"], payload);
    assert_eq!(compact.last_id, full.last_id, "the position is in id:, as in the envelope format");

    // Replayed publications are compact too; a reset is unchanged.
    let cursor = compact.last_id.clone();
    server.publish("short:1", json!("second")).await;
    let (mut resumed, _) = Sse::open(&server, "channel=short:1&format=compact", Some(&cursor)).await;
    assert_eq!(resumed.next().await.1, json!("second"));
    for i in 0..3 {
        server.publish("short:1", json!(i)).await;
    }
    let (mut reset, _) = Sse::open(&server, "channel=short:1&format=compact", Some(&cursor)).await;
    let (event, data) = reset.next().await;
    assert_eq!((event.as_str(), data["reason"].as_str()), ("herald.reset", Some("history_gone")), "{data}");
}

#[tokio::test]
async fn idle_streams_get_heartbeat_comments() {
    let server = Server::with(|config| config.sse.ping_interval_secs = 1).await;
    let response = client().get(server.url("/v1/sse?channel=quiet")).send().await.expect("GET");
    let mut body = response.bytes_stream();
    let mut text = String::new();
    while !text.contains(": ping\n") {
        let chunk = tokio::time::timeout(TIMEOUT, body.next()).await.expect("a heartbeat within the timeout");
        text.push_str(&String::from_utf8_lossy(&chunk.expect("stream open").expect("chunk")));
    }
}

#[tokio::test]
async fn bad_requests_get_json_errors_before_the_stream_starts() {
    let server = Server::with(|config| config.limits.max_channels_per_connection = 3).await;
    let too_long = format!("channel={}", "x".repeat(256));
    let too_many = "channel=a&channel=b&channel=c&channel=d";
    let cases: Vec<(&str, Option<&str>, StatusCode, &str)> = vec![
        ("", None, StatusCode::BAD_REQUEST, "bad_request"),
        ("channel=", None, StatusCode::BAD_REQUEST, "invalid_channel"),
        ("channel=a%20b", None, StatusCode::BAD_REQUEST, "invalid_channel"),
        ("channel=%C3%A9", None, StatusCode::BAD_REQUEST, "invalid_channel"),
        (&too_long, None, StatusCode::BAD_REQUEST, "invalid_channel"),
        (too_many, None, StatusCode::TOO_MANY_REQUESTS, "limit_exceeded"),
        ("channel=a&colour=red", None, StatusCode::BAD_REQUEST, "bad_request"),
        ("channel=a", Some("garbage"), StatusCode::BAD_REQUEST, "invalid_cursor"),
        ("channel=a", Some("1.00000000.abc-1"), StatusCode::BAD_REQUEST, "invalid_cursor"),
        ("channel=a&last_event_id=1.zz", None, StatusCode::BAD_REQUEST, "invalid_cursor"),
        ("channel=a&format=xml", None, StatusCode::BAD_REQUEST, "bad_request"),
        ("channel=a&format=compact&format=compact", None, StatusCode::BAD_REQUEST, "bad_request"),
    ];
    for (query, last_id, status, code) in cases {
        let (got_status, body) = match Sse::connect(&server, query, last_id).await {
            Ok(_) => panic!("{query:?} was accepted"),
            Err(answer) => answer,
        };
        assert_eq!(got_status, status, "{query:?}: {body}");
        assert_eq!(error_code(&body), code, "{query:?}");
    }
    // A cursor of another connection's channel set is foreign.
    let (sse, _) = Sse::open(&server, "channel=a&channel=b", None).await;
    let (status, body) =
        Sse::connect(&server, "channel=a", Some(&sse.last_id)).await.err().expect("foreign cursor refused");
    assert_eq!((status, error_code(&body)), (StatusCode::BAD_REQUEST, "invalid_cursor"));
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
