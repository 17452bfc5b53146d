//! The scaling scenario, small: several `herald` processes, browsers behind a balancer, callbacks to
//! random nodes. The naive design loses updates silently; the Redis, Redis Cluster and NATS designs lose
//! none, under each fault and under all of them at once.

use herald_bench::scenario::{self, Report, ScenarioArgs};

fn args(engine: &str) -> ScenarioArgs {
    ScenarioArgs {
        nodes: 3,
        clients: 24,
        jobs: 300,
        seconds: 3,
        engine: engine.to_owned(),
        kill_node: false,
        rolling_restart: false,
        restart_engine: false,
        rollback_engine: false,
        failover_engine: false,
        reshard: false,
        kill_engine_server: false,
        drop_connections: 0.0,
        offline_ms: None,
        slow_clients: 0.0,
        direct: false,
        json: true,
        drain_window_ms: 1000,
        max_reconnects_per_sec: None,
    }
}

async fn check(args: ScenarioArgs) -> Report {
    let report = scenario::run(env!("CARGO_BIN_EXE_herald"), &args).await.expect("scenario runs");
    println!("{}", report.table());
    assert_eq!(report.published + report.publish_failed, args.jobs as u64, "every job was sent");
    assert_eq!(
        report.delivered_live + report.recovered + report.reset_covered + report.lost_silently,
        report.published,
        "every published update is accounted for once"
    );
    report
}

async fn no_silent_loss(args: ScenarioArgs) {
    let report = check(args).await;
    assert_eq!(report.lost_silently, 0, "{}", report.table());
    assert_eq!(report.positions_reused, 0, "{}", report.table());
    assert_eq!(report.publish_failed, 0, "{}", report.table());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_naive_design_loses_about_two_thirds_silently() {
    let report = check(args("naive")).await;
    let lost = report.lost_silently as f64 / report.published as f64;
    assert!((0.5..0.8).contains(&lost), "expected about 2/3 lost with 3 uncoordinated nodes: {}", report.table());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_design_loses_nothing() {
    no_silent_loss(args("redis")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nats_design_loses_nothing_under_every_fault_and_a_nats_server_killed() {
    let report = check(ScenarioArgs {
        kill_node: true,
        rolling_restart: true,
        drop_connections: 0.2,
        kill_engine_server: true,
        seconds: 6,
        ..args("nats")
    })
    .await;
    assert_eq!((report.lost_silently, report.positions_reused), (0, 0), "{}", report.table());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_silent_loss_on_a_redis_cluster_with_slots_moved_and_a_shard_failed_over() {
    no_silent_loss(ScenarioArgs { reshard: true, failover_engine: true, ..args("redis-cluster") }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_silent_loss_when_a_node_is_killed() {
    no_silent_loss(ScenarioArgs { kill_node: true, ..args("redis") }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_silent_loss_during_a_rolling_restart() {
    no_silent_loss(ScenarioArgs { rolling_restart: true, ..args("redis") }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_silent_loss_when_redis_restarts() {
    no_silent_loss(ScenarioArgs { restart_engine: true, ..args("redis") }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_silent_loss_when_redis_comes_back_from_an_older_snapshot() {
    let report = check(ScenarioArgs { rollback_engine: true, ..args("redis") }).await;
    assert_eq!((report.lost_silently, report.positions_reused), (0, 0), "{}", report.table());
    assert!(report.resets > 0, "clients that saw lost publications are told: {}", report.table());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_silent_loss_when_redis_fails_over_to_a_lagging_replica() {
    no_silent_loss(ScenarioArgs { failover_engine: true, kill_node: true, drop_connections: 0.3, ..args("redis") })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_silent_loss_with_flaky_connections_and_slow_clients() {
    no_silent_loss(ScenarioArgs { drop_connections: 0.3, slow_clients: 0.3, ..args("redis") }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_silent_loss_with_every_fault_at_once() {
    no_silent_loss(ScenarioArgs {
        kill_node: true,
        rolling_restart: true,
        restart_engine: true,
        rollback_engine: true,
        drop_connections: 0.3,
        slow_clients: 0.3,
        ..args("redis")
    })
    .await;
}
