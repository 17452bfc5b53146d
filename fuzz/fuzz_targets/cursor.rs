//! Cursors (the SSE `Last-Event-ID`), channel names and epochs from arbitrary text: never a panic,
//! and a cursor that decodes re-encodes to the same positions.
#![no_main]

use herald_core::{ChannelName, Epoch, decode_cursor, encode_cursor};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = ChannelName::parse(text);
    let _ = Epoch::parse(text);
    let channels = [ChannelName::parse("a").expect("valid"), ChannelName::parse("user:42").expect("valid")];
    for count in 1..=channels.len() {
        if let Ok(positions) = decode_cursor(text, &channels[..count]) {
            let again = encode_cursor(&channels[..count], &positions);
            assert_eq!(decode_cursor(&again, &channels[..count]), Ok(positions));
        }
    }
});
