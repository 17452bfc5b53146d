//! WebSocket transport: subscribe, unsubscribe, ping, resume with `since`, and bad frames.

use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{Server, Ws};

#[tokio::test]
async fn subscribe_receive_unsubscribe_and_ping() {
    let server = Server::start().await;
    let mut ws = Ws::connect(&server).await;
    let frames = ws.subscribe(1, "user:7", None).await;
    let subscribed = frames.last().expect("reply");
    assert_eq!(subscribed["type"], "subscribed");
    assert_eq!(subscribed["id"], 1);
    assert_eq!(subscribed["channel"], "user:7");
    assert_eq!(subscribed["offset"], 0);
    assert!(subscribed["epoch"].is_string());
    for i in 1..=20 {
        server.publish("user:7", json!({"i": i})).await;
    }
    for expected in 1..=20 {
        let frame = ws.next().await;
        assert_eq!(frame["type"], "message");
        assert_eq!(frame["channel"], "user:7");
        assert_eq!(frame["offset"], expected);
        assert_eq!(frame["data"], json!({"i": expected}));
        assert!(frame["correlation_id"].is_string() && frame["published_at"].is_string());
    }
    ws.send(json!({"op": "ping", "id": 3})).await;
    assert_eq!(ws.next().await, json!({"type": "pong", "id": 3}));
    ws.send(json!({"op": "unsubscribe", "id": 4, "channel": "user:7"})).await;
    assert_eq!(ws.next().await, json!({"type": "unsubscribed", "id": 4, "channel": "user:7"}));
    server.publish("user:7", json!("after")).await;
    ws.send(json!({"op": "ping", "id": 5})).await;
    assert_eq!(ws.next().await, json!({"type": "pong", "id": 5}), "nothing arrives after unsubscribe");
    assert_eq!(server.state.hub().channel_count(), 0);
}

#[tokio::test]
async fn since_replays_missed_publications_before_the_subscribed_reply() {
    let server = Server::start().await;
    let mut ws = Ws::connect(&server).await;
    let subscribed = ws.subscribe(1, "c", None).await.pop().expect("reply");
    let epoch = subscribed["epoch"].clone();
    drop(ws);
    for i in 1..=4 {
        server.publish("c", json!(i)).await;
    }
    let mut ws = Ws::connect(&server).await;
    let frames = ws.subscribe(2, "c", Some(json!({"epoch": epoch, "offset": 1}))).await;
    let offsets: Vec<_> = frames.iter().filter(|f| f["type"] == "message").map(|f| f["offset"].clone()).collect();
    assert_eq!(offsets, vec![json!(2), json!(3), json!(4)]);
    let last = frames.last().expect("reply");
    assert_eq!((last["type"].as_str(), last["offset"].as_u64()), (Some("subscribed"), Some(4)));
    server.publish("c", json!(5)).await;
    assert_eq!(ws.next().await["offset"], 5);

    // A position of another epoch cannot be replayed: a reset, then (history still holding the whole
    // current epoch) every publication of the current epoch from its start.
    let frames = Ws::connect(&server).await.subscribe(3, "c", Some(json!({"epoch": "gone", "offset": 1}))).await;
    assert_eq!(frames[0]["type"], "reset");
    assert_eq!(frames[0]["reason"], "history_gone");
    assert_eq!((&frames[0]["epoch"], &frames[0]["offset"]), (&epoch, &json!(0)));
    let offsets: Vec<_> = frames[1..6].iter().map(|f| (f["type"].clone(), f["offset"].clone())).collect();
    assert_eq!(offsets, (1..=5).map(|o| (json!("message"), json!(o))).collect::<Vec<_>>());
    assert_eq!((frames[6]["type"].as_str(), frames[6]["offset"].as_u64()), (Some("subscribed"), Some(5)));
}

#[tokio::test]
async fn bad_frames_get_error_replies_and_the_socket_stays_open() {
    let server = Server::with(|config| config.limits.max_channels_per_connection = 2).await;
    let mut ws = Ws::connect(&server).await;
    let check = |frame: serde_json::Value, code: &str, id: serde_json::Value| {
        assert_eq!(frame["type"], "error", "{frame}");
        assert_eq!(frame["code"], code, "{frame}");
        assert_eq!(frame["id"], id, "{frame}");
        assert!(frame["message"].is_string());
    };
    ws.send_raw(Message::text("{not json")).await;
    check(ws.next().await, "malformed_json", json!(null));
    ws.send(json!({"op": "dance", "id": 9})).await;
    check(ws.next().await, "unknown_op", json!(9));
    ws.send(json!({"id": 10})).await;
    check(ws.next().await, "invalid_frame", json!(10));
    ws.send(json!({"op": "subscribe", "id": 11})).await;
    check(ws.next().await, "invalid_frame", json!(11));
    ws.send(json!({"op": "subscribe", "id": "twelve", "channel": "a"})).await;
    check(ws.next().await, "invalid_frame", json!("twelve"));
    ws.send(json!({"op": "subscribe", "id": 13, "channel": "bad channel"})).await;
    check(ws.next().await, "invalid_channel", json!(13));
    ws.send(json!({"op": "subscribe", "id": 14, "channel": "a", "since": {"epoch": "e!", "offset": 1}})).await;
    check(ws.next().await, "invalid_cursor", json!(14));
    ws.send(json!({"op": "subscribe", "id": 15, "channel": "a", "since": {"epoch": "e", "offset": -1}})).await;
    check(ws.next().await, "invalid_frame", json!(15));
    ws.send_raw(Message::binary(vec![1, 2, 3])).await;
    check(ws.next().await, "unsupported_frame", json!(null));
    ws.send(json!({"op": "unsubscribe", "id": 16, "channel": "a"})).await;
    check(ws.next().await, "bad_request", json!(16));
    assert_eq!(ws.subscribe(17, "a", None).await[0]["type"], "subscribed");
    check(ws.subscribe(18, "a", None).await.remove(0), "bad_request", json!(18));
    assert_eq!(ws.subscribe(19, "b", None).await[0]["type"], "subscribed");
    check(ws.subscribe(20, "c", None).await.remove(0), "limit_exceeded", json!(20));
    ws.send(json!({"op": "ping", "id": 21})).await;
    assert_eq!(ws.next().await, json!({"type": "pong", "id": 21}));
}

#[tokio::test]
async fn an_oversized_frame_is_refused_with_close_code_1009() {
    let server = Server::with(|config| config.limits.ws_max_message_bytes = 1024).await;
    let mut ws = Ws::connect(&server).await;
    let big = json!({"op": "ping", "id": 1, "pad": "x".repeat(4096)});
    ws.send(big).await;
    let (code, reason) = ws.close_frame().await;
    assert_eq!((code, reason.as_str()), (1009, "frame_too_large"));
}

#[tokio::test]
async fn a_websocket_client_that_cannot_keep_up_is_closed_and_resumes_without_loss() {
    use futures_util::StreamExt;
    let server = Server::with(|config| {
        config.limits.queue_capacity = 16;
        config.limits.write_timeout_secs = 1;
        config.history.size = 3000;
        // 2,000 publications of 10 KB stay in history (more than the default 8 MiB bound).
        config.history.max_bytes = 64 * 1024 * 1024;
    })
    .await;
    let mut slow = Ws::connect(&server).await;
    let subscribed = slow.subscribe(1, "slow:ws", None).await;
    let epoch = subscribed.last().map(|reply| reply["epoch"].clone()).expect("subscribed");
    // The client stops reading while large publications pile up for it.
    let payload = "x".repeat(10_000);
    for i in 0..2000 {
        server.publish("slow:ws", json!({"i": i, "pad": payload})).await;
    }
    let hub = server.state.hub();
    assert_eq!(hub.stats().slow_consumer_disconnects, 1, "the slow client was closed");
    crate::harness::eventually("slow connection released", || hub.connection_count() == 0).await;
    // What reached the client before it was closed is in order; it resumes from the last one it holds.
    let mut held = 0;
    while let Ok(Some(Ok(message))) = tokio::time::timeout(crate::harness::TIMEOUT, slow.socket.next()).await {
        if let Message::Text(text) = message {
            let frame: serde_json::Value = serde_json::from_str(text.as_str()).expect("JSON");
            if frame["type"] == "message" {
                assert_eq!(frame["data"]["i"], held, "in order, nothing skipped");
                held += 1;
            }
        }
    }
    assert!(held < 2000, "the client was closed before it had everything ({held})");
    let mut again = Ws::connect(&server).await;
    let frames = again.subscribe(2, "slow:ws", Some(json!({"epoch": epoch, "offset": held}))).await;
    let replayed: Vec<_> = frames.iter().filter(|f| f["type"] == "message").collect();
    assert_eq!(replayed.len() as u64, 2000 - held, "replay covers exactly what was missed");
    assert!(replayed.iter().zip(held..).all(|(f, i)| f["data"]["i"] == i), "resumed in order without loss");
}
