//! The kernel stage: checks the host, loads and attaches the eBPF programs, and exposes the
//! ring buffer and the control maps (pid filter, tracked connections, drop counters).

pub mod btf;
pub mod census;
pub mod events;
pub mod stack;
pub mod tls;
pub mod tracefs;

use std::{
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, ProgramArray, RingBuf},
    programs::{Program, TracePoint, trace_point::TracePointLinkId},
};
use kspan_common::{
    CAPTURE_DEFAULT, CAPTURE_MUTED, COMM_LEN, ConnectionValue, KernelOffsets, MAX_CAPTURE,
    TRACED_SLOTS, TracepointOffsets, comm_key, connection_key, counter,
};

/// The eBPF object built by build.rs from ebpf/.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kspan-ebpf"));

pub const TRACEFS: &str = "/sys/kernel/tracing";

/// (program name in ebpf/, tracepoint category, tracepoint name). The vectored exits share a
/// program per direction (readv + recvmsg, writev + sendmsg): the kernel verifies each once
/// (ebpf/src/data.rs says why the others stay one per syscall).
const TRACEPOINTS: &[(&str, &str, &str)] = &[
    ("sys_enter_read", "syscalls", "sys_enter_read"),
    ("sys_exit_read", "syscalls", "sys_exit_read"),
    ("sys_enter_write", "syscalls", "sys_enter_write"),
    ("sys_exit_write", "syscalls", "sys_exit_write"),
    ("sys_enter_readv", "syscalls", "sys_enter_readv"),
    ("sys_exit_vectored_in", "syscalls", "sys_exit_readv"),
    ("sys_enter_writev", "syscalls", "sys_enter_writev"),
    ("sys_exit_vectored_out", "syscalls", "sys_exit_writev"),
    ("sys_enter_sendto", "syscalls", "sys_enter_sendto"),
    ("sys_exit_sendto", "syscalls", "sys_exit_sendto"),
    ("sys_enter_recvfrom", "syscalls", "sys_enter_recvfrom"),
    ("sys_exit_recvfrom", "syscalls", "sys_exit_recvfrom"),
    ("sys_enter_sendmsg", "syscalls", "sys_enter_sendmsg"),
    ("sys_exit_vectored_out", "syscalls", "sys_exit_sendmsg"),
    ("sys_enter_recvmsg", "syscalls", "sys_enter_recvmsg"),
    ("sys_exit_vectored_in", "syscalls", "sys_exit_recvmsg"),
    ("sys_enter_sendfile64", "syscalls", "sys_enter_sendfile64"),
    ("sys_exit_sendfile64", "syscalls", "sys_exit_sendfile64"),
    ("sys_enter_connect", "syscalls", "sys_enter_connect"),
    ("sys_exit_connect", "syscalls", "sys_exit_connect"),
    ("sys_enter_accept", "syscalls", "sys_enter_accept"),
    ("sys_exit_accept", "syscalls", "sys_exit_accept"),
    ("sys_enter_accept4", "syscalls", "sys_enter_accept4"),
    ("sys_exit_accept4", "syscalls", "sys_exit_accept4"),
    ("sys_enter_close", "syscalls", "sys_enter_close"),
    ("inet_sock_set_state", "sock", "inet_sock_set_state"),
    ("sched_process_exec", "sched", "sched_process_exec"),
    ("task_newtask", "task", "task_newtask"),
    ("sched_process_exit", "sched", "sched_process_exit"),
    ("sys_enter_mmap", "syscalls", "sys_enter_mmap"),
    ("sys_exit_mmap", "syscalls", "sys_exit_mmap"),
];

#[derive(Clone, Debug)]
pub struct ProbeOptions {
    /// Trace every process except the agent (no selector given).
    pub trace_all: bool,
    /// Bytes copied per syscall.
    pub capture_bytes: u32,
    /// Ring buffer size in bytes (power of two, multiple of the page size).
    pub ring_bytes: u32,
    /// Plain executable names (`--exe curl`): matched in the kernel at exec.
    pub exe_names: Vec<String>,
    /// Attach do-nothing programs to every tracepoint and TLS uprobe instead of the real ones
    /// (`--bench-floor`: the benchmark's measure of what the hooks cost by themselves).
    pub floor: bool,
}

/// What the kernel counted, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounters {
    pub events_lost: u64,
    pub in_flight_collisions: u64,
    pub scratch_busy: u64,
    pub connections_map_full: u64,
    pub read_errors: u64,
    pub socket_lookup_errors: u64,
    pub traced_pids_map_full: u64,
    /// Program runs the kernel skipped (see `program_misses`).
    pub program_misses: u64,
    /// TLS library calls whose socket was unknown (`counter::TLS_UNBOUND`).
    pub tls_unbound: u64,
}

/// The part of the kernel stage the pipeline drives: which pids to trace, which sockets are
/// tracked. A trait so the pipeline can be tested and benchmarked without a kernel.
pub trait KernelControl {
    fn trace_pid(&mut self, pid: u32);
    fn untrace_pid(&mut self, pid: u32);
    /// Track a socket found in procfs as `conn_id`, unless the kernel already tracks it (it
    /// saw the connect or accept, whose event is still queued): then its identity stays.
    /// Returns the identity in effect, which the socket's events will carry.
    fn track_connection(&mut self, pid: u32, fd: i32, conn_id: u64) -> u64;
    /// The last three act on the socket `conn_id` only: the agent decides some milliseconds
    /// after the kernel saw the bytes, when the fd may already hold a newer socket (a server
    /// closing and accepting quickly), which must keep its own entry and capture.
    fn forget_connection(&mut self, pid: u32, fd: i32, conn_id: u64);
    /// Copy up to `bytes` per syscall on this connection (its protocol needs more or less than
    /// the default).
    fn set_capture(&mut self, pid: u32, fd: i32, conn_id: u64, bytes: u32, tail: u32);
    /// Stop copying and reporting this connection's bytes; its close is still reported.
    fn mute_connection(&mut self, pid: u32, fd: i32, conn_id: u64);
    /// The connection is TLS: its syscalls' ciphertext is no longer copied (its plaintext
    /// comes from the TLS library's uprobes, if kspan sees into that library).
    fn set_tls(&mut self, pid: u32, fd: i32, conn_id: u64);
}

const BPF_NOEXIST: u64 = 1;

/// The kernel's MAYBE_TRACED array (one count of traced pids per slot), mapped into the agent
/// so that both sides change the counts with atomic adds.
struct SlotCounts {
    slots: std::ptr::NonNull<AtomicU64>,
    len: usize,
    _map: MapData,
}

impl SlotCounts {
    fn map(map: aya::maps::Map) -> Result<Self> {
        let aya::maps::Map::Array(data) = map else {
            bail!("map MAYBE_TRACED is not an array");
        };
        let len = TRACED_SLOTS as usize;
        let bytes = len * std::mem::size_of::<u64>();
        // SAFETY: a shared read-write mapping of the map's memory (created BPF_F_MMAPABLE,
        // exactly `bytes` long, page aligned); unmapped in Drop, while `_map` keeps the map.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .context("cannot map the kernel's MAYBE_TRACED array into memory");
        }
        let slots = std::ptr::NonNull::new(address.cast::<AtomicU64>())
            .context("mmap returned a null address")?;
        Ok(SlotCounts {
            slots,
            len,
            _map: data,
        })
    }

    /// Every slot to 0: the programs return at their first check for every pid.
    fn zero_all(&self) {
        for index in 0..self.len {
            // SAFETY: as in `add`.
            let slot = unsafe { &*self.slots.as_ptr().add(index) };
            slot.store(0, Ordering::Relaxed);
        }
    }

    fn add(&self, pid: u32, delta: i64) {
        let index = pid as usize % self.len;
        // SAFETY: index < len; the memory is mapped for the life of self, and the kernel only
        // ever changes it with atomic adds too.
        let slot = unsafe { &*self.slots.as_ptr().add(index) };
        slot.fetch_add(delta as u64, Ordering::Relaxed);
    }
}

// SAFETY: the mapping is plain shared memory changed only through atomics; no thread-affine state.
unsafe impl Send for SlotCounts {}

impl Drop for SlotCounts {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, of this length.
        unsafe {
            libc::munmap(
                self.slots.as_ptr().cast(),
                self.len * std::mem::size_of::<u64>(),
            )
        };
    }
}

/// Control maps of the loaded programs.
pub struct KernelMaps {
    traced_pids: HashMap<MapData, u32, u8>,
    maybe_traced: SlotCounts,
    connections: HashMap<MapData, u64, ConnectionValue>,
    counters: PerCpuArray<MapData, u64>,
    /// Every loaded program by name, for the runs the kernel skipped.
    programs: Vec<(String, OwnedFd)>,
}

impl KernelMaps {
    /// Stop: the programs stop copying for every selected process (the pre-filter says none
    /// may be traced), before they are detached.
    pub fn silence(&self) {
        self.maybe_traced.zero_all();
    }
}

impl KernelControl for KernelMaps {
    fn trace_pid(&mut self, pid: u32) {
        // The pre-filter count first: a pid in the exact map always has a non-zero slot (see
        // MAYBE_TRACED in ebpf/src/maps.rs; the kernel does the same on fork and exec).
        self.maybe_traced.add(pid, 1);
        match self.traced_pids.insert(pid, 1, BPF_NOEXIST) {
            Ok(()) => {}
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                self.maybe_traced.add(pid, -1);
            }
            Err(e) => {
                self.maybe_traced.add(pid, -1);
                log::warn!("cannot add pid {pid} to the kernel pid filter: {e}");
            }
        }
    }

    fn untrace_pid(&mut self, pid: u32) {
        if self.traced_pids.remove(&pid).is_ok() {
            self.maybe_traced.add(pid, -1);
        }
    }

    fn track_connection(&mut self, pid: u32, fd: i32, conn_id: u64) -> u64 {
        // Role unknown (found in procfs): every write takes its entry time.
        let value = ConnectionValue {
            conn_id,
            accepted: 0,
            capture: CAPTURE_DEFAULT,
            tail: 0,
            tls: 0,
        };
        let key = connection_key(pid, fd);
        // Never over an entry the kernel made: a process connecting before the agent reads its
        // exec (or its listen) has its socket in procfs *and* a Connect event queued, whose
        // data events carry the kernel's identity; replacing it split the connection in two
        // halves, the second unknown and muted (kcat's consumer in a loaded CI).
        match self.connections.insert(key, value, BPF_NOEXIST) {
            Ok(()) => conn_id,
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                match self.connections.get(&key, 0) {
                    Ok(existing) => existing.conn_id,
                    // Gone in between (closed): nothing of it will be reported.
                    Err(_) => conn_id,
                }
            }
            Err(e) => {
                log::warn!("cannot track socket fd {fd} of pid {pid}: {e}");
                conn_id
            }
        }
    }

    fn forget_connection(&mut self, pid: u32, fd: i32, conn_id: u64) {
        let key = connection_key(pid, fd);
        if self
            .connections
            .get(&key, 0)
            .is_ok_and(|value| value.conn_id == conn_id)
        {
            let _ = self.connections.remove(&key);
        }
    }

    fn set_capture(&mut self, pid: u32, fd: i32, conn_id: u64, bytes: u32, tail: u32) {
        self.update_capture(pid, fd, conn_id, bytes, tail);
    }

    fn mute_connection(&mut self, pid: u32, fd: i32, conn_id: u64) {
        self.update_capture(pid, fd, conn_id, CAPTURE_MUTED, 0);
    }

    fn set_tls(&mut self, pid: u32, fd: i32, conn_id: u64) {
        self.update(pid, fd, conn_id, |value| value.tls = 1);
    }
}

impl KernelMaps {
    /// Rewrites the connection's entry with a new capture size, only if it is still there
    /// (BPF_EXIST): a connection that closed meanwhile is not brought back, and a newer socket
    /// on the same fd (another `conn_id`) is left as it is.
    fn update_capture(&mut self, pid: u32, fd: i32, conn_id: u64, capture: u32, tail: u32) {
        self.update(pid, fd, conn_id, |value| {
            value.capture = capture;
            value.tail = tail;
        });
    }

    /// Changes the connection's entry, only if it is still there (BPF_EXIST) and still this
    /// socket.
    fn update(
        &mut self,
        pid: u32,
        fd: i32,
        conn_id: u64,
        change: impl FnOnce(&mut ConnectionValue),
    ) {
        let key = connection_key(pid, fd);
        let Ok(mut value) = self.connections.get(&key, 0) else {
            return;
        };
        if value.conn_id != conn_id {
            return;
        }
        change(&mut value);
        // BPF_EXIST: update an existing element only.
        let _ = self.connections.insert(key, value, 2);
    }

    /// The programs the kernel skipped runs of, with their counts (for the stop report).
    pub fn skipped_programs(&self) -> Vec<(&str, u64)> {
        self.programs
            .iter()
            .map(|(name, fd)| (name.as_str(), program_misses(fd.as_fd())))
            .filter(|(_, misses)| *misses > 0)
            .collect()
    }

    pub fn counters(&self) -> KernelCounters {
        let sum = |index: u32| -> u64 {
            self.counters
                .get(&index, 0)
                .map(|values| values.iter().sum())
                .unwrap_or(0)
        };
        KernelCounters {
            events_lost: sum(counter::EVENTS_LOST),
            in_flight_collisions: sum(counter::IN_FLIGHT_COLLISIONS),
            scratch_busy: sum(counter::SCRATCH_BUSY),
            connections_map_full: sum(counter::CONNECTIONS_MAP_FULL),
            read_errors: sum(counter::READ_ERRORS),
            socket_lookup_errors: sum(counter::SOCKET_LOOKUP_ERRORS),
            traced_pids_map_full: sum(counter::TRACED_PIDS_MAP_FULL),
            tls_unbound: sum(counter::TLS_UNBOUND),
            program_misses: self
                .programs
                .iter()
                .map(|(_, fd)| program_misses(fd.as_fd()))
                .sum(),
        }
    }
}

pub const TRACEPOINT_COUNT: usize = TRACEPOINTS.len();

/// Programs and their attachments; `detach` ends them.
pub struct Attached {
    ebpf: Ebpf,
    links: Vec<(&'static str, TracePointLinkId)>,
    /// The TLS libraries' uprobes, attached as selected processes are found to use them.
    tls: tls::TlsProbes,
    /// The tail-call table: the kernel empties it when its last user-space handle closes.
    _tail_calls: ProgramArray<MapData>,
}

impl Attached {
    /// Looks for TLS libraries in `pid`'s maps and attaches to the new ones (see `tls`).
    pub fn scan_tls_libraries(&mut self, pid: u32) -> Option<tls::Scan> {
        self.tls.scan(&mut self.ebpf, pid)
    }

    /// See [`tls::TlsProbes::attach_host_libraries`]. Returns the files attached.
    pub fn attach_host_tls_libraries(&mut self) -> u64 {
        self.tls.attach_host_libraries(&mut self.ebpf)
    }

    /// Detaches every program. Each detach waits for an RCU grace period in the kernel (tens of
    /// milliseconds; a uprobe's ~250 ms here), so the links are dropped in parallel: 29
    /// tracepoints in sequence took seconds, a library's 8 uprobes 2 s.
    pub fn detach(mut self) {
        let mut links: Vec<Box<dyn Send>> = Vec::with_capacity(self.links.len());
        for (program, id) in self.links.drain(..) {
            let taken = self
                .ebpf
                .program_mut(program)
                .and_then(|p| <&mut TracePoint>::try_from(p).ok())
                .map(|tp| tp.take_link(id));
            if let Some(Ok(link)) = taken {
                links.push(Box::new(link));
            }
        }
        for link in tls::take_links(&mut self.ebpf, std::mem::take(&mut self.tls.links)) {
            links.push(Box::new(link));
        }
        let threads: Vec<_> = links
            .into_iter()
            .map(|link| std::thread::spawn(move || drop(link)))
            .collect();
        for thread in threads {
            let _ = thread.join();
        }
        drop(self.ebpf);
    }
}

/// Loaded and attached programs, the ring buffer, and the control maps.
pub struct Probes {
    pub attached: Attached,
    pub ring: RingBuf<MapData>,
    pub maps: KernelMaps,
    pub census: census::MapCensus,
}

impl Probes {
    pub fn load(options: &ProbeOptions) -> Result<Self> {
        let started = std::time::Instant::now();
        check_host()?;
        let tracepoint_offsets = read_tracepoint_offsets()?;
        let offsets: KernelOffsets = btf::Btf::from_sys_fs()?.kernel_offsets()?;
        log::debug!("kernel BTF read in {:?}", started.elapsed());
        let trace_all: u32 = options.trace_all.into();
        let agent_pid: u32 = std::process::id();
        let capture: u32 = options.capture_bytes.clamp(1, MAX_CAPTURE as u32);
        // Wake the agent early enough that the ring never fills between its polls.
        let wakeup_bytes: u64 = u64::from(options.ring_bytes / 8);
        let mut ebpf = EbpfLoader::new()
            // The object has no CO-RE relocations (offsets come from our own BTF reader), so
            // aya need not parse the kernel's BTF a second time.
            .btf(None)
            .override_global("TRACE_ALL", &trace_all, true)
            .override_global("AGENT_PID", &agent_pid, true)
            .override_global("CAPTURE_BYTES", &capture, true)
            .override_global("KERNEL_OFFSETS", &offsets, true)
            .override_global("TRACEPOINT_OFFSETS", &tracepoint_offsets, true)
            .override_global("WAKEUP_BYTES", &wakeup_bytes, true)
            .map_max_entries("EVENTS", options.ring_bytes)
            .map_max_entries("SCRATCH", scratch_entries()?)
            .load(EBPF_OBJECT)
            .map_err(|e| permission_hint(anyhow!(e).context("cannot load the eBPF object")))?;

        log::debug!("maps created after {:?}", started.elapsed());
        load_programs(&mut ebpf)?;
        log::debug!(
            "BTF read, maps created, programs verified in {:?}",
            started.elapsed()
        );
        let tail_calls = tail_calls(&mut ebpf)?;
        let mut links = Vec::with_capacity(TRACEPOINTS.len());
        for (program, category, name) in TRACEPOINTS {
            let program = if options.floor { "floor" } else { *program };
            links.push((program, attach(&mut ebpf, program, category, name)?));
        }

        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .with_context(|| format!("map {name} missing from the eBPF object"))
        };
        let mut exe_comms: HashMap<MapData, [u8; COMM_LEN], u8> =
            HashMap::try_from(take(&mut ebpf, "EXE_COMMS")?)?;
        for name in &options.exe_names {
            exe_comms
                .insert(comm_key(name), 1, 0)
                .with_context(|| format!("cannot add --exe {name} to the kernel's exe filter"))?;
        }
        let ring = RingBuf::try_from(take(&mut ebpf, "EVENTS")?)?;
        let programs = ebpf
            .programs()
            .map(|(name, program)| {
                let fd = program
                    .fd()
                    .with_context(|| format!("program {name} not loaded"))?;
                Ok((name.to_string(), fd.as_fd().try_clone_to_owned()?))
            })
            .collect::<Result<Vec<_>>>()?;
        // The census thread's own handles on the maps it counts.
        let handle = |map: &aya::maps::Map| -> Result<OwnedFd> {
            let data = match map {
                aya::maps::Map::HashMap(data)
                | aya::maps::Map::LruHashMap(data)
                | aya::maps::Map::Array(data) => data,
                _ => bail!("unexpected map type"),
            };
            Ok(data.fd().as_fd().try_clone_to_owned()?)
        };
        let traced_pids = take(&mut ebpf, "TRACED_PIDS")?;
        let maybe_traced = take(&mut ebpf, "MAYBE_TRACED")?;
        let connections = take(&mut ebpf, "CONNECTIONS")?;
        let census = census::MapCensus::new(
            handle(&connections)?,
            handle(&traced_pids)?,
            &handle(&maybe_traced)?,
        )
        .context("cannot map the kernel's MAYBE_TRACED array into memory")?;
        let maps = KernelMaps {
            programs,
            traced_pids: HashMap::try_from(traced_pids)?,
            maybe_traced: SlotCounts::map(maybe_traced)?,
            connections: HashMap::try_from(connections)?,
            counters: PerCpuArray::try_from(take(&mut ebpf, "COUNTERS")?)?,
        };
        Ok(Probes {
            attached: Attached {
                ebpf,
                links,
                tls: tls::TlsProbes::new(options.floor),
                _tail_calls: tail_calls,
            },
            ring,
            maps,
            census,
        })
    }
}

/// How many runs of a program the kernel skipped because a BPF program was already running on
/// that CPU: `bpf_prog_info.recursion_misses` (Linux 5.12+; 0 before). Where syscall
/// tracepoint programs run preemptibly (7.2 here), a task preempted inside one of kspan's
/// programs makes that program skip for every other task on its CPU until it resumes: those
/// syscalls are lost in the kernel, before kspan sees them, and this is the only count of them.
fn program_misses(fd: BorrowedFd<'_>) -> u64 {
    // SAFETY: plain-data kernel struct; all zeroes is its empty value.
    let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
    // `union bpf_attr`'s `info` member for BPF_OBJ_GET_INFO_BY_FD.
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: (&raw mut info) as u64,
    };
    // SAFETY: `attr` points at `info`, which outlives the call; the kernel writes at most
    // `info_len` bytes into it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            aya_obj::generated::bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_long,
            &raw mut attr,
            std::mem::size_of::<InfoAttr>(),
        )
    };
    if ret == 0 { info.recursion_misses } else { 0 }
}

/// Wait until the ring buffer has data or `timeout` passes.
pub fn wait_for_events(ring: &RingBuf<MapData>, timeout: Duration) {
    let mut fds = [libc::pollfd {
        fd: ring.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: one valid pollfd; EINTR (a signal) just ends the wait early.
    unsafe { libc::poll(fds.as_mut_ptr(), 1, timeout.as_millis() as i32) };
}

/// The tail-call table filled: an iovec copy of more segments than one program run copies
/// continues in `iovec_continue` (loaded, never attached).
fn tail_calls(ebpf: &mut Ebpf) -> Result<ProgramArray<MapData>> {
    let map = ebpf
        .take_map("TAIL_CALLS")
        .context("map TAIL_CALLS missing from the eBPF object")?;
    let mut tail_calls = ProgramArray::try_from(map)?;
    let program = ebpf
        .program("iovec_continue")
        .context("program iovec_continue missing from the eBPF object")?;
    let fd = program.fd().context("program iovec_continue not loaded")?;
    tail_calls
        .set(kspan_common::IOVEC_CONTINUE, fd, 0)
        .context("cannot fill the tail-call table")?;
    Ok(tail_calls)
}

/// Verify and load every program, on all CPUs: the verifier runs in the loading thread, and its
/// work is most of kspan's start-up time on a busy node (seconds under emulation).
fn load_programs(ebpf: &mut Ebpf) -> Result<()> {
    let programs: Vec<(&str, &mut Program)> = ebpf.programs_mut().collect();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, programs.len().max(1));
    let queue = std::sync::Mutex::new(programs.into_iter());
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    loop {
                        let next = queue.lock().unwrap_or_else(|p| p.into_inner()).next();
                        let Some((name, program)) = next else {
                            return Ok(());
                        };
                        load_program(name, program)?;
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|worker| worker.join().expect("a program-loading thread panicked"))
    })
}

fn load_program(name: &str, program: &mut Program) -> Result<()> {
    let started = std::time::Instant::now();
    let loaded = match program {
        Program::TracePoint(tracepoint) => tracepoint.load(),
        // The TLS library probes (attached per library file later, see `tls`).
        Program::UProbe(uprobe) => uprobe.load(),
        _ => bail!("program {name} is of a type kspan does not load"),
    };
    loaded.map_err(|e| {
        // The verifier's log is already part of a LoadError's message.
        permission_hint(anyhow!(
            "cannot load program {name} into Linux {}: {e}",
            kernel_release()
        ))
    })?;
    if log::log_enabled!(log::Level::Debug) {
        verifier_report(name, program, started.elapsed());
    }
    Ok(())
}

/// One line per program for docs/architecture.md's kernel table: what the verifier did with it
/// on this kernel. Kernels before 5.16 do not report the instructions processed.
fn verifier_report(name: &str, program: &Program, took: Duration) {
    static STACK: std::sync::OnceLock<std::collections::HashMap<String, u32>> =
        std::sync::OnceLock::new();
    let stack = STACK.get_or_init(|| stack::stack_depths(EBPF_OBJECT));
    let info = program.info().ok();
    let processed = info
        .as_ref()
        .and_then(|i| i.verified_instruction_count())
        .map_or("-".to_string(), |n| n.to_string());
    let translated = info
        .as_ref()
        .and_then(|i| i.size_translated())
        .map_or("-".to_string(), |bytes| (bytes / 8).to_string());
    log::debug!(
        "verifier: {name}: Linux {}: {processed} instructions processed, {translated} after \
         rewriting, stack {} bytes, verified in {took:.0?}",
        kernel_release(),
        stack.get(name).copied().unwrap_or(0),
    );
}

/// The running kernel's release (`uname -r`), for error messages.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "(unknown release)".into(), |r| r.trim().to_string())
}

fn attach(ebpf: &mut Ebpf, program: &str, category: &str, name: &str) -> Result<TracePointLinkId> {
    let tracepoint: &mut TracePoint = ebpf
        .program_mut(program)
        .with_context(|| format!("program {program} missing from the eBPF object"))?
        .try_into()?;
    tracepoint.attach(category, name).map_err(|e| {
        let denied = matches!(
            &e,
            aya::programs::ProgramError::SyscallError(call)
                if matches!(call.io_error.raw_os_error(), Some(libc::EPERM | libc::EACCES))
        );
        if denied {
            // perf_event_open: CAP_PERFMON is enough upstream, but with
            // kernel.perf_event_paranoid above 2 (Debian's default is 3) Debian's kernels want
            // CAP_SYS_ADMIN (the DaemonSet's capabilities lack it by default).
            let paranoid: Option<i32> =
                std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
                    .ok()
                    .and_then(|v| v.trim().parse().ok());
            match paranoid {
                Some(level) if level > 2 => anyhow!(
                    "cannot attach to tracepoint {category}/{name}: {e}; perf_event_open was \
                     refused: with kernel.perf_event_paranoid={level} (Debian's default) it \
                     needs CAP_SYS_ADMIN besides CAP_PERFMON: set `sysctl \
                     kernel.perf_event_paranoid=2` on this host, or grant CAP_SYS_ADMIN"
                ),
                _ => anyhow!(
                    "cannot attach to tracepoint {category}/{name}: {e}; perf_event_open was \
                     refused: kspan needs CAP_PERFMON (or root)"
                ),
            }
        } else {
            anyhow!(
                "cannot attach to tracepoint {category}/{name}: {e}; check that \
                 {TRACEFS}/events/{category}/{name} exists"
            )
        }
    })
}

fn permission_hint(error: anyhow::Error) -> anyhow::Error {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        error.context(
            "kspan needs root (or CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN): run it with sudo",
        )
    } else {
        error
    }
}

/// Fail early, saying what to do, when the host lacks what the probes need.
fn check_host() -> Result<()> {
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!(
            "/sys/kernel/btf/vmlinux is missing: kspan needs a kernel with BTF \
             (CONFIG_DEBUG_INFO_BTF=y, standard on current distribution kernels)"
        );
    }
    let events = Path::new(TRACEFS).join("events");
    if !events.join("syscalls").exists() {
        mount_tracefs()?;
    }
    Ok(())
}

pub fn mount_tracefs() -> Result<()> {
    log::info!("tracefs is not mounted; mounting it at {TRACEFS}");
    let source = c"nodev";
    let target = c"/sys/kernel/tracing";
    let fstype = c"tracefs";
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 || !Path::new(TRACEFS).join("events/syscalls").exists() {
        let error = std::io::Error::last_os_error();
        bail!(
            "tracefs is not mounted and mounting it failed ({error}): run \
             `mount -t tracefs nodev {TRACEFS}` as root (the kernel also needs \
             CONFIG_FTRACE_SYSCALLS for syscall tracepoints)"
        );
    }
    Ok(())
}

/// The syscall tracepoints the programs attach to (`sys_enter_*`, `sys_exit_*`).
pub fn syscall_tracepoints() -> impl Iterator<Item = &'static str> {
    TRACEPOINTS
        .iter()
        .filter(|(_, category, _)| *category == "syscalls")
        .map(|(_, _, name)| *name)
}

/// The offsets of the tracepoint fields the programs read, from this kernel's tracefs.
pub fn read_tracepoint_offsets() -> Result<TracepointOffsets> {
    let syscalls: Vec<&str> = syscall_tracepoints().collect();
    let read = |category: &str, name: &str| -> Result<String> {
        let path = format!("{TRACEFS}/events/{category}/{name}/format");
        std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {path}: kspan needs the tracepoint {category}/{name} \
                 (syscall tracepoints need CONFIG_FTRACE_SYSCALLS)"
            )
        })
    };
    tracefs::tracepoint_offsets(&syscalls, &read).with_context(|| {
        format!(
            "kspan does not support the tracepoint layout of Linux {}",
            kernel_release()
        )
    })
}

/// `SCRATCH_PER_CPU` scratch data records per possible CPU (the eBPF side indexes them by CPU
/// id; possible CPU ids are 0..n).
fn scratch_entries() -> Result<u32> {
    let cpus = aya::util::nr_cpus()
        .map_err(|(path, e)| anyhow!("cannot read {path}: {e}"))
        .context("cannot size the per-CPU scratch records")?;
    Ok(cpus as u32 * kspan_common::SCRATCH_PER_CPU)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The syscalls of aarch64 (and every architecture using the generic table), as the uapi
    /// header of Debian's arm64 cross C library lists them (`cargo xtask setup` installs it).
    const AARCH64_SYSCALL_TABLE: &str = "/usr/aarch64-linux-gnu/include/asm-generic/unistd.h";

    /// Every syscall tracepoint kspan attaches to exists on aarch64: a syscall tracepoint is
    /// named after its `SYSCALL_DEFINE`, the `sys_*` name the generic table gives (`sendfile`
    /// is `sys_sendfile64` there, as on x86_64).
    #[test]
    fn every_syscall_tracepoint_exists_on_aarch64() {
        let table = std::fs::read_to_string(AARCH64_SYSCALL_TABLE).unwrap_or_else(|e| {
            panic!(
                "cannot read {AARCH64_SYSCALL_TABLE} ({e}): install Debian's \
                 libc6-dev-arm64-cross (`cargo xtask setup`)"
            )
        });
        // `__SYSCALL(__NR_read, sys_read)`, `__SC_COMP(__NR_readv, sys_readv, ...)`; the
        // 64-bit name is `__SC_3264`'s last (`__SC_3264(__NR3264_mmap, sys_mmap2, sys_mmap)`).
        let defined: std::collections::HashSet<&str> = table
            .lines()
            .filter(|l| l.starts_with("__SYSCALL(") || l.starts_with("__SC_"))
            .filter_map(|l| {
                let mut names = l.split(',');
                if l.starts_with("__SC_3264(") {
                    names.next_back()
                } else {
                    names.nth(1)
                }
            })
            .map(|name| name.trim().trim_end_matches(')').trim())
            .collect();
        assert!(
            defined.contains("sys_read"),
            "an unexpected header: {table:.200}"
        );
        for tracepoint in syscall_tracepoints() {
            let syscall = tracepoint
                .strip_prefix("sys_enter_")
                .or_else(|| tracepoint.strip_prefix("sys_exit_"))
                .expect("syscall tracepoints are sys_enter_* or sys_exit_*");
            assert!(
                defined.contains(format!("sys_{syscall}").as_str()),
                "{tracepoint}: no sys_{syscall} in aarch64's syscall table"
            );
        }
    }
}
