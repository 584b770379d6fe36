//! Maps and settings shared by every program, and the small helpers around them.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};
use kspan_common::{
    COMM_LEN, ConnectionValue, EventHeader, IN_FLIGHT_SLOTS, KernelOffsets, MAX_CAPTURE,
    MAX_CONNECTIONS, MAX_EXE_NAMES, MAX_IOV_SEGMENTS, MAX_TLS_OBJECTS, MAX_TRACED_PIDS,
    TLS_CALL_SLOTS, TRACED_SLOTS, TracepointOffsets, USUAL_SYSCALL_ARGS, USUAL_SYSCALL_RET,
    counter,
};

/// Settings the agent writes before loading (`EbpfLoader::set_global`); reading a global costs no
/// map lookup.
#[unsafe(no_mangle)]
static TRACE_ALL: u32 = 0;
#[unsafe(no_mangle)]
static AGENT_PID: u32 = 0;
#[unsafe(no_mangle)]
static CAPTURE_BYTES: u32 = kspan_common::DEFAULT_CAPTURE;
/// Unread bytes in the ring buffer past which a submit wakes the agent (set to a fraction of the
/// ring size). Below it the agent is not woken: it drains on its poll interval.
#[unsafe(no_mangle)]
static WAKEUP_BYTES: u64 = 512 * 1024;
#[unsafe(no_mangle)]
static KERNEL_OFFSETS: KernelOffsets = KernelOffsets {
    task_files: 0,
    files_fdt: 0,
    fdtable_max_fds: 0,
    fdtable_fd: 0,
    file_private_data: 0,
    socket_sk: 0,
    sock_family: 0,
    sock_num: 0,
    sock_dport: 0,
    sock_daddr: 0,
    sock_rcv_saddr: 0,
    sock_v6_daddr: 0,
    sock_v6_rcv_saddr: 0,
    sock_type: 0,
    sock_protocol: 0,
    _pad: 0,
};

/// Field offsets of the tracepoints, from the running kernel's tracefs.
#[unsafe(no_mangle)]
pub static TRACEPOINT_OFFSETS: TracepointOffsets = TracepointOffsets {
    syscall_args: USUAL_SYSCALL_ARGS,
    syscall_ret: USUAL_SYSCALL_RET,
    newtask_pid: 0,
    newtask_clone_flags: 0,
    sock_newstate: 0,
    sock_sport: 0,
    sock_family: 0,
    sock_protocol: 0,
    sock_saddr: 0,
    sock_saddr_v6: 0,
    exec_filename: 0,
};

#[inline(always)]
pub fn tracepoint_offsets() -> TracepointOffsets {
    unsafe { core::ptr::read_volatile(&TRACEPOINT_OFFSETS) }
}

#[inline(always)]
pub fn trace_all() -> bool {
    unsafe { core::ptr::read_volatile(&TRACE_ALL) != 0 }
}

#[inline(always)]
pub fn agent_pid() -> u32 {
    unsafe { core::ptr::read_volatile(&AGENT_PID) }
}

#[inline(always)]
pub fn capture_bytes() -> u32 {
    unsafe { core::ptr::read_volatile(&CAPTURE_BYTES) }
}

const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;
const BPF_RB_AVAIL_DATA: u64 = 0;

/// Flags for ring-buffer submits: waking the reader on every event costs an interrupt and a
/// context switch per syscall; batching them is the largest single saving on the hot path.
#[inline(always)]
pub fn submit_flags() -> u64 {
    let threshold = unsafe { core::ptr::read_volatile(&WAKEUP_BYTES) };
    if EVENTS.query(BPF_RB_AVAIL_DATA) >= threshold {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

#[inline(always)]
pub fn kernel_offsets() -> KernelOffsets {
    unsafe { core::ptr::read_volatile(&KERNEL_OFFSETS) }
}

/// The one ring buffer every event goes through. Size set by the agent at load time.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(8 * 1024 * 1024, 0);

/// Processes to trace (tgid → 1) when `TRACE_ALL` is 0.
#[map]
pub static TRACED_PIDS: HashMap<u32, u8> = HashMap::with_max_entries(MAX_TRACED_PIDS, 0);

/// Pre-filter in front of every hash lookup keyed by pid: slot `pid % TRACED_SLOTS` counts the
/// pids of [`TRACED_PIDS`] that fall in it. An array lookup is a few instructions where a hash
/// lookup costs ~60 ns, paid by every read and write of every untraced process on the host. A
/// shared slot only lets the exact lookup run; a slot returns to 0 when its last pid exits or is
/// untraced, so the filter does not fill up over the months of a node's life. Both sides keep
/// the counts with atomic adds: the kernel here, the agent through a shared mapping of the array
/// (`BPF_F_MMAPABLE`). A count goes up before its pid is inserted and down after it is removed,
/// so a pid in TRACED_PIDS always has a non-zero slot.
#[map]
pub static MAYBE_TRACED: Array<u64> = Array::with_max_entries(TRACED_SLOTS, BPF_F_MMAPABLE);
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Executable names selected with `--exe NAME` (plain names only), as `comm` keys: a process
/// exec'ing one is traced from its first syscall, without waiting for userspace.
#[map]
pub static EXE_COMMS: HashMap<[u8; COMM_LEN], u8> = HashMap::with_max_entries(MAX_EXE_NAMES, 0);

/// Tracked TCP sockets: `connection_key(pid, fd)` → identity of the connection. LRU: entries
/// whose close kspan never sees (exec with CLOEXEC, close_range, dup2 over a socket, a lost
/// close event) would otherwise fill it for good; when full, the least recently used entry
/// makes room.
#[map]
pub static CONNECTIONS: LruHashMap<u64, ConnectionValue> =
    LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);

/// Arguments of a syscall between its entry and its exit, keyed by pid_tgid (one per thread).
#[map]
pub static IN_FLIGHT: Array<InFlight> = Array::with_max_entries(IN_FLIGHT_SLOTS, 0);

/// Data records built here before they are copied into the ring at their exact size:
/// `SCRATCH_PER_CPU` per possible CPU (entries set by the agent), CPU `c` owning entries
/// `c * SCRATCH_PER_CPU ..`. A plain array rather than a per-CPU array, whose values are capped
/// at 32 KiB. A program claims a record through its busy count (see `data::claim_scratch`):
/// a task preempted while filling one keeps it, and the next task on that CPU takes the other.
#[map]
pub static SCRATCH: Array<DataRecord> = Array::with_max_entries(1, 0);
pub use kspan_common::SCRATCH_PER_CPU;

#[repr(C)]
pub struct DataRecord {
    pub header: EventHeader,
    /// Twice the largest capture: iovec copies mask their offset below MAX_CAPTURE (verifier).
    pub data: [u8; 2 * MAX_CAPTURE],
    /// A batch of the caller's iovec array, read in one go (not part of the event).
    pub segments: [Iovec; MAX_IOV_SEGMENTS],
    /// An iovec copy in progress across tail calls (see `data::copy_segments`).
    pub iov: IovecCopy,
    /// Programs holding or trying to claim this record (0 when free). 64 bits: the BPF target
    /// has atomics of that width only.
    pub busy: u64,
}

/// Where an iovec copy stands; lives in the scratch record it fills, so the tail-called
/// continuation finds it.
#[repr(C)]
pub struct IovecCopy {
    /// The thread whose syscall this is: the continuation looks for its record by it.
    pub owner: u64,
    /// User address of the iovec array.
    pub array: u64,
    /// Offset of segment `next` in the syscall's bytes.
    pub pos: u64,
    /// The syscall's byte count (its return value).
    pub full: u64,
    /// Entries in the array (capped at `MAX_IOV_TOTAL`), and the next one to copy.
    pub count: u32,
    pub next: u32,
    /// Bytes wanted from the start, and from the end (copied after the head's bytes).
    pub head: u32,
    pub tail: u32,
    /// Bytes copied of each.
    pub head_copied: u32,
    pub tail_copied: u32,
    /// A user-memory fault ended the copy.
    pub failed: u32,
    /// Destination offset and length of the segment copy being made, passed through this map
    /// memory on purpose (see `data::copy_segment`).
    pub copy_at: u32,
    pub copy_len: u32,
    pub _pad: u32,
}

/// Tail-call targets: [`IOVEC_CONTINUE`] copies the next batch of iovec segments.
#[map]
pub static TAIL_CALLS: ProgramArray = ProgramArray::with_max_entries(1, 0);
pub use kspan_common::IOVEC_CONTINUE;

/// `struct iovec` as user space lays it out.
#[repr(C)]
pub struct Iovec {
    pub base: u64,
    pub len: u64,
}

/// Per-CPU counters, indexed by `kspan_common::counter`.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// How the bytes of a data syscall are laid out in the caller's memory.
pub mod shape {
    /// One buffer: `ptr`, `count` bytes (read, write, sendto, recvfrom).
    pub const BUFFER: u32 = 0;
    /// An iovec array: `ptr`, `count` segments (readv, writev).
    pub const IOVEC: u32 = 1;
    /// A `struct user_msghdr` at `ptr` (sendmsg, recvmsg).
    pub const MSGHDR: u32 = 2;
    /// No user buffer: the kernel moves the bytes (sendfile). Only the length is reported.
    pub const NONE: u32 = 3;
    /// connect(2): the fd becomes a client socket.
    pub const CONNECT: u32 = 4;
    /// accept(2)/accept4(2): the returned fd is a server socket.
    pub const ACCEPT: u32 = 5;
    /// mmap(2) of a file, executable: a library loaded.
    pub const MMAP: u32 = 6;
}

/// A TLS library call (`SSL_read`, `SSL_write`, their `_ex` forms) between its uprobe and its
/// uretprobe, in the calling thread's slot of [`TLS_CALLS`]. A socket syscall the call makes
/// on the same thread names its socket (`fd`, `conn_id`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TlsCall {
    /// Owner of the slot; 0 when free.
    pub pid_tgid: u64,
    /// The `SSL*` object.
    pub ssl: u64,
    /// The plaintext buffer.
    pub buf: u64,
    /// `_ex` forms: the user address of the `size_t` that receives the byte count; 0 for the
    /// forms that return it.
    pub count_at: u64,
    pub start_ns: u64,
    pub conn_id: u64,
    /// -1 until a socket syscall inside the call names the socket.
    pub fd: i32,
    pub direction: u32,
}

/// TLS library calls in progress, one slot per thread (id modulo the size).
#[map]
pub static TLS_CALLS: Array<TlsCall> = Array::with_max_entries(TLS_CALL_SLOTS, 0);

/// A process's TLS object.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TlsObjectKey {
    pub pid: u32,
    pub _pad: u32,
    pub ssl: u64,
}

/// The socket a TLS object was last seen moving bytes on.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TlsSocket {
    pub conn_id: u64,
    pub fd: i32,
    pub _pad: u32,
}

/// TLS object → its socket, learnt from the socket syscalls made inside its calls: a call served
/// from bytes the library had already read (a TLS record holding two requests) makes none. LRU:
/// objects are freed without kspan seeing it; a stale entry is caught by its `conn_id`.
#[map]
pub static TLS_SOCKETS: LruHashMap<TlsObjectKey, TlsSocket> =
    LruHashMap::with_max_entries(MAX_TLS_OBJECTS, 0);

/// The tracked socket a thread last read from, for TLS objects on memory BIOs (Node.js): their
/// library reads no socket itself; the application reads the ciphertext, then calls
/// `SSL_read` on the same thread to decrypt it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LastRead {
    /// Owner of the slot.
    pub pid_tgid: u64,
    pub conn_id: u64,
    pub fd: i32,
    pub _pad: u32,
}

/// One slot per thread (id modulo the size), as [`TLS_CALLS`].
#[map]
pub static LAST_READS: Array<LastRead> = Array::with_max_entries(TLS_CALL_SLOTS, 0);

/// A thread's plaintext written to a TLS object whose socket is not known yet (memory BIOs: the
/// library encrypts into memory, the application then writes the ciphertext itself). The
/// thread's next write on a TLS socket names the socket (data.rs); the agent holds the
/// plaintext until then.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PendingWrite {
    /// Owner of the slot; 0 when free.
    pub pid_tgid: u64,
    /// The `SSL*` object.
    pub ssl: u64,
}

/// One slot per thread (id modulo the size), as [`TLS_CALLS`].
#[map]
pub static PENDING_WRITES: Array<PendingWrite> = Array::with_max_entries(TLS_CALL_SLOTS, 0);

/// Marks a connection TLS: its syscalls' ciphertext is no longer copied. A mute decided on that
/// ciphertext (no known protocol) is lifted: the plaintext gets its chance.
#[inline(always)]
pub fn mark_tls(conn: &mut ConnectionValue) {
    if conn.tls == 0 {
        conn.tls = 1;
        if conn.capture == kspan_common::CAPTURE_MUTED {
            conn.capture = kspan_common::CAPTURE_DEFAULT;
        }
    }
}

/// The calling thread's TLS library call in progress, if any.
#[inline(always)]
pub fn tls_call_of(pid_tgid: u64) -> Option<*mut TlsCall> {
    let slot = TLS_CALLS.get_ptr_mut(pid_tgid as u32 & (TLS_CALL_SLOTS - 1))?;
    if unsafe { (*slot).pid_tgid } == pid_tgid {
        Some(slot)
    } else {
        None
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct InFlight {
    /// Owner of the slot; 0 when free.
    pub pid_tgid: u64,
    pub shape: u32,
    pub direction: u32,
    pub fd: i32,
    /// The connection's capture size and tail share ([`ConnectionValue`](kspan_common::ConnectionValue)).
    pub capture: u32,
    pub tail: u32,
    pub _pad: u32,
    pub ptr: u64,
    pub count: u64,
    pub start_ns: u64,
    pub conn_id: u64,
}

/// Stash a syscall's arguments in the calling thread's slot.
#[inline(always)]
pub fn stash(in_flight: &InFlight) {
    let Some(slot) = IN_FLIGHT.get_ptr_mut(in_flight.pid_tgid as u32 & (IN_FLIGHT_SLOTS - 1))
    else {
        return;
    };
    unsafe {
        let owner = (*slot).pid_tgid;
        if owner != 0 && owner != in_flight.pid_tgid {
            count(counter::IN_FLIGHT_COLLISIONS);
        }
        *slot = *in_flight;
    }
}

/// Take the calling thread's stashed arguments, if the slot is still its own.
#[inline(always)]
pub fn unstash(pid_tgid: u64) -> Option<InFlight> {
    let slot = IN_FLIGHT.get_ptr_mut(pid_tgid as u32 & (IN_FLIGHT_SLOTS - 1))?;
    unsafe {
        if (*slot).pid_tgid != pid_tgid {
            return None;
        }
        let in_flight = *slot;
        (*slot).pid_tgid = 0;
        Some(in_flight)
    }
}

#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: no other CPU writes it, a plain add is enough.
        unsafe { *slot += 1 };
    }
}

/// False when `pid` is surely not traced (then it has no tracked connection either).
#[inline(always)]
pub fn may_be_traced(pid: u32) -> bool {
    if trace_all() {
        return true;
    }
    matches!(MAYBE_TRACED.get(pid & (TRACED_SLOTS - 1)), Some(slot) if *slot != 0)
}

const BPF_NOEXIST: u64 = 1;
const EEXIST: i32 = 17;

/// Start tracing `pid` (kernel side: exec of a selected name, fork of a traced process).
#[inline(always)]
pub fn mark_traced(pid: u32) {
    let Some(slot) = MAYBE_TRACED.get_ptr_mut(pid & (TRACED_SLOTS - 1)) else {
        return;
    };
    atomic_add(slot, 1);
    if let Err(err) = TRACED_PIDS.insert(&pid, &1, BPF_NOEXIST) {
        // Already traced (the agent or another program got there first), or the map is full:
        // the pid's count is theirs or nobody's.
        atomic_add(slot, u64::MAX);
        if err != -EEXIST {
            count(counter::TRACED_PIDS_MAP_FULL);
        }
    }
}

/// Stop tracing `pid` (its process exited).
#[inline(always)]
pub fn unmark_traced(pid: u32) {
    if TRACED_PIDS.remove(&pid).is_ok()
        && let Some(slot) = MAYBE_TRACED.get_ptr_mut(pid & (TRACED_SLOTS - 1))
    {
        atomic_add(slot, u64::MAX);
    }
}

/// `*counter += delta` (wrapping: `u64::MAX` subtracts one) as one atomic instruction whose old
/// value is not fetched: `lock *(u64 *)(r + 0) += r`, which every kernel since 4.x accepts
/// (fetching atomics came in 5.12). core's atomic types have no read-modify-write ops on the BPF
/// target, hence the intrinsic.
#[inline(always)]
pub fn atomic_add(counter: *mut u64, delta: u64) {
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            counter, delta,
        );
    }
}

#[inline(always)]
pub fn is_traced(pid: u32) -> bool {
    if !may_be_traced(pid) {
        return false;
    }
    if trace_all() {
        return pid != agent_pid();
    }
    unsafe { TRACED_PIDS.get(&pid).is_some() }
}
