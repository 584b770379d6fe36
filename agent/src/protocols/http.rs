//! HTTP requests and responses, whatever the wire version (HTTP/1.x, HTTP/2): the payload of an
//! HTTP [`Exchange`](super::Exchange). gRPC is HTTP/2 with `request.grpc` set.

use compact_str::CompactString;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpRequest {
    /// Method as sent, e.g. "GET".
    pub method: CompactString,
    /// Raw request-target as sent (path and query, or an absolute URI; HTTP/2's `:path`). The
    /// span builder strips the query; it never leaves the agent.
    pub target: CompactString,
    /// "1.0", "1.1", "2".
    pub version: &'static str,
    /// HTTP/2 `:scheme` ("http", "https"); None for HTTP/1 (the span builder says "http").
    pub scheme: Option<CompactString>,
    /// Host header value, or HTTP/2 `:authority` (may carry a port).
    pub host: Option<CompactString>,
    pub user_agent: Option<CompactString>,
    /// `content-type` starts with `application/grpc`.
    pub grpc: bool,
    /// Trace-context headers only (traceparent, tracestate, b3, x-b3-*), names lower-cased.
    /// Nothing else is kept: Authorization and Cookie values never leave the parser.
    pub context_headers: Vec<(String, String)>,
    /// Body bytes (decoded length for Content-Length; wire bytes for chunked; DATA payload for
    /// HTTP/2).
    pub body_len: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpResponse {
    /// 0 when unknown (see `fields_lost`).
    pub status: u16,
    pub version: &'static str,
    pub body_len: u64,
    /// `grpc-status` from the trailers, or from the headers of a Trailers-Only response.
    pub grpc_status: Option<u32>,
    /// Some of the response's header fields could not be decoded (HTTP/2 whose HPACK table
    /// was partly unknown): a value missing here is unknown, not absent.
    pub fields_lost: bool,
}

/// An HTTP exchange's protocol part.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpPayload {
    pub request: HttpRequest,
    /// None when the response is missing (then the exchange's `error` says why).
    pub response: Option<HttpResponse>,
}

/// Most bytes kept of one string from a request or response (method, target, header value).
pub const MAX_STRING: usize = 1024;

/// Lossy UTF-8 decoding (invalid sequences become U+FFFD) of at most `MAX_STRING` bytes of
/// output, cut at a character boundary.
pub fn limited_string(raw: &[u8]) -> CompactString {
    // The usual case, valid and short: one copy (inline up to 24 bytes).
    if raw.len() <= MAX_STRING
        && let Ok(text) = std::str::from_utf8(raw)
    {
        return CompactString::from(text);
    }
    let mut out = CompactString::with_capacity(raw.len().min(MAX_STRING));
    for chunk in raw.utf8_chunks() {
        let valid = chunk.valid();
        let room = MAX_STRING - out.len();
        if valid.len() > room {
            let mut end = room;
            while !valid.is_char_boundary(end) {
                end -= 1;
            }
            out.push_str(&valid[..end]);
            return out;
        }
        out.push_str(valid);
        if !chunk.invalid().is_empty() {
            if out.len() + char::REPLACEMENT_CHARACTER.len_utf8() > MAX_STRING {
                return out;
            }
            out.push(char::REPLACEMENT_CHARACTER);
        }
    }
    out
}
