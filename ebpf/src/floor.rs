//! The floor of the hooks, for `cargo xtask bench`: programs that return at once, attached by
//! `kspan --bench-floor` to every tracepoint and TLS uprobe kspan uses instead of the real
//! programs. What a request costs with them attached is what any agent on these hooks pays
//! before doing anything; kspan's share is measured against it.

use aya_ebpf::{
    macros::{tracepoint, uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext, TracePointContext},
};

#[tracepoint]
pub fn floor(_ctx: TracePointContext) -> u32 {
    0
}

#[uprobe]
pub fn floor_uprobe(_ctx: ProbeContext) -> u32 {
    0
}

#[uretprobe]
pub fn floor_uretprobe(_ctx: RetProbeContext) -> u32 {
    0
}
