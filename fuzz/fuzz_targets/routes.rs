//! `cargo fuzz run routes`: see `balanced::fuzzing::routes`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| balanced::fuzzing::routes(data));
