//! HTTP span builder: one HTTP [`Exchange`] in, one OpenTelemetry span out (HTTP semantic
//! conventions, stable attribute names), for HTTP/1.x and HTTP/2 alike.
//!
//! Privacy: the query string, the fragment and the path parameters (`;jsessionid=...`) of the
//! request-target never reach a span (not the name, not `url.path`, not `url.full`), nor do
//! e-mail addresses and tokens in the path (see [`super::route`]); a Host header that could
//! smuggle one (`?`, `#`, `/`, `@`, whitespace or control characters) is ignored and the socket
//! address is used instead.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use compact_str::{CompactString, ToCompactString, format_compact};

use super::route::{route_template, url_path};
use super::{AttributeValue, Attributes, Resource, Span, SpanIds, SpanKind, SpanStatus};
use crate::clock::Clock;
use crate::protocols::Exchange;
use crate::protocols::Role;
use crate::protocols::http::HttpPayload;

/// Methods reported as such; any other goes out as `_OTHER` (names are case-sensitive).
pub const KNOWN_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// The method as reported, if it is one of [`KNOWN_METHODS`].
pub fn known_method(method: &str) -> Option<&'static str> {
    KNOWN_METHODS.iter().copied().find(|m| *m == method)
}

/// An address as OpenTelemetry wants it: plain ("127.0.0.1", "::1"), IPv4-mapped IPv6 shown as
/// IPv4.
pub fn address_string(ip: IpAddr) -> CompactString {
    match ip.to_canonical() {
        // Every span formats one or two addresses: by hand, without the formatting machinery.
        IpAddr::V4(v4) => {
            let mut text = [0u8; 15];
            let mut len = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    text[len] = b'.';
                    len += 1;
                }
                if octet >= 100 {
                    text[len] = b'0' + octet / 100;
                    len += 1;
                }
                if octet >= 10 {
                    text[len] = b'0' + octet / 10 % 10;
                    len += 1;
                }
                text[len] = b'0' + octet % 10;
                len += 1;
            }
            // Only ASCII digits and dots were written.
            CompactString::from_utf8_lossy(&text[..len])
        }
        // Inline up to 24 bytes; the longest IPv6 text (45 bytes) is rare.
        ip => ip.to_compact_string(),
    }
}

/// A host and port from a Host header value: `example.com`, `example.com:8080`, `[::1]:8080`,
/// `[::1]`, also a bare (non-conforming) `::1`. The host comes back without brackets, IP
/// literals normalized (IPv4-mapped → IPv4). The port is None when absent or invalid. None when
/// the value is empty or holds characters no host has (see the module documentation).
pub fn parse_host(value: &str) -> Option<(CompactString, Option<u16>)> {
    let value = value.trim();
    let suspicious_byte =
        |b: u8| b.is_ascii_whitespace() || b.is_ascii_control() || b"/?#@".contains(&b);
    let suspicious = |c: char| c.is_whitespace() || c.is_control() || "/?#@".contains(c);
    // Bytes for ASCII (every usual Host), chars only when there is more.
    let bad = if value.is_ascii() {
        value.bytes().any(suspicious_byte)
    } else {
        value.contains(suspicious)
    };
    if bad {
        return None;
    }
    let (host, port) = if let Some(rest) = value.strip_prefix('[') {
        let close = rest.find(']')?;
        let after = &rest[close + 1..];
        (&rest[..close], after.strip_prefix(':'))
    } else {
        match value.bytes().filter(|&b| b == b':').count() {
            0 => (value, None),
            1 => {
                let (h, p) = value.split_once(':')?;
                (h, Some(p))
            }
            // A bare IPv6 literal: no port can be told apart.
            _ => (value, None),
        }
    };
    if host.is_empty() || host.bytes().any(|b| b == b'[' || b == b']') {
        return None;
    }
    let port = port.and_then(parse_port);
    // Only IPv6 literals are rewritten (IPv4-mapped → IPv4, canonical form); a name or an
    // IPv4 address is kept as written, so only a host with a colon is worth parsing.
    let host = match host.contains(':').then(|| host.parse::<IpAddr>()) {
        Some(Ok(ip)) => address_string(ip),
        _ => host.into(),
    };
    Some((host, port))
}

fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// `host` as a URL authority host: IPv6 literals bracketed.
fn url_host(host: &str) -> CompactString {
    if host.contains(':') {
        format_compact!("[{host}]")
    } else {
        host.into()
    }
}

/// Builds the span for one exchange. `local` and `remote` are the traced process's socket
/// address and its peer's.
pub fn http_span(
    exchange: &Exchange,
    http: &HttpPayload,
    ids: SpanIds,
    local: SocketAddr,
    remote: SocketAddr,
    resource: &Arc<Resource>,
    clock: &Clock,
) -> Span {
    let request = &http.request;
    let kind = match exchange.role {
        Role::Server => SpanKind::Server,
        Role::Client => SpanKind::Client,
    };
    let method = known_method(&request.method);
    let route = route_template(&request.target);
    let method_or_http = method.unwrap_or("HTTP");
    let mut name = CompactString::with_capacity(method_or_http.len() + 1 + route.len());
    name.push_str(method_or_http);
    name.push(' ');
    name.push_str(&route);
    let path = url_path(&request.target);

    let (status, error_type) = status_of(exchange, http);
    let scheme = request.scheme.as_deref().unwrap_or("http");

    let host = request.host.as_deref().and_then(parse_host);
    let remote_address = address_string(remote.ip());
    let (server_address, server_port) = {
        let socket = match exchange.role {
            Role::Server => local,
            Role::Client => remote,
        };
        match &host {
            Some((h, p)) => (h.clone(), p.unwrap_or(socket.port())),
            None => (address_string(socket.ip()), socket.port()),
        }
    };

    let mut attributes: Attributes = Vec::with_capacity(16);
    let mut put = |key: &'static str, value: AttributeValue| attributes.push((key, value));
    let str_value = |s: &str| AttributeValue::Str(s.into());
    match method {
        Some(m) => put("http.request.method", str_value(m)),
        None => {
            put("http.request.method", str_value("_OTHER"));
            put("http.request.method_original", str_value(&request.method));
        }
    }
    put("url.path", str_value(&path));
    put("url.scheme", str_value(scheme));
    if let Some(response) = &http.response
        && response.status != 0
    {
        put(
            "http.response.status_code",
            AttributeValue::Int(response.status.into()),
        );
    }
    if !request.version.is_empty() {
        put("network.protocol.version", str_value(request.version));
    }
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
    if let Some(ua) = &request.user_agent {
        put("user_agent.original", str_value(ua));
    }
    if kind == SpanKind::Client {
        let authority = match &host {
            Some((h, Some(p))) => format_compact!("{}:{p}", url_host(h)),
            Some((h, None)) => url_host(h),
            None => format_compact!("{}:{}", url_host(&remote_address), remote.port()),
        };
        put(
            "url.full",
            AttributeValue::Str(format_compact!("{scheme}://{authority}{path}")),
        );
    }
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

/// Span status and `error.type`. An error status code (≥ 500 for servers, ≥ 400 for clients)
/// gives the code; otherwise a missing response or an exchange error gives the error's name.
fn status_of(exchange: &Exchange, http: &HttpPayload) -> (SpanStatus, Option<CompactString>) {
    if let Some(response) = &http.response {
        let threshold = match exchange.role {
            Role::Server => 500,
            Role::Client => 400,
        };
        if response.status >= threshold {
            return (SpanStatus::Error, Some(response.status.to_compact_string()));
        }
    }
    match (exchange.error, &http.response) {
        (Some(error), _) => (SpanStatus::Error, Some(error.as_str().into())),
        // No response and no reason: OpenTelemetry's fallback value.
        (None, None) => (SpanStatus::Error, Some("_OTHER".into())),
        (None, Some(_)) => (SpanStatus::Unset, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocols::http::{HttpRequest, HttpResponse};
    use crate::protocols::{ExchangeError, Payload};
    use AttributeValue::{Int, Str};

    /// An HTTP exchange with its payload unpacked, as these tests edit it.
    #[derive(Clone, Debug)]
    struct HttpExchange {
        role: Role,
        request: HttpRequest,
        response: Option<HttpResponse>,
        error: Option<ExchangeError>,
        start_ns: u64,
        end_ns: u64,
        request_tid: u32,
        response_tid: u32,
    }

    impl HttpExchange {
        fn generic(&self) -> Exchange {
            Exchange {
                role: self.role,
                id: 0,
                start_ns: self.start_ns,
                end_ns: self.end_ns,
                request_tid: self.request_tid,
                response_tid: self.response_tid,
                error: self.error,
                payload: Payload::Http(HttpPayload {
                    request: self.request.clone(),
                    response: self.response.clone(),
                }),
            }
        }
    }

    const OFFSET: i128 = 1_700_000_000_000_000_000;

    fn s(v: &str) -> AttributeValue {
        Str(v.into())
    }

    fn resource() -> Arc<Resource> {
        Arc::new(Resource {
            attributes: vec![("service.name", s("python3")), ("process.pid", Int(1234))],
        })
    }

    fn exchange(role: Role, method: &str, target: &str, status: Option<u16>) -> HttpExchange {
        HttpExchange {
            role,
            request: HttpRequest {
                method: method.into(),
                target: target.into(),
                version: "1.1",
                host: Some("example.com".into()),
                user_agent: Some("curl/8.5.0".into()),
                ..HttpRequest::default()
            },
            response: status.map(|status| HttpResponse {
                status,
                version: "1.1",
                body_len: 5,
                grpc_status: None,
                fields_lost: false,
            }),
            error: if status.is_none() {
                Some(ExchangeError::ConnectionClosed)
            } else {
                None
            },
            start_ns: 1_000,
            end_ns: 2_235_000,
            request_tid: 7,
            response_tid: 7,
        }
    }

    fn local() -> SocketAddr {
        "127.0.0.1:8080".parse().unwrap()
    }

    fn remote() -> SocketAddr {
        "127.0.0.1:54321".parse().unwrap()
    }

    fn build(ex: &HttpExchange, local: SocketAddr, remote: SocketAddr) -> Span {
        let ids = SpanIds {
            trace_id: crate::tracecontext::new_trace_id(),
            span_id: crate::tracecontext::new_span_id(),
            parent_span_id: None,
        };
        let generic = ex.generic();
        let Payload::Http(http) = &generic.payload else {
            panic!("not HTTP");
        };
        http_span(
            &generic,
            http,
            ids,
            local,
            remote,
            &resource(),
            &Clock::with_offset(OFFSET),
        )
    }

    #[test]
    fn ipv4_addresses_format_like_std() {
        for text in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "1.100.99.9",
        ] {
            let ip: IpAddr = text.parse().unwrap();
            assert_eq!(address_string(ip), text);
        }
        let mapped: IpAddr = "::ffff:192.168.1.200".parse().unwrap();
        assert_eq!(address_string(mapped), "192.168.1.200");
        let v6: IpAddr = "2001:DB8::1".parse().unwrap();
        assert_eq!(address_string(v6), "2001:db8::1");
    }

    #[test]
    fn server_span() {
        let mut ex = exchange(Role::Server, "GET", "/users/123?token=secret", Some(200));
        ex.request.host = Some("example.com:8443".into());
        let span = build(&ex, local(), remote());
        assert_eq!(span.name, "GET /users/*");
        assert_eq!(span.kind, SpanKind::Server);
        assert_eq!(span.status, SpanStatus::Unset);
        assert_eq!(span.parent_span_id, None);
        assert_eq!(span.start_unix_nano, 1_700_000_000_000_001_000);
        assert_eq!(span.end_unix_nano, 1_700_000_000_002_235_000);
        assert_eq!(span.resource, resource());
        assert_eq!(
            span.attributes,
            vec![
                ("http.request.method", s("GET")),
                ("url.path", s("/users/123")),
                ("url.scheme", s("http")),
                ("http.response.status_code", Int(200)),
                ("network.protocol.version", s("1.1")),
                ("server.address", s("example.com")),
                ("server.port", Int(8443)),
                ("client.address", s("127.0.0.1")),
                ("client.port", Int(54321)),
                ("network.peer.address", s("127.0.0.1")),
                ("network.peer.port", Int(54321)),
                ("user_agent.original", s("curl/8.5.0")),
            ]
        );
    }

    #[test]
    fn client_span() {
        let ex = exchange(Role::Client, "POST", "/api/v1/orders?x=1#frag", Some(201));
        let remote: SocketAddr = "93.184.216.34:80".parse().unwrap();
        let local: SocketAddr = "10.0.0.5:40000".parse().unwrap();
        let span = build(&ex, local, remote);
        assert_eq!(span.name, "POST /api/v1/orders");
        assert_eq!(span.kind, SpanKind::Client);
        assert_eq!(span.status, SpanStatus::Unset);
        assert_eq!(
            span.attributes,
            vec![
                ("http.request.method", s("POST")),
                ("url.path", s("/api/v1/orders")),
                ("url.scheme", s("http")),
                ("http.response.status_code", Int(201)),
                ("network.protocol.version", s("1.1")),
                ("server.address", s("example.com")),
                ("server.port", Int(80)),
                ("network.peer.address", s("93.184.216.34")),
                ("network.peer.port", Int(80)),
                ("user_agent.original", s("curl/8.5.0")),
                ("url.full", s("http://example.com/api/v1/orders")),
            ]
        );
    }

    #[test]
    fn unknown_method() {
        let ex = exchange(Role::Server, "PROPFIND", "/dav/1", Some(207));
        let span = build(&ex, local(), remote());
        assert_eq!(span.name, "HTTP /dav/*");
        assert_eq!(span.attribute("http.request.method"), Some(&s("_OTHER")));
        assert_eq!(
            span.attribute("http.request.method_original"),
            Some(&s("PROPFIND"))
        );
        assert_eq!(span.attributes[1].0, "http.request.method_original");
        // Methods are case-sensitive.
        let ex = exchange(Role::Server, "get", "/", Some(200));
        let span = build(&ex, local(), remote());
        assert_eq!(span.name, "HTTP /");
        assert_eq!(span.attribute("http.request.method"), Some(&s("_OTHER")));
        assert_eq!(
            span.attribute("http.request.method_original"),
            Some(&s("get"))
        );
        // Known methods carry no method_original.
        let span = build(
            &exchange(Role::Server, "PATCH", "/", Some(200)),
            local(),
            remote(),
        );
        assert_eq!(span.attribute("http.request.method_original"), None);
    }

    #[test]
    fn no_host() {
        let mut ex = exchange(Role::Server, "GET", "/", Some(200));
        ex.request.host = None;
        ex.request.user_agent = None;
        ex.request.version = "1.0";
        let span = build(&ex, local(), remote());
        assert_eq!(span.attribute("server.address"), Some(&s("127.0.0.1")));
        assert_eq!(span.attribute("server.port"), Some(&Int(8080)));
        assert_eq!(span.attribute("network.protocol.version"), Some(&s("1.0")));
        assert_eq!(span.attribute("user_agent.original"), None);

        let mut ex = exchange(Role::Client, "GET", "/x?q=1", Some(200));
        ex.request.host = None;
        let remote: SocketAddr = "10.1.2.3:9000".parse().unwrap();
        let span = build(&ex, local(), remote);
        assert_eq!(span.attribute("server.address"), Some(&s("10.1.2.3")));
        assert_eq!(span.attribute("server.port"), Some(&Int(9000)));
        assert_eq!(
            span.attribute("url.full"),
            Some(&s("http://10.1.2.3:9000/x"))
        );
    }

    #[test]
    fn host_with_port() {
        // Server without a port in Host: the local port.
        let span = build(
            &exchange(Role::Server, "GET", "/", Some(200)),
            local(),
            remote(),
        );
        assert_eq!(span.attribute("server.address"), Some(&s("example.com")));
        assert_eq!(span.attribute("server.port"), Some(&Int(8080)));

        let mut ex = exchange(Role::Client, "GET", "/a", Some(200));
        ex.request.host = Some("api.example.com:8080".into());
        let remote: SocketAddr = "10.1.2.3:8080".parse().unwrap();
        let span = build(&ex, local(), remote);
        assert_eq!(
            span.attribute("server.address"),
            Some(&s("api.example.com"))
        );
        assert_eq!(span.attribute("server.port"), Some(&Int(8080)));
        assert_eq!(
            span.attribute("url.full"),
            Some(&s("http://api.example.com:8080/a"))
        );

        // Invalid port: the socket's port, no port in url.full.
        ex.request.host = Some("api.example.com:80x".into());
        let span = build(&ex, local(), remote);
        assert_eq!(
            span.attribute("server.address"),
            Some(&s("api.example.com"))
        );
        assert_eq!(span.attribute("server.port"), Some(&Int(8080)));
        assert_eq!(
            span.attribute("url.full"),
            Some(&s("http://api.example.com/a"))
        );
    }

    #[test]
    fn ipv6_host() {
        let mut ex = exchange(Role::Client, "GET", "/p", Some(200));
        ex.request.host = Some("[::1]:8080".into());
        let remote: SocketAddr = "[::1]:8080".parse().unwrap();
        let local: SocketAddr = "[::1]:50000".parse().unwrap();
        let span = build(&ex, local, remote);
        assert_eq!(span.attribute("server.address"), Some(&s("::1")));
        assert_eq!(span.attribute("server.port"), Some(&Int(8080)));
        assert_eq!(span.attribute("network.peer.address"), Some(&s("::1")));
        assert_eq!(span.attribute("url.full"), Some(&s("http://[::1]:8080/p")));

        ex.request.host = Some("[::1]".into());
        let span = build(&ex, local, remote);
        assert_eq!(span.attribute("server.address"), Some(&s("::1")));
        assert_eq!(span.attribute("server.port"), Some(&Int(8080)));
        assert_eq!(span.attribute("url.full"), Some(&s("http://[::1]/p")));

        ex.request.host = None;
        let span = build(&ex, local, remote);
        assert_eq!(span.attribute("url.full"), Some(&s("http://[::1]:8080/p")));
    }

    #[test]
    fn parse_host_forms() {
        let p = |v: &str| parse_host(v);
        assert_eq!(p("example.com"), Some(("example.com".into(), None)));
        assert_eq!(
            p("example.com:8080"),
            Some(("example.com".into(), Some(8080)))
        );
        assert_eq!(
            p(" example.com:8080 "),
            Some(("example.com".into(), Some(8080)))
        );
        assert_eq!(p("[::1]:8080"), Some(("::1".into(), Some(8080))));
        assert_eq!(p("[::1]"), Some(("::1".into(), None)));
        assert_eq!(p("::1"), Some(("::1".into(), None)));
        assert_eq!(
            p("[::ffff:10.0.0.1]:81"),
            Some(("10.0.0.1".into(), Some(81)))
        );
        assert_eq!(p("example.com:"), Some(("example.com".into(), None)));
        assert_eq!(p("example.com:99999"), Some(("example.com".into(), None)));
        assert_eq!(p("example.com:+80"), Some(("example.com".into(), None)));
        assert_eq!(p("[::1]x"), Some(("::1".into(), None)));
        assert_eq!(p(""), None);
        assert_eq!(p("  "), None);
        assert_eq!(p(":8080"), None);
        assert_eq!(p("[]:80"), None);
        assert_eq!(p("[::1"), None);
        assert_eq!(p("evil.com?token=1"), None);
        assert_eq!(p("user:pw@evil.com"), None);
        assert_eq!(p("a b"), None);
        assert_eq!(p("example.com:80/x"), None);
        assert_eq!(p("[::1]:80?x"), None);
        assert_eq!(p("a]b"), None);
    }

    #[test]
    fn ipv4_mapped_addresses() {
        let mut ex = exchange(Role::Server, "GET", "/", Some(200));
        ex.request.host = None;
        let local: SocketAddr = "[::ffff:192.168.1.10]:8080".parse().unwrap();
        let remote: SocketAddr = "[::ffff:192.168.1.20]:40000".parse().unwrap();
        let span = build(&ex, local, remote);
        assert_eq!(span.attribute("server.address"), Some(&s("192.168.1.10")));
        assert_eq!(span.attribute("client.address"), Some(&s("192.168.1.20")));
        assert_eq!(
            span.attribute("network.peer.address"),
            Some(&s("192.168.1.20"))
        );

        let mut ex = exchange(Role::Client, "GET", "/", Some(200));
        ex.request.host = None;
        let span = build(&ex, remote, local);
        assert_eq!(
            span.attribute("url.full"),
            Some(&s("http://192.168.1.10:8080/"))
        );
    }

    #[test]
    fn status_404_server_vs_client() {
        let span = build(
            &exchange(Role::Server, "GET", "/", Some(404)),
            local(),
            remote(),
        );
        assert_eq!(span.status, SpanStatus::Unset);
        assert_eq!(span.attribute("error.type"), None);
        let span = build(
            &exchange(Role::Client, "GET", "/", Some(404)),
            local(),
            remote(),
        );
        assert_eq!(span.status, SpanStatus::Error);
        assert_eq!(span.attribute("error.type"), Some(&s("404")));
        assert_eq!(span.attributes.last().unwrap().0, "error.type");
    }

    #[test]
    fn status_500_server() {
        let span = build(
            &exchange(Role::Server, "GET", "/", Some(500)),
            local(),
            remote(),
        );
        assert_eq!(span.status, SpanStatus::Error);
        assert_eq!(span.attribute("http.response.status_code"), Some(&Int(500)));
        assert_eq!(span.attribute("error.type"), Some(&s("500")));
        let span = build(
            &exchange(Role::Server, "GET", "/", Some(499)),
            local(),
            remote(),
        );
        assert_eq!(span.status, SpanStatus::Unset);
    }

    #[test]
    fn connection_closed() {
        for role in [Role::Server, Role::Client] {
            let span = build(&exchange(role, "GET", "/", None), local(), remote());
            assert_eq!(span.status, SpanStatus::Error);
            assert_eq!(span.attribute("error.type"), Some(&s("connection_closed")));
            assert_eq!(span.attribute("http.response.status_code"), None);
        }
        // A response with an exchange error is still an error.
        let mut ex = exchange(Role::Server, "GET", "/", Some(200));
        ex.error = Some(ExchangeError::ConnectionClosed);
        let span = build(&ex, local(), remote());
        assert_eq!(span.status, SpanStatus::Error);
        assert_eq!(span.attribute("error.type"), Some(&s("connection_closed")));
    }

    #[test]
    fn query_never_appears() {
        let targets = [
            "/search/42?q=SECRETQ&token=SECRETQ",
            "/search#SECRETQ",
            "http://example.com/search?SECRETQ",
            "http://example.com?SECRETQ",
            "?SECRETQ",
        ];
        for target in targets {
            for role in [Role::Server, Role::Client] {
                for host in [None, Some("example.com?SECRETQ"), Some("example.com")] {
                    for method in ["GET", "WEIRD"] {
                        let mut ex = exchange(role, method, target, Some(200));
                        ex.request.host = host.map(CompactString::from);
                        let span = build(&ex, local(), remote());
                        assert!(!span.name.contains("SECRETQ"), "{}", span.name);
                        for (key, value) in &span.attributes {
                            if let Str(v) = value {
                                assert!(!v.contains("SECRETQ"), "{key}={v}");
                                assert!(!v.contains('?'), "{key}={v}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn path_parameters_emails_and_tokens_never_appear() {
        let target = "/shop/cart;jsessionid=SECRETP/users/alice@example.com/\
                      reset/aB3dE5gH7jK9mN1pQ3rS?password=SECRETQ";
        for role in [Role::Server, Role::Client] {
            let ex = exchange(role, "GET", target, Some(200));
            let span = build(&ex, local(), remote());
            assert_eq!(span.name, "GET /shop/cart/users/*/reset/*");
            assert_eq!(
                span.attribute("url.path"),
                Some(&s("/shop/cart/users/REDACTED/reset/REDACTED"))
            );
            let mut texts = vec![span.name.to_string()];
            for (_, value) in &span.attributes {
                if let Str(v) = value {
                    texts.push(v.to_string());
                }
            }
            for text in texts {
                for secret in ["SECRET", "jsessionid", ";", "alice", "aB3dE5gH7jK9mN1pQ3rS"] {
                    assert!(!text.contains(secret), "{text}");
                }
            }
        }
        let ex = exchange(Role::Client, "GET", target, Some(200));
        let span = build(&ex, local(), remote());
        assert_eq!(
            span.attribute("url.full"),
            Some(&s(
                "http://example.com/shop/cart/users/REDACTED/reset/REDACTED"
            ))
        );
    }

    #[test]
    fn end_never_before_start() {
        let mut ex = exchange(Role::Server, "GET", "/", Some(200));
        ex.start_ns = 5_000;
        ex.end_ns = 4_000;
        let span = build(&ex, local(), remote());
        assert_eq!(span.start_unix_nano, span.end_unix_nano);
    }

    #[test]
    fn span_carries_the_ids_it_was_given() {
        let ex = exchange(Role::Server, "GET", "/", Some(200));
        let ids = SpanIds {
            trace_id: [7; 16],
            span_id: [8; 8],
            parent_span_id: Some([9; 8]),
        };
        let generic = ex.generic();
        let Payload::Http(http) = &generic.payload else {
            panic!("not HTTP");
        };
        let span = http_span(
            &generic,
            http,
            ids,
            local(),
            remote(),
            &resource(),
            &Clock::with_offset(0),
        );
        assert_eq!(
            (span.trace_id, span.span_id, span.parent_span_id),
            ([7; 16], [8; 8], Some([9; 8]))
        );
    }
}
