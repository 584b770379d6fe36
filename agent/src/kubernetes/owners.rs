//! The workload that owns a pod: its controller, or for a ReplicaSet or a Job the controller
//! above it (a Deployment, a CronJob). One GET per ReplicaSet or Job, cached by its uid: every
//! pod of a Deployment's rollout shares one lookup, and pod events never cause one. The GET asks
//! for the metadata only (`PartialObjectMetadata`): the owner references are all kspan reads,
//! and a ReplicaSet's pod template is most of its size.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::batch::v1::Job;
use kube::{Api, Client};
use tokio::time::Instant;

use super::ApiErrors;
use super::objects::Pod;
use super::pods::{self, ControllerRef};
use crate::process::resource::{Workload, WorkloadKind};

/// ReplicaSets and Jobs remembered at most. A node runs a few hundred pods at most, so this is
/// never reached in practice; if it is, the cache starts over (and refills from live pods).
const MAX_CACHED: usize = 4096;

/// What a pod's controller resolved to.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Resolution {
    /// The workload (None: the controller is no workload kspan names, such as a bare ReplicaSet
    /// or a custom controller's).
    Known(Option<Workload>),
    /// The lookup failed: the best guess without it, to be retried.
    Failed(Option<Workload>),
}

enum Cached {
    Known(Option<Workload>),
    /// Not asked again before `retry_at`.
    Failed {
        retry_at: Instant,
    },
}

pub(super) struct Owners {
    client: Client,
    /// By the uid of the ReplicaSet or Job.
    cache: HashMap<String, Cached>,
    /// How long a failed lookup is not repeated.
    retry_after: Duration,
}

impl Owners {
    pub fn new(client: Client, retry_after: Duration) -> Owners {
        Owners {
            client,
            cache: HashMap::new(),
            retry_after,
        }
    }

    /// The workload that owns `pod`.
    pub async fn resolve(&mut self, pod: &Pod, errors: &mut ApiErrors) -> Resolution {
        let Some(controller) = pods::controller_of(&pod.metadata) else {
            return Resolution::Known(None);
        };
        if let Some(workload) = pods::direct_workload(&controller) {
            return Resolution::Known(Some(workload));
        }
        // Without a lookup: a ReplicaSet's Deployment by its name, a Job as itself.
        let guess = match controller.kind.as_str() {
            "ReplicaSet" => pods::deployment_by_name(pod, &controller.name),
            "Job" => Some(Workload {
                kind: WorkloadKind::Job,
                name: controller.name.clone(),
            }),
            _ => return Resolution::Known(None),
        };
        match self.cache.get(&controller.uid) {
            Some(Cached::Known(workload)) => return Resolution::Known(workload.clone()),
            Some(Cached::Failed { retry_at }) if Instant::now() < *retry_at => {
                return Resolution::Failed(guess);
            }
            _ => {}
        }
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        let looked_up = match controller.kind.as_str() {
            "ReplicaSet" => self.replica_set_owner(namespace, &controller).await,
            _ => self.job_owner(namespace, &controller).await,
        };
        if self.cache.len() >= MAX_CACHED {
            self.cache.clear();
        }
        match looked_up {
            Ok(workload) => {
                self.cache
                    .insert(controller.uid, Cached::Known(workload.clone()));
                Resolution::Known(workload)
            }
            // Deleted already (its pods are going too): nothing more to learn from it.
            Err(kube::Error::Api(status)) if status.code == 404 => {
                self.cache
                    .insert(controller.uid, Cached::Known(guess.clone()));
                Resolution::Known(guess)
            }
            Err(err) => {
                let what = format!(
                    "GET {} {namespace}/{} (the owner of pod {})",
                    controller.kind,
                    controller.name,
                    pod.metadata.name.as_deref().unwrap_or("?"),
                );
                errors.failed(&what, &err);
                let retry_at = Instant::now() + self.retry_after;
                self.cache
                    .insert(controller.uid, Cached::Failed { retry_at });
                Resolution::Failed(guess)
            }
        }
    }

    /// A ReplicaSet's Deployment; None for a bare ReplicaSet or another controller's.
    async fn replica_set_owner(
        &self,
        namespace: &str,
        replica_set: &ControllerRef,
    ) -> kube::Result<Option<Workload>> {
        let api: Api<ReplicaSet> = Api::namespaced(self.client.clone(), namespace);
        let replica_set = api.get_metadata(&replica_set.name).await?;
        Ok(pods::controller_of(&replica_set.metadata)
            .filter(|owner| owner.kind == "Deployment")
            .map(|owner| Workload {
                kind: WorkloadKind::Deployment,
                name: owner.name,
            }))
    }

    /// A Job's CronJob, else the Job itself.
    async fn job_owner(
        &self,
        namespace: &str,
        job: &ControllerRef,
    ) -> kube::Result<Option<Workload>> {
        let api: Api<Job> = Api::namespaced(self.client.clone(), namespace);
        let fetched = api.get_metadata(&job.name).await?;
        Ok(Some(
            match pods::controller_of(&fetched.metadata).filter(|owner| owner.kind == "CronJob") {
                Some(cron_job) => Workload {
                    kind: WorkloadKind::CronJob,
                    name: cron_job.name,
                },
                None => Workload {
                    kind: WorkloadKind::Job,
                    name: job.name.clone(),
                },
            },
        ))
    }
}
