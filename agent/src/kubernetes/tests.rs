//! The watcher through the real kube client against an API server played by the test: API
//! responses in the API server's JSON shape (testdata/: this node's PodList, the ReplicaSet
//! and Job that own pods, a watch stream), served over HTTP on 127.0.0.1 by hyper. The server
//! answers only what a read-only watcher of this node's pods may ask (GET; the pod list and
//! watch with the node's field selector; the two owners) and records anything else as a
//! violation.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::channel::{Channel, Sender};
use http_body_util::{Either, Full};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};

use super::*;
use crate::process::resource::{Workload, WorkloadKind};

const NODE: &str = "node-a";
const POD_LIST: &str = include_str!("testdata/pods-node-a.json");
const REPLICA_SET: &str = include_str!("testdata/replicaset-web.json");
const JOB: &str = include_str!("testdata/job-report.json");
const WATCH_EVENTS: &str = include_str!("testdata/watch-events.jsonl");

const LIST_PATH: &str = "/api/v1/pods";
const REPLICA_SET_PATH: &str = "/apis/apps/v1/namespaces/shop/replicasets/web-7d4b9c8f5";
const JOB_PATH: &str = "/apis/batch/v1/namespaces/batch/jobs/report-29012345";

const WEB_POD_UID: &str = "0f5c8a9e-3b1d-4c6e-9a2f-7d8e1b4c6a30";
const WEB2_POD_UID: &str = "7a6b5c4d-3e2f-4a1b-9c8d-7e6f5a4b3c2d";
const DB_POD_UID: &str = "5e2d7c41-9a8b-4f3e-b6d1-0c9e8f7a6b52";
const REPORT_POD_UID: &str = "9d8c7b6a-5f4e-4d3c-2b1a-0f9e8d7c6b5a";
const DEBUG_POD_UID: &str = "2c3d4e5f-6a7b-4c8d-9e0f-1a2b3c4d5e6f";

const WEB_APP_ID: &str = "a7a1d1b1b26d8785d3cae7a3b8b137b8f08991a2412713846e58baaba5683a4c";
const WEB_MIGRATE_ID: &str = "d5a312b7b5832f62ebb4542c04f4cbc17362d745a8c7163b6cceb8afd5da9c03";
const WEB_APP_RESTARTED_ID: &str =
    "d896de1416626aab637f9f0a768c1a1ddbbefd4f76997b000144225f9307ce9d";
const WEB2_APP_ID: &str = "8e5cdddcb15de566177956647c1166b2d10b6cddcd423412cc659446bd21b5b1";
const WEB2_MIGRATE_ID: &str = "2049384f414a24ae835dbe407b2ecaf40e7edefcb2663bfeb72fd165ab8936af";
const DB_POSTGRES_ID: &str = "8afd82ab54277fdf5ee452fd7cd1dd888278aad5cabff20ac0fc88e8d783a1b0";
const DB_DEBUGGER_ID: &str = "e8ea376f8fc28cd3af20341408c0b08c99e7d0032d8bed20720d770e1e449949";
const REPORT_ID: &str = "845e91831319e89c4d656bdb80c278ac09a7230d61e5dfd2e1b1fbb436ac8917";
const DEBUG_SHELL_ID: &str = "bc289bb4c77c647ece51d763d918e2bbe5be56e810e477595074c43a9fcc4d65";

// ---------------------------------------------------------------------------------------------
// The API server
// ---------------------------------------------------------------------------------------------

type Body = Either<Full<Bytes>, Channel<Bytes, Infallible>>;

/// An answer the server gives once, to the next request whose path starts with `path`.
struct Failure {
    path: &'static str,
    status: u16,
    body: String,
}

#[derive(Default)]
struct ServerState {
    /// Every request, `METHOD path?query` with the query decoded.
    requests: Vec<String>,
    /// Requests a read-only watcher of this node's pods has no business making.
    violations: Vec<String>,
    failures: Vec<Failure>,
    /// The open watch streams, the newest last.
    watches: Vec<Sender<Bytes, Infallible>>,
}

struct ApiServer {
    address: SocketAddr,
    state: Arc<Mutex<ServerState>>,
}

impl ApiServer {
    fn start() -> ApiServer {
        Self::start_on("127.0.0.1:0".parse().unwrap(), Vec::new())
    }

    fn start_on(address: SocketAddr, failures: Vec<Failure>) -> ApiServer {
        let listener = std::net::TcpListener::bind(address).expect("bind the test API server");
        listener.set_nonblocking(true).unwrap();
        let address = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(ServerState {
            failures,
            ..ServerState::default()
        }));
        let shared = state.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // Runs until the test process exits.
        std::thread::spawn(move || {
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let (stream, _) = listener.accept().await.unwrap();
                    let state = shared.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |request| {
                            let answer = answer(&state, &request);
                            async move { Ok::<_, Infallible>(answer) }
                        });
                        // Errors: the client closed a watch it gave up on.
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    });
                }
            })
        });
        ApiServer { address, state }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ServerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    fn requests(&self) -> Vec<String> {
        self.state().requests.clone()
    }

    fn requests_to(&self, path: &str) -> Vec<String> {
        let prefix = format!("GET {path}");
        (self.requests().into_iter())
            .filter(|request| request.starts_with(&prefix))
            .collect()
    }

    fn watch_requests(&self) -> Vec<String> {
        (self.requests_to(LIST_PATH).into_iter())
            .filter(|request| request.contains("watch=true"))
            .collect()
    }

    /// Streams `lines` on the newest watch.
    fn stream(&self, lines: &str) {
        let mut state = self.state();
        let watch = state.watches.last_mut().expect("a watch is open");
        for line in lines.lines() {
            let frame = Frame::data(Bytes::from(format!("{line}\n")));
            assert!(watch.try_send(frame).is_ok(), "watch body buffer full");
        }
    }

    /// Ends the newest watch, as the API server does when its timeout is up.
    fn end_watch(&self) {
        self.state().watches.pop().expect("a watch is open");
    }
}

fn answer(state: &Mutex<ServerState>, request: &Request<Incoming>) -> Response<Body> {
    let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
    let path = request.uri().path();
    let query = decode_query(request.uri().query().unwrap_or(""));
    // What a client asks with `Accept: application/json;as=PartialObjectMetadata;...`.
    let metadata_only = (request.headers().get_all("accept").iter()).any(|accept| {
        accept
            .to_str()
            .unwrap_or("")
            .contains("as=PartialObjectMetadata")
    });
    let mut line = match query.as_str() {
        "" => format!("{} {path}", request.method()),
        _ => format!("{} {path}?{query}", request.method()),
    };
    if metadata_only {
        line.push_str(" (metadata)");
    }
    state.requests.push(line.clone());
    let json = |status: u16, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Either::Left(Full::new(Bytes::from(body))))
            .unwrap()
    };
    let allowed = request.method() == hyper::Method::GET
        && match path {
            LIST_PATH => query.contains(&format!("fieldSelector=spec.nodeName={NODE}")),
            REPLICA_SET_PATH | JOB_PATH => query.is_empty(),
            _ => false,
        };
    if !allowed {
        state.violations.push(line);
        return json(404, status_body(404, "NotFound", "not served by this test"));
    }
    if let Some(at) = state.failures.iter().position(|f| path.starts_with(f.path)) {
        let failure = state.failures.remove(at);
        return json(failure.status, failure.body);
    }
    match path {
        LIST_PATH if query.contains("watch=true") => {
            let (sender, body) = Channel::new(16);
            state.watches.push(sender);
            Response::builder()
                .header("content-type", "application/json")
                .body(Either::Right(body))
                .unwrap()
        }
        LIST_PATH => json(200, POD_LIST.to_string()),
        REPLICA_SET_PATH if metadata_only => json(200, partial_object_metadata(REPLICA_SET)),
        REPLICA_SET_PATH => json(200, REPLICA_SET.to_string()),
        _ if metadata_only => json(200, partial_object_metadata(JOB)),
        _ => json(200, JOB.to_string()),
    }
}

/// The object as the API server answers a request for its metadata only.
fn partial_object_metadata(object: &str) -> String {
    let object: serde_json::Value = serde_json::from_str(object).unwrap();
    serde_json::json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": object["metadata"],
    })
    .to_string()
}

/// A `Status` as the API server answers errors.
fn status_body(code: u16, reason: &str, message: &str) -> String {
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    })
    .to_string()
}

/// `&a=b%3Dc&d=e` → `a=b=c&d=e` (kube starts its queries with `&`).
fn decode_query(query: &str) -> String {
    let query = query.trim_start_matches('&');
    let bytes = query.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                decoded.push(u8::from_str_radix(hex, 16).unwrap());
                i += 3;
            }
            b'+' => {
                decoded.push(b' ');
                i += 1;
            }
            byte => {
                decoded.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(decoded).unwrap()
}

// ---------------------------------------------------------------------------------------------
// The watcher under test
// ---------------------------------------------------------------------------------------------

/// Retries 20 ms apart, forever: kube's default waits 0.8 s and more.
struct FastBackoff;

impl Iterator for FastBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        Some(Duration::from_millis(20))
    }
}

impl Backoff for FastBackoff {
    fn reset(&mut self) {}
}

fn watch(url: &str, stats: &Arc<Stats>) -> KubernetesSource {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let config = kube::Config::new(url.parse().unwrap());
    let settings = Settings {
        node_name: NODE.to_string(),
        owner_retry: Duration::from_millis(50),
    };
    let (source, _thread) = spawn(runtime, config, settings, FastBackoff, stats.clone()).unwrap();
    source
}

/// Waits until `done` says yes, failing after 20 s (a loaded 2-core machine is slow).
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Polls until `count` changes have arrived.
fn changes(source: &mut KubernetesSource, count: usize) -> Vec<PodChange> {
    let mut changes = Vec::new();
    wait_until(&format!("{count} pod changes"), || {
        changes.extend(source.poll());
        changes.len() >= count
    });
    assert_eq!(changes.len(), count, "{changes:#?}");
    changes
}

fn api_errors(stats: &Stats) -> u64 {
    Stats::get(&stats.kubernetes_api_errors)
}

// ---------------------------------------------------------------------------------------------
// What the recorded pods should become
// ---------------------------------------------------------------------------------------------

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    (pairs.iter())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn workload(kind: WorkloadKind, name: &str) -> Option<Workload> {
    Some(Workload {
        kind,
        name: name.to_string(),
    })
}

fn web_pod(name: &str, uid: &str) -> KubernetesMetadata {
    KubernetesMetadata {
        namespace: Some("shop".into()),
        pod_name: Some(name.into()),
        pod_uid: Some(uid.into()),
        container_name: None,
        node_name: Some(NODE.into()),
        owner: workload(WorkloadKind::Deployment, "web"),
        pod_labels: map(&[
            ("app.kubernetes.io/name", "web"),
            ("app.kubernetes.io/part-of", "shop"),
            ("pod-template-hash", "7d4b9c8f5"),
        ]),
        pod_annotations: map(&[
            ("kubectl.kubernetes.io/restartedAt", "2026-11-30T10:00:00Z"),
            ("resource.opentelemetry.io/service.namespace", "storefront"),
        ]),
    }
}

fn db_pod() -> KubernetesMetadata {
    KubernetesMetadata {
        namespace: Some("shop".into()),
        pod_name: Some("db-0".into()),
        pod_uid: Some(DB_POD_UID.into()),
        container_name: None,
        node_name: Some(NODE.into()),
        owner: workload(WorkloadKind::StatefulSet, "db"),
        pod_labels: map(&[
            ("app.kubernetes.io/name", "postgres"),
            ("apps.kubernetes.io/pod-index", "0"),
            ("controller-revision-hash", "db-6b8f7c9d4"),
            ("statefulset.kubernetes.io/pod-name", "db-0"),
        ]),
        pod_annotations: BTreeMap::new(),
    }
}

fn report_pod(owner: Option<Workload>) -> KubernetesMetadata {
    let job_uid = "e1f2a3b4-c5d6-4e7f-8a9b-0c1d2e3f4a5b";
    KubernetesMetadata {
        namespace: Some("batch".into()),
        pod_name: Some("report-29012345-7xk2p".into()),
        pod_uid: Some(REPORT_POD_UID.into()),
        container_name: None,
        node_name: Some(NODE.into()),
        owner,
        pod_labels: map(&[
            ("batch.kubernetes.io/controller-uid", job_uid),
            ("batch.kubernetes.io/job-name", "report-29012345"),
            ("controller-uid", job_uid),
            ("job-name", "report-29012345"),
        ]),
        pod_annotations: BTreeMap::new(),
    }
}

fn debug_pod() -> KubernetesMetadata {
    KubernetesMetadata {
        namespace: Some("default".into()),
        pod_name: Some("debug".into()),
        pod_uid: Some(DEBUG_POD_UID.into()),
        container_name: None,
        node_name: Some(NODE.into()),
        owner: None,
        pod_labels: BTreeMap::new(),
        // Without kubectl's last-applied-configuration.
        pod_annotations: map(&[("resource.opentelemetry.io/service.name", "debug-shell")]),
    }
}

fn upsert(pod: &KubernetesMetadata, containers: &[(&str, &str)]) -> PodChange {
    PodChange::Upsert {
        pod_uid: pod.pod_uid.clone().unwrap(),
        containers: (containers.iter())
            .map(|(id, name)| {
                let metadata = KubernetesMetadata {
                    container_name: Some(name.to_string()),
                    ..pod.clone()
                };
                (id.to_string(), metadata)
            })
            .collect(),
    }
}

/// The changes the recorded PodList makes, the report pod's owner being `report_owner`.
fn listed_pods(report_owner: Option<Workload>) -> Vec<PodChange> {
    let web = web_pod("web-7d4b9c8f5-x2x8q", WEB_POD_UID);
    vec![
        upsert(&web, &[(WEB_APP_ID, "app"), (WEB_MIGRATE_ID, "migrate")]),
        upsert(
            &db_pod(),
            &[(DB_POSTGRES_ID, "postgres"), (DB_DEBUGGER_ID, "debugger")],
        ),
        upsert(&report_pod(report_owner), &[(REPORT_ID, "report")]),
        // The sidecar has no container id yet.
        upsert(&debug_pod(), &[(DEBUG_SHELL_ID, "shell")]),
    ]
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn the_pods_of_this_node_are_listed_watched_and_resolved_to_their_workloads() {
    let server = ApiServer::start();
    let stats = Arc::new(Stats::default());
    let mut source = watch(&server.url(), &stats);
    assert_eq!(source.node_name(), NODE);

    // The list: every pod, each owner resolved with one GET.
    let cron_job = workload(WorkloadKind::CronJob, "report");
    assert_eq!(changes(&mut source, 4), listed_pods(cron_job.clone()));
    let list = server.requests_to(LIST_PATH);
    assert_eq!(
        list[0],
        // From the API server's watch cache, unpaginated.
        format!(
            "GET {LIST_PATH}?fieldSelector=spec.nodeName={NODE}&resourceVersion=0\
             &resourceVersionMatch=NotOlderThan"
        )
    );

    // The watch, from the list's resource version.
    wait_until("a watch", || !server.watch_requests().is_empty());
    assert_eq!(
        server.watch_requests(),
        [format!(
            "GET {LIST_PATH}?watch=true&timeoutSeconds=290&fieldSelector=spec.nodeName={NODE}\
             &allowWatchBookmarks=true&resourceVersion=4711"
        )]
    );
    server.stream(WATCH_EVENTS);
    let web = web_pod("web-7d4b9c8f5-x2x8q", WEB_POD_UID);
    let web2 = web_pod("web-7d4b9c8f5-q9z7m", WEB2_POD_UID);
    assert_eq!(
        changes(&mut source, 4),
        [
            // MODIFIED: the app container restarted under a new id.
            upsert(
                &web,
                &[(WEB_APP_RESTARTED_ID, "app"), (WEB_MIGRATE_ID, "migrate")]
            ),
            // ADDED, pending: no container has an id yet.
            upsert(&web2, &[]),
            // MODIFIED: running.
            upsert(&web2, &[(WEB2_APP_ID, "app"), (WEB2_MIGRATE_ID, "migrate")]),
            PodChange::Removed {
                pod_uid: DB_POD_UID.into()
            },
        ]
    );

    // The server ends the watch after the bookmark: the next one resumes from the bookmark.
    server.end_watch();
    wait_until("a second watch", || server.watch_requests().len() == 2);
    assert!(
        server.watch_requests()[1].ends_with("&resourceVersion=5012"),
        "{:?}",
        server.watch_requests()
    );
    // Every change was sent before the watcher asked again.
    assert_eq!(source.poll(), []);

    // One GET per owner, of its metadata only, however many pods and events.
    assert_eq!(
        server.requests_to(REPLICA_SET_PATH),
        [format!("GET {REPLICA_SET_PATH} (metadata)")]
    );
    assert_eq!(
        server.requests_to(JOB_PATH),
        [format!("GET {JOB_PATH} (metadata)")]
    );
    assert_eq!(
        server.requests_to(LIST_PATH).len(),
        3,
        "one list, two watches"
    );
    assert!(
        server.state().violations.is_empty(),
        "{:?}",
        server.requests()
    );
    assert_eq!(api_errors(&stats), 0);

    // Lookups by container id, else by pod uid.
    let container = |metadata: &KubernetesMetadata, name: &str| KubernetesMetadata {
        container_name: Some(name.into()),
        ..metadata.clone()
    };
    assert_eq!(
        source.lookup(Some(WEB_APP_RESTARTED_ID), Some(WEB_POD_UID)),
        Some(&container(&web, "app"))
    );
    assert_eq!(
        source.lookup(Some(WEB2_MIGRATE_ID), None),
        Some(&container(&web2, "migrate"))
    );
    // The container that was replaced, in a pod kspan knows: the pod.
    assert_eq!(
        source.lookup(Some(WEB_APP_ID), Some(WEB_POD_UID)),
        Some(&web)
    );
    assert_eq!(source.lookup(Some(WEB_APP_ID), None), None);
    assert_eq!(
        source.lookup(None, Some(REPORT_POD_UID)),
        Some(&report_pod(cron_job))
    );
    assert_eq!(source.lookup(Some(DB_POSTGRES_ID), Some(DB_POD_UID)), None);
    assert_eq!(
        source.lookup(Some(DEBUG_SHELL_ID), None),
        Some(&container(&debug_pod(), "shell"))
    );
}

#[test]
fn a_new_list_removes_the_pods_deleted_while_no_watch_ran() {
    let server = ApiServer::start();
    let stats = Arc::new(Stats::default());
    let mut source = watch(&server.url(), &stats);
    assert_eq!(changes(&mut source, 4).len(), 4);
    wait_until("a watch", || !server.watch_requests().is_empty());

    // A pod the list did not have, then the watch expires: the watcher lists again and the
    // list (the same recorded one) no longer has it.
    let web2_added = WATCH_EVENTS
        .lines()
        .find(|line| line.contains(r#""type":"ADDED""#))
        .unwrap();
    server.stream(web2_added);
    let added = changes(&mut source, 1);
    assert!(
        matches!(&added[0], PodChange::Upsert { pod_uid, .. } if pod_uid == WEB2_POD_UID),
        "{added:?}"
    );
    let expired = serde_json::json!({"type": "ERROR", "object": serde_json::from_str::<serde_json::Value>(
        &status_body(410, "Expired", "too old resource version: 4711 (5012)")).unwrap()});
    server.stream(&expired.to_string());
    assert_eq!(
        changes(&mut source, 1),
        [PodChange::Removed {
            pod_uid: WEB2_POD_UID.into()
        }]
    );
    wait_until("a watch after the new list", || {
        server.watch_requests().len() == 2
    });
    assert_eq!(
        server.requests_to(LIST_PATH).len(),
        4,
        "list, watch, list again, watch: {:?}",
        server.requests()
    );
    // Routine: not counted as a failure.
    assert_eq!(api_errors(&stats), 0);
    assert!(
        server.state().violations.is_empty(),
        "{:?}",
        server.requests()
    );
}

#[test]
fn an_erroring_api_server_is_counted_and_recovered_from() {
    let forbidden = "jobs.batch \"report-29012345\" is forbidden: User \
                     \"system:serviceaccount:kspan:kspan\" cannot get resource \"jobs\" in API \
                     group \"batch\" in the namespace \"batch\"";
    let server = ApiServer::start_on(
        "127.0.0.1:0".parse().unwrap(),
        vec![
            Failure {
                path: LIST_PATH,
                status: 500,
                body: status_body(500, "InternalError", "etcdserver: request timed out"),
            },
            // A body cut short.
            Failure {
                path: LIST_PATH,
                status: 200,
                body: POD_LIST[..POD_LIST.len() / 2].to_string(),
            },
            Failure {
                path: JOB_PATH,
                status: 403,
                body: status_body(403, "Forbidden", forbidden),
            },
        ],
    );
    let stats = Arc::new(Stats::default());
    let mut source = watch(&server.url(), &stats);

    // After two failed lists, the pods; the Job's owner unknown yet: the Job stands for it.
    let job = workload(WorkloadKind::Job, "report-29012345");
    assert_eq!(changes(&mut source, 4), listed_pods(job));
    // The failed lookup is retried later, and names the CronJob.
    let cron_job = workload(WorkloadKind::CronJob, "report");
    assert_eq!(
        changes(&mut source, 1),
        [upsert(&report_pod(cron_job), &[(REPORT_ID, "report")])]
    );
    assert_eq!(api_errors(&stats), 3, "{:?}", server.requests());
    assert_eq!(server.requests_to(JOB_PATH).len(), 2);
    assert!(
        server.state().violations.is_empty(),
        "{:?}",
        server.requests()
    );
}

#[test]
fn an_unreachable_api_server_is_retried_and_counted_until_it_answers() {
    // A port nobody listens on (yet).
    let address = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let stats = Arc::new(Stats::default());
    let mut source = watch(&format!("http://{address}"), &stats);
    wait_until("failed connections", || api_errors(&stats) >= 3);
    assert_eq!(source.poll(), []);

    let server = ApiServer::start_on(address, Vec::new());
    assert_eq!(
        changes(&mut source, 4),
        listed_pods(workload(WorkloadKind::CronJob, "report"))
    );
    assert!(
        server.state().violations.is_empty(),
        "{:?}",
        server.requests()
    );
}

#[test]
fn the_index_replaces_a_pods_containers_and_forgets_removed_pods() {
    let mut index = PodIndex::default();
    let web = web_pod("web-7d4b9c8f5-x2x8q", WEB_POD_UID);
    index.apply(&upsert(&web, &[("old", "app"), ("init", "migrate")]));
    assert_eq!(
        index
            .lookup(Some("old"), None)
            .and_then(|m| m.container_name.as_deref()),
        Some("app")
    );
    index.apply(&upsert(&web, &[("new", "app")]));
    assert_eq!(index.lookup(Some("old"), None), None);
    assert_eq!(index.lookup(Some("init"), None), None);
    assert_eq!(index.lookup(Some("old"), Some(WEB_POD_UID)), Some(&web));
    assert!(index.lookup(Some("new"), None).is_some());
    // A pod without started containers describes no process.
    index.apply(&upsert(&web, &[]));
    assert_eq!(index.lookup(None, Some(WEB_POD_UID)), None);
    index.apply(&upsert(&web, &[("new", "app")]));
    index.apply(&PodChange::Removed {
        pod_uid: WEB_POD_UID.into(),
    });
    assert_eq!(index.lookup(Some("new"), Some(WEB_POD_UID)), None);
    assert!(index.containers.is_empty() && index.pods.is_empty());
}

#[test]
fn failures_are_all_counted_and_logged_at_most_once_an_interval() {
    let stats = Arc::new(Stats::default());
    let mut errors = ApiErrors::new(stats.clone());
    for _ in 0..3 {
        errors.failed("list pods", &"connection refused");
    }
    assert_eq!(api_errors(&stats), 3);
    // The first was logged, the two others wait for the interval.
    assert_eq!(errors.unlogged, 2);
    errors.log_interval = Duration::ZERO;
    errors.failed("list pods", &"connection refused");
    assert_eq!(errors.unlogged, 0);
    assert!(errors.failing);
    errors.succeeded();
    assert!(!errors.failing);
}

/// Set in the child process of `on_a_plain_host_there_is_no_source`.
const PLAIN_HOST_CHILD: &str = "KSPAN_TEST_KUBERNETES_PLAIN_HOST";

#[test]
fn on_a_plain_host_there_is_no_source() {
    if std::env::var_os(PLAIN_HOST_CHILD).is_some() {
        assert!(start(Arc::new(Stats::default())).is_none());
        return;
    }
    // In a child process with no kubeconfig and no in-cluster service: the environment is the
    // process's, not one test's to change.
    let name = "kubernetes::tests::on_a_plain_host_there_is_no_source";
    let exe = std::env::current_exe().unwrap();
    // Cross-built tests run through cargo's runner (qemu-user for aarch64 in CI), which cargo
    // leaves in the environment: the child goes through it too, found on this process's PATH
    // (the child's environment is emptied).
    let runner: Vec<String> = std::env::var("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER")
        .ok()
        .filter(|_| cfg!(target_arch = "aarch64"))
        .map(|r| r.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    let mut command = match runner.split_first() {
        Some((program, args)) => {
            let program = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                .map(|dir| dir.join(program))
                .find(|path| path.is_file())
                .unwrap_or_else(|| program.into());
            let mut command = std::process::Command::new(program);
            command.args(args).arg(&exe);
            command
        }
        None => std::process::Command::new(&exe),
    };
    let output = command
        .args(["--exact", name, "--test-threads=1"])
        .env_clear()
        .env(PLAIN_HOST_CHILD, "1")
        .env("HOME", "/nonexistent")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
