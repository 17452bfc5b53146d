//! Limits and browser access: connections per user, publish rate per API key, CORS.

use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{Server, client, error_code, read_json};

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
