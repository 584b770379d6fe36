//! End-to-end tests of kspan's own health: every counter of its `kspan: stopped:` line is a
//! live metric over OTLP and Prometheus while it runs, so a DaemonSet that never exits shows its
//! losses; the Prometheus endpoint (`--prometheus-address`) answers while a silent client holds
//! a connection open.
//!
//! Needs root, BTF and tracefs (see `kspan_e2e::preflight`), the kspan binary (KSPAN_BIN),
//! python3 and curl.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::thread;
use std::time::{Duration, Instant};

use kspan_e2e::otlp_receiver::*;
use kspan_e2e::process_tree::ProcessTree;
use kspan_e2e::prometheus;
use kspan_e2e::*;
use serde_json::Value;

/// Stop-line name → OpenTelemetry metric name (Prometheus: dots to `_`, then `_total`).
const STOP_LINE_TO_METRIC: &[(&str, &str)] = &[
    ("events_received", "kspan.events.received"),
    ("events_lost", "kspan.events.lost"),
    ("malformed_events", "kspan.events.malformed"),
    ("parse_errors", "kspan.parse.errors"),
    ("spans_emitted", "kspan.spans.emitted"),
    ("spans_sampled_out", "kspan.spans.sampled_out"),
    ("spans_dropped", "kspan.spans.dropped"),
    ("spans_exported", "kspan.spans.exported"),
    ("export_failures", "kspan.export.failures"),
    ("kubernetes_api_errors", "kspan.kubernetes.api_errors"),
    ("exporters_stopped", "kspan.exporters.stopped"),
    ("links_ambiguous", "kspan.links.ambiguous"),
    ("links_mismatched", "kspan.links.mismatched"),
    ("links_late", "kspan.links.late"),
    ("links_dropped", "kspan.links.dropped"),
    ("connections_dropped", "kspan.connections.dropped"),
    ("connections_muted", "kspan.connections.muted"),
    ("parse_desynchronised", "kspan.parse.desynchronised"),
    ("parse_limits_hit", "kspan.parse.limits_hit"),
    ("parser_evictions_budget", "kspan.parse.evictions.budget"),
    ("parser_evictions_timeout", "kspan.parse.evictions.timeout"),
    ("socket_table_scans", "kspan.procfs.socket_table_scans"),
    (
        "unknown_socket_events_deferred",
        "kspan.events.unknown_socket",
    ),
    ("kernel_read_errors", "kspan.kernel.read_errors"),
    ("kernel_map_full", "kspan.kernel.map_full"),
    ("in_flight_collisions", "kspan.kernel.in_flight_collisions"),
    ("scratch_busy", "kspan.kernel.scratch_busy"),
    ("program_misses", "kspan.program.misses"),
    ("message_links_dropped", "kspan.messaging.links.dropped"),
    ("series_overflow", "kspan.metrics.series_overflow"),
    ("tls_libraries_attached", "kspan.tls.libraries_attached"),
    ("tls_unbound", "kspan.tls.unbound"),
    ("tls_writes_expired", "kspan.tls.writes_expired"),
    ("tls_processes_unseen", "kspan.tls.processes_unseen"),
];

fn prometheus_name(metric: &str) -> String {
    format!("{}_total", metric.replace('.', "_"))
}

/// kspan's health counters while it runs, over Prometheus and OTLP: every name of the stop
/// line has its metric (one series under service.name "kspan"), events received is non-zero.
#[test]
fn every_stop_line_counter_is_a_live_metric() {
    let _env = preflight();
    let rx = OtlpReceiver::start_grpc(0);
    let prom_port = free_port();
    let prom_arg = format!("127.0.0.1:{prom_port}");
    let server = PyServer::start(Some("health-server"));
    let spid = server.pid.to_string();
    let endpoint = rx.endpoint();
    let kspan = Kspan::start_with_env(
        &[
            "--pid",
            &spid,
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            "grpc",
            "--prometheus-address",
            &prom_arg,
        ],
        &[("OTEL_METRIC_EXPORT_INTERVAL", "1000")],
    );
    let kspan_pid = kspan.pid().to_string();
    curl(&["-o", "/dev/null", &server.url("/health")]);

    // A client that connects and sends nothing stays connected through the scrapes below:
    // it must not stall them.
    let silent = std::net::TcpStream::connect(("127.0.0.1", prom_port)).expect("connect");

    // Prometheus, while kspan runs: poll until events received is counted.
    let deadline = Instant::now() + scaled(10);
    let (samples, text) = loop {
        let fetched = prometheus::http_get(prom_port, "/metrics");
        if let Ok((200, _, body)) = &fetched {
            let samples = prometheus::parse_text(body);
            let received = samples.iter().any(|s| {
                s.name == "kspan_events_received_total"
                    && s.label("service_name") == Some("kspan")
                    && s.value > 0.0
            });
            if received {
                break (samples, body.clone());
            }
        }
        assert!(
            Instant::now() < deadline,
            "no kspan_events_received_total > 0 on the Prometheus endpoint in time: {fetched:?}"
        );
        thread::sleep(Duration::from_millis(100));
    };
    for (stop_name, metric) in STOP_LINE_TO_METRIC {
        let name = prometheus_name(metric);
        let series: Vec<_> = samples
            .iter()
            .filter(|s| s.name == name && s.label("service_name") == Some("kspan"))
            .collect();
        assert_eq!(
            series.len(),
            1,
            "one {name} series (stop-line {stop_name}) on the Prometheus endpoint:\n{text}"
        );
        assert_eq!(
            series[0].label("process_pid"),
            Some(kspan_pid.as_str()),
            "{name}: {:?}",
            series[0]
        );
    }

    drop(silent);

    // OTLP, periodic export while kspan runs.
    let health = |requests: &[proto::collector::metrics::v1::ExportMetricsServiceRequest]| {
        latest_per_resource(requests)
            .into_iter()
            .filter(|(r, _)| r.get("service.name") == Some(&Value::from("kspan")))
            .collect::<Vec<_>>()
    };
    let arrived = rx.wait_for_metrics_where(scaled(6), |requests| {
        let health = health(requests);
        sum_points(&health, "kspan.events.received")
            .iter()
            .any(|p| p.value > 0.0)
            && STOP_LINE_TO_METRIC
                .iter()
                .all(|(_, metric)| !sum_points(&health, metric).is_empty())
    });
    let live = health(&rx.metric_requests());
    let mut otlp_value = BTreeMap::new();
    for (stop_name, metric) in STOP_LINE_TO_METRIC {
        let points = sum_points(&live, metric);
        assert_eq!(
            points.len(),
            1,
            "one {metric} point (stop-line {stop_name}) over OTLP while kspan runs (arrived: \
             {arrived}); metrics: {:?}",
            metric_names(&live)
        );
        assert!(points[0].is_monotonic, "{metric}: {:?}", points[0]);
        otlp_value.insert(*stop_name, points[0].value);
    }
    assert!(
        otlp_value["events_received"] > 0.0,
        "events received over OTLP: {otlp_value:?}"
    );

    // The table covers the whole stop line: a counter added there must be added here too.
    let run = kspan.stop();
    let stop_line = run.counters();
    for name in stop_line.keys() {
        assert!(
            STOP_LINE_TO_METRIC.iter().any(|(s, _)| s == name),
            "stop-line counter {name} has no live metric in STOP_LINE_TO_METRIC: {stop_line:?}"
        );
    }
    assert_eq!(
        stop_line.len(),
        STOP_LINE_TO_METRIC.len(),
        "stop line: {stop_line:?}"
    );
}

/// A traced process with 50 threads forks 50 children that each connect to it, then the
/// children are killed: the kernel maps' fill levels, read over Prometheus, show one pid-filter
/// entry per process (threads take none), and every entry, pre-filter slot and tracked socket of
/// the children goes away with them.
#[test]
fn kernel_maps_return_to_their_baseline() {
    let _env = preflight();
    let prom_port = free_port();
    let prom_arg = format!("127.0.0.1:{prom_port}");
    let mut tree = ProcessTree::start(50, 50);
    let parent_pid = tree.pid.to_string();
    let kspan = Kspan::start(&["--pid", &parent_pid, "--prometheus-address", &prom_arg]);
    // The census counts every 5 s: wait for the levels to reach what is expected (or time out
    // and show what they were).
    let wait_for = |what: &str, expected: &[(&str, f64)]| {
        prometheus::wait_for_kspan_values(prom_port, what, expected, scaled(20))
    };

    tree.fork();
    // 51 processes: the parent and its children; its 50 threads take no entry (they did, one
    // each, before task_newtask replaced sched_process_fork).
    wait_for(
        "with 50 threads and 50 children",
        &[
            ("kspan_kernel_traced_pids", 51.0),
            ("kspan_kernel_connections", 50.0),
        ],
    );
    tree.kill_children();
    // Back to the parent alone: its pid entry and its one pre-filter slot (the children's slots
    // were never cleared before), and no socket left of the children (they never closed them).
    wait_for(
        "after the children were killed",
        &[
            ("kspan_kernel_traced_pids", 1.0),
            ("kspan_kernel_prefilter_slots", 1.0),
            ("kspan_kernel_connections", 0.0),
        ],
    );
    drop(tree);
    drop(kspan);
}

/// Traced processes flood loopback connections with requests (one `send` each, never
/// answered) for as long as they live: kspan keeps answering scrapes with a growing event count,
/// because the ring buffer is drained in bounded slices between which the stop flag, flushes
/// and counters are served; and it stops while the flood goes on. Not within the 5 s of a quiet
/// machine: detaching each of its tracepoints waits for a kernel grace period, and with every
/// core busy in syscalls those took 1-9 s in all here (kernel-bound); within Kubernetes' default
/// termination grace period, 30 s. Before the final drain was bounded, it never stopped.
#[test]
fn scrapes_and_the_stop_are_served_during_a_flood() {
    let _env = preflight();
    let prom_port = free_port();
    let prom_arg = format!("127.0.0.1:{prom_port}");
    // Four flooding processes (the parent and three children, traced as its descendants): more
    // events than kspan can take on this machine's two cores, so the ring never runs empty.
    let script = r#"
import os, socket, sys, threading
sys.stdin.readline()
parent = True
for _ in range(3):
    if os.fork() == 0:
        parent = False
        break
listener = socket.socket(); listener.bind(("127.0.0.1", 0)); listener.listen(1)
client = socket.create_connection(listener.getsockname())
server, _ = listener.accept()
def drain():
    while server.recv(65536):
        pass
threading.Thread(target=drain, daemon=True).start()
if parent:
    print("flooding", flush=True)
request = b"GET /flood HTTP/1.1\r\nHost: x\r\n\r\n"
while True:
    client.send(request)
"#;
    // Its own process group: the children are killed with it, whatever the test's outcome.
    let mut flood = ProcessGroup(
        std::process::Command::new(python())
            .args(["-c", script])
            .process_group(0)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start python3"),
    );
    let flood_pid = flood.0.id().to_string();
    let kspan = Kspan::start_with_output(
        &["--pid", &flood_pid, "--prometheus-address", &prom_arg],
        "none",
    );
    {
        use std::io::{BufRead, Write};
        let mut stdin = flood.0.stdin.take().unwrap();
        writeln!(stdin, "go").expect("start the flood");
        let mut line = String::new();
        std::io::BufReader::new(flood.0.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("read the flood's start");
        assert_eq!(line.trim(), "flooding");
    }
    let received = || -> f64 {
        let (status, _, body) =
            prometheus::http_get(prom_port, "/metrics").expect("a scrape during the flood");
        assert_eq!(status, 200, "{body}");
        prometheus::parse_text(&body)
            .into_iter()
            .find(|s| s.name == "kspan_events_received_total")
            .map(|s| s.value)
            .expect("kspan_events_received_total")
    };
    // Scrapes, each answered, the count growing between them, until the flood has brought
    // 10,000 events (at least three growths): how long that takes depends on the machine (a
    // single emulated CPU shared by the flood and kspan), so it is waited for, not assumed.
    let mut last = received();
    let mut growths = 0;
    while growths < 3 || last < 10_000.0 {
        let deadline = Instant::now() + scaled(10);
        loop {
            let now = received();
            if now > last {
                last = now;
                growths += 1;
                break;
            }
            assert!(
                Instant::now() < deadline,
                "events received stuck at {now} during the flood"
            );
            thread::sleep(Duration::from_millis(200));
        }
    }
    // The flood goes on while kspan stops.
    let run = kspan.stop_within(scaled(30));
    drop(flood);
    let counters = run.counters();
    assert!(
        counters["events_received"] >= 10_000,
        "a flood: {counters:?}"
    );
}

/// A process and its process group, killed on drop.
struct ProcessGroup(std::process::Child);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: kill(2) with a negative pid signals the group the child leads.
        unsafe { libc::kill(-(self.0.id() as libc::pid_t), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

/// `--bench-floor` (the benchmark's floor of the hooks): every tracepoint attached with a
/// program that returns at once, so a traced server's requests reach kspan as nothing at all.
#[test]
fn the_bench_floor_attaches_the_hooks_and_sees_nothing() {
    let _env = preflight();
    let server = PyServer::start(Some("floor-server"));
    let spid = server.pid.to_string();
    let kspan = Kspan::start(&["--pid", &spid, "--bench-floor"]);
    let links = bpf_links(kspan.pid());
    for _ in 0..3 {
        curl(&["-o", "/dev/null", &server.url("/floor")]);
    }
    let run = kspan.stop();
    assert!(
        run.stderr
            .contains("--bench-floor: every tracepoint and uprobe runs a program"),
        "{}",
        run.stderr
    );
    assert!(
        run.spans.is_empty(),
        "no span in the floor mode: {:?}",
        run.spans
    );
    let counters = run.counters();
    assert_eq!(counters["events_received"], 0, "{counters:?}");
    assert_eq!(counters["spans_emitted"], 0, "{counters:?}");
    // Since Linux 5.15 a tracepoint attachment is a BPF link, which names its program: every
    // one of the 31 tracepoints (and the libssl uprobes) runs one of the three floor programs.
    // Older kernels attach through perf events, which do not say.
    if kernel_release_at_least(5, 15) {
        assert!(links.len() >= 31, "{} links: {links:?}", links.len());
        let programs: std::collections::BTreeSet<_> = links.iter().collect();
        assert!(
            programs.len() <= 3,
            "the links run {} programs: {programs:?}",
            programs.len()
        );
    }
}

/// The program id of each BPF link `pid` holds (`/proc/PID/fdinfo`).
fn bpf_links(pid: u32) -> Vec<u64> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut programs = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir}: {e}")) {
        let Ok(text) = std::fs::read_to_string(entry.unwrap().path()) else {
            continue;
        };
        if !text.lines().any(|l| l.starts_with("link_type:")) {
            continue;
        }
        let program: Option<u64> = text
            .lines()
            .find_map(|l| l.strip_prefix("prog_id:")?.trim().parse().ok());
        programs.extend(program);
    }
    programs
}

fn kernel_release_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    found >= (major, minor)
}

/// `kspan check`: every prerequisite met on this machine as root (exit 0); run as nobody
/// without capabilities, the missing privileges are named with what to do (exit 1).
#[test]
fn kspan_check_passes_as_root_and_names_what_an_unprivileged_user_lacks() {
    let _env = preflight();
    let out = std::process::Command::new(kspan_bin())
        .arg("check")
        .output()
        .expect("run kspan check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "kspan check as root:\n{text}");
    assert!(text.ends_with("kspan can run here.\n"), "{text}");
    for name in [
        "kernel",
        "privileges",
        "BTF",
        "tracefs",
        "syscall tracepoints",
        "ring buffer",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("ok ") && l[9..].starts_with(name)),
            "no ok line for {name}:\n{text}"
        );
    }
    assert!(!text.contains("MISSING"), "{text}");

    // A copy nobody may execute (the build tree may be closed to other users).
    let dir = std::env::temp_dir().join(format!("kspan-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temporary directory");
    let bin = dir.join("kspan");
    std::fs::copy(kspan_bin(), &bin).expect("copy kspan");
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["--inh-caps=-all", "--bounding-set=-all"])
        .arg(&bin)
        .arg("check")
        .output()
        .expect("run setpriv (util-linux)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "kspan check as nobody:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("MISSING  privileges"), "{text}");
    assert!(text.contains("lacking CAP_BPF, CAP_PERFMON"), "{text}");
    assert!(text.contains("fix: run kspan as root"), "{text}");
    assert!(text.contains("kspan cannot run here:"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}
