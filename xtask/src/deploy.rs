//! `cargo xtask deploy-check`: the deployment files under deploy/ are checked without a cluster.
//!
//! The Helm chart (deploy/helm/kspan) is linted, rendered with its default values and with each
//! values file of its `ci/` folder, and every rendering is validated against the Kubernetes
//! schemas of the oldest, a middle and the newest supported version (kubernetes-validate,
//! strict: unknown fields are errors). Then the renderings are read back (YAML → JSON by
//! PyYAML, which kubernetes-validate depends on, so no YAML crate is needed here) and what the
//! README promises is asserted: least privilege by default, the probes, the config mount,
//! read-only RBAC. Last, the committed plain manifest (deploy/kubernetes/kspan.yaml) must be
//! the default rendering, byte for byte, so it never drifts from the chart.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::{command, display, root, run_cmd, setup, target_dir};

/// The chart, relative to the workspace root.
const CHART: &str = "deploy/helm/kspan";
/// The plain manifest: the chart rendered with its default values.
const MANIFEST: &str = "deploy/kubernetes/kspan.yaml";
/// `helm template RELEASE CHART --namespace NAMESPACE` makes the plain manifest.
const RELEASE: &str = "kspan";
const NAMESPACE: &str = "kspan";
/// The first lines of the plain manifest, before the rendering.
const MANIFEST_HEADER: &str = "\
# kspan as a DaemonSet, without Helm: `helm template kspan deploy/helm/kspan --namespace kspan`
# with the chart's default values. Generated: do not edit; regenerate with
# `cargo xtask deploy-check --write-manifest`. Apply with:
#   kubectl create namespace kspan && kubectl apply -f deploy/kubernetes/kspan.yaml
";

/// Kubernetes versions whose schemas every rendering must pass: the oldest the chart supports
/// (Chart.yaml's kubeVersion), one in the middle, the newest kubernetes-validate knows.
const KUBERNETES_VERSIONS: &[&str] = &["1.25.0", "1.30.0", "1.37.0"];

/// The capabilities the chart gives kspan by default, as the README documents them; each one
/// is shown necessary by tests/tests/capabilities.rs.
pub const CAPABILITIES: &[&str] = &[
    "BPF",
    "PERFMON",
    "SYS_PTRACE",
    "DAC_READ_SEARCH",
    "SYS_RESOURCE",
];

/// Runs every check; with `write_manifest`, first rewrites the plain manifest from the chart.
pub fn check(write_manifest: bool) -> Result<()> {
    let helm = setup::deploy_tools()?;
    let chart = root().join(CHART);
    let out_dir = target_dir().join("deploy-check");
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;

    let mut values_files: Vec<PathBuf> = std::fs::read_dir(chart.join("ci"))
        .with_context(|| format!("cannot list {}/ci", chart.display()))?
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|e| e == "yaml"))
        .collect();
    values_files.sort();
    ensure!(
        !values_files.is_empty(),
        "{CHART}/ci holds no values file: the non-default renderings are not checked"
    );

    run_cmd(command(&helm).args(["lint", "--strict"]).arg(&chart))?;
    for values in &values_files {
        run_cmd(
            command(&helm)
                .args(["lint", "--strict"])
                .arg(&chart)
                .arg("--values")
                .arg(values),
        )?;
    }

    let default_render = render(&helm, &chart, None)?;
    let default_file = out_dir.join("default.yaml");
    std::fs::write(&default_file, &default_render)?;
    let mut rendered = vec![default_file];
    let mut non_default = Vec::new();
    for values in &values_files {
        let text = render(&helm, &chart, Some(values))?;
        let name = values.file_name().expect("a values file has a name");
        let file = out_dir.join(name);
        std::fs::write(&file, &text)?;
        rendered.push(file);
        non_default.push((values.clone(), text));
    }
    for version in KUBERNETES_VERSIONS {
        run_cmd(
            command("python3")
                .args([
                    "-m",
                    "kubernetes_validate",
                    "--strict",
                    "--quiet",
                    "-k",
                    version,
                ])
                .args(&rendered),
        )
        .with_context(|| {
            format!("a rendering of {CHART} is not a valid Kubernetes {version} manifest")
        })?;
    }

    let defaults = documents(&default_render)?;
    check_default_render(&defaults).context("the chart's default rendering")?;
    println!(
        "ok: the default rendering: {} capabilities, not privileged, probes, config, read-only RBAC",
        CAPABILITIES.len()
    );
    for (values, text) in &non_default {
        let docs = documents(text)?;
        check_non_default_render(&docs)
            .with_context(|| format!("the rendering with {}", values.display()))?;
        // The default assertions must notice what these values change (privileged above all):
        // otherwise they would pass anything.
        ensure!(
            check_default_render(&docs).is_err(),
            "the default rendering's checks also pass the rendering with {}: they check nothing",
            values.display()
        );
        println!("ok: the rendering with {}", values.display());
    }

    let manifest = root().join(MANIFEST);
    let expected = format!("{MANIFEST_HEADER}{default_render}");
    if write_manifest {
        std::fs::write(&manifest, &expected)
            .with_context(|| format!("cannot write {}", manifest.display()))?;
        println!("wrote {MANIFEST}");
    }
    let committed = std::fs::read_to_string(&manifest)
        .with_context(|| format!("cannot read {}", manifest.display()))?;
    if committed != expected {
        bail!(
            "{MANIFEST} is not the chart's default rendering (compare it with {}): run \
             `cargo xtask deploy-check --write-manifest` and commit it",
            out_dir.join("default.yaml").display()
        );
    }
    println!("ok: {MANIFEST} is the chart's default rendering");
    Ok(())
}

/// `helm template` of the chart, with a values file or the defaults.
fn render(helm: &Path, chart: &Path, values: Option<&Path>) -> Result<String> {
    let mut cmd = command(helm);
    cmd.args(["template", RELEASE])
        .arg(chart)
        .args(["--namespace", NAMESPACE]);
    if let Some(values) = values {
        cmd.arg("--values").arg(values);
    }
    captured(&mut cmd)
}

/// Runs `cmd`, returns its stdout; fails with its stderr.
fn captured(cmd: &mut Command) -> Result<String> {
    let shown = display(cmd);
    println!("$ {shown}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{shown}` printed non-UTF-8"))
}

/// The documents of a multi-document YAML text, as JSON values (empty documents dropped).
fn documents(yaml: &str) -> Result<Vec<Value>> {
    let script = "import json, sys, yaml\n\
                  json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)";
    let mut child = command("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run python3 to read the rendered YAML")?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin.write_all(yaml.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "PyYAML could not read a rendering ({}): {}; `cargo xtask setup` installs it with \
         kubernetes-validate",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).context("PyYAML's JSON is not JSON")
}

/// The document of `kind`; exactly one.
fn one<'a>(docs: &'a [Value], kind: &str) -> Result<&'a Value> {
    let mut found = docs.iter().filter(|d| d["kind"] == kind);
    let first = found.next().with_context(|| format!("no {kind}"))?;
    ensure!(found.next().is_none(), "more than one {kind}");
    Ok(first)
}

/// The strings of a JSON array (empty when absent).
fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .map(|items| items.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The container's environment variable `name`.
fn env<'a>(container: &'a Value, name: &str) -> Result<&'a Value> {
    container["env"]
        .as_array()
        .and_then(|vars| vars.iter().find(|v| v["name"] == name))
        .with_context(|| format!("no environment variable {name}"))
}

/// The parts every rendering must have: hostPID, the probes on the metrics port, the config
/// mounted where `--config` reads it, read-only host mounts, the node's name and IP.
fn check_common(docs: &[Value]) -> Result<()> {
    let daemonset = one(docs, "DaemonSet")?;
    let pod = &daemonset["spec"]["template"];
    let spec = &pod["spec"];
    ensure!(spec["hostPID"] == true, "hostPID is not true");
    let containers = spec["containers"].as_array().context("no containers")?;
    ensure!(
        containers.len() == 1,
        "{} containers, not 1",
        containers.len()
    );
    let container = &containers[0];

    // The metrics port is the one the config makes kspan listen on.
    let config_map = one(docs, "ConfigMap")?;
    let config_text = config_map["data"]["config.yaml"]
        .as_str()
        .context("the ConfigMap has no config.yaml")?;
    let config = documents(config_text)?
        .pop()
        .context("config.yaml is empty")?;
    let address = config["prometheus"]["address"]
        .as_str()
        .context("config.yaml has no prometheus.address")?;
    let port: u64 = address
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("prometheus.address {address} has no port"))?;
    let ports = container["ports"]
        .as_array()
        .context("no container ports")?;
    ensure!(
        ports
            .iter()
            .any(|p| p["name"] == "metrics" && p["containerPort"] == port),
        "no container port `metrics` = {port} (config's prometheus.address): {ports:?}"
    );
    let annotations = &pod["metadata"]["annotations"];
    ensure!(
        annotations["prometheus.io/scrape"] == "true"
            && annotations["prometheus.io/port"] == port.to_string().as_str()
            && annotations["prometheus.io/path"] == "/metrics",
        "scrape annotations: {annotations}"
    );
    for (probe, path) in [
        ("startupProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        let get = &container[probe]["httpGet"];
        ensure!(
            get["path"] == path && get["port"] == "metrics",
            "{probe} is not GET {path} on the metrics port: {get}"
        );
    }

    // The config file, where the container's arguments point.
    ensure!(
        strings(&container["args"]) == ["--config", "/etc/kspan/config.yaml"],
        "args: {}",
        container["args"]
    );
    let mounts = container["volumeMounts"]
        .as_array()
        .context("no volume mounts")?;
    let volumes = spec["volumes"].as_array().context("no volumes")?;
    let volume = |name: &Value| volumes.iter().find(|v| v["name"] == *name);
    let config_mount = mounts
        .iter()
        .find(|m| m["mountPath"] == "/etc/kspan")
        .context("nothing mounted at /etc/kspan")?;
    ensure!(
        volume(&config_mount["name"])
            .is_some_and(|v| v["configMap"]["name"] == config_map["metadata"]["name"]),
        "/etc/kspan is not the ConfigMap"
    );
    // Host paths: exactly what kspan reads, read-only.
    let mut host_paths = Vec::new();
    for mount in mounts {
        let volume = volume(&mount["name"]).context("a mount without its volume")?;
        ensure!(
            mount["readOnly"] == true,
            "{} is mounted writable",
            mount["mountPath"]
        );
        if let Some(path) = volume["hostPath"]["path"].as_str() {
            host_paths.push(path);
        }
    }
    host_paths.sort_unstable();
    ensure!(
        host_paths == ["/sys/kernel/btf", "/sys/kernel/tracing"],
        "host paths: {host_paths:?}"
    );
    ensure!(
        container["securityContext"]["readOnlyRootFilesystem"] == true,
        "the root filesystem is writable"
    );

    let field = |name| env(container, name).map(|v| &v["valueFrom"]["fieldRef"]["fieldPath"]);
    ensure!(field("NODE_NAME")? == "spec.nodeName", "NODE_NAME");
    ensure!(field("NODE_IP")? == "status.hostIP", "NODE_IP");
    ensure!(
        env(container, "OTEL_EXPORTER_OTLP_ENDPOINT")?["value"].is_string(),
        "no OTLP endpoint"
    );
    ensure!(
        spec["nodeSelector"]["kubernetes.io/os"] == "linux",
        "not on Linux nodes only"
    );
    Ok(())
}

/// The default values: least privilege, a node-local collector, every node, read-only RBAC.
fn check_default_render(docs: &[Value]) -> Result<()> {
    check_common(docs)?;
    let daemonset = one(docs, "DaemonSet")?;
    let spec = &daemonset["spec"]["template"]["spec"];
    let container = &spec["containers"][0];
    let security = &container["securityContext"];
    ensure!(
        security["privileged"] != true,
        "privileged by default: {security}"
    );
    ensure!(
        security["allowPrivilegeEscalation"] == false,
        "allowPrivilegeEscalation is not false"
    );
    ensure!(
        strings(&security["capabilities"]["drop"]) == ["ALL"],
        "capabilities not dropped: {security}"
    );
    ensure!(
        strings(&security["capabilities"]["add"]) == CAPABILITIES,
        "capabilities {} are not the documented {CAPABILITIES:?}",
        security["capabilities"]["add"]
    );
    ensure!(spec["hostNetwork"] != true, "hostNetwork by default");

    let endpoint = env(container, "OTEL_EXPORTER_OTLP_ENDPOINT")?;
    ensure!(
        endpoint["value"] == "http://$(NODE_IP):4318",
        "the default OTLP endpoint is not the node-local collector: {endpoint}"
    );
    let variables = container["env"].as_array().context("no env")?;
    let position = |name| variables.iter().position(|v| v["name"] == name);
    ensure!(
        position("NODE_IP") < position("OTEL_EXPORTER_OTLP_ENDPOINT"),
        "NODE_IP must come before OTEL_EXPORTER_OTLP_ENDPOINT, which refers to it"
    );
    ensure!(
        env(container, "OTEL_EXPORTER_OTLP_PROTOCOL")?["value"] == "http/protobuf",
        "the default protocol is not http/protobuf"
    );

    let tolerations = spec["tolerations"].as_array().context("no tolerations")?;
    ensure!(
        tolerations
            .iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none()),
        "no toleration of every taint: {tolerations:?}"
    );
    ensure!(
        spec["priorityClassName"] == "system-node-critical",
        "priorityClassName: {}",
        spec["priorityClassName"]
    );
    let resources = &container["resources"];
    for key in ["requests", "limits"] {
        ensure!(
            resources[key]["cpu"].is_string() && resources[key]["memory"].is_string(),
            "no {key}: {resources}"
        );
    }

    // The config: output none, every namespace but kube-system.
    let config_map = one(docs, "ConfigMap")?;
    let config = documents(config_map["data"]["config.yaml"].as_str().unwrap_or(""))?
        .pop()
        .context("config.yaml is empty")?;
    ensure!(config["output"] == "none", "output: {}", config["output"]);
    ensure!(
        config["prometheus"]["address"] == "0.0.0.0:9464",
        "prometheus.address: {}",
        config["prometheus"]["address"]
    );
    ensure!(
        config["discovery"]["exclude"] == serde_json::json!([{"k8s_namespace": "kube-system"}])
            && config["discovery"].get("include").is_none(),
        "discovery: {}",
        config["discovery"]
    );

    // RBAC: read-only on pods, ReplicaSets and Jobs, bound to the pods' service account.
    let role = one(docs, "ClusterRole")?;
    let mut resources_granted = Vec::new();
    for rule in role["rules"].as_array().context("no rules")? {
        ensure!(
            strings(&rule["verbs"]) == ["get", "list", "watch"],
            "a rule is not read-only: {rule}"
        );
        resources_granted.extend(strings(&rule["resources"]));
    }
    resources_granted.sort_unstable();
    ensure!(
        resources_granted == ["jobs", "pods", "replicasets"],
        "the role grants {resources_granted:?}"
    );
    let binding = one(docs, "ClusterRoleBinding")?;
    let account = one(docs, "ServiceAccount")?;
    ensure!(
        binding["roleRef"]["name"] == role["metadata"]["name"]
            && binding["subjects"][0]["name"] == account["metadata"]["name"]
            && binding["subjects"][0]["namespace"] == NAMESPACE
            && spec["serviceAccountName"] == account["metadata"]["name"],
        "the binding does not bind the role to the pods' service account"
    );
    ensure!(
        container["image"] == format!("ghcr.io/kspan/kspan:{}", chart_app_version()?).as_str(),
        "image {} is not the chart's appVersion",
        container["image"]
    );
    Ok(())
}

/// ci/non-default-values.yaml: privileged, another collector and protocol, other tolerations
/// and resources, no RBAC of the chart's own.
fn check_non_default_render(docs: &[Value]) -> Result<()> {
    check_common(docs)?;
    let daemonset = one(docs, "DaemonSet")?;
    let spec = &daemonset["spec"]["template"]["spec"];
    let container = &spec["containers"][0];
    let security = &container["securityContext"];
    ensure!(security["privileged"] == true, "not privileged: {security}");
    ensure!(
        security.get("capabilities").is_none(),
        "a privileged container with a capability list: {security}"
    );
    ensure!(
        env(container, "OTEL_EXPORTER_OTLP_ENDPOINT")?["value"]
            == "http://otel-collector.observability.svc:4317"
            && env(container, "OTEL_EXPORTER_OTLP_PROTOCOL")?["value"] == "grpc",
        "the OTLP values are not used"
    );
    ensure!(
        env(container, "OTEL_EXPORTER_OTLP_HEADERS")?["valueFrom"]["secretKeyRef"]["name"]
            == "otlp-auth",
        "extraEnv is not used"
    );
    ensure!(
        spec["tolerations"].as_array().map(Vec::len) == Some(2),
        "tolerations: {}",
        spec["tolerations"]
    );
    ensure!(
        container["resources"]["limits"]["memory"] == "1Gi",
        "resources: {}",
        container["resources"]
    );
    ensure!(
        spec["hostNetwork"] == true && spec["dnsPolicy"] == "ClusterFirstWithHostNet",
        "hostNetwork without its DNS policy"
    );
    ensure!(
        spec["serviceAccountName"] == "existing-account"
            && docs
                .iter()
                .all(|d| !["ServiceAccount", "ClusterRole", "ClusterRoleBinding"]
                    .contains(&d["kind"].as_str().unwrap_or(""))),
        "serviceAccount.create=false and rbac.create=false still render them"
    );
    ensure!(
        spec.get("priorityClassName").is_none(),
        "an empty priorityClassName is rendered"
    );
    Ok(())
}

/// `appVersion` of the chart's Chart.yaml.
fn chart_app_version() -> Result<String> {
    let path = root().join(CHART).join("Chart.yaml");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let chart = documents(&text)?.pop().context("Chart.yaml is empty")?;
    chart["appVersion"]
        .as_str()
        .map(str::to_string)
        .context("Chart.yaml has no appVersion")
}
