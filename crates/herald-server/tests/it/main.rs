//! Integration tests of the server: real sockets on loopback, real HTTP, SSE and WebSocket clients.
//! One test binary (this one) keeps link times down; modules group features.

mod api;
mod auth;
mod cluster;
mod conformance;
mod dashboard;
mod harness;
mod history;
mod hooks;
mod jetstream;
mod lifecycle;
mod limits;
mod openapi;
mod process;
mod protocol;
mod proxy;
mod redis_cluster;
mod rollback;
mod scenario;
mod sse;
mod telemetry;
mod ws;
