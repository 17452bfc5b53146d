//! The accept loop: one hyper HTTP/1.1 connection per accepted socket, with `TCP_NODELAY` set and
//! hyper's vectored writes off (events are copied into one buffer, which halves CPU per delivery on
//! fan-out; see BENCHMARKS.md). Our own loop instead of `axum::serve` because `axum::serve` sets
//! neither and its HTTP/2 detection keeps a larger read buffer per idle connection.
//!
//! Each socket is wrapped in `socket::GuardedIo`, which gives it a write timeout (a client that stops
//! reading cannot pin a connection forever) and a `socket::KillSwitch` that a transport can pull to
//! abort the connection at once, even while hyper is blocked writing to it (how a slow SSE client is
//! dropped). The first request head is read and checked by `head.rs`.
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
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::HeaderMap;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::error::{ApiError, SOCKET_CAP_REASON};
use crate::head::{Head, Request, classify, read_head};
use crate::socket::{ClientAddr, GuardedIo, KillSwitch, Prefixed};
use crate::sse;
use crate::state::AppState;

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
        let (stream, peer) = match accepted {
            Ok((stream, peer)) => (stream, peer),
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
            refuse_over_cap(stream, &state, &refusals, &tracker, limits);
            continue;
        };
        let connection = Connection {
            state: state.clone(),
            app: app.clone(),
            limits,
            shutdown: shutdown.clone(),
            tracker: tracker.clone(),
        };
        tracker.spawn(connection.serve(stream, permit, peer));
    }
}

/// A socket over the cap is answered off the accept loop, by a bounded number of short tasks; past those
/// (a flood), it is closed without an answer.
fn refuse_over_cap(
    stream: TcpStream,
    state: &AppState,
    refusals: &Arc<tokio::sync::Semaphore>,
    tracker: &TaskTracker,
    limits: ConnectionLimits,
) {
    tracing::debug!(max_sockets = limits.max_sockets, "socket refused: too many open");
    state.metrics().connection_refused(SOCKET_CAP_REASON);
    let Ok(refusing) = refusals.clone().try_acquire_owned() else { return };
    tracker.spawn(async move {
        let _refusing = refusing;
        let mut guarded = GuardedIo::new(stream, Arc::new(KillSwitch::default()), limits.write_timeout);
        let error = ApiError::Limit(format!("this node holds its maximum of {} sockets", limits.max_sockets));
        write_error(&mut guarded, &error, "").await;
    });
}

/// What one accepted connection is served with.
struct Connection {
    state: AppState,
    app: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
    /// Where a started event stream's own task is spawned (so that graceful shutdown waits for it).
    tracker: TaskTracker,
}

impl Connection {
    /// Reads the first request head, then serves the connection: an event stream by itself, anything
    /// else through hyper, a bad or slow head with the contract's error. Holds `permit` (one of
    /// `limits.max_sockets`) until the connection ends. `peer` is the client's address.
    async fn serve(self, stream: TcpStream, permit: OwnedSemaphorePermit, peer: SocketAddr) {
        let limits = self.limits;
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
                    if let Some((io, stream)) = start_sse(&self.state, guarded, kill, headers, query, peer).await {
                        // The running stream gets a task of its own, sized for what it holds: this
                        // task's state (the start, the hyper path's) is freed when it returns, and an
                        // idle stream's memory is mostly its task.
                        self.tracker.spawn(async move {
                            let _permit = permit;
                            pump_sse(io, stream).await;
                        });
                    }
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
            self.state.metrics().connection_refused(error.code());
            write_error(&mut guarded, &error, "").await;
            return;
        }
        // Boxed so that the (larger) hyper state is not part of every connection task's size.
        Box::pin(serve_hyper(self.app, Prefixed::new(head, guarded), kill, peer, limits, self.shutdown)).await;
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
    let retry = if error.retry_after() { "retry-after: 1\r\n" } else { "" };
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
    peer: SocketAddr,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) {
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(kill.clone());
        request.extensions_mut().insert(ClientAddr(peer));
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

/// Starts one SSE connection on the raw socket: opens the stream and writes the response head (or the
/// contract's error). Kept apart from [`pump_sse`] so that nothing of the start (the request's headers,
/// the open's state) stays in the connection task while the stream runs: an idle stream's memory is
/// mostly that task.
async fn start_sse(
    state: &AppState,
    mut io: GuardedIo,
    kill: Arc<KillSwitch>,
    headers: HeaderMap,
    query: Option<String>,
    peer: SocketAddr,
) -> Option<(GuardedIo, sse::SseStream)> {
    let origin = headers.get("origin").and_then(|v| v.to_str().ok());
    let cors = crate::cors::cors_allow_origin(state.config(), origin)
        .map(|allowed| format!("access-control-allow-origin: {allowed}\r\nvary: origin\r\n"))
        .unwrap_or_default();
    let stream = match sse::open(state, Some(kill), &headers, query, Some(peer)).await {
        Ok(stream) => stream,
        Err(error) => {
            write_error(&mut io, &error, &cors).await;
            return None;
        }
    };
    drop(headers);
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\nx-accel-buffering: no\r\n\
         {cors}connection: close\r\n\r\n"
    );
    io.write_all(head.as_bytes()).await.ok()?;
    Some((io, stream))
}

/// Writes every chunk of a started SSE stream until it ends or the client goes away (anything the
/// client sends ends the stream too).
async fn pump_sse(mut io: GuardedIo, mut stream: sse::SseStream) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
