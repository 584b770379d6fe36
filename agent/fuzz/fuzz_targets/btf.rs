#![no_main]

// Entry point and input format: kspan::fuzzing::btf.
libfuzzer_sys::fuzz_target!(|data: &[u8]| kspan::fuzzing::btf(data));
