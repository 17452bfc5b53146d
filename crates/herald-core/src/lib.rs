//! Herald's core: channels, stream positions, publications, the hub (this node's registry of
//! connections and the fan-out to them), per-connection sessions with recovery, the `Engine` trait and
//! the embedded in-memory engine.
//!
//! Deliberately absent: HTTP, sockets, serialisation of transports, any particular coordination
//! service. The server crate, an embedding axum application and the benchmarks all build on this.

pub mod channel;
pub mod cluster;
pub mod engine;
pub mod hub;
pub mod memory;
pub mod policy;
pub mod position;
pub mod publication;
pub mod receipt;
pub mod session;
pub mod stats;

pub use channel::{ChannelError, ChannelName};
pub use cluster::{Backplane, BackplaneStats, ClusterEngine, Link, Recipient, Relay, RelayConfig};
pub use engine::{
    Engine, EngineError, EngineSink, EngineStats, History, NodeInfo, NodeReceipt, PresenceEntry, PublishOutcome,
    PublishRequest, ReceiptRequest,
};
pub use hub::{CloseHook, CloseReason, DeliveryReport, Hub, HubConfig, HubError, LatencyHistogram, Outbound};
pub use memory::MemoryEngine;
pub use policy::{HistoryPolicy, Policies};
pub use position::{CursorError, Epoch, Position, decode_cursor, encode_cursor};
pub use publication::Publication;
pub use session::{ResetReason, Session, SessionEvent, Transport};
pub use stats::{DeliveryHealth, NodeStats, StatsSnapshot};
