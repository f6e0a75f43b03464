//! `cargo fuzz run probe_answer`: see `balanced::fuzzing::probe_answer`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| balanced::fuzzing::probe_answer(data));
