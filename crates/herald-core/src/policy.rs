//! Per-namespace settings the core and the engines apply: how much history a channel keeps (count and
//! bytes) and for how long, and how long idempotency keys are remembered.

use std::collections::HashMap;
use std::time::Duration;

use crate::channel::ChannelName;

/// Publications kept per channel unless a namespace says otherwise.
pub const DEFAULT_HISTORY_SIZE: usize = 256;
/// How long a publication stays in history unless a namespace says otherwise.
pub const DEFAULT_HISTORY_TTL: Duration = Duration::from_secs(15 * 60);
/// Envelope bytes kept per channel unless a namespace says otherwise: 8 MiB, so that the default 256
/// publications cannot pin 256 MiB (256 of the largest body, 1 MiB) in one channel, while ordinary
/// publications (a few KiB) are bounded by count long before bytes.
pub const DEFAULT_HISTORY_MAX_BYTES: usize = 8 * 1024 * 1024;
/// How long an idempotency key is remembered.
pub const DEFAULT_DEDUP_WINDOW: Duration = Duration::from_secs(24 * 60 * 60);

/// History settings of one namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryPolicy {
    /// Most publications kept; 0 keeps none (every reconnect that missed something gets a reset).
    pub size: usize,
    /// Age after which a publication leaves history.
    pub ttl: Duration,
    /// Most bytes of history kept: the sum of the kept publications' envelope lengths
    /// (`Publication::envelope().len()`). Every engine applies it the same way: after storing a
    /// publication, drop the oldest while the sum is over `max_bytes` **and more than one publication
    /// is left**. The newest publication is always kept (when `size` allows any), even if alone it is
    /// larger: a publication is never refused for its size here (`limits.max_body_bytes` bounds it at
    /// publish), and a client that missed only the latest publication can still recover it. One
    /// channel's history therefore holds at most `max(max_bytes, one envelope)` bytes of envelopes.
    /// (The in-memory engine also keeps each publication's WebSocket message, made on first WebSocket
    /// delivery, beside its envelope: up to as much again.)
    pub max_bytes: usize,
}

impl Default for HistoryPolicy {
    fn default() -> Self {
        Self { size: DEFAULT_HISTORY_SIZE, ttl: DEFAULT_HISTORY_TTL, max_bytes: DEFAULT_HISTORY_MAX_BYTES }
    }
}

/// The settings of every namespace, resolved per channel.
#[derive(Debug, Clone, Default)]
pub struct Policies {
    pub default_history: HistoryPolicy,
    pub namespaces: HashMap<String, HistoryPolicy>,
    pub dedup_window: Option<Duration>,
}

impl Policies {
    pub fn history(&self, channel: &ChannelName) -> HistoryPolicy {
        self.namespaces.get(channel.namespace()).copied().unwrap_or(self.default_history)
    }

    pub fn dedup_window(&self) -> Duration {
        self.dedup_window.unwrap_or(DEFAULT_DEDUP_WINDOW)
    }

    /// The shortest history age of any namespace.
    pub fn shortest_history_ttl(&self) -> Duration {
        self.namespaces.values().map(|p| p.ttl).fold(self.default_history.ttl, Duration::min)
    }
}
