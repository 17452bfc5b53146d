//! Publication envelopes as received from another node or from history: never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = herald_core::Publication::from_envelope(bytes::Bytes::copy_from_slice(data), None);
});
