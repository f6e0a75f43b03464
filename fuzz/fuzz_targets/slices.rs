//! `cargo fuzz run slices`: see `balanced::fuzzing::slices`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| balanced::fuzzing::slices(data));
