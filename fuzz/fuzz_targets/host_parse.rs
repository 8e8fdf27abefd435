//! cargo-fuzz entry point; the body and its oracle are in `sealgate_fuzz::targets::host_parse`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sealgate_fuzz::targets::host_parse(data));
