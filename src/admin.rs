//! The admin API (axum): stores, secrets and sandboxes, shaped like the `SecretStore` SDK.
//!
//! Invariants: every route except `/healthz` requires the bearer token (compared in constant
//! time); secret values go in, never out; every error leaves through [`ApiError`]'s one mapping
//! to `{"error": {"code", "message"}}`.

mod body;
mod error;
mod ready;
mod routes;
pub mod serve;
mod slots;
mod token;
mod validate;

pub use error::{unrepeated_names, ApiError};
pub use routes::{router, CORRUPT_STORES_HEADER};
pub use token::{
    read_file as read_token_file, unsendable as unsendable_token, warn_short as warn_short_token,
    AdminToken, TokenReload,
};

use std::sync::Arc;

use crate::audit::Audit;
use crate::isolation::Isolation;
use crate::metrics::Metrics;
use crate::sandbox::Sandboxes;
use crate::store::Store;

/// What a reload applied: the keys that need a restart, and what became of the admin token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Keys whose new value only a restart applies.
    pub needs_restart: Vec<String>,
    /// The admin token re-read from its file (or kept: it came from the environment).
    pub token: TokenReload,
}

/// Answer to a reload request: what it applied, or why nothing was (file or token refused).
pub type ReloadReply = tokio::sync::oneshot::Sender<Result<Reloaded, String>>;
/// Asks the daemon to reload its configuration.
pub type ReloadSender = tokio::sync::mpsc::UnboundedSender<ReloadReply>;

/// Shared state of the admin API.
pub struct AdminState {
    /// Durable store.
    pub store: Arc<dyn Store>,
    /// Sandbox service.
    pub sandboxes: Arc<Sandboxes>,
    /// Isolated sandboxes (namespaces, commands).
    pub isolation: Arc<Isolation>,
    /// The bearer token (re-read from its file on reload).
    pub admin_token: Arc<AdminToken>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Audit sink.
    pub audit: Arc<Audit>,
    /// Triggers a config reload (SIGHUP equivalent); None when reload is unsupported.
    pub reload: Option<ReloadSender>,
    /// The store check shared by `/readyz` probes.
    pub ready: ready::ReadyCheck,
    /// Fleet mode: the follower's health (is this node current with the shared database?).
    pub follower: Option<Arc<crate::store::postgres::Health>>,
}
