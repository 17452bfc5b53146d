//! The cost of authenticating a connection: SSE connections opened (request, subscribe,
//! `herald.connected`, close) per second on one node, anonymous, with a client token (HS256), and
//! through the connect proxy (a backend in this process, on loopback, answering every cookie with a
//! grant). Reports connections per second, the connect latency (p50, p99) and the node's CPU per
//! connection; the backend's own CPU is this process's and is not counted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::routing::post;
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::node::Node;

/// How a benchmark's clients authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Auth {
    /// No client authentication on the node.
    None,
    /// An HS256 token in `?token=` (one token, verified for every connection).
    Token,
    /// A session cookie the node's connect proxy sends to the backend.
    Proxy,
}

const SECRET: &str = "herald-bench-secret-of-at-least-32-bytes";

/// Opens `connections` SSE connections, `concurrency` at a time, each to its own channel of the
/// `bench` namespace, and closes each once `herald.connected` arrived. Prints one JSON line.
pub async fn run(herald: &str, auth: Auth, connections: usize, concurrency: usize) -> anyhow::Result<Value> {
    let backend = match auth {
        Auth::Proxy => Some(start_backend().await?),
        _ => None,
    };
    let proxy_url = backend.map(|address| format!("http://{address}/connect"));
    let mut env = vec![("HERALD_LIMITS__MAX_CONNECTIONS_PER_USER", "200000".to_owned())];
    match auth {
        Auth::None => {}
        Auth::Token => env.push(("HERALD_JWT_HS256_SECRET", SECRET.to_owned())),
        Auth::Proxy => env.push(("HERALD_PROXY__CONNECT_URL", proxy_url.clone().unwrap_or_default())),
    }
    // Every channel of the namespace is open to any client that authenticated (the point is the
    // authentication, not the rule).
    if auth != Auth::None {
        env.push(("HERALD_NAMESPACES__BENCH__SUBSCRIBE", "authenticated".to_owned()));
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let node = Node::start(herald, &env).await?;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "bench"}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )?;
    let http = reqwest::Client::builder().no_proxy().tcp_nodelay(true).http1_only().build()?;
    let next = Arc::new(AtomicUsize::new(0));
    let cpu_before = node.cpu_seconds()?;
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (http, next, base, token) = (http.clone(), next.clone(), node.url("/v1/sse"), token.clone());
        workers.push(tokio::spawn(async move {
            let mut latencies = hdrhistogram::Histogram::<u64>::new(3)?;
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= connections {
                    return Ok::<_, anyhow::Error>(latencies);
                }
                // The token is base64url and dots: nothing to escape in a query.
                let url = match auth {
                    Auth::Token => format!("{base}?channel=bench:{index}&token={token}"),
                    _ => format!("{base}?channel=bench:{index}"),
                };
                let mut request = http.get(url);
                if auth == Auth::Proxy {
                    request = request.header("cookie", format!("session=user-{}", index % 1000));
                }
                let begun = Instant::now();
                connected(request).await.with_context(|| format!("connection {index}"))?;
                latencies.record(begun.elapsed().as_micros() as u64)?;
            }
        }));
    }
    let mut latencies = hdrhistogram::Histogram::<u64>::new(3)?;
    for worker in workers {
        latencies.add(worker.await??)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = node.cpu_seconds()? - cpu_before;
    Ok(json!({
        "bench": "connect", "auth": format!("{auth:?}").to_lowercase(), "connections": connections,
        "concurrency": concurrency, "seconds": round3(elapsed),
        "connections_per_sec": (connections as f64 / elapsed).round(),
        "connect_p50_ms": round3(latencies.value_at_quantile(0.5) as f64 / 1e3),
        "connect_p99_ms": round3(latencies.value_at_quantile(0.99) as f64 / 1e3),
        "server_cpu_us_per_connection": round3(cpu * 1e6 / connections as f64),
    }))
}

/// Sends the request and reads the stream until `herald.connected`; dropping the body closes it.
async fn connected(request: reqwest::RequestBuilder) -> anyhow::Result<()> {
    let response = request.send().await?;
    if !response.status().is_success() {
        bail!("refused: {} {}", response.status(), response.text().await.unwrap_or_default());
    }
    let mut body = response.bytes_stream();
    let mut seen = Vec::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), body.next()).await? {
        seen.extend_from_slice(&chunk?);
        if memchr::memmem::find(&seen, b"event: herald.connected").is_some() {
            return Ok(());
        }
    }
    bail!("the stream ended before herald.connected")
}

/// The connect proxy's backend: every `session=<user>` cookie is that user, with `bench:*` granted;
/// no cookie is 401. Runs until this process exits.
async fn start_backend() -> anyhow::Result<SocketAddr> {
    async fn connect(body: axum::body::Bytes) -> axum::response::Response {
        use axum::response::IntoResponse;
        let call: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let cookies = call["cookies"].as_str().unwrap_or("");
        match cookies.split("; ").find_map(|c| c.strip_prefix("session=")) {
            Some(user) => axum::Json(json!({"user": user, "channels": ["bench:*"]})).into_response(),
            None => axum::http::StatusCode::UNAUTHORIZED.into_response(),
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let app = axum::Router::new().route("/connect", post(connect));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(address)
}

fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}
