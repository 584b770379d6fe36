//! End-to-end tests of kspan's trace-context linking: incoming W3C traceparent and B3 headers,
//! parent/child inside a process (a call made while serving a request), across processes
//! (both ends of a connection traced), an application with its own OpenTelemetry SDK, and head
//! sampling that keeps or drops whole traces.
//!
//! The workload is a chain of three `servers/chain_server.py` tiers:
//! client → frontend → backend → store. Each tier serves one request per connection thread
//! and calls the next tier on a fresh connection, so one request yields five spans:
//!
//! ```text
//! frontend SERVER ← frontend CLIENT ← backend SERVER ← backend CLIENT ← store SERVER
//! ```
//!
//! (each arrow points from a child to its parent). Spans are told apart by their resource
//! `process.pid` and `kind`.
//!
//! Needs root, BTF and tracefs (see `kspan_e2e::preflight`), the kspan binary (or KSPAN_BIN),
//! python3 (with pip, for the OpenTelemetry SDK test) and curl.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Barrier;

use kspan_e2e::chain::*;
use kspan_e2e::*;
use serde_json::Value;

// ---------------------------------------------------------------------------
// Span accessors
// ---------------------------------------------------------------------------

fn pid_of(span: &Value) -> Option<i64> {
    res_i64(span, "process.pid")
}

fn kind_of(span: &Value) -> &str {
    span["kind"].as_str().unwrap_or("")
}

/// A counter from kspan's final stderr line (panics if absent).
/// No lost events, and the linker neither gave up on an ambiguous thread nor refused a
/// connection pair: every scenario here is unambiguous (one request per serving thread,
/// one request per connection, both ends agree).
fn assert_clean_run(run: &Run) {
    run.assert_no_lost_events();
    assert_eq!(
        counter(run, "links_ambiguous"),
        0,
        "links_ambiguous must be 0\n{}",
        run.dump()
    );
    assert_eq!(
        counter(run, "links_mismatched"),
        0,
        "links_mismatched must be 0\n{}",
        run.dump()
    );
}

/// Spans grouped by trace id.
fn by_trace<'a>(spans: impl IntoIterator<Item = &'a Value>) -> BTreeMap<String, Vec<&'a Value>> {
    let mut m: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for s in spans {
        m.entry(trace_id(s).to_string()).or_default().push(s);
    }
    m
}

/// Asserts no span id occurs twice among `ids` (labelled for the message).
fn assert_distinct_ids<'a>(ids: impl IntoIterator<Item = (&'a str, String)>, run: &Run) {
    let mut seen: BTreeMap<&str, String> = BTreeMap::new();
    for (id, label) in ids {
        if let Some(prev) = seen.insert(id, label.clone()) {
            panic!(
                "span id {id} is used twice ({prev} and {label})\n{}",
                run.dump()
            );
        }
    }
}

// ---------------------------------------------------------------------------
// The five-span tree of one request through the chain
// ---------------------------------------------------------------------------

struct Tree<'a> {
    fe_server: &'a Value,
    fe_client: &'a Value,
    be_server: &'a Value,
    be_client: &'a Value,
    store_server: &'a Value,
}

/// The one span of `spans` with this pid and kind.
fn one<'a>(spans: &[&'a Value], pid: u32, kind: &str, what: &str, run: &Run) -> &'a Value {
    let found: Vec<&Value> = spans
        .iter()
        .copied()
        .filter(|s| pid_of(s) == Some(pid as i64) && kind_of(s) == kind)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {what} {kind} span (pid {pid}) in this trace, found {}:\n{}\n\nall spans:\n{}",
        found.len(),
        spans
            .iter()
            .map(|s| pretty(s))
            .collect::<Vec<_>>()
            .join("\n"),
        run.dump()
    );
    found[0]
}

impl<'a> Tree<'a> {
    /// Picks the five spans of one request out of `spans`, which must hold exactly those five.
    fn of(spans: &[&'a Value], chain: &Chain, run: &Run) -> Tree<'a> {
        assert_eq!(
            spans.len(),
            5,
            "expected exactly 5 spans in this trace (frontend SERVER+CLIENT, backend SERVER+CLIENT, \
             store SERVER), found {}:\n{}\n\nall spans:\n{}",
            spans.len(),
            spans
                .iter()
                .map(|s| pretty(s))
                .collect::<Vec<_>>()
                .join("\n"),
            run.dump()
        );
        let (fe, be, st) = (&chain.frontend, &chain.backend, &chain.store);
        let t = Tree {
            fe_server: one(spans, fe.pid, "SERVER", "frontend", run),
            fe_client: one(spans, fe.pid, "CLIENT", "frontend", run),
            be_server: one(spans, be.pid, "SERVER", "backend", run),
            be_client: one(spans, be.pid, "CLIENT", "backend", run),
            store_server: one(spans, st.pid, "SERVER", "store", run),
        };
        for (span, tier) in [
            (t.fe_server, fe),
            (t.fe_client, fe),
            (t.be_server, be),
            (t.be_client, be),
            (t.store_server, st),
        ] {
            assert_eq!(
                res_str(span, "service.name"),
                Some(tier.service.as_str()),
                "service.name of the {} tier's span:\n{}",
                tier.name,
                pretty(span)
            );
        }
        t
    }

    fn labelled(&self) -> [(&'static str, &'a Value); 5] {
        [
            ("frontend SERVER", self.fe_server),
            ("frontend CLIENT", self.fe_client),
            ("backend SERVER", self.be_server),
            ("backend CLIENT", self.be_client),
            ("store SERVER", self.store_server),
        ]
    }

    /// The frontend SERVER span's url.path (which request this tree belongs to).
    fn path(&self) -> &'a str {
        must_str(self.fe_server, "url.path")
    }

    /// Every span in `trace`, the frontend SERVER span's parent is `frontend_parent`
    /// (None: it is a root), and each other span is the child of the one before it:
    /// frontend SERVER ← frontend CLIENT ← backend SERVER ← backend CLIENT ← store SERVER.
    /// Span ids distinct and non-zero; each child starts after its parent started and before
    /// it ended.
    fn assert_linked(&self, trace: &str, frontend_parent: Option<&str>, run: &Run) {
        let all = self.labelled();
        for (label, span) in all {
            assert_eq!(
                trace_id(span),
                trace,
                "{label} span must be in trace {trace}\nthis tree:\n{}\n\nall spans:\n{}",
                self.show(),
                run.dump()
            );
            let id = span_id(span);
            assert!(
                id.len() == 16 && id.bytes().any(|b| b != b'0'),
                "{label} span id {id:?} must be 16 hex digits, non-zero"
            );
        }
        assert_eq!(
            parent_id(self.fe_server),
            frontend_parent,
            "frontend SERVER span's parent_span_id\nthis tree:\n{}\n\nall spans:\n{}",
            self.show(),
            run.dump()
        );
        for w in all.windows(2) {
            let ((plabel, parent), (clabel, child)) = (w[0], w[1]);
            assert_eq!(
                parent_id(child),
                Some(span_id(parent)),
                "{clabel} span must be a child of the {plabel} span\nthis tree:\n{}\n\nall spans:\n{}",
                self.show(),
                run.dump()
            );
            // Causality (one kernel clock): the child's request is read/sent while the parent
            // is in flight.
            assert!(
                start_ns(parent) <= start_ns(child) && start_ns(child) <= end_ns(parent),
                "{clabel} span [{}, {}] must start within its parent {plabel} span [{}, {}]\nthis tree:\n{}",
                start_ns(child),
                end_ns(child),
                start_ns(parent),
                end_ns(parent),
                self.show()
            );
        }
        assert_distinct_ids(all.iter().map(|(l, s)| (span_id(s), l.to_string())), run);
        if let Some(p) = frontend_parent {
            for (label, span) in all {
                assert_ne!(
                    span_id(span),
                    p,
                    "kspan's {label} span reuses the incoming parent span id:\n{}",
                    pretty(span)
                );
            }
        }
    }

    fn show(&self) -> String {
        self.labelled()
            .iter()
            .map(|(l, s)| format!("{l}: {}", s))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// 32-hex trace id and 16-hex span id, random, each with at least one letter (so the
/// upper-case form differs from the lower-case one).
fn random_ids_with_letters() -> (String, String) {
    loop {
        let (t, p) = (random_hex(16), random_hex(8));
        if t.bytes().any(|b| b.is_ascii_alphabetic()) && p.bytes().any(|b| b.is_ascii_alphabetic())
        {
            return (t, p);
        }
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// Case 1: A request with a known traceparent through three traced tiers (curl not traced): five
/// spans in the header's trace, the frontend SERVER span a child of the header's span id, each
/// hop a child of the one before it.
#[test]
fn chain_with_known_traceparent() {
    let _env = preflight();
    let mut chain = Chain::start();
    let pid_args = chain.pid_args();
    let kspan = Kspan::start(&args_with(&pid_args, &[]));

    let (t, p) = (random_hex(16), random_hex(8));
    let c = curl(&[
        "-H",
        &format!("traceparent: 00-{t}-{p}-01"),
        &chain.frontend.url("/chain/1"),
    ]);
    let run = kspan.stop();
    chain.assert_alive();
    assert_chain_body(&c.stdout, "curl /chain/1", &chain);
    assert_clean_run(&run);

    assert_eq!(
        run.spans.len(),
        5,
        "expected exactly 5 spans\n{}",
        run.dump()
    );
    let all: Vec<&Value> = run.spans.iter().collect();
    let tree = Tree::of(&all, &chain, &run);
    tree.assert_linked(&t, Some(&p), &run);
    assert_eq!(tree.path(), "/chain/1");
}

/// Case 2: No header, curl traced too: six spans in one trace rooted at curl's CLIENT span; the
/// frontend SERVER span is its child through connection pairing.
#[test]
fn chain_without_traceparent() {
    let _env = preflight();
    let mut chain = Chain::start();
    let pid_args = chain.pid_args();
    let kspan = Kspan::start(&args_with(&pid_args, &["--exe", "curl"]));

    let c = curl(&[&chain.frontend.url("/chain/2")]);
    let run = kspan.stop();
    chain.assert_alive();
    assert_chain_body(&c.stdout, "curl /chain/2", &chain);
    assert_clean_run(&run);

    assert_eq!(
        run.spans.len(),
        6,
        "expected exactly 6 spans\n{}",
        run.dump()
    );
    let all: Vec<&Value> = run.spans.iter().collect();
    let curl_span = one(&all, c.pid, "CLIENT", "curl", &run);
    assert_eq!(
        parent_id(curl_span),
        None,
        "curl's CLIENT span must be the root\n{}",
        run.dump()
    );
    let root_trace = trace_id(curl_span).to_string();
    let rest: Vec<&Value> = all
        .iter()
        .copied()
        .filter(|s| !std::ptr::eq(*s, curl_span))
        .collect();
    let tree = Tree::of(&rest, &chain, &run);
    tree.assert_linked(&root_trace, Some(span_id(curl_span)), &run);
    assert_eq!(tree.path(), "/chain/2");
    assert!(
        start_ns(curl_span) <= start_ns(tree.fe_server),
        "frontend SERVER must start after curl's CLIENT span\n{}",
        run.dump()
    );
    assert_distinct_ids(all.iter().map(|s| (span_id(s), pretty(s))), &run);
}

/// Case 3: Ten requests at once, each with its own traceparent: ten separate five-span trees,
/// each in its request's trace under its request's parent span.
#[test]
fn ten_concurrent_requests() {
    const N: usize = 10;
    let _env = preflight();
    let mut chain = Chain::start();
    let pid_args = chain.pid_args();
    let kspan = Kspan::start(&args_with(&pid_args, &[]));

    let ids: Vec<(String, String)> = (0..N).map(|_| (random_hex(16), random_hex(8))).collect();
    let barrier = Barrier::new(N);
    let outs: Vec<CurlOutput> = std::thread::scope(|scope| {
        let handles: Vec<_> = ids
            .iter()
            .enumerate()
            .map(|(i, (t, p))| {
                let url = chain.frontend.url(&format!("/chain/{i}"));
                let header = format!("traceparent: 00-{t}-{p}-01");
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    curl(&["-H", &header, &url])
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("curl thread panicked"))
            .collect()
    });
    let run = kspan.stop();
    chain.assert_alive();
    for (i, c) in outs.iter().enumerate() {
        assert_chain_body(&c.stdout, &format!("curl /chain/{i}"), &chain);
    }
    assert_clean_run(&run);

    // Runs the kernel skipped (`program_misses`: 7.2 runs syscall tracepoint programs
    // preemptibly, and a program already running on a CPU makes the kernel skip the next) are
    // syscalls kspan never saw: each can cost a request a span or a link (a SERVER span never
    // seen leaves the calls it made in a trace of their own). With none skipped (the host, and
    // every other kernel of the matrix) every request must be exact.
    let misses = counter(&run, "program_misses") as usize;
    let traces = by_trace(&run.spans);
    let complete: Vec<(usize, &(String, String))> = ids
        .iter()
        .enumerate()
        .filter(|(_, (t, _))| traces.get(t).is_some_and(|spans| spans.len() == 5))
        .collect();
    let affected = N - complete.len();
    assert!(
        affected <= 2 * misses,
        "{affected} of {N} requests lack spans or links, with {misses} program runs skipped by \
         the kernel\n{}",
        run.dump()
    );
    if misses == 0 {
        assert_eq!(
            run.spans.len(),
            5 * N,
            "expected exactly {} spans\n{}",
            5 * N,
            run.dump()
        );
    }
    let got: BTreeSet<&str> = traces.keys().map(String::as_str).collect();
    let want: BTreeSet<&str> = ids.iter().map(|(t, _)| t.as_str()).collect();
    if misses == 0 {
        assert_eq!(
            got,
            want,
            "the trace ids must be exactly the ten requests' trace ids\n{}",
            run.dump()
        );
    } else {
        assert!(
            got.difference(&want).count() <= 2 * misses,
            "more traces of no request than program runs skipped could make\n{}",
            run.dump()
        );
    }
    for (i, (t, p)) in complete {
        let tree = Tree::of(&traces[t], &chain, &run);
        tree.assert_linked(t, Some(p), &run);
        assert_eq!(
            tree.path(),
            format!("/chain/{i}"),
            "trace {t} was sent with /chain/{i}\n{}",
            run.dump()
        );
    }
    assert_distinct_ids(run.spans.iter().map(|s| (span_id(s), pretty(s))), &run);
}

/// Case 4: A client instrumented with the OpenTelemetry Python SDK sends traceparent itself:
/// kspan's spans continue the SDK's trace, its CLIENT span and the frontend SERVER span are both
/// children of the SDK's span, and kspan never reuses an SDK span id.
#[test]
fn app_with_own_sdk() {
    let _env = preflight();
    let mut chain = Chain::start();
    let client = SdkClient::start(chain.frontend.port, "/chain/sdk", "e2e-ctx-sdk-client");
    let client_pid = client.pid;
    let mut pid_args = chain.pid_args();
    pid_args.extend(["--pid".to_string(), client_pid.to_string()]);
    let kspan = Kspan::start(&args_with(&pid_args, &[]));

    let res = client.go();
    let run = kspan.stop();
    chain.assert_alive();
    assert_eq!(res.status, 200, "SDK client output:\n{}", res.stdout);
    assert_chain_body(&res.body, "SDK client /chain/sdk", &chain);
    assert_clean_run(&run);

    // The SDK's own view: one sampled root CLIENT span, injected as traceparent.
    assert_eq!(
        res.spans.len(),
        1,
        "the SDK must report exactly one span:\n{}",
        res.stdout
    );
    let sdk = &res.spans[0];
    let (sdk_trace, sdk_span) = (trace_id(sdk).to_string(), span_id(sdk).to_string());
    assert_eq!(sdk["kind"], "CLIENT", "SDK span: {sdk}");
    assert_eq!(sdk["parent_span_id"], Value::Null, "SDK span: {sdk}");
    assert_eq!(sdk["sampled"], true, "SDK span: {sdk}");
    // Flags: sampled (bit 0); recent SDKs also set the W3C level-2 "random trace id" bit (0x02),
    // i.e. send `-03`, which kspan must accept like any version-00 flags byte.
    let (prefix, flags) = res
        .traceparent
        .rsplit_once('-')
        .unwrap_or_else(|| panic!("bad injected traceparent {:?}", res.traceparent));
    assert_eq!(
        prefix,
        format!("00-{sdk_trace}-{sdk_span}"),
        "the SDK must have injected its span's context"
    );
    let flags = u8::from_str_radix(flags, 16)
        .unwrap_or_else(|e| panic!("bad flags in {:?}: {e}", res.traceparent));
    assert_eq!(
        flags & 1,
        1,
        "the SDK's traceparent must be sampled: {:?}",
        res.traceparent
    );

    assert_eq!(
        run.spans.len(),
        6,
        "expected exactly 6 kspan spans\n{}",
        run.dump()
    );
    for s in &run.spans {
        assert_eq!(
            trace_id(s),
            sdk_trace,
            "every kspan span must be in the SDK's trace {sdk_trace}\n{}",
            run.dump()
        );
    }
    let all: Vec<&Value> = run.spans.iter().collect();
    let py_client = one(&all, client_pid, "CLIENT", "SDK client", &run);
    assert_eq!(
        res_str(py_client, "service.name"),
        Some("e2e-ctx-sdk-client"),
        "{}",
        pretty(py_client)
    );
    assert_eq!(
        parent_id(py_client),
        Some(sdk_span.as_str()),
        "kspan's CLIENT span of the SDK client must be a child of the SDK span {sdk_span}\n{}",
        run.dump()
    );
    let rest: Vec<&Value> = all
        .iter()
        .copied()
        .filter(|s| !std::ptr::eq(*s, py_client))
        .collect();
    let tree = Tree::of(&rest, &chain, &run);
    // The header wins over connection pairing: the frontend SERVER span parents to the SDK span,
    // not to kspan's CLIENT span of the same request.
    tree.assert_linked(&sdk_trace, Some(&sdk_span), &run);
    assert_eq!(tree.path(), "/chain/sdk");

    let mut ids: Vec<(&str, String)> = run
        .spans
        .iter()
        .map(|s| (span_id(s), format!("kspan {}", s)))
        .collect();
    ids.push((sdk_span.as_str(), format!("SDK {sdk}")));
    assert_distinct_ids(ids, &run);
}

/// Case 5: `--sample-ratio 0.25` (parentbased_traceidratio) with requests that carry no
/// context: the frontend SERVER span is each trace's root and decides for the whole trace, so
/// traces are kept or dropped whole, about a quarter are kept, and the kept ones satisfy the
/// ratio rule.
#[test]
fn sampling_ratio_keeps_whole_traces() {
    const N: usize = 400;
    const RATIO: f64 = 0.25;
    let _env = preflight();
    let mut chain = Chain::start();
    let pid_args = chain.pid_args();
    let kspan = Kspan::start(&args_with(&pid_args, &["--sample-ratio", "0.25"]));

    // The load client is not traced: the frontend SERVER span is every trace's root.
    let statuses = load_client(chain.frontend.port, N, "/chain/");
    let run = kspan.stop();
    chain.assert_alive();
    assert_eq!(
        statuses,
        vec![200; N],
        "load client statuses\n{}",
        chain.stderr()
    );
    assert_clean_run(&run);

    let traces = by_trace(&run.spans);
    let mut paths = BTreeSet::new();
    for (t, spans) in &traces {
        // Never part of a trace: the five spans, correctly linked, or nothing.
        let tree = Tree::of(spans, &chain, &run);
        tree.assert_linked(t, None, &run);
        assert!(
            paths.insert(tree.path().to_string()),
            "two kept traces for {}\n{}",
            tree.path(),
            run.dump()
        );
        assert!(
            traceidratio_keeps(t, RATIO),
            "kept trace {t} does not satisfy the ratio rule (last 8 bytes >> 1 < {RATIO}·2^63)"
        );
    }
    let kept = traces.len();
    eprintln!("sampling: kept {kept} of {N} traces (ratio {RATIO})");
    // The decision is a deterministic function of random trace ids, so the kept count is
    // K ~ Binomial(400, 0.25): mean 100, σ = sqrt(400·0.25·0.75) ≈ 8.66. A 4.5σ band (±39
    // traces, i.e. |K/400 − 0.25| ≤ 0.0975) keeps the false-failure rate below 1e-5.
    const TOLERANCE: usize = 39;
    let expected = (N as f64 * RATIO) as usize;
    assert!(
        kept.abs_diff(expected) <= TOLERANCE,
        "kept {kept} of {N} traces with ratio {RATIO}: outside {expected} ± {TOLERANCE}\n--- kspan stderr ---\n{}",
        run.stderr
    );
    assert_eq!(
        run.spans.len(),
        5 * kept,
        "printed spans must be whole traces\n{}",
        run.dump()
    );
    assert_eq!(
        counter(&run, "spans_sampled_out"),
        ((N - kept) * 5) as u64,
        "spans_sampled_out must count the 5 spans of each of the {} dropped traces\n--- kspan stderr ---\n{}",
        N - kept,
        run.stderr
    );
}

/// Case 6: Invalid traceparent headers (all-zero trace id; upper-case hex) are ignored: each
/// request starts a new random trace rooted at the frontend SERVER span, and the tree below it
/// is intact.
#[test]
fn malformed_traceparent_is_ignored() {
    let _env = preflight();
    let mut chain = Chain::start();
    let pid_args = chain.pid_args();
    let kspan = Kspan::start(&args_with(&pid_args, &[]));

    const ZERO_TRACE: &str = "00000000000000000000000000000000";
    const ZERO_PARENT: &str = "b7ad6b7169203331";
    let (t, p) = random_ids_with_letters();
    let upper = format!(
        "00-{}-{}-01",
        t.to_ascii_uppercase(),
        p.to_ascii_uppercase()
    );
    let c1 = curl(&[
        "-H",
        &format!("traceparent: 00-{ZERO_TRACE}-{ZERO_PARENT}-01"),
        &chain.frontend.url("/chain/zero"),
    ]);
    let c2 = curl(&[
        "-H",
        &format!("traceparent: {upper}"),
        &chain.frontend.url("/chain/upper"),
    ]);
    let run = kspan.stop();
    chain.assert_alive();
    assert_chain_body(&c1.stdout, "curl /chain/zero", &chain);
    assert_chain_body(&c2.stdout, "curl /chain/upper", &chain);
    assert_clean_run(&run);

    assert_eq!(
        run.spans.len(),
        10,
        "expected exactly 10 spans\n{}",
        run.dump()
    );
    let traces = by_trace(&run.spans);
    assert_eq!(
        traces.len(),
        2,
        "expected two traces (one per request)\n{}",
        run.dump()
    );
    let mut paths = BTreeSet::new();
    for (trace, spans) in &traces {
        let tree = Tree::of(spans, &chain, &run);
        tree.assert_linked(trace, None, &run);
        paths.insert(tree.path().to_string());
        assert_ne!(trace, ZERO_TRACE);
        assert!(
            !trace.eq_ignore_ascii_case(&t),
            "the upper-case traceparent's trace id must not be used\n{}",
            run.dump()
        );
    }
    assert_eq!(
        paths,
        BTreeSet::from(["/chain/zero".to_string(), "/chain/upper".to_string()]),
        "{}",
        run.dump()
    );
    for s in &run.spans {
        let parent = parent_id(s).unwrap_or("");
        assert!(
            parent != ZERO_PARENT && !parent.eq_ignore_ascii_case(&p),
            "no span may parent to a malformed header's span id:\n{}",
            pretty(s)
        );
    }
}

/// Case 7: B3 context (single `b3` header; multi `X-B3-*` headers) is continued like traceparent.
#[test]
fn b3_headers() {
    let _env = preflight();
    let mut chain = Chain::start();
    let pid_args = chain.pid_args();
    let kspan = Kspan::start(&args_with(&pid_args, &[]));

    let (t1, s1) = (random_hex(16), random_hex(8));
    let (t2, s2) = (random_hex(16), random_hex(8));
    let c1 = curl(&[
        "-H",
        &format!("b3: {t1}-{s1}-1"),
        &chain.frontend.url("/chain/b3single"),
    ]);
    let c2 = curl(&[
        "-H",
        &format!("X-B3-TraceId: {t2}"),
        "-H",
        &format!("X-B3-SpanId: {s2}"),
        "-H",
        "X-B3-Sampled: 1",
        &chain.frontend.url("/chain/b3multi"),
    ]);
    let run = kspan.stop();
    chain.assert_alive();
    assert_chain_body(&c1.stdout, "curl /chain/b3single", &chain);
    assert_chain_body(&c2.stdout, "curl /chain/b3multi", &chain);
    assert_clean_run(&run);

    assert_eq!(
        run.spans.len(),
        10,
        "expected exactly 10 spans\n{}",
        run.dump()
    );
    let traces = by_trace(&run.spans);
    let got: BTreeSet<&str> = traces.keys().map(String::as_str).collect();
    assert_eq!(
        got,
        BTreeSet::from([t1.as_str(), t2.as_str()]),
        "the trace ids must be the B3 headers' trace ids\n{}",
        run.dump()
    );
    for (t, s, path) in [(&t1, &s1, "/chain/b3single"), (&t2, &s2, "/chain/b3multi")] {
        let tree = Tree::of(&traces[t.as_str()], &chain, &run);
        tree.assert_linked(t, Some(s), &run);
        assert_eq!(tree.path(), path, "{}", run.dump());
    }
}
