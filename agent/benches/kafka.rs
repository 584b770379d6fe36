//! Kafka benchmarks: steady Produce and Fetch exchanges on one connection (encoded with the
//! kafka-protocol crate as librdkafka 2.16 speaks them; common/kafka.rs), seen from the client
//! (it writes the requests) and from the broker.
//!
//! - `parser`: one `KafkaParser`, through `ProtocolParser` as the pipeline calls it (the
//!   output drained after every chunk). Warm-up: the connection's Metadata exchange (v13: the
//!   topic's id → name) and, for a consumer, a Heartbeat (its group). Then each exchange is two
//!   chunks, the request and its response, correlation ids up by one:
//!   - `produce`: Produce v10, acks 1, topic "orders" partition 0, a record batch of one
//!     message (a key, a 200-byte value, a `traceparent` header); the response gives its
//!     offset (the next one each time).
//!   - `fetch_v12`: Fetch v12 (topics by name) of partition 0 from an offset; the response
//!     carries one record batch of 10 messages (those the Produce exchanges wrote, each with
//!     its `traceparent`), the offsets going on from there each time.
//!   - `fetch_v16`: the same as Fetch v16 (topics by id, named by the Metadata response).
//! - `pipeline`: the same exchanges as ring-buffer records through the whole userspace path
//!   (decode → connection table → Kafka parser → linker → span builder → counting sink), on
//!   client connections opened by Connect records:
//!   - `producer`: Produce exchanges, one PRODUCER span each (a child of its message's
//!     `traceparent`); the produced-offsets table fills up to its bound, then evicts.
//!   - `consumer`: a producer connection first writes 1000 messages (PRODUCER spans remember
//!     their offsets) and closes; then a consumer connection's Fetch v16 exchanges read them,
//!     10 per Fetch, over and over: one CONSUMER span each, with 10 links (the messages'
//!     contexts; the produced-offsets table is searched too).
//!
//! `cargo bench -p kspan --bench kafka`; after criterion, prints `BENCH <name> <value> <unit>`
//! lines from a plain timing loop.

mod common;

/// The agent's allocator (agent/src/main.rs), so the figures are the agent's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::hint::black_box;

use common::{
    BenchPipeline, Side, chunk,
    kafka::{
        CONSUMER_CLIENT_ID, FETCH_MESSAGES, GROUP, KafkaExchanges, PARTITION, PRODUCE_VERSION,
        PRODUCED, PRODUCER_CLIENT_ID, Scenario, TOPIC, TRACED, pipeline_with, side_name,
        traceparent, warm_kafka_consumer, warm_kafka_producer, warm_up,
    },
};
use criterion::{Criterion, Throughput};
use kspan::{
    protocols::{
        ParserCounts, ParserOutput, Payload, ProtocolParser, Role,
        kafka::{KafkaApi, KafkaParser},
    },
    spans::{AttributeValue, Span, SpanKind, SpanLink},
};

const SIDES: [Side; 2] = [Side::Client, Side::Server];

/// A warm parser on one side of the connection, the exchanges that follow, and the output the
/// pipeline reuses between chunks.
struct Parser {
    scenario: Scenario,
    side: Side,
    conn: KafkaParser,
    out: ParserOutput,
    exchanges: KafkaExchanges,
}

impl Parser {
    fn new(scenario: Scenario, side: Side) -> Self {
        let mut parser = Parser {
            scenario,
            side,
            conn: KafkaParser::new(),
            out: ParserOutput::default(),
            exchanges: KafkaExchanges::bytes(scenario),
        };
        for (client, bytes) in warm_up(scenario) {
            let direction = side.direction(client);
            ProtocolParser::feed(
                &mut parser.conn,
                &chunk(direction, &bytes, 1_000_000),
                &mut parser.out,
            );
        }
        assert_eq!(parser.out.counts, ParserCounts::default());
        assert!(parser.out.exchanges.is_empty(), "Metadata is no exchange");
        parser.out.request_starts.clear();
        parser.out.responses_started.clear();
        parser
    }

    /// Feeds one syscall's bytes through the protocol interface, as the pipeline does, and
    /// drains what it drains after each chunk. Returns the exchanges completed.
    fn feed(
        conn: &mut KafkaParser,
        out: &mut ParserOutput,
        client: bool,
        side: Side,
        data: &[u8],
    ) -> usize {
        ProtocolParser::feed(conn, &chunk(side.direction(client), data, 1_000_000), out);
        debug_assert_eq!(out.counts, ParserCounts::default());
        black_box(&out.request_starts);
        black_box(&out.responses_started);
        out.request_starts.clear();
        out.responses_started.clear();
        let done = out.exchanges.len();
        black_box(&out.exchanges);
        out.exchanges.clear();
        done
    }

    /// One exchange: the request, then its response. Returns the exchanges completed.
    fn exchange(&mut self) -> usize {
        let (_, _, request, response) = self.exchanges.next();
        Self::feed(&mut self.conn, &mut self.out, true, self.side, request)
            + Self::feed(&mut self.conn, &mut self.out, false, self.side, response)
    }

    /// Checks that exchanges complete one right exchange each, their messages decoded: a
    /// benchmark of a parser that skipped the records would measure nothing.
    fn check(&mut self) {
        let scenario = self.scenario;
        let messages = scenario.messages();
        for _ in 0..3 {
            let (id, offset, request, response) = self.exchanges.next();
            for (client, bytes) in [(true, request), (false, response)] {
                let direction = self.side.direction(client);
                ProtocolParser::feed(
                    &mut self.conn,
                    &chunk(direction, bytes, 1_000_000),
                    &mut self.out,
                );
            }
            let out = std::mem::take(&mut self.out);
            let what = format!("{} {}", scenario.name(), side_name(self.side));
            assert_eq!(out.counts, ParserCounts::default(), "{what}");
            assert_eq!(out.request_starts.len(), 1, "{what}");
            let start = &out.request_starts[0];
            assert_eq!((start.id, start.target.as_str()), (id as u64, TOPIC));
            if scenario == Scenario::Produce {
                let context = (
                    "traceparent".to_string(),
                    traceparent(offset as usize % TRACED),
                );
                assert_eq!(start.context_headers, [context], "{what}");
            }
            assert_eq!(out.responses_started, [id as u64], "{what}");
            assert_eq!(out.exchanges.len(), 1, "{what}");
            let exchange = &out.exchanges[0];
            let role = match self.side {
                Side::Server => Role::Server,
                Side::Client => Role::Client,
            };
            assert_eq!(
                (exchange.id, exchange.role, exchange.error),
                (id as u64, role, None),
                "{what}"
            );
            let Payload::Kafka(kafka) = &exchange.payload else {
                panic!("not Kafka: {exchange:?}");
            };
            let (api, version, client_id, group) = match scenario {
                Scenario::Produce => (KafkaApi::Produce, PRODUCE_VERSION, PRODUCER_CLIENT_ID, None),
                Scenario::Fetch(v) => (KafkaApi::Fetch, v, CONSUMER_CLIENT_ID, Some(GROUP)),
            };
            assert_eq!(
                (
                    kafka.api,
                    kafka.api_version,
                    kafka.correlation_id,
                    kafka.client_id.as_deref(),
                    kafka.group_id.as_deref(),
                    kafka.error_code,
                ),
                (api, version, id, Some(client_id), group, 0),
                "{what}"
            );
            assert!(
                kafka.response
                    && !kafka.request_cut
                    && !kafka.response_cut
                    && !kafka.entries_dropped,
                "{what}: {kafka:?}"
            );
            assert_eq!(kafka.topics.len(), 1, "{what}");
            let topic = &kafka.topics[0];
            assert_eq!(topic.name.as_deref(), Some(TOPIC), "{what}");
            assert_eq!(topic.partitions.len(), 1, "{what}");
            let partition = &topic.partitions[0];
            let last = offset + messages as i64 - 1;
            let records = &partition.records;
            assert_eq!(
                (
                    partition.index,
                    partition.error_code,
                    records.count,
                    records.batches,
                    records.first_offset,
                    records.last_offset,
                    records.cut,
                ),
                (
                    PARTITION,
                    0,
                    messages as u64,
                    1,
                    Some(offset),
                    Some(last),
                    false
                ),
                "{what}"
            );
            match scenario {
                Scenario::Produce => assert_eq!(partition.base_offset, Some(offset)),
                Scenario::Fetch(_) => assert_eq!(
                    partition.high_watermark,
                    Some(offset + FETCH_MESSAGES as i64)
                ),
            }
            assert_eq!(records.messages.len(), messages, "{what}");
            for (i, message) in records.messages.iter().enumerate() {
                let o = offset + i as i64;
                let context = ("traceparent".to_string(), traceparent(o as usize % TRACED));
                assert_eq!(
                    (message.offset, &message.context_headers[..]),
                    (o, &[context][..]),
                    "{what}"
                );
            }
        }
    }
}

fn hex<const N: usize>(text: &str) -> [u8; N] {
    std::array::from_fn(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).expect("hex"))
}

/// The trace and span ids of [`traceparent`] `context`.
fn context_ids(context: usize) -> SpanLink {
    let tp = traceparent(context);
    SpanLink {
        trace_id: hex(&tp[3..35]),
        span_id: hex(&tp[36..52]),
    }
}

fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a AttributeValue> {
    span.attributes
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// Checks what the whole path makes of the exchanges: PRODUCER spans, children of their
/// messages' contexts; CONSUMER spans with a link per message.
fn check_pipeline() {
    let mut p = pipeline_with(Vec::<Span>::new());
    warm_kafka_producer(&mut p, 20);
    let spans = std::mem::take(p.sink());
    assert_eq!(spans.len(), 20, "one PRODUCER span per Produce");
    for (offset, span) in spans.iter().enumerate() {
        let parent = context_ids(offset % TRACED);
        assert_eq!(
            (
                span.kind,
                span.name.as_str(),
                span.trace_id,
                span.parent_span_id
            ),
            (
                SpanKind::Producer,
                "send orders",
                parent.trace_id,
                Some(parent.span_id)
            )
        );
        assert_eq!(
            attribute(span, "messaging.kafka.offset"),
            Some(&AttributeValue::Int(offset as i64))
        );
        assert!(span.links.is_empty());
    }

    let mut p = pipeline_with(Vec::<Span>::new());
    warm_kafka_consumer(&mut p, 3);
    let spans = std::mem::take(p.sink());
    assert_eq!(spans.len(), PRODUCED + 3, "one CONSUMER span per Fetch");
    let links: Vec<SpanLink> = (0..FETCH_MESSAGES).map(context_ids).collect();
    for span in &spans[PRODUCED..] {
        assert_eq!(
            (span.kind, span.name.as_str(), &span.links),
            (SpanKind::Consumer, "poll orders", &links)
        );
        assert_eq!(
            attribute(span, "messaging.consumer.group.name"),
            Some(&AttributeValue::Str(GROUP.into()))
        );
        assert_eq!(
            attribute(span, "messaging.batch.message_count"),
            Some(&AttributeValue::Int(FETCH_MESSAGES as i64))
        );
    }
}

fn criterion_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("kafka");
    group.throughput(Throughput::Elements(1));
    for scenario in Scenario::ALL {
        for side in SIDES {
            let mut parser = Parser::new(scenario, side);
            group.bench_function(
                format!("{}_{}_exchanges", scenario.name(), side_name(side)),
                |b| b.iter(|| parser.exchange()),
            );
        }
    }
    let (mut p, mut exchanges) = warm_producer(100);
    group.bench_function("pipeline_producer_spans", |b| {
        b.iter(|| pipeline_exchange(&mut p, &mut exchanges))
    });
    let (mut p, mut exchanges) = warm_consumer(100);
    group.bench_function("pipeline_consumer_spans", |b| {
        b.iter(|| pipeline_exchange(&mut p, &mut exchanges))
    });
    group.finish();
}

fn warm_producer(warm: usize) -> (BenchPipeline, KafkaExchanges) {
    let mut p = common::pipeline();
    let exchanges = warm_kafka_producer(&mut p, warm);
    assert_eq!(p.sink().spans, warm as u64, "one span per Produce");
    (p, exchanges)
}

fn warm_consumer(warm: usize) -> (BenchPipeline, KafkaExchanges) {
    let mut p = common::pipeline();
    let exchanges = warm_kafka_consumer(&mut p, warm);
    assert_eq!(
        p.sink().spans,
        (PRODUCED + warm) as u64,
        "one span per Produce and per Fetch"
    );
    (p, exchanges)
}

/// One exchange through the whole path: the request's record, then the response's.
fn pipeline_exchange(p: &mut BenchPipeline, exchanges: &mut KafkaExchanges) {
    let (_, _, request, response) = exchanges.next();
    p.handle_record(black_box(request));
    p.handle_record(black_box(response));
}

fn summary() {
    const EXCHANGES: u64 = 200_000;
    // time_loop warms up with a tenth more.
    let warm = EXCHANGES.div_ceil(10);
    println!();
    for scenario in Scenario::ALL {
        for side in SIDES {
            let name = format!("{}_{}", scenario.name(), side_name(side));
            let mut parser = Parser::new(scenario, side);
            let sizes = {
                let mut sample = KafkaExchanges::bytes(scenario);
                let (_, _, request, response) = sample.next();
                (request.len(), response.len())
            };
            let mut done = 0;
            let secs = common::time_loop(EXCHANGES, || done += parser.exchange());
            assert_eq!(done as u64, EXCHANGES + warm, "one exchange per request");
            println!(
                "kafka {} {} side: {} + {} bytes/exchange ({} message{}), {:.0} ns/exchange",
                scenario.name(),
                side_name(side),
                sizes.0,
                sizes.1,
                scenario.messages(),
                if scenario.messages() == 1 { "" } else { "s" },
                secs * 1e9
            );
            common::report(
                &format!("kafka_{name}_exchanges_per_sec"),
                1.0 / secs,
                "exchanges/s",
            );
            common::report(
                &format!("kafka_{name}_ns_per_exchange"),
                secs * 1e9,
                "ns/exchange",
            );
        }
    }
    for (name, (mut p, mut exchanges)) in [
        ("producer", warm_producer(100)),
        ("consumer", warm_consumer(100)),
    ] {
        let before = p.sink().spans;
        let secs = common::time_loop(EXCHANGES, || pipeline_exchange(&mut p, &mut exchanges));
        assert_eq!(
            p.sink().spans - before,
            EXCHANGES + warm,
            "one span per exchange"
        );
        println!(
            "pipeline kafka {name}: {:.0} ns/span (2 records/span)",
            secs * 1e9
        );
        common::report(
            &format!("pipeline_kafka_{name}_spans_per_sec"),
            1.0 / secs,
            "spans/s",
        );
        common::report(
            &format!("pipeline_kafka_{name}_ns_per_span"),
            secs * 1e9,
            "ns/span",
        );
    }
}

fn main() {
    for scenario in Scenario::ALL {
        for side in SIDES {
            Parser::new(scenario, side).check();
        }
    }
    check_pipeline();
    let mut c = Criterion::default().configure_from_args();
    criterion_benches(&mut c);
    c.final_summary();
    // `--profile-time` (criterion's profiling run of one benchmark): no summary either.
    let profiling = std::env::args().any(|a| a == "--profile-time");
    if common::bench_mode() && !common::list_mode() && !profiling {
        summary();
    }
}
