//! Per-namespace settings the core and the engines apply: how much history a channel keeps and for
//! how long, and how long idempotency keys are remembered.

use std::collections::HashMap;
use std::time::Duration;

use crate::channel::ChannelName;

/// Publications kept per channel unless a namespace says otherwise.
pub const DEFAULT_HISTORY_SIZE: usize = 256;
/// How long a publication stays in history unless a namespace says otherwise.
pub const DEFAULT_HISTORY_TTL: Duration = Duration::from_secs(15 * 60);
/// How long an idempotency key is remembered.
pub const DEFAULT_DEDUP_WINDOW: Duration = Duration::from_secs(24 * 60 * 60);

/// History settings of one namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryPolicy {
    /// Most publications kept; 0 keeps none (every reconnect that missed something gets a reset).
    pub size: usize,
    /// Age after which a publication leaves history.
    pub ttl: Duration,
}

impl Default for HistoryPolicy {
    fn default() -> Self {
        Self { size: DEFAULT_HISTORY_SIZE, ttl: DEFAULT_HISTORY_TTL }
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
