#![no_main]

// Entry point and input format: kspan::fuzzing::tracecontext.
libfuzzer_sys::fuzz_target!(|data: &[u8]| kspan::fuzzing::tracecontext(data));
