//! Human-readable lines, one per span:
//!
//! ```text
//! 2026-11-21T14:54:00.123456Z SERVER GET /users/* 200 1.234ms service=python3 pid=1234 peer=127.0.0.1:54321 trace=<32 hex> span=<16 hex>
//! ```
//!
//! Start time in UTC (RFC 3339, microseconds), kind, name, `http.response.status_code` (or `-`),
//! `ERROR` when the span status is Error, duration (`µs` below 1 ms, `ms` below 1 s, else `s`,
//! three decimals, truncated), then `service=` (resource `service.name`), `pid=` (resource
//! `process.pid`), `peer=` (`network.peer.address`/`network.peer.port`), each `-` when unknown,
//! `trace=`, `span=`, and `parent=` when the span has a parent. Values with spaces, quotes, `=`
//! or control characters are JSON-quoted; control characters in the name are escaped, so a span
//! is always one line.

use std::fmt::Write as _;
use std::io::Write;

use super::{SpanExporter, hex};
use crate::spans::{AttributeValue, Span, SpanStatus};

/// Writes spans as text lines to `W`, one `write_all` per exported batch.
pub struct TextExporter<W: Write> {
    writer: W,
    buf: String,
}

impl<W: Write> TextExporter<W> {
    pub fn new(writer: W) -> Self {
        TextExporter {
            writer,
            buf: String::new(),
        }
    }

    pub fn get_ref(&self) -> &W {
        &self.writer
    }

    pub fn into_inner(self) -> W {
        self.writer
    }
}

impl<W: Write + Send> SpanExporter for TextExporter<W> {
    fn export(&mut self, spans: &[Span]) -> std::io::Result<()> {
        self.buf.clear();
        for span in spans {
            format_span_into(span, &mut self.buf);
            self.buf.push('\n');
        }
        self.writer.write_all(self.buf.as_bytes())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.writer.flush()
    }

    fn name(&self) -> &'static str {
        "stdout (text)"
    }
}

/// The line for one span, without the newline.
pub fn format_span(span: &Span) -> String {
    let mut out = String::with_capacity(160);
    format_span_into(span, &mut out);
    out
}

fn format_span_into(span: &Span, out: &mut String) {
    out.push_str(&rfc3339_micros(span.start_unix_nano));
    out.push(' ');
    out.push_str(span.kind.as_str());
    out.push(' ');
    push_escaped_controls(out, &span.name);
    out.push(' ');
    match span.attribute("http.response.status_code") {
        Some(value) => push_value(out, value),
        None => out.push('-'),
    }
    if span.status == SpanStatus::Error {
        out.push_str(" ERROR");
    }
    out.push(' ');
    out.push_str(&format_duration(
        span.end_unix_nano.saturating_sub(span.start_unix_nano),
    ));
    out.push_str(" service=");
    push_optional(out, span.resource.get("service.name"));
    out.push_str(" pid=");
    push_optional(out, span.resource.get("process.pid"));
    out.push_str(" peer=");
    match (
        span.attribute("network.peer.address"),
        span.attribute("network.peer.port"),
    ) {
        (Some(AttributeValue::Str(address)), port) => {
            let peer = match port {
                Some(AttributeValue::Int(p)) if address.contains(':') => format!("[{address}]:{p}"),
                Some(AttributeValue::Int(p)) => format!("{address}:{p}"),
                _ => address.to_string(),
            };
            push_token(out, &peer);
        }
        _ => out.push('-'),
    }
    out.push_str(" trace=");
    out.push_str(&hex(&span.trace_id));
    out.push_str(" span=");
    out.push_str(&hex(&span.span_id));
    if let Some(parent) = &span.parent_span_id {
        out.push_str(" parent=");
        out.push_str(&hex(parent));
    }
}

fn push_optional(out: &mut String, value: Option<&AttributeValue>) {
    match value {
        Some(v) => push_value(out, v),
        None => out.push('-'),
    }
}

fn push_value(out: &mut String, value: &AttributeValue) {
    match value {
        AttributeValue::Int(n) => {
            let _ = write!(out, "{n}");
        }
        AttributeValue::Str(s) => push_token(out, s),
    }
}

/// A value as one whitespace-free token: as is when safe, JSON-quoted otherwise.
fn push_token(out: &mut String, s: &str) {
    let unsafe_char = |c: char| c.is_whitespace() || c.is_control() || c == '"' || c == '=';
    if !s.is_empty() && !s.contains(unsafe_char) {
        out.push_str(s);
    } else {
        out.push_str(&serde_json::Value::from(s).to_string());
    }
}

fn push_escaped_controls(out: &mut String, s: &str) {
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
}

/// `ns` with a unit: `µs` below 1 ms, `ms` below 1 s, else `s`; three decimals, truncated.
pub fn format_duration(ns: u64) -> String {
    let (unit_ns, unit) = if ns < 1_000_000 {
        (1_000, "µs")
    } else if ns < 1_000_000_000 {
        (1_000_000, "ms")
    } else {
        (1_000_000_000, "s")
    };
    let whole = ns / unit_ns;
    let thousandths = ns % unit_ns / (unit_ns / 1_000);
    format!("{whole}.{thousandths:03}{unit}")
}

/// UTC RFC 3339 time with microseconds, e.g. `2023-11-14T22:13:20.123456Z`.
pub fn rfc3339_micros(unix_nanos: u64) -> String {
    let secs = unix_nanos / 1_000_000_000;
    let micros = unix_nanos % 1_000_000_000 / 1_000;
    let days = (secs / 86_400) as i64;
    let in_day = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        in_day / 3_600,
        in_day % 3_600 / 60,
        in_day % 60
    )
}

/// (year, month 1-12, day 1-31) of the proleptic Gregorian date `days` after 1970-01-01
/// (Howard Hinnant's `civil_from_days`).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March-based
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spans::{Resource, SpanKind};
    use std::sync::Arc;

    fn span() -> Span {
        Span {
            trace_id: [
                0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e,
                0x47, 0x36,
            ],
            span_id: [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7],
            parent_span_id: None,
            trace_state: None,
            name: "GET /users/*".into(),
            kind: SpanKind::Server,
            start_unix_nano: 1_700_000_000_123_456_789,
            end_unix_nano: 1_700_000_000_124_690_789,
            status: SpanStatus::Unset,
            links: Vec::new(),
            attributes: vec![
                ("http.request.method", AttributeValue::Str("GET".into())),
                ("http.response.status_code", AttributeValue::Int(200)),
                (
                    "network.peer.address",
                    AttributeValue::Str("127.0.0.1".into()),
                ),
                ("network.peer.port", AttributeValue::Int(54321)),
            ],
            resource: Arc::new(Resource {
                attributes: vec![
                    ("service.name", AttributeValue::Str("python3".into())),
                    ("process.pid", AttributeValue::Int(1234)),
                ],
            }),
        }
    }

    #[test]
    fn exact_line() {
        let mut exporter = TextExporter::new(Vec::new());
        exporter.export(&[span()]).unwrap();
        exporter.flush().unwrap();
        let out = String::from_utf8(exporter.into_inner()).unwrap();
        assert_eq!(
            out,
            "2023-11-14T22:13:20.123456Z SERVER GET /users/* 200 1.234ms service=python3 \
             pid=1234 peer=127.0.0.1:54321 trace=4bf92f3577b34da6a3ce929d0e0e4736 \
             span=00f067aa0ba902b7\n"
        );
    }

    #[test]
    fn error_without_response_ipv6_peer_and_parent() {
        let mut s = span();
        s.kind = SpanKind::Client;
        s.status = SpanStatus::Error;
        s.parent_span_id = Some([1, 2, 3, 4, 5, 6, 7, 8]);
        s.end_unix_nano = s.start_unix_nano + 2_500_000_000;
        s.attributes = vec![
            ("network.peer.address", AttributeValue::Str("::1".into())),
            ("network.peer.port", AttributeValue::Int(8080)),
        ];
        s.resource = Arc::new(Resource {
            attributes: vec![("service.name", AttributeValue::Str("my app".into()))],
        });
        assert_eq!(
            format_span(&s),
            "2023-11-14T22:13:20.123456Z CLIENT GET /users/* - ERROR 2.500s \
             service=\"my app\" pid=- peer=[::1]:8080 trace=4bf92f3577b34da6a3ce929d0e0e4736 \
             span=00f067aa0ba902b7 parent=0102030405060708"
        );
    }

    #[test]
    fn error_with_status_and_missing_fields() {
        let mut s = span();
        s.status = SpanStatus::Error;
        s.attributes = vec![("http.response.status_code", AttributeValue::Int(500))];
        s.resource = Arc::new(Resource { attributes: vec![] });
        s.end_unix_nano = s.start_unix_nano + 999;
        s.name = "HTTP /a\nb".into();
        assert_eq!(
            format_span(&s),
            "2023-11-14T22:13:20.123456Z SERVER HTTP /a\\nb 500 ERROR 0.999µs service=- \
             pid=- peer=- trace=4bf92f3577b34da6a3ce929d0e0e4736 span=00f067aa0ba902b7"
        );
    }

    #[test]
    fn end_before_start_is_zero() {
        let mut s = span();
        s.end_unix_nano = 0;
        assert!(format_span(&s).contains(" 200 0.000µs "));
    }

    #[test]
    fn durations() {
        assert_eq!(format_duration(0), "0.000µs");
        assert_eq!(format_duration(1), "0.001µs");
        assert_eq!(format_duration(12_345), "12.345µs");
        assert_eq!(format_duration(999_999), "999.999µs");
        assert_eq!(format_duration(1_000_000), "1.000ms");
        assert_eq!(format_duration(1_234_567), "1.234ms");
        assert_eq!(format_duration(999_999_999), "999.999ms");
        assert_eq!(format_duration(1_000_000_000), "1.000s");
        assert_eq!(format_duration(61_500_000_000), "61.500s");
        assert_eq!(format_duration(u64::MAX), "18446744073.709s");
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339_micros(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339_micros(1_700_000_000_123_456_789),
            "2023-11-14T22:13:20.123456Z"
        );
        assert_eq!(rfc3339_micros(999), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339_micros(86_399_999_999_999),
            "1970-01-01T23:59:59.999999Z"
        );
        assert_eq!(
            rfc3339_micros(951_782_400_000_000_000),
            "2000-02-29T00:00:00.000000Z"
        );
        assert_eq!(rfc3339_micros(u64::MAX), "2554-07-21T23:34:33.709551Z");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(58), (1970, 2, 28));
        assert_eq!(civil_from_days(59), (1970, 3, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(47_541), (2100, 3, 1));
        assert_eq!(civil_from_days(47_540), (2100, 2, 28));
        assert_eq!(civil_from_days(-135_081), (1600, 2, 29));
        // Every day from 1900 to 2200 follows the previous one.
        let mut prev = civil_from_days(-25_567);
        assert_eq!(prev, (1900, 1, 1));
        for d in -25_566..84_000 {
            let cur = civil_from_days(d);
            let next_day = (prev.0, prev.1, prev.2 + 1);
            let next_month = (prev.0, prev.1 + 1, 1);
            let next_year = (prev.0 + 1, 1, 1);
            assert!(
                cur == next_day || cur == next_month || cur == next_year,
                "{prev:?} -> {cur:?}"
            );
            prev = cur;
        }
    }
}
