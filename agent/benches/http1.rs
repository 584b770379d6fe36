//! HTTP/1 parser micro-benchmarks: one `Http1Connection` fed a keep-alive exchange again and
//! again (as a keep-alive connection is), whole, with the request split over 3 reads, and
//! pipelined (10 requests in one read, 10 responses in one write).
//!
//! `cargo bench -p kspan --bench http1`; after criterion, prints `BENCH <name> <value> <unit>`
//! lines from a plain timing loop.

mod common;

/// The agent's allocator (agent/src/main.rs), so the figures are the agent's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::hint::black_box;

use common::{PIPELINED, REQUEST, RESPONSE, chunk, repeated};
use criterion::{Criterion, Throughput};
use kspan::protocols::{Direction, ParserOutput, ProtocolParser, http1::Http1Connection};

/// A parser plus the output the pipeline reuses between chunks.
struct Parser {
    conn: Http1Connection,
    out: ParserOutput,
}

impl Parser {
    fn new() -> Self {
        Parser {
            conn: Http1Connection::new(),
            out: ParserOutput::default(),
        }
    }

    /// Feeds one syscall's bytes through the protocol interface, as the pipeline does, and
    /// drains what it drains after each chunk. Returns the exchanges completed.
    fn feed(&mut self, direction: Direction, data: &[u8]) -> usize {
        ProtocolParser::feed(
            &mut self.conn,
            &chunk(direction, data, 1_000_000),
            &mut self.out,
        );
        debug_assert_eq!(self.out.counts.parse_errors, 0);
        black_box(&self.out.request_starts);
        black_box(&self.out.responses_started);
        self.out.request_starts.clear();
        self.out.responses_started.clear();
        let done = self.out.exchanges.len();
        black_box(&self.out.exchanges);
        self.out.exchanges.clear();
        self.out.dropped.clear();
        done
    }
}

/// The variants: name, the request's syscalls, the response's syscalls, messages per round.
struct Variant {
    name: &'static str,
    reads: Vec<Vec<u8>>,
    writes: Vec<Vec<u8>>,
    messages: u64,
}

impl Variant {
    fn bytes(&self) -> u64 {
        self.reads
            .iter()
            .chain(&self.writes)
            .map(|c| c.len() as u64)
            .sum()
    }

    /// One round trip through `parser`; the number of exchanges completed.
    fn round(&self, parser: &mut Parser) -> usize {
        let mut done = 0;
        for read in &self.reads {
            done += parser.feed(Direction::Ingress, read);
        }
        for write in &self.writes {
            done += parser.feed(Direction::Egress, write);
        }
        done
    }
}

fn variants() -> Vec<Variant> {
    let third = REQUEST.len() / 3;
    vec![
        Variant {
            name: "keepalive",
            reads: vec![REQUEST.to_vec()],
            writes: vec![RESPONSE.to_vec()],
            messages: 2,
        },
        Variant {
            name: "split3",
            reads: vec![
                REQUEST[..third].to_vec(),
                REQUEST[third..2 * third].to_vec(),
                REQUEST[2 * third..].to_vec(),
            ],
            writes: vec![RESPONSE.to_vec()],
            messages: 2,
        },
        Variant {
            name: "pipelined10",
            reads: vec![repeated(REQUEST, PIPELINED)],
            writes: vec![repeated(RESPONSE, PIPELINED)],
            messages: 2 * PIPELINED as u64,
        },
    ]
}

/// Checks that each round completes one exchange per request: a benchmark of a parser that
/// errors out would measure nothing.
fn check(variant: &Variant) {
    let mut parser = Parser::new();
    for _ in 0..3 {
        let done = variant.round(&mut parser);
        assert_eq!(
            done as u64,
            variant.messages / 2,
            "variant {}",
            variant.name
        );
    }
}

fn criterion_benches(c: &mut Criterion, variants: &[Variant]) {
    let mut group = c.benchmark_group("http1");
    for variant in variants {
        let mut parser = Parser::new();
        if variant.name == "keepalive" {
            group.throughput(Throughput::Bytes(variant.bytes()));
            group.bench_function("keepalive_bytes", |b| b.iter(|| variant.round(&mut parser)));
        }
        group.throughput(Throughput::Elements(variant.messages));
        group.bench_function(format!("{}_msgs", variant.name), |b| {
            b.iter(|| variant.round(&mut parser))
        });
    }
    group.finish();
}

fn summary(variants: &[Variant]) {
    const EXCHANGES: u64 = 200_000;
    println!();
    for variant in variants {
        let mut parser = Parser::new();
        // A pipelined round carries 10 exchanges: fewer rounds, the same number of exchanges.
        let rounds = EXCHANGES * 2 / variant.messages;
        let secs_per_round = common::time_loop(rounds, || {
            black_box(variant.round(&mut parser));
        });
        let msgs = variant.messages as f64 / secs_per_round;
        let bytes = variant.bytes() as f64 / secs_per_round;
        println!(
            "http1 {}: {} bytes/round, {:.0} ns/exchange",
            variant.name,
            variant.bytes(),
            secs_per_round * 1e9 * 2.0 / variant.messages as f64
        );
        common::report(
            &format!("http1_{}_msgs_per_sec", variant.name),
            msgs,
            "msgs/s",
        );
        common::report(
            &format!("http1_{}_bytes_per_sec", variant.name),
            bytes,
            "bytes/s",
        );
    }
}

fn main() {
    let variants = variants();
    for variant in &variants {
        check(variant);
    }
    let mut c = Criterion::default().configure_from_args();
    criterion_benches(&mut c, &variants);
    c.final_summary();
    if common::bench_mode() && !common::list_mode() {
        summary(&variants);
    }
}
