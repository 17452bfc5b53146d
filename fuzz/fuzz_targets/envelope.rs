//! Publication envelopes as received from another node or from history: never a panic, and the fast
//! read of Herald's own layout never disagrees with the full JSON parse.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = herald_core::Publication::from_envelope(bytes::Bytes::copy_from_slice(data), None);
    if let Ok(text) = std::str::from_utf8(data) {
        assert!(herald_core::publication::own_layout_agrees(text), "{text}");
    }
});
