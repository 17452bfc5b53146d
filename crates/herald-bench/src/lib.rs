//! Herald's benchmark and scenario toolkit: start `herald` nodes and a `redis-server` of its own, drive
//! them with many SSE clients and publishers on loopback, and measure or account for every delivery.
//! The `herald-bench` binary is a thin command line over these modules; the scenario is also run by the
//! server crate's test suite.

pub mod clients;
pub mod cluster;
pub mod connect;
pub mod node;
pub mod scenario;
