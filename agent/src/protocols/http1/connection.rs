//! The per-connection state machine: two half-streams (one per direction) that frame messages,
//! and a FIFO of requests waiting for their response.

use std::collections::VecDeque;

use super::chunked::{ChunkedDecoder, ChunkedOutcome, ends_with_last_chunk};
use super::message::{
    self, BodyFraming, Class, EndScan, Kind, ParsedRequest, ParsedResponse, check_start_line,
    classify,
};
use crate::protocols::http::{HttpPayload, HttpRequest, HttpResponse};
use crate::protocols::{
    Chunk, Direction, Exchange, ExchangeError, ParserOutput, Payload, ProtocolParser,
    REQUEST_STRINGS, RequestStart, Role,
};

/// Most header bytes buffered per message (start line and terminating empty line included).
pub(super) const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Header buffer capacity kept between messages (a larger one is freed after its message).
const KEPT_BUFFER_CAPACITY: usize = 4096;
/// Most requests waiting for a response.
pub(super) const MAX_PENDING: usize = 64;

/// HTTP/1.x parser for one connection (both directions).
///
/// Feed it every syscall's bytes in order with [`Http1Connection::feed`]; it returns the
/// exchanges completed by each syscall and counts parse errors. Call [`Http1Connection::close`]
/// when the connection ends.
#[derive(Debug)]
pub struct Http1Connection {
    ingress: HalfStream,
    egress: HalfStream,
    shared: Shared,
}

// No `Default`: callers use `new()` (a `Default` impl makes clippy flag their
// `Box::new(Http1Connection::new())`).
#[allow(clippy::new_without_default)]
impl Http1Connection {
    pub fn new() -> Self {
        Http1Connection {
            ingress: HalfStream::new(),
            egress: HalfStream::new(),
            shared: Shared {
                role: None,
                upgraded: false,
                pending: VecDeque::new(),
                started: Vec::new(),
                responses_started: Vec::new(),
                next_id: 0,
                limits_hit: 0,
            },
        }
    }

    /// Header blocks dropped for a bound (capture, header buffer) since the last call; `feed`
    /// returns the malformed ones.
    pub fn take_limits_hit(&mut self) -> u64 {
        std::mem::take(&mut self.shared.limits_hit)
    }

    /// Protocol detection on the first bytes of a connection, in either direction: a request
    /// line of a known method (GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE, PATCH)
    /// followed by a space, or "HTTP/1.". No allocation.
    pub fn looks_like_http1(data: &[u8]) -> bool {
        message::looks_like_http1(data)
    }

    /// The role, once a first request start line was seen (None before).
    pub fn role(&self) -> Option<Role> {
        self.shared.role
    }

    /// Requests whose header block was parsed since the last call, oldest first.
    pub fn take_request_starts(&mut self, out: &mut Vec<RequestStart>) {
        out.append(&mut self.shared.started);
    }

    /// Ids of the requests whose final response began (its header block was parsed) since the
    /// last call.
    pub fn take_responses_started(&mut self, out: &mut Vec<u64>) {
        out.append(&mut self.shared.responses_started);
    }

    /// Consumes one syscall's bytes; pushes every exchange they complete to `out`. Returns the
    /// number of parse errors detected.
    pub fn feed(&mut self, chunk: &Chunk<'_>, out: &mut Vec<Exchange>) -> u64 {
        if self.shared.upgraded {
            return 0;
        }
        let half = match chunk.direction {
            Direction::Ingress => &mut self.ingress,
            Direction::Egress => &mut self.egress,
        };
        half.feed(&mut self.shared, chunk, out)
    }

    /// The connection closed at `end_ns`: completes a response delimited by the close, and
    /// emits every request still waiting for its response with `ConnectionClosed`. The parser is
    /// then reset (ready for a new connection).
    pub fn close(&mut self, end_ns: u64, out: &mut Vec<Exchange>) {
        for half in [&mut self.ingress, &mut self.egress] {
            if let Some(in_flight) = half.response.take() {
                let until_close = matches!(
                    half.state,
                    State::Body {
                        framing: Framing::UntilClose,
                        ..
                    }
                );
                if until_close {
                    out.extend(in_flight.request.answered(
                        in_flight.response,
                        end_ns,
                        in_flight.response_tid,
                    ));
                } else if let Some(request) = in_flight.request.request {
                    out.push(closed(&in_flight.request.meta, request, end_ns));
                }
            }
        }
        for pending in self.shared.pending.drain(..) {
            if let Some(request) = pending.request {
                out.push(closed(&pending.meta, request, end_ns));
            }
        }
        self.ingress.reset();
        self.egress.reset();
        self.shared.role = None;
        self.shared.upgraded = false;
        self.shared.started.clear();
        self.shared.responses_started.clear();
        self.shared.next_id = 0;
    }
}

impl ProtocolParser for Http1Connection {
    fn feed(&mut self, chunk: &Chunk<'_>, out: &mut ParserOutput) {
        // Request and response starts go straight into the caller's vectors (swapped in for the
        // call, which the pipeline reuses between chunks): a connection allocates none of its
        // own, which a fresh connection per request would pay for each time.
        std::mem::swap(&mut self.shared.started, &mut out.request_starts);
        std::mem::swap(
            &mut self.shared.responses_started,
            &mut out.responses_started,
        );
        out.counts.parse_errors += Http1Connection::feed(self, chunk, &mut out.exchanges);
        out.counts.limits_hit += self.take_limits_hit();
        std::mem::swap(&mut self.shared.started, &mut out.request_starts);
        std::mem::swap(
            &mut self.shared.responses_started,
            &mut out.responses_started,
        );
    }

    fn close(&mut self, end_ns: u64, out: &mut ParserOutput) {
        Http1Connection::close(self, end_ns, &mut out.exchanges);
    }

    fn switched(&self) -> bool {
        self.shared.upgraded
    }

    fn memory_bytes(&self) -> usize {
        let sh = &self.shared;
        let responses = [&self.ingress, &self.egress]
            .iter()
            .filter(|h| h.response.is_some())
            .count();
        self.ingress.buf.capacity()
            + self.egress.buf.capacity()
            + sh.pending.capacity() * std::mem::size_of::<PendingRequest>()
            + responses * std::mem::size_of::<InFlight>()
            + (sh.pending.len() + responses) * REQUEST_STRINGS
    }

    fn holds_partial(&self) -> bool {
        !self.ingress.buf.is_empty() || !self.egress.buf.is_empty()
    }

    fn release_spare(&mut self) {
        for half in [&mut self.ingress, &mut self.egress] {
            if half.buf.is_empty() {
                half.buf = Vec::new();
            }
        }
    }
}

/// Connection-wide state shared by both directions.
#[derive(Debug)]
struct Shared {
    role: Option<Role>,
    /// A 101 (or a 2xx to CONNECT) was seen: the bytes that follow are not HTTP/1.
    upgraded: bool,
    /// Requests whose headers were parsed, oldest first, waiting for their response.
    pending: VecDeque<PendingRequest>,
    /// Requests parsed since the last `take_request_starts` (bounded like `pending`).
    started: Vec<RequestStart>,
    /// Ids of requests whose final response began since the last `take_responses_started`.
    responses_started: Vec<u64>,
    /// Id of the next request: its number on the connection (placeholders included, so the
    /// numbers follow the wire).
    next_id: u64,
    /// Header blocks dropped because they outgrew a bound (the capture, the header buffer)
    /// since the last chunk: limits hit, not malformed bytes.
    limits_hit: u64,
}

impl Shared {
    /// The direction carrying requests, once the role is known.
    fn request_direction(&self) -> Option<Direction> {
        self.role.map(|role| match role {
            Role::Server => Direction::Ingress,
            Role::Client => Direction::Egress,
        })
    }

    /// Which message kinds may start in `direction`: (requests, responses).
    fn allowed(&self, direction: Direction) -> (bool, bool) {
        match self.request_direction() {
            None => (true, true),
            Some(d) if d == direction => (true, false),
            Some(_) => (false, true),
        }
    }

    /// Queues a request; returns 1 (a parse error) when the oldest had to be dropped.
    fn push_pending(&mut self, mut pending: PendingRequest) -> u64 {
        pending.meta.id = self.next_id;
        self.next_id += 1;
        if let Some(request) = &pending.request
            && self.started.len() < MAX_PENDING
        {
            self.started.push(RequestStart {
                role: pending.meta.role,
                id: pending.meta.id,
                id_on_wire: false,
                multiplexed: false,
                tid: pending.meta.tid,
                start_ns: pending.meta.start_ns,
                method: request.method.clone(),
                target: request.target.clone(),
                context_headers: request.context_headers.clone(),
            });
        }
        let mut errors = 0;
        if self.pending.len() >= MAX_PENDING {
            self.pending.pop_front();
            errors = 1;
        }
        self.pending.push_back(pending);
        errors
    }
}

/// Where and when the request started.
#[derive(Clone, Copy, Debug)]
struct RequestMeta {
    role: Role,
    /// Set when queued (see `Shared::next_id`).
    id: u64,
    start_ns: u64,
    tid: u32,
}

#[derive(Debug)]
struct PendingRequest {
    /// None: a placeholder for a request that started well but was dropped (oversized header
    /// block, uncaptured bytes, malformed header): its response is consumed silently so that the
    /// following responses stay paired with their requests.
    request: Option<HttpRequest>,
    meta: RequestMeta,
    is_head: bool,
    is_connect: bool,
}

impl PendingRequest {
    /// The exchange this request and its response make; None for a dropped placeholder.
    fn answered(self, response: HttpResponse, end_ns: u64, response_tid: u32) -> Option<Exchange> {
        let request = self.request?;
        Some(exchange(
            &self.meta,
            request,
            Some(response),
            end_ns,
            response_tid,
        ))
    }
}

/// A response whose headers were parsed, its body still arriving.
#[derive(Debug)]
struct InFlight {
    request: PendingRequest,
    response: HttpResponse,
    response_tid: u32,
}

/// Syscall facts of a message's first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ChunkMeta {
    start_ns: u64,
    end_ns: u64,
    tid: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    Length {
        remaining: u64,
    },
    Chunked(ChunkedDecoder),
    /// Response body delimited by the connection's close.
    UntilClose,
    /// Chunked body after uncaptured bytes hid its framing: it ends at the first later syscall
    /// fully captured that ends with the last chunk.
    LostSync,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Expecting the start of a message.
    Idle,
    /// Buffering a header block.
    Header(HeaderProgress),
    /// Skipping a body.
    Body { kind: Kind, framing: Framing },
    /// After a parse error: skipping until a syscall starts with a valid start line.
    Garbage,
}

/// One direction of the connection.
struct HalfStream {
    state: State,
    /// Header bytes of the message being read (reused; at most `MAX_HEADER_BYTES`).
    buf: Vec<u8>,
    /// The response being received in this direction (paired with its request).
    response: Option<InFlight>,
    /// The request whose body is being received in this direction (it is `pending.back()`
    /// while it stays queued), to count chunked body bytes.
    request_body: bool,
}

/// Never prints the buffered header bytes (they may hold credentials).
impl std::fmt::Debug for HalfStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HalfStream")
            .field("state", &self.state)
            .field("buffered_bytes", &self.buf.len())
            .field("response", &self.response)
            .field("request_body", &self.request_body)
            .finish()
    }
}

impl HalfStream {
    fn new() -> Self {
        HalfStream {
            state: State::Idle,
            buf: Vec::new(),
            response: None,
            request_body: false,
        }
    }

    fn reset(&mut self) {
        self.state = State::Idle;
        self.clear_buf();
        self.response = None;
        self.request_body = false;
    }

    fn feed(&mut self, sh: &mut Shared, chunk: &Chunk<'_>, out: &mut Vec<Exchange>) -> u64 {
        let data = chunk.data;
        let cap = data.len() as u64;
        let total = chunk.full_len.max(cap);
        if total == 0 {
            return 0;
        }
        let meta = ChunkMeta {
            start_ns: chunk.start_ns,
            end_ns: chunk.end_ns,
            tid: chunk.tid,
        };
        let direction = chunk.direction;
        match self.state {
            State::Garbage => {
                let (req, resp) = sh.allowed(direction);
                if data.is_empty() || classify(data, req, resp) == Class::Invalid {
                    return 0;
                }
                self.state = State::Idle;
            }
            State::Body {
                kind,
                framing: Framing::LostSync,
            } => {
                // Sync was lost in an earlier syscall: this whole one belongs to the body.
                self.add_body(sh, kind, total);
                if cap == total && ends_with_last_chunk(data) {
                    self.finish(kind, meta.end_ns, out);
                }
                return 0;
            }
            _ => {}
        }

        let mut errors = 0;
        let mut pos: u64 = 0;
        while pos < total && !sh.upgraded {
            match self.state {
                State::Idle => {
                    // Empty lines between messages are tolerated (RFC 9112 §2.2).
                    while pos < cap && matches!(data[pos as usize], b'\r' | b'\n') {
                        pos += 1;
                    }
                    if pos == total {
                        break;
                    }
                    if pos >= cap {
                        // A message starts in uncaptured bytes: it can't be read.
                        errors += 1;
                        self.state = State::Garbage;
                        break;
                    }
                    self.buf.clear();
                    self.state = State::Header(HeaderProgress {
                        kind: None,
                        first: meta,
                        scan: EndScan::Mid,
                        line_ok: false,
                        status: None,
                    });
                }
                State::Header(progress) => {
                    errors +=
                        self.header_step(sh, direction, progress, data, total, &mut pos, meta, out);
                }
                State::Body { kind, framing } => {
                    errors += self.body_step(sh, kind, framing, data, total, &mut pos, meta, out);
                }
                State::Garbage => break,
            }
        }
        errors
    }

    /// Reads header bytes from `data[pos..]`; on a complete block, parses it and moves on.
    #[allow(clippy::too_many_arguments)]
    fn header_step(
        &mut self,
        sh: &mut Shared,
        direction: Direction,
        mut h: HeaderProgress,
        data: &[u8],
        total: u64,
        pos: &mut u64,
        meta: ChunkMeta,
        out: &mut Vec<Exchange>,
    ) -> u64 {
        let cap = data.len() as u64;
        if *pos >= cap {
            // Uncaptured bytes inside a header block.
            sh.limits_hit += 1;
            return self.drop_message(sh, direction, &h);
        }
        let avail = &data[*pos as usize..];
        let end = h.scan.find(avail);
        let take = end.unwrap_or(avail.len());
        if self.buf.len() + take > MAX_HEADER_BYTES {
            sh.limits_hit += 1;
            return self.drop_message(sh, direction, &h);
        }
        *pos += take as u64;
        // A header block entirely in this syscall is read in place; otherwise it is buffered.
        let in_place = self.buf.is_empty() && end.is_some();
        let old_len = self.buf.len();
        if !in_place {
            self.buf.extend_from_slice(&avail[..take]);
        }
        let block: &[u8] = if in_place { &avail[..take] } else { &self.buf };
        if !check_start(sh, direction, &mut h, block, old_len) {
            return 1 + self.drop_message(sh, direction, &h);
        }
        if end.is_none() {
            self.state = State::Header(h);
            if *pos == cap && cap < total {
                // The header block goes on in uncaptured bytes.
                sh.limits_hit += 1;
                return self.drop_message(sh, direction, &h);
            }
            return 0;
        }
        match h.kind {
            Some(Kind::Request) => {
                let parsed = message::parse_request(block);
                self.clear_buf();
                self.request_headers(sh, direction, &h, parsed, total, pos)
            }
            Some(Kind::Response) => {
                let parsed = message::parse_response(block);
                self.clear_buf();
                self.response_headers(sh, direction, &h, parsed, total, pos, meta, out)
            }
            // A complete block always has a newline, which settles the kind.
            None => 1 + self.drop_message(sh, direction, &h),
        }
    }

    /// Empties the header buffer; a buffer grown by a large header block is given back.
    fn clear_buf(&mut self) {
        self.buf.clear();
        if self.buf.capacity() > KEPT_BUFFER_CAPACITY {
            self.buf = Vec::new();
        }
    }

    /// A request header block was parsed.
    fn request_headers(
        &mut self,
        sh: &mut Shared,
        direction: Direction,
        h: &HeaderProgress,
        parsed: Result<ParsedRequest, ()>,
        total: u64,
        pos: &mut u64,
    ) -> u64 {
        let Ok(ParsedRequest {
            request,
            framing,
            is_head,
            is_connect,
        }) = parsed
        else {
            *pos = total;
            return 1 + self.drop_message(sh, direction, h);
        };
        match sh.request_direction() {
            None => sh.role = Some(role_for_requests(direction)),
            Some(d) if d == direction => {}
            Some(_) => {
                // The other direction carries requests: this is garbage.
                *pos = total;
                self.state = State::Garbage;
                return 1;
            }
        }
        let role = sh.role.unwrap_or(Role::Server);
        let meta = RequestMeta {
            role,
            id: 0,
            // A read's bytes exist at its exit, a write's at its entry.
            start_ns: match direction {
                Direction::Ingress => h.first.end_ns,
                Direction::Egress => h.first.start_ns,
            },
            tid: h.first.tid,
        };
        let body = match framing {
            BodyFraming::Unspecified | BodyFraming::Length(0) => None,
            BodyFraming::Length(n) => Some(Framing::Length { remaining: n }),
            BodyFraming::Chunked => Some(Framing::Chunked(ChunkedDecoder::new())),
            BodyFraming::OtherEncoding | BodyFraming::Invalid => {
                // The body can't be delimited (RFC 9112 §6.3: the server answers 400): keep
                // the request, which will be answered, and resync after its body.
                *pos = total;
                self.state = State::Garbage;
                return 1 + sh.push_pending(PendingRequest {
                    request: Some(request),
                    meta,
                    is_head,
                    is_connect,
                });
            }
        };
        let mut request = request;
        if let BodyFraming::Length(n) = framing {
            request.body_len = n;
        }
        let errors = sh.push_pending(PendingRequest {
            request: Some(request),
            meta,
            is_head,
            is_connect,
        });
        match body {
            Some(framing) => {
                self.request_body = true;
                self.state = State::Body {
                    kind: Kind::Request,
                    framing,
                };
            }
            None => self.state = State::Idle,
        }
        errors
    }

    /// A response header block was parsed.
    #[allow(clippy::too_many_arguments)]
    fn response_headers(
        &mut self,
        sh: &mut Shared,
        direction: Direction,
        h: &HeaderProgress,
        parsed: Result<ParsedResponse, ()>,
        total: u64,
        pos: &mut u64,
        meta: ChunkMeta,
        out: &mut Vec<Exchange>,
    ) -> u64 {
        let Ok(ParsedResponse {
            mut response,
            framing,
        }) = parsed
        else {
            *pos = total;
            return 1 + self.drop_message(sh, direction, h);
        };
        if sh.request_direction() == Some(direction) {
            // Requests flow this way: a response here is garbage.
            *pos = total;
            self.state = State::Garbage;
            return 1;
        }
        let status = response.status;
        let mut errors = 0;
        let interim = (100..200).contains(&status) && status != 101;
        let request = if interim {
            // 100 Continue, 103 Early Hints...: the final response answers the request.
            if sh.pending.is_empty() {
                errors += 1;
            }
            None
        } else {
            let front = sh.pending.pop_front();
            if front.is_none() {
                // A response nobody asked for: dropped (its body is still skipped).
                errors += 1;
            } else if let Some(PendingRequest {
                request: Some(_),
                meta,
                ..
            }) = &front
                && sh.responses_started.len() < MAX_PENDING
            {
                sh.responses_started.push(meta.id);
            }
            front
        };
        let (is_head, is_connect) = request
            .as_ref()
            .map_or((false, false), |r| (r.is_head, r.is_connect));
        let response_tid = h.first.tid;

        if status == 101 || (is_connect && (200..300).contains(&status)) {
            // The connection leaves HTTP/1 (protocol switch or tunnel).
            out.extend(request.and_then(|r| r.answered(response, meta.end_ns, response_tid)));
            sh.upgraded = true;
            self.state = State::Idle;
            *pos = total;
            return errors;
        }

        let body = if interim || is_head || status == 204 || status == 304 {
            None
        } else {
            match framing {
                BodyFraming::Chunked => Some(Framing::Chunked(ChunkedDecoder::new())),
                BodyFraming::Length(0) => None,
                BodyFraming::Length(n) => {
                    response.body_len = n;
                    Some(Framing::Length { remaining: n })
                }
                BodyFraming::Unspecified | BodyFraming::OtherEncoding => Some(Framing::UntilClose),
                BodyFraming::Invalid => {
                    // Unusable Content-Length: report the exchange, then resync.
                    errors += 1;
                    out.extend(
                        request.and_then(|r| r.answered(response, meta.end_ns, response_tid)),
                    );
                    *pos = total;
                    self.state = State::Garbage;
                    return errors;
                }
            }
        };
        self.response = request.map(|request| InFlight {
            request,
            response,
            response_tid,
        });
        match body {
            Some(framing) => {
                self.state = State::Body {
                    kind: Kind::Response,
                    framing,
                }
            }
            None => self.finish(Kind::Response, meta.end_ns, out),
        }
        errors
    }

    /// Skips body bytes from `data[pos..]`.
    #[allow(clippy::too_many_arguments)]
    fn body_step(
        &mut self,
        sh: &mut Shared,
        kind: Kind,
        framing: Framing,
        data: &[u8],
        total: u64,
        pos: &mut u64,
        meta: ChunkMeta,
        out: &mut Vec<Exchange>,
    ) -> u64 {
        let cap = data.len() as u64;
        match framing {
            Framing::Length { remaining } => {
                let n = remaining.min(total - *pos);
                *pos += n;
                if n == remaining {
                    self.finish(kind, meta.end_ns, out);
                } else {
                    self.state = State::Body {
                        kind,
                        framing: Framing::Length {
                            remaining: remaining - n,
                        },
                    };
                }
                0
            }
            Framing::Chunked(mut decoder) => {
                let from = (*pos).min(cap);
                let uncaptured = total - (*pos).max(cap);
                let (n, outcome) = decoder.decode(&data[from as usize..], uncaptured);
                *pos += n;
                self.add_body(sh, kind, n);
                match outcome {
                    ChunkedOutcome::NeedMore => {
                        self.state = State::Body {
                            kind,
                            framing: Framing::Chunked(decoder),
                        };
                        0
                    }
                    ChunkedOutcome::Done => {
                        self.finish(kind, meta.end_ns, out);
                        0
                    }
                    ChunkedOutcome::LostSync => {
                        // Expected with bounded capture: not an error.
                        self.add_body(sh, kind, total - *pos);
                        *pos = total;
                        self.state = State::Body {
                            kind,
                            framing: Framing::LostSync,
                        };
                        0
                    }
                    ChunkedOutcome::Error => {
                        // The message was valid up to here: report it, then resync.
                        self.finish(kind, meta.end_ns, out);
                        *pos = total;
                        self.state = State::Garbage;
                        1
                    }
                }
            }
            Framing::UntilClose | Framing::LostSync => {
                self.add_body(sh, kind, total - *pos);
                *pos = total;
                0
            }
        }
    }

    /// Counts chunked/until-close body bytes toward the message being received.
    fn add_body(&mut self, sh: &mut Shared, kind: Kind, n: u64) {
        match kind {
            Kind::Response => {
                if let Some(in_flight) = &mut self.response {
                    in_flight.response.body_len = in_flight.response.body_len.saturating_add(n);
                }
            }
            Kind::Request => {
                if self.request_body
                    && let Some(PendingRequest {
                        request: Some(request),
                        ..
                    }) = sh.pending.back_mut()
                {
                    request.body_len = request.body_len.saturating_add(n);
                }
            }
        }
    }

    /// The message being received ended with the syscall that ended at `end_ns`.
    fn finish(&mut self, kind: Kind, end_ns: u64, out: &mut Vec<Exchange>) {
        match kind {
            Kind::Request => self.request_body = false,
            Kind::Response => {
                if let Some(in_flight) = self.response.take() {
                    out.extend(in_flight.request.answered(
                        in_flight.response,
                        end_ns,
                        in_flight.response_tid,
                    ));
                }
            }
        }
        self.state = State::Idle;
    }

    /// Drops the message whose header block is being read (the error is counted by the
    /// caller) and skips to the next syscall starting with a start line. A request or response
    /// that started with a valid start line still takes its place in the FIFO, so later
    /// responses stay paired with their requests. Returns extra errors (FIFO overflow).
    fn drop_message(&mut self, sh: &mut Shared, direction: Direction, h: &HeaderProgress) -> u64 {
        self.clear_buf();
        self.state = State::Garbage;
        if !h.line_ok {
            return 0;
        }
        let Some(request_direction) = sh.request_direction() else {
            return 0;
        };
        match h.kind {
            Some(Kind::Request) if request_direction == direction => {
                let role = sh.role.unwrap_or(Role::Server);
                sh.push_pending(PendingRequest {
                    request: None,
                    meta: RequestMeta {
                        role,
                        id: 0,
                        start_ns: 0,
                        tid: 0,
                    },
                    is_head: false,
                    is_connect: false,
                })
            }
            Some(Kind::Response) if request_direction != direction => {
                let interim = h
                    .status
                    .is_some_and(|s| (100..200).contains(&s) && s != 101);
                if !interim {
                    sh.pending.pop_front();
                }
                0
            }
            _ => 0,
        }
    }
}

/// Classifies the message from its first bytes and checks its start line once complete; the
/// first valid request start line decides the role. `bytes` holds the header bytes so far, of
/// which the first `old_len` were checked by earlier calls. False: not a valid message start.
fn check_start(
    sh: &mut Shared,
    direction: Direction,
    h: &mut HeaderProgress,
    bytes: &[u8],
    old_len: usize,
) -> bool {
    if h.kind.is_none() {
        let (req, resp) = sh.allowed(direction);
        match classify(bytes, req, resp) {
            Class::Is(kind) => h.kind = Some(kind),
            Class::Partial => return true,
            Class::Invalid => return false,
        }
    }
    let Some(kind) = h.kind else {
        return true;
    };
    if h.line_ok {
        return true;
    }
    // No LF is in the bytes checked before: the line would have been checked then.
    let Some(nl) = memchr::memchr(b'\n', &bytes[old_len..]) else {
        return true;
    };
    let Ok(status) = check_start_line(kind, &bytes[..old_len + nl + 1]) else {
        return false;
    };
    if kind == Kind::Request && sh.role.is_none() {
        sh.role = Some(role_for_requests(direction));
    }
    let request_direction = sh.request_direction();
    let right_way = match kind {
        Kind::Request => request_direction == Some(direction),
        Kind::Response => request_direction != Some(direction),
    };
    if right_way {
        h.line_ok = true;
        h.status = status;
    }
    right_way
}

/// Progress through a header block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct HeaderProgress {
    /// Known once the first bytes say request or response.
    kind: Option<Kind>,
    /// The syscall carrying the message's first byte.
    first: ChunkMeta,
    scan: EndScan,
    /// The start line was complete and valid.
    line_ok: bool,
    /// Response status read from the start line.
    status: Option<u16>,
}

/// The role of a process whose requests flow in `direction`.
fn role_for_requests(direction: Direction) -> Role {
    match direction {
        Direction::Ingress => Role::Server,
        Direction::Egress => Role::Client,
    }
}

fn exchange(
    meta: &RequestMeta,
    request: HttpRequest,
    response: Option<HttpResponse>,
    end_ns: u64,
    response_tid: u32,
) -> Exchange {
    Exchange {
        role: meta.role,
        id: meta.id,
        start_ns: meta.start_ns,
        end_ns,
        request_tid: meta.tid,
        response_tid,
        error: None,
        payload: Payload::Http(HttpPayload { request, response }),
    }
}

fn closed(meta: &RequestMeta, request: HttpRequest, end_ns: u64) -> Exchange {
    Exchange {
        error: Some(ExchangeError::ConnectionClosed),
        ..exchange(meta, request, None, end_ns, 0)
    }
}
