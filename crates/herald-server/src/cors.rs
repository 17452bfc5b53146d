//! Cross-origin access for browser clients on other sites (`cors_allowed_origins`): the layer for the
//! router, and the one header the SSE path (which bypasses the router) needs.

use std::time::Duration;

use crate::config::Config;

/// CORS for browser clients on other origins (`cors_allowed_origins`); none allowed by default.
pub fn layer(config: &Config) -> tower_http::cors::CorsLayer {
    use axum::http::{HeaderName, Method, header};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let origins = &config.cors_allowed_origins;
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| o.parse().ok()))
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("last-event-id"),
            HeaderName::from_static("x-correlation-id"),
            HeaderName::from_static("traceparent"),
        ])
        .max_age(Duration::from_secs(3600))
}

/// The `Access-Control-Allow-Origin` value for a request from `origin`, if that origin is allowed
/// (used by the SSE path that bypasses the router).
pub fn cors_allow_origin(config: &Config, origin: Option<&str>) -> Option<String> {
    let origin = origin?;
    let origins = &config.cors_allowed_origins;
    if origins.iter().any(|o| o == "*") {
        Some("*".to_owned())
    } else {
        origins.iter().any(|o| o == origin).then(|| origin.to_owned())
    }
}
