#![no_main]

// Entry point and input format: kspan::fuzzing::ring_event.
libfuzzer_sys::fuzz_target!(|data: &[u8]| kspan::fuzzing::ring_event(data));
