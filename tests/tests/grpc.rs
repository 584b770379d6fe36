//! End-to-end tests of kspan's gRPC tracing (over HTTP/2), with real gRPC peers:
//! `servers/grpc_server.py` (grpcio, service `acc.Shop`), `servers/grpc_client.py` (grpcio) and
//! `node/grpc_client.js` (@grpc/grpc-js: another HTTP/2 stack and HPACK encoder). Each client
//! run makes its calls on ONE channel, i.e. one HTTP/2 connection, one stream per call.
//!
//! Expected of every call, when both ends are traced: exactly one SERVER span in the server
//! process and one CLIENT span in the client process, named `{rpc.service}/{rpc.method}`, with
//! `rpc.system`, `rpc.service`, `rpc.method`, `rpc.grpc.status_code`, `server.address`,
//! `server.port`, `network.peer.address`, `network.peer.port`, `network.protocol.name` ("http"),
//! `network.protocol.version` ("2"), on SERVER spans `client.address` and `client.port`, and
//! `error.type` on errors. SERVER spans are errors for UNKNOWN, DEADLINE_EXCEEDED,
//! UNIMPLEMENTED, INTERNAL, UNAVAILABLE and DATA_LOSS; CLIENT spans for every code but OK. The
//! SERVER span of a call is a child of its CLIENT span (both ends pair by stream id).
//!
//! Needs root, BTF and tracefs (see `kspan_e2e::preflight`), the kspan binary (or KSPAN_BIN) and
//! the peers `cargo xtask setup` installs: grpcio for python3, Node.js with `tests/node`'s
//! packages.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use kspan_e2e::chain::random_hex;
use kspan_e2e::grpc::*;
use kspan_e2e::observed::Observed;
use kspan_e2e::otlp_receiver::*;
use kspan_e2e::*;
use serde_json::Value;

const SERVER_SERVICE: &str = "e2e-grpc-server";

/// gRPC status codes.
const OK: i64 = 0;
const DEADLINE_EXCEEDED: i64 = 4;
const NOT_FOUND: i64 = 5;
const INTERNAL: i64 = 13;

/// Explicit bucket boundaries (seconds) the semantic conventions advise for
/// `rpc.{server,client}.call.duration`, the same as for the HTTP durations.
const BOUNDS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Is a SERVER span with this gRPC status an error? (OpenTelemetry gRPC conventions.)
fn server_error(code: i64) -> bool {
    matches!(code, 2 | 4 | 12 | 13 | 14 | 15)
}

/// What one call must look like on one side.
struct Expected<'a> {
    method: &'a str,
    /// The gRPC status code (`rpc.grpc.status_code`), which decides the span status.
    code: i64,
    /// The span may lack `rpc.grpc.status_code` (no status came over the wire); when it has
    /// one, it must be `code`.
    code_optional: bool,
    /// The server port.
    port: u16,
}

impl Expected<'_> {
    fn call(method: &str, code: i64, port: u16) -> Expected<'_> {
        Expected {
            method,
            code,
            code_optional: false,
            port,
        }
    }

    fn name(&self) -> String {
        format!("{GRPC_SERVICE}/{}", self.method)
    }

    fn is_error(&self, kind: &str) -> bool {
        match kind {
            "SERVER" => server_error(self.code),
            _ => self.code != OK,
        }
    }

    /// The exact attribute set of a span of `kind`; `peer_port` is `network.peer.port` (the
    /// server port for CLIENT spans, the client's ephemeral port for SERVER spans).
    fn attrs(&self, span: &Value, kind: &str, peer_port: Expect) -> Vec<(&'static str, Expect)> {
        let mut v = vec![
            ("rpc.system", s("grpc")),
            ("rpc.service", s(GRPC_SERVICE)),
            ("rpc.method", s(self.method)),
            ("server.address", s("127.0.0.1")),
            ("server.port", int(self.port)),
            ("network.peer.address", s("127.0.0.1")),
            ("network.peer.port", peer_port.clone()),
            ("network.protocol.name", s("http")),
            ("network.protocol.version", s("2")),
        ];
        if kind == "SERVER" {
            v.push(("client.address", s("127.0.0.1")));
            v.push(("client.port", peer_port));
        }
        if !self.code_optional || attr(span, "rpc.grpc.status_code").is_some() {
            v.push(("rpc.grpc.status_code", int(self.code)));
        }
        if self.is_error(kind) {
            v.push(("error.type", Expect::AnyStr));
        }
        v
    }

    /// Name, kind, status and the exact attributes of `span`.
    fn check(&self, span: &Value, kind: &str, peer_port: Expect) {
        assert_eq!(name(span), self.name(), "span name:\n{}", pretty(span));
        assert_eq!(span["kind"], kind, "span kind:\n{}", pretty(span));
        let want = if self.is_error(kind) {
            "ERROR"
        } else {
            "UNSET"
        };
        assert_eq!(
            status(span),
            want,
            "{kind} span status for gRPC status {}:\n{}",
            self.code,
            pretty(span)
        );
        assert_attributes(span, &self.attrs(span, kind, peer_port));
    }

    fn check_server(&self, span: &Value) {
        self.check(span, "SERVER", Expect::AnyInt);
        assert_ne!(
            must_i64(span, "network.peer.port"),
            i64::from(self.port),
            "a SERVER span's peer is the client:\n{}",
            pretty(span)
        );
    }

    fn check_client(&self, span: &Value) {
        self.check(span, "CLIENT", int(self.port));
    }
}

/// How much later the SERVER span may end than the CLIENT span (see `tests/http1.rs`: the
/// client can read the last bytes before the server's write returns).
fn write_return_slack_ns() -> u64 {
    5_000_000 * time_scale()
}

fn assert_client_encloses_server(client: &Value, server: &Value) {
    assert!(
        start_ns(client) <= start_ns(server)
            && end_ns(client) + write_return_slack_ns() >= end_ns(server),
        "CLIENT span [{}, {}] must enclose SERVER span [{}, {}]\nclient:\n{}\nserver:\n{}",
        start_ns(client),
        end_ns(client),
        start_ns(server),
        end_ns(server),
        pretty(client),
        pretty(server)
    );
}

/// The span lasts between `min` and `max` (`max` stretched by the time scale).
fn assert_duration_between(span: &Value, min: Duration, max: Duration) {
    let max = max * time_scale() as u32;
    let d = duration(span);
    assert!(
        d >= min && d <= max,
        "span lasts {d:?}, expected {min:?} to {max:?}:\n{}",
        pretty(span)
    );
}

/// Every SERVER span has the same `network.peer.port`: one connection.
fn assert_one_connection(servers: &[&Value]) {
    let ports: BTreeSet<i64> = servers
        .iter()
        .map(|s| must_i64(s, "network.peer.port"))
        .collect();
    assert_eq!(
        ports.len(),
        1,
        "the calls of one channel share one connection, but the SERVER spans have the peer \
         ports {ports:?}"
    );
}

/// Traces the server and the client, lets the client make its calls, and checks that the
/// server lived, each call got its status, and the run was clean.
fn trace_both_ends(server: &mut GrpcServer, client: GrpcClient, statuses: &[&str]) -> Run {
    let kspan = Kspan::start(&[
        "--pid",
        &server.pid.to_string(),
        "--pid",
        &client.pid.to_string(),
    ]);
    let result = client.go();
    let run = kspan.stop();
    server.assert_alive();
    assert_statuses(&result, statuses);
    assert_clean_run(&run);
    run
}

/// No TLS plaintext lost or unseen.
fn assert_tls_plaintext_complete(run: &Run) {
    for counter_name in ["tls_processes_unseen", "tls_writes_expired", "tls_unbound"] {
        assert_eq!(
            counter(run, counter_name),
            0,
            "{counter_name}\n{}",
            run.dump()
        );
    }
}

fn assert_statuses(result: &GrpcClientResult, want: &[&str]) {
    let got: Vec<&str> = result.calls.iter().map(|c| c.status.as_str()).collect();
    assert_eq!(got, want, "client output:\n{}", result.stdout);
}

fn assert_service(span: &Value, service: &str, pid: u32) {
    assert_eq!(
        (res_str(span, "service.name"), res_i64(span, "process.pid")),
        (Some(service), Some(i64::from(pid))),
        "resource:\n{}",
        pretty(span)
    );
}

// ---------------------------------------------------------------------------
// Spans
// ---------------------------------------------------------------------------

/// Unary calls ending OK, INTERNAL, NOT_FOUND, and OK after 0.2 s, from grpcio to grpcio, both
/// ends traced: one SERVER and one CLIENT span per call with every attribute, the statuses of
/// each side's rule, the durations of the slow call, and each SERVER span the child of its call's
/// CLIENT span.
#[test]
fn unary_calls_both_sides() {
    let _env = preflight();
    let mut server = GrpcServer::start(Some(SERVER_SERVICE));
    let calls = ["unary:ok", "unary:internal", "unary:notfound", "unary:slow"];
    let client = GrpcClient::python(server.port, &calls, None);
    let client_pid = client.pid;
    let run = trace_both_ends(&mut server, client, &["OK", "INTERNAL", "NOT_FOUND", "OK"]);

    assert_eq!(
        run.spans.len(),
        8,
        "expected exactly 4 + 4 spans\n{}",
        run.dump()
    );
    let servers = spans_of(&run, server.pid, "SERVER", 4, "gRPC server");
    let clients = spans_of(&run, client_pid, "CLIENT", 4, "gRPC client");
    let codes = [OK, INTERNAL, NOT_FOUND, OK];
    let exe = python_exe_name();
    for (i, ((srv, cli), code)) in servers.iter().zip(&clients).zip(codes).enumerate() {
        let want = Expected::call("GetItem", code, server.port);
        want.check_server(srv);
        want.check_client(cli);
        assert_service(srv, SERVER_SERVICE, server.pid);
        assert_service(cli, &exe, client_pid);
        assert_child_of(srv, cli, &run);
        assert_client_encloses_server(cli, srv);
        if calls[i] == "unary:slow" {
            for span in [srv, cli] {
                assert_duration_between(span, Duration::from_millis(200), Duration::from_secs(1));
            }
        } else {
            for span in [srv, cli] {
                assert_duration_between(span, Duration::ZERO, Duration::from_millis(200));
            }
        }
    }
    // NOT_FOUND: an error for the client only.
    assert_eq!(status(servers[2]), "UNSET");
    assert_eq!(
        attr(servers[2], "error.type"),
        None,
        "{}",
        pretty(servers[2])
    );
    assert_eq!(status(clients[2]), "ERROR");
    assert_one_connection(&servers);
}

/// gRPC over TLS, both ends Debian's python3-grpcio (gRPC C core on the system's OpenSSL with
/// memory BIOs: its socket I/O happens outside the `SSL_*` calls). The server's `SSL_read`s are
/// bound to the TLS socket the thread read last, the client's first write (preface, settings,
/// first HEADERS) is held until the thread writes the socket. The same spans as cleartext,
/// and none from ciphertext.
#[test]
fn grpc_over_tls_both_sides() {
    let _env = preflight();
    let cert = kspan_e2e::tls::TestCertificate::new();
    let mut server = GrpcServer::start_tls(&cert);
    let calls = [
        "unary:ok",
        "unary:internal",
        "unary:notfound",
        "server_stream",
    ];
    let client = GrpcClient::python_tls(server.port, &calls, &cert);
    let client_pid = client.pid;
    let run = trace_both_ends(&mut server, client, &["OK", "INTERNAL", "NOT_FOUND", "OK"]);
    assert_tls_plaintext_complete(&run);
    assert_eq!(
        run.spans.len(),
        8,
        "expected exactly 4 + 4 spans\n{}",
        run.dump()
    );
    let servers = spans_of(&run, server.pid, "SERVER", 4, "gRPC server");
    let clients = spans_of(&run, client_pid, "CLIENT", 4, "gRPC client");
    let expected = [
        ("GetItem", OK),
        ("GetItem", INTERNAL),
        ("GetItem", NOT_FOUND),
        ("ListItems", OK),
    ];
    for ((srv, cli), (method, code)) in servers.iter().zip(&clients).zip(expected) {
        let want = Expected::call(method, code, server.port);
        want.check_server(srv);
        want.check_client(cli);
        assert_child_of(srv, cli, &run);
        assert_client_encloses_server(cli, srv);
    }
    assert_one_connection(&servers);
}

/// Replies of 256 KiB: the server writes the HEADERS, sixteen 16 KiB DATA frames and the trailers
/// in one sendmsg, far past what the kernel copies. The trailers come from the copy of the
/// syscall's last bytes, so every call gets its span on both sides. The first call's
/// `grpc-status` is a literal and is decoded; after the first lossy syscall the server's HPACK
/// table is partly unknown to kspan, so a later status sent as a table reference is unknown
/// (no code, not an error) rather than guessed.
#[test]
fn large_replies_both_sides() {
    let _env = preflight();
    let mut server = GrpcServer::start(Some(SERVER_SERVICE));
    let calls = ["unary:big", "unary:ok", "unary:big"];
    let client = GrpcClient::python(server.port, &calls, None);
    let client_pid = client.pid;
    let run = trace_both_ends(&mut server, client, &["OK", "OK", "OK"]);

    assert_eq!(
        run.spans.len(),
        6,
        "expected exactly 3 + 3 spans\n{}",
        run.dump()
    );
    let servers = spans_of(&run, server.pid, "SERVER", 3, "gRPC server");
    let clients = spans_of(&run, client_pid, "CLIENT", 3, "gRPC client");
    for (i, (srv, cli)) in servers.iter().zip(&clients).enumerate() {
        let want = Expected {
            code_optional: i > 0,
            ..Expected::call("GetItem", OK, server.port)
        };
        want.check_server(srv);
        want.check_client(cli);
        assert_child_of(srv, cli, &run);
        assert_client_encloses_server(cli, srv);
        for span in [srv, cli] {
            assert_duration_between(span, Duration::ZERO, Duration::from_secs(2));
        }
    }
    assert_one_connection(&servers);
}

/// A unary call whose 0.3 s deadline expires while the handler sleeps (2 s). The server's gRPC
/// core ends the stream with DEADLINE_EXCEEDED trailers and RST_STREAM, or the client resets it
/// when its own timer fires first: whichever the wire shows, one span per side, both lasting
/// about 0.3 s, both errors (the CLIENT span with `error.type`), with a status code, where one
/// was seen, of DEADLINE_EXCEEDED.
///
/// An OK call follows on the same connection: once the server answered it, it has read
/// everything the client sent before, its RST_STREAM too, so the deadline call's SERVER span
/// is complete before kspan stops, whichever side ended the stream.
#[test]
fn deadline_exceeded() {
    let _env = preflight();
    let mut server = GrpcServer::start(Some(SERVER_SERVICE));
    let client = GrpcClient::python(server.port, &["unary:deadline", "unary:ok"], None);
    let client_pid = client.pid;
    let run = trace_both_ends(&mut server, client, &["DEADLINE_EXCEEDED", "OK"]);

    assert_eq!(
        run.spans.len(),
        4,
        "expected exactly 2 + 2 spans\n{}",
        run.dump()
    );
    let servers = spans_of(&run, server.pid, "SERVER", 2, "gRPC server");
    let clients = spans_of(&run, client_pid, "CLIENT", 2, "gRPC client");
    let (srv, cli) = (servers[0], clients[0]);
    let want = Expected {
        method: "GetItem",
        code: DEADLINE_EXCEEDED,
        code_optional: true,
        port: server.port,
    };
    // The client: an error in every case.
    want.check_client(cli);
    assert!(
        attr_str(cli, "error.type").is_some_and(|t| !t.is_empty()),
        "{}",
        pretty(cli)
    );
    // The server: an error too, DEADLINE_EXCEEDED being a server error when its trailers carry
    // it, and a stream the client reset before any status an unfinished call.
    want.check_server(srv);
    for span in [srv, cli] {
        assert_duration_between(span, Duration::from_millis(250), Duration::from_secs(2));
    }
    assert_child_of(srv, cli, &run);

    let ok = Expected::call("GetItem", OK, server.port);
    ok.check_server(servers[1]);
    ok.check_client(clients[1]);
    assert_child_of(servers[1], clients[1], &run);
    assert_one_connection(&servers);
}

/// Server-streaming (3 replies), client-streaming (3 requests) and bidirectional (3 each way)
/// calls: still one span per call and side, named after the method.
#[test]
fn streaming_calls() {
    let _env = preflight();
    let mut server = GrpcServer::start(Some(SERVER_SERVICE));
    let calls = ["server_stream", "client_stream", "bidi"];
    let client = GrpcClient::python(server.port, &calls, None);
    let client_pid = client.pid;
    let run = trace_both_ends(&mut server, client, &["OK", "OK", "OK"]);

    assert_eq!(
        run.spans.len(),
        6,
        "expected exactly 3 + 3 spans\n{}",
        run.dump()
    );
    let servers = spans_of(&run, server.pid, "SERVER", 3, "gRPC server");
    let clients = spans_of(&run, client_pid, "CLIENT", 3, "gRPC client");
    for ((srv, cli), method) in servers
        .iter()
        .zip(&clients)
        .zip(["ListItems", "PutItems", "Chat"])
    {
        let want = Expected::call(method, OK, server.port);
        want.check_server(srv);
        want.check_client(cli);
        assert_child_of(srv, cli, &run);
        assert_client_encloses_server(cli, srv);
    }
    assert_one_connection(&servers);
}

/// A client that sends `traceparent` metadata, both ends traced: every span is in the header's
/// trace; the CLIENT spans are children of the header's span, and, as for HTTP/1 (README,
/// "Applications with their own OpenTelemetry SDK"), so are the SERVER spans: the header wins
/// over connection pairing.
#[test]
fn traceparent_metadata_both_sides() {
    let _env = preflight();
    let mut server = GrpcServer::start(Some(SERVER_SERVICE));
    let (t, p) = (random_hex(16), random_hex(8));
    let traceparent = format!("00-{t}-{p}-01");
    let client = GrpcClient::python(
        server.port,
        &["unary:ok", "unary:notfound"],
        Some(&traceparent),
    );
    let client_pid = client.pid;
    let run = trace_both_ends(&mut server, client, &["OK", "NOT_FOUND"]);

    assert_eq!(
        run.spans.len(),
        4,
        "expected exactly 2 + 2 spans\n{}",
        run.dump()
    );
    let servers = spans_of(&run, server.pid, "SERVER", 2, "gRPC server");
    let clients = spans_of(&run, client_pid, "CLIENT", 2, "gRPC client");
    for ((srv, cli), code) in servers.iter().zip(&clients).zip([OK, NOT_FOUND]) {
        let want = Expected::call("GetItem", code, server.port);
        want.check_server(srv);
        want.check_client(cli);
        for (label, span) in [("CLIENT", cli), ("SERVER", srv)] {
            assert_eq!(
                (trace_id(span), parent_id(span)),
                (t.as_str(), Some(p.as_str())),
                "the {label} span must continue the traceparent metadata's trace, as a child of \
                 its span {p}\n{}",
                run.dump()
            );
            assert_ne!(span_id(span), p, "{}", pretty(span));
        }
        assert_ne!(span_id(srv), span_id(cli));
    }
}

/// Only the server traced: its SERVER span continues the `traceparent` metadata the call
/// carries (trace id and parent from it).
#[test]
fn traceparent_metadata_server_only() {
    let _env = preflight();
    let mut server = GrpcServer::start(Some(SERVER_SERVICE));
    let (t, p) = (random_hex(16), random_hex(8));
    let traceparent = format!("00-{t}-{p}-01");
    let client = GrpcClient::python(server.port, &["unary:ok"], Some(&traceparent));
    let kspan = Kspan::start(&["--pid", &server.pid.to_string()]);
    let result = client.go();
    let run = kspan.stop();
    server.assert_alive();
    assert_statuses(&result, &["OK"]);
    assert_clean_run(&run);

    assert_eq!(
        run.spans.len(),
        1,
        "expected exactly 1 span\n{}",
        run.dump()
    );
    let srv = spans_of(&run, server.pid, "SERVER", 1, "gRPC server")[0];
    Expected::call("GetItem", OK, server.port).check_server(srv);
    assert_eq!(
        (trace_id(srv), parent_id(srv)),
        (t.as_str(), Some(p.as_str())),
        "the SERVER span must continue the traceparent metadata's trace\n{}",
        run.dump()
    );
}

/// 100 unary calls in flight at once on one channel (100 concurrent HTTP/2 streams on one
/// connection): exactly 100 spans per side, all OK, each SERVER span the child of a different
/// CLIENT span.
#[test]
fn hundred_concurrent_calls_on_one_channel() {
    const N: usize = 100;
    let _env = preflight();
    let mut server = GrpcServer::start(Some(SERVER_SERVICE));
    let client = GrpcClient::python(server.port, &[&format!("concurrent:{N}")], None);
    let client_pid = client.pid;
    let run = trace_both_ends(&mut server, client, &["OK"; N]);

    // Runs the kernel skipped (`program_misses`: 7.2 runs syscall tracepoint programs
    // preemptibly, and a program already running on a CPU makes the kernel skip the next) are
    // syscalls kspan never saw, with no gap to tell the parser: each can cost a call its span
    // or its response (a CLIENT or SERVER span ending `connection_closed`: the response write
    // or read never seen). With none skipped (the host, and every other kernel of the matrix)
    // every call must be exact.
    let misses = counter(&run, "program_misses") as usize;
    let of_kind = |pid: u32, kind: &str| -> Vec<&Value> {
        sorted_by_start(
            by_pid(&run.spans, pid)
                .into_iter()
                .filter(|s| s["kind"] == kind)
                .collect(),
        )
    };
    let servers = of_kind(server.pid, "SERVER");
    let all_clients = of_kind(client_pid, "CLIENT");
    assert!(
        servers.len() <= N && all_clients.len() <= N && run.spans.len() <= 2 * N,
        "more spans than calls\n{}",
        run.dump()
    );
    let cut_short =
        |s: &&Value| status(s) == "ERROR" && attr_str(s, "error.type") == Some("connection_closed");
    let whole = |spans: &[&Value]| -> usize { spans.iter().filter(|s| !cut_short(s)).count() };
    let affected = 2 * N - whole(&servers) - whole(&all_clients);
    assert!(
        affected <= 2 * misses,
        "{affected} calls lost a span or their end, with {misses} program runs skipped by the \
         kernel\n{}",
        run.dump()
    );
    let want = Expected::call("GetItem", OK, server.port);
    for cli in all_clients.iter().filter(|s| !cut_short(s)) {
        want.check_client(cli);
    }
    let mut client_by_id: BTreeMap<&str, &Value> = BTreeMap::new();
    for cli in &all_clients {
        assert!(
            client_by_id.insert(span_id(cli), cli).is_none(),
            "two CLIENT spans with the id {}\n{}",
            span_id(cli),
            run.dump()
        );
    }
    // A call whose request the kernel skipped on the client side has no CLIENT span, so its
    // SERVER span has no parent (it waited for one, counted in `links_late`): there can be as
    // many of those as CLIENT spans are missing, and never more than runs were skipped.
    let parentless = servers.iter().filter(|s| parent_id(s).is_none()).count();
    assert!(
        parentless <= N - all_clients.len() && parentless <= misses,
        "{parentless} SERVER span(s) without a parent (their CLIENT span), with {} CLIENT spans \
         missing and {misses} program runs skipped by the kernel\n{}",
        N - all_clients.len(),
        run.dump()
    );
    let mut parents = BTreeSet::new();
    for srv in &servers {
        if !cut_short(srv) {
            want.check_server(srv);
        }
        let Some(parent) = parent_id(srv) else {
            continue;
        };
        let cli = client_by_id.get(parent).unwrap_or_else(|| {
            panic!(
                "SERVER span whose parent {parent} is none of the client's CLIENT spans:\n{}\n\n{}",
                pretty(srv),
                run.dump()
            )
        });
        assert_child_of(srv, cli, &run);
        if !cut_short(cli) && !cut_short(srv) {
            assert_client_encloses_server(cli, srv);
        }
        assert!(
            parents.insert(parent),
            "two SERVER spans are children of the CLIENT span {parent}\n{}",
            run.dump()
        );
    }
    assert_eq!(parents.len(), servers.len() - parentless);
    assert_one_connection(&servers);
}

/// A @grpc/grpc-js client (Node's HTTP/2 and HPACK) against the grpcio server: the same spans,
/// attributes and links as with grpcio on both ends.
#[test]
fn grpc_js_client() {
    let _env = preflight();
    let mut server = GrpcServer::start(Some(SERVER_SERVICE));
    let client = GrpcClient::node(server.port, &["unary:ok", "unary:internal"], None);
    let client_pid = client.pid;
    let run = trace_both_ends(&mut server, client, &["OK", "INTERNAL"]);

    let servers = spans_of(&run, server.pid, "SERVER", 2, "gRPC server");
    let clients = spans_of(&run, client_pid, "CLIENT", 2, "grpc-js client");
    assert_eq!(
        run.spans.len(),
        4,
        "expected exactly 2 + 2 spans\n{}",
        run.dump()
    );
    for ((srv, cli), code) in servers.iter().zip(&clients).zip([OK, INTERNAL]) {
        let want = Expected::call("GetItem", code, server.port);
        want.check_server(srv);
        want.check_client(cli);
        assert_service(srv, SERVER_SERVICE, server.pid);
        assert_service(cli, "node", client_pid);
        assert_child_of(srv, cli, &run);
        assert_client_encloses_server(cli, srv);
    }
    assert_one_connection(&servers);
}

/// @grpc/grpc-js over TLS (Node's static OpenSSL on memory BIOs: its first write, the
/// preface with settings and headers, is held until the thread writes the socket) to Debian's
/// grpcio over TLS: exactly the spans of cleartext.
#[test]
fn grpc_js_client_over_tls() {
    let _env = preflight();
    let cert = kspan_e2e::tls::TestCertificate::new();
    let mut server = GrpcServer::start_tls(&cert);
    let client = GrpcClient::node_tls(server.port, &["unary:ok", "unary:internal"], &cert);
    let client_pid = client.pid;
    let run = trace_both_ends(&mut server, client, &["OK", "INTERNAL"]);
    assert_tls_plaintext_complete(&run);
    assert_eq!(
        run.spans.len(),
        4,
        "expected exactly 2 + 2 spans\n{}",
        run.dump()
    );
    let servers = spans_of(&run, server.pid, "SERVER", 2, "gRPC server");
    let clients = spans_of(&run, client_pid, "CLIENT", 2, "grpc-js client");
    for ((srv, cli), code) in servers.iter().zip(&clients).zip([OK, INTERNAL]) {
        let want = Expected::call("GetItem", code, server.port);
        want.check_server(srv);
        want.check_client(cli);
        assert_service(cli, "node", client_pid);
        assert_child_of(srv, cli, &run);
        assert_client_encloses_server(cli, srv);
    }
    assert_one_connection(&servers);
}

// ---------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------

/// The attributes every RPC duration data point must carry, with their values.
fn rpc_point_attrs(code: i64) -> BTreeMap<String, Value> {
    [
        ("rpc.system", Value::from("grpc")),
        ("rpc.service", Value::from(GRPC_SERVICE)),
        ("rpc.method", Value::from("GetItem")),
        ("rpc.grpc.status_code", Value::from(code)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Attributes an RPC duration data point may carry besides [`rpc_point_attrs`].
const OPTIONAL_POINT_ATTRS: &[&str] = &[
    "server.address",
    "server.port",
    "error.type",
    "network.protocol.name",
    "network.protocol.version",
    "network.transport",
    "network.type",
];

/// Checks the points of one RPC duration histogram: shape, resource pid, attributes, and the
/// count per status code.
fn assert_rpc_histogram(
    points: &[HistogramPoint],
    metric: &str,
    pid: u32,
    port: u16,
    want_counts: &BTreeMap<i64, u64>,
) {
    let mut counts: BTreeMap<i64, u64> = BTreeMap::new();
    for p in points {
        assert_eq!(p.unit, "s", "unit of {metric}: {p:?}");
        assert_eq!(p.temporality, CUMULATIVE, "temporality of {metric}: {p:?}");
        assert_eq!(
            p.explicit_bounds,
            BOUNDS.to_vec(),
            "bucket boundaries of {metric}: {p:?}"
        );
        assert_eq!(
            p.bucket_counts.iter().sum::<u64>(),
            p.count,
            "buckets must add up to the count: {p:?}"
        );
        assert_eq!(
            p.resource.get("process.pid"),
            Some(&Value::from(i64::from(pid))),
            "{metric} of an unexpected process: {p:?}"
        );
        let code = p
            .attributes
            .get("rpc.grpc.status_code")
            .and_then(Value::as_i64)
            .unwrap_or_else(|| {
                panic!("{metric} point without an integer rpc.grpc.status_code: {p:?}")
            });
        for (k, v) in rpc_point_attrs(code) {
            assert_eq!(
                p.attributes.get(&k),
                Some(&v),
                "`{k}` of a {metric} point: {p:?}"
            );
        }
        for k in p.attributes.keys() {
            assert!(
                rpc_point_attrs(code).contains_key(k) || OPTIONAL_POINT_ATTRS.contains(&k.as_str()),
                "unexpected attribute `{k}` on a {metric} point: {p:?}"
            );
        }
        if let Some(v) = p.attributes.get("server.port") {
            assert_eq!(
                v,
                &Value::from(i64::from(port)),
                "server.port of {metric}: {p:?}"
            );
        }
        *counts.entry(code).or_default() += p.count;
    }
    assert_eq!(
        &counts, want_counts,
        "{metric}: calls counted per gRPC status code\n{points:#?}"
    );
}

/// `rpc.server.call.duration` and `rpc.client.call.duration` (OpenTelemetry RPC metrics,
/// seconds) over OTLP/gRPC and on the Prometheus endpoint: one count per call, per status code,
/// on each side.
#[test]
fn rpc_duration_metrics_over_otlp_and_prometheus() {
    let _env = preflight();
    let mut server = GrpcServer::start(Some(SERVER_SERVICE));
    let calls = [
        "unary:ok",
        "unary:ok",
        "unary:ok",
        "unary:internal",
        "unary:notfound",
    ];
    let client = GrpcClient::python(server.port, &calls, None);
    let client_pid = client.pid;
    let Observed {
        kspan,
        rx,
        prom_port,
    } = Observed::start(&[
        "--pid",
        &server.pid.to_string(),
        "--pid",
        &client_pid.to_string(),
    ]);
    let result = client.go();
    let client_exe = python_exe_name();
    let prom = scrape_rpc_counts(prom_port, &client_exe, 5);
    let run = kspan.stop(); // final metrics flush
    server.assert_alive();
    assert_statuses(&result, &["OK", "OK", "OK", "INTERNAL", "NOT_FOUND"]);
    assert_clean_run(&run);
    assert_eq!(
        run.spans.len(),
        10,
        "expected exactly 5 + 5 spans\n{}",
        run.dump()
    );

    let requests = rx.metric_requests();
    let latest = latest_per_resource(&requests);
    let want: BTreeMap<i64, u64> = [(OK, 3), (INTERNAL, 1), (NOT_FOUND, 1)].into();
    let server_points = histogram_points(&latest, "rpc.server.call.duration");
    let client_points = histogram_points(&latest, "rpc.client.call.duration");
    assert!(
        !server_points.is_empty() && !client_points.is_empty(),
        "no rpc.server.call.duration or rpc.client.call.duration points; metrics received: {:?}",
        metric_names(&latest)
    );
    assert_rpc_histogram(
        &server_points,
        "rpc.server.call.duration",
        server.pid,
        server.port,
        &want,
    );
    assert_rpc_histogram(
        &client_points,
        "rpc.client.call.duration",
        client_pid,
        server.port,
        &want,
    );
    // The same counts on the Prometheus endpoint, per side and status code.
    let want_prom: BTreeMap<String, f64> = [("0", 3.0), ("13", 1.0), ("5", 1.0)]
        .into_iter()
        .map(|(code, n)| (code.to_string(), n))
        .collect();
    assert_eq!(
        prom.server, want_prom,
        "Prometheus rpc_server_call_duration_seconds_count by code"
    );
    assert_eq!(
        prom.client, want_prom,
        "Prometheus rpc_client_call_duration_seconds_count by code"
    );
    // gRPC calls are not HTTP requests in the metrics.
    for name in [
        "http.server.request.duration",
        "http.client.request.duration",
    ] {
        assert!(
            histogram_points(&latest, name).is_empty(),
            "gRPC calls must not be counted in {name}"
        );
    }
}

/// `rpc_{server,client}_call_duration_seconds_count` per `rpc_grpc_status_code` label, from the
/// Prometheus endpoint.
struct PromRpcCounts {
    server: BTreeMap<String, f64>,
    client: BTreeMap<String, f64>,
}

/// Scrapes `/metrics` until both sides count `calls` calls (the export thread records spans a
/// little after they are parsed), then returns the counts by status code.
fn scrape_rpc_counts(port: u16, client_service: &str, calls: u64) -> PromRpcCounts {
    let by_code = |samples: &[prometheus::Sample], name: &str, service: &str| {
        let mut counts: BTreeMap<String, f64> = BTreeMap::new();
        for s in samples
            .iter()
            .filter(|s| s.name == name && s.label("service_name") == Some(service))
        {
            assert_eq!(s.label("rpc_system"), Some("grpc"), "{s:?}");
            assert_eq!(s.label("rpc_service"), Some(GRPC_SERVICE), "{s:?}");
            assert_eq!(s.label("rpc_method"), Some("GetItem"), "{s:?}");
            let code = s
                .label("rpc_grpc_status_code")
                .unwrap_or("none")
                .to_string();
            *counts.entry(code).or_default() += s.value;
        }
        counts
    };
    let deadline = Instant::now() + scaled(10);
    loop {
        if let Ok((200, _, body)) = prometheus::http_get(port, "/metrics") {
            let samples = prometheus::parse_text(&body);
            let counts = PromRpcCounts {
                server: by_code(
                    &samples,
                    "rpc_server_call_duration_seconds_count",
                    SERVER_SERVICE,
                ),
                client: by_code(
                    &samples,
                    "rpc_client_call_duration_seconds_count",
                    client_service,
                ),
            };
            let total = |m: &BTreeMap<String, f64>| m.values().sum::<f64>();
            if total(&counts.server) >= calls as f64 && total(&counts.client) >= calls as f64 {
                return counts;
            }
            if Instant::now() >= deadline {
                panic!("Prometheus did not count {calls} calls per side in time:\n{body}");
            }
        } else if Instant::now() >= deadline {
            panic!("Prometheus endpoint on port {port} did not answer");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
