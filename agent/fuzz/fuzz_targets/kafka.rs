#![no_main]

// Entry point and input format: kspan::fuzzing::kafka.
libfuzzer_sys::fuzz_target!(|data: &[u8]| kspan::fuzzing::kafka(data));
