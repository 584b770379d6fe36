//! The per-connection state machine: two directions that frame bytes and decode header blocks,
//! and the streams whose request is in flight.

use compact_str::CompactString;

use super::frame::{
    self, CONTINUATION, DATA, END_HEADERS, END_STREAM, FrameHeader, GOAWAY, HEADER_LEN, HEADERS,
    PADDED, PREFACE, PUSH_PROMISE, RST_STREAM, SETTINGS,
};
use super::hpack::{self, Field};
use crate::protocols::http::{HttpPayload, HttpRequest, HttpResponse, limited_string};
use crate::protocols::{
    Chunk, Direction, Exchange, ExchangeError, ParserOutput, Payload, ProtocolParser,
    REQUEST_STRINGS, RequestStart, Role,
};

/// Most streams followed at once per connection.
pub(super) const MAX_STREAMS: usize = 256;
/// Most bytes of one header block (HEADERS or PUSH_PROMISE payload and its CONTINUATIONs,
/// padding and priority fields included).
pub(super) const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// Header block buffer capacity kept between blocks (a larger one is freed after its block).
const KEPT_BUFFER_CAPACITY: usize = 4096;
/// After a parse error, chunks in a row (either direction) that don't start with a plausible
/// frame before the parser gives up.
pub(super) const GIVE_UP_AFTER: u32 = 8;
/// Most trace-context headers kept per request.
const MAX_CONTEXT_HEADERS: usize = 16;
/// Trace-context headers kept from requests (HTTP/2 field names are lower-case).
const CONTEXT_HEADERS: [&str; 8] = [
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

/// HTTP/2 parser for one connection (both directions).
#[derive(Debug)]
pub struct Http2Connection {
    ingress: Half,
    egress: Half,
    shared: Shared,
}

// No `Default`: callers use `new()` (a `Default` impl makes clippy flag their
// `Box::new(Http2Connection::new())`).
#[allow(clippy::new_without_default)]
impl Http2Connection {
    pub fn new() -> Self {
        Http2Connection {
            ingress: Half::new(Direction::Ingress),
            egress: Half::new(Direction::Egress),
            shared: Shared {
                role: None,
                streams: Streams::default(),
                max_frame: [frame::DEFAULT_MAX_FRAME_SIZE; 2],
                from_start: false,
                bad_chunks: 0,
                gave_up: false,
                early: Vec::new(),
            },
        }
    }

    /// The role, once the preface or a first request was seen (None before).
    pub fn role(&self) -> Option<Role> {
        self.shared.role
    }
}

impl ProtocolParser for Http2Connection {
    fn feed(&mut self, chunk: &Chunk<'_>, out: &mut ParserOutput) {
        if self.shared.gave_up {
            return;
        }
        let half = match chunk.direction {
            Direction::Ingress => &mut self.ingress,
            Direction::Egress => &mut self.egress,
        };
        half.feed(&mut self.shared, chunk, out);
    }

    /// Every stream with a request in flight finishes with `ConnectionClosed` (with its
    /// response if its headers were seen), except those that may have ended in bytes never
    /// seen (a stream open when bytes were lost, not heard of since): they are dropped. The
    /// parser is then reset.
    fn close(&mut self, end_ns: u64, out: &mut ParserOutput) {
        if let Some(role) = self.shared.role {
            for stream in self.shared.streams.list.drain(..) {
                if !stream.maybe_lost {
                    out.exchanges.push(stream.into_exchange(
                        role,
                        end_ns,
                        Some(ExchangeError::ConnectionClosed),
                    ));
                }
            }
        }
        *self = Http2Connection::new();
    }

    fn gave_up(&self) -> bool {
        self.shared.gave_up
    }

    fn memory_bytes(&self) -> usize {
        let sh = &self.shared;
        self.ingress.memory_bytes()
            + self.egress.memory_bytes()
            + sh.streams.ids.capacity() * std::mem::size_of::<u32>()
            + sh.streams.list.capacity() * std::mem::size_of::<Stream>()
            + sh.streams.list.len() * REQUEST_STRINGS
            + sh.early.capacity() * std::mem::size_of::<EarlyResponse>()
    }

    fn holds_partial(&self) -> bool {
        !self.ingress.block_buf.is_empty() || !self.egress.block_buf.is_empty()
    }

    fn release_spare(&mut self) {
        for half in [&mut self.ingress, &mut self.egress] {
            if half.block_buf.is_empty() {
                half.block_buf = Vec::new();
            }
        }
    }
}

/// Syscall facts of a frame's first byte.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ChunkMeta {
    start_ns: u64,
    end_ns: u64,
    tid: u32,
}

/// Connection-wide state shared by both directions.
#[derive(Debug)]
struct Shared {
    role: Option<Role>,
    streams: Streams,
    /// Largest frame payload each direction's receiver accepts (by [`index`]), raised by the
    /// SETTINGS_MAX_FRAME_SIZE the receiver sent (the largest seen: a lower one applies only
    /// once acknowledged). Resynchronisation checks it, and framing when `from_start`.
    max_frame: [u32; 2],
    /// A direction started with the client preface: the connection is seen from its start.
    from_start: bool,
    /// Chunks in a row that failed to resynchronise after a parse error.
    bad_chunks: u32,
    gave_up: bool,
    /// Client side: response header blocks of streams whose request was not seen yet, oldest
    /// first (at most [`MAX_EARLY_RESPONSES`]). Events come in syscall-exit order: a writer
    /// thread preempted between queueing its request and its write's exit lets another
    /// thread's read of the response come first. The request, when it comes, takes them.
    early: Vec<EarlyResponse>,
}

/// Response blocks kept for requests not seen yet, at most (past it the oldest goes).
const MAX_EARLY_RESPONSES: usize = 16;

/// What a response header block said (see [`Shared::early`]).
#[derive(Clone, Copy, Debug)]
struct EarlyResponse {
    stream: u32,
    status: Option<u16>,
    grpc_status: Option<u32>,
    fields_lost: bool,
    end_stream: bool,
    end_ns: u64,
    tid: u32,
}

fn index(direction: Direction) -> usize {
    match direction {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

fn opposite(direction: Direction) -> Direction {
    match direction {
        Direction::Ingress => Direction::Egress,
        Direction::Egress => Direction::Ingress,
    }
}

/// The role of a process whose requests flow in `direction`.
fn role_for_requests(direction: Direction) -> Role {
    match direction {
        Direction::Ingress => Role::Server,
        Direction::Egress => Role::Client,
    }
}

/// Streams with a request in flight. A Vec scanned linearly rather than a map: a connection
/// has a few open streams at a time (256 at most, 1 KiB of ids to scan), and lookups hash
/// nothing and insertions allocate nothing once the vectors have grown.
#[derive(Debug, Default)]
struct Streams {
    /// `ids[i]` is `list[i].id`, kept apart so that a lookup scans 4 bytes per stream.
    ids: Vec<u32>,
    list: Vec<Stream>,
}

impl Streams {
    fn find(&self, id: u32) -> Option<usize> {
        self.ids.iter().position(|&s| s == id)
    }

    fn get_mut(&mut self, id: u32) -> Option<&mut Stream> {
        self.find(id).map(|i| &mut self.list[i])
    }

    fn remove(&mut self, i: usize) -> Stream {
        self.ids.swap_remove(i);
        self.list.swap_remove(i)
    }

    fn push(&mut self, stream: Stream) {
        self.ids.push(stream.id);
        self.list.push(stream);
    }
}

/// A stream whose request headers were parsed.
#[derive(Debug)]
struct Stream {
    id: u32,
    request: HttpRequest,
    start_ns: u64,
    request_tid: u32,
    /// The final (non-1xx) response HEADERS were parsed.
    response_seen: bool,
    /// Its `:status`; None when it could not be known (an unknown dynamic-table entry).
    status: Option<u16>,
    grpc_status: Option<u32>,
    /// A response header field could not be decoded (unknown HPACK entry), or a whole response
    /// block: absent values (`:status`, `grpc-status`) are unknown, not missing.
    fields_lost: bool,
    response_body: u64,
    /// Thread of the chunk holding the first byte of the first response HEADERS frame.
    response_tid: Option<u32>,
    /// Bytes of this connection were lost (uncaptured frames, a parse error) while the stream
    /// was open, and nothing of its response was seen since: its end may have been in them.
    /// Such a stream is never reported with an invented end; it is dropped at close, and
    /// first when room is needed for a new stream.
    maybe_lost: bool,
}

impl Stream {
    fn into_exchange(self, role: Role, end_ns: u64, error: Option<ExchangeError>) -> Exchange {
        let response = self.response_seen.then(|| HttpResponse {
            // Unknown: a field the table could not resolve.
            status: self.status.unwrap_or(0),
            version: "2",
            body_len: self.response_body,
            grpc_status: self.grpc_status,
            fields_lost: self.fields_lost || self.status.is_none(),
        });
        Exchange {
            role,
            id: u64::from(self.id),
            start_ns: self.start_ns,
            end_ns,
            request_tid: self.request_tid,
            response_tid: self.response_tid.unwrap_or(0),
            error,
            payload: Payload::Http(HttpPayload {
                request: self.request,
                response,
            }),
        }
    }
}

impl Shared {
    fn request_direction(&self) -> Option<Direction> {
        self.role.map(|role| match role {
            Role::Server => Direction::Ingress,
            Role::Client => Direction::Egress,
        })
    }

    fn is_response_direction(&self, direction: Direction) -> bool {
        self.request_direction() == Some(opposite(direction))
    }

    /// A chunk after a parse error did not start with a plausible frame.
    fn bad_chunk(&mut self) {
        self.bad_chunks += 1;
        if self.bad_chunks > GIVE_UP_AFTER {
            self.gave_up = true;
        }
    }

    /// Every open stream may have lost frames.
    fn mark_maybe_lost(&mut self) {
        for stream in &mut self.streams.list {
            stream.maybe_lost = true;
        }
    }

    /// DATA payload bytes of stream `id` flowed in `direction`.
    fn add_body(&mut self, direction: Direction, id: u32, n: u32) {
        let response = self.is_response_direction(direction);
        if let Some(stream) = self.streams.get_mut(id) {
            if response {
                stream.response_body += u64::from(n);
                stream.maybe_lost = false;
            } else {
                stream.request.body_len += u64::from(n);
            }
        }
    }

    /// END_STREAM on a DATA frame.
    fn end_stream(&mut self, direction: Direction, id: u32, end_ns: u64, out: &mut ParserOutput) {
        if self.is_response_direction(direction) {
            self.finish(id, end_ns, None, out);
        }
    }

    /// Finishes stream `id` (if followed) as an exchange.
    fn finish(
        &mut self,
        id: u32,
        end_ns: u64,
        error: Option<ExchangeError>,
        out: &mut ParserOutput,
    ) {
        if let (Some(role), Some(i)) = (self.role, self.streams.find(id)) {
            let stream = self.streams.remove(i);
            out.exchanges
                .push(stream.into_exchange(role, end_ns, error));
        }
    }

    /// GOAWAY sent in `direction`: the sender will not process the streams its peer opened
    /// above `last_stream`. Sent by the server, that is requests in flight: they finish as
    /// `StreamReset` (refused, as REFUSED_STREAM would say of each). Sent by the client, it
    /// concerns pushed streams, which are not followed.
    fn goaway(
        &mut self,
        direction: Direction,
        last_stream: u32,
        end_ns: u64,
        out: &mut ParserOutput,
    ) {
        if !self.is_response_direction(direction) {
            return;
        }
        let mut i = 0;
        while i < self.streams.ids.len() {
            if self.streams.ids[i] > last_stream {
                let id = self.streams.ids[i];
                self.finish(id, end_ns, Some(ExchangeError::StreamReset), out);
            } else {
                i += 1;
            }
        }
    }

    /// A complete header block of stream `block.stream` flowed in `direction`. `fields`: what
    /// it held, None when it could not be decoded (bytes lost, over the size bound, malformed
    /// HPACK). Returns true when a request was dropped because part of it was unknown.
    fn header_block(
        &mut self,
        direction: Direction,
        block: &Block,
        fields: Option<&mut Fields>,
        end_ns: u64,
        out: &mut ParserOutput,
    ) -> bool {
        let id = block.stream;
        let Some(fields) = fields else {
            // Only its END_STREAM flag is known.
            if block.end_stream && self.is_response_direction(direction) {
                if let Some(stream) = self.streams.get_mut(id) {
                    stream.fields_lost = true;
                    stream.response_seen = true;
                }
                self.finish(id, end_ns, None, out);
            }
            return false;
        };
        let requests_here = match self.request_direction() {
            Some(d) => d == direction,
            None => fields.method.is_some(),
        };
        if requests_here {
            self.request_block(direction, block, fields, out)
        } else {
            self.response_block(block, fields, end_ns, out);
            false
        }
    }

    /// A header block in the request direction (or carrying `:method` before the role is
    /// known).
    fn request_block(
        &mut self,
        direction: Direction,
        block: &Block,
        fields: &mut Fields,
        out: &mut ParserOutput,
    ) -> bool {
        let id = block.stream;
        // Requests are on client-initiated (odd) streams; a followed stream's second block is
        // its trailers.
        if id.is_multiple_of(2) || self.streams.find(id).is_some() {
            return false;
        }
        let Some(method) = fields.method.take() else {
            // Not a request (trailers of a stream not followed), unless :method hid in an
            // unknown field.
            return fields.unknown > 0;
        };
        let target = match fields.path.take() {
            Some(path) => path,
            // CONNECT (without :protocol) names its target in :authority (RFC 9113 §8.5).
            None if method == "CONNECT" && fields.authority.is_some() => {
                fields.authority.clone().unwrap_or_default()
            }
            None if fields.unknown > 0 => return true,
            None => {
                // Malformed request (RFC 9113 §8.3.1): nothing to follow.
                out.counts.parse_errors += 1;
                return false;
            }
        };
        let role = *self.role.get_or_insert(role_for_requests(direction));
        if self.streams.list.len() >= MAX_STREAMS {
            // Room is made by dropping the oldest stream that may have ended unseen (its loss
            // was counted); otherwise the new one is not followed.
            let lost = (0..self.streams.list.len())
                .filter(|&i| self.streams.list[i].maybe_lost)
                .min_by_key(|&i| self.streams.ids[i]);
            match lost {
                Some(i) => {
                    let dropped = self.streams.remove(i);
                    out.dropped.push(u64::from(dropped.id));
                }
                None => {
                    out.counts.limits_hit += 1;
                    return false;
                }
            }
        }
        let request = HttpRequest {
            method,
            target,
            version: "2",
            scheme: fields.scheme.take(),
            host: fields.authority.take().or_else(|| fields.host.take()),
            user_agent: fields.user_agent.take(),
            grpc: fields.grpc,
            context_headers: std::mem::take(&mut fields.context),
            body_len: 0,
        };
        // A read's bytes exist at its exit, a write's at its entry.
        let start_ns = match direction {
            Direction::Ingress => block.first.end_ns,
            Direction::Egress => block.first.start_ns,
        };
        out.request_starts.push(RequestStart {
            role,
            id: u64::from(id),
            id_on_wire: true,
            multiplexed: role == Role::Server,
            tid: block.first.tid,
            start_ns,
            method: request.method.clone(),
            target: request.target.clone(),
            context_headers: request.context_headers.clone(),
        });
        self.streams.push(Stream {
            id,
            request,
            start_ns,
            request_tid: block.first.tid,
            response_seen: false,
            status: None,
            grpc_status: None,
            fields_lost: false,
            response_body: 0,
            response_tid: None,
            maybe_lost: false,
        });
        if !self.early.is_empty() {
            self.take_early_responses(id, out);
        }
        false
    }

    /// A header block in the response direction: response headers (1xx skipped), trailers,
    /// or both at once (Trailers-Only).
    fn response_block(
        &mut self,
        block: &Block,
        fields: &Fields,
        end_ns: u64,
        out: &mut ParserOutput,
    ) {
        let response = EarlyResponse {
            stream: block.stream,
            status: fields.status,
            grpc_status: fields.grpc_status,
            fields_lost: fields.unknown > 0,
            end_stream: block.end_stream,
            end_ns,
            tid: block.first.tid,
        };
        if self.streams.find(block.stream).is_none() {
            // Streams not followed: pushed ones (even), dropped requests, joined late; or, on
            // the client side, a request whose event has not come yet.
            if self.role == Some(Role::Client) && !block.stream.is_multiple_of(2) {
                if self.early.len() >= MAX_EARLY_RESPONSES {
                    self.early.remove(0);
                }
                self.early.push(response);
            }
            return;
        }
        self.apply_response(&response, out);
    }

    /// The request of stream `id` was just seen: the response blocks that came before it.
    fn take_early_responses(&mut self, id: u32, out: &mut ParserOutput) {
        while let Some(i) = self.early.iter().position(|r| r.stream == id) {
            let response = self.early.remove(i);
            self.apply_response(&response, out);
        }
    }

    fn apply_response(&mut self, response: &EarlyResponse, out: &mut ParserOutput) {
        let id = response.stream;
        let Some(stream) = self.streams.get_mut(id) else {
            return;
        };
        stream.maybe_lost = false;
        stream.fields_lost |= response.fields_lost;
        stream.response_tid.get_or_insert(response.tid);
        if !stream.response_seen {
            match response.status {
                Some(100..=199) if !response.end_stream => return, // interim: wait for the final
                status => {
                    // A status hidden in an unknown field is taken as final (1xx are rare).
                    stream.response_seen = true;
                    stream.status = status;
                    out.responses_started.push(u64::from(id));
                }
            }
        } else if stream.status.is_none() {
            stream.status = response.status.filter(|s| *s >= 200);
        }
        if response.grpc_status.is_some() {
            stream.grpc_status = response.grpc_status;
        }
        if response.end_stream {
            self.finish(id, response.end_ns, None, out);
        }
    }
}

/// Where a direction is in its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// No byte seen yet.
    Start,
    /// Inside the client preface; this many bytes of it matched.
    Preface(u8),
    /// Reading a frame header; this many bytes of it are in `header`.
    Header(u8),
    /// Inside the payload of `frame`.
    Payload,
    /// Framing lost: waiting for a chunk that starts with a plausible frame. `after_error`: a
    /// parse error caused it (chunks that fail count towards giving up).
    Resync { after_error: bool },
}

/// A header block being reassembled (HEADERS or PUSH_PROMISE, then CONTINUATIONs).
#[derive(Clone, Copy, Debug)]
struct Block {
    stream: u32,
    push: bool,
    /// The HEADERS frame had END_STREAM.
    end_stream: bool,
    /// The chunk holding the first byte of the block's first frame.
    first: ChunkMeta,
    /// Bytes of it were lost, or it outgrew [`MAX_HEADER_BLOCK`]: skipped, not decoded (the
    /// HPACK state loss was counted then).
    unusable: bool,
}

/// Fields of one header block that kspan keeps. Only these values are ever copied out of a
/// block; the others are looked at and forgotten.
#[derive(Debug, Default)]
struct Fields {
    method: Option<CompactString>,
    path: Option<CompactString>,
    scheme: Option<CompactString>,
    authority: Option<CompactString>,
    host: Option<CompactString>,
    user_agent: Option<CompactString>,
    grpc: bool,
    context: Vec<(String, String)>,
    status: Option<u16>,
    grpc_status: Option<u32>,
    /// Fields whose name could not be known.
    unknown: u32,
}

impl Fields {
    fn clear(&mut self) {
        self.method = None;
        self.path = None;
        self.scheme = None;
        self.authority = None;
        self.host = None;
        self.user_agent = None;
        self.grpc = false;
        self.context.clear();
        self.status = None;
        self.grpc_status = None;
        self.unknown = 0;
    }

    fn add(&mut self, field: Field<'_>) {
        let Field::Known { name, value } = field else {
            self.unknown += 1;
            return;
        };
        let slot = match name {
            b":method" => &mut self.method,
            b":path" => &mut self.path,
            b":scheme" => &mut self.scheme,
            b":authority" => &mut self.authority,
            b"host" => &mut self.host,
            b"user-agent" => &mut self.user_agent,
            b"content-type" => {
                self.grpc = value.starts_with(b"application/grpc");
                return;
            }
            b":status" => {
                self.status = parse_decimal(value)
                    .and_then(|s| u16::try_from(s).ok())
                    .filter(|s| (100..=999).contains(s));
                return;
            }
            b"grpc-status" => {
                self.grpc_status = parse_decimal(value).and_then(|s| u32::try_from(s).ok());
                return;
            }
            _ => {
                if let Some(known) = CONTEXT_HEADERS.iter().find(|k| k.as_bytes() == name)
                    && self.context.len() < MAX_CONTEXT_HEADERS
                {
                    self.context
                        .push(((*known).to_owned(), limited_string(value).into()));
                }
                return;
            }
        };
        if slot.is_none() {
            *slot = Some(limited_string(value));
        }
    }
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &b| {
        b.is_ascii_digit().then(|| acc * 10 + u64::from(b - b'0'))
    })
}

/// One direction of the connection.
struct Half {
    direction: Direction,
    state: State,
    /// The frame header being read.
    header: [u8; HEADER_LEN],
    /// The frame whose payload is being read.
    frame: FrameHeader,
    /// Its payload bytes still to come.
    remaining: u32,
    /// The chunk holding its first byte.
    frame_first: ChunkMeta,
    /// DATA with PADDED: the pad length byte is still to come.
    pad_pending: bool,
    /// The header block being reassembled, and its bytes (reused; at most
    /// `MAX_HEADER_BLOCK`). A HEADERS or PUSH_PROMISE frame's pad length, priority fields and
    /// padding are removed when the frame ends.
    block: Option<Block>,
    block_buf: Vec<u8>,
    /// SETTINGS: the entry being read. GOAWAY: last stream id and error code.
    ctl: [u8; 8],
    ctl_len: u8,
    /// Bytes of the control payload were not captured: the rest of it is ignored.
    ctl_lost: bool,
    hpack: hpack::Decoder,
    /// Reused for each header block.
    fields: Fields,
}

/// Never prints header bytes or values (they may hold credentials).
impl std::fmt::Debug for Half {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Half")
            .field("direction", &self.direction)
            .field("state", &self.state)
            .field("frame", &self.frame)
            .field("remaining", &self.remaining)
            .field("block", &self.block)
            .field("buffered_bytes", &self.block_buf.len())
            .field("hpack", &self.hpack)
            .finish()
    }
}

impl Half {
    fn new(direction: Direction) -> Self {
        Half {
            direction,
            state: State::Start,
            header: [0; HEADER_LEN],
            frame: FrameHeader::parse(&[0; HEADER_LEN]),
            remaining: 0,
            frame_first: ChunkMeta::default(),
            pad_pending: false,
            block: None,
            block_buf: Vec::new(),
            ctl: [0; 8],
            ctl_len: 0,
            ctl_lost: false,
            hpack: hpack::Decoder::new(),
            fields: Fields::default(),
        }
    }

    /// Heap bytes held by this direction: its block buffer and HPACK decoder.
    fn memory_bytes(&self) -> usize {
        self.block_buf.capacity() + self.hpack.memory_bytes()
    }

    /// One syscall's bytes: `data`, then the uncaptured gap (skipped by length while it lies
    /// inside a frame's payload; a frame header in it loses framing), then `tail`, the syscall's
    /// last bytes: the continuation of the bytes when framing held across the gap, else where
    /// framing may resume ([`resync_in_tail`](Self::resync_in_tail)).
    fn feed(&mut self, sh: &mut Shared, chunk: &Chunk<'_>, out: &mut ParserOutput) {
        let (data, tail) = (chunk.data, chunk.tail);
        let captured = data.len() as u64 + tail.len() as u64;
        let total = chunk.full_len.max(captured);
        if total == 0 {
            return;
        }
        let gap = total - captured;
        let meta = ChunkMeta {
            start_ns: chunk.start_ns,
            end_ns: chunk.end_ns,
            tid: chunk.tid,
        };
        if self.state == State::Start {
            self.first_chunk(sh, data);
        }
        if let State::Resync { after_error } = self.state {
            // Writers write whole frames per syscall: a chunk that starts with a frame header
            // is where framing resumes; failing that, the syscall's end, if captured (its tail,
            // or all of it), when it ends with whole frames.
            if !frame::frames_plausible(data, sh.max_frame[index(self.direction)]) {
                let end = match (tail.is_empty(), gap) {
                    (false, _) => tail,
                    (true, 0) => data,
                    (true, _) => &[],
                };
                if !self.resync_in_tail(sh, end, meta, out) && after_error {
                    sh.bad_chunk();
                }
                return;
            }
            self.state = State::Header(0);
        }
        if !self.frames(sh, data, meta, out) {
            return;
        }
        // A chunk framed without error: the connection is HTTP/2.
        sh.bad_chunks = 0;
        if gap > 0 {
            self.uncaptured(sh, gap, meta, out);
        }
        match self.state {
            // Framing was lost in the gap.
            State::Resync { after_error: false } => {
                self.resync_in_tail(sh, tail, meta, out);
            }
            // A frame that ended in the gap broke the rules.
            State::Resync { after_error: true } => {}
            // The gap lay inside one frame's payload (or there was none): the tail continues
            // the bytes.
            _ => {
                self.frames(sh, tail, meta, out);
            }
        }
    }

    /// Frames `bytes`, the continuation of this direction's bytes (split anywhere). False: a
    /// parse error stopped it (the direction resynchronises).
    fn frames(
        &mut self,
        sh: &mut Shared,
        bytes: &[u8],
        meta: ChunkMeta,
        out: &mut ParserOutput,
    ) -> bool {
        let len = bytes.len();
        let mut pos = 0;
        while pos < len {
            match self.state {
                State::Preface(matched) => {
                    let want = &PREFACE[usize::from(matched)..];
                    let take = want.len().min(len - pos);
                    if bytes[pos..pos + take] != want[..take] {
                        self.parse_error(sh, out);
                        return false;
                    }
                    pos += take;
                    self.preface_bytes(sh, take);
                }
                State::Header(have) => {
                    let have = usize::from(have);
                    if have == 0 {
                        self.frame_first = meta;
                    }
                    let take = (HEADER_LEN - have).min(len - pos);
                    self.header[have..have + take].copy_from_slice(&bytes[pos..pos + take]);
                    pos += take;
                    if have + take < HEADER_LEN {
                        self.state = State::Header((have + take) as u8);
                    } else if !self.begin_frame(sh, FrameHeader::parse(&self.header), meta, out) {
                        return false;
                    }
                }
                State::Payload => {
                    let take = (self.remaining as usize).min(len - pos);
                    if !self.payload(sh, &bytes[pos..pos + take], out) {
                        return false;
                    }
                    pos += take;
                    self.remaining -= take as u32;
                    if self.remaining == 0 && !self.end_frame(sh, meta, out) {
                        return false;
                    }
                }
                State::Start | State::Resync { .. } => return false,
            }
        }
        true
    }

    /// Framing was lost before `tail`, a syscall's last bytes (its captured tail, or all of a
    /// syscall captured whole): it resumes at the first frame of the chain of whole, plausible
    /// frames that ends exactly at the syscall's end, if there is one (see
    /// `frame::resync_offset` for the rule). The loss was counted already; the HPACK table was
    /// marked unknown then. True if framing resumed.
    fn resync_in_tail(
        &mut self,
        sh: &mut Shared,
        tail: &[u8],
        meta: ChunkMeta,
        out: &mut ParserOutput,
    ) -> bool {
        let Some(start) = frame::resync_offset(tail, sh.max_frame[index(self.direction)]) else {
            return false;
        };
        self.state = State::Header(0);
        if self.frames(sh, &tail[start..], meta, out) {
            sh.bad_chunks = 0;
        }
        true
    }

    /// The first bytes of this direction: the client preface, or frames (the direction was
    /// joined after its start, or is the server's), or the middle of something (joined late).
    fn first_chunk(&mut self, sh: &mut Shared, data: &[u8]) {
        if frame::starts_preface(data) {
            self.state = State::Preface(0);
            sh.from_start = true;
            return;
        }
        // A server's first frame is a SETTINGS frame: anything else means header blocks may
        // have flowed before, and the HPACK table is unknown (reported if it shows).
        let settings_first =
            data.len() >= HEADER_LEN && data[3] == SETTINGS && data[4] & frame::ACK == 0;
        if !settings_first {
            self.hpack.lose_state(false);
        }
        // The other direction started with the preface: this one starts with frames (the
        // framing rules judge them). Otherwise it may have been joined in the middle of a
        // frame: it starts where a chunk looks like frames. A chunk too short to judge is
        // taken as a frame start (chunks start with frames far more often than not; if it was
        // not one, a parse error follows).
        if sh.from_start
            || data.len() < HEADER_LEN
            || frame::frames_plausible(data, sh.max_frame[index(self.direction)])
        {
            self.state = State::Header(0);
        } else {
            self.state = State::Resync { after_error: false };
        }
    }

    /// `n` more bytes of the preface went by.
    fn preface_bytes(&mut self, sh: &mut Shared, n: usize) {
        let State::Preface(matched) = self.state else {
            return;
        };
        let matched = usize::from(matched) + n;
        if matched < PREFACE.len() {
            self.state = State::Preface(matched as u8);
            return;
        }
        self.state = State::Header(0);
        // The client writes the preface.
        sh.role.get_or_insert(match self.direction {
            Direction::Egress => Role::Client,
            Direction::Ingress => Role::Server,
        });
    }

    /// A frame header was read. False: a parse error (the direction resynchronises).
    fn begin_frame(
        &mut self,
        sh: &mut Shared,
        h: FrameHeader,
        meta: ChunkMeta,
        out: &mut ParserOutput,
    ) -> bool {
        // A header block in progress admits only its own CONTINUATION frames (§6.10).
        let in_sequence = match (&self.block, h.kind) {
            (Some(block), CONTINUATION) => block.stream == h.stream,
            (Some(_), _) | (None, CONTINUATION) => false,
            (None, _) => true,
        };
        // Frames larger than the receiver accepts are errors; known on connections seen from
        // their start only (a SETTINGS sent before kspan joined may have raised it).
        let too_long = sh.from_start && h.len > sh.max_frame[index(self.direction)];
        if !h.is_valid() || !in_sequence || too_long {
            self.parse_error(sh, out);
            return false;
        }
        self.frame = h;
        self.remaining = h.len;
        self.pad_pending = false;
        self.ctl_len = 0;
        self.ctl_lost = false;
        match h.kind {
            DATA if h.has(PADDED) => self.pad_pending = true,
            DATA => sh.add_body(self.direction, h.stream, h.len),
            HEADERS | PUSH_PROMISE => {
                self.block = Some(Block {
                    stream: h.stream,
                    push: h.kind == PUSH_PROMISE,
                    end_stream: h.kind == HEADERS && h.has(END_STREAM),
                    first: self.frame_first,
                    unusable: false,
                });
                self.block_buf.clear();
                self.check_block_room(h.len, out);
            }
            CONTINUATION => self.check_block_room(h.len, out),
            _ => {}
        }
        self.state = State::Payload;
        if h.len == 0 {
            return self.end_frame(sh, meta, out);
        }
        true
    }

    /// A header block frame of `len` bytes begins: past [`MAX_HEADER_BLOCK`], the block is
    /// dropped and the HPACK state with it.
    fn check_block_room(&mut self, len: u32, out: &mut ParserOutput) {
        if let Some(block) = &mut self.block
            && !block.unusable
            && self.block_buf.len() + len as usize > MAX_HEADER_BLOCK
        {
            block.unusable = true;
            out.counts.limits_hit += 1;
            out.counts.desynchronised += 1;
            self.hpack.lose_state(true);
            self.clear_block_buf();
        }
    }

    /// Captured payload bytes of the current frame. False: a parse error.
    fn payload(&mut self, sh: &mut Shared, bytes: &[u8], out: &mut ParserOutput) -> bool {
        let h = self.frame;
        match h.kind {
            DATA => {
                if self.pad_pending
                    && let Some(&pad) = bytes.first()
                {
                    self.pad_pending = false;
                    let Some(body) = h.len.checked_sub(1 + u32::from(pad)) else {
                        self.parse_error(sh, out);
                        return false;
                    };
                    sh.add_body(self.direction, h.stream, body);
                }
            }
            HEADERS | PUSH_PROMISE | CONTINUATION if self.block.is_some_and(|b| !b.unusable) => {
                self.block_buf.extend_from_slice(bytes);
            }
            SETTINGS if !self.ctl_lost => {
                for &b in bytes {
                    self.ctl[usize::from(self.ctl_len)] = b;
                    self.ctl_len += 1;
                    if self.ctl_len == 6 {
                        self.ctl_len = 0;
                        self.setting(sh);
                    }
                }
            }
            GOAWAY if !self.ctl_lost => {
                let have = usize::from(self.ctl_len);
                let take = (8 - have).min(bytes.len());
                self.ctl[have..have + take].copy_from_slice(&bytes[..take]);
                self.ctl_len += take as u8;
            }
            _ => {}
        }
        true
    }

    /// A SETTINGS entry sent in this direction. SETTINGS_MAX_FRAME_SIZE bounds the frames
    /// coming the other way (resynchronisation checks); SETTINGS_HEADER_TABLE_SIZE is not
    /// needed: the encoder announces the table size it uses with a size update in a header
    /// block, which the decoder follows.
    fn setting(&mut self, sh: &mut Shared) {
        let id = u16::from_be_bytes([self.ctl[0], self.ctl[1]]);
        let value = u32::from_be_bytes([self.ctl[2], self.ctl[3], self.ctl[4], self.ctl[5]]);
        if id == frame::SETTINGS_MAX_FRAME_SIZE {
            // Until the peer applies a lower value it may still send larger frames: keep the
            // largest.
            let limit = &mut sh.max_frame[index(opposite(self.direction))];
            *limit = (*limit).max(value.min((1 << 24) - 1));
        }
    }

    /// The current frame's payload is complete. False: a parse error.
    fn end_frame(&mut self, sh: &mut Shared, meta: ChunkMeta, out: &mut ParserOutput) -> bool {
        self.state = State::Header(0);
        let h = self.frame;
        match h.kind {
            DATA => {
                if self.pad_pending {
                    // The pad length was not captured: count the rest as body.
                    self.pad_pending = false;
                    sh.add_body(self.direction, h.stream, h.len - 1);
                }
                if h.has(END_STREAM) {
                    sh.end_stream(self.direction, h.stream, meta.end_ns, out);
                }
            }
            HEADERS | PUSH_PROMISE | CONTINUATION => {
                if h.kind != CONTINUATION && !self.strip_block_prefix() {
                    self.parse_error(sh, out);
                    return false;
                }
                if h.has(END_HEADERS) {
                    self.finish_block(sh, meta, out);
                }
            }
            RST_STREAM => sh.finish(h.stream, meta.end_ns, Some(ExchangeError::StreamReset), out),
            GOAWAY if self.ctl_len == 8 => {
                let last = u32::from_be_bytes([self.ctl[0], self.ctl[1], self.ctl[2], self.ctl[3]]);
                sh.goaway(self.direction, last & 0x7fff_ffff, meta.end_ns, out);
            }
            _ => {}
        }
        true
    }

    /// Removes the pad length, priority fields or promised stream id, and the padding, of the
    /// block's first frame (the whole of `block_buf`). False: the padding does not fit.
    fn strip_block_prefix(&mut self) -> bool {
        if self.block.is_none_or(|b| b.unusable) {
            return true;
        }
        let h = self.frame;
        let prefix = h.block_prefix() as usize;
        let pad = match self.block_buf.first() {
            Some(&pad) if h.has(PADDED) => usize::from(pad),
            _ => 0,
        };
        if prefix + pad > self.block_buf.len() {
            return false;
        }
        self.block_buf.truncate(self.block_buf.len() - pad);
        self.block_buf.drain(..prefix);
        true
    }

    /// The header block is complete: decode it (pushed ones too: their fields are ignored but
    /// the HPACK table must follow them) and act on it.
    fn finish_block(&mut self, sh: &mut Shared, meta: ChunkMeta, out: &mut ParserOutput) {
        let Some(block) = self.block.take() else {
            return;
        };
        let mut desynchronised = false;
        let mut decoded = false;
        if !block.unusable {
            self.fields.clear();
            let fields = &mut self.fields;
            let outcome = self
                .hpack
                .decode(&self.block_buf, |field| fields.add(field));
            if outcome.malformed {
                out.counts.parse_errors += 1;
            }
            if outcome.over_limit {
                out.counts.limits_hit += 1;
            }
            desynchronised = outcome.newly_lost;
            decoded = !outcome.malformed;
        }
        self.clear_block_buf();
        if block.push {
            // Server push is never traced as a request of the client: counted as a bound.
            out.counts.limits_hit += 1;
        } else {
            let fields = decoded.then_some(&mut self.fields);
            desynchronised |= sh.header_block(self.direction, &block, fields, meta.end_ns, out);
        }
        if desynchronised {
            out.counts.desynchronised += 1;
        }
    }

    /// `lost` bytes between the captured ones (a syscall's head and tail) or past them:
    /// skipped by length inside the current frame's payload (nothing is lost inside a DATA
    /// payload; inside a header block, the block and the HPACK table are); a frame header among
    /// them loses framing.
    fn uncaptured(
        &mut self,
        sh: &mut Shared,
        mut lost: u64,
        meta: ChunkMeta,
        out: &mut ParserOutput,
    ) {
        match self.state {
            State::Payload => {
                let in_frame = lost.min(u64::from(self.remaining)) as u32;
                self.skip_payload(sh, out);
                self.remaining -= in_frame;
                lost -= u64::from(in_frame);
                if self.remaining == 0 && !self.end_frame(sh, meta, out) {
                    return;
                }
            }
            State::Preface(matched) => {
                let left = (PREFACE.len() - usize::from(matched)) as u64;
                let n = lost.min(left);
                self.preface_bytes(sh, n as usize);
                lost -= n;
            }
            _ => {}
        }
        if lost > 0 && matches!(self.state, State::Header(_)) {
            self.lose_framing(sh, out);
        }
    }

    /// Payload bytes of the current frame were not captured (from its next byte on).
    fn skip_payload(&mut self, sh: &mut Shared, out: &mut ParserOutput) {
        match self.frame.kind {
            DATA if self.pad_pending => {
                // The pad length was not captured (the rest of the frame may be, in the tail):
                // count the rest as body.
                self.pad_pending = false;
                sh.add_body(self.direction, self.frame.stream, self.frame.len - 1);
            }
            HEADERS | PUSH_PROMISE | CONTINUATION => {
                if let Some(block) = &mut self.block
                    && !block.unusable
                {
                    // The block can't be decoded, nor the table kept.
                    block.unusable = true;
                    out.counts.desynchronised += 1;
                    self.hpack.lose_state(true);
                    self.clear_block_buf();
                }
            }
            SETTINGS | GOAWAY => self.ctl_lost = true,
            _ => {}
        }
    }

    /// A frame header was not captured: the frames that follow can't be found, and what they
    /// held is unknown: stream ends, and header blocks, whose insertions shift the HPACK
    /// table's indices (the table becomes unknown: a later reference to an entry not seen since
    /// is a missing header, never a guess).
    fn lose_framing(&mut self, sh: &mut Shared, out: &mut ParserOutput) {
        out.counts.desynchronised += 1;
        self.forget(sh);
        self.state = State::Resync { after_error: false };
    }

    /// Bytes that break framing rules: resynchronise at the next chunk start.
    fn parse_error(&mut self, sh: &mut Shared, out: &mut ParserOutput) {
        out.counts.parse_errors += 1;
        self.forget(sh);
        self.state = State::Resync { after_error: true };
    }

    /// Drops what depended on the bytes that follow being read.
    fn forget(&mut self, sh: &mut Shared) {
        self.block = None;
        self.clear_block_buf();
        self.pad_pending = false;
        self.hpack.lose_state(true);
        sh.mark_maybe_lost();
    }

    /// Empties the block buffer; a buffer grown by a large block is given back.
    fn clear_block_buf(&mut self) {
        self.block_buf.clear();
        if self.block_buf.capacity() > KEPT_BUFFER_CAPACITY {
            self.block_buf = Vec::new();
        }
    }
}
