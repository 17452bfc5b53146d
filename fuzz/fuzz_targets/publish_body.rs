//! `POST /v1/publish` bodies, checked exactly as the handler does: never a panic, and accepted data
//! is one line of JSON (it must fit an SSE `data:` line).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(valid) = herald_server::api::parse_publish_body(data) {
        assert!(!valid.data.get().contains('\n') && !valid.data.get().contains('\r'));
    }
});
