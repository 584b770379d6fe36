//! Trace-context propagation: reading the parent span from incoming request headers (W3C
//! `traceparent`/`tracestate`, Zipkin B3 single and multi header), writing `traceparent`, fresh
//! random ids, and the sampling decision (OpenTelemetry SDK environment semantics).
//!
//! Precedence in [`extract`]: a *valid* W3C `traceparent` wins; otherwise the single `b3` header;
//! otherwise the multi-header `X-B3-*` form. An invalid (or duplicated) header is treated as absent,
//! so the next format is tried.

mod b3;
mod sampler;
mod w3c;

#[cfg(test)]
mod tests;

pub use b3::{parse_b3_multi, parse_b3_single};
pub use sampler::Sampler;
pub use w3c::{format_traceparent, parse_traceparent};

/// The identity of a span as propagated between processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

/// Context found in incoming request headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extracted {
    pub parent: SpanContext,
    /// Raw (trimmed) W3C `tracestate`; only set when the context came from a valid `traceparent`.
    pub trace_state: Option<String>,
    pub source: Source,
}

/// Which header format the context was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    TraceParent,
    B3Single,
    B3Multi,
}

/// Reads the parent context from request headers.
///
/// `headers`: header names with values (names are expected lower-case, but are compared
/// ASCII-case-insensitively). W3C `traceparent` wins; B3 (single `b3` header first, then multi
/// `X-B3-*`) is read only when no *valid* traceparent is present. Invalid values yield `None`.
pub fn extract(headers: &[(String, String)]) -> Option<Extracted> {
    if let Some(value) = single_header(headers, "traceparent")
        && let Some((parent, _flags)) = parse_traceparent(value)
    {
        return Some(Extracted {
            parent,
            trace_state: w3c::trace_state(headers),
            source: Source::TraceParent,
        });
    }
    if let Some(parent) = single_header(headers, "b3").and_then(parse_b3_single) {
        return Some(Extracted {
            parent,
            trace_state: None,
            source: Source::B3Single,
        });
    }
    parse_b3_multi(headers).map(|parent| Extracted {
        parent,
        trace_state: None,
        source: Source::B3Multi,
    })
}

/// A fresh random trace id, never all-zero.
pub fn new_trace_id() -> [u8; 16] {
    loop {
        let id: u128 = rand::random();
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

/// A fresh random span id, never all-zero.
pub fn new_span_id() -> [u8; 8] {
    loop {
        let id: u64 = rand::random();
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

/// The value of header `name` if it occurs exactly once; `None` when absent or duplicated
/// (a duplicated trace-context header is ambiguous and treated as absent).
fn single_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    let mut found = None;
    for (n, v) in headers {
        if n.eq_ignore_ascii_case(name) {
            if found.is_some() {
                return None;
            }
            found = Some(v.as_str());
        }
    }
    found
}

/// Trims optional whitespace (spaces and horizontal tabs, RFC 7230 OWS) around a header value.
fn trim_ows(value: &str) -> &str {
    value.trim_matches(|c| c == ' ' || c == '\t')
}

/// Decodes exactly `N` bytes from `2 * N` lower-case hex digits; upper-case and any other
/// character are rejected.
fn decode_lower_hex<const N: usize>(hex: &[u8]) -> Option<[u8; N]> {
    if hex.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = (lower_hex_digit(pair[0])? << 4) | lower_hex_digit(pair[1])?;
    }
    Some(out)
}

fn lower_hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// Lower-case hex encoding.
fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    s
}
