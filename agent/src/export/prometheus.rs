//! Prometheus exposition of the agent's OpenTelemetry metrics: [`render`] turns collected
//! [`ResourceMetrics`] into the text format 0.0.4, and [`serve`] answers `GET /metrics` with it
//! over HTTP/1.1 (hyper) on its own thread, next to the health endpoints `/healthz` and
//! `/readyz` (see [`Health`]) that Kubernetes probes.
//!
//! The translation follows the OpenTelemetry → Prometheus compatibility rules:
//!
//! * Names: every character outside `[a-zA-Z0-9_:]` becomes `_` (a leading digit gets a `_`
//!   prefix), then the unit suffix (`s` → `_seconds`, `ms` → `_milliseconds`, `By` → `_bytes`,
//!   `1` → `_ratio` for gauges only, `{annotations}` dropped, `a/b` → `_a_per_b`, ...) unless
//!   the name already ends with it, then `_total` for monotonic sums.
//! * Types: monotonic cumulative Sum → `counter`, non-monotonic cumulative Sum and Gauge →
//!   `gauge`, cumulative explicit-bucket Histogram → `histogram` (`_bucket` with cumulative counts
//!   ending at `le="+Inf"`, `_sum`, `_count`). Delta data and exponential histograms are skipped.
//! * Labels: `service_name` and `process_pid` from the resource (when present), then the
//!   data-point attributes sorted by sanitized key (keys outside `[a-zA-Z0-9_]` sanitized, a
//!   leading digit prefixed with `_`; attributes whose keys collide after sanitizing are merged,
//!   values joined with `;` in original-key order), then `le` on buckets.
//! * One `target_info` gauge series per distinct non-empty resource, value 1, labelled with all
//!   resource attributes.
//!
//! Families are merged across resources (one `# HELP`/`# TYPE` per family); `target_info` comes
//! first, then families sorted by name; series keep the input order.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use opentelemetry::{Array, Key, Value};
use opentelemetry_sdk::metrics::Temporality;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, Metric, MetricData, ResourceMetrics};

/// `Content-Type` of the text exposition format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Time a scrape connection gets to send its request head (twice that for the whole exchange).
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest request head (request line + headers) the server reads.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// What [`serve`] calls on every scrape to get fresh metrics.
pub type Collector = Arc<dyn Fn() -> Vec<ResourceMetrics> + Send + Sync>;

const SERVICE_NAME: &str = "service.name";
const PROCESS_PID: &str = "process.pid";

// ---------------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric family being assembled: its sample lines, and the label sets already written (a
/// duplicate series would make Prometheus reject the whole scrape).
struct Family {
    kind: Kind,
    help: String,
    lines: String,
    series: HashSet<String>,
}

/// A data-point value: how it is written in a sample line.
trait SampleValue: Copy {
    fn write_to(self, out: &mut String);
}

impl SampleValue for f64 {
    fn write_to(self, out: &mut String) {
        out.push_str(&format_float(self));
    }
}

impl SampleValue for u64 {
    fn write_to(self, out: &mut String) {
        let _ = write!(out, "{self}");
    }
}

impl SampleValue for i64 {
    fn write_to(self, out: &mut String) {
        let _ = write!(out, "{self}");
    }
}

/// Renders every metric of every resource in the Prometheus text exposition format 0.0.4.
pub fn render(metrics: &[ResourceMetrics]) -> String {
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut target_info = String::new();
    let mut targets_seen: HashSet<String> = HashSet::new();

    for rm in metrics {
        let resource = rm.resource();

        let all = merge_labels(resource.iter());
        if !all.is_empty() {
            let labels = label_body(all.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            if targets_seen.insert(labels.clone()) {
                let _ = writeln!(target_info, "target_info{{{labels}}} 1");
            }
        }

        let mut identity: Vec<(String, String)> = Vec::with_capacity(2);
        for (key, label) in [(SERVICE_NAME, "service_name"), (PROCESS_PID, "process_pid")] {
            if let Some(value) = resource.get_ref(&Key::from_static_str(key)) {
                identity.push((label.to_string(), value_string(value)));
            }
        }

        for scope in rm.scope_metrics() {
            for metric in scope.metrics() {
                match metric.data() {
                    AggregatedMetrics::F64(data) => {
                        add_metric(&mut families, &identity, metric, data)
                    }
                    AggregatedMetrics::U64(data) => {
                        add_metric(&mut families, &identity, metric, data)
                    }
                    AggregatedMetrics::I64(data) => {
                        add_metric(&mut families, &identity, metric, data)
                    }
                }
            }
        }
    }

    let mut out = String::new();
    if !target_info.is_empty() {
        out.push_str("# HELP target_info Target metadata\n# TYPE target_info gauge\n");
        out.push_str(&target_info);
    }
    for (name, family) in &families {
        if family.lines.is_empty() {
            continue;
        }
        if !family.help.is_empty() {
            let _ = writeln!(out, "# HELP {name} {}", escape_help(&family.help));
        }
        let _ = writeln!(out, "# TYPE {name} {}", family.kind.as_str());
        out.push_str(&family.lines);
    }
    out
}

fn add_metric<T: SampleValue>(
    families: &mut BTreeMap<String, Family>,
    identity: &[(String, String)],
    metric: &Metric,
    data: &MetricData<T>,
) {
    match data {
        MetricData::Gauge(gauge) => {
            let Some((name, family)) = family(families, metric, Kind::Gauge) else {
                return;
            };
            for point in gauge.data_points() {
                let labels = series_labels(identity, point.attributes(), false);
                write_simple(family, &name, labels, point.value());
            }
        }
        MetricData::Sum(sum) => {
            if sum.temporality() != Temporality::Cumulative {
                log::debug!(
                    "prometheus: skipping {} (sum with {:?} temporality)",
                    metric.name(),
                    sum.temporality()
                );
                return;
            }
            let kind = if sum.is_monotonic() {
                Kind::Counter
            } else {
                Kind::Gauge
            };
            let Some((name, family)) = family(families, metric, kind) else {
                return;
            };
            for point in sum.data_points() {
                let labels = series_labels(identity, point.attributes(), false);
                write_simple(family, &name, labels, point.value());
            }
        }
        MetricData::Histogram(histogram) => {
            if histogram.temporality() != Temporality::Cumulative {
                log::debug!(
                    "prometheus: skipping {} (histogram with {:?} temporality)",
                    metric.name(),
                    histogram.temporality()
                );
                return;
            }
            let Some((name, family)) = family(families, metric, Kind::Histogram) else {
                return;
            };
            for point in histogram.data_points() {
                let labels = series_labels(identity, point.attributes(), true);
                if !family.series.insert(labels.clone()) {
                    log::debug!("prometheus: duplicate series {name}{{{labels}}} skipped");
                    continue;
                }
                let sep = if labels.is_empty() { "" } else { "," };
                let mut cumulative: u64 = 0;
                let mut counts = point.bucket_counts();
                for bound in point.bounds() {
                    cumulative = cumulative.saturating_add(counts.next().unwrap_or(0));
                    let _ = writeln!(
                        family.lines,
                        "{name}_bucket{{{labels}{sep}le=\"{}\"}} {cumulative}",
                        format_float(bound)
                    );
                }
                let count = point.count();
                let _ = writeln!(
                    family.lines,
                    "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}"
                );
                let braced = braced(&labels);
                let _ = write!(family.lines, "{name}_sum{braced} ");
                point.sum().write_to(&mut family.lines);
                family.lines.push('\n');
                let _ = writeln!(family.lines, "{name}_count{braced} {count}");
            }
        }
        MetricData::ExponentialHistogram(_) => {
            log::debug!(
                "prometheus: skipping {} (exponential histograms are not rendered)",
                metric.name()
            );
        }
    }
}

/// The family `metric` belongs to, created on first use; `None` (with a debug log) when the name
/// is taken by a family of another type or by `target_info`.
fn family<'a>(
    families: &'a mut BTreeMap<String, Family>,
    metric: &Metric,
    kind: Kind,
) -> Option<(String, &'a mut Family)> {
    let name = family_name(metric.name(), metric.unit(), kind);
    if name == "target_info" {
        log::debug!(
            "prometheus: skipping {} (name clashes with target_info)",
            metric.name()
        );
        return None;
    }
    let family = families.entry(name.clone()).or_insert_with(|| Family {
        kind,
        help: String::new(),
        lines: String::new(),
        series: HashSet::new(),
    });
    if family.kind != kind {
        log::debug!(
            "prometheus: skipping {} ({} clashes with the {} family {name})",
            metric.name(),
            kind.as_str(),
            family.kind.as_str()
        );
        return None;
    }
    if family.help.is_empty() {
        family.help = metric.description().to_string();
    }
    Some((name, family))
}

fn write_simple<T: SampleValue>(family: &mut Family, name: &str, labels: String, value: T) {
    let line_start = family.lines.len();
    let _ = write!(family.lines, "{name}{} ", braced(&labels));
    if !family.series.insert(labels) {
        family.lines.truncate(line_start);
        log::debug!("prometheus: duplicate series of {name} skipped");
        return;
    }
    value.write_to(&mut family.lines);
    family.lines.push('\n');
}

fn braced(labels: &str) -> String {
    if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    }
}

/// The label body (no braces) of one series: identity labels, then the data-point attributes
/// sorted by sanitized key. Attributes clashing with an identity label (or with `le` on
/// histograms) are dropped.
fn series_labels<'a>(
    identity: &[(String, String)],
    attributes: impl Iterator<Item = &'a opentelemetry::KeyValue>,
    histogram: bool,
) -> String {
    let mut attrs = merge_labels(attributes.map(|kv| (&kv.key, &kv.value)));
    for (key, _) in identity {
        if attrs.remove(key).is_some() {
            log::debug!("prometheus: data-point attribute {key} hidden by the resource label");
        }
    }
    if histogram && attrs.remove("le").is_some() {
        log::debug!("prometheus: data-point attribute le dropped from a histogram");
    }
    label_body(
        identity
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(attrs.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
    )
}

/// Attributes as labels keyed by sanitized key (so sorted by it). Keys that collide after
/// sanitizing get their values joined with `;`, in original-key order. Empty keys are dropped.
fn merge_labels<'a>(
    attributes: impl Iterator<Item = (&'a Key, &'a Value)>,
) -> BTreeMap<String, String> {
    let mut sorted: Vec<(&Key, &Value)> = attributes.collect();
    sorted.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
    let mut labels: BTreeMap<String, String> = BTreeMap::new();
    for (key, value) in sorted {
        let Some(name) = sanitize_label_name(key.as_str()) else {
            continue;
        };
        let value = value_string(value);
        labels
            .entry(name)
            .and_modify(|existing| {
                existing.push(';');
                existing.push_str(&value);
            })
            .or_insert(value);
    }
    labels
}

/// `k1="v1",k2="v2"` with values escaped.
fn label_body<'a>(labels: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::new();
    for (i, (key, value)) in labels.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(key);
        out.push_str("=\"");
        escape_label_value_into(value, &mut out);
        out.push('"');
    }
    out
}

/// An attribute value as a label value (unescaped): ints without decimals, bools `true`/`false`,
/// floats via [`format_float`], arrays as JSON.
fn value_string(value: &Value) -> String {
    match value {
        Value::Bool(b) => b.to_string(),
        Value::I64(i) => i.to_string(),
        Value::F64(f) => format_float(*f),
        Value::String(s) => s.as_str().to_string(),
        Value::Array(array) => array_json(array),
        other => other.to_string(),
    }
}

fn array_json(array: &Array) -> String {
    fn join<T>(items: &[T], f: impl Fn(&T) -> String) -> String {
        let parts: Vec<String> = items.iter().map(f).collect();
        format!("[{}]", parts.join(","))
    }
    match array {
        Array::Bool(v) => join(v, |b| b.to_string()),
        Array::I64(v) => join(v, |i| i.to_string()),
        Array::F64(v) => join(v, |f| {
            if f.is_finite() {
                format_float(*f)
            } else {
                format!("\"{}\"", format_float(*f))
            }
        }),
        Array::String(v) => join(v, |s| json_string(s.as_str())),
        other => other.to_string(),
    }
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Prometheus family name of an OTel instrument: sanitized name, unit suffix, `_total` for
/// counters.
fn family_name(name: &str, unit: &str, kind: Kind) -> String {
    let mut out = sanitize_metric_name(name);
    if kind == Kind::Counter && out.len() > "_total".len() && out.ends_with("_total") {
        out.truncate(out.len() - "_total".len());
    }
    let suffix = unit_suffix(unit, kind == Kind::Gauge);
    if !suffix.is_empty() && !out.ends_with(&format!("_{suffix}")) {
        out.push('_');
        out.push_str(&suffix);
    }
    if kind == Kind::Counter {
        out.push_str("_total");
    }
    out
}

/// Every character outside `[a-zA-Z0-9_:]` becomes `_`; a leading digit gets a `_` prefix.
fn sanitize_metric_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 1);
    if name.starts_with(|c: char| c.is_ascii_digit()) {
        out.push('_');
    }
    out.extend(name.chars().map(|c| {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            c
        } else {
            '_'
        }
    }));
    if out.is_empty() {
        out.push('_');
    }
    out
}

/// Every character outside `[a-zA-Z0-9_]` becomes `_` (label names allow no `:`); a leading
/// digit gets a `_` prefix. `None` for an empty key.
fn sanitize_label_name(key: &str) -> Option<String> {
    if key.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(key.len() + 1);
    if key.starts_with(|c: char| c.is_ascii_digit()) {
        out.push('_');
    }
    out.extend(key.chars().map(|c| {
        if c.is_ascii_alphanumeric() || c == '_' {
            c
        } else {
            '_'
        }
    }));
    Some(out)
}

/// The suffix (without the leading `_`) for a UCUM unit; empty when none applies.
fn unit_suffix(unit: &str, gauge: bool) -> String {
    let stripped = strip_annotations(unit);
    let unit = stripped.trim();
    if unit.is_empty() {
        return String::new();
    }
    if unit == "1" {
        return if gauge {
            "ratio".to_string()
        } else {
            String::new()
        };
    }
    match unit.split_once('/') {
        Some((num, den)) => {
            let num = num.trim();
            let num = if num == "1" {
                String::new()
            } else {
                main_unit(num)
            };
            let den = per_unit(den.trim());
            match (num.is_empty(), den.is_empty()) {
                (_, true) => num,
                (true, false) => format!("per_{den}"),
                (false, false) => format!("{num}_per_{den}"),
            }
        }
        None => main_unit(unit),
    }
}

/// `unit` without its `{...}` annotations.
fn strip_annotations(unit: &str) -> String {
    let mut out = String::with_capacity(unit.len());
    let mut depth = 0usize;
    for c in unit.chars() {
        match c {
            '{' => depth += 1,
            '}' if depth > 0 => depth -= 1,
            c if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

fn main_unit(unit: &str) -> String {
    let known = match unit {
        "d" => "days",
        "h" => "hours",
        "min" => "minutes",
        "s" => "seconds",
        "ms" => "milliseconds",
        "us" => "microseconds",
        "ns" => "nanoseconds",
        "By" => "bytes",
        "KiBy" => "kibibytes",
        "MiBy" => "mebibytes",
        "GiBy" => "gibibytes",
        "TiBy" => "tebibytes",
        "KBy" => "kilobytes",
        "MBy" => "megabytes",
        "GBy" => "gigabytes",
        "TBy" => "terabytes",
        "m" => "meters",
        "V" => "volts",
        "A" => "amperes",
        "J" => "joules",
        "W" => "watts",
        "g" => "grams",
        "Cel" => "celsius",
        "Hz" => "hertz",
        "%" => "percent",
        _ => return sanitize_unit(unit),
    };
    known.to_string()
}

fn per_unit(unit: &str) -> String {
    let known = match unit {
        "s" => "second",
        "m" => "minute",
        "h" => "hour",
        "d" => "day",
        "w" => "week",
        "mo" => "month",
        "y" => "year",
        _ => return main_unit(unit),
    };
    known.to_string()
}

/// An unknown unit, reduced to `[a-zA-Z0-9_]` with no leading/trailing `_`.
fn sanitize_unit(unit: &str) -> String {
    let out: String = unit
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    out.trim_matches('_').to_string()
}

/// Rust's shortest round-trip representation (`1`, `0.005`, `2.5`), `NaN`, `+Inf`, `-Inf`.
fn format_float(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_string()
    } else if value == f64::INFINITY {
        "+Inf".to_string()
    } else if value == f64::NEG_INFINITY {
        "-Inf".to_string()
    } else {
        format!("{value}")
    }
}

fn escape_label_value_into(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// `# HELP` text: backslash and newline escaped.
fn escape_help(help: &str) -> String {
    let mut out = String::with_capacity(help.len());
    for c in help.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Health
// ---------------------------------------------------------------------------------------------

/// How long the event loop may go without a pass before `/healthz` reports it stuck. A pass
/// happens at least every 20 ms (the ring's poll interval), so 10 s means it is wedged, not busy.
pub const LIVENESS_WINDOW: Duration = Duration::from_secs(10);

/// The agent's health as the `/healthz` (liveness) and `/readyz` (readiness) endpoints report
/// it. Shared by `Arc`: the event loop writes it, the metrics server reads it. Two atomics, so
/// recording a pass costs the loop one coarse clock read (vDSO, no syscall) and one store.
#[derive(Debug, Default)]
pub struct Health {
    /// Every probe is attached and the pipeline runs.
    ready: AtomicBool,
    /// `CLOCK_MONOTONIC_COARSE` at the event loop's last pass, in ns; 0 before the first one.
    last_pass_ns: AtomicU64,
}

impl Health {
    pub fn new() -> Self {
        Self::default()
    }

    /// Ready once every probe is attached and the pipeline started; not ready again when the
    /// agent stops. Becoming ready counts as a pass of the event loop, which starts right after.
    pub fn set_ready(&self, ready: bool) {
        if ready {
            self.record_pass();
        }
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Called by the event loop on every pass.
    pub fn record_pass(&self) {
        self.record_pass_at(coarse_monotonic_ns());
    }

    fn record_pass_at(&self, now_ns: u64) {
        // max(1): 0 means "never".
        self.last_pass_ns.store(now_ns.max(1), Ordering::Relaxed);
    }

    /// Time since the event loop's last pass; `None` before the first one.
    pub fn since_last_pass(&self) -> Option<Duration> {
        self.since_last_pass_at(coarse_monotonic_ns())
    }

    fn since_last_pass_at(&self, now_ns: u64) -> Option<Duration> {
        match self.last_pass_ns.load(Ordering::Relaxed) {
            0 => None,
            last => Some(Duration::from_nanos(now_ns.saturating_sub(last))),
        }
    }
}

/// `CLOCK_MONOTONIC_COARSE` in ns: the last tick's time (1-4 ms resolution), read from the vDSO
/// without a syscall, which is all a 10 s liveness window needs.
fn coarse_monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid pointer to a timespec; this clock exists on every Linux since 2.6.32.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/// Serves `GET /metrics`, `/healthz` and `/readyz` (and `HEAD`) on `address` (port 0: any free
/// port) with hyper (HTTP/1.1),
/// from a thread named `kspan-prometheus` running a small tokio runtime. Connections are served
/// side by side, so a slow or silent client never stalls a scrape: each gets 5 s to send its
/// request head (8 KiB at most), one request, and at most [`MAX_CONNECTIONS`] are open at once
/// (more wait in the listen backlog). Every scrape calls `collect` and answers with
/// [`render`]`(collect())`. Returns the bound address and the thread's handle; the thread runs
/// for the life of the process.
///
/// Answers: `200` on `/metrics` (query strings allowed); on `/healthz` `200` while `health` is
/// live, else `503`; on `/readyz` `200` while `health` is ready, else `503`; `404` on any other
/// path, `405` on any method but `GET`/`HEAD`, `500` when `collect` panics; hyper itself answers
/// `400` to a malformed request and `431` to a head too large, and closes a connection whose
/// head does not arrive in time.
pub fn serve(
    address: SocketAddr,
    collect: Collector,
    health: Arc<Health>,
) -> io::Result<(SocketAddr, JoinHandle<()>)> {
    serve_with_timeout(address, collect, health, IO_TIMEOUT)
}

/// Scrape connections served at once.
pub const MAX_CONNECTIONS: usize = 64;

fn serve_with_timeout(
    address: SocketAddr,
    collect: Collector,
    health: Arc<Health>,
    timeout: Duration,
) -> io::Result<(SocketAddr, JoinHandle<()>)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let listener = std::net::TcpListener::bind(address)?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let handle = std::thread::Builder::new()
        .name("kspan-prometheus".to_string())
        .spawn(move || {
            runtime.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => accept_loop(listener, collect, health, timeout).await,
                    Err(err) => log::warn!("prometheus: cannot listen: {err}"),
                }
            })
        })?;
    Ok((bound, handle))
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    collect: Collector,
    health: Arc<Health>,
    timeout: Duration,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                log::warn!("prometheus: accept failed: {err}");
                // Persistent errors (EMFILE) would otherwise spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let collect = collect.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let collect = collect.clone();
                let health = health.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&request, &*collect, &health)) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(timeout)
                .max_buf_size(MAX_REQUEST_HEAD)
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            // Bounds the whole exchange, writing included, against a client that never reads.
            match tokio::time::timeout(2 * timeout, connection).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => log::debug!("prometheus: connection from {peer}: {err}"),
                Err(_) => log::debug!("prometheus: connection from {peer} timed out"),
            }
            drop(slot);
        });
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics { head_only: bool },
    Liveness,
    Readiness,
    NotFound,
    MethodNotAllowed,
}

fn route(method: &hyper::Method, path: &str) -> Route {
    let head_only = match *method {
        hyper::Method::GET => false,
        hyper::Method::HEAD => true,
        _ if matches!(path, "/metrics" | "/healthz" | "/readyz") => {
            return Route::MethodNotAllowed;
        }
        _ => return Route::NotFound,
    };
    match path {
        "/metrics" => Route::Metrics { head_only },
        "/healthz" => Route::Liveness,
        "/readyz" => Route::Readiness,
        _ => Route::NotFound,
    }
}

fn answer<B>(
    request: &hyper::Request<B>,
    collect: &(dyn Fn() -> Vec<ResourceMetrics> + Send + Sync),
    health: &Health,
) -> hyper::Response<String> {
    match route(request.method(), request.uri().path()) {
        Route::NotFound => response(404, "not found\n", &[]),
        Route::MethodNotAllowed => response(405, "method not allowed\n", &[("Allow", "GET, HEAD")]),
        Route::Liveness => match health.since_last_pass() {
            Some(age) if age <= LIVENESS_WINDOW => response(200, "ok\n", &[]),
            Some(age) => response(
                503,
                &format!(
                    "the event loop made no pass for {:.1} s (limit {} s): kspan is stuck\n",
                    age.as_secs_f64(),
                    LIVENESS_WINDOW.as_secs()
                ),
                &[],
            ),
            None => response(503, "the event loop has not started yet\n", &[]),
        },
        Route::Readiness if health.is_ready() => response(200, "ready\n", &[]),
        Route::Readiness => response(
            503,
            "not ready: probes are being attached, or kspan is stopping\n",
            &[],
        ),
        // hyper sends no body to a HEAD request, and keeps its Content-Length.
        Route::Metrics { .. } => match catch_unwind(AssertUnwindSafe(|| render(&collect()))) {
            Ok(body) => response(200, &body, &[("Content-Type", CONTENT_TYPE)]),
            Err(_) => {
                log::warn!("prometheus: metrics collection panicked");
                response(500, "metrics collection failed\n", &[])
            }
        },
    }
}

/// A plain-text response, unless `headers` name another `Content-Type`.
fn response(status: u16, body: &str, headers: &[(&str, &str)]) -> hyper::Response<String> {
    let mut builder = hyper::Response::builder().status(status);
    if !headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("content-type"))
    {
        builder = builder.header(hyper::header::CONTENT_TYPE, "text/plain; charset=utf-8");
    }
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
        .body(body.to_string())
        .unwrap_or_else(|_| hyper::Response::new(String::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    use opentelemetry::KeyValue;
    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::metrics::reader::MetricReader;
    use opentelemetry_sdk::metrics::{ManualReader, SdkMeterProvider};

    use crate::metrics::{DURATION_BOUNDARIES as BOUNDARIES, SharedReader};
    use std::io::{Read, Write};
    use std::net::TcpStream;

    /// A provider for `attributes` plus the reader to collect from.
    fn provider(
        attributes: Vec<KeyValue>,
        reader: ManualReader,
    ) -> (SdkMeterProvider, SharedReader) {
        let reader = SharedReader(Arc::new(reader));
        let provider = SdkMeterProvider::builder()
            .with_resource(
                Resource::builder_empty()
                    .with_attributes(attributes)
                    .build(),
            )
            .with_reader(reader.clone())
            .build();
        (provider, reader)
    }

    fn collect(reader: &SharedReader) -> ResourceMetrics {
        let mut rm = ResourceMetrics::default();
        reader.collect(&mut rm).expect("collect");
        rm
    }

    fn service(name: &'static str, pid: i64) -> Vec<KeyValue> {
        vec![
            KeyValue::new("service.name", name),
            KeyValue::new("process.pid", pid),
        ]
    }

    /// Two resources: "a"/1 with four requests and 5 events, "b"/2 with one request and 7.
    fn two_services() -> Vec<(SdkMeterProvider, SharedReader)> {
        let mut out = Vec::new();
        for (name, pid, durations, events) in [
            ("a", 1, &[0.00390625, 0.015625, 0.25, 20.0][..], 5u64),
            ("b", 2, &[0.05][..], 7u64),
        ] {
            let (provider, reader) = provider(service(name, pid), ManualReader::builder().build());
            let meter = provider.meter("kspan");
            let histogram = meter
                .f64_histogram("http.server.request.duration")
                .with_unit("s")
                .with_description("Duration of HTTP server requests.")
                .with_boundaries(BOUNDARIES.to_vec())
                .build();
            let attrs = [
                KeyValue::new("http.request.method", "GET"),
                KeyValue::new("http.response.status_code", 200i64),
            ];
            for &d in durations {
                histogram.record(d, &attrs);
            }
            let counter = meter
                .u64_counter("kspan.events.received")
                .with_unit("{event}")
                .with_description("Events \\ received\nfrom the ring buffer.")
                .build();
            counter.add(events, &[]);
            out.push((provider, reader));
        }
        out
    }

    const TWO_SERVICES: &str = r#"# HELP target_info Target metadata
# TYPE target_info gauge
target_info{process_pid="1",service_name="a"} 1
target_info{process_pid="2",service_name="b"} 1
# HELP http_server_request_duration_seconds Duration of HTTP server requests.
# TYPE http_server_request_duration_seconds histogram
http_server_request_duration_seconds_bucket{service_name="a",process_pid="1",http_request_method="GET",http_response_status_code="200",le="0.005"} 1
http_server_request_duration_seconds_bucket{service_name="a",process_pid="1",http_request_method="GET",http_response_status_code="200",le="0.01"} 1
http_server_request_duration_seconds_bucket{service_name="a",process_pid="1",http_request_method="GET",http_response_status_code="200",le="0.025"} 2
http_server_request_duration_seconds_bucket{service_name="a",process_pid="1",http_request_method="GET",http_response_status_code="200",le="0.05"} 2
http_server_request_duration_seconds_bucket{service_name="a",process_pid="1",http_request_method="GET",http_response_status_code="200",le="0.075"} 2
http_server_request_duration_seconds_bucket{service_name="a",process_pid="1",http_request_method="GET",http_response_status_code="200",le="0.1"} 2
http_server_request_duration_seconds_bucket{service_name="a",process_pid="1",http_request_method="GET",http_response_status_code="200",le="0.25"} 3
http_server_request_duration_seconds_bucket{service_name="a",process_pid="1",http_request_method="GET",http_response_status_code="200",le="0.5"} 3
http_server_request_duration_seconds_bucket{service_name="a",process_pid="1",http_request_method="GET",http_response_status_code="200",le="0.75"} 3
http_server_request_duration_seconds_bucket{service_name="a",process_pid="1",http_request_method="GET",http_response_status_code="200",le="1"} 3
http_server_request_duration_seconds_bucket{service_name="a",process_pid="1",http_request_method="GET",http_response_status_code="200",le="2.5"} 3
http_server_request_duration_seconds_bucket{service_name="a",process_pid="1",http_request_method="GET",http_response_status_code="200",le="5"} 3
http_server_request_duration_seconds_bucket{service_name="a",process_pid="1",http_request_method="GET",http_response_status_code="200",le="7.5"} 3
http_server_request_duration_seconds_bucket{service_name="a",process_pid="1",http_request_method="GET",http_response_status_code="200",le="10"} 3
http_server_request_duration_seconds_bucket{service_name="a",process_pid="1",http_request_method="GET",http_response_status_code="200",le="+Inf"} 4
http_server_request_duration_seconds_sum{service_name="a",process_pid="1",http_request_method="GET",http_response_status_code="200"} 20.26953125
http_server_request_duration_seconds_count{service_name="a",process_pid="1",http_request_method="GET",http_response_status_code="200"} 4
http_server_request_duration_seconds_bucket{service_name="b",process_pid="2",http_request_method="GET",http_response_status_code="200",le="0.005"} 0
http_server_request_duration_seconds_bucket{service_name="b",process_pid="2",http_request_method="GET",http_response_status_code="200",le="0.01"} 0
http_server_request_duration_seconds_bucket{service_name="b",process_pid="2",http_request_method="GET",http_response_status_code="200",le="0.025"} 0
http_server_request_duration_seconds_bucket{service_name="b",process_pid="2",http_request_method="GET",http_response_status_code="200",le="0.05"} 1
http_server_request_duration_seconds_bucket{service_name="b",process_pid="2",http_request_method="GET",http_response_status_code="200",le="0.075"} 1
http_server_request_duration_seconds_bucket{service_name="b",process_pid="2",http_request_method="GET",http_response_status_code="200",le="0.1"} 1
http_server_request_duration_seconds_bucket{service_name="b",process_pid="2",http_request_method="GET",http_response_status_code="200",le="0.25"} 1
http_server_request_duration_seconds_bucket{service_name="b",process_pid="2",http_request_method="GET",http_response_status_code="200",le="0.5"} 1
http_server_request_duration_seconds_bucket{service_name="b",process_pid="2",http_request_method="GET",http_response_status_code="200",le="0.75"} 1
http_server_request_duration_seconds_bucket{service_name="b",process_pid="2",http_request_method="GET",http_response_status_code="200",le="1"} 1
http_server_request_duration_seconds_bucket{service_name="b",process_pid="2",http_request_method="GET",http_response_status_code="200",le="2.5"} 1
http_server_request_duration_seconds_bucket{service_name="b",process_pid="2",http_request_method="GET",http_response_status_code="200",le="5"} 1
http_server_request_duration_seconds_bucket{service_name="b",process_pid="2",http_request_method="GET",http_response_status_code="200",le="7.5"} 1
http_server_request_duration_seconds_bucket{service_name="b",process_pid="2",http_request_method="GET",http_response_status_code="200",le="10"} 1
http_server_request_duration_seconds_bucket{service_name="b",process_pid="2",http_request_method="GET",http_response_status_code="200",le="+Inf"} 1
http_server_request_duration_seconds_sum{service_name="b",process_pid="2",http_request_method="GET",http_response_status_code="200"} 0.05
http_server_request_duration_seconds_count{service_name="b",process_pid="2",http_request_method="GET",http_response_status_code="200"} 1
# HELP kspan_events_received_total Events \\ received\nfrom the ring buffer.
# TYPE kspan_events_received_total counter
kspan_events_received_total{service_name="a",process_pid="1"} 5
kspan_events_received_total{service_name="b",process_pid="2"} 7
"#;

    #[test]
    fn renders_two_resources_exactly() {
        let services = two_services();
        let metrics: Vec<ResourceMetrics> = services.iter().map(|(_, r)| collect(r)).collect();
        let text = render(&metrics);
        assert_eq!(text, TWO_SERVICES, "\n--- got ---\n{text}");
        // One HELP/TYPE per family even with two resources.
        for family in [
            "target_info",
            "http_server_request_duration_seconds",
            "kspan_events_received_total",
        ] {
            assert_eq!(
                text.matches(&format!("# TYPE {family} ")).count(),
                1,
                "{family}"
            );
            assert_eq!(
                text.matches(&format!("# HELP {family} ")).count(),
                1,
                "{family}"
            );
        }
    }

    #[test]
    fn escapes_labels_and_sanitizes_keys() {
        let (provider, reader) = provider(
            vec![
                KeyValue::new("service.name", "svc \"x\""),
                KeyValue::new("host.name", "h1"),
                KeyValue::new("2nd-key", true),
            ],
            ManualReader::builder().build(),
        );
        let meter = provider.meter("kspan");
        let gauge = meter.f64_gauge("kspan.queue.fill").with_unit("1").build();
        gauge.record(
            0.5,
            &[
                KeyValue::new("path", "C:\\dir \"q\"\nnext"),
                KeyValue::new("1st.key", 1.5),
                KeyValue::new("ok", false),
                KeyValue::new("service.name", "shadowed"),
            ],
        );
        let updown = meter
            .i64_up_down_counter("kspan.connections.open")
            .with_unit("{connection}")
            .build();
        updown.add(-3, &[KeyValue::new("le", "kept: not a histogram")]);
        let text = render(&[collect(&reader)]);
        let expected = concat!(
            "# HELP target_info Target metadata\n",
            "# TYPE target_info gauge\n",
            "target_info{_2nd_key=\"true\",host_name=\"h1\",service_name=\"svc \\\"x\\\"\"} 1\n",
            "# TYPE kspan_connections_open gauge\n",
            "kspan_connections_open{service_name=\"svc \\\"x\\\"\",le=\"kept: not a histogram\"} -3\n",
            "# TYPE kspan_queue_fill_ratio gauge\n",
            "kspan_queue_fill_ratio{service_name=\"svc \\\"x\\\"\",_1st_key=\"1.5\",ok=\"false\",",
            "path=\"C:\\\\dir \\\"q\\\"\\nnext\"} 0.5\n",
        );
        assert_eq!(text, expected, "\n--- got ---\n{text}");
    }

    #[test]
    fn skips_delta_sums_but_keeps_gauges() {
        let reader = ManualReader::builder()
            .with_temporality(Temporality::Delta)
            .build();
        let (provider, reader) = provider(service("d", 9), reader);
        let meter = provider.meter("kspan");
        meter
            .u64_counter("kspan.events.received")
            .build()
            .add(1, &[]);
        meter
            .f64_histogram("http.server.request.duration")
            .with_unit("s")
            .build()
            .record(0.1, &[]);
        meter
            .u64_gauge("kspan.maps.entries")
            .build()
            .record(42, &[]);
        let text = render(&[collect(&reader)]);
        assert_eq!(
            text,
            "# HELP target_info Target metadata\n# TYPE target_info gauge\n\
             target_info{process_pid=\"9\",service_name=\"d\"} 1\n\
             # TYPE kspan_maps_entries gauge\n\
             kspan_maps_entries{service_name=\"d\",process_pid=\"9\"} 42\n"
        );
    }

    #[test]
    fn empty_input_renders_nothing() {
        assert_eq!(render(&[]), "");
        assert_eq!(render(&[ResourceMetrics::default()]), "");
    }

    #[test]
    fn names_and_units() {
        assert_eq!(
            sanitize_metric_name("http.server.request.duration"),
            "http_server_request_duration"
        );
        assert_eq!(sanitize_metric_name("a-b/c:d é"), "a_b_c:d__");
        assert_eq!(sanitize_metric_name("9lives"), "_9lives");
        assert_eq!(
            sanitize_label_name("net.peer:port").as_deref(),
            Some("net_peer_port")
        );
        assert_eq!(sanitize_label_name("1st").as_deref(), Some("_1st"));
        assert_eq!(sanitize_label_name(""), None);

        assert_eq!(
            family_name("kspan.events.received", "{event}", Kind::Counter),
            "kspan_events_received_total"
        );
        assert_eq!(family_name("rx", "By", Kind::Counter), "rx_bytes_total");
        assert_eq!(
            family_name("rx_bytes_total", "By", Kind::Counter),
            "rx_bytes_total"
        );
        assert_eq!(family_name("lag", "ms", Kind::Gauge), "lag_milliseconds");
        assert_eq!(
            family_name("lag_seconds", "s", Kind::Histogram),
            "lag_seconds"
        );
        assert_eq!(family_name("util", "1", Kind::Gauge), "util_ratio");
        assert_eq!(family_name("util", "1", Kind::Counter), "util_total");
        assert_eq!(
            family_name("rate", "{packet}/s", Kind::Gauge),
            "rate_per_second"
        );
        assert_eq!(
            family_name("tput", "By/s", Kind::Gauge),
            "tput_bytes_per_second"
        );
        assert_eq!(family_name("odd", "furlong{x}", Kind::Gauge), "odd_furlong");
        assert_eq!(family_name("odd", "{unbalanced", Kind::Gauge), "odd");
    }

    #[test]
    fn value_formatting() {
        for (value, want) in [
            (1.0, "1"),
            (10.0, "10"),
            (0.005, "0.005"),
            (0.075, "0.075"),
            (2.5, "2.5"),
            (0.0123, "0.0123"),
            (f64::NAN, "NaN"),
            (f64::INFINITY, "+Inf"),
            (f64::NEG_INFINITY, "-Inf"),
        ] {
            assert_eq!(format_float(value), want);
        }
        assert_eq!(value_string(&Value::I64(-7)), "-7");
        assert_eq!(value_string(&Value::Bool(true)), "true");
        assert_eq!(
            value_string(&Value::Array(Array::String(vec!["a\"".into(), "b".into()]))),
            r#"["a\"","b"]"#
        );
        assert_eq!(escape_help("a\\b\nc \"d\""), "a\\\\b\\nc \"d\"");
    }

    #[test]
    fn routes_requests() {
        use hyper::Method;
        assert_eq!(
            route(&Method::GET, "/metrics"),
            Route::Metrics { head_only: false }
        );
        assert_eq!(
            route(&Method::HEAD, "/metrics"),
            Route::Metrics { head_only: true }
        );
        assert_eq!(route(&Method::GET, "/metrics/"), Route::NotFound);
        assert_eq!(route(&Method::GET, "/"), Route::NotFound);
        assert_eq!(route(&Method::POST, "/metrics"), Route::MethodNotAllowed);
        assert_eq!(route(&Method::GET, "/healthz"), Route::Liveness);
        assert_eq!(route(&Method::HEAD, "/readyz"), Route::Readiness);
        assert_eq!(route(&Method::PUT, "/readyz"), Route::MethodNotAllowed);
        assert_eq!(route(&Method::POST, "/elsewhere"), Route::NotFound);
        assert_eq!(route(&Method::GET, "/healthz/"), Route::NotFound);
    }

    fn health() -> Arc<Health> {
        Arc::new(Health::new())
    }

    fn loopback() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    /// Sends `request`, returns everything the server answers until it closes.
    fn exchange(port: u16, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(request).expect("write");
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).expect("read");
        String::from_utf8(answer).expect("utf-8 answer")
    }

    fn split_response(response: &str) -> (&str, &str) {
        response
            .split_once("\r\n\r\n")
            .expect("head/body separator")
    }

    /// Header lookup in a response head, names case-insensitive.
    fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
        head.lines().skip(1).find_map(|line| {
            let (k, v) = line.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    #[test]
    fn serves_metrics_over_http() {
        let services = two_services();
        let collector: Collector =
            Arc::new(move || services.iter().map(|(_, r)| collect(r)).collect());
        let (bound, handle) =
            serve_with_timeout(loopback(), collector, health(), Duration::from_millis(200))
                .expect("serve");
        let port = bound.port();
        assert_ne!(port, 0);
        assert!(bound.ip().is_loopback(), "{bound}");
        assert_eq!(handle.thread().name(), Some("kspan-prometheus"));

        let answer = exchange(port, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n");
        let (head, body) = split_response(&answer);
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert_eq!(header(head, "content-type"), Some(CONTENT_TYPE), "{head}");
        assert_eq!(
            header(head, "content-length"),
            Some(body.len().to_string().as_str()),
            "{head}"
        );
        assert_eq!(header(head, "connection"), Some("close"), "{head}");
        assert_eq!(body, TWO_SERVICES);

        let answer = exchange(port, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n");
        assert!(answer.starts_with("HTTP/1.0 200 OK\r\n"), "{answer}");
        let answer = exchange(port, b"GET http://h:9/metrics HTTP/1.1\r\nHost: h\r\n\r\n");
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");

        let answer = exchange(port, b"HEAD /metrics HTTP/1.1\r\nHost: h\r\n\r\n");
        let (head, body) = split_response(&answer);
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert_eq!(body, "");

        let answer = exchange(port, b"GET /other HTTP/1.1\r\nHost: h\r\n\r\n");
        assert!(answer.starts_with("HTTP/1.1 404 Not Found\r\n"), "{answer}");

        let answer = exchange(
            port,
            b"POST /metrics HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n",
        );
        let (head, _) = split_response(&answer);
        assert!(
            head.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{answer}"
        );
        assert_eq!(header(head, "allow"), Some("GET, HEAD"), "{head}");

        let answer = exchange(port, b"garbage\r\n\r\n");
        assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");

        let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        huge.resize(4 * MAX_REQUEST_HEAD, b'G');
        let answer = exchange(port, &huge);
        assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");

        // A client that closes at once, one that sends nothing, one that stalls mid-head: the
        // server closes them and keeps answering.
        drop(TcpStream::connect(("127.0.0.1", port)).expect("connect"));
        assert_eq!(exchange(port, b""), "");
        assert_eq!(exchange(port, b"GET /metr"), "");

        let answer = exchange(port, b"GET /metrics HTTP/1.1\r\nHost: h\r\n\r\n");
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(!handle.is_finished());
    }

    /// Silent clients holding connections open (up to all but one slot) never delay a scrape:
    /// it is answered while they still wait for their timeout.
    #[test]
    fn silent_clients_do_not_stall_a_scrape() {
        let collector: Collector = Arc::new(Vec::new);
        let timeout = Duration::from_secs(30);
        let (bound, _handle) =
            serve_with_timeout(loopback(), collector, health(), timeout).expect("serve");
        let silent: Vec<TcpStream> = (0..MAX_CONNECTIONS - 1)
            .map(|_| TcpStream::connect(bound).expect("connect"))
            .collect();
        let started = std::time::Instant::now();
        let answer = exchange(bound.port(), b"GET /metrics HTTP/1.1\r\nHost: h\r\n\r\n");
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(
            started.elapsed() < timeout / 2,
            "the scrape waited for the silent clients: {:?}",
            started.elapsed()
        );
        // They are still open: the scrape did not get through by them timing out.
        let mut first = &silent[0];
        first.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        assert_eq!(
            first.read(&mut byte).map_err(|e| e.kind()),
            Err(io::ErrorKind::WouldBlock)
        );
    }

    #[test]
    fn collector_panic_is_a_500() {
        let collector: Collector = Arc::new(|| panic!("collector failure (expected by the test)"));
        let (bound, _handle) =
            serve_with_timeout(loopback(), collector, health(), Duration::from_millis(200))
                .expect("serve");
        let port = bound.port();
        let answer = exchange(port, b"GET /metrics HTTP/1.1\r\nHost: h\r\n\r\n");
        assert!(answer.starts_with("HTTP/1.1 500 "), "{answer}");
        let answer = exchange(port, b"GET /nope HTTP/1.1\r\nHost: h\r\n\r\n");
        assert!(answer.starts_with("HTTP/1.1 404 "), "{answer}");
    }

    /// Status line and body of a GET of `path`.
    fn get(port: u16, path: &str) -> (String, String) {
        let answer = exchange(
            port,
            format!("GET {path} HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes(),
        );
        let (head, body) = split_response(&answer);
        let status = head.lines().next().unwrap_or_default().to_string();
        (status, body.to_string())
    }

    /// `/readyz` follows the ready flag; `/healthz` the age of the event loop's last pass:
    /// 503 before the first, 200 within the window, 503 past it, 200 again after a new pass.
    #[test]
    fn serves_health_over_http() {
        let health = health();
        let collector: Collector = Arc::new(Vec::new);
        let (bound, _handle) = serve_with_timeout(
            loopback(),
            collector,
            health.clone(),
            Duration::from_millis(200),
        )
        .expect("serve");
        let port = bound.port();

        // Starting: probes are being attached, the event loop has not run.
        let (status, body) = get(port, "/readyz");
        assert_eq!(status, "HTTP/1.1 503 Service Unavailable", "{body}");
        assert!(body.starts_with("not ready"), "{body}");
        let (status, body) = get(port, "/healthz");
        assert_eq!(status, "HTTP/1.1 503 Service Unavailable", "{body}");
        assert_eq!(body, "the event loop has not started yet\n");

        // Ready: becoming ready counts as a pass.
        health.set_ready(true);
        assert_eq!(
            get(port, "/readyz"),
            ("HTTP/1.1 200 OK".into(), "ready\n".into())
        );
        assert_eq!(
            get(port, "/healthz"),
            ("HTTP/1.1 200 OK".into(), "ok\n".into())
        );
        let answer = exchange(port, b"HEAD /healthz HTTP/1.1\r\nHost: h\r\n\r\n");
        let (head, body) = split_response(&answer);
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert_eq!(
            header(head, "content-type"),
            Some("text/plain; charset=utf-8")
        );
        assert_eq!(body, "");

        // The last pass was 11 s ago: the loop is stuck, still "ready".
        let stale = coarse_monotonic_ns() - 11_000_000_000;
        health.record_pass_at(stale);
        let (status, body) = get(port, "/healthz");
        assert_eq!(status, "HTTP/1.1 503 Service Unavailable", "{body}");
        assert!(
            body.starts_with("the event loop made no pass for 11.") && body.contains("stuck"),
            "{body}"
        );
        assert_eq!(get(port, "/readyz").0, "HTTP/1.1 200 OK");

        // 9 s ago is within the window; a pass now, of course.
        health.record_pass_at(coarse_monotonic_ns() - 9_000_000_000);
        assert_eq!(get(port, "/healthz").0, "HTTP/1.1 200 OK");
        health.record_pass();
        assert_eq!(get(port, "/healthz").0, "HTTP/1.1 200 OK");

        // Stopping: not ready any more.
        health.set_ready(false);
        assert_eq!(get(port, "/readyz").0, "HTTP/1.1 503 Service Unavailable");
        assert_eq!(get(port, "/healthz").0, "HTTP/1.1 200 OK");

        let answer = exchange(
            port,
            b"POST /readyz HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n",
        );
        assert!(
            answer.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{answer}"
        );
    }

    #[test]
    fn health_ages() {
        let health = Health::new();
        assert_eq!(health.since_last_pass_at(5_000_000_000), None);
        assert!(!health.is_ready());
        health.record_pass_at(2_000_000_000);
        assert_eq!(
            health.since_last_pass_at(5_000_000_000),
            Some(Duration::from_secs(3))
        );
        // A clock read before the pass (another thread's, a tick apart) is no age at all.
        assert_eq!(
            health.since_last_pass_at(1_000_000_000),
            Some(Duration::ZERO)
        );
        // The coarse clock moves forward with the precise one, within a few ticks.
        let coarse = coarse_monotonic_ns();
        let precise = crate::clock::Clock::monotonic_now();
        assert!(
            precise.abs_diff(coarse) < 50_000_000,
            "coarse {coarse} vs precise {precise}"
        );
    }
}
