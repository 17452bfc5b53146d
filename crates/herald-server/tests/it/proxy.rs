//! The connect and subscribe proxies against a real backend: a small axum application each test starts
//! on a free loopback port, which grants by session cookie and can be made slow, down, failing or
//! talking nonsense. Every failure must refuse the client with the documented error, never grant.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode as AxumStatus, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures_util::StreamExt;
use herald_server::Config;
use herald_server::config::NamespaceConfig;
use herald_server::credentials::SubscribeRule;
use jsonwebtoken::{EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::harness::{Server, Sse, TIMEOUT, Ws, client, error_code, eventually};

const SECRET: &str = "a-secret-of-at-least-32-bytes-for-hs256";

/// How the backend answers the connect proxy.
#[derive(Clone)]
enum Mode {
    /// By the `session` cookie: `banned` is 403, none is 401, any other name is granted with
    /// `user:<name>` implied by the namespace rule and `chat:*` in `channels`, expiring `expires_in`
    /// seconds after the answer.
    Sessions { expires_in: Option<u64>, cache_control: Option<&'static str> },
    /// Never answers.
    Slow,
    /// This status with this body.
    Answer(u16, &'static str),
}

/// The test's backend: what it was asked, and how it answers.
struct Backend {
    mode: Mutex<Mode>,
    connect_calls: Mutex<Vec<(Value, HeaderMap)>>,
    subscribe_calls: Mutex<Vec<Value>>,
}

impl Backend {
    fn connect_calls(&self) -> usize {
        self.connect_calls.lock().map(|calls| calls.len()).unwrap_or(0)
    }

    fn last_connect(&self) -> (Value, HeaderMap) {
        self.connect_calls.lock().expect("lock").last().cloned().expect("a connect call")
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().expect("lock") = mode;
    }
}

async fn connect(State(backend): State<Arc<Backend>>, headers: HeaderMap, body: String) -> Response {
    let call: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    backend.connect_calls.lock().expect("lock").push((call.clone(), headers));
    let mode = backend.mode.lock().expect("lock").clone();
    match mode {
        Mode::Slow => std::future::pending().await,
        Mode::Answer(status, body) => {
            let status = AxumStatus::from_u16(status).expect("status");
            (status, [(header::LOCATION, "http://127.0.0.1:1/")], body).into_response()
        }
        Mode::Sessions { expires_in, cache_control } => {
            let expires_at = expires_in.map(|seconds| now() + seconds);
            let cookies = call["cookies"].as_str().unwrap_or("");
            let session = cookies.split("; ").find_map(|c| c.strip_prefix("session=")).map(str::to_owned);
            match session.as_deref() {
                None => AxumStatus::UNAUTHORIZED.into_response(),
                Some("banned") => AxumStatus::FORBIDDEN.into_response(),
                Some(user) => {
                    let grant = json!({"user": user, "channels": ["chat:*"], "expires_at": expires_at});
                    let mut response = axum::Json(grant).into_response();
                    if let Some(value) = cache_control {
                        response.headers_mut().insert(header::CACHE_CONTROL, value.parse().expect("header"));
                    }
                    response
                }
            }
        }
    }
}

/// Allows `team:red` to `alice` only; `team:broken` answers 500, `team:odd` answers a JSON list.
async fn subscribe(State(backend): State<Arc<Backend>>, body: String) -> Response {
    let call: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    backend.subscribe_calls.lock().expect("lock").push(call.clone());
    match (call["user"].as_str(), call["channel"].as_str()) {
        (_, Some("team:broken")) => AxumStatus::INTERNAL_SERVER_ERROR.into_response(),
        (_, Some("team:odd")) => axum::Json(json!([])).into_response(),
        (Some("alice"), Some("team:red")) => axum::Json(json!({})).into_response(),
        _ => AxumStatus::FORBIDDEN.into_response(),
    }
}

/// Starts the backend on a free loopback port; it runs until the test's runtime ends.
async fn backend(mode: Mode) -> (Arc<Backend>, SocketAddr) {
    let backend = Arc::new(Backend {
        mode: Mutex::new(mode),
        connect_calls: Mutex::new(Vec::new()),
        subscribe_calls: Mutex::new(Vec::new()),
    });
    let app = axum::Router::new()
        .route("/connect", post(connect))
        .route("/subscribe", post(subscribe))
        .with_state(backend.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the backend");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (backend, address)
}

fn sessions() -> Mode {
    Mode::Sessions { expires_in: None, cache_control: None }
}

/// A node whose connect proxy is `backend`, with `x-tenant` forwarded and a short timeout.
async fn node(backend: SocketAddr, tweak: impl FnOnce(&mut Config)) -> Server {
    Server::with(move |config| {
        config.proxy.connect_url = Some(format!("http://{backend}/connect"));
        config.proxy.forward_headers = vec!["X-Tenant".into()];
        config.proxy.timeout_ms = 300;
        tweak(config);
    })
    .await
}

/// An SSE request with headers: 200 (the stream) or the error's status, `Retry-After` and body.
async fn sse_error(server: &Server, query: &str, headers: &[(&str, &str)]) -> (StatusCode, Option<String>, Value) {
    let mut request = client().get(server.url(&format!("/v1/sse?{query}")));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("GET /v1/sse");
    let status = response.status();
    assert_ne!(status, StatusCode::OK, "expected a refusal");
    let retry = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body = response.json().await.expect("a JSON error");
    (status, retry, body)
}

async fn open(server: &Server, query: &str, headers: &[(&str, &str)]) -> (Sse, Value) {
    let url = server.url(&format!("/v1/sse?{query}"));
    let mut sse = Sse::connect_with(&url, headers).await.unwrap_or_else(|e| panic!("SSE refused: {e:?}"));
    let (event, data) = sse.next().await;
    assert_eq!(event, "herald.connected", "{data}");
    (sse, data)
}

/// A WebSocket upgrade with a cookie: the socket, or the status it was refused with.
async fn ws_with_cookie(server: &Server, cookie: Option<&str>) -> Result<Ws, u16> {
    let mut request = server.ws_url().into_client_request().expect("request");
    if let Some(cookie) = cookie {
        request.headers_mut().insert(header::COOKIE, cookie.parse().expect("cookie"));
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => Ok(Ws { socket }),
        Err(tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
        Err(other) => panic!("WS connect failed: {other}"),
    }
}

async fn metric(server: &Server, line_start: &str) -> u64 {
    let text = client().get(server.url("/metrics")).send().await.expect("GET").text().await.expect("text");
    text.lines()
        .find(|line| line.starts_with(line_start))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0)
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_cookie_is_granted_or_refused_by_the_backend() {
    let (backend, address) = backend(sessions()).await;
    let server = node(address, |config| config.jwt_hs256_secret = Some(SECRET.into())).await;
    let cookie = [("cookie", "session=alice; theme=dark"), ("x-tenant", "acme"), ("x-correlation-id", "c-1")];
    let (mut sse, _) = open(&server, "channel=user:alice&channel=chat:1", &cookie).await;
    server.publish("chat:1", json!("hi")).await;
    assert_eq!(sse.expect_offsets("chat:1", 0, 1).await, vec![json!("hi")]);
    let (call, headers) = backend.last_connect();
    assert_eq!(call["channels"], json!(["chat:1", "user:alice"]), "{call}");
    assert_eq!(call["cookies"], "session=alice; theme=dark");
    assert_eq!(call["headers"], json!({"x-tenant": "acme"}), "only allow-listed headers");
    assert_eq!(call["correlation_id"], "c-1");
    assert!(call["remote_addr"].as_str().is_some_and(|a| a.starts_with("127.0.0.1:")), "{call}");
    assert_eq!(headers["x-correlation-id"], "c-1");
    assert_eq!(headers["content-type"], "application/json");

    // Only requested channels are subscribed, and each must be granted: the same 403 as a token's.
    let (status, _, body) = sse_error(&server, "channel=chat:1&channel=secret:1", &cookie).await;
    assert_eq!((status, error_code(&body)), (StatusCode::FORBIDDEN, "forbidden"), "{body}");
    let (status, _, body) = sse_error(&server, "channel=user:bob", &cookie).await;
    assert_eq!((status, error_code(&body)), (StatusCode::FORBIDDEN, "forbidden"), "{body}");
    // The backend's refusals.
    let (status, _, body) = sse_error(&server, "channel=chat:1", &[]).await;
    assert_eq!((status, error_code(&body)), (StatusCode::UNAUTHORIZED, "unauthenticated"), "{body}");
    let (status, _, body) = sse_error(&server, "channel=chat:1", &[("cookie", "session=banned")]).await;
    assert_eq!((status, error_code(&body)), (StatusCode::FORBIDDEN, "forbidden"), "{body}");

    // A token wins: the backend is not asked, and a bad token is not sent to it either.
    let calls = backend.connect_calls();
    let token =
        jsonwebtoken::encode(&Header::default(), &json!({"sub": "bob"}), &EncodingKey::from_secret(SECRET.as_bytes()))
            .expect("token");
    let (_bob, _) = open(&server, &format!("channel=user:bob&token={token}"), &cookie).await;
    let (status, _, body) = sse_error(&server, "channel=chat:1", &[("authorization", "Bearer nonsense")]).await;
    assert_eq!((status, error_code(&body)), (StatusCode::UNAUTHORIZED, "unauthenticated"), "{body}");
    assert_eq!(backend.connect_calls(), calls, "a request with a token never reaches the connect proxy");

    // WebSocket: the upgrade is identified by the backend (with no channels); later subscribes are
    // checked against its grant.
    assert_eq!(ws_with_cookie(&server, None).await.err(), Some(401));
    let mut ws = ws_with_cookie(&server, Some("session=alice")).await.expect("upgrade");
    assert_eq!(backend.last_connect().0["channels"], json!([]));
    let frames = ws.subscribe(1, "chat:7", None).await;
    assert_eq!(frames.last().map(|f| f["type"].clone()), Some(json!("subscribed")), "{frames:?}");
    let frames = ws.subscribe(2, "secret:1", None).await;
    assert_eq!(frames.last().map(|f| f["code"].clone()), Some(json!("forbidden")), "{frames:?}");

    assert!(metric(&server, "herald_proxy_requests_total{proxy=\"connect\",outcome=\"granted\"}").await >= 4);
    assert!(metric(&server, "herald_proxy_requests_total{proxy=\"connect\",outcome=\"refused\"}").await >= 2);
    assert!(metric(&server, "herald_proxy_duration_seconds_count{proxy=\"connect\"}").await >= 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_is_reused_only_when_the_backend_allows_it() {
    let (backend, address) = backend(sessions()).await;
    let server = node(address, |_| {}).await;
    let cookie = [("cookie", "session=alice")];
    for _ in 0..2 {
        open(&server, "channel=chat:1", &cookie).await;
    }
    assert_eq!(backend.connect_calls(), 2, "without max-age every connection asks");
    backend.set(Mode::Sessions { expires_in: None, cache_control: Some("max-age=60") });
    for _ in 0..3 {
        open(&server, "channel=chat:1", &cookie).await;
    }
    assert_eq!(backend.connect_calls(), 3, "max-age=60: asked once, then reused");
    open(&server, "channel=chat:2", &cookie).await;
    open(&server, "channel=chat:1", &[("cookie", "session=carol")]).await;
    assert_eq!(backend.connect_calls(), 5, "another request is asked again");
    backend.set(Mode::Sessions { expires_in: None, cache_control: Some("no-store, max-age=60") });
    open(&server, "channel=chat:3", &cookie).await;
    open(&server, "channel=chat:3", &cookie).await;
    assert_eq!(backend.connect_calls(), 7, "no-store is never reused");
    assert_eq!(metric(&server, "herald_proxy_requests_total{proxy=\"connect\",outcome=\"cached\"}").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_down_failing_or_nonsensical_backend_grants_nothing() {
    let (backend, address) = backend(Mode::Slow).await;
    let server = node(address, |config| config.proxy.max_response_bytes = 64).await;
    let cookie = [("cookie", "session=alice")];
    let (status, retry, body) = sse_error(&server, "channel=chat:1", &cookie).await;
    assert_eq!((status, error_code(&body)), (StatusCode::GATEWAY_TIMEOUT, "proxy_timeout"), "{body}");
    assert_eq!(retry.as_deref(), Some("1"));
    let long = r#"{"user":"alice","channels":["chat:1"],"padding":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#;
    for (answer, what) in [
        (Mode::Answer(500, "{}"), "a 500"),
        (Mode::Answer(200, "not json"), "not JSON"),
        (Mode::Answer(200, r#"{"user":5,"channels":[]}"#), "a user that is not a string"),
        (Mode::Answer(200, r#"{"user":"alice"}"#), "no channels"),
        (Mode::Answer(200, r#"{"user":"alice","channels":["bad name"]}"#), "a bad channel"),
        (Mode::Answer(200, r#"{"user":"alice","channels":[],"expires_at":1}"#), "a grant already expired"),
        (Mode::Answer(200, long), "an answer over proxy.max_response_bytes"),
        (Mode::Answer(302, ""), "a redirect"),
        (Mode::Answer(204, ""), "a 204"),
    ] {
        backend.set(answer);
        let (status, retry, body) = sse_error(&server, "channel=chat:1", &cookie).await;
        assert_eq!((status, error_code(&body)), (StatusCode::BAD_GATEWAY, "proxy_unavailable"), "{what}: {body}");
        assert_eq!(retry.as_deref(), Some("1"), "{what}");
        let message = body["error"]["message"].as_str().unwrap_or("");
        assert!(!message.contains("127.0.0.1"), "{what}: nothing of the backend is leaked: {message}");
    }
    backend.set(Mode::Slow);
    let mut ws = ws_with_cookie(&server, Some("session=alice")).await.err();
    assert_eq!(ws.take(), Some(504), "a WebSocket upgrade gets the same answer");
    assert!(metric(&server, "herald_proxy_requests_total{proxy=\"connect\",outcome=\"timeout\"}").await >= 2);
    assert!(metric(&server, "herald_proxy_requests_total{proxy=\"connect\",outcome=\"malformed\"}").await >= 6);
    assert!(metric(&server, "herald_proxy_requests_total{proxy=\"connect\",outcome=\"unavailable\"}").await >= 3);

    // A backend that is down: nothing listens on the port any more.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let gone = closed.local_addr().expect("address");
    drop(closed);
    let down = node(gone, |_| {}).await;
    let (status, _, body) = sse_error(&down, "channel=chat:1", &cookie).await;
    assert_eq!((status, error_code(&body)), (StatusCode::BAD_GATEWAY, "proxy_unavailable"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_beyond_the_concurrency_cap_are_refused_at_once() {
    let (backend, address) = backend(Mode::Slow).await;
    let server = node(address, |config| {
        config.proxy.max_concurrent = 1;
        config.proxy.timeout_ms = 5000;
    })
    .await;
    let url = server.url("/v1/sse?channel=chat:1");
    let first = tokio::spawn(async move {
        let response = client().get(url).header("cookie", "session=alice").send().await.expect("GET");
        response.status()
    });
    eventually("the first call reaches the backend", || backend.connect_calls() == 1).await;
    let (status, retry, body) = sse_error(&server, "channel=chat:1", &[("cookie", "session=bob")]).await;
    assert_eq!((status, error_code(&body)), (StatusCode::TOO_MANY_REQUESTS, "limit_exceeded"), "{body}");
    assert_eq!(retry.as_deref(), Some("1"));
    assert_eq!(backend.connect_calls(), 1, "the refused call never reached the backend");
    let first = tokio::time::timeout(TIMEOUT, first).await.expect("the first call ends").expect("task");
    assert_eq!(first, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(metric(&server, "herald_proxy_requests_total{proxy=\"connect\",outcome=\"overloaded\"}").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscribe_proxy_decides_the_channels_of_its_namespaces() {
    let (backend, address) = backend(sessions()).await;
    let server = node(address, |config| {
        config.proxy.subscribe_url = Some(format!("http://{address}/subscribe"));
        let asks = NamespaceConfig { subscribe: Some(SubscribeRule::Proxy), ..Default::default() };
        config.namespaces.insert("team".into(), asks);
    })
    .await;
    let alice = [("cookie", "session=alice"), ("x-tenant", "acme")];
    let (mut sse, _) = open(&server, "channel=team:red&channel=chat:1", &alice).await;
    server.publish("team:red", json!("go")).await;
    assert_eq!(sse.expect_offsets("team:red", 0, 1).await, vec![json!("go")]);
    let calls = backend.subscribe_calls.lock().expect("lock").clone();
    assert_eq!(calls.len(), 1, "only the proxy namespace is asked: {calls:?}");
    assert_eq!(
        (&calls[0]["user"], &calls[0]["channel"], &calls[0]["cookies"], &calls[0]["headers"]),
        (&json!("alice"), &json!("team:red"), &json!("session=alice"), &json!({"x-tenant": "acme"}))
    );
    let (status, _, body) = sse_error(&server, "channel=team:blue", &alice).await;
    assert_eq!((status, error_code(&body)), (StatusCode::FORBIDDEN, "forbidden"), "{body}");
    let (status, _, body) = sse_error(&server, "channel=team:red", &[("cookie", "session=bob")]).await;
    assert_eq!((status, error_code(&body)), (StatusCode::FORBIDDEN, "forbidden"), "{body}");
    let (status, _, body) = sse_error(&server, "channel=team:broken", &alice).await;
    assert_eq!((status, error_code(&body)), (StatusCode::BAD_GATEWAY, "proxy_unavailable"), "{body}");

    // WebSocket subscribes later in the connection go through it too, with the upgrade's cookies.
    let mut ws = ws_with_cookie(&server, Some("session=alice")).await.expect("upgrade");
    let frames = ws.subscribe(1, "team:red", None).await;
    assert_eq!(frames.last().map(|f| f["type"].clone()), Some(json!("subscribed")), "{frames:?}");
    for (id, channel, code) in
        [(2, "team:blue", "forbidden"), (3, "team:broken", "proxy_unavailable"), (4, "team:odd", "proxy_unavailable")]
    {
        let frames = ws.subscribe(id, channel, None).await;
        let last = frames.last().cloned().unwrap_or_default();
        assert_eq!(
            (last["type"].as_str(), last["id"].as_u64(), last["code"].as_str()),
            (Some("error"), Some(id), Some(code)),
            "{channel}: {frames:?}"
        );
    }
    let frames = ws.subscribe(5, "chat:9", None).await;
    assert_eq!(
        frames.last().map(|f| f["type"].clone()),
        Some(json!("subscribed")),
        "the grant's channels need no call"
    );
    assert!(metric(&server, "herald_proxy_requests_total{proxy=\"subscribe\",outcome=\"granted\"}").await >= 2);
    assert!(metric(&server, "herald_proxy_requests_total{proxy=\"subscribe\",outcome=\"malformed\"}").await >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_grant_closes_the_stream_as_an_expired_token_does() {
    let (_backend, address) = backend(Mode::Sessions { expires_in: Some(2), cache_control: None }).await;
    let server = node(address, |_| {}).await;
    let response =
        client().get(server.url("/v1/sse?channel=chat:1")).header("cookie", "session=alice").send().await.expect("GET");
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.bytes_stream();
    let mut text = String::new();
    while let Some(chunk) = tokio::time::timeout(TIMEOUT, body.next()).await.expect("the stream ends by itself") {
        text.push_str(&String::from_utf8_lossy(&chunk.expect("a chunk")));
    }
    assert!(text.contains("event: herald.connected"), "{text}");
    assert!(text.ends_with(": closed token_expired\n\n"), "{text}");

    let mut ws = ws_with_cookie(&server, Some("session=alice")).await.expect("upgrade");
    assert_eq!(ws.close_frame().await, (4003, "token_expired".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedding_application_tells_the_client_address_when_it_serves_with_connect_info() {
    let (backend, address) = backend(sessions()).await;
    let server = node(address, |_| {}).await;
    for with_connect_info in [true, false] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let embedded = listener.local_addr().expect("address");
        let app = herald_server::router(server.state.clone());
        if with_connect_info {
            let service = app.into_make_service_with_connect_info::<SocketAddr>();
            tokio::spawn(async move { axum::serve(listener, service).await });
        } else {
            tokio::spawn(async move { axum::serve(listener, app).await });
        }
        let url = format!("http://{embedded}/v1/sse?channel=chat:1");
        let mut sse = Sse::connect_with(&url, &[("cookie", "session=alice")]).await.expect("SSE through axum");
        assert_eq!(sse.next().await.0, "herald.connected");
        let remote = backend.last_connect().0["remote_addr"].clone();
        if with_connect_info {
            assert!(remote.as_str().is_some_and(|a| a.starts_with("127.0.0.1:")), "{remote}");
        } else {
            assert_eq!(remote, Value::Null, "unknown without connect info");
        }
    }
}
