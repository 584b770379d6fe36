//! Discovery: which processes are traced, and what each traced process is (its resource).

pub mod procfs_scan;
pub mod selectors;

use rustc_hash::FxHashMap;
use std::{collections::HashSet, sync::Arc};

pub use selectors::Selectors;

use crate::spans::{AttributeValue, Resource};

/// How many ancestors to walk when deciding whether a process descends from a `--pid`.
const MAX_ANCESTRY: usize = 64;

pub struct Processes {
    selectors: Selectors,
    host_name: String,
    resources: FxHashMap<u32, Arc<Resource>>,
    /// Pids userspace put in the kernel filter (unused when tracing all).
    traced: HashSet<u32>,
    /// Program name from the exec event of traced processes: the resource's fallback when the
    /// process is gone before procfs was read (a short-lived client).
    comms: FxHashMap<u32, String>,
}

/// What an exec changes for the process that ran it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExecDecision {
    Trace,
    Untrace,
    Unchanged,
}

impl Processes {
    pub fn new(selectors: Selectors) -> Self {
        Processes {
            selectors,
            host_name: host_name(),
            resources: FxHashMap::default(),
            traced: HashSet::new(),
            comms: FxHashMap::default(),
        }
    }

    pub fn selectors(&self) -> &Selectors {
        &self.selectors
    }

    /// Whether userspace put `pid` in the kernel's pid filter (selectors given).
    pub fn is_traced(&self, pid: u32) -> bool {
        self.traced.contains(&pid)
    }

    /// Processes to trace at start: every process when there are no selectors, else the ones
    /// selected by pid (and their descendants), executable, or a listening port.
    pub fn initial_selection(&mut self) -> Vec<u32> {
        let pids = procfs_scan::all_pids();
        let agent = std::process::id();
        let selected: Vec<u32> = pids
            .into_iter()
            .filter(|&pid| pid != agent)
            .filter(|&pid| {
                self.selectors.trace_all()
                    || self.selected_by_pid_or_exe(pid)
                    || self.listens_on_selected_port(pid)
            })
            .collect();
        if !self.selectors.trace_all() {
            self.traced.extend(selected.iter().copied());
        }
        selected
    }

    fn selected_by_pid_or_exe(&self, pid: u32) -> bool {
        if self.descends_from_selected_pid(pid) {
            return true;
        }
        self.selectors.has_exe_selectors()
            && procfs_scan::exe_path(pid).is_some_and(|exe| self.selectors.matches_exe(&exe))
    }

    fn descends_from_selected_pid(&self, pid: u32) -> bool {
        if self.selectors.pids.is_empty() {
            return false;
        }
        let mut current = pid;
        for _ in 0..MAX_ANCESTRY {
            if self.selectors.matches_pid(current) {
                return true;
            }
            match procfs_scan::parent_pid(current) {
                Some(parent) if parent > 1 => current = parent,
                _ => return false,
            }
        }
        false
    }

    fn listens_on_selected_port(&self, pid: u32) -> bool {
        !self.selectors.ports.is_empty()
            && procfs_scan::open_tcp_sockets(pid)
                .iter()
                .any(|s| s.listening && self.selectors.matches_port(s.local.port()))
    }

    /// A process exec'd a new image: its resource changes, and its selection is re-evaluated
    /// (a traced shell that execs an unselected program stops being traced).
    /// `comm`: the new program's name from the kernel (NUL padded).
    pub fn on_exec(&mut self, pid: u32, comm: &[u8]) -> ExecDecision {
        self.resources.remove(&pid);
        let remember_comm = |comms: &mut FxHashMap<u32, String>| {
            let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
            comms.insert(pid, String::from_utf8_lossy(&comm[..end]).into_owned());
        };
        if self.selectors.trace_all() {
            remember_comm(&mut self.comms);
            return ExecDecision::Unchanged;
        }
        let selected = self.selected_by_pid_or_exe(pid)
            // Gone already: the kernel matched its name at exec (plain --exe names), trust it.
            || (procfs_scan::exe_path(pid).is_none()
                && self.selectors.plain_exe_names().iter().any(|name| {
                    kspan_common::comm_key(name)[..] == comm[..comm.len().min(16)]
                }));
        if selected {
            remember_comm(&mut self.comms);
        } else {
            self.comms.remove(&pid);
        }
        let was_traced = self.traced.contains(&pid);
        match (selected, was_traced) {
            (true, false) => {
                self.traced.insert(pid);
                ExecDecision::Trace
            }
            // Traced through fork inheritance (the kernel adds children) or an earlier image.
            (false, _) => {
                self.traced.remove(&pid);
                ExecDecision::Untrace
            }
            (true, true) => ExecDecision::Unchanged,
        }
    }

    /// A process started listening on `port`. True if that newly selects it.
    pub fn on_listen(&mut self, pid: u32, port: u16) -> bool {
        if self.selectors.trace_all() || !self.selectors.matches_port(port) {
            return false;
        }
        self.traced.insert(pid)
    }

    pub fn on_exit(&mut self, pid: u32) {
        self.resources.remove(&pid);
        self.traced.remove(&pid);
        self.comms.remove(&pid);
    }

    /// The resource of a traced process, read from procfs once and cached until exec or exit.
    pub fn resource(&mut self, pid: u32) -> Arc<Resource> {
        if let Some(resource) = self.resources.get(&pid) {
            return resource.clone();
        }
        let resource = Arc::new(read_resource(
            pid,
            &self.host_name,
            self.comms.get(&pid).map(String::as_str),
        ));
        self.resources.insert(pid, resource.clone());
        resource
    }
}

fn read_resource(pid: u32, host_name: &str, exec_comm: Option<&str>) -> Resource {
    let exe = procfs_scan::exe_path(pid);
    let exe_name = exe
        .as_deref()
        .map(procfs_scan::file_name)
        .or_else(|| procfs_scan::command_name(pid))
        .or_else(|| exec_comm.map(str::to_string));
    let service_name = procfs_scan::environment_variable(pid, "OTEL_SERVICE_NAME")
        .filter(|name| !name.is_empty())
        .or_else(|| exe_name.clone())
        // The process is gone before we could look at it.
        .unwrap_or_else(|| "unknown_service".to_string());
    let mut attributes = vec![
        ("service.name", AttributeValue::Str(service_name.into())),
        ("process.pid", AttributeValue::Int(pid as i64)),
    ];
    if let Some(name) = exe_name {
        attributes.push(("process.executable.name", AttributeValue::Str(name.into())));
    }
    if let Some(path) = exe {
        attributes.push((
            "process.executable.path",
            AttributeValue::Str(path.to_string_lossy().into()),
        ));
    }
    attributes.push(("host.name", AttributeValue::Str(host_name.into())));
    attributes.push(("telemetry.distro.name", AttributeValue::Str("kspan".into())));
    attributes.push((
        "telemetry.distro.version",
        AttributeValue::Str(env!("CARGO_PKG_VERSION").into()),
    ));
    Resource { attributes }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_of_this_process_names_its_executable() {
        let mut processes = Processes::new(Selectors::default());
        let resource = processes.resource(std::process::id());
        let exe = procfs_scan::exe_path(std::process::id()).unwrap();
        let name = procfs_scan::file_name(&exe);
        assert_eq!(
            resource.get("process.executable.name"),
            Some(&AttributeValue::Str(name.into()))
        );
        assert_eq!(
            resource.get("process.pid"),
            Some(&AttributeValue::Int(std::process::id() as i64))
        );
        assert!(resource.get("host.name").is_some());
        // Cached: same Arc.
        assert!(Arc::ptr_eq(
            &resource,
            &processes.resource(std::process::id())
        ));
    }

    #[test]
    fn pid_selector_covers_descendants() {
        let parent = std::os::unix::process::parent_id();
        let processes = Processes::new(Selectors::new(vec![parent], &[], vec![]).unwrap());
        assert!(processes.descends_from_selected_pid(std::process::id()));
        let other = Processes::new(Selectors::new(vec![u32::MAX - 1], &[], vec![]).unwrap());
        assert!(!other.descends_from_selected_pid(std::process::id()));
    }
}
