//! Process lifecycle: exec (userspace decides whether the new image is selected), new tasks
//! (child processes of a traced process are traced from their first instruction), exit (forget
//! the process).

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, generated},
    macros::tracepoint,
    programs::TracePointContext,
};
use kspan_common::{EXEC_PATH_LEN, EventHeader, EventKind, ExecEvent, counter};

const BPF_RB_FORCE_WAKEUP: u64 = 2;

use crate::{
    data::{syscall_arg, syscall_ret},
    maps::{
        EVENTS, EXE_COMMS, InFlight, TRACED_PIDS, agent_pid, count, is_traced, mark_traced,
        may_be_traced, shape, stash, submit_flags, trace_all, tracepoint_offsets, unmark_traced,
        unstash,
    },
    socket::header,
};

/// A header-only event (no body) of `kind`, now; `fd` -1 and `conn_id` 0 when no socket is
/// concerned.
#[inline(always)]
pub(crate) fn emit(kind: EventKind, pid_tgid: u64, fd: i32, conn_id: u64) {
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(mut entry) = EVENTS.reserve::<EventHeader>(0) {
        entry.write(header(kind, pid_tgid, fd, conn_id, now, now));
        entry.submit(submit_flags());
    } else {
        count(counter::EVENTS_LOST);
    }
}

#[tracepoint]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let pid = (pid_tgid >> 32) as u32;
    if pid == agent_pid() {
        return 0;
    }
    // comm already holds the new program's name here. A match is traced at once; userspace then
    // confirms with the full executable path (and untraces on a mismatch).
    let comm = bpf_get_current_comm().unwrap_or([0; 16]);
    if !trace_all() && unsafe { EXE_COMMS.get(&comm) }.is_some() {
        mark_traced(pid);
    }
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(mut entry) = EVENTS.reserve::<ExecEvent>(0) {
        // Field by field into the reserved record (the path would take half the stack).
        let event = entry.as_mut_ptr();
        unsafe {
            (*event).header = header(EventKind::Exec, pid_tgid, -1, 0, now, now);
            (*event).comm = comm;
            (*event).path[0] = 0;
        }
        // The path the program was executed by, for a process gone before the agent reads
        // /proc/PID/exe. `filename` is a __data_loc: (length << 16) | offset in the record.
        let at = tracepoint_offsets().exec_filename as usize;
        if let Ok(location) = unsafe { ctx.read_at::<u32>(at) } {
            let source = unsafe { (ctx.as_ptr() as *const u8).add((location & 0xffff) as usize) };
            let copied = unsafe {
                generated::bpf_probe_read_kernel_str(
                    (*event).path.as_mut_ptr().cast(),
                    EXEC_PATH_LEN as u32,
                    source.cast(),
                )
            };
            if copied < 0 {
                unsafe { (*event).path[0] = 0 };
            }
        }
        // Wake the agent now (execs are rare): it reads the new program's resource from procfs
        // while a short-lived client still exists.
        entry.submit(BPF_RB_FORCE_WAKEUP);
    } else {
        count(counter::EVENTS_LOST);
    }
    0
}

/// `clone(2)`'s flag for a new thread of the same process.
const CLONE_THREAD: u64 = 0x0001_0000;

/// A new task: a child process of a traced process is traced from its first instruction. A new
/// thread is not a new process (it shares the tgid its events are traced by), so it takes no
/// TRACED_PIDS entry; `sched_process_fork` cannot tell the two apart, `task_newtask` carries the
/// clone flags. It runs in the parent, before the child can run.
#[tracepoint]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    if trace_all() {
        return 0;
    }
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !may_be_traced(parent) || unsafe { TRACED_PIDS.get(&parent) }.is_none() {
        return 0;
    }
    let offsets = tracepoint_offsets();
    let flags: u64 = unsafe { ctx.read_at(offsets.newtask_clone_flags as usize) }.unwrap_or(0);
    if flags & CLONE_THREAD != 0 {
        return 0;
    }
    let child: i32 = unsafe { ctx.read_at(offsets.newtask_pid as usize) }.unwrap_or(0);
    if child > 0 {
        mark_traced(child as u32);
    }
    0
}

#[tracepoint]
pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let pid = (pid_tgid >> 32) as u32;
    let tid = pid_tgid as u32;
    // The main thread's exit stands for the process's exit.
    if tid != pid {
        return 0;
    }
    let traced = is_traced(pid);
    if !trace_all() {
        unmark_traced(pid);
    }
    if traced {
        emit(EventKind::Exit, pid_tgid, -1, 0);
    }
    0
}

/// mmap(2)'s `prot` bit for executable pages.
const PROT_EXEC: u64 = 4;

/// A traced process mapping a file executable is loading a library (at start, or by `dlopen`
/// later): the agent looks for TLS libraries in its maps once the mapping exists, at the exit.
/// Anonymous and non-executable mappings (most of them: allocations, data segments) cost two
/// argument loads.
#[tracepoint]
pub fn sys_enter_mmap(ctx: TracePointContext) -> u32 {
    let prot = syscall_arg(&ctx, 2);
    let fd = syscall_arg(&ctx, 4) as i64 as i32;
    if prot & PROT_EXEC == 0 || fd < 0 {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    if !is_traced((pid_tgid >> 32) as u32) {
        return 0;
    }
    stash(&InFlight {
        pid_tgid,
        shape: shape::MMAP,
        direction: 0,
        fd,
        capture: 0,
        tail: 0,
        _pad: 0,
        ptr: 0,
        count: 0,
        start_ns: 0,
        conn_id: 0,
    });
    0
}

#[tracepoint]
pub fn sys_exit_mmap(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // Every mmap of the host comes here: the pre-filter first, as the data exits do.
    if !may_be_traced((pid_tgid >> 32) as u32) {
        return 0;
    }
    let Some(in_flight) = unstash(pid_tgid) else {
        return 0;
    };
    // An error is -4095..-1; an address is anything else.
    let ret = syscall_ret(&ctx);
    if in_flight.shape == shape::MMAP && !(-4095..0).contains(&ret) {
        emit(EventKind::LibraryMapped, pid_tgid, -1, 0);
    }
    0
}
