//! Heap allocations per span on the whole userspace path, and per request in the HTTP/1 parser,
//! per gRPC call in the HTTP/2 parser and per Produce or Fetch exchange in the Kafka parser
//! alone, counted by a global allocator that wraps the system one. Not a criterion benchmark:
//! a plain `harness = false` binary that prints figures.
//!
//! `cargo bench -p kspan --bench allocations`. An "allocation" is a call to alloc, alloc_zeroed
//! or realloc; "bytes" sums the sizes requested by those calls (a realloc counts its new size,
//! as dhat's total bytes do). Frees are not counted.

mod common;

use std::{
    alloc::{GlobalAlloc, Layout, System},
    hint::black_box,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

use common::{
    GrpcCalls, PIPELINED, REQUEST, RESPONSE, Side, chunk, fresh_connection_records,
    grpc_conversation,
    kafka::{KafkaExchanges, Scenario, side_name, warm_kafka_consumer, warm_kafka_producer},
    keepalive_records, repeated, warm_grpc_pipeline, warm_keepalive_pipeline,
};
use kspan::protocols::{
    Direction, ParserCounts, ParserOutput, ProtocolParser, http1::Http1Connection,
    http2::Http2Connection, kafka::KafkaParser,
};

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to System; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        BYTES.fetch_add(layout.size() as u64, Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        BYTES.fetch_add(layout.size() as u64, Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        BYTES.fetch_add(new_size as u64, Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// (allocations, bytes) made by `f`.
fn count(f: impl FnOnce()) -> (u64, u64) {
    let (a, b) = (ALLOCS.load(Relaxed), BYTES.load(Relaxed));
    f();
    (ALLOCS.load(Relaxed) - a, BYTES.load(Relaxed) - b)
}

const REQUESTS: usize = 10_000;

fn pipeline_keepalive() -> (f64, f64) {
    let (accept, records) = keepalive_records(REQUESTS);
    // Warm: accept, resource read from procfs, thread rng, reusable buffers grown.
    let mut p = warm_keepalive_pipeline(&records[..200], &accept);
    let before = p.sink().spans;
    let (allocs, bytes) = count(|| {
        for record in &records {
            p.handle_record(black_box(record));
        }
    });
    let spans = p.sink().spans - before;
    assert_eq!(spans, REQUESTS as u64);
    (allocs as f64 / spans as f64, bytes as f64 / spans as f64)
}

fn pipeline_fresh_connection() -> (f64, f64) {
    let records = fresh_connection_records(REQUESTS);
    let mut p = common::pipeline();
    for record in &records[..4 * 200] {
        p.handle_record(record);
    }
    let before = p.sink().spans;
    let (allocs, bytes) = count(|| {
        for record in &records {
            p.handle_record(black_box(record));
        }
    });
    let spans = p.sink().spans - before;
    assert_eq!(spans, REQUESTS as u64);
    (allocs as f64 / spans as f64, bytes as f64 / spans as f64)
}

/// The parser alone, fed `reads` then `writes` per round, draining what the pipeline drains.
fn parser(reads: &[&[u8]], writes: &[&[u8]], requests_per_round: usize) -> (f64, f64) {
    let mut conn = Http1Connection::new();
    let mut out = ParserOutput::default();
    let mut round = |conn: &mut Http1Connection| {
        for (direction, data) in reads
            .iter()
            .map(|d| (Direction::Ingress, d))
            .chain(writes.iter().map(|d| (Direction::Egress, d)))
        {
            ProtocolParser::feed(conn, &chunk(direction, data, 1_000_000), &mut out);
            assert_eq!(out.counts.parse_errors, 0);
            black_box(&out);
            out.request_starts.clear();
            out.responses_started.clear();
            out.exchanges.clear();
            out.dropped.clear();
        }
    };
    for _ in 0..100 {
        round(&mut conn);
    }
    let rounds = REQUESTS / requests_per_round;
    let (allocs, bytes) = count(|| {
        for _ in 0..rounds {
            round(&mut conn);
        }
    });
    let requests = (rounds * requests_per_round) as f64;
    (allocs as f64 / requests, bytes as f64 / requests)
}

/// Steady gRPC unary calls on one HTTP/2 connection through the whole path, seen from `side`.
fn pipeline_grpc(side: Side) -> (f64, f64) {
    // Warm: resource, HPACK tables, stream table and reusable buffers.
    let (mut p, mut calls) = warm_grpc_pipeline(side, 200);
    let before = p.sink().spans;
    let (allocs, bytes) = count(|| {
        for _ in 0..REQUESTS {
            let (_, request, response) = calls.next();
            p.handle_record(black_box(request));
            p.handle_record(black_box(response));
        }
    });
    let spans = p.sink().spans - before;
    assert_eq!(spans, REQUESTS as u64);
    (allocs as f64 / spans as f64, bytes as f64 / spans as f64)
}

/// The HTTP/2 parser alone, seen from `side`: grpcio's warm-up, then one call (the client's
/// write, the server's write) per round, draining what the pipeline drains.
fn parser_grpc(side: Side) -> (f64, f64) {
    let conversation = grpc_conversation();
    let mut conn = Http2Connection::new();
    let mut out = ParserOutput::default();
    let mut feed = |conn: &mut Http2Connection, client: bool, data: &[u8]| {
        ProtocolParser::feed(
            conn,
            &chunk(side.direction(client), data, 1_000_000),
            &mut out,
        );
        assert_eq!(out.counts, ParserCounts::default());
        black_box(&out);
        out.request_starts.clear();
        out.responses_started.clear();
        let done = out.exchanges.len();
        out.exchanges.clear();
        out.dropped.clear();
        done
    };
    for (client, bytes) in &conversation.warm_up {
        feed(&mut conn, *client, bytes);
    }
    let mut calls = GrpcCalls::bytes(&conversation);
    let mut round = |conn: &mut Http2Connection| {
        let (_, request, response) = calls.next();
        feed(conn, true, request) + feed(conn, false, response)
    };
    for _ in 0..100 {
        round(&mut conn);
    }
    let mut done = 0;
    let (allocs, bytes) = count(|| {
        for _ in 0..REQUESTS {
            done += round(&mut conn);
        }
    });
    assert_eq!(done, REQUESTS, "one exchange per call");
    (allocs as f64 / done as f64, bytes as f64 / done as f64)
}

/// Kafka exchanges through the whole path, on a client connection: Produce (`consumer`
/// false: PRODUCER spans) or, after a producer wrote the messages, Fetch v16 (CONSUMER spans
/// with their links).
fn pipeline_kafka(consumer: bool) -> (f64, f64) {
    // Warm: resource, topic names, group, produced-offsets table, reusable buffers.
    let mut p = common::pipeline();
    let mut exchanges = if consumer {
        warm_kafka_consumer(&mut p, 200)
    } else {
        warm_kafka_producer(&mut p, 200)
    };
    let before = p.sink().spans;
    let (allocs, bytes) = count(|| {
        for _ in 0..REQUESTS {
            let (_, _, request, response) = exchanges.next();
            p.handle_record(black_box(request));
            p.handle_record(black_box(response));
        }
    });
    let spans = p.sink().spans - before;
    assert_eq!(spans, REQUESTS as u64);
    (allocs as f64 / spans as f64, bytes as f64 / spans as f64)
}

/// The Kafka parser alone, seen from `side`: the connection's warm-up, then one exchange (the
/// request, its response) per round, draining what the pipeline drains.
fn parser_kafka(scenario: Scenario, side: Side) -> (f64, f64) {
    let mut conn = KafkaParser::new();
    let mut out = ParserOutput::default();
    let mut feed = |conn: &mut KafkaParser, client: bool, data: &[u8]| {
        ProtocolParser::feed(
            conn,
            &chunk(side.direction(client), data, 1_000_000),
            &mut out,
        );
        assert_eq!(out.counts, ParserCounts::default());
        black_box(&out);
        out.request_starts.clear();
        out.responses_started.clear();
        let done = out.exchanges.len();
        out.exchanges.clear();
        out.dropped.clear();
        done
    };
    for (client, bytes) in common::kafka::warm_up(scenario) {
        feed(&mut conn, client, &bytes);
    }
    let mut exchanges = KafkaExchanges::bytes(scenario);
    let mut round = |conn: &mut KafkaParser| {
        let (_, _, request, response) = exchanges.next();
        feed(conn, true, request) + feed(conn, false, response)
    };
    for _ in 0..100 {
        round(&mut conn);
    }
    let mut done = 0;
    let (allocs, bytes) = count(|| {
        for _ in 0..REQUESTS {
            done += round(&mut conn);
        }
    });
    assert_eq!(done, REQUESTS, "one exchange per request");
    (allocs as f64 / done as f64, bytes as f64 / done as f64)
}

fn main() {
    if common::list_mode() {
        return;
    }
    let bench = common::bench_mode();

    let (allocs, bytes) = pipeline_keepalive();
    println!(
        "allocations per span: {allocs:.1} ({bytes:.0} bytes per span), keep-alive, {REQUESTS} requests"
    );
    let (fresh_allocs, fresh_bytes) = pipeline_fresh_connection();
    println!(
        "allocations per span: {fresh_allocs:.1} ({fresh_bytes:.0} bytes per span), fresh connection per request"
    );

    let third = REQUEST.len() / 3;
    let (p_allocs, p_bytes) = parser(&[REQUEST], &[RESPONSE], 1);
    println!(
        "allocations per request (parser only): {p_allocs:.1} ({p_bytes:.0} bytes per request), keep-alive"
    );
    let (s_allocs, s_bytes) = parser(
        &[
            &REQUEST[..third],
            &REQUEST[third..2 * third],
            &REQUEST[2 * third..],
        ],
        &[RESPONSE],
        1,
    );
    println!(
        "allocations per request (parser only): {s_allocs:.1} ({s_bytes:.0} bytes per request), request split in 3 reads"
    );
    let burst_in = repeated(REQUEST, PIPELINED);
    let burst_out = repeated(RESPONSE, PIPELINED);
    let (b_allocs, b_bytes) = parser(&[&burst_in], &[&burst_out], PIPELINED);
    println!(
        "allocations per request (parser only): {b_allocs:.1} ({b_bytes:.0} bytes per request), {PIPELINED} pipelined"
    );

    let mut grpc = Vec::new();
    for side in [Side::Server, Side::Client] {
        let name = side.name();
        let (allocs, bytes) = pipeline_grpc(side);
        println!(
            "allocations per span: {allocs:.1} ({bytes:.0} bytes per span), HTTP/2 gRPC {name} side, one connection, {REQUESTS} calls"
        );
        let (p_allocs, p_bytes) = parser_grpc(side);
        println!(
            "allocations per call (HTTP/2 parser only): {p_allocs:.1} ({p_bytes:.0} bytes per call), gRPC {name} side"
        );
        grpc.push((name, allocs, bytes, p_allocs, p_bytes));
    }

    let mut kafka_pipeline = Vec::new();
    for (name, consumer) in [("producer", false), ("consumer", true)] {
        let (allocs, bytes) = pipeline_kafka(consumer);
        println!(
            "allocations per span: {allocs:.1} ({bytes:.0} bytes per span), Kafka {name} (client), one connection, {REQUESTS} exchanges"
        );
        kafka_pipeline.push((name, allocs, bytes));
    }
    let mut kafka_parser = Vec::new();
    for scenario in Scenario::ALL {
        for side in [Side::Client, Side::Server] {
            let name = format!("{}_{}", scenario.name(), side_name(side));
            let (allocs, bytes) = parser_kafka(scenario, side);
            println!(
                "allocations per exchange (Kafka parser only): {allocs:.1} ({bytes:.0} bytes per exchange), {} {} side, {} message{}",
                scenario.name(),
                side_name(side),
                scenario.messages(),
                if scenario.messages() == 1 { "" } else { "s" }
            );
            kafka_parser.push((name, allocs, bytes));
        }
    }

    if bench {
        common::report("pipeline_keepalive_allocs_per_span", allocs, "allocs/span");
        common::report("pipeline_keepalive_bytes_per_span", bytes, "bytes/span");
        common::report(
            "pipeline_fresh_connection_allocs_per_span",
            fresh_allocs,
            "allocs/span",
        );
        common::report(
            "pipeline_fresh_connection_bytes_per_span",
            fresh_bytes,
            "bytes/span",
        );
        common::report(
            "http1_parser_allocs_per_request",
            p_allocs,
            "allocs/request",
        );
        common::report("http1_parser_bytes_per_request", p_bytes, "bytes/request");
        for (name, allocs, bytes, p_allocs, p_bytes) in grpc {
            common::report(
                &format!("pipeline_http2_{name}_allocs_per_span"),
                allocs,
                "allocs/span",
            );
            common::report(
                &format!("pipeline_http2_{name}_bytes_per_span"),
                bytes,
                "bytes/span",
            );
            common::report(
                &format!("http2_parser_{name}_allocs_per_call"),
                p_allocs,
                "allocs/call",
            );
            common::report(
                &format!("http2_parser_{name}_bytes_per_call"),
                p_bytes,
                "bytes/call",
            );
        }
        for (name, allocs, bytes) in kafka_pipeline {
            common::report(
                &format!("pipeline_kafka_{name}_allocs_per_span"),
                allocs,
                "allocs/span",
            );
            common::report(
                &format!("pipeline_kafka_{name}_bytes_per_span"),
                bytes,
                "bytes/span",
            );
        }
        for (name, allocs, bytes) in kafka_parser {
            common::report(
                &format!("kafka_parser_{name}_allocs_per_exchange"),
                allocs,
                "allocs/exchange",
            );
            common::report(
                &format!("kafka_parser_{name}_bytes_per_exchange"),
                bytes,
                "bytes/exchange",
            );
        }
    }
}
