//! Whole userspace path: recorded ring-buffer records → decode → connection table → HTTP/1
//! parser → trace-context linker → span builder → sink. The kernel is a no-op and the sink counts
//! spans (and black-boxes them) without keeping them; the events carry this process's pid, so the
//! resource is read from procfs once and then comes from the cache.
//!
//! - `keepalive`: request/response records of N requests on one accepted connection.
//! - `fresh_connection`: Accept + request + response + Close per request (connection setup and
//!   teardown included).
//!
//! `cargo bench -p kspan --bench pipeline`; after criterion, prints `BENCH <name> <value> <unit>`
//! lines from a plain timing loop.

mod common;

/// The agent's allocator (agent/src/main.rs), so the figures are the agent's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::hint::black_box;

use common::{BenchPipeline, fresh_connection_records, keepalive_records, warm_keepalive_pipeline};
use criterion::{Criterion, Throughput};

/// Requests per criterion iteration.
const BATCH: usize = 100;

fn run(pipeline: &mut BenchPipeline, records: &[Vec<u8>]) {
    for record in records {
        pipeline.handle_record(black_box(record));
    }
}

/// A pipeline that already saw the fresh-connection records once (resource cache warm).
fn warm_fresh_pipeline(records: &[Vec<u8>]) -> BenchPipeline {
    let mut p = common::pipeline();
    run(&mut p, records);
    assert_eq!(
        p.sink().spans,
        (records.len() / 4) as u64,
        "one span per connection"
    );
    p
}

fn criterion_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(BATCH as u64));

    let (accept, records) = keepalive_records(BATCH);
    let mut p = warm_keepalive_pipeline(&records, &accept);
    group.bench_function("keepalive_spans", |b| b.iter(|| run(&mut p, &records)));

    let records = fresh_connection_records(BATCH);
    let mut p = warm_fresh_pipeline(&records);
    group.bench_function("fresh_connection_spans", |b| {
        b.iter(|| run(&mut p, &records))
    });
    group.finish();
}

fn summary() {
    const REQUESTS: u64 = 200_000;
    let rounds = REQUESTS / BATCH as u64;
    println!();

    let (accept, records) = keepalive_records(BATCH);
    let mut p = warm_keepalive_pipeline(&records, &accept);
    let before = p.sink().spans;
    let secs_per_round = common::time_loop(rounds, || run(&mut p, &records));
    let spans = p.sink().spans - before;
    // time_loop warms up with rounds/10 extra rounds.
    let warm_up = rounds.div_ceil(10);
    assert_eq!(
        spans,
        (rounds + warm_up) * BATCH as u64,
        "one span per request"
    );
    let ns_per_span = secs_per_round * 1e9 / BATCH as f64;
    println!("pipeline keepalive: {ns_per_span:.0} ns/span (2 records/span)");
    common::report(
        "pipeline_keepalive_spans_per_sec",
        1e9 / ns_per_span,
        "spans/s",
    );

    let records = fresh_connection_records(BATCH);
    let mut p = warm_fresh_pipeline(&records);
    let secs_per_round = common::time_loop(rounds, || run(&mut p, &records));
    let ns_per_span = secs_per_round * 1e9 / BATCH as f64;
    println!("pipeline fresh_connection: {ns_per_span:.0} ns/span (4 records/span)");
    common::report(
        "pipeline_fresh_connection_spans_per_sec",
        1e9 / ns_per_span,
        "spans/s",
    );
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    criterion_benches(&mut c);
    c.final_summary();
    if common::bench_mode() && !common::list_mode() {
        summary();
    }
}
