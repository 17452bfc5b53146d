//! A TCP proxy on loopback between a node and its engine, to cut the node's engine connections the way a
//! network does (both directions closed at once) while the engine itself keeps running.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Forwards `127.0.0.1:<port>` to a target port on loopback; stops listening when dropped.
pub struct Proxy {
    port: u16,
    open: Arc<Mutex<Vec<TcpStream>>>,
    /// While set, new connections are closed as soon as they are accepted (the engine is unreachable).
    held: Arc<AtomicBool>,
    stopped: Arc<AtomicBool>,
}

impl Proxy {
    /// Starts forwarding a free port to `127.0.0.1:<target>`.
    pub fn start(target: u16) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let stopped = Arc::new(AtomicBool::new(false));
        let held = Arc::new(AtomicBool::new(false));
        let (conns, stop, hold) = (open.clone(), stopped.clone(), held.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                if hold.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(upstream) = TcpStream::connect(("127.0.0.1", target)) else { continue };
                let _ = (client.set_nodelay(true), upstream.set_nodelay(true));
                let (Ok(c), Ok(u)) = (client.try_clone(), upstream.try_clone()) else { continue };
                if let Ok(mut list) = conns.lock() {
                    list.push(c);
                    list.push(u);
                }
                pipe(&client, &upstream);
                pipe(&upstream, &client);
            }
        });
        Ok(Proxy { port, open, held, stopped })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Closes every connection made through the proxy so far, and every new one until [`Proxy::restore`].
    /// Returns how many client connections were cut.
    pub fn cut(&self) -> usize {
        self.held.store(true, Ordering::SeqCst);
        let Ok(mut list) = self.open.lock() else { return 0 };
        for stream in list.iter() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        let cut = list.len() / 2;
        list.clear();
        cut
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.held.store(false, Ordering::SeqCst);
    }
}

/// Copies `from` into `to` on a thread of its own until either side closes.
fn pipe(from: &TcpStream, to: &TcpStream) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else { return };
    std::thread::spawn(move || {
        let mut buffer = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buffer[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = (from.shutdown(Shutdown::Both), to.shutdown(Shutdown::Both));
    });
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.cut();
        // Wake the accept loop so it sees `stopped` and returns.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}
