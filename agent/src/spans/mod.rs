//! The span model every exporter consumes, and the builders that make spans from exchanges.

use std::net::SocketAddr;
use std::sync::Arc;

use compact_str::CompactString;

use crate::clock::Clock;
use crate::protocols::{Exchange, Payload};

pub mod grpc;
pub mod http;
pub mod kafka;
pub mod route;

pub use kafka::{Export, ProducedMessages};

/// The spans of one exchange, by its protocol's builder, handed to `emit`: one for HTTP and
/// gRPC, one per topic for Kafka. `local` and `remote` are the traced process's socket address
/// and its peer's; `produced` links Kafka consumers to producers.
pub fn build_spans(
    exchange: &Exchange,
    ids: SpanIds,
    (local, remote): (SocketAddr, SocketAddr),
    resource: &Arc<Resource>,
    clock: &Clock,
    produced: &mut ProducedMessages,
    emit: &mut dyn FnMut(Span, Export),
) {
    let span = match &exchange.payload {
        Payload::Http(http) if http.request.grpc => {
            grpc::grpc_span(exchange, http, ids, local, remote, resource, clock)
        }
        Payload::Http(http) => http::http_span(exchange, http, ids, local, remote, resource, clock),
        Payload::Kafka(payload) => {
            let addresses = (local, remote);
            return kafka::kafka_spans(
                exchange, payload, ids, addresses, resource, clock, produced, emit,
            );
        }
    };
    emit(span, Export::Span);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SpanKind {
    Server,
    Client,
    /// Kafka: a client's Produce.
    Producer,
    /// Kafka: a client's Fetch that returned messages.
    Consumer,
}

impl SpanKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            SpanKind::Server => "SERVER",
            SpanKind::Client => "CLIENT",
            SpanKind::Producer => "PRODUCER",
            SpanKind::Consumer => "CONSUMER",
        }
    }
}

/// A link from a span to another span (a Kafka consumer to the producers of its messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanLink {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanStatus {
    Unset,
    Error,
}

impl SpanStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            SpanStatus::Unset => "UNSET",
            SpanStatus::Error => "ERROR",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
/// Strings up to 24 bytes (methods, paths, addresses, most span names) are stored inline: no
/// allocation per attribute.
pub enum AttributeValue {
    Str(CompactString),
    Int(i64),
}

pub type Attributes = Vec<(&'static str, AttributeValue)>;

/// What produced a span: one traced process (OpenTelemetry resource attributes).
#[derive(Clone, Debug, PartialEq)]
pub struct Resource {
    pub attributes: Attributes,
}

impl Resource {
    pub fn get(&self, key: &str) -> Option<&AttributeValue> {
        self.attributes
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }

    /// `service.name`, when it is a string (the resource builder always sets one).
    pub fn service_name(&self) -> Option<&str> {
        match self.get("service.name") {
            Some(AttributeValue::Str(name)) => Some(name.as_str()),
            _ => None,
        }
    }
}

/// A span's identity within its trace, decided by the linker before the span is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanIds {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
}

#[derive(Clone, Debug)]
pub struct Span {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    /// W3C tracestate received with the trace (exported over OTLP).
    pub trace_state: Option<String>,
    pub name: CompactString,
    pub kind: SpanKind,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    pub status: SpanStatus,
    pub attributes: Attributes,
    /// Empty except on Kafka CONSUMER spans.
    pub links: Vec<SpanLink>,
    pub resource: Arc<Resource>,
}

impl Span {
    /// A test span: `service`'s `kind` span "GET /x" of `ms` milliseconds, starting at 1 s,
    /// ids 1…/2…, no parent, status unset; tests change what they look at.
    #[cfg(test)]
    pub fn for_test(service: &str, kind: SpanKind, ms: u64) -> Span {
        Span {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent_span_id: None,
            trace_state: None,
            name: "GET /x".into(),
            kind,
            start_unix_nano: 1_000_000_000,
            end_unix_nano: 1_000_000_000 + ms * 1_000_000,
            status: SpanStatus::Unset,
            attributes: Vec::new(),
            links: Vec::new(),
            resource: Arc::new(Resource {
                attributes: vec![("service.name", AttributeValue::Str(service.into()))],
            }),
        }
    }

    /// The span of `exchange` (its times converted to wall clock, the end never before the
    /// start) with the builder's name, kind, status and attributes.
    pub fn of_exchange(
        exchange: &Exchange,
        ids: SpanIds,
        (name, kind, status, attributes): (CompactString, SpanKind, SpanStatus, Attributes),
        resource: &Arc<Resource>,
        clock: &Clock,
    ) -> Span {
        let start_unix_nano = clock.to_unix_nanos(exchange.start_ns);
        let end_unix_nano = clock.to_unix_nanos(exchange.end_ns).max(start_unix_nano);
        Span {
            trace_id: ids.trace_id,
            span_id: ids.span_id,
            parent_span_id: ids.parent_span_id,
            trace_state: None,
            name,
            kind,
            start_unix_nano,
            end_unix_nano,
            status,
            attributes,
            links: Vec::new(),
            resource: Arc::clone(resource),
        }
    }

    pub fn attribute(&self, key: &str) -> Option<&AttributeValue> {
        self.attributes
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }
}
