//! `cargo fuzz run http1_head`: see `balanced::fuzzing::http1_head`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| balanced::fuzzing::http1_head(data));
