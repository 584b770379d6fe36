//! The capabilities the Helm chart gives kspan (deploy/helm/kspan, rendered in
//! deploy/kubernetes/kspan.yaml) are enough, and each one is needed.
//!
//! kspan runs as root with its capability bounding set cut down to the chart's list by
//! `setpriv` (a root process's effective capabilities are its bounding set; the inheritable and
//! ambient sets are cleared), and RLIMIT_MEMLOCK at 64 KiB, the default of systemd before 253
//! that a container runtime passes on. Two HTTP servers run as `nobody` (another user than
//! kspan's, as in most pods) before kspan starts: one selected with `--port`, one with `--pid`.
//! With the chart's list, kspan becomes ready (`/readyz`) and traces one request to each, with
//! their service names and executable paths. Then one run per capability removed shows what
//! fails without it.
//!
//! `kernel.perf_event_paranoid` is 2 during these runs (restored after), the upstream default.
//! Debian's kernels default to 3, which their own patch turns into "perf_event_open needs
//! CAP_SYS_ADMIN": the last test shows that, and that SYS_ADMIN (or the setting 2) is the way
//! out on such nodes.
//!
//! Needs root, BTF and tracefs (see `kspan_e2e::preflight`), the kspan binary (KSPAN_BIN),
//! setpriv (util-linux) and Debian's /usr/bin/python3 (`nobody` cannot run a python under
//! /root).

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use kspan_e2e::prometheus;
use kspan_e2e::*;
use serde_json::Value;

/// The chart rendered with its default values (checked against the chart by
/// `cargo xtask deploy-check`).
const MANIFEST: &str = "deploy/kubernetes/kspan.yaml";

/// uid and gid of `nobody`.
const NOBODY: u32 = 65534;

/// The servers' interpreter: readable and executable by `nobody`.
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// RLIMIT_MEMLOCK kspan starts with (soft and hard).
const MEMLOCK_LIMIT: u64 = 64 * 1024;

/// Sets `kernel.perf_event_paranoid` (a host-wide sysctl) for a test, restores it on drop.
struct PerfEventParanoid {
    previous: String,
}

const PERF_EVENT_PARANOID: &str = "/proc/sys/kernel/perf_event_paranoid";

impl PerfEventParanoid {
    fn set(level: u32) -> PerfEventParanoid {
        let previous = std::fs::read_to_string(PERF_EVENT_PARANOID)
            .unwrap_or_else(|e| panic!("cannot read {PERF_EVENT_PARANOID}: {e}"));
        std::fs::write(PERF_EVENT_PARANOID, level.to_string())
            .unwrap_or_else(|e| panic!("cannot write {PERF_EVENT_PARANOID}: {e}"));
        PerfEventParanoid {
            previous: previous.trim().to_string(),
        }
    }
}

impl Drop for PerfEventParanoid {
    fn drop(&mut self) {
        let _ = std::fs::write(PERF_EVENT_PARANOID, &self.previous);
    }
}

/// Capability name (as in Kubernetes and `setpriv`, upper or lower case) → number.
fn capability_number(name: &str) -> u32 {
    match name.to_ascii_uppercase().as_str() {
        "DAC_READ_SEARCH" => 2,
        "SYS_PTRACE" => 19,
        "SYS_ADMIN" => 21,
        "SYS_RESOURCE" => 24,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("capability {other} is not known to this test: add its number"),
    }
}

/// `capabilities.add` of the container in the plain manifest, in order.
fn chart_capabilities() -> Vec<String> {
    let path = workspace_root().join(MANIFEST);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut lines = text.lines().skip_while(|l| l.trim() != "capabilities:");
    lines.next();
    let mut lines = lines.skip_while(|l| l.trim() != "add:");
    lines.next();
    let capabilities: Vec<String> = lines
        .map_while(|l| l.trim().strip_prefix("- "))
        .map(|c| c.trim_matches('"').to_string())
        .collect();
    assert!(
        !capabilities.is_empty(),
        "{MANIFEST} has no `capabilities: add:` list"
    );
    capabilities
}

/// The chart's list without `removed`.
fn chart_capabilities_without(removed: &str) -> Vec<String> {
    let all = chart_capabilities();
    assert!(
        all.iter().any(|c| c == removed),
        "{removed} is not in the chart's list {all:?}: this test is out of date"
    );
    all.into_iter().filter(|c| c != removed).collect()
}

/// A capability set of `/proc/PID/status` (`CapEff`, `CapBnd`...).
fn capability_set(pid: &str, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    u64::from_str_radix(hex.trim(), 16).expect("hex capability set")
}

/// (major, minor) of the running kernel.
fn kernel_version() -> (u32, u32) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Before 5.11 the eBPF maps are charged to RLIMIT_MEMLOCK (later to the memory cgroup).
fn maps_count_against_memlock() -> bool {
    kernel_version() < (5, 11)
}

/// Reads a child's stream to the end in a thread.
fn read_all(mut reader: impl Read + Send + 'static) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut text = String::new();
        let _ = reader.read_to_string(&mut text);
        text
    })
}

/// `tests/servers/http_server.py` as `nobody`, with OTEL_SERVICE_NAME; killed on drop.
struct NobodyServer {
    child: Child,
    pid: u32,
    port: u16,
}

impl NobodyServer {
    fn start(service_name: &str) -> NobodyServer {
        assert!(
            Path::new(SYSTEM_PYTHON).is_file(),
            "{SYSTEM_PYTHON} is missing: the servers run as nobody with Debian's python3; \
             {SETUP_HINT}"
        );
        let mut child = Command::new("setpriv")
            .arg(format!("--reuid={NOBODY}"))
            .arg(format!("--regid={NOBODY}"))
            .args(["--clear-groups", "--", SYSTEM_PYTHON])
            .arg(server_script("http_server.py"))
            .env("OTEL_SERVICE_NAME", service_name)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run setpriv (util-linux; {SETUP_HINT}): {e}"));
        // setpriv execs python: the child's pid is the server's.
        let pid = child.id();
        let stdout = child.stdout.take().expect("piped stdout");
        let (sender, receiver) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(port) = line.strip_prefix("PORT ") {
                    let _ = sender.send(port.trim().parse::<u16>().ok());
                    break;
                }
            }
        });
        let port = receiver
            .recv_timeout(helper_timeout())
            .ok()
            .flatten()
            .unwrap_or_else(|| {
                let _ = child.kill();
                panic!("http_server.py as nobody printed no `PORT n` within the helper timeout")
            });
        NobodyServer { child, pid, port }
    }
}

impl Drop for NobodyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// kspan started with only `capabilities`, until ready or exited.
enum Started {
    Ready(CappedKspan),
    Exited { status: ExitStatus, stderr: String },
}

struct CappedKspan {
    child: Child,
    stdout: JoinHandle<String>,
    stderr: JoinHandle<String>,
    metrics_port: u16,
}

/// Starts kspan under `setpriv` with `capabilities` as its bounding set (so its effective set),
/// `--output json` and the Prometheus endpoint, and waits until `/readyz` answers 200 or kspan
/// exits.
fn start_kspan(capabilities: &[String], args: &[&str]) -> Started {
    let metrics_port = free_port();
    let metrics_address = format!("127.0.0.1:{metrics_port}");
    let keep: Vec<String> = capabilities
        .iter()
        .map(|c| format!("+{}", c.to_ascii_lowercase()))
        .collect();
    let mut command = Command::new("setpriv");
    command
        .args(["--inh-caps=-all", "--ambient-caps=-all"])
        .arg(format!("--bounding-set=-all,{}", keep.join(",")))
        .arg("--")
        .arg(kspan_bin())
        .args(args)
        .args(["--output", "json", "--prometheus-address", &metrics_address])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("OTEL_") {
            command.env_remove(&key);
        }
    }
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: MEMLOCK_LIMIT,
                rlim_max: MEMLOCK_LIMIT,
            };
            if libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run setpriv (util-linux; {SETUP_HINT}): {e}"));
    let stdout = read_all(child.stdout.take().expect("piped stdout"));
    let stderr = read_all(child.stderr.take().expect("piped stderr"));
    let deadline = Instant::now() + ready_timeout();
    loop {
        if let Some(status) = child.try_wait().expect("waitpid") {
            let stderr = stderr.join().unwrap_or_default();
            return Started::Exited { status, stderr };
        }
        if prometheus::http_get(metrics_port, "/readyz").is_ok_and(|(code, _, _)| code == 200) {
            return Started::Ready(CappedKspan {
                child,
                stdout,
                stderr,
                metrics_port,
            });
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "kspan was not ready within {:?}:\n{}",
                ready_timeout(),
                stderr.join().unwrap_or_default()
            );
        }
        // Polling the endpoint a test waits for, like the harness polls a child's exit.
        thread::sleep(Duration::from_millis(20));
    }
}

impl CappedKspan {
    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    /// SIGINT, then its spans and stderr; asserts a clean exit.
    fn stop(mut self) -> (Vec<Value>, String) {
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        assert_eq!(rc, 0, "kill(SIGINT): {}", std::io::Error::last_os_error());
        let deadline = Instant::now() + stop_timeout();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("waitpid") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("kspan did not stop within {:?} of SIGINT", stop_timeout());
            }
            thread::sleep(Duration::from_millis(20));
        };
        let stdout = self.stdout.join().unwrap_or_default();
        let stderr = self.stderr.join().unwrap_or_default();
        assert!(status.success(), "kspan exited with {status}:\n{stderr}");
        let spans = stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        (spans, stderr)
    }
}

/// The two servers, kspan selecting one by port and one by pid, one request to each.
struct Scenario {
    by_port: NobodyServer,
    by_pid: NobodyServer,
    /// The test's client ports of the request to each.
    by_port_client: u16,
    by_pid_client: u16,
    spans: Vec<Value>,
    stderr: String,
}

/// Runs kspan with `capabilities` over the two servers. `Err` when kspan exits before ready.
fn run_scenario(capabilities: &[String]) -> Result<Scenario, (ExitStatus, String)> {
    let by_port = NobodyServer::start("captest-port");
    let by_pid = NobodyServer::start("captest-pid");
    let port = by_port.port.to_string();
    let pid = by_pid.pid.to_string();
    let kspan = match start_kspan(capabilities, &["--port", &port, "--pid", &pid]) {
        Started::Ready(kspan) => kspan,
        Started::Exited { status, stderr } => return Err((status, stderr)),
    };
    // setpriv did what this test says: kspan's effective set is the list, as far as the
    // test's own bounding set allows (a host may withhold some, e.g. SYS_RESOURCE).
    let wanted: u64 = capabilities
        .iter()
        .map(|c| 1u64 << capability_number(c))
        .fold(0, |set, bit| set | bit);
    let available = capability_set("self", "CapBnd");
    assert_eq!(
        capability_set(&kspan.pid(), "CapEff"),
        wanted & available,
        "kspan's effective capabilities are not {capabilities:?}"
    );
    let (code, _, body) = prometheus::http_get(kspan.metrics_port, "/healthz").expect("/healthz");
    assert_eq!(code, 200, "/healthz: {body}");

    // The test process is not traced: each request makes its server's span only.
    let get = |server: &NobodyServer, path: &str| {
        let response = prometheus::get(server.port, path).expect("GET");
        assert_eq!(response.status, 200, "{path}: {}", response.body);
        response.local_port
    };
    let by_port_client = get(&by_port, "/users/1");
    let by_pid_client = get(&by_pid, "/users/2");
    let (spans, stderr) = kspan.stop();
    Ok(Scenario {
        by_port,
        by_pid,
        by_port_client,
        by_pid_client,
        spans,
        stderr,
    })
}

impl Scenario {
    /// The span of `server`'s process, if any (at most one).
    fn span_of(&self, server: &NobodyServer) -> Option<&Value> {
        let spans = by_pid(&self.spans, server.pid);
        assert!(spans.len() <= 1, "{} spans:\n{}", spans.len(), self.stderr);
        spans.first().copied()
    }
}

/// What a traced server's exact span is: its request, its client, its resource.
fn assert_server_span(
    span: &Value,
    server: &NobodyServer,
    client_port: u16,
    path: &str,
    service_name: &str,
    executable_path: Option<&Path>,
) {
    check_span_shape(span).unwrap_or_else(|e| panic!("{e}: {}", pretty(span)));
    assert_eq!(name(span), "GET /users/*", "{}", pretty(span));
    assert_eq!(span["kind"], "SERVER", "{}", pretty(span));
    assert_attributes(
        span,
        &[
            ("http.request.method", s("GET")),
            ("url.path", s(path)),
            ("url.scheme", s("http")),
            ("http.response.status_code", int(200)),
            ("network.protocol.version", s("1.1")),
            ("server.address", s("127.0.0.1")),
            ("server.port", int(server.port)),
            ("client.address", s("127.0.0.1")),
            ("client.port", int(client_port)),
            ("network.peer.address", s("127.0.0.1")),
            ("network.peer.port", int(client_port)),
        ],
    );
    assert_eq!(res_i64(span, "process.pid"), Some(server.pid as i64));
    assert_eq!(
        res_str(span, "service.name"),
        Some(service_name),
        "{}",
        pretty(span)
    );
    let expected_path = executable_path.map(|p| p.to_string_lossy().into_owned());
    assert_eq!(
        res_str(span, "process.executable.path"),
        expected_path.as_deref(),
        "{}",
        pretty(span)
    );
}

fn python_path() -> PathBuf {
    std::fs::canonicalize(SYSTEM_PYTHON).expect("canonical python path")
}

fn python_file_name() -> String {
    python_path()
        .file_name()
        .expect("file name")
        .to_string_lossy()
        .into_owned()
}

/// With the chart's list (and nothing else: no SYS_ADMIN), kspan is ready, traces both
/// servers, and reads their environment and executable.
#[test]
fn the_charts_capabilities_are_enough() {
    let _env = preflight();
    let _paranoid = PerfEventParanoid::set(2);
    let capabilities = chart_capabilities();
    let run = run_scenario(&capabilities).unwrap_or_else(|(status, stderr)| {
        panic!("kspan with {capabilities:?} exited ({status}) before ready:\n{stderr}")
    });
    assert_eq!(run.spans.len(), 2, "{:#?}\n{}", run.spans, run.stderr);
    let python = python_path();
    let span = run.span_of(&run.by_port).expect("the --port server's span");
    assert_server_span(
        span,
        &run.by_port,
        run.by_port_client,
        "/users/1",
        "captest-port",
        Some(&python),
    );
    let span = run.span_of(&run.by_pid).expect("the --pid server's span");
    assert_server_span(
        span,
        &run.by_pid,
        run.by_pid_client,
        "/users/2",
        "captest-pid",
        Some(&python),
    );
}

/// BPF: creating the eBPF maps (and loading the programs) is refused.
#[test]
fn without_bpf_kspan_cannot_create_its_maps() {
    let _env = preflight();
    let _paranoid = PerfEventParanoid::set(2);
    let Err((status, stderr)) = run_scenario(&chart_capabilities_without("BPF")) else {
        panic!("kspan became ready without CAP_BPF");
    };
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot load the eBPF object")
            && stderr.contains("Operation not permitted"),
        "{stderr}"
    );
}

/// PERFMON: the tracepoint programs (a tracing program type) are refused by the kernel.
#[test]
fn without_perfmon_kspan_cannot_load_its_programs() {
    let _env = preflight();
    let _paranoid = PerfEventParanoid::set(2);
    let Err((status, stderr)) = run_scenario(&chart_capabilities_without("PERFMON")) else {
        panic!("kspan became ready without CAP_PERFMON");
    };
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cannot load program") && stderr.contains("Operation not permitted"),
        "{stderr}"
    );
}

/// SYS_PTRACE: /proc/PID/fd/N and /proc/PID/exe of another user's process cannot be read: the
/// server listening on the selected port is never found (no span), and the other has no
/// executable path.
#[test]
fn without_sys_ptrace_kspan_cannot_see_other_processes_sockets_or_executables() {
    let _env = preflight();
    let _paranoid = PerfEventParanoid::set(2);
    let run = run_scenario(&chart_capabilities_without("SYS_PTRACE"))
        .unwrap_or_else(|(status, stderr)| panic!("kspan exited ({status}):\n{stderr}"));
    assert!(
        run.span_of(&run.by_port).is_none(),
        "the --port server was found without CAP_SYS_PTRACE:\n{:#?}",
        run.spans
    );
    let span = run.span_of(&run.by_pid).expect("the --pid server's span");
    assert_eq!(
        res_str(span, "process.executable.path"),
        None,
        "{}",
        pretty(span)
    );
    assert_eq!(run.spans.len(), 1, "{:#?}", run.spans);
}

/// DAC_READ_SEARCH: /proc/PID/fd and /proc/PID/environ of another user's process are its own
/// (mode 0500 and 0400): the server on the selected port is never found, and the other's
/// OTEL_SERVICE_NAME is unknown (its service is named after its executable).
#[test]
fn without_dac_read_search_kspan_cannot_read_other_users_fds_or_environment() {
    let _env = preflight();
    let _paranoid = PerfEventParanoid::set(2);
    let run = run_scenario(&chart_capabilities_without("DAC_READ_SEARCH"))
        .unwrap_or_else(|(status, stderr)| panic!("kspan exited ({status}):\n{stderr}"));
    assert!(
        run.span_of(&run.by_port).is_none(),
        "the --port server was found without CAP_DAC_READ_SEARCH:\n{:#?}",
        run.spans
    );
    let span = run.span_of(&run.by_pid).expect("the --pid server's span");
    let python = python_path();
    assert_server_span(
        span,
        &run.by_pid,
        run.by_pid_client,
        "/users/2",
        &python_file_name(),
        Some(&python),
    );
    assert_eq!(run.spans.len(), 1, "{:#?}", run.spans);
}

/// SYS_RESOURCE: before Linux 5.11 the eBPF maps count against RLIMIT_MEMLOCK, which kspan
/// (aya) raises when a map is refused; without the capability it cannot, and kspan fails. From
/// 5.11 the maps are charged to the memory cgroup and the limit does not matter: kspan works
/// without it (a chart for 5.11+ nodes only may drop it).
#[test]
fn without_sys_resource_kspan_fails_before_linux_5_11_only() {
    let _env = preflight();
    let _paranoid = PerfEventParanoid::set(2);
    let result = run_scenario(&chart_capabilities_without("SYS_RESOURCE"));
    if maps_count_against_memlock() {
        let Err((status, stderr)) = result else {
            panic!(
                "kspan became ready on Linux {:?} with a {MEMLOCK_LIMIT}-byte RLIMIT_MEMLOCK \
                 and without CAP_SYS_RESOURCE",
                kernel_version()
            );
        };
        assert_eq!(status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("cannot load the eBPF object")
                && stderr.contains("Operation not permitted"),
            "{stderr}"
        );
    } else {
        let run =
            result.unwrap_or_else(|(status, stderr)| panic!("kspan exited ({status}):\n{stderr}"));
        assert_eq!(run.spans.len(), 2, "{:#?}\n{}", run.spans, run.stderr);
    }
}

/// Debian's kernels (5.10, 6.1, 6.12 and 7.2 measured) default to perf_event_paranoid 3, and
/// their patch makes perf_event_open need CAP_SYS_ADMIN at that level, CAP_PERFMON or not:
/// kspan cannot attach its tracepoints with the chart's list. With SYS_ADMIN added it can
/// (the other way out is the setting 2 on the node). A kernel without that patch treats 3 as 2.
#[test]
fn with_debians_perf_event_paranoid_3_attaching_needs_sys_admin() {
    let _env = preflight();
    let _paranoid = PerfEventParanoid::set(3);
    match run_scenario(&chart_capabilities()) {
        Ok(run) => {
            println!("this kernel has no perf_event_paranoid 3 of its own: the chart's list works");
            assert_eq!(run.spans.len(), 2, "{:#?}\n{}", run.spans, run.stderr);
        }
        Err((status, stderr)) => {
            assert_eq!(status.code(), Some(1), "{stderr}");
            assert!(
                stderr.contains("cannot attach to tracepoint")
                    && stderr.contains("perf_event_open"),
                "{stderr}"
            );
            let mut with_sys_admin = chart_capabilities();
            with_sys_admin.push("SYS_ADMIN".to_string());
            let run = run_scenario(&with_sys_admin).unwrap_or_else(|(status, stderr)| {
                panic!("kspan with SYS_ADMIN too exited ({status}):\n{stderr}")
            });
            assert_eq!(run.spans.len(), 2, "{:#?}\n{}", run.spans, run.stderr);
        }
    }
}
