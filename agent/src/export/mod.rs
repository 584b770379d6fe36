//! Exporters: spans out of the agent. `json` and `text` write to any `std::io::Write` (stdout in
//! practice), one line per span.

use crate::spans::Span;

pub mod json;
pub mod otlp;
pub mod prometheus;
pub mod text;

/// Where finished spans go. Called from one thread at a time; `Send` so the exporter can live on
/// its own thread.
pub trait SpanExporter: Send {
    /// Writes (or queues) a batch of spans.
    fn export(&mut self, spans: &[Span]) -> std::io::Result<()>;
    /// Pushes out whatever is buffered.
    fn flush(&mut self) -> std::io::Result<()>;
    /// Last call: deliver what is queued, within a bounded time.
    fn shutdown(&mut self) -> std::io::Result<()> {
        self.flush()
    }
}

/// Lower-case hex of `bytes`, two digits per byte.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lower_case_and_padded() {
        assert_eq!(hex(&[]), "");
        assert_eq!(hex(&[0x00, 0x0a, 0xff, 0x4b]), "000aff4b");
        assert_eq!(hex(&[0xab; 8]), "abababababababab");
    }
}
