#![no_main]

// Entry point and input format: kspan::fuzzing::grpc.
libfuzzer_sys::fuzz_target!(|data: &[u8]| kspan::fuzzing::grpc(data));
