//! `cargo fuzz run chunked`: see `balanced::fuzzing::chunked`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| balanced::fuzzing::chunked(data));
