//! Byte-fixture tests of the HTTP/1.x connection parser.

use super::Http1Connection;
use crate::protocols::http::{HttpPayload, HttpRequest, HttpResponse};
use crate::protocols::{Chunk, Direction, Exchange, ExchangeError, Payload, Role};

/// An HTTP exchange in the shape these tests were written for (the generic [`Exchange`] with
/// its payload unpacked; its id is checked by the tests about ids).
#[derive(Clone, Debug, PartialEq, Eq)]
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

impl From<Exchange> for HttpExchange {
    fn from(e: Exchange) -> Self {
        let Payload::Http(HttpPayload { request, response }) = e.payload else {
            panic!("not HTTP");
        };
        HttpExchange {
            role: e.role,
            request,
            response,
            error: e.error,
            start_ns: e.start_ns,
            end_ns: e.end_ns,
            request_tid: e.request_tid,
            response_tid: e.response_tid,
        }
    }
}

const RX_TID: u32 = 11;
const TX_TID: u32 = 22;

/// Feeds chunks with automatic times: the k-th call (1-based) runs from `start(k)` to `end(k)`.
struct Harness {
    conn: Http1Connection,
    calls: u64,
    out: Vec<Exchange>,
}

fn start(k: u64) -> u64 {
    k * 1000
}

fn end(k: u64) -> u64 {
    k * 1000 + 100
}

impl Harness {
    fn new() -> Self {
        Harness {
            conn: Http1Connection::new(),
            calls: 0,
            out: Vec::new(),
        }
    }

    fn feed(&mut self, direction: Direction, data: &[u8], full_len: u64) -> u64 {
        self.calls += 1;
        let k = self.calls;
        let chunk = Chunk {
            direction,
            data,
            tail: &[],
            full_len,
            start_ns: start(k),
            end_ns: end(k),
            tid: match direction {
                Direction::Ingress => RX_TID,
                Direction::Egress => TX_TID,
            },
        };
        // Messages dropped, malformed or past a bound alike.
        self.conn.feed(&chunk, &mut self.out) + self.conn.take_limits_hit()
    }

    /// The process reads `data`.
    fn rx(&mut self, data: &[u8]) -> u64 {
        self.feed(Direction::Ingress, data, data.len() as u64)
    }

    /// The process writes `data`.
    fn tx(&mut self, data: &[u8]) -> u64 {
        self.feed(Direction::Egress, data, data.len() as u64)
    }

    /// Closes the connection as call number k; returns its time.
    fn close(&mut self) -> u64 {
        self.calls += 1;
        let t = end(self.calls);
        self.conn.close(t, &mut self.out);
        t
    }

    fn take(&mut self) -> Vec<HttpExchange> {
        self.out.drain(..).map(HttpExchange::from).collect()
    }

    fn assert_nothing(&mut self) {
        assert_eq!(self.take(), Vec::<HttpExchange>::new());
    }
}

fn req(method: &str, target: &str) -> HttpRequest {
    HttpRequest {
        method: method.into(),
        target: target.into(),
        version: "1.1",
        ..HttpRequest::default()
    }
}

fn req_host(method: &str, target: &str, host: &str) -> HttpRequest {
    HttpRequest {
        host: Some(host.into()),
        ..req(method, target)
    }
}

fn resp(status: u16, body_len: u64) -> HttpResponse {
    HttpResponse {
        status,
        version: "1.1",
        body_len,
        grpc_status: None,
        fields_lost: false,
    }
}

/// Server role: request read in call `req_call`, response written, last byte in `resp_end_call`.
fn server(
    request: HttpRequest,
    response: HttpResponse,
    req_call: u64,
    resp_end_call: u64,
) -> HttpExchange {
    HttpExchange {
        role: Role::Server,
        request,
        response: Some(response),
        error: None,
        start_ns: end(req_call),
        end_ns: end(resp_end_call),
        request_tid: RX_TID,
        response_tid: TX_TID,
    }
}

/// Client role: request written in call `req_call`, response read, last byte in `resp_end_call`.
fn client(
    request: HttpRequest,
    response: HttpResponse,
    req_call: u64,
    resp_end_call: u64,
) -> HttpExchange {
    HttpExchange {
        role: Role::Client,
        request,
        response: Some(response),
        error: None,
        start_ns: start(req_call),
        end_ns: end(resp_end_call),
        request_tid: TX_TID,
        response_tid: RX_TID,
    }
}

fn closed(role: Role, request: HttpRequest, req_call: u64, close_ns: u64) -> HttpExchange {
    let (start_ns, request_tid) = match role {
        Role::Server => (end(req_call), RX_TID),
        Role::Client => (start(req_call), TX_TID),
    };
    HttpExchange {
        role,
        request,
        response: None,
        error: Some(ExchangeError::ConnectionClosed),
        start_ns,
        end_ns: close_ns,
        request_tid,
        response_tid: 0,
    }
}

const GET_INDEX: &[u8] = b"GET /index.html?q=1 HTTP/1.1\r\nHost: example.com\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n";
const OK_HELLO: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello";

fn index_request() -> HttpRequest {
    HttpRequest {
        user_agent: Some("curl/8.5.0".into()),
        ..req_host("GET", "/index.html?q=1", "example.com")
    }
}

// ---- detection ----

#[test]
fn detection_api() {
    assert!(Http1Connection::looks_like_http1(GET_INDEX));
    assert!(Http1Connection::looks_like_http1(OK_HELLO));
    assert!(Http1Connection::looks_like_http1(b"OPTIONS * HTTP/1.1\r\n"));
    assert!(!Http1Connection::looks_like_http1(
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    ));
    assert!(!Http1Connection::looks_like_http1(b"\x16\x03\x01\x00\xa5"));
    assert!(!Http1Connection::looks_like_http1(b"GE"));
}

// ---- 9/10. simple exchanges, roles, extraction ----

#[test]
fn simple_get_server_role() {
    let mut h = Harness::new();
    assert_eq!(h.rx(GET_INDEX), 0);
    h.assert_nothing();
    assert_eq!(h.conn.role(), Some(Role::Server));
    assert_eq!(h.tx(OK_HELLO), 0);
    assert_eq!(h.take(), vec![server(index_request(), resp(200, 5), 1, 2)]);
    assert_eq!(h.close(), end(3));
    h.assert_nothing();
}

#[test]
fn simple_get_client_role() {
    let mut h = Harness::new();
    assert_eq!(h.tx(GET_INDEX), 0);
    assert_eq!(h.conn.role(), Some(Role::Client));
    h.assert_nothing();
    assert_eq!(h.rx(OK_HELLO), 0);
    assert_eq!(h.take(), vec![client(index_request(), resp(200, 5), 1, 2)]);
    h.close();
    h.assert_nothing();
}

#[test]
fn exact_times_and_tids() {
    let mut conn = Http1Connection::new();
    let mut out = Vec::new();
    let chunk = |direction, data: &'static [u8], start_ns, end_ns, tid| Chunk {
        direction,
        data,
        tail: &[],
        full_len: data.len() as u64,
        start_ns,
        end_ns,
        tid,
    };
    // Server: request read by tid 7 then 8, response written by tid 9 then 10.
    let feeds = [
        chunk(Direction::Ingress, b"GET /t HTTP/1.1\r\nHo", 100, 150, 7),
        chunk(Direction::Ingress, b"st: a\r\n\r\n", 200, 250, 8),
        chunk(
            Direction::Egress,
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab",
            300,
            350,
            9,
        ),
        chunk(Direction::Egress, b"cd", 400, 450, 10),
    ];
    for c in &feeds {
        assert_eq!(conn.feed(c, &mut out), 0);
    }
    let out: Vec<HttpExchange> = out.into_iter().map(HttpExchange::from).collect();
    assert_eq!(
        out,
        vec![HttpExchange {
            role: Role::Server,
            request: req_host("GET", "/t", "a"),
            response: Some(resp(200, 4)),
            error: None,
            start_ns: 150,
            end_ns: 450,
            request_tid: 7,
            response_tid: 9,
        }]
    );

    // Client: request written by tid 5 (entry time counts), response read by tid 6 then 4.
    let mut conn = Http1Connection::new();
    let mut out = Vec::new();
    let feeds = [
        chunk(Direction::Egress, b"GET /c HTTP/1.1\r\n\r\n", 1000, 1010, 5),
        chunk(
            Direction::Ingress,
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 1\r\n\r\n",
            2000,
            2020,
            6,
        ),
        chunk(Direction::Ingress, b"x", 3000, 3030, 4),
    ];
    for c in &feeds {
        assert_eq!(conn.feed(c, &mut out), 0);
    }
    let out: Vec<HttpExchange> = out.into_iter().map(HttpExchange::from).collect();
    assert_eq!(
        out,
        vec![HttpExchange {
            role: Role::Client,
            request: req("GET", "/c"),
            response: Some(resp(404, 1)),
            error: None,
            start_ns: 1000,
            end_ns: 3030,
            request_tid: 5,
            response_tid: 6,
        }]
    );
}

#[test]
fn http10_request_and_response() {
    let mut h = Harness::new();
    assert_eq!(h.tx(b"GET /old HTTP/1.0\r\nHost: legacy\r\n\r\n"), 0);
    assert_eq!(h.rx(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"), 0);
    let request = HttpRequest {
        version: "1.0",
        ..req_host("GET", "/old", "legacy")
    };
    let response = HttpResponse {
        version: "1.0",
        ..resp(200, 2)
    };
    assert_eq!(h.take(), vec![client(request, response, 1, 2)]);
}

#[test]
fn context_headers_kept_secrets_never() {
    let mut h = Harness::new();
    let request = b"POST /api HTTP/1.1\r\n\
        Host: api.internal:8080\r\n\
        Authorization: Bearer SECRET-token-1\r\n\
        Cookie: session=SECRET-cookie-2\r\n\
        Proxy-Authorization: Basic SECRET-3\r\n\
        X-Api-Key: SECRET-4\r\n\
        TraceParent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\
        tracestate: congo=t61rcWkgMzE\r\n\
        b3: 80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1\r\n\
        X-B3-TraceId: 80f198ee56343ba864fe8b2a57d3eff7\r\n\
        X-B3-SpanId: e457b5a2e4d86bd1\r\n\
        X-B3-ParentSpanId: 05e3ac9a4f6e3b90\r\n\
        X-B3-Sampled: 1\r\n\
        X-B3-Flags: 0\r\n\
        X-B3-Other: SECRET-5\r\n\
        Content-Length: 13\r\n\r\n\
        SECRET-body-6";
    assert_eq!(h.rx(request), 0);
    assert_eq!(
        h.tx(b"HTTP/1.1 200 OK\r\nSet-Cookie: id=SECRET-7\r\nContent-Length: 0\r\n\r\n"),
        0
    );
    let out = h.take();
    let context = [
        (
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ),
        ("tracestate", "congo=t61rcWkgMzE"),
        ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
        ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
        ("x-b3-spanid", "e457b5a2e4d86bd1"),
        ("x-b3-parentspanid", "05e3ac9a4f6e3b90"),
        ("x-b3-sampled", "1"),
        ("x-b3-flags", "0"),
    ];
    let expected = HttpRequest {
        context_headers: context
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect(),
        body_len: 13,
        ..req_host("POST", "/api", "api.internal:8080")
    };
    assert_eq!(out, vec![server(expected, resp(200, 0), 1, 2)]);
    let debug = format!("{out:?}");
    assert!(!debug.contains("SECRET"), "{debug}");
    assert!(!debug.to_ascii_lowercase().contains("authorization"));
    assert!(!debug.to_ascii_lowercase().contains("cookie"));
}

#[test]
fn buffered_secrets_are_not_printed() {
    let mut h = Harness::new();
    // A header block split across reads is buffered; the parser's Debug must not show it.
    assert_eq!(
        h.rx(b"GET /me HTTP/1.1\r\nAuthorization: Bearer SECRET-8\r\nCookie: a=SECRET-9\r\n"),
        0
    );
    let debug = format!("{:?}", h.conn);
    assert!(!debug.contains("SECRET"), "{debug}");
    assert!(debug.contains("buffered_bytes"), "{debug}");
    assert_eq!(h.rx(b"\r\n"), 0);
    assert_eq!(h.tx(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), 0);
    let out = h.take();
    assert_eq!(out, vec![server(req("GET", "/me"), resp(200, 0), 1, 3)]);
    assert!(!format!("{out:?}").contains("SECRET"));
}

#[test]
fn non_utf8_and_long_values() {
    let mut h = Harness::new();
    let mut request = b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: h\xffst\r\nUser-Agent: ".to_vec();
    request.extend(std::iter::repeat_n(b'u', 2000));
    request.extend_from_slice(b"\r\ntraceparent: 00-\xfe\xfe-01\r\n\r\n");
    assert_eq!(h.rx(&request), 0);
    assert_eq!(h.tx(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), 0);
    let expected = HttpRequest {
        user_agent: Some("u".repeat(1024).into()),
        context_headers: vec![(
            "traceparent".to_owned(),
            "00-\u{FFFD}\u{FFFD}-01".to_owned(),
        )],
        ..req_host("GET", "/café", "h\u{FFFD}st")
    };
    assert_eq!(h.take(), vec![server(expected, resp(200, 0), 1, 2)]);

    // A target that is not UTF-8 is rejected by httparse: a parse error, no exchange invented.
    let mut h = Harness::new();
    assert_eq!(h.rx(b"GET /\xff HTTP/1.1\r\n\r\n"), 1);
    assert_eq!(
        h.tx(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"),
        1
    );
    h.close();
    h.assert_nothing();
}

// ---- 1. split messages, bounded header block ----

#[test]
fn request_and_response_split_byte_by_byte() {
    let mut h = Harness::new();
    let request = b"POST /form HTTP/1.1\r\nHost: split.test\r\nContent-Length: 4\r\n\r\nq=12";
    for b in request {
        assert_eq!(h.rx(std::slice::from_ref(b)), 0);
    }
    h.assert_nothing();
    let first_response_call = h.calls + 1;
    let response = b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\nabc";
    for b in response {
        assert_eq!(h.tx(std::slice::from_ref(b)), 0);
    }
    let last = h.calls;
    assert!(last > first_response_call);
    let expected = HttpRequest {
        body_len: 4,
        ..req_host("POST", "/form", "split.test")
    };
    assert_eq!(h.take(), vec![server(expected, resp(201, 3), 1, last)]);
}

#[test]
fn header_terminator_split_across_syscalls() {
    let mut h = Harness::new();
    assert_eq!(h.tx(b"GE"), 0);
    assert_eq!(h.tx(b"T /a HT"), 0);
    assert_eq!(h.tx(b"TP/1.1\r\nHost: x\r\n\r"), 0);
    assert_eq!(h.tx(b"\n"), 0);
    assert_eq!(h.rx(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r"), 0);
    assert_eq!(h.rx(b"\n\r"), 0);
    assert_eq!(h.rx(b"\nok"), 0);
    assert_eq!(
        h.take(),
        vec![client(req_host("GET", "/a", "x"), resp(200, 2), 1, 7)]
    );
}

#[test]
fn bare_lf_line_endings() {
    let mut h = Harness::new();
    assert_eq!(h.rx(b"GET /lf HTTP/1.1\nHost: lf\n\n"), 0);
    assert_eq!(h.tx(b"HTTP/1.1 200 OK\nContent-Length: 1\n\nx"), 0);
    assert_eq!(
        h.take(),
        vec![server(req_host("GET", "/lf", "lf"), resp(200, 1), 1, 2)]
    );
}

#[test]
fn oversized_header_block_is_dropped_and_parser_resyncs() {
    let mut h = Harness::new();
    let mut big = b"GET /big HTTP/1.1\r\nHost: x\r\nX-Pad: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 20_000));
    big.extend_from_slice(b"\r\n\r\n");
    let mut errors = 0;
    for piece in big.chunks(4096) {
        errors += h.rx(piece);
    }
    assert_eq!(errors, 1);
    // The server answers the dropped request: that response is consumed, not mis-paired.
    assert_eq!(
        h.tx(b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n\r\n"),
        0
    );
    h.assert_nothing();
    assert_eq!(h.rx(b"GET /ok HTTP/1.1\r\n\r\n"), 0);
    assert_eq!(h.tx(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), 0);
    let k = h.calls;
    assert_eq!(
        h.take(),
        vec![server(req("GET", "/ok"), resp(200, 0), k - 1, k)]
    );
}

#[test]
fn header_block_of_exactly_16_kib_is_accepted() {
    let mut h = Harness::new();
    let head = b"GET /edge HTTP/1.1\r\nX-Pad: ";
    let tail = b"\r\n\r\n";
    let mut block = head.to_vec();
    block.extend(std::iter::repeat_n(
        b'p',
        16 * 1024 - head.len() - tail.len(),
    ));
    block.extend_from_slice(tail);
    assert_eq!(block.len(), 16 * 1024);
    for piece in block.chunks(1000) {
        assert_eq!(h.rx(piece), 0);
    }
    assert_eq!(h.tx(b"HTTP/1.1 204 No Content\r\n\r\n"), 0);
    let k = h.calls;
    assert_eq!(
        h.take(),
        vec![server(req("GET", "/edge"), resp(204, 0), 1, k)]
    );

    // One byte more is an error.
    let mut h = Harness::new();
    let mut block = head.to_vec();
    block.extend(std::iter::repeat_n(
        b'p',
        16 * 1024 - head.len() - tail.len() + 1,
    ));
    block.extend_from_slice(tail);
    assert_eq!(h.rx(&block), 1);
    h.close();
    h.assert_nothing();
}

#[test]
fn gap_inside_header_block_is_an_error() {
    let mut h = Harness::new();
    let captured = b"GET /gap HTTP/1.1\r\nHost: x\r\nX-Long: aaaa";
    assert_eq!(
        h.feed(Direction::Ingress, captured, captured.len() as u64 + 5000),
        1
    );
    // The rest of the header block (next syscall) is skipped without another error.
    assert_eq!(h.rx(b"aaaaaaa\r\n\r\n"), 0);
    // Its response is consumed by the dropped request's slot.
    assert_eq!(h.tx(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"), 0);
    h.assert_nothing();
    assert_eq!(h.rx(b"GET /next HTTP/1.1\r\n\r\n"), 0);
    assert_eq!(h.tx(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"), 0);
    assert_eq!(
        h.take(),
        vec![server(req("GET", "/next"), resp(200, 2), 4, 5)]
    );
}

#[test]
fn gap_inside_response_header_block_drops_its_request() {
    let mut h = Harness::new();
    assert_eq!(h.tx(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n"), 0);
    let captured = b"HTTP/1.1 200 OK\r\nX-Big: zzzz";
    assert_eq!(h.feed(Direction::Ingress, captured, 9000), 1);
    h.assert_nothing();
    assert_eq!(h.rx(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb"), 0);
    assert_eq!(h.take(), vec![client(req("GET", "/b"), resp(200, 1), 1, 3)]);
}

// ---- 2/3. keep-alive and pipelining ----

#[test]
fn keep_alive_five_requests() {
    let mut h = Harness::new();
    for i in 0..5u64 {
        let request = format!("GET /item/{i} HTTP/1.1\r\nHost: shop\r\n\r\n");
        let body = "x".repeat(i as usize + 1);
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        assert_eq!(h.rx(request.as_bytes()), 0);
        assert_eq!(h.tx(response.as_bytes()), 0);
        let k = h.calls;
        assert_eq!(
            h.take(),
            vec![server(
                req_host("GET", &format!("/item/{i}"), "shop"),
                resp(200, i + 1),
                k - 1,
                k
            )]
        );
    }
}

#[test]
fn pipelining_three_requests_then_three_responses() {
    let mut h = Harness::new();
    let requests = b"GET /a HTTP/1.1\r\nHost: p\r\n\r\n\
        POST /b HTTP/1.1\r\nHost: p\r\nContent-Length: 3\r\n\r\nxyz\
        GET /c HTTP/1.1\r\nHost: p\r\n\r\n";
    assert_eq!(h.rx(requests), 0);
    h.assert_nothing();
    let responses = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nA\
        HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nBB\
        HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nCCC";
    assert_eq!(h.tx(responses), 0);
    let b = HttpRequest {
        body_len: 3,
        ..req_host("POST", "/b", "p")
    };
    assert_eq!(
        h.take(),
        vec![
            server(req_host("GET", "/a", "p"), resp(200, 1), 1, 2),
            server(b, resp(201, 2), 1, 2),
            server(req_host("GET", "/c", "p"), resp(404, 3), 1, 2),
        ]
    );
}

#[test]
fn pipelining_client_role_responses_straddle_syscalls() {
    let mut h = Harness::new();
    assert_eq!(h.tx(b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n"), 0);
    assert_eq!(h.tx(b"GET /3 HTTP/1.1\r\n\r\n"), 0);
    assert_eq!(
        h.rx(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nCont"),
        0
    );
    assert_eq!(h.take(), vec![client(req("GET", "/1"), resp(200, 2), 1, 3)]);
    assert_eq!(
        h.rx(
            b"ent-Length: 0\r\n\r\nHTTP/1.1 500 Internal Server Error\r\nContent-Length: 1\r\n\r\n"
        ),
        0
    );
    assert_eq!(h.take(), vec![client(req("GET", "/2"), resp(200, 0), 1, 4)]);
    assert_eq!(h.rx(b"!"), 0);
    assert_eq!(h.take(), vec![client(req("GET", "/3"), resp(500, 1), 2, 5)]);
}

#[test]
fn pending_fifo_is_bounded_to_64() {
    let mut h = Harness::new();
    let mut requests = Vec::new();
    for i in 0..70 {
        requests.extend_from_slice(format!("GET /{i} HTTP/1.1\r\n\r\n").as_bytes());
    }
    assert_eq!(h.rx(&requests), 6);
    let t = h.close();
    let expected: Vec<_> = (6..70)
        .map(|i| closed(Role::Server, req("GET", &format!("/{i}")), 1, t))
        .collect();
    assert_eq!(h.take(), expected);
}

#[test]
fn empty_lines_between_messages_are_tolerated() {
    let mut h = Harness::new();
    assert_eq!(
        h.rx(b"POST /p HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi\r\n\r\nGET /g HTTP/1.1\r\n\r\n"),
        0
    );
    assert_eq!(h.rx(b"\r\n"), 0);
    assert_eq!(
        h.tx(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
        0
    );
    let p = HttpRequest {
        body_len: 2,
        ..req("POST", "/p")
    };
    assert_eq!(
        h.take(),
        vec![
            server(p, resp(200, 0), 1, 3),
            server(req("GET", "/g"), resp(200, 0), 1, 3),
        ]
    );
}

// ---- 4. bodies ----

#[test]
fn one_mib_post_with_bounded_capture() {
    const BODY: u64 = 1024 * 1024;
    const READ: u64 = 64 * 1024;
    const CAPTURE: usize = 4096;
    let mut h = Harness::new();
    let head = format!("POST /upload HTTP/1.1\r\nHost: up\r\nContent-Length: {BODY}\r\n\r\n");
    // The body looks like requests and responses: it must be skipped, never parsed.
    let fake: Vec<u8> = b"GET /fake HTTP/1.1\r\n\r\nHTTP/1.1 200 OK\r\n\r\n"
        .iter()
        .copied()
        .cycle()
        .take(CAPTURE)
        .collect();
    let mut stream_left = head.len() as u64 + BODY;
    let mut first = head.clone().into_bytes();
    first.extend_from_slice(&fake[..CAPTURE - head.len()]);
    assert_eq!(h.feed(Direction::Ingress, &first, READ), 0);
    stream_left -= READ;
    while stream_left > READ {
        assert_eq!(h.feed(Direction::Ingress, &fake, READ), 0);
        stream_left -= READ;
    }
    // The last read carries the end of the body and, fully captured, the next request.
    let mut last = vec![b'z'; stream_left as usize];
    last.extend_from_slice(b"GET /next HTTP/1.1\r\n\r\n");
    assert_eq!(h.rx(&last), 0);
    h.assert_nothing();
    let last_call = h.calls;
    assert_eq!(
        h.tx(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
        0
    );
    let upload = HttpRequest {
        body_len: BODY,
        ..req_host("POST", "/upload", "up")
    };
    assert_eq!(
        h.take(),
        vec![
            server(upload, resp(201, 0), 1, last_call + 1),
            server(req("GET", "/next"), resp(200, 0), last_call, last_call + 1),
        ]
    );
}

#[test]
fn response_body_with_uncaptured_bytes() {
    let mut h = Harness::new();
    assert_eq!(h.tx(b"GET /file HTTP/1.1\r\n\r\n"), 0);
    let head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n";
    let mut first = head.to_vec();
    first.extend_from_slice(&[b'd'; 100]);
    // One read: headers and the whole body, only the first bytes captured.
    assert_eq!(
        h.feed(Direction::Ingress, &first, head.len() as u64 + 100_000),
        0
    );
    assert_eq!(
        h.take(),
        vec![client(req("GET", "/file"), resp(200, 100_000), 1, 2)]
    );
    // A body sent with sendfile: nothing captured at all.
    assert_eq!(h.tx(b"GET /file2 HTTP/1.1\r\n\r\n"), 0);
    assert_eq!(h.rx(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n"), 0);
    assert_eq!(h.feed(Direction::Ingress, b"", 5000), 0);
    assert_eq!(
        h.take(),
        vec![client(req("GET", "/file2"), resp(200, 5000), 3, 5)]
    );
}

#[test]
fn body_containing_a_status_line_is_body() {
    let mut h = Harness::new();
    let body = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
    let mut request = format!(
        "POST /echo HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    assert_eq!(h.tx(&request), 0);
    let mut response =
        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
    response.extend_from_slice(body);
    // The response body arrives in its own read, starting with a status line.
    let split = response.len() - body.len();
    assert_eq!(h.rx(&response[..split]), 0);
    h.assert_nothing();
    assert_eq!(h.rx(&response[split..]), 0);
    let echo = HttpRequest {
        body_len: body.len() as u64,
        ..req("POST", "/echo")
    };
    assert_eq!(
        h.take(),
        vec![client(echo, resp(200, body.len() as u64), 1, 3)]
    );
    h.close();
    h.assert_nothing();
}

#[test]
fn chunked_response_split_with_extensions_and_trailers() {
    let mut h = Harness::new();
    assert_eq!(h.rx(b"GET /stream HTTP/1.1\r\n\r\n"), 0);
    let pieces: [&[u8]; 5] = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;foo=bar\r\nhel",
        b"lo\r\n",
        b"7\r\n, world\r\n1",
        b"0\r\n0123456789ABCDEF\r\n0\r\nX-Checksum: abc\r\n",
        b"\r\n",
    ];
    let body_wire = b"5;foo=bar\r\nhello\r\n7\r\n, world\r\n10\r\n0123456789ABCDEF\r\n0\r\nX-Checksum: abc\r\n\r\n";
    for piece in pieces {
        assert_eq!(h.tx(piece), 0);
        if piece != b"\r\n" {
            h.assert_nothing();
        }
    }
    assert_eq!(
        h.take(),
        vec![server(
            req("GET", "/stream"),
            resp(200, body_wire.len() as u64),
            1,
            6
        )]
    );
    // Still in sync.
    assert_eq!(h.rx(b"GET /again HTTP/1.1\r\n\r\n"), 0);
    assert_eq!(
        h.tx(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        0
    );
    assert_eq!(
        h.take(),
        vec![server(req("GET", "/again"), resp(200, 5), 7, 8)]
    );
}

#[test]
fn chunked_request_body() {
    let mut h = Harness::new();
    let body = b"4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n";
    assert_eq!(
        h.tx(b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nWiki\r\n"),
        0
    );
    assert_eq!(h.tx(b"5\r\npedia\r\n0\r\n\r\n"), 0);
    assert_eq!(h.rx(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), 0);
    let c = HttpRequest {
        body_len: body.len() as u64,
        ..req("POST", "/c")
    };
    assert_eq!(h.take(), vec![client(c, resp(200, 0), 1, 3)]);
}

#[test]
fn chunked_gap_enters_lost_sync_mode() {
    let mut h = Harness::new();
    assert_eq!(h.rx(b"GET /big HTTP/1.1\r\n\r\n"), 0);
    let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
    let mut first = head.to_vec();
    first.extend_from_slice(b"4\r\nabcd\r\n20");
    // Captured up to the middle of a chunk-size line; 5000 more bytes unseen.
    let first_full = first.len() as u64 + 5000;
    assert_eq!(h.feed(Direction::Egress, &first, first_full), 0);
    h.assert_nothing();
    // Fully captured but not the end: still body (even if it looks like a response).
    let middle = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
    assert_eq!(h.tx(middle), 0);
    // A partially captured syscall ending like the last chunk does not end it either.
    let fake_end = b"xyz\r\n0\r\n\r\n";
    assert_eq!(h.feed(Direction::Egress, fake_end, 4000), 0);
    h.assert_nothing();
    let last = b"abc\r\n0\r\n\r\n";
    assert_eq!(h.tx(last), 0);
    let body_len =
        (first_full - head.len() as u64) + middle.len() as u64 + 4000 + last.len() as u64;
    assert_eq!(
        h.take(),
        vec![server(req("GET", "/big"), resp(200, body_len), 1, 5)]
    );
    // Back to normal.
    assert_eq!(h.rx(b"GET /next HTTP/1.1\r\n\r\n"), 0);
    assert_eq!(h.tx(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), 0);
    assert_eq!(
        h.take(),
        vec![server(req("GET", "/next"), resp(200, 0), 6, 7)]
    );

    // A syscall that is exactly the last chunk also ends it.
    let mut h = Harness::new();
    assert_eq!(h.tx(b"GET /x HTTP/1.1\r\n\r\n"), 0);
    let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
    assert_eq!(h.feed(Direction::Ingress, head, 60), 0);
    assert_eq!(h.rx(b"0\r\n\r\n"), 0);
    let body_len = 60 - head.len() as u64 + 5;
    assert_eq!(
        h.take(),
        vec![client(req("GET", "/x"), resp(200, body_len), 1, 3)]
    );
}

#[test]
fn chunked_gap_inside_chunk_data_keeps_sync() {
    let mut h = Harness::new();
    assert_eq!(h.tx(b"GET /d HTTP/1.1\r\n\r\n"), 0);
    let mut first = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n8000\r\n".to_vec();
    let head_len = first.len() as u64 - 6;
    first.extend_from_slice(&[b'q'; 100]);
    // 0x8000 data bytes, only 100 captured; the gap is all chunk data.
    let full = head_len + 6 + 0x8000;
    assert_eq!(h.feed(Direction::Ingress, &first, full), 0);
    // A trailer that lost-sync mode would not recognise: the decoder still sees the framing.
    let tail = b"\r\n0\r\nX-T: 1\r\n\r\n";
    assert_eq!(h.rx(tail), 0);
    assert_eq!(
        h.take(),
        vec![client(
            req("GET", "/d"),
            resp(200, 6 + 0x8000 + tail.len() as u64),
            1,
            3
        )]
    );
}

#[test]
fn malformed_chunked_body_is_an_error_and_resyncs() {
    let mut h = Harness::new();
    assert_eq!(h.tx(b"GET /m HTTP/1.1\r\n\r\n"), 0);
    assert_eq!(
        h.rx(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nrest"),
        1
    );
    // The response was parsed: reported with the body seen up to the error.
    assert_eq!(h.take(), vec![client(req("GET", "/m"), resp(200, 1), 1, 2)]);
    assert_eq!(h.rx(b"more garbage"), 0);
    assert_eq!(h.tx(b"GET /n HTTP/1.1\r\n\r\n"), 0);
    assert_eq!(h.rx(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), 0);
    assert_eq!(h.take(), vec![client(req("GET", "/n"), resp(200, 0), 4, 5)]);
}

// ---- 5. interim responses and upgrades ----

#[test]
fn continue_100_then_200_client() {
    let mut h = Harness::new();
    assert_eq!(
        h.tx(
            b"PUT /obj HTTP/1.1\r\nHost: s3\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n"
        ),
        0
    );
    assert_eq!(h.rx(b"HTTP/1.1 100 Continue\r\n\r\n"), 0);
    h.assert_nothing();
    assert_eq!(h.tx(b"0123456789"), 0);
    assert_eq!(h.rx(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), 0);
    let put = HttpRequest {
        body_len: 10,
        ..req_host("PUT", "/obj", "s3")
    };
    assert_eq!(h.take(), vec![client(put, resp(200, 0), 1, 4)]);
}

#[test]
fn continue_100_then_200_server() {
    let mut h = Harness::new();
    assert_eq!(
        h.rx(b"POST /up HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"),
        0
    );
    assert_eq!(h.tx(b"HTTP/1.1 100 Continue\r\n\r\n"), 0);
    assert_eq!(h.rx(b"abc"), 0);
    assert_eq!(
        h.tx(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nid"),
        0
    );
    let up = HttpRequest {
        body_len: 3,
        ..req("POST", "/up")
    };
    assert_eq!(h.take(), vec![server(up, resp(201, 2), 1, 4)]);
}

#[test]
fn early_hints_103_then_200() {
    let mut h = Harness::new();
    assert_eq!(h.rx(b"GET /page HTTP/1.1\r\n\r\n"), 0);
    assert_eq!(
        h.tx(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"),
        0
    );
    h.assert_nothing();
    assert_eq!(
        h.tx(b"HTTP/1.1 103 Early Hints\r\nLink: </a.js>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody"),
        0
    );
    assert_eq!(
        h.take(),
        vec![server(req("GET", "/page"), resp(200, 4), 1, 3)]
    );
}

#[test]
fn switching_protocols_101_ends_parsing() {
    let mut h = Harness::new();
    assert_eq!(
        h.rx(
            b"GET /ws HTTP/1.1\r\nHost: chat\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        ),
        0
    );
    assert_eq!(
        h.tx(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x05hello"),
        0
    );
    assert_eq!(
        h.take(),
        vec![server(req_host("GET", "/ws", "chat"), resp(101, 0), 1, 2)]
    );
    // WebSocket frames, and bytes that look like HTTP: all ignored.
    assert_eq!(h.rx(b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"), 0);
    assert_eq!(h.rx(b"GET / HTTP/1.1\r\n\r\n"), 0);
    assert_eq!(h.tx(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), 0);
    h.close();
    h.assert_nothing();
}

#[test]
fn connect_tunnel_ends_parsing() {
    let mut h = Harness::new();
    assert_eq!(
        h.tx(b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n"),
        0
    );
    assert_eq!(h.rx(b"HTTP/1.1 200 Connection Established\r\n\r\n"), 0);
    assert_eq!(
        h.take(),
        vec![client(
            req_host("CONNECT", "db:5432", "db:5432"),
            resp(200, 0),
            1,
            2
        )]
    );
    assert_eq!(h.tx(b"\x16\x03\x01\x00\xa5\x01\x00"), 0);
    assert_eq!(h.rx(b"\x16\x03\x03\x00\x7a"), 0);
    h.close();
    h.assert_nothing();
}

// ---- 6. bodiless responses, close-delimited bodies ----

#[test]
fn head_response_has_no_body() {
    let mut h = Harness::new();
    assert_eq!(
        h.rx(b"HEAD /big HTTP/1.1\r\n\r\nGET /small HTTP/1.1\r\n\r\n"),
        0
    );
    assert_eq!(
        h.tx(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"),
        0
    );
    assert_eq!(
        h.take(),
        vec![
            server(req("HEAD", "/big"), resp(200, 0), 1, 2),
            server(req("GET", "/small"), resp(200, 2), 1, 2),
        ]
    );
}

#[test]
fn no_content_204_and_not_modified_304_have_no_body() {
    let mut h = Harness::new();
    assert_eq!(
        h.tx(b"DELETE /x HTTP/1.1\r\n\r\nGET /y HTTP/1.1\r\nIf-None-Match: \"e\"\r\n\r\nGET /z HTTP/1.1\r\n\r\n"),
        0
    );
    assert_eq!(
        h.rx(b"HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n\
            HTTP/1.1 304 Not Modified\r\nContent-Length: 500\r\nTransfer-Encoding: chunked\r\n\r\n\
            HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nz"),
        0
    );
    assert_eq!(
        h.take(),
        vec![
            client(req("DELETE", "/x"), resp(204, 0), 1, 2),
            client(req("GET", "/y"), resp(304, 0), 1, 2),
            client(req("GET", "/z"), resp(200, 1), 1, 2),
        ]
    );
}

#[test]
fn response_delimited_by_close() {
    let mut h = Harness::new();
    assert_eq!(h.tx(b"GET /legacy HTTP/1.1\r\n\r\n"), 0);
    assert_eq!(
        h.rx(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello"),
        0
    );
    let mut tail = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
    tail.extend_from_slice(b" world");
    assert_eq!(h.rx(&tail), 0);
    assert_eq!(h.feed(Direction::Ingress, b"", 1000), 0);
    h.assert_nothing();
    let t = h.close();
    let response = HttpResponse {
        version: "1.0",
        ..resp(200, 5 + tail.len() as u64 + 1000)
    };
    assert_eq!(
        h.take(),
        vec![HttpExchange {
            end_ns: t,
            ..client(req("GET", "/legacy"), response, 1, 2)
        }]
    );
}

#[test]
fn close_completes_close_delimited_response_then_fails_the_rest() {
    let mut h = Harness::new();
    assert_eq!(h.rx(b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\n"), 0);
    assert_eq!(h.tx(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nbye"), 0);
    h.assert_nothing();
    let t = h.close();
    assert_eq!(
        h.take(),
        vec![
            HttpExchange {
                end_ns: t,
                ..server(req("GET", "/1"), resp(200, 3), 1, 2)
            },
            closed(Role::Server, req("GET", "/2"), 1, t),
        ]
    );
}

#[test]
fn close_in_lost_sync_chunked_body_is_not_a_response() {
    let mut h = Harness::new();
    assert_eq!(h.tx(b"GET /s HTTP/1.1\r\n\r\n"), 0);
    let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
    assert_eq!(h.feed(Direction::Ingress, head, 10_000), 0);
    assert_eq!(h.rx(b"data data"), 0);
    let t = h.close();
    assert_eq!(h.take(), vec![closed(Role::Client, req("GET", "/s"), 1, t)]);
}

#[test]
fn request_without_length_has_no_body() {
    let mut h = Harness::new();
    // A POST without Content-Length: what follows is the next request.
    assert_eq!(
        h.rx(b"POST /empty HTTP/1.1\r\n\r\nGET /after HTTP/1.1\r\n\r\n"),
        0
    );
    assert_eq!(
        h.tx(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
        0
    );
    assert_eq!(
        h.take(),
        vec![
            server(req("POST", "/empty"), resp(200, 0), 1, 2),
            server(req("GET", "/after"), resp(200, 0), 1, 2),
        ]
    );
}

// ---- 7. close ----

#[test]
fn close_before_response() {
    let mut h = Harness::new();
    assert_eq!(h.rx(GET_INDEX), 0);
    let t = h.close();
    assert_eq!(h.take(), vec![closed(Role::Server, index_request(), 1, t)]);
    // The parser is reset: a new connection on the same object works.
    assert_eq!(h.tx(b"GET /new HTTP/1.1\r\n\r\n"), 0);
    assert_eq!(h.conn.role(), Some(Role::Client));
    assert_eq!(h.rx(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), 0);
    assert_eq!(
        h.take(),
        vec![client(req("GET", "/new"), resp(200, 0), 3, 4)]
    );
}

#[test]
fn close_with_two_pending_requests() {
    let mut h = Harness::new();
    assert_eq!(h.tx(b"GET /one HTTP/1.1\r\n\r\n"), 0);
    assert_eq!(h.tx(b"GET /two HTTP/1.1\r\n\r\n"), 0);
    let t = h.close();
    assert_eq!(
        h.take(),
        vec![
            closed(Role::Client, req("GET", "/one"), 1, t),
            closed(Role::Client, req("GET", "/two"), 2, t),
        ]
    );
}

#[test]
fn close_during_partial_response() {
    // Body incomplete.
    let mut h = Harness::new();
    assert_eq!(h.rx(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n"), 0);
    assert_eq!(h.tx(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"), 0);
    let t = h.close();
    assert_eq!(
        h.take(),
        vec![
            closed(Role::Server, req("GET", "/a"), 1, t),
            closed(Role::Server, req("GET", "/b"), 1, t),
        ]
    );
    // Header block incomplete.
    let mut h = Harness::new();
    assert_eq!(h.rx(b"GET /a HTTP/1.1\r\n\r\n"), 0);
    assert_eq!(h.tx(b"HTTP/1.1 200 OK\r\nContent-Len"), 0);
    let t = h.close();
    assert_eq!(h.take(), vec![closed(Role::Server, req("GET", "/a"), 1, t)]);
    // Request body incomplete: still a request waiting for its response.
    let mut h = Harness::new();
    assert_eq!(h.rx(b"POST /p HTTP/1.1\r\nContent-Length: 10\r\n\r\nab"), 0);
    let t = h.close();
    let p = HttpRequest {
        body_len: 10,
        ..req("POST", "/p")
    };
    assert_eq!(h.take(), vec![closed(Role::Server, p, 1, t)]);
    // Request header block incomplete: no request.
    let mut h = Harness::new();
    assert_eq!(h.rx(b"GET /partial HTTP/1.1\r\nHo"), 0);
    h.close();
    h.assert_nothing();
}

// ---- 8. garbage ----

#[test]
fn garbage_before_a_valid_request() {
    let mut h = Harness::new();
    assert_eq!(h.rx(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"), 1);
    assert_eq!(h.rx(b"more garbage GET / HTTP/1.1\r\n\r\n"), 0);
    assert_eq!(h.rx(b"GET /valid HTTP/1.1\r\nHost: ok\r\n\r\n"), 0);
    assert_eq!(h.conn.role(), Some(Role::Server));
    assert_eq!(h.tx(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), 0);
    assert_eq!(
        h.take(),
        vec![server(req_host("GET", "/valid", "ok"), resp(200, 0), 3, 4)]
    );
}

#[test]
fn garbage_after_a_message_in_the_same_syscall() {
    let mut h = Harness::new();
    assert_eq!(
        h.rx(b"GET /a HTTP/1.1\r\n\r\n\x00\x01\x02GET /hidden HTTP/1.1\r\n\r\n"),
        1
    );
    assert_eq!(h.rx(b"\xff\xfe"), 0);
    assert_eq!(h.tx(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), 0);
    assert_eq!(h.take(), vec![server(req("GET", "/a"), resp(200, 0), 1, 3)]);
}

#[test]
fn bad_start_lines_are_garbage() {
    for bad in [
        &b"GET /nover\r\n\r\n"[..],
        b"GET / HTTP/2.0\r\n\r\n",
        b"get / HTTP/1.1\r\n\r\n",
        b"GET  HTTP/1.1\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.2 200 OK\r\n\r\n",
    ] {
        let mut h = Harness::new();
        assert_eq!(h.rx(bad), 1, "{bad:?}");
        h.close();
        h.assert_nothing();
    }
}

#[test]
fn response_without_request_is_an_error() {
    // Before any request: the role stays unknown.
    let mut h = Harness::new();
    assert_eq!(h.rx(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"), 1);
    assert_eq!(h.conn.role(), None);
    h.assert_nothing();

    // After a complete exchange: dropped, its body skipped, sync kept.
    let mut h = Harness::new();
    assert_eq!(h.tx(b"GET /1 HTTP/1.1\r\n\r\n"), 0);
    assert_eq!(h.rx(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"), 0);
    assert_eq!(h.take(), vec![client(req("GET", "/1"), resp(200, 2), 1, 2)]);
    assert_eq!(
        h.rx(b"HTTP/1.1 200 OK\r\nContent-Length: 25\r\n\r\nGET /x HTTP/1.1\r\nA: b\r\n\r\n"),
        1
    );
    h.assert_nothing();
    assert_eq!(h.tx(b"GET /2 HTTP/1.1\r\n\r\n"), 0);
    assert_eq!(h.rx(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), 0);
    assert_eq!(h.take(), vec![client(req("GET", "/2"), resp(200, 0), 4, 5)]);
}

#[test]
fn messages_in_the_wrong_direction_are_errors() {
    let mut h = Harness::new();
    assert_eq!(h.rx(b"GET /s HTTP/1.1\r\n\r\n"), 0);
    // Server role: a response read, or a request written, is garbage.
    assert_eq!(h.rx(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), 1);
    assert_eq!(h.tx(b"GET /c HTTP/1.1\r\n\r\n"), 1);
    assert_eq!(h.tx(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), 0);
    assert_eq!(h.take(), vec![server(req("GET", "/s"), resp(200, 0), 1, 4)]);
}

#[test]
fn uncaptured_start_of_message_is_an_error() {
    let mut h = Harness::new();
    assert_eq!(h.feed(Direction::Ingress, b"", 300), 1);
    assert_eq!(h.rx(b"GET /x HTTP/1.1\r\n\r\n"), 0);
    assert_eq!(h.tx(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), 0);
    assert_eq!(h.take(), vec![server(req("GET", "/x"), resp(200, 0), 2, 3)]);
}

#[test]
fn unusable_request_length_keeps_the_request() {
    let mut h = Harness::new();
    assert_eq!(
        h.rx(b"POST /bad HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
        1
    );
    assert_eq!(
        h.tx(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"),
        0
    );
    assert_eq!(
        h.take(),
        vec![server(req("POST", "/bad"), resp(400, 0), 1, 2)]
    );
}

/// Deterministic xorshift for the robustness tests (no dependency).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn random_garbage_never_makes_exchanges() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..200 {
        let mut conn = Http1Connection::new();
        let mut out = Vec::new();
        let mut buf = vec![0u8; 600];
        for i in 0..50u64 {
            let len = rng.below(600) as usize;
            for b in &mut buf[..len] {
                *b = rng.next() as u8;
            }
            let chunk = Chunk {
                direction: if rng.below(2) == 0 {
                    Direction::Ingress
                } else {
                    Direction::Egress
                },
                data: &buf[..len],
                tail: &[],
                full_len: len as u64 + rng.below(3) * rng.below(10_000),
                start_ns: i,
                end_ns: i,
                tid: 1,
            };
            let errors = conn.feed(&chunk, &mut out);
            assert!(errors <= 2);
        }
        conn.close(99, &mut out);
        assert!(out.is_empty(), "{out:?}");
    }
}

#[test]
fn mutated_streams_never_panic() {
    let stream: &[u8] = b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc\
        GET /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;x\r\nabc\r\n0\r\nT: 1\r\n\r\n";
    let responses: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok\
        HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\nHTTP/1.0 200 OK\r\n\r\nrest";
    let mut rng = Rng(42);
    for _ in 0..2000 {
        let mut conn = Http1Connection::new();
        let mut out = Vec::new();
        let mut a = stream.to_vec();
        let mut b = responses.to_vec();
        for _ in 0..rng.below(4) {
            let i = rng.below(a.len() as u64) as usize;
            a[i] = rng.next() as u8;
            let j = rng.below(b.len() as u64) as usize;
            b[j] = rng.next() as u8;
        }
        let (mut ia, mut ib) = (0, 0);
        let mut t = 0;
        while ia < a.len() || ib < b.len() {
            t += 1;
            let ingress = ib >= b.len() || (ia < a.len() && rng.below(2) == 0);
            let (src, idx) = if ingress {
                (&a, &mut ia)
            } else {
                (&b, &mut ib)
            };
            let n = (1 + rng.below(40) as usize).min(src.len() - *idx);
            let data = &src[*idx..*idx + n];
            *idx += n;
            let captured = if rng.below(10) == 0 {
                rng.below(n as u64 + 1) as usize
            } else {
                n
            };
            let chunk = Chunk {
                direction: if ingress {
                    Direction::Ingress
                } else {
                    Direction::Egress
                },
                data: &data[..captured],
                tail: &[],
                full_len: n as u64,
                start_ns: t,
                end_ns: t,
                tid: 1,
            };
            conn.feed(&chunk, &mut out);
        }
        conn.close(t + 1, &mut out);
        assert!(out.len() <= 2, "{out:?}");
    }
}

#[test]
fn request_starts_and_response_starts_are_reported_once() {
    let mut conn = Http1Connection::new();
    let mut out = Vec::new();
    let mut starts = Vec::new();
    let ingress = |data: &'static [u8], t: u64| Chunk {
        direction: Direction::Ingress,
        data,
        tail: &[],
        full_len: data.len() as u64,
        start_ns: t,
        end_ns: t + 1,
        tid: 7,
    };
    conn.feed(
        &ingress(
            b"GET /a HTTP/1.1\r\nHost: x\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\nGET /b HTTP/1.1\r\n\r\n",
            10,
        ),
        &mut out,
    );
    conn.take_request_starts(&mut starts);
    assert_eq!(starts.len(), 2);
    assert_eq!(starts[0].role, Role::Server);
    assert_eq!((starts[0].tid, starts[0].start_ns), (7, 11));
    assert_eq!(starts[0].target, "/a");
    assert_eq!(starts[0].context_headers.len(), 1);
    assert_eq!(starts[1].target, "/b");
    assert_eq!(
        (starts[0].id, starts[1].id),
        (0, 1),
        "ids number the requests"
    );
    starts.clear();
    conn.take_request_starts(&mut starts);
    assert!(starts.is_empty(), "reported once");
    assert_eq!(response_ids(&mut conn), Vec::<u64>::new());
    let response = Chunk {
        direction: Direction::Egress,
        data: b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        tail: &[],
        full_len: 63,
        start_ns: 20,
        end_ns: 21,
        tid: 7,
    };
    conn.feed(&response, &mut out);
    assert_eq!(
        response_ids(&mut conn),
        vec![0],
        "the first request's response began; interim responses do not count"
    );
    assert_eq!(response_ids(&mut conn), Vec::<u64>::new());
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].id, 0);
}

fn response_ids(conn: &mut Http1Connection) -> Vec<u64> {
    let mut ids = Vec::new();
    conn.take_responses_started(&mut ids);
    ids
}

/// What the agent's memory budget asks of the parser: a header block split across reads is a
/// partial message holding its bytes; complete, it is not; spare capacity can be given back.
#[test]
fn a_partial_header_block_is_reported_with_its_memory() {
    use crate::protocols::ProtocolParser;
    let mut h = Harness::new();
    assert!(!h.conn.holds_partial());
    let half = b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Pad: aaaaaaaa";
    h.rx(half);
    assert!(h.conn.holds_partial());
    assert!(h.conn.memory_bytes() >= half.len());
    h.rx(b"\r\n\r\n");
    assert!(!h.conn.holds_partial());
    h.tx(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(h.take().len(), 1);
    let kept = h.conn.memory_bytes();
    h.conn.release_spare();
    assert!(
        h.conn.memory_bytes() + half.len() <= kept,
        "the header buffer is given back"
    );
}

/// A header block past the 16 KiB buffer or cut by the capture is a bound hit, not a parse
/// error: the pipeline's counters tell malformed traffic from big headers.
#[test]
fn header_blocks_past_a_bound_count_as_limits() {
    use crate::protocols::{ParserOutput, ProtocolParser};
    let mut conn = Http1Connection::new();
    let mut out = ParserOutput::default();
    let mut feed = |data: &[u8], full_len: u64| {
        let chunk = Chunk {
            direction: Direction::Ingress,
            data,
            tail: &[],
            full_len,
            start_ns: 1,
            end_ns: 2,
            tid: RX_TID,
        };
        ProtocolParser::feed(&mut conn, &chunk, &mut out);
    };
    let mut big = b"GET /big HTTP/1.1\r\nX-Pad: ".to_vec();
    big.resize(20_000, b'a');
    for piece in big.chunks(4096) {
        feed(piece, piece.len() as u64);
    }
    feed(b"GET /cut HTTP/1.1\r\nX-Long: aaaa", 9000);
    assert_eq!((out.counts.limits_hit, out.counts.parse_errors), (2, 0));
}
