//! cargo-fuzz entry point; the body and its oracle are in `sealgate_fuzz::targets::grpc_frames`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sealgate_fuzz::targets::grpc_frames(data));
