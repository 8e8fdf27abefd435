//! cargo-fuzz entry point; the body and its oracle are in `sealgate_fuzz::targets::subst_chunked`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sealgate_fuzz::targets::subst_chunked(data));
