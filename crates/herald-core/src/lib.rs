//! Herald's core: what delivery means, independent of transport and coordination service.
//!
//! It holds channels and positions (`channel`, `position`), publications and their envelope
//! (`publication`), the hub (this node's registry of connections and the fan-out to their bounded
//! queues: `hub`, `outbound`), sessions (per-connection ordering, recovery and resets: `session`), the
//! `Engine` contract (`engine`), the embedded in-memory engine (`memory`), and what every distributed
//! engine shares (`cluster`: ordering, gap repair, re-sync, rollback detection, node-to-node protocols).
//!
//! It must not know HTTP, sockets, transport framing (SSE, WebSocket), configuration files, or any
//! engine's client library: the server, an embedding application and the engine crates build on it,
//! never the reverse. Inside, dependencies run one way: `session` -> `hub` -> `outbound`/`engine` ->
//! `publication` -> `position` -> `channel`; no module imports one that imports it back.

pub mod channel;
pub mod cluster;
pub mod engine;
pub mod hub;
pub mod lifecycle;
pub mod memory;
pub mod outbound;
pub mod policy;
pub mod position;
pub mod publication;
pub mod receipt;
pub mod session;
pub mod stats;
mod sync;
#[cfg(test)]
mod tests;

pub use channel::{ChannelError, ChannelName};
pub use cluster::{Backplane, BackplaneStats, ClusterEngine, Link, Recipient, Relay, RelayConfig};
pub use engine::{
    Engine, EngineError, EngineSink, EngineStats, History, NodeInfo, NodeReceipt, PresenceEntry, PublishOutcome,
    PublishRequest, ReceiptRequest,
};
pub use hub::{DeliveryReport, Hub, HubConfig, HubError};
pub use lifecycle::{EventKind, LifecycleEvent, LifecycleSink, LifecycleStore, MemoryLifecycle, Transition};
pub use memory::MemoryEngine;
pub use outbound::{CloseHook, CloseReason, Outbound};
pub use policy::{HistoryPolicy, Policies};
pub use position::{CursorError, Epoch, Position, decode_cursor, encode_cursor};
pub use publication::Publication;
pub use session::{ResetReason, Session, SessionEvent, Transport};
pub use stats::{DeliveryHealth, LatencyHistogram, NodeStats, StatsSnapshot};
