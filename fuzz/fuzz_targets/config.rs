//! `cargo fuzz run config`: see `balanced::fuzzing::config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| balanced::fuzzing::config(data));
