//! Protocol parsers: bytes of one connection, per direction, in; request starts, response starts
//! and finished exchanges out.
//!
//! Parsers are pure functions of the bytes they are fed (no kernel, no clock, no I/O), so they
//! are unit-tested on byte fixtures. Each protocol lives in its own folder and implements
//! [`ProtocolParser`]; [`PROTOCOLS`] lists them for detection. Adding a protocol is one folder
//! plus one line in that list.

pub mod http;
pub mod http1;
pub mod http2;
pub mod kafka;

use std::rc::Rc;

use compact_str::CompactString;

/// Which way bytes moved, from the traced process's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The process read these bytes (read, recvfrom, recvmsg, readv).
    Ingress,
    /// The process wrote these bytes (write, sendto, sendmsg, writev, sendfile).
    Egress,
}

/// One syscall's worth of bytes on one connection.
#[derive(Clone, Copy, Debug)]
pub struct Chunk<'a> {
    pub direction: Direction,
    /// The captured prefix of the bytes the syscall transferred.
    pub data: &'a [u8],
    /// The syscall's last bytes, when its connection's protocol asked for them
    /// ([`Registration::capture_tail`]) and the syscall moved more than the capture; else empty.
    pub tail: &'a [u8],
    /// How many bytes the syscall really transferred (`>= data.len() + tail.len()`). The
    /// `full_len - data.len() - tail.len()` bytes between `data` and `tail` were not captured:
    /// the parser knows their count, not their content.
    pub full_len: u64,
    /// Kernel monotonic time at syscall entry and exit, in ns.
    pub start_ns: u64,
    pub end_ns: u64,
    /// The thread that made the syscall.
    pub tid: u32,
}

/// The traced process's side of an exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The process sent the request.
    Client,
    /// The process received the request and answered it.
    Server,
}

/// A request whose header was parsed (before its response exists): what trace-context linking
/// needs to know while the request is being served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestStart {
    pub role: Role,
    /// Identity of the request on its connection, unique while it is in flight; its
    /// [`Exchange`] carries the same id. HTTP/1: the request's number on the connection (from
    /// 0); HTTP/2: the stream id.
    pub id: u64,
    /// `id` is the same at both ends of the connection however late the parser joined it
    /// (an HTTP/2 stream id). Otherwise ids are counts, which match the other end only on
    /// connections seen from their start.
    pub id_on_wire: bool,
    /// The thread that read it is not the one that handles it (HTTP/2 servers read every stream
    /// on I/O threads): linking its outgoing calls by thread would guess.
    pub multiplexed: bool,
    /// Thread that read (server) or wrote (client) the request.
    pub tid: u32,
    pub start_ns: u64,
    /// What both ends of a connection must agree on to be paired (HTTP: method and target).
    pub method: CompactString,
    pub target: CompactString,
    /// Trace-context headers only (traceparent, tracestate, b3, x-b3-*), names lower-cased.
    pub context_headers: Vec<(String, String)>,
}

/// Why an exchange ended without a complete response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExchangeError {
    /// The connection closed (or the process exited) before the response was complete.
    ConnectionClosed,
    /// HTTP/2 RST_STREAM ended the stream before the response was complete.
    StreamReset,
}

impl ExchangeError {
    /// Value for the `error.type` attribute.
    pub fn as_str(&self) -> &'static str {
        match self {
            ExchangeError::ConnectionClosed => "connection_closed",
            ExchangeError::StreamReset => "stream_reset",
        }
    }
}

/// A finished request/response exchange, whatever the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exchange {
    pub role: Role,
    /// The id of its [`RequestStart`].
    pub id: u64,
    /// Kernel monotonic ns. Start: the syscall carrying the request's first byte (its entry for a
    /// write, its exit for a read: that is when the bytes existed). End: the syscall carrying the
    /// response's last byte (exit), or the close.
    pub start_ns: u64,
    pub end_ns: u64,
    /// Thread that read (server) or wrote (client) the request's first bytes.
    pub request_tid: u32,
    /// Thread that wrote (server) or read (client) the response's first bytes; 0 if none.
    pub response_tid: u32,
    /// Set when the response is missing or incomplete.
    pub error: Option<ExchangeError>,
    pub payload: Payload,
}

/// The protocol part of an exchange; each variant has its span builder and instruments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Payload {
    /// HTTP/1.x and HTTP/2 (gRPC included: `request.grpc`).
    Http(http::HttpPayload),
    /// Kafka Produce and Fetch.
    Kafka(kafka::KafkaPayload),
}

/// Heap bytes a request in flight is taken to hold in strings (path, host, context headers) by
/// [`ProtocolParser::memory_bytes`]: estimated, not walked, since it runs after every chunk.
pub const REQUEST_STRINGS: usize = 256;

/// Counts a parser reports besides its messages (added to the agent's stats).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParserCounts {
    /// Bytes that broke the protocol's rules (the parser resynchronises or gives up).
    pub parse_errors: u64,
    /// The parser lost its state and knows it (HTTP/2: an HPACK dynamic-table entry it never
    /// saw; frames beyond the captured prefix).
    pub desynchronised: u64,
    /// A bound was hit (streams per connection, header block size, requests in flight).
    pub limits_hit: u64,
}

/// What a parser produced from one chunk (or a close). Reused between chunks: the pipeline
/// drains it after every call, so a chunk that completes nothing allocates nothing.
#[derive(Debug, Default)]
pub struct ParserOutput {
    /// Requests whose header was parsed, in order.
    pub request_starts: Vec<RequestStart>,
    /// Ids of requests whose response began (its header was parsed).
    pub responses_started: Vec<u64>,
    /// Finished exchanges.
    pub exchanges: Vec<Exchange>,
    /// Ids of started requests the parser dropped without an exchange (an HTTP/2 stream that
    /// may have ended in bytes never seen, dropped to make room): trace-context linking
    /// forgets them. In-order protocols need not report theirs: a later exchange retires them.
    pub dropped: Vec<u64>,
    pub counts: ParserCounts,
}

/// One protocol's parser for one connection (both directions).
pub trait ProtocolParser: std::fmt::Debug {
    /// Consumes one syscall's bytes, in order per connection.
    fn feed(&mut self, chunk: &Chunk<'_>, out: &mut ParserOutput);
    /// The connection closed (or its process exited) at `end_ns`: every request still in flight
    /// is finished with an error.
    fn close(&mut self, end_ns: u64, out: &mut ParserOutput);
    /// The parser cannot follow this connection any more (its bytes are not this protocol, or
    /// it lost sync for good): the connection is muted in the kernel.
    fn gave_up(&self) -> bool {
        false
    }
    /// The connection left this protocol (HTTP/1's 101 Switching Protocols, a CONNECT tunnel):
    /// what follows is detected afresh (`Upgrade: h2c` continues as HTTP/2).
    fn switched(&self) -> bool {
        false
    }
    /// Heap bytes the parser holds for its connection (buffers' capacity, requests in flight,
    /// HPACK tables): an estimate for the agent's memory budget, cheap enough to ask after
    /// every chunk.
    fn memory_bytes(&self) -> usize {
        0
    }
    /// A message was received only in part and its bytes are buffered (a header block without
    /// its end, a Kafka frame without its rest): the partial-message timeout runs.
    fn holds_partial(&self) -> bool {
        false
    }
    /// Give back buffer capacity holding no bytes (kept between messages to spare an allocation
    /// per message): the agent is over its memory budget.
    fn release_spare(&mut self) {}
}

/// What a new parser is told about its connection, and the state parsers of different
/// connections share. The pipeline owns one [`SharedState`]; parsers run on its thread.
#[derive(Clone, Debug)]
pub struct ParserContext {
    /// The process the connection belongs to.
    pub pid: u32,
    pub shared: Rc<SharedState>,
}

/// State the parsers of every connection share.
#[derive(Debug, Default)]
pub struct SharedState {
    /// Kafka topic names by id and consumer groups by process: both are learnt on one
    /// connection and needed on another.
    pub kafka: kafka::KafkaShared,
}

impl ParserContext {
    /// A context of its own (tests, benchmarks).
    pub fn standalone(pid: u32) -> Self {
        ParserContext {
            pid,
            shared: Rc::default(),
        }
    }
}

/// A protocol kspan parses, for detection.
pub struct Registration {
    /// For logs and counters.
    pub name: &'static str,
    /// True if these first captured bytes of a direction start this protocol. Pure and cheap:
    /// called for each chunk of a connection until one protocol claims it.
    pub detect: fn(data: &[u8], direction: Direction) -> bool,
    pub new_parser: fn(&ParserContext) -> Box<dyn ProtocolParser>,
    /// Bytes the kernel copies per syscall on connections of this protocol (None: the agent's
    /// `--capture-bytes`).
    pub capture_bytes: Option<u32>,
    /// Of those, bytes given to the *end* of a syscall that moved more than the capture (0: the
    /// capture is a prefix only).
    pub capture_tail: u32,
    /// Responses come in request order (HTTP/1, Kafka): a finished request retires the older
    /// ones still open, which the parser dropped. HTTP/2 streams finish in any order.
    pub in_order: bool,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// Every protocol, tried in this order on a connection's first chunks.
pub const PROTOCOLS: &[Registration] = &[
    http1::REGISTRATION,
    http2::REGISTRATION,
    kafka::REGISTRATION,
];

/// The first protocol that claims these bytes.
pub fn detect(data: &[u8], direction: Direction) -> Option<&'static Registration> {
    PROTOCOLS.iter().find(|p| (p.detect)(data, direction))
}
