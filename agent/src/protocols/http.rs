//! HTTP request/response exchanges, whatever the wire version (HTTP/1.x now, HTTP/2 later).

use compact_str::CompactString;

use super::Role;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpRequest {
    /// Method as sent, e.g. "GET".
    pub method: CompactString,
    /// Raw request-target as sent (path and query, or an absolute URI). The span builder strips
    /// the query; it never leaves the agent.
    pub target: CompactString,
    /// "1.0", "1.1", later "2".
    pub version: &'static str,
    /// Host header value (may carry a port).
    pub host: Option<CompactString>,
    pub user_agent: Option<CompactString>,
    /// Trace-context headers only (traceparent, tracestate, b3, x-b3-*), names lower-cased.
    /// Nothing else is kept: Authorization and Cookie values never leave the parser.
    pub context_headers: Vec<(String, String)>,
    /// Body bytes (decoded length for Content-Length; wire bytes for chunked).
    pub body_len: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub version: &'static str,
    pub body_len: u64,
}

/// A request whose header block was just parsed (before its response exists): what trace-context
/// linking needs to know while the request is being served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestStart {
    pub role: Role,
    /// Thread that read (server) or wrote (client) the request; with `start_ns` it identifies the
    /// request on its connection (the exchange carries the same pair).
    pub tid: u32,
    pub start_ns: u64,
    pub method: CompactString,
    pub target: CompactString,
    pub context_headers: Vec<(String, String)>,
}

/// Why an exchange ended without a complete response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExchangeError {
    /// The connection closed (or the process exited) before the response was complete.
    ConnectionClosed,
}

impl ExchangeError {
    /// Value for the `error.type` attribute.
    pub fn as_str(&self) -> &'static str {
        match self {
            ExchangeError::ConnectionClosed => "connection_closed",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpExchange {
    pub role: Role,
    pub request: HttpRequest,
    /// None when the connection closed first (then `error` says so).
    pub response: Option<HttpResponse>,
    pub error: Option<ExchangeError>,
    /// Kernel monotonic ns. Start: the syscall carrying the request's first byte (its entry for a
    /// write, its exit for a read: that is when the bytes existed). End: the syscall carrying the
    /// response's last byte (exit), or the close.
    pub start_ns: u64,
    pub end_ns: u64,
    /// Thread that read (server) or wrote (client) the request's first bytes.
    pub request_tid: u32,
    /// Thread that wrote (server) or read (client) the response's first bytes; 0 if none.
    pub response_tid: u32,
}
