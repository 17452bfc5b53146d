//! Operations endpoints (`/healthz`, `/readyz`, `/metrics`), the demo page at `/` and the browser client
//! it loads (`/herald-client.js`), and the JSON answers for unknown routes and methods (errors from
//! `error.rs`, metrics rendered by `metrics.rs`).

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde_json::json;

use crate::error::ApiError;
use crate::state::AppState;

const INDEX_HTML: &str = include_str!("../static/index.html");
const DASHBOARD_HTML: &str = include_str!("../static/dashboard.html");
/// The browser client (`clients/js`, built; its test checks the built file matches its source).
const CLIENT_JS: &str = include_str!("../../../clients/js/dist/herald-client.js");

pub async fn index() -> Html<&'static str> {
    Html(INDEX_HTML)
}

/// The live cluster dashboard (it polls `/v1/cluster`).
pub async fn dashboard() -> Html<&'static str> {
    Html(DASHBOARD_HTML)
}

/// The browser client as one ES module, for the demo page and for pages that load it from a node.
pub async fn client_js() -> Response {
    let headers = [
        (header::CONTENT_TYPE, HeaderValue::from_static("text/javascript; charset=utf-8")),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ];
    (headers, CLIENT_JS).into_response()
}

/// No icon: an empty answer instead of a 404 in every browser console.
pub async fn favicon() -> StatusCode {
    StatusCode::NO_CONTENT
}

pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

pub async fn readyz(State(state): State<AppState>) -> Response {
    let engine_ready = state.hub().ready().await;
    let draining = state.draining();
    let ready = engine_ready && !draining;
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({"ready": ready, "engine": engine_ready, "draining": draining}))).into_response()
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    let ready = state.hub().ready().await && !state.draining();
    let text = state.metrics().render(state.hub(), ready, state.open_sockets(), state.proxy().stats(), state.hooks());
    let mut response = text.into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    response
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
