//! The part of a Pod kspan reads, as its own type: serde skips the rest of each object (the
//! spec's containers, volumes, probes...) instead of building it, at every pod event, and
//! k8s-openapi's deserializer of the whole Pod is not compiled into kspan. Measured on the 2-core
//! dev machine: the kspan crate's release compile took 86 s with k8s-openapi's Pod, 31 s with
//! this (25 s without any watcher), and the stripped binary lost 1.7 MB. The field names are the
//! API's, unchanged since Kubernetes 1.0 (ephemeral containers: 1.16).

use std::borrow::Cow;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

/// A Pod (core/v1), what kspan reads of it.
#[derive(Clone, Debug, Default, Deserialize)]
pub(super) struct Pod {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: Option<PodSpec>,
    pub status: Option<PodStatus>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct PodSpec {
    pub node_name: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct PodStatus {
    pub container_statuses: Option<Vec<ContainerStatus>>,
    pub init_container_statuses: Option<Vec<ContainerStatus>>,
    pub ephemeral_container_statuses: Option<Vec<ContainerStatus>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ContainerStatus {
    pub name: String,
    /// `<runtime>://<id>`; absent or empty until the container is created.
    #[serde(rename = "containerID")]
    pub container_id: Option<String>,
}

impl kube::Resource for Pod {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Pod".into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        "pods".into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}
