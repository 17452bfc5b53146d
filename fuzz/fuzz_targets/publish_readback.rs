//! Arbitrary bytes as the `data` of a publish body: accepted data is delivered, recovered and kept in
//! history byte for byte (see `common/readback.rs`), and nothing panics. Would have found issue 11's
//! history panic (deep nesting, `1e400`, lone surrogates) and the re-encoding of data with line breaks.
#![no_main]

#[path = "common/readback.rs"]
mod readback;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| readback::check(data));
