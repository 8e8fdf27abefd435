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
mod validate;

pub use error::ApiError;
pub use routes::{router, CORRUPT_STORES_HEADER};

use std::sync::Arc;

use crate::audit::Audit;
use crate::isolation::Isolation;
use crate::metrics::Metrics;
use crate::sandbox::Sandboxes;
use crate::secret::SecretValue;
use crate::store::Store;

/// Answer to a reload request: the keys that need a restart, or why the file was refused.
pub type ReloadReply = tokio::sync::oneshot::Sender<Result<Vec<String>, String>>;
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
    /// The bearer token.
    pub admin_token: SecretValue,
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
