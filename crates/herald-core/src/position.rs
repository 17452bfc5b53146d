//! Stream positions (epoch, offset) and the opaque SSE cursor built from them.
//!
//! A position says "the client holds every publication of this channel up to `offset` in `epoch`".
//! Offset 0 means "nothing yet in this epoch". The cursor is what SSE sends as `id:`: one position per
//! channel of the connection, in the connection's (sorted) channel order, plus a tag of the channel set so
//! that a cursor from another connection shape is refused instead of being misapplied.
//!
//! Cursor grammar, version 1: `1.<tag>.<epoch>-<offset>[.<epoch>-<offset>...]` where `tag` is 8 hex digits
//! (FNV-1a of the channel names) and there is exactly one position per channel.

use std::fmt;
use std::sync::Arc;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::channel::ChannelName;

/// Longest epoch string accepted from a client or an engine.
pub const MAX_EPOCH_BYTES: usize = 32;
/// Longest cursor accepted from a client; anything longer is refused before parsing.
pub const MAX_CURSOR_BYTES: usize = 64 * 1024;

/// The generation of a channel's stream; changes whenever the channel's history is lost.
/// Characters `A-Z a-z 0-9`, 1..=32 bytes.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Epoch(Arc<str>);

impl Epoch {
    /// A fresh random epoch (10 alphanumeric characters, about 59 bits).
    pub fn generate() -> Self {
        let text: String = Self::fresh_text().iter().map(|b| char::from(*b)).collect();
        Self(Arc::from(text))
    }

    /// The text of a fresh random epoch (as [`Epoch::generate`] makes), without making one: for an
    /// engine that uses it only if a channel needs a new epoch.
    pub fn fresh_text() -> [u8; 10] {
        let mut rng = rand::rng();
        std::array::from_fn(|_| rng.sample(rand::distr::Alphanumeric))
    }

    pub fn parse(text: &str) -> Result<Self, CursorError> {
        if text.is_empty() || text.len() > MAX_EPOCH_BYTES || !text.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(CursorError::Malformed("epoch must be 1 to 32 letters or digits"));
        }
        Ok(Self(Arc::from(text)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Epoch {
    type Error = CursorError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<Epoch> for String {
    fn from(value: Epoch) -> Self {
        value.0.to_string()
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// A point in one channel's stream.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct Position {
    pub epoch: Epoch,
    pub offset: u64,
}

impl Position {
    pub fn new(epoch: Epoch, offset: u64) -> Self {
        Self { epoch, offset }
    }
}

/// Why a cursor cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    #[error("cursor is malformed: {0}")]
    Malformed(&'static str),
    #[error("cursor belongs to a connection with other channels")]
    Foreign,
}

/// Encodes the cursor for `positions`, which must be in the same order as `channels`.
pub fn encode_cursor<'a>(channels: &[ChannelName], positions: impl IntoIterator<Item = &'a Position>) -> String {
    let mut out = Vec::with_capacity(16 + channels.len() * 20);
    CursorEncoder::new(channels).write(&mut out, positions);
    String::from_utf8(out).unwrap_or_default()
}

/// Writes cursors for one fixed channel set without allocating: the hot path of SSE delivery, where
/// every event carries one.
#[derive(Debug, Clone)]
pub struct CursorEncoder {
    /// `1.<tag>`
    prefix: [u8; 10],
}

impl CursorEncoder {
    pub fn new(channels: &[ChannelName]) -> Self {
        let mut prefix = *b"1.00000000";
        let tag = channel_set_tag(channels);
        for (i, byte) in prefix[2..].iter_mut().enumerate() {
            *byte = b"0123456789abcdef"[((tag >> (28 - 4 * i)) & 0xf) as usize];
        }
        Self { prefix }
    }

    /// Appends the cursor of `positions` (in channel order) to `out`.
    pub fn write<'a>(&self, out: &mut Vec<u8>, positions: impl IntoIterator<Item = &'a Position>) {
        out.extend_from_slice(&self.prefix);
        for position in positions {
            out.push(b'.');
            out.extend_from_slice(position.epoch.as_str().as_bytes());
            out.push(b'-');
            push_decimal(out, position.offset);
        }
    }
}

fn push_decimal(out: &mut Vec<u8>, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
}

/// Decodes a cursor made by [`encode_cursor`] for the same `channels`, in order.
pub fn decode_cursor(cursor: &str, channels: &[ChannelName]) -> Result<Vec<Position>, CursorError> {
    if cursor.len() > MAX_CURSOR_BYTES {
        return Err(CursorError::Malformed("cursor is too long"));
    }
    let mut parts = cursor.split('.');
    if parts.next() != Some("1") {
        return Err(CursorError::Malformed("unknown cursor version"));
    }
    let tag = parts.next().ok_or(CursorError::Malformed("missing channel tag"))?;
    if tag.len() != 8 {
        return Err(CursorError::Malformed("channel tag must be 8 hex digits"));
    }
    let tag = u32::from_str_radix(tag, 16).map_err(|_| CursorError::Malformed("channel tag must be 8 hex digits"))?;
    let mut positions = Vec::with_capacity(channels.len());
    for part in parts {
        let (epoch, offset) = part.split_once('-').ok_or(CursorError::Malformed("position must be epoch-offset"))?;
        let epoch = Epoch::parse(epoch)?;
        if offset.is_empty() || !offset.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CursorError::Malformed("offset must be a decimal number"));
        }
        let offset: u64 = offset.parse().map_err(|_| CursorError::Malformed("offset is out of range"))?;
        positions.push(Position { epoch, offset });
    }
    if tag != channel_set_tag(channels) || positions.len() != channels.len() {
        return Err(CursorError::Foreign);
    }
    Ok(positions)
}

/// FNV-1a over the channel names separated by a byte no channel name contains.
fn channel_set_tag(channels: &[ChannelName]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for channel in channels {
        for byte in channel.as_str().bytes().chain(std::iter::once(b'\n')) {
            hash ^= u32::from(byte);
            hash = hash.wrapping_mul(0x0100_0193);
        }
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channels(names: &[&str]) -> Vec<ChannelName> {
        names.iter().map(|n| ChannelName::parse(n).expect("valid test channel")).collect()
    }

    #[test]
    fn cursor_round_trips() {
        let chans = channels(&["a", "user:42"]);
        let positions =
            vec![Position::new(Epoch::generate(), 0), Position::new(Epoch::parse("E1").expect("epoch"), u64::MAX)];
        let text = encode_cursor(&chans, &positions);
        assert!(text.starts_with(&format!("1.{:08x}.", channel_set_tag(&chans))), "{text}");
        assert_eq!(decode_cursor(&text, &chans), Ok(positions));
        let zero = vec![Position::new(Epoch::parse("z").expect("epoch"), 0); 2];
        assert_eq!(decode_cursor(&encode_cursor(&chans, &zero), &chans), Ok(zero));
    }

    proptest::proptest! {
        /// Any channel set and positions encode to a cursor that decodes back to the same positions.
        #[test]
        fn any_cursor_round_trips(
            names in proptest::collection::btree_set("[A-Za-z0-9_:.@=/-]{1,40}", 1..8),
            epochs in proptest::collection::vec("[A-Za-z0-9]{1,32}", 8),
            offsets in proptest::collection::vec(proptest::num::u64::ANY, 8),
        ) {
            let chans: Vec<ChannelName> = names.iter().filter_map(|n| ChannelName::parse(n).ok()).collect();
            let positions: Vec<Position> = chans
                .iter()
                .enumerate()
                .map(|(i, _)| Position::new(Epoch::parse(&epochs[i]).expect("generated epoch"), offsets[i]))
                .collect();
            let text = encode_cursor(&chans, &positions);
            proptest::prop_assert_eq!(decode_cursor(&text, &chans), Ok(positions));
        }

        /// Decoding arbitrary text never panics, and a cursor only ever decodes for its own channel set.
        #[test]
        fn decoding_any_text_is_total(text in ".{0,200}", name in "[a-z]{1,10}") {
            let chans = vec![ChannelName::parse(&name).expect("generated name")];
            let _ = decode_cursor(&text, &chans);
        }

        /// A cursor made for one channel set is refused for any other.
        #[test]
        fn a_cursor_is_refused_for_other_channels(a in "[a-z]{1,12}", b in "[a-z]{1,12}") {
            proptest::prop_assume!(a != b);
            let (ca, cb) = (vec![ChannelName::parse(&a).expect("a")], vec![ChannelName::parse(&b).expect("b")]);
            let text = encode_cursor(&ca, &[Position::new(Epoch::parse("e").expect("epoch"), 1)]);
            proptest::prop_assert!(decode_cursor(&text, &cb).is_err());
        }
    }

    #[test]
    fn foreign_and_malformed_cursors_are_refused() {
        let chans = channels(&["a", "b"]);
        let other = channels(&["a", "c"]);
        let pos = vec![Position::new(Epoch::parse("e").expect("epoch"), 1); 2];
        let text = encode_cursor(&chans, &pos);
        assert_eq!(decode_cursor(&text, &other), Err(CursorError::Foreign));
        assert_eq!(decode_cursor(&text, &chans[..1]), Err(CursorError::Foreign));
        for bad in [
            "",
            "1",
            "2.00000000.e-1",
            "1.zzzzzzzz.e-1",
            "1.0000000.e-1",
            "1.00000000.e-",
            "1.00000000.-1",
            "1.00000000.e-1x",
            "1.00000000.e-99999999999999999999999",
            "1.00000000.e_1",
            "1.00000000.e-+1",
        ] {
            assert!(matches!(decode_cursor(bad, &chans), Err(CursorError::Malformed(_))), "{bad:?}");
        }
    }
}
