//! End-to-end tests of kspan's Kafka tracing, with real Kafka clients against librdkafka's mock
//! broker (`servers/kafka_broker.py`: one broker on 127.0.0.1, topics of one partition, in its
//! own process, never traced here): confluent-kafka producers and consumers
//! (`servers/kafka_producer.py`, `servers/kafka_consumer.py`; librdkafka 2.16: Produce v10,
//! Fetch v16 naming topics by id) and Debian's kcat (librdkafka 2.0: Produce v7, Fetch v11).
//! Each client is its own process, connecting to the broker over loopback TCP.
//!
//! Expected of a traced client (OpenTelemetry messaging conventions):
//! - one PRODUCER span `send {topic}` per topic of each Produce request, with
//!   `messaging.system`, `messaging.operation.type` and `.name` ("send"),
//!   `messaging.destination.name`, `messaging.destination.partition.id` (a string),
//!   `messaging.kafka.offset` for a single message the broker gave an offset (else
//!   `messaging.batch.message_count`), `messaging.client.id`, `server.address`, `server.port`,
//!   `network.peer.address`, `network.peer.port`; an error (with `error.type`) when the
//!   partition reported one. A message carrying a `traceparent` header makes its PRODUCER span
//!   continue that context;
//! - one CONSUMER span `poll {topic}` per topic of each Fetch response that returned records
//!   (operation type "receive", name "poll"; `messaging.consumer.group.name` for a group
//!   member), linked to each message's origin: its `traceparent` header's context, or else the
//!   PRODUCER span that wrote it;
//! - `messaging.client.sent.messages`, `messaging.client.consumed.messages` and
//!   `messaging.client.operation.duration` metrics.
//!
//! Needs root, BTF and tracefs (see `kspan_e2e::preflight`), the kspan binary (or KSPAN_BIN) and
//! the peers `cargo xtask setup` installs: confluent-kafka for python3, and kcat.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use kspan_e2e::chain::random_hex;
use kspan_e2e::kafka::*;
use kspan_e2e::otlp_receiver::*;
use kspan_e2e::*;
use serde_json::Value;

/// librdkafka's default `client.id`, which neither the python peers nor kcat change.
const CLIENT_ID: &str = "rdkafka";

/// Kafka error code NOT_ENOUGH_REPLICAS: retriable, librdkafka sends the batch again.
const NOT_ENOUGH_REPLICAS: i16 = 19;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// The spans of `kind` in process `pid`, by start time.
fn spans_of<'a>(run: &'a Run, pid: u32, kind: &str) -> Vec<&'a Value> {
    sorted_by_start(
        by_pid(&run.spans, pid)
            .into_iter()
            .filter(|s| s["kind"] == kind)
            .collect(),
    )
}

/// Every span belongs to one of `pids` and is a PRODUCER or CONSUMER span (no HTTP or other
/// span out of Kafka traffic, nothing from the untraced broker).
fn assert_only_kafka_spans_of(run: &Run, pids: &[u32]) {
    for span in &run.spans {
        let pid = res_i64(span, "process.pid");
        assert!(
            pids.iter().any(|&p| pid == Some(i64::from(p))),
            "a span of a process that is not a selected Kafka client (selected: {pids:?}):\n{}\n\n{}",
            pretty(span),
            run.dump()
        );
        assert!(
            matches!(span["kind"].as_str(), Some("PRODUCER" | "CONSUMER")),
            "Kafka traffic must only make PRODUCER and CONSUMER spans:\n{}\n\n{}",
            pretty(span),
            run.dump()
        );
        assert!(
            attr(span, "http.request.method").is_none() && attr(span, "rpc.system").is_none(),
            "Kafka traffic taken for HTTP or RPC:\n{}",
            pretty(span)
        );
    }
}

/// The attributes every Kafka client span has, for `topic` on the broker at `port`.
fn common_attrs(topic: &str, port: u16, operation: &str) -> Vec<(&'static str, Expect)> {
    let (operation_type, operation_name) = match operation {
        "send" => ("send", "send"),
        _ => ("receive", "poll"),
    };
    vec![
        ("messaging.system", s("kafka")),
        ("messaging.operation.type", s(operation_type)),
        ("messaging.operation.name", s(operation_name)),
        ("messaging.destination.name", s(topic)),
        ("messaging.destination.partition.id", s("0")),
        ("messaging.client.id", s(CLIENT_ID)),
        ("server.address", s("127.0.0.1")),
        ("server.port", int(port)),
        ("network.peer.address", s("127.0.0.1")),
        ("network.peer.port", int(port)),
    ]
}

/// A PRODUCER span of one message written at `offset` of partition 0 of `topic`: name, kind,
/// status and the exact attributes.
fn check_producer(span: &Value, topic: &str, port: u16, offset: i64) {
    assert_eq!(name(span), format!("send {topic}"), "{}", pretty(span));
    assert_eq!(span["kind"], "PRODUCER", "{}", pretty(span));
    assert_eq!(status(span), "UNSET", "{}", pretty(span));
    let mut want = common_attrs(topic, port, "send");
    want.push(("messaging.kafka.offset", int(offset)));
    assert_attributes(span, &want);
}

/// A CONSUMER span of partition 0 of `topic`: name, kind, status, and the exact attributes for
/// the number of messages it stands for (the offset when one, the count when more); the
/// group's name for a group member.
fn check_consumer(span: &Value, topic: &str, port: u16, group: Option<&str>) {
    assert_eq!(name(span), format!("poll {topic}"), "{}", pretty(span));
    assert_eq!(span["kind"], "CONSUMER", "{}", pretty(span));
    assert_eq!(status(span), "UNSET", "{}", pretty(span));
    assert_eq!(
        parent_id(span),
        None,
        "a CONSUMER span starts its own trace (its messages' origins are links):\n{}",
        pretty(span)
    );
    let mut want = common_attrs(topic, port, "poll");
    let n = message_count(span);
    assert!(n >= 1, "a CONSUMER span of {n} messages:\n{}", pretty(span));
    if n == 1 {
        want.push(("messaging.kafka.offset", Expect::AnyInt));
    } else {
        want.push(("messaging.batch.message_count", int(n)));
    }
    if let Some(group) = group {
        want.push(("messaging.consumer.group.name", s(group)));
    }
    assert_attributes(span, &want);
}

/// The consumer's CONSUMER spans stand for exactly `messages` messages in all (offsets of
/// single-message spans among them, each once), never more spans than messages.
fn assert_consumed(consumers: &[&Value], messages: &[i64], run: &Run) {
    let total: i64 = consumers.iter().map(|s| message_count(s)).sum();
    assert_eq!(
        total,
        messages.len() as i64,
        "the CONSUMER spans must stand for the {} messages consumed (sum of \
         messaging.batch.message_count, 1 when absent)\n{}",
        messages.len(),
        run.dump()
    );
    assert!(!consumers.is_empty() && consumers.len() <= messages.len());
    let mut seen = BTreeSet::new();
    for span in consumers {
        if let Some(offset) = attr_i64(span, "messaging.kafka.offset") {
            assert!(
                messages.contains(&offset) && seen.insert(offset),
                "CONSUMER span of offset {offset}: not a consumed message, or twice:\n{}",
                run.dump()
            );
        }
    }
}

/// (trace id, span id) of a span, as a link to it.
fn context_of(span: &Value) -> (String, String) {
    (trace_id(span).to_string(), span_id(span).to_string())
}

/// Every link of the consumer's CONSUMER spans, one per message: exactly `want` (each once),
/// and each span with as many links as messages.
fn assert_links(consumers: &[&Value], want: &[(String, String)], run: &Run) {
    let mut got: Vec<(String, String)> = consumers.iter().flat_map(|s| links(s)).collect();
    got.sort();
    let mut want = want.to_vec();
    want.sort();
    assert_eq!(
        got,
        want,
        "the CONSUMER spans' links must be the messages' origins, one per message: header \
         contexts, else the PRODUCER span that wrote the message\n{}",
        run.dump()
    );
    for span in consumers {
        assert_eq!(
            links(span).len() as i64,
            message_count(span),
            "a CONSUMER span needs one link per message here (every origin differs):\n{}",
            pretty(span)
        );
    }
}

/// `traceparent` value for (trace id, parent id).
fn traceparent(trace: &str, parent: &str) -> String {
    format!("00-{trace}-{parent}-01")
}

// ---------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------

/// The samples of the Prometheus endpoint on `port` once `done` holds for them (the export
/// thread records spans a little after they are parsed).
fn scrape_until(
    port: u16,
    done: impl Fn(&[prometheus::Sample]) -> bool,
) -> Vec<prometheus::Sample> {
    let deadline = Instant::now() + scaled(10);
    loop {
        let fetched = prometheus::http_get(port, "/metrics");
        if let Ok((200, _, body)) = &fetched {
            let samples = prometheus::parse_text(body);
            if done(&samples) {
                return samples;
            }
            if Instant::now() >= deadline {
                panic!(
                    "the Prometheus endpoint did not count every Kafka message in time:\n{body}"
                );
            }
        } else if Instant::now() >= deadline {
            panic!("GET http://127.0.0.1:{port}/metrics failed: {fetched:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The sum of the samples named `name` with messaging operation name `operation`, checking the
/// messaging labels of each.
fn prom_sum(samples: &[prometheus::Sample], name: &str, operation: &str, topic: &str) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && s.label("messaging_operation_name") == Some(operation))
        .map(|s| {
            assert_eq!(s.label("messaging_system"), Some("kafka"), "{s:?}");
            assert_eq!(s.label("messaging_destination_name"), Some(topic), "{s:?}");
            s.value
        })
        .sum()
}

/// The sum of the OTLP Sum points named `name` of process `pid`, checking their messaging
/// attributes.
fn otlp_sum(
    latest: &[(BTreeMap<String, Value>, proto::metrics::v1::ResourceMetrics)],
    name: &str,
    pid: u32,
    operation: &str,
    topic: &str,
) -> u64 {
    let points = sum_points(latest, name);
    let mut total = 0.0;
    for p in &points {
        assert!(p.is_monotonic, "{name} must be a counter: {p:?}");
        assert_eq!(p.temporality, CUMULATIVE, "{p:?}");
        assert_eq!(
            p.resource.get("process.pid"),
            Some(&Value::from(i64::from(pid))),
            "{name} of an unexpected process: {p:?}"
        );
        assert_eq!(
            p.attributes.get("messaging.system"),
            Some(&Value::from("kafka")),
            "{p:?}"
        );
        assert_eq!(
            p.attributes.get("messaging.operation.name"),
            Some(&Value::from(operation)),
            "{p:?}"
        );
        assert_eq!(
            p.attributes.get("messaging.destination.name"),
            Some(&Value::from(topic)),
            "{p:?}"
        );
        total += p.value;
    }
    total as u64
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// confluent-kafka (librdkafka 2.16: Produce v10, Fetch v16 with topic ids) in two processes:
/// a producer of 5 messages, one Produce request each, messages 1 and 3 carrying `traceparent`
/// headers of known, distinct contexts; then a consumer in group `e2e-group`. The broker is not
/// traced. Proves:
/// - exactly 5 PRODUCER spans `send {topic}` with every attribute, offsets 0..4 in order; the 2
///   with a header continue its context (trace id and parent), the 3 others are roots of their
///   own traces;
/// - the CONSUMER spans `poll {topic}` (the topic's name although Fetch v16 names it by id)
///   stand for the 5 messages, carry the group's name, and link each message to its origin:
///   the 2 header contexts and the 3 header-less messages' PRODUCER spans, one link each;
/// - nothing else: no span from the broker, no HTTP span;
/// - the messaging metrics, on the Prometheus endpoint and over OTLP: 5 messages sent, 5
///   consumed, one `send` duration per PRODUCER span; the OTLP spans match the printed ones
///   (kinds and links).
#[test]
fn confluent_kafka_producer_and_consumer() {
    const N: usize = 5;
    const GROUP: &str = "e2e-group";
    let topic = "e2e-orders";
    let _env = preflight();
    let mut broker = KafkaBroker::start(&[topic]);
    let contexts: Vec<(String, String)> = (0..2).map(|_| (random_hex(16), random_hex(8))).collect();
    let headers: Vec<String> = contexts.iter().map(|(t, p)| traceparent(t, p)).collect();
    let traceparents = [(1, headers[0].as_str()), (3, headers[1].as_str())];
    let producer = KafkaProducer::start(
        &broker.addr,
        topic,
        N,
        ProducerOptions {
            traceparents: &traceparents,
            ..Default::default()
        },
    );
    let consumer = KafkaConsumer::start(&broker.addr, topic, GROUP, N);
    let (producer_pid, consumer_pid) = (producer.pid, consumer.pid);
    let rx = OtlpReceiver::start_grpc(0);
    let endpoint = rx.endpoint();
    let prom_port = free_port();
    let kspan = start_kspan(
        &[
            "--pid",
            &producer_pid.to_string(),
            "--pid",
            &consumer_pid.to_string(),
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            "grpc",
            "--prometheus-port",
            &prom_port.to_string(),
        ],
        &[],
    );
    let produced = producer.go();
    let consumed = consumer.go();
    // A span adds to its counter, then to the duration histogram: wait for both.
    let samples = scrape_until(prom_port, |samples| {
        let sum = |name: &str, operation: &str| prom_sum(samples, name, operation, topic);
        sum("messaging_client_sent_messages_total", "send") >= N as f64
            && sum("messaging_client_operation_duration_seconds_count", "send") >= N as f64
            && sum("messaging_client_consumed_messages_total", "poll") >= N as f64
            && sum("messaging_client_operation_duration_seconds_count", "poll") >= 1.0
    });
    let run = stop_kspan(kspan);
    broker.assert_alive();

    let offsets: Vec<i64> = (0..N as i64).collect();
    assert_eq!(produced.offsets, offsets, "{}", produced.stdout);
    assert_eq!(
        consumed
            .messages
            .iter()
            .map(|m| m.offset)
            .collect::<Vec<_>>(),
        offsets,
        "{}",
        consumed.stdout
    );
    assert_clean_run(&run);
    assert_only_kafka_spans_of(&run, &[producer_pid, consumer_pid]);

    // PRODUCER spans: one per message, in order.
    let producers = spans_of(&run, producer_pid, "PRODUCER");
    assert_eq!(
        producers.len(),
        N,
        "expected exactly {N} PRODUCER spans (one Produce request per message)\n{}",
        run.dump()
    );
    assert!(
        spans_of(&run, producer_pid, "CONSUMER").is_empty(),
        "{}",
        run.dump()
    );
    for (i, span) in producers.iter().enumerate() {
        check_producer(span, topic, broker.port, i as i64);
        match traceparents.iter().position(|(index, _)| *index == i) {
            Some(c) => assert_eq!(
                (trace_id(span), parent_id(span)),
                (contexts[c].0.as_str(), Some(contexts[c].1.as_str())),
                "message {i}'s PRODUCER span must continue its traceparent header\n{}",
                run.dump()
            ),
            None => assert_eq!(
                parent_id(span),
                None,
                "message {i} has no header: its PRODUCER span is a root\n{}",
                run.dump()
            ),
        }
    }
    let roots: BTreeSet<&str> = [0, 2, 4].iter().map(|&i| trace_id(producers[i])).collect();
    assert_eq!(
        roots.len(),
        3,
        "one trace per header-less message\n{}",
        run.dump()
    );

    // CONSUMER spans: all the messages, linked to their origins.
    let consumers = spans_of(&run, consumer_pid, "CONSUMER");
    assert!(
        spans_of(&run, consumer_pid, "PRODUCER").is_empty(),
        "{}",
        run.dump()
    );
    for span in &consumers {
        check_consumer(span, topic, broker.port, Some(GROUP));
    }
    assert_consumed(&consumers, &offsets, &run);
    let mut want_links = contexts.clone();
    want_links.extend([0, 2, 4].iter().map(|&i| context_of(producers[i])));
    assert_links(&consumers, &want_links, &run);
    for span in &consumers {
        if let Some(offset) = attr_i64(span, "messaging.kafka.offset") {
            let origin = match traceparents.iter().position(|(i, _)| *i as i64 == offset) {
                Some(c) => contexts[c].clone(),
                None => context_of(producers[offset as usize]),
            };
            assert_eq!(
                links(span),
                vec![origin],
                "the CONSUMER span of offset {offset} must link to that message's origin\n{}",
                run.dump()
            );
        }
    }

    // Prometheus, scraped while kspan ran.
    let sent = prom_sum(
        &samples,
        "messaging_client_sent_messages_total",
        "send",
        topic,
    );
    let received = prom_sum(
        &samples,
        "messaging_client_consumed_messages_total",
        "poll",
        topic,
    );
    let send_durations = prom_sum(
        &samples,
        "messaging_client_operation_duration_seconds_count",
        "send",
        topic,
    );
    let poll_durations = prom_sum(
        &samples,
        "messaging_client_operation_duration_seconds_count",
        "poll",
        topic,
    );
    assert_eq!(
        (sent, received),
        (N as f64, N as f64),
        "Prometheus messaging_client_{{sent,consumed}}_messages_total"
    );
    assert_eq!(
        send_durations, N as f64,
        "Prometheus messaging_client_operation_duration_seconds_count for send: one per \
         Produce request"
    );
    // Whether the last CONSUMER span's duration was recorded when the scrape saw its messages
    // counted is a race: the OTLP final state below checks that every one is.
    assert!(
        poll_durations >= 1.0,
        "Prometheus messaging_client_operation_duration_seconds_count for poll: {poll_durations}"
    );

    // OTLP, after the final flush.
    let latest = latest_per_resource(&rx.metric_requests());
    assert_eq!(
        otlp_sum(
            &latest,
            "messaging.client.sent.messages",
            producer_pid,
            "send",
            topic
        ),
        N as u64,
        "OTLP messaging.client.sent.messages; metrics received: {:?}",
        metric_names(&latest)
    );
    assert_eq!(
        otlp_sum(
            &latest,
            "messaging.client.consumed.messages",
            consumer_pid,
            "poll",
            topic
        ),
        N as u64,
        "OTLP messaging.client.consumed.messages; metrics received: {:?}",
        metric_names(&latest)
    );
    let durations = histogram_points(&latest, "messaging.client.operation.duration");
    let mut count_by_operation: BTreeMap<String, u64> = BTreeMap::new();
    for p in &durations {
        assert_eq!(p.unit, "s", "{p:?}");
        assert_eq!(p.temporality, CUMULATIVE, "{p:?}");
        assert_eq!(p.bucket_counts.iter().sum::<u64>(), p.count, "{p:?}");
        let operation = p
            .attributes
            .get("messaging.operation.name")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("a duration point without an operation name: {p:?}"));
        let pid = if operation == "send" {
            producer_pid
        } else {
            consumer_pid
        };
        assert_eq!(
            p.resource.get("process.pid"),
            Some(&Value::from(i64::from(pid))),
            "{p:?}"
        );
        *count_by_operation.entry(operation.to_string()).or_default() += p.count;
    }
    assert_eq!(
        count_by_operation.get("send"),
        Some(&(N as u64)),
        "OTLP messaging.client.operation.duration counts per operation: {count_by_operation:?}"
    );
    assert!(
        count_by_operation.get("poll").copied().unwrap_or(0) >= consumers.len() as u64,
        "OTLP messaging.client.operation.duration counts per operation: {count_by_operation:?}"
    );
    for name in [
        "http.client.request.duration",
        "http.server.request.duration",
        "rpc.client.call.duration",
    ] {
        assert!(
            histogram_points(&latest, name).is_empty(),
            "Kafka traffic must not be counted in {name}"
        );
    }

    // The exported spans are the printed ones, kinds and links included.
    let exported: BTreeMap<String, ReceivedSpan> = rx
        .spans()
        .into_iter()
        .map(|s| (s.span_id_hex(), s))
        .collect();
    assert_eq!(
        exported.len(),
        run.spans.len(),
        "every printed span must be exported over OTLP, once\n{}",
        run.dump()
    );
    for span in &run.spans {
        let got = exported.get(span_id(span)).unwrap_or_else(|| {
            panic!("span not exported over OTLP:\n{}", pretty(span));
        });
        assert_eq!(
            got.kind_name(),
            span["kind"].as_str().unwrap_or(""),
            "{}",
            pretty(span)
        );
        assert_eq!(got.trace_id_hex(), trace_id(span), "{}", pretty(span));
        assert_eq!(got.span.name, name(span), "{}", pretty(span));
        let otlp_links: Vec<(String, String)> = got
            .span
            .links
            .iter()
            .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
            .collect();
        assert_eq!(
            otlp_links,
            links(span),
            "the OTLP span's links must be the printed ones:\n{}",
            pretty(span)
        );
    }
}

/// kcat (librdkafka 2.0: Produce v7, Fetch v11 naming topics by name; a consumer without a
/// group), selected by executable: `kcat -P` produces 4 lines, one Produce request each
/// (`linger.ms=0`, `batch.num.messages=1`), then `kcat -C` consumes them from the beginning.
/// Proves: exactly 4 PRODUCER spans with offsets 0..3 in the producer process; CONSUMER spans
/// in the consumer process standing for the 4 messages, without a group name, each message
/// linked to the PRODUCER span that wrote it; nothing else (the python broker is not selected).
#[test]
fn kcat_older_protocol_versions() {
    const LINES: [&str; 4] = ["alpha", "beta", "gamma", "delta"];
    let topic = "e2e-kcat";
    let _env = preflight();
    let kcat_name = kcat_exe_name();
    let mut broker = KafkaBroker::start(&[topic]);
    let kspan = start_kspan(&["--exe", &kcat_name], &[]);
    let producer = kcat_produce(&broker.addr, topic, &LINES);
    let consumer = kcat_consume(&broker.addr, topic, LINES.len());
    let run = stop_kspan(kspan);
    broker.assert_alive();
    assert_eq!(
        consumer.stdout.lines().collect::<Vec<_>>(),
        LINES,
        "kcat -C must print the lines kcat -P sent\n--- stderr ---\n{}",
        consumer.stderr
    );
    assert_clean_run(&run);
    assert_only_kafka_spans_of(&run, &[producer.pid, consumer.pid]);

    let producers = spans_of(&run, producer.pid, "PRODUCER");
    assert_eq!(
        producers.len(),
        LINES.len(),
        "expected exactly {} PRODUCER spans (one Produce request per line)\n{}",
        LINES.len(),
        run.dump()
    );
    for (i, span) in producers.iter().enumerate() {
        check_producer(span, topic, broker.port, i as i64);
        assert_eq!(parent_id(span), None, "{}", pretty(span));
    }
    let consumers = spans_of(&run, consumer.pid, "CONSUMER");
    for span in &consumers {
        check_consumer(span, topic, broker.port, None);
    }
    let offsets: Vec<i64> = (0..LINES.len() as i64).collect();
    assert_consumed(&consumers, &offsets, &run);
    let want: Vec<(String, String)> = producers.iter().map(|s| context_of(s)).collect();
    assert_links(&consumers, &want, &run);
    for span in &consumers {
        if let Some(offset) = attr_i64(span, "messaging.kafka.offset") {
            assert_eq!(
                links(span),
                vec![context_of(producers[offset as usize])],
                "the CONSUMER span of offset {offset} must link to its PRODUCER span\n{}",
                run.dump()
            );
        }
    }
}

/// A traced broker (librdkafka's mock, serving kcat): one SERVER span per Produce request and
/// per Fetch that returned messages, named as the client's span, each the child of the client's
/// PRODUCER or CONSUMER span in its trace (the correlation id is the same at both ends, so the
/// ends pair as HTTP/2 streams do); no SERVER span for the empty long polls.
#[test]
fn traced_broker_spans_are_children_of_the_clients() {
    const LINES: [&str; 3] = ["one", "two", "three"];
    let topic = "e2e-broker";
    let _env = preflight();
    let kcat_name = kcat_exe_name();
    let mut broker = KafkaBroker::start(&[topic]);
    let broker_pid = broker.pid.to_string();
    let kspan = start_kspan(&["--exe", &kcat_name, "--pid", &broker_pid], &[]);
    let producer = kcat_produce(&broker.addr, topic, &LINES);
    let consumer = kcat_consume(&broker.addr, topic, LINES.len());
    let run = stop_kspan(kspan);
    broker.assert_alive();
    assert_eq!(consumer.stdout.lines().collect::<Vec<_>>(), LINES);
    assert_clean_run(&run);
    let producers = spans_of(&run, producer.pid, "PRODUCER");
    assert_eq!(producers.len(), LINES.len(), "{}", run.dump());
    let consumers = spans_of(&run, consumer.pid, "CONSUMER");
    assert!(!consumers.is_empty(), "{}", run.dump());
    let servers = spans_of(&run, broker.pid, "SERVER");
    assert_eq!(
        servers.len(),
        producers.len() + consumers.len(),
        "one SERVER span per client span, none for empty polls\n{}",
        run.dump()
    );
    assert_eq!(
        by_pid(&run.spans, broker.pid).len(),
        servers.len(),
        "{}",
        run.dump()
    );
    for client in producers.iter().chain(&consumers) {
        let children: Vec<&&Value> = servers
            .iter()
            .filter(|s| parent_id(s) == Some(span_id(client)))
            .collect();
        assert_eq!(
            children.len(),
            1,
            "exactly one broker SERVER span is the child of {}\n{}",
            pretty(client),
            run.dump()
        );
        let server = children[0];
        assert_eq!(trace_id(server), trace_id(client), "{}", pretty(server));
        assert_eq!(server["name"], client["name"], "{}", pretty(server));
        assert_eq!(attr_str(server, "messaging.system"), Some("kafka"));
        assert_eq!(
            attr_i64(server, "messaging.kafka.offset"),
            attr_i64(client, "messaging.kafka.offset"),
            "{}",
            pretty(server)
        );
        assert_eq!(attr_i64(server, "server.port"), Some(broker.port as i64));
    }
}

/// confluent-kafka producing 3 header-less messages in ONE Produce request (one record batch),
/// then a consumer in a group. Proves: one PRODUCER span for the request, with
/// `messaging.batch.message_count` 3 and no offset; CONSUMER spans standing for the 3 messages
/// (the mock broker returns the batch whole: one span of 3), every one of their links the
/// PRODUCER span, none twice in a span (one link per origin, not per message).
#[test]
fn one_request_batch_of_messages() {
    const N: usize = 3;
    const GROUP: &str = "e2e-batch-group";
    let topic = "e2e-batch";
    let _env = preflight();
    let mut broker = KafkaBroker::start(&[topic]);
    let producer = KafkaProducer::start(
        &broker.addr,
        topic,
        N,
        ProducerOptions {
            one_request: true,
            ..Default::default()
        },
    );
    let consumer = KafkaConsumer::start(&broker.addr, topic, GROUP, N);
    let (producer_pid, consumer_pid) = (producer.pid, consumer.pid);
    let kspan = start_kspan(
        &[
            "--pid",
            &producer_pid.to_string(),
            "--pid",
            &consumer_pid.to_string(),
        ],
        &[],
    );
    let produced = producer.go();
    let consumed = consumer.go();
    let run = stop_kspan(kspan);
    broker.assert_alive();
    let offsets: Vec<i64> = (0..N as i64).collect();
    assert_eq!(produced.offsets, offsets, "{}", produced.stdout);
    assert_eq!(
        consumed
            .messages
            .iter()
            .map(|m| m.offset)
            .collect::<Vec<_>>(),
        offsets,
        "{}",
        consumed.stdout
    );
    assert_clean_run(&run);
    assert_only_kafka_spans_of(&run, &[producer_pid, consumer_pid]);

    let producers = spans_of(&run, producer_pid, "PRODUCER");
    assert_eq!(
        producers.len(),
        1,
        "expected one PRODUCER span for the one Produce request\n{}",
        run.dump()
    );
    let batch = producers[0];
    assert_eq!(name(batch), format!("send {topic}"), "{}", pretty(batch));
    assert_eq!(status(batch), "UNSET", "{}", pretty(batch));
    assert_eq!(parent_id(batch), None, "{}", pretty(batch));
    let mut want = common_attrs(topic, broker.port, "send");
    want.push(("messaging.batch.message_count", int(N as i64)));
    assert_attributes(batch, &want);

    let consumers = spans_of(&run, consumer_pid, "CONSUMER");
    for span in &consumers {
        check_consumer(span, topic, broker.port, Some(GROUP));
        assert_eq!(
            links(span),
            vec![context_of(batch)],
            "each CONSUMER span's messages all come from the one PRODUCER span: one link\n{}",
            run.dump()
        );
    }
    assert_consumed(&consumers, &offsets, &run);
}

/// The broker answers the first Produce request with the partition error NOT_ENOUGH_REPLICAS
/// (retriable): librdkafka sends message 0 again, then message 1. Proves: three PRODUCER spans,
/// the first an error with `error.type` and no offset (the broker gave none), then offsets 0
/// and 1 without error.
#[test]
fn produce_partition_error() {
    let topic = "e2e-errors";
    let _env = preflight();
    let mut broker = KafkaBroker::start_with(&[topic], &[NOT_ENOUGH_REPLICAS]);
    let producer = KafkaProducer::start(&broker.addr, topic, 2, ProducerOptions::default());
    let producer_pid = producer.pid;
    let kspan = start_kspan(&["--pid", &producer_pid.to_string()], &[]);
    let produced = producer.go();
    let run = stop_kspan(kspan);
    broker.assert_alive();
    assert_eq!(produced.offsets, vec![0, 1], "{}", produced.stdout);
    assert_clean_run(&run);
    assert_only_kafka_spans_of(&run, &[producer_pid]);

    let producers = spans_of(&run, producer_pid, "PRODUCER");
    assert_eq!(
        producers.len(),
        3,
        "expected 3 PRODUCER spans: the failed request, its retry, the second message\n{}",
        run.dump()
    );
    let failed = producers[0];
    assert_eq!(name(failed), format!("send {topic}"), "{}", pretty(failed));
    assert_eq!(status(failed), "ERROR", "{}", pretty(failed));
    let error_type = must_str(failed, "error.type");
    assert!(!error_type.is_empty(), "{}", pretty(failed));
    let mut want = common_attrs(topic, broker.port, "send");
    want.push(("error.type", s(error_type)));
    assert_attributes(failed, &want);
    check_producer(producers[1], topic, broker.port, 0);
    check_producer(producers[2], topic, broker.port, 1);
}

/// Before its client starts, the producer process sends the broker text that is no Kafka at
/// all, then a Produce request header with a short garbage body, each on its own connection,
/// which the broker resets. Proves: neither makes a span (nor a parse error), and the
/// process's real Produce requests that follow are traced exactly: 2 PRODUCER spans.
#[test]
fn garbage_to_the_broker_makes_no_spans() {
    let topic = "e2e-garbage";
    let _env = preflight();
    let mut broker = KafkaBroker::start(&[topic]);
    let producer = KafkaProducer::start(
        &broker.addr,
        topic,
        2,
        ProducerOptions {
            garbage_first: true,
            ..Default::default()
        },
    );
    let producer_pid = producer.pid;
    let kspan = start_kspan(&["--pid", &producer_pid.to_string()], &[]);
    let produced = producer.go();
    let run = stop_kspan(kspan);
    broker.assert_alive();
    assert_eq!(produced.offsets, vec![0, 1], "{}", produced.stdout);
    assert_clean_run(&run);
    assert_only_kafka_spans_of(&run, &[producer_pid]);
    let producers = spans_of(&run, producer_pid, "PRODUCER");
    assert_eq!(
        producers.len(),
        2,
        "expected exactly the 2 real Produce requests' spans\n{}",
        run.dump()
    );
    for (i, span) in producers.iter().enumerate() {
        check_producer(span, topic, broker.port, i as i64);
    }
}
