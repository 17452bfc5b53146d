//! `nats-server -js` processes of the caller's own on loopback: one server, or a JetStream cluster of
//! several joined by cluster routes. Each server keeps its store in a folder of its own, so a server
//! killed and restarted comes back with its streams (removed on drop).
//!
//! ```no_run
//! use herald_testkit::{NatsCluster, NatsServer};
//! let mut single = NatsServer::start();
//! assert!(single.url().starts_with("nats://127.0.0.1:"));
//! single.stop();
//! single.restart(); // same port, same store
//!
//! let mut cluster = NatsCluster::start(3);
//! let _all = cluster.url(); // "nats://127.0.0.1:P1,nats://127.0.0.1:P2,nats://127.0.0.1:P3"
//! cluster.kill(0); // SIGKILL by PID
//! cluster.restart(0);
//! ```

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::bail;

use crate::process::{Process, scratch_dir, try_free_port, wait_until};

/// How long a server gets to report itself healthy (a cluster member also waits for its peers).
const START_TIME: Duration = Duration::from_secs(20);
/// The name every cluster started here shares.
const CLUSTER_NAME: &str = "herald-test";

/// One `nats-server -js`, stopped by PID on drop.
pub struct NatsServer {
    process: Option<Process>,
    port: u16,
    /// The HTTP monitoring port (`/healthz` tells when the server, JetStream included, is ready).
    monitor_port: u16,
    /// Holds the JetStream store (`store/`) and the server's log (`server.log`).
    dir: PathBuf,
    /// Arguments of every start after the common ones (cluster settings).
    args: Vec<String>,
}

impl NatsServer {
    /// Starts a standalone JetStream server on a free port, with a store of its own, and waits until it
    /// is healthy.
    pub fn start() -> NatsServer {
        Self::try_start().expect("nats-server must be installed (scripts/test installs it)")
    }

    pub fn try_start() -> anyhow::Result<NatsServer> {
        let mut server = Self::prepare(Vec::new())?;
        server.try_restart()?;
        Ok(server)
    }

    /// A standalone JetStream server started with `args` added (`--auth TOKEN`, `--user U --pass P`).
    pub fn try_start_with(args: &[&str]) -> anyhow::Result<NatsServer> {
        let mut server = Self::prepare(args.iter().map(|a| (*a).to_owned()).collect())?;
        server.try_restart()?;
        Ok(server)
    }

    /// A server with its ports and folder chosen, not started yet.
    fn prepare(args: Vec<String>) -> anyhow::Result<NatsServer> {
        Ok(NatsServer {
            process: None,
            port: try_free_port()?,
            monitor_port: try_free_port()?,
            dir: scratch_dir("herald-nats")?,
            args,
        })
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's PID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Process::pid)
    }

    /// Where JetStream keeps this server's data.
    pub fn store_dir(&self) -> PathBuf {
        self.dir.join("store")
    }

    /// The server's log file (kept across restarts: each start appends).
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// Kills the server (SIGKILL, like a crash) and waits for it to exit; its store stays.
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    /// Starts the server again on the same ports with the same store, and waits until it is healthy.
    pub fn restart(&mut self) {
        self.try_restart().expect("nats-server restarts");
    }

    pub fn try_restart(&mut self) -> anyhow::Result<()> {
        self.spawn()?;
        self.wait_healthy()
    }

    /// Sends a signal to the server's process (`STOP` and `CONT` freeze and wake it).
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        match &self.process {
            Some(process) => process.signal(signal),
            None => bail!("nats-server on port {} is not running", self.port),
        }
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        if self.process.is_some() {
            bail!("nats-server on port {} is already running", self.port);
        }
        let process = Process::spawn(
            Command::new("nats-server")
                .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-m", &self.monitor_port.to_string()])
                .arg("-sd")
                .arg(self.store_dir())
                .arg("-l")
                .arg(self.log_file())
                .args(&self.args)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            "nats-server",
        )?;
        self.process = Some(process);
        Ok(())
    }

    fn wait_healthy(&self) -> anyhow::Result<()> {
        let what = format!("nats-server on port {} was not healthy (log: {})", self.port, self.log_file().display());
        wait_until(&what, START_TIME, || healthy(self.monitor_port))
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether `GET /healthz` on the monitoring port answers 200 (the server accepts clients and, with
/// JetStream, its JetStream is up: in a cluster, once it has a meta leader).
fn healthy(monitor_port: u16) -> bool {
    let probe = || -> std::io::Result<bool> {
        let mut stream = TcpStream::connect(("127.0.0.1", monitor_port))?;
        stream.set_read_timeout(Some(Duration::from_secs(1)))?;
        stream.write_all(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer.lines().next().is_some_and(|status| status.split_whitespace().nth(1) == Some("200")))
    };
    probe().unwrap_or(false)
}

/// A JetStream cluster of `nats-server`s on loopback, each with its own client, cluster and monitoring
/// ports and store, routed to every other one.
pub struct NatsCluster {
    servers: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `size` servers (3 for a JetStream quorum) and waits until every one is healthy.
    pub fn start(size: usize) -> NatsCluster {
        Self::try_start(size).expect("nats-server must be installed (scripts/test installs it)")
    }

    pub fn try_start(size: usize) -> anyhow::Result<NatsCluster> {
        let cluster_ports: Vec<u16> = (0..size).map(|_| try_free_port()).collect::<anyhow::Result<_>>()?;
        let mut servers = Vec::with_capacity(size);
        for (i, own) in cluster_ports.iter().enumerate() {
            let routes: Vec<String> =
                cluster_ports.iter().filter(|p| *p != own).map(|p| format!("nats://127.0.0.1:{p}")).collect();
            let args = vec![
                "--server_name".to_owned(),
                format!("herald-nats-{i}"),
                "--cluster_name".to_owned(),
                CLUSTER_NAME.to_owned(),
                "--cluster".to_owned(),
                format!("nats://127.0.0.1:{own}"),
                "--routes".to_owned(),
                routes.join(","),
            ];
            servers.push(NatsServer::prepare(args)?);
        }
        // All first, then the waits: a member is healthy only once the cluster has a meta leader.
        for server in &mut servers {
            server.spawn()?;
        }
        for server in &servers {
            server.wait_healthy()?;
        }
        Ok(NatsCluster { servers })
    }

    /// Every server's client URL, comma-separated (`nats://127.0.0.1:P1,nats://127.0.0.1:P2,…`).
    pub fn url(&self) -> String {
        self.urls().join(",")
    }

    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(NatsServer::url).collect()
    }

    pub fn len(&self) -> usize {
        self.servers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// Server `i`.
    pub fn server(&self, i: usize) -> &NatsServer {
        &self.servers[i]
    }

    /// Kills server `i` (SIGKILL, by PID); its store stays for [`NatsCluster::restart`].
    pub fn kill(&mut self, i: usize) {
        self.servers[i].stop();
    }

    /// Starts server `i` again with its ports and store, and waits until it is healthy.
    pub fn restart(&mut self, i: usize) {
        self.servers[i].restart();
    }

    pub fn try_restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.servers[i].try_restart()
    }

    /// Starts every stopped server again with its ports and store, all at once (a cluster's servers
    /// are healthy only once a quorum of them is up), and waits until each is healthy.
    pub fn restart_all(&mut self) {
        for server in &mut self.servers {
            if server.process.is_none() {
                server.spawn().expect("nats-server restarts");
            }
        }
        for server in &self.servers {
            server.wait_healthy().expect("nats-server is healthy again");
        }
    }

    /// The folder of server `i`'s store.
    pub fn store_dir(&self, i: usize) -> PathBuf {
        self.servers[i].store_dir()
    }

    /// The log files of every server (to read when a test fails).
    pub fn log_files(&self) -> Vec<PathBuf> {
        self.servers.iter().map(NatsServer::log_file).collect()
    }
}
