//! Distributed tracing (OpenTelemetry, exported over OTLP: gRPC or HTTP), for
//! gateways and controllers.
//!
//! The calling gateway makes one span per HTTP request and per L4
//! connection ("causeway.outbound"), continuing the caller's W3C
//! `traceparent` when there is one; the trace context crosses the tunnel in
//! the stream header's trace field, and the exporting gateway's span for
//! the stream ("causeway.inbound") is its child. HTTP requests go to the
//! endpoint with a `traceparent` naming the calling gateway's span.
//!
//! Off by default: with no `[tracing]` endpoint nothing is created, and a
//! request's own `traceparent` passes through untouched. When on, spans
//! are exported in batches from a bounded queue by the SDK's own thread:
//! the data path never waits on the collector, and failed exports are
//! counted (`causeway_trace_export_errors_total`), never fatal.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracerProvider,
};
use serde::{Deserialize, Serialize};

/// `[tracing]` in the gateway config.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// OTLP endpoint: gRPC, e.g. `http://127.0.0.1:4317`, or with
    /// `protocol = "http"` the base URL spans are POSTed under
    /// (`<endpoint>/v1/traces`), e.g. `http://127.0.0.1:4318`; empty:
    /// tracing off.
    pub otlp_endpoint: String,
    /// `grpc` (default) or `http` (OTLP/HTTP with protobuf bodies, plain
    /// HTTP only).
    pub protocol: String,
    /// Share of new traces sampled, 0 to 1. A caller's sampling decision
    /// (its `traceparent` flags) is followed when there is one.
    pub sample_ratio: f64,
    /// Most spans waiting for export; more are dropped.
    pub max_queue: usize,
    /// How often queued spans are exported, ms.
    pub export_interval_ms: u64,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            protocol: "grpc".into(),
            sample_ratio: 0.01,
            max_queue: 4096,
            export_interval_ms: 1000,
        }
    }
}

impl TracingConfig {
    /// Every problem, each naming its field.
    pub fn check(&self, errs: &mut Vec<String>) {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            errs.push(format!(
                "tracing.sample_ratio: {} must be between 0 and 1",
                self.sample_ratio
            ));
        }
        let e = &self.otlp_endpoint;
        if !(e.is_empty() || e.starts_with("http://") || e.starts_with("https://")) {
            errs.push(format!(
                "tracing.otlp_endpoint: {:?} must be an http:// or https:// URL, e.g. http://127.0.0.1:4317",
                self.otlp_endpoint
            ));
        }
        match self.protocol.as_str() {
            "grpc" => {}
            "http" if e.starts_with("https://") => errs.push(format!(
                "tracing.otlp_endpoint: {e:?}: OTLP over HTTP is sent as plain HTTP; use protocol = \"grpc\" for TLS"
            )),
            "http" => {}
            other => errs.push(format!(
                "tracing.protocol: {other:?} is not one of grpc, http"
            )),
        }
        if !(1..=1_000_000).contains(&self.max_queue) {
            errs.push("tracing.max_queue: between 1 and 1000000 spans".into());
        }
        if !(10..=60_000).contains(&self.export_interval_ms) {
            errs.push("tracing.export_interval_ms: between 10 and 60000".into());
        }
    }
}

/// This gateway's tracer, or none.
pub struct Tracing {
    tracer: Option<opentelemetry_sdk::trace::SdkTracer>,
    provider: Option<SdkTracerProvider>,
    site: String,
}

/// A span in progress; ends (and is queued for export) when dropped.
pub struct Span {
    span: opentelemetry_sdk::trace::Span,
}

impl Tracing {
    /// Tracing off.
    pub fn off() -> Arc<Self> {
        Arc::new(Self {
            tracer: None,
            provider: None,
            site: String::new(),
        })
    }

    /// Tracing as `cfg` says, for the process `service_name` (e.g.
    /// `causeway-gateway`) of `site` (empty for controllers), instance
    /// `instance` (must run inside a tokio runtime: the exporter's gRPC
    /// channel lives on it).
    pub fn start(
        cfg: &TracingConfig,
        service_name: &'static str,
        site: &str,
        instance: &str,
    ) -> Result<Arc<Self>, String> {
        if cfg.otlp_endpoint.is_empty() {
            return Ok(Self::off());
        }
        let exporter = if cfg.protocol == "http" {
            Exporter::Http(HttpExporter::new(&cfg.otlp_endpoint)?)
        } else {
            use opentelemetry_otlp::WithExportConfig;
            Exporter::Grpc(
                opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(cfg.otlp_endpoint.clone())
                    .with_timeout(Duration::from_secs(5))
                    .build()
                    .map_err(|e| format!("tracing.otlp_endpoint: {e}"))?,
            )
        };
        let processor = BatchSpanProcessor::builder(Counted(exporter))
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_max_queue_size(cfg.max_queue)
                    .with_max_export_batch_size(cfg.max_queue.min(512))
                    .with_scheduled_delay(Duration::from_millis(cfg.export_interval_ms))
                    .build(),
            )
            .build();
        let mut resource = opentelemetry_sdk::Resource::builder_empty()
            .with_service_name(service_name)
            .with_attribute(KeyValue::new("service.instance.id", instance.to_string()));
        if !site.is_empty() {
            resource = resource.with_attribute(KeyValue::new("causeway.site", site.to_string()));
        }
        let resource = resource.build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                cfg.sample_ratio,
            ))))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer(service_name);
        tracing::info!(endpoint = %cfg.otlp_endpoint, ratio = cfg.sample_ratio, "tracing on");
        Ok(Arc::new(Self {
            tracer: Some(tracer),
            provider: Some(provider),
            site: site.to_string(),
        }))
    }

    /// Whether spans are made at all.
    pub fn enabled(&self) -> bool {
        self.tracer.is_some()
    }

    /// A span `name` of `kind`, the child of the W3C `traceparent` given
    /// (a remote parent), else the root of a new trace; `None` when
    /// tracing is off.
    pub fn start_span(
        &self,
        name: &'static str,
        kind: SpanKind,
        traceparent: Option<&[u8]>,
        attributes: Vec<KeyValue>,
    ) -> Option<Span> {
        self.tracer.as_ref()?;
        let parent = traceparent
            .and_then(parse_traceparent)
            .map(|sc| Context::new().with_remote_span_context(sc))
            .unwrap_or_default();
        self.begin(name, kind, &parent, attributes)
    }

    /// A span that is the child of the span current for this task (the
    /// context a caller attached with
    /// `opentelemetry::context::FutureExt::with_context`), or a root.
    pub fn start_child(
        &self,
        name: &'static str,
        kind: SpanKind,
        attributes: Vec<KeyValue>,
    ) -> Option<Span> {
        self.begin(name, kind, &Context::current(), attributes)
    }

    /// A span `name` under `parent`, carrying this process's site.
    fn begin(
        &self,
        name: &'static str,
        kind: SpanKind,
        parent: &Context,
        mut attributes: Vec<KeyValue>,
    ) -> Option<Span> {
        let tracer = self.tracer.as_ref()?;
        if !self.site.is_empty() {
            attributes.push(KeyValue::new("causeway.site", self.site.clone()));
        }
        let span = tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes)
            .start_with_context(tracer, parent);
        Some(Span { span })
    }

    /// Exports what is queued and stops (at shutdown).
    pub fn shutdown(&self) {
        if let Some(p) = &self.provider {
            let _ = p.shutdown();
        }
    }
}

impl Span {
    /// Adds attributes.
    pub fn set(&mut self, attributes: impl IntoIterator<Item = KeyValue>) {
        for kv in attributes {
            self.span.set_attribute(kv);
        }
    }

    /// Marks the span failed, saying why.
    pub fn error(&mut self, why: impl Into<String>) {
        self.span
            .set_status(opentelemetry::trace::Status::error(why.into()));
    }

    /// A context whose current span is this one: run a future in it
    /// (`with_context`) and the spans it starts are this one's children.
    pub fn as_parent(&self) -> Context {
        Context::new().with_remote_span_context(self.span.span_context().clone())
    }

    /// This span as a W3C `traceparent` value: what children continue.
    pub fn traceparent(&self) -> String {
        format_traceparent(self.span.span_context())
    }
}

/// Sets attributes on an optional span.
pub fn set(span: &mut Option<Span>, attributes: impl FnOnce() -> Vec<KeyValue>) {
    if let Some(s) = span {
        s.set(attributes());
    }
}

/// A W3C `traceparent` (`00-<trace id>-<span id>-<flags>`) as a remote
/// span context, or `None` when it is not one. Bounded: at most 255 bytes
/// are looked at (the stream header's trace field is no longer).
pub fn parse_traceparent(v: &[u8]) -> Option<SpanContext> {
    if v.len() > 255 {
        return None;
    }
    let s = std::str::from_utf8(v).ok()?.trim();
    let mut parts = s.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex(version, 2) || version == "ff" || !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
        return None;
    }
    if version == "00" && parts.next().is_some() {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags & 1),
        true,
        TraceState::default(),
    ))
}

/// A span context as a W3C `traceparent` value.
pub fn format_traceparent(sc: &SpanContext) -> String {
    format!(
        "00-{}-{}-{:02x}",
        sc.trace_id(),
        sc.span_id(),
        sc.trace_flags().to_u8()
    )
}

/// Where spans go: OTLP over gRPC or over HTTP.
#[derive(Debug)]
enum Exporter {
    Grpc(opentelemetry_otlp::SpanExporter),
    Http(HttpExporter),
}

/// OTLP/HTTP: each batch POSTed as protobuf to `<endpoint>/v1/traces`
/// over plain HTTP/1.1, on the runtime the tracer was made on.
#[derive(Debug)]
struct HttpExporter {
    authority: String,
    path: String,
    resource: opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema,
    runtime: tokio::runtime::Handle,
}

impl HttpExporter {
    fn new(endpoint: &str) -> Result<Self, String> {
        let rest = endpoint.strip_prefix("http://").ok_or_else(|| {
            format!("tracing.otlp_endpoint: {endpoint:?} must start with http:// for protocol http")
        })?;
        let (authority, base) = rest.split_once('/').unwrap_or((rest, ""));
        if authority.is_empty() {
            return Err(format!("tracing.otlp_endpoint: {endpoint:?} names no host"));
        }
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "tracing: start it inside a tokio runtime".to_string())?;
        Ok(Self {
            authority: authority.to_string(),
            path: format!("/{}/v1/traces", base.trim_matches('/')).replace("//", "/"),
            resource: Default::default(),
            runtime,
        })
    }

    async fn post(authority: String, path: String, body: Vec<u8>) -> Result<(), String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(&authority),
        )
        .await
        .map_err(|_| format!("connecting to {authority}: timed out"))?
        .map_err(|e| format!("connecting to {authority}: {e}"))?;
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: {authority}\r\ncontent-type: application/x-protobuf\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        s.write_all(&body).await.map_err(|e| e.to_string())?;
        // The status line is enough; the body (a partial success) is not read.
        let mut status = [0u8; 12];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut status))
            .await
            .map_err(|_| "no answer within 5 s".to_string())?
            .map_err(|e| e.to_string())?;
        match &status[9..10] {
            b"2" => Ok(()),
            _ => Err(format!(
                "the collector answered {}",
                String::from_utf8_lossy(&status[9..12])
            )),
        }
    }

    async fn export(&self, batch: Vec<opentelemetry_sdk::trace::SpanData>) -> Result<(), String> {
        use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
        use prost::Message;
        let resource_spans =
            opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope(
                batch,
                &self.resource,
            );
        let body = ExportTraceServiceRequest { resource_spans }.encode_to_vec();
        self.runtime
            .spawn(Self::post(self.authority.clone(), self.path.clone(), body))
            .await
            .map_err(|e| e.to_string())?
    }
}

/// The exporter, counting failed exports.
#[derive(Debug)]
struct Counted(Exporter);

impl opentelemetry_sdk::trace::SpanExporter for Counted {
    async fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        let n = batch.len() as u64;
        let r = match &self.0 {
            Exporter::Grpc(e) => e.export(batch).await,
            Exporter::Http(e) => e
                .export(batch)
                .await
                .map_err(opentelemetry_sdk::error::OTelSdkError::InternalFailure),
        };
        match &r {
            Ok(()) => metrics::counter!("causeway_trace_spans_exported_total").increment(n),
            Err(e) => {
                metrics::counter!("causeway_trace_export_errors_total").increment(1);
                tracing::debug!(error = %e, spans = n, "trace export failed");
            }
        }
        r
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> opentelemetry_sdk::error::OTelSdkResult {
        match &self.0 {
            Exporter::Grpc(e) => e.shutdown_with_timeout(timeout),
            Exporter::Http(_) => Ok(()),
        }
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        match &mut self.0 {
            Exporter::Grpc(e) => e.set_resource(resource),
            Exporter::Http(e) => e.resource = resource.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_round_trip_and_bad_ones_are_refused() {
        let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let sc = parse_traceparent(v.as_bytes()).unwrap();
        assert!(sc.is_remote() && sc.is_sampled());
        assert_eq!(format_traceparent(&sc), v);
        let unsampled =
            parse_traceparent(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
        assert!(!unsampled.is_sampled());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-xyz",
        ] {
            assert!(parse_traceparent(bad.as_bytes()).is_none(), "{bad}");
        }
        assert!(parse_traceparent(&[b'0'; 300]).is_none());
        assert!(parse_traceparent(&[0xff, 0xfe]).is_none());
    }

    #[test]
    fn bad_settings_name_their_field() {
        let mut errs = Vec::new();
        TracingConfig {
            otlp_endpoint: "127.0.0.1:4317".into(),
            protocol: "udp".into(),
            sample_ratio: 2.0,
            max_queue: 0,
            export_interval_ms: 1,
        }
        .check(&mut errs);
        assert_eq!(errs.len(), 5, "{errs:?}");
        for (e, field) in errs.iter().zip([
            "sample_ratio",
            "otlp_endpoint",
            "protocol",
            "max_queue",
            "export_interval_ms",
        ]) {
            assert!(e.starts_with(&format!("tracing.{field}")), "{e}");
        }
    }

    #[test]
    fn off_makes_no_span() {
        assert!(Tracing::off()
            .start_span("x", SpanKind::Client, None, vec![])
            .is_none());
    }
}
