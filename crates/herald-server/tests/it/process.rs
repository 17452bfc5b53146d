//! The `herald` binary as a process: configuration errors, the listening line, SIGTERM.

use std::process::Command;
use std::time::Duration;

use herald_testkit::{Herald, HeraldSpec, Stderr};

/// A `herald` process of this test binary's build, killed on drop (a [`Herald`] whose failures panic).
pub struct Node(Herald);

impl std::ops::Deref for Node {
    type Target = Herald;

    fn deref(&self) -> &Herald {
        &self.0
    }
}

impl Node {
    /// Starts `herald --listen 127.0.0.1:0` with `env` and waits for its listening line.
    pub fn spawn(env: &[(&str, &str)]) -> Node {
        Self::start(HeraldSpec::new(env!("CARGO_BIN_EXE_herald")).env(env))
    }

    /// Like `spawn`, with the node's log (stderr) written to `log`.
    pub fn spawn_logging(env: &[(&str, &str)], log: &std::path::Path) -> Node {
        Self::start(HeraldSpec::new(env!("CARGO_BIN_EXE_herald")).env(env).stderr(Stderr::File(log.to_owned())))
    }

    fn start(spec: HeraldSpec) -> Node {
        Node(Herald::start(spec).expect("herald starts and prints its listening line"))
    }

    pub fn signal(&self, signal: &str) {
        self.0.signal(signal).expect("kill");
    }

    /// Waits up to `bound` for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, bound: Duration) -> Option<i32> {
        self.0.wait_exit(bound).expect("herald exits")
    }
}

fn run_bad(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
    command.args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().expect("run herald");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into(),
        String::from_utf8_lossy(&output.stderr).into(),
    )
}

/// Lifecycle webhooks configured (valid on their own).
const HOOKS: &[(&str, &str)] = &[
    ("HERALD_HOOKS__URL", "http://127.0.0.1:1/hooks"),
    ("HERALD_HOOKS__SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
];

#[test]
fn bad_configuration_exits_64_before_binding_and_names_every_problem() {
    let dir = std::env::temp_dir().join(format!("herald-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let bad_toml = dir.join("bad.toml");
    std::fs::write(&bad_toml, "listen = 5\n[history]\nsize = \"big\"\n").expect("write");
    let unknown_key = dir.join("unknown.toml");
    std::fs::write(&unknown_key, "lisen = \"127.0.0.1:1\"\n").expect("write");
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (vec!["--listen", "not-an-address"], vec![], "listen"),
        (vec!["--engine", "carrier-pigeon://x"], vec![], "engine"),
        (vec![], vec![("HERALD_LISTEN", "999.1.1.1:80")], "listen"),
        (vec![], vec![("HERALD_LIMITS__QUEUE_CAPACITY", "zero")], "queue_capacity"),
        (vec!["--config", "/nonexistent/herald.toml"], vec![], "does not exist"),
        (vec!["--config", bad_toml.to_str().unwrap_or_default()], vec![], "bad.toml"),
        (vec!["--config", unknown_key.to_str().unwrap_or_default()], vec![], "lisen"),
        (vec![], vec![("HERALD_CONFIG", unknown_key.to_str().unwrap_or_default())], "lisen"),
        (vec!["--engine", "nats://127.0.0.1:1"], HOOKS.to_vec(), "not supported on this engine yet"),
        (vec![], vec![("HERALD_HOOKS__URL", "http://127.0.0.1:1/h"), ("HERALD_HOOKS__SECRET", "nope")], "whsec_"),
    ];
    for (args, env, mentions) in cases {
        let (code, stdout, stderr) = run_bad(&args, &env);
        assert_eq!(code, Some(64), "{args:?} {env:?}: {stderr}");
        assert!(stdout.is_empty(), "nothing was bound: {stdout}");
        assert!(stderr.contains(mentions), "{args:?} {env:?}: {stderr}");
    }
    let (code, _, stderr) =
        run_bad(&["--listen", "nope", "--engine", "nope"], &[("HERALD_SSE__PING_INTERVAL_SECS", "0")]);
    assert_eq!(code, Some(64));
    assert_eq!(
        stderr.lines().filter(|l| l.trim_start().starts_with("- ")).count(),
        3,
        "all problems at once: {stderr}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn sigterm_drains_and_exits_promptly_with_clients_connected() {
    let mut node = Node::spawn(&[("HERALD_SHUTDOWN_GRACE_SECS", "5"), ("HERALD_DRAIN_WINDOW_MS", "500")]);
    let mut stream = std::net::TcpStream::connect(node.addr).expect("connect");
    use std::io::{Read, Write};
    stream.write_all(b"GET /v1/sse?channel=a HTTP/1.1\r\nHost: x\r\n\r\n").expect("request");
    let mut buffer = [0u8; 4096];
    let read = stream.read(&mut buffer).expect("read head");
    assert!(read > 0);
    node.signal("TERM");
    assert_eq!(node.wait_exit(Duration::from_secs(5)), Some(0));
    // The stream was ended by the server, not cut.
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    let text = String::from_utf8_lossy(&rest);
    assert!(
        text.contains("closed shutting_down") || String::from_utf8_lossy(&buffer[..read]).contains("shutting_down"),
        "{text}"
    );
}
