//! Many SSE connections on raw TCP, spread over several loopback source addresses (one address has
//! about 28,000 ephemeral ports). Each connection counts publication events; in latency mode it also
//! reads the send time the publisher put into `data.t` and records the difference.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use memchr::memmem;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::task::JoinSet;

/// One histogram per connection (an uncontended lock per read); merged only when asked.
type Latencies = Arc<Mutex<Vec<Arc<Mutex<Histogram<u64>>>>>>;

pub struct SseFleet {
    delivered: Arc<AtomicU64>,
    latencies: Latencies,
    tasks: JoinSet<()>,
    clock: Instant,
}

pub fn publish_client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().tcp_nodelay(true).pool_max_idle_per_host(64).build().unwrap_or_default()
}

/// Which client protocol a fleet speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    Sse,
    Ws,
}

impl SseFleet {
    /// Opens `connections` SSE streams, connection i on channel `channels[i % len]`, and returns once
    /// every one has received `herald.connected`.
    pub async fn connect(
        server: SocketAddr,
        channels: &[String],
        connections: usize,
        measure: bool,
    ) -> anyhow::Result<Self> {
        Self::connect_with(server, channels, connections, measure, Transport::Sse).await
    }

    /// Like [`SseFleet::connect`], over `transport` (WebSocket clients count text frames after their
    /// `subscribed` reply; they do not measure latency).
    pub async fn connect_with(
        server: SocketAddr,
        channels: &[String],
        connections: usize,
        measure: bool,
        transport: Transport,
    ) -> anyhow::Result<Self> {
        let delivered = Arc::new(AtomicU64::new(0));
        let latencies: Latencies = Arc::new(Mutex::new(Vec::new()));
        let clock = Instant::now();
        let connected = Arc::new(tokio::sync::Semaphore::new(0));
        let mut tasks = JoinSet::new();
        let opening = Arc::new(tokio::sync::Semaphore::new(256));
        for i in 0..connections {
            let channel = channels[i % channels.len()].clone();
            let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (i % 4) as u8));
            let (delivered, latencies, connected, opening) =
                (delivered.clone(), latencies.clone(), connected.clone(), opening.clone());
            tasks.spawn(async move {
                let permit = opening.acquire_owned().await;
                if transport == Transport::Ws {
                    match open_ws(server, source, &channel).await {
                        Ok((socket, rest)) => {
                            drop(permit);
                            connected.add_permits(1);
                            read_ws_frames(socket, rest, delivered).await;
                        }
                        Err(error) => eprintln!("connection {i} failed: {error:#}"),
                    }
                    return;
                }
                match open(server, source, &channel).await {
                    Ok((socket, rest)) => {
                        drop(permit);
                        connected.add_permits(1);
                        let mine = measure
                            .then(|| Histogram::new_with_bounds(1, 60_000_000, 3).ok())
                            .flatten()
                            .map(|h| Arc::new(Mutex::new(h)));
                        if let (Some(mine), Ok(mut all)) = (&mine, latencies.lock()) {
                            all.push(mine.clone());
                        }
                        read_events(socket, rest, delivered, mine.map(|h| (h, clock))).await;
                    }
                    Err(error) => eprintln!("connection {i} failed: {error:#}"),
                }
            });
        }
        let deadline = Duration::from_secs(120);
        let all = tokio::time::timeout(deadline, connected.acquire_many(connections as u32)).await;
        match all {
            Ok(Ok(permits)) => permits.forget(),
            _ => bail!("not every connection was established within {deadline:?}"),
        }
        Ok(Self { delivered, latencies, tasks, clock })
    }

    pub fn clock(&self) -> Instant {
        self.clock
    }

    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Waits until `count` publications were received in total.
    pub async fn wait_for(&self, count: u64, bound: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + bound;
        while self.delivered() < count {
            if Instant::now() > deadline {
                bail!("only {} of {count} deliveries arrived within {bound:?}", self.delivered());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(())
    }

    pub fn latencies(&self) -> Histogram<u64> {
        let mut merged = Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant bounds are valid");
        if let Ok(all) = self.latencies.lock() {
            for one in all.iter() {
                if let Ok(one) = one.lock() {
                    let _ = merged.add(&*one);
                }
            }
        }
        merged
    }

    pub fn close(mut self) {
        self.tasks.abort_all();
    }
}

/// Connects from `source`, sends `request` and reads until `marker` has arrived; returns the stream and
/// the bytes from the end of the marker on.
async fn connect_past(
    server: SocketAddr,
    source: IpAddr,
    request: &[u8],
    marker: &[u8],
) -> anyhow::Result<(tokio::net::TcpStream, Vec<u8>)> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0)).context("bind source address")?;
    let mut stream = socket.connect(server).await.context("connect")?;
    stream.set_nodelay(true)?;
    stream.write_all(request).await?;
    let mut buffer = Vec::with_capacity(1024);
    let finder = memmem::Finder::new(marker);
    loop {
        let mut chunk = [0u8; 1024];
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            let marker = String::from_utf8_lossy(marker);
            bail!("closed before {marker}: {}", String::from_utf8_lossy(&buffer));
        }
        buffer.extend_from_slice(&chunk[..read]);
        if let Some(at) = finder.find(&buffer) {
            let rest = buffer.split_off(at + marker.len());
            return Ok((stream, rest));
        }
    }
}

async fn open(server: SocketAddr, source: IpAddr, channel: &str) -> anyhow::Result<(tokio::net::TcpStream, Vec<u8>)> {
    let request = format!("GET /v1/sse?channel={channel} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n");
    connect_past(server, source, request.as_bytes(), b"event: herald.connected").await
}

async fn read_events(
    mut stream: tokio::net::TcpStream,
    mut pending: Vec<u8>,
    delivered: Arc<AtomicU64>,
    measure: Option<(Arc<Mutex<Histogram<u64>>>, Instant)>,
) {
    let events = memmem::Finder::new(b"\nevent: ");
    let stamp = memmem::Finder::new(b"\"t\":");
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        // Count whole events only: keep the tail after the last complete event for the next read.
        let complete = pending.windows(2).rposition(|w| w == b"\n\n").map(|p| p + 2).unwrap_or(0);
        if complete > 0 {
            let count = events.find_iter(&pending[..complete]).count() as u64;
            if let Some((histogram, clock)) = &measure {
                let now = clock.elapsed().as_micros() as u64;
                if let Ok(mut histogram) = histogram.lock() {
                    for at in stamp.find_iter(&pending[..complete]) {
                        let digits = pending[at + 4..].iter().take_while(|b| b.is_ascii_digit()).count();
                        let text = std::str::from_utf8(&pending[at + 4..at + 4 + digits]).unwrap_or("0");
                        if let Ok(sent_ns) = text.parse::<u64>() {
                            let _ = histogram.record(now.saturating_sub(sent_ns / 1000).max(1));
                        }
                    }
                }
            }
            delivered.fetch_add(count, Ordering::Relaxed);
            pending.drain(..complete);
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(read) => pending.extend_from_slice(&chunk[..read]),
        }
    }
}

/// A WebSocket client on raw TCP: the upgrade and one `subscribe` frame (masked with a zero key, which
/// leaves the payload as is) in one write, then everything after the `subscribed` reply.
async fn open_ws(
    server: SocketAddr,
    source: IpAddr,
    channel: &str,
) -> anyhow::Result<(tokio::net::TcpStream, Vec<u8>)> {
    let payload = format!(r#"{{"op":"subscribe","id":1,"channel":"{channel}"}}"#);
    if payload.len() >= 126 {
        bail!("channel name too long for this client");
    }
    let mut request = b"GET /v1/ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        .to_vec();
    request.extend_from_slice(&[0x81, 0x80 | payload.len() as u8, 0, 0, 0, 0]);
    request.extend_from_slice(payload.as_bytes());
    let (mut stream, mut rest) = connect_past(server, source, &request, b"\"type\":\"subscribed\"").await?;
    // The reply is one small frame: what follows its closing brace belongs to later frames.
    loop {
        if let Some(end) = rest.iter().position(|b| *b == b'}') {
            return Ok((stream, rest.split_off(end + 1)));
        }
        let mut chunk = [0u8; 1024];
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            bail!("closed inside the subscribed reply");
        }
        rest.extend_from_slice(&chunk[..read]);
    }
}

/// Counts server text frames (unmasked: a 2-byte header, then 2 or 8 length bytes for longer payloads).
async fn read_ws_frames(mut stream: tokio::net::TcpStream, mut pending: Vec<u8>, delivered: Arc<AtomicU64>) {
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let mut at = 0;
        let mut count = 0;
        while pending.len() >= at + 2 {
            let (opcode, short) = (pending[at] & 0x0f, (pending[at + 1] & 0x7f) as usize);
            let (header, length) = match short {
                126 if pending.len() >= at + 4 => (4, u16::from_be_bytes([pending[at + 2], pending[at + 3]]) as usize),
                127 if pending.len() >= at + 10 => {
                    let mut bytes = [0u8; 8];
                    bytes.copy_from_slice(&pending[at + 2..at + 10]);
                    (10, u64::from_be_bytes(bytes) as usize)
                }
                126 | 127 => break,
                n => (2, n),
            };
            if pending.len() < at + header + length {
                break;
            }
            if opcode == 0x1 {
                count += 1;
            }
            at += header + length;
        }
        delivered.fetch_add(count, Ordering::Relaxed);
        pending.drain(..at);
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(read) => pending.extend_from_slice(&chunk[..read]),
        }
    }
}
