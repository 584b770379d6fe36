//! Protocol parsers: bytes of one connection, per direction, in; request/response exchanges out.
//!
//! Parsers are pure functions of the bytes they are fed (no kernel, no clock, no I/O), so they
//! are unit-tested on byte fixtures. Each protocol lives in its own folder.

pub mod http;
pub mod http1;

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
    /// How many bytes the syscall really transferred (`>= data.len()`). Bytes past `data` were
    /// not captured: the parser knows their count, not their content.
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
