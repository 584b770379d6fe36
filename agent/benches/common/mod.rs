//! Fixtures shared by the bench binaries: a realistic keep-alive HTTP/1.1 exchange, ring-buffer
//! records built exactly as the kernel writes them, a no-op kernel and a counting span sink.
//! Each bench binary includes this module with `mod common;` and uses a part of it.
#![allow(dead_code)]

use std::{hint::black_box, sync::Arc, time::Instant};

use kspan::{
    clock::Clock,
    linker::Linker,
    pipeline::{Finished, Pipeline, SpanSink},
    probes::{KernelControl, events::encode_data},
    process::{Processes, Selectors},
    protocols::{Chunk, Direction},
    stats::Stats,
    tracecontext::Sampler,
};
use kspan_common::{
    AF_INET, DIRECTION_EGRESS, DIRECTION_INGRESS, EventHeader, EventKind, SocketEvent, SocketTuple,
};

/// A browser-like GET (≈300 bytes), read by the server.
pub const REQUEST: &[u8] = b"GET /api/v1/users/12345/orders?limit=20&page=2 HTTP/1.1\r\n\
Host: shop.example.com:8080\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0\r\n\
Accept: application/json, text/plain, */*\r\n\
Accept-Language: en-US,en;q=0.5\r\n\
Accept-Encoding: gzip, deflate, br\r\n\
Connection: keep-alive\r\n\
\r\n";

/// Its 200 answer (≈200 bytes) with Content-Length and a small JSON body, written by the server.
pub const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\n\
Date: Mon, 27 Apr 2026 12:00:00 GMT\r\n\
Server: nginx/1.25.4\r\n\
Content-Type: application/json\r\n\
Content-Length: 47\r\n\
Connection: keep-alive\r\n\
\r\n\
{\"orders\":[{\"id\":981,\"total\":42.5}],\"page\":2}\r\n";

/// Requests per pipelined chunk in the pipelined variant.
pub const PIPELINED: usize = 10;

pub const FD: i32 = 7;
pub const LOCAL_PORT: u16 = 8080;
pub const REMOTE_PORT: u16 = 40000;

/// The same bytes fed one syscall per message, as [`Chunk`]s.
pub fn chunk(direction: Direction, data: &[u8], t: u64) -> Chunk<'_> {
    Chunk {
        direction,
        data,
        full_len: data.len() as u64,
        start_ns: t,
        end_ns: t + 2_000,
        tid: 4242,
    }
}

/// `n` copies of `message` back to back (a pipelined burst).
pub fn repeated(message: &[u8], n: usize) -> Vec<u8> {
    message.repeat(n)
}

/// True when run by `cargo bench` (criterion gets `--bench`); false under `cargo test --benches`,
/// where the bench binaries only smoke-test and print no figures.
pub fn bench_mode() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// True for `cargo bench -- --list`: nothing is run.
pub fn list_mode() -> bool {
    std::env::args().any(|a| a == "--list")
}

/// One machine-readable summary line (the xtask greps `^BENCH `).
pub fn report(name: &str, value: f64, unit: &str) {
    if value >= 100.0 {
        println!("BENCH {name} {value:.0} {unit}");
    } else {
        println!("BENCH {name} {value:.2} {unit}");
    }
}

/// Segments a timing loop is cut in; the median segment is reported (robust to a neighbour
/// stealing the core for a moment).
pub const SEGMENTS: u64 = 5;

/// Runs `f` `iterations.div_ceil(10)` times to warm up, then `iterations` times (a multiple of
/// [`SEGMENTS`]) in [`SEGMENTS`] timed segments. Returns the median segment's seconds per
/// iteration.
pub fn time_loop(iterations: u64, mut f: impl FnMut()) -> f64 {
    assert_eq!(iterations % SEGMENTS, 0);
    for _ in 0..iterations.div_ceil(10) {
        f();
    }
    let per_segment = iterations / SEGMENTS;
    let mut times: Vec<f64> = (0..SEGMENTS)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..per_segment {
                f();
            }
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2] / per_segment as f64
}

// ---------------------------------------------------------------------------------------------
// Whole path

/// A kernel that does nothing (no maps to update).
pub struct NoKernel;

impl KernelControl for NoKernel {
    fn trace_pid(&mut self, _pid: u32) {}
    fn untrace_pid(&mut self, _pid: u32) {}
    fn track_connection(&mut self, _pid: u32, _fd: i32, _conn_id: u64) {}
    fn forget_connection(&mut self, _pid: u32, _fd: i32) {}
    fn set_capture(&mut self, _pid: u32, _fd: i32, _bytes: u32) {}
    fn mute_connection(&mut self, _pid: u32, _fd: i32) {}
}

/// Keeps no span: counts them and hands each to `black_box` so building it is not optimized out.
#[derive(Default)]
pub struct CountingSink {
    pub spans: u64,
    pub sampled: u64,
}

impl SpanSink for CountingSink {
    fn emit(&mut self, finished: Finished) {
        self.spans += 1;
        self.sampled += u64::from(finished.sampled);
        black_box(&finished.span);
    }
}

pub type BenchPipeline = Pipeline<NoKernel, CountingSink>;

pub fn pipeline() -> BenchPipeline {
    Pipeline::new(
        NoKernel,
        CountingSink::default(),
        Processes::new(Selectors::default()),
        65_536,
        Clock::with_offset(0),
        Arc::new(Stats::default()),
        Linker::new(Sampler::default()),
    )
}

fn header(kind: EventKind, conn_id: u64, t: u64) -> EventHeader {
    let pid = std::process::id();
    EventHeader {
        kind: kind as u32,
        pid,
        tid: pid,
        fd: FD,
        conn_id,
        start_ns: t,
        end_ns: t + 2_000,
        ..Default::default()
    }
}

/// An Accept record: 127.0.0.1:8080 (local) ← 127.0.0.1:`remote_port`.
pub fn accept_record(conn_id: u64, remote_port: u16, t: u64) -> Vec<u8> {
    let mut loopback = [0u8; 16];
    loopback[..4].copy_from_slice(&[127, 0, 0, 1]);
    let event = SocketEvent {
        header: header(EventKind::Accept, conn_id, t),
        tuple: SocketTuple {
            family: AF_INET,
            local_port: LOCAL_PORT,
            remote_port,
            _pad: 0,
            local_addr: loopback,
            remote_addr: loopback,
        },
    };
    // SAFETY: SocketEvent is #[repr(C)] plain data without padding (56 + 40 bytes).
    unsafe {
        std::slice::from_raw_parts(
            (&event as *const SocketEvent).cast::<u8>(),
            size_of::<SocketEvent>(),
        )
    }
    .to_vec()
}

/// A Data record of one syscall: the process read (`ingress`) or wrote `data`.
pub fn data_record(conn_id: u64, ingress: bool, data: &[u8], t: u64) -> Vec<u8> {
    let header = EventHeader {
        full_len: data.len() as u64,
        copied_len: data.len() as u32,
        direction: if ingress {
            DIRECTION_INGRESS
        } else {
            DIRECTION_EGRESS
        },
        ..header(EventKind::Data, conn_id, t)
    };
    encode_data(&header, data)
}

pub fn close_record(conn_id: u64, t: u64) -> Vec<u8> {
    encode_data(&header(EventKind::Close, conn_id, t), &[])
}

/// Keep-alive: the Accept of connection 1, then `n` request/response record pairs on it with
/// increasing timestamps. Returns (accept, pairs flattened: request, response, request...).
pub fn keepalive_records(n: usize) -> (Vec<u8>, Vec<Vec<u8>>) {
    let accept = accept_record(1, REMOTE_PORT, 1_000_000);
    let mut records = Vec::with_capacity(2 * n);
    for i in 0..n as u64 {
        let t = 2_000_000 + i * 100_000;
        records.push(data_record(1, true, REQUEST, t));
        records.push(data_record(1, false, RESPONSE, t + 50_000));
    }
    (accept, records)
}

/// A fresh connection per request: Accept, request, response, Close, `n` times (fd 7 reused,
/// a new conn_id and client port each time).
pub fn fresh_connection_records(n: usize) -> Vec<Vec<u8>> {
    let mut records = Vec::with_capacity(4 * n);
    for i in 0..n as u64 {
        let conn_id = 100 + i;
        let t = 2_000_000 + i * 100_000;
        let port = REMOTE_PORT + (i % 20_000) as u16;
        records.push(accept_record(conn_id, port, t));
        records.push(data_record(conn_id, true, REQUEST, t + 10_000));
        records.push(data_record(conn_id, false, RESPONSE, t + 50_000));
        records.push(close_record(conn_id, t + 80_000));
    }
    records
}

/// A keep-alive pipeline with its connection accepted and the resource cache warm.
pub fn warm_keepalive_pipeline(records: &[Vec<u8>], accept: &[u8]) -> BenchPipeline {
    let mut p = pipeline();
    p.handle_record(accept);
    for record in records {
        p.handle_record(record);
    }
    let expected = (records.len() / 2) as u64;
    assert_eq!(
        p.sink().spans,
        expected,
        "the fixture must give one span per request"
    );
    p
}
