//! HTTP/1.x parser: one [`Http1Connection`] per connection turns the bytes of both directions
//! into [`Exchange`](crate::protocols::Exchange)s.
//!
//! Design:
//! - Each direction is a half-stream with its own state: `Idle` (a start line is expected),
//!   `Header` (the header block is buffered, at most 16 KiB, until its empty line; then parsed
//!   with httparse), `Body` (skipped without buffering: Content-Length, chunked, until close, or
//!   lost sync after uncaptured chunked framing) and `Garbage` (after a parse error, or a header
//!   block dropped for outgrowing the buffer or the capture — a limit hit, counted apart —,
//!   skipping until a syscall starts with a start line).
//! - Requests are queued (FIFO, at most 64) when their header block is parsed; each final
//!   response pops the oldest, so pipelined and keep-alive exchanges pair in order. Interim 1xx
//!   responses pop nothing; 101 (and 2xx to CONNECT) stops parsing on the connection.
//! - The role comes from the direction of the first parsed request: requests read = server.
//! - Only method, target, version, Host, User-Agent and trace-context headers are kept from a
//!   request; every other header (Authorization, Cookie...) is looked at and forgotten.

mod chunked;
mod connection;
mod message;

#[cfg(test)]
mod tests;

pub use connection::Http1Connection;

use super::{Direction, ParserContext, ProtocolParser, Registration};

pub const REGISTRATION: Registration = Registration {
    name: "http1",
    detect: detect_http1,
    new_parser,
    capture_bytes: None,
    capture_tail: 0,
    in_order: true,
};

fn detect_http1(data: &[u8], _direction: Direction) -> bool {
    Http1Connection::looks_like_http1(data)
}

fn new_parser(_context: &ParserContext) -> Box<dyn ProtocolParser> {
    Box::new(Http1Connection::new())
}
