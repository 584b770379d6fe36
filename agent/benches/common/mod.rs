//! Fixtures shared by the bench binaries: a realistic keep-alive HTTP/1.1 exchange, steady gRPC
//! unary calls on one HTTP/2 connection (from grpcio's recording), steady Kafka Produce and Fetch
//! exchanges (`kafka`), ring-buffer records built exactly as the kernel writes them, a no-op
//! kernel and a counting span sink.
//! Each bench binary includes this module with `mod common;` and uses a part of it.
#![allow(dead_code)]

pub mod kafka;

use std::{hint::black_box, sync::Arc, time::Instant};

use kspan::{
    clock::Clock,
    linker::Linker,
    pipeline::{Finished, Limits, Pipeline, SpanSink},
    probes::{KernelControl, events::encode_data},
    process::{Discovery, Processes},
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
        tail: &[],
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
    fn track_connection(&mut self, _pid: u32, _fd: i32, conn_id: u64) -> u64 {
        conn_id
    }
    fn forget_connection(&mut self, _pid: u32, _fd: i32, _conn_id: u64) {}
    fn set_capture(&mut self, _pid: u32, _fd: i32, _conn_id: u64, _bytes: u32, _tail: u32) {}
    fn mute_connection(&mut self, _pid: u32, _fd: i32, _conn_id: u64) {}
    fn set_tls(&mut self, _pid: u32, _fd: i32, _conn_id: u64) {}
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
        Processes::new(Discovery::default()),
        Limits::default(),
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
    socket_record(EventKind::Accept, conn_id, LOCAL_PORT, remote_port, t)
}

/// A socket record (Accept, Connect) between two 127.0.0.1 ports.
fn socket_record(
    kind: EventKind,
    conn_id: u64,
    local_port: u16,
    remote_port: u16,
    t: u64,
) -> Vec<u8> {
    let mut loopback = [0u8; 16];
    loopback[..4].copy_from_slice(&[127, 0, 0, 1]);
    let event = SocketEvent {
        header: header(kind, conn_id, t),
        tuple: SocketTuple {
            family: AF_INET,
            local_port,
            remote_port,
            _pad: 0,
            local_addr: loopback,
            remote_addr: loopback,
        },
    };
    // SAFETY: SocketEvent is #[repr(C)] plain data without padding (64 + 40 bytes).
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

// ---------------------------------------------------------------------------------------------
// HTTP/2: gRPC unary calls on one connection, from grpcio's recording

/// grpcio 1.78.0 unary calls recorded through a relay: one line per recv(), `C <hex>` for bytes
/// the client wrote, `S <hex>` for bytes the server wrote (the parser tests' fixture).
const GRPCIO_UNARY: &str = include_str!("../../src/protocols/http2/fixtures/grpcio_unary.txt");

/// The gRPC method every benchmark call is.
pub const GRPC_PATH: &str = "/acc.Shop/GetItem";

/// The client's header block of grpcio's second call (stream 3), once the first call filled the
/// client's HPACK table (62 user-agent, 63 grpc-timeout: 10S, 64 grpc-accept-encoding, 65 te,
/// 66 content-type, 67 :authority, 68 :path): indexed c4 :path, c3 :authority, 83 :method POST,
/// 86 :scheme http, c2 content-type, c1 te, c0 grpc-accept-encoding; then grpc-timeout: 10100m
/// as a literal with incremental indexing, which shifts the table by one; then bf user-agent.
const GRPCIO_SECOND_REQUEST_BLOCK: &str =
    "c4c38386c2c1c0400c677270632d74696d656f75740631303130306dbf";

/// That block without grpc-timeout (grpc-c sends one only for calls with a deadline, each a new
/// literal with indexing): only indexed fields, so every call's block is the same and leaves the
/// table as it is. user-agent stays at 62: be.
const STEADY_REQUEST_BLOCK: &[u8] = &[0xc4, 0xc3, 0x83, 0x86, 0xc2, 0xc1, 0xc0, 0xbe];

/// The stream of grpcio's second call.
const SECOND_CALL_STREAM: u32 = 3;

const FRAME_HEADER_LEN: usize = 9;
const FRAME_HEADERS: u8 = 0x1;

fn hex(text: &str) -> Vec<u8> {
    assert!(text.len().is_multiple_of(2), "odd hex length");
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
        .collect()
}

/// (client wrote it, bytes) per recorded recv().
fn grpcio_fixture() -> Vec<(bool, Vec<u8>)> {
    GRPCIO_UNARY
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (side, bytes) = l.split_once(' ').expect("`C <hex>` or `S <hex>`");
            assert!(side == "C" || side == "S", "bad fixture line {l}");
            (side == "C", hex(bytes))
        })
        .collect()
}

/// One HTTP/2 frame of a byte string that holds whole frames.
struct Frame {
    /// Offset of its 9-byte header.
    at: usize,
    kind: u8,
    stream: u32,
    len: usize,
}

fn frames(bytes: &[u8]) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let h = &bytes[at..at + FRAME_HEADER_LEN];
        let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        frames.push(Frame {
            at,
            kind: h[3],
            stream,
            len,
        });
        at += FRAME_HEADER_LEN + len;
    }
    assert_eq!(at, bytes.len(), "the bytes end inside a frame");
    frames
}

/// grpcio's conversation, cut for a steady benchmark.
pub struct GrpcConversation {
    /// Everything before the second call, as recorded: the preface and SETTINGS, the first call
    /// (whose headers fill both directions' HPACK tables) and BDP PINGs.
    pub warm_up: Vec<(bool, Vec<u8>)>,
    /// One warm call on stream 3, as the client wrote it: HEADERS ([`STEADY_REQUEST_BLOCK`]),
    /// WINDOW_UPDATE, DATA (a 1-byte message, END_STREAM), connection WINDOW_UPDATE (51 bytes).
    pub request: Vec<u8>,
    /// Its answer as the server wrote it, unchanged from the recording: HEADERS (:status 200,
    /// content-type, grpc-accept-encoding: all indexed), DATA ("item"), trailers (grpc-status 0
    /// indexed, an empty grpc-message literal; END_STREAM), connection WINDOW_UPDATE (68 bytes).
    pub response: Vec<u8>,
}

pub fn grpc_conversation() -> GrpcConversation {
    let fixture = grpcio_fixture();
    // The client's write that starts with HEADERS on stream 3 (the first one starts with the
    // preface: not frames).
    let opens_stream = |(client, bytes): &(bool, Vec<u8>)| {
        *client
            && bytes.len() >= FRAME_HEADER_LEN
            && bytes[3] == FRAME_HEADERS
            && bytes[5..9] == SECOND_CALL_STREAM.to_be_bytes()
    };
    let second = fixture
        .iter()
        .position(opens_stream)
        .expect("grpcio's second call");
    let (client, response) = &fixture[second + 1];
    assert!(!client, "the server's answer follows the second request");
    assert!(
        frames(response)
            .iter()
            .all(|f| f.stream == 0 || f.stream == SECOND_CALL_STREAM),
        "the recv after the second request is its answer"
    );

    // The request, its header block replaced by the all-indexed one.
    let recorded = &fixture[second].1;
    let mut request = Vec::with_capacity(recorded.len());
    for frame in frames(recorded) {
        let header = &recorded[frame.at..frame.at + FRAME_HEADER_LEN];
        let payload =
            &recorded[frame.at + FRAME_HEADER_LEN..frame.at + FRAME_HEADER_LEN + frame.len];
        if frame.kind == FRAME_HEADERS {
            assert_eq!(
                payload,
                hex(GRPCIO_SECOND_REQUEST_BLOCK),
                "the fixture changed"
            );
            request.extend_from_slice(&(STEADY_REQUEST_BLOCK.len() as u32).to_be_bytes()[1..]);
            request.extend_from_slice(&header[3..]);
            request.extend_from_slice(STEADY_REQUEST_BLOCK);
        } else {
            request.extend_from_slice(header);
            request.extend_from_slice(payload);
        }
    }
    GrpcConversation {
        warm_up: fixture[..second].to_vec(),
        request,
        response: response.clone(),
    }
}

/// The traced process's end of the gRPC connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// It reads the requests (accepted connection).
    Server,
    /// It writes the requests (connected socket).
    Client,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::Server => "server",
            Side::Client => "client",
        }
    }

    /// How the traced process moves bytes the client wrote (`client`) or the server wrote.
    pub fn direction(self, client: bool) -> Direction {
        if (self == Side::Server) == client {
            Direction::Ingress
        } else {
            Direction::Egress
        }
    }
}

/// Bytes holding frames whose stream id is rewritten in place for each call.
pub struct Restream {
    pub bytes: Vec<u8>,
    /// Offsets of the stream-id fields to rewrite.
    ids: Vec<usize>,
}

impl Restream {
    /// `bytes[frames_at..]` are whole frames; those on `stream` get the ids of [`set_stream`].
    ///
    /// [`set_stream`]: Restream::set_stream
    fn new(bytes: Vec<u8>, frames_at: usize, stream: u32) -> Self {
        let ids = frames(&bytes[frames_at..])
            .iter()
            .filter(|f| f.stream == stream)
            .map(|f| frames_at + f.at + 5)
            .collect();
        Restream { bytes, ids }
    }

    fn set_stream(&mut self, id: u32) {
        for &at in &self.ids {
            self.bytes[at..at + 4].copy_from_slice(&id.to_be_bytes());
        }
    }
}

/// Steady gRPC unary calls on one connection: each [`next`] is the following call, stream id
/// + 2, as bytes (for the parser) or as ring-buffer records (for the pipeline).
///
/// [`next`]: GrpcCalls::next
pub struct GrpcCalls {
    request: Restream,
    response: Restream,
    next_stream: u32,
}

impl GrpcCalls {
    /// The calls after the warm-up, as raw bytes.
    pub fn bytes(conversation: &GrpcConversation) -> Self {
        GrpcCalls {
            request: Restream::new(conversation.request.clone(), 0, SECOND_CALL_STREAM),
            response: Restream::new(conversation.response.clone(), 0, SECOND_CALL_STREAM),
            next_stream: SECOND_CALL_STREAM,
        }
    }

    /// The calls after the warm-up, as Data records of connection `conn_id` seen from `side`:
    /// the request at 2 ms, the response 50 µs later (every call has the same times, as in the
    /// HTTP/1 keep-alive records).
    pub fn records(conversation: &GrpcConversation, side: Side, conn_id: u64) -> Self {
        let t = 2_000_000;
        let record = |client: bool, bytes: &[u8], t: u64| {
            let ingress = side.direction(client) == Direction::Ingress;
            let record = data_record(conn_id, ingress, bytes, t);
            Restream::new(record, kspan_common::EVENT_HEADER_LEN, SECOND_CALL_STREAM)
        };
        GrpcCalls {
            request: record(true, &conversation.request, t),
            response: record(false, &conversation.response, t + 50_000),
            next_stream: SECOND_CALL_STREAM,
        }
    }

    /// The next call: (stream id, request, response).
    pub fn next(&mut self) -> (u32, &[u8], &[u8]) {
        let id = self.next_stream;
        assert!(id < 1 << 31, "stream ids exhausted on the connection");
        self.next_stream += 2;
        self.request.set_stream(id);
        self.response.set_stream(id);
        (id, &self.request.bytes, &self.response.bytes)
    }
}

/// A Connect record: 127.0.0.1:`local_port` (local) → 127.0.0.1:8080.
pub fn connect_record(conn_id: u64, local_port: u16, t: u64) -> Vec<u8> {
    socket_record(EventKind::Connect, conn_id, local_port, LOCAL_PORT, t)
}

/// A pipeline that saw connection 1 opened (Accept for the server side, Connect for the client
/// side), grpcio's warm-up and `warm_calls` calls (resource cache, HPACK tables, reusable buffers
/// warm); and the calls that follow.
pub fn warm_grpc_pipeline(side: Side, warm_calls: usize) -> (BenchPipeline, GrpcCalls) {
    let conversation = grpc_conversation();
    let mut p = pipeline();
    p.handle_record(&match side {
        Side::Server => accept_record(1, REMOTE_PORT, 1_000_000),
        Side::Client => connect_record(1, REMOTE_PORT, 1_000_000),
    });
    for (i, (client, bytes)) in conversation.warm_up.iter().enumerate() {
        let ingress = side.direction(*client) == Direction::Ingress;
        p.handle_record(&data_record(
            1,
            ingress,
            bytes,
            1_100_000 + i as u64 * 10_000,
        ));
    }
    assert_eq!(p.sink().spans, 1, "grpcio's first call is one span");
    let mut calls = GrpcCalls::records(&conversation, side, 1);
    for _ in 0..warm_calls {
        let (_, request, response) = calls.next();
        p.handle_record(request);
        p.handle_record(response);
    }
    assert_eq!(
        p.sink().spans,
        1 + warm_calls as u64,
        "one span per gRPC call ({} side)",
        side.name()
    );
    (p, calls)
}
