//! JSON lines: one JSON object per span per line.
//!
//! ```text
//! {"trace_id":"<32 hex>","span_id":"<16 hex>","parent_span_id":null,"name":"GET /users/*",
//!  "kind":"SERVER","start_unix_nano":1700000000123456789,"end_unix_nano":1700000000124690789,
//!  "status":"UNSET","attributes":{"http.request.method":"GET",...},"resource":{...}}
//! ```
//! (one line in reality). Spans with links (Kafka CONSUMER spans) have a `links` field after
//! the attributes: `[{"trace_id":"<32 hex>","span_id":"<16 hex>"},...]`. Fields come in that
//! order; attributes and resource attributes in the
//! span's order. Times are JSON numbers (u64); attribute values are strings or integers. Strings
//! are escaped by serde_json.

use std::io::Write;

use super::{SpanExporter, hex};
use crate::spans::{AttributeValue, Span};

/// Writes spans as JSON lines to `W`, one `write_all` per exported batch.
pub struct JsonExporter<W: Write> {
    writer: W,
    buf: Vec<u8>,
}

impl<W: Write> JsonExporter<W> {
    pub fn new(writer: W) -> Self {
        JsonExporter {
            writer,
            buf: Vec::new(),
        }
    }

    pub fn get_ref(&self) -> &W {
        &self.writer
    }

    pub fn into_inner(self) -> W {
        self.writer
    }
}

impl<W: Write + Send> SpanExporter for JsonExporter<W> {
    fn export(&mut self, spans: &[Span]) -> std::io::Result<()> {
        self.buf.clear();
        for span in spans {
            encode_span(span, &mut self.buf)?;
            self.buf.push(b'\n');
        }
        self.writer.write_all(&self.buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.writer.flush()
    }

    fn name(&self) -> &'static str {
        "stdout (json)"
    }
}

/// Appends the JSON object for `span` to `out` (no trailing newline).
pub fn encode_span(span: &Span, out: &mut Vec<u8>) -> std::io::Result<()> {
    out.extend_from_slice(b"{\"trace_id\":\"");
    out.extend_from_slice(hex(&span.trace_id).as_bytes());
    out.extend_from_slice(b"\",\"span_id\":\"");
    out.extend_from_slice(hex(&span.span_id).as_bytes());
    out.extend_from_slice(b"\",\"parent_span_id\":");
    match &span.parent_span_id {
        Some(id) => write!(out, "\"{}\"", hex(id))?,
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"name\":");
    serde_json::to_writer(&mut *out, &span.name)?;
    write!(
        out,
        ",\"kind\":\"{}\",\"start_unix_nano\":{},\"end_unix_nano\":{},\"status\":\"{}\"",
        span.kind.as_str(),
        span.start_unix_nano,
        span.end_unix_nano,
        span.status.as_str()
    )?;
    out.extend_from_slice(b",\"attributes\":");
    encode_attributes(&span.attributes, out)?;
    if !span.links.is_empty() {
        out.extend_from_slice(b",\"links\":[");
        for (i, link) in span.links.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write!(
                out,
                "{{\"trace_id\":\"{}\",\"span_id\":\"{}\"}}",
                hex(&link.trace_id),
                hex(&link.span_id)
            )?;
        }
        out.push(b']');
    }
    out.extend_from_slice(b",\"resource\":");
    encode_attributes(&span.resource.attributes, out)?;
    out.push(b'}');
    Ok(())
}

fn encode_attributes(
    attributes: &[(&'static str, AttributeValue)],
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    out.push(b'{');
    for (i, (key, value)) in attributes.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut *out, key)?;
        out.push(b':');
        match value {
            AttributeValue::Str(s) => serde_json::to_writer(&mut *out, s)?,
            AttributeValue::Int(n) => write!(out, "{n}")?,
        }
    }
    out.push(b'}');
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spans::{Resource, SpanKind, SpanLink, SpanStatus};
    use serde_json::{Value, json};
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
            end_unix_nano: u64::MAX,
            status: SpanStatus::Unset,
            links: Vec::new(),
            attributes: vec![
                ("http.request.method", AttributeValue::Str("GET".into())),
                ("http.response.status_code", AttributeValue::Int(200)),
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

    fn export(spans: &[Span]) -> String {
        let mut exporter = JsonExporter::new(Vec::new());
        exporter.export(spans).unwrap();
        exporter.flush().unwrap();
        String::from_utf8(exporter.into_inner()).unwrap()
    }

    #[test]
    fn links_follow_the_attributes() {
        let mut consumer = span();
        consumer.kind = SpanKind::Consumer;
        consumer.links = vec![
            SpanLink {
                trace_id: [0x11; 16],
                span_id: [0x22; 8],
            },
            SpanLink {
                trace_id: [0x33; 16],
                span_id: [0x44; 8],
            },
        ];
        let out = export(&[consumer]);
        let v: Value = serde_json::from_str(out.trim_end()).unwrap();
        assert_eq!(v["kind"], "CONSUMER");
        assert_eq!(
            v["links"],
            json!([
                {"trace_id": "11111111111111111111111111111111", "span_id": "2222222222222222"},
                {"trace_id": "33333333333333333333333333333333", "span_id": "4444444444444444"}
            ])
        );
        let links = out.find("\"links\"").unwrap();
        assert!(out.find("\"attributes\"").unwrap() < links);
        assert!(links < out.find("\"resource\"").unwrap());
        // Spans without links have no field.
        assert!(!export(&[span()]).contains("links"));
    }

    #[test]
    fn round_trip() {
        let out = export(&[span()]);
        assert!(out.ends_with('\n'));
        assert_eq!(out.lines().count(), 1);
        let v: Value = serde_json::from_str(out.trim_end()).unwrap();
        assert_eq!(
            v,
            json!({
                "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
                "span_id": "00f067aa0ba902b7",
                "parent_span_id": null,
                "name": "GET /users/*",
                "kind": "SERVER",
                "start_unix_nano": 1_700_000_000_123_456_789u64,
                "end_unix_nano": u64::MAX,
                "status": "UNSET",
                "attributes": {
                    "http.request.method": "GET",
                    "http.response.status_code": 200,
                    "network.peer.port": 54321
                },
                "resource": {"service.name": "python3", "process.pid": 1234}
            })
        );
        assert_eq!(
            v["start_unix_nano"].as_u64(),
            Some(1_700_000_000_123_456_789)
        );
        assert_eq!(v["end_unix_nano"].as_u64(), Some(u64::MAX));
        // Field order as documented.
        let line = out.trim_end();
        assert!(line.starts_with("{\"trace_id\":\"4bf92f3577b34da6a3ce929d0e0e4736\",\"span_id\""));
        let order = [
            "\"trace_id\"",
            "\"span_id\"",
            "\"parent_span_id\"",
            "\"name\"",
            "\"kind\"",
            "\"start_unix_nano\"",
            "\"end_unix_nano\"",
            "\"status\"",
            "\"attributes\"",
            "\"resource\"",
        ];
        let positions: Vec<usize> = order.iter().map(|k| line.find(k).unwrap()).collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{line}");
        assert!(line.find("http.request.method") < line.find("network.peer.port"));
    }

    #[test]
    fn client_error_with_parent() {
        let mut s = span();
        s.kind = SpanKind::Client;
        s.status = SpanStatus::Error;
        s.parent_span_id = Some([1, 2, 3, 4, 5, 6, 7, 0xff]);
        s.attributes = vec![];
        let out = export(&[s]);
        let v: Value = serde_json::from_str(out.trim_end()).unwrap();
        assert_eq!(v["kind"], "CLIENT");
        assert_eq!(v["status"], "ERROR");
        assert_eq!(v["parent_span_id"], "01020304050607ff");
        assert_eq!(v["attributes"], json!({}));
    }

    #[test]
    fn strings_are_escaped() {
        let tricky = "a \"quoted\" \\ back\nnew\tline \u{1} é 漢字 🦀 </script>";
        let mut s = span();
        s.name = tricky.into();
        s.attributes = vec![("user_agent.original", AttributeValue::Str(tricky.into()))];
        let out = export(&[s.clone(), s]);
        assert_eq!(out.lines().count(), 2);
        for line in out.lines() {
            assert!(!line.contains('\t'));
            let v: Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["name"], tricky);
            assert_eq!(v["attributes"]["user_agent.original"], tricky);
        }
        assert!(out.contains(r#"a \"quoted\" \\ back\nnew\tline \u0001 é"#));
    }

    #[test]
    fn negative_ints_and_empty_batch() {
        let mut s = span();
        s.attributes = vec![("x", AttributeValue::Int(i64::MIN))];
        let out = export(&[s]);
        let v: Value = serde_json::from_str(out.trim_end()).unwrap();
        assert_eq!(v["attributes"]["x"].as_i64(), Some(i64::MIN));
        assert_eq!(export(&[]), "");
    }
}
