//! Socket wrappers of the accept loop: [`GuardedIo`] gives every socket a write timeout (a client that
//! stops reading cannot pin a connection forever) and a [`KillSwitch`] that a transport can pull to
//! abort the connection at once, even while a write is blocked (how a slow SSE client is dropped);
//! [`Prefixed`] hands hyper the request head already read and puts the contract's JSON in place of
//! hyper's own empty error answers. Knows sockets and `error.rs`, nothing of routes or sessions.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

use crate::error::ApiError;

/// The address a request's TCP connection comes from, put in each request's extensions by the accept
/// loop (what the connect and subscribe proxies tell the backend as `remote_addr`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub std::net::SocketAddr);

/// The client's address: the accept loop's [`ClientAddr`], else axum's `ConnectInfo` (an application
/// that embeds the router and serves it with `into_make_service_with_connect_info::<SocketAddr>()`),
/// else unknown.
pub fn peer_of(
    accepted: Option<axum::Extension<ClientAddr>>,
    connect_info: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
) -> Option<std::net::SocketAddr> {
    accepted
        .map(|axum::Extension(ClientAddr(peer))| peer)
        .or(connect_info.map(|axum::Extension(axum::extract::ConnectInfo(peer))| peer))
}

/// A socket whose first reads return bytes already taken from it (the request head read above).
pub struct Prefixed {
    prefix: Vec<u8>,
    at: usize,
    inner: GuardedIo,
    /// The contract's JSON answer standing in for one of hyper's own, and how much of it is written.
    replacement: Option<(Vec<u8>, usize)>,
}

impl Prefixed {
    /// `inner`, whose reads first return `prefix`.
    pub fn new(prefix: Vec<u8>, inner: GuardedIo) -> Self {
        Self { prefix, at: 0, inner, replacement: None }
    }

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
