//! `cargo xtask bench`: what tracing costs a real application, and what kspan itself costs.
//!
//! nginx (one worker pinned to CPU 0) answers a fixed 200 on keep-alive connections; wrk (pinned
//! to CPU 1) loads it. Each pair runs wrk once without kspan and once with kspan tracing nginx,
//! alternating the order from pair to pair to cancel drift. During the runs with kspan, its CPU
//! time and peak RSS come from /proc, its eBPF programs' run time from their fdinfo
//! (kernel.bpf_stats_enabled). Results go to the terminal and to target/bench/results.json.
//!
//! The bench fails only when something could not be measured, never because a target is missed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{Steps, build, cargo, command, display, kspan_bin, output, run_cmd, setup, target_dir};

const ADDR: &str = "127.0.0.1:18080";
const URL: &str = "http://127.0.0.1:18080/";
/// The same `return 200` over TLS (nginx's OpenSSL: Debian's libssl.so.3, uprobes attached).
const TLS_ADDR: &str = "127.0.0.1:18443";
const TLS_URL: &str = "https://127.0.0.1:18443/";
const WRK_THREADS: u32 = 1;
const WRK_CONNECTIONS: u32 = 16;
const WARMUP_SECS: u64 = 3;
/// kspan parses the kernel's BTF and attaches its programs before `ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// kspan promises to exit this soon after SIGINT.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
const NGINX_START_TIMEOUT: Duration = Duration::from_secs(10);
const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

pub struct Options {
    pub duration: u64,
    pub pairs: u32,
    pub skip_criterion: bool,
}

pub fn bench(options: &Options) -> Result<()> {
    let mut steps = Steps::default();
    let result = (|| {
        steps.run("setup", || setup::setup_with(setup::BENCH_PACKAGES))?;
        steps.run("build (release)", || build(false))?;
        steps.run("overhead on nginx", || overhead(options))?;
        if options.skip_criterion {
            println!("\nskipped: criterion micro-benchmarks (--skip-criterion)");
            return Ok(());
        }
        steps.run("criterion", criterion)
    })();
    steps.print_summary();
    result
}

// ---------------------------------------------------------------------------------------------
// The overhead measurement

fn overhead(options: &Options) -> Result<()> {
    if !setup::is_root() {
        bail!("the benchmark loads eBPF programs and sets {BPF_STATS}: run it as root");
    }
    let machine = machine()?;
    let nproc = machine["nproc"].as_u64().unwrap_or(1);
    let text = |key: &str| machine[key].as_str().unwrap_or("").to_string();
    println!(
        "machine: {nproc} CPUs, {}, kernel {}, load average {}",
        text("model_name"),
        text("kernel"),
        text("loadavg")
    );
    if nproc < 2 {
        bail!("the benchmark pins nginx to CPU 0 and wrk to CPU 1: it needs at least 2 CPUs");
    }
    let load = loadavg().0;
    if load > 0.5 {
        println!(
            "warning: load average {load} before the benchmark: other work on this machine will \
             skew the figures"
        );
    }
    let dir = target_dir().join("bench");
    fs::create_dir_all(dir.join("tmp"))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    catch_interrupt();

    let nginx = Nginx::start(&dir)?;
    let _stats = BpfStats::enable()?;
    println!("\nwarm-up ({WARMUP_SECS}s, discarded)");
    wrk(URL, WARMUP_SECS)?;
    let pairs = run_pairs(nginx.pid(), URL, options)?;
    // The same over TLS: what the uprobes on nginx's libssl add (and wrk's TLS, on its CPU).
    println!("\nHTTPS: warm-up ({WARMUP_SECS}s, discarded)");
    wrk(TLS_URL, WARMUP_SECS)?;
    let tls_pairs = run_pairs(nginx.pid(), TLS_URL, options)?;
    drop(nginx);
    let mut machine = machine;
    machine["loadavg_after"] = loadavg().1.into();

    let summary = Summary::of(&pairs);
    let rows = rows(&summary);
    println!();
    print_pairs(&pairs);
    println!();
    print_table(&rows);
    let tls_summary = Summary::of(&tls_pairs);
    println!("\nHTTPS ({TLS_URL}, OpenSSL uprobes), beside the plaintext figures above:");
    print_pairs(&tls_pairs);
    println!();
    print_tls_comparison(&summary, &tls_summary);
    let results = json!({
        "machine": machine,
        "settings": {
            "duration_secs": options.duration,
            "pairs": options.pairs,
            "warmup_secs": WARMUP_SECS,
            "wrk_threads": WRK_THREADS,
            "wrk_connections": WRK_CONNECTIONS,
            "url": URL,
            "nginx_cpu": 0,
            "wrk_cpu": 1,
        },
        "pairs": pairs.iter().map(Pair::to_json).collect::<Vec<_>>(),
        "medians": summary.to_json(),
        "targets": rows.iter().filter(|r| r.target.is_some()).map(Row::to_json).collect::<Vec<_>>(),
        "all_targets_met": rows.iter().all(|r| r.met() != Some(false)),
        "https": {
            "url": TLS_URL,
            "pairs": tls_pairs.iter().map(Pair::to_json).collect::<Vec<_>>(),
            "medians": tls_summary.to_json(),
        },
    });
    let path = dir.join("results.json");
    fs::write(&path, serde_json::to_string_pretty(&results)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("\nwrote {}", path.display());
    Ok(())
}

/// `options.pairs` pairs of wrk runs against `url`, without and with kspan tracing nginx.
fn run_pairs(nginx_pid: u32, url: &str, options: &Options) -> Result<Vec<Pair>> {
    let mut pairs = Vec::new();
    for number in 1..=options.pairs {
        // Alternate the order so that drift (thermal, other load) favours neither side.
        let without_first = number % 2 == 1;
        let order = if without_first {
            "without, with"
        } else {
            "with, without"
        };
        println!("\npair {number}/{} ({order})", options.pairs);
        let (without, with) = if without_first {
            let without = wrk(url, options.duration)?;
            (without, traced(nginx_pid, url, options.duration)?)
        } else {
            let with = traced(nginx_pid, url, options.duration)?;
            (wrk(url, options.duration)?, with)
        };
        pairs.push(Pair {
            order,
            without,
            with,
        });
    }
    Ok(pairs)
}

/// The HTTPS medians beside the plaintext ones (no targets: the issue asks for the figures).
fn print_tls_comparison(plain: &Summary, tls: &Summary) {
    let lines: [(&str, f64, f64, usize); 6] = [
        (
            "throughput ratio with/without",
            plain.throughput_ratio,
            tls.throughput_ratio,
            3,
        ),
        ("p50 latency ratio", plain.p50_ratio, tls.p50_ratio, 3),
        ("p99 latency ratio", plain.p99_ratio, tls.p99_ratio, 3),
        (
            "kspan CPU per request (µs)",
            plain.cpu_us_per_request,
            tls.cpu_us_per_request,
            2,
        ),
        (
            "eBPF time per request (ns)",
            plain.ebpf_ns_per_request,
            tls.ebpf_ns_per_request,
            0,
        ),
        (
            "eBPF program runs per request",
            plain.ebpf_runs_per_request,
            tls.ebpf_runs_per_request,
            1,
        ),
    ];
    let mut out = format!("{:<32} {:>10} {:>10}\n", "median", "http", "https");
    for (name, p, t, decimals) in lines {
        let _ = writeln!(out, "{name:<32} {p:>10.decimals$} {t:>10.decimals$}");
    }
    let _ = writeln!(
        out,
        "{:<32} {:>10} {:>10}",
        "events lost (all runs)", plain.events_lost, tls.events_lost
    );
    print!("{out}");
}

/// One run of wrk with kspan tracing nginx, and what kspan cost meanwhile.
fn traced(nginx_pid: u32, url: &str, secs: u64) -> Result<Traced> {
    let kspan = Kspan::start(nginx_pid)?;
    let pid = kspan.pid();
    // Readings after `ready`, so that startup (BTF parsing, loading, attaching) is left out.
    let cpu_before = cpu_ticks(pid)?;
    let bpf_before = bpf_programs(pid)?;
    let wrk = wrk(url, secs)?;
    let cpu_after = cpu_ticks(pid)?;
    let bpf_after = bpf_programs(pid)?;
    let peak_rss_kib = vm_hwm_kib(pid)?;
    let names = program_names(pid)?;
    let counters = kspan.stop()?;

    let mut ebpf_ns = 0;
    let mut ebpf_runs = 0;
    let mut by_program = Vec::new();
    for (id, after) in &bpf_after {
        let before = bpf_before.get(id).copied().unwrap_or_default();
        let ns = after.run_time_ns.saturating_sub(before.run_time_ns);
        let runs = after.run_cnt.saturating_sub(before.run_cnt);
        ebpf_ns += ns;
        ebpf_runs += runs;
        if runs > 0 {
            let name = names
                .get(id)
                .cloned()
                .unwrap_or_else(|| format!("prog {id}"));
            by_program.push(ProgramRun { name, ns, runs });
        }
    }
    by_program.sort_by_key(|p| std::cmp::Reverse(p.ns));
    let counter = |name: &str| {
        counters
            .get(name)
            .copied()
            .with_context(|| format!("kspan's counters line has no {name}="))
    };
    let traced = Traced {
        cpu_secs: cpu_after.saturating_sub(cpu_before) as f64 / clock_ticks_per_sec()?,
        ebpf_ns,
        ebpf_runs,
        bpf_programs: bpf_after.len(),
        peak_rss_kib,
        events_lost: counter("events_lost")?,
        spans_emitted: counter("spans_emitted")?,
        by_program,
        wrk,
    };
    println!(
        "  kspan: {:.2} µs CPU/request, {:.0} ns eBPF/request ({:.1} program runs/request, {} \
         programs), peak RSS {:.1} MiB, events lost {}, spans {} for {} requests",
        traced.cpu_us_per_request(),
        traced.ebpf_ns_per_request(),
        traced.ebpf_runs_per_request(),
        traced.bpf_programs,
        traced.peak_rss_mib(),
        traced.events_lost,
        traced.spans_emitted,
        traced.wrk.requests
    );
    // Where the eBPF time goes: the traced process's hooks and everyone else's (wrk's here).
    let parts: Vec<String> = traced
        .by_program
        .iter()
        .take(8)
        .map(|p| {
            format!(
                "{} {:.0} ns/run × {:.2}",
                p.name,
                p.ns as f64 / p.runs as f64,
                traced.per_request(p.runs as f64)
            )
        })
        .collect();
    println!("  eBPF by program (runs/request): {}", parts.join(", "));
    Ok(traced)
}

// ---------------------------------------------------------------------------------------------
// Results

struct Pair {
    order: &'static str,
    without: Wrk,
    with: Traced,
}

impl Pair {
    fn throughput_ratio(&self) -> f64 {
        self.with.wrk.requests_per_sec / self.without.requests_per_sec
    }

    fn p50_ratio(&self) -> f64 {
        self.with.wrk.p50_us / self.without.p50_us
    }

    fn p99_ratio(&self) -> f64 {
        self.with.wrk.p99_us / self.without.p99_us
    }

    fn to_json(&self) -> Value {
        json!({
            "order": self.order,
            "without": self.without.to_json(),
            "with": self.with.to_json(),
            "throughput_ratio": self.throughput_ratio(),
            "p50_ratio": self.p50_ratio(),
            "p99_ratio": self.p99_ratio(),
        })
    }
}

/// A wrk run with kspan attached.
struct Traced {
    wrk: Wrk,
    /// kspan's user + system CPU time during the wrk run.
    cpu_secs: f64,
    /// Run time and invocations of kspan's eBPF programs during the wrk run, summed.
    ebpf_ns: u64,
    ebpf_runs: u64,
    bpf_programs: usize,
    peak_rss_kib: u64,
    events_lost: u64,
    spans_emitted: u64,
    /// Per program, most time first.
    by_program: Vec<ProgramRun>,
}

struct ProgramRun {
    /// Tracepoint name, from the program's link.
    name: String,
    ns: u64,
    runs: u64,
}

impl Traced {
    fn per_request(&self, value: f64) -> f64 {
        value / self.wrk.requests as f64
    }

    fn cpu_us_per_request(&self) -> f64 {
        self.per_request(self.cpu_secs * 1e6)
    }

    fn ebpf_ns_per_request(&self) -> f64 {
        self.per_request(self.ebpf_ns as f64)
    }

    fn ebpf_runs_per_request(&self) -> f64 {
        self.per_request(self.ebpf_runs as f64)
    }

    fn spans_per_request(&self) -> f64 {
        self.per_request(self.spans_emitted as f64)
    }

    fn peak_rss_mib(&self) -> f64 {
        self.peak_rss_kib as f64 / 1024.0
    }

    fn to_json(&self) -> Value {
        let mut value = self.wrk.to_json();
        value["kspan"] = json!({
            "cpu_secs": self.cpu_secs,
            "cpu_us_per_request": self.cpu_us_per_request(),
            "ebpf_ns": self.ebpf_ns,
            "ebpf_ns_per_request": self.ebpf_ns_per_request(),
            "ebpf_program_runs": self.ebpf_runs,
            "ebpf_program_runs_per_request": self.ebpf_runs_per_request(),
            "bpf_programs": self.bpf_programs,
            "peak_rss_kib": self.peak_rss_kib,
            "events_lost": self.events_lost,
            "spans_emitted": self.spans_emitted,
            "spans_per_request": self.spans_per_request(),
            "ebpf_by_program": self.by_program.iter().map(|p| json!({
                "tracepoint": p.name,
                "ns_per_run": p.ns as f64 / p.runs as f64,
                "runs_per_request": self.per_request(p.runs as f64),
                "ns_per_request": self.per_request(p.ns as f64),
            })).collect::<Vec<_>>(),
        });
        value
    }
}

/// Medians over the pairs; the worst case for peak RSS and events lost.
struct Summary {
    throughput_ratio: f64,
    p50_ratio: f64,
    p99_ratio: f64,
    cpu_us_per_request: f64,
    ebpf_ns_per_request: f64,
    ebpf_runs_per_request: f64,
    spans_per_request: f64,
    peak_rss_mib: f64,
    events_lost: u64,
}

impl Summary {
    fn of(pairs: &[Pair]) -> Summary {
        let median_of = |f: fn(&Pair) -> f64| median(pairs.iter().map(f).collect());
        Summary {
            throughput_ratio: median_of(Pair::throughput_ratio),
            p50_ratio: median_of(Pair::p50_ratio),
            p99_ratio: median_of(Pair::p99_ratio),
            cpu_us_per_request: median_of(|p| p.with.cpu_us_per_request()),
            ebpf_ns_per_request: median_of(|p| p.with.ebpf_ns_per_request()),
            ebpf_runs_per_request: median_of(|p| p.with.ebpf_runs_per_request()),
            spans_per_request: median_of(|p| p.with.spans_per_request()),
            peak_rss_mib: pairs
                .iter()
                .map(|p| p.with.peak_rss_mib())
                .fold(0.0, f64::max),
            events_lost: pairs.iter().map(|p| p.with.events_lost).sum(),
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "throughput_ratio": self.throughput_ratio,
            "p50_ratio": self.p50_ratio,
            "p99_ratio": self.p99_ratio,
            "kspan_cpu_us_per_request": self.cpu_us_per_request,
            "ebpf_ns_per_request": self.ebpf_ns_per_request,
            "ebpf_program_runs_per_request": self.ebpf_runs_per_request,
            "spans_per_request": self.spans_per_request,
            "peak_rss_mib_max": self.peak_rss_mib,
            "events_lost_total": self.events_lost,
        })
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

#[derive(Clone, Copy)]
enum Bound {
    AtLeast(f64),
    AtMost(f64),
}

/// One line of the results table; `target: None` for figures reported without a target.
struct Row {
    metric: &'static str,
    value: f64,
    unit: &'static str,
    decimals: usize,
    target: Option<Bound>,
}

impl Row {
    fn met(&self) -> Option<bool> {
        match self.target? {
            Bound::AtLeast(min) => Some(self.value >= min),
            Bound::AtMost(max) => Some(self.value <= max),
        }
    }

    fn value_text(&self) -> String {
        let unit = if self.unit.is_empty() { "" } else { " " };
        format!("{:.*}{unit}{}", self.decimals, self.value, self.unit)
    }

    fn target_text(&self) -> String {
        let unit = if self.unit.is_empty() { "" } else { " " };
        match self.target {
            None => "-".into(),
            Some(Bound::AtLeast(min)) => format!(">= {min}{unit}{}", self.unit),
            Some(Bound::AtMost(0.0)) => "= 0".into(),
            Some(Bound::AtMost(max)) => format!("<= {max}{unit}{}", self.unit),
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "metric": self.metric,
            "value": self.value,
            "unit": self.unit,
            "target": self.target_text(),
            "met": self.met(),
        })
    }
}

fn rows(s: &Summary) -> Vec<Row> {
    let row = |metric, value, unit, decimals, target| Row {
        metric,
        value,
        unit,
        decimals,
        target,
    };
    vec![
        row(
            "throughput ratio with/without (median)",
            s.throughput_ratio,
            "",
            3,
            Some(Bound::AtLeast(0.95)),
        ),
        row("p50 latency ratio (median)", s.p50_ratio, "", 3, None),
        row(
            "p99 latency ratio (median)",
            s.p99_ratio,
            "",
            3,
            Some(Bound::AtMost(1.10)),
        ),
        row(
            "kspan CPU per request (median)",
            s.cpu_us_per_request,
            "µs",
            2,
            Some(Bound::AtMost(3.0)),
        ),
        row(
            "eBPF time per request (median)",
            s.ebpf_ns_per_request,
            "ns",
            0,
            Some(Bound::AtMost(500.0)),
        ),
        row(
            "eBPF program runs per request (median)",
            s.ebpf_runs_per_request,
            "",
            1,
            None,
        ),
        row(
            "events lost (all runs)",
            s.events_lost as f64,
            "",
            0,
            Some(Bound::AtMost(0.0)),
        ),
        row(
            "peak RSS (max over runs)",
            s.peak_rss_mib,
            "MiB",
            1,
            Some(Bound::AtMost(64.0)),
        ),
        row(
            "spans emitted per request (median)",
            s.spans_per_request,
            "",
            3,
            None,
        ),
    ]
}

fn print_pairs(pairs: &[Pair]) {
    let mut out = format!(
        "{:<5} {:<14} {:>11} {:>11} {:>7} {:>7} {:>7} {:>9} {:>9} {:>8} {:>7} {:>5} {:>9}\n",
        "pair",
        "order",
        "req/s w/o",
        "req/s with",
        "thr",
        "p50",
        "p99",
        "µs CPU/r",
        "ns eBPF/r",
        "runs/r",
        "RSS MiB",
        "lost",
        "spans/r"
    );
    for (i, p) in pairs.iter().enumerate() {
        let _ = writeln!(
            out,
            "{:<5} {:<14} {:>11.0} {:>11.0} {:>7.3} {:>7.3} {:>7.3} {:>9.2} {:>9.0} {:>8.1} {:>7.1} \
             {:>5} {:>9.3}",
            i + 1,
            p.order,
            p.without.requests_per_sec,
            p.with.wrk.requests_per_sec,
            p.throughput_ratio(),
            p.p50_ratio(),
            p.p99_ratio(),
            p.with.cpu_us_per_request(),
            p.with.ebpf_ns_per_request(),
            p.with.ebpf_runs_per_request(),
            p.with.peak_rss_mib(),
            p.with.events_lost,
            p.with.spans_per_request()
        );
    }
    print!("{out}");
}

fn print_table(rows: &[Row]) {
    let mut out = format!(
        "{:<40} {:>12} {:>12} {:>4}\n",
        "metric", "value", "target", "met"
    );
    for row in rows {
        let met = match row.met() {
            None => "-",
            Some(true) => "yes",
            Some(false) => "no",
        };
        let _ = writeln!(
            out,
            "{:<40} {:>12} {:>12} {:>4}",
            row.metric,
            row.value_text(),
            row.target_text(),
            met
        );
    }
    print!("{out}");
}

/// CPU count, CPU model, kernel release, load average and package versions, for the record.
fn machine() -> Result<Value> {
    let nproc = thread::available_parallelism().map_or(1, |n| n.get());
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").context("cannot read /proc/cpuinfo")?;
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map_or("unknown", |(_, model)| model.trim());
    let kernel = output(command("uname").arg("-r")).context("`uname -r` failed")?;
    let version = |package| {
        output(command("dpkg-query").args(["-W", "-f=${Version}", package])).unwrap_or_default()
    };
    Ok(json!({
        "nproc": nproc,
        "model_name": model,
        "kernel": kernel.trim(),
        "loadavg": loadavg().1,
        "nginx_version": version("nginx"),
        "wrk_version": version("wrk"),
    }))
}

/// The 1-minute load average, and the 1, 5 and 15-minute ones as text.
fn loadavg() -> (f64, String) {
    let text = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let three: Vec<&str> = text.split_whitespace().take(3).collect();
    let one = three.first().and_then(|l| l.parse().ok()).unwrap_or(0.0);
    (one, three.join(" "))
}

// ---------------------------------------------------------------------------------------------
// wrk

/// What a wrk run reports.
#[derive(Debug, PartialEq)]
struct Wrk {
    requests_per_sec: f64,
    requests: u64,
    p50_us: f64,
    p99_us: f64,
    socket_errors: u64,
    non_2xx: u64,
}

impl Wrk {
    fn to_json(&self) -> Value {
        json!({
            "requests_per_sec": self.requests_per_sec,
            "requests": self.requests,
            "p50_us": self.p50_us,
            "p99_us": self.p99_us,
            "socket_errors": self.socket_errors,
            "non_2xx_responses": self.non_2xx,
        })
    }
}

/// Run wrk on CPU 1 against nginx for `secs` seconds.
fn wrk(url: &str, secs: u64) -> Result<Wrk> {
    let mut cmd = command("taskset");
    cmd.args(["-c", "1", "wrk"])
        .arg(format!("-t{WRK_THREADS}"))
        .arg(format!("-c{WRK_CONNECTIONS}"))
        .arg(format!("-d{secs}s"))
        .args(["--latency", url])
        .stdin(Stdio::null());
    let shown = display(&cmd);
    println!("$ {shown}");
    let out = cmd
        .output()
        .with_context(|| format!("cannot start `{shown}`"))?;
    check_interrupted()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let wrk = parse_wrk(&text).with_context(|| format!("cannot parse wrk's output:\n{text}"))?;
    if wrk.requests == 0 {
        bail!("wrk completed no request:\n{text}");
    }
    println!(
        "  {:.0} requests/s, {} requests, p50 {:.0} µs, p99 {:.0} µs",
        wrk.requests_per_sec, wrk.requests, wrk.p50_us, wrk.p99_us
    );
    if wrk.socket_errors > 0 || wrk.non_2xx > 0 {
        println!(
            "  warning: wrk saw {} socket errors and {} non-2xx responses",
            wrk.socket_errors, wrk.non_2xx
        );
    }
    Ok(wrk)
}

fn parse_wrk(text: &str) -> Result<Wrk> {
    let (mut rps, mut requests, mut p50, mut p99) = (None, None, None, None);
    let (mut socket_errors, mut non_2xx) = (0, 0);
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", value] => rps = Some(value.parse::<f64>()?),
            [count, "requests", "in", ..] => requests = Some(count.parse::<u64>()?),
            ["50%", value] => p50 = Some(micros(value)?),
            ["99%", value] => p99 = Some(micros(value)?),
            // "Socket errors: connect 0, read 0, write 0, timeout 0"
            ["Socket", "errors:", counts @ ..] => {
                socket_errors = counts
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum();
            }
            ["Non-2xx", "or", "3xx", "responses:", count] => non_2xx = count.parse()?,
            _ => {}
        }
    }
    Ok(Wrk {
        requests_per_sec: rps.context("no `Requests/sec:` line")?,
        requests: requests.context("no `N requests in` line")?,
        p50_us: p50.context("no 50% latency line (was --latency given?)")?,
        p99_us: p99.context("no 99% latency line (was --latency given?)")?,
        socket_errors,
        non_2xx,
    })
}

/// A wrk duration (`512.00us`, `1.20ms`, `2.00s`, also `1.00m`, `1.00h`) in microseconds.
fn micros(text: &str) -> Result<f64> {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("no unit in wrk latency `{text}`"))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .with_context(|| format!("bad number in wrk latency `{text}`"))?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => bail!("unknown unit in wrk latency `{text}`"),
    };
    Ok(number * scale)
}

// ---------------------------------------------------------------------------------------------
// nginx

fn nginx_conf(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"# Written by `cargo xtask bench`; the system nginx configuration is not used.
worker_processes 1;
worker_cpu_affinity 01;
master_process on;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;

events {{
    worker_connections 1024;
}}

http {{
    access_log off;
    client_body_temp_path {d}/tmp/client_body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    default_type text/plain;

    server {{
        listen {ADDR};
        location / {{
            return 200 "ok\n";
        }}
    }}

    server {{
        listen {TLS_ADDR} ssl;
        ssl_certificate {d}/cert.pem;
        ssl_certificate_key {d}/key.pem;
        location / {{
            return 200 "ok\n";
        }}
    }}
}}
"#
    )
}

/// A self-signed P-256 certificate for the HTTPS server, by the `openssl` command.
fn make_certificate(dir: &Path) -> Result<()> {
    let mut cmd = command("openssl");
    cmd.args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
    ])
    .args(["-nodes", "-days", "2", "-subj", "/CN=localhost"])
    .arg("-keyout")
    .arg(dir.join("key.pem"))
    .arg("-out")
    .arg(dir.join("cert.pem"))
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    run_cmd(&mut cmd)
}

/// nginx in the foreground with our configuration; stopped when dropped.
struct Nginx {
    child: Child,
}

impl Nginx {
    fn start(dir: &Path) -> Result<Nginx> {
        if TcpStream::connect(ADDR).is_ok() {
            bail!("something already listens on {ADDR}; stop it first");
        }
        if TcpStream::connect(TLS_ADDR).is_ok() {
            bail!("something already listens on {TLS_ADDR}; stop it first");
        }
        make_certificate(dir)?;
        let conf = dir.join("nginx.conf");
        fs::write(&conf, nginx_conf(dir))
            .with_context(|| format!("cannot write {}", conf.display()))?;
        let mut cmd = command("nginx");
        // -e: the log for errors before the configuration is read (not the system's).
        cmd.arg("-e")
            .arg(dir.join("nginx-error.log"))
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null());
        let shown = display(&cmd);
        println!("$ {shown}");
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{shown}`"))?;
        let mut nginx = Nginx { child };
        let deadline = Instant::now() + NGINX_START_TIMEOUT;
        while TcpStream::connect(ADDR).is_err() {
            if let Some(status) = nginx.child.try_wait()? {
                bail!(
                    "nginx exited ({status}) before listening; see {}",
                    dir.join("nginx-error.log").display()
                );
            }
            if Instant::now() > deadline {
                bail!("nginx does not answer on {ADDR} after {NGINX_START_TIMEOUT:?}");
            }
            thread::sleep(Duration::from_millis(50));
        }
        let workers = fs::read_to_string(format!("/proc/{0}/task/{0}/children", nginx.pid()))
            .unwrap_or_default();
        println!(
            "nginx listening on {ADDR}: master {}, worker {} (CPU 0)",
            nginx.pid(),
            workers.trim()
        );
        Ok(nginx)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its worker, then exits. SIGKILL would orphan the worker.
        signal(self.pid(), libc::SIGTERM);
        if wait_exit(&mut self.child, Duration::from_secs(5)).is_none() {
            eprintln!("nginx ignored SIGTERM; killing it");
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// kspan

/// kspan tracing nginx, its stderr read on a thread; killed if dropped before `stop`.
struct Kspan {
    child: Child,
    lines: Receiver<String>,
    stderr: Vec<String>,
}

impl Kspan {
    /// Start kspan on the nginx master (which selects its worker too) and wait for `ready`.
    fn start(nginx_pid: u32) -> Result<Kspan> {
        let mut cmd = command(kspan_bin());
        cmd.args(["--pid", &nginx_pid.to_string(), "--output", "none"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let shown = display(&cmd);
        println!("$ {shown}");
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{shown}`"))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let (sender, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let mut kspan = Kspan {
            child,
            lines,
            stderr: Vec::new(),
        };
        kspan.wait_ready()?;
        Ok(kspan)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let ready = is_ready_line(&line);
                    self.stderr.push(line);
                    if ready {
                        return Ok(());
                    }
                }
                Err(RecvTimeoutError::Timeout) => bail!(
                    "kspan printed no `ready` line within {READY_TIMEOUT:?}; its stderr:\n{}",
                    self.stderr.join("\n")
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    check_interrupted()?;
                    let status = self.child.wait()?;
                    bail!(
                        "kspan exited ({status}) before `ready`; its stderr:\n{}",
                        self.stderr.join("\n")
                    );
                }
            }
        }
    }

    /// SIGINT, wait for the exit, return the counters from its last stderr line.
    fn stop(mut self) -> Result<BTreeMap<String, u64>> {
        signal(self.pid(), libc::SIGINT);
        let Some(status) = wait_exit(&mut self.child, STOP_TIMEOUT) else {
            bail!("kspan did not exit within {STOP_TIMEOUT:?} of SIGINT");
        };
        // The process is gone, so its stderr reaches end of file shortly.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            self.stderr.push(line);
        }
        if !status.success() {
            bail!(
                "kspan exited with {status} after SIGINT; its stderr:\n{}",
                self.stderr.join("\n")
            );
        }
        let last = self.stderr.last().map_or("", String::as_str);
        if !last.contains("events_lost=") {
            bail!("kspan's last stderr line is not its counters line: {last:?}");
        }
        Ok(parse_counters(last))
    }
}

impl Drop for Kspan {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `kspan: ready: ...`; "already" and the like do not count.
fn is_ready_line(line: &str) -> bool {
    line.split(|c: char| !c.is_ascii_alphanumeric())
        .any(|word| word == "ready")
}

/// The `name=N` fields of kspan's `stopped:` line.
fn parse_counters(line: &str) -> BTreeMap<String, u64> {
    line.split_whitespace()
        .filter_map(|field| {
            let (name, value) = field.split_once('=')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// /proc readers

/// User + system CPU time of a process (all its threads), in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    parse_cpu_ticks(&stat).with_context(|| format!("cannot parse {path}: {stat}"))
}

fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name, in parentheses, may hold spaces: count fields after its closing one.
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    // Fields 14 and 15 of proc(5) (utime, stime); fields[0] is field 3 (state).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks_per_sec() -> Result<f64> {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks <= 0 {
        bail!("sysconf(_SC_CLK_TCK) failed");
    }
    Ok(ticks as f64)
}

/// Peak resident set size (VmHWM) of a process, in KiB.
fn vm_hwm_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmHWM:")?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .with_context(|| format!("no VmHWM line in {path}"))
}

#[derive(Clone, Copy, Default, Debug, PartialEq)]
struct ProgramStats {
    run_time_ns: u64,
    run_cnt: u64,
}

/// Run time and invocations of every BPF program a process holds an fd of, by program id.
fn bpf_programs(pid: u32) -> Result<BTreeMap<u64, ProgramStats>> {
    let dir = PathBuf::from(format!("/proc/{pid}/fdinfo"));
    let mut programs = BTreeMap::new();
    let mut without_stats = 0;
    for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
        // An fd closed since the listing is simply skipped.
        let Ok(text) = fs::read_to_string(entry?.path()) else {
            continue;
        };
        match parse_program_fdinfo(&text) {
            Some((id, Some(stats))) => {
                programs.insert(id, stats);
            }
            Some((_, None)) => without_stats += 1,
            None => {}
        }
    }
    if programs.is_empty() && without_stats > 0 {
        bail!(
            "the fdinfo of kspan's BPF programs has no run_time_ns/run_cnt on this kernel: eBPF \
             time cannot be measured"
        );
    }
    if programs.is_empty() {
        bail!("no BPF program among the fds in {}", dir.display());
    }
    Ok(programs)
}

/// For a BPF program's fdinfo (it has `prog_type:`; a link's has `link_type:` and `prog_id:`
/// too, but no `prog_type:`): its id, and its statistics if the kernel reports them.
fn parse_program_fdinfo(text: &str) -> Option<(u64, Option<ProgramStats>)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    field("prog_type")?;
    let id = field("prog_id")?.parse().ok()?;
    let stats = (|| {
        Some(ProgramStats {
            run_time_ns: field("run_time_ns")?.parse().ok()?,
            run_cnt: field("run_cnt")?.parse().ok()?,
        })
    })();
    Some((id, stats))
}

/// Tracepoint names of the programs a process has linked, by program id (from the links' fdinfo);
/// a program attached to several tracepoints is named after all of them (`a+b`, sorted).
fn program_names(pid: u32) -> Result<BTreeMap<u64, String>> {
    let dir = PathBuf::from(format!("/proc/{pid}/fdinfo"));
    let mut names: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let Ok(text) = fs::read_to_string(entry?.path()) else {
            continue;
        };
        if let Some((id, name)) = parse_link_fdinfo(&text) {
            names.entry(id).or_default().insert(name);
        }
    }
    Ok(names
        .into_iter()
        .map(|(id, names)| (id, names.into_iter().collect::<Vec<_>>().join("+")))
        .collect())
}

/// For a tracepoint link's fdinfo: the program id and the tracepoint name.
fn parse_link_fdinfo(text: &str) -> Option<(u64, String)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
    };
    field("link_type")?;
    let id = field("prog_id")?.parse().ok()?;
    Some((id, field("tp_name")?.to_string()))
}

/// kernel.bpf_stats_enabled set to 1; the previous value is restored when dropped.
struct BpfStats {
    previous: String,
}

impl BpfStats {
    fn enable() -> Result<BpfStats> {
        let previous = fs::read_to_string(BPF_STATS)
            .with_context(|| format!("cannot read {BPF_STATS}"))?
            .trim()
            .to_string();
        println!("$ echo 1 > {BPF_STATS}   (was {previous}; restored at the end)");
        fs::write(BPF_STATS, "1").with_context(|| format!("cannot write {BPF_STATS}"))?;
        Ok(BpfStats { previous })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        println!("$ echo {} > {BPF_STATS}", self.previous);
        if let Err(err) = fs::write(BPF_STATS, &self.previous) {
            eprintln!(
                "warning: cannot restore {BPF_STATS} to {}: {err}",
                self.previous
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Processes and signals

fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions; the pid is our own unreaped child.
    unsafe { libc::kill(pid as libc::pid_t, signal) };
}

/// Wait up to `timeout` for the child to exit.
fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C also reaches nginx, wrk and kspan (same process group), which stop. Instead of dying at
/// once, note it and fail after the current step, so that the guards still run.
fn catch_interrupt() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_interrupt as *const () as libc::sighandler_t,
        )
    };
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Criterion micro-benchmarks

/// Minimum pipeline throughput on one core, spans per second.
const PIPELINE_TARGET: f64 = 300_000.0;

/// kspan's bench targets (agent/benches/), all run: the HTTP/1 parser, the HTTP/2 parser and
/// whole path (gRPC), the Kafka parser and whole path (Produce, Fetch), the whole path
/// (HTTP/1), heap allocations.
const BENCHES: &[&str] = &["http1", "http2", "kafka", "pipeline", "allocations"];

/// `cargo bench -p kspan`: criterion's report, then the `BENCH <name> <value> <unit>` summary
/// lines each bench prints, added to the table and to target/bench/results.json, with the
/// per-protocol comparison (HTTP/1 keep-alive, HTTP/2 gRPC server and client sides, Kafka
/// producer and consumer).
fn criterion() -> Result<()> {
    let targets = bench_targets("kspan")?;
    let missing: Vec<&str> = BENCHES
        .iter()
        .copied()
        .filter(|b| !targets.iter().any(|t| t == b))
        .collect();
    if !missing.is_empty() {
        bail!(
            "kspan lacks the bench targets {} (agent/benches/, [[bench]] in agent/Cargo.toml)",
            missing.join(", ")
        );
    }
    let mut cmd = cargo(&["bench", "-p", "kspan"]);
    for bench in BENCHES {
        cmd.args(["--bench", bench]);
    }
    println!("$ {}", display(&cmd));
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot run cargo bench")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    if !out.status.success() {
        bail!("`cargo bench -p kspan` failed ({})", out.status);
    }
    let figures = bench_lines(&stdout);
    if figures.is_empty() {
        bail!("the criterion benchmarks printed no `BENCH` summary line");
    }
    println!("\n{:<48} {:>14}  unit", "micro-benchmark", "value");
    for (name, value, unit) in &figures {
        println!("{name:<48} {value:>14.2}  {unit}");
    }
    let pipeline = figures
        .iter()
        .find(|(name, ..)| name == "pipeline_keepalive_spans_per_sec")
        .map(|(_, value, _)| *value);
    if let Some(spans) = pipeline {
        println!(
            "pipeline on one core: {spans:.0} spans/s, target >= {PIPELINE_TARGET:.0}: {}",
            if spans >= PIPELINE_TARGET {
                "met"
            } else {
                "not met"
            }
        );
    }
    let protocols = protocol_rows(&figures);
    println!();
    print!("{}", protocol_table(&protocols));
    let path = target_dir().join("bench").join("results.json");
    let mut results: Value = fs::read_to_string(&path)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_else(|| serde_json::json!({}));
    results["micro"] = figures
        .iter()
        .map(|(name, value, unit)| {
            (
                name.clone(),
                serde_json::json!({"value": value, "unit": unit}),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into();
    results["pipeline_target_met"] = serde_json::json!(pipeline.map(|s| s >= PIPELINE_TARGET));
    results["protocols"] = protocols_json(&protocols);
    fs::create_dir_all(path.parent().expect("results.json has a parent"))?;
    fs::write(&path, serde_json::to_string_pretty(&results)? + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("wrote {}", path.display());
    let unmeasured = unmeasured(&protocols);
    if !unmeasured.is_empty() {
        bail!(
            "the benchmarks printed no `BENCH` line for {}",
            unmeasured.join(", ")
        );
    }
    Ok(())
}

/// Columns of the per-protocol comparison.
const COLUMNS: usize = 5;

/// The columns of the per-protocol comparison: JSON key and heading.
const PROTOCOLS: [(&str, &str); COLUMNS] = [
    ("http1_keepalive_server", "HTTP/1 server"),
    ("http2_grpc_server", "gRPC server"),
    ("http2_grpc_client", "gRPC client"),
    ("kafka_produce_client", "Kafka producer"),
    ("kafka_fetch_v16_client", "Kafka consumer"),
];

/// One figure per protocol column (HTTP/1 keep-alive as the server sees it; gRPC unary calls
/// on one HTTP/2 connection, server side and client side; Kafka on a client's connection,
/// Produce v10 of one message and Fetch v16 of ten), from the `BENCH` lines.
struct ProtocolRow {
    /// JSON key.
    key: &'static str,
    metric: &'static str,
    unit: &'static str,
    decimals: usize,
    /// `BENCH` names of the columns' figures.
    sources: [&'static str; COLUMNS],
    /// Per column; None when its line is missing.
    values: [Option<f64>; COLUMNS],
}

fn protocol_rows(figures: &[(String, f64, String)]) -> Vec<ProtocolRow> {
    let get = |name: &str| {
        figures
            .iter()
            .find(|(n, ..)| n == name)
            .map(|(_, value, _)| *value)
    };
    // `http1_factor`: the HTTP/1 parser's figure is messages per second, two per exchange.
    let row = |key, metric, unit, decimals, sources: [&'static str; COLUMNS], http1_factor: f64| {
        let factors: [f64; COLUMNS] =
            std::array::from_fn(|i| if i == 0 { http1_factor } else { 1.0 });
        ProtocolRow {
            key,
            metric,
            unit,
            decimals,
            sources,
            values: std::array::from_fn(|i| get(sources[i]).map(|v| v * factors[i])),
        }
    };
    vec![
        row(
            "parser_exchanges_per_sec",
            "parser, one core",
            "exchanges/s",
            0,
            [
                "http1_keepalive_msgs_per_sec",
                "http2_grpc_server_calls_per_sec",
                "http2_grpc_client_calls_per_sec",
                "kafka_produce_client_exchanges_per_sec",
                "kafka_fetch_v16_client_exchanges_per_sec",
            ],
            0.5,
        ),
        row(
            "parser_allocs_per_exchange",
            "parser allocations",
            "allocs/exchange",
            2,
            [
                "http1_parser_allocs_per_request",
                "http2_parser_server_allocs_per_call",
                "http2_parser_client_allocs_per_call",
                "kafka_parser_produce_client_allocs_per_exchange",
                "kafka_parser_fetch_v16_client_allocs_per_exchange",
            ],
            1.0,
        ),
        row(
            "parser_bytes_per_exchange",
            "parser heap bytes",
            "bytes/exchange",
            0,
            [
                "http1_parser_bytes_per_request",
                "http2_parser_server_bytes_per_call",
                "http2_parser_client_bytes_per_call",
                "kafka_parser_produce_client_bytes_per_exchange",
                "kafka_parser_fetch_v16_client_bytes_per_exchange",
            ],
            1.0,
        ),
        row(
            "pipeline_spans_per_sec",
            "whole path, one core",
            "spans/s",
            0,
            [
                "pipeline_keepalive_spans_per_sec",
                "pipeline_http2_server_spans_per_sec",
                "pipeline_http2_client_spans_per_sec",
                "pipeline_kafka_producer_spans_per_sec",
                "pipeline_kafka_consumer_spans_per_sec",
            ],
            1.0,
        ),
        row(
            "pipeline_allocs_per_span",
            "whole path allocations",
            "allocs/span",
            2,
            [
                "pipeline_keepalive_allocs_per_span",
                "pipeline_http2_server_allocs_per_span",
                "pipeline_http2_client_allocs_per_span",
                "pipeline_kafka_producer_allocs_per_span",
                "pipeline_kafka_consumer_allocs_per_span",
            ],
            1.0,
        ),
        row(
            "pipeline_bytes_per_span",
            "whole path heap bytes",
            "bytes/span",
            0,
            [
                "pipeline_keepalive_bytes_per_span",
                "pipeline_http2_server_bytes_per_span",
                "pipeline_http2_client_bytes_per_span",
                "pipeline_kafka_producer_bytes_per_span",
                "pipeline_kafka_consumer_bytes_per_span",
            ],
            1.0,
        ),
    ]
}

fn protocol_table(rows: &[ProtocolRow]) -> String {
    let mut out = format!("{:<40}", "per protocol");
    for (_, heading) in PROTOCOLS {
        let _ = write!(out, " {heading:>14}");
    }
    out.push_str("  unit\n");
    for row in rows {
        let _ = write!(out, "{:<40}", row.metric);
        for value in row.values {
            match value {
                Some(v) => {
                    let _ = write!(out, " {v:>14.*}", row.decimals);
                }
                None => {
                    let _ = write!(out, " {:>14}", "-");
                }
            }
        }
        let _ = writeln!(out, "  {}", row.unit);
    }
    out
}

/// `{"http1_keepalive_server": {"parser_exchanges_per_sec": …, …}, "http2_grpc_server": …}`;
/// null for a figure that was not printed.
fn protocols_json(rows: &[ProtocolRow]) -> Value {
    PROTOCOLS
        .iter()
        .enumerate()
        .map(|(i, (protocol, _))| {
            let figures = rows
                .iter()
                .map(|row| (row.key.to_string(), json!(row.values[i])))
                .collect::<serde_json::Map<_, _>>();
            (protocol.to_string(), Value::Object(figures))
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// `BENCH` names the per-protocol comparison needs and did not get.
fn unmeasured(rows: &[ProtocolRow]) -> Vec<&'static str> {
    rows.iter()
        .flat_map(|row| {
            row.sources
                .iter()
                .zip(row.values)
                .filter(|(_, value)| value.is_none())
                .map(|(source, _)| *source)
        })
        .collect()
}

/// `BENCH <name> <value> <unit>` lines.
fn bench_lines(text: &str) -> Vec<(String, f64, String)> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.strip_prefix("BENCH ")?.split_whitespace();
            let name = parts.next()?.to_string();
            let value = parts.next()?.parse().ok()?;
            let unit = parts.next()?.to_string();
            Some((name, value, unit))
        })
        .collect()
}

/// Names of the package's bench targets.
fn bench_targets(package: &str) -> Result<Vec<String>> {
    let metadata = output(&mut cargo(&[
        "metadata",
        "--no-deps",
        "--format-version",
        "1",
    ]))
    .context("`cargo metadata` failed")?;
    let metadata: Value = serde_json::from_str(&metadata).context("bad `cargo metadata` JSON")?;
    let is_bench = |t: &Value| {
        t["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "bench"))
    };
    Ok(metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"] == package)
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter(|t| is_bench(t))
        .filter_map(|t| t["name"].as_str().map(str::to_string))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `taskset -c 1 wrk -t1 -c16 -d2s --latency` against the bench's nginx on a busy machine.
    const WRK_NGINX: &str = "\
Running 2s test @ http://127.0.0.1:18080/
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.52ms    2.17ms  16.33ms   85.60%
    Req/Sec    26.82k     4.15k   35.22k    70.00%
  Latency Distribution
     50%  186.00us
     75%    2.36ms
     90%    4.46ms
     99%    8.89ms
  53646 requests in 2.01s, 7.67MB read
Requests/sec:  26669.99
Transfer/sec:      3.82MB
";

    /// `wrk -t1 -c4 -d2s --latency` against `python3 -m http.server`, for a missing file.
    const WRK_404: &str = "\
Running 2s test @ http://127.0.0.1:18081/no-such-file
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     4.44ms    4.42ms  53.04ms   91.19%
    Req/Sec     1.03k   150.64     1.30k    80.00%
  Latency Distribution
     50%    3.15ms
     75%    5.56ms
     90%    8.39ms
     99%   23.57ms
  2056 requests in 2.01s, 1.02MB read
  Non-2xx or 3xx responses: 2056
Requests/sec:   1022.91
Transfer/sec:    519.54KB
";

    /// `wrk -t1 -c64 -d3s --timeout 1s --latency` against `python3 -m http.server`.
    const WRK_TIMEOUTS: &str = "\
Running 3s test @ http://127.0.0.1:18081/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    29.43ms   91.93ms 881.03ms   96.18%
    Req/Sec   520.73    114.29   737.00     66.67%
  Latency Distribution
     50%   11.73ms
     75%   18.58ms
     90%   28.56ms
     99%  606.34ms
  1559 requests in 3.01s, 6.00MB read
  Socket errors: connect 0, read 0, write 0, timeout 6
Requests/sec:    517.88
Transfer/sec:      1.99MB
";

    #[test]
    fn wrk_output_with_mixed_latency_units() {
        let wrk = parse_wrk(WRK_NGINX).unwrap();
        assert_eq!(
            wrk,
            Wrk {
                requests_per_sec: 26669.99,
                requests: 53646,
                p50_us: 186.0,
                p99_us: 8890.0,
                socket_errors: 0,
                non_2xx: 0,
            }
        );
    }

    #[test]
    fn wrk_output_with_errors() {
        let wrk = parse_wrk(WRK_404).unwrap();
        assert_eq!(
            (wrk.requests, wrk.non_2xx, wrk.socket_errors),
            (2056, 2056, 0)
        );
        assert_eq!((wrk.p50_us, wrk.p99_us), (3150.0, 23570.0));
        let wrk = parse_wrk(WRK_TIMEOUTS).unwrap();
        assert_eq!((wrk.requests, wrk.non_2xx, wrk.socket_errors), (1559, 0, 6));
        assert_eq!(wrk.requests_per_sec, 517.88);
        assert_eq!(wrk.p99_us, 606340.0);
    }

    #[test]
    fn wrk_output_without_latency_distribution() {
        let without: String = WRK_NGINX
            .lines()
            .filter(|l| {
                !l.trim_start()
                    .starts_with(|c: char| c.is_ascii_digit() && l.contains('%'))
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let err = parse_wrk(&without).unwrap_err().to_string();
        assert!(err.contains("50%"), "{err}");
        assert!(parse_wrk("unable to connect to 127.0.0.1:18080 Connection refused\n").is_err());
    }

    #[test]
    fn micros_converts_wrk_units() {
        assert_eq!(micros("512.00us").unwrap(), 512.0);
        assert_eq!(micros("1.25ms").unwrap(), 1250.0);
        assert_eq!(micros("2.00s").unwrap(), 2e6);
        assert_eq!(micros("1.50m").unwrap(), 90e6);
        assert!(micros("3.00xs").is_err());
        assert!(micros("12").is_err());
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(vec![7.0]), 7.0);
    }

    #[test]
    fn ready_line_is_a_word() {
        assert!(is_ready_line(
            "kspan: ready: 29 tracepoints attached, tracing pid 1"
        ));
        assert!(!is_ready_line("[INFO] map already present"));
    }

    #[test]
    fn counters_line() {
        let counters = parse_counters(
            "kspan: stopped: events_received=31 events_lost=0 malformed_events=0 parse_errors=0 \
             spans_emitted=0 spans_sampled_out=0 spans_dropped=0 spans_exported=0 \
             export_failures=0 links_ambiguous=0 links_mismatched=0 connections_dropped=0 \
             kernel_read_errors=0 kernel_map_full=0",
        );
        assert_eq!(counters["events_lost"], 0);
        assert_eq!(counters["spans_emitted"], 0);
        assert_eq!(counters["events_received"], 31);
        assert_eq!(counters.len(), 14);
    }

    #[test]
    fn cpu_ticks_after_a_command_name_with_spaces() {
        let stat = "4242 (kspan (x) y) S 1 4242 4242 0 -1 4194560 1200 0 0 0 157 43 0 0 20 0 4 \
                    0 100 123456 789 18446744073709551615";
        assert_eq!(parse_cpu_ticks(stat), Some(200));
        assert_eq!(parse_cpu_ticks("4242 (kspan) S 1"), None);
    }

    /// /proc/PID/fdinfo of kspan's fds on Linux 6.18 (bpf_stats_enabled was 0).
    const FDINFO_PROGRAM: &str = "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t1038\n\
        prog_type:\t5\nprog_jited:\t1\nprog_tag:\tc156e564c87910bd\nmemlock:\t4096\n\
        prog_id:\t6602\nrun_time_ns:\t0\nrun_cnt:\t0\nrecursion_misses:\t0\n\
        verified_insns:\t103\n";
    const FDINFO_LINK: &str = "pos:\t0\nflags:\t02000000\nmnt_id:\t17\nino:\t1038\n\
        link_type:\tperf\nlink_id:\t5744\nprog_tag:\tc156e564c87910bd\nprog_id:\t6602\n\
        tp_name:\tsys_enter_read\nevent_type:\ttracepoint\ncookie:\t0\n";
    const FDINFO_MAP: &str = "pos:\t0\nflags:\t02000002\nmnt_id:\t17\nino:\t1038\n\
        map_type:\t1\nkey_size:\t8\nvalue_size:\t48\nmax_entries:\t16384\nmap_flags:\t0x0\n\
        map_extra:\t0x0\nmemlock:\t1967200\nmap_id:\t1813\nfrozen:\t0\n";

    #[test]
    fn program_fdinfo_but_not_link_or_map() {
        let stats = ProgramStats::default();
        assert_eq!(
            parse_program_fdinfo(FDINFO_PROGRAM),
            Some((6602, Some(stats)))
        );
        let counting = FDINFO_PROGRAM
            .replace("run_time_ns:\t0", "run_time_ns:\t123456")
            .replace("run_cnt:\t0", "run_cnt:\t789");
        let stats = ProgramStats {
            run_time_ns: 123456,
            run_cnt: 789,
        };
        assert_eq!(parse_program_fdinfo(&counting), Some((6602, Some(stats))));
        // A kernel without program statistics in fdinfo.
        let old = FDINFO_PROGRAM.replace("run_time_ns:\t0\nrun_cnt:\t0\n", "");
        assert_eq!(parse_program_fdinfo(&old), Some((6602, None)));
        assert_eq!(parse_program_fdinfo(FDINFO_LINK), None);
        assert_eq!(parse_program_fdinfo(FDINFO_MAP), None);
    }

    #[test]
    fn link_fdinfo_names_its_program() {
        assert_eq!(
            parse_link_fdinfo(FDINFO_LINK),
            Some((6602, "sys_enter_read".to_string()))
        );
        assert_eq!(parse_link_fdinfo(FDINFO_PROGRAM), None);
        assert_eq!(parse_link_fdinfo(FDINFO_MAP), None);
    }
}

#[cfg(test)]
mod bench_line_tests {
    use super::*;

    #[test]
    fn reads_summary_lines_and_ignores_the_rest() {
        let text = "pipeline keepalive: 2769 ns/span\nBENCH pipeline_keepalive_spans_per_sec 361121 spans/s\nBENCH broken\nBENCH x 1.5 allocs/span\n";
        assert_eq!(
            bench_lines(text),
            vec![
                (
                    "pipeline_keepalive_spans_per_sec".to_string(),
                    361121.0,
                    "spans/s".to_string()
                ),
                ("x".to_string(), 1.5, "allocs/span".to_string()),
            ]
        );
    }

    /// What http1, http2, kafka, pipeline and allocations print, but the gRPC client side's
    /// whole-path lines.
    const FIGURES: &str = "\
BENCH http1_keepalive_msgs_per_sec 4000000 msgs/s
BENCH http1_keepalive_bytes_per_sec 1000000000 bytes/s
BENCH http2_grpc_server_calls_per_sec 1500000 calls/s
BENCH http2_grpc_server_ns_per_call 667 ns/call
BENCH http2_grpc_client_calls_per_sec 1400000 calls/s
BENCH http2_grpc_client_ns_per_call 714 ns/call
BENCH pipeline_keepalive_spans_per_sec 361121 spans/s
BENCH pipeline_http2_server_spans_per_sec 300000 spans/s
BENCH pipeline_keepalive_allocs_per_span 9.50 allocs/span
BENCH pipeline_keepalive_bytes_per_span 1500 bytes/span
BENCH pipeline_http2_server_allocs_per_span 11.25 allocs/span
BENCH pipeline_http2_server_bytes_per_span 1800 bytes/span
BENCH http1_parser_allocs_per_request 2.00 allocs/request
BENCH http1_parser_bytes_per_request 300 bytes/request
BENCH http2_parser_server_allocs_per_call 3.00 allocs/call
BENCH http2_parser_server_bytes_per_call 400 bytes/call
BENCH http2_parser_client_allocs_per_call 3.00 allocs/call
BENCH http2_parser_client_bytes_per_call 410 bytes/call
BENCH kafka_produce_client_exchanges_per_sec 900000 exchanges/s
BENCH kafka_produce_client_ns_per_exchange 1111 ns/exchange
BENCH kafka_produce_broker_exchanges_per_sec 850000 exchanges/s
BENCH kafka_fetch_v16_client_exchanges_per_sec 500000 exchanges/s
BENCH kafka_fetch_v16_broker_exchanges_per_sec 450000 exchanges/s
BENCH pipeline_kafka_producer_spans_per_sec 400000 spans/s
BENCH pipeline_kafka_consumer_spans_per_sec 120000 spans/s
BENCH pipeline_kafka_producer_allocs_per_span 13.17 allocs/span
BENCH pipeline_kafka_producer_bytes_per_span 2371 bytes/span
BENCH pipeline_kafka_consumer_allocs_per_span 46.00 allocs/span
BENCH pipeline_kafka_consumer_bytes_per_span 6988 bytes/span
BENCH kafka_parser_produce_client_allocs_per_exchange 10.00 allocs/exchange
BENCH kafka_parser_produce_client_bytes_per_exchange 1428 bytes/exchange
BENCH kafka_parser_fetch_v16_client_allocs_per_exchange 37.00 allocs/exchange
BENCH kafka_parser_fetch_v16_client_bytes_per_exchange 4884 bytes/exchange
";

    #[test]
    fn per_protocol_figures() {
        let rows = protocol_rows(&bench_lines(FIGURES));
        let row = |key: &str| rows.iter().find(|r| r.key == key).unwrap().values;
        // Two HTTP/1 messages per exchange; Kafka: the client's side, Fetch v16.
        assert_eq!(
            row("parser_exchanges_per_sec"),
            [Some(2e6), Some(1.5e6), Some(1.4e6), Some(9e5), Some(5e5)]
        );
        assert_eq!(
            row("pipeline_spans_per_sec"),
            [
                Some(361121.0),
                Some(300000.0),
                None,
                Some(400000.0),
                Some(120000.0)
            ]
        );
        assert_eq!(
            row("parser_allocs_per_exchange"),
            [Some(2.0), Some(3.0), Some(3.0), Some(10.0), Some(37.0)]
        );
        assert_eq!(
            unmeasured(&rows),
            [
                "pipeline_http2_client_spans_per_sec",
                "pipeline_http2_client_allocs_per_span",
                "pipeline_http2_client_bytes_per_span"
            ]
        );

        let json = protocols_json(&rows);
        assert_eq!(
            json["http1_keepalive_server"]["parser_exchanges_per_sec"],
            2e6
        );
        assert_eq!(json["http2_grpc_server"]["pipeline_allocs_per_span"], 11.25);
        assert!(json["http2_grpc_client"]["pipeline_spans_per_sec"].is_null());
        assert_eq!(
            json["kafka_fetch_v16_client"]["pipeline_allocs_per_span"],
            46.0
        );
        assert_eq!(json.as_object().unwrap().len(), 5);
        assert_eq!(
            json["http2_grpc_client"].as_object().unwrap().len(),
            rows.len()
        );

        let table = protocol_table(&rows);
        let line = |metric: &str| {
            table
                .lines()
                .find(|l| l.starts_with(metric))
                .unwrap()
                .split_whitespace()
                .rev()
                .take(6)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            line("whole path, one core"),
            ["spans/s", "120000", "400000", "-", "300000", "361121"]
        );
        assert_eq!(
            line("parser allocations"),
            ["allocs/exchange", "37.00", "10.00", "3.00", "3.00", "2.00"]
        );
        let heading = table.lines().next().unwrap();
        assert!(heading.contains("gRPC client") && heading.ends_with("Kafka consumer  unit"));
    }

    #[test]
    fn every_protocol_figure_has_a_bench_line() {
        let all: String = FIGURES.to_string()
            + "BENCH pipeline_http2_client_spans_per_sec 1 spans/s\n\
               BENCH pipeline_http2_client_allocs_per_span 1 allocs/span\n\
               BENCH pipeline_http2_client_bytes_per_span 1 bytes/span\n";
        assert!(unmeasured(&protocol_rows(&bench_lines(&all))).is_empty());
    }
}
