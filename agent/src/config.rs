//! The configuration file (`--config FILE`, or `KSPAN_CONFIG`): YAML with everything the flags
//! set, plus the discovery rules. Flags win over the file; the file wins over the OpenTelemetry
//! environment variables (`OTEL_EXPORTER_OTLP_*`, `OTEL_TRACES_SAMPLER*`).
//!
//! Every value is checked while it is read, so a mistake is reported with the file, the line
//! and the key (`discovery.include[0].port`), and unknown keys are errors: a misspelt key that
//! was silently ignored would trace what the operator meant to exclude.

use std::{collections::BTreeMap, net::SocketAddr, ops::RangeInclusive, path::Path};

use anyhow::{Context, Result};
use kspan_common::MAX_CAPTURE;
use serde::{Deserialize, Deserializer};

use crate::cli::Output;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub discovery: DiscoveryConfig,
    pub output: Option<Output>,
    #[serde(default)]
    pub otlp: OtlpConfig,
    #[serde(default)]
    pub sampling: SamplingConfig,
    #[serde(default)]
    pub prometheus: PrometheusConfig,
    #[serde(default)]
    pub capture: CaptureConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// Processes to trace; none: every process not excluded.
    #[serde(default)]
    pub include: Vec<RuleConfig>,
    /// Processes never traced, even when an include rule selects them.
    #[serde(default)]
    pub exclude: Vec<RuleConfig>,
    /// kspan itself and OpenTelemetry collectors are excluded unless this is false.
    #[serde(default = "yes")]
    pub default_excludes: bool,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            include: Vec::new(),
            exclude: Vec::new(),
            default_excludes: true,
        }
    }
}

fn yes() -> bool {
    true
}

/// One discovery rule as written: its fields AND together. At least one field.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, try_from = "RawRule")]
pub struct RuleConfig {
    pub exe: Option<Glob>,
    pub cmdline: Option<Regex>,
    pub port: Option<PortRange>,
    pub pid: Option<u32>,
    pub container_id: Option<Glob>,
    pub k8s_namespace: Option<Glob>,
    pub k8s_pod_name: Option<Glob>,
    pub k8s_deployment_name: Option<Glob>,
    pub k8s_labels: BTreeMap<String, Glob>,
    pub k8s_annotations: BTreeMap<String, Glob>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    exe: Option<Glob>,
    cmdline: Option<Regex>,
    port: Option<PortRange>,
    pid: Option<u32>,
    container_id: Option<Glob>,
    k8s_namespace: Option<Glob>,
    k8s_pod_name: Option<Glob>,
    k8s_deployment_name: Option<Glob>,
    #[serde(default)]
    k8s_labels: BTreeMap<String, Glob>,
    #[serde(default)]
    k8s_annotations: BTreeMap<String, Glob>,
}

impl TryFrom<RawRule> for RuleConfig {
    type Error = String;

    fn try_from(raw: RawRule) -> Result<Self, String> {
        let rule = RuleConfig {
            exe: raw.exe,
            cmdline: raw.cmdline,
            port: raw.port,
            pid: raw.pid,
            container_id: raw.container_id,
            k8s_namespace: raw.k8s_namespace,
            k8s_pod_name: raw.k8s_pod_name,
            k8s_deployment_name: raw.k8s_deployment_name,
            k8s_labels: raw.k8s_labels,
            k8s_annotations: raw.k8s_annotations,
        };
        // An empty rule would match every process: certainly not what was meant.
        if rule.exe.is_none()
            && rule.cmdline.is_none()
            && rule.port.is_none()
            && rule.pid.is_none()
            && rule.container_id.is_none()
            && rule.k8s_namespace.is_none()
            && rule.k8s_pod_name.is_none()
            && rule.k8s_deployment_name.is_none()
            && rule.k8s_labels.is_empty()
            && rule.k8s_annotations.is_empty()
        {
            return Err(
                "a rule needs at least one field (exe, cmdline, port, pid, container_id, \
                        k8s_namespace, k8s_pod_name, k8s_deployment_name, k8s_labels, \
                        k8s_annotations)"
                    .to_string(),
            );
        }
        Ok(rule)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpConfig {
    /// Collector base URL; wins over OTEL_EXPORTER_OTLP_ENDPOINT.
    pub endpoint: Option<String>,
    pub protocol: Option<OtlpProtocolName>,
}

/// The protocols kspan speaks, by their OpenTelemetry names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum OtlpProtocolName {
    #[serde(rename = "grpc")]
    Grpc,
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

impl OtlpProtocolName {
    pub fn as_str(self) -> &'static str {
        match self {
            OtlpProtocolName::Grpc => "grpc",
            OtlpProtocolName::HttpProtobuf => "http/protobuf",
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingConfig {
    pub ratio: Option<Ratio>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrometheusConfig {
    /// `ADDR:PORT`, e.g. `0.0.0.0:9464`.
    pub address: Option<SocketAddr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureConfig {
    pub bytes: Option<CaptureBytes>,
    pub ring_mib: Option<RingMib>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub parser_memory_mib: Option<ParserMemoryMib>,
    pub partial_timeout_secs: Option<PartialTimeoutSecs>,
}

/// A scalar as YAML gave it. Values are checked inside the deserializer's visitor, where a
/// failure is reported at the value's own line and key (a check after `deserialize` returned
/// would be reported at the enclosing mapping's).
enum Scalar<'a> {
    Unsigned(u64),
    Signed(i64),
    Float(f64),
    Text(&'a str),
}

impl Scalar<'_> {
    fn unsigned(&self) -> Result<u64, String> {
        match *self {
            Scalar::Unsigned(v) => Ok(v),
            Scalar::Signed(v) => Err(format!("{v} is negative")),
            Scalar::Float(v) => Err(format!("{v} is not a whole number")),
            Scalar::Text(t) => Err(format!("{t:?} is not a number")),
        }
    }

    fn float(&self) -> Result<f64, String> {
        match *self {
            Scalar::Unsigned(v) => Ok(v as f64),
            Scalar::Signed(v) => Ok(v as f64),
            Scalar::Float(v) => Ok(v),
            Scalar::Text(t) => Err(format!("{t:?} is not a number")),
        }
    }

    fn text(&self) -> Result<&str, String> {
        match self {
            Scalar::Text(t) => Ok(t),
            _ => Err("expected a string (quote it)".to_string()),
        }
    }
}

struct ScalarVisitor<F> {
    expecting: &'static str,
    check: F,
}

impl<'de, T, F: FnOnce(Scalar) -> Result<T, String>> serde::de::Visitor<'de> for ScalarVisitor<F> {
    type Value = T;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<T, E> {
        (self.check)(Scalar::Unsigned(v)).map_err(E::custom)
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<T, E> {
        (self.check)(Scalar::Signed(v)).map_err(E::custom)
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<T, E> {
        (self.check)(Scalar::Float(v)).map_err(E::custom)
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
        (self.check)(Scalar::Text(v)).map_err(E::custom)
    }
}

fn scalar<'de, D: Deserializer<'de>, T>(
    deserializer: D,
    expecting: &'static str,
    check: impl FnOnce(Scalar) -> Result<T, String>,
) -> Result<T, D::Error> {
    deserializer.deserialize_any(ScalarVisitor { expecting, check })
}

/// A value type checked as it is read.
macro_rules! checked {
    ($(#[$doc:meta])* $name:ident($inner:ty), $expecting:literal, $check:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq)]
        pub struct $name(pub $inner);

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let check: fn(Scalar) -> Result<$inner, String> = $check;
                scalar(deserializer, $expecting, check).map($name)
            }
        }
    };
}

checked!(
    /// A fraction of traces to keep.
    Ratio(f64),
    "a number between 0 and 1",
    |s| match s.float()? {
        v if (0.0..=1.0).contains(&v) => Ok(v),
        v => Err(format!("{v} is not between 0 and 1")),
    }
);
checked!(
    /// Bytes copied per syscall.
    CaptureBytes(u32),
    "a number of bytes",
    |s| match s.unsigned()? {
        v if v >= 1 && v as usize <= MAX_CAPTURE => Ok(v as u32),
        v => Err(format!("{v} is not between 1 and {MAX_CAPTURE}")),
    }
);
checked!(
    /// The kernel ring's size.
    RingMib(u32),
    "a power of two up to 1024",
    |s| match s.unsigned()? {
        v if v.is_power_of_two() && v <= 1024 => Ok(v as u32),
        v => Err(format!("{v} is not a power of two up to 1024")),
    }
);
checked!(
    ParserMemoryMib(u32),
    "a number of MiB",
    |s| match s.unsigned()? {
        v if (1..=65536).contains(&v) => Ok(v as u32),
        v => Err(format!("{v} is not between 1 and 65536")),
    }
);
checked!(
    PartialTimeoutSecs(u64),
    "a number of seconds",
    |s| match s.unsigned()? {
        0 => Err("must be at least 1".to_string()),
        v => Ok(v),
    }
);

/// A glob (`python3*`, `/usr/bin/*`), compiled as it is read.
#[derive(Clone, Debug)]
pub struct Glob(pub glob::Pattern);

impl<'de> Deserialize<'de> for Glob {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        scalar(deserializer, "a glob", |s| {
            // `port`-like plain numbers are fine as globs too (`pid`-named containers...).
            let text = match s {
                Scalar::Unsigned(v) => v.to_string(),
                Scalar::Signed(v) => v.to_string(),
                other => other.text()?.to_string(),
            };
            glob::Pattern::new(&text)
                .map(Glob)
                .map_err(|e| format!("{text:?} is not a valid glob: {e}"))
        })
    }
}

/// A regular expression, compiled as it is read; it matches anywhere unless anchored.
#[derive(Clone, Debug)]
pub struct Regex(pub regex::Regex);

impl<'de> Deserialize<'de> for Regex {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        scalar(deserializer, "a regular expression", |s| {
            let text = s.text()?;
            regex::Regex::new(text)
                .map(Regex)
                .map_err(|e| format!("{text:?} is not a valid regex: {e}"))
        })
    }
}

/// A TCP port or an inclusive range: `8080` or `"8000-8099"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortRange(pub RangeInclusive<u16>);

impl PortRange {
    pub fn parse(text: &str) -> Result<Self, String> {
        let port = |s: &str| {
            s.trim()
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| format!("{s:?} is not a port (1-65535)"))
        };
        let range = match text.split_once('-') {
            Some((low, high)) => port(low)?..=port(high)?,
            None => {
                let p = port(text)?;
                p..=p
            }
        };
        if range.is_empty() {
            return Err(format!("{text:?} is an empty range"));
        }
        Ok(PortRange(range))
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        scalar(deserializer, "a port or a range of ports", |s| {
            let text = match s {
                Scalar::Unsigned(v) => v.to_string(),
                Scalar::Signed(v) => v.to_string(),
                other => other.text()?.to_string(),
            };
            PortRange::parse(&text)
        })
    }
}

impl ConfigFile {
    /// Read and check FILE. Errors name the file, the line and the key.
    pub fn load(path: &Path) -> Result<ConfigFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the config file {}", path.display()))?;
        ConfigFile::parse(&text)
            .map_err(|error| anyhow::anyhow!("config file {}: {error}", path.display()))
    }

    /// The error's text says where: `discovery.include[0].port: ... at line 4 column 11`.
    pub fn parse(text: &str) -> Result<ConfigFile, String> {
        // An empty file (or only comments) is an empty configuration, not an error.
        if text.lines().all(|l| {
            let l = l.trim();
            l.is_empty() || l.starts_with('#') || l == "---"
        }) {
            return Ok(ConfigFile::default());
        }
        yaml_serde::from_str(text).map_err(|error| {
            let message = error.to_string();
            if message.contains(" at line ") {
                return message;
            }
            // An unknown key at the top level comes without its position: find its line.
            let line = message
                .split_once("unknown field `")
                .and_then(|(_, rest)| rest.split_once('`'))
                .and_then(|(key, _)| {
                    text.lines()
                        .position(|l| l.strip_prefix(key).is_some_and(|r| r.starts_with(':')))
                });
            match (line, error.location()) {
                (Some(index), _) => format!("{message} at line {}", index + 1),
                (None, Some(at)) => {
                    format!("{message} at line {} column {}", at.line(), at.column())
                }
                (None, None) => message,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(text: &str) -> String {
        ConfigFile::parse(text).expect_err("should not parse")
    }

    #[test]
    fn reads_every_section() {
        let config = ConfigFile::parse(
            r#"
discovery:
  include:
    - exe: "python3*"
      port: "8000-8099"
    - k8s_namespace: shop
      k8s_labels: {app.kubernetes.io/name: "web*"}
    - cmdline: "gunicorn .*app:"
    - pid: 42
      container_id: "3f2a*"
  exclude:
    - k8s_namespace: kube-system
output: json
otlp:
  endpoint: http://collector:4318
  protocol: grpc
sampling:
  ratio: 0.25
prometheus:
  address: 0.0.0.0:9464
capture:
  bytes: 1024
  ring_mib: 16
limits:
  parser_memory_mib: 64
  partial_timeout_secs: 10
"#,
        )
        .expect("parses");
        let include = &config.discovery.include;
        assert_eq!(include.len(), 4);
        assert_eq!(include[0].exe.as_ref().unwrap().0.as_str(), "python3*");
        assert_eq!(include[0].port, Some(PortRange(8000..=8099)));
        assert_eq!(
            include[1].k8s_labels["app.kubernetes.io/name"].0.as_str(),
            "web*"
        );
        assert!(
            include[2]
                .cmdline
                .as_ref()
                .unwrap()
                .0
                .is_match("/usr/bin/gunicorn -w 4 app:main")
        );
        assert_eq!(include[3].pid, Some(42));
        assert_eq!(config.discovery.exclude.len(), 1);
        assert!(config.discovery.default_excludes);
        assert_eq!(config.output, Some(Output::Json));
        assert_eq!(
            config.otlp.endpoint.as_deref(),
            Some("http://collector:4318")
        );
        assert_eq!(config.otlp.protocol, Some(OtlpProtocolName::Grpc));
        assert_eq!(config.sampling.ratio, Some(Ratio(0.25)));
        assert_eq!(
            config.prometheus.address,
            Some("0.0.0.0:9464".parse().unwrap())
        );
        assert_eq!(config.capture.bytes, Some(CaptureBytes(1024)));
        assert_eq!(config.capture.ring_mib, Some(RingMib(16)));
        assert_eq!(config.limits.parser_memory_mib, Some(ParserMemoryMib(64)));
        assert_eq!(
            config.limits.partial_timeout_secs,
            Some(PartialTimeoutSecs(10))
        );
    }

    #[test]
    fn an_empty_file_is_an_empty_configuration() {
        for text in ["", "\n", "# nothing yet\n", "---\n"] {
            let config = ConfigFile::parse(text).expect("parses");
            assert!(config.discovery.include.is_empty());
            assert!(config.discovery.default_excludes);
            assert_eq!(config.output, None);
        }
    }

    #[test]
    fn a_port_is_a_number_or_a_range() {
        let port = |yaml: &str| {
            ConfigFile::parse(&format!("discovery:\n  include:\n    - port: {yaml}\n"))
                .map(|c| c.discovery.include[0].port.clone().unwrap().0)
        };
        assert_eq!(port("8080"), Ok(8080..=8080));
        assert_eq!(port("\"8080\""), Ok(8080..=8080));
        assert_eq!(port("\"8000-8099\""), Ok(8000..=8099));
        assert_eq!(port("8000-8099"), Ok(8000..=8099));
        for bad in ["0", "70000", "\"9000-8000\"", "\"http\"", "-1"] {
            let error = port(bad).expect_err(bad);
            assert!(
                error.contains("discovery.include[0].port"),
                "{bad}: {error}"
            );
        }
    }

    #[test]
    fn unknown_keys_are_errors_with_their_key_and_line() {
        let error = error_of("discovery:\n  include:\n    - exe: nginx\n      prot: 80\n");
        assert!(error.contains("discovery.include[0]"), "{error}");
        assert!(error.contains("unknown field `prot`"), "{error}");
        assert!(error.contains("line 4"), "{error}");

        let error = error_of("output: text\notlp:\n  endpont: http://x:4318\n");
        assert!(error.contains("otlp: unknown field `endpont`"), "{error}");
        assert!(error.contains("line 3"), "{error}");

        let error = error_of("capture_bytes: 10\n");
        assert!(error.contains("unknown field `capture_bytes`"), "{error}");
        assert!(error.contains("line 1"), "{error}");
    }

    #[test]
    fn bad_values_are_errors_with_their_key_and_line() {
        let cases = [
            (
                "sampling:\n  ratio: 1.5\n",
                "sampling.ratio",
                "1.5 is not between 0 and 1",
                2,
            ),
            (
                "capture:\n  bytes: 0\n",
                "capture.bytes",
                "not between 1 and",
                2,
            ),
            (
                "capture:\n  ring_mib: 3\n",
                "capture.ring_mib",
                "not a power of two",
                2,
            ),
            ("output: yaml\n", "output", "unknown variant `yaml`", 1),
            (
                "otlp:\n  protocol: http/json\n",
                "otlp.protocol",
                "unknown variant `http/json`",
                2,
            ),
            (
                "prometheus:\n  address: 9464\n",
                "prometheus.address",
                "",
                2,
            ),
            (
                "discovery:\n  include:\n    - exe: \"[\"\n",
                "discovery.include[0].exe",
                "not a valid glob",
                3,
            ),
            (
                "discovery:\n  exclude:\n    - cmdline: \"(\"\n",
                "discovery.exclude[0].cmdline",
                "not a valid regex",
                3,
            ),
            (
                "discovery:\n  include:\n    - k8s_labels: {app: \"[\"}\n",
                "discovery.include[0].k8s_labels.app",
                "not a valid glob",
                3,
            ),
            (
                "limits:\n  partial_timeout_secs: 0\n",
                "limits.partial_timeout_secs",
                "at least 1",
                2,
            ),
        ];
        for (text, key, message, line) in cases {
            let error = error_of(text);
            assert!(error.contains(key), "{text:?}: {error}");
            assert!(error.contains(message), "{text:?}: {error}");
            assert!(error.contains(&format!("line {line}")), "{text:?}: {error}");
        }
    }

    #[test]
    fn an_empty_rule_is_an_error() {
        let error = error_of("discovery:\n  include:\n    - {}\n");
        // The rule as a whole is wrong: reported at its own line, under its list.
        assert!(error.contains("discovery.include"), "{error}");
        assert!(error.contains("line 3"), "{error}");
        assert!(error.contains("at least one field"), "{error}");
    }

    #[test]
    fn load_names_the_file() {
        let dir = std::env::temp_dir().join(format!("kspan-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kspan.yaml");
        std::fs::write(&path, "sampling:\n  ratio: 2\n").unwrap();
        let error = format!("{:#}", ConfigFile::load(&path).unwrap_err());
        assert!(error.contains(&path.display().to_string()), "{error}");
        assert!(error.contains("sampling.ratio"), "{error}");
        let missing = format!(
            "{:#}",
            ConfigFile::load(&dir.join("absent.yaml")).unwrap_err()
        );
        assert!(missing.contains("cannot read the config file"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
