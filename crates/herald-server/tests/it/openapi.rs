//! `docs/openapi.yaml` held to the server: the routes it documents are exactly those the router serves
//! (`herald_server::ROUTES`, itself checked against `router()` by a unit test in lib.rs), each documented
//! route reaches its handler on a running node and every other method on it is refused, and the answers a
//! node really gives match the schemas the document states for their status. Also: the document's own
//! references resolve, and its error codes are those of `ApiError` and of docs/protocol.md.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use herald_server::{ApiError, ROUTES};
use reqwest::{Method, StatusCode};
use serde_json::{Map, Value, json};
use yaml_rust2::{Yaml, YamlLoader};

use crate::harness::{Server, Sse, Ws, client};

const METHODS: &[&str] = &["get", "put", "post", "delete", "options", "head", "patch", "trace"];

fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("reading {}: {e}", full.display()))
}

/// docs/openapi.yaml as JSON.
fn spec() -> Value {
    let text = repo_file("docs/openapi.yaml");
    let documents = YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("docs/openapi.yaml is not YAML: {e}"));
    assert_eq!(documents.len(), 1, "docs/openapi.yaml holds one document");
    to_json(&documents[0])
}

fn to_json(yaml: &Yaml) -> Value {
    match yaml {
        Yaml::Null => Value::Null,
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Integer(i) => json!(i),
        Yaml::Real(text) => json!(yaml.as_f64().unwrap_or_else(|| panic!("not a number: {text}"))),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Array(items) => Value::Array(items.iter().map(to_json).collect()),
        Yaml::Hash(entries) => {
            let mut object = Map::new();
            for (key, value) in entries {
                let key = match key {
                    Yaml::String(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    other => panic!("unexpected key {other:?}"),
                };
                assert!(object.insert(key.clone(), to_json(value)).is_none(), "key {key} given twice");
            }
            Value::Object(object)
        }
        Yaml::Alias(_) | Yaml::BadValue => panic!("unsupported YAML node {yaml:?}"),
    }
}

/// Every documented (METHOD, path).
fn documented(spec: &Value) -> BTreeSet<(String, String)> {
    let paths = spec["paths"].as_object().expect("paths");
    let mut found = BTreeSet::new();
    for (path, item) in paths {
        for method in item.as_object().expect("a path item").keys() {
            if METHODS.contains(&method.as_str()) {
                found.insert((method.to_ascii_uppercase(), path.clone()));
            }
        }
    }
    found
}

fn served() -> BTreeSet<(String, String)> {
    ROUTES.iter().map(|(method, path)| ((*method).to_owned(), (*path).to_owned())).collect()
}

#[test]
fn openapi_documents_exactly_the_routes_the_router_serves() {
    let spec = spec();
    let documented = documented(&spec);
    let served = served();
    assert_eq!(served.len(), ROUTES.len(), "ROUTES lists a route twice");
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let not_served: Vec<_> = documented.difference(&served).collect();
    assert!(undocumented.is_empty(), "served but missing from docs/openapi.yaml: {undocumented:?}");
    assert!(not_served.is_empty(), "in docs/openapi.yaml but not served: {not_served:?}");
}

/// The target of a local `$ref` (`#/components/…`).
fn resolve<'a>(spec: &'a Value, reference: &str) -> &'a Value {
    let pointer = reference.strip_prefix('#').unwrap_or_else(|| panic!("only local references: {reference}"));
    spec.pointer(pointer).unwrap_or_else(|| panic!("{reference} points at nothing"))
}

fn each_ref(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::Object(object) => {
            if let Some(Value::String(reference)) = object.get("$ref") {
                found.push(reference.clone());
            }
            object.values().for_each(|v| each_ref(v, found));
        }
        Value::Array(items) => items.iter().for_each(|v| each_ref(v, found)),
        _ => {}
    }
}

/// Every error code `ApiError` can answer with. The match has no wildcard, so a new variant does not
/// compile until it is listed here (and then in docs/openapi.yaml and docs/protocol.md).
fn api_error_codes() -> BTreeSet<&'static str> {
    let channel = herald_core::ChannelName::parse("").expect_err("an empty channel name is invalid");
    let cursor = herald_core::Epoch::parse("").expect_err("an empty epoch is invalid");
    let every = [
        ApiError::BadRequest(String::new()),
        ApiError::from(channel),
        ApiError::from(cursor),
        ApiError::MalformedJson(String::new()),
        ApiError::InvalidBody(String::new()),
        ApiError::BodyTooLarge { limit: 1 },
        ApiError::HeadersTooLarge(String::new()),
        ApiError::RequestTimeout(String::new()),
        ApiError::UnsupportedMediaType(String::new()),
        ApiError::UpgradeRequired(String::new()),
        ApiError::MethodNotAllowed,
        ApiError::NotImplemented(String::new()),
        ApiError::Unauthorized,
        ApiError::Unauthenticated(String::new()),
        ApiError::Forbidden(String::new()),
        ApiError::HistoryGone,
        ApiError::Limit(String::new()),
        ApiError::NotFound,
        ApiError::Unavailable(String::new()),
        ApiError::NotDurable(String::new()),
        ApiError::ProxyUnavailable(String::new()),
        ApiError::ProxyTimeout(String::new()),
        ApiError::Internal(String::new()),
    ];
    for error in &every {
        match error {
            ApiError::BadRequest(_)
            | ApiError::Channel(_)
            | ApiError::Cursor(_)
            | ApiError::MalformedJson(_)
            | ApiError::InvalidBody(_)
            | ApiError::BodyTooLarge { .. }
            | ApiError::HeadersTooLarge(_)
            | ApiError::RequestTimeout(_)
            | ApiError::UnsupportedMediaType(_)
            | ApiError::UpgradeRequired(_)
            | ApiError::MethodNotAllowed
            | ApiError::NotImplemented(_)
            | ApiError::Unauthorized
            | ApiError::Unauthenticated(_)
            | ApiError::Forbidden(_)
            | ApiError::HistoryGone
            | ApiError::Limit(_)
            | ApiError::NotFound
            | ApiError::Unavailable(_)
            | ApiError::NotDurable(_)
            | ApiError::ProxyUnavailable(_)
            | ApiError::ProxyTimeout(_)
            | ApiError::Internal(_) => {}
        }
    }
    let codes: BTreeSet<&str> = every.iter().map(ApiError::code).collect();
    assert_eq!(codes.len(), every.len(), "two ApiError variants share a code");
    codes
}

/// The (status, code) rows of docs/protocol.md's error table.
fn protocol_error_table() -> BTreeSet<(u16, String)> {
    let protocol = repo_file("docs/protocol.md");
    let start = protocol.find("\n## Errors").expect("docs/protocol.md has an Errors section");
    let section = &protocol[start + 1..];
    let section = &section[..section[1..].find("\n## ").map_or(section.len(), |end| end + 1)];
    let mut rows = BTreeSet::new();
    for line in section.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() >= 4 {
            if let (Ok(status), Some(code)) = (cells[1].parse::<u16>(), cells[2].strip_prefix('`')) {
                rows.insert((status, code.trim_end_matches('`').to_owned()));
            }
        }
    }
    assert!(rows.len() > 10, "the error table of docs/protocol.md was not found: {rows:?}");
    rows
}

#[test]
fn openapi_is_consistent_with_itself_the_error_codes_and_the_protocol() {
    let spec = spec();
    let version = spec["openapi"].as_str().expect("openapi");
    assert!(version.starts_with("3.1."), "OpenAPI 3.1, not {version}");
    let description = spec["info"]["description"].as_str().expect("info.description");
    assert!(description.contains("docs/protocol.md"), "info.description names docs/protocol.md as the reference");

    let mut references = Vec::new();
    each_ref(&spec, &mut references);
    assert!(references.len() > 50, "too few references: {}", references.len());
    for reference in &references {
        resolve(&spec, reference);
    }

    let schemes = spec["components"]["securitySchemes"].as_object().expect("security schemes");
    let mut operation_ids = BTreeSet::new();
    for (method, path) in documented(&spec) {
        let operation = &spec["paths"][&path][method.to_ascii_lowercase()];
        let id = operation["operationId"].as_str().unwrap_or_else(|| panic!("{method} {path} has no operationId"));
        assert!(operation_ids.insert(id.to_owned()), "operationId {id} used twice");
        let responses = operation["responses"].as_object().unwrap_or_else(|| panic!("{method} {path}: responses"));
        assert!(responses.keys().any(|status| status.starts_with('1') || status.starts_with('2')), "{method} {path}");
        let security = operation["security"].as_array().unwrap_or_else(|| panic!("{method} {path}: security"));
        for requirement in security {
            for scheme in requirement.as_object().expect("a security requirement").keys() {
                assert!(schemes.contains_key(scheme), "{method} {path}: unknown security scheme {scheme}");
            }
        }
        // The server API's routes name the API key; nothing else does.
        let needs_key = security.iter().any(|r| r.get("apiKey").is_some());
        assert_eq!(needs_key, operation["tags"][0] == "server API", "{method} {path}: API key security");
    }

    let documented_codes: BTreeSet<&str> = spec["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .expect("ErrorCode enum")
        .iter()
        .map(|code| code.as_str().expect("a code"))
        .collect();
    assert_eq!(documented_codes, api_error_codes(), "ErrorCode in docs/openapi.yaml against ApiError::code");
    let table = protocol_error_table();
    let protocol_codes: BTreeSet<&str> = table.iter().map(|(_, code)| code.as_str()).collect();
    assert_eq!(protocol_codes, documented_codes, "error codes of docs/protocol.md against docs/openapi.yaml");
    // Every status the protocol gives a code is a status of that code in the server.
    for error in [ApiError::HistoryGone, ApiError::MethodNotAllowed, ApiError::NotDurable(String::new())] {
        assert!(table.contains(&(error.status().as_u16(), error.code().to_owned())), "{error:?}");
    }
    // Every example the document gives validates against its schema.
    for (method, path) in documented(&spec) {
        let operation = &spec["paths"][&path][method.to_ascii_lowercase()];
        let mut media = Vec::new();
        if let Some(content) = operation["requestBody"]["content"].as_object() {
            media.extend(content.values());
        }
        for response in operation["responses"].as_object().into_iter().flat_map(|r| r.values()) {
            let response = deref(&spec, response);
            media.extend(response["content"].as_object().into_iter().flat_map(|c| c.values()));
        }
        for medium in media {
            let schema = &medium["schema"];
            let mut examples: Vec<&Value> = medium.get("example").into_iter().collect();
            examples.extend(medium["examples"].as_object().into_iter().flat_map(|e| e.values()).map(|e| &e["value"]));
            for example in examples.into_iter().filter(|e| !e.is_string()) {
                check(&spec, schema, example, &format!("an example of {method} {path}"));
            }
        }
    }
}

fn deref<'a>(spec: &'a Value, value: &'a Value) -> &'a Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(reference) => deref(spec, resolve(spec, reference)),
        None => value,
    }
}

/// Why `value` does not match `schema`, if it does not: the part of JSON Schema 2020-12 the document
/// uses (`$ref`, `type`, `const`, `enum`, `properties`, `required`, `additionalProperties: false`,
/// `items`, `minItems`, `maxItems`, `minimum`, `maximum`, `minLength`, `maxLength`, `oneOf`, `anyOf`,
/// `allOf`). `pattern` and `format` are not checked.
fn mismatch(spec: &Value, schema: &Value, value: &Value, at: &str) -> Option<String> {
    // A schema that is not an object (`true`, or a missing one) accepts anything.
    let schema = schema.as_object()?;
    if let Some(Value::String(reference)) = schema.get("$ref") {
        if let Some(why) = mismatch(spec, resolve(spec, reference), value, at) {
            return Some(why);
        }
    }
    if let Some(types) = schema.get("type") {
        let types: Vec<&str> = match types {
            Value::String(one) => vec![one.as_str()],
            Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let fits = |name: &str| match name {
            "null" => value.is_null(),
            "boolean" => value.is_boolean(),
            "integer" => value.is_u64() || value.is_i64(),
            "number" => value.is_number(),
            "string" => value.is_string(),
            "array" => value.is_array(),
            "object" => value.is_object(),
            _ => false,
        };
        if !types.iter().any(|name| fits(name)) {
            return Some(format!("{at}: {value} is not of type {types:?}"));
        }
    }
    if let Some(expected) = schema.get("const") {
        if expected != value {
            return Some(format!("{at}: {value} is not {expected}"));
        }
    }
    if let Some(Value::Array(allowed)) = schema.get("enum") {
        if !allowed.contains(value) {
            return Some(format!("{at}: {value} is not one of {allowed:?}"));
        }
    }
    if let Some(number) = value.as_f64() {
        if schema.get("minimum").and_then(Value::as_f64).is_some_and(|min| number < min) {
            return Some(format!("{at}: {value} is below the minimum"));
        }
        if schema.get("maximum").and_then(Value::as_f64).is_some_and(|max| number > max) {
            return Some(format!("{at}: {value} is above the maximum"));
        }
    }
    if let Some(text) = value.as_str() {
        let length = text.chars().count() as u64;
        if schema.get("minLength").and_then(Value::as_u64).is_some_and(|min| length < min)
            || schema.get("maxLength").and_then(Value::as_u64).is_some_and(|max| length > max)
        {
            return Some(format!("{at}: the length of {value} is out of bounds"));
        }
    }
    if let Some(items) = value.as_array() {
        let count = items.len() as u64;
        if schema.get("minItems").and_then(Value::as_u64).is_some_and(|min| count < min)
            || schema.get("maxItems").and_then(Value::as_u64).is_some_and(|max| count > max)
        {
            return Some(format!("{at}: {count} items is out of bounds"));
        }
        if let Some(item_schema) = schema.get("items") {
            for (index, item) in items.iter().enumerate() {
                if let Some(why) = mismatch(spec, item_schema, item, &format!("{at}[{index}]")) {
                    return Some(why);
                }
            }
        }
    }
    if let Some(object) = value.as_object() {
        let properties = schema.get("properties").and_then(Value::as_object);
        for name in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
            let name = name.as_str().unwrap_or_default();
            if !object.contains_key(name) {
                return Some(format!("{at}: required field {name} is missing from {value}"));
            }
        }
        for (name, field) in object {
            match properties.and_then(|p| p.get(name)) {
                Some(field_schema) => {
                    if let Some(why) = mismatch(spec, field_schema, field, &format!("{at}.{name}")) {
                        return Some(why);
                    }
                }
                None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    return Some(format!("{at}: field {name} is not allowed"));
                }
                None => {}
            }
        }
    }
    if let Some(Value::Array(all)) = schema.get("allOf") {
        if let Some(why) = all.iter().find_map(|s| mismatch(spec, s, value, at)) {
            return Some(why);
        }
    }
    if let Some(Value::Array(any)) = schema.get("anyOf") {
        let failures: Vec<String> = any.iter().filter_map(|s| mismatch(spec, s, value, at)).collect();
        if failures.len() == any.len() {
            return Some(format!("{at}: matches none of anyOf: {failures:?}"));
        }
    }
    if let Some(Value::Array(one)) = schema.get("oneOf") {
        let matching = one.iter().filter(|s| mismatch(spec, s, value, at).is_none()).count();
        if matching != 1 {
            return Some(format!("{at}: {value} matches {matching} of oneOf, not exactly one"));
        }
    }
    None
}

fn check(spec: &Value, schema: &Value, value: &Value, what: &str) {
    if let Some(why) = mismatch(spec, schema, value, "$") {
        panic!("{what} does not match docs/openapi.yaml: {why}");
    }
}

/// A request whose answer is checked against the document: the status must be one the operation
/// documents, and a JSON answer must match that status's schema.
struct Case {
    method: Method,
    path: &'static str,
    query: String,
    body: Option<Value>,
    headers: Vec<(&'static str, String)>,
    expect: StatusCode,
    /// Whether the request itself must match the documented request schema when it succeeds (a batch
    /// with bad items is answered 200 item by item, yet is not a valid request as documented).
    request_fits: bool,
}

fn case(method: Method, path: &'static str, query: &str, body: Option<Value>, expect: StatusCode) -> Case {
    Case { method, path, query: query.to_owned(), body, headers: Vec::new(), expect, request_fits: true }
}

async fn run_case(spec: &Value, server: &Server, case: &Case) -> Value {
    let url =
        if case.query.is_empty() { server.url(case.path) } else { format!("{}?{}", server.url(case.path), case.query) };
    let mut request = client().request(case.method.clone(), url);
    if let Some(body) = &case.body {
        request = request.header("content-type", "application/json").body(body.to_string());
    }
    for (name, value) in &case.headers {
        request = request.header(*name, value);
    }
    let response = request.send().await.expect("request");
    let status = response.status();
    let content_type =
        response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let text = response.text().await.expect("answer body");
    let what = format!("{} {}?{} answered {status}", case.method, case.path, case.query);
    assert_eq!(status, case.expect, "{what}: {text}");
    let operation = &spec["paths"][case.path][case.method.as_str().to_ascii_lowercase()];
    let documented = operation["responses"]
        .get(status.as_str())
        .unwrap_or_else(|| panic!("{what}, a status docs/openapi.yaml does not list for it"));
    let documented = deref(spec, documented);
    let media = documented["content"].as_object().map(|c| c.keys().cloned().collect::<Vec<_>>()).unwrap_or_default();
    let essence = |t: &str| t.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    assert!(
        (media.is_empty() && text.is_empty()) || media.iter().any(|m| essence(m) == essence(&content_type)),
        "{what} with content type {content_type:?}; documented: {media:?}"
    );
    if !content_type.starts_with("application/json") {
        return Value::Null;
    }
    let value: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{what}: not JSON: {text}"));
    if let Some(request_schema) = operation["requestBody"]["content"]["application/json"].get("schema") {
        if status.is_success() && case.request_fits {
            check(spec, request_schema, case.body.as_ref().unwrap_or(&Value::Null), &format!("the request of {what}"));
        }
    }
    check(spec, &documented["content"]["application/json"]["schema"], &value, &what);
    value
}

#[tokio::test]
async fn openapi_every_documented_route_reaches_its_handler_and_no_other_method_does() {
    let spec = spec();
    let server = Server::start().await;
    let documented = documented(&spec);
    let paths: BTreeSet<&String> = documented.iter().map(|(_, path)| path).collect();
    for (method, path) in &documented {
        let method = Method::from_bytes(method.as_bytes()).expect("a method");
        let mut request = client().request(method.clone(), server.url(path));
        if method == Method::POST {
            request = request.header("content-type", "application/json").body("{}");
        }
        // Without its query (`channel`) or an upgrade, a stream route answers at once instead of
        // streaming: what matters is who answers.
        let response = request.send().await.expect("request");
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let code =
            serde_json::from_str::<Value>(&text).ok().and_then(|v| v["error"]["code"].as_str().map(str::to_owned));
        assert!(
            !matches!(code.as_deref(), Some("not_found" | "method_not_allowed")),
            "{method} {path} is documented but answers the router's fallback: {status} {text}"
        );
    }
    // Every other method on a documented path is refused by the router (HEAD comes with GET, and OPTIONS
    // is the CORS layer's when one is configured).
    for path in &paths {
        for method in ["GET", "POST", "PUT", "DELETE", "PATCH"] {
            if documented.contains(&(method.to_owned(), (*path).clone())) {
                continue;
            }
            let response = client()
                .request(Method::from_bytes(method.as_bytes()).expect("a method"), server.url(path))
                .send()
                .await
                .expect("request");
            let status = response.status();
            let body: Value = response.json().await.expect("a JSON error");
            assert_eq!(
                (status, body["error"]["code"].as_str()),
                (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed")),
                "{method} {path} is not documented, yet it is not refused: {body}"
            );
        }
    }
    let (status, body) = server.get("/v1/no-such-route").await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
    // A real upgrade is what the document says /v1/ws does.
    drop(Ws::connect(&server).await);
}

#[tokio::test]
async fn openapi_answers_match_their_documented_schemas() {
    let spec = spec();
    let server = Server::start().await;
    // Someone on the channel presence is asked about, so that its answer has an entry.
    let (_sse, _) = Sse::open(&server, "channel=chat:7", None).await;
    let ok = StatusCode::OK;
    let bad = StatusCode::BAD_REQUEST;
    let publish =
        json!({"channel": "user:42", "event": "order.updated", "data": {"status": "paid"}, "idempotency_key": "k-1"});
    let mut cases = vec![
        case(Method::POST, "/v1/publish", "", Some(publish.clone()), ok),
        case(Method::POST, "/v1/publish", "", Some(publish), ok),
        case(
            Method::POST,
            "/v1/publish",
            "await=delivery&timeout_ms=50",
            Some(json!({"channel": "chat:7", "data": null})),
            ok,
        ),
        case(
            Method::POST,
            "/v1/publish",
            "",
            Some(json!({"publications": [{"channel": "user:1", "data": 1}, {"channel": "bad name", "data": 2}, 3]})),
            ok,
        ),
        case(Method::POST, "/v1/publish", "", Some(json!({"channel": "user:42"})), bad),
        case(Method::POST, "/v1/publish", "await=never", Some(json!({"channel": "user:42", "data": 1})), bad),
        case(Method::POST, "/v1/broadcast", "", Some(json!({"channels": ["user:1", "bad name"], "data": [1]})), ok),
        case(Method::POST, "/v1/broadcast", "", Some(json!({"channels": [], "data": 1})), bad),
        case(Method::GET, "/v1/history", "channel=user:42", None, ok),
        case(Method::GET, "/v1/history", "channel=user:42&limit=1", None, ok),
        case(Method::GET, "/v1/history", "channel=user:42&since_epoch=Gone0&since_offset=3", None, StatusCode::GONE),
        case(Method::GET, "/v1/history", "channel=user:42&limit=0", None, bad),
        case(Method::GET, "/v1/presence", "channel=chat:7", None, ok),
        case(Method::GET, "/v1/presence", "channel=bad%20name", None, bad),
        case(Method::POST, "/v1/disconnect", "", Some(json!({"user": "42"})), ok),
        case(Method::POST, "/v1/disconnect", "", Some(json!({"user": ""})), bad),
        case(Method::GET, "/v1/cluster", "", None, ok),
        case(Method::GET, "/v1/sse", "channel=user:42&format=xml", None, bad),
        case(Method::GET, "/v1/sse", "channel=user:42&last_event_id=nonsense", None, bad),
        case(Method::GET, "/v1/ws", "", None, StatusCode::UPGRADE_REQUIRED),
        case(Method::GET, "/healthz", "", None, ok),
        case(Method::GET, "/readyz", "", None, ok),
        case(Method::GET, "/metrics", "", None, ok),
        case(Method::GET, "/", "", None, ok),
        case(Method::GET, "/dashboard", "", None, ok),
        case(Method::GET, "/herald-client.js", "", None, ok),
        case(Method::GET, "/favicon.ico", "", None, StatusCode::NO_CONTENT),
    ];
    cases[3].request_fits = false;
    let mut unsupported = case(Method::POST, "/v1/publish", "", None, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    unsupported.headers.push(("content-type", "text/plain".to_owned()));
    cases.push(unsupported);
    let mut answers = BTreeMap::new();
    for (index, case) in cases.iter().enumerate() {
        answers.insert(index, run_case(&spec, &server, case).await);
    }
    // The second publish with the same key is the duplicate the document describes.
    assert_eq!(answers[&1]["duplicate"], true);
    assert_eq!(answers[&1]["offset"], answers[&0]["offset"]);
    assert_eq!(answers[&12]["connections"].as_array().map(Vec::len), Some(1), "presence: {}", answers[&12]);

    // With API keys configured the server API refuses a request without one, as documented.
    let guarded = Server::with(|config| config.api_keys = vec!["k".repeat(24)]).await;
    for (method, path) in documented(&spec) {
        let operation = &spec["paths"][&path][method.to_ascii_lowercase()];
        if operation["security"].as_array().is_some_and(|s| s.iter().any(|r| r.get("apiKey").is_some())) {
            let method = Method::from_bytes(method.as_bytes()).expect("a method");
            let path: &'static str = ROUTES.iter().find(|(_, p)| *p == path).map(|(_, p)| *p).expect("served");
            let body = (method == Method::POST).then(|| json!({}));
            let answer = run_case(&spec, &guarded, &case(method, path, "", body, StatusCode::UNAUTHORIZED)).await;
            assert_eq!(answer["error"]["code"], "unauthorized");
        }
    }
}
