//! Redis key and pub/sub channel names. Everything lives under one configurable prefix, so several
//! Herald clusters can share a Redis. Per-channel keys carry the channel in a hash tag (`{…}`; channel
//! names cannot contain braces), so a channel's keys share one slot should Redis Cluster be used.

use herald_core::ChannelName;

#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    node: String,
}

impl Keys {
    pub fn new(prefix: &str, node: &str) -> Self {
        Self { prefix: prefix.to_owned(), node: node.to_owned() }
    }

    /// Hash of the channel's epoch (`e`) and last offset (`o`).
    pub fn meta(&self, channel: &ChannelName) -> String {
        format!("{}:{{{}}}:m", self.prefix, channel)
    }

    /// The channel's history, a stream whose entry IDs are `<offset>-0`.
    pub fn stream(&self, channel: &ChannelName) -> String {
        format!("{}:{{{}}}:s", self.prefix, channel)
    }

    /// One idempotency key of the channel.
    pub fn dedup(&self, channel: &ChannelName, key: &str) -> String {
        format!("{}:{{{}}}:d:{}", self.prefix, channel, key)
    }

    /// Hash of presence entries: connection ID -> entry JSON (with its node).
    pub fn presence(&self, channel: &ChannelName) -> String {
        format!("{}:{{{}}}:p", self.prefix, channel)
    }

    /// The pub/sub channel that carries the channel's publications.
    pub fn pubsub(&self, channel: &ChannelName) -> String {
        format!("{}:c:{}", self.prefix, channel)
    }

    /// The Herald channel of a pub/sub channel name, if it is one of ours.
    pub fn channel_of(&self, pubsub: &str) -> Option<ChannelName> {
        let name = pubsub.strip_prefix(&self.prefix)?.strip_prefix(":c:")?;
        ChannelName::parse(name).ok()
    }

    /// Sorted set of live nodes, scored by their last heartbeat (Unix milliseconds).
    pub fn nodes(&self) -> String {
        format!("{}:nodes", self.prefix)
    }

    /// A node's last reported counters (JSON), expiring with the node.
    pub fn node_stats(&self, node: &str) -> String {
        format!("{}:node:{}", self.prefix, node)
    }

    /// Control messages for every node (disconnect requests).
    pub fn control_all(&self) -> String {
        format!("{}:ctl", self.prefix)
    }

    /// Control messages for one node (probes, replies).
    pub fn control(&self, node: &str) -> String {
        format!("{}:ctl:{}", self.prefix, node)
    }

    pub fn own_control(&self) -> String {
        self.control(&self.node)
    }
}
