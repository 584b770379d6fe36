//! The per-connection state machine: framing per direction, the requests in flight, and what
//! some requests and responses teach about the connection (topic names, consumer group).

use std::cell::Ref;
use std::collections::VecDeque;
use std::rc::Rc;

use compact_str::CompactString;
use kafka_protocol::messages::ApiKey;

use super::messages::{
    self, Ctx, MAX_MESSAGES, RequestHeader, check_request_body, printable, request_header,
};
use super::payload::{KafkaApi, KafkaPayload, TopicNames};
use super::wire::{Reader, Stop};
use crate::protocols::http::{MAX_STRING, limited_string};
use crate::protocols::{
    Chunk, Direction, Exchange, ExchangeError, ParserContext, ParserCounts, ParserOutput, Payload,
    ProtocolParser, REQUEST_STRINGS, RequestStart, Role, SharedState,
};

/// Most bytes of a frame's body kept for decoding (its first ones); the rest is skipped by
/// count.
pub(super) const MAX_FRAME_PREFIX: usize = 64 * 1024;
/// Frame buffer capacity kept between frames (a larger one is freed after its frame).
const KEPT_BUFFER_CAPACITY: usize = 4096;
/// Most requests in flight followed per connection.
pub(super) const MAX_IN_FLIGHT: usize = 256;
/// Decompressed record bytes one chunk may produce.
pub(super) const DECOMPRESS_BUDGET: usize = 1 << 20;
/// Request sizes: a header has at least an api key, a version, a correlation id and a client
/// id length; brokers refuse requests over 100 MiB (`socket.request.max.bytes`).
pub(super) const MIN_REQUEST: i32 = 10;
pub(super) const MAX_REQUEST: i32 = 100 << 20;
/// Response sizes: a correlation id at least; clients accept at most about 100 MiB by default,
/// more when configured: only an absurd size is a violation.
const MIN_RESPONSE: i32 = 4;
const MAX_RESPONSE: i32 = 1 << 30;

/// Kafka parser for one connection (both directions).
#[derive(Debug)]
pub struct KafkaParser {
    role: Option<Role>,
    /// By [`index`] of direction.
    halves: [Half; 2],
    /// Requests sent and not answered yet, oldest first (responses come in request order).
    in_flight: VecDeque<InFlight>,
    /// The process's, and the state shared with its other connections (topic names, group).
    pid: u32,
    shared: Rc<SharedState>,
    /// The consumer group the client named last on this connection.
    group_id: Option<CompactString>,
    /// Decompressed bytes the current chunk may still produce.
    budget: usize,
    gave_up: bool,
}

// No `Default`: callers use `new()` (as the other parsers).
#[allow(clippy::new_without_default)]
impl KafkaParser {
    /// A parser with its own shared state (tests).
    pub fn new() -> Self {
        Self::with_context(&ParserContext::standalone(1))
    }

    pub fn with_context(context: &ParserContext) -> Self {
        KafkaParser {
            role: None,
            halves: [Half::default(), Half::default()],
            in_flight: VecDeque::new(),
            pid: context.pid,
            shared: Rc::clone(&context.shared),
            group_id: None,
            budget: DECOMPRESS_BUDGET,
            gave_up: false,
        }
    }

    /// The role, once a first request was seen (None before).
    pub fn role(&self) -> Option<Role> {
        self.role
    }

    /// Topic names learnt from Metadata responses on this connection and the others of its
    /// pipeline.
    pub fn topic_names(&self) -> Ref<'_, TopicNames> {
        self.shared.kafka.topic_names()
    }

    /// The consumer group the client named last on this connection.
    pub fn group_id(&self) -> Option<&str> {
        self.group_id.as_deref()
    }

    /// Requests in flight and the frame buffers' capacities (what the bounds hold).
    #[cfg(test)]
    pub(super) fn footprint(&self) -> (usize, [usize; 2]) {
        (
            self.in_flight.len(),
            [self.halves[0].buf.capacity(), self.halves[1].buf.capacity()],
        )
    }

    fn request_direction(&self) -> Option<Direction> {
        self.role.map(|role| match role {
            Role::Client => Direction::Egress,
            Role::Server => Direction::Ingress,
        })
    }

    /// Bytes broke the protocol: the parser stops following the connection.
    fn violation(&mut self, counts: &mut ParserCounts) {
        counts.parse_errors += 1;
        self.gave_up = true;
    }
}

impl ProtocolParser for KafkaParser {
    fn feed(&mut self, chunk: &Chunk<'_>, out: &mut ParserOutput) {
        if self.gave_up {
            return;
        }
        self.budget = DECOMPRESS_BUDGET;
        let i = index(chunk.direction);
        if self.role.is_none() {
            let start = request_start(chunk.data);
            if start.is_none() {
                return;
            }
            self.role = Some(role_for_requests(chunk.direction));
            // Responses are assumed to start at a frame (checked by the first one).
            self.halves[1 - i].framing = Framing::size();
            if start == Some(Start::Body) {
                // A read of a body whose size was read alone (Java brokers read the size
                // first): its frame's length is unknown, the next frame is followed.
                return;
            }
            self.halves[i].framing = Framing::size();
            self.halves[i].verified = true;
        }
        let mut half = std::mem::take(&mut self.halves[i]);
        self.feed_half(&mut half, chunk, out);
        self.halves[i] = half;
    }

    /// Requests in flight that become exchanges finish with `ConnectionClosed` (a response
    /// being received included), except Produce requests with acks 0 that were sent whole:
    /// they needed no response. The parser is then reset.
    fn close(&mut self, end_ns: u64, out: &mut ParserOutput) {
        if let Some(role) = self.role {
            // A response in progress answers a request older than every one in flight.
            for half in &mut self.halves {
                if let Framing::Body(frame) = &mut half.framing
                    && let Some(InFlight {
                        exchange: Some(pending),
                        ..
                    }) = frame.answers.take()
                {
                    out.exchanges.push(pending.into_exchange(
                        role,
                        end_ns,
                        Some(ExchangeError::ConnectionClosed),
                    ));
                }
            }
            for request in self.in_flight.drain(..) {
                if let Some(pending) = request.exchange {
                    out.exchanges.push(match pending.sent {
                        Some(sent) if pending.no_response => {
                            pending.into_exchange(role, sent, None)
                        }
                        _ => pending.into_exchange(
                            role,
                            end_ns,
                            Some(ExchangeError::ConnectionClosed),
                        ),
                    });
                }
            }
        }
        *self = KafkaParser::new();
    }

    fn gave_up(&self) -> bool {
        self.gave_up
    }

    fn memory_bytes(&self) -> usize {
        // Every request in flight is taken to build an exchange (an upper bound: a count, not
        // a walk of the queue after every chunk).
        self.halves.iter().map(|h| h.buf.capacity()).sum::<usize>()
            + self.in_flight.capacity() * std::mem::size_of::<InFlight>()
            + self.in_flight.len() * (std::mem::size_of::<Pending>() + REQUEST_STRINGS)
    }

    fn holds_partial(&self) -> bool {
        self.halves.iter().any(|h| !h.buf.is_empty())
    }

    fn release_spare(&mut self) {
        for half in &mut self.halves {
            if half.buf.is_empty() {
                half.buf = Vec::new();
            }
        }
    }
}

/// Syscall facts of a frame's first byte.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ChunkMeta {
    direction: Option<Direction>,
    start_ns: u64,
    end_ns: u64,
    tid: u32,
}

impl ChunkMeta {
    fn of(chunk: &Chunk<'_>) -> Self {
        ChunkMeta {
            direction: Some(chunk.direction),
            start_ns: chunk.start_ns,
            end_ns: chunk.end_ns,
            tid: chunk.tid,
        }
    }

    /// When the bytes existed: a write's entry, a read's exit.
    fn time(&self) -> u64 {
        match self.direction {
            Some(Direction::Ingress) => self.end_ns,
            _ => self.start_ns,
        }
    }
}

/// One direction's framing and frame buffer.
#[derive(Debug, Default)]
struct Half {
    framing: Framing,
    /// The captured prefix of the current frame's body (at most `MAX_FRAME_PREFIX`).
    buf: Vec<u8>,
    /// Framing was confirmed: a frame here started a request (detection's checks) or
    /// answered one in flight. Until then framing is a guess (the response direction is
    /// assumed to start at a frame when the role is decided, and may be in the middle of a
    /// response to a request never seen): what breaks it loses framing, silently, instead of
    /// being a violation.
    verified: bool,
}

#[derive(Debug, Default)]
enum Framing {
    /// Between frames: `have` bytes of the next 4-byte size, the first in `first`'s syscall.
    Size {
        bytes: [u8; 4],
        have: usize,
        first: ChunkMeta,
    },
    Body(Frame),
    /// Where frames start is unknown (joined mid-stream, or a frame boundary was in bytes not
    /// captured): a chunk that starts a frame resumes. `size`: a chunk that held only a
    /// plausible size (readers that read the size alone), resumed from if the next chunk
    /// starts a body.
    #[default]
    Lost,
    LostAfterSize {
        size: usize,
        first: ChunkMeta,
    },
}

impl Framing {
    fn size() -> Self {
        Framing::Size {
            bytes: [0; 4],
            have: 0,
            first: ChunkMeta::default(),
        }
    }
}

#[derive(Debug)]
struct Frame {
    /// Body length (after the size field).
    len: usize,
    /// Body bytes passed, captured or not.
    seen: usize,
    /// The buffer holds the body's first `buf.len()` bytes and the next ones may follow (no
    /// byte was lost and the bound was not reached).
    capturing: bool,
    /// The captured prefix was decoded (it is final).
    decoded: bool,
    first: ChunkMeta,
    /// A response: its correlation id was read (or could not be).
    answered: bool,
    /// A response: the request it answers, once its correlation id matched one in flight.
    answers: Option<InFlight>,
}

impl Frame {
    fn new(len: usize, first: ChunkMeta) -> Self {
        Frame {
            len,
            seen: 0,
            capturing: true,
            decoded: false,
            first,
            answered: false,
            answers: None,
        }
    }
}

/// A request whose response has not been seen.
#[derive(Debug)]
struct InFlight {
    correlation_id: i32,
    key: ApiKey,
    version: i16,
    /// Produce and Fetch: the exchange being built.
    exchange: Option<Box<Pending>>,
}

impl InFlight {
    /// A response will come for it.
    fn expects_response(&self) -> bool {
        !self.exchange.as_ref().is_some_and(|p| p.no_response)
    }
}

/// An exchange being built.
#[derive(Debug)]
struct Pending {
    start_ns: u64,
    request_tid: u32,
    response_tid: u32,
    /// Produce with acks 0: the broker sends nothing back.
    no_response: bool,
    /// End of the syscall that carried the request's last byte.
    sent: Option<u64>,
    payload: KafkaPayload,
}

impl Pending {
    fn into_exchange(self, role: Role, end_ns: u64, error: Option<ExchangeError>) -> Exchange {
        Exchange {
            role,
            id: exchange_id(self.payload.correlation_id),
            start_ns: self.start_ns,
            end_ns,
            request_tid: self.request_tid,
            response_tid: self.response_tid,
            error,
            payload: Payload::Kafka(self.payload),
        }
    }
}

/// Request and exchange id: the correlation id (the same at both ends), as an unsigned number.
fn exchange_id(correlation_id: i32) -> u64 {
    u64::from(correlation_id as u32)
}

fn index(direction: Direction) -> usize {
    match direction {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

/// The role of a process whose requests flow in `direction`.
fn role_for_requests(direction: Direction) -> Role {
    match direction {
        Direction::Ingress => Role::Server,
        Direction::Egress => Role::Client,
    }
}

/// How a chunk starts a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Start {
    /// Size, then a plausible request header and body.
    Framed,
    /// A plausible request header and body without the size (read apart).
    Body,
}

/// Whether `data` starts a request (see `detect` in mod.rs for the rules).
pub(super) fn request_start(data: &[u8]) -> Option<Start> {
    if let Some((size, body)) = data.split_first_chunk::<4>() {
        let size = i32::from_be_bytes(*size);
        if (MIN_REQUEST..=MAX_REQUEST).contains(&size) {
            if request_body(body, Some(size as usize)) {
                return Some(Start::Framed);
            }
            if size as usize == body.len() {
                // Exactly one frame, not a request.
                return None;
            }
            if body.len() == 8 && fixed_header(body) {
                // librdkafka's mock broker reads the size and the header's fixed part (api
                // key, version, correlation id) in one 12-byte read, the rest in another.
                return Some(Start::Framed);
            }
        }
    }
    request_body(data, None).then_some(Start::Body)
}

/// Whether these 8 bytes are a request header's fixed part: a known api key at a version the
/// crate knows, a non-negative correlation id.
fn fixed_header(data: &[u8]) -> bool {
    let mut r = Reader::new(data, data.len());
    let (Ok(key), Ok(version), Ok(correlation_id)) = (r.i16(), r.i16(), r.i32()) else {
        return false;
    };
    let Ok(key) = ApiKey::try_from(key) else {
        return false;
    };
    let range = key.valid_versions();
    (range.min..=range.max).contains(&version) && correlation_id >= 0
}

/// Whether `data` starts a request body (header first) of `len` bytes. Without `len` (its
/// size was read apart), `data` must be exactly one whole body of a kind whose schema is
/// checked to its end, from a client that names itself: a response body read apart (its
/// correlation id where an api key and version would be) must not pass for a request.
fn request_body(data: &[u8], len: Option<usize>) -> bool {
    let mut r = match len {
        Some(len) => Reader::new(data, len),
        None => Reader::new(data, data.len()),
    };
    let Ok(header) = request_header(&mut r) else {
        return false;
    };
    let client_id_ok = match header.client_id {
        Some(id) => printable(id) && (len.is_some() || !id.is_empty()),
        None => len.is_some(),
    };
    if !header.supported() || header.correlation_id < 0 || !client_id_ok {
        return false;
    }
    match check_request_body(&mut r, &header) {
        // A body decoded to its end must end the frame where both are in the bytes.
        Ok(true) => !r.captured_all() || r.remaining() == 0,
        Ok(false) => len.is_some(),
        Err(_) => false,
    }
}

impl KafkaParser {
    fn feed_half(&mut self, half: &mut Half, chunk: &Chunk<'_>, out: &mut ParserOutput) {
        let requests = self.request_direction() == Some(chunk.direction);
        let meta = ChunkMeta::of(chunk);
        match half.framing {
            Framing::Lost | Framing::LostAfterSize { .. } => {
                if !self.resync(half, chunk, requests) {
                    return;
                }
            }
            Framing::Size { .. } | Framing::Body(_) => {}
        }
        let mut data = chunk.data;
        while !data.is_empty() && !self.gave_up {
            match &mut half.framing {
                Framing::Size { bytes, have, first } => {
                    if *have == 0 {
                        *first = meta;
                    }
                    let n = (4 - *have).min(data.len());
                    bytes[*have..*have + n].copy_from_slice(&data[..n]);
                    *have += n;
                    data = &data[n..];
                    if *have < 4 {
                        continue;
                    }
                    let size = i32::from_be_bytes(*bytes);
                    let range = if requests {
                        MIN_REQUEST..=MAX_REQUEST
                    } else {
                        MIN_RESPONSE..=MAX_RESPONSE
                    };
                    if !range.contains(&size) {
                        if half.verified {
                            self.violation(&mut out.counts);
                        } else {
                            half.framing = Framing::Lost;
                        }
                        return;
                    }
                    let first = *first;
                    half.buf.clear();
                    half.framing = Framing::Body(Frame::new(size as usize, first));
                }
                Framing::Body(frame) => {
                    let n = (frame.len - frame.seen).min(data.len());
                    if frame.capturing {
                        let keep = n.min(MAX_FRAME_PREFIX - half.buf.len());
                        // Grown by powers of two up to the bound, never past it.
                        let need = half.buf.len() + keep;
                        if need > half.buf.capacity() {
                            let capacity = need.next_power_of_two().min(MAX_FRAME_PREFIX);
                            half.buf.reserve_exact(capacity - half.buf.len());
                        }
                        half.buf.extend_from_slice(&data[..keep]);
                        // The bound is reached and the frame goes on: its prefix is final.
                        frame.capturing = half.buf.len() < MAX_FRAME_PREFIX
                            || frame.seen + n == frame.len && keep == n;
                    }
                    frame.seen += n;
                    data = &data[n..];
                    if !requests && !frame.answered && (half.buf.len() >= 4 || !frame.capturing) {
                        self.answer(frame, &half.buf, meta, out);
                        if frame.answers.is_some() {
                            half.verified = true;
                        } else if !half.verified {
                            // Not a response to a request seen: framing was a wrong guess.
                            half.framing = Framing::Lost;
                            return;
                        }
                    }
                    let complete = frame.seen == frame.len;
                    if complete || !frame.capturing {
                        self.decode_prefix(frame, &mut half.buf, requests, out);
                    }
                    if complete {
                        let Framing::Body(frame) =
                            std::mem::replace(&mut half.framing, Framing::size())
                        else {
                            return;
                        };
                        self.end_frame(frame, requests, chunk.end_ns, out);
                    }
                }
                Framing::Lost | Framing::LostAfterSize { .. } => return,
            }
        }
        self.gap(half, chunk, requests, out);
    }

    /// The bytes the syscall moved past its capture (known by count).
    fn gap(&mut self, half: &mut Half, chunk: &Chunk<'_>, requests: bool, out: &mut ParserOutput) {
        let gap = chunk.full_len.saturating_sub(chunk.data.len() as u64);
        if gap == 0 || self.gave_up {
            return;
        }
        match &mut half.framing {
            Framing::Size { .. } => {
                // The next frame's size was not captured.
                half.framing = Framing::Lost;
                out.counts.desynchronised += 1;
            }
            Framing::Body(frame) => {
                let rest = (frame.len - frame.seen) as u64;
                frame.capturing = false;
                if !requests && !frame.answered {
                    self.answer(frame, &half.buf, ChunkMeta::of(chunk), out);
                    if frame.answers.is_some() {
                        half.verified = true;
                    } else if !half.verified {
                        half.framing = Framing::Lost;
                        return;
                    }
                }
                self.decode_prefix(frame, &mut half.buf, requests, out);
                if gap < rest {
                    frame.seen += gap as usize;
                    return;
                }
                frame.seen = frame.len;
                let next = if gap == rest {
                    Framing::size()
                } else {
                    // The next frame's size was not captured.
                    out.counts.desynchronised += 1;
                    Framing::Lost
                };
                if let Framing::Body(frame) = std::mem::replace(&mut half.framing, next) {
                    self.end_frame(frame, requests, chunk.end_ns, out);
                }
            }
            Framing::Lost | Framing::LostAfterSize { .. } => {}
        }
    }

    /// Framing is unknown: whether this chunk resumes it (then framing is set to read it).
    fn resync(&mut self, half: &mut Half, chunk: &Chunk<'_>, requests: bool) -> bool {
        let data = chunk.data;
        let whole = chunk.full_len == data.len() as u64;
        if let Framing::LostAfterSize { size, first } = half.framing {
            half.framing = Framing::Lost;
            let body_starts = if requests {
                request_body(data, Some(size))
            } else {
                self.answers_in_flight(data)
            };
            if body_starts {
                half.buf.clear();
                half.framing = Framing::Body(Frame::new(size, first));
                half.verified = true;
                return true;
            }
        }
        let starts = if requests {
            request_start(data) == Some(Start::Framed)
        } else {
            data.split_first_chunk::<4>().is_some_and(|(size, rest)| {
                (MIN_RESPONSE..=MAX_RESPONSE).contains(&i32::from_be_bytes(*size))
                    && self.answers_in_flight(rest)
            })
        };
        if starts {
            half.framing = Framing::size();
            half.verified = true;
            return true;
        }
        if data.len() == 4 && whole {
            let size = i32::from_be_bytes([data[0], data[1], data[2], data[3]]);
            let range = if requests {
                MIN_REQUEST..=MAX_REQUEST
            } else {
                MIN_RESPONSE..=MAX_RESPONSE
            };
            if range.contains(&size) {
                half.framing = Framing::LostAfterSize {
                    size: size as usize,
                    first: ChunkMeta::of(chunk),
                };
            }
        }
        false
    }

    /// `data` starts with the correlation id of a request in flight that expects a response.
    fn answers_in_flight(&self, data: &[u8]) -> bool {
        data.first_chunk::<4>().is_some_and(|id| {
            let id = i32::from_be_bytes(*id);
            self.in_flight
                .iter()
                .any(|r| r.correlation_id == id && r.expects_response())
        })
    }

    /// A response's correlation id is known (or can't be, its bytes were not captured): the
    /// request it answers leaves the in-flight list with every older one (their responses were
    /// lost, or they needed none).
    fn answer(&mut self, frame: &mut Frame, buf: &[u8], meta: ChunkMeta, out: &mut ParserOutput) {
        frame.answered = true;
        let Some(id) = buf.first_chunk::<4>().map(|id| i32::from_be_bytes(*id)) else {
            return;
        };
        let Some(position) = self
            .in_flight
            .iter()
            .position(|r| r.correlation_id == id && r.expects_response())
        else {
            return;
        };
        let role = self.role.unwrap_or(Role::Client);
        for older in self.in_flight.drain(..position) {
            // Produce requests with acks 0 sent whole are finished; the others are dropped
            // (their responses were lost): the pipeline retires them.
            if let Some(pending) = older.exchange
                && pending.no_response
                && let Some(sent) = pending.sent
            {
                out.exchanges.push(pending.into_exchange(role, sent, None));
            }
        }
        let Some(mut request) = self.in_flight.pop_front() else {
            return;
        };
        if let Some(pending) = &mut request.exchange {
            pending.response_tid = meta.tid;
            pending.payload.response = true;
            out.responses_started.push(exchange_id(id));
        }
        frame.answers = Some(request);
    }

    /// The frame's captured prefix is final: decoded once.
    fn decode_prefix(
        &mut self,
        frame: &mut Frame,
        buf: &mut Vec<u8>,
        requests: bool,
        out: &mut ParserOutput,
    ) {
        if frame.decoded {
            return;
        }
        frame.decoded = true;
        // Whole: every byte of the body is in the buffer.
        let whole = buf.len() == frame.len;
        if requests {
            self.decode_request(frame, buf, whole, out);
        } else {
            self.decode_response(frame, buf, whole, out);
        }
        if buf.capacity() > KEPT_BUFFER_CAPACITY {
            *buf = Vec::new();
        } else {
            buf.clear();
        }
    }

    fn decode_request(&mut self, frame: &Frame, buf: &[u8], whole: bool, out: &mut ParserOutput) {
        let mut r = Reader::new(buf, frame.len);
        let header = match request_header(&mut r) {
            Ok(header) => header,
            Err(Stop::Cut) => {
                // Its header was not captured: the request can't be followed.
                out.counts.desynchronised += 1;
                return;
            }
            Err(Stop::Invalid) => return self.violation(&mut out.counts),
        };
        if !header.supported() {
            // A version newer than the schemas known: framed and paired, not decoded.
            return self.track(header, None, out);
        }
        let flexible = header.flexible();
        let api = match header.key {
            ApiKey::Produce => KafkaApi::Produce,
            ApiKey::Fetch => KafkaApi::Fetch,
            key => {
                match messages::group_id(&mut r, key, header.version, flexible) {
                    Ok(Some(group)) if !group.is_empty() => {
                        let group = limited_string(group);
                        self.shared.kafka.set_group(self.pid, &group);
                        self.group_id = Some(group);
                    }
                    Ok(_) | Err(Stop::Cut) => {}
                    Err(Stop::Invalid) => return self.violation(&mut out.counts),
                }
                return self.track(header, None, out);
            }
        };
        if self.in_flight.len() >= MAX_IN_FLIGHT {
            out.counts.limits_hit += 1;
            return;
        }
        let mut payload = messages::empty_payload();
        payload.api = api;
        payload.api_version = header.version;
        payload.correlation_id = header.correlation_id;
        payload.client_id = header.client_id.map(limited_string);
        // The group is named on the coordinator's connection, usually not this one.
        payload.group_id = match &self.group_id {
            Some(group) => Some(group.clone()),
            None => self.shared.kafka.group(self.pid),
        };
        let shared = Rc::clone(&self.shared);
        let names = shared.kafka.topic_names();
        let mut ctx = Ctx::new(&names, self.budget, MAX_MESSAGES);
        let decoded = match api {
            KafkaApi::Produce => {
                messages::produce_request(&mut r, header.version, flexible, &mut payload, &mut ctx)
            }
            KafkaApi::Fetch => {
                messages::fetch_request(&mut r, header.version, flexible, &mut payload, &mut ctx)
            }
        };
        let ctx_counts = CtxCounts::of(&ctx);
        self.budget = ctx.records.budget;
        if !self.decoded(decoded, ctx_counts, &mut out.counts) {
            return;
        }
        payload.request_cut = !whole;
        payload.entries_dropped = ctx_counts.dropped;
        let role = self.role.unwrap_or(Role::Client);
        let mut target = CompactString::default();
        for name in payload.topic_names() {
            if target.len() + name.len() + 1 > MAX_STRING {
                break;
            }
            if !target.is_empty() {
                target.push(',');
            }
            target.push_str(name);
        }
        // Produce: the context of the first message that carries one.
        let context_headers = payload
            .topics
            .iter()
            .flat_map(|t| &t.partitions)
            .flat_map(|p| &p.records.messages)
            .next()
            .map(|m| m.context_headers.clone())
            .unwrap_or_default();
        out.request_starts.push(RequestStart {
            role,
            id: exchange_id(header.correlation_id),
            id_on_wire: true,
            // Brokers read requests on network threads and handle them on others.
            multiplexed: role == Role::Server,
            tid: frame.first.tid,
            start_ns: frame.first.time(),
            method: CompactString::const_new(api.as_str()),
            target,
            context_headers,
        });
        let pending = Pending {
            start_ns: frame.first.time(),
            request_tid: frame.first.tid,
            response_tid: 0,
            no_response: api == KafkaApi::Produce && payload.acks == Some(0),
            sent: None,
            payload,
        };
        self.track(header, Some(Box::new(pending)), out);
    }

    /// Follows a request until its response (bounded).
    fn track(
        &mut self,
        header: RequestHeader<'_>,
        exchange: Option<Box<Pending>>,
        out: &mut ParserOutput,
    ) {
        if self.in_flight.len() >= MAX_IN_FLIGHT {
            out.counts.limits_hit += 1;
            return;
        }
        self.in_flight.push_back(InFlight {
            correlation_id: header.correlation_id,
            key: header.key,
            version: header.version,
            exchange,
        });
    }

    fn decode_response(
        &mut self,
        frame: &mut Frame,
        buf: &[u8],
        whole: bool,
        out: &mut ParserOutput,
    ) {
        let Some(request) = &mut frame.answers else {
            return;
        };
        let (key, version) = (request.key, request.version);
        let range = key.valid_versions();
        if !(range.min..=range.max).contains(&version) {
            return;
        }
        let mut r = Reader::new(buf, frame.len);
        let flexible = messages::response_flexible(key, version);
        let mut ctx_counts = CtxCounts::default();
        let header = r
            .skip(4)
            .and_then(|()| messages::response_header_rest(&mut r, key, version));
        let decoded = header.and_then(|()| match (key, &mut request.exchange) {
            (ApiKey::Produce, Some(pending)) => {
                messages::produce_response(&mut r, version, flexible, &mut pending.payload)
            }
            (ApiKey::Fetch, Some(pending)) => {
                let shared = Rc::clone(&self.shared);
                let names = shared.kafka.topic_names();
                let mut ctx = Ctx::new(&names, self.budget, MAX_MESSAGES);
                let decoded = messages::fetch_response(
                    &mut r,
                    version,
                    flexible,
                    &mut pending.payload,
                    &mut ctx,
                );
                ctx_counts = CtxCounts::of(&ctx);
                self.budget = ctx.records.budget;
                decoded
            }
            (ApiKey::Metadata, _) => {
                let fits = messages::metadata_response(
                    &mut r,
                    version,
                    flexible,
                    &mut self.shared.kafka.topic_names_mut(),
                )?;
                if !fits {
                    out.counts.limits_hit += 1;
                }
                Ok(())
            }
            _ => Ok(()),
        });
        if !self.decoded(decoded, ctx_counts, &mut out.counts) {
            return;
        }
        if let Some(pending) = &mut request.exchange {
            pending.payload.response_cut = !whole;
            pending.payload.entries_dropped |= ctx_counts.dropped;
        }
    }

    /// Accounts for a decoded body; false when it broke the schema (the parser gives up).
    /// Bytes after a body decoded to its end are not an error: peers ignore them (librdkafka's
    /// mock broker ends Metadata v13 responses with one).
    fn decoded(
        &mut self,
        decoded: Result<(), Stop>,
        ctx: CtxCounts,
        counts: &mut ParserCounts,
    ) -> bool {
        counts.parse_errors += ctx.malformed;
        if ctx.dropped {
            counts.limits_hit += 1;
        }
        if ctx.unknown_ids {
            counts.desynchronised += 1;
        }
        match decoded {
            Ok(()) | Err(Stop::Cut) => true,
            Err(Stop::Invalid) => {
                self.violation(counts);
                false
            }
        }
    }

    /// The frame's last byte was in the syscall that ended at `end_ns`.
    fn end_frame(&mut self, frame: Frame, requests: bool, end_ns: u64, out: &mut ParserOutput) {
        if requests {
            // The request just decoded is the last in flight (if it was followed).
            if let Some(pending) = self
                .in_flight
                .back_mut()
                .and_then(|r| r.exchange.as_mut())
                .filter(|p| p.no_response && p.sent.is_none())
            {
                pending.sent = Some(end_ns);
            }
            self.finish_unanswered(out);
        } else if let Some(InFlight {
            exchange: Some(pending),
            ..
        }) = frame.answers
        {
            let role = self.role.unwrap_or(Role::Client);
            out.exchanges
                .push(pending.into_exchange(role, end_ns, None));
            self.finish_unanswered(out);
        }
    }

    /// Produce requests with acks 0 are finished once sent whole, in request order: after
    /// every older Produce or Fetch finished (the pipeline retires older requests when one
    /// finishes). Requests that become no exchange don't hold them.
    fn finish_unanswered(&mut self, out: &mut ParserOutput) {
        let role = self.role.unwrap_or(Role::Client);
        let mut i = 0;
        while i < self.in_flight.len() {
            match &self.in_flight[i].exchange {
                None => i += 1,
                Some(p) if p.no_response && p.sent.is_some() => {
                    if let Some(InFlight {
                        exchange: Some(pending),
                        ..
                    }) = self.in_flight.remove(i)
                    {
                        let sent = pending.sent.unwrap_or(pending.start_ns);
                        out.exchanges.push(pending.into_exchange(role, sent, None));
                    }
                }
                Some(_) => return,
            }
        }
    }
}

/// What a decoding context counted.
#[derive(Clone, Copy, Debug, Default)]
struct CtxCounts {
    malformed: u64,
    dropped: bool,
    unknown_ids: bool,
}

impl CtxCounts {
    fn of(ctx: &Ctx<'_>) -> Self {
        CtxCounts {
            malformed: ctx.records.malformed,
            dropped: ctx.dropped || ctx.records.limited,
            unknown_ids: ctx.unknown_ids,
        }
    }
}
