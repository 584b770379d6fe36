//! The span model every exporter consumes, and the builders that make spans from exchanges.

use std::net::SocketAddr;
use std::sync::Arc;

use compact_str::CompactString;

use crate::clock::Clock;
use crate::protocols::{Exchange, Payload, Role};

pub mod grpc;
pub mod http;
pub mod route;

/// The span of one exchange, by its protocol's builder. `local` and `remote` are the traced
/// process's socket address and its peer's.
pub fn build_span(
    exchange: &Exchange,
    ids: SpanIds,
    local: SocketAddr,
    remote: SocketAddr,
    resource: &Arc<Resource>,
    clock: &Clock,
) -> Span {
    match &exchange.payload {
        Payload::Http(http) if http.request.grpc => {
            grpc::grpc_span(exchange, http, ids, local, remote, resource, clock)
        }
        Payload::Http(http) => http::http_span(exchange, http, ids, local, remote, resource, clock),
        // Kafka is not in `protocols::PROTOCOLS` yet (its span builder comes with it): a bare
        // span named after the protocol, never built until then.
        Payload::Kafka(_) => {
            let kind = match exchange.role {
                Role::Server => SpanKind::Server,
                Role::Client => SpanKind::Client,
            };
            let name = CompactString::const_new("kafka");
            let fields = (name, kind, SpanStatus::Unset, Attributes::new());
            Span::of_exchange(exchange, ids, fields, resource, clock)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    Server,
    Client,
}

impl SpanKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            SpanKind::Server => "SERVER",
            SpanKind::Client => "CLIENT",
        }
    }
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
    pub resource: Arc<Resource>,
}

impl Span {
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
