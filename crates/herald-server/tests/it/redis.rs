//! A `redis-server` of the test's own on a free loopback port, stopped by PID on drop.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    /// Certificate authority file when the server speaks TLS only.
    pub tls_ca: Option<std::path::PathBuf>,
    tls_dir: Option<std::path::PathBuf>,
    /// Where the server keeps its snapshot and append-only file, when it persists (removed on drop).
    data_dir: Option<std::path::PathBuf>,
    /// Arguments added to every start (persistence, replication).
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts `redis-server` on a free port and waits until it answers PING.
    pub fn start() -> RedisServer {
        let port = free_port();
        let mut server =
            RedisServer { child: None, port, tls_ca: None, tls_dir: None, data_dir: None, extra: Vec::new() };
        server.restart();
        server
    }

    /// Starts `redis-server` keeping its data in a folder of its own: snapshots only when told (`SAVE`)
    /// plus whatever `extra` asks for (`--appendonly yes`, `--replicaof …`). A restart loads what is there.
    pub fn start_persistent(extra: &[&str]) -> RedisServer {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("herald-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("data dir");
        let mut args: Vec<String> = vec!["--dir".into(), dir.display().to_string()];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let mut server =
            RedisServer { child: None, port, tls_ca: None, tls_dir: None, data_dir: Some(dir), extra: args };
        server.restart();
        server
    }

    /// Sends a signal to the server's process (`STOP` and `CONT` make a replica lag for real).
    pub fn signal(&self, signal: &str) {
        let Some(child) = &self.child else { return };
        let status = Command::new("kill").args(["-s", signal, &child.id().to_string()]).status().expect("kill");
        assert!(status.success(), "kill -s {signal}");
    }

    /// A field of `INFO replication`.
    pub fn replication(&self, field: &str) -> Option<String> {
        let info = self.command_text(&["INFO", "replication"])?;
        info.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':')).map(|v| v.trim().to_owned())
    }

    /// Starts `redis-server` accepting only TLS, with a certificate for 127.0.0.1 signed by a fresh
    /// certificate authority (made with the `openssl` command).
    pub fn start_tls() -> RedisServer {
        let dir = std::env::temp_dir().join(format!("herald-tls-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let openssl = |args: &[&str]| {
            let status = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            assert!(
                status.expect("openssl must be installed (scripts/test installs it)").success(),
                "openssl {args:?}"
            );
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=herald-test-ca",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n").expect("ext");
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ]);
        let port = free_port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--tls-cert-file", "server.crt", "--tls-key-file", "server.key", "--tls-ca-cert-file", "ca.crt"])
            .args(["--tls-auth-clients", "no"])
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        // Ready once the TLS port accepts connections (a TLS PING needs a TLS client; the engine's own
        // start-up waits for Redis anyway).
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "TLS redis-server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        RedisServer {
            child: Some(child),
            port,
            tls_ca: Some(dir.join("ca.crt")),
            tls_dir: Some(dir),
            data_dir: None,
            extra: Vec::new(),
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls_ca.is_some() { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}/0", self.port)
    }

    /// Starts (again) on the same port: with nothing on disk, or from its folder when it persists.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(if self.data_dir.is_none() { &["--appendonly", "no"][..] } else { &[][..] })
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.command(&["PING"]).as_deref() != Some("+PONG") {
            assert!(Instant::now() < deadline, "redis-server on port {} did not start", self.port);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the server (SIGKILL, like a crash) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Runs one command whose answer is a bulk string (`INFO`); returns the string.
    pub fn command_text(&self, args: &[&str]) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        stream.write_all(resp(args).as_bytes()).ok()?;
        let mut answer = Vec::new();
        let mut buffer = [0u8; 16384];
        loop {
            let read = stream.read(&mut buffer).ok()?;
            if read == 0 {
                return None;
            }
            answer.extend_from_slice(&buffer[..read]);
            let text = String::from_utf8_lossy(&answer).to_string();
            let (length, body) = text.strip_prefix('$')?.split_once("\r\n")?;
            let length: usize = length.parse().ok()?;
            if body.len() >= length {
                return body.get(..length).map(str::to_owned);
            }
        }
    }

    /// Runs one command over RESP; returns the first line of the answer.
    pub fn command(&self, args: &[&str]) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        stream.write_all(resp(args).as_bytes()).ok()?;
        let mut buffer = [0u8; 4096];
        let read = stream.read(&mut buffer).ok()?;
        let text = String::from_utf8_lossy(&buffer[..read]).to_string();
        Some(text.split("\r\n").take_while(|l| !l.is_empty()).collect::<Vec<_>>().join("\n"))
    }

    /// `PUBSUB NUMSUB channel`: how many connections (nodes) subscribe to it.
    pub fn numsub(&self, channel: &str) -> u64 {
        let answer = self.command(&["PUBSUB", "NUMSUB", channel]).unwrap_or_default();
        answer.lines().last().and_then(|l| l.strip_prefix(':')).and_then(|n| n.parse().ok()).unwrap_or(u64::MAX)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // A stopped process ignores SIGKILL's reaping until continued.
        self.signal("CONT");
        self.stop();
        for dir in [self.tls_dir.take(), self.data_dir.take()].into_iter().flatten() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn resp(args: &[&str]) -> String {
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{}\r\n", arg.len(), arg));
    }
    request
}

/// Three `redis-server --sentinel` processes watching one primary (quorum 2), stopped by PID on drop.
pub struct Sentinels {
    children: Vec<Child>,
    pub ports: Vec<u16>,
    dir: std::path::PathBuf,
}

impl Sentinels {
    /// Starts three sentinels for the primary on `primary_port`, named `master`; a primary silent for
    /// one second is failed over.
    pub fn start(master: &str, primary_port: u16) -> Sentinels {
        let dir = std::env::temp_dir().join(format!("herald-sentinel-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).expect("sentinel dir");
        let mut children = Vec::new();
        let mut ports = Vec::new();
        for i in 0..3 {
            let port = free_port();
            // Sentinels rewrite their configuration file, so each gets a writable one of its own.
            let file = dir.join(format!("sentinel-{i}.conf"));
            let config = format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor {master} 127.0.0.1 {primary_port} 2\n\
                 sentinel down-after-milliseconds {master} 1000\nsentinel failover-timeout {master} 10000\n\
                 sentinel parallel-syncs {master} 1\n",
                dir.display()
            );
            std::fs::write(&file, config).expect("sentinel config");
            let child = Command::new("redis-server")
                .arg(&file)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server --sentinel");
            children.push(child);
            ports.push(port);
        }
        let sentinels = Sentinels { children, ports, dir };
        for port in &sentinels.ports {
            let probe = RedisServer {
                child: None,
                port: *port,
                tls_ca: None,
                tls_dir: None,
                data_dir: None,
                extra: Vec::new(),
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            while probe.command(&["PING"]).as_deref() != Some("+PONG") {
                assert!(Instant::now() < deadline, "sentinel on port {port} did not start");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        sentinels
    }

    /// `redis+sentinel://…` for this set.
    pub fn url(&self, master: &str) -> String {
        let hosts: Vec<String> = self.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        format!("redis+sentinel://{}/{master}/0", hosts.join(","))
    }
}

impl Drop for Sentinels {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}
