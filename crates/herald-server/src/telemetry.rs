//! Logging and, when an OTLP endpoint is configured, OpenTelemetry traces.
//!
//! With `otlp_endpoint` set, Herald exports a `publish` span for each publication (a child of the
//! caller's W3C `traceparent` when one came with the request) and, on every node that hands the
//! publication to its connections, a `deliver` span that is a child of the publish span: the trace
//! context travels inside the publication through the engine. Without an endpoint no span is made and
//! nothing is exported.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::http::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::Settings;

static ENABLED: AtomicBool = AtomicBool::new(false);
static PROPAGATOR: OnceLock<TraceContextPropagator> = OnceLock::new();

/// Whether spans are being exported (checked before making any).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Keeps the exporter alive; `shutdown` flushes what is still buffered.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(error) = provider.shutdown() {
                eprintln!("herald: flushing traces failed: {error}");
            }
        }
    }
}

/// Installs the process's log output (text or JSON on stderr, filtered by `HERALD_LOG`) and, with an
/// OTLP endpoint, the trace exporter.
pub fn init(settings: &Settings) -> Result<Telemetry, String> {
    let filter = EnvFilter::try_from_env("HERALD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if settings.config.log_format == "json" { fmt.json().boxed() } else { fmt.boxed() };
    let Some(endpoint) = &settings.config.otlp_endpoint else {
        tracing_subscriber::registry().with(fmt.with_filter(filter)).init();
        return Ok(Telemetry { provider: None });
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
        .build()
        .map_err(|e| format!("otlp_endpoint: {e}"))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("herald")
        .with_attribute(opentelemetry::KeyValue::new("herald.node", settings.node_id.clone()))
        .build();
    let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build();
    let tracer = provider.tracer("herald");
    // Only Herald's own publish and deliver spans are exported, whatever the log filter says.
    let spans = EnvFilter::new("herald_server::telemetry=info");
    let otel = tracing_opentelemetry::layer().with_tracer(tracer).with_filter(spans);
    tracing_subscriber::registry().with(fmt.with_filter(filter)).with(otel).init();
    let _ = PROPAGATOR.set(TraceContextPropagator::new());
    ENABLED.store(true, Ordering::Relaxed);
    Ok(Telemetry { provider: Some(provider) })
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct Single<'a>(&'a str);

impl Extractor for Single<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

struct Capture(Option<String>);

impl Injector for Capture {
    fn set(&mut self, key: &str, value: String) {
        if key == "traceparent" {
            self.0 = Some(value);
        }
    }
}

/// A `publish` span, child of the request's `traceparent` if any; `None` when export is off.
pub fn publish_span(headers: &HeaderMap, channel: &str, correlation_id: &str) -> Option<tracing::Span> {
    let propagator = PROPAGATOR.get().filter(|_| enabled())?;
    let span = tracing::info_span!("publish", channel, correlation_id);
    let parent = propagator.extract(&Headers(headers));
    let _ = span.set_parent(parent);
    Some(span)
}

/// The W3C `traceparent` of `span`, to carry inside the publication to the delivering nodes.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let propagator = PROPAGATOR.get()?;
    let mut capture = Capture(None);
    propagator.inject_context(&span.context(), &mut capture);
    capture.0
}

/// Records a `deliver` span for a publication handed to `recipients` local connections, as a child of
/// the publisher's span (its `traceparent`).
pub fn deliver_span(traceparent: &str, channel: &str, correlation_id: &str, offset: u64, recipients: usize) {
    let Some(propagator) = PROPAGATOR.get().filter(|_| enabled()) else { return };
    let span = tracing::info_span!("deliver", channel, correlation_id, offset, recipients);
    let _ = span.set_parent(propagator.extract(&Single(traceparent)));
    drop(span.entered());
}
