//! Zipkin B3 propagation, single (`b3`) and multi (`X-B3-*`) header forms.
//! <https://github.com/openzipkin/b3-propagation>
//!
//! kspan's choices where the B3 spec is loose:
//! - ids must be lower-case hex (the spec says "lower-hex"); upper-case is rejected;
//! - all-zero trace or span ids are invalid;
//! - a 64-bit (16 hex) trace id is left-padded with zeros to 128 bits;
//! - without a sampling decision (no `X-B3-Sampled`/`X-B3-Flags`, or a single header with only
//!   ids) the upstream deferred the decision; kspan records, so `sampled = true`;
//! - debug (`X-B3-Flags: 1`, or `d` in the single header) implies sampled;
//! - a duplicated `X-B3-*` header makes the multi form invalid, like a duplicated `traceparent`.

use super::{SpanContext, decode_lower_hex, single_header, trim_ows};

/// Parses the single `b3` header: `{traceid}-{spanid}`, `{traceid}-{spanid}-{sampling}` or
/// `{traceid}-{spanid}-{sampling}-{parentspanid}`, sampling being `1`, `0` or `d` (debug).
/// A lone sampling decision (`0`, `1`, `d`) carries no ids and yields `None`. The parent span id,
/// when present, must be a valid non-zero 16-hex id but is otherwise ignored.
pub fn parse_b3_single(value: &str) -> Option<SpanContext> {
    let mut parts = trim_ows(value).split('-');
    let trace_id = parse_trace_id(parts.next()?)?;
    let span_id = parse_span_id(parts.next()?)?;
    let sampled = match parts.next() {
        None => true,
        Some("1" | "d") => true,
        Some("0") => false,
        Some(_) => return None,
    };
    if let Some(parent) = parts.next() {
        parse_span_id(parent)?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(SpanContext {
        trace_id,
        span_id,
        sampled,
    })
}

/// Parses the multi-header form: `x-b3-traceid` (16 or 32 hex) and `x-b3-spanid` (16 hex) are
/// required; `x-b3-sampled` is `1`/`0` (or `true`/`false`); `x-b3-flags: 1` (debug) means
/// sampled and overrides `x-b3-sampled`; `x-b3-parentspanid` is ignored. Header names are
/// compared ASCII-case-insensitively.
pub fn parse_b3_multi(headers: &[(String, String)]) -> Option<SpanContext> {
    const NAMES: [&str; 4] = ["x-b3-traceid", "x-b3-spanid", "x-b3-sampled", "x-b3-flags"];
    // A duplicated X-B3-* header (other than the ignored parent id) is ambiguous: invalid.
    for name in NAMES {
        let count = headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .count();
        if count > 1 {
            return None;
        }
    }
    let trace_id = parse_trace_id(trim_ows(single_header(headers, "x-b3-traceid")?))?;
    let span_id = parse_span_id(trim_ows(single_header(headers, "x-b3-spanid")?))?;
    let debug = match single_header(headers, "x-b3-flags").map(trim_ows) {
        None | Some("0") => false,
        Some("1") => true,
        Some(_) => return None,
    };
    let sampled = match single_header(headers, "x-b3-sampled").map(trim_ows) {
        None => true,
        Some("1") => true,
        Some("0") => false,
        Some(v) if v.eq_ignore_ascii_case("true") => true,
        Some(v) if v.eq_ignore_ascii_case("false") => false,
        Some(_) => return None,
    };
    Some(SpanContext {
        trace_id,
        span_id,
        sampled: debug || sampled,
    })
}

/// A 16- or 32-hex non-zero trace id; 64-bit ids are left-padded to 128 bits.
fn parse_trace_id(hex: &str) -> Option<[u8; 16]> {
    let id = match hex.len() {
        32 => decode_lower_hex::<16>(hex.as_bytes())?,
        16 => {
            let low = decode_lower_hex::<8>(hex.as_bytes())?;
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&low);
            id
        }
        _ => return None,
    };
    (id != [0; 16]).then_some(id)
}

/// A 16-hex non-zero span id.
fn parse_span_id(hex: &str) -> Option<[u8; 8]> {
    let id = decode_lower_hex::<8>(hex.as_bytes())?;
    (id != [0; 8]).then_some(id)
}
