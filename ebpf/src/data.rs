//! Data syscalls: read, write, readv, writev, sendto, recvfrom, sendmsg, recvmsg, sendfile.
//!
//! Entry: if (pid, fd) is a tracked TCP socket, stash the arguments keyed by thread. Exit: with the
//! real byte count, copy a bounded prefix of the bytes into the ring buffer. Reads are only filled
//! at exit, and a write may be partial, so exit is the only place with the truth.

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_user,
        generated,
    },
    macros::tracepoint,
    programs::TracePointContext,
};
use kspan_common::{
    CAPTURE_DEFAULT, CAPTURE_MUTED, DIRECTION_EGRESS, DIRECTION_INGRESS, EVENT_HEADER_LEN,
    EventHeader, EventKind, HTTP2_CAPTURE, HTTP2_CAPTURE_TAIL, HTTP2_PREFACE_START, MAX_CAPTURE,
    MAX_IOV_SEGMENTS, MAX_IOV_TOTAL, SOURCE_SYSCALL, TLS_CALL_SLOTS, USUAL_SYSCALL_ARGS,
    USUAL_SYSCALL_RET, connection_key, counter,
};

use crate::{
    maps::{
        CONNECTIONS, DataRecord, EVENTS, IOVEC_CONTINUE, InFlight, Iovec, IovecCopy, LAST_READS,
        LastRead, PENDING_WRITES, SCRATCH, SCRATCH_PER_CPU, TAIL_CALLS, TRACEPOINT_OFFSETS,
        TlsObjectKey, atomic_add, capture_bytes, count, mark_tls, may_be_traced, shape, stash,
        submit_flags, tls_call_of, unstash,
    },
    process::emit,
    tls::bind,
};

const MSG_PEEK: u64 = 2;

/// Syscall argument `n` (0-based) at a sys_enter_* tracepoint.
#[inline(always)]
pub(crate) fn syscall_arg(ctx: &TracePointContext, n: usize) -> u64 {
    let base = unsafe { core::ptr::read_volatile(&raw const TRACEPOINT_OFFSETS.syscall_args) };
    context_u64(ctx, base, USUAL_SYSCALL_ARGS, 8 * n)
}

/// The return value at a sys_exit_* tracepoint.
#[inline(always)]
pub(crate) fn syscall_ret(ctx: &TracePointContext) -> i64 {
    let at = unsafe { core::ptr::read_volatile(&raw const TRACEPOINT_OFFSETS.syscall_ret) };
    context_u64(ctx, at, USUAL_SYSCALL_RET, 0) as i64
}

/// The u64 at `base + delta` in the tracepoint record, `base` from tracefs. When `base` is the
/// usual one, a direct context load at a constant offset (no helper call per argument): the
/// offsets are read-only globals, so the verifier knows `base` and drops the branch not taken.
/// A modified context pointer cannot be dereferenced, hence the helper read otherwise.
#[inline(always)]
fn context_u64(ctx: &TracePointContext, base: u32, usual: u32, delta: usize) -> u64 {
    if base == usual {
        unsafe {
            core::ptr::read_volatile(
                ctx.as_ptr()
                    .cast::<u8>()
                    .add(usual as usize + delta)
                    .cast::<u64>(),
            )
        }
    } else {
        unsafe { ctx.read_at::<u64>(base as usize + delta) }.unwrap_or(0)
    }
}

/// Stash a data syscall's arguments if its fd is a tracked socket. `flags_arg`: index of a flags
/// argument whose MSG_PEEK means the bytes will be read again and must not be counted twice (0:
/// none; argument 0 is always the fd).
#[inline(always)]
fn enter_data(ctx: &TracePointContext, shape: u32, direction: u32, flags_arg: usize) {
    let pid_tgid = bpf_get_current_pid_tgid();
    // What an unselected process costs: one array slot.
    if !may_be_traced((pid_tgid >> 32) as u32) {
        return;
    }
    let fd = syscall_arg(ctx, 0) as i32;
    // The one lookup an untracked fd (a file, a pipe) of a traced process costs.
    let Some(conn) = CONNECTIONS.get_ptr_mut(&connection_key((pid_tgid >> 32) as u32, fd)) else {
        return;
    };
    let conn = unsafe { &mut *conn };
    // Inside a TLS library call of this thread: the bytes are its ciphertext, the call's
    // uretprobe reports the plaintext. The call learns its socket; the socket, that it is TLS.
    if let Some(call) = tls_call_of(pid_tgid) {
        unsafe {
            (*call).fd = fd;
            (*call).conn_id = conn.conn_id;
        }
        mark_tls(conn);
        return;
    }
    // A TLS connection's ciphertext outside a library call (a handshake, an alert, or all of it
    // for a library on memory BIOs) and a muted connection (no protocol kspan parses) cost the
    // lookup, nothing more.
    if conn.tls != 0 {
        // A library on memory BIOs (Node.js) decrypts what the thread read last: tls.rs binds
        // its object to this socket. Only TLS sockets are remembered, so a plaintext socket is
        // never taken for one.
        if direction == DIRECTION_INGRESS
            && let Some(slot) = LAST_READS.get_ptr_mut(pid_tgid as u32 & (TLS_CALL_SLOTS - 1))
        {
            unsafe {
                *slot = LastRead {
                    pid_tgid,
                    conn_id: conn.conn_id,
                    fd,
                    _pad: 0,
                };
            }
        } else if direction == DIRECTION_EGRESS {
            bind_pending_write(pid_tgid, fd, conn.conn_id);
        }
        return;
    }
    if conn.capture == CAPTURE_MUTED {
        return;
    }
    if flags_arg != 0 && syscall_arg(ctx, flags_arg) & MSG_PEEK != 0 {
        return;
    }
    let in_flight = InFlight {
        pid_tgid,
        shape,
        direction,
        fd,
        capture: conn.capture,
        tail: conn.tail,
        _pad: 0,
        ptr: syscall_arg(ctx, 1),
        count: syscall_arg(ctx, 2),
        // A read's bytes exist at its exit, which the exit records, and a server's response
        // spans end at their last write's exit: only writes on connections that may be clients
        // need the entry time (a clock read saved per syscall otherwise).
        start_ns: if direction == DIRECTION_EGRESS && conn.accepted == 0 {
            unsafe { bpf_ktime_get_ns() }
        } else {
            0
        },
        conn_id: conn.conn_id,
    };
    stash(&in_flight);
}

/// The thread wrote plaintext to a TLS object with no socket yet (tls.rs), and now writes on a
/// TLS socket: that is the object's socket. Bound for the object's later calls, and the agent
/// is told (a `TlsBound` event), so the plaintext it holds for the thread joins the socket.
#[inline(always)]
fn bind_pending_write(pid_tgid: u64, fd: i32, conn_id: u64) {
    let Some(slot) = PENDING_WRITES.get_ptr_mut(pid_tgid as u32 & (TLS_CALL_SLOTS - 1)) else {
        return;
    };
    let pending = unsafe { *slot };
    if pending.pid_tgid != pid_tgid {
        return;
    }
    unsafe { (*slot).pid_tgid = 0 };
    let key = TlsObjectKey {
        pid: (pid_tgid >> 32) as u32,
        _pad: 0,
        ssl: pending.ssl,
    };
    bind(&key, fd, conn_id);
    emit(EventKind::TlsBound, pid_tgid, fd, conn_id);
}

/// Exit of a data syscall: with the real byte count, copy the bytes. The shape is a constant per
/// branch, so each exit holds only its own copy loops: smaller programs, a fraction of the
/// verifier's work (which under emulation, or on a busy node, is most of kspan's start time).
/// Connect and accept have their own exit (socket.rs).
///
/// `ours` maps the stashed shape to the shape this exit copies, as a constant per branch (None:
/// the slot was stashed by another syscall whose exit was lost, not ours to report).
#[inline(always)]
fn exit_data(ctx: &TracePointContext, ours: impl Fn(u32) -> Option<u32>) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(in_flight) = unstash(pid_tgid) else {
        return;
    };
    let ret = syscall_ret(ctx);
    if ret > 0
        && let Some(shape) = ours(in_flight.shape)
    {
        let end_ns = unsafe { bpf_ktime_get_ns() };
        data_exit(ctx, pid_tgid, &in_flight, shape, ret as u64, end_ns);
    }
}

/// The fields of `struct user_msghdr` up to the iovec.
#[repr(C)]
struct MsgHdr {
    name: u64,
    namelen: i32,
    _pad: i32,
    iov: u64,
    iovlen: u64,
}

/// Copy the bytes into this CPU's scratch record, then put exactly header + copied bytes into the
/// ring with one `bpf_ringbuf_output`. Reserving in the ring directly needs a constant size, so
/// a 40-byte request took a 256-byte slot and a small iovec response 1 KiB: every record touched
/// several cold cache lines of the ring. The scratch record stays hot in this CPU's cache.
///
/// A syscall larger than the capture gives its first bytes; on connections that ask for it
/// (HTTP/2), part of the capture goes to its last bytes instead: trailers after large DATA.
#[inline(always)]
fn data_exit(
    ctx: &TracePointContext,
    pid_tgid: u64,
    in_flight: &InFlight,
    shape: u32,
    full_len: u64,
    end_ns: u64,
) {
    if shape == shape::BUFFER {
        submit_buffer(pid_tgid, in_flight, full_len, end_ns, SOURCE_SYSCALL);
        return;
    }
    let Some((record, want)) =
        start_record(pid_tgid, in_flight, shape, full_len, end_ns, SOURCE_SYSCALL)
    else {
        return;
    };
    let tail = want.tail;
    let head = want.head;
    let (array, entries) = match shape {
        shape::IOVEC => (in_flight.ptr, in_flight.count),
        shape::MSGHDR => match unsafe { bpf_probe_read_user(in_flight.ptr as *const MsgHdr) } {
            Ok(msg) => (msg.iov, msg.iovlen),
            Err(_) => (0, 0),
        },
        _ => (0, 0),
    };
    unsafe {
        (*record).iov = IovecCopy {
            owner: pid_tgid,
            array,
            pos: 0,
            full: full_len,
            count: entries.min(MAX_IOV_TOTAL as u64) as u32,
            next: 0,
            head,
            tail,
            head_copied: 0,
            tail_copied: 0,
            failed: 0,
            copy_at: 0,
            copy_len: 0,
            _pad: 0,
        };
    }
    copy_segments_then_submit(ctx, record);
}

/// How much of a transfer to copy: `head` bytes from its start, then `tail` from its end.
struct Wanted {
    head: u32,
    tail: u32,
}

/// Claims a scratch record and fills its header for a data event of `full_len` bytes, with how
/// much of it to copy (by the connection's capture). None (counted) when every scratch record
/// of the CPU is busy.
#[inline(always)]
fn start_record(
    pid_tgid: u64,
    in_flight: &InFlight,
    shape: u32,
    full_len: u64,
    end_ns: u64,
    source: u32,
) -> Option<(*mut DataRecord, Wanted)> {
    let capture = if in_flight.capture == CAPTURE_DEFAULT {
        capture_bytes()
    } else {
        in_flight.capture
    };
    let capture = (capture as u64).min(MAX_CAPTURE as u64);
    let want = if shape == shape::NONE {
        0
    } else {
        full_len.min(capture) as u32
    };
    let tail = if full_len > capture {
        in_flight.tail.min(want / 2)
    } else {
        0
    };
    let head = want - tail;
    let Some(record) = claim_scratch() else {
        count(counter::SCRATCH_BUSY);
        return None;
    };
    unsafe {
        (*record).header = EventHeader {
            kind: EventKind::Data as u32,
            pid: (pid_tgid >> 32) as u32,
            tid: pid_tgid as u32,
            fd: in_flight.fd,
            conn_id: in_flight.conn_id,
            start_ns: if in_flight.start_ns == 0 {
                end_ns
            } else {
                in_flight.start_ns
            },
            end_ns,
            full_len,
            copied_len: 0,
            direction: in_flight.direction,
            tail_len: 0,
            source,
        };
    }
    Some((record, Wanted { head, tail }))
}

/// A data event of one user buffer (`in_flight.ptr`, `full_len` bytes moved): a socket
/// syscall's, or a TLS library call's plaintext (tls.rs).
#[inline(always)]
pub(crate) fn submit_buffer(
    pid_tgid: u64,
    in_flight: &InFlight,
    full_len: u64,
    end_ns: u64,
    source: u32,
) {
    let Some((record, Wanted { head, tail })) =
        start_record(pid_tgid, in_flight, shape::BUFFER, full_len, end_ns, source)
    else {
        return;
    };
    let dst = unsafe { (*record).data.as_mut_ptr() };
    let copied = copy_buffer(dst, in_flight.ptr, head);
    let mut tail_copied = 0;
    if copied == head && tail > 0 {
        // Below MAX_CAPTURE (head < capture), masked for the verifier.
        let offset = head & (MAX_CAPTURE as u32 - 1);
        tail_copied = copy_buffer(
            unsafe { dst.add(offset as usize) },
            in_flight.ptr + full_len - tail as u64,
            tail,
        );
    }
    submit_record(record, copied, tail_copied, head + tail);
}

/// Copies the first batch of iovec segments when only a prefix is wanted, with the simple loop;
/// a copy that also wants the syscall's tail, or more segments, continues in `iovec_continue`
/// (a tail call: a fresh program run with a fresh verifier budget). Keeping the head-and-tail
/// loop out of the exit program keeps it smaller to verify: the verifier's work is most of
/// kspan's start-up time under emulation, and on a busy node.
#[inline(always)]
fn copy_segments_then_submit(ctx: &TracePointContext, record: *mut DataRecord) {
    if unsafe { (*record).iov.tail } == 0 {
        copy_head_segments(record);
    }
    continue_or_submit(ctx, record);
}

/// Continues the copy in a tail call if more is wanted, else submits the record.
#[inline(always)]
fn continue_or_submit(ctx: &TracePointContext, record: *mut DataRecord) {
    let p = unsafe { &(*record).iov };
    let wanted = p.pos < p.head as u64 || (p.tail > 0 && p.pos < p.full);
    if p.failed == 0 && p.next < p.count && wanted {
        // Returns only if the call failed (the chain's limit): what was copied goes out.
        unsafe { TAIL_CALLS.tail_call(ctx, IOVEC_CONTINUE) };
    }
    let (head_copied, tail_copied, want) = unsafe {
        let p = &(*record).iov;
        (p.head_copied, p.tail_copied, p.head + p.tail)
    };
    submit_record(record, head_copied, tail_copied, want);
}

/// The tail-called continuation of an iovec copy: finds this thread's record among this CPU's
/// (the CPU cannot change within a chain) and copies on. Not attached to any tracepoint.
#[tracepoint]
pub fn iovec_continue(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let first = unsafe { bpf_get_smp_processor_id() } * SCRATCH_PER_CPU;
    let mut k = 0;
    while k < SCRATCH_PER_CPU {
        if let Some(record) = SCRATCH.get_ptr_mut(first + k)
            && unsafe { (*record).busy } != 0
            && unsafe { (*record).iov.owner } == pid_tgid
        {
            copy_segments(record);
            continue_or_submit(&ctx, record);
            return 0;
        }
        k += 1;
    }
    0
}

/// Puts the record's header and copied bytes into the ring and releases the record. The tail
/// goes only behind a complete head (it sits at the head's end); `want` is what both should
/// have been.
#[inline(always)]
fn submit_record(record: *mut DataRecord, head_copied: u32, tail_copied: u32, want: u32) {
    let mut copied = head_copied + tail_copied;
    let mut tail_len = tail_copied;
    if copied < want {
        count(counter::READ_ERRORS);
        copied = head_copied;
        tail_len = 0;
    }
    // Spelled out for the verifier: the record handed to the ring stays inside the scratch value.
    if copied > MAX_CAPTURE as u32 {
        copied = MAX_CAPTURE as u32;
    }
    unsafe {
        (*record).header.copied_len = copied;
        (*record).header.tail_len = tail_len;
        (*record).iov.owner = 0;
    }
    if copied >= 8 {
        act_on_known_starts(record);
    }
    let len = EVENT_HEADER_LEN + copied as usize;
    let bytes = unsafe { core::slice::from_raw_parts(record.cast::<u8>(), len) };
    if EVENTS.output::<[u8]>(bytes, submit_flags()).is_err() {
        count(counter::EVENTS_LOST);
    }
    release_scratch(record);
}

/// The two protocol facts the kernel acts on itself, not when the agent has read the event
/// (detection proper is the agent's):
/// - bytes that start with the HTTP/2 client preface get HTTP/2's capture: a connection's first
///   large response comes within milliseconds;
/// - a socket's bytes that start with a TLS handshake record mark it TLS: its ciphertext is not
///   copied, and a library on memory BIOs can be bound to it (tls.rs) from its next read on,
///   which on loopback comes before the agent would have marked it.
#[inline(always)]
fn act_on_known_starts(record: *mut DataRecord) {
    let (start, pid, fd, conn_id, source) = unsafe {
        let r = &*record;
        (
            core::ptr::read_unaligned(r.data.as_ptr().cast::<u64>()),
            r.header.pid,
            r.header.fd,
            r.header.conn_id,
            r.header.source,
        )
    };
    let http2 = start == HTTP2_PREFACE_START;
    // Content type 22 (handshake), version 3.x with x <= 4 (SSL 3.0 to TLS 1.3): no HTTP,
    // HTTP/2 or Kafka message starts so (as a Kafka length it would be 369 MB).
    let tls_handshake = source == SOURCE_SYSCALL
        && start & 0xff == 0x16
        && (start >> 8) & 0xff == 0x03
        && (start >> 16) & 0xff <= 0x04;
    if !http2 && !tls_handshake {
        return;
    }
    if let Some(conn) = CONNECTIONS.get_ptr_mut(&connection_key(pid, fd)) {
        let conn = unsafe { &mut *conn };
        if conn.conn_id != conn_id {
            return;
        }
        if tls_handshake {
            mark_tls(conn);
        } else if conn.capture == CAPTURE_DEFAULT {
            conn.capture = HTTP2_CAPTURE;
            conn.tail = HTTP2_CAPTURE_TAIL;
        }
    }
}

/// Claim one of this CPU's scratch records. A program on a syscall tracepoint can be preempted
/// where syscall tracepoints may fault (7.2 showed it: records of one client carried another's
/// bytes), and another task's run of it on the same CPU must not write into the record being
/// filled. Each record has a busy count taken with an atomic add (the only atomic 5.10 has: no
/// compare-and-swap before 5.12): whoever reads 1 after its own increment owns the record, a
/// reader of more backs off and tries the CPU's next record. The CPU cannot change under a
/// program (migration is disabled), so only tasks of this CPU ever touch these records.
#[inline(always)]
fn claim_scratch() -> Option<*mut DataRecord> {
    let first = unsafe { bpf_get_smp_processor_id() } * SCRATCH_PER_CPU;
    let mut k = 0;
    while k < SCRATCH_PER_CPU {
        if let Some(record) = SCRATCH.get_ptr_mut(first + k) {
            let busy = unsafe { &raw mut (*record).busy };
            atomic_add(busy, 1);
            if unsafe { core::ptr::read_volatile(busy) } == 1 {
                return Some(record);
            }
            atomic_add(busy, u64::MAX);
        }
        k += 1;
    }
    None
}

#[inline(always)]
fn release_scratch(record: *mut DataRecord) {
    atomic_add(unsafe { &raw mut (*record).busy }, u64::MAX);
}

/// Copy `want` (≤ MAX_CAPTURE) bytes from one user buffer. Returns the bytes copied (0 on a
/// fault).
#[inline(always)]
fn copy_buffer(dst: *mut u8, src: u64, want: u32) -> u32 {
    // Masked through the stack (a no-op: want ≤ MAX_CAPTURE) so that the bound checked below is
    // the register's own: 5.10's verifier lost a bound checked on a 32-bit copy of it.
    let len = unsafe { core::ptr::read_volatile(&want) } & (2 * MAX_CAPTURE as u32 - 1);
    if len == 0 || len > MAX_CAPTURE as u32 {
        return 0;
    }
    let ret = unsafe { generated::bpf_probe_read_user(dst.cast(), len, src as *const _) };
    if ret == 0 { len } else { 0 }
}

/// Copy the first batch (up to MAX_IOV_SEGMENTS) of the record's iovec segments, when only the
/// first `head` bytes are wanted: each segment at its offset until `head` bytes are in. Leaves
/// the progress as [`copy_segments`] would, which continues from there.
#[inline(always)]
fn copy_head_segments(record: *mut DataRecord) {
    let half = MAX_CAPTURE as u32;
    let dst = unsafe { (*record).data.as_mut_ptr() };
    let p = unsafe { &mut (*record).iov };
    if p.count == 0 {
        return;
    }
    // The batch in one user read (see `copy_segments`).
    let batch = p.count.min(MAX_IOV_SEGMENTS as u32);
    let segments = unsafe { &mut (*record).segments };
    let ret = unsafe {
        generated::bpf_probe_read_user(
            segments.as_mut_ptr().cast(),
            batch * size_of::<Iovec>() as u32,
            p.array as *const _,
        )
    };
    if ret != 0 {
        p.failed = 1;
        return;
    }
    let want = p.head;
    let mut copied: u32 = 0;
    let mut i: usize = 0;
    while i < MAX_IOV_SEGMENTS {
        if i as u32 >= batch || copied >= want {
            break;
        }
        let segment = &segments[i];
        let mut len = want - copied;
        if segment.len < len as u64 {
            len = segment.len as u32;
        }
        if len > half {
            len = half;
        }
        // Through the stack so the compiler cannot drop the mask it proves redundant: the
        // verifier cannot see that proof, only the mask.
        let offset = unsafe { core::ptr::read_volatile(&copied) } & (half - 1);
        if len > 0 {
            let ret = unsafe {
                generated::bpf_probe_read_user(
                    dst.add(offset as usize).cast(),
                    len,
                    segment.base as *const _,
                )
            };
            if ret != 0 {
                p.failed = 1;
                break;
            }
        }
        copied += len;
        i += 1;
    }
    // A segment copied in part (the head ended inside it) is done with: nothing past the head
    // is wanted.
    p.head_copied = copied;
    p.pos = copied as u64;
    p.next = i as u32;
}

/// Copies `len` (≤ MAX_CAPTURE) bytes of a segment from user `src` to `dst + at`, `at` masked
/// below MAX_CAPTURE; false on a fault. `at` and `len` go through the record (map memory) first:
/// the verifier does not track values loaded from a map, so the copy's bounds are the masks
/// here alone and the head-and-tail loop's sums need not be precise, which lets the verifier
/// merge that loop's paths (`iovec_continue`: ~14,000 instructions verified instead of ~19,000).
/// The simple head loop gains nothing from it (its exit program grew).
#[inline(always)]
fn copy_segment(p: &mut IovecCopy, dst: *mut u8, at: u32, len: u32, src: u64) -> bool {
    let half = MAX_CAPTURE as u32;
    let (at, len) = unsafe {
        core::ptr::write_volatile(&mut p.copy_at, at);
        core::ptr::write_volatile(&mut p.copy_len, len);
        (
            core::ptr::read_volatile(&p.copy_at) & (half - 1),
            core::ptr::read_volatile(&p.copy_len) & (2 * half - 1),
        )
    };
    if len == 0 {
        return true;
    }
    if len > half {
        return false;
    }
    let ret = unsafe {
        generated::bpf_probe_read_user(dst.add(at as usize).cast(), len, src as *const _)
    };
    ret == 0
}

/// Copy from the next batch (up to MAX_IOV_SEGMENTS) of the record's iovec segments the parts
/// that fall in the head (the first `head` bytes, copied at their offset) or the tail (the last
/// `tail` bytes, copied after the head). Destination offsets are masked below MAX_CAPTURE and
/// each copy is at most MAX_CAPTURE long, so the verifier can prove every write stays inside the
/// scratch record (twice MAX_CAPTURE). A fault ends the copy.
#[inline(always)]
fn copy_segments(record: *mut DataRecord) {
    let half = MAX_CAPTURE as u32;
    let dst = unsafe { (*record).data.as_mut_ptr() };
    let p = unsafe { &mut (*record).iov };
    let next = p.next;
    if next >= p.count || next >= MAX_IOV_TOTAL {
        return;
    }
    // The batch of the iovec array in one user read rather than one per segment, into the
    // scratch record: on the 512-byte BPF stack it pushed the exit programs over the limit of
    // kernels before 6.13 (their verifier rounds every frame up to 32 bytes).
    let batch = (p.count - next).min(MAX_IOV_SEGMENTS as u32);
    let segments = unsafe { &mut (*record).segments };
    let ret = unsafe {
        generated::bpf_probe_read_user(
            segments.as_mut_ptr().cast(),
            batch * size_of::<Iovec>() as u32,
            (p.array + next as u64 * size_of::<Iovec>() as u64) as *const _,
        )
    };
    if ret != 0 {
        p.failed = 1;
        return;
    }
    let full = p.full;
    let head = p.head as u64;
    let tail = p.tail as u64;
    let tail_start = full - tail;
    let mut pos = p.pos;
    let mut head_copied = p.head_copied;
    let mut tail_copied = p.tail_copied;
    let mut i: usize = 0;
    while i < MAX_IOV_SEGMENTS {
        if i as u32 >= batch || pos >= full {
            break;
        }
        let segment = &segments[i];
        let len = segment.len.min(full - pos);
        if pos < head {
            let mut n = len.min(head - pos) as u32;
            if n > half {
                n = half;
            }
            if n > 0 && !copy_segment(p, dst, pos as u32, n, segment.base) {
                p.failed = 1;
                break;
            }
            head_copied += n;
        }
        if tail > 0 && pos + len > tail_start {
            let from = if pos > tail_start { pos } else { tail_start };
            let mut n = (pos + len - from) as u32;
            if n > half {
                n = half;
            }
            let at = head + (from - tail_start);
            if !copy_segment(p, dst, at as u32, n, segment.base + (from - pos)) {
                p.failed = 1;
                break;
            }
            tail_copied += n;
        }
        pos += len;
        i += 1;
    }
    p.pos = pos;
    p.head_copied = head_copied;
    p.tail_copied = tail_copied;
    p.next = next + i as u32;
}

/// The entry program of a data syscall. Exits are per argument shape (below).
macro_rules! data_syscall_entry {
    ($enter:ident, $shape:expr, $direction:expr, $flags_arg:expr) => {
        #[tracepoint]
        pub fn $enter(ctx: TracePointContext) -> u32 {
            enter_data(&ctx, $shape, $direction, $flags_arg);
            0
        }
    };
}

data_syscall_entry!(sys_enter_read, shape::BUFFER, DIRECTION_INGRESS, 0);
data_syscall_entry!(sys_enter_write, shape::BUFFER, DIRECTION_EGRESS, 0);
data_syscall_entry!(sys_enter_readv, shape::IOVEC, DIRECTION_INGRESS, 0);
data_syscall_entry!(sys_enter_writev, shape::IOVEC, DIRECTION_EGRESS, 0);
data_syscall_entry!(sys_enter_sendto, shape::BUFFER, DIRECTION_EGRESS, 0);
data_syscall_entry!(sys_enter_recvfrom, shape::BUFFER, DIRECTION_INGRESS, 3);
data_syscall_entry!(sys_enter_sendmsg, shape::MSGHDR, DIRECTION_EGRESS, 0);
data_syscall_entry!(sys_enter_recvmsg, shape::MSGHDR, DIRECTION_INGRESS, 2);
data_syscall_entry!(sys_enter_sendfile64, shape::NONE, DIRECTION_EGRESS, 0);

// The exits. On kernels whose syscall tracepoints are preemptible (7.2), a task preempted
// inside a program makes the kernel skip that same program for every other task on the CPU
// until it resumes (counted as `program_misses`), so a program shared by many syscalls widens
// what one preemption loses: in the matrix guests, one exit program for read, write, sendto
// and recvfrom lost syscalls where four did not. Only the vectored copies, the verifier's
// biggest job by far (~26k instructions each), are shared, per direction: the kernel verifies
// two rather than four.

macro_rules! data_exit {
    ($exit:ident, $shape:expr) => {
        #[tracepoint]
        pub fn $exit(ctx: TracePointContext) -> u32 {
            exit_data(&ctx, |stashed| (stashed == $shape).then_some($shape));
            0
        }
    };
}

data_exit!(sys_exit_read, shape::BUFFER);
data_exit!(sys_exit_write, shape::BUFFER);
data_exit!(sys_exit_sendto, shape::BUFFER);
data_exit!(sys_exit_recvfrom, shape::BUFFER);
data_exit!(sys_exit_sendfile64, shape::NONE);

/// readv and recvmsg: a `user_msghdr` only adds a read of the iovec array's address to the
/// copy of an iovec array, so one program takes both shapes.
#[tracepoint]
pub fn sys_exit_vectored_in(ctx: TracePointContext) -> u32 {
    exit_vectored(&ctx);
    0
}

/// writev and sendmsg.
#[tracepoint]
pub fn sys_exit_vectored_out(ctx: TracePointContext) -> u32 {
    exit_vectored(&ctx);
    0
}

/// Both vectored shapes, each as its constant.
#[inline(always)]
fn exit_vectored(ctx: &TracePointContext) {
    exit_data(ctx, |stashed| match stashed {
        shape::IOVEC => Some(shape::IOVEC),
        shape::MSGHDR => Some(shape::MSGHDR),
        _ => None,
    });
}
