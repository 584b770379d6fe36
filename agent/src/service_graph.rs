//! The service graph: one edge per (client service, server service), made of the CLIENT→SERVER
//! pairs kspan traced (a SERVER span whose parent is a CLIENT span of another traced process)
//! and PRODUCER→CONSUMER pairs (a CONSUMER span linking to a PRODUCER span kspan traced).
//!
//! Each pair is counted with the metric names and labels of Grafana Tempo's metrics generator
//! and the OpenTelemetry Collector's `servicegraph` connector, so Grafana's service graph works
//! on kspan's metrics with no collector-side processing:
//! `traces_service_graph_request_total`, `traces_service_graph_request_failed_total` (either
//! span an error), `traces_service_graph_request_server_seconds` and
//! `traces_service_graph_request_client_seconds` (histograms), labelled `client` and `server`
//! (their `service.name`), and `connection_type="messaging_system"` on PRODUCER→CONSUMER edges
//! (absent on direct requests, as Tempo's empty value is in Prometheus). Spans that find no
//! partner within [`WAIT_NS`] count in `traces_service_graph_unpaired_spans_total` (labelled
//! `client` or `server` as Tempo does); the metrics live on kspan's own resource.
//!
//! Memory is bounded: at most [`MAX_WAITING`] spans wait per side (past it the oldest is given
//! up, counted as unpaired) and at most [`MAX_EDGES`] edges are kept for `kspan graph` (pairs of
//! further edges still count in the metrics, under the series cap of the metrics SDK).

use std::collections::{BTreeMap, VecDeque};

use compact_str::CompactString;
use opentelemetry::{
    KeyValue,
    metrics::{Counter, Histogram, Meter},
};
use rustc_hash::FxHashMap;

use crate::spans::{Span, SpanKind, SpanStatus};

/// How long a span waits for its partner (span end times; Tempo's default `wait` is 10 s).
pub const WAIT_NS: u64 = 10_000_000_000;
/// Spans waiting per side at most.
pub const MAX_WAITING: usize = 10_000;
/// Edges kept for the text and DOT views at most.
pub const MAX_EDGES: usize = 1_000;

/// `connection_type` of a PRODUCER→CONSUMER edge.
pub const MESSAGING: &str = "messaging_system";

/// One end of a pair, waiting for the other.
#[derive(Clone, Debug)]
struct Half {
    service: CompactString,
    seconds: f64,
    failed: bool,
    /// Span end time: the clock of expiry.
    end_ns: u64,
    messaging: bool,
}

/// Which side a waiting span is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Client,
    Server,
}

/// An edge: who calls whom, and how.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct EdgeKey {
    pub client: CompactString,
    pub server: CompactString,
    /// `None` for direct requests, [`MESSAGING`] across a broker.
    pub connection_type: Option<&'static str>,
}

/// What an edge has seen since kspan started.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EdgeStats {
    pub requests: u64,
    pub failed: u64,
    /// Sum of the SERVER (or CONSUMER) spans' durations, seconds.
    pub server_seconds: f64,
    /// Sum of the CLIENT (or PRODUCER) spans' durations, seconds.
    pub client_seconds: f64,
}

impl EdgeStats {
    /// Mean server-side latency in seconds.
    pub fn mean_server_seconds(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.server_seconds / self.requests as f64
        }
    }
}

/// The instruments pairs are recorded in.
struct Instruments {
    requests: Counter<u64>,
    failed: Counter<u64>,
    server_seconds: Histogram<f64>,
    client_seconds: Histogram<f64>,
    unpaired: Counter<u64>,
}

impl Instruments {
    fn new(meter: &Meter) -> Self {
        let histogram = |name: &'static str, description: &'static str| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(description)
                .with_boundaries(crate::metrics::DURATION_BOUNDARIES.to_vec())
                .build()
        };
        Instruments {
            requests: meter
                .u64_counter("traces_service_graph_request_total")
                .with_description("Requests between two services (a CLIENT and SERVER pair).")
                .build(),
            failed: meter
                .u64_counter("traces_service_graph_request_failed_total")
                .with_description("Requests between two services with either span an error.")
                .build(),
            server_seconds: histogram(
                "traces_service_graph_request_server_seconds",
                "Duration of requests between two services, as the server saw it.",
            ),
            client_seconds: histogram(
                "traces_service_graph_request_client_seconds",
                "Duration of requests between two services, as the client saw it.",
            ),
            unpaired: meter
                .u64_counter("traces_service_graph_unpaired_spans_total")
                .with_description(
                    "CLIENT or SERVER spans that found no traced partner within the wait.",
                )
                .build(),
        }
    }
}

pub struct ServiceGraph {
    /// CLIENT and PRODUCER spans by their span id.
    clients: FxHashMap<[u8; 8], Half>,
    /// SERVER and CONSUMER spans by the span id of the CLIENT or PRODUCER they wait for.
    servers: FxHashMap<[u8; 8], Half>,
    /// Waiting spans in arrival order, for expiry: (end time, key, side).
    order: VecDeque<(u64, [u8; 8], Side)>,
    edges: BTreeMap<EdgeKey, EdgeStats>,
    instruments: Option<Instruments>,
    /// Spans given up without a partner.
    pub unpaired: u64,
}

impl ServiceGraph {
    /// A graph that records its pairs in instruments of `meter` (None: only the edge table).
    pub fn new(meter: Option<&Meter>) -> Self {
        ServiceGraph {
            clients: FxHashMap::default(),
            servers: FxHashMap::default(),
            order: VecDeque::new(),
            edges: BTreeMap::new(),
            instruments: meter.map(Instruments::new),
            unpaired: 0,
        }
    }

    /// Takes one finished span: pairs it with its waiting partner, or makes it wait.
    pub fn record(&mut self, span: &Span) {
        self.expire(span.end_unix_nano);
        let half = || Half {
            service: service_name(span),
            seconds: span.end_unix_nano.saturating_sub(span.start_unix_nano) as f64 / 1e9,
            failed: span.status == SpanStatus::Error,
            end_ns: span.end_unix_nano,
            messaging: matches!(span.kind, SpanKind::Producer | SpanKind::Consumer),
        };
        match span.kind {
            SpanKind::Client | SpanKind::Producer => {
                let client = half();
                match self.servers.remove(&span.span_id) {
                    Some(server) => self.pair(&client, &server),
                    None => self.wait(span.span_id, client, Side::Client),
                }
            }
            SpanKind::Server => {
                if let Some(parent) = span.parent_span_id {
                    self.server_side(parent, half());
                }
            }
            SpanKind::Consumer => {
                // A consumer's messages link to the spans that produced them; without links
                // (a consumer span's parent is a produce only when the context was injected),
                // its parent.
                if span.links.is_empty()
                    && let Some(parent) = span.parent_span_id
                {
                    self.server_side(parent, half());
                }
                for link in &span.links {
                    self.server_side(link.span_id, half());
                }
            }
        }
    }

    fn server_side(&mut self, client_id: [u8; 8], server: Half) {
        match self.clients.remove(&client_id) {
            Some(client) => self.pair(&client, &server),
            None => self.wait(client_id, server, Side::Server),
        }
    }

    fn wait(&mut self, key: [u8; 8], half: Half, side: Side) {
        if self.order.len() >= 2 * MAX_WAITING {
            self.give_up_oldest();
        }
        self.order.push_back((half.end_ns, key, side));
        let table = match side {
            Side::Client => &mut self.clients,
            Side::Server => &mut self.servers,
        };
        // A second span with the same key replaces the first (a retry under one id, or a
        // consumer linking one message twice): one pair, not two.
        table.insert(key, half);
    }

    fn pair(&mut self, client: &Half, server: &Half) {
        let key = EdgeKey {
            client: client.service.clone(),
            server: server.service.clone(),
            connection_type: (client.messaging || server.messaging).then_some(MESSAGING),
        };
        let failed = client.failed || server.failed;
        if let Some(instruments) = &self.instruments {
            let mut labels = vec![
                KeyValue::new("client", key.client.to_string()),
                KeyValue::new("server", key.server.to_string()),
            ];
            if let Some(kind) = key.connection_type {
                labels.push(KeyValue::new("connection_type", kind));
            }
            instruments.requests.add(1, &labels);
            if failed {
                instruments.failed.add(1, &labels);
            }
            instruments.server_seconds.record(server.seconds, &labels);
            instruments.client_seconds.record(client.seconds, &labels);
        }
        if !self.edges.contains_key(&key) && self.edges.len() >= MAX_EDGES {
            return;
        }
        let edge = self.edges.entry(key).or_default();
        edge.requests += 1;
        edge.failed += u64::from(failed);
        edge.server_seconds += server.seconds;
        edge.client_seconds += client.seconds;
    }

    /// Gives up the spans that waited longer than [`WAIT_NS`] before `now_ns`.
    fn expire(&mut self, now_ns: u64) {
        while let Some(&(end_ns, _, _)) = self.order.front() {
            if now_ns.saturating_sub(end_ns) < WAIT_NS {
                break;
            }
            self.give_up_oldest();
        }
    }

    fn give_up_oldest(&mut self) {
        let Some((end_ns, key, side)) = self.order.pop_front() else {
            return;
        };
        let table = match side {
            Side::Client => &mut self.clients,
            Side::Server => &mut self.servers,
        };
        // Still waiting (not paired, not replaced by a later span with the same key).
        if table.get(&key).is_some_and(|h| h.end_ns == end_ns) {
            let half = table.remove(&key).expect("checked above");
            self.unpaired += 1;
            if let Some(instruments) = &self.instruments {
                let label = match side {
                    Side::Client => KeyValue::new("client", half.service.to_string()),
                    Side::Server => KeyValue::new("server", half.service.to_string()),
                };
                instruments.unpaired.add(1, &[label]);
            }
        }
    }

    /// The edges so far, by (client, server).
    pub fn edges(&self) -> Vec<(EdgeKey, EdgeStats)> {
        self.edges
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Spans waiting for a partner now.
    pub fn waiting(&self) -> usize {
        self.clients.len() + self.servers.len()
    }
}

fn service_name(span: &Span) -> CompactString {
    CompactString::from(span.resource.service_name().unwrap_or("unknown_service"))
}

/// The edges as text: one line per edge, client → server, requests, failures, mean latency.
pub fn render_text(edges: &[(EdgeKey, EdgeStats)]) -> String {
    if edges.is_empty() {
        return "no edges: no request between two traced processes was seen\n".to_string();
    }
    let width = |f: &dyn Fn(&EdgeKey) -> usize| edges.iter().map(|(k, _)| f(k)).max().unwrap_or(0);
    let client_width = width(&|k| k.client.chars().count()).max("CLIENT".len());
    let server_width = width(&|k| k.server.chars().count()).max("SERVER".len());
    let mut out = format!(
        "{:<client_width$}    {:<server_width$}  {:>9} {:>7} {:>12}  TYPE\n",
        "CLIENT", "SERVER", "REQUESTS", "FAILED", "SERVER MEAN"
    );
    for (key, stats) in edges {
        out.push_str(&format!(
            "{:<client_width$} -> {:<server_width$}  {:>9} {:>7} {:>12}  {}\n",
            key.client,
            key.server,
            stats.requests,
            stats.failed,
            crate::export::text::format_duration(
                (stats.mean_server_seconds() * 1e9).round() as u64
            ),
            key.connection_type.unwrap_or("request"),
        ));
    }
    out
}

/// The edges as a Graphviz digraph: services as nodes, an edge labelled with its counts.
pub fn render_dot(edges: &[(EdgeKey, EdgeStats)]) -> String {
    let mut out = String::from("digraph kspan {\n  rankdir=LR;\n  node [shape=box];\n");
    for (key, stats) in edges {
        let style = if key.connection_type.is_some() {
            ", style=dashed"
        } else {
            ""
        };
        let colour = if stats.failed > 0 { ", color=red" } else { "" };
        out.push_str(&format!(
            "  {} -> {} [label=\"{} req, {} failed, {}\"{style}{colour}];\n",
            dot_id(&key.client),
            dot_id(&key.server),
            stats.requests,
            stats.failed,
            crate::export::text::format_duration(
                (stats.mean_server_seconds() * 1e9).round() as u64
            ),
        ));
    }
    out.push_str("}\n");
    out
}

/// A quoted DOT identifier.
fn dot_id(name: &str) -> String {
    let escaped: String = name
        .chars()
        .flat_map(|c| match c {
            '"' => vec!['\\', '"'],
            '\\' => vec!['\\', '\\'],
            c if c.is_control() => vec!['?'],
            c => vec![c],
        })
        .collect();
    format!("\"{escaped}\"")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spans::SpanLink;

    fn span(service: &str, kind: SpanKind, id: u8, parent: Option<u8>, ms: u64) -> Span {
        Span {
            span_id: [id; 8],
            parent_span_id: parent.map(|p| [p; 8]),
            ..Span::for_test(service, kind, ms)
        }
    }

    fn key(client: &str, server: &str) -> EdgeKey {
        EdgeKey {
            client: client.into(),
            server: server.into(),
            connection_type: None,
        }
    }

    /// curl → frontend → backend, spans in the order they finish (servers first).
    #[test]
    fn a_chain_gives_one_edge_per_hop_whatever_the_order() {
        let mut graph = ServiceGraph::new(None);
        graph.record(&span("backend", SpanKind::Server, 4, Some(3), 2));
        let mut failing = span("frontend", SpanKind::Client, 3, Some(2), 3);
        failing.status = SpanStatus::Error;
        graph.record(&failing);
        graph.record(&span("frontend", SpanKind::Server, 2, Some(1), 5));
        graph.record(&span("curl", SpanKind::Client, 1, None, 6));
        // A SERVER span whose client was not traced: it waits, then is unpaired.
        graph.record(&span("frontend", SpanKind::Server, 9, Some(8), 1));
        assert_eq!(
            graph.edges(),
            vec![
                (
                    key("curl", "frontend"),
                    EdgeStats {
                        requests: 1,
                        failed: 0,
                        server_seconds: 0.005,
                        client_seconds: 0.006,
                    }
                ),
                (
                    key("frontend", "backend"),
                    EdgeStats {
                        requests: 1,
                        failed: 1,
                        server_seconds: 0.002,
                        client_seconds: 0.003,
                    }
                ),
            ]
        );
        assert_eq!(graph.waiting(), 1);
        let mut late = span("curl", SpanKind::Client, 20, None, 1);
        late.end_unix_nano += 2 * WAIT_NS;
        graph.record(&late);
        assert_eq!(graph.unpaired, 1, "the orphan SERVER span expired");
        assert_eq!(graph.waiting(), 1, "the late CLIENT span waits");
    }

    #[test]
    fn a_consumer_pairs_with_the_producers_it_links_to() {
        let mut graph = ServiceGraph::new(None);
        graph.record(&span("orders", SpanKind::Producer, 1, None, 1));
        graph.record(&span("billing", SpanKind::Producer, 2, None, 1));
        let mut consumer = span("mailer", SpanKind::Consumer, 3, None, 4);
        for id in [1u8, 2] {
            consumer.links.push(SpanLink {
                trace_id: [1; 16],
                span_id: [id; 8],
            });
        }
        graph.record(&consumer);
        let edges = graph.edges();
        assert_eq!(edges.len(), 2, "{edges:?}");
        for (k, stats) in &edges {
            assert_eq!(k.server, "mailer");
            assert_eq!(k.connection_type, Some(MESSAGING));
            assert_eq!(stats.requests, 1);
        }
    }

    #[test]
    fn waiting_spans_are_bounded_and_given_up_counted() {
        let mut graph = ServiceGraph::new(None);
        for i in 0..(2 * MAX_WAITING + 10) {
            let mut s = span("a", SpanKind::Client, 0, None, 1);
            s.span_id = (i as u64).to_le_bytes();
            graph.record(&s);
        }
        assert_eq!(graph.waiting(), 2 * MAX_WAITING);
        assert_eq!(graph.unpaired, 10);
    }

    #[test]
    fn text_and_dot() {
        let edges = vec![
            (
                key("curl", "frontend"),
                EdgeStats {
                    requests: 3,
                    failed: 1,
                    server_seconds: 0.003,
                    client_seconds: 0.004,
                },
            ),
            (
                EdgeKey {
                    client: "orders \"v2\"".into(),
                    server: "mailer".into(),
                    connection_type: Some(MESSAGING),
                },
                EdgeStats {
                    requests: 1,
                    ..Default::default()
                },
            ),
        ];
        let text = render_text(&edges);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("CLIENT"), "{text}");
        assert!(
            lines[1].starts_with("curl") && lines[1].contains("-> frontend"),
            "{text}"
        );
        assert!(
            lines[1].contains("  3 ") && lines[1].contains(" 1 "),
            "{text}"
        );
        assert!(
            lines[1].contains("1.000ms") && lines[1].ends_with("request"),
            "{text}"
        );
        assert!(lines[2].ends_with(MESSAGING), "{text}");
        let dot = render_dot(&edges);
        assert!(dot.starts_with("digraph kspan {"), "{dot}");
        assert!(
            dot.contains(
                "\"curl\" -> \"frontend\" [label=\"3 req, 1 failed, 1.000ms\", color=red];"
            ),
            "{dot}"
        );
        assert!(dot.contains("\"orders \\\"v2\\\"\" -> \"mailer\""), "{dot}");
        assert!(dot.contains("style=dashed"), "{dot}");
        assert!(dot.trim_end().ends_with('}'), "{dot}");
        assert!(render_text(&[]).starts_with("no edges"));
    }
}
