//! Entry points of the fuzz targets (agent/fuzz, `cargo xtask fuzz`): one function per parser
//! that takes bytes from the network or the kernel, each going through the interface the
//! pipeline uses. The corpus-replay test below runs every committed corpus and crash file
//! through them in a plain `cargo test`, so a fixed crash stays fixed without a nightly build.
//!
//! Connection targets read their input as a script of syscalls (see [`Script`]): the fuzzer
//! picks the bytes, their direction, where they are split and how much the kernel captured.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;

use crate::clock::Clock;
use crate::conntrack::ProtocolState;
use crate::probes::btf::Btf;
use crate::probes::events::{self, Event};
use crate::probes::tracefs::{self, Format};
use crate::protocols::{
    self, Chunk, Direction, ParserContext, ParserOutput, Registration, SharedState,
};
use crate::spans::{self, ProducedMessages, Resource, SpanIds};
use crate::tracecontext;

/// The capture of a connection whose protocol keeps the agent's default (`--capture-bytes`).
const DEFAULT_CAPTURE: usize = kspan_common::DEFAULT_CAPTURE as usize;

/// A connection's syscalls, encoded as records `[flags: u8][len: u16 LE][len bytes]` (a short
/// last record takes what is left). Flags: bit 0, the process wrote the bytes (else it read
/// them); bit 1, the kernel's capture applies (its prefix and tail of the protocol's capture
/// size; else every byte is captured); bits 2..8, `n`: the syscall moved `97 * n` more bytes
/// than the record holds, never captured.
pub struct Script<'a> {
    rest: &'a [u8],
}

/// One syscall of a [`Script`].
pub struct Syscall<'a> {
    pub direction: Direction,
    pub bytes: &'a [u8],
    pub kernel_capture: bool,
    pub uncaptured: u64,
}

impl<'a> Script<'a> {
    pub fn new(input: &'a [u8]) -> Self {
        Script { rest: input }
    }

    /// Encodes syscalls as a script (seed corpora, tests).
    pub fn encode(syscalls: &[(Direction, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (direction, bytes) in syscalls {
            for piece in bytes.chunks(u16::MAX as usize) {
                out.push(u8::from(*direction == Direction::Egress) | 2);
                out.extend_from_slice(&(piece.len() as u16).to_le_bytes());
                out.extend_from_slice(piece);
            }
        }
        out
    }
}

impl<'a> Iterator for Script<'a> {
    type Item = Syscall<'a>;

    fn next(&mut self) -> Option<Syscall<'a>> {
        let (&flags, rest) = self.rest.split_first()?;
        let len = match rest {
            [a, b, ..] => u16::from_le_bytes([*a, *b]) as usize,
            _ => rest.len(),
        };
        let rest = rest.get(2..).unwrap_or(&[]);
        let (bytes, rest) = rest.split_at(len.min(rest.len()));
        self.rest = rest;
        Some(Syscall {
            direction: if flags & 1 != 0 {
                Direction::Egress
            } else {
                Direction::Ingress
            },
            bytes,
            kernel_capture: flags & 2 != 0,
            uncaptured: u64::from(flags >> 2) * 97,
        })
    }
}

/// What the kernel copies of a syscall that moved `bytes` on a connection of `protocol`:
/// (prefix, tail), as in probes: the whole if it fits, else the first `capture - tail` bytes
/// and the last `tail`.
fn kernel_capture<'b>(protocol: Option<&Registration>, bytes: &'b [u8]) -> (&'b [u8], &'b [u8]) {
    let capture = protocol
        .and_then(|p| p.capture_bytes)
        .map_or(DEFAULT_CAPTURE, |c| c as usize);
    let tail = protocol.map_or(0, |p| p.capture_tail as usize).min(capture);
    if bytes.len() <= capture {
        (bytes, &[])
    } else {
        (&bytes[..capture - tail], &bytes[bytes.len() - tail..])
    }
}

/// Everything an exchange meets after its parser: trace-context extraction of its request
/// starts and its protocol's span builder.
struct Downstream {
    resource: Arc<Resource>,
    clock: Clock,
    produced: ProducedMessages,
    /// Names of the spans built, in order.
    span_names: Vec<String>,
}

impl Downstream {
    fn new() -> Self {
        Downstream {
            resource: Arc::new(Resource {
                attributes: Vec::new(),
            }),
            clock: Clock::with_offset(0),
            produced: ProducedMessages::default(),
            span_names: Vec::new(),
        }
    }

    /// Drains `out` as the pipeline does after every call to a parser.
    fn drain(&mut self, out: &mut ParserOutput) {
        for start in out.request_starts.drain(..) {
            let _ = tracecontext::extract(&start.context_headers);
        }
        out.responses_started.clear();
        out.dropped.clear();
        let local = SocketAddr::from(([127, 0, 0, 1], 8080));
        let remote = SocketAddr::from(([127, 0, 0, 2], 40000));
        for exchange in out.exchanges.drain(..) {
            let ids = SpanIds {
                trace_id: [1; 16],
                span_id: [2; 8],
                parent_span_id: None,
            };
            spans::build_spans(
                &exchange,
                ids,
                (local, remote),
                &self.resource,
                &self.clock,
                &mut self.produced,
                &mut |span, _export| {
                    assert!(span.end_unix_nano >= span.start_unix_nano);
                    self.span_names.push(span.name.to_string());
                },
            );
        }
        out.counts = Default::default();
    }
}

/// Feeds a [`Script`] to a connection that starts in `protocol`'s parser, the way the pipeline
/// does: a parser that gives up mutes the connection, a protocol switch (HTTP/1 upgrade, CONNECT)
/// detects afresh, and the connection closes at the end. Returns the names of the spans built.
pub fn connection(protocol: &'static Registration, input: &[u8]) -> Vec<String> {
    let shared = Rc::new(SharedState::default());
    let context = ParserContext {
        pid: 1,
        shared: Rc::clone(&shared),
    };
    let mut state = ProtocolState::Parsing {
        protocol,
        parser: (protocol.new_parser)(&context),
    };
    let mut out = ParserOutput::default();
    let mut downstream = Downstream::new();
    let mut time = 1_000u64;
    for (n, syscall) in Script::new(input).enumerate() {
        let (data, tail) = if syscall.kernel_capture {
            kernel_capture(state.protocol(), syscall.bytes)
        } else {
            (syscall.bytes, &[][..])
        };
        let chunk = Chunk {
            direction: syscall.direction,
            data,
            tail,
            full_len: syscall.bytes.len() as u64 + syscall.uncaptured,
            start_ns: time,
            end_ns: time + 10,
            tid: 100 + (n % 3) as u32,
        };
        time += 100;
        if !chunk.data.is_empty() {
            let _ = state.detect(chunk.data, chunk.direction, 1, &shared);
        }
        let ProtocolState::Parsing { parser, .. } = &mut state else {
            continue;
        };
        parser.feed(&chunk, &mut out);
        downstream.drain(&mut out);
        let (gave_up, switched) = (parser.gave_up(), parser.switched());
        if gave_up || switched {
            let next = if gave_up {
                ProtocolState::Muted
            } else {
                ProtocolState::Undetected { attempts: 0 }
            };
            if let ProtocolState::Parsing { mut parser, .. } = std::mem::replace(&mut state, next) {
                parser.close(time, &mut out);
                downstream.drain(&mut out);
            }
        }
    }
    if let ProtocolState::Parsing { mut parser, .. } = state {
        parser.close(time + 100, &mut out);
        downstream.drain(&mut out);
    }
    downstream.span_names
}

/// The registered protocol named `name` (`http1`, `http2`, `kafka`).
pub fn registration(name: &str) -> &'static Registration {
    protocols::PROTOCOLS
        .iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no protocol {name}"))
}

pub fn http1(input: &[u8]) {
    let _ = connection(registration("http1"), input);
}

pub fn http2(input: &[u8]) {
    let _ = connection(registration("http2"), input);
}

pub fn kafka(input: &[u8]) {
    let _ = connection(registration("kafka"), input);
}

/// Reads length-prefixed fields off the front of an input.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn byte(&mut self) -> u8 {
        let (&b, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        b
    }

    /// A field of up to 255 bytes (its length first).
    fn field(&mut self) -> &'a [u8] {
        let len = usize::from(self.byte()).min(self.0.len());
        let (field, rest) = self.0.split_at(len);
        self.0 = rest;
        field
    }
}

/// HPACK integer with an `n`-bit prefix (RFC 7541 §5.1) after `first`'s high bits.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 128);
        value /= 128;
    }
    out.push(value as u8);
}

/// A header block of literal fields without indexing, new names (RFC 7541 §6.2.2).
fn hpack_block(fields: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in fields {
        block.push(0);
        hpack_int(&mut block, 0, 7, name.len());
        block.extend_from_slice(name);
        hpack_int(&mut block, 0, 7, value.len());
        block.extend_from_slice(value);
    }
    block
}

fn h2_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// One gRPC call built from fuzzer-chosen parts (path, status, message, an extra request header,
/// message bytes), framed as HTTP/2 a real peer would send it, split at fuzzer-chosen points,
/// fed to the HTTP/2 parser and built into a span: the gRPC handling past the framing
/// (content-type, trailers, Trailers-Only, grpc-status, `/service/method`) sees fuzzed values.
///
/// Input: `flags`, then fields of `[len: u8][bytes]`: path, grpc-status, grpc-message, extra
/// header name, extra header value, message; then one byte per split (a chunk of `1 + byte`).
/// Flags: bit 0, the traced process is the server; bit 1, Trailers-Only response; bit 2, the
/// stream is reset instead of finished; bit 3, no response at all.
pub fn grpc(input: &[u8]) {
    let _ = grpc_spans(input);
}

/// [`grpc`], returning the names of the spans built.
fn grpc_spans(input: &[u8]) -> Vec<String> {
    let mut fields = Fields(input);
    let flags = fields.byte();
    let path = fields.field();
    let status = fields.field();
    let message = fields.field();
    let extra_name = fields.field();
    let extra_value = fields.field();
    let body = fields.field();
    let splits = fields.0;

    const SETTINGS: u8 = 4;
    const HEADERS: u8 = 1;
    const DATA: u8 = 0;
    const RST_STREAM: u8 = 3;
    const END_STREAM: u8 = 1;
    const END_HEADERS: u8 = 4;
    let mut grpc_message = vec![0];
    grpc_message.extend_from_slice(&(body.len() as u32).to_be_bytes());
    grpc_message.extend_from_slice(body);

    let mut client = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    h2_frame(&mut client, SETTINGS, 0, 0, &[]);
    let mut request: Vec<(&[u8], &[u8])> = vec![
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path),
        (b":authority", b"127.0.0.1:50051"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ];
    if !extra_name.is_empty() {
        request.push((extra_name, extra_value));
    }
    h2_frame(&mut client, HEADERS, END_HEADERS, 1, &hpack_block(&request));
    h2_frame(&mut client, DATA, END_STREAM, 1, &grpc_message);

    let mut server = Vec::new();
    h2_frame(&mut server, SETTINGS, 0, 0, &[]);
    let trailers: [(&[u8], &[u8]); 2] = [(b"grpc-status", status), (b"grpc-message", message)];
    if flags & 8 != 0 {
        // No response: the close finishes the call.
    } else if flags & 4 != 0 {
        h2_frame(&mut server, RST_STREAM, 0, 1, &8u32.to_be_bytes());
    } else if flags & 2 != 0 {
        let mut only: Vec<(&[u8], &[u8])> =
            vec![(b":status", b"200"), (b"content-type", b"application/grpc")];
        only.extend_from_slice(&trailers);
        h2_frame(
            &mut server,
            HEADERS,
            END_HEADERS | END_STREAM,
            1,
            &hpack_block(&only),
        );
    } else {
        let headers: [(&[u8], &[u8]); 2] =
            [(b":status", b"200"), (b"content-type", b"application/grpc")];
        h2_frame(&mut server, HEADERS, END_HEADERS, 1, &hpack_block(&headers));
        h2_frame(&mut server, DATA, 0, 1, &grpc_message);
        h2_frame(
            &mut server,
            HEADERS,
            END_HEADERS | END_STREAM,
            1,
            &hpack_block(&trailers),
        );
    }

    let server_role = flags & 1 != 0;
    let (client_direction, server_direction) = if server_role {
        (Direction::Ingress, Direction::Egress)
    } else {
        (Direction::Egress, Direction::Ingress)
    };
    let mut syscalls: Vec<(Direction, &[u8])> = Vec::new();
    let mut split = splits.iter().cycle();
    for (direction, mut bytes) in [(client_direction, &client[..]), (server_direction, &server)] {
        while !bytes.is_empty() {
            let size = split.next().map_or(bytes.len(), |&b| 1 + usize::from(b));
            let (chunk, rest) = bytes.split_at(size.min(bytes.len()));
            syscalls.push((direction, chunk));
            bytes = rest;
        }
    }
    connection(registration("http2"), &Script::encode(&syscalls))
}

/// traceparent, tracestate, b3 and x-b3-* values: the input is header lines `name: value`
/// (`\n`-separated), extracted as the span builder does; each value is also parsed as a
/// traceparent and a single b3 header on its own. A traceparent that parses formats back to
/// itself.
pub fn tracecontext(input: &[u8]) {
    let text = String::from_utf8_lossy(input);
    let headers: Vec<(String, String)> = text
        .split('\n')
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
    let _ = tracecontext::extract(&headers);
    let _ = tracecontext::parse_b3_multi(&headers);
    for (_, value) in &headers {
        if let Some((context, _flags)) = tracecontext::parse_traceparent(value) {
            let formatted = tracecontext::format_traceparent(&context);
            let (again, _) = tracecontext::parse_traceparent(&formatted)
                .unwrap_or_else(|| panic!("{formatted} (from {value:?}) does not parse"));
            assert_eq!(again, context);
        }
        let _ = tracecontext::parse_b3_single(value);
    }
}

/// Kernel BTF: parsed, then every offset the probes need and a few lookups.
pub fn btf(input: &[u8]) {
    let Ok(btf) = Btf::parse(input.to_vec()) else {
        return;
    };
    let _ = btf.kernel_offsets();
    for (name, member) in [("outer", "a"), ("outer", "d"), ("sock", "sk_type")] {
        let _ = btf.member_offset(name, member);
    }
}

/// Tracefs format files: the input is parsed as one format, then as the formats of every
/// tracepoint kspan reads (sections `### category/name`, as in the tracefs fixtures).
pub fn tracefs(input: &[u8]) {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let _ = Format::parse(text);
    let read = |category: &str, name: &str| -> anyhow::Result<String> {
        let header = format!("### {category}/{name}\n");
        let start = text
            .find(&header)
            .ok_or_else(|| anyhow::anyhow!("no {category}/{name}"))?
            + header.len();
        let end = text[start..]
            .find("\n### ")
            .map_or(text.len(), |i| start + i);
        Ok(text[start..end].to_string())
    };
    let syscalls: Vec<&str> = crate::probes::syscall_tracepoints().collect();
    let _ = tracefs::tracepoint_offsets(&syscalls, &read);
}

/// A ring-buffer record: decoded; a data event's parts lie within what the syscall moved.
pub fn ring_event(input: &[u8]) {
    if let Some(Event::Data {
        header, data, tail, ..
    }) = events::decode(input)
    {
        assert!(data.len() as u64 + tail.len() as u64 <= header.full_len);
        assert_eq!(data.len() + tail.len(), header.copied_len as usize);
    }
}

/// A fuzz target's entry point.
pub type Target = fn(&[u8]);

/// Every fuzz target: (name, entry point), as agent/fuzz/fuzz_targets names them.
pub const TARGETS: &[(&str, Target)] = &[
    ("http1", http1),
    ("http2", http2),
    ("grpc", grpc),
    ("kafka", kafka),
    ("tracecontext", tracecontext),
    ("btf", btf),
    ("tracefs", tracefs),
    ("ring_event", ring_event),
];

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// Every committed corpus and crash file of every target, through its entry point: what the
    /// fuzzer found once stays fixed, in a plain `cargo test`.
    #[test]
    fn corpus_and_artifacts_replay() {
        let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        for (name, target) in TARGETS {
            let mut files = 0;
            for dir in [
                fuzz.join("corpus").join(name),
                fuzz.join("artifacts").join(name),
            ] {
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for entry in entries {
                    let path = entry.unwrap().path();
                    let input = std::fs::read(&path).unwrap();
                    let replay = std::panic::catch_unwind(|| target(&input));
                    assert!(replay.is_ok(), "{name}: {} panics", path.display());
                    files += 1;
                }
            }
            assert!(files > 0, "no corpus for the fuzz target {name}");
        }
    }

    /// The seeds go through the whole path, parsers to span builders: the harness is the real
    /// pipeline's, not a parser fed garbage from its first byte.
    #[test]
    fn seeds_become_spans() {
        let corpus = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz")
            .join("corpus");
        let spans = |protocol: &str, seed: &str| {
            let path = corpus.join(protocol).join(format!("seed-{seed}"));
            connection(registration(protocol), &std::fs::read(path).unwrap())
        };
        assert_eq!(
            spans("http1", "server_keepalive"),
            ["GET /items/*", "POST /orders"]
        );
        let get = "acc.Shop/GetItem";
        let calls = [get, get, "acc.Shop/Fail", get];
        assert_eq!(spans("http2", "grpcio_client"), calls);
        assert_eq!(spans("http2", "grpcio_server"), calls);
        assert_eq!(spans("kafka", "kcat_produce_client"), ["send kc"]);
        assert_eq!(spans("kafka", "kcat_produce_broker"), ["send kc"]);
        assert_eq!(spans("kafka", "confluent_fetch_client"), ["poll orders"]);
    }

    #[test]
    fn script_round_trips_syscalls() {
        let long = vec![7u8; 70_000];
        let encoded = Script::encode(&[(Direction::Egress, b"GET /"), (Direction::Ingress, &long)]);
        let syscalls: Vec<_> = Script::new(&encoded).collect();
        assert_eq!(syscalls.len(), 3);
        assert_eq!(syscalls[0].direction, Direction::Egress);
        assert_eq!(syscalls[0].bytes, b"GET /");
        assert!(syscalls[0].kernel_capture);
        assert_eq!(syscalls[0].uncaptured, 0);
        assert_eq!(syscalls[1].direction, Direction::Ingress);
        assert_eq!(
            syscalls[1].bytes.len() + syscalls[2].bytes.len(),
            long.len()
        );
        // A short last record takes what is left.
        let short: Vec<_> = Script::new(&[0x05, 0xff, 0xff, b'a']).collect();
        assert_eq!(short.len(), 1);
        assert_eq!(short[0].bytes, b"a");
        assert_eq!(short[0].uncaptured, 97);
    }

    #[test]
    fn grpc_target_builds_a_grpc_call_the_parser_finishes() {
        let mut input = vec![0u8];
        for field in [
            &b"/shop.Shop/GetItem"[..],
            b"0",
            b"",
            b"traceparent",
            b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            b"item",
        ] {
            input.push(field.len() as u8);
            input.extend_from_slice(field);
        }
        assert_eq!(grpc_spans(&input), ["shop.Shop/GetItem"]);
        // Split into 1-byte syscalls, server side, Trailers-Only: the same call.
        input[0] = 0b11;
        input.push(0);
        assert_eq!(grpc_spans(&input), ["shop.Shop/GetItem"]);
        let mut block = Vec::new();
        hpack_int(&mut block, 0, 7, 300);
        assert_eq!(block, [127, 173, 1]);
    }
}
