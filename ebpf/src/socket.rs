//! Socket lifecycle: connect, accept/accept4, close, and TCP LISTEN transitions.
//!
//! At connect/accept exit the fd is walked to its `struct sock` (offsets from the kernel's BTF,
//! written by the agent) to read the exact 4-tuple, so userspace never scans /proc per connection.

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_task, bpf_ktime_get_ns, bpf_probe_read_kernel,
    },
    macros::tracepoint,
    maps::ring_buf::RingBufEntry,
    programs::TracePointContext,
};
use kspan_common::{
    AF_INET, AF_INET6, CAPTURE_DEFAULT, ConnectionValue, EventHeader, EventKind, SocketEvent,
    SocketTuple, connection_key, counter,
};

use crate::{
    data::{syscall_arg, syscall_ret},
    maps::{
        CONNECTIONS, EVENTS, InFlight, agent_pid, count, is_traced, kernel_offsets, may_be_traced,
        shape, stash, submit_flags, tracepoint_offsets, unstash,
    },
};

const EINPROGRESS: i64 = 115;
const SOCK_STREAM: u16 = 1;
const IPPROTO_TCP: u16 = 6;
const TCP_LISTEN: i32 = 10;
/// `KernelOffsets` field value meaning "this kernel has no such plain field, do not check".
const NO_OFFSET: u32 = u32::MAX;

#[inline(always)]
fn stash_socket_call(ctx: &TracePointContext, shape: u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !is_traced((pid_tgid >> 32) as u32) {
        return;
    }
    let in_flight = InFlight {
        pid_tgid,
        shape,
        direction: 0,
        fd: syscall_arg(ctx, 0) as i32,
        capture: 0,
        tail: 0,
        _pad: 0,
        ptr: 0,
        count: 0,
        start_ns: unsafe { bpf_ktime_get_ns() },
        conn_id: 0,
    };
    stash(&in_flight);
}

#[tracepoint]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    stash_socket_call(&ctx, shape::CONNECT);
    0
}

#[tracepoint]
pub fn sys_enter_accept(ctx: TracePointContext) -> u32 {
    stash_socket_call(&ctx, shape::ACCEPT);
    0
}

#[tracepoint]
pub fn sys_enter_accept4(ctx: TracePointContext) -> u32 {
    stash_socket_call(&ctx, shape::ACCEPT);
    0
}

/// Exit of connect, accept and accept4: the fd (accept: the returned one) becomes a tracked
/// socket. Kept apart from the data exits so neither carries the other's stack frames.
#[inline(always)]
fn exit_socket(ctx: &TracePointContext) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(in_flight) = unstash(pid_tgid) else {
        return;
    };
    let ret = syscall_ret(ctx);
    let end_ns = unsafe { bpf_ktime_get_ns() };
    match in_flight.shape {
        shape::CONNECT => connect_exit(pid_tgid, &in_flight, ret, end_ns),
        shape::ACCEPT => accept_exit(pid_tgid, &in_flight, ret, end_ns),
        // A data syscall whose exit was lost: its bytes are gone either way.
        _ => {}
    }
}

#[tracepoint]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    exit_socket(&ctx);
    0
}

#[tracepoint]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    exit_socket(&ctx);
    0
}

#[tracepoint]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    exit_socket(&ctx);
    0
}

#[inline(always)]
fn connect_exit(pid_tgid: u64, in_flight: &InFlight, ret: i64, end_ns: u64) {
    // A non-blocking connect returns EINPROGRESS with its local port already bound.
    if ret == 0 || ret == -EINPROGRESS {
        track_socket(
            EventKind::Connect,
            pid_tgid,
            in_flight.fd,
            in_flight.start_ns,
            end_ns,
        );
    }
}

#[inline(always)]
fn accept_exit(pid_tgid: u64, in_flight: &InFlight, ret: i64, end_ns: u64) {
    if ret >= 0 {
        track_socket(
            EventKind::Accept,
            pid_tgid,
            ret as i32,
            in_flight.start_ns,
            end_ns,
        );
    }
}

#[inline(always)]
fn track_socket(kind: EventKind, pid_tgid: u64, fd: i32, start_ns: u64, end_ns: u64) {
    let Some(tuple) = socket_tuple(fd) else {
        // Not TCP over IPv4/IPv6 (a Unix or UDP socket), or the walk failed.
        return;
    };
    let pid = (pid_tgid >> 32) as u32;
    // The tracking start time is the connection's identity: fds are reused, (pid, fd, time) not.
    let value = ConnectionValue {
        conn_id: end_ns,
        accepted: u32::from(kind == EventKind::Accept),
        capture: CAPTURE_DEFAULT,
        tail: 0,
        tls: 0,
    };
    // The ring record is reserved before the map entry is made, and submitted after: the ring
    // is read in reservation order, and once the entry exists another thread's data events on
    // the socket are emitted. Where this program runs preemptibly (7.x), a thread preempted
    // between an insert and a later reservation let a writer thread's first frames into the
    // ring ahead of the connect (gRPC's HTTP/2 preface, read by the agent on an unknown socket).
    let entry = EVENTS.reserve::<SocketEvent>(0);
    if CONNECTIONS
        .insert(&connection_key(pid, fd), &value, 0)
        .is_err()
    {
        count(counter::CONNECTIONS_MAP_FULL);
        if let Some(entry) = entry {
            entry.discard(0);
        }
        return;
    }
    match entry {
        Some(entry) => {
            submit_socket_event(entry, kind, pid_tgid, fd, end_ns, start_ns, end_ns, tuple)
        }
        // Still tracked: its bytes come, the agent resolves the socket from procfs.
        None => count(counter::EVENTS_LOST),
    }
}

/// Fills a reserved socket event and submits it.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn submit_socket_event(
    mut entry: RingBufEntry<SocketEvent>,
    kind: EventKind,
    pid_tgid: u64,
    fd: i32,
    conn_id: u64,
    start_ns: u64,
    end_ns: u64,
    tuple: SocketTuple,
) {
    // Field by field into the reserved record: a whole SocketEvent built on the stack first
    // costs its size again in stack depth.
    let event = entry.as_mut_ptr();
    unsafe {
        (*event).header = header(kind, pid_tgid, fd, conn_id, start_ns, end_ns);
        (*event).tuple = tuple;
    }
    entry.submit(submit_flags());
}

#[inline(always)]
pub fn header(
    kind: EventKind,
    pid_tgid: u64,
    fd: i32,
    conn_id: u64,
    start_ns: u64,
    end_ns: u64,
) -> EventHeader {
    EventHeader {
        kind: kind as u32,
        pid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        fd,
        conn_id,
        start_ns,
        end_ns,
        full_len: 0,
        copied_len: 0,
        direction: 0,
        tail_len: 0,
        source: 0,
    }
}

#[tracepoint]
pub fn sys_enter_close(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !may_be_traced((pid_tgid >> 32) as u32) {
        return 0;
    }
    let fd = syscall_arg(&ctx, 0) as i32;
    let key = connection_key((pid_tgid >> 32) as u32, fd);
    let Some(conn_id) = (unsafe { CONNECTIONS.get(&key) }).map(|value| value.conn_id) else {
        return 0;
    };
    let _ = CONNECTIONS.remove(&key);
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(mut entry) = EVENTS.reserve::<EventHeader>(0) {
        entry.write(header(EventKind::Close, pid_tgid, fd, conn_id, now, now));
        entry.submit(submit_flags());
    } else {
        count(counter::EVENTS_LOST);
    }
    0
}

/// `sock:inet_sock_set_state`: a socket entering LISTEN, in the context of the process calling
/// listen(2). Reported for every process so `--port` can select servers started after kspan.
#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    // Offsets from tracefs: they move on PREEMPT_RT kernels (one more common field).
    let o = tracepoint_offsets();
    let newstate: i32 = unsafe { ctx.read_at(o.sock_newstate as usize) }.unwrap_or(0);
    let protocol: u16 = unsafe { ctx.read_at(o.sock_protocol as usize) }.unwrap_or(0);
    if newstate != TCP_LISTEN || protocol != IPPROTO_TCP {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 == agent_pid() {
        return 0;
    }
    let mut tuple = SocketTuple {
        family: unsafe { ctx.read_at(o.sock_family as usize) }.unwrap_or(0),
        local_port: unsafe { ctx.read_at(o.sock_sport as usize) }.unwrap_or(0),
        ..SocketTuple::default()
    };
    if tuple.family == AF_INET {
        let addr: [u8; 4] = unsafe { ctx.read_at(o.sock_saddr as usize) }.unwrap_or([0; 4]);
        tuple.local_addr[..4].copy_from_slice(&addr);
    } else {
        tuple.local_addr = unsafe { ctx.read_at(o.sock_saddr_v6 as usize) }.unwrap_or([0; 16]);
    }
    let now = unsafe { bpf_ktime_get_ns() };
    match EVENTS.reserve::<SocketEvent>(0) {
        Some(entry) => {
            submit_socket_event(entry, EventKind::Listen, pid_tgid, -1, 0, now, now, tuple)
        }
        None => count(counter::EVENTS_LOST),
    }
    0
}

#[inline(always)]
fn read<T>(address: u64) -> Option<T> {
    unsafe { bpf_probe_read_kernel(address as *const T) }.ok()
}

/// current->files->fdt->fd[fd]->private_data (struct socket)->sk, then the addresses in
/// `struct sock_common`. Returns None for anything but a TCP socket over IPv4 or IPv6.
#[inline(always)]
fn socket_tuple(fd: i32) -> Option<SocketTuple> {
    match walk_to_socket(fd) {
        // family 0: a socket we deliberately do not track.
        Some(tuple) if tuple.family != 0 => Some(tuple),
        Some(_) => None,
        None => {
            count(counter::SOCKET_LOOKUP_ERRORS);
            None
        }
    }
}

/// The walk behind [`socket_tuple`]: None when a read fails, family 0 for a socket that is not
/// TCP. Inlined (as every function here): a BPF-to-BPF call costs a stack frame rounded up to
/// 32 bytes on kernels before 6.13, and the socket exits are close to the 512-byte limit.
#[inline(always)]
fn walk_to_socket(fd: i32) -> Option<SocketTuple> {
    let o = kernel_offsets();
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = read(task + o.task_files as u64)?;
    let fdt: u64 = read(files + o.files_fdt as u64)?;
    let max_fds: u32 = read(fdt + o.fdtable_max_fds as u64)?;
    if fd < 0 || fd as u32 >= max_fds {
        return None;
    }
    let fd_array: u64 = read(fdt + o.fdtable_fd as u64)?;
    let file: u64 = read(fd_array + 8 * fd as u64)?;
    let socket: u64 = read(file + o.file_private_data as u64)?;
    let sk: u64 = read(socket + o.socket_sk as u64)?;
    let family: u16 = read(sk + o.sock_family as u64)?;
    let untracked = SocketTuple {
        family: 0,
        local_port: 0,
        remote_port: 0,
        _pad: 0,
        local_addr: [0; 16],
        remote_addr: [0; 16],
    };
    if family != AF_INET && family != AF_INET6 {
        return Some(untracked);
    }
    if o.sock_type != NO_OFFSET && read::<u16>(sk + o.sock_type as u64)? != SOCK_STREAM {
        return Some(untracked);
    }
    if o.sock_protocol != NO_OFFSET && read::<u16>(sk + o.sock_protocol as u64)? != IPPROTO_TCP {
        return Some(untracked);
    }
    let mut tuple = SocketTuple {
        family,
        local_port: read(sk + o.sock_num as u64)?,
        remote_port: u16::from_be(read(sk + o.sock_dport as u64)?),
        ..untracked
    };
    if family == AF_INET {
        let local: [u8; 4] = read(sk + o.sock_rcv_saddr as u64)?;
        let remote: [u8; 4] = read(sk + o.sock_daddr as u64)?;
        tuple.local_addr[..4].copy_from_slice(&local);
        tuple.remote_addr[..4].copy_from_slice(&remote);
    } else {
        tuple.local_addr = read(sk + o.sock_v6_rcv_saddr as u64)?;
        tuple.remote_addr = read(sk + o.sock_v6_daddr as u64)?;
    }
    Some(tuple)
}
