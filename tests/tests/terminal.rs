//! End-to-end tests of kspan's terminal views: the trace view (`--output tree`), `kspan top`
//! in a real pseudo-terminal, and `kspan graph`.
//!
//! The workload is the three-tier chain of `tests/context.rs` (`servers/chain_server.py`:
//! frontend → backend → store, each with its own `OTEL_SERVICE_NAME`), called by curl.
//!
//! Needs root, BTF and tracefs (see `kspan_e2e::preflight`), the kspan binary (or KSPAN_BIN),
//! curl and python3.

use kspan_e2e::chain::*;
use kspan_e2e::*;

/// `--output tree` on a pipe: one request through the chain, curl traced too, is printed as
/// one tree of six spans, each hop one level under the one before it, with its status and
/// service; no colour on a pipe. `--service e2e-ctx-store` shows the trace whole (curl's and
/// the frontend's spans too) because one of its spans is the store's.
#[test]
fn tree_output_shows_a_request_through_three_services_as_one_tree() {
    let _env = preflight();
    let mut chain = Chain::start();
    let pid_args = chain.pid_args();
    let kspan = Kspan::start_with_output(
        &args_with(&pid_args, &["--exe", "curl", "--service", "e2e-ctx-store"]),
        "tree",
    );
    let out = curl(&[&chain.frontend.url("/chain/1")]);
    let run = kspan.stop();
    chain.assert_alive();
    assert_chain_body(&out.stdout, "curl through the chain", &chain);
    run.assert_no_lost_events();

    let lines: Vec<&str> = run.stdout.lines().filter(|l| !l.is_empty()).collect();
    let headers: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].starts_with("trace "))
        .collect();
    assert_eq!(headers.len(), 1, "expected one trace\n{}", run.stdout);
    let header = headers[0];
    assert!(
        lines[header].contains("GET /chain/") && lines[header].contains(" 6 spans"),
        "trace header:\n{}",
        run.stdout
    );
    assert_eq!(
        lines.len(),
        header + 7,
        "a header and six span lines\n{}",
        run.stdout
    );
    let hops = [
        ("CLIENT", "curl"),
        ("SERVER", "e2e-ctx-frontend"),
        ("CLIENT", "e2e-ctx-frontend"),
        ("SERVER", "e2e-ctx-backend"),
        ("CLIENT", "e2e-ctx-backend"),
        ("SERVER", "e2e-ctx-store"),
    ];
    for (depth, (kind, service)) in hops.iter().enumerate() {
        let line = lines[header + 1 + depth];
        let indent = "  ".repeat(depth);
        assert!(
            line.starts_with(&format!("{indent}{kind} GET /chain/")),
            "hop {depth} must be a {kind} span indented {depth} levels:\n{}",
            run.stdout
        );
        assert!(
            line.contains(" 200 ") && line.contains(&format!(" {service}")),
            "hop {depth}: status 200 and service {service}:\n{}",
            run.stdout
        );
        // The waterfall bar: `|...|` at the end, at least one cell drawn.
        assert!(
            line.ends_with('|') && line.contains('█'),
            "hop {depth}: no time bar:\n{}",
            run.stdout
        );
    }
    assert!(
        !run.stdout.contains('\x1b'),
        "colour on a pipe:\n{}",
        run.stdout
    );
}

// ---------------------------------------------------------------------------
// Service graph
// ---------------------------------------------------------------------------

/// The three edges of the chain with curl in front: (client, server).
const EDGES: [(&str, &str); 3] = [
    ("curl", "e2e-ctx-frontend"),
    ("e2e-ctx-frontend", "e2e-ctx-backend"),
    ("e2e-ctx-backend", "e2e-ctx-store"),
];

/// Requests sent through the chain by the service-graph tests.
const REQUESTS: usize = 3;

fn curl_through(chain: &mut Chain, n: usize) {
    for i in 0..n {
        let out = curl(&[&chain.frontend.url(&format!("/chain/{i}"))]);
        assert_chain_body(&out.stdout, "curl through the chain", chain);
    }
    chain.assert_alive();
}

/// Service-graph metrics for curl → frontend → backend → store, three requests: over
/// Prometheus (while kspan runs) and OTLP, exactly three edges, each with
/// `traces_service_graph_request_total` 3, no failure, a server- and a client-side latency
/// histogram of 3 requests each, in seconds, labelled `client` and `server` as Tempo's and the
/// Collector's connectors label them.
#[test]
fn service_graph_metrics_for_a_three_service_chain() {
    use kspan_e2e::observed::Observed;
    use kspan_e2e::otlp_receiver::{histogram_points, latest_per_resource, sum_points};
    use kspan_e2e::prometheus;
    use std::collections::BTreeMap;

    let _env = preflight();
    let mut chain = Chain::start();
    let pid_args = chain.pid_args();
    let Observed {
        kspan,
        rx,
        prom_port,
    } = Observed::start(&args_with(&pid_args, &["--exe", "curl"]));
    curl_through(&mut chain, REQUESTS);

    let want: BTreeMap<(String, String), f64> = EDGES
        .iter()
        .map(|(c, s)| ((c.to_string(), s.to_string()), REQUESTS as f64))
        .collect();
    let edges_of = |samples: &[prometheus::Sample], name: &str| {
        let mut got: BTreeMap<(String, String), f64> = BTreeMap::new();
        for s in samples.iter().filter(|s| s.name == name) {
            let key = (
                s.label("client").unwrap_or("?").to_string(),
                s.label("server").unwrap_or("?").to_string(),
            );
            *got.entry(key).or_default() += s.value;
        }
        got
    };
    // Prometheus while kspan runs: poll until the three edges are counted.
    let deadline = std::time::Instant::now() + scaled(10);
    let samples = loop {
        let body = match prometheus::http_get(prom_port, "/metrics") {
            Ok((200, _, body)) => body,
            other => panic!("GET /metrics: {other:?}"),
        };
        let samples = prometheus::parse_text(&body);
        if edges_of(&samples, "traces_service_graph_request_total") == want {
            break samples;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the service graph over Prometheus never reached {want:?}:\n{body}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    for name in [
        "traces_service_graph_request_server_seconds_count",
        "traces_service_graph_request_client_seconds_count",
    ] {
        assert_eq!(edges_of(&samples, name), want, "{name}");
    }
    let failed = edges_of(&samples, "traces_service_graph_request_failed_total");
    assert!(
        failed.values().all(|v| *v == 0.0),
        "no request failed: {failed:?}"
    );
    for s in samples
        .iter()
        .filter(|s| s.name.starts_with("traces_service_graph_request"))
    {
        assert_eq!(
            s.label("connection_type"),
            None,
            "direct requests carry no connection_type: {s:?}"
        );
    }

    // OTLP: the same counts, the latencies in seconds.
    let edges_over_otlp = |reqs: &[_]| {
        let latest = latest_per_resource(reqs);
        let mut got: BTreeMap<(String, String), f64> = BTreeMap::new();
        for p in sum_points(&latest, "traces_service_graph_request_total") {
            let label = |k: &str| p.attributes.get(k).and_then(|v| v.as_str()).unwrap_or("?");
            *got.entry((label("client").to_string(), label("server").to_string()))
                .or_default() += p.value;
        }
        got
    };
    let arrived = rx.wait_for_metrics_where(scaled(6), |reqs| edges_over_otlp(reqs) == want);
    let run = kspan.stop();
    run.assert_no_lost_events();
    let reqs = rx.metric_requests();
    assert!(
        arrived,
        "the service graph over OTLP never reached {want:?}: {:?}",
        edges_over_otlp(&reqs)
    );
    let latest = latest_per_resource(&reqs);
    for name in [
        "traces_service_graph_request_server_seconds",
        "traces_service_graph_request_client_seconds",
    ] {
        let points = histogram_points(&latest, name);
        assert_eq!(points.len(), EDGES.len(), "{name}: {points:?}");
        for p in &points {
            assert_eq!((p.unit.as_str(), p.count), ("s", REQUESTS as u64), "{p:?}");
            assert!(p.sum.unwrap_or(0.0) > 0.0, "{p:?}");
        }
    }
}

/// `kspan graph` prints the edges when it stops: as text, one line per edge with its request
/// count, and with `--format dot` as a Graphviz digraph.
#[test]
fn kspan_graph_prints_the_edges_as_text_and_dot() {
    let _env = preflight();
    let mut chain = Chain::start();
    let pid_args = chain.pid_args();
    for format in ["text", "dot"] {
        let mut args = vec!["graph", "--format", format, "--exe", "curl"];
        args.extend(pid_args.iter().map(String::as_str));
        let kspan = Kspan::start_raw(&args);
        curl_through(&mut chain, REQUESTS);
        let run = kspan.stop();
        run.assert_no_lost_events();
        let out = &run.stdout;
        for (client, server) in EDGES {
            let found = out.lines().any(|l| {
                if format == "text" {
                    let words: Vec<&str> = l.split_whitespace().collect();
                    words.len() >= 5 && words[..4] == [client, "->", server, &REQUESTS.to_string()]
                } else {
                    l.trim_start().starts_with(&format!(
                        "\"{client}\" -> \"{server}\" [label=\"{REQUESTS} req, 0 failed,"
                    ))
                }
            });
            assert!(
                found,
                "{format}: no edge {client} -> {server} with {REQUESTS} requests:\n{out}\n\
                 --- kspan stderr ---\n{}",
                run.stderr
            );
        }
        let edges = out.lines().filter(|l| l.contains("->")).count();
        assert_eq!(
            edges,
            EDGES.len(),
            "{format}: exactly three edges:\n{out}\n--- kspan stderr ---\n{}",
            run.stderr
        );
        if format == "dot" {
            assert!(
                out.starts_with("digraph kspan {") && out.trim_end().ends_with('}'),
                "{out}"
            );
        }
    }
}

/// `kspan graph --help` and `kspan top --help` name their subcommand in the usage line and
/// say what it does; a wrong flag's error names it too.
#[test]
fn subcommand_help_names_the_subcommand() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(kspan_bin())
            .args(args)
            .output()
            .expect("run kspan");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code(), text)
    };
    for (command, about) in [
        (
            "graph",
            "`kspan graph`: traces like `kspan run`, then prints",
        ),
        (
            "top",
            "`kspan top`: traces like `kspan run` and shows requests per second",
        ),
    ] {
        let (code, help) = run(&[command, "--help"]);
        assert_eq!(code, Some(0), "{help}");
        assert!(help.starts_with(about), "kspan {command} --help:\n{help}");
        assert!(
            help.contains(&format!("Usage: kspan {command} [OPTIONS]")),
            "kspan {command} --help:\n{help}"
        );
        let (code, error) = run(&[command, "--no-such-flag"]);
        assert_eq!(code, Some(2), "{error}");
        assert!(
            error.contains("'--no-such-flag'")
                && error.contains(&format!("Usage: kspan {command} ")),
            "kspan {command} --no-such-flag:\n{error}"
        );
    }
}

// ---------------------------------------------------------------------------
// kspan top, in a real pseudo-terminal
// ---------------------------------------------------------------------------

mod pty {
    use std::fs::File;
    use std::io::{Read, Write};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;
    use std::process::{Child, Command, Stdio};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    /// A program whose stdin, stdout and stderr are a pseudo-terminal of `cols` × `rows`, its
    /// controlling terminal; what it draws is fed to a VT100 emulator.
    pub struct PtyProgram {
        pub child: Child,
        master: File,
        pub screen: Arc<Mutex<vt100::Parser>>,
        /// Every byte it wrote, for failure messages and after-exit checks.
        pub raw: Arc<Mutex<Vec<u8>>>,
        reader: Option<std::thread::JoinHandle<()>>,
    }

    impl PtyProgram {
        pub fn spawn(program: &std::path::Path, args: &[&str], cols: u16, rows: u16) -> Self {
            let size = libc::winsize {
                ws_row: rows,
                ws_col: cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            let (mut master, mut slave) = (0, 0);
            // SAFETY: openpty fills two descriptors; the size is read only.
            let rc = unsafe {
                libc::openpty(
                    &mut master,
                    &mut slave,
                    std::ptr::null_mut(),
                    std::ptr::null(),
                    &size,
                )
            };
            assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
            // SAFETY: both were just opened and are owned here only.
            let (master, slave) =
                unsafe { (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
            let mut cmd = Command::new(program);
            cmd.args(args)
                .env("TERM", "xterm-256color")
                .stdin(Stdio::from(slave.try_clone().expect("dup pty")))
                .stdout(Stdio::from(slave.try_clone().expect("dup pty")))
                .stderr(Stdio::from(slave));
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("OTEL_") {
                    cmd.env_remove(&k);
                }
            }
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {} in a pty: {e}", program.display()));
            let screen = Arc::new(Mutex::new(vt100::Parser::new(
                std::num::NonZeroU16::new(rows).expect("rows"),
                std::num::NonZeroU16::new(cols).expect("cols"),
                0,
            )));
            let raw = Arc::new(Mutex::new(Vec::new()));
            let mut reading = master.try_clone().expect("dup pty master");
            let (screen2, raw2) = (screen.clone(), raw.clone());
            let reader = std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                // EIO once every copy of the slave side is closed: the program exited.
                while let Ok(n) = reading.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    screen2.lock().unwrap().process(&buf[..n]);
                    raw2.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
            PtyProgram {
                child,
                master,
                screen,
                raw,
                reader: Some(reader),
            }
        }

        /// The screen's text now.
        pub fn contents(&self) -> String {
            self.screen.lock().unwrap().screen().contents()
        }

        /// Waits until `done` holds of the screen's text; panics after `timeout`.
        pub fn wait_for(&self, what: &str, timeout: Duration, done: impl Fn(&str) -> bool) {
            let deadline = Instant::now() + timeout;
            loop {
                let text = self.contents();
                if done(&text) {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "timed out waiting for {what}; the screen:\n{text}\n--- everything written ---\n{}",
                    String::from_utf8_lossy(&self.raw.lock().unwrap())
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }

        /// Types `keys`.
        pub fn send(&mut self, keys: &[u8]) {
            self.master.write_all(keys).expect("write to the pty");
        }

        /// Whether the terminal is back in canonical mode with echo (raw mode left).
        pub fn cooked(&self) -> bool {
            // SAFETY: a termios to fill from a valid descriptor.
            let mut t: libc::termios = unsafe { std::mem::zeroed() };
            let rc = unsafe { libc::tcgetattr(self.master.as_raw_fd(), &mut t) };
            assert_eq!(rc, 0, "tcgetattr: {}", std::io::Error::last_os_error());
            t.c_lflag & libc::ICANON != 0 && t.c_lflag & libc::ECHO != 0
        }

        /// Waits for the program to exit and for its last bytes.
        pub fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
            let status = kspan_e2e::wait_timeout(&mut self.child, timeout);
            let Some(status) = status else {
                kspan_e2e::kill_and_reap(&mut self.child);
                panic!(
                    "still running after {timeout:?}; killed. The screen:\n{}",
                    self.contents()
                );
            };
            if let Some(reader) = self.reader.take() {
                let _ = reader.join();
            }
            status
        }
    }

    impl Drop for PtyProgram {
        fn drop(&mut self) {
            if let Ok(None) = self.child.try_wait() {
                kspan_e2e::kill_and_reap(&mut self.child);
            }
        }
    }
}

/// `kspan top` in a 120×30 pseudo-terminal: after four requests through the chain the screen
/// has one SERVER and one CLIENT row per hop with 4 requests in total each, and the health line;
/// `s` sorts by the next column, `/store⏎` keeps the store's rows only, `q` quits: kspan exits
/// 0, the alternate screen is left, the terminal is back in canonical mode with echo, and the
/// stop line comes after the view.
#[test]
fn kspan_top_in_a_pseudo_terminal() {
    let _env = preflight();
    let mut chain = Chain::start();
    let pid_args = chain.pid_args();
    let mut args = vec!["top", "--exe", "curl"];
    args.extend(pid_args.iter().map(String::as_str));
    let mut top = pty::PtyProgram::spawn(&kspan_bin(), &args, 120, 30);
    top.wait_for("the view", ready_timeout(), |s| s.contains("kspan top"));
    curl_through(&mut chain, 4);

    // Each row: SERVICE KIND NAME (words) REQ/S ERR% P50 P99 TOTAL; gives "NAME ERR% TOTAL".
    let row_total = |screen: &str, service: &str, kind: &str| -> Option<String> {
        screen
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|w| w.len() >= 8 && w[0] == service && w[1] == kind)
            .map(|w| {
                let n = w.len();
                format!("{} {} {}", w[2..n - 5].join(" "), w[n - 4], w[n - 1])
            })
    };
    let hops = [
        ("curl", "CLIENT"),
        ("e2e-ctx-frontend", "SERVER"),
        ("e2e-ctx-frontend", "CLIENT"),
        ("e2e-ctx-backend", "SERVER"),
        ("e2e-ctx-backend", "CLIENT"),
        ("e2e-ctx-store", "SERVER"),
    ];
    top.wait_for("six rows of 4 requests", scaled(10), |s| {
        hops.iter().all(|(service, kind)| {
            row_total(s, service, kind)
                .is_some_and(|r| r.starts_with("GET /chain/") && r.ends_with(" 0.0 4"))
        })
    });
    let screen = top.contents();
    assert!(
        screen.contains("events lost 0") && screen.contains("sorted by REQ/S"),
        "{screen}"
    );

    top.send(b"s");
    top.wait_for("sorting by the error rate", scaled(5), |s| {
        s.contains("sorted by ERR%")
    });
    top.send(b"/store\r");
    top.wait_for("the store's rows only", scaled(5), |s| {
        s.contains("filter: store ")
            && row_total(s, "e2e-ctx-store", "SERVER").is_some()
            && row_total(s, "e2e-ctx-frontend", "SERVER").is_none()
    });

    top.send(b"q");
    let status = top.wait(stop_timeout());
    let raw = String::from_utf8_lossy(&top.raw.lock().unwrap()).into_owned();
    assert!(status.success(), "kspan top exited {status}:\n{raw}");
    assert!(
        !top.screen.lock().unwrap().screen().alternate_screen(),
        "the alternate screen was not left:\n{raw}"
    );
    assert!(top.cooked(), "raw mode was not undone:\n{raw}");
    let left = raw
        .rfind("\x1b[?1049l")
        .unwrap_or_else(|| panic!("no leave-alternate-screen sequence:\n{raw}"));
    assert!(
        raw[left..].contains("kspan: stopped:"),
        "the stop line must come after the view:\n{raw}"
    );
}
