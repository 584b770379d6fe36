//! Helpers for the trace-context tests (`tests/context.rs`):
//!
//! * [`ChainServer`] starts one tier of `servers/chain_server.py`, [`Chain`] the three tiers
//!   store ← backend ← frontend (each with its own `OTEL_SERVICE_NAME`),
//! * [`ensure_otel_sdk`] makes sure the OpenTelemetry Python SDK is importable (installing it
//!   with pip once if needed), [`SdkClient`] runs `servers/otel_sdk_client.py`,
//! * [`load_client`] runs `servers/load_client.py` (N sequential requests, fresh connections),
//! * [`random_hex`] makes random ids, [`traceidratio_keeps`] is the OpenTelemetry ratio rule.

use std::io::Write;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;

use serde_json::Value;

use super::{
    LinePump, helper_timeout, kill_and_reap, python, server_script, spawn_port_server,
    spawn_python_script, wait_timeout,
};

// ---------------------------------------------------------------------------
// Chain servers
// ---------------------------------------------------------------------------

/// One `servers/chain_server.py` tier, killed on drop.
pub struct ChainServer {
    child: Child,
    pub pid: u32,
    pub port: u16,
    /// `--name` (first word of its response body).
    pub name: String,
    /// Its OTEL_SERVICE_NAME.
    pub service: String,
    stderr: LinePump,
}

impl ChainServer {
    /// Starts a tier named `name` with OTEL_SERVICE_NAME=`service`, calling `downstream` (if any)
    /// for every request (without forwarding headers).
    pub fn start(name: &str, service: &str, downstream: Option<&ChainServer>) -> ChainServer {
        let script = server_script("chain_server.py");
        let mut cmd = Command::new(python());
        cmd.arg(&script)
            .args(["--name", name])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("OTEL_SERVICE_NAME", service);
        if let Some(d) = downstream {
            cmd.args(["--downstream", &d.url("")]);
        }
        let (child, pid, port, stderr) =
            spawn_port_server(cmd, &format!("chain_server.py --name {name}"));
        ChainServer {
            child,
            pid,
            port,
            name: name.to_string(),
            service: service.to_string(),
            stderr,
        }
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// The tier's stderr so far (tracebacks, if any).
    pub fn stderr(&self) -> String {
        self.stderr.snapshot()
    }

    /// Panics if the tier died.
    pub fn assert_alive(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!(
                "chain_server.py --name {} (pid {}) exited: {st}\n--- stderr ---\n{}",
                self.name,
                self.pid,
                self.stderr.finish()
            );
        }
    }
}

impl Drop for ChainServer {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

/// Three tiers: frontend → backend → store.
pub struct Chain {
    pub frontend: ChainServer,
    pub backend: ChainServer,
    pub store: ChainServer,
}

/// What the frontend answers to every /chain/ request.
pub const CHAIN_BODY: &str = "frontend > backend > store";

/// Asserts the body every chain request must return.
pub fn assert_chain_body(body: &str, what: &str, chain: &Chain) {
    assert_eq!(
        body.trim(),
        CHAIN_BODY,
        "{what}: unexpected response body\n{}",
        chain.stderr()
    );
}

/// kspan's `--pid` arguments for the chain ([`Chain::pid_args`]) plus `extra`.
pub fn args_with<'a>(pid_args: &'a [String], extra: &[&'a str]) -> Vec<&'a str> {
    let mut v: Vec<&str> = pid_args.iter().map(String::as_str).collect();
    v.extend_from_slice(extra);
    v
}

impl Chain {
    /// Starts store, backend (→ store), frontend (→ backend), with OTEL_SERVICE_NAME
    /// `e2e-ctx-store`, `e2e-ctx-backend`, `e2e-ctx-frontend`.
    pub fn start() -> Chain {
        let store = ChainServer::start("store", "e2e-ctx-store", None);
        let backend = ChainServer::start("backend", "e2e-ctx-backend", Some(&store));
        let frontend = ChainServer::start("frontend", "e2e-ctx-frontend", Some(&backend));
        Chain {
            frontend,
            backend,
            store,
        }
    }

    /// `--pid F --pid B --pid S`.
    pub fn pid_args(&self) -> Vec<String> {
        let mut v = Vec::new();
        for t in [&self.frontend, &self.backend, &self.store] {
            v.push("--pid".to_string());
            v.push(t.pid.to_string());
        }
        v
    }

    /// Panics if a tier died.
    pub fn assert_alive(&mut self) {
        self.frontend.assert_alive();
        self.backend.assert_alive();
        self.store.assert_alive();
    }

    /// The tiers' stderr, for failure messages.
    pub fn stderr(&self) -> String {
        format!(
            "--- frontend stderr ---\n{}--- backend stderr ---\n{}--- store stderr ---\n{}",
            self.frontend.stderr(),
            self.backend.stderr(),
            self.store.stderr()
        )
    }
}

// ---------------------------------------------------------------------------
// Ids and sampling
// ---------------------------------------------------------------------------

/// `bytes` random bytes from /dev/urandom as lower-case hex (never all zero).
pub fn random_hex(bytes: usize) -> String {
    use std::io::Read;
    let mut f = std::fs::File::open("/dev/urandom").expect("open /dev/urandom");
    loop {
        let mut buf = vec![0u8; bytes];
        f.read_exact(&mut buf).expect("read /dev/urandom");
        if buf.iter().any(|b| *b != 0) {
            return buf.iter().map(|b| format!("{b:02x}")).collect();
        }
    }
}

/// The OpenTelemetry TraceIdRatioBased rule: the trace id's last 8 bytes (big-endian) >> 1
/// must be below `ratio * 2^63`.
pub fn traceidratio_keeps(trace_id_hex: &str, ratio: f64) -> bool {
    assert_eq!(trace_id_hex.len(), 32, "trace id {trace_id_hex:?}");
    let low = u64::from_str_radix(&trace_id_hex[16..], 16)
        .unwrap_or_else(|e| panic!("trace id {trace_id_hex:?}: {e}"));
    let bound = (ratio * 9_223_372_036_854_775_808.0) as u64;
    (low >> 1) < bound
}

// ---------------------------------------------------------------------------
// OpenTelemetry Python SDK
// ---------------------------------------------------------------------------

fn sdk_importable() -> bool {
    Command::new(python())
        .args(["-c", "import opentelemetry.sdk.trace, opentelemetry.trace"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Makes sure `opentelemetry-api` and `opentelemetry-sdk` are importable by [`python()`]:
/// checks first, else runs `python -m pip install --quiet opentelemetry-api
/// opentelemetry-sdk` once (per test process; a second process finds them installed).
/// Panics with pip's output if the install fails or the SDK is still not importable.
pub fn ensure_otel_sdk() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        if sdk_importable() {
            return;
        }
        let out = Command::new(python())
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "opentelemetry-api",
                "opentelemetry-sdk",
            ])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {} -m pip: {e}", python().display()));
        assert!(
            out.status.success(),
            "`{} -m pip install opentelemetry-api opentelemetry-sdk` failed ({}); the \
             trace-context tests need the OpenTelemetry Python SDK.\n--- stdout ---\n{}\n--- stderr ---\n{}",
            python().display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            sdk_importable(),
            "pip installed opentelemetry-sdk but `import opentelemetry.sdk.trace` still fails \
             with {}",
            python().display()
        );
    });
}

/// `servers/otel_sdk_client.py PORT PATH`, started and waiting for the go line.
pub struct SdkClient {
    child: Child,
    pub pid: u32,
    stdin: Option<ChildStdin>,
    stdout: LinePump,
    stderr: LinePump,
}

/// What the SDK client reported.
#[derive(Debug)]
pub struct SdkResult {
    pub status: u16,
    pub body: String,
    /// The traceparent the W3C propagator injected.
    pub traceparent: String,
    /// The SDK's finished spans (trace_id, span_id, parent_span_id, name, kind, sampled).
    pub spans: Vec<Value>,
    pub stdout: String,
}

impl SdkClient {
    /// Starts the client (OTEL_SERVICE_NAME=`service`, no other OTEL_* variable) and waits for
    /// its `READY` (printed after the SDK is imported and configured).
    pub fn start(port: u16, path: &str, service: &str) -> SdkClient {
        ensure_otel_sdk();
        let script = server_script("otel_sdk_client.py");
        let mut cmd = Command::new(python());
        cmd.arg(&script)
            .arg(port.to_string())
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("PYTHONDONTWRITEBYTECODE", "1");
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("OTEL_") {
                cmd.env_remove(&k);
            }
        }
        cmd.env("OTEL_SERVICE_NAME", service);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", script.display()));
        let pid = child.id();
        let stdin = child.stdin.take();
        let stdout = LinePump::new(child.stdout.take().expect("piped stdout"));
        let mut stderr = LinePump::new(child.stderr.take().expect("piped stderr"));
        match stdout.lines.recv_timeout(helper_timeout()) {
            Ok(Some(l)) if l.trim() == "READY" => {}
            other => {
                kill_and_reap(&mut child);
                panic!(
                    "otel_sdk_client.py did not print READY (got {other:?}).\n--- stderr ---\n{}",
                    stderr.finish()
                );
            }
        }
        SdkClient {
            child,
            pid,
            stdin,
            stdout,
            stderr,
        }
    }

    /// Lets the client send its request; waits for it to exit 0 and parses its output.
    pub fn go(mut self) -> SdkResult {
        {
            let mut stdin = self.stdin.take().expect("stdin");
            stdin
                .write_all(b"go\n")
                .expect("write to otel_sdk_client stdin");
        }
        let Some(status) = wait_timeout(&mut self.child, helper_timeout()) else {
            kill_and_reap(&mut self.child);
            panic!(
                "otel_sdk_client.py did not finish within {:?}.\n--- stdout ---\n{}\n--- stderr ---\n{}",
                helper_timeout(),
                self.stdout.finish(),
                self.stderr.finish()
            );
        };
        let out = self.stdout.finish();
        let err = self.stderr.finish();
        assert!(
            status.success(),
            "otel_sdk_client.py failed ({status}).\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
        );
        let mut res = SdkResult {
            status: 0,
            body: String::new(),
            traceparent: String::new(),
            spans: Vec::new(),
            stdout: out.clone(),
        };
        for line in out.lines() {
            if let Some(rest) = line.strip_prefix("SDK_SPAN ") {
                res.spans
                    .push(serde_json::from_str(rest).unwrap_or_else(|e| {
                        panic!("otel_sdk_client.py printed a bad SDK_SPAN line ({e}): {line}")
                    }));
            } else if let Some(rest) = line.strip_prefix("STATUS ") {
                res.status = rest.trim().parse().expect("status code");
            } else if let Some(rest) = line.strip_prefix("BODY ") {
                res.body = rest.to_string();
            } else if let Some(rest) = line.strip_prefix("TRACEPARENT ") {
                res.traceparent = rest.trim().to_string();
            }
        }
        res
    }
}

impl Drop for SdkClient {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

// ---------------------------------------------------------------------------
// Load client
// ---------------------------------------------------------------------------

/// Runs `servers/load_client.py PORT N PREFIX` (N sequential GET PREFIX<i> requests, each on a
/// fresh connection) and returns the status codes it reports. Panics if it fails.
pub fn load_client(port: u16, n: usize, prefix: &str) -> Vec<u16> {
    let (port, n) = (port.to_string(), n.to_string());
    let (mut child, mut stdout, mut stderr) =
        spawn_python_script("load_client.py", &[&port, &n, prefix]);
    // Nothing to say to it.
    drop(child.stdin.take());
    let Some(status) = wait_timeout(&mut child, helper_timeout()) else {
        kill_and_reap(&mut child);
        panic!(
            "load_client.py did not finish within {:?}.\n--- stderr ---\n{}",
            helper_timeout(),
            stderr.finish()
        );
    };
    let out = stdout.finish();
    let err = stderr.finish();
    assert!(
        status.success(),
        "load_client.py failed ({status}).\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
    );
    let done = out
        .lines()
        .find_map(|l| l.strip_prefix("DONE"))
        .unwrap_or_else(|| panic!("load_client.py printed no DONE line:\n{out}\n{err}"));
    done.split_whitespace()
        .map(|s| s.parse::<u16>().expect("status code"))
        .collect()
}
