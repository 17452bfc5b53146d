//! Client tokens: never a panic, and nothing unsigned by the configured key is ever accepted.
#![no_main]

use std::sync::OnceLock;

use herald_server::auth::ClientAuth;
use libfuzzer_sys::fuzz_target;

fn auth() -> &'static ClientAuth {
    static AUTH: OnceLock<ClientAuth> = OnceLock::new();
    AUTH.get_or_init(|| {
        let config = herald_server::Config {
            jwt_hs256_secret: Some("fuzz-secret-fuzz-secret-fuzz-secret!".into()),
            ..herald_server::Config::default()
        };
        ClientAuth::from_config(&config).expect("valid key")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // The fuzzer cannot forge an HS256 signature, so anything it makes must be refused.
    assert!(auth().verify_token(text).is_err());
});
