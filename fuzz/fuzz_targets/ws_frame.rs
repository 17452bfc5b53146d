//! WebSocket client frames: never a panic; every frame is an op or an error reply.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = herald_server::ws::frame_kind(text);
});
