//! A child process stopped by its PID (never by name), free loopback ports, scratch folders and
//! bounded waits.

use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, ExitStatus};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A child process, killed (SIGKILL) and reaped on drop.
pub struct Process {
    child: Child,
    name: String,
}

impl Process {
    /// Spawns `command`; `name` goes into every error message.
    pub fn spawn(command: &mut Command, name: &str) -> anyhow::Result<Process> {
        let child = command.spawn().with_context(|| format!("starting {name} (is it installed?)"))?;
        Ok(Process { child, name: name.to_owned() })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (`TERM`, `KILL`, `STOP`, `CONT`, …) to this process, by PID.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let pid = self.pid().to_string();
        let status = Command::new("kill").args(["-s", signal, &pid]).status().context("running kill")?;
        if !status.success() {
            bail!("kill -s {signal} {pid} ({}) failed", self.name);
        }
        Ok(())
    }

    /// The process's standard output, if it was piped and not taken yet.
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    /// Whether the process has not exited yet.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_exit(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        self.child.try_wait().with_context(|| format!("checking on {}", self.name))
    }

    /// Waits up to `bound` for the process to exit; returns its exit code (`None` after a signal).
    pub fn wait_exit(&mut self, bound: Duration) -> anyhow::Result<Option<i32>> {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(status) = self.try_exit()? {
                return Ok(status.code());
            }
            if Instant::now() >= deadline {
                bail!("{} (pid {}) did not exit within {bound:?}", self.name, self.pid());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the process (SIGKILL, like a crash) and reaps it; a stopped one is woken first so that it
    /// exits at once. Does nothing to a process that already exited.
    pub fn kill(&mut self) {
        if self.running() {
            let _ = self.signal("CONT");
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A loopback TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    try_free_port().expect("a free loopback port")
}

pub fn try_free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A fresh, empty folder under the system's temporary folder, named after `prefix`, this process and
/// a counter (the caller removes it).
pub fn scratch_dir(prefix: &str) -> anyhow::Result<PathBuf> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("{prefix}-{}-{n}-{}", std::process::id(), try_free_port()?));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// Polls `ready` every 10 ms until it holds, for at most `bound`; fails naming `what`.
pub fn wait_until(what: &str, bound: Duration, mut ready: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + bound;
    while !ready() {
        if Instant::now() >= deadline {
            bail!("{what} within {bound:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}
