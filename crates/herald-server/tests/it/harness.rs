//! Test harness: an in-process node on 127.0.0.1:0 and small SSE, WebSocket and HTTP helpers.
//! Every wait is bounded by [`TIMEOUT`] and fails with a message instead of hanging.

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use eventsource_stream::{Event, Eventsource};
use futures_util::{SinkExt, Stream, StreamExt};
use herald_server::{AppState, Cli, Config, Settings, config};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

pub const TIMEOUT: Duration = Duration::from_secs(10);

/// The in-process nodes log warnings (`IT_LOG=herald_nats=debug,…` for more) into the test's own output,
/// which is shown when a test fails (or with `--nocapture`): a failure in CI carries its nodes' story.
fn log_to_the_test() {
    let filter = std::env::var("IT_LOG").unwrap_or_else(|_| "warn".to_owned());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_ansi(false)
        .with_test_writer()
        .try_init();
}

pub struct Server {
    pub addr: SocketAddr,
    pub state: AppState,
    shutdown: CancellationToken,
    _task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    pub async fn start() -> Self {
        Self::with(|_| {}).await
    }

    pub async fn with(tweak: impl FnOnce(&mut Config)) -> Self {
        log_to_the_test();
        let cli = Cli { listen: Some("127.0.0.1:0".into()), ..Cli::default() };
        let mut config = config::load(&cli, &[]).expect("default test configuration is valid").config;
        tweak(&mut config);
        let settings = Settings::from_config(config).expect("the test's configuration is valid");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let state = herald_server::start(settings).await.expect("start node");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(herald_server::run(state.clone(), listener, shutdown.clone()));
        Self { addr, state, shutdown, _task: task }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    /// Publishes and expects 200; returns the answer.
    pub async fn publish(&self, channel: &str, data: Value) -> Value {
        let (status, body) = self.post("/v1/publish", json!({"channel": channel, "data": data})).await;
        assert_eq!(status, StatusCode::OK, "publish failed: {body}");
        body
    }

    /// Publishes, retrying while the engine answers 503 (coming back from a fault: a restart, a
    /// failover, an election, a moved slot), for at most twice [`TIMEOUT`].
    pub async fn publish_eventually(&self, channel: &str, data: Value) -> Value {
        let deadline = tokio::time::Instant::now() + TIMEOUT * 2;
        loop {
            let (status, answer) =
                self.post("/v1/publish", serde_json::json!({"channel": channel, "data": data})).await;
            if status == StatusCode::OK {
                return answer;
            }
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
            assert!(tokio::time::Instant::now() < deadline, "the engine never took the publication: {answer}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let response = client().post(self.url(path)).json(&body).send().await.expect("POST");
        read_json(response).await
    }

    pub async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> (StatusCode, Value) {
        let response = client()
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("POST");
        read_json(response).await
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let response = client().get(self.url(path)).send().await.expect("GET");
        read_json(response).await
    }

    pub fn stop(&self) {
        self.shutdown.cancel();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().expect("reqwest client")
}

pub async fn read_json(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let text = response.text().await.expect("body");
    let value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("body is not JSON ({status}): {text:?}"));
    (status, value)
}

/// Asserts the contract's error shape and returns the code.
pub fn error_code(body: &Value) -> &str {
    let code = body["error"]["code"].as_str().unwrap_or_else(|| panic!("not an error body: {body}"));
    assert!(body["error"]["message"].is_string(), "error without message: {body}");
    code
}

/// Polls `condition` until it holds or [`TIMEOUT`] passes. For state that settles asynchronously
/// (a server noticing a closed socket); never used to order events a test causes itself.
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<Event, String>> + Send>>;

/// An SSE client that remembers the last event ID like a browser's EventSource.
pub struct Sse {
    stream: EventStream,
    pub last_id: String,
}

impl Sse {
    pub async fn connect(
        server: &Server,
        query: &str,
        last_event_id: Option<&str>,
    ) -> Result<Sse, (StatusCode, Value)> {
        Self::connect_url(&server.url(&format!("/v1/sse?{query}")), last_event_id).await
    }

    /// Connects to a full SSE URL (for nodes running as processes).
    pub async fn connect_url(url: &str, last_event_id: Option<&str>) -> Result<Sse, (StatusCode, Value)> {
        let headers: Vec<(&str, &str)> = last_event_id.map(|id| ("last-event-id", id)).into_iter().collect();
        Self::connect_with(url, &headers).await
    }

    /// Connects to a full SSE URL with these request headers (cookies, a correlation ID, …).
    pub async fn connect_with(url: &str, headers: &[(&str, &str)]) -> Result<Sse, (StatusCode, Value)> {
        let mut request = client().get(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("GET /v1/sse");
        if response.status() != StatusCode::OK {
            return Err(read_json(response).await);
        }
        let headers = response.headers();
        assert_eq!(headers["content-type"], "text/event-stream");
        assert_eq!(headers["cache-control"], "no-cache");
        assert_eq!(headers["x-accel-buffering"], "no");
        let stream = response.bytes_stream().eventsource().map(|r| r.map_err(|e| e.to_string()));
        Ok(Sse { stream: Box::pin(stream), last_id: String::new() })
    }

    /// Connects and reads the `herald.connected` event.
    pub async fn open(server: &Server, query: &str, last_event_id: Option<&str>) -> (Sse, Value) {
        let mut sse = Self::connect(server, query, last_event_id).await.expect("SSE connect");
        let (event, data) = sse.next().await;
        assert_eq!(event, "herald.connected", "first event must be herald.connected: {data}");
        (sse, data)
    }

    /// The next event's name and data (JSON).
    pub async fn next(&mut self) -> (String, Value) {
        let (event, data) = self.next_raw().await;
        let data = serde_json::from_str(&data).unwrap_or_else(|_| panic!("data is not JSON: {data:?}"));
        (event, data)
    }

    /// The next event's name and data as sent (for data serde_json cannot hold as a `Value`).
    pub async fn next_raw(&mut self) -> (String, String) {
        let event = tokio::time::timeout(TIMEOUT, self.stream.next())
            .await
            .expect("timed out waiting for an SSE event")
            .expect("SSE stream ended")
            .expect("SSE stream failed");
        if !event.id.is_empty() {
            self.last_id = event.id.clone();
        }
        (event.event, event.data)
    }

    /// Reads events until the stream ends; returns them.
    pub async fn until_closed(&mut self) -> Vec<(String, Value)> {
        let mut events = Vec::new();
        loop {
            match tokio::time::timeout(TIMEOUT, self.stream.next()).await.expect("timed out waiting for the end") {
                Some(Ok(event)) => {
                    if !event.id.is_empty() {
                        self.last_id = event.id.clone();
                    }
                    events.push((event.event, serde_json::from_str(&event.data).unwrap_or(Value::Null)));
                }
                Some(Err(_)) | None => return events,
            }
        }
    }

    /// Expects `count` publications of `channel` with offsets following `after`; returns their data.
    pub async fn expect_offsets(&mut self, channel: &str, after: u64, count: u64) -> Vec<Value> {
        let mut data = Vec::new();
        for expected in after + 1..=after + count {
            let (event, envelope) = self.next().await;
            assert_eq!(event, "message", "{envelope}");
            assert_eq!(envelope["channel"], channel, "{envelope}");
            assert_eq!(envelope["offset"], expected, "{envelope}");
            data.push(envelope["data"].clone());
        }
        data
    }
}

pub type WsStream = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct Ws {
    pub socket: WsStream,
}

impl Ws {
    pub async fn connect(server: &Server) -> Ws {
        let (socket, _) = tokio_tungstenite::connect_async(server.ws_url()).await.expect("WS connect");
        Ws { socket }
    }

    pub async fn send(&mut self, value: Value) {
        self.socket.send(Message::text(value.to_string())).await.expect("WS send");
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.socket.send(message).await.expect("WS send");
    }

    /// The next JSON text frame (pings are answered by tungstenite and skipped).
    pub async fn next(&mut self) -> Value {
        serde_json::from_str(&self.next_text().await).expect("WS frame is JSON")
    }

    /// The next text frame as sent (pings are answered by tungstenite and skipped).
    pub async fn next_text(&mut self) -> String {
        loop {
            let message = tokio::time::timeout(TIMEOUT, self.socket.next())
                .await
                .expect("timed out waiting for a WS frame")
                .expect("WS stream ended")
                .expect("WS read failed");
            match message {
                Message::Text(text) => return text.as_str().to_owned(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected WS message {other:?}"),
            }
        }
    }

    /// Reads until a close frame; returns its code and reason.
    pub async fn close_frame(&mut self) -> (u16, String) {
        loop {
            let message = tokio::time::timeout(TIMEOUT, self.socket.next()).await.expect("timed out waiting for close");
            match message {
                Some(Ok(Message::Close(Some(frame)))) => return (frame.code.into(), frame.reason.to_string()),
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }

    pub async fn subscribe(&mut self, id: u64, channel: &str, since: Option<Value>) -> Vec<Value> {
        let mut op = json!({"op": "subscribe", "id": id, "channel": channel});
        if let Some(since) = since {
            op["since"] = since;
        }
        self.send(op).await;
        let mut frames = Vec::new();
        loop {
            let frame = self.next().await;
            let done = frame["type"] == "subscribed" || frame["type"] == "error";
            frames.push(frame);
            if done {
                return frames;
            }
        }
    }
}

/// Writes `request` on a fresh connection and reads until the server closes it: the status code and
/// the JSON body, or `None` when the server closed without answering. `then_wait` keeps the client's
/// side open (the server must end the exchange by itself).
pub async fn raw_exchange(server: &Server, request: &[u8], then_wait: bool) -> Option<(u16, Value)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(server.addr).await.expect("connect");
    socket.write_all(request).await.expect("write");
    if !then_wait {
        socket.shutdown().await.expect("half-close");
    }
    let mut answer = Vec::new();
    tokio::time::timeout(TIMEOUT, socket.read_to_end(&mut answer))
        .await
        .expect("the server closes the connection")
        .expect("read");
    parse_answer(&answer)
}

/// The status and JSON body of one raw HTTP answer (`None` if empty); asserts it is JSON.
pub fn parse_answer(answer: &[u8]) -> Option<(u16, Value)> {
    if answer.is_empty() {
        return None;
    }
    let text = String::from_utf8_lossy(answer);
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("a status code");
    assert!(head.to_ascii_lowercase().contains("content-type: application/json"), "{head}");
    let body = serde_json::from_str(body).unwrap_or_else(|_| panic!("a JSON body: {text:?}"));
    Some((status, body))
}

/// Reads one HTTP answer with a `content-length` from a kept-alive connection: status, head, JSON body.
pub async fn read_answer(socket: &mut tokio::net::TcpStream) -> (u16, String, Value) {
    use tokio::io::AsyncReadExt;
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("a content-length");
            if buffer.len() >= end + 4 + length {
                let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("a status code");
                let body = serde_json::from_slice(&buffer[end + 4..end + 4 + length]).expect("a JSON body");
                return (status, head, body);
            }
        }
        let read = tokio::time::timeout(TIMEOUT, socket.read(&mut chunk)).await.expect("an answer").expect("read");
        assert!(read > 0, "closed before a whole answer: {:?}", String::from_utf8_lossy(&buffer));
        buffer.extend_from_slice(&chunk[..read]);
    }
}
