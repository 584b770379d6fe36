//! End-to-end test harness for kspan.
//!
//! Every test starts with `let _env = preflight();`: it checks the machine can
//! run eBPF tests (root, BTF, tracefs) and takes a lock that serializes the
//! tests (one kspan attached at a time, also across processes), held until the
//! returned guard drops. Then:
//!
//! * [`PyServer::start`] starts `servers/http_server.py` (killed on drop),
//! * [`KeepaliveClient::start`] starts `servers/keepalive_client.py` (idle until [`KeepaliveClient::go`]),
//! * [`Kspan::start`] starts kspan with `--output json` and waits for `ready`,
//! * [`curl`] runs curl and reports its pid and local port,
//! * [`Kspan::stop`] sends SIGINT and returns a [`Run`] with the parsed spans.
//!
//! Span helpers ([`kind`], [`by_pid`], [`attr_str`], [`assert_attributes`], ...)
//! work on the `serde_json::Value` spans of a [`Run`].
//!
//! For the export tests: [`Kspan::start_with_env`] passes extra environment
//! variables to kspan (which never inherits the test's `OTEL_*` variables),
//! [`otlp_receiver::OtlpReceiver`] is a real OTLP collector stand-in (gRPC or
//! HTTP/protobuf), [`prometheus`] fetches and parses a `/metrics` page, and
//! [`free_port`], [`kspan_version`], [`which`], [`hostname`] help build
//! expectations.
//!
//! For the trace-context tests, [`chain`] starts chains of `servers/chain_server.py` tiers, the
//! OpenTelemetry-SDK client and the load client.
//!
//! For the state and hostile-traffic tests: [`process_tree::ProcessTree`] forks traced children
//! that hold a connection and has them killed, [`silent_collector::SilentCollector`] is an OTLP
//! endpoint that accepts connections and never answers, [`proc_memory`] reads a process's peak
//! and current resident set, [`raise_open_files_limit`] makes room for many sockets.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

pub mod chain;
pub mod grpc;
pub mod kafka;
pub mod observed;
pub mod otlp_receiver;
pub mod process_tree;
pub mod prometheus;
pub mod silent_collector;
pub mod tls;

/// How long kspan may take to print `ready`.
pub fn ready_timeout() -> Duration {
    scaled(60)
}
/// How long kspan may take to exit after SIGINT (contract).
pub fn stop_contract() -> Duration {
    scaled(5)
}
/// How long we wait after SIGINT before killing kspan.
pub fn stop_timeout() -> Duration {
    scaled(10)
}
/// How long helper processes (servers, clients) may take to start or finish.
pub fn helper_timeout() -> Duration {
    scaled(30)
}

/// `secs` seconds times [`time_scale`].
pub fn scaled(secs: u64) -> Duration {
    Duration::from_secs(secs * time_scale())
}

/// `KSPAN_E2E_TIME_SCALE` (default 1). The kernel-matrix guests of `cargo xtask vmtest` run
/// under software emulation, 5-15x slower, and on PREEMPT_RT the kernel's detaching of each
/// tracepoint takes most of a second there: they set a scale. Only deadlines stretch (the
/// harness's, and timeouts a test gives kspan); what a test asserts about spans does not change.
pub fn time_scale() -> u64 {
    static SCALE: OnceLock<u64> = OnceLock::new();
    *SCALE.get_or_init(|| match std::env::var("KSPAN_E2E_TIME_SCALE") {
        Ok(value) => {
            value.parse().ok().filter(|&n| n >= 1).unwrap_or_else(|| {
                panic!("KSPAN_E2E_TIME_SCALE={value:?} is not a whole number >= 1")
            })
        }
        Err(_) => 1,
    })
}

/// Cross-process lock file serializing e2e runs on this machine.
const LOCK_FILE: &str = "/tmp/kspan-e2e.lock";

// ---------------------------------------------------------------------------
// Preflight and the global test lock
// ---------------------------------------------------------------------------

static TEST_MUTEX: Mutex<()> = Mutex::new(());

thread_local! {
    static HOLDS_LOCK: Cell<bool> = const { Cell::new(false) };
}

/// Guard returned by [`preflight`]; the test owns the machine while it lives.
/// Keep it alive for the whole test: `let _env = preflight();`.
pub struct TestEnv {
    _file_lock: File,
    _guard: MutexGuard<'static, ()>,
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        HOLDS_LOCK.with(|h| h.set(false));
        // The flock is released when `_file_lock` closes, the mutex when
        // `_guard` drops.
    }
}

/// Checks the prerequisites of the e2e tests and panics with a clear message
/// naming what is missing. Never skips. Then takes the global test lock.
pub fn preflight() -> TestEnv {
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "kspan e2e preflight: these tests must run as root (euid is {euid}); \
         kspan loads eBPF programs. Run them as root, e.g. `sudo -E cargo xtask test`."
    );
    assert!(
        Path::new("/sys/kernel/btf/vmlinux").exists(),
        "kspan e2e preflight: /sys/kernel/btf/vmlinux is missing: the kernel has no BTF. \
         Use a kernel built with CONFIG_DEBUG_INFO_BTF=y."
    );
    assert!(
        Path::new("/sys/kernel/tracing/events/syscalls").is_dir(),
        "kspan e2e preflight: /sys/kernel/tracing/events/syscalls is missing: tracefs is not \
         mounted (or the kernel lacks CONFIG_FTRACE_SYSCALLS). Mount it with \
         `mount -t tracefs nodev /sys/kernel/tracing`."
    );
    assert!(
        !HOLDS_LOCK.with(|h| h.get()),
        "preflight() called twice in the same test"
    );

    let guard = TEST_MUTEX
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(LOCK_FILE)
        .unwrap_or_else(|e| panic!("cannot open lock file {LOCK_FILE}: {e}"));
    loop {
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc == 0 {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            panic!("cannot lock {LOCK_FILE}: {err}");
        }
    }
    HOLDS_LOCK.with(|h| h.set(true));
    TestEnv {
        _file_lock: file,
        _guard: guard,
    }
}

fn assert_lock_held(what: &str) {
    assert!(
        HOLDS_LOCK.with(|h| h.get()),
        "{what}: call `let _env = kspan_e2e::preflight();` at the start of the test \
         (it checks prerequisites and serializes the tests)"
    );
}

// ---------------------------------------------------------------------------
// Paths
// ---------------------------------------------------------------------------

/// The tests crate directory (`<workspace>/tests`).
pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The workspace root (parent of the tests crate).
pub fn workspace_root() -> PathBuf {
    crate_dir()
        .parent()
        .expect("tests crate has a parent directory")
        .to_path_buf()
}

/// `$KSPAN_BIN`, else `<workspace>/target/release/kspan`. Panics if missing.
pub fn kspan_bin() -> PathBuf {
    let (path, from_env) = match std::env::var_os("KSPAN_BIN") {
        Some(p) if !p.is_empty() => (PathBuf::from(p), true),
        _ => (workspace_root().join("target/release/kspan"), false),
    };
    if !path.is_file() {
        panic!(
            "kspan binary not found at {} ({}). Run `cargo xtask test` (which builds it), \
             or build it and point KSPAN_BIN at it.",
            path.display(),
            if from_env {
                "from KSPAN_BIN"
            } else {
                "default path; KSPAN_BIN is not set"
            }
        );
    }
    path
}

/// Path of a helper script under `tests/servers/`.
pub fn server_script(name: &str) -> PathBuf {
    crate_dir().join("servers").join(name)
}

/// The real Python interpreter (resolved once through `python3` on PATH,
/// which may be a pyenv shim, then canonicalized so that the traced process's
/// executable file name is stable, e.g. `python3.11`). `KSPAN_E2E_PYTHON`
/// overrides it.
pub fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let raw = match std::env::var_os("KSPAN_E2E_PYTHON") {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => {
                let out = Command::new("python3")
                    .args(["-c", "import sys; print(sys.executable)"])
                    .stdin(Stdio::null())
                    .output()
                    .unwrap_or_else(|e| {
                        panic!("cannot run python3 (needed for the test servers): {e}")
                    });
                assert!(
                    out.status.success(),
                    "python3 -c 'import sys; print(sys.executable)' failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
                assert!(!s.is_empty(), "python3 did not report sys.executable");
                PathBuf::from(s)
            }
        };
        std::fs::canonicalize(&raw)
            .unwrap_or_else(|e| panic!("cannot resolve python interpreter {}: {e}", raw.display()))
    })
}

/// File name of the Python interpreter, i.e. the traced server's executable name.
pub fn python_exe_name() -> String {
    python()
        .file_name()
        .expect("interpreter path has a file name")
        .to_string_lossy()
        .into_owned()
}

/// kspan's version, the last word of `kspan --version` (e.g. "0.1.0").
pub fn kspan_version() -> String {
    let bin = kspan_bin();
    let out = Command::new(&bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} --version: {e}", bin.display()));
    assert!(
        out.status.success(),
        "{} --version failed: {}",
        bin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text.split_whitespace().last().unwrap_or("").to_string();
    assert!(!v.is_empty(), "kspan --version printed nothing: {text:?}");
    v
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Memory of a process, from `/proc/<pid>/status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcMemory {
    /// `VmHWM`: the peak resident set over the process's life, KiB.
    pub peak_kib: u64,
    /// `VmRSS`: the resident set now, KiB.
    pub rss_kib: u64,
}

impl ProcMemory {
    pub fn peak_mib(&self) -> f64 {
        self.peak_kib as f64 / 1024.0
    }
    pub fn rss_mib(&self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }
}

/// `VmHWM` and `VmRSS` of `pid` (panics if the process is gone).
pub fn proc_memory(pid: u32) -> ProcMemory {
    let path = format!("/proc/{pid}/status");
    let status =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{path} has no `{name}` in kB:\n{status}"))
    };
    ProcMemory {
        peak_kib: field("VmHWM:"),
        rss_kib: field("VmRSS:"),
    }
}

/// Raises this process's soft limit of open files to at least `at_least` (up to the hard
/// limit, which a process without CAP_SYS_RESOURCE cannot raise: it fails the test, naming
/// it, if it is lower). Children started afterwards inherit it.
pub fn raise_open_files_limit(at_least: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    assert_eq!(rc, 0, "getrlimit: {}", std::io::Error::last_os_error());
    if limit.rlim_cur >= at_least {
        return;
    }
    assert!(
        limit.rlim_max >= at_least,
        "this test needs {at_least} open files, the hard limit (RLIMIT_NOFILE) is {}; \
         raise it (e.g. `ulimit -Hn {at_least}` as root) before running the tests",
        limit.rlim_max
    );
    limit.rlim_cur = at_least;
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    assert_eq!(rc, 0, "setrlimit: {}", std::io::Error::last_os_error());
}

/// Waits for `child` to exit 0 within helper_timeout(); returns its stdout and stderr.
pub(crate) fn wait_success(
    child: &mut Child,
    stdout: &mut LinePump,
    stderr: &mut LinePump,
    what: &str,
) -> (String, String) {
    let Some(status) = wait_timeout(child, helper_timeout()) else {
        kill_and_reap(child);
        panic!(
            "{what} did not finish within {:?}.\n--- stdout ---\n{}\n--- stderr ---\n{}",
            helper_timeout(),
            stdout.finish(),
            stderr.finish()
        );
    };
    let (out, err) = (stdout.finish(), stderr.finish());
    assert!(
        status.success(),
        "{what} failed ({status}).\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
    );
    (out, err)
}

/// What a test says when a peer is missing.
pub const SETUP_HINT: &str = "run `cargo xtask setup` (as root), which installs the test peers";

/// Panics (once per process, checked once) unless [`python()`] imports `module` and the
/// distribution `dist` is at `version`; `what` names the tests that need it.
pub fn ensure_python_package(dist: &str, module: &str, version: &str, what: &str) {
    static CHECKED: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    if checked.iter().any(|d| d == dist) {
        return;
    }
    let probe =
        format!("import {module}, importlib.metadata; print(importlib.metadata.version({dist:?}))");
    let out = Command::new(python())
        .args(["-c", &probe])
        .stdin(Stdio::null())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python().display()));
    let found = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success() && found == version,
        "{what} need {dist} {version} for {} (`import {module}` {}); {SETUP_HINT}.\n\
         --- stderr ---\n{}",
        python().display(),
        if out.status.success() {
            format!("gives version {found}")
        } else {
            format!("fails ({})", out.status)
        },
        String::from_utf8_lossy(&out.stderr)
    );
    checked.push(dist.to_string());
}

/// Canonical path of the test peer `name` on PATH, or a failed test saying how to install it
/// (`what`: e.g. "node (Node.js)").
pub fn peer_on_path(name: &str, what: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .and_then(|p| std::fs::canonicalize(p).ok())
        .unwrap_or_else(|| panic!("{what} is not on PATH; {SETUP_HINT}"))
}

/// Canonical path of `name` found on PATH (what /proc/PID/exe shows for it).
pub fn which(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(name);
        if p.is_file() {
            return std::fs::canonicalize(&p)
                .unwrap_or_else(|e| panic!("cannot resolve {}: {e}", p.display()));
        }
    }
    panic!("{name} not found on PATH");
}

/// The machine's host name (kernel's), as kspan reports it in `host.name`.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("read /proc/sys/kernel/hostname")
        .trim()
        .to_string()
}

/// Nanoseconds since the Unix epoch, now.
pub fn unix_nanos_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after epoch")
        .as_nanos() as u64
}

// ---------------------------------------------------------------------------
// Output pumps
// ---------------------------------------------------------------------------

/// Collects a child's stderr line by line into a shared string, reporting each
/// line on a channel (used to wait for `ready` / `PORT`).
struct LinePump {
    text: Arc<Mutex<String>>,
    lines: Receiver<Option<String>>,
    handle: Option<JoinHandle<()>>,
}

impl LinePump {
    fn new<R: Read + Send + 'static>(reader: R) -> Self {
        let text = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let t = Arc::clone(&text);
        let handle = thread::spawn(move || {
            let mut reader = BufReader::new(reader);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf).into_owned();
                        t.lock().unwrap().push_str(&line);
                        let _ = tx.send(Some(line.trim_end_matches(['\n', '\r']).to_string()));
                    }
                }
            }
            let _ = tx.send(None);
        });
        LinePump {
            text,
            lines: rx,
            handle: Some(handle),
        }
    }

    fn snapshot(&self) -> String {
        self.text.lock().unwrap().clone()
    }

    /// Waits for EOF (the child must have exited) and returns everything read.
    fn finish(&mut self) -> String {
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.snapshot()
    }
}

/// Reads a child's stdout to the end in a thread.
fn spawn_reader<R: Read + Send + 'static>(mut reader: R) -> JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = reader.read_to_end(&mut buf);
        buf
    })
}

pub fn kill_and_reap(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Polls `child` until it exits or `timeout` passes.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(e) => panic!("waitpid failed: {e}"),
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn is_word_ready(line: &str) -> bool {
    line.split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
        .any(|w| w.eq_ignore_ascii_case("ready"))
}

// ---------------------------------------------------------------------------
// kspan
// ---------------------------------------------------------------------------

/// A running kspan. Killed (SIGKILL) on drop if still running, so a panicking
/// test never leaves probes attached.
pub struct Kspan {
    child: Option<Child>,
    args: Vec<String>,
    json: bool,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: LinePump,
    /// When `ready` was seen.
    pub ready_at: Instant,
    /// Wall clock (Unix ns) when `ready` was seen.
    pub ready_unix_nano: u64,
}

/// Result of a kspan run, after SIGINT.
pub struct Run {
    /// Parsed stdout lines (empty unless started with `--output json`).
    pub spans: Vec<Value>,
    /// Raw stdout.
    pub stdout: String,
    pub stderr: String,
    pub exit_status: ExitStatus,
    /// Time from SIGINT to exit.
    pub stop_duration: Duration,
    /// The arguments kspan was started with.
    pub args: Vec<String>,
}

impl Kspan {
    /// Starts kspan with `args` plus `--output json` and waits for `ready`.
    pub fn start(args: &[&str]) -> Kspan {
        Self::start_with_env(args, &[])
    }

    /// Like [`Kspan::start`] (adds `--output json`) with extra environment
    /// variables for kspan (e.g. `OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Kspan {
        let mut full: Vec<&str> = args.to_vec();
        full.extend(["--output", "json"]);
        Self::spawn(&full, env, true)
    }

    /// Starts kspan with `args` plus `--output <output>` (e.g. "text"); stdout
    /// is kept raw (not parsed) unless `output` is "json".
    pub fn start_with_output(args: &[&str], output: &str) -> Kspan {
        let mut full: Vec<&str> = args.to_vec();
        full.extend(["--output", output]);
        Self::spawn(&full, &[], output == "json")
    }

    /// Starts kspan with exactly `args` (no `--output` added); stdout is kept raw.
    pub fn start_raw(args: &[&str]) -> Kspan {
        Self::spawn(args, &[], false)
    }

    /// Like [`Kspan::start_raw`] with extra environment variables.
    pub fn start_raw_with_env(args: &[&str], env: &[(&str, &str)]) -> Kspan {
        Self::spawn(args, env, false)
    }

    /// kspan inherits the test's environment minus every `OTEL_*` variable
    /// (a stray OTEL_EXPORTER_OTLP_ENDPOINT would make it export somewhere),
    /// plus `env`.
    fn spawn(args: &[&str], env: &[(&str, &str)], json: bool) -> Kspan {
        Self::spawn_with_stdout(args, env, json, None)
    }

    /// Like [`Kspan::start_raw_with_env`], with stdout a pipe whose read end is already closed:
    /// every write kspan makes there fails with EPIPE (`kspan | head -1`, after head exited).
    pub fn start_with_closed_stdout(args: &[&str], env: &[(&str, &str)]) -> Kspan {
        let mut fds = [0; 2];
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
        // SAFETY: both descriptors were just created and are owned here only.
        let (read_end, write_end) = unsafe {
            use std::os::fd::FromRawFd;
            (
                std::os::fd::OwnedFd::from_raw_fd(fds[0]),
                std::os::fd::OwnedFd::from_raw_fd(fds[1]),
            )
        };
        drop(read_end);
        Self::spawn_with_stdout(args, env, false, Some(write_end))
    }

    fn spawn_with_stdout(
        args: &[&str],
        env: &[(&str, &str)],
        json: bool,
        stdout: Option<std::os::fd::OwnedFd>,
    ) -> Kspan {
        assert_lock_held("Kspan::start");
        let bin = kspan_bin();
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let mut cmd = Command::new(&bin);
        let own_stdout = stdout.is_none();
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(stdout.map_or_else(Stdio::piped, Stdio::from))
            .stderr(Stdio::piped());
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("OTEL_") {
                cmd.env_remove(&k);
            }
        }
        cmd.envs(env.iter().copied());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} {:?}: {e}", bin.display(), args));
        let stdout = own_stdout.then(|| spawn_reader(child.stdout.take().expect("piped stdout")));
        let stderr = LinePump::new(child.stderr.take().expect("piped stderr"));
        let mut k = Kspan {
            child: Some(child),
            args,
            json,
            stdout,
            stderr,
            ready_at: Instant::now(),
            ready_unix_nano: 0,
        };
        let deadline = Instant::now() + ready_timeout();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let next = k.stderr.lines.recv_timeout(left);
            match next {
                Ok(Some(line)) if is_word_ready(&line) => break,
                Ok(Some(_)) => {}
                Ok(None) | Err(RecvTimeoutError::Disconnected) => {
                    // stderr closed: kspan exited (or is about to).
                    let child = k.child.as_mut().unwrap();
                    let status = wait_timeout(child, Duration::from_secs(5));
                    kill_and_reap(child);
                    let err = k.stderr.finish();
                    panic!(
                        "kspan {:?} exited before printing `ready` (status: {}).\n--- kspan stderr ---\n{err}",
                        k.args,
                        status.map_or("still running; killed".to_string(), |s| s.to_string()),
                    );
                }
                Err(RecvTimeoutError::Timeout) => {
                    let child = k.child.as_mut().unwrap();
                    kill_and_reap(child);
                    let err = k.stderr.finish();
                    panic!(
                        "kspan {:?} did not print `ready` within {:?}; killed it.\n--- kspan stderr ---\n{err}",
                        k.args,
                        ready_timeout()
                    );
                }
            }
        }
        k.ready_at = Instant::now();
        k.ready_unix_nano = unix_nanos_now();
        k
    }

    /// kspan's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("kspan running").id()
    }

    /// kspan's peak and current resident set (read while it runs).
    pub fn memory(&self) -> ProcMemory {
        proc_memory(self.pid())
    }

    /// Panics (with kspan's stderr) if kspan has exited.
    pub fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("kspan running");
        if let Ok(Some(st)) = child.try_wait() {
            let err = self.stderr.finish();
            panic!(
                "kspan {:?} exited while it should be running: {st}\n--- kspan stderr ---\n{err}",
                self.args
            );
        }
    }

    /// stderr so far.
    pub fn stderr_so_far(&self) -> String {
        self.stderr.snapshot()
    }

    /// Waits (at most [`helper_timeout`]) until kspan's stderr has a line containing `needle`;
    /// panics with its stderr otherwise.
    pub fn wait_for_stderr(&mut self, needle: &str) {
        let deadline = Instant::now() + helper_timeout();
        while !self.stderr.snapshot().contains(needle) {
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "kspan did not print {needle:?} within {:?}.\n--- kspan stderr ---\n{}",
                helper_timeout(),
                self.stderr.snapshot()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGINT, waits up to 10 s (kills and fails on timeout), asserts
    /// exit status 0 and a stop within 5 s, and parses stdout.
    pub fn stop(self) -> Run {
        self.stop_within(stop_contract())
    }

    /// [`stop`](Self::stop) with another contract (the wait before killing is 5 s longer).
    pub fn stop_within(mut self, contract: Duration) -> Run {
        let pid = self.pid();
        let sent = Instant::now();
        let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) };
        assert_eq!(
            rc,
            0,
            "kill(SIGINT) kspan: {}",
            std::io::Error::last_os_error()
        );
        let child = self.child.as_mut().unwrap();
        let wait = contract + stop_timeout() - stop_contract();
        let status = wait_timeout(child, wait);
        let stop_duration = sent.elapsed();
        let Some(exit_status) = status else {
            kill_and_reap(child);
            let err = self.stderr.finish();
            panic!(
                "kspan {:?} did not exit within {:?} of SIGINT; killed it.\n--- kspan stderr ---\n{err}",
                self.args, wait
            );
        };
        self.child = None;
        let stdout_bytes = self
            .stdout
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        let stdout = String::from_utf8_lossy(&stdout_bytes).into_owned();
        let stderr = self.stderr.finish();

        assert!(
            exit_status.success(),
            "kspan {:?} exited with {exit_status} after SIGINT (expected 0).\n--- kspan stderr ---\n{stderr}\n--- kspan stdout ---\n{stdout}",
            self.args
        );
        assert!(
            stop_duration <= contract,
            "kspan took {stop_duration:?} to exit after SIGINT (contract: within {contract:?}).\n--- kspan stderr ---\n{stderr}",
        );

        let mut spans = Vec::new();
        if self.json {
            for (i, line) in stdout.lines().enumerate() {
                let v: Value = serde_json::from_str(line).unwrap_or_else(|e| {
                    panic!(
                        "kspan stdout line {} is not JSON ({e}):\n{line}\n--- kspan stderr ---\n{stderr}",
                        i + 1
                    )
                });
                if let Err(problem) = check_span_shape(&v) {
                    panic!(
                        "kspan stdout line {} does not follow the span schema: {problem}\n{}",
                        i + 1,
                        pretty(&v)
                    );
                }
                spans.push(v);
            }
        }
        Run {
            spans,
            stdout,
            stderr,
            exit_status,
            stop_duration,
            args: std::mem::take(&mut self.args),
        }
    }
}

impl Drop for Kspan {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            kill_and_reap(child);
        }
    }
}

impl Run {
    /// The counters of the last non-empty stderr line, which must contain
    /// `events_received=`, `events_lost=`, `spans_emitted=`, `parse_errors=`.
    pub fn counters(&self) -> BTreeMap<String, u64> {
        let last = self
            .stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        for key in [
            "events_received=",
            "events_lost=",
            "spans_emitted=",
            "parse_errors=",
        ] {
            assert!(
                last.contains(key),
                "kspan's stderr does not end with a counters line containing `{key}`; last line: {last:?}\n--- kspan stderr ---\n{}",
                self.stderr
            );
        }
        let mut out = BTreeMap::new();
        for tok in last.split(|c: char| c.is_whitespace() || c == ',') {
            if let Some((k, v)) = tok.split_once('=') {
                let k =
                    k.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '_' && c != '.');
                let digits: String = v.chars().take_while(|c| c.is_ascii_digit()).collect();
                if let Ok(n) = digits.parse::<u64>() {
                    out.insert(k.to_string(), n);
                }
            }
        }
        for key in [
            "events_received",
            "events_lost",
            "spans_emitted",
            "parse_errors",
        ] {
            assert!(
                out.contains_key(key),
                "counters line has no integer value for `{key}`: {last:?}"
            );
        }
        out
    }

    /// Asserts the counters line reports `events_lost=0`.
    pub fn assert_no_lost_events(&self) {
        let c = self.counters();
        assert_eq!(
            c["events_lost"], 0,
            "kspan lost events: {c:?}\n--- kspan stderr ---\n{}",
            self.stderr
        );
    }

    /// All spans, pretty-printed, plus stderr: for failure messages.
    pub fn dump(&self) -> String {
        let mut s = format!("kspan {:?}: {} span(s)\n", self.args, self.spans.len());
        for span in &self.spans {
            s.push_str(&pretty(span));
            s.push('\n');
        }
        if self.spans.is_empty() && !self.stdout.is_empty() {
            s.push_str("--- stdout ---\n");
            s.push_str(&self.stdout);
        }
        s.push_str("--- stderr ---\n");
        s.push_str(&self.stderr);
        s
    }

    /// Spans of `kind` ("SERVER" / "CLIENT").
    pub fn of_kind(&self, k: &str) -> Vec<&Value> {
        kind(&self.spans, k)
    }

    /// Asserts `needle` occurs nowhere in stdout.
    pub fn assert_stdout_lacks(&self, needle: &str) {
        assert!(
            !self.stdout.contains(needle),
            "{needle:?} must never appear in kspan's output, but stdout contains it:\n{}",
            self.stdout
        );
    }
}

// ---------------------------------------------------------------------------
// Span schema and queries
// ---------------------------------------------------------------------------

pub fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

fn is_hex_id(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit()) && s.bytes().any(|b| b != b'0')
}

/// Checks one JSON span against the output contract.
pub fn check_span_shape(v: &Value) -> Result<(), String> {
    let obj = v.as_object().ok_or("not a JSON object")?;
    let str_field = |k: &str| -> Result<&str, String> {
        obj.get(k)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("`{k}` missing or not a string"))
    };
    let trace = str_field("trace_id")?;
    if !is_hex_id(trace, 32) {
        return Err(format!(
            "trace_id {trace:?} is not 32 hex digits (non-zero)"
        ));
    }
    let span = str_field("span_id")?;
    if !is_hex_id(span, 16) {
        return Err(format!("span_id {span:?} is not 16 hex digits (non-zero)"));
    }
    match obj.get("parent_span_id") {
        Some(Value::Null) => {}
        Some(Value::String(p)) if is_hex_id(p, 16) => {}
        other => {
            return Err(format!(
                "parent_span_id must be null or 16 hex digits, got {other:?}"
            ));
        }
    }
    let name = str_field("name")?;
    if name.is_empty() || name.contains('?') {
        return Err(format!("bad span name {name:?}"));
    }
    let kind = str_field("kind")?;
    if kind != "SERVER" && kind != "CLIENT" {
        return Err(format!("kind {kind:?} is not SERVER or CLIENT"));
    }
    let start = obj
        .get("start_unix_nano")
        .and_then(Value::as_u64)
        .ok_or("start_unix_nano missing or not a u64")?;
    let end = obj
        .get("end_unix_nano")
        .and_then(Value::as_u64)
        .ok_or("end_unix_nano missing or not a u64")?;
    if end < start {
        return Err(format!("end_unix_nano {end} < start_unix_nano {start}"));
    }
    let status = str_field("status")?;
    if status != "UNSET" && status != "ERROR" {
        return Err(format!("status {status:?} is not UNSET or ERROR"));
    }
    for map in ["attributes", "resource"] {
        let m = obj
            .get(map)
            .and_then(Value::as_object)
            .ok_or_else(|| format!("`{map}` missing or not an object"))?;
        for (k, val) in m {
            if !(val.is_string() || val.is_i64() || val.is_u64()) {
                return Err(format!(
                    "{map}.{k} is neither a string nor an integer: {val}"
                ));
            }
        }
    }
    Ok(())
}

/// Spans of the given kind.
pub fn kind<'a>(spans: &'a [Value], k: &str) -> Vec<&'a Value> {
    spans.iter().filter(|s| s["kind"] == k).collect()
}

/// Spans whose resource `process.pid` is `pid`.
pub fn by_pid(spans: &[Value], pid: u32) -> Vec<&Value> {
    spans
        .iter()
        .filter(|s| res_i64(s, "process.pid") == Some(pid as i64))
        .collect()
}

/// Spans with the given name.
pub fn named<'a>(spans: &'a [Value], name: &str) -> Vec<&'a Value> {
    spans.iter().filter(|s| s["name"] == name).collect()
}

/// Sorts spans by start time.
pub fn sorted_by_start(mut spans: Vec<&Value>) -> Vec<&Value> {
    spans.sort_by_key(|s| start_ns(s));
    spans
}

/// The spans of `kind` in process `pid`, by start time; exactly `n` of them (`what` names the
/// process in the failure message).
pub fn spans_of<'a>(run: &'a Run, pid: u32, kind: &str, n: usize, what: &str) -> Vec<&'a Value> {
    let spans: Vec<&Value> = by_pid(&run.spans, pid)
        .into_iter()
        .filter(|s| s["kind"] == kind)
        .collect();
    assert_eq!(
        spans.len(),
        n,
        "expected exactly {n} {kind} span(s) in {what} (pid {pid}), found {}\n{}",
        spans.len(),
        run.dump()
    );
    sorted_by_start(spans)
}

/// `server` is the child of `client`: same trace, parent = the client span.
pub fn assert_child_of(server: &Value, client: &Value, run: &Run) {
    assert_eq!(
        (trace_id(server), parent_id(server)),
        (trace_id(client), Some(span_id(client))),
        "the SERVER span must be a child of the CLIENT span\nserver:\n{}\nclient:\n{}\n\n{}",
        pretty(server),
        pretty(client),
        run.dump()
    );
}

pub fn attr<'a>(span: &'a Value, key: &str) -> Option<&'a Value> {
    span.get("attributes").and_then(|a| a.get(key))
}
pub fn attr_str<'a>(span: &'a Value, key: &str) -> Option<&'a str> {
    attr(span, key).and_then(Value::as_str)
}
pub fn attr_i64(span: &Value, key: &str) -> Option<i64> {
    attr(span, key).and_then(Value::as_i64)
}
pub fn res_str<'a>(span: &'a Value, key: &str) -> Option<&'a str> {
    span.get("resource")
        .and_then(|r| r.get(key))
        .and_then(Value::as_str)
}
pub fn res_i64(span: &Value, key: &str) -> Option<i64> {
    span.get("resource")
        .and_then(|r| r.get(key))
        .and_then(Value::as_i64)
}
pub fn trace_id(span: &Value) -> &str {
    span["trace_id"].as_str().unwrap_or("")
}

pub fn span_id(span: &Value) -> &str {
    span["span_id"].as_str().unwrap_or("")
}

pub fn parent_id(span: &Value) -> Option<&str> {
    span["parent_span_id"].as_str()
}

/// A counter of kspan's final stderr line (panics if absent).
pub fn counter(run: &Run, key: &str) -> u64 {
    let c = run.counters();
    *c.get(key).unwrap_or_else(|| {
        panic!(
            "kspan's counters line has no `{key}=`: {c:?}\n--- kspan stderr ---\n{}",
            run.stderr
        )
    })
}

/// No event lost, nothing kspan could not parse, no connection pair refused.
pub fn assert_clean_run(run: &Run) {
    run.assert_no_lost_events();
    for key in ["parse_errors", "links_mismatched"] {
        assert_eq!(counter(run, key), 0, "{key} must be 0\n{}", run.dump());
    }
}

pub fn name(span: &Value) -> &str {
    span["name"].as_str().unwrap_or("")
}
pub fn status(span: &Value) -> &str {
    span["status"].as_str().unwrap_or("")
}
pub fn start_ns(span: &Value) -> u64 {
    span["start_unix_nano"].as_u64().unwrap_or(0)
}
pub fn end_ns(span: &Value) -> u64 {
    span["end_unix_nano"].as_u64().unwrap_or(0)
}
pub fn duration(span: &Value) -> Duration {
    Duration::from_nanos(end_ns(span).saturating_sub(start_ns(span)))
}

/// Required string attribute (panics, printing the span, if absent).
pub fn must_str<'a>(span: &'a Value, key: &str) -> &'a str {
    attr_str(span, key)
        .unwrap_or_else(|| panic!("span has no string attribute `{key}`:\n{}", pretty(span)))
}
/// Required integer attribute (panics, printing the span, if absent).
pub fn must_i64(span: &Value, key: &str) -> i64 {
    attr_i64(span, key)
        .unwrap_or_else(|| panic!("span has no integer attribute `{key}`:\n{}", pretty(span)))
}

/// Expected value of one attribute for [`assert_attributes`].
#[derive(Debug, Clone)]
pub enum Expect {
    /// Exactly this string.
    Str(String),
    /// Exactly this integer.
    Int(i64),
    /// A string starting with this prefix.
    Prefix(String),
    /// Any integer.
    AnyInt,
    /// Any string.
    AnyStr,
}

pub fn s(v: impl Into<String>) -> Expect {
    Expect::Str(v.into())
}
pub fn int(v: impl Into<i64>) -> Expect {
    Expect::Int(v.into())
}
pub fn prefix(v: impl Into<String>) -> Expect {
    Expect::Prefix(v.into())
}

impl Expect {
    fn matches(&self, v: &Value) -> bool {
        match self {
            Expect::Str(e) => v.as_str() == Some(e),
            Expect::Int(e) => v.as_i64() == Some(*e),
            Expect::Prefix(p) => v.as_str().is_some_and(|s| s.starts_with(p.as_str())),
            Expect::AnyInt => v.is_i64() || v.is_u64(),
            Expect::AnyStr => v.is_string(),
        }
    }
}

/// Asserts the span's attributes are exactly `expected` (same key set, every
/// value matching). Prints the span and every difference on failure.
pub fn assert_attributes(span: &Value, expected: &[(&str, Expect)]) {
    let empty = serde_json::Map::new();
    let actual = span
        .get("attributes")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let mut problems = Vec::new();
    let expected_keys: BTreeSet<&str> = expected.iter().map(|(k, _)| *k).collect();
    assert_eq!(
        expected_keys.len(),
        expected.len(),
        "assert_attributes: duplicate key in expectation {expected:?}"
    );
    for (k, e) in expected {
        match actual.get(*k) {
            None => problems.push(format!("missing `{k}` (expected {e:?})")),
            Some(v) if !e.matches(v) => problems.push(format!("`{k}` = {v}, expected {e:?}")),
            Some(_) => {}
        }
    }
    for (k, v) in actual {
        if !expected_keys.contains(k.as_str()) {
            problems.push(format!("unexpected attribute `{k}` = {v}"));
        }
    }
    assert!(
        problems.is_empty(),
        "span attributes differ from the expectation:\n  {}\nspan:\n{}",
        problems.join("\n  "),
        pretty(span)
    );
}

// ---------------------------------------------------------------------------
// Python server
// ---------------------------------------------------------------------------

/// `servers/http_server.py`, killed on drop.
/// Starts a helper server whose first stdout line of interest is `PORT <n>`; returns the child,
/// its pid, the port and its stderr pump. Fails the test with the helper's stderr if no port
/// comes within helper_timeout(). Its stdout keeps draining in the background.
pub(crate) fn spawn_port_server(mut cmd: Command, what: &str) -> (Child, u32, u16, LinePump) {
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let pid = child.id();
    let out = LinePump::new(child.stdout.take().expect("piped stdout"));
    let mut stderr = LinePump::new(child.stderr.take().expect("piped stderr"));
    let deadline = Instant::now() + helper_timeout();
    let port = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match out.lines.recv_timeout(left) {
            Ok(Some(line)) => {
                if let Some(p) = line.strip_prefix("PORT ") {
                    break p
                        .trim()
                        .parse::<u16>()
                        .unwrap_or_else(|e| panic!("bad PORT line {line:?}: {e}"));
                }
            }
            Ok(None) | Err(_) => {
                kill_and_reap(&mut child);
                panic!(
                    "{what} did not print `PORT <n>`.\n--- its stderr ---\n{}",
                    stderr.finish()
                );
            }
        }
    };
    drop(out);
    (child, pid, port, stderr)
}

pub struct PyServer {
    child: Child,
    pub pid: u32,
    pub port: u16,
    stderr: LinePump,
}

impl PyServer {
    /// Starts the HTTP/1.1 test server. `service_name` sets OTEL_SERVICE_NAME
    /// (otherwise it is removed from the environment).
    pub fn start(service_name: Option<&str>) -> PyServer {
        Self::start_with(service_name, &[])
    }

    /// Like [`PyServer::start`] with extra script arguments (e.g. `--http10`).
    pub fn start_with(service_name: Option<&str>, extra_args: &[&str]) -> PyServer {
        let script = server_script("http_server.py");
        let mut cmd = Command::new(python());
        cmd.arg(&script)
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("PYTHONDONTWRITEBYTECODE", "1");
        match service_name {
            Some(n) => cmd.env("OTEL_SERVICE_NAME", n),
            None => cmd.env_remove("OTEL_SERVICE_NAME"),
        };
        let (child, pid, port, stderr) = spawn_port_server(cmd, "http_server.py");
        PyServer {
            child,
            pid,
            port,
            stderr,
        }
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// The server's stderr so far (tracebacks, if any).
    pub fn stderr(&self) -> String {
        self.stderr.snapshot()
    }

    /// Panics if the server died.
    pub fn assert_alive(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!(
                "http_server.py (pid {}) exited: {st}\n--- server stderr ---\n{}",
                self.pid,
                self.stderr.finish()
            );
        }
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

/// Starts `servers/{name}` with `args`, stdin, stdout and stderr piped, without the test's
/// OTEL_SERVICE_NAME; returns the child with its stdout and stderr pumps (stdin stays on it).
pub(crate) fn spawn_python_script(name: &str, args: &[&str]) -> (Child, LinePump, LinePump) {
    let script = server_script(name);
    let mut child = Command::new(python())
        .arg(&script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("OTEL_SERVICE_NAME")
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", script.display()));
    let stdout = LinePump::new(child.stdout.take().expect("piped stdout"));
    let stderr = LinePump::new(child.stderr.take().expect("piped stderr"));
    (child, stdout, stderr)
}

// ---------------------------------------------------------------------------
// Pre-forking server
// ---------------------------------------------------------------------------

/// `servers/forking_server.py`: listening, its workers not forked until [`ForkingServer::fork`].
/// Killed (with its workers) on drop.
pub struct ForkingServer {
    child: Child,
    pub pid: u32,
    pub port: u16,
    stdin: Option<ChildStdin>,
    stdout: LinePump,
    stderr: LinePump,
}

impl ForkingServer {
    pub fn start() -> ForkingServer {
        let (mut child, stdout, stderr) = spawn_python_script("forking_server.py", &[]);
        let pid = child.id();
        let stdin = child.stdin.take();
        let mut server = ForkingServer {
            child,
            pid,
            port: 0,
            stdin,
            stdout,
            stderr,
        };
        let line = server.expect_line("PORT ");
        server.port = line
            .parse()
            .unwrap_or_else(|e| panic!("bad port {line:?}: {e}"));
        server
    }

    /// Forks `n` workers; returns their pids once every one of them runs.
    pub fn fork(&mut self, n: usize) -> Vec<u32> {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "fork {n}").expect("write to forking_server.py");
        stdin.flush().expect("flush forking_server.py's stdin");
        self.expect_line("WORKERS ")
            .split_whitespace()
            .map(|pid| pid.parse().expect("worker pid"))
            .collect()
    }

    /// The rest of the next stdout line starting with `prefix`, or a failed test.
    fn expect_line(&mut self, prefix: &str) -> String {
        match self.stdout.lines.recv_timeout(helper_timeout()) {
            Ok(Some(line)) if line.starts_with(prefix) => line[prefix.len()..].trim().to_string(),
            other => {
                kill_and_reap(&mut self.child);
                panic!(
                    "forking_server.py: expected `{prefix}...`, got {other:?}\n--- stderr ---\n{}",
                    self.stderr.finish()
                )
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }
}

impl Drop for ForkingServer {
    fn drop(&mut self) {
        // SIGTERM lets the parent stop its workers; then reap it.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        if wait_timeout(&mut self.child, helper_timeout()).is_none() {
            kill_and_reap(&mut self.child);
        }
    }
}

// ---------------------------------------------------------------------------
// Keep-alive client
// ---------------------------------------------------------------------------

/// `servers/keepalive_client.py PORT N`, started and waiting for the go line.
pub struct KeepaliveClient {
    child: Child,
    pub pid: u32,
    stdin: Option<ChildStdin>,
    stdout: LinePump,
    stderr: LinePump,
}

/// What the keep-alive client reported.
#[derive(Debug)]
pub struct KeepaliveResult {
    pub statuses: Vec<u16>,
    pub local_port: u16,
    pub stdout: String,
}

impl KeepaliveClient {
    /// Starts the client and waits for its `READY`.
    pub fn start(port: u16, n: usize) -> KeepaliveClient {
        Self::start_with_prefix(port, n, "/users/")
    }

    /// Like [`KeepaliveClient::start`], requesting `{prefix}1` .. `{prefix}{n}`.
    pub fn start_with_prefix(port: u16, n: usize, prefix: &str) -> KeepaliveClient {
        Self::start_with_flags(&[], port, n, prefix)
    }

    /// Like [`KeepaliveClient::start_with_prefix`] with the script's flags first (`--tls
    /// CAFILE`, `--late-import`: see `servers/keepalive_client.py`).
    pub fn start_with_flags(flags: &[&str], port: u16, n: usize, prefix: &str) -> KeepaliveClient {
        let (port, n) = (port.to_string(), n.to_string());
        let mut args: Vec<&str> = flags.to_vec();
        args.extend([port.as_str(), n.as_str(), prefix]);
        let (mut child, stdout, mut stderr) = spawn_python_script("keepalive_client.py", &args);
        let pid = child.id();
        let stdin = child.stdin.take();
        match stdout.lines.recv_timeout(helper_timeout()) {
            Ok(Some(l)) if l.trim() == "READY" => {}
            other => {
                kill_and_reap(&mut child);
                panic!(
                    "keepalive_client.py did not print READY (got {other:?}).\n--- stderr ---\n{}",
                    stderr.finish()
                );
            }
        }
        KeepaliveClient {
            child,
            pid,
            stdin,
            stdout,
            stderr,
        }
    }

    /// `--late-import`: lets the client import `ssl` (libssl loaded with dlopen) and waits for
    /// its `LOADED`; [`KeepaliveClient::go`] then sends the requests.
    pub fn load_tls_library(&mut self) {
        self.step(b"load\n", "LOADED");
    }

    /// `--pause-after K`: lets the client send its first K requests and waits for its
    /// `PAUSED`; [`KeepaliveClient::go`] then sends the rest on the same connection.
    pub fn run_until_paused(&mut self) {
        self.step(b"go\n", "PAUSED");
    }

    /// Writes `line` to the waiting client and waits for it to print `reply`.
    fn step(&mut self, line: &[u8], reply: &str) {
        let stdin = self.stdin.as_mut().expect("not released yet");
        stdin
            .write_all(line)
            .expect("write to keepalive_client stdin");
        match self.stdout.lines.recv_timeout(helper_timeout()) {
            Ok(Some(l)) if l.trim() == reply => {}
            other => panic!(
                "keepalive_client.py did not print {reply} (got {other:?}).\n--- stderr ---\n{}",
                self.stderr.snapshot()
            ),
        }
    }

    /// Lets the client send its requests; waits for it to exit 0 and parses
    /// `LOCAL_PORT <p>` and `DONE <statuses>`.
    pub fn go(mut self) -> KeepaliveResult {
        self.release();
        self.wait()
    }

    /// Lets the client send its requests without waiting (several clients at once).
    pub fn release(&mut self) {
        let mut stdin = self.stdin.take().expect("released once");
        stdin
            .write_all(b"go\n")
            .expect("write to keepalive_client stdin");
    }

    /// After [`KeepaliveClient::release`]: waits for the client to exit 0, parses its output.
    pub fn wait(mut self) -> KeepaliveResult {
        let status = wait_timeout(&mut self.child, helper_timeout());
        let Some(status) = status else {
            kill_and_reap(&mut self.child);
            panic!(
                "keepalive_client.py did not finish within {:?}.\n--- stdout ---\n{}\n--- stderr ---\n{}",
                helper_timeout(),
                self.stdout.finish(),
                self.stderr.finish()
            );
        };
        let out = self.stdout.finish();
        let err = self.stderr.finish();
        assert!(
            status.success(),
            "keepalive_client.py failed ({status}).\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
        );
        let mut statuses = None;
        let mut local_port = None;
        for line in out.lines() {
            if let Some(rest) = line.strip_prefix("DONE") {
                statuses = Some(
                    rest.split_whitespace()
                        .map(|s| s.parse::<u16>().expect("status code"))
                        .collect(),
                );
            } else if let Some(rest) = line.strip_prefix("LOCAL_PORT ") {
                local_port = Some(rest.trim().parse::<u16>().expect("local port"));
            }
        }
        KeepaliveResult {
            statuses: statuses
                .unwrap_or_else(|| panic!("keepalive_client.py printed no DONE line:\n{out}")),
            local_port: local_port.unwrap_or_else(|| {
                panic!("keepalive_client.py printed no LOCAL_PORT line:\n{out}")
            }),
            stdout: out,
        }
    }
}

impl Drop for KeepaliveClient {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

// ---------------------------------------------------------------------------
// curl
// ---------------------------------------------------------------------------

const CURL_MARK: &str = "KSPAN_E2E_CURL local_port=";

/// Result of one curl run.
#[derive(Debug)]
pub struct CurlOutput {
    /// curl's pid (the traced process).
    pub pid: u32,
    pub status: ExitStatus,
    /// Response body (stdout).
    pub stdout: String,
    /// curl's own stderr, without the harness's write-out line.
    pub stderr: String,
    /// Local (ephemeral) port of curl's last connection, from `%{local_port}`.
    pub local_port: Option<u16>,
    /// Wall clock (Unix ns) just before spawning / just after exit.
    pub started_unix_nano: u64,
    pub finished_unix_nano: u64,
}

/// Runs `curl -q -sS --max-time 30 <args>` (proxies and ~/.curlrc disabled,
/// OTEL_SERVICE_NAME removed) and asserts it exits 0. The local port is
/// reported through a `--write-out` to stderr, which does not change what is
/// sent on the wire.
pub fn curl(args: &[&str]) -> CurlOutput {
    let out = curl_unchecked(args);
    assert!(
        out.status.success(),
        "curl {args:?} failed ({}): {}",
        out.status,
        out.stderr
    );
    out
}

/// Like [`curl`] without asserting success.
pub fn curl_unchecked(args: &[&str]) -> CurlOutput {
    let write_out = format!("%{{stderr}}{CURL_MARK}%{{local_port}}\\n");
    let mut cmd = Command::new("curl");
    cmd.args(["-q", "-sS", "--max-time", "30", "--write-out", &write_out])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("OTEL_SERVICE_NAME");
    for v in [
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "no_proxy",
        "NO_PROXY",
        "CURL_HOME",
    ] {
        cmd.env_remove(v);
    }
    let started_unix_nano = unix_nanos_now();
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run curl (is it installed?): {e}"));
    let pid = child.id();
    let output = child.wait_with_output().expect("wait for curl");
    let finished_unix_nano = unix_nanos_now();
    let raw_err = String::from_utf8_lossy(&output.stderr).into_owned();
    let mut local_port = None;
    let mut stderr = String::new();
    for line in raw_err.lines() {
        if let Some(p) = line.strip_prefix(CURL_MARK) {
            if let Ok(p) = p.trim().parse::<u16>()
                && p != 0
            {
                local_port = Some(p);
            }
        } else {
            stderr.push_str(line);
            stderr.push('\n');
        }
    }
    CurlOutput {
        pid,
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr,
        local_port,
        started_unix_nano,
        finished_unix_nano,
    }
}

/// A file in this test process's scratch directory, deleted (with the
/// directory, once empty) on drop.
pub struct ScratchFile {
    path: PathBuf,
}

impl ScratchFile {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Writes `len` bytes of `pattern` repeated to a scratch file.
pub fn write_scratch_file(name: &str, pattern: &[u8], len: usize) -> ScratchFile {
    assert!(!pattern.is_empty());
    let dir = std::env::temp_dir().join(format!("kspan-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    let path = dir.join(name);
    let mut data = Vec::with_capacity(len);
    while data.len() < len {
        let take = (len - data.len()).min(pattern.len());
        data.extend_from_slice(&pattern[..take]);
    }
    std::fs::write(&path, &data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    ScratchFile { path }
}
