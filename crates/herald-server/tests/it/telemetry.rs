//! OpenTelemetry export: with an OTLP endpoint, a publish on node B and the delivery on node A are
//! exported as spans of one trace (the caller's), received by a small OTLP/HTTP collector stand-in.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{Sse, client};
use crate::process::Node;
use herald_testkit::RedisServer;

/// (node attribute, span name, trace ID hex, span ID hex, parent span ID hex)
type SpanRecord = (String, String, String, String, String);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn collector() -> (String, Arc<Mutex<Vec<SpanRecord>>>) {
    let spans: Arc<Mutex<Vec<SpanRecord>>> = Arc::new(Mutex::new(Vec::new()));
    let store = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let store = store.clone();
            async move {
                let Ok(request) = ExportTraceServiceRequest::decode(body) else { return StatusCode::BAD_REQUEST };
                for resource in request.resource_spans {
                    let node = resource
                        .resource
                        .iter()
                        .flat_map(|r| r.attributes.iter())
                        .find(|kv| kv.key == "herald.node")
                        .and_then(|kv| kv.value.as_ref())
                        .and_then(|v| match &v.value {
                            Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s)) => {
                                Some(s.clone())
                            }
                            _ => None,
                        })
                        .unwrap_or_default();
                    for scope in resource.scope_spans {
                        for span in scope.spans {
                            let record = (
                                node.clone(),
                                span.name,
                                hex(&span.trace_id),
                                hex(&span.span_id),
                                hex(&span.parent_span_id),
                            );
                            if let Ok(mut spans) = store.lock() {
                                spans.push(record);
                            }
                        }
                    }
                }
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind collector");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), spans)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_delivery_spans_share_the_callers_trace() {
    let (endpoint, spans) = collector().await;
    let redis = RedisServer::start();
    let prefix = format!("otel{:08x}", rand::random::<u32>());
    let env = [("HERALD_ENGINE", redis.url()), ("HERALD_REDIS__PREFIX", prefix), ("HERALD_OTLP_ENDPOINT", endpoint)];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut node_a = Node::spawn(&env);
    let mut node_b = Node::spawn(&env);
    let mut sse = Sse::connect_url(&format!("http://{}/v1/sse?channel=user:9", node_a.addr), None).await.expect("SSE");
    assert_eq!(sse.next().await.0, "herald.connected");
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let response = client()
        .post(format!("http://{}/v1/publish", node_b.addr))
        .header("traceparent", format!("00-{trace_id}-b7ad6b7169203331-01"))
        .json(&json!({"channel": "user:9", "data": "traced"}))
        .send()
        .await
        .expect("publish");
    assert_eq!(response.status(), StatusCode::OK);
    let (_, envelope) = sse.next().await;
    assert_eq!(envelope["correlation_id"], trace_id);
    drop(sse);
    // A clean stop flushes each node's exporter.
    node_a.signal("TERM");
    node_b.signal("TERM");
    node_a.wait_exit(Duration::from_secs(10));
    node_b.wait_exit(Duration::from_secs(10));
    let spans = spans.lock().map(|s| s.clone()).unwrap_or_default();
    let publish = spans
        .iter()
        .find(|(node, name, trace, _, _)| name == "publish" && trace == trace_id && *node == node_b.node)
        .unwrap_or_else(|| panic!("no publish span from B in the caller's trace: {spans:?}"));
    assert_eq!(publish.4, "b7ad6b7169203331", "the publish span is a child of the caller's span");
    let deliver = spans
        .iter()
        .find(|(node, name, trace, _, _)| name == "deliver" && trace == trace_id && *node == node_a.node)
        .unwrap_or_else(|| panic!("no deliver span from A in the caller's trace: {spans:?}"));
    assert_eq!(deliver.4, publish.3, "A's deliver span is a child of B's publish span");
}
