//! sealgate integration tests: one binary, fully in process (daemon on port 0, temp data dir,
//! test PKI made at run time, echo upstream on loopback). Nothing touches the internet.

mod support;

mod admin_api;
mod adversarial;
mod clients;
mod contract;
mod first_hour;
mod fleet;
mod interop;
mod isolation;
mod ops;
mod proxy_explicit;
mod refusals;
mod sandboxes;
mod transparent;
