//! Kubernetes metadata of this node's pods, from the API server, for the resources of traced
//! processes (see `process::resource`) and the `k8s_*` discovery rules.
//!
//! A thread `kspan-kubernetes` runs kube's watcher on the pods of this node only (field
//! selector `spec.nodeName=<node>`; read-only: list, watch, and a GET of each ReplicaSet and Job
//! that owns a pod, cached). It sends a [`PodChange`] through a bounded channel when what kspan
//! keeps of a pod changes; the pipeline thread drains it with [`KubernetesSource::poll`]
//! between event slices and looks processes up by their cgroup's container id or pod uid
//! ([`KubernetesSource::lookup`]). Nothing is locked on the event path.
//!
//! An API server that fails (refused connection, 5xx, 403, bad JSON) never stops tracing: the
//! watcher retries with backoff (kube's, after client-go's: 0.8 s doubling to 30 s), every
//! failure counts in `kubernetes_api_errors`, and the log says so at most once a minute.
//!
//! k8s-openapi is built for its oldest API version (1.33): kspan reads only fields that every
//! API server since 1.25 serves unchanged (pod metadata, `spec.nodeName`, the container
//! statuses, owner references), so any version would do and the oldest promises nothing newer.

mod objects;
mod owners;
mod pods;
mod watch;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use kube::runtime::utils::Backoff;
use kube::runtime::watcher::DefaultBackoff;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::process::resource::KubernetesMetadata;
use crate::stats::Stats;

/// Changes waiting for the pipeline, at most; past it the watcher waits.
const CHANNEL_CAPACITY: usize = 1024;
/// How long a failed owner lookup (ReplicaSet, Job) is not repeated.
const OWNER_RETRY: Duration = Duration::from_secs(30);
/// Failures are logged at most this often.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// An answer that stops coming for this long (a server gone without a reset) fails the request,
/// to be retried. kube's watcher has its own idle timeout, 295 s, for the watch: this one is
/// longer so as not to cut a quiet watch, and bounds the list and the owner lookups, which
/// kube's client would otherwise wait on forever.
const READ_TIMEOUT: Duration = Duration::from_secs(300);

/// What changed in one pod of this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodChange {
    /// A pod appeared or changed: its containers that have a runtime id (regular, init and
    /// ephemeral), each with the pod's metadata and its own `container_name`. Replaces what was
    /// known of the pod.
    Upsert {
        pod_uid: String,
        /// (container id as the runtime and the cgroup name it, the container's metadata).
        containers: Vec<(String, KubernetesMetadata)>,
    },
    Removed {
        pod_uid: String,
    },
}

/// The pods of this node, as the pipeline thread sees them. See the module documentation.
pub struct KubernetesSource {
    changes: mpsc::Receiver<PodChange>,
    index: PodIndex,
    node_name: String,
}

impl KubernetesSource {
    /// The changes that arrived since the last call (never waits), already applied to the
    /// lookups. A process whose pod changed may need its rules and resource looked at again.
    pub fn poll(&mut self) -> Vec<PodChange> {
        let mut changes = Vec::new();
        // At most a channel's worth: a watcher refilling it cannot hold the pipeline here.
        while changes.len() < CHANNEL_CAPACITY {
            let Ok(change) = self.changes.try_recv() else {
                break;
            };
            self.index.apply(&change);
            changes.push(change);
        }
        changes
    }

    /// The metadata of a process's container, by the container id or pod uid its cgroup
    /// names: the container's own when its id is known, else its pod's (no `container_name`).
    pub fn lookup(
        &self,
        container_id: Option<&str>,
        pod_uid: Option<&str>,
    ) -> Option<&KubernetesMetadata> {
        self.index.lookup(container_id, pod_uid)
    }

    /// The node whose pods are watched.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }
}

#[cfg(test)]
impl KubernetesSource {
    /// A source the test feeds instead of a watcher: what it sends, `poll` returns.
    pub(crate) fn fed_by_test() -> (mpsc::Sender<PodChange>, KubernetesSource) {
        let (sender, changes) = mpsc::channel(CHANNEL_CAPACITY);
        let source = KubernetesSource {
            changes,
            index: PodIndex::default(),
            node_name: "test-node".to_string(),
        };
        (sender, source)
    }
}

/// Starts watching this node's pods when kspan can reach a Kubernetes API: in a pod with a
/// service account, or with a kubeconfig (`KUBECONFIG`, `~/.kube/config`). None on a plain host
/// (logged at debug level only: nothing is wrong there). The node is `NODE_NAME` (kspan's
/// chart sets it from the pod's `spec.nodeName`), else the host name.
pub fn start(stats: Arc<Stats>) -> Option<KubernetesSource> {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            log::warn!("kubernetes: cannot start a runtime ({err}); pods will not be described");
            return None;
        }
    };
    let config = match runtime.block_on(kube::Config::infer()) {
        Ok(config) => config,
        Err(err) => {
            log::debug!("kubernetes: no API server configured, pods will not be described: {err}");
            return None;
        }
    };
    let node_name = node_name();
    log::info!(
        "kubernetes: watching the pods of node {node_name:?} at {}",
        config.cluster_url
    );
    let settings = Settings {
        node_name,
        owner_retry: OWNER_RETRY,
    };
    match spawn(runtime, config, settings, DefaultBackoff::default(), stats) {
        Ok((source, _thread)) => Some(source),
        Err(err) => {
            log::warn!(
                "kubernetes: cannot watch pods ({err}); spans carry no Kubernetes metadata. \
                 Check the cluster's kubeconfig or the pod's service account"
            );
            None
        }
    }
}

/// What the watcher is told besides its client.
#[derive(Clone, Debug)]
struct Settings {
    node_name: String,
    owner_retry: Duration,
}

/// The client for `config` and the `kspan-kubernetes` thread watching pods with it.
fn spawn(
    runtime: tokio::runtime::Runtime,
    mut config: kube::Config,
    settings: Settings,
    backoff: impl Backoff + 'static,
    stats: Arc<Stats>,
) -> anyhow::Result<(KubernetesSource, JoinHandle<()>)> {
    config.read_timeout = Some(READ_TIMEOUT);
    // Counted from the request, not from when its pooled connection went idle.
    config.reset_reader_on_write = true;
    // The client starts a task of its own: it needs the runtime it will run on.
    let client = {
        let _entered = runtime.enter();
        kube::Client::try_from(config)?
    };
    let (sender, changes) = mpsc::channel(CHANNEL_CAPACITY);
    let node_name = settings.node_name.clone();
    let errors = ApiErrors::new(stats);
    let thread = std::thread::Builder::new()
        .name("kspan-kubernetes".to_string())
        .spawn(move || runtime.block_on(watch::run(client, settings, backoff, errors, sender)))?;
    let source = KubernetesSource {
        changes,
        index: PodIndex::default(),
        node_name,
    };
    Ok((source, thread))
}

/// `NODE_NAME`, else the host name (which the kubelet names its node after by default, lower
/// case).
fn node_name() -> String {
    if let Ok(name) = std::env::var("NODE_NAME")
        && !name.trim().is_empty()
    {
        return name.trim().to_string();
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_lowercase())
        .unwrap_or_default()
}

/// The pods of this node by container id and by pod uid, built from the [`PodChange`]s.
#[derive(Default)]
struct PodIndex {
    containers: HashMap<String, KubernetesMetadata>,
    pods: HashMap<String, IndexedPod>,
}

struct IndexedPod {
    /// The pod's metadata without `container_name`.
    metadata: KubernetesMetadata,
    container_ids: Vec<String>,
}

impl PodIndex {
    fn apply(&mut self, change: &PodChange) {
        let pod_uid = match change {
            PodChange::Upsert { pod_uid, .. } | PodChange::Removed { pod_uid } => pod_uid,
        };
        if let Some(old) = self.pods.remove(pod_uid) {
            for id in &old.container_ids {
                self.containers.remove(id);
            }
        }
        let PodChange::Upsert {
            pod_uid,
            containers,
        } = change
        else {
            return;
        };
        let Some((_, first)) = containers.first() else {
            return;
        };
        let metadata = KubernetesMetadata {
            container_name: None,
            ..first.clone()
        };
        for (id, container) in containers {
            self.containers.insert(id.clone(), container.clone());
        }
        let container_ids = containers.iter().map(|(id, _)| id.clone()).collect();
        self.pods.insert(
            pod_uid.clone(),
            IndexedPod {
                metadata,
                container_ids,
            },
        );
    }

    fn lookup(
        &self,
        container_id: Option<&str>,
        pod_uid: Option<&str>,
    ) -> Option<&KubernetesMetadata> {
        container_id
            .and_then(|id| self.containers.get(id))
            .or_else(|| Some(&self.pods.get(pod_uid?)?.metadata))
    }
}

/// Failures of the API server: each counted, logged at most once per [`ERROR_LOG_INTERVAL`].
struct ApiErrors {
    stats: Arc<Stats>,
    log_interval: Duration,
    last_logged: Option<Instant>,
    /// Failures since the last one logged.
    unlogged: u64,
    /// A failure was logged and no success followed yet.
    failing: bool,
}

impl ApiErrors {
    fn new(stats: Arc<Stats>) -> ApiErrors {
        ApiErrors {
            stats,
            log_interval: ERROR_LOG_INTERVAL,
            last_logged: None,
            unlogged: 0,
            failing: false,
        }
    }

    fn failed(&mut self, what: &str, err: &dyn Display) {
        Stats::add(&self.stats.kubernetes_api_errors, 1);
        self.failing = true;
        let now = Instant::now();
        if self
            .last_logged
            .is_some_and(|at| now.duration_since(at) < self.log_interval)
        {
            self.unlogged += 1;
            return;
        }
        let earlier = match std::mem::take(&mut self.unlogged) {
            0 => String::new(),
            n => format!(" ({n} more failures since the last message)"),
        };
        log::warn!(
            "kubernetes: {what} failed: {err}{earlier}. Tracing goes on; pods are described \
             once the API server answers (retrying with backoff). Check the API server and that \
             kspan's service account may list and watch pods and get replicasets and jobs"
        );
        self.last_logged = Some(now);
    }

    fn succeeded(&mut self) {
        if std::mem::take(&mut self.failing) {
            log::info!("kubernetes: the API server answers again");
        }
    }
}
