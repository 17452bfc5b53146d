//! The helpers against the real programs: each server starts, answers, stops by PID and comes back.

use std::net::TcpStream;
use std::time::Duration;

use herald_testkit::{NatsCluster, NatsServer, RedisServer};

fn accepts(url: &str) -> bool {
    let address = url.trim_start_matches("nats://");
    TcpStream::connect_timeout(&address.parse().expect("host:port"), Duration::from_secs(1)).is_ok()
}

#[test]
fn a_persistent_redis_comes_back_with_what_it_saved() {
    let mut redis = RedisServer::start_persistent(&[]);
    assert_eq!(redis.query::<String>(&["SET", "k", "v"]).expect("SET"), "OK");
    assert_eq!(redis.query::<String>(&["SAVE"]).expect("SAVE"), "OK");
    redis.stop();
    assert!(redis.query::<String>(&["PING"]).is_err(), "stopped");
    redis.restart();
    assert_eq!(redis.query::<String>(&["GET", "k"]).expect("GET"), "v");
    assert_eq!(redis.replication("role").as_deref(), Some("master"));
    assert_eq!(redis.numsub("nobody"), 0);
}

#[test]
fn a_nats_server_restarts_on_its_port_with_its_store() {
    let mut nats = NatsServer::start();
    let url = nats.url();
    assert!(url.starts_with("nats://127.0.0.1:"), "{url}");
    assert!(accepts(&url));
    nats.stop();
    assert!(!accepts(&url), "stopped");
    assert!(nats.store_dir().join("jetstream").is_dir(), "the store stays");
    nats.restart();
    assert_eq!(nats.url(), url);
    assert!(accepts(&url));
}

#[test]
fn a_nats_cluster_member_is_killed_and_rejoins() {
    let mut cluster = NatsCluster::start(3);
    let urls = cluster.urls();
    assert_eq!(cluster.url(), urls.join(","));
    assert_eq!(cluster.len(), 3);
    cluster.kill(1);
    assert!(!accepts(&urls[1]));
    assert!(accepts(&urls[0]) && accepts(&urls[2]), "the others stay up");
    cluster.restart(1);
    assert!(accepts(&urls[1]));
}
