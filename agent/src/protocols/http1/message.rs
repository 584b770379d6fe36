//! Pieces of one HTTP/1.x message: start-line recognition, end-of-header-block scanning, header
//! block parsing (httparse) and the extraction of the few fields kspan keeps.

use std::mem::MaybeUninit;

use crate::protocols::http::{HttpRequest, HttpResponse, limited_string};

/// Most header fields parsed per message (a block holding more is a parse error).
const MAX_HEADERS: usize = 256;
/// Most trace-context headers kept per request.
const MAX_CONTEXT_HEADERS: usize = 16;
/// Longest method token accepted at the start of a request (e.g. "BASELINE-CONTROL").
const MAX_METHOD_LEN: usize = 20;

/// Methods recognised by protocol detection.
const KNOWN_METHODS: [&[u8]; 9] = [
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"CONNECT ",
    b"OPTIONS ",
    b"TRACE ",
    b"PATCH ",
];

const RESPONSE_PREFIX: &[u8] = b"HTTP/1.";

/// Trace-context headers kept from requests, lower-cased.
const CONTEXT_HEADERS: [&str; 8] = [
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

/// Protocol detection: a known method followed by a space, or "HTTP/1.".
pub(super) fn looks_like_http1(data: &[u8]) -> bool {
    data.starts_with(RESPONSE_PREFIX) || KNOWN_METHODS.iter().any(|m| data.starts_with(m))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Request,
    Response,
}

/// What the first bytes of a message say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Class {
    Is(Kind),
    /// Too few bytes to tell, but they may start an allowed message.
    Partial,
    Invalid,
}

/// Classifies the first bytes of a message. A request starts with a method token (upper-case
/// letters, '-' or '_', at most 20) and a space; a response with "HTTP/1.".
pub(super) fn classify(bytes: &[u8], allow_request: bool, allow_response: bool) -> Class {
    let mut partial = false;
    if allow_response {
        if bytes.starts_with(RESPONSE_PREFIX) {
            return Class::Is(Kind::Response);
        }
        partial |= RESPONSE_PREFIX.starts_with(bytes);
    }
    if allow_request {
        let mut request = None;
        for (i, &b) in bytes.iter().enumerate().take(MAX_METHOD_LEN + 1) {
            match b {
                b' ' => {
                    request = Some(i > 0);
                    break;
                }
                b'A'..=b'Z' | b'-' | b'_' if i < MAX_METHOD_LEN => {}
                _ => {
                    request = Some(false);
                    break;
                }
            }
        }
        match request {
            Some(true) => return Class::Is(Kind::Request),
            Some(false) => {}
            None => partial = true,
        }
    }
    if partial {
        Class::Partial
    } else {
        Class::Invalid
    }
}

/// Finds the end of a header block (an empty line: "\r\n\r\n", "\n\n" or mixed) across syscalls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum EndScan {
    /// Inside a line.
    Mid,
    /// Just after a LF.
    LineStart,
    /// After a LF and a CR.
    LineStartCr,
}

impl EndScan {
    /// Scans `bytes`; returns the length of the prefix that ends the header block, if any.
    pub(super) fn find(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < bytes.len() {
            match *self {
                EndScan::Mid => match memchr::memchr(b'\n', &bytes[i..]) {
                    Some(k) => {
                        i += k + 1;
                        *self = EndScan::LineStart;
                    }
                    None => return None,
                },
                EndScan::LineStart | EndScan::LineStartCr => {
                    let b = bytes[i];
                    i += 1;
                    *self = match (b, *self) {
                        (b'\n', _) => return Some(i),
                        (b'\r', EndScan::LineStart) => EndScan::LineStartCr,
                        _ => EndScan::Mid,
                    };
                }
            }
        }
        None
    }
}

fn parser_config() -> httparse::ParserConfig {
    let mut config = httparse::ParserConfig::default();
    config
        .allow_multiple_spaces_in_request_line_delimiters(true)
        .allow_multiple_spaces_in_response_status_delimiters(true)
        .allow_spaces_after_header_name_in_responses(true)
        .allow_obsolete_multiline_headers_in_responses(true)
        .ignore_invalid_headers_in_requests(true)
        .ignore_invalid_headers_in_responses(true);
    config
}

/// Checks a complete first line (up to and including its LF). For a response, returns its
/// status code.
pub(super) fn check_start_line(kind: Kind, line: &[u8]) -> Result<Option<u16>, ()> {
    let config = parser_config();
    match kind {
        Kind::Request => {
            let mut req = httparse::Request::new(&mut []);
            let mut headers: [MaybeUninit<httparse::Header<'_>>; 0] = [];
            match config.parse_request_with_uninit_headers(&mut req, line, &mut headers) {
                Ok(_) if req.version.is_some() => Ok(None),
                _ => Err(()),
            }
        }
        Kind::Response => {
            let mut res = httparse::Response::new(&mut []);
            let mut headers: [MaybeUninit<httparse::Header<'_>>; 0] = [];
            match config.parse_response_with_uninit_headers(&mut res, line, &mut headers) {
                Ok(_) if res.code.is_some() => Ok(res.code),
                _ => Err(()),
            }
        }
    }
}

/// How a message body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum BodyFraming {
    /// No Content-Length nor Transfer-Encoding.
    Unspecified,
    Length(u64),
    Chunked,
    /// Transfer-Encoding whose final coding is not chunked.
    OtherEncoding,
    /// Unusable Content-Length (not a number, or conflicting values).
    Invalid,
}

/// Framing headers, gathered while walking the header fields.
#[derive(Default)]
struct FramingHeaders {
    /// Some(final coding is chunked) when Transfer-Encoding was present.
    transfer_encoding: Option<bool>,
    content_length: Option<u64>,
    invalid_length: bool,
}

impl FramingHeaders {
    fn see(&mut self, name: &str, value: &[u8]) -> bool {
        if name.eq_ignore_ascii_case("content-length") {
            for part in value.split(|&b| b == b',') {
                match parse_decimal(part.trim_ascii()) {
                    Some(n) if self.content_length.is_none_or(|c| c == n) => {
                        self.content_length = Some(n)
                    }
                    _ => self.invalid_length = true,
                }
            }
            true
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            let last = value
                .split(|&b| b == b',')
                .map(<[u8]>::trim_ascii)
                .rfind(|coding| !coding.is_empty());
            self.transfer_encoding = Some(last.is_some_and(|c| c.eq_ignore_ascii_case(b"chunked")));
            true
        } else {
            false
        }
    }

    fn framing(&self) -> BodyFraming {
        // Transfer-Encoding overrides Content-Length (RFC 9112 §6.3).
        match self.transfer_encoding {
            Some(true) => BodyFraming::Chunked,
            Some(false) => BodyFraming::OtherEncoding,
            None if self.invalid_length => BodyFraming::Invalid,
            None => match self.content_length {
                Some(n) => BodyFraming::Length(n),
                None => BodyFraming::Unspecified,
            },
        }
    }
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &b| {
        if b.is_ascii_digit() {
            acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

fn version_str(minor: Option<u8>) -> &'static str {
    match minor {
        Some(0) => "1.0",
        _ => "1.1",
    }
}

/// A parsed request header block.
pub(super) struct ParsedRequest {
    pub request: HttpRequest,
    pub framing: BodyFraming,
    pub is_head: bool,
    pub is_connect: bool,
}

/// Parses a complete request header block. Err: malformed (httparse error or too many headers).
pub(super) fn parse_request(block: &[u8]) -> Result<ParsedRequest, ()> {
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    match parser_config().parse_request_with_uninit_headers(&mut req, block, &mut headers) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(()),
    }
    let (Some(method), Some(path)) = (req.method, req.path) else {
        return Err(());
    };
    let mut request = HttpRequest {
        method: limited_string(method.as_bytes()),
        target: limited_string(path.as_bytes()),
        version: version_str(req.version),
        ..HttpRequest::default()
    };
    let mut framing = FramingHeaders::default();
    for header in req.headers.iter() {
        let (name, value) = (header.name, header.value);
        if framing.see(name, value) {
            continue;
        }
        if name.eq_ignore_ascii_case("host") {
            if request.host.is_none() {
                request.host = Some(limited_string(value));
            }
        } else if name.eq_ignore_ascii_case("user-agent") {
            if request.user_agent.is_none() {
                request.user_agent = Some(limited_string(value));
            }
        } else if let Some(known) = CONTEXT_HEADERS
            .iter()
            .find(|known| name.eq_ignore_ascii_case(known))
            && request.context_headers.len() < MAX_CONTEXT_HEADERS
        {
            request
                .context_headers
                .push(((*known).to_owned(), limited_string(value).into()));
        }
    }
    Ok(ParsedRequest {
        is_head: method.eq_ignore_ascii_case("HEAD"),
        is_connect: method.eq_ignore_ascii_case("CONNECT"),
        request,
        framing: framing.framing(),
    })
}

/// A parsed response header block.
pub(super) struct ParsedResponse {
    pub response: HttpResponse,
    pub framing: BodyFraming,
}

/// Parses a complete response header block. Err: malformed.
pub(super) fn parse_response(block: &[u8]) -> Result<ParsedResponse, ()> {
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    match parser_config().parse_response_with_uninit_headers(&mut res, block, &mut headers) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(()),
    }
    let Some(status) = res.code else {
        return Err(());
    };
    let mut framing = FramingHeaders::default();
    for header in res.headers.iter() {
        framing.see(header.name, header.value);
    }
    Ok(ParsedResponse {
        response: HttpResponse {
            status,
            version: version_str(res.version),
            body_len: 0,
            grpc_status: None,
            fields_lost: false,
        },
        framing: framing.framing(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocols::http::MAX_STRING;

    #[test]
    fn detection() {
        for yes in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"HEAD ",
            b"POST /x",
            b"PUT ",
            b"DELETE ",
            b"CONNECT host:443 HTTP/1.1",
            b"OPTIONS * HTTP/1.1",
            b"TRACE ",
            b"PATCH ",
            b"HTTP/1.1 200 OK",
            b"HTTP/1.0",
        ] {
            assert!(looks_like_http1(yes), "{yes:?}");
        }
        for no in [
            &b""[..],
            b"GET",
            b"get / HTTP/1.1",
            b"PRI * HTTP/2.0",
            b"HTTP/2 200",
            b"\x16\x03\x01",
            b"GETX / HTTP/1.1",
            b"PROPFIND / HTTP/1.1",
        ] {
            assert!(!looks_like_http1(no), "{no:?}");
        }
    }

    #[test]
    fn classification() {
        assert_eq!(
            classify(b"GET / HTTP/1.1", true, true),
            Class::Is(Kind::Request)
        );
        assert_eq!(
            classify(b"M-SEARCH * HTTP/1.1", true, false),
            Class::Is(Kind::Request)
        );
        assert_eq!(classify(b"GET / HTTP/1.1", false, true), Class::Invalid);
        assert_eq!(
            classify(b"HTTP/1.1 200", true, true),
            Class::Is(Kind::Response)
        );
        assert_eq!(classify(b"HTTP/1.1 200", true, false), Class::Invalid);
        assert_eq!(classify(b"HTT", false, true), Class::Partial);
        assert_eq!(classify(b"HTT", true, false), Class::Partial);
        assert_eq!(classify(b"", true, true), Class::Partial);
        assert_eq!(classify(b"G", true, true), Class::Partial);
        assert_eq!(classify(b" GET", true, true), Class::Invalid);
        assert_eq!(classify(b"get /", true, true), Class::Invalid);
        assert_eq!(classify(&[b'A'; 30], true, true), Class::Invalid);
        assert_eq!(classify(b"\x00\x01", true, true), Class::Invalid);
    }

    #[test]
    fn end_of_header_block() {
        let mut scan = EndScan::Mid;
        assert_eq!(scan.find(b"GET / HTTP/1.1\r\nA: b\r\n\r\nbody"), Some(24));
        let mut scan = EndScan::Mid;
        assert_eq!(scan.find(b"GET / HTTP/1.1\nA: b\n\nbody"), Some(21));
        let mut scan = EndScan::Mid;
        for (i, b) in b"GET / HTTP/1.1\r\n\r".iter().enumerate() {
            assert_eq!(scan.find(std::slice::from_ref(b)), None, "{i}");
        }
        assert_eq!(scan.find(b"\nX"), Some(1));
        let mut scan = EndScan::Mid;
        assert_eq!(scan.find(b"A\r\nB\r\rC\r\n"), None);
    }

    #[test]
    fn string_limits() {
        assert_eq!(limited_string(b"abc"), "abc");
        assert_eq!(limited_string(b"a\xffb"), "a\u{FFFD}b");
        let long = vec![b'x'; 5000];
        assert_eq!(limited_string(&long).len(), MAX_STRING);
        // A 2-byte character straddling the limit is dropped whole.
        let mut straddle = vec![b'x'; MAX_STRING - 1];
        straddle.extend_from_slice("é".as_bytes());
        let s = limited_string(&straddle);
        assert_eq!(s.len(), MAX_STRING - 1);
        // Replacement characters count toward the limit.
        let invalid = vec![0xffu8; 2000];
        let s = limited_string(&invalid);
        assert!(s.len() <= MAX_STRING);
        assert_eq!(s.chars().count(), MAX_STRING / 3);
    }

    #[test]
    fn content_length_rules() {
        let parse = |block: &[u8]| parse_request(block).map(|p| p.framing);
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n"),
            Ok(BodyFraming::Length(12))
        );
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: 5, 5\r\ncontent-length: 5\r\n\r\n"),
            Ok(BodyFraming::Length(5))
        );
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"),
            Ok(BodyFraming::Invalid)
        );
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            Ok(BodyFraming::Invalid)
        );
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n"),
            Ok(BodyFraming::Invalid)
        );
        assert_eq!(
            parse(
                b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n"
            ),
            Ok(BodyFraming::Chunked)
        );
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n"),
            Ok(BodyFraming::OtherEncoding)
        );
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\n\r\n"),
            Ok(BodyFraming::Unspecified)
        );
    }

    #[test]
    fn start_lines() {
        assert_eq!(
            check_start_line(Kind::Request, b"GET /x HTTP/1.1\r\n"),
            Ok(None)
        );
        assert_eq!(
            check_start_line(Kind::Request, b"GET /x HTTP/2.0\r\n"),
            Err(())
        );
        assert_eq!(check_start_line(Kind::Request, b"GET /x\r\n"), Err(()));
        assert_eq!(
            check_start_line(Kind::Response, b"HTTP/1.1 204 No Content\r\n"),
            Ok(Some(204))
        );
        assert_eq!(
            check_start_line(Kind::Response, b"HTTP/1.0 200\n"),
            Ok(Some(200))
        );
        assert_eq!(
            check_start_line(Kind::Response, b"HTTP/1.1 2x0 OK\r\n"),
            Err(())
        );
    }
}
