//! `kspan top`: a full-screen live view of the traced traffic, one row per service and span
//! name (route, RPC or topic operation), refreshed every second: requests per second, error
//! rate, p50 and p99 latency over the last [`WINDOW_SECONDS`] seconds, and the total since the
//! start; the agent's own health in a status line.
//!
//! The rows are fed by the export thread from the same finished spans as the RED metrics
//! (every request, sampled or not), with the same names and error rules. Latencies go into
//! per-second histograms of 4 buckets per power of two (each bucket ±9%): a quantile is the
//! middle of its bucket, close enough for a live view and constant in memory. Rows are bounded
//! ([`MAX_ROWS`]); further names count in one `(other)` row per service.
//!
//! Keys: `s` next sort column, `r` reverse, `/` filter (service or name contains the text;
//! Enter keeps it, Esc clears it), `q`, Esc or Ctrl-C quit. The terminal is restored on every
//! exit (quit key, SIGINT or SIGTERM to kspan, an error, a panic).

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use compact_str::CompactString;
use ratatui::{
    Terminal,
    backend::CrosstermBackend,
    crossterm::{
        cursor,
        event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
        execute, terminal,
    },
    layout::{Constraint, Layout},
    style::{Modifier, Style},
    text::{Line, Span as TextSpan},
    widgets::{Cell, Paragraph, Row as TableRow, Table},
};
use rustc_hash::FxHashMap;

use crate::spans::{Span, SpanKind, SpanStatus};
use crate::stats::Stats;

/// Seconds the rates and quantiles are computed over.
pub const WINDOW_SECONDS: u64 = 5;
/// Rows kept at most (service × kind × name).
pub const MAX_ROWS: usize = 2000;
/// Latency buckets: 4 per power of two from 1 µs, the last one holding everything above
/// 2^26 µs (67 s).
const BUCKETS: usize = 26 * 4 + 1;
/// How often the screen is redrawn without a key.
const REFRESH: Duration = Duration::from_secs(1);

/// The rows' key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct RowKey {
    service: CompactString,
    kind: SpanKind,
    name: CompactString,
}

/// One second of one row.
#[derive(Clone)]
struct Second {
    /// Seconds since the table started.
    at: u64,
    requests: u32,
    errors: u32,
    latency: [u32; BUCKETS],
}

impl Second {
    fn empty(at: u64) -> Self {
        Second {
            at,
            requests: 0,
            errors: 0,
            latency: [0; BUCKETS],
        }
    }
}

struct Row {
    total: u64,
    /// A ring of the last WINDOW_SECONDS + 1 seconds (the current one included), by second
    /// modulo its length.
    seconds: [Second; WINDOW_SECONDS as usize + 1],
}

/// What the view shows of a row.
#[derive(Clone, Debug, PartialEq)]
pub struct RowView {
    pub service: String,
    pub kind: &'static str,
    pub name: String,
    pub requests_per_second: f64,
    /// Share of the window's requests that were errors, 0 to 1.
    pub error_rate: f64,
    pub p50_ns: Option<u64>,
    pub p99_ns: Option<u64>,
    pub total: u64,
}

/// The live rows, fed span by span.
pub struct LiveTable {
    rows: FxHashMap<RowKey, Row>,
    started: Instant,
}

impl Default for LiveTable {
    fn default() -> Self {
        Self::new()
    }
}

impl LiveTable {
    pub fn new() -> Self {
        LiveTable {
            rows: FxHashMap::default(),
            started: Instant::now(),
        }
    }

    fn now_second(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// Counts one finished span now.
    pub fn record(&mut self, span: &Span) {
        let at = self.now_second();
        self.record_at(span, at);
    }

    fn record_at(&mut self, span: &Span, at: u64) {
        let mut key = RowKey {
            service: CompactString::from(span.resource.service_name().unwrap_or("unknown_service")),
            kind: span.kind,
            name: CompactString::from(span.name.as_str()),
        };
        if !self.rows.contains_key(&key) && self.rows.len() >= MAX_ROWS {
            key.name = CompactString::const_new("(other)");
        }
        let row = self.rows.entry(key).or_insert_with(|| Row {
            total: 0,
            seconds: std::array::from_fn(|_| Second::empty(u64::MAX)),
        });
        row.total += 1;
        let second = &mut row.seconds[(at % (WINDOW_SECONDS + 1)) as usize];
        if second.at != at {
            *second = Second::empty(at);
        }
        second.requests += 1;
        second.errors += u32::from(span.status == SpanStatus::Error);
        let ns = span.end_unix_nano.saturating_sub(span.start_unix_nano);
        second.latency[bucket(ns)] += 1;
    }

    /// Every row as shown now.
    pub fn snapshot(&self) -> Vec<RowView> {
        self.snapshot_at(self.now_second(), self.started.elapsed())
    }

    fn snapshot_at(&self, now: u64, elapsed: Duration) -> Vec<RowView> {
        // The window: the last WINDOW_SECONDS whole seconds and the current one, as long as
        // kspan has run.
        let window = elapsed
            .as_secs_f64()
            .clamp(1.0, (WINDOW_SECONDS + 1) as f64);
        let oldest = now.saturating_sub(WINDOW_SECONDS);
        self.rows
            .iter()
            .map(|(key, row)| {
                let mut requests = 0u64;
                let mut errors = 0u64;
                let mut latency = [0u64; BUCKETS];
                for second in row.seconds.iter().filter(|s| s.at >= oldest && s.at <= now) {
                    requests += u64::from(second.requests);
                    errors += u64::from(second.errors);
                    for (sum, n) in latency.iter_mut().zip(second.latency.iter()) {
                        *sum += u64::from(*n);
                    }
                }
                RowView {
                    service: key.service.to_string(),
                    kind: key.kind.as_str(),
                    name: key.name.to_string(),
                    requests_per_second: requests as f64 / window,
                    error_rate: if requests == 0 {
                        0.0
                    } else {
                        errors as f64 / requests as f64
                    },
                    p50_ns: quantile(&latency, requests, 0.50),
                    p99_ns: quantile(&latency, requests, 0.99),
                    total: row.total,
                }
            })
            .collect()
    }
}

/// The bucket of a latency: 4 per power of two from 1 µs.
fn bucket(ns: u64) -> usize {
    let us = ns as f64 / 1000.0;
    if us <= 1.0 {
        return 0;
    }
    ((us.log2() * 4.0) as usize + 1).min(BUCKETS - 1)
}

/// The middle of bucket `i`, in nanoseconds.
fn bucket_middle_ns(i: usize) -> u64 {
    if i == 0 {
        return 1000;
    }
    (2f64.powf((i as f64 - 0.5) / 4.0) * 1000.0) as u64
}

fn quantile(latency: &[u64; BUCKETS], count: u64, q: f64) -> Option<u64> {
    if count == 0 {
        return None;
    }
    let rank = ((count as f64 * q).ceil() as u64).max(1);
    let mut seen = 0;
    for (i, n) in latency.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return Some(bucket_middle_ns(i));
        }
    }
    None
}

/// The sort columns, in the order `s` cycles through them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortBy {
    RequestsPerSecond,
    ErrorRate,
    P50,
    P99,
    Total,
    Name,
}

impl SortBy {
    fn next(self) -> Self {
        match self {
            SortBy::RequestsPerSecond => SortBy::ErrorRate,
            SortBy::ErrorRate => SortBy::P50,
            SortBy::P50 => SortBy::P99,
            SortBy::P99 => SortBy::Total,
            SortBy::Total => SortBy::Name,
            SortBy::Name => SortBy::RequestsPerSecond,
        }
    }

    fn label(self) -> &'static str {
        match self {
            SortBy::RequestsPerSecond => "REQ/S",
            SortBy::ErrorRate => "ERR%",
            SortBy::P50 => "P50",
            SortBy::P99 => "P99",
            SortBy::Total => "TOTAL",
            SortBy::Name => "SERVICE",
        }
    }
}

/// Sorting and filtering of the rows: largest first (names A to Z), `reverse` flips it.
pub fn arrange(rows: &mut Vec<RowView>, sort: SortBy, reverse: bool, filter: &str) {
    if !filter.is_empty() {
        let filter = filter.to_lowercase();
        rows.retain(|r| {
            r.service.to_lowercase().contains(&filter) || r.name.to_lowercase().contains(&filter)
        });
    }
    let by_name = |a: &RowView, b: &RowView| {
        (&a.service, a.kind, &a.name).cmp(&(&b.service, b.kind, &b.name))
    };
    rows.sort_by(|a, b| {
        let order = match sort {
            SortBy::RequestsPerSecond => b.requests_per_second.total_cmp(&a.requests_per_second),
            SortBy::ErrorRate => b.error_rate.total_cmp(&a.error_rate),
            SortBy::P50 => b.p50_ns.cmp(&a.p50_ns),
            SortBy::P99 => b.p99_ns.cmp(&a.p99_ns),
            SortBy::Total => b.total.cmp(&a.total),
            SortBy::Name => by_name(a, b),
        };
        let order = order.then_with(|| by_name(a, b));
        if reverse { order.reverse() } else { order }
    });
}

/// A duration in the view's short form: `850µs`, `12.3ms`, `1.20s`.
fn short_duration(ns: Option<u64>) -> String {
    match ns {
        None => "-".to_string(),
        Some(ns) if ns < 1_000_000 => format!("{}µs", ns / 1000),
        Some(ns) if ns < 100_000_000 => format!("{:.1}ms", ns as f64 / 1e6),
        Some(ns) if ns < 1_000_000_000 => format!("{}ms", ns / 1_000_000),
        Some(ns) => format!("{:.2}s", ns as f64 / 1e9),
    }
}

/// The agent's health, for the status line.
fn status_line(stats: &Stats) -> String {
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    format!(
        "events lost {} · kernel-skipped runs {} · spans dropped {} · parse errors {} · \
         connections dropped {}",
        get(&stats.events_lost),
        get(&stats.program_misses),
        get(&stats.spans_dropped),
        get(&stats.parse_errors),
        get(&stats.connections_dropped),
    )
}

/// The view's state between draws.
struct View {
    sort: SortBy,
    reverse: bool,
    filter: String,
    /// Typing a filter (after `/`).
    editing: bool,
}

/// Runs the view on this thread until a quit key or `stop`; sets `stop` when the user quits.
/// The terminal is restored before returning, whatever happened.
pub fn run(live: Arc<Mutex<LiveTable>>, stats: Arc<Stats>, stop: Arc<AtomicBool>) {
    let mut stdout = std::io::stdout();
    if let Err(error) = terminal::enable_raw_mode()
        .and_then(|()| execute!(stdout, terminal::EnterAlternateScreen, cursor::Hide))
    {
        restore_terminal();
        log::error!("kspan top: cannot set up the terminal ({error}): is stdout a terminal?");
        stop.store(true, Ordering::Relaxed);
        return;
    }
    // A panic anywhere restores the terminal before its message is printed.
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore_terminal();
        previous(info);
    }));
    let result = draw_until_quit(&live, &stats, &stop);
    restore_terminal();
    if let Err(error) = result {
        log::error!("kspan top: the terminal failed: {error}");
    }
    stop.store(true, Ordering::Relaxed);
}

fn restore_terminal() {
    let _ = terminal::disable_raw_mode();
    let mut stdout = std::io::stdout();
    let _ = execute!(stdout, terminal::LeaveAlternateScreen, cursor::Show);
    let _ = stdout.flush();
}

fn draw_until_quit(
    live: &Mutex<LiveTable>,
    stats: &Stats,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    let mut terminal = Terminal::new(CrosstermBackend::new(std::io::stdout()))?;
    let mut view = View {
        sort: SortBy::RequestsPerSecond,
        reverse: false,
        filter: String::new(),
        editing: false,
    };
    let mut next_draw = Instant::now();
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        if Instant::now() >= next_draw {
            let rows = live.lock().map(|t| t.snapshot()).unwrap_or_default();
            terminal.draw(|frame| draw(frame, rows, &view, stats))?;
            next_draw = Instant::now() + REFRESH;
        }
        // Short polls: a quit key or a stop signal is acted on within 100 ms.
        if !event::poll(Duration::from_millis(100))? {
            continue;
        }
        let Event::Key(key) = event::read()? else {
            continue;
        };
        if key.kind != KeyEventKind::Press {
            continue;
        }
        let ctrl_c =
            key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c');
        if ctrl_c {
            return Ok(());
        }
        if view.editing {
            match key.code {
                KeyCode::Enter => view.editing = false,
                KeyCode::Esc => {
                    view.editing = false;
                    view.filter.clear();
                }
                KeyCode::Backspace => {
                    view.filter.pop();
                }
                KeyCode::Char(c) if view.filter.chars().count() < 64 => view.filter.push(c),
                _ => {}
            }
        } else {
            match key.code {
                KeyCode::Char('q') | KeyCode::Esc => return Ok(()),
                KeyCode::Char('s') => view.sort = view.sort.next(),
                KeyCode::Char('r') => view.reverse = !view.reverse,
                KeyCode::Char('/') => {
                    view.editing = true;
                    view.filter.clear();
                }
                _ => {}
            }
        }
        next_draw = Instant::now();
    }
}

fn draw(frame: &mut ratatui::Frame<'_>, mut rows: Vec<RowView>, view: &View, stats: &Stats) {
    let [title, table_area, status, help] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(1),
        Constraint::Length(1),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    let shown_before = rows.len();
    arrange(&mut rows, view.sort, view.reverse, &view.filter);
    let bold = Style::new().add_modifier(Modifier::BOLD);
    let mut heading = vec![
        TextSpan::styled("kspan top", bold),
        TextSpan::raw(format!(
            "  {} rows  sorted by {}{}  (last {WINDOW_SECONDS} s)",
            rows.len(),
            view.sort.label(),
            if view.reverse { " (reversed)" } else { "" },
        )),
    ];
    if !view.filter.is_empty() || view.editing {
        heading.push(TextSpan::raw(format!(
            "  filter: {}{}  ({} of {shown_before})",
            view.filter,
            if view.editing { "_" } else { "" },
            rows.len()
        )));
    }
    frame.render_widget(Paragraph::new(Line::from(heading)), title);

    let header = TableRow::new(
        [
            "SERVICE", "KIND", "NAME", "REQ/S", "ERR%", "P50", "P99", "TOTAL",
        ]
        .into_iter()
        .map(|h| {
            let style = if h == view.sort.label() {
                bold.add_modifier(Modifier::REVERSED)
            } else {
                bold
            };
            Cell::from(h).style(style)
        }),
    );
    let lines = rows.iter().map(|r| {
        let style = if r.error_rate > 0.0 {
            Style::new().fg(ratatui::style::Color::Red)
        } else {
            Style::new()
        };
        TableRow::new(vec![
            Cell::from(r.service.clone()),
            Cell::from(r.kind),
            Cell::from(r.name.clone()),
            Cell::from(format!("{:.1}", r.requests_per_second)),
            Cell::from(format!("{:.1}", r.error_rate * 100.0)),
            Cell::from(short_duration(r.p50_ns)),
            Cell::from(short_duration(r.p99_ns)),
            Cell::from(r.total.to_string()),
        ])
        .style(style)
    });
    let widths = [
        Constraint::Fill(2),
        Constraint::Length(8),
        Constraint::Fill(4),
        Constraint::Length(8),
        Constraint::Length(6),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(9),
    ];
    frame.render_widget(Table::new(lines, widths).header(header), table_area);
    frame.render_widget(Paragraph::new(status_line(stats)), status);
    frame.render_widget(
        Paragraph::new("s sort · r reverse · / filter · q quit")
            .style(Style::new().add_modifier(Modifier::DIM)),
        help,
    );
}

/// Log lines kept while the view owns the screen (a line would tear it), printed to stderr
/// when it closes. Bounded: past [`LOG_LINES`] lines the oldest go.
#[derive(Clone)]
pub struct LogBuffer(Arc<Mutex<Vec<u8>>>);

/// Log bytes kept at most while the view runs.
const LOG_BYTES: usize = 64 * 1024;
/// Lines of the kept log shown after the view at most (the bytes bound comes first).
const LOG_LINES: usize = 200;

static LOG_BUFFER: std::sync::OnceLock<LogBuffer> = std::sync::OnceLock::new();

impl LogBuffer {
    /// The process's one buffer.
    pub fn shared() -> LogBuffer {
        LOG_BUFFER
            .get_or_init(|| LogBuffer(Arc::new(Mutex::new(Vec::new()))))
            .clone()
    }

    /// Prints what was kept to stderr (the last LOG_LINES lines) and empties it.
    pub fn print_to_stderr() {
        let Some(buffer) = LOG_BUFFER.get() else {
            return;
        };
        let Ok(mut bytes) = buffer.0.lock() else {
            return;
        };
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(LOG_LINES);
        for line in &lines[from..] {
            eprintln!("{line}");
        }
        bytes.clear();
    }
}

impl std::io::Write for LogBuffer {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut bytes) = self.0.lock() {
            if bytes.len() + data.len() > LOG_BYTES {
                let cut = (bytes.len() + data.len() - LOG_BYTES).min(bytes.len());
                bytes.drain(..cut);
            }
            bytes.extend_from_slice(&data[data.len().saturating_sub(LOG_BYTES)..]);
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(service: &str, name: &str, ms: u64, error: bool) -> Span {
        Span {
            name: name.into(),
            status: if error {
                SpanStatus::Error
            } else {
                SpanStatus::Unset
            },
            ..Span::for_test(service, SpanKind::Server, ms)
        }
    }

    #[test]
    fn rates_errors_and_quantiles_over_the_window() {
        let mut table = LiveTable::new();
        // 100 requests in second 10: 1 ms each, but one of 100 ms that failed.
        for i in 0..100 {
            let slow = i == 99;
            table.record_at(&span("api", "GET /a", if slow { 100 } else { 1 }, slow), 10);
        }
        // An old second, outside the window by then.
        table.record_at(&span("api", "GET /a", 1, false), 2);
        let rows = table.snapshot_at(12, Duration::from_secs(30));
        assert_eq!(rows.len(), 1);
        let row = &rows[0];
        assert_eq!(row.total, 101);
        assert!(
            (row.requests_per_second - 100.0 / 6.0).abs() < 1e-9,
            "{row:?}"
        );
        assert!((row.error_rate - 0.01).abs() < 1e-9, "{row:?}");
        let p50 = row.p50_ns.unwrap() as f64;
        let p99 = row.p99_ns.unwrap() as f64;
        assert!((p50 / 1e6 - 1.0).abs() < 0.1, "p50 {p50}");
        assert!(
            (p99 / 1e6 - 1.0).abs() < 0.1,
            "p99 is the 99th of 100: {p99}"
        );
        // Later: second 10 has left the window.
        let rows = table.snapshot_at(20, Duration::from_secs(40));
        assert_eq!(rows[0].requests_per_second, 0.0);
        assert_eq!(rows[0].p50_ns, None);
        assert_eq!(rows[0].total, 101);
    }

    #[test]
    fn buckets_are_within_ten_percent() {
        for ns in [
            1_500u64,
            10_000,
            250_000,
            3_000_000,
            42_000_000,
            2_000_000_000,
        ] {
            let middle = bucket_middle_ns(bucket(ns)) as f64;
            assert!((middle / ns as f64 - 1.0).abs() < 0.1, "{ns}: {middle}");
        }
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn rows_are_bounded() {
        let mut table = LiveTable::new();
        for i in 0..(MAX_ROWS + 10) {
            table.record_at(&span("api", &format!("GET /{i}"), 1, false), 0);
        }
        let rows = table.snapshot_at(0, Duration::from_secs(1));
        assert_eq!(rows.len(), MAX_ROWS + 1);
        let other = rows.iter().find(|r| r.name == "(other)").unwrap();
        assert_eq!(other.total, 10);
    }

    #[test]
    fn sorting_and_filtering() {
        let mut table = LiveTable::new();
        for _ in 0..3 {
            table.record_at(&span("api", "GET /busy", 1, false), 0);
        }
        table.record_at(&span("api", "GET /slow", 50, false), 0);
        table.record_at(&span("db", "query", 2, true), 0);
        let rows = table.snapshot_at(0, Duration::from_secs(1));
        let names = |rows: &[RowView]| rows.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
        let mut r = rows.clone();
        arrange(&mut r, SortBy::RequestsPerSecond, false, "");
        assert_eq!(names(&r), ["GET /busy", "GET /slow", "query"]);
        arrange(&mut r, SortBy::P99, false, "");
        assert_eq!(names(&r), ["GET /slow", "query", "GET /busy"]);
        arrange(&mut r, SortBy::ErrorRate, false, "");
        assert_eq!(names(&r)[0], "query");
        arrange(&mut r, SortBy::Name, true, "");
        assert_eq!(names(&r), ["query", "GET /slow", "GET /busy"]);
        arrange(&mut r, SortBy::Total, false, "API");
        assert_eq!(names(&r), ["GET /busy", "GET /slow"]);
    }

    #[test]
    fn short_durations() {
        assert_eq!(short_duration(None), "-");
        assert_eq!(short_duration(Some(850_000)), "850µs");
        assert_eq!(short_duration(Some(12_340_000)), "12.3ms");
        assert_eq!(short_duration(Some(250_000_000)), "250ms");
        assert_eq!(short_duration(Some(1_200_000_000)), "1.20s");
    }

    #[test]
    fn the_log_buffer_keeps_the_last_bytes() {
        let mut buffer = LogBuffer(Arc::new(Mutex::new(Vec::new())));
        buffer.write_all(&vec![b'a'; LOG_BYTES]).unwrap();
        buffer.write_all(b"tail\n").unwrap();
        let bytes = buffer.0.lock().unwrap();
        assert_eq!(bytes.len(), LOG_BYTES);
        assert!(bytes.ends_with(b"tail\n"));
    }
}
