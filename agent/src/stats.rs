//! Agent-wide counters. Relaxed atomics: each is written by one stage and read for reporting.

use std::{
    fmt::Write as _,
    sync::atomic::{AtomicU64, Ordering},
};

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
    /// Spans dropped: an exporter queue was full, the collector refused or never got them, or
    /// the trace view's trace was at its span bound.
    pub spans_dropped: AtomicU64,
    /// Spans a collector accepted.
    pub spans_exported: AtomicU64,
    /// Failed OTLP export requests (after the exporter's own retries).
    pub export_failures: AtomicU64,
    /// Failed requests to the Kubernetes API server (pod list and watch, owner lookups): kspan
    /// retries them and traces on without pod metadata meanwhile.
    pub kubernetes_api_errors: AtomicU64,
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
    /// Client requests left unlinked (their thread was serving several requests), mirrored
    /// from the linker once per loop.
    pub links_ambiguous: AtomicU64,
    /// Cross-process pairs refused because the two ends disagreed, mirrored from the linker.
    pub links_mismatched: AtomicU64,
    /// Spans emitted without the parent they waited for, mirrored from the linker.
    pub links_late: AtomicU64,
    /// Kernel reads of user memory or socket state that failed, mirrored from the kernel.
    pub kernel_read_errors: AtomicU64,
    /// Kernel map inserts refused because the map was full, mirrored from the kernel.
    pub kernel_map_full: AtomicU64,
    /// Syscalls entered while another one of the same thread was in flight, mirrored from the
    /// kernel.
    pub in_flight_collisions: AtomicU64,
    /// Program runs that found their per-CPU scratch buffer in use, mirrored from the kernel.
    pub scratch_busy: AtomicU64,
    /// Span exporters stopped because their output failed (stdout closed).
    pub exporters_stopped: AtomicU64,
    /// Metric data points recorded into an overflow series because their instrument had
    /// reached its series cap (attacker-chosen paths, hosts, methods...).
    pub series_overflow: AtomicU64,
    /// Reads of a network namespace's TCP tables (`/proc/PID/net/tcp{,6}`) to resolve sockets
    /// kspan did not see open.
    pub socket_table_scans: AtomicU64,
    /// Events of a socket not yet in its namespace's tables (read less than 100 ms ago): lost.
    pub unknown_socket_events_deferred: AtomicU64,
    /// Requests the linker forgot before their exchange completed (in-flight cap per
    /// connection, retired by a later response, abandoned), mirrored once per loop.
    pub links_dropped: AtomicU64,
    /// Connections whose parser state was dropped because the parsers' memory was over budget
    /// (`--parser-memory`).
    pub parser_evictions_budget: AtomicU64,
    /// Connections whose parser state was dropped because a message stayed incomplete past
    /// `--partial-timeout` (slowloris).
    pub parser_evictions_timeout: AtomicU64,
    /// TLS library calls whose plaintext the kernel dropped: their socket was unknown (a read on
    /// memory BIOs with no TLS socket read before it on its thread) or no longer tracked.
    /// Mirrored from the kernel.
    pub tls_unbound: AtomicU64,
    /// TLS plaintext written before its socket was known (memory BIOs) and dropped: no write on
    /// a TLS socket followed in time, the process exited, or the holding bounds were reached.
    pub tls_writes_expired: AtomicU64,
    /// Processes seen sending TLS records whose TLS library kspan cannot read (reported once
    /// each).
    pub tls_processes_unseen: AtomicU64,
    /// Library files whose TLS functions kspan attached uprobes to.
    pub tls_libraries_attached: AtomicU64,
    /// Gauges set by the pipeline after each drain: heap bytes the parsers hold, connections
    /// tracked, per-process entries.
    pub parser_memory: AtomicU64,
    pub agent_connections: AtomicU64,
    pub agent_processes: AtomicU64,
    /// Gauges, set by the census thread: CONNECTIONS entries, TRACED_PIDS entries, non-zero
    /// MAYBE_TRACED slots (see `probes::census`).
    pub kernel_connections: AtomicU64,
    pub kernel_traced_pids: AtomicU64,
    pub kernel_prefilter_slots: AtomicU64,
}

/// One agent counter as the stop line prints it and as a live metric exports it. Every counter
/// of the stop line is in [`COUNTERS`], so none can be visible only at exit.
pub struct Counter {
    /// `name=` on the `kspan: stopped:` line.
    pub stop_name: &'static str,
    /// OpenTelemetry instrument name (Prometheus: dots become `_`, `_total` appended).
    pub metric: &'static str,
    pub unit: &'static str,
    pub description: &'static str,
    pub read: fn(&Stats) -> u64,
}

macro_rules! counter {
    ($field:ident, $metric:literal, $unit:literal, $description:literal) => {
        Counter {
            stop_name: stringify!($field),
            metric: $metric,
            unit: $unit,
            description: $description,
            read: |s| Stats::get(&s.$field),
        }
    };
}

/// Every agent counter, in stop-line order.
pub const COUNTERS: &[Counter] = &[
    counter!(
        events_received,
        "kspan.events.received",
        "{event}",
        "Kernel events received from the ring buffer."
    ),
    counter!(
        events_lost,
        "kspan.events.lost",
        "{event}",
        "Kernel events lost because the ring buffer was full."
    ),
    counter!(
        malformed_events,
        "kspan.events.malformed",
        "{event}",
        "Kernel events whose bytes did not decode."
    ),
    counter!(
        parse_errors,
        "kspan.parse.errors",
        "{error}",
        "Protocol parse errors."
    ),
    counter!(
        spans_emitted,
        "kspan.spans.emitted",
        "{span}",
        "Spans handed to the exporters."
    ),
    counter!(
        spans_sampled_out,
        "kspan.spans.sampled_out",
        "{span}",
        "Spans of traces the sampler dropped (still counted in RED metrics)."
    ),
    counter!(
        spans_dropped,
        "kspan.spans.dropped",
        "{span}",
        "Spans dropped: queue full, or the collector failed to take them."
    ),
    counter!(
        spans_exported,
        "kspan.spans.exported",
        "{span}",
        "Spans accepted by the OTLP collector."
    ),
    counter!(
        exporters_stopped,
        "kspan.exporters.stopped",
        "{exporter}",
        "Span exporters stopped because their output failed (stdout closed); the others go on."
    ),
    counter!(
        export_failures,
        "kspan.export.failures",
        "{request}",
        "Failed OTLP export requests, after retries."
    ),
    counter!(
        kubernetes_api_errors,
        "kspan.kubernetes.api_errors",
        "{error}",
        "Failed requests to the Kubernetes API server (pod list and watch, ReplicaSet and Job \
         lookups), each retried with backoff; tracing goes on without pod metadata meanwhile."
    ),
    counter!(
        links_ambiguous,
        "kspan.links.ambiguous",
        "{span}",
        "Client spans left without a parent because their thread was serving several requests."
    ),
    counter!(
        links_mismatched,
        "kspan.links.mismatched",
        "{span}",
        "Cross-process client/server pairs refused because the two ends disagreed."
    ),
    counter!(
        links_late,
        "kspan.links.late",
        "{span}",
        "Spans emitted without the parent they waited for (its event came too late)."
    ),
    counter!(
        links_dropped,
        "kspan.links.dropped",
        "{request}",
        "Requests the linker forgot before their exchange completed: past the in-flight cap of \
         a connection, retired by a later response, or abandoned."
    ),
    counter!(
        connections_dropped,
        "kspan.connections.dropped",
        "{connection}",
        "Connections not tracked because the agent's connection table was full."
    ),
    counter!(
        connections_muted,
        "kspan.connections.muted",
        "{connection}",
        "Connections muted in the kernel: no known protocol, or the parser gave up."
    ),
    counter!(
        parse_desynchronised,
        "kspan.parse.desynchronised",
        "{event}",
        "Times a parser lost protocol state (HPACK entries never seen, uncaptured frames) and \
         went on without guessing."
    ),
    counter!(
        parse_limits_hit,
        "kspan.parse.limits_hit",
        "{event}",
        "Times a parser bound was hit (streams per connection, header block size)."
    ),
    counter!(
        parser_evictions_budget,
        "kspan.parse.evictions.budget",
        "{connection}",
        "Connections whose parser state (partial messages, requests in flight) was dropped \
         because the parsers' memory was over the --parser-memory budget."
    ),
    counter!(
        parser_evictions_timeout,
        "kspan.parse.evictions.timeout",
        "{connection}",
        "Connections whose parser state was dropped because a message stayed incomplete \
         longer than --partial-timeout (slowloris)."
    ),
    counter!(
        socket_table_scans,
        "kspan.procfs.socket_table_scans",
        "{read}",
        "Reads of a network namespace's TCP tables to resolve sockets kspan did not see open."
    ),
    counter!(
        unknown_socket_events_deferred,
        "kspan.events.unknown_socket",
        "{event}",
        "Events of a socket not yet in its namespace's TCP tables (read less than 100 ms ago): \
         not parsed."
    ),
    counter!(
        kernel_read_errors,
        "kspan.kernel.read_errors",
        "{error}",
        "Kernel reads of syscall buffers or socket state that failed."
    ),
    counter!(
        kernel_map_full,
        "kspan.kernel.map_full",
        "{insert}",
        "Kernel map inserts refused because the map was full (connections, traced pids)."
    ),
    counter!(
        in_flight_collisions,
        "kspan.kernel.in_flight_collisions",
        "{syscall}",
        "Syscalls whose arguments overwrote another in-flight syscall of the same thread."
    ),
    counter!(
        scratch_busy,
        "kspan.kernel.scratch_busy",
        "{run}",
        "Program runs that found their per-CPU scratch buffer in use and skipped the event."
    ),
    counter!(
        program_misses,
        "kspan.program.misses",
        "{run}",
        "Runs of kspan's eBPF programs the kernel skipped because a program was already \
         running on the CPU: syscalls never seen."
    ),
    counter!(
        message_links_dropped,
        "kspan.messaging.links.dropped",
        "{link}",
        "Kafka consumer-to-producer span links not made: the produced-messages table forgot the \
         producer, or a span reached its link limit."
    ),
    counter!(
        series_overflow,
        "kspan.metrics.series_overflow",
        "{point}",
        "Metric data points recorded into the _OTHER overflow series of an instrument that \
         reached its series cap."
    ),
    counter!(
        tls_libraries_attached,
        "kspan.tls.libraries_attached",
        "{file}",
        "Library files (libssl, executables with OpenSSL linked in) whose TLS functions kspan \
         reads the plaintext of."
    ),
    counter!(
        tls_unbound,
        "kspan.tls.unbound",
        "{call}",
        "TLS library calls whose plaintext was dropped because their socket was unknown (a read \
         on memory BIOs with no TLS socket read before it on its thread) or no longer tracked."
    ),
    counter!(
        tls_writes_expired,
        "kspan.tls.writes_expired",
        "{call}",
        "TLS plaintext written before its socket was known (a TLS object on memory BIOs, like \
         gRPC's or Node.js's) and dropped because no write on a TLS socket followed in time."
    ),
    counter!(
        tls_processes_unseen,
        "kspan.tls.processes_unseen",
        "{process}",
        "Processes sending TLS records through a TLS library kspan cannot read (BoringSSL \
         built in, Go crypto/tls, rustls, Java), each counted once."
    ),
];

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

    /// `name=value` of every counter, space-separated: the body of the stop line.
    pub fn stop_line(&self) -> String {
        let mut line = String::new();
        for counter in COUNTERS {
            if !line.is_empty() {
                line.push(' ');
            }
            let _ = write!(line, "{}={}", counter.stop_name, (counter.read)(self));
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_names_are_unique() {
        let mut stop: Vec<&str> = COUNTERS.iter().map(|c| c.stop_name).collect();
        let mut metric: Vec<&str> = COUNTERS.iter().map(|c| c.metric).collect();
        stop.sort();
        stop.dedup();
        metric.sort();
        metric.dedup();
        assert_eq!(stop.len(), COUNTERS.len());
        assert_eq!(metric.len(), COUNTERS.len());
    }

    #[test]
    fn stop_line_reads_each_counter() {
        let stats = Stats::default();
        Stats::add(&stats.events_received, 7);
        Stats::set(&stats.links_late, 3);
        let line = stats.stop_line();
        assert!(
            line.starts_with("events_received=7 events_lost=0 "),
            "{line}"
        );
        assert!(line.contains(" links_late=3 "), "{line}");
        assert!(line.ends_with(" tls_processes_unseen=0"), "{line}");
    }
}
