//! A round-robin TCP balancer: each accepted connection goes to the next replica (the one after it
//! when that one does not accept), and bytes are copied both ways until either side closes. Like most
//! layer-4 balancers it knows nothing of HTTP: a kept-alive connection stays on its replica, and so does
//! a browser's event stream.

use std::net::SocketAddr;

use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// A running balancer; dropping or stopping it closes every connection it carries.
pub struct Balancer {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

/// Balances connections accepted on `listener` over `backends`.
pub fn start(listener: TcpListener, backends: Vec<SocketAddr>) -> anyhow::Result<Balancer> {
    anyhow::ensure!(!backends.is_empty(), "a balancer needs at least one backend");
    let addr = listener.local_addr()?;
    let task = tokio::spawn(accept_loop(listener, backends));
    Ok(Balancer { addr, task })
}

async fn accept_loop(listener: TcpListener, backends: Vec<SocketAddr>) {
    // Owned here, so aborting this task drops the set, which aborts every connection's task.
    let mut connections = JoinSet::new();
    let mut next = 0usize;
    loop {
        let mut inbound = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: keep serving the connections already open.
                eprintln!("balancer: accept failed: {e}");
                tokio::task::yield_now().await;
                continue;
            }
        };
        let first = next;
        next = next.wrapping_add(1);
        let backends = backends.clone();
        connections.spawn(async move {
            for i in 0..backends.len() {
                let backend = backends[(first + i) % backends.len()];
                if let Ok(mut outbound) = TcpStream::connect(backend).await {
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let _ = copy_bidirectional(&mut inbound, &mut outbound).await;
                    return;
                }
            }
        });
        while connections.try_join_next().is_some() {}
    }
}

impl Balancer {
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
