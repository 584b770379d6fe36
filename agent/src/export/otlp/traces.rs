//! Spans → OTLP. The export thread hands spans over without blocking; a worker thread with its
//! own small tokio runtime batches them into one request (one ResourceSpans per process) and
//! sends it, retrying transient errors with backoff inside the export timeout. Memory stays bounded when the collector is slow
//! or gone: the queue has a fixed capacity, past it spans are dropped and counted.

use rustc_hash::FxHashMap;
use std::{
    borrow::Cow,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError},
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use opentelemetry::{
    InstrumentationScope, KeyValue,
    trace::{
        Link, SpanContext, SpanId, SpanKind as OtelKind, Status, TraceFlags, TraceId, TraceState,
    },
};
use opentelemetry_proto::{
    tonic::collector::trace::v1::ExportTraceServiceRequest,
    transform::{
        common::tonic::ResourceAttributesWithSchema,
        trace::tonic::group_spans_by_resource_and_scope,
    },
};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};

use super::{Signal, SignalTarget, export_timeout, transport::TraceClient};
use crate::{
    export::SpanExporter,
    spans::{AttributeValue, Attributes, Resource, Span, SpanKind, SpanStatus},
    stats::Stats,
};

/// Spans queued for the worker.
const QUEUE_CAPACITY: usize = 8192;
/// Spans per export request.
const MAX_BATCH: usize = 512;
/// A partial batch waits at most this long.
const BATCH_DELAY: Duration = Duration::from_millis(1000);
/// Time allowed at shutdown to deliver what is queued.
pub const SHUTDOWN_BUDGET: Duration = Duration::from_millis(3000);

/// Tells a worker to stop. A stop starts the shutdown budget: work in flight may finish within
/// it (a healthy collector answers in milliseconds), and a dead collector cannot hold the agent's
/// exit longer than it.
pub struct Stop {
    requested: AtomicBool,
    notify: tokio::sync::Notify,
    budget: Duration,
    deadline: std::sync::Mutex<Option<Instant>>,
}

impl Stop {
    pub fn new(budget: Duration) -> Self {
        Stop {
            requested: AtomicBool::new(false),
            notify: tokio::sync::Notify::new(),
            budget,
            deadline: std::sync::Mutex::new(None),
        }
    }

    pub fn request(&self) {
        if let Ok(mut deadline) = self.deadline.lock() {
            deadline.get_or_insert(Instant::now() + self.budget);
        }
        self.requested.store(true, Ordering::SeqCst);
        self.notify.notify_one();
    }

    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// When the shutdown budget ends (a budget from now if no stop was requested yet).
    pub fn deadline(&self) -> Instant {
        self.deadline
            .lock()
            .ok()
            .and_then(|d| *d)
            .unwrap_or_else(|| Instant::now() + self.budget)
    }

    /// Runs `work`; after a stop request it gets until the deadline to finish (then None).
    pub async fn within_budget<F: std::future::Future>(&self, work: F) -> Option<F::Output> {
        tokio::pin!(work);
        if !self.requested() {
            tokio::select! {
                output = &mut work => return Some(output),
                _ = self.notify.notified() => {}
            }
        }
        let left = self.deadline().saturating_duration_since(Instant::now());
        tokio::time::timeout(left, work).await.ok()
    }

    /// Runs `work` unless a stop is requested first or meanwhile (then None): for waiting.
    pub async fn unless_stopped<F: std::future::Future>(&self, work: F) -> Option<F::Output> {
        if self.requested() {
            return None;
        }
        tokio::select! {
            output = work => Some(output),
            _ = self.notify.notified() => None,
        }
    }
}

pub struct OtlpTraceExporter {
    queue: Option<SyncSender<Box<Span>>>,
    worker: Option<thread::JoinHandle<()>>,
    stop: Arc<Stop>,
    stats: Arc<Stats>,
}

impl OtlpTraceExporter {
    pub fn start(target: &SignalTarget, stats: Arc<Stats>) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the OTLP runtime")?;
        let client = {
            // tonic's lazy channel needs a runtime context to be created.
            let _guard = runtime.enter();
            TraceClient::new(target).context("cannot configure the OTLP trace exporter")?
        };
        let (queue, receiver) = mpsc::sync_channel(QUEUE_CAPACITY);
        let worker_stats = stats.clone();
        let stop = Arc::new(Stop::new(SHUTDOWN_BUDGET));
        let worker_stop = stop.clone();
        let worker = thread::Builder::new()
            .name("kspan-otlp-traces".into())
            .spawn(move || {
                Worker {
                    runtime,
                    client,
                    stats: worker_stats,
                    stop: worker_stop,
                    timeout: export_timeout(Signal::Traces),
                    requests: RequestBuilder::new(),
                }
                .run(receiver)
            })?;
        Ok(OtlpTraceExporter {
            queue: Some(queue),
            worker: Some(worker),
            stop,
            stats,
        })
    }
}

impl SpanExporter for OtlpTraceExporter {
    fn export(&mut self, spans: &[Span]) -> std::io::Result<()> {
        let Some(queue) = &self.queue else {
            return Ok(());
        };
        for span in spans {
            match queue.try_send(Box::new(span.clone())) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    Stats::add(&self.stats.spans_dropped, 1);
                }
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        // Batching is the worker's business; nothing to push from here.
        Ok(())
    }

    fn name(&self) -> &'static str {
        "OTLP trace"
    }

    fn shutdown(&mut self) -> std::io::Result<()> {
        let Some(worker) = self.worker.take() else {
            return Ok(());
        };
        self.stop.request();
        // Disconnecting wakes a worker waiting for spans.
        self.queue = None;
        let _ = worker.join();
        Ok(())
    }
}

impl Drop for OtlpTraceExporter {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

struct Worker {
    runtime: tokio::runtime::Runtime,
    client: TraceClient,
    stats: Arc<Stats>,
    stop: Arc<Stop>,
    timeout: Duration,
    requests: RequestBuilder,
}

/// Batches of spans → export requests.
struct RequestBuilder {
    /// Resources in OTLP form by the address of the agent's resource (held alive by the key's
    /// Arc), converted once per process.
    resources: FxHashMap<usize, (Arc<Resource>, ResourceAttributesWithSchema)>,
    scope: InstrumentationScope,
}

impl RequestBuilder {
    fn new() -> Self {
        RequestBuilder {
            resources: FxHashMap::default(),
            scope: InstrumentationScope::builder("kspan")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        }
    }

    /// One request for the whole batch: one ResourceSpans per resource, in order of first
    /// appearance.
    fn build(&mut self, batch: &mut Vec<Span>) -> ExportTraceServiceRequest {
        let mut groups: Vec<(Arc<Resource>, Vec<SpanData>)> = Vec::new();
        for span in batch.drain(..) {
            let data = span_data(&span, &self.scope);
            match groups
                .iter_mut()
                .find(|(r, _)| Arc::ptr_eq(r, &span.resource))
            {
                Some((_, spans)) => spans.push(data),
                None => groups.push((span.resource.clone(), vec![data])),
            }
        }
        if self.resources.len() > 1024 {
            self.resources.clear();
        }
        let mut resource_spans = Vec::with_capacity(groups.len());
        for (resource, spans) in groups {
            let key = Arc::as_ptr(&resource) as usize;
            let otlp_resource = &self
                .resources
                .entry(key)
                .or_insert_with(|| {
                    let attributes = (&sdk_resource(&resource)).into();
                    (resource.clone(), attributes)
                })
                .1;
            resource_spans.extend(group_spans_by_resource_and_scope(spans, otlp_resource));
        }
        ExportTraceServiceRequest { resource_spans }
    }
}

impl Worker {
    fn run(mut self, receiver: Receiver<Box<Span>>) {
        let mut batch: Vec<Span> = Vec::with_capacity(MAX_BATCH);
        let mut deadline = Instant::now() + BATCH_DELAY;
        while !self.stop.requested() {
            let wait = deadline.saturating_duration_since(Instant::now());
            match receiver.recv_timeout(wait) {
                Ok(span) => {
                    batch.push(*span);
                    if batch.len() >= MAX_BATCH {
                        self.export(&mut batch, self.timeout, true);
                        deadline = Instant::now() + BATCH_DELAY;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.export(&mut batch, self.timeout, true);
                    deadline = Instant::now() + BATCH_DELAY;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        // Shutdown: what is queued gets the rest of the budget; what remains after it is dropped
        // and counted.
        let end = self.stop.deadline();
        while let Ok(span) = receiver.try_recv() {
            batch.push(*span);
        }
        while !batch.is_empty() {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                Stats::add(&self.stats.spans_dropped, batch.len() as u64);
                batch.clear();
                break;
            }
            let mut chunk: Vec<Span> = batch.drain(..batch.len().min(MAX_BATCH)).collect();
            self.export(&mut chunk, left.min(self.timeout), false);
        }
    }

    /// The batch as one request. Failed spans are dropped and counted: the client already
    /// retried them. `interruptible`: after a stop request the request in flight gets the rest
    /// of the shutdown budget (past it its spans count as dropped); the final flush is bounded by
    /// its timeout.
    fn export(&mut self, batch: &mut Vec<Span>, timeout: Duration, interruptible: bool) {
        if batch.is_empty() {
            return;
        }
        let count = batch.len() as u64;
        let request = self.requests.build(batch);
        let stop = &self.stop;
        let client = &self.client;
        let result = self.runtime.block_on(async {
            // Bounds the retries as well as a hang.
            let export = tokio::time::timeout(timeout, client.export(request));
            if interruptible {
                stop.within_budget(export).await
            } else {
                Some(export.await)
            }
        });
        match result {
            Some(Ok(Ok(()))) => Stats::add(&self.stats.spans_exported, count),
            Some(Ok(Err(error))) => self.failed(count, &error),
            Some(Err(_)) => self.failed(count, "timed out"),
            None => self.failed(count, "interrupted by shutdown"),
        }
    }

    fn failed(&self, spans: u64, error: &str) {
        Stats::add(&self.stats.export_failures, 1);
        Stats::add(&self.stats.spans_dropped, spans);
        // One line per failure, not per span; the counters carry the totals.
        log::warn!("OTLP trace export failed, {spans} spans dropped: {error}");
    }
}

pub fn key_values(attributes: &Attributes) -> Vec<KeyValue> {
    attributes
        .iter()
        .map(|(key, value)| match value {
            AttributeValue::Str(s) => KeyValue::new(*key, s.to_string()),
            AttributeValue::Int(i) => KeyValue::new(*key, *i),
        })
        .collect()
}

pub fn sdk_resource(resource: &Resource) -> opentelemetry_sdk::Resource {
    opentelemetry_sdk::Resource::builder_empty()
        .with_attributes(key_values(&resource.attributes))
        .build()
}

fn unix_time(nanos: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(nanos)
}

fn span_links(span: &Span) -> SpanLinks {
    let mut links = SpanLinks::default();
    links.links = span
        .links
        .iter()
        .map(|link| {
            let context = SpanContext::new(
                TraceId::from_bytes(link.trace_id),
                SpanId::from_bytes(link.span_id),
                TraceFlags::SAMPLED,
                true,
                TraceState::default(),
            );
            Link::new(context, Vec::new(), 0)
        })
        .collect();
    links
}

/// The span as the SDK's export type, keeping kspan's own ids and timestamps.
pub fn span_data(span: &Span, scope: &InstrumentationScope) -> SpanData {
    SpanData {
        span_context: SpanContext::new(
            TraceId::from_bytes(span.trace_id),
            SpanId::from_bytes(span.span_id),
            TraceFlags::SAMPLED,
            false,
            span.trace_state
                .as_deref()
                .and_then(|state| state.parse::<TraceState>().ok())
                .unwrap_or_default(),
        ),
        parent_span_id: span
            .parent_span_id
            .map(SpanId::from_bytes)
            .unwrap_or(SpanId::INVALID),
        parent_span_is_remote: false,
        span_kind: match span.kind {
            SpanKind::Server => OtelKind::Server,
            SpanKind::Client => OtelKind::Client,
            SpanKind::Producer => OtelKind::Producer,
            SpanKind::Consumer => OtelKind::Consumer,
        },
        name: Cow::Owned(span.name.to_string()),
        start_time: unix_time(span.start_unix_nano),
        end_time: unix_time(span.end_unix_nano),
        attributes: key_values(&span.attributes),
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: span_links(span),
        status: match span.status {
            SpanStatus::Unset => Status::Unset,
            SpanStatus::Error => Status::error(""),
        },
        instrumentation_scope: scope.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spans::SpanLink;
    use prost::Message as _;

    fn span_of(resource: &Arc<Resource>, id: u8) -> Span {
        Span {
            trace_id: [id; 16],
            span_id: [id; 8],
            parent_span_id: None,
            trace_state: None,
            name: format!("GET /{id}").into(),
            kind: SpanKind::Server,
            start_unix_nano: 1,
            end_unix_nano: 2,
            status: SpanStatus::Unset,
            attributes: Vec::new(),
            links: Vec::new(),
            resource: resource.clone(),
        }
    }

    #[test]
    fn one_request_carries_the_spans_of_every_resource() {
        let processes: Vec<Arc<Resource>> = (0..3)
            .map(|pid| {
                Arc::new(Resource {
                    attributes: vec![("process.pid", AttributeValue::Int(100 + pid))],
                })
            })
            .collect();
        // Interleaved: 0, 1, 2, 0, 1, 2, ... (7 spans of process 0, 7 of 1, 6 of 2).
        let mut batch: Vec<Span> = (0..20u8)
            .map(|i| span_of(&processes[usize::from(i) % 3], i))
            .collect();
        let mut builder = RequestBuilder::new();
        let request = builder.build(&mut batch);
        assert!(batch.is_empty());

        // What goes on the wire, decoded back.
        let decoded = ExportTraceServiceRequest::decode(&*request.encode_to_vec()).unwrap();
        assert_eq!(decoded.resource_spans.len(), 3, "{decoded:?}");
        for (i, (rs, want_spans)) in decoded.resource_spans.iter().zip([7, 7, 6]).enumerate() {
            let attributes = &rs.resource.as_ref().unwrap().attributes;
            assert_eq!(attributes.len(), 1);
            assert_eq!(attributes[0].key, "process.pid");
            assert_eq!(
                format!("{:?}", attributes[0].value),
                format!(
                    "{:?}",
                    Some(opentelemetry_proto::tonic::common::v1::AnyValue {
                        value: Some(
                            opentelemetry_proto::tonic::common::v1::any_value::Value::IntValue(
                                100 + i as i64
                            )
                        )
                    })
                )
            );
            assert_eq!(rs.scope_spans.len(), 1);
            assert_eq!(rs.scope_spans[0].scope.as_ref().unwrap().name, "kspan");
            let spans = &rs.scope_spans[0].spans;
            assert_eq!(spans.len(), want_spans);
            // Each span under its own process, in batch order.
            for (j, span) in spans.iter().enumerate() {
                let id = (3 * j + i) as u8;
                assert_eq!(span.span_id, vec![id; 8]);
                assert_eq!(span.name, format!("GET /{id}"));
            }
        }
    }

    #[test]
    fn kinds_and_links_reach_the_sdk_span() {
        let span = Span {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent_span_id: None,
            trace_state: None,
            name: "poll orders".into(),
            kind: SpanKind::Consumer,
            start_unix_nano: 1,
            end_unix_nano: 2,
            status: SpanStatus::Unset,
            attributes: Vec::new(),
            links: vec![SpanLink {
                trace_id: [3; 16],
                span_id: [4; 8],
            }],
            resource: Arc::new(Resource {
                attributes: Vec::new(),
            }),
        };
        let data = span_data(&span, &InstrumentationScope::builder("kspan").build());
        assert_eq!(data.span_kind, OtelKind::Consumer);
        assert_eq!(data.links.len(), 1);
        let link = &data.links[0].span_context;
        assert_eq!(link.trace_id(), TraceId::from_bytes([3; 16]));
        assert_eq!(link.span_id(), SpanId::from_bytes([4; 8]));
        let producer = Span {
            kind: SpanKind::Producer,
            links: Vec::new(),
            ..span
        };
        let data = span_data(&producer, &InstrumentationScope::builder("kspan").build());
        assert_eq!(data.span_kind, OtelKind::Producer);
        assert!(data.links.is_empty());
    }
}
