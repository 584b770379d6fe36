//! Per traced process: whether kspan sees into its TLS library, and whether it has been said
//! that kspan cannot.
//!
//! The kernel stage looks for TLS libraries in a process's maps (`probes::tls`) when the
//! process is selected and when it maps a new library; the pipeline queues those looks here and
//! the main loop runs them between drains (attaching takes milliseconds). A process seen sending
//! TLS records on the syscall path is judged by a look made after that: it is doing TLS, so its
//! TLS library is loaded by then. If none of its libraries is one kspan reads (BoringSSL inside
//! a wheel, Go's crypto/tls, rustls, Java), that is reported once, and counted, never guessed:
//! a process gone before the look, or one whose plaintext kspan already saw, is not reported.

use rustc_hash::FxHashMap;

#[derive(Debug, Default)]
struct ProcessTls {
    /// A look found a library kspan reads, or its plaintext came.
    seen_into: bool,
    queued: bool,
    /// TLS records were seen on its sockets' syscalls; the next look judges it.
    judge_next_look: bool,
    reported: bool,
}

#[derive(Debug, Default)]
pub struct TlsProcesses {
    processes: FxHashMap<u32, ProcessTls>,
    queue: Vec<u32>,
}

impl TlsProcesses {
    /// Look at `pid`'s libraries at the next chance (once however often asked before).
    pub fn queue_scan(&mut self, pid: u32) {
        let process = self.processes.entry(pid).or_default();
        if !process.queued {
            process.queued = true;
            self.queue.push(pid);
        }
    }

    /// The processes whose libraries to look at now.
    pub fn take_scans(&mut self) -> Vec<u32> {
        for pid in &self.queue {
            if let Some(process) = self.processes.get_mut(pid) {
                process.queued = false;
            }
        }
        std::mem::take(&mut self.queue)
    }

    /// A look at `pid`'s libraries found one kspan reads (`visible`), or none; None: the
    /// process was gone. True: report now that kspan cannot see into its TLS.
    pub fn scanned(&mut self, pid: u32, visible: Option<bool>) -> bool {
        let Some(process) = self.processes.get_mut(&pid) else {
            return false;
        };
        let Some(visible) = visible else {
            process.judge_next_look = false;
            return false;
        };
        process.seen_into |= visible;
        let report =
            std::mem::take(&mut process.judge_next_look) && !process.seen_into && !process.reported;
        process.reported |= report;
        report
    }

    /// TLS records seen on one of `pid`'s connections: unless kspan already sees into it, its
    /// libraries are looked at again and that look judges it.
    pub fn ciphertext(&mut self, pid: u32) {
        let process = self.processes.entry(pid).or_default();
        if process.seen_into || process.reported {
            return;
        }
        process.judge_next_look = true;
        self.queue_scan(pid);
    }

    /// Plaintext of `pid`'s TLS came: kspan sees into it.
    pub fn plaintext(&mut self, pid: u32) {
        self.processes.entry(pid).or_default().seen_into = true;
    }

    pub fn forget(&mut self, pid: u32) {
        self.processes.remove(&pid);
    }

    /// No process has TLS facts kept.
    pub fn is_empty(&self) -> bool {
        self.processes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_are_queued_once_until_taken() {
        let mut tls = TlsProcesses::default();
        tls.queue_scan(7);
        tls.queue_scan(7);
        tls.queue_scan(8);
        assert_eq!(tls.take_scans(), [7, 8]);
        assert!(tls.take_scans().is_empty());
        tls.queue_scan(7);
        assert_eq!(tls.take_scans(), [7]);
    }

    /// The look made right after an exec sees few libraries (the dynamic loader has not mapped
    /// them yet): only a look after the ciphertext judges, once.
    #[test]
    fn an_unseen_process_is_judged_by_the_look_after_its_ciphertext_once() {
        let mut tls = TlsProcesses::default();
        tls.queue_scan(1);
        assert_eq!(tls.take_scans(), [1]);
        assert!(!tls.scanned(1, Some(false)), "no ciphertext yet");
        tls.ciphertext(1);
        assert_eq!(tls.take_scans(), [1], "the ciphertext asks for a look");
        assert!(tls.scanned(1, Some(false)));
        tls.ciphertext(1);
        assert!(
            tls.take_scans().is_empty(),
            "reported: no more looks for it"
        );
        assert!(!tls.scanned(1, Some(false)));
    }

    #[test]
    fn a_process_seen_into_or_gone_is_never_reported() {
        let mut tls = TlsProcesses::default();
        // Its library found by the look after the ciphertext.
        tls.ciphertext(2);
        assert_eq!(tls.take_scans(), [2]);
        assert!(!tls.scanned(2, Some(true)));
        tls.ciphertext(2);
        assert!(tls.take_scans().is_empty(), "seen into: no more looks");
        // Its plaintext came before the look.
        tls.ciphertext(3);
        tls.plaintext(3);
        assert!(!tls.scanned(3, Some(false)));
        // Gone before the look.
        tls.ciphertext(4);
        assert!(!tls.scanned(4, None));
        assert!(!tls.scanned(4, Some(false)), "a later look does not judge");
        // Exited: forgotten.
        tls.forget(2);
        tls.forget(3);
        tls.forget(4);
        assert!(tls.is_empty());
    }
}
