//! OTLP export of traces and metrics (gRPC or HTTP/protobuf): metrics through opentelemetry-otlp,
//! traces through kspan's own request (`transport`: many resources per request).
//!
//! Configuration follows the OpenTelemetry specification: OTEL_EXPORTER_OTLP_ENDPOINT,
//! OTEL_EXPORTER_OTLP_{TRACES,METRICS}_ENDPOINT, OTEL_EXPORTER_OTLP_PROTOCOL (and the per-signal
//! variants), OTEL_EXPORTER_OTLP_HEADERS (and the per-signal variants) and
//! OTEL_EXPORTER_OTLP_TIMEOUT; `--otlp-endpoint` and `--otlp-protocol` win over them.

pub mod metrics;
pub mod traces;
mod transport;

use std::time::Duration;

use anyhow::{Result, bail};
use opentelemetry_otlp::{Protocol, WithExportConfig};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

impl OtlpProtocol {
    pub fn parse(value: &str) -> Result<Self> {
        match value.trim() {
            "grpc" => Ok(OtlpProtocol::Grpc),
            "http/protobuf" => Ok(OtlpProtocol::HttpProtobuf),
            other => bail!(
                "unsupported OTLP protocol {other:?}: use grpc or http/protobuf \
                 (http/json is not supported)"
            ),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Traces,
    Metrics,
}

impl Signal {
    fn env_suffix(self) -> &'static str {
        match self {
            Signal::Traces => "TRACES",
            Signal::Metrics => "METRICS",
        }
    }

    fn http_path(self) -> &'static str {
        match self {
            Signal::Traces => "/v1/traces",
            Signal::Metrics => "/v1/metrics",
        }
    }
}

/// Where one signal goes. `endpoint` None: opentelemetry-otlp resolves it from the environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignalTarget {
    pub protocol: OtlpProtocol,
    pub endpoint: Option<String>,
}

/// The flags and the environment, resolved once at start.
#[derive(Clone, Debug, Default)]
pub struct OtlpSettings {
    pub endpoint_flag: Option<String>,
    pub protocol_flag: Option<String>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl OtlpSettings {
    /// None when nothing configures an endpoint for this signal: no export.
    pub fn target(&self, signal: Signal) -> Result<Option<SignalTarget>> {
        let suffix = signal.env_suffix();
        let signal_endpoint = env(&format!("OTEL_EXPORTER_OTLP_{suffix}_ENDPOINT"));
        let generic_endpoint = env("OTEL_EXPORTER_OTLP_ENDPOINT");
        if self.endpoint_flag.is_none() && signal_endpoint.is_none() && generic_endpoint.is_none() {
            return Ok(None);
        }
        // The specification's default is http/protobuf.
        let protocol = match self
            .protocol_flag
            .clone()
            .or_else(|| env(&format!("OTEL_EXPORTER_OTLP_{suffix}_PROTOCOL")))
            .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
        {
            Some(value) => OtlpProtocol::parse(&value)?,
            None => OtlpProtocol::HttpProtobuf,
        };
        // The flag is a base endpoint like OTEL_EXPORTER_OTLP_ENDPOINT: HTTP gets the signal path.
        let endpoint = self.endpoint_flag.as_ref().map(|base| match protocol {
            OtlpProtocol::Grpc => base.clone(),
            OtlpProtocol::HttpProtobuf => {
                format!("{}{}", base.trim_end_matches('/'), signal.http_path())
            }
        });
        Ok(Some(SignalTarget { protocol, endpoint }))
    }
}

/// The per-export deadline opentelemetry-otlp applies (its retries happen inside it).
pub fn export_timeout(signal: Signal) -> Duration {
    let parse = |name: &str| env(name).and_then(|v| v.trim().parse::<u64>().ok());
    parse(&format!(
        "OTEL_EXPORTER_OTLP_{}_TIMEOUT",
        signal.env_suffix()
    ))
    .or_else(|| parse("OTEL_EXPORTER_OTLP_TIMEOUT"))
    .map(Duration::from_millis)
    .unwrap_or(Duration::from_secs(10))
}

pub fn build_metric_exporter(target: &SignalTarget) -> Result<opentelemetry_otlp::MetricExporter> {
    let builder = opentelemetry_otlp::MetricExporter::builder();
    let exporter = match target.protocol {
        OtlpProtocol::Grpc => {
            let mut b = builder.with_tonic();
            if let Some(endpoint) = &target.endpoint {
                b = b.with_endpoint(endpoint);
            }
            b.build()?
        }
        OtlpProtocol::HttpProtobuf => {
            let mut b = builder.with_http().with_protocol(Protocol::HttpBinary);
            if let Some(endpoint) = &target.endpoint {
                b = b.with_endpoint(endpoint);
            }
            b.build()?
        }
    };
    Ok(exporter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_endpoint_gets_signal_path_for_http_only() {
        let settings = OtlpSettings {
            endpoint_flag: Some("http://collector:4318/".into()),
            protocol_flag: Some("http/protobuf".into()),
        };
        let traces = settings.target(Signal::Traces).unwrap().unwrap();
        assert_eq!(traces.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(
            traces.endpoint.as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        let metrics = settings.target(Signal::Metrics).unwrap().unwrap();
        assert_eq!(
            metrics.endpoint.as_deref(),
            Some("http://collector:4318/v1/metrics")
        );

        let grpc = OtlpSettings {
            endpoint_flag: Some("http://collector:4317".into()),
            protocol_flag: Some("grpc".into()),
        };
        let traces = grpc.target(Signal::Traces).unwrap().unwrap();
        assert_eq!(traces.protocol, OtlpProtocol::Grpc);
        assert_eq!(traces.endpoint.as_deref(), Some("http://collector:4317"));
    }

    #[test]
    fn bad_protocol_is_an_error() {
        let settings = OtlpSettings {
            endpoint_flag: Some("http://x:1".into()),
            protocol_flag: Some("http/json".into()),
        };
        assert!(settings.target(Signal::Traces).is_err());
    }
}
