//! A `herald` process started for a benchmark: its address, CPU time and resident memory.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use herald_testkit::{Herald, HeraldSpec, Stderr};

/// Environment of every node a benchmark starts: no per-key publish rate limit (benchmarks measure
/// throughput), room for every connection, warnings only.
const BENCH_ENV: [(&str, &str); 3] = [
    ("HERALD_LIMITS__MAX_CONNECTIONS", "200000"),
    ("HERALD_LIMITS__PUBLISH_RATE_PER_KEY", "0"),
    ("HERALD_LOG", "warn"),
];

pub struct Node {
    herald: Herald,
    pub addr: SocketAddr,
}

impl Node {
    /// Starts `herald --listen 127.0.0.1:0` with `env` (over [`BENCH_ENV`]) and waits for its
    /// listening line.
    pub async fn start(binary: &str, env: &[(&str, &str)]) -> anyhow::Result<Node> {
        let spec = HeraldSpec::new(binary).env(&BENCH_ENV).env(env).stderr(Stderr::Inherit);
        let herald = tokio::task::spawn_blocking(move || Herald::start(spec))
            .await?
            .with_context(|| format!("starting {binary} (build it with cargo build --release)"))?;
        Ok(Node { addr: herald.addr, herald })
    }

    /// Sends `signal` (e.g. "TERM", "KILL") to the process.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        self.herald.signal(signal)
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self) -> anyhow::Result<()> {
        while self.herald.try_exit()?.is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Starts the process again on the same address (after it exited).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        // The listening line is read on a blocking thread: the runtime keeps serving the other clients.
        let spec = self.herald.restart_spec();
        self.herald = tokio::task::spawn_blocking(move || Herald::start(spec)).await??;
        self.addr = self.herald.addr;
        Ok(())
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// User plus system CPU seconds the process has used.
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        cpu_seconds_of(self.herald.pid())
    }

    /// CPU time and wake-ups the process has used.
    pub fn usage(&self) -> anyhow::Result<Usage> {
        usage_of(self.herald.pid())
    }

    /// Resident set size in bytes.
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.herald.pid()))?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("VmRSS")?;
        let kib: u64 = line.split_whitespace().nth(1).context("VmRSS value")?.parse()?;
        Ok(kib * 1024)
    }

    /// Resident bytes by kind of mapping, from `/proc/<pid>/smaps`: the main heap (`[heap]`), other
    /// anonymous mappings (glibc's per-thread arenas, large allocations, thread stacks) and file-backed
    /// mappings (the binary and libraries).
    pub fn rss_breakdown(&self) -> anyhow::Result<serde_json::Value> {
        let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", self.herald.pid()))?;
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

/// What a process has used: CPU seconds in user space and in the kernel, and how many times its
/// threads went to sleep and were woken (voluntary context switches: a wait for a socket, a timer or
/// another thread), summed over its threads alive now.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub user_s: f64,
    pub system_s: f64,
    pub wakeups: u64,
}

impl Usage {
    pub fn cpu_s(&self) -> f64 {
        self.user_s + self.system_s
    }

    /// What was used since `before`.
    pub fn since(&self, before: &Usage) -> Usage {
        Usage {
            user_s: self.user_s - before.user_s,
            system_s: self.system_s - before.system_s,
            wakeups: self.wakeups.saturating_sub(before.wakeups),
        }
    }

    pub fn add(&mut self, other: &Usage) {
        self.user_s += other.user_s;
        self.system_s += other.system_s;
        self.wakeups += other.wakeups;
    }
}

/// [`Usage`] of process `pid` (`/proc/<pid>/stat`, and each thread's `status`).
pub fn usage_of(pid: u32) -> anyhow::Result<Usage> {
    let (user_s, system_s) = cpu_split_of(pid)?;
    let mut wakeups = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        // A thread that ended since the listing has nothing left to count.
        let Ok(status) = std::fs::read_to_string(task?.path().join("status")) else { continue };
        let switches = status.lines().find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"));
        wakeups += switches.and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(0);
    }
    Ok(Usage { user_s, system_s, wakeups })
}

/// User plus system CPU seconds process `pid` has used.
pub fn cpu_seconds_of(pid: u32) -> anyhow::Result<f64> {
    let (user, system) = cpu_split_of(pid)?;
    Ok(user + system)
}

/// User and system CPU seconds process `pid` has used.
fn cpu_split_of(pid: u32) -> anyhow::Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("stat format")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11).context("utime")?.parse()?;
    let stime: f64 = fields.get(12).context("stime")?.parse()?;
    Ok((utime / clock_ticks(), stime / clock_ticks()))
}

fn clock_ticks() -> f64 {
    // USER_HZ is 100 on every Linux configuration this runs on.
    100.0
}
