//! Framing of `Transfer-Encoding: chunked` bodies, for skipping them: chunk-size lines (with
//! extensions), chunk data, the final `0` chunk and the trailer section. The decoder is a small
//! copyable state machine fed with whatever one syscall carried; it never buffers bytes.

/// Longest chunk-size line extension (or stray whitespace) skipped before declaring an error.
const MAX_SIZE_LINE_EXT: u32 = 4096;
/// Longest trailer line skipped before declaring an error (same bound as a header block).
const MAX_TRAILER_LINE: u32 = 16 * 1024;
/// A chunk size has at most 16 hex digits (u64).
const MAX_SIZE_DIGITS: u8 = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ChunkedDecoder {
    /// Reading the hex digits of a chunk-size line.
    Size { value: u64, digits: u8 },
    /// After the digits: skipping extensions (`;name=value`) or whitespace up to the LF.
    SizeExt { value: u64, len: u32 },
    /// Inside chunk data: this many bytes left.
    Data { remaining: u64 },
    /// After chunk data: expecting CRLF (or a bare LF).
    DataEnd { saw_cr: bool },
    /// At the start of a line of the trailer section (after the `0` chunk-size line).
    TrailerLineStart { saw_cr: bool },
    /// Inside a trailer field line.
    TrailerLine { len: u32 },
}

/// What the bytes fed so far mean for the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ChunkedOutcome {
    /// All bytes were consumed; the body goes on.
    NeedMore,
    /// The body ended (after the trailer section's final empty line): `consumed` bytes belong to it.
    Done,
    /// Malformed framing (bad chunk size, missing CRLF, overlong line).
    Error,
    /// Uncaptured bytes fell where framing had to be read: chunk sizes can't be followed any more.
    LostSync,
}

impl ChunkedDecoder {
    pub(super) const fn new() -> Self {
        ChunkedDecoder::Size {
            value: 0,
            digits: 0,
        }
    }

    /// Feeds `captured` bytes followed by `uncaptured` bytes of unknown content. Returns how many
    /// bytes (captured first, then uncaptured) belong to the body, and the outcome. Uncaptured
    /// bytes are harmless while they fall inside chunk data; anywhere else they lose sync.
    pub(super) fn decode(&mut self, captured: &[u8], uncaptured: u64) -> (u64, ChunkedOutcome) {
        let cap = captured.len() as u64;
        let total = cap.saturating_add(uncaptured);
        let mut i: u64 = 0;
        while i < total {
            if let ChunkedDecoder::Data { remaining } = *self {
                let n = remaining.min(total - i);
                i += n;
                let left = remaining - n;
                *self = if left == 0 {
                    ChunkedDecoder::DataEnd { saw_cr: false }
                } else {
                    ChunkedDecoder::Data { remaining: left }
                };
                continue;
            }
            if i >= cap {
                return (i, ChunkedOutcome::LostSync);
            }
            let b = captured[i as usize];
            i += 1;
            let next = match *self {
                ChunkedDecoder::Size { value, digits } => match hex_value(b) {
                    Some(d) => {
                        if digits >= MAX_SIZE_DIGITS {
                            return (i, ChunkedOutcome::Error);
                        }
                        let value = match value.checked_mul(16) {
                            Some(v) => v | u64::from(d),
                            None => return (i, ChunkedOutcome::Error),
                        };
                        ChunkedDecoder::Size {
                            value,
                            digits: digits + 1,
                        }
                    }
                    None if digits == 0 => return (i, ChunkedOutcome::Error),
                    None => match b {
                        b'\n' => size_line_done(value),
                        b';' | b' ' | b'\t' | b'\r' => ChunkedDecoder::SizeExt { value, len: 1 },
                        _ => return (i, ChunkedOutcome::Error),
                    },
                },
                ChunkedDecoder::SizeExt { value, len } => {
                    if b == b'\n' {
                        size_line_done(value)
                    } else if len >= MAX_SIZE_LINE_EXT {
                        return (i, ChunkedOutcome::Error);
                    } else {
                        ChunkedDecoder::SizeExt {
                            value,
                            len: len + 1,
                        }
                    }
                }
                ChunkedDecoder::Data { .. } => unreachable!("handled above"),
                ChunkedDecoder::DataEnd { saw_cr } => match b {
                    b'\r' if !saw_cr => ChunkedDecoder::DataEnd { saw_cr: true },
                    b'\n' => ChunkedDecoder::new(),
                    _ => return (i, ChunkedOutcome::Error),
                },
                ChunkedDecoder::TrailerLineStart { saw_cr } => match b {
                    b'\n' => {
                        *self = ChunkedDecoder::new();
                        return (i, ChunkedOutcome::Done);
                    }
                    b'\r' if !saw_cr => ChunkedDecoder::TrailerLineStart { saw_cr: true },
                    _ if saw_cr => return (i, ChunkedOutcome::Error),
                    _ => ChunkedDecoder::TrailerLine { len: 1 },
                },
                ChunkedDecoder::TrailerLine { len } => {
                    if b == b'\n' {
                        ChunkedDecoder::TrailerLineStart { saw_cr: false }
                    } else if len >= MAX_TRAILER_LINE {
                        return (i, ChunkedOutcome::Error);
                    } else {
                        ChunkedDecoder::TrailerLine { len: len + 1 }
                    }
                }
            };
            *self = next;
        }
        (i, ChunkedOutcome::NeedMore)
    }
}

fn size_line_done(value: u64) -> ChunkedDecoder {
    if value == 0 {
        ChunkedDecoder::TrailerLineStart { saw_cr: false }
    } else {
        ChunkedDecoder::Data { remaining: value }
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// In lost-sync mode, whether a fully captured syscall ends the chunked body: it ends with the
/// last-chunk and an empty trailer section (`\r\n0\r\n\r\n`), or is exactly `0\r\n\r\n`.
pub(super) fn ends_with_last_chunk(data: &[u8]) -> bool {
    data == b"0\r\n\r\n" || data.ends_with(b"\r\n0\r\n\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(dec: &mut ChunkedDecoder, bytes: &[u8]) -> (u64, ChunkedOutcome) {
        dec.decode(bytes, 0)
    }

    #[test]
    fn whole_body_in_one_piece() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: a\r\n\r\nNEXT";
        let mut dec = ChunkedDecoder::new();
        let (n, outcome) = run(&mut dec, body);
        assert_eq!(outcome, ChunkedOutcome::Done);
        assert_eq!(n as usize, body.len() - 4);
    }

    #[test]
    fn byte_by_byte() {
        let body = b"A\r\n0123456789\r\n0\r\n\r\n";
        let mut dec = ChunkedDecoder::new();
        for (i, b) in body.iter().enumerate() {
            let (n, outcome) = run(&mut dec, std::slice::from_ref(b));
            assert_eq!(n, 1);
            if i + 1 == body.len() {
                assert_eq!(outcome, ChunkedOutcome::Done);
            } else {
                assert_eq!(outcome, ChunkedOutcome::NeedMore, "at byte {i}");
            }
        }
    }

    #[test]
    fn bare_lf_line_endings() {
        let mut dec = ChunkedDecoder::new();
        assert_eq!(run(&mut dec, b"3\nabc\n0\n\n"), (9, ChunkedOutcome::Done));
    }

    #[test]
    fn uncaptured_bytes_inside_chunk_data_keep_sync() {
        let mut dec = ChunkedDecoder::new();
        // Size line captured, 100 data bytes of which 10 captured.
        let mut first = b"64\r\n".to_vec();
        first.extend_from_slice(&[b'x'; 10]);
        assert_eq!(dec.decode(&first, 90), (104, ChunkedOutcome::NeedMore));
        assert_eq!(run(&mut dec, b"\r\n0\r\n\r\n"), (7, ChunkedOutcome::Done));
    }

    #[test]
    fn uncaptured_bytes_past_chunk_data_lose_sync() {
        let mut dec = ChunkedDecoder::new();
        assert_eq!(dec.decode(b"2\r\nab", 10), (5, ChunkedOutcome::LostSync));
    }

    #[test]
    fn errors() {
        for bad in [
            &b"g\r\n"[..],
            b"\r\n",
            b"5\r\nhelloXX",
            b"11111111111111111\r\n",
            b"0\r\n\rX",
        ] {
            let mut dec = ChunkedDecoder::new();
            assert_eq!(run(&mut dec, bad).1, ChunkedOutcome::Error, "{bad:?}");
        }
        let mut dec = ChunkedDecoder::new();
        let mut long_ext = b"1;".to_vec();
        long_ext.extend(std::iter::repeat_n(b'e', 5000));
        assert_eq!(run(&mut dec, &long_ext).1, ChunkedOutcome::Error);
    }

    #[test]
    fn last_chunk_detection() {
        assert!(ends_with_last_chunk(b"0\r\n\r\n"));
        assert!(ends_with_last_chunk(b"abc\r\n0\r\n\r\n"));
        assert!(!ends_with_last_chunk(b"10\r\n\r\n"));
        assert!(!ends_with_last_chunk(b"0\r\n"));
    }
}
