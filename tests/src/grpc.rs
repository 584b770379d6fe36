//! Peers of the HTTP/2 and gRPC tests (`tests/grpc.rs`, `tests/http2.rs`):
//!
//! * [`GrpcServer`] starts `servers/grpc_server.py` (grpcio, service `acc.Shop`),
//! * [`GrpcClient`] starts `servers/grpc_client.py` (grpcio) or `node/grpc_client.js`
//!   (@grpc/grpc-js), idle until [`GrpcClient::go`], then runs a list of calls on one channel,
//! * [`Nginx`] starts Debian's nginx serving cleartext HTTP/2 (prior knowledge) from a generated
//!   configuration, one process (`master_process off`),
//! * [`H2Client`] starts `node/h2_client.js` (Node's http2 module): several requests on one
//!   HTTP/2 connection, which curl 7.88 cannot do.
//!
//! Each peer must be installed (`cargo xtask setup` pins grpcio, `npm ci`s `tests/node`, and
//! installs nginx and Node.js); a missing one fails the test with a message saying so.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::{
    LinePump, SETUP_HINT, crate_dir, ensure_python_package, helper_timeout, kill_and_reap,
    peer_on_path, python, server_script, spawn_port_server, wait_success, wait_timeout,
};

/// The gRPC service of `servers/grpc_server.py`.
pub const GRPC_SERVICE: &str = "acc.Shop";

/// The grpcio version `cargo xtask setup` installs.
pub const GRPCIO_VERSION: &str = "1.78.0";

// ---------------------------------------------------------------------------
// Prerequisites
// ---------------------------------------------------------------------------

/// Panics unless [`python()`] imports grpcio at [`GRPCIO_VERSION`].
pub fn ensure_grpcio() {
    ensure_python_package("grpcio", "grpc", GRPCIO_VERSION, "the gRPC tests");
}

/// Debian's python3 (`/usr/bin/python3`) importing Debian's python3-grpcio: gRPC C core on the
/// system's OpenSSL (`libssl.so.3`, memory BIOs), the TLS kspan reads; PyPI's grpcio carries
/// BoringSSL without symbols. Or a failed test saying how to install it.
pub fn debian_python_with_grpcio() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let python = PathBuf::from("/usr/bin/python3");
        let probe = Command::new(&python)
            .args([
                "-c",
                "import grpc, sys; sys.exit(not grpc.__file__.startswith('/usr/lib/python3/'))",
            ])
            .stdin(Stdio::null())
            .status();
        assert!(
            probe.is_ok_and(|s| s.success()),
            "{} does not import Debian's grpc (package python3-grpcio, for gRPC over TLS); \
             {SETUP_HINT}",
            python.display()
        );
        python
    })
}

/// The `node` executable (canonical path), or a failed test saying how to install it.
pub fn node() -> &'static Path {
    static NODE: OnceLock<PathBuf> = OnceLock::new();
    NODE.get_or_init(|| peer_on_path("node", "node (Node.js)"))
}

/// `tests/node/{name}`, after checking that `tests/node/node_modules` holds @grpc/grpc-js.
pub fn node_script(name: &str) -> PathBuf {
    let dir = crate_dir().join("node");
    let grpc_js = dir.join("node_modules/@grpc/grpc-js/package.json");
    assert!(
        grpc_js.is_file(),
        "{} is missing: the Node.js peers' packages are not installed; {SETUP_HINT} \
         (it runs `npm ci` in tests/node)",
        grpc_js.display()
    );
    dir.join(name)
}

/// Debian's nginx, `/usr/sbin/nginx`, or a failed test saying how to install it.
pub fn nginx_bin() -> PathBuf {
    let path = PathBuf::from("/usr/sbin/nginx");
    assert!(
        path.is_file(),
        "{} is missing (Debian package nginx); {SETUP_HINT}",
        path.display()
    );
    path
}

/// SIGTERM, then SIGKILL if `child` has not exited within helper_timeout().
fn terminate(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        if wait_timeout(child, helper_timeout()).is_none() {
            kill_and_reap(child);
        }
    }
}

// ---------------------------------------------------------------------------
// gRPC server
// ---------------------------------------------------------------------------

/// `servers/grpc_server.py` (grpcio, `acc.Shop` on 127.0.0.1), stopped on drop.
pub struct GrpcServer {
    child: Child,
    pub pid: u32,
    pub port: u16,
    stderr: LinePump,
}

impl GrpcServer {
    /// Starts the server on a free port; `service_name` sets OTEL_SERVICE_NAME (otherwise it is
    /// removed from the environment). Returns once it printed `PORT <n>`, i.e. serves.
    pub fn start(service_name: Option<&str>) -> GrpcServer {
        ensure_grpcio();
        Self::spawn(Command::new(python()), service_name)
    }

    /// Starts the server with TLS on `cert`, under Debian's python3-grpcio (OpenSSL, which
    /// kspan reads: [`debian_python_with_grpcio`]).
    pub fn start_tls(cert: &crate::tls::TestCertificate) -> GrpcServer {
        let mut cmd = Command::new(debian_python_with_grpcio());
        cmd.arg(server_script("grpc_server.py"))
            .args(["--tls", cert.cert_str(), cert.key_str()]);
        Self::spawn_with(cmd, None)
    }

    fn spawn(mut cmd: Command, service_name: Option<&str>) -> GrpcServer {
        cmd.arg(server_script("grpc_server.py"));
        Self::spawn_with(cmd, service_name)
    }

    /// `cmd`: python and the script with its arguments.
    fn spawn_with(mut cmd: Command, service_name: Option<&str>) -> GrpcServer {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("PYTHONDONTWRITEBYTECODE", "1");
        match service_name {
            Some(n) => cmd.env("OTEL_SERVICE_NAME", n),
            None => cmd.env_remove("OTEL_SERVICE_NAME"),
        };
        let (child, pid, port, stderr) = spawn_port_server(cmd, "grpc_server.py");
        GrpcServer {
            child,
            pid,
            port,
            stderr,
        }
    }

    /// The server's stderr so far (tracebacks, if any).
    pub fn stderr(&self) -> String {
        self.stderr.snapshot()
    }

    /// Panics if the server died.
    pub fn assert_alive(&mut self) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!(
                "grpc_server.py (pid {}) exited: {st}\n--- server stderr ---\n{}",
                self.pid,
                self.stderr.finish()
            );
        }
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

// ---------------------------------------------------------------------------
// gRPC clients
// ---------------------------------------------------------------------------

/// Which gRPC implementation a [`GrpcClient`] runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrpcImpl {
    /// `servers/grpc_client.py`: grpcio (gRPC C core, its own HTTP/2 and HPACK).
    Python,
    /// `node/grpc_client.js`: @grpc/grpc-js on Node's http2 (nghttp2). Unary calls only.
    Node,
    /// `servers/grpc_client.py` under Debian's python3-grpcio, over TLS trusting the PEM
    /// certificate `ca`.
    DebianPythonTls { ca: String },
    /// `node/grpc_client.js` over TLS (Node's OpenSSL) trusting the PEM certificate `ca`.
    NodeTls { ca: String },
}

/// One call as the client saw it.
#[derive(Debug, Clone)]
pub struct GrpcCall {
    /// The call spec (`unary:ok`, `server_stream`, `concurrent:100`, ...).
    pub spec: String,
    /// The gRPC status code name the client got (`OK`, `INTERNAL`, ...).
    pub status: String,
    /// From the call's start to its end, measured by the client. Every call of a
    /// `concurrent:N` spec is measured from the start of the batch.
    pub elapsed: Duration,
}

/// What a [`GrpcClient`] run reported, in call order.
#[derive(Debug)]
pub struct GrpcClientResult {
    pub calls: Vec<GrpcCall>,
    pub stdout: String,
}

/// A gRPC client process, started and waiting for [`GrpcClient::go`]: every call it makes goes
/// on ONE channel (one HTTP/2 connection), in the order given.
pub struct GrpcClient {
    child: Child,
    pub pid: u32,
    pub implementation: GrpcImpl,
    stdin: Option<ChildStdin>,
    stdout: LinePump,
    stderr: LinePump,
}

impl GrpcClient {
    /// Starts a grpcio client (`servers/grpc_client.py`) for `calls` against 127.0.0.1:`port`.
    pub fn python(port: u16, calls: &[&str], traceparent: Option<&str>) -> GrpcClient {
        Self::start(GrpcImpl::Python, port, calls, traceparent)
    }

    /// Starts a @grpc/grpc-js client (`node/grpc_client.js`; `unary:*` calls only).
    pub fn node(port: u16, calls: &[&str], traceparent: Option<&str>) -> GrpcClient {
        Self::start(GrpcImpl::Node, port, calls, traceparent)
    }

    /// Starts a @grpc/grpc-js client over TLS trusting `cert` (`unary:*` calls only).
    pub fn node_tls(port: u16, calls: &[&str], cert: &crate::tls::TestCertificate) -> GrpcClient {
        let ca = cert.cert_str().to_string();
        Self::start(GrpcImpl::NodeTls { ca }, port, calls, None)
    }

    /// Starts a grpcio client over TLS trusting `cert`, under Debian's python3-grpcio
    /// (OpenSSL, which kspan reads: [`debian_python_with_grpcio`]).
    pub fn python_tls(port: u16, calls: &[&str], cert: &crate::tls::TestCertificate) -> GrpcClient {
        Self::start(
            GrpcImpl::DebianPythonTls {
                ca: cert.cert_str().to_string(),
            },
            port,
            calls,
            None,
        )
    }

    /// Starts the client and waits for its `READY` (printed before it connects).
    pub fn start(
        implementation: GrpcImpl,
        port: u16,
        calls: &[&str],
        traceparent: Option<&str>,
    ) -> GrpcClient {
        assert!(!calls.is_empty(), "a gRPC client needs calls");
        let mut cmd = match implementation {
            GrpcImpl::Python => {
                ensure_grpcio();
                let mut c = Command::new(python());
                c.arg(server_script("grpc_client.py"))
                    .env("PYTHONDONTWRITEBYTECODE", "1");
                c
            }
            GrpcImpl::Node => {
                let script = node_script("grpc_client.js");
                let mut c = Command::new(node());
                c.arg(script);
                c
            }
            GrpcImpl::NodeTls { ref ca } => {
                let script = node_script("grpc_client.js");
                let mut c = Command::new(node());
                c.arg(script).args(["--tls-ca", ca]);
                c
            }
            GrpcImpl::DebianPythonTls { ref ca } => {
                let mut c = Command::new(debian_python_with_grpcio());
                c.arg(server_script("grpc_client.py"))
                    .args(["--tls-ca", ca])
                    .env("PYTHONDONTWRITEBYTECODE", "1");
                c
            }
        };
        cmd.args([
            "--wait",
            "--port",
            &port.to_string(),
            "--calls",
            &calls.join(","),
        ]);
        if let Some(tp) = traceparent {
            cmd.args(["--traceparent", tp]);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_remove("OTEL_SERVICE_NAME");
        for v in [
            "http_proxy",
            "HTTP_PROXY",
            "https_proxy",
            "HTTPS_PROXY",
            "grpc_proxy",
        ] {
            cmd.env_remove(v);
        }
        let what = format!("gRPC client ({implementation:?})");
        let (child, stdout, stderr) = spawn_waiting(cmd, &what);
        let mut child = child;
        let pid = child.id();
        let stdin = child.stdin.take();
        GrpcClient {
            child,
            pid,
            implementation,
            stdin,
            stdout,
            stderr,
        }
    }

    /// Lets the client connect and make its calls; waits for it to exit 0 (every call got the
    /// status it expects) and parses its `CALL` lines.
    pub fn go(mut self) -> GrpcClientResult {
        let mut stdin = self.stdin.take().expect("released once");
        stdin.write_all(b"go\n").expect("write to the gRPC client");
        drop(stdin);
        let what = format!("gRPC client ({:?}, pid {})", self.implementation, self.pid);
        let (out, _err) = wait_success(&mut self.child, &mut self.stdout, &mut self.stderr, &what);
        let mut calls = Vec::new();
        let mut done = None;
        for line in out.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["CALL", index, spec, status, ms] => {
                    assert_eq!(
                        index.parse::<usize>().ok(),
                        Some(calls.len()),
                        "{what}: calls out of order:\n{out}"
                    );
                    let ms: f64 = ms
                        .parse()
                        .unwrap_or_else(|e| panic!("{what}: bad elapsed time in {line:?}: {e}"));
                    calls.push(GrpcCall {
                        spec: spec.to_string(),
                        status: status.to_string(),
                        elapsed: Duration::from_secs_f64(ms / 1000.0),
                    });
                }
                ["DONE", n] => done = n.parse::<usize>().ok(),
                _ => {}
            }
        }
        assert_eq!(
            done,
            Some(calls.len()),
            "{what}: no DONE line matching its CALL lines:\n{out}"
        );
        GrpcClientResult { calls, stdout: out }
    }
}

impl Drop for GrpcClient {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

/// Spawns `cmd` (stdin, stdout and stderr piped) and waits for its `READY` line.
fn spawn_waiting(mut cmd: Command, what: &str) -> (Child, LinePump, LinePump) {
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let stdout = LinePump::new(child.stdout.take().expect("piped stdout"));
    let mut stderr = LinePump::new(child.stderr.take().expect("piped stderr"));
    match stdout.lines.recv_timeout(helper_timeout()) {
        Ok(Some(l)) if l.trim() == "READY" => {}
        other => {
            kill_and_reap(&mut child);
            panic!(
                "{what} did not print READY (got {other:?}).\n--- stderr ---\n{}",
                stderr.finish()
            );
        }
    }
    (child, stdout, stderr)
}

// ---------------------------------------------------------------------------
// nginx (cleartext HTTP/2)
// ---------------------------------------------------------------------------

/// Debian's nginx in the foreground, one process (`master_process off`: the process listening
/// is the one serving, the one to select with `--pid`), serving cleartext HTTP/2 with prior
/// knowledge on 127.0.0.1:`port`:
///
/// * `/ok`: 200 `ok\n`
/// * `/missing`: 404
///
/// Its configuration, pid file and logs live in a temporary directory removed on drop.
pub struct Nginx {
    child: Child,
    pub pid: u32,
    pub port: u16,
    dir: PathBuf,
}

impl Nginx {
    /// Cleartext HTTP/2 with prior knowledge.
    pub fn start() -> Nginx {
        Self::start_with(|dir, port| nginx_conf(dir, port, "http2", ""))
    }

    /// HTTPS with `cert`: HTTP/1.1 and HTTP/2 by ALPN (nginx links Debian's libssl.so.3).
    pub fn start_tls(cert: &crate::tls::TestCertificate) -> Nginx {
        let tls = format!(
            "ssl_certificate {};\n        ssl_certificate_key {};",
            cert.cert.display(),
            cert.key.display()
        );
        Self::start_with(|dir, port| nginx_conf(dir, port, "ssl http2", &tls))
    }

    fn start_with(conf_for: impl FnOnce(&Path, u16) -> String) -> Nginx {
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let bin = nginx_bin();
        let dir = std::env::temp_dir().join(format!(
            "kspan-e2e-nginx-{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let port = super::free_port();
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, conf_for(&dir, port))
            .unwrap_or_else(|e| panic!("write {}: {e}", conf.display()));
        let error_log = dir.join("error.log");
        // -e: the log for errors before the configuration is read (not the system's); -p: the
        // prefix for relative paths (none are left, but not /usr/share/nginx either).
        let mut child = Command::new(&bin)
            .arg("-e")
            .arg(&error_log)
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env_remove("OTEL_SERVICE_NAME")
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let pid = child.id();
        let deadline = Instant::now() + helper_timeout();
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            let exited = child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() >= deadline {
                kill_and_reap(&mut child);
                let mut stderr = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut stderr);
                }
                let log = std::fs::read_to_string(&error_log).unwrap_or_default();
                let _ = std::fs::remove_dir_all(&dir);
                panic!(
                    "nginx did not listen on 127.0.0.1:{port} ({}).\n--- stderr ---\n{stderr}\n\
                     --- error.log ---\n{log}",
                    match exited {
                        Some(st) => format!("exited: {st}"),
                        None => format!("not within {:?}", helper_timeout()),
                    }
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        Nginx {
            child,
            pid,
            port,
            dir,
        }
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// `https://127.0.0.1:PORT{path}` (a server started with [`Nginx::start_tls`]).
    pub fn https_url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{}", self.port, path)
    }

    /// nginx's error log so far.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: fast shutdown; it removes its pid file.
        terminate(&mut self.child);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `listen`: the `listen` directive's parameters after the address; `server_extra`: more directives for the server.
fn nginx_conf(dir: &Path, port: u16, listen: &str, server_extra: &str) -> String {
    let d = dir.display();
    format!(
        r#"# Written by the kspan end-to-end tests; the system nginx configuration is not used.
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;

events {{
    worker_connections 256;
}}

http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    default_type text/plain;
    keepalive_timeout 60s;

    server {{
        # nginx 1.22: `http2` alone is cleartext HTTP/2 with prior knowledge (no HTTP/1.1 on
        # the port); with `ssl`, ALPN chooses h2 or http/1.1.
        listen 127.0.0.1:{port} {listen};
        {server_extra}
        location /ok {{
            return 200 "ok\n";
        }}
        location /missing {{
            return 404;
        }}
    }}
}}
"#
    )
}

// ---------------------------------------------------------------------------
// Node.js HTTP/2 client
// ---------------------------------------------------------------------------

/// `node/h2_client.js`: GETs on ONE cleartext HTTP/2 connection (prior knowledge), started and
/// waiting for [`H2Client::go`].
pub struct H2Client {
    child: Child,
    pub pid: u32,
    stdin: Option<ChildStdin>,
    stdout: LinePump,
    stderr: LinePump,
}

/// What an [`H2Client`] run reported.
#[derive(Debug)]
pub struct H2Result {
    /// (path, status) per request, in the order given.
    pub responses: Vec<(String, u16)>,
    /// The local port of the one connection.
    pub local_port: u16,
    pub stdout: String,
}

impl H2Client {
    /// Starts the client for GETs of `paths` from 127.0.0.1:`port`, one after the other or, with
    /// `concurrent`, all at once; waits for its `READY`.
    pub fn start(port: u16, paths: &[&str], concurrent: bool) -> H2Client {
        let script = node_script("h2_client.js");
        let mut cmd = Command::new(node());
        cmd.arg(script).args([
            "--wait",
            "--port",
            &port.to_string(),
            "--paths",
            &paths.join(","),
        ]);
        if concurrent {
            cmd.arg("--concurrent");
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_remove("OTEL_SERVICE_NAME");
        let (mut child, stdout, stderr) = spawn_waiting(cmd, "h2_client.js");
        let pid = child.id();
        let stdin = child.stdin.take();
        H2Client {
            child,
            pid,
            stdin,
            stdout,
            stderr,
        }
    }

    /// Lets the client send its requests; waits for it to exit 0 and parses its output.
    pub fn go(mut self) -> H2Result {
        let mut stdin = self.stdin.take().expect("released once");
        stdin.write_all(b"go\n").expect("write to h2_client.js");
        drop(stdin);
        let what = format!("h2_client.js (pid {})", self.pid);
        let (out, _err) = wait_success(&mut self.child, &mut self.stdout, &mut self.stderr, &what);
        let mut responses = Vec::new();
        let mut local_port = None;
        for line in out.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["LOCAL_PORT", p] => local_port = p.parse().ok(),
                ["RESP", _, path, status, _] => responses.push((
                    path.to_string(),
                    status
                        .parse()
                        .unwrap_or_else(|e| panic!("{what}: bad status in {line:?}: {e}")),
                )),
                _ => {}
            }
        }
        H2Result {
            responses,
            local_port: local_port
                .unwrap_or_else(|| panic!("{what} printed no LOCAL_PORT line:\n{out}")),
            stdout: out,
        }
    }
}

impl Drop for H2Client {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}
