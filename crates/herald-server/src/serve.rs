//! The accept loop: one hyper HTTP/1.1 connection per accepted socket, with `TCP_NODELAY` set and
//! hyper's vectored writes off (events are copied into one buffer, which halves CPU per delivery on
//! fan-out; see BENCHMARKS.md). Our own loop instead of `axum::serve` because `axum::serve` sets
//! neither and its HTTP/2 detection keeps a larger read buffer per idle connection.
//!
//! On shutdown the loop stops accepting, asks every connection to finish gracefully and waits for them
//! (the caller bounds the wait).

use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// Time a client gets to send its request headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts until `shutdown` fires; connection tasks are tracked by `tracker`.
pub async fn accept_loop(listener: TcpListener, app: Router, shutdown: CancellationToken, tracker: TaskTracker) {
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
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let service =
                hyper::service::service_fn(move |request: hyper::Request<Incoming>| app.clone().oneshot(request));
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.writev(false).timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
            let connection = builder.serve_connection(TokioIo::new(stream), service).with_upgrades();
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
        });
    }
}
