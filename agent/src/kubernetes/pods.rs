//! What kspan keeps of a pod the API server sends: its metadata once per container, keyed by
//! the container's runtime id (the id a process's cgroup names), and the pod's controller before
//! it is resolved to a workload.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::objects::Pod;

use crate::process::resource::{KubernetesMetadata, Workload, WorkloadKind};

/// The annotation `kubectl apply` leaves on what it applied: a copy of the whole manifest, often
/// kilobytes, that neither `service.name` nor a discovery rule has a use for.
const LAST_APPLIED_ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// The label the Deployment controller puts on its ReplicaSets' pods; the ReplicaSet is named
/// `<deployment>-<hash>`.
const POD_TEMPLATE_HASH_LABEL: &str = "pod-template-hash";

/// An object's controller, as its `ownerReferences` name it (the one with `controller: true`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ControllerRef {
    pub kind: String,
    pub name: String,
    pub uid: String,
}

/// The controller of the object `metadata` describes, if any.
pub(super) fn controller_of(metadata: &ObjectMeta) -> Option<ControllerRef> {
    metadata
        .owner_references
        .as_deref()?
        .iter()
        .find(|owner| owner.controller == Some(true))
        .map(|owner| ControllerRef {
            kind: owner.kind.clone(),
            name: owner.name.clone(),
            uid: owner.uid.clone(),
        })
}

/// The workload a controller of kind `kind` is, when its kind is a workload: a ReplicaSet or a
/// Job needs a look at its own controller first (see `owners.rs`).
pub(super) fn direct_workload(controller: &ControllerRef) -> Option<Workload> {
    let kind = match controller.kind.as_str() {
        "StatefulSet" => WorkloadKind::StatefulSet,
        "DaemonSet" => WorkloadKind::DaemonSet,
        _ => return None,
    };
    Some(Workload {
        kind,
        name: controller.name.clone(),
    })
}

/// The Deployment of a pod's ReplicaSet as its name says, for when the ReplicaSet cannot be
/// read: `<deployment>-<pod-template-hash>`, the hash being the pod's label.
pub(super) fn deployment_by_name(pod: &Pod, replica_set_name: &str) -> Option<Workload> {
    let hash = pod.metadata.labels.as_ref()?.get(POD_TEMPLATE_HASH_LABEL)?;
    let deployment = replica_set_name
        .strip_suffix(hash.as_str())?
        .strip_suffix('-')
        .filter(|name| !name.is_empty())?;
    Some(Workload {
        kind: WorkloadKind::Deployment,
        name: deployment.to_string(),
    })
}

/// The id a container runtime gave a container, without the runtime's scheme:
/// `containerd://<id>`, `cri-o://<id>`, `docker://<id>` as the kubelet reports them. None when
/// the container has not started yet (the kubelet reports an empty id).
pub(super) fn runtime_container_id(reported: &str) -> Option<&str> {
    let id = reported
        .split_once("://")
        .map_or(reported, |(_scheme, id)| id);
    (!id.is_empty()).then_some(id)
}

/// Every container of `pod` that has a runtime id, as (container id, container name): regular,
/// init and ephemeral containers.
pub(super) fn containers(pod: &Pod) -> Vec<(String, String)> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    [
        &status.container_statuses,
        &status.init_container_statuses,
        &status.ephemeral_container_statuses,
    ]
    .into_iter()
    .flatten()
    .flatten()
    .filter_map(|container| {
        let id = runtime_container_id(container.container_id.as_deref()?)?;
        Some((id.to_string(), container.name.clone()))
    })
    .collect()
}

/// The pod's metadata for each of its containers (see [`containers`]), `owner` being the
/// workload its controller resolved to.
pub(super) fn container_metadata(
    pod: &Pod,
    owner: Option<Workload>,
) -> Vec<(String, KubernetesMetadata)> {
    let metadata = &pod.metadata;
    let mut annotations = metadata.annotations.clone().unwrap_or_default();
    annotations.remove(LAST_APPLIED_ANNOTATION);
    let pod_metadata = KubernetesMetadata {
        namespace: metadata.namespace.clone(),
        pod_name: metadata.name.clone(),
        pod_uid: metadata.uid.clone(),
        container_name: None,
        node_name: pod.spec.as_ref().and_then(|spec| spec.node_name.clone()),
        owner,
        pod_labels: metadata.labels.clone().unwrap_or_default(),
        pod_annotations: annotations,
    };
    containers(pod)
        .into_iter()
        .map(|(id, name)| {
            let metadata = KubernetesMetadata {
                container_name: Some(name),
                ..pod_metadata.clone()
            };
            (id, metadata)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::super::objects::{ContainerStatus, PodStatus};
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
    use std::collections::BTreeMap;

    #[test]
    fn runtime_schemes_are_stripped() {
        let id = "3f4e9a1c0b7d2e8f5a6c9d0e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c";
        for scheme in ["containerd", "cri-o", "docker"] {
            assert_eq!(
                runtime_container_id(&format!("{scheme}://{id}")),
                Some(id),
                "{scheme}"
            );
        }
        // A runtime kspan does not know keeps its id as reported.
        assert_eq!(runtime_container_id(id), Some(id));
        // Not started yet.
        assert_eq!(runtime_container_id(""), None);
        assert_eq!(runtime_container_id("containerd://"), None);
    }

    fn owner_reference(kind: &str, name: &str, controller: Option<bool>) -> OwnerReference {
        OwnerReference {
            api_version: "apps/v1".into(),
            kind: kind.into(),
            name: name.into(),
            uid: format!("{name}-uid"),
            controller,
            block_owner_deletion: controller,
        }
    }

    #[test]
    fn the_controller_is_the_reference_marked_controller() {
        let metadata = ObjectMeta {
            owner_references: Some(vec![
                owner_reference("ConfigMap", "not-a-controller", None),
                owner_reference("ReplicaSet", "web-7d4b9c8f5", Some(true)),
            ]),
            ..ObjectMeta::default()
        };
        assert_eq!(
            controller_of(&metadata),
            Some(ControllerRef {
                kind: "ReplicaSet".into(),
                name: "web-7d4b9c8f5".into(),
                uid: "web-7d4b9c8f5-uid".into(),
            })
        );
        let only_owner = ObjectMeta {
            owner_references: Some(vec![owner_reference("ReplicaSet", "rs", Some(false))]),
            ..ObjectMeta::default()
        };
        assert_eq!(controller_of(&only_owner), None);
        assert_eq!(controller_of(&ObjectMeta::default()), None);
    }

    fn pod_with_hash(hash: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                labels: hash.map(|h| BTreeMap::from([(POD_TEMPLATE_HASH_LABEL.into(), h.into())])),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        }
    }

    #[test]
    fn a_deployment_is_named_from_its_replica_set_only_with_the_template_hash() {
        let deployment = |name: &str| {
            Some(Workload {
                kind: WorkloadKind::Deployment,
                name: name.into(),
            })
        };
        let pod = pod_with_hash(Some("7d4b9c8f5"));
        assert_eq!(
            deployment_by_name(&pod, "web-api-7d4b9c8f5"),
            deployment("web-api")
        );
        // Not a name the Deployment controller makes.
        assert_eq!(deployment_by_name(&pod, "web-api-55d8f"), None);
        assert_eq!(deployment_by_name(&pod, "7d4b9c8f5"), None);
        assert_eq!(deployment_by_name(&pod, "-7d4b9c8f5"), None);
        assert_eq!(
            deployment_by_name(&pod_with_hash(None), "web-7d4b9c8f5"),
            None
        );
    }

    #[test]
    fn containers_without_an_id_are_left_out() {
        let status = |name: &str, id: Option<&str>| ContainerStatus {
            name: name.into(),
            container_id: id.map(String::from),
        };
        let pod = Pod {
            status: Some(PodStatus {
                container_statuses: Some(vec![
                    status("app", Some("containerd://aa")),
                    status("starting", None),
                ]),
                init_container_statuses: Some(vec![status("init", Some("containerd://bb"))]),
                ephemeral_container_statuses: Some(vec![status("debug", Some("containerd://cc"))]),
            }),
            ..Pod::default()
        };
        assert_eq!(
            containers(&pod),
            [("aa", "app"), ("bb", "init"), ("cc", "debug")]
                .map(|(id, name)| (id.to_string(), name.to_string()))
        );
        assert!(containers(&Pod::default()).is_empty());
    }
}
