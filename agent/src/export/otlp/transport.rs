//! Sends OTLP trace requests that carry the spans of many resources. opentelemetry-otlp's
//! SpanExporter holds one resource, so a batch of spans from 50 processes took 50 requests in
//! sequence; here one `ExportTraceServiceRequest` holds one `ResourceSpans` per process. gRPC
//! goes through tonic, HTTP/protobuf through reqwest (both already in the build through
//! opentelemetry-otlp, with the same features: no TLS, no compression). The configuration comes
//! from the same environment variables (endpoint, headers; the timeout is the caller's), and
//! transient failures are retried with backoff as opentelemetry-otlp does.

use std::time::Duration;

use anyhow::{Context, Result};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, trace_service_client::TraceServiceClient,
};
use prost::Message as _;
use tonic::{
    Code,
    metadata::{AsciiMetadataKey, AsciiMetadataValue},
    transport::Channel,
};

use super::{OtlpProtocol, Signal, SignalTarget, env};

/// Retries after the first attempt of a request, for transient failures only.
const MAX_RETRIES: u32 = 3;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_millis(1600);

enum Transport {
    Grpc {
        client: TraceServiceClient<Channel>,
        headers: Vec<(AsciiMetadataKey, AsciiMetadataValue)>,
    },
    Http {
        client: reqwest::Client,
        url: String,
        headers: reqwest::header::HeaderMap,
    },
}

pub struct TraceClient {
    transport: Transport,
}

/// How one attempt failed.
enum Failure {
    /// Worth another attempt (collector unreachable, overloaded, restarting).
    Transient(String),
    Permanent(String),
}

impl TraceClient {
    /// Call inside a tokio runtime context (tonic's lazy channel spawns its worker there).
    pub fn new(target: &SignalTarget) -> Result<Self> {
        let endpoint = endpoint(target);
        let headers = env_headers(Signal::Traces);
        let transport = match target.protocol {
            OtlpProtocol::Grpc => {
                let channel = Channel::from_shared(endpoint.clone())
                    .with_context(|| format!("bad OTLP endpoint {endpoint:?}"))?
                    .connect_lazy();
                let mut metadata = Vec::with_capacity(headers.len());
                for (key, value) in headers {
                    let key = AsciiMetadataKey::from_bytes(key.to_ascii_lowercase().as_bytes())
                        .with_context(|| format!("bad OTLP header name {key:?}"))?;
                    let value = AsciiMetadataValue::try_from(value.as_str())
                        .with_context(|| format!("bad OTLP header value for {key}"))?;
                    metadata.push((key, value));
                }
                Transport::Grpc {
                    client: TraceServiceClient::new(channel),
                    headers: metadata,
                }
            }
            OtlpProtocol::HttpProtobuf => {
                let mut map = reqwest::header::HeaderMap::new();
                for (key, value) in headers {
                    let name = reqwest::header::HeaderName::from_bytes(key.as_bytes())
                        .with_context(|| format!("bad OTLP header name {key:?}"))?;
                    let value = reqwest::header::HeaderValue::try_from(value.as_str())
                        .with_context(|| format!("bad OTLP header value for {key}"))?;
                    map.insert(name, value);
                }
                Transport::Http {
                    client: reqwest::Client::builder()
                        .build()
                        .context("cannot build the OTLP HTTP client")?,
                    url: endpoint,
                    headers: map,
                }
            }
        };
        Ok(TraceClient { transport })
    }

    /// Sends `request`, retrying transient failures with exponential backoff. The caller bounds
    /// the total time.
    pub async fn export(&self, request: ExportTraceServiceRequest) -> Result<(), String> {
        // HTTP sends the same bytes on every attempt.
        let body = match &self.transport {
            Transport::Http { .. } => request.encode_to_vec(),
            Transport::Grpc { .. } => Vec::new(),
        };
        let mut backoff = FIRST_BACKOFF;
        let mut attempt = 0;
        loop {
            let result = match &self.transport {
                Transport::Grpc { client, headers } => {
                    send_grpc(client.clone(), headers, request.clone()).await
                }
                Transport::Http {
                    client,
                    url,
                    headers,
                } => send_http(client, url, headers, body.clone()).await,
            };
            match result {
                Ok(()) => return Ok(()),
                Err(Failure::Permanent(error)) => return Err(error),
                Err(Failure::Transient(error)) if attempt >= MAX_RETRIES => return Err(error),
                Err(Failure::Transient(error)) => {
                    log::debug!("OTLP trace export attempt {attempt} failed, retrying: {error}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    attempt += 1;
                }
            }
        }
    }
}

async fn send_grpc(
    mut client: TraceServiceClient<Channel>,
    headers: &[(AsciiMetadataKey, AsciiMetadataValue)],
    request: ExportTraceServiceRequest,
) -> Result<(), Failure> {
    let mut request = tonic::Request::new(request);
    for (key, value) in headers {
        request.metadata_mut().insert(key.clone(), value.clone());
    }
    match client.export(request).await {
        Ok(response) => {
            if let Some(partial) = response.into_inner().partial_success
                && partial.rejected_spans > 0
            {
                log::warn!(
                    "the collector rejected {} spans: {}",
                    partial.rejected_spans,
                    partial.error_message
                );
            }
            Ok(())
        }
        // The codes the OTLP specification calls retryable.
        Err(status) => match status.code() {
            Code::Cancelled
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::OutOfRange
            | Code::Unavailable
            | Code::DataLoss => Err(Failure::Transient(status.to_string())),
            _ => Err(Failure::Permanent(status.to_string())),
        },
    }
}

async fn send_http(
    client: &reqwest::Client,
    url: &str,
    headers: &reqwest::header::HeaderMap,
    body: Vec<u8>,
) -> Result<(), Failure> {
    let response = client
        .post(url)
        .headers(headers.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
        .body(body)
        .send()
        .await
        .map_err(|error| Failure::Transient(error.to_string()))?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let error = format!("HTTP {status} from {url}");
    // The statuses the OTLP specification calls retryable.
    match status.as_u16() {
        429 | 502 | 503 | 504 => Err(Failure::Transient(error)),
        _ => Err(Failure::Permanent(error)),
    }
}

/// The trace endpoint as opentelemetry-otlp resolves it: the flag, else
/// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT as is, else OTEL_EXPORTER_OTLP_ENDPOINT (plus `/v1/traces`
/// over HTTP), else the specification's localhost default.
fn endpoint(target: &SignalTarget) -> String {
    if let Some(endpoint) = &target.endpoint {
        return endpoint.clone();
    }
    if let Some(endpoint) = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        return endpoint;
    }
    match (target.protocol, env("OTEL_EXPORTER_OTLP_ENDPOINT")) {
        (OtlpProtocol::Grpc, Some(base)) => base,
        (OtlpProtocol::Grpc, None) => "http://localhost:4317".into(),
        (OtlpProtocol::HttpProtobuf, base) => format!(
            "{}{}",
            base.as_deref()
                .unwrap_or("http://localhost:4318")
                .trim_end_matches('/'),
            Signal::Traces.http_path()
        ),
    }
}

/// OTEL_EXPORTER_OTLP_HEADERS, then the signal's own variable (its keys win).
fn env_headers(signal: Signal) -> Vec<(String, String)> {
    let mut headers = Vec::new();
    for name in [
        "OTEL_EXPORTER_OTLP_HEADERS".to_string(),
        format!("OTEL_EXPORTER_OTLP_{}_HEADERS", signal.env_suffix()),
    ] {
        for (key, value) in parse_headers(&env(&name).unwrap_or_default()) {
            headers.retain(|(k, _): &(String, String)| !k.eq_ignore_ascii_case(&key));
            headers.push((key, value));
        }
    }
    headers
}

/// `key1=value1,key2=value2`, values percent-decoded (W3C Baggage format, as the specification
/// says). Malformed entries are skipped.
fn parse_headers(value: &str) -> Vec<(String, String)> {
    value
        .split(',')
        .filter_map(|entry| {
            let (key, value) = entry.split_once('=')?;
            let key = key.trim();
            (!key.is_empty()).then(|| (key.to_string(), percent_decode(value.trim())))
        })
        .collect()
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(high), Some(low)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((high * 16 + low) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_split_and_percent_decoded() {
        assert_eq!(
            parse_headers("api-key=a%20b, x=1,bad,=novalue,y=%zz"),
            [
                ("api-key".to_string(), "a b".to_string()),
                ("x".to_string(), "1".to_string()),
                ("y".to_string(), "%zz".to_string()),
            ]
        );
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%41%42c"), "ABc");
    }
}
