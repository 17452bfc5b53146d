//! Connection lifecycle: nothing left behind after disconnects, slow clients closed and resumable,
//! shutdown ends every stream.

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{Server, Sse, Ws, client, eventually};

const CHANNELS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_connect_disconnect_cycles_leave_nothing_behind() {
    let server = Server::start().await;
    let mut cycles = FuturesUnordered::new();
    let mut done = 0;
    for i in 0..2500usize {
        let server = &server;
        cycles.push(async move {
            let channel = format!("c:{}", i % CHANNELS);
            if i % 5 == 0 {
                let mut ws = Ws::connect(server).await;
                ws.subscribe(1, &channel, None).await;
                ws.subscribe(2, "shared", None).await;
            } else {
                let query = format!("channel={channel}&channel=shared");
                let (_sse, _) = Sse::open(server, &query, None).await;
            }
        });
        if cycles.len() >= 50 {
            cycles.next().await;
            done += 1;
        }
    }
    while cycles.next().await.is_some() {
        done += 1;
    }
    assert_eq!(done, 2500);
    let hub = server.state.hub();
    eventually("every connection gone", || hub.connection_count() == 0 && hub.channel_count() == 0).await;
    assert_eq!(hub.stats().connections, 0);
    assert_eq!(hub.stats().connections_opened, 2500);
    for i in 0..CHANNELS {
        let (_, presence) = server.get(&format!("/v1/presence?channel=c:{i}")).await;
        assert_eq!(presence["connections"], json!([]), "presence left in c:{i}");
    }
    let (_, presence) = server.get("/v1/presence?channel=shared").await;
    assert_eq!(presence["connections"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_cannot_keep_up_is_closed_and_resumes_without_loss() {
    let server = Server::with(|config| {
        config.limits.queue_capacity = 16;
        config.history.size = 3000;
        // 2,000 publications of 10 KB stay in history (more than the default 8 MiB bound).
        config.history.max_bytes = 64 * 1024 * 1024;
    })
    .await;
    // A raw client that reads the response head and the connected event, then stops reading.
    let mut socket = tokio::net::TcpStream::connect(server.addr).await.expect("connect");
    socket.write_all(b"GET /v1/sse?channel=slow HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("request");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"herald.connected\ndata: ") {
        socket.read_exact(&mut byte).await.expect("read head");
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head);
    let cursor = text.lines().find_map(|l| l.strip_prefix("id: ")).expect("connected id").to_owned();
    let payload = "x".repeat(10_000);
    for i in 0..2000 {
        server.publish("slow", json!({"i": i, "pad": payload})).await;
    }
    let hub = server.state.hub();
    assert_eq!(hub.stats().slow_consumer_disconnects, 1, "the slow client was closed");
    eventually("slow connection released", || hub.connection_count() == 0).await;
    drop(socket);
    let (mut sse, _) = Sse::open(&server, "channel=slow", Some(&cursor)).await;
    let data = sse.expect_offsets("slow", 0, 2000).await;
    assert!(data.iter().enumerate().all(|(i, d)| d["i"] == i), "resumed in order without loss");
}

#[tokio::test]
async fn shutdown_ends_every_stream_and_refuses_new_ones() {
    let server = Server::with(|config| config.drain_window_ms = 100).await;
    let (mut sse, _) = Sse::open(&server, "channel=a", None).await;
    let mut ws = Ws::connect(&server).await;
    ws.subscribe(1, "a", None).await;
    server.stop();
    assert!(sse.until_closed().await.is_empty(), "the stream ends without further events");
    let (code, reason) = ws.close_frame().await;
    assert_eq!((code, reason.as_str()), (1001, "shutting_down"));
    assert!(server.state.draining());
    // A new client is refused: the listener is closed (or, were it still open, the node answers 503).
    match client().get(server.url("/v1/sse?channel=a")).send().await {
        Err(error) => assert!(error.is_connect(), "{error}"),
        Ok(response) => assert_eq!(response.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_spreads_reconnects_over_the_drain_window() {
    let server = Server::with(|config| config.drain_window_ms = 1000).await;
    let mut streams = Vec::new();
    for _ in 0..40 {
        streams.push(Sse::open(&server, "channel=drain", None).await.0);
    }
    let started = std::time::Instant::now();
    server.stop();
    let ends = futures_util::future::join_all(streams.iter_mut().map(|sse| async move {
        sse.until_closed().await;
        started.elapsed()
    }))
    .await;
    let first = ends.iter().min().copied().unwrap_or_default();
    let last = ends.iter().max().copied().unwrap_or_default();
    // Told to leave a few at a time over the window, not all at once (a storm for the other nodes).
    assert!(last - first >= std::time::Duration::from_millis(500), "closes spanned only {:?}", last - first);
    assert!(server.state.draining());
}
