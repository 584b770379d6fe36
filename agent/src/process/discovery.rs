//! Which processes are traced: include and exclude rules (the config file's `discovery`, or the
//! `--pid`, `--exe` and `--port` flags, one rule each). The fields of a rule AND together, rules
//! OR; a process is traced when an include rule matches it (or there is none) and no exclude
//! rule does.
//!
//! Facts about a process are read lazily through [`ProcessFacts`], cheapest first, so a rule that
//! fails on its executable never reads the process's sockets.

use std::{
    collections::BTreeMap,
    ops::RangeInclusive,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use crate::config::{Glob, RuleConfig};

/// Processes excluded unless `discovery.default_excludes: false`: another kspan, and
/// OpenTelemetry collectors (tracing the collector that receives kspan's spans would trace
/// kspan's own exports: a loop).
pub const DEFAULT_EXCLUDED_EXES: &[&str] = &[
    "kspan",
    "otelcol*",
    "otel-collector*",
    "opentelemetry-collector*",
];

#[derive(Clone, Debug)]
enum ExePattern {
    /// No '/': matched (as a glob) against the executable's file name, e.g. `curl`, `python3*`.
    FileName(glob::Pattern),
    /// Contains '/': a glob on the full path, e.g. `/usr/bin/*`, `/opt/**/server`.
    FullPath(glob::Pattern),
}

impl ExePattern {
    fn new(pattern: glob::Pattern) -> Self {
        if pattern.as_str().contains('/') {
            ExePattern::FullPath(pattern)
        } else {
            ExePattern::FileName(pattern)
        }
    }

    fn matches(&self, exe: &Path) -> bool {
        match self {
            ExePattern::FileName(p) => {
                p.matches(exe.file_name().and_then(|n| n.to_str()).unwrap_or(""))
            }
            ExePattern::FullPath(p) => p.matches(exe.to_str().unwrap_or("")),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            ExePattern::FileName(p) | ExePattern::FullPath(p) => p.as_str(),
        }
    }

    /// A plain file name (no glob character): the kernel can match it at exec.
    fn plain_name(&self) -> Option<&str> {
        match self {
            ExePattern::FileName(p) if !p.as_str().contains(['*', '?', '[', ']']) => {
                Some(p.as_str())
            }
            _ => None,
        }
    }
}

/// What is known about a process's Kubernetes pod, for the `k8s_*` fields.
#[derive(Clone, Copy, Debug)]
pub struct KubernetesView<'a> {
    pub namespace: &'a str,
    pub pod_name: &'a str,
    /// The deployment that owns the pod, if any.
    pub deployment_name: Option<&'a str>,
    pub labels: &'a BTreeMap<String, String>,
    pub annotations: &'a BTreeMap<String, String>,
}

/// The facts rules are matched on, each read at most once and only when a rule needs it.
pub trait ProcessFacts {
    /// `pid` is this process or one of its ancestors.
    fn descends_from(&mut self, pid: u32) -> bool;
    fn exe(&mut self) -> Option<PathBuf>;
    /// The command line, arguments joined by spaces.
    fn cmdline(&mut self) -> Option<String>;
    /// It listens on a TCP port in `ports`.
    fn listens_on(&mut self, ports: &RangeInclusive<u16>) -> bool;
    fn container_id(&mut self) -> Option<String>;
    /// None until the pod is known (or on a host without Kubernetes).
    fn kubernetes(&mut self) -> Option<KubernetesView<'_>>;
}

/// One rule, compiled.
#[derive(Clone, Debug, Default)]
pub struct Rule {
    pid: Option<u32>,
    exe: Option<ExePattern>,
    cmdline: Option<regex::Regex>,
    ports: Option<RangeInclusive<u16>>,
    container_id: Option<glob::Pattern>,
    k8s_namespace: Option<glob::Pattern>,
    k8s_pod_name: Option<glob::Pattern>,
    k8s_deployment_name: Option<glob::Pattern>,
    k8s_labels: Vec<(String, glob::Pattern)>,
    k8s_annotations: Vec<(String, glob::Pattern)>,
}

impl Rule {
    pub fn from_config(config: &RuleConfig) -> Rule {
        let glob = |g: &Option<Glob>| g.as_ref().map(|g| g.0.clone());
        let globs =
            |m: &BTreeMap<String, Glob>| m.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect();
        Rule {
            pid: config.pid,
            exe: config.exe.as_ref().map(|g| ExePattern::new(g.0.clone())),
            cmdline: config.cmdline.as_ref().map(|r| r.0.clone()),
            ports: config.port.as_ref().map(|p| p.0.clone()),
            container_id: glob(&config.container_id),
            k8s_namespace: glob(&config.k8s_namespace),
            k8s_pod_name: glob(&config.k8s_pod_name),
            k8s_deployment_name: glob(&config.k8s_deployment_name),
            k8s_labels: globs(&config.k8s_labels),
            k8s_annotations: globs(&config.k8s_annotations),
        }
    }

    pub fn pid(pid: u32) -> Rule {
        Rule {
            pid: Some(pid),
            ..Rule::default()
        }
    }

    /// `--exe`: a glob on the file name, or on the full path when it contains '/'.
    pub fn exe(pattern: &str) -> Result<Rule> {
        let pattern = glob::Pattern::new(pattern)
            .with_context(|| format!("--exe {pattern:?} is not a valid glob"))?;
        Ok(Rule {
            exe: Some(ExePattern::new(pattern)),
            ..Rule::default()
        })
    }

    pub fn port(port: u16) -> Rule {
        Rule {
            ports: Some(port..=port),
            ..Rule::default()
        }
    }

    fn has_kubernetes_fields(&self) -> bool {
        self.k8s_namespace.is_some()
            || self.k8s_pod_name.is_some()
            || self.k8s_deployment_name.is_some()
            || !self.k8s_labels.is_empty()
            || !self.k8s_annotations.is_empty()
    }

    /// Every field matches; the cheap ones are tried first.
    pub fn matches(&self, facts: &mut dyn ProcessFacts) -> bool {
        if let Some(pid) = self.pid
            && !facts.descends_from(pid)
        {
            return false;
        }
        if let Some(exe) = &self.exe
            && !facts.exe().is_some_and(|path| exe.matches(&path))
        {
            return false;
        }
        if let Some(cmdline) = &self.cmdline
            && !facts.cmdline().is_some_and(|c| cmdline.is_match(&c))
        {
            return false;
        }
        if let Some(pattern) = &self.container_id
            && !facts.container_id().is_some_and(|id| pattern.matches(&id))
        {
            return false;
        }
        if self.has_kubernetes_fields() && !self.matches_kubernetes(facts.kubernetes()) {
            return false;
        }
        // Last: it may read the process's sockets.
        if let Some(ports) = &self.ports
            && !facts.listens_on(ports)
        {
            return false;
        }
        true
    }

    fn matches_kubernetes(&self, pod: Option<KubernetesView<'_>>) -> bool {
        let Some(pod) = pod else {
            return false;
        };
        let matches = |pattern: &Option<glob::Pattern>, value: Option<&str>| {
            pattern
                .as_ref()
                .is_none_or(|p| value.is_some_and(|v| p.matches(v)))
        };
        let all_match = |wanted: &[(String, glob::Pattern)], have: &BTreeMap<String, String>| {
            wanted
                .iter()
                .all(|(key, p)| have.get(key).is_some_and(|v| p.matches(v)))
        };
        matches(&self.k8s_namespace, Some(pod.namespace))
            && matches(&self.k8s_pod_name, Some(pod.pod_name))
            && matches(&self.k8s_deployment_name, pod.deployment_name)
            && all_match(&self.k8s_labels, pod.labels)
            && all_match(&self.k8s_annotations, pod.annotations)
    }

    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(pid) = self.pid {
            parts.push(format!("pid {pid}"));
        }
        if let Some(exe) = &self.exe {
            parts.push(format!("exe {}", exe.as_str()));
        }
        if let Some(cmdline) = &self.cmdline {
            parts.push(format!("cmdline /{}/", cmdline.as_str()));
        }
        if let Some(ports) = &self.ports {
            if ports.start() == ports.end() {
                parts.push(format!("port {}", ports.start()));
            } else {
                parts.push(format!("port {}-{}", ports.start(), ports.end()));
            }
        }
        if let Some(id) = &self.container_id {
            parts.push(format!("container {}", id.as_str()));
        }
        if let Some(p) = &self.k8s_namespace {
            parts.push(format!("namespace {}", p.as_str()));
        }
        if let Some(p) = &self.k8s_pod_name {
            parts.push(format!("pod {}", p.as_str()));
        }
        if let Some(p) = &self.k8s_deployment_name {
            parts.push(format!("deployment {}", p.as_str()));
        }
        for (key, p) in &self.k8s_labels {
            parts.push(format!("label {key}={}", p.as_str()));
        }
        for (key, p) in &self.k8s_annotations {
            parts.push(format!("annotation {key}={}", p.as_str()));
        }
        parts.join(" and ")
    }
}

/// The include and exclude rules.
#[derive(Clone, Debug, Default)]
pub struct Discovery {
    include: Vec<Rule>,
    exclude: Vec<Rule>,
}

impl Discovery {
    pub fn new(include: Vec<Rule>, exclude: Vec<Rule>) -> Discovery {
        Discovery { include, exclude }
    }

    /// The rules of the config file's `discovery` section, and the default excludes unless it
    /// turns them off. `flags`: the `--pid`/`--exe`/`--port` rules, which replace the file's
    /// include rules when there are any.
    pub fn from_config(config: &crate::config::DiscoveryConfig, flags: Vec<Rule>) -> Discovery {
        let include = if flags.is_empty() {
            config.include.iter().map(Rule::from_config).collect()
        } else {
            flags
        };
        let mut exclude: Vec<Rule> = config.exclude.iter().map(Rule::from_config).collect();
        if config.default_excludes {
            exclude.extend(
                DEFAULT_EXCLUDED_EXES
                    .iter()
                    .map(|name| Rule::exe(name).expect("the default excludes are valid globs")),
            );
        }
        Discovery { include, exclude }
    }

    /// No rule at all: the kernel traces every process but kspan without asking userspace.
    /// With any rule (the default excludes are rules), the kernel's pid filter decides, and
    /// userspace fills it.
    pub fn trace_all(&self) -> bool {
        self.include.is_empty() && self.exclude.is_empty()
    }

    pub fn selects(&self, facts: &mut dyn ProcessFacts) -> bool {
        let included = self.include.is_empty() || self.include.iter().any(|r| r.matches(facts));
        included && !self.exclude.iter().any(|r| r.matches(facts))
    }

    /// Whether a new listening socket can change a process's selection.
    pub fn has_port_rules(&self) -> bool {
        self.include
            .iter()
            .chain(&self.exclude)
            .any(|r| r.ports.is_some())
    }

    /// Whether Kubernetes metadata can change a process's selection.
    pub fn has_kubernetes_rules(&self) -> bool {
        self.include
            .iter()
            .chain(&self.exclude)
            .any(Rule::has_kubernetes_fields)
    }

    /// Include rules that are nothing but a plain executable name: the kernel traces a program
    /// of that name from its exec on, before userspace confirms it.
    pub fn plain_exe_names(&self) -> Vec<String> {
        self.include
            .iter()
            .filter(|r| {
                r.pid.is_none()
                    && r.cmdline.is_none()
                    && r.ports.is_none()
                    && r.container_id.is_none()
                    && !r.has_kubernetes_fields()
            })
            .filter_map(|r| r.exe.as_ref()?.plain_name().map(str::to_string))
            .collect()
    }

    /// For the ready line and logs.
    pub fn describe(&self) -> String {
        let include = if self.include.is_empty() {
            "all processes".to_string()
        } else {
            self.include
                .iter()
                .map(Rule::describe)
                .collect::<Vec<_>>()
                .join(", ")
        };
        if self.exclude.is_empty() {
            return include;
        }
        let exclude: Vec<String> = self.exclude.iter().map(Rule::describe).collect();
        format!("{include}; excluding {}", exclude.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigFile;

    /// Namespace, pod name, deployment, labels, annotations.
    type Pod = (
        String,
        String,
        Option<String>,
        BTreeMap<String, String>,
        BTreeMap<String, String>,
    );

    /// Facts given outright; counts the socket reads.
    #[derive(Default)]
    struct Known {
        pid: u32,
        ancestors: Vec<u32>,
        exe: Option<PathBuf>,
        cmdline: Option<String>,
        ports: Vec<u16>,
        container_id: Option<String>,
        pod: Option<Pod>,
        socket_reads: usize,
    }

    impl ProcessFacts for Known {
        fn descends_from(&mut self, pid: u32) -> bool {
            self.pid == pid || self.ancestors.contains(&pid)
        }
        fn exe(&mut self) -> Option<PathBuf> {
            self.exe.clone()
        }
        fn cmdline(&mut self) -> Option<String> {
            self.cmdline.clone()
        }
        fn listens_on(&mut self, ports: &RangeInclusive<u16>) -> bool {
            self.socket_reads += 1;
            self.ports.iter().any(|p| ports.contains(p))
        }
        fn container_id(&mut self) -> Option<String> {
            self.container_id.clone()
        }
        fn kubernetes(&mut self) -> Option<KubernetesView<'_>> {
            self.pod.as_ref().map(
                |(ns, pod, deployment, labels, annotations)| KubernetesView {
                    namespace: ns,
                    pod_name: pod,
                    deployment_name: deployment.as_deref(),
                    labels,
                    annotations,
                },
            )
        }
    }

    fn python_web() -> Known {
        Known {
            pid: 300,
            ancestors: vec![200, 100],
            exe: Some("/usr/bin/python3.11".into()),
            cmdline: Some("python3 -m gunicorn app:main".into()),
            ports: vec![8080],
            container_id: Some("3f2a9c".into()),
            pod: Some((
                "shop".into(),
                "web-7d9f-abcde".into(),
                Some("web".into()),
                BTreeMap::from([("app.kubernetes.io/name".into(), "web".into())]),
                BTreeMap::from([("team".into(), "payments".into())]),
            )),
            ..Known::default()
        }
    }

    fn discovery(yaml: &str) -> Discovery {
        let config = ConfigFile::parse(yaml).expect("valid config");
        Discovery::from_config(&config.discovery, Vec::new())
    }

    #[test]
    fn fields_of_a_rule_and_together_rules_or() {
        let both = discovery("discovery:\n  include:\n    - {exe: \"python3*\", port: 8080}\n");
        assert!(both.selects(&mut python_web()));
        let wrong_port =
            discovery("discovery:\n  include:\n    - {exe: \"python3*\", port: 9090}\n");
        assert!(!wrong_port.selects(&mut python_web()));
        let either =
            discovery("discovery:\n  include:\n    - {exe: nginx}\n    - {port: \"8000-8099\"}\n");
        assert!(either.selects(&mut python_web()));
    }

    #[test]
    fn every_field_matches_its_fact() {
        let selects = |rule: &str| {
            discovery(&format!("discovery:\n  include:\n    - {rule}\n")).selects(&mut python_web())
        };
        for (rule, expected) in [
            ("{exe: python3.11}", true),
            ("{exe: \"python*\"}", true),
            ("{exe: \"/usr/bin/*\"}", true),
            ("{exe: \"/opt/*\"}", false),
            ("{cmdline: \"gunicorn .*:main\"}", true),
            ("{cmdline: \"^gunicorn\"}", false),
            ("{pid: 300}", true),
            ("{pid: 100}", true), // an ancestor: its descendants are traced
            ("{pid: 301}", false),
            ("{port: 8080}", true),
            ("{port: \"1-1000\"}", false),
            ("{container_id: \"3f2a*\"}", true),
            ("{container_id: \"ffff*\"}", false),
            ("{k8s_namespace: shop}", true),
            ("{k8s_namespace: \"kube-*\"}", false),
            ("{k8s_pod_name: \"web-*\"}", true),
            ("{k8s_deployment_name: web}", true),
            ("{k8s_deployment_name: api}", false),
            ("{k8s_labels: {app.kubernetes.io/name: \"we*\"}}", true),
            (
                "{k8s_labels: {app.kubernetes.io/name: web, tier: \"*\"}}",
                false,
            ),
            ("{k8s_annotations: {team: payments}}", true),
            ("{k8s_annotations: {team: search}}", false),
        ] {
            assert_eq!(selects(rule), expected, "{rule}");
        }
    }

    #[test]
    fn kubernetes_fields_do_not_match_before_the_pod_is_known() {
        let mut host_process = python_web();
        host_process.pod = None;
        let rules = discovery("discovery:\n  include:\n    - {k8s_namespace: \"*\"}\n");
        assert!(!rules.selects(&mut host_process));
        assert!(rules.has_kubernetes_rules());
        // An exclude on a namespace does not exclude a host process.
        let exclude = discovery("discovery:\n  exclude:\n    - {k8s_namespace: kube-system}\n");
        assert!(exclude.selects(&mut host_process));
    }

    #[test]
    fn excludes_win_over_includes() {
        let rules = discovery(
            "discovery:\n  include:\n    - {port: 8080}\n  exclude:\n    - {cmdline: gunicorn}\n",
        );
        assert!(!rules.selects(&mut python_web()));
    }

    #[test]
    fn sockets_are_read_only_when_the_cheaper_fields_match() {
        let rules = discovery("discovery:\n  include:\n    - {exe: nginx, port: 8080}\n");
        let mut facts = python_web();
        assert!(!rules.selects(&mut facts));
        assert_eq!(facts.socket_reads, 0);
    }

    #[test]
    fn kspan_and_collectors_are_excluded_by_default() {
        let rules = discovery("");
        assert!(
            !rules.trace_all(),
            "the default excludes need the pid filter"
        );
        for (exe, traced) in [
            ("/usr/local/bin/kspan", false),
            ("/otelcol-contrib", false),
            ("/usr/bin/otelcol", false),
            ("/usr/bin/opentelemetry-collector-k8s", false),
            ("/usr/bin/nginx", true),
        ] {
            let mut facts = Known {
                exe: Some(exe.into()),
                ..Known::default()
            };
            assert_eq!(rules.selects(&mut facts), traced, "{exe}");
        }
        let none = discovery("discovery:\n  default_excludes: false\n");
        assert!(none.trace_all());
        assert_eq!(none.describe(), "all processes");
    }

    #[test]
    fn flags_replace_the_files_include_rules() {
        let config = ConfigFile::parse("discovery:\n  include:\n    - {exe: nginx}\n").unwrap();
        let rules = Discovery::from_config(&config.discovery, vec![Rule::port(8080)]);
        assert!(rules.selects(&mut python_web()));
        assert!(
            rules
                .describe()
                .starts_with("port 8080; excluding exe kspan"),
            "{}",
            rules.describe()
        );
    }

    #[test]
    fn only_plain_exe_only_rules_go_to_the_kernel() {
        let rules = discovery(
            "discovery:\n  include:\n    - {exe: nginx}\n    - {exe: \"python*\"}\n    - {exe: curl, port: 80}\n    - {exe: \"/usr/bin/wget\"}\n",
        );
        assert_eq!(rules.plain_exe_names(), vec!["nginx".to_string()]);
    }
}
