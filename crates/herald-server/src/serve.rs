//! The accept loop: one hyper HTTP/1.1 connection per accepted socket, with `TCP_NODELAY` set and
//! hyper's vectored writes off (events are copied into one buffer, which halves CPU per delivery on
//! fan-out; see BENCHMARKS.md). Our own loop instead of `axum::serve` because `axum::serve` sets
//! neither and its HTTP/2 detection keeps a larger read buffer per idle connection.
//!
//! Each socket is wrapped in [`GuardedIo`], which gives it a write timeout (a client that stops reading
//! cannot pin a connection forever) and a [`KillSwitch`] that a transport can pull to abort the
//! connection at once, even while hyper is blocked writing to it (how a slow SSE client is dropped).
//!
//! Server-Sent Events requests skip hyper: the loop reads each connection's request head itself, and a
//! `GET /v1/sse` is answered by a hand-written HTTP/1.1 response (`Connection: close`, the body runs
//! until either side closes) written straight from the SSE stream. hyper keeps two 8 KiB buffers per
//! connection for its whole life, which is most of an idle SSE connection's memory (BENCHMARKS.md);
//! here an idle stream holds only its session, a timer and the socket. Everything else (the API,
//! WebSocket upgrades, the pages) goes to hyper, which is handed the bytes already read.
//!
//! On shutdown the loop stops accepting, asks every connection to finish gracefully and waits for them
//! (the caller bounds the wait).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::http::HeaderMap;
use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::error::ApiError;
use crate::{AppState, sse};

/// Per-connection bounds of the accept loop (from `limits.*`, docs/config.md).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// How long a write to a client may stay blocked.
    pub write_timeout: Duration,
    /// How long a client gets to send a whole request head (and how long a kept-alive connection may
    /// wait for its next request).
    pub header_read_timeout: Duration,
    /// Largest request head.
    pub max_header_bytes: usize,
    /// Open sockets of every kind.
    pub max_sockets: usize,
    /// How long sent data may stay unacknowledged (TCP_USER_TIMEOUT); `None` leaves the kernel default.
    pub dead_peer_timeout: Option<Duration>,
    /// Largest request body: a `Content-Length` above it is refused before the body is read.
    pub max_body_bytes: usize,
}

impl From<&crate::config::LimitsConfig> for ConnectionLimits {
    fn from(limits: &crate::config::LimitsConfig) -> Self {
        Self {
            write_timeout: Duration::from_secs(limits.write_timeout_secs),
            header_read_timeout: Duration::from_secs(limits.header_read_timeout_secs),
            max_header_bytes: limits.max_header_bytes,
            max_sockets: limits.sockets(),
            dead_peer_timeout: (limits.dead_peer_timeout_secs > 0)
                .then(|| Duration::from_secs(limits.dead_peer_timeout_secs)),
            max_body_bytes: limits.max_body_bytes,
        }
    }
}

/// Sockets over the cap being answered at once; more are closed without an answer.
const MAX_REFUSALS_IN_FLIGHT: usize = 1024;
/// Longest an answer the accept loop gives itself (an error, then a lingering close) may take.
const REFUSAL_TIME: Duration = Duration::from_secs(1);

/// Accepts until `shutdown` fires; connection tasks are tracked by `tracker`.
pub async fn accept_loop(
    listener: TcpListener,
    app: Router,
    state: AppState,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let sockets = state.sockets().clone();
    let refusals = Arc::new(tokio::sync::Semaphore::new(MAX_REFUSALS_IN_FLIGHT));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, _peer) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                // Typically EMFILE: back off briefly instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                }
            }
        };
        configure(&stream, &limits);
        let Ok(permit) = sockets.clone().try_acquire_owned() else {
            tracing::debug!(max_sockets = limits.max_sockets, "socket refused: too many open");
            state.metrics().connection_refused("max_sockets");
            // Over the socket cap: answered off the accept loop, by a bounded number of short tasks;
            // past those (a flood), the socket is closed without an answer.
            let Ok(refusing) = refusals.clone().try_acquire_owned() else { continue };
            tracker.spawn(async move {
                let _refusing = refusing;
                let mut guarded = GuardedIo::new(stream, Arc::new(KillSwitch::default()), limits.write_timeout);
                let error = ApiError::Limit(format!("this node holds its maximum of {} sockets", limits.max_sockets));
                write_error(&mut guarded, &error, "").await;
            });
            continue;
        };
        let app = app.clone();
        let state = state.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let kill = Arc::new(KillSwitch::default());
            let mut guarded = GuardedIo::new(stream, kill.clone(), limits.write_timeout);
            let mut head = Vec::new();
            let read = tokio::time::timeout(
                limits.header_read_timeout,
                read_head(&mut guarded, &mut head, limits.max_header_bytes),
            )
            .await;
            let refused = match read {
                Ok(Ok(Head::Complete)) => match classify(&head, limits.max_body_bytes) {
                    Ok(Request::Sse(headers, query)) => {
                        drop(head);
                        serve_sse(&state, guarded, kill, &headers, query).await;
                        return;
                    }
                    Ok(Request::Other) => None,
                    Err(error) => Some(error),
                },
                Ok(Ok(Head::TooLarge)) => Some(ApiError::HeadersTooLarge(format!(
                    "the request head (request line and headers) may be at most {} bytes",
                    limits.max_header_bytes
                ))),
                Ok(Ok(Head::BareLineEnd)) => Some(ApiError::BadRequest(
                    "every line of a request head must end with CRLF (RFC 9112 section 2.2)".into(),
                )),
                // A connection that never sent a byte is simply closed; a partial head gets an answer.
                Err(_) if !head.is_empty() => Some(ApiError::RequestTimeout(format!(
                    "the request head did not arrive within {} s",
                    limits.header_read_timeout.as_secs()
                ))),
                Ok(Ok(Head::Closed)) | Ok(Err(_)) | Err(_) => return,
            };
            if let Some(error) = refused {
                state.metrics().connection_refused(error.code());
                write_error(&mut guarded, &error, "").await;
                return;
            }
            let guarded = Prefixed { prefix: head, at: 0, inner: guarded, replacement: None };
            // Boxed so that the (larger) hyper state is not part of every connection task's size.
            Box::pin(serve_hyper(app, guarded, kill, limits, shutdown)).await;
        });
    }
}

/// Socket options of every accepted connection: `TCP_NODELAY` (events leave at once), and on Linux
/// `TCP_USER_TIMEOUT`, so that a client whose network vanished (no reset ever arrives) is dropped once
/// data to it (an event or a ping) stays unacknowledged that long, instead of after the kernel's
/// retransmissions give up many minutes later.
fn configure(stream: &TcpStream, limits: &ConnectionLimits) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "could not set TCP_NODELAY");
    }
    #[cfg(target_os = "linux")]
    if let Some(timeout) = limits.dead_peer_timeout
        && let Err(error) = socket2::SockRef::from(stream).set_tcp_user_timeout(Some(timeout))
    {
        tracing::debug!(%error, "could not set TCP_USER_TIMEOUT");
    }
}

/// Answers a request the accept loop refuses itself with the contract's JSON error and closes, all
/// within [`REFUSAL_TIME`]. Lingering close: after the answer it reads (and drops) what the client still
/// sends until the client closes, because closing a socket with unread bytes resets the connection,
/// and a reset can destroy the answer before the client reads it.
async fn write_error(io: &mut GuardedIo, error: &ApiError, cors: &str) {
    let status = error.status();
    let body = error.body().to_string();
    let retry = if matches!(status.as_u16(), 429 | 503) { "retry-after: 1\r\n" } else { "" };
    let response = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{retry}{cors}connection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    let _ = tokio::time::timeout(REFUSAL_TIME, async {
        io.write_all(response.as_bytes()).await?;
        io.shutdown().await?;
        let mut sink = [0u8; 1024];
        while io.read(&mut sink).await? > 0 {}
        Ok::<_, io::Error>(())
    })
    .await;
}

/// Serves a connection that is not an event stream with hyper, ending gracefully on shutdown.
async fn serve_hyper(
    app: Router,
    io: Prefixed,
    kill: Arc<KillSwitch>,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) {
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(kill.clone());
        app.clone().oneshot(request)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // hyper's read buffer cannot be smaller than 8 KiB; heads of later requests on a kept-alive
    // connection are bounded by it (hyper answers 431 beyond).
    builder
        .writev(false)
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    let connection = builder.serve_connection(TokioIo::new(io), service).with_upgrades();
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(error) = result {
                tracing::trace!(%error, "connection ended with an error");
            }
        }
        _ = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

/// How reading a request head ended.
enum Head {
    Complete,
    /// The client closed the connection first.
    Closed,
    TooLarge,
    /// A line of the head ends with a bare LF (or holds a bare CR): refused at once rather than waiting
    /// for a CRLF CRLF that never comes. RFC 9112 allows a server to accept bare LF; Herald does not, so
    /// that it never reads a request's framing differently from a proxy in front of it.
    BareLineEnd,
}

/// Reads until the end of the request head (`\r\n\r\n`), at most `max` bytes of it.
async fn read_head(io: &mut GuardedIo, head: &mut Vec<u8>, max: usize) -> std::io::Result<Head> {
    let mut scanned = 0;
    loop {
        // Read straight into the (heap) head buffer: a stack buffer here would become part of every
        // connection task's size for the connection's whole life.
        head.reserve(1024);
        let read = io.read_buf(head).await?;
        if read == 0 {
            return Ok(Head::Closed);
        }
        match scan_head(head, scanned) {
            Scan::End(head_len) => return Ok(if head_len > max { Head::TooLarge } else { Head::Complete }),
            Scan::BareLineEnd => return Ok(Head::BareLineEnd),
            Scan::Partial(next) => scanned = next,
        }
        if head.len() > max {
            return Ok(Head::TooLarge);
        }
    }
}

/// Where scanning a request head for its end stopped.
#[derive(Debug, PartialEq, Eq)]
enum Scan {
    /// The head is complete and this long (bytes after it belong to the body).
    End(usize),
    /// Not complete yet; scan again from this index once more bytes arrived.
    Partial(usize),
    BareLineEnd,
}

/// Scans `head` from `from` for the blank line that ends it, checking that every line ends with CRLF.
/// Bytes after the head (a body) are not looked at.
fn scan_head(head: &[u8], from: usize) -> Scan {
    for index in from..head.len() {
        match head[index] {
            b'\n' => {
                if index == 0 || head[index - 1] != b'\r' {
                    return Scan::BareLineEnd;
                }
                if index >= 3 && &head[index - 3..=index] == b"\r\n\r\n" {
                    return Scan::End(index + 1);
                }
            }
            b'\r' => match head.get(index + 1) {
                Some(b'\n') => {}
                Some(_) => return Scan::BareLineEnd,
                None => return Scan::Partial(index),
            },
            _ => {}
        }
    }
    Scan::Partial(head.len())
}

/// Who serves a complete request head.
enum Request {
    /// `GET /v1/sse` (not an upgrade): its headers and query.
    Sse(HeaderMap, Option<String>),
    /// Anything else well-formed: hyper and the router.
    Other,
}

/// Most header lines a request may carry.
pub const MAX_HEADERS: usize = 64;

/// Parses a complete request head and checks its message framing (RFC 9112 section 6) before anyone
/// else sees it, so that each malformed request gets the contract's JSON error (hyper would answer an
/// empty 400) and a body over the limit is refused before it is read.
fn classify(head: &[u8], max_body_bytes: usize) -> Result<Request, ApiError> {
    let malformed = || ApiError::BadRequest("malformed HTTP request".into());
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut slots);
    match request.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(malformed()),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ApiError::HeadersTooLarge(format!("a request may carry at most {MAX_HEADERS} header lines")));
        }
        Err(_) => return Err(malformed()),
    }
    let (Some(method), Some(path), Some(version)) = (request.method, request.path, request.version) else {
        return Err(malformed());
    };
    let has_body = check_framing(request.headers, version, max_body_bytes)?;
    let (route, query) = match path.split_once('?') {
        Some((route, query)) => (route, Some(query)),
        None => (path, None),
    };
    if method != "GET" || route != "/v1/sse" {
        return Ok(Request::Other);
    }
    let mut headers = HeaderMap::new();
    for header in request.headers.iter() {
        if header.name.eq_ignore_ascii_case("upgrade") {
            return Ok(Request::Other);
        }
        let (Ok(name), Ok(value)) = (
            axum::http::HeaderName::from_bytes(header.name.as_bytes()),
            axum::http::HeaderValue::from_bytes(header.value),
        ) else {
            return Err(malformed());
        };
        headers.append(name, value);
    }
    if has_body {
        // The stream would read the body as the client going away.
        return Err(ApiError::BadRequest("an event stream request has no body".into()));
    }
    Ok(Request::Sse(headers, query.map(str::to_owned)))
}

/// Checks `Content-Length` and `Transfer-Encoding` (RFC 9112 sections 6.1 to 6.3): one well-formed
/// length, or `chunked` as the only coding (a list without empty elements), never both (the classic
/// request smuggling vector), no transfer coding in HTTP/1.0, and a length within `max_body_bytes`.
/// Returns whether a body follows.
fn check_framing(headers: &[httparse::Header<'_>], version: u8, max_body_bytes: usize) -> Result<bool, ApiError> {
    let mut length: Option<u64> = None;
    let mut codings: Vec<String> = Vec::new();
    let mut has_transfer_encoding = false;
    for header in headers {
        if header.name.eq_ignore_ascii_case("content-length") {
            if length.is_some() {
                return Err(ApiError::BadRequest("Content-Length given more than once".into()));
            }
            let value = header.value.trim_ascii();
            if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
                return Err(ApiError::BadRequest("Content-Length must be a non-negative decimal number".into()));
            }
            // Every byte is a digit: only overflow can fail, and such a length is over any limit.
            length = Some(std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()).unwrap_or(u64::MAX));
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            has_transfer_encoding = true;
            let value = std::str::from_utf8(header.value)
                .map_err(|_| ApiError::BadRequest("Transfer-Encoding must be ASCII".into()))?;
            for coding in value.split(',').map(str::trim) {
                // hyper refuses an empty element at the end (`chunked,`); refusing every empty one here
                // keeps the two parses from ever disagreeing on where the body ends.
                if coding.is_empty() {
                    return Err(ApiError::BadRequest("Transfer-Encoding has an empty list element".into()));
                }
                codings.push(coding.to_ascii_lowercase());
            }
        }
    }
    if has_transfer_encoding {
        if length.is_some() {
            return Err(ApiError::BadRequest(
                "a request may not carry both Content-Length and Transfer-Encoding".into(),
            ));
        }
        if version == 0 {
            return Err(ApiError::BadRequest("HTTP/1.0 requests may not use Transfer-Encoding".into()));
        }
        if codings.last().map(String::as_str) != Some("chunked") {
            return Err(ApiError::BadRequest("chunked must be the final transfer coding of a request".into()));
        }
        if codings.len() > 1 {
            let unknown = codings.iter().find(|c| *c != "chunked").map(String::as_str).unwrap_or("chunked");
            return Err(if unknown == "chunked" {
                ApiError::BadRequest("chunked may be applied only once".into())
            } else {
                ApiError::NotImplemented(format!("transfer coding {unknown:?} is not supported; use chunked"))
            });
        }
        return Ok(true);
    }
    match length {
        Some(length) if length > max_body_bytes as u64 => Err(ApiError::BodyTooLarge { limit: max_body_bytes }),
        Some(length) => Ok(length > 0),
        None => Ok(false),
    }
}

/// Serves one SSE connection on the raw socket: the response head, then every chunk of the stream,
/// until the stream ends or the client goes away (anything it sends ends the stream too).
async fn serve_sse(
    state: &AppState,
    mut io: GuardedIo,
    kill: Arc<KillSwitch>,
    headers: &HeaderMap,
    query: Option<String>,
) {
    let origin = headers.get("origin").and_then(|v| v.to_str().ok());
    let cors = crate::cors_allow_origin(state.config(), origin)
        .map(|allowed| format!("access-control-allow-origin: {allowed}\r\nvary: origin\r\n"))
        .unwrap_or_default();
    let mut stream = match sse::open(state, Some(kill), headers, query).await {
        Ok(stream) => stream,
        Err(error) => {
            write_error(&mut io, &error, &cors).await;
            return;
        }
    };
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\nx-accel-buffering: no\r\n\
         {cors}connection: close\r\n\r\n"
    );
    if io.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let mut probe = [0u8; 1];
    loop {
        tokio::select! {
            chunk = stream.next_chunk() => match chunk {
                Some(bytes) => {
                    if io.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
                None => break,
            },
            // A client of an event stream only ever closes it.
            _ = io.read(&mut probe) => return,
        }
    }
    let _ = io.shutdown().await;
}

/// A socket whose first reads return bytes already taken from it (the request head read above).
struct Prefixed {
    prefix: Vec<u8>,
    at: usize,
    inner: GuardedIo,
    /// The contract's JSON answer standing in for one of hyper's own, and how much of it is written.
    replacement: Option<(Vec<u8>, usize)>,
}

impl Prefixed {
    /// Writes what is left of a replacement answer; ready once it is all written.
    fn drain_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, written)) = self.replacement.as_mut() {
            if *written == bytes.len() {
                break;
            }
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        Poll::Ready(Ok(()))
    }
}

/// The contract's JSON answer for one of hyper's own answers, if `buf` is one. Herald checks the first
/// request on a connection itself; hyper parses later ones on a kept-alive connection and answers what it
/// cannot parse with an empty 400 (431 for a head over its buffer, 414 for a long target) before closing.
/// Herald's own answers always carry a `content-type`, so an empty one without is hyper's.
fn json_for_hypers_answer(buf: &[u8]) -> Option<Vec<u8>> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    if head_end != buf.len() {
        return None;
    }
    let head = std::str::from_utf8(buf).ok()?.to_ascii_lowercase();
    let error = match head.get(..12)? {
        "http/1.1 400" => ApiError::BadRequest("malformed HTTP request".into()),
        "http/1.1 431" | "http/1.1 414" => {
            ApiError::HeadersTooLarge("the request head (request line and headers) is too large".into())
        }
        _ => return None,
    };
    if !head.contains("\r\ncontent-length: 0\r\n") || head.contains("\r\ncontent-type:") {
        return None;
    }
    let status = error.status();
    let body = error.body().to_string();
    Some(
        format!(
            "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            body.len()
        )
        .into_bytes(),
    )
}

impl AsyncRead for Prefixed {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = (self.prefix.len() - self.at).min(buf.remaining());
            let start = self.at;
            buf.put_slice(&self.prefix[start..start + n]);
            self.at += n;
            if self.at == self.prefix.len() {
                self.prefix = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.drain_replacement(cx))?;
        if self.replacement.is_none()
            && let Some(json) = json_for_hypers_answer(buf)
        {
            // hyper closes the connection after such an answer; it never writes after it.
            self.replacement = Some((json, 0));
            let _ = self.drain_replacement(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drain_replacement(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drain_replacement(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Aborts one TCP connection from anywhere: its next (or pending) read or write fails.
#[derive(Debug, Default)]
pub struct KillSwitch {
    killed: AtomicBool,
    waker: AtomicWaker,
}

impl KillSwitch {
    pub fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        self.waker.wake();
    }

    fn check(&self, cx: &Context<'_>) -> io::Result<()> {
        self.waker.register(cx.waker());
        if self.killed.load(Ordering::SeqCst) {
            return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "connection closed by herald"));
        }
        Ok(())
    }
}

/// A socket with a kill switch and a write timeout.
pub struct GuardedIo {
    inner: TcpStream,
    kill: Arc<KillSwitch>,
    write_timeout: Duration,
    /// Armed while a write is pending; dropped as soon as a write makes progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl GuardedIo {
    pub fn new(inner: TcpStream, kill: Arc<KillSwitch>, write_timeout: Duration) -> Self {
        Self { inner, kill, write_timeout, stalled: None }
    }

    fn pending_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let timeout = self.write_timeout;
        let stalled = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "write timed out"))),
            Poll::Pending => Poll::Pending,
        }
    }
}

use std::future::Future;

impl AsyncRead for GuardedIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.kill.check(cx)?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for GuardedIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.kill.check(cx)?;
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Pending => self.pending_write(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.kill.check(cx)?;
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => self.pending_write(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.kill.check(cx)?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_ends_at_its_blank_line_and_every_line_needs_crlf() {
        assert_eq!(scan_head(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n{\"a\":\n1}", 0), Scan::End(27));
        assert_eq!(scan_head(b"GET / HTTP/1.1\r\nHost: x\r", 0), Scan::Partial(23));
        assert_eq!(scan_head(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 23), Scan::End(27));
        for bad in [&b"GET / HTTP/1.1\nHost: x\n\n"[..], b"GET / HTTP/1.1\r\nHost: x\n", b"GET / HTTP/1.1\rHost: x"] {
            assert_eq!(scan_head(bad, 0), Scan::BareLineEnd, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn framing_is_checked_before_anyone_reads_a_body() {
        let check = |head: &str| match classify(head.as_bytes(), 100) {
            Ok(Request::Sse(..)) => "sse".to_owned(),
            Ok(Request::Other) => "other".to_owned(),
            Err(error) => format!("{} {}", error.status().as_u16(), error.code()),
        };
        let cases = [
            ("POST /v1/publish HTTP/1.1\r\nContent-Length: 10\r\n\r\n", "other"),
            ("POST /v1/publish HTTP/1.1\r\nTransfer-Encoding: Chunked\r\n\r\n", "other"),
            ("GET /v1/sse?channel=a HTTP/1.1\r\nContent-Length: 0\r\n\r\n", "sse"),
            ("GET /v1/sse?channel=a HTTP/1.1\r\nContent-Length: 1\r\n\r\n", "400 bad_request"),
            ("POST /v1/publish HTTP/1.1\r\nContent-Length: 101\r\n\r\n", "413 body_too_large"),
            ("POST /v1/publish HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n", "413 body_too_large"),
            ("POST /v1/publish HTTP/1.1\r\nContent-Length: -1\r\n\r\n", "400 bad_request"),
            ("POST /v1/publish HTTP/1.1\r\nContent-Length: +1\r\n\r\n", "400 bad_request"),
            ("POST /v1/publish HTTP/1.1\r\nContent-Length: 1,1\r\n\r\n", "400 bad_request"),
            ("POST /v1/publish HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n", "400 bad_request"),
            ("POST /v1/publish HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", "400 bad_request"),
            ("POST /v1/publish HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "501 not_implemented"),
            ("POST /v1/publish HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", "400 bad_request"),
            ("POST /v1/publish HTTP/1.1\r\nTransfer-Encoding: foo\r\n\r\n", "400 bad_request"),
            ("POST /v1/publish HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", "400 bad_request"),
            ("POST /v1/publish HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", "400 bad_request"),
        ];
        for (head, expected) in cases {
            assert_eq!(check(head), expected, "{head:?}");
        }
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_sockets_drop_dead_peers_in_bounded_time() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let _client = TcpStream::connect(address).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        let limits = ConnectionLimits::from(&crate::config::LimitsConfig::default());
        configure(&accepted, &limits);
        let socket = socket2::SockRef::from(&accepted);
        assert_eq!(socket.tcp_user_timeout().expect("read option"), Some(Duration::from_secs(45)));
        assert!(socket.tcp_nodelay().expect("read option"));
    }
}
