//! Redis key and pub/sub channel names. Everything lives under one configurable prefix, so several
//! Herald clusters can share a Redis. Per-channel keys carry the channel in a hash tag (`{…}`; channel
//! names cannot contain braces), so a channel's keys share one slot should Redis Cluster be used.
//!
//! In a Redis Cluster (`sharded`) the names that are not a channel's are placed by hash tags too:
//! - a channel's pub/sub channel is a shard channel with the channel's tag, so `SPUBLISH` from the
//!   publish script stays on the channel's shard;
//! - each node's control channel is a shard channel tagged with the node's name, so nodes' control
//!   traffic (replies, receipts) spreads over the shards by node;
//! - each node's probe goes through one shard channel per shard (a tag picked to land on a slot of that
//!   shard), so a silent subscription on any shard is noticed;
//! - the node registry and the nodes' counters share the tag `{nodes}`: one shard holds them, written
//!   and read about once per second per node (a small, fixed load whatever the traffic);
//! - the control channel for every node stays a classic pub/sub channel (a cluster broadcasts those
//!   to every server), used only for rare requests (disconnect a user).

use std::io::Write as _;

use herald_core::ChannelName;
use redis::{RedisWrite, ToRedisArgs};

/// A name as the pieces it is made of, in order: written into a command's buffer as one argument
/// without a string of its own (the publish path builds several per publication).
#[derive(Debug, Clone, Copy)]
pub struct Name<'a>(pub [&'a str; 5]);

impl std::fmt::Display for Name<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|piece| f.write_str(piece))
    }
}

impl ToRedisArgs for Name<'_> {
    fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
        let mut arg = out.writer_for_next_arg();
        for piece in self.0 {
            // Writing into a command's buffer (memory) cannot fail.
            let _ = arg.write_all(piece.as_bytes());
        }
    }
}

#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    node: String,
    sharded: bool,
}

impl Keys {
    /// `sharded`: the names of a Redis Cluster (see the module documentation).
    pub fn new(prefix: &str, node: &str, sharded: bool) -> Self {
        Self { prefix: prefix.to_owned(), node: node.to_owned(), sharded }
    }

    /// Whether these are a Redis Cluster's names.
    pub fn sharded(&self) -> bool {
        self.sharded
    }

    /// Hash of the channel's epoch (`e`) and last offset (`o`).
    pub fn meta(&self, channel: &ChannelName) -> String {
        self.meta_name(channel).to_string()
    }

    /// [`Keys::meta`] as its pieces (an argument written without a string of its own).
    pub fn meta_name<'a>(&'a self, channel: &'a ChannelName) -> Name<'a> {
        Name([&self.prefix, ":{", channel.as_str(), "}:m", ""])
    }

    /// The channel's history, a stream whose entry IDs are `<offset>-0`.
    pub fn stream(&self, channel: &ChannelName) -> String {
        self.stream_name(channel).to_string()
    }

    pub fn stream_name<'a>(&'a self, channel: &'a ChannelName) -> Name<'a> {
        Name([&self.prefix, ":{", channel.as_str(), "}:s", ""])
    }

    /// One idempotency key of the channel.
    pub fn dedup(&self, channel: &ChannelName, key: &str) -> String {
        self.dedup_name(channel, key).to_string()
    }

    pub fn dedup_name<'a>(&'a self, channel: &'a ChannelName, key: &'a str) -> Name<'a> {
        Name([&self.prefix, ":{", channel.as_str(), "}:d:", key])
    }

    /// Hash of presence entries: connection ID -> entry JSON (with its node).
    pub fn presence(&self, channel: &ChannelName) -> String {
        format!("{}:{{{}}}:p", self.prefix, channel)
    }

    /// The pub/sub channel that carries the channel's publications.
    pub fn pubsub(&self, channel: &ChannelName) -> String {
        self.pubsub_name(channel).to_string()
    }

    pub fn pubsub_name<'a>(&'a self, channel: &'a ChannelName) -> Name<'a> {
        if self.sharded {
            Name([&self.prefix, ":{", channel.as_str(), "}:c", ""])
        } else {
            Name([&self.prefix, ":c:", channel.as_str(), "", ""])
        }
    }

    /// The Herald channel of a pub/sub channel name, if it is one of ours.
    pub fn channel_of(&self, pubsub: &str) -> Option<ChannelName> {
        let rest = pubsub.strip_prefix(&self.prefix)?;
        let name = if self.sharded { rest.strip_prefix(":{")?.strip_suffix("}:c")? } else { rest.strip_prefix(":c:")? };
        ChannelName::parse(name).ok()
    }

    /// Sorted set of live nodes, scored by their last heartbeat (Unix milliseconds).
    pub fn nodes(&self) -> String {
        if self.sharded { format!("{}:{{nodes}}", self.prefix) } else { format!("{}:nodes", self.prefix) }
    }

    /// A node's last reported counters (JSON), expiring with the node.
    pub fn node_stats(&self, node: &str) -> String {
        if self.sharded {
            format!("{}:{{nodes}}:{}", self.prefix, node)
        } else {
            format!("{}:node:{}", self.prefix, node)
        }
    }

    /// Control messages for every node (disconnect requests).
    pub fn control_all(&self) -> String {
        format!("{}:ctl", self.prefix)
    }

    /// Control messages for one node (probes, replies).
    pub fn control(&self, node: &str) -> String {
        if self.sharded { format!("{}:{{ctl:{}}}", self.prefix, node) } else { format!("{}:ctl:{}", self.prefix, node) }
    }

    /// A shard channel that carries this node's probe through the shard serving `tag`'s slot (Redis
    /// Cluster: one per shard, so every shard's subscription is checked).
    pub fn probe(&self, tag: &str) -> String {
        format!("{}:{{{}}}:probe:{}", self.prefix, tag, self.node)
    }

    /// Whether `name` is one of this node's probe channels.
    pub fn is_probe(&self, name: &str) -> bool {
        name.strip_prefix(&self.prefix)
            .and_then(|rest| rest.strip_suffix(&self.node))
            .is_some_and(|rest| rest.starts_with(":{") && rest.ends_with("}:probe:"))
    }

    pub fn own_control(&self) -> String {
        self.control(&self.node)
    }
}
