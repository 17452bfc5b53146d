//! `redis-server` processes of the caller's own on free loopback ports: plain, keeping data in a folder
//! of their own, TLS only, and three sentinels watching a primary. Commands go through the `redis`
//! crate's synchronous client.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::process::{Process, scratch_dir, try_free_port, wait_until};

/// How long a server gets to start answering.
const START_TIME: Duration = Duration::from_secs(10);
/// Bound of one command (connecting, writing, reading).
const COMMAND_TIME: Duration = Duration::from_secs(2);

/// Runs one command against the server on `port` (authenticated with `password` when given; over TLS,
/// trusting the authority in `tls_ca`, when given).
fn query<T: ::redis::FromRedisValue>(
    port: u16,
    password: Option<&str>,
    tls_ca: Option<&std::path::Path>,
    args: &[&str],
) -> anyhow::Result<T> {
    let auth = password.map(|p| format!(":{p}@")).unwrap_or_default();
    let client = match tls_ca {
        Some(ca) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let certificates = ::redis::TlsCertificates { client_tls: None, root_cert: Some(std::fs::read(ca)?) };
            ::redis::Client::build_with_tls(format!("rediss://{auth}127.0.0.1:{port}/"), certificates)?
        }
        None => ::redis::Client::open(format!("redis://{auth}127.0.0.1:{port}/"))?,
    };
    let mut connection = client.get_connection_with_timeout(COMMAND_TIME)?;
    connection.set_read_timeout(Some(COMMAND_TIME))?;
    connection.set_write_timeout(Some(COMMAND_TIME))?;
    let (name, rest) = args.split_first().context("a command needs a name")?;
    let mut command = ::redis::cmd(name);
    for arg in rest {
        command.arg(*arg);
    }
    Ok(command.query(&mut connection)?)
}

fn answers_ping(port: u16, password: Option<&str>, tls_ca: Option<&std::path::Path>) -> bool {
    query::<String>(port, password, tls_ca, &["PING"]).is_ok_and(|pong| pong == "PONG")
}

/// A `redis-server` stopped by PID on drop (its folders removed).
pub struct RedisServer {
    process: Option<Process>,
    pub port: u16,
    /// Certificate authority file when the server speaks TLS only.
    pub tls_ca: Option<PathBuf>,
    tls_dir: Option<PathBuf>,
    /// The server's working folder: its snapshot and append-only file when it persists, else only
    /// what replication writes (never the caller's working directory).
    data_dir: Option<PathBuf>,
    /// Whether a restart loads what the folder holds.
    persistent: bool,
    /// Arguments of every start.
    args: Vec<String>,
    /// The server's `requirepass`, which [`RedisServer::query`] authenticates with.
    password: Option<String>,
}

impl RedisServer {
    /// Starts `redis-server` on a free port with nothing on disk and waits until it answers PING.
    pub fn start() -> RedisServer {
        Self::try_start(&[], false).expect("redis-server must be installed (scripts/test installs it)")
    }

    /// Starts `redis-server` keeping its data in a folder of its own: snapshots only when told (`SAVE`)
    /// plus whatever `extra` asks for (`--appendonly yes`, `--replicaof …`). A restart loads what is there.
    pub fn start_persistent(extra: &[&str]) -> RedisServer {
        Self::try_start(extra, true).expect("redis-server must be installed (scripts/test installs it)")
    }

    /// Starts with `extra` arguments; with `persistent`, in a data folder of its own (see
    /// [`RedisServer::start_persistent`]), else with nothing on disk.
    pub fn try_start(extra: &[&str], persistent: bool) -> anyhow::Result<RedisServer> {
        Self::try_start_on(try_free_port()?, extra, persistent)
    }

    /// As [`RedisServer::try_start`], on `port`.
    pub fn try_start_on(port: u16, extra: &[&str], persistent: bool) -> anyhow::Result<RedisServer> {
        Self::launch(port, extra, persistent, None)
    }

    /// Starts on `port` accepting only TLS (also between servers: replication and a cluster's bus), with
    /// the certificates [`make_certificates`] wrote into `certificates`; `extra` as for
    /// [`RedisServer::try_start`].
    pub fn try_start_tls_on(port: u16, extra: &[&str], certificates: &std::path::Path) -> anyhow::Result<RedisServer> {
        let file = |name: &str| certificates.join(name).display().to_string();
        let (cert, key, ca) = (file("server.crt"), file("server.key"), file("ca.crt"));
        let port_text = port.to_string();
        let mut args: Vec<&str> = vec!["--port", "0", "--tls-port", &port_text];
        args.extend(["--tls-cert-file", &cert, "--tls-key-file", &key, "--tls-ca-cert-file", &ca]);
        args.extend(["--tls-auth-clients", "no", "--tls-replication", "yes", "--tls-cluster", "yes"]);
        args.extend(extra);
        Self::launch(port, &args, false, Some(certificates.join("ca.crt")))
    }

    /// Starts on `port` in a data folder of its own with `extra` arguments (persisting or not); over TLS
    /// only when `tls_ca` (the authority the helpers then trust) is given.
    fn launch(port: u16, extra: &[&str], persistent: bool, tls_ca: Option<PathBuf>) -> anyhow::Result<RedisServer> {
        let mut args: Vec<String> = vec!["--save".into(), String::new()];
        let dir = scratch_dir("herald-redis")?;
        args.extend(["--dir".to_owned(), dir.display().to_string()]);
        if !persistent {
            args.extend(["--appendonly".to_owned(), "no".to_owned()]);
        }
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        // A `--requirepass` among the arguments is the password the helpers authenticate with.
        let password = extra.windows(2).find(|pair| pair[0] == "--requirepass").map(|pair| pair[1].to_owned());
        let mut server =
            RedisServer { process: None, port, tls_ca, tls_dir: None, data_dir: Some(dir), persistent, args, password };
        server.try_restart()?;
        Ok(server)
    }

    /// Starts `redis-server` accepting only TLS, with a certificate for 127.0.0.1 signed by a fresh
    /// certificate authority (made with the `openssl` command).
    pub fn start_tls() -> RedisServer {
        Self::try_start_tls().expect("redis-server and openssl must be installed (scripts/test installs them)")
    }

    pub fn try_start_tls() -> anyhow::Result<RedisServer> {
        let dir = scratch_dir("herald-tls")?;
        make_certificates(&dir)?;
        let port = try_free_port()?;
        let process = Process::spawn(
            Command::new("redis-server")
                .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--tls-cert-file", "server.crt", "--tls-key-file", "server.key", "--tls-ca-cert-file", "ca.crt"])
                .args(["--tls-auth-clients", "no"])
                .current_dir(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            "redis-server (TLS)",
        )?;
        // Ready once the TLS port accepts connections (a TLS PING needs a TLS client; Herald's engine
        // waits for Redis at start-up anyway).
        wait_until("TLS redis-server did not accept connections", START_TIME, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })?;
        Ok(RedisServer {
            process: Some(process),
            port,
            tls_ca: Some(dir.join("ca.crt")),
            tls_dir: Some(dir),
            data_dir: None,
            persistent: false,
            args: Vec::new(),
            password: None,
        })
    }

    /// `redis://127.0.0.1:<port>/0` (`rediss://` for a TLS server).
    pub fn url(&self) -> String {
        let scheme = if self.tls_ca.is_some() { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}/0", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's PID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Process::pid)
    }

    /// Starts (again) on the same port: with nothing on disk, or from its folder when it persists.
    pub fn restart(&mut self) {
        self.try_restart().expect("redis-server restarts");
    }

    pub fn try_restart(&mut self) -> anyhow::Result<()> {
        if self.process.is_some() {
            bail!("redis-server on port {} is already running", self.port);
        }
        if let (false, Some(dir)) = (self.persistent, &self.data_dir) {
            // A snapshot a replica received (or a test's SAVE) must not survive a restart "with nothing
            // on disk".
            let _ = std::fs::remove_file(dir.join("dump.rdb"));
        }
        let process = Process::spawn(
            Command::new("redis-server")
                .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
                .args(&self.args)
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
            "redis-server",
        )?;
        self.process = Some(process);
        let (port, password, tls_ca) = (self.port, self.password.clone(), self.tls_ca.clone());
        wait_until(&format!("redis-server on port {port} did not answer PING"), START_TIME, || {
            answers_ping(port, password.as_deref(), tls_ca.as_deref())
        })
    }

    /// Kills the server (SIGKILL, like a crash; a stopped one is woken first) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    /// Kills the server, waits `down_for`, and starts it again (empty, or from its folder).
    pub fn crash_and_restart(&mut self, down_for: Duration) -> anyhow::Result<()> {
        self.stop();
        std::thread::sleep(down_for);
        self.try_restart()
    }

    /// Sends a signal to the server's process (`STOP` and `CONT` make a replica lag for real).
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        match &self.process {
            Some(process) => process.signal(signal),
            None => bail!("redis-server on port {} is not running", self.port),
        }
    }

    /// Runs one command and converts its answer (`String` for a status or bulk string, `i64` for an
    /// integer, `redis::Value` for anything).
    pub fn query<T: ::redis::FromRedisValue>(&self, args: &[&str]) -> anyhow::Result<T> {
        query(self.port, self.password.as_deref(), self.tls_ca.as_deref(), args)
    }

    /// A field of an `INFO` section (`replication`, `persistence`, …).
    pub fn info(&self, section: &str, field: &str) -> Option<String> {
        let info: String = self.query(&["INFO", section]).ok()?;
        info.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':')).map(|v| v.trim().to_owned())
    }

    /// A field of `CLUSTER INFO`.
    pub fn info_cluster(&self, field: &str) -> Option<String> {
        let info: String = self.query(&["CLUSTER", "INFO"]).ok()?;
        info.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':')).map(|v| v.trim().to_owned())
    }

    /// A field of `INFO replication`.
    pub fn replication(&self, field: &str) -> Option<String> {
        self.info("replication", field)
    }

    /// `PUBSUB NUMSUB channel`: how many connections (nodes) subscribe to it (`u64::MAX` if unknown).
    pub fn numsub(&self, channel: &str) -> u64 {
        let answer: anyhow::Result<(String, u64)> = self.query(&["PUBSUB", "NUMSUB", channel]);
        answer.map_or(u64::MAX, |(_, count)| count)
    }

    /// Waits until this replica follows `primary` (its link is up).
    pub fn wait_synced(&self, primary: &RedisServer) -> anyhow::Result<()> {
        let port = primary.port.to_string();
        wait_until(&format!("the replica of port {port} did not catch up"), START_TIME, || {
            self.replication("master_link_status").as_deref() == Some("up")
                && self.replication("master_port").as_deref() == Some(port.as_str())
        })
    }

    /// Total calls of every command since the last `CONFIG RESETSTAT`.
    pub fn total_calls(&self) -> anyhow::Result<u64> {
        let info: String = self.query(&["INFO", "commandstats"])?;
        Ok(info
            .lines()
            .filter_map(|l| l.split_once("calls=").map(|(_, rest)| rest))
            .filter_map(|rest| rest.split(',').next()?.parse::<u64>().ok())
            .sum())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        for dir in [self.tls_dir.take(), self.data_dir.take()].into_iter().flatten() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Writes `ca.crt`, `server.crt` (for IP 127.0.0.1, signed by the CA) and `server.key` into `dir`, with
/// Debian's `openssl`.
pub fn make_certificates(dir: &std::path::Path) -> anyhow::Result<()> {
    let openssl = |args: &[&str]| -> anyhow::Result<()> {
        let status = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("running openssl (is it installed?)")?;
        if !status.success() {
            bail!("openssl {args:?} failed");
        }
        Ok(())
    };
    let ca = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt"];
    openssl(&[&ca[..], &["-days", "2", "-subj", "/CN=herald-test-ca"]].concat())?;
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
    ])?;
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")?;
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
    ])
}

/// Three `redis-server --sentinel` processes watching one primary (quorum 2), stopped by PID on drop.
pub struct Sentinels {
    processes: Vec<Process>,
    pub ports: Vec<u16>,
    dir: PathBuf,
}

impl Sentinels {
    /// Starts three sentinels for the primary on `primary_port`, named `master`; a primary silent for
    /// one second is failed over.
    pub fn start(master: &str, primary_port: u16) -> Sentinels {
        Self::try_start(master, primary_port).expect("redis-server --sentinel starts")
    }

    pub fn try_start(master: &str, primary_port: u16) -> anyhow::Result<Sentinels> {
        let dir = scratch_dir("herald-sentinel")?;
        let mut sentinels = Sentinels { processes: Vec::new(), ports: Vec::new(), dir };
        for i in 0..3 {
            let port = try_free_port()?;
            // Sentinels rewrite their configuration file, so each gets a writable one of its own.
            let file = sentinels.dir.join(format!("sentinel-{i}.conf"));
            let config = format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor {master} 127.0.0.1 {primary_port} 2\n\
                 sentinel down-after-milliseconds {master} 1000\nsentinel failover-timeout {master} 10000\n\
                 sentinel parallel-syncs {master} 1\n",
                sentinels.dir.display()
            );
            std::fs::write(&file, config).context("writing a sentinel's configuration")?;
            let process = Process::spawn(
                Command::new("redis-server").arg(&file).arg("--sentinel").stdout(Stdio::null()).stderr(Stdio::null()),
                "redis-server --sentinel",
            )?;
            sentinels.processes.push(process);
            sentinels.ports.push(port);
        }
        for port in &sentinels.ports {
            wait_until(&format!("sentinel on port {port} did not answer PING"), START_TIME, || {
                answers_ping(*port, None, None)
            })?;
        }
        Ok(sentinels)
    }

    /// `redis+sentinel://…/<master>/0` for this set.
    pub fn url(&self, master: &str) -> String {
        let hosts: Vec<String> = self.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        format!("redis+sentinel://{}/{master}/0", hosts.join(","))
    }
}

impl Drop for Sentinels {
    fn drop(&mut self) {
        self.processes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
