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
use std::task::{Context, Poll};
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

use crate::{AppState, sse};

/// Time a client gets to send its request headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts until `shutdown` fires; connection tasks are tracked by `tracker`.
pub async fn accept_loop(
    listener: TcpListener,
    app: Router,
    state: AppState,
    write_timeout: Duration,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
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
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
        let app = app.clone();
        let state = state.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let kill = Arc::new(KillSwitch::default());
            let mut guarded = GuardedIo::new(stream, kill.clone(), write_timeout);
            let mut head = Vec::new();
            match tokio::time::timeout(HEADER_READ_TIMEOUT, read_head(&mut guarded, &mut head)).await {
                Ok(Ok(true)) => {}
                _ => return, // closed, timed out or oversized before a request head arrived
            }
            if let Some((headers, query)) = sse_request(&head) {
                drop(head);
                serve_sse(&state, guarded, kill, &headers, query).await;
                return;
            }
            let guarded = Prefixed { prefix: head, at: 0, inner: guarded };
            // Boxed so that the (larger) hyper state is not part of every connection task's size.
            Box::pin(serve_hyper(app, guarded, kill, shutdown)).await;
        });
    }
}

/// Serves a connection that is not an event stream with hyper, ending gracefully on shutdown.
async fn serve_hyper(app: Router, io: Prefixed, kill: Arc<KillSwitch>, shutdown: CancellationToken) {
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(kill.clone());
        app.clone().oneshot(request)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.writev(false).timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
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

/// Longest request head the accept loop reads before deciding who serves the connection.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// Reads until the end of the request head (`\r\n\r\n`); false when the client closed first or the head
/// is too large (the connection is then dropped).
async fn read_head(io: &mut GuardedIo, head: &mut Vec<u8>) -> std::io::Result<bool> {
    loop {
        // Read straight into the (heap) head buffer: a stack buffer here would become part of every
        // connection task's size for the connection's whole life.
        let searched_from = head.len().saturating_sub(3);
        head.reserve(1024);
        let read = io.read_buf(head).await?;
        if read == 0 {
            return Ok(false);
        }
        if head[searched_from..].windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(true);
        }
        if head.len() > MAX_HEAD_BYTES {
            return Ok(false);
        }
    }
}

/// The headers and query of a `GET /v1/sse` request head (not an upgrade); `None` for anything else.
fn sse_request(head: &[u8]) -> Option<(HeaderMap, Option<String>)> {
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut slots);
    if !request.parse(head).ok()?.is_complete() || request.method? != "GET" {
        return None;
    }
    let path = request.path?;
    let (route, query) = match path.split_once('?') {
        Some((route, query)) => (route, Some(query.to_owned())),
        None => (path, None),
    };
    if route != "/v1/sse" {
        return None;
    }
    let mut headers = HeaderMap::new();
    for header in request.headers.iter() {
        if header.name.eq_ignore_ascii_case("upgrade") {
            return None;
        }
        let name = axum::http::HeaderName::from_bytes(header.name.as_bytes()).ok()?;
        let value = axum::http::HeaderValue::from_bytes(header.value).ok()?;
        headers.append(name, value);
    }
    Some((headers, query))
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
            let status = error.status();
            let body = error.body().to_string();
            let retry = if matches!(status.as_u16(), 429 | 503) { "retry-after: 1\r\n" } else { "" };
            let response = format!(
                "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{retry}{cors}connection: close\r\n\r\n{body}",
                status.as_u16(),
                status.canonical_reason().unwrap_or(""),
                body.len()
            );
            let _ = io.write_all(response.as_bytes()).await;
            let _ = io.shutdown().await;
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
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
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
