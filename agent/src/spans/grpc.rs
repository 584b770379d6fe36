//! gRPC span builder: an HTTP/2 exchange whose content-type is `application/grpc*` becomes an
//! RPC span (OpenTelemetry RPC semantic conventions, gRPC flavour).
//!
//! Status: the gRPC status comes from the response trailers, or from the headers of a
//! Trailers-Only response. SERVER spans are errors only for the codes that mean the server
//! failed (UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS); CLIENT
//! spans for any code but OK. Without a status (stream reset, connection closed) the span is an
//! error with the exchange's error as `error.type`. A status kspan could not decode (the HPACK
//! entry it refers to was sent before kspan saw the connection, or was lost) is unknown: no
//! code, no error, status unset.

use std::net::SocketAddr;
use std::sync::Arc;

use compact_str::CompactString;

use super::http::{address_string, http_span, parse_host};
use super::{AttributeValue, Attributes, Resource, Span, SpanIds, SpanKind, SpanStatus};
use crate::clock::Clock;
use crate::protocols::http::HttpPayload;
use crate::protocols::{Exchange, Role};

/// gRPC status code names, by code (0..=16).
const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// Codes that make a SERVER span an error.
const SERVER_ERROR_CODES: [u32; 6] = [2, 4, 12, 13, 14, 15];

/// `/package.Service/Method` → (`package.Service`, `Method`); None for anything else.
pub fn service_and_method(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    let plain = |s: &str| {
        !s.is_empty()
            && s.len() <= 256
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-$".contains(&b))
    };
    (plain(service) && plain(method)).then_some((service, method))
}

/// Builds the span of a gRPC call; a path that is not `/service/method` gets an HTTP span.
pub fn grpc_span(
    exchange: &Exchange,
    http: &HttpPayload,
    ids: SpanIds,
    local: SocketAddr,
    remote: SocketAddr,
    resource: &Arc<Resource>,
    clock: &Clock,
) -> Span {
    let Some((service, method)) = service_and_method(&http.request.target) else {
        return http_span(exchange, http, ids, local, remote, resource, clock);
    };
    let kind = match exchange.role {
        Role::Server => SpanKind::Server,
        Role::Client => SpanKind::Client,
    };
    let mut name = CompactString::with_capacity(service.len() + 1 + method.len());
    name.push_str(service);
    name.push('/');
    name.push_str(method);

    let code = http.response.as_ref().and_then(|r| r.grpc_status);
    let (status, error_type) = status_of(exchange, http, code);

    let remote_address = address_string(remote.ip());
    let socket = match exchange.role {
        Role::Server => local,
        Role::Client => remote,
    };
    let (server_address, server_port) = match http.request.host.as_deref().and_then(parse_host) {
        Some((h, p)) => (h, p.unwrap_or(socket.port())),
        None => (address_string(socket.ip()), socket.port()),
    };

    let mut attributes: Attributes = Vec::with_capacity(12);
    let mut put = |key: &'static str, value: AttributeValue| attributes.push((key, value));
    let str_value = |s: &str| AttributeValue::Str(s.into());
    put("rpc.system", str_value("grpc"));
    put("rpc.service", str_value(service));
    put("rpc.method", str_value(method));
    if let Some(code) = code {
        put("rpc.grpc.status_code", AttributeValue::Int(code.into()));
    }
    put("network.protocol.name", str_value("http"));
    put("network.protocol.version", str_value("2"));
    put("server.address", str_value(&server_address));
    put("server.port", AttributeValue::Int(server_port.into()));
    if kind == SpanKind::Server {
        put("client.address", str_value(&remote_address));
        put("client.port", AttributeValue::Int(remote.port().into()));
    }
    put("network.peer.address", str_value(&remote_address));
    put(
        "network.peer.port",
        AttributeValue::Int(remote.port().into()),
    );
    if let Some(error_type) = error_type {
        put("error.type", AttributeValue::Str(error_type));
    }

    Span::of_exchange(
        exchange,
        ids,
        (name, kind, status, attributes),
        resource,
        clock,
    )
}

fn status_of(
    exchange: &Exchange,
    http: &HttpPayload,
    code: Option<u32>,
) -> (SpanStatus, Option<CompactString>) {
    if let Some(code) = code {
        let error = match exchange.role {
            Role::Server => SERVER_ERROR_CODES.contains(&code),
            Role::Client => code != 0,
        };
        if error {
            let name = CODE_NAMES.get(code as usize).copied();
            let error_type = name.map_or_else(|| code.to_string().into(), CompactString::from);
            return (SpanStatus::Error, Some(error_type));
        }
        if exchange.error.is_none() {
            return (SpanStatus::Unset, None);
        }
    }
    if let Some(error) = exchange.error {
        return (SpanStatus::Error, Some(error.as_str().into()));
    }
    match &http.response {
        // The status is among the fields that could not be decoded: unknown, not an error.
        Some(response)
            if response.fields_lost && (response.status == 0 || response.status == 200) =>
        {
            (SpanStatus::Unset, None)
        }
        // A response without grpc-status: the call did not complete as gRPC (an HTTP error
        // from a proxy, or a stream ended without trailers).
        Some(response) if response.status != 200 => {
            (SpanStatus::Error, Some(response.status.to_string().into()))
        }
        Some(_) => (SpanStatus::Error, Some("missing_grpc_status".into())),
        None => (SpanStatus::Error, Some("_OTHER".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocols::http::{HttpRequest, HttpResponse};
    use crate::protocols::{ExchangeError, Payload};
    use AttributeValue::{Int, Str};

    fn call(role: Role, path: &str, code: Option<u32>, error: Option<ExchangeError>) -> Exchange {
        Exchange {
            role,
            id: 1,
            start_ns: 1_000,
            end_ns: 201_000_000,
            request_tid: 3,
            response_tid: 3,
            error,
            payload: Payload::Http(HttpPayload {
                request: HttpRequest {
                    method: "POST".into(),
                    target: path.into(),
                    version: "2",
                    scheme: Some("http".into()),
                    host: Some("127.0.0.1:50051".into()),
                    grpc: true,
                    ..HttpRequest::default()
                },
                response: Some(HttpResponse {
                    status: 200,
                    version: "2",
                    body_len: 5,
                    grpc_status: code,
                    fields_lost: false,
                }),
            }),
        }
    }

    fn build(ex: &Exchange) -> Span {
        let Payload::Http(http) = &ex.payload else {
            panic!("not HTTP");
        };
        grpc_span(
            ex,
            http,
            SpanIds {
                trace_id: [1; 16],
                span_id: [2; 8],
                parent_span_id: None,
            },
            "127.0.0.1:50051".parse().unwrap(),
            "127.0.0.1:40000".parse().unwrap(),
            &Arc::new(Resource {
                attributes: Vec::new(),
            }),
            &Clock::with_offset(0),
        )
    }

    #[test]
    fn paths_split_into_service_and_method() {
        assert_eq!(
            service_and_method("/acc.Shop/GetItem"),
            Some(("acc.Shop", "GetItem"))
        );
        assert_eq!(service_and_method("/acc.Shop"), None);
        assert_eq!(service_and_method("/acc.Shop/Get/Item"), None);
        assert_eq!(service_and_method("/a/b?x=1"), None);
        assert_eq!(service_and_method("acc.Shop/GetItem"), None);
    }

    #[test]
    fn a_call_gets_rpc_attributes() {
        let span = build(&call(Role::Server, "/acc.Shop/GetItem", Some(0), None));
        assert_eq!(span.name, "acc.Shop/GetItem");
        assert_eq!(span.kind, SpanKind::Server);
        assert_eq!(span.status, SpanStatus::Unset);
        assert_eq!(span.attribute("rpc.system"), Some(&Str("grpc".into())));
        assert_eq!(span.attribute("rpc.service"), Some(&Str("acc.Shop".into())));
        assert_eq!(span.attribute("rpc.method"), Some(&Str("GetItem".into())));
        assert_eq!(span.attribute("rpc.grpc.status_code"), Some(&Int(0)));
        assert_eq!(span.attribute("server.port"), Some(&Int(50051)));
        assert_eq!(span.attribute("client.port"), Some(&Int(40000)));
        assert_eq!(span.attribute("error.type"), None);
        assert_eq!(span.end_unix_nano - span.start_unix_nano, 200_999_000);
    }

    #[test]
    fn server_and_client_disagree_on_what_is_an_error() {
        for (code, server_error) in [(5, false), (13, true), (4, true), (3, false), (14, true)] {
            let server = build(&call(Role::Server, "/a.B/C", Some(code), None));
            let client = build(&call(Role::Client, "/a.B/C", Some(code), None));
            assert_eq!(
                server.status == SpanStatus::Error,
                server_error,
                "code {code}"
            );
            assert_eq!(client.status, SpanStatus::Error, "code {code}");
            assert_eq!(
                client.attribute("error.type"),
                Some(&Str(CODE_NAMES[code as usize].into()))
            );
        }
    }

    #[test]
    fn calls_without_a_status_are_errors_of_their_cause() {
        let reset = build(&call(
            Role::Client,
            "/a.B/C",
            None,
            Some(ExchangeError::StreamReset),
        ));
        assert_eq!(reset.status, SpanStatus::Error);
        assert_eq!(
            reset.attribute("error.type"),
            Some(&Str("stream_reset".into()))
        );
        assert_eq!(reset.attribute("rpc.grpc.status_code"), None);
        let missing = build(&call(Role::Server, "/a.B/C", None, None));
        assert_eq!(missing.status, SpanStatus::Error);
        assert_eq!(
            missing.attribute("error.type"),
            Some(&Str("missing_grpc_status".into()))
        );
    }

    #[test]
    fn a_status_that_could_not_be_decoded_is_unknown_not_an_error() {
        let mut ex = call(Role::Client, "/a.B/C", None, None);
        let Payload::Http(http) = &mut ex.payload else {
            panic!("not HTTP");
        };
        if let Some(response) = &mut http.response {
            response.fields_lost = true;
        }
        let span = build(&ex);
        assert_eq!(span.status, SpanStatus::Unset);
        assert_eq!(span.attribute("rpc.grpc.status_code"), None);
        assert_eq!(span.attribute("error.type"), None);
    }

    #[test]
    fn an_odd_path_gets_an_http_span() {
        let span = build(&call(Role::Server, "/not-grpc", Some(0), None));
        assert_eq!(span.name, "POST /not-grpc");
        assert_eq!(span.attribute("rpc.system"), None);
    }
}
