//! The whole example end to end: three replicas behind the balancer, the external system calling back
//! on random replicas, SQLite, and a browser-like SSE subscriber that connects through the balancer.
//! Redis is a `redis-server` of the test's own (no persistence, its own folder, a free port).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use herald_example_bff::{Coordination, Demo, JOB_FINISHED, Job, Options};
use herald_testkit::{RedisServer, scratch_dir};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::time::Instant;

const JOBS: usize = 30;
/// Bound of every wait for a condition.
const DEADLINE: Duration = Duration::from_secs(30);

/// One request per connection, so that the balancer spreads them (a kept-alive connection would stay
/// on one replica).
fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().pool_max_idle_per_host(0).build().expect("an HTTP client")
}

async fn start(coordination: Coordination, dir: &Path) -> Demo {
    let mut options = Options::new(coordination, dir.join("jobs.db"));
    // Jobs finish within a fraction of a second, spread enough to interleave.
    options.work = Duration::from_millis(20)..Duration::from_millis(400);
    Demo::start(options).await.expect("the demo starts")
}

/// What the SSE subscriber saw.
#[derive(Debug)]
enum Seen {
    Connected { node: String },
    Finished(Job),
    Reset { reason: String },
}

/// Logs `user` in through the balancer: the `Cookie` header value of its session.
async fn login(demo: &Demo, user: &str) -> String {
    let answer = http()
        .post(format!("{}api/session", demo.url()))
        .json(&serde_json::json!({ "user": user }))
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .expect("a session");
    let set_cookie = answer.headers().get("set-cookie").and_then(|v| v.to_str().ok()).expect("a session cookie");
    assert!(set_cookie.contains("HttpOnly"), "{set_cookie}");
    set_cookie.split(';').next().expect("name=value").to_owned()
}

/// A browser-like subscriber of `user:<user>` through the balancer: a login (the session cookie), then
/// the event stream of the nested Herald router, which asks the app who the cookie is (Herald's connect
/// proxy; no token). Events arrive on the receiver; dropping the handle's task (abort) closes the
/// stream.
async fn subscribe(demo: &Demo, user: &str) -> (mpsc::UnboundedReceiver<Seen>, tokio::task::JoinHandle<()>) {
    let cookie = login(demo, user).await;
    let url = format!("{}herald/v1/sse?channel=user:{user}", demo.url());
    let response = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("an HTTP client")
        .get(url)
        .header("cookie", cookie)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .expect("the event stream");
    let (tx, rx) = mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        let mut events = response.bytes_stream().eventsource();
        while let Some(Ok(event)) = events.next().await {
            let data: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
            let seen = match event.event.as_str() {
                "herald.connected" => Seen::Connected { node: data["node"].as_str().unwrap_or_default().to_owned() },
                "herald.reset" => Seen::Reset { reason: data["reason"].as_str().unwrap_or_default().to_owned() },
                JOB_FINISHED => Seen::Finished(serde_json::from_value(data["data"].clone()).expect("a job")),
                _ => continue,
            };
            if tx.send(seen).is_err() {
                return;
            }
        }
    });
    (rx, reader)
}

/// The next thing seen, within what is left until `deadline`.
async fn next(rx: &mut mpsc::UnboundedReceiver<Seen>, deadline: Instant, what: &str) -> Seen {
    match tokio::time::timeout_at(deadline, rx.recv()).await {
        Ok(Some(seen)) => seen,
        Ok(None) => panic!("the event stream ended while waiting for {what}"),
        Err(_) => panic!("no {what} within {DEADLINE:?}"),
    }
}

async fn connected(rx: &mut mpsc::UnboundedReceiver<Seen>) -> String {
    match next(rx, Instant::now() + DEADLINE, "herald.connected").await {
        Seen::Connected { node } => node,
        other => panic!("expected herald.connected first, got {other:?}"),
    }
}

/// Starts `n` jobs for `user` through the balancer; their ids.
async fn start_jobs(demo: &Demo, user: &str, n: usize) -> Vec<String> {
    let client = http();
    let mut ids = Vec::new();
    for _ in 0..n {
        let job: Job = client
            .post(format!("{}api/jobs", demo.url()))
            .json(&serde_json::json!({ "user": user }))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .expect("a job starts")
            .json()
            .await
            .expect("the job's JSON");
        assert_eq!(job.status, "pending");
        ids.push(job.id);
    }
    ids
}

/// The user's jobs as the app's own `GET /api/jobs` answers (what the page re-fetches).
async fn fetch_jobs(demo: &Demo, user: &str) -> Vec<Job> {
    let body: Value = http()
        .get(format!("{}api/jobs?user={user}", demo.url()))
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .expect("GET /api/jobs")
        .json()
        .await
        .expect("the jobs' JSON");
    serde_json::from_value(body["jobs"].clone()).expect("a list of jobs")
}

/// Every job in the SQLite file, read with a connection of the test's own.
fn database(dir: &Path) -> BTreeMap<String, Job> {
    let connection = herald_example_bff::db::open(&dir.join("jobs.db")).expect("the database opens");
    let jobs = herald_example_bff::db::all_jobs(&connection).expect("the jobs table");
    jobs.into_iter().map(|job| (job.id.clone(), job)).collect()
}

/// Polls `done` (every 20 ms) until it holds, for at most [`DEADLINE`].
async fn eventually<F: std::future::Future<Output = bool>>(what: &str, mut done: impl FnMut() -> F) {
    let deadline = Instant::now() + DEADLINE;
    while !done().await {
        assert!(Instant::now() < deadline, "{what} within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_every_result_arrives_live_and_is_in_sqlite() {
    let redis = RedisServer::start();
    let dir = scratch_dir("herald-bff").expect("a scratch folder");
    let demo = start(Coordination::Redis(redis.url()), &dir).await;
    let client = http();

    // The page and the client module come from the same origin, through the balancer.
    let page = client.get(demo.url()).send().await.expect("the page").text().await.expect("its text");
    assert!(page.contains("from '/herald/herald-client.js'"), "the page imports the nested client module");
    let module = client.get(format!("{}herald/herald-client.js", demo.url())).send().await.expect("the module");
    assert!(module.status().is_success());
    assert!(module.text().await.expect("its text").contains("reconcile"));

    // No session, or one the app never made: Herald's connect proxy asks the app, which says 401.
    let sse = format!("{}herald/v1/sse?channel=user:alice", demo.url());
    for cookie in [None, Some("bff_session=made-up")] {
        let mut request = client.get(&sse);
        if let Some(cookie) = cookie {
            request = request.header("cookie", cookie);
        }
        let answer = request.send().await.expect("an answer");
        assert_eq!(answer.status(), reqwest::StatusCode::UNAUTHORIZED, "{cookie:?}");
        let body: Value = answer.json().await.expect("Herald's JSON error");
        assert_eq!(body["error"]["code"], "unauthenticated", "{body}");
    }
    // A session is one user's: not another user's channel.
    let cookie = login(&demo, "mallory").await;
    let answer = client.get(&sse).header("cookie", cookie).send().await.expect("an answer");
    assert_eq!(answer.status(), reqwest::StatusCode::FORBIDDEN);

    let (mut rx, reader) = subscribe(&demo, "alice").await;
    let node = connected(&mut rx).await;
    let ids = start_jobs(&demo, "alice", JOBS).await;

    let mut live: BTreeMap<String, Job> = BTreeMap::new();
    let deadline = Instant::now() + DEADLINE;
    while live.len() < JOBS {
        match next(&mut rx, deadline, "every job's result").await {
            Seen::Finished(job) => assert!(live.insert(job.id.clone(), job).is_none(), "a result arrived twice"),
            other => panic!("unexpected {other:?} on a healthy cluster"),
        }
    }
    let stored = database(&dir);
    let expected: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(live.keys().collect::<BTreeSet<_>>(), expected);
    assert_eq!(stored.keys().collect::<BTreeSet<_>>(), expected);
    for (id, job) in &live {
        assert_eq!(job.status, "done");
        assert_eq!(Some(job), stored.get(id), "what arrived is what SQLite holds");
    }
    // The point of the example: most results were published on a replica other than the stream's.
    let elsewhere = live.values().filter(|job| job.finished_by.as_deref() != Some(node.as_str())).count();
    assert!(elsewhere > 0, "every webhook landed on the stream's replica {node}: the test proves nothing");

    reader.abort();
    demo.stop().await;
    drop(redis);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn naive_replicas_lose_updates_the_database_has() {
    let dir = scratch_dir("herald-bff-naive").expect("a scratch folder");
    let demo = start(Coordination::Naive, &dir).await;
    let (mut rx, reader) = subscribe(&demo, "bob").await;
    let node = connected(&mut rx).await;
    let ids = start_jobs(&demo, "bob", JOBS).await;

    // Every callback answered 200 and every job is done in SQLite …
    eventually("every callback acknowledged", || async { demo.callbacks_acknowledged() == JOBS }).await;
    let stored = database(&dir);
    assert_eq!(stored.len(), JOBS);
    assert!(stored.values().all(|job| job.status == "done"));
    // … but only the results whose webhook landed on the stream's replica reach the stream.
    let reachable: BTreeSet<String> = stored
        .values()
        .filter(|job| job.finished_by.as_deref() == Some(node.as_str()))
        .map(|job| job.id.clone())
        .collect();
    let mut live = BTreeSet::new();
    let deadline = Instant::now() + DEADLINE;
    while !reachable.is_subset(&live) {
        match next(&mut rx, deadline, "the results published on the stream's replica").await {
            Seen::Finished(job) => {
                assert_eq!(job.finished_by.as_deref(), Some(node.as_str()), "naive replicas do not share");
                live.insert(job.id);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let missing = JOBS - live.len();
    // With 3 replicas picked at random, all 30 webhooks landing on one replica has odds of 3^-30.
    assert!(missing >= 1, "no update went missing: {live:?}");
    // Nothing told the page: no reset. A reload from the app's database would show every job done.
    assert!(rx.try_recv().is_err(), "nothing more arrived");
    let fetched = fetch_jobs(&demo, "bob").await;
    assert_eq!(fetched.len(), JOBS);
    assert!(fetched.iter().all(|job| job.status == "done"));
    assert_eq!(fetched.iter().map(|job| &job.id).collect::<BTreeSet<_>>(), ids.iter().collect());
    eprintln!("naive: {missing} of {JOBS} updates never reached the stream on {node}");

    reader.abort();
    demo.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_resets_the_client_and_the_refetch_has_every_job() {
    let mut redis = RedisServer::start();
    let dir = scratch_dir("herald-bff-restart").expect("a scratch folder");
    let demo = start(Coordination::Redis(redis.url()), &dir).await;
    let (mut rx, reader) = subscribe(&demo, "carol").await;
    connected(&mut rx).await;

    let mut ids = start_jobs(&demo, "carol", JOBS / 2).await;
    let deadline = Instant::now() + DEADLINE;
    let mut live = BTreeSet::new();
    while live.len() < JOBS / 2 {
        match next(&mut rx, deadline, "the first jobs' results").await {
            Seen::Finished(job) => live.insert(job.id),
            other => panic!("unexpected {other:?} before the fault"),
        };
    }

    // Redis goes away, and jobs finish meanwhile: their webhooks save the result and answer 503 (not
    // published), so the external system retries them.
    redis.stop();
    ids.extend(start_jobs(&demo, "carol", JOBS / 2).await);
    let retried = || demo.external.counters.retried.load(Ordering::SeqCst);
    eventually("a webhook answered 503 while Redis is away", || async { retried() > 0 }).await;
    // Redis comes back with nothing: history, positions and idempotency keys are gone.
    redis = tokio::task::spawn_blocking(move || {
        redis.try_restart().expect("redis-server restarts empty");
        redis
    })
    .await
    .expect("the restart");

    // The stream stays open and says its channel must be reloaded …
    let deadline = Instant::now() + DEADLINE;
    let reason = loop {
        match next(&mut rx, deadline, "a reset after Redis restarted empty").await {
            Seen::Reset { reason } => break reason,
            Seen::Finished(job) => panic!("{} arrived before any reset, in an epoch the client cannot know", job.id),
            Seen::Connected { .. } => {}
        }
    };
    assert!(["epoch_changed", "history_gone", "gap"].contains(&reason.as_str()), "reset reason {reason}");
    // … and the reload, the app's own GET /api/jobs, has every job once the external system is done.
    eventually("every job done in the re-fetch", || async {
        let jobs = fetch_jobs(&demo, "carol").await;
        jobs.len() == JOBS && jobs.iter().all(|job| job.status == "done")
    })
    .await;
    let fetched: BTreeSet<String> = fetch_jobs(&demo, "carol").await.into_iter().map(|job| job.id).collect();
    assert_eq!(fetched, ids.into_iter().collect());
    assert_eq!(database(&dir).len(), JOBS);
    eprintln!("restart: reset {reason}; {} callback attempts refused while Redis was away", retried());

    reader.abort();
    demo.stop().await;
    drop(redis);
    let _ = std::fs::remove_dir_all(&dir);
}
