//! The container and the Kubernetes pod a process runs in, from its cgroup path
//! (`/proc/PID/cgroup`). No container runtime or API is asked: the runtimes name their cgroups
//! after the container id, and the kubelet names a pod's cgroup after the pod's uid.
//!
//! The formats handled, as other agents and detectors see them (OpenTelemetry Go SDK
//! `sdk/resource/container.go`; OBI, the OpenTelemetry eBPF Instrumentation, and Beyla
//! `pkg/internal/helpers/container/container_test.go`; the kubelet's cgroup naming):
//! - containerd, Kubernetes systemd cgroup driver (cgroup v2 or v1):
//!   `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid, '-' as '_'>.slice/cri-containerd-<id>.scope`
//!   (Guaranteed pods have no QoS level: `/kubepods.slice/kubepods-pod<uid>.slice/...`);
//! - CRI-O, the same with `crio-<id>.scope`; `crio-conmon-<id>.scope` is CRI-O's monitor
//!   process of that container, not the container;
//! - the cgroupfs driver: `/kubepods/burstable/pod<uid>/<id>`;
//! - Docker: `/docker/<id>` (cgroupfs), `/system.slice/docker-<id>.scope` (systemd);
//! - Podman: `/machine.slice/libpod-<id>.scope`, rootless
//!   `/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-<id>.scope/container`;
//! - nesting, as kind, k3d and minikube nodes are containers themselves:
//!   `/docker/<node>/kubelet.slice/.../cri-containerd-<id>.scope` or
//!   `/system.slice/docker-<node>.scope/kubepods/burstable/pod<uid>/<id>`: the innermost id is
//!   the process's container;
//! - paths relative to the reader's cgroup namespace: kspan in a pod with a private cgroup
//!   namespace (the default on cgroup v2) reads other pods' cgroups as
//!   `/../../kubepods-besteffort-pod<uid>.slice/cri-containerd-<id>.scope`.
//!
//! A static pod's uid in its cgroup is the kubelet's hash of its manifest (32 hex digits), not
//! the uid of its mirror pod in the API.

/// What a process's cgroup says about its container and pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupIds {
    /// The runtime's container id: 64 lowercase hex digits.
    pub container_id: Option<String>,
    /// The Kubernetes pod uid, with dashes (`8d1f0c3a-7b2e-4c55-9f4d-2a6b1e0c9d73`).
    pub pod_uid: Option<String>,
}

/// The container and pod of process `pid`; nothing known when the process is gone or its
/// cgroup unreadable.
pub fn read(pid: u32) -> CgroupIds {
    match std::fs::read(format!("/proc/{pid}/cgroup")) {
        // Cgroup names are bytes; the parts that matter here are ASCII.
        Ok(bytes) => parse(&String::from_utf8_lossy(&bytes)),
        Err(_) => CgroupIds::default(),
    }
}

/// Parses a `/proc/PID/cgroup` file: one `hierarchy-id:controllers:path` line per hierarchy
/// (cgroup v1: many; v2: the single `0::path`; hybrid hosts: both). The line that says the
/// most wins (container and pod, then container, then pod); on a tie the v2 line, which is
/// where the kubelet and runtimes put processes on a hybrid host.
pub fn parse(cgroup_file: &str) -> CgroupIds {
    let mut best = CgroupIds::default();
    let mut best_rank = 0;
    for line in cgroup_file.lines() {
        // The path is everything after the second ':' (it may hold ':' itself).
        let mut fields = line.splitn(3, ':');
        let (Some(hierarchy), Some(_controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let ids = parse_path(path.trim_end());
        let says = 2 * u8::from(ids.container_id.is_some()) + u8::from(ids.pod_uid.is_some());
        let rank = 2 * says + u8::from(hierarchy == "0");
        if says > 0 && rank > best_rank {
            best = ids;
            best_rank = rank;
        }
    }
    best
}

/// The innermost container id of one cgroup path, and the innermost pod uid at or above it.
fn parse_path(path: &str) -> CgroupIds {
    let components: Vec<&str> = path.split('/').collect();
    let container = components
        .iter()
        .enumerate()
        .rev()
        .find_map(|(i, name)| Some((i, container_id_of(name)?)));
    // The pod's cgroup is the container's parent (or the same component, in the `:` form).
    let pod_search_end = container.as_ref().map_or(components.len(), |(i, _)| i + 1);
    let pod_uid = components[..pod_search_end]
        .iter()
        .rev()
        .find_map(|name| pod_uid_of(name));
    CgroupIds {
        container_id: container.map(|(_, id)| id),
        pod_uid,
    }
}

/// A container id named by one cgroup: `<id>`, `<runtime>-<id>.scope` (cri-containerd, crio,
/// docker, libpod, and other runtimes' same pattern), or `...:<runtime>:<id>` (containerd with a
/// systemd-style cgroups path under the cgroupfs driver).
fn container_id_of(name: &str) -> Option<String> {
    let name = name.strip_suffix(".scope").unwrap_or(name);
    let (runtime, id) = match name.rfind(['-', ':']) {
        Some(at) => (&name[..at], &name[at + 1..]),
        None => ("", name),
    };
    // conmon is the process CRI-O and Podman run beside each container to watch it.
    if runtime.ends_with("conmon") || !is_lower_hex(id, 64) {
        return None;
    }
    Some(id.to_string())
}

/// A pod uid named by one cgroup: `pod<uid>` (cgroupfs driver) or
/// `kubepods[-<qos>]-pod<uid with '_'>.slice` (systemd driver, where '-' means nesting).
fn pod_uid_of(name: &str) -> Option<String> {
    // The `:` form holds the container after the pod's slice: `<slice>:cri-containerd:<id>`.
    let name = name.split(':').next().unwrap_or(name);
    let name = name.strip_suffix(".slice").unwrap_or(name);
    let uid = match name.strip_prefix("pod") {
        Some(uid) => uid,
        None if name.contains("kubepods") => name.rsplit_once("-pod")?.1,
        None => return None,
    };
    let uid = uid.replace('_', "-");
    is_pod_uid(&uid).then_some(uid)
}

/// A UUID (`8-4-4-4-12` lowercase hex digits), or the 32 hex digits of a static pod's hash.
fn is_pod_uid(uid: &str) -> bool {
    if is_lower_hex(uid, 32) {
        return true;
    }
    let groups: Vec<&str> = uid.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(group, len)| is_lower_hex(group, len))
}

fn is_lower_hex(text: &str, len: usize) -> bool {
    text.len() == len && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "40c03570b6f4c30bc8d69923d37ee698f5cfcced92c7b7df1c47f6f7887378a9";
    const NODE: &str = "8afe480d66074930353da456a1344caca810fe31c1e31f6e08c95a66887235d6";
    const UID: &str = "dde1244b-5bb5-4297-b544-85f3bc0d80bf";
    const UID_SYSTEMD: &str = "dde1244b_5bb5_4297_b544_85f3bc0d80bf";

    fn ids(container_id: Option<&str>, pod_uid: Option<&str>) -> CgroupIds {
        CgroupIds {
            container_id: container_id.map(str::to_string),
            pod_uid: pod_uid.map(str::to_string),
        }
    }

    fn in_pod() -> CgroupIds {
        ids(Some(ID), Some(UID))
    }

    #[test]
    fn containerd_under_the_systemd_driver() {
        for qos in ["burstable", "besteffort"] {
            let file = format!(
                "0::/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope\n"
            );
            assert_eq!(parse(&file), in_pod(), "{qos}");
        }
        // Guaranteed QoS: the pod's slice hangs off kubepods.slice.
        let file = format!(
            "0::/kubepods.slice/kubepods-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope\n"
        );
        assert_eq!(parse(&file), in_pod());
    }

    #[test]
    fn the_cgroupfs_driver() {
        for path in [
            format!("/kubepods/burstable/pod{UID}/{ID}"),
            format!("/kubepods/besteffort/pod{UID}/{ID}"),
            format!("/kubepods/pod{UID}/{ID}"),
        ] {
            assert_eq!(parse(&format!("0::{path}\n")), in_pod(), "{path}");
        }
    }

    #[test]
    fn cgroup_v1_with_several_controllers() {
        let path = format!("/kubepods/burstable/pod{UID}/{ID}");
        let file = format!(
            "12:hugetlb:{path}\n11:devices:{path}\n10:pids:{path}\n9:cpuset:{path}\n\
             8:perf_event:{path}\n7:net_cls,net_prio:{path}\n6:memory:{path}\n\
             5:cpu,cpuacct:{path}\n4:freezer:{path}\n3:blkio:{path}\n2:rdma:/\n\
             1:name=systemd:{path}\n"
        );
        assert_eq!(parse(&file), in_pod());
        // v1 under the systemd driver, with the root-only controllers first.
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope"
        );
        let file = format!("13:misc:/\n12:rdma:/\n11:memory:{path}\n1:name=systemd:{path}\n");
        assert_eq!(parse(&file), in_pod());
    }

    #[test]
    fn cri_o_and_not_its_conmon() {
        let pod = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_SYSTEMD}.slice"
        );
        assert_eq!(parse(&format!("0::{pod}/crio-{ID}.scope\n")), in_pod());
        // A sub-cgroup below the container's scope (as Podman's `container`) is still in it.
        assert_eq!(
            parse(&format!("0::{pod}/crio-{ID}.scope/container\n")),
            in_pod()
        );
        // The monitor process is in the pod, in no container.
        assert_eq!(
            parse(&format!("0::{pod}/crio-conmon-{ID}.scope\n")),
            ids(None, Some(UID))
        );
    }

    #[test]
    fn docker() {
        let path = format!("/docker/{ID}");
        let file = format!(
            "12:rdma:/\n11:perf_event:{path}\n10:freezer:{path}\n9:memory:{path}\n\
             3:cpu,cpuacct:{path}\n1:name=systemd:{path}\n0::/\n"
        );
        assert_eq!(parse(&file), ids(Some(ID), None), "cgroupfs driver, v1");
        assert_eq!(
            parse(&format!("0::/system.slice/docker-{ID}.scope\n")),
            ids(Some(ID), None),
            "systemd driver"
        );
        // Docker on cgroup v2 with a private cgroup namespace, read from another namespace.
        assert_eq!(parse(&format!("0::/../{ID}\n")), ids(Some(ID), None));
    }

    #[test]
    fn podman() {
        assert_eq!(
            parse(&format!("0::/machine.slice/libpod-{ID}.scope\n")),
            ids(Some(ID), None)
        );
        assert_eq!(
            parse(&format!(
                "0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container\n"
            )),
            ids(Some(ID), None),
            "rootless"
        );
        assert_eq!(
            parse(&format!("0::/machine.slice/libpod-conmon-{ID}.scope\n")),
            CgroupIds::default()
        );
        assert_eq!(
            parse(&format!("4:memory:/libpod_parent/libpod-{ID}\n")),
            ids(Some(ID), None),
            "cgroupfs"
        );
    }

    #[test]
    fn plain_host_processes_are_in_no_container() {
        for file in [
            "0::/system.slice/nginx.service\n",
            "0::/user.slice/user-1000.slice/session-3.scope\n",
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/app-gnome-firefox-4711.scope\n",
            "0::/system.slice/containerd.service\n",
            "0::/init.scope\n",
            "0::/\n",
            "12:pids:/\n11:memory:/system.slice/sshd.service\n1:name=systemd:/system.slice/sshd.service\n0::/system.slice/sshd.service\n",
            // A 32-digit job id in a v1 hierarchy is no container id.
            "4:memory:/process_api/7d03dd2c7c2a241c2d432f1e74be2a99\n0::/\n",
            // systemd's transient units: random, but not 64 hex digits.
            "0::/system.slice/run-r3a8c1d9e0f2b4a6c8e0d2f4b6a8c0e2d.scope\n",
        ] {
            assert_eq!(parse(file), CgroupIds::default(), "{file}");
        }
    }

    #[test]
    fn nested_nodes_give_the_innermost_container() {
        // kind: the node is a Docker container running systemd and containerd.
        let file = format!(
            "0::/docker/{NODE}/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope\n"
        );
        assert_eq!(parse(&file), in_pod());
        // k3d: the node's scope, then the cgroupfs driver's kubepods.
        let file =
            format!("0::/system.slice/docker-{NODE}.scope/kubepods/burstable/pod{UID}/{ID}\n");
        assert_eq!(parse(&file), in_pod());
        // A hybrid host: the v1 hierarchies say the node's container, v2 the pod's.
        let node = format!("/docker/{NODE}");
        let file = format!(
            "12:rdma:/\n10:freezer:{node}\n9:memory:{node}\n1:name=systemd:{node}\n\
             0::/docker/{NODE}/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope\n"
        );
        assert_eq!(parse(&file), in_pod());
        // A process of the node itself (containerd): in the node's container, in no pod.
        let file = format!(
            "9:memory:{node}\n1:name=systemd:{node}\n0::/system.slice/containerd.service\n"
        );
        assert_eq!(parse(&file), ids(Some(NODE), None));
    }

    #[test]
    fn paths_relative_to_another_cgroup_namespace() {
        let file = format!(
            "0::/../../kubepods-besteffort-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope\n"
        );
        assert_eq!(parse(&file), in_pod());
        let file = format!(
            "0::/../../../kubepods-burstable.slice/kubepods-burstable-pod{UID_SYSTEMD}.slice/cri-containerd-{ID}.scope\n"
        );
        assert_eq!(parse(&file), in_pod());
        let static_pod = "e039200acb850c82bb901653cc38ff6e";
        assert_eq!(
            parse(&format!("0::/../../pod{static_pod}/{ID}\n")),
            ids(Some(ID), Some(static_pod))
        );
    }

    #[test]
    fn other_containerd_layouts() {
        // Static pods: the manifest's hash stands for the uid.
        let hash = "7260904bbd08e72e4dff95d9fccd2ee8";
        let file = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{hash}.slice/cri-containerd-{ID}.scope\n"
        );
        assert_eq!(parse(&file), ids(Some(ID), Some(hash)));
        // containerd's own namespace, no Kubernetes cgroup parent.
        assert_eq!(parse(&format!("0::/k8s.io/{ID}\n")), ids(Some(ID), None));
        // A systemd-style cgroups path kept as a name by the cgroupfs driver.
        let file = format!("0::/kubepods-burstable-pod{UID_SYSTEMD}.slice:cri-containerd:{ID}\n");
        assert_eq!(parse(&file), in_pod());
        // A process in the pod's cgroup, in none of its containers.
        let file = format!("0::/kubepods/burstable/pod{UID}\n");
        assert_eq!(parse(&file), ids(None, Some(UID)));
    }

    #[test]
    fn junk_gives_nothing_and_never_panics() {
        let long = "x/".repeat(10_000);
        for file in [
            "",
            "\n\n",
            "garbage",
            "0:",
            "0::",
            "::::::",
            &format!("no colons /docker/{ID}"),
            // Not 64 lowercase hex digits.
            &format!("0::/docker/{}\n", &ID[..63]),
            &format!("0::/docker/{}0\n", ID),
            &format!("0::/docker/{}\n", ID.to_uppercase()),
            "0::/docker/abc123\n",
            "0::/kubepods/burstable/pod/\n",
            "0::/kubepods/burstable/podnot-a-uid/\n",
            "0::/kubepods.slice/kubepods-pod.slice\n",
            // A uid with its groups the wrong lengths.
            "0::/kubepods/pod8d1f0c3a7-b2e-4c55-9f4d-2a6b1e0c9d73\n",
            "0::/podman.slice\n",
            &format!("0::/{long}\n"),
            "0::/\u{fffd}\u{fffd}/\0\0\n",
        ] {
            assert_eq!(parse(file), CgroupIds::default(), "{file:.80}");
        }
    }

    #[test]
    fn reads_procfs_and_a_gone_process_has_no_ids() {
        let pid = std::process::id();
        let file = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        assert_eq!(read(pid), parse(&file));
        // Above the kernel's PID_MAX_LIMIT (4M): no process has it.
        assert_eq!(read(5_000_000), CgroupIds::default());
    }
}
