//! A `herald` process started for a benchmark: its address, CPU time and resident memory.

use std::net::SocketAddr;
use std::process::Stdio;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub struct Node {
    child: Child,
    pid: u32,
    pub addr: SocketAddr,
    binary: String,
    env: Vec<(String, String)>,
}

impl Node {
    /// Starts `herald --listen 127.0.0.1:0` with `env` and waits for its listening line.
    pub async fn start(binary: &str, env: &[(&str, &str)]) -> anyhow::Result<Node> {
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let (child, pid, addr) = spawn(binary, "127.0.0.1:0", &env).await?;
        Ok(Node { child, pid, addr, binary: binary.to_owned(), env })
    }

    /// Sends `signal` (e.g. "TERM", "KILL") to the process.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = std::process::Command::new("kill").args(["-s", signal, &self.pid.to_string()]).status()?;
        if !status.success() {
            bail!("kill -s {signal} {} failed", self.pid);
        }
        Ok(())
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self) -> anyhow::Result<()> {
        self.child.wait().await?;
        Ok(())
    }

    /// Starts the process again on the same address (after it exited).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let (child, pid, addr) = spawn(&self.binary, &self.addr.to_string(), &self.env).await?;
        self.child = child;
        self.pid = pid;
        self.addr = addr;
        Ok(())
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// User plus system CPU seconds the process has used.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        cpu_seconds_of(self.pid)
    }

    /// Resident set size in bytes.
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("VmRSS")?;
        let kib: u64 = line.split_whitespace().nth(1).context("VmRSS value")?.parse()?;
        Ok(kib * 1024)
    }

    /// Resident bytes by kind of mapping, from `/proc/<pid>/smaps`: the main heap (`[heap]`), other
    /// anonymous mappings (glibc's per-thread arenas, large allocations, thread stacks) and file-backed
    /// mappings (the binary and libraries).
    pub fn rss_breakdown(&self) -> anyhow::Result<serde_json::Value> {
        let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", self.pid))?;
        let (mut heap, mut anon, mut file, mut anon_mappings) = (0u64, 0u64, 0u64, 0u64);
        let mut kind = 0;
        for line in smaps.lines() {
            let mut fields = line.split_whitespace();
            let Some(first) = fields.next() else { continue };
            if first.contains('-') && !first.ends_with(':') {
                let name = line.split_whitespace().nth(5);
                kind = match name {
                    Some("[heap]") => 0,
                    None => 1,
                    Some(_) => 2,
                };
                if kind == 1 {
                    anon_mappings += 1;
                }
            } else if first == "Rss:" {
                let kib: u64 = fields.next().context("Rss value")?.parse()?;
                match kind {
                    0 => heap += kib * 1024,
                    1 => anon += kib * 1024,
                    _ => file += kib * 1024,
                }
            }
        }
        Ok(serde_json::json!({"heap": heap, "anonymous": anon, "anonymous_mappings": anon_mappings, "file": file}))
    }
}

async fn spawn(binary: &str, listen: &str, env: &[(String, String)]) -> anyhow::Result<(Child, u32, SocketAddr)> {
    let mut command = Command::new(binary);
    command.args(["--listen", listen]).stdout(Stdio::piped()).stderr(Stdio::inherit()).kill_on_drop(true);
    // Benchmarks measure throughput: no per-key publish rate limit, room for every connection.
    command
        .env("HERALD_LIMITS__MAX_CONNECTIONS", "200000")
        .env("HERALD_LIMITS__PUBLISH_RATE_PER_KEY", "0")
        .env("HERALD_LOG", "warn");
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child =
        command.spawn().with_context(|| format!("starting {binary} (build it with cargo build --release)"))?;
    let pid = child.id().context("herald exited at once")?;
    let stdout = child.stdout.take().context("herald stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).await.context("reading the listening line")?;
    let parsed: serde_json::Value = serde_json::from_str(&line).with_context(|| format!("listening line {line:?}"))?;
    let Some(addr) = parsed["listening"].as_str() else { bail!("no listening address in {line:?}") };
    Ok((child, pid, addr.parse()?))
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// User plus system CPU seconds process `pid` has used.
pub fn cpu_seconds_of(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("stat format")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11).context("utime")?.parse()?;
    let stime: f64 = fields.get(12).context("stime")?.parse()?;
    Ok((utime + stime) / clock_ticks())
}

fn clock_ticks() -> f64 {
    // USER_HZ is 100 on every Linux configuration this runs on.
    100.0
}
