#![no_main]

// Entry point and input format: kspan::fuzzing::tracefs.
libfuzzer_sys::fuzz_target!(|data: &[u8]| kspan::fuzzing::tracefs(data));
