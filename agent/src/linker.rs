//! Trace-context linking: decides each span's trace id and parent while requests are in flight.
//!
//! - **Incoming context**: a request carrying W3C traceparent (or B3) continues that trace.
//! - **Inside a process**: a request sent by a thread while it serves a request (between reading
//!   that request and the start of its response) is a child of that SERVER span. A thread
//!   serving several requests at once (an event loop) is ambiguous: its calls stay unlinked.
//! - **Across processes on one host**: when both ends of a connection are traced, the n-th
//!   request the server reads is a child of the n-th request the client sent (HTTP/1); for
//!   protocols whose requests carry an id on the wire (HTTP/2 stream ids), the server's request
//!   is the child of the client's request with the same id, even on connections joined late.
//! - **Multiplexed servers** (HTTP/2): the thread that read a request is an I/O thread, not the
//!   handler; a client request sent by a thread that has such requests in flight is ambiguous
//!   and stays unlinked (counted).
//! - **An application with its own SDK**: an outgoing request that already carries traceparent
//!   makes kspan's CLIENT span a child of the header's span id (the SDK's span), and the server
//!   end parents to the same header span. kspan never reuses the SDK's span id.
//!
//! Each span is a [`Node`] whose parent may be learned after the node was created: the server
//! end of a loopback connection can be parsed before the client's write event arrives (the
//! client's event is emitted at its syscall's exit). Trace id, parent and the sampling decision
//! are therefore resolved when the span is emitted, by walking up to the root of its chain.

use compact_str::CompactString;
use rustc_hash::FxHashMap;
use std::{
    cell::{Cell, RefCell},
    collections::VecDeque,
    net::SocketAddr,
    rc::Rc,
};

use crate::{
    protocols::{RequestStart, Role},
    spans::SpanIds,
    tracecontext::{self, Sampler, SpanContext},
};

/// Longest parent chain followed when resolving (guards against pathological graphs).
const MAX_DEPTH: usize = 64;
/// Requests one thread may have read and not yet answered.
const MAX_SERVING_PER_THREAD: usize = 64;
/// Client requests remembered per connection for cross-process pairing: as many as an HTTP/2
/// connection has streams open at once (the parser's bound), so none is forgotten before the
/// server end reads it.
const MAX_OUTGOING_PER_CONNECTION: usize = 256;
/// Connections remembered for cross-process pairing.
const MAX_PAIRED_CONNECTIONS: usize = 65536;
/// Requests remembered per connection until their exchange completes: twice the parsers' own
/// bound (256 open HTTP/2 streams or Kafka requests), so that requests whose exchange will never
/// come (the parser dropped them without saying so) are forgotten before live ones. Past it the
/// oldest is forgotten, counted in [`LinkCounters::dropped`].
pub const MAX_IN_FLIGHT_PER_CONNECTION: usize = 512;

#[derive(Debug)]
enum Parent {
    /// A new trace started here.
    Root { trace_id: [u8; 16] },
    /// Context from request headers (another process, not traced by kspan or with its own SDK),
    /// with the W3C tracestate that came along, carried by every span of the trace.
    Remote(SpanContext, Option<Rc<str>>),
    /// Another span kspan built.
    Local(Rc<Node>),
}

#[derive(Debug)]
pub struct Node {
    span_id: [u8; 8],
    parent: RefCell<Parent>,
    /// A server request whose client end is traced but whose client request has not arrived
    /// yet: its parent is still to come (see [`Linker::waits_for_parent`]).
    awaiting_client: Cell<bool>,
    /// A server request read by a multiplexing I/O thread (see [`RequestStart::multiplexed`]).
    multiplexed: bool,
}

/// A span's resolved identity and sampling decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub ids: SpanIds,
    pub sampled: bool,
    /// W3C tracestate of the trace (from the request that started it here), if any.
    pub trace_state: Option<Rc<str>>,
}

/// Requests of one connection whose spans are not emitted yet, matched to exchanges by the
/// request id both carry.
#[derive(Debug, Default)]
pub struct ConnectionLinks {
    in_flight: VecDeque<PendingRequest>,
    /// Requests the unit tests reported on this connection (their default ids).
    #[cfg(test)]
    issued: u64,
}

/// A request whose span is not emitted yet.
#[derive(Debug)]
struct PendingRequest {
    /// The parser's id of the request on its connection.
    id: u64,
    /// Thread that read (server) or wrote (client) it.
    tid: u32,
    node: Rc<Node>,
    /// Its response has started (server requests).
    answered: bool,
    /// Listed in `Linker::serving` under (pid, tid): lets every removal be a keyed lookup.
    listed: bool,
}

/// Where a request happened: the traced process's end of one connection.
#[derive(Clone, Copy, Debug)]
pub struct Endpoint {
    pub pid: u32,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The connection was seen from its connect/accept: request counts match the other end.
    pub from_start: bool,
    /// TLS (the span builder says `https`); linking is the same.
    pub tls: bool,
}

#[derive(Debug, Default)]
struct Outgoing {
    /// (request index on the connection, node, method, target)
    requests: VecDeque<(u64, Rc<Node>, CompactString, CompactString)>,
    /// Server requests parsed before the client request they pair with.
    awaiting: Vec<(u64, Rc<Node>, CompactString, CompactString)>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LinkCounters {
    /// Client requests left unlinked because their thread was serving several requests, or
    /// multiplexed (HTTP/2) ones.
    pub ambiguous: u64,
    /// Cross-process pairs refused because the two ends disagree on the request.
    pub mismatched: u64,
    /// Spans emitted without the parent they waited for: the traced client's request event did
    /// not come in time.
    pub late: u64,
    /// Requests forgotten before their exchange completed: past
    /// [`MAX_IN_FLIGHT_PER_CONNECTION`], retired by a later response (in-order protocols), or
    /// reported [abandoned](Linker::abandon_request).
    pub dropped: u64,
}

pub struct Linker {
    sampler: Sampler,
    /// Requests each (pid, tid) read and has not started answering.
    serving: FxHashMap<(u32, u32), Vec<Rc<Node>>>,
    /// Client ends of traced connections, keyed (client local, client remote).
    outgoing: FxHashMap<(SocketAddr, SocketAddr), Outgoing>,
    pub counters: LinkCounters,
}

impl Linker {
    pub fn new(sampler: Sampler) -> Self {
        Linker {
            sampler,
            serving: FxHashMap::default(),
            outgoing: FxHashMap::default(),
            counters: LinkCounters::default(),
        }
    }

    /// A traced process connected: its requests on this connection can pair with the server end.
    pub fn on_client_connect(&mut self, local: SocketAddr, remote: SocketAddr) {
        if self.outgoing.len() < MAX_PAIRED_CONNECTIONS {
            self.outgoing.entry((local, remote)).or_default();
        }
    }

    /// The connection ended (or its process exited): forget what pairing and serving kept.
    pub fn on_close(&mut self, end: &Endpoint, links: &mut ConnectionLinks) {
        if let Some(outgoing) = self.outgoing.remove(&(end.local, end.remote)) {
            // No client request will come for these any more.
            for (_, server, ..) in outgoing.awaiting {
                if server.awaiting_client.replace(false) {
                    self.counters.late += 1;
                }
            }
        }
        self.forget_requests(end, links);
    }

    /// The connection's requests still in flight will not finish (their parser left it).
    pub fn forget_requests(&mut self, end: &Endpoint, links: &mut ConnectionLinks) {
        for mut request in links.in_flight.drain(..) {
            self.stop_serving(end.pid, &mut request);
        }
    }

    pub fn forget_process(&mut self, pid: u32) {
        self.serving.retain(|(p, _), _| *p != pid);
    }

    /// Request `id` of this connection will never complete (its parser dropped it, or its
    /// response was lost): forget it, and its thread no longer serves it.
    pub fn abandon_request(&mut self, end: &Endpoint, links: &mut ConnectionLinks, id: u64) {
        if let Some(position) = links.in_flight.iter().position(|r| r.id == id)
            && let Some(mut request) = links.in_flight.remove(position)
        {
            self.stop_serving(end.pid, &mut request);
            self.counters.dropped += 1;
        }
    }

    /// The kernel lost events: any of them may have been the start of a response, which would
    /// leave its thread "serving" a finished request, and its later outgoing calls children of
    /// it. No thread is taken as serving anything read before the loss (their client calls stay
    /// unlinked until they read a new request); the requests themselves stay in flight.
    pub fn on_events_lost(&mut self) {
        // `PendingRequest::listed` flags left set are harmless: removal looks the node up.
        self.serving.clear();
    }

    /// A request's header block was parsed: create its span node and decide its parent.
    pub fn on_request(
        &mut self,
        end: &Endpoint,
        start: &RequestStart,
        links: &mut ConnectionLinks,
    ) {
        // Ids pair with the other end when they are on the wire, or count requests from the
        // connection's start.
        let pairable = end.from_start || start.id_on_wire;
        let index = start.id;
        let mut listed = false;
        let incoming = tracecontext::extract(&start.context_headers);
        let node = Rc::new(Node {
            span_id: tracecontext::new_span_id(),
            parent: RefCell::new(match &incoming {
                Some(extracted) => Parent::Remote(
                    extracted.parent,
                    extracted.trace_state.as_deref().map(Rc::from),
                ),
                None => Parent::Root {
                    trace_id: tracecontext::new_trace_id(),
                },
            }),
            awaiting_client: Cell::new(false),
            multiplexed: start.multiplexed && start.role == Role::Server,
        });
        match start.role {
            Role::Server => {
                if incoming.is_none() && pairable {
                    self.pair_with_client(end, index, start, &node);
                }
                let serving = self.serving.entry((end.pid, start.tid)).or_default();
                if serving.len() < MAX_SERVING_PER_THREAD {
                    serving.push(node.clone());
                    listed = true;
                }
            }
            Role::Client => {
                if incoming.is_none() {
                    match self.serving.get(&(end.pid, start.tid)).map(Vec::as_slice) {
                        Some([server]) if !server.multiplexed => {
                            *node.parent.borrow_mut() = Parent::Local(server.clone());
                        }
                        Some([_, ..]) => self.counters.ambiguous += 1,
                        _ => {}
                    }
                }
                if pairable {
                    self.register_client_request(end, index, start, &node);
                }
            }
        }
        if links.in_flight.len() >= MAX_IN_FLIGHT_PER_CONNECTION
            && let Some(mut oldest) = links.in_flight.pop_front()
        {
            // Its exchange never came: most likely dropped by the parser, never to come.
            self.stop_serving(end.pid, &mut oldest);
            self.counters.dropped += 1;
        }
        links.in_flight.push_back(PendingRequest {
            id: start.id,
            tid: start.tid,
            node,
            answered: false,
            listed,
        });
    }

    fn pair_with_client(
        &mut self,
        end: &Endpoint,
        index: u64,
        start: &RequestStart,
        node: &Rc<Node>,
    ) {
        // The client's view of this connection is the mirror image.
        let Some(outgoing) = self.outgoing.get_mut(&(end.remote, end.local)) else {
            return; // the client end is not traced
        };
        match outgoing.requests.iter().find(|(i, ..)| *i == index) {
            Some((_, client, method, target)) => {
                if *method == start.method && *target == start.target {
                    *node.parent.borrow_mut() = Parent::Local(client.clone());
                } else {
                    self.counters.mismatched += 1;
                }
            }
            None if outgoing.awaiting.len() < MAX_OUTGOING_PER_CONNECTION => {
                node.awaiting_client.set(true);
                outgoing.awaiting.push((
                    index,
                    node.clone(),
                    start.method.clone(),
                    start.target.clone(),
                ));
            }
            None => {}
        }
    }

    fn register_client_request(
        &mut self,
        end: &Endpoint,
        index: u64,
        start: &RequestStart,
        node: &Rc<Node>,
    ) {
        let Some(outgoing) = self.outgoing.get_mut(&(end.local, end.remote)) else {
            return;
        };
        if let Some(position) = outgoing.awaiting.iter().position(|(i, ..)| *i == index) {
            let (_, server, method, target) = outgoing.awaiting.swap_remove(position);
            server.awaiting_client.set(false);
            if method == start.method && target == start.target {
                *server.parent.borrow_mut() = Parent::Local(node.clone());
            } else {
                self.counters.mismatched += 1;
            }
        }
        if outgoing.requests.len() >= MAX_OUTGOING_PER_CONNECTION {
            outgoing.requests.pop_front();
        }
        outgoing.requests.push_back((
            index,
            node.clone(),
            start.method.clone(),
            start.target.clone(),
        ));
    }

    /// The responses to these requests began on a server connection: they are no longer being
    /// served by the threads that read them.
    pub fn on_responses_started(
        &mut self,
        end: &Endpoint,
        links: &mut ConnectionLinks,
        ids: &[u64],
    ) {
        for id in ids {
            if let Some(request) = links
                .in_flight
                .iter_mut()
                .find(|r| r.id == *id && !r.answered)
            {
                request.answered = true;
                self.stop_serving(end.pid, request);
            }
        }
    }

    /// Takes `request` off its thread's serving list, if it is on it.
    fn stop_serving(&mut self, pid: u32, request: &mut PendingRequest) {
        if !std::mem::take(&mut request.listed) {
            return;
        }
        let key = (pid, request.tid);
        let Some(list) = self.serving.get_mut(&key) else {
            return;
        };
        if let Some(position) = list.iter().position(|n| Rc::ptr_eq(n, &request.node)) {
            list.remove(position);
        }
        if list.is_empty() {
            self.serving.remove(&key);
        }
    }

    /// The exchange of request `id` on this connection completed: its span's node, to
    /// [`resolve`](Self::resolve) now or, while [`waits_for_parent`](Self::waits_for_parent), a
    /// little later. With `in_order` (responses come in request order), older pending requests
    /// (the parser dropped them) are discarded. A server request still listed as served (its
    /// response start was not seen) stops being served.
    pub fn finish(
        &mut self,
        end: &Endpoint,
        role: Role,
        links: &mut ConnectionLinks,
        id: u64,
        in_order: bool,
    ) -> Rc<Node> {
        let Some(position) = links.in_flight.iter().position(|r| r.id == id) else {
            // Should not happen: the parser reports every request it emits.
            return new_root_node();
        };
        if in_order {
            for mut dropped in links.in_flight.drain(..position) {
                self.stop_serving(end.pid, &mut dropped);
                self.counters.dropped += 1;
            }
        }
        let position = if in_order { 0 } else { position };
        let Some(mut request) = links.in_flight.remove(position) else {
            return new_root_node();
        };
        self.stop_serving(end.pid, &mut request);
        if role == Role::Client
            && let Some(outgoing) = self.outgoing.get_mut(&(end.local, end.remote))
        {
            // The server end read this request before answering it: no pairing needs it now.
            outgoing
                .requests
                .retain(|(_, n, ..)| !Rc::ptr_eq(n, &request.node));
        }
        request.node
    }

    /// True while the top of `node`'s chain is a server request waiting for its traced client's
    /// request event: resolving now would start a trace of its own. The client's write event is
    /// emitted at its syscall's exit, and a client thread preempted between queueing the bytes
    /// and that exit lets the server read, answer and finish first (seen on loaded 2-CPU
    /// machines and always under emulation).
    pub fn waits_for_parent(&self, node: &Rc<Node>) -> bool {
        let mut current = node.clone();
        for _ in 0..MAX_DEPTH {
            if current.awaiting_client.get() {
                return true;
            }
            let parent = match &*current.parent.borrow() {
                Parent::Local(parent) => parent.clone(),
                _ => return false,
            };
            current = parent;
        }
        false
    }

    /// Stop waiting for `node`'s chain to learn its parent: it is resolved as it stands.
    pub fn give_up_waiting(&mut self, node: &Rc<Node>) {
        let mut current = node.clone();
        for _ in 0..MAX_DEPTH {
            if current.awaiting_client.replace(false) {
                self.counters.late += 1;
                return;
            }
            let parent = match &*current.parent.borrow() {
                Parent::Local(parent) => parent.clone(),
                _ => return,
            };
            current = parent;
        }
    }

    /// Walks to the root: the trace id and the sampling decision are the root's, so every span
    /// of a trace agrees on both.
    pub fn resolve(&self, node: &Node) -> Resolved {
        let parent_span_id = match &*node.parent.borrow() {
            Parent::Root { .. } => None,
            Parent::Remote(context, _) => Some(context.span_id),
            Parent::Local(parent) => Some(parent.span_id),
        };
        let (trace_id, remote, trace_state) = root_of(node);
        Resolved {
            ids: SpanIds {
                trace_id,
                span_id: node.span_id,
                parent_span_id,
            },
            sampled: self.sampler.should_sample(&trace_id, remote.as_ref()),
            trace_state,
        }
    }
}

/// A node for a span the linker lost track of: a trace of its own.
fn new_root_node() -> Rc<Node> {
    Rc::new(Node {
        span_id: tracecontext::new_span_id(),
        parent: RefCell::new(Parent::Root {
            trace_id: tracecontext::new_trace_id(),
        }),
        awaiting_client: Cell::new(false),
        multiplexed: false,
    })
}

/// The root of a chain: its trace id, the remote context it continues and that context's
/// tracestate.
type Root = ([u8; 16], Option<SpanContext>, Option<Rc<str>>);

enum Step {
    Up(Rc<Node>),
    Root(Root),
}

fn step(parent: &Parent) -> Step {
    match parent {
        Parent::Local(node) => Step::Up(node.clone()),
        Parent::Root { trace_id } => Step::Root((*trace_id, None, None)),
        Parent::Remote(context, state) => {
            Step::Root((context.trace_id, Some(*context), state.clone()))
        }
    }
}

fn root_of(node: &Node) -> Root {
    let mut current = step(&node.parent.borrow());
    for _ in 0..MAX_DEPTH {
        match current {
            Step::Up(parent) => current = step(&parent.parent.borrow()),
            Step::Root(root) => return root,
        }
    }
    // Deeper than any real call chain: cut it into a trace of its own.
    (tracecontext::new_trace_id(), None, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn start(role: Role, tid: u32, t: u64, headers: &[(&str, &str)]) -> RequestStart {
        RequestStart {
            role,
            // Set by `request` (the request's number on its connection).
            id: u64::MAX,
            id_on_wire: false,
            multiplexed: false,
            tid,
            start_ns: t,
            method: "GET".into(),
            target: "/x".into(),
            context_headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// Process `pid`'s end of a connection between ports `a` (local) and `b` (remote).
    fn end(pid: u32, local: u16, remote: u16) -> Endpoint {
        Endpoint {
            pid,
            local: addr(&format!("127.0.0.1:{local}")),
            remote: addr(&format!("127.0.0.1:{remote}")),
            from_start: true,
            tls: false,
        }
    }

    const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    const TRACESTATE: &str = "vendor=abc,other=1";
    const TRACE: [u8; 16] = [
        0x0a, 0xf7, 0x65, 0x19, 0x16, 0xcd, 0x43, 0xdd, 0x84, 0x48, 0xeb, 0x21, 0x1c, 0x80, 0x31,
        0x9c,
    ];
    const PARENT: [u8; 8] = [0xb7, 0xad, 0x6b, 0x71, 0x69, 0x20, 0x33, 0x31];

    /// Reports `s` on `links`' connection; unless set, its id is its number on the connection.
    fn request(
        linker: &mut Linker,
        end: &Endpoint,
        mut s: RequestStart,
        links: &mut ConnectionLinks,
    ) -> Rc<Node> {
        if s.id == u64::MAX {
            s.id = links.issued;
        }
        links.issued += 1;
        linker.on_request(end, &s, links);
        links.in_flight.back().unwrap().node.clone()
    }

    #[test]
    fn chain_inside_and_across_processes() {
        let mut linker = Linker::new(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)));
        // Process 1 serves on 8000 (peer 40000) with an incoming traceparent...
        let front_in = end(1, 8000, 40000);
        let mut front_in_links = ConnectionLinks::default();
        let server = request(
            &mut linker,
            &front_in,
            start(
                Role::Server,
                11,
                100,
                &[("traceparent", TRACEPARENT), ("tracestate", TRACESTATE)],
            ),
            &mut front_in_links,
        );
        // ...and thread 11 calls process 2 on port 9000 from local port 41000.
        let front_out = end(1, 41000, 9000);
        linker.on_client_connect(front_out.local, front_out.remote);
        let mut front_out_links = ConnectionLinks::default();
        let client = request(
            &mut linker,
            &front_out,
            start(Role::Client, 11, 200, &[]),
            &mut front_out_links,
        );
        // Process 2's end of that connection.
        let back_in = end(2, 9000, 41000);
        let mut back_in_links = ConnectionLinks::default();
        let back = request(
            &mut linker,
            &back_in,
            start(Role::Server, 21, 300, &[]),
            &mut back_in_links,
        );

        let s = linker.resolve(&server);
        assert_eq!(s.ids.trace_id, TRACE);
        assert_eq!(s.ids.parent_span_id, Some(PARENT));
        assert!(s.sampled);
        let c = linker.resolve(&client);
        assert_eq!(c.ids.trace_id, TRACE);
        assert_eq!(c.ids.parent_span_id, Some(s.ids.span_id));
        let b = linker.resolve(&back);
        assert_eq!(b.ids.trace_id, TRACE);
        assert_eq!(b.ids.parent_span_id, Some(c.ids.span_id));
        // The tracestate travels with the trace to every span kspan makes in it.
        for r in [&s, &c, &b] {
            assert_eq!(r.trace_state.as_deref(), Some(TRACESTATE));
        }
    }

    #[test]
    fn server_end_parsed_before_client_write_is_linked_late() {
        let mut linker = Linker::new(Sampler::AlwaysOn);
        let client_end = end(1, 41000, 9000);
        linker.on_client_connect(client_end.local, client_end.remote);
        let server_end = end(2, 9000, 41000);
        let mut server_links = ConnectionLinks::default();
        let server = request(
            &mut linker,
            &server_end,
            start(Role::Server, 21, 300, &[]),
            &mut server_links,
        );
        let provisional = linker.resolve(&server).ids.trace_id;
        let mut client_links = ConnectionLinks::default();
        let client = request(
            &mut linker,
            &client_end,
            start(Role::Client, 11, 200, &[]),
            &mut client_links,
        );
        let c = linker.resolve(&client);
        let s = linker.resolve(&server);
        assert_eq!(s.ids.trace_id, c.ids.trace_id);
        assert_ne!(s.ids.trace_id, provisional);
        assert_eq!(s.ids.parent_span_id, Some(c.ids.span_id));
    }

    /// The server end finished before the traced client's request event arrived: it and the
    /// calls it made wait for their parent; a client that never shows up stops the wait.
    #[test]
    fn spans_below_a_server_awaiting_its_client_wait_for_it() {
        let mut linker = Linker::new(Sampler::AlwaysOn);
        let client_end = end(1, 41000, 9000);
        linker.on_client_connect(client_end.local, client_end.remote);
        let server_end = end(2, 9000, 41000);
        let mut server_links = ConnectionLinks::default();
        let server = request(
            &mut linker,
            &server_end,
            start(Role::Server, 21, 300, &[]),
            &mut server_links,
        );
        // Thread 21 calls a third process while serving.
        let mut call_links = ConnectionLinks::default();
        let call = request(
            &mut linker,
            &end(2, 42000, 7000),
            start(Role::Client, 21, 310, &[]),
            &mut call_links,
        );
        assert!(linker.waits_for_parent(&server));
        assert!(linker.waits_for_parent(&call));
        let mut client_links = ConnectionLinks::default();
        let client = request(
            &mut linker,
            &client_end,
            start(Role::Client, 11, 200, &[]),
            &mut client_links,
        );
        assert!(!linker.waits_for_parent(&server));
        assert!(!linker.waits_for_parent(&call));
        assert!(!linker.waits_for_parent(&client));
        let c = linker.resolve(&client);
        assert_eq!(linker.resolve(&call).ids.trace_id, c.ids.trace_id);

        // A second request whose client event never comes: waiting ends when asked to.
        let late = request(
            &mut linker,
            &server_end,
            start(Role::Server, 21, 400, &[]),
            &mut server_links,
        );
        assert!(linker.waits_for_parent(&late));
        linker.give_up_waiting(&late);
        assert!(!linker.waits_for_parent(&late));
        assert_eq!(linker.counters.late, 1);
        assert_eq!(linker.resolve(&late).ids.parent_span_id, None);
        // So does the client's connection closing.
        let after_close = request(
            &mut linker,
            &server_end,
            start(Role::Server, 21, 500, &[]),
            &mut server_links,
        );
        assert!(linker.waits_for_parent(&after_close));
        linker.on_close(&client_end, &mut client_links);
        assert!(!linker.waits_for_parent(&after_close));
        assert_eq!(
            linker.counters.late, 2,
            "a wait ended by the close is late too"
        );
    }

    #[test]
    fn thread_serving_two_requests_is_ambiguous() {
        let mut linker = Linker::new(Sampler::AlwaysOn);
        let mut a = ConnectionLinks::default();
        let mut b = ConnectionLinks::default();
        request(
            &mut linker,
            &end(1, 8000, 40001),
            start(Role::Server, 5, 1, &[]),
            &mut a,
        );
        request(
            &mut linker,
            &end(1, 8000, 40002),
            start(Role::Server, 5, 2, &[]),
            &mut b,
        );
        let mut out = ConnectionLinks::default();
        let client = request(
            &mut linker,
            &end(1, 41000, 9000),
            start(Role::Client, 5, 3, &[]),
            &mut out,
        );
        assert_eq!(linker.resolve(&client).ids.parent_span_id, None);
        assert_eq!(linker.counters.ambiguous, 1);
        // Once the first response starts, the thread serves one request: calls link again.
        linker.on_responses_started(&end(1, 8000, 40001), &mut a, &[0]);
        let client = request(
            &mut linker,
            &end(1, 41000, 9000),
            start(Role::Client, 5, 4, &[]),
            &mut out,
        );
        assert!(linker.resolve(&client).ids.parent_span_id.is_some());
    }

    #[test]
    fn calls_after_the_response_started_are_not_children() {
        let mut linker = Linker::new(Sampler::AlwaysOn);
        let server_end = end(1, 8000, 40001);
        let mut links = ConnectionLinks::default();
        request(
            &mut linker,
            &server_end,
            start(Role::Server, 5, 1, &[]),
            &mut links,
        );
        linker.on_responses_started(&server_end, &mut links, &[0]);
        let mut out = ConnectionLinks::default();
        let client = request(
            &mut linker,
            &end(1, 41000, 9000),
            start(Role::Client, 5, 3, &[]),
            &mut out,
        );
        assert_eq!(linker.resolve(&client).ids.parent_span_id, None);
    }

    #[test]
    fn outgoing_traceparent_wins_and_disagreeing_pairs_are_refused() {
        let mut linker = Linker::new(Sampler::AlwaysOn);
        let client_end = end(1, 41000, 9000);
        linker.on_client_connect(client_end.local, client_end.remote);
        let mut client_links = ConnectionLinks::default();
        let client = request(
            &mut linker,
            &client_end,
            start(Role::Client, 11, 1, &[("traceparent", TRACEPARENT)]),
            &mut client_links,
        );
        let c = linker.resolve(&client);
        assert_eq!(c.ids.trace_id, TRACE);
        assert_eq!(c.ids.parent_span_id, Some(PARENT));
        assert_ne!(c.ids.span_id, PARENT);
        // The server end sees the same header: it parents to the SDK's span, not to kspan's.
        let mut server_links = ConnectionLinks::default();
        let server = request(
            &mut linker,
            &end(2, 9000, 41000),
            start(Role::Server, 21, 2, &[("traceparent", TRACEPARENT)]),
            &mut server_links,
        );
        assert_eq!(linker.resolve(&server).ids.parent_span_id, Some(PARENT));
        // Second request: the ends disagree on what it was (e.g. a dropped message).
        let mut other = start(Role::Client, 11, 3, &[]);
        other.target = "/y".into();
        request(&mut linker, &client_end, other, &mut client_links);
        let server = request(
            &mut linker,
            &end(2, 9000, 41000),
            start(Role::Server, 21, 4, &[]),
            &mut server_links,
        );
        assert_eq!(linker.resolve(&server).ids.parent_span_id, None);
        assert_eq!(linker.counters.mismatched, 1);
    }

    #[test]
    fn sampling_decision_is_the_roots() {
        let mut linker = Linker::new(Sampler::ParentBased(Box::new(Sampler::TraceIdRatio(0.5))));
        for i in 0..200u64 {
            let server_end = end(1, 8000, 40000 + i as u16);
            let mut links = ConnectionLinks::default();
            let server = request(
                &mut linker,
                &server_end,
                start(Role::Server, 7, i, &[]),
                &mut links,
            );
            let mut out = ConnectionLinks::default();
            let client = request(
                &mut linker,
                &end(1, 41000, 9000),
                start(Role::Client, 7, i, &[]),
                &mut out,
            );
            assert_eq!(
                linker.resolve(&server).sampled,
                linker.resolve(&client).sampled
            );
            linker.on_responses_started(&server_end, &mut links, &[0]);
        }
    }

    #[test]
    fn exchanges_find_their_node_and_skip_dropped_requests() {
        let mut linker = Linker::new(Sampler::AlwaysOn);
        let e = end(1, 8000, 40000);
        let mut links = ConnectionLinks::default();
        let first = request(&mut linker, &e, start(Role::Server, 1, 10, &[]), &mut links);
        let second = request(&mut linker, &e, start(Role::Server, 1, 20, &[]), &mut links);
        // The first request never became an exchange: finishing the second discards it.
        let finished = linker.finish(&e, Role::Server, &mut links, 1, true);
        assert_eq!(linker.resolve(&finished).ids.span_id, second.span_id);
        assert!(links.in_flight.is_empty());
        // Nothing is left for the first: a span of its own, not the dropped node's.
        let orphan = linker.finish(&e, Role::Server, &mut links, 0, true);
        let orphan = linker.resolve(&orphan);
        assert_ne!(orphan.ids.span_id, first.span_id);
        assert_eq!(orphan.ids.parent_span_id, None);
        // Neither is still listed as being served by thread 1.
        assert!(linker.serving.is_empty());
    }

    /// HTTP/2: streams pair by id however late either end joined, finish in any order, and a
    /// multiplexing server's I/O thread links nothing by thread.
    #[test]
    fn streams_pair_by_wire_id_and_finish_out_of_order() {
        let mut linker = Linker::new(Sampler::AlwaysOn);
        let late = |pid, local, remote| Endpoint {
            from_start: false,
            ..end(pid, local, remote)
        };
        let client_end = late(1, 41000, 9000);
        let server_end = late(2, 9000, 41000);
        linker.on_client_connect(client_end.local, client_end.remote);
        let stream = |role, tid, id| RequestStart {
            id,
            id_on_wire: true,
            multiplexed: role == Role::Server,
            ..start(role, tid, id, &[])
        };
        let mut client_links = ConnectionLinks::default();
        let mut server_links = ConnectionLinks::default();
        let c1 = request(
            &mut linker,
            &client_end,
            stream(Role::Client, 11, 1),
            &mut client_links,
        );
        let c3 = request(
            &mut linker,
            &client_end,
            stream(Role::Client, 11, 3),
            &mut client_links,
        );
        // The server reads stream 3 first, then 1.
        let s3 = request(
            &mut linker,
            &server_end,
            stream(Role::Server, 21, 3),
            &mut server_links,
        );
        let s1 = request(
            &mut linker,
            &server_end,
            stream(Role::Server, 21, 1),
            &mut server_links,
        );
        assert_eq!(linker.resolve(&s1).ids.parent_span_id, Some(c1.span_id));
        assert_eq!(linker.resolve(&s3).ids.parent_span_id, Some(c3.span_id));
        // Thread 21 (an I/O thread) writes a call of its own: not a child of either stream.
        let mut out = ConnectionLinks::default();
        let call = request(
            &mut linker,
            &end(2, 42000, 7000),
            start(Role::Client, 21, 5, &[]),
            &mut out,
        );
        assert_eq!(linker.resolve(&call).ids.parent_span_id, None);
        assert_eq!(linker.counters.ambiguous, 1);
        // Stream 3 finishes first; stream 1 is still there for its own exchange.
        let f3 = linker.finish(&server_end, Role::Server, &mut server_links, 3, false);
        assert_eq!(f3.span_id, s3.span_id);
        let f1 = linker.finish(&server_end, Role::Server, &mut server_links, 1, false);
        assert_eq!(f1.span_id, s1.span_id);
        assert!(server_links.in_flight.is_empty());
        assert!(linker.serving.is_empty());
    }
    /// 10,000 requests without responses on one connection (both roles, ids never reused):
    /// the linker keeps at most its cap, forgets the oldest, counts them, and the thread that
    /// read them serves none of the forgotten ones.
    #[test]
    fn requests_without_responses_are_capped_per_connection() {
        for role in [Role::Server, Role::Client] {
            let mut linker = Linker::new(Sampler::AlwaysOn);
            let conn = end(1, 8000, 40000);
            let mut links = ConnectionLinks::default();
            for i in 0..10_000u64 {
                request(&mut linker, &conn, start(role, 11, i, &[]), &mut links);
            }
            assert_eq!(links.in_flight.len(), MAX_IN_FLIGHT_PER_CONNECTION);
            assert_eq!(
                linker.counters.dropped,
                10_000 - MAX_IN_FLIGHT_PER_CONNECTION as u64
            );
            // The newest are kept.
            assert_eq!(links.in_flight.front().unwrap().id, 10_000 - 512);
            assert_eq!(links.in_flight.back().unwrap().id, 9_999);
            let serving = linker.serving.get(&(1, 11)).map_or(0, Vec::len);
            assert!(serving <= MAX_SERVING_PER_THREAD, "{serving}");
            // Closing the connection leaves nothing behind.
            linker.on_close(&conn, &mut links);
            assert!(links.in_flight.is_empty());
            assert!(linker.serving.is_empty());
        }
    }

    /// Thread 11 serves request A; A's response is lost. Its later outgoing call must not be a
    /// child of A: the loss is reported either as lost events or as A abandoned.
    #[test]
    fn a_lost_response_leaves_no_thread_serving() {
        for report in ["events lost", "abandoned"] {
            let mut linker = Linker::new(Sampler::AlwaysOn);
            let server_end = end(1, 8000, 40000);
            let mut server_links = ConnectionLinks::default();
            let a = request(
                &mut linker,
                &server_end,
                start(Role::Server, 11, 100, &[]),
                &mut server_links,
            );
            // While A is served, a call is its child (the contract this test must not break).
            let mut call_links = ConnectionLinks::default();
            let call_end = end(1, 41000, 9000);
            let during = request(
                &mut linker,
                &call_end,
                start(Role::Client, 11, 150, &[]),
                &mut call_links,
            );
            let a_id = linker.resolve(&a).ids.span_id;
            assert_eq!(linker.resolve(&during).ids.parent_span_id, Some(a_id));

            match report {
                "events lost" => linker.on_events_lost(),
                _ => {
                    let id = server_links.in_flight.front().unwrap().id;
                    linker.abandon_request(&server_end, &mut server_links, id);
                    assert!(server_links.in_flight.is_empty());
                    assert_eq!(linker.counters.dropped, 1);
                }
            }
            let after = request(
                &mut linker,
                &call_end,
                start(Role::Client, 11, 300, &[]),
                &mut call_links,
            );
            let r = linker.resolve(&after);
            assert_eq!(r.ids.parent_span_id, None, "{report}");
            assert_ne!(r.ids.trace_id, linker.resolve(&a).ids.trace_id, "{report}");

            // The thread serves its next request as before: its calls are children of it.
            let b = request(
                &mut linker,
                &end(1, 8000, 40001),
                start(Role::Server, 11, 400, &[]),
                &mut ConnectionLinks::default(),
            );
            let child = request(
                &mut linker,
                &call_end,
                start(Role::Client, 11, 450, &[]),
                &mut call_links,
            );
            assert_eq!(
                linker.resolve(&child).ids.parent_span_id,
                Some(linker.resolve(&b).ids.span_id),
                "{report}"
            );
            // A's exchange, should it still complete, finds no stale serving entry to remove.
            if report == "events lost" {
                let id = server_links.in_flight.front().unwrap().id;
                let node = linker.finish(&server_end, Role::Server, &mut server_links, id, true);
                assert!(Rc::ptr_eq(&node, &a));
            }
        }
    }

    /// A request retired by a later response of an in-order connection is counted.
    #[test]
    fn requests_retired_in_order_are_counted() {
        let mut linker = Linker::new(Sampler::AlwaysOn);
        let conn = end(1, 8000, 40000);
        let mut links = ConnectionLinks::default();
        for t in 0..3 {
            request(
                &mut linker,
                &conn,
                start(Role::Server, 11, t, &[]),
                &mut links,
            );
        }
        linker.finish(&conn, Role::Server, &mut links, 2, true);
        assert_eq!(linker.counters.dropped, 2);
        assert!(links.in_flight.is_empty());
        assert!(linker.serving.is_empty());
    }
}
