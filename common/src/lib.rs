//! The contract between the eBPF programs (`ebpf/`) and the agent (`agent/`).
//!
//! Every type is `#[repr(C)]` with explicit padding fields so that both sides agree on the layout
//! byte for byte. Events travel through one ring buffer: an [`EventHeader`] followed by a body
//! whose shape depends on [`EventHeader::kind`].
#![no_std]

/// Upper bound of the bytes copied from one syscall's buffer (compile time; power of two so the
/// eBPF side can mask offsets). The runtime limit is [`Config::capture_bytes`].
pub const MAX_CAPTURE: usize = 16384;
/// Default runtime capture per syscall.
pub const DEFAULT_CAPTURE: u32 = 4096;
/// iovec-based calls (readv, writev, sendmsg, recvmsg) copy this many segments per program
/// run; a call with more continues in the next run of a tail-call chain (see ebpf/src/data.rs).
pub const MAX_IOV_SEGMENTS: usize = 8;
/// Segments an iovec call is copied from at most: the first program and 32 tail calls, the
/// kernel's limit (`MAX_TAIL_CALL_CNT` is 33). gRPC's C core gathers up to 260 per sendmsg.
pub const MAX_IOV_TOTAL: u32 = 33 * MAX_IOV_SEGMENTS as u32;
/// Index of the iovec continuation in the kernel's tail-call table.
pub const IOVEC_CONTINUE: u32 = 0;

/// Capacity of the per-connection map in the kernel: (pid, fd) of every tracked TCP socket.
pub const MAX_CONNECTIONS: u32 = 65536;
/// Capacity of the pid filter map.
pub const MAX_TRACED_PIDS: u32 = 16384;
/// Slots of the kernel's "maybe traced" pre-filter, indexed by pid modulo this (a power of two).
pub const TRACED_SLOTS: u32 = 65536;
/// Capacity of the map of executable names selected in the kernel at exec (`--exe NAME`).
pub const MAX_EXE_NAMES: u32 = 256;
/// The kernel's task command name length (TASK_COMM_LEN), NUL included.
pub const COMM_LEN: usize = 16;

/// Key of the exe-name map: the name as the kernel stores it in `comm` at exec (the file name,
/// truncated to 15 bytes, NUL padded).
pub fn comm_key(name: &str) -> [u8; COMM_LEN] {
    let mut key = [0u8; COMM_LEN];
    let bytes = name.as_bytes();
    let n = if bytes.len() < COMM_LEN {
        bytes.len()
    } else {
        COMM_LEN - 1
    };
    key[..n].copy_from_slice(&bytes[..n]);
    key
}

/// Slots of the array holding syscall arguments between enter and exit, indexed by thread id
/// modulo this (a power of two). An array slot costs no hashing and no locking, unlike a hash map
/// insert and delete per syscall; two threads in flight on the same slot are detected and counted.
pub const IN_FLIGHT_SLOTS: u32 = 65536;

/// Slots of the array holding TLS library calls (`SSL_read`, `SSL_write`, ...) between their
/// uprobe and uretprobe, indexed by thread id modulo this (a power of two), as [`IN_FLIGHT_SLOTS`].
pub const TLS_CALL_SLOTS: u32 = 16384;
/// Capacity of the kernel map from a process's TLS object (`SSL*`) to its socket.
pub const MAX_TLS_OBJECTS: u32 = 65536;

/// Scratch data records per possible CPU in the kernel: one for the program running, one for a
/// program that preempted it (kernels where syscall tracepoints may fault run their programs
/// preemptibly). A third level finds both busy and drops the record (`SCRATCH_BUSY`).
pub const SCRATCH_PER_CPU: u32 = 2;

/// What an event is. Stored as `u32` in [`EventHeader::kind`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// Bytes read from or written to a tracked TCP socket. Body: `copied_len` bytes.
    Data = 1,
    /// `connect` succeeded (or is in progress) on a TCP socket. Body: [`SocketTuple`].
    Connect = 2,
    /// `accept`/`accept4` returned a TCP socket. Body: [`SocketTuple`].
    Accept = 3,
    /// `close` of a tracked socket. No body.
    Close = 4,
    /// A process called `execve` (any process: userspace decides whether to trace it).
    /// Body: [`ExecEvent`].
    Exec = 5,
    /// A whole process exited (its main thread). No body.
    Exit = 6,
    /// A process put a TCP socket into LISTEN state. Body: [`SocketTuple`] (local side only).
    Listen = 7,
    /// A traced process mapped a file executable (a library loaded, `dlopen` included): the
    /// agent looks for TLS libraries in its maps again. No body.
    LibraryMapped = 8,
    /// A thread that wrote TLS plaintext before its socket was known (a memory BIO) now wrote on
    /// this socket (`fd`, `conn_id`): the plaintext the agent holds for the thread (`tid`) is
    /// this socket's. No body.
    TlsBound = 9,
}

impl EventKind {
    pub fn from_u32(value: u32) -> Option<Self> {
        Some(match value {
            1 => Self::Data,
            2 => Self::Connect,
            3 => Self::Accept,
            4 => Self::Close,
            5 => Self::Exec,
            6 => Self::Exit,
            7 => Self::Listen,
            8 => Self::LibraryMapped,
            9 => Self::TlsBound,
            _ => return None,
        })
    }
}

/// Direction of a [`EventKind::Data`] event, from the traced process's point of view.
pub const DIRECTION_INGRESS: u32 = 0;
pub const DIRECTION_EGRESS: u32 = 1;

/// [`EventHeader::source`] of a data event: the bytes of a socket syscall.
pub const SOURCE_SYSCALL: u32 = 0;
/// [`EventHeader::source`] of a data event: plaintext handed to or returned by a TLS library
/// call (`SSL_write`, `SSL_read`, ...) on the connection's socket; `start_ns`/`end_ns` are the
/// call's.
pub const SOURCE_TLS: u32 = 1;

/// Common prefix of every event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EventHeader {
    /// [`EventKind`] as `u32`.
    pub kind: u32,
    /// Process id (tgid).
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// File descriptor, or -1.
    pub fd: i32,
    /// Identity of the connection within (pid, fd): the kernel time at which the socket started
    /// being tracked. fd numbers are reused after close; (pid, fd, conn_id) never is.
    pub conn_id: u64,
    /// Kernel monotonic time (CLOCK_MONOTONIC, ns) at syscall entry; for reads (ingress data) and
    /// writes on accepted sockets, the exit time: no span uses their entry time, and the entry
    /// clock read is skipped.
    pub start_ns: u64,
    /// Kernel monotonic time at syscall exit.
    pub end_ns: u64,
    /// Bytes the syscall really transferred (its return value).
    pub full_len: u64,
    /// Bytes copied after this header (`<= full_len`, `<= capture_bytes`).
    pub copied_len: u32,
    /// [`DIRECTION_INGRESS`] or [`DIRECTION_EGRESS`] for data events.
    pub direction: u32,
    /// The last `tail_len` of the copied bytes are the syscall's *last* bytes, not the ones
    /// following the first `copied_len - tail_len` (connections whose protocol asks for its
    /// tail: see [`ConnectionValue::tail`]); 0 otherwise.
    pub tail_len: u32,
    /// Where a data event's bytes come from: [`SOURCE_SYSCALL`] or [`SOURCE_TLS`].
    pub source: u32,
}

pub const EVENT_HEADER_LEN: usize = core::mem::size_of::<EventHeader>();

/// Address family values as the kernel stores them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Both ends of a TCP socket as the kernel's `struct sock_common` holds them.
/// Addresses are in network byte order as raw bytes (IPv4 uses the first 4 bytes); ports are in
/// host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketTuple {
    pub family: u16,
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad: u16,
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
}

/// Body of Connect/Accept/Listen events.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SocketEvent {
    pub header: EventHeader,
    pub tuple: SocketTuple,
}

/// Bytes of the executable path an Exec event carries, NUL included: a longer path is cut and
/// the agent ignores it (a path that fills the buffer may be cut).
pub const EXEC_PATH_LEN: usize = 256;

/// Body of Exec events: the new program's name as the kernel has it (`comm`) and the path it was
/// executed by (`sched_process_exec`'s `filename`, as given to execve: maybe relative, maybe a
/// symlink), kept by the agent in case the process is gone before procfs can be read (a client
/// that lives a millisecond).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExecEvent {
    pub header: EventHeader,
    pub comm: [u8; COMM_LEN],
    /// NUL terminated; all zero when the kernel's copy failed.
    pub path: [u8; EXEC_PATH_LEN],
}

/// Value of the kernel connection map, keyed by `(pid << 32) | fd`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnectionValue {
    pub conn_id: u64,
    /// 1 when the socket came from accept(2): its writes are responses, whose entry time no span
    /// uses, so their entry skips the clock read. 0 (connect, or found in procfs): unknown.
    pub accepted: u32,
    /// Bytes to copy per syscall on this connection: [`CAPTURE_DEFAULT`] (the agent's
    /// `capture_bytes`), [`CAPTURE_MUTED`] (no event at all: a protocol kspan does not parse),
    /// or a byte count (capped at [`MAX_CAPTURE`]) chosen by the connection's protocol.
    pub capture: u32,
    /// Of the capture, how many bytes go to the syscall's last bytes when it moved more than
    /// the capture (0: a prefix only). HTTP/2 trailers follow large DATA frames.
    pub tail: u32,
    /// 1: the connection is TLS. Its syscalls move ciphertext, never copied; its protocol bytes
    /// come from the TLS library's uprobes. Set by the kernel when a syscall on the socket runs
    /// inside a TLS library call of the same thread, by the agent when it sees a TLS record.
    pub tls: u32,
}

/// Capture of HTTP/2 connections: the most the kernel copies per syscall, of which
/// [`HTTP2_CAPTURE_TAIL`] go to the syscall's last bytes when it moved more (trailers after large
/// DATA frames). Set by the kernel itself when a connection starts with the client preface (the
/// agent learns the protocol some milliseconds later: a connection's first large response would
/// be cut to the default prefix), and by the agent on detection otherwise.
pub const HTTP2_CAPTURE: u32 = MAX_CAPTURE as u32;
pub const HTTP2_CAPTURE_TAIL: u32 = 4096;
/// The first 8 bytes of the HTTP/2 client preface, `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`, as a
/// little-endian u64.
pub const HTTP2_PREFACE_START: u64 = u64::from_le_bytes(*b"PRI * HT");

/// [`ConnectionValue::capture`]: the configured capture size.
pub const CAPTURE_DEFAULT: u32 = 0;
/// [`ConnectionValue::capture`]: nothing is copied or reported but the close.
pub const CAPTURE_MUTED: u32 = u32::MAX;

pub fn connection_key(pid: u32, fd: i32) -> u64 {
    ((pid as u64) << 32) | (fd as u32 as u64)
}

/// Byte offsets of the kernel structure fields the programs walk to get from an fd to its socket
/// addresses: task_struct->files->fdt->fd[fd]->private_data (struct socket)->sk (struct sock).
/// Read from the running kernel's BTF by the agent at load time, so one eBPF object works across
/// kernel builds without CO-RE support in the Rust toolchain.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelOffsets {
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_max_fds: u32,
    pub fdtable_fd: u32,
    pub file_private_data: u32,
    pub socket_sk: u32,
    pub sock_family: u32,
    pub sock_num: u32,
    pub sock_dport: u32,
    pub sock_daddr: u32,
    pub sock_rcv_saddr: u32,
    pub sock_v6_daddr: u32,
    pub sock_v6_rcv_saddr: u32,
    pub sock_type: u32,
    pub sock_protocol: u32,
    pub _pad: u32,
}

/// Byte offsets of the tracepoint fields the programs read, from the running kernel's tracefs
/// `format` files (read by the agent at load time). Layouts differ between kernels: e.g.
/// PREEMPT_RT adds a common field that moves every other field, `task_newtask`'s `clone_flags`
/// is `unsigned long` before 7.x and `u64` after, and `sched_process_fork` moved its `child_pid`
/// in 6.13 (kspan reads `task_newtask` instead, which tells threads from processes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TracepointOffsets {
    /// `syscalls/sys_enter_*`: the first syscall argument; the others follow 8 bytes apart.
    pub syscall_args: u32,
    /// `syscalls/sys_exit_*`: the return value.
    pub syscall_ret: u32,
    /// `task/task_newtask`: `pid` of the new task, and `clone_flags` (8 bytes).
    pub newtask_pid: u32,
    pub newtask_clone_flags: u32,
    /// `sock/inet_sock_set_state` fields.
    pub sock_newstate: u32,
    pub sock_sport: u32,
    pub sock_family: u32,
    pub sock_protocol: u32,
    pub sock_saddr: u32,
    pub sock_saddr_v6: u32,
    /// `sched/sched_process_exec`: `filename`, a `__data_loc char[]` (u32: length << 16 |
    /// offset of the string from the record's start).
    pub exec_filename: u32,
}

/// The syscall tracepoint layout of every kernel seen so far (arguments at 16 + 8n, return value
/// at 16): the programs read these with direct context loads, and fall back to a helper read at
/// the offsets tracefs gave when a kernel differs.
pub const USUAL_SYSCALL_ARGS: u32 = 16;
pub const USUAL_SYSCALL_RET: u32 = 16;

/// Runtime settings written by the agent into the one-entry `CONFIG` array before attaching.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Config {
    /// 1: trace every process except `agent_pid`; 0: only pids in `TRACED_PIDS`.
    pub trace_all: u32,
    /// The agent's own pid, never traced.
    pub agent_pid: u32,
    /// Bytes copied per syscall, `<= MAX_CAPTURE`.
    pub capture_bytes: u32,
    pub _pad: u32,
    pub offsets: KernelOffsets,
}

/// Indexes of the per-CPU `COUNTERS` array.
pub mod counter {
    /// Events that did not fit into the ring buffer.
    pub const EVENTS_LOST: u32 = 0;
    /// Syscalls whose stashed arguments were overwritten by another thread sharing the in-flight
    /// slot (their bytes are lost).
    pub const IN_FLIGHT_COLLISIONS: u32 = 1;
    /// Sockets that could not be tracked (connection map full).
    pub const CONNECTIONS_MAP_FULL: u32 = 2;
    /// Failed reads of user memory (data was replaced by a shorter copy or dropped).
    pub const READ_ERRORS: u32 = 3;
    /// Failed walks from fd to socket.
    pub const SOCKET_LOOKUP_ERRORS: u32 = 4;
    /// Forked children that could not be added to the pid filter (map full).
    pub const TRACED_PIDS_MAP_FULL: u32 = 5;
    /// Data records dropped because every scratch record of the CPU was in use (programs
    /// preempted while filling them).
    pub const SCRATCH_BUSY: u32 = 6;
    /// TLS library calls whose plaintext was dropped: no socket syscall inside this call or an
    /// earlier one of the same `SSL` object named the socket (a TLS object on memory BIOs, like
    /// Node.js's), or that socket is no longer tracked.
    pub const TLS_UNBOUND: u32 = 7;
    pub const COUNT: u32 = 8;
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for ConnectionValue {}
    unsafe impl aya::Pod for KernelOffsets {}
    unsafe impl aya::Pod for TracepointOffsets {}
}
