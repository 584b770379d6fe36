//! Exporters: spans out of the agent. `json` and `text` write to any `std::io::Write` (stdout in
//! practice), one line per span.

use crate::{spans::Span, stats::Stats};

pub mod json;
pub mod otlp;
pub mod prometheus;
pub mod text;
pub mod tree;

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
    /// What the exporter writes to, for the log line when it stops.
    fn name(&self) -> &'static str;
    /// Called when no span came for a while: an exporter holding spans (the trace view)
    /// writes what is due.
    fn tick(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Hands a batch to every exporter. One whose write fails (stdout closed, as in `kspan | head -1`
/// once head exits) is stopped, logged once and counted; the others (OTLP) and the metrics go on.
pub fn export_to_all(exporters: &mut Vec<Box<dyn SpanExporter>>, spans: &[Span], stats: &Stats) {
    keep_working(exporters, stats, |exporter| {
        exporter.export(spans).and_then(|()| exporter.flush())
    });
}

/// `tick` on every exporter, stopping a failing one as [`export_to_all`] does.
pub fn tick_all(exporters: &mut Vec<Box<dyn SpanExporter>>, stats: &Stats) {
    keep_working(exporters, stats, |exporter| exporter.tick());
}

fn keep_working(
    exporters: &mut Vec<Box<dyn SpanExporter>>,
    stats: &Stats,
    mut call: impl FnMut(&mut dyn SpanExporter) -> std::io::Result<()>,
) {
    exporters.retain_mut(|exporter| match call(exporter.as_mut()) {
        Ok(()) => true,
        Err(error) => {
            log::warn!(
                "{} exporter stopped: {error}; other exporters and metrics go on",
                exporter.name()
            );
            Stats::add(&stats.exporters_stopped, 1);
            false
        }
    });
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
    use std::sync::{Arc, Mutex};

    /// Fails every write once `broken`, like stdout after its reader closed.
    struct Pipe {
        broken: bool,
        spans: Arc<Mutex<usize>>,
    }

    impl SpanExporter for Pipe {
        fn export(&mut self, spans: &[Span]) -> std::io::Result<()> {
            if self.broken {
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
            *self.spans.lock().unwrap() += spans.len();
            Ok(())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
        fn name(&self) -> &'static str {
            "test"
        }
    }

    #[test]
    fn a_failing_exporter_stops_alone() {
        let stats = Stats::default();
        let healthy = Arc::new(Mutex::new(0));
        let mut exporters: Vec<Box<dyn SpanExporter>> = vec![
            Box::new(Pipe {
                broken: true,
                spans: Arc::default(),
            }),
            Box::new(Pipe {
                broken: false,
                spans: healthy.clone(),
            }),
        ];
        let spans = [Span {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent_span_id: None,
            trace_state: None,
            name: "GET /".into(),
            kind: crate::spans::SpanKind::Server,
            start_unix_nano: 1,
            end_unix_nano: 2,
            status: crate::spans::SpanStatus::Unset,
            links: Vec::new(),
            attributes: Vec::new(),
            resource: Arc::new(crate::spans::Resource {
                attributes: Vec::new(),
            }),
        }];
        export_to_all(&mut exporters, &spans, &stats);
        export_to_all(&mut exporters, &spans, &stats);
        assert_eq!(exporters.len(), 1);
        assert_eq!(*healthy.lock().unwrap(), 2);
        assert_eq!(Stats::get(&stats.exporters_stopped), 1);
    }

    #[test]
    fn hex_is_lower_case_and_padded() {
        assert_eq!(hex(&[]), "");
        assert_eq!(hex(&[0x00, 0x0a, 0xff, 0x4b]), "000aff4b");
        assert_eq!(hex(&[0xab; 8]), "abababababababab");
    }
}
