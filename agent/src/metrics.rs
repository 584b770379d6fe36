//! RED metrics derived from spans, and the agent's own health, as OpenTelemetry metrics.
//!
//! Each traced process gets its own MeterProvider so its metrics carry its own resource (the same
//! one as its spans). Providers are read by `ManualReader`s that the OTLP push worker and the
//! Prometheus endpoint collect on their own schedule. The number of per-process providers is
//! bounded; the least recently used one is evicted past the bound.

use rustc_hash::FxHashMap;
use std::{
    fmt,
    sync::{Arc, Mutex, Weak, atomic::AtomicU64},
    time::Duration,
};

use opentelemetry::{
    KeyValue,
    metrics::{Counter, Histogram, MeterProvider as _},
};
use opentelemetry_sdk::{
    error::OTelSdkResult,
    metrics::{
        InstrumentKind, ManualReader, Pipeline, SdkMeterProvider, Temporality,
        data::ResourceMetrics, reader::MetricReader,
    },
};

use crate::{
    export::otlp::traces::sdk_resource,
    service_graph::{EdgeKey, EdgeStats, ServiceGraph},
    spans::{AttributeValue, Resource, Span, SpanKind},
    stats::{COUNTERS, Stats},
};

/// Semantic-convention bucket boundaries for http.*.request.duration, in seconds.
pub const DURATION_BOUNDARIES: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];
/// Most traced processes with their own metrics at once.
const MAX_PROCESSES: usize = 256;
/// Most distinct attribute sets per instrument of one process. Past it, new sets go to one
/// overflow series (attacker-chosen values `_OTHER`), counted. Under the SDK's own limit (2000),
/// so the SDK never folds series itself.
pub const MAX_SERIES: usize = 1000;
/// Value of an attacker-chosen attribute in the overflow series.
const OVERFLOW_VALUE: &str = "_OTHER";
/// Attributes whose values come from the traffic (paths, Host or :authority, gRPC paths, topic
/// and group names): `_OTHER` in the overflow series. The method is already `_OTHER` when
/// unknown, status codes and error types are few.
const TRAFFIC_CHOSEN: [&str; 6] = [
    "http.route",
    "server.address",
    "rpc.service",
    "rpc.method",
    "messaging.destination.name",
    "messaging.consumer.group.name",
];

/// A ManualReader that the hub keeps a handle on after giving it to a provider.
#[derive(Clone)]
pub(crate) struct SharedReader(pub(crate) Arc<ManualReader>);

impl fmt::Debug for SharedReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedReader")
    }
}

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline)
    }
    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }
    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

struct Provider {
    provider: SdkMeterProvider,
    reader: SharedReader,
}

impl Provider {
    fn new(resource: opentelemetry_sdk::Resource) -> Self {
        let reader = SharedReader(Arc::new(ManualReader::builder().build()));
        let provider = SdkMeterProvider::builder()
            .with_resource(resource)
            .with_reader(reader.clone())
            .build();
        Provider { provider, reader }
    }

    fn collect(&self) -> Option<ResourceMetrics> {
        let mut metrics = ResourceMetrics::default();
        self.reader.collect(&mut metrics).ok()?;
        Some(metrics)
    }
}

struct ProcessMetrics {
    /// Keeps the resource alive so its address stays a unique key.
    _resource: Arc<Resource>,
    provider: Provider,
    server_duration: Histogram<f64>,
    client_duration: Histogram<f64>,
    rpc_server_duration: Histogram<f64>,
    rpc_client_duration: Histogram<f64>,
    messaging_duration: Histogram<f64>,
    messaging_sent: Counter<u64>,
    messaging_consumed: Counter<u64>,
    /// Attribute sets seen per duration histogram (the message counters share the messaging
    /// one's), by [`Instrument`].
    series: [SeriesCap; 5],
    last_used: u64,
}

/// Index of a duration histogram in `ProcessMetrics::series`.
#[derive(Clone, Copy)]
enum Instrument {
    HttpServer,
    HttpClient,
    RpcServer,
    RpcClient,
    Messaging,
}

/// The distinct attribute sets one instrument has recorded, up to [`MAX_SERIES`].
#[derive(Default)]
struct SeriesCap {
    /// Hashes of the attribute sets (a collision only merges two series' accounting).
    seen: rustc_hash::FxHashSet<u64>,
}

impl SeriesCap {
    /// Whether `attributes` may have its own series: seen already, or room left.
    fn admits(&mut self, attributes: &[KeyValue]) -> bool {
        let hash = attributes_hash(attributes);
        if self.seen.contains(&hash) {
            return true;
        }
        if self.seen.len() >= MAX_SERIES {
            return false;
        }
        self.seen.insert(hash);
        true
    }
}

fn attributes_hash(attributes: &[KeyValue]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = rustc_hash::FxHasher::default();
    for kv in attributes {
        kv.key.as_str().hash(&mut hasher);
        match &kv.value {
            opentelemetry::Value::I64(i) => i.hash(&mut hasher),
            other => other.as_str().hash(&mut hasher),
        }
    }
    hasher.finish()
}

/// The overflow series of `attributes`: traffic-chosen values `_OTHER`, ports dropped.
fn overflow_attributes(attributes: Vec<KeyValue>) -> Vec<KeyValue> {
    attributes
        .into_iter()
        .filter(|kv| kv.key.as_str() != "server.port")
        .map(|kv| {
            if TRAFFIC_CHOSEN.contains(&kv.key.as_str()) {
                KeyValue::new(kv.key, OVERFLOW_VALUE)
            } else {
                kv
            }
        })
        .collect()
}

impl ProcessMetrics {
    fn new(resource: &Arc<Resource>) -> Self {
        let provider = Provider::new(sdk_resource(resource));
        let meter = provider.provider.meter("kspan");
        let histogram = |name: &'static str, description: &'static str| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(description)
                .with_boundaries(DURATION_BOUNDARIES.to_vec())
                .build()
        };
        ProcessMetrics {
            _resource: resource.clone(),
            server_duration: histogram(
                "http.server.request.duration",
                "Duration of HTTP server requests.",
            ),
            client_duration: histogram(
                "http.client.request.duration",
                "Duration of HTTP client requests.",
            ),
            // The RPC conventions after v1.37 (seconds, "call" in the name); attributes as the
            // gRPC spans carry them.
            rpc_server_duration: histogram(
                "rpc.server.call.duration",
                "Duration of incoming RPCs.",
            ),
            rpc_client_duration: histogram(
                "rpc.client.call.duration",
                "Duration of outgoing RPCs.",
            ),
            // Messaging conventions (Kafka): one point per topic of each Produce and Fetch.
            messaging_duration: histogram(
                "messaging.client.operation.duration",
                "Duration of messaging operations initiated by a producer or consumer client.",
            ),
            messaging_sent: meter
                .u64_counter("messaging.client.sent.messages")
                .with_unit("{message}")
                .with_description("Number of messages producer attempted to send to the broker.")
                .build(),
            messaging_consumed: meter
                .u64_counter("messaging.client.consumed.messages")
                .with_unit("{message}")
                .with_description("Number of messages that were delivered to the application.")
                .build(),
            provider,
            series: Default::default(),
            last_used: 0,
        }
    }
}

struct Registry {
    processes: FxHashMap<usize, ProcessMetrics>,
    uses: u64,
}

pub struct MetricsHub {
    registry: Mutex<Registry>,
    agent: Provider,
    stats: Arc<Stats>,
    /// Edges between traced services, recorded on the agent's own resource.
    service_graph: Mutex<ServiceGraph>,
}

impl MetricsHub {
    /// `agent_resource`: the resource of kspan itself, for its health counters.
    pub fn new(agent_resource: &Resource, stats: Arc<Stats>) -> Self {
        let agent = Provider::new(sdk_resource(agent_resource));
        register_health_counters(&agent.provider, stats.clone());
        let graph_meter = agent.provider.meter("kspan.service_graph");
        MetricsHub {
            registry: Mutex::new(Registry {
                processes: FxHashMap::default(),
                uses: 0,
            }),
            agent,
            stats,
            service_graph: Mutex::new(ServiceGraph::new(Some(&graph_meter))),
        }
    }

    /// The service graph's edges so far (for `kspan graph`).
    pub fn service_graph_edges(&self) -> Vec<(EdgeKey, EdgeStats)> {
        self.service_graph
            .lock()
            .map(|graph| graph.edges())
            .unwrap_or_default()
    }

    /// Adds one span's duration to its process's http.{server,client}.request.duration, or
    /// rpc.{server,client}.call.duration for RPC spans; PRODUCER and CONSUMER spans (and
    /// empty fetches) to messaging.client.operation.duration and the message counters.
    pub fn record(&self, span: &Span) {
        if let Ok(mut graph) = self.service_graph.lock() {
            graph.record(span);
        }
        let seconds = span.end_unix_nano.saturating_sub(span.start_unix_nano) as f64 / 1e9;
        let family = match span.kind {
            SpanKind::Producer | SpanKind::Consumer => Family::Messaging,
            // A traced broker: the messaging conventions have no server-side metrics.
            _ if span.attribute("messaging.system").is_some() => return,
            _ if span.attribute("rpc.system").is_some() => Family::Rpc,
            _ => Family::Http,
        };
        let mut attributes = match family {
            Family::Http => metric_attributes(span),
            Family::Rpc => rpc_metric_attributes(span),
            Family::Messaging => messaging_metric_attributes(span),
        };
        let Ok(mut registry) = self.registry.lock() else {
            return;
        };
        registry.uses += 1;
        let uses = registry.uses;
        let key = Arc::as_ptr(&span.resource) as usize;
        if !registry.processes.contains_key(&key) && registry.processes.len() >= MAX_PROCESSES {
            evict_least_recently_used(&mut registry.processes);
        }
        let process = registry
            .processes
            .entry(key)
            .or_insert_with(|| ProcessMetrics::new(&span.resource));
        process.last_used = uses;
        let instrument = match (span.kind, family) {
            (_, Family::Messaging) => Instrument::Messaging,
            (SpanKind::Server, Family::Rpc) => Instrument::RpcServer,
            (_, Family::Rpc) => Instrument::RpcClient,
            (SpanKind::Server, _) => Instrument::HttpServer,
            (_, _) => Instrument::HttpClient,
        };
        if !process.series[instrument as usize].admits(&attributes) {
            Stats::add(&self.stats.series_overflow, 1);
            attributes = overflow_attributes(attributes);
        }
        let histogram = match (span.kind, family) {
            (_, Family::Messaging) => {
                // Absent on a span of one message.
                let messages = match span.attribute("messaging.batch.message_count") {
                    Some(AttributeValue::Int(n)) => (*n).max(0) as u64,
                    _ => 1,
                };
                let counter = if span.kind == SpanKind::Producer {
                    &process.messaging_sent
                } else {
                    &process.messaging_consumed
                };
                if messages > 0 {
                    counter.add(messages, &attributes);
                }
                &process.messaging_duration
            }
            (SpanKind::Server, Family::Rpc) => &process.rpc_server_duration,
            (_, Family::Rpc) => &process.rpc_client_duration,
            (SpanKind::Server, _) => &process.server_duration,
            (_, _) => &process.client_duration,
        };
        histogram.record(seconds, &attributes);
    }

    /// Current cumulative state of every provider: the agent's first, then one per process.
    pub fn collect(&self) -> Vec<ResourceMetrics> {
        let mut all: Vec<ResourceMetrics> = self.agent.collect().into_iter().collect();
        if let Ok(registry) = self.registry.lock() {
            all.extend(
                registry
                    .processes
                    .values()
                    .filter_map(|p| p.provider.collect()),
            );
        }
        all
    }
}

fn evict_least_recently_used(processes: &mut FxHashMap<usize, ProcessMetrics>) {
    if let Some(key) = processes
        .iter()
        .min_by_key(|(_, p)| p.last_used)
        .map(|(key, _)| *key)
        && let Some(evicted) = processes.remove(&key)
    {
        let _ = evicted.provider.provider.shutdown();
    }
}

/// Attributes of the duration histograms, from the span's own (semantic-convention) attributes.
/// Server side without `server.address` and `server.port` (opt-in in the conventions): there they
/// come from the Host header, which any client chooses.
fn metric_attributes(span: &Span) -> Vec<KeyValue> {
    let mut attributes = if span.kind == SpanKind::Server {
        copied_attributes(
            span,
            &[
                "http.request.method",
                "http.response.status_code",
                "error.type",
            ],
        )
    } else {
        copied_attributes(
            span,
            &[
                "http.request.method",
                "http.response.status_code",
                "server.address",
                "server.port",
                "error.type",
            ],
        )
    };
    // The span name is "{METHOD} {route}": the route template is already low-cardinality.
    if let Some((_, route)) = span.name.split_once(' ') {
        attributes.push(KeyValue::new("http.route", route.to_string()));
    }
    attributes
}

/// Which duration histograms a span goes to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    Http,
    Rpc,
    Messaging,
}

/// The conventions' attributes for messaging metrics, minus the partition (one series per
/// partition multiplies series by hundreds on large topics).
fn messaging_metric_attributes(span: &Span) -> Vec<KeyValue> {
    copied_attributes(
        span,
        &[
            "messaging.system",
            "messaging.operation.name",
            "messaging.operation.type",
            "messaging.destination.name",
            "messaging.consumer.group.name",
            "server.address",
            "server.port",
            "error.type",
        ],
    )
}

/// As for HTTP, the server side leaves out `server.address` and `server.port` (from the client's
/// `:authority`).
fn rpc_metric_attributes(span: &Span) -> Vec<KeyValue> {
    if span.kind == SpanKind::Server {
        return copied_attributes(
            span,
            &[
                "rpc.system",
                "rpc.service",
                "rpc.method",
                "rpc.grpc.status_code",
                "error.type",
            ],
        );
    }
    copied_attributes(
        span,
        &[
            "rpc.system",
            "rpc.service",
            "rpc.method",
            "rpc.grpc.status_code",
            "server.address",
            "server.port",
            "error.type",
        ],
    )
}

/// The span's values of these attributes, those it has.
fn copied_attributes(span: &Span, keys: &[&'static str]) -> Vec<KeyValue> {
    let mut attributes = Vec::with_capacity(keys.len() + 1);
    for &key in keys {
        if let Some(value) = span.attribute(key) {
            attributes.push(match value {
                AttributeValue::Str(s) => KeyValue::new(key, s.to_string()),
                AttributeValue::Int(i) => KeyValue::new(key, *i),
            });
        }
    }
    attributes
}

/// Every counter of the stop line as an observable counter, read from `Stats` at each collection.
fn register_health_counters(provider: &SdkMeterProvider, stats: Arc<Stats>) {
    let meter = provider.meter("kspan");
    for counter in COUNTERS {
        let stats = stats.clone();
        let read = counter.read;
        // Observable instruments live as long as the provider.
        let _counter = meter
            .u64_observable_counter(counter.metric)
            .with_unit(counter.unit)
            .with_description(counter.description)
            .with_callback(move |observer| observer.observe(read(&stats), &[]))
            .build();
    }
    // Fill levels of the agent's tables and the kernel maps (gauges: they go down as processes
    // and sockets go away).
    type Field = fn(&Stats) -> &AtomicU64;
    let gauges: [(&str, &str, &str, Field); 6] = [
        (
            "kspan.parse.memory",
            "By",
            "Heap bytes the protocol parsers hold (partial messages, requests in flight, HPACK \
             tables), bounded by --parser-memory.",
            |s| &s.parser_memory,
        ),
        (
            "kspan.agent.connections",
            "{connection}",
            "Connections the agent tracks (parser and linking state).",
            |s| &s.agent_connections,
        ),
        (
            "kspan.agent.processes",
            "{entry}",
            "Per-process entries the agent holds (resources, selections, exec images).",
            |s| &s.agent_processes,
        ),
        (
            "kspan.kernel.connections",
            "{entry}",
            "Sockets tracked in the kernel's CONNECTIONS map (LRU, 65536 entries).",
            |s| &s.kernel_connections,
        ),
        (
            "kspan.kernel.traced_pids",
            "{entry}",
            "Processes in the kernel's pid filter (one per process, threads take none).",
            |s| &s.kernel_traced_pids,
        ),
        (
            "kspan.kernel.prefilter_slots",
            "{entry}",
            "Slots of the kernel's pid pre-filter in use (65536 slots; freed when their \
             processes exit).",
            |s| &s.kernel_prefilter_slots,
        ),
    ];
    for (name, unit, description, field) in gauges {
        let stats = stats.clone();
        let _gauge = meter
            .u64_observable_gauge(name)
            .with_unit(unit)
            .with_description(description)
            .with_callback(move |observer| observer.observe(Stats::get(field(&stats)), &[]))
            .build();
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};

    use super::*;

    fn span(resource: &Arc<Resource>, kind: SpanKind, status: i64, name: &str) -> Span {
        let mut attributes = vec![
            ("http.request.method", AttributeValue::Str("GET".into())),
            ("http.response.status_code", AttributeValue::Int(status)),
            ("server.address", AttributeValue::Str("127.0.0.1".into())),
            ("server.port", AttributeValue::Int(8080)),
            ("url.path", AttributeValue::Str("/users/7".into())),
        ];
        if status >= 500 {
            attributes.push(("error.type", AttributeValue::Str(status.to_string().into())));
        }
        Span {
            name: name.into(),
            attributes,
            resource: resource.clone(),
            ..Span::for_test("unused", kind, 20)
        }
    }

    fn histogram_counts(all: &[ResourceMetrics], name: &str) -> Vec<(Vec<KeyValue>, u64)> {
        let mut out = Vec::new();
        for rm in all {
            for scope in rm.scope_metrics() {
                for metric in scope.metrics().filter(|m| m.name() == name) {
                    if let AggregatedMetrics::F64(MetricData::Histogram(h)) = metric.data() {
                        for point in h.data_points() {
                            let mut attrs: Vec<KeyValue> = point.attributes().cloned().collect();
                            attrs.sort_by(|a, b| a.key.cmp(&b.key));
                            out.push((attrs, point.count()));
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn records_per_process_histograms_with_semconv_attributes() {
        let stats = Arc::new(Stats::default());
        Stats::add(&stats.events_received, 42);
        let agent = Resource {
            attributes: vec![("service.name", AttributeValue::Str("kspan".into()))],
        };
        let hub = MetricsHub::new(&agent, stats);
        let server = Arc::new(Resource {
            attributes: vec![("service.name", AttributeValue::Str("api".into()))],
        });
        for _ in 0..3 {
            hub.record(&span(&server, SpanKind::Server, 200, "GET /users/*"));
        }
        hub.record(&span(&server, SpanKind::Server, 500, "GET /users/*"));
        hub.record(&span(&server, SpanKind::Client, 200, "GET /users/*"));

        let all = hub.collect();
        assert_eq!(all.len(), 2, "agent + one process");
        let server_counts = histogram_counts(&all, "http.server.request.duration");
        assert_eq!(server_counts.len(), 2);
        let ok = server_counts
            .iter()
            .find(|(attrs, _)| attrs.iter().all(|kv| kv.key.as_str() != "error.type"))
            .unwrap();
        assert_eq!(ok.1, 3);
        let keys: Vec<&str> = ok.0.iter().map(|kv| kv.key.as_str()).collect();
        // No server.address/server.port on the server side: the Host header chose them.
        assert_eq!(
            keys,
            [
                "http.request.method",
                "http.response.status_code",
                "http.route",
            ]
        );
        assert!(
            ok.0.iter()
                .any(|kv| kv.key.as_str() == "http.route" && kv.value.as_str() == "/users/*")
        );
        assert_eq!(
            histogram_counts(&all, "http.client.request.duration")[0].1,
            1
        );
    }

    #[test]
    fn series_per_instrument_are_capped_into_one_overflow_series() {
        let stats = Arc::new(Stats::default());
        let hub = MetricsHub::new(&Resource { attributes: vec![] }, stats.clone());
        let server = Arc::new(Resource {
            attributes: vec![("service.name", AttributeValue::Str("api".into()))],
        });
        let routes = 5000;
        for i in 0..routes {
            // Distinct routes on the server; distinct Host values (server.address) on the client.
            hub.record(&span(&server, SpanKind::Server, 200, &format!("GET /r{i}")));
            let mut client = span(&server, SpanKind::Client, 200, "GET /");
            client.attributes[2] = (
                "server.address",
                AttributeValue::Str(format!("h{i}.example").into()),
            );
            hub.record(&client);
        }
        let all = hub.collect();
        for name in [
            "http.server.request.duration",
            "http.client.request.duration",
        ] {
            let points = histogram_counts(&all, name);
            assert_eq!(
                points.len(),
                MAX_SERIES + 1,
                "{name}: capped + one overflow"
            );
            let total: u64 = points.iter().map(|(_, n)| n).sum();
            assert_eq!(total, routes as u64, "{name}: every request still counted");
            let overflow: Vec<_> = points
                .iter()
                .filter(|(attrs, _)| attrs.iter().any(|kv| kv.value.as_str() == OVERFLOW_VALUE))
                .collect();
            assert_eq!(overflow.len(), 1, "{name}: one overflow series");
            assert_eq!(overflow[0].1, (routes - MAX_SERIES) as u64);
            assert!(
                overflow[0]
                    .0
                    .iter()
                    .all(|kv| kv.key.as_str() != "server.port"),
                "{:?}",
                overflow[0].0
            );
        }
        assert_eq!(
            Stats::get(&stats.series_overflow),
            2 * (routes - MAX_SERIES) as u64
        );
        // A series admitted before the cap keeps counting into itself.
        hub.record(&span(&server, SpanKind::Server, 200, "GET /r0"));
        let points = histogram_counts(&hub.collect(), "http.server.request.duration");
        let r0 = points
            .iter()
            .find(|(attrs, _)| attrs.iter().any(|kv| kv.value.as_str() == "/r0"))
            .unwrap();
        assert_eq!(r0.1, 2);
    }

    #[test]
    fn process_providers_are_bounded() {
        let agent = Resource { attributes: vec![] };
        let hub = MetricsHub::new(&agent, Arc::new(Stats::default()));
        for i in 0..MAX_PROCESSES + 10 {
            let resource = Arc::new(Resource {
                attributes: vec![("process.pid", AttributeValue::Int(i as i64))],
            });
            hub.record(&span(&resource, SpanKind::Server, 200, "GET /"));
        }
        assert_eq!(hub.registry.lock().unwrap().processes.len(), MAX_PROCESSES);
    }
}
