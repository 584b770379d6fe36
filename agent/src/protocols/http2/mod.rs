//! HTTP/2 parser (gRPC included): one [`Http2Connection`] per connection turns the bytes of
//! both directions into request starts, response starts and [`Exchange`]s, one per stream.
//!
//! Design:
//! - **Framing**, per direction: the client preface is skipped (it may be split across
//!   chunks), then 9-byte frame headers and payloads, split at any byte across chunks, many
//!   per chunk. DATA payloads are counted (minus padding), never buffered. HEADERS or
//!   PUSH_PROMISE and their CONTINUATIONs are reassembled into one header block (at most 64
//!   KiB; padding and priority fields removed). RST_STREAM, GOAWAY, SETTINGS are read; PING,
//!   PRIORITY, WINDOW_UPDATE and unknown types are skipped.
//! - **Uncaptured bytes**: a syscall larger than the capture gives its first bytes (`data`,
//!   up to 12 KiB) and its last ones (`tail`, up to 4 KiB); the gap between them (or after
//!   `data` when there is no tail) is skipped by length while it lies inside a frame's payload:
//!   inside a DATA payload nothing is lost (the HPACK table stays known), and the tail continues
//!   the bytes. Inside a header block, the block is lost and the direction's HPACK table becomes
//!   unknown; framing holds. A frame header in the gap loses framing, and with it the frames in
//!   the gap: stream ends (open streams may have ended unseen), DATA lengths (body lengths are
//!   then lower bounds) and header blocks (the HPACK table becomes unknown). Each loss counts
//!   once in `desynchronised`, however many chunks it takes to resume. Framing resumes:
//!   - in the same syscall's tail, at the smallest offset from which whole frames chain
//!     exactly to the tail's end (every frame header plausible as in detection, with the
//!     receiver's max frame size, each frame in sequence with the next, at least one frame,
//!     the first not a CONTINUATION: its HEADERS was lost). Writers write whole frames per
//!     syscall, and a reader's last read of a burst ends where the write did: this finds the
//!     trailers after a large message. A tail that ends in the middle of a frame (or whose
//!     bytes don't chain) resynchronises nothing and invents nothing;
//!   - otherwise at the next chunk that starts with plausible frames, or whose tail chains as
//!     above.
//! - **Errors**: bytes that break framing rules (a length wrong for the type, a stream id
//!   wrong for the type, CONTINUATION out of sequence, padding larger than the payload, and on
//!   a connection seen from its preface a frame larger than the receiver's
//!   SETTINGS_MAX_FRAME_SIZE) count in `parse_errors` and the direction resynchronises the same
//!   way from the next chunk on. After a parse error, more than 8 chunks in a row (either
//!   direction) that resume framing neither at their start nor in their tail make [`gave_up`]
//!   true. A direction whose first chunk is neither the preface nor plausible frames was joined
//!   in the middle of a frame: it waits for one that is (or a tail that chains), without
//!   counting anything.
//! - **HPACK**: decoded by `hpack.rs`, one decoder per direction, whose dynamic table is the
//!   list of insertions it saw plus "older entries may exist". A reference to an entry it
//!   never saw (joined mid-connection, bytes lost) is a missing header, never a guess; static
//!   and literal headers, and entries inserted since, still decode. The first such reference
//!   after a loss not counted when it happened (joined late) counts in `desynchronised`. So
//!   trailers found after a loss may have an unknown `grpc-status` (an indexed reference, as
//!   encoders send a repeated `grpc-status: 0`): the exchange ends with `grpc_status` None.
//!   Huffman decoding is `huffman.rs` (loona-hpack's costs ~26 µs per string; loona-hpack is
//!   the tests' encoder and reference decoder).
//! - **Role**: the process that writes the preface, or writes a request (HEADERS with
//!   `:method` on an odd stream), is the client; the one that reads them is the server.
//! - **Streams** (at most 256 followed; past that a new request is counted in `limits_hit`
//!   and not followed): a request's HEADERS block gives a [`RequestStart`] (id = stream id,
//!   on the wire; `multiplexed` for servers). Kept from requests: `:method`, `:path`,
//!   `:scheme`, `:authority` (or `host`), `user-agent`, whether `content-type` is
//!   `application/grpc*`, and trace-context headers; no other value leaves the parser. A
//!   request whose `:method` or `:path` is unknown is dropped (counted in `desynchronised`).
//!   The final response HEADERS (1xx skipped) gives `:status` and a response start; trailers
//!   (or a Trailers-Only response) give `grpc-status`; END_STREAM of the response ends the
//!   exchange. Body lengths are DATA payloads minus padding.
//! - **Stream ends**: RST_STREAM (either way) → `StreamReset`, with the response if its
//!   headers were seen. GOAWAY from the server → streams above its last stream id were not
//!   processed: `StreamReset`. [`close`] → `ConnectionClosed` for the others. Streams open
//!   when bytes were lost, and not heard of since, may have ended unseen: they are never
//!   given an invented end (dropped at close, and first when the stream table is full).
//! - **Extended CONNECT** (`:protocol`, RFC 8441) is a request like others, whose exchange
//!   lasts as long as its stream; plain CONNECT's target is `:authority`. **Server push**:
//!   each PUSH_PROMISE counts in `limits_hit` and its block is decoded (the table must follow
//!   it); pushed streams are never requests of the client.
//! - **Counts**: `parse_errors`: framing violations, malformed HPACK blocks, requests without
//!   a target. `desynchronised`: each loss of framing or of a header block's bytes, and each
//!   header block that first meets an unknown table entry after a loss or is a request dropped
//!   for an unknown `:method`/`:path` (at most one per block). `limits_hit`: requests past 256
//!   open streams, header blocks over 64 KiB (also a loss), table size updates over 64 KiB,
//!   and each PUSH_PROMISE.
//! - **Bounds**: 256 streams, 64 KiB per header block, 64 KiB of HPACK table per direction
//!   (4 KiB while the encoder's table size is unknown), 1 KiB per kept string, 16 context
//!   headers per request.
//! - **Allocation**: buffers are reused (a header block buffer grown past 4 KiB is freed
//!   after its block); once warm, a chunk that completes no header block allocates nothing,
//!   and a response's header blocks usually nothing either. Strings are CompactStrings
//!   (inline up to 24 bytes).
//!
//! [`Exchange`]: crate::protocols::Exchange
//! [`RequestStart`]: crate::protocols::RequestStart
//! [`gave_up`]: crate::protocols::ProtocolParser::gave_up
//! [`close`]: crate::protocols::ProtocolParser::close

mod connection;
mod frame;
mod hpack;
mod huffman;

#[cfg(test)]
mod tests;

pub use connection::Http2Connection;

use super::{Direction, ParserContext, ProtocolParser, Registration};

pub const REGISTRATION: Registration = Registration {
    name: "http2",
    detect,
    new_parser,
    // The kernel copies at most this per syscall: HTTP/2 writers put many frames in one
    // syscall, and every frame header counts.
    capture_bytes: Some(kspan_common::HTTP2_CAPTURE),
    // A syscall larger than that gives its first 12 KiB and its last 4 KiB: gRPC writes (and
    // reads) a large message's DATA frames and then the trailers in one syscall.
    capture_tail: CAPTURE_TAIL,
    in_order: false,
};

/// Bytes of a large syscall's end the kernel copies (of `capture_bytes`); the kernel sets the
/// same values itself on connections that start with the preface.
const CAPTURE_TAIL: u32 = kspan_common::HTTP2_CAPTURE_TAIL;

/// Protocol detection on a direction's first bytes: the client preface, or plausible HTTP/2
/// frames (see `frame::detect` for the rules).
pub fn detect(data: &[u8], direction: Direction) -> bool {
    frame::detect(data, direction)
}

fn new_parser(_context: &ParserContext) -> Box<dyn ProtocolParser> {
    Box::new(Http2Connection::new())
}
