//! The one registry of engines: which URL names which engine, and how a URL is checked without
//! connecting. `lib.rs` builds the engine of a kind (`build_engine`); configuration validation and
//! `/v1/cluster` ask this registry. Adding an engine: a kind here, its section in `config.rs`, its
//! constructor in `build_engine`.

/// An engine Herald can run on.
#[derive(Debug, Clone, Copy)]
pub struct EngineKind {
    /// As reported by `/v1/cluster` (`engine`).
    pub name: &'static str,
    /// URL prefixes that select it (`memory` is a whole value, not a prefix).
    pub schemes: &'static [&'static str],
    /// The configuration section of its settings, if it has one.
    pub section: Option<&'static str>,
    check: fn(&str) -> Result<(), String>,
}

/// Kinds are told apart by name.
impl PartialEq for EngineKind {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for EngineKind {}

impl EngineKind {
    /// Checks `url` without connecting.
    pub fn check(&self, url: &str) -> Result<(), String> {
        (self.check)(url)
    }
}

pub const MEMORY: EngineKind = EngineKind { name: "memory", schemes: &[], section: None, check: |_| Ok(()) };
pub const REDIS: EngineKind = EngineKind {
    name: "redis",
    schemes: &[
        "redis://",
        "rediss://",
        "redis+sentinel://",
        "rediss+sentinel://",
        "redis+cluster://",
        "rediss+cluster://",
    ],
    section: Some("redis"),
    check: herald_redis::check_url,
};
pub const NATS: EngineKind =
    EngineKind { name: "nats", schemes: &["nats://", "tls://"], section: Some("nats"), check: herald_nats::check_url };

pub const KINDS: [EngineKind; 3] = [MEMORY, REDIS, NATS];

/// The engine `url` names, if any.
pub fn kind_of(url: &str) -> Option<EngineKind> {
    if url == "memory" {
        return Some(MEMORY);
    }
    KINDS.into_iter().find(|kind| kind.schemes.iter().any(|scheme| url.starts_with(scheme)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_their_engine() {
        assert_eq!(kind_of("memory"), Some(MEMORY));
        assert_eq!(kind_of("redis://127.0.0.1:6379/0"), Some(REDIS));
        assert_eq!(kind_of("redis+sentinel://h:26379/m"), Some(REDIS));
        assert_eq!(kind_of("redis+cluster://h:7000,h:7001"), Some(REDIS));
        assert_eq!(kind_of("nats://127.0.0.1:4222"), Some(NATS));
        assert_eq!(kind_of("tls://h:4222"), Some(NATS));
        assert_eq!(kind_of("memcached://h"), None);
        assert_eq!(kind_of("memoryx"), None);
    }
}
