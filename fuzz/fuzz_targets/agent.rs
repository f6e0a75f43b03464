//! `cargo fuzz run agent`: see `balanced::fuzzing::agent`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| balanced::fuzzing::agent(data));
