//! Wires the stages: kernel events → connection tracking → protocol parsers → span builder →
//! span sink. Runs on one thread, so no stage needs a lock; per data event the work is a hash
//! lookup and the parser's feed, without allocation unless an exchange completes.

use std::{
    collections::VecDeque,
    net::{Ipv4Addr, SocketAddr},
    rc::Rc,
    sync::{Arc, mpsc::SyncSender},
    time::Duration,
};

use kspan_common::{CAPTURE_DEFAULT, EventKind};

use crate::linker::{ConnectionLinks, Endpoint, Linker, Node};

use crate::{
    clock::Clock,
    conntrack::{self, ConnTable, Connection, Detection, ProtocolState},
    probes::{
        KernelControl,
        events::{self, Event},
    },
    process::{
        ExecDecision, Processes,
        socket_tables::{self, Lookup, SocketTables},
        tls::TlsProcesses,
    },
    protocols::Payload,
    protocols::{Chunk, Direction, Exchange, ParserCounts, ParserOutput, SharedState},
    spans::{self, Export, ProducedMessages, Resource, Span, build_spans},
    stats::Stats,
    tls_writes::{HeldTlsWrites, HeldWrite},
};

/// A finished span and its trace's sampling decision (unsampled spans still count in metrics).
/// How long a finished span may wait for its parent: the traced client's request event, late
/// when the client thread was preempted between queueing its bytes and its syscall's exit
/// (see `Linker::waits_for_parent`). Microseconds usually; milliseconds on a loaded machine.
const PARENT_WAIT_NS: u64 = 1_000_000_000;
/// Spans waiting at once, at most; past it a span is emitted without waiting.
const MAX_WAITING_SPANS: usize = 4096;

use socket_tables::MIN_RESCAN_INTERVAL;

/// Bounds of the agent's connection state.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections tracked at once; past it new ones are dropped (counted).
    pub connections: usize,
    /// Heap bytes all parsers together may hold (buffered partial messages, requests in flight,
    /// HPACK tables). Past it spare buffers are given back, then the connections holding the
    /// oldest partial messages (then the most memory) lose their parser state (counted).
    pub parser_memory: usize,
    /// A message received only in part for longer than this is dropped with its parser state
    /// (slowloris: headers trickled forever).
    pub partial_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections: kspan_common::MAX_CONNECTIONS as usize,
            parser_memory: 32 << 20,
            partial_timeout: Duration::from_secs(30),
        }
    }
}

/// How often connections are checked for partial messages past their timeout.
const PARTIAL_CHECK_INTERVAL_NS: u64 = 1_000_000_000;
/// How long the events of a process untraced at exec are looked out for (the ring is drained
/// every few milliseconds).
const UNTRACED_EVENTS_WINDOW_NS: u64 = 1_000_000_000;

/// Why a connection's parser state was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Eviction {
    Budget,
    Timeout,
}

/// A finished exchange whose span waits for its parent to be known.
struct WaitingSpan {
    exchange: Exchange,
    node: Rc<Node>,
    local: SocketAddr,
    remote: SocketAddr,
    resource: Arc<Resource>,
    deadline_ns: u64,
}

pub struct Finished {
    pub span: Span,
    pub sampled: bool,
    /// Counted in metrics, never exported (an empty Kafka fetch).
    pub metrics_only: bool,
}

/// Where finished spans go.
pub trait SpanSink {
    fn emit(&mut self, finished: Finished);
    /// Hand over what is buffered (called after each drain of the ring buffer).
    fn flush(&mut self) {}
}

/// Spans per hand-off to the export thread.
pub const SPAN_BATCH: usize = 256;

/// How long a span may wait in a partial batch before it is handed over anyway.
const SPAN_BATCH_DELAY: std::time::Duration = std::time::Duration::from_millis(10);

/// Bounded hand-off to the export thread, in batches: one queue operation per span woke the
/// export thread per span (a futex call and a context switch each), a tenth of the agent's CPU.
/// A partial batch goes when its first span has waited `SPAN_BATCH_DELAY`, not at every drain:
/// the drains come every millisecond under load, and a wake-up per drain cost 5% of the agent.
/// A full queue drops the batch and counts its spans.
pub struct ChannelSink {
    sender: SyncSender<Vec<Finished>>,
    pending: Vec<Finished>,
    /// When the first span of `pending` came.
    pending_since: Option<std::time::Instant>,
    batch_delay: std::time::Duration,
    stats: Arc<Stats>,
}

impl ChannelSink {
    pub fn new(sender: SyncSender<Vec<Finished>>, stats: Arc<Stats>) -> Self {
        Self::with_batch_delay(sender, stats, SPAN_BATCH_DELAY)
    }

    pub fn with_batch_delay(
        sender: SyncSender<Vec<Finished>>,
        stats: Arc<Stats>,
        batch_delay: std::time::Duration,
    ) -> Self {
        ChannelSink {
            sender,
            pending: Vec::with_capacity(SPAN_BATCH),
            pending_since: None,
            batch_delay,
            stats,
        }
    }

    fn hand_over(&mut self) {
        self.pending_since = None;
        if self.pending.is_empty() {
            return;
        }
        let batch = std::mem::replace(&mut self.pending, Vec::with_capacity(SPAN_BATCH));
        // Metrics-only points (empty Kafka fetches) are no spans.
        let spans = batch.iter().filter(|f| !f.metrics_only).count() as u64;
        match self.sender.try_send(batch) {
            Ok(()) => Stats::add(&self.stats.spans_emitted, spans),
            Err(_) => Stats::add(&self.stats.spans_dropped, spans),
        }
    }
}

impl SpanSink for ChannelSink {
    fn emit(&mut self, finished: Finished) {
        if self.pending.is_empty() {
            self.pending_since = Some(std::time::Instant::now());
        }
        self.pending.push(finished);
        if self.pending.len() >= SPAN_BATCH {
            self.hand_over();
        }
    }

    fn flush(&mut self) {
        if self
            .pending_since
            .is_some_and(|since| since.elapsed() >= self.batch_delay)
        {
            self.hand_over();
        }
    }
}

impl Drop for ChannelSink {
    fn drop(&mut self) {
        self.hand_over();
    }
}

/// Collects sampled spans (tests and benchmarks).
impl SpanSink for Vec<Span> {
    fn emit(&mut self, finished: Finished) {
        if finished.sampled && !finished.metrics_only {
            self.push(finished.span);
        }
    }
}

pub struct Pipeline<K: KernelControl, S: SpanSink> {
    kernel: K,
    sink: S,
    processes: Processes,
    connections: ConnTable,
    clock: Clock,
    stats: Arc<Stats>,
    linker: Linker,
    /// State the parsers of different connections share (Kafka topic names, groups).
    parsers_shared: Rc<SharedState>,
    /// Kafka offsets → PRODUCER spans, for CONSUMER spans' links.
    produced: ProducedMessages,
    /// Reused between events so a chunk that completes nothing allocates nothing.
    output: ParserOutput,
    /// Finished spans waiting for their parent, oldest first.
    waiting: VecDeque<WaitingSpan>,
    /// Processes untraced at an exec (their new program is not selected), and when they left
    /// the kernel filter: the events queued before that are the new program's, and are dropped
    /// (a later event of the pid is a new process's). Entries go after
    /// [`UNTRACED_EVENTS_WINDOW_NS`], when the ring has long passed them.
    untraced_at: rustc_hash::FxHashMap<u32, u64>,
    /// Events handled since the last flush: a plain count per event, one shared atomic add per
    /// drain (the stats are read by other threads).
    events_unflushed: u64,
    /// TCP tables of the network namespaces, for sockets the agent did not see open.
    socket_tables: SocketTables,
    limits: Limits,
    /// Sum of the connections' `parser_memory`.
    parser_memory: usize,
    /// Connections whose parser holds a partial message (`partial_since_ns != 0`).
    partial_connections: usize,
    /// Kernel time of the next check for partial messages past their timeout.
    next_partial_check_ns: u64,
    /// Which processes' TLS kspan sees into; the looks at their libraries to make.
    tls: TlsProcesses,
    /// TLS plaintext written before its socket was known (memory BIOs).
    held_tls_writes: HeldTlsWrites,
}

impl<K: KernelControl, S: SpanSink> Pipeline<K, S> {
    pub fn new(
        kernel: K,
        sink: S,
        processes: Processes,
        limits: Limits,
        clock: Clock,
        stats: Arc<Stats>,
        linker: Linker,
    ) -> Self {
        Pipeline {
            kernel,
            sink,
            processes,
            connections: ConnTable::new(limits.connections),
            clock,
            stats,
            linker,
            parsers_shared: Rc::default(),
            produced: ProducedMessages::default(),
            output: ParserOutput::default(),
            waiting: VecDeque::new(),
            untraced_at: rustc_hash::FxHashMap::default(),
            events_unflushed: 0,
            socket_tables: SocketTables::default(),
            limits,
            parser_memory: 0,
            partial_connections: 0,
            next_partial_check_ns: 0,
            tls: TlsProcesses::default(),
            held_tls_writes: HeldTlsWrites::default(),
        }
    }

    /// The kernel lost events (ring full, program runs skipped): see [`Linker::on_events_lost`].
    pub fn on_events_lost(&mut self) {
        self.linker.on_events_lost();
    }

    pub fn linker(&self) -> &Linker {
        &self.linker
    }

    pub fn kernel(&self) -> &K {
        &self.kernel
    }

    pub fn sink(&mut self) -> &mut S {
        &mut self.sink
    }

    /// Hand buffered spans to the sink's consumer and publish the event count (after each drain
    /// of the ring buffer).
    pub fn flush(&mut self) {
        Stats::add(&self.stats.events_received, self.events_unflushed);
        self.events_unflushed = 0;
        let now_ns = Clock::monotonic_now();
        if !self.waiting.is_empty() {
            self.release_waiting(now_ns);
        }
        if !self.untraced_at.is_empty() {
            self.untraced_at
                .retain(|_, at| now_ns.saturating_sub(*at) < UNTRACED_EVENTS_WINDOW_NS);
        }
        let expired = self.held_tls_writes.expire(now_ns);
        Stats::add(&self.stats.tls_writes_expired, expired);
        if self.partial_connections > 0 && now_ns >= self.next_partial_check_ns {
            self.evict_partials_older_than(now_ns.saturating_sub(self.partial_timeout_ns()));
            self.next_partial_check_ns = now_ns + PARTIAL_CHECK_INTERVAL_NS;
        }
        Stats::set(&self.stats.parser_memory, self.parser_memory as u64);
        Stats::set(&self.stats.agent_connections, self.connections.len() as u64);
        Stats::set(&self.stats.agent_processes, self.processes.entries() as u64);
        self.sink.flush()
    }

    fn partial_timeout_ns(&self) -> u64 {
        self.limits.partial_timeout.as_nanos().min(u64::MAX as u128) as u64
    }

    /// Drops the parser state of connections whose partial message began before `cutoff_ns`.
    fn evict_partials_older_than(&mut self, cutoff_ns: u64) {
        let stale: Vec<(u32, i32)> = self
            .connections
            .iter_mut()
            .filter(|(_, _, c)| c.partial_since_ns != 0 && c.partial_since_ns < cutoff_ns)
            .map(|(pid, fd, _)| (pid, fd))
            .collect();
        for (pid, fd) in stale {
            self.evict(pid, fd, Eviction::Timeout);
        }
    }

    /// Brings the parsers' memory back under the budget: first by giving back spare buffer
    /// capacity (no loss), then by dropping the parser state of the connections with the oldest
    /// partial messages, then of those holding the most, down to 7/8 of the budget so that the
    /// next pass is not one byte away.
    fn enforce_budget(&mut self) {
        let mut total = 0;
        for (_, _, c) in self.connections.iter_mut() {
            if let ProtocolState::Parsing { parser, .. } = &mut c.protocol {
                parser.release_spare();
                c.parser_memory = parser.memory_bytes();
            }
            total += c.parser_memory;
        }
        self.parser_memory = total;
        let target = self.limits.parser_memory / 8 * 7;
        if total <= target {
            return;
        }
        let mut candidates: Vec<(u32, i32, u64, usize)> = self
            .connections
            .iter_mut()
            .filter(|(_, _, c)| c.parser_memory > 0)
            .map(|(pid, fd, c)| (pid, fd, c.partial_since_ns, c.parser_memory))
            .collect();
        // Oldest partial message first (0 = none: last), then most memory.
        candidates.sort_unstable_by_key(|&(_, _, since, memory)| {
            (since == 0, since, std::cmp::Reverse(memory))
        });
        for (pid, fd, _, _) in candidates {
            if self.parser_memory <= target {
                break;
            }
            self.evict(pid, fd, Eviction::Budget);
        }
    }

    /// The connection's parser state is dropped: what it had in flight is forgotten (no span
    /// for it, the linker counts the requests), and the next bytes are detected afresh (a
    /// slowloris's trickle fails detection and is muted).
    fn evict(&mut self, pid: u32, fd: i32, why: Eviction) {
        let Some(connection) = self.connections.get_mut(pid, fd) else {
            return;
        };
        let ProtocolState::Parsing { protocol, .. } = &connection.protocol else {
            return;
        };
        let had_capture = protocol.capture_bytes.is_some();
        log::debug!("pid {pid} fd {fd}: parser state evicted ({why:?})");
        connection.protocol = ProtocolState::Undetected { attempts: 0 };
        self.parser_memory -= connection.parser_memory;
        connection.parser_memory = 0;
        if connection.partial_since_ns != 0 {
            connection.partial_since_ns = 0;
            self.partial_connections -= 1;
        }
        let end = endpoint(pid, connection);
        self.linker.forget_requests(&end, &mut connection.links);
        if had_capture {
            self.kernel
                .set_capture(pid, fd, connection.conn_id, CAPTURE_DEFAULT, 0);
        }
        Stats::add(
            match why {
                Eviction::Budget => &self.stats.parser_evictions_budget,
                Eviction::Timeout => &self.stats.parser_evictions_timeout,
            },
            1,
        );
    }

    /// The last flush: spans still waiting for their parent go as they are.
    pub fn shutdown(&mut self) {
        self.release_waiting(u64::MAX);
        self.flush();
    }

    /// Emit the waiting spans whose parent is known now, and those whose wait ended by `now_ns`.
    fn release_waiting(&mut self, now_ns: u64) {
        let mut i = 0;
        while i < self.waiting.len() {
            let waiting = &self.waiting[i];
            let waits = self.linker.waits_for_parent(&waiting.node);
            let waits_for_producers = waits_for_producers(&waiting.exchange, &self.produced);
            if (waits || waits_for_producers) && waiting.deadline_ns > now_ns {
                i += 1;
                continue;
            }
            let Some(w) = self.waiting.remove(i) else {
                break;
            };
            if waits {
                self.linker.give_up_waiting(&w.node);
            }
            emit_spans(
                &self.linker,
                (&mut self.sink, &mut self.produced, &self.stats),
                &self.clock,
                &w.exchange,
                &w.node,
                (w.local, w.remote),
                &w.resource,
            );
        }
    }

    /// Select the processes that exist already and track the TCP connections they have open:
    /// once, from procfs, before events flow.
    /// Each process's fds are read once, each network namespace's TCP tables once.
    pub fn start(&mut self) {
        let trace_all = self.processes.discovery().trace_all();
        for pid in self.processes.initial_selection(&mut self.socket_tables) {
            if !trace_all {
                self.kernel.trace_pid(pid);
                // Its resource now, while it surely exists: a selected client may connect, send
                // and exit before its connect event is read (seen under emulation on 7.2), and
                // a process gone from procfs is named by its comm only.
                self.processes.resource(pid);
            }
            // No table is read twice at start: they all came into being just now.
            self.track_open_sockets(pid, false);
            self.tls.queue_scan(pid);
        }
        self.count_table_scans();
    }

    /// New discovery rules (SIGHUP): the processes they select are traced from now on, the
    /// others are taken out of the kernel filter and their connections forgotten. Returns how
    /// many processes changed each way.
    pub fn reselect(
        &mut self,
        discovery: crate::process::Discovery,
    ) -> anyhow::Result<crate::process::Reselection> {
        let change = self
            .processes
            .reselect(discovery, &mut self.socket_tables)?;
        self.apply_reselection(&change);
        Ok(change)
    }

    /// Pods of this node changed (Kubernetes): their processes' resources are read again, and
    /// rules on Kubernetes fields judge those processes again. Cheap when nothing changed.
    pub fn poll_kubernetes(&mut self) {
        if let Some(change) = self.processes.poll_kubernetes(&mut self.socket_tables) {
            if !change.newly_selected.is_empty() || change.dropped > 0 {
                log::info!(
                    "pods changed: tracing {} more processes, {} fewer",
                    change.newly_selected.len(),
                    change.dropped
                );
            }
            self.apply_reselection(&change);
        }
    }

    /// Into the kernel filter with the newly selected processes (and their open connections),
    /// out with the others, forgetting what was tracked of them.
    fn apply_reselection(&mut self, change: &crate::process::Reselection) {
        let now = Clock::monotonic_now();
        for &pid in &change.unselected {
            self.kernel.untrace_pid(pid);
            self.forget_process(pid, now);
        }
        for &pid in &change.newly_selected {
            self.kernel.trace_pid(pid);
            self.processes.resource(pid);
            self.track_open_sockets(pid, true);
            self.tls.queue_scan(pid);
        }
        self.count_table_scans();
    }

    /// Track the TCP connections `pid` has open. `refresh`: a socket the cached tables do not
    /// list is looked up in one new read of them (a process newly selected, whose sockets may
    /// be newer than the cache); at most one read per call, whatever its number of sockets.
    fn track_open_sockets(&mut self, pid: u32, refresh: bool) {
        let conn_id = Clock::monotonic_now();
        let fds = socket_tables::socket_fds(pid);
        if fds.is_empty() {
            return;
        }
        let Some(namespace) = socket_tables::network_namespace(pid) else {
            return;
        };
        let scans_before = self.socket_tables.scans();
        for (fd, inode) in fds {
            let max_age = if refresh && self.socket_tables.scans() == scans_before {
                Duration::ZERO
            } else {
                Duration::MAX
            };
            let Lookup::Tcp(socket) = self
                .socket_tables
                .lookup_inode(pid, namespace, inode, max_age)
            else {
                continue;
            };
            if socket.listening {
                continue;
            }
            // The kernel's identity if it already tracks the socket (its Connect or Accept
            // event, still queued, then replaces this entry with the same identity).
            let conn_id = self.kernel.track_connection(pid, fd, conn_id);
            let connection = Connection::new(
                conn_id,
                conntrack::unmap_socket(socket.local),
                conntrack::unmap_socket(socket.remote),
                false,
            );
            if !self.open_connection(pid, fd, connection) {
                self.kernel.forget_connection(pid, fd, conn_id);
            }
        }
    }

    /// Publish the table reads made since the last call.
    fn count_table_scans(&mut self) {
        let scans = self.socket_tables.take_new_scans();
        if scans > 0 {
            Stats::add(&self.stats.socket_table_scans, scans);
        }
    }

    /// One ring-buffer record.
    pub fn handle_record(&mut self, record: &[u8]) {
        self.events_unflushed += 1;
        match events::decode(record) {
            Some(event) => self.handle_event(event),
            None => Stats::add(&self.stats.malformed_events, 1),
        }
    }

    pub fn handle_event(&mut self, event: Event<'_>) {
        if !self.untraced_at.is_empty()
            && let Event::Data { header, .. } | Event::Socket { header, .. } | Event::Close(header) =
                &event
            && self
                .untraced_at
                .get(&header.pid)
                .is_some_and(|&untraced| header.start_ns < untraced)
        {
            return;
        }
        match event {
            Event::Data {
                header,
                direction,
                data,
                tail,
            } => {
                let chunk = Chunk {
                    direction,
                    data,
                    tail,
                    full_len: header.full_len,
                    start_ns: header.start_ns,
                    end_ns: header.end_ns,
                    tid: header.tid,
                };
                let tls = header.source == kspan_common::SOURCE_TLS;
                if tls && header.fd < 0 {
                    // Written to a TLS object with no socket yet: held until a TlsBound.
                    let write = HeldWrite {
                        data: data.to_vec(),
                        tail: tail.to_vec(),
                        full_len: header.full_len,
                        start_ns: header.start_ns,
                        end_ns: header.end_ns,
                    };
                    let dropped = self.held_tls_writes.hold(header.pid, header.tid, write);
                    Stats::add(&self.stats.tls_writes_expired, dropped);
                    return;
                }
                self.on_data(header.pid, header.fd, header.conn_id, &chunk, tls);
            }
            Event::TlsBound(header) => {
                for write in self.held_tls_writes.take(header.pid, header.tid) {
                    let chunk = Chunk {
                        direction: Direction::Egress,
                        data: &write.data,
                        tail: &write.tail,
                        full_len: write.full_len,
                        start_ns: write.start_ns,
                        end_ns: write.end_ns,
                        tid: header.tid,
                    };
                    self.on_data(header.pid, header.fd, header.conn_id, &chunk, true);
                }
            }
            Event::Socket {
                kind: EventKind::Listen,
                header,
                tuple,
            } => {
                if self.processes.on_listen(header.pid, tuple.local_port) {
                    log::info!(
                        "tracing pid {} (listening on port {})",
                        header.pid,
                        tuple.local_port
                    );
                    self.kernel.trace_pid(header.pid);
                    self.track_open_sockets(header.pid, true);
                    self.tls.queue_scan(header.pid);
                    self.count_table_scans();
                }
            }
            Event::Socket {
                kind,
                header,
                tuple,
            } => {
                let (local, remote) = conntrack::tuple_addresses(&tuple);
                // Read the resource now, while the process surely exists: short-lived clients
                // may be gone by the time their first span is built.
                self.processes.resource(header.pid);
                if kind == EventKind::Connect {
                    self.linker.on_client_connect(local, remote);
                }
                let connection = Connection::new(header.conn_id, local, remote, true);
                if !self.open_connection(header.pid, header.fd, connection) {
                    self.kernel
                        .forget_connection(header.pid, header.fd, header.conn_id);
                }
            }
            Event::Close(header) => {
                let current = self
                    .connections
                    .get_mut(header.pid, header.fd)
                    .is_some_and(|c| c.conn_id == header.conn_id);
                if current && let Some(connection) = self.connections.remove(header.pid, header.fd)
                {
                    self.finish_connection(header.pid, connection, header.end_ns);
                }
            }
            Event::Exec { header, comm, path } => {
                match self
                    .processes
                    .on_exec(header.pid, &comm, path, &mut self.socket_tables)
                {
                    ExecDecision::Trace => {
                        self.untraced_at.remove(&header.pid);
                        log::debug!("tracing pid {} (exec)", header.pid);
                        self.kernel.trace_pid(header.pid);
                        self.processes.resource(header.pid);
                        self.track_open_sockets(header.pid, true);
                        self.tls.queue_scan(header.pid);
                        self.count_table_scans();
                    }
                    ExecDecision::Untrace => {
                        self.kernel.untrace_pid(header.pid);
                        self.forget_process(header.pid, header.end_ns);
                        self.tls.forget(header.pid);
                        self.untraced_at.insert(header.pid, Clock::monotonic_now());
                    }
                    ExecDecision::Unchanged => {
                        // Still traced (trace-all, or selected before): read the new image's
                        // resource while the process surely exists.
                        if self.processes.discovery().trace_all()
                            || self.processes.is_traced(header.pid)
                        {
                            self.processes.resource(header.pid);
                        }
                    }
                }
            }
            Event::Exit(header) => {
                let dropped = self.held_tls_writes.forget_process(header.pid);
                Stats::add(&self.stats.tls_writes_expired, dropped);
                self.forget_process(header.pid, header.end_ns);
                self.processes.on_exit(header.pid);
                self.tls.forget(header.pid);
            }
            Event::LibraryMapped(header) => self.tls.queue_scan(header.pid),
        }
    }

    /// The processes whose maps to look at for TLS libraries now (selected, or a library
    /// mapped since the last call): the caller attaches, then reports with [`Self::tls_scanned`].
    pub fn take_tls_scans(&mut self) -> Vec<u32> {
        self.tls.take_scans()
    }

    /// The look at `pid`'s libraries found one kspan reads (`visible`), or none; None: the
    /// process was gone.
    pub fn tls_scanned(&mut self, pid: u32, visible: Option<bool>) {
        if self.tls.scanned(pid, visible) {
            self.report_unseen_tls(pid);
        }
    }

    /// Once per process: its TLS is not one kspan reads.
    fn report_unseen_tls(&mut self, pid: u32) {
        let resource = self.processes.resource(pid);
        let name = match resource.get("service.name") {
            Some(spans::AttributeValue::Str(name)) => name.as_str(),
            _ => "?",
        };
        log::warn!(
            "pid {pid} ({name}): TLS traffic kspan cannot see into (no OpenSSL with symbols among its \
             libraries: BoringSSL built in, Go crypto/tls, rustls and Java are not seen yet); \
             counted in tls_processes_unseen"
        );
        Stats::add(&self.stats.tls_processes_unseen, 1);
    }

    /// False if the table is full (the connection is not tracked, and counted).
    fn open_connection(&mut self, pid: u32, fd: i32, connection: Connection) -> bool {
        match self.connections.insert(pid, fd, connection) {
            Ok(Some(stale)) => {
                // Its close event was lost; the fd now names a new connection.
                self.finish_connection(pid, stale, Clock::monotonic_now());
                true
            }
            Ok(None) => true,
            Err(_) => {
                Stats::add(&self.stats.connections_dropped, 1);
                false
            }
        }
    }

    fn forget_process(&mut self, pid: u32, end_ns: u64) {
        for (fd, connection) in self.connections.remove_process(pid) {
            self.kernel.forget_connection(pid, fd, connection.conn_id);
            self.finish_connection(pid, connection, end_ns);
        }
        self.linker.forget_process(pid);
        self.parsers_shared.kafka.forget_process(pid);
    }

    /// `tls`: the chunk is plaintext from a TLS library call (else a socket syscall's bytes).
    fn on_data(&mut self, pid: u32, fd: i32, conn_id: u64, chunk: &Chunk<'_>, tls: bool) {
        log::trace!(
            "data pid {pid} fd {fd} {:?} {} of {} bytes: {}",
            chunk.direction,
            chunk.data.len(),
            chunk.full_len,
            chunk.data[..chunk.data.len().min(24)].escape_ascii()
        );
        let known = self
            .connections
            .get_mut(pid, fd)
            .is_some_and(|c| c.conn_id == conn_id);
        if !known {
            // Its Accept/Connect event was lost, or the socket came with a fork: resolve it from
            // its namespace's TCP tables (read at most once per MIN_RESCAN_INTERVAL). An
            // unresolvable socket is muted.
            let lookup = self.socket_tables.lookup_fd(pid, fd, MIN_RESCAN_INTERVAL);
            self.count_table_scans();
            let unspecified = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
            let connection = match lookup {
                Lookup::Tcp(s) => Connection::new(
                    conn_id,
                    conntrack::unmap_socket(s.local),
                    conntrack::unmap_socket(s.remote),
                    false,
                ),
                Lookup::NotTcp => {
                    self.kernel.mute_connection(pid, fd, conn_id);
                    Stats::add(&self.stats.connections_muted, 1);
                    let mut connection = Connection::new(conn_id, unspecified, unspecified, false);
                    connection.protocol = ProtocolState::Muted;
                    connection
                }
                // Newer than the tables: its bytes are lost until the next read.
                Lookup::NotYet => {
                    Stats::add(&self.stats.unknown_socket_events_deferred, 1);
                    return;
                }
            };
            if !self.open_connection(pid, fd, connection) {
                // Counted; the kernel stops reporting it, rather than every later event of
                // the socket coming here again.
                self.kernel.forget_connection(pid, fd, conn_id);
                return;
            }
        }
        let Some(connection) = self.connections.get_mut(pid, fd) else {
            return;
        };
        if tls {
            if !connection.tls_plaintext {
                // Its first plaintext. Whatever its ciphertext made of it before (undetected,
                // or muted as no known protocol) is forgotten: detection starts on the plaintext.
                connection.tls = true;
                connection.tls_plaintext = true;
                if matches!(connection.protocol, ProtocolState::Muted) {
                    connection.protocol = ProtocolState::Undetected { attempts: 0 };
                }
                self.tls.plaintext(pid);
            }
        } else if connection.tls {
            // Ciphertext queued before the kernel knew the connection was TLS.
            return;
        } else if matches!(connection.protocol, ProtocolState::Undetected { .. })
            && is_tls_record(chunk.data)
        {
            // A TLS handshake (or records of a connection older than kspan): no more of its
            // ciphertext is copied. Its plaintext comes from the library's uprobes, or never
            // (reported once per process).
            connection.tls = true;
            self.kernel.set_tls(pid, fd, conn_id);
            self.tls.ciphertext(pid);
            return;
        }
        if !chunk.data.is_empty() {
            match connection
                .protocol
                .detect(chunk.data, chunk.direction, pid, &self.parsers_shared)
            {
                Detection::Unchanged => {}
                Detection::Detected(name) => {
                    log::debug!("pid {pid} fd {fd}: {name}");
                    if let Some(p) = connection.protocol.protocol()
                        && let Some(bytes) = p.capture_bytes
                    {
                        self.kernel
                            .set_capture(pid, fd, conn_id, bytes, p.capture_tail);
                    }
                }
                Detection::GaveUp => {
                    log::debug!(
                        "pid {pid} fd {fd}: no known protocol, muted: {}",
                        chunk.data[..chunk.data.len().min(32)].escape_ascii()
                    );
                    self.kernel.mute_connection(pid, fd, conn_id);
                    Stats::add(&self.stats.connections_muted, 1);
                }
            }
        }
        let ProtocolState::Parsing { protocol, parser } = &mut connection.protocol else {
            return;
        };
        let in_order = protocol.in_order;
        parser.feed(chunk, &mut self.output);
        let gave_up = parser.gave_up();
        let switched = parser.switched();
        // The memory budget and the partial-message timeout. A message counts as partial from
        // the first chunk that left one buffered while no message completed: a busy connection
        // whose chunks end mid-message keeps completing others and is never timed out.
        let memory = parser.memory_bytes();
        self.parser_memory = self.parser_memory - connection.parser_memory + memory;
        connection.parser_memory = memory;
        let progress = !self.output.request_starts.is_empty()
            || !self.output.responses_started.is_empty()
            || !self.output.exchanges.is_empty();
        match (parser.holds_partial(), connection.partial_since_ns) {
            (true, 0) => {
                connection.partial_since_ns = chunk.start_ns.max(1);
                self.partial_connections += 1;
            }
            (true, _) if progress => connection.partial_since_ns = chunk.start_ns.max(1),
            (false, since) if since != 0 => {
                connection.partial_since_ns = 0;
                self.partial_connections -= 1;
            }
            _ => {}
        }
        let over_budget = self.parser_memory > self.limits.parser_memory;
        let counts = std::mem::take(&mut self.output.counts);
        if counts != ParserCounts::default() {
            count_parser(&self.stats, &counts);
            if counts.parse_errors > 0 {
                log::debug!(
                    "parse error on pid {pid} fd {fd} ({:?}, {} of {} bytes, tid {}): {}",
                    chunk.direction,
                    chunk.data.len(),
                    chunk.full_len,
                    chunk.tid,
                    chunk.data[..chunk.data.len().min(96)].escape_ascii()
                );
            }
        }
        let end = endpoint(pid, connection);
        // Requests parsed by this chunk get their span node now, while they are being served.
        for start in self.output.request_starts.drain(..) {
            self.linker.on_request(&end, &start, &mut connection.links);
        }
        for id in self.output.dropped.drain(..) {
            self.linker.abandon_request(&end, &mut connection.links, id);
        }
        if !self.output.responses_started.is_empty() {
            self.linker.on_responses_started(
                &end,
                &mut connection.links,
                &self.output.responses_started,
            );
            self.output.responses_started.clear();
        }
        if !self.output.exchanges.is_empty() {
            // The links leave the connection while `emit` borrows the pipeline.
            let mut links = std::mem::take(&mut connection.links);
            self.emit(pid, &end, &mut links, in_order);
            if let Some(connection) = self.connections.get_mut(pid, fd) {
                connection.links = links;
            }
        }
        if (gave_up || switched)
            && let Some(connection) = self.connections.get_mut(pid, fd)
        {
            // The parser leaves the connection: what it had in flight ends now. A parser that
            // gave up mutes the connection; after a protocol switch the next bytes are detected
            // afresh, with the default capture until then.
            let next = if gave_up {
                log::debug!("pid {pid} fd {fd}: parser gave up, muted");
                ProtocolState::Muted
            } else {
                log::debug!("pid {pid} fd {fd}: protocol switched, detecting again");
                ProtocolState::Undetected { attempts: 0 }
            };
            let ProtocolState::Parsing { protocol, parser } =
                std::mem::replace(&mut connection.protocol, next)
            else {
                return;
            };
            self.parser_memory -= std::mem::take(&mut connection.parser_memory);
            if std::mem::take(&mut connection.partial_since_ns) != 0 {
                self.partial_connections -= 1;
            }
            let mut links = std::mem::take(&mut connection.links);
            parser_close(parser, chunk.end_ns, &mut self.output);
            self.emit(pid, &end, &mut links, protocol.in_order);
            if gave_up {
                self.linker.on_close(&end, &mut links);
                self.kernel.mute_connection(pid, fd, conn_id);
                Stats::add(&self.stats.connections_muted, 1);
            } else {
                // The connection goes on (pairing with its other end included).
                self.linker.forget_requests(&end, &mut links);
                self.kernel
                    .set_capture(pid, fd, conn_id, CAPTURE_DEFAULT, 0);
            }
        }
        if over_budget {
            self.enforce_budget();
        }
    }

    fn finish_connection(&mut self, pid: u32, mut connection: Connection, end_ns: u64) {
        self.parser_memory -= connection.parser_memory;
        if connection.partial_since_ns != 0 {
            self.partial_connections -= 1;
        }
        let end = endpoint(pid, &connection);
        if let ProtocolState::Parsing { protocol, parser } = connection.protocol {
            parser_close(parser, end_ns, &mut self.output);
            let counts = std::mem::take(&mut self.output.counts);
            count_parser(&self.stats, &counts);
            self.emit(pid, &end, &mut connection.links, protocol.in_order);
        }
        self.linker.on_close(&end, &mut connection.links);
    }

    /// Completed exchanges → spans: identity from the linker, attributes from the builder, out
    /// to the sink; or to the waiting list while the linker still expects their parent.
    fn emit(&mut self, pid: u32, end: &Endpoint, links: &mut ConnectionLinks, in_order: bool) {
        if self.output.exchanges.is_empty() {
            return;
        }
        let resource = self.processes.resource(pid);
        for mut exchange in self.output.exchanges.drain(..) {
            // HTTP/1 has no scheme on the wire; HTTP/2 clients send `:scheme` themselves.
            if end.tls
                && let Payload::Http(http) = &mut exchange.payload
                && http.request.scheme.is_none()
            {
                http.request.scheme = Some("https".into());
            }
            let node = self
                .linker
                .finish(end, exchange.role, links, exchange.id, in_order);
            let waits = self.linker.waits_for_parent(&node)
                || waits_for_producers(&exchange, &self.produced);
            if waits && self.waiting.len() < MAX_WAITING_SPANS {
                self.waiting.push_back(WaitingSpan {
                    exchange,
                    node,
                    local: end.local,
                    remote: end.remote,
                    resource: resource.clone(),
                    deadline_ns: Clock::monotonic_now() + PARENT_WAIT_NS,
                });
                continue;
            }
            emit_spans(
                &self.linker,
                (&mut self.sink, &mut self.produced, &self.stats),
                &self.clock,
                &exchange,
                &node,
                (end.local, end.remote),
                &resource,
            );
        }
    }
}

/// The connection as the linker knows it.
fn endpoint(pid: u32, connection: &Connection) -> Endpoint {
    Endpoint {
        pid,
        local: connection.local,
        remote: connection.remote,
        from_start: connection.from_start,
        tls: connection.tls,
    }
}

/// The start of a TLS record: content type (change_cipher_spec 20, alert 21, handshake 22,
/// application_data 23) and a TLS 1.0-1.3 record version (3.1-3.4; 1.3 still writes 3.1 or
/// 3.3). No HTTP/1 message, HTTP/2 preface or Kafka request starts so (a Kafka length of
/// 0x1403_0000 and more is over any limit).
fn is_tls_record(data: &[u8]) -> bool {
    matches!(data, [20..=23, 3, 1..=4, _, _, ..])
}

fn count_parser(stats: &Stats, counts: &ParserCounts) {
    for (counter, n) in [
        (&stats.parse_errors, counts.parse_errors),
        (&stats.parse_desynchronised, counts.desynchronised),
        (&stats.parse_limits_hit, counts.limits_hit),
    ] {
        if n > 0 {
            Stats::add(counter, n);
        }
    }
}

/// Closes a parser that leaves its connection: what it had in flight ends as exchanges.
fn parser_close(
    mut parser: Box<dyn crate::protocols::ProtocolParser>,
    end_ns: u64,
    output: &mut ParserOutput,
) {
    parser.close(end_ns, output);
    // Starts and response starts of a closing connection have no one left to inform.
    output.request_starts.clear();
    output.responses_started.clear();
    output.dropped.clear();
}

/// A Kafka fetch whose messages' producer spans may still come (see
/// `spans::kafka::waits_for_producers`).
fn waits_for_producers(exchange: &Exchange, produced: &ProducedMessages) -> bool {
    match &exchange.payload {
        Payload::Kafka(kafka) => spans::kafka::waits_for_producers(exchange, kafka, produced),
        Payload::Http(_) => false,
    }
}

fn emit_spans(
    linker: &Linker,
    (sink, produced, stats): (&mut impl SpanSink, &mut ProducedMessages, &Stats),
    clock: &Clock,
    exchange: &Exchange,
    node: &Node,
    addresses: (SocketAddr, SocketAddr),
    resource: &Arc<Resource>,
) {
    let resolved = linker.resolve(node);
    let links_dropped = produced.links_dropped;
    build_spans(
        exchange,
        resolved.ids,
        addresses,
        resource,
        clock,
        produced,
        &mut |mut span, export| {
            span.trace_state = resolved.trace_state.as_deref().map(str::to_string);
            sink.emit(Finished {
                span,
                sampled: resolved.sampled,
                metrics_only: export == Export::MetricsOnly,
            });
        },
    );
    if produced.links_dropped > links_dropped {
        Stats::add(
            &stats.message_links_dropped,
            produced.links_dropped - links_dropped,
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use kspan_common::EventHeader;

    use super::*;
    use crate::spans::{AttributeValue, Resource, SpanKind, SpanStatus};

    fn finished(n: u8) -> Finished {
        Finished {
            span: Span {
                trace_id: [n; 16],
                span_id: [n; 8],
                parent_span_id: None,
                trace_state: None,
                name: "GET /".into(),
                kind: SpanKind::Server,
                start_unix_nano: 1,
                end_unix_nano: 2,
                status: SpanStatus::Unset,
                attributes: Vec::new(),
                links: Vec::new(),
                resource: Arc::new(Resource {
                    attributes: Vec::new(),
                }),
            },
            sampled: true,
            metrics_only: false,
        }
    }

    /// Records what the pipeline asks of the kernel.
    #[derive(Default)]
    struct FakeKernel {
        captures: Vec<(i32, u32, u32)>,
        muted: Vec<i32>,
        tls: Vec<i32>,
        forgotten: Vec<i32>,
        tracked: Vec<(u32, i32)>,
        /// Sockets the kernel tracks already (fd → its id), as after a connect it saw.
        kernel_ids: std::collections::HashMap<i32, u64>,
    }

    impl KernelControl for FakeKernel {
        fn trace_pid(&mut self, _pid: u32) {}
        fn untrace_pid(&mut self, _pid: u32) {}
        fn track_connection(&mut self, pid: u32, fd: i32, conn_id: u64) -> u64 {
            self.tracked.push((pid, fd));
            *self.kernel_ids.entry(fd).or_insert(conn_id)
        }
        fn forget_connection(&mut self, _pid: u32, fd: i32, _conn_id: u64) {
            self.forgotten.push(fd);
        }
        fn set_capture(&mut self, _pid: u32, fd: i32, _conn_id: u64, bytes: u32, tail: u32) {
            self.captures.push((fd, bytes, tail));
        }
        fn mute_connection(&mut self, _pid: u32, fd: i32, _conn_id: u64) {
            self.muted.push(fd);
        }
        fn set_tls(&mut self, _pid: u32, fd: i32, _conn_id: u64) {
            self.tls.push(fd);
        }
    }

    fn test_pipeline() -> Pipeline<FakeKernel, Vec<Span>> {
        pipeline_with_capacity(16)
    }

    fn pipeline_with_capacity(connections: usize) -> Pipeline<FakeKernel, Vec<Span>> {
        pipeline_with_limits(Limits {
            connections,
            ..Limits::default()
        })
    }

    fn pipeline_with_limits(limits: Limits) -> Pipeline<FakeKernel, Vec<Span>> {
        pipeline_for(crate::process::Discovery::default(), limits)
    }

    fn pipeline_for(
        discovery: crate::process::Discovery,
        limits: Limits,
    ) -> Pipeline<FakeKernel, Vec<Span>> {
        Pipeline::new(
            FakeKernel::default(),
            Vec::new(),
            Processes::new(discovery),
            limits,
            Clock::with_offset(0),
            Arc::new(Stats::default()),
            Linker::new(crate::tracecontext::Sampler::AlwaysOn),
        )
    }

    /// This process's accepted connection on fd 5, then `events` on it.
    fn feed(p: &mut Pipeline<FakeKernel, Vec<Span>>, events: &[(Direction, &[u8])]) {
        accept(p, 5);
        for (i, (direction, data)) in events.iter().enumerate() {
            data_at(p, 5, 1_000 * (i as u64 + 1), *direction, data);
        }
        p.shutdown();
    }

    /// A TCP tuple between two loopback ports.
    fn loopback_tuple(local_port: u16, remote_port: u16) -> kspan_common::SocketTuple {
        let mut tuple = kspan_common::SocketTuple {
            family: kspan_common::AF_INET,
            local_port,
            remote_port,
            ..Default::default()
        };
        tuple.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        tuple.remote_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        tuple
    }

    /// One HTTP/2 frame.
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }

    /// `Upgrade: h2c`: the HTTP/1 request and its 101 make an HTTP/1 span; after the switch the
    /// connection is detected again and its HTTP/2 streams make spans of their own.
    #[test]
    fn an_h2c_upgrade_continues_as_http2() {
        let mut p = test_pipeline();
        let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        preface.extend(frame(4, 0, 0, &[]));
        // Stream 3: GET / (static :method GET, :path /, :scheme http); END_HEADERS|END_STREAM.
        preface.extend(frame(1, 0x5, 3, &[0x82, 0x84, 0x86]));
        // Its response: :status 200 (static), END_HEADERS|END_STREAM.
        let response = frame(1, 0x5, 3, &[0x88]);
        feed(
            &mut p,
            &[
                (
                    Direction::Ingress,
                    b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n",
                ),
                (
                    Direction::Egress,
                    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
                ),
                (Direction::Ingress, &preface),
                (Direction::Egress, &response),
            ],
        );
        let spans = p.sink();
        let versions: Vec<_> = spans
            .iter()
            .map(|s| {
                (
                    s.name.to_string(),
                    s.attribute("network.protocol.version").cloned(),
                )
            })
            .collect();
        assert_eq!(
            versions,
            [
                ("GET /".to_string(), Some(AttributeValue::Str("1.1".into()))),
                ("GET /".to_string(), Some(AttributeValue::Str("2".into()))),
            ]
        );
        assert_eq!(
            p.kernel().captures,
            [
                (5, CAPTURE_DEFAULT, 0),
                (5, kspan_common::HTTP2_CAPTURE, 4096)
            ],
            "back to the default capture at the switch, HTTP/2's once detected"
        );
        assert!(p.kernel().muted.is_empty());
    }

    /// A client that execs, connects, sends, reads and exits before the agent reads its procfs
    /// (made certain here with a pid no process has): its span still has the executable's full
    /// path, from the exec event.
    #[test]
    fn a_client_gone_before_procfs_has_its_exec_path() {
        let mut p = test_pipeline();
        let pid = 5_000_000; // above the kernel's PID_MAX_LIMIT
        let header = |kind: EventKind, t: u64| EventHeader {
            kind: kind as u32,
            pid,
            tid: pid,
            fd: 3,
            conn_id: 7,
            start_ns: t,
            end_ns: t + 10,
            ..Default::default()
        };
        let exec = events::encode_exec(
            &EventHeader {
                fd: -1,
                ..header(EventKind::Exec, 10)
            },
            "curl",
            b"/nonexistent/kspan-test/curl",
        );
        p.handle_record(&exec);
        p.handle_event(Event::Socket {
            kind: EventKind::Connect,
            header: header(EventKind::Connect, 100),
            tuple: loopback_tuple(40000, 8080),
        });
        let request: &[u8] = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n";
        let response: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        for (t, direction, data) in [
            (1_000, Direction::Egress, request),
            (2_000, Direction::Ingress, response),
        ] {
            p.handle_event(Event::Data {
                header: EventHeader {
                    full_len: data.len() as u64,
                    copied_len: data.len() as u32,
                    ..header(EventKind::Data, t)
                },
                direction,
                data,
                tail: &[],
            });
        }
        p.handle_event(Event::Close(header(EventKind::Close, 3_000)));
        p.shutdown();
        let spans = p.sink();
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].kind, SpanKind::Client);
        let resource = &spans[0].resource;
        assert_eq!(
            resource.get("process.executable.path"),
            Some(&AttributeValue::Str("/nonexistent/kspan-test/curl".into()))
        );
        assert_eq!(
            resource.get("service.name"),
            Some(&AttributeValue::Str("curl".into()))
        );
    }

    /// A traced process execs a program no rule selects: the events the kernel queued before
    /// the agent took it out of the filter are the new program's and make no span; a later
    /// process given the same pid is traced as usual.
    #[test]
    fn events_queued_before_an_untrace_at_exec_are_dropped() {
        let rules = crate::process::Discovery::new(
            vec![crate::process::Rule::exe("/nonexistent/kspan-test/server").unwrap()],
            vec![],
        );
        let mut p = pipeline_for(rules, Limits::default());
        let pid = 5_000_000; // above the kernel's PID_MAX_LIMIT
        let header = |kind: EventKind, t: u64| EventHeader {
            kind: kind as u32,
            pid,
            tid: pid,
            fd: 3,
            conn_id: t,
            start_ns: t,
            end_ns: t + 10,
            ..Default::default()
        };
        let exchange = |p: &mut Pipeline<FakeKernel, Vec<Span>>, t: u64| {
            p.handle_event(Event::Socket {
                kind: EventKind::Connect,
                header: header(EventKind::Connect, t),
                tuple: loopback_tuple(40000, 8080),
            });
            let request: &[u8] = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n";
            let response: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
            for (dt, direction, data) in [
                (1_000, Direction::Egress, request),
                (2_000, Direction::Ingress, response),
            ] {
                p.handle_event(Event::Data {
                    header: EventHeader {
                        full_len: data.len() as u64,
                        copied_len: data.len() as u32,
                        conn_id: t,
                        ..header(EventKind::Data, t + dt)
                    },
                    direction,
                    data,
                    tail: &[],
                });
            }
            p.handle_event(Event::Close(EventHeader {
                conn_id: t,
                ..header(EventKind::Close, t + 3_000)
            }));
        };
        let exec = events::encode_exec(
            &EventHeader {
                fd: -1,
                ..header(EventKind::Exec, 10)
            },
            "curl",
            b"/nonexistent/kspan-test/curl",
        );
        p.handle_record(&exec);
        exchange(&mut p, 100);
        p.flush();
        assert!(p.sink().is_empty(), "{:?}", p.sink());
        // A new process with the pid, after the untrace.
        exchange(&mut p, Clock::monotonic_now() + 1_000_000);
        p.shutdown();
        assert_eq!(p.sink().len(), 1, "{:?}", p.sink());
    }

    /// An event on a socket of this process the pipeline never saw open.
    fn data_on_unknown(p: &mut Pipeline<FakeKernel, Vec<Span>>, fd: i32, data: &[u8]) {
        data_event(p, fd, 9, 0, Direction::Egress, data);
    }

    /// Sockets whose connect or accept the agent never saw (opened before it started, or
    /// inherited): many events on many of them cost one read of their namespace's TCP tables,
    /// and each resolves to its own addresses.
    #[test]
    fn unknown_sockets_of_one_namespace_cost_one_table_read() {
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let clients: Vec<_> = (0..10)
            .map(|_| std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap())
            .collect();
        let mut p = test_pipeline();
        for _ in 0..3 {
            for client in &clients {
                data_on_unknown(&mut p, client.as_raw_fd(), b"GET / HTTP/1.1\r\n");
            }
        }
        assert_eq!(Stats::get(&p.stats.socket_table_scans), 1);
        assert_eq!(Stats::get(&p.stats.connections_muted), 0);
        for client in &clients {
            let connection = p
                .connections
                .get_mut(std::process::id(), client.as_raw_fd())
                .expect("tracked");
            assert_eq!(connection.local, client.local_addr().unwrap());
            assert_eq!(connection.remote, client.peer_addr().unwrap());
        }
        // Not a socket at all: muted, without reading the tables again.
        let file = std::fs::File::open("/proc/self/stat").unwrap();
        data_on_unknown(&mut p, file.as_raw_fd(), b"x");
        assert_eq!(p.kernel().muted, [file.as_raw_fd()]);
        assert_eq!(Stats::get(&p.stats.socket_table_scans), 1);
    }

    /// A `sleep 60` child whose fd 3 is `fd` (a connection of this process).
    fn sleeper_holding(fd: i32) -> std::process::Child {
        use std::os::unix::process::CommandExt;
        let mut command = std::process::Command::new("sleep");
        command.arg("60");
        // SAFETY: dup2 is async-signal-safe; fd 3 of the child is the connection
        // (without CLOEXEC).
        unsafe {
            command.pre_exec(move || {
                // dup2 onto itself would keep CLOEXEC: clear it then.
                let ok = if fd == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0)
                } else {
                    libc::dup2(fd, 3)
                };
                if ok < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        command.spawn().unwrap()
    }

    /// Start: N processes (children of this test, each holding a connection on fd 3) in one
    /// network namespace cost one read of its TCP tables, not one per process; each process's
    /// connection is tracked with its own addresses.
    #[test]
    fn the_start_reads_each_namespace_tables_once() {
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut children = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..6 {
            let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let fd = client.as_raw_fd();
            children.push(sleeper_holding(fd));
            clients.push(client);
        }
        // The children, selected as descendants of this process; the kernel is faked.
        let rules = crate::process::Discovery::new(
            vec![crate::process::Rule::pid(std::process::id())],
            vec![],
        );
        let mut p = pipeline_for(rules, Limits::default());
        // Wait (bounded) until every child has exec'd sleep: its fds are then the final ones.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while children
            .iter()
            .any(|c| crate::process::procfs_scan::command_name(c.id()).as_deref() != Some("sleep"))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "children did not exec"
            );
            std::thread::yield_now();
        }
        p.start();
        let scans = Stats::get(&p.stats.socket_table_scans);
        for child in &mut children {
            let _ = child.kill();
            let _ = child.wait();
        }
        assert_eq!(scans, 1);
        for (child, client) in children.iter().zip(&clients) {
            assert!(
                p.kernel().tracked.contains(&(child.id(), 3)),
                "{:?}",
                p.kernel().tracked
            );
            let connection = p.connections.get_mut(child.id(), 3).expect("tracked");
            assert_eq!(connection.local, client.local_addr().unwrap());
            assert_eq!(connection.remote, client.peer_addr().unwrap());
        }
    }

    /// A process selected later (here by a LISTEN on a `--port`) whose connection is newer than
    /// the cached tables: one new read finds it.
    #[test]
    fn a_newly_selected_process_refreshes_the_tables_once() {
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let rules = crate::process::Discovery::new(vec![crate::process::Rule::port(port)], vec![]);
        let mut p = pipeline_for(rules, Limits::default());
        // Tables read (an unknown socket of this process), then a newer connection.
        let early = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        data_on_unknown(&mut p, early.as_raw_fd(), b"x");
        assert_eq!(Stats::get(&p.stats.socket_table_scans), 1);
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let mut child = sleeper_holding(client.as_raw_fd());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while crate::process::procfs_scan::command_name(child.id()).as_deref() != Some("sleep") {
            assert!(
                std::time::Instant::now() < deadline,
                "the child did not exec"
            );
            std::thread::yield_now();
        }
        let mut tuple = kspan_common::SocketTuple {
            family: kspan_common::AF_INET,
            local_port: port,
            ..Default::default()
        };
        tuple.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        p.handle_event(Event::Socket {
            kind: EventKind::Listen,
            header: EventHeader {
                kind: EventKind::Listen as u32,
                pid: child.id(),
                tid: child.id(),
                fd: 4,
                ..Default::default()
            },
            tuple,
        });
        let scans = Stats::get(&p.stats.socket_table_scans);
        let tracked = p.kernel().tracked.clone();
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(tracked, [(child.id(), 3)]);
        assert_eq!(scans, 2, "one new read");
        let connection = p.connections.get_mut(child.id(), 3).expect("tracked");
        assert_eq!(connection.local, client.local_addr().unwrap());
    }

    /// A full connection table: the socket is forgotten in the kernel (which stops sending its
    /// events) and counted, instead of every later event resolving it again.
    #[test]
    fn an_unknown_socket_past_a_full_table_is_forgotten_in_the_kernel() {
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let first = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let second = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let mut p = pipeline_with_capacity(1);
        data_on_unknown(&mut p, first.as_raw_fd(), b"GET / HTTP/1.1\r\n");
        data_on_unknown(&mut p, second.as_raw_fd(), b"GET / HTTP/1.1\r\n");
        assert_eq!(p.kernel().forgotten, [second.as_raw_fd()]);
        assert_eq!(Stats::get(&p.stats.connections_dropped), 1);
        assert_eq!(Stats::get(&p.stats.socket_table_scans), 1);
    }

    /// The procfs pass over a process's open sockets keeps the identity of a socket the kernel
    /// already tracks (connected before the agent read the exec): its events carry that id.
    #[test]
    fn the_procfs_pass_keeps_the_kernels_identity_of_a_socket() {
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let fd = stream.as_raw_fd();
        let pid = std::process::id();
        let mut p = test_pipeline();
        p.kernel.kernel_ids.insert(fd, 77);
        p.track_open_sockets(pid, true);
        assert_eq!(p.connections.get_mut(pid, fd).map(|c| c.conn_id), Some(77));
        data_event(
            &mut p,
            fd,
            77,
            1_000,
            Direction::Egress,
            b"GET / HTTP/1.1\r\n\r\n",
        );
        assert_eq!(Stats::get(&p.stats.connections_muted), 0);
        assert_eq!(p.connections.get_mut(pid, fd).map(|c| c.conn_id), Some(77));
    }

    /// Bytes of no known protocol: muted in the kernel after a few chunks, counted, no span.
    #[test]
    fn a_connection_of_no_known_protocol_is_muted() {
        let mut p = test_pipeline();
        // Not a TLS record either (those mark the connection TLS: see the TLS tests).
        let garbage: &[u8] = b"\x13\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03";
        feed(&mut p, &[(Direction::Ingress, garbage); 6]);
        assert!(p.sink().is_empty());
        assert_eq!(p.kernel().muted, [5], "muted once");
        assert_eq!(Stats::get(&p.stats.connections_muted), 1);
    }

    /// An accepted connection of this process on `fd` (its conn id is the fd).
    fn accept(p: &mut Pipeline<FakeKernel, Vec<Span>>, fd: i32) {
        let tuple = loopback_tuple(8080, 30000 + fd as u16);
        let pid = std::process::id();
        p.handle_event(Event::Socket {
            kind: EventKind::Accept,
            header: EventHeader {
                kind: EventKind::Accept as u32,
                pid,
                tid: pid,
                fd,
                conn_id: fd as u64,
                ..Default::default()
            },
            tuple,
        });
    }

    /// `data` on the connection of `fd`, by a syscall that began at kernel time `t_ns`.
    fn data_at(
        p: &mut Pipeline<FakeKernel, Vec<Span>>,
        fd: i32,
        t_ns: u64,
        direction: Direction,
        data: &[u8],
    ) {
        data_event(p, fd, fd as u64, t_ns, direction, data);
    }

    /// A data event of this process on `fd` (socket `conn_id`).
    fn data_event(
        p: &mut Pipeline<FakeKernel, Vec<Span>>,
        fd: i32,
        conn_id: u64,
        t_ns: u64,
        direction: Direction,
        data: &[u8],
    ) {
        let syscall = kspan_common::SOURCE_SYSCALL;
        data_event_from(p, fd, conn_id, t_ns, direction, data, syscall);
    }

    /// A data event from `source` (a syscall's bytes, or a TLS library call's plaintext).
    fn data_event_from(
        p: &mut Pipeline<FakeKernel, Vec<Span>>,
        fd: i32,
        conn_id: u64,
        t_ns: u64,
        direction: Direction,
        data: &[u8],
        source: u32,
    ) {
        let pid = std::process::id();
        p.handle_event(Event::Data {
            header: EventHeader {
                kind: EventKind::Data as u32,
                pid,
                tid: pid,
                fd,
                conn_id,
                start_ns: t_ns,
                end_ns: t_ns + 10,
                full_len: data.len() as u64,
                copied_len: data.len() as u32,
                source,
                ..Default::default()
            },
            direction,
            data,
            tail: &[],
        });
    }

    /// Plaintext of a TLS library call of this process on `fd`.
    fn tls_plaintext(
        p: &mut Pipeline<FakeKernel, Vec<Span>>,
        fd: i32,
        t_ns: u64,
        direction: Direction,
        data: &[u8],
    ) {
        data_event_from(
            p,
            fd,
            fd as u64,
            t_ns,
            direction,
            data,
            kspan_common::SOURCE_TLS,
        );
    }

    /// A TLS connection: its handshake (a TLS record on the syscall path) marks it TLS in the
    /// kernel instead of muting it or counting a parse error; ciphertext still queued is
    /// ignored; the plaintext from the library makes one span, `https`. A process that sends
    /// TLS records and no plaintext while kspan finds no library it reads is reported once.
    #[test]
    fn a_tls_connection_is_parsed_from_its_plaintext_only() {
        let mut p = test_pipeline();
        let pid = std::process::id();
        accept(&mut p, 5);
        // ClientHello (handshake record, TLS 1.0 record version), then an application record.
        data_at(
            &mut p,
            5,
            1_000,
            Direction::Ingress,
            &[22, 3, 1, 0, 200, 1, 0, 0, 196],
        );
        data_at(
            &mut p,
            5,
            2_000,
            Direction::Ingress,
            &[23, 3, 3, 0, 64, 0xde, 0xad],
        );
        tls_plaintext(
            &mut p,
            5,
            3_000,
            Direction::Ingress,
            b"GET /users/7 HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        tls_plaintext(
            &mut p,
            5,
            4_000,
            Direction::Egress,
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        );
        p.shutdown();
        assert_eq!(p.kernel().tls, [5]);
        assert!(p.kernel().muted.is_empty());
        assert_eq!(Stats::get(&p.stats.parse_errors), 0);
        let spans = p.sink();
        assert_eq!(spans.len(), 1, "{spans:?}");
        assert_eq!(spans[0].name, "GET /users/*");
        assert_eq!(
            spans[0].attribute("url.scheme"),
            Some(&AttributeValue::Str("https".into()))
        );
        // Its plaintext came: never reported, whatever a look at its libraries says.
        assert_eq!(p.take_tls_scans(), [pid]);
        p.tls_scanned(pid, Some(false));
        assert_eq!(Stats::get(&p.stats.tls_processes_unseen), 0);
        // A connection of a process whose plaintext never comes: reported once, after the look
        // its ciphertext asked for.
        let mut p = test_pipeline();
        accept(&mut p, 7);
        data_at(
            &mut p,
            7,
            1_000,
            Direction::Ingress,
            &[22, 3, 1, 0, 200, 1, 0, 0, 196],
        );
        assert_eq!(Stats::get(&p.stats.tls_processes_unseen), 0);
        assert_eq!(p.take_tls_scans(), [pid]);
        p.tls_scanned(pid, Some(false));
        p.tls_scanned(pid, Some(false));
        assert_eq!(Stats::get(&p.stats.tls_processes_unseen), 1);
        assert!(p.sink().is_empty());
    }

    /// A memory-BIO client (gRPC core, Node.js): its first request's plaintext comes before
    /// its socket is known (fd -1), is held, and joins the socket the kernel names next
    /// (TlsBound), before the response; a held write whose socket never comes expires, counted.
    #[test]
    fn plaintext_written_before_its_socket_joins_it_when_named() {
        let mut p = test_pipeline();
        let pid = std::process::id();
        p.handle_event(Event::Socket {
            kind: EventKind::Connect,
            header: EventHeader {
                kind: EventKind::Connect as u32,
                pid,
                tid: pid,
                fd: 9,
                conn_id: 9,
                ..Default::default()
            },
            tuple: loopback_tuple(40000, 8443),
        });
        let request: &[u8] = b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n";
        data_event_from(
            &mut p,
            -1,
            0,
            1_000,
            Direction::Egress,
            request,
            kspan_common::SOURCE_TLS,
        );
        assert!(p.sink().is_empty());
        p.handle_event(Event::TlsBound(EventHeader {
            kind: EventKind::TlsBound as u32,
            pid,
            tid: pid,
            fd: 9,
            conn_id: 9,
            start_ns: 1_500,
            end_ns: 1_500,
            ..Default::default()
        }));
        tls_plaintext(
            &mut p,
            9,
            2_000,
            Direction::Ingress,
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        );
        // Never bound: expires at a flush more than a second later (kernel time 5 µs after
        // boot, the flush's clock is the kernel's, CLOCK_MONOTONIC).
        data_event_from(
            &mut p,
            -1,
            0,
            5_000,
            Direction::Egress,
            request,
            kspan_common::SOURCE_TLS,
        );
        p.flush();
        assert_eq!(Stats::get(&p.stats.tls_writes_expired), 1);
        p.shutdown();
        let held_write_start = p.clock.to_unix_nanos(1_000);
        let spans = p.sink();
        assert_eq!(spans.len(), 1, "{spans:?}");
        assert_eq!(spans[0].kind, SpanKind::Client);
        assert_eq!(spans[0].name, "GET /held");
        assert_eq!(
            spans[0].attribute("url.scheme"),
            Some(&AttributeValue::Str("https".into()))
        );
        assert_eq!(
            spans[0].start_unix_nano, held_write_start,
            "the held write's time"
        );
    }

    /// A connection muted for its ciphertext (a TLS record version kspan did not take for one,
    /// or bytes before detection gave up) is parsed again once its plaintext comes.
    #[test]
    fn plaintext_revives_a_connection_muted_for_its_ciphertext() {
        let mut p = test_pipeline();
        accept(&mut p, 6);
        for (i, garbage) in [[0x80u8, 1, 2, 3], [9, 9, 9, 9], [7, 7, 7, 7], [5, 5, 5, 5]]
            .iter()
            .enumerate()
        {
            data_at(
                &mut p,
                6,
                1_000 * (i as u64 + 1),
                Direction::Ingress,
                garbage,
            );
        }
        assert_eq!(p.kernel().muted, [6]);
        tls_plaintext(
            &mut p,
            6,
            10_000,
            Direction::Ingress,
            b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n",
        );
        tls_plaintext(
            &mut p,
            6,
            11_000,
            Direction::Egress,
            b"HTTP/1.1 204 No Content\r\n\r\n",
        );
        p.shutdown();
        assert_eq!(p.sink().len(), 1, "{:?}", p.sink());
    }

    fn half_header(pad: usize) -> Vec<u8> {
        let mut bytes = b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Pad: ".to_vec();
        bytes.resize(bytes.len() + pad, b'a');
        bytes
    }

    /// 2,000 connections each holding half a header block of 2 KiB: the parsers never hold
    /// more than the budget, the connections past it lose their partial message (counted, no
    /// span), and a complete exchange afterwards is still traced.
    #[test]
    fn slowloris_connections_cost_at_most_the_budget() {
        let budget = 1 << 20;
        let mut p = pipeline_with_limits(Limits {
            connections: 4096,
            parser_memory: budget,
            partial_timeout: Duration::from_secs(30),
        });
        let now = Clock::monotonic_now();
        let half = half_header(2048);
        for fd in 10..2010 {
            accept(&mut p, fd);
            data_at(&mut p, fd, now, Direction::Ingress, &half);
            assert!(p.parser_memory <= budget, "{} bytes held", p.parser_memory);
        }
        let evicted = Stats::get(&p.stats.parser_evictions_budget);
        assert!(evicted >= 1000, "{evicted} evictions");
        assert_eq!(Stats::get(&p.stats.parser_evictions_timeout), 0);
        // The first connection was evicted: the end of its header is no request.
        data_at(&mut p, 10, now + 1, Direction::Ingress, b"\r\n\r\n");
        data_at(
            &mut p,
            10,
            now + 2,
            Direction::Egress,
            b"HTTP/1.1 200 OK\r\n\r\n",
        );
        // A whole exchange on a new connection is traced.
        accept(&mut p, 3000);
        data_at(
            &mut p,
            3000,
            now + 3,
            Direction::Ingress,
            b"GET /ok HTTP/1.1\r\n\r\n",
        );
        data_at(
            &mut p,
            3000,
            now + 4,
            Direction::Egress,
            b"HTTP/1.1 204 No Content\r\n\r\n",
        );
        p.flush();
        let names: Vec<&str> = p.sink().iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["GET /ok"], "only the complete exchange");
        assert_eq!(
            Stats::get(&p.stats.parser_memory),
            p.parser_memory as u64,
            "the gauge is published at the flush"
        );
    }

    /// `data` read on the connection of `fd` `secs_ago` seconds ago.
    fn read_secs_ago(p: &mut Pipeline<FakeKernel, Vec<Span>>, fd: i32, secs_ago: u64, data: &[u8]) {
        let t_ns = Clock::monotonic_now() - secs_ago * 1_000_000_000;
        data_at(p, fd, t_ns, Direction::Ingress, data);
    }

    /// A header block still incomplete past the partial timeout (default 30 s; trickled, as
    /// slowloris does) loses its parser state at the next flush; a younger one does not.
    #[test]
    fn a_message_incomplete_past_the_timeout_is_evicted() {
        let mut p = test_pipeline();
        accept(&mut p, 10);
        read_secs_ago(&mut p, 10, 40, &half_header(100));
        // The trickle does not make the message younger.
        read_secs_ago(&mut p, 10, 5, b"aaaa");
        accept(&mut p, 11);
        read_secs_ago(&mut p, 11, 10, &half_header(100));
        assert_eq!(p.partial_connections, 2);
        p.flush();
        assert_eq!(Stats::get(&p.stats.parser_evictions_timeout), 1);
        assert_eq!(p.partial_connections, 1);
        let evicted = p.connections.get_mut(std::process::id(), 10).unwrap();
        assert!(matches!(evicted.protocol, ProtocolState::Undetected { .. }));
        // Its last bytes arrive: no request, no span; the trickle is muted as no protocol.
        for _ in 0..4 {
            read_secs_ago(&mut p, 10, 0, b"a\r\n");
        }
        assert_eq!(p.kernel().muted, [10]);
        p.shutdown();
        assert!(p.sink().is_empty());
    }

    /// Chunks that end inside a message do not make a busy connection look stuck: the partial
    /// clock restarts whenever a message completes.
    #[test]
    fn a_busy_connection_whose_chunks_end_mid_message_is_not_timed_out() {
        let mut p = test_pipeline();
        let now = Clock::monotonic_now();
        accept(&mut p, 10);
        read_secs_ago(&mut p, 10, 40, b"GET /a HTTP/1.1\r\nHo");
        read_secs_ago(&mut p, 10, 2, b"st: x\r\n\r\nGET /b HTTP/1.1\r\nHo");
        p.flush();
        assert_eq!(Stats::get(&p.stats.parser_evictions_timeout), 0);
        assert_eq!(p.partial_connections, 1);
        // Closing it returns its memory.
        p.handle_event(Event::Close(EventHeader {
            kind: EventKind::Close as u32,
            pid: std::process::id(),
            fd: 10,
            conn_id: 10,
            end_ns: now,
            ..Default::default()
        }));
        assert_eq!((p.parser_memory, p.partial_connections), (0, 0));
    }

    #[test]
    fn a_partial_batch_waits_for_its_delay() {
        let (sender, receiver) = mpsc::sync_channel(4);
        let stats = Arc::new(Stats::default());
        let mut sink = ChannelSink::with_batch_delay(
            sender,
            stats.clone(),
            std::time::Duration::from_secs(60),
        );
        sink.emit(finished(1));
        sink.flush();
        assert!(
            receiver.try_recv().is_err(),
            "a flush before the batch delay sends nothing"
        );
        drop(sink);
        assert_eq!(
            receiver.try_recv().unwrap().len(),
            1,
            "dropping the sink hands it over"
        );
        assert_eq!(Stats::get(&stats.spans_emitted), 1);
    }

    #[test]
    fn spans_wait_for_a_flush_then_go_as_one_batch() {
        let (sender, receiver) = mpsc::sync_channel(4);
        let stats = Arc::new(Stats::default());
        let mut sink = ChannelSink::with_batch_delay(sender, stats.clone(), Duration::ZERO);
        sink.emit(finished(1));
        sink.emit(finished(2));
        assert!(
            receiver.try_recv().is_err(),
            "nothing is sent before a flush"
        );
        sink.flush();
        let batch = receiver.try_recv().unwrap();
        assert_eq!(batch.len(), 2);
        assert_eq!(batch[1].span.span_id, [2; 8]);
        assert_eq!(Stats::get(&stats.spans_emitted), 2);
        sink.flush();
        assert!(receiver.try_recv().is_err(), "an empty flush sends nothing");
    }

    #[test]
    fn a_full_batch_goes_without_waiting_for_the_flush() {
        let (sender, receiver) = mpsc::sync_channel(4);
        let stats = Arc::new(Stats::default());
        let mut sink = ChannelSink::new(sender, stats.clone());
        for n in 0..=SPAN_BATCH {
            sink.emit(finished(n as u8));
        }
        assert_eq!(receiver.try_recv().unwrap().len(), SPAN_BATCH);
        drop(sink);
        assert_eq!(
            receiver.try_recv().unwrap().len(),
            1,
            "dropping the sink flushes"
        );
        assert_eq!(Stats::get(&stats.spans_emitted), SPAN_BATCH as u64 + 1);
    }

    #[test]
    fn a_full_queue_drops_and_counts_the_whole_batch() {
        let (sender, receiver) = mpsc::sync_channel(1);
        let stats = Arc::new(Stats::default());
        let mut sink = ChannelSink::with_batch_delay(sender, stats.clone(), Duration::ZERO);
        sink.emit(finished(1));
        sink.flush();
        sink.emit(finished(2));
        sink.emit(finished(3));
        sink.flush();
        assert_eq!(Stats::get(&stats.spans_emitted), 1);
        assert_eq!(Stats::get(&stats.spans_dropped), 2);
        assert_eq!(receiver.try_recv().unwrap().len(), 1);
        assert!(receiver.try_recv().is_err());
    }
}
