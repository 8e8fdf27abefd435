//! sealgate fuzz targets: the bodies live in [`targets`], shared with the stable smoke run in
//! the integration tests; `fuzz_targets/*.rs` are the thin cargo-fuzz entry points.

pub mod targets;
