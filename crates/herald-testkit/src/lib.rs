//! Test support shared by Herald's integration tests (`crates/herald-server/tests`) and `herald-bench`:
//! child processes stopped by PID, free loopback ports, `redis-server` (plain, persistent, TLS, with
//! sentinels, a Redis Cluster), `nats-server -js` (one server, or a three-server JetStream cluster)
//! and `herald` processes.
//!
//! It holds no Herald logic and knows nothing of Herald's crates: it starts programs, waits until they
//! answer, and stops them. Every wait is bounded and fails with a message instead of hanging. Helpers
//! that tests call return the value itself and panic with a message when a program cannot be started;
//! the `try_` variants return errors for the benchmark tool.

pub mod herald;
pub mod nats;
pub mod process;
pub mod proxy;
pub mod redis;
pub mod redis_cluster;

pub use herald::{Herald, HeraldSpec, Stderr};
pub use nats::{NatsCluster, NatsServer};
pub use process::{Process, free_port, scratch_dir};
pub use proxy::Proxy;
pub use redis::{RedisServer, Sentinels, make_certificates};
pub use redis_cluster::RedisCluster;
