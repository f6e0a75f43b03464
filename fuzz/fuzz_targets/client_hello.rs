//! `cargo fuzz run client_hello`: see `balanced::fuzzing::client_hello`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| balanced::fuzzing::client_hello(data));
