#![no_main]

// Entry point and input format: kspan::fuzzing::http2.
libfuzzer_sys::fuzz_target!(|data: &[u8]| kspan::fuzzing::http2(data));
