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
    // An id that is not a u64 is not echoed (a number beyond u64 would come back as a float).
    ws.send(json!({"op": "subscribe", "id": "twelve", "channel": "a"})).await;
    check(ws.next().await, "invalid_frame", json!(null));
    for id in ["18446744073709551616", "-1", "1.5", "[1]"] {
        ws.send_raw(Message::text(format!(r#"{{"op":"subscribe","id":{id},"channel":"a"}}"#))).await;
        check(ws.next().await, "invalid_frame", json!(null));
    }
    ws.send_raw(Message::text(r#"{"op":"dance","id":18446744073709551615}"#)).await;
    check(ws.next().await, "unknown_op", json!(u64::MAX));
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

const SECRET: &str = "0123456789abcdef0123456789abcdef-ws-test";

fn token(claims: serde_json::Value) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).expect("token")
}

fn in_ten_minutes() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) + 600
}

#[tokio::test]
async fn a_refresh_that_narrows_the_grants_ends_the_subscriptions_it_no_longer_covers() {
    let server = Server::with(|config| config.jwt_hs256_secret = Some(SECRET.into())).await;
    let wide = token(json!({"sub": "ann", "exp": in_ten_minutes(), "channels": ["chat:*", "team:red"]}));
    let (socket, _) = tokio_tungstenite::connect_async(format!("{}?token={wide}", server.ws_url())).await.expect("WS");
    let mut ws = Ws { socket };
    for (id, channel) in [(1, "chat:9"), (2, "team:red"), (3, "user:ann")] {
        assert_eq!(ws.subscribe(id, channel, None).await.last().expect("reply")["type"], "subscribed", "{channel}");
    }
    server.publish("chat:9", json!("before")).await;
    assert_eq!(ws.next().await["data"], "before");
    let narrow = token(json!({"sub": "ann", "exp": in_ten_minutes(), "channels": ["team:red"]}));
    ws.send(json!({"op": "refresh", "id": 4, "token": narrow})).await;
    assert_eq!(ws.next().await, json!({"type": "unsubscribed", "channel": "chat:9", "reason": "permission_revoked"}));
    assert_eq!(ws.next().await["type"], "refreshed");
    server.publish("chat:9", json!("after")).await;
    server.publish("team:red", json!("still granted")).await;
    server.publish("user:ann", json!("own channel")).await;
    let (first, second) = (ws.next().await, ws.next().await);
    assert_eq!((&first["channel"], &first["data"]), (&json!("team:red"), &json!("still granted")), "{first}");
    assert_eq!((&second["channel"], &second["data"]), (&json!("user:ann"), &json!("own channel")), "{second}");
    let (_, presence) = server.get("/v1/presence?channel=chat:9").await;
    assert_eq!(presence["connections"], json!([]), "the connection left the channel's presence");
    assert_eq!(server.state.hub().channel_count(), 2, "and the channel itself");
    let again = ws.subscribe(5, "chat:9", None).await;
    assert_eq!((again[0]["type"].as_str(), again[0]["code"].as_str()), (Some("error"), Some("forbidden")));
}

#[tokio::test]
async fn a_client_close_is_echoed_before_the_socket_closes() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let server = Server::start().await;
    let mut ws = Ws::connect(&server).await;
    assert_eq!(ws.subscribe(1, "bye", None).await.last().expect("reply")["type"], "subscribed");
    ws.send_raw(Message::Close(Some(CloseFrame { code: CloseCode::Normal, reason: "done".into() }))).await;
    let echoed = tokio::time::timeout(crate::harness::TIMEOUT, ws.socket.next()).await.expect("an answer");
    let Some(Ok(Message::Close(Some(frame)))) = echoed else { panic!("expected the Close echoed, got {echoed:?}") };
    assert_eq!(frame.code, CloseCode::Normal);
    let end = tokio::time::timeout(crate::harness::TIMEOUT, ws.socket.next()).await.expect("the end");
    assert!(end.is_none(), "a clean end after the closing handshake, got {end:?}");
    crate::harness::eventually("the connection left", || server.state.hub().connection_count() == 0).await;
}

/// A WebSocket after a hand-made upgrade, for frames tungstenite's client will not send.
struct RawWs {
    socket: tokio::net::TcpStream,
}

impl RawWs {
    async fn connect(server: &Server) -> RawWs {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut socket = tokio::net::TcpStream::connect(server.addr).await.expect("connect");
        let request = "GET /v1/ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                       Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        socket.write_all(request.as_bytes()).await.expect("upgrade");
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            let read = tokio::time::timeout(crate::harness::TIMEOUT, socket.read(&mut byte)).await.expect("head");
            assert_eq!(read.expect("read"), 1, "closed during the upgrade");
            head.push(byte[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
        RawWs { socket }
    }

    /// Writes one frame: `first` is FIN, RSV and opcode; masked unless `mask` is `None`.
    async fn frame(&mut self, first: u8, payload: &[u8], mask: Option<[u8; 4]>) {
        use tokio::io::AsyncWriteExt;
        let mut frame = vec![first];
        let masked = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => frame.push(masked | n as u8),
            n if n <= 0xffff => {
                frame.push(masked | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(masked | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        match mask {
            Some(key) => {
                frame.extend_from_slice(&key);
                frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
            }
            None => frame.extend_from_slice(payload),
        }
        self.socket.write_all(&frame).await.expect("write frame");
    }

    /// Reads server frames until a Close; its code. Panics if the socket ends without one.
    async fn close_code(&mut self) -> u16 {
        use tokio::io::AsyncReadExt;
        loop {
            let mut header = [0u8; 2];
            let read = tokio::time::timeout(crate::harness::TIMEOUT, self.socket.read_exact(&mut header)).await;
            read.expect("a frame in time").expect("the socket ended without a Close frame");
            assert_eq!(header[1] & 0x80, 0, "server frames are unmasked");
            let length = match header[1] & 0x7f {
                126 => {
                    let mut extended = [0u8; 2];
                    self.socket.read_exact(&mut extended).await.expect("length");
                    u64::from(u16::from_be_bytes(extended))
                }
                127 => {
                    let mut extended = [0u8; 8];
                    self.socket.read_exact(&mut extended).await.expect("length");
                    u64::from_be_bytes(extended)
                }
                n => u64::from(n),
            };
            let mut payload = vec![0u8; length as usize];
            self.socket.read_exact(&mut payload).await.expect("payload");
            if header[0] & 0x0f == 0x8 {
                assert!(payload.len() >= 2, "a Close frame with a code");
                return u16::from_be_bytes([payload[0], payload[1]]);
            }
        }
    }
}

#[tokio::test]
async fn protocol_violations_are_closed_with_the_rfc_6455_code() {
    let server = Server::with(|config| config.limits.ws_max_message_bytes = 1024).await;
    let key = Some([1, 2, 3, 4]);
    /// A name, the frame's first byte (FIN, RSV, opcode), its payload and mask, and the close code due.
    type Case = (&'static str, u8, Vec<u8>, Option<[u8; 4]>, u16);
    let cases: Vec<Case> = vec![
        ("ping over 125 bytes", 0x89, vec![b'p'; 126], key, 1002),
        ("text that is not UTF-8", 0x81, vec![0xff, 0xfe, b'{'], key, 1007),
        ("unmasked text", 0x81, br#"{"op":"ping"}"#.to_vec(), None, 1002),
        ("RSV1 set", 0xc1, br#"{"op":"ping"}"#.to_vec(), key, 1002),
        ("RSV3 set", 0x91, br#"{"op":"ping"}"#.to_vec(), key, 1002),
        ("reserved data opcode", 0x83, b"x".to_vec(), key, 1002),
        ("reserved control opcode", 0x8b, b"x".to_vec(), key, 1002),
        ("continuation without a start", 0x80, b"x".to_vec(), key, 1002),
        ("fragmented ping", 0x09, b"x".to_vec(), key, 1002),
        ("message over the limit", 0x81, vec![b' '; 2000], key, 1009),
        ("close with a reserved code", 0x88, 1005u16.to_be_bytes().to_vec(), key, 1002),
    ];
    for (name, first, payload, mask, expected) in cases {
        let mut ws = RawWs::connect(&server).await;
        ws.frame(first, &payload, mask).await;
        assert_eq!(ws.close_code().await, expected, "{name}");
    }
    // A fragmented text message whose pieces together are not UTF-8.
    let mut ws = RawWs::connect(&server).await;
    ws.frame(0x01, &[b'"', 0xe2], key).await;
    ws.frame(0x80, &[0x28, 0xa1, b'"'], key).await;
    assert_eq!(ws.close_code().await, 1007, "fragmented invalid UTF-8");
}
