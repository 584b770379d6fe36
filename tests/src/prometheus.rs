//! Fetching and parsing a Prometheus text exposition (`GET /metrics`) with
//! nothing but std: the test process is never traced, so its requests do not
//! add spans (curl would).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    /// Labels in the order they appear on the line.
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The labels as a map (order dropped).
    pub fn label_map(&self) -> BTreeMap<String, String> {
        self.labels.iter().cloned().collect()
    }

    /// Label names in line order.
    pub fn label_names(&self) -> Vec<&str> {
        self.labels.iter().map(|(k, _)| k.as_str()).collect()
    }
}

/// `GET http://127.0.0.1:{port}{path}` over HTTP/1.1 (`Connection: close`).
/// Returns (status code, content type, body); de-chunks chunked bodies.
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String, String)> {
    get(port, path).map(|r| (r.status, r.content_type, r.body))
}

/// What [`get`] read.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub content_type: String,
    pub body: String,
    /// The client's port: its connection's identity on the server side (`client.port`).
    pub local_port: u16,
}

/// Like [`http_get`], with the client's local port (the test process is not traced: its
/// requests to a traced server make that server's spans only).
pub fn get(port: u16, path: &str) -> std::io::Result<Response> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    let local_port = s.local_addr()?.port();
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/plain\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers in the response"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad(&format!("bad status line {status_line:?}")))?;
    let mut content_type = String::new();
    let mut chunked = false;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-type" {
                content_type = v.to_string();
            } else if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            }
        }
    }
    if chunked {
        body = dechunk(&body).ok_or_else(|| bad("bad chunked body"))?;
    }
    Ok(Response {
        status,
        content_type,
        body: String::from_utf8_lossy(&body).into_owned(),
        local_port,
    })
}

/// kspan's own series (`service_name="kspan"`: its counters and gauges) on the endpoint at
/// `port`, by name; None if the scrape failed.
pub fn kspan_values(port: u16) -> Option<BTreeMap<String, f64>> {
    let (status, _, body) = http_get(port, "/metrics").ok()?;
    (status == 200).then_some(())?;
    Some(
        parse_text(&body)
            .into_iter()
            .filter(|s| s.label("service_name") == Some("kspan"))
            .map(|s| (s.name, s.value))
            .collect(),
    )
}

/// One of kspan's own series (see [`kspan_values`]); None if the scrape failed or it is absent.
pub fn kspan_value(port: u16, name: &str) -> Option<f64> {
    kspan_values(port)?.remove(name)
}

/// Polls kspan's series every 200 ms until each of `expected` has its value; fails the test
/// after `timeout`, naming `what` and the values seen. The kernel maps' gauges are counted
/// every 5 s, so waits for them should allow for a census or two.
pub fn wait_for_kspan_values(port: u16, what: &str, expected: &[(&str, f64)], timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let values = kspan_values(port);
        let got: Vec<(&str, Option<f64>)> = expected
            .iter()
            .map(|(name, _)| (*name, values.as_ref().and_then(|v| v.get(*name).copied())))
            .collect();
        if got
            .iter()
            .zip(expected)
            .all(|((_, g), (_, e))| *g == Some(*e))
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: expected {expected:?} within {timeout:?}, got {got:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let size_line = std::str::from_utf8(&b[..eol]).ok()?;
        let size = usize::from_str_radix(size_line.split(';').next()?.trim(), 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        if b.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// Parses the text exposition format: skips comments and blank lines; label
/// values are unescaped (`\\`, `\"`, `\n`); values parse as f64 (`+Inf`,
/// `-Inf`, `NaN` included). An optional timestamp after the value is
/// ignored. Panics on a malformed line, naming it.
pub fn parse_text(text: &str) -> Vec<Sample> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| parse_line(l).unwrap_or_else(|e| panic!("bad Prometheus line ({e}): {l:?}")))
        .collect()
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" | "Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse::<f64>().map_err(|e| format!("value {s:?}: {e}")),
    }
}

/// Parses a `le` label value as f64 (`+Inf` included).
pub fn parse_le(s: &str) -> f64 {
    parse_value(s).unwrap_or_else(|e| panic!("bad le label: {e}"))
}

fn parse_line(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or("no value")?;
    let name = line[..name_end].to_string();
    if name.is_empty() {
        return Err("empty metric name".into());
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if rest.starts_with('{') {
        let mut chars = rest[1..].char_indices().peekable();
        let body = &rest[1..];
        let end;
        loop {
            // Skip separators.
            while let Some(&(_, c)) = chars.peek() {
                if c == ',' || c.is_whitespace() {
                    chars.next();
                } else {
                    break;
                }
            }
            let Some(&(start, c)) = chars.peek() else {
                return Err("unterminated label set".into());
            };
            if c == '}' {
                end = start + 1;
                break;
            }
            // Label name up to '='.
            let mut key_end = start;
            for (i, c) in chars.by_ref() {
                if c == '=' {
                    key_end = i;
                    break;
                }
            }
            let key = body[start..key_end].trim().to_string();
            if key.is_empty() {
                return Err("empty label name".into());
            }
            match chars.next() {
                Some((_, '"')) => {}
                _ => return Err(format!("label {key}: value does not start with a quote")),
            }
            let mut val = String::new();
            let mut closed = false;
            while let Some((_, c)) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some((_, 'n')) => val.push('\n'),
                        Some((_, other)) => val.push(other),
                        None => return Err("dangling escape".into()),
                    },
                    '"' => {
                        closed = true;
                        break;
                    }
                    c => val.push(c),
                }
            }
            if !closed {
                return Err(format!("label {key}: unterminated value"));
            }
            labels.push((key, val));
        }
        rest = &body[end..];
    }
    let mut parts = rest.split_whitespace();
    let value = parse_value(parts.next().ok_or("no value")?)?;
    Ok(Sample {
        name,
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_and_values() {
        let s = parse_text(
            "# HELP x y\n# TYPE x counter\n\
             a_total{service_name=\"kspan\",process_pid=\"12\"} 5\n\
             b_bucket{k=\"a\\\"b\\\\c\",le=\"+Inf\"} 3.0 1700000000\n\
             c 1e3\n",
        );
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].name, "a_total");
        assert_eq!(s[0].label_names(), vec!["service_name", "process_pid"]);
        assert_eq!(s[0].value, 5.0);
        assert_eq!(s[1].label("k"), Some("a\"b\\c"));
        assert_eq!(parse_le(s[1].label("le").unwrap()), f64::INFINITY);
        assert_eq!(s[1].value, 3.0);
        assert!(s[2].labels.is_empty());
        assert_eq!(s[2].value, 1000.0);
    }

    #[test]
    fn dechunks() {
        assert_eq!(
            dechunk(b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n").unwrap(),
            b"abcde".to_vec()
        );
    }
}
