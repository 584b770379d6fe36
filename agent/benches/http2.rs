//! HTTP/2 benchmarks: steady gRPC unary calls (grpcio's, from the parser tests' recording) on one
//! keep-alive connection, seen from the server (it reads the requests) and from the client.
//!
//! - `parser`: one `Http2Connection`, through `ProtocolParser` as the pipeline calls it (the
//!   output drained after every chunk). Warm-up: grpcio's preface, SETTINGS, first call and
//!   PINGs, so both HPACK tables hold the call's headers. Then each call is two chunks: the
//!   client's write (HEADERS :method POST, :scheme http, :path /acc.Shop/GetItem, :authority,
//!   content-type application/grpc, te, grpc-accept-encoding, user-agent, all indexed;
//!   WINDOW_UPDATE; DATA, END_STREAM; connection WINDOW_UPDATE) and the server's (HEADERS
//!   :status 200 and content-type; DATA; trailers with grpc-status 0, END_STREAM; connection
//!   WINDOW_UPDATE). Stream ids go up by 2 per call.
//! - `pipeline`: the same calls as ring-buffer records through the whole userspace path
//!   (decode → connection table → HTTP/2 parser → linker → span builder → counting sink), on a
//!   connection opened by an Accept (server) or a Connect (client) record.
//!
//! `cargo bench -p kspan --bench http2`; after criterion, prints `BENCH <name> <value> <unit>`
//! lines from a plain timing loop.

mod common;

/// The agent's allocator (agent/src/main.rs), so the figures are the agent's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::hint::black_box;

use common::{
    BenchPipeline, GRPC_PATH, GrpcCalls, GrpcConversation, Side, chunk, grpc_conversation,
    warm_grpc_pipeline,
};
use criterion::{Criterion, Throughput};
use kspan::protocols::{
    ParserCounts, ParserOutput, Payload, ProtocolParser, Role, http2::Http2Connection,
};

const SIDES: [Side; 2] = [Side::Server, Side::Client];

/// A warm parser on one side of the connection, the calls that follow, and the output the
/// pipeline reuses between chunks.
struct Parser {
    side: Side,
    conn: Http2Connection,
    out: ParserOutput,
    calls: GrpcCalls,
}

impl Parser {
    fn new(conversation: &GrpcConversation, side: Side) -> Self {
        let mut parser = Parser {
            side,
            conn: Http2Connection::new(),
            out: ParserOutput::default(),
            calls: GrpcCalls::bytes(conversation),
        };
        for (client, bytes) in &conversation.warm_up {
            let direction = side.direction(*client);
            ProtocolParser::feed(
                &mut parser.conn,
                &chunk(direction, bytes, 1_000_000),
                &mut parser.out,
            );
        }
        assert_eq!(parser.out.counts, ParserCounts::default());
        assert_eq!(parser.out.exchanges.len(), 1, "grpcio's first call");
        parser.out.request_starts.clear();
        parser.out.responses_started.clear();
        parser.out.exchanges.clear();
        parser
    }

    /// Feeds one syscall's bytes through the protocol interface, as the pipeline does, and
    /// drains what it drains after each chunk. Returns the exchanges completed.
    fn feed(
        conn: &mut Http2Connection,
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

    /// One call: the client's write, then the server's. Returns the exchanges completed.
    fn call(&mut self) -> usize {
        let (_, request, response) = self.calls.next();
        Self::feed(&mut self.conn, &mut self.out, true, self.side, request)
            + Self::feed(&mut self.conn, &mut self.out, false, self.side, response)
    }

    /// Checks that calls complete one right exchange each: a benchmark of a parser that lost
    /// its HPACK tables would measure nothing.
    fn check(&mut self) {
        for _ in 0..3 {
            let (id, request, response) = self.calls.next();
            for (client, bytes) in [(true, request), (false, response)] {
                let direction = self.side.direction(client);
                ProtocolParser::feed(
                    &mut self.conn,
                    &chunk(direction, bytes, 1_000_000),
                    &mut self.out,
                );
            }
            let out = std::mem::take(&mut self.out);
            let side = self.side.name();
            assert_eq!(out.counts, ParserCounts::default(), "{side}");
            assert_eq!(out.request_starts.len(), 1, "{side}");
            assert_eq!(out.responses_started, [u64::from(id)], "{side}");
            assert_eq!(out.exchanges.len(), 1, "{side}");
            let exchange = &out.exchanges[0];
            let role = match self.side {
                Side::Server => Role::Server,
                Side::Client => Role::Client,
            };
            assert_eq!(
                (exchange.id, exchange.role, exchange.error),
                (u64::from(id), role, None)
            );
            let Payload::Http(http) = &exchange.payload else {
                panic!("not HTTP: {exchange:?}");
            };
            let request = &http.request;
            assert_eq!(
                (
                    request.method.as_str(),
                    request.target.as_str(),
                    request.grpc
                ),
                ("POST", GRPC_PATH, true)
            );
            assert!(request.host.is_some() && request.user_agent.is_some());
            assert_eq!(request.body_len, 6);
            let response = http.response.as_ref().expect("a response");
            assert_eq!(
                (response.status, response.grpc_status, response.body_len),
                (200, Some(0), 9)
            );
        }
    }
}

fn criterion_benches(c: &mut Criterion, conversation: &GrpcConversation) {
    let mut group = c.benchmark_group("http2");
    group.throughput(Throughput::Elements(1));
    for side in SIDES {
        let mut parser = Parser::new(conversation, side);
        group.bench_function(format!("grpc_{}_calls", side.name()), |b| {
            b.iter(|| parser.call())
        });
    }
    for side in SIDES {
        let (mut p, mut calls) = warm_grpc_pipeline(side, 100);
        group.bench_function(format!("pipeline_grpc_{}_spans", side.name()), |b| {
            b.iter(|| pipeline_call(&mut p, &mut calls))
        });
    }
    group.finish();
}

/// One call through the whole path: the request's record, then the response's.
fn pipeline_call(p: &mut BenchPipeline, calls: &mut GrpcCalls) {
    let (_, request, response) = calls.next();
    p.handle_record(black_box(request));
    p.handle_record(black_box(response));
}

fn summary(conversation: &GrpcConversation) {
    const CALLS: u64 = 200_000;
    let warm_up = CALLS.div_ceil(10);
    println!();
    for side in SIDES {
        let name = side.name();
        let mut parser = Parser::new(conversation, side);
        let mut done = 0;
        let secs_per_call = common::time_loop(CALLS, || done += parser.call());
        assert_eq!(done as u64, CALLS + warm_up, "one exchange per call");
        println!(
            "http2 grpc {name} side: {} + {} bytes/call, {:.0} ns/call",
            conversation.request.len(),
            conversation.response.len(),
            secs_per_call * 1e9
        );
        common::report(
            &format!("http2_grpc_{name}_calls_per_sec"),
            1.0 / secs_per_call,
            "calls/s",
        );
        common::report(
            &format!("http2_grpc_{name}_ns_per_call"),
            secs_per_call * 1e9,
            "ns/call",
        );
    }
    for side in SIDES {
        let name = side.name();
        let (mut p, mut calls) = warm_grpc_pipeline(side, 100);
        let before = p.sink().spans;
        let secs_per_span = common::time_loop(CALLS, || pipeline_call(&mut p, &mut calls));
        assert_eq!(
            p.sink().spans - before,
            CALLS + warm_up,
            "one span per call"
        );
        println!(
            "pipeline http2 grpc {name} side: {:.0} ns/span (2 records/span)",
            secs_per_span * 1e9
        );
        common::report(
            &format!("pipeline_http2_{name}_spans_per_sec"),
            1.0 / secs_per_span,
            "spans/s",
        );
        common::report(
            &format!("pipeline_http2_{name}_ns_per_span"),
            secs_per_span * 1e9,
            "ns/span",
        );
    }
}

fn main() {
    let conversation = grpc_conversation();
    for side in SIDES {
        Parser::new(&conversation, side).check();
    }
    let mut c = Criterion::default().configure_from_args();
    criterion_benches(&mut c, &conversation);
    c.final_summary();
    if common::bench_mode() && !common::list_mode() {
        summary(&conversation);
    }
}
