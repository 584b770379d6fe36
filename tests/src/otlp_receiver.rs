//! A real OTLP receiver for the end-to-end tests: a collector stand-in that
//! stores every export request it gets, decoded into the protobuf types of
//! `opentelemetry-proto`.
//!
//! * [`OtlpReceiver::start_grpc`] serves
//!   `opentelemetry.proto.collector.trace.v1.TraceService/Export` and
//!   `opentelemetry.proto.collector.metrics.v1.MetricsService/Export` (tonic,
//!   gzip accepted);
//! * [`OtlpReceiver::start_http`] serves OTLP/HTTP binary protobuf:
//!   `POST /v1/traces` and `POST /v1/metrics` with
//!   `Content-Type: application/x-protobuf` (gzip `Content-Encoding`
//!   accepted), answering 200 with an empty `Export*ServiceResponse`; other
//!   paths 404, other methods 405, other content types 415, undecodable
//!   bodies 400.
//!
//! Both listen on 127.0.0.1 and run on their own multi-threaded tokio runtime
//! (background worker threads), so tests stay synchronous. Requests are
//! stored before the response is sent: once the exporter has its answer, the
//! data is visible through the accessors. [`OtlpReceiver::stop`] (or drop)
//! shuts the runtime down and frees the port.
//!
//! Helpers turn proto attributes into `serde_json` maps (string, int, bool,
//! double; arrays and key-value lists nest) so they compare directly with
//! kspan's JSON output, and flatten metrics into [`HistogramPoint`]s and
//! [`SumPoint`]s.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::Read;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, ResourceMetrics, metric, number_data_point,
};
use opentelemetry_proto::tonic::trace::v1::{Span, span, status};
use prost::Message;
use serde_json::{Map, Value};
use tokio::net::TcpListener;
use tokio::runtime::Runtime;

pub use opentelemetry_proto::tonic as proto;

/// gRPC path of the trace Export method.
pub const GRPC_TRACES_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";
/// gRPC path of the metrics Export method.
pub const GRPC_METRICS_PATH: &str =
    "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export";

/// Which OTLP transport a receiver speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

impl OtlpProtocol {
    /// The value for `--otlp-protocol` / `OTEL_EXPORTER_OTLP_PROTOCOL`.
    pub fn as_str(self) -> &'static str {
        match self {
            OtlpProtocol::Grpc => "grpc",
            OtlpProtocol::HttpProtobuf => "http/protobuf",
        }
    }
}

/// Which signal an export request carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Traces,
    Metrics,
}

/// Transport-level facts about one accepted export request.
#[derive(Debug, Clone)]
pub struct RequestInfo {
    pub signal: Signal,
    /// HTTP path (`/v1/traces`) or gRPC method path.
    pub path: String,
    /// Request headers (gRPC: metadata), names lowercase. Repeated headers
    /// are joined with ", ".
    pub headers: BTreeMap<String, String>,
    /// Size of the protobuf message in bytes (after decompression).
    pub body_len: usize,
    /// When it was received.
    pub at: Instant,
}

#[derive(Default)]
struct State {
    traces: Vec<ExportTraceServiceRequest>,
    metrics: Vec<ExportMetricsServiceRequest>,
    info: Vec<RequestInfo>,
    /// Requests refused (bad path, content type, body), for diagnostics.
    rejected: Vec<String>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record_traces(&self, req: ExportTraceServiceRequest, info: RequestInfo) {
        let mut st = self.lock();
        st.traces.push(req);
        st.info.push(info);
        drop(st);
        self.changed.notify_all();
    }

    fn record_metrics(&self, req: ExportMetricsServiceRequest, info: RequestInfo) {
        let mut st = self.lock();
        st.metrics.push(req);
        st.info.push(info);
        drop(st);
        self.changed.notify_all();
    }

    fn reject(&self, what: String) {
        self.lock().rejected.push(what);
    }

    /// Waits until `done(state)` or the timeout; returns the final verdict.
    fn wait_until(&self, timeout: Duration, mut done: impl FnMut(&State) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            if done(&st) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            // Bounded waits: also re-check on a timer, not only on notify.
            let wait = left.min(Duration::from_millis(100));
            st = self
                .changed
                .wait_timeout(st, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// One span as received, with its resource and scope.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// Resource attributes of the enclosing ResourceSpans.
    pub resource: Vec<KeyValue>,
    pub scope_name: String,
    pub scope_version: String,
    pub span: Span,
}

impl ReceivedSpan {
    pub fn resource_map(&self) -> Map<String, Value> {
        attributes_to_json(&self.resource)
    }

    pub fn attributes_map(&self) -> Map<String, Value> {
        attributes_to_json(&self.span.attributes)
    }

    pub fn trace_id_hex(&self) -> String {
        hex(&self.span.trace_id)
    }

    pub fn span_id_hex(&self) -> String {
        hex(&self.span.span_id)
    }

    /// None when the span has no parent (empty `parent_span_id`).
    pub fn parent_span_id_hex(&self) -> Option<String> {
        (!self.span.parent_span_id.is_empty()).then(|| hex(&self.span.parent_span_id))
    }

    /// "SERVER", "CLIENT", ... (proto enum name without the prefix).
    pub fn kind_name(&self) -> String {
        span_kind_name(self.span.kind)
    }

    /// "UNSET", "OK" or "ERROR" (a missing status is UNSET).
    pub fn status_name(&self) -> String {
        status_code_name(self.span.status.as_ref().map_or(0, |s| s.code))
    }

    /// A string attribute of the span.
    pub fn attr_str(&self, key: &str) -> Option<String> {
        self.attributes_map()
            .get(key)
            .and_then(Value::as_str)
            .map(str::to_string)
    }

    /// The span in kspan's JSON shape (trace_id, span_id, parent_span_id,
    /// name, kind, start_unix_nano, end_unix_nano, status, attributes),
    /// without `resource` (compare that separately: the OTLP resource also
    /// carries `telemetry.distro.*`).
    pub fn to_kspan_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("trace_id".into(), self.trace_id_hex().into());
        m.insert("span_id".into(), self.span_id_hex().into());
        m.insert(
            "parent_span_id".into(),
            self.parent_span_id_hex().map_or(Value::Null, Value::from),
        );
        m.insert("name".into(), self.span.name.clone().into());
        m.insert("kind".into(), self.kind_name().into());
        m.insert(
            "start_unix_nano".into(),
            self.span.start_time_unix_nano.into(),
        );
        m.insert("end_unix_nano".into(), self.span.end_time_unix_nano.into());
        m.insert("status".into(), self.status_name().into());
        m.insert("attributes".into(), Value::Object(self.attributes_map()));
        Value::Object(m)
    }
}

/// A running OTLP receiver. Stops (and frees its port) on drop.
pub struct OtlpReceiver {
    port: u16,
    protocol: OtlpProtocol,
    shared: Arc<Shared>,
    runtime: Option<Runtime>,
}

impl OtlpReceiver {
    /// OTLP/gRPC on 127.0.0.1:`port` (0: any free port).
    pub fn start_grpc(port: u16) -> OtlpReceiver {
        let runtime = new_runtime();
        let listener = bind(&runtime, port);
        let port = listener.local_addr().expect("receiver local addr").port();
        let shared = Arc::new(Shared::default());
        let svc = GrpcService {
            shared: Arc::clone(&shared),
        };
        let traces = TraceServiceServer::new(svc.clone())
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
            .max_decoding_message_size(64 << 20);
        let metrics = MetricsServiceServer::new(svc)
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
            .max_decoding_message_size(64 << 20);
        runtime.spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            if let Err(e) = tonic::transport::Server::builder()
                .add_service(traces)
                .add_service(metrics)
                .serve_with_incoming(incoming)
                .await
            {
                eprintln!("otlp receiver (grpc, port {port}): server error: {e}");
            }
        });
        OtlpReceiver {
            port,
            protocol: OtlpProtocol::Grpc,
            shared,
            runtime: Some(runtime),
        }
    }

    /// OTLP/HTTP binary protobuf on 127.0.0.1:`port` (0: any free port).
    pub fn start_http(port: u16) -> OtlpReceiver {
        let runtime = new_runtime();
        let listener = bind(&runtime, port);
        let port = listener.local_addr().expect("receiver local addr").port();
        let shared = Arc::new(Shared::default());
        let sh = Arc::clone(&shared);
        runtime.spawn(async move {
            loop {
                let (stream, _) = match listener.accept().await {
                    Ok(c) => c,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let sh = Arc::clone(&sh);
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle_http(req, Arc::clone(&sh)));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        OtlpReceiver {
            port,
            protocol: OtlpProtocol::HttpProtobuf,
            shared,
            runtime: Some(runtime),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT` (no path: for OTLP/HTTP kspan appends
    /// `/v1/traces` and `/v1/metrics`).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn protocol(&self) -> OtlpProtocol {
        self.protocol
    }

    /// Every trace export request received so far, in arrival order.
    pub fn trace_requests(&self) -> Vec<ExportTraceServiceRequest> {
        self.shared.lock().traces.clone()
    }

    /// Every metrics export request received so far, in arrival order.
    pub fn metric_requests(&self) -> Vec<ExportMetricsServiceRequest> {
        self.shared.lock().metrics.clone()
    }

    /// Transport facts (path, headers) of every accepted request, in order.
    pub fn request_info(&self) -> Vec<RequestInfo> {
        self.shared.lock().info.clone()
    }

    /// Requests refused by the HTTP receiver (method, path, reason).
    pub fn rejected(&self) -> Vec<String> {
        self.shared.lock().rejected.clone()
    }

    /// Every span received so far, flattened, in arrival order.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        flatten_spans(&self.shared.lock().traces)
    }

    /// Waits up to `timeout` for at least `n` spans; returns all spans
    /// received by then (possibly fewer than `n`: the caller asserts).
    pub fn wait_for_spans(&self, n: usize, timeout: Duration) -> Vec<ReceivedSpan> {
        self.wait_for_spans_where(n, timeout, |_| true)
    }

    /// Waits up to `timeout` for at least `n` spans matching `pred`; returns
    /// the matching spans received by then.
    pub fn wait_for_spans_where(
        &self,
        n: usize,
        timeout: Duration,
        pred: impl Fn(&ReceivedSpan) -> bool,
    ) -> Vec<ReceivedSpan> {
        self.shared.wait_until(timeout, |st| {
            flatten_spans(&st.traces).iter().filter(|s| pred(s)).count() >= n
        });
        self.spans().into_iter().filter(|s| pred(s)).collect()
    }

    /// Waits up to `timeout` for at least `n` metrics requests; returns all
    /// metrics requests received by then.
    pub fn wait_for_metric_requests(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Vec<ExportMetricsServiceRequest> {
        self.shared.wait_until(timeout, |st| st.metrics.len() >= n);
        self.metric_requests()
    }

    /// Waits up to `timeout` until `done(all metrics requests so far)`;
    /// returns whether it happened.
    pub fn wait_for_metrics_where(
        &self,
        timeout: Duration,
        done: impl Fn(&[ExportMetricsServiceRequest]) -> bool,
    ) -> bool {
        self.shared.wait_until(timeout, |st| done(&st.metrics))
    }

    /// Stops serving and frees the port (also done on drop).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(rt) = self.runtime.take() {
            // Drops every task: the listener and open connections close.
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn new_runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("otlp-receiver")
        .enable_all()
        .build()
        .expect("build the OTLP receiver's tokio runtime")
}

fn bind(runtime: &Runtime, port: u16) -> TcpListener {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    runtime
        .block_on(TcpListener::bind(addr))
        .unwrap_or_else(|e| panic!("OTLP receiver: cannot bind {addr}: {e}"))
}

// ---------------------------------------------------------------------------
// gRPC
// ---------------------------------------------------------------------------

#[derive(Clone)]
struct GrpcService {
    shared: Arc<Shared>,
}

fn metadata_headers(md: &tonic::metadata::MetadataMap) -> BTreeMap<String, String> {
    header_map(&md.clone().into_headers())
}

#[tonic::async_trait]
impl TraceService for GrpcService {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let headers = metadata_headers(request.metadata());
        let msg = request.into_inner();
        let info = RequestInfo {
            signal: Signal::Traces,
            path: GRPC_TRACES_PATH.to_string(),
            headers,
            body_len: msg.encoded_len(),
            at: Instant::now(),
        };
        self.shared.record_traces(msg, info);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for GrpcService {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let headers = metadata_headers(request.metadata());
        let msg = request.into_inner();
        let info = RequestInfo {
            signal: Signal::Metrics,
            path: GRPC_METRICS_PATH.to_string(),
            headers,
            body_len: msg.encoded_len(),
            at: Instant::now(),
        };
        self.shared.record_metrics(msg, info);
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

// ---------------------------------------------------------------------------
// HTTP/1.1
// ---------------------------------------------------------------------------

fn header_map(h: &hyper::HeaderMap) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in h {
        let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
        out.entry(k.as_str().to_ascii_lowercase())
            .and_modify(|old| {
                old.push_str(", ");
                old.push_str(&v);
            })
            .or_insert(v);
    }
    out
}

fn plain(code: StatusCode, text: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(text.to_string())))
        .expect("build response")
}

fn protobuf_ok(body: Vec<u8>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/x-protobuf")
        .body(Full::new(Bytes::from(body)))
        .expect("build response")
}

async fn handle_http(
    req: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let signal = match path.as_str() {
        "/v1/traces" => Signal::Traces,
        "/v1/metrics" => Signal::Metrics,
        _ => {
            shared.reject(format!("{method} {path}: unknown path"));
            return Ok(plain(StatusCode::NOT_FOUND, "not found\n"));
        }
    };
    if method != hyper::Method::POST {
        shared.reject(format!("{method} {path}: method not allowed"));
        return Ok(plain(StatusCode::METHOD_NOT_ALLOWED, "POST only\n"));
    }
    let headers = header_map(req.headers());
    let content_type = headers.get("content-type").cloned().unwrap_or_default();
    let media = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if media != "application/x-protobuf" {
        shared.reject(format!(
            "{method} {path}: unsupported content type {content_type:?}"
        ));
        return Ok(plain(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "application/x-protobuf only\n",
        ));
    }
    let raw = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            shared.reject(format!("{method} {path}: body read error: {e}"));
            return Ok(plain(StatusCode::BAD_REQUEST, "bad body\n"));
        }
    };
    let body: Vec<u8> = match headers
        .get("content-encoding")
        .map(|s| s.trim().to_ascii_lowercase())
        .as_deref()
    {
        None | Some("") | Some("identity") => raw.to_vec(),
        Some("gzip") => {
            let mut out = Vec::new();
            if let Err(e) = flate2::read::GzDecoder::new(&raw[..]).read_to_end(&mut out) {
                shared.reject(format!("{method} {path}: bad gzip body: {e}"));
                return Ok(plain(StatusCode::BAD_REQUEST, "bad gzip\n"));
            }
            out
        }
        Some(other) => {
            shared.reject(format!(
                "{method} {path}: unsupported content encoding {other:?}"
            ));
            return Ok(plain(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported encoding\n",
            ));
        }
    };
    let info = RequestInfo {
        signal,
        path: path.clone(),
        headers,
        body_len: body.len(),
        at: Instant::now(),
    };
    match signal {
        Signal::Traces => match ExportTraceServiceRequest::decode(&body[..]) {
            Ok(msg) => {
                shared.record_traces(msg, info);
                Ok(protobuf_ok(
                    ExportTraceServiceResponse::default().encode_to_vec(),
                ))
            }
            Err(e) => {
                shared.reject(format!("{method} {path}: protobuf decode error: {e}"));
                Ok(plain(StatusCode::BAD_REQUEST, "bad protobuf\n"))
            }
        },
        Signal::Metrics => match ExportMetricsServiceRequest::decode(&body[..]) {
            Ok(msg) => {
                shared.record_metrics(msg, info);
                Ok(protobuf_ok(
                    ExportMetricsServiceResponse::default().encode_to_vec(),
                ))
            }
            Err(e) => {
                shared.reject(format!("{method} {path}: protobuf decode error: {e}"));
                Ok(plain(StatusCode::BAD_REQUEST, "bad protobuf\n"))
            }
        },
    }
}

// ---------------------------------------------------------------------------
// Conversions
// ---------------------------------------------------------------------------

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// "SERVER", "CLIENT", "INTERNAL", "PRODUCER", "CONSUMER", "UNSPECIFIED",
/// or "KIND(<n>)" for an unknown value.
pub fn span_kind_name(kind: i32) -> String {
    match span::SpanKind::try_from(kind) {
        Ok(k) => k.as_str_name().trim_start_matches("SPAN_KIND_").to_string(),
        Err(_) => format!("KIND({kind})"),
    }
}

/// "UNSET", "OK", "ERROR", or "CODE(<n>)" for an unknown value.
pub fn status_code_name(code: i32) -> String {
    match status::StatusCode::try_from(code) {
        Ok(c) => c
            .as_str_name()
            .trim_start_matches("STATUS_CODE_")
            .to_string(),
        Err(_) => format!("CODE({code})"),
    }
}

/// A proto AnyValue as JSON: string, int, bool, double (non-finite: null),
/// arrays and key-value lists nested, bytes as lowercase hex; no value: null.
pub fn any_value_to_json(v: &AnyValue) -> Value {
    match &v.value {
        None => Value::Null,
        Some(any_value::Value::StringValue(s)) => Value::from(s.as_str()),
        Some(any_value::Value::BoolValue(b)) => Value::from(*b),
        Some(any_value::Value::IntValue(i)) => Value::from(*i),
        Some(any_value::Value::DoubleValue(d)) => {
            serde_json::Number::from_f64(*d).map_or(Value::Null, Value::Number)
        }
        Some(any_value::Value::ArrayValue(a)) => {
            Value::Array(a.values.iter().map(any_value_to_json).collect())
        }
        Some(any_value::Value::KvlistValue(kv)) => Value::Object(attributes_to_json(&kv.values)),
        Some(any_value::Value::BytesValue(b)) => Value::from(hex(b)),
        Some(any_value::Value::StringValueStrindex(i)) => Value::from(format!("strindex:{i}")),
    }
}

/// Attribute list → map key → JSON value. Panics on a duplicate key
/// (OTLP: keys MUST be unique).
pub fn attributes_to_json(attrs: &[KeyValue]) -> Map<String, Value> {
    let mut m = Map::new();
    for kv in attrs {
        let v = kv.value.as_ref().map_or(Value::Null, any_value_to_json);
        if let Some(old) = m.insert(kv.key.clone(), v.clone()) {
            panic!(
                "duplicate attribute key {:?} ({old} and {v}) in {attrs:?}",
                kv.key
            );
        }
    }
    m
}

/// Sorted (BTreeMap) view of an attribute list, handy as a map key or for
/// stable printing.
pub fn attributes_sorted(attrs: &[KeyValue]) -> BTreeMap<String, Value> {
    attributes_to_json(attrs).into_iter().collect()
}

/// Flattens trace requests into spans with their resource and scope.
pub fn flatten_spans(requests: &[ExportTraceServiceRequest]) -> Vec<ReceivedSpan> {
    let mut out = Vec::new();
    for req in requests {
        for rs in &req.resource_spans {
            let resource = rs
                .resource
                .as_ref()
                .map(|r| r.attributes.clone())
                .unwrap_or_default();
            for ss in &rs.scope_spans {
                let (scope_name, scope_version) = ss
                    .scope
                    .as_ref()
                    .map(|s| (s.name.clone(), s.version.clone()))
                    .unwrap_or_default();
                for span in &ss.spans {
                    out.push(ReceivedSpan {
                        resource: resource.clone(),
                        scope_name: scope_name.clone(),
                        scope_version: scope_version.clone(),
                        span: span.clone(),
                    });
                }
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------

/// For each distinct resource (by its attribute set), the ResourceMetrics of
/// the LAST request that carried it. With cumulative temporality that is the
/// resource's latest state. Ordered by resource attributes.
pub fn latest_per_resource(
    requests: &[ExportMetricsServiceRequest],
) -> Vec<(BTreeMap<String, Value>, ResourceMetrics)> {
    let mut latest: BTreeMap<String, (BTreeMap<String, Value>, ResourceMetrics)> = BTreeMap::new();
    for req in requests {
        for rm in &req.resource_metrics {
            let attrs = rm
                .resource
                .as_ref()
                .map(|r| attributes_sorted(&r.attributes))
                .unwrap_or_default();
            let key = serde_json::to_string(&attrs).expect("serialize resource key");
            latest.insert(key, (attrs, rm.clone()));
        }
    }
    latest.into_values().collect()
}

/// One histogram data point, flattened with its resource and metric.
#[derive(Debug, Clone)]
pub struct HistogramPoint {
    pub resource: BTreeMap<String, Value>,
    pub scope_name: String,
    pub metric: String,
    pub unit: String,
    /// AggregationTemporality as i32 (2 = cumulative).
    pub temporality: i32,
    pub attributes: BTreeMap<String, Value>,
    pub count: u64,
    pub sum: Option<f64>,
    pub bucket_counts: Vec<u64>,
    pub explicit_bounds: Vec<f64>,
    pub start_time_unix_nano: u64,
    pub time_unix_nano: u64,
}

/// One Sum (counter) data point, flattened with its resource and metric.
#[derive(Debug, Clone)]
pub struct SumPoint {
    pub resource: BTreeMap<String, Value>,
    pub scope_name: String,
    pub metric: String,
    pub unit: String,
    pub temporality: i32,
    pub is_monotonic: bool,
    pub attributes: BTreeMap<String, Value>,
    /// The value as f64 (int or double data points).
    pub value: f64,
    /// True when the data point was an int.
    pub is_int: bool,
}

/// `AggregationTemporality::Cumulative` as i32.
pub const CUMULATIVE: i32 = AggregationTemporality::Cumulative as i32;

/// Every histogram data point named `name` in `resources`.
pub fn histogram_points(
    resources: &[(BTreeMap<String, Value>, ResourceMetrics)],
    name: &str,
) -> Vec<HistogramPoint> {
    let mut out = Vec::new();
    for (res, rm) in resources {
        for sm in &rm.scope_metrics {
            let scope_name = sm
                .scope
                .as_ref()
                .map(|s| s.name.clone())
                .unwrap_or_default();
            for m in sm.metrics.iter().filter(|m| m.name == name) {
                let Some(metric::Data::Histogram(h)) = &m.data else {
                    panic!("metric {name} is not a histogram: {m:?}");
                };
                for dp in &h.data_points {
                    out.push(HistogramPoint {
                        resource: res.clone(),
                        scope_name: scope_name.clone(),
                        metric: m.name.clone(),
                        unit: m.unit.clone(),
                        temporality: h.aggregation_temporality,
                        attributes: attributes_sorted(&dp.attributes),
                        count: dp.count,
                        sum: dp.sum,
                        bucket_counts: dp.bucket_counts.clone(),
                        explicit_bounds: dp.explicit_bounds.clone(),
                        start_time_unix_nano: dp.start_time_unix_nano,
                        time_unix_nano: dp.time_unix_nano,
                    });
                }
            }
        }
    }
    out
}

/// Every Sum data point named `name` in `resources`.
pub fn sum_points(
    resources: &[(BTreeMap<String, Value>, ResourceMetrics)],
    name: &str,
) -> Vec<SumPoint> {
    let mut out = Vec::new();
    for (res, rm) in resources {
        for sm in &rm.scope_metrics {
            let scope_name = sm
                .scope
                .as_ref()
                .map(|s| s.name.clone())
                .unwrap_or_default();
            for m in sm.metrics.iter().filter(|m| m.name == name) {
                let Some(metric::Data::Sum(s)) = &m.data else {
                    panic!("metric {name} is not a Sum: {m:?}");
                };
                for dp in &s.data_points {
                    let (value, is_int) = match dp.value {
                        Some(number_data_point::Value::AsInt(i)) => (i as f64, true),
                        Some(number_data_point::Value::AsDouble(d)) => (d, false),
                        None => (f64::NAN, false),
                    };
                    out.push(SumPoint {
                        resource: res.clone(),
                        scope_name: scope_name.clone(),
                        metric: m.name.clone(),
                        unit: m.unit.clone(),
                        temporality: s.aggregation_temporality,
                        is_monotonic: s.is_monotonic,
                        attributes: attributes_sorted(&dp.attributes),
                        value,
                        is_int,
                    });
                }
            }
        }
    }
    out
}

/// Names of every metric in `resources` (sorted, deduplicated).
pub fn metric_names(resources: &[(BTreeMap<String, Value>, ResourceMetrics)]) -> Vec<String> {
    let mut names: Vec<String> = resources
        .iter()
        .flat_map(|(_, rm)| rm.scope_metrics.iter())
        .flat_map(|sm| sm.metrics.iter().map(|m| m.name.clone()))
        .collect();
    names.sort();
    names.dedup();
    names
}

// ---------------------------------------------------------------------------
// Self-tests of the receiver (no kspan, no root)
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
    use opentelemetry_proto::tonic::metrics::v1::{
        Histogram, HistogramDataPoint, Metric, ScopeMetrics,
    };
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Status};
    use std::io::Write;
    use std::net::TcpStream;

    fn kv_str(k: &str, v: &str) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(v.into())),
            }),
            ..Default::default()
        }
    }

    fn kv_int(k: &str, v: i64) -> KeyValue {
        KeyValue {
            key: k.into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::IntValue(v)),
            }),
            ..Default::default()
        }
    }

    fn trace_request() -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv_str("service.name", "svc"), kv_int("process.pid", 7)],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "kspan".into(),
                        version: "1".into(),
                        ..Default::default()
                    }),
                    spans: vec![Span {
                        trace_id: vec![1; 16],
                        span_id: vec![2; 8],
                        name: "GET /x".into(),
                        kind: span::SpanKind::Server as i32,
                        start_time_unix_nano: 10,
                        end_time_unix_nano: 20,
                        attributes: vec![kv_int("http.response.status_code", 500)],
                        status: Some(Status {
                            code: status::StatusCode::Error as i32,
                            ..Default::default()
                        }),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    fn metrics_request(count: u64) -> ExportMetricsServiceRequest {
        ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(Resource {
                    attributes: vec![kv_str("service.name", "svc")],
                    ..Default::default()
                }),
                scope_metrics: vec![ScopeMetrics {
                    metrics: vec![Metric {
                        name: "h".into(),
                        unit: "s".into(),
                        data: Some(metric::Data::Histogram(Histogram {
                            data_points: vec![HistogramDataPoint {
                                count,
                                attributes: vec![kv_str("k", "v")],
                                ..Default::default()
                            }],
                            aggregation_temporality: CUMULATIVE,
                        })),
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    fn check_received_span(rx: &OtlpReceiver) {
        let spans = rx.wait_for_spans(1, Duration::from_secs(5));
        assert_eq!(spans.len(), 1);
        let s = &spans[0];
        assert_eq!(s.scope_name, "kspan");
        assert_eq!(s.kind_name(), "SERVER");
        assert_eq!(s.status_name(), "ERROR");
        assert_eq!(s.span_id_hex(), "0202020202020202");
        assert_eq!(s.parent_span_id_hex(), None);
        assert_eq!(s.resource_map()["process.pid"], 7);
        let j = s.to_kspan_json();
        assert_eq!(j["attributes"]["http.response.status_code"], 500);
        assert_eq!(j["parent_span_id"], Value::Null);
        assert_eq!(j["start_unix_nano"], 10);
    }

    /// POSTs `body` and returns (status line, raw response).
    fn post(port: u16, path: &str, content_type: &str, body: &[u8]) -> (String, Vec<u8>) {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nx-test: abc\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .unwrap();
        s.write_all(body).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        let text = String::from_utf8_lossy(&out).into_owned();
        (text.lines().next().unwrap_or("").to_string(), out)
    }

    #[test]
    fn http_receiver_decodes_and_answers() {
        let rx = OtlpReceiver::start_http(0);
        let (status, raw) = post(
            rx.port(),
            "/v1/traces",
            "application/x-protobuf",
            &trace_request().encode_to_vec(),
        );
        assert!(status.contains(" 200 "), "{status}");
        let text = String::from_utf8_lossy(&raw).to_ascii_lowercase();
        assert!(
            text.contains("content-type: application/x-protobuf"),
            "{text}"
        );
        check_received_span(&rx);
        assert_eq!(rx.request_info()[0].path, "/v1/traces");
        assert_eq!(rx.request_info()[0].headers["x-test"], "abc");

        let (status, _) = post(
            rx.port(),
            "/v1/metrics",
            "application/x-protobuf",
            &metrics_request(3).encode_to_vec(),
        );
        assert!(status.contains(" 200 "), "{status}");
        let (status, _) = post(rx.port(), "/v1/logs", "application/x-protobuf", b"");
        assert!(status.contains(" 404 "), "{status}");
        let (status, _) = post(rx.port(), "/v1/traces", "application/json", b"{}");
        assert!(status.contains(" 415 "), "{status}");
        assert_eq!(rx.rejected().len(), 2, "{:?}", rx.rejected());
        let m = rx.wait_for_metric_requests(1, Duration::from_secs(5));
        let latest = latest_per_resource(&m);
        let pts = histogram_points(&latest, "h");
        assert_eq!(pts.len(), 1);
        assert_eq!(pts[0].count, 3);
        assert_eq!(pts[0].temporality, CUMULATIVE);

        let port = rx.port();
        rx.stop();
        // The port is free again.
        std::net::TcpListener::bind(("127.0.0.1", port)).expect("port freed by stop()");
    }

    #[test]
    fn grpc_receiver_decodes_and_keeps_latest_per_resource() {
        let rx = OtlpReceiver::start_grpc(0);
        let endpoint = rx.endpoint();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut c = TraceServiceClient::connect(endpoint.clone()).await.unwrap();
            let mut req = tonic::Request::new(trace_request());
            req.metadata_mut().insert("x-test", "abc".parse().unwrap());
            c.export(req).await.unwrap();
            let mut m = MetricsServiceClient::connect(endpoint).await.unwrap();
            m.export(metrics_request(1)).await.unwrap();
            m.export(metrics_request(4)).await.unwrap();
        });
        check_received_span(&rx);
        assert_eq!(rx.request_info()[0].path, GRPC_TRACES_PATH);
        assert_eq!(rx.request_info()[0].headers["x-test"], "abc");
        let m = rx.metric_requests();
        assert_eq!(m.len(), 2);
        let pts = histogram_points(&latest_per_resource(&m), "h");
        assert_eq!(pts.len(), 1, "one resource, its last state");
        assert_eq!(pts[0].count, 4);
        let port = rx.port();
        drop(rx);
        std::net::TcpListener::bind(("127.0.0.1", port)).expect("port freed on drop");
    }
}
