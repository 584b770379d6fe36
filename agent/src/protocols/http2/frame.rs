//! HTTP/2 framing (RFC 9113 §4 and §6): the 9-byte frame header, the rules a frame header
//! must follow, and protocol detection.

use crate::protocols::Direction;

/// The client connection preface (RFC 9113 §3.4).
pub(super) const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub(super) const HEADER_LEN: usize = 9;
/// SETTINGS_MAX_FRAME_SIZE's initial value (and smallest allowed).
pub(super) const DEFAULT_MAX_FRAME_SIZE: u32 = 16384;
/// SETTINGS_MAX_FRAME_SIZE's largest allowed value.
const MAX_MAX_FRAME_SIZE: u32 = (1 << 24) - 1;
/// Shortest prefix of the preface that detection accepts alone (a syscall rarely writes less
/// than the whole preface; "PRI * HTTP" can't start anything else).
const MIN_PREFACE_PREFIX: usize = 9;

pub(super) const DATA: u8 = 0x0;
pub(super) const HEADERS: u8 = 0x1;
pub(super) const PRIORITY: u8 = 0x2;
pub(super) const RST_STREAM: u8 = 0x3;
pub(super) const SETTINGS: u8 = 0x4;
pub(super) const PUSH_PROMISE: u8 = 0x5;
pub(super) const PING: u8 = 0x6;
pub(super) const GOAWAY: u8 = 0x7;
pub(super) const WINDOW_UPDATE: u8 = 0x8;
pub(super) const CONTINUATION: u8 = 0x9;

pub(super) const END_STREAM: u8 = 0x1;
pub(super) const ACK: u8 = 0x1;
pub(super) const END_HEADERS: u8 = 0x4;
pub(super) const PADDED: u8 = 0x8;
pub(super) const PRIORITY_FLAG: u8 = 0x20;

const SETTINGS_ENABLE_PUSH: u16 = 0x2;
const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
pub(super) const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct FrameHeader {
    /// Payload length.
    pub len: u32,
    pub kind: u8,
    pub flags: u8,
    /// Stream id, reserved bit cleared.
    pub stream: u32,
    /// The reserved bit (ignored by receivers; detection wants it clear).
    pub reserved: bool,
}

impl FrameHeader {
    pub(super) fn parse(b: &[u8; HEADER_LEN]) -> Self {
        let id = u32::from_be_bytes([b[5], b[6], b[7], b[8]]);
        FrameHeader {
            len: u32::from_be_bytes([0, b[0], b[1], b[2]]),
            kind: b[3],
            flags: b[4],
            stream: id & 0x7fff_ffff,
            reserved: id & 0x8000_0000 != 0,
        }
    }

    pub(super) fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// Bytes before the header block fragment in a HEADERS or PUSH_PROMISE payload (pad
    /// length, priority fields, promised stream id).
    pub(super) fn block_prefix(&self) -> u32 {
        let padded = u32::from(self.has(PADDED));
        match self.kind {
            HEADERS if self.has(PRIORITY_FLAG) => padded + 5,
            HEADERS => padded,
            PUSH_PROMISE => padded + 4,
            _ => 0,
        }
    }

    /// The rules every receiver enforces whatever the settings (RFC 9113 §6): which frames
    /// belong to a stream and which to the connection, fixed payload sizes, room for the
    /// fields the flags announce. Unknown types pass (they are skipped). False: a framing
    /// error, the bytes are not (or no longer) HTTP/2 frames.
    pub(super) fn is_valid(&self) -> bool {
        let on_stream = self.stream != 0;
        match self.kind {
            DATA => on_stream && self.len >= u32::from(self.has(PADDED)),
            HEADERS | PUSH_PROMISE => on_stream && self.len >= self.block_prefix(),
            PRIORITY => on_stream && self.len == 5,
            RST_STREAM => on_stream && self.len == 4,
            SETTINGS => {
                !on_stream
                    && if self.has(ACK) {
                        self.len == 0
                    } else {
                        self.len.is_multiple_of(6)
                    }
            }
            PING => !on_stream && self.len == 8,
            GOAWAY => !on_stream && self.len >= 8,
            WINDOW_UPDATE => self.len == 4,
            CONTINUATION => on_stream,
            _ => true,
        }
    }

    /// [`is_valid`](Self::is_valid), and what real peers also respect though receivers must
    /// tolerate otherwise: a known type, only the flags defined for it, the reserved bit clear,
    /// and a payload of at most `max_len` bytes. For detection and resynchronisation, where
    /// arbitrary bytes must rarely pass.
    pub(super) fn is_plausible(&self, max_len: u32) -> bool {
        let defined_flags = match self.kind {
            DATA => END_STREAM | PADDED,
            HEADERS => END_STREAM | END_HEADERS | PADDED | PRIORITY_FLAG,
            SETTINGS | PING => ACK,
            PUSH_PROMISE => END_HEADERS | PADDED,
            CONTINUATION => END_HEADERS,
            PRIORITY | RST_STREAM | GOAWAY | WINDOW_UPDATE => 0,
            _ => return false,
        };
        self.is_valid() && self.flags & !defined_flags == 0 && !self.reserved && self.len <= max_len
    }
}

/// True if `data` starts with a frame header and every frame in it whose header is captured
/// looks like a real frame ([`FrameHeader::is_plausible`], plus the payload checks of
/// [`payload_plausible`] on what is captured). The last frame may be cut anywhere.
pub(super) fn frames_plausible(data: &[u8], max_len: u32) -> bool {
    if data.len() < HEADER_LEN {
        return false;
    }
    let mut pos = 0;
    while let Some(bytes) = data
        .get(pos..pos + HEADER_LEN)
        .and_then(|b| <&[u8; HEADER_LEN]>::try_from(b).ok())
    {
        let header = FrameHeader::parse(bytes);
        if !header.is_plausible(max_len) {
            return false;
        }
        let start = pos + HEADER_LEN;
        let end = start.saturating_add(header.len as usize);
        let payload = &data[start.min(data.len())..end.min(data.len())];
        if !payload_plausible(&header, payload) {
            return false;
        }
        pos = end;
    }
    true
}

/// Most bytes of a syscall's tail searched by [`resync_offset`]: the tail the kernel gives
/// HTTP/2 connections (`capture_tail`). A longer tail is searched in its last bytes only.
const RESYNC_WINDOW: usize = super::CAPTURE_TAIL as usize;

/// Where framing resumes in `tail`, the last bytes of a syscall in which framing was lost: the
/// smallest offset `o` such that, reading frame headers from `o`, every frame is plausible
/// ([`FrameHeader::is_plausible`] with `max_len`, and [`payload_plausible`] on its whole
/// payload), follows its predecessor in sequence (a header block not ended by END_HEADERS is
/// followed by a CONTINUATION of its stream, and only then is one), and the last frame ends
/// exactly at the end of `tail` (the syscall's last byte: writers write whole frames, and a
/// reader's last read of a burst usually ends where the writer's write did). The frame at `o`
/// is not a CONTINUATION (its HEADERS would be lost). None if there is no such offset (or
/// `tail` is shorter than a frame header).
///
/// Linear time: a bitmap of the offsets from which such a chain runs is filled from the end
/// (whether a chain runs from `p` depends only on the frame at `p`, the one after it, and
/// whether a chain runs from there). No allocation.
pub(super) fn resync_offset(tail: &[u8], max_len: u32) -> Option<usize> {
    let skip = tail.len().saturating_sub(RESYNC_WINDOW);
    let window = &tail[skip..];
    let n = window.len();
    if n < HEADER_LEN {
        return None;
    }
    let header_at = |p: usize| {
        window
            .get(p..p + HEADER_LEN)
            .and_then(|b| <&[u8; HEADER_LEN]>::try_from(b).ok())
            .map(FrameHeader::parse)
    };
    let mut chains = [0u64; RESYNC_WINDOW.div_ceil(64)];
    let mut found = None;
    for p in (0..=n - HEADER_LEN).rev() {
        // Most offsets of arbitrary bytes fail here, on the frame type.
        if window[p + 3] > CONTINUATION {
            continue;
        }
        let Some(h) = header_at(p) else {
            continue;
        };
        if !h.is_plausible(max_len) {
            continue;
        }
        let end = p + HEADER_LEN + h.len as usize;
        let chained = end == n
            || (end < n
                && chains[end / 64] & (1 << (end % 64)) != 0
                && header_at(end).is_some_and(|next| in_sequence(&h, &next)));
        if !chained || !payload_plausible(&h, &window[p + HEADER_LEN..end]) {
            continue;
        }
        chains[p / 64] |= 1 << (p % 64);
        if h.kind != CONTINUATION {
            found = Some(skip + p);
        }
    }
    found
}

/// May frame `next` follow frame `prev`? A header block still open (no END_HEADERS) admits only
/// its own CONTINUATION, and a CONTINUATION only follows an open block (RFC 9113 §6.10).
fn in_sequence(prev: &FrameHeader, next: &FrameHeader) -> bool {
    let open = matches!(prev.kind, HEADERS | PUSH_PROMISE | CONTINUATION) && !prev.has(END_HEADERS);
    if open {
        next.kind == CONTINUATION && next.stream == prev.stream
    } else {
        next.kind != CONTINUATION
    }
}

/// Checks of a frame's payload, on its captured prefix `payload`.
fn payload_plausible(header: &FrameHeader, payload: &[u8]) -> bool {
    // Padding must fit in the payload after the other fields.
    if header.has(PADDED)
        && matches!(header.kind, DATA | HEADERS | PUSH_PROMISE)
        && let Some(&pad) = payload.first()
    {
        let prefix = if header.kind == DATA {
            1
        } else {
            header.block_prefix()
        };
        if prefix + u32::from(pad) > header.len {
            return false;
        }
    }
    match header.kind {
        SETTINGS => payload.chunks_exact(6).all(|entry| {
            let id = u16::from_be_bytes([entry[0], entry[1]]);
            let value = u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]);
            match id {
                SETTINGS_ENABLE_PUSH => value <= 1,
                SETTINGS_INITIAL_WINDOW_SIZE => value <= 0x7fff_ffff,
                SETTINGS_MAX_FRAME_SIZE => {
                    (DEFAULT_MAX_FRAME_SIZE..=MAX_MAX_FRAME_SIZE).contains(&value)
                }
                // Others (and unknown ones, e.g. gRPC's 0xfe03) take any value.
                _ => true,
            }
        }),
        WINDOW_UPDATE if payload.len() == 4 => {
            let increment = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
            (1..=0x7fff_ffff).contains(&increment)
        }
        _ => true,
    }
}

/// Protocol detection on a direction's first captured bytes. Accepted:
/// - the client connection preface, or a prefix of it of at least 9 bytes;
/// - HTTP/2 frames, for connections whose preface was not seen (open before kspan started, a
///   server read after the preface, a server's SETTINGS written first, a client reading the
///   server's SETTINGS, the first frames after an h2c upgrade): at least one whole frame
///   header, and every frame header in the bytes plausible (known type, defined flags only,
///   reserved bit clear, stream id zero exactly for SETTINGS, PING and GOAWAY and non-zero for
///   stream frames, fixed sizes, SETTINGS values in range, padding that fits) with a payload
///   of at most 16384 bytes. A peer that raised SETTINGS_MAX_FRAME_SIZE may send larger
///   frames: a chunk that holds one is not detected, a later one is.
///
/// HTTP/1 text, TLS records (0x16 0x03 ..: a 1.4 MB length) and length-prefixed binary
/// protocols such as Kafka fail these rules.
pub(super) fn detect(data: &[u8], _direction: Direction) -> bool {
    let n = data.len().min(PREFACE.len());
    if n >= MIN_PREFACE_PREFIX && data[..n] == PREFACE[..n] {
        return true;
    }
    frames_plausible(data, DEFAULT_MAX_FRAME_SIZE)
}

/// Is `data` the start of the preface (or the preface and more)?
pub(super) fn starts_preface(data: &[u8]) -> bool {
    let n = data.len().min(PREFACE.len());
    n > 0 && data[..n] == PREFACE[..n]
}
