//! Subject, stream and bucket names. Everything lives under one configurable prefix, so several
//! Herald clusters can share a NATS system.
//!
//! Channel names may contain `.`, the subject separator, and `:`/`@`, which KV keys do not allow:
//! in subjects a `.` is written as `%` (not a channel character, so the mapping is reversible); in KV
//! keys the channel is hex-encoded.

use herald_core::ChannelName;

#[derive(Debug, Clone)]
pub struct Names {
    prefix: String,
    node: String,
}

impl Names {
    pub fn new(prefix: &str, node: &str) -> Self {
        Self { prefix: prefix.to_owned(), node: node.to_owned() }
    }

    /// The stream that holds every channel's history.
    pub fn stream(&self) -> String {
        format!("{}_HISTORY", self.prefix.to_uppercase().replace(['.', '-'], "_"))
    }

    /// The subjects the history stream captures.
    pub fn history_all(&self) -> String {
        format!("{}.h.>", self.prefix)
    }

    /// Where the stream republishes what it stored (live fan-out).
    pub fn live_all(&self) -> String {
        format!("{}.l.>", self.prefix)
    }

    /// The subject a channel's publications are stored under.
    pub fn history(&self, channel: &ChannelName) -> String {
        format!("{}.h.{}", self.prefix, token(channel.as_str()))
    }

    /// The subject a channel's stored publications are republished to.
    pub fn live(&self, channel: &ChannelName) -> String {
        format!("{}.l.{}", self.prefix, token(channel.as_str()))
    }

    /// The channel of a live subject, if it is one of ours.
    pub fn channel_of(&self, subject: &str) -> Option<ChannelName> {
        let name = subject.strip_prefix(&self.prefix)?.strip_prefix(".l.")?;
        ChannelName::parse(&name.replace('%', ".")).ok()
    }

    /// Control messages for every node.
    pub fn control_all(&self) -> String {
        format!("{}.ctl.all", self.prefix)
    }

    /// Control messages for one node.
    pub fn control(&self, node: &str) -> String {
        format!("{}.ctl.n.{}", self.prefix, hex(node))
    }

    pub fn own_control(&self) -> String {
        self.control(&self.node)
    }

    /// KV bucket of node leases (value: the node's last counters).
    pub fn nodes_bucket(&self) -> String {
        format!("{}_nodes", self.bucket_prefix())
    }

    /// KV bucket of presence entries, keyed [`Names::presence_key`].
    pub fn presence_bucket(&self) -> String {
        format!("{}_presence", self.bucket_prefix())
    }

    /// KV bucket of idempotency keys.
    pub fn dedup_bucket(&self) -> String {
        format!("{}_dedup", self.bucket_prefix())
    }

    /// A node's key in the nodes bucket.
    pub fn node_key(node: &str) -> String {
        hex(node)
    }

    /// The node a key of the nodes bucket names.
    pub fn node_of_key(key: &str) -> Option<String> {
        unhex(key)
    }

    /// All presence keys of a channel start with this (then `.` and the connection ID).
    pub fn presence_prefix(channel: &ChannelName) -> String {
        hex(channel.as_str())
    }

    pub fn presence_key(channel: &ChannelName, connection_id: &str) -> String {
        format!("{}.{}", hex(channel.as_str()), hex(connection_id))
    }

    pub fn dedup_key(channel: &ChannelName, key: &str) -> String {
        format!("{}.{}", hex(channel.as_str()), hex(key))
    }

    fn bucket_prefix(&self) -> String {
        self.prefix.replace('.', "_")
    }
}

/// A channel name as one subject token.
fn token(name: &str) -> String {
    name.replace('.', "%")
}

fn hex(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<String> {
    if text.len() % 2 != 0 {
        return None;
    }
    let bytes: Option<Vec<u8>> =
        (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect();
    String::from_utf8(bytes?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_round_trip_through_subjects() {
        let names = Names::new("herald", "node-1");
        for name in ["user:42", "a.b.c", "org:7:feed/x@y=z", "_-"] {
            let channel = ChannelName::parse(name).expect("channel");
            let live = names.live(&channel);
            assert_eq!(live.split('.').count(), 3, "{live}");
            assert_eq!(names.channel_of(&live), Some(channel));
        }
        assert_eq!(names.channel_of("herald.h.x"), None);
        assert_eq!(names.channel_of("other.l.x"), None);
    }

    #[test]
    fn node_keys_round_trip() {
        assert_eq!(Names::node_of_key(&Names::node_key("node:a.b")), Some("node:a.b".to_owned()));
        assert_eq!(Names::node_of_key("zz"), None);
        assert_eq!(Names::node_of_key("abc"), None);
    }
}
