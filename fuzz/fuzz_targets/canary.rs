//! libFuzzer over Canary parsing and validation.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| weir_fuzz::canary(data));
