//! The watch of this node's pods, on the `kspan-kubernetes` thread: kube's watcher (list, then
//! watch from the list's resource version, bookmarks, a new list when the watch cannot resume),
//! each pod turned into a [`PodChange`] for the pipeline, sent only when what kspan keeps of
//! the pod changed.

use std::collections::{HashMap, HashSet};
use std::pin::pin;

use futures::StreamExt;
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, utils::Backoff};
use kube::{Api, Client};
use tokio::sync::mpsc;

use super::objects::Pod;
use super::owners::{Owners, Resolution};
use super::{ApiErrors, PodChange, Settings, pods};
use crate::process::resource::KubernetesMetadata;

/// The pipeline went away: nobody reads the changes any more.
struct Closed;

struct PodWatch {
    owners: Owners,
    errors: ApiErrors,
    changes: mpsc::Sender<PodChange>,
    node_name: String,
    /// What was last sent of each pod, by pod uid.
    sent: HashMap<String, Vec<(String, KubernetesMetadata)>>,
    /// The uids a list in progress has shown (from `Init` to `InitDone`).
    listing: Option<HashSet<String>>,
    /// Pods whose owner lookup failed, by uid: looked up again every `owner_retry`.
    unresolved: HashMap<String, Pod>,
    /// Whether a list has completed at least once.
    listed_once: bool,
}

/// Watches the pods of `settings.node_name` until `changes` is closed.
pub(super) async fn run(
    client: Client,
    settings: Settings,
    backoff: impl Backoff + 'static,
    errors: ApiErrors,
    changes: mpsc::Sender<PodChange>,
) {
    let mut config = watcher::Config::default()
        .fields(&format!("spec.nodeName={}", settings.node_name))
        // The list comes from the API server's watch cache (resourceVersion=0), as the
        // kubelet's own does: no etcd read when every node's agent lists at once. The cache
        // answers with the whole list, so no pages (kube sends resourceVersion=0 only
        // without a limit).
        .any_semantic();
    config.page_size = None;
    let pods: Api<Pod> = Api::all(client.clone());
    let mut events = pin!(watcher::watcher(pods, config).backoff(backoff));
    let mut watch = PodWatch {
        owners: Owners::new(client, settings.owner_retry),
        errors,
        changes,
        node_name: settings.node_name,
        sent: HashMap::new(),
        listing: None,
        unresolved: HashMap::new(),
        listed_once: false,
    };
    let mut retry = tokio::time::interval(settings.owner_retry);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let handled = tokio::select! {
            event = events.next() => match event {
                Some(Ok(event)) => {
                    watch.errors.succeeded();
                    watch.handle(event).await
                }
                Some(Err(err)) => {
                    watch.watch_failed(&err);
                    Ok(())
                }
                // The backoff never gives up, so the stream never ends.
                None => return,
            },
            _ = retry.tick(), if !watch.unresolved.is_empty() => watch.retry_unresolved().await,
        };
        if let Err(Closed) = handled {
            return;
        }
    }
}

impl PodWatch {
    async fn handle(&mut self, event: Event<Pod>) -> Result<(), Closed> {
        match event {
            Event::Init => self.listing = Some(HashSet::new()),
            Event::InitApply(pod) => {
                if let (Some(listing), Some(uid)) = (&mut self.listing, &pod.metadata.uid) {
                    listing.insert(uid.clone());
                }
                self.upsert(pod).await?;
            }
            Event::InitDone => {
                let listed = self.listing.take().unwrap_or_default();
                // Deleted while no watch was running: no DELETED event will tell.
                let gone: Vec<String> = (self.sent.keys())
                    .filter(|uid| !listed.contains(*uid))
                    .cloned()
                    .collect();
                for pod_uid in gone {
                    self.remove(pod_uid).await?;
                }
                if !self.listed_once && listed.is_empty() {
                    log::warn!(
                        "kubernetes: no pod runs on node {:?}; if that is not this node's name, set \
                         NODE_NAME from the pod's spec.nodeName (kspan's chart does)",
                        self.node_name
                    );
                }
                self.listed_once = true;
            }
            Event::Apply(pod) => self.upsert(pod).await?,
            Event::Delete(pod) => {
                if let Some(uid) = pod.metadata.uid {
                    self.remove(uid).await?;
                }
            }
        }
        Ok(())
    }

    /// Sends the pod's containers if they changed since last sent.
    async fn upsert(&mut self, pod: Pod) -> Result<(), Closed> {
        let Some(pod_uid) = pod.metadata.uid.clone() else {
            return Ok(());
        };
        let owner = match self.owners.resolve(&pod, &mut self.errors).await {
            Resolution::Known(owner) => {
                self.unresolved.remove(&pod_uid);
                owner
            }
            Resolution::Failed(guess) => {
                self.unresolved.insert(pod_uid.clone(), pod.clone());
                guess
            }
        };
        let containers = pods::container_metadata(&pod, owner);
        if self.sent.get(&pod_uid) == Some(&containers) {
            return Ok(());
        }
        self.sent.insert(pod_uid.clone(), containers.clone());
        self.send(PodChange::Upsert {
            pod_uid,
            containers,
        })
        .await
    }

    async fn remove(&mut self, pod_uid: String) -> Result<(), Closed> {
        self.unresolved.remove(&pod_uid);
        if self.sent.remove(&pod_uid).is_none() {
            return Ok(());
        }
        self.send(PodChange::Removed { pod_uid }).await
    }

    async fn retry_unresolved(&mut self) -> Result<(), Closed> {
        let pods: Vec<Pod> = self.unresolved.values().cloned().collect();
        for pod in pods {
            self.upsert(pod).await?;
        }
        Ok(())
    }

    /// Waits while the channel is full: the pipeline drains it between event slices, and pod
    /// events can wait.
    async fn send(&self, change: PodChange) -> Result<(), Closed> {
        self.changes.send(change).await.map_err(|_| Closed)
    }

    fn watch_failed(&mut self, err: &watcher::Error) {
        // The resource version to resume from is too old (410 Gone): the watcher lists again.
        // Routine, not a failure.
        if let watcher::Error::WatchError(status) = err
            && status.code == 410
        {
            log::debug!("kubernetes: pod watch expired, listing again: {err}");
            return;
        }
        let what = format!("watch of the pods of node {:?}", self.node_name);
        self.errors.failed(&what, err);
    }
}
