//! Agent-wide counters. Relaxed atomics: each is written by one stage and read for reporting.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Stats {
    /// Events drained from the ring buffer.
    pub events_received: AtomicU64,
    /// Events the kernel could not queue (ring buffer full), read from the kernel counters.
    pub events_lost: AtomicU64,
    /// Program runs the kernel skipped because a BPF program was already running on the CPU
    /// (syscalls kspan never saw), read from the kernel.
    pub program_misses: AtomicU64,
    /// Events whose bytes did not decode (unknown kind, short record).
    pub malformed_events: AtomicU64,
    /// Protocol parse errors (bad start line, oversized headers, lost sync).
    pub parse_errors: AtomicU64,
    /// Spans handed to the exporters.
    pub spans_emitted: AtomicU64,
    /// Spans of traces the sampler dropped (they still count in metrics).
    pub spans_sampled_out: AtomicU64,
    /// Spans dropped: an exporter queue was full, or the collector refused or never got them.
    pub spans_dropped: AtomicU64,
    /// Spans a collector accepted.
    pub spans_exported: AtomicU64,
    /// Failed OTLP export requests (after the exporter's own retries).
    pub export_failures: AtomicU64,
    /// Connections the agent stopped tracking because its table was full.
    pub connections_dropped: AtomicU64,
    /// Connections muted in the kernel (no more bytes copied): no known protocol, a parser that
    /// gave up, or a socket that could not be resolved.
    pub connections_muted: AtomicU64,
    /// Times a parser lost its state and knew it (HTTP/2: HPACK entries it never saw, frames
    /// beyond the captured bytes); what follows is parsed without guessing.
    pub parse_desynchronised: AtomicU64,
    /// Times a parser bound was hit (streams per connection, header block size...).
    pub parse_limits_hit: AtomicU64,
    /// Kafka consumer→producer links not made: the table of produced messages forgot them, or
    /// a span reached its link limit.
    pub message_links_dropped: AtomicU64,
    pub socket_table_scans: AtomicU64, // reads of a network namespace's /proc/PID/net/tcp{,6}, for sockets not seen open
    pub unknown_socket_events_deferred: AtomicU64, // events of a socket not yet in its namespace's tables (read < 100 ms ago): lost
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// For counters mirrored from elsewhere (the kernel's).
    pub fn set(counter: &AtomicU64, value: u64) {
        counter.store(value, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
