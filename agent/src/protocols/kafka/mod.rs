//! Kafka parser: one [`KafkaParser`] per connection turns the bytes of both directions into
//! request starts, response starts and [`Exchange`]s for Produce and Fetch requests.
//!
//! Design:
//! - **Role and directions**: one direction carries requests, the other responses. The first
//!   chunk that starts a request (as [`detect`] checks) decides: written, the process is the
//!   client; read, the broker. Until then chunks are ignored.
//! - **Framing**, per direction: a 4-byte big-endian size then the body, split at any byte
//!   across chunks, many per chunk (pipelining). A body's first 64 KiB are buffered (the
//!   rest, and bytes a syscall moved past its capture, are skipped by count). The buffered
//!   prefix is decoded once it is final: the frame ended, a byte of it was not captured, or the
//!   bound was reached. A frame boundary inside uncaptured bytes loses framing (counted in
//!   `desynchronised`): the direction waits for a chunk that starts a frame (requests: as
//!   detection checks; responses: a plausible size and the correlation id of a request in
//!   flight). Readers that read the 4-byte size alone (Java clients and brokers) are followed
//!   too: a chunk of just a plausible size, then one that starts a body, resume. The response
//!   direction is assumed to be at a frame boundary when the role is decided, a guess until a
//!   response answers a request in flight: a size out of range or an unknown correlation id
//!   before that (a response to a request sent before the parser joined) loses framing
//!   quietly instead of being a violation.
//! - **Headers**: request header v1/v2 and response header v0/v1 by api key and version, as
//!   the `kafka-protocol` crate says (ApiVersions responses always v0).
//! - **Pairing**: requests in flight (at most 256; past that a request is counted in
//!   `limits_hit` and not followed) are matched to responses by correlation id; responses come
//!   in request order, so the requests older than the one answered are dropped (their
//!   responses were lost; the pipeline retires them). Produce requests with acks 0 get no
//!   response: their exchange ends with the request, reported once every older Produce or
//!   Fetch exchange has finished (so that the pipeline's in-order retiring keeps them).
//! - **Bodies** (`messages.rs`), decoded from the captured prefix by their schema, version by
//!   version, until the prefix ends: Produce requests (acks, transactional id, topics,
//!   partitions, records), Produce responses (error codes, base offsets), Fetch requests
//!   (topics, partitions), Fetch responses (topics, partitions, error codes, high watermarks,
//!   records), Metadata responses (topic id → name, for Fetch v13+ and Produce v13, which name
//!   topics by id), and the group id of JoinGroup, SyncGroup, Heartbeat, LeaveGroup,
//!   OffsetCommit, OffsetFetch, FindCoordinator (group keys) and ConsumerGroupHeartbeat
//!   requests (kept per connection; later Produce and Fetch exchanges carry it). Other api keys
//!   are framed, paired and skipped; so are versions newer than the crate's schemas.
//!   The crate's own decoders are not used on wire bytes: they need whole messages, and they
//!   size vectors from counts read off the wire before checking them against the bytes left
//!   (`Vec::with_capacity` of an `i32` count: a few crafted bytes abort the process; upstream
//!   kafka-protocol-rs PRs #152, #161, #200). Here every count and length is checked against
//!   the frame's length first (`wire.rs`). Tests check these decoders against the crate's.
//! - **Records** (`records.rs`): per record batch (magic v2), the record count, base and last
//!   offsets from its header (so messages are counted even when their records were not
//!   captured), and from the records decoded, the trace-context headers of each message with
//!   its offset. Compressed batches (gzip, snappy, lz4, zstd) are decompressed, with pure-Rust
//!   decoders, at most 1 MiB of output per chunk (past that, counted in `limits_hit`; a cut
//!   batch decompresses as far as its captured bytes go).
//! - **Output**: Produce and Fetch requests give a [`RequestStart`] (id: the correlation id,
//!   the same at both ends; method "produce" or "fetch"; target: the topic names joined by
//!   ","; Produce: the context headers of the first message that has some) when their prefix
//!   is decoded, a response start when the response's correlation id is read, and an
//!   [`Exchange`] with a [`KafkaPayload`] when the response frame ends (Fetch responses without
//!   records too). [`close`] ends the requests in flight with `ConnectionClosed`.
//! - **Errors**: in a direction whose framing was confirmed, a size out of range, an unknown
//!   api key in the request direction, or bytes that break a body's schema (a count or length
//!   past the frame's end, a negative length) count in `parse_errors` and make [`gave_up`]
//!   true. Bytes after a body decoded to its end are not an error (peers ignore them;
//!   librdkafka's mock broker ends Metadata v13 responses with one). A malformed record batch
//!   counts in `parse_errors` only (the frame's framing is sound). A topic id no Metadata
//!   response named counts in `desynchronised` (once per body).
//! - **Bounds**: 64 KiB of a frame, 256 requests in flight, 64 topics, 256 partitions and 64
//!   messages with context per exchange (8 context headers per message, 1 KiB per value, 16
//!   KiB of context headers per exchange), 1 MiB of decompressed records per chunk, 1024
//!   topic names per connection. Past a bound, what is dropped counts once per body in
//!   `limits_hit` and the payload says `entries_dropped`.
//!
//! [`Exchange`]: crate::protocols::Exchange
//! [`RequestStart`]: crate::protocols::RequestStart
//! [`gave_up`]: crate::protocols::ProtocolParser::gave_up
//! [`close`]: crate::protocols::ProtocolParser::close

mod connection;
mod messages;
mod payload;
mod records;
mod shared;
mod wire;

#[cfg(test)]
mod tests;

pub use connection::KafkaParser;
pub use messages::MAX_MESSAGES;
pub use payload::{
    KafkaApi, KafkaMessage, KafkaPartition, KafkaPayload, KafkaRecords, KafkaTopic, TopicNames,
};
pub use shared::KafkaShared;

use super::{Direction, ParserContext, ProtocolParser, Registration};

pub const REGISTRATION: Registration = Registration {
    name: "kafka",
    detect,
    new_parser,
    // The most the kernel copies per syscall: Produce requests and Fetch responses carry the
    // record batches (and their headers) in their first bytes after a short preamble, and
    // batches larger than this are counted from their headers anyway.
    capture_bytes: Some(kspan_common::MAX_CAPTURE as u32),
    capture_tail: 0,
    in_order: true,
};

/// Protocol detection on a direction's first bytes: a request, which is what a client writes
/// first and a broker reads first (a response can't be told alone: it has no api key). Either
/// a size in 10 bytes..=100 MiB then a request header: an api key the crate knows at a version
/// it knows, a non-negative correlation id, a null client id or one of printable ASCII (at
/// most 255 bytes), and, for ApiVersions, Metadata, Produce, Fetch and the group requests, a
/// body that follows its schema as far as it was captured (and ends the frame where both end
/// in the bytes). Or, for readers that read the size apart (Java brokers), a request header
/// with a non-empty client id and a body of ApiVersions, Metadata, Produce or Fetch that ends
/// exactly where the bytes do (so that a response body read apart, whose correlation id may
/// pass for an api key and version, does not).
pub fn detect(data: &[u8], _direction: Direction) -> bool {
    connection::request_start(data).is_some()
}

fn new_parser(context: &ParserContext) -> Box<dyn ProtocolParser> {
    Box::new(KafkaParser::with_context(context))
}
