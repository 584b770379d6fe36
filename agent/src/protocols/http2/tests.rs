//! Byte-fixture tests of the HTTP/2 connection parser.

use super::connection::{GIVE_UP_AFTER, MAX_HEADER_BLOCK, MAX_STREAMS};
use super::frame::{
    CONTINUATION, DATA, END_HEADERS, END_STREAM, GOAWAY, HEADER_LEN, HEADERS, PADDED, PING,
    PREFACE, PRIORITY, PRIORITY_FLAG, PUSH_PROMISE, RST_STREAM, SETTINGS, WINDOW_UPDATE,
};
use super::{Http2Connection, REGISTRATION, detect, huffman};
use crate::protocols::http::{HttpPayload, HttpRequest, HttpResponse};
use crate::protocols::{
    Chunk, Direction, Exchange, ExchangeError, ParserContext, ParserCounts, ParserOutput, Payload,
    ProtocolParser, RequestStart, Role,
};

const RX_TID: u32 = 11;
const TX_TID: u32 = 22;
const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

fn start(k: u64) -> u64 {
    k * 1000
}

fn end(k: u64) -> u64 {
    k * 1000 + 100
}

/// Feeds chunks with automatic times: the k-th call (1-based) runs from `start(k)` to `end(k)`.
struct Harness {
    conn: Http2Connection,
    calls: u64,
    out: ParserOutput,
}

impl Harness {
    fn new() -> Self {
        Harness {
            conn: Http2Connection::new(),
            calls: 0,
            out: ParserOutput::default(),
        }
    }

    /// Feeds `data` as call number `k` (its times) without advancing the call count.
    fn feed_as(&mut self, k: u64, direction: Direction, data: &[u8], full_len: u64) {
        self.feed_chunk(k, direction, data, &[], full_len);
    }

    /// Feeds call number `k`: its first bytes `data`, its last bytes `tail`, `full_len` in all.
    fn feed_chunk(
        &mut self,
        k: u64,
        direction: Direction,
        data: &[u8],
        tail: &[u8],
        full_len: u64,
    ) {
        let chunk = Chunk {
            direction,
            data,
            tail,
            full_len,
            start_ns: start(k),
            end_ns: end(k),
            tid: match direction {
                Direction::Ingress => RX_TID,
                Direction::Egress => TX_TID,
            },
        };
        self.conn.feed(&chunk, &mut self.out);
    }

    fn feed(&mut self, direction: Direction, data: &[u8], full_len: u64) {
        self.calls += 1;
        self.feed_as(self.calls, direction, data, full_len);
    }

    /// A syscall that moved `bytes`, given as the kernel gives HTTP/2 connections: whole up to
    /// the capture, else its first 12 KiB and its last 4 KiB.
    fn syscall(&mut self, direction: Direction, bytes: &[u8]) {
        self.calls += 1;
        let (data, tail) = kernel_capture(bytes);
        self.feed_chunk(self.calls, direction, data, tail, bytes.len() as u64);
    }

    /// The process reads `data`.
    fn rx(&mut self, data: &[u8]) {
        self.feed(Direction::Ingress, data, data.len() as u64);
    }

    /// The process writes `data`.
    fn tx(&mut self, data: &[u8]) {
        self.feed(Direction::Egress, data, data.len() as u64);
    }

    fn close(&mut self) -> u64 {
        self.calls += 1;
        let t = end(self.calls);
        self.conn.close(t, &mut self.out);
        t
    }

    fn exchanges(&mut self) -> Vec<Exchange> {
        std::mem::take(&mut self.out.exchanges)
    }

    fn starts(&mut self) -> Vec<RequestStart> {
        std::mem::take(&mut self.out.request_starts)
    }

    fn responses_started(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.out.responses_started)
    }

    fn counts(&self) -> ParserCounts {
        self.out.counts
    }
}

/// What the kernel copies of a syscall that moved `bytes` on an HTTP/2 connection: (data,
/// tail).
fn kernel_capture(bytes: &[u8]) -> (&[u8], &[u8]) {
    let capture = REGISTRATION.capture_bytes.unwrap() as usize;
    let tail = REGISTRATION.capture_tail as usize;
    if bytes.len() <= capture {
        (bytes, &[])
    } else {
        (&bytes[..capture - tail], &bytes[bytes.len() - tail..])
    }
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.push(kind);
    f.push(flags);
    f.extend(stream.to_be_bytes());
    f.extend(payload);
    f
}

fn settings(entries: &[(u16, u32)]) -> Vec<u8> {
    let payload: Vec<u8> = entries
        .iter()
        .flat_map(|(id, v)| id.to_be_bytes().into_iter().chain(v.to_be_bytes()))
        .collect();
    frame(SETTINGS, 0, 0, &payload)
}

fn settings_ack() -> Vec<u8> {
    frame(SETTINGS, 1, 0, &[])
}

fn rst(stream: u32) -> Vec<u8> {
    frame(RST_STREAM, 0, stream, &8u32.to_be_bytes())
}

fn goaway(last: u32) -> Vec<u8> {
    let mut p = last.to_be_bytes().to_vec();
    p.extend(0u32.to_be_bytes());
    p.extend(b"bye");
    frame(GOAWAY, 0, 0, &p)
}

/// A gRPC message: 5-byte prefix and `n` bytes.
fn grpc_message(n: usize) -> Vec<u8> {
    let mut m = vec![0];
    m.extend((n as u32).to_be_bytes());
    m.extend(vec![b'x'; n]);
    m
}

/// One direction's HPACK encoder (loona-hpack: literal names are inserted in the dynamic
/// table, repeated fields become indexed).
struct Enc(loona_hpack::Encoder<'static>);

impl Enc {
    fn new() -> Self {
        Enc(loona_hpack::Encoder::new())
    }

    fn block(&mut self, fields: &[(&str, &str)]) -> Vec<u8> {
        self.0
            .encode(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
    }

    fn headers(&mut self, stream: u32, flags: u8, fields: &[(&str, &str)]) -> Vec<u8> {
        let block = self.block(fields);
        frame(HEADERS, flags | END_HEADERS, stream, &block)
    }
}

fn grpc_request_fields(path: &str) -> Vec<(&str, &str)> {
    vec![
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "shop:50051"),
        ("te", "trailers"),
        ("content-type", "application/grpc"),
        ("user-agent", "grpc-test/1.0"),
        ("authorization", "Bearer secret"),
        ("cookie", "a=b"),
    ]
}

fn request(method: &str, target: &str) -> HttpRequest {
    HttpRequest {
        method: method.into(),
        target: target.into(),
        version: "2",
        scheme: Some("http".into()),
        host: Some("shop:50051".into()),
        ..HttpRequest::default()
    }
}

fn grpc_request(path: &str, body_len: u64) -> HttpRequest {
    HttpRequest {
        user_agent: Some("grpc-test/1.0".into()),
        grpc: true,
        body_len,
        ..request("POST", path)
    }
}

fn response(status: u16, body_len: u64, grpc_status: Option<u32>) -> HttpResponse {
    HttpResponse {
        status,
        version: "2",
        body_len,
        grpc_status,
        fields_lost: false,
    }
}

/// `r` with some of its fields undecodable (unknown HPACK entries).
fn lost(r: HttpResponse) -> HttpResponse {
    HttpResponse {
        fields_lost: true,
        ..r
    }
}

fn http(exchange: &Exchange) -> &HttpPayload {
    let Payload::Http(http) = &exchange.payload else {
        panic!("not HTTP: {exchange:?}");
    };
    http
}

/// The bytes of a unary gRPC call on stream 1, from a connection's start: (writer, bytes) where
/// writer C is the client.
fn unary_conversation() -> Vec<(char, Vec<u8>)> {
    let mut c = Enc::new();
    let mut s = Enc::new();
    let mut fields = grpc_request_fields("/acc.Shop/GetItem");
    fields.push(("traceparent", TRACEPARENT));
    let mut preface = PREFACE.to_vec();
    preface.extend(settings(&[(2, 0), (4, 65535)]));
    let mut request = c.headers(1, 0, &fields);
    request.extend(frame(DATA, END_STREAM, 1, &grpc_message(4)));
    let mut resp = s.headers(
        1,
        0,
        &[(":status", "200"), ("content-type", "application/grpc")],
    );
    resp.extend(frame(DATA, 0, 1, &grpc_message(6)));
    resp.extend(s.headers(1, END_STREAM, &[("grpc-status", "0"), ("grpc-message", "")]));
    vec![
        ('C', preface),
        ('S', [settings(&[(5, 1 << 20)]), settings_ack()].concat()),
        ('C', [settings_ack(), request].concat()),
        ('S', resp),
    ]
}

fn direction_of(writer: char, role: Role) -> Direction {
    match (writer, role) {
        ('C', Role::Client) | ('S', Role::Server) => Direction::Egress,
        _ => Direction::Ingress,
    }
}

#[test]
fn client_unary_grpc() {
    let mut h = Harness::new();
    for (writer, bytes) in unary_conversation() {
        h.feed(
            direction_of(writer, Role::Client),
            &bytes,
            bytes.len() as u64,
        );
    }
    assert_eq!(h.conn.role(), Some(Role::Client));
    let mut expected_request = grpc_request("/acc.Shop/GetItem", 9);
    expected_request.context_headers = vec![("traceparent".into(), TRACEPARENT.into())];
    assert_eq!(
        h.starts(),
        vec![RequestStart {
            role: Role::Client,
            id: 1,
            id_on_wire: true,
            multiplexed: false,
            tid: TX_TID,
            start_ns: start(3),
            method: "POST".into(),
            target: "/acc.Shop/GetItem".into(),
            context_headers: expected_request.context_headers.clone(),
        }]
    );
    assert_eq!(h.responses_started(), vec![1]);
    assert_eq!(
        h.exchanges(),
        vec![Exchange {
            role: Role::Client,
            id: 1,
            start_ns: start(3),
            end_ns: end(4),
            request_tid: TX_TID,
            response_tid: RX_TID,
            error: None,
            payload: Payload::Http(HttpPayload {
                request: expected_request,
                response: Some(response(200, 11, Some(0))),
            }),
        }]
    );
    assert_eq!(h.counts(), ParserCounts::default());
    assert!(!h.conn.gave_up());
}

#[test]
fn server_unary_grpc() {
    let mut h = Harness::new();
    for (writer, bytes) in unary_conversation() {
        h.feed(
            direction_of(writer, Role::Server),
            &bytes,
            bytes.len() as u64,
        );
    }
    assert_eq!(h.conn.role(), Some(Role::Server));
    let starts = h.starts();
    assert_eq!(starts.len(), 1);
    assert!(starts[0].multiplexed);
    assert_eq!(
        (starts[0].role, starts[0].tid, starts[0].start_ns),
        (Role::Server, RX_TID, end(3))
    );
    let exchanges = h.exchanges();
    assert_eq!(exchanges.len(), 1);
    let e = &exchanges[0];
    assert_eq!(
        (
            e.role,
            e.id,
            e.start_ns,
            e.end_ns,
            e.request_tid,
            e.response_tid,
            e.error
        ),
        (Role::Server, 1, end(3), end(4), RX_TID, TX_TID, None)
    );
    assert_eq!(http(e).response, Some(response(200, 11, Some(0))));
    assert_eq!(h.counts(), ParserCounts::default());
}

/// Only the kept fields leave the parser: no Authorization, Cookie, te...
#[test]
fn other_header_values_are_not_kept() {
    let mut h = Harness::new();
    for (writer, bytes) in unary_conversation() {
        h.feed(
            direction_of(writer, Role::Client),
            &bytes,
            bytes.len() as u64,
        );
    }
    let text = format!("{:?} {:?}", h.exchanges(), h.conn);
    assert!(!text.contains("secret"), "{text}");
    assert!(!text.contains("a=b"), "{text}");
    assert!(!text.contains("trailers"), "{text}");
}

/// What a conversation yields, with times, for comparisons.
#[derive(Debug, PartialEq)]
struct Result {
    starts: Vec<RequestStart>,
    responses_started: Vec<u64>,
    exchanges: Vec<Exchange>,
    counts: ParserCounts,
}

/// Feeds `chunks` (call number, direction, bytes) and collects everything.
fn run(chunks: &[(u64, Direction, &[u8])]) -> Result {
    let mut h = Harness::new();
    for &(k, direction, bytes) in chunks {
        h.feed_as(k, direction, bytes, bytes.len() as u64);
    }
    Result {
        starts: h.starts(),
        responses_started: h.responses_started(),
        exchanges: h.exchanges(),
        counts: h.counts(),
    }
}

/// Feeds the conversation as is, then with each message split in two at every offset, then
/// one byte at a time: the split parts keep their message's times, so the results must be
/// identical.
fn assert_split_invariant(conversation: &[(char, Vec<u8>)], role: Role) -> Result {
    let whole: Vec<(u64, Direction, &[u8])> = conversation
        .iter()
        .enumerate()
        .map(|(i, (w, b))| (i as u64 + 1, direction_of(*w, role), &b[..]))
        .collect();
    let expected = run(&whole);
    for (i, (w, bytes)) in conversation.iter().enumerate() {
        for k in 1..bytes.len() {
            let mut chunks = whole.clone();
            let direction = direction_of(*w, role);
            chunks[i] = (i as u64 + 1, direction, &bytes[..k]);
            chunks.insert(i + 1, (i as u64 + 1, direction, &bytes[k..]));
            assert_eq!(run(&chunks), expected, "message {i} split at {k}");
        }
    }
    let bytewise: Vec<(u64, Direction, &[u8])> = whole
        .iter()
        .flat_map(|&(k, d, b)| b.chunks(1).map(move |c| (k, d, c)))
        .collect();
    assert_eq!(run(&bytewise), expected, "one byte per chunk");
    expected
}

#[test]
fn split_at_every_byte() {
    let conversation = unary_conversation();
    for role in [Role::Client, Role::Server] {
        let result = assert_split_invariant(&conversation, role);
        assert_eq!(result.exchanges.len(), 1);
        assert_eq!(result.counts, ParserCounts::default());
    }
}

#[test]
fn interleaved_streams() {
    let mut c = Enc::new();
    let mut s = Enc::new();
    let mut h = Harness::new();
    h.tx(&[PREFACE.to_vec(), settings(&[])].concat());
    let mut requests = c.headers(1, END_STREAM, &grpc_request_fields("/a/One"));
    requests.extend(c.headers(3, 0, &grpc_request_fields("/a/Two")));
    requests.extend(frame(DATA, 0, 3, &grpc_message(10)));
    h.tx(&requests);
    let starts = h.starts();
    assert_eq!(starts.iter().map(|s| s.id).collect::<Vec<_>>(), [1, 3]);
    let ok = [(":status", "200")];
    let mut responses = s.headers(3, 0, &ok);
    responses.extend(s.headers(1, 0, &ok));
    responses.extend(frame(DATA, 0, 1, &grpc_message(1)));
    responses.extend(frame(WINDOW_UPDATE, 0, 0, &100u32.to_be_bytes()));
    responses.extend(frame(PING, 0, 0, &[1; 8]));
    responses.extend(frame(DATA, END_STREAM, 3, &grpc_message(2)));
    h.rx(&responses);
    assert_eq!(h.responses_started(), [3, 1]);
    let done = h.exchanges();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].id, 3);
    assert_eq!(http(&done[0]).response, Some(response(200, 7, None)));
    // The request body of stream 3 (its END_STREAM comes later) still counts.
    h.tx(&frame(DATA, END_STREAM, 3, &grpc_message(10)));
    h.rx(&s.headers(1, END_STREAM, &[("grpc-status", "0")]));
    let done = h.exchanges();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].id, 1);
    assert_eq!(http(&done[0]).request, grpc_request("/a/One", 0));
    assert_eq!(http(&done[0]).response, Some(response(200, 6, Some(0))));
    assert_eq!(h.counts(), ParserCounts::default());
}

#[test]
fn continuation_frames() {
    let mut c = Enc::new();
    let mut h = Harness::new();
    h.tx(PREFACE);
    let block = c.block(&grpc_request_fields("/svc/Continued"));
    let (a, rest) = block.split_at(10);
    let (b, tail) = rest.split_at(7);
    let mut bytes = frame(HEADERS, END_STREAM, 1, a);
    bytes.extend(frame(CONTINUATION, 0, 1, b));
    h.tx(&bytes);
    assert!(h.starts().is_empty());
    h.tx(&frame(CONTINUATION, END_HEADERS, 1, tail));
    let starts = h.starts();
    assert_eq!(starts.len(), 1);
    // The request started with the syscall carrying the HEADERS frame.
    assert_eq!(
        (starts[0].target.as_str(), starts[0].start_ns),
        ("/svc/Continued", start(2))
    );
    // Response headers in three frames too, with END_STREAM on the HEADERS frame.
    let block = Enc::new().block(&[(":status", "404"), ("grpc-status", "5")]);
    let mut bytes = frame(HEADERS, END_STREAM, 1, &block[..1]);
    bytes.extend(frame(CONTINUATION, 0, 1, &block[1..2]));
    bytes.extend(frame(CONTINUATION, END_HEADERS, 1, &block[2..]));
    h.rx(&bytes);
    let done = h.exchanges();
    assert_eq!(done.len(), 1);
    assert_eq!(http(&done[0]).response, Some(response(404, 0, Some(5))));
    assert_eq!(h.counts(), ParserCounts::default());
}

#[test]
fn continuation_out_of_sequence_is_a_parse_error() {
    let mut c = Enc::new();
    let mut h = Harness::new();
    h.tx(PREFACE);
    let block = c.block(&grpc_request_fields("/a/B"));
    let mut bytes = frame(HEADERS, 0, 1, &block[..5]);
    bytes.extend(frame(DATA, 0, 1, b"x"));
    h.tx(&bytes);
    assert_eq!(h.counts().parse_errors, 1);
    // CONTINUATION without HEADERS: after resync, still an error.
    h.tx(&frame(CONTINUATION, END_HEADERS, 1, &block[5..]));
    assert_eq!(h.counts().parse_errors, 2);
    assert!(h.starts().is_empty());
}

#[test]
fn padding_and_priority() {
    let mut c = Enc::new();
    let mut h = Harness::new();
    h.tx(PREFACE);
    // HEADERS with PADDED and PRIORITY: pad length, 5 priority bytes, block, padding.
    let block = c.block(&grpc_request_fields("/p/Padded"));
    let mut payload = vec![3, 0x80, 0, 0, 0, 15];
    payload.extend(&block);
    payload.extend([0; 3]);
    let mut bytes = frame(HEADERS, END_HEADERS | PADDED | PRIORITY_FLAG, 1, &payload);
    // DATA with 5 bytes and 2 of padding.
    bytes.extend(frame(
        DATA,
        PADDED | END_STREAM,
        1,
        &[2, 1, 2, 3, 4, 5, 0, 0],
    ));
    // A PRIORITY frame.
    bytes.extend(frame(PRIORITY, 0, 1, &[0, 0, 0, 0, 16]));
    h.tx(&bytes);
    // Response headers with padding only; padded DATA with zero-length padding.
    let block = Enc::new().block(&[(":status", "200")]);
    let mut payload = vec![4];
    payload.extend(&block);
    payload.extend([0; 4]);
    let mut bytes = frame(HEADERS, END_HEADERS | PADDED, 1, &payload);
    bytes.extend(frame(DATA, PADDED | END_STREAM, 1, &[0, 9, 9]));
    h.rx(&bytes);
    let done = h.exchanges();
    assert_eq!(done.len(), 1);
    assert_eq!(http(&done[0]).request, grpc_request("/p/Padded", 5));
    assert_eq!(http(&done[0]).response, Some(response(200, 2, None)));
    assert_eq!(h.counts(), ParserCounts::default());
}

#[test]
fn padding_larger_than_payload_is_a_parse_error() {
    let mut h = Harness::new();
    h.tx(PREFACE);
    h.tx(&frame(DATA, PADDED, 1, &[5, 1, 2]));
    assert_eq!(h.counts().parse_errors, 1);
    let mut h = Harness::new();
    h.tx(PREFACE);
    h.tx(&frame(HEADERS, PADDED | END_HEADERS, 1, &[5, 0x82]));
    assert_eq!(h.counts().parse_errors, 1);
}

/// Hand-written HPACK: Huffman strings, never-indexed literals, literals with indexed names.
#[test]
fn huffman_and_literal_forms() {
    let huff = |s: &str| {
        let coded = huffman::encode(s.as_bytes());
        assert!(coded.len() < 127);
        let mut v = vec![0x80 | coded.len() as u8];
        v.extend(coded);
        v
    };
    let raw = |s: &str| {
        let mut v = vec![s.len() as u8];
        v.extend(s.as_bytes());
        v
    };
    let mut block = vec![0x83, 0x87]; // :method POST, :scheme https (static)
    block.push(0x04); // literal without indexing, name :path (4)
    block.extend(huff("/huff.Service/Method"));
    block.push(0x11); // never indexed, name :authority (1)
    block.extend(huff("www.example.com"));
    block.extend([0x0f, 0x2b]); // without indexing, name user-agent (58 = 15 + 43)
    block.extend(huff("curl/8.0"));
    block.push(0x10); // never indexed, literal name
    block.extend(huff("traceparent"));
    block.extend(huff(TRACEPARENT));
    block.push(0x00); // without indexing, literal name
    block.extend(raw("b3"));
    block.extend(raw("1"));
    block.push(0x10);
    block.extend(huff("authorization"));
    block.extend(huff("secret"));
    let mut h = Harness::new();
    h.tx(PREFACE);
    h.tx(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &block));
    let starts = h.starts();
    assert_eq!(starts.len(), 1);
    assert_eq!(starts[0].target, "/huff.Service/Method");
    assert_eq!(
        starts[0].context_headers,
        vec![
            ("traceparent".to_string(), TRACEPARENT.to_string()),
            ("b3".to_string(), "1".to_string())
        ]
    );
    // Response: :status 200 from a literal with a Huffman value.
    let mut resp = vec![0x08]; // without indexing, name :status (8)
    resp.extend(huff("503"));
    h.rx(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &resp));
    let done = h.exchanges();
    let request = &http(&done[0]).request;
    assert_eq!(request.scheme.as_deref(), Some("https"));
    assert_eq!(request.host.as_deref(), Some("www.example.com"));
    assert_eq!(request.user_agent.as_deref(), Some("curl/8.0"));
    assert_eq!(http(&done[0]).response, Some(response(503, 0, None)));
    assert_eq!(h.counts(), ParserCounts::default());
}

/// Hand-written HPACK: a table size update, insertions, references and evictions across
/// requests.
#[test]
fn dynamic_table_insertions_evictions_and_size_update() {
    let mut h = Harness::new();
    h.tx(PREFACE);
    // Request 1: size update to 64; :path "/a/first" inserted (45 bytes); :authority "h"
    // inserted (43 bytes): the :path entry is evicted.
    let mut b1 = vec![0x3f, 0x21, 0x83, 0x86, 0x44, 8];
    b1.extend(b"/a/first");
    b1.extend([0x41, 1, b'h']);
    h.tx(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &b1));
    // Request 2: :authority from the table (62), :path "/b" inserted (39 bytes: evicts "h").
    let mut b2 = vec![0x83, 0x86, 0xbe, 0x44, 2];
    b2.extend(b"/b");
    h.tx(&frame(HEADERS, END_HEADERS | END_STREAM, 3, &b2));
    // Request 3: :path from the table (62 is now "/b"); no authority.
    h.tx(&frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        5,
        &[0x82, 0x86, 0xbe],
    ));
    let starts = h.starts();
    let targets: Vec<&str> = starts.iter().map(|s| s.target.as_str()).collect();
    assert_eq!(targets, ["/a/first", "/b", "/b"]);
    for id in [1, 3, 5] {
        h.rx(&frame(HEADERS, END_HEADERS | END_STREAM, id, &[0x88]));
    }
    let done = h.exchanges();
    let hosts: Vec<Option<&str>> = done
        .iter()
        .map(|e| http(e).request.host.as_deref())
        .collect();
    assert_eq!(hosts, [Some("h"), Some("h"), None]);
    assert_eq!(http(&done[2]).request.method, "GET");
    assert_eq!(h.counts(), ParserCounts::default());
    // A reference to the evicted entry (63) on a connection seen from its start: unknown, and
    // the request (whose :path it is) dropped; counted once.
    h.tx(&frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        7,
        &[0x82, 0x86, 0xbf],
    ));
    assert!(h.starts().is_empty());
    assert_eq!(h.counts().desynchronised, 1);
}

/// Client side, events out of order: the response of stream 3 is read (by another thread)
/// before the write event of its request comes. The request takes the response blocks that
/// came first: one exchange, complete, no error, nothing counted.
#[test]
fn response_read_before_its_request_event() {
    let mut c = Enc::new();
    let mut s = Enc::new();
    let mut h = Harness::new();
    h.tx(PREFACE);
    h.tx(&c.headers(1, END_STREAM, &grpc_request_fields("/a/First")));
    let request3 = c.headers(3, END_STREAM, &grpc_request_fields("/a/Second"));
    let mut response3 = s.headers(
        3,
        0,
        &[(":status", "200"), ("content-type", "application/grpc")],
    );
    response3.extend(frame(DATA, 0, 3, &grpc_message(6)));
    h.rx(&response3);
    h.rx(&s.headers(3, END_STREAM, &[("grpc-status", "5")]));
    assert!(h.exchanges().is_empty());
    h.tx(&request3);
    let exchanges = h.exchanges();
    assert_eq!(exchanges.len(), 1);
    assert_eq!(exchanges[0].id, 3);
    assert_eq!(exchanges[0].error, None);
    let response = http(&exchanges[0]).response.as_ref().unwrap();
    assert_eq!((response.status, response.grpc_status), (200, Some(5)));
    assert_eq!(h.responses_started(), [3]);
    // Stream 1 is answered in order as usual.
    h.rx(&s.headers(1, END_STREAM, &[(":status", "200"), ("grpc-status", "0")]));
    assert_eq!(h.exchanges().len(), 1);
    assert_eq!(h.counts(), ParserCounts::default());
}

#[test]
fn trailers_only_and_interim_responses() {
    let mut c = Enc::new();
    let mut s = Enc::new();
    let mut h = Harness::new();
    h.tx(PREFACE);
    h.tx(&c.headers(1, END_STREAM, &grpc_request_fields("/a/Missing")));
    h.tx(&c.headers(3, END_STREAM, &grpc_request_fields("/a/Slow")));
    // Trailers-Only: one HEADERS with :status, grpc-status and END_STREAM.
    h.rx(&s.headers(
        1,
        END_STREAM,
        &[
            (":status", "200"),
            ("content-type", "application/grpc"),
            ("grpc-status", "12"),
        ],
    ));
    // Stream 3: 100 Continue first, then the final response.
    h.rx(&s.headers(3, 0, &[(":status", "100")]));
    assert_eq!(h.responses_started(), [1]);
    h.rx(&s.headers(3, 0, &[(":status", "200")]));
    assert_eq!(h.responses_started(), [3]);
    h.rx(&s.headers(3, END_STREAM, &[("grpc-status", "0")]));
    let done = h.exchanges();
    assert_eq!(http(&done[0]).response, Some(response(200, 0, Some(12))));
    assert_eq!(http(&done[1]).response, Some(response(200, 0, Some(0))));
    // The response's first byte was the 100's.
    assert_eq!(done[1].end_ns, end(7));
    assert_eq!(h.counts(), ParserCounts::default());
}

#[test]
fn rst_stream() {
    let mut c = Enc::new();
    let mut s = Enc::new();
    let mut h = Harness::new();
    h.tx(PREFACE);
    h.tx(&c.headers(1, 0, &grpc_request_fields("/a/Cancelled")));
    h.tx(&c.headers(3, 0, &grpc_request_fields("/a/Refused")));
    h.rx(&s.headers(1, 0, &[(":status", "200")]));
    // The client cancels stream 1 (response headers seen), the server resets stream 3.
    h.tx(&rst(1));
    h.rx(&rst(3));
    let done = h.exchanges();
    assert_eq!(done.len(), 2);
    assert_eq!(
        (done[0].id, done[0].error, done[0].end_ns),
        (1, Some(ExchangeError::StreamReset), end(5))
    );
    assert_eq!(http(&done[0]).response, Some(response(200, 0, None)));
    assert_eq!(
        (done[1].id, done[1].error, done[1].response_tid),
        (3, Some(ExchangeError::StreamReset), 0)
    );
    assert_eq!(http(&done[1]).response, None);
    // A reset of a finished or unknown stream does nothing.
    h.rx(&rst(1));
    h.rx(&rst(99));
    assert!(h.exchanges().is_empty());
    assert_eq!(h.counts(), ParserCounts::default());
}

#[test]
fn goaway_refuses_later_streams() {
    let mut c = Enc::new();
    let mut s = Enc::new();
    let mut h = Harness::new();
    h.tx(PREFACE);
    for id in [1, 3, 5] {
        h.tx(&c.headers(id, END_STREAM, &grpc_request_fields("/a/B")));
    }
    // The server processes up to stream 1: 3 and 5 were not processed.
    h.rx(&goaway(1));
    let done = h.exchanges();
    assert_eq!(done.iter().map(|e| e.id).collect::<Vec<_>>(), [3, 5]);
    assert!(
        done.iter()
            .all(|e| e.error == Some(ExchangeError::StreamReset) && e.end_ns == end(5))
    );
    // Stream 1 completes normally; the client's own GOAWAY changes nothing.
    h.tx(&goaway(0));
    h.rx(&s.headers(1, END_STREAM, &[(":status", "200")]));
    let done = h.exchanges();
    assert_eq!((done.len(), done[0].id, done[0].error), (1, 1, None));
    assert_eq!(h.counts(), ParserCounts::default());
}

#[test]
fn close_finishes_streams_in_flight() {
    let mut c = Enc::new();
    let mut s = Enc::new();
    let mut h = Harness::new();
    h.rx(PREFACE);
    h.rx(&c.headers(1, END_STREAM, &grpc_request_fields("/a/Answered")));
    h.rx(&c.headers(3, END_STREAM, &grpc_request_fields("/a/Waiting")));
    h.tx(&s.headers(1, 0, &[(":status", "200")]));
    h.tx(&frame(DATA, 0, 1, &grpc_message(3)));
    let t = h.close();
    let mut done = h.exchanges();
    done.sort_by_key(|e| e.id);
    assert_eq!(done.len(), 2);
    assert!(
        done.iter()
            .all(|e| e.error == Some(ExchangeError::ConnectionClosed) && e.end_ns == t)
    );
    assert_eq!(http(&done[0]).response, Some(response(200, 8, None)));
    assert_eq!(http(&done[1]).response, None);
    assert_eq!(done[0].role, Role::Server);
    // Reset: a new connection's bytes parse from scratch.
    assert_eq!(h.conn.role(), None);
    h.tx(PREFACE);
    assert_eq!(h.conn.role(), Some(Role::Client));
}

#[test]
fn role_detection() {
    let mut c = Enc::new();
    // Preface written / read.
    for (direction, role) in [
        (Direction::Egress, Role::Client),
        (Direction::Ingress, Role::Server),
    ] {
        let mut h = Harness::new();
        h.feed(direction, &PREFACE[..10], 10);
        assert_eq!(h.conn.role(), None);
        h.feed(direction, &PREFACE[10..], 14);
        assert_eq!(h.conn.role(), Some(role));
    }
    // A request written / read, no preface seen (joined late).
    let request = c.headers(
        5,
        END_STREAM,
        &[(":method", "GET"), (":path", "/x"), (":scheme", "http")],
    );
    for (direction, role) in [
        (Direction::Egress, Role::Client),
        (Direction::Ingress, Role::Server),
    ] {
        let mut h = Harness::new();
        h.feed(direction, &request, request.len() as u64);
        assert_eq!(h.conn.role(), Some(role));
        assert_eq!(h.starts()[0].id, 5);
    }
    // A response alone decides nothing; :method on an even stream is not a request.
    let mut h = Harness::new();
    h.rx(&Enc::new().headers(1, 0, &[(":status", "200")]));
    h.tx(&Enc::new().headers(2, 0, &[(":method", "GET"), (":path", "/")]));
    assert_eq!(h.conn.role(), None);
}

/// A parser created in the middle of a connection: static and literal headers decode,
/// references to entries inserted before it joined are missing, never wrong.
#[test]
fn joined_mid_connection() {
    let mut h = Harness::new();
    // The first bytes seen: a request whose :path and :authority are dynamic references.
    h.tx(&frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        41,
        &[0x83, 0x86, 0xbe, 0xbf],
    ));
    assert!(h.starts().is_empty());
    assert_eq!(h.counts().desynchronised, 1);
    // A request with a literal :path, a dynamic user-agent, and an inserted traceparent.
    let mut block = vec![0x83, 0x86, 0x04, 4];
    block.extend(b"/a/b");
    block.push(0xc5); // unknown (index 69)
    block.push(0x40);
    block.extend([11]);
    block.extend(b"traceparent");
    block.push(TRACEPARENT.len() as u8);
    block.extend(TRACEPARENT.as_bytes());
    h.tx(&frame(HEADERS, END_HEADERS | END_STREAM, 43, &block));
    let starts = h.starts();
    assert_eq!(starts.len(), 1);
    assert_eq!((starts[0].id, starts[0].target.as_str()), (43, "/a/b"));
    assert_eq!(starts[0].context_headers.len(), 1);
    // The entry inserted since is known: index 62 is traceparent; 63 is unknown.
    let mut block = vec![0x83, 0x86, 0x04, 2];
    block.extend(b"/c");
    block.extend([0xbe, 0xbf]);
    h.tx(&frame(HEADERS, END_HEADERS | END_STREAM, 45, &block));
    let starts = h.starts();
    assert_eq!(
        starts[0].context_headers,
        vec![("traceparent".into(), TRACEPARENT.into())]
    );
    // Responses: :status 200 static; a dynamic reference (say grpc-status) unknown.
    h.rx(&frame(HEADERS, END_HEADERS | END_STREAM, 43, &[0x88, 0xbe]));
    let done = h.exchanges();
    assert_eq!(http(&done[0]).response, Some(lost(response(200, 0, None))));
    // Each direction's loss counted once (the dropped request 41 was the first).
    assert_eq!(
        h.counts(),
        ParserCounts {
            desynchronised: 2,
            ..ParserCounts::default()
        }
    );
    // Responses to streams never followed are ignored.
    h.rx(&frame(HEADERS, END_HEADERS | END_STREAM, 41, &[0x88]));
    assert!(h.exchanges().is_empty());
}

/// A direction joined in the middle of a frame waits for a chunk that starts with one.
#[test]
fn joined_mid_frame() {
    let mut s = Enc::new();
    let mut h = Harness::new();
    h.rx(&[0x42; 100]); // the middle of a DATA payload
    h.tx(&Enc::new().headers(1, END_STREAM, &grpc_request_fields("/a/B")));
    h.rx(&s.headers(1, END_STREAM, &[(":status", "200")]));
    assert_eq!(h.exchanges().len(), 1);
    assert_eq!(h.counts(), ParserCounts::default());
}

#[test]
fn uncaptured_bytes_inside_data_lose_nothing() {
    let mut c = Enc::new();
    let mut s = Enc::new();
    let mut h = Harness::new();
    // The client accepts frames up to 1 MiB.
    h.tx(&[PREFACE.to_vec(), settings(&[(5, 1 << 20)])].concat());
    h.tx(&c.headers(1, END_STREAM, &grpc_request_fields("/big/Response")));
    // Headers and a 100000-byte DATA frame in one read; only 16384 bytes captured.
    let mut bytes = s.headers(1, 0, &[(":status", "200")]);
    bytes.extend(frame(DATA, 0, 1, &vec![7; 100_000]));
    let total = bytes.len() as u64;
    h.feed(Direction::Ingress, &bytes[..16384], total);
    // A padded DATA frame whose pad length byte is not captured.
    let padded = frame(DATA, PADDED, 1, &[10; 50]);
    h.feed(Direction::Ingress, &padded[..9], padded.len() as u64);
    h.rx(&s.headers(1, END_STREAM, &[("grpc-status", "0")]));
    let done = h.exchanges();
    assert_eq!(
        http(&done[0]).response,
        Some(response(200, 100_049, Some(0)))
    );
    assert_eq!(h.counts(), ParserCounts::default());
}

#[test]
fn uncaptured_frame_header_loses_framing() {
    let mut c = Enc::new();
    let mut s = Enc::new();
    let mut h = Harness::new();
    h.tx(&[PREFACE.to_vec(), settings(&[(5, 1 << 20)])].concat());
    h.tx(&c.headers(1, END_STREAM, &grpc_request_fields("/big/One")));
    h.tx(&c.headers(3, END_STREAM, &grpc_request_fields("/big/Two")));
    // A write of DATA and the trailers of stream 1 and the headers of stream 3: only the
    // first 16384 bytes captured. Stream 1's end is in the lost bytes.
    let mut bytes = s.headers(1, 0, &[(":status", "200")]);
    bytes.extend(frame(DATA, 0, 1, &vec![7; 20_000]));
    bytes.extend(s.headers(1, END_STREAM, &[("grpc-status", "0")]));
    bytes.extend(s.headers(3, 0, &[(":status", "200"), ("x-inserted", "1")]));
    h.feed(Direction::Ingress, &bytes[..16384], bytes.len() as u64);
    assert_eq!(h.counts().desynchronised, 1);
    // A chunk in the middle of something: still waiting.
    h.rx(&[0xff; 30]);
    // The next chunk starting with a frame: framing resumes. Stream 3's trailers end it; the
    // HPACK table lost the entry, never guessed.
    h.rx(&[
        frame(DATA, 0, 3, b"abc"),
        s.headers(3, END_STREAM, &[("grpc-status", "0"), ("x-inserted", "1")]),
    ]
    .concat());
    let done = h.exchanges();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].id, 3);
    // Its response headers were in the lost bytes: a response of unknown status.
    assert_eq!(http(&done[0]).response, Some(lost(response(0, 3, None))));
    assert_eq!(done[0].error, None);
    assert_eq!(h.counts().parse_errors, 0);
    // Stream 1 may have ended in the lost bytes: not reported at close.
    h.close();
    assert!(h.exchanges().is_empty());
}

#[test]
fn uncaptured_bytes_inside_a_header_block() {
    let mut c = Enc::new();
    let mut h = Harness::new();
    h.tx(PREFACE);
    // A request whose header block is partly uncaptured, followed (in the uncaptured bytes)
    // by nothing else: framing holds, the block and the HPACK table are lost.
    let long = "v".repeat(200);
    let mut fields = grpc_request_fields("/a/Lost");
    fields.push(("x-long", &long));
    let bytes = c.headers(1, END_STREAM, &fields);
    h.feed(Direction::Egress, &bytes[..50], bytes.len() as u64);
    assert!(h.starts().is_empty());
    assert_eq!(h.counts().desynchronised, 1);
    // The next request parses: static and literal fields.
    h.tx(&frame(HEADERS, END_HEADERS, 3, &[0x82, 0x86, 0x84]));
    assert_eq!(h.starts()[0].target, "/");
    assert_eq!(
        h.counts(),
        ParserCounts {
            desynchronised: 1,
            ..ParserCounts::default()
        }
    );
}

#[test]
fn header_block_over_the_bound() {
    let mut h = Harness::new();
    h.tx(PREFACE);
    // 70000 bytes of literal header: HEADERS + CONTINUATIONs of 16384.
    let mut block = vec![0x82, 0x86, 0x84, 0x00, 1, b'x', 0x7f];
    let mut len = 70_000usize - 127;
    while len >= 128 {
        block.push(0x80 | (len & 0x7f) as u8);
        len >>= 7;
    }
    block.push(len as u8);
    block.extend(vec![b'y'; 70_000]);
    let mut bytes = Vec::new();
    let pieces: Vec<&[u8]> = block.chunks(16384).collect();
    for (i, piece) in pieces.iter().enumerate() {
        let last = if i + 1 == pieces.len() {
            END_HEADERS
        } else {
            0
        };
        let kind = if i == 0 { HEADERS } else { CONTINUATION };
        bytes.extend(frame(kind, last, 1, piece));
    }
    assert!(block.len() > MAX_HEADER_BLOCK);
    for piece in bytes.chunks(16384) {
        h.tx(piece);
    }
    assert!(h.starts().is_empty());
    assert_eq!(
        h.counts(),
        ParserCounts {
            desynchronised: 1,
            limits_hit: 1,
            ..ParserCounts::default()
        }
    );
    h.tx(&frame(HEADERS, END_HEADERS, 3, &[0x82, 0x86, 0x84]));
    assert_eq!(h.starts().len(), 1);
}

#[test]
fn stream_limit() {
    let mut h = Harness::new();
    h.tx(PREFACE);
    for i in 0..(MAX_STREAMS as u32 + 10) {
        h.tx(&frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            2 * i + 1,
            &[0x82, 0x86, 0x84],
        ));
    }
    assert_eq!(h.starts().len(), MAX_STREAMS);
    assert_eq!(h.counts().limits_hit, 10);
    // Finishing one makes room.
    h.rx(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &[0x88]));
    assert_eq!(h.exchanges().len(), 1);
    h.tx(&frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        1001,
        &[0x82, 0x86, 0x84],
    ));
    assert_eq!(h.starts().len(), 1);
}

#[test]
fn streams_that_may_be_lost_make_room_first() {
    let mut h = Harness::new();
    h.tx(PREFACE);
    for i in 0..MAX_STREAMS as u32 {
        h.tx(&frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            2 * i + 1,
            &[0x82, 0x86, 0x84],
        ));
    }
    // The response direction loses framing: every open stream may have ended unseen.
    let bytes = frame(DATA, 0, 1, &[0; 100]);
    h.feed(Direction::Ingress, &bytes[..50], 200);
    assert_eq!(h.counts().desynchronised, 1);
    h.tx(&frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        9001,
        &[0x82, 0x86, 0x84],
    ));
    assert_eq!(h.starts().len(), MAX_STREAMS + 1);
    assert_eq!(h.counts().limits_hit, 0);
    // The stream dropped (the oldest) is reported, for linking to forget it.
    assert_eq!(h.out.dropped, [1]);
}

#[test]
fn garbage_resync_and_give_up() {
    let mut s = Enc::new();
    let mut h = Harness::new();
    h.tx(PREFACE);
    h.tx(&Enc::new().headers(1, END_STREAM, &grpc_request_fields("/a/B")));
    // Garbage where a frame header should be: a parse error, then resync at a frame start.
    h.rx(b"HTTP/1.1 200 OK\r\n\r\n");
    assert_eq!(h.counts().parse_errors, 1);
    h.rx(b"more garbage that is long enough");
    assert_eq!(h.counts().parse_errors, 1);
    // Stream 1 was open during the garbage; its response after the resync ends it.
    h.rx(&s.headers(1, END_STREAM, &[(":status", "200")]));
    assert_eq!(h.exchanges().len(), 1);
    assert!(!h.conn.gave_up());
    // A stream opened after the resync works.
    h.tx(&frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        3,
        &[0x82, 0x86, 0x84],
    ));
    h.rx(&frame(HEADERS, END_HEADERS | END_STREAM, 3, &[0x88]));
    assert_eq!(h.exchanges().len(), 1);
    // Garbage for good: the parser gives up after GIVE_UP_AFTER chunks in a row.
    h.rx(b"\x00\x00\x00\x00\x00\x00\x00\x00\x00 not a frame");
    assert_eq!(h.counts().parse_errors, 2);
    for i in 0..=GIVE_UP_AFTER {
        assert!(!h.conn.gave_up(), "{i}");
        h.rx(b"garbage garbage garbage");
    }
    assert!(h.conn.gave_up());
    assert_eq!(h.counts().parse_errors, 2);
}

#[test]
fn wrong_fixed_lengths_and_stream_ids_are_parse_errors() {
    for bad in [
        frame(SETTINGS, 0, 0, &[0; 5]),
        frame(SETTINGS, 0, 1, &[]),
        frame(SETTINGS, 1, 0, &[0; 6]),
        frame(PING, 0, 0, &[0; 7]),
        frame(PING, 0, 3, &[0; 8]),
        frame(RST_STREAM, 0, 1, &[0; 3]),
        frame(RST_STREAM, 0, 0, &[0; 4]),
        frame(WINDOW_UPDATE, 0, 0, &[0; 5]),
        frame(GOAWAY, 0, 0, &[0; 7]),
        frame(GOAWAY, 0, 1, &[0; 8]),
        frame(DATA, 0, 0, &[0; 4]),
        frame(HEADERS, END_HEADERS, 0, &[0x82]),
        frame(PRIORITY, 0, 1, &[0; 4]),
        frame(PUSH_PROMISE, END_HEADERS, 1, &[0; 3]),
    ] {
        let mut h = Harness::new();
        h.tx(PREFACE);
        h.tx(&bad);
        assert_eq!(h.counts().parse_errors, 1, "{bad:02x?}");
    }
    // Unknown frame types are skipped.
    let mut h = Harness::new();
    h.tx(PREFACE);
    h.tx(&frame(0x42, 0xff, 0, b"whatever"));
    h.tx(&frame(HEADERS, END_HEADERS, 1, &[0x82, 0x86, 0x84]));
    assert_eq!(h.counts(), ParserCounts::default());
    assert_eq!(h.starts().len(), 1);
}

/// On a connection seen from its start, a frame larger than the receiver's
/// SETTINGS_MAX_FRAME_SIZE breaks framing.
#[test]
fn frames_over_the_max_frame_size() {
    let mut h = Harness::new();
    h.tx(&[PREFACE.to_vec(), settings(&[(5, 20_000)])].concat());
    h.rx(&frame(DATA, 0, 1, &vec![0; 20_000]));
    assert_eq!(h.counts().parse_errors, 0);
    h.rx(&frame(DATA, 0, 1, &vec![0; 20_001]));
    assert_eq!(h.counts().parse_errors, 1);
    // The client's own frames: 16384 by default (no SETTINGS read).
    h.tx(&frame(DATA, 0, 1, &vec![0; 16_385]));
    assert_eq!(h.counts().parse_errors, 2);
    // Joined late: the limit is not known, any length goes.
    let mut h = Harness::new();
    h.rx(&frame(DATA, 0, 1, &[0; 100]));
    h.rx(&frame(DATA, 0, 1, &vec![0; 100_000]));
    assert_eq!(h.counts(), ParserCounts::default());
}

#[test]
fn extended_and_plain_connect() {
    let mut c = Enc::new();
    let mut s = Enc::new();
    let mut h = Harness::new();
    h.tx(PREFACE);
    h.tx(&c.headers(
        1,
        0,
        &[
            (":method", "CONNECT"),
            (":protocol", "websocket"),
            (":scheme", "https"),
            (":path", "/chat"),
            (":authority", "ws.example"),
        ],
    ));
    h.tx(&c.headers(
        3,
        0,
        &[(":method", "CONNECT"), (":authority", "db.internal:5432")],
    ));
    let targets: Vec<String> = h.starts().iter().map(|s| s.target.to_string()).collect();
    assert_eq!(targets, ["/chat", "db.internal:5432"]);
    h.rx(&s.headers(1, 0, &[(":status", "200")]));
    h.tx(&frame(DATA, 0, 1, b"hello"));
    h.rx(&frame(DATA, 0, 1, b"world!"));
    assert!(h.exchanges().is_empty());
    // The tunnel lasts as long as its stream.
    h.rx(&frame(DATA, END_STREAM, 1, b""));
    let done = h.exchanges();
    assert_eq!(http(&done[0]).request.method, "CONNECT");
    assert_eq!(http(&done[0]).request.body_len, 5);
    assert_eq!(http(&done[0]).response, Some(response(200, 6, None)));
}

/// PUSH_PROMISE: counted, never a request; its block goes through HPACK so the table stays in
/// sync.
#[test]
fn server_push() {
    let mut c = Enc::new();
    let mut h = Harness::new();
    h.tx(PREFACE);
    h.tx(&c.headers(
        1,
        END_STREAM,
        &[(":method", "GET"), (":scheme", "https"), (":path", "/")],
    ));
    // PUSH_PROMISE on stream 1 promising stream 2; its block inserts x-pushed: yes (62).
    let mut payload = 2u32.to_be_bytes().to_vec();
    payload.extend([0x82, 0x87, 0x44, 4]);
    payload.extend(b"/app");
    payload.extend([0x40, 8]);
    payload.extend(b"x-pushed");
    payload.extend([3]);
    payload.extend(b"yes");
    let mut bytes = frame(PUSH_PROMISE, END_HEADERS, 1, &payload);
    // The response to stream 1 uses index 63 (:path /app) and 62 (x-pushed) and inserts
    // grpc-status 7... then the pushed response on stream 2.
    let mut block = vec![0x88, 0xbe, 0xbf, 0x40, 11];
    block.extend(b"grpc-status");
    block.extend([1, b'7']);
    bytes.extend(frame(HEADERS, END_HEADERS, 1, &block));
    bytes.extend(frame(HEADERS, END_HEADERS, 2, &[0x88]));
    bytes.extend(frame(DATA, END_STREAM, 2, b"pushed body"));
    // Trailers of stream 1 refer to the entry its headers inserted.
    bytes.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &[0xbe]));
    h.rx(&bytes);
    let done = h.exchanges();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].id, 1);
    assert_eq!(http(&done[0]).response, Some(response(200, 0, Some(7))));
    assert_eq!(h.starts().len(), 1);
    assert_eq!(
        h.counts(),
        ParserCounts {
            limits_hit: 1,
            ..ParserCounts::default()
        }
    );
}

#[test]
fn settings_raise_the_frame_size_for_resync() {
    let mut s = Enc::new();
    let mut h = Harness::new();
    // The client (this process) accepts frames up to 1 MiB.
    h.tx(&[PREFACE.to_vec(), settings(&[(5, 1 << 20)])].concat());
    h.tx(&Enc::new().headers(1, END_STREAM, &grpc_request_fields("/a/B")));
    h.rx(b"garbage!!");
    assert_eq!(h.counts().parse_errors, 1);
    // A chunk starting with a 100000-byte DATA frame resynchronises.
    let mut bytes = s.headers(1, 0, &[(":status", "200")]);
    bytes.splice(0..0, frame(DATA, 0, 1, &vec![0; 100_000]));
    h.rx(&bytes);
    h.rx(&s.headers(1, END_STREAM, &[("grpc-status", "0")]));
    let done = h.exchanges();
    assert_eq!(done.len(), 1);
    assert_eq!(h.counts().parse_errors, 1);
}

#[test]
fn detection() {
    let mut c = Enc::new();
    let headers = c.headers(1, END_STREAM, &grpc_request_fields("/a/B"));
    let yes: Vec<Vec<u8>> = vec![
        PREFACE.to_vec(),
        [PREFACE.to_vec(), settings(&[(3, 100)])].concat(),
        PREFACE[..9].to_vec(),
        PREFACE[..20].to_vec(),
        settings(&[(5, 1 << 20), (0xfe03, 1)]),
        [settings(&[]), settings_ack()].concat(),
        settings_ack(),
        headers.clone(),
        [
            headers.clone(),
            frame(DATA, END_STREAM, 1, &grpc_message(3)),
        ]
        .concat(),
        // The last frame cut anywhere.
        [headers.clone(), frame(DATA, 0, 1, &[0; 100])[..20].to_vec()].concat(),
        [headers.clone(), frame(DATA, 0, 1, &[0; 100])[..4].to_vec()].concat(),
        frame(WINDOW_UPDATE, 0, 0, &1000u32.to_be_bytes()),
        frame(PING, 1, 0, &[1; 8]),
        goaway(7),
        rst(3),
        frame(DATA, PADDED, 3, &[2, 1, 0, 0]),
    ];
    for data in &yes {
        assert!(detect(data, Direction::Ingress), "{data:02x?}");
        assert!(
            (REGISTRATION.detect)(data, Direction::Egress),
            "{data:02x?}"
        );
    }
    let kafka_api_versions: Vec<u8> = {
        // ApiVersions v3: api key 18, version 3, correlation id 1, client id "kcat", then the
        // flexible-version body (client software name and version, tagged fields).
        let mut body = vec![0, 18, 0, 3, 0, 0, 0, 1, 0, 4];
        body.extend(b"kcat");
        body.extend([0, 8]);
        body.extend(b"librdkafka");
        body.extend([7]);
        body.extend(b"2.16.0");
        body.push(0);
        let mut m = (body.len() as u32).to_be_bytes().to_vec();
        m.extend(body);
        m
    };
    let tls_client_hello: Vec<u8> = {
        let mut m = vec![
            0x16, 0x03, 0x01, 0x00, 0xf4, 0x01, 0x00, 0x00, 0xf0, 0x03, 0x03,
        ];
        m.extend([0x5a; 32]);
        m.extend([0x20; 33]);
        m
    };
    let no: Vec<Vec<u8>> = vec![
        vec![],
        b"PRI".to_vec(),
        PREFACE[..8].to_vec(),
        b"PRI * HTTP/1.1\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(),
        b"POST /api HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}".to_vec(),
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_vec(),
        b"HTTP/2 200".to_vec(),
        tls_client_hello,
        vec![0x17, 0x03, 0x03, 0x00, 0x20, 1, 2, 3, 4, 5, 6, 7],
        kafka_api_versions,
        vec![0; 9],
        vec![0; 64],
        frame(DATA, 0, 0, &[1, 2]),
        frame(SETTINGS, 0, 1, &[]),
        frame(SETTINGS, 0, 0, &[0; 7]),
        frame(SETTINGS, 0, 0, &[0, 5, 0, 0, 0, 1]), // MAX_FRAME_SIZE 1
        frame(SETTINGS, 0x2, 0, &[]),               // undefined flag
        frame(PING, 0, 0, &[0; 7]),
        frame(WINDOW_UPDATE, 0, 0, &[0; 4]), // increment 0
        frame(0x0a, 0, 0, &[]),              // ALTSVC and other extension types
        frame(DATA, 0, 0x8000_0001, &[1]),   // reserved bit
        frame(DATA, 0, 1, &vec![0; 20_000]), // over 16384
        frame(DATA, PADDED, 1, &[9, 1]),     // padding past the payload
        [settings(&[]), b"garbage after".to_vec()].concat(),
    ];
    for data in &no {
        assert!(!detect(data, Direction::Ingress), "{data:02x?}");
    }
    // Random bytes.
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    let mut detected = 0;
    for _ in 0..20_000 {
        let len = 9 + rng.below(120) as usize;
        let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        detected += usize::from(detect(&data, Direction::Ingress));
    }
    assert_eq!(detected, 0);
}

/// xorshift64: deterministic pseudo-random numbers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Random chunks, random uncaptured lengths, and real conversations with random corruption:
/// no panic, and the parser's bounds hold.
#[test]
fn no_panic_on_random_input() {
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let conversation = unary_conversation();
    let fixture = grpcio_fixture();
    for round in 0..3000 {
        let mut h = Harness::new();
        if round % 3 == 0 {
            h.tx(PREFACE);
        }
        for _ in 0..(1 + rng.below(8)) {
            let mut data: Vec<u8> = match rng.below(4) {
                0 => {
                    let len = rng.below(200) as usize;
                    (0..len).map(|_| rng.next() as u8).collect()
                }
                1 => {
                    // A frame header with random fields and a random payload.
                    let kind = rng.below(12) as u8;
                    let flags = rng.next() as u8;
                    let stream = rng.below(8) as u32;
                    let len = rng.below(40) as usize;
                    let payload: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                    frame(kind, flags, stream, &payload)
                }
                2 => conversation[rng.below(conversation.len() as u64) as usize]
                    .1
                    .clone(),
                _ => fixture[rng.below(fixture.len() as u64) as usize].1.clone(),
            };
            // Corrupt a few bytes.
            for _ in 0..rng.below(3) {
                if !data.is_empty() {
                    let i = rng.below(data.len() as u64) as usize;
                    data[i] = rng.next() as u8;
                }
            }
            let cut = rng.below(data.len() as u64 + 1) as usize;
            let full_len = data.len() as u64 + rng.below(3) * rng.below(70_000);
            let direction = if rng.below(2) == 0 {
                Direction::Ingress
            } else {
                Direction::Egress
            };
            // A tail: the end of the bytes, after a gap (some of them, and maybe more).
            let tail_start = cut + rng.below((data.len() - cut) as u64 + 1) as usize;
            let tail = if rng.below(3) == 0 {
                &data[tail_start..]
            } else {
                &[]
            };
            h.calls += 1;
            h.feed_chunk(h.calls, direction, &data[..cut], tail, full_len);
        }
        h.close();
        assert!(h.out.request_starts.len() <= 1000);
    }
}

/// The recorded grpcio conversation: (writer, bytes) per recv().
fn grpcio_fixture() -> Vec<(char, Vec<u8>)> {
    include_str!("fixtures/grpcio_unary.txt")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (side, hex) = l.split_once(' ').unwrap();
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            (side.chars().next().unwrap(), bytes)
        })
        .collect()
}

fn assert_grpcio_result(result: &Result, role: Role) {
    assert_eq!(result.counts, ParserCounts::default());
    let ids: Vec<u64> = result.starts.iter().map(|s| s.id).collect();
    assert_eq!(ids, [1, 3, 5, 7]);
    assert_eq!(result.responses_started, [1, 3, 5, 7]);
    type Summary<'a> = (u64, &'a str, &'a str, bool, Option<u16>, Option<u32>, usize);
    let summary: Vec<Summary> = result
        .exchanges
        .iter()
        .map(|e| {
            let h = http(e);
            let r = h.response.as_ref();
            (
                e.id,
                h.request.method.as_str(),
                h.request.target.as_str(),
                h.request.grpc,
                r.map(|r| r.status),
                r.and_then(|r| r.grpc_status),
                h.request.context_headers.len(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (1, "POST", "/acc.Shop/GetItem", true, Some(200), Some(0), 0),
            (3, "POST", "/acc.Shop/GetItem", true, Some(200), Some(0), 0),
            (5, "POST", "/acc.Shop/Fail", true, Some(200), Some(13), 0),
            (7, "POST", "/acc.Shop/GetItem", true, Some(200), Some(0), 1),
        ]
    );
    for e in &result.exchanges {
        assert_eq!(e.role, role);
        assert_eq!(e.error, None);
        let h = http(e);
        assert_eq!(h.request.version, "2");
        assert_eq!(h.request.scheme.as_deref(), Some("http"));
        assert!(h.request.host.as_deref().unwrap().starts_with("127.0.0.1:"));
        assert!(
            h.request
                .user_agent
                .as_deref()
                .unwrap()
                .starts_with("grpc-python/1.78.0")
        );
        // Each request is a 1-byte message (5 + 1), each response "item" (5 + 4) but Fail's.
        assert_eq!(h.request.body_len, 6);
        let body = if h.request.target == "/acc.Shop/Fail" {
            0
        } else {
            9
        };
        assert_eq!(h.response.as_ref().unwrap().body_len, body);
        assert!(e.start_ns < e.end_ns);
    }
    assert_eq!(
        http(&result.exchanges[3]).request.context_headers,
        vec![("traceparent".into(), TRACEPARENT.into())]
    );
}

#[test]
fn grpcio_recording_client_side() {
    let fixture = grpcio_fixture();
    let result = assert_split_invariant(&fixture, Role::Client);
    assert_grpcio_result(&result, Role::Client);
}

#[test]
fn grpcio_recording_server_side() {
    let fixture = grpcio_fixture();
    let result = assert_split_invariant(&fixture, Role::Server);
    assert_grpcio_result(&result, Role::Server);
    assert!(result.starts.iter().all(|s| s.multiplexed && s.id_on_wire));
}

/// The recording joined after its first request was written: the :path of calls 2 and 4 is a
/// dynamic reference to an entry inserted before, so those requests are dropped and counted;
/// call 3's :path is a new literal. Nothing wrong comes out.
#[test]
fn grpcio_recording_joined_late() {
    let fixture = grpcio_fixture();
    let first_request = fixture
        .iter()
        .position(|(w, b)| *w == 'C' && b.len() > 9 && b[3] == HEADERS)
        .unwrap();
    let mut h = Harness::new();
    for (w, b) in &fixture[first_request + 1..] {
        h.feed(direction_of(*w, Role::Client), b, b.len() as u64);
    }
    let starts = h.starts();
    assert_eq!(starts.len(), 1);
    assert_eq!(
        (starts[0].id, starts[0].target.as_str()),
        (5, "/acc.Shop/Fail")
    );
    let done = h.exchanges();
    assert_eq!(done.len(), 1);
    assert_eq!(http(&done[0]).response, Some(response(200, 0, Some(13))));
    assert_eq!(
        h.counts(),
        ParserCounts {
            desynchronised: 2,
            ..ParserCounts::default()
        }
    );
}

#[test]
fn registration() {
    assert_eq!(REGISTRATION.name, "http2");
    assert_eq!(REGISTRATION.capture_bytes, Some(16384));
    let in_order = REGISTRATION.in_order;
    assert!(!in_order);
    let mut parser = (REGISTRATION.new_parser)(&ParserContext::standalone(1));
    let mut out = ParserOutput::default();
    parser.feed(
        &Chunk {
            direction: Direction::Egress,
            data: PREFACE,
            tail: &[],
            full_len: 24,
            start_ns: 1,
            end_ns: 2,
            tid: 3,
        },
        &mut out,
    );
    assert!(!parser.gave_up());
}

// Syscalls larger than the capture: the kernel gives their first 12 KiB and their last 4 KiB.

/// A gRPC message of `frames` × 16384 bytes (prefix included) in DATA frames of 16384 bytes
/// on `stream`, its bytes from `fill` (the 5-byte prefix first).
fn message_frames(stream: u32, frames: usize, mut fill: impl FnMut() -> u8) -> Vec<u8> {
    let mut message = grpc_message(frames * 16384 - 5);
    for b in &mut message[5..] {
        *b = fill();
    }
    message
        .chunks(16384)
        .flat_map(|payload| frame(DATA, 0, stream, payload))
        .collect()
}

/// A gRPC server's answer to a call with a large response, as it writes it in one syscall:
/// HEADERS, 20 DATA frames of 16384 bytes, trailers (literal fields on a fresh encoder).
fn big_response(s: &mut Enc, stream: u32) -> Vec<u8> {
    let mut bytes = s.headers(
        stream,
        0,
        &[(":status", "200"), ("content-type", "application/grpc")],
    );
    bytes.extend(message_frames(stream, 20, || b'x'));
    bytes.extend(s.headers(
        stream,
        END_STREAM,
        &[("grpc-status", "0"), ("grpc-message", "")],
    ));
    bytes
}

/// The calls before the big response, from a connection's start: preface and SETTINGS both
/// ways, and a unary request on stream 1, as (writer, bytes).
fn big_call_setup(c: &mut Enc) -> Vec<(char, Vec<u8>)> {
    let mut request = c.headers(1, 0, &grpc_request_fields("/big/Get"));
    request.extend(frame(DATA, END_STREAM, 1, &grpc_message(4)));
    vec![
        ('C', [PREFACE.to_vec(), settings(&[(4, 65535)])].concat()),
        ('S', [settings(&[]), settings_ack()].concat()),
        ('C', [settings_ack(), request].concat()),
    ]
}

/// The server writes HEADERS, 20 × 16 KiB of DATA and the trailers in one sendmsg: the second
/// DATA frame's header is in the gap, framing resumes in the tail at the trailers.
#[test]
fn big_response_in_one_write_server_side() {
    let mut c = Enc::new();
    let mut s = Enc::new();
    let mut h = Harness::new();
    for (writer, bytes) in big_call_setup(&mut c) {
        h.feed(
            direction_of(writer, Role::Server),
            &bytes,
            bytes.len() as u64,
        );
    }
    assert_eq!(h.starts().len(), 1);
    let bytes = big_response(&mut s, 1);
    assert!(bytes.len() > 20 * 16384);
    h.syscall(Direction::Egress, &bytes);
    assert_eq!(h.responses_started(), vec![1]);
    let done = h.exchanges();
    assert_eq!(done.len(), 1);
    let e = &done[0];
    assert_eq!(
        (e.role, e.id, e.end_ns, e.response_tid, e.error),
        (Role::Server, 1, end(4), TX_TID, None)
    );
    // The DATA frames in the gap are not counted: the body length is a lower bound (the first
    // frame's).
    assert_eq!(http(e).response, Some(response(200, 16384, Some(0))));
    assert_eq!(
        h.counts(),
        ParserCounts {
            desynchronised: 1,
            ..ParserCounts::default()
        }
    );
    h.close();
    assert!(h.exchanges().is_empty());
}

/// `bytes` cut in reads of `size` bytes, from its start (the last read is the remainder) or
/// from its end (the first one is).
fn reads(bytes: &[u8], size: usize, from_end: bool) -> Vec<&[u8]> {
    if !from_end {
        return bytes.chunks(size).collect();
    }
    let mut out: Vec<&[u8]> = bytes.rchunks(size).collect();
    out.reverse();
    out
}

/// The client reads the same bytes in reads of 64 KiB: framing is lost in the first large
/// read's gap, and resumes at the end of the last read (its tail, or the whole read when it
/// is small enough to be captured whole and starts inside a DATA payload).
#[test]
fn big_response_read_in_large_reads_client_side() {
    for from_end in [false, true] {
        let mut c = Enc::new();
        let mut s = Enc::new();
        let mut h = Harness::new();
        for (writer, bytes) in big_call_setup(&mut c) {
            h.feed(
                direction_of(writer, Role::Client),
                &bytes,
                bytes.len() as u64,
            );
        }
        assert_eq!(h.starts().len(), 1);
        let bytes = big_response(&mut s, 1);
        let pieces = reads(&bytes, 65536, from_end);
        if from_end {
            assert!(pieces[1..].iter().all(|r| r.len() == 65536));
        } else {
            assert!(pieces.last().unwrap().len() < 16384);
        }
        for piece in &pieces {
            h.syscall(Direction::Ingress, piece);
        }
        let last_call = h.calls;
        let done = h.exchanges();
        assert_eq!(done.len(), 1, "from_end {from_end}");
        let e = &done[0];
        assert_eq!(
            (e.role, e.id, e.start_ns, e.end_ns, e.response_tid, e.error),
            (Role::Client, 1, start(3), end(last_call), RX_TID, None)
        );
        let response = http(e).response.clone().unwrap();
        assert_eq!((response.status, response.grpc_status), (200, Some(0)));
        assert!(response.body_len >= 16384 && response.body_len < 20 * 16384);
        assert_eq!(
            h.counts(),
            ParserCounts {
                desynchronised: 1,
                ..ParserCounts::default()
            },
            "from_end {from_end}"
        );
    }
}

/// Case 1: the gap lies inside one DATA payload (the client accepts frames of 1 MiB): the
/// tail continues the bytes; nothing is lost, the HPACK table included.
#[test]
fn gap_inside_one_data_payload_loses_nothing() {
    let mut c = Enc::new();
    let mut s = Enc::new();
    let mut h = Harness::new();
    h.tx(&[PREFACE.to_vec(), settings(&[(5, 1 << 20)])].concat());
    h.tx(&c.headers(1, END_STREAM, &grpc_request_fields("/big/One")));
    let headers = s.headers(
        1,
        0,
        &[(":status", "200"), ("content-type", "application/grpc")],
    );
    let data = frame(DATA, 0, 1, &grpc_message(29_995));
    let trailers = s.headers(1, END_STREAM, &[("grpc-status", "0")]);
    let bytes = [headers.clone(), data.clone(), trailers].concat();
    // The gap starts and ends inside the DATA payload.
    let (captured, tail) = kernel_capture(&bytes);
    assert!(headers.len() + HEADER_LEN < captured.len());
    assert!(bytes.len() - tail.len() < headers.len() + data.len());
    h.syscall(Direction::Ingress, &bytes);
    let done = h.exchanges();
    assert_eq!(done.len(), 1);
    assert_eq!(
        http(&done[0]).response,
        Some(response(200, 30_000, Some(0)))
    );
    assert_eq!(done[0].end_ns, end(3));
    // The next call's response refers to entries inserted by the first one: they decode.
    h.tx(&c.headers(3, END_STREAM, &grpc_request_fields("/big/Two")));
    let mut next = s.headers(
        3,
        0,
        &[(":status", "200"), ("content-type", "application/grpc")],
    );
    next.extend(frame(DATA, 0, 3, &grpc_message(2)));
    let trailers = s.headers(3, END_STREAM, &[("grpc-status", "0")]);
    assert_eq!(trailers.len(), HEADER_LEN + 1, "an indexed field");
    next.extend(trailers);
    h.rx(&next);
    let done = h.exchanges();
    assert_eq!(http(&done[0]).response, Some(response(200, 7, Some(0))));
    assert!(http(&done[0]).request.grpc);
    assert_eq!(h.counts(), ParserCounts::default());
}

/// The gap ends inside a header block: the block and the HPACK table are lost, framing holds
/// and the tail continues the bytes.
#[test]
fn gap_ending_inside_a_header_block_loses_the_block_only() {
    let mut c = Enc::new();
    let mut s = Enc::new();
    let mut h = Harness::new();
    h.tx(&[PREFACE.to_vec(), settings(&[(5, 1 << 20)])].concat());
    h.tx(&c.headers(1, END_STREAM, &grpc_request_fields("/big/Headers")));
    let long = "v".repeat(20_000);
    let headers = s.headers(1, 0, &[(":status", "200"), ("x-long", &long)]);
    let mut bytes = headers.clone();
    bytes.extend(frame(DATA, 0, 1, &grpc_message(10)));
    bytes.extend(s.headers(1, END_STREAM, &[("grpc-status", "0")]));
    let (_, tail) = kernel_capture(&bytes);
    assert!(bytes.len() - tail.len() < headers.len());
    h.syscall(Direction::Ingress, &bytes);
    let done = h.exchanges();
    assert_eq!(done.len(), 1);
    assert_eq!((done[0].error, done[0].end_ns), (None, end(3)));
    // The response headers were lost (status unknown); the trailers' literal grpc-status
    // decodes.
    assert_eq!(
        http(&done[0]).response,
        Some(lost(response(0, 15, Some(0))))
    );
    assert_eq!(
        h.counts(),
        ParserCounts {
            desynchronised: 1,
            ..ParserCounts::default()
        }
    );
}

/// A padded DATA frame whose pad length byte falls in the gap, the rest of it in the tail: the
/// tail's first byte is payload, not a pad length.
#[test]
fn padded_data_whose_pad_length_is_in_the_gap() {
    let mut c = Enc::new();
    let mut s = Enc::new();
    let mut h = Harness::new();
    h.tx(&[PREFACE.to_vec(), settings(&[(5, 1 << 20)])].concat());
    h.tx(&c.headers(1, END_STREAM, &grpc_request_fields("/big/Padded")));
    let mut payload = vec![10];
    payload.extend(vec![b'x'; 20_000]);
    payload.extend([0; 10]);
    let mut bytes = s.headers(1, 0, &[(":status", "200")]);
    let data_header_end = bytes.len() + HEADER_LEN;
    bytes.extend(frame(DATA, PADDED, 1, &payload));
    bytes.extend(s.headers(1, END_STREAM, &[("grpc-status", "0")]));
    let tail = &bytes[bytes.len() - 4096..];
    h.feed_chunk(
        3,
        Direction::Ingress,
        &bytes[..data_header_end],
        tail,
        bytes.len() as u64,
    );
    let done = h.exchanges();
    // The padding's length is unknown: all of the payload but the pad length counts.
    assert_eq!(
        http(&done[0]).response,
        Some(response(200, 20_010, Some(0)))
    );
    assert_eq!(h.counts(), ParserCounts::default());
}

/// Tails that don't end with a chain of whole frames resynchronise nothing: no frame is
/// invented, the loss counts once, and framing resumes at the next chunk that starts with a
/// frame.
#[test]
fn tail_that_does_not_chain_resynchronises_nothing() {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    // The write ends inside a DATA payload of random bytes (the response goes on in the next
    // write); or with the trailers followed by a few bytes that are not a frame.
    let random_data = message_frames(1, 20, || rng.next() as u8);
    for case in 0..2 {
        let mut c = Enc::new();
        let mut s = Enc::new();
        let mut h = Harness::new();
        for (writer, bytes) in big_call_setup(&mut c) {
            h.feed(
                direction_of(writer, Role::Server),
                &bytes,
                bytes.len() as u64,
            );
        }
        assert_eq!(h.starts().len(), 1);
        let mut bytes = s.headers(1, 0, &[(":status", "200")]);
        bytes.extend(&random_data);
        let trailers = s.headers(1, END_STREAM, &[("grpc-status", "0")]);
        if case == 1 {
            bytes.extend(&trailers);
            bytes.extend([0xff, 0, 0, 0, 4]);
        }
        let (_, tail) = kernel_capture(&bytes);
        assert_eq!(super::frame::resync_offset(tail, 16384), None);
        h.syscall(Direction::Egress, &bytes);
        assert_eq!(h.responses_started(), vec![1]);
        assert!(h.exchanges().is_empty(), "case {case}");
        assert!(h.starts().is_empty());
        assert_eq!(
            h.counts(),
            ParserCounts {
                desynchronised: 1,
                ..ParserCounts::default()
            },
            "case {case}"
        );
        // Still waiting: a chunk in the middle of something changes nothing.
        h.syscall(Direction::Egress, &random_data[100..30_000]);
        assert!(h.exchanges().is_empty());
        // A write that starts with a frame resumes framing.
        h.tx(&s.headers(1, END_STREAM, &[("grpc-status", "0")]));
        let done = h.exchanges();
        assert_eq!(done.len(), 1, "case {case}");
        assert_eq!(h.counts().desynchronised, 1);
        assert_eq!(h.counts().parse_errors, 0);
    }
}

/// The trailers' block is a HEADERS frame larger than the tail and a CONTINUATION: the only
/// chain in the tail starts with the CONTINUATION, whose HEADERS is lost: refused.
#[test]
fn tail_chain_starting_with_continuation_is_refused() {
    let mut c = Enc::new();
    let mut s = Enc::new();
    let mut h = Harness::new();
    for (writer, bytes) in big_call_setup(&mut c) {
        h.feed(
            direction_of(writer, Role::Server),
            &bytes,
            bytes.len() as u64,
        );
    }
    let long = "v".repeat(6000);
    let block = s.block(&[("grpc-status", "0"), ("x-long", &long)]);
    let (first, rest) = block.split_at(block.len() - 50);
    let mut bytes = s.headers(1, 0, &[(":status", "200")]);
    bytes.extend(message_frames(1, 20, || b'x'));
    bytes.extend(frame(HEADERS, END_STREAM, 1, first));
    let continuation = frame(CONTINUATION, END_HEADERS, 1, rest);
    bytes.extend(&continuation);
    let (_, tail) = kernel_capture(&bytes);
    assert_eq!(super::frame::resync_offset(tail, 16384), None);
    // The CONTINUATION alone would chain to the end.
    assert!(tail.ends_with(&continuation));
    h.syscall(Direction::Egress, &bytes);
    assert!(h.exchanges().is_empty());
    assert_eq!(
        h.counts(),
        ParserCounts {
            desynchronised: 1,
            ..ParserCounts::default()
        }
    );
}

/// After a gap that lost framing, the trailers found in the tail refer to `grpc-status: 0` by
/// its dynamic-table index, and header blocks of another stream were in the gap (an insertion
/// shifted the indices): the exchange ends with grpc-status unknown, never a wrong value.
#[test]
fn unknown_grpc_status_after_a_lossy_gap() {
    let mut c = Enc::new();
    let mut s = Enc::new();
    let mut h = Harness::new();
    for (writer, bytes) in big_call_setup(&mut c) {
        h.feed(
            direction_of(writer, Role::Server),
            &bytes,
            bytes.len() as u64,
        );
    }
    assert_eq!(h.starts().len(), 1);
    // A first small call inserts the response fields in the encoder's table.
    let mut small = s.headers(
        1,
        0,
        &[(":status", "200"), ("content-type", "application/grpc")],
    );
    small.extend(frame(DATA, 0, 1, &grpc_message(3)));
    small.extend(s.headers(1, END_STREAM, &[("grpc-status", "0"), ("grpc-message", "")]));
    h.tx(&small);
    assert_eq!(
        http(&h.exchanges()[0]).response,
        Some(response(200, 8, Some(0)))
    );
    for id in [3, 5] {
        h.rx(&c.headers(id, END_STREAM, &grpc_request_fields("/big/Get")));
    }
    assert_eq!(h.starts().len(), 2);
    // Stream 3's large response; stream 5's headers (an insertion) between its DATA frames.
    let fields = [(":status", "200"), ("content-type", "application/grpc")];
    let mut bytes = s.headers(3, 0, &fields);
    bytes.extend(message_frames(3, 10, || b'x'));
    bytes.extend(s.headers(5, 0, &[(":status", "200"), ("x-inserted", "1")]));
    bytes.extend(message_frames(3, 10, || b'x'));
    let trailers = s.headers(3, END_STREAM, &[("grpc-status", "0"), ("grpc-message", "")]);
    // Two indexed fields, past the static table.
    assert!(trailers[HEADER_LEN..].iter().all(|&b| b > 0x80 + 61));
    assert_eq!(trailers.len(), HEADER_LEN + 2);
    bytes.extend(trailers);
    h.syscall(Direction::Egress, &bytes);
    let done = h.exchanges();
    assert_eq!(done.len(), 1);
    assert_eq!((done[0].id, done[0].error), (3, None));
    assert_eq!(
        http(&done[0]).response,
        Some(lost(response(200, 16384, None)))
    );
    // The loss counted once (the unknown reference is part of it).
    assert_eq!(
        h.counts(),
        ParserCounts {
            desynchronised: 1,
            ..ParserCounts::default()
        }
    );
    // The table stays unknown: a later small call whose trailers refer to the entries
    // inserted before the loss has no grpc-status either (a literal one would decode).
    h.rx(&c.headers(7, END_STREAM, &grpc_request_fields("/big/Get")));
    let mut small = s.headers(7, 0, &fields);
    small.extend(frame(DATA, 0, 7, &grpc_message(3)));
    small.extend(s.headers(7, END_STREAM, &[("grpc-status", "0"), ("grpc-message", "")]));
    h.tx(&small);
    let done = h.exchanges();
    assert_eq!(done[0].id, 7);
    assert_eq!(http(&done[0]).response, Some(lost(response(200, 8, None))));
    h.rx(&c.headers(9, END_STREAM, &grpc_request_fields("/big/Get")));
    // Trailers-Only: :status 200 (static), grpc-status 5 (literal name and value, not indexed).
    let mut block = vec![0x88, 0x00, 11];
    block.extend(b"grpc-status");
    block.extend([1, b'5']);
    h.tx(&frame(HEADERS, END_HEADERS | END_STREAM, 9, &block));
    let done = h.exchanges();
    assert_eq!(http(&done[0]).response, Some(response(200, 0, Some(5))));
    assert_eq!(h.counts().desynchronised, 1);
    assert_eq!(h.counts().parse_errors, 0);
    // Stream 5's response was in the gap: it may have ended unseen, dropped at close.
    h.close();
    assert!(h.exchanges().is_empty());
}

/// The resynchronisation rule on its own.
#[test]
fn resync_offset_rule() {
    use super::frame::resync_offset;
    let ping = frame(PING, 0, 0, &[0; 8]);
    let trailers = frame(HEADERS, END_HEADERS | END_STREAM, 1, &[0x88]);
    // Frames that chain to the end, after bytes that are not frames.
    assert_eq!(resync_offset(&ping, 16384), Some(0));
    let tail = [vec![0x78; 100], trailers.clone()].concat();
    assert_eq!(resync_offset(&tail, 16384), Some(100));
    let tail = [vec![0x78; 3], frame(DATA, 0, 1, b"abc"), trailers.clone()].concat();
    assert_eq!(resync_offset(&tail, 16384), Some(3));
    // The smallest offset: a DATA frame whose payload is itself a frame.
    let nested = frame(DATA, 0, 1, &ping);
    assert_eq!(resync_offset(&nested, 16384), Some(0));
    // Not to the end exactly: a frame cut at the end, bytes after the last frame.
    assert_eq!(resync_offset(&trailers[..trailers.len() - 1], 16384), None);
    assert_eq!(
        resync_offset(&[ping.clone(), vec![0]].concat(), 16384),
        None
    );
    assert_eq!(resync_offset(&ping[..8], 16384), None);
    assert_eq!(resync_offset(&[], 16384), None);
    // A CONTINUATION first is refused; after its HEADERS it chains.
    let cont = frame(CONTINUATION, END_HEADERS, 1, b"c");
    assert_eq!(resync_offset(&cont, 16384), None);
    assert_eq!(
        resync_offset(&[vec![0x78; 20], cont.clone()].concat(), 16384),
        None
    );
    let block = [frame(HEADERS, END_STREAM, 1, b"ab"), cont.clone()].concat();
    assert_eq!(resync_offset(&block, 16384), Some(0));
    // Out of sequence: a CONTINUATION of another stream, another frame inside a block.
    let other = [
        frame(HEADERS, END_STREAM, 1, b"ab"),
        frame(CONTINUATION, END_HEADERS, 3, b"c"),
    ]
    .concat();
    assert_eq!(resync_offset(&other, 16384), None);
    let interleaved = [frame(HEADERS, 0, 1, b"ab"), ping.clone()].concat();
    assert_eq!(resync_offset(&interleaved, 16384), Some(11));
    // Implausible frames break the chain: undefined flags, a payload over the max frame size,
    // padding larger than the payload, a SETTINGS value out of range.
    let bad = [
        frame(PING, 0x2, 0, &[0; 8]),
        frame(DATA, 0, 1, &[0; 100]),
        frame(DATA, PADDED, 1, &[9, 0]),
        frame(SETTINGS, 0, 0, &[0, 5, 0, 0, 0, 1]),
    ];
    for b in &bad {
        assert_eq!(
            resync_offset(&[b.clone(), ping.clone()].concat(), 64),
            Some(b.len())
        );
    }
    // Only the last RESYNC_WINDOW bytes are searched.
    let long = [frame(DATA, 0, 1, &[0; 5000]), trailers.clone()].concat();
    assert_eq!(
        resync_offset(&long, 16384),
        Some(long.len() - trailers.len())
    );
    assert_eq!(
        resync_offset(&long, 1 << 20),
        Some(long.len() - trailers.len())
    );
    // Random bytes, and random DATA payloads, never chain.
    let mut rng = Rng(0x0bad_5eed_0000_0001);
    for _ in 0..300 {
        let tail: Vec<u8> = (0..4096).map(|_| rng.next() as u8).collect();
        assert_eq!(resync_offset(&tail, 16384), None);
        assert_eq!(resync_offset(&tail, 1 << 20), None);
    }
}

/// What the agent's memory budget asks of the parser: a header block whose frame is split
/// across reads is a partial message holding its bytes (and HPACK state); complete, it is not.
#[test]
fn a_partial_header_block_is_reported_with_its_memory() {
    let mut h = Harness::new();
    h.tx(&[PREFACE.to_vec(), settings(&[])].concat());
    let request = Enc::new().headers(1, END_STREAM, &grpc_request_fields("/shop.Shop/Get"));
    let half = request.len() / 2;
    h.tx(&request[..half]);
    assert!(h.conn.holds_partial());
    assert!(h.conn.memory_bytes() >= half - HEADER_LEN);
    h.tx(&request[half..]);
    assert!(!h.conn.holds_partial());
    assert_eq!(h.starts().len(), 1);
}
