//! libFuzzer over report validation: the wire checks, prost's decoding and the ingest.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| weir_fuzz::report(data));
