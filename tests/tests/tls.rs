//! End-to-end tests of kspan's TLS tracing: plaintext read at OpenSSL's `SSL_read`/`SSL_write`
//! (and `_ex`) by uprobes on Debian's libssl.so.3, fed to the same parsers as cleartext, on the
//! connection's real socket.
//!
//! Peers on loopback with a self-signed certificate (`kspan_e2e::tls`): nginx with `ssl http2`
//! and curl over HTTP/1.1 and h2 (both link libssl.so.3), Python's `ssl` (http.server and
//! http.client: libssl.so.3 too) on one keep-alive connection, and a Python client that loads
//! libssl with dlopen after kspan started.
//!
//! Each test checks exact span counts (no span from ciphertext: the TLS records kspan saw
//! before the plaintext never parse, and no connection is counted as a parse error), the
//! attributes (`url.scheme` https, the protocol version negotiated) and the parent edges
//! between the two ends.
//!
//! Needs root, BTF, tracefs and uprobes (see `kspan_e2e::preflight`), the kspan binary (or
//! KSPAN_BIN), and what `cargo xtask setup` installs: curl, nginx, openssl, Python.

use kspan_e2e::grpc::Nginx;
use kspan_e2e::tls::TestCertificate;
use kspan_e2e::*;
use serde_json::Value;

/// What kspan prints when it attaches to a TLS library (see `probes::tls`).
const ATTACHED: &str = "TLS: uprobes attached to ";

/// One HTTPS exchange as both ends' spans should show it.
struct Exchange<'a> {
    path: &'a str,
    status: i64,
    /// "1.1" or "2".
    version: &'a str,
    server_port: u16,
    client_port: u16,
    /// `user_agent.original`; None when the client sends none (Python's http.client).
    user_agent: Option<Expect>,
}

impl Exchange<'_> {
    fn check_server(&self, span: &Value) {
        assert_eq!(
            name(span),
            format!("GET {}", self.route()),
            "{}",
            pretty(span)
        );
        assert_eq!(
            status(span),
            if self.status >= 500 { "ERROR" } else { "UNSET" }
        );
        let mut expected = vec![
            ("http.request.method", s("GET")),
            ("url.path", s(self.path)),
            ("url.scheme", s("https")),
            ("http.response.status_code", int(self.status)),
            ("network.protocol.version", s(self.version)),
            ("server.address", s("127.0.0.1")),
            ("server.port", int(self.server_port)),
            ("client.address", s("127.0.0.1")),
            ("client.port", int(self.client_port)),
            ("network.peer.address", s("127.0.0.1")),
            ("network.peer.port", int(self.client_port)),
        ];
        if let Some(ua) = &self.user_agent {
            expected.push(("user_agent.original", ua.clone()));
        }
        if self.status >= 500 {
            expected.push(("error.type", s(self.status.to_string())));
        }
        assert_attributes(span, &expected);
    }

    fn check_client(&self, span: &Value) {
        assert_eq!(
            name(span),
            format!("GET {}", self.route()),
            "{}",
            pretty(span)
        );
        assert_eq!(
            status(span),
            if self.status >= 400 { "ERROR" } else { "UNSET" }
        );
        let mut expected = vec![
            ("http.request.method", s("GET")),
            ("url.path", s(self.path)),
            ("url.scheme", s("https")),
            ("http.response.status_code", int(self.status)),
            ("network.protocol.version", s(self.version)),
            ("server.address", s("127.0.0.1")),
            ("server.port", int(self.server_port)),
            ("network.peer.address", s("127.0.0.1")),
            ("network.peer.port", int(self.server_port)),
            (
                "url.full",
                s(format!(
                    "https://127.0.0.1:{}{}",
                    self.server_port, self.path
                )),
            ),
        ];
        if let Some(ua) = &self.user_agent {
            expected.push(("user_agent.original", ua.clone()));
        }
        if self.status >= 400 {
            expected.push(("error.type", s(self.status.to_string())));
        }
        assert_attributes(span, &expected);
    }

    /// The span name's route: numeric path segments become `*`.
    fn route(&self) -> String {
        self.path
            .split('/')
            .map(|seg| {
                if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
                    "*"
                } else {
                    seg
                }
            })
            .collect::<Vec<_>>()
            .join("/")
    }
}

/// curl → nginx over HTTPS, `/ok` (200) and `/missing` (404), one curl each, with `version`'s
/// curl flag (`--http1.1`, `--http2`: ALPN). nginx is selected at start, so its libssl (the
/// file curl maps too) is attached before kspan is ready.
fn curl_to_nginx(curl_flag: &str, version: &str) {
    let _env = preflight();
    let cert = TestCertificate::new();
    let nginx = Nginx::start_tls(&cert);
    let kspan = Kspan::start(&["--pid", &nginx.pid.to_string(), "--exe", "curl"]);
    assert!(
        kspan.stderr_so_far().contains(ATTACHED),
        "nginx's libssl must be attached before `ready`:\n{}",
        kspan.stderr_so_far()
    );
    let cacert = ["--cacert", cert.cert_str()];
    let ok = curl(&[curl_flag, cacert[0], cacert[1], &nginx.https_url("/ok")]);
    let missing = curl(&[
        curl_flag,
        cacert[0],
        cacert[1],
        "-o",
        "/dev/null",
        &nginx.https_url("/missing"),
    ]);
    let run = kspan.stop();
    assert_eq!(ok.stdout, "ok\n", "nginx error log:\n{}", nginx.error_log());
    assert_clean_run(&run);
    assert_eq!(counter(&run, "connections_muted"), 0, "{}", run.dump());
    assert_eq!(counter(&run, "tls_processes_unseen"), 0, "{}", run.dump());
    assert_eq!(counter(&run, "tls_unbound"), 0, "{}", run.dump());
    assert_eq!(
        run.spans.len(),
        4,
        "expected exactly 2 + 2 spans\n{}",
        run.dump()
    );
    let servers = spans_of(&run, nginx.pid, "SERVER", 2, "nginx");
    for (out, path, status, server) in [
        (&ok, "/ok", 200, servers[0]),
        (&missing, "/missing", 404, servers[1]),
    ] {
        let exchange = Exchange {
            path,
            status,
            version,
            server_port: nginx.port,
            client_port: out.local_port.expect("curl's local port"),
            user_agent: Some(prefix("curl/")),
        };
        let client = spans_of(&run, out.pid, "CLIENT", 1, "curl")[0];
        exchange.check_server(server);
        exchange.check_client(client);
        assert_child_of(server, client, &run);
    }
}

#[test]
fn curl_to_nginx_https_http11_both_sides() {
    curl_to_nginx("--http1.1", "1.1");
}

/// HTTP/2 by ALPN: the plaintext starts with the client preface, as on cleartext h2.
#[test]
fn curl_to_nginx_https_h2_both_sides() {
    curl_to_nginx("--http2", "2");
}

/// Python's `ssl` on both ends (http.server wrapped in an SSLContext; http.client), three
/// requests on ONE keep-alive connection: three SERVER and three CLIENT spans, each SERVER span
/// the child of its CLIENT span. Python 3.11 calls `SSL_read_ex`/`SSL_write_ex`.
#[test]
fn python_ssl_keepalive_both_sides() {
    let _env = preflight();
    let cert = TestCertificate::new();
    let server = PyServer::start_with(
        Some("tls-server"),
        &["--tls", cert.cert_str(), cert.key_str()],
    );
    let client =
        KeepaliveClient::start_with_flags(&["--tls", cert.cert_str()], server.port, 3, "/users/");
    let client_pid = client.pid;
    let kspan = Kspan::start(&[
        "--pid",
        &server.pid.to_string(),
        "--pid",
        &client_pid.to_string(),
    ]);
    let result = client.go();
    let run = kspan.stop();
    assert_eq!(result.statuses, [200, 200, 200], "{}", result.stdout);
    assert_clean_run(&run);
    assert_eq!(counter(&run, "tls_unbound"), 0, "{}", run.dump());
    assert_eq!(
        run.spans.len(),
        6,
        "expected exactly 3 + 3 spans\n{}",
        run.dump()
    );
    let servers = spans_of(&run, server.pid, "SERVER", 3, "the Python server");
    let clients = spans_of(&run, client_pid, "CLIENT", 3, "the Python client");
    for (i, (server_span, client_span)) in servers.iter().zip(&clients).enumerate() {
        let path = format!("/users/{}", i + 1);
        let exchange = Exchange {
            path: &path,
            status: 200,
            version: "1.1",
            server_port: server.port,
            client_port: result.local_port,
            user_agent: None,
        };
        exchange.check_server(server_span);
        exchange.check_client(client_span);
        assert_child_of(server_span, client_span, &run);
    }
}

/// A traced Python client that loads a private copy of libssl with dlopen (then `import
/// ssl`) after kspan started: the new mapping is seen in the kernel, kspan reads the process's
/// maps again and attaches to the library; the requests after that are traced. The system's
/// libssl (attached at start, nginx's) is another file: only the dlopen makes kspan attach to
/// this one.
///
/// The test waits for kspan's line saying it attached before the client sends: a program that
/// sends within the milliseconds the attachment takes after its dlopen loses those first calls
/// (README, TLS).
#[test]
fn a_library_loaded_with_dlopen_after_the_start_is_attached() {
    let _env = preflight();
    let cert = TestCertificate::new();
    let nginx = Nginx::start_tls(&cert);
    let libssl = cert.private_libssl_copy();
    let libssl = libssl.to_str().expect("UTF-8 temporary path");
    let mut client = KeepaliveClient::start_with_flags(
        &[
            "--tls",
            cert.cert_str(),
            "--late-import",
            "--libssl",
            libssl,
        ],
        nginx.port,
        2,
        "/ok?n=",
    );
    let client_pid = client.pid;
    let mut kspan = Kspan::start(&["--pid", &client_pid.to_string()]);
    let attached_copy = format!("{ATTACHED}{libssl} ");
    assert!(
        !kspan.stderr_so_far().contains(&attached_copy),
        "no process maps the copy yet:\n{}",
        kspan.stderr_so_far()
    );
    client.load_tls_library();
    kspan.wait_for_stderr(&attached_copy);
    let result = client.go();
    let run = kspan.stop();
    assert_eq!(result.statuses, [200, 200], "{}", result.stdout);
    assert_clean_run(&run);
    // The system's libssl at start, the copy at the dlopen.
    assert_eq!(counter(&run, "tls_libraries_attached"), 2, "{}", run.dump());
    assert_eq!(
        run.spans.len(),
        2,
        "expected exactly 2 CLIENT spans\n{}",
        run.dump()
    );
    for span in spans_of(&run, client_pid, "CLIENT", 2, "the Python client") {
        let exchange = Exchange {
            path: "/ok",
            status: 200,
            version: "1.1",
            server_port: nginx.port,
            client_port: result.local_port,
            user_agent: None,
        };
        exchange.check_client(span);
    }
}

/// Node.js's `https` server (OpenSSL linked into the node executable, its TLS sockets on memory
/// BIOs: the socket I/O happens outside the `SSL_*` calls) called by curl twice, `/ok` and
/// `/missing`: the plaintext is tied to the socket the thread read the ciphertext from, and each
/// SERVER span is the child of curl's CLIENT span.
#[test]
fn curl_to_a_node_https_server_both_sides() {
    let _env = preflight();
    let cert = TestCertificate::new();
    let node = kspan_e2e::tls::NodeHttpsServer::start(&cert);
    let kspan = Kspan::start(&["--pid", &node.pid.to_string(), "--exe", "curl"]);
    assert!(
        kspan.stderr_so_far().contains(ATTACHED),
        "node's OpenSSL must be attached before `ready`:\n{}",
        kspan.stderr_so_far()
    );
    let cacert = ["--cacert", cert.cert_str()];
    let ok = curl(&["--http1.1", cacert[0], cacert[1], &node.url("/ok")]);
    let missing = curl(&[
        "--http1.1",
        cacert[0],
        cacert[1],
        "-o",
        "/dev/null",
        &node.url("/missing"),
    ]);
    let run = kspan.stop();
    assert_eq!(ok.stdout, "ok\n");
    assert_clean_run(&run);
    assert_eq!(counter(&run, "tls_processes_unseen"), 0, "{}", run.dump());
    assert_eq!(
        run.spans.len(),
        4,
        "expected exactly 2 + 2 spans\n{}",
        run.dump()
    );
    let servers = spans_of(&run, node.pid, "SERVER", 2, "node");
    for (out, path, status, server) in [
        (&ok, "/ok", 200, servers[0]),
        (&missing, "/missing", 404, servers[1]),
    ] {
        let exchange = Exchange {
            path,
            status,
            version: "1.1",
            server_port: node.port,
            client_port: out.local_port.expect("curl's local port"),
            user_agent: Some(prefix("curl/")),
        };
        let client = spans_of(&run, out.pid, "CLIENT", 1, "curl")[0];
        exchange.check_server(server);
        exchange.check_client(client);
        assert_child_of(server, client, &run);
    }
}
