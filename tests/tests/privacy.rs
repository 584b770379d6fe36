//! End-to-end privacy test: a request full of secrets (a path parameter, an e-mail address and
//! a token in the path, a query, Authorization and Cookie headers, a Set-Cookie response) goes
//! through a real server and a real curl, both traced; none of the secrets may appear in any
//! output kspan has: stdout text, stdout JSON, OTLP spans, OTLP metrics, the Prometheus scrape
//! (nor in its stderr).
//!
//! Needs root, BTF and tracefs (see `kspan_e2e::preflight`), the kspan binary
//! (`cargo xtask test` builds it; or set KSPAN_BIN), python3 and curl.

use std::thread;
use std::time::{Duration, Instant};

use kspan_e2e::observed::Observed;
use kspan_e2e::prometheus;
use kspan_e2e::*;

const EMAIL: &str = "alice.secret@example.com";
const TOKEN: &str = "Zq8xK2mP9vL4nR7tW3yB";
/// SECRET5 is the server's Set-Cookie (tests/servers/http_server.py, `/private/`).
const SECRETS: [&str; 9] = [
    "SECRET1",
    "SECRET2",
    "SECRET3",
    "SECRET4",
    "SECRET5",
    "jsessionid",
    EMAIL,
    "alice.secret",
    TOKEN,
];
/// What kspan makes of the path: templated in names and `http.route`, redacted in `url.path`.
const ROUTE: &str = "/private/cart/users/*/tokens/*";
const URL_PATH: &str = "/private/cart/users/REDACTED/tokens/REDACTED";

fn target() -> String {
    format!("/private/cart;jsessionid=SECRET1/users/{EMAIL}/tokens/{TOKEN}?password=SECRET2")
}

/// curl of the secret request (with the secret headers); returns its pid.
fn secret_request(server: &PyServer) -> u32 {
    let c = curl(&[
        "-H",
        "Authorization: Bearer SECRET3",
        "-H",
        "Cookie: s=SECRET4",
        "-D",
        "-",
        &server.url(&target()),
    ]);
    // The secrets did go over the wire: the response carried its Set-Cookie.
    assert!(
        c.stdout.contains("Set-Cookie: t=SECRET5") && c.stdout.ends_with("private\n"),
        "server reply: {:?}",
        c.stdout
    );
    c.pid
}

fn assert_lacks_secrets(what: &str, text: &str) {
    for secret in SECRETS {
        assert!(
            !text.contains(secret),
            "{secret:?} must never leave kspan, but its {what} contains it:\n{text}"
        );
    }
}

/// JSON on stdout, OTLP traces and metrics to a real receiver, Prometheus on: the spans and
/// series of the secret request are there, and no secret is in any of them.
#[test]
fn no_secret_in_json_otlp_or_prometheus() {
    let _env = preflight();
    let server = PyServer::start(Some("privacy-server"));
    let spid = server.pid.to_string();
    let Observed {
        kspan,
        rx,
        prom_port,
    } = Observed::start(&["--pid", &spid, "--exe", "curl"]);
    secret_request(&server);

    // Prometheus while kspan runs: until both sides' series of the request are there.
    let deadline = Instant::now() + scaled(10);
    let scrape = loop {
        let fetched = prometheus::http_get(prom_port, "/metrics");
        if let Ok((200, _, body)) = &fetched {
            let routes = prometheus::parse_text(body)
                .into_iter()
                .filter(|s| s.name.ends_with("_request_duration_seconds_count"))
                .filter(|s| s.label("http_route") == Some(ROUTE))
                .count();
            if routes >= 2 {
                break body.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no server and client series with http_route={ROUTE:?} on Prometheus: {fetched:?}"
        );
        thread::sleep(Duration::from_millis(100));
    };
    let metrics_seen = rx.wait_for_metrics_where(scaled(10), |requests| {
        format!("{requests:?}").contains(&format!("{ROUTE:?}"))
    });
    assert!(metrics_seen, "no OTLP metrics with http.route {ROUTE:?}");

    let run = kspan.stop();
    run.assert_no_lost_events();
    let spans = rx.wait_for_spans(2, scaled(5));

    // The request was traced on both sides, as expected.
    assert_eq!(run.spans.len(), 2, "{}", run.dump());
    for span in &run.spans {
        assert_eq!(name(span), format!("GET {ROUTE}"), "{}", pretty(span));
        assert_eq!(
            attr_str(span, "url.path"),
            Some(URL_PATH),
            "{}",
            pretty(span)
        );
    }
    let client = run.of_kind("CLIENT");
    assert_eq!(client.len(), 1, "{}", run.dump());
    let url_full = attr_str(client[0], "url.full").unwrap_or_default();
    assert!(url_full.ends_with(URL_PATH), "{url_full}");
    assert_eq!(spans.len(), 2, "{spans:?}");
    for span in &spans {
        assert_eq!(span.attr_str("url.path").as_deref(), Some(URL_PATH));
    }

    assert_lacks_secrets("JSON output", &run.stdout);
    assert_lacks_secrets("stderr", &run.stderr);
    assert_lacks_secrets("OTLP spans", &format!("{:?}", rx.trace_requests()));
    assert_lacks_secrets("OTLP metrics", &format!("{:?}", rx.metric_requests()));
    assert_lacks_secrets("OTLP request headers", &format!("{:?}", rx.request_info()));
    assert_lacks_secrets("Prometheus scrape", &scrape);
}

/// Text on stdout: the spans of the secret request are printed, without any secret.
#[test]
fn no_secret_in_text_output() {
    let _env = preflight();
    let server = PyServer::start(Some("privacy-server"));
    let spid = server.pid.to_string();
    let kspan = Kspan::start_with_output(&["--pid", &spid, "--exe", "curl"], "text");
    let curl_pid = secret_request(&server);
    let run = kspan.stop();
    let lines: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.contains(&format!("GET {ROUTE}")))
        .collect();
    assert_eq!(
        lines.len(),
        2,
        "stdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    let client = format!("CLIENT GET {ROUTE} 200");
    let curl = format!("pid={curl_pid} ");
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&client) && l.contains(&curl)),
        "stdout:\n{}",
        run.stdout
    );
    assert_lacks_secrets("text output", &run.stdout);
    assert_lacks_secrets("stderr", &run.stderr);
}
