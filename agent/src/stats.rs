//! Agent-wide counters. Relaxed atomics: each is written by one stage and read for reporting.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Stats {
    /// Events drained from the ring buffer.
    pub events_received: AtomicU64,
    /// Events the kernel could not queue (ring buffer full), read from the kernel counters.
    pub events_lost: AtomicU64,
    /// Events whose bytes did not decode (unknown kind, short record).
    pub malformed_events: AtomicU64,
    /// Protocol parse errors (bad start line, oversized headers, lost sync).
    pub parse_errors: AtomicU64,
    /// Spans handed to the exporter.
    pub spans_emitted: AtomicU64,
    /// Spans dropped because the exporter queue was full.
    pub spans_dropped: AtomicU64,
    /// Connections the agent stopped tracking because its table was full.
    pub connections_dropped: AtomicU64,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
