use super::*;

const TID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const SID: &str = "00f067aa0ba902b7";
const TID_BYTES: [u8; 16] = [
    0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47, 0x36,
];
const SID_BYTES: [u8; 8] = [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7];

fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

fn ctx(sampled: bool) -> SpanContext {
    SpanContext {
        trace_id: TID_BYTES,
        span_id: SID_BYTES,
        sampled,
    }
}

fn tp(flags: &str) -> String {
    format!("00-{TID}-{SID}-{flags}")
}

// ---------------------------------------------------------------- traceparent

#[test]
fn traceparent_valid_sampled() {
    assert_eq!(parse_traceparent(&tp("01")), Some((ctx(true), 0x01)));
}

#[test]
fn traceparent_valid_unsampled() {
    assert_eq!(parse_traceparent(&tp("00")), Some((ctx(false), 0x00)));
}

#[test]
fn traceparent_other_flag_bits_kept_sampled_is_bit0() {
    assert_eq!(parse_traceparent(&tp("03")), Some((ctx(true), 0x03)));
    assert_eq!(parse_traceparent(&tp("02")), Some((ctx(false), 0x02)));
    assert_eq!(parse_traceparent(&tp("ff")), Some((ctx(true), 0xff)));
}

#[test]
fn traceparent_upper_case_rejected() {
    let upper_tid = TID.to_uppercase();
    let upper_sid = SID.to_uppercase();
    assert_eq!(parse_traceparent(&format!("00-{upper_tid}-{SID}-01")), None);
    assert_eq!(parse_traceparent(&format!("00-{TID}-{upper_sid}-01")), None);
    assert_eq!(parse_traceparent(&format!("00-{TID}-{SID}-0A")), None);
    assert_eq!(parse_traceparent(&format!("0A-{TID}-{SID}-01")), None);
    // Fully upper-case value.
    assert_eq!(parse_traceparent(&tp("01").to_uppercase()), None);
}

#[test]
fn traceparent_wrong_lengths() {
    // Too short / too long fields, keeping separators.
    assert_eq!(
        parse_traceparent(&format!("00-{}-{SID}-01", &TID[1..])),
        None
    );
    assert_eq!(parse_traceparent(&format!("00-{TID}0-{SID}-01")), None);
    assert_eq!(
        parse_traceparent(&format!("00-{TID}-{}-01", &SID[1..])),
        None
    );
    assert_eq!(parse_traceparent(&format!("00-{TID}-{SID}0-01")), None);
    assert_eq!(parse_traceparent(&format!("00-{TID}-{SID}-1")), None);
    assert_eq!(parse_traceparent(&format!("00-{TID}-{SID}-001")), None);
    assert_eq!(parse_traceparent(&format!("0-{TID}-{SID}-01")), None);
    assert_eq!(parse_traceparent(&format!("000-{TID}-{SID}-01")), None);
    // Version 00 must be exactly 55 chars: no trailing data, not even a '-' field.
    assert_eq!(parse_traceparent(&format!("{}-", tp("01"))), None);
    assert_eq!(parse_traceparent(&format!("{}-abc", tp("01"))), None);
    assert_eq!(parse_traceparent(&format!("{}0", tp("01"))), None);
    assert_eq!(parse_traceparent(""), None);
    assert_eq!(parse_traceparent("00"), None);
    assert_eq!(parse_traceparent(&tp("01")[..54]), None);
}

#[test]
fn traceparent_wrong_separators() {
    let good = tp("01");
    for pos in [2, 35, 52] {
        let mut bytes = good.clone().into_bytes();
        bytes[pos] = b'_';
        assert_eq!(
            parse_traceparent(std::str::from_utf8(&bytes).unwrap()),
            None,
            "separator at {pos}"
        );
    }
    assert_eq!(parse_traceparent(&format!("00_{TID}_{SID}_01")), None);
}

#[test]
fn traceparent_version_ff_invalid() {
    assert_eq!(parse_traceparent(&format!("ff-{TID}-{SID}-01")), None);
    assert_eq!(parse_traceparent(&format!("ff-{TID}-{SID}-01-extra")), None);
}

#[test]
fn traceparent_future_version() {
    // Exactly 55 chars.
    assert_eq!(
        parse_traceparent(&format!("01-{TID}-{SID}-01")),
        Some((ctx(true), 0x01))
    );
    // Extra fields after a '-' are ignored.
    assert_eq!(
        parse_traceparent(&format!("cc-{TID}-{SID}-01-what-the-future-will-be-like")),
        Some((ctx(true), 0x01))
    );
    assert_eq!(
        parse_traceparent(&format!("fe-{TID}-{SID}-00-")),
        Some((ctx(false), 0x00))
    );
    // Longer but the 56th char is not '-'.
    assert_eq!(parse_traceparent(&format!("cc-{TID}-{SID}-01.extra")), None);
    assert_eq!(parse_traceparent(&format!("cc-{TID}-{SID}-010")), None);
    // Future version still requires valid known fields.
    assert_eq!(
        parse_traceparent(&format!("01-{}-{SID}-01-x", "0".repeat(32))),
        None
    );
    assert_eq!(parse_traceparent(&format!("01-{TID}-{SID}-0g-x")), None);
}

#[test]
fn traceparent_future_version_too_short() {
    assert_eq!(parse_traceparent(&format!("cc-{TID}-{SID}-0")), None);
    assert_eq!(parse_traceparent(&format!("cc-{TID}-{SID}")), None);
    assert_eq!(
        parse_traceparent(&format!("cc-{}-{SID}-01", &TID[1..])),
        None
    );
}

#[test]
fn traceparent_all_zero_ids_invalid() {
    assert_eq!(
        parse_traceparent(&format!("00-{}-{SID}-01", "0".repeat(32))),
        None
    );
    assert_eq!(
        parse_traceparent(&format!("00-{TID}-{}-01", "0".repeat(16))),
        None
    );
}

#[test]
fn traceparent_non_hex_rejected() {
    let good = tp("01");
    // Every hex position (version, ids, flags) with a non-hex char.
    for pos in (0..55).filter(|p| ![2, 35, 52].contains(p)) {
        for bad in [b'g', b'z', b' ', b'-', b'+', b'.'] {
            let mut bytes = good.clone().into_bytes();
            bytes[pos] = bad;
            let s = String::from_utf8(bytes).unwrap();
            assert_eq!(parse_traceparent(&s), None, "{s:?}");
        }
    }
    // Non-ASCII of the same byte length must not panic.
    assert_eq!(
        parse_traceparent(&format!("00-{}é-{SID}-01", &TID[2..])),
        None
    );
    assert_eq!(parse_traceparent(&"é".repeat(40)), None);
}

#[test]
fn traceparent_surrounding_whitespace_tolerated() {
    for v in [
        format!(" {}", tp("01")),
        format!("{} ", tp("01")),
        format!("\t {} \t", tp("01")),
    ] {
        assert_eq!(parse_traceparent(&v), Some((ctx(true), 1)), "{v:?}");
    }
    // Inner whitespace is not.
    assert_eq!(
        parse_traceparent(&format!("00- {}-{SID}-01", &TID[1..])),
        None
    );
    // Other whitespace (newline) is not OWS.
    assert_eq!(parse_traceparent(&format!("{}\n", tp("01"))), None);
}

#[test]
fn format_traceparent_round_trips() {
    for sampled in [true, false] {
        let c = ctx(sampled);
        let s = format_traceparent(&c);
        assert_eq!(s.len(), 55);
        assert_eq!(s, tp(if sampled { "01" } else { "00" }));
        assert_eq!(parse_traceparent(&s), Some((c, u8::from(sampled))));
    }
    for _ in 0..1000 {
        let c = SpanContext {
            trace_id: new_trace_id(),
            span_id: new_span_id(),
            sampled: rand::random(),
        };
        let (parsed, _) = parse_traceparent(&format_traceparent(&c)).unwrap();
        assert_eq!(parsed, c);
    }
}

#[test]
fn new_ids_are_random_and_non_zero() {
    let a = new_trace_id();
    let b = new_trace_id();
    assert_ne!(a, [0; 16]);
    assert_ne!(a, b);
    let a = new_span_id();
    let b = new_span_id();
    assert_ne!(a, [0; 8]);
    assert_ne!(a, b);
}

// ---------------------------------------------------------------- extract: W3C

#[test]
fn extract_traceparent_with_tracestate() {
    let headers = h(&[
        ("traceparent", &tp("01")),
        ("tracestate", "  rojo=00f067aa0ba902b7,congo=t61rcWkgMzE\t"),
    ]);
    assert_eq!(
        extract(&headers),
        Some(Extracted {
            parent: ctx(true),
            trace_state: Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE".into()),
            source: Source::TraceParent,
        })
    );
}

#[test]
fn extract_traceparent_without_tracestate() {
    let e = extract(&h(&[("traceparent", &tp("00"))])).unwrap();
    assert_eq!(e.parent, ctx(false));
    assert_eq!(e.trace_state, None);
    assert_eq!(e.source, Source::TraceParent);
    // Empty tracestate is absent.
    let e = extract(&h(&[("traceparent", &tp("00")), ("tracestate", "  ")])).unwrap();
    assert_eq!(e.trace_state, None);
}

#[test]
fn extract_tracestate_dropped_when_too_long() {
    let at_limit = format!("k={}", "v".repeat(510));
    assert_eq!(at_limit.len(), 512);
    let e = extract(&h(&[("traceparent", &tp("01")), ("tracestate", &at_limit)])).unwrap();
    assert_eq!(e.trace_state.as_deref(), Some(at_limit.as_str()));

    let too_long = format!("k={}", "v".repeat(511));
    let e = extract(&h(&[("traceparent", &tp("01")), ("tracestate", &too_long)])).unwrap();
    assert_eq!(e.parent, ctx(true));
    assert_eq!(e.trace_state, None);
}

#[test]
fn extract_tracestate_multiple_headers_joined() {
    let e = extract(&h(&[
        ("tracestate", "a=1"),
        ("traceparent", &tp("01")),
        ("tracestate", " b=2 "),
    ]))
    .unwrap();
    assert_eq!(e.trace_state.as_deref(), Some("a=1,b=2"));
}

#[test]
fn extract_tracestate_ignored_without_valid_traceparent() {
    assert_eq!(extract(&h(&[("tracestate", "a=1")])), None);
    assert_eq!(
        extract(&h(&[("traceparent", "garbage"), ("tracestate", "a=1")])),
        None
    );
    // Falls back to B3; the tracestate is not carried over.
    let e = extract(&h(&[
        ("traceparent", "garbage"),
        ("tracestate", "a=1"),
        ("b3", &format!("{TID}-{SID}-1")),
    ]))
    .unwrap();
    assert_eq!(e.source, Source::B3Single);
    assert_eq!(e.trace_state, None);
}

#[test]
fn extract_traceparent_whitespace() {
    let e = extract(&h(&[("traceparent", &format!(" \t{} ", tp("01")))])).unwrap();
    assert_eq!(e.parent, ctx(true));
}

#[test]
fn extract_duplicate_traceparent_is_absent() {
    let other = format!("00-{}-{SID}-01", "1".repeat(32));
    assert_eq!(
        extract(&h(&[("traceparent", &tp("01")), ("traceparent", &other)])),
        None
    );
    // Even two identical copies.
    assert_eq!(
        extract(&h(&[
            ("traceparent", &tp("01")),
            ("traceparent", &tp("01"))
        ])),
        None
    );
    // ... and B3 is used instead.
    let e = extract(&h(&[
        ("traceparent", &tp("01")),
        ("traceparent", &other),
        ("x-b3-traceid", TID),
        ("x-b3-spanid", SID),
        ("x-b3-sampled", "0"),
    ]))
    .unwrap();
    assert_eq!(e.source, Source::B3Multi);
    assert_eq!(e.parent, ctx(false));
}

#[test]
fn extract_header_names_case_insensitive() {
    let e = extract(&h(&[("TraceParent", &tp("01"))])).unwrap();
    assert_eq!(e.source, Source::TraceParent);
    let e = extract(&h(&[("X-B3-TraceId", TID), ("X-B3-SpanId", SID)])).unwrap();
    assert_eq!(e.source, Source::B3Multi);
}

#[test]
fn extract_nothing() {
    assert_eq!(extract(&[]), None);
    assert_eq!(extract(&h(&[("x-b3-parentspanid", SID)])), None);
}

// ---------------------------------------------------------------- B3 single

#[test]
fn b3_single_two_parts() {
    assert_eq!(parse_b3_single(&format!("{TID}-{SID}")), Some(ctx(true)));
}

#[test]
fn b3_single_three_parts() {
    assert_eq!(parse_b3_single(&format!("{TID}-{SID}-1")), Some(ctx(true)));
    assert_eq!(parse_b3_single(&format!("{TID}-{SID}-0")), Some(ctx(false)));
    assert_eq!(parse_b3_single(&format!("{TID}-{SID}-d")), Some(ctx(true)));
}

#[test]
fn b3_single_four_parts() {
    let parent = "05e3ac9a4f6e3b90";
    assert_eq!(
        parse_b3_single(&format!("{TID}-{SID}-1-{parent}")),
        Some(ctx(true))
    );
    assert_eq!(
        parse_b3_single(&format!("{TID}-{SID}-0-{parent}")),
        Some(ctx(false))
    );
    assert_eq!(
        parse_b3_single(&format!("{TID}-{SID}-d-{parent}")),
        Some(ctx(true))
    );
    // Bad parent span id.
    assert_eq!(parse_b3_single(&format!("{TID}-{SID}-1-05e3ac9a")), None);
    assert_eq!(
        parse_b3_single(&format!("{TID}-{SID}-1-{}", "0".repeat(16))),
        None
    );
    assert_eq!(
        parse_b3_single(&format!("{TID}-{SID}-1-05E3AC9A4F6E3B90")),
        None
    );
    assert_eq!(parse_b3_single(&format!("{TID}-{SID}-1-")), None);
    // Too many parts.
    assert_eq!(parse_b3_single(&format!("{TID}-{SID}-1-{parent}-x")), None);
}

#[test]
fn b3_single_64_bit_trace_id_padded() {
    let c = parse_b3_single(&format!("a3ce929d0e0e4736-{SID}-1")).unwrap();
    assert_eq!(
        c.trace_id,
        [
            0, 0, 0, 0, 0, 0, 0, 0, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47, 0x36
        ]
    );
    assert_eq!(c.span_id, SID_BYTES);
    assert!(c.sampled);
}

#[test]
fn b3_single_lone_sampling_has_no_ids() {
    for v in ["0", "1", "d", ""] {
        assert_eq!(parse_b3_single(v), None, "{v:?}");
    }
}

#[test]
fn b3_single_invalid() {
    let zero_tid = "0".repeat(32);
    let zero_tid64 = "0".repeat(16);
    let cases = [
        TID.to_string(),
        format!("{TID}-"),
        format!("-{SID}"),
        format!("{zero_tid}-{SID}"),
        format!("{zero_tid64}-{SID}"),
        format!("{TID}-{}", "0".repeat(16)),
        format!("{}-{SID}", TID.to_uppercase()),
        format!("{TID}-{}", SID.to_uppercase()),
        format!("{}-{SID}", &TID[1..]),  // 31 hex
        format!("{}-{SID}", &TID[..20]), // 20 hex
        format!("{TID}-{}", &SID[1..]),
        format!("{TID}-{SID}0"),
        format!("{}g-{SID}", &TID[1..]),
        format!("{TID}-{SID}-2"),
        format!("{TID}-{SID}-true"),
        format!("{TID}-{SID}-D"),
        format!("{TID}-{SID}-"),
        format!("{TID} -{SID}"),
        "garbage".to_string(),
    ];
    for v in &cases {
        assert_eq!(parse_b3_single(v), None, "{v:?}");
    }
}

#[test]
fn b3_single_whitespace_tolerated() {
    assert_eq!(
        parse_b3_single(&format!(" {TID}-{SID}-0\t")),
        Some(ctx(false))
    );
}

// ---------------------------------------------------------------- B3 multi

#[test]
fn b3_multi_with_sampled() {
    let base = [("x-b3-traceid", TID), ("x-b3-spanid", SID)];
    for (v, want) in [("1", true), ("0", false), ("true", true), ("false", false)] {
        let mut headers = h(&base);
        headers.push(("x-b3-sampled".into(), v.into()));
        assert_eq!(parse_b3_multi(&headers), Some(ctx(want)), "{v}");
    }
}

#[test]
fn b3_multi_without_sampled_defaults_to_sampled() {
    assert_eq!(
        parse_b3_multi(&h(&[("x-b3-traceid", TID), ("x-b3-spanid", SID)])),
        Some(ctx(true))
    );
}

#[test]
fn b3_multi_debug_flag() {
    assert_eq!(
        parse_b3_multi(&h(&[
            ("x-b3-traceid", TID),
            ("x-b3-spanid", SID),
            ("x-b3-flags", "1"),
        ])),
        Some(ctx(true))
    );
    // Debug overrides a "0" sampling decision.
    assert_eq!(
        parse_b3_multi(&h(&[
            ("x-b3-traceid", TID),
            ("x-b3-spanid", SID),
            ("x-b3-sampled", "0"),
            ("x-b3-flags", "1"),
        ])),
        Some(ctx(true))
    );
    // Flags "0" is no debug.
    assert_eq!(
        parse_b3_multi(&h(&[
            ("x-b3-traceid", TID),
            ("x-b3-spanid", SID),
            ("x-b3-sampled", "0"),
            ("x-b3-flags", "0"),
        ])),
        Some(ctx(false))
    );
    assert_eq!(
        parse_b3_multi(&h(&[
            ("x-b3-traceid", TID),
            ("x-b3-spanid", SID),
            ("x-b3-flags", "2"),
        ])),
        None
    );
}

#[test]
fn b3_multi_64_bit_trace_id() {
    let c = parse_b3_multi(&h(&[
        ("x-b3-traceid", "a3ce929d0e0e4736"),
        ("x-b3-spanid", SID),
        ("x-b3-parentspanid", "05e3ac9a4f6e3b90"),
        ("x-b3-sampled", "1"),
    ]))
    .unwrap();
    assert_eq!(&c.trace_id[..8], &[0; 8]);
    assert_eq!(
        &c.trace_id[8..],
        &[0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47, 0x36]
    );
    assert_eq!(c.span_id, SID_BYTES);
}

#[test]
fn b3_multi_upper_case_rejected() {
    assert_eq!(
        parse_b3_multi(&h(&[
            ("x-b3-traceid", &TID.to_uppercase()),
            ("x-b3-spanid", SID)
        ])),
        None
    );
    assert_eq!(
        parse_b3_multi(&h(&[
            ("x-b3-traceid", TID),
            ("x-b3-spanid", &SID.to_uppercase())
        ])),
        None
    );
}

#[test]
fn b3_multi_invalid() {
    let zero32 = "0".repeat(32);
    let zero16 = "0".repeat(16);
    let cases: Vec<Vec<(&str, &str)>> = vec![
        vec![("x-b3-traceid", TID)],
        vec![("x-b3-spanid", SID)],
        vec![("x-b3-traceid", &zero32), ("x-b3-spanid", SID)],
        vec![("x-b3-traceid", &zero16), ("x-b3-spanid", SID)],
        vec![("x-b3-traceid", TID), ("x-b3-spanid", &zero16)],
        vec![("x-b3-traceid", &TID[1..]), ("x-b3-spanid", SID)],
        vec![("x-b3-traceid", TID), ("x-b3-spanid", &SID[1..])],
        vec![("x-b3-traceid", TID), ("x-b3-spanid", TID)],
        vec![("x-b3-traceid", "xyz"), ("x-b3-spanid", SID)],
        vec![
            ("x-b3-traceid", TID),
            ("x-b3-spanid", SID),
            ("x-b3-sampled", "yes"),
        ],
        vec![
            ("x-b3-traceid", TID),
            ("x-b3-spanid", SID),
            ("x-b3-sampled", "d"),
        ],
        vec![
            ("x-b3-traceid", TID),
            ("x-b3-spanid", SID),
            ("x-b3-sampled", ""),
        ],
        // Duplicates are ambiguous.
        vec![
            ("x-b3-traceid", TID),
            ("x-b3-traceid", TID),
            ("x-b3-spanid", SID),
        ],
        vec![
            ("x-b3-traceid", TID),
            ("x-b3-spanid", SID),
            ("x-b3-spanid", SID),
        ],
        vec![
            ("x-b3-traceid", TID),
            ("x-b3-spanid", SID),
            ("x-b3-sampled", "1"),
            ("x-b3-sampled", "0"),
        ],
    ];
    for c in &cases {
        assert_eq!(parse_b3_multi(&h(c)), None, "{c:?}");
    }
}

#[test]
fn b3_multi_whitespace_and_parent_ignored() {
    assert_eq!(
        parse_b3_multi(&h(&[
            ("x-b3-traceid", &format!(" {TID} ")),
            ("x-b3-spanid", &format!("\t{SID}")),
            ("x-b3-parentspanid", "not even hex"),
            ("x-b3-sampled", " 0 "),
        ])),
        Some(ctx(false))
    );
}

// ---------------------------------------------------------------- precedence

#[test]
fn precedence_traceparent_over_b3() {
    let other_tid = "1".repeat(32);
    let headers = h(&[
        ("b3", &format!("{other_tid}-{SID}-0")),
        ("x-b3-traceid", &other_tid),
        ("x-b3-spanid", SID),
        ("traceparent", &tp("01")),
    ]);
    let e = extract(&headers).unwrap();
    assert_eq!(e.source, Source::TraceParent);
    assert_eq!(e.parent, ctx(true));
}

#[test]
fn precedence_b3_single_over_multi() {
    let other_tid = "1".repeat(32);
    let headers = h(&[
        ("x-b3-traceid", &other_tid),
        ("x-b3-spanid", SID),
        ("x-b3-sampled", "1"),
        ("b3", &format!("{TID}-{SID}-0")),
    ]);
    let e = extract(&headers).unwrap();
    assert_eq!(e.source, Source::B3Single);
    assert_eq!(e.parent, ctx(false));
    assert_eq!(e.trace_state, None);
}

#[test]
fn fallback_to_b3_when_traceparent_invalid() {
    let bad = format!("00-{}-{SID}-01", TID.to_uppercase());
    let e = extract(&h(&[
        ("traceparent", &bad),
        ("b3", &format!("{TID}-{SID}")),
    ]))
    .unwrap();
    assert_eq!(e.source, Source::B3Single);
    assert_eq!(e.parent, ctx(true));

    let e = extract(&h(&[
        ("traceparent", &bad),
        ("x-b3-traceid", TID),
        ("x-b3-spanid", SID),
        ("x-b3-sampled", "0"),
    ]))
    .unwrap();
    assert_eq!(e.source, Source::B3Multi);
    assert_eq!(e.parent, ctx(false));
}

#[test]
fn fallback_to_b3_multi_when_b3_single_invalid_or_duplicated() {
    let multi = [("x-b3-traceid", TID), ("x-b3-spanid", SID)];
    for b3 in [
        vec!["0"],
        vec!["garbage"],
        vec![&*format!("{TID}-{SID}"), "1"],
    ] {
        let mut headers = h(&multi);
        for v in b3 {
            headers.push(("b3".into(), v.into()));
        }
        let e = extract(&headers).unwrap();
        assert_eq!(e.source, Source::B3Multi, "{headers:?}");
    }
}

#[test]
fn all_invalid_yields_none() {
    assert_eq!(
        extract(&h(&[
            ("traceparent", "00-xyz"),
            ("b3", "1"),
            ("x-b3-traceid", TID),
        ])),
        None
    );
}

// ---------------------------------------------------------------- sampler: parsing

fn ratio(r: f64) -> Sampler {
    Sampler::TraceIdRatio(r)
}

fn pb(root: Sampler) -> Sampler {
    Sampler::ParentBased(Box::new(root))
}

#[test]
fn sampler_default() {
    assert_eq!(
        Sampler::from_env_and_flag(None, None, None),
        pb(Sampler::AlwaysOn)
    );
    assert_eq!(Sampler::default(), pb(Sampler::AlwaysOn));
    assert_eq!(
        Sampler::from_env_and_flag(Some(""), None, None),
        pb(Sampler::AlwaysOn)
    );
    assert_eq!(
        Sampler::from_env_and_flag(Some("  "), Some("0.5"), None),
        pb(Sampler::AlwaysOn)
    );
}

#[test]
fn sampler_every_env_value() {
    let f = |name: &str, arg: Option<&str>| Sampler::from_env_and_flag(Some(name), arg, None);
    assert_eq!(f("always_on", None), Sampler::AlwaysOn);
    assert_eq!(f("always_off", None), Sampler::AlwaysOff);
    assert_eq!(f("traceidratio", Some("0.5")), ratio(0.5));
    assert_eq!(f("parentbased_always_on", None), pb(Sampler::AlwaysOn));
    assert_eq!(f("parentbased_always_off", None), pb(Sampler::AlwaysOff));
    assert_eq!(f("parentbased_traceidratio", Some("0.25")), pb(ratio(0.25)));
    // Names are case-insensitive and trimmed; args are trimmed.
    assert_eq!(f(" AlwaysOff ", None), pb(Sampler::AlwaysOn)); // camel case is not a name: default
    assert_eq!(f("ALWAYS_OFF", None), Sampler::AlwaysOff);
    assert_eq!(f(" TraceIdRatio ", Some(" 0.1 ")), ratio(0.1));
    // Args are ignored by non-ratio samplers.
    assert_eq!(f("always_on", Some("0.5")), Sampler::AlwaysOn);
    assert_eq!(
        f("parentbased_always_off", Some("junk")),
        pb(Sampler::AlwaysOff)
    );
    // Ratio bounds are inclusive.
    assert_eq!(f("traceidratio", Some("0")), ratio(0.0));
    assert_eq!(f("traceidratio", Some("1")), ratio(1.0));
    assert_eq!(f("traceidratio", Some("1.0")), ratio(1.0));
    assert_eq!(f("traceidratio", Some("1e-3")), ratio(0.001));
}

#[test]
fn sampler_junk_name_falls_back_to_default() {
    for name in [
        "junk",
        "jaeger_remote",
        "parentbased_jaeger_remote",
        "xray",
        "always-on",
    ] {
        assert_eq!(
            Sampler::from_env_and_flag(Some(name), Some("0.5"), None),
            pb(Sampler::AlwaysOn),
            "{name}"
        );
    }
}

#[test]
fn sampler_missing_or_bad_ratio_arg_is_one() {
    for arg in [None, Some(""), Some(" ")] {
        assert_eq!(
            Sampler::from_env_and_flag(Some("traceidratio"), arg, None),
            ratio(1.0)
        );
        assert_eq!(
            Sampler::from_env_and_flag(Some("parentbased_traceidratio"), arg, None),
            pb(ratio(1.0))
        );
    }
    for arg in [
        "abc", "-0.1", "1.5", "2", "NaN", "inf", "-inf", "0.5x", "50%",
    ] {
        assert_eq!(
            Sampler::from_env_and_flag(Some("traceidratio"), Some(arg), None),
            ratio(1.0),
            "{arg}"
        );
        assert_eq!(
            Sampler::from_env_and_flag(Some("parentbased_traceidratio"), Some(arg), None),
            pb(ratio(1.0)),
            "{arg}"
        );
    }
}

#[test]
fn sampler_flag_wins() {
    assert_eq!(
        Sampler::from_env_and_flag(Some("always_off"), Some("0.9"), Some(0.1)),
        pb(ratio(0.1))
    );
    assert_eq!(
        Sampler::from_env_and_flag(None, None, Some(0.0)),
        pb(ratio(0.0))
    );
    assert_eq!(
        Sampler::from_env_and_flag(Some("junk"), None, Some(1.0)),
        pb(ratio(1.0))
    );
    // Invalid flag ratio: warning and 1.0.
    for bad in [-0.5, 1.01, f64::NAN, f64::INFINITY] {
        assert_eq!(
            Sampler::from_env_and_flag(Some("always_off"), None, Some(bad)),
            pb(ratio(1.0)),
            "{bad}"
        );
    }
}

// ---------------------------------------------------------------- sampler: decisions

fn tid_with_low(low: u64) -> [u8; 16] {
    let mut t = [0xab; 16];
    t[8..].copy_from_slice(&low.to_be_bytes());
    t
}

#[test]
fn always_on_off() {
    let t = new_trace_id();
    let parent_on = ctx(true);
    let parent_off = ctx(false);
    assert!(Sampler::AlwaysOn.should_sample(&t, None));
    assert!(Sampler::AlwaysOn.should_sample(&t, Some(&parent_off)));
    assert!(!Sampler::AlwaysOff.should_sample(&t, None));
    assert!(!Sampler::AlwaysOff.should_sample(&t, Some(&parent_on)));
}

#[test]
fn ratio_zero_and_one() {
    for low in [0, 1, 2, u64::MAX / 2, u64::MAX - 1, u64::MAX] {
        let t = tid_with_low(low);
        assert!(!ratio(0.0).should_sample(&t, None), "{low}");
        assert!(ratio(1.0).should_sample(&t, None), "{low}");
    }
    for _ in 0..10_000 {
        let t = new_trace_id();
        assert!(!ratio(0.0).should_sample(&t, None));
        assert!(ratio(1.0).should_sample(&t, None));
    }
}

#[test]
fn ratio_uses_low_64_bits_like_otel() {
    // bound for 0.5 is 2^62: (low >> 1) < 2^62 ⇔ low < 2^63.
    assert!(ratio(0.5).should_sample(&tid_with_low((1 << 63) - 1), None));
    assert!(!ratio(0.5).should_sample(&tid_with_low(1 << 63), None));
    // The high 8 bytes do not matter.
    let mut t = tid_with_low(0);
    t[..8].copy_from_slice(&[0xff; 8]);
    assert!(ratio(0.000_001).should_sample(&t, None));
    let mut t = tid_with_low(u64::MAX);
    t[..8].copy_from_slice(&[0; 8]);
    assert!(!ratio(0.999).should_sample(&t, None));
}

#[test]
fn ratio_is_deterministic() {
    let s = ratio(0.5);
    for _ in 0..1000 {
        let t = new_trace_id();
        let first = s.should_sample(&t, None);
        for _ in 0..5 {
            assert_eq!(s.should_sample(&t, None), first);
        }
        // Same decision for a parent-based root in another "process".
        assert_eq!(pb(ratio(0.5)).should_sample(&t, None), first);
    }
}

#[test]
fn ratio_monotonic_in_ratio() {
    // A trace kept at ratio r is kept at every larger ratio (consistent across services).
    for _ in 0..1000 {
        let t = new_trace_id();
        if ratio(0.1).should_sample(&t, None) {
            assert!(ratio(0.5).should_sample(&t, None));
        }
    }
}

#[test]
fn ratio_statistics_quarter() {
    let s = ratio(0.25);
    let n = 100_000;
    let kept = (0..n)
        .filter(|_| s.should_sample(&new_trace_id(), None))
        .count();
    let frac = kept as f64 / n as f64;
    assert!((0.24..=0.26).contains(&frac), "kept {frac}");
}

#[test]
fn parent_based_honours_parent_flag() {
    let t = new_trace_id();
    let parent_on = ctx(true);
    let parent_off = ctx(false);
    for root in [
        Sampler::AlwaysOn,
        Sampler::AlwaysOff,
        ratio(0.0),
        ratio(1.0),
    ] {
        let s = pb(root);
        assert!(s.should_sample(&t, Some(&parent_on)), "{s:?}");
        assert!(!s.should_sample(&t, Some(&parent_off)), "{s:?}");
    }
}

#[test]
fn parent_based_root_decides_without_parent() {
    let t = new_trace_id();
    assert!(pb(Sampler::AlwaysOn).should_sample(&t, None));
    assert!(!pb(Sampler::AlwaysOff).should_sample(&t, None));
    assert!(!pb(ratio(0.0)).should_sample(&t, None));
    assert!(pb(ratio(1.0)).should_sample(&t, None));
}

#[test]
fn sampler_works_with_extracted_parent() {
    let e = extract(&h(&[("traceparent", &tp("00"))])).unwrap();
    let s = Sampler::default();
    assert!(!s.should_sample(&e.parent.trace_id, Some(&e.parent)));
    let e = extract(&h(&[("b3", &format!("{TID}-{SID}-d"))])).unwrap();
    assert!(s.should_sample(&e.parent.trace_id, Some(&e.parent)));
}
