//! The dashboard in a real headless browser (Debian's Chromium): against a running two-node cluster it
//! polls `/v1/cluster`, and the numbers it shows appear and move while publications flow.

use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::redis::RedisServer;

const CHROMIUM: &str = "/usr/bin/chromium";

/// Loads `url` in headless Chromium and returns the DOM after the page ran for `budget_ms` of its time.
fn dump_dom(url: &str, budget_ms: u64) -> String {
    assert!(
        std::path::Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: the dashboard test needs Debian's chromium (scripts/test installs it)"
    );
    let profile =
        std::env::temp_dir().join(format!("herald-chromium-{}-{}", std::process::id(), rand::random::<u32>()));
    let output = Command::new(CHROMIUM)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"])
        .args(["--disable-background-networking", "--disable-component-update", "--disable-sync"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--virtual-time-budget={budget_ms}"))
        .arg("--dump-dom")
        .arg(url)
        .output()
        .expect("run chromium");
    let _ = std::fs::remove_dir_all(profile);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn attribute(dom: &str, name: &str) -> Option<u64> {
    let start = dom.find(&format!("{name}=\""))? + name.len() + 2;
    dom[start..].split('"').next()?.parse().ok()
}

fn text_of(dom: &str, id: &str) -> Option<u64> {
    let start = dom.find(&format!("id=\"{id}\">"))? + id.len() + 6;
    dom[start..].split('<').next()?.trim().parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_live_cluster_numbers_in_a_real_browser() {
    let redis = RedisServer::start();
    let nodes = crate::cluster::cluster(&redis, 2).await;
    let (_sse, _) = crate::harness::Sse::open(&nodes[0], "channel=dash:1", None).await;
    for i in 0..5 {
        nodes[1].publish("dash:1", json!(i)).await;
    }
    // Keep publications flowing while the browser polls.
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
    let url = nodes[0].url("/dashboard");
    let dom = tokio::task::spawn_blocking(move || dump_dom(&url, 4000)).await.expect("browser");
    publisher.abort();
    let polls = attribute(&dom, "data-polls").unwrap_or(0);
    assert!(polls >= 2, "the page polled the cluster (data-polls = {polls})");
    assert!(dom.contains("data-last-error=\"\""), "no error shown");
    let first = attribute(&dom, "data-first-published").expect("first total recorded");
    let shown = text_of(&dom, "total-published").expect("total shown as a number");
    assert!(first >= 5, "publications made before the page loaded are counted ({first})");
    assert!(shown > first, "the total moved while the page was open ({first} -> {shown})");
    assert!(text_of(&dom, "nodes-count").is_some_and(|n| n == 2), "both nodes listed");
}
