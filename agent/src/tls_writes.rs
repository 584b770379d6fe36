//! TLS plaintext written before its socket is known, held per thread until the kernel names
//! the socket.
//!
//! A TLS library on memory BIOs (gRPC core, Node.js) encrypts a write into memory; the
//! application writes the ciphertext to the socket itself after the library call returned, on
//! the same thread. So a client's first request has no socket when its plaintext comes: the
//! kernel reports it with fd -1, then a `TlsBound` event names the TLS socket the thread wrote
//! next, and the held plaintext goes to that socket, in order, before anything later of it.
//! Bounded (threads, writes per thread, wait); what is dropped is counted, never guessed.

use rustc_hash::FxHashMap;

/// Threads holding plaintext at once.
pub const MAX_THREADS: usize = 256;
/// Writes held per thread: the library calls between a request's plaintext and its socket
/// write (gRPC writes its preface, settings and first headers in one or two).
pub const MAX_WRITES_PER_THREAD: usize = 8;
/// How long plaintext waits for its socket (kernel clock). The socket write follows the
/// library call at once; one still missing after this never comes (the connection failed).
pub const MAX_WAIT_NS: u64 = 1_000_000_000;

/// One library call's plaintext, as the kernel copied it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldWrite {
    pub data: Vec<u8>,
    pub tail: Vec<u8>,
    pub full_len: u64,
    pub start_ns: u64,
    pub end_ns: u64,
}

#[derive(Debug, Default)]
pub struct HeldTlsWrites {
    /// (pid, tid) → its writes, oldest first.
    threads: FxHashMap<(u32, u32), Vec<HeldWrite>>,
}

impl HeldTlsWrites {
    /// Holds a write of thread `tid` of `pid`. Returns how many writes were dropped: this one
    /// when the bounds are reached, and any past their wait.
    pub fn hold(&mut self, pid: u32, tid: u32, write: HeldWrite) -> u64 {
        let mut dropped = self.expire(write.end_ns);
        if !self.threads.contains_key(&(pid, tid)) && self.threads.len() >= MAX_THREADS {
            return dropped + 1;
        }
        let writes = self.threads.entry((pid, tid)).or_default();
        if writes.len() >= MAX_WRITES_PER_THREAD {
            dropped += 1;
        } else {
            writes.push(write);
        }
        dropped
    }

    /// The thread's held writes, oldest first: its socket is now known.
    pub fn take(&mut self, pid: u32, tid: u32) -> Vec<HeldWrite> {
        self.threads.remove(&(pid, tid)).unwrap_or_default()
    }

    /// Drops the writes that waited [`MAX_WAIT_NS`] by `now_ns`; returns how many.
    pub fn expire(&mut self, now_ns: u64) -> u64 {
        if self.threads.is_empty() {
            return 0;
        }
        let mut dropped = 0;
        self.threads.retain(|_, writes| {
            let before = writes.len();
            writes.retain(|w| now_ns.saturating_sub(w.end_ns) < MAX_WAIT_NS);
            dropped += (before - writes.len()) as u64;
            !writes.is_empty()
        });
        dropped
    }

    /// The process exited: its held writes are dropped; returns how many.
    pub fn forget_process(&mut self, pid: u32) -> u64 {
        if self.threads.is_empty() {
            return 0;
        }
        let mut dropped = 0;
        self.threads.retain(|&(p, _), writes| {
            if p == pid {
                dropped += writes.len() as u64;
            }
            p != pid
        });
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(data: &[u8], end_ns: u64) -> HeldWrite {
        HeldWrite {
            data: data.to_vec(),
            tail: Vec::new(),
            full_len: data.len() as u64,
            start_ns: end_ns,
            end_ns,
        }
    }

    #[test]
    fn writes_are_taken_per_thread_in_order() {
        let mut held = HeldTlsWrites::default();
        assert_eq!(held.hold(1, 10, write(b"a", 100)), 0);
        assert_eq!(held.hold(1, 11, write(b"x", 100)), 0);
        assert_eq!(held.hold(1, 10, write(b"b", 200)), 0);
        let taken = held.take(1, 10);
        assert_eq!(taken, [write(b"a", 100), write(b"b", 200)]);
        assert!(held.take(1, 10).is_empty(), "taken once");
        assert_eq!(held.take(1, 11), [write(b"x", 100)]);
    }

    #[test]
    fn the_bounds_drop_and_count() {
        let mut held = HeldTlsWrites::default();
        for i in 0..MAX_WRITES_PER_THREAD {
            assert_eq!(held.hold(1, 1, write(b"w", i as u64)), 0);
        }
        assert_eq!(held.hold(1, 1, write(b"over", 9)), 1, "a full thread");
        assert_eq!(held.take(1, 1).len(), MAX_WRITES_PER_THREAD);
        for tid in 0..MAX_THREADS as u32 {
            assert_eq!(held.hold(2, tid, write(b"w", 0)), 0);
        }
        assert_eq!(held.hold(2, 9999, write(b"w", 0)), 1, "too many threads");
        assert_eq!(
            held.hold(2, 0, write(b"w", 0)),
            0,
            "a holding thread still holds"
        );
    }

    #[test]
    fn writes_past_their_wait_and_of_exited_processes_are_dropped() {
        let mut held = HeldTlsWrites::default();
        held.hold(1, 1, write(b"old", 0));
        held.hold(2, 2, write(b"other", MAX_WAIT_NS / 2));
        assert_eq!(held.expire(MAX_WAIT_NS - 1), 0);
        assert_eq!(held.expire(MAX_WAIT_NS), 1, "the first waited long enough");
        assert!(held.take(1, 1).is_empty());
        // A new write expires the old ones too.
        assert_eq!(held.hold(3, 3, write(b"new", 2 * MAX_WAIT_NS)), 1);
        assert_eq!(held.forget_process(3), 1);
        assert!(held.take(3, 3).is_empty());
    }
}
