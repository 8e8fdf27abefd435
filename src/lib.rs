//! sealgate: an egress substitution proxy for sandboxes.
//!
//! Sandboxes hold sealed placeholders (`osb_sealed_…`); sealgate terminates their TLS with a
//! per-sandbox CA, swaps in real secrets only for allowed destinations, blocks all other egress
//! and scrubs real values from responses. See `ARCHITECTURE.md` for the design.

pub mod admin;
pub mod alloc;
pub mod audit;
pub mod ca;
pub mod cli;
pub mod config;
pub mod core_dumps;
pub mod crash_point;
pub mod daemon;
pub mod data_dir_lock;
pub mod fsutil;
pub mod isolation;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod netns;
pub mod nofile;
pub mod notify;
pub mod policy;
pub mod proxy;
pub mod random;
pub mod rotate;
pub mod sandbox;
pub mod secret;
pub mod signals;
pub mod store;
pub mod subst;
pub mod tls_provider;
pub mod tls_roots;
pub mod token;
