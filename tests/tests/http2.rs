//! End-to-end tests of kspan's HTTP/2 tracing (cleartext, prior knowledge) with Debian's nginx
//! as the server, curl (`--http2-prior-knowledge`, one request per connection: curl 7.88 cannot
//! reuse such a connection) and `node/h2_client.js` (Node's http2: several streams on one
//! connection) as clients.
//!
//! An HTTP/2 exchange gives the same spans as an HTTP/1.1 one (see `tests/http1.rs`) with
//! `network.protocol.version` "2": `{METHOD} {route}` names, the HTTP attributes, SERVER spans
//! errors on 5xx and CLIENT spans on 4xx and 5xx, and each SERVER span the child of the CLIENT
//! span of its stream when both ends are traced.
//!
//! Needs root, BTF and tracefs (see `kspan_e2e::preflight`), the kspan binary (or KSPAN_BIN),
//! curl, and what `cargo xtask setup` installs: nginx, Node.js.

use std::collections::{BTreeMap, BTreeSet};

use kspan_e2e::grpc::{H2Client, H2Result, Nginx};
use kspan_e2e::*;
use serde_json::Value;

/// One HTTP/2 exchange, to build the expected attributes.
struct Req<'a> {
    path: &'a str,
    status: i64,
    /// nginx's port.
    port: u16,
    /// The client's ephemeral port.
    client_port: u16,
    /// `user_agent.original`, None when the client sends no user-agent.
    user_agent: Option<Expect>,
}

impl Req<'_> {
    fn name(&self) -> String {
        format!("GET {}", self.path)
    }

    fn server_attrs(&self) -> Vec<(&'static str, Expect)> {
        let mut v = vec![
            ("http.request.method", s("GET")),
            ("url.path", s(self.path)),
            ("url.scheme", s("http")),
            ("http.response.status_code", int(self.status)),
            ("network.protocol.version", s("2")),
            ("server.address", s("127.0.0.1")),
            ("server.port", int(self.port)),
            ("client.address", s("127.0.0.1")),
            ("client.port", int(self.client_port)),
            ("network.peer.address", s("127.0.0.1")),
            ("network.peer.port", int(self.client_port)),
        ];
        if let Some(ua) = &self.user_agent {
            v.push(("user_agent.original", ua.clone()));
        }
        if self.status >= 500 {
            v.push(("error.type", s(self.status.to_string())));
        }
        v
    }

    fn client_attrs(&self) -> Vec<(&'static str, Expect)> {
        let mut v = vec![
            ("http.request.method", s("GET")),
            ("url.path", s(self.path)),
            ("url.scheme", s("http")),
            ("http.response.status_code", int(self.status)),
            ("network.protocol.version", s("2")),
            ("server.address", s("127.0.0.1")),
            ("server.port", int(self.port)),
            ("network.peer.address", s("127.0.0.1")),
            ("network.peer.port", int(self.port)),
            (
                "url.full",
                s(format!("http://127.0.0.1:{}{}", self.port, self.path)),
            ),
        ];
        if let Some(ua) = &self.user_agent {
            v.push(("user_agent.original", ua.clone()));
        }
        if self.status >= 400 {
            v.push(("error.type", s(self.status.to_string())));
        }
        v
    }

    fn check_server(&self, span: &Value) {
        assert_eq!(name(span), self.name(), "span name:\n{}", pretty(span));
        assert_eq!(span["kind"], "SERVER", "span kind:\n{}", pretty(span));
        let want = if self.status >= 500 { "ERROR" } else { "UNSET" };
        assert_eq!(
            status(span),
            want,
            "SERVER status for {}:\n{}",
            self.status,
            pretty(span)
        );
        assert_attributes(span, &self.server_attrs());
    }

    fn check_client(&self, span: &Value) {
        assert_eq!(name(span), self.name(), "span name:\n{}", pretty(span));
        assert_eq!(span["kind"], "CLIENT", "span kind:\n{}", pretty(span));
        let want = if self.status >= 400 { "ERROR" } else { "UNSET" };
        assert_eq!(
            status(span),
            want,
            "CLIENT status for {}:\n{}",
            self.status,
            pretty(span)
        );
        assert_attributes(span, &self.client_attrs());
    }
}

/// See `tests/http1.rs`: the client can read the last bytes before the server's write returns.
fn assert_client_encloses_server(client: &Value, server: &Value) {
    let slack = 5_000_000 * time_scale();
    assert!(
        start_ns(client) <= start_ns(server) && end_ns(client) + slack >= end_ns(server),
        "CLIENT span [{}, {}] must enclose SERVER span [{}, {}]\nclient:\n{}\nserver:\n{}",
        start_ns(client),
        end_ns(client),
        start_ns(server),
        end_ns(server),
        pretty(client),
        pretty(server)
    );
}

fn assert_service(span: &Value, service: &str, pid: u32) {
    assert_eq!(
        (res_str(span, "service.name"), res_i64(span, "process.pid")),
        (Some(service), Some(i64::from(pid))),
        "resource:\n{}",
        pretty(span)
    );
}

fn expected_status(path: &str) -> i64 {
    match path {
        "/ok" => 200,
        "/missing" => 404,
        other => panic!("no expectation for {other}"),
    }
}

fn assert_responses(res: &H2Result, paths: &[&str]) {
    let want: Vec<(String, u16)> = paths
        .iter()
        .map(|p| (p.to_string(), expected_status(p) as u16))
        .collect();
    assert_eq!(res.responses, want, "h2_client.js output:\n{}", res.stdout);
}

// ---------------------------------------------------------------------------

/// curl → nginx over cleartext HTTP/2, `/ok` (200) and `/missing` (404), one curl each, both
/// ends traced: a SERVER span in nginx and a CLIENT span in each curl, every attribute checked,
/// the SERVER span the child of curl's.
#[test]
fn curl_to_nginx_both_sides() {
    let _env = preflight();
    let nginx = Nginx::start();
    let kspan = Kspan::start(&["--pid", &nginx.pid.to_string(), "--exe", "curl"]);
    let ok = curl(&["--http2-prior-knowledge", &nginx.url("/ok")]);
    let missing = curl(&[
        "--http2-prior-knowledge",
        "-o",
        "/dev/null",
        &nginx.url("/missing"),
    ]);
    let run = kspan.stop();
    assert_eq!(ok.stdout, "ok\n", "nginx error log:\n{}", nginx.error_log());
    assert_clean_run(&run);

    assert_eq!(
        run.spans.len(),
        4,
        "expected exactly 2 + 2 spans\n{}",
        run.dump()
    );
    let servers = spans_of(&run, nginx.pid, "SERVER", 2, "nginx");
    for (out, path, srv) in [(&ok, "/ok", servers[0]), (&missing, "/missing", servers[1])] {
        let client_port = out
            .local_port
            .unwrap_or_else(|| panic!("curl did not report its local port: {out:?}"));
        let req = Req {
            path,
            status: expected_status(path),
            port: nginx.port,
            client_port,
            user_agent: Some(prefix("curl/")),
        };
        let cli = spans_of(&run, out.pid, "CLIENT", 1, "curl")[0];
        req.check_server(srv);
        req.check_client(cli);
        assert_service(srv, "nginx", nginx.pid);
        assert_service(cli, "curl", out.pid);
        assert_child_of(srv, cli, &run);
        assert_client_encloses_server(cli, srv);
    }
}

/// Several requests, one after the other, on one HTTP/2 connection (streams 1, 3, 5, 7) from
/// Node's http2 client: one span per stream on each side, in order, each SERVER span the child
/// of its stream's CLIENT span.
#[test]
fn sequential_streams_on_one_connection() {
    let paths = ["/ok", "/missing", "/ok", "/ok"];
    let _env = preflight();
    let nginx = Nginx::start();
    let client = H2Client::start(nginx.port, &paths, false);
    let client_pid = client.pid;
    let kspan = Kspan::start(&[
        "--pid",
        &nginx.pid.to_string(),
        "--pid",
        &client_pid.to_string(),
    ]);
    let res = client.go();
    let run = kspan.stop();
    assert_responses(&res, &paths);
    assert_clean_run(&run);
    let pairs = check_streams(&run, &res, &paths, &nginx, client_pid);
    for side in [0, 1] {
        for w in pairs.windows(2) {
            let (a, b) = if side == 0 {
                (w[0].0, w[1].0)
            } else {
                (w[0].1, w[1].1)
            };
            assert!(
                end_ns(a) <= start_ns(b),
                "sequential requests' spans overlap:\n{}\n{}",
                pretty(a),
                pretty(b)
            );
        }
    }
}

/// Eight requests in flight at once on one connection: eight spans per side, each SERVER span
/// the child of a different CLIENT span with the same path.
#[test]
fn concurrent_streams_on_one_connection() {
    let paths = [
        "/ok", "/missing", "/ok", "/ok", "/missing", "/ok", "/ok", "/ok",
    ];
    let _env = preflight();
    let nginx = Nginx::start();
    let client = H2Client::start(nginx.port, &paths, true);
    let client_pid = client.pid;
    let kspan = Kspan::start(&[
        "--pid",
        &nginx.pid.to_string(),
        "--pid",
        &client_pid.to_string(),
    ]);
    let res = client.go();
    let run = kspan.stop();
    assert_responses(&res, &paths);
    assert_clean_run(&run);
    check_streams(&run, &res, &paths, &nginx, client_pid);
}

/// Checks the spans of `paths` requested by Node's client on one connection to nginx, and
/// returns the (SERVER, CLIENT) pairs checked whole, by start.
///
/// With no program run skipped by the kernel: exactly one SERVER and one CLIENT span per
/// request, every attribute as expected, each SERVER span the child of a different CLIENT span
/// of the same path, as many of each path as were sent.
///
/// Runs the kernel skipped (`program_misses`: 7.2 runs syscall tracepoint programs
/// preemptibly, and a program already running on a CPU makes the kernel skip it for others,
/// here Node's and nginx's writev exits) are syscalls kspan never saw: a response never seen
/// leaves its span to end at the close as `connection_closed`, a request never seen leaves no
/// span. Then each pair both of whose spans have a response is still checked whole, spans
/// never outnumber the requests, and at most two requests per skipped run are affected (a lost
/// header block can also cost the next one its HPACK entries), as in `context.rs`.
fn check_streams<'a>(
    run: &'a Run,
    res: &H2Result,
    paths: &[&str],
    nginx: &Nginx,
    client_pid: u32,
) -> Vec<(&'a Value, &'a Value)> {
    let n = paths.len();
    let misses = counter(run, "program_misses") as usize;
    let (servers, clients) = if misses == 0 {
        assert_eq!(
            run.spans.len(),
            2 * n,
            "expected exactly {n} + {n} spans\n{}",
            run.dump()
        );
        (
            spans_of(run, nginx.pid, "SERVER", n, "nginx"),
            spans_of(run, client_pid, "CLIENT", n, "h2_client.js"),
        )
    } else {
        assert!(
            run.spans.len() <= 2 * n,
            "more spans than requests\n{}",
            run.dump()
        );
        let of = |pid, kind| {
            sorted_by_start(
                by_pid(&run.spans, pid)
                    .into_iter()
                    .filter(|s| s["kind"] == kind)
                    .collect(),
            )
        };
        (of(nginx.pid, "SERVER"), of(client_pid, "CLIENT"))
    };
    let answered = |s: &Value| attr_i64(s, "http.response.status_code").is_some();
    let req = |path: &str| Req {
        path: if path == "/ok" { "/ok" } else { "/missing" },
        status: expected_status(path),
        port: nginx.port,
        client_port: res.local_port,
        // Node's http2 client sends no user-agent.
        user_agent: None,
    };
    let by_id: BTreeMap<&str, &Value> = clients.iter().map(|c| (span_id(c), *c)).collect();
    let mut pairs = Vec::new();
    let mut parents = BTreeSet::new();
    for srv in &servers {
        let Some(cli) = parent_id(srv).and_then(|p| by_id.get(p)) else {
            assert!(
                misses > 0,
                "SERVER span whose parent is none of the client's CLIENT spans:\n{}\n\n{}",
                pretty(srv),
                run.dump()
            );
            continue;
        };
        assert!(
            parents.insert(span_id(cli)),
            "two SERVER spans share a parent\n{}",
            run.dump()
        );
        if misses > 0 && !(answered(srv) && answered(cli)) {
            continue;
        }
        let path = must_str(srv, "url.path");
        assert_eq!(
            must_str(cli, "url.path"),
            path,
            "a SERVER span's parent must be the CLIENT span of the same stream\n{}",
            run.dump()
        );
        let req = req(path);
        req.check_server(srv);
        req.check_client(cli);
        assert_service(cli, "node", client_pid);
        assert_service(srv, "nginx", nginx.pid);
        assert_child_of(srv, cli, run);
        assert_client_encloses_server(cli, srv);
        pairs.push((*srv, *cli));
    }
    if misses == 0 {
        let count = |spans: &[&Value], path: &str| {
            spans
                .iter()
                .filter(|s| must_str(s, "url.path") == path)
                .count()
        };
        for path in ["/ok", "/missing"] {
            let sent = paths.iter().filter(|p| **p == path).count();
            assert_eq!(
                count(&servers, path),
                sent,
                "SERVER spans for {path}\n{}",
                run.dump()
            );
            assert_eq!(
                count(&clients, path),
                sent,
                "CLIENT spans for {path}\n{}",
                run.dump()
            );
        }
        assert_eq!(pairs.len(), n, "pairs checked whole\n{}", run.dump());
    } else {
        assert!(
            n - pairs.len() <= 2 * misses,
            "{} of {n} requests lack a span or its response, with {misses} program runs skipped \
             by the kernel\n{}",
            n - pairs.len(),
            run.dump()
        );
    }
    pairs
}
