//! End-to-end tests of kspan's OTLP export (traces and metrics, gRPC and
//! HTTP/protobuf) and its Prometheus endpoint, against a real OTLP receiver
//! (`kspan_e2e::otlp_receiver`).
//!
//! Needs root, BTF and tracefs (see `kspan_e2e::preflight`), the kspan binary
//! (`cargo xtask test` builds it; or set KSPAN_BIN), python3 and curl.
//!
//! kspan is always also started with `--output json` (the harness adds it), so
//! every exported span is compared with the span kspan printed: same ids,
//! parent, name, kind, times, status and attributes.

use std::collections::{BTreeMap, BTreeSet};
use std::thread;
use std::time::{Duration, Instant};

use kspan_e2e::observed::Observed;
use kspan_e2e::otlp_receiver::*;
use kspan_e2e::prometheus::{self, Sample};
use kspan_e2e::*;
use serde_json::Value;

/// Explicit bucket boundaries of the HTTP duration histograms (seconds),
/// the semantic-conventions advice.
const BOUNDS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// OTLP SpanKind values.
const KIND_SERVER: i32 = 2;
const KIND_CLIENT: i32 = 3;
/// OTLP StatusCode values.
const STATUS_UNSET: i32 = 0;
const STATUS_ERROR: i32 = 2;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A traced process and the resource kspan must describe it with.
struct Proc {
    service: String,
    pid: u32,
    exe_name: String,
    exe_path: String,
}

impl Proc {
    fn python_server(service: &str, server: &PyServer) -> Proc {
        Proc {
            service: service.to_string(),
            pid: server.pid,
            exe_name: python_exe_name(),
            exe_path: python().to_string_lossy().into_owned(),
        }
    }

    fn curl(pid: u32) -> Proc {
        Proc {
            service: "curl".to_string(),
            pid,
            exe_name: "curl".to_string(),
            exe_path: which("curl").to_string_lossy().into_owned(),
        }
    }

    /// The exact OTLP resource: the process attributes plus telemetry.distro.*.
    fn expected_resource(&self, version: &str) -> BTreeMap<String, Value> {
        [
            ("service.name", Value::from(self.service.as_str())),
            ("process.pid", Value::from(self.pid as i64)),
            (
                "process.executable.name",
                Value::from(self.exe_name.as_str()),
            ),
            (
                "process.executable.path",
                Value::from(self.exe_path.as_str()),
            ),
            ("host.name", Value::from(hostname())),
            ("telemetry.distro.name", Value::from("kspan")),
            ("telemetry.distro.version", Value::from(version)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

fn find_proc(procs: &[Proc], pid: i64) -> &Proc {
    procs
        .iter()
        .find(|p| p.pid as i64 == pid)
        .unwrap_or_else(|| panic!("data for process.pid {pid}, which the test did not start"))
}

fn show(m: &BTreeMap<String, Value>) -> String {
    serde_json::to_string_pretty(m).unwrap_or_default()
}

/// `actual` must be exactly `expected`; prints every difference.
fn assert_map_exact(
    actual: &BTreeMap<String, Value>,
    expected: &BTreeMap<String, Value>,
    what: &str,
) {
    let mut problems = Vec::new();
    for (k, v) in expected {
        match actual.get(k) {
            None => problems.push(format!("missing `{k}` (expected {v})")),
            Some(a) if a != v => problems.push(format!("`{k}` = {a}, expected {v}")),
            Some(_) => {}
        }
    }
    for (k, v) in actual {
        if !expected.contains_key(k) {
            problems.push(format!("unexpected `{k}` = {v}"));
        }
    }
    assert!(
        problems.is_empty(),
        "{what} differs from the expectation:\n  {}\nactual:\n{}",
        problems.join("\n  "),
        show(actual)
    );
}

/// The received span is the printed span: ids, parent, name, kind, times,
/// status and attributes equal; raw proto shape per the contract; every
/// printed resource attribute present with the same value; scope "kspan".
fn assert_same_span(printed: &Value, got: &ReceivedSpan) {
    let mut want = printed.clone();
    want.as_object_mut()
        .expect("printed span is an object")
        .remove("resource");
    assert_eq!(
        got.to_kspan_json(),
        want,
        "exported span differs from the printed one\nexported (as kspan JSON): {}\nprinted: {}\nexported proto: {:?}",
        pretty(&got.to_kspan_json()),
        pretty(printed),
        got.span
    );
    let s = &got.span;
    assert_eq!(s.trace_id.len(), 16, "trace_id must be 16 bytes: {s:?}");
    assert_eq!(s.span_id.len(), 8, "span_id must be 8 bytes: {s:?}");
    // kspan links the SERVER span to the traced client's CLIENT span: the parent is the one
    // printed (compared above through the JSON form); here, its raw proto shape.
    match printed["parent_span_id"].as_str() {
        None => assert!(
            s.parent_span_id.is_empty(),
            "a root span's parent_span_id must be empty: {s:?}"
        ),
        Some(_) => assert_eq!(
            s.parent_span_id.len(),
            8,
            "parent_span_id must be 8 bytes: {s:?}"
        ),
    }
    let want_kind = match printed["kind"].as_str() {
        Some("SERVER") => KIND_SERVER,
        Some("CLIENT") => KIND_CLIENT,
        other => panic!("printed span kind {other:?}"),
    };
    assert_eq!(s.kind, want_kind, "span kind enum: {s:?}");
    let want_code = match status(printed) {
        "ERROR" => STATUS_ERROR,
        "UNSET" => STATUS_UNSET,
        other => panic!("printed span status {other:?}"),
    };
    assert_eq!(
        s.status.as_ref().map_or(STATUS_UNSET, |st| st.code),
        want_code,
        "status code: {s:?}"
    );
    assert_typed_like_json(&s.attributes, &printed["attributes"], "span attributes");

    let resource = got.resource_map();
    for (k, v) in printed["resource"].as_object().expect("printed resource") {
        assert_eq!(
            resource.get(k),
            Some(v),
            "exported resource `{k}` differs from the printed one\nexported: {resource:?}\nprinted: {}",
            pretty(printed)
        );
    }
    assert_eq!(got.scope_name, "kspan", "instrumentation scope name");
}

/// Integers travel as int_value and strings as string_value, like the JSON.
fn assert_typed_like_json(attrs: &[proto::common::v1::KeyValue], json: &Value, what: &str) {
    use proto::common::v1::any_value::Value as V;
    for kv in attrs {
        let j = &json[&kv.key];
        let v = kv.value.as_ref().and_then(|v| v.value.as_ref());
        let ok = match v {
            Some(V::IntValue(_)) => j.is_i64() || j.is_u64(),
            Some(V::StringValue(_)) => j.is_string(),
            _ => false,
        };
        assert!(ok, "{what}: `{}` is {v:?}, the JSON has {j}", kv.key);
    }
}

/// Every printed span was exported exactly once and equals its export; no
/// other span was exported.
fn assert_exported_equals_printed(run: &Run, received: &[ReceivedSpan]) {
    let mut by_id: BTreeMap<String, Vec<&ReceivedSpan>> = BTreeMap::new();
    for r in received {
        by_id.entry(r.span_id_hex()).or_default().push(r);
    }
    for p in &run.spans {
        let id = p["span_id"].as_str().unwrap();
        let got = by_id.get(id).map(Vec::as_slice).unwrap_or(&[]);
        assert_eq!(
            got.len(),
            1,
            "printed span {id} was received {} time(s)\nprinted: {}\n{}",
            got.len(),
            pretty(p),
            run.dump()
        );
        assert_same_span(p, got[0]);
    }
    let printed: BTreeSet<&str> = run
        .spans
        .iter()
        .map(|p| p["span_id"].as_str().unwrap())
        .collect();
    for r in received {
        assert!(
            printed.contains(r.span_id_hex().as_str()),
            "received a span kspan did not print: {:?}\n{}",
            r.to_kspan_json(),
            run.dump()
        );
    }
}

/// Each received span's resource is exactly the expected resource of its process.
fn assert_resources(received: &[ReceivedSpan], procs: &[Proc], version: &str) {
    for r in received {
        let res = attributes_sorted(&r.resource);
        assert_typed_resource(&r.resource);
        let pid = res
            .get("process.pid")
            .and_then(Value::as_i64)
            .unwrap_or_else(|| panic!("resource without integer process.pid: {}", show(&res)));
        let p = find_proc(procs, pid);
        assert_map_exact(
            &res,
            &p.expected_resource(version),
            &format!("resource of span {} (pid {pid})", r.span.name),
        );
    }
}

fn assert_typed_resource(attrs: &[proto::common::v1::KeyValue]) {
    use proto::common::v1::any_value::Value as V;
    for kv in attrs {
        let v = kv.value.as_ref().and_then(|v| v.value.as_ref());
        let ok = if kv.key == "process.pid" {
            matches!(v, Some(V::IntValue(_)))
        } else {
            matches!(v, Some(V::StringValue(_)))
        };
        assert!(
            ok,
            "resource attribute `{}` has the wrong type: {v:?}",
            kv.key
        );
    }
}

/// One ResourceSpans per traced process in each request; scope "kspan".
fn assert_one_resource_per_process(
    requests: &[proto::collector::trace::v1::ExportTraceServiceRequest],
) {
    for (i, req) in requests.iter().enumerate() {
        let mut seen = BTreeSet::new();
        for rs in &req.resource_spans {
            let res = rs
                .resource
                .as_ref()
                .map(|r| attributes_sorted(&r.attributes))
                .unwrap_or_default();
            let pid = res.get("process.pid").cloned().unwrap_or(Value::Null);
            assert!(
                seen.insert(pid.to_string()),
                "trace request #{i} has two ResourceSpans for process.pid {pid}: {req:?}"
            );
            for ss in &rs.scope_spans {
                let name = ss.scope.as_ref().map_or("", |s| s.name.as_str());
                assert_eq!(name, "kspan", "scope name in trace request #{i}");
            }
        }
    }
}

/// A counter of kspan's final stderr line (panics if absent).
fn counter(run: &Run, key: &str) -> u64 {
    let c = run.counters();
    *c.get(key).unwrap_or_else(|| {
        panic!(
            "kspan's final counters line has no `{key}=`: {c:?}\n--- kspan stderr ---\n{}",
            run.stderr
        )
    })
}

/// `needle` appears nowhere in what the receiver got (messages and headers).
fn assert_receiver_lacks(rx: &OtlpReceiver, needle: &str) {
    let traces = format!("{:?}", rx.trace_requests());
    let metrics = format!("{:?}", rx.metric_requests());
    let info = format!("{:?}", rx.request_info());
    for (what, text) in [
        ("trace requests", traces),
        ("metrics requests", metrics),
        ("request headers", info),
    ] {
        assert!(
            !text.contains(needle),
            "{needle:?} must never be exported, but the receiver's {what} contain it:\n{text}"
        );
    }
}

fn printed_with_path<'a>(run: &'a Run, path: &str) -> Vec<&'a Value> {
    run.spans
        .iter()
        .filter(|s| attr_str(s, "url.path") == Some(path))
        .collect()
}

// ---------------------------------------------------------------------------
// a. traces over gRPC
// ---------------------------------------------------------------------------

/// Server and curl traced, exported over OTLP/gRPC: the receiver gets exactly
/// the four printed spans, with exact resources and no secret.
#[test]
fn traces_over_grpc_equal_printed_spans() {
    let _env = preflight();
    let rx = OtlpReceiver::start_grpc(0);
    let server = PyServer::start(Some("otlp-server"));
    let spid = server.pid.to_string();
    let endpoint = rx.endpoint();
    let kspan = Kspan::start(&[
        "--pid",
        &spid,
        "--exe",
        "curl",
        "--otlp-endpoint",
        &endpoint,
        "--otlp-protocol",
        "grpc",
    ]);

    let users = curl(&[&server.url("/users/42?secret=1")]);
    let fail = curl(&[&server.url("/fail")]);
    let run = kspan.stop();
    run.assert_no_lost_events();
    assert!(
        users.stdout.contains("\"42\""),
        "server reply: {:?}",
        users.stdout
    );

    assert_eq!(
        run.spans.len(),
        4,
        "expected 4 printed spans\n{}",
        run.dump()
    );
    // kspan flushed before exiting: everything is there already.
    let received = rx.spans();
    assert_eq!(
        received.len(),
        4,
        "the receiver must hold exactly the 4 spans after kspan exits; got {:#?}\n{}",
        received
            .iter()
            .map(ReceivedSpan::to_kspan_json)
            .collect::<Vec<_>>(),
        run.dump()
    );
    assert_exported_equals_printed(&run, &received);

    let version = kspan_version();
    let procs = [
        Proc::python_server("otlp-server", &server),
        Proc::curl(users.pid),
        Proc::curl(fail.pid),
    ];
    assert_resources(&received, &procs, &version);
    assert_one_resource_per_process(&rx.trace_requests());

    // Kinds and statuses as the contract spells them.
    let named = |n: &str, k: i32| -> Vec<&ReceivedSpan> {
        received
            .iter()
            .filter(|r| r.span.name == n && r.span.kind == k)
            .collect()
    };
    for (name, kind, code) in [
        ("GET /users/*", KIND_SERVER, STATUS_UNSET),
        ("GET /users/*", KIND_CLIENT, STATUS_UNSET),
        ("GET /fail", KIND_SERVER, STATUS_ERROR),
        ("GET /fail", KIND_CLIENT, STATUS_ERROR),
    ] {
        let v = named(name, kind);
        assert_eq!(v.len(), 1, "one exported {name} span of kind {kind}");
        assert_eq!(
            v[0].span.status.as_ref().map_or(STATUS_UNSET, |s| s.code),
            code,
            "{name} kind {kind}: {:?}",
            v[0].span
        );
    }

    for info in rx.request_info() {
        assert!(
            info.path == GRPC_TRACES_PATH || info.path == GRPC_METRICS_PATH,
            "unexpected gRPC method {}",
            info.path
        );
    }
    assert_eq!(counter(&run, "spans_exported"), 4, "{}", run.stderr);
    assert_eq!(counter(&run, "export_failures"), 0, "{}", run.stderr);

    assert_receiver_lacks(&rx, "secret");
    run.assert_stdout_lacks("secret");
}

// ---------------------------------------------------------------------------
// b. traces over HTTP/protobuf, configured by environment only
// ---------------------------------------------------------------------------

/// OTEL_EXPORTER_OTLP_ENDPOINT + OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf
/// (no OTLP flag): spans go to <endpoint>/v1/traces, the final metrics to
/// <endpoint>/v1/metrics, with OTEL_EXPORTER_OTLP_HEADERS attached.
#[test]
fn traces_over_http_protobuf_from_env() {
    let _env = preflight();
    let rx = OtlpReceiver::start_http(0);
    let server = PyServer::start(Some("otlp-http-server"));
    let spid = server.pid.to_string();
    let endpoint = rx.endpoint();
    let kspan = Kspan::start_with_env(
        &["--pid", &spid, "--exe", "curl"],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-kspan-e2e=env-header"),
        ],
    );

    let c = curl(&[&server.url("/users/7?secret=1")]);
    let run = kspan.stop();
    run.assert_no_lost_events();
    assert!(c.stdout.contains("\"7\""), "server reply: {:?}", c.stdout);

    assert_eq!(
        run.spans.len(),
        2,
        "expected 2 printed spans\n{}",
        run.dump()
    );
    let received = rx.spans();
    assert_eq!(
        received.len(),
        2,
        "the receiver must hold exactly the 2 spans after kspan exits (rejected: {:?})\n{}",
        rx.rejected(),
        run.dump()
    );
    assert_exported_equals_printed(&run, &received);
    let version = kspan_version();
    let procs = [
        Proc::python_server("otlp-http-server", &server),
        Proc::curl(c.pid),
    ];
    assert_resources(&received, &procs, &version);
    assert_one_resource_per_process(&rx.trace_requests());

    assert!(
        rx.rejected().is_empty(),
        "receiver refused requests: {:?}",
        rx.rejected()
    );
    let infos = rx.request_info();
    let traces: Vec<&RequestInfo> = infos
        .iter()
        .filter(|i| i.signal == Signal::Traces)
        .collect();
    let metrics: Vec<&RequestInfo> = infos
        .iter()
        .filter(|i| i.signal == Signal::Metrics)
        .collect();
    assert!(!traces.is_empty());
    assert!(
        !metrics.is_empty(),
        "kspan must send a final metrics collection to /v1/metrics on SIGINT; got requests {infos:#?}"
    );
    for i in traces.iter().chain(&metrics) {
        let want = match i.signal {
            Signal::Traces => "/v1/traces",
            Signal::Metrics => "/v1/metrics",
        };
        assert_eq!(i.path, want, "{i:?}");
        assert!(
            i.headers
                .get("content-type")
                .is_some_and(|c| c.starts_with("application/x-protobuf")),
            "content type: {i:?}"
        );
        assert_eq!(
            i.headers.get("x-kspan-e2e").map(String::as_str),
            Some("env-header"),
            "OTEL_EXPORTER_OTLP_HEADERS must be sent: {i:?}"
        );
    }
    assert_eq!(counter(&run, "spans_exported"), 2, "{}", run.stderr);
    assert_eq!(counter(&run, "export_failures"), 0, "{}", run.stderr);
    assert_receiver_lacks(&rx, "secret");
}

// ---------------------------------------------------------------------------
// c. collector unavailable, then back
// ---------------------------------------------------------------------------

/// The collector is down when kspan starts: exports fail, kspan stays up;
/// once the collector listens, later spans get through. Every printed span is
/// accounted for as exported or dropped.
#[test]
fn collector_down_then_up() {
    let _env = preflight();
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    // Short, so the exports to the closed port fail fast; longer where everything is slower.
    let export_timeout_ms = (500 * time_scale()).to_string();
    let server = PyServer::start(Some("otlp-flaky"));
    let spid = server.pid.to_string();
    let mut kspan = Kspan::start_with_env(
        &[
            "--pid",
            &spid,
            "--exe",
            "curl",
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            "grpc",
        ],
        &[("OTEL_EXPORTER_OTLP_TIMEOUT", &export_timeout_ms)],
    );

    for _ in 0..3 {
        assert_eq!(curl(&[&server.url("/ok")]).stdout, "ok\n");
    }
    thread::sleep(Duration::from_secs(2));
    kspan.assert_running();

    let rx = OtlpReceiver::start_grpc(port);
    assert_eq!(rx.port(), port);
    let mut later_pids = Vec::new();
    for _ in 0..2 {
        let c = curl(&[&server.url("/users/9")]);
        assert!(c.stdout.contains("\"9\""), "server reply: {:?}", c.stdout);
        later_pids.push(c.pid);
    }
    let t0 = Instant::now();
    let later = rx.wait_for_spans_where(4, scaled(15), |s| {
        s.attr_str("url.path").as_deref() == Some("/users/9")
    });
    let waited = t0.elapsed();
    kspan.assert_running();
    assert_eq!(
        later.len(),
        4,
        "within {waited:?} of the collector coming back, the receiver must get the 4 spans of the \
         later requests while kspan runs; got {:#?}\n--- kspan stderr so far ---\n{}",
        later
            .iter()
            .map(ReceivedSpan::to_kspan_json)
            .collect::<Vec<_>>(),
        kspan.stderr_so_far()
    );

    let run = kspan.stop(); // asserts exit status 0 within 5 s
    run.assert_no_lost_events();
    assert_eq!(
        run.spans.len(),
        10,
        "5 requests, 2 spans each\n{}",
        run.dump()
    );

    // Every span of the later requests was received, exactly as printed.
    let received = rx.spans();
    let printed_later = printed_with_path(&run, "/users/9");
    assert_eq!(printed_later.len(), 4, "{}", run.dump());
    for p in &printed_later {
        let id = p["span_id"].as_str().unwrap();
        let got: Vec<&ReceivedSpan> = received.iter().filter(|r| r.span_id_hex() == id).collect();
        assert!(
            !got.is_empty(),
            "span {id} of a later request was not received\n{}",
            pretty(p)
        );
        for g in got {
            assert_same_span(p, g);
        }
    }
    // Nothing foreign was received; spans of the early requests that made
    // it (through a retry) are intact too.
    let printed: BTreeMap<&str, &Value> = run
        .spans
        .iter()
        .map(|p| (p["span_id"].as_str().unwrap(), p))
        .collect();
    let mut unique = BTreeSet::new();
    for r in &received {
        let id = r.span_id_hex();
        let p = printed.get(id.as_str()).unwrap_or_else(|| {
            panic!(
                "received a span kspan did not print: {:?}",
                r.to_kspan_json()
            )
        });
        assert_same_span(p, r);
        unique.insert(id);
    }
    let version = kspan_version();
    let mut procs = vec![Proc::python_server("otlp-flaky", &server)];
    for p in &run.spans {
        let pid = res_i64(p, "process.pid").unwrap() as u32;
        if pid != server.pid && !procs.iter().any(|x| x.pid == pid) {
            procs.push(Proc::curl(pid));
        }
    }
    for pid in &later_pids {
        assert!(
            procs.iter().any(|p| p.pid == *pid),
            "no span of curl {pid}\n{}",
            run.dump()
        );
    }
    assert_resources(&received, &procs, &version);

    let exported = counter(&run, "spans_exported");
    let dropped = counter(&run, "spans_dropped");
    let failures = counter(&run, "export_failures");
    assert!(
        failures >= 1,
        "exports to a closed port must count as failures: {:?}\n{}",
        run.counters(),
        run.stderr
    );
    assert_eq!(
        exported + dropped,
        run.spans.len() as u64,
        "every printed span is either exported or dropped: spans_exported={exported} \
         spans_dropped={dropped}, printed {}\n{}",
        run.spans.len(),
        run.stderr
    );
    // An export that timed out (or was cut by the stop) counts as dropped although the
    // collector may have received it just before: delivery is at least once and kspan errs on
    // the side of reporting a loss. So the collector holds every exported span, and at most the
    // dropped ones besides.
    assert!(
        exported <= unique.len() as u64 && unique.len() as u64 <= exported + dropped,
        "spans_exported={exported} spans_dropped={dropped}, collector got {} distinct spans",
        unique.len()
    );
    assert!(exported >= 4, "the later spans were exported: {exported}");
}

// ---------------------------------------------------------------------------
// d. metrics: OTLP and Prometheus
// ---------------------------------------------------------------------------

/// Expected HTTP duration data-point attributes of one request.
fn duration_attrs(path: &str, code: i64, port: u16, error: bool) -> BTreeMap<String, Value> {
    let mut m: BTreeMap<String, Value> = [
        ("http.request.method", Value::from("GET")),
        ("http.response.status_code", Value::from(code)),
        ("http.route", Value::from(path)),
        ("server.address", Value::from("127.0.0.1")),
        ("server.port", Value::from(port as i64)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if error {
        m.insert("error.type".into(), Value::from(code.to_string()));
    }
    m
}

/// Server side: no `server.address` or `server.port`, which the client's Host header chose.
fn server_duration_attrs(path: &str, code: i64) -> BTreeMap<String, Value> {
    let mut m = duration_attrs(path, code, 0, code >= 500);
    m.remove("server.address");
    m.remove("server.port");
    m
}

/// The Prometheus labels of a data point: `service_name`, `process_pid`, then
/// the attributes (dots as underscores) sorted by key.
fn prom_labels(service: &str, pid: u32, attrs: &BTreeMap<String, Value>) -> Vec<(String, String)> {
    let mut v = vec![
        ("service_name".to_string(), service.to_string()),
        ("process_pid".to_string(), pid.to_string()),
    ];
    let mut rest: Vec<(String, String)> = attrs
        .iter()
        .map(|(k, val)| {
            let s = match val {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.replace('.', "_"), s)
        })
        .collect();
    rest.sort();
    v.extend(rest);
    v
}

fn assert_histogram_shape(p: &HistogramPoint) {
    assert_eq!(p.unit, "s", "unit of {}: {p:?}", p.metric);
    assert_eq!(
        p.temporality, CUMULATIVE,
        "temporality of {}: {p:?}",
        p.metric
    );
    assert_eq!(
        p.explicit_bounds,
        BOUNDS.to_vec(),
        "bucket boundaries of {}: {p:?}",
        p.metric
    );
    assert_eq!(
        p.bucket_counts.len(),
        BOUNDS.len() + 1,
        "bucket count of {}: {p:?}",
        p.metric
    );
    assert_eq!(
        p.bucket_counts.iter().sum::<u64>(),
        p.count,
        "buckets must add up to the count: {p:?}"
    );
    let sum = p
        .sum
        .unwrap_or_else(|| panic!("histogram point without sum: {p:?}"));
    assert!(
        sum > 0.0 && sum < 5.0 * p.count as f64,
        "implausible sum: {p:?}"
    );
}

/// Prometheus samples named `name` whose `service_name` is `service`.
fn prom_of<'a>(samples: &'a [Sample], name: &str, service: &str) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| s.name == name && s.label("service_name") == Some(service))
        .collect()
}

#[test]
fn metrics_over_grpc_and_prometheus() {
    let _env = preflight();
    let server = PyServer::start(Some("otlp-metrics-server"));
    let spid = server.pid.to_string();
    let Observed {
        kspan,
        rx,
        prom_port,
    } = Observed::start(&["--pid", &spid, "--exe", "curl"]);
    let kspan_pid = kspan.pid();

    // (path, status, times); client spans are errors on 4xx and 5xx, server
    // spans on 5xx only.
    let traffic: [(&str, i64, usize); 3] =
        [("/ok", 200, 3), ("/missing", 404, 2), ("/fail", 500, 1)];
    let mut curl_pids: BTreeMap<u32, (&str, i64)> = BTreeMap::new();
    for (path, code, n) in traffic {
        for _ in 0..n {
            let c = curl(&["-o", "/dev/null", &server.url(path)]);
            curl_pids.insert(c.pid, (path, code));
        }
    }
    let total: u64 = traffic.iter().map(|t| t.2 as u64).sum();

    // Prometheus, while kspan runs: poll until every request is counted.
    let deadline = Instant::now() + scaled(10);
    let (samples, prom_text) = loop {
        let fetched = prometheus::http_get(prom_port, "/metrics");
        if let Ok((200, _, body)) = &fetched {
            let samples = prometheus::parse_text(body);
            let server_total: f64 = prom_of(
                &samples,
                "http_server_request_duration_seconds_count",
                "otlp-metrics-server",
            )
            .iter()
            .map(|s| s.value)
            .sum();
            let client_total: f64 = prom_of(
                &samples,
                "http_client_request_duration_seconds_count",
                "curl",
            )
            .iter()
            .map(|s| s.value)
            .sum();
            if server_total >= total as f64 && client_total >= total as f64 {
                break (samples, body.clone());
            }
            if Instant::now() >= deadline {
                panic!(
                    "Prometheus endpoint did not count all {total} requests per side in time \
                     (server {server_total}, client {client_total}):\n{body}"
                );
            }
        } else if Instant::now() >= deadline {
            panic!("GET http://127.0.0.1:{prom_port}/metrics failed: {fetched:?}");
        }
        thread::sleep(Duration::from_millis(200));
    };

    // Periodic OTLP export (1 s interval): the complete server histogram
    // arrives while kspan still runs.
    let periodic = rx.wait_for_metrics_where(scaled(6), |reqs| {
        let latest = latest_per_resource(reqs);
        histogram_points(&latest, "http.server.request.duration")
            .iter()
            .map(|p| p.count)
            .sum::<u64>()
            == total
    });
    assert!(
        periodic,
        "with OTEL_METRIC_EXPORT_INTERVAL=1000 the server histogram must be exported while kspan \
         runs; got {} metrics request(s)",
        rx.metric_requests().len()
    );

    let run = kspan.stop(); // final metrics flush
    run.assert_no_lost_events();

    // ---- OTLP: the last state of every resource ----
    let requests = rx.metric_requests();
    let latest = latest_per_resource(&requests);
    let version = kspan_version();
    let server_proc = Proc::python_server("otlp-metrics-server", &server);
    let dump = || {
        latest
            .iter()
            .map(|(r, rm)| format!("{}\n{rm:?}", show(r)))
            .collect::<Vec<_>>()
            .join("\n")
    };

    let server_pts = histogram_points(&latest, "http.server.request.duration");
    assert_eq!(
        server_pts.len(),
        3,
        "server histogram points:\n{server_pts:#?}"
    );
    for p in &server_pts {
        assert_histogram_shape(p);
        assert_map_exact(
            &p.resource,
            &server_proc.expected_resource(&version),
            "resource of http.server.request.duration",
        );
    }
    for (path, code, n) in traffic {
        let want = server_duration_attrs(path, code);
        let pts: Vec<&HistogramPoint> =
            server_pts.iter().filter(|p| p.attributes == want).collect();
        assert_eq!(
            pts.len(),
            1,
            "one server data point with attributes {}:\n{server_pts:#?}",
            show(&want)
        );
        assert_eq!(
            pts[0].count, n as u64,
            "server count for {path}: {:?}",
            pts[0]
        );
    }

    let client_pts = histogram_points(&latest, "http.client.request.duration");
    assert_eq!(
        client_pts.len(),
        curl_pids.len(),
        "one client data point per curl process:\n{client_pts:#?}"
    );
    let mut client_counts: BTreeMap<&str, u64> = BTreeMap::new();
    for p in &client_pts {
        assert_histogram_shape(p);
        let pid = p
            .resource
            .get("process.pid")
            .and_then(Value::as_i64)
            .unwrap_or(-1);
        let &(path, code) = curl_pids
            .get(&(pid as u32))
            .unwrap_or_else(|| panic!("client histogram of an unknown process: {p:?}"));
        assert_map_exact(
            &p.resource,
            &Proc::curl(pid as u32).expected_resource(&version),
            "resource of http.client.request.duration",
        );
        assert_map_exact(
            &p.attributes,
            &duration_attrs(path, code, server.port, code >= 400),
            &format!("client data point attributes of curl {pid} ({path})"),
        );
        assert_eq!(p.count, 1, "curl {pid} made one request: {p:?}");
        *client_counts.entry(path).or_default() += p.count;
    }
    for (path, _, n) in traffic {
        assert_eq!(
            client_counts.get(path).copied(),
            Some(n as u64),
            "client count for {path}"
        );
    }

    // Agent health under service.name "kspan".
    let health: Vec<(BTreeMap<String, Value>, _)> = latest
        .iter()
        .filter(|(r, _)| r.get("service.name") == Some(&Value::from("kspan")))
        .cloned()
        .collect();
    assert_eq!(health.len(), 1, "one kspan health resource:\n{}", dump());
    assert_eq!(
        health[0].0.get("process.pid"),
        Some(&Value::from(kspan_pid as i64)),
        "health resource process.pid is kspan's: {}",
        show(&health[0].0)
    );
    let mut health_value = BTreeMap::new();
    for name in [
        "kspan.events.received",
        "kspan.events.lost",
        "kspan.parse.errors",
        "kspan.spans.exported",
        "kspan.spans.dropped",
        "kspan.export.failures",
    ] {
        let pts = sum_points(&health, name);
        assert!(
            !pts.is_empty(),
            "health counter {name} missing:\n{}",
            dump()
        );
        for p in &pts {
            assert!(p.is_monotonic, "{name} must be a monotonic counter: {p:?}");
            assert_eq!(p.temporality, CUMULATIVE, "{name} temporality: {p:?}");
            assert!(p.value >= 0.0, "{name}: {p:?}");
        }
        health_value.insert(name, pts.iter().map(|p| p.value).sum::<f64>());
    }
    assert!(
        health_value["kspan.events.received"] > 0.0,
        "{health_value:?}"
    );
    assert_eq!(health_value["kspan.events.lost"], 0.0, "{health_value:?}");
    // No HTTP histogram under the agent's own resource.
    assert!(histogram_points(&health, "http.server.request.duration").is_empty());
    assert!(histogram_points(&health, "http.client.request.duration").is_empty());

    // ---- Prometheus (snapshot taken while kspan ran) ----
    let server_counts = prom_of(
        &samples,
        "http_server_request_duration_seconds_count",
        "otlp-metrics-server",
    );
    assert_eq!(server_counts.len(), 3, "server _count series:\n{prom_text}");
    for (path, code, n) in traffic {
        let attrs = server_duration_attrs(path, code);
        let want = prom_labels("otlp-metrics-server", server.pid, &attrs);
        let series: Vec<&&Sample> = server_counts.iter().filter(|s| s.labels == want).collect();
        assert_eq!(
            series.len(),
            1,
            "one http_server_request_duration_seconds_count series with labels (in this order) \
             {want:?}:\n{prom_text}"
        );
        assert_eq!(
            series[0].value, n as f64,
            "Prometheus server count for {path}"
        );

        // Buckets: same labels then `le` last; cumulative; +Inf = count.
        let mut buckets: Vec<(f64, f64)> = samples
            .iter()
            .filter(|s| {
                s.name == "http_server_request_duration_seconds_bucket"
                    && s.labels.len() == want.len() + 1
                    && s.labels[..want.len()] == want[..]
                    && s.labels[want.len()].0 == "le"
            })
            .map(|s| (prometheus::parse_le(&s.labels[want.len()].1), s.value))
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let les: Vec<f64> = buckets.iter().map(|b| b.0).collect();
        let mut want_les = BOUNDS.to_vec();
        want_les.push(f64::INFINITY);
        assert_eq!(
            les, want_les,
            "le values of the {path} buckets:\n{prom_text}"
        );
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "buckets must be cumulative: {buckets:?}"
        );
        assert_eq!(buckets.last().unwrap().1, n as f64, "+Inf bucket of {path}");
        let sum: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.name == "http_server_request_duration_seconds_sum" && s.labels == want)
            .collect();
        assert_eq!(sum.len(), 1, "one _sum series for {path}:\n{prom_text}");
        assert!(sum[0].value > 0.0, "_sum for {path}: {:?}", sum[0]);
    }

    let client_counts = prom_of(
        &samples,
        "http_client_request_duration_seconds_count",
        "curl",
    );
    let mut prom_client: BTreeMap<&str, f64> = BTreeMap::new();
    for s in &client_counts {
        let pid: u32 = s
            .label("process_pid")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("client series without a process_pid: {s:?}"));
        let &(path, code) = curl_pids
            .get(&pid)
            .unwrap_or_else(|| panic!("client series of an unknown process: {s:?}"));
        let want = prom_labels(
            "curl",
            pid,
            &duration_attrs(path, code, server.port, code >= 400),
        );
        assert_eq!(
            s.labels, want,
            "labels (and their order) of a client _count series"
        );
        assert_eq!(s.value, 1.0, "curl {pid}: {s:?}");
        *prom_client.entry(path).or_default() += s.value;
    }
    for (path, _, n) in traffic {
        assert_eq!(
            prom_client.get(path).copied(),
            Some(n as f64),
            "Prometheus client count for {path}:\n{prom_text}"
        );
    }

    let received: Vec<&Sample> = prom_of(&samples, "kspan_events_received_total", "kspan");
    assert_eq!(
        received.len(),
        1,
        "one kspan_events_received_total series:\n{prom_text}"
    );
    assert_eq!(
        received[0].label("process_pid"),
        Some(kspan_pid.to_string().as_str()),
        "kspan_events_received_total is labelled with kspan's pid: {:?}",
        received[0]
    );
    assert!(
        received[0].value > 0.0,
        "kspan_events_received_total: {:?}",
        received[0]
    );
    let lost = prom_of(&samples, "kspan_events_lost_total", "kspan");
    assert_eq!(
        lost.len(),
        1,
        "one kspan_events_lost_total series:\n{prom_text}"
    );
    assert_eq!(lost[0].value, 0.0, "kspan_events_lost_total");
}

// ---------------------------------------------------------------------------
// A closed stdout stops only the stdout exporter
// ---------------------------------------------------------------------------

/// `kspan | head -1` after head exited: stdout writes fail with EPIPE. The text exporter stops
/// (logged once, counted), kspan keeps running and OTLP keeps receiving spans, also of requests
/// made after the pipe broke.
#[test]
fn closed_stdout_stops_only_the_stdout_exporter() {
    let _env = preflight();
    let rx = OtlpReceiver::start_grpc(0);
    let server = PyServer::start(Some("epipe-server"));
    let spid = server.pid.to_string();
    let endpoint = rx.endpoint();
    let mut kspan = Kspan::start_with_closed_stdout(
        &[
            "--pid",
            &spid,
            "--output",
            "text",
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            "grpc",
        ],
        &[],
    );
    let server_span = |path: &'static str| {
        move |s: &ReceivedSpan| {
            s.span.kind == KIND_SERVER && s.attr_str("url.path").as_deref() == Some(path)
        }
    };

    curl(&["-o", "/dev/null", &server.url("/before")]);
    let before = rx.wait_for_spans_where(1, scaled(10), server_span("/before"));
    assert_eq!(
        before.len(),
        1,
        "the span of the first request over OTLP\n--- kspan stderr ---\n{}",
        kspan.stderr_so_far()
    );
    // The first batch already hit the closed pipe: wait for the one warning.
    let deadline = Instant::now() + scaled(5);
    while !kspan.stderr_so_far().contains("exporter stopped") {
        assert!(
            Instant::now() < deadline,
            "no `exporter stopped` warning:\n{}",
            kspan.stderr_so_far()
        );
        thread::sleep(Duration::from_millis(50));
    }
    kspan.assert_running();

    for _ in 0..3 {
        curl(&["-o", "/dev/null", &server.url("/after")]);
    }
    let after = rx.wait_for_spans_where(3, scaled(10), server_span("/after"));
    assert_eq!(
        after.len(),
        3,
        "spans of requests made after stdout broke still arrive over OTLP\n--- kspan stderr ---\n{}",
        kspan.stderr_so_far()
    );
    kspan.assert_running();

    let run = kspan.stop();
    assert_eq!(
        run.stderr.matches("exporter stopped").count(),
        1,
        "logged once:\n{}",
        run.stderr
    );
    assert_eq!(counter(&run, "exporters_stopped"), 1, "{}", run.stderr);
    assert_eq!(counter(&run, "spans_exported"), 4, "{}", run.stderr);
}
