//! Discovery: which processes are traced, and what each traced process is (its resource).

pub mod container;
pub mod discovery;
pub mod procfs_scan;
pub mod resource;
pub mod socket_tables;
pub mod tls;

use rustc_hash::FxHashMap;
use std::{
    collections::HashSet,
    ffi::OsStr,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    sync::Arc,
};

pub use discovery::{Discovery, Rule};

use crate::kubernetes::{KubernetesSource, PodChange};
use crate::spans::Resource;

/// How many ancestors to walk when deciding whether a process descends from a `pid` rule's.
const MAX_ANCESTRY: usize = 64;

pub struct Processes {
    discovery: Discovery,
    host_name: String,
    resources: FxHashMap<u32, Arc<Resource>>,
    /// Pids userspace put in the kernel filter (unused when tracing all).
    traced: HashSet<u32>,
    /// What the exec event of traced processes said: the resource's fallback when the process
    /// is gone before procfs was read (a short-lived client).
    images: FxHashMap<u32, ExecImage>,
    /// The pods of this node, when kspan reaches a Kubernetes API server.
    kubernetes: Option<KubernetesSource>,
    /// The cgroup of each process whose resource is cached: a pod change finds them here.
    cgroups: FxHashMap<u32, container::CgroupIds>,
}

/// A program as its exec event named it.
#[derive(Clone, Debug)]
struct ExecImage {
    /// The kernel's `comm`: the file name cut to 15 bytes.
    comm: String,
    /// The path given to execve, when the kernel could copy it.
    path: Option<PathBuf>,
}

impl ExecImage {
    fn new(comm: &[u8], path: &[u8]) -> ExecImage {
        let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
        ExecImage {
            comm: String::from_utf8_lossy(&comm[..end]).into_owned(),
            path: (!path.is_empty()).then(|| PathBuf::from(OsStr::from_bytes(path))),
        }
    }

    /// The executable's full path, as /proc/PID/exe would have given it (symlinks resolved),
    /// or None. A relative path (`./server`) is not a full path: it is relative to a working
    /// directory gone with the process. `/dev/fd/N` and `/proc/...` (fexecve, execveat) name
    /// the exec'ing process's own files: resolved here they would name the agent's.
    fn full_path(&self) -> Option<PathBuf> {
        let path = self.path.as_deref()?;
        if !path.is_absolute() || path.starts_with("/dev/fd") || path.starts_with("/proc") {
            return None;
        }
        // When the file is not there any more (or not in the agent's mount namespace), the
        // path as executed is still the best full path known.
        Some(std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()))
    }

    /// The executable's file name: the exec path's (even a relative one's) is not cut like
    /// `comm`.
    fn name(&self) -> String {
        self.path
            .as_deref()
            .and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.comm.clone())
    }
}

/// What new rules change.
#[derive(Debug, Default)]
pub struct Reselection {
    /// Selected now, not before.
    pub newly_selected: Vec<u32>,
    /// Every process not selected now. A process traced through its parent (the kernel adds
    /// children) is not known to userspace as traced: every one leaves the kernel filter.
    pub unselected: Vec<u32>,
    /// How many of those userspace had selected before.
    pub dropped: usize,
}

/// What an exec changes for the process that ran it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExecDecision {
    Trace,
    Untrace,
    Unchanged,
}

impl Processes {
    pub fn new(discovery: Discovery) -> Self {
        Processes {
            discovery,
            host_name: resource::host_name(),
            resources: FxHashMap::default(),
            traced: HashSet::new(),
            images: FxHashMap::default(),
            kubernetes: None,
            cgroups: FxHashMap::default(),
        }
    }

    /// Describe processes with their pods (and judge rules on them) from now on.
    pub fn set_kubernetes(&mut self, source: KubernetesSource) {
        self.kubernetes = Some(source);
    }

    pub fn discovery(&self) -> &Discovery {
        &self.discovery
    }

    /// Whether userspace put `pid` in the kernel's pid filter (rules given).
    pub fn is_traced(&self, pid: u32) -> bool {
        self.traced.contains(&pid)
    }

    /// Whether the rules select `pid` as it is now (its exec image as the fallback for a
    /// process already gone).
    fn selects_now(&self, pid: u32, tables: &mut socket_tables::SocketTables) -> bool {
        let mut facts = ProcfsFacts::new(
            pid,
            self.images.get(&pid),
            Some(tables),
            None,
            self.kubernetes.as_ref(),
        );
        self.discovery.selects(&mut facts)
    }

    /// Processes to trace at start: every process but kspan when there is no rule, else the
    /// ones the rules select. `tables`: the TCP tables of the namespaces, read once each for
    /// `port` rules.
    pub fn initial_selection(&mut self, tables: &mut socket_tables::SocketTables) -> Vec<u32> {
        let agent = std::process::id();
        let pids = procfs_scan::all_pids()
            .into_iter()
            .filter(|&pid| pid != agent);
        if self.discovery.trace_all() {
            return pids.collect();
        }
        let selected: Vec<u32> = pids
            .filter(|&pid| {
                let mut facts =
                    ProcfsFacts::new(pid, None, Some(tables), None, self.kubernetes.as_ref());
                self.discovery.selects(&mut facts)
            })
            .collect();
        self.traced.extend(selected.iter().copied());
        selected
    }

    /// New rules (SIGHUP): every process is judged again. Returns the pids newly selected and
    /// the pids no longer selected, for the kernel filter. Rules that would switch between
    /// tracing every process and the pid filter need a restart (the mode is fixed when the
    /// programs load): an error, and the old rules stay.
    pub fn reselect(
        &mut self,
        discovery: Discovery,
        tables: &mut socket_tables::SocketTables,
    ) -> anyhow::Result<Reselection> {
        if discovery.trace_all() != self.discovery.trace_all() {
            anyhow::bail!(
                "the new rules {} every process, the running ones {}: restart kspan to switch",
                if discovery.trace_all() {
                    "trace"
                } else {
                    "select among"
                },
                if self.discovery.trace_all() {
                    "trace"
                } else {
                    "select among"
                },
            );
        }
        self.discovery = discovery;
        if self.discovery.trace_all() {
            return Ok(Reselection::default());
        }
        let agent = std::process::id();
        let mut selected = Vec::new();
        let mut unselected = Vec::new();
        for pid in procfs_scan::all_pids()
            .into_iter()
            .filter(|&pid| pid != agent)
        {
            if self.selects_now(pid, tables) {
                selected.push(pid);
            } else {
                unselected.push(pid);
            }
        }
        let newly: Vec<u32> = selected
            .iter()
            .copied()
            .filter(|pid| !self.traced.contains(pid))
            .collect();
        let mut dropped = 0;
        for &pid in &unselected {
            if self.traced.remove(&pid) {
                dropped += 1;
            }
            self.images.remove(&pid);
            self.resources.remove(&pid);
            self.cgroups.remove(&pid);
        }
        self.traced.extend(newly.iter().copied());
        Ok(Reselection {
            newly_selected: newly,
            unselected,
            dropped,
        })
    }

    /// A process exec'd a new image: its resource changes, and its selection is re-evaluated
    /// (a traced shell that execs an unselected program stops being traced).
    /// `comm`: the new program's name from the kernel (NUL padded); `path`: the path it was
    /// executed by (empty if unknown).
    pub fn on_exec(
        &mut self,
        pid: u32,
        comm: &[u8],
        path: &[u8],
        tables: &mut socket_tables::SocketTables,
    ) -> ExecDecision {
        self.resources.remove(&pid);
        let image = ExecImage::new(comm, path);
        if self.discovery.trace_all() {
            self.images.insert(pid, image);
            return ExecDecision::Unchanged;
        }
        let gone = procfs_scan::exe_path(pid).is_none();
        let selected = self
            .discovery
            .selects(&mut ProcfsFacts::new(
                pid,
                Some(&image),
                Some(tables),
                None,
                self.kubernetes.as_ref(),
            ))
            // Gone already, with no exec path: trust the kernel's match of its name at exec
            // (plain exe rules).
            || (gone
                && image.full_path().is_none()
                && self.discovery.plain_exe_names().iter().any(|name| {
                    kspan_common::comm_key(name)[..] == comm[..comm.len().min(16)]
                }));
        if selected {
            self.images.insert(pid, image);
        } else {
            self.images.remove(&pid);
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
        if self.discovery.trace_all()
            || !self.discovery.has_port_rules()
            || self.traced.contains(&pid)
        {
            return false;
        }
        // Only this port is new: the process's other sockets did not select it before.
        let mut facts = ProcfsFacts::new(
            pid,
            self.images.get(&pid),
            None,
            Some(port),
            self.kubernetes.as_ref(),
        );
        if !self.discovery.selects(&mut facts) {
            return false;
        }
        self.traced.insert(pid)
    }

    /// Per-process entries held (resources, selections, exec images): a gauge that returns to
    /// its baseline when the processes are gone.
    pub fn entries(&self) -> usize {
        self.resources.len() + self.traced.len() + self.images.len() + self.cgroups.len()
    }

    pub fn on_exit(&mut self, pid: u32) {
        self.resources.remove(&pid);
        self.traced.remove(&pid);
        self.images.remove(&pid);
        self.cgroups.remove(&pid);
    }

    /// The resource of a traced process, read from procfs once and cached until exec or exit.
    pub fn resource(&mut self, pid: u32) -> Arc<Resource> {
        if let Some(resource) = self.resources.get(&pid) {
            return resource.clone();
        }
        let cgroup = container::read(pid);
        let kubernetes = self
            .kubernetes
            .as_ref()
            .and_then(|k| k.lookup(cgroup.container_id.as_deref(), cgroup.pod_uid.as_deref()));
        let resource = Arc::new(resource::read_resource(
            pid,
            &self.host_name,
            self.images.get(&pid),
            cgroup.clone(),
            kubernetes,
        ));
        self.resources.insert(pid, resource.clone());
        self.cgroups.insert(pid, cgroup);
        resource
    }

    /// The pod changes the Kubernetes watcher sent since the last call: the resources of their
    /// processes are read again at their next span, and, with rules on Kubernetes fields, the
    /// processes of those pods are judged again. None when nothing changed.
    pub fn poll_kubernetes(
        &mut self,
        tables: &mut socket_tables::SocketTables,
    ) -> Option<Reselection> {
        let changes = self.kubernetes.as_mut()?.poll();
        if changes.is_empty() {
            return None;
        }
        let mut pods: HashSet<String> = HashSet::new();
        let mut containers: HashSet<String> = HashSet::new();
        for change in &changes {
            match change {
                PodChange::Upsert {
                    pod_uid,
                    containers: list,
                } => {
                    pods.insert(pod_uid.clone());
                    containers.extend(list.iter().map(|(id, _)| id.clone()));
                }
                PodChange::Removed { pod_uid } => {
                    pods.insert(pod_uid.clone());
                }
            }
        }
        let in_changed_pod = |ids: &container::CgroupIds| {
            ids.pod_uid.as_ref().is_some_and(|uid| pods.contains(uid))
                || ids
                    .container_id
                    .as_ref()
                    .is_some_and(|id| containers.contains(id))
        };
        let stale: Vec<u32> = self
            .cgroups
            .iter()
            .filter(|(_, ids)| in_changed_pod(ids))
            .map(|(&pid, _)| pid)
            .collect();
        for pid in stale {
            self.resources.remove(&pid);
            self.cgroups.remove(&pid);
        }
        if self.discovery.trace_all() || !self.discovery.has_kubernetes_rules() {
            return None;
        }
        // Which processes run in those pods: one read of each process's cgroup, per batch of
        // changes (pods change in seconds, not per event).
        let agent = std::process::id();
        let mut change = Reselection::default();
        for pid in procfs_scan::all_pids()
            .into_iter()
            .filter(|&pid| pid != agent)
        {
            if !in_changed_pod(&container::read(pid)) {
                continue;
            }
            if self.selects_now(pid, tables) {
                if self.traced.insert(pid) {
                    change.newly_selected.push(pid);
                }
            } else {
                if self.traced.remove(&pid) {
                    change.dropped += 1;
                }
                change.unselected.push(pid);
            }
        }
        Some(change)
    }
}

/// A process's facts for the discovery rules, read from procfs when a rule asks.
struct ProcfsFacts<'a> {
    pid: u32,
    /// The exec event's, for a process gone before procfs could be read.
    image: Option<&'a ExecImage>,
    /// For `port` rules: the namespaces' TCP tables (None: no socket is read).
    tables: Option<&'a mut socket_tables::SocketTables>,
    /// A port it is known to listen on (a listen event).
    listening: Option<u16>,
    /// The pods of the node, when known.
    kubernetes: Option<&'a KubernetesSource>,
    exe: Option<Option<PathBuf>>,
    cgroup: Option<container::CgroupIds>,
}

impl<'a> ProcfsFacts<'a> {
    fn new(
        pid: u32,
        image: Option<&'a ExecImage>,
        tables: Option<&'a mut socket_tables::SocketTables>,
        listening: Option<u16>,
        kubernetes: Option<&'a KubernetesSource>,
    ) -> Self {
        ProcfsFacts {
            pid,
            image,
            tables,
            listening,
            kubernetes,
            exe: None,
            cgroup: None,
        }
    }

    fn cgroup(&mut self) -> &container::CgroupIds {
        let pid = self.pid;
        self.cgroup.get_or_insert_with(|| container::read(pid))
    }
}

impl discovery::ProcessFacts for ProcfsFacts<'_> {
    fn descends_from(&mut self, ancestor: u32) -> bool {
        let mut current = self.pid;
        for _ in 0..MAX_ANCESTRY {
            if current == ancestor {
                return true;
            }
            match procfs_scan::parent_pid(current) {
                Some(parent) if parent > 1 => current = parent,
                _ => return false,
            }
        }
        false
    }

    fn exe(&mut self) -> Option<PathBuf> {
        let (pid, image) = (self.pid, self.image);
        self.exe
            .get_or_insert_with(|| {
                procfs_scan::exe_path(pid).or_else(|| image.and_then(ExecImage::full_path))
            })
            .clone()
    }

    fn cmdline(&mut self) -> Option<String> {
        procfs_scan::command_line(self.pid)
    }

    fn listens_on(&mut self, ports: &std::ops::RangeInclusive<u16>) -> bool {
        if self.listening.is_some_and(|port| ports.contains(&port)) {
            return true;
        }
        let Some(tables) = self.tables.as_deref_mut() else {
            return false;
        };
        let Some(namespace) = socket_tables::network_namespace(self.pid) else {
            return false;
        };
        let pid = self.pid;
        socket_tables::socket_fds(pid)
            .into_iter()
            .any(|(_, inode)| {
                // One read of each namespace's tables serves every process judged.
                matches!(
                    tables.lookup_inode(pid, namespace, inode, std::time::Duration::MAX),
                    socket_tables::Lookup::Tcp(s) if s.listening && ports.contains(&s.local.port())
                )
            })
    }

    fn container_id(&mut self) -> Option<String> {
        self.cgroup().container_id.clone()
    }

    fn kubernetes(&mut self) -> Option<discovery::KubernetesView<'_>> {
        let source = self.kubernetes?;
        let ids = self.cgroup().clone();
        let pod = source.lookup(ids.container_id.as_deref(), ids.pod_uid.as_deref())?;
        Some(discovery::KubernetesView {
            namespace: pod.namespace.as_deref()?,
            pod_name: pod.pod_name.as_deref()?,
            deployment_name: pod
                .owner
                .as_ref()
                .filter(|o| o.kind == resource::WorkloadKind::Deployment)
                .map(|o| o.name.as_str()),
            labels: &pod.pod_labels,
            annotations: &pod.pod_annotations,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spans::AttributeValue;

    #[test]
    fn resource_of_this_process_names_its_executable() {
        let mut processes = Processes::new(Discovery::default());
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

    /// Rules on Kubernetes fields see a process's pod through the watcher's index, by the
    /// container id its cgroup names: once the pod is known, and as it changes.
    #[test]
    fn kubernetes_rules_match_the_pod_of_the_process_container() {
        use crate::kubernetes::{KubernetesSource, PodChange};
        use resource::{KubernetesMetadata, Workload, WorkloadKind};
        let config = crate::config::ConfigFile::parse(
            "discovery:\n  include:\n    - {k8s_namespace: shop, k8s_deployment_name: web, \
             k8s_labels: {tier: front*}}\n",
        )
        .unwrap();
        let rules = Discovery::from_config(&config.discovery, Vec::new());
        let (sender, mut source) = KubernetesSource::fed_by_test();
        let pod = |namespace: &str, tier: &str| KubernetesMetadata {
            namespace: Some(namespace.to_string()),
            pod_name: Some("web-7d9f-abcde".to_string()),
            pod_uid: Some("8d1f0c3a-7b2e-4c55-9f4d-2a6b1e0c9d73".to_string()),
            container_name: Some("app".to_string()),
            owner: Some(Workload {
                kind: WorkloadKind::Deployment,
                name: "web".to_string(),
            }),
            pod_labels: [("tier".to_string(), tier.to_string())].into(),
            ..KubernetesMetadata::default()
        };
        let in_container = |source: &KubernetesSource, id: &str| {
            let mut facts = ProcfsFacts::new(5_000_000, None, None, None, Some(source));
            facts.cgroup = Some(container::CgroupIds {
                container_id: Some(id.to_string()),
                pod_uid: None,
            });
            rules.selects(&mut facts)
        };
        let container = "3f2a9c".repeat(10) + "abcd";
        assert!(
            !in_container(&source, &container),
            "the pod is not known yet"
        );
        let upsert = |metadata: KubernetesMetadata| PodChange::Upsert {
            pod_uid: metadata.pod_uid.clone().unwrap(),
            containers: vec![(container.clone(), metadata)],
        };
        sender.try_send(upsert(pod("shop", "frontend"))).unwrap();
        assert_eq!(source.poll().len(), 1);
        assert!(in_container(&source, &container));
        assert!(!in_container(&source, &"0".repeat(64)), "another container");
        sender.try_send(upsert(pod("shop", "backend"))).unwrap();
        source.poll();
        assert!(!in_container(&source, &container), "its label changed");
        sender.try_send(upsert(pod("other", "frontend"))).unwrap();
        source.poll();
        assert!(!in_container(&source, &container), "another namespace");
    }

    #[test]
    fn a_pid_rule_covers_descendants() {
        use discovery::ProcessFacts;
        let parent = std::os::unix::process::parent_id();
        let mut facts = ProcfsFacts::new(std::process::id(), None, None, None, None);
        assert!(facts.descends_from(parent));
        assert!(!facts.descends_from(u32::MAX - 1));
        let rules = Discovery::new(vec![Rule::pid(parent)], vec![]);
        assert!(rules.selects(&mut facts));
    }

    /// Above the kernel's PID_MAX_LIMIT (4M): no process has it, as for a client gone before
    /// the agent read procfs.
    const GONE: u32 = 5_000_000;

    fn exec_of_gone(path: &[u8]) -> Arc<Resource> {
        let mut processes = Processes::new(Discovery::default());
        processes.on_exec(
            GONE,
            b"curl\0",
            path,
            &mut socket_tables::SocketTables::default(),
        );
        processes.resource(GONE)
    }

    fn str_attribute(resource: &Resource, key: &str) -> Option<String> {
        match resource.get(key)? {
            AttributeValue::Str(s) => Some(s.to_string()),
            other => panic!("{key}: {other:?}"),
        }
    }

    #[test]
    fn a_process_gone_before_procfs_keeps_the_exec_path_symlinks_resolved() {
        let exe = std::fs::canonicalize(std::env::current_exe().unwrap()).unwrap();
        let link = std::env::temp_dir().join(format!("kspan-exec-link-{}", std::process::id()));
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&exe, &link).unwrap();
        let resource = exec_of_gone(link.as_os_str().as_bytes());
        std::fs::remove_file(&link).unwrap();
        let exe = exe.to_str().unwrap();
        assert_eq!(
            str_attribute(&resource, "process.executable.path").as_deref(),
            Some(exe),
            "the same answer as /proc/PID/exe: the link's target"
        );
        assert_eq!(
            str_attribute(&resource, "process.executable.name"),
            Some(procfs_scan::file_name(Path::new(exe)))
        );
        assert_eq!(
            resource.get("process.pid"),
            Some(&AttributeValue::Int(GONE as i64))
        );
        // A file no longer there: the path as executed.
        let resource = exec_of_gone(b"/nonexistent/kspan-test/client");
        assert_eq!(
            str_attribute(&resource, "process.executable.path").as_deref(),
            Some("/nonexistent/kspan-test/client")
        );
    }

    #[test]
    fn a_relative_or_fd_exec_path_is_no_full_path() {
        let resource = exec_of_gone(b"./a-client-with-a-long-name");
        assert_eq!(resource.get("process.executable.path"), None);
        assert_eq!(
            str_attribute(&resource, "process.executable.name").as_deref(),
            Some("a-client-with-a-long-name"),
            "the file name, not the 15-byte comm"
        );
        // fexecve: /dev/fd/N resolved by the agent would name the agent's own fd.
        let resource = exec_of_gone(b"/dev/fd/0");
        assert_eq!(resource.get("process.executable.path"), None);
        // No path from the kernel: the comm.
        let resource = exec_of_gone(b"");
        assert_eq!(resource.get("process.executable.path"), None);
        assert_eq!(
            str_attribute(&resource, "process.executable.name").as_deref(),
            Some("curl")
        );
    }

    #[test]
    fn procfs_comes_before_the_exec_path() {
        let mut processes = Processes::new(Discovery::default());
        let pid = std::process::id();
        processes.on_exec(
            pid,
            b"other\0",
            b"/nonexistent/other",
            &mut socket_tables::SocketTables::default(),
        );
        let exe = procfs_scan::exe_path(pid).unwrap();
        assert_eq!(
            str_attribute(&processes.resource(pid), "process.executable.path"),
            Some(exe.to_string_lossy().into_owned())
        );
    }

    #[test]
    fn an_exe_selector_matches_the_exec_path_of_a_gone_process() {
        let mut processes = Processes::new(Discovery::new(
            vec![Rule::exe("/nonexistent/kspan-test/*").unwrap()],
            vec![],
        ));
        let mut tables = socket_tables::SocketTables::default();
        assert_eq!(
            processes.on_exec(
                GONE,
                b"client\0",
                b"/nonexistent/kspan-test/client",
                &mut tables
            ),
            ExecDecision::Trace
        );
        assert_eq!(
            processes.on_exec(GONE + 1, b"client\0", b"/elsewhere/client", &mut tables),
            ExecDecision::Untrace
        );
    }
}
