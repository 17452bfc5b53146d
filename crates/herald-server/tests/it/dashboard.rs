//! The dashboard in a real headless browser (Debian's Chromium): against a running two-node cluster it
//! polls `/v1/cluster`, and the numbers it shows appear and move while publications flow.
//!
//! The browser runs in real time and the test reads the page through the Chrome DevTools protocol
//! (`Runtime.evaluate` over the page's WebSocket), waiting for each condition instead of guessing how
//! long the page needs: per-node totals reach `/v1/cluster` through heartbeats once a second, so the
//! page must stay open across at least one of them.

use std::process::{Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::TIMEOUT;
use herald_testkit::{Process, RedisServer, scratch_dir};

const CHROMIUM: &str = "/usr/bin/chromium";

/// A headless Chromium with a private profile, stopped (by PID) and cleaned up on drop.
struct Browser {
    process: Process,
    profile: std::path::PathBuf,
}

impl Browser {
    fn start() -> Browser {
        assert!(
            std::path::Path::new(CHROMIUM).exists(),
            "{CHROMIUM} is missing: the dashboard test needs Debian's chromium (scripts/test installs it)"
        );
        let profile = scratch_dir("herald-chromium").expect("profile folder");
        let mut command = Command::new(CHROMIUM);
        command
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"])
            .args(["--disable-background-networking", "--disable-component-update", "--disable-sync"])
            .arg("--remote-debugging-address=127.0.0.1")
            .arg("--remote-debugging-port=0")
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let process = Process::spawn(&mut command, "chromium").expect("run chromium");
        Browser { process, profile }
    }

    /// The DevTools port, from the file Chromium writes into its profile once it listens.
    async fn devtools_port(&self) -> u16 {
        let file = self.profile.join("DevToolsActivePort");
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            if let Some(port) = std::fs::read_to_string(&file).ok().and_then(|t| t.lines().next()?.parse().ok()) {
                return port;
            }
            assert!(tokio::time::Instant::now() < deadline, "chromium did not open its DevTools port");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Opens `url` in the browser's page and returns a DevTools session on that page.
    async fn open(&self, url: &str) -> Page {
        let port = self.devtools_port().await;
        let targets: Value = crate::harness::client()
            .get(format!("http://127.0.0.1:{port}/json/list"))
            .send()
            .await
            .expect("DevTools target list")
            .json()
            .await
            .expect("DevTools JSON");
        let page = targets
            .as_array()
            .and_then(|all| all.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .expect("a page target")
            .to_owned();
        let (socket, _) = tokio_tungstenite::connect_async(page).await.expect("DevTools WebSocket");
        let mut page = Page { socket, next_id: 0 };
        page.call("Page.navigate", json!({"url": url})).await;
        page
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // SIGTERM lets Chromium stop its helper processes too; SIGKILL only if it does not exit.
        let _ = self.process.signal("TERM");
        if self.process.wait_exit(Duration::from_secs(5)).is_err() {
            self.process.kill();
        }
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

struct Page {
    socket: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    next_id: u64,
}

impl Page {
    /// Sends one DevTools command and returns its result (events in between are skipped).
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let command = json!({"id": id, "method": method, "params": params}).to_string();
        self.socket.send(Message::text(command)).await.expect("DevTools send");
        loop {
            let message = tokio::time::timeout(TIMEOUT, self.socket.next())
                .await
                .expect("DevTools answers in time")
                .expect("DevTools socket open")
                .expect("DevTools message");
            let Message::Text(text) = message else { continue };
            let reply: Value = serde_json::from_str(&text).expect("DevTools JSON");
            if reply["id"] == id {
                assert!(reply.get("error").is_none(), "{method} failed: {reply}");
                return reply["result"].clone();
            }
        }
    }

    /// What the page shows: polls made, last error, the total at the first poll, the total shown now
    /// and the number of nodes listed.
    async fn numbers(&mut self) -> Value {
        let expression = r#"JSON.stringify({
            polls: Number(document.body.dataset.polls || 0),
            error: document.body.dataset.lastError || "",
            first: document.body.dataset.firstPublished === undefined ? null : Number(document.body.dataset.firstPublished),
            shown: Number((document.getElementById("total-published") || {}).textContent),
            nodes: Number((document.getElementById("nodes-count") || {}).textContent)
        })"#;
        let result = self.call("Runtime.evaluate", json!({"expression": expression, "returnByValue": true})).await;
        result["result"]["value"].as_str().and_then(|text| serde_json::from_str(text).ok()).unwrap_or(Value::Null)
    }

    /// Reads the page until `done` holds for its numbers, or fails after [`TIMEOUT`].
    async fn until(&mut self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let numbers = self.numbers().await;
            if done(&numbers) {
                return numbers;
            }
            assert!(tokio::time::Instant::now() < deadline, "{what}; the page shows {numbers}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_live_cluster_numbers_in_a_real_browser() {
    let redis = RedisServer::start();
    let nodes = crate::cluster::cluster(&redis, 2).await;
    let (_sse, _) = crate::harness::Sse::open(&nodes[0], "channel=dash:1", None).await;
    for i in 0..5 {
        nodes[1].publish("dash:1", json!(i)).await;
    }
    let browser = Browser::start();
    let mut page = browser.open(&nodes[0].url("/dashboard")).await;
    let first = page
        .until("publications made before the page loaded are counted", |n| n["first"].as_u64().is_some_and(|f| f >= 5))
        .await;
    // Publications keep flowing while the page stays open.
    let publisher = {
        let url = nodes[1].url("/v1/publish");
        tokio::spawn(async move {
            let http = crate::harness::client();
            for i in 0..2000 {
                let _ = http.post(&url).json(&json!({"channel": "dash:1", "data": i})).send().await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let first_total = first["first"].as_u64().unwrap_or_default();
    let moved = page
        .until("the total moves while the page is open", |n| n["shown"].as_u64().is_some_and(|s| s > first_total))
        .await;
    publisher.abort();
    assert!(moved["polls"].as_u64().is_some_and(|p| p >= 2), "the page kept polling: {moved}");
    assert_eq!(moved["error"], "", "no error shown: {moved}");
    assert_eq!(moved["nodes"], 2, "both nodes listed: {moved}");
}
