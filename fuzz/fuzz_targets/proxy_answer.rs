//! The connect proxy's answers (a backend's body and its `Cache-Control`): never a panic; an accepted
//! answer always names a user and only channel names or prefixes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(identity) = herald_server::proxy::connect_identity(data) {
        assert!(identity.user.as_deref().is_some_and(|user| !user.is_empty() && user.len() <= 256));
    }
    if let Ok(value) = axum_header(data) {
        let mut headers = herald_server::proxy::ProxyHeaderMap::new();
        headers.insert("cache-control", value);
        if let Some(time) = herald_server::proxy::cache_time(&headers) {
            assert!(time <= herald_server::proxy::MAX_CACHE_TIME);
        }
    }
});

fn axum_header(data: &[u8]) -> Result<herald_server::proxy::HeaderValue, ()> {
    herald_server::proxy::HeaderValue::from_bytes(data).map_err(|_| ())
}
