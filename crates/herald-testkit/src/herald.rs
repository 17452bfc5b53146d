//! A `herald` process: started with flags and `HERALD_*` variables, ready once it printed its
//! listening line (`{"listening":"127.0.0.1:PORT","node":"…"}`), stopped by PID.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::process::Process;

/// Where a `herald` process's log (its standard error) goes.
#[derive(Debug, Clone, Default)]
pub enum Stderr {
    #[default]
    Null,
    Inherit,
    /// Written to this file (made anew at each start).
    File(PathBuf),
}

/// How to start a `herald` process.
#[derive(Debug, Clone)]
pub struct HeraldSpec {
    pub binary: PathBuf,
    /// `--listen` (port 0 picks a free one; a restart reuses the port first bound).
    pub listen: String,
    /// Other flags.
    pub args: Vec<String>,
    /// Environment variables set for the process (on top of this process's own).
    pub env: Vec<(String, String)>,
    pub stderr: Stderr,
}

impl HeraldSpec {
    /// `binary --listen 127.0.0.1:0` with no other flag, variable or log.
    pub fn new(binary: impl Into<PathBuf>) -> HeraldSpec {
        HeraldSpec {
            binary: binary.into(),
            listen: "127.0.0.1:0".to_owned(),
            args: Vec::new(),
            env: Vec::new(),
            stderr: Stderr::Null,
        }
    }

    pub fn args(mut self, args: &[&str]) -> HeraldSpec {
        self.args.extend(args.iter().map(|a| (*a).to_owned()));
        self
    }

    pub fn env(mut self, env: &[(&str, &str)]) -> HeraldSpec {
        self.env.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        self
    }

    pub fn stderr(mut self, stderr: Stderr) -> HeraldSpec {
        self.stderr = stderr;
        self
    }
}

/// A running `herald`, killed (SIGKILL) on drop.
pub struct Herald {
    process: Process,
    /// The address it bound.
    pub addr: SocketAddr,
    /// Its node name.
    pub node: String,
    spec: HeraldSpec,
}

impl Herald {
    /// Starts the process and waits for its listening line.
    pub fn start(spec: HeraldSpec) -> anyhow::Result<Herald> {
        let (process, addr, node) = spawn(&spec)?;
        Ok(Herald { process, addr, node, spec })
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// `http://<addr><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Sends `signal` (`TERM`, `KILL`, …) to the process, by PID.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        self.process.signal(signal)
    }

    /// The exit code once the process has exited, without waiting (`Some(None)` after a signal).
    pub fn try_exit(&mut self) -> anyhow::Result<Option<Option<i32>>> {
        Ok(self.process.try_exit()?.map(|status| status.code()))
    }

    /// Waits up to `bound` for the process to exit; its exit code (`None` after a signal).
    pub fn wait_exit(&mut self, bound: Duration) -> anyhow::Result<Option<i32>> {
        self.process.wait_exit(bound)
    }

    /// Starts the process again (after it exited) on the address it had, with the same settings.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        *self = Herald::start(self.restart_spec())?;
        Ok(())
    }

    /// How to start this process again on the address it had (for a caller that starts it elsewhere,
    /// such as on a blocking thread).
    pub fn restart_spec(&self) -> HeraldSpec {
        HeraldSpec { listen: self.addr.to_string(), ..self.spec.clone() }
    }
}

fn spawn(spec: &HeraldSpec) -> anyhow::Result<(Process, SocketAddr, String)> {
    let stderr = match &spec.stderr {
        Stderr::Null => Stdio::null(),
        Stderr::Inherit => Stdio::inherit(),
        Stderr::File(path) => Stdio::from(
            std::fs::File::create(path).with_context(|| format!("creating the log file {}", path.display()))?,
        ),
    };
    let mut command = Command::new(&spec.binary);
    command.args(["--listen", &spec.listen]).args(&spec.args).stdout(Stdio::piped()).stderr(stderr);
    command.envs(spec.env.iter().map(|(k, v)| (k, v)));
    let name = spec.binary.display().to_string();
    let mut process = Process::spawn(&mut command, &name)?;
    let stdout = process.take_stdout().context("herald's standard output")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).context("reading herald's listening line")?;
    let (addr, node) = parse_listening_line(&line)?;
    Ok((process, addr, node))
}

/// The address and node name of a listening line.
pub fn parse_listening_line(line: &str) -> anyhow::Result<(SocketAddr, String)> {
    let parsed: serde_json::Value =
        serde_json::from_str(line).with_context(|| format!("the listening line is not JSON: {line:?}"))?;
    let Some(addr) = parsed["listening"].as_str() else { bail!("no listening address in {line:?}") };
    let node = parsed["node"].as_str().unwrap_or_default().to_owned();
    Ok((addr.parse().with_context(|| format!("listening address {addr:?}"))?, node))
}
