//! The resource of a traced process: the OpenTelemetry attributes that say what produced its
//! spans and metrics. Read once per process (procfs, its environment, its cgroup), and from its
//! pod's Kubernetes metadata when known.
//!
//! `service.name`, first found: the process's `OTEL_SERVICE_NAME`; `service.name` in its
//! `OTEL_RESOURCE_ATTRIBUTES`; its pod's annotation `resource.opentelemetry.io/service.name`;
//! the pod's label `app.kubernetes.io/name`; the name of the pod's owner (Deployment,
//! StatefulSet, ...); the executable's name; `unknown_service`. The Kubernetes steps follow the
//! semantic conventions' "Specify resource attributes using Kubernetes annotations"
//! (opentelemetry.io/docs/specs/semconv/non-normative/k8s-attributes), less its
//! `app.kubernetes.io/instance` step, often a Helm release name shared by several services.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use super::container::CgroupIds;
use super::{ExecImage, procfs_scan};
use crate::spans::{AttributeValue, Attributes, Resource};

/// The pod annotation that names the service (OpenTelemetry semantic conventions).
pub const SERVICE_NAME_ANNOTATION: &str = "resource.opentelemetry.io/service.name";
/// The pod annotation that names the service's namespace.
pub const SERVICE_NAMESPACE_ANNOTATION: &str = "resource.opentelemetry.io/service.namespace";
/// The well-known label of the application's name.
pub const APP_NAME_LABEL: &str = "app.kubernetes.io/name";

/// Attributes carried over from one process's `OTEL_RESOURCE_ATTRIBUTES`, at most: the
/// OpenTelemetry SDKs' default attribute count limit.
const MAX_CARRIED_ATTRIBUTES: usize = 128;
/// A longer key is skipped: keys are kept for the agent's lifetime (see `static_key`).
const MAX_KEY_LEN: usize = 256;
/// Distinct carried keys kept for the agent's lifetime, at most; past it, new keys are skipped.
const MAX_CARRIED_KEYS: usize = 1024;

/// A traced process's pod as the Kubernetes API describes it; every field may be unknown.
/// Filled by a watcher of this node's pods (not written yet).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KubernetesMetadata {
    pub namespace: Option<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    pub container_name: Option<String>,
    pub node_name: Option<String>,
    /// The workload that owns the pod, its ReplicaSet or Job resolved to the Deployment or
    /// CronJob above it when there is one.
    pub owner: Option<Workload>,
    pub pod_labels: BTreeMap<String, String>,
    pub pod_annotations: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub kind: WorkloadKind,
    pub name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
    DaemonSet,
    Job,
    CronJob,
}

impl WorkloadKind {
    /// The resource attribute that names a workload of this kind (semantic conventions).
    pub fn name_attribute(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "k8s.deployment.name",
            WorkloadKind::StatefulSet => "k8s.statefulset.name",
            WorkloadKind::DaemonSet => "k8s.daemonset.name",
            WorkloadKind::Job => "k8s.job.name",
            WorkloadKind::CronJob => "k8s.cronjob.name",
        }
    }
}

/// What procfs (or the exec event) says about a process: the inputs of its resource besides
/// Kubernetes.
#[derive(Clone, Debug, Default)]
struct ProcessFacts {
    pid: u32,
    executable_name: Option<String>,
    executable_path: Option<PathBuf>,
    /// Its `OTEL_SERVICE_NAME`.
    otel_service_name: Option<String>,
    /// Its `OTEL_RESOURCE_ATTRIBUTES`, parsed.
    otel_resource_attributes: Vec<(String, String)>,
    cgroup: CgroupIds,
}

/// The resource of process `pid`: procfs first (the resolved path of the image running now),
/// the exec event when the process is gone. `kubernetes`: its pod, when known.
pub(super) fn read_resource(
    pid: u32,
    host_name: &str,
    exec: Option<&ExecImage>,
    cgroup: CgroupIds,
    kubernetes: Option<&KubernetesMetadata>,
) -> Resource {
    let executable_path =
        procfs_scan::exe_path(pid).or_else(|| exec.and_then(ExecImage::full_path));
    let executable_name = executable_path
        .as_deref()
        .map(procfs_scan::file_name)
        .or_else(|| procfs_scan::command_name(pid))
        .or_else(|| exec.map(ExecImage::name));
    let [otel_service_name, otel_resource_attributes] =
        procfs_scan::environment_variables(pid, ["OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"]);
    let facts = ProcessFacts {
        pid,
        executable_name,
        executable_path,
        otel_service_name,
        otel_resource_attributes: otel_resource_attributes
            .as_deref()
            .map(parse_resource_attributes)
            .unwrap_or_default(),
        cgroup,
    };
    build_resource(&facts, host_name, kubernetes)
}

/// The node's name: `NODE_NAME` in kspan's pod (the chart sets it from `spec.nodeName`; the
/// pod's own host name is not the node's unless it shares the node's network), else the host
/// name.
pub(super) fn host_name() -> String {
    if let Some(node) = std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()) {
        return node;
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".to_string())
}

/// The resource from what is known of a process. What kspan observes (pid, executable, host,
/// container, pod) wins over the process's own `OTEL_RESOURCE_ATTRIBUTES`; its other keys are
/// carried over after kspan's.
fn build_resource(
    facts: &ProcessFacts,
    host_name: &str,
    kubernetes: Option<&KubernetesMetadata>,
) -> Resource {
    let str_value = |s: &str| AttributeValue::Str(s.into());
    let mut attributes: Attributes =
        vec![("service.name", str_value(&service_name(facts, kubernetes)))];
    if let Some(namespace) = service_namespace(facts, kubernetes) {
        attributes.push(("service.namespace", str_value(&namespace)));
    }
    attributes.push(("process.pid", AttributeValue::Int(facts.pid.into())));
    if let Some(name) = &facts.executable_name {
        attributes.push(("process.executable.name", str_value(name)));
    }
    if let Some(path) = &facts.executable_path {
        attributes.push((
            "process.executable.path",
            str_value(&path.to_string_lossy()),
        ));
    }
    attributes.push(("host.name", str_value(host_name)));
    if let Some(id) = &facts.cgroup.container_id {
        attributes.push(("container.id", str_value(id)));
    }
    let pod_field = |field: fn(&KubernetesMetadata) -> &Option<String>| {
        kubernetes
            .and_then(|pod| field(pod).as_deref())
            .filter(|value| !value.is_empty())
    };
    for (key, value) in [
        ("k8s.namespace.name", pod_field(|pod| &pod.namespace)),
        ("k8s.pod.name", pod_field(|pod| &pod.pod_name)),
        // The API's uid, else the cgroup's (the API may be unreachable).
        (
            "k8s.pod.uid",
            pod_field(|pod| &pod.pod_uid).or(facts.cgroup.pod_uid.as_deref()),
        ),
        ("k8s.container.name", pod_field(|pod| &pod.container_name)),
        ("k8s.node.name", pod_field(|pod| &pod.node_name)),
    ] {
        if let Some(value) = value {
            attributes.push((key, str_value(value)));
        }
    }
    if let Some(owner) = kubernetes
        .and_then(|pod| pod.owner.as_ref())
        .filter(|owner| !owner.name.is_empty())
    {
        attributes.push((owner.kind.name_attribute(), str_value(&owner.name)));
    }
    attributes.push(("telemetry.distro.name", str_value("kspan")));
    attributes.push((
        "telemetry.distro.version",
        str_value(env!("CARGO_PKG_VERSION")),
    ));
    for (key, value) in &facts.otel_resource_attributes {
        if attributes.iter().any(|(k, _)| k == key) {
            continue;
        }
        if let Some(key) = static_key(key) {
            attributes.push((key, str_value(value)));
        }
    }
    Resource { attributes }
}

/// `service.name`, in the order the module's documentation gives.
fn service_name(facts: &ProcessFacts, kubernetes: Option<&KubernetesMetadata>) -> String {
    let non_empty = |value: &String| {
        let value = value.trim();
        (!value.is_empty()).then(|| value.to_string())
    };
    facts
        .otel_service_name
        .as_ref()
        .and_then(non_empty)
        .or_else(|| attribute(&facts.otel_resource_attributes, "service.name"))
        .or_else(|| {
            kubernetes?
                .pod_annotations
                .get(SERVICE_NAME_ANNOTATION)
                .and_then(non_empty)
        })
        .or_else(|| {
            kubernetes?
                .pod_labels
                .get(APP_NAME_LABEL)
                .and_then(non_empty)
        })
        .or_else(|| non_empty(&kubernetes?.owner.as_ref()?.name))
        .or_else(|| facts.executable_name.clone())
        // The process is gone before we could look at it.
        .unwrap_or_else(|| "unknown_service".to_string())
}

/// `service.namespace`: the process's `OTEL_RESOURCE_ATTRIBUTES`, the pod's annotation, the
/// pod's Kubernetes namespace.
fn service_namespace(
    facts: &ProcessFacts,
    kubernetes: Option<&KubernetesMetadata>,
) -> Option<String> {
    attribute(&facts.otel_resource_attributes, "service.namespace")
        .or_else(|| {
            kubernetes?
                .pod_annotations
                .get(SERVICE_NAMESPACE_ANNOTATION)
                .filter(|v| !v.trim().is_empty())
                .map(|v| v.trim().to_string())
        })
        .or_else(|| kubernetes?.namespace.clone().filter(|v| !v.is_empty()))
}

fn attribute(attributes: &[(String, String)], key: &str) -> Option<String> {
    attributes
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
}

/// Parses `OTEL_RESOURCE_ATTRIBUTES`: `key1=value1,key2=value2`, the W3C Baggage format without
/// properties; values percent-encoded (`%20`; a `+` is a plus); whitespace around keys and
/// values trimmed. An entry that is no `key=value` with a token key, a non-empty value and
/// valid escapes is skipped, and the others still count: one typo in a deployment manifest
/// should not cost the service its name. A key given twice: its last value.
pub fn parse_resource_attributes(text: &str) -> Vec<(String, String)> {
    let mut attributes: Vec<(String, String)> = Vec::new();
    for entry in text.split(',') {
        let Some((key, value)) = entry.split_once('=') else {
            continue;
        };
        let key = key.trim();
        if !is_token(key) || key.len() > MAX_KEY_LEN {
            continue;
        }
        let Some(value) = percent_decode(value.trim()) else {
            continue;
        };
        if value.is_empty() {
            continue;
        }
        attributes.retain(|(k, _)| k != key);
        if attributes.len() < MAX_CARRIED_ATTRIBUTES {
            attributes.push((key.to_string(), value));
        }
    }
    attributes
}

/// A W3C Baggage key: an HTTP token (RFC 7230 `tchar`s).
fn is_token(key: &str) -> bool {
    !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// `%XX` escapes decoded; None on a broken escape. Decoded bytes that are no UTF-8 become
/// U+FFFD, as W3C Baggage says.
fn percent_decode(text: &str) -> Option<String> {
    let hex_digit = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let high = hex_digit(*bytes.get(i + 1)?)?;
            let low = hex_digit(*bytes.get(i + 2)?)?;
            decoded.push(high << 4 | low);
            i += 3;
        } else {
            decoded.push(bytes[i]);
            i += 1;
        }
    }
    Some(String::from_utf8_lossy(&decoded).into_owned())
}

/// Distinct keys of carried attributes, leaked once each: a resource's keys are
/// `&'static str` (kspan's own are literals) and processes repeat the same few keys.
static CARRIED_KEYS: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());
static CARRIED_KEYS_FULL_WARNED: AtomicBool = AtomicBool::new(false);

/// `key` with a static lifetime, or None once `MAX_CARRIED_KEYS` distinct keys are kept.
fn static_key(key: &str) -> Option<&'static str> {
    let mut keys = CARRIED_KEYS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(&kept) = keys.get(key) {
        return Some(kept);
    }
    if keys.len() >= MAX_CARRIED_KEYS {
        if !CARRIED_KEYS_FULL_WARNED.swap(true, Ordering::Relaxed) {
            log::warn!(
                "processes' OTEL_RESOURCE_ATTRIBUTES used {MAX_CARRIED_KEYS} distinct keys: \
                 new keys (first: {key:?}) are not carried into resources; use fewer keys"
            );
        }
        return None;
    }
    let kept: &'static str = Box::leak(key.to_string().into_boxed_str());
    keys.insert(kept);
    Some(kept)
}

#[cfg(test)]
mod tests {
    use super::super::container;
    use super::*;

    fn str_attribute(resource: &Resource, key: &str) -> Option<String> {
        match resource.get(key)? {
            AttributeValue::Str(s) => Some(s.to_string()),
            other => panic!("{key}: {other:?}"),
        }
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn python() -> ProcessFacts {
        ProcessFacts {
            pid: 4242,
            executable_name: Some("python3.11".into()),
            executable_path: Some("/usr/bin/python3.11".into()),
            ..ProcessFacts::default()
        }
    }

    fn checkout_pod() -> KubernetesMetadata {
        KubernetesMetadata {
            namespace: Some("shop".into()),
            pod_name: Some("checkout-7d9f8b6c5-x2x4q".into()),
            pod_uid: Some("8d1f0c3a-7b2e-4c55-9f4d-2a6b1e0c9d73".into()),
            container_name: Some("app".into()),
            node_name: Some("node-a".into()),
            owner: Some(Workload {
                kind: WorkloadKind::Deployment,
                name: "checkout".into(),
            }),
            ..KubernetesMetadata::default()
        }
    }

    #[test]
    fn service_name_order() {
        let mut facts = python();
        facts.otel_service_name = Some("from-env".into());
        facts.otel_resource_attributes = pairs(&[("service.name", "from-attributes")]);
        let mut pod = checkout_pod();
        pod.pod_annotations
            .insert(SERVICE_NAME_ANNOTATION.into(), "from-annotation".into());
        pod.pod_labels
            .insert(APP_NAME_LABEL.into(), "from-label".into());
        let mut expected = Vec::new();
        let mut got = Vec::new();
        let mut step = |facts: &ProcessFacts, pod: &KubernetesMetadata, want: &str| {
            got.push(service_name(facts, Some(pod)));
            expected.push(want.to_string());
        };
        step(&facts, &pod, "from-env");
        facts.otel_service_name = None;
        step(&facts, &pod, "from-attributes");
        facts.otel_resource_attributes.clear();
        step(&facts, &pod, "from-annotation");
        pod.pod_annotations.clear();
        step(&facts, &pod, "from-label");
        pod.pod_labels.clear();
        step(&facts, &pod, "checkout");
        pod.owner = None;
        step(&facts, &pod, "python3.11");
        facts.executable_name = None;
        step(&facts, &pod, "unknown_service");
        assert_eq!(got, expected);
    }

    #[test]
    fn empty_names_fall_through_to_the_next_step() {
        let mut facts = python();
        facts.otel_service_name = Some("  ".into());
        let mut pod = checkout_pod();
        pod.pod_annotations
            .insert(SERVICE_NAME_ANNOTATION.into(), "".into());
        pod.pod_labels.insert(APP_NAME_LABEL.into(), " ".into());
        assert_eq!(service_name(&facts, Some(&pod)), "checkout");
        // Surrounding whitespace is no part of a name.
        facts.otel_service_name = Some(" cart \n".into());
        assert_eq!(service_name(&facts, Some(&pod)), "cart");
        // Without Kubernetes metadata: the environment, then the executable.
        facts.otel_service_name = None;
        assert_eq!(service_name(&facts, None), "python3.11");
    }

    #[test]
    fn a_plain_host_process_has_the_same_resource_as_before() {
        let mut facts = python();
        facts.otel_service_name = Some("billing".into());
        let resource = build_resource(&facts, "host-1", None);
        let s = |v: &str| AttributeValue::Str(v.into());
        assert_eq!(
            resource.attributes,
            vec![
                ("service.name", s("billing")),
                ("process.pid", AttributeValue::Int(4242)),
                ("process.executable.name", s("python3.11")),
                ("process.executable.path", s("/usr/bin/python3.11")),
                ("host.name", s("host-1")),
                ("telemetry.distro.name", s("kspan")),
                ("telemetry.distro.version", s(env!("CARGO_PKG_VERSION"))),
            ]
        );
    }

    #[test]
    fn kubernetes_attributes_when_known() {
        let mut facts = python();
        facts.cgroup = CgroupIds {
            container_id: Some("ab".repeat(32)),
            pod_uid: Some("00000000-0000-0000-0000-000000000000".into()),
        };
        let resource = build_resource(&facts, "node-a", Some(&checkout_pod()));
        for (key, value) in [
            ("service.name", "checkout"),
            ("service.namespace", "shop"),
            ("container.id", &"ab".repeat(32)),
            ("k8s.namespace.name", "shop"),
            ("k8s.pod.name", "checkout-7d9f8b6c5-x2x4q"),
            // The API's uid wins over the cgroup's.
            ("k8s.pod.uid", "8d1f0c3a-7b2e-4c55-9f4d-2a6b1e0c9d73"),
            ("k8s.container.name", "app"),
            ("k8s.node.name", "node-a"),
            ("k8s.deployment.name", "checkout"),
        ] {
            assert_eq!(
                str_attribute(&resource, key).as_deref(),
                Some(value),
                "{key}"
            );
        }
        // Each owner kind under its own attribute, and only that one.
        let kinds = [
            WorkloadKind::Deployment,
            WorkloadKind::StatefulSet,
            WorkloadKind::DaemonSet,
            WorkloadKind::Job,
            WorkloadKind::CronJob,
        ];
        for kind in kinds {
            let mut pod = checkout_pod();
            pod.owner = Some(Workload {
                kind,
                name: "owner".into(),
            });
            let resource = build_resource(&facts, "node-a", Some(&pod));
            for other in kinds {
                assert_eq!(
                    str_attribute(&resource, other.name_attribute()),
                    (other == kind).then(|| "owner".to_string()),
                    "{kind:?}"
                );
            }
        }
        // Unknown metadata adds nothing; the cgroup still gives the container and pod uid.
        let resource = build_resource(&facts, "node-a", Some(&KubernetesMetadata::default()));
        assert_eq!(
            str_attribute(&resource, "k8s.pod.uid").as_deref(),
            Some("00000000-0000-0000-0000-000000000000")
        );
        assert!(resource.get("container.id").is_some());
        for key in ["service.namespace", "k8s.namespace.name", "k8s.pod.name"] {
            assert_eq!(resource.get(key), None, "{key}");
        }
        assert_eq!(
            str_attribute(&resource, "service.name").as_deref(),
            Some("python3.11")
        );
    }

    #[test]
    fn service_namespace_order() {
        let mut facts = python();
        let mut pod = checkout_pod();
        let namespace = |facts: &ProcessFacts, pod: &KubernetesMetadata| {
            str_attribute(&build_resource(facts, "h", Some(pod)), "service.namespace")
        };
        assert_eq!(namespace(&facts, &pod).as_deref(), Some("shop"));
        pod.pod_annotations
            .insert(SERVICE_NAMESPACE_ANNOTATION.into(), "payments".into());
        assert_eq!(namespace(&facts, &pod).as_deref(), Some("payments"));
        facts.otel_resource_attributes = pairs(&[("service.namespace", "team-a")]);
        assert_eq!(namespace(&facts, &pod).as_deref(), Some("team-a"));
        // Only once in the resource.
        let resource = build_resource(&facts, "h", Some(&pod));
        let count = resource
            .attributes
            .iter()
            .filter(|(k, _)| *k == "service.namespace")
            .count();
        assert_eq!(count, 1);
    }

    #[test]
    fn other_resource_attributes_are_carried_under_kspans_own() {
        let mut facts = python();
        facts.cgroup.container_id = Some("cd".repeat(32));
        facts.otel_resource_attributes = pairs(&[
            ("deployment.environment.name", "prod"),
            ("host.name", "spoofed"),
            ("process.pid", "1"),
            ("telemetry.distro.name", "other"),
            ("container.id", "spoofed"),
            ("k8s.pod.name", "from-the-operator"),
            ("service.version", "1.4.2"),
        ]);
        let resource = build_resource(&facts, "host-1", Some(&checkout_pod()));
        assert_eq!(
            str_attribute(&resource, "host.name").as_deref(),
            Some("host-1")
        );
        assert_eq!(
            resource.get("process.pid"),
            Some(&AttributeValue::Int(4242))
        );
        assert_eq!(
            str_attribute(&resource, "telemetry.distro.name").as_deref(),
            Some("kspan")
        );
        assert_eq!(
            str_attribute(&resource, "container.id"),
            Some("cd".repeat(32))
        );
        assert_eq!(
            str_attribute(&resource, "k8s.pod.name").as_deref(),
            Some("checkout-7d9f8b6c5-x2x4q")
        );
        // The others, once each, after kspan's own, in the process's order.
        let keys: Vec<&str> = resource.attributes.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            keys[keys.len() - 2..],
            ["deployment.environment.name", "service.version"]
        );
        let unique: BTreeSet<&str> = keys.iter().copied().collect();
        assert_eq!(unique.len(), keys.len(), "{keys:?}");
        // Without kspan's metadata, what the process says about its pod is kept.
        let resource = build_resource(&facts, "host-1", None);
        assert_eq!(
            str_attribute(&resource, "k8s.pod.name").as_deref(),
            Some("from-the-operator")
        );
    }

    #[test]
    fn resource_attributes_are_percent_decoded_and_trimmed() {
        assert_eq!(
            parse_resource_attributes(
                " service.name = cart ,team=payments%20%26%20billing,url=a%3Db%2Cc,\
                 plus=a+b,accent=caf%C3%A9,eq=x=y, spaced = in side "
            ),
            pairs(&[
                ("service.name", "cart"),
                ("team", "payments & billing"),
                ("url", "a=b,c"),
                ("plus", "a+b"),
                ("accent", "café"),
                ("eq", "x=y"),
                ("spaced", "in side"),
            ])
        );
        // Escapes that decode to no UTF-8: the replacement character.
        assert_eq!(
            parse_resource_attributes("bytes=%FF%FEok"),
            pairs(&[("bytes", "\u{fffd}\u{fffd}ok")])
        );
        // Upper and lower case hex digits.
        assert_eq!(parse_resource_attributes("a=%2f%2F"), pairs(&[("a", "//")]));
    }

    #[test]
    fn bad_resource_attribute_entries_are_skipped_not_fatal() {
        assert_eq!(
            parse_resource_attributes(
                "good=1,,novalue,=v,empty=,blank=  ,bad key=v,trunc=%4,broken=%zz,\
                 sign=%+1,end=50%,dup=first,dup=last,utf8ké=v,good2=2"
            ),
            pairs(&[("good", "1"), ("dup", "last"), ("good2", "2")])
        );
        for junk in ["", ",", " , , ", "=", "==", "%%%", "\u{0}=\u{0}"] {
            assert_eq!(parse_resource_attributes(junk), vec![], "{junk:?}");
        }
        // A key is kept for the agent's lifetime: a very long one is skipped.
        let long_key = format!("{}=v", "k".repeat(MAX_KEY_LEN + 1));
        assert_eq!(parse_resource_attributes(&long_key), vec![]);
        // At most MAX_CARRIED_ATTRIBUTES entries.
        let many: Vec<String> = (0..MAX_CARRIED_ATTRIBUTES + 10)
            .map(|i| format!("k{i}=v"))
            .collect();
        let parsed = parse_resource_attributes(&many.join(","));
        assert_eq!(parsed.len(), MAX_CARRIED_ATTRIBUTES);
        assert_eq!(parsed[0].0, "k0");
    }

    #[test]
    fn carried_keys_are_kept_once() {
        let first = static_key("kspan.test.interned").unwrap();
        let again = static_key(&String::from("kspan.test.interned")).unwrap();
        assert!(std::ptr::eq(first, again));
    }

    /// Above the kernel's PID_MAX_LIMIT (4M): no process has it.
    const GONE: u32 = 5_000_000;

    #[test]
    fn a_gone_process_without_an_exec_event_is_an_unknown_service() {
        let resource = read_resource(GONE, "h", None, container::read(GONE), None);
        assert_eq!(
            str_attribute(&resource, "service.name").as_deref(),
            Some("unknown_service")
        );
        assert_eq!(resource.get("container.id"), None);
    }

    #[test]
    fn reads_a_child_process_environment_and_cgroup() {
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .env("OTEL_SERVICE_NAME", "checkout")
            .env(
                "OTEL_RESOURCE_ATTRIBUTES",
                "service.name=ignored,deployment.environment.name=prod%20eu, team = payments ,\
                 host.name=spoofed,broken=%z",
            )
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        // spawn may return before the exec is complete: natively after the memory is replaced
        // but before the kernel sets the new environment's bounds (an empty environ until
        // then); under qemu-user, whose vfork is a fork, even before the exec (the environ is
        // still the test's). Bounded wait until the child is `sleep` with an environment.
        let exec_done = || {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|exe| exe.file_name().is_some_and(|name| name == "sleep"))
                && std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| !env.is_empty())
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !exec_done() && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        let resource = read_resource(pid, "test-host", None, container::read(pid), None);
        let own_cgroup = container::read(std::process::id());
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(
            str_attribute(&resource, "service.name").as_deref(),
            Some("checkout")
        );
        assert_eq!(
            str_attribute(&resource, "deployment.environment.name").as_deref(),
            Some("prod eu")
        );
        assert_eq!(
            str_attribute(&resource, "team").as_deref(),
            Some("payments")
        );
        assert_eq!(
            str_attribute(&resource, "host.name").as_deref(),
            Some("test-host")
        );
        assert_eq!(resource.get("broken"), None);
        assert_eq!(
            str_attribute(&resource, "process.executable.name").as_deref(),
            Some("sleep")
        );
        assert_eq!(
            resource.get("process.pid"),
            Some(&AttributeValue::Int(pid.into()))
        );
        // The child shares this process's cgroup.
        assert_eq!(
            str_attribute(&resource, "container.id"),
            own_cgroup.container_id
        );
    }
}
