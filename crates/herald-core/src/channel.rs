//! Channel names: validation and the namespace a channel belongs to.
//!
//! A [`ChannelName`] can only be built through [`ChannelName::parse`], so every channel that reaches the
//! hub or an engine has already passed the contract's rules (characters `A-Z a-z 0-9 _ - : . @ = /`,
//! length 1..=255). Nothing here knows about subscribers or history.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Longest channel name the contract allows, in bytes (all allowed characters are ASCII).
pub const MAX_CHANNEL_BYTES: usize = 255;

/// A validated channel name such as `user:42`. Cheap to clone (shared string).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ChannelName(Arc<str>);

/// Why a string is not a channel name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("channel name is empty")]
    Empty,
    #[error("channel name is {len} bytes long, the limit is {MAX_CHANNEL_BYTES}")]
    TooLong { len: usize },
    #[error("channel name contains {found:?} at position {index}; allowed are A-Z a-z 0-9 _ - : . @ = /")]
    InvalidCharacter { found: char, index: usize },
}

impl ChannelName {
    /// Validates `name` against the contract's rules.
    pub fn parse(name: &str) -> Result<Self, ChannelError> {
        if name.is_empty() {
            return Err(ChannelError::Empty);
        }
        if name.len() > MAX_CHANNEL_BYTES {
            return Err(ChannelError::TooLong { len: name.len() });
        }
        if let Some((index, found)) = name.char_indices().find(|(_, c)| !is_channel_char(*c)) {
            return Err(ChannelError::InvalidCharacter { found, index });
        }
        Ok(Self(Arc::from(name)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part before the first `:`; the empty string for a channel without one.
    pub fn namespace(&self) -> &str {
        match self.0.find(':') {
            Some(index) => &self.0[..index],
            None => "",
        }
    }
}

fn is_channel_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '.' | '@' | '=' | '/')
}

impl TryFrom<String> for ChannelName {
    type Error = ChannelError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<ChannelName> for String {
    fn from(value: ChannelName) -> Self {
        value.0.to_string()
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_contract_alphabet() {
        for name in ["user:42", "a", "order:8f3a", "A-Z_a.z@x=y/z", &"x".repeat(255)] {
            assert!(ChannelName::parse(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn rejects_everything_else() {
        assert_eq!(ChannelName::parse(""), Err(ChannelError::Empty));
        assert_eq!(ChannelName::parse(&"x".repeat(256)), Err(ChannelError::TooLong { len: 256 }));
        for name in ["a b", "user:\n", "é", "a*", "a#b", "a\u{0}"] {
            assert!(matches!(ChannelName::parse(name), Err(ChannelError::InvalidCharacter { .. })), "{name:?}");
        }
    }

    #[test]
    fn namespace_is_the_part_before_the_first_colon() {
        let check = |name: &str, namespace: &str| {
            assert_eq!(ChannelName::parse(name).map(|c| c.namespace().to_owned()), Ok(namespace.to_owned()));
        };
        check("user:42", "user");
        check("user:42:x", "user");
        check("plain", "");
        check(":x", "");
    }
}
