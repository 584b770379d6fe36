//! Route templates: a low-cardinality stand-in for `http.route`, derived from the request-target
//! alone (the agent cannot see the application's router), for span names; and the redacted
//! path that `url.path` and `url.full` carry.
//!
//! Rules, in order:
//! - the query string and fragment (everything from the first `?` or `#`) are dropped;
//! - an absolute-form target (`http://host/path`) keeps only its path; `*` (`OPTIONS *`) stays
//!   `*`; an empty path becomes `/`;
//! - path parameters (matrix parameters: from a `;` to the end of its segment, as in
//!   `/cart;jsessionid=ABC/items`) are dropped from every segment: servlet containers put session
//!   ids there;
//! - each `/`-separated segment becomes `*` when it is an identifier (all ASCII digits, a UUID
//!   8-4-4-4-12 hex digits any case, longer than 64 characters) or a secret (see below); anything
//!   else (`v1`, `app.js`, `2024-01-01`) is kept as sent;
//! - at most [`MAX_SEGMENTS`] segments: a longer path keeps its first 15 and ends with `/*`;
//! - the template is never longer than [`MAX_TEMPLATE_LEN`] bytes: once the next segment would
//!   not fit, the template ends with `/*` instead.
//!
//! A segment is a secret when it is an e-mail address (`local@domain.tld`, `@` also as `%40`,
//! the top-level label alphabetic: `lodash@4.17.21` is not one) or a random-looking token: a hex
//! string of 16 or more characters, a JWT (three base64url parts, the first starting `eyJ`), or
//! 16 or more characters of `[A-Za-z0-9-_.~+=]` mixing letters and digits that do not read as
//! words with a number: at least [`TOKEN_MIN_CLASS_CHANGES`] changes between lower case, upper
//! case and digits (random text has one every other character; `customers2024report` has two),
//! or a run of [`TOKEN_MIN_CONSONANT_RUN`] consonants (random lower case has them; words rarely
//! do). About 2 random tokens in 1000 (lower case with a single digit) read as words; tokens of
//! letters only are not recognised; CamelCase names mixing acronyms and digits
//! (`XMLHttpRequest2`) are taken for tokens.
//! [`url_path`] keeps identifiers but replaces secrets with [`REDACTED`] (the OpenTelemetry
//! conventions' placeholder).
//!
//! Targets of any other form (authority-form `host:443` of `CONNECT`) are templated like a path,
//! without adding a leading `/`.

use std::borrow::Cow;

use compact_str::CompactString;

/// Most segments a template keeps (the last one is then `*`).
pub const MAX_SEGMENTS: usize = 16;
/// A segment longer than this many characters becomes `*`.
pub const MAX_SEGMENT_CHARS: usize = 64;
/// Longest template, in bytes.
pub const MAX_TEMPLATE_LEN: usize = 256;
/// Shortest segment taken for a random token.
pub const TOKEN_MIN_LEN: usize = 16;
/// Fewest changes between character classes (lower, upper, digit) in a token.
pub const TOKEN_MIN_CLASS_CHANGES: usize = 4;
/// Longest run of consonants that still reads as a word (`strengths` has five).
pub const TOKEN_MIN_CONSONANT_RUN: usize = 5;
/// What [`url_path`] puts in place of a secret segment.
pub const REDACTED: &str = "REDACTED";

/// The path of a request-target: no query, no fragment, no scheme or authority; `/` when empty.
/// `*` stays `*`; an authority-form target (`host:443`) is returned as is. Path parameters are
/// still there: see [`url_path`].
pub fn target_path(target: &str) -> &str {
    let end = target.find(['?', '#']).unwrap_or(target.len());
    let mut path = &target[..end];
    // Origin form (`/path`), nearly every request, has no scheme to look for.
    if !path.starts_with('/')
        && let Some(after_scheme) = strip_scheme(path)
    {
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
        let segment = without_parameters(segment);
        let templated = match classify(segment) {
            Segment::Fixed => segment,
            Segment::Identifier | Segment::Secret => "*",
        };
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

/// The path `url.path` and `url.full` carry: [`target_path`] without path parameters, secret
/// segments (e-mail addresses, tokens) replaced by [`REDACTED`]. Borrowed (no allocation) when
/// there is nothing to remove, as for most requests.
pub fn url_path(target: &str) -> Cow<'_, str> {
    let path = target_path(target);
    let clean = |segment: &str| !segment.contains(';') && classify(segment) != Segment::Secret;
    if path == "*" || path.split('/').all(clean) {
        return Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len());
    for (i, segment) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        let segment = without_parameters(segment);
        out.push_str(match classify(segment) {
            Segment::Secret => REDACTED,
            Segment::Fixed | Segment::Identifier => segment,
        });
    }
    Cow::Owned(out)
}

/// A segment without its path parameters (`cart;jsessionid=ABC` → `cart`).
fn without_parameters(segment: &str) -> &str {
    segment.find(';').map_or(segment, |i| &segment[..i])
}

/// What a path segment is, for templating and redaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Segment {
    /// A fixed part of a route (`users`, `v1`, `app.js`): kept.
    Fixed,
    /// An identifier (number, UUID, over-long): templated, kept in `url.path`.
    Identifier,
    /// An e-mail address or a random-looking token: never leaves the agent.
    Secret,
}

fn classify(segment: &str) -> Segment {
    if segment.is_empty() {
        return Segment::Fixed;
    }
    let all_digits = segment.bytes().all(|b| b.is_ascii_digit());
    // Before tokens: a UUID is random-looking, but an identifier.
    if all_digits || is_uuid(segment) {
        return Segment::Identifier;
    }
    if is_email(segment) || is_token(segment) {
        return Segment::Secret;
    }
    if segment.chars().count() > MAX_SEGMENT_CHARS {
        return Segment::Identifier;
    }
    Segment::Fixed
}

/// `local@domain.tld` (the `@` possibly percent-encoded as `%40`): a non-empty local part, a
/// domain of at least two labels whose last one is alphabetic (`pkg@1.2.3` is a version).
fn is_email(segment: &str) -> bool {
    let (local, domain) = match segment.split_once('@') {
        Some(parts) => parts,
        None => match find_ignore_case(segment, "%40") {
            Some(i) => (&segment[..i], &segment[i + 3..]),
            None => return false,
        },
    };
    let Some((host, tld)) = domain.rsplit_once('.') else {
        return false;
    };
    !local.is_empty()
        && !host.is_empty()
        && tld.len() >= 2
        && tld.bytes().all(|b| b.is_ascii_alphabetic())
}

fn find_ignore_case(haystack: &str, needle: &str) -> Option<usize> {
    haystack
        .as_bytes()
        .windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

/// A random-looking token (see the module documentation).
fn is_token(segment: &str) -> bool {
    let bytes = segment.as_bytes();
    if bytes.len() < TOKEN_MIN_LEN {
        return false;
    }
    if bytes.iter().all(u8::is_ascii_hexdigit) || is_jwt(segment) {
        return true;
    }
    let token_byte = |b: &u8| b.is_ascii_alphanumeric() || b"-_.~+=".contains(b);
    if !bytes.iter().all(token_byte) {
        return false;
    }
    #[derive(PartialEq, Clone, Copy)]
    enum Class {
        Lower,
        Upper,
        Digit,
    }
    let (mut letters, mut digits, mut changes) = (false, false, 0);
    let (mut consonants, mut most_consonants) = (0, 0);
    let mut previous = None;
    for b in bytes {
        let class = match b {
            b'a'..=b'z' => Class::Lower,
            b'A'..=b'Z' => Class::Upper,
            b'0'..=b'9' => Class::Digit,
            // Separators delimit words: changes and consonant runs are counted within each
            // (`release-2024-v1-notes` changes once).
            _ => {
                consonants = 0;
                previous = None;
                continue;
            }
        };
        letters |= class != Class::Digit;
        digits |= class == Class::Digit;
        // A capital then lower case is how a word is written (`Trace`): not a change.
        if previous.is_some_and(|p| p != class && !(p == Class::Upper && class == Class::Lower)) {
            changes += 1;
        }
        // A capital after lower case starts a new word (`TraceService`).
        let word_start = previous == Some(Class::Lower) && class == Class::Upper;
        let vowel = b"aeiouyAEIOUY".contains(b);
        consonants = if class == Class::Digit || vowel {
            0
        } else if word_start {
            1
        } else {
            consonants + 1
        };
        most_consonants = most_consonants.max(consonants);
        previous = Some(class);
    }
    letters
        && digits
        && (changes >= TOKEN_MIN_CLASS_CHANGES || most_consonants >= TOKEN_MIN_CONSONANT_RUN)
}

/// `header.payload.signature`, base64url parts, the header a JSON object (`{"` is `eyJ`).
fn is_jwt(segment: &str) -> bool {
    let base64url = |p: &str| {
        !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    let mut parts = segment.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    header.starts_with("eyJ") && base64url(header) && base64url(payload) && base64url(signature)
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
        // Wrong grouping: not a UUID, but random-looking (a token).
        assert_eq!(
            route_template("/x/550e8400e-29b-41d4-a716-44665544000"),
            "/x/*"
        );
        assert_eq!(
            url_path("/x/550e8400e-29b-41d4-a716-44665544000"),
            "/x/REDACTED"
        );
        // Not hex either way, and word-like: kept.
        assert_eq!(
            route_template("/x/release-2024-v1-notes-final"),
            "/x/release-2024-v1-notes-final"
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
    #[test]
    fn path_parameters_are_dropped() {
        assert_eq!(
            route_template("/cart;jsessionid=ABC123/items"),
            "/cart/items"
        );
        assert_eq!(route_template("/a;b=c"), "/a");
        assert_eq!(route_template("/a;b=c;d=e/f;g/h"), "/a/f/h");
        assert_eq!(route_template("/users/42;v=1"), "/users/*");
        assert_eq!(route_template("/;x=y/z"), "//z");
        assert_eq!(
            route_template("http://h/cart;jsessionid=ABC123?q=1"),
            "/cart"
        );
        assert_eq!(url_path("/cart;jsessionid=ABC123/items"), "/cart/items");
        assert_eq!(url_path("/a;b=c"), "/a");
        assert_eq!(url_path("/users/42;v=1/x;y"), "/users/42/x");
        assert_eq!(url_path("http://h:1/p;s=1?q=2"), "/p");
        // The parameter is the secret, not the segment: a long one is dropped, not redacted.
        assert_eq!(url_path("/x;sid=Zm9vYmFyMTIzNDU2Nzg5MGFiY2Rl"), "/x");
    }

    #[test]
    fn email_segments() {
        for email in [
            "alice@example.com",
            "Bob.Smith+tag@mail.example.co.uk",
            "alice%40example.com",
            "alice%40EXAMPLE.org",
            "a@b.io",
        ] {
            assert_eq!(route_template(&format!("/users/{email}")), "/users/*");
            assert_eq!(route_template(&format!("/users/{email}/x")), "/users/*/x");
            assert_eq!(url_path(&format!("/users/{email}")), "/users/REDACTED");
        }
        // Not e-mail addresses: npm scopes and versions, a bare `@`.
        for kept in [
            "/npm/@babel/core",
            "/npm/lodash@4.17.21/lodash.js",
            "/a/@",
            "/a/x@",
            "/a/x@localhost",
            "/a/x@host.",
            "/a/x@.com",
        ] {
            assert_eq!(route_template(kept), kept);
            assert_eq!(url_path(kept), kept);
        }
    }

    #[test]
    fn token_segments() {
        for token in [
            // Base64url and mixed alphanumerics.
            "Zm9vYmFyMTIzNDU2Nzg5",
            "aB3dE5gH7jK9mN1pQ3",
            "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
            "xoxb-17653672481-19874698323-pdFZKVeTuE15EX9gxtg",
            "AKIA2OGYBAH4NLT3XQ7V",
            "ghp_16C7e42F292c6912E7710c838347Ae178B4a",
            "dGhpcyBpcyBhIHRva2Vu==",
            // Hex, any case, 16 or more.
            "0123456789abcdef",
            "5F4DCC3B5AA765D61D8327DEB882CF99",
            // JWTs.
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl",
            "eyJhbGciOiJub25lIn0.eyJhIjoiYiJ9.x",
        ] {
            assert_eq!(
                route_template(&format!("/reset/{token}/confirm")),
                "/reset/*/confirm",
                "{token}"
            );
            assert_eq!(
                url_path(&format!("/reset/{token}/confirm")),
                "/reset/REDACTED/confirm",
                "{token}"
            );
        }
    }

    #[test]
    fn random_tokens_are_all_redacted() {
        // Deterministic pseudo-random tokens (xorshift): 16..48 characters of each alphabet.
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alnum = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        let base64url = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let lower_digits = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let (mut tried, mut missed) = (0, Vec::new());
        for alphabet in [&alnum[..], &base64url[..], &lower_digits[..]] {
            for len in 16..48 {
                for _ in 0..100 {
                    let token: String = (0..len)
                        .map(|_| alphabet[next() as usize % alphabet.len()] as char)
                        .collect();
                    let has_digit = token.bytes().any(|b| b.is_ascii_digit());
                    let has_letter = token.bytes().any(|b| b.is_ascii_alphabetic());
                    if !(has_digit && has_letter) {
                        // Only letters (or only digits): out of the token rule's scope.
                        continue;
                    }
                    tried += 1;
                    if url_path(&format!("/t/{token}")) != "/t/REDACTED" {
                        missed.push(token);
                    }
                }
            }
        }
        // About 2 in 1000 are missed (lower case with a single digit that happens to alternate
        // vowels and consonants); this seed misses 18 of 9527.
        assert!(tried > 9000, "{tried}");
        assert!(
            missed.len() * 500 < tried,
            "{} of {tried}: {missed:?}",
            missed.len()
        );
    }

    #[test]
    fn ordinary_segments_are_kept() {
        for path in [
            "/api/v1/customers",
            "/static/main.css",
            "/static/bootstrap.bundle.min.js",
            "/api/v2/healthcheck",
            "/oauth2callback",
            "/reports/customers2024report",
            "/reports/2024-annual-report-v2",
            "/download/x86_64-linux-gnu",
            "/docs/application.settings.json",
            "/api/GetCustomerOrdersByName",
            "/files/README.md",
            "/i18n/en-US/messages.json",
            "/log/2024-01-01T10:00:00",
            "/.well-known/openid-configuration",
            "/net/ipv6addresses1234",
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            "/api/DescribeInstances/ListBucketsResponse",
        ] {
            assert_eq!(route_template(path), path);
            assert_eq!(url_path(path), path);
        }
    }

    #[test]
    fn url_path_keeps_identifiers() {
        let path = "/users/123/orders/550e8400-e29b-41d4-a716-446655440000";
        assert_eq!(url_path(path), path);
        let long = format!("/x/{}", "word-".repeat(20));
        assert_eq!(url_path(&long), long);
        assert_eq!(url_path("/a?b=c#d"), "/a");
        assert_eq!(url_path(""), "/");
        assert_eq!(url_path("*"), "*");
        assert!(matches!(
            url_path("/api/v1/customers?x=1"),
            Cow::Borrowed(_)
        ));
    }
}
