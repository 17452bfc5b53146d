//! Requests Herald refuses itself: malformed framing, bare-LF heads, wrong body types, non-upgrades of
//! the WebSocket route. Every answer is the contract's JSON error with a fitting status.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{Server, TIMEOUT, client, error_code, parse_answer, raw_exchange, read_answer, read_json};

/// Sends `request` on a fresh connection; the status and error code of the JSON answer.
async fn refused(server: &Server, request: &str) -> (u16, String) {
    let (status, body) = raw_exchange(server, request.as_bytes(), true).await.expect("an answer");
    (status, error_code(&body).to_owned())
}

#[tokio::test]
async fn malformed_message_framing_gets_json_errors() {
    let server = Server::start().await;
    let publish = "POST /v1/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n";
    let cases = [
        (format!("{publish}Content-Length: 2\r\nContent-Length: 2\r\n\r\n{{}}"), 400, "bad_request"),
        (format!("{publish}Content-Length: 2\r\nContent-Length: 3\r\n\r\n{{}}"), 400, "bad_request"),
        (format!("{publish}Content-Length: -1\r\n\r\n"), 400, "bad_request"),
        (format!("{publish}Content-Length: 0x10\r\n\r\n"), 400, "bad_request"),
        (
            format!("{publish}Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n"),
            400,
            "bad_request",
        ),
        (format!("{publish}Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"), 501, "not_implemented"),
        (format!("{publish}Transfer-Encoding: identity\r\n\r\n"), 400, "bad_request"),
        (format!("{publish}Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n"), 400, "bad_request"),
        // Empty list elements: hyper refuses a trailing one with a bare 400, Herald refuses them all.
        (format!("{publish}Transfer-Encoding: chunked,\r\n\r\n0\r\n\r\n"), 400, "bad_request"),
        (format!("{publish}Transfer-Encoding: chunked, \r\n\r\n0\r\n\r\n"), 400, "bad_request"),
        (format!("{publish}Transfer-Encoding: chunked,,\r\n\r\n0\r\n\r\n"), 400, "bad_request"),
        (format!("{publish}Transfer-Encoding: , chunked\r\n\r\n0\r\n\r\n"), 400, "bad_request"),
        (format!("{publish}Transfer-Encoding: \r\n\r\n"), 400, "bad_request"),
        ("POST /v1/publish HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_owned(), 400, "bad_request"),
        ("GET /v1/sse?channel=a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello".to_owned(), 400, "bad_request"),
    ];
    for (request, status, code) in cases {
        assert_eq!(refused(&server, &request).await, (status, code.to_owned()), "{request:?}");
    }
    // The same well-formed request is accepted.
    let ok = format!(
        "{publish}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n18\r\n{}\r\n0\r\n\r\n",
        r#"{"channel":"a","data":1}"#
    );
    let (status, body) = raw_exchange(&server, ok.as_bytes(), true).await.expect("an answer");
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn a_head_with_bare_lf_line_ends_is_refused_at_once() {
    // The header timeout is long: an answer within it means the head was not left waiting.
    let server = Server::with(|config| config.limits.header_read_timeout_secs = 30).await;
    for request in [
        "GET /healthz HTTP/1.1\nHost: x\n\n",
        "GET /v1/sse?channel=a HTTP/1.1\r\nHost: x\n\r\n",
        "POST /v1/publish HTTP/1.1\r\nHost: x\rContent-Length: 0\r\n\r\n",
    ] {
        let started = Instant::now();
        assert_eq!(refused(&server, request).await, (400, "bad_request".to_owned()), "{request:?}");
        assert!(started.elapsed() < Duration::from_secs(5), "{request:?} took {:?}", started.elapsed());
    }
    // Line feeds inside a body are the body's business.
    let body = "{\n\"channel\": \"a\",\n\"data\": 1\n}";
    let request = format!(
        "POST /v1/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    assert_eq!(raw_exchange(&server, request.as_bytes(), true).await.map(|(s, _)| s), Some(200));
}

#[tokio::test]
async fn json_endpoints_require_a_json_content_type() {
    let server = Server::start().await;
    let post = |path: &str, content_type: Option<&str>, body: &str| {
        let mut request = client().post(server.url(path)).body(body.to_owned());
        if let Some(value) = content_type {
            request = request.header("content-type", value);
        }
        async move { read_json(request.send().await.expect("POST")).await }
    };
    let publish = r#"{"channel":"a","data":1}"#;
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        Some("application/jsonp"),
        Some("application/json; charset=latin1"),
        Some(""),
    ] {
        let (status, body) = post("/v1/publish", content_type, publish).await;
        assert_eq!(
            (status, error_code(&body)),
            (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            "{content_type:?}"
        );
    }
    for content_type in [
        "application/json",
        "Application/JSON",
        "application/json; charset=utf-8",
        "application/json;charset=\"UTF-8\"",
    ] {
        let (status, body) = post("/v1/publish", Some(content_type), publish).await;
        assert_eq!(status, StatusCode::OK, "{content_type}: {body}");
    }
    let (status, body) = post("/v1/broadcast", Some("text/plain"), r#"{"channels":["a"],"data":1}"#).await;
    assert_eq!((status, error_code(&body)), (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"));
    let (status, body) = post("/v1/disconnect", None, r#"{"user":"u"}"#).await;
    assert_eq!((status, error_code(&body)), (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"));
    let (status, _) = server.post("/v1/disconnect", json!({"user": "u"})).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn the_websocket_route_answers_non_upgrades_with_json() {
    let server = Server::start().await;
    let (status, body) =
        read_json(client().get(server.ws_url().replace("ws://", "http://")).send().await.expect("GET")).await;
    assert_eq!((status, error_code(&body)), (StatusCode::UPGRADE_REQUIRED, "upgrade_required"));
    let upgrade = "GET /v1/ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n";
    let cases = [
        (format!("{upgrade}Sec-WebSocket-Version: 13\r\n\r\n"), 400, "bad_request"),
        (
            format!("{upgrade}Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n"),
            426,
            "upgrade_required",
        ),
        ("GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n".to_owned(), 426, "upgrade_required"),
        ("POST /v1/ws HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".to_owned(), 405, "method_not_allowed"),
        ("GET /v1/nope HTTP/1.1\r\nHost: x\r\n\r\n".to_owned(), 404, "not_found"),
    ];
    for (request, status, code) in cases {
        // Half-closed after the request: the server ends a kept-alive connection once it answered.
        let (got, body) = raw_exchange(&server, request.as_bytes(), false).await.expect("an answer");
        assert_eq!((got, error_code(&body)), (status, code), "{request:?}");
    }
}

#[tokio::test]
async fn a_later_request_on_a_kept_alive_connection_that_cannot_be_parsed_gets_json_too() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = Server::start().await;
    let big = format!("X-Big: {}\r\n", "b".repeat(40 * 1024));
    let later = [
        ("GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n".to_owned(), 400, "bad_request"),
        ("GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n".to_owned(), 400, "bad_request"),
        ("GARBAGE\r\n\r\n".to_owned(), 400, "bad_request"),
        (format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{big}\r\n"), 431, "headers_too_large"),
    ];
    for (request, status, code) in later {
        let mut socket = tokio::net::TcpStream::connect(server.addr).await.expect("connect");
        socket.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
        let (first, _, _) = read_answer(&mut socket).await;
        assert_eq!(first, 200, "the first request is fine");
        socket.write_all(request.as_bytes()).await.expect("write");
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(TIMEOUT, socket.read_to_end(&mut answer)).await.expect("the server closes");
        let (got, body) = parse_answer(&answer).unwrap_or_else(|| panic!("an answer to {request:.60?}"));
        assert_eq!((got, error_code(&body)), (status, code), "{request:.60?}: {body}");
    }
}

#[tokio::test]
async fn options_requests_without_cors_are_ordinary_requests() {
    let server = Server::start().await;
    for (request, status, code) in [
        ("OPTIONS /v1/publish HTTP/1.1\r\nHost: x\r\n\r\n", 405, "method_not_allowed"),
        ("OPTIONS /nowhere HTTP/1.1\r\nHost: x\r\nAccess-Control-Request-Method: POST\r\n\r\n", 404, "not_found"),
    ] {
        let (got, body) = raw_exchange(&server, request.as_bytes(), false).await.expect("an answer");
        assert_eq!((got, error_code(&body)), (status, code), "{request:?}");
    }
}
