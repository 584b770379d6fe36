//! W3C Trace Context level 1: `traceparent` and `tracestate`.
//! <https://www.w3.org/TR/trace-context/>

use super::{SpanContext, decode_lower_hex, encode_hex, lower_hex_digit, trim_ows};

/// Length of a version-00 `traceparent`: `vv-<32 hex>-<16 hex>-ff`.
const TRACEPARENT_LEN: usize = 55;

/// `tracestate` values longer than this are dropped (the spec allows truncation; we drop).
const MAX_TRACESTATE_LEN: usize = 512;

/// Parses a `traceparent` header value into the parent context and its raw trace-flags byte
/// (`sampled` = bit 0).
///
/// Rules: lower-case hex only; version `ff` is invalid; version `00` must be exactly 55 chars;
/// a higher version is accepted when at least 55 chars and, if longer, the 56th char is `-`
/// (the rest is ignored); all-zero trace-id or parent-id is invalid. Spaces/tabs around the
/// value are tolerated.
pub fn parse_traceparent(value: &str) -> Option<(SpanContext, u8)> {
    let v = trim_ows(value).as_bytes();
    if v.len() < TRACEPARENT_LEN {
        return None;
    }
    let version = decode_lower_hex::<1>(&v[0..2])?[0];
    if version == 0xff {
        return None;
    }
    if version == 0x00 {
        if v.len() != TRACEPARENT_LEN {
            return None;
        }
    } else if v.len() > TRACEPARENT_LEN && v[TRACEPARENT_LEN] != b'-' {
        return None;
    }
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let trace_id = decode_lower_hex::<16>(&v[3..35])?;
    let span_id = decode_lower_hex::<8>(&v[36..52])?;
    let flags = (lower_hex_digit(v[53])? << 4) | lower_hex_digit(v[54])?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    let ctx = SpanContext {
        trace_id,
        span_id,
        sampled: flags & 0x01 != 0,
    };
    Some((ctx, flags))
}

/// Formats a version-00 `traceparent`: `00-<32 hex>-<16 hex>-01` (sampled) or `-00`.
pub fn format_traceparent(ctx: &SpanContext) -> String {
    format!(
        "00-{}-{}-{}",
        encode_hex(&ctx.trace_id),
        encode_hex(&ctx.span_id),
        if ctx.sampled { "01" } else { "00" }
    )
}

/// The raw `tracestate` to keep alongside a valid `traceparent`: every `tracestate` header,
/// trimmed, empty ones skipped, joined with `,` (RFC 7230 field combination, which the spec
/// requires for multiple `tracestate` headers). `None` when empty or longer than 512 chars.
pub(super) fn trace_state(headers: &[(String, String)]) -> Option<String> {
    let joined = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("tracestate"))
        .map(|(_, v)| trim_ows(v))
        .filter(|v| !v.is_empty())
        .collect::<Vec<_>>()
        .join(",");
    if joined.is_empty() || joined.len() > MAX_TRACESTATE_LEN {
        None
    } else {
        Some(joined)
    }
}
