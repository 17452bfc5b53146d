//! `nats-server -js` processes of the test's own on free loopback ports, stopped by PID on drop: one
//! server, or a JetStream cluster of three (each server stoppable and restartable with its store kept).

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::redis::free_port;

const NATS_SERVER: &str = "nats-server";

/// One `nats-server` with JetStream, its store in a folder of its own (removed on drop).
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    store: std::path::PathBuf,
    /// Cluster arguments when the server is one of a cluster.
    extra: Vec<String>,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        Self::start_with(free_port(), Vec::new())
    }

    fn start_with(port: u16, extra: Vec<String>) -> NatsServer {
        let store = std::env::temp_dir().join(format!("herald-nats-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&store).expect("store dir");
        let mut server = NatsServer { child: None, port, store, extra };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server again (keeping its store) and waits until it accepts connections.
    pub fn restart(&mut self) {
        self.stop();
        let mut command = Command::new(NATS_SERVER);
        command
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd", &self.store.display().to_string()])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.child = Some(command.spawn().expect("spawn nats-server (Debian package nats-server)"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server on {} did not start", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again with its store emptied: everything it held is lost.
    pub fn restart_empty(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.store);
        std::fs::create_dir_all(&self.store).expect("store dir");
        self.restart();
    }

    /// Stops the server and copies its store aside (a backup an operator might restore).
    pub fn backup(&mut self) -> std::path::PathBuf {
        self.stop();
        let copy = self.store.with_extension("backup");
        let _ = std::fs::remove_dir_all(&copy);
        let status = Command::new("cp").args(["-a"]).arg(&self.store).arg(&copy).status().expect("cp");
        assert!(status.success(), "copying the store");
        copy
    }

    /// Stops the server, puts `backup` back as its store and starts it: what came after is gone.
    pub fn restore(&mut self, backup: &std::path::Path) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.store);
        let status = Command::new("cp").args(["-a"]).arg(backup).arg(&self.store).status().expect("cp");
        assert!(status.success(), "restoring the store");
        let _ = std::fs::remove_dir_all(backup);
        self.restart();
    }

    /// Kills the server (SIGKILL): no goodbye to its clients or its cluster.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

/// Three JetStream servers routed into one cluster.
pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
}

impl NatsCluster {
    pub fn start() -> NatsCluster {
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let routes: Vec<String> = ports.iter().map(|(_, route)| format!("nats://127.0.0.1:{route}")).collect();
        let servers = ports
            .iter()
            .enumerate()
            .map(|(i, (port, route))| {
                let extra = vec![
                    "--name".to_owned(),
                    format!("n{i}-{port}"),
                    "--cluster_name".to_owned(),
                    format!("herald-{}", ports[0].0),
                    "--cluster".to_owned(),
                    format!("nats://127.0.0.1:{route}"),
                    "--routes".to_owned(),
                    routes.join(","),
                ];
                NatsServer::start_with(*port, extra)
            })
            .collect();
        NatsCluster { servers }
    }

    /// Every server, comma-separated, as an engine URL.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.servers.iter().map(|s| format!("127.0.0.1:{}", s.port)).collect();
        format!("nats://{}", hosts.join(","))
    }
}
