//! Fill levels of the kernel maps that grow with the traced processes and their sockets, read
//! on a thread of its own: counting a full CONNECTIONS takes ~65,000 syscalls, which the
//! pipeline thread must not spend between two ring drains.

use std::os::fd::{AsRawFd, OwnedFd};

use kspan_common::TRACED_SLOTS;

/// How full the maps are, as last counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapFill {
    /// CONNECTIONS entries (LRU: at its capacity the oldest make room).
    pub connections: u64,
    /// TRACED_PIDS entries: one per traced process (not per thread).
    pub traced_pids: u64,
    /// MAYBE_TRACED slots with a non-zero count.
    pub prefilter_slots: u64,
}

/// Read-only handles on the maps, independent of the pipeline's.
pub struct MapCensus {
    connections: OwnedFd,
    traced_pids: OwnedFd,
    /// A read-only mapping of MAYBE_TRACED.
    slots: *const u64,
}

// SAFETY: `slots` is a read-only shared mapping owned by this value; nothing thread-affine.
unsafe impl Send for MapCensus {}

const SLOTS_BYTES: usize = TRACED_SLOTS as usize * std::mem::size_of::<u64>();

impl MapCensus {
    pub(super) fn new(
        connections: OwnedFd,
        traced_pids: OwnedFd,
        maybe_traced: &OwnedFd,
    ) -> std::io::Result<Self> {
        // SAFETY: a read-only shared mapping of the BPF_F_MMAPABLE array, unmapped in Drop.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                SLOTS_BYTES,
                libc::PROT_READ,
                libc::MAP_SHARED,
                maybe_traced.as_raw_fd(),
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(MapCensus {
            connections,
            traced_pids,
            slots: address.cast(),
        })
    }

    pub fn count(&self) -> MapFill {
        // SAFETY: the mapping made in `new`, TRACED_SLOTS u64 long; the kernel and the agent
        // change slots with atomic adds, a plain read of each is what the programs do too.
        let slots = unsafe { std::slice::from_raw_parts(self.slots, TRACED_SLOTS as usize) };
        MapFill {
            connections: count_keys::<u64>(&self.connections),
            traced_pids: count_keys::<u32>(&self.traced_pids),
            prefilter_slots: slots.iter().filter(|&&n| n != 0).count() as u64,
        }
    }
}

impl Drop for MapCensus {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        unsafe { libc::munmap(self.slots as *mut libc::c_void, SLOTS_BYTES) };
    }
}

/// Keys of a hash map, walked with BPF_MAP_GET_NEXT_KEY (a map changing meanwhile gives an
/// approximate count, which is all a fill level needs).
fn count_keys<K: Copy + Default>(map: &OwnedFd) -> u64 {
    #[repr(C)]
    struct NextKeyAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        next_key: u64,
    }
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    // [the key asked about, the next one the kernel writes]
    let mut keys = [K::default(); 2];
    let mut attr = NextKeyAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        // A null key asks for the first one.
        key: 0,
        next_key: (&raw mut keys[1]) as u64,
    };
    let mut count = 0;
    loop {
        // SAFETY: `attr` points into `keys`, K-sized slots that outlive the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_GET_NEXT_KEY,
                &raw mut attr,
                std::mem::size_of::<NextKeyAttr>(),
            )
        };
        if ret != 0 {
            return count;
        }
        count += 1;
        // Written by the kernel behind the compiler's back.
        keys[0] = unsafe { std::ptr::read_volatile(&raw const keys[1]) };
        attr.key = (&raw const keys[0]) as u64;
    }
}
