//! kspan's eBPF programs: small, dumb and fast.
//!
//! Every program filters first (is this process traced? is this fd a tracked TCP socket?), stashes
//! syscall arguments at entry keyed by thread, and at exit copies a bounded prefix of the bytes
//! really transferred into one ring buffer. No protocol parsing happens here.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// atomic_xadd: core's atomics have no fetch-and-add on the BPF target (see data::atomic_add).
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod data;
#[cfg(target_arch = "bpf")]
mod floor;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod process;
#[cfg(target_arch = "bpf")]
mod socket;
#[cfg(target_arch = "bpf")]
mod tls;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path, so this is never executed.
    unsafe { core::hint::unreachable_unchecked() }
}

/// The host build of this crate (cargo test/clippy of the whole workspace) has nothing to run.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
