//! TLS library calls: uprobes on OpenSSL's `SSL_write`, `SSL_read` and their `_ex` forms.
//!
//! Entry: the arguments, in the calling thread's slot. A socket syscall the library makes on the
//! same thread before the call returns names the socket (data.rs, `enter_data`), which is
//! remembered per `SSL*` for calls that make none. Return: with the real byte count, the
//! plaintext goes into the ring as a data event of that socket, the same bounded copy as a
//! syscall's. The pid filter applies as on the syscall path: a uprobe fires in every process
//! that maps the library.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use kspan_common::{
    CAPTURE_MUTED, ConnectionValue, DIRECTION_EGRESS, DIRECTION_INGRESS, HTTP2_CAPTURE,
    HTTP2_CAPTURE_TAIL, SOURCE_TLS, TLS_CALL_SLOTS, connection_key, counter,
};

use crate::{
    data::submit_buffer,
    maps::{
        CONNECTIONS, InFlight, LAST_READS, PENDING_WRITES, PendingWrite, TLS_CALLS, TLS_SOCKETS,
        TlsCall, TlsObjectKey, TlsSocket, count, is_traced, mark_tls, shape,
    },
};

/// `SSL_write(ssl, buf, num)`, `SSL_read(ssl, buf, num)`; the `_ex` forms add `size_t *` as
/// the fourth argument for the byte count.
#[inline(always)]
fn enter(ctx: &ProbeContext, direction: u32, count_arg: bool) {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !is_traced((pid_tgid >> 32) as u32) {
        return;
    }
    let Some(slot) = TLS_CALLS.get_ptr_mut(pid_tgid as u32 & (TLS_CALL_SLOTS - 1)) else {
        return;
    };
    let owner = unsafe { (*slot).pid_tgid };
    if owner != 0 && owner != pid_tgid {
        count(counter::IN_FLIGHT_COLLISIONS);
    }
    unsafe {
        *slot = TlsCall {
            pid_tgid,
            ssl: ctx.arg::<u64>(0).unwrap_or(0),
            buf: ctx.arg::<u64>(1).unwrap_or(0),
            count_at: if count_arg {
                ctx.arg::<u64>(3).unwrap_or(0)
            } else {
                0
            },
            // As on the syscall path, a read's span time is its end.
            start_ns: if direction == DIRECTION_EGRESS {
                bpf_ktime_get_ns()
            } else {
                0
            },
            conn_id: 0,
            fd: -1,
            direction,
        };
    }
}

/// The call returned: its plaintext, if it moved any, as a data event of its socket.
#[inline(always)]
fn exit(ctx: &RetProbeContext, count_arg: bool) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(slot) = TLS_CALLS.get_ptr_mut(pid_tgid as u32 & (TLS_CALL_SLOTS - 1)) else {
        return;
    };
    let call = unsafe { *slot };
    if call.pid_tgid != pid_tgid {
        return;
    }
    unsafe { (*slot).pid_tgid = 0 };
    let ret: i64 = ctx.ret::<i64>();
    let moved = if count_arg {
        // 1 on success, the count behind the pointer.
        if ret as i32 != 1 || call.count_at == 0 {
            return;
        }
        match unsafe { bpf_probe_read_user(call.count_at as *const u64) } {
            Ok(n) => n,
            Err(_) => {
                count(counter::READ_ERRORS);
                return;
            }
        }
    } else {
        // An int: > 0 bytes moved, <= 0 an error or a retry (WANT_READ/WANT_WRITE).
        let n = ret as i32;
        if n <= 0 {
            return;
        }
        n as u64
    };
    if moved == 0 {
        return;
    }
    let pid = (pid_tgid >> 32) as u32;
    let key = TlsObjectKey {
        pid,
        _pad: 0,
        ssl: call.ssl,
    };
    // The socket: the one a syscall inside this call named; else the one this object was last
    // bound to, if that socket is still open (an object freed and another allocated at its
    // address, on a reused fd, is caught by the conn_id); else, on memory BIOs, for a read the
    // TLS socket this thread last read, for a write the one it writes next (held meanwhile).
    let mut socket = None;
    if call.fd >= 0 {
        bind(&key, call.fd, call.conn_id);
        socket = live_connection(pid, call.fd, call.conn_id).map(|c| (call.fd, call.conn_id, c));
    } else if let Some(known) = unsafe { TLS_SOCKETS.get(&key) } {
        let (fd, conn_id) = (known.fd, known.conn_id);
        socket = live_connection(pid, fd, conn_id).map(|c| (fd, conn_id, c));
        if socket.is_none() {
            let _ = TLS_SOCKETS.remove(&key);
        }
    }
    if socket.is_none()
        && call.fd < 0
        && call.direction == DIRECTION_INGRESS
        && let Some(last) = LAST_READS.get(pid_tgid as u32 & (TLS_CALL_SLOTS - 1))
        && last.pid_tgid == pid_tgid
        && let Some(conn) = live_connection(pid, last.fd, last.conn_id)
    {
        bind(&key, last.fd, last.conn_id);
        socket = Some((last.fd, last.conn_id, conn));
    }
    let Some((fd, conn_id, conn)) = socket else {
        if call.fd < 0 && call.direction == DIRECTION_EGRESS {
            submit_unbound_write(pid_tgid, &call, moved);
        } else {
            count(counter::TLS_UNBOUND);
        }
        return;
    };
    let conn = unsafe { &mut *conn };
    mark_tls(conn);
    if conn.capture == CAPTURE_MUTED {
        return;
    }
    let in_flight = InFlight {
        pid_tgid,
        shape: shape::BUFFER,
        direction: call.direction,
        fd,
        capture: conn.capture,
        tail: conn.tail,
        _pad: 0,
        ptr: call.buf,
        count: moved,
        start_ns: call.start_ns,
        conn_id,
    };
    let end_ns = unsafe { bpf_ktime_get_ns() };
    submit_buffer(pid_tgid, &in_flight, moved, end_ns, SOURCE_TLS);
}

/// Plaintext written to an object with no socket yet (a memory-BIO client's first request):
/// reported with fd -1, and the thread's slot in `PENDING_WRITES` remembers the object. The
/// thread's next write on a TLS socket binds the object and tells the agent which socket the
/// plaintext it holds belongs to (data.rs, `bind_pending_write`). The capture is HTTP/2's,
/// as the connection's capture is not known: the first write of an h2 client holds its
/// preface, settings and first headers together.
#[inline(always)]
fn submit_unbound_write(pid_tgid: u64, call: &TlsCall, moved: u64) {
    let Some(slot) = PENDING_WRITES.get_ptr_mut(pid_tgid as u32 & (TLS_CALL_SLOTS - 1)) else {
        return;
    };
    unsafe {
        *slot = PendingWrite {
            pid_tgid,
            ssl: call.ssl,
        };
    }
    let in_flight = InFlight {
        pid_tgid,
        shape: shape::BUFFER,
        direction: DIRECTION_EGRESS,
        fd: -1,
        capture: HTTP2_CAPTURE,
        tail: HTTP2_CAPTURE_TAIL,
        _pad: 0,
        ptr: call.buf,
        count: moved,
        start_ns: call.start_ns,
        conn_id: 0,
    };
    let end_ns = unsafe { bpf_ktime_get_ns() };
    submit_buffer(pid_tgid, &in_flight, moved, end_ns, SOURCE_TLS);
}

/// The tracked connection on `fd` if it is still the socket `conn_id` names (fds are reused).
#[inline(always)]
fn live_connection(pid: u32, fd: i32, conn_id: u64) -> Option<*mut ConnectionValue> {
    let conn = CONNECTIONS.get_ptr_mut(&connection_key(pid, fd))?;
    if unsafe { (*conn).conn_id } == conn_id {
        Some(conn)
    } else {
        None
    }
}

/// Remembers the socket of a TLS object (once per change: a map update costs).
#[inline(always)]
pub(crate) fn bind(key: &TlsObjectKey, fd: i32, conn_id: u64) {
    let known = unsafe { TLS_SOCKETS.get(key) }.is_some_and(|s| s.fd == fd && s.conn_id == conn_id);
    if !known {
        let socket = TlsSocket {
            conn_id,
            fd,
            _pad: 0,
        };
        let _ = TLS_SOCKETS.insert(key, &socket, 0);
    }
}

#[uprobe]
pub fn ssl_write_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, DIRECTION_EGRESS, false);
    0
}

#[uprobe]
pub fn ssl_write_ex_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, DIRECTION_EGRESS, true);
    0
}

#[uprobe]
pub fn ssl_read_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, DIRECTION_INGRESS, false);
    0
}

#[uprobe]
pub fn ssl_read_ex_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, DIRECTION_INGRESS, true);
    0
}

/// `SSL_write` and `SSL_read` return the byte count.
#[uretprobe]
pub fn ssl_rw_exit(ctx: RetProbeContext) -> u32 {
    exit(&ctx, false);
    0
}

/// The `_ex` forms return 1 and store the count.
#[uretprobe]
pub fn ssl_rw_ex_exit(ctx: RetProbeContext) -> u32 {
    exit(&ctx, true);
    0
}
