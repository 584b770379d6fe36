//! Traces as trees in the terminal (the trace view): the spans of one trace nested by parent,
//! siblings ordered by start, each with a time bar scaled to the trace (a waterfall):
//!
//! ```text
//! trace 4bf92f3577b34da6a3ce929d0e0e4736  GET /api/orders/*  12.412ms  3 spans
//! SERVER GET /api/orders/*   200   12.412ms frontend   |██████████████████████████████|
//!   CLIENT GET /orders/*     200    9.871ms frontend   |  ███████████████████████     |
//!     SERVER GET /orders/*   200    9.102ms orders     |   ████████████████████       |
//! ```
//!
//! A trace is printed once: when its root (a span without parent) has come and a grace period
//! for late children has passed, or, for a partial trace whose root kspan did not trace, once
//! no span of it has come for a while; then it is rooted at its top-most known spans. Memory is
//! bounded: past `max_traces` the oldest trace is printed early, past `max_spans` per trace
//! further spans are counted, not kept.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use super::hex;
use super::text::format_duration;
use crate::spans::{AttributeValue, Span, SpanStatus};

const RED: &str = "\x1b[31m";
const DIM: &str = "\x1b[2m";
const CYAN: &str = "\x1b[36m";
const RESET: &str = "\x1b[0m";

/// Columns and colour of the rendering.
#[derive(Clone, Copy, Debug)]
pub struct TreeStyle {
    /// Terminal width in columns (40 at least is assumed; less is treated as 40).
    pub width: usize,
    pub color: bool,
}

/// The lines of one trace (each ending in a newline), appended to `out`.
pub fn render_trace(spans: &[Span], style: TreeStyle, out: &mut String) {
    if spans.is_empty() {
        return;
    }
    let width = style.width.max(40);
    let order = tree_order(spans);
    let start = spans.iter().map(|s| s.start_unix_nano).min().unwrap_or(0);
    let end = spans
        .iter()
        .map(|s| s.end_unix_nano.max(s.start_unix_nano))
        .max()
        .unwrap_or(start);
    let total = end.saturating_sub(start).max(1);

    // Header: the trace id, the first top-level span's name, the trace's duration.
    let top = &spans[order[0].0];
    let mut header = format!(
        "trace {}  {}  {}  {} span{}",
        hex(&top.trace_id),
        clean(&top.name),
        format_duration(end.saturating_sub(start)),
        spans.len(),
        if spans.len() == 1 { "" } else { "s" }
    );
    if order[0].1 == 0 && top.parent_span_id.is_some() {
        header.push_str("  (partial: its root was not traced)");
    }
    push_line(out, &header, width, style.color.then_some(DIM));

    // Each line: the left part (indent, kind, name, status, duration, service), then the bar.
    let bar_width = (width / 3).clamp(10, 60);
    let left_width = width - bar_width - 3;
    // One column per field: the services padded to the longest (of at most 24 columns), so
    // statuses, durations and services line up under each other.
    let service_width = spans
        .iter()
        .map(|s| service_name(s).chars().count())
        .max()
        .unwrap_or(1)
        .min(24);
    for (index, depth) in order {
        let span = &spans[index];
        let status = match span.attribute("http.response.status_code") {
            Some(AttributeValue::Int(code)) => code.to_string(),
            _ => match span.attribute("rpc.grpc.status_code") {
                Some(AttributeValue::Int(code)) => format!("grpc {code}"),
                _ => "-".to_string(),
            },
        };
        let service = truncate(service_name(span), service_width);
        let indent = "  ".repeat(depth.min(20));
        let tail = format!(
            " {status:>6} {:>10} {service:<service_width$}",
            format_duration(span.end_unix_nano.saturating_sub(span.start_unix_nano))
        );
        let head = format!("{indent}{} {}", span.kind.as_str(), clean(&span.name));
        let left = fit(&head, &tail, left_width);
        let bar = bar(span, start, total, bar_width);
        let error = span.status == SpanStatus::Error;
        if style.color {
            let colour = if error { RED } else { "" };
            let _ = writeln!(out, "{colour}{left}{RESET} {CYAN}|{bar}|{RESET}");
        } else {
            let mark = if error { "!" } else { " " };
            let _ = writeln!(out, "{left}{mark}|{bar}|");
        }
    }
}

fn service_name(span: &Span) -> &str {
    span.resource.service_name().unwrap_or("?")
}

fn push_line(out: &mut String, line: &str, width: usize, colour: Option<&str>) {
    let line = truncate(line, width);
    match colour {
        Some(colour) => {
            let _ = writeln!(out, "{colour}{line}{RESET}");
        }
        None => {
            let _ = writeln!(out, "{line}");
        }
    }
}

/// `head` then `tail`, exactly `width` columns: the head is cut (with `…`) to make room, but
/// keeps at least half the width (the tail, ending in the service, is cut first).
fn fit(head: &str, tail: &str, width: usize) -> String {
    let tail = truncate(tail, width / 2);
    let tail_len = tail.chars().count();
    let room = width.saturating_sub(tail_len);
    let head = truncate(head, room);
    let pad = room.saturating_sub(head.chars().count());
    let line = format!("{head}{}{tail}", " ".repeat(pad));
    truncate(&line, width)
}

fn truncate(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_string();
    }
    let mut cut: String = s.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// A span name with control characters replaced, so a span is one line.
fn clean(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// The span's place in the trace, `width` cells: `█` where it runs, at least one cell.
fn bar(span: &Span, trace_start: u64, total: u64, width: usize) -> String {
    let scale =
        |t: u64| ((t.saturating_sub(trace_start)) as u128 * width as u128 / total as u128) as usize;
    let from = scale(span.start_unix_nano).min(width - 1);
    let to = scale(span.end_unix_nano.max(span.start_unix_nano)).clamp(from + 1, width);
    let mut bar = String::with_capacity(width * 3);
    for cell in 0..width {
        bar.push(if (from..to).contains(&cell) {
            '█'
        } else {
            ' '
        });
    }
    bar
}

/// (index into `spans`, depth), depth first: top-level spans (no parent, or a parent not in
/// the set) by start, each followed by its children by start. A span is listed once even if
/// the parent links form a cycle (a corrupt trace).
fn tree_order(spans: &[Span]) -> Vec<(usize, usize)> {
    let ids: HashSet<[u8; 8]> = spans.iter().map(|s| s.span_id).collect();
    let mut children: HashMap<[u8; 8], Vec<usize>> = HashMap::new();
    let mut tops = Vec::new();
    for (i, span) in spans.iter().enumerate() {
        match span.parent_span_id {
            Some(parent) if ids.contains(&parent) && parent != span.span_id => {
                children.entry(parent).or_default().push(i)
            }
            _ => tops.push(i),
        }
    }
    let by_start = |list: &mut Vec<usize>| {
        list.sort_by_key(|&i| (spans[i].start_unix_nano, spans[i].span_id));
    };
    by_start(&mut tops);
    for list in children.values_mut() {
        by_start(list);
    }
    let mut order = Vec::with_capacity(spans.len());
    let mut listed = vec![false; spans.len()];
    let mut stack: Vec<(usize, usize)> = tops.iter().rev().map(|&i| (i, 0)).collect();
    loop {
        while let Some((i, depth)) = stack.pop() {
            if std::mem::replace(&mut listed[i], true) {
                continue;
            }
            order.push((i, depth));
            if let Some(kids) = children.get(&spans[i].span_id) {
                stack.extend(kids.iter().rev().map(|&k| (k, depth + 1)));
            }
        }
        // Spans only reachable through a cycle: list the earliest as a top.
        match (0..spans.len())
            .filter(|&i| !listed[i])
            .min_by_key(|&i| spans[i].start_unix_nano)
        {
            Some(i) => stack.push((i, 0)),
            None => break,
        }
    }
    order
}

/// How long a trace waits for late children after its root, and a partial trace after its
/// last span (the spans of one request reach the agent within milliseconds of each other; a
/// second is what a reader will not notice).
const GRACE_NS: u64 = 500_000_000;
const QUIET_NS: u64 = 2_000_000_000;
/// Traces held at once, spans per trace: past them a trace is printed early or a span
/// counted and dropped.
const MAX_TRACES: usize = 4096;
const MAX_SPANS: usize = 512;

/// Which traces are shown: each filter given must match at least one span of the trace, and
/// a trace shown is shown whole.
#[derive(Clone, Debug, Default)]
pub struct TraceFilter {
    /// A span at least this long (nanoseconds).
    pub min_duration_ns: Option<u64>,
    /// A span with an error status.
    pub errors_only: bool,
    /// A span of this service (`service.name`).
    pub service: Option<String>,
}

impl TraceFilter {
    pub fn shows(&self, trace: &[Span]) -> bool {
        let any = |f: &dyn Fn(&Span) -> bool| trace.iter().any(f);
        self.min_duration_ns
            .is_none_or(|min| any(&|s| s.end_unix_nano.saturating_sub(s.start_unix_nano) >= min))
            && (!self.errors_only || any(&|s| s.status == SpanStatus::Error))
            && self
                .service
                .as_deref()
                .is_none_or(|name| any(&|s| s.resource.service_name() == Some(name)))
    }
}

/// `250us`, `10ms`, `1.5s` (also `µs`, `ns`) in nanoseconds.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("{text:?} has no unit (ns, us, ms, s)"))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a number"))?;
    let scale = match unit {
        "ns" => 1.0,
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (ns, us, ms, s)")),
    };
    Ok((number * scale) as u64)
}

/// Writes traces as trees to `W` (stdout in practice) as they complete.
pub struct TreeExporter<W: std::io::Write> {
    writer: W,
    style: TreeStyle,
    filter: TraceFilter,
    traces: TraceAssembler,
    started: std::time::Instant,
    buf: String,
    /// Where spans the assembler could not keep are counted (`spans_dropped`).
    stats: Option<std::sync::Arc<crate::stats::Stats>>,
}

impl<W: std::io::Write> TreeExporter<W> {
    pub fn new(writer: W, style: TreeStyle, filter: TraceFilter) -> Self {
        TreeExporter {
            writer,
            style,
            filter,
            traces: TraceAssembler::new(GRACE_NS, QUIET_NS, MAX_TRACES, MAX_SPANS),
            started: std::time::Instant::now(),
            buf: String::new(),
            stats: None,
        }
    }

    /// Counts the spans a full trace could not keep in `stats.spans_dropped`.
    pub fn with_stats(mut self, stats: std::sync::Arc<crate::stats::Stats>) -> Self {
        self.stats = Some(stats);
        self
    }

    fn now(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    fn write(&mut self, traces: Vec<Vec<Span>>) -> std::io::Result<()> {
        if traces.is_empty() {
            return Ok(());
        }
        self.buf.clear();
        for trace in traces.iter().filter(|t| self.filter.shows(t)) {
            render_trace(trace, self.style, &mut self.buf);
            self.buf.push('\n');
        }
        if self.buf.is_empty() {
            return Ok(());
        }
        self.writer.write_all(self.buf.as_bytes())?;
        self.writer.flush()
    }
}

impl<W: std::io::Write + Send> super::SpanExporter for TreeExporter<W> {
    fn export(&mut self, spans: &[Span]) -> std::io::Result<()> {
        let now = self.now();
        let mut early = Vec::new();
        for span in spans {
            early.extend(self.traces.add(span.clone(), now));
        }
        // The assembler's count since the last batch: it only holds what is not counted yet.
        let dropped = std::mem::take(&mut self.traces.spans_dropped);
        if let Some(stats) = self.stats.as_ref().filter(|_| dropped > 0) {
            crate::stats::Stats::add(&stats.spans_dropped, dropped);
        }
        self.write(early)?;
        let ready = self.traces.ready(now);
        self.write(ready)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.writer.flush()
    }

    fn tick(&mut self) -> std::io::Result<()> {
        let ready = self.traces.ready(self.now());
        self.write(ready)
    }

    fn shutdown(&mut self) -> std::io::Result<()> {
        let all = self.traces.drain();
        self.write(all)
    }

    fn name(&self) -> &'static str {
        "stdout (tree)"
    }
}

/// Spans gathered per trace until the trace is complete enough to print.
pub struct TraceAssembler {
    traces: HashMap<[u8; 16], PendingTrace>,
    /// How long after its root a trace waits for late children.
    grace_ns: u64,
    /// How long a trace without root waits after its last span.
    quiet_ns: u64,
    max_traces: usize,
    max_spans: usize,
    /// Spans not kept because their trace was full (not yet counted in the stats).
    pub spans_dropped: u64,
}

struct PendingTrace {
    spans: Vec<Span>,
    /// When (the caller's clock) the root came.
    root_at: Option<u64>,
    last_at: u64,
    first_at: u64,
}

impl TraceAssembler {
    pub fn new(grace_ns: u64, quiet_ns: u64, max_traces: usize, max_spans: usize) -> Self {
        TraceAssembler {
            traces: HashMap::new(),
            grace_ns,
            quiet_ns,
            max_traces: max_traces.max(1),
            max_spans: max_spans.max(1),
            spans_dropped: 0,
        }
    }

    /// Adds a span at `now` (nanoseconds, any monotonic clock). Returns a trace pushed out
    /// early to make room, if the table was full.
    pub fn add(&mut self, span: Span, now: u64) -> Option<Vec<Span>> {
        let mut evicted = None;
        if !self.traces.contains_key(&span.trace_id) && self.traces.len() >= self.max_traces {
            let oldest = self
                .traces
                .iter()
                .min_by_key(|(_, t)| t.first_at)
                .map(|(id, _)| *id);
            evicted = oldest
                .and_then(|id| self.traces.remove(&id))
                .map(|t| t.spans);
        }
        let trace = self.traces.entry(span.trace_id).or_insert(PendingTrace {
            spans: Vec::new(),
            root_at: None,
            last_at: now,
            first_at: now,
        });
        trace.last_at = now;
        if span.parent_span_id.is_none() {
            trace.root_at.get_or_insert(now);
        }
        if trace.spans.len() < self.max_spans {
            trace.spans.push(span);
        } else {
            self.spans_dropped += 1;
        }
        evicted
    }

    /// The traces ready at `now`, oldest first.
    pub fn ready(&mut self, now: u64) -> Vec<Vec<Span>> {
        let (grace, quiet) = (self.grace_ns, self.quiet_ns);
        let mut ready: Vec<([u8; 16], u64)> = self
            .traces
            .iter()
            .filter(|(_, t)| match t.root_at {
                Some(at) => now.saturating_sub(at) >= grace,
                None => now.saturating_sub(t.last_at) >= quiet,
            })
            .map(|(id, t)| (*id, t.first_at))
            .collect();
        ready.sort_by_key(|&(id, first)| (first, id));
        ready
            .into_iter()
            .filter_map(|(id, _)| self.traces.remove(&id).map(|t| t.spans))
            .collect()
    }

    /// Every trace still held (at the stop), oldest first.
    pub fn drain(&mut self) -> Vec<Vec<Span>> {
        self.ready(u64::MAX)
    }

    pub fn len(&self) -> usize {
        self.traces.len()
    }

    pub fn is_empty(&self) -> bool {
        self.traces.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spans::{Resource, SpanKind};
    use std::sync::Arc;

    fn span(id: u8, parent: Option<u8>, start_ms: u64, end_ms: u64, name: &str) -> Span {
        Span {
            trace_id: [7; 16],
            span_id: [id; 8],
            parent_span_id: parent.map(|p| [p; 8]),
            trace_state: None,
            name: name.into(),
            kind: if id % 2 == 1 {
                SpanKind::Server
            } else {
                SpanKind::Client
            },
            start_unix_nano: 1_000_000_000 + start_ms * 1_000_000,
            end_unix_nano: 1_000_000_000 + end_ms * 1_000_000,
            status: SpanStatus::Unset,
            links: Vec::new(),
            attributes: vec![("http.response.status_code", AttributeValue::Int(200))],
            resource: Arc::new(Resource {
                attributes: vec![("service.name", AttributeValue::Str("svc".into()))],
            }),
        }
    }

    fn plain(spans: &[Span], width: usize) -> Vec<String> {
        let mut out = String::new();
        render_trace(
            spans,
            TreeStyle {
                width,
                color: false,
            },
            &mut out,
        );
        out.lines().map(str::to_string).collect()
    }

    /// A three-service chain, given in the order spans finish (children first).
    fn chain() -> Vec<Span> {
        vec![
            span(3, Some(2), 2, 9, "GET /orders/*"),
            span(2, Some(1), 1, 10, "GET /orders/*"),
            span(1, None, 0, 12, "GET /api/orders/*"),
        ]
    }

    #[test]
    fn children_are_nested_under_their_parent() {
        let lines = plain(&chain(), 100);
        assert_eq!(lines.len(), 4, "{lines:#?}");
        assert!(lines[0].starts_with("trace 07070707"), "{lines:#?}");
        assert!(
            lines[0].contains("GET /api/orders/*  12.000ms  3 spans"),
            "{lines:#?}"
        );
        assert!(
            lines[1].starts_with("SERVER GET /api/orders/*"),
            "{lines:#?}"
        );
        assert!(lines[2].starts_with("  CLIENT GET /orders/*"), "{lines:#?}");
        assert!(
            lines[3].starts_with("    SERVER GET /orders/*"),
            "{lines:#?}"
        );
        for line in &lines[1..] {
            assert!(line.contains(" 200 ") && line.contains(" svc "), "{line}");
        }
    }

    #[test]
    fn columns_line_up_whatever_the_service_names() {
        let mut spans = chain();
        for (span, service) in spans
            .iter_mut()
            .zip(["store", "a-much-longer-service", "fe"])
        {
            span.resource = Arc::new(Resource {
                attributes: vec![("service.name", AttributeValue::Str(service.into()))],
            });
        }
        let lines = plain(&spans, 120);
        let columns = |needle: &str| -> Vec<usize> {
            lines[1..].iter().map(|l| l.find(needle).unwrap()).collect()
        };
        for needle in [" 200 ", "|"] {
            let at = columns(needle);
            assert!(
                at.iter().all(|&c| c == at[0]),
                "{needle:?} at {at:?}\n{lines:#?}"
            );
        }
    }

    #[test]
    fn siblings_are_ordered_by_start_not_by_arrival() {
        let spans = vec![
            span(1, None, 0, 20, "root"),
            span(4, Some(1), 10, 12, "second"),
            span(2, Some(1), 1, 5, "first"),
        ];
        let lines = plain(&spans, 80);
        assert!(lines[2].contains("first"), "{lines:#?}");
        assert!(lines[3].contains("second"), "{lines:#?}");
    }

    #[test]
    fn the_bar_is_scaled_to_the_trace() {
        let lines = plain(&chain(), 120);
        let bar = |line: &str| {
            let open = line.find('|').unwrap();
            line[open + 1..line.len() - 1].to_string()
        };
        let root = bar(&lines[1]);
        let inner = bar(&lines[3]);
        assert_eq!(root.chars().count(), 40);
        assert!(root.chars().all(|c| c == '█'), "{root:?}");
        // 2 ms to 9 ms of 12 ms, in 40 cells: cells 6 to 29.
        let cells: Vec<char> = inner.chars().collect();
        assert_eq!(cells.iter().position(|&c| c == '█'), Some(6), "{inner:?}");
        assert_eq!(cells.iter().rposition(|&c| c == '█'), Some(29), "{inner:?}");
    }

    #[test]
    fn every_line_fits_widths_from_40_to_200() {
        let mut spans = chain();
        spans[0].name = "GET /a/very/long/route/template/that/does/not/fit/anywhere/*".into();
        for width in [40, 41, 60, 80, 120, 200] {
            for line in plain(&spans, width) {
                assert!(line.chars().count() <= width, "{width}: {line:?}");
            }
        }
        // Narrower than 40 is drawn at 40, and the name keeps half the left column.
        let narrow = plain(&spans, 10);
        for line in &narrow {
            assert!(line.chars().count() <= 40, "{line:?}");
        }
        assert!(narrow[1].starts_with("SERVER GET"), "{narrow:#?}");
    }

    #[test]
    fn a_partial_trace_is_rooted_at_its_top_most_known_spans() {
        // The root (span 1) was not traced: span 2's parent is unknown.
        let spans = vec![
            span(3, Some(2), 2, 9, "inner"),
            span(2, Some(1), 1, 10, "outer"),
        ];
        let lines = plain(&spans, 100);
        assert!(lines[0].contains("(partial"), "{lines:#?}");
        assert!(lines[1].starts_with("CLIENT outer"), "{lines:#?}");
        assert!(lines[2].starts_with("  SERVER inner"), "{lines:#?}");
    }

    #[test]
    fn errors_are_marked_and_colour_only_when_asked() {
        let mut spans = chain();
        spans[0].status = SpanStatus::Error;
        let lines = plain(&spans, 100);
        assert!(lines.iter().all(|l| !l.contains('\x1b')), "{lines:#?}");
        assert!(lines[3].contains("!|"), "{lines:#?}");
        assert!(!lines[1].contains("!|"), "{lines:#?}");
        let mut out = String::new();
        render_trace(
            &spans,
            TreeStyle {
                width: 100,
                color: true,
            },
            &mut out,
        );
        let coloured: Vec<&str> = out.lines().collect();
        assert!(coloured[3].starts_with(RED), "{coloured:#?}");
        assert!(!coloured[1].starts_with(RED), "{coloured:#?}");
    }

    #[test]
    fn a_parent_cycle_lists_every_span_once() {
        let spans = vec![span(1, Some(2), 0, 5, "a"), span(2, Some(1), 1, 4, "b")];
        let lines = plain(&spans, 80);
        assert_eq!(lines.len(), 3, "{lines:#?}");
    }

    #[test]
    fn a_trace_waits_for_late_children_after_its_root() {
        let mut traces = TraceAssembler::new(100, 1_000, 16, 64);
        let [inner, middle, root] = <[Span; 3]>::try_from(chain()).unwrap();
        traces.add(inner, 0);
        traces.add(root, 10);
        assert!(traces.ready(50).is_empty(), "within the grace period");
        traces.add(middle, 60);
        let ready = traces.ready(110);
        assert_eq!(ready.len(), 1);
        assert_eq!(ready[0].len(), 3, "the late child is in the tree");
        assert!(traces.is_empty());
    }

    #[test]
    fn a_trace_without_root_is_printed_once_quiet() {
        let mut traces = TraceAssembler::new(100, 1_000, 16, 64);
        traces.add(span(3, Some(2), 2, 9, "inner"), 0);
        traces.add(span(2, Some(1), 1, 10, "outer"), 500);
        assert!(traces.ready(1_400).is_empty(), "a span came 900 ns ago");
        assert_eq!(traces.ready(1_500).len(), 1);
    }

    #[test]
    fn memory_is_bounded_in_traces_and_spans() {
        let mut traces = TraceAssembler::new(100, 1_000, 2, 2);
        for (i, trace) in [1u8, 2, 3].into_iter().enumerate() {
            let mut s = span(1, Some(9), 0, 1, "x");
            s.trace_id = [trace; 16];
            let evicted = traces.add(s, i as u64);
            assert_eq!(evicted.is_some(), trace == 3, "trace {trace}");
        }
        assert_eq!(traces.len(), 2);
        for id in 4..8 {
            let mut s = span(id, Some(9), 0, 1, "x");
            s.trace_id = [2; 16];
            traces.add(s, 10);
        }
        assert_eq!(traces.spans_dropped, 3);
        let drained = traces.drain();
        assert_eq!(drained.iter().map(Vec::len).collect::<Vec<_>>(), vec![2, 1]);
    }

    #[test]
    fn filters_show_a_trace_whole_when_any_span_matches() {
        let mut spans = chain();
        let all = TraceFilter::default();
        assert!(all.shows(&spans));
        let slow = TraceFilter {
            min_duration_ns: Some(11_000_000),
            ..Default::default()
        };
        assert!(slow.shows(&spans), "the 12 ms root");
        let slower = TraceFilter {
            min_duration_ns: Some(13_000_000),
            ..Default::default()
        };
        assert!(!slower.shows(&spans));
        let errors = TraceFilter {
            errors_only: true,
            ..Default::default()
        };
        assert!(!errors.shows(&spans));
        spans[0].status = SpanStatus::Error;
        assert!(errors.shows(&spans));
        let service = |name: &str| TraceFilter {
            service: Some(name.into()),
            ..Default::default()
        };
        assert!(service("svc").shows(&spans));
        assert!(!service("other").shows(&spans));
    }

    #[test]
    fn durations_with_units() {
        assert_eq!(parse_duration("250us"), Ok(250_000));
        assert_eq!(parse_duration("250µs"), Ok(250_000));
        assert_eq!(parse_duration("1.5ms"), Ok(1_500_000));
        assert_eq!(parse_duration("2s"), Ok(2_000_000_000));
        assert_eq!(parse_duration("10ns"), Ok(10));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("ms").is_err());
        assert!(parse_duration("3m").is_err());
    }

    #[test]
    fn the_exporter_prints_complete_traces_and_the_rest_at_the_stop() {
        use crate::export::SpanExporter;
        let mut exporter = TreeExporter::new(
            Vec::new(),
            TreeStyle {
                width: 80,
                color: false,
            },
            TraceFilter::default(),
        );
        // Periods no test run reaches: only the stop prints.
        exporter.traces = TraceAssembler::new(u64::MAX / 2, u64::MAX / 2, 16, 16);
        let mut partial = span(9, Some(8), 0, 1, "partial");
        partial.trace_id = [9; 16];
        exporter.export(&chain()).unwrap();
        exporter.export(&[partial]).unwrap();
        exporter.tick().unwrap();
        assert!(
            exporter.writer.is_empty(),
            "both wait: the root's grace, the partial's quiet"
        );
        exporter.shutdown().unwrap();
        let text = String::from_utf8(exporter.writer.clone()).unwrap();
        assert_eq!(text.matches("trace ").count(), 2, "{text}");
        assert!(text.contains("partial"), "{text}");
    }
}
