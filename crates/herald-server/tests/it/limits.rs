//! Limits and browser access: connections per user, publish rate per API key, CORS.

use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{Server, client, error_code, raw_exchange, read_json};

const SECRET: &str = "0123456789abcdef0123456789abcdef-limits";

fn token(sub: &str) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &json!({"sub": sub, "exp": 4_000_000_000u64}), &key)
        .expect("token")
}

#[tokio::test]
async fn a_user_may_hold_only_so_many_connections_per_node() {
    let server = Server::with(|config| {
        config.jwt_hs256_secret = Some(SECRET.into());
        config.limits.max_connections_per_user = 2;
    })
    .await;
    let url = server.url(&format!("/v1/sse?channel=user:ann&token={}", token("ann")));
    let first = client().get(&url).send().await.expect("first");
    let second = client().get(&url).send().await.expect("second");
    assert_eq!((first.status(), second.status()), (StatusCode::OK, StatusCode::OK));
    let (status, body) = read_json(client().get(&url).send().await.expect("third")).await;
    assert_eq!((status, error_code(&body)), (StatusCode::TOO_MANY_REQUESTS, "limit_exceeded"));
    let other = client().get(server.url(&format!("/v1/sse?channel=user:ben&token={}", token("ben")))).send().await;
    assert_eq!(other.expect("other user").status(), StatusCode::OK, "the limit is per user");
    drop(first);
    let deadline = tokio::time::Instant::now() + crate::harness::TIMEOUT;
    loop {
        let again = client().get(&url).send().await.expect("again");
        if again.status() == StatusCode::OK {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the slot of a closed connection was never freed");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn each_api_key_has_a_publish_rate_and_excess_gets_429_with_retry_after() {
    let server = Server::with(|config| {
        config.api_keys = vec![format!("billing={}", "b".repeat(20)), "c".repeat(20)];
        config.limits.publish_rate_per_key = 5;
    })
    .await;
    let publish = |key: String| {
        let request = client()
            .post(server.url("/v1/publish"))
            .header("authorization", format!("Bearer {key}"))
            .json(&json!({"channel": "rate", "data": 1}));
        async move { request.send().await.expect("publish") }
    };
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..8 {
        let response = publish("b".repeat(20)).await;
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            retry_after = response.headers().get("retry-after").cloned();
        }
        statuses.push(response.status());
    }
    assert_eq!(statuses.iter().filter(|s| **s == StatusCode::OK).count(), 5, "{statuses:?}");
    assert!(retry_after.is_some(), "429 carries Retry-After");
    assert_eq!(publish("c".repeat(20)).await.status(), StatusCode::OK, "another key has its own budget");
}

#[tokio::test]
async fn browsers_on_allowed_origins_may_connect_and_publish() {
    let server = Server::with(|config| config.cors_allowed_origins = vec!["https://app.example".into()]).await;
    let sse = client()
        .get(server.url("/v1/sse?channel=cors"))
        .header("origin", "https://app.example")
        .send()
        .await
        .expect("SSE");
    assert_eq!(
        sse.headers().get("access-control-allow-origin").map(|v| v.as_bytes()),
        Some(&b"https://app.example"[..])
    );
    let foreign =
        client().get(server.url("/v1/sse?channel=cors")).header("origin", "https://evil.example").send().await;
    assert!(foreign.expect("SSE").headers().get("access-control-allow-origin").is_none());
    let preflight = client()
        .request(reqwest::Method::OPTIONS, server.url("/v1/publish"))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type,authorization")
        .send()
        .await
        .expect("preflight");
    assert!(preflight.status().is_success());
    assert_eq!(preflight.headers()["access-control-allow-origin"], "https://app.example");
}

#[tokio::test]
async fn a_node_accepts_only_so_many_connections() {
    let server = Server::with(|config| config.limits.max_connections = 2).await;
    let first = client().get(server.url("/v1/sse?channel=a")).send().await.expect("first");
    let (_ws, _) = tokio_tungstenite::connect_async(server.ws_url()).await.expect("second, over WebSocket");
    assert_eq!(first.status(), StatusCode::OK);
    let response = client().get(server.url("/v1/sse?channel=a")).send().await.expect("third");
    assert!(response.headers().contains_key("retry-after"), "429 carries Retry-After");
    let (status, body) = read_json(response).await;
    assert_eq!((status, error_code(&body)), (StatusCode::TOO_MANY_REQUESTS, "limit_exceeded"));
    let refused = tokio_tungstenite::connect_async(server.ws_url()).await;
    let Err(tokio_tungstenite::tungstenite::Error::Http(response)) = refused else {
        panic!("a WebSocket upgrade past the limit must be refused with an HTTP answer")
    };
    assert_eq!(response.status().as_u16(), 429);
    let body: serde_json::Value = serde_json::from_slice(response.body().as_deref().unwrap_or_default()).expect("JSON");
    assert_eq!(error_code(&body), "limit_exceeded");
    let (status, _) = server.get("/healthz").await;
    assert_eq!(status, StatusCode::OK, "the server API is not a connection that counts");
}

#[tokio::test]
async fn oversized_malformed_and_slow_request_heads_get_json_errors() {
    let server = Server::with(|config| {
        config.limits.max_header_bytes = 4096;
        config.limits.header_read_timeout_secs = 1;
    })
    .await;
    let big = format!("GET /v1/sse?channel=a HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n", "p".repeat(5000));
    let answer = raw_exchange(&server, big.as_bytes(), true).await;
    assert_eq!(answer.as_ref().map(|(s, b)| (*s, error_code(b))), Some((431, "headers_too_large")));
    let endless = format!("POST /v1/publish HTTP/1.1\r\nHost: x\r\nX-Pad: {}", "p".repeat(8000));
    let answer = raw_exchange(&server, endless.as_bytes(), true).await;
    assert_eq!(answer.as_ref().map(|(s, b)| (*s, error_code(b))), Some((431, "headers_too_large")));
    let many: String = (0..80).map(|i| format!("X-H{i}: v\r\n")).collect();
    let answer = raw_exchange(&server, format!("GET /healthz HTTP/1.1\r\n{many}\r\n").as_bytes(), true).await;
    assert_eq!(answer.as_ref().map(|(s, b)| (*s, error_code(b))), Some((431, "headers_too_large")));
    let answer = raw_exchange(&server, b"HELLO THERE\r\n\r\n", true).await;
    assert_eq!(answer.as_ref().map(|(s, b)| (*s, error_code(b))), Some((400, "bad_request")));
    // A client that starts a request and stalls is answered 408 once the header timeout passes.
    let answer = raw_exchange(&server, b"GET /v1/sse?channel=a HTTP/1.1\r\nHost:", true).await;
    assert_eq!(answer.as_ref().map(|(s, b)| (*s, error_code(b))), Some((408, "request_timeout")));
    // A connection that never sends anything is closed without an answer.
    assert_eq!(raw_exchange(&server, b"", true).await, None);
    let metrics = client().get(server.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
    for line in [
        "herald_connections_refused_total{reason=\"headers_too_large\"} 3",
        "herald_connections_refused_total{reason=\"bad_request\"} 1",
        "herald_connections_refused_total{reason=\"request_timeout\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
}

#[tokio::test]
async fn an_idle_kept_alive_api_connection_is_closed_after_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = Server::with(|config| config.limits.header_read_timeout_secs = 1).await;
    let mut socket = tokio::net::TcpStream::connect(server.addr).await.expect("connect");
    socket.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    let mut answer = Vec::new();
    let mut buffer = [0u8; 1024];
    while !String::from_utf8_lossy(&answer).contains("\r\n\r\n") {
        let read = tokio::time::timeout(crate::harness::TIMEOUT, socket.read(&mut buffer)).await.expect("answer");
        let read = read.expect("read");
        assert!(read > 0, "closed before answering");
        answer.extend_from_slice(&buffer[..read]);
    }
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    // The connection stays open for another request, but not forever.
    let rest = tokio::time::timeout(crate::harness::TIMEOUT, socket.read_to_end(&mut answer)).await;
    assert!(rest.is_ok(), "an idle kept-alive connection must be closed by the server");
}

#[tokio::test]
async fn sockets_past_the_cap_are_answered_429_and_closed() {
    let server = Server::with(|config| config.limits.max_sockets = Some(2)).await;
    let first = client().get(server.url("/v1/sse?channel=a")).send().await.expect("first");
    let second = client().get(server.url("/v1/sse?channel=b")).send().await.expect("second");
    assert_eq!((first.status(), second.status()), (StatusCode::OK, StatusCode::OK));
    let answer = raw_exchange(&server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", false).await;
    assert_eq!(answer.as_ref().map(|(s, b)| (*s, error_code(b))), Some((429, "limit_exceeded")));
    drop(first);
    let deadline = tokio::time::Instant::now() + crate::harness::TIMEOUT;
    loop {
        let answer =
            raw_exchange(&server, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", false).await;
        if answer.is_some_and(|(status, _)| status == 200) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "a closed socket's slot was never freed");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // The open SSE stream and the metrics request itself (earlier sockets close as their tasks end).
    let deadline = tokio::time::Instant::now() + crate::harness::TIMEOUT;
    let http = client();
    let metrics = loop {
        // Refused (429, or an answer before the request was sent) while an earlier socket still counts.
        let metrics = match http.get(server.url("/metrics")).send().await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(error) => error.to_string(),
        };
        if metrics.contains("herald_sockets_open 2\n") {
            break metrics;
        }
        assert!(tokio::time::Instant::now() < deadline, "herald_sockets_open never settled at 2: {metrics}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    // At least the refusal above (retries while a slot was being freed may add more).
    let refused = metrics
        .lines()
        .find_map(|line| line.strip_prefix("herald_connections_refused_total{reason=\"max_sockets\"} "))
        .and_then(|value| value.parse::<u64>().ok());
    assert!(refused.is_some_and(|n| n >= 1), "{metrics}");
    drop(second);
}

/// A publish head announcing `length` bytes of JSON body.
fn publish_head(length: u64) -> String {
    format!(
        "POST /v1/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )
}

#[tokio::test]
async fn a_body_that_stalls_or_trickles_gets_408_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = Server::start().await;
    // One byte of a hundred, then nothing: refused after the grace second, not after the whole timeout.
    let started = std::time::Instant::now();
    let answer = raw_exchange(&server, format!("{}{{", publish_head(100)).as_bytes(), true).await;
    assert_eq!(answer.as_ref().map(|(s, b)| (*s, error_code(b))), Some((408, "request_timeout")), "{answer:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "took {:?}", started.elapsed());

    // One byte every 100 ms (10 B/s, far under the 1 KiB/s floor): refused while it is still sending.
    let mut socket = tokio::net::TcpStream::connect(server.addr).await.expect("connect");
    socket.write_all(publish_head(100).as_bytes()).await.expect("head");
    let (mut reader, mut writer) = socket.into_split();
    let drip = tokio::spawn(async move {
        let mut interval = tokio::time::interval(std::time::Duration::from_millis(100));
        for _ in 0..100 {
            interval.tick().await;
            if writer.write_all(b" ").await.is_err() {
                return false;
            }
        }
        true
    });
    let mut answer = Vec::new();
    tokio::time::timeout(crate::harness::TIMEOUT, reader.read_to_end(&mut answer))
        .await
        .expect("the server ends the exchange")
        .expect("read");
    let answer = crate::harness::parse_answer(&answer);
    assert_eq!(answer.as_ref().map(|(s, b)| (*s, error_code(b))), Some((408, "request_timeout")), "{answer:?}");
    drip.abort();
}

#[tokio::test]
async fn a_body_must_arrive_within_the_body_timeout() {
    let server = Server::with(|config| {
        config.limits.body_read_timeout_secs = 1;
        config.limits.min_body_rate_bytes_per_sec = 0;
    })
    .await;
    let answer = raw_exchange(&server, format!("{}{{", publish_head(100)).as_bytes(), true).await;
    let (status, body) = answer.expect("an answer");
    assert_eq!((status, error_code(&body)), (408, "request_timeout"));
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("within 1 s")), "{body}");
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused_with_413_before_it_is_read() {
    let server = Server::with(|config| config.limits.max_body_bytes = 1024).await;
    // Announced: answered at once, without a byte of the body sent.
    let started = std::time::Instant::now();
    let answer = raw_exchange(&server, publish_head(99_999_999_999).as_bytes(), true).await;
    assert_eq!(answer.as_ref().map(|(s, b)| (*s, error_code(b))), Some((413, "body_too_large")), "{answer:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(3), "took {:?}", started.elapsed());
    // Chunked: refused once it grows past the limit.
    let mut chunked =
        "POST /v1/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            .to_owned();
    for _ in 0..4 {
        chunked.push_str(&format!("200\r\n{}\r\n", "x".repeat(512)));
    }
    chunked.push_str("0\r\n\r\n");
    let answer = raw_exchange(&server, chunked.as_bytes(), false).await;
    assert_eq!(answer.as_ref().map(|(s, b)| (*s, error_code(b))), Some((413, "body_too_large")), "{answer:?}");
    // A later request on a kept-alive connection gets the same answer (from the handler).
    use tokio::io::AsyncWriteExt;
    let mut socket = tokio::net::TcpStream::connect(server.addr).await.expect("connect");
    let body = r#"{"channel":"a","data":1}"#;
    socket.write_all(format!("{}{body}", publish_head(body.len() as u64)).as_bytes()).await.expect("first");
    assert_eq!(crate::harness::read_answer(&mut socket).await.0, 200);
    socket.write_all(publish_head(99_999_999_999).as_bytes()).await.expect("second");
    let (status, _, answer) = crate::harness::read_answer(&mut socket).await;
    assert_eq!((status, error_code(&answer)), (413, "body_too_large"));
}
