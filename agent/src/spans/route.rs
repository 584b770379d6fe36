//! Route templates: a low-cardinality stand-in for `http.route`, derived from the request-target
//! alone (the agent cannot see the application's router), for span names.
//!
//! Rules, in order:
//! - the query string and fragment (everything from the first `?` or `#`) are dropped;
//! - an absolute-form target (`http://host/path`) keeps only its path; `*` (`OPTIONS *`) stays
//!   `*`; an empty path becomes `/`;
//! - each `/`-separated segment becomes `*` when it is all ASCII digits, a UUID
//!   (8-4-4-4-12 hex digits, any case), a hex string of 16 or more characters, or longer than
//!   64 characters; anything else (`v1`, `app.js`, `2024-01-01`) is kept as sent;
//! - at most [`MAX_SEGMENTS`] segments: a longer path keeps its first 15 and ends with `/*`;
//! - the template is never longer than [`MAX_TEMPLATE_LEN`] bytes: once the next segment would
//!   not fit, the template ends with `/*` instead.
//!
//! Targets of any other form (authority-form `host:443` of `CONNECT`) are templated like a path,
//! without adding a leading `/`.

use compact_str::CompactString;

/// Most segments a template keeps (the last one is then `*`).
pub const MAX_SEGMENTS: usize = 16;
/// A segment longer than this many characters becomes `*`.
pub const MAX_SEGMENT_CHARS: usize = 64;
/// Longest template, in bytes.
pub const MAX_TEMPLATE_LEN: usize = 256;

/// The path of a request-target: no query, no fragment, no scheme or authority; `/` when empty.
/// `*` stays `*`; an authority-form target (`host:443`) is returned as is.
pub fn target_path(target: &str) -> &str {
    let end = target.find(['?', '#']).unwrap_or(target.len());
    let mut path = &target[..end];
    if let Some(after_scheme) = strip_scheme(path) {
        path = after_scheme.find('/').map_or("", |i| &after_scheme[i..]);
    }
    if path.is_empty() { "/" } else { path }
}

/// For an absolute-form target (`scheme://authority/path`), what follows `scheme://`.
fn strip_scheme(target: &str) -> Option<&str> {
    let colon = target.find("://")?;
    let scheme = &target[..colon];
    let mut chars = scheme.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    (first_ok && rest_ok).then(|| &target[colon + 3..])
}

/// The low-cardinality template of a request-target (see the module documentation).
pub fn route_template(target: &str) -> CompactString {
    let path = target_path(target);
    if path == "*" {
        return CompactString::const_new("*");
    }
    let (leading_slash, rest) = match path.strip_prefix('/') {
        Some(rest) => (true, rest),
        None => (false, path),
    };
    // Inline (no allocation) up to 24 bytes, which most templates are.
    let mut out = CompactString::with_capacity(path.len().min(MAX_TEMPLATE_LEN));
    let mut segments = rest.split('/').peekable();
    let mut i = 0;
    while let Some(segment) = segments.next() {
        let templated = if is_variable(segment) { "*" } else { segment };
        let separator = usize::from(i > 0 || leading_slash);
        let last = segments.peek().is_none();
        if i + 1 == MAX_SEGMENTS && !last {
            // Segment 16 of more: it stands for the rest of the path.
            out.push_str(if separator == 1 { "/*" } else { "*" });
            break;
        }
        // Room for a closing "/*" must remain unless this is the last segment.
        let reserve = if last { 0 } else { 2 };
        if out.len() + separator + templated.len() + reserve > MAX_TEMPLATE_LEN {
            out.push_str(if separator == 1 { "/*" } else { "*" });
            break;
        }
        if separator == 1 {
            out.push('/');
        }
        out.push_str(templated);
        i += 1;
    }
    out
}

/// Whether a segment looks like an identifier rather than a fixed part of a route.
fn is_variable(segment: &str) -> bool {
    if segment.is_empty() {
        return false;
    }
    let all_digits = segment.bytes().all(|b| b.is_ascii_digit());
    let long_hex = segment.len() >= 16 && segment.bytes().all(|b| b.is_ascii_hexdigit());
    all_digits || long_hex || is_uuid(segment) || segment.chars().count() > MAX_SEGMENT_CHARS
}

/// 8-4-4-4-12 hex digits, any case.
fn is_uuid(segment: &str) -> bool {
    let bytes = segment.as_bytes();
    bytes.len() == 36
        && bytes.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brief_examples() {
        assert_eq!(
            route_template("/users/123/orders/550e8400-e29b-41d4-a716-446655440000?x=1"),
            "/users/*/orders/*"
        );
        assert_eq!(route_template("/"), "/");
        assert_eq!(route_template("/static/app.js"), "/static/app.js");
        assert_eq!(route_template("/a/deadbeefdeadbeef00"), "/a/*");
        assert_eq!(route_template("/v1/items"), "/v1/items");
    }

    #[test]
    fn query_and_fragment_are_dropped() {
        assert_eq!(route_template("/search?q=secret"), "/search");
        assert_eq!(route_template("/page#section?x"), "/page");
        assert_eq!(route_template("/a?b#c"), "/a");
        assert_eq!(route_template("?only=query"), "/");
        assert_eq!(route_template(""), "/");
    }

    #[test]
    fn absolute_form_keeps_only_the_path() {
        assert_eq!(
            route_template("http://example.com/users/42?x=1"),
            "/users/*"
        );
        assert_eq!(route_template("HTTP://example.com:8080/a"), "/a");
        assert_eq!(route_template("http://example.com"), "/");
        assert_eq!(route_template("http://example.com?x=/a/b"), "/");
        assert_eq!(route_template("https://user@[::1]:443/x/1"), "/x/*");
    }

    #[test]
    fn asterisk_form_stays() {
        assert_eq!(route_template("*"), "*");
    }

    #[test]
    fn authority_form_is_kept() {
        assert_eq!(route_template("example.com:443"), "example.com:443");
    }

    #[test]
    fn digit_segments() {
        assert_eq!(route_template("/users/0"), "/users/*");
        assert_eq!(route_template("/123/456"), "/*/*");
        assert_eq!(route_template("/v2/12a"), "/v2/12a");
        // Dates and other digit mixes are kept: only the rules above template.
        assert_eq!(route_template("/log/2024-01-01"), "/log/2024-01-01");
    }

    #[test]
    fn uuid_segments() {
        assert_eq!(
            route_template("/x/550E8400-E29B-41D4-A716-446655440000/y"),
            "/x/*/y"
        );
        // Wrong grouping: not a UUID (and not pure hex).
        assert_eq!(
            route_template("/x/550e8400e-29b-41d4-a716-44665544000"),
            "/x/550e8400e-29b-41d4-a716-44665544000"
        );
        assert_eq!(
            route_template("/x/550e8400-e29b-41d4-a716-44665544000g"),
            "/x/550e8400-e29b-41d4-a716-44665544000g"
        );
    }

    #[test]
    fn hex_segments() {
        assert_eq!(route_template("/blob/0123456789abcdef"), "/blob/*");
        assert_eq!(route_template("/blob/0123456789ABCDEF0123"), "/blob/*");
        // 15 hex characters: kept.
        assert_eq!(
            route_template("/blob/0123456789abcde"),
            "/blob/0123456789abcde"
        );
        assert_eq!(
            route_template("/blob/0123456789abcdeg"),
            "/blob/0123456789abcdeg"
        );
    }

    #[test]
    fn long_segments() {
        let s64 = "a".repeat(63) + "z";
        let s65 = "a".repeat(64) + "z";
        assert_eq!(route_template(&format!("/x/{s64}")), format!("/x/{s64}"));
        assert_eq!(route_template(&format!("/x/{s65}/y")), "/x/*/y");
        // Characters, not bytes: 64 two-byte characters are kept.
        let wide = "é".repeat(64);
        assert_eq!(route_template(&format!("/{wide}")), format!("/{wide}"));
    }

    #[test]
    fn empty_segments_are_kept() {
        assert_eq!(route_template("/users/"), "/users/");
        assert_eq!(route_template("//a"), "//a");
    }

    #[test]
    fn at_most_sixteen_segments() {
        let sixteen: String = (0..16).map(|i| format!("/s{i}")).collect();
        assert_eq!(route_template(&sixteen), sixteen);
        let seventeen: String = (0..17).map(|i| format!("/s{i}")).collect();
        let expected: String = (0..15).map(|i| format!("/s{i}")).collect::<String>() + "/*";
        assert_eq!(route_template(&seventeen), expected);
        assert_eq!(route_template(&(sixteen.clone() + &sixteen)), expected);
    }

    #[test]
    fn never_longer_than_256_bytes() {
        let seg = "x".repeat(60);
        let path: String = (0..10).map(|_| format!("/{seg}")).collect();
        let t = route_template(&path);
        assert!(t.len() <= MAX_TEMPLATE_LEN, "{}", t.len());
        assert!(t.ends_with("/*"));
        // 4 segments of 61 bytes = 244, the fifth would not fit with the closing "/*".
        assert_eq!(t, format!("/{seg}/{seg}/{seg}/{seg}/*"));

        let wide = "é".repeat(64);
        let path: String = (0..16).map(|_| format!("/{wide}")).collect();
        let t = route_template(&path);
        assert!(t.len() <= MAX_TEMPLATE_LEN);
        assert_eq!(t, format!("/{wide}/*"));

        // Many lengths around the limit.
        for n in 0..40 {
            let path: String = (0..n).map(|i| format!("/{}{i}", "c".repeat(30))).collect();
            assert!(route_template(&path).len() <= MAX_TEMPLATE_LEN);
        }
    }

    #[test]
    fn target_path_examples() {
        assert_eq!(target_path("/a/b?c=d"), "/a/b");
        assert_eq!(target_path(""), "/");
        assert_eq!(target_path("http://h:1/p/q?x"), "/p/q");
        assert_eq!(target_path("http://h:1"), "/");
        assert_eq!(target_path("*"), "*");
    }
}
